//! The peer process: the bench binary re-executed with a role in the
//! environment. The parent side is [`Peer`] (spawn, commands over the
//! child's stdin, replies over its stdout, kill on drop); the child side is
//! [`PeerCtx`] (inherited descriptors, commands, replies). Every wait has a
//! watchdog, and a child dies with its parent (`PR_SET_PDEATHSIG`), so no
//! peer outlives a failed or interrupted run.

use crate::harness::pin_to;
use anyhow::{Context, Result, anyhow, bail};
use std::io::{BufRead, BufReader, Lines, StdinLock, Stdout, Write};
use std::os::fd::{AsRawFd, BorrowedFd, FromRawFd, OwnedFd, RawFd};
use std::process::{Child, ChildStdin, Command, Stdio};
use std::sync::atomic::AtomicBool;
use std::sync::atomic::Ordering::Relaxed;
use std::sync::mpsc::{Receiver, RecvTimeoutError, channel};
use std::time::{Duration, Instant};

/// Environment variable naming the peer role; its presence makes the binary
/// a peer instead of the suite runner.
pub(crate) const ROLE_ENV: &str = "DNE_BENCH_PEER";
/// Comma-separated numbers of the descriptors the peer inherited.
const FDS_ENV: &str = "DNE_BENCH_PEER_FDS";
/// Pid of the parent (the peer refuses to run under another one).
const PARENT_ENV: &str = "DNE_BENCH_PEER_PARENT";
/// CPU the peer pins itself to.
const CPU_ENV: &str = "DNE_BENCH_PEER_CPU";

/// CPUs of the pinger (the parent's measuring thread) and of every peer,
/// when the machine has at least two: each busy-polling side gets a core
/// of its own, the same for every system compared.
pub(crate) const PINGER_CPU: usize = 0;
const PEER_CPU: usize = 1;

/// Set once the pinger is pinned: peers then pin themselves too.
static PINNED: AtomicBool = AtomicBool::new(false);

/// Pins the calling thread to [`PINGER_CPU`] when peers get their own CPU;
/// returns whether it did.
pub(crate) fn pin_pinger() -> Result<bool> {
    // Asked before pinning: afterwards this thread sees one CPU.
    if std::thread::available_parallelism().map_or(1, |n| n.get()) < 2 {
        return Ok(false);
    }
    pin_to(PINGER_CPU)?;
    PINNED.store(true, Relaxed);
    Ok(true)
}

/// Longest any single wait may take before the run is declared hung.
pub(crate) const WATCHDOG: Duration = Duration::from_secs(30);

/// A busy-poll loop's watchdog: checks the clock every 1024 polls.
#[derive(Debug)]
pub(crate) struct Watchdog {
    deadline: Instant,
    polls: u32,
}

impl Watchdog {
    /// A watchdog that fires [`WATCHDOG`] from now.
    pub(crate) fn new() -> Self {
        Self { deadline: Instant::now() + WATCHDOG, polls: 0 }
    }

    /// One empty poll: a spin hint, and an error once the deadline passed.
    #[inline]
    pub(crate) fn tick(&mut self) -> Result<()> {
        self.poll(true)
    }

    /// One empty poll, with a spin hint (`pause`) or without.
    #[inline]
    pub(crate) fn poll(&mut self, hint: bool) -> Result<()> {
        self.polls = self.polls.wrapping_add(1);
        if self.polls.is_multiple_of(1024) && Instant::now() >= self.deadline {
            bail!("watchdog: peer did not answer within {WATCHDOG:?}");
        }
        if hint {
            std::hint::spin_loop();
        }
        Ok(())
    }

    /// Time left before the deadline (for blocking waits).
    pub(crate) fn remaining(&self) -> Duration {
        self.deadline.saturating_duration_since(Instant::now())
    }
}

/// A running peer process, seen from the parent. Dropping it closes the
/// command pipe, gives the peer a moment to exit, then kills it.
#[derive(Debug)]
pub(crate) struct Peer {
    role: String,
    child: Child,
    stdin: Option<ChildStdin>,
    lines: Receiver<String>,
}

impl Peer {
    /// Starts `current_exe()` as peer `role`, passing `fds` (inherited,
    /// without `FD_CLOEXEC`) and `env`, and waits for its `ready`.
    pub(crate) fn spawn(role: &str, fds: &[BorrowedFd<'_>], env: &[(&str, String)]) -> Result<Peer> {
        // `dup` never sets FD_CLOEXEC, so these copies survive the exec; they
        // are closed in this process right after the spawn.
        let dups = fds.iter().map(nix::unistd::dup).collect::<Result<Vec<OwnedFd>, _>>()?;
        let nums: Vec<String> = dups.iter().map(|d| d.as_raw_fd().to_string()).collect();
        let mut cmd = Command::new(std::env::current_exe().context("current_exe")?);
        cmd.env(ROLE_ENV, role)
            .env(FDS_ENV, nums.join(","))
            .env(PARENT_ENV, std::process::id().to_string())
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit());
        if PINNED.load(Relaxed) {
            cmd.env(CPU_ENV, PEER_CPU.to_string());
        }
        for (k, v) in env {
            cmd.env(k, v);
        }
        let mut child = cmd.spawn().with_context(|| format!("spawning peer {role}"))?;
        drop(dups);
        let stdin = child.stdin.take();
        let stdout = child.stdout.take().ok_or_else(|| anyhow!("peer stdout not piped"))?;
        let (tx, lines) = channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines() {
                let Ok(line) = line else { break };
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
        let mut peer = Peer { role: role.to_owned(), child, stdin, lines };
        peer.expect("ready")?;
        Ok(peer)
    }

    /// The peer's process id.
    pub(crate) fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Sends one command line.
    pub(crate) fn send(&mut self, cmd: &str) -> Result<()> {
        let stdin = self.stdin.as_mut().ok_or_else(|| anyhow!("peer {} closed", self.role))?;
        writeln!(stdin, "{cmd}").and_then(|()| stdin.flush()).with_context(|| format!("peer {}", self.role))
    }

    /// Waits (at most [`WATCHDOG`]) for a reply line whose first word is
    /// `want`; returns the rest of the line.
    pub(crate) fn expect(&mut self, want: &str) -> Result<String> {
        match self.lines.recv_timeout(WATCHDOG) {
            Ok(l) => match l.split_once(' ').unwrap_or((&l, "")) {
                (w, rest) if w == want => Ok(rest.to_owned()),
                _ => bail!("peer {} replied {l:?}, expected {want:?}", self.role),
            },
            Err(RecvTimeoutError::Timeout) => bail!("peer {}: no {want:?} within {WATCHDOG:?}", self.role),
            Err(RecvTimeoutError::Disconnected) => {
                let status = self.child.wait().map(|s| s.to_string()).unwrap_or_else(|e| e.to_string());
                bail!("peer {} exited ({status}) before replying {want:?}", self.role)
            }
        }
    }
}

impl Drop for Peer {
    fn drop(&mut self) {
        // EOF on its commands makes a healthy peer exit by itself (letting
        // iceoryx2 remove its node); anything still running after 2 s is
        // killed.
        drop(self.stdin.take());
        let until = Instant::now() + Duration::from_secs(2);
        while Instant::now() < until {
            if let Ok(Some(_)) = self.child.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(5));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A command from the parent: `VERB SIZE N MODE`.
#[derive(Debug, Clone)]
pub(crate) struct Cmd {
    /// `run` (round trips) or `tput` (one-way stream).
    pub(crate) verb: String,
    /// Payload bytes.
    pub(crate) size: usize,
    /// Round trips or descriptors.
    pub(crate) n: u64,
    /// System-specific variant.
    pub(crate) mode: String,
}

/// The child's side: inherited descriptors and the command pipe.
#[derive(Debug)]
pub(crate) struct PeerCtx {
    fds: Vec<Option<OwnedFd>>,
    cmds: Lines<StdinLock<'static>>,
    out: Stdout,
}

impl PeerCtx {
    /// Arms the parent-death signal and takes the inherited descriptors.
    pub(crate) fn from_env() -> Result<Self> {
        nix::sys::prctl::set_pdeathsig(nix::sys::signal::Signal::SIGKILL)?;
        let parent: u32 = std::env::var(PARENT_ENV)?.parse()?;
        // The parent may have died before the signal was armed.
        if std::os::unix::process::parent_id() != parent {
            bail!("parent {parent} is gone");
        }
        let list = std::env::var(FDS_ENV).unwrap_or_default();
        if let Ok(cpu) = std::env::var(CPU_ENV) {
            pin_to(cpu.parse()?)?;
        }
        let mut fds = Vec::new();
        for n in list.split(',').filter(|s| !s.is_empty()) {
            fds.push(Some(inherited_fd(n.parse()?)?));
        }
        Ok(Self { fds, cmds: std::io::stdin().lines(), out: std::io::stdout() })
    }

    /// Takes inherited descriptor number `i` (in the parent's order).
    pub(crate) fn fd(&mut self, i: usize) -> Result<OwnedFd> {
        self.fds.get_mut(i).and_then(Option::take).ok_or_else(|| anyhow!("no inherited descriptor #{i}"))
    }

    /// Sends one reply line to the parent (the control pipe is stdout).
    pub(crate) fn say(&mut self, line: &str) -> Result<()> {
        let mut out = self.out.lock();
        writeln!(out, "{line}")?;
        out.flush()?;
        Ok(())
    }

    /// The next command; `None` at end of input or on `quit`.
    pub(crate) fn next_cmd(&mut self) -> Result<Option<Cmd>> {
        let Some(line) = self.cmds.next() else { return Ok(None) };
        let line = line?;
        let w: Vec<&str> = line.split_whitespace().collect();
        match w.as_slice() {
            ["quit"] => Ok(None),
            [verb, size, n, mode] => {
                Ok(Some(Cmd { verb: (*verb).to_owned(), size: size.parse()?, n: n.parse()?, mode: (*mode).to_owned() }))
            }
            _ => bail!("bad command {line:?}"),
        }
    }
}

/// Takes ownership of descriptor `n`, inherited from the parent.
#[allow(unsafe_code)]
fn inherited_fd(n: RawFd) -> Result<OwnedFd> {
    // Only numbers that name an open descriptor of this process are taken.
    std::fs::read_link(format!("/proc/self/fd/{n}")).with_context(|| format!("inherited descriptor {n}"))?;
    // SAFETY: `n` is open (checked just above) and was not opened by this
    // process: the parent dup'ed it without FD_CLOEXEC right before the exec
    // and named it in DNE_BENCH_PEER_FDS, which `PeerCtx::from_env` reads once
    // at start-up, before this process opens anything, taking each number
    // once. So no other owner of the descriptor exists in this process.
    Ok(unsafe { OwnedFd::from_raw_fd(n) })
}

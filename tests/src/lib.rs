//! `dne-tests`: helpers for DNE's system tests, which start the real binaries
//! as real processes (and, when run as root, in their own network
//! namespaces).
//!
//! Contract:
//! * [`bin_path`] finds a workspace binary built by `cargo build --workspace`
//!   (the test command does this first; it also builds the C library that
//!   the C sample links) and fails loudly, naming that command, when it is
//!   missing;
//! * [`Proc`] owns a child process and kills it (SIGKILL) when dropped, so a
//!   failing test leaves no process behind;
//! * [`Proc::wait_timeout`] is the watchdog: a test never hangs, it fails
//!   with the process's output after the deadline. Deadlines bound hangs;
//!   they are never used as performance assertions;
//! * [`c::build`] builds a C or C++ program against the shim library with
//!   only `pkg-config dne-shim`, and gives the command that runs it.
#![forbid(unsafe_code)]

pub mod c;
pub mod cluster;

use std::io::{BufRead, Read};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::{Arc, Mutex, PoisonError, mpsc};
use std::time::{Duration, Instant};

/// Directory holding the workspace's binaries for the profile these tests
/// were built with (`target/debug` or `target/release`).
pub fn bin_dir() -> PathBuf {
    // Integration tests run from target/<profile>/deps/<name>-<hash>.
    let exe = std::env::current_exe().expect("current_exe");
    let deps = exe.parent().expect("test binary has a directory");
    deps.parent().expect("deps has a parent").to_path_buf()
}

/// Path of the workspace binary `name`; panics with the command to run when
/// it has not been built.
pub fn bin_path(name: &str) -> PathBuf {
    let p = bin_dir().join(name);
    assert!(
        p.is_file(),
        "{} not found: build the workspace binaries first (`cargo build --workspace`), \
         or run everything with `bash scripts/test.sh`",
        p.display()
    );
    p
}

/// A child process that is killed when dropped.
#[derive(Debug)]
pub struct Proc {
    name: String,
    child: Option<Child>,
    lines: Option<mpsc::Receiver<String>>,
    /// Threads reading stdout and stderr to their end, for a process
    /// started with [`Proc::spawn`]: read as it runs, so a full pipe never
    /// blocks it.
    drains: Option<[Drain; 2]>,
}

/// What a finished process left.
#[derive(Debug)]
pub struct Output {
    /// Exit status.
    pub status: ExitStatus,
    /// Everything written to stdout.
    pub stdout: String,
    /// Everything written to stderr.
    pub stderr: String,
}

impl Proc {
    /// Starts `cmd` with stdout and stderr captured (read while it runs,
    /// kept for [`Proc::wait_timeout`]).
    pub fn spawn(name: &str, mut cmd: Command) -> Self {
        let mut child = cmd
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start {name} ({cmd:?}): {e}"));
        let out = child.stdout.take().expect("piped stdout");
        let err = child.stderr.take().expect("piped stderr");
        let drains = [Drain::new(out), Drain::new(err)];
        Self { name: name.to_owned(), child: Some(child), lines: None, drains: Some(drains) }
    }

    /// Starts `cmd` with stdout and stderr appended to the file `log`
    /// (created when missing), so a chatty process never blocks on a full
    /// pipe and its output survives restarts for a failing test to show.
    pub fn spawn_logged(name: &str, mut cmd: Command, log: &Path) -> Self {
        let file = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(log)
            .unwrap_or_else(|e| panic!("cannot open {}: {e}", log.display()));
        let err = file.try_clone().expect("clone log file");
        let child = cmd
            .stdin(Stdio::null())
            .stdout(Stdio::from(file))
            .stderr(Stdio::from(err))
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start {name} ({cmd:?}): {e}"));
        Self { name: name.to_owned(), child: Some(child), lines: None, drains: None }
    }

    /// Starts `cmd` with stdout read line by line (see [`Proc::wait_line`])
    /// and stderr inherited (so its log shows in the test output).
    pub fn spawn_lines(name: &str, mut cmd: Command) -> Self {
        let mut child = cmd
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start {name} ({cmd:?}): {e}"));
        let out = child.stdout.take().expect("piped stdout");
        let (tx, rx) = mpsc::channel();
        std::thread::spawn(move || {
            for line in std::io::BufReader::new(out).lines().map_while(Result::ok) {
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
        Self { name: name.to_owned(), child: Some(child), lines: Some(rx), drains: None }
    }

    /// Waits for a stdout line starting with `prefix` (process started with
    /// [`Proc::spawn_lines`]); panics after `deadline` or if the process
    /// exits first.
    pub fn wait_line(&mut self, prefix: &str, deadline: Duration) -> String {
        let rx = self.lines.as_ref().expect("started with spawn_lines");
        let end = Instant::now() + deadline;
        loop {
            let left = end.saturating_duration_since(Instant::now());
            match rx.recv_timeout(left) {
                Ok(l) if l.starts_with(prefix) => return l,
                Ok(_) => {}
                Err(mpsc::RecvTimeoutError::Timeout) => panic!("{}: no line `{prefix}` within {deadline:?}", self.name),
                Err(mpsc::RecvTimeoutError::Disconnected) => panic!("{}: exited before printing `{prefix}`", self.name),
            }
        }
    }

    /// Sends SIGKILL and reaps the process.
    pub fn kill9(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// Sends SIGTERM (what `systemctl stop` sends) and reaps the process;
    /// panics (after killing it) when it has not exited after `deadline`.
    /// Returns its exit status.
    pub fn terminate(&mut self, deadline: Duration) -> ExitStatus {
        use nix::sys::signal::{Signal, kill};
        let mut child = self.child.take().expect("child present until reaped");
        let pid = nix::unistd::Pid::from_raw(i32::try_from(child.id()).expect("a pid fits an i32"));
        kill(pid, Signal::SIGTERM).expect("SIGTERM");
        let start = Instant::now();
        loop {
            match child.try_wait() {
                Ok(Some(status)) => return status,
                Ok(None) if start.elapsed() < deadline => std::thread::sleep(Duration::from_millis(5)),
                Ok(None) => {
                    let _ = child.kill();
                    let _ = child.wait();
                    panic!("{} still running {deadline:?} after SIGTERM; killed", self.name);
                }
                Err(e) => panic!("waiting for {}: {e}", self.name),
            }
        }
    }

    /// Whether the process is still running.
    pub fn is_running(&mut self) -> bool {
        self.child.as_mut().is_some_and(|c| matches!(c.try_wait(), Ok(None)))
    }

    /// Process id.
    pub fn pid(&self) -> u32 {
        self.child.as_ref().map_or(0, Child::id)
    }

    /// Waits for the process to exit; panics (after killing it) when it is
    /// still running after `deadline`. Its output is waited for until then
    /// too (see `Drain`).
    pub fn wait_timeout(mut self, deadline: Duration) -> Output {
        let start = Instant::now();
        let mut child = self.child.take().expect("child present until waited");
        loop {
            match child.try_wait() {
                Ok(Some(status)) => {
                    let until = (start + deadline).max(Instant::now() + DRAIN_GRACE);
                    return collect(status, self.drains.take(), until);
                }
                Ok(None) if start.elapsed() < deadline => std::thread::sleep(Duration::from_millis(5)),
                Ok(None) => {
                    let _ = child.kill();
                    let status = child.wait().expect("wait after kill");
                    let out = collect(status, self.drains.take(), Instant::now() + DRAIN_GRACE);
                    panic!("{} still running after {deadline:?}; killed. output: {out:#?}", self.name);
                }
                Err(e) => panic!("waiting for {}: {e}", self.name),
            }
        }
    }
}

/// Longest the output of a process killed by the watchdog is waited for
/// (and of one that exited, at least): its pipes close when it exits,
/// unless a child it left holds them (see [`Drain`]).
const DRAIN_GRACE: Duration = Duration::from_secs(2);

/// A thread reading a pipe to its end, and what it has read so far.
///
/// A process that exited or was killed may have left a child with the
/// same stdout and stderr (a compiler driver's `cc1`, a shell's background
/// job): the pipes stay open as long as that child runs, so waiting for
/// their end is bounded (by the watchdog's deadline, or [`DRAIN_GRACE`]
/// after it) and the output is what was read by then.
#[derive(Debug)]
struct Drain {
    bytes: Arc<Mutex<Vec<u8>>>,
    /// Disconnected when the thread has read the pipe's end.
    done: mpsc::Receiver<()>,
}

impl Drain {
    fn new(mut pipe: impl Read + Send + 'static) -> Self {
        let bytes = Arc::new(Mutex::new(Vec::new()));
        let (tx, done) = mpsc::channel::<()>();
        let into = bytes.clone();
        std::thread::spawn(move || {
            let _tx = tx;
            let mut buf = [0u8; 8192];
            loop {
                match pipe.read(&mut buf) {
                    Ok(0) => break,
                    Ok(n) => into.lock().unwrap_or_else(PoisonError::into_inner).extend_from_slice(&buf[..n]),
                    Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                    Err(_) => break,
                }
            }
        });
        Self { bytes, done }
    }

    /// What was read by the pipe's end, or by `until` if it is still open.
    fn take(self, until: Instant) -> String {
        let _ = self.done.recv_timeout(until.saturating_duration_since(Instant::now()));
        let bytes = std::mem::take(&mut *self.bytes.lock().unwrap_or_else(PoisonError::into_inner));
        String::from_utf8_lossy(&bytes).into_owned()
    }
}

/// The output of an exited process: what its [`Drain`]s read by the
/// pipes' end or by `until` (nothing for a process whose output was not
/// captured).
fn collect(status: ExitStatus, drains: Option<[Drain; 2]>, until: Instant) -> Output {
    let [stdout, stderr] = drains.map_or([String::new(), String::new()], |d| d.map(|d| d.take(until)));
    Output { status, stdout, stderr }
}

impl Drop for Proc {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// A POST request envelope carrying `body`, as the ingress writes it (head
/// room for the reply's head in front).
pub fn request_envelope(body: &[u8]) -> Vec<u8> {
    use wire::http::{HeadSpec, Method, REPLY_HEAD_ROOM, Start, encode_head};
    let spec = HeadSpec { start: Start::Request { method: Method::Post, path: b"/x" }, headers: &[] };
    let head = spec.len().expect("a valid head");
    let pad = REPLY_HEAD_ROOM.saturating_sub(head);
    let mut frags = vec![vec![0u8; (head + pad) as usize + body.len()]];
    let off = encode_head(&mut frags, &spec, pad, body.len() as u32).expect("room for the head");
    frags[0][off as usize..].copy_from_slice(body);
    frags.pop().expect("one fragment")
}

/// Polls `cond` every few milliseconds until it holds; panics with `what`
/// after `deadline` (a watchdog against hangs, not a timing assertion).
pub fn wait_for(what: &str, deadline: Duration, mut cond: impl FnMut() -> bool) {
    let end = Instant::now() + deadline;
    while !cond() {
        assert!(Instant::now() < end, "timed out after {deadline:?} waiting for {what}");
        std::thread::sleep(Duration::from_millis(2));
    }
}

/// Stops process `pid` with SIGSTOP and returns once every one of its
/// threads is stopped. `kill` returns as soon as the signal is pending: a
/// thread running meanwhile goes on until it next enters the kernel, so a
/// test that stops a peer and then sends to it could otherwise be answered
/// by the peer it believes stopped (seen under a CPU hog).
pub fn stop_process(pid: u32) {
    use nix::sys::signal::{Signal, kill};
    kill(nix::unistd::Pid::from_raw(pid as i32), Signal::SIGSTOP).expect("SIGSTOP");
    wait_for(&format!("every thread of pid {pid} stopped"), Duration::from_secs(60), || all_stopped(pid));
}

/// Whether every thread of `pid` is stopped (state `T` or `t` in its
/// `/proc` stat line; the state follows the command name's closing
/// parenthesis, and the name may hold any byte).
fn all_stopped(pid: u32) -> bool {
    let Ok(tasks) = std::fs::read_dir(format!("/proc/{pid}/task")) else { return false };
    let mut any = false;
    for t in tasks.flatten() {
        let Ok(stat) = std::fs::read_to_string(t.path().join("stat")) else { continue };
        let state = stat.rfind(')').and_then(|i| stat[i + 1..].split_whitespace().next());
        if !matches!(state, Some("T" | "t")) {
            return false;
        }
        any = true;
    }
    any
}

/// A scratch directory removed (with everything in it) when dropped.
#[derive(Debug)]
pub struct TempDir(PathBuf);

impl TempDir {
    /// Creates `$TMPDIR/dne-<name>-<pid>-<n>`.
    pub fn new(name: &str) -> Self {
        static N: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
        let n = N.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let p = std::env::temp_dir().join(format!("dne-{name}-{}-{n}", std::process::id()));
        let _ = std::fs::remove_dir_all(&p);
        std::fs::create_dir_all(&p).expect("create temp dir");
        Self(p)
    }

    /// The directory.
    pub fn path(&self) -> &Path {
        &self.0
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// A loopback address with a port nobody listens on right now, below the
/// kernel's ephemeral range (32768 and up on Linux), so that no outgoing
/// connection (the emulated fabric makes many) can take it between now and
/// the moment a test's process binds it; distinct within this process, and
/// spread by process id across test binaries.
pub fn free_port() -> std::net::SocketAddr {
    use std::sync::atomic::{AtomicU32, Ordering};
    const BASE: u32 = 20_000;
    const SPAN: u32 = 12_000;
    static NEXT: AtomicU32 = AtomicU32::new(0);
    let start = std::process::id().wrapping_mul(7919);
    for _ in 0..SPAN {
        let port = BASE + start.wrapping_add(NEXT.fetch_add(1, Ordering::Relaxed)) % SPAN;
        if let Ok(l) = std::net::TcpListener::bind(("127.0.0.1", port as u16)) {
            return l.local_addr().expect("local address");
        }
    }
    panic!("no free loopback port in {BASE}..{}", BASE + SPAN)
}

/// `GET path` over HTTP/1.0; the status code and the body, or `None` when
/// nothing answers.
pub fn http_get(addr: std::net::SocketAddr, path: &str) -> Option<(u16, String)> {
    use std::io::Write;
    let mut s = std::net::TcpStream::connect_timeout(&addr, Duration::from_secs(2)).ok()?;
    s.set_read_timeout(Some(Duration::from_secs(5))).ok()?;
    write!(s, "GET {path} HTTP/1.0\r\nHost: x\r\n\r\n").ok()?;
    let mut out = String::new();
    s.read_to_string(&mut out).ok()?;
    let code = out.split_whitespace().nth(1)?.parse().ok()?;
    let body = out.split_once("\r\n\r\n").map(|(_, b)| b.to_owned()).unwrap_or_default();
    Some((code, body))
}

/// `POST path` with `body` over HTTP/1.1 (`Connection: close`); the status
/// code and the body, or `None` when nothing answers.
pub fn http_post(addr: std::net::SocketAddr, path: &str, body: &[u8]) -> Option<(u16, Vec<u8>)> {
    http_post_full(addr, path, body).map(|(code, _, body)| (code, body))
}

/// `POST path` with `body` on a new connection: (status, response head,
/// body); `None` if the connection failed.
pub fn http_post_full(addr: std::net::SocketAddr, path: &str, body: &[u8]) -> Option<(u16, String, Vec<u8>)> {
    use std::io::Write;
    let mut s = std::net::TcpStream::connect_timeout(&addr, Duration::from_secs(2)).ok()?;
    s.set_read_timeout(Some(Duration::from_secs(30))).ok()?;
    write!(s, "POST {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\nContent-Length: {}\r\n\r\n", body.len()).ok()?;
    s.write_all(body).ok()?;
    let mut out = Vec::new();
    s.read_to_end(&mut out).ok()?;
    let head_end = out.windows(4).position(|w| w == b"\r\n\r\n")?;
    let head = String::from_utf8_lossy(&out[..head_end]).to_string();
    let code = head.split_whitespace().nth(1)?.parse().ok()?;
    let mut rest = out[head_end + 4..].to_vec();
    if head.to_ascii_lowercase().contains("transfer-encoding: chunked") {
        rest = dechunk(&rest)?;
    }
    Some((code, head, rest))
}

fn dechunk(mut b: &[u8]) -> Option<Vec<u8>> {
    let mut out = Vec::new();
    loop {
        let eol = b.windows(2).position(|w| w == b"\r\n")?;
        let size = usize::from_str_radix(std::str::from_utf8(&b[..eol]).ok()?.split(';').next()?.trim(), 16).ok()?;
        b = &b[eol + 2..];
        if size == 0 {
            return Some(out);
        }
        out.extend_from_slice(b.get(..size)?);
        b = b.get(size + 2..)?;
    }
}

/// Runs `cmd` to completion under a watchdog.
pub fn run(name: &str, cmd: Command, deadline: Duration) -> Output {
    Proc::spawn(name, cmd).wait_timeout(deadline)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn watchdog_kills_a_hung_process() {
        let mut cmd = Command::new("sleep");
        cmd.arg("30");
        let r =
            std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| run("sleep", cmd, Duration::from_millis(100))));
        let msg = *r.unwrap_err().downcast::<String>().unwrap();
        assert!(msg.contains("still running"), "{msg}");
    }

    #[test]
    fn output_is_captured() {
        let mut cmd = Command::new("sh");
        cmd.args(["-c", "echo out; echo err >&2; exit 3"]);
        let out = run("sh", cmd, Duration::from_secs(10));
        assert_eq!(out.status.code(), Some(3));
        assert_eq!(out.stdout, "out\n");
        assert_eq!(out.stderr, "err\n");
    }

    /// Output beyond a pipe's buffer (64 KiB on Linux) is read while the
    /// process runs: a process blocked writing to a full pipe never exits,
    /// so reading only after it has exited would hold it to the watchdog.
    #[test]
    fn output_larger_than_a_pipe_is_captured() {
        let mut cmd = Command::new("sh");
        cmd.args(["-c", "head -c 300000 /dev/zero; head -c 200000 /dev/zero >&2"]);
        let out = run("sh", cmd, Duration::from_secs(10));
        assert!(out.status.success(), "{:?}", out.status);
        assert_eq!((out.stdout.len(), out.stderr.len()), (300_000, 200_000));
    }

    /// The watchdog holds even when the process left a child of its own
    /// with its stdout and stderr (a compiler driver's `cc1`, a shell's
    /// background job): killing the process does not close its pipes, so
    /// waiting for their end would wait for that child. The output read so
    /// far is in the panic message.
    #[test]
    fn the_watchdog_holds_when_a_child_of_the_process_keeps_its_output_open() {
        let dir = TempDir::new("proc-grandchild");
        let pidfile = dir.path().join("pid");
        let mut cmd = Command::new("sh");
        let script = format!("sleep 60 & echo $! > {}; echo started; exec sleep 60", pidfile.display());
        cmd.args(["-c", &script]);
        let (tx, rx) = mpsc::channel();
        std::thread::spawn(move || {
            let r =
                std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| run("sh", cmd, Duration::from_millis(500))));
            let _ = tx.send(r.map_err(|e| e.downcast::<String>().map(|m| *m).unwrap_or_default()));
        });
        let got = rx.recv_timeout(Duration::from_secs(20));
        // The background `sleep 60` is the test's to end, whatever happened.
        if let Ok(pid) = std::fs::read_to_string(&pidfile) {
            let pid = nix::unistd::Pid::from_raw(pid.trim().parse().unwrap());
            let _ = nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGKILL);
        }
        let Ok(Err(msg)) = got else { panic!("the watchdog did not fire within 20 s: {got:?}") };
        assert!(msg.contains("still running") && msg.contains("started"), "{msg}");
    }

    #[test]
    fn drop_kills_the_child() {
        let mut cmd = Command::new("sleep");
        cmd.arg("30");
        let p = Proc::spawn("sleep", cmd);
        let pid = nix::unistd::Pid::from_raw(p.pid() as i32);
        drop(p);
        // Killed and reaped: signalling the pid now fails.
        assert!(nix::sys::signal::kill(pid, None).is_err());
    }
}

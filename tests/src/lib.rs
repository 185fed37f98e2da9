//! `dne-tests`: helpers for DNE's system tests, which start the real binaries
//! as real processes (and, when run as root, in their own network
//! namespaces).
//!
//! Contract:
//! * [`bin_path`] finds a workspace binary built by `cargo build --workspace
//!   --bins` (the test command does this first) and fails loudly, naming that
//!   command, when it is missing;
//! * [`Proc`] owns a child process and kills it (SIGKILL) when dropped, so a
//!   failing test leaves no process behind;
//! * [`Proc::wait_timeout`] is the watchdog: a test never hangs, it fails
//!   with the process's output after the deadline. Deadlines bound hangs;
//!   they are never used as performance assertions.
#![forbid(unsafe_code)]

use std::io::Read;
use std::path::PathBuf;
use std::process::{Child, Command, ExitStatus, Stdio};
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
        "{} not found: build the workspace binaries first (`cargo build --workspace --bins`), \
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
    /// Starts `cmd` with stdout and stderr captured.
    pub fn spawn(name: &str, mut cmd: Command) -> Self {
        let child = cmd
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start {name} ({cmd:?}): {e}"));
        Self { name: name.to_owned(), child: Some(child) }
    }

    /// Process id.
    pub fn pid(&self) -> u32 {
        self.child.as_ref().map_or(0, Child::id)
    }

    /// Waits for the process to exit; panics (after killing it) when it is
    /// still running after `deadline`.
    pub fn wait_timeout(mut self, deadline: Duration) -> Output {
        let start = Instant::now();
        let mut child = self.child.take().expect("child present until waited");
        loop {
            match child.try_wait() {
                Ok(Some(status)) => return collect(child, status),
                Ok(None) if start.elapsed() < deadline => std::thread::sleep(Duration::from_millis(5)),
                Ok(None) => {
                    let _ = child.kill();
                    let status = child.wait().expect("wait after kill");
                    let out = collect(child, status);
                    panic!("{} still running after {deadline:?}; killed. output: {out:#?}", self.name);
                }
                Err(e) => panic!("waiting for {}: {e}", self.name),
            }
        }
    }
}

fn collect(mut child: Child, status: ExitStatus) -> Output {
    let mut stdout = String::new();
    let mut stderr = String::new();
    if let Some(mut s) = child.stdout.take() {
        let _ = s.read_to_string(&mut stdout);
    }
    if let Some(mut s) = child.stderr.take() {
        let _ = s.read_to_string(&mut stderr);
    }
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

//! host-shimd learns who connects from the kernel (`SO_PEERCRED`). Its own
//! binary: the test runs itself again in a pid namespace of its own, and
//! a process started while another test of the same binary holds a
//! listener's lock would hold it too until its `exec`.
#![allow(clippy::print_stdout)] // the child's answer and the skip notice

use host_shim::sock::{Conn, Listener};
use std::path::Path;

/// Set when this test binary runs again inside a pid namespace of its
/// own (see the test below): the socket path to listen on.
const PEERCRED_ENV: &str = "DNE_TEST_PEERCRED_LISTEN";

/// A peer that the listener's pid namespace cannot see (host-shimd in a
/// container, a function on the host) has pid 0 in its credentials:
/// the connection is taken, with its uid, and the pid reads as 0; its
/// pidfd can still be taken (host-shimd watches and kills a function
/// it drops through it). The
/// listener runs in a new pid namespace (`unshare --pid --fork`, root
/// only); without root the test says so and returns.
#[test]
fn a_peer_outside_the_listeners_pid_namespace_is_accepted_with_pid_0() {
    if let Some(path) = std::env::var_os(PEERCRED_ENV) {
        let l = Listener::bind(Path::new(&path)).unwrap();
        println!("listening");
        let conn = loop {
            if let Some(c) = l.accept().unwrap() {
                break c;
            }
            std::thread::sleep(std::time::Duration::from_millis(5));
        };
        match conn.peer_cred() {
            Ok(c) => println!("PEER pid={} uid={} pidfd={}", c.pid, c.uid, conn.peer_pidfd().is_ok()),
            Err(e) => println!("PEER error {e}"),
        }
        return;
    }
    if !rustix::process::geteuid().is_root() {
        println!("skipped: needs root (a pid namespace)");
        return;
    }
    use std::io::{BufRead, BufReader};
    let dir = std::env::temp_dir().join(format!("dne-sock-ns-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("s.sock");
    let mut child = std::process::Command::new("unshare")
        .args(["--pid", "--fork", "--kill-child", "--"])
        .arg(std::env::current_exe().unwrap())
        .args(["--exact", "a_peer_outside_the_listeners_pid_namespace_is_accepted_with_pid_0"])
        .args(["--nocapture", "--test-threads", "1"])
        .env(PEERCRED_ENV, &path)
        .stdout(std::process::Stdio::piped())
        .spawn()
        .expect("unshare (util-linux) runs");
    let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
    let mut next = |want: &str| loop {
        let l = lines.next().expect("the child answers").unwrap();
        if let Some(at) = l.find(want) {
            break l[at..].to_owned();
        }
    };
    next("listening");
    let _c = Conn::connect(&path).unwrap();
    let peer = next("PEER ");
    assert!(child.wait().unwrap().success());
    std::fs::remove_dir_all(&dir).unwrap();
    let uid = rustix::process::getuid().as_raw();
    // `SO_PEERPIDFD` (Linux 6.5) names the peer whatever its namespace;
    // before it, nothing can.
    let release = std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap();
    let mut v = release.trim().split(['.', '-']).map(|n| n.parse::<u32>().unwrap_or(0));
    let pidfd = (v.next().unwrap_or(0), v.next().unwrap_or(0)) >= (6, 5);
    assert_eq!(peer, format!("PEER pid=0 uid={uid} pidfd={pidfd}"));
}

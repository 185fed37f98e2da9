//! The README's demo command, run as a user runs it: the `dpu-agent`
//! binary's `demo` subcommand (two worker nodes, an ingress and three
//! tenants as child processes, HTTP load, every reply checked byte for
//! byte), in both worker-node modes. It must succeed with no failed
//! request, and leave nothing behind: no child process, no network
//! namespace (as root the agents get namespaces of their own), no
//! directory.
//!
//! The same holds when the demo is interrupted while it starts (Ctrl-C),
//! and its children stop when it is killed outright.
//!
//! The tests take turns (a lock): as root, the demo's namespaces use fixed
//! addresses, so two demos cannot run at once (a second is refused).
//! Every wait has a watchdog; nothing asserts on time.

#![allow(clippy::print_stderr)] // the skip notice of the root-only tests

use dne_tests::cluster::is_root;
use dne_tests::{Proc, bin_path, wait_for};
use std::process::Command;
use std::time::Duration;

/// Start-up, two seconds of load and the stop, with a wide margin for a
/// debug build on a loaded machine.
const WATCHDOG: Duration = Duration::from_secs(180);

/// One demo at a time (see the module docs).
static ONE_DEMO: std::sync::Mutex<()> = std::sync::Mutex::new(());

#[test]
fn the_readme_demo_answers_every_request_and_leaves_nothing_behind() {
    let _one = ONE_DEMO.lock().unwrap_or_else(|e| e.into_inner());
    for mode in ["emulated", "dpu"] {
        let mut cmd = Command::new(bin_path("dpu-agent"));
        cmd.args(["demo", "--duration", "2", "--port", "0", "--mode", mode]);
        let demo = Proc::spawn("dpu-agent demo", cmd);
        let pid = demo.pid();
        let out = demo.wait_timeout(WATCHDOG);
        let all = format!("{mode} mode, exit {}\nstdout:\n{}\nstderr:\n{}", out.status, out.stdout, out.stderr);
        assert!(out.status.success(), "{all}");
        assert!(out.stdout.contains("every route answers correctly"), "{all}");
        let result = out.stdout.lines().find(|l| l.starts_with("RESULT ")).unwrap_or_else(|| panic!("{all}"));
        let field = |k: &str| -> u64 {
            let v = result.split_whitespace().find_map(|w| w.strip_prefix(&format!("{k}=")));
            v.and_then(|v| v.parse().ok()).unwrap_or_else(|| panic!("no {k} in {result}\n{all}"))
        };
        assert!(field("requests") > 0, "{all}");
        assert_eq!(field("errors"), 0, "{all}");

        nothing_left(pid, &all);
    }
}

/// The processes (pid, command line) whose command line names the demo
/// `pid`'s directory (every child's does: the cluster file is in it).
fn children_of(pid: u32) -> Vec<(i32, String)> {
    let dir = std::env::temp_dir().join(format!("dne-demo-{pid}"));
    std::fs::read_dir("/proc")
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|e| {
            let child = e.file_name().to_str()?.parse::<i32>().ok()?;
            let c = std::fs::read(e.path().join("cmdline")).ok()?;
            Some((child, String::from_utf8_lossy(&c).replace('\0', " ")))
        })
        .filter(|(_, c)| c.contains(&dir.display().to_string()))
        .collect()
}

/// Nothing of demo `pid` is left: no directory, no child process, no
/// network namespace.
fn nothing_left(pid: u32, all: &str) {
    let dir = std::env::temp_dir().join(format!("dne-demo-{pid}"));
    assert!(!dir.exists(), "{} is still there\n{all}", dir.display());
    let left = children_of(pid);
    assert!(left.is_empty(), "child processes still running: {left:?}\n{all}");
    if is_root() {
        let list = Command::new("ip").args(["netns", "list"]).output().expect("ip netns list");
        let list = String::from_utf8_lossy(&list.stdout);
        let ours = format!("dne-demo{}-", pid % 100_000);
        assert!(!list.contains(&ours), "network namespaces left: {list}\n{all}");
    }
}

/// Waits (watchdog) until `demo` has started `n` children, and gives it
/// back; fails at once, with the demo's output, if it ends first.
fn wait_children(mut demo: Proc, n: usize) -> Proc {
    let pid = demo.pid();
    let end = std::time::Instant::now() + WATCHDOG;
    while children_of(pid).len() < n {
        if !demo.is_running() {
            let out = demo.wait_timeout(WATCHDOG);
            panic!(
                "the demo ended before it started {n} children: exit {}\nstdout:\n{}\nstderr:\n{}",
                out.status, out.stdout, out.stderr
            );
        }
        assert!(std::time::Instant::now() < end, "timed out after {WATCHDOG:?} waiting for the demo's children");
        std::thread::sleep(Duration::from_millis(2));
    }
    demo
}

/// Ctrl-C while the demo starts its cluster stops and removes everything.
/// Before, the demo listened for Ctrl-C only once the cluster answered:
/// it died of the signal and left its children (in process groups of
/// their own, out of the terminal's reach), namespaces and directory.
#[test]
fn a_demo_interrupted_while_it_starts_leaves_nothing_behind() {
    let _one = ONE_DEMO.lock().unwrap_or_else(|e| e.into_inner());
    let mut cmd = Command::new(bin_path("dpu-agent"));
    cmd.args(["demo", "--duration", "30", "--port", "0"]);
    let demo = Proc::spawn("dpu-agent demo", cmd);
    let pid = demo.pid();
    let demo = wait_children(demo, 3);
    nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid as i32), nix::sys::signal::SIGINT).expect("SIGINT");
    let out = demo.wait_timeout(WATCHDOG);
    let all = format!("exit {}\nstdout:\n{}\nstderr:\n{}", out.status, out.stdout, out.stderr);
    assert!(!out.status.success(), "an interrupted demo does not report success\n{all}");
    assert!(out.stderr.contains("interrupted"), "{all}");
    nothing_left(pid, &all);
}

/// A demo killed outright (SIGKILL: no clean-up of its own) takes its
/// children with it: each is asked to stop (SIGTERM) when it dies.
#[test]
fn the_children_of_a_killed_demo_stop() {
    let _one = ONE_DEMO.lock().unwrap_or_else(|e| e.into_inner());
    let mut cmd = Command::new(bin_path("dpu-agent"));
    cmd.args(["demo", "--duration", "30", "--port", "0", "--no-netns"]);
    let demo = Proc::spawn("dpu-agent demo", cmd);
    let pid = demo.pid();
    let demo = wait_children(demo, 3);
    nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid as i32), nix::sys::signal::SIGKILL).expect("SIGKILL");
    demo.wait_timeout(WATCHDOG);
    wait_for("the killed demo's children stopped", WATCHDOG, || children_of(pid).is_empty());
    let _ = std::fs::remove_dir_all(std::env::temp_dir().join(format!("dne-demo-{pid}")));
}

/// Under `nohup` (SIGHUP ignored) a hang-up does not stop the demo; SIGTERM
/// still does, leaving nothing behind.
#[test]
fn a_demo_under_nohup_outlives_a_hangup() {
    let _one = ONE_DEMO.lock().unwrap_or_else(|e| e.into_inner());
    let mut cmd = Command::new("nohup");
    cmd.arg(bin_path("dpu-agent")).args(["demo", "--serve", "--port", "0", "--no-netns"]);
    let demo = Proc::spawn("nohup dpu-agent demo", cmd);
    let pid = demo.pid();
    let demo = wait_children(demo, 3);
    let signal = |s| nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid as i32), s).expect("signal");
    signal(nix::sys::signal::SIGHUP);
    // A demo that stops on it is gone well within 2 s (its children stop
    // at once); a live one is checked for that long.
    let running = || !std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default().contains(") Z ");
    let start = std::time::Instant::now();
    let mut alive = true;
    while alive && start.elapsed() < Duration::from_secs(2) {
        alive = running();
        std::thread::sleep(Duration::from_millis(20));
    }
    signal(nix::sys::signal::SIGTERM);
    let out = demo.wait_timeout(WATCHDOG);
    let all = format!("exit {}\nstdout:\n{}\nstderr:\n{}", out.status, out.stdout, out.stderr);
    assert!(alive, "SIGHUP stopped a demo started under nohup\n{all}");
    nothing_left(pid, &all);
}

/// A process of the cluster that dies ends the demo's load at once, and
/// the demo fails. Before, the load ran on to its end (here 10 minutes,
/// far beyond the watchdog) against the broken cluster.
#[test]
fn a_demo_whose_agent_dies_stops_at_once() {
    let _one = ONE_DEMO.lock().unwrap_or_else(|e| e.into_inner());
    let mut cmd = Command::new(bin_path("dpu-agent"));
    cmd.args(["demo", "--duration", "600", "--port", "0", "--no-netns"]);
    let mut demo = Proc::spawn_lines("dpu-agent demo", cmd);
    let pid = demo.pid();
    // The first line of the load (one per second).
    demo.wait_line("     1s", WATCHDOG);
    let (agent, _) = children_of(pid)
        .into_iter()
        .find(|(_, c)| c.contains(" run ") && c.contains("--node n1"))
        .expect("agent n1 of the demo");
    nix::sys::signal::kill(nix::unistd::Pid::from_raw(agent), nix::sys::signal::SIGKILL).expect("SIGKILL");
    let out = demo.wait_timeout(WATCHDOG);
    assert!(!out.status.success(), "a demo whose agent died reported success");
    nothing_left(pid, &format!("exit {}", out.status));
}

/// The demo's network namespaces (as root), by name.
fn demo_namespaces() -> Vec<String> {
    let list = Command::new("ip").args(["netns", "list"]).output().expect("ip netns list");
    String::from_utf8_lossy(&list.stdout)
        .lines()
        .filter_map(|l| l.split_whitespace().next())
        .filter(|n| n.starts_with("dne-demo"))
        .map(str::to_owned)
        .collect()
}

fn ip_forward() -> String {
    std::fs::read_to_string("/proc/sys/net/ipv4/ip_forward").expect("ip_forward").trim().to_owned()
}

/// As root, a second demo with network namespaces is refused while one
/// runs, naming it (their namespaces have the same addresses). Before,
/// the second one started and failed on an address in use, or broke the
/// routes of the first.
#[test]
fn a_second_demo_is_refused_while_one_has_the_namespaces() {
    if !is_root() {
        eprintln!("skipped: network namespaces need root");
        return;
    }
    let _one = ONE_DEMO.lock().unwrap_or_else(|e| e.into_inner());
    let mut cmd = Command::new(bin_path("dpu-agent"));
    cmd.args(["demo", "--serve", "--port", "0"]);
    let first = Proc::spawn("dpu-agent demo (first)", cmd);
    let pid = first.pid();
    // Its children start once its namespaces exist.
    let first = wait_children(first, 3);
    let mut cmd = Command::new(bin_path("dpu-agent"));
    cmd.args(["demo", "--duration", "2", "--port", "0"]);
    let second = Proc::spawn("dpu-agent demo (second)", cmd);
    let second_pid = second.pid();
    let out2 = second.wait_timeout(WATCHDOG);
    nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid as i32), nix::sys::signal::SIGTERM).expect("SIGTERM");
    let out = first.wait_timeout(WATCHDOG);
    let all = format!(
        "second: exit {}\nstdout:\n{}\nstderr:\n{}\nfirst: exit {}\nstderr:\n{}",
        out2.status, out2.stdout, out2.stderr, out.status, out.stderr
    );
    assert!(!out2.status.success(), "{all}");
    assert!(out2.stderr.contains(&format!("another demo (pid {pid})")), "{all}");
    assert!(out2.stderr.contains("--no-netns"), "{all}");
    nothing_left(pid, &all);
    nothing_left(second_pid, &all);
}

/// As root, the namespaces of a demo killed outright (SIGKILL: no clean-up
/// of its own) are removed by the next demo, which also puts `ip_forward`
/// back as the killed one found it. Before, they stayed, with the
/// addresses the next demo's namespaces take, and `ip_forward` stayed 1.
#[test]
fn the_next_demo_removes_what_a_killed_demo_left() {
    if !is_root() {
        eprintln!("skipped: network namespaces need root");
        return;
    }
    let _one = ONE_DEMO.lock().unwrap_or_else(|e| e.into_inner());
    let forward = ip_forward();
    let mut cmd = Command::new(bin_path("dpu-agent"));
    cmd.args(["demo", "--duration", "30", "--port", "0"]);
    let killed = Proc::spawn("dpu-agent demo (killed)", cmd);
    let pid = killed.pid();
    let killed = wait_children(killed, 3);
    nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid as i32), nix::sys::signal::SIGKILL).expect("SIGKILL");
    killed.wait_timeout(WATCHDOG);
    wait_for("the killed demo's children stopped", WATCHDOG, || children_of(pid).is_empty());
    let _ = std::fs::remove_dir_all(std::env::temp_dir().join(format!("dne-demo-{pid}")));
    let left = demo_namespaces();
    assert!(left.iter().any(|n| n.starts_with(&format!("dne-demo{}-", pid % 100_000))), "{left:?}");
    assert_eq!(ip_forward(), "1", "the killed demo had set ip_forward");

    let mut cmd = Command::new(bin_path("dpu-agent"));
    cmd.args(["demo", "--duration", "2", "--port", "0"]);
    let next = Proc::spawn("dpu-agent demo (next)", cmd);
    let next_pid = next.pid();
    let out = next.wait_timeout(WATCHDOG);
    let all = format!("exit {}\nstdout:\n{}\nstderr:\n{}", out.status, out.stdout, out.stderr);
    assert!(out.status.success(), "{all}");
    assert!(out.stderr.contains("removing network namespaces left by a demo that was killed"), "{all}");
    nothing_left(next_pid, &all);
    assert_eq!(demo_namespaces(), Vec::<String>::new(), "{all}");
    assert_eq!(ip_forward(), forward, "ip_forward as before the killed demo\n{all}");
}

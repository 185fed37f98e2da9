//! The README's demo command, run as a user runs it: the `dpu-agent`
//! binary's `demo` subcommand (two worker nodes, an ingress and three
//! tenants as child processes, HTTP load, every reply checked byte for
//! byte), in both worker-node modes. It must succeed with no failed
//! request, and leave nothing behind: no child process, no network
//! namespace (as root the agents get namespaces of their own), no
//! directory.
//!
//! One test runs both modes one after the other: as root, the demo's
//! namespaces use fixed addresses, so two demos cannot run at once.
//! Every wait has a watchdog; nothing asserts on time.

use dne_tests::cluster::is_root;
use dne_tests::{Proc, bin_path};
use std::process::Command;
use std::time::Duration;

/// Start-up, two seconds of load and the stop, with a wide margin for a
/// debug build on a loaded machine.
const WATCHDOG: Duration = Duration::from_secs(180);

#[test]
fn the_readme_demo_answers_every_request_and_leaves_nothing_behind() {
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

        // Nothing left: the demo's directory names every child's command
        // line (the cluster file is in it) and every child's runtime files.
        let dir = std::env::temp_dir().join(format!("dne-demo-{pid}"));
        assert!(!dir.exists(), "{} is still there\n{all}", dir.display());
        let left: Vec<String> = std::fs::read_dir("/proc")
            .into_iter()
            .flatten()
            .flatten()
            .filter_map(|e| std::fs::read(e.path().join("cmdline")).ok())
            .map(|c| String::from_utf8_lossy(&c).replace('\0', " "))
            .filter(|c| c.contains(&dir.display().to_string()))
            .collect();
        assert!(left.is_empty(), "child processes still running: {left:?}\n{all}");
        if is_root() {
            let list = Command::new("ip").args(["netns", "list"]).output().expect("ip netns list");
            let list = String::from_utf8_lossy(&list.stdout);
            let ours = format!("dne-demo{}-", pid % 100_000);
            assert!(!list.contains(&ours), "network namespaces left: {list}\n{all}");
        }
    }
}

//! The wire layouts, as the real `dpu-agent` binaries print them, agree with
//! the library and across architectures.

use dne_tests::{bin_path, run};
use std::process::Command;
use std::time::Duration;

const DEADLINE: Duration = Duration::from_secs(120);

fn expected() -> String {
    let mut s = String::new();
    wire::layout::write_layout_table(&mut s).unwrap();
    s
}

/// The table without the first line, which names the build.
fn table(out: &str) -> String {
    out.lines().filter(|l| !l.starts_with('#')).map(|l| format!("{l}\n")).collect()
}

#[test]
fn agent_prints_the_library_layout() {
    let mut cmd = Command::new(bin_path("dpu-agent"));
    cmd.arg("layout");
    let out = run("dpu-agent layout", cmd, DEADLINE);
    assert!(out.status.success(), "{out:?}");
    assert_eq!(table(&out.stdout), expected());
}

#[test]
fn agent_version_names_the_target() {
    let mut cmd = Command::new(bin_path("dpu-agent"));
    cmd.arg("--version");
    let out = run("dpu-agent --version", cmd, DEADLINE);
    assert!(out.status.success(), "{out:?}");
    assert!(out.stdout.starts_with("dpu-agent "), "{}", out.stdout);
    assert!(out.stdout.contains(std::env::consts::ARCH), "{}", out.stdout);
}

/// The aarch64 agent (built by `cross/build-aarch64.sh`, run under
/// qemu-aarch64) must print exactly the layouts of this x86_64 build, or the
/// DPU and the host would misread each other's memory.
#[test]
#[ignore = "needs the aarch64 build and qemu-aarch64: run by scripts/test.sh with DNE_AARCH64_AGENT set"]
fn aarch64_agent_agrees_with_the_host_layout() {
    let agent = std::env::var("DNE_AARCH64_AGENT")
        .expect("set DNE_AARCH64_AGENT to the aarch64 dpu-agent binary (scripts/test.sh does)");
    let mut cmd = Command::new("qemu-aarch64");
    cmd.args(["-L", "/", &agent, "layout"]);
    let out = run("qemu-aarch64 dpu-agent layout", cmd, DEADLINE);
    assert!(out.status.success(), "{out:?}");
    assert!(out.stdout.starts_with("# dpu-agent") && out.stdout.contains("aarch64"), "{}", out.stdout);
    assert_eq!(table(&out.stdout), expected());
}

//! The intra-node data path with real processes: host-shimd, sample
//! functions (`dne-fn`) and this test process attached as a function.
//!
//! Hand-off, chains (1 B to 1 MiB), batches, doorbell wake-up of sleeping
//! functions, crash reclaim (kill -9 a function holding buffers, 100 times),
//! tenant isolation. Every wait has a watchdog; nothing asserts on time.

#![allow(clippy::print_stdout, clippy::print_stderr)] // the agent probe reports on stdout; a skip notice

use dne_functions::Transform;
use dne_tests::{Proc, TempDir, bin_path, wait_for};
use host_shim::{AttachError, Function, SendErrorKind};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};
use wire::ErrorCode;

const WATCHDOG: Duration = Duration::from_secs(60);

// Fields drop in order: functions, then host-shimd, then the directory.
struct Node {
    fns: Vec<Proc>,
    shimd: Proc,
    dir: TempDir,
}

impl Node {
    fn socket(&self) -> PathBuf {
        host_shim::daemon::socket_path(self.dir.path())
    }

    fn config(&self) -> String {
        self.dir.path().join("cluster.toml").display().to_string()
    }

    fn status(&self) -> String {
        std::fs::read_to_string(host_shim::daemon::status_path(self.dir.path())).unwrap_or_default()
    }

    /// Starts a sample function and waits until it is attached.
    fn start_fn(&mut self, function: &str, transform: &str, next: Option<&str>, hoard: u32) -> usize {
        let mut args = vec!["--transform", transform];
        let hoard = hoard.to_string();
        args.extend(["--hoard", &hoard]);
        if let Some(n) = next {
            args.extend(["--next", n]);
        }
        self.start_fn_with(function, &args)
    }

    /// Starts `dne-fn` as `function` of acme with more `args`, and waits
    /// until it is attached.
    fn start_fn_with(&mut self, function: &str, args: &[&str]) -> usize {
        let mut cmd = Command::new(bin_path("dne-fn"));
        cmd.arg("--socket").arg(self.socket()).args(["--tenant", "acme", "--function", function]);
        cmd.args(args);
        let mut p = Proc::spawn_lines(function, cmd);
        p.wait_line("ready", WATCHDOG);
        self.fns.push(p);
        self.fns.len() - 1
    }
}

fn config(dir: &Path) -> String {
    format!(
        r#"
[[node]]
name = "n1"
address = "127.0.0.1:7101"
runtime_dir = "{}"

[[node]]
name = "n2"
address = "127.0.0.1:7102"
runtime_dir = "{}/n2"

[[tenant]]
name = "acme"
weight = 1
buf_size = 16384
buffers = 512
recv_quota = 16
max_chain = 128

[[tenant]]
name = "globex"
weight = 1
buf_size = 4096
buffers = 64
recv_quota = 8

[[function]]
name = "client"
tenant = "acme"
node = "n1"

[[function]]
name = "upper"
tenant = "acme"
node = "n1"

[[function]]
name = "rot13"
tenant = "acme"
node = "n1"

[[function]]
name = "hoarder"
tenant = "acme"
node = "n1"

[[function]]
name = "g-echo"
tenant = "globex"
node = "n1"

[[function]]
name = "fan"
tenant = "acme"
node = "n1"

[[function]]
name = "b0"
tenant = "acme"
node = "n1"

[[function]]
name = "b1"
tenant = "acme"
node = "n1"

# A function of another node: calls from it reach n1 through the agent.
[[function]]
name = "far"
tenant = "acme"
node = "n2"

# Route 0: the fan-out and gather roles of the sample function.
[[route]]
path = "/fan"
tenant = "acme"
chain = ["fan"]

# Route 1: a chain of two sample functions.
[[route]]
path = "/chain"
tenant = "acme"
chain = ["upper", "rot13"]
"#,
        dir.display(),
        dir.display()
    )
}

fn start_node(name: &str) -> Node {
    start_node_under(name, &[])
}

/// [`start_node`] with host-shimd run by the command `wrapper` (its
/// program and arguments; `prlimit ... --`, say), when not empty.
fn start_node_under(name: &str, wrapper: &[&str]) -> Node {
    start_node_with(name, wrapper, None)
}

/// [`start_node`] with host-shimd run as user and group `uid` (root
/// only): the runtime directory is given to it.
fn start_node_as(name: &str, uid: u32) -> Node {
    start_node_with(name, &[], Some(uid))
}

fn start_node_with(name: &str, wrapper: &[&str], uid: Option<u32>) -> Node {
    let dir = TempDir::new(name);
    let cfg = dir.path().join("cluster.toml");
    std::fs::write(&cfg, config(dir.path())).unwrap();
    let mut cmd = match wrapper.split_first() {
        Some((program, args)) => {
            let mut c = Command::new(program);
            c.args(args).arg(bin_path("host-shimd"));
            c
        }
        None => Command::new(bin_path("host-shimd")),
    };
    cmd.arg("--config").arg(&cfg).args(["--node", "n1"]).env("RUST_LOG", "warn");
    if let Some(uid) = uid {
        std::os::unix::fs::chown(dir.path(), Some(uid), Some(uid)).unwrap();
        std::os::unix::process::CommandExt::uid(&mut cmd, uid);
        std::os::unix::process::CommandExt::gid(&mut cmd, uid);
    }
    let shimd = Proc::spawn_lines("host-shimd", cmd);
    let sock = host_shim::daemon::socket_path(dir.path());
    wait_for("host-shimd socket", WATCHDOG, || sock.exists());
    Node { fns: Vec::new(), shimd, dir }
}

fn payload(len: usize, seed: u8) -> Vec<u8> {
    (0..len).map(|i| b'a' + ((i as u8).wrapping_mul(7).wrapping_add(seed) % 26)).collect()
}

fn expected(data: &[u8]) -> Vec<u8> {
    let mut v = data.to_vec();
    Transform::Upper.apply(&mut v);
    Transform::Rot13.apply(&mut v);
    v
}

/// Free buffers in the pool plus those in `f`'s private cache.
fn free_or_cached(f: &Function) -> u32 {
    f.pool().free_buffers() + f.cached_buffers() as u32
}

fn send_retry(client: &mut Function, mut msg: host_shim::Msg, to: &str) {
    loop {
        match client.send(msg, to) {
            Ok(()) => return,
            Err(e) if matches!(e.kind, SendErrorKind::Full) => {
                msg = e.msg.expect("full ring hands the message back");
                std::thread::sleep(Duration::from_micros(100));
            }
            Err(e) => panic!("send to {to}: {e:?}"),
        }
    }
}

#[test]
fn chain_of_functions_carries_1b_to_1mib_intact() {
    let mut node = start_node("chain");
    node.start_fn("rot13", "rot13", Some("client"), 0);
    node.start_fn("upper", "upper", Some("rot13"), 0);
    let mut client = Function::attach(&node.socket(), "acme", "client").unwrap();
    let total = free_or_cached(&client);
    for (i, len) in [0usize, 1, 100, 16320, 16321, 65536, 1 << 20].into_iter().enumerate() {
        let data = payload(len, i as u8);
        let mut m = client.alloc(len as u32).unwrap();
        client.write(&mut m, &data).unwrap();
        m.set_request(i as u32);
        send_retry(&mut client, m, "upper");
        let back = client.recv_timeout(Some(WATCHDOG)).unwrap().expect("reply within the watchdog");
        assert_eq!(back.request(), i as u32);
        assert_eq!(back.len() as usize, len);
        assert!(client.read_to_vec(&back) == expected(&data), "payload of {len} bytes changed on the way");
        client.free(back).unwrap();
    }
    // Batches: 300 messages in flight at once, all come back, in order.
    let mut batch = Vec::new();
    for i in 0..300u32 {
        let mut m = client.alloc(1024).unwrap();
        client.write(&mut m, &payload(1024, i as u8)).unwrap();
        m.set_request(1000 + i);
        batch.push(m);
    }
    let mut sent = 0;
    let mut got = 0u32;
    while got < 300 {
        if !batch.is_empty() {
            match client.send_batch(&mut batch, "upper") {
                Ok(n) => sent += n,
                Err(SendErrorKind::Full) => sent = 300 - batch.len(),
                Err(e) => panic!("{e}"),
            }
        }
        while let Some(m) = client.try_recv() {
            assert_eq!(m.request(), 1000 + got, "order of a single chain is kept");
            assert_eq!(client.read_to_vec(&m), expected(&payload(1024, got as u8)));
            client.free(m).unwrap();
            got += 1;
        }
        if batch.is_empty() && got < 300 {
            let m = client.recv_timeout(Some(WATCHDOG)).unwrap().expect("reply");
            assert_eq!(m.request(), 1000 + got);
            client.free(m).unwrap();
            got += 1;
        }
    }
    assert_eq!(sent, 300);
    // Nothing leaked anywhere along the chain.
    // (Buffers in the client's private allocation cache are free too.)
    wait_for("all buffers free", WATCHDOG, || free_or_cached(&client) == total);
    assert!(client.rejected().is_empty(), "{:?}", client.rejected());
}

/// host-shimd's status file follows the pools' free counts when only
/// traffic moves them (no attach, no death), within a couple of seconds.
#[test]
fn shimd_status_follows_allocations_without_control_events() {
    let node = start_node("status");
    let mut f = Function::attach(&node.socket(), "acme", "client").unwrap();
    let status = host_shim::daemon::status_path(node.dir.path());
    let free_in_status = || {
        let s = std::fs::read_to_string(&status).unwrap_or_default();
        let acme = s.find("\"tenant\":\"acme\"")?;
        let at = acme + s[acme..].find("\"free\":")? + 7;
        s[at..].split(|c: char| !c.is_ascii_digit()).next()?.parse::<u32>().ok()
    };
    wait_for("the attach in the status", WATCHDOG, || free_in_status() == Some(f.pool().free_buffers()));
    let held: Vec<_> = (0..5).map(|_| f.alloc(10).unwrap()).collect();
    let now_free = f.pool().free_buffers();
    wait_for("the allocations in the status", Duration::from_secs(5), || free_in_status() == Some(now_free));
    for m in held {
        f.free(m).unwrap();
    }
}

#[test]
fn sleeping_functions_are_woken_by_the_doorbell() {
    let mut node = start_node("doorbell");
    node.start_fn("upper", "upper", Some("client"), 0);
    let mut client = Function::attach(&node.socket(), "acme", "client").unwrap();
    for round in 0..5u8 {
        // Idle far longer than the spin phase: `upper` is asleep.
        std::thread::sleep(Duration::from_millis(100));
        let mut m = client.alloc(5).unwrap();
        client.write(&mut m, b"hello").unwrap();
        m.set_request(u32::from(round));
        client.send(m, "upper").unwrap();
        let back = client.recv_timeout(Some(WATCHDOG)).unwrap().expect("woken and answered");
        assert_eq!(client.read_to_vec(&back), b"HELLO");
        client.free(back).unwrap();
    }
}

/// A receive fails with `ShimdGone` once host-shimd is gone, after the
/// messages already in its ring are taken, both `recv_timeout` and `recv`;
/// `dne-fn`, which serves "until its host-shimd goes away", exits. Before,
/// `recv_timeout` kept answering "nothing yet" (here: `Ok(None)` after the
/// whole watchdog) and `recv` slept for ever (`dne-fn` kept running).
#[test]
fn a_receive_fails_once_host_shimd_is_gone() {
    let mut node = start_node("shimd-gone");
    let k = node.start_fn("upper", "upper", Some("client"), 0);
    let mut client = Function::attach(&node.socket(), "acme", "client").unwrap();
    let mut waiter = Function::attach(&node.socket(), "acme", "rot13").unwrap();
    // One message waits in the client's own ring when host-shimd dies.
    let mut m = client.alloc(5).unwrap();
    client.write(&mut m, b"first").unwrap();
    client.send(m, "client").unwrap();
    node.shimd.kill9();
    wait_for("the client to see host-shimd gone", WATCHDOG, || !client.shimd_alive());
    let m = client.recv_timeout(Some(WATCHDOG)).unwrap().expect("what arrived before is taken first");
    assert_eq!(client.read_to_vec(&m), b"first");
    client.free(m).unwrap();
    let r = client.recv_timeout(Some(WATCHDOG));
    assert!(matches!(r, Err(host_shim::RecvError::ShimdGone)), "recv_timeout: {:?}", r.map(|m| m.is_some()));
    // `recv` (no timeout) in a thread, the test waiting with a watchdog.
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let _ = tx.send(waiter.recv().map(|_| ()));
    });
    let r = rx.recv_timeout(WATCHDOG).expect("recv returned within the watchdog");
    assert!(matches!(r, Err(host_shim::RecvError::ShimdGone)), "recv: {r:?}");
    wait_for("dne-fn to exit", WATCHDOG, || !node.fns[k].is_running());
}

/// host-shimd stopped cleanly (SIGTERM, what `systemctl stop` and
/// `restart` send) tells every attached function at once: a send into a
/// ring it had looked up before, `send_batch`, and a send to a function it
/// never looked up fail with `ShimdGone` and hand the messages back, and a
/// receive that spins (never sleeps, so never looks at the control
/// connection) ends with `ShimdGone`. Before, the send into rot13's ring
/// and `send_batch` returned `Ok` (the messages went into a ring no
/// host-shimd would serve again), the send to a function never looked up
/// failed with `Shimd("Broken pipe (os error 32)")`, and the spinning
/// receive was still spinning at the watchdog.
#[test]
fn a_clean_stop_of_host_shimd_fails_sends_and_ends_a_spinning_receive() {
    let mut node = start_node("shimd-stop");
    let mut client = Function::attach(&node.socket(), "acme", "client").unwrap();
    let mut peer = Function::attach(&node.socket(), "acme", "rot13").unwrap();
    let mut spinner = Function::attach(&node.socket(), "acme", "upper").unwrap();
    // The client has rot13's ring (the first send looked it up).
    let mut m = client.alloc(5).unwrap();
    client.write(&mut m, b"first").unwrap();
    client.send(m, "rot13").unwrap();
    let got = peer.recv_timeout(Some(WATCHDOG)).unwrap().expect("the first message");
    peer.free(got).unwrap();
    // A receive that spins for ever, as a busy-polling function's does.
    spinner.set_spin(Duration::MAX);
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let _ = tx.send(spinner.recv().map(|_| ()));
    });
    let status = node.shimd.terminate(WATCHDOG);
    assert!(status.success(), "host-shimd's exit after SIGTERM: {status:?}");

    let mut m = client.alloc(6).unwrap();
    client.write(&mut m, b"second").unwrap();
    let sent = client.send(m, "rot13");
    let mut batch = vec![client.alloc(5).unwrap(), client.alloc(5).unwrap()];
    let batched = client.send_batch(&mut batch, "rot13");
    let never_looked_up = client.alloc(5).unwrap();
    let unknown = client.send(never_looked_up, "upper");
    let spun = rx.recv_timeout(WATCHDOG);

    let e = sent.expect_err("a send into rot13's ring after host-shimd stopped");
    assert!(matches!(e.kind, SendErrorKind::ShimdGone), "{}", e.kind);
    let back = e.msg.expect("the message handed back");
    assert_eq!(client.read_to_vec(&back), b"second");
    client.free(back).unwrap();
    let e = batched.expect_err("send_batch after host-shimd stopped");
    assert!(matches!(e, SendErrorKind::ShimdGone), "{e}");
    assert_eq!(batch.len(), 2, "both messages handed back");
    for m in batch {
        client.free(m).unwrap();
    }
    let e = unknown.expect_err("a send to a function never looked up");
    assert!(matches!(e.kind, SendErrorKind::ShimdGone), "{}", e.kind);
    assert!(e.msg.is_some(), "handed back");
    let spun = spun.expect("the spinning receive ended within the watchdog");
    assert!(matches!(spun, Err(host_shim::RecvError::ShimdGone)), "{spun:?}");
    assert!(peer.try_recv().is_none(), "nothing reached rot13 after the stop");
}

#[test]
fn killing_a_function_100_times_leaks_no_buffer() {
    let mut node = start_node("reclaim");
    let client = Function::attach(&node.socket(), "acme", "client").unwrap();
    let total = free_or_cached(&client);
    let mut client = client;
    for round in 0..100u32 {
        let i = node.start_fn("hoarder", "echo", None, 7);
        // It holds 7 messages of its own; hand it two more, which it may
        // not have taken off its ring yet when it dies (those come back to
        // the client as errors, which it frees).
        for _ in 0..2 {
            let m = client.alloc(20_000).unwrap();
            client.send(m, "hoarder").unwrap();
        }
        assert!(free_or_cached(&client) < total);
        node.fns[i].kill9();
        wait_for(&format!("round {round}: every buffer back"), WATCHDOG, || {
            while let Some(m) = client.try_recv() {
                assert_eq!(m.desc().error_code(), Some(ErrorCode::PeerDied), "{:?}", m.desc());
                client.free(m).unwrap();
            }
            free_or_cached(&client) == total
        });
        node.fns.pop();
    }
    wait_for("status shows 100 deaths", WATCHDOG, || node.status().contains("\"deaths\":100"));
}

/// A function killed at any point of allocating or freeing (here: in a
/// loop of 90-buffer messages, which go through the shared pool, not only
/// its private cache) loses no buffer: what it held is reclaimed, and a
/// buffer it had freed but not yet marked free in the pool's hints is
/// marked again by host-shimd (`rehinted`), so every buffer can be taken.
#[test]
fn a_function_killed_while_allocating_leaks_no_buffer() {
    let mut node = start_node("churn");
    let client = Function::attach(&node.socket(), "acme", "client").unwrap();
    let total = free_or_cached(&client);
    let pool = client.pool();
    for round in 0..40u64 {
        let i = node.start_fn_with("hoarder", &["--churn", "1400000"]);
        std::thread::sleep(Duration::from_micros(500 + round * 397 % 5000));
        node.fns[i].kill9();
        wait_for(&format!("round {round}: every buffer back and takeable"), WATCHDOG, || {
            free_or_cached(&client) == total && pool.free_hint() == pool.free_buffers()
        });
        node.fns.pop();
    }
    wait_for("status shows 40 deaths", WATCHDOG, || node.status().contains("\"deaths\":40"));
}

#[test]
fn another_tenants_pool_and_functions_are_refused_and_counted() {
    let node = start_node("isolation");
    // Claiming a function of tenant acme as tenant globex, and the reverse.
    match Function::attach(&node.socket(), "globex", "upper") {
        Err(AttachError::Refused(ErrorCode::TenantMismatch)) => {}
        other => panic!("expected a tenant refusal, got {other:?}"),
    }
    match Function::attach(&node.socket(), "acme", "g-echo") {
        Err(AttachError::Refused(ErrorCode::TenantMismatch)) => {}
        other => panic!("expected a tenant refusal, got {other:?}"),
    }
    match Function::attach(&node.socket(), "acme", "nobody") {
        Err(AttachError::Refused(ErrorCode::UnknownFunction)) => {}
        other => panic!("expected unknown function, got {other:?}"),
    }
    let mut client = Function::attach(&node.socket(), "acme", "client").unwrap();
    // One instance is configured: a second attach is refused.
    match Function::attach(&node.socket(), "acme", "client") {
        Err(AttachError::Refused(ErrorCode::Overloaded)) => {}
        other => panic!("expected overloaded, got {other:?}"),
    }
    let g_echo = Function::attach(&node.socket(), "globex", "g-echo").unwrap();
    let m = client.alloc(10).unwrap();
    let e = client.send(m, "g-echo").unwrap_err();
    assert!(matches!(e.kind, SendErrorKind::TenantMismatch), "{e:?}");
    client.free(e.msg.expect("refused send hands the message back")).unwrap();
    assert_ne!(client.pool().region().base_addr(), g_echo.pool().region().base_addr());
    wait_for("refusals counted", WATCHDOG, || {
        let s = node.status();
        s.contains("\"attach_refused\":{\"overloaded\":1,\"tenant_mismatch\":2,\"unknown_function\":1}")
            && s.contains("\"lookup_refused\":{\"tenant_mismatch\":1}")
    });
}

/// A sender that keeps addressing a function host-shimd cannot give it
/// (not configured, or with no live instance) gets the answer again from
/// its own memory for [`host_shim::function::ABSENT_TTL`] instead of one
/// blocking round trip to host-shimd per message.
#[test]
fn an_absent_function_is_not_looked_up_again_for_every_message() {
    let node = start_node("absent");
    let mut client = Function::attach(&node.socket(), "acme", "client").unwrap();
    let start = Instant::now();
    for _ in 0..50 {
        let m = client.alloc(10).unwrap();
        let e = client.send(m, "no-such-fn").unwrap_err();
        assert!(matches!(e.kind, SendErrorKind::UnknownFunction), "{e:?}");
        client.free(e.msg.expect("the message comes back")).unwrap();
    }
    let burst = start.elapsed();
    // One lookup per TTL at most: a lookup at time t keeps the answer
    // until t + TTL, so the burst made at most 1 + burst / TTL of them
    // (one, unless this process was held off the CPU meanwhile), not 50.
    wait_for("the refusal counted", WATCHDOG, || node.status().contains("\"lookup_refused\":{\"unknown_function\":"));
    let s = node.status();
    let n = dne_tests::cluster::status_number(&s, "unknown_function").unwrap();
    let most = 1 + u64::try_from(burst.as_nanos() / host_shim::function::ABSENT_TTL.as_nanos()).unwrap();
    assert!(n <= most, "{n} lookups for 50 sends in {burst:?}, at most {most} allowed: {s}");
    // After the TTL host-shimd is asked again.
    std::thread::sleep(host_shim::function::ABSENT_TTL * 2);
    let m = client.alloc(10).unwrap();
    let back = client.send(m, "no-such-fn").unwrap_err().msg.unwrap();
    client.free(back).unwrap();
    wait_for("asked again after the TTL", WATCHDOG, || {
        dne_tests::cluster::status_number(&node.status(), "unknown_function") == Some(n + 1)
    });
}

/// Builds the C sample function `functions/c/upper_fn.c` into `dir` with
/// only `pkg-config dne-shim` and the generated header, warnings as errors;
/// the command that runs it.
fn c_sample_command(dir: &Path) -> Command {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("../functions/c/upper_fn.c");
    dne_tests::c::build(dir, &src, dne_tests::c::Lang::C11, &["-O2"])
}

/// The build-tree `dne-shim.pc` links the C sample with the library cargo
/// built for this test run: the one in `deps`, beside this test binary.
/// Before, it named `target/<profile>`, whose copy only a build of
/// host-shim itself refreshes (not `cargo test -p dne-tests`): a C test
/// could link a library older than its header (undefined `dne_*` symbols,
/// or old behaviour).
#[test]
fn the_c_sample_links_the_library_built_for_this_test() {
    let libdir = PathBuf::from(dne_tests::c::pkg_config(&["--variable=libdir"]).remove(0));
    let exe = std::env::current_exe().unwrap();
    let here = exe.parent().unwrap();
    assert_eq!(libdir.canonicalize().unwrap(), here.canonicalize().unwrap());
    assert!(libdir.join("libhost_shim.so").exists(), "no libhost_shim.so in {}", libdir.display());
}

/// The C sample function, built with only `pkg-config dne-shim` and the
/// generated header, takes the place of `upper` in the chain.
#[test]
fn c_function_built_with_pkg_config_serves_in_a_chain() {
    let dir = TempDir::new("cfn");
    let mut cmd = c_sample_command(dir.path());
    let mut node = start_node("cchain");
    node.start_fn("rot13", "rot13", Some("client"), 0);
    cmd.arg(node.socket()).args(["acme", "upper", "rot13"]);
    let mut c_fn = Proc::spawn_lines("upper_fn (C)", cmd);
    c_fn.wait_line("ready", WATCHDOG);
    let mut client = Function::attach(&node.socket(), "acme", "client").unwrap();
    for (i, len) in [1usize, 5000, 40_000].into_iter().enumerate() {
        let data = payload(len, i as u8);
        let mut m = client.alloc(len as u32).unwrap();
        client.write(&mut m, &data).unwrap();
        send_retry(&mut client, m, "upper");
        let back = client.recv_timeout(Some(WATCHDOG)).unwrap().expect("reply through the C function");
        assert!(client.read_to_vec(&back) == expected(&data));
        client.free(back).unwrap();
    }
    assert!(c_fn.is_running());
}

/// The C sample frees an error descriptor (a message that came back
/// undelivered) instead of forwarding it as a call: what reaches the next
/// function is only the call sent after it. Before, the C ABI could not
/// tell one from the other and the C sample forwarded the error.
#[test]
fn c_function_frees_an_error_descriptor_instead_of_forwarding_it() {
    let dir = TempDir::new("cfn-error");
    let mut cmd = c_sample_command(dir.path());
    let node = start_node("cerror");
    let mut next = Function::attach(&node.socket(), "acme", "rot13").unwrap();
    cmd.arg(node.socket()).args(["acme", "upper", "rot13"]);
    let mut c_fn = Proc::spawn_lines("upper_fn (C)", cmd);
    c_fn.wait_line("ready", WATCHDOG);
    let mut client = Function::attach(&node.socket(), "acme", "client").unwrap();
    let mut bounced = client.alloc(6).unwrap();
    client.write(&mut bounced, b"bounce").unwrap();
    bounced.set_request(1);
    let d = bounced.desc_mut();
    d.flags |= wire::DescFlags::ERROR;
    d.status = ErrorCode::Overloaded as u8;
    client.send(bounced, "upper").unwrap();
    let mut call = client.alloc(4).unwrap();
    client.write(&mut call, b"call").unwrap();
    call.set_request(2);
    client.send(call, "upper").unwrap();
    // One producer, one ring: a forwarded error would arrive first.
    let m = next.recv_timeout(Some(WATCHDOG)).unwrap().expect("the call forwarded");
    assert_eq!((m.request(), m.desc().is_error()), (2, false), "{:?}", m.desc());
    assert_eq!(next.read_to_vec(&m), b"CALL");
    next.free(m).unwrap();
    assert!(c_fn.is_running());
}

/// The C sample exits (its `check(st, "recv")`, status 1) once host-shimd
/// is gone: `dne_recv` fails with `DNE_ERR_SHIMD_GONE`. Before, `dne_recv`
/// slept for ever and the process outlived host-shimd (here: killed at the
/// watchdog).
#[test]
fn c_function_exits_once_host_shimd_is_gone() {
    let dir = TempDir::new("cfn-gone");
    let mut cmd = c_sample_command(dir.path());
    let mut node = start_node("cgone");
    cmd.arg(node.socket()).args(["acme", "upper", "rot13"]);
    let mut c_fn = Proc::spawn_lines("upper_fn (C)", cmd);
    c_fn.wait_line("ready", WATCHDOG);
    node.shimd.kill9();
    let out = c_fn.wait_timeout(WATCHDOG);
    assert_eq!(out.status.code(), Some(1), "upper_fn ended by its recv check: {out:?}");
}

/// A process of tenant `acme` speaking the control protocol by hand: its
/// hello, as function `upper`.
fn hello_by_hand(node: &Node) -> host_shim::sock::Conn {
    hello_at(&node.socket())
}

/// [`hello_by_hand`] to the host-shimd of `socket`.
fn hello_at(socket: &Path) -> host_shim::sock::Conn {
    use wire::ctrl::{CtrlMsg, Hello, Role};
    use wire::{CtrlFrame, Name};
    let conn = host_shim::sock::Conn::connect(socket).unwrap();
    let hello = Hello {
        role: Role::Function as u8,
        reserved: 0,
        node: 0,
        pid: 1,
        layout_hash: wire::LAYOUT_HASH,
        name: Name::new("upper").unwrap(),
    };
    conn.send(&CtrlFrame { seq: 0, msg: CtrlMsg::Hello(hello) }, &[]).unwrap();
    conn
}

/// After [`hello_by_hand`]: attaches as `upper` #0; its grant and the pool.
fn attach_by_hand(conn: &host_shim::sock::Conn) -> (wire::ctrl::AttachOk, shm::Pool) {
    use wire::ctrl::{Attach, CTRL_MAX_FRAME, CtrlMsg};
    use wire::{CtrlFrame, Name};
    let attach = Attach {
        tenant: Name::new("acme").unwrap(),
        function: Name::new("upper").unwrap(),
        instance: 0,
        reserved: 0,
        pid: 1,
    };
    conn.send(&CtrlFrame { seq: 1, msg: CtrlMsg::Attach(attach) }, &[]).unwrap();
    let mut buf = [0u8; CTRL_MAX_FRAME];
    let r = conn.recv(&mut buf).unwrap();
    let CtrlMsg::AttachOk(ok) = CtrlFrame::decode(&buf[..r.len]).unwrap().0.msg else { panic!("attach refused") };
    (ok, shm::Pool::open(r.fds.into_iter().next().unwrap()).unwrap())
}

/// After [`attach_by_hand`]: looks up `function` (one instance); its peer
/// record and descriptors (ring, doorbell).
fn lookup_by_hand(
    conn: &host_shim::sock::Conn,
    function: &str,
) -> (wire::ctrl::Peer, std::vec::IntoIter<std::os::fd::OwnedFd>) {
    use wire::ctrl::{CTRL_MAX_FRAME, CtrlMsg, Lookup};
    use wire::{CtrlFrame, Name};
    conn.send(&CtrlFrame { seq: 2, msg: CtrlMsg::Lookup(Lookup { function: Name::new(function).unwrap() }) }, &[])
        .unwrap();
    let mut buf = [0u8; CTRL_MAX_FRAME];
    let r = conn.recv(&mut buf).unwrap();
    let CtrlMsg::Peer(peer) = CtrlFrame::decode(&buf[..r.len]).unwrap().0.msg else { panic!("lookup refused") };
    (peer, r.fds.into_iter())
}

/// A process that floods host-shimd with requests and never reads the
/// replies holds back only itself: host-shimd takes no more of its
/// requests while replies wait unread, serves everyone else at once (it
/// serves all clients from one thread), and answers every request once the
/// client reads: none is lost and the client is not dropped.
#[test]
fn a_client_that_never_reads_its_replies_holds_back_only_itself() {
    use wire::ctrl::{CtrlMsg, Lookup};
    use wire::{CtrlFrame, Name};

    let node = start_node("deaf");
    let conn = hello_by_hand(&node);
    // Requests, the replies left unread, until host-shimd has taken none
    // for 200 ms.
    conn.set_nonblocking(true).unwrap();
    let lookup = CtrlMsg::Lookup(Lookup { function: Name::new("client").unwrap() });
    let (mut sent, start) = (0u32, Instant::now());
    let mut last = start;
    while last.elapsed() < Duration::from_millis(200) {
        assert!(
            start.elapsed() < Duration::from_secs(20),
            "host-shimd took {sent} requests and their replies are unread"
        );
        match conn.send(&CtrlFrame { seq: sent + 1, msg: lookup }, &[]) {
            Ok(()) => (sent, last) = (sent + 1, Instant::now()),
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => std::thread::sleep(Duration::from_millis(1)),
            Err(e) => panic!("host-shimd hung up on the client after {sent} requests: {e}"),
        }
    }
    wait_for("host-shimd to hold the client back", WATCHDOG, || {
        dne_tests::cluster::status_number(&node.status(), "held").is_some_and(|n| n > 0)
    });
    // Another function attaches meanwhile, without waiting behind it.
    let (tx, rx) = std::sync::mpsc::channel();
    let socket = node.socket();
    std::thread::spawn(move || {
        let _ = tx.send(Function::attach(&socket, "acme", "client").map(drop).map_err(|e| e.to_string()));
    });
    let attached =
        rx.recv_timeout(Duration::from_secs(30)).expect("host-shimd stalled behind a client that does not read");
    attached.unwrap();
    // Now the client reads: a reply for every request.
    conn.set_nonblocking(false).unwrap();
    let five = nix::sys::time::TimeVal::new(5, 0);
    nix::sys::socket::setsockopt(&conn, nix::sys::socket::sockopt::ReceiveTimeout, &five).unwrap();
    let mut buf = [0u8; wire::ctrl::CTRL_MAX_FRAME];
    for k in 1..=sent {
        let r = conn.recv(&mut buf).unwrap_or_else(|e| panic!("reply {k} of {sent}: {e}"));
        assert!(r.len > 0, "host-shimd hung up after {} of {sent} replies", k - 1);
        let (f, _) = CtrlFrame::decode(&buf[..r.len]).unwrap();
        assert_eq!(f.seq, k, "replies in order");
        assert!(matches!(f.msg, CtrlMsg::Peer(_) | CtrlMsg::Error(_)), "{:?}", f.msg.kind());
    }
}

/// A producer killed between claiming a slot of a ring and publishing it
/// leaves a hole the consumer would wait at forever; one killed between
/// handing a buffer over and pushing its descriptor leaves a buffer nobody
/// will take. host-shimd notes both when a process of the tenant dies and,
/// if they are still there after [`host_shim::daemon::HOLE_GRACE`],
/// publishes the holes as voids (the consumer drops them, counted as
/// `void`, and gets what came after) and frees the buffers.
#[test]
fn what_a_producer_killed_mid_send_leaves_is_cleaned_up() {
    let node = start_node("hole");
    let mut victim = Function::attach(&node.socket(), "acme", "client").unwrap();
    // The dying producer: attached as `upper`, it looks the victim up and
    // claims a slot in its ring (moves the tail) without filling it.
    let conn = hello_by_hand(&node);
    let (ok, pool) = attach_by_hand(&conn);
    let (peer, mut fds) = lookup_by_hand(&conn, "client");
    // A buffer handed over to the victim, its descriptor never pushed.
    let lost = pool.alloc(100, wire::Owner::Held(ok.slot)).unwrap();
    let (lost, _) = pool.hand_over(lost, wire::Owner::Function(peer.slot)).unwrap();
    let ring = shm::Region::open(fds.next().unwrap()).unwrap();
    let tail = ring
        .atomic_u64(wire::segment::RING_PRODUCER_OFFSET + std::mem::offset_of!(wire::segment::RingCursor, pos) as u64)
        .unwrap();
    tail.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
    // A live producer's message goes in behind the hole ...
    let mut sender = Function::attach(&node.socket(), "acme", "rot13").unwrap();
    let mut m = sender.alloc(5).unwrap();
    sender.write(&mut m, b"after").unwrap();
    sender.send(m, "client").unwrap();
    // ... and the producer dies (its buffer and that message's are both
    // handed to the victim then: only the first is an orphan).
    drop(conn);
    let got = victim.recv_timeout(Some(WATCHDOG)).unwrap().expect("the message behind the hole");
    assert_eq!(victim.read_to_vec(&got), b"after");
    victim.free(got).unwrap();
    assert_eq!(victim.rejected().get("void"), Some(&1), "{:?}", victim.rejected());
    wait_for("the orphaned buffer freed", WATCHDOG, || pool.owner(lost) == Ok(wire::Owner::Free));
    assert!(victim.try_recv().is_none());
    wait_for("the void and the orphan in the status file", WATCHDOG, || {
        let s = node.status();
        dne_tests::cluster::json_u64(&s, "voids") == Some(1) && dne_tests::cluster::json_u64(&s, "orphans") == Some(1)
    });
}

/// A process of the tenant clears every free hint of the pool (or stops
/// between freeing buffers and hinting them): the free buffers are hidden
/// from allocation, until host-shimd's status scan (every second) finds
/// more free buffers than hints and hints them again.
#[test]
fn free_buffers_whose_hints_were_cleared_are_found_again() {
    let node = start_node("hints");
    let mut client = Function::attach(&node.socket(), "acme", "client").unwrap();
    // A held buffer, seen in the status file: host-shimd's scan has run
    // since the start, so the repair below changes no free count it shows.
    let held = client.alloc(1).unwrap();
    let pool = client.pool();
    let layout = wire::segment::PoolLayout::new(pool.geometry());
    let free = pool.free_buffers();
    wait_for("the held buffer in the status file", WATCHDOG, || {
        dne_tests::cluster::json_u64(&node.status(), "free") == Some(u64::from(free))
    });
    for w in 0..layout.avail_words() {
        let word = pool.region().atomic_u64(layout.avail_offset + 8 * u64::from(w)).unwrap();
        word.store(0, std::sync::atomic::Ordering::SeqCst);
    }
    assert_eq!(pool.free_hint(), 0);
    // More than the client's private cache holds: from the shared pool.
    let big = 100 * 16_000;
    assert!(client.alloc(big).is_err(), "every free buffer hidden");
    wait_for("the hints restored", WATCHDOG, || client.pool().free_hint() == free);
    // The status file reports the repair, though no free count moved.
    wait_for("the repair in the status file", WATCHDOG, || {
        dne_tests::cluster::json_u64(&node.status(), "rehinted").is_some_and(|n| u64::from(free) <= n)
    });
    let m = client.alloc(big).expect("allocation works again");
    client.free(m).unwrap();
    client.free(held).unwrap();
}

/// A rogue process of the tenant speaks the control protocol by hand, pushes
/// garbage descriptors straight into a victim's ring and scribbles over the
/// ring's header: every bad descriptor is rejected and counted by reason,
/// the victim keeps working, and a well-formed message still gets through.
#[test]
fn garbage_from_a_rogue_peer_is_rejected_counted_and_harmless() {
    use shm::ring::{Doorbell, Ring};
    use wire::{DescFlags, Descriptor, Owner};

    let node = start_node("rogue");
    let mut victim = Function::attach(&node.socket(), "acme", "client").unwrap();
    let conn = hello_by_hand(&node);
    let (ok, pool) = attach_by_hand(&conn);
    let (peer, mut fds) = lookup_by_hand(&conn, "client");
    let ring_fd = fds.next().unwrap();
    let raw_ring = shm::Region::open(ring_fd.try_clone().unwrap()).unwrap();
    let ring = Ring::open(ring_fd).unwrap();
    let bell = Doorbell::from_fd(fds.next().unwrap());

    // A message of the rogue's own, never handed over to the victim.
    let kept = pool.alloc(10, Owner::Held(ok.slot)).unwrap();
    let good = Descriptor { tenant: ok.tenant, len: 10, buf: kept.head(), ..Default::default() };
    let garbage = [
        Descriptor { tenant: ok.tenant + 1, ..good },
        Descriptor { buf: 1_000_000, ..good },
        Descriptor { len: u32::MAX, ..good },
        Descriptor { flags: 0x4000, ..good },
        Descriptor { flags: DescFlags::ERROR, status: 250, ..good },
        good, // not handed over: not the victim's to take
        Descriptor { reserved: 7, ..good },
    ];
    for g in &garbage {
        ring.push(&[*g]).unwrap();
    }
    bell.ring().unwrap();
    // The rogue scribbles over the ring header: the victim uses the copy it
    // read at attach, and anyone opening the ring now gets a typed error.
    raw_ring.copy_in(0, &[0xEE; 32]).unwrap();
    assert!(Ring::open(raw_ring.fd().try_clone_to_owned().unwrap()).is_err());

    wait_for("every bad descriptor counted", WATCHDOG, || {
        assert!(victim.try_recv().is_none(), "a bad descriptor reached the function");
        victim.rejected().values().sum::<u64>() == garbage.len() as u64
    });
    let r = victim.rejected();
    for (reason, n) in [
        ("tenant_mismatch", 1),
        ("index_out_of_range", 1),
        ("too_long", 1),
        ("unknown_flags", 1),
        ("bad_status", 1),
        ("not_owner", 1),
        ("reserved", 1),
    ] {
        assert_eq!(r.get(reason), Some(&n), "{reason}: {r:?}");
    }
    // A well-formed hand-over still arrives.
    let mut m = kept;
    pool.write(&mut m, b"still here").unwrap();
    let (head, len) = pool.hand_over(m, Owner::Function(peer.slot)).unwrap();
    let d = Descriptor {
        tenant: ok.tenant,
        src_fn: ok.function,
        dst_fn: peer.function,
        buf: head,
        len,
        ..Default::default()
    };
    if ring.push(&[d]).unwrap().wake {
        bell.ring().unwrap();
    }
    let got = victim.recv_timeout(Some(WATCHDOG)).unwrap().expect("the good message");
    assert_eq!(victim.read_to_vec(&got), b"still here");
    victim.free(got).unwrap();
}

/// Messages that reached a function while it waited in `recv` stay in its
/// ring until it has accepted them, one by one: none is held popped and
/// unaccepted. Such a message named buffers marked as sent to the function
/// and in no ring, which host-shimd's look for orphans after a death in the
/// tenant (here a clean detach) freed, losing the message (and the buffer
/// could be handed out again under the old descriptor).
#[test]
fn messages_a_waiting_receiver_has_not_taken_yet_survive_a_death_in_the_tenant() {
    let node = start_node("orphan-scan");
    let mut victim = Function::attach(&node.socket(), "acme", "client").unwrap();
    let mut sender = Function::attach(&node.socket(), "acme", "upper").unwrap();
    let (ready_tx, ready_rx) = std::sync::mpsc::channel();
    let waiter = std::thread::spawn(move || {
        ready_tx.send(()).unwrap();
        let first = victim.recv_timeout(Some(WATCHDOG)).unwrap().expect("the first message");
        (victim, first)
    });
    ready_rx.recv().unwrap();
    // Let it reach its wait, so that the three arrive in one batch while
    // it waits (what the old code popped at once).
    std::thread::sleep(Duration::from_millis(50));
    let mut batch: Vec<host_shim::Msg> = (0..3u8)
        .map(|k| {
            let mut m = sender.alloc(4).unwrap();
            sender.write(&mut m, &[b'a' + k; 4]).unwrap();
            m
        })
        .collect();
    assert_eq!(sender.send_batch(&mut batch, "client").unwrap(), 3);
    let (mut victim, first) = waiter.join().unwrap();
    assert_eq!(victim.read_to_vec(&first), b"aaaa");
    victim.free(first).unwrap();
    // A death in the tenant; wait for host-shimd's look for orphans.
    let checks = || dne_tests::cluster::status_number(&node.status(), "hole_checks");
    let before = checks().expect("hole_checks in host-shimd's status");
    drop(Function::attach(&node.socket(), "acme", "hoarder").unwrap());
    wait_for("host-shimd's look for orphans after the detach", WATCHDOG, || checks() > Some(before));
    for k in 1..3u8 {
        let m = victim.recv_timeout(Some(WATCHDOG)).unwrap().expect("a message delivered before the death");
        assert_eq!(victim.read_to_vec(&m), [b'a' + k; 4]);
        victim.free(m).unwrap();
    }
    assert!(victim.rejected().is_empty(), "{:?}", victim.rejected());
    assert_eq!(dne_tests::cluster::status_number(&node.status(), "orphans"), Some(0), "{}", node.status());
}

/// A call on route 0 from the test process (attached as `client`), `len`
/// bytes of `byte`.
fn routed_call(client: &mut Function, request: u32, hop: u8, data: &[u8]) -> host_shim::Msg {
    let mut m = client.alloc(data.len() as u32).unwrap();
    client.write(&mut m, data).unwrap();
    m.set_request(request);
    let d = m.desc_mut();
    d.route = 0;
    d.hop = hop;
    m
}

/// The error descriptor a sample function answered `request` with, as the
/// agent (the test, attached as it) receives it.
fn error_answer(agent: &mut Function, request: u32) -> ErrorCode {
    let m = agent.recv_timeout(Some(WATCHDOG)).unwrap().expect("an answer within the watchdog");
    let d = *m.desc();
    agent.free(m).unwrap();
    assert_eq!(d.request, request);
    assert_ne!(d.flags & wire::DescFlags::REPLY, 0, "{d:?}");
    d.error_code().unwrap_or_else(|| panic!("not an error descriptor: {d:?}"))
}

/// The fan-out role with the pool exhausted for a moment (another
/// function's burst, say): the call goes back to its caller as an
/// `Overloaded` error and the function serves on; the next call fans out
/// to both branches. Before, `f.alloc(..)?` ended the whole `dne-fn`
/// process (no answer: the watchdog ran out here).
#[test]
fn a_fan_out_without_free_buffers_answers_overloaded_and_serves_on() {
    let mut node = start_node("fan-exhausted");
    let cfg = node.config();
    let k = node.start_fn_with("fan", &["--config", &cfg, "--fanout", "b0,b1"]);
    let mut agent = Function::attach_agent(&node.socket(), "acme").unwrap();
    let mut b0 = Function::attach(&node.socket(), "acme", "b0").unwrap();
    let mut b1 = Function::attach(&node.socket(), "acme", "b1").unwrap();
    let mut client = Function::attach(&node.socket(), "acme", "client").unwrap();
    let m = routed_call(&mut client, 1, 0, &[b'x'; 100]);
    let mut hoard = Vec::new();
    while let Ok(h) = client.alloc(1) {
        hoard.push(h);
    }
    client.send(m, "fan").unwrap();
    assert_eq!(error_answer(&mut agent, 1), ErrorCode::Overloaded);
    assert!(node.fns[k].is_running(), "the fan-out function serves on");
    for h in hoard {
        client.free(h).unwrap();
    }
    let m = routed_call(&mut client, 2, 0, &[b'y'; 100]);
    client.send(m, "fan").unwrap();
    for (hop, b) in [&mut b0, &mut b1].into_iter().enumerate() {
        let m = b.recv_timeout(Some(WATCHDOG)).unwrap().expect("a branch within the watchdog");
        assert_eq!((m.request(), m.desc().hop), (2, hop as u8));
        assert_eq!(b.read_to_vec(&m), [b'y'; 100]);
        b.free(m).unwrap();
    }
}

/// A fan-out branch that cannot be sent (here: to a function the cluster
/// does not know) answers the caller with an error at once; the other
/// branch goes. Before, the failure was only logged and the caller waited
/// for its timeout (here: the watchdog ran out).
#[test]
fn a_fan_out_branch_that_cannot_be_sent_is_answered_as_an_error() {
    let mut node = start_node("fan-unsent");
    let cfg = node.config();
    node.start_fn_with("fan", &["--config", &cfg, "--fanout", "b0,no-such-fn"]);
    let mut agent = Function::attach_agent(&node.socket(), "acme").unwrap();
    let mut b0 = Function::attach(&node.socket(), "acme", "b0").unwrap();
    let mut client = Function::attach(&node.socket(), "acme", "client").unwrap();
    let m = routed_call(&mut client, 3, 0, b"branches");
    client.send(m, "fan").unwrap();
    assert_eq!(error_answer(&mut agent, 3), ErrorCode::UnknownFunction);
    let m = b0.recv_timeout(Some(WATCHDOG)).unwrap().expect("the branch that could go");
    assert_eq!(b0.read_to_vec(&m), b"branches");
    b0.free(m).unwrap();
}

/// A gathering function whose reply cannot be built (the branches are no
/// HTTP envelopes) answers the caller with an error made of a branch's
/// buffers. Before, it logged and freed them; the caller waited for its
/// timeout (here: the watchdog ran out).
#[test]
fn a_gather_that_cannot_build_its_reply_answers_an_error() {
    let mut node = start_node("gather-bad");
    let cfg = node.config();
    node.start_fn_with("fan", &["--config", &cfg, "--gather", "2"]);
    let mut agent = Function::attach_agent(&node.socket(), "acme").unwrap();
    let mut client = Function::attach(&node.socket(), "acme", "client").unwrap();
    for hop in 0..2 {
        let m = routed_call(&mut client, 4, hop, b"no envelope");
        client.send(m, "fan").unwrap();
    }
    assert_eq!(error_answer(&mut agent, 4), ErrorCode::BadDescriptor);
}

/// A call whose chain a process sharing the pool broke after the fan-out
/// function took it (a link now leads out of the pool, so a fragment
/// reads as empty) is answered as `BadDescriptor`, and the function serves
/// on. Before, copying it panicked (`copy_from_slice` of slices of
/// different lengths) and `dne-fn` died. The function waits 3 s
/// (`--delay-us`) between taking the call and handling it, for the test to
/// break the link in between.
#[test]
fn a_fan_out_of_a_broken_chain_answers_an_error_and_serves_on() {
    let mut node = start_node("fan-broken");
    let cfg = node.config();
    let k = node.start_fn_with("fan", &["--config", &cfg, "--fanout", "b0,b1", "--delay-us", "3000000"]);
    let mut agent = Function::attach_agent(&node.socket(), "acme").unwrap();
    let mut client = Function::attach(&node.socket(), "acme", "client").unwrap();
    // Two fragments (16 KiB buffers).
    let m = routed_call(&mut client, 5, 0, &[b'z'; 20_000]);
    let head = m.desc().buf;
    client.send(m, "fan").unwrap();
    let pool = client.pool();
    wait_for("the fan-out function to take the call", WATCHDOG, || {
        matches!(pool.owner(head), Ok(wire::Owner::Held(_)))
    });
    let layout = wire::segment::PoolLayout::new(pool.geometry());
    let link = layout.meta_offset(head).unwrap() + std::mem::offset_of!(wire::segment::BufMeta, next_chain) as u64;
    pool.region().atomic_u32(link).unwrap().store(u32::MAX, std::sync::atomic::Ordering::SeqCst);
    assert_eq!(error_answer(&mut agent, 5), ErrorCode::BadDescriptor);
    assert!(node.fns[k].is_running(), "the fan-out function serves on");
}

/// A function of a route that cannot forward the call to the next one
/// (here: it has no live instance) answers the caller with an error at
/// once. Before, the failure was only logged and the message freed; the
/// caller waited for its timeout (here: the watchdog ran out).
#[test]
fn a_route_function_that_cannot_forward_answers_an_error() {
    let mut node = start_node("route-unsent");
    let cfg = node.config();
    node.start_fn_with("upper", &["--config", &cfg, "--transform", "upper"]);
    let mut agent = Function::attach_agent(&node.socket(), "acme").unwrap();
    let mut client = Function::attach(&node.socket(), "acme", "client").unwrap();
    let mut m = routed_call(&mut client, 6, 0, &dne_tests::request_envelope(b"hello"));
    m.desc_mut().route = 1;
    client.send(m, "upper").unwrap();
    assert_eq!(error_answer(&mut agent, 6), ErrorCode::PeerDied);
}

/// Set in this test binary's environment when it runs again as another
/// user to probe host-shimd (see [`probe_as_nobody`]): the socket to try.
const PROBE_ENV: &str = "DNE_TEST_UID_PROBE";

/// Runs test `test` of this binary again as uid 65534 with [`PROBE_ENV`]
/// naming `node`'s socket (opened to every user for it), and returns what
/// the probe printed after `PROBE`. Root only: `None` (and the caller
/// skips) otherwise.
fn probe_as_nobody(test: &str, node: &Node) -> Option<String> {
    if !dne_tests::cluster::is_root() {
        eprintln!("skipped: needs root (to run a probe as another user)");
        return None;
    }
    // Let any user reach the socket: what is checked is who they are.
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(node.socket(), std::fs::Permissions::from_mode(0o777)).unwrap();
    let mut cmd = Command::new(std::env::current_exe().unwrap());
    cmd.args(["--exact", test, "--nocapture", "--test-threads", "1"]);
    cmd.env(PROBE_ENV, node.socket());
    std::os::unix::process::CommandExt::uid(&mut cmd, 65534);
    std::os::unix::process::CommandExt::gid(&mut cmd, 65534);
    let out = Proc::spawn("probe as uid 65534", cmd).wait_timeout(WATCHDOG);
    // (The harness prints the test's name on the same line.)
    let said = out.stdout.lines().find_map(|l| l.find("PROBE").map(|k| l[k + "PROBE ".len()..].to_owned()));
    Some(said.unwrap_or_else(|| panic!("no PROBE line\nstdout: {}\nstderr: {}", out.stdout, out.stderr)))
}

/// Only root or host-shimd's own user may attach as a tenant's agent,
/// which gets the tenant's whole pool, its uplink and every function ring
/// a lookup names: before, any process that could reach the socket could
/// take a tenant's agent role whenever the agent was not attached (before
/// it started, while it restarted), whatever the tenant's `uid`. This test
/// runs itself again as uid 65534 (root only; it says it skips otherwise).
#[test]
fn only_root_or_host_shimds_user_may_attach_as_the_agent() {
    if let Ok(socket) = std::env::var(PROBE_ENV) {
        // The probe, as uid 65534.
        match Function::attach_agent(Path::new(&socket), "acme") {
            Ok(_) => println!("PROBE attached"),
            Err(e) => println!("PROBE refused: {e:?}"),
        }
        return;
    }
    let node = start_node("agent-uid");
    let Some(said) = probe_as_nobody("only_root_or_host_shimds_user_may_attach_as_the_agent", &node) else { return };
    assert_eq!(said, "refused: Refused(TenantMismatch)");
    wait_for("the refusal counted", WATCHDOG, || node.status().contains("\"attach_refused\":{\"tenant_mismatch\":1}"));
    // Root (this test) may.
    let agent = Function::attach_agent(&node.socket(), "acme").expect("root attaches as the agent");
    assert_eq!(agent.info().slot, wire::segment::AGENT_SLOT);
}

/// One user's connections left idle cannot crowd the others out of
/// host-shimd: beyond `UNATTACHED_PER_USER` idle and unattached, that
/// user's new connections are closed at once, while another user's are
/// served. Before, they all took descriptors until host-shimd had none
/// left for anyone (the attach deadline frees them only after 10 s).
/// Root only (the other user is a probe run as uid 65534).
#[test]
fn one_users_idle_connections_do_not_crowd_out_another_user() {
    use host_shim::daemon::UNATTACHED_PER_USER;
    if let Ok(socket) = std::env::var(PROBE_ENV) {
        match Function::attach(Path::new(&socket), "acme", "upper") {
            Ok(_) | Err(host_shim::AttachError::Refused(_)) => println!("PROBE served"),
            Err(e) => println!("PROBE not served: {e}"),
        }
        return;
    }
    let node = start_node("crowd");
    let socket = node.socket();
    let crowd: Vec<host_shim::sock::Conn> =
        (0..UNATTACHED_PER_USER).map(|_| host_shim::sock::Conn::connect(&socket).expect("connect")).collect();
    let n = |k: &str| dne_tests::cluster::status_number(&node.status(), k).unwrap_or(0);
    // Once the crowd has waited `UNATTACHED_GRACE`, root's next connection
    // is closed at once (attach finds it closed). Until then attaches are
    // served; one may be refused while host-shimd has not yet seen the
    // previous one detach ("client" has one instance).
    let mut e = None;
    wait_for("a connection beyond the idle crowd closed", WATCHDOG, || {
        e = Function::attach(&socket, "acme", "client").err().filter(|e| !matches!(e, AttachError::Refused(_)));
        e.is_some()
    });
    wait_for("the closed connection counted", WATCHDOG, || n("crowd_refused") >= 1);
    // Another user's is served.
    let Some(said) = probe_as_nobody("one_users_idle_connections_do_not_crowd_out_another_user", &node) else {
        return;
    };
    assert_eq!(said, "served");
    // Root attaches again once host-shimd saw its idle connections close
    // (an attach racing with that is still closed, and tried again).
    drop(crowd);
    let mut f = None;
    wait_for("an attach once the crowd is gone", WATCHDOG, || {
        f = Function::attach(&socket, "acme", "client").ok();
        f.is_some()
    });
}

/// host-shimd out of file descriptors (a client opens connections and
/// leaves them idle) pauses accepting and serves on: before, the failed
/// accept ended the process (under systemd: a restart with new pools, every
/// function of the node cut off). Connections that do not attach within
/// `ATTACH_WITHIN` are dropped, which gives their descriptors back.
#[test]
fn running_out_of_descriptors_pauses_accepting_and_host_shimd_serves_on() {
    // Room for host-shimd's own descriptors and a few dozen clients.
    let mut node = start_node_under("accept-fail", &["prlimit", "--nofile=48:48", "--"]);
    let socket = node.socket();
    let count = |node: &Node, k: &str| dne_tests::cluster::status_number(&node.status(), k).unwrap_or(0);
    let mut client = Function::attach(&socket, "acme", "client").unwrap();
    // More connections than descriptors left (the rest wait in the
    // listen backlog).
    let mut idle: Vec<host_shim::sock::Conn> =
        (0..60).map(|_| host_shim::sock::Conn::connect(&socket).expect("connect")).collect();
    wait_for("a failed accept counted", WATCHDOG, || count(&node, "accept_failed") >= 1);
    assert!(node.shimd.is_running(), "host-shimd exited");
    // It still answers the attached client (a lookup: no instance).
    let m = client.alloc(8).unwrap();
    let e = client.send(m, "upper").unwrap_err();
    assert!(matches!(e.kind, SendErrorKind::NoInstance), "{e:?}");
    client.free(e.msg.unwrap()).unwrap();
    // Half the idle connections close: it accepts again.
    idle.truncate(30);
    let upper = Function::attach(&socket, "acme", "upper").expect("attach once descriptors are free");
    // The others never attach: dropped in time.
    wait_for("idle connections dropped", WATCHDOG, || count(&node, "idle_dropped") >= 1);
    assert!(node.shimd.is_running(), "host-shimd exited");
    drop((upper, idle));
}

/// Allocates from `prod`'s pool until it gets buffer `i`, frees the
/// others, and hands `i` over to the function in `slot` without pushing
/// it (a sender between its hand-over and its push).
fn hand_over_again(prod: &Function, i: u32, slot: u16) {
    let me = wire::Owner::Held(prod.info().slot);
    let mut others = Vec::new();
    let lease = loop {
        let l = prod.pool().alloc(8, me).unwrap();
        if l.head() == i {
            break l;
        }
        others.push(l);
    };
    for l in others {
        prod.pool().free(l).unwrap();
    }
    prod.pool().hand_over(lease, wire::Owner::Function(slot)).map_err(|(_, e)| e).unwrap();
}

/// host-shimd's look for orphans after a death is about the rings as they
/// were at the death: when a function in the noted ring's slot detached
/// and another attached in that slot meanwhile, a buffer handed to the new
/// one (its sender between handing it over and pushing it) is not the old
/// one's orphan. Before, the look went by slot and freed it.
#[test]
fn a_slot_attached_again_is_not_looked_at_for_the_old_functions_orphans() {
    use wire::Owner;
    let node = start_node("slot-again");
    let mut prod = Function::attach(&node.socket(), "acme", "client").unwrap();
    let me = Owner::Held(prod.info().slot);
    let a = Function::attach(&node.socket(), "acme", "upper").unwrap();
    let slot = a.info().slot;
    // Handed to `a`, not pushed (a sender between the two steps).
    let (lease, _) = prod.alloc(8).unwrap().into_parts();
    let (i, _) = prod.pool().hand_over(lease, Owner::Function(slot)).map_err(|(_, e)| e).unwrap();
    // A death in the tenant: host-shimd notes `a`'s ring, with `i` handed.
    drop(Function::attach(&node.socket(), "acme", "hoarder").unwrap());
    // `a` leaves (its buffers, `i` too, are freed) and another function
    // gets its slot.
    drop(a);
    let n = |k: &str| dne_tests::cluster::status_number(&node.status(), k).unwrap_or(0);
    // Both slots back (the hoarder's, then `a`'s, which is given out next).
    wait_for("the slots of the two that left free again", WATCHDOG, || {
        n("deaths") == 2 && node.status().contains("\"cooling\":0")
    });
    let b = Function::attach(&node.socket(), "acme", "rot13").unwrap();
    assert_eq!(b.info().slot, slot, "the slot freed last is given out first");
    // `i` again, handed to the new function, not pushed yet.
    hand_over_again(&prod, i, slot);
    // Both looks (one per death) done.
    wait_for("host-shimd's looks after the deaths", WATCHDOG, || n("hole_checks") >= 2);
    assert_eq!(prod.pool().owner(i).unwrap(), Owner::Function(slot), "{}", node.status());
    let back = prod.pool().take_back(i, 8, Owner::Function(slot), me).unwrap();
    prod.pool().free(back).unwrap();
    drop(b);
}

/// host-shimd's look for orphans after a death frees only buffers that
/// were handed over and named by no descriptor at the death: a buffer
/// whose message was in its receiver's ring then is delivered, whatever
/// becomes of it. Here the receiver takes and frees it, a live sender
/// takes the same buffer again and hands it to the same receiver, and is
/// between its hand-over and its push when the look comes. Before, the
/// look (by index, against the ring of that moment) freed it, and the
/// sender's message was lost (or another message's buffer accepted under
/// its descriptor).
#[test]
fn a_buffer_delivered_at_a_death_and_handed_again_is_not_its_orphan() {
    use wire::Owner;
    let node = start_node("recycled");
    let mut prod = Function::attach(&node.socket(), "acme", "client").unwrap();
    let mut a = Function::attach(&node.socket(), "acme", "upper").unwrap();
    let slot = a.info().slot;
    // A message on buffer `i`, in `a`'s ring.
    let m1 = prod.alloc(8).unwrap();
    let i = m1.desc().buf;
    prod.send(m1, "upper").unwrap();
    // A death in the tenant: host-shimd notes `a`'s ring, `i` in it.
    drop(Function::attach(&node.socket(), "acme", "hoarder").unwrap());
    let n = |k: &str| dne_tests::cluster::status_number(&node.status(), k).unwrap_or(0);
    wait_for("host-shimd saw the death", WATCHDOG, || n("deaths") >= 1);
    // `a` takes it and frees it to the shared pool.
    let (l, _) = a.recv_timeout(Some(WATCHDOG)).unwrap().expect("delivered").into_parts();
    a.pool().free(l).unwrap();
    // The sender takes `i` again and hands it to `a`, not pushed yet.
    let me = Owner::Held(prod.info().slot);
    hand_over_again(&prod, i, slot);
    wait_for("host-shimd's look after the death", WATCHDOG, || n("hole_checks") >= 1);
    assert_eq!(prod.pool().owner(i).unwrap(), Owner::Function(slot), "{}", node.status());
    assert_eq!(n("orphans"), 0, "{}", node.status());
    let back = prod.pool().take_back(i, 8, Owner::Function(slot), me).unwrap();
    prod.pool().free(back).unwrap();
}

/// A stopped host-shimd does not hang a function's lookup (nor the agent's
/// data-plane thread, which looks names up for every tenant) for ever: it
/// fails as `Shimd` after `ANSWER_WITHIN`, and once host-shimd runs again
/// the next lookup gets its own answer (the late one is skipped). Before,
/// the lookup waited as long as host-shimd stayed stopped.
#[test]
fn a_lookup_gives_up_on_a_stopped_host_shimd() {
    use nix::sys::signal::{Signal, kill};
    let node = start_node("shimd-stopped");
    let mut client = Function::attach(&node.socket(), "acme", "client").unwrap();
    let _upper = Function::attach(&node.socket(), "acme", "upper").unwrap();
    dne_tests::stop_process(node.shimd.pid());
    let pid = nix::unistd::Pid::from_raw(node.shimd.pid() as i32);
    // (The watchdog: host-shimd runs again in any case.)
    let (tx, rx) = std::sync::mpsc::channel::<()>();
    let resume = std::thread::spawn(move || {
        let _ = rx.recv_timeout(WATCHDOG / 2);
        kill(pid, Signal::SIGCONT).unwrap();
    });
    let m = client.alloc(8).unwrap();
    let e = client.send(m, "upper").expect_err("no answer from a stopped host-shimd");
    drop(tx);
    resume.join().unwrap();
    assert!(matches!(e.kind, SendErrorKind::Shimd(_)), "{:?}", e.kind);
    let m = e.msg.expect("the message handed back");
    client.send(m, "upper").expect("looked up once host-shimd runs");
}

/// A burst of attaches by one user (a node's functions started at once,
/// all as one service user) is served whatever its size: the per-user cap
/// counts only connections idle for `UNATTACHED_GRACE`. With the cap on
/// every unattached connection, 71 of these 200 were reset.
#[test]
fn a_burst_of_attaches_by_one_user_is_served() {
    let node = start_node("attach-burst");
    const N: usize = 200;
    let gate = std::sync::Arc::new(std::sync::Barrier::new(N));
    let attaches: Vec<_> = (0..N)
        .map(|_| {
            let (socket, gate) = (node.socket(), gate.clone());
            std::thread::spawn(move || {
                gate.wait();
                // (Refused is an answer too: served.)
                match Function::attach(&socket, "acme", "client") {
                    Ok(_) | Err(host_shim::AttachError::Refused(_)) => Ok(()),
                    Err(e) => Err(e.to_string()),
                }
            })
        })
        .collect();
    let failed: Vec<String> = attaches.into_iter().filter_map(|t| t.join().unwrap().err()).collect();
    let n = |k: &str| dne_tests::cluster::status_number(&node.status(), k).unwrap_or(0);
    assert!(
        failed.is_empty(),
        "{} of {N} not served (crowd_refused {}): {:?}",
        failed.len(),
        n("crowd_refused"),
        failed.first()
    );
}

/// An agent killed while taking a chain from its uplink (its accept had
/// moved the first buffers to itself, not yet the rest) leaves no buffer
/// behind: host-shimd consumes the descriptor it had taken and frees what
/// it held, and the rest of that chain, still recorded as handed to the
/// agent and named by no descriptor any more, is freed by the look after
/// the death. Before, the look was noted while the descriptor was still in
/// the uplink, so those buffers counted as delivered, and they stayed
/// handed to the agent for good (every later agent takes only what a
/// descriptor names).
#[test]
fn a_chain_the_agent_was_killed_taking_is_freed_whole() {
    use wire::Owner;
    use wire::segment::AGENT_SLOT;
    let node = start_node("agent-mid-accept");
    let mut client = Function::attach(&node.socket(), "acme", "client").unwrap();
    let agent = Function::attach_agent(&node.socket(), "acme").unwrap();
    // A three-buffer message into the uplink.
    let cap = client.pool().geometry().payload_cap();
    let m = client.alloc(2 * cap + 1).unwrap();
    let d = wire::Descriptor { tenant: client.info().tenant, buf: m.desc().buf, len: m.len(), ..Default::default() };
    client.send(m, wire::ctrl::AGENT_NAME).unwrap();
    let pool = agent.pool();
    let chain = pool.chain_of(&d);
    assert_eq!(chain.len(), 3);
    assert!(chain.iter().all(|&i| pool.owner(i) == Ok(Owner::Function(AGENT_SLOT))));
    // The agent's accept moved the head and was killed before the rest.
    let _head_taken = pool.take_back(d.buf, 1, Owner::Function(AGENT_SLOT), Owner::Held(AGENT_SLOT)).unwrap();
    drop(agent);
    let n = |k: &str| dne_tests::cluster::status_number(&node.status(), k).unwrap_or(0);
    wait_for("host-shimd's look after the agent's death", WATCHDOG, || n("hole_checks") >= 1);
    let owners: Vec<_> = chain.iter().map(|&i| client.pool().owner(i)).collect();
    assert_eq!(owners, [Ok(Owner::Free); 3], "{}", node.status());
    assert_eq!(n("orphans"), 2, "{}", node.status());
}

/// A message whose descriptor fields no receiver accepts (a status
/// without the error flag, an unknown flag, a reserved field set) is
/// refused by the send and handed back, by `send` and by `send_batch`:
/// nothing is handed over. Before, it went into the receiver's ring, the
/// receiver dropped it (counted as `bad_status`, ...), and its buffers
/// stayed handed to the receiver, in no ring, while the sender had been
/// told it was sent.
#[test]
fn a_message_no_receiver_would_accept_is_handed_back_by_the_send() {
    let node = start_node("bad-fields");
    let mut client = Function::attach(&node.socket(), "acme", "client").unwrap();
    let mut upper = Function::attach(&node.socket(), "acme", "upper").unwrap();
    let free = free_or_cached(&client);
    let bad: [fn(&mut wire::Descriptor); 3] =
        [|d| d.status = 200, |d| d.flags |= 0x4000, |d| d.reserved = wire::desc::VOID_MARK];
    for (k, spoil) in bad.iter().enumerate() {
        let mut m = client.alloc(8).unwrap();
        spoil(m.desc_mut());
        let e = client.send(m, "upper").expect_err("a message no receiver accepts was sent");
        assert!(matches!(e.kind, SendErrorKind::BadDescriptor(_)), "{k}: {:?}", e.kind);
        client.free(e.msg.expect("handed back")).unwrap();
        // In a batch, behind a good message: the good one goes.
        let mut good = client.alloc(8).unwrap();
        client.write(&mut good, b"good one").unwrap();
        let mut m = client.alloc(8).unwrap();
        spoil(m.desc_mut());
        let mut batch = vec![good, m];
        let e = client.send_batch(&mut batch, "upper").expect_err("a batch with a bad message");
        assert!(matches!(e, SendErrorKind::BadDescriptor(_)), "{k}: {e:?}");
        assert_eq!(batch.len(), 1, "{k}: the bad message is handed back");
        client.free(batch.pop().unwrap()).unwrap();
        let got = upper.recv_timeout(Some(WATCHDOG)).unwrap().expect("the good message");
        assert_eq!(upper.read_to_vec(&got), b"good one");
        upper.free(got).unwrap();
    }
    assert!(upper.try_recv().is_none());
    assert!(upper.rejected().is_empty(), "{:?}", upper.rejected());
    drop(upper);
    assert_eq!(free_or_cached(&client), free, "every buffer back");
}

/// A receive whose timeout is longer than the clock can count
/// (`Duration::MAX`, "no limit") waits without one. Before, it panicked
/// adding the timeout to the clock, before looking at its ring.
#[test]
fn a_receive_with_a_timeout_of_duration_max_waits_without_a_limit() {
    let node = start_node("recv-max");
    let mut client = Function::attach(&node.socket(), "acme", "client").unwrap();
    let mut upper = Function::attach(&node.socket(), "acme", "upper").unwrap();
    let mut m = client.alloc(5).unwrap();
    client.write(&mut m, b"hello").unwrap();
    client.send(m, "upper").unwrap();
    let got = upper.recv_timeout(Some(Duration::MAX)).unwrap().expect("no limit is no timeout");
    assert_eq!(upper.read_to_vec(&got), b"hello");
    upper.free(got).unwrap();
}

/// Set when this test binary runs again as the misbehaving function of the
/// tests below: host-shimd's socket.
const MISBEHAVE_ENV: &str = "DNE_TEST_MISBEHAVE";

/// The misbehaving function (see [`spawn_misbehaving`]): attaches as
/// `upper`, holds three buffers of the pool, says which, sends host-shimd
/// bytes that are no control frame, and sleeps (its pool and ring still
/// mapped) until it is killed. It says nothing after sending: host-shimd
/// may kill it as soon as the bytes are sent, before it could print
/// another line (seen under a CPU hog).
fn misbehave(socket: &Path) -> ! {
    use std::os::fd::{AsFd, AsRawFd};
    let conn = hello_at(socket);
    let (ok, pool) = attach_by_hand(&conn);
    let held: Vec<String> =
        (0..3).map(|_| pool.alloc(8, wire::Owner::Held(ok.slot)).unwrap().head().to_string()).collect();
    // (A line of its own: the harness's "test ... " has no newline.)
    println!("\nATTACHED {} {}", ok.slot, held.join(" "));
    nix::sys::socket::send(conn.as_fd().as_raw_fd(), b"no control frame", nix::sys::socket::MsgFlags::empty()).unwrap();
    loop {
        std::thread::sleep(Duration::from_secs(1));
    }
}

/// Runs test `test` of this binary again as the misbehaving function of
/// `node` ([`misbehave`]), as this process's user; returns it once it
/// has attached (it sends its bad frame next, and may already be killed
/// for it: its lines stay readable), with its slot and the buffers it
/// holds. The callers wait for host-shimd to have seen the frame.
fn spawn_misbehaving(test: &str, node: &Node) -> (Proc, u16, Vec<u32>) {
    let mut cmd = Command::new(std::env::current_exe().unwrap());
    cmd.args(["--exact", test, "--nocapture", "--test-threads", "1"]).env(MISBEHAVE_ENV, node.socket());
    let mut p = Proc::spawn_lines("the misbehaving function", cmd);
    let line = p.wait_line("ATTACHED ", WATCHDOG);
    let mut words = line["ATTACHED ".len()..].split(' ').map(|w| w.parse::<u32>().unwrap());
    let slot = u16::try_from(words.next().unwrap()).unwrap();
    let held: Vec<u32> = words.collect();
    (p, slot, held)
}

/// A live function that sends host-shimd a bad control frame is dropped,
/// its ring closed, and killed (SIGKILL through its pidfd); its slot and
/// buffers are reclaimed once the process has exited, none leaked.
/// Before, host-shimd reclaimed them at once and gave the slot out again
/// after 200 ms while the process ran on, its pool and ring mapped.
#[test]
fn a_function_dropped_for_a_bad_frame_is_killed_and_reclaimed_once_gone() {
    use std::os::unix::process::ExitStatusExt;
    if let Some(socket) = std::env::var_os(MISBEHAVE_ENV) {
        misbehave(Path::new(&socket));
    }
    let node = start_node("bad-frame-kill");
    let client = Function::attach(&node.socket(), "acme", "client").unwrap();
    let (mut child, slot, held) =
        spawn_misbehaving("a_function_dropped_for_a_bad_frame_is_killed_and_reclaimed_once_gone", &node);
    let n = |k: &str| dne_tests::cluster::status_number(&node.status(), k).unwrap_or(0);
    let cooled = || n("deaths") == 1 && node.status().contains("\"cooling\":0");
    wait_for("the process gone, or its slot given out again", WATCHDOG, || !child.is_running() || cooled());
    assert!(!child.is_running(), "host-shimd freed slot {slot} of a process that still runs: {}", node.status());
    let out = child.wait_timeout(WATCHDOG);
    assert_eq!(out.status.signal(), Some(9), "killed by host-shimd: {out:?}");
    wait_for("its slot reclaimed", WATCHDOG, cooled);
    for &b in &held {
        assert_eq!(client.pool().owner(b), Ok(wire::Owner::Free), "buffer {b}: {}", node.status());
    }
    assert_eq!((n("bad_frames"), n("killed"), n("dropped")), (1, 1, 0), "{}", node.status());
    drop(client);
    wait_for("every buffer of the pool free", WATCHDOG, || {
        dne_tests::cluster::json_u64(&node.status(), "free") == Some(512)
    });
}

/// A dropped function host-shimd cannot kill (host-shimd runs as uid
/// 65534, the function as root) keeps its slot, its instance and its
/// buffers for as long as it runs: nothing of it is handed to another
/// function, and host-shimd reports it once it has run `KILL_WAIT`
/// past the drop. Once it exits, all is reclaimed, none leaked. Before,
/// its buffers were freed at the drop and its slot given to the next
/// function. Root only (it says it skips otherwise).
#[test]
fn a_dropped_function_that_cannot_be_killed_keeps_its_slot_until_it_exits() {
    use wire::Owner;
    if let Some(socket) = std::env::var_os(MISBEHAVE_ENV) {
        misbehave(Path::new(&socket));
    }
    if !dne_tests::cluster::is_root() {
        eprintln!("skipped: needs root (to run host-shimd as another user than the function)");
        return;
    }
    let node = start_node_as("bad-frame-alive", 65534);
    let client = Function::attach(&node.socket(), "acme", "client").unwrap();
    let (mut child, slot, held) =
        spawn_misbehaving("a_dropped_function_that_cannot_be_killed_keeps_its_slot_until_it_exits", &node);
    let n = |k: &str| dne_tests::cluster::status_number(&node.status(), k).unwrap_or(0);
    let cooled = || n("deaths") == 1 && node.status().contains("\"cooling\":0");
    wait_for("the drop seen through", WATCHDOG, || n("dropped") == 1 || cooled());
    assert!(child.is_running(), "host-shimd could not kill it");
    for &b in &held {
        assert_eq!(client.pool().owner(b), Ok(Owner::Held(slot)), "buffer {b} of a live process: {}", node.status());
    }
    let other = Function::attach(&node.socket(), "acme", "rot13").unwrap();
    assert_ne!(other.info().slot, slot, "the slot of a live process given out again: {}", node.status());
    let again = Function::attach(&node.socket(), "acme", "upper").map(drop);
    assert!(matches!(again, Err(AttachError::Refused(ErrorCode::Overloaded))), "its instance: {again:?}");
    wait_for("the process reported as running on", WATCHDOG, || n("overdue") == 1);
    for &b in &held {
        assert_eq!(client.pool().owner(b), Ok(Owner::Held(slot)), "buffer {b} of a live process: {}", node.status());
    }
    assert_eq!((n("killed"), n("deaths")), (0, 0), "{}", node.status());
    child.kill9();
    wait_for("its slot reclaimed", WATCHDOG, || n("dropped") == 0 && cooled());
    for &b in &held {
        assert_eq!(client.pool().owner(b), Ok(Owner::Free), "buffer {b}: {}", node.status());
    }
    let upper = Function::attach(&node.socket(), "acme", "upper").expect("its instance free again");
    drop((upper, other, client));
    wait_for("every buffer of the pool free", WATCHDOG, || {
        dne_tests::cluster::json_u64(&node.status(), "free") == Some(512)
    });
}

/// How long a caller waits here for the answer to a call its callee died
/// with (a watchdog: host-shimd answers within its reclaim grace, 200 ms).
const DEAD_CALL_ANSWER: Duration = Duration::from_secs(10);

/// Calls a function sends to another that dies before taking them (here:
/// stopped with SIGSTOP while they queue in its ring, then killed) are
/// answered `PeerDied` to their caller by host-shimd as it reclaims the
/// dead instance, each the call itself, whole (its payload back to its
/// caller), and no buffer is lost. Before, host-shimd freed them with everything
/// else the instance owned, and the caller waited for ever (here: no
/// answer within the watchdog).
#[test]
fn calls_waiting_in_the_ring_of_a_function_that_dies_are_answered_peer_died() {
    let mut node = start_node("dead-ring");
    let mut client = Function::attach(&node.socket(), "acme", "client").unwrap();
    let total = free_or_cached(&client);
    let i = node.start_fn("upper", "upper", None, 0);
    dne_tests::stop_process(node.fns[i].pid());
    let calls: Vec<u32> = (100..105).collect();
    for &r in &calls {
        // Two buffers each, both back in the error.
        let mut m = client.alloc(20_000).unwrap();
        client.write(&mut m, &[r as u8; 20_000]).unwrap();
        m.set_request(r);
        client.send(m, "upper").unwrap();
    }
    node.fns[i].kill9();
    let mut answered = Vec::new();
    for _ in &calls {
        let m = client
            .recv_timeout(Some(DEAD_CALL_ANSWER))
            .unwrap()
            .unwrap_or_else(|| panic!("no answer; answered so far {answered:?}; {}", node.status()));
        let d = *m.desc();
        assert_eq!(d.error_code(), Some(ErrorCode::PeerDied), "{d:?}");
        assert_eq!(d.flags & wire::DescFlags::REPLY, 0, "to the calling function, not an ingress: {d:?}");
        assert_eq!((d.dst_fn, d.src_fn, d.len), (client.info().function, client.info().function, 20_000), "{d:?}");
        assert!(client.read_to_vec(&m).iter().all(|&b| b == d.request as u8), "the call's payload comes back: {d:?}");
        answered.push(d.request);
        client.free(m).unwrap();
    }
    answered.sort_unstable();
    assert_eq!(answered, calls);
    assert!(client.try_recv().is_none(), "one answer per call");
    wait_for("every buffer back", WATCHDOG, || free_or_cached(&client) == total);
    // (host-shimd's status file is rewritten a moment after it counts.)
    let n = |k: &str| dne_tests::cluster::status_number(&node.status(), k);
    wait_for("host-shimd to count 5 answered", WATCHDOG, || (n("answered"), n("unanswered")) == (Some(5), Some(0)));
}

/// Calls the agent delivered to a function that dies before taking them
/// are answered `PeerDied` through the agent's uplink, routed as the
/// agent's engine answers a call it could not deliver: the call of an
/// ingress as a reply to it (`REPLY`, its `origin` kept), the call of a
/// function on another node as an error for that function, the call
/// itself (the agent sends it by its head buffer to the node the call
/// came from).
/// Before, both were freed, and their callers waited for their timeouts
/// (here: nothing in the uplink within the watchdog).
#[test]
fn calls_from_the_agent_waiting_in_a_dead_functions_ring_are_answered_through_the_uplink() {
    let mut node = start_node("dead-ring-agent");
    let cfg = config::Cluster::load(Path::new(&node.config())).unwrap();
    let far = cfg.function_id("far").unwrap();
    let mut agent = Function::attach_agent(&node.socket(), "acme").unwrap();
    let total = free_or_cached(&agent);
    let i = node.start_fn("upper", "upper", None, 0);
    dne_tests::stop_process(node.fns[i].pid());
    // From an ingress (node n2 here stands for it): request 1.
    let mut m = agent.alloc(100).unwrap();
    m.set_request(1);
    m.desc_mut().origin = 1;
    m.desc_mut().src_fn = far;
    agent.send(m, "upper").unwrap();
    // From function `far` on n2, no reply expected by an ingress: request 2.
    let mut m = agent.alloc(40_000).unwrap();
    m.set_request(2);
    m.desc_mut().src_fn = far;
    let head = m.desc().buf;
    agent.send(m, "upper").unwrap();
    // From an ingress no node of the cluster is (a peer wrote its origin
    // wrong): the agent would drop its answer, so it is not answered.
    let mut m = agent.alloc(100).unwrap();
    m.set_request(3);
    m.desc_mut().origin = 999;
    m.desc_mut().src_fn = far;
    agent.send(m, "upper").unwrap();
    node.fns[i].kill9();
    let mut answers = Vec::new();
    for _ in 0..2 {
        let m = agent
            .recv_timeout(Some(DEAD_CALL_ANSWER))
            .unwrap()
            .unwrap_or_else(|| panic!("no answer in the uplink; so far {answers:?}; {}", node.status()));
        answers.push(*m.desc());
        agent.free(m).unwrap();
    }
    answers.sort_by_key(|d| d.request);
    let error = wire::DescFlags::ERROR;
    let died = ErrorCode::PeerDied as u8;
    let ingress = answers[0];
    assert_eq!(
        (ingress.request, ingress.flags, ingress.status, ingress.origin, ingress.len),
        (1, error | wire::DescFlags::REPLY, died, 1, 100),
        "{ingress:?}"
    );
    let function = answers[1];
    assert_eq!(
        (function.request, function.flags, function.status, function.dst_fn, function.buf, function.len),
        (2, error, died, far, head, 40_000),
        "{function:?}"
    );
    wait_for("every buffer back", WATCHDOG, || free_or_cached(&agent) == total);
    assert!(agent.try_recv().is_none(), "no answer for the call of no node");
    // (host-shimd's status file is rewritten a moment after it counts.)
    let n = |k: &str| dne_tests::cluster::status_number(&node.status(), k);
    wait_for("host-shimd to count 2 answered, 1 not", WATCHDOG, || {
        (n("answered"), n("unanswered")) == (Some(2), Some(1))
    });
}

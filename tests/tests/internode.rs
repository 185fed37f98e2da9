//! Two nodes, each with host-shimd and an agent, as real processes:
//! messages and chains from 1 B to 1 MiB cross the emulated fabric intact
//! in both directions; a destination with no live instance comes back to
//! the sender as an error descriptor; tenants stay apart. In emulated mode
//! (the agent attached to host-shimd's shared memory) and in DPU mode (the
//! agent behind emulated comch, over pools it imported and never reads).
//! Every wait has a watchdog; nothing asserts on time.

use dne_tests::cluster::Cluster;
use host_shim::Function;
use nix::sys::signal::Signal;
use std::path::Path;
use std::time::Duration;
use wire::{DescFlags, ErrorCode};

const WATCHDOG: Duration = Duration::from_secs(60);

const TENANTS_AND_FUNCTIONS: &str = r#"
[[tenant]]
name = "acme"
weight = 1
buffers = 1024
recv_quota = 256
max_chain = 128

[[tenant]]
name = "globex"
weight = 1
buf_size = 4096
buffers = 256
recv_quota = 32

[[function]]
name = "client"
tenant = "acme"
node = "n0"

[[function]]
name = "sink"
tenant = "acme"
node = "n0"

[[function]]
name = "upper"
tenant = "acme"
node = "n1"

[[function]]
name = "ghost"
tenant = "acme"
node = "n1"

[[function]]
name = "gclient"
tenant = "globex"
node = "n0"

[[function]]
name = "gecho"
tenant = "globex"
node = "n1"
"#;

fn pattern(len: usize, seed: usize) -> Vec<u8> {
    (0..len).map(|i| b"abcdefghijklmnopqrstuvwxyz"[(i * 7 + seed) % 26]).collect()
}

fn config_path(c: &Cluster) -> &Path {
    &c.config
}

#[test]
fn messages_and_chains_cross_nodes_intact_and_errors_come_back() {
    chains_and_errors("emulated", 1);
}

#[test]
fn dpu_mode_messages_and_chains_cross_nodes_intact_and_errors_come_back() {
    chains_and_errors("dpu", 1);
}

/// Agents with two data-plane cores (`--cores 2`): acme on core 0, globex
/// on core 1, each with its own fabric port; the same traffic crosses.
#[test]
fn two_cores_per_agent_carry_every_tenant() {
    chains_and_errors("emulated", 2);
}

#[test]
fn dpu_mode_two_cores_per_agent_carry_every_tenant() {
    chains_and_errors("dpu", 2);
}

fn chains_and_errors(mode: &'static str, cores: u16) {
    let name = format!("internode-{mode}-{cores}");
    let mut c = Cluster::start_cores(&name, 2, mode, cores, TENANTS_AND_FUNCTIONS);
    assert!(config_path(&c).exists());
    // n0: client -> (fabric) -> n1: upper -> (fabric) -> n0: sink.
    c.start_fn(1, "acme", "upper", "upper", Some("sink"));
    let mut client = c.attach(0, "acme", "client");
    let mut sink = c.attach(0, "acme", "sink");
    let cap = client.pool().geometry().payload_cap() as usize;
    let sizes = [0, 1, 100, 4000, cap, cap + 1, 3 * cap + 17, 100_000, 1 << 20];
    for (k, &len) in sizes.iter().enumerate() {
        let data = pattern(len, k);
        let mut m = client.alloc(len as u32).expect("alloc");
        client.write(&mut m, &data).unwrap();
        m.set_request(k as u32);
        client.send(m, "upper").expect("send to a remote function");
        let got = sink.recv_timeout(Some(WATCHDOG)).unwrap().expect("the message came back");
        assert_eq!(got.request(), k as u32);
        assert_eq!(got.desc().flags & DescFlags::ERROR, 0, "{len} B: {:?}", got.desc());
        assert_eq!(sink.read_to_vec(&got), data.to_ascii_uppercase(), "{len} B arrive intact");
        assert_eq!(got.src_fn(), 2, "the sender is upper (function 2)");
        sink.free(got).unwrap();
    }

    // A burst: 200 messages in flight at once, all arrive, in order.
    for k in 0..200u32 {
        let mut m = client.alloc(64).unwrap();
        client.write(&mut m, &pattern(64, k as usize)).unwrap();
        m.set_request(1000 + k);
        let mut m = Some(m);
        while let Some(x) = m.take() {
            if let Err(e) = client.send(x, "upper") {
                assert!(matches!(e.kind, host_shim::SendErrorKind::Full), "{e}");
                m = e.msg;
                std::thread::sleep(Duration::from_micros(100));
            }
        }
    }
    // Unread, the burst waits in sink's ring: n0's agent reports the depth
    // (in emulated mode: it sees the rings).
    let depth = |c: &Cluster| c.metric(0, "dne_agent_function_queue_depth", &[("function", "sink")]).unwrap_or(0.0);
    let start = std::time::Instant::now();
    while mode == "emulated" && depth(&c) < 1.0 {
        assert!(start.elapsed() < WATCHDOG, "watchdog: sink's queue depth\n{}", c.metrics_text(0));
        std::thread::sleep(Duration::from_millis(20));
    }
    for k in 0..200u32 {
        let got = sink.recv_timeout(Some(WATCHDOG)).unwrap().expect("burst message");
        assert_eq!(got.request(), 1000 + k, "in order per connection");
        sink.free(got).unwrap();
    }
    while depth(&c) > 0.0 {
        assert!(start.elapsed() < WATCHDOG, "watchdog: sink's queue drained\n{}", c.metrics_text(0));
        std::thread::sleep(Duration::from_millis(20));
    }

    // A remote function with no live instance: the message comes back to
    // the sender as an error descriptor.
    let m = client.alloc(10).unwrap();
    client.send(m, "ghost").expect("the agent takes it");
    let back = client.recv_timeout(Some(WATCHDOG)).unwrap().expect("an error descriptor");
    assert_ne!(back.desc().flags & DescFlags::ERROR, 0);
    assert_eq!(ErrorCode::from_u8(back.desc().status), Some(ErrorCode::PeerDied));
    client.free(back).unwrap();

    // Metrics count what happened, per tenant (in DPU mode host-shimd's
    // bridge finds that ghost has no instance, not the agent).
    let text = c.metrics_text(0);
    assert!(text.contains("dne_agent_fabric_tx_messages_total{"), "{text}");
    let text1 = c.metrics_text(1);
    assert!(mode == "dpu" || text1.contains("reason=\"no_instance\""), "{text1}");

    // An error for a caller that is gone by the time it arrives is dropped
    // and counted by the caller's agent, in both modes (in DPU mode the
    // bridge hands it back to the agent). n1 is stopped while the call is
    // on its way, so the caller is surely gone before the error is made.
    let no_instance = |c: &Cluster| {
        c.metric(0, "dne_agent_drops_total", &[("tenant", "acme"), ("reason", "no_instance")]).unwrap_or(0.0)
    };
    let before = no_instance(&c);
    let live = |c: &Cluster| dne_tests::cluster::status_number(&c.shimd_status(0), "live");
    let live_before = live(&c).expect("n0's host-shimd status says how many functions are live");
    c.signal_agent(1, Signal::SIGSTOP).unwrap();
    let m = client.alloc(10).unwrap();
    client.send(m, "ghost").expect("the agent takes it");
    drop(client);
    dne_tests::wait_for("client detached from n0's host-shimd", WATCHDOG, || live(&c) < Some(live_before));
    c.signal_agent(1, Signal::SIGCONT).unwrap();
    dne_tests::wait_for("n0's agent counts the error for the gone caller", WATCHDOG, || no_instance(&c) > before);
    if mode == "dpu" {
        dne_tests::wait_for("n0's bridge counts the error it handed back", WATCHDOG, || {
            let s = c.shimd_status(0);
            let bridge = s.find("\"bridge\":").map(|i| &s[i..]).unwrap_or_default();
            dne_tests::cluster::status_number(bridge, "handed_back").is_some_and(|n| n >= 1)
        });
    }
    if mode == "dpu" {
        let log = c.log_tail("agent-n1", 100);
        assert!(log.contains("host-shimd exported 2 tenant pools over comch"), "{log}");
    }

    // The other tenant, on the other core when there are two.
    c.start_fn(1, "globex", "gecho", "echo", Some("gclient"));
    let mut g = c.attach(0, "globex", "gclient");
    for (k, len) in [1usize, 5000, 60_000].into_iter().enumerate() {
        let data = pattern(len, k);
        let mut m = g.alloc(len as u32).unwrap();
        g.write(&mut m, &data).unwrap();
        g.send(m, "gecho").unwrap();
        let back = g.recv_timeout(Some(WATCHDOG)).unwrap().expect("gecho answered");
        assert_eq!(g.read_to_vec(&back), data, "{len} B of globex");
        g.free(back).unwrap();
    }
    let status = c.status(0);
    assert!(status.contains(&format!("\"cores\":{cores}")), "{status}");
    assert!(status.contains(&format!("\"name\":\"globex\",\"core\":{}", cores - 1)), "{status}");
    assert!(status.contains("\"name\":\"acme\",\"core\":0"), "{status}");
}

/// DPU mode: the agent holds host buffers (receives, sends) only as
/// `Owner::Agent` in the host's pool; when it dies, host-shimd's bridge
/// frees every one of them, and a new agent picks up where it left.
#[test]
fn dpu_mode_agent_restart_frees_what_it_held_and_recovers() {
    let mut c = Cluster::start_mode("dpu-restart", 2, "dpu", TENANTS_AND_FUNCTIONS);
    c.start_fn(1, "acme", "upper", "upper", Some("sink"));
    let mut client = c.attach(0, "acme", "client");
    let mut sink = c.attach(0, "acme", "sink");
    let agents_own = |f: &host_shim::Function| f.pool().count_owned(|o| o == wire::Owner::Agent);
    let round_trip = |client: &mut host_shim::Function, sink: &mut host_shim::Function, k: u32| {
        let data = pattern(50_000, k as usize);
        let mut m = client.alloc(50_000).unwrap();
        client.write(&mut m, &data).unwrap();
        m.set_request(k);
        client.send(m, "upper").unwrap();
        let got = sink.recv_timeout(Some(WATCHDOG)).unwrap().expect("upper answered");
        assert_eq!(got.request(), k);
        assert_eq!(sink.read_to_vec(&got), data.to_ascii_uppercase());
        sink.free(got).unwrap();
    };
    round_trip(&mut client, &mut sink, 1);
    assert!(agents_own(&client) > 0, "n0's agent holds receive buffers lent by the host");
    c.kill_agent(0);
    dne_tests::wait_for("n0's pool has no buffer left with the dead agent", WATCHDOG, || agents_own(&client) == 0);
    c.restart_agent(0);
    c.wait_conns(2);
    dne_tests::wait_for("the new agent borrowed receive buffers", WATCHDOG, || agents_own(&client) > 0);
    for k in 2..12 {
        round_trip(&mut client, &mut sink, k);
    }
    assert!(c.log_tail("shimd-n0", 50).contains("the agent went away"), "{}", c.log_tail("shimd-n0", 50));
    // host-shimd's status file shows its bridge: connected again, what it
    // freed for the dead agent, nothing refused.
    let start = std::time::Instant::now();
    loop {
        let s = c.shimd_status(0);
        let bridge = s.find("\"bridge\":").map(|i| &s[i..]).unwrap_or_default();
        let n = |k: &str| dne_tests::cluster::status_number(bridge, k);
        if bridge.contains("\"up\":true")
            // At least twice: a reconnect may also reach the dead agent's
            // listening socket while the kernel still tears it down.
            && n("connects").is_some_and(|k| k >= 2)
            && n("reclaimed").is_some_and(|r| r > 0)
            && n("refused") == Some(0)
            && n("delivered").is_some_and(|d| d >= 11)
        {
            break;
        }
        assert!(
            start.elapsed() < WATCHDOG,
            "watchdog: the bridge in host-shimd's status: {bridge}\n{}\n{}",
            c.log_tail("shimd-n0", 40),
            c.log_tail("agent-n0", 40)
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// DPU mode with a receive quota larger than one comch message can lend
/// at once (1014 buffers): the agent asks for, and host-shimd's bridge lends
/// and takes back, receive buffers in parts that fit. Before, the bridge
/// handed 2048 buffers to the agent and then sent a frame too large to go
/// out: the agent never got them, posted no receive, and nothing crossed.
#[test]
fn dpu_mode_a_receive_quota_beyond_one_comch_message_is_lent_in_parts() {
    let big =
        TENANTS_AND_FUNCTIONS.replacen("buffers = 1024\nrecv_quota = 256", "buffers = 4096\nrecv_quota = 1200", 1);
    assert_ne!(big, TENANTS_AND_FUNCTIONS);
    let mut c = Cluster::start_mode("dpu-big-lend", 2, "dpu", &big);
    c.start_fn(1, "acme", "upper", "upper", Some("sink"));
    let mut client = c.attach(0, "acme", "client");
    let mut sink = c.attach(0, "acme", "sink");
    for k in 0..20u32 {
        let data = pattern(3000, k as usize);
        let mut m = client.alloc(3000).unwrap();
        client.write(&mut m, &data).unwrap();
        m.set_request(k);
        client.send(m, "upper").unwrap();
        let got = sink.recv_timeout(Some(WATCHDOG)).unwrap().expect("upper answered");
        assert_eq!(sink.read_to_vec(&got), data.to_ascii_uppercase());
        sink.free(got).unwrap();
    }
    // Both bridges lent more than one frame carries, and refused nothing.
    for i in 0..2 {
        dne_tests::wait_for("the bridge lent the agent's whole target", WATCHDOG, || {
            let s = c.shimd_status(i);
            let bridge = s.find("\"bridge\":").map(|k| &s[k..]).unwrap_or_default();
            let n = |k: &str| dne_tests::cluster::status_number(bridge, k);
            n("lent").is_some_and(|l| l > wire::ctrl::MAX_LEND as u64) && n("refused") == Some(0)
        });
    }
}

#[test]
fn tenants_stay_apart_across_nodes() {
    tenants_apart("emulated");
}

#[test]
fn dpu_mode_tenants_stay_apart_across_nodes() {
    tenants_apart("dpu");
}

fn tenants_apart(mode: &'static str) {
    let mut c = Cluster::start_mode(&format!("internode-tenants-{mode}"), 2, mode, TENANTS_AND_FUNCTIONS);
    c.start_fn(1, "globex", "gecho", "echo", Some("gclient"));
    c.start_fn(1, "acme", "upper", "upper", Some("sink"));
    let mut g = c.attach(0, "globex", "gclient");
    let mut sink = c.attach(0, "acme", "sink");
    // globex cannot name acme's functions, on this node or another.
    let m = g.alloc(10).unwrap();
    let e = g.send(m, "upper").unwrap_err();
    assert!(matches!(e.kind, host_shim::SendErrorKind::TenantMismatch), "{e}");
    g.free(e.msg.unwrap()).unwrap();
    // Its own remote function answers, in its own pool (4 KiB buffers).
    let data = pattern(10_000, 3);
    let mut m = g.alloc(10_000).unwrap();
    assert_eq!(m.frags(), 3);
    g.write(&mut m, &data).unwrap();
    g.send(m, "gecho").unwrap();
    let back = g.recv_timeout(Some(WATCHDOG)).unwrap().expect("echo");
    assert_eq!(g.read_to_vec(&back), data);
    g.free(back).unwrap();
    assert!(sink.try_recv().is_none(), "nothing leaks into the other tenant");
}

const EDGE_CLUSTER: &str = r#"
[[tenant]]
name = "acme"
weight = 1
buffers = 1024
recv_quota = 256
max_chain = 128

[[function]]
name = "upper"
tenant = "acme"
node = "n1"

[[function]]
name = "rot13"
tenant = "acme"
node = "n0"

[[function]]
name = "nobody"
tenant = "acme"
node = "n1"

[[route]]
path = "/x"
tenant = "acme"
chain = ["upper", "rot13"]

[[route]]
path = "/dead"
tenant = "acme"
chain = ["nobody"]

[[route]]
path = "/near"
tenant = "acme"
chain = ["rot13"]

[[function]]
name = "lazy"
tenant = "acme"
node = "n1"

[[route]]
path = "/lazy"
tenant = "acme"
chain = ["lazy"]
timeout_ms = 300
"#;

fn rot13(b: u8) -> u8 {
    match b {
        b'a'..=b'z' => (b - b'a' + 13) % 26 + b'a',
        b'A'..=b'Z' => (b - b'A' + 13) % 26 + b'A',
        _ => b,
    }
}

/// The edge (the ingress's fabric side, here in the test process) sends
/// requests down a chain that crosses both nodes; the last function's reply
/// comes back to it, matched by request id; a chain whose function has no
/// instance answers with an error.
/// DPU mode: host-shimd (and with it its bridge) dies and comes back; the
/// agent sees comch go, drops the pools it imported, takes the new ones
/// from the new host-shimd, and traffic flows again.
#[test]
fn dpu_mode_host_shimd_restart_recovers() {
    dpu_mode_host_shimd_goes_and_comes_back("dpu-shimd-restart", Cluster::kill_shimd);
}

/// The same with host-shimd stopped cleanly (SIGTERM), marking the rings it
/// made abandoned while its bridge may still be delivering into them.
#[test]
fn dpu_mode_host_shimd_stopped_cleanly_recovers() {
    dpu_mode_host_shimd_goes_and_comes_back("dpu-shimd-stop", Cluster::stop_shimd);
}

/// The DPU-mode restart tests above: n1's host-shimd goes away by `gone`.
fn dpu_mode_host_shimd_goes_and_comes_back(name: &str, gone: fn(&mut Cluster, usize)) {
    let mut c = Cluster::start_mode(name, 2, "dpu", TENANTS_AND_FUNCTIONS);
    let upper = c.start_fn(1, "acme", "upper", "upper", Some("sink"));
    let mut client = c.attach(0, "acme", "client");
    let mut sink = c.attach(0, "acme", "sink");
    let round_trip = |client: &mut host_shim::Function, sink: &mut host_shim::Function, k: u32| {
        let data = pattern(20_000, k as usize);
        let mut m = client.alloc(20_000).unwrap();
        client.write(&mut m, &data).unwrap();
        m.set_request(k);
        client.send(m, "upper").unwrap();
        // The answer reaches sink; an error comes back to the client.
        let start = std::time::Instant::now();
        loop {
            if let Some(got) = sink.try_recv() {
                assert_eq!(got.request(), k);
                assert_eq!(sink.read_to_vec(&got), data.to_ascii_uppercase());
                sink.free(got).unwrap();
                return true;
            }
            if let Some(err) = client.try_recv() {
                assert_ne!(err.desc().flags & DescFlags::ERROR, 0, "{:?}", err.desc());
                assert_eq!(err.request(), k);
                client.free(err).unwrap();
                return false;
            }
            assert!(start.elapsed() < WATCHDOG, "watchdog: no answer and no error for {k}");
            std::thread::sleep(Duration::from_micros(200));
        }
    };
    assert!(round_trip(&mut client, &mut sink, 1));
    c.fns[upper].kill9();
    gone(&mut c, 1);
    c.restart_shimd(1);
    dne_tests::wait_for("n1's agent took the new host-shimd's pools", WATCHDOG, || {
        c.log_tail("agent-n1", 200).matches("host-shimd exported 2 tenant pools over comch").count() == 2
    });
    c.start_fn(1, "acme", "upper", "upper", Some("sink"));
    c.wait_conns(2);
    // The first messages may find the new upper not looked up yet by
    // n1's bridge, or the fabric link coming back: errors, never silence.
    let mut k = 2;
    let start = std::time::Instant::now();
    while !round_trip(&mut client, &mut sink, k) {
        assert!(start.elapsed() < WATCHDOG, "watchdog: traffic after the restart\n{}", c.log_tail("agent-n1", 40));
        k += 1;
        std::thread::sleep(Duration::from_millis(20));
    }
    for j in 0..10 {
        assert!(round_trip(&mut client, &mut sink, 1000 + j));
    }
}

#[test]
fn edge_requests_travel_a_chain_across_nodes_and_come_back() {
    edge_chain(false, "emulated");
}

/// The same with both worker nodes in DPU mode.
#[test]
fn dpu_mode_edge_requests_travel_a_chain_across_nodes_and_come_back() {
    edge_chain(false, "dpu");
}

/// The same with the edge driven as a task of a one-worker tokio runtime
/// (what the ingress process runs); outside a runtime that is a clear
/// error.
#[test]
fn edge_as_a_runtime_task_carries_the_same_chain() {
    edge_chain(true, "emulated");
}

/// Two worker nodes in `mode` (upper on n1, rot13 on n0) and an edge of
/// `buffers` buffers per tenant, for driving [`ingress::edge::Edge`]
/// directly: the edge's runtime directory (kept alive), the cluster, its
/// config and the edge's pools.
fn edge_cluster(
    name: &str,
    mode: &'static str,
    buffers: u32,
    more: &str,
) -> (dne_tests::TempDir, Cluster, std::sync::Arc<config::Cluster>, ingress::Pools) {
    edge_cluster_with(name, mode, buffers, more, &[])
}

/// [`edge_cluster`] with more options for n1's `upper` (`--delay-us N`).
fn edge_cluster_with(
    name: &str,
    mode: &'static str,
    buffers: u32,
    more: &str,
    upper: &[&str],
) -> (dne_tests::TempDir, Cluster, std::sync::Arc<config::Cluster>, ingress::Pools) {
    let edge_dir = dne_tests::TempDir::new(name);
    let ingress = format!(
        "{EDGE_CLUSTER}\n[[ingress]]\nname = \"edge\"\naddress = \"{}\"\nhttp = \"{}\"\nruntime_dir = \"{}\"\nbuffers = {buffers}\n{more}",
        dne_tests::free_port(),
        dne_tests::free_port(),
        edge_dir.path().display()
    );
    let mut c = Cluster::start_mode(name, 2, mode, &ingress);
    c.start_route_fn_with(1, "acme", "upper", "upper", upper);
    c.start_route_fn(0, "acme", "rot13", "rot13");
    let cfg = std::sync::Arc::new(config::Cluster::load(&c.config).unwrap());
    let pools = ingress::Pools::create(&cfg, "edge", buffers, shm::PagePolicy::Normal).unwrap();
    (edge_dir, c, cfg, pools)
}

/// The edge's answer to one call, polled (these tests run no runtime for
/// the caller); panics after [`WATCHDOG`].
fn wait_reply(mut rx: tokio::sync::oneshot::Receiver<ingress::edge::Reply>) -> ingress::edge::Reply {
    let end = std::time::Instant::now() + WATCHDOG;
    loop {
        match rx.try_recv() {
            Ok(r) => return r,
            Err(tokio::sync::oneshot::error::TryRecvError::Empty) => {
                assert!(std::time::Instant::now() < end, "watchdog: no reply");
                std::thread::sleep(Duration::from_millis(1));
            }
            Err(e) => panic!("{e}"),
        }
    }
}

fn edge_chain(task: bool, mode: &'static str) {
    use ingress::edge::{Edge, EdgeError};
    use ingress::pool::INGRESS_SLOT as EDGE_SLOT;
    let (_edge_dir, c, cfg, pools) = edge_cluster(&format!("edge-{mode}"), mode, 512, "");
    let tp = pools.get(0).unwrap().clone();
    let pool = tp.pool();
    let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(1).enable_all().build().unwrap();
    let edge = if task {
        let e = Edge::spawn(cfg.clone(), 0, pools.clone()).expect_err("no runtime entered");
        assert!(e.to_string().contains("tokio runtime"), "{e}");
        let _in = rt.enter();
        Edge::spawn(cfg.clone(), 0, pools).unwrap()
    } else {
        Edge::start(cfg.clone(), 0, pools).unwrap()
    };
    dne_tests::wait_for("the edge connected to both nodes", WATCHDOG, || edge.conns_up() == 2);
    c.wait_conns(2);
    let full = pool.free_buffers();
    for (k, len) in [1usize, 1000, 40_000, 1_000_000].into_iter().enumerate() {
        let data = pattern(len, k);
        let msg = dne_tests::request_envelope(&data);
        let mut lease = pool.alloc(msg.len() as u32, wire::Owner::Held(EDGE_SLOT)).unwrap();
        pool.write(&mut lease, &msg).unwrap();
        let (reply, desc) = wait_reply(edge.call(0, 0, 100 + k as u32, lease)).expect("a reply");
        assert_eq!(desc.request, 100 + k as u32);
        let bytes = pool.read_to_vec(reply.lease());
        let env = wire::http::decode(&[&bytes[..]]).expect("a response envelope");
        assert_eq!(env.status, Some(200));
        let body = &bytes[env.body_offset as usize..][..env.body_len as usize];
        let want: Vec<u8> = data.to_ascii_uppercase().into_iter().map(rot13).collect();
        assert_eq!(body, &want[..], "{len} B through upper (n1) and rot13 (n0)");
        drop(reply);
    }
    // A caller that goes away after its reply arrived, without reading it
    // (a client gone at that moment): the reply's buffers still come back.
    let unread = {
        let msg = dne_tests::request_envelope(b"unread");
        let mut lease = pool.alloc(msg.len() as u32, wire::Owner::Held(EDGE_SLOT)).unwrap();
        pool.write(&mut lease, &msg).unwrap();
        edge.call(0, 0, 200, lease)
    };
    let msg = dne_tests::request_envelope(b"after");
    let mut lease = pool.alloc(msg.len() as u32, wire::Owner::Held(EDGE_SLOT)).unwrap();
    pool.write(&mut lease, &msg).unwrap();
    drop(wait_reply(edge.call(0, 0, 201, lease)).expect("a reply"));
    std::thread::sleep(Duration::from_millis(100));
    drop(unread);
    // A chain whose function has no live instance: an error comes back.
    let lease = pool.alloc(10, wire::Owner::Held(EDGE_SLOT)).unwrap();
    let r = wait_reply(edge.call(0, 1, 7, lease));
    assert_eq!(r.err(), Some(EdgeError::Failed(wire::ErrorCode::PeerDied)));
    // Every buffer of the edge's pool is back (its receives stay posted).
    dne_tests::wait_for("the edge pool back to full", WATCHDOG, || pool.free_buffers() == full);
}

/// The edge's requests for a node that gives no credits (its agent
/// stopped) wait in their route's queue without holding back the same
/// tenant's requests for another node: at most the ingress's `route_queue`
/// of them (set to 100 here; the rest are refused as busy at once, so the
/// tenant's queue keeps room for its other routes); they fail at once when
/// that node goes down (instead of waiting forever): as unreachable those
/// never sent, as `PeerDied` those sent (they may have run); their
/// buffers all come back. (The credit wait is set beyond the test's
/// length; the next test is about it.)
#[test]
fn a_node_without_credits_holds_back_only_its_own_requests() {
    use ingress::edge::{Edge, EdgeError};
    use ingress::pool::INGRESS_SLOT as EDGE_SLOT;
    use tokio::sync::oneshot::error::TryRecvError;
    let more = "route_queue = 100\ncredit_wait_ms = 600000\n";
    let (_edge_dir, mut c, cfg, pools) = edge_cluster("edge-hol", "emulated", 2048, more);
    let tp = pools.get(0).unwrap().clone();
    let pool = tp.pool();
    let edge = Edge::start(cfg.clone(), 0, pools).unwrap();
    dne_tests::wait_for("the edge connected to both nodes", WATCHDOG, || edge.conns_up() == 2);
    c.wait_conns(2);
    let full = pool.free_buffers();
    let call = |route: u16, request: u32| {
        let msg = dne_tests::request_envelope(b"hol");
        let mut lease = pool.alloc(msg.len() as u32, wire::Owner::Held(EDGE_SLOT)).unwrap();
        pool.write(&mut lease, &msg).unwrap();
        edge.call(0, route, request, lease)
    };
    // The chain of route 0 starts on n1: stop its agent, then send more
    // than its credits allow.
    c.signal_agent(1, Signal::SIGSTOP).unwrap();
    // More than the tenant's whole queue.
    let far: Vec<_> = (0..1100).map(|k| call(0, 1000 + k)).collect();
    std::thread::sleep(Duration::from_millis(300));
    // Route 2 starts on n0: answered while n1's requests wait.
    let (reply, _) = wait_reply(call(2, 7)).expect("n0 answers while n1 is stopped");
    let bytes = pool.read_to_vec(reply.lease());
    assert!(bytes.ends_with(b"uby"), "rot13 of the body");
    drop(reply);
    let (mut unanswered, mut busy) = (Vec::new(), 0);
    for mut rx in far {
        match rx.try_recv() {
            Err(TryRecvError::Empty) => unanswered.push(rx),
            Ok(Err(EdgeError::Busy)) => busy += 1,
            _ => {}
        }
    }
    // What waits: the route's queue, and what n1's credits took in.
    let limit = cfg.ingresses[0].route_queue as usize;
    assert_eq!(limit, 100);
    let waiting = unanswered.len();
    assert!(waiting > limit && waiting <= limit + 128, "{waiting} wait for n1 (n1 gives the edge 128 credits)");
    assert!(busy >= 1100 - limit - 128, "the rest were refused as busy: {busy}");
    // n1 goes down: every one that waited for it fails now, sent or not.
    c.signal_agent(1, Signal::SIGKILL).unwrap();
    c.signal_agent(1, Signal::SIGCONT).ok();
    for rx in unanswered {
        match wait_reply(rx).err() {
            // Never sent.
            Some(EdgeError::Unreachable) => {}
            // Sent: its send failed with the link (n1 may have placed
            // it), or n1 took it (not here: n1 was stopped throughout).
            Some(EdgeError::Failed(wire::ErrorCode::PeerDied)) => {}
            other => panic!("a request waiting for n1 ended as {other:?}"),
        }
    }
    // Back up, the edge posts its receives toward n1 again: every request
    // buffer came back.
    c.restart_agent(1);
    dne_tests::wait_for("the edge reconnected to n1", WATCHDOG, || edge.conns_up() == 2);
    dne_tests::wait_for("the edge pool back to full", WATCHDOG, || pool.free_buffers() == full);
}

/// A request the node of its first function took (delivered to the
/// function, which is still at work) fails as `PeerDied` when that node
/// goes down (502 at the HTTP side: it may have run), not as
/// `Unreachable` (503, which invites the client to send it again).
#[test]
fn a_request_a_node_took_fails_as_peer_died_when_the_node_goes_down() {
    use ingress::edge::{Edge, EdgeError};
    use ingress::pool::INGRESS_SLOT as EDGE_SLOT;
    // n1's upper takes 60 s per message: it holds the request.
    let (_edge_dir, c, cfg, pools) = edge_cluster_with("edge-took", "emulated", 512, "", &["--delay-us", "60000000"]);
    let tp = pools.get(0).unwrap().clone();
    let pool = tp.pool();
    let edge = Edge::start(cfg, 0, pools).unwrap();
    dne_tests::wait_for("the edge connected to both nodes", WATCHDOG, || edge.conns_up() == 2);
    c.wait_conns(2);
    let msg = dne_tests::request_envelope(b"took");
    let mut lease = pool.alloc(msg.len() as u32, wire::Owner::Held(EDGE_SLOT)).unwrap();
    pool.write(&mut lease, &msg).unwrap();
    let rx = edge.call(0, 0, 77, lease);
    let delivered = || c.metric(1, "dne_agent_delivered_messages_total", &[("function", "upper")]).unwrap_or(0.0);
    dne_tests::wait_for("n1 delivered the request to upper", WATCHDOG, || delivered() >= 1.0);
    c.signal_agent(1, Signal::SIGKILL).unwrap();
    assert_eq!(wait_reply(rx).err(), Some(EdgeError::Failed(wire::ErrorCode::PeerDied)));
}

/// A request that waits its route's whole credit wait (`credit_wait_ms`,
/// 300 ms here) for a node of its first function to grant credits is
/// refused unsent, as `NoCredit` (503 with `Retry-After` at the HTTP
/// side), instead of waiting for its route's timeout: a stopped node keeps
/// its link up, so it is not unreachable. Those the node's credits took
/// are answered once it runs again; every buffer comes back.
#[test]
fn requests_waiting_beyond_the_credit_wait_are_refused_unsent() {
    use ingress::edge::{Edge, EdgeError};
    use ingress::pool::INGRESS_SLOT as EDGE_SLOT;
    use tokio::sync::oneshot::error::TryRecvError;
    let (_edge_dir, c, cfg, pools) = edge_cluster("edge-credit-wait", "emulated", 2048, "credit_wait_ms = 300\n");
    let tp = pools.get(0).unwrap().clone();
    let pool = tp.pool();
    let edge = Edge::start(cfg, 0, pools).unwrap();
    dne_tests::wait_for("the edge connected to both nodes", WATCHDOG, || edge.conns_up() == 2);
    c.wait_conns(2);
    let full = pool.free_buffers();
    // Route 0 starts on n1: stop its agent, then send more than its
    // credits allow (it grants the edge 128).
    c.signal_agent(1, Signal::SIGSTOP).unwrap();
    let mut far: Vec<_> = (0..200u32)
        .map(|k| {
            let msg = dne_tests::request_envelope(b"wait");
            let mut lease = pool.alloc(msg.len() as u32, wire::Owner::Held(EDGE_SLOT)).unwrap();
            pool.write(&mut lease, &msg).unwrap();
            Some(edge.call(0, 0, 1000 + k, lease))
        })
        .collect();
    let mut refused = 0;
    dne_tests::wait_for("a request refused for want of credits", WATCHDOG, || {
        for slot in &mut far {
            if let Some(rx) = slot {
                match rx.try_recv() {
                    Err(TryRecvError::Empty) => {}
                    Ok(Err(EdgeError::NoCredit)) => {
                        refused += 1;
                        *slot = None;
                    }
                    other => panic!("while n1 is stopped a request ended as {other:?}"),
                }
            }
        }
        refused > 0
    });
    c.signal_agent(1, Signal::SIGCONT).unwrap();
    let mut answered = 0;
    for rx in far.into_iter().flatten() {
        match wait_reply(rx) {
            Ok(_) => answered += 1,
            Err(EdgeError::NoCredit) => refused += 1,
            Err(e) => panic!("a request ended as {e:?}"),
        }
    }
    assert!(answered >= 1 && refused >= 1, "{answered} answered, {refused} refused");
    assert_eq!(answered + refused, 200);
    dne_tests::wait_for("the edge pool back to full", WATCHDOG, || pool.free_buffers() == full);
}

/// On a route whose timeout (500 ms here) is shorter than the ingress's
/// credit wait (1000 ms, the default), a request waiting for credits is
/// still refused 503 with `Retry-After`, before the route's timeout would
/// answer it 504 (no `Retry-After`): the edge waits for credits a little
/// less than the route's timeout. Through the ingress process; the node of
/// the route's function is stopped, so those its credits took get 504.
#[test]
fn a_route_shorter_than_the_credit_wait_still_answers_503_for_want_of_credits() {
    let edge = dne_tests::cluster::IngressSpec::new("http-brief", "");
    let http = edge.http;
    let brief = "\n[[route]]\npath = \"/brief\"\ntenant = \"acme\"\nchain = [\"upper\"]\ntimeout_ms = 500\n";
    let mut c = Cluster::start("http-brief", 2, &format!("{EDGE_CLUSTER}{brief}{}", edge.section()));
    c.start_route_fn(1, "acme", "upper", "upper");
    c.start_route_fn(0, "acme", "rot13", "rot13");
    c.start_ingress(&edge, "/brief", WATCHDOG);
    // upper runs on n1, which grants the edge 128 credits: stopped, it
    // takes that many requests and the rest wait for credits.
    c.signal_agent(1, Signal::SIGSTOP).unwrap();
    let clients: Vec<_> = (0..200)
        .map(|_| std::thread::spawn(move || dne_tests::http_post_full(http, "/brief", b"x").expect("an answer")))
        .collect();
    let answers: Vec<(u16, String)> = clients.into_iter().map(|t| t.join().unwrap()).map(|(c, h, _)| (c, h)).collect();
    c.signal_agent(1, Signal::SIGCONT).unwrap();
    let (mut refused, mut timed_out) = (0, 0);
    for (code, head) in &answers {
        match code {
            503 => {
                assert!(head.to_ascii_lowercase().contains("retry-after:"), "{head}");
                refused += 1;
            }
            504 => timed_out += 1,
            _ => panic!("while n1 is stopped a request got {head}"),
        }
    }
    assert!(refused >= 1, "{refused} refused for want of credits (503), {timed_out} timed out (504)");
}

/// Three nodes for the tests of one stopped peer: acme's client on n0
/// sends to far (n1) and near (n2); globex's gclient on n0 to gnear (n2).
/// Few credits per connection, so a stopped node runs out at once.
const THREE_NODES: &str = r#"
[[tenant]]
name = "acme"
weight = 1
buffers = 1024
recv_quota = 8
max_chain = 128

[[tenant]]
name = "globex"
weight = 1
buffers = 256
recv_quota = 16

[[function]]
name = "client"
tenant = "acme"
node = "n0"

[[function]]
name = "far"
tenant = "acme"
node = "n1"

[[function]]
name = "near"
tenant = "acme"
node = "n2"

[[function]]
name = "gclient"
tenant = "globex"
node = "n0"

[[function]]
name = "gnear"
tenant = "globex"
node = "n2"
"#;

/// Sends 64 bytes of pattern `k` from `f` to `to` as request `k`.
fn send(f: &mut host_shim::Function, to: &str, k: u32) {
    let mut m = f.alloc(64).unwrap();
    f.write(&mut m, &pattern(64, k as usize)).unwrap();
    m.set_request(k);
    f.send(m, to).expect("the agent takes it");
}

/// In a node's agent, a peer that grants no credits (its agent stopped)
/// holds back only the messages for it: the same tenant's messages to a
/// third node go on meanwhile, and the held ones all arrive, in order,
/// once the peer runs again.
#[test]
fn a_peer_without_credits_holds_back_only_its_own_messages() {
    let c = Cluster::start("internode-hol", 3, THREE_NODES);
    c.wait_mesh();
    let mut client = c.attach(0, "acme", "client");
    let mut far = c.attach(1, "acme", "far");
    let mut near = c.attach(2, "acme", "near");
    // Both peers work.
    send(&mut client, "far", 0);
    send(&mut client, "near", 1);
    for (f, k) in [(&mut far, 0), (&mut near, 1)] {
        let got = f.recv_timeout(Some(WATCHDOG)).unwrap().expect("delivered");
        assert_eq!(got.request(), k);
        f.free(got).unwrap();
    }
    // n1 stops: more messages for it than its credits, then one for n2.
    c.signal_agent(1, Signal::SIGSTOP).unwrap();
    const HELD: u32 = 100;
    for k in 0..HELD {
        send(&mut client, "far", 1000 + k);
    }
    std::thread::sleep(Duration::from_millis(100));
    send(&mut client, "near", 7);
    let got = near.recv_timeout(Some(Duration::from_secs(10)));
    // (The status is refreshed every 100 ms.)
    let end = std::time::Instant::now() + Duration::from_secs(10);
    let mut queued = c.tenant_status(0, "acme", "queue");
    while queued.is_none_or(|q| q == 0) && std::time::Instant::now() < end {
        std::thread::sleep(Duration::from_millis(20));
        queued = c.tenant_status(0, "acme", "queue");
    }
    c.signal_agent(1, Signal::SIGCONT).unwrap();
    let got = got.unwrap().expect("n2's message arrives while n1 is stopped");
    assert_eq!(got.request(), 7);
    near.free(got).unwrap();
    assert!(queued.is_some_and(|q| q > 0), "n1's messages waited in n0's agent: {queued:?}");
    for k in 0..HELD {
        let got = far.recv_timeout(Some(WATCHDOG)).unwrap().expect("every held message arrives");
        assert_eq!(got.request(), 1000 + k, "in order");
        far.free(got).unwrap();
    }
}

/// A node that takes nothing (its agent stopped) holds a bounded share of
/// a tenant's calls in another node's agent: beyond the tenant's
/// `node_queue` (the default, 1024), calls for it come back to the caller
/// as `Overloaded`,
/// and the tenant's calls to a third node still go. (Before, n0's agent
/// stopped reading the tenant's uplink once 4096 calls waited for n1, and
/// the tenant's calls to any node waited in the uplink behind them.)
#[test]
fn a_node_that_takes_nothing_holds_a_bounded_share_of_the_queue() {
    // acme with room for more calls than an agent queues for one node.
    let many = THREE_NODES.replacen("buffers = 1024\n", "buf_size = 1024\nbuffers = 16384\n", 1);
    assert_ne!(many, THREE_NODES);
    let c = Cluster::start("internode-share", 3, &many);
    let share = config::Cluster::load(&c.config).unwrap().tenants[0].node_queue;
    assert_eq!(share, 1024);
    c.wait_mesh();
    let mut client = c.attach(0, "acme", "client");
    let mut far = c.attach(1, "acme", "far");
    let mut near = c.attach(2, "acme", "near");
    c.signal_agent(1, Signal::SIGSTOP).unwrap();
    const N: u32 = 6000;
    let mut overloaded = 0;
    let end = std::time::Instant::now() + WATCHDOG;
    let drain = |client: &mut Function, overloaded: &mut u32| {
        while let Some(m) = client.try_recv() {
            assert_eq!(ErrorCode::from_u8(m.desc().status), Some(ErrorCode::Overloaded), "request {}", m.request());
            *overloaded += 1;
            client.free(m).unwrap();
        }
    };
    for k in 0..N {
        let mut m = Some(client.alloc(64).expect("a buffer (the agent holds only a share)"));
        m.as_mut().unwrap().set_request(k);
        while let Some(x) = m.take() {
            if let Err(e) = client.send(x, "far") {
                assert!(matches!(e.kind, host_shim::SendErrorKind::Full), "{e}");
                assert!(std::time::Instant::now() < end, "watchdog: the uplink stays full ({k} sent)");
                m = e.msg;
                drain(&mut client, &mut overloaded);
                std::thread::sleep(Duration::from_micros(200));
            }
        }
    }
    // n2 still gets the tenant's calls.
    send(&mut client, "near", 7);
    let got = near.recv_timeout(Some(WATCHDOG)).unwrap().expect("n2's call arrives while n1 is stopped");
    assert_eq!(got.request(), 7);
    near.free(got).unwrap();
    dne_tests::wait_for("the refused calls to come back", WATCHDOG, || {
        drain(&mut client, &mut overloaded);
        overloaded >= N - share - 8
    });
    // n1 runs again: what waited for it arrives.
    c.signal_agent(1, Signal::SIGCONT).unwrap();
    let mut arrived = 0;
    while arrived + overloaded < N {
        let m = far.recv_timeout(Some(WATCHDOG)).unwrap().expect("every call n0 kept arrives");
        far.free(m).unwrap();
        arrived += 1;
        drain(&mut client, &mut overloaded);
    }
    assert!(arrived >= share, "n0 kept its node_queue for n1: {arrived}");
}

/// A tenant whose large message is stuck waiting for credits (its peer's
/// agent stopped, the message's fragments queued at the fabric port) does
/// not hold the node's shared send budget from the other tenants: their
/// messages to another node go on.
#[test]
fn a_stalled_tenant_does_not_hold_the_send_budget_of_the_others() {
    stopped_node_holds_back_only_its_own("internode-budget", THREE_NODES);
}

/// Nor does a tenant whose messages are already on the wire to the stopped
/// node: with credits beyond the connection's send window and 32 KiB
/// buffers, what n0 posted before n1 stopped is more than the whole budget,
/// and a stopped process never acknowledges it (the emulated NIC
/// acknowledges what the peer process placed). Before, every tenant's
/// sends on n0 stopped until n1 ran again.
#[test]
fn sends_on_the_wire_to_a_stopped_node_do_not_hold_the_send_budget_of_the_others() {
    let cfg = THREE_NODES.replacen(
        "buffers = 1024\nrecv_quota = 8\n",
        "buf_size = 32768\nbuffers = 1024\nrecv_quota = 256\n",
        1,
    );
    assert_ne!(cfg, THREE_NODES);
    stopped_node_holds_back_only_its_own("internode-budget-wire", &cfg);
}

/// An agent told to stop (SIGTERM) answers the calls still waiting to be
/// sent with `Unreachable`, so their callers on its node hear at once.
/// Before, they were dropped with the engine and their callers waited for
/// replies that never came.
#[test]
fn an_agent_that_stops_answers_the_calls_it_had_not_sent() {
    stopping_agent_answers("internode-stop-answers", "emulated");
}

/// The same in DPU mode, where the answers go to host-shimd's bridge over
/// comch: the link's outbox is flushed before the agent stops (it was not
/// at first, and they were lost with it).
#[test]
fn dpu_mode_an_agent_that_stops_answers_the_calls_it_had_not_sent() {
    stopping_agent_answers("internode-stop-answers-dpu", "dpu");
}

fn stopping_agent_answers(name: &str, mode: &'static str) {
    let c = Cluster::start_mode(name, 3, mode, THREE_NODES);
    c.wait_mesh();
    let mut client = c.attach(0, "acme", "client");
    let mut far = c.attach(1, "acme", "far");
    send(&mut client, "far", 99);
    let m = far.recv_timeout(Some(WATCHDOG)).unwrap().expect("delivered before the stop");
    far.free(m).unwrap();
    // n1 takes nothing: beyond its credits (recv_quota 8) the calls wait
    // in n0's agent.
    c.signal_agent(1, Signal::SIGSTOP).unwrap();
    const CALLS: u32 = 30;
    for k in 0..CALLS {
        send(&mut client, "far", k);
    }
    let queued = || c.metric(0, "dne_agent_queue_depth", &[("tenant", "acme")]).unwrap_or(0.0);
    dne_tests::wait_for("calls waiting in n0's agent", WATCHDOG, || queued() > 0.0);
    c.signal_agent(0, Signal::SIGTERM).unwrap();
    let m = client.recv_timeout(Some(WATCHDOG)).unwrap().expect("an answer for a call n0 had not sent");
    assert_ne!(m.desc().flags & wire::DescFlags::ERROR, 0);
    assert_eq!(m.desc().status, wire::ErrorCode::Unreachable as u8);
    client.free(m).unwrap();
    c.signal_agent(1, Signal::SIGCONT).unwrap();
}

/// acme sends two 1 MiB messages to n1, whose agent is stopped; globex's
/// messages from n0 to n2 must go on meanwhile, and acme's arrive once n1
/// runs again.
fn stopped_node_holds_back_only_its_own(name: &str, cfg: &str) {
    let c = Cluster::start(name, 3, cfg);
    c.wait_mesh();
    let mut client = c.attach(0, "acme", "client");
    let mut far = c.attach(1, "acme", "far");
    let mut g = c.attach(0, "globex", "gclient");
    let mut gnear = c.attach(2, "globex", "gnear");
    // acme's connection to n1 is up, with its credits, before n1 stops.
    send(&mut client, "far", 99);
    let m = far.recv_timeout(Some(WATCHDOG)).unwrap().expect("delivered before the stop");
    far.free(m).unwrap();
    c.signal_agent(1, Signal::SIGSTOP).unwrap();
    // Two messages of 1 MiB for the stopped node: more than the whole
    // budget, and far more fragments than its credits.
    let big = pattern(1 << 20, 3);
    for k in 0..2 {
        let mut m = client.alloc(big.len() as u32).unwrap();
        client.write(&mut m, &big).unwrap();
        m.set_request(k);
        client.send(m, "far").expect("the agent takes it");
    }
    std::thread::sleep(Duration::from_millis(200));
    // The other tenant's messages to n2 go meanwhile.
    let mut got = Vec::new();
    for k in 0..20u32 {
        send(&mut g, "gnear", k);
        got.push(gnear.recv_timeout(Some(Duration::from_secs(10))));
    }
    c.signal_agent(1, Signal::SIGCONT).unwrap();
    for (k, r) in got.into_iter().enumerate() {
        let m = r.unwrap().unwrap_or_else(|| panic!("globex message {k} did not arrive while n1 was stopped"));
        assert_eq!(m.request(), k as u32);
        gnear.free(m).unwrap();
    }
    // And the stuck ones arrive once n1 runs again.
    for k in 0..2 {
        let m = far.recv_timeout(Some(WATCHDOG)).unwrap().expect("the large message arrives");
        assert_eq!(m.request(), k);
        assert!(far.read_to_vec(&m) == big);
        far.free(m).unwrap();
    }
}

/// The whole path: a real HTTP client, the ingress process, the fabric,
/// functions on both nodes, and back: bodies arrive transformed and intact;
/// edge statuses for an unknown route and a dead chain.
#[test]
fn http_requests_cross_the_cluster_through_the_ingress() {
    let edge = dne_tests::cluster::IngressSpec::new("http-edge", "");
    let http = edge.http;
    let mut c = Cluster::start("http", 2, &format!("{EDGE_CLUSTER}{}", edge.section()));
    c.start_route_fn(1, "acme", "upper", "upper");
    c.start_route_fn(0, "acme", "rot13", "rot13");
    c.start_ingress(&edge, "/x", WATCHDOG);
    for (k, len) in [0usize, 1, 1024, 100_000, 1_000_000].into_iter().enumerate() {
        let data = pattern(len, k);
        let (code, body) = dne_tests::http_post(http, "/x", &data).expect("an answer");
        assert_eq!(code, 200, "{len} B");
        let want: Vec<u8> = data.to_ascii_uppercase().into_iter().map(rot13).collect();
        assert_eq!(body, want, "{len} B through the cluster");
    }
    let (code, _) = dne_tests::http_post(http, "/nowhere", b"x").unwrap();
    assert_eq!(code, 404);
    let (code, _) = dne_tests::http_post(http, "/dead", b"x").unwrap();
    assert_eq!(code, 502, "a chain whose function has no instance");
    // A reply that comes after its route's timeout (lazy takes 1 s, the
    // route allows 300 ms): 504, and the late reply is dropped and counted.
    c.start_route_fn_with(1, "acme", "lazy", "echo", &["--delay-us", "1000000"]);
    let (code, _) = dne_tests::http_post(http, "/lazy", b"x").unwrap();
    assert_eq!(code, 504);
    let late = || {
        let (_, text) = dne_tests::http_get(http, "/metrics").unwrap_or_default();
        dne_tests::cluster::metric_value(&text, "dne_ingress_upstream_dropped_total", &[("reason", "late")])
    };
    dne_tests::wait_for("the late reply counted", WATCHDOG, || late() == Some(1.0));
}

const SPREAD_CLUSTER: &str = r#"
[[tenant]]
name = "acme"
weight = 1
buffers = 1024
recv_quota = 256
max_chain = 128

[[function]]
name = "upper"
tenant = "acme"
nodes = ["n0", "n1", "n2"]

[[function]]
name = "front"
tenant = "acme"
node = "n0"

[[function]]
name = "far"
tenant = "acme"
nodes = ["n1", "n2"]

[[route]]
path = "/spread"
tenant = "acme"
chain = ["upper"]

[[route]]
path = "/near"
tenant = "acme"
chain = ["front", "upper"]

[[route]]
path = "/far"
tenant = "acme"
chain = ["front", "far"]
"#;

/// Messages node `i`'s agent delivered to its instances of `function`.
fn delivered(c: &Cluster, i: usize, function: &str) -> u64 {
    c.metric(i, "dne_agent_delivered_messages_total", &[("function", function)]).unwrap_or(0.0) as u64
}

/// Posts to `path` until the agent of each of the first `nodes` nodes has
/// delivered `function` one more request: the ingress's own links come up
/// on their own time, after the agents report theirs.
fn until_every_node_answers(c: &Cluster, http: std::net::SocketAddr, path: &str, function: &str, nodes: usize) {
    let start: Vec<u64> = (0..nodes).map(|i| delivered(c, i, function)).collect();
    dne_tests::wait_for("the ingress reaches every node", WATCHDOG, || {
        assert_eq!(dne_tests::http_post(http, path, b"x").map(|r| r.0), Some(200));
        (0..nodes).all(|i| delivered(c, i, function) > start[i])
    });
}

/// What the agents of `nodes` delivered to `function` since `before`, once
/// the sum reaches `want` (the agents publish their counts every
/// millisecond or so, not at once).
fn delivered_since(c: &Cluster, function: &str, nodes: &[usize], before: &[u64], want: u64) -> Vec<u64> {
    let end = std::time::Instant::now() + WATCHDOG;
    loop {
        let got: Vec<u64> = nodes.iter().zip(before).map(|(&i, b)| delivered(c, i, function) - b).collect();
        if got.iter().sum::<u64>() >= want {
            return got;
        }
        assert!(std::time::Instant::now() < end, "watchdog: {function} got {got:?}, want {want} in all");
        std::thread::sleep(Duration::from_millis(5));
    }
}

/// A function placed on several nodes (`nodes = [...]`): the ingress
/// spreads a route's requests over the nodes of its first function; a
/// function calling it from a node that runs it stays on that node; a
/// function calling one that does not run on its node has its agent spread
/// the calls over that function's nodes; and when one of the nodes goes
/// away, its share goes to the others.
#[test]
fn a_function_on_several_nodes_takes_requests_on_each() {
    let edge = dne_tests::cluster::IngressSpec::new("spread-edge", "");
    let http = edge.http;
    let mut c = Cluster::start("spread", 3, &format!("{SPREAD_CLUSTER}{}", edge.section()));
    for i in 0..3 {
        c.start_route_fn(i, "acme", "upper", "upper");
    }
    c.start_route_fn(0, "acme", "front", "rot13");
    c.start_route_fn(1, "acme", "far", "upper");
    c.start_route_fn(2, "acme", "far", "upper");
    c.wait_conns(2);
    c.start_ingress(&edge, "/spread", WATCHDOG);
    // Every agent linked to the two other nodes and the ingress.
    c.wait_conns(3);
    let post = |path: &str, k: usize| {
        let data = pattern(1000, k);
        let (code, body) = dne_tests::http_post(http, path, &data).expect("an answer");
        (code, body, data)
    };

    until_every_node_answers(&c, http, "/spread", "upper", 3);

    // The ingress: the first function's three nodes in turn.
    let before: Vec<u64> = (0..3).map(|i| delivered(&c, i, "upper")).collect();
    for k in 0..60 {
        let (code, body, data) = post("/spread", k);
        assert_eq!(code, 200, "request {k}");
        assert_eq!(body, data.to_ascii_uppercase());
    }
    let got = delivered_since(&c, "upper", &[0, 1, 2], &before, 60);
    assert_eq!(got, [20, 20, 20], "one in three on each node");

    // front (n0) calling upper: n0 runs upper, so it stays on n0 (the
    // bodies say upper saw them).
    let before: Vec<u64> = (0..3).map(|i| delivered(&c, i, "upper")).collect();
    for k in 0..20 {
        let (code, body, data) = post("/near", k);
        assert_eq!(code, 200, "request {k}");
        assert_eq!(body, data.iter().map(|&b| rot13(b)).collect::<Vec<u8>>().to_ascii_uppercase());
    }
    // (Nothing to wait for: a count that would show up late is one that
    // the next part's wait would then see on n1 or n2 too.)
    let got: Vec<u64> = (0..3).map(|i| delivered(&c, i, "upper") - before[i]).collect();
    assert_eq!(got, [0, 0, 0], "handed to n0's upper through shared memory: no agent carries them");

    // front (n0) calling far, which runs on n1 and n2: n0's agent spreads.
    for k in 0..20 {
        let (code, _, _) = post("/far", k);
        assert_eq!(code, 200, "request {k}");
    }
    let got = delivered_since(&c, "far", &[1, 2], &[0, 0], 20);
    assert_eq!(got, [10, 10], "n0's agent takes n1 and n2 in turn");
    let got: Vec<u64> = (0..3).map(|i| delivered(&c, i, "upper") - before[i]).collect();
    assert_eq!(got, [0, 0, 0], "still none of /near's calls went through an agent");

    // n2 goes away: once the ingress has seen it go, every request is
    // answered by n0 and n1.
    c.kill_agent(2);
    let end = std::time::Instant::now() + WATCHDOG;
    let mut in_a_row = 0;
    while in_a_row < 10 {
        assert!(std::time::Instant::now() < end, "watchdog: the ingress keeps picking n2");
        in_a_row = if post("/spread", in_a_row).0 == 200 { in_a_row + 1 } else { 0 };
    }
    for k in 0..30 {
        assert_eq!(post("/spread", k).0, 200, "request {k} after n2 went away");
    }
}

const TWO_PLACES: &str = r#"
[[tenant]]
name = "acme"
weight = 1
buffers = 1024
recv_quota = 256
max_chain = 128

[[function]]
name = "caller"
tenant = "acme"
nodes = ["n0", "n1"]

[[function]]
name = "ghost"
tenant = "acme"
node = "n1"
"#;

#[test]
fn an_error_goes_back_to_the_node_of_the_sending_instance() {
    error_to_sending_node("emulated");
}

#[test]
fn dpu_mode_an_error_goes_back_to_the_node_of_the_sending_instance() {
    error_to_sending_node("dpu");
}

/// `caller` runs on n0 and n1; its instance on n0 calls `ghost` on n1,
/// which has no instance. The error comes back to n0, where the call came
/// from, not to n1's `caller` (which, by name, is the nearer instance).
/// In DPU mode it is n1's host-shimd bridge that finds no instance and
/// hands the error back to the agent.
fn error_to_sending_node(mode: &'static str) {
    let c = Cluster::start_mode(&format!("error-home-{mode}"), 2, mode, TWO_PLACES);
    c.wait_mesh();
    let mut here = c.attach(0, "acme", "caller");
    let mut there = c.attach(1, "acme", "caller");
    for k in 0..5u32 {
        let mut m = here.alloc(10).unwrap();
        m.set_request(k);
        here.send(m, "ghost").expect("the agent takes it");
        let back = here.recv_timeout(Some(WATCHDOG)).unwrap().expect("the error comes back to n0");
        assert_ne!(back.desc().flags & DescFlags::ERROR, 0, "{:?}", back.desc());
        assert_eq!(back.request(), k);
        here.free(back).unwrap();
    }
    assert!(there.try_recv().is_none(), "n1's caller sent nothing and gets nothing");
}

/// acme's `client` and `sink`, both on n0, and the function they call:
/// `callee` on `nodes` (TOML, `["n1", "n2"]`).
fn client_sink_cluster(callee: &str, nodes: &str) -> String {
    client_sink_cluster_on(callee, nodes, r#"["n0"]"#)
}

/// [`client_sink_cluster`] with `client` on `client_nodes`.
fn client_sink_cluster_on(callee: &str, nodes: &str, client_nodes: &str) -> String {
    format!(
        r#"
[[tenant]]
name = "acme"
weight = 1
buffers = 2048
recv_quota = 96
max_chain = 128

[[function]]
name = "client"
tenant = "acme"
nodes = {client_nodes}

[[function]]
name = "sink"
tenant = "acme"
node = "n0"

[[function]]
name = "{callee}"
tenant = "acme"
nodes = {nodes}
"#
    )
}

/// n0's agent binds a call to one of its function's nodes when it sends
/// it, not when the call arrives: with n2 stopped (so the credits it gave
/// n0 run out and none come back), n2 holds only the calls it had credits
/// for, and n1 answers every other call while n2 is still stopped. When n2
/// goes away, the calls it had taken come back as maybe-run (`PeerDied`),
/// none as unreachable.
#[test]
fn a_stalled_node_holds_only_the_calls_it_had_credits_for() {
    let mut c = Cluster::start("stalled-node", 3, &client_sink_cluster("far", r#"["n1", "n2"]"#));
    c.start_fn(1, "acme", "far", "echo", Some("sink"));
    c.start_fn(2, "acme", "far", "echo", Some("sink"));
    c.wait_mesh();
    let mut client = c.attach(0, "acme", "client");
    let mut sink = c.attach(0, "acme", "sink");
    c.signal_agent(2, Signal::SIGSTOP).unwrap();
    // n2 posts 48 receives for n0 (its quota of 96 over two peers).
    const N: u32 = 400;
    const N2_CREDITS: usize = 48;
    let (mut done, mut errors) = (std::collections::HashSet::new(), Vec::new());
    // Answers reach the sink, errors the client.
    let take =
        |client: &mut Function, sink: &mut Function, done: &mut std::collections::HashSet<u32>, errors: &mut Vec<_>| {
            if let Some(m) = sink.recv_timeout(Some(Duration::from_millis(1))).unwrap() {
                assert!(done.insert(m.request()), "request {} twice", m.request());
                sink.free(m).unwrap();
            }
            while let Some(m) = client.try_recv() {
                errors.push((m.request(), ErrorCode::from_u8(m.desc().status)));
                client.free(m).unwrap();
            }
        };
    for k in 0..N {
        let mut m = Some(client.alloc(64).unwrap());
        m.as_mut().unwrap().set_request(k);
        while let Some(x) = m.take() {
            if let Err(e) = client.send(x, "far") {
                assert!(matches!(e.kind, host_shim::SendErrorKind::Full), "{e}");
                m = e.msg;
                take(&mut client, &mut sink, &mut done, &mut errors);
            }
        }
    }
    let end = std::time::Instant::now() + WATCHDOG;
    while done.len() < N as usize - N2_CREDITS {
        assert!(
            std::time::Instant::now() < end,
            "watchdog: n1 answered {} of {N} while n2 is stopped (n2 may hold {N2_CREDITS}); errors {errors:?}",
            done.len()
        );
        take(&mut client, &mut sink, &mut done, &mut errors);
    }
    assert!(errors.is_empty(), "nothing fails while n2 is only stopped: {errors:?}");
    c.kill_agent(2);
    let end = std::time::Instant::now() + WATCHDOG;
    while done.len() + errors.len() < N as usize {
        assert!(std::time::Instant::now() < end, "watchdog: {} answered, {} errors", done.len(), errors.len());
        take(&mut client, &mut sink, &mut done, &mut errors);
    }
    let unreachable: Vec<u32> =
        errors.iter().filter(|(_, code)| *code != Some(ErrorCode::PeerDied)).map(|(r, _)| *r).collect();
    assert!(
        unreachable.is_empty(),
        "only what n2 had taken comes back, as maybe-run (PeerDied); {} came back otherwise: {unreachable:?}",
        unreachable.len()
    );
    assert!(errors.len() <= N2_CREDITS, "n2 took at most its credits: {} came back", errors.len());
}

#[test]
fn calls_to_a_function_without_a_live_local_instance_go_to_its_other_node() {
    local_instances_gone("emulated");
}

#[test]
fn dpu_mode_calls_to_a_function_without_a_live_local_instance_go_to_its_other_node() {
    local_instances_gone("dpu");
}

/// `svc` runs on n0 and n1, but n0 has no live instance of it: a caller on
/// n0 gets its calls answered by n1's instance (the agent stands in for the
/// missing local one) instead of `NoInstance`; once an instance attaches on
/// n0, the caller finds it again (within `STANDIN_TTL`) and its calls stay
/// on n0.
fn local_instances_gone(mode: &'static str) {
    let cluster = client_sink_cluster("svc", r#"["n0", "n1"]"#);
    let mut c = Cluster::start_mode(&format!("standin-{mode}"), 2, mode, &cluster);
    c.start_fn(1, "acme", "svc", "upper", Some("sink"));
    c.wait_mesh();
    let mut client = c.attach(0, "acme", "client");
    let mut sink = c.attach(0, "acme", "sink");
    let call = |client: &mut Function, k: u32| {
        let mut m = client.alloc(8).unwrap();
        client.write(&mut m, b"standin").unwrap();
        m.set_request(k);
        client.send(m, "svc").map_err(|e| e.kind).expect("svc has an instance on n1");
    };
    for k in 0..20 {
        call(&mut client, k);
        let m = sink.recv_timeout(Some(WATCHDOG)).unwrap().expect("n1's svc answers");
        assert_eq!((m.request(), &sink.read_to_vec(&m)[..]), (k, &b"STANDIN"[..]), "through n1's upper");
        sink.free(m).unwrap();
    }
    assert!(client.try_recv().is_none(), "no error came back");
    let sent_on = c.metric(0, "dne_agent_elsewhere_total", &[("tenant", "acme")]).unwrap_or(0.0);
    assert!(sent_on >= 20.0, "n0's agent counts the calls it sent on: {sent_on}");
    // An instance of svc attaches on n0: the caller finds it.
    let mut local = c.attach(0, "acme", "svc");
    let mut k = 100;
    let end = std::time::Instant::now() + WATCHDOG;
    loop {
        assert!(std::time::Instant::now() < end, "watchdog: the caller never found n0's instance");
        call(&mut client, k);
        k += 1;
        // Taken by the local instance, or answered through n1.
        let mut took = None;
        dne_tests::wait_for("the call to arrive", WATCHDOG, || {
            if let Some(m) = local.try_recv() {
                local.free(m).unwrap();
                took = Some(true);
            } else if let Some(m) = sink.try_recv() {
                sink.free(m).unwrap();
                took = Some(false);
            }
            took.is_some()
        });
        if took == Some(true) {
            break;
        }
    }
    for k in 1000..1010 {
        call(&mut client, k);
        let m = local.recv_timeout(Some(WATCHDOG)).unwrap().expect("the local instance takes the calls");
        assert_eq!(m.request(), k);
        local.free(m).unwrap();
    }
    assert!(sink.try_recv().is_none(), "nothing went to n1 once the local instance was found");
    // The local instance goes away: calls go to n1 again (those sent
    // before host-shimd noticed may be lost with the instance).
    drop(local);
    let end = std::time::Instant::now() + WATCHDOG;
    loop {
        assert!(std::time::Instant::now() < end, "watchdog: calls never went back to n1");
        let mut m = client.alloc(8).unwrap();
        client.write(&mut m, b"again").unwrap();
        if let Err(e) = client.send(m, "svc") {
            assert!(matches!(e.kind, host_shim::SendErrorKind::NoInstance), "{e}");
            if let Some(m) = e.msg {
                client.free(m).unwrap();
            }
        }
        if let Some(m) = sink.recv_timeout(Some(Duration::from_millis(20))).unwrap() {
            assert_eq!(sink.read_to_vec(&m), b"AGAIN");
            sink.free(m).unwrap();
            break;
        }
    }
}

#[test]
fn calls_reaching_a_node_without_an_instance_go_back_to_the_caller_node_and_on() {
    calls_elsewhere("emulated");
}

#[test]
fn dpu_mode_calls_reaching_a_node_without_an_instance_go_back_to_the_caller_node_and_on() {
    calls_elsewhere("dpu");
}

/// `far` runs on n1 and n2, with an instance on n2 only, and its caller is
/// on n0. n0's agent binds each call to n1 or n2; one that reaches n1
/// goes back to n0 (where an error about it must go: the caller could run
/// on several nodes) and from there to n2: every call is answered, none
/// fails. Once n2's instance is gone too, every call comes back to the
/// caller once, as `PeerDied` (sent on at most once, never lost).
fn calls_elsewhere(mode: &'static str) {
    let mut c =
        Cluster::start_mode(&format!("fn-elsewhere-{mode}"), 3, mode, &client_sink_cluster("far", r#"["n1", "n2"]"#));
    let far = c.start_fn(2, "acme", "far", "upper", Some("sink"));
    c.wait_mesh();
    let mut client = c.attach(0, "acme", "client");
    let mut sink = c.attach(0, "acme", "sink");
    let call = |client: &mut Function, k: u32| {
        let mut m = client.alloc(9).unwrap();
        client.write(&mut m, format!("call {k:04}").as_bytes()).unwrap();
        m.set_request(k);
        client.send(m, "far").map_err(|e| e.kind).expect("n0's agent takes calls to far");
    };
    const N: u32 = 40;
    for k in 0..N {
        call(&mut client, k);
        let mut answer = None;
        dne_tests::wait_for("n2's far to answer", WATCHDOG, || {
            if let Some(e) = client.try_recv() {
                panic!("call {} came back: {:?}", e.request(), e.desc());
            }
            answer = sink.recv_timeout(Some(Duration::from_millis(1))).unwrap();
            answer.is_some()
        });
        let m = answer.unwrap();
        assert_eq!((m.request(), sink.read_to_vec(&m)), (k, format!("CALL {k:04}").into_bytes()));
        sink.free(m).unwrap();
    }
    let back = c.metric(1, "dne_agent_elsewhere_total", &[("tenant", "acme")]).unwrap_or(0.0);
    assert!(back > 0.0, "n1's agent counts the calls it sent back to n0: {back}");
    c.fns[far].kill9();
    dne_tests::wait_for("n2's host-shimd to see far die", WATCHDOG, || {
        dne_tests::cluster::json_u64(&c.shimd_status(2), "deaths") == Some(1)
    });
    for k in 1000..1000 + N {
        call(&mut client, k);
        let e = client.recv_timeout(Some(WATCHDOG)).unwrap().expect("the call comes back");
        assert_ne!(e.desc().flags & DescFlags::ERROR, 0, "{:?}", e.desc());
        assert_eq!((e.request(), ErrorCode::from_u8(e.desc().status)), (k, Some(ErrorCode::PeerDied)));
        client.free(e).unwrap();
    }
    std::thread::sleep(Duration::from_millis(50));
    assert!(client.try_recv().is_none(), "each call came back once");
    assert!(sink.try_recv().is_none());
}

const EDGE_QUEUE_CLUSTER: &str = r#"
[[tenant]]
name = "acme"
weight = 1
buffers = 1024
recv_quota = 32
max_chain = 128

[[function]]
name = "upper"
tenant = "acme"
nodes = ["n0", "n1"]

[[route]]
path = "/spread"
tenant = "acme"
chain = ["upper"]
"#;

#[test]
fn edge_requests_reaching_a_node_without_an_instance_go_to_another_node() {
    edge_requests_elsewhere("emulated");
}

#[test]
fn dpu_mode_edge_requests_reaching_a_node_without_an_instance_go_to_another_node() {
    edge_requests_elsewhere("dpu");
}

/// `upper` runs on n0 and n1 but only n0 has an instance: the requests the
/// ingress sends to n1 go on to n0 (in DPU mode it is n1's host-shimd
/// bridge that finds no instance and hands them back to the agent), and
/// every request is answered.
fn edge_requests_elsewhere(mode: &'static str) {
    let name = format!("edge-elsewhere-{mode}");
    let edge = dne_tests::cluster::IngressSpec::new(&name, "");
    let http = edge.http;
    let mut c = Cluster::start_mode(&name, 2, mode, &format!("{EDGE_QUEUE_CLUSTER}{}", edge.section()));
    c.start_route_fn(0, "acme", "upper", "upper");
    c.wait_conns(1);
    c.start_ingress(&edge, "/spread", WATCHDOG);
    c.wait_conns(2);
    let before = delivered(&c, 0, "upper");
    for k in 0..40 {
        let body = pattern(100, k);
        let r = dne_tests::http_post(http, "/spread", &body).expect("an answer");
        assert_eq!(r, (200, body.to_ascii_uppercase()), "request {k}");
    }
    delivered_since(&c, "upper", &[0], &[before], 40);
    let sent_on = c.metric(1, "dne_agent_elsewhere_total", &[("tenant", "acme")]).unwrap_or(0.0);
    assert!(sent_on > 0.0, "n1's agent counts what it sent on: {sent_on}");
}

/// A chain whose every function lacks an instance on one of its nodes:
/// `upper` on n0 and n1 (an instance on n0 only), `rot13` on n1 and n2 (an
/// instance on n2 only). A request may be sent on at both hops: n1 sends
/// it to n0 for `upper`, and later to n2 for `rot13`. Every request is
/// answered.
#[test]
fn each_hop_of_a_chain_may_go_to_another_node() {
    let edge = dne_tests::cluster::IngressSpec::new("hop-elsewhere", "");
    let http = edge.http;
    // Two routes over the chain, so that which requests reach n0 from n1
    // does not fall in step with n0's turns over rot13's nodes.
    let cluster = format!(
        "{}\n[[function]]\nname = \"rot13\"\ntenant = \"acme\"\nnodes = [\"n1\", \"n2\"]\n\n\
         [[route]]\npath = \"/again\"\ntenant = \"acme\"\nchain = [\"upper\", \"rot13\"]\n{}",
        EDGE_QUEUE_CLUSTER.replace("chain = [\"upper\"]", "chain = [\"upper\", \"rot13\"]"),
        edge.section()
    );
    let mut c = Cluster::start("hop-elsewhere", 3, &cluster);
    c.start_route_fn(0, "acme", "upper", "upper");
    c.start_route_fn(2, "acme", "rot13", "rot13");
    c.wait_mesh();
    c.start_ingress(&edge, "/spread", WATCHDOG);
    for k in 0..60 {
        let body = pattern(100, k);
        let want: Vec<u8> = body.to_ascii_uppercase().into_iter().map(rot13).collect();
        let path = if k % 3 == 2 { "/again" } else { "/spread" };
        let r = dne_tests::http_post(http, path, &body).expect("an answer");
        assert_eq!(r, (200, want), "request {k} on {path}");
    }
    let sent_on = |i| c.metric(i, "dne_agent_elsewhere_total", &[("tenant", "acme")]).unwrap_or(0.0);
    assert!(sent_on(1) > 0.0, "n1 sent requests on");
}

/// The ingress binds a request to a node when it sends it, not when it
/// arrives: a node that stops taking requests (its agent stopped, so the
/// credits it gave the ingress run out) holds only those it had credits
/// for; the function's other node answers the rest within the route's
/// timeout. Once it runs again, it takes its share again.
#[test]
fn a_stalled_node_holds_only_the_requests_it_had_credits_for() {
    let edge = dne_tests::cluster::IngressSpec::new("edge-stall", "");
    let http = edge.http;
    let cluster = format!("{EDGE_QUEUE_CLUSTER}timeout_ms = 5000\n{}", edge.section());
    let mut c = Cluster::start("edge-stall", 2, &cluster);
    c.start_route_fn(0, "acme", "upper", "upper");
    c.start_route_fn(1, "acme", "upper", "upper");
    c.wait_conns(1);
    c.start_ingress(&edge, "/spread", WATCHDOG);
    c.wait_conns(2);
    until_every_node_answers(&c, http, "/spread", "upper", 2);
    c.signal_agent(1, Signal::SIGSTOP).unwrap();
    // n1 posts 16 receives for the ingress (its quota of 32 over two
    // peers): at most 16 of the 64 can be sent there.
    const N: usize = 64;
    let (tx, rx) = std::sync::mpsc::channel();
    for k in 0..N {
        let tx = tx.clone();
        std::thread::spawn(move || {
            let r = dne_tests::http_post(http, "/spread", &pattern(100, k)).map(|r| r.0);
            let _ = tx.send(r);
        });
    }
    let codes: Vec<_> = (0..N).map(|_| rx.recv_timeout(WATCHDOG).expect("every request is answered")).collect();
    let ok = codes.iter().filter(|&&c| c == Some(200)).count();
    assert!(ok >= N - 16, "only what n1 had credits for may time out: {ok} of {N} answered 200 ({codes:?})");
    assert!(codes.iter().all(|&c| c == Some(200) || c == Some(504)), "{codes:?}");
    c.signal_agent(1, Signal::SIGCONT).unwrap();
    until_every_node_answers(&c, http, "/spread", "upper", 2);
}

/// The ingress's requests queued for a node (its process stopped, so the
/// credits it gave the ingress ran out) go to the other node of their
/// function when that node goes away; only those it had taken in fail.
#[test]
fn edge_requests_queued_for_a_node_that_goes_away_go_to_another_node() {
    let edge = dne_tests::cluster::IngressSpec::new("edge-requeue", "");
    let http = edge.http;
    let mut c = Cluster::start("edge-requeue", 2, &format!("{EDGE_QUEUE_CLUSTER}{}", edge.section()));
    c.start_route_fn(0, "acme", "upper", "upper");
    c.start_route_fn(1, "acme", "upper", "upper");
    c.wait_conns(1);
    c.start_ingress(&edge, "/spread", WATCHDOG);
    c.wait_conns(2);
    until_every_node_answers(&c, http, "/spread", "upper", 2);
    c.signal_agent(1, Signal::SIGSTOP).unwrap();
    // 64 requests at once: 32 for each node. n1 posts 16 receives for the
    // ingress (its quota of 32 over two peers), so at most 16 of its 32
    // are sent; the rest wait in the ingress for credits.
    const N: usize = 64;
    let (tx, rx) = std::sync::mpsc::channel();
    for k in 0..N {
        let tx = tx.clone();
        std::thread::spawn(move || {
            let r = dne_tests::http_post(http, "/spread", &pattern(100, k)).map(|r| r.0);
            let _ = tx.send(r);
        });
    }
    let mut codes = Vec::new();
    while codes.len() < N / 2 {
        codes.push(rx.recv_timeout(WATCHDOG).expect("n0's half is answered"));
    }
    c.kill_agent(1);
    while codes.len() < N {
        codes.push(rx.recv_timeout(WATCHDOG).expect("every request is answered"));
    }
    let ok = codes.iter().filter(|&&c| c == Some(200)).count();
    assert!(ok >= N - 16, "only what n1 had taken in may fail: {ok} of {N} answered 200 ({codes:?})");
}

/// Calls from a function on n0 still waiting in the ring of their callee
/// on n1 when it dies come back to the caller as `PeerDied`, each once:
/// n1's host-shimd answers them through n1's uplink, each call whole as
/// its error, and n1's agent sends each to the node its call came
/// from. Before, host-shimd freed them with the dead function's buffers
/// and the caller waited for ever (here: nothing within the watchdog).
///
/// With `twin`, `client` also runs on n1, the callee's node, and an
/// instance of it waits there: the answers still go to n0, the node each
/// call came from, and none to n1's instance (a descriptor does not name
/// its caller's node; n1's agent, or in DPU mode n1's bridge, marks each
/// call it delivers from another node's function `ELSEWHERE`, by which
/// n1's host-shimd knows to answer it through the agent). Before, n1's host-shimd answered them to n1's
/// instance of `client`, whose own calls may have used the same request
/// ids.
fn calls_waiting_for_a_callee_that_dies(mode: &'static str, twin: bool) {
    let (name, client_nodes) = if twin {
        (format!("dead-ring-twin-{mode}"), r#"["n0", "n1"]"#)
    } else {
        (format!("dead-ring-{mode}"), r#"["n0"]"#)
    };
    let mut c = Cluster::start_mode(&name, 2, mode, &client_sink_cluster_on("far", r#"["n1"]"#, client_nodes));
    let far = c.start_fn(1, "acme", "far", "upper", Some("sink"));
    c.wait_mesh();
    let mut client = c.attach(0, "acme", "client");
    let mut twin_client = twin.then(|| c.attach(1, "acme", "client"));
    let _sink = c.attach(0, "acme", "sink");
    dne_tests::stop_process(c.fns[far].pid());
    let calls: Vec<u32> = (500..505).collect();
    for &k in &calls {
        // Two buffers each, both back in the error.
        let mut m = client.alloc(20_000).unwrap();
        m.set_request(k);
        client.send(m, "far").map_err(|e| e.kind).expect("n0's agent takes calls to far");
    }
    dne_tests::wait_for("n1's agent to deliver the calls into far's ring", WATCHDOG, || {
        delivered(&c, 1, "far") >= calls.len() as u64
    });
    c.fns[far].kill9();
    let mut answered = Vec::new();
    for _ in &calls {
        let e = client.recv_timeout(Some(WATCHDOG)).unwrap().unwrap_or_else(|| {
            let wrong = twin_client.as_mut().and_then(|t| t.try_recv()).map(|m| *m.desc());
            panic!("no answer; so far {answered:?}; n1's client got {wrong:?}; n1: {}", c.shimd_status(1))
        });
        let d = *e.desc();
        assert_eq!(
            (d.error_code(), d.flags & DescFlags::REPLY, d.len),
            (Some(ErrorCode::PeerDied), 0, 20_000),
            "{d:?}"
        );
        answered.push(d.request);
        client.free(e).unwrap();
    }
    answered.sort_unstable();
    assert_eq!(answered, calls);
    std::thread::sleep(Duration::from_millis(50));
    assert!(client.try_recv().is_none(), "each call answered once");
    if let Some(t) = twin_client.as_mut() {
        let wrong = t.try_recv().map(|m| *m.desc());
        assert_eq!(wrong, None, "an answer for n0's call reached n1's instance of the caller");
    }
    let s = c.shimd_status(1);
    let n = |k: &str| dne_tests::cluster::status_number(&s, k);
    assert_eq!((n("answered"), n("unanswered")), (Some(5), Some(0)), "{s}");
}

#[test]
fn calls_waiting_for_a_callee_that_dies_come_back_to_the_caller_node() {
    calls_waiting_for_a_callee_that_dies("emulated", false);
}

#[test]
fn dpu_mode_calls_waiting_for_a_callee_that_dies_come_back_to_the_caller_node() {
    calls_waiting_for_a_callee_that_dies("dpu", false);
}

#[test]
fn calls_waiting_for_a_callee_that_dies_go_back_to_the_caller_node_when_the_caller_also_runs_there() {
    calls_waiting_for_a_callee_that_dies("emulated", true);
}

#[test]
fn dpu_mode_calls_waiting_for_a_callee_that_dies_go_back_to_the_caller_node_when_the_caller_also_runs_there() {
    calls_waiting_for_a_callee_that_dies("dpu", true);
}

/// A request of the ingress still waiting in the ring of its function
/// when that instance dies is answered 502 `peer_died` at once (n1's
/// host-shimd answers the call as a reply to the ingress, through n1's
/// agent), not 504 after the route's timeout as before (here: 504 after
/// 20 s).
fn a_request_waiting_for_an_instance_that_dies(mode: &'static str) {
    let edge = dne_tests::cluster::IngressSpec::new(&format!("dead-ring-edge-{mode}"), "");
    let http = edge.http;
    let cluster = r#"
[[tenant]]
name = "acme"
weight = 1
buffers = 1024
recv_quota = 256
max_chain = 128

[[function]]
name = "upper"
tenant = "acme"
node = "n1"

[[route]]
path = "/up"
tenant = "acme"
chain = ["upper"]
timeout_ms = 20000
"#;
    let mut c =
        Cluster::start_mode(&format!("dead-ring-edge-{mode}"), 2, mode, &format!("{cluster}{}", edge.section()));
    c.start_route_fn(1, "acme", "upper", "upper");
    let upper = c.fns.len() - 1;
    c.start_ingress(&edge, "/up", WATCHDOG);
    let before = delivered(&c, 1, "upper");
    dne_tests::stop_process(c.fns[upper].pid());
    let post = std::thread::spawn(move || dne_tests::http_post_full(http, "/up", b"hello"));
    dne_tests::wait_for("n1's agent to deliver the request into upper's ring", WATCHDOG, || {
        delivered(&c, 1, "upper") > before
    });
    c.fns[upper].kill9();
    let (code, head, _) = post.join().unwrap().expect("an answer");
    assert_eq!(code, 502, "{head}");
    assert!(head.to_ascii_lowercase().contains("x-dne-error: peer_died"), "{head}");
}

#[test]
fn a_request_waiting_for_an_instance_that_dies_is_answered_502_at_once() {
    a_request_waiting_for_an_instance_that_dies("emulated");
}

#[test]
fn dpu_mode_a_request_waiting_for_an_instance_that_dies_is_answered_502_at_once() {
    a_request_waiting_for_an_instance_that_dies("dpu");
}

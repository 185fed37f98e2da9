//! Two nodes whose agents run in network namespaces of their own (issue 5
//! point 7), joined only by a veth pair: the fabric addresses exist nowhere
//! else, so every byte between the agents crosses that link. host-shimd and
//! the functions stay in this namespace (the host link is a Unix socket
//! path and shared memory). Messages and chains from 1 B to 1 MiB cross
//! intact both ways; an agent killed and restarted in its namespace
//! reconnects. The namespaces and links are gone afterwards, also when a
//! test panics.
//!
//! Needs root; without it each test prints "skipped: needs root" and
//! returns. Every wait has a watchdog; nothing asserts on time.
#![allow(clippy::print_stdout)] // the skip notice

use dne_tests::cluster::{Cluster, Netns, is_root, status_number};
use std::os::unix::fs::MetadataExt;
use std::process::Command;
use std::time::Duration;
use wire::{DescFlags, ErrorCode};

const WATCHDOG: Duration = Duration::from_secs(30);

const CONFIG: &str = r#"
[[tenant]]
name = "acme"
weight = 1
buffers = 1024
recv_quota = 256
max_chain = 128

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
"#;

fn pattern(len: usize, seed: usize) -> Vec<u8> {
    (0..len).map(|i| b"abcdefghijklmnopqrstuvwxyz"[(i * 7 + seed) % 26]).collect()
}

/// Whether the tests can run here; prints why not.
fn can_run() -> bool {
    if !is_root() {
        println!("skipped: needs root (network namespaces)");
        return false;
    }
    let ip = Command::new("ip").arg("-V").output();
    assert!(
        ip.is_ok_and(|o| o.status.success()),
        "`ip` (iproute2) is missing: install it (scripts/install-deps.sh base)"
    );
    true
}

/// Inode of a network namespace file (`/proc/PID/ns/net`, `/run/netns/NAME`).
fn ns_inode(path: &str) -> u64 {
    std::fs::metadata(path).unwrap_or_else(|e| panic!("{path}: {e}")).ino()
}

/// n0's client -> n1's upper -> n0's sink, every size, then a burst.
fn round_trips(c: &Cluster, client: &mut host_shim::Function, sink: &mut host_shim::Function, round: u32) {
    let cap = client.pool().geometry().payload_cap() as usize;
    let sizes = [0, 1, 100, 4000, cap, cap + 1, 3 * cap + 17, 100_000, 1 << 20];
    for (k, &len) in sizes.iter().enumerate() {
        let data = pattern(len, k);
        let mut m = client.alloc(len as u32).expect("alloc");
        client.write(&mut m, &data).unwrap();
        m.set_request(round * 10_000 + k as u32);
        client.send(m, "upper").expect("send to a function in the other namespace");
        let Some(got) = sink.recv_timeout(Some(WATCHDOG)).unwrap() else {
            panic!("{len} B: nothing came back\n{}\n{}", c.status(0), c.status(1));
        };
        assert_eq!(got.request(), round * 10_000 + k as u32);
        assert_eq!(got.desc().flags & DescFlags::ERROR, 0, "{len} B: {:?}", got.desc());
        assert!(sink.read_to_vec(&got) == data.to_ascii_uppercase(), "{len} B arrive intact");
        sink.free(got).unwrap();
    }
    for k in 0..200u32 {
        let mut m = client.alloc(64).unwrap();
        client.write(&mut m, &pattern(64, k as usize)).unwrap();
        m.set_request(round * 10_000 + 1000 + k);
        let mut m = Some(m);
        while let Some(x) = m.take() {
            if let Err(e) = client.send(x, "upper") {
                assert!(matches!(e.kind, host_shim::SendErrorKind::Full), "{e}");
                m = e.msg;
                std::thread::sleep(Duration::from_micros(100));
            }
        }
    }
    for k in 0..200u32 {
        let got = sink.recv_timeout(Some(WATCHDOG)).unwrap().expect("burst message");
        assert_eq!(got.request(), round * 10_000 + 1000 + k, "in order");
        assert_eq!(sink.read_to_vec(&got), pattern(64, k as usize).to_ascii_uppercase());
        sink.free(got).unwrap();
    }
}

#[test]
fn agents_in_separate_namespaces_carry_1b_to_1mib_and_reconnect_after_a_restart() {
    separate_namespaces("emulated");
}

/// The same in DPU mode: each agent in its own network namespace reaches
/// its host-shimd over (emulated) comch, as an agent on a card would.
#[test]
fn dpu_mode_agents_in_separate_namespaces_carry_1b_to_1mib_and_reconnect_after_a_restart() {
    separate_namespaces("dpu");
}

/// The tests of this file one at a time: each checks that no link of this
/// process is left behind, which another test's live links would fail.
static ONE_AT_A_TIME: std::sync::Mutex<()> = std::sync::Mutex::new(());

fn one_at_a_time() -> std::sync::MutexGuard<'static, ()> {
    ONE_AT_A_TIME.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

fn separate_namespaces(mode: &'static str) {
    if !can_run() {
        return;
    }
    let _one = one_at_a_time();
    let (names, links) = {
        let mut c = Cluster::start_netns_mode(&format!("netns-{mode}"), mode, CONFIG).expect("root");
        let net = c.net.as_ref().expect("namespaces");
        let names = net.names.clone();
        let links: Vec<String> = Netns::links_named(&format!("dn{}_", std::process::id()));
        assert!(!links.is_empty(), "the management links live here");

        // Each agent runs in its own namespace, neither in ours.
        let ours = ns_inode("/proc/self/ns/net");
        for (i, name) in names.iter().enumerate() {
            let agent = ns_inode(&format!("/proc/{}/ns/net", c.agents[i].pid()));
            assert_eq!(agent, ns_inode(&format!("/run/netns/{name}")), "agent n{i} runs in {name}");
            assert_ne!(agent, ours);
        }
        // The fabric addresses are not ours: the agents reach each other
        // only over the veth pair between their namespaces.
        let cfg = config::Cluster::load(&c.config).unwrap();
        let here = String::from_utf8(Command::new("ip").args(["-o", "-4", "addr"]).output().unwrap().stdout).unwrap();
        for n in &cfg.nodes {
            let ip = n.address.rsplit_once(':').unwrap().0;
            assert!(!here.contains(&format!("inet {ip}/")), "{ip} must live only in a node's namespace");
        }

        c.start_fn(1, "acme", "upper", "upper", Some("sink"));
        let mut client = c.attach(0, "acme", "client");
        let mut sink = c.attach(0, "acme", "sink");
        round_trips(&c, &mut client, &mut sink, 0);

        // kill -9 n1's agent inside its namespace and restart it there:
        // the mesh comes back over the veth and traffic flows again.
        c.kill_agent(1);
        c.restart_agent(1);
        c.wait_mesh();
        c.wait_conns(1);
        round_trips(&c, &mut client, &mut sink, 1);
        (names, links)
    };
    // Nothing left behind.
    for n in &names {
        assert!(!Netns::exists(n), "namespace {n} left behind");
    }
    let left: Vec<String> =
        Netns::links_named(&format!("dn{}_", std::process::id())).into_iter().filter(|l| links.contains(l)).collect();
    assert!(left.is_empty(), "links left behind: {left:?}");
}

/// A peer that vanishes without a word (its fabric link goes down: no FIN
/// and no reset reach n0) is declared down in seconds, a message for it
/// comes back to its sender as Unreachable, and once the link is back the
/// mesh reconnects and traffic flows again.
#[test]
fn a_peer_lost_without_a_word_is_noticed_in_seconds_and_comes_back() {
    link_lost("netns-silent", 0);
}

/// The same with messages in flight when the link goes: TCP keepalive does
/// not probe the emulated NIC's streams while they hold unacknowledged
/// data, but the mesh link to the peer is idle and its keepalive notices;
/// every message in flight comes back to its sender as an error.
#[test]
fn a_peer_lost_with_messages_in_flight_is_noticed_in_seconds_and_comes_back() {
    link_lost("netns-inflight", 8);
}

/// Takes n1's fabric link down, sends `in_flight` messages to n1 (64 KiB
/// each) at once, then one after n0 saw n1 down; brings the link back.
fn link_lost(name: &str, in_flight: u32) {
    if !can_run() {
        return;
    }
    let _one = one_at_a_time();
    let mut c = Cluster::start_netns(name, CONFIG).expect("root");
    c.start_fn(1, "acme", "upper", "upper", Some("sink"));
    let mut client = c.attach(0, "acme", "client");
    let mut sink = c.attach(0, "acme", "sink");
    round_trips(&c, &mut client, &mut sink, 0);

    let net = c.net.as_ref().expect("namespaces");
    net.set_fabric(false);
    for k in 0..in_flight {
        let mut m = client.alloc(64 << 10).unwrap();
        client.write(&mut m, &pattern(64 << 10, k as usize)).unwrap();
        m.set_request(k);
        client.send(m, "upper").expect("the agent takes it");
    }
    let peers_up = |c: &Cluster| status_number(&c.status(0), "peers_up");
    // (Without keepalive on the streams this takes TCP's retransmission
    // timeout, about 15 minutes.)
    dne_tests::wait_for("n0 to see n1 down", WATCHDOG, || peers_up(&c) == Some(0));
    for _ in 0..in_flight {
        let back = client.recv_timeout(Some(WATCHDOG)).unwrap().expect("a message in flight comes back");
        assert_ne!(back.desc().flags & DescFlags::ERROR, 0, "{:?}", back.desc());
        client.free(back).unwrap();
    }
    let m = client.alloc(10).unwrap();
    client.send(m, "upper").expect("the agent takes it");
    let back = client.recv_timeout(Some(WATCHDOG)).unwrap().expect("the message comes back");
    assert_ne!(back.desc().flags & DescFlags::ERROR, 0);
    assert_eq!(ErrorCode::from_u8(back.desc().status), Some(ErrorCode::Unreachable));
    client.free(back).unwrap();

    net.set_fabric(true);
    c.wait_mesh();
    c.wait_conns(1);
    round_trips(&c, &mut client, &mut sink, 1);
}

#[test]
fn namespaces_are_removed_when_a_test_panics() {
    if !can_run() {
        return;
    }
    let _one = one_at_a_time();
    let made = std::sync::Mutex::new(Vec::new());
    let r = std::panic::catch_unwind(|| {
        let (net, nodes) = Netns::two_nodes().expect("root");
        assert_eq!(nodes.len(), 2);
        made.lock().unwrap().extend(net.names.clone());
        for n in &net.names {
            assert!(Netns::exists(n), "{n} made");
        }
        panic!("a failing test");
    });
    assert!(r.is_err());
    let made = made.into_inner().unwrap();
    assert_eq!(made.len(), 2);
    for n in &made {
        assert!(!Netns::exists(n), "namespace {n} left behind after a panic");
    }
}

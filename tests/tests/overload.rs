//! Overload beyond capacity, through the whole cluster: HTTP clients, the
//! ingress process, the fabric, a chain across two nodes and back.
//!
//! What must hold when far more requests arrive than the cluster can hold
//! (the pools are small on purpose: a node holds at most 64 messages of the
//! tenant, the ingress 32 requests; and the chain's first function does
//! `WORK` of simulated work per request, so the cluster serves fewer
//! requests than the clients offer whatever the machine's speed. Without
//! both, a fast enough cluster kept up and turned nobody away):
//! the ingress answers the excess
//! with 503 and `Retry-After` well before the route's deadline (rejected,
//! not timed out); every answer is 200 with the right body or such a 503,
//! never a 504, another 5xx or a broken connection; goodput does not
//! collapse (a conservative fraction of what moderate load got); resident
//! memory of the ingress and the agents stays bounded; and once the load
//! stops, the cluster serves normally and every pool is back to idle.
//! Watchdogs only; the time comparisons are against the configured route
//! deadline, not absolute numbers.
#![allow(clippy::print_stdout)] // reports the goodput, the 503s and memory

use dne_tests::cluster::Cluster;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

const WATCHDOG: Duration = Duration::from_secs(120);
/// The route's deadline (`timeout_ms`): a 503 must come well before it.
const ROUTE_TIMEOUT: Duration = Duration::from_secs(5);
/// Buffers of the ingress pool: the receive quota the edge keeps posted
/// (32) and 32 for requests, the cluster's admission limit here.
const INGRESS_BUFFERS: u32 = 64;
const MODERATE: usize = 4;
/// Simulated work of `upper` per request: about 500 requests/s at most.
const WORK: &str = "2000";
const OVERLOAD: usize = 160;

const CLUSTER: &str = r#"
[[tenant]]
name = "acme"
weight = 1
buffers = 64
recv_quota = 32

[[function]]
name = "upper"
tenant = "acme"
node = "n1"

[[function]]
name = "rot13"
tenant = "acme"
node = "n0"

[[route]]
path = "/x"
tenant = "acme"
chain = ["upper", "rot13"]
timeout_ms = 5000
"#;

fn rot13(b: u8) -> u8 {
    match b {
        b'a'..=b'z' => (b - b'a' + 13) % 26 + b'a',
        b'A'..=b'Z' => (b - b'A' + 13) % 26 + b'A',
        _ => b,
    }
}

/// A unique 1 KiB body.
fn body(client: usize, n: u64) -> Vec<u8> {
    let tag = format!("c{client}-r{n}-");
    tag.bytes().chain((0..1024 - tag.len()).map(|i| b"abcdefghijklmnopqrstuvwxyz"[(i + client) % 26])).collect()
}

fn want(body: &[u8]) -> Vec<u8> {
    body.to_ascii_uppercase().into_iter().map(rot13).collect()
}

#[derive(Debug, Default)]
struct Tally {
    ok: u64,
    busy: u64,
    /// Slowest 503.
    busy_max: Duration,
    no_retry_after: u64,
    /// Anything else: (what, count).
    bad: Vec<String>,
}

/// `clients` threads posting unique bodies in a loop for `dur`.
fn load(http: std::net::SocketAddr, clients: usize, dur: Duration) -> Tally {
    let stop = Arc::new(AtomicBool::new(false));
    let threads: Vec<_> = (0..clients)
        .map(|c| {
            let stop = stop.clone();
            std::thread::spawn(move || {
                let mut t = Tally::default();
                let mut n = 0;
                while !stop.load(Ordering::Relaxed) {
                    n += 1;
                    let b = body(c, n);
                    let t0 = Instant::now();
                    match dne_tests::http_post_full(http, "/x", &b) {
                        Some((200, _, got)) if got == want(&b) => t.ok += 1,
                        Some((503, head, _)) => {
                            t.busy += 1;
                            t.busy_max = t.busy_max.max(t0.elapsed());
                            if !head.to_ascii_lowercase().contains("retry-after:") {
                                t.no_retry_after += 1;
                            }
                        }
                        Some((code, _, got)) => {
                            t.bad.push(format!("status {code}, {} B", got.len()));
                        }
                        None => t.bad.push("connection failed or no answer".into()),
                    }
                }
                t
            })
        })
        .collect();
    std::thread::sleep(dur);
    stop.store(true, Ordering::Relaxed);
    let mut all = Tally::default();
    for th in threads {
        let t = th.join().expect("a client thread");
        all.ok += t.ok;
        all.busy += t.busy;
        all.busy_max = all.busy_max.max(t.busy_max);
        all.no_retry_after += t.no_retry_after;
        all.bad.extend(t.bad);
    }
    all
}

/// Resident KiB of `pid`.
fn rss_kib(pid: u32) -> u64 {
    let s = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    s.lines()
        .find(|l| l.starts_with("VmRSS:"))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|v| v.parse().ok())
        .unwrap_or(0)
}

fn metric(text: &str, name: &str) -> Option<f64> {
    dne_tests::cluster::metric_value(text, name, &[])
}

#[test]
fn overload_is_answered_with_503_quickly_memory_stays_bounded_and_goodput_holds() {
    let edge = dne_tests::cluster::IngressSpec::new("overload-edge", &format!("buffers = {INGRESS_BUFFERS}"));
    let http = edge.http;
    let mut c = Cluster::start("overload", 2, &format!("{CLUSTER}{}", edge.section()));
    c.start_route_fn_with(1, "acme", "upper", "upper", &["--delay-us", WORK]);
    c.start_route_fn(0, "acme", "rot13", "rot13");
    let ingress_pid = c.start_ingress(&edge, "/x", WATCHDOG);
    let metrics = || dne_tests::http_get(http, "/metrics").map(|(_, t)| t).unwrap_or_default();
    let idle_free = metric(&metrics(), "dne_ingress_pool_free_buffers").expect("the ingress pool gauge");
    let shimd_idle: Vec<u64> = (0..2).map(|i| c.shimd_pool_free(i, "acme").expect("pool status")).collect();

    // (a) Moderate load: what the cluster does when not overloaded.
    let dur = Duration::from_secs(3);
    let a = load(http, MODERATE, dur);
    assert!(a.bad.is_empty(), "moderate load: {:?}", &a.bad[..a.bad.len().min(5)]);
    assert!(a.ok > 0, "moderate load got nothing through");
    let goodput_a = a.ok as f64 / dur.as_secs_f64();
    let rss0: Vec<u64> = [ingress_pid, c.agents[0].pid(), c.agents[1].pid()].iter().map(|&p| rss_kib(p)).collect();

    // (b) Overload: many more requests at once than the ingress pool
    // holds.
    let b = load(http, OVERLOAD, dur);
    let rss1: Vec<u64> = [ingress_pid, c.agents[0].pid(), c.agents[1].pid()].iter().map(|&p| rss_kib(p)).collect();
    let goodput_b = b.ok as f64 / dur.as_secs_f64();
    println!(
        "moderate ({MODERATE} clients): {goodput_a:.0} ok/s; overload ({OVERLOAD} clients): {goodput_b:.0} ok/s, {} x 503 \
         (slowest {:?}), other {}; RSS KiB ingress/agents before {rss0:?} after {rss1:?}",
        b.busy,
        b.busy_max,
        b.bad.len()
    );
    assert!(b.bad.is_empty(), "overload: only 200 or 503 answers: {:?}", &b.bad[..b.bad.len().min(10)]);
    assert!(b.busy > 0, "{OVERLOAD} clients against {INGRESS_BUFFERS} buffers: some must be turned away");
    assert_eq!(b.no_retry_after, 0, "every 503 carries Retry-After");
    assert!(
        b.busy_max < ROUTE_TIMEOUT / 2,
        "503s are rejections, not timeouts: slowest {:?} against a {ROUTE_TIMEOUT:?} route deadline",
        b.busy_max
    );
    // Conservative: on 2 shared cores the clients themselves take CPU.
    assert!(
        goodput_b >= 0.3 * goodput_a,
        "goodput collapsed under overload: {goodput_b:.0}/s against {goodput_a:.0}/s"
    );
    // Pools and rings are preallocated, so an overload adds only
    // per-connection state (the ingress: HTTP connections and their
    // buffers for a few hundred clients); 64 MiB is far above that and far
    // below unbounded buffering of requests.
    for (k, (before, after)) in rss0.iter().zip(&rss1).enumerate() {
        assert!(
            after.saturating_sub(*before) < 64 * 1024,
            "process {k} (0: ingress, 1-2: agents) grew from {before} to {after} KiB"
        );
    }

    // (c) After: normal service, and every pool back to idle.
    let c2 = load(http, MODERATE, Duration::from_secs(1));
    assert!(c2.bad.is_empty() && c2.busy == 0 && c2.ok > 0, "service after the overload: {c2:?}");
    dne_tests::wait_for("the ingress pool back to idle", WATCHDOG, || {
        metric(&metrics(), "dne_ingress_pool_free_buffers") == Some(idle_free)
    });
    for (i, idle) in shimd_idle.iter().enumerate() {
        dne_tests::wait_for(&format!("n{i}'s pool back to idle"), WATCHDOG, || {
            c.shimd_pool_free(i, "acme") == Some(*idle)
        });
    }
}

/// A chain whose second function's node stops taking anything (its agent
/// stopped): the first node's agent holds at most the tenant's `node_queue`
/// of the calls for it (4 here) beyond what that node's credits took; the
/// rest go back as `Overloaded`, which the ingress answers with 503 and
/// `Retry-After` at once, not at the route's deadline. Once the node runs
/// again, every request held is answered 200 with its own body.
#[test]
fn calls_beyond_a_stopped_nodes_queue_are_answered_503_at_once() {
    const REQUESTS: usize = 40;
    // The chain is upper (n1) -> rot13 (n0); no simulated work.
    let queued = CLUSTER.replacen("buffers = 64\nrecv_quota = 32", "buffers = 256\nrecv_quota = 8\nnode_queue = 4", 1);
    assert_ne!(queued, CLUSTER);
    // (The edge waits for credits as long as the test takes: what is
    // tested is n1's queue for n0.)
    let edge = dne_tests::cluster::IngressSpec::new("queued-edge", "credit_wait_ms = 600000\n");
    let http = edge.http;
    let mut c = Cluster::start("queued", 2, &format!("{queued}{}", edge.section()));
    c.start_route_fn(1, "acme", "upper", "upper");
    c.start_route_fn(0, "acme", "rot13", "rot13");
    c.start_ingress(&edge, "/x", WATCHDOG);
    c.signal_agent(0, nix::sys::signal::Signal::SIGSTOP).unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    let clients: Vec<_> = (0..REQUESTS)
        .map(|k| {
            let tx = tx.clone();
            std::thread::spawn(move || {
                let b = body(k, 1);
                let t0 = Instant::now();
                let r = dne_tests::http_post_full(http, "/x", &b);
                let _ = tx.send((k, r.map(|(code, head, got)| (code, head, got == want(&b))), t0.elapsed()));
            })
        })
        .collect();
    // Every call n1's agent refused is answered (and nothing else is, while
    // n0 stays stopped).
    let overloaded = || c.metric(1, "dne_agent_drops_total", &[("tenant", "acme"), ("reason", "overloaded")]);
    let mut done = Vec::new();
    dne_tests::wait_for("a 503 for each refused call", WATCHDOG, || {
        done.extend(rx.try_iter());
        done.len() >= REQUESTS - 4 - 8 && overloaded() == Some(done.len() as f64)
    });
    let refused = done.len();
    println!("{refused} of {REQUESTS} refused while n0 was stopped (at least)");
    assert!(refused < REQUESTS, "the calls n0's credits and n1's queue took wait for n0");
    c.signal_agent(0, nix::sys::signal::Signal::SIGCONT).unwrap();
    for _ in refused..REQUESTS {
        done.push(rx.recv_timeout(WATCHDOG).expect("every held request answered once n0 runs"));
    }
    // A call still on its way to n1 when the first refusals were counted
    // may have been refused after them: every 503 is one n1's agent
    // refused, answered at once; every other answer is the chain's.
    let n503 = done.iter().filter(|(_, r, _)| matches!(r, Some((503, ..)))).count();
    dne_tests::wait_for("every 503 counted as refused by n1", WATCHDOG, || overloaded() == Some(n503 as f64));
    assert!(n503 < REQUESTS, "some held requests answered by the chain");
    for (k, r, _) in &done {
        match r {
            // (Refused, not timed out: a route's deadline is a 504.)
            Some((503, head, _)) => {
                assert!(head.to_ascii_lowercase().contains("retry-after:"), "request {k}: {head}");
            }
            Some((200, _, true)) => {}
            other => panic!("request {k}: {:?}", other.as_ref().map(|(c, _, ok)| (c, ok))),
        }
    }
    for t in clients {
        t.join().unwrap();
    }
}

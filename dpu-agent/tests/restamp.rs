//! The engine hands a message whose descriptor it changed back to a host
//! link that cannot write the pool (DPU mode) before sending it over the
//! fabric again, and sends it itself when the link says the port may
//! write the headers (host and emulated modes).
//!
//! Node 0's engine over the null fabric (node 1's engine is there for the
//! mesh): its link hands out messages for a function that does not exist,
//! from a request of node 1 (the origin, as if node 1 were the ingress):
//! each goes back as an error to node 1, which needs new fabric headers.

use config::Cluster;
use dpu_agent::engine::{Engine, Settings};
use dpu_agent::hostlink::{HostLink, NullLink};
use dpu_agent::metrics::Metrics;
use fabric::cluster::ClusterPortError;
use fabric::{EndpointConfig, NullTransport, PoolView};
use host_shim::{Msg, SendError};
use std::net::SocketAddr;
use std::os::fd::BorrowedFd;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

const WATCHDOG: Duration = Duration::from_secs(30);

fn null_transport(_: &EndpointConfig, _: SocketAddr) -> Result<NullTransport, ClusterPortError> {
    Ok(NullTransport::new())
}

/// A null link whose messages claim node 1 as their origin; `restamp`
/// either takes the message (as the DPU link does) or gives it back.
struct Origin1 {
    inner: NullLink,
    take_restamps: bool,
    restamped: Arc<AtomicU64>,
}

impl HostLink for Origin1 {
    fn view(&self) -> PoolView<'_> {
        self.inner.view()
    }
    fn free_buffers(&self) -> u32 {
        self.inner.free_buffers()
    }
    fn alloc_buffer(&mut self) -> Option<shm::pool::Lease> {
        self.inner.alloc_buffer()
    }
    fn alloc_empty(&mut self) -> Option<shm::pool::Lease> {
        self.inner.alloc_empty()
    }
    fn take(&mut self) -> Option<Msg> {
        self.inner.take().map(|mut m| {
            m.desc_mut().origin = 1;
            m
        })
    }
    fn deliver(&mut self, msg: Msg, dst: u16, to: &str) -> Result<(), SendError> {
        self.inner.deliver(msg, dst, to)
    }
    fn restamp(&mut self, msg: Msg) -> Option<Msg> {
        self.restamped.fetch_add(1, Ordering::Relaxed);
        if self.take_restamps {
            // The host would rewrite the headers and hand it back; here it
            // ends.
            self.inner.free(msg);
            None
        } else {
            Some(msg)
        }
    }
    fn free(&mut self, msg: Msg) {
        self.inner.free(msg);
    }
    fn alive(&self) -> bool {
        true
    }
    fn rejected(&self, _f: &mut dyn FnMut(&'static str, u64)) {}
    fn sleep_begin(&mut self) -> bool {
        false
    }
    fn sleep_end(&mut self) {}
    fn wake_fd(&self) -> Option<BorrowedFd<'_>> {
        None
    }
    fn queue_depth(&self, _to: &str) -> Option<u64> {
        None
    }
}

fn cluster() -> Arc<Cluster> {
    let dir = std::env::temp_dir().join(format!("dne-restamp-{}", std::process::id()));
    let mut s = String::new();
    for i in 0..2 {
        s += &format!(
            "[[node]]\nname = \"n{i}\"\naddress = \"{}\"\nruntime_dir = \"{}\"\n\n",
            dne_tests::free_port(),
            dir.join(format!("n{i}")).display()
        );
    }
    s += "[[tenant]]\nname = \"t\"\nweight = 1\nbuffers = 256\nrecv_quota = 32\n\n";
    s += "[[function]]\nname = \"f0\"\ntenant = \"t\"\nnode = \"n0\"\n\n";
    s += "[[function]]\nname = \"f1\"\ntenant = \"t\"\nnode = \"n1\"\n";
    Arc::new(Cluster::parse(&s).unwrap())
}

fn settings(node: u16) -> Settings {
    Settings { node, idle_sleep_after: None, epoch: Instant::now(), batch: 8, core: 0 }
}

/// Runs node 0's engine against node 1's until `done` or the watchdog.
fn run(take_restamps: bool) -> (u64, u64) {
    let cfg = cluster();
    let g = cfg.pool_geometry(0).unwrap();
    let restamped = Arc::new(AtomicU64::new(0));
    // 77: no such function; the engine returns it to its origin.
    let link =
        Origin1 { inner: NullLink::new(g, 0, 0, 77, 100, 16).unwrap(), take_restamps, restamped: restamped.clone() };
    let m0 = Arc::new(Metrics::new(&cfg, "n0"));
    let mut e0 = Engine::new(cfg.clone(), settings(0), vec![link], m0.clone(), null_transport).unwrap();
    let stop = Arc::new(AtomicBool::new(false));
    let peer = {
        let (cfg, stop) = (cfg.clone(), stop.clone());
        std::thread::spawn(move || {
            let m1 = Arc::new(Metrics::new(&cfg, "n1"));
            let link = NullLink::new(cfg.pool_geometry(0).unwrap(), 0, 1, 0, 10, 0).unwrap();
            let mut e1 = Engine::new(cfg, settings(1), vec![link], m1.clone(), null_transport).unwrap();
            while !stop.load(Ordering::Relaxed) {
                e1.control(Instant::now());
                e1.step(Instant::now());
                std::thread::sleep(Duration::from_micros(200));
            }
        })
    };
    let start = Instant::now();
    while e0.conns_up() < 1 || restamped.load(Ordering::Relaxed) < 10 {
        assert!(start.elapsed() < WATCHDOG, "watchdog: {} restamped", restamped.load(Ordering::Relaxed));
        e0.control(Instant::now());
        e0.step(Instant::now());
        std::thread::sleep(Duration::from_micros(200));
    }
    // Let what was sent complete (the null fabric completes every send at
    // once; it delivers nothing).
    let settle = Instant::now();
    while settle.elapsed() < Duration::from_millis(200) {
        e0.control(Instant::now());
        e0.step(Instant::now());
        std::thread::sleep(Duration::from_micros(200));
    }
    stop.store(true, Ordering::Relaxed);
    peer.join().unwrap();
    e0.flush();
    assert!(m0.tenants[0].drops(dpu_agent::metrics::Drop::UnknownFunction) >= 10);
    (restamped.load(Ordering::Relaxed), m0.tenants[0].tx_msgs.get())
}

#[test]
fn a_link_that_takes_restamps_gets_every_changed_message_before_the_fabric() {
    let (restamped, sent) = run(true);
    assert!(restamped >= 10);
    assert_eq!(sent, 0, "nothing went over the fabric with stale headers");
}

#[test]
fn a_link_whose_pool_the_port_writes_lets_the_engine_send_at_once() {
    let (restamped, sent) = run(false);
    assert!(restamped >= 10);
    assert!(sent >= 10, "the errors went to their origin: {sent} sent");
}

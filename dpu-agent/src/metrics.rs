//! The agent's counters, and the HTTP endpoints that serve them:
//! `GET /metrics` (Prometheus text), `GET /status` (JSON), `GET /ready`
//! (200 once the host link is attached and the fabric listener is up, 503
//! before).
//!
//! The data-plane thread counts per message in plain integers of its own
//! ([`Tally`]) and adds them to the shared counters (atomics, handles
//! created at start) once per control tick, about every millisecond: no
//! atomic, lock, lookup or allocation per message. Rare events (drops)
//! go to the shared counters at once. The HTTP side runs on its own thread
//! with a single-threaded tokio runtime.

use http_body_util::Full;
use hyper::body::Bytes;
use hyper::{Request, Response, StatusCode};
use prometheus_client::encoding::{EncodeLabelSet, EncodeMetric, MetricEncoder, NoLabelSet};
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::{MetricType, TypedMetric};
use prometheus_client::registry::Registry;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::Duration;

/// Why a message was dropped or returned to its sender as an error.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Drop {
    /// Destination function not in the config.
    UnknownFunction,
    /// Destination node not reachable (link down).
    Unreachable,
    /// The peer failed with the message in flight.
    PeerDied,
    /// The local destination has no live instance.
    NoInstance,
    /// A descriptor from a function failed validation.
    BadDescriptor,
    /// No pool buffer to post a receive with (once per connection each
    /// time it runs short; nothing is dropped, the peer waits for credits).
    NoBuffer,
    /// A peer broke the fabric protocol.
    Protocol,
    /// A chain from a peer got no fragment for `fabric::port::CHAIN_STALL`
    /// and was dropped (its fragments freed).
    StalledChain,
    /// A reply addressed to a node that is not an ingress, or to this node.
    BadOrigin,
    /// The destination function belongs to another tenant.
    TenantMismatch,
    /// The queue toward the destination's node (or its function's nodes)
    /// was full: the node takes nothing (stopped, overloaded).
    Overloaded,
    /// A call lost in its delivery here (its instance died after the
    /// engine looked up its ring, and host-shimd took its buffers back)
    /// whose caller could not be told: no pool buffer to carry the error.
    /// Its caller waits for its timeout.
    Unanswered,
}

impl Drop {
    /// Every reason.
    pub const ALL: [Drop; 12] = [
        Drop::UnknownFunction,
        Drop::Unreachable,
        Drop::PeerDied,
        Drop::NoInstance,
        Drop::BadDescriptor,
        Drop::NoBuffer,
        Drop::Protocol,
        Drop::StalledChain,
        Drop::BadOrigin,
        Drop::TenantMismatch,
        Drop::Overloaded,
        Drop::Unanswered,
    ];

    /// Label value.
    pub fn as_str(self) -> &'static str {
        match self {
            Drop::UnknownFunction => "unknown_function",
            Drop::Unreachable => "unreachable",
            Drop::PeerDied => "peer_died",
            Drop::NoInstance => "no_instance",
            Drop::BadDescriptor => "bad_descriptor",
            Drop::NoBuffer => "no_buffer",
            Drop::Protocol => "protocol",
            Drop::StalledChain => "stalled_chain",
            Drop::BadOrigin => "bad_origin",
            Drop::TenantMismatch => "tenant_mismatch",
            Drop::Overloaded => "overloaded",
            Drop::Unanswered => "unanswered",
        }
    }
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct TenantLabel {
    tenant: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct DropLabel {
    tenant: String,
    reason: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct FnLabel {
    tenant: String,
    function: String,
}

/// Per-tenant handles.
#[derive(Debug)]
pub struct TenantMetrics {
    /// Messages sent over the fabric.
    pub tx_msgs: Counter,
    /// Payload bytes sent over the fabric.
    pub tx_bytes: Counter,
    /// Messages received over the fabric (whole chains).
    pub rx_msgs: Counter,
    /// Payload bytes received over the fabric.
    pub rx_bytes: Counter,
    /// Messages taken from the tenant's uplink ring.
    pub uplink_msgs: Counter,
    /// Messages waiting in the tenant's send queue.
    pub queue_depth: Gauge,
    /// Sends the peers allow this tenant (sum over peers), as of the
    /// engine's last status tick (every 100 ms).
    pub credits: Gauge,
    /// Receive buffers posted for this tenant.
    pub recvs_posted: Gauge,
    /// Seconds from taking a message off the uplink to its send completing.
    pub latency: Latency,
    /// Calls for a function of this node sent on, because none of its
    /// instances here is alive: to another of its nodes, or (a call of a
    /// function on another node) back to the caller's node, which sends
    /// it to another.
    pub elsewhere: Counter,
    drops: Vec<Counter>,
}

impl TenantMetrics {
    /// Counts a drop (or an error returned to the sender).
    pub fn drop(&self, why: Drop) {
        if let Some(c) = self.drops.get(why as usize) {
            c.inc();
        }
    }

    /// Drops so far for `why`.
    pub fn drops(&self, why: Drop) -> u64 {
        self.drops.get(why as usize).map_or(0, Counter::get)
    }
}

/// Buckets of [`Latency`]: upper bounds 1 us, 2 us, ... 2^23 us (8.4 s),
/// then +Inf.
pub const LATENCY_BUCKETS: usize = 24;

/// A latency histogram (seconds) filled in bulk from a [`LocalLatency`]:
/// Prometheus histogram buckets with upper bounds 1 us * 2^i.
#[derive(Clone, Debug, Default)]
pub struct Latency(Arc<LatencyInner>);

#[derive(Debug, Default)]
struct LatencyInner {
    buckets: [AtomicU64; LATENCY_BUCKETS + 1],
    sum_ns: AtomicU64,
    count: AtomicU64,
}

impl Latency {
    /// Adds what `local` gathered and empties it.
    pub fn add(&self, local: &mut LocalLatency) {
        if local.count == 0 {
            return;
        }
        for (b, n) in self.0.buckets.iter().zip(&mut local.buckets) {
            if *n > 0 {
                b.fetch_add(*n, Ordering::Relaxed);
                *n = 0;
            }
        }
        self.0.sum_ns.fetch_add(local.sum_ns, Ordering::Relaxed);
        self.0.count.fetch_add(local.count, Ordering::Relaxed);
        local.sum_ns = 0;
        local.count = 0;
    }

    /// Observations so far.
    pub fn count(&self) -> u64 {
        self.0.count.load(Ordering::Relaxed)
    }
}

impl TypedMetric for Latency {
    const TYPE: MetricType = MetricType::Histogram;
}

impl EncodeMetric for Latency {
    fn encode(&self, mut encoder: MetricEncoder<'_>) -> Result<(), std::fmt::Error> {
        let mut buckets = [(0.0, 0u64); LATENCY_BUCKETS + 1];
        for (i, (b, n)) in buckets.iter_mut().zip(&self.0.buckets).enumerate() {
            let upper = if i < LATENCY_BUCKETS { 1e-6 * f64::from(1u32 << i) } else { f64::INFINITY };
            *b = (upper, n.load(Ordering::Relaxed));
        }
        let sum = self.0.sum_ns.load(Ordering::Relaxed) as f64 * 1e-9;
        encoder.encode_histogram::<NoLabelSet>(sum, self.0.count.load(Ordering::Relaxed), &buckets, None)
    }
    fn metric_type(&self) -> MetricType {
        Self::TYPE
    }
}

/// Latency observations of the data-plane thread, not yet added to the
/// shared [`Latency`].
#[derive(Clone, Debug, Default)]
pub struct LocalLatency {
    buckets: [u64; LATENCY_BUCKETS + 1],
    sum_ns: u64,
    count: u64,
}

impl LocalLatency {
    /// Counts one observation of `ns` nanoseconds.
    pub fn observe_ns(&mut self, ns: u64) {
        self.buckets[latency_bucket(ns)] += 1;
        self.sum_ns = self.sum_ns.saturating_add(ns);
        self.count += 1;
    }
}

/// The bucket of `ns`: the first `i` with `ns <= 1000 * 2^i`, or the
/// +Inf bucket.
pub fn latency_bucket(ns: u64) -> usize {
    let us = ns.div_ceil(1000);
    if us <= 1 { 0 } else { ((64 - (us - 1).leading_zeros()) as usize).min(LATENCY_BUCKETS) }
}

/// The data-plane thread's own per-tenant counts since the last
/// [`Tally::flush`].
#[derive(Clone, Debug, Default)]
pub struct Tally {
    /// Messages sent over the fabric.
    pub tx_msgs: u64,
    /// Payload bytes sent.
    pub tx_bytes: u64,
    /// Messages received.
    pub rx_msgs: u64,
    /// Payload bytes received.
    pub rx_bytes: u64,
    /// Messages taken from the uplink.
    pub uplink_msgs: u64,
    /// Send latencies.
    pub latency: LocalLatency,
}

impl Tally {
    /// Adds the counts to `m` and starts again from zero.
    pub fn flush(&mut self, m: &TenantMetrics) {
        for (n, c) in [
            (&mut self.tx_msgs, &m.tx_msgs),
            (&mut self.tx_bytes, &m.tx_bytes),
            (&mut self.rx_msgs, &m.rx_msgs),
            (&mut self.rx_bytes, &m.rx_bytes),
            (&mut self.uplink_msgs, &m.uplink_msgs),
        ] {
            if *n > 0 {
                c.inc_by(*n);
                *n = 0;
            }
        }
        m.latency.add(&mut self.latency);
    }
}

/// Per-function handles (messages delivered to its local instances).
#[derive(Debug)]
pub struct FnMetrics {
    /// Messages delivered.
    pub delivered: Counter,
    /// Payload bytes delivered.
    pub delivered_bytes: Counter,
    /// Messages waiting in its local instances' inbound rings (sampled by
    /// the control work).
    pub queue_depth: Gauge,
}

/// All of the agent's metrics.
#[derive(Debug)]
pub struct Metrics {
    registry: Registry,
    /// Indexed by tenant id.
    pub tenants: Vec<TenantMetrics>,
    /// Indexed by function id.
    pub functions: Vec<FnMetrics>,
    /// Peers whose fabric link is up.
    pub peers_up: Gauge,
    /// Descriptors from functions that failed validation, by tenant and
    /// reason.
    uplink_rejected: Family<DropLabel, Counter>,
    /// Frees of buffers the agent held that failed, by tenant and reason.
    free_failed: Family<DropLabel, Counter>,
    /// Per data-plane core: ready, and its part of `/status`.
    ready: Vec<AtomicBool>,
    status: Mutex<Vec<Option<StatusPart>>>,
}

/// What one data-plane core reports for `/status`.
#[derive(Clone, Debug, Default)]
pub struct StatusPart {
    /// Node name.
    pub node: String,
    /// Node mode.
    pub mode: String,
    /// Fabric peers.
    pub peers: u32,
    /// Peers whose control link is up.
    pub peers_up: u32,
    /// Tenant connections up on this core.
    pub conns_up: usize,
    /// Each of its tenants: cluster id and JSON object.
    pub tenants: Vec<(u16, String)>,
}

impl Metrics {
    /// Metrics for the tenants and functions of `cfg`.
    pub fn new(cfg: &config::Cluster, node: &str) -> Self {
        Self::with_cores(cfg, node, 1)
    }

    /// Metrics for an agent with `cores` data-plane threads (each reports
    /// its readiness and its part of `/status`).
    pub fn with_cores(cfg: &config::Cluster, node: &str, cores: usize) -> Self {
        use std::borrow::Cow;
        let node_label = [(Cow::Borrowed("node"), Cow::Owned(node.to_owned()))];
        let mut registry = Registry::with_prefix_and_labels("dne_agent", node_label.into_iter());
        let fam = || Family::<TenantLabel, Counter>::default();
        let (tx_m, tx_b, rx_m, rx_b, up_m, away) = (fam(), fam(), fam(), fam(), fam(), fam());
        let depth = Family::<TenantLabel, Gauge>::default();
        let credits = Family::<TenantLabel, Gauge>::default();
        let posted = Family::<TenantLabel, Gauge>::default();
        let drops = Family::<DropLabel, Counter>::default();
        let lat = Family::<TenantLabel, Latency>::default();
        let fn_m = Family::<FnLabel, Counter>::default();
        let fn_b = Family::<FnLabel, Counter>::default();
        let fn_q = Family::<FnLabel, Gauge>::default();
        let peers_up = Gauge::default();
        let uplink_rejected = Family::<DropLabel, Counter>::default();
        let free_failed = Family::<DropLabel, Counter>::default();
        let tenants = cfg
            .tenants
            .iter()
            .map(|t| {
                let l = TenantLabel { tenant: t.name.clone() };
                TenantMetrics {
                    tx_msgs: tx_m.get_or_create(&l).clone(),
                    tx_bytes: tx_b.get_or_create(&l).clone(),
                    rx_msgs: rx_m.get_or_create(&l).clone(),
                    rx_bytes: rx_b.get_or_create(&l).clone(),
                    uplink_msgs: up_m.get_or_create(&l).clone(),
                    queue_depth: depth.get_or_create(&l).clone(),
                    credits: credits.get_or_create(&l).clone(),
                    recvs_posted: posted.get_or_create(&l).clone(),
                    latency: lat.get_or_create(&l).clone(),
                    elsewhere: away.get_or_create(&l).clone(),
                    drops: Drop::ALL
                        .iter()
                        .map(|d| {
                            drops
                                .get_or_create(&DropLabel { tenant: t.name.clone(), reason: d.as_str().to_owned() })
                                .clone()
                        })
                        .collect(),
                }
            })
            .collect();
        let functions = cfg
            .functions
            .iter()
            .map(|f| {
                let l = FnLabel { tenant: f.tenant.clone(), function: f.name.clone() };
                FnMetrics {
                    delivered: fn_m.get_or_create(&l).clone(),
                    delivered_bytes: fn_b.get_or_create(&l).clone(),
                    queue_depth: fn_q.get_or_create(&l).clone(),
                }
            })
            .collect();
        registry.register("fabric_tx_messages", "Messages sent over the fabric", tx_m);
        registry.register("fabric_tx_bytes", "Payload bytes sent over the fabric", tx_b);
        registry.register("fabric_rx_messages", "Messages received over the fabric", rx_m);
        registry.register("fabric_rx_bytes", "Payload bytes received over the fabric", rx_b);
        registry.register("uplink_messages", "Messages taken from the tenant's uplink ring", up_m);
        registry.register("queue_depth", "Messages waiting in the tenant's send queue", depth);
        registry.register("credits", "Sends the peers allow the tenant now", credits);
        registry.register("receives_posted", "Receive buffers posted for the tenant", posted);
        registry.register("drops", "Messages dropped or returned as errors, by reason", drops);
        registry.register(
            "elsewhere",
            "Calls for a function of this node sent on (to another of its nodes, or back to the caller's node to go to one): no live instance here",
            away,
        );
        registry.register("send_latency_seconds", "From the uplink to the send completion", lat);
        registry.register("delivered_messages", "Messages delivered to local function instances", fn_m);
        registry.register("delivered_bytes", "Payload bytes delivered to local function instances", fn_b);
        registry.register("function_queue_depth", "Messages waiting in the inbound rings of a local function", fn_q);
        registry.register("peers_up", "Peers whose fabric link is up", peers_up.clone());
        registry.register(
            "uplink_rejected",
            "Descriptors from functions that failed validation, by reason",
            uplink_rejected.clone(),
        );
        registry.register(
            "free_failed",
            "Frees of buffers the agent held that failed (a process of the tenant rewrote an owner word or a chain link; the buffers stay out of the pool until host-shimd reclaims them), by reason",
            free_failed.clone(),
        );
        Self {
            registry,
            tenants,
            functions,
            peers_up,
            uplink_rejected,
            free_failed,
            ready: (0..cores.max(1)).map(|_| AtomicBool::new(false)).collect(),
            status: Mutex::new(vec![None; cores.max(1)]),
        }
    }

    /// Counts `n` more uplink descriptors of `tenant` rejected for
    /// `reason`. Control path only.
    pub fn add_uplink_rejected(&self, tenant: &str, reason: &str, n: u64) {
        if n > 0 {
            self.uplink_rejected
                .get_or_create(&DropLabel { tenant: tenant.to_owned(), reason: reason.to_owned() })
                .inc_by(n);
        }
    }

    /// Counts `n` more failed frees of buffers of `tenant` for `reason`.
    /// Control path only.
    pub fn add_free_failed(&self, tenant: &str, reason: &str, n: u64) {
        if n > 0 {
            self.free_failed
                .get_or_create(&DropLabel { tenant: tenant.to_owned(), reason: reason.to_owned() })
                .inc_by(n);
        }
    }

    /// Sets the readiness of data-plane core `core`.
    pub fn set_ready(&self, core: usize, ready: bool) {
        if let Some(r) = self.ready.get(core) {
            r.store(ready, Ordering::Relaxed);
        }
    }

    /// Whether the agent reports ready (every data-plane core is).
    pub fn is_ready(&self) -> bool {
        self.ready.iter().all(|r| r.load(Ordering::Relaxed))
    }

    /// Replaces core `core`'s part of the status document.
    pub fn set_status(&self, core: usize, part: StatusPart) {
        if let Ok(mut s) = self.status.lock()
            && let Some(slot) = s.get_mut(core)
        {
            *slot = Some(part);
        }
    }

    /// The `/status` document: the cores' parts together, tenants in id
    /// order.
    pub fn status(&self) -> String {
        use std::fmt::Write as _;
        let Ok(parts) = self.status.lock() else { return "{}\n".into() };
        let Some(first) = parts.iter().flatten().next() else { return "{}\n".into() };
        let mut tenants: Vec<&(u16, String)> = parts.iter().flatten().flat_map(|p| &p.tenants).collect();
        tenants.sort_by_key(|t| t.0);
        let mut s = format!(
            "{{\"node\":\"{}\",\"mode\":\"{}\",\"cores\":{},\"ready\":{},\"peers\":{},\"peers_up\":{},\"conns_up\":{},\"tenants\":[",
            first.node,
            first.mode,
            parts.len(),
            self.is_ready(),
            first.peers,
            parts.iter().flatten().map(|p| p.peers_up).min().unwrap_or(0),
            parts.iter().flatten().map(|p| p.conns_up).sum::<usize>(),
        );
        for (i, (_, t)) in tenants.iter().enumerate() {
            let _ = write!(s, "{}{t}", if i > 0 { "," } else { "" });
        }
        s.push_str("]}\n");
        s
    }

    /// The Prometheus text exposition.
    pub fn encode(&self) -> String {
        let mut out = String::new();
        if let Err(e) = prometheus_client::encoding::text::encode(&mut out, &self.registry) {
            log::warn!("encoding metrics: {e}");
        }
        out
    }

    fn answer(&self, path: &str) -> (StatusCode, &'static str, String) {
        match path {
            "/metrics" => (StatusCode::OK, "application/openmetrics-text; version=1.0.0; charset=utf-8", self.encode()),
            "/status" => (StatusCode::OK, "application/json", self.status()),
            "/ready" if self.is_ready() => (StatusCode::OK, "text/plain", "ready\n".into()),
            "/ready" => (StatusCode::SERVICE_UNAVAILABLE, "text/plain", "not ready\n".into()),
            _ => (StatusCode::NOT_FOUND, "text/plain", "not found: try /metrics, /status or /ready\n".into()),
        }
    }
}

/// How many connections the metrics endpoint serves at once (more wait in
/// the listen backlog): each holds a descriptor of the agent's, which its
/// data path needs too (rings, fabric).
const METRICS_CONNS: usize = 64;
/// How long a connection may take to send a request's head (an idle
/// keep-alive connection included), and how long one lives in all.
const METRICS_HEAD_WITHIN: Duration = Duration::from_secs(10);
const METRICS_CONN_LIFETIME: Duration = Duration::from_secs(60);
/// Pause after a failed accept (out of descriptors, say), which would
/// otherwise be retried at once, a core spinning.
const METRICS_ACCEPT_PAUSE: Duration = Duration::from_millis(100);

/// Serves `GET /metrics`, `/status` and `/ready` on `addr` from a thread of
/// its own until the process ends. The port is bound before this returns,
/// so a taken port is an error here. An address this machine does not have
/// yet is bound all the same and answers once it appears (see `listen`).
/// At most `METRICS_CONNS` connections at once, each closed when it
/// sends no request head within `METRICS_HEAD_WITHIN` and after
/// `METRICS_CONN_LIFETIME` in all.
pub fn serve(addr: SocketAddr, m: Arc<Metrics>) -> std::io::Result<(SocketAddr, JoinHandle<()>)> {
    serve_with(addr, m, METRICS_HEAD_WITHIN, METRICS_CONN_LIFETIME)
}

fn serve_with(
    addr: SocketAddr,
    m: Arc<Metrics>,
    head_within: Duration,
    lifetime: Duration,
) -> std::io::Result<(SocketAddr, JoinHandle<()>)> {
    let std_listener = listen(addr)?;
    let local = std_listener.local_addr()?;
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
    let t = std::thread::Builder::new().name("metrics".into()).spawn(move || {
        rt.block_on(async move {
            let listener = match tokio::net::TcpListener::from_std(std_listener) {
                Ok(l) => l,
                Err(e) => {
                    log::error!("metrics listener: {e}");
                    return;
                }
            };
            let slots = Arc::new(tokio::sync::Semaphore::new(METRICS_CONNS));
            loop {
                let Ok(slot) = slots.clone().acquire_owned().await else { return };
                let stream = match listener.accept().await {
                    Ok((stream, _)) => stream,
                    Err(e) => {
                        log::debug!("metrics: accept failed: {e}");
                        tokio::time::sleep(METRICS_ACCEPT_PAUSE).await;
                        continue;
                    }
                };
                let m = m.clone();
                tokio::spawn(async move {
                    let _slot = slot;
                    let svc = hyper::service::service_fn(move |req: Request<hyper::body::Incoming>| {
                        let m = m.clone();
                        async move {
                            let (status, ctype, body) = if req.method() == hyper::Method::GET {
                                m.answer(req.uri().path())
                            } else {
                                (StatusCode::METHOD_NOT_ALLOWED, "text/plain", "GET only\n".into())
                            };
                            Response::builder()
                                .status(status)
                                .header(hyper::header::CONTENT_TYPE, ctype)
                                .body(Full::new(Bytes::from(body)))
                        }
                    });
                    let io = hyper_util::rt::TokioIo::new(stream);
                    let conn = hyper::server::conn::http1::Builder::new()
                        .timer(hyper_util::rt::TokioTimer::new())
                        .header_read_timeout(head_within)
                        .serve_connection(io, svc);
                    if let Ok(Err(e)) = tokio::time::timeout(lifetime, conn).await {
                        log::debug!("metrics connection: {e}");
                    }
                });
            }
        });
    })?;
    Ok((local, t))
}

/// A non-blocking listener on `addr`, bound with `IP_FREEBIND`: on a
/// BlueField the address to serve on is the tmfifo interface's (reachable
/// from the host only, not from the fabric network), and that interface may
/// come up after the agent starts. A plain bind would fail then
/// (`EADDRNOTAVAIL`) and the agent would not start; this one takes the
/// address now and accepts connections once the address is configured.
/// (`SO_REUSEADDR` as std's bind sets it: a restarted agent binds while
/// the old one's connections linger in TIME_WAIT.)
fn listen(addr: SocketAddr) -> std::io::Result<std::net::TcpListener> {
    use rustix::net::{AddressFamily, SocketFlags, SocketType, bind, listen, socket_with, sockopt};
    let family = if addr.is_ipv4() { AddressFamily::INET } else { AddressFamily::INET6 };
    let fd = socket_with(family, SocketType::STREAM, SocketFlags::CLOEXEC | SocketFlags::NONBLOCK, None)?;
    sockopt::set_socket_reuseaddr(&fd, true)?;
    if addr.is_ipv4() {
        sockopt::set_ip_freebind(&fd, true)?;
    } else {
        sockopt::set_ipv6_freebind(&fd, true)?;
    }
    bind(&fd, &addr)?;
    listen(&fd, 128)?;
    Ok(std::net::TcpListener::from(fd))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn one_node() -> config::Cluster {
        let text = "[[node]]\nname = \"n0\"\naddress = \"127.0.0.1:1\"\nruntime_dir = \"/tmp/dne-metrics-test\"\n\n[[tenant]]\nname = \"t\"\nweight = 1\nbuf_size = 1024\nbuffers = 64\nrecv_quota = 8\n";
        config::Cluster::parse(text).unwrap()
    }

    /// A connection that sends nothing is closed (it held one of the
    /// agent's descriptors for as long as the client liked), and so is
    /// one that lives too long; the endpoint serves on.
    #[test]
    fn idle_and_old_metrics_connections_are_closed() {
        use std::io::{Read, Write};
        let serve = |head: Duration, life: Duration| {
            serve_with("127.0.0.1:0".parse().unwrap(), Arc::new(Metrics::new(&one_node(), "n0")), head, life).unwrap().0
        };
        let read_to_end = |s: &mut std::net::TcpStream| {
            s.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
            let mut all = Vec::new();
            s.read_to_end(&mut all).map(|_| all)
        };
        // Idle: closed by the head timeout (the lifetime is far).
        let quick_head = serve(Duration::from_millis(300), Duration::from_secs(600));
        let mut idle = std::net::TcpStream::connect(quick_head).unwrap();
        assert!(read_to_end(&mut idle).expect("closed, not timed out").is_empty());
        // Busy: keep-alive requests until the lifetime ends it (the head
        // timeout is far).
        let short_life = serve(Duration::from_secs(600), Duration::from_secs(1));
        let mut old = std::net::TcpStream::connect(short_life).unwrap();
        old.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
        let mut answers = 0;
        let mut buf = [0u8; 4096];
        loop {
            if old.write_all(b"GET /ready HTTP/1.1\r\nhost: x\r\n\r\n").is_err() {
                break;
            }
            match old.read(&mut buf) {
                Ok(0) | Err(_) => break,
                Ok(_) => answers += 1,
            }
            assert!(answers < 100_000, "never closed");
            std::thread::sleep(Duration::from_millis(20));
        }
        assert!(answers >= 1, "{answers}");
        // And a new connection is served.
        let mut fresh = std::net::TcpStream::connect(short_life).unwrap();
        fresh.write_all(b"GET /ready HTTP/1.1\r\nhost: x\r\nconnection: close\r\n\r\n").unwrap();
        let answer = read_to_end(&mut fresh).unwrap();
        assert!(answer.starts_with(b"HTTP/1.1 "), "{}", String::from_utf8_lossy(&answer));
    }

    /// One GET of `/ready` on `addr`: the answer's status line.
    fn ready_status(addr: SocketAddr) -> std::io::Result<String> {
        use std::io::{Read, Write};
        let mut s = std::net::TcpStream::connect_timeout(&addr, Duration::from_secs(10))?;
        s.set_read_timeout(Some(Duration::from_secs(30)))?;
        s.write_all(b"GET /ready HTTP/1.1\r\nhost: x\r\nconnection: close\r\n\r\n")?;
        let mut all = Vec::new();
        s.read_to_end(&mut all)?;
        Ok(String::from_utf8_lossy(&all).lines().next().unwrap_or("").to_owned())
    }

    /// The endpoint binds an address this machine does not have (yet),
    /// and answers on it once the address is configured: the tmfifo
    /// interface of a BlueField may come up after the agent starts. The
    /// first half runs anywhere (192.0.2.0/24 is never local); the second,
    /// which adds the address, runs in a network namespace of its own and
    /// needs root.
    #[test]
    #[allow(clippy::print_stdout)] // the skip notice
    fn metrics_bind_an_address_before_it_exists_and_answer_once_it_does() {
        let m = || Arc::new(Metrics::new(&one_node(), "n0"));
        let (early, _t) = serve("192.0.2.1:0".parse().unwrap(), m()).expect("bound before the address exists");
        assert_eq!(early.ip().to_string(), "192.0.2.1");
        if !rustix::process::geteuid().is_root() {
            println!("skipped the namespace half: needs root");
            return;
        }
        // A thread of its own enters a new network namespace (namespaces
        // are per thread); its sockets and the processes it starts live
        // there, the rest of the test binary does not.
        std::thread::spawn(move || {
            nix::sched::unshare(nix::sched::CloneFlags::CLONE_NEWNET).expect("unshare");
            let ip = |args: &[&str]| {
                let st = std::process::Command::new("ip").args(args).status().expect("`ip` (iproute2) runs");
                assert!(st.success(), "ip {args:?}: {st}");
            };
            ip(&["link", "set", "lo", "up"]);
            let (addr, _t) = serve("10.253.0.1:0".parse().unwrap(), m()).expect("bound before the address exists");
            assert!(ready_status(addr).is_err(), "the address is not there yet");
            ip(&["addr", "add", "10.253.0.1/32", "dev", "lo"]);
            let status = ready_status(addr).expect("answers once the address exists");
            assert!(status.starts_with("HTTP/1.1 503"), "{status}");
        })
        .join()
        .expect("the namespace half");
    }

    #[test]
    fn latency_buckets_are_powers_of_two_microseconds() {
        assert_eq!(latency_bucket(0), 0);
        assert_eq!(latency_bucket(1000), 0);
        assert_eq!(latency_bucket(1001), 1);
        assert_eq!(latency_bucket(2000), 1);
        assert_eq!(latency_bucket(2001), 2);
        assert_eq!(latency_bucket(4000), 2);
        assert_eq!(latency_bucket(1000 << 23), 23);
        assert_eq!(latency_bucket((1000 << 23) + 1), LATENCY_BUCKETS);
        assert_eq!(latency_bucket(u64::MAX), LATENCY_BUCKETS);
    }

    #[test]
    fn tallies_reach_the_text_output_as_a_cumulative_histogram() {
        let mut reg = Registry::default();
        let lat = Latency::default();
        reg.register("lat", "test", lat.clone());
        let mut local = LocalLatency::default();
        for ns in [500, 1500, 1500, 3000, u64::from(u32::MAX) * 10] {
            local.observe_ns(ns);
        }
        lat.add(&mut local);
        lat.add(&mut local); // empty: adds nothing
        assert_eq!(lat.count(), 5);
        let mut text = String::new();
        prometheus_client::encoding::text::encode(&mut text, &reg).unwrap();
        assert!(text.contains("# TYPE lat histogram"), "{text}");
        assert!(text.contains("lat_count 5"), "{text}");
        assert!(text.contains("lat_bucket{le=\"0.000001\"} 1"), "{text}");
        assert!(text.contains("lat_bucket{le=\"0.000002\"} 3"), "{text}");
        assert!(text.contains("lat_bucket{le=\"0.000004\"} 4"), "{text}");
        assert!(text.contains("lat_bucket{le=\"+Inf\"} 5"), "{text}");
    }
}

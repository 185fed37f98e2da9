//! The engine: one data-plane thread that moves every tenant's messages
//! between the host and the fabric (DESIGN.md sections 3 and 5).
//!
//! Per loop iteration, with no allocation and no lock on the way:
//! 1. **uplink**: take descriptors functions pushed into each tenant's
//!    uplink ring (validated and accepted against the tenant pool by the
//!    host link), route them: to a peer node's send queue, to a local
//!    function, or back to the sender as an error descriptor;
//! 2. **schedule**: one weighted deficit round robin round over the tenants'
//!    send queues ([`crate::sched`]); a message goes out as one fabric send
//!    per buffer, straight from the pool (the fabric header is written into
//!    each buffer's headroom), only when its connection has credits;
//! 3. **complete**: poll the fabric in batches: finished sends free their
//!    buffers (or return the message to its sender as an error when the
//!    peer failed); received fragments are collected per connection into a
//!    chain and delivered to the destination function's ring as one
//!    descriptor; every consumed receive is replaced at once with a fresh
//!    buffer of the same tenant's pool (its quota stays posted);
//! 4. **redeliver** messages whose destination ring was full.
//!
//! Every millisecond or so it also runs the mesh (fabric connection setup
//! and repair), checks that host-shimd is alive, and publishes gauges.
//!
//! Isolation: each tenant has its own pool, uplink ring, send queue and
//! fabric connection per peer, and so its own receives and credits; a
//! message received on tenant A's connection lands in A's pool and can
//! only be delivered to A's functions.

use crate::metrics::{Drop as Why, Metrics};
use crate::sched::{Backlog, Drr, QUANTUM};
use config::Cluster;
use fabric::{
    Completion, CompletionError, ConnId, DocaTransport, Endpoint, EndpointConfig, HEADER_LEN, HEADROOM, Memory, Mesh,
    MeshConfig, MeshEvent, RecvWr, RegionId, SendWr,
};
use host_shim::{Function, Msg, SendErrorKind};
use shm::pool::Lease;
use std::collections::VecDeque;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};
use wire::desc::NO_NODE;
use wire::{DescFlags, Descriptor, ErrorCode, FabricHeader, Immediate, MsgKind};
use zerocopy::{FromBytes, IntoBytes};

/// Where the fabric header sits in a buffer: at the end of the headroom,
/// so header and payload are one contiguous send and land the same way.
const HDR_OFF: u64 = HEADROOM as u64 - HEADER_LEN as u64;
/// Descriptors taken from one uplink per iteration.
const UPLINK_BATCH: usize = 32;
/// Sends of one connection queued in the endpoint before the scheduler
/// holds the tenant back (keeps the scheduler, not the endpoint's FIFO, in
/// charge of who goes next).
const ENDPOINT_QUEUE_HIGH: usize = 64;
/// How often the control work runs.
const CONTROL_EVERY: Duration = Duration::from_millis(1);
/// Token bit of receive work requests.
const RECV_TOKEN: u64 = 1 << 63;

/// How the engine ended.
#[derive(Debug, PartialEq, Eq)]
pub enum Exit {
    /// Asked to stop.
    Stopped,
    /// host-shimd went away: the caller re-attaches and starts a new engine.
    HostLost,
}

/// Engine settings.
#[derive(Clone, Debug)]
pub struct Settings {
    /// This node's id.
    pub node: u16,
    /// Idle policy: after this long without work, the loop sleeps briefly
    /// between polls (emulated mode shares cores with everything else);
    /// `None` spins forever (a DPU core of its own).
    pub idle_sleep_after: Option<Duration>,
}

/// A message waiting for the scheduler.
#[derive(Debug)]
struct Out {
    msg: Msg,
    peer: u16,
    since: Instant,
}

/// A message being sent.
#[derive(Debug)]
struct Flight {
    tenant: u16,
    msg: Option<Msg>,
    /// Fragment sends not completed yet.
    left: u32,
    error: Option<CompletionError>,
    since: Instant,
}

/// A posted receive.
#[derive(Debug)]
struct Posted {
    tenant: u16,
    lease: Lease,
}

/// One fabric connection (per peer and tenant).
#[derive(Debug)]
struct Conn {
    peer: u16,
    tenant: u16,
    up: bool,
    /// Fragments of the chain being received, and its first header.
    parts: Vec<Lease>,
    first: Option<Descriptor>,
    /// Receives posted now, and how many should be.
    posted: u32,
    want: u32,
}

#[derive(Debug)]
struct Tenant {
    id: u16,
    link: Function,
    region: RegionId,
    queue: VecDeque<Out>,
    /// Local deliveries waiting for room in the destination ring.
    backlog: VecDeque<Msg>,
    /// Receives each connection of this tenant keeps posted.
    per_conn: u32,
}

/// A fixed table with a free list.
#[derive(Debug)]
struct Table<T> {
    items: Vec<Option<T>>,
    free: Vec<u32>,
}

impl<T> Table<T> {
    fn new(n: usize) -> Self {
        Self { items: (0..n).map(|_| None).collect(), free: (0..n as u32).rev().collect() }
    }
    fn insert(&mut self, v: T) -> Option<u32> {
        let i = self.free.pop()?;
        self.items[i as usize] = Some(v);
        Some(i)
    }
    fn get_mut(&mut self, i: u64) -> Option<&mut T> {
        self.items.get_mut(usize::try_from(i).ok()?)?.as_mut()
    }
    fn remove(&mut self, i: u64) -> Option<T> {
        let i32_ = u32::try_from(i).ok()?;
        let v = self.items.get_mut(i32_ as usize)?.take()?;
        self.free.push(i32_);
        Some(v)
    }
    fn room(&self) -> usize {
        self.free.len()
    }
}

/// The engine of one node.
pub struct Engine {
    cfg: Arc<Cluster>,
    set: Settings,
    /// Node of each function id.
    fn_node: Vec<u16>,
    /// Number of fabric nodes (worker nodes and ingresses).
    fabric_nodes: u16,
    tenants: Vec<Tenant>,
    ep: Endpoint<DocaTransport>,
    mesh: Mesh,
    conns: Vec<Option<Conn>>,
    flights: Table<Flight>,
    posted: Table<Posted>,
    drr: Drr,
    metrics: Arc<Metrics>,
    events: Vec<MeshEvent>,
    comps: Vec<Completion>,
    next_status: Instant,
}

impl core::fmt::Debug for Engine {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        f.debug_struct("Engine").field("node", &self.set.node).finish_non_exhaustive()
    }
}

fn addr(cfg: &Cluster, id: u16) -> anyhow::Result<SocketAddr> {
    let a = cfg.fabric_address(id).ok_or_else(|| anyhow::anyhow!("no fabric node {id}"))?;
    Ok(a.parse()?)
}

impl Engine {
    /// Builds the engine over attached host links (one per tenant, in
    /// tenant order): registers each pool with the fabric, starts the mesh.
    pub fn new(cfg: Arc<Cluster>, set: Settings, links: Vec<Function>, metrics: Arc<Metrics>) -> anyhow::Result<Self> {
        let me = set.node;
        let fabric_nodes = (cfg.nodes.len() + cfg.ingresses.len()) as u16;
        let peers: Vec<(u16, SocketAddr)> =
            (0..fabric_nodes).filter(|&i| i != me).map(|i| Ok((i, addr(&cfg, i)?))).collect::<anyhow::Result<_>>()?;
        let npeers = peers.len().max(1) as u32;
        let per_conn: Vec<u32> = cfg.tenants.iter().map(|t| (t.recv_quota / npeers).max(2)).collect();
        let max_buf = cfg.tenants.iter().map(|t| t.buf_size).max().unwrap_or(16384);
        let max_chain = cfg.tenants.iter().map(|t| t.max_chain).max().unwrap_or(64);
        let ecfg = EndpointConfig {
            max_conns: (cfg.tenants.len() as u32) * npeers * 2 + 4,
            max_regions: cfg.tenants.len() as u32 + 1,
            send_window: 64,
            recv_depth: per_conn.iter().copied().max().unwrap_or(2) + 1,
            send_queue: 2 * max_chain + 2 * ENDPOINT_QUEUE_HIGH as u32,
            max_msg: max_buf,
            max_chain: u16::try_from(max_chain).unwrap_or(u16::MAX),
            batch: 64,
        };
        let my_addr = addr(&cfg, me)?;
        let transport =
            DocaTransport::new(open_device(my_addr)?, ecfg.max_conns, ecfg.send_window + 1 + ecfg.recv_depth)
                .map_err(|e| anyhow::anyhow!("opening the fabric device: {e}"))?;
        let mut ep = Endpoint::new(transport, ecfg);
        let mut tenants = Vec::with_capacity(links.len());
        for (t, link) in links.into_iter().enumerate() {
            // The fabric gets its own mapping of the pool's memory.
            let fd = link.pool().region().fd().try_clone_to_owned()?;
            let region = Arc::new(shm::Region::open(fd)?);
            let region = ep.register(Memory::Local(region)).map_err(|e| anyhow::anyhow!("registering a pool: {e}"))?;
            tenants.push(Tenant {
                id: t as u16,
                link,
                region,
                queue: VecDeque::with_capacity(host_shim::daemon::UPLINK_CAPACITY as usize),
                backlog: VecDeque::with_capacity(1024),
                per_conn: per_conn[t],
            });
        }
        let now = Instant::now();
        let weights: Vec<(u32, Option<u64>)> =
            cfg.tenants.iter().map(|t| (t.weight, t.rate_cap_mbps.map(|m| u64::from(m) * 1_000_000))).collect();
        let name = cfg.nodes[usize::from(me)].name.clone();
        let mesh = Mesh::start(MeshConfig {
            me,
            name,
            listen: my_addr,
            peers,
            tenants: (0..cfg.tenants.len() as u16).collect(),
            backoff_max: Duration::from_secs(1),
        })
        .map_err(|e| anyhow::anyhow!("fabric control listener on {my_addr}: {e}"))?;
        let inflight = cfg.tenants.len() * host_shim::daemon::UPLINK_CAPACITY as usize;
        let recvs: usize = per_conn.iter().map(|&p| (p as usize + 1) * npeers as usize * 2).sum();
        Ok(Self {
            fn_node: cfg.functions.iter().map(|f| cfg.node_id(&f.node).unwrap_or(NO_NODE)).collect(),
            fabric_nodes,
            drr: Drr::new(&weights, QUANTUM, now),
            cfg,
            set,
            tenants,
            ep,
            mesh,
            conns: Vec::new(),
            flights: Table::new(inflight),
            posted: Table::new(recvs),
            metrics,
            events: Vec::with_capacity(64),
            comps: vec![Completion::EMPTY; 64],
            next_status: now,
        })
    }

    /// Runs until `stop` is set or host-shimd goes away.
    pub fn run(&mut self, stop: &AtomicBool) -> Exit {
        let mut next_control = Instant::now();
        let mut idle_since = Instant::now();
        loop {
            let now = Instant::now();
            if now >= next_control {
                if stop.load(Ordering::Relaxed) {
                    return Exit::Stopped;
                }
                if !self.tenants.iter().all(|t| t.link.shimd_alive()) {
                    return Exit::HostLost;
                }
                self.control(now);
                next_control = now + CONTROL_EVERY;
            }
            let mut work = self.uplink(now);
            work += self.schedule(now);
            work += self.complete(now);
            work += self.redeliver();
            if work > 0 {
                idle_since = now;
            } else if let Some(after) = self.set.idle_sleep_after
                && now.duration_since(idle_since) > after
            {
                // Idle: the uplinks and the fabric are checked every 50 us
                // instead of continuously.
                std::thread::sleep(Duration::from_micros(50));
            } else {
                std::hint::spin_loop();
            }
        }
    }

    fn control(&mut self, now: Instant) {
        let mut events = std::mem::take(&mut self.events);
        self.mesh.pump(&mut self.ep, &mut events);
        for e in events.drain(..) {
            match e {
                MeshEvent::Opened { peer, tenant, conn } => self.opened(peer, tenant, conn),
                MeshEvent::PeerDown { peer, conns } => self.peer_down(peer, &conns),
            }
        }
        self.events = events;
        // Receives that could not be posted (pool empty) are retried here.
        for i in 0..self.conns.len() {
            self.refill(ConnId::new(i as u32));
        }
        self.metrics.peers_up.set(i64::from(self.mesh.peers_up()));
        for t in &self.tenants {
            let m = &self.metrics.tenants[usize::from(t.id)];
            m.queue_depth.set(t.queue.len() as i64);
            let credits: u32 = self
                .conns
                .iter()
                .enumerate()
                .filter_map(|(i, c)| c.as_ref().filter(|c| c.tenant == t.id && c.up).map(|_| i))
                .map(|i| self.ep.credits(ConnId::new(i as u32)))
                .sum();
            m.credits.set(i64::from(credits));
            let posted: u32 = self.conns.iter().flatten().filter(|c| c.tenant == t.id).map(|c| c.posted).sum();
            m.recvs_posted.set(i64::from(posted));
        }
        self.metrics.set_ready(true);
        if now >= self.next_status {
            self.next_status = now + Duration::from_millis(100);
            self.metrics.set_status(self.status_json());
        }
    }

    /// The `/status` document.
    fn status_json(&self) -> String {
        use std::fmt::Write as _;
        let node = &self.cfg.nodes[usize::from(self.set.node)];
        let conns_up = self.conns.iter().flatten().filter(|c| c.up).count();
        let mut s = format!(
            "{{\"node\":\"{}\",\"mode\":\"{:?}\",\"ready\":{},\"peers\":{},\"peers_up\":{},\"conns_up\":{conns_up},\"tenants\":[",
            node.name,
            node.mode,
            self.metrics.is_ready(),
            self.fabric_nodes - 1,
            self.mesh.peers_up()
        );
        for (i, t) in self.tenants.iter().enumerate() {
            let m = &self.metrics.tenants[i];
            let _ = write!(
                s,
                "{}{{\"name\":\"{}\",\"queue\":{},\"backlog\":{},\"tx_messages\":{},\"rx_messages\":{},\"free_buffers\":{},\"drops\":{{",
                if i > 0 { "," } else { "" },
                self.cfg.tenants[i].name,
                t.queue.len(),
                t.backlog.len(),
                m.tx_msgs.get(),
                m.rx_msgs.get(),
                t.link.pool().free_buffers(),
            );
            for (k, w) in Why::ALL.iter().enumerate() {
                let _ = write!(s, "{}\"{}\":{}", if k > 0 { "," } else { "" }, w.as_str(), m.drops(*w));
            }
            s.push_str("}}");
        }
        s.push_str("]}\n");
        s
    }

    fn opened(&mut self, peer: u16, tenant: u16, conn: ConnId) {
        let i = conn.index() as usize;
        if self.conns.len() <= i {
            self.conns.resize_with(i + 1, || None);
        }
        let want = self.tenants[usize::from(tenant)].per_conn;
        // A reused id: whatever the old connection left is gone by now (its
        // operations completed before the endpoint reused it).
        self.conns[i] =
            Some(Conn { peer, tenant, up: false, parts: Vec::with_capacity(64), first: None, posted: 0, want });
        self.refill(conn);
    }

    fn peer_down(&mut self, peer: u16, conns: &[ConnId]) {
        for &c in conns {
            if let Some(Some(st)) = self.conns.get_mut(c.index() as usize) {
                st.up = false;
                let parts = std::mem::take(&mut st.parts);
                let t = usize::from(st.tenant);
                for l in parts {
                    free_lease(&mut self.tenants[t].link, l);
                }
                st.first = None;
            }
        }
        // Messages queued for the peer go back to their senders.
        for t in 0..self.tenants.len() {
            let mut k = 0;
            while k < self.tenants[t].queue.len() {
                if self.tenants[t].queue[k].peer == peer {
                    if let Some(out) = self.tenants[t].queue.remove(k) {
                        self.bounce(t, out.msg, ErrorCode::Unreachable, Why::Unreachable);
                    }
                } else {
                    k += 1;
                }
            }
        }
    }

    /// Posts receives on `conn` until it has its share.
    fn refill(&mut self, conn: ConnId) {
        let Some(Some(st)) = self.conns.get_mut(conn.index() as usize) else { return };
        let t = usize::from(st.tenant);
        while st.posted < st.want {
            let tenant = &mut self.tenants[t];
            let cap = tenant.link.pool().geometry().payload_cap();
            let Ok(msg) = tenant.link.alloc(cap) else {
                self.metrics.tenants[t].drop(Why::NoBuffer);
                return;
            };
            let (lease, _) = msg.into_parts();
            let Some(off) = tenant.link.pool().buf_offset(lease.head()) else {
                free_lease(&mut tenant.link, lease);
                return;
            };
            let len = tenant.link.pool().geometry().buf_size() - HDR_OFF as u32;
            let region = tenant.region;
            let Some(token) = self.posted.insert(Posted { tenant: t as u16, lease }) else {
                return;
            };
            let wr = RecvWr { region, offset: off + HDR_OFF, len, token: RECV_TOKEN | u64::from(token) };
            if let Err(e) = self.ep.post_recv(conn, wr) {
                log::debug!("posting a receive on {conn:?}: {e}");
                if let Some(p) = self.posted.remove(u64::from(token)) {
                    free_lease(&mut self.tenants[t].link, p.lease);
                }
                return;
            }
            st.posted += 1;
        }
    }

    /// Takes descriptors off the uplinks and routes them.
    fn uplink(&mut self, now: Instant) -> usize {
        let mut n = 0;
        for t in 0..self.tenants.len() {
            for _ in 0..UPLINK_BATCH {
                if self.tenants[t].queue.len() >= self.tenants[t].queue.capacity() {
                    break;
                }
                let Some(msg) = self.tenants[t].link.try_recv() else { break };
                n += 1;
                self.metrics.tenants[t].uplink_msgs.inc();
                self.route(t, msg, now);
            }
        }
        n
    }

    /// Where a message from a local function goes.
    fn route(&mut self, t: usize, msg: Msg, now: Instant) {
        let d = *msg.desc();
        let peer = if d.flags & DescFlags::REPLY != 0 {
            // Replies travel to the ingress that originated the request.
            if d.origin == NO_NODE || d.origin >= self.fabric_nodes || d.origin == self.set.node {
                self.drop_msg(t, msg, Why::BadOrigin);
                return;
            }
            d.origin
        } else {
            match self.fn_node.get(usize::from(d.dst_fn)) {
                None => return self.bounce(t, msg, ErrorCode::UnknownFunction, Why::UnknownFunction),
                Some(&n) if n == self.set.node => {
                    self.deliver(t, msg);
                    return;
                }
                Some(&n) => n,
            }
        };
        match self.mesh.conn(peer, t as u16) {
            Some(c) if self.conns.get(c.index() as usize).is_some_and(|s| s.as_ref().is_some_and(|s| s.up)) => {
                self.tenants[t].queue.push_back(Out { msg, peer, since: now });
            }
            _ => self.bounce(t, msg, ErrorCode::Unreachable, Why::Unreachable),
        }
    }

    /// One scheduler round.
    fn schedule(&mut self, now: Instant) -> usize {
        if self.tenants.iter().all(|t| t.queue.is_empty()) {
            return 0;
        }
        let mut drr = std::mem::replace(&mut self.drr, Drr::new(&[], 1, now));
        let n = drr.round(self, now);
        self.drr = drr;
        n
    }

    fn conn_for(&self, t: usize, peer: u16) -> Option<ConnId> {
        self.mesh.conn(peer, t as u16)
    }

    /// Posts every fragment of `out` on `conn`.
    fn post(&mut self, t: usize, conn: ConnId, out: Out) {
        let Out { msg, peer, since } = out;
        let frags = msg.frags();
        let Some(token) = self.flights.insert(Flight { tenant: t as u16, msg: None, left: 0, error: None, since })
        else {
            // Sized for every uplink slot: cannot happen; keep the message.
            self.tenants[t].queue.push_front(Out { msg, peer, since });
            return;
        };
        let d = *msg.desc();
        let tenant = &self.tenants[t];
        let pool = tenant.link.pool();
        let cap = pool.geometry().payload_cap();
        let count = u16::try_from(frags).unwrap_or(u16::MAX);
        let mut posted = 0;
        let mut error = None;
        let (lease, desc) = msg.into_parts();
        for (k, idx) in pool.chain(&lease).enumerate() {
            let k = k as u16;
            let flen = wire::desc::frag_len(lease.len(), cap, u32::from(k));
            let Some(off) = pool.buf_offset(idx) else {
                error = Some(CompletionError::Transport(-1));
                break;
            };
            let h = FabricHeader::new(MsgKind::Data, desc, k, count, flen);
            if pool.region().copy_in(off + HDR_OFF, h.as_bytes()).is_err() {
                error = Some(CompletionError::Transport(-1));
                break;
            }
            let imm = Immediate::new(MsgKind::Data as u8, d.dst_fn, k == 0, k + 1 == count).0;
            let wr = SendWr {
                region: tenant.region,
                offset: off + HDR_OFF,
                len: HEADER_LEN as u32 + flen,
                imm,
                token: u64::from(token),
            };
            match self.ep.post_send(conn, wr) {
                Ok(()) => posted += 1,
                Err(e) => {
                    log::debug!("send to node {peer} failed to post: {e}");
                    error = Some(CompletionError::Closed);
                    break;
                }
            }
        }
        let msg = Msg::from_parts(lease, desc);
        if posted == 0 {
            self.flights.remove(u64::from(token));
            self.bounce(t, msg, ErrorCode::Unreachable, Why::Unreachable);
            return;
        }
        if let Some(f) = self.flights.get_mut(u64::from(token)) {
            f.msg = Some(msg);
            f.left = posted;
            f.error = error;
        }
    }

    /// Polls the fabric once.
    fn complete(&mut self, now: Instant) -> usize {
        let mut comps = std::mem::take(&mut self.comps);
        let n = self.ep.poll(&mut comps);
        for c in &comps[..n] {
            match *c {
                Completion::Connected(conn) => {
                    if let Some(Some(st)) = self.conns.get_mut(conn.index() as usize) {
                        st.up = true;
                        log::info!(
                            "fabric: tenant {} connected to node {}",
                            self.cfg.tenants[usize::from(st.tenant)].name,
                            st.peer
                        );
                    }
                }
                Completion::ConnFailed { conn, error } => {
                    if let Some(Some(st)) = self.conns.get_mut(conn.index() as usize) {
                        log::warn!("fabric: connection to node {} failed: {error}", st.peer);
                        if matches!(error, CompletionError::Protocol(_)) {
                            self.metrics.tenants[usize::from(st.tenant)].drop(Why::Protocol);
                        }
                        st.up = false;
                        let peer = st.peer;
                        self.mesh.peer_failed(peer);
                    }
                }
                Completion::Sent { token, result, .. } => self.sent(token, result, now),
                Completion::Received { conn, token, result } => self.received(conn, token, result),
            }
        }
        self.comps = comps;
        n
    }

    fn sent(&mut self, token: u64, result: Result<(), CompletionError>, now: Instant) {
        let Some(f) = self.flights.get_mut(token) else { return };
        if let Err(e) = result {
            f.error.get_or_insert(e);
        }
        f.left = f.left.saturating_sub(1);
        if f.left > 0 {
            return;
        }
        let Some(f) = self.flights.remove(token) else { return };
        let t = usize::from(f.tenant);
        let Some(msg) = f.msg else { return };
        match f.error {
            None => {
                let m = &self.metrics.tenants[t];
                m.tx_msgs.inc();
                m.tx_bytes.inc_by(u64::from(msg.len()));
                m.latency.observe(now.saturating_duration_since(f.since).as_secs_f64());
                if let Err(e) = self.tenants[t].link.free(msg) {
                    log::warn!("freeing a sent message: {e}");
                }
            }
            Some(_) => self.bounce(t, msg, ErrorCode::PeerDied, Why::PeerDied),
        }
    }

    fn received(&mut self, conn: ConnId, token: u64, result: Result<fabric::Received, CompletionError>) {
        let Some(p) = self.posted.remove(token & !RECV_TOKEN) else { return };
        let t = usize::from(p.tenant);
        let Some(Some(st)) = self.conns.get_mut(conn.index() as usize) else {
            free_lease(&mut self.tenants[t].link, p.lease);
            return;
        };
        st.posted = st.posted.saturating_sub(1);
        let r = match result {
            Ok(r) => r,
            Err(_) => {
                free_lease(&mut self.tenants[t].link, p.lease);
                return;
            }
        };
        // The endpoint checked the header against the immediate and the
        // chain order; read the descriptor it carries.
        let h = {
            let pool = self.tenants[t].link.pool();
            let mut hdr = [0u8; HEADER_LEN];
            pool.buf_offset(p.lease.head())
                .filter(|off| pool.region().copy_out(off + HDR_OFF, &mut hdr).is_ok())
                .and_then(|_| FabricHeader::read_from_bytes(&hdr).ok())
        };
        let Some(h) = h else {
            free_lease(&mut self.tenants[t].link, p.lease);
            return;
        };
        let Some(Some(st)) = self.conns.get_mut(conn.index() as usize) else {
            free_lease(&mut self.tenants[t].link, p.lease);
            return;
        };
        if r.frag.index == 0 {
            st.first = Some(h.desc);
        }
        st.parts.push(p.lease);
        let last = r.frag.last;
        self.refill(conn);
        if !last {
            return;
        }
        let Some(Some(st)) = self.conns.get_mut(conn.index() as usize) else { return };
        let Some(first) = st.first.take() else { return };
        let mut parts = std::mem::take(&mut st.parts);
        let tenant = &mut self.tenants[t];
        match tenant.link.pool().join(&mut parts, first.len) {
            Ok(lease) => {
                // The connection's tenant, not what the peer wrote, says
                // whose message this is.
                let desc = Descriptor { tenant: t as u16, ..first };
                let msg = Msg::from_parts(lease, desc);
                let m = &self.metrics.tenants[t];
                m.rx_msgs.inc();
                m.rx_bytes.inc_by(u64::from(msg.len()));
                self.deliver(t, msg);
            }
            Err(e) => {
                log::warn!("fabric: a chain from node {} does not add up: {e}", self.conns_peer(conn));
                self.metrics.tenants[t].drop(Why::Protocol);
                for l in parts.drain(..) {
                    free_lease(&mut self.tenants[t].link, l);
                }
            }
        }
        if let Some(Some(st)) = self.conns.get_mut(conn.index() as usize) {
            st.parts = parts;
        }
    }

    fn conns_peer(&self, conn: ConnId) -> u16 {
        self.conns.get(conn.index() as usize).and_then(|c| c.as_ref()).map_or(NO_NODE, |c| c.peer)
    }

    /// Hands a message to a local function (the destination, or for error
    /// descriptors the original sender).
    fn deliver(&mut self, t: usize, msg: Msg) {
        let d = *msg.desc();
        if d.flags & DescFlags::REPLY != 0 && d.flags & DescFlags::ERROR == 0 {
            // A reply never ends on a worker node.
            return self.drop_msg(t, msg, Why::BadOrigin);
        }
        let f = usize::from(d.dst_fn);
        let ours = self.fn_node.get(f) == Some(&self.set.node)
            && self.cfg.tenant_id(&self.cfg.functions[f].tenant) == Some(t as u16);
        if !ours {
            return self.drop_msg(t, msg, Why::UnknownFunction);
        }
        let len = u64::from(msg.len());
        match self.tenants[t].link.send(msg, &self.cfg.functions[f].name) {
            Ok(()) => {
                let m = &self.metrics.functions[f];
                m.delivered.inc();
                m.delivered_bytes.inc_by(len);
            }
            Err(e) => match (e.kind, e.msg) {
                (SendErrorKind::Full, Some(msg)) => self.tenants[t].backlog.push_back(msg),
                (_, Some(msg)) if d.flags & DescFlags::ERROR == 0 => {
                    self.bounce(t, msg, ErrorCode::PeerDied, Why::NoInstance)
                }
                (_, Some(msg)) => self.drop_msg(t, msg, Why::NoInstance),
                (_, None) => self.metrics.tenants[t].drop(Why::NoInstance),
            },
        }
    }

    fn redeliver(&mut self) -> usize {
        let mut n = 0;
        for t in 0..self.tenants.len() {
            let k = self.tenants[t].backlog.len();
            for _ in 0..k {
                let Some(msg) = self.tenants[t].backlog.pop_front() else { break };
                n += 1;
                self.deliver(t, msg);
            }
            if self.tenants[t].backlog.len() == k && k > 0 {
                n -= k.min(n);
            }
        }
        n
    }

    /// Returns a message to whoever waits for it, as an error descriptor:
    /// the ingress that originated the request if any (it answers the
    /// client), otherwise the sending function.
    fn bounce(&mut self, t: usize, mut msg: Msg, code: ErrorCode, why: Why) {
        let d = *msg.desc();
        if d.flags & DescFlags::ERROR != 0 {
            // Never bounce a bounce.
            return self.drop_msg(t, msg, why);
        }
        self.metrics.tenants[t].drop(why);
        {
            let dm = msg.desc_mut();
            dm.flags |= DescFlags::ERROR;
            dm.status = code as u8;
        }
        if d.origin != NO_NODE && d.origin < self.fabric_nodes && d.origin != self.set.node {
            msg.desc_mut().flags |= DescFlags::REPLY;
            if let Some(c) = self.conn_for(t, d.origin)
                && self.conns.get(c.index() as usize).is_some_and(|s| s.as_ref().is_some_and(|s| s.up))
            {
                let now = Instant::now();
                self.tenants[t].queue.push_back(Out { msg, peer: d.origin, since: now });
                return;
            }
            return self.free_msg(t, msg);
        }
        msg.desc_mut().dst_fn = d.src_fn;
        match self.fn_node.get(usize::from(d.src_fn)) {
            Some(&n) if n == self.set.node => self.deliver(t, msg),
            // The sender is on another node: the error travels back over
            // the fabric like any message.
            Some(&n) if self.conn_for(t, n).is_some_and(|c| self.ep.is_up(c)) => {
                self.tenants[t].queue.push_back(Out { msg, peer: n, since: Instant::now() });
            }
            _ => self.free_msg(t, msg),
        }
    }

    fn drop_msg(&mut self, t: usize, msg: Msg, why: Why) {
        self.metrics.tenants[t].drop(why);
        self.free_msg(t, msg);
    }

    fn free_msg(&mut self, t: usize, msg: Msg) {
        if let Err(e) = self.tenants[t].link.free(msg) {
            log::warn!("freeing a dropped message: {e}");
        }
    }
}

impl Backlog for Engine {
    fn head(&self, t: usize) -> Option<u64> {
        self.tenants[t].queue.front().map(|o| u64::from(o.msg.len()) + u64::from(o.msg.frags()) * HEADER_LEN as u64)
    }

    fn can_send(&self, t: usize) -> bool {
        let Some(out) = self.tenants[t].queue.front() else { return false };
        let Some(conn) = self.conn_for(t, out.peer) else { return true };
        self.flights.room() > 0
            && self.ep.is_up(conn)
            && self.ep.queued(conn) < ENDPOINT_QUEUE_HIGH
            && self.ep.credits(conn) > 0
    }

    fn send(&mut self, t: usize) {
        let Some(out) = self.tenants[t].queue.pop_front() else { return };
        match self.conn_for(t, out.peer) {
            Some(conn) if self.ep.is_up(conn) => self.post(t, conn, out),
            _ => self.bounce(t, out.msg, ErrorCode::Unreachable, Why::Unreachable),
        }
    }
}

fn free_lease(link: &mut Function, lease: Lease) {
    let msg = Msg::from_parts(lease, Descriptor::default());
    if let Err(e) = link.free(msg) {
        log::warn!("freeing a receive buffer: {e}");
    }
}

/// Opens the fabric device: the emulated device whose address is the
/// node's (listed in `DNE_EMU_DEVICES`, or made up from the node address).
fn open_device(addr: SocketAddr) -> anyhow::Result<doca::Device> {
    let devs = doca::devices().map_err(|e| anyhow::anyhow!("listing DOCA devices: {e}"))?;
    if let Some(d) = devs.iter().find(|d| d.ip == addr.ip()) {
        return d.open().map_err(|e| anyhow::anyhow!("opening {}: {e}", d.name));
    }
    doca::DeviceInfo::new("emu0", "0000:00:00.0", addr.ip())
        .open()
        .map_err(|e| anyhow::anyhow!("opening an emulated device on {}: {e}", addr.ip()))
}

/// Attaches to host-shimd once per tenant, retrying with backoff until it
/// answers or `stop` is set.
pub fn attach_all(cfg: &Cluster, socket: &std::path::Path, stop: &AtomicBool) -> Option<Vec<Function>> {
    let mut delay = Duration::from_millis(20);
    let mut warned = false;
    loop {
        if stop.load(Ordering::Relaxed) {
            return None;
        }
        let r: Result<Vec<Function>, _> = cfg.tenants.iter().map(|t| Function::attach_agent(socket, &t.name)).collect();
        match r {
            Ok(links) => return Some(links),
            Err(e) => {
                if !warned {
                    log::info!("waiting for host-shimd at {}: {e}", socket.display());
                    warned = true;
                }
                std::thread::sleep(delay);
                delay = (delay * 2).min(Duration::from_millis(500));
            }
        }
    }
}

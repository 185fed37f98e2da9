//! host-shimd: the per-host daemon. Not on the data path.
//!
//! * Creates one pool per tenant that has functions on this node.
//! * Accepts functions on `<runtime_dir>/shimd.sock`, checks each attach
//!   against the cluster config (function on this node, claimed tenant, the
//!   tenant's `uid` when configured, free instance), creates the instance's
//!   inbound ring and doorbell, and passes pool, ring and doorbell to it.
//! * Answers lookups with the rings of a function's live instances, only
//!   within the asker's tenant.
//! * Detects a function's death by its control socket closing (the kernel
//!   closes it when the process dies, however it dies), closes its ring so
//!   senders stop, and returns every buffer it owned to the free list; it
//!   scans again after a grace period to catch a sender that handed a
//!   buffer over just as the function died, and only then reuses the slot.
//! * Writes counters to `<runtime_dir>/shimd.status` (JSON) after every
//!   change, for operators and tests.

use crate::sock::{Conn, Listener};
use config::Cluster;
use rustix::event::{PollFd, PollFlags};
use shm::ring::{Doorbell, Ring};
use shm::{PagePolicy, Pool};
use std::collections::{BTreeMap, HashMap};
use std::io;
use std::os::fd::{AsFd, BorrowedFd};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};
use wire::ctrl::{Ack, AttachOk, CTRL_MAX_FRAME, CtrlError, CtrlKind, CtrlMsg, Peer, Role};
use wire::{CtrlFrame, ErrorCode};

/// How long after a death the buffers are scanned again and the slot kept
/// out of use.
pub const RECLAIM_GRACE: Duration = Duration::from_millis(200);

struct Attached {
    tenant: u16,
    function: u16,
    instance: u16,
    slot: u16,
    ring: Ring,
    bell: Doorbell,
}

struct Client {
    conn: Conn,
    pid: i32,
    uid: u32,
    hello: bool,
    attached: Option<Attached>,
}

/// Counters, as written to the status file.
#[derive(Debug, Default, Clone)]
pub struct Stats {
    /// Successful attaches.
    pub attached: u64,
    /// Refused attaches, by reason.
    pub attach_refused: BTreeMap<&'static str, u64>,
    /// Refused lookups, by reason.
    pub lookup_refused: BTreeMap<&'static str, u64>,
    /// Functions that died (or detached).
    pub deaths: u64,
    /// Buffers returned to pools after deaths.
    pub reclaimed: u64,
    /// Control frames that failed to decode.
    pub bad_frames: u64,
}

/// The daemon's state.
pub struct Shimd {
    cfg: Cluster,
    node: u16,
    dir: PathBuf,
    listener: Listener,
    pools: HashMap<u16, Pool>,
    clients: Vec<Client>,
    next_slot: u16,
    free_slots: Vec<u16>,
    cooling: Vec<(Instant, u16, u16)>,
    stats: Stats,
}

impl core::fmt::Debug for Shimd {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        f.debug_struct("Shimd").field("node", &self.node).field("dir", &self.dir).finish_non_exhaustive()
    }
}

/// Path of host-shimd's socket in a runtime directory.
pub fn socket_path(runtime_dir: &Path) -> PathBuf {
    runtime_dir.join("shimd.sock")
}

/// Path of host-shimd's status file in a runtime directory.
pub fn status_path(runtime_dir: &Path) -> PathBuf {
    runtime_dir.join("shimd.status")
}

fn error(code: ErrorCode, about: CtrlKind, seq: u32, tenant: u16, function: u16) -> CtrlMsg<'static> {
    CtrlMsg::Error(CtrlError {
        code: code as u8,
        reserved: 0,
        about_kind: about as u16,
        about_seq: seq,
        tenant,
        function,
        reserved2: 0,
    })
}

impl Shimd {
    /// Creates the pools of node `node` and starts listening.
    pub fn new(cfg: Cluster, node: &str) -> anyhow::Result<Self> {
        let node_id = cfg.node_id(node).ok_or_else(|| anyhow::anyhow!("node \"{node}\" is not in the config"))?;
        let dir = cfg.nodes[usize::from(node_id)].runtime_dir.clone();
        std::fs::create_dir_all(&dir)?;
        let mut pools = HashMap::new();
        for f in cfg.functions.iter().filter(|f| f.node == node) {
            let t = cfg.tenant_id(&f.tenant).expect("validated config");
            if pools.contains_key(&t) {
                continue;
            }
            let g = cfg.pool_geometry(t).expect("validated config");
            let pool = Pool::create(&format!("dne-{}", f.tenant), g, PagePolicy::Auto)?;
            log::info!(
                "pool of tenant {}: {} buffers of {} B, {} MiB, {}",
                f.tenant,
                g.buf_count(),
                g.buf_size(),
                pool.region().len() >> 20,
                pool.backing()
            );
            pools.insert(t, pool);
        }
        let listener = Listener::bind(&socket_path(&dir))?;
        let s = Self {
            cfg,
            node: node_id,
            dir,
            listener,
            pools,
            clients: Vec::new(),
            next_slot: 0,
            free_slots: Vec::new(),
            cooling: Vec::new(),
            stats: Stats::default(),
        };
        s.write_status();
        log::info!("host-shimd for node {node} listening on {}", socket_path(&s.dir).display());
        Ok(s)
    }

    /// Counters so far.
    pub fn stats(&self) -> &Stats {
        &self.stats
    }

    /// Serves until `stop` (a signalfd, say) becomes readable.
    pub fn run(&mut self, stop: Option<BorrowedFd<'_>>) -> io::Result<()> {
        loop {
            if self.poll_once(stop, Duration::from_millis(50))? {
                return Ok(());
            }
        }
    }

    /// One round: waits up to `timeout` for events and handles them.
    /// Returns `true` when `stop` became readable.
    pub fn poll_once(&mut self, stop: Option<BorrowedFd<'_>>, timeout: Duration) -> io::Result<bool> {
        let (ready, stop_ready) = {
            let mut fds = Vec::with_capacity(self.clients.len() + 2);
            fds.push(PollFd::new(&self.listener, PollFlags::IN));
            for c in &self.clients {
                fds.push(PollFd::from_borrowed_fd(c.conn.as_fd(), PollFlags::IN));
            }
            if let Some(s) = stop {
                fds.push(PollFd::from_borrowed_fd(s, PollFlags::IN));
            }
            let ts = rustix::event::Timespec::try_from(timeout)
                .unwrap_or(rustix::event::Timespec { tv_sec: 0, tv_nsec: 50_000_000 });
            match rustix::event::poll(&mut fds, Some(&ts)) {
                Ok(_) | Err(rustix::io::Errno::INTR) => {}
                Err(e) => return Err(e.into()),
            }
            let stop_ready = stop.is_some() && !fds[fds.len() - 1].revents().is_empty();
            let ready: Vec<bool> = fds[1..1 + self.clients.len()].iter().map(|f| !f.revents().is_empty()).collect();
            (ready, stop_ready)
        };
        if stop_ready {
            return Ok(true);
        }
        // Clients in reverse so removing one keeps the others' indices.
        for i in (0..ready.len()).rev() {
            if ready[i] {
                self.serve(i);
            }
        }
        while let Some(conn) = self.listener.accept()? {
            match conn.peer_cred() {
                Ok(cred) => self.clients.push(Client {
                    conn,
                    pid: cred.pid.as_raw_nonzero().get(),
                    uid: cred.uid.as_raw(),
                    hello: false,
                    attached: None,
                }),
                Err(e) => log::warn!("dropping a connection without peer credentials: {e}"),
            }
        }
        self.cool_down();
        Ok(false)
    }

    fn serve(&mut self, i: usize) {
        let mut buf = [0u8; CTRL_MAX_FRAME];
        let r = match self.clients[i].conn.recv(&mut buf) {
            Ok(r) if r.len > 0 => r,
            Ok(_) => return self.gone(i, "closed its connection"),
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => return,
            Err(e) => return self.gone(i, &format!("connection error: {e}")),
        };
        // Functions never send descriptors to host-shimd: drop any (the
        // `OwnedFd`s close here).
        drop(r.fds);
        let frame = match CtrlFrame::decode(&buf[..r.len]) {
            Ok((f, _)) => f,
            Err(e) => {
                self.stats.bad_frames += 1;
                log::warn!("pid {}: bad control frame ({e}); disconnecting", self.clients[i].pid);
                return self.gone(i, "sent a bad frame");
            }
        };
        let reply = match frame.msg {
            CtrlMsg::Hello(h) => {
                if h.layout_hash != wire::LAYOUT_HASH || h.role != Role::Function as u8 {
                    let _ = self.clients[i].conn.send(
                        &CtrlFrame {
                            seq: frame.seq,
                            msg: error(ErrorCode::VersionMismatch, CtrlKind::Hello, frame.seq, u16::MAX, u16::MAX),
                        },
                        &[],
                    );
                    return self.gone(i, "speaks other layouts");
                }
                self.clients[i].hello = true;
                None
            }
            CtrlMsg::Attach(a) => Some(self.attach(i, frame.seq, &a)),
            CtrlMsg::Lookup(l) => Some(self.lookup(i, frame.seq, &l)),
            other => {
                self.stats.bad_frames += 1;
                log::warn!("pid {}: unexpected {:?}", self.clients[i].pid, other.kind());
                None
            }
        };
        if let Some(Err(e)) = reply {
            log::warn!("pid {}: reply failed: {e}", self.clients[i].pid);
            self.gone(i, "reply failed");
        }
        self.write_status();
    }

    fn refuse(
        &mut self,
        i: usize,
        seq: u32,
        code: ErrorCode,
        what: &'static str,
        tenant: u16,
        function: u16,
    ) -> io::Result<()> {
        let map = if what == "attach" { &mut self.stats.attach_refused } else { &mut self.stats.lookup_refused };
        *map.entry(code.as_str()).or_insert(0) += 1;
        log::warn!("pid {}: {what} refused: {code}", self.clients[i].pid);
        let about = if what == "attach" { CtrlKind::Attach } else { CtrlKind::Lookup };
        self.clients[i].conn.send(&CtrlFrame { seq, msg: error(code, about, seq, tenant, function) }, &[])
    }

    fn attach(&mut self, i: usize, seq: u32, a: &wire::ctrl::Attach) -> io::Result<()> {
        let (Ok(tenant_name), Ok(fn_name)) = (a.tenant.as_str(), a.function.as_str()) else {
            return self.refuse(i, seq, ErrorCode::BadDescriptor, "attach", u16::MAX, u16::MAX);
        };
        if !self.clients[i].hello || self.clients[i].attached.is_some() {
            return self.refuse(i, seq, ErrorCode::BadRoute, "attach", u16::MAX, u16::MAX);
        }
        let Some(fid) = self.cfg.function_id(fn_name) else {
            return self.refuse(i, seq, ErrorCode::UnknownFunction, "attach", u16::MAX, u16::MAX);
        };
        let f = &self.cfg.functions[usize::from(fid)];
        if self.cfg.node_id(&f.node) != Some(self.node) {
            return self.refuse(i, seq, ErrorCode::UnknownFunction, "attach", u16::MAX, fid);
        }
        let tid = self.cfg.tenant_id(&f.tenant).expect("validated config");
        let uid_ok = self.cfg.tenants[usize::from(tid)].uid.is_none_or(|u| u == self.clients[i].uid);
        if f.tenant != tenant_name || !uid_ok {
            return self.refuse(i, seq, ErrorCode::TenantMismatch, "attach", tid, fid);
        }
        let taken: Vec<u16> = self
            .clients
            .iter()
            .filter_map(|c| c.attached.as_ref())
            .filter(|a| a.function == fid)
            .map(|a| a.instance)
            .collect();
        let Some(instance) = (0..f.instances).find(|n| !taken.contains(n)) else {
            return self.refuse(i, seq, ErrorCode::Overloaded, "attach", tid, fid);
        };
        let slot = match self.free_slots.pop() {
            Some(s) => s,
            None if self.next_slot < u16::MAX => {
                self.next_slot += 1;
                self.next_slot - 1
            }
            None => return self.refuse(i, seq, ErrorCode::Overloaded, "attach", tid, fid),
        };
        let ring = Ring::create(&format!("dne-ring-{fn_name}-{instance}"), f.ring_capacity, tid, fid, u32::from(slot))
            .map_err(io::Error::other)?;
        let bell = Doorbell::new()?;
        let pool = &self.pools[&tid];
        let g = pool.geometry();
        let ok = AttachOk {
            tenant: tid,
            function: fid,
            instance,
            slot,
            buf_size: g.buf_size(),
            buf_count: g.buf_count(),
            headroom: g.headroom(),
            max_chain: g.max_chain(),
            ring_capacity: f.ring_capacity,
            reserved: 0,
            pool_len: pool.region().len() as u64,
            ring_len: wire::segment::RingLayout::new(f.ring_capacity).map(|l| l.total_len).unwrap_or(0),
        };
        self.clients[i]
            .conn
            .send(&CtrlFrame { seq, msg: CtrlMsg::AttachOk(ok) }, &[pool.region().fd(), ring.fd(), bell.fd()])?;
        log::info!("pid {} attached as {fn_name}#{instance} (tenant {tenant_name}, slot {slot})", self.clients[i].pid);
        self.clients[i].attached = Some(Attached { tenant: tid, function: fid, instance, slot, ring, bell });
        self.stats.attached += 1;
        Ok(())
    }

    fn lookup(&mut self, i: usize, seq: u32, l: &wire::ctrl::Lookup) -> io::Result<()> {
        let Some(me) = self.clients[i].attached.as_ref().map(|a| a.tenant) else {
            return self.refuse(i, seq, ErrorCode::BadRoute, "lookup", u16::MAX, u16::MAX);
        };
        let Some(fid) = l.function.as_str().ok().and_then(|n| self.cfg.function_id(n)) else {
            return self.refuse(i, seq, ErrorCode::UnknownFunction, "lookup", me, u16::MAX);
        };
        let f = &self.cfg.functions[usize::from(fid)];
        if self.cfg.tenant_id(&f.tenant) != Some(me) {
            return self.refuse(i, seq, ErrorCode::TenantMismatch, "lookup", me, fid);
        }
        if self.cfg.node_id(&f.node) != Some(self.node) {
            // Remote functions are reached through the agent (DESIGN.md
            // section 3); until the host link exists they are unreachable.
            return self.refuse(i, seq, ErrorCode::Unreachable, "lookup", me, fid);
        }
        for c in &self.clients {
            if let Some(a) = c.attached.as_ref().filter(|a| a.function == fid) {
                let peer = Peer {
                    function: fid,
                    instance: a.instance,
                    slot: a.slot,
                    node: self.node,
                    ring_capacity: a.ring.header().capacity,
                    reserved: 0,
                };
                self.clients[i].conn.send(&CtrlFrame { seq, msg: CtrlMsg::Peer(peer) }, &[a.ring.fd(), a.bell.fd()])?;
            }
        }
        let ack = Ack { about_kind: CtrlKind::Lookup as u16, reserved: 0, about_seq: seq };
        self.clients[i].conn.send(&CtrlFrame { seq, msg: CtrlMsg::Ack(ack) }, &[])
    }

    fn gone(&mut self, i: usize, why: &str) {
        let c = self.clients.swap_remove(i);
        if let Some(a) = c.attached {
            a.ring.close();
            let n = self.pools.get(&a.tenant).map_or(0, |p| p.reclaim(a.slot));
            self.stats.deaths += 1;
            self.stats.reclaimed += u64::from(n);
            self.cooling.push((Instant::now() + RECLAIM_GRACE, a.tenant, a.slot));
            log::info!(
                "pid {} ({}#{}, slot {}) {why}: reclaimed {n} buffers",
                c.pid,
                self.cfg.functions[usize::from(a.function)].name,
                a.instance,
                a.slot
            );
        }
        self.write_status();
    }

    fn cool_down(&mut self) {
        let now = Instant::now();
        let mut changed = false;
        let mut k = 0;
        while k < self.cooling.len() {
            let (when, tenant, slot) = self.cooling[k];
            if when <= now {
                let n = self.pools.get(&tenant).map_or(0, |p| p.reclaim(slot));
                if n > 0 {
                    log::info!("late reclaim of {n} buffers of slot {slot}");
                }
                self.stats.reclaimed += u64::from(n);
                self.free_slots.push(slot);
                self.cooling.swap_remove(k);
                changed = true;
            } else {
                k += 1;
            }
        }
        if changed {
            self.write_status();
        }
    }

    fn write_status(&self) {
        let map = |m: &BTreeMap<&str, u64>| {
            let items: Vec<String> = m.iter().map(|(k, v)| format!("\"{k}\":{v}")).collect();
            format!("{{{}}}", items.join(","))
        };
        let mut pools: Vec<String> = self
            .pools
            .iter()
            .map(|(t, p)| {
                format!(
                    "{{\"tenant\":\"{}\",\"buffers\":{},\"free\":{},\"backing\":\"{}\"}}",
                    self.cfg.tenants[usize::from(*t)].name,
                    p.geometry().buf_count(),
                    p.free_buffers(),
                    p.backing()
                )
            })
            .collect();
        pools.sort();
        let live = self.clients.iter().filter(|c| c.attached.is_some()).count();
        let s = format!(
            "{{\"node\":\"{}\",\"live\":{live},\"attached\":{},\"attach_refused\":{},\"lookup_refused\":{},\"deaths\":{},\"reclaimed\":{},\"bad_frames\":{},\"cooling\":{},\"pools\":[{}]}}\n",
            self.cfg.nodes[usize::from(self.node)].name,
            self.stats.attached,
            map(&self.stats.attach_refused),
            map(&self.stats.lookup_refused),
            self.stats.deaths,
            self.stats.reclaimed,
            self.stats.bad_frames,
            self.cooling.len(),
            pools.join(",")
        );
        let path = status_path(&self.dir);
        let tmp = path.with_extension("tmp");
        if let Err(e) = std::fs::write(&tmp, s).and_then(|()| std::fs::rename(&tmp, &path)) {
            log::warn!("cannot write {}: {e}", path.display());
        }
    }
}

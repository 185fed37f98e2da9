//! The host link of `mode = "dpu"`, on the agent's side: DOCA comch to
//! host-shimd's bridge and the tenant pools imported from the host's mmap
//! exports (protocol: [`host_shim::comch`]; the host's side:
//! [`host_shim::bridge`]).
//!
//! The agent never reads or writes host memory: it registers each imported
//! pool with the fabric ([`fabric::PoolView::Imported`]), posts sends and
//! receives at buffer offsets, and tells the host which buffers hold what.
//! Chains are known by index: the host names every buffer of a message it
//! hands over, and the agent keeps the links of what it holds in its own
//! mirror ([`fabric::ImportedPool`]).
//!
//! Per tenant the agent keeps a stock of receive buffers the host lent it
//! (`target` of them, asked for with `WantBufs`); buffers of sent messages
//! refill the stock and the rest go back (`ReturnBufs`). A message that
//! arrived over the fabric goes to the host with `FROM_FABRIC` (the host
//! completes its descriptor from the header); one whose descriptor the
//! engine changed and that must cross the fabric again goes with `RESTAMP`
//! (the host writes its headers and hands it back). What the host could
//! not deliver comes back (`RETURNED`), or, when its instance died as the
//! host delivered it, only its descriptor does (`Lost`): the engine answers
//! a call so lost `PeerDied`, in a receive buffer of the stock.
//!
//! One comch connection carries every tenant; the per-tenant links share
//! it behind a mutex (with `--cores`, the tenants' engines run on several
//! threads).

use crate::hostlink::HostLink;
use config::Cluster;
use fabric::{ImportedPool, PoolView};
use host_shim::comch::{Outbox, each_frame, server_name};
use host_shim::{Msg, SendError};
use shm::pool::Lease;
use std::collections::VecDeque;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;
use wire::ctrl::{Ack, BufList, CtrlKind, CtrlMsg, LendRecv, MAX_LEND, MessageHdr};
use wire::segment::Owner;
use wire::{Descriptor, PoolGeometry};

/// Why a frame from the host was refused (counted per tenant, reported as
/// uplink rejections under [`Refusal::name`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Refusal {
    /// The frame did not decode.
    BadFrame = 0,
    /// Its buffer list does not make a chain of the tenant's pool, or
    /// names a buffer the agent holds already.
    BadChain = 1,
    /// No such tenant, its pool is not imported, or the pool exported for
    /// it does not match the cluster file.
    UnknownTenant = 2,
    /// A frame (or a flag) the host must not send the agent.
    UnexpectedFrame = 3,
}

impl Refusal {
    const ALL: [Self; 4] = [Self::BadFrame, Self::BadChain, Self::UnknownTenant, Self::UnexpectedFrame];

    /// The metric label.
    fn name(self) -> &'static str {
        match self {
            Self::BadFrame => "bad_frame",
            Self::BadChain => "bad_chain",
            Self::UnknownTenant => "unknown_tenant",
            Self::UnexpectedFrame => "unexpected_frame",
        }
    }
}

/// The comch connection to the host and what every tenant link shares.
struct Channel {
    pe: doca::ProgressEngine,
    server: doca::ComchServer,
    conn: Option<doca::ComchConnId>,
    lost: bool,
    /// Sends to the host that failed since it connected (the first is
    /// logged at warn level, the rest at debug: at a disconnect every
    /// queued send fails).
    send_failed: u64,
    out: Outbox,
    rx: Vec<u8>,
    pools: Vec<Option<Arc<ImportedPool>>>,
    /// What each tenant's pool must look like (from the cluster file).
    geometry: Vec<PoolGeometry>,
    inbox: Vec<VecDeque<Msg>>,
    /// Per tenant: what the host handed back undelivered
    /// ([`MessageHdr::RETURNED`]).
    returned: Vec<VecDeque<Msg>>,
    /// Per tenant: descriptors of messages lost as the host delivered them
    /// ([`CtrlMsg::Lost`]), at most one per buffer of the pool.
    lost_msgs: Vec<VecDeque<Descriptor>>,
    stock: Vec<Vec<Lease>>,
    target: Vec<u32>,
    asked: Vec<u32>,
    returning: Vec<Vec<u32>>,
    /// Per tenant and buffer: lent for a receive, not yet handed back.
    recv: Vec<Vec<bool>>,
    /// Per tenant and buffer: the agent's (taken from the host and not
    /// handed back). A buffer the host names again while the agent holds
    /// it is refused: it would be used for two things at once (a receive
    /// landing in a message being sent), and a host lending one buffer
    /// over and over would grow the stock and the inboxes without bound.
    held: Vec<Vec<bool>>,
    refused: Vec<[u64; Refusal::ALL.len()]>,
    scratch: Vec<u32>,
    /// When the connection was last pumped for an empty inbox.
    pumped: std::time::Instant,
    /// Per tenant: its engine is about to sleep or sleeping
    /// ([`DpuLink::sleep_begin`]) on the link's wake set.
    sleeping: Vec<bool>,
    /// Per tenant: an eventfd in the link's wake set, written when a pump
    /// (for any tenant: the tenants share the connection) leaves the
    /// sleeping tenant something to do. Comch's own notification cannot
    /// tell it: whoever pumped cleared it.
    kick: Vec<Option<OwnedFd>>,
    /// Per tenant: `kick` was written and not yet drained.
    kicked: Vec<bool>,
}

/// The engine asks every tenant's link for messages each pass; the shared
/// connection is pumped for them at most this often (one pump serves all
/// the tenants' inboxes; each costs system calls).
const PUMP_EVERY: Duration = Duration::from_micros(2);

/// Most pumps a tenant going to sleep makes (progress until nothing is
/// left) before it arms the comch notification.
const PUMP_ROUNDS: usize = 16;

impl Channel {
    fn refuse(&mut self, t: usize, why: Refusal) {
        let t = t.min(self.refused.len() - 1);
        self.refused[t][why as usize] += 1;
    }

    /// Sends what is queued and takes what comch has, unless that was done
    /// less than [`PUMP_EVERY`] ago.
    fn pump_due(&mut self) {
        let now = std::time::Instant::now();
        if now.duration_since(self.pumped) >= PUMP_EVERY {
            self.pumped = now;
            self.flush();
            self.pump();
        }
    }

    /// Takes what comch has: connection events and frames. Returns how
    /// many events.
    fn pump(&mut self) -> usize {
        self.pe.progress();
        let mut rx = std::mem::take(&mut self.rx);
        let mut n = 0;
        // Always read everything: a tenant whose messages wait (its
        // credits are out, say) must not hold up the others on the shared
        // connection. Its inbox cannot outgrow its pool: every message
        // holds at least one of the pool's buffers.
        while let Some(ev) = self.server.poll_event(&mut rx) {
            n += 1;
            match ev {
                doca::ComchEvent::Connected(c) if self.conn.is_none() && !self.lost => {
                    log::info!("host link: host-shimd connected");
                    self.conn = Some(c);
                }
                doca::ComchEvent::Connected(c) => {
                    log::warn!("host link: a second host connection ({c:?}) ignored");
                }
                doca::ComchEvent::Disconnected(c) if Some(c) == self.conn => {
                    log::warn!("host link: host-shimd went away");
                    self.lost = true;
                }
                doca::ComchEvent::Disconnected(_) => {}
                doca::ComchEvent::Message { conn, .. } if Some(conn) != self.conn => {
                    // Not the host's (warned about when it connected): no
                    // tenant's frame, counted against none.
                    log::debug!("host link: a message on an ignored connection ({conn:?}) dropped");
                }
                doca::ComchEvent::Message { len, truncated, .. } => {
                    if truncated {
                        self.refuse(0, Refusal::BadFrame);
                        continue;
                    }
                    if let Err(e) = each_frame(&rx[..len as usize], |f| self.frame(f)) {
                        log::warn!("host link: a frame from the host does not decode: {e}");
                        self.refuse(0, Refusal::BadFrame);
                    }
                }
                doca::ComchEvent::SendDone { result: Err(e), .. } => {
                    self.send_failed += 1;
                    if self.send_failed == 1 {
                        log::warn!("host link: a send to the host failed: {e} (later failures at debug level)");
                    } else {
                        log::debug!("host link: a send to the host failed: {e} ({} so far)", self.send_failed);
                    }
                }
                doca::ComchEvent::SendDone { .. } => {}
                // The host link carries no fast path.
                doca::ComchEvent::ConsumerUp { .. } | doca::ComchEvent::ConsumerDown { .. } => {}
            }
        }
        self.rx = rx;
        if n > 0 {
            self.kick_sleepers();
        }
        n
    }

    /// Whether tenant `t` has messages from the host waiting.
    fn waiting(&self, t: usize) -> bool {
        !self.inbox[t].is_empty() || !self.returned[t].is_empty() || !self.lost_msgs[t].is_empty()
    }

    /// Wakes every sleeping tenant that has a message waiting (or whose
    /// host went away): the frames for every tenant arrive on the one
    /// connection, so one tenant's pump can fill another's inbox.
    fn kick_sleepers(&mut self) {
        for t in 0..self.sleeping.len() {
            if self.sleeping[t] && (self.lost || self.waiting(t)) {
                self.sleeping[t] = false;
                if let Some(fd) = &self.kick[t] {
                    if let Err(e) = rustix::io::write(fd, &1u64.to_ne_bytes()) {
                        log::warn!("host link: waking tenant {t}'s engine: {e}");
                    }
                    self.kicked[t] = true;
                }
            }
        }
    }

    fn frame(&mut self, f: CtrlMsg<'_>) {
        match f {
            CtrlMsg::PoolExport(b, blob) => {
                let t = usize::from(b.tenant);
                if self.pools.get(t).is_some_and(Option::is_some) {
                    // Once per connection: the links hold this import, and
                    // a new one would forget what the agent holds in it.
                    log::warn!("host link: tenant {t}'s pool exported again on the same connection; refused");
                    return self.refuse(t, Refusal::UnexpectedFrame);
                }
                match (self.geometry.get(t), b.geometry()) {
                    (Some(want), Ok(g)) if *want == g => {
                        self.pools[t] = Some(Arc::new(ImportedPool::new(g, blob.to_vec())));
                        self.recv[t] = vec![false; g.buf_count() as usize];
                        self.held[t] = vec![false; g.buf_count() as usize];
                    }
                    _ => {
                        log::warn!("host link: tenant {t}'s pool from the host does not match the cluster file");
                        self.refuse(t, Refusal::UnknownTenant);
                    }
                }
            }
            CtrlMsg::Message(h, list) => {
                let t = usize::from(h.desc.tenant);
                let Some(pool) = self.pools.get(t).and_then(|p| p.clone()) else {
                    return self.refuse(t, Refusal::UnknownTenant);
                };
                if h.flags != 0 && h.flags != MessageHdr::RETURNED {
                    return self.refuse(t, Refusal::UnexpectedFrame);
                }
                if !self.hold(t, list.iter()) {
                    return self.refuse(t, Refusal::BadChain);
                }
                let Some(lease) = pool.adopt(list.iter(), h.desc.len, Owner::Agent) else {
                    for i in list.iter() {
                        self.held[t][i as usize] = false;
                    }
                    return self.refuse(t, Refusal::BadChain);
                };
                let inbox = if h.flags == 0 { &mut self.inbox[t] } else { &mut self.returned[t] };
                inbox.push_back(Msg::from_parts(lease, h.desc));
            }
            CtrlMsg::Lost(b) => {
                // A message the agent handed over (it holds none of its
                // buffers now) was lost as the host delivered it. The
                // host cannot have lost more messages than the pool has
                // buffers before the engine took the reports.
                let t = usize::from(b.desc.tenant);
                let Some(pool) = self.pools.get(t).and_then(|p| p.clone()) else {
                    return self.refuse(t, Refusal::UnknownTenant);
                };
                let n = pool.geometry().buf_count();
                let held = self.held[t].get(b.desc.buf as usize).copied();
                if held != Some(false) || self.lost_msgs[t].len() >= n as usize {
                    return self.refuse(t, Refusal::BadChain);
                }
                self.lost_msgs[t].push_back(b.desc);
            }
            CtrlMsg::LendRecv(b, list) => {
                let t = usize::from(b.tenant);
                let Some(pool) = self.pools.get(t).and_then(|p| p.clone()) else {
                    return self.refuse(t, Refusal::UnknownTenant);
                };
                self.asked[t] = self.asked[t].saturating_sub(b.count);
                for i in list.iter() {
                    match self.hold(t, std::iter::once(i)).then(|| pool.lent(i, Owner::Agent)).flatten() {
                        Some(l) => self.stock[t].push(l),
                        None => self.refuse(t, Refusal::BadChain),
                    }
                }
            }
            other => {
                log::warn!("host link: unexpected {:?} frame from the host", other.kind());
                self.refuse(0, Refusal::UnexpectedFrame);
            }
        }
    }

    fn push(&mut self, msg: CtrlMsg<'_>) {
        let Some(c) = self.conn else { return };
        let server = &self.server;
        let mut send = |m: &[u8]| server.send(c, m, 0);
        if self.out.push(msg, &mut send).is_err() {
            self.lost = true;
        }
    }

    /// Sends what is queued: buffers to give back, wants, frames.
    fn flush(&mut self) {
        for t in 0..self.returning.len() {
            if !self.returning[t].is_empty() {
                let list = std::mem::take(&mut self.returning[t]);
                for part in list.chunks(MAX_LEND) {
                    let b = LendRecv { tenant: t as u16, reserved: 0, count: part.len() as u32 };
                    self.push(CtrlMsg::ReturnBufs(b, BufList::from_indices(part)));
                }
                self.returning[t] = list;
                self.returning[t].clear();
            }
            let have = self.stock[t].len() as u32 + self.asked[t];
            if self.pools[t].is_some() && have < self.target[t] / 2 + 1 {
                let n = (self.target[t] - have).min(MAX_LEND as u32);
                self.asked[t] += n;
                self.push(CtrlMsg::WantBufs(LendRecv { tenant: t as u16, reserved: 0, count: n }));
            }
        }
        let Some(c) = self.conn else { return };
        let server = &self.server;
        let mut send = |m: &[u8]| server.send(c, m, 0);
        if self.out.flush(&mut send).is_err() {
            self.lost = true;
        }
    }

    /// Keeps one buffer as a receive buffer, or gives it back.
    fn keep_or_return(&mut self, t: usize, lease: Lease) {
        self.recv[t][lease.head() as usize] = false;
        if (self.stock[t].len() as u32) < self.target[t] {
            self.stock[t].push(lease);
        } else {
            self.held[t][lease.head() as usize] = false;
            self.returning[t].push(lease.head());
        }
    }

    /// Records the buffers `list` names as tenant `t`'s agent's. `false`,
    /// nothing recorded, when one is outside the pool, held already, or
    /// named twice.
    fn hold(&mut self, t: usize, list: impl Iterator<Item = u32> + Clone) -> bool {
        let held = &mut self.held[t];
        for (k, i) in list.clone().enumerate() {
            match held.get_mut(i as usize) {
                Some(h) if !*h => *h = true,
                _ => {
                    for j in list.take(k) {
                        held[j as usize] = false;
                    }
                    return false;
                }
            }
        }
        true
    }
}

/// The host link of one tenant in DPU mode.
pub struct DpuLink {
    t: usize,
    pool: Arc<ImportedPool>,
    ch: Arc<Mutex<Channel>>,
    /// What the engine sleeps on: an epoll set of the progress engine's
    /// notification fd (something arrived on comch) and the tenant's kick
    /// eventfd (another tenant's pump took something for this one).
    wake: Option<OwnedFd>,
}

impl core::fmt::Debug for DpuLink {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        f.debug_struct("DpuLink").field("tenant", &self.t).finish_non_exhaustive()
    }
}

/// Starts the comch server of node `node` and waits until host-shimd has
/// connected and exported every tenant pool (or `stop` is set: `None`).
pub fn attach(cfg: &Cluster, node: u16, stop: &AtomicBool) -> anyhow::Result<Option<Vec<DpuLink>>> {
    let n = &cfg.nodes[usize::from(node)];
    let name = server_name(n);
    let pe = doca::ProgressEngine::new().map_err(|e| anyhow::anyhow!("progress engine: {e}"))?;
    let dev = doca::open_host_link_device().map_err(|e| anyhow::anyhow!("opening the DOCA device: {e}"))?;
    let ccfg = doca::ComchConfig { send_tasks: 256, recv_queue: 256, ..Default::default() };
    let server = doca::ComchServer::new(&pe, &dev, &name, ccfg)
        .and_then(|s| s.start().map(|()| s))
        .map_err(|e| anyhow::anyhow!("comch server \"{name}\": {e}"))?;
    let nt = cfg.tenants.len();
    let npeers = u32::from(cfg.fabric_nodes()).saturating_sub(1).max(1);
    let mut geometry = Vec::with_capacity(nt);
    let mut target = Vec::with_capacity(nt);
    for (id, t) in (0u16..).zip(&cfg.tenants) {
        let g = cfg.pool_geometry(id).ok_or_else(|| anyhow::anyhow!("tenant {}: bad pool geometry", t.name))?;
        // What the port keeps posted (see `fabric::cluster`), and a
        // connection's worth more for the moments between a completion and
        // its refill.
        let per_conn = (t.recv_quota / npeers).max(2);
        target.push((per_conn * (npeers + 1)).min(g.buf_count() / 2));
        geometry.push(g);
    }
    let max_chain = cfg.tenants.iter().map(|t| t.max_chain).max().unwrap_or(64) as usize;
    let inbox = geometry.iter().map(|g| VecDeque::with_capacity(g.buf_count() as usize)).collect();
    // (Only calls that found no instance: grown when needed.)
    let returned = (0..nt).map(|_| VecDeque::new()).collect();
    let lost_msgs = (0..nt).map(|_| VecDeque::new()).collect();
    let ch = Channel {
        pe,
        server,
        conn: None,
        lost: false,
        send_failed: 0,
        out: Outbox::new(doca::COMCH_MAX_MSG_SIZE as usize),
        rx: vec![0; doca::COMCH_MAX_MSG_SIZE as usize],
        pools: vec![None; nt],
        geometry,
        inbox,
        returned,
        lost_msgs,
        stock: target.iter().map(|&n| Vec::with_capacity(n as usize)).collect(),
        asked: vec![0; nt],
        returning: (0..nt).map(|_| Vec::with_capacity(1024)).collect(),
        recv: vec![Vec::new(); nt],
        held: vec![Vec::new(); nt],
        refused: vec![[0; Refusal::ALL.len()]; nt],
        scratch: Vec::with_capacity(max_chain),
        pumped: std::time::Instant::now(),
        target,
        sleeping: vec![false; nt],
        kick: (0..nt).map(|_| new_kick()).collect(),
        kicked: vec![false; nt],
    };
    let ch = Arc::new(Mutex::new(ch));
    match doca::BACKEND {
        doca::Backend::Emu => log::info!(
            "node {}: waiting for host-shimd on comch \"{name}\" (emulated DOCA: host-shimd must run on this machine, \
             with the same {})",
            n.name,
            doca::RUNTIME_DIR_ENV
        ),
        doca::Backend::Sdk => log::info!("node {}: waiting for host-shimd on comch \"{name}\"", n.name),
    }
    loop {
        if stop.load(Ordering::Relaxed) {
            return Ok(None);
        }
        let mut c = lock(&ch);
        if c.pump() == 0 {
            drop(c);
            std::thread::sleep(Duration::from_millis(1));
            continue;
        }
        if c.lost {
            // The host came and went before it was done: start over, on a
            // new server. A host that connected meanwhile was ignored (one
            // host at a time) and what it sent dropped; it would wait for
            // ever on a connection nobody reads. Closing the old server
            // disconnects it, and host-shimd's bridge connects again.
            log::warn!("node {}: host-shimd went away before it exported every pool; starting over", n.name);
            let fresh = doca::ComchServer::new(&c.pe, &dev, &name, ccfg)
                .map_err(|e| anyhow::anyhow!("comch server \"{name}\": {e}"))?;
            drop(std::mem::replace(&mut c.server, fresh));
            c.server.start().map_err(|e| anyhow::anyhow!("comch server \"{name}\": {e}"))?;
            c.lost = false;
            c.conn = None;
            c.pools.iter_mut().for_each(|p| *p = None);
            c.inbox.iter_mut().for_each(VecDeque::clear);
            c.returned.iter_mut().for_each(VecDeque::clear);
            c.lost_msgs.iter_mut().for_each(VecDeque::clear);
            continue;
        }
        if c.pools.iter().all(Option::is_some) {
            break;
        }
    }
    let pools: Vec<Arc<ImportedPool>> = lock(&ch).pools.iter().flatten().cloned().collect();
    {
        // host-shimd's bridge hands over nothing before it hears that
        // every pool was taken.
        let mut c = lock(&ch);
        c.push(CtrlMsg::Ack(Ack { about_kind: CtrlKind::PoolExport as u16, reserved: 0, about_seq: 0 }));
        c.flush();
    }
    let wake = |t: usize| {
        let c = lock(&ch);
        wake_set(c.pe.notification_handle().ok()?, c.kick[t].as_ref()?.as_fd())
    };
    Ok(Some(
        pools.into_iter().enumerate().map(|(t, pool)| DpuLink { t, pool, ch: ch.clone(), wake: wake(t) }).collect(),
    ))
}

/// A tenant's kick eventfd (`None` if it cannot be made: its engine naps
/// instead of sleeping).
fn new_kick() -> Option<OwnedFd> {
    use rustix::event::{EventfdFlags, eventfd};
    eventfd(0, EventfdFlags::CLOEXEC | EventfdFlags::NONBLOCK).map_err(|e| log::warn!("host link: eventfd: {e}")).ok()
}

/// An epoll set readable when either fd is.
fn wake_set(notify: BorrowedFd<'_>, kick: BorrowedFd<'_>) -> Option<OwnedFd> {
    use rustix::event::epoll;
    let set = epoll::create(epoll::CreateFlags::CLOEXEC).ok()?;
    for fd in [notify, kick] {
        if let Err(e) = epoll::add(&set, fd, epoll::EventData::new_u64(0), epoll::EventFlags::IN) {
            log::warn!("host link: building the wake set: {e}");
            return None;
        }
    }
    Some(set)
}

impl HostLink for DpuLink {
    fn view(&self) -> PoolView<'_> {
        PoolView::Imported(&self.pool)
    }
    fn free_buffers(&self) -> u32 {
        self.lock().stock[self.t].len() as u32
    }
    fn alloc_buffer(&mut self) -> Option<Lease> {
        let mut c = self.lock();
        let l = c.stock[self.t].pop()?;
        c.recv[self.t][l.head() as usize] = true;
        Some(l)
    }
    fn alloc_empty(&mut self) -> Option<Lease> {
        // One of the receive buffers the host lent (the agent's; not
        // marked as a receive: what goes to the host in it did not come
        // over the fabric).
        let l = self.lock().stock[self.t].pop()?;
        Some(Lease::by_index(l.head(), 0, 1, l.holder()))
    }
    fn take(&mut self) -> Option<Msg> {
        let mut c = self.lock();
        if c.inbox[self.t].is_empty() {
            c.pump_due();
        }
        c.inbox[self.t].pop_front()
    }
    fn take_returned(&mut self) -> Option<Msg> {
        self.lock().returned[self.t].pop_front()
    }
    fn take_lost(&mut self) -> Option<Descriptor> {
        self.lock().lost_msgs[self.t].pop_front()
    }
    fn progress(&mut self) {
        self.lock().pump_due();
    }
    fn flush_out(&mut self) {
        let mut c = self.lock();
        c.flush();
        c.pump();
    }
    fn deliver(&mut self, msg: Msg, _dst: u16, _to: &str) -> Result<(), SendError> {
        self.send(msg, 0);
        Ok(())
    }
    fn restamp(&mut self, msg: Msg) -> Option<Msg> {
        self.send(msg, MessageHdr::RESTAMP);
        None
    }
    fn free(&mut self, msg: Msg) {
        let (lease, _) = msg.into_parts();
        let mut c = self.lock();
        let c = &mut *c;
        let t = self.t;
        self.pool.split(lease, &mut |l| c.keep_or_return(t, l));
    }
    fn alive(&self) -> bool {
        !self.lock().lost
    }
    fn rejected(&self, f: &mut dyn FnMut(&'static str, u64)) {
        let c = self.lock();
        for (why, n) in Refusal::ALL.iter().zip(&c.refused[self.t]) {
            if *n > 0 {
                f(why.name(), *n);
            }
        }
    }
    fn sleep_begin(&mut self) -> bool {
        let mut c = self.lock();
        c.flush();
        // DOCA's flow: clear, progress until nothing is left, arm, and only
        // then wait (the handle fires once per arm).
        if let Err(e) = c.pe.clear_notification() {
            log::warn!("host link: clearing the comch notification: {e}");
        }
        for _ in 0..PUMP_ROUNDS {
            if c.pump() == 0 {
                break;
            }
        }
        if let Err(e) = c.pe.request_notification() {
            log::warn!("host link: arming the comch notification: {e}");
        }
        let idle = !c.waiting(self.t) && c.out.is_empty() && !c.lost;
        c.sleeping[self.t] = idle;
        idle
    }
    fn sleep_end(&mut self) {
        let mut c = self.lock();
        c.sleeping[self.t] = false;
        if std::mem::take(&mut c.kicked[self.t])
            && let Some(fd) = &c.kick[self.t]
        {
            let mut b = [0u8; 8];
            let _ = rustix::io::read(fd, &mut b);
        }
    }
    fn wake_fd(&self) -> Option<BorrowedFd<'_>> {
        self.wake.as_ref().map(|f| f.as_fd())
    }
    fn queue_depth(&self, _to: &str) -> Option<u64> {
        None
    }
}

fn lock(ch: &Mutex<Channel>) -> MutexGuard<'_, Channel> {
    ch.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

impl DpuLink {
    fn lock(&self) -> MutexGuard<'_, Channel> {
        lock(&self.ch)
    }

    /// Sends a message the agent holds to the host (to deliver, or with
    /// `RESTAMP` to have its headers rewritten). Its buffers stay the
    /// agent's until the host takes them.
    fn send(&mut self, msg: Msg, flags: u16) {
        let (lease, desc) = msg.into_parts();
        let mut c = self.lock();
        let c = &mut *c;
        let t = self.t;
        let from_fabric = c.recv[t].get(lease.head() as usize).copied().unwrap_or(false);
        c.scratch.clear();
        for i in self.pool.chain(&lease) {
            c.recv[t][i as usize] = false;
            c.held[t][i as usize] = false;
            c.scratch.push(i);
        }
        let flags = if from_fabric { flags | MessageHdr::FROM_FABRIC } else { flags };
        let hdr = MessageHdr {
            desc: Descriptor { tenant: t as u16, buf: lease.head(), len: lease.len(), ..desc },
            flags,
            count: c.scratch.len() as u16,
        };
        let list = std::mem::take(&mut c.scratch);
        c.push(CtrlMsg::Message(hdr, BufList::from_indices(&list)));
        c.scratch = list;
    }
}

#[cfg(test)]
mod tests {
    use super::{DpuLink, Refusal, attach};
    use crate::hostlink::HostLink;
    use host_shim::comch::{Outbox, server_name};
    use std::sync::atomic::AtomicBool;
    use std::time::{Duration, Instant};
    use wire::ctrl::{BufList, CtrlMsg, LendRecv, MessageHdr, PoolExport};

    /// Whether `link`'s wake set is readable within `ms`.
    fn woken(link: &DpuLink, ms: i32) -> bool {
        use rustix::event::{PollFd, PollFlags, Timespec, poll};
        let fd = link.wake_fd().expect("a wake set");
        let mut fds = [PollFd::from_borrowed_fd(fd, PollFlags::IN)];
        let ts = Timespec { tv_sec: i64::from(ms / 1000), tv_nsec: i64::from(ms % 1000) * 1_000_000 };
        poll(&mut fds, Some(&ts)).expect("poll") == 1
    }

    /// Two tenants share the comch connection; a message for tenant 0 that
    /// tenant 1's engine pumps into tenant 0's inbox, just after tenant 0's
    /// engine went to sleep, must wake tenant 0's engine (the comch
    /// notification it sleeps on was cleared by tenant 1's pump).
    #[test]
    fn a_message_another_tenants_pump_took_wakes_the_sleeping_tenant() {
        let node = format!("wake-test-{}", std::process::id());
        let text = format!(
            r#"
[[node]]
name = "{node}"
mode = "dpu"
address = "127.0.0.1:1"
runtime_dir = "/tmp/{node}"

[[tenant]]
name = "a"
weight = 1
buffers = 64
recv_quota = 8

[[tenant]]
name = "b"
weight = 1
buffers = 64
recv_quota = 8
"#
        );
        let cfg = config::Cluster::parse(&text).expect("cluster");
        let stop = AtomicBool::new(false);
        let links = std::thread::scope(|s| {
            let agent = s.spawn(|| attach(&cfg, 0, &stop));
            // A failed assertion below must not leave `attach` waiting.
            let _stop = StopOnDrop(&stop);
            // The host's side, by hand: connect, export both pools.
            let pe = doca::ProgressEngine::new().unwrap();
            let dev = doca::Device::open_first().unwrap();
            let ccfg = doca::ComchConfig { send_tasks: 16, recv_queue: 16, ..Default::default() };
            let name = server_name(&cfg.nodes[0]);
            let deadline = Instant::now() + Duration::from_secs(10);
            let client = loop {
                match doca::ComchClient::new(&pe, &dev, &name, ccfg).and_then(|c| c.start().map(|()| c)) {
                    Ok(c) => break c,
                    Err(e) if Instant::now() < deadline => {
                        let _ = e;
                        std::thread::sleep(Duration::from_millis(5));
                    }
                    Err(e) => panic!("connecting to the agent: {e}"),
                }
            };
            wait_connected(&pe, &client, deadline);
            let mut out = Outbox::new(doca::COMCH_MAX_MSG_SIZE as usize);
            let mut send = |m: &[u8]| client.send(m, 0);
            for t in 0..2u16 {
                let body = PoolExport::new(cfg.pool_geometry(t).unwrap(), 0, 1);
                out.push(CtrlMsg::PoolExport(body, &[0]), &mut send).unwrap();
            }
            out.flush(&mut send).unwrap();
            while !agent.is_finished() {
                assert!(Instant::now() < deadline, "the agent never took the pool exports");
                pe.progress();
                std::thread::sleep(Duration::from_millis(1));
            }
            let links = agent.join().unwrap().expect("attach").expect("not stopped");
            (links, pe, client, out)
        });
        let (mut links, pe, client, mut out) = links;
        let mut send = |m: &[u8]| client.send(m, 0);

        assert!(links[0].sleep_begin(), "nothing waits for tenant 0 yet");
        let desc = wire::Descriptor { tenant: 0, buf: 0, len: 10, ..Default::default() };
        let hdr = MessageHdr { desc, flags: 0, count: 1 };
        out.push(CtrlMsg::Message(hdr, BufList::from_indices(&[0])), &mut send).unwrap();
        out.flush(&mut send).unwrap();
        pe.progress();
        assert!(woken(&links[0], 5000), "the message never reached the agent");
        // Tenant 1's engine goes to sleep too: its pump takes the frame,
        // which is tenant 0's.
        assert!(links[1].sleep_begin(), "nothing waits for tenant 1");
        assert!(woken(&links[0], 0), "tenant 0's engine sleeps on with a message in its inbox");
        assert!(!woken(&links[1], 0), "tenant 1 has nothing");
        links[0].sleep_end();
        links[1].sleep_end();
        let m = links[0].take().expect("the message");
        assert_eq!((m.desc().tenant, m.desc().len), (0, 10));
        assert!(links[1].take().is_none());
        links[0].free(m);
    }

    /// A cluster of one DPU-mode node named `node` and one tenant of 64
    /// buffers.
    fn one_tenant_dpu_node(node: &str) -> config::Cluster {
        let text = format!(
            "[[node]]\nname = \"{node}\"\nmode = \"dpu\"\naddress = \"127.0.0.1:1\"\nruntime_dir = \"/tmp/{node}\"\n\n\
             [[tenant]]\nname = \"a\"\nweight = 1\nbuffers = 64\nrecv_quota = 8\n"
        );
        config::Cluster::parse(&text).expect("cluster")
    }

    /// Sets the flag when dropped: stops the agent's `attach` when a test
    /// thread fails.
    struct StopOnDrop<'a>(&'a AtomicBool);

    impl Drop for StopOnDrop<'_> {
        fn drop(&mut self) {
            self.0.store(true, std::sync::atomic::Ordering::Relaxed);
        }
    }

    /// Exports tenant 0's pool (one buffer lent) to the agent, as
    /// host-shimd's bridge does first on a connection.
    fn export_pool(cfg: &config::Cluster, client: &doca::ComchClient) -> Outbox {
        let mut out = Outbox::new(doca::COMCH_MAX_MSG_SIZE as usize);
        let mut send = |m: &[u8]| client.send(m, 0);
        let body = PoolExport::new(cfg.pool_geometry(0).unwrap(), 0, 1);
        out.push(CtrlMsg::PoolExport(body, &[0]), &mut send).unwrap();
        out.flush(&mut send).unwrap();
        out
    }

    /// Progresses `client` until the agent has accepted its connection
    /// (panics at `deadline`).
    fn wait_connected(pe: &doca::ProgressEngine, client: &doca::ComchClient, deadline: Instant) {
        let mut rx = vec![0u8; doca::COMCH_MAX_MSG_SIZE as usize];
        loop {
            assert!(Instant::now() < deadline, "the agent never accepted the connection");
            pe.progress();
            if let Some(doca::ComchEvent::Connected(_)) = client.poll_event(&mut rx) {
                return;
            }
            std::thread::sleep(Duration::from_millis(1));
        }
    }

    /// A host's side by hand: a started comch client of `name`.
    fn host_client(pe: &doca::ProgressEngine, name: &str) -> doca::ComchClient {
        let dev = doca::Device::open_first().unwrap();
        let ccfg = doca::ComchConfig { send_tasks: 16, recv_queue: 16, ..Default::default() };
        let c = doca::ComchClient::new(pe, &dev, name, ccfg).unwrap();
        c.start().unwrap();
        c
    }

    /// While the agent waits for host-shimd, a first host connects and
    /// goes away before it exported every pool (a host-shimd that died
    /// starting, or any other client of the server name), and meanwhile
    /// host-shimd's bridge connected and exported its pools at once: the
    /// agent, serving one host at a time, ignored that connection. Once the
    /// first has gone, the bridge must get a hearing (here: it is
    /// disconnected, and connects and exports again, as the bridge does),
    /// not wait for ever on a connection the agent does not read.
    #[test]
    fn a_host_that_connected_while_another_was_there_is_heard_once_that_one_went_away() {
        let node = format!("second-host-test-{}", std::process::id());
        let cfg = one_tenant_dpu_node(&node);
        let name = server_name(&cfg.nodes[0]);
        let stop = AtomicBool::new(false);
        std::thread::scope(|s| {
            let agent = s.spawn(|| attach(&cfg, 0, &stop));
            let _stop = StopOnDrop(&stop);
            let deadline = Instant::now() + Duration::from_secs(10);
            let mut rx = vec![0u8; doca::COMCH_MAX_MSG_SIZE as usize];
            // The first host: connects, says nothing.
            let pe_a = doca::ProgressEngine::new().unwrap();
            let first = host_client(&pe_a, &name);
            while first.state() != doca::CtxState::Running {
                assert!(Instant::now() < deadline, "the first host never connected");
                pe_a.progress();
                std::thread::sleep(Duration::from_millis(1));
            }
            // The agent accepts a client within a millisecond or so.
            std::thread::sleep(Duration::from_millis(50));
            // The bridge: connects and exports (and again after each
            // disconnect, as host-shimd's bridge does).
            let pe = doca::ProgressEngine::new().unwrap();
            let mut bridge = host_client(&pe, &name);
            let mut exported = false;
            let mut first = Some(first);
            let mut reconnects = 0;
            let since = Instant::now();
            while !agent.is_finished() {
                assert!(
                    Instant::now() < deadline,
                    "the agent never took the pools of the host that connected second ({reconnects} reconnects)"
                );
                if first.is_some() && since.elapsed() > Duration::from_millis(100) {
                    // The first host goes away.
                    first = None;
                }
                pe.progress();
                while let Some(ev) = bridge.poll_event(&mut rx) {
                    match ev {
                        doca::ComchEvent::Connected(_) if !exported => {
                            export_pool(&cfg, &bridge);
                            exported = true;
                        }
                        doca::ComchEvent::Disconnected(_) => {
                            reconnects += 1;
                            exported = false;
                        }
                        _ => {}
                    }
                }
                if bridge.state() == doca::CtxState::Idle || bridge.state() == doca::CtxState::Stopping {
                    bridge = host_client(&pe, &name);
                    exported = false;
                }
                std::thread::sleep(Duration::from_millis(1));
            }
            drop(first);
            let links = agent.join().unwrap().expect("attach").expect("not stopped");
            assert_eq!(links.len(), 1);
        });
    }

    /// A one-tenant agent (64 buffers) attached to a host played by hand:
    /// the links, and the host's engine, client and outbox.
    fn attached_by_hand(tag: &str) -> (Vec<DpuLink>, doca::ProgressEngine, doca::ComchClient, Outbox) {
        let node = format!("{tag}-{}", std::process::id());
        let cfg = one_tenant_dpu_node(&node);
        let stop = AtomicBool::new(false);
        std::thread::scope(|s| {
            let agent = s.spawn(|| attach(&cfg, 0, &stop));
            let _stop = StopOnDrop(&stop);
            let deadline = Instant::now() + Duration::from_secs(10);
            let pe = doca::ProgressEngine::new().unwrap();
            let client = host_client(&pe, &server_name(&cfg.nodes[0]));
            wait_connected(&pe, &client, deadline);
            let out = export_pool(&cfg, &client);
            while !agent.is_finished() {
                assert!(Instant::now() < deadline, "the agent never took the pool export");
                pe.progress();
                std::thread::sleep(Duration::from_millis(1));
            }
            let links = agent.join().unwrap().expect("attach").expect("not stopped");
            (links, pe, client, out)
        })
    }

    /// The agent's refusals of `why` so far.
    fn refused(link: &DpuLink, why: Refusal) -> u64 {
        let mut n = 0;
        link.rejected(&mut |name, k| {
            if name == why.name() {
                n = k;
            }
        });
        n
    }

    /// A faulty host names buffers the agent holds already: lends one
    /// buffer again and again, and hands over a message in a buffer the
    /// agent keeps for a receive. The agent refuses them (each counted as
    /// bad_chain) instead of keeping each as a new buffer: its stock and
    /// inboxes stay within the pool, and no buffer is used for two things
    /// at once.
    #[test]
    fn buffers_the_agent_holds_are_refused_when_the_host_names_them_again() {
        let (mut links, pe, client, mut out) = attached_by_hand("held-test");
        let mut send = |m: &[u8]| client.send(m, 0);
        let deadline = Instant::now() + Duration::from_secs(10);
        for _ in 0..3 {
            out.push(
                CtrlMsg::LendRecv(LendRecv { tenant: 0, reserved: 0, count: 1 }, BufList::from_indices(&[7])),
                &mut send,
            )
            .unwrap();
        }
        // Out of the pool: refused by every version (the end of the batch).
        out.push(
            CtrlMsg::LendRecv(LendRecv { tenant: 0, reserved: 0, count: 1 }, BufList::from_indices(&[70])),
            &mut send,
        )
        .unwrap();
        out.flush(&mut send).unwrap();
        while refused(&links[0], Refusal::BadChain) == 0 {
            assert!(Instant::now() < deadline, "the lends never reached the agent");
            pe.progress();
            links[0].progress();
            std::thread::sleep(Duration::from_millis(1));
        }
        assert_eq!(links[0].free_buffers(), 1, "buffer 7 kept once, not once per lend");
        assert_eq!(refused(&links[0], Refusal::BadChain), 3);

        // A message in buffer 7, which the agent keeps for a receive, and
        // one naming buffer 9 twice.
        let desc = wire::Descriptor { tenant: 0, buf: 7, len: 10, ..Default::default() };
        out.push(CtrlMsg::Message(MessageHdr { desc, flags: 0, count: 1 }, BufList::from_indices(&[7])), &mut send)
            .unwrap();
        let cap = links[0].pool.geometry().payload_cap();
        let desc = wire::Descriptor { tenant: 0, buf: 9, len: cap + 1, ..Default::default() };
        out.push(CtrlMsg::Message(MessageHdr { desc, flags: 0, count: 2 }, BufList::from_indices(&[9, 9])), &mut send)
            .unwrap();
        out.flush(&mut send).unwrap();
        while refused(&links[0], Refusal::BadChain) < 5 {
            assert!(Instant::now() < deadline, "the messages were not refused");
            pe.progress();
            assert!(links[0].take().is_none(), "a message in buffers the agent holds was taken");
            std::thread::sleep(Duration::from_millis(1));
        }
        // The buffers it refused are not lost to it: 9 can come whole.
        let desc = wire::Descriptor { tenant: 0, buf: 9, len: 10, ..Default::default() };
        out.push(CtrlMsg::Message(MessageHdr { desc, flags: 0, count: 1 }, BufList::from_indices(&[9])), &mut send)
            .unwrap();
        out.flush(&mut send).unwrap();
        let m = loop {
            assert!(Instant::now() < deadline, "the good message never came");
            pe.progress();
            if let Some(m) = links[0].take() {
                break m;
            }
            std::thread::sleep(Duration::from_millis(1));
        };
        assert_eq!((m.desc().buf, m.desc().len), (9, 10));
        links[0].free(m);
    }

    /// The host reports a message it lost in its delivery (`Lost`): the
    /// engine gets its descriptor, and an empty buffer for the answer comes
    /// from the receive buffers the host lent (not marked as a receive: it
    /// goes to the host without `FROM_FABRIC`). A report naming a buffer
    /// the agent holds (it never handed that message over) or outside the
    /// pool is refused as bad_chain, one for a tenant without a pool as
    /// unknown_tenant.
    #[test]
    fn a_lost_message_the_host_reports_is_taken_and_answered_from_the_stock() {
        let (mut links, pe, client, mut out) = attached_by_hand("lost-test");
        let mut send = |m: &[u8]| client.send(m, 0);
        let deadline = Instant::now() + Duration::from_secs(10);
        out.push(
            CtrlMsg::LendRecv(LendRecv { tenant: 0, reserved: 0, count: 1 }, BufList::from_indices(&[7])),
            &mut send,
        )
        .unwrap();
        let call = wire::Descriptor { dst_fn: 0, src_fn: 1, request: 7, buf: 3, ..Default::default() };
        for desc in [call, wire::Descriptor { buf: 7, ..call }, wire::Descriptor { buf: 70, ..call }] {
            out.push_alone(CtrlMsg::Lost(wire::ctrl::Lost { desc, reserved: 0 }), &mut send).unwrap();
        }
        let other = wire::Descriptor { tenant: 1, ..call };
        out.push_alone(CtrlMsg::Lost(wire::ctrl::Lost { desc: other, reserved: 0 }), &mut send).unwrap();
        out.flush(&mut send).unwrap();
        while refused(&links[0], Refusal::BadChain) < 2 || refused(&links[0], Refusal::UnknownTenant) < 1 {
            assert!(Instant::now() < deadline, "the reports were not all taken");
            pe.progress();
            links[0].progress();
            std::thread::sleep(Duration::from_millis(1));
        }
        assert_eq!(links[0].take_lost(), Some(call));
        assert_eq!(links[0].take_lost(), None);
        let l = links[0].alloc_empty().expect("the lent buffer");
        assert_eq!((l.head(), l.len(), l.frags()), (7, 0, 1));
        assert_eq!(links[0].alloc_empty(), None, "one buffer lent");
        let m = host_shim::Msg::from_parts(l, wire::Descriptor { flags: wire::DescFlags::ERROR, status: 3, ..call });
        links[0].deliver(m, 1, "f1").unwrap();
        let c = links[0].lock();
        assert!(!c.held[0][7] && !c.recv[0][7], "handed to the host");
    }

    /// A faulty host exports a pool it exported already on this
    /// connection: refused. Before, the agent's record of the chains it
    /// holds started over while the tenant's link kept the first, so a
    /// chain the host handed over afterwards went back to it cut short.
    #[test]
    fn a_pool_exported_twice_on_one_connection_is_refused() {
        let (mut links, pe, client, mut out) = attached_by_hand("reexport-test");
        let mut send = |m: &[u8]| client.send(m, 0);
        let g = links[0].pool.geometry();
        out.push(CtrlMsg::PoolExport(PoolExport::new(g, 0, 1), &[0]), &mut send).unwrap();
        let desc = wire::Descriptor { tenant: 0, buf: 3, len: g.payload_cap() + 1, ..Default::default() };
        out.push(CtrlMsg::Message(MessageHdr { desc, flags: 0, count: 2 }, BufList::from_indices(&[3, 5])), &mut send)
            .unwrap();
        out.flush(&mut send).unwrap();
        let deadline = Instant::now() + Duration::from_secs(10);
        let m = loop {
            assert!(Instant::now() < deadline, "the message never came");
            pe.progress();
            if let Some(m) = links[0].take() {
                break m;
            }
            std::thread::sleep(Duration::from_millis(1));
        };
        // The agent delivers it back to the host: it must name both buffers.
        links[0].deliver(m, 0, "f").unwrap();
        links[0].flush_out();
        let mut rx = vec![0u8; doca::COMCH_MAX_MSG_SIZE as usize];
        let mut named = None;
        while named.is_none() {
            assert!(Instant::now() < deadline, "the delivery never reached the host");
            pe.progress();
            while let Some(ev) = client.poll_event(&mut rx) {
                if let doca::ComchEvent::Message { len, .. } = ev {
                    host_shim::comch::each_frame(&rx[..len as usize], |f| {
                        if let CtrlMsg::Message(_, list) = f {
                            named = Some(list.iter().collect::<Vec<_>>());
                        }
                    })
                    .unwrap();
                }
            }
            std::thread::sleep(Duration::from_millis(1));
        }
        assert_eq!(named.unwrap(), [3, 5], "the chain the host handed over, whole");
        assert_eq!(refused(&links[0], Refusal::UnexpectedFrame), 1, "the second export");
    }

    #[test]
    fn each_refusal_counts_in_its_own_slot_under_its_own_label() {
        for (k, r) in Refusal::ALL.iter().enumerate() {
            assert_eq!(*r as usize, k, "{r:?}");
        }
        let mut names: Vec<&str> = Refusal::ALL.iter().map(|r| r.name()).collect();
        names.sort_unstable();
        names.dedup();
        assert_eq!(names.len(), Refusal::ALL.len());
    }
}

//! [`Endpoint`]: connections, credits, queued sends and receive checks over
//! any [`Transport`]. Poll-driven; every table is sized at setup (a large
//! endpoint's connections reserve part of theirs, see [`Endpoint::new`]).

use crate::check::{ChainState, HEADER_LEN, check_recv};
use crate::credit::Credits;
use crate::{
    Completion, CompletionError, ConnDepth, ConnId, ConnSetupError, ConnSpec, Memory, RawCompletion, RawPostError,
    Received, RecvCheckError, RecvWr, RegionId, RegionRegisterError, SendWr, Transport, WorkPostError,
};
use std::collections::VecDeque;
use std::sync::Arc;
use wire::fabric::Immediate;

/// `user_data` of credit messages (send slots are small indices).
const CREDIT_TAG: u64 = u64::MAX;
/// Entries each kind of per-connection table (send queue, send slots,
/// receive slots) of one endpoint reserves when its connections open,
/// all `max_conns` of them together: each connection reserves its share,
/// at most what it can use and at least [`MIN_RESERVE`], and grows past
/// it only when a burst needs it. A small cluster's connections reserve
/// all they can use, so their data path does not allocate; a large one's
/// do not take gigabytes before a message moves.
const CONN_RESERVE: usize = 1 << 18;
/// Entries a connection's table reserves at least.
const MIN_RESERVE: usize = 8;

/// Sizes fixed at setup.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct EndpointConfig {
    /// Connections.
    pub max_conns: u32,
    /// Registered regions.
    pub max_regions: u32,
    /// Sends in flight per connection (one more is kept for credits).
    pub send_window: u32,
    /// Receives posted per connection.
    pub recv_depth: u32,
    /// Sends waiting for credits per connection.
    pub send_queue: u32,
    /// Largest message in bytes.
    pub max_msg: u32,
    /// Longest chain accepted from a peer.
    pub max_chain: u16,
    /// Backend completions taken per poll at most.
    pub batch: u32,
}

impl Default for EndpointConfig {
    fn default() -> Self {
        Self {
            max_conns: 16,
            max_regions: 16,
            send_window: 64,
            recv_depth: 128,
            send_queue: 1024,
            max_msg: (1 << 20) + wire::fabric::HEADROOM,
            max_chain: 256,
            batch: 64,
        }
    }
}

/// A table of at most `max` values with a free list, `reserve` of them
/// allocated up front and the rest when first needed.
#[derive(Debug)]
struct Slab<T: Copy> {
    items: Vec<Option<T>>,
    free: Vec<u32>,
    max: u32,
}

impl<T: Copy> Slab<T> {
    fn new(max: u32, reserve: usize) -> Self {
        let n = u32::try_from(reserve).unwrap_or(u32::MAX).min(max);
        Self { items: vec![None; n as usize], free: (0..n).rev().collect(), max }
    }

    fn insert(&mut self, v: T) -> Option<u32> {
        let i = match self.free.pop() {
            Some(i) => i,
            None if self.items.len() < self.max as usize => {
                // Beyond the reserve (a burst): one more slot, and room in
                // the free list for every slot, so a remove never allocates.
                self.items.push(None);
                self.free.reserve(self.items.len());
                (self.items.len() - 1) as u32
            }
            None => return None,
        };
        self.items[i as usize] = Some(v);
        Some(i)
    }

    fn get(&self, i: u64) -> Option<T> {
        self.items.get(usize::try_from(i).ok()?).copied().flatten()
    }

    fn remove(&mut self, i: u64) -> Option<T> {
        let idx = usize::try_from(i).ok()?;
        let v = self.items.get_mut(idx)?.take()?;
        self.free.push(idx as u32);
        Some(v)
    }

    fn used(&self) -> usize {
        self.items.len() - self.free.len()
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum State {
    Open,
    Connecting,
    Up,
    Failed(CompletionError),
}

#[derive(Debug)]
struct Conn {
    spec: ConnSpec,
    state: State,
    credits: Credits,
    chain: ChainState,
    queue: VecDeque<SendWr>,
    sends: Slab<u64>,
    recvs: Slab<RecvWr>,
    /// Send completions owed by the backend (data and credit sends).
    raw_sends: u32,
    /// The backend has reported the connection failed: it has let go of
    /// the id, and nothing more of this connection can come out of it.
    released: bool,
    /// The user closed it ([`Endpoint::close`]): it no longer names the
    /// connection anywhere (a connection that failed on its own is still
    /// the user's, in its routes, until it closes it).
    closed: bool,
    /// Its place is in [`Endpoint::reusable`].
    listed: bool,
    /// Its id is in [`Endpoint::pumping`].
    pumping: bool,
    /// Its id is in [`Endpoint::draining`].
    draining: bool,
}

impl Conn {
    /// Whether its place may be taken by a new connection: the user closed
    /// it, the backend reported its failure, and no operation of it is
    /// left to complete (see [`Endpoint::open`]). Once true, it stays true
    /// until the place is taken: a failed connection takes no new work.
    fn reusable(&self) -> bool {
        matches!(self.state, State::Failed(_))
            && self.released
            && self.closed
            && self.queue.is_empty()
            && self.sends.used() == 0
            && self.recvs.used() == 0
            && self.raw_sends == 0
    }

    /// Adds its place, `i`, to `reusable` (the endpoint's
    /// [`Endpoint::reusable`]) if it has just become reusable. Called
    /// wherever a connection may become so: at its close, and in each
    /// poll for its completions and for its queued sends failed.
    fn list_if_reusable(&mut self, i: usize, reusable: &mut VecDeque<u32>) {
        if !self.listed && self.reusable() {
            self.listed = true;
            // In range: connection ids are u32.
            reusable.push_back(i as u32);
        }
    }

    /// Whether [`Endpoint::pump`] has something to do for it now: queued
    /// sends that credits and the send window let out, or a credit update
    /// due. What can make this true marks the connection
    /// ([`Conn::mark`]): it coming up, a send queued, a credit grant, a
    /// send slot freed, a credit update done, a receive posted or
    /// consumed.
    fn needs_pump(&self, window: usize) -> bool {
        self.state == State::Up
            && ((!self.queue.is_empty() && self.credits.available() > 0 && self.sends.used() < window)
                || self.credits.pending_update().is_some())
    }

    /// Adds its id, `i`, to `pumping` (the endpoint's
    /// [`Endpoint::pumping`]) unless it is there. No allocation: the list
    /// has room for every connection.
    fn mark(&mut self, i: ConnId, pumping: &mut Vec<u32>) {
        if !self.pumping {
            self.pumping = true;
            pumping.push(i.0);
        }
    }

    /// Marks it (see [`Conn::mark`]) if it has sends queued: after its
    /// credits grew or a send slot was freed.
    fn mark_if_queued(&mut self, i: ConnId, pumping: &mut Vec<u32>) {
        if !self.pumping && !self.queue.is_empty() {
            self.mark(i, pumping);
        }
    }

    /// Marks it (see [`Conn::mark`]) if a credit update is due: after its
    /// receive side changed (a receive posted or consumed).
    fn mark_if_update_due(&mut self, i: ConnId, pumping: &mut Vec<u32>) {
        if !self.pumping && self.credits.pending_update().is_some() {
            self.mark(i, pumping);
        }
    }

    /// Adds its id, `i`, to `draining` (the endpoint's
    /// [`Endpoint::draining`]) if it has failed with sends queued, which
    /// the next poll completes with its error.
    fn mark_if_draining(&mut self, i: ConnId, draining: &mut Vec<u32>) {
        if !self.draining && matches!(self.state, State::Failed(_)) && !self.queue.is_empty() {
            self.draining = true;
            draining.push(i.0);
        }
    }
}

#[derive(Debug)]
struct Region {
    len: u64,
    /// Byte access, for local memory only.
    bytes: Option<Arc<shm::Region>>,
}

/// Counters of an endpoint (monotonic).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct EndpointStats {
    /// Credit messages sent.
    pub credit_msgs_sent: u64,
    /// Credit messages received.
    pub credit_msgs_received: u64,
    /// Sends that had to wait for credits.
    pub sends_queued: u64,
    /// Connections failed because the peer broke the protocol.
    pub protocol_errors: u64,
}

/// The engine-facing fabric endpoint over a [`Transport`].
#[derive(Debug)]
pub struct Endpoint<T: Transport> {
    t: T,
    cfg: EndpointConfig,
    regions: Vec<Region>,
    conns: Vec<Conn>,
    scratch: Vec<RawCompletion>,
    stats: EndpointStats,
    /// Bytes of the sends waiting in the connections' queues (for credits
    /// or for room in the send window), all connections together.
    queued_bytes: u64,
    /// Entries a connection's tables reserve when it opens (its share of
    /// [`CONN_RESERVE`]).
    reserve: usize,
    /// Places of connections that may be reused ([`Conn::reusable`]),
    /// oldest first: a connection's place is added when it becomes
    /// reusable (at its close or at the poll that completes the last of
    /// it), so `open` takes one without looking at the other connections
    /// (a node's start opens thousands, a link reset closes and opens a
    /// connection per tenant). Room for every connection, so adding never
    /// allocates.
    reusable: VecDeque<u32>,
    /// Ids of the connections [`Endpoint::pump`] may have something to
    /// do for ([`Conn::needs_pump`]), each once ([`Conn::pumping`]): a
    /// poll looks at these, not at every connection. A connection leaves
    /// when the pump finds nothing more to do for it now. Room for every
    /// connection, so adding never allocates.
    pumping: Vec<u32>,
    /// Ids of the failed connections with sends queued, each once
    /// ([`Conn::draining`]), which a poll completes with the failure.
    /// Room for every connection.
    draining: Vec<u32>,
    /// Look at every connection in `poll`, as before the endpoint kept
    /// `pumping` and `draining` (the reference tests hold them to).
    #[cfg(test)]
    by_scan: bool,
    /// Connections `open` looked at for a place to reuse.
    #[cfg(test)]
    reuse_looks: usize,
    /// Connections `poll` looked at for queued sends to fail, sends to
    /// post and credit updates to send.
    #[cfg(test)]
    conns_looked: usize,
}

fn valid_imm(imm: u32) -> bool {
    Immediate(imm).kind().is_some()
}

impl<T: Transport> Endpoint<T> {
    /// An endpoint over `t` with fixed sizes. The tables of its
    /// connections are reserved when each opens: in full for a small
    /// endpoint; past 2^18 entries of a kind in all, each connection
    /// reserves its share and grows its tables (to the sizes of `cfg`, no
    /// more) only when a burst needs it.
    pub fn new(t: T, cfg: EndpointConfig) -> Self {
        let max_conns = usize::try_from(cfg.max_conns).unwrap_or(usize::MAX).max(1);
        let conns = max_conns.min(CONN_RESERVE / MIN_RESERVE);
        Self {
            t,
            cfg,
            regions: Vec::with_capacity(cfg.max_regions as usize),
            conns: Vec::with_capacity(conns),
            scratch: vec![RawCompletion::EMPTY; cfg.batch.max(2) as usize],
            stats: EndpointStats::default(),
            queued_bytes: 0,
            reserve: (CONN_RESERVE / max_conns).max(MIN_RESERVE),
            reusable: VecDeque::with_capacity(conns),
            pumping: Vec::with_capacity(conns),
            draining: Vec::with_capacity(conns),
            #[cfg(test)]
            by_scan: false,
            #[cfg(test)]
            reuse_looks: 0,
            #[cfg(test)]
            conns_looked: 0,
        }
    }

    /// Entries a connection's tables reserve when it opens: all it can use
    /// in a small endpoint, a share of 2^18 (at least 8) in a large one
    /// (see [`Endpoint::new`]). Tables of other layers kept per connection
    /// reserve the same.
    pub(crate) fn conn_reserve_entries(&self) -> usize {
        self.reserve
    }

    /// The backend.
    pub fn transport(&self) -> &T {
        &self.t
    }

    /// The backend, mutably (its notification: [`Transport::clear_notification`]).
    pub fn transport_mut(&mut self) -> &mut T {
        &mut self.t
    }

    /// The sizes.
    pub fn config(&self) -> &EndpointConfig {
        &self.cfg
    }

    /// Counters.
    pub fn stats(&self) -> EndpointStats {
        self.stats
    }

    /// Registers memory for sends and receives.
    pub fn register(&mut self, mem: Memory<'_>) -> Result<RegionId, RegionRegisterError> {
        if self.regions.len() >= self.cfg.max_regions as usize {
            return Err(RegionRegisterError::Full);
        }
        let id = RegionId(self.regions.len() as u32);
        let bytes = match &mem {
            Memory::Local(r) => Some(r.clone()),
            Memory::Export(_) => None,
        };
        self.t.register(id, mem)?;
        let len = self.t.region_len(id).ok_or(RegionRegisterError::Transport(-1))?;
        self.regions.push(Region { len, bytes });
        Ok(id)
    }

    /// Opens a connection for `spec`; returns it and the blob the peer
    /// passes to its [`connect`](Self::connect). Setup path: may wait
    /// (bounded) for the backend to start.
    ///
    /// A failed connection whose every operation has completed, whose
    /// failure the backend has reported, and which the user closed, is
    /// reused (same id, a fresh backend connection), so a peer that comes
    /// and goes does not use up the table. (Reused before that report, the
    /// id would have the new connection failed by the old one's; before
    /// the user's close, the user's close of the old one would close the
    /// new one, and its routes to the old peer would lead to the new.)
    pub fn open(&mut self, spec: ConnSpec) -> Result<(ConnId, Vec<u8>), ConnSetupError> {
        let reuse = self.reusable.front().map(|&i| i as usize);
        #[cfg(test)]
        {
            self.reuse_looks += usize::from(reuse.is_some());
        }
        debug_assert!(reuse.is_none_or(|i| self.conns[i].reusable()), "listed, not reusable");
        if reuse.is_none() && self.conns.len() >= self.cfg.max_conns as usize {
            return Err(ConnSetupError::Full);
        }
        let id = ConnId(reuse.unwrap_or(self.conns.len()) as u32);
        let depth =
            ConnDepth { sends: self.cfg.send_window + 1, recvs: self.cfg.recv_depth, max_msg: self.cfg.max_msg };
        let blob = self.t.open(id, depth)?;
        let conn = Conn {
            spec,
            state: State::Open,
            credits: Credits::default(),
            chain: ChainState::default(),
            queue: VecDeque::with_capacity((self.cfg.send_queue as usize).min(self.reserve)),
            sends: Slab::new(self.cfg.send_window, self.reserve),
            recvs: Slab::new(self.cfg.recv_depth, self.reserve),
            raw_sends: 0,
            released: false,
            closed: false,
            listed: false,
            pumping: false,
            draining: false,
        };
        match reuse {
            Some(i) => {
                // Not in `pumping` nor `draining`: a connection failed
                // leaves them at the poll that lets it go, and nothing
                // marks it after.
                let old = &self.conns[i];
                debug_assert!(!old.pumping && !old.draining, "listed: {old:?}");
                self.conns[i] = conn;
                self.reusable.pop_front();
            }
            None => {
                self.conns.push(conn);
                // Room to list every connection (amortized, like the table).
                let n = self.conns.len();
                self.reusable.reserve(n - self.reusable.len());
                self.pumping.reserve(n.saturating_sub(self.pumping.len()));
                self.draining.reserve(n.saturating_sub(self.draining.len()));
            }
        }
        Ok((id, blob))
    }

    /// Connects `conn` to the peer's blob; [`Completion::Connected`] follows
    /// in a later poll. Sends posted before then wait.
    pub fn connect(&mut self, conn: ConnId, blob: &[u8]) -> Result<(), ConnSetupError> {
        let c = self.conns.get_mut(conn.0 as usize).ok_or(ConnSetupError::Unknown)?;
        if c.state != State::Open {
            return Err(ConnSetupError::State);
        }
        self.t.connect(conn, blob)?;
        c.state = State::Connecting;
        Ok(())
    }

    /// Who a connection is for.
    pub fn spec(&self, conn: ConnId) -> Option<ConnSpec> {
        self.conns.get(conn.0 as usize).map(|c| c.spec)
    }

    /// Data sends the peer currently lets us post on `conn`.
    pub fn credits(&self, conn: ConnId) -> u32 {
        self.conns.get(conn.0 as usize).map_or(0, |c| c.credits.available())
    }

    /// Sends waiting for credits on `conn`.
    pub fn queued(&self, conn: ConnId) -> usize {
        self.conns.get(conn.0 as usize).map_or(0, |c| c.queue.len())
    }

    /// Bytes of all the sends waiting in connection queues: posted by the
    /// caller, not yet handed to the transport (the peer has granted no
    /// credit, or the send window is full).
    pub fn queued_bytes(&self) -> u64 {
        self.queued_bytes
    }

    /// Whether the connection is up.
    pub fn is_up(&self, conn: ConnId) -> bool {
        self.conns.get(conn.0 as usize).is_some_and(|c| c.state == State::Up)
    }

    fn check_range(&self, region: RegionId, offset: u64, len: u32) -> Result<(), WorkPostError> {
        let r = self.regions.get(region.0 as usize).ok_or(WorkPostError::UnknownRegion)?;
        if offset.checked_add(u64::from(len)).is_none_or(|e| e > r.len) {
            return Err(WorkPostError::OutOfRange);
        }
        Ok(())
    }

    /// Posts a send. It goes out when the connection is up and the peer
    /// has granted a credit; until then it waits in the connection's queue.
    pub fn post_send(&mut self, conn: ConnId, wr: SendWr) -> Result<(), WorkPostError> {
        if wr.len == 0 {
            return Err(WorkPostError::Empty);
        }
        if wr.len > self.cfg.max_msg {
            return Err(WorkPostError::TooBig);
        }
        if !valid_imm(wr.imm) {
            return Err(WorkPostError::BadImmediate(wr.imm));
        }
        self.check_range(wr.region, wr.offset, wr.len)?;
        let window = self.cfg.send_window;
        let c = self.conns.get_mut(conn.0 as usize).ok_or(WorkPostError::UnknownConn)?;
        if let State::Failed(e) = c.state {
            return Err(WorkPostError::Failed(e));
        }
        if c.queue.is_empty() && c.state == State::Up && c.credits.available() > 0 && c.sends.used() < window as usize {
            match Self::raw_send(&mut self.t, conn, c, wr) {
                Ok(()) => return Ok(()),
                Err(RawPostError::Busy) => {}
                Err(RawPostError::Conn(e)) => return Err(WorkPostError::Failed(e)),
                Err(RawPostError::Invalid) => return Err(WorkPostError::OutOfRange),
            }
        }
        if c.queue.len() >= self.cfg.send_queue as usize {
            return Err(WorkPostError::QueueFull);
        }
        self.stats.sends_queued += 1;
        self.queued_bytes += u64::from(wr.len);
        c.queue.push_back(wr);
        c.mark(conn, &mut self.pumping);
        Ok(())
    }

    fn raw_send(t: &mut T, conn: ConnId, c: &mut Conn, wr: SendWr) -> Result<(), RawPostError> {
        let slot = c.sends.insert(wr.token).ok_or(RawPostError::Busy)?;
        match t.send(conn, Some((wr.region, wr.offset, wr.len)), Some(wr.imm), u64::from(slot)) {
            Ok(()) => {
                c.credits.on_send();
                c.raw_sends += 1;
                Ok(())
            }
            Err(e) => {
                c.sends.remove(u64::from(slot));
                Err(e)
            }
        }
    }

    /// Posts a receive on `conn`. Receives beyond the first are granted to
    /// the peer as credits (the first is kept for its credit messages).
    pub fn post_recv(&mut self, conn: ConnId, wr: RecvWr) -> Result<(), WorkPostError> {
        if wr.len == 0 {
            return Err(WorkPostError::Empty);
        }
        self.check_range(wr.region, wr.offset, wr.len)?;
        let c = self.conns.get_mut(conn.0 as usize).ok_or(WorkPostError::UnknownConn)?;
        if let State::Failed(e) = c.state {
            return Err(WorkPostError::Failed(e));
        }
        let slot = c.recvs.insert(wr).ok_or(WorkPostError::RecvFull)?;
        match self.t.recv(conn, (wr.region, wr.offset, wr.len), u64::from(slot)) {
            Ok(()) => {
                c.credits.on_post_recv();
                c.mark_if_update_due(conn, &mut self.pumping);
                Ok(())
            }
            Err(e) => {
                c.recvs.remove(u64::from(slot));
                Err(match e {
                    RawPostError::Busy => WorkPostError::RecvFull,
                    RawPostError::Conn(e) => WorkPostError::Failed(e),
                    RawPostError::Invalid => WorkPostError::OutOfRange,
                })
            }
        }
    }

    /// Closes `conn`: its outstanding operations complete with
    /// [`CompletionError::Closed`] in later polls; the peer sees it go.
    pub fn close(&mut self, conn: ConnId) {
        self.fail(conn, CompletionError::Closed);
        if let Some(c) = self.conns.get_mut(conn.0 as usize) {
            c.closed = true;
            c.list_if_reusable(conn.0 as usize, &mut self.reusable);
        }
    }

    fn fail(&mut self, conn: ConnId, error: CompletionError) -> bool {
        let Some(c) = self.conns.get_mut(conn.0 as usize) else { return false };
        if matches!(c.state, State::Failed(_)) {
            return false;
        }
        c.state = State::Failed(error);
        c.mark_if_draining(conn, &mut self.draining);
        self.t.abort(conn);
        true
    }

    /// Makes progress and fills `out` with completions; returns how many.
    /// Never blocks; allocates only when a connection of a large endpoint
    /// grows a table past what it reserved ([`Endpoint::new`]).
    pub fn poll(&mut self, out: &mut [Completion]) -> usize {
        // Failed connections: sends still queued complete with its error.
        #[cfg(test)]
        let mut n = if self.by_scan { self.drain_failed_by_scan(out) } else { self.drain_failed(out) };
        #[cfg(not(test))]
        let mut n = self.drain_failed(out);
        // Each backend completion yields at most two of ours.
        let room = ((out.len() - n) / 2).min(self.scratch.len());
        if room > 0 {
            let mut scratch = std::mem::take(&mut self.scratch);
            let got = self.t.poll(&mut scratch[..room]);
            for raw in &scratch[..got] {
                n += self.on_raw(*raw, &mut out[n..]);
                let (RawCompletion::Connected(conn)
                | RawCompletion::ConnFailed(conn, _)
                | RawCompletion::Sent { conn, .. }
                | RawCompletion::Recv { conn, .. }) = *raw;
                if let Some(c) = self.conns.get_mut(conn.0 as usize) {
                    c.list_if_reusable(conn.0 as usize, &mut self.reusable);
                }
            }
            self.scratch = scratch;
        }
        #[cfg(test)]
        if self.by_scan {
            self.pump_by_scan();
            // The lists unused: as the others leave them.
            for i in self.pumping.drain(..).chain(self.draining.drain(..)) {
                let c = &mut self.conns[i as usize];
                (c.pumping, c.draining) = (false, false);
            }
            return n;
        }
        self.pump();
        n
    }

    /// Completes the sends queued on failed connections with their
    /// connection's error, as many as `out` has room for, in the order of
    /// the connections' ids; returns how many. Looks only at the
    /// connections in [`Endpoint::draining`].
    fn drain_failed(&mut self, out: &mut [Completion]) -> usize {
        if self.draining.is_empty() {
            return 0;
        }
        let mut n = 0;
        let mut draining = std::mem::take(&mut self.draining);
        // In the order of their ids, as a look at each connection would
        // (which of them complete when `out` fills). Rare: failures.
        draining.sort_unstable();
        draining.retain(|&i| {
            #[cfg(test)]
            {
                self.conns_looked += 1;
            }
            let c = &mut self.conns[i as usize];
            let State::Failed(error) = c.state else {
                debug_assert!(false, "a connection draining that has not failed");
                c.draining = false;
                return false;
            };
            while n < out.len() {
                let Some(wr) = c.queue.pop_front() else { break };
                self.queued_bytes -= u64::from(wr.len);
                out[n] = Completion::Sent { conn: ConnId(i), token: wr.token, result: Err(error) };
                n += 1;
            }
            if !c.queue.is_empty() {
                return true;
            }
            c.draining = false;
            c.list_if_reusable(i as usize, &mut self.reusable);
            false
        });
        self.draining = draining;
        n
    }

    /// Sends what credits allow, and credit updates that are due, on the
    /// connections in [`Endpoint::pumping`], in the order of their ids (the
    /// order a look at each connection would post in); those with nothing
    /// more to do now leave the list.
    fn pump(&mut self) {
        if self.pumping.is_empty() {
            return;
        }
        let window = self.cfg.send_window as usize;
        let mut pumping = std::mem::take(&mut self.pumping);
        pumping.sort_unstable();
        pumping.retain(|&i| {
            #[cfg(test)]
            {
                self.conns_looked += 1;
            }
            let c = &mut self.conns[i as usize];
            if c.state == State::Up {
                Self::pump_conn(&mut self.t, &mut self.stats, &mut self.queued_bytes, ConnId(i), c, window);
            }
            // Still something to do (the backend was busy, or refused a
            // send of a connection whose failure it has not reported):
            // again at the next poll, as a look at each would.
            c.pumping = c.needs_pump(window);
            c.pumping
        });
        self.pumping = pumping;
    }

    /// Posts the queued sends of `c` (up) that its credits and the send
    /// window allow, and its credit update if one is due.
    fn pump_conn(
        t: &mut T,
        stats: &mut EndpointStats,
        queued_bytes: &mut u64,
        conn: ConnId,
        c: &mut Conn,
        window: usize,
    ) {
        while c.credits.available() > 0 && c.sends.used() < window {
            let Some(wr) = c.queue.pop_front() else { break };
            match Self::raw_send(t, conn, c, wr) {
                Ok(()) => *queued_bytes -= u64::from(wr.len),
                Err(RawPostError::Busy) => {
                    c.queue.push_front(wr);
                    break;
                }
                // The backend reports the failure as a completion;
                // put it back so it completes with the connection's
                // error.
                Err(_) => {
                    c.queue.push_front(wr);
                    break;
                }
            }
        }
        if let Some(grant) = c.credits.pending_update() {
            match t.send(conn, None, Some(grant), CREDIT_TAG) {
                Ok(()) => {
                    c.credits.commit_update(grant);
                    c.raw_sends += 1;
                    stats.credit_msgs_sent += 1;
                }
                Err(e) => log::debug!("credit update on {conn:?} not posted: {e:?}"),
            }
        }
    }

    fn on_raw(&mut self, raw: RawCompletion, out: &mut [Completion]) -> usize {
        match raw {
            RawCompletion::Connected(conn) => {
                let Some(c) = self.conns.get_mut(conn.0 as usize) else { return 0 };
                if c.state != State::Connecting {
                    return 0;
                }
                c.state = State::Up;
                // Sends queued and receives posted before it came up.
                c.mark(conn, &mut self.pumping);
                out[0] = Completion::Connected(conn);
                1
            }
            RawCompletion::ConnFailed(conn, error) => {
                let Some(c) = self.conns.get_mut(conn.0 as usize) else { return 0 };
                c.released = true;
                match c.state {
                    State::Failed(mine) => {
                        // We failed it (close, protocol): report our reason
                        // once, now that the backend has let go.
                        out[0] = Completion::ConnFailed { conn, error: mine };
                        1
                    }
                    _ => {
                        c.state = State::Failed(error);
                        c.mark_if_draining(conn, &mut self.draining);
                        out[0] = Completion::ConnFailed { conn, error };
                        1
                    }
                }
            }
            RawCompletion::Sent { conn, user_data, result } => {
                let Some(c) = self.conns.get_mut(conn.0 as usize) else { return 0 };
                c.raw_sends = c.raw_sends.saturating_sub(1);
                if user_data == CREDIT_TAG {
                    c.credits.on_update_done();
                    c.mark_if_update_due(conn, &mut self.pumping);
                    return 0;
                }
                let Some(token) = c.sends.remove(user_data) else {
                    log::warn!("fabric: completion of unknown send {user_data} on {conn:?}");
                    return 0;
                };
                // A slot in the send window freed.
                c.mark_if_queued(conn, &mut self.pumping);
                let result = match (result, c.state) {
                    (Err(_), State::Failed(mine)) => Err(mine),
                    (r, _) => r,
                };
                out[0] = Completion::Sent { conn, token, result };
                1
            }
            RawCompletion::Recv { conn, user_data, len, imm, result } => {
                self.on_recv(conn, user_data, len, imm, result, out)
            }
        }
    }

    fn on_recv(
        &mut self,
        conn: ConnId,
        user_data: u64,
        len: u32,
        imm: Option<u32>,
        result: Result<(), CompletionError>,
        out: &mut [Completion],
    ) -> usize {
        let max_chain = self.cfg.max_chain;
        let Some(c) = self.conns.get_mut(conn.0 as usize) else { return 0 };
        let Some(wr) = c.recvs.get(user_data) else {
            log::warn!("fabric: completion of unknown receive {user_data} on {conn:?}");
            return 0;
        };
        if let Err(e) = result {
            c.recvs.remove(user_data);
            let e = if let State::Failed(mine) = c.state { mine } else { e };
            out[0] = Completion::Received { conn, token: wr.token, result: Err(e) };
            return 1;
        }
        if len == 0 {
            // A credit message: take the grant, re-post the receive.
            let Some(grant) = imm else {
                c.recvs.remove(user_data);
                return self.protocol_error(conn, wr.token, RecvCheckError::NoImmediate(0), out);
            };
            self.stats.credit_msgs_received += 1;
            c.credits.on_grant(grant);
            c.mark_if_queued(conn, &mut self.pumping);
            if self.t.recv(conn, (wr.region, wr.offset, wr.len), user_data).is_err() {
                c.recvs.remove(user_data);
                let e = if let State::Failed(mine) = c.state { mine } else { CompletionError::Closed };
                out[0] = Completion::Received { conn, token: wr.token, result: Err(e) };
                return 1;
            }
            return 0;
        }
        c.recvs.remove(user_data);
        let mut hdr = [0u8; HEADER_LEN];
        let header = match &self.regions[wr.region.0 as usize].bytes {
            Some(r) => {
                let n = HEADER_LEN.min(len as usize);
                // In bounds: the receive's range was checked at post time.
                r.copy_out(wr.offset, &mut hdr[..n]).ok().map(|()| &hdr)
            }
            None => None,
        };
        match check_recv(imm, len, header, &mut c.chain, max_chain) {
            Ok(frag) => {
                c.credits.on_data_received();
                // The peer has less left: an update may be due.
                c.mark_if_update_due(conn, &mut self.pumping);
                if c.credits.overrun() {
                    // Its connection would wedge (no credit update would
                    // ever be due again): a protocol error instead.
                    return self.protocol_error(conn, wr.token, RecvCheckError::CreditOverrun, out);
                }
                let imm = imm.unwrap_or(0);
                out[0] = Completion::Received { conn, token: wr.token, result: Ok(Received { len, imm, frag }) };
                1
            }
            Err(e) => self.protocol_error(conn, wr.token, e, out),
        }
    }

    fn protocol_error(&mut self, conn: ConnId, token: u64, e: RecvCheckError, out: &mut [Completion]) -> usize {
        self.stats.protocol_errors += 1;
        log::warn!("fabric: {conn:?} failed: peer broke the protocol: {e}");
        let err = CompletionError::Protocol(e);
        out[0] = Completion::Received { conn, token, result: Err(err) };
        self.fail(conn, err);
        1
    }
}

#[cfg(test)]
impl<T: Transport> Endpoint<T> {
    /// The failed connections' queued sends completed as before
    /// [`Endpoint::draining`]: by a look at every connection.
    fn drain_failed_by_scan(&mut self, out: &mut [Completion]) -> usize {
        let mut n = 0;
        self.conns_looked += self.conns.len();
        for (i, c) in self.conns.iter_mut().enumerate() {
            if let State::Failed(error) = c.state {
                while n < out.len() {
                    let Some(wr) = c.queue.pop_front() else { break };
                    self.queued_bytes -= u64::from(wr.len);
                    out[n] = Completion::Sent { conn: ConnId(i as u32), token: wr.token, result: Err(error) };
                    n += 1;
                }
                c.list_if_reusable(i, &mut self.reusable);
            }
        }
        n
    }

    /// The pump as before [`Endpoint::pumping`]: a look at every
    /// connection.
    fn pump_by_scan(&mut self) {
        let window = self.cfg.send_window as usize;
        self.conns_looked += self.conns.len();
        for (i, c) in self.conns.iter_mut().enumerate() {
            if c.state != State::Up {
                continue;
            }
            Self::pump_conn(&mut self.t, &mut self.stats, &mut self.queued_bytes, ConnId(i as u32), c, window);
        }
    }

    /// Bytes reserved by the connection table once it holds `conns`
    /// connections (when it has room for fewer, it grows to at least
    /// that), and by the send queues and slot tables of the connections
    /// open.
    pub(crate) fn reserved_bytes(&self, conns: usize) -> (usize, usize) {
        let slab = |items: usize, item: usize, free: usize| items * item + free * std::mem::size_of::<u32>();
        let conn = |c: &Conn| {
            c.queue.capacity() * std::mem::size_of::<SendWr>()
                + slab(c.sends.items.capacity(), std::mem::size_of::<Option<u64>>(), c.sends.free.capacity())
                + slab(c.recvs.items.capacity(), std::mem::size_of::<Option<RecvWr>>(), c.recvs.free.capacity())
        };
        let table = self.conns.capacity().max(conns) * std::mem::size_of::<Conn>();
        (table, self.conns.iter().map(conn).sum())
    }

    /// Entries `conn` has reserved: in its send queue, its send slots and
    /// its receive slots.
    pub(crate) fn conn_reserve(&self, conn: ConnId) -> (usize, usize, usize) {
        let c = &self.conns[conn.0 as usize];
        (c.queue.capacity(), c.sends.items.capacity(), c.recvs.items.capacity())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::NullTransport;

    /// Opening a connection looks for a closed one's place to reuse only
    /// when there is one: a node opening thousands at start took time in
    /// proportion to their number squared (99000 connections, minutes).
    #[test]
    fn opening_looks_for_a_place_to_reuse_only_when_one_was_closed() {
        let cfg = EndpointConfig { max_conns: 4096, ..Default::default() };
        let mut ep = Endpoint::new(NullTransport::new(), cfg);
        let ids: Vec<ConnId> = (0..2000).map(|k| ep.open(ConnSpec { tenant: 0, peer: k }).unwrap().0).collect();
        assert_eq!(ep.reuse_looks, 0, "connections looked at by 2000 opens, none closed");
        // A closed connection's place is taken again once the backend let
        // it go, and then no opening looks again.
        ep.close(ids[7]);
        let mut comps = vec![Completion::EMPTY; 64];
        for _ in 0..100 {
            ep.poll(&mut comps);
        }
        let (again, _) = ep.open(ConnSpec { tenant: 0, peer: 7 }).unwrap();
        assert_eq!(again, ids[7], "the closed connection's place");
        let looked = ep.reuse_looks;
        assert!(looked > 0);
        let (next, _) = ep.open(ConnSpec { tenant: 0, peer: 2000 }).unwrap();
        assert_eq!(next, ConnId(2000));
        assert_eq!(ep.reuse_looks, looked, "no closed connection left to look for");
    }

    /// Polls `ep` until it has nothing more to say.
    fn settle(ep: &mut Endpoint<NullTransport>) {
        let mut comps = vec![Completion::EMPTY; 64];
        for _ in 0..1000 {
            if ep.poll(&mut comps) == 0 {
                return;
            }
        }
        panic!("the null fabric kept completing");
    }

    /// A link reset closes the link's old connections and opens its new
    /// ones before a poll lets any old one go: those opens find no place
    /// to reuse and look at none. Once the closed ones are let go, each
    /// open takes one of their places with one look. Before, while any
    /// closed connection waited, every open looked at every connection
    /// (1000 tenants and 100 peers: some 10^8 looks per reset).
    #[test]
    fn opening_after_a_reset_looks_at_no_connection_but_the_place_it_takes() {
        let cfg = EndpointConfig { max_conns: 4096, ..Default::default() };
        let mut ep = Endpoint::new(NullTransport::new(), cfg);
        let old: Vec<ConnId> = (0..1000).map(|k| ep.open(ConnSpec { tenant: k, peer: 1 }).unwrap().0).collect();
        settle(&mut ep);
        let closed = &old[500..];
        for &c in closed {
            ep.close(c);
        }
        // The reset's opens, before a poll: no closed place is free yet.
        for k in 500..1000 {
            let (c, _) = ep.open(ConnSpec { tenant: k, peer: 1 }).unwrap();
            assert!(c.0 >= 1000, "{c:?} reused before the backend let it go");
        }
        assert_eq!(ep.reuse_looks, 0, "connections looked at by 500 opens, none reusable");
        // The closed ones let go: each open takes one of their places.
        settle(&mut ep);
        let mut again: Vec<ConnId> = (500..1000).map(|k| ep.open(ConnSpec { tenant: k, peer: 2 }).unwrap().0).collect();
        assert_eq!(ep.reuse_looks, 500, "connections looked at by 500 opens that reused a place");
        again.sort();
        assert_eq!(again, closed, "the closed connections' places");
        let (next, _) = ep.open(ConnSpec { tenant: 0, peer: 3 }).unwrap();
        assert_eq!(next, ConnId(1500));
        assert_eq!(ep.reuse_looks, 500, "no place left to reuse");
    }

    /// A closed connection's place is not reused while completions of its
    /// receives may still come out of the backend, even once the backend
    /// has reported its failure: they would be taken as the new
    /// connection's. It is reused once they have come.
    #[test]
    fn a_closed_connection_is_not_reused_while_its_receives_may_complete() {
        let mut ep = Endpoint::new(NullTransport::new(), EndpointConfig::default());
        let region = Arc::new(shm::Region::create("endpoint-reuse", 1 << 16, shm::PagePolicy::Normal).unwrap());
        let r = ep.register(Memory::Local(region)).unwrap();
        let spec = ConnSpec { tenant: 0, peer: 1 };
        let (c, blob) = ep.open(spec).unwrap();
        ep.connect(c, &blob).unwrap();
        settle(&mut ep);
        assert!(ep.is_up(c));
        for k in 0..4 {
            ep.post_recv(c, RecvWr { region: r, offset: k * 4096, len: 4096, token: k }).unwrap();
        }
        ep.close(c);
        // Room for one backend completion: the failure, not the receives.
        let mut two = [Completion::EMPTY; 2];
        assert_eq!(ep.poll(&mut two), 1);
        assert_eq!(two[0], Completion::ConnFailed { conn: c, error: CompletionError::Closed });
        let (other, _) = ep.open(spec).unwrap();
        assert_ne!(other, c, "reused with its receives still to complete");
        let mut comps = vec![Completion::EMPTY; 64];
        let n = ep.poll(&mut comps);
        let flushed = comps[..n].iter().filter(|x| matches!(x, Completion::Received { conn, .. } if *conn == c));
        assert_eq!(flushed.count(), 4);
        let (again, _) = ep.open(spec).unwrap();
        assert_eq!(again, c, "its receives completed: reused");
    }

    /// A connection of an endpoint too large to reserve its tables in full
    /// (it reserves [`MIN_RESERVE`] entries of each) still takes as many
    /// receives, queued sends and sends in flight as its sizes say, and
    /// no more: its tables grow when a burst needs them.
    #[test]
    fn a_connection_that_reserved_less_grows_to_its_sizes() {
        let cfg = EndpointConfig {
            max_conns: 1 << 20,
            send_window: 64,
            recv_depth: 128,
            send_queue: 300,
            max_msg: 4096,
            ..Default::default()
        };
        let mut ep = Endpoint::new(NullTransport::new(), cfg);
        let region = Arc::new(shm::Region::create("endpoint-grow", 1 << 20, shm::PagePolicy::Normal).unwrap());
        let r = ep.register(Memory::Local(region)).unwrap();
        let (c, blob) = ep.open(ConnSpec { tenant: 0, peer: 1 }).unwrap();
        assert_eq!(ep.conn_reserve(c), (MIN_RESERVE, MIN_RESERVE, MIN_RESERVE));
        let imm = Immediate::new(wire::MsgKind::Data as u8, 1, true, true).0;
        let send = |token| SendWr { region: r, offset: 0, len: 64, imm, token };
        // Not connected yet: every send waits in the queue.
        for k in 0..300 {
            ep.post_send(c, send(k)).unwrap();
        }
        assert_eq!(ep.post_send(c, send(300)), Err(WorkPostError::QueueFull));
        ep.connect(c, &blob).unwrap();
        let mut comps = vec![Completion::EMPTY; 64];
        let mut sent = 0;
        let mut count = |comps: &[Completion]| {
            sent += comps.iter().filter(|c| matches!(c, Completion::Sent { result: Ok(()), .. })).count();
            comps.iter().any(|c| matches!(c, Completion::Connected(_)))
        };
        loop {
            let n = ep.poll(&mut comps);
            if count(&comps[..n]) {
                break;
            }
        }
        for k in 0..128 {
            ep.post_recv(c, RecvWr { region: r, offset: k * 4096, len: 4096, token: k }).unwrap();
        }
        let recv = RecvWr { region: r, offset: 0, len: 4096, token: 999 };
        assert_eq!(ep.post_recv(c, recv), Err(WorkPostError::RecvFull));
        let mut most = 0;
        for _ in 0..1000 {
            most = most.max(ep.conns[0].sends.used());
            let n = ep.poll(&mut comps);
            count(&comps[..n]);
        }
        assert_eq!(sent, 300);
        assert_eq!(most, 64, "sends in flight at most");
        let (queue, sends, recvs) = ep.conn_reserve(c);
        assert!(queue >= 300 && sends == 64 && recvs == 128, "{:?}", ep.conn_reserve(c));
    }

    /// A poll looks only at the connections that may have something to
    /// do. Before, each poll looked at every connection twice (for queued
    /// sends of failed ones, then for sends and credit updates to post):
    /// on a node of 200000 connections, about a millisecond per poll
    /// with one of them busy.
    #[test]
    fn a_poll_looks_only_at_connections_with_something_to_do() {
        let cfg = EndpointConfig { max_conns: 4096, send_window: 4, ..Default::default() };
        let mut ep = Endpoint::new(NullTransport::new(), cfg);
        let region = Arc::new(shm::Region::create("endpoint-looks", 1 << 16, shm::PagePolicy::Normal).unwrap());
        let r = ep.register(Memory::Local(region)).unwrap();
        let ids: Vec<ConnId> = (0..2000)
            .map(|k| {
                let (c, blob) = ep.open(ConnSpec { tenant: 0, peer: k }).unwrap();
                ep.connect(c, &blob).unwrap();
                c
            })
            .collect();
        settle(&mut ep);
        assert!(ids.iter().all(|&c| ep.is_up(c)));
        let busy = ids[1234];
        // Receives for the null peer's credit messages.
        for k in 0..8 {
            ep.post_recv(busy, RecvWr { region: r, offset: 8192 + k * 1024, len: 1024, token: k }).unwrap();
        }
        let imm = Immediate::new(wire::MsgKind::Data as u8, 1, true, true).0;
        let mut comps = vec![Completion::EMPTY; 64];
        let mut sent = 0;
        for k in 0..20 {
            // More than the window: some wait in the queue for slots.
            for j in 0..6 {
                ep.post_send(busy, SendWr { region: r, offset: 0, len: 64, imm, token: k * 6 + j }).unwrap();
            }
            ep.conns_looked = 0;
            let n = ep.poll(&mut comps);
            sent += comps[..n].iter().filter(|c| matches!(c, Completion::Sent { result: Ok(()), .. })).count();
            assert!(ep.conns_looked <= 2, "connections looked at by one poll: {}, 2000 open, 1 busy", ep.conns_looked);
        }
        settle(&mut ep);
        ep.conns_looked = 0;
        ep.poll(&mut comps);
        assert_eq!(ep.conns_looked, 0, "connections looked at by an idle poll");
        assert!(sent > 0);
    }

    /// A backend whose every move the test makes: receives are taken
    /// from when a connection opens, sends stay in flight
    /// until [`Script::complete`], the peer's credit grants and data
    /// messages land in the oldest receive posted when the test says,
    /// the next `busy` sends are refused as [`RawPostError::Busy`], and a
    /// connection fails when the test says ([`Script::fail`]) as when
    /// closed ([`Transport::abort`]): its failure, then every operation
    /// of it with an error.
    #[derive(Debug, Default)]
    struct Script {
        conns: Vec<ScriptConn>,
        /// Sends posted and not completed, oldest first: (connection, tag).
        flight: VecDeque<(ConnId, u64)>,
        out: VecDeque<RawCompletion>,
        busy: u32,
        /// Sends refused as busy.
        refused: usize,
    }

    #[derive(Debug, Default)]
    struct ScriptConn {
        up: bool,
        failed: bool,
        recvs: VecDeque<u64>,
        depth: u32,
        /// The cumulative grant of the endpoint's last credit message,
        /// and the data messages landed (the peer's view).
        granted: u32,
        landed: u32,
    }

    impl Script {
        /// Completes the oldest `k` sends in flight.
        fn complete(&mut self, k: usize) {
            for (conn, user_data) in self.flight.drain(..k.min(self.flight.len())) {
                self.out.push_back(RawCompletion::Sent { conn, user_data, result: Ok(()) });
            }
        }

        /// The peer's message lands in the oldest receive of `conn`: a
        /// credit message of cumulative grant `grant`, or (`None`) a data
        /// message, within the credits the endpoint granted unless
        /// `overrun`.
        fn land(&mut self, conn: ConnId, grant: Option<u32>, overrun: bool) {
            let Some(c) = self.conns.get_mut(conn.0 as usize).filter(|c| c.up) else { return };
            if grant.is_none() && c.landed == c.granted && !overrun {
                return;
            }
            let Some(user_data) = c.recvs.pop_front() else { return };
            if grant.is_none() {
                c.landed = c.landed.wrapping_add(1);
            }
            let (len, imm) = match grant {
                Some(g) => (0, Some(g)),
                None => (HEADER_LEN as u32 + 8, Some(Immediate::new(wire::MsgKind::Data as u8, 1, true, true).0)),
            };
            self.out.push_back(RawCompletion::Recv { conn, user_data, len, imm, result: Ok(()) });
        }

        /// `conn` fails with `error`.
        fn fail(&mut self, conn: ConnId, error: CompletionError) {
            let Some(c) = self.conns.get_mut(conn.0 as usize) else { return };
            if c.failed {
                return;
            }
            c.failed = true;
            c.up = false;
            self.out.push_back(RawCompletion::ConnFailed(conn, error));
            let flight = std::mem::take(&mut self.flight);
            for (c, user_data) in flight {
                if c == conn {
                    self.out.push_back(RawCompletion::Sent { conn, user_data, result: Err(error) });
                } else {
                    self.flight.push_back((c, user_data));
                }
            }
            for user_data in self.conns[conn.0 as usize].recvs.drain(..) {
                let result = Err(error);
                self.out.push_back(RawCompletion::Recv { conn, user_data, len: 0, imm: None, result });
            }
        }
    }

    impl Transport for Script {
        fn name(&self) -> &'static str {
            "script"
        }
        fn register(&mut self, _id: RegionId, _mem: Memory<'_>) -> Result<(), RegionRegisterError> {
            Ok(())
        }
        fn region_len(&self, _id: RegionId) -> Option<u64> {
            Some(1 << 30)
        }
        fn open(&mut self, id: ConnId, depth: ConnDepth) -> Result<Vec<u8>, ConnSetupError> {
            let i = id.0 as usize;
            if self.conns.len() <= i {
                self.conns.resize_with(i + 1, ScriptConn::default);
            }
            self.conns[i] = ScriptConn { depth: depth.recvs, ..ScriptConn::default() };
            Ok(b"script".to_vec())
        }
        fn connect(&mut self, id: ConnId, _blob: &[u8]) -> Result<(), ConnSetupError> {
            let c = self.conns.get_mut(id.0 as usize).ok_or(ConnSetupError::Unknown)?;
            c.up = true;
            self.out.push_back(RawCompletion::Connected(id));
            Ok(())
        }
        fn send(
            &mut self,
            conn: ConnId,
            src: Option<(RegionId, u64, u32)>,
            imm: Option<u32>,
            user_data: u64,
        ) -> Result<(), RawPostError> {
            let Some(c) = self.conns.get_mut(conn.0 as usize).filter(|c| c.up) else {
                return Err(RawPostError::Conn(CompletionError::Closed));
            };
            if self.busy > 0 {
                self.busy -= 1;
                self.refused += 1;
                return Err(RawPostError::Busy);
            }
            if let (None, Some(grant)) = (src, imm) {
                c.granted = grant;
            }
            self.flight.push_back((conn, user_data));
            Ok(())
        }
        fn recv(&mut self, conn: ConnId, _dst: (RegionId, u64, u32), user_data: u64) -> Result<(), RawPostError> {
            let c = self.conns.get_mut(conn.0 as usize).ok_or(RawPostError::Invalid)?;
            // Before the connection is up too, as a queue pair takes them.
            if c.failed {
                return Err(RawPostError::Conn(CompletionError::Closed));
            }
            if c.recvs.len() >= c.depth as usize {
                return Err(RawPostError::Busy);
            }
            c.recvs.push_back(user_data);
            Ok(())
        }
        fn poll(&mut self, out: &mut [RawCompletion]) -> usize {
            let n = out.len().min(self.out.len());
            for (slot, c) in out.iter_mut().zip(self.out.drain(..n)) {
                *slot = c;
            }
            n
        }
        fn abort(&mut self, conn: ConnId) {
            self.fail(conn, CompletionError::Closed);
        }
    }

    /// What an endpoint holds, but for the lists of connections to look
    /// at (which only one of two endpoints compared keeps).
    fn state(ep: &Endpoint<Script>) -> String {
        let conns: Vec<_> = ep
            .conns
            .iter()
            .map(|c| {
                format!(
                    "{:?} {:?} {:?} {:?} {:?} {:?} {:?} {} {} {} {}",
                    c.spec,
                    c.state,
                    c.credits,
                    c.chain,
                    c.queue,
                    c.sends,
                    c.recvs,
                    c.raw_sends,
                    c.released,
                    c.closed,
                    c.listed
                )
            })
            .collect();
        format!("{conns:#?} {} {:?} {:?} {:?}", ep.queued_bytes, ep.reusable, ep.stats, ep.t)
    }

    /// The lists of connections to look at hold every connection with
    /// something to do, each once, and their flags say which.
    fn assert_kept(ep: &Endpoint<Script>, what: &str) {
        let window = ep.cfg.send_window as usize;
        for (list, flag, name) in [
            (&ep.pumping, (|c: &Conn| c.pumping) as fn(&Conn) -> bool, "pumping"),
            (&ep.draining, |c: &Conn| c.draining, "draining"),
        ] {
            let mut ids = list.clone();
            ids.sort_unstable();
            ids.dedup();
            assert_eq!(ids.len(), list.len(), "{what}: {name} lists a connection twice: {list:?}");
            let flagged: Vec<u32> = (0..ep.conns.len() as u32).filter(|&i| flag(&ep.conns[i as usize])).collect();
            assert_eq!(ids, flagged, "{what}: {name}: listed and flagged");
        }
        for (i, c) in ep.conns.iter().enumerate() {
            assert!(!c.needs_pump(window) || c.pumping, "{what}: connection {i} has something to send, unmarked");
            let draining = matches!(c.state, State::Failed(_)) && !c.queue.is_empty();
            assert!(!draining || c.draining, "{what}: connection {i} failed with sends queued, unmarked");
        }
    }

    /// A small random number generator (splitmix64), for a sequence that
    /// is the same at every run.
    struct Rng(u64);

    impl Rng {
        fn below(&mut self, n: u64) -> u64 {
            self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
            let mut z = self.0;
            z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
            z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
            (z ^ (z >> 31)) % n
        }
    }

    /// An endpoint that looks only at the connections that may have
    /// something to do (`pumping`, `draining`) does what one looking at
    /// every connection in each poll did: the same completions from every
    /// poll, the same results of every call, the same state of every
    /// connection and of the backend after every step, through a long
    /// random sequence (the same at every run) of opens, connects, sends
    /// queued for credits and for room in the send window, receives
    /// posted, the peer's credit grants (some stale) and data messages
    /// (some beyond its credits: protocol errors), sends completing, a
    /// busy backend, failures, closes and closed connections' places
    /// reused. And after every step, every connection with something to
    /// do is in its list.
    #[test]
    fn an_endpoint_looking_only_at_connections_with_work_does_what_a_scan_did() {
        let cfg = EndpointConfig {
            max_conns: 6,
            max_regions: 1,
            send_window: 3,
            recv_depth: 4,
            send_queue: 5,
            max_msg: 4096,
            max_chain: 4,
            batch: 8,
        };
        let imm = Immediate::new(wire::MsgKind::Data as u8, 1, true, true).0;
        // Times the endpoint that scans saw: sends completed, failed; messages received;
        // connections failed; sends refused for a full queue, receives
        // for a full receive queue; credit messages sent; sends queued;
        // protocol errors; closed connections' places reused; sends the
        // backend refused as busy.
        let mut seen = [0usize; 11];
        for seed in 0..8u64 {
            let mut rng = Rng(seed);
            let mut sides: Vec<Endpoint<Script>> = [false, true]
                .into_iter()
                .map(|by_scan| {
                    let mut ep = Endpoint::new(Script::default(), cfg);
                    ep.by_scan = by_scan;
                    ep.register(Memory::Export(b"script")).unwrap();
                    ep
                })
                .collect();
            let r = RegionId(0);
            // The peer's cumulative grant per connection id.
            let mut grants = [0u32; 6];
            for step in 0..6000u64 {
                let conn = ConnId(rng.below(7) as u32);
                let kind = rng.below(100);
                let k = rng.below(12);
                let token = step;
                let what = format!("seed {seed}, step {step}, kind {kind}, {conn:?}, {k}");
                let mut results = Vec::new();
                for ep in sides.iter_mut() {
                    let result = match kind {
                        0..=2 => {
                            let opened = ep.open(ConnSpec { tenant: 0, peer: k as u32 });
                            if let Ok((c, _)) = opened {
                                grants[c.0 as usize] = 0;
                            }
                            format!("{:?}", opened.map(|o| o.0))
                        }
                        3..=6 => {
                            format!("{:?}", ep.connect(conn, b"script"))
                        }
                        7..=32 => {
                            format!("{:?}", ep.post_send(conn, SendWr { region: r, offset: 0, len: 64, imm, token }))
                        }
                        33..=47 => {
                            format!("{:?}", ep.post_recv(conn, RecvWr { region: r, offset: 0, len: 4096, token }))
                        }
                        48..=57 => {
                            // A grant of up to 5 more, or a stale one.
                            let g = grants[(conn.0 as usize).min(5)];
                            let grant = if k == 11 { g.wrapping_sub(2) } else { g.wrapping_add(k as u32 % 6) };
                            ep.t.land(conn, Some(grant), false);
                            String::new()
                        }
                        58..=67 => {
                            ep.t.land(conn, None, k == 11);
                            String::new()
                        }
                        68..=85 => {
                            ep.t.complete(k as usize);
                            String::new()
                        }
                        86..=89 => {
                            ep.t.busy = k as u32 % 4;
                            String::new()
                        }
                        90 => {
                            ep.t.fail(conn, CompletionError::PeerGone);
                            String::new()
                        }
                        91..=92 => {
                            ep.close(conn);
                            String::new()
                        }
                        _ => String::new(),
                    };
                    // A poll after every step, with room for a few
                    // completions (some left for later polls).
                    let mut comps = vec![Completion::EMPTY; 1 + k as usize % 9];
                    let n = ep.poll(&mut comps);
                    for c in comps[..n].iter().filter(|_| ep.by_scan) {
                        match c {
                            Completion::Sent { result: Ok(()), .. } => seen[0] += 1,
                            Completion::Sent { result: Err(_), .. } => seen[1] += 1,
                            Completion::Received { result: Ok(_), .. } => seen[2] += 1,
                            Completion::ConnFailed { .. } => seen[3] += 1,
                            _ => {}
                        }
                    }
                    seen[4] += usize::from(ep.by_scan && result.contains("QueueFull"));
                    seen[5] += usize::from(ep.by_scan && result.contains("RecvFull"));
                    results.push(format!("{result} {:?}", &comps[..n]));
                }
                if (48..=57).contains(&kind) && k != 11 {
                    let g = &mut grants[(conn.0 as usize).min(5)];
                    *g = g.wrapping_add(k as u32 % 6);
                }
                assert_kept(&sides[0], &what);
                let [kept, scan] = &sides[..] else { unreachable!() };
                assert_eq!(results[0], results[1], "{what}: results and completions");
                assert_eq!(state(kept), state(scan), "{what}: state");
            }
            let [_, scan] = &sides[..] else { unreachable!() };
            seen[6] += scan.stats.credit_msgs_sent as usize;
            seen[7] += scan.stats.sends_queued as usize;
            seen[8] += scan.stats.protocol_errors as usize;
            seen[9] += scan.reuse_looks;
            seen[10] += scan.t.refused;
        }
        assert!(seen.iter().all(|&n| n >= 10), "not all seen: {seen:?}");
    }
}

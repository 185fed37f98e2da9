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
    /// Connections `open` looked at for a place to reuse.
    #[cfg(test)]
    reuse_looks: usize,
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
            #[cfg(test)]
            reuse_looks: 0,
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
        };
        match reuse {
            Some(i) => {
                self.conns[i] = conn;
                self.reusable.pop_front();
            }
            None => {
                self.conns.push(conn);
                // Room to list every connection (amortized, like the table).
                self.reusable.reserve(self.conns.len() - self.reusable.len());
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
        self.t.abort(conn);
        true
    }

    /// Makes progress and fills `out` with completions; returns how many.
    /// Never blocks; allocates only when a connection of a large endpoint
    /// grows a table past what it reserved ([`Endpoint::new`]).
    pub fn poll(&mut self, out: &mut [Completion]) -> usize {
        let mut n = 0;
        // Failed connections: sends still queued complete with its error.
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
        self.pump();
        n
    }

    /// Sends what credits allow, and credit updates that are due.
    fn pump(&mut self) {
        let window = self.cfg.send_window as usize;
        for (i, c) in self.conns.iter_mut().enumerate() {
            if c.state != State::Up {
                continue;
            }
            let conn = ConnId(i as u32);
            while c.credits.available() > 0 && c.sends.used() < window {
                let Some(wr) = c.queue.pop_front() else { break };
                match Self::raw_send(&mut self.t, conn, c, wr) {
                    Ok(()) => self.queued_bytes -= u64::from(wr.len),
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
                match self.t.send(conn, None, Some(grant), CREDIT_TAG) {
                    Ok(()) => {
                        c.credits.commit_update(grant);
                        c.raw_sends += 1;
                        self.stats.credit_msgs_sent += 1;
                    }
                    Err(e) => log::debug!("credit update on {conn:?} not posted: {e:?}"),
                }
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
                    return 0;
                }
                let Some(token) = c.sends.remove(user_data) else {
                    log::warn!("fabric: completion of unknown send {user_data} on {conn:?}");
                    return 0;
                };
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
}

//! host-shimd's bridge to the agent on the DPU (`mode = "dpu"`; protocol in
//! [`crate::comch`]): a thread of host-shimd that is the node's agent as
//! far as the functions can tell (attached under [`wire::ctrl::AGENT_NAME`]
//! to every tenant's pool and uplink ring, as the agent itself attaches in
//! host mode) and that hands everything to the real agent over comch.
//!
//! It does, on the host, the work that needs host memory, which the agent
//! on the DPU cannot read:
//! * **to the agent**: takes what functions pushed into the uplink rings,
//!   writes the fabric header into every buffer's headroom, hands the
//!   buffers over to `Owner::Agent` and sends their indices;
//! * **from the agent**: takes back the named buffers (only those recorded
//!   as the agent's), links them into a chain, completes a received
//!   message's descriptor from its header (checked against what the agent
//!   saw), and pushes it into the destination function's ring; lends
//!   receive buffers on request; rewrites headers the agent asks to.
//!
//! It never copies a payload. When the connection to the agent goes away
//! it keeps every buffer still recorded as the agent's out of use for
//! [`AGENT_GONE_GRACE`], then frees them, and meanwhile connects to the
//! next agent; the agent, seeing host-shimd go, tears down its fabric (its
//! receives, posted in buffers it was lent, stop with it), drops its pools
//! and waits likewise. The connection can drop with the agent alive, its
//! receives still posted: a buffer freed at once could be allocated by a
//! function, or lent again, and a payload from another node land in it.
//! A bridge that ends inside a live host-shimd ([`serve`] builds another
//! when host-shimd dropped one of its connections) takes its connection
//! with it; the new bridge treats the buffers still recorded as the
//! agent's when it starts the same way.
//!
//! A bridge that panics is replaced the same way: [`serve`] catches the
//! panic (in the bridge's thread only; the process's panic hook is left
//! as it is; a panic payload whose drop panics too is caught as well),
//! logs it at error level, counts it
//! ([`BridgeStats::panics`], with `up` false until the new bridge's agent
//! took the pools), and starts a new bridge after a wait that begins at
//! 100 ms and doubles with each panic up to 5 s (back to 100 ms after a
//! bridge that lived a minute, however it ended). The panicking bridge's
//! connection goes with it; what it had lent or handed to the agent is
//! kept, then freed, by the new one.

use crate::backlog::DeliveryBacklog;
use crate::comch::{Outbox, each_frame, server_name};
use crate::function::{Function, Msg, MsgFreeError, SendError, SendErrorKind};
use config::Cluster;
use shm::FreeError;
use shm::pool::Lease;
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};
use wire::ctrl::{Ack, BufList, CtrlKind, CtrlMsg, LendRecv, Lost, MAX_EXPORT_BLOB, MAX_LEND, MessageHdr, PoolExport};
use wire::desc::{NO_NODE, frag_len};
use wire::fabric::{FabricHeader, HEADER_OFFSET, MsgKind};
use wire::segment::Owner;
use wire::{DescFlags, Descriptor};
use zerocopy::IntoBytes;

/// Messages taken from one uplink ring per pass.
const BATCH: usize = 32;
// Every frame the bridge sends is sized to fit one comch message.
const _: () = assert!(doca::COMCH_MAX_MSG_SIZE as usize == wire::ctrl::COMCH_MSG_MAX);
/// How long an idle bridge keeps polling before it sleeps.
const SPIN: Duration = Duration::from_micros(50);
/// Longest sleep while something is pending (lends and deliveries are
/// retried, a lost agent is redialled, this often).
const TICK: Duration = Duration::from_millis(1);
/// Longest sleep with nothing pending: every event that matters (a
/// function's send, the agent's frames) wakes the bridge anyway.
const IDLE_TICK: Duration = Duration::from_millis(100);
/// An agent connected this long without saying it took the pools is
/// warned about (once per connection): it may speak another protocol
/// version, or read another cluster file.
const ACK_WAIT: Duration = Duration::from_secs(5);
/// How long the buffers recorded as the agent's when its connection
/// dropped stay so before they are freed. The connection may drop with the
/// agent alive (a failed send, a frame the peer's comch refused): its
/// fabric still has receives posted in the buffers it was lent, and sends
/// reading the messages it was handed, until it notices and tears down.
/// It notices within about 2 ms: its comch link takes the disconnect at
/// its next pump (every pass of its engine, or the wake-up the disconnect
/// causes), and the engine checks the link every millisecond
/// (`CONTROL_EVERY` in the agent's engine) and then drops its fabric port,
/// whose contexts' stops flush the receives (with several cores, each
/// engine checks the shared link itself). A second is hundreds of times
/// that, for an agent whose CPU was taken from it meanwhile (as
/// [`crate::daemon::HOLE_GRACE`] allows a live producer), and costs the
/// tenant those buffers for a second after a drop.
pub const AGENT_GONE_GRACE: Duration = Duration::from_secs(1);
/// Failed frees ([`BridgeStats::free_failed`]) are logged at most this
/// often: the first at the end of the pass that saw it, then a line with
/// the count since the last. (A process of the tenant can make every free
/// fail, at message rate.)
pub const FREE_FAILED_LOG_EVERY: Duration = Duration::from_secs(1);

/// What the bridge counted (host-shimd's status file shows it): since it
/// started, except [`panics`](Self::panics) and
/// [`restarts`](Self::restarts), which count over host-shimd's life.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct BridgeStats {
    /// The agent is connected now and has taken the pools.
    pub up: bool,
    /// Messages sent to the agent.
    pub to_agent: u64,
    /// Messages delivered to local functions.
    pub delivered: u64,
    /// Buffers lent for receives.
    pub lent: u64,
    /// Buffers the agent gave back.
    pub returned: u64,
    /// Frames or buffers from the agent refused (bad frame, a buffer it
    /// does not hold, a header that disagrees).
    pub refused: u64,
    /// Messages no live local instance took, handed back to the agent
    /// (which sends calls to another node or back as errors, and drops
    /// and counts errors for a caller that is gone).
    pub handed_back: u64,
    /// Connections to the agent so far (each counted once the agent took
    /// the pools).
    pub connects: u64,
    /// Buffers freed because the connection to the agent that held them
    /// went away ([`AGENT_GONE_GRACE`] after).
    pub reclaimed: u64,
    /// Buffers the agent held when its connection went away, kept out of
    /// use until [`AGENT_GONE_GRACE`] is over (now).
    pub holding: u64,
    /// Messages from the agent lost as they were delivered: the instance
    /// died as the bridge pushed the message, and host-shimd took its
    /// buffers back. Each is reported to the agent ([`CtrlMsg::Lost`]),
    /// which answers a call `PeerDied`, unless the connection is gone
    /// (then also counted in [`BridgeDrops::agent_gone`]).
    pub lost: u64,
    /// Messages the bridge dropped, by reason.
    pub dropped: BridgeDrops,
    /// Frees of buffers the bridge held that failed, by reason.
    pub free_failed: BridgeFreeFailed,
    /// Bridges of this host-shimd that panicked (each replaced by a new
    /// one: see the module docs).
    pub panics: u64,
    /// Bridges of this host-shimd started after the first (after a panic,
    /// or after host-shimd dropped the last one's connections): the other
    /// counts are this bridge's own, and start from zero with each.
    pub restarts: u64,
}

/// Messages host-shimd's bridge dropped, by reason (each is also logged).
/// Nothing goes back to their senders from the bridge.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct BridgeDrops {
    /// A function's message for another node whose chain is longer than a
    /// comch message can name (the cluster file's `max_chain` prevents it).
    pub too_long: u64,
    /// A function's message the bridge could not hand over to the agent
    /// (its buffers were not held as expected).
    pub ownership: u64,
    /// A message (or a [`CtrlMsg::Lost`] report) for the agent not sent:
    /// the connection to the agent was gone. Buffers handed over with it
    /// are freed with the agent's ([`AGENT_GONE_GRACE`]).
    pub agent_gone: u64,
    /// A message from the agent naming a buffer the agent does not hold.
    pub not_held: u64,
    /// A message from the agent whose fabric header disagrees with what the
    /// agent saw.
    pub bad_header: u64,
    /// A reply from the agent for a function here (a reply never ends on a
    /// worker node).
    pub worker_reply: u64,
    /// A message from the agent whose buffers do not add up to its length.
    pub bad_length: u64,
    /// A message from the agent for a tenant the cluster file does not have.
    pub unknown_tenant: u64,
}

impl BridgeDrops {
    /// Each reason's name (as host-shimd's status file shows it) and count.
    pub fn each(&self) -> [(&'static str, u64); 8] {
        [
            ("too_long", self.too_long),
            ("ownership", self.ownership),
            ("agent_gone", self.agent_gone),
            ("not_held", self.not_held),
            ("bad_header", self.bad_header),
            ("worker_reply", self.worker_reply),
            ("bad_length", self.bad_length),
            ("unknown_tenant", self.unknown_tenant),
        ]
    }
}

/// Frees of buffers host-shimd's bridge held that failed, by reason (the
/// names are [`MsgFreeError::as_str`]'s, as in the agent's
/// `dne_agent_free_failed_total`). A process of the tenant rewrote the
/// owner words or chain links of buffers the bridge held: they stay out of
/// the pool until host-shimd reclaims them. Logged as a summary at most
/// once a second.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct BridgeFreeFailed {
    /// A message of another pool.
    pub foreign: u64,
    /// A buffer recorded as someone else's.
    pub not_owner: u64,
    /// A buffer already free.
    pub double_free: u64,
    /// A chain link that leads outside the pool or back into the chain.
    pub bad_link: u64,
    /// A buffer index outside the pool.
    pub out_of_range: u64,
    /// A lease of another pool.
    pub foreign_lease: u64,
}

impl BridgeFreeFailed {
    /// Each reason's name (as host-shimd's status file shows it) and count.
    pub fn each(&self) -> [(&'static str, u64); 6] {
        [
            ("foreign", self.foreign),
            ("not_owner", self.not_owner),
            ("double_free", self.double_free),
            ("bad_link", self.bad_link),
            ("out_of_range", self.out_of_range),
            ("foreign_lease", self.foreign_lease),
        ]
    }

    /// All failures.
    pub fn total(&self) -> u64 {
        self.each().iter().map(|&(_, n)| n).sum()
    }

    /// Counts `e` under its reason.
    fn count(&mut self, e: &MsgFreeError) {
        let n = match e {
            MsgFreeError::Foreign(_) => &mut self.foreign,
            MsgFreeError::Pool(FreeError::NotOwner { .. }) => &mut self.not_owner,
            MsgFreeError::Pool(FreeError::DoubleFree(_)) => &mut self.double_free,
            MsgFreeError::Pool(FreeError::BadLink(_)) => &mut self.bad_link,
            MsgFreeError::Pool(FreeError::OutOfRange(_)) => &mut self.out_of_range,
            MsgFreeError::Pool(FreeError::ForeignLease) => &mut self.foreign_lease,
        };
        *n += 1;
    }
}

/// When failed frees are logged (see [`FREE_FAILED_LOG_EVERY`]); the
/// agent's engine logs its own the same way.
#[derive(Clone, Debug, Default)]
pub struct FreeFailedLog {
    /// Failures not logged yet.
    unlogged: u64,
    /// When the last line was logged.
    logged: Option<Instant>,
}

impl FreeFailedLog {
    /// `n` more failures to log.
    pub fn add(&mut self, n: u64) {
        self.unlogged += n;
    }

    /// How many failures to log now (none: nothing new, or the last line
    /// is less than [`FREE_FAILED_LOG_EVERY`] old); they count as logged.
    pub fn due(&mut self, now: Instant) -> Option<u64> {
        if self.unlogged == 0 || self.logged.is_some_and(|at| now.saturating_duration_since(at) < FREE_FAILED_LOG_EVERY)
        {
            return None;
        }
        self.logged = Some(now);
        Some(std::mem::take(&mut self.unlogged))
    }
}

struct Tenant {
    link: Function,
    /// The pool's export (kept alive: the agent's import names it).
    _mmap: doca::Mmap,
    blob: Vec<u8>,
    /// Receive buffers the agent asked for and did not get yet.
    want: u32,
    /// Deliveries waiting for room in a function's ring; the tenant's
    /// functions on this node by key ([`Bridge::local_fns`]).
    /// Deliveries waiting for room, each with whether it is a call of a
    /// function on another node (marked as it is pushed: see
    /// `Bridge::deliver_as`).
    backlog: DeliveryBacklog<(Msg, bool)>,
    /// Per buffer: the agent's when a connection to it went away, kept so
    /// until [`AGENT_GONE_GRACE`] is over ([`Bridge::keeping`]). The agent
    /// of a later connection was never given it and cannot take it back.
    kept: Vec<bool>,
}

impl Tenant {
    /// Takes buffer `i` back from the agent, if the pool records it as the
    /// agent's and it is not [`kept`](Self::kept), as a one-buffer lease
    /// held by the bridge.
    fn take_from_agent(&self, i: u32) -> Option<Lease> {
        if self.kept.get(i as usize).is_none_or(|&k| k) {
            return None;
        }
        let pool = self.link.pool();
        pool.take_back(i, pool.geometry().payload_cap(), Owner::Agent, Owner::Held(self.link.info().slot)).ok()
    }
}

/// Buffers of one tenant the agent held when a connection went away,
/// freed at `until`.
struct Kept {
    until: Instant,
    tenant: usize,
    bufs: Vec<u32>,
}

/// Where the bridge publishes its counts for host-shimd's status file.
pub type SharedStats = Arc<std::sync::Mutex<BridgeStats>>;

/// The bridge of one node (see the module docs).
pub struct Bridge {
    cfg: Arc<Cluster>,
    node: u16,
    tenants: Vec<Tenant>,
    dev: doca::Device,
    pe: doca::ProgressEngine,
    client: Option<doca::ComchClient>,
    /// When the comch connection came up and the exports were sent (the
    /// agent is not `up` before it acknowledged them).
    connected: Option<Instant>,
    /// The agent took every pool (it acknowledged the exports): messages
    /// and lent buffers go to it only then.
    up: bool,
    /// The agent's silence about the exports was warned about.
    ack_warned: bool,
    name: String,
    out: Outbox,
    rx: Vec<u8>,
    /// Buffer indices of the message being handled.
    scratch: Vec<u32>,
    parts: Vec<Lease>,
    /// Lent buffers waiting to be sent.
    lend: Vec<u32>,
    /// What agents held when their connections went away, oldest first
    /// (see [`AGENT_GONE_GRACE`]).
    keeping: std::collections::VecDeque<Kept>,
    stats: BridgeStats,
    shared: SharedStats,
    /// What this bridge last put in `shared` (none yet: a new bridge
    /// overwrites what an earlier one left there).
    published: Option<BridgeStats>,
    /// Per cluster function, if it runs on this node: its tenant, and its
    /// key, its index among that tenant's functions here (in cluster
    /// order). A tenant's backlog has a place for each of those only, so
    /// the backlogs grow with the functions, not with tenants times
    /// functions.
    local_fns: Vec<Option<(u16, u16)>>,
    /// Deliveries to this cluster function are lost (see
    /// [`Bridge::lose_deliveries_to`]).
    lose_to: Option<u16>,
    /// Failed frees not logged yet ([`BridgeStats::free_failed`]).
    free_log: FreeFailedLog,
}

impl core::fmt::Debug for Bridge {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        f.debug_struct("Bridge").field("node", &self.node).field("up", &self.up).finish_non_exhaustive()
    }
}

impl Bridge {
    /// Attaches to host-shimd at `socket` for every tenant, exports the
    /// pools, and prepares the comch client of node `node`'s agent.
    pub fn new(cfg: Arc<Cluster>, node: u16, socket: &Path, shared: SharedStats) -> anyhow::Result<Self> {
        let n = cfg.nodes.get(usize::from(node)).ok_or_else(|| anyhow::anyhow!("no node {node}"))?;
        let dev = doca::open_host_link_device().map_err(|e| anyhow::anyhow!("opening the DOCA device: {e}"))?;
        let mut here = vec![0u16; cfg.tenants.len()];
        let local_fns: Vec<Option<(u16, u16)>> = cfg
            .functions
            .iter()
            .map(|f| {
                let t = cfg.tenant_id(&f.tenant).filter(|_| cfg.runs_on(f, node))?;
                let n = here.get_mut(usize::from(t))?;
                *n += 1;
                Some((t, *n - 1))
            })
            .collect();
        let mut tenants = Vec::with_capacity(cfg.tenants.len());
        for (t, &here) in cfg.tenants.iter().zip(&here) {
            let link = Function::attach_agent(socket, &t.name)?;
            let fd = link.pool().region().fd().try_clone_to_owned()?;
            let region = Arc::new(shm::Region::open(fd)?);
            let mmap = doca::Mmap::builder(doca::MemRange::region(region))
                .permissions(doca::Access::LOCAL_READ_WRITE | doca::Access::PCI_READ_WRITE)
                .add_device(&dev)
                .start()
                .map_err(|e| anyhow::anyhow!("tenant {}: mapping the pool for export: {e}", t.name))?;
            let blob =
                mmap.export_pci(&dev).map_err(|e| anyhow::anyhow!("tenant {}: exporting the pool: {e}", t.name))?;
            if blob.len() > MAX_EXPORT_BLOB {
                // Sent in one comch message, the agent's only way to the
                // pool: a larger blob would never reach it.
                anyhow::bail!(
                    "tenant {}: the pool's export blob has {} bytes, more than one comch message carries ({MAX_EXPORT_BLOB})",
                    t.name,
                    blob.len()
                );
            }
            let backlog = DeliveryBacklog::new(usize::from(here));
            let kept = vec![false; link.pool().geometry().buf_count() as usize];
            tenants.push(Tenant { link, _mmap: mmap, blob, want: 0, backlog, kept });
        }
        let max_chain = cfg.tenants.iter().map(|t| t.max_chain).max().unwrap_or(64) as usize;
        let mut bridge = Self {
            name: server_name(n),
            node,
            tenants,
            dev,
            pe: doca::ProgressEngine::new().map_err(|e| anyhow::anyhow!("progress engine: {e}"))?,
            client: None,
            connected: None,
            up: false,
            ack_warned: false,
            out: Outbox::new(doca::COMCH_MAX_MSG_SIZE as usize),
            rx: vec![0; doca::COMCH_MAX_MSG_SIZE as usize],
            scratch: Vec::with_capacity(max_chain.max(MAX_LEND)),
            parts: Vec::with_capacity(max_chain),
            lend: Vec::with_capacity(MAX_LEND),
            keeping: std::collections::VecDeque::new(),
            cfg,
            stats: BridgeStats::default(),
            shared,
            published: None,
            local_fns,
            lose_to: None,
            free_log: FreeFailedLog::default(),
        };
        // Only a bridge moves buffers to the agent, so any recorded as the
        // agent's were lent or handed over by an earlier bridge of this
        // host-shimd (`serve` builds a new one when host-shimd dropped one
        // of its connections). That bridge's connection went with it; the
        // agent may still have receives posted in them until it notices.
        let n = bridge.keep_agents_buffers();
        if n > 0 {
            log::warn!(
                "bridge: {n} buffers are the agent's from an earlier bridge; they are freed in \
                 {AGENT_GONE_GRACE:?} (its receives may land in them until it notices)"
            );
        }
        Ok(bridge)
    }

    /// What the bridge counted so far.
    pub fn stats(&self) -> BridgeStats {
        self.stats
    }

    /// Whether the agent is connected and has taken the pools.
    pub fn is_up(&self) -> bool {
        self.up
    }

    /// For tests: deliveries to cluster function `f` fail as when its
    /// instance dies as the bridge pushes a message into its ring and
    /// host-shimd takes the message's buffers back (they go back to the
    /// pool, and the send hands back nothing). `None`: deliveries work.
    #[doc(hidden)]
    pub fn lose_deliveries_to(&mut self, f: Option<u16>) {
        self.lose_to = f;
    }

    /// For tests: how many function keys the tenants' delivery backlogs
    /// keep order for, in all.
    #[doc(hidden)]
    pub fn backlog_keys(&self) -> usize {
        self.tenants.iter().map(|t| t.backlog.functions()).sum()
    }

    /// Runs until `stop` is set or host-shimd goes away.
    pub fn run(&mut self, stop: &AtomicBool) {
        self.run_with(stop, &mut |_| {})
    }

    /// [`run`](Self::run), calling `each_pass` before every pass.
    fn run_with(&mut self, stop: &AtomicBool, each_pass: &mut impl FnMut(&mut Bridge)) {
        let mut idle_since = Instant::now();
        while !stop.load(Ordering::Relaxed) {
            if !self.tenants.iter().all(|t| t.link.shimd_alive()) {
                log::warn!("bridge: host-shimd went away");
                return;
            }
            each_pass(self);
            if self.step() > 0 {
                idle_since = Instant::now();
            } else if idle_since.elapsed() > SPIN {
                self.sleep();
            } else {
                std::thread::yield_now();
            }
        }
    }

    /// One pass: comch events, the uplink rings, lends, deliveries waiting
    /// for room, and the outbox. Returns how much work it found.
    pub fn step(&mut self) -> usize {
        let mut work = self.pump();
        work += self.release_kept();
        if self.up {
            for t in 0..self.tenants.len() {
                for _ in 0..BATCH {
                    let Some(msg) = self.tenants[t].link.try_recv() else { break };
                    self.hand_to_agent(t, msg, 0);
                    work += 1;
                }
                work += self.lend(t);
                work += self.redeliver(t);
            }
            self.flush();
        } else if let Some(since) = self.connected
            && !self.ack_warned
            && since.elapsed() > ACK_WAIT
        {
            self.ack_warned = true;
            log::warn!(
                "bridge: the agent on comch \"{}\" has not taken the pools {ACK_WAIT:?} after connecting \
                 (another version of DNE, or another cluster file?); nothing is handed to it until it does",
                self.name
            );
        }
        if self.free_log.unlogged > 0
            && let Some(n) = self.free_log.due(Instant::now())
        {
            log::warn!(
                "bridge: {n} frees of buffers the bridge held failed ({} so far, by reason {:?}): a process \
                 of the tenant rewrote their owner words or chain links; they stay out of the pool until \
                 host-shimd reclaims them",
                self.stats.free_failed.total(),
                self.stats.free_failed.each().iter().filter(|&&(_, n)| n > 0).collect::<Vec<_>>()
            );
        }
        self.stats.up = self.up;
        // Only a change takes the lock (host-shimd's status writer holds it
        // now and then; this runs every pass).
        if self.published != Some(self.stats)
            && let Ok(mut s) = self.shared.lock()
        {
            *s = self.stats;
            self.published = Some(self.stats);
        }
        work
    }

    fn connect(&mut self) {
        let cfg = doca::ComchConfig { send_tasks: 256, recv_queue: 256, ..Default::default() };
        match doca::ComchClient::new(&self.pe, &self.dev, &self.name, cfg).and_then(|c| c.start().map(|()| c)) {
            Ok(c) => self.client = Some(c),
            Err(e) => log::warn!("bridge: comch client of \"{}\": {e}", self.name),
        }
    }

    /// Takes comch events; returns how many.
    fn pump(&mut self) -> usize {
        if self.client.is_none() {
            self.connect();
        }
        self.pe.progress();
        let mut n = 0;
        let mut rx = std::mem::take(&mut self.rx);
        while let Some(ev) = self.client.as_ref().and_then(|c| c.poll_event(&mut rx)) {
            n += 1;
            match ev {
                doca::ComchEvent::Connected(_) => self.agent_connected(),
                doca::ComchEvent::Disconnected(_) => self.agent_gone(),
                doca::ComchEvent::Message { len, truncated, .. } => {
                    if truncated {
                        log::warn!("bridge: a comch message of {len} bytes was cut; refused");
                        self.stats.refused += 1;
                        continue;
                    }
                    if let Err(e) = each_frame(&rx[..len as usize], |f| self.on_agent_frame(f)) {
                        log::warn!("bridge: a frame from the agent does not decode: {e}");
                        self.stats.refused += 1;
                    }
                }
                doca::ComchEvent::SendDone { result: Err(e), .. } => {
                    log::warn!("bridge: a send to the agent failed: {e}");
                }
                doca::ComchEvent::SendDone { .. } => {}
                // The host link carries no fast path.
                doca::ComchEvent::ConsumerUp { .. } | doca::ComchEvent::ConsumerDown { .. } => {}
            }
        }
        self.rx = rx;
        n
    }

    /// The comch connection is up: the pools are exported to the agent,
    /// which answers with an [`Ack`] once it took them all
    /// ([`agent_took_pools`](Self::agent_took_pools)).
    fn agent_connected(&mut self) {
        self.connected = Some(Instant::now());
        self.ack_warned = false;
        log::debug!("bridge: comch \"{}\" connected; exporting the pools", self.name);
        for t in 0..self.tenants.len() {
            let g = self.tenants[t].link.pool().geometry();
            let blob = std::mem::take(&mut self.tenants[t].blob);
            let body = PoolExport::new(g, self.tenants[t].link.pool().region().len() as u64, blob.len() as u32);
            self.push(CtrlMsg::PoolExport(body, &blob));
            self.tenants[t].blob = blob;
        }
        self.flush();
    }

    /// The agent acknowledged the exports: it imported every pool and takes
    /// messages from now on.
    fn agent_took_pools(&mut self) {
        if self.connected.is_none() || self.up {
            return self.refuse("an acknowledgement of exports it was not sent");
        }
        self.up = true;
        self.stats.connects += 1;
        log::info!("bridge: the agent is connected on comch \"{}\" and took the pools", self.name);
    }

    /// The connection to the agent went away: what the agent held is kept
    /// out of use for [`AGENT_GONE_GRACE`] (the agent may be alive, its
    /// receives still posted in those buffers), then freed
    /// ([`release_kept`](Self::release_kept)).
    fn agent_gone(&mut self) {
        let was_up = self.up;
        self.up = false;
        self.connected = None;
        self.out.clear();
        self.client = None;
        for tn in &mut self.tenants {
            tn.want = 0;
        }
        let n = self.keep_agents_buffers();
        if was_up || n > 0 {
            log::warn!(
                "bridge: the connection to the agent went away; the {n} buffers it held are freed in \
                 {AGENT_GONE_GRACE:?} (its receives may land in them until it notices)"
            );
        }
    }

    /// Keeps every buffer recorded as the agent's, and not kept yet, out
    /// of use until [`AGENT_GONE_GRACE`] from now, then frees it
    /// ([`release_kept`](Self::release_kept)): the connection of the agent
    /// that held it is gone. Returns how many buffers.
    fn keep_agents_buffers(&mut self) -> usize {
        let until = Instant::now() + AGENT_GONE_GRACE;
        let mut n = 0;
        for (t, tn) in self.tenants.iter_mut().enumerate() {
            let pool = tn.link.pool();
            // (Those kept from an earlier connection keep their time.)
            let bufs: Vec<u32> = (0..pool.geometry().buf_count())
                .filter(|&i| !tn.kept[i as usize] && pool.owner(i) == Ok(Owner::Agent))
                .collect();
            if bufs.is_empty() {
                continue;
            }
            for &i in &bufs {
                tn.kept[i as usize] = true;
            }
            n += bufs.len();
            self.keeping.push_back(Kept { until, tenant: t, bufs });
        }
        self.stats.holding += n as u64;
        n
    }

    /// Frees what agents held when their connections went away, once
    /// [`AGENT_GONE_GRACE`] is over. Returns how many buffers.
    fn release_kept(&mut self) -> usize {
        let now = Instant::now();
        let mut n = 0;
        while let Some(k) = self.keeping.front()
            && k.until <= now
        {
            let Some(Kept { tenant: t, bufs, .. }) = self.keeping.pop_front() else { break };
            for i in bufs {
                self.tenants[t].kept[i as usize] = false;
                // Nobody else moves a buffer from the agent, and this one
                // was kept from the agents since.
                match self.tenants[t].take_from_agent(i) {
                    Some(lease) => {
                        self.stats.reclaimed += 1;
                        self.free(t, lease);
                    }
                    None => log::warn!("bridge: buffer {i} kept for a gone agent is not the agent's any more"),
                }
                self.stats.holding -= 1;
                n += 1;
            }
        }
        if n > 0 {
            log::info!("bridge: freed {n} buffers a gone agent held");
        }
        n
    }

    /// Queues a frame for the agent; `false` when the connection is gone
    /// (the frame is not sent).
    fn push(&mut self, msg: CtrlMsg<'_>) -> bool {
        let Some(c) = self.client.as_ref() else { return false };
        let mut send = |m: &[u8]| c.send(m, 0);
        if self.out.push(msg, &mut send).is_err() {
            self.agent_gone();
            return false;
        }
        true
    }

    fn flush(&mut self) {
        let Some(c) = self.client.as_ref() else { return };
        let mut send = |m: &[u8]| c.send(m, 0);
        if self.out.flush(&mut send).is_err() {
            self.agent_gone();
        }
    }

    /// A function's message for another node (or one handed back, see
    /// [`MessageHdr`]'s `flags`): headers, hand-over, frame.
    fn hand_to_agent(&mut self, t: usize, msg: Msg, flags: u16) {
        let (lease, desc) = msg.into_parts();
        let pool = self.tenants[t].link.pool();
        let cap = pool.geometry().payload_cap();
        self.scratch.clear();
        self.scratch.extend(pool.chain(&lease));
        if self.scratch.len() > wire::ctrl::MAX_MESSAGE_CHAIN {
            // The cluster file cannot allow such chains with a node in DPU
            // mode (`max_chain`): one comch message could not name them.
            log::error!("bridge: a message of {} buffers does not fit a comch message; dropped", self.scratch.len());
            self.stats.dropped.too_long += 1;
            return self.free(t, lease);
        }
        let count = self.scratch.len() as u16;
        for (k, &i) in (0u16..).zip(&self.scratch) {
            let h = FabricHeader::new(MsgKind::Data, desc, k, count, frag_len(lease.len(), cap, u32::from(k)));
            if let Some(off) = pool.buf_offset(i) {
                let _ = pool.region().copy_in(off + u64::from(HEADER_OFFSET), h.as_bytes());
            }
        }
        match pool.hand_over(lease, Owner::Agent) {
            Ok((head, len)) => {
                let hdr = MessageHdr { desc: Descriptor { buf: head, len, ..desc }, flags, count };
                let list = std::mem::take(&mut self.scratch);
                if self.push(CtrlMsg::Message(hdr, BufList::from_indices(&list))) {
                    self.stats.to_agent += 1;
                } else {
                    log::debug!("bridge: a message for the agent dropped: the connection is gone");
                    self.stats.dropped.agent_gone += 1;
                }
                self.scratch = list;
            }
            Err((lease, e)) => {
                log::warn!("bridge: handing a message to the agent: {e}");
                self.stats.dropped.ownership += 1;
                self.free(t, lease);
            }
        }
    }

    fn on_agent_frame(&mut self, f: CtrlMsg<'_>) {
        match f {
            CtrlMsg::Message(h, list) => self.agent_message(h, list),
            CtrlMsg::ReturnBufs(LendRecv { tenant: t, .. }, list) => {
                let t = usize::from(t);
                if t >= self.tenants.len() {
                    return self.refuse("return: unknown tenant");
                }
                for i in list.iter() {
                    match self.tenants[t].take_from_agent(i) {
                        Some(lease) => {
                            self.stats.returned += 1;
                            self.free(t, lease);
                        }
                        None => self.refuse("return: a buffer the agent does not hold"),
                    }
                }
            }
            CtrlMsg::WantBufs(LendRecv { tenant: t, count: n, .. }) => match self.tenants.get_mut(usize::from(t)) {
                Some(tn) => tn.want = tn.want.saturating_add(n).min(tn.link.pool().geometry().buf_count()),
                None => self.refuse("want: unknown tenant"),
            },
            CtrlMsg::Ack(Ack { about_kind, .. }) if about_kind == CtrlKind::PoolExport as u16 => {
                self.agent_took_pools()
            }
            other => {
                log::warn!("bridge: unexpected {:?} frame from the agent", other.kind());
                self.stats.refused += 1;
            }
        }
    }

    fn refuse(&mut self, why: &str) {
        log::warn!("bridge: refused from the agent: {why}");
        self.stats.refused += 1;
    }

    /// Frees the buffers of the message being handled (`parts`, tenant
    /// `t`) and refuses it.
    fn refuse_parts(&mut self, t: usize, why: &str) {
        let mut parts = std::mem::take(&mut self.parts);
        for l in parts.drain(..) {
            self.free(t, l);
        }
        self.parts = parts;
        self.refuse(why);
    }

    /// A message from the agent: takes its buffers back, links them, and
    /// delivers it (or re-stamps it and sends it back).
    fn agent_message(&mut self, h: MessageHdr, list: BufList<'_>) {
        let t = usize::from(h.desc.tenant);
        let Some(tn) = self.tenants.get(t) else {
            self.stats.dropped.unknown_tenant += 1;
            return self.refuse("message: unknown tenant");
        };
        let pool = tn.link.pool();
        self.parts.clear();
        for i in list.iter() {
            match tn.take_from_agent(i) {
                Some(l) => self.parts.push(l),
                None => {
                    // Give back what was taken: the agent still counts on it.
                    for l in self.parts.drain(..) {
                        let _ = pool.hand_over(l, Owner::Agent);
                    }
                    self.stats.dropped.not_held += 1;
                    return self.refuse("message: a buffer the agent does not hold");
                }
            }
        }
        let mut desc = h.desc;
        let from_fabric = h.flags & MessageHdr::FROM_FABRIC != 0;
        if from_fabric {
            match read_header(pool, h.desc.buf, &h, list.len()) {
                Some(d) => desc = Descriptor { tenant: t as u16, ..d },
                None => {
                    self.stats.dropped.bad_header += 1;
                    return self.refuse_parts(t, "message: its fabric header disagrees with what the agent saw");
                }
            }
            if desc.flags & DescFlags::REPLY != 0 && desc.flags & DescFlags::ERROR == 0 {
                // A reply never ends on a worker node.
                self.stats.dropped.worker_reply += 1;
                return self.refuse_parts(t, "message: a reply for a worker node");
            }
        }
        let mut parts = std::mem::take(&mut self.parts);
        let joined = self.tenants[t].link.pool().join(&mut parts, desc.len);
        self.parts = parts;
        let lease = match joined {
            Ok(lease) => lease,
            Err(shm::JoinError::Len(_)) => {
                self.stats.dropped.bad_length += 1;
                return self.refuse_parts(t, "message: its buffers do not add up to its length");
            }
            Err(e) => {
                // Not the agent's doing: every part was taken back above
                // from this pool, one buffer each, as this slot's.
                log::error!("bridge: linking the buffers of a message from the agent: {e}");
                return self.refuse_parts(t, "message: its buffers could not be linked");
            }
        };
        let msg = Msg::from_parts(lease, Descriptor { buf: h.desc.buf, ..desc });
        if h.flags & MessageHdr::RESTAMP != 0 {
            self.hand_to_agent(t, msg, 0);
        } else {
            // (A message over the fabric came from another node.)
            let far_call = from_fabric && desc.origin == NO_NODE && desc.may_go_elsewhere();
            self.deliver(t, msg, far_call);
        }
    }

    fn deliver(&mut self, t: usize, msg: Msg, far_call: bool) {
        self.deliver_as(t, msg, far_call, false)
    }

    /// [`deliver`](Self::deliver); `retry`: from the backlog (its
    /// function's messages still there are behind it). A new message for
    /// a function with messages waiting waits behind them (order).
    ///
    /// `far_call`: a call of a function on another node, which goes into
    /// the ring marked [`DescFlags::ELSEWHERE`] (its function may see it;
    /// it means nothing there), as the agent's engine marks it on a host
    /// it shares memory with: a descriptor does not name its caller's
    /// node, and this mark is how host-shimd, answering the calls waiting
    /// in the ring of an instance that dies, knows the call came through
    /// the agent and sends its answer back through it, to the node the
    /// agent recorded, not to an instance of the caller on this node. A
    /// delivery that fails takes the mark off again (handed back, the
    /// call may still go on).
    fn deliver_as(&mut self, t: usize, msg: Msg, far_call: bool, retry: bool) {
        let dst = msg.desc().dst_fn;
        let key = match self.local_fns.get(usize::from(dst)) {
            Some(&Some((owner, key))) if usize::from(owner) == t => key,
            _ => return self.bounce(t, msg),
        };
        if !retry && self.tenants[t].backlog.holds(key) {
            return self.tenants[t].backlog.wait(key, (msg, far_call), false);
        }
        let d = *msg.desc();
        let name = &self.cfg.functions[usize::from(dst)].name;
        let mut msg = msg;
        if far_call {
            msg.desc_mut().flags |= DescFlags::ELSEWHERE;
        }
        let unmark = |mut m: Msg| {
            if far_call {
                m.desc_mut().flags &= !DescFlags::ELSEWHERE;
            }
            m
        };
        let sent = if self.lose_to == Some(dst) {
            self.free(t, msg.into_parts().0);
            Err(SendError { kind: SendErrorKind::NoInstance, msg: None })
        } else {
            self.tenants[t].link.send(msg, name)
        };
        match sent {
            Ok(()) => self.stats.delivered += 1,
            Err(e) => match (e.kind, e.msg) {
                (SendErrorKind::Full, Some(m)) => self.tenants[t].backlog.wait(key, (unmark(m), far_call), retry),
                (_, Some(m)) => self.bounce(t, unmark(m)),
                (_, None) => self.report_lost(d),
            },
        }
    }

    /// A message lost as it was delivered (its instance died as it was
    /// pushed, and host-shimd took its buffers back; `d`: its descriptor,
    /// `d.buf` the first buffer the agent named): the agent hears of it
    /// ([`Lost`], alone in its comch message: see [`crate::comch`]) and
    /// answers a call `PeerDied`, as it does for a call lost that way on a
    /// host it shares memory with.
    #[cold]
    fn report_lost(&mut self, d: Descriptor) {
        self.stats.lost += 1;
        let Some(c) = self.client.as_ref() else {
            self.stats.dropped.agent_gone += 1;
            return;
        };
        let mut send = |m: &[u8]| c.send(m, 0);
        if self.out.push_alone(CtrlMsg::Lost(Lost { desc: d, reserved: 0 }), &mut send).is_err() {
            self.stats.dropped.agent_gone += 1;
            self.agent_gone();
        }
    }

    /// Tries the backlog again (see [`DeliveryBacklog`]).
    fn redeliver(&mut self, t: usize) -> usize {
        let k = self.tenants[t].backlog.len();
        self.tenants[t].backlog.begin_pass();
        while let Some((m, far_call)) = self.tenants[t].backlog.next_to_try() {
            self.deliver_as(t, m, far_call, true);
        }
        k.saturating_sub(self.tenants[t].backlog.len())
    }

    /// No live local instance: the message goes back to the agent as it
    /// is, marked [`MessageHdr::RETURNED`], and the agent decides what
    /// becomes of it, the same way as for a delivery that fails on a host
    /// it shares memory with: a call goes to another node of its function,
    /// to its caller's node, or back as an error; an error (its caller is
    /// gone) is dropped and counted in the agent's metrics.
    fn bounce(&mut self, t: usize, msg: Msg) {
        self.stats.handed_back += 1;
        self.hand_to_agent(t, msg, MessageHdr::RETURNED);
    }

    /// Lends receive buffers the agent asked for, as far as the pool has
    /// them.
    fn lend(&mut self, t: usize) -> usize {
        let mut n = 0;
        while self.tenants[t].want > 0 {
            let tn = &mut self.tenants[t];
            let cap = tn.link.pool().geometry().payload_cap();
            self.lend.clear();
            let mut unlent = None;
            while self.lend.len() < MAX_LEND.min(tn.want as usize) {
                let Ok(m) = tn.link.alloc(cap) else { break };
                let (lease, _) = m.into_parts();
                match tn.link.pool().hand_over(lease, Owner::Agent) {
                    Ok((i, _)) => self.lend.push(i),
                    Err((lease, e)) => {
                        log::warn!("bridge: lending a buffer: {e}");
                        unlent = Some(lease);
                        break;
                    }
                }
            }
            if let Some(lease) = unlent {
                self.free(t, lease);
            }
            if self.lend.is_empty() {
                break;
            }
            let k = self.lend.len() as u32;
            self.tenants[t].want -= k;
            self.stats.lent += u64::from(k);
            n += k as usize;
            let lend = std::mem::take(&mut self.lend);
            let body = LendRecv { tenant: t as u16, reserved: 0, count: k };
            self.push(CtrlMsg::LendRecv(body, BufList::from_indices(&lend)));
            self.lend = lend;
        }
        n
    }

    /// Frees a lease of tenant `t`. A failure is counted
    /// ([`BridgeStats::free_failed`]) and logged as a summary by
    /// [`step`](Self::step), at most once per [`FREE_FAILED_LOG_EVERY`]: a
    /// process of the tenant that rewrites owner words can make every free
    /// fail, at message rate.
    fn free(&mut self, t: usize, lease: Lease) {
        if let Err(e) = self.tenants[t].link.free(Msg::from_parts(lease, Descriptor::default())) {
            log::trace!("bridge: freeing a buffer: {e}");
            self.stats.free_failed.count(&e);
            self.free_log.add(1);
        }
    }

    /// Sleeps until a function sends, the agent has news, or [`TICK`]
    /// ([`IDLE_TICK`] when nothing is pending).
    fn sleep(&mut self) {
        use rustix::event::{PollFd, PollFlags, Timespec, poll};
        // DOCA's flow: clear, progress until nothing is left (a step that
        // found work returns, and the next sleep clears again), arm, and
        // only then wait: the handle fires once per arm.
        if let Err(e) = self.pe.clear_notification() {
            log::warn!("bridge: clearing the comch notification: {e}");
        }
        if self.step() > 0 {
            return;
        }
        if let Err(e) = self.pe.request_notification() {
            log::warn!("bridge: arming the comch notification: {e}");
        }
        let mut armed = 0;
        while armed < self.tenants.len() && self.tenants[armed].link.sleep_begin() {
            armed += 1;
        }
        if armed == self.tenants.len() {
            let mut fds: Vec<PollFd<'_>> = Vec::with_capacity(armed + 1);
            if let Ok(fd) = self.pe.notification_handle() {
                fds.push(PollFd::from_borrowed_fd(fd, PollFlags::IN));
            }
            for tn in &self.tenants {
                fds.push(PollFd::from_borrowed_fd(tn.link.doorbell_fd(), PollFlags::IN));
            }
            let pending =
                !self.up || !self.out.is_empty() || self.tenants.iter().any(|t| t.want > 0 || !t.backlog.is_empty());
            let mut tick = if pending { TICK } else { IDLE_TICK };
            if let Some(k) = self.keeping.front() {
                // (At least a microsecond: a zero timeout would spin.)
                tick = tick.min(k.until.saturating_duration_since(Instant::now())).max(Duration::from_micros(1));
            }
            let ts = Timespec { tv_sec: 0, tv_nsec: tick.as_nanos() as i64 };
            if let Err(e) = poll(&mut fds, Some(&ts))
                && e != rustix::io::Errno::INTR
            {
                log::warn!("bridge: sleeping: {e}");
                std::thread::sleep(TICK);
            }
        }
        let woken = (armed + 1).min(self.tenants.len());
        for tn in self.tenants.iter_mut().take(woken) {
            tn.link.sleep_end();
        }
    }
}

/// The descriptor in the fabric header of a received message's first
/// buffer, if it agrees with what the agent saw
/// ([`FabricHeader::check_landed`]).
fn read_header(pool: &shm::Pool, first: u32, h: &MessageHdr, frags: usize) -> Option<Descriptor> {
    let mut b = [0u8; size_of::<FabricHeader>()];
    pool.region().copy_out(pool.buf_offset(first)? + u64::from(HEADER_OFFSET), &mut b).ok()?;
    match FabricHeader::check_landed(&b, h.desc.dst_fn, frags, h.desc.len) {
        Ok(d) => Some(d),
        Err(e) => {
            log::warn!("bridge: a received message's header: {e}");
            None
        }
    }
}

/// How long [`serve`] waits before a new bridge after one panicked, the
/// first time; it doubles with each panic, up to [`PANIC_BACKOFF_MAX`],
/// so a bridge that panics at once does not spin.
const PANIC_BACKOFF: Duration = Duration::from_millis(100);
/// The longest wait before a new bridge after a panic.
const PANIC_BACKOFF_MAX: Duration = Duration::from_secs(5);
/// A bridge that lived this long, however it ended, starts the wait after
/// the next panic over from [`PANIC_BACKOFF`].
const PANIC_BACKOFF_RESET: Duration = Duration::from_secs(60);

/// The wait before a new bridge after a panic: [`PANIC_BACKOFF`], doubled
/// with each panic up to [`PANIC_BACKOFF_MAX`].
#[derive(Debug)]
struct PanicBackoff {
    /// The wait after the next panic.
    next: Duration,
}

impl Default for PanicBackoff {
    fn default() -> Self {
        Self { next: PANIC_BACKOFF }
    }
}

impl PanicBackoff {
    /// A bridge ended after living `lived`, by a panic if `panicked`.
    /// Returns the wait before the next bridge after a panic (`None`
    /// otherwise).
    fn ended(&mut self, lived: Duration, panicked: bool) -> Option<Duration> {
        // However it ended: a bridge that returned after a long life
        // leaves no long wait to a later panic.
        if lived >= PANIC_BACKOFF_RESET {
            self.next = PANIC_BACKOFF;
        }
        if !panicked {
            return None;
        }
        let wait = self.next;
        self.next = (wait * 2).min(PANIC_BACKOFF_MAX);
        Some(wait)
    }
}

/// Runs the bridge of node `node` until `stop` is set: attaches (retrying
/// while host-shimd starts), then serves; re-attaches if it has to. A
/// bridge that panics is replaced (see the module docs).
pub fn serve(cfg: Arc<Cluster>, node: u16, socket: &Path, stop: &AtomicBool, shared: SharedStats) {
    serve_with_hook(cfg, node, socket, stop, shared, |_| {})
}

/// For tests: [`serve`], calling `each_pass` before every pass of each
/// bridge (a test makes a bridge panic there). [`serve`] passes a hook
/// that does nothing.
#[doc(hidden)]
pub fn serve_with_hook(
    cfg: Arc<Cluster>,
    node: u16,
    socket: &Path,
    stop: &AtomicBool,
    shared: SharedStats,
    mut each_pass: impl FnMut(&mut Bridge),
) {
    let mut delay = Duration::from_millis(10);
    let mut failed = 0u32;
    let mut backoff = PanicBackoff::default();
    // Over this host-shimd's life, carried into each new bridge's counts.
    let (mut built, mut panics) = (0u64, 0u64);
    while !stop.load(Ordering::Relaxed) {
        let born = Instant::now();
        // Unwind safety: after a panic, what the closure touched and
        // outlives it is `cfg`, `socket`, `stop` and `panics`, which a
        // bridge only reads; `built`, one number, incremented or not;
        // `each_pass`, which only tests pass (and panic in); and `shared`,
        // a mutex whose `Copy` value a bridge replaces whole (the lock is
        // poisoned only if the panic came while it was held; the poison
        // is cleared below). Everything else is the bridge's and is
        // dropped as the panic unwinds, as when `run` returns: its links
        // close, and host-shimd takes back what the agent's slot held, as
        // when the agent's process dies at any point; the next bridge
        // keeps, then frees, what is recorded as the agent's.
        let life = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            let mut b = Bridge::new(cfg.clone(), node, socket, shared.clone())?;
            b.stats.panics = panics;
            b.stats.restarts = built;
            built += 1;
            b.run_with(stop, &mut each_pass);
            anyhow::Ok(b.stats())
        }));
        let lived = born.elapsed();
        let wait = backoff.ended(lived, life.is_err());
        match life {
            Ok(Ok(stats)) => {
                failed = 0;
                log::info!("bridge: stopped: {stats:?}");
                delay = Duration::from_millis(10);
            }
            Ok(Err(e)) => {
                // Expected while host-shimd starts; said aloud once it
                // lasts (a cause that does not go away, too).
                failed += 1;
                if failed >= 8 && failed.is_power_of_two() {
                    log::warn!("bridge: not attached after {failed} tries: {e}");
                } else {
                    log::debug!("bridge: not attached yet: {e}");
                }
                std::thread::sleep(delay);
                delay = (delay * 2).min(Duration::from_millis(500));
            }
            Err(payload) => {
                panics += 1;
                // (`ended` gave a wait: the bridge panicked.)
                let wait = wait.unwrap_or(PANIC_BACKOFF);
                let why = payload
                    .downcast_ref::<&str>()
                    .copied()
                    .or_else(|| payload.downcast_ref::<String>().map(String::as_str))
                    .unwrap_or("(a panic without a message)");
                log::error!(
                    "bridge: panicked after {lived:?}: {why}; a new bridge starts in {wait:?} \
                     ({panics} panics of this host-shimd's bridges so far)"
                );
                // The status file says so at once: no bridge, one more panic.
                shared.clear_poison();
                if let Ok(mut s) = shared.lock() {
                    s.up = false;
                    s.panics = panics;
                }
                // Its drop may panic too, which must not end this thread.
                if crate::drop_panic_payload(payload) {
                    log::error!("bridge: dropping a panic's payload panicked too; leaving it");
                }
                nap(wait, stop);
                failed = 0;
                delay = Duration::from_millis(10);
            }
        }
    }
}

/// Sleeps for `d`, or until `stop` is set.
fn nap(d: Duration, stop: &AtomicBool) {
    let until = Instant::now() + d;
    while !stop.load(Ordering::Relaxed) {
        let left = until.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return;
        }
        std::thread::sleep(left.min(Duration::from_millis(10)));
    }
}

#[cfg(test)]
mod tests {
    use super::{PANIC_BACKOFF, PANIC_BACKOFF_MAX, PANIC_BACKOFF_RESET, PanicBackoff};
    use std::time::Duration;

    /// Failed frees are logged at the first pass that sees them, then at
    /// most once per [`super::FREE_FAILED_LOG_EVERY`], each line with the
    /// count since the last.
    #[test]
    fn failed_frees_are_logged_at_most_once_a_second() {
        use super::{FREE_FAILED_LOG_EVERY, FreeFailedLog};
        let t0 = std::time::Instant::now();
        let mut f = FreeFailedLog::default();
        assert_eq!(f.due(t0), None, "nothing failed");
        f.add(1);
        assert_eq!(f.due(t0), Some(1), "the first at once");
        let mut logged = Vec::new();
        for ms in 1..=2500u64 {
            f.add(1);
            let now = t0 + Duration::from_millis(ms);
            logged.extend(f.due(now).map(|n| (now - t0, n)));
        }
        let every = FREE_FAILED_LOG_EVERY.as_millis() as u64;
        assert_eq!(logged, [(Duration::from_millis(every), every), (Duration::from_millis(2 * every), every)]);
    }

    /// Each failure is counted under the name its error gives itself
    /// ([`super::MsgFreeError::as_str`], the agent's metrics label).
    #[test]
    fn failed_frees_are_counted_under_their_errors_names() {
        use super::{BridgeFreeFailed, FreeError, MsgFreeError};
        let errors = [
            FreeError::OutOfRange(1),
            FreeError::DoubleFree(1),
            FreeError::NotOwner { index: 1, owner: 0 },
            FreeError::BadLink(1),
            FreeError::ForeignLease,
        ];
        for e in errors {
            let e = MsgFreeError::Pool(e);
            let mut c = BridgeFreeFailed::default();
            c.count(&e);
            let counted: Vec<_> = c.each().into_iter().filter(|&(_, n)| n > 0).collect();
            assert_eq!(counted, [(e.as_str(), 1)], "{e:?}");
        }
        // (`MsgFreeError::Foreign` holds a message, which needs a pool.)
        assert!(BridgeFreeFailed::default().each().iter().any(|&(name, _)| name == "foreign"));
    }

    /// The wait after a panic doubles from [`PANIC_BACKOFF`] up to
    /// [`PANIC_BACKOFF_MAX`], and starts over after a bridge that lived
    /// [`PANIC_BACKOFF_RESET`], however that bridge ended: one that
    /// returned after a long life leaves no long wait to a later panic.
    #[test]
    fn the_panic_backoff_starts_over_after_any_long_lived_bridge() {
        let short = Duration::from_secs(1);
        let mut b = PanicBackoff::default();
        let waits: Vec<_> = (0..8).map(|_| b.ended(short, true).expect("a wait after a panic")).collect();
        let ms = |n| Duration::from_millis(n);
        assert_eq!(waits, [ms(100), ms(200), ms(400), ms(800), ms(1600), ms(3200), ms(5000), ms(5000)]);
        assert_eq!(waits[0], PANIC_BACKOFF);
        assert_eq!(waits[7], PANIC_BACKOFF_MAX);
        // A short life that ends without a panic changes nothing.
        assert_eq!(b.ended(short, false), None);
        assert_eq!(b.ended(short, true), Some(PANIC_BACKOFF_MAX));
        // A bridge that panicked after a long life starts the wait over.
        assert_eq!(b.ended(PANIC_BACKOFF_RESET, true), Some(PANIC_BACKOFF));
        assert_eq!(b.ended(short, true), Some(ms(200)));
        // So does one that returned after a long life.
        assert_eq!(b.ended(PANIC_BACKOFF_RESET, false), None);
        assert_eq!(b.ended(short, true), Some(PANIC_BACKOFF), "after a bridge that lived a minute and returned");
    }
}

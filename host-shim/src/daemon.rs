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
//!   senders stop, frees every buffer it owned and hints again any buffer
//!   it freed without hinting ([`shm::Pool::repair`]); it scans again
//!   after a grace period to catch a sender that handed a buffer over just
//!   as the function died, and only then reuses the slot.
//! * Answers the calls still waiting in a dead function's ring (published,
//!   not yet consumed) with `PeerDied`, as the agent's engine answers a
//!   call whose instance dies as it delivers it: the call's first buffer
//!   becomes the error (the rest of its chain is freed), which goes to a
//!   live instance of the calling function on this node, or through the
//!   agent's uplink to the ingress that originated the request or to a
//!   caller on another node (see `Shimd::answer_dead_calls`).
//! * Drops a function that is alive and misbehaves (a control frame that
//!   does not decode, a reply it left unread past the send timeout):
//!   closes its ring so senders stop, and kills it (`SIGKILL` through the
//!   pidfd taken when it attached). Its buffers, its slot and its
//!   instance stay out of use until the process has exited: a process
//!   still running still maps the pool and its ring, and would write into
//!   buffers given to others or take descriptors meant for the slot's
//!   next function. Then it is reclaimed as any death. A process it cannot
//!   kill (another user's, host-shimd not root) keeps them until it exits,
//!   and is reported once it has run [`KILL_WAIT`] past its drop. Without
//!   a pidfd (a kernel before 6.5 with the function in a pid namespace
//!   host-shimd cannot see: its pid reads as 0) it cannot be killed, and
//!   its control connection closing stands for its exit, as for any
//!   death. The status file shows the dropped processes waited for
//!   (`dropped`), those of them past [`KILL_WAIT`] (`overdue`), and the
//!   kills sent (`killed`).
//! * Keeps one uplink ring per tenant for the node's agent (slot
//!   [`AGENT_SLOT`]): the agent attaches once per tenant under the name
//!   [`AGENT_NAME`], and a function's lookup of a function on another node
//!   (or of [`AGENT_NAME`], for replies to the ingress) answers with that
//!   ring. The ring outlives the agent: when the agent dies only the buffers
//!   it held are reclaimed, descriptors waiting in the ring wait for the
//!   restarted agent.
//! * When a process of a tenant dies, notes the slots of the tenant's rings
//!   that were claimed and not yet published; those still unpublished after
//!   [`HOLE_GRACE`] were the dead producer's, and are published as void
//!   descriptors, which consumers drop and count, so that no ring waits
//!   forever at a slot nobody will fill. Likewise buffers handed over to a
//!   consumer then and still, that no descriptor in its ring names: the
//!   dead process handed them over and never pushed; they are freed.
//! * Writes counters to `<runtime_dir>/shimd.status` (JSON) after every
//!   control event, and at most every second when a pool's free count
//!   moved with traffic, for operators and tests.
//! * When it stops (SIGTERM, SIGINT, an error or a panic: whenever
//!   [`Shimd`] is dropped), marks every ring it made abandoned
//!   ([`Ring::abandon`]: the attached functions' and the uplinks) and rings
//!   their doorbells, before the control connections close: from then on
//!   every push into them fails (`SendErrorKind::ShimdGone`, the message
//!   handed back), and every receive, spinning or asleep, ends once its
//!   ring is empty. A new host-shimd makes new pools and rings, so nothing
//!   pushed into these would be delivered. Killed outright (SIGKILL) it
//!   cannot: the functions learn it only from the control connection.

use crate::sock::{Conn, Listener};
use config::Cluster;
use rustix::event::{PollFd, PollFlags};
use shm::ring::{Doorbell, Ring};
use shm::{PagePolicy, Pool};
use std::collections::{BTreeMap, HashMap};
use std::io;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};
use wire::ctrl::{AGENT_NAME, Ack, AttachOk, CTRL_MAX_FRAME, CtrlError, CtrlKind, CtrlMsg, Peer, Role};
use wire::desc::NO_NODE;
use wire::segment::AGENT_SLOT;
use wire::{CtrlFrame, DescFlags, Descriptor, ErrorCode, Owner};

/// Slots of each tenant's uplink ring (functions to the agent).
pub const UPLINK_CAPACITY: u32 = 4096;

/// Function id the agent's attach reply carries (it is no function).
const NO_FUNCTION: u16 = u16::MAX;

struct Uplink {
    ring: Ring,
    bell: Doorbell,
    /// Whether an agent is attached for this tenant now.
    attached: bool,
}

/// How long after a death the ring slots its producers had claimed and not
/// published are left before they are published as voids: a live producer
/// publishes nanoseconds after its claim, unless its CPU is taken from it
/// for this long in between.
pub const HOLE_GRACE: Duration = Duration::from_secs(1);

/// How long after a death the buffers are scanned again and the slot kept
/// out of use; the calls that waited in the dead function's ring are
/// answered then (`Shimd::answer_dead_calls`).
pub const RECLAIM_GRACE: Duration = Duration::from_millis(200);

struct Attached {
    /// The agent's attach (its ring is the tenant's uplink, which stays).
    agent: bool,
    tenant: u16,
    function: u16,
    instance: u16,
    slot: u16,
    ring: Ring,
    bell: Doorbell,
    /// Which attach this is (host-shimd's count of attaches then): a slot
    /// used again is another function's, with another ring.
    attach_no: u64,
    /// A function's process, as a pidfd taken at its attach (see
    /// [`Conn::peer_pidfd`]); `None` for the agent, and when none could be
    /// taken (a kernel before 5.3, or before 6.5 with the function in a
    /// pid namespace host-shimd cannot see).
    pidfd: Option<OwnedFd>,
}

/// A function dropped while alive ([`Shimd::drop_live`]), waiting for its
/// process to exit: until then its slot, instance and buffers stay its own.
struct Dropped {
    pid: i32,
    attached: Attached,
    watch: Watch,
    since: Instant,
    /// Reported as running [`KILL_WAIT`] past its drop.
    overdue: bool,
}

/// How host-shimd sees a dropped function's process exit.
enum Watch {
    /// Its pidfd (taken at its attach) becomes readable.
    Pidfd(OwnedFd),
    /// Without a pidfd (or when it is host-shimd's own process): its
    /// control connection, kept and no longer read, closes, as when
    /// host-shimd learns any death. A process that closes it and runs on
    /// is taken for dead.
    Hangup(Conn),
}

/// How long a dropped function's process may run on before host-shimd
/// reports it (log and status file): after `SIGKILL` a process exits
/// within milliseconds, unless it sleeps uninterruptibly in the kernel,
/// or host-shimd could not signal it. Its slot and buffers stay out of use
/// for as long as it runs, however long that is.
pub const KILL_WAIT: Duration = Duration::from_secs(5);

struct Client {
    conn: Conn,
    pid: i32,
    uid: u32,
    /// The role announced in Hello (`None` before Hello).
    role: Option<Role>,
    attached: Option<Attached>,
    /// Its replies are not being read (no room to send it another): its
    /// requests stay unread in its socket until it reads, so it holds
    /// back only itself, never host-shimd's one thread.
    held: bool,
    /// When it connected (a client that has not attached within
    /// [`ATTACH_WITHIN`] is dropped).
    since: Instant,
}

/// How long a connection may stay without attaching.
pub const ATTACH_WITHIN: Duration = Duration::from_secs(10);
/// Connections of one user that may have waited unattached longer than
/// [`UNATTACHED_GRACE`] at once: beyond that the user's new connections
/// are closed at once, so one user opening connections and leaving them
/// idle cannot take every descriptor of host-shimd from the other
/// tenants' functions ([`ATTACH_WITHIN`] drops the idle ones).
pub const UNATTACHED_PER_USER: usize = 128;
/// How long a new connection is not counted as idle: a function attaches
/// within milliseconds of connecting, and a burst of them (a node's
/// functions started at once, as one user) is served whatever its size.
pub const UNATTACHED_GRACE: Duration = Duration::from_secs(1);
/// How long host-shimd stops accepting connections after accepting one
/// failed (out of file descriptors, say): the pending connection would
/// otherwise wake it again at once.
const ACCEPT_PAUSE: Duration = Duration::from_millis(100);

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
    /// Free buffers found without their free hint, hinted again: after a
    /// death (its process died between freeing one and hinting it), or by
    /// the status scan (a process of the tenant cleared hints, or stopped
    /// between freeing and hinting). May count a few a live process was
    /// about to hint.
    pub rehinted: u64,
    /// Control frames that failed to decode.
    pub bad_frames: u64,
    /// Ring slots a dead producer had claimed and never filled, published
    /// as void descriptors so their consumers move on.
    pub voids: u64,
    /// Buffers a dead producer had handed over to a function (or the
    /// agent) but whose descriptor it never pushed: freed.
    pub orphans: u64,
    /// Looks for voids and orphans done, one per death, [`HOLE_GRACE`]
    /// after it.
    pub hole_checks: u64,
    /// Times a client's requests were held back because it did not read
    /// its replies.
    pub held: u64,
    /// Connections that could not be accepted (out of file descriptors,
    /// say); host-shimd pauses accepting and serves on.
    pub accept_failed: u64,
    /// Connections dropped for not attaching within [`ATTACH_WITHIN`].
    pub idle_dropped: u64,
    /// Connections closed at once because their user already had
    /// [`UNATTACHED_PER_USER`] idle and unattached.
    pub crowd_refused: u64,
    /// Functions dropped while alive (see the module docs) and sent
    /// `SIGKILL`.
    pub killed: u64,
    /// Calls waiting in the ring of a function that died, answered
    /// `PeerDied` to their callers.
    pub dead_calls_answered: u64,
    /// Calls waiting in the ring of a function that died that could not
    /// be answered (the caller's ring full or closed, no live instance of
    /// the calling function here, a caller no function of the tenant):
    /// freed, and their callers wait for their timeouts.
    pub dead_calls_unanswered: u64,
}

/// A ring of a tenant, named by who consumes it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum RingOf {
    /// The inbound ring of the function attached in this slot.
    Function(u16),
    /// The tenant's uplink (the agent's).
    Uplink,
}

impl RingOf {
    /// The owner recorded for buffers handed over to this ring's consumer.
    fn handed(self) -> wire::Owner {
        match self {
            RingOf::Function(slot) => wire::Owner::Function(slot),
            RingOf::Uplink => wire::Owner::Function(AGENT_SLOT),
        }
    }
}

/// What a death may have left behind at one ring: positions claimed and
/// not published, and buffers handed over to the ring's consumer, when the
/// producer died. At `due`, positions still unpublished are filled with
/// voids, and buffers still handed over that no descriptor in the ring
/// names are freed.
#[derive(Debug)]
struct Holes {
    due: Instant,
    tenant: u16,
    ring: RingOf,
    /// The attach whose ring it is (see `Attached::attach_no`).
    attach_no: u64,
    positions: Vec<u64>,
    handed: Vec<u32>,
}

/// The slot of a function that died, out of use until `due`
/// ([`RECLAIM_GRACE`] after its death); then the calls that waited in its
/// ring are answered ([`Shimd::answer_dead_calls`]), and what it still
/// owns is freed.
#[derive(Debug)]
struct Cooling {
    due: Instant,
    tenant: u16,
    slot: u16,
    /// The calls (not replies, errors or voids) published in its ring and
    /// not consumed when it died, whose buffers were kept.
    calls: Vec<Descriptor>,
}

/// Whether a descriptor found in a dead function's ring is a call whose
/// caller waits for an answer: not a void or a descriptor no receiver
/// accepts, not a reply, not an error.
fn is_call(d: &Descriptor) -> bool {
    d.validate_fields().is_ok() && d.flags & (DescFlags::ERROR | DescFlags::REPLY) == 0
}

/// The daemon's state.
pub struct Shimd {
    cfg: Cluster,
    node: u16,
    /// This process's effective user id: besides root, the only one that
    /// may attach as the agent (see `attach_agent`).
    euid: u32,
    dir: PathBuf,
    listener: Listener,
    pools: HashMap<u16, Pool>,
    uplinks: HashMap<u16, Uplink>,
    clients: Vec<Client>,
    next_slot: u16,
    free_slots: Vec<u16>,
    /// Slots of dead functions kept out of use until [`RECLAIM_GRACE`] is
    /// over, with the calls that waited in their rings.
    cooling: Vec<Cooling>,
    /// Functions dropped while alive, until their processes exit.
    dropped: Vec<Dropped>,
    holes: Vec<Holes>,
    /// When the looks for voids and orphans noted at deaths are due (one
    /// per death, whether or not it left anything to look at).
    looks: std::collections::VecDeque<Instant>,
    /// Accepting stopped until then (see [`ACCEPT_PAUSE`]).
    accept_paused: Option<Instant>,
    stats: Stats,
    /// When the status file is next refreshed for the pools' free counts,
    /// and the counts it was last refreshed with.
    status_due: Instant,
    status_free: Vec<(u16, u32)>,
    /// DPU mode: the bridge's counts, and what the status file last showed.
    bridge: Option<(crate::bridge::SharedStats, crate::bridge::BridgeStats)>,
}

/// How often the status file follows the pools' free counts, which move
/// with traffic, not with control events.
const STATUS_EVERY: Duration = Duration::from_secs(1);

impl core::fmt::Debug for Shimd {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        f.debug_struct("Shimd").field("node", &self.node).field("dir", &self.dir).finish_non_exhaustive()
    }
}

/// Runs host-shimd for `node` of `cfg` until SIGINT or SIGTERM (blocked in
/// the calling thread and read through a signalfd, so no handler runs).
pub fn serve_until_signalled(cfg: Cluster, node: &str) -> anyhow::Result<()> {
    use nix::sys::signal::{SigSet, Signal};
    use nix::sys::signalfd::{SfdFlags, SignalFd};
    let mut mask = SigSet::empty();
    mask.add(Signal::SIGINT);
    mask.add(Signal::SIGTERM);
    mask.thread_block()?;
    let stop = SignalFd::with_flags(&mask, SfdFlags::SFD_CLOEXEC | SfdFlags::SFD_NONBLOCK)?;
    let dpu = cfg.node_id(node).filter(|&n| cfg.nodes[usize::from(n)].mode == config::Mode::Dpu);
    let cfg = std::sync::Arc::new(cfg);
    let mut shimd = Shimd::new((*cfg).clone(), node)?;
    // In DPU mode the bridge to the agent on the DPU is a thread of this
    // process, attached to this daemon like the agent in host mode.
    let bridge_stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let bridge = match dpu {
        Some(n) => {
            let shared = crate::bridge::SharedStats::default();
            shimd.set_bridge(shared.clone());
            let (cfg, stop, socket) = (cfg.clone(), bridge_stop.clone(), socket_path(&shimd.dir));
            Some(
                std::thread::Builder::new()
                    .name("bridge".into())
                    .spawn(move || crate::bridge::serve(cfg, n, &socket, &stop, shared))?,
            )
        }
        None => None,
    };
    let r = shimd.run(Some(stop.as_fd()));
    // Not joined: the bridge may be waiting on this daemon, which no longer
    // answers; it ends with the process.
    bridge_stop.store(true, std::sync::atomic::Ordering::Relaxed);
    drop(bridge);
    r?;
    log::info!("host-shimd stopping: {:?}", shimd.stats());
    Ok(())
}

impl Drop for Shimd {
    /// host-shimd stops: every ring it made is abandoned, and their
    /// consumers woken (see the module docs).
    fn drop(&mut self) {
        self.abandon_rings();
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

/// Whether a reply to `conn` goes out without waiting: its socket has room
/// (the client reads its replies), or it hung up (its request is read and
/// the hang-up found). A control connection is a connected `SEQPACKET`
/// socket: what the peer has not read yet counts against the sender's
/// buffer, and the socket polls writable while under a quarter of it is
/// used, so a reply of one frame then never waits.
fn room_to_reply(conn: &Conn) -> bool {
    use rustix::event::{PollFd, PollFlags, Timespec, poll};
    let mut fds = [PollFd::new(conn, PollFlags::OUT)];
    match poll(&mut fds, Some(&Timespec { tv_sec: 0, tv_nsec: 0 })) {
        Ok(_) => !fds[0].revents().is_empty(),
        // Cannot tell: reply (the send timeout still bounds it).
        Err(_) => true,
    }
}

/// Whether a failed receive or send on a control connection says its peer
/// hung up (or died), rather than that it is alive and misbehaves.
fn hung_up(e: &io::Error) -> bool {
    matches!(e.kind(), io::ErrorKind::BrokenPipe | io::ErrorKind::ConnectionReset | io::ErrorKind::ConnectionAborted)
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
        // First: a second host-shimd of the node stops here, before
        // making pools beside the live one's.
        let lock = crate::sock::SocketLock::take(&socket_path(&dir))?;
        // Every tenant has a pool on every node: messages of a tenant
        // arriving from other nodes land in it even when none of its
        // functions runs here (a reply passing through, an error).
        let mut pools = HashMap::new();
        let mut uplinks = HashMap::new();
        let need: u64 = (0..cfg.tenants.len() as u16)
            .filter_map(|t| cfg.pool_geometry(t))
            .map(|g| u64::from(g.buf_size()) * u64::from(g.buf_count()))
            .sum();
        if let Some(have) = shm::memory_available()
            && need > have
        {
            anyhow::bail!(
                "the tenant pools of node {node} need {} MiB; this machine has {} MiB available \
                 (MemAvailable and free huge pages): lower the tenants' buffers or buf_size",
                need >> 20,
                have >> 20
            );
        }
        for (t, tenant) in (0u16..).zip(&cfg.tenants) {
            let g = cfg.pool_geometry(t).expect("validated config");
            let pool = Pool::create(&format!("dne-{}", tenant.name), g, PagePolicy::Auto)?;
            let ring = Ring::create(
                &format!("dne-uplink-{}", tenant.name),
                UPLINK_CAPACITY,
                t,
                NO_FUNCTION,
                u32::from(AGENT_SLOT),
            )
            .map_err(io::Error::other)?;
            uplinks.insert(t, Uplink { ring, bell: Doorbell::new()?, attached: false });
            log::info!(
                "pool of tenant {}: {} buffers of {} B, {} MiB, {}",
                tenant.name,
                g.buf_count(),
                g.buf_size(),
                pool.region().len() >> 20,
                pool.backing()
            );
            pools.insert(t, pool);
        }
        let listener = Listener::bind_locked(&socket_path(&dir), lock)?;
        let s = Self {
            cfg,
            node: node_id,
            dir,
            listener,
            pools,
            uplinks,
            clients: Vec::new(),
            next_slot: 0,
            euid: rustix::process::geteuid().as_raw(),
            free_slots: Vec::new(),
            cooling: Vec::new(),
            dropped: Vec::new(),
            holes: Vec::new(),
            looks: std::collections::VecDeque::new(),
            accept_paused: None,
            stats: Stats::default(),
            status_due: Instant::now() + STATUS_EVERY,
            status_free: Vec::new(),
            bridge: None,
        };
        s.write_status();
        log::info!("host-shimd for node {node} listening on {}", socket_path(&s.dir).display());
        Ok(s)
    }

    /// Counters so far.
    pub fn stats(&self) -> &Stats {
        &self.stats
    }

    /// Marks every ring this host-shimd made abandoned and rings its
    /// consumer's doorbell: the inbound rings of the attached functions
    /// and every tenant's uplink. (The rings of functions that died were
    /// closed then, and are gone.) For the stop: once done, nothing pushed
    /// into them would be delivered.
    fn abandon_rings(&self) {
        let functions = self.clients.iter().filter_map(|c| c.attached.as_ref()).filter(|a| !a.agent);
        let rings = functions.map(|a| (&a.ring, &a.bell)).chain(self.uplinks.values().map(|u| (&u.ring, &u.bell)));
        let mut n = 0;
        for (ring, bell) in rings {
            ring.abandon();
            // A consumer asleep wakes and finds the ring closed; one awake
            // finds it while it spins (the doorbell stays rung, harmless).
            if let Err(e) = bell.ring() {
                log::warn!("waking a consumer of an abandoned ring: {e}");
            }
            n += 1;
        }
        log::info!("host-shimd stopping: {n} rings marked abandoned, their senders and receivers told");
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
        let (ready, exited, stop_ready) = {
            let mut fds = Vec::with_capacity(self.clients.len() + 2);
            let accepting = self.accept_paused.is_none_or(|until| Instant::now() >= until);
            fds.push(PollFd::new(&self.listener, if accepting { PollFlags::IN } else { PollFlags::empty() }));
            for c in &self.clients {
                // A held client is heard again once it has read (room to
                // reply); hang-ups and errors are reported either way.
                let want = if c.held { PollFlags::OUT } else { PollFlags::IN };
                fds.push(PollFd::from_borrowed_fd(c.conn.as_fd(), want));
            }
            for d in &self.dropped {
                // Its exit: the pidfd readable, or (without one) a hang-up
                // of the connection, reported whatever is asked.
                fds.push(match &d.watch {
                    Watch::Pidfd(pidfd) => PollFd::new(pidfd, PollFlags::IN),
                    Watch::Hangup(conn) => PollFd::from_borrowed_fd(conn.as_fd(), PollFlags::empty()),
                });
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
            let ready: Vec<PollFlags> = fds[1..1 + self.clients.len()].iter().map(|f| f.revents()).collect();
            let at = 1 + self.clients.len();
            let exited: Vec<bool> = fds[at..at + self.dropped.len()].iter().map(|f| !f.revents().is_empty()).collect();
            (ready, exited, stop_ready)
        };
        if stop_ready {
            return Ok(true);
        }
        // Clients in reverse so removing one keeps the others' indices.
        for i in (0..ready.len()).rev() {
            let r = ready[i];
            if self.clients[i].held && !r.intersects(PollFlags::HUP | PollFlags::ERR) {
                // Room again (or not yet: nothing happened).
                self.clients[i].held = !r.contains(PollFlags::OUT);
            } else if !r.is_empty() {
                self.serve(i);
            }
        }
        for k in (0..exited.len()).rev() {
            if exited[k] {
                let d = self.dropped.swap_remove(k);
                self.died(d.pid, d.attached, "exited after its drop");
                self.write_status();
            }
        }
        self.accept_clients();
        self.drop_idle();
        self.cool_down();
        self.refresh_status();
        Ok(false)
    }

    /// Accepts the connections waiting, unless paused. A failure (out of
    /// file descriptors, say) is counted and pauses accepting for
    /// [`ACCEPT_PAUSE`]; it never stops host-shimd.
    fn accept_clients(&mut self) {
        let now = Instant::now();
        if self.accept_paused.is_some_and(|until| now < until) {
            return;
        }
        self.accept_paused = None;
        loop {
            match self.listener.accept() {
                Ok(Some(conn)) => match conn.peer_cred() {
                    Ok(cred) if self.idle_of(cred.uid, now) >= UNATTACHED_PER_USER => {
                        self.stats.crowd_refused += 1;
                        if self.stats.crowd_refused.is_power_of_two() {
                            log::warn!(
                                "uid {}: {UNATTACHED_PER_USER} connections idle, unattached; closing its new ones ({} so far)",
                                cred.uid,
                                self.stats.crowd_refused
                            );
                        }
                    }
                    Ok(cred) => self.clients.push(Client {
                        conn,
                        pid: cred.pid,
                        uid: cred.uid,
                        role: None,
                        attached: None,
                        held: false,
                        since: now,
                    }),
                    Err(e) => log::warn!("dropping a connection without peer credentials: {e}"),
                },
                Ok(None) => break,
                Err(e) => {
                    self.stats.accept_failed += 1;
                    if self.stats.accept_failed.is_power_of_two() {
                        log::warn!(
                            "cannot accept a connection ({e}); pausing {ACCEPT_PAUSE:?} ({} so far, {} clients)",
                            self.stats.accept_failed,
                            self.clients.len()
                        );
                    }
                    self.accept_paused = Some(now + ACCEPT_PAUSE);
                    self.write_status();
                    break;
                }
            }
        }
    }

    /// Connections of user `uid` not attached [`UNATTACHED_GRACE`] after
    /// connecting.
    fn idle_of(&self, uid: u32, now: Instant) -> usize {
        let idle = |c: &&Client| c.attached.is_none() && now.saturating_duration_since(c.since) >= UNATTACHED_GRACE;
        self.clients.iter().filter(|c| c.uid == uid).filter(idle).count()
    }

    /// Drops connections that did not attach within [`ATTACH_WITHIN`].
    fn drop_idle(&mut self) {
        let now = Instant::now();
        for i in (0..self.clients.len()).rev() {
            let c = &self.clients[i];
            if c.attached.is_none() && now.duration_since(c.since) >= ATTACH_WITHIN {
                self.stats.idle_dropped += 1;
                self.gone(i, "did not attach in time");
            }
        }
    }

    /// Shows the counts of this node's bridge to the DPU agent in the
    /// status file.
    pub fn set_bridge(&mut self, shared: crate::bridge::SharedStats) {
        self.bridge = Some((shared, crate::bridge::BridgeStats::default()));
        self.write_status();
    }

    /// Rewrites the status file when a pool's free count or the bridge's
    /// counts moved since the last refresh (at most every
    /// [`STATUS_EVERY`]).
    fn refresh_status(&mut self) {
        let now = Instant::now();
        if now < self.status_due {
            return;
        }
        self.status_due = now + STATUS_EVERY;
        let mut free: Vec<(u16, u32)> = self.pools.iter().map(|(t, p)| (*t, p.free_buffers())).collect();
        free.sort_unstable();
        // Free buffers nobody can find (their hints cleared by a process of
        // the tenant, or one stopped between freeing a buffer and hinting
        // it): hinted again. A repair changes no free count, so it is a
        // change of its own for the status file.
        let rehinted = self.stats.rehinted;
        for &(t, n) in &free {
            if self.pools.get(&t).is_some_and(|p| p.free_hint() < n) {
                self.rehint(t, "found by the status scan");
            }
        }
        let mut changed = free != self.status_free || self.stats.rehinted != rehinted;
        if let Some((shared, shown)) = self.bridge.as_mut()
            && let Ok(now) = shared.lock()
            && *now != *shown
        {
            *shown = *now;
            changed = true;
        }
        if changed {
            self.status_free = free;
            self.write_status();
        }
    }

    fn serve(&mut self, i: usize) {
        if !self.clients[i].held && !room_to_reply(&self.clients[i].conn) {
            // It sends requests and does not read the replies: take no
            // more of its requests until it does.
            self.clients[i].held = true;
            self.stats.held += 1;
            log::debug!("pid {}: replies unread; its requests wait", self.clients[i].pid);
            return self.write_status();
        }
        self.clients[i].held = false;
        let mut buf = [0u8; CTRL_MAX_FRAME];
        let r = match self.clients[i].conn.recv(&mut buf) {
            Ok(r) if r.len > 0 => r,
            Ok(_) => return self.gone(i, "closed its connection"),
            Err(e) if matches!(e.kind(), io::ErrorKind::WouldBlock | io::ErrorKind::Interrupted) => return,
            Err(e) if hung_up(&e) => return self.gone(i, &format!("connection error: {e}")),
            // A message that did not fit: it is alive and misbehaves.
            Err(e) => return self.drop_live(i, &format!("connection error: {e}")),
        };
        // Functions never send descriptors to host-shimd: drop any (the
        // `OwnedFd`s close here).
        drop(r.fds);
        let frame = match CtrlFrame::decode(&buf[..r.len]) {
            Ok((f, _)) => f,
            Err(e) => {
                self.stats.bad_frames += 1;
                log::warn!("pid {}: bad control frame ({e}); disconnecting", self.clients[i].pid);
                return self.drop_live(i, "sent a bad frame");
            }
        };
        let reply = match frame.msg {
            CtrlMsg::Hello(h) => {
                let role = Role::from_u8(h.role).filter(|r| matches!(r, Role::Function | Role::Agent));
                if h.layout_hash != wire::LAYOUT_HASH || role.is_none() || self.clients[i].role.is_some() {
                    let _ = self.clients[i].conn.send(
                        &CtrlFrame {
                            seq: frame.seq,
                            msg: error(ErrorCode::VersionMismatch, CtrlKind::Hello, frame.seq, u16::MAX, u16::MAX),
                        },
                        &[],
                    );
                    return self.drop_live(i, "speaks other layouts");
                }
                self.clients[i].role = role;
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
            if hung_up(&e) {
                self.gone(i, "reply failed");
            } else {
                // Its replies left unread past the send timeout.
                self.drop_live(i, "reply failed");
            }
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
        if self.clients[i].role.is_none() || self.clients[i].attached.is_some() {
            return self.refuse(i, seq, ErrorCode::BadRoute, "attach", u16::MAX, u16::MAX);
        }
        if self.clients[i].role == Some(Role::Agent) {
            return self.attach_agent(i, seq, tenant_name, fn_name);
        }
        let Some(fid) = self.cfg.function_id(fn_name) else {
            return self.refuse(i, seq, ErrorCode::UnknownFunction, "attach", u16::MAX, u16::MAX);
        };
        let f = &self.cfg.functions[usize::from(fid)];
        if !self.cfg.runs_on(f, self.node) {
            return self.refuse(i, seq, ErrorCode::UnknownFunction, "attach", u16::MAX, fid);
        }
        let tid = self.cfg.tenant_id(&f.tenant).expect("validated config");
        let uid_ok = self.cfg.tenants[usize::from(tid)].uid.is_none_or(|u| u == self.clients[i].uid);
        if f.tenant != tenant_name || !uid_ok {
            return self.refuse(i, seq, ErrorCode::TenantMismatch, "attach", tid, fid);
        }
        // (A dropped instance whose process runs on is taken still.)
        let taken: Vec<u16> = self
            .clients
            .iter()
            .filter_map(|c| c.attached.as_ref())
            .chain(self.dropped.iter().map(|d| &d.attached))
            .filter(|a| a.function == fid)
            .map(|a| a.instance)
            .collect();
        let Some(instance) = (0..f.instances).find(|n| !taken.contains(n)) else {
            return self.refuse(i, seq, ErrorCode::Overloaded, "attach", tid, fid);
        };
        let slot = match self.free_slots.pop() {
            Some(s) => s,
            None if self.next_slot < AGENT_SLOT => {
                self.next_slot += 1;
                self.next_slot - 1
            }
            None => return self.refuse(i, seq, ErrorCode::Overloaded, "attach", tid, fid),
        };
        let made = Ring::create(&format!("dne-ring-{fn_name}-{instance}"), f.ring_capacity, tid, fid, u32::from(slot))
            .map_err(io::Error::other)
            .and_then(|ring| Ok((ring, Doorbell::new()?)));
        let (ring, bell) = match made {
            Ok(x) => x,
            Err(e) => {
                // Nothing was handed out under the slot: it is free again.
                self.free_slots.push(slot);
                return Err(e);
            }
        };
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
        let sent = self.clients[i]
            .conn
            .send(&CtrlFrame { seq, msg: CtrlMsg::AttachOk(ok) }, &[pool.region().fd(), ring.fd(), bell.fd()]);
        if let Err(e) = sent {
            // The function never got its ring (it is gone, or its socket
            // failed): the slot goes back with the ring.
            self.free_slots.push(slot);
            return Err(e);
        }
        log::info!("pid {} attached as {fn_name}#{instance} (tenant {tenant_name}, slot {slot})", self.clients[i].pid);
        let pidfd = match self.clients[i].conn.peer_pidfd() {
            Ok(fd) => Some(fd),
            Err(e) => {
                log::warn!(
                    "pid {} ({fn_name}#{instance}): no pidfd ({e}); if dropped alive, its slot waits for its connection to close",
                    self.clients[i].pid
                );
                None
            }
        };
        self.clients[i].attached = Some(Attached {
            agent: false,
            tenant: tid,
            function: fid,
            instance,
            slot,
            ring,
            bell,
            attach_no: self.stats.attached,
            pidfd,
        });
        self.stats.attached += 1;
        Ok(())
    }

    /// The agent attaches to a tenant's pool and uplink ring (one agent per
    /// tenant at a time).
    fn attach_agent(&mut self, i: usize, seq: u32, tenant_name: &str, fn_name: &str) -> io::Result<()> {
        let Some(tid) = self.cfg.tenant_id(tenant_name) else {
            return self.refuse(i, seq, ErrorCode::TenantMismatch, "attach", u16::MAX, u16::MAX);
        };
        if fn_name != AGENT_NAME {
            return self.refuse(i, seq, ErrorCode::BadRoute, "attach", tid, u16::MAX);
        }
        // The agent gets the tenant's whole pool, its uplink and every
        // function ring a lookup names, whatever the tenant's `uid`: only
        // root (the agent's user) or host-shimd's own user (its DPU bridge,
        // or a machine running everything as one user) may be it.
        let uid = self.clients[i].uid;
        if uid != 0 && uid != self.euid {
            log::warn!("pid {} (uid {uid}) asked to attach as the agent of tenant {tenant_name}", self.clients[i].pid);
            return self.refuse(i, seq, ErrorCode::TenantMismatch, "attach", tid, u16::MAX);
        }
        let up = &self.uplinks[&tid];
        if up.attached {
            return self.refuse(i, seq, ErrorCode::Overloaded, "attach", tid, u16::MAX);
        }
        let ring = Ring::open(up.ring.fd().try_clone_to_owned()?).map_err(io::Error::other)?;
        let bell = Doorbell::from_fd(up.bell.fd().try_clone_to_owned()?);
        let pool = &self.pools[&tid];
        let g = pool.geometry();
        let ok = AttachOk {
            tenant: tid,
            function: NO_FUNCTION,
            instance: 0,
            slot: AGENT_SLOT,
            buf_size: g.buf_size(),
            buf_count: g.buf_count(),
            headroom: g.headroom(),
            max_chain: g.max_chain(),
            ring_capacity: UPLINK_CAPACITY,
            reserved: 0,
            pool_len: pool.region().len() as u64,
            ring_len: wire::segment::RingLayout::new(UPLINK_CAPACITY).map(|l| l.total_len).unwrap_or(0),
        };
        self.clients[i]
            .conn
            .send(&CtrlFrame { seq, msg: CtrlMsg::AttachOk(ok) }, &[pool.region().fd(), up.ring.fd(), up.bell.fd()])?;
        log::info!("agent (pid {}) attached to tenant {tenant_name}", self.clients[i].pid);
        if let Some(up) = self.uplinks.get_mut(&tid) {
            up.attached = true;
        }
        self.clients[i].attached = Some(Attached {
            agent: true,
            tenant: tid,
            function: NO_FUNCTION,
            instance: 0,
            slot: AGENT_SLOT,
            ring,
            bell,
            attach_no: self.stats.attached,
            pidfd: None,
        });
        self.stats.attached += 1;
        Ok(())
    }

    /// Answers a lookup with the tenant's uplink ring (the agent forwards).
    /// Answers a lookup with the agent's uplink (`flags`: [`Peer::STANDIN`]
    /// when it stands in for a local function without a live instance).
    fn peer_uplink(&self, i: usize, seq: u32, tenant: u16, function: u16, node: u16, flags: u16) -> io::Result<()> {
        let up = &self.uplinks[&tenant];
        let peer =
            Peer { function, instance: 0, slot: AGENT_SLOT, node, ring_capacity: UPLINK_CAPACITY, flags, reserved: 0 };
        self.clients[i].conn.send(&CtrlFrame { seq, msg: CtrlMsg::Peer(peer) }, &[up.ring.fd(), up.bell.fd()])?;
        let ack = Ack { about_kind: CtrlKind::Lookup as u16, reserved: 0, about_seq: seq };
        self.clients[i].conn.send(&CtrlFrame { seq, msg: CtrlMsg::Ack(ack) }, &[])
    }

    fn lookup(&mut self, i: usize, seq: u32, l: &wire::ctrl::Lookup) -> io::Result<()> {
        let Some((me, agent)) = self.clients[i].attached.as_ref().map(|a| (a.tenant, a.agent)) else {
            return self.refuse(i, seq, ErrorCode::BadRoute, "lookup", u16::MAX, u16::MAX);
        };
        if !agent && l.function.as_str() == Ok(AGENT_NAME) {
            return self.peer_uplink(i, seq, me, NO_FUNCTION, self.node, 0);
        }
        let Some(fid) = l.function.as_str().ok().and_then(|n| self.cfg.function_id(n)) else {
            return self.refuse(i, seq, ErrorCode::UnknownFunction, "lookup", me, u16::MAX);
        };
        let f = &self.cfg.functions[usize::from(fid)];
        if self.cfg.tenant_id(&f.tenant) != Some(me) {
            return self.refuse(i, seq, ErrorCode::TenantMismatch, "lookup", me, fid);
        }
        if !self.cfg.runs_on(f, self.node) {
            // Remote functions are reached through the agent (DESIGN.md
            // section 3), which picks one of their nodes; the agent itself
            // only delivers locally.
            if agent {
                return self.refuse(i, seq, ErrorCode::Unreachable, "lookup", me, fid);
            }
            let node = self.cfg.function_nodes(f).first().copied().unwrap_or(wire::desc::NO_NODE);
            return self.peer_uplink(i, seq, me, fid, node, 0);
        }
        let live = |c: &Client| c.attached.as_ref().is_some_and(|a| a.function == fid);
        let elsewhere = self.cfg.function_nodes(f).into_iter().find(|&n| n != self.node);
        if !agent
            && let Some(node) = elsewhere
            && !self.clients.iter().any(live)
        {
            // No live instance here, but the function has other nodes: the
            // agent stands in (DESIGN.md section 3), until one attaches.
            return self.peer_uplink(i, seq, me, fid, node, Peer::STANDIN);
        }
        for c in &self.clients {
            if let Some(a) = c.attached.as_ref().filter(|a| a.function == fid) {
                let peer = Peer {
                    function: fid,
                    instance: a.instance,
                    slot: a.slot,
                    node: self.node,
                    ring_capacity: a.ring.header().capacity,
                    flags: 0,
                    reserved: 0,
                };
                self.clients[i].conn.send(&CtrlFrame { seq, msg: CtrlMsg::Peer(peer) }, &[a.ring.fd(), a.bell.fd()])?;
            }
        }
        let ack = Ack { about_kind: CtrlKind::Lookup as u16, reserved: 0, about_seq: seq };
        self.clients[i].conn.send(&CtrlFrame { seq, msg: CtrlMsg::Ack(ack) }, &[])
    }

    /// Client `i` dropped by host-shimd while its process may be alive. An
    /// attached function's ring is closed at once and its process killed
    /// (`SIGKILL` through its pidfd); its slot, instance and buffers are
    /// reclaimed only once the process has exited ([`Shimd::died`], from
    /// [`Shimd::poll_once`]). Anyone else is gone at once ([`Shimd::gone`]).
    fn drop_live(&mut self, i: usize, why: &str) {
        if self.clients[i].attached.as_ref().is_none_or(|a| a.agent) {
            return self.gone(i, why);
        }
        let c = self.clients.swap_remove(i);
        let Some(mut a) = c.attached else { return };
        a.ring.close();
        let name = &self.cfg.functions[usize::from(a.function)].name;
        // Never itself (a function attached from host-shimd's own
        // process, as in tests): that one waits for its connection.
        let own = u32::try_from(c.pid).is_ok_and(|p| p == std::process::id());
        let (watch, how) = match a.pidfd.take() {
            Some(pidfd) if !own => match rustix::process::pidfd_send_signal(&pidfd, rustix::process::Signal::KILL) {
                Ok(()) => {
                    self.stats.killed += 1;
                    (Watch::Pidfd(pidfd), "killed it".to_owned())
                }
                Err(e) => (Watch::Pidfd(pidfd), format!("cannot kill it ({e})")),
            },
            _ => (
                Watch::Hangup(c.conn),
                "cannot kill it (no pidfd): its connection closing stands for its exit".to_owned(),
            ),
        };
        log::warn!(
            "pid {} ({name}#{}, slot {}) {why}: dropped, its ring closed; {how}; its slot and buffers wait for it to exit",
            c.pid,
            a.instance,
            a.slot
        );
        self.dropped.push(Dropped { pid: c.pid, attached: a, watch, since: Instant::now(), overdue: false });
        self.write_status();
    }

    fn gone(&mut self, i: usize, why: &str) {
        let c = self.clients.swap_remove(i);
        if let Some(a) = c.attached.as_ref().filter(|a| a.agent) {
            // What the agent had taken from the uplink but not yet consumed
            // (its buffers are held by it) leaves the ring first, then its
            // buffers come back; what it had not taken stays for the next
            // agent. Nobody else takes from the uplink, and its buffers
            // cannot change hands before the reclaim.
            let skipped = match (self.pools.get(&a.tenant), self.uplinks.get(&a.tenant)) {
                (Some(p), Some(up)) => up.ring.skip_taken(crate::function::BATCH, |d| {
                    p.owner(d.buf).is_ok_and(|o| o == wire::Owner::Held(AGENT_SLOT))
                }),
                _ => 0,
            };
            if skipped > 0 {
                log::info!("agent left {skipped} descriptors it had taken in the uplink; consumed them");
            }
            // Only now: a chain the agent was killed taking (its accept
            // had moved the first buffers, not yet the rest) is named by
            // no descriptor any more, and the rest of it, still handed to
            // the agent, is this death's orphan. Noted before the skip,
            // it counted as delivered and stayed handed for good.
            self.note_holes(a.tenant);
            let n = self.pools.get(&a.tenant).map_or(0, |p| p.reclaim_held(AGENT_SLOT));
            self.rehint(a.tenant, "after a death");
            if let Some(up) = self.uplinks.get_mut(&a.tenant) {
                up.attached = false;
            }
            self.stats.reclaimed += u64::from(n);
            log::info!(
                "agent (pid {}) left tenant {} ({why}): reclaimed {n} buffers it held; {} descriptors wait in its uplink",
                c.pid,
                self.cfg.tenants[usize::from(a.tenant)].name,
                self.uplinks[&a.tenant].ring.pending()
            );
            return self.write_status();
        }
        if let Some(a) = c.attached {
            self.died(c.pid, a, why);
        }
        self.write_status();
    }

    /// The process of function `a` (pid `pid`) is gone: what it may have
    /// left half done in the tenant's rings is noted, its ring closed, its
    /// buffers reclaimed, and its slot cools down before it is used again.
    ///
    /// The calls waiting in its ring keep their buffers until the grace is
    /// over, when they are answered ([`Shimd::answer_dead_calls`]): a
    /// sender whose push published just as the ring closed sees the close
    /// and takes its message back meanwhile, and deals with it itself (it
    /// tries another instance, or tells its caller), so no call is
    /// answered twice. What a push publishes after the snapshot below is
    /// freed now, as before: its sender's take-back fails, and it answers
    /// its caller (the agent's engine does; the function library reports
    /// `NoInstance` without the message).
    fn died(&mut self, pid: i32, a: Attached, why: &str) {
        self.note_holes(a.tenant);
        a.ring.close();
        let calls: Vec<Descriptor> = a.ring.waiting().into_iter().filter(is_call).collect();
        let n = self.pools.get(&a.tenant).map_or(0, |p| {
            if calls.is_empty() {
                return p.reclaim(a.slot);
            }
            let keep: std::collections::HashSet<u32> = calls.iter().flat_map(|d| p.chain_of(d)).collect();
            let mut n = 0;
            for owner in [Owner::Function(a.slot), Owner::Held(a.slot)] {
                // (A compare-and-swap each: a sender taking back a buffer
                // at the same moment gets it, or it is freed here.)
                n += p.owned_by(owner).into_iter().filter(|i| !keep.contains(i) && p.free_orphan(*i, owner)).count();
            }
            n as u32
        });
        self.rehint(a.tenant, "after a death");
        self.stats.deaths += 1;
        self.stats.reclaimed += u64::from(n);
        log::info!(
            "pid {pid} ({}#{}, slot {}) {why}: reclaimed {n} buffers; {} calls waited in its ring",
            self.cfg.functions[usize::from(a.function)].name,
            a.instance,
            a.slot,
            calls.len()
        );
        self.cooling.push(Cooling { due: Instant::now() + RECLAIM_GRACE, tenant: a.tenant, slot: a.slot, calls });
    }

    /// Answers the calls that waited in the ring of the dead function of
    /// `slot` with `PeerDied`, as the agent's engine answers a call whose
    /// instance died as it delivered it (`answer_lost`, `bounce_from`):
    ///
    /// * the call of an ingress (`origin` another node) goes, marked
    ///   `REPLY`, to the agent's uplink, which sends it to that node;
    /// * the call of a function that does not run on this node, or one
    ///   marked `ELSEWHERE`, came through the agent from another node (the
    ///   agent, or in DPU mode the bridge, marks every call of a function
    ///   on another node it pushes into a ring; a function's own push
    ///   clears the mark): the error, for the calling function, goes to
    ///   the uplink in the call's own first buffer, by which the agent
    ///   knows the node the call came from (the engine's `error_back`);
    /// * any other call of a function that runs here was pushed by an
    ///   instance of it on this node, and goes to a live instance of it
    ///   (as the engine delivers an error for a caller here, to any of its
    ///   instances); with none alive its caller is gone, and it is not
    ///   answered.
    ///
    /// Each error is the call itself, whole, so its caller gets its
    /// payload back (as the agent returns a call it cannot deliver) and
    /// answering allocates nothing. A call whose buffers are
    /// no longer the dead function's (its sender took it back) is left to
    /// its sender. One that cannot be answered (the ring full or closed,
    /// no caller to answer) is counted as unanswered and freed.
    ///
    /// The calls are not delivered again to another live instance of the
    /// function, though they are whole: the agent's engine does not either
    /// once a call reached an instance (only a delivery that failed goes
    /// on, to another node), and `PeerDied` already means "maybe
    /// delivered", so the caller, which knows whether its call may be
    /// repeated, decides. A call that killed its instance would kill the
    /// next one too, and host-shimd would become a forwarder of payloads.
    fn answer_dead_calls(&mut self, tenant: u16, slot: u16, calls: Vec<Descriptor>) {
        let Some(pool) = self.pools.get(&tenant) else { return };
        let held = Owner::Held(slot);
        let (mut answered, mut unanswered) = (0u64, 0u64);
        let fabric_nodes = self.cfg.fabric_nodes();
        for d in calls {
            // All of its chain, or none: a sender taking it back at the
            // same moment gets it whole, or does not get it.
            let lease = match pool
                .take_back(d.buf, d.len, Owner::Function(slot), held)
                .or_else(|_| pool.take_back(d.buf, d.len, held, held))
            {
                Ok(lease) => lease,
                // Its sender took it back: the sender answers for it.
                Err(shm::AcceptError::NotOwner { .. }) => continue,
                // A descriptor a peer wrote wrong (its length, a link):
                // no call to answer; its buffers go with the slot's.
                Err(_) => {
                    unanswered += 1;
                    continue;
                }
            };
            // The call itself, whole, becomes the error (as the agent
            // returns a call it cannot deliver): its caller gets its
            // payload back, and nothing is allocated.
            let mut e = Descriptor { flags: d.flags | DescFlags::ERROR, status: ErrorCode::PeerDied as u8, ..d };
            let to = if d.origin != NO_NODE && d.origin != self.node {
                e.flags |= DescFlags::REPLY;
                // An origin no node has: the agent would drop the reply.
                (d.origin < fabric_nodes)
                    .then(|| self.uplinks.get(&tenant).map(|u| (&u.ring, &u.bell, AGENT_SLOT)))
                    .flatten()
            } else {
                e.dst_fn = d.src_fn;
                match self.cfg.functions.get(usize::from(d.src_fn)) {
                    Some(f) if self.cfg.tenant_id(&f.tenant) != Some(tenant) => None,
                    // (A call marked ELSEWHERE came through the agent from
                    // another node, whatever nodes its caller runs on: the
                    // agent marks each call of another node's function.)
                    Some(f) if self.cfg.runs_on(f, self.node) && d.flags & DescFlags::ELSEWHERE == 0 => self
                        .clients
                        .iter()
                        .filter_map(|c| c.attached.as_ref())
                        .find(|a| !a.agent && a.function == d.src_fn)
                        .map(|a| (&a.ring, &a.bell, a.slot)),
                    Some(_) => self.uplinks.get(&tenant).map(|u| (&u.ring, &u.bell, AGENT_SLOT)),
                    None => None,
                }
            };
            let mut error = Some(lease);
            let delivered = to.is_some_and(|(ring, bell, to)| {
                let to = Owner::Function(to);
                let Some(l) = error.take() else { return false };
                if let Err((l, _)) = pool.hand_over(l, to) {
                    error = Some(l);
                    return false;
                }
                match ring.push(&[e]) {
                    Ok(p) => {
                        if p.wake
                            && let Err(e) = bell.ring()
                        {
                            log::warn!("waking the caller of a dead function: {e}");
                        }
                        true
                    }
                    Err(_) => {
                        // Back to the dead slot, freed below.
                        error = pool.take_back(e.buf, e.len, to, held).ok();
                        false
                    }
                }
            });
            if delivered {
                answered += 1;
            } else {
                unanswered += 1;
                if let Some(l) = error
                    && let Err(err) = pool.free(l)
                {
                    log::warn!("freeing an unanswered call of a dead function: {err}");
                }
            }
        }
        if answered + unanswered > 0 {
            log::info!(
                "tenant {}: {answered} call(s) waiting for the function of slot {slot} when it died answered peer_died, {unanswered} could not be",
                self.cfg.tenants[usize::from(tenant)].name
            );
        }
        self.stats.dead_calls_answered += answered;
        self.stats.dead_calls_unanswered += unanswered;
    }

    /// Hints the free buffers of `tenant` whose hint is clear (see
    /// [`shm::Pool::repair`]): after a death, those its process freed but
    /// did not live to hint.
    fn rehint(&mut self, tenant: u16, why: &str) {
        let n = self.pools.get(&tenant).map_or(0, |p| p.repair());
        if n > 0 {
            log::info!(
                "tenant {}: {n} free buffer(s) without their free hint ({why}), hinted again",
                self.cfg.tenants[usize::from(tenant)].name
            );
            self.stats.rehinted += u64::from(n);
        }
    }

    /// A producer of tenant `tenant` died: notes, in each of the tenant's
    /// rings, the positions claimed and not yet published. One it died
    /// holding stays so; a live producer's is published long before
    /// [`HOLE_GRACE`] is over ([`Shimd::fill_holes`]).
    fn note_holes(&mut self, tenant: u16) {
        let due = Instant::now() + HOLE_GRACE;
        self.looks.push_back(due);
        let Some(pool) = self.pools.get(&tenant) else { return };
        let mut holes = Vec::new();
        for (ring_of, attach_no, ring, _) in self.rings_of(tenant) {
            // Handed over and named by no descriptor in the ring: what the
            // death may have orphaned. A buffer a descriptor names now is
            // delivered, whatever becomes of it before the look (its
            // receiver may take and free it, and a live sender hand it to
            // the same receiver again, between its hand-over and its
            // push when the look comes: not an orphan of this death).
            let named: std::collections::HashSet<u32> = ring.waiting().iter().flat_map(|d| pool.chain_of(d)).collect();
            let positions = ring.unpublished();
            let mut handed = pool.owned_by(ring_of.handed());
            handed.retain(|i| !named.contains(i));
            if !positions.is_empty() || !handed.is_empty() {
                holes.push(Holes { due, tenant, ring: ring_of, attach_no, positions, handed });
            }
        }
        self.holes.append(&mut holes);
    }

    /// The rings of tenant `tenant` this host-shimd made, with their
    /// consumers' doorbells: every attached function's, and the uplink.
    fn rings_of(&self, tenant: u16) -> impl Iterator<Item = (RingOf, u64, &Ring, &Doorbell)> {
        let functions = self
            .clients
            .iter()
            .filter_map(|c| c.attached.as_ref())
            .filter(move |a| !a.agent && a.tenant == tenant)
            .map(|a| (RingOf::Function(a.slot), a.attach_no, &a.ring, &a.bell));
        // (The uplink stays the same ring for every agent.)
        let uplink = self.uplinks.get(&tenant).map(|u| (RingOf::Uplink, 0, &u.ring, &u.bell));
        functions.chain(uplink)
    }

    /// Publishes voids at the holes noted at a death that are still there
    /// after the grace, and wakes their consumers.
    fn fill_holes(&mut self) {
        let now = Instant::now();
        let (due, later): (Vec<Holes>, Vec<Holes>) =
            std::mem::take(&mut self.holes).into_iter().partition(|h| h.due <= now);
        self.holes = later;
        let (mut orphans, mut voids) = (0, 0);
        let mut checked = 0;
        while self.looks.front().is_some_and(|&t| t <= now) {
            self.looks.pop_front();
            checked += 1;
        }
        for h in due {
            // A consumer gone meanwhile took its ring with it (and
            // host-shimd reclaimed what was handed to it).
            // (The same ring: a slot freed and attached again meanwhile is
            // another function's, whose handed buffers are its own.)
            let Some((.., ring, bell)) = self.rings_of(h.tenant).find(|(r, g, ..)| *r == h.ring && *g == h.attach_no)
            else {
                continue;
            };
            if let Some(pool) = self.pools.get(&h.tenant) {
                // Handed over then and still: delivered (named by a
                // descriptor waiting in the ring), or orphaned by the death.
                let named: std::collections::HashSet<u32> =
                    ring.waiting().iter().flat_map(|d| pool.chain_of(d)).collect();
                let owner = h.ring.handed();
                let freed = h.handed.iter().filter(|i| !named.contains(i) && pool.free_orphan(**i, owner)).count();
                if freed > 0 {
                    log::warn!(
                        "tenant {}: freed {freed} buffer(s) handed to {:?} by a process that died before sending them",
                        self.cfg.tenants[usize::from(h.tenant)].name,
                        h.ring
                    );
                    orphans += freed as u64;
                }
            }
            let filled = h.positions.iter().filter(|&&pos| ring.fill_void(pos)).count() as u64;
            if filled > 0 {
                log::warn!(
                    "tenant {}: a producer died while pushing into {:?}'s ring; {filled} claimed slot(s) published as void",
                    self.cfg.tenants[usize::from(h.tenant)].name,
                    h.ring
                );
                if let Err(e) = bell.ring() {
                    log::warn!("waking the consumer after filling voids: {e}");
                }
                voids += filled;
            }
        }
        self.stats.orphans += orphans;
        self.stats.voids += voids;
        self.stats.hole_checks += checked;
        if checked > 0 {
            self.write_status();
        }
    }

    fn cool_down(&mut self) {
        self.fill_holes();
        let now = Instant::now();
        let mut changed = false;
        for d in self.dropped.iter_mut().filter(|d| !d.overdue && now.duration_since(d.since) >= KILL_WAIT) {
            d.overdue = true;
            changed = true;
            log::error!(
                "pid {} ({}#{}, slot {}) still runs {KILL_WAIT:?} after it was dropped; its slot, instance and buffers stay out of use until it exits",
                d.pid,
                self.cfg.functions[usize::from(d.attached.function)].name,
                d.attached.instance,
                d.attached.slot
            );
        }
        let mut k = 0;
        while k < self.cooling.len() {
            let Cooling { due, tenant, slot, .. } = self.cooling[k];
            if due <= now {
                let calls = std::mem::take(&mut self.cooling[k].calls);
                self.answer_dead_calls(tenant, slot, calls);
                let n = self.pools.get(&tenant).map_or(0, |p| p.reclaim(slot));
                if n > 0 {
                    log::info!("late reclaim of {n} buffers of slot {slot}");
                }
                self.rehint(tenant, "after a death");
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
        let live = self.clients.iter().filter(|c| c.attached.as_ref().is_some_and(|a| !a.agent)).count();
        let bridge = match &self.bridge {
            Some((shared, _)) => {
                let b = shared.lock().map(|b| *b).unwrap_or_default();
                let dropped: Vec<String> = b.dropped.each().iter().map(|(k, v)| format!("\"{k}\":{v}")).collect();
                let free_failed: Vec<String> =
                    b.free_failed.each().iter().map(|(k, v)| format!("\"{k}\":{v}")).collect();
                format!(
                    ",\"bridge\":{{\"up\":{},\"connects\":{},\"to_agent\":{},\"delivered\":{},\"lent\":{},\"returned\":{},\"handed_back\":{},\"refused\":{},\"reclaimed\":{},\"holding\":{},\"lost\":{},\"panics\":{},\"restarts\":{},\"dropped\":{{{}}},\"free_failed\":{{{}}}}}",
                    b.up,
                    b.connects,
                    b.to_agent,
                    b.delivered,
                    b.lent,
                    b.returned,
                    b.handed_back,
                    b.refused,
                    b.reclaimed,
                    b.holding,
                    b.lost,
                    b.panics,
                    b.restarts,
                    dropped.join(","),
                    free_failed.join(",")
                )
            }
            None => String::new(),
        };
        let agent = self.uplinks.values().filter(|u| u.attached).count();
        let s = format!(
            "{{\"node\":\"{}\",\"live\":{live},\"agent_tenants\":{agent},\"attached\":{},\"attach_refused\":{},\"lookup_refused\":{},\"deaths\":{},\"reclaimed\":{},\"rehinted\":{},\"bad_frames\":{},\"voids\":{},\"orphans\":{},\"hole_checks\":{},\"held\":{},\"accept_failed\":{},\"idle_dropped\":{},\"crowd_refused\":{},\"cooling\":{},\"dropped\":{},\"overdue\":{},\"killed\":{},\"dead_calls\":{{\"answered\":{},\"unanswered\":{}}},\"pools\":[{}]{bridge}}}\n",
            self.cfg.nodes[usize::from(self.node)].name,
            self.stats.attached,
            map(&self.stats.attach_refused),
            map(&self.stats.lookup_refused),
            self.stats.deaths,
            self.stats.reclaimed,
            self.stats.rehinted,
            self.stats.bad_frames,
            self.stats.voids,
            self.stats.orphans,
            self.stats.hole_checks,
            self.stats.held,
            self.stats.accept_failed,
            self.stats.idle_dropped,
            self.stats.crowd_refused,
            self.cooling.len(),
            self.dropped.len(),
            self.dropped.iter().filter(|d| d.overdue).count(),
            self.stats.killed,
            self.stats.dead_calls_answered,
            self.stats.dead_calls_unanswered,
            pools.join(",")
        );
        let path = status_path(&self.dir);
        let tmp = path.with_extension("tmp");
        if let Err(e) = std::fs::write(&tmp, s).and_then(|()| std::fs::rename(&tmp, &path)) {
            log::warn!("cannot write {}: {e}", path.display());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::Shimd;

    /// Pools larger than the machine's available memory are refused with
    /// their size, before any is mapped. Before, host-shimd populated the
    /// mapping and the kernel killed it, with nothing said.
    #[test]
    fn pools_beyond_the_memory_available_are_refused_with_their_size() {
        let dir = std::env::temp_dir().join(format!("dne-shimd-oom-{}", std::process::id()));
        let text = format!(
            "[[node]]\nname = \"n0\"\naddress = \"127.0.0.1:7101\"\nruntime_dir = \"{}\"\n\n\
             [[tenant]]\nname = \"t\"\nweight = 1\nbuf_size = 1073741824\nbuffers = 65536\nrecv_quota = 8\nmax_chain = 3\n",
            dir.display()
        );
        let cfg = config::Cluster::parse(&text).unwrap();
        let Err(e) = Shimd::new(cfg, "n0") else { panic!("64 TiB of pools were created") };
        let e = e.to_string();
        assert!(e.starts_with("the tenant pools of node n0 need 67108864 MiB; this machine has"), "{e}");
        let _ = std::fs::remove_dir_all(&dir);
    }

    /// A second host-shimd on a node's socket stops before making any
    /// pool (here: pools it could not even have, which it does not get to
    /// say). Before, it made them all beside the live one's first.
    #[test]
    fn a_second_host_shimd_stops_before_making_pools() {
        let dir = std::env::temp_dir().join(format!("dne-shimd-twice-{}", std::process::id()));
        let cluster = |buf_size: u32, buffers: u32| {
            let text = format!(
                "[[node]]\nname = \"n0\"\naddress = \"127.0.0.1:7101\"\nruntime_dir = \"{}\"\n\n\
                 [[tenant]]\nname = \"t\"\nweight = 1\nbuf_size = {buf_size}\nbuffers = {buffers}\n\
                 recv_quota = 8\nmax_chain = 3\n",
                dir.display()
            );
            config::Cluster::parse(&text).unwrap()
        };
        let live = Shimd::new(cluster(4096, 64), "n0").unwrap();
        let Err(e) = Shimd::new(cluster(1 << 30, 65536), "n0") else { panic!("a second host-shimd started") };
        assert!(e.to_string().contains("is served by another live process"), "{e}");
        drop(live);
        let _ = std::fs::remove_dir_all(&dir);
    }
}

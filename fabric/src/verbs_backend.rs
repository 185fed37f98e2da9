//! The `verbs` backend: rdma-core ibverbs through `sideway` 0.4, for host
//! mode on a RoCE or InfiniBand NIC, SoftRoCE (`rxe`) included, whose
//! provider has the extended send API (`ibv_wr_*`, which the send path
//! uses: mlx5 and rxe do, mlx4 does not; not tested on a device here).
//!
//! * One RC queue pair per connection, so each connection's receives, and
//!   so its credits, are its own (DESIGN.md section 5). Connections are set
//!   up from out-of-band blobs ([`VerbsBlob`]): QP number, PSN, LID, GID,
//!   MTU; [`Transport::connect`] moves the QP through RTR to RTS.
//! * One completion queue for the whole transport, polled in batches into
//!   an array sized at setup. Work request ids carry (kind, connection,
//!   slot); the caller's `user_data` waits in fixed slot tables, so nothing
//!   is assumed about it and nothing is allocated per message.
//! * Regions are registered from raw pointers: a tenant pool is one
//!   `shm::Region` (memfd, possibly hugetlb) mapped by this process, and the
//!   whole mapping is one memory region with local access only (two-sided
//!   sends never let a peer write where it chooses).
//! * Liveness: RC has no keepalive, and a peer that vanishes while this
//!   side has only receives posted would never be noticed. Each connection
//!   keeps one zero-length RDMA write in flight at a time, every
//!   [`VerbsConfig::probe_interval`], aimed at a small backend-owned region
//!   of the peer (the only memory with remote-write access). The first one
//!   completing is what reports [`RawCompletion::Connected`] (the peer's QP
//!   is at least ready to receive, so "up in both directions" holds); one
//!   failing after the transport's retries means the peer is gone, and the
//!   connection fails like on any other error: [`RawCompletion::ConnFailed`]
//!   first, then every outstanding operation with the same error.
//! * Errors: work completion statuses map to [`CompletionError`] (retries
//!   exhausted: `PeerGone`; a send larger than the receive: `TooBig`; a
//!   remote access or operation error: `Aborted`; flushed work takes the
//!   connection's reason); post failures map to [`RawPostError`].
//!
//! What `sideway` 0.4 lacks and this module does itself, with
//! `rdma-mummy-sys` (the same bindings sideway uses): posting a receive and
//! polling the CQ without allocating (sideway's receive guard and basic
//! poller build `Vec`s per call), and reading `wc_flags` (whether a
//! receive carried an immediate). Sends use sideway's extended QP
//! (`ibv_wr_*`), which allocates nothing.
//!
//! Timing: the peer must reach RTR within the transport's retry window
//! (`timeout` and `retry_cnt`, about two seconds by default) of this side's
//! first probe, or the connection fails; exchange blobs and connect both
//! sides promptly (the agents do).

use crate::verbs_blob::{PathMtu, VerbsBlob};
use crate::{
    CompletionError, ConnDepth, ConnId, ConnSetupError, EndpointConfig, Memory, RawCompletion, RawPostError, RegionId,
    RegionRegisterError, Transport,
};
use rdma_mummy_sys::{
    ibv_poll_cq, ibv_post_recv, ibv_recv_wr, ibv_sge, ibv_wc, ibv_wc_flags, ibv_wc_opcode, ibv_wc_status,
};
use sideway::ibverbs::AccessFlags;
use sideway::ibverbs::address::{AddressHandleAttribute, Gid};
use sideway::ibverbs::completion::{BasicCompletionQueue, CompletionQueue, GenericCompletionQueue};
use sideway::ibverbs::device::{DeviceInfo, DeviceList};
use sideway::ibverbs::device_context::{DeviceContext, LinkLayer, Mtu, PortState};
use sideway::ibverbs::memory_region::MemoryRegion;
use sideway::ibverbs::protection_domain::ProtectionDomain;
use sideway::ibverbs::queue_pair::{
    ExtendedQueuePair, PostSendError, PostSendGuard, QueuePair, QueuePairAttribute, QueuePairState, QueuePairType,
    SendOperationFlags, SetScatterGatherEntry, WorkRequestFlags,
};
use std::collections::VecDeque;
use std::sync::Arc;
use std::time::{Duration, Instant};

/// Environment variable naming the device (`rxe0`, `mlx5_0`); the first
/// device when unset.
pub const DEVICE_ENV: &str = "DNE_VERBS_DEVICE";
/// Environment variable with the GID index; chosen from the table when
/// unset (RoCE v2 with an IPv4 address first).
pub const GID_INDEX_ENV: &str = "DNE_VERBS_GID_INDEX";
/// Environment variable with the port number (default 1).
pub const PORT_ENV: &str = "DNE_VERBS_PORT";

/// Work completions taken from the CQ per poll at most.
const POLL_BATCH: usize = 64;

/// Linux error codes the backend tells apart (`ibv_post_recv` returns them
/// directly, `ibv_get_device_list` through errno).
const ENOMEM: i32 = 12;
const EINVAL: i32 = 22;
const ENOSYS: i32 = 38;

/// Sizes and knobs of a [`VerbsTransport`], fixed at setup.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct VerbsConfig {
    /// Device name; `None`: the first device.
    pub device: Option<String>,
    /// Port number (from 1).
    pub port: u8,
    /// GID index; `None`: chosen from the port's table.
    pub gid_index: Option<u8>,
    /// Connections.
    pub max_conns: u32,
    /// Work requests in flight per connection (sends and receives); sizes
    /// the completion queue.
    pub max_tasks: u32,
    /// Local ACK timeout exponent (4.096 us * 2^timeout per try).
    pub timeout: u8,
    /// Retries after an ACK timeout before the connection fails (0..=7).
    pub retry_cnt: u8,
    /// Gap between liveness probes of a connection.
    pub probe_interval: Duration,
}

impl VerbsConfig {
    /// Sizes for an endpoint configured with `cfg`, on the first device.
    pub fn for_endpoint(cfg: &EndpointConfig) -> Self {
        Self {
            device: None,
            port: 1,
            gid_index: None,
            max_conns: cfg.max_conns.max(1),
            max_tasks: cfg.send_window + 1 + cfg.recv_depth,
            // 4.096 us * 2^16 = 268 ms per try, 8 tries: about 2 s.
            timeout: 16,
            retry_cnt: 7,
            probe_interval: Duration::from_millis(100),
        }
    }

    /// [`for_endpoint`](Self::for_endpoint) with the device, port and GID
    /// index taken from [`DEVICE_ENV`], [`PORT_ENV`] and [`GID_INDEX_ENV`]
    /// when set.
    pub fn from_env(cfg: &EndpointConfig) -> Result<Self, VerbsSetupError> {
        Self::from_vars(cfg, |name| std::env::var(name).ok())
    }

    /// [`from_env`](Self::from_env) over any source of variables.
    fn from_vars(cfg: &EndpointConfig, var: impl Fn(&str) -> Option<String>) -> Result<Self, VerbsSetupError> {
        let mut c = Self::for_endpoint(cfg);
        c.device = var(DEVICE_ENV).filter(|d| !d.is_empty());
        let num = |name: &'static str| -> Result<Option<u8>, VerbsSetupError> {
            match var(name) {
                Some(v) if !v.is_empty() => {
                    v.trim().parse().map(Some).map_err(|_| VerbsSetupError::Setting { name, value: v })
                }
                _ => Ok(None),
            }
        };
        if let Some(p) = num(PORT_ENV)? {
            if p == 0 {
                return Err(VerbsSetupError::Setting { name: PORT_ENV, value: "0".into() });
            }
            c.port = p;
        }
        c.gid_index = num(GID_INDEX_ENV)?;
        Ok(c)
    }
}

/// The transport could not be set up.
#[derive(Debug, thiserror::Error)]
pub enum VerbsSetupError {
    /// libibverbs could not list devices: not installed, or the kernel has
    /// no RDMA support loaded.
    #[error("cannot list RDMA devices: {0}")]
    DeviceList(String),
    /// There is no RDMA device on this machine.
    #[error("no RDMA device found (a RoCE/InfiniBand NIC, or SoftRoCE: rdma link add rxe0 type rxe netdev eth0)")]
    NoDevice,
    /// No device has the configured name.
    #[error("no RDMA device named {0:?} (found: {1})")]
    UnknownDevice(String, String),
    /// The port is not usable.
    #[error("port {port} of {device}: {why}")]
    Port {
        /// Device name.
        device: String,
        /// Port number.
        port: u8,
        /// What is wrong.
        why: String,
    },
    /// An ibverbs call failed.
    #[error("{what}: {detail}")]
    Verbs {
        /// The call.
        what: &'static str,
        /// Its error.
        detail: String,
    },
    /// A setting from the environment does not parse.
    #[error("bad setting {name}={value:?}")]
    Setting {
        /// Variable.
        name: &'static str,
        /// Value.
        value: String,
    },
}

fn verbs_err(what: &'static str) -> impl FnOnce(&dyn std::fmt::Display) -> VerbsSetupError {
    move |e| VerbsSetupError::Verbs { what, detail: e.to_string() }
}

/// The OS error code somewhere in an error's chain (sideway wraps them,
/// some in `#[error(transparent)]` kinds that hide the `io::Error` from the
/// source chain, so those are looked into by type); -1 when there is none.
fn os_code(e: &(dyn std::error::Error + 'static)) -> i32 {
    use sideway::ibverbs::device::GetDeviceListErrorKind;
    use sideway::ibverbs::memory_region::RegisterMemoryRegionErrorKind;
    use sideway::ibverbs::queue_pair::CreateQueuePairErrorKind;
    let mut cur = Some(e);
    while let Some(e) = cur {
        let io = if let Some(io) = e.downcast_ref::<std::io::Error>() {
            Some(io)
        } else if let Some(GetDeviceListErrorKind::Ibverbs(io)) = e.downcast_ref() {
            Some(io)
        } else if let Some(CreateQueuePairErrorKind::Ibverbs(io)) = e.downcast_ref() {
            Some(io)
        } else if let Some(RegisterMemoryRegionErrorKind::Ibverbs(io)) = e.downcast_ref() {
            Some(io)
        } else {
            None
        };
        if let Some(code) = io.and_then(std::io::Error::raw_os_error) {
            return code;
        }
        cur = e.source();
    }
    -1
}

/// Kinds of work requests, in the top bits of the work request id.
const KIND_SEND: u64 = 0;
const KIND_RECV: u64 = 1;
const KIND_PROBE: u64 = 2;

/// A work request id: kind (2 bits), generation of the connection slot
/// (14 bits: a reopened connection's id is reused, and completions of its
/// old queue pair may still be in the CQ), connection (16 bits), slot.
fn wr_id(kind: u64, gen_: u16, conn: u32, slot: u32) -> u64 {
    (kind << 62) | (u64::from(gen_ & 0x3fff) << 48) | (u64::from(conn & 0xffff) << 32) | u64::from(slot)
}

fn split_wr_id(id: u64) -> (u64, u16, usize, u32) {
    (id >> 62, ((id >> 48) & 0x3fff) as u16, ((id >> 32) & 0xffff) as usize, id as u32)
}

/// Connections a transport can have (the id field of a work request id).
const MAX_CONNS: u32 = 1 << 16;

/// A fixed table of caller values with a free list.
#[derive(Debug)]
struct Slots {
    items: Vec<Option<u64>>,
    free: Vec<u32>,
}

impl Slots {
    fn new(n: u32) -> Self {
        Self { items: vec![None; n as usize], free: (0..n).rev().collect() }
    }

    fn insert(&mut self, v: u64) -> Option<u32> {
        let i = self.free.pop()?;
        self.items[i as usize] = Some(v);
        Some(i)
    }

    fn remove(&mut self, i: u32) -> Option<u64> {
        let v = self.items.get_mut(i as usize)?.take()?;
        self.free.push(i);
        Some(v)
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Phase {
    /// QP in INIT: receives may be posted, `connect` not called yet.
    Open,
    /// QP in RTS, first probe in flight.
    Connecting,
    /// The first probe completed: the peer's QP answers.
    Up,
}

#[derive(Debug)]
struct VerbsConn {
    qp: ExtendedQueuePair,
    /// Generation of this connection id (bumped on reopen).
    gen_: u16,
    /// CQ entries this connection may use.
    cq_share: u32,
    psn: u32,
    phase: Phase,
    /// Why the connection failed (set once; later flushed work takes it).
    failed: Option<CompletionError>,
    sends: Slots,
    recvs: Slots,
    probe_in_flight: bool,
    last_probe: Instant,
    /// The peer's probe region.
    probe_target: (u32, u64),
    max_msg: u32,
}

#[derive(Debug)]
struct VerbsRegion {
    // Dropped before the memory it covers.
    mr: Arc<MemoryRegion>,
    base: u64,
    len: u64,
    _mem: Arc<shm::Region>,
}

/// What this side's port looks like.
#[derive(Clone, Copy, Debug)]
struct PortInfo {
    lid: u16,
    gid: [u8; 16],
    gid_index: u8,
    mtu: PathMtu,
    ethernet: bool,
}

/// The ibverbs RC transport.
pub struct VerbsTransport {
    // Field order is drop order: queue pairs, then memory regions, then the
    // memory, CQ, PD and device (sideway's Arcs keep the rest in order).
    conns: Vec<VerbsConn>,
    regions: Vec<VerbsRegion>,
    probe_mr: Arc<MemoryRegion>,
    _probe_mem: Arc<shm::Region>,
    cq: Arc<BasicCompletionQueue>,
    pd: Arc<ProtectionDomain>,
    _ctx: Arc<DeviceContext>,
    wcs: Vec<ibv_wc>,
    pending: VecDeque<RawCompletion>,
    cfg: VerbsConfig,
    port: PortInfo,
    device: String,
    /// CQ entries not yet promised to a connection.
    cq_left: u32,
    /// Connections that still need probing (neither failed nor probing).
    probing: bool,
}

impl std::fmt::Debug for VerbsTransport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("VerbsTransport")
            .field("device", &self.device)
            .field("port", &self.cfg.port)
            .field("gid_index", &self.port.gid_index)
            .field("conns", &self.conns.len())
            .field("regions", &self.regions.len())
            .finish_non_exhaustive()
    }
}

fn mtu_of(m: Mtu) -> PathMtu {
    match m {
        Mtu::Mtu256 => PathMtu::Mtu256,
        Mtu::Mtu512 => PathMtu::Mtu512,
        Mtu::Mtu1024 => PathMtu::Mtu1024,
        Mtu::Mtu2048 => PathMtu::Mtu2048,
        Mtu::Mtu4096 => PathMtu::Mtu4096,
    }
}

fn sideway_mtu(m: PathMtu) -> Mtu {
    match m {
        PathMtu::Mtu256 => Mtu::Mtu256,
        PathMtu::Mtu512 => Mtu::Mtu512,
        PathMtu::Mtu1024 => Mtu::Mtu1024,
        PathMtu::Mtu2048 => Mtu::Mtu2048,
        PathMtu::Mtu4096 => Mtu::Mtu4096,
    }
}

/// `IBV_GID_TYPE_SYSFS_ROCE_V2`, what `ibv_query_gid_type` reports for
/// RoCE v2 entries.
const GID_TYPE_ROCE_V2: u32 = 1;

/// Picks a GID index: RoCE v2 with an IPv4-mapped address (routable and
/// what SoftRoCE peers on other hosts use), else any RoCE v2, else the
/// first non-zero GID.
fn pick_gid(ctx: &DeviceContext, port: u8, table_len: i32) -> Option<(u8, [u8; 16])> {
    let mut best: Option<(u32, u8, [u8; 16])> = None;
    for i in 0..table_len.clamp(0, 256) as u32 {
        let Ok(gid) = ctx.query_gid(port, i) else { continue };
        if gid.is_zero() {
            continue;
        }
        let v2 = ctx.query_gid_type(port, i).is_ok_and(|t| t == GID_TYPE_ROCE_V2);
        let v4 = gid.raw[..10] == [0; 10] && gid.raw[10..12] == [0xff, 0xff];
        let rank = u32::from(v2) * 2 + u32::from(v4);
        if best.is_none_or(|(r, ..)| rank > r) {
            best = Some((rank, i as u8, gid.raw));
        }
    }
    best.map(|(_, i, g)| (i, g))
}

fn fresh_psn() -> u32 {
    use std::hash::{BuildHasher, Hasher};
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    h.write_u32(std::process::id());
    (h.finish() as u32) & 0x00ff_ffff
}

fn wc_error(status: u32) -> CompletionError {
    match status {
        ibv_wc_status::IBV_WC_RETRY_EXC_ERR
        | ibv_wc_status::IBV_WC_RNR_RETRY_EXC_ERR
        | ibv_wc_status::IBV_WC_RESP_TIMEOUT_ERR => CompletionError::PeerGone,
        ibv_wc_status::IBV_WC_LOC_LEN_ERR | ibv_wc_status::IBV_WC_REM_INV_REQ_ERR => CompletionError::TooBig,
        ibv_wc_status::IBV_WC_REM_ACCESS_ERR
        | ibv_wc_status::IBV_WC_REM_OP_ERR
        | ibv_wc_status::IBV_WC_REM_ABORT_ERR => CompletionError::Aborted,
        ibv_wc_status::IBV_WC_WR_FLUSH_ERR => CompletionError::Closed,
        s => CompletionError::Transport(s as i32),
    }
}

fn post_send_error(e: &PostSendError) -> RawPostError {
    match e {
        PostSendError::NotEnoughResources(_) => RawPostError::Busy,
        PostSendError::InvalidWorkRequest(_) => RawPostError::Invalid,
        e => RawPostError::Conn(CompletionError::Transport(os_code(e))),
    }
}

impl VerbsTransport {
    /// A transport on the device, port and GID `cfg` names.
    pub fn new(cfg: VerbsConfig) -> Result<Self, VerbsSetupError> {
        let list = DeviceList::new().map_err(|e| {
            let why = match os_code(&e) {
                // ENOSYS: libibverbs is there, the kernel side is not.
                ENOSYS => "no RDMA support in the kernel (no uverbs device; SoftRoCE: modprobe rdma_rxe)".to_owned(),
                // ENOENT and friends from the loader: libibverbs itself.
                -1 => format!("{e} (is libibverbs1 installed?)"),
                code => format!("{e}: {}", std::io::Error::from_raw_os_error(code)),
            };
            VerbsSetupError::DeviceList(why)
        })?;
        if list.is_empty() {
            return Err(VerbsSetupError::NoDevice);
        }
        let dev = match &cfg.device {
            None => list.get(0).ok_or(VerbsSetupError::NoDevice)?,
            Some(name) => list.iter().find(|d| d.name() == *name).ok_or_else(|| {
                let names: Vec<String> = list.iter().map(|d| d.name()).collect();
                VerbsSetupError::UnknownDevice(name.clone(), names.join(", "))
            })?,
        };
        let device = dev.name();
        let ctx = dev.open().map_err(|e| verbs_err("ibv_open_device")(&e))?;
        let port_err = |why: String| VerbsSetupError::Port { device: device.clone(), port: cfg.port, why };
        let attr = ctx.query_port(cfg.port).map_err(|e| port_err(format!("ibv_query_port: {e}")))?;
        if attr.port_state() != PortState::Active {
            return Err(port_err(format!("not active ({:?})", attr.port_state())));
        }
        let ethernet = attr.link_layer() == LinkLayer::Ethernet;
        let (gid_index, gid) = match cfg.gid_index {
            Some(i) => {
                let g = ctx.query_gid(cfg.port, u32::from(i)).map_err(|e| port_err(format!("GID {i}: {e}")))?;
                (i, g.raw)
            }
            None => match pick_gid(&ctx, cfg.port, attr.gid_tbl_len()) {
                Some(g) => g,
                None if !ethernet => (0, [0; 16]),
                None => {
                    return Err(port_err("no usable GID (RoCE needs one: is the netdev up with an address?)".into()));
                }
            },
        };
        let lid = attr.lid();
        if lid == 0 && gid == [0; 16] {
            return Err(port_err("neither a LID nor a GID".into()));
        }
        let port = PortInfo { lid, gid, gid_index, mtu: mtu_of(attr.active_mtu()), ethernet };

        let pd = ctx.alloc_pd().map_err(|e| verbs_err("ibv_alloc_pd")(&e))?;
        let cqe = cfg.max_conns.max(1).saturating_mul(cfg.max_tasks.saturating_add(1)).saturating_add(16);
        let cq = ctx.create_cq_builder().setup_cqe(cqe).build().map_err(|e| verbs_err("ibv_create_cq")(&e))?;
        let probe_mem = Arc::new(
            shm::Region::create("dne-verbs-probe", 4096, shm::PagePolicy::Normal)
                .map_err(|e| verbs_err("probe region")(&e))?,
        );
        // SAFETY: the pointer and length are those of `probe_mem`'s whole
        // mapping, which the transport keeps alive (field `_probe_mem`,
        // dropped after `probe_mr`) for as long as the registration exists.
        let probe_mr = unsafe {
            pd.reg_mr(
                probe_mem.base_addr() as usize,
                probe_mem.len(),
                AccessFlags::LocalWrite | AccessFlags::RemoteWrite,
            )
        }
        .map_err(|e| verbs_err("ibv_reg_mr (probe region)")(&e))?;
        log::info!(
            "fabric verbs: {device} port {} lid {lid} gid[{gid_index}] {} mtu {}",
            cfg.port,
            Gid { raw: gid },
            port.mtu.bytes()
        );
        Ok(Self {
            conns: Vec::with_capacity(cfg.max_conns as usize),
            regions: Vec::new(),
            probe_mr,
            _probe_mem: probe_mem,
            cq,
            pd,
            _ctx: ctx,
            // SAFETY: `ibv_wc` is plain data (integers and a union of
            // integers), for which all-zero bytes are a valid value.
            wcs: vec![unsafe { std::mem::zeroed::<ibv_wc>() }; POLL_BATCH],
            pending: VecDeque::with_capacity(2 * cfg.max_conns as usize + 2),
            cq_left: cqe - 16,
            cfg,
            port,
            device,
            probing: false,
        })
    }

    /// A transport for an endpoint configured with `cfg`, on the device
    /// the environment names ([`VerbsConfig::from_env`]).
    pub fn for_config(cfg: &EndpointConfig) -> Result<Self, VerbsSetupError> {
        Self::new(VerbsConfig::from_env(cfg)?)
    }

    /// Name of the device in use.
    pub fn device_name(&self) -> &str {
        &self.device
    }

    /// Whether this port is Ethernet (RoCE) rather than InfiniBand.
    pub fn is_roce(&self) -> bool {
        self.port.ethernet
    }

    fn emit(out: &mut [RawCompletion], n: &mut usize, pending: &mut VecDeque<RawCompletion>, c: RawCompletion) {
        if *n < out.len() {
            out[*n] = c;
            *n += 1;
        } else {
            pending.push_back(c);
        }
    }

    /// Fails `conn` for `error` (the first reason sticks): the QP goes to
    /// the error state, so every outstanding work request is flushed.
    fn fail(&mut self, i: usize, error: CompletionError) {
        let c = &mut self.conns[i];
        if c.failed.is_some() {
            return;
        }
        c.failed = Some(error);
        let mut attr = QueuePairAttribute::new();
        attr.setup_state(QueuePairState::Error);
        if let Err(e) = c.qp.modify(&attr) {
            log::warn!("fabric verbs: connection {i}: to the error state: {e}");
        }
        self.pending.push_back(RawCompletion::ConnFailed(ConnId(i as u32), error));
    }

    /// Posts a zero-length RDMA write to the peer's probe region.
    fn post_probe(c: &mut VerbsConn, conn: u32) -> Result<(), RawPostError> {
        let (rkey, addr) = c.probe_target;
        let mut g = c.qp.start_post_send();
        let wr = g.construct_wr(wr_id(KIND_PROBE, c.gen_, conn, 0), WorkRequestFlags::Signaled).setup_write(rkey, addr);
        // SAFETY: an empty scatter list names no local memory.
        unsafe { wr.setup_sge_list(&[]) };
        g.post().map_err(|e| post_send_error(&e))?;
        c.probe_in_flight = true;
        c.last_probe = Instant::now();
        Ok(())
    }

    /// Keeps one probe in flight per live connection, every interval.
    fn probe(&mut self) {
        if !self.probing {
            return;
        }
        let now = Instant::now();
        let mut still = false;
        let mut failed = Vec::new();
        for (i, c) in self.conns.iter_mut().enumerate() {
            if c.failed.is_some() || c.phase == Phase::Open || c.probe_in_flight {
                continue;
            }
            still = true;
            if now.duration_since(c.last_probe) < self.cfg.probe_interval {
                continue;
            }
            if let Err(e) = Self::post_probe(c, i as u32) {
                match e {
                    RawPostError::Busy => {}
                    RawPostError::Conn(e) => failed.push((i, e)),
                    RawPostError::Invalid => failed.push((i, CompletionError::Transport(-1))),
                }
            }
        }
        for (i, e) in failed {
            self.fail(i, e);
        }
        self.probing = still || self.conns.iter().any(|c| c.probe_in_flight);
    }

    fn on_wc(&mut self, wc: &ibv_wc, out: &mut [RawCompletion], n: &mut usize) {
        let (kind, gen_, i, slot) = split_wr_id(wc.wr_id);
        let Some(c) = self.conns.get(i) else {
            log::warn!("fabric verbs: completion for unknown connection {i}");
            return;
        };
        if c.gen_ != gen_ {
            // Left over from the queue pair this id had before a reopen
            // (its operations were all reported when it failed).
            return;
        }
        let conn = ConnId(i as u32);
        let result = if wc.status == ibv_wc_status::IBV_WC_SUCCESS {
            Ok(())
        } else {
            if c.failed.is_none() {
                let e = match wc_error(wc.status) {
                    // A flush we did not ask for: the queue pair went to
                    // the error state on its own. `Closed` would say this
                    // side closed it, and the mesh would not set it up
                    // again.
                    CompletionError::Closed => CompletionError::Transport(wc.status as i32),
                    e => e,
                };
                log::debug!(
                    "fabric verbs: connection {i} failed: status {} vendor {:#x}: {e}",
                    wc.status,
                    wc.vendor_err
                );
                self.fail(i, e);
            }
            Err(self.conns[i].failed.unwrap_or(CompletionError::Closed))
        };
        // A failure queued its ConnFailed; it goes out before the work.
        while let Some(p) = self.pending.pop_front() {
            if *n == out.len() {
                self.pending.push_front(p);
                break;
            }
            out[*n] = p;
            *n += 1;
        }
        let c = &mut self.conns[i];
        match kind {
            KIND_SEND => {
                let Some(user_data) = c.sends.remove(slot) else {
                    log::warn!("fabric verbs: completion of unknown send slot {slot} on {conn:?}");
                    return;
                };
                Self::emit(out, n, &mut self.pending, RawCompletion::Sent { conn, user_data, result });
            }
            KIND_RECV => {
                let Some(user_data) = c.recvs.remove(slot) else {
                    log::warn!("fabric verbs: completion of unknown receive slot {slot} on {conn:?}");
                    return;
                };
                let (len, imm) = match result {
                    // Only a send lands in the receive buffer. Every QP
                    // grants remote write (the liveness probes), so a peer
                    // can consume a receive with an RDMA write with
                    // immediate that writes nothing there: reported with no
                    // immediate, it fails the connection as a protocol
                    // error instead of delivering what the buffer held.
                    Ok(()) if wc.opcode != ibv_wc_opcode::IBV_WC_RECV => {
                        log::warn!(
                            "fabric verbs: a receive on {conn:?} completed by opcode {} (not a send): failing it",
                            wc.opcode
                        );
                        (wc.byte_len, None)
                    }
                    Ok(()) => {
                        let with_imm = wc.wc_flags & ibv_wc_flags::IBV_WC_WITH_IMM.0 != 0;
                        // SAFETY: `imm_data` is the union member the
                        // provider fills for receives; every bit pattern is
                        // a valid u32.
                        let raw = unsafe { wc.imm_data_invalidated_rkey_union.imm_data };
                        (wc.byte_len, with_imm.then(|| u32::from_be(raw)))
                    }
                    Err(_) => (0, None),
                };
                Self::emit(out, n, &mut self.pending, RawCompletion::Recv { conn, user_data, len, imm, result });
            }
            KIND_PROBE => {
                c.probe_in_flight = false;
                self.probing = true;
                if result.is_ok() && c.phase == Phase::Connecting {
                    c.phase = Phase::Up;
                    Self::emit(out, n, &mut self.pending, RawCompletion::Connected(conn));
                }
            }
            k => log::warn!("fabric verbs: completion of unknown kind {k} on {conn:?}"),
        }
    }
}

impl Transport for VerbsTransport {
    fn name(&self) -> &'static str {
        "verbs"
    }

    fn register(&mut self, id: RegionId, mem: Memory<'_>) -> Result<(), RegionRegisterError> {
        if id.0 as usize != self.regions.len() {
            return Err(RegionRegisterError::Transport(EINVAL));
        }
        let mem = match mem {
            Memory::Local(r) => r,
            Memory::Export(_) => {
                return Err(RegionRegisterError::Unsupported(
                    "verbs registers local memory only (host mode: the agent maps the tenant pools)",
                ));
            }
        };
        // SAFETY: the pointer and length are those of `mem`'s whole mapping;
        // the region entry keeps `mem` alive after the registration (its
        // `mr` field drops first) and the transport drops every queue pair
        // that could still use it before its regions.
        let mr =
            unsafe { self.pd.reg_mr(mem.base_addr() as usize, mem.len(), AccessFlags::LocalWrite) }.map_err(|e| {
                log::warn!("fabric verbs: ibv_reg_mr of {} bytes: {e}", mem.len());
                RegionRegisterError::Transport(os_code(&e))
            })?;
        self.regions.push(VerbsRegion { base: mem.base_addr() as u64, len: mem.len() as u64, mr, _mem: mem });
        Ok(())
    }

    fn region_len(&self, id: RegionId) -> Option<u64> {
        self.regions.get(id.0 as usize).map(|r| r.len)
    }

    fn open(&mut self, id: ConnId, depth: ConnDepth) -> Result<Vec<u8>, ConnSetupError> {
        // A new id is the next one; an old one is reopened (its connection
        // failed and the endpoint drained it).
        let i = id.0 as usize;
        if i > self.conns.len() {
            return Err(ConnSetupError::State);
        }
        if let Some(old) = self.conns.get(i)
            && old.failed.is_none()
        {
            return Err(ConnSetupError::State);
        }
        if i == self.conns.len() && (i >= self.cfg.max_conns as usize || id.0 >= MAX_CONNS) {
            return Err(ConnSetupError::Full);
        }
        // What the old queue pair of this id had of the CQ is free again.
        let returned = self.conns.get(i).map_or(0, |c| c.cq_share);
        // One more send for the probe.
        let need = depth.sends.saturating_add(1).saturating_add(depth.recvs);
        if need > self.cq_left + returned {
            log::warn!("fabric verbs: {need} work requests exceed what the CQ has left ({})", self.cq_left);
            return Err(ConnSetupError::Full);
        }
        let cq = GenericCompletionQueue::from(self.cq.clone());
        let mut qp = self
            .pd
            .create_qp_builder()
            .setup_qp_type(QueuePairType::ReliableConnection)
            .setup_max_send_wr(depth.sends + 1)
            .setup_max_recv_wr(depth.recvs.max(1))
            .setup_max_send_sge(1)
            .setup_max_recv_sge(1)
            .setup_send_cq(cq.clone())
            .setup_recv_cq(cq)
            .setup_send_ops_flags(
                SendOperationFlags::Send | SendOperationFlags::SendWithImmediate | SendOperationFlags::Write,
            )
            .build_ex()
            .map_err(|e| {
                log::warn!("fabric verbs: ibv_create_qp_ex: {e}");
                ConnSetupError::Transport(os_code(&e))
            })?;
        let mut attr = QueuePairAttribute::new();
        attr.setup_state(QueuePairState::Init)
            .setup_pkey_index(0)
            .setup_port(self.cfg.port)
            .setup_access_flags(AccessFlags::LocalWrite | AccessFlags::RemoteWrite);
        qp.modify(&attr).map_err(|e| {
            log::warn!("fabric verbs: QP to INIT: {e}");
            ConnSetupError::Transport(os_code(&e))
        })?;
        let psn = fresh_psn();
        let blob = VerbsBlob {
            qpn: qp.qp_number(),
            psn,
            lid: self.port.lid,
            gid: self.port.gid,
            mtu: self.port.mtu,
            probe_rkey: self.probe_mr.rkey(),
            probe_addr: self.probe_mr.get_ptr() as u64,
        };
        self.cq_left = self.cq_left + returned - need;
        let gen_ = self.conns.get(i).map_or(0, |c| c.gen_.wrapping_add(1) & 0x3fff);
        let conn = VerbsConn {
            qp,
            gen_,
            cq_share: need,
            psn,
            phase: Phase::Open,
            failed: None,
            sends: Slots::new(depth.sends),
            recvs: Slots::new(depth.recvs),
            probe_in_flight: false,
            last_probe: Instant::now(),
            probe_target: (0, 0),
            max_msg: depth.max_msg,
        };
        match self.conns.get_mut(i) {
            // Drops the old queue pair (in the error state, drained).
            Some(old) => *old = conn,
            None => self.conns.push(conn),
        }
        Ok(blob.encode().to_vec())
    }

    fn connect(&mut self, id: ConnId, blob: &[u8]) -> Result<(), ConnSetupError> {
        let peer = VerbsBlob::decode(blob).map_err(|e| {
            log::warn!("fabric verbs: peer blob rejected: {e}");
            ConnSetupError::BadBlob
        })?;
        let port = self.port;
        let port_num = self.cfg.port;
        let (timeout, retry) = (self.cfg.timeout, self.cfg.retry_cnt.min(7));
        let c = self.conns.get_mut(id.0 as usize).ok_or(ConnSetupError::Unknown)?;
        if c.phase != Phase::Open || c.failed.is_some() {
            return Err(ConnSetupError::State);
        }
        if port.ethernet && peer.gid == [0; 16] {
            log::warn!("fabric verbs: RoCE peer blob without a GID");
            return Err(ConnSetupError::BadBlob);
        }
        let mut ah = AddressHandleAttribute::new();
        ah.setup_dest_lid(peer.lid).setup_port(port_num).setup_service_level(0);
        if port.ethernet || peer.gid != [0; 16] {
            ah.setup_grh(&Gid { raw: peer.gid }, 0, port.gid_index, 64, 0);
        }
        let mut rtr = QueuePairAttribute::new();
        rtr.setup_state(QueuePairState::ReadyToReceive)
            .setup_path_mtu(sideway_mtu(port.mtu.min(peer.mtu)))
            .setup_dest_qp_num(peer.qpn)
            .setup_rq_psn(peer.psn)
            .setup_max_dest_read_atomic(1)
            .setup_min_rnr_timer(12)
            .setup_address_vector(&ah);
        c.qp.modify(&rtr).map_err(|e| {
            log::warn!("fabric verbs: QP to RTR: {e}");
            ConnSetupError::Transport(os_code(&e))
        })?;
        let mut rts = QueuePairAttribute::new();
        rts.setup_state(QueuePairState::ReadyToSend)
            .setup_sq_psn(c.psn)
            .setup_timeout(timeout)
            .setup_retry_cnt(retry)
            // 7: retry forever while the receiver has no receive posted
            // (receiver not ready waits, as the trait says).
            .setup_rnr_retry(7)
            .setup_max_read_atomic(1);
        c.qp.modify(&rts).map_err(|e| {
            log::warn!("fabric verbs: QP to RTS: {e}");
            ConnSetupError::Transport(os_code(&e))
        })?;
        c.probe_target = (peer.probe_rkey, peer.probe_addr);
        c.phase = Phase::Connecting;
        Self::post_probe(c, id.0).map_err(|e| {
            log::warn!("fabric verbs: first probe not posted: {e:?}");
            ConnSetupError::Transport(-1)
        })?;
        self.probing = true;
        Ok(())
    }

    fn send(
        &mut self,
        conn: ConnId,
        src: Option<(RegionId, u64, u32)>,
        imm: Option<u32>,
        user_data: u64,
    ) -> Result<(), RawPostError> {
        let c = self.conns.get_mut(conn.0 as usize).ok_or(RawPostError::Invalid)?;
        if let Some(e) = c.failed {
            return Err(RawPostError::Conn(e));
        }
        if c.phase == Phase::Open {
            return Err(RawPostError::Conn(CompletionError::Closed));
        }
        let sge = match src {
            Some((region, offset, len)) => {
                let r = self.regions.get(region.0 as usize).ok_or(RawPostError::Invalid)?;
                if len > c.max_msg || offset.checked_add(u64::from(len)).is_none_or(|e| e > r.len) {
                    return Err(RawPostError::Invalid);
                }
                Some(ibv_sge { addr: r.base + offset, length: len, lkey: r.mr.lkey() })
            }
            None => None,
        };
        let slot = c.sends.insert(user_data).ok_or(RawPostError::Busy)?;
        let mut g = c.qp.start_post_send();
        let h = g.construct_wr(wr_id(KIND_SEND, c.gen_, conn.0, slot), WorkRequestFlags::Signaled);
        // Immediates travel in network order, as every verbs peer expects.
        let wr = match imm {
            Some(v) => h.setup_send_imm(v.to_be()),
            None => h.setup_send(),
        };
        match sge {
            // SAFETY: the range lies inside a registered region (checked
            // above) whose memory lives as long as the transport; the
            // send reads it until its completion, which the caller awaits
            // before reusing the buffer (the trait's contract).
            Some(s) => unsafe { wr.setup_sge(s.lkey, s.addr, s.length) },
            // SAFETY: an empty scatter list names no memory (a zero-length
            // send; a zero-length entry would mean 2 GiB on some NICs).
            None => unsafe { wr.setup_sge_list(&[]) },
        }
        match g.post() {
            Ok(()) => Ok(()),
            Err(e) => {
                c.sends.remove(slot);
                Err(post_send_error(&e))
            }
        }
    }

    fn recv(
        &mut self,
        conn: ConnId,
        (region, offset, len): (RegionId, u64, u32),
        user_data: u64,
    ) -> Result<(), RawPostError> {
        let c = self.conns.get_mut(conn.0 as usize).ok_or(RawPostError::Invalid)?;
        if let Some(e) = c.failed {
            return Err(RawPostError::Conn(e));
        }
        let r = self.regions.get(region.0 as usize).ok_or(RawPostError::Invalid)?;
        if len == 0 || offset.checked_add(u64::from(len)).is_none_or(|e| e > r.len) {
            return Err(RawPostError::Invalid);
        }
        let slot = c.recvs.insert(user_data).ok_or(RawPostError::Busy)?;
        let mut sge = ibv_sge { addr: r.base + offset, length: len, lkey: r.mr.lkey() };
        let mut wr = ibv_recv_wr {
            wr_id: wr_id(KIND_RECV, c.gen_, conn.0, slot),
            next: std::ptr::null_mut(),
            sg_list: &mut sge,
            num_sge: 1,
        };
        let mut bad: *mut ibv_recv_wr = std::ptr::null_mut();
        // SAFETY: `c.qp` owns the QP; the pointer is used only during the
        // call below, while `c.qp` is borrowed.
        let qp = unsafe { c.qp.qp() };
        // SAFETY: `qp` is a live QP; `wr` and `sge` are valid for the call
        // (the provider copies them into its receive queue); the buffer is
        // inside a registered region (checked above) whose memory outlives
        // every queue pair of the transport.
        let ret = unsafe { ibv_post_recv(qp.as_ptr(), &mut wr, &mut bad) };
        if ret == 0 {
            return Ok(());
        }
        c.recvs.remove(slot);
        Err(match ret {
            ENOMEM => RawPostError::Busy, // the receive queue is full
            EINVAL => RawPostError::Invalid,
            code => RawPostError::Conn(CompletionError::Transport(code)),
        })
    }

    fn poll(&mut self, out: &mut [RawCompletion]) -> usize {
        let mut n = 0;
        while n < out.len() {
            let Some(p) = self.pending.pop_front() else { break };
            out[n] = p;
            n += 1;
        }
        self.probe();
        let room = (out.len() - n).min(self.wcs.len());
        if room == 0 {
            return n;
        }
        // SAFETY: the CQ is owned by `self.cq`; the pointer is used only in
        // the call below.
        let cq = unsafe { self.cq.cq() };
        // SAFETY: `cq` is a live CQ and `wcs` has room for `room` entries.
        let got = unsafe { ibv_poll_cq(cq.as_ptr(), room as i32, self.wcs.as_mut_ptr()) };
        if got < 0 {
            log::warn!("fabric verbs: ibv_poll_cq failed ({got})");
            return n;
        }
        for k in 0..got as usize {
            let wc = self.wcs[k];
            self.on_wc(&wc, out, &mut n);
        }
        while n < out.len() {
            let Some(p) = self.pending.pop_front() else { break };
            out[n] = p;
            n += 1;
        }
        n
    }

    fn abort(&mut self, conn: ConnId) {
        if (conn.0 as usize) < self.conns.len() {
            self.fail(conn.0 as usize, CompletionError::Closed);
        }
    }
}

// The agent moves its endpoints to the data-plane thread.
const _: fn() = || {
    fn send<T: Send>() {}
    send::<VerbsTransport>();
};

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn work_request_ids_round_trip() {
        for (kind, gen_, conn, slot) in
            [(KIND_SEND, 0, 0, 0), (KIND_RECV, 3, 5, 77), (KIND_PROBE, 0x3fff, MAX_CONNS - 1, u32::MAX)]
        {
            assert_eq!(split_wr_id(wr_id(kind, gen_, conn, slot)), (kind, gen_, conn as usize, slot));
        }
    }

    #[test]
    fn statuses_map_to_typed_errors() {
        assert_eq!(wc_error(ibv_wc_status::IBV_WC_RETRY_EXC_ERR), CompletionError::PeerGone);
        assert_eq!(wc_error(ibv_wc_status::IBV_WC_LOC_LEN_ERR), CompletionError::TooBig);
        assert_eq!(wc_error(ibv_wc_status::IBV_WC_REM_ACCESS_ERR), CompletionError::Aborted);
        assert_eq!(wc_error(ibv_wc_status::IBV_WC_WR_FLUSH_ERR), CompletionError::Closed);
        assert_eq!(
            wc_error(ibv_wc_status::IBV_WC_LOC_PROT_ERR),
            CompletionError::Transport(ibv_wc_status::IBV_WC_LOC_PROT_ERR as i32)
        );
    }

    #[test]
    fn settings_from_variables() {
        let cfg = EndpointConfig::default();
        let vars = |pairs: &'static [(&'static str, &'static str)]| {
            move |name: &str| pairs.iter().find(|(k, _)| *k == name).map(|(_, v)| (*v).to_owned())
        };
        let c = VerbsConfig::from_vars(&cfg, vars(&[])).unwrap();
        assert_eq!(c, VerbsConfig::for_endpoint(&cfg));
        assert_eq!((c.device, c.port, c.gid_index), (None, 1, None));
        assert_eq!(c.max_tasks, cfg.send_window + 1 + cfg.recv_depth);
        let c = VerbsConfig::from_vars(&cfg, vars(&[(DEVICE_ENV, "rxe0"), (PORT_ENV, "2"), (GID_INDEX_ENV, " 3 ")]))
            .unwrap();
        assert_eq!((c.device.as_deref(), c.port, c.gid_index), (Some("rxe0"), 2, Some(3)));
        for bad in [(PORT_ENV, "0"), (PORT_ENV, "x"), (GID_INDEX_ENV, "256"), (GID_INDEX_ENV, "-1")] {
            let e = VerbsConfig::from_vars(&cfg, move |n: &str| (n == bad.0).then(|| bad.1.to_owned())).unwrap_err();
            assert!(matches!(e, VerbsSetupError::Setting { name, .. } if name == bad.0), "{bad:?}: {e}");
        }
    }

    #[test]
    fn slots_are_fixed() {
        let mut s = Slots::new(2);
        let a = s.insert(10).unwrap();
        let b = s.insert(u64::MAX).unwrap();
        assert_eq!(s.insert(3), None, "full");
        assert_eq!(s.remove(b), Some(u64::MAX));
        assert_eq!(s.remove(b), None, "taken once");
        assert_eq!(s.remove(a), Some(10));
        assert_eq!(s.remove(99), None);
    }

    /// Without libibverbs or without a device, setting up fails with a
    /// typed error that says so (the hardware suite turns it into a loud
    /// failure); with one, the transport comes up.
    #[test]
    fn setup_reports_what_is_missing() {
        match VerbsTransport::new(VerbsConfig::for_endpoint(&EndpointConfig::default())) {
            Ok(t) => assert!(!t.device_name().is_empty()),
            Err(e @ (VerbsSetupError::DeviceList(_) | VerbsSetupError::NoDevice | VerbsSetupError::Port { .. })) => {
                assert!(!e.to_string().is_empty());
            }
            Err(e) => panic!("unexpected setup error: {e}"),
        }
    }
}

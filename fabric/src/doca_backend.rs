//! The `doca` backend: DOCA RDMA through the `doca` crate (the SDK on
//! BlueField, the emulation elsewhere).
//!
//! One DOCA RDMA context per connection (DOCA posts receives per context,
//! so a context per (tenant, peer) keeps each connection's receives, and so
//! its credits, its own), all on one progress engine that [`poll`] drives.
//! Regions are DOCA mmaps: local shared memory, or a host export imported
//! with `RemoteMmap::from_export`. Buffers come from one inventory sized at
//! setup; making one per work request clones a reference count, nothing is
//! allocated.
//!
//! [`poll`]: Transport::poll

use crate::{
    CompletionError, ConnDepth, ConnId, ConnSetupError, Memory, RawCompletion, RawPostError, RegionId,
    RegionRegisterError, Transport,
};
use doca::{
    Access, Buf, BufInventory, CtxState, Device, DocaError, MemRange, Mmap, ProgressEngine, Rdma, RdmaConfig,
    RdmaConnId, RdmaEvent, RemoteMmap,
};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// Most progress calls [`Transport::clear_notification`] makes before
/// arming the handle.
const NOTIFY_PROGRESS_ROUNDS: usize = 64;

/// How long [`Transport::open`] waits for a context to start.
const START_TIMEOUT: Duration = Duration::from_secs(10);

#[derive(Debug)]
enum DocaRegion {
    Local(Mmap),
    Remote(RemoteMmap),
}

#[derive(Debug)]
struct DocaConn {
    rdma: Rdma,
    id: RdmaConnId,
}

/// The DOCA RDMA transport.
#[derive(Debug)]
pub struct DocaTransport {
    dev: Device,
    regions: Vec<DocaRegion>,
    conns: Vec<DocaConn>,
    inv: BufInventory,
    /// A small local mmap the zero-length credit sends name.
    ctrl: Mmap,
    /// First connection polled next (round robin across connections).
    next: usize,
    // Dropped last: contexts keep it alive anyway.
    pe: ProgressEngine,
}

fn map_err(e: DocaError) -> CompletionError {
    match e {
        DocaError::CONNECTION_RESET | DocaError::NOT_CONNECTED => CompletionError::PeerGone,
        DocaError::SHUTDOWN => CompletionError::Closed,
        DocaError::CONNECTION_ABORTED => CompletionError::Aborted,
        DocaError::TOO_BIG => CompletionError::TooBig,
        e => CompletionError::Transport(e.code()),
    }
}

fn post_err(e: DocaError) -> RawPostError {
    match e {
        DocaError::NO_MEMORY => RawPostError::Busy,
        DocaError::INVALID_VALUE | DocaError::TOO_BIG | DocaError::NOT_PERMITTED => RawPostError::Invalid,
        DocaError::BAD_STATE => RawPostError::Conn(CompletionError::Closed),
        e => RawPostError::Conn(map_err(e)),
    }
}

impl DocaTransport {
    /// A transport on `dev` for up to `max_conns` connections of
    /// `max_tasks` work requests each in flight (sizes the buffer
    /// inventory).
    pub fn new(dev: Device, max_conns: u32, max_tasks: u32) -> Result<Self, DocaError> {
        let pe = ProgressEngine::new()?;
        let ctrl_mem =
            Arc::new(shm::Region::create("dne-fabric-ctrl", 4096, shm::PagePolicy::Normal).map_err(|e| {
                log::warn!("fabric: control region: {e}");
                DocaError::NO_MEMORY
            })?);
        let ctrl =
            Mmap::builder(MemRange::region(ctrl_mem)).permissions(Access::LOCAL_READ_WRITE).add_device(&dev).start()?;
        let inv = BufInventory::new(max_conns.max(1).saturating_mul(max_tasks.max(1)).saturating_add(64))?;
        Ok(Self { dev, regions: Vec::new(), conns: Vec::with_capacity(max_conns as usize), inv, ctrl, next: 0, pe })
    }

    /// A transport on the first DOCA device, sized for `cfg`.
    pub fn for_config(cfg: &crate::EndpointConfig) -> Result<Self, DocaError> {
        let devs = doca::devices()?;
        let dev = devs.first().ok_or(DocaError::NOT_FOUND)?.open()?;
        Self::new(dev, cfg.max_conns, cfg.send_window + 1 + cfg.recv_depth)
    }

    /// The device.
    pub fn device(&self) -> &Device {
        &self.dev
    }

    fn buf(&self, region: RegionId, offset: u64, len: u32) -> Result<Buf, RawPostError> {
        let r = self.regions.get(region.0 as usize).ok_or(RawPostError::Invalid)?;
        match r {
            DocaRegion::Local(m) => self.inv.buf(m, offset, len),
            DocaRegion::Remote(m) => self.inv.remote_buf(m, offset, len),
        }
        .map_err(post_err)
    }
}

impl Transport for DocaTransport {
    fn name(&self) -> &'static str {
        match doca::BACKEND {
            doca::Backend::Sdk => "doca-sdk",
            doca::Backend::Emu => "doca-emu",
        }
    }

    fn register(&mut self, id: RegionId, mem: Memory<'_>) -> Result<(), RegionRegisterError> {
        if id.0 as usize != self.regions.len() {
            return Err(RegionRegisterError::Transport(DocaError::INVALID_VALUE.code()));
        }
        let r = match mem {
            Memory::Local(region) => DocaRegion::Local(
                Mmap::builder(MemRange::region(region))
                    .permissions(Access::LOCAL_READ_WRITE | Access::RDMA_READ | Access::RDMA_WRITE)
                    .add_device(&self.dev)
                    .start()
                    .map_err(|e| RegionRegisterError::Transport(e.code()))?,
            ),
            Memory::Export(blob) => {
                DocaRegion::Remote(RemoteMmap::from_export(&self.dev, blob).map_err(|e| match e {
                    DocaError::INVALID_VALUE => RegionRegisterError::BadExport("malformed export blob"),
                    DocaError::NOT_FOUND => RegionRegisterError::BadExport("exported memory is gone"),
                    e => RegionRegisterError::Transport(e.code()),
                })?)
            }
        };
        self.regions.push(r);
        Ok(())
    }

    fn region_len(&self, id: RegionId) -> Option<u64> {
        self.regions.get(id.0 as usize).map(|r| match r {
            DocaRegion::Local(m) => m.len(),
            DocaRegion::Remote(m) => m.len(),
        })
    }

    fn open(&mut self, id: ConnId, depth: ConnDepth) -> Result<Vec<u8>, ConnSetupError> {
        // A new id is the next one; an old one is reopened (its connection
        // failed and the endpoint drained it).
        if id.0 as usize > self.conns.len() {
            return Err(ConnSetupError::State);
        }
        let cfg = RdmaConfig {
            send_tasks: depth.sends,
            recv_tasks: depth.recvs,
            max_connections: 1,
            max_send_size: depth.max_msg,
        };
        let t = |e: DocaError| ConnSetupError::Transport(e.code());
        let rdma = Rdma::new(&self.pe, &self.dev, cfg).map_err(t)?;
        rdma.start().map_err(t)?;
        let start = Instant::now();
        // Setup path: a bounded wait for the asynchronous start.
        while rdma.state() != CtxState::Running {
            self.pe.progress();
            if start.elapsed() > START_TIMEOUT {
                return Err(ConnSetupError::Timeout);
            }
            std::thread::yield_now();
        }
        let (rid, blob) = rdma.export().map_err(t)?;
        let conn = DocaConn { rdma, id: rid };
        match self.conns.get_mut(id.0 as usize) {
            Some(old) => *old = conn,
            None => self.conns.push(conn),
        }
        Ok(blob)
    }

    fn connect(&mut self, id: ConnId, blob: &[u8]) -> Result<(), ConnSetupError> {
        let c = self.conns.get(id.0 as usize).ok_or(ConnSetupError::Unknown)?;
        c.rdma.connect(c.id, blob).map_err(|e| match e {
            DocaError::INVALID_VALUE => ConnSetupError::BadBlob,
            DocaError::BAD_STATE => ConnSetupError::State,
            e => ConnSetupError::Transport(e.code()),
        })
    }

    fn send(
        &mut self,
        conn: ConnId,
        src: Option<(RegionId, u64, u32)>,
        imm: Option<u32>,
        user_data: u64,
    ) -> Result<(), RawPostError> {
        let c = self.conns.get(conn.0 as usize).ok_or(RawPostError::Invalid)?;
        let mut buf = match src {
            Some((region, offset, len)) => {
                let mut b = self.buf(region, offset, len)?;
                b.set_data_len(len).map_err(post_err)?;
                b
            }
            None => self.inv.buf(&self.ctrl, 0, 64).map_err(post_err)?,
        };
        if src.is_none() {
            buf.set_data_len(0).map_err(post_err)?;
        }
        c.rdma.submit_send(c.id, buf, imm, user_data).map_err(|e| post_err(e.error))
    }

    fn recv(
        &mut self,
        conn: ConnId,
        (region, offset, len): (RegionId, u64, u32),
        user_data: u64,
    ) -> Result<(), RawPostError> {
        let c = self.conns.get(conn.0 as usize).ok_or(RawPostError::Invalid)?;
        let buf = self.buf(region, offset, len)?;
        c.rdma.submit_receive(buf, user_data).map_err(|e| post_err(e.error))
    }

    fn poll(&mut self, out: &mut [RawCompletion]) -> usize {
        self.pe.progress();
        let mut n = 0;
        let k = self.conns.len();
        for j in 0..k {
            let i = (self.next + j) % k;
            let conn = ConnId(i as u32);
            let c = &self.conns[i];
            while n < out.len() {
                let Some(ev) = c.rdma.poll_event() else { break };
                out[n] = match ev {
                    RdmaEvent::Connected(_) => RawCompletion::Connected(conn),
                    RdmaEvent::ConnectionFailed(_, e) => RawCompletion::ConnFailed(conn, map_err(e)),
                    RdmaEvent::SendDone { user_data, result, .. } => {
                        RawCompletion::Sent { conn, user_data, result: result.map_err(map_err) }
                    }
                    RdmaEvent::Received { user_data, buf, imm, result, .. } => RawCompletion::Recv {
                        conn,
                        user_data,
                        len: buf.data_len(),
                        imm,
                        result: result.map_err(map_err),
                    },
                };
                n += 1;
            }
            if n == out.len() {
                self.next = i;
                return n;
            }
        }
        if k > 0 {
            self.next = (self.next + 1) % k;
        }
        n
    }

    fn abort(&mut self, conn: ConnId) {
        if let Some(c) = self.conns.get(conn.0 as usize)
            && let Err(e) = c.rdma.stop()
        {
            log::debug!("fabric: stop of {conn:?}: {e}");
        }
    }

    fn notification_fd(&self) -> Option<std::os::fd::BorrowedFd<'_>> {
        self.pe.notification_handle().ok()
    }

    /// DOCA's flow after a wake-up: clear, progress until nothing is left
    /// (bounded: what a flood leaves makes the armed handle fire at once),
    /// arm. The completions found wait for the caller's next `poll`.
    fn clear_notification(&mut self) {
        if let Err(e) = self.pe.clear_notification() {
            log::debug!("fabric: clearing the progress engine's notification: {e}");
        }
        for _ in 0..NOTIFY_PROGRESS_ROUNDS {
            if self.pe.progress() == 0 {
                break;
            }
        }
        if let Err(e) = self.pe.request_notification() {
            log::debug!("fabric: arming the progress engine's notification: {e}");
        }
    }
}

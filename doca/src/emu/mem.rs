//! Emulated memory: mmaps over memfd-backed memory, their export and
//! import, buffer inventories and buffers.
//!
//! Every emulated mmap is a range of a file descriptor (a `shm::Region`'s
//! memfd, or a caller's fd). The emulated NIC moves payload bytes between
//! that fd and its sockets inside the kernel (`sendfile`, `splice`), so an
//! importer never maps, and never copies through, memory it imported: the
//! [`RemoteMmap`] type has no byte access at all.

use super::dev::Device;
use crate::emu_wire::{ExportKind, MmapBlob};
use crate::{Access, DocaError, error::os};
use shm::Region;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::sync::Arc;
use std::sync::OnceLock;
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};

#[derive(Debug)]
enum Backing {
    Region(Arc<Region>),
    Fd(OwnedFd),
}

impl Backing {
    fn fd(&self) -> BorrowedFd<'_> {
        match self {
            Backing::Region(r) => r.fd(),
            Backing::Fd(fd) => fd.as_fd(),
        }
    }
}

/// The memory an mmap covers: caller memory that stays alive as long as
/// the mmap (and every buffer of it) does.
#[derive(Debug)]
pub struct MemRange {
    backing: Backing,
    offset: u64,
    len: u64,
}

fn file_size(fd: BorrowedFd<'_>) -> Result<u64, DocaError> {
    let st = rustix::fs::fstat(fd).map_err(|e| os("fstat", e))?;
    u64::try_from(st.st_size).map_err(|_| DocaError::INVALID_VALUE)
}

impl MemRange {
    /// The whole of a shared-memory region (the caller keeps its own
    /// `Arc<Region>` to read and write it).
    pub fn region(region: Arc<Region>) -> Self {
        let len = region.len() as u64;
        Self { backing: Backing::Region(region), offset: 0, len }
    }

    /// `len` bytes at `offset` of a region.
    pub fn region_range(region: Arc<Region>, offset: u64, len: u64) -> Result<Self, DocaError> {
        if len == 0 || offset.checked_add(len).is_none_or(|e| e > region.len() as u64) {
            return Err(DocaError::INVALID_VALUE);
        }
        Ok(Self { backing: Backing::Region(region), offset, len })
    }

    /// `len` bytes at `offset` of a memory file (a memfd the caller
    /// created or received).
    pub fn fd(fd: OwnedFd, offset: u64, len: u64) -> Result<Self, DocaError> {
        let size = file_size(fd.as_fd())?;
        if len == 0 || offset.checked_add(len).is_none_or(|e| e > size) {
            return Err(DocaError::INVALID_VALUE);
        }
        Ok(Self { backing: Backing::Fd(fd), offset, len })
    }
}

/// What a buffer's mmap is, to the emulated NIC.
#[derive(Debug)]
pub(crate) struct MmapInner {
    backing: Backing,
    /// Start of the mmap in the file.
    pub(crate) file_offset: u64,
    pub(crate) len: u64,
    pub(crate) access: Access,
    /// Devices added to the mmap (ids of opened devices).
    devices: Vec<u64>,
    /// Whether received data may be written into it.
    pub(crate) writable: bool,
    pub(crate) imported: bool,
    /// Imported from an RDMA export: the peer's memory, only ever the
    /// remote side of an RDMA read or write, never a send's or a
    /// receive's own buffer (as in DOCA).
    pub(crate) remote_only: bool,
    /// The emulated NIC's own mapping, made only when the kernel cannot
    /// splice into or out of the file (hugetlbfs); see `dma`.
    pub(crate) dma_map: OnceLock<Option<Region>>,
    dma_slow: AtomicBool,
}

impl MmapInner {
    pub(crate) fn fd(&self) -> BorrowedFd<'_> {
        self.backing.fd()
    }

    /// The caller's region, when the mmap is over one.
    pub(crate) fn region(&self) -> Option<&Region> {
        match &self.backing {
            Backing::Region(r) => Some(r),
            Backing::Fd(_) => None,
        }
    }

    pub(crate) fn dma_slow(&self) -> bool {
        // Relaxed: a hint; both paths are correct, the flag picks one.
        self.dma_slow.load(Ordering::Relaxed)
    }

    pub(crate) fn set_dma_slow(&self) {
        log::info!("emulated NIC: kernel cannot splice this memory; copying through its own mapping");
        // Relaxed: see `dma_slow`.
        self.dma_slow.store(true, Ordering::Relaxed);
    }

    pub(crate) fn has_device(&self, dev: &Device) -> bool {
        self.devices.contains(&dev.id())
    }
}

/// Configuration of a local mmap before it is started (`doca_mmap_create`,
/// `set_memrange`, `set_permissions`, `add_dev`).
#[derive(Debug)]
pub struct MmapBuilder {
    range: MemRange,
    access: Access,
    devices: Vec<Device>,
}

impl MmapBuilder {
    /// Sets the access rights (default: local read only).
    pub fn permissions(mut self, access: Access) -> Self {
        self.access = access;
        self
    }

    /// Adds a device that may use the memory.
    pub fn add_device(mut self, dev: &Device) -> Self {
        self.devices.push(dev.clone());
        self
    }

    /// Starts the mmap; after this its configuration is fixed.
    pub fn start(self) -> Result<Mmap, DocaError> {
        if self.devices.is_empty() {
            return Err(DocaError::BAD_STATE);
        }
        let writable = self.access.contains(Access::LOCAL_READ_WRITE);
        let inner = MmapInner {
            backing: self.range.backing,
            file_offset: self.range.offset,
            len: self.range.len,
            access: self.access,
            devices: self.devices.iter().map(Device::id).collect(),
            writable,
            imported: false,
            remote_only: false,
            dma_map: OnceLock::new(),
            dma_slow: AtomicBool::new(false),
        };
        Ok(Mmap { inner: Arc::new(inner), _devices: self.devices })
    }
}

/// A started mmap over local memory. It keeps its memory and devices
/// alive; buffers keep it alive.
#[derive(Debug)]
pub struct Mmap {
    pub(crate) inner: Arc<MmapInner>,
    _devices: Vec<Device>,
}

impl Mmap {
    /// Begins configuring an mmap over `range`.
    pub fn builder(range: MemRange) -> MmapBuilder {
        MmapBuilder { range, access: Access::LOCAL_READ_ONLY, devices: Vec::new() }
    }

    /// Bytes covered.
    pub fn len(&self) -> u64 {
        self.inner.len
    }

    /// Whether the mmap covers nothing (never: ranges are nonempty).
    pub fn is_empty(&self) -> bool {
        self.inner.len == 0
    }

    /// Access rights.
    pub fn access(&self) -> Access {
        self.inner.access
    }

    fn export(&self, dev: &Device, kind: ExportKind) -> Result<Vec<u8>, DocaError> {
        if !self.inner.has_device(dev) {
            return Err(DocaError::NOT_PERMITTED);
        }
        let a = self.inner.access;
        let granted = match kind {
            ExportKind::Pci if a.intersects(Access::PCI_READ_ONLY | Access::PCI_READ_WRITE) => a,
            ExportKind::Rdma if a.intersects(Access::RDMA_READ | Access::RDMA_WRITE) => a,
            _ => return Err(DocaError::NOT_PERMITTED),
        };
        let fd = self.inner.fd();
        // What an importer accepts (see `RemoteMmap::from_export`).
        if !rustix::fs::fcntl_get_seals(fd)
            .is_ok_and(|s| s.contains(rustix::fs::SealFlags::SHRINK | rustix::fs::SealFlags::GROW))
        {
            log::warn!("mmap export: the memory is not a memfd sealed against resizing");
            return Err(DocaError::NOT_PERMITTED);
        }
        let st = rustix::fs::fstat(fd).map_err(|e| os("fstat", e))?;
        let fd_num = {
            use std::os::fd::AsRawFd;
            fd.as_raw_fd()
        };
        let blob = MmapBlob {
            kind,
            access: granted.bits(),
            pid: std::process::id(),
            fd: u32::try_from(fd_num).map_err(|_| DocaError::UNEXPECTED)?,
            st_dev: st.st_dev,
            st_ino: st.st_ino,
            offset: self.inner.file_offset,
            len: self.inner.len,
        };
        Ok(blob.encode().to_vec())
    }

    /// Exports the mmap for the other side of PCIe (the DPU imports host
    /// memory with it). Needs a `PCI_*` access flag and `dev` added.
    pub fn export_pci(&self, dev: &Device) -> Result<Vec<u8>, DocaError> {
        self.export(dev, ExportKind::Pci)
    }

    /// Exports the mmap for an RDMA peer. Needs an `RDMA_*` access flag and
    /// `dev` added.
    pub fn export_rdma(&self, dev: &Device) -> Result<Vec<u8>, DocaError> {
        self.export(dev, ExportKind::Rdma)
    }
}

/// An mmap created from another process's export
/// (`doca_mmap_create_from_export`). It names memory the importer may hand
/// to comch and RDMA tasks; it offers no way to read or write the bytes.
///
/// ```compile_fail
/// fn peek(remote: &doca::RemoteMmap) {
///     let mut b = [0u8; 4];
///     remote.copy_out(0, &mut b); // no byte access on imported memory
/// }
/// ```
#[derive(Debug)]
pub struct RemoteMmap {
    pub(crate) inner: Arc<MmapInner>,
    _dev: Device,
}

impl RemoteMmap {
    /// Imports an export blob on `dev`.
    pub fn from_export(dev: &Device, blob: &[u8]) -> Result<RemoteMmap, DocaError> {
        let b = MmapBlob::decode(blob).map_err(|e| {
            log::warn!("mmap export blob rejected: {e}");
            DocaError::INVALID_VALUE
        })?;
        let access = Access::from_bits(b.access).ok_or(DocaError::INVALID_VALUE)?;
        let writable = match b.kind {
            ExportKind::Pci => access.contains(Access::PCI_READ_WRITE),
            ExportKind::Rdma => access.contains(Access::RDMA_WRITE),
        };
        let path = format!("/proc/{}/fd/{}", b.pid, b.fd);
        let mode = if writable { rustix::fs::OFlags::RDWR } else { rustix::fs::OFlags::RDONLY };
        let fd = rustix::fs::open(path.as_str(), mode | rustix::fs::OFlags::CLOEXEC, rustix::fs::Mode::empty())
            .map_err(|e| {
                log::warn!("import of {path} failed: {e}");
                DocaError::NOT_FOUND
            })?;
        // What an mmap exports is a memfd sealed against resizing (a
        // `shm::Region`); anything else the blob names (any open file of a
        // process the importer may look into) was never exported.
        let sealed = rustix::fs::fcntl_get_seals(&fd)
            .is_ok_and(|s| s.contains(rustix::fs::SealFlags::SHRINK | rustix::fs::SealFlags::GROW));
        if !sealed {
            log::warn!("import of {path}: not a memory file sealed against resizing (never exported)");
            return Err(DocaError::NOT_PERMITTED);
        }
        let st = rustix::fs::fstat(&fd).map_err(|e| os("fstat", e))?;
        if st.st_dev != b.st_dev || st.st_ino != b.st_ino {
            log::warn!("import of {path}: the exporter's fd now names another file");
            return Err(DocaError::NOT_FOUND);
        }
        if b.offset + b.len > u64::try_from(st.st_size).unwrap_or(0) {
            return Err(DocaError::INVALID_VALUE);
        }
        let inner = MmapInner {
            backing: Backing::Fd(fd),
            file_offset: b.offset,
            len: b.len,
            access,
            devices: vec![dev.id()],
            writable,
            imported: true,
            remote_only: b.kind == ExportKind::Rdma,
            dma_map: OnceLock::new(),
            dma_slow: AtomicBool::new(false),
        };
        Ok(RemoteMmap { inner: Arc::new(inner), _dev: dev.clone() })
    }

    /// Bytes covered.
    pub fn len(&self) -> u64 {
        self.inner.len
    }

    /// Whether the mmap covers nothing (never).
    pub fn is_empty(&self) -> bool {
        self.inner.len == 0
    }

    /// Whether tasks may write into it (the export granted write access).
    pub fn is_writable(&self) -> bool {
        self.inner.writable
    }
}

#[derive(Debug)]
struct InvInner {
    capacity: u32,
    used: AtomicU32,
}

/// A fixed pool of buffer handles (`doca_buf_inventory`). Running out is an
/// explicit `NO_MEMORY`.
#[derive(Clone, Debug)]
pub struct BufInventory {
    inner: Arc<InvInner>,
}

impl BufInventory {
    /// Creates and starts an inventory of `capacity` buffers.
    pub fn new(capacity: u32) -> Result<Self, DocaError> {
        if capacity == 0 {
            return Err(DocaError::INVALID_VALUE);
        }
        Ok(Self { inner: Arc::new(InvInner { capacity, used: AtomicU32::new(0) }) })
    }

    /// Buffers in use.
    pub fn in_use(&self) -> u32 {
        // Relaxed: a statistic; the pool accounting itself uses the RMW in
        // `take`.
        self.inner.used.load(Ordering::Relaxed)
    }

    /// Capacity.
    pub fn capacity(&self) -> u32 {
        self.inner.capacity
    }

    fn take(&self, mmap: &Arc<MmapInner>, offset: u64, len: u32) -> Result<Buf, DocaError> {
        if len == 0 || offset.checked_add(u64::from(len)).is_none_or(|e| e > mmap.len) {
            return Err(DocaError::INVALID_VALUE);
        }
        let cap = self.inner.capacity;
        // Relaxed: the count only bounds the number of handles; no data is
        // published through it.
        self.inner
            .used
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |u| (u < cap).then_some(u + 1))
            .map_err(|_| DocaError::NO_MEMORY)?;
        Ok(Buf { mmap: mmap.clone(), inv: self.inner.clone(), offset, len, data_len: 0 })
    }

    /// A buffer of `len` bytes at `offset` of a local mmap.
    pub fn buf(&self, mmap: &Mmap, offset: u64, len: u32) -> Result<Buf, DocaError> {
        self.take(&mmap.inner, offset, len)
    }

    /// A buffer of `len` bytes at `offset` of an imported mmap.
    pub fn remote_buf(&self, mmap: &RemoteMmap, offset: u64, len: u32) -> Result<Buf, DocaError> {
        self.take(&mmap.inner, offset, len)
    }
}

/// A buffer (`doca_buf`): a range of an mmap, with the length of the data
/// in it. It keeps its mmap and inventory alive and returns its handle to
/// the inventory on drop. It offers no byte access: the owner of a local
/// mmap reads and writes its own memory; imported memory is never read.
#[derive(Debug)]
pub struct Buf {
    pub(crate) mmap: Arc<MmapInner>,
    inv: Arc<InvInner>,
    offset: u64,
    len: u32,
    data_len: u32,
}

impl Buf {
    /// Offset of the buffer in its mmap.
    pub fn offset(&self) -> u64 {
        self.offset
    }

    /// Capacity in bytes.
    pub fn len(&self) -> u32 {
        self.len
    }

    /// Whether the capacity is zero (never).
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Bytes of data: what a send sends, what a receive wrote.
    pub fn data_len(&self) -> u32 {
        self.data_len
    }

    /// Sets the data length (at most the capacity).
    pub fn set_data_len(&mut self, n: u32) -> Result<(), DocaError> {
        if n > self.len {
            return Err(DocaError::INVALID_VALUE);
        }
        self.data_len = n;
        Ok(())
    }

    /// Whether the buffer is in imported memory.
    pub fn is_remote(&self) -> bool {
        self.mmap.imported
    }

    /// Offset of the buffer in its backing file.
    pub(crate) fn file_offset(&self) -> u64 {
        self.mmap.file_offset + self.offset
    }
}

impl Drop for Buf {
    fn drop(&mut self) {
        // Relaxed: see `BufInventory::take`.
        self.inv.used.fetch_sub(1, Ordering::Relaxed);
    }
}

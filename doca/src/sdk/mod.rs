//! The SDK backend: the same API over `doca-sys` (the installed DOCA SDK).
//!
//! STATUS: type-checked, never run. No DOCA SDK or device exists on the
//! machines this was written on, and DOCA's headers may not be copied here.
//! The test command type-checks this backend (and the agent, fabric and
//! host-shim built on it) against `doca-sys`'s `decls` feature: declarations
//! written from DOCA's public API reference, shaped as bindgen would
//! generate them from the headers (`EnumVariation::Consts` names constants
//! `<enum>_<VARIANT>`). On a DOCA machine `--features doca/sdk` builds it
//! against bindings generated from the installed headers, and the
//! conformance suite is what must pass there first.
//!
//! Modules: this one (devices, mmaps, buffer inventories and buffers, the
//! progress engine), [`ctx`] (what the contexts share: state, start/stop,
//! teardown, task submission, locking), [`rdma`], [`comch`] and
//! [`fastpath`] (comch consumers and producers). Callbacks DOCA makes
//! during progress push into fixed event queues, which the contexts'
//! `poll_event` drains, as in the emulated backend.
#![allow(unsafe_code)]

mod comch;
mod ctx;
mod fastpath;
mod rdma;

pub use comch::{ComchClient, ComchServer, HOST_REP_ENV};
pub use fastpath::{ComchConsumer, ComchProducer};
pub use rdma::Rdma;

use crate::{Access, DocaError};
use doca_sys as sys;
use std::ffi::{CStr, c_char, c_void};
use std::net::{IpAddr, Ipv4Addr};
use std::ptr::{self, NonNull};
use std::sync::{Arc, Mutex, MutexGuard};

fn check(ret: sys::doca_error_t) -> Result<(), DocaError> {
    DocaError::from_code(ret.0 as i32)
}

/// Description of one device.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DeviceInfo {
    /// InfiniBand device name (`mlx5_0`).
    pub name: String,
    /// PCI address (`0000:03:00.0`).
    pub pci_addr: String,
    /// The IPv4 address of the device's network interface
    /// (`doca_devinfo_get_ipv4_addr`), unspecified when it has none.
    pub ip: IpAddr,
}

impl DeviceInfo {
    /// Opens the device.
    pub fn open(&self) -> Result<Device, DocaError> {
        open_where(|d| d == self)
    }
}

struct DevList {
    list: *mut *mut sys::doca_devinfo,
    n: u32,
}

impl DevList {
    fn new() -> Result<Self, DocaError> {
        let mut list = ptr::null_mut();
        let mut n = 0u32;
        // SAFETY: both out-pointers are valid locals; the list is freed in
        // `Drop` with the matching destroy call.
        check(unsafe { sys::doca_devinfo_create_list(&mut list, &mut n) })?;
        Ok(Self { list, n })
    }

    fn get(&self, i: u32) -> *mut sys::doca_devinfo {
        // SAFETY: i < n, the length DOCA returned with the list.
        unsafe { self.list.wrapping_add(i as usize).read() }
    }

    fn info(&self, i: u32) -> Result<DeviceInfo, DocaError> {
        let di = self.get(i);
        let mut name = [0 as c_char; 256];
        let mut pci = [0 as c_char; 64];
        // SAFETY: `di` is an entry of a live list; the buffers are larger
        // than DOCA's IBDEV_NAME_SIZE and PCI_ADDR_SIZE.
        check(unsafe { sys::doca_devinfo_get_ibdev_name(di, name.as_mut_ptr(), name.len() as u32) })?;
        // SAFETY: as above.
        check(unsafe { sys::doca_devinfo_get_pci_addr_str(di, pci.as_mut_ptr()) })?;
        // SAFETY: DOCA NUL-terminates both strings inside the buffers.
        let s = |b: &[c_char]| unsafe { CStr::from_ptr(b.as_ptr()) }.to_string_lossy().into_owned();
        let mut v4 = [0u8; 4];
        // SAFETY: as above; the buffer holds the 4 bytes asked for. A device
        // without an address (or an interface) answers with an error, which
        // leaves it unspecified.
        let ip = match check(unsafe { sys::doca_devinfo_get_ipv4_addr(di, v4.as_mut_ptr(), v4.len() as u32) }) {
            Ok(()) => IpAddr::V4(Ipv4Addr::from(v4)),
            Err(_) => IpAddr::V4(Ipv4Addr::UNSPECIFIED),
        };
        Ok(DeviceInfo { name: s(&name), pci_addr: s(&pci), ip })
    }
}

impl Drop for DevList {
    fn drop(&mut self) {
        // SAFETY: the list came from `doca_devinfo_create_list`; devices
        // opened from it stay valid after it is destroyed.
        unsafe { sys::doca_devinfo_destroy_list(self.list) };
    }
}

/// The devices of this machine.
pub fn devices() -> Result<Vec<DeviceInfo>, DocaError> {
    let l = DevList::new()?;
    (0..l.n).map(|i| l.info(i)).collect()
}

fn open_where(pred: impl Fn(&DeviceInfo) -> bool) -> Result<Device, DocaError> {
    let l = DevList::new()?;
    for i in 0..l.n {
        let info = l.info(i)?;
        if pred(&info) {
            let mut dev = ptr::null_mut();
            // SAFETY: the devinfo is a live list entry; `dev` is a valid
            // out-pointer, closed in `DevInner::drop`.
            check(unsafe { sys::doca_dev_open(l.get(i), &mut dev) })?;
            let dev = NonNull::new(dev).ok_or(DocaError::DRIVER)?;
            return Ok(Device { inner: Arc::new(DevInner { dev, info }) });
        }
    }
    Err(DocaError::NOT_FOUND)
}

#[derive(Debug)]
pub(crate) struct DevInner {
    dev: NonNull<sys::doca_dev>,
    info: DeviceInfo,
}

// SAFETY: a doca_dev may be used from any thread; DOCA serializes inside.
unsafe impl Send for DevInner {}
// SAFETY: as for Send.
unsafe impl Sync for DevInner {}

impl Drop for DevInner {
    fn drop(&mut self) {
        // SAFETY: every object created on the device holds an Arc to this,
        // so none is left when it is closed.
        unsafe { sys::doca_dev_close(self.dev.as_ptr()) };
    }
}

/// An open device.
#[derive(Clone, Debug)]
pub struct Device {
    inner: Arc<DevInner>,
}

impl Device {
    /// Opens the device with this IB name.
    pub fn open_by_name(name: &str) -> Result<Device, DocaError> {
        open_where(|d| d.name == name)
    }
    /// Opens the device at this PCI address.
    pub fn open_by_pci(pci_addr: &str) -> Result<Device, DocaError> {
        open_where(|d| d.pci_addr == pci_addr)
    }
    /// Opens the first device.
    pub fn open_first() -> Result<Device, DocaError> {
        open_where(|_| true)
    }
    /// Opens the device whose interface has this address: the fabric
    /// device of a node listening on it (`NOT_FOUND` when none has it).
    pub fn open_by_ip(ip: IpAddr) -> Result<Device, DocaError> {
        open_where(|d| d.ip == ip)
    }
    /// The device's description.
    pub fn info(&self) -> &DeviceInfo {
        &self.inner.info
    }
}

fn access_mask(a: Access) -> u32 {
    let map = [
        (Access::LOCAL_READ_WRITE, sys::doca_access_flag_DOCA_ACCESS_FLAG_LOCAL_READ_WRITE),
        (Access::RDMA_READ, sys::doca_access_flag_DOCA_ACCESS_FLAG_RDMA_READ),
        (Access::RDMA_WRITE, sys::doca_access_flag_DOCA_ACCESS_FLAG_RDMA_WRITE),
        (Access::RDMA_ATOMIC, sys::doca_access_flag_DOCA_ACCESS_FLAG_RDMA_ATOMIC),
        (Access::PCI_READ_ONLY, sys::doca_access_flag_DOCA_ACCESS_FLAG_PCI_READ_ONLY),
        (Access::PCI_READ_WRITE, sys::doca_access_flag_DOCA_ACCESS_FLAG_PCI_READ_WRITE),
    ];
    map.iter().filter(|(f, _)| a.contains(*f)).fold(0, |m, (_, v)| m | *v)
}

/// The memory of a local mmap (kept alive by it).
#[derive(Debug)]
pub struct MemRange {
    region: Arc<shm::Region>,
    offset: u64,
    len: u64,
}

impl MemRange {
    /// The whole of a region.
    pub fn region(region: Arc<shm::Region>) -> Self {
        let len = region.len() as u64;
        Self { region, offset: 0, len }
    }
    /// Part of a region.
    pub fn region_range(region: Arc<shm::Region>, offset: u64, len: u64) -> Result<Self, DocaError> {
        if len == 0 || offset.checked_add(len).is_none_or(|e| e > region.len() as u64) {
            return Err(DocaError::INVALID_VALUE);
        }
        Ok(Self { region, offset, len })
    }
    /// A memory fd, mapped here so the NIC can register it.
    pub fn fd(fd: std::os::fd::OwnedFd, offset: u64, len: u64) -> Result<Self, DocaError> {
        let r = shm::Region::open(fd).map_err(|e| crate::error::os("mmap", e))?;
        Self::region_range(Arc::new(r), offset, len)
    }
}

#[derive(Debug)]
pub(crate) struct MmapInner {
    mmap: NonNull<sys::doca_mmap>,
    base: *mut u8,
    len: u64,
    writable: bool,
    imported: bool,
    _mem: Option<Arc<shm::Region>>,
    _devs: Vec<Device>,
}

// SAFETY: DOCA's mmap is not thread safe (its fast path, taking and
// releasing buffers, counts them without atomics unless
// `doca_mmap_enable_thread_safety`): every buffer taken from it or given
// back happens under [`BUFS`]; the rest (export, destroy) needs `&self` or
// the last reference.
unsafe impl Send for MmapInner {}
// SAFETY: as for Send.
unsafe impl Sync for MmapInner {}

impl Drop for MmapInner {
    fn drop(&mut self) {
        // SAFETY: buffers hold an Arc to this, so none is alive; stop then
        // destroy is DOCA's order.
        unsafe {
            sys::doca_mmap_stop(self.mmap.as_ptr());
        }
        // SAFETY: as above.
        unsafe {
            sys::doca_mmap_destroy(self.mmap.as_ptr());
        }
    }
}

/// Configuration of a local mmap before start.
#[derive(Debug)]
pub struct MmapBuilder {
    range: MemRange,
    access: Access,
    devices: Vec<Device>,
}

impl MmapBuilder {
    /// Sets the access rights.
    pub fn permissions(mut self, access: Access) -> Self {
        self.access = access;
        self
    }
    /// Adds a device.
    pub fn add_device(mut self, dev: &Device) -> Self {
        self.devices.push(dev.clone());
        self
    }
    /// Creates, configures and starts the mmap.
    pub fn start(self) -> Result<Mmap, DocaError> {
        let mut m = ptr::null_mut();
        // SAFETY: valid out-pointer; destroyed by `MmapInner::drop` (or
        // below on error, through the same drop once wrapped).
        check(unsafe { sys::doca_mmap_create(&mut m) })?;
        let m = NonNull::new(m).ok_or(DocaError::DRIVER)?;
        // SAFETY: offset + len <= region length (checked by `MemRange`).
        let base = unsafe { self.range.region.base_addr().add(self.range.offset as usize) };
        let inner = MmapInner {
            mmap: m,
            base,
            len: self.range.len,
            writable: self.access.contains(Access::LOCAL_READ_WRITE),
            imported: false,
            _mem: Some(self.range.region.clone()),
            _devs: self.devices.clone(),
        };
        // SAFETY: the range is mapped memory kept alive by `_mem`.
        check(unsafe { sys::doca_mmap_set_memrange(m.as_ptr(), base.cast(), self.range.len as usize) })?;
        // SAFETY: the mmap is created and not started.
        check(unsafe { sys::doca_mmap_set_permissions(m.as_ptr(), access_mask(self.access)) })?;
        for d in &self.devices {
            // SAFETY: the device is open (held by `_devs`).
            check(unsafe { sys::doca_mmap_add_dev(m.as_ptr(), d.inner.dev.as_ptr()) })?;
        }
        // SAFETY: fully configured.
        check(unsafe { sys::doca_mmap_start(m.as_ptr()) })?;
        Ok(Mmap { inner: Arc::new(inner) })
    }
}

/// A started local mmap.
#[derive(Debug)]
pub struct Mmap {
    pub(crate) inner: Arc<MmapInner>,
}

type ExportFn = unsafe extern "C" fn(
    *mut sys::doca_mmap,
    *const sys::doca_dev,
    *mut *const c_void,
    *mut usize,
) -> sys::doca_error_t;

impl Mmap {
    /// Begins configuring an mmap.
    pub fn builder(range: MemRange) -> MmapBuilder {
        MmapBuilder { range, access: Access::LOCAL_READ_ONLY, devices: Vec::new() }
    }
    /// Bytes covered.
    pub fn len(&self) -> u64 {
        self.inner.len
    }
    /// Never true.
    pub fn is_empty(&self) -> bool {
        self.inner.len == 0
    }

    fn export(&self, dev: &Device, f: ExportFn) -> Result<Vec<u8>, DocaError> {
        let mut p: *const c_void = ptr::null();
        let mut n = 0usize;
        // SAFETY: started mmap, open device, valid out-pointers.
        check(unsafe { f(self.inner.mmap.as_ptr(), dev.inner.dev.as_ptr(), &mut p, &mut n) })?;
        if p.is_null() {
            return Err(DocaError::DRIVER);
        }
        // SAFETY: DOCA returns `n` readable bytes owned by the mmap.
        Ok(unsafe { std::slice::from_raw_parts(p.cast::<u8>(), n) }.to_vec())
    }
    /// Exports for PCIe.
    pub fn export_pci(&self, dev: &Device) -> Result<Vec<u8>, DocaError> {
        self.export(dev, sys::doca_mmap_export_pci)
    }
    /// Exports for RDMA.
    pub fn export_rdma(&self, dev: &Device) -> Result<Vec<u8>, DocaError> {
        self.export(dev, sys::doca_mmap_export_rdma)
    }
}

/// An mmap created from an export; no byte access.
#[derive(Debug)]
pub struct RemoteMmap {
    pub(crate) inner: Arc<MmapInner>,
}

impl RemoteMmap {
    /// Imports an export blob on `dev`.
    pub fn from_export(dev: &Device, blob: &[u8]) -> Result<RemoteMmap, DocaError> {
        let mut m = ptr::null_mut();
        // SAFETY: the blob is readable for its length; out-pointer valid.
        check(unsafe {
            sys::doca_mmap_create_from_export(
                ptr::null(),
                blob.as_ptr().cast(),
                blob.len(),
                dev.inner.dev.as_ptr(),
                &mut m,
            )
        })?;
        let m = NonNull::new(m).ok_or(DocaError::DRIVER)?;
        // Owned from here: its `Drop` stops and destroys the mmap, also
        // when the range cannot be read below.
        let mut inner = MmapInner {
            mmap: m,
            base: ptr::null_mut(),
            len: 0,
            writable: true,
            imported: true,
            _mem: None,
            _devs: vec![dev.clone()],
        };
        let mut base: *mut c_void = ptr::null_mut();
        let mut len = 0usize;
        // SAFETY: a started mmap; out-pointers valid.
        check(unsafe { sys::doca_mmap_get_memrange(inner.mmap.as_ptr(), &mut base, &mut len) })?;
        inner.base = base.cast();
        inner.len = len as u64;
        Ok(RemoteMmap { inner: Arc::new(inner) })
    }
    /// Bytes covered.
    pub fn len(&self) -> u64 {
        self.inner.len
    }
    /// Never true.
    pub fn is_empty(&self) -> bool {
        self.inner.len == 0
    }
    /// Always true: DOCA does not tell an importer the exporter's
    /// permissions; the device enforces them when a task writes (a receive
    /// into a read-only import fails then, not at submission).
    pub fn is_writable(&self) -> bool {
        self.inner.writable
    }
}

#[derive(Debug)]
struct InvInner {
    inv: NonNull<sys::doca_buf_inventory>,
    capacity: u32,
    used: std::sync::atomic::AtomicU32,
}

// SAFETY: DOCA's inventory is not thread safe; every buffer taken from
// it or given back happens under [`BUFS`].
unsafe impl Send for InvInner {}
// SAFETY: as for Send.
unsafe impl Sync for InvInner {}

impl Drop for InvInner {
    fn drop(&mut self) {
        // SAFETY: buffers hold an Arc to this; none is alive.
        unsafe { sys::doca_buf_inventory_stop(self.inv.as_ptr()) };
        // SAFETY: as above.
        unsafe { sys::doca_buf_inventory_destroy(self.inv.as_ptr()) };
    }
}

/// Serializes every `doca_buf_inventory_buf_get_*` and
/// `doca_buf_dec_refcount` of this process: DOCA documents its buffers as
/// thread unsafe, its inventories have no thread-safety mode, and an mmap
/// counts the buffers pointing into it non-atomically unless made thread
/// safe; yet `BufInventory` is `Sync` and `Buf` is `Send`, so two threads
/// may take or drop buffers of one inventory, or of one mmap through two
/// inventories, at once. A leaf lock: nothing else is taken under it, and
/// the calls under it never call back.
static BUFS: Mutex<()> = Mutex::new(());

/// A fixed pool of buffer handles.
#[derive(Clone, Debug)]
pub struct BufInventory {
    inner: Arc<InvInner>,
}

impl BufInventory {
    /// Creates and starts an inventory.
    pub fn new(capacity: u32) -> Result<Self, DocaError> {
        let mut inv = ptr::null_mut();
        // SAFETY: valid out-pointer.
        check(unsafe { sys::doca_buf_inventory_create(capacity as usize, &mut inv) })?;
        let inv = NonNull::new(inv).ok_or(DocaError::DRIVER)?;
        // SAFETY: created, not started.
        if let Err(e) = check(unsafe { sys::doca_buf_inventory_start(inv.as_ptr()) }) {
            // SAFETY: created, never started, no buffer taken from it.
            unsafe { sys::doca_buf_inventory_destroy(inv.as_ptr()) };
            return Err(e);
        }
        Ok(Self { inner: Arc::new(InvInner { inv, capacity, used: 0.into() }) })
    }
    /// Buffers in use.
    pub fn in_use(&self) -> u32 {
        // Relaxed: a statistic.
        self.inner.used.load(std::sync::atomic::Ordering::Relaxed)
    }
    /// Capacity.
    pub fn capacity(&self) -> u32 {
        self.inner.capacity
    }
    fn take(&self, m: &Arc<MmapInner>, offset: u64, len: u32) -> Result<Buf, DocaError> {
        if len == 0 || offset.checked_add(u64::from(len)).is_none_or(|e| e > m.len) {
            return Err(DocaError::INVALID_VALUE);
        }
        let mut b = ptr::null_mut();
        // The range is inside the mmap (checked above). `wrapping_add`: an
        // import's base is the exporter's address, not memory of this
        // process, so `add`'s in-allocation rule cannot hold for it; the
        // address is only handed to DOCA.
        let addr = m.base.wrapping_add(offset as usize);
        let g = ctx::lock(&BUFS);
        // SAFETY: live inventory and mmap; range inside the mmap; `BUFS`
        // is held.
        let got = check(unsafe {
            sys::doca_buf_inventory_buf_get_by_addr(
                self.inner.inv.as_ptr(),
                m.mmap.as_ptr(),
                addr.cast(),
                len as usize,
                &mut b,
            )
        });
        drop(g);
        got?;
        let buf = NonNull::new(b).ok_or(DocaError::DRIVER)?;
        // Relaxed: a statistic.
        self.inner.used.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        Ok(Buf { buf, mmap: m.clone(), inv: self.inner.clone(), offset, len, data_len: 0 })
    }
    /// A buffer of a local mmap.
    pub fn buf(&self, mmap: &Mmap, offset: u64, len: u32) -> Result<Buf, DocaError> {
        self.take(&mmap.inner, offset, len)
    }
    /// A buffer of an imported mmap.
    pub fn remote_buf(&self, mmap: &RemoteMmap, offset: u64, len: u32) -> Result<Buf, DocaError> {
        self.take(&mmap.inner, offset, len)
    }
}

/// A buffer (`doca_buf`).
#[derive(Debug)]
pub struct Buf {
    buf: NonNull<sys::doca_buf>,
    mmap: Arc<MmapInner>,
    inv: Arc<InvInner>,
    offset: u64,
    len: u32,
    data_len: u32,
}

// SAFETY: a doca_buf handle is owned by exactly one `Buf`, which alone
// touches it (`&mut self`); what it shares with other buffers (its
// inventory, its mmap) changes only under `BUFS`.
unsafe impl Send for Buf {}

impl Buf {
    /// Offset in the mmap.
    pub fn offset(&self) -> u64 {
        self.offset
    }
    /// Capacity.
    pub fn len(&self) -> u32 {
        self.len
    }
    /// Never true.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }
    /// Bytes of data.
    pub fn data_len(&self) -> u32 {
        self.data_len
    }
    /// Sets the data length.
    pub fn set_data_len(&mut self, n: u32) -> Result<(), DocaError> {
        if n > self.len {
            return Err(DocaError::INVALID_VALUE);
        }
        // The data range lies inside the buffer (n <= len); `wrapping_add`
        // as in `BufInventory::take` (an import's base is foreign).
        let head = self.mmap.base.wrapping_add(self.offset as usize);
        // SAFETY: the handle is live and owned by `self`.
        check(unsafe { sys::doca_buf_set_data(self.buf.as_ptr(), head.cast(), n as usize) })?;
        self.data_len = n;
        Ok(())
    }
    /// Whether the buffer is in imported memory.
    pub fn is_remote(&self) -> bool {
        self.mmap.imported
    }
}

impl Drop for Buf {
    fn drop(&mut self) {
        let g = ctx::lock(&BUFS);
        // SAFETY: the handle is live and owned by `self`; `BUFS` is held.
        unsafe { sys::doca_buf_dec_refcount(self.buf.as_ptr(), ptr::null_mut()) };
        drop(g);
        // Relaxed: a statistic.
        self.inv.used.fetch_sub(1, std::sync::atomic::Ordering::Relaxed);
    }
}

/// Most `doca_pe_progress` calls one [`ProgressEngine::progress`] makes,
/// so a flood of completions cannot keep its caller from its own work.
const PE_BUDGET: usize = 64;

/// The engine itself, shared by its [`ProgressEngine`] and every context
/// connected to it (DOCA destroys contexts before their engine).
#[derive(Debug)]
pub(crate) struct PeInner {
    pe: NonNull<sys::doca_pe>,
    /// Serializes every DOCA call on the engine and on its contexts (see
    /// [`ctx`]): DOCA's engine and contexts are not thread safe.
    lock: Mutex<()>,
}

// SAFETY: every use of `pe`, and of the contexts connected to it, happens
// under `lock`, so the engine is never used by two threads at once.
unsafe impl Send for PeInner {}
// SAFETY: as for Send.
unsafe impl Sync for PeInner {}

impl PeInner {
    fn lock(&self) -> MutexGuard<'_, ()> {
        ctx::lock(&self.lock)
    }

    /// One `doca_pe_progress`; whether it handled something. The caller
    /// holds the lock (and no context state lock: callbacks take them).
    fn progress_locked(&self) -> bool {
        // SAFETY: the engine is live; the caller holds its lock.
        unsafe { sys::doca_pe_progress(self.pe.as_ptr()) != 0 }
    }
}

impl Drop for PeInner {
    fn drop(&mut self) {
        // SAFETY: every context holds an Arc to this, so all of them are
        // destroyed (disconnected) already.
        if let Err(e) = check(unsafe { sys::doca_pe_destroy(self.pe.as_ptr()) }) {
            log::error!("doca sdk: doca_pe_destroy: {e}");
        }
    }
}

/// The progress engine. `!Sync` as in the emulated backend: one thread
/// progresses it (the contexts lock it themselves).
#[derive(Debug)]
pub struct ProgressEngine {
    pub(crate) inner: Arc<PeInner>,
    _not_sync: std::marker::PhantomData<std::cell::Cell<()>>,
}

impl ProgressEngine {
    /// Creates a progress engine.
    pub fn new() -> Result<Self, DocaError> {
        let mut pe = ptr::null_mut();
        // SAFETY: valid out-pointer; destroyed by `PeInner::drop`.
        check(unsafe { sys::doca_pe_create(&mut pe) })?;
        let pe = NonNull::new(pe).ok_or(DocaError::DRIVER)?;
        Ok(Self { inner: Arc::new(PeInner { pe, lock: Mutex::new(()) }), _not_sync: std::marker::PhantomData })
    }

    /// Runs completions until nothing more is there (`doca_pe_progress`
    /// until it returns 0, at most [`PE_BUDGET`] times); never blocks.
    /// Returns how many calls made progress (each handled at least one
    /// completion, event or state change).
    pub fn progress(&self) -> usize {
        let _g = self.inner.lock();
        let mut n = 0;
        while n < PE_BUDGET && self.inner.progress_locked() {
            n += 1;
        }
        n
    }

    /// The notification handle (`doca_pe_get_notification_handle`): an fd
    /// to poll, readable once an armed engine has something to report.
    pub fn notification_handle(&self) -> Result<std::os::fd::BorrowedFd<'_>, DocaError> {
        let h = self.handle()?;
        // SAFETY: the handle is an open fd owned by the engine, valid while
        // it lives (the borrow is tied to `self`), and not -1.
        Ok(unsafe { std::os::fd::BorrowedFd::borrow_raw(h) })
    }

    fn handle(&self) -> Result<sys::doca_notification_handle_t, DocaError> {
        let _g = self.inner.lock();
        let mut h: sys::doca_notification_handle_t = -1;
        // SAFETY: the engine is live; valid out-pointer.
        check(unsafe { sys::doca_pe_get_notification_handle(self.inner.pe.as_ptr(), &mut h) })?;
        if h < 0 {
            return Err(DocaError::DRIVER);
        }
        Ok(h)
    }

    /// Arms the handle (`doca_pe_request_notification`).
    pub fn request_notification(&self) -> Result<(), DocaError> {
        let _g = self.inner.lock();
        // SAFETY: the engine is live; its lock is held.
        check(unsafe { sys::doca_pe_request_notification(self.inner.pe.as_ptr()) })
    }

    /// Clears the handle (`doca_pe_clear_notification`).
    pub fn clear_notification(&self) -> Result<(), DocaError> {
        let h = self.handle()?;
        let _g = self.inner.lock();
        // SAFETY: the engine is live; its lock is held; `h` is its own
        // handle.
        check(unsafe { sys::doca_pe_clear_notification(self.inner.pe.as_ptr(), h) })
    }
}

// Hand-written declarations of the part of the NVIDIA DOCA C API that DNE
// uses, for type-checking only (the `decls` feature).
//
// Contract:
// * written by hand from DOCA's public API reference for DOCA 3.0 (the
//   doxygen "DOCA Core", "DOCA RDMA" and "DOCA Comch" module pages of SDK
//   3.0.0058) and the BSD-licensed DOCA samples; nothing here is copied from
//   or generated from NVIDIA's headers;
// * every item has the shape bindgen gives it from the real headers with the
//   settings of build.rs (opaque structs with `_unused: [u8; 0]`, plain enums
//   as `c_uint` aliases with `<enum>_<VARIANT>` constants, `doca_error` as an
//   integer newtype, callbacks as `Option<unsafe extern "C" fn>`, `size_t` as
//   `usize`, the Linux branch of `#ifdef __linux__`), so code that
//   type-checks against this file type-checks against generated bindings;
// * only for `cargo check`/`cargo clippy`: there is no library behind these
//   functions, so a binary using them would not link. Nothing built with the
//   `decls` feature is ever shipped.

// ---------------------------------------------------------------- linux/types.h

/// `linux/types.h` (via `doca_types.h`): unsigned 16-bit integer.
pub type __u16 = ::std::os::raw::c_ushort;
/// `linux/types.h` (via `doca_types.h`): unsigned 32-bit integer.
pub type __u32 = ::std::os::raw::c_uint;
/// `linux/types.h` (via `doca_types.h`): unsigned 64-bit integer.
pub type __u64 = ::std::os::raw::c_ulonglong;
/// `linux/types.h` (via `doca_types.h`): big-endian 16-bit integer.
pub type __be16 = __u16;
/// `linux/types.h` (via `doca_types.h`): big-endian 32-bit integer.
pub type __be32 = __u32;
/// `linux/types.h` (via `doca_types.h`): big-endian 64-bit integer.
pub type __be64 = __u64;

// ---------------------------------------------------------------- doca_error.h

/// `doca_error.h`: return code of the DOCA API (`enum doca_error`), an
/// integer newtype so that an unknown code is not undefined behaviour.
#[repr(transparent)]
#[derive(Debug, Copy, Clone, Hash, PartialEq, Eq)]
pub struct doca_error(pub ::std::os::raw::c_uint);
impl doca_error {
    /// `doca_error.h`: success.
    pub const DOCA_SUCCESS: doca_error = doca_error(0);
    /// `doca_error.h`: unknown error.
    pub const DOCA_ERROR_UNKNOWN: doca_error = doca_error(1);
    /// `doca_error.h`: operation not permitted.
    pub const DOCA_ERROR_NOT_PERMITTED: doca_error = doca_error(2);
    /// `doca_error.h`: resource already in use.
    pub const DOCA_ERROR_IN_USE: doca_error = doca_error(3);
    /// `doca_error.h`: operation not supported.
    pub const DOCA_ERROR_NOT_SUPPORTED: doca_error = doca_error(4);
    /// `doca_error.h`: resource temporarily unavailable.
    pub const DOCA_ERROR_AGAIN: doca_error = doca_error(5);
    /// `doca_error.h`: invalid input.
    pub const DOCA_ERROR_INVALID_VALUE: doca_error = doca_error(6);
    /// `doca_error.h`: memory allocation failed.
    pub const DOCA_ERROR_NO_MEMORY: doca_error = doca_error(7);
    /// `doca_error.h`: resource initialization failed.
    pub const DOCA_ERROR_INITIALIZATION: doca_error = doca_error(8);
    /// `doca_error.h`: timed out.
    pub const DOCA_ERROR_TIME_OUT: doca_error = doca_error(9);
    /// `doca_error.h`: shut down.
    pub const DOCA_ERROR_SHUTDOWN: doca_error = doca_error(10);
    /// `doca_error.h`: connection reset by the peer.
    pub const DOCA_ERROR_CONNECTION_RESET: doca_error = doca_error(11);
    /// `doca_error.h`: connection aborted.
    pub const DOCA_ERROR_CONNECTION_ABORTED: doca_error = doca_error(12);
    /// `doca_error.h`: connection in progress.
    pub const DOCA_ERROR_CONNECTION_INPROGRESS: doca_error = doca_error(13);
    /// `doca_error.h`: not connected.
    pub const DOCA_ERROR_NOT_CONNECTED: doca_error = doca_error(14);
    /// `doca_error.h`: a required lock could not be taken.
    pub const DOCA_ERROR_NO_LOCK: doca_error = doca_error(15);
    /// `doca_error.h`: not found.
    pub const DOCA_ERROR_NOT_FOUND: doca_error = doca_error(16);
    /// `doca_error.h`: I/O failed.
    pub const DOCA_ERROR_IO_FAILED: doca_error = doca_error(17);
    /// `doca_error.h`: bad state.
    pub const DOCA_ERROR_BAD_STATE: doca_error = doca_error(18);
    /// `doca_error.h`: unsupported version.
    pub const DOCA_ERROR_UNSUPPORTED_VERSION: doca_error = doca_error(19);
    /// `doca_error.h`: an operating-system call failed.
    pub const DOCA_ERROR_OPERATING_SYSTEM: doca_error = doca_error(20);
    /// `doca_error.h`: a driver call failed.
    pub const DOCA_ERROR_DRIVER: doca_error = doca_error(21);
    /// `doca_error.h`: unexpected condition.
    pub const DOCA_ERROR_UNEXPECTED: doca_error = doca_error(22);
    /// `doca_error.h`: already exists.
    pub const DOCA_ERROR_ALREADY_EXIST: doca_error = doca_error(23);
    /// `doca_error.h`: no room left.
    pub const DOCA_ERROR_FULL: doca_error = doca_error(24);
    /// `doca_error.h`: nothing available.
    pub const DOCA_ERROR_EMPTY: doca_error = doca_error(25);
    /// `doca_error.h`: operation in progress.
    pub const DOCA_ERROR_IN_PROGRESS: doca_error = doca_error(26);
    /// `doca_error.h`: too big.
    pub const DOCA_ERROR_TOO_BIG: doca_error = doca_error(27);
    /// `doca_error.h`: authentication failed.
    pub const DOCA_ERROR_AUTHENTICATION: doca_error = doca_error(28);
    /// `doca_error.h`: invalid configuration.
    pub const DOCA_ERROR_BAD_CONFIG: doca_error = doca_error(29);
    /// `doca_error.h`: the result is valid but earlier output was dropped.
    pub const DOCA_ERROR_SKIPPED: doca_error = doca_error(30);
}
/// `doca_error.h`: `typedef enum doca_error doca_error_t`.
pub use self::doca_error as doca_error_t;

unsafe extern "C" {
    /// `doca_error.h`: the name of an error code (a static NUL-terminated string).
    pub fn doca_error_get_name(error: doca_error_t) -> *const ::std::os::raw::c_char;
    /// `doca_error.h`: the description of an error code (a static NUL-terminated string).
    pub fn doca_error_get_descr(error: doca_error_t) -> *const ::std::os::raw::c_char;
}

// ---------------------------------------------------------------- doca_types.h

/// `doca_types.h` (Linux branch): an event handle is a file descriptor.
pub type doca_event_handle_t = ::std::os::raw::c_int;
/// `doca_types.h`: the progress engine's notification handle.
pub type doca_notification_handle_t = doca_event_handle_t;
/// `doca_types.h`: length of a GID in bytes.
pub const DOCA_GID_BYTE_LENGTH: u32 = 16;

/// `doca_types.h`: user data, a pointer or a 64-bit integer.
#[repr(C)]
#[derive(Copy, Clone)]
pub union doca_data {
    /// `doca_types.h`: the data as a pointer.
    pub ptr: *mut ::std::os::raw::c_void,
    /// `doca_types.h`: the data as an integer (C field `u64`).
    pub u64_: u64,
}

/// `doca_types.h`: access permissions of a memory map (bit flags).
pub type doca_access_flag = ::std::os::raw::c_uint;
/// `doca_types.h`: local read only.
pub const doca_access_flag_DOCA_ACCESS_FLAG_LOCAL_READ_ONLY: doca_access_flag = 0;
/// `doca_types.h`: local read and write.
pub const doca_access_flag_DOCA_ACCESS_FLAG_LOCAL_READ_WRITE: doca_access_flag = 1;
/// `doca_types.h`: remote RDMA read.
pub const doca_access_flag_DOCA_ACCESS_FLAG_RDMA_READ: doca_access_flag = 2;
/// `doca_types.h`: remote RDMA write.
pub const doca_access_flag_DOCA_ACCESS_FLAG_RDMA_WRITE: doca_access_flag = 4;
/// `doca_types.h`: remote RDMA atomics.
pub const doca_access_flag_DOCA_ACCESS_FLAG_RDMA_ATOMIC: doca_access_flag = 8;
/// `doca_types.h`: read by a device on the same PCI bus.
pub const doca_access_flag_DOCA_ACCESS_FLAG_PCI_READ_ONLY: doca_access_flag = 16;
/// `doca_types.h`: read and write by a device on the same PCI bus.
pub const doca_access_flag_DOCA_ACCESS_FLAG_PCI_READ_WRITE: doca_access_flag = 32;
/// `doca_types.h`: PCI relaxed ordering.
pub const doca_access_flag_DOCA_ACCESS_FLAG_PCI_RELAXED_ORDERING: doca_access_flag = 64;

/// `doca_types.h`: PCI function type of a representor.
pub type doca_pci_func_type = ::std::os::raw::c_uint;
/// `doca_types.h`: physical function.
pub const doca_pci_func_type_DOCA_PCI_FUNC_TYPE_PF: doca_pci_func_type = 0;
/// `doca_types.h`: virtual function.
pub const doca_pci_func_type_DOCA_PCI_FUNC_TYPE_VF: doca_pci_func_type = 1;
/// `doca_types.h`: sub-function.
pub const doca_pci_func_type_DOCA_PCI_FUNC_TYPE_SF: doca_pci_func_type = 2;

/// `doca_types.h` (Linux branch): big-endian 16-bit integer.
pub type doca_be16_t = __be16;
/// `doca_types.h` (Linux branch): big-endian 32-bit integer.
pub type doca_be32_t = __be32;
/// `doca_types.h` (Linux branch): big-endian 64-bit integer.
pub type doca_be64_t = __be64;

// ---------------------------------------------------------------- doca_dev.h

/// `doca_dev.h`: information about a local device (opaque).
#[repr(C)]
#[derive(Debug, Copy, Clone)]
pub struct doca_devinfo {
    _unused: [u8; 0],
}
/// `doca_dev.h`: information about a representor device (opaque).
#[repr(C)]
#[derive(Debug, Copy, Clone)]
pub struct doca_devinfo_rep {
    _unused: [u8; 0],
}
/// `doca_dev.h`: an opened local device (opaque).
#[repr(C)]
#[derive(Debug, Copy, Clone)]
pub struct doca_dev {
    _unused: [u8; 0],
}
/// `doca_dev.h`: an opened representor device (opaque).
#[repr(C)]
#[derive(Debug, Copy, Clone)]
pub struct doca_dev_rep {
    _unused: [u8; 0],
}

/// `doca_dev.h`: buffer size for a device VUID, NUL included.
pub const DOCA_DEVINFO_VUID_SIZE: u32 = 128;
/// `doca_dev.h`: length of an IPv4 address.
pub const DOCA_DEVINFO_IPV4_ADDR_SIZE: u32 = 4;
/// `doca_dev.h`: length of an IPv6 address.
pub const DOCA_DEVINFO_IPV6_ADDR_SIZE: u32 = 16;
/// `doca_dev.h`: length of a MAC address.
pub const DOCA_DEVINFO_MAC_ADDR_SIZE: u32 = 6;
/// `doca_dev.h`: buffer size for a network interface name, NUL included.
pub const DOCA_DEVINFO_IFACE_NAME_SIZE: u32 = 256;
/// `doca_dev.h`: buffer size for an InfiniBand/RoCE device name, NUL included.
pub const DOCA_DEVINFO_IBDEV_NAME_SIZE: u32 = 64;
/// `doca_dev.h`: buffer size for a `XXXX:XX:XX.X` PCI address, NUL included.
pub const DOCA_DEVINFO_PCI_ADDR_SIZE: u32 = 13;
/// `doca_dev.h`: buffer size for a `XX:XX.X` PCI BDF, NUL included.
pub const DOCA_DEVINFO_PCI_BDF_SIZE: u32 = 8;
/// `doca_dev.h`: buffer size for a representor VUID, NUL included.
pub const DOCA_DEVINFO_REP_VUID_SIZE: u32 = 128;
/// `doca_dev.h`: buffer size for a representor's `XXXX:XX:XX.X` PCI address, NUL included.
pub const DOCA_DEVINFO_REP_PCI_ADDR_SIZE: u32 = 13;
/// `doca_dev.h`: buffer size for a representor's `XX:XX.X` PCI BDF, NUL included.
pub const DOCA_DEVINFO_REP_PCI_BDF_SIZE: u32 = 8;

/// `doca_dev.h`: representor filter (bit flags, passed as `int`).
pub type doca_devinfo_rep_filter = ::std::os::raw::c_uint;
/// `doca_dev.h`: every representor.
pub const doca_devinfo_rep_filter_DOCA_DEVINFO_REP_FILTER_ALL: doca_devinfo_rep_filter = 0;
/// `doca_dev.h`: network representors.
pub const doca_devinfo_rep_filter_DOCA_DEVINFO_REP_FILTER_NET: doca_devinfo_rep_filter = 2;
/// `doca_dev.h`: emulated representors.
pub const doca_devinfo_rep_filter_DOCA_DEVINFO_REP_FILTER_EMULATED: doca_devinfo_rep_filter = 4;

unsafe extern "C" {
    /// `doca_dev.h`: lists the local devices.
    pub fn doca_devinfo_create_list(dev_list: *mut *mut *mut doca_devinfo, nb_devs: *mut u32) -> doca_error_t;
    /// `doca_dev.h`: frees a list from `doca_devinfo_create_list`.
    pub fn doca_devinfo_destroy_list(dev_list: *mut *mut doca_devinfo) -> doca_error_t;
    /// `doca_dev.h`: lists the representors of a device.
    pub fn doca_devinfo_rep_create_list(
        dev: *mut doca_dev,
        filter: ::std::os::raw::c_int,
        dev_list_rep: *mut *mut *mut doca_devinfo_rep,
        nb_devs_rep: *mut u32,
    ) -> doca_error_t;
    /// `doca_dev.h`: frees a list from `doca_devinfo_rep_create_list`.
    pub fn doca_devinfo_rep_destroy_list(dev_list_rep: *mut *mut doca_devinfo_rep) -> doca_error_t;
    /// `doca_dev.h`: opens a local device.
    pub fn doca_dev_open(devinfo: *mut doca_devinfo, dev: *mut *mut doca_dev) -> doca_error_t;
    /// `doca_dev.h`: closes a local device.
    pub fn doca_dev_close(dev: *mut doca_dev) -> doca_error_t;
    /// `doca_dev.h`: opens a representor device.
    pub fn doca_dev_rep_open(devinfo: *mut doca_devinfo_rep, dev_rep: *mut *mut doca_dev_rep) -> doca_error_t;
    /// `doca_dev.h`: closes a representor device.
    pub fn doca_dev_rep_close(dev: *mut doca_dev_rep) -> doca_error_t;
    /// `doca_dev.h`: the information of an opened device.
    pub fn doca_dev_as_devinfo(dev: *const doca_dev) -> *mut doca_devinfo;
    /// `doca_dev.h`: the information of an opened representor.
    pub fn doca_dev_rep_as_devinfo(dev_rep: *mut doca_dev_rep) -> *mut doca_devinfo_rep;
    /// `doca_dev.h`: the PCI address; `pci_addr_str` holds `DOCA_DEVINFO_PCI_ADDR_SIZE` bytes.
    pub fn doca_devinfo_get_pci_addr_str(
        devinfo: *const doca_devinfo,
        pci_addr_str: *mut ::std::os::raw::c_char,
    ) -> doca_error_t;
    /// `doca_dev.h`: the IPv4 address (`size` at least `DOCA_DEVINFO_IPV4_ADDR_SIZE`).
    pub fn doca_devinfo_get_ipv4_addr(devinfo: *const doca_devinfo, ipv4_addr: *mut u8, size: u32) -> doca_error_t;
    /// `doca_dev.h`: the network interface name.
    pub fn doca_devinfo_get_iface_name(
        devinfo: *const doca_devinfo,
        iface_name: *mut ::std::os::raw::c_char,
        size: u32,
    ) -> doca_error_t;
    /// `doca_dev.h`: the InfiniBand/RoCE device name.
    pub fn doca_devinfo_get_ibdev_name(
        devinfo: *const doca_devinfo,
        ibdev_name: *mut ::std::os::raw::c_char,
        size: u32,
    ) -> doca_error_t;
    /// `doca_dev.h`: a representor's PCI address; `pci_addr_str` holds `DOCA_DEVINFO_REP_PCI_ADDR_SIZE` bytes.
    pub fn doca_devinfo_rep_get_pci_addr_str(
        devinfo_rep: *const doca_devinfo_rep,
        pci_addr_str: *mut ::std::os::raw::c_char,
    ) -> doca_error_t;
    /// `doca_dev.h`: a representor's PCI function type.
    pub fn doca_devinfo_rep_get_pci_func_type(
        devinfo_rep: *const doca_devinfo_rep,
        pci_func_type: *mut doca_pci_func_type,
    ) -> doca_error_t;
}

// ---------------------------------------------------------------- doca_mmap.h

/// `doca_mmap.h`: a memory map (opaque).
#[repr(C)]
#[derive(Debug, Copy, Clone)]
pub struct doca_mmap {
    _unused: [u8; 0],
}

unsafe extern "C" {
    /// `doca_mmap.h`: creates an empty memory map.
    pub fn doca_mmap_create(mmap: *mut *mut doca_mmap) -> doca_error_t;
    /// `doca_mmap.h`: destroys a memory map (stops it first).
    pub fn doca_mmap_destroy(mmap: *mut doca_mmap) -> doca_error_t;
    /// `doca_mmap.h`: starts a memory map (registers its range).
    pub fn doca_mmap_start(mmap: *mut doca_mmap) -> doca_error_t;
    /// `doca_mmap.h`: stops a memory map.
    pub fn doca_mmap_stop(mmap: *mut doca_mmap) -> doca_error_t;
    /// `doca_mmap.h`: adds a device to a memory map.
    pub fn doca_mmap_add_dev(mmap: *mut doca_mmap, dev: *mut doca_dev) -> doca_error_t;
    /// `doca_mmap.h`: exports a memory map for a device on the same PCI bus.
    pub fn doca_mmap_export_pci(
        mmap: *mut doca_mmap,
        dev: *const doca_dev,
        export_desc: *mut *const ::std::os::raw::c_void,
        export_desc_len: *mut usize,
    ) -> doca_error_t;
    /// `doca_mmap.h`: exports a memory map for RDMA.
    pub fn doca_mmap_export_rdma(
        mmap: *mut doca_mmap,
        dev: *const doca_dev,
        export_desc: *mut *const ::std::os::raw::c_void,
        export_desc_len: *mut usize,
    ) -> doca_error_t;
    /// `doca_mmap.h`: creates a memory map from an export descriptor.
    pub fn doca_mmap_create_from_export(
        user_data: *const doca_data,
        export_desc: *const ::std::os::raw::c_void,
        export_desc_len: usize,
        dev: *mut doca_dev,
        mmap: *mut *mut doca_mmap,
    ) -> doca_error_t;
    /// `doca_mmap.h`: sets the memory range of a memory map.
    pub fn doca_mmap_set_memrange(mmap: *mut doca_mmap, addr: *mut ::std::os::raw::c_void, len: usize) -> doca_error_t;
    /// `doca_mmap.h`: the memory range of a memory map.
    pub fn doca_mmap_get_memrange(
        mmap: *const doca_mmap,
        addr: *mut *mut ::std::os::raw::c_void,
        len: *mut usize,
    ) -> doca_error_t;
    /// `doca_mmap.h`: sets the maximum number of devices of a memory map.
    pub fn doca_mmap_set_max_num_devices(mmap: *mut doca_mmap, max_num_devices: u32) -> doca_error_t;
    /// `doca_mmap.h`: sets the access permissions (`doca_access_flag` bits).
    pub fn doca_mmap_set_permissions(mmap: *mut doca_mmap, access_mask: u32) -> doca_error_t;
}

// ---------------------------------------------------------------- doca_buf.h

/// `doca_buf.h`: a buffer descriptor (opaque).
#[repr(C)]
#[derive(Debug, Copy, Clone)]
pub struct doca_buf {
    _unused: [u8; 0],
}

unsafe extern "C" {
    /// `doca_buf.h`: increments the reference count; `refcount` gets the old count.
    pub fn doca_buf_inc_refcount(buf: *mut doca_buf, refcount: *mut u16) -> doca_error_t;
    /// `doca_buf.h`: decrements the reference count; `refcount` gets the old count.
    pub fn doca_buf_dec_refcount(buf: *mut doca_buf, refcount: *mut u16) -> doca_error_t;
    /// `doca_buf.h`: the length of the whole buffer.
    pub fn doca_buf_get_len(buf: *const doca_buf, len: *mut usize) -> doca_error_t;
    /// `doca_buf.h`: the start of the whole buffer.
    pub fn doca_buf_get_head(buf: *const doca_buf, head: *mut *mut ::std::os::raw::c_void) -> doca_error_t;
    /// `doca_buf.h`: the length of the data section.
    pub fn doca_buf_get_data_len(buf: *const doca_buf, data_len: *mut usize) -> doca_error_t;
    /// `doca_buf.h`: the start of the data section.
    pub fn doca_buf_get_data(buf: *const doca_buf, data: *mut *mut ::std::os::raw::c_void) -> doca_error_t;
    /// `doca_buf.h`: sets the data section.
    pub fn doca_buf_set_data(buf: *mut doca_buf, data: *mut ::std::os::raw::c_void, data_len: usize) -> doca_error_t;
    /// `doca_buf.h`: sets the data length to zero.
    pub fn doca_buf_reset_data_len(buf: *mut doca_buf) -> doca_error_t;
}

// ---------------------------------------------------------------- doca_buf_inventory.h

/// `doca_buf_inventory.h`: a pool of buffer descriptors (opaque).
#[repr(C)]
#[derive(Debug, Copy, Clone)]
pub struct doca_buf_inventory {
    _unused: [u8; 0],
}

unsafe extern "C" {
    /// `doca_buf_inventory.h`: creates an inventory of `num_elements` descriptors.
    pub fn doca_buf_inventory_create(num_elements: usize, inventory: *mut *mut doca_buf_inventory) -> doca_error_t;
    /// `doca_buf_inventory.h`: destroys an inventory.
    pub fn doca_buf_inventory_destroy(inventory: *mut doca_buf_inventory) -> doca_error_t;
    /// `doca_buf_inventory.h`: starts an inventory.
    pub fn doca_buf_inventory_start(inventory: *mut doca_buf_inventory) -> doca_error_t;
    /// `doca_buf_inventory.h`: stops an inventory.
    pub fn doca_buf_inventory_stop(inventory: *mut doca_buf_inventory) -> doca_error_t;
    /// `doca_buf_inventory.h`: takes a descriptor with an explicit buffer and data section.
    pub fn doca_buf_inventory_buf_get_by_args(
        inventory: *mut doca_buf_inventory,
        mmap: *mut doca_mmap,
        addr: *mut ::std::os::raw::c_void,
        len: usize,
        data: *mut ::std::os::raw::c_void,
        data_len: usize,
        buf: *mut *mut doca_buf,
    ) -> doca_error_t;
    /// `doca_buf_inventory.h` (`static inline`, called through bindgen's
    /// wrapper): takes a descriptor with an empty data section.
    #[link_name = "doca_buf_inventory_buf_get_by_addr__extern"]
    pub fn doca_buf_inventory_buf_get_by_addr(
        inventory: *mut doca_buf_inventory,
        mmap: *mut doca_mmap,
        addr: *mut ::std::os::raw::c_void,
        len: usize,
        buf: *mut *mut doca_buf,
    ) -> doca_error_t;
    /// `doca_buf_inventory.h` (`static inline`, called through bindgen's
    /// wrapper): takes a descriptor whose data section is the whole buffer.
    #[link_name = "doca_buf_inventory_buf_get_by_data__extern"]
    pub fn doca_buf_inventory_buf_get_by_data(
        inventory: *mut doca_buf_inventory,
        mmap: *mut doca_mmap,
        data: *mut ::std::os::raw::c_void,
        data_len: usize,
        buf: *mut *mut doca_buf,
    ) -> doca_error_t;
}

// ---------------------------------------------------------------- doca_pe.h / doca_ctx.h

/// `doca_pe.h`: a progress engine (opaque).
#[repr(C)]
#[derive(Debug, Copy, Clone)]
pub struct doca_pe {
    _unused: [u8; 0],
}
/// `doca_pe.h`: a task (opaque).
#[repr(C)]
#[derive(Debug, Copy, Clone)]
pub struct doca_task {
    _unused: [u8; 0],
}
/// `doca_ctx.h`: a context (opaque).
#[repr(C)]
#[derive(Debug, Copy, Clone)]
pub struct doca_ctx {
    _unused: [u8; 0],
}

/// `doca_ctx.h`: the state of a context.
pub type doca_ctx_states = ::std::os::raw::c_uint;
/// `doca_ctx.h`: created or stopped; can be configured.
pub const doca_ctx_states_DOCA_CTX_STATE_IDLE: doca_ctx_states = 0;
/// `doca_ctx.h`: started asynchronously, not running yet.
pub const doca_ctx_states_DOCA_CTX_STATE_STARTING: doca_ctx_states = 1;
/// `doca_ctx.h`: running; tasks can be allocated and submitted.
pub const doca_ctx_states_DOCA_CTX_STATE_RUNNING: doca_ctx_states = 2;
/// `doca_ctx.h`: stopping; in-flight tasks are being drained.
pub const doca_ctx_states_DOCA_CTX_STATE_STOPPING: doca_ctx_states = 3;

/// `doca_ctx.h`: called on every state change of a context.
pub type doca_ctx_state_changed_callback_t = ::std::option::Option<
    unsafe extern "C" fn(
        user_data: doca_data,
        ctx: *mut doca_ctx,
        prev_state: doca_ctx_states,
        next_state: doca_ctx_states,
    ),
>;

unsafe extern "C" {
    /// `doca_pe.h`: creates a progress engine.
    pub fn doca_pe_create(pe: *mut *mut doca_pe) -> doca_error_t;
    /// `doca_pe.h`: destroys a progress engine.
    pub fn doca_pe_destroy(pe: *mut doca_pe) -> doca_error_t;
    /// `doca_pe.h`: runs completions; non-zero if something was done.
    pub fn doca_pe_progress(pe: *mut doca_pe) -> u8;
    /// `doca_pe.h` (Linux only): the file descriptor to wait on.
    pub fn doca_pe_get_notification_handle(pe: *const doca_pe, handle: *mut doca_notification_handle_t)
    -> doca_error_t;
    /// `doca_pe.h`: arms the notification handle.
    pub fn doca_pe_request_notification(pe: *mut doca_pe) -> doca_error_t;
    /// `doca_pe.h`: clears a triggered notification.
    pub fn doca_pe_clear_notification(pe: *mut doca_pe, handle: doca_notification_handle_t) -> doca_error_t;
    /// `doca_pe.h`: connects a context to a progress engine.
    pub fn doca_pe_connect_ctx(pe: *mut doca_pe, ctx: *mut doca_ctx) -> doca_error_t;
    /// `doca_pe.h`: submits a task; DOCA owns it on success.
    pub fn doca_task_submit(task: *mut doca_task) -> doca_error_t;
    /// `doca_pe.h`: frees a task.
    pub fn doca_task_free(task: *mut doca_task);
    /// `doca_pe.h`: the status of a completed task.
    pub fn doca_task_get_status(task: *const doca_task) -> doca_error_t;
    /// `doca_pe.h`: sets the user data of a task.
    pub fn doca_task_set_user_data(task: *mut doca_task, user_data: doca_data);
    /// `doca_pe.h`: the user data of a task.
    pub fn doca_task_get_user_data(task: *const doca_task) -> doca_data;
    /// `doca_ctx.h`: starts a context (may return `DOCA_ERROR_IN_PROGRESS`).
    pub fn doca_ctx_start(ctx: *mut doca_ctx) -> doca_error_t;
    /// `doca_ctx.h`: stops a context (may return `DOCA_ERROR_IN_PROGRESS`).
    pub fn doca_ctx_stop(ctx: *mut doca_ctx) -> doca_error_t;
    /// `doca_ctx.h`: the number of in-flight tasks of a context.
    pub fn doca_ctx_get_num_inflight_tasks(ctx: *const doca_ctx, num_inflight_tasks: *mut usize) -> doca_error_t;
    /// `doca_ctx.h`: sets the user data passed to the state callback.
    pub fn doca_ctx_set_user_data(ctx: *mut doca_ctx, user_data: doca_data) -> doca_error_t;
    /// `doca_ctx.h`: the user data of a context.
    pub fn doca_ctx_get_user_data(ctx: *const doca_ctx, user_data: *mut doca_data) -> doca_error_t;
    /// `doca_ctx.h`: sets the state-changed callback.
    pub fn doca_ctx_set_state_changed_cb(ctx: *mut doca_ctx, cb: doca_ctx_state_changed_callback_t) -> doca_error_t;
    /// `doca_ctx.h`: the state of a context.
    pub fn doca_ctx_get_state(ctx: *const doca_ctx, state: *mut doca_ctx_states) -> doca_error_t;
}

// ---------------------------------------------------------------- doca_rdma.h

/// `doca_rdma.h`: an RDMA context (opaque).
#[repr(C)]
#[derive(Debug, Copy, Clone)]
pub struct doca_rdma {
    _unused: [u8; 0],
}
/// `doca_rdma.h`: one connection of an RDMA context (opaque).
#[repr(C)]
#[derive(Debug, Copy, Clone)]
pub struct doca_rdma_connection {
    _unused: [u8; 0],
}
/// `doca_rdma.h`: a receive task (opaque).
#[repr(C)]
#[derive(Debug, Copy, Clone)]
pub struct doca_rdma_task_receive {
    _unused: [u8; 0],
}
/// `doca_rdma.h`: a send task (opaque).
#[repr(C)]
#[derive(Debug, Copy, Clone)]
pub struct doca_rdma_task_send {
    _unused: [u8; 0],
}
/// `doca_rdma.h`: a send-with-immediate task (opaque).
#[repr(C)]
#[derive(Debug, Copy, Clone)]
pub struct doca_rdma_task_send_imm {
    _unused: [u8; 0],
}

/// `doca_rdma.h`: RDMA transport type.
pub type doca_rdma_transport_type = ::std::os::raw::c_uint;
/// `doca_rdma.h`: reliable connection.
pub const doca_rdma_transport_type_DOCA_RDMA_TRANSPORT_TYPE_RC: doca_rdma_transport_type = 0;
/// `doca_rdma.h`: dynamically connected transport.
pub const doca_rdma_transport_type_DOCA_RDMA_TRANSPORT_TYPE_DC: doca_rdma_transport_type = 1;

/// `doca_rdma.h`: what a completed receive task received.
pub type doca_rdma_opcode = ::std::os::raw::c_uint;
/// `doca_rdma.h`: a send.
pub const doca_rdma_opcode_DOCA_RDMA_OPCODE_RECV_SEND: doca_rdma_opcode = 0;
/// `doca_rdma.h`: a send with immediate data.
pub const doca_rdma_opcode_DOCA_RDMA_OPCODE_RECV_SEND_WITH_IMM: doca_rdma_opcode = 1;
/// `doca_rdma.h`: a write with immediate data.
pub const doca_rdma_opcode_DOCA_RDMA_OPCODE_RECV_WRITE_WITH_IMM: doca_rdma_opcode = 2;

/// `doca_rdma.h`: a peer asks to connect (RDMA CM).
pub type doca_rdma_connection_request_cb_t =
    ::std::option::Option<unsafe extern "C" fn(rdma_connection: *mut doca_rdma_connection, ctx_user_data: doca_data)>;
/// `doca_rdma.h`: a connection is established.
pub type doca_rdma_connection_established_cb_t = ::std::option::Option<
    unsafe extern "C" fn(
        rdma_connection: *mut doca_rdma_connection,
        connection_user_data: doca_data,
        ctx_user_data: doca_data,
    ),
>;
/// `doca_rdma.h`: a connection failed.
pub type doca_rdma_connection_failure_cb_t = ::std::option::Option<
    unsafe extern "C" fn(
        rdma_connection: *mut doca_rdma_connection,
        connection_user_data: doca_data,
        ctx_user_data: doca_data,
    ),
>;
/// `doca_rdma.h`: a connection was disconnected.
pub type doca_rdma_connection_disconnection_cb_t = ::std::option::Option<
    unsafe extern "C" fn(
        rdma_connection: *mut doca_rdma_connection,
        connection_user_data: doca_data,
        ctx_user_data: doca_data,
    ),
>;
/// `doca_rdma.h`: completion (or error) of a receive task.
pub type doca_rdma_task_receive_completion_cb_t = ::std::option::Option<
    unsafe extern "C" fn(task: *mut doca_rdma_task_receive, task_user_data: doca_data, ctx_user_data: doca_data),
>;
/// `doca_rdma.h`: completion (or error) of a send task.
pub type doca_rdma_task_send_completion_cb_t = ::std::option::Option<
    unsafe extern "C" fn(task: *mut doca_rdma_task_send, task_user_data: doca_data, ctx_user_data: doca_data),
>;
/// `doca_rdma.h`: completion (or error) of a send-with-immediate task.
pub type doca_rdma_task_send_imm_completion_cb_t = ::std::option::Option<
    unsafe extern "C" fn(task: *mut doca_rdma_task_send_imm, task_user_data: doca_data, ctx_user_data: doca_data),
>;

unsafe extern "C" {
    /// `doca_rdma.h`: creates an RDMA context on a device.
    pub fn doca_rdma_create(dev: *mut doca_dev, rdma: *mut *mut doca_rdma) -> doca_error_t;
    /// `doca_rdma.h`: destroys an RDMA context.
    pub fn doca_rdma_destroy(rdma: *mut doca_rdma) -> doca_error_t;
    /// `doca_rdma.h`: the generic context of an RDMA context.
    pub fn doca_rdma_as_ctx(rdma: *mut doca_rdma) -> *mut doca_ctx;
    /// `doca_rdma.h`: exports the connection details of a new local connection.
    pub fn doca_rdma_export(
        rdma: *mut doca_rdma,
        local_rdma_conn_details: *mut *const ::std::os::raw::c_void,
        local_rdma_conn_details_size: *mut usize,
        rdma_connection: *mut *mut doca_rdma_connection,
    ) -> doca_error_t;
    /// `doca_rdma.h`: connects a local connection to the peer's exported details.
    pub fn doca_rdma_connect(
        rdma: *mut doca_rdma,
        remote_rdma_conn_details: *const ::std::os::raw::c_void,
        remote_rdma_conn_details_size: usize,
        rdma_connection: *mut doca_rdma_connection,
    ) -> doca_error_t;
    /// `doca_rdma.h`: disconnects a connection.
    pub fn doca_rdma_connection_disconnect(rdma_connection: *mut doca_rdma_connection) -> doca_error_t;
    /// `doca_rdma.h`: sets the user data of a connection.
    pub fn doca_rdma_connection_set_user_data(
        rdma_connection: *mut doca_rdma_connection,
        connection_user_data: doca_data,
    ) -> doca_error_t;
    /// `doca_rdma.h`: the user data of a connection.
    pub fn doca_rdma_connection_get_user_data(
        rdma_connection: *const doca_rdma_connection,
        connection_user_data: *mut doca_data,
    ) -> doca_error_t;
    /// `doca_rdma.h`: the id of a connection.
    pub fn doca_rdma_connection_get_id(
        rdma_connection: *const doca_rdma_connection,
        connection_id: *mut u32,
    ) -> doca_error_t;
    /// `doca_rdma.h`: the largest send buffer list a device supports.
    pub fn doca_rdma_cap_get_max_send_buf_list_len(
        devinfo: *const doca_devinfo,
        max_send_buf_list_len: *mut u32,
    ) -> doca_error_t;
    /// `doca_rdma.h`: the largest message a device supports.
    pub fn doca_rdma_cap_get_max_message_size(devinfo: *const doca_devinfo, max_message_size: *mut u32)
    -> doca_error_t;
    /// `doca_rdma.h`: the largest receive buffer list a device supports for a transport.
    pub fn doca_rdma_cap_task_receive_get_max_dst_buf_list_len(
        devinfo: *const doca_devinfo,
        transport_type: doca_rdma_transport_type,
        max_buf_list_len: *mut u32,
    ) -> doca_error_t;
    /// `doca_rdma.h`: sets the transport type.
    pub fn doca_rdma_set_transport_type(rdma: *mut doca_rdma, transport_type: doca_rdma_transport_type)
    -> doca_error_t;
    /// `doca_rdma.h`: sets the access permissions (`doca_access_flag` bits).
    pub fn doca_rdma_set_permissions(rdma: *mut doca_rdma, permissions: u32) -> doca_error_t;
    /// `doca_rdma.h`: enables or disables the global routing header.
    pub fn doca_rdma_set_grh_enabled(rdma: *mut doca_rdma, grh_enabled: u8) -> doca_error_t;
    /// `doca_rdma.h`: sets how many times a send is retried while the peer
    /// has no receive posted (RNR); 7 is the InfiniBand value for retrying
    /// for ever.
    pub fn doca_rdma_set_rnr_retry_count(rdma: *mut doca_rdma, rnr_retry_count: u8) -> doca_error_t;
    /// `doca_rdma.h`: sets the maximum number of connections.
    pub fn doca_rdma_set_max_num_connections(rdma: *mut doca_rdma, max_num_connections: u16) -> doca_error_t;
    /// `doca_rdma.h`: sets the connection state callbacks.
    pub fn doca_rdma_set_connection_state_callbacks(
        rdma: *mut doca_rdma,
        doca_rdma_connect_request_cb: doca_rdma_connection_request_cb_t,
        doca_rdma_connect_established_cb: doca_rdma_connection_established_cb_t,
        doca_rdma_connect_failure_cb: doca_rdma_connection_failure_cb_t,
        doca_rdma_disconnect_cb: doca_rdma_connection_disconnection_cb_t,
    ) -> doca_error_t;

    /// `doca_rdma.h`: configures receive tasks.
    pub fn doca_rdma_task_receive_set_conf(
        rdma: *mut doca_rdma,
        successful_task_completion_cb: doca_rdma_task_receive_completion_cb_t,
        error_task_completion_cb: doca_rdma_task_receive_completion_cb_t,
        num_tasks: u32,
    ) -> doca_error_t;
    /// `doca_rdma.h`: sets the length of a receive task's buffer list.
    pub fn doca_rdma_task_receive_set_dst_buf_list_len(rdma: *mut doca_rdma, buf_list_len: u32) -> doca_error_t;
    /// `doca_rdma.h`: allocates a receive task.
    pub fn doca_rdma_task_receive_allocate_init(
        rdma: *mut doca_rdma,
        dst_buf: *mut doca_buf,
        user_data: doca_data,
        task: *mut *mut doca_rdma_task_receive,
    ) -> doca_error_t;
    /// `doca_rdma.h`: the generic task of a receive task.
    pub fn doca_rdma_task_receive_as_task(task: *mut doca_rdma_task_receive) -> *mut doca_task;
    /// `doca_rdma.h`: the destination buffer of a receive task.
    pub fn doca_rdma_task_receive_get_dst_buf(task: *const doca_rdma_task_receive) -> *mut doca_buf;
    /// `doca_rdma.h`: what a completed receive task received.
    pub fn doca_rdma_task_receive_get_result_opcode(task: *const doca_rdma_task_receive) -> doca_rdma_opcode;
    /// `doca_rdma.h`: the immediate data a completed receive task received.
    pub fn doca_rdma_task_receive_get_result_immediate_data(task: *const doca_rdma_task_receive) -> doca_be32_t;
    /// `doca_rdma.h`: the connection a completed receive task received on.
    pub fn doca_rdma_task_receive_get_result_rdma_connection(
        task: *const doca_rdma_task_receive,
    ) -> *const doca_rdma_connection;

    /// `doca_rdma.h`: configures send tasks.
    pub fn doca_rdma_task_send_set_conf(
        rdma: *mut doca_rdma,
        successful_task_completion_cb: doca_rdma_task_send_completion_cb_t,
        error_task_completion_cb: doca_rdma_task_send_completion_cb_t,
        num_tasks: u32,
    ) -> doca_error_t;
    /// `doca_rdma.h`: allocates a send task.
    pub fn doca_rdma_task_send_allocate_init(
        rdma: *mut doca_rdma,
        rdma_connection: *mut doca_rdma_connection,
        src_buf: *const doca_buf,
        user_data: doca_data,
        task: *mut *mut doca_rdma_task_send,
    ) -> doca_error_t;
    /// `doca_rdma.h`: the generic task of a send task.
    pub fn doca_rdma_task_send_as_task(task: *mut doca_rdma_task_send) -> *mut doca_task;
    /// `doca_rdma.h`: the source buffer of a send task.
    pub fn doca_rdma_task_send_get_src_buf(task: *const doca_rdma_task_send) -> *const doca_buf;

    /// `doca_rdma.h`: configures send-with-immediate tasks.
    pub fn doca_rdma_task_send_imm_set_conf(
        rdma: *mut doca_rdma,
        successful_task_completion_cb: doca_rdma_task_send_imm_completion_cb_t,
        error_task_completion_cb: doca_rdma_task_send_imm_completion_cb_t,
        num_tasks: u32,
    ) -> doca_error_t;
    /// `doca_rdma.h`: allocates a send-with-immediate task.
    pub fn doca_rdma_task_send_imm_allocate_init(
        rdma: *mut doca_rdma,
        rdma_connection: *mut doca_rdma_connection,
        src_buf: *const doca_buf,
        immediate_data: doca_be32_t,
        user_data: doca_data,
        task: *mut *mut doca_rdma_task_send_imm,
    ) -> doca_error_t;
    /// `doca_rdma.h`: the generic task of a send-with-immediate task.
    pub fn doca_rdma_task_send_imm_as_task(task: *mut doca_rdma_task_send_imm) -> *mut doca_task;
    /// `doca_rdma.h`: the source buffer of a send-with-immediate task.
    pub fn doca_rdma_task_send_imm_get_src_buf(task: *const doca_rdma_task_send_imm) -> *const doca_buf;
}

// ---------------------------------------------------------------- doca_comch.h

/// `doca_comch.h`: a connection between a comch server and a client (opaque).
#[repr(C)]
#[derive(Debug, Copy, Clone)]
pub struct doca_comch_connection {
    _unused: [u8; 0],
}
/// `doca_comch.h`: a comch server, on the DPU (opaque).
#[repr(C)]
#[derive(Debug, Copy, Clone)]
pub struct doca_comch_server {
    _unused: [u8; 0],
}
/// `doca_comch.h`: a comch client, on the host (opaque).
#[repr(C)]
#[derive(Debug, Copy, Clone)]
pub struct doca_comch_client {
    _unused: [u8; 0],
}
/// `doca_comch.h`: a message send task (opaque).
#[repr(C)]
#[derive(Debug, Copy, Clone)]
pub struct doca_comch_task_send {
    _unused: [u8; 0],
}
/// `doca_comch.h`: a message-received event (opaque).
#[repr(C)]
#[derive(Debug, Copy, Clone)]
pub struct doca_comch_event_msg_recv {
    _unused: [u8; 0],
}
/// `doca_comch.h`: a connection-status-changed event (opaque).
#[repr(C)]
#[derive(Debug, Copy, Clone)]
pub struct doca_comch_event_connection_status_changed {
    _unused: [u8; 0],
}

/// `doca_comch.h`: completion (or error) of a send task.
pub type doca_comch_task_send_completion_cb_t = ::std::option::Option<
    unsafe extern "C" fn(task: *mut doca_comch_task_send, task_user_data: doca_data, ctx_user_data: doca_data),
>;
/// `doca_comch.h`: a message arrived on a connection.
pub type doca_comch_event_msg_recv_cb_t = ::std::option::Option<
    unsafe extern "C" fn(
        event: *mut doca_comch_event_msg_recv,
        recv_buffer: *mut u8,
        msg_len: u32,
        comch_connection: *mut doca_comch_connection,
    ),
>;
/// `doca_comch.h`: a client connected or disconnected (server side).
pub type doca_comch_event_connection_status_changed_cb_t = ::std::option::Option<
    unsafe extern "C" fn(
        event: *mut doca_comch_event_connection_status_changed,
        comch_connection: *mut doca_comch_connection,
        change_successful: u8,
    ),
>;

unsafe extern "C" {
    /// `doca_comch.h`: sets the user data of a connection.
    pub fn doca_comch_connection_set_user_data(
        connection: *mut doca_comch_connection,
        user_data: doca_data,
    ) -> doca_error_t;
    /// `doca_comch.h`: the user data of a connection (returned by value).
    pub fn doca_comch_connection_get_user_data(connection: *const doca_comch_connection) -> doca_data;
    /// `doca_comch.h`: the server a connection belongs to (null on a client).
    pub fn doca_comch_server_get_server_ctx(connection: *const doca_comch_connection) -> *mut doca_comch_server;
    /// `doca_comch.h`: the client a connection belongs to (null on a server).
    pub fn doca_comch_client_get_client_ctx(connection: *const doca_comch_connection) -> *mut doca_comch_client;
    /// `doca_comch.h`: the largest message a device supports.
    pub fn doca_comch_cap_get_max_msg_size(devinfo: *const doca_devinfo, size: *mut u32) -> doca_error_t;
    /// `doca_comch.h`: the largest receive queue a device supports.
    pub fn doca_comch_cap_get_max_recv_queue_size(devinfo: *const doca_devinfo, size: *mut u32) -> doca_error_t;
    /// `doca_comch.h`: the largest number of send tasks a comch instance on
    /// this device can have.
    pub fn doca_comch_cap_get_max_send_tasks(devinfo: *const doca_devinfo, max_send_tasks: *mut u32) -> doca_error_t;
    /// `doca_comch.h`: the number of clients a server on this device accepts.
    pub fn doca_comch_cap_get_max_clients(devinfo: *const doca_devinfo, num_clients: *mut u32) -> doca_error_t;
    /// `doca_comch.h`: `DOCA_SUCCESS` if a server can run on this device.
    pub fn doca_comch_cap_server_is_supported(devinfo: *const doca_devinfo) -> doca_error_t;
    /// `doca_comch.h`: `DOCA_SUCCESS` if a client can run on this device.
    pub fn doca_comch_cap_client_is_supported(devinfo: *const doca_devinfo) -> doca_error_t;

    /// `doca_comch.h`: creates a server on a device for one representor.
    pub fn doca_comch_server_create(
        dev: *mut doca_dev,
        repr: *mut doca_dev_rep,
        name: *const ::std::os::raw::c_char,
        comch_server: *mut *mut doca_comch_server,
    ) -> doca_error_t;
    /// `doca_comch.h`: destroys a server.
    pub fn doca_comch_server_destroy(comch_server: *mut doca_comch_server) -> doca_error_t;
    /// `doca_comch.h`: sets a server's maximum message size.
    pub fn doca_comch_server_set_max_msg_size(comch_server: *mut doca_comch_server, size: u32) -> doca_error_t;
    /// `doca_comch.h`: sets a server's receive queue size.
    pub fn doca_comch_server_set_recv_queue_size(comch_server: *mut doca_comch_server, size: u32) -> doca_error_t;
    /// `doca_comch.h`: the generic context of a server.
    pub fn doca_comch_server_as_ctx(comch_server: *mut doca_comch_server) -> *mut doca_ctx;
    /// `doca_comch.h`: disconnects a client from a server.
    pub fn doca_comch_server_disconnect(
        comch_server: *mut doca_comch_server,
        connection: *mut doca_comch_connection,
    ) -> doca_error_t;
    /// `doca_comch.h`: configures a server's send tasks.
    pub fn doca_comch_server_task_send_set_conf(
        comch_server: *mut doca_comch_server,
        task_completion_cb: doca_comch_task_send_completion_cb_t,
        task_error_cb: doca_comch_task_send_completion_cb_t,
        num_send_tasks: u32,
    ) -> doca_error_t;
    /// `doca_comch.h`: allocates a server send task for a message to `peer`.
    pub fn doca_comch_server_task_send_alloc_init(
        comch_server: *mut doca_comch_server,
        peer: *mut doca_comch_connection,
        msg: *const ::std::os::raw::c_void,
        len: u32,
        task: *mut *mut doca_comch_task_send,
    ) -> doca_error_t;
    /// `doca_comch.h`: registers a server's message-received callback.
    pub fn doca_comch_server_event_msg_recv_register(
        comch_server: *mut doca_comch_server,
        recv_event_cb: doca_comch_event_msg_recv_cb_t,
    ) -> doca_error_t;
    /// `doca_comch.h`: registers a server's connect and disconnect callbacks.
    pub fn doca_comch_server_event_connection_status_changed_register(
        comch_server: *mut doca_comch_server,
        connect_event_cb: doca_comch_event_connection_status_changed_cb_t,
        disconnect_event_cb: doca_comch_event_connection_status_changed_cb_t,
    ) -> doca_error_t;

    /// `doca_comch.h`: creates a client on a device.
    pub fn doca_comch_client_create(
        dev: *mut doca_dev,
        name: *const ::std::os::raw::c_char,
        comch_client: *mut *mut doca_comch_client,
    ) -> doca_error_t;
    /// `doca_comch.h`: destroys a client.
    pub fn doca_comch_client_destroy(comch_client: *mut doca_comch_client) -> doca_error_t;
    /// `doca_comch.h`: sets a client's maximum message size.
    pub fn doca_comch_client_set_max_msg_size(comch_client: *mut doca_comch_client, size: u32) -> doca_error_t;
    /// `doca_comch.h`: sets a client's receive queue size.
    pub fn doca_comch_client_set_recv_queue_size(comch_client: *mut doca_comch_client, size: u32) -> doca_error_t;
    /// `doca_comch.h`: the generic context of a client.
    pub fn doca_comch_client_as_ctx(comch_client: *mut doca_comch_client) -> *mut doca_ctx;
    /// `doca_comch.h`: a client's connection to its server.
    pub fn doca_comch_client_get_connection(
        comch_client: *const doca_comch_client,
        connection: *mut *mut doca_comch_connection,
    ) -> doca_error_t;
    /// `doca_comch.h`: configures a client's send tasks.
    pub fn doca_comch_client_task_send_set_conf(
        comch_client: *mut doca_comch_client,
        task_completion_cb: doca_comch_task_send_completion_cb_t,
        task_error_cb: doca_comch_task_send_completion_cb_t,
        num_send_tasks: u32,
    ) -> doca_error_t;
    /// `doca_comch.h`: allocates a client send task for a message to `peer`.
    pub fn doca_comch_client_task_send_alloc_init(
        comch_client: *mut doca_comch_client,
        peer: *mut doca_comch_connection,
        msg: *const ::std::os::raw::c_void,
        len: u32,
        task: *mut *mut doca_comch_task_send,
    ) -> doca_error_t;
    /// `doca_comch.h`: registers a client's message-received callback.
    pub fn doca_comch_client_event_msg_recv_register(
        comch_client: *mut doca_comch_client,
        recv_event_cb: doca_comch_event_msg_recv_cb_t,
    ) -> doca_error_t;

    /// `doca_comch.h`: the generic task of a send task.
    pub fn doca_comch_task_send_as_task(task: *mut doca_comch_task_send) -> *mut doca_task;
}

// ---------------------------------------------------------------------------
// doca_comch.h (consumer events), doca_comch_consumer.h, doca_comch_producer.h:
// the comch fast path. Written from the same public API reference (the
// consumer and producer modules of DOCA 3.0).
// ---------------------------------------------------------------------------

/// `doca_comch.h`: a consumer created or expired on a connection (opaque).
#[repr(C)]
#[derive(Debug, Copy, Clone)]
pub struct doca_comch_event_consumer {
    _unused: [u8; 0],
}
/// `doca_comch_consumer.h`: a consumer (opaque).
#[repr(C)]
#[derive(Debug, Copy, Clone)]
pub struct doca_comch_consumer {
    _unused: [u8; 0],
}
/// `doca_comch_consumer.h`: a post-receive task (opaque).
#[repr(C)]
#[derive(Debug, Copy, Clone)]
pub struct doca_comch_consumer_task_post_recv {
    _unused: [u8; 0],
}
/// `doca_comch_producer.h`: a producer (opaque).
#[repr(C)]
#[derive(Debug, Copy, Clone)]
pub struct doca_comch_producer {
    _unused: [u8; 0],
}
/// `doca_comch_producer.h`: a send task (opaque).
#[repr(C)]
#[derive(Debug, Copy, Clone)]
pub struct doca_comch_producer_task_send {
    _unused: [u8; 0],
}
/// `doca_comch.h`: a consumer of the peer was created or expired (its id).
pub type doca_comch_event_consumer_cb_t = ::std::option::Option<
    unsafe extern "C" fn(event: *mut doca_comch_event_consumer, comch_connection: *mut doca_comch_connection, id: u32),
>;
/// `doca_comch_consumer.h`: a post-receive task completed (success and
/// error callbacks share the type).
pub type doca_comch_consumer_task_post_recv_completion_cb_t = ::std::option::Option<
    unsafe extern "C" fn(
        task: *mut doca_comch_consumer_task_post_recv,
        task_user_data: doca_data,
        ctx_user_data: doca_data,
    ),
>;
/// `doca_comch_producer.h`: a send task completed (success and error
/// callbacks share the type).
pub type doca_comch_producer_task_send_completion_cb_t = ::std::option::Option<
    unsafe extern "C" fn(task: *mut doca_comch_producer_task_send, task_user_data: doca_data, ctx_user_data: doca_data),
>;

unsafe extern "C" {
    /// `doca_comch.h`: registers a server's new- and expired-consumer
    /// callbacks (while idle).
    pub fn doca_comch_server_event_consumer_register(
        comch_server: *mut doca_comch_server,
        new_consumer_event_cb: doca_comch_event_consumer_cb_t,
        expired_consumer_event_cb: doca_comch_event_consumer_cb_t,
    ) -> doca_error_t;
    /// `doca_comch.h`: registers a client's new- and expired-consumer
    /// callbacks (while idle).
    pub fn doca_comch_client_event_consumer_register(
        comch_client: *mut doca_comch_client,
        new_consumer_event_cb: doca_comch_event_consumer_cb_t,
        expired_consumer_event_cb: doca_comch_event_consumer_cb_t,
    ) -> doca_error_t;

    /// `doca_comch_consumer.h`: creates a consumer on an established
    /// connection, for buffers of `buf_mmap`.
    pub fn doca_comch_consumer_create(
        comch_connection: *mut doca_comch_connection,
        buf_mmap: *mut doca_mmap,
        consumer: *mut *mut doca_comch_consumer,
    ) -> doca_error_t;
    /// `doca_comch_consumer.h`: destroys a consumer.
    pub fn doca_comch_consumer_destroy(consumer: *mut doca_comch_consumer) -> doca_error_t;
    /// `doca_comch_consumer.h`: the consumer's id, unique per connection.
    pub fn doca_comch_consumer_get_id(consumer: *const doca_comch_consumer, id: *mut u32) -> doca_error_t;
    /// `doca_comch_consumer.h`: post-receive tasks a consumer on this device
    /// may allocate.
    pub fn doca_comch_consumer_cap_get_max_num_tasks(
        devinfo: *const doca_devinfo,
        max_num_tasks: *mut u32,
    ) -> doca_error_t;
    /// `doca_comch_consumer.h`: the longest immediate a consumer on this
    /// device takes.
    pub fn doca_comch_consumer_cap_get_max_imm_data_len(
        devinfo: *const doca_devinfo,
        max_imm_data_len: *mut u32,
    ) -> doca_error_t;
    /// `doca_comch_consumer.h`: sets the immediate length the consumer
    /// takes (while idle).
    pub fn doca_comch_consumer_set_imm_data_len(consumer: *mut doca_comch_consumer, imm_data_len: u32) -> doca_error_t;
    /// `doca_comch_consumer.h`: the consumer as a generic context.
    pub fn doca_comch_consumer_as_ctx(consumer: *mut doca_comch_consumer) -> *mut doca_ctx;
    /// `doca_comch_consumer.h`: configures the post-receive tasks.
    pub fn doca_comch_consumer_task_post_recv_set_conf(
        consumer: *mut doca_comch_consumer,
        task_completion_cb: doca_comch_consumer_task_post_recv_completion_cb_t,
        task_error_cb: doca_comch_consumer_task_post_recv_completion_cb_t,
        num_post_recv_tasks: u32,
    ) -> doca_error_t;
    /// `doca_comch_consumer.h`: allocates a post-receive task for `buf`.
    pub fn doca_comch_consumer_task_post_recv_alloc_init(
        consumer: *mut doca_comch_consumer,
        buf: *mut doca_buf,
        task: *mut *mut doca_comch_consumer_task_post_recv,
    ) -> doca_error_t;
    /// `doca_comch_consumer.h`: the task's buffer.
    pub fn doca_comch_consumer_task_post_recv_get_buf(task: *mut doca_comch_consumer_task_post_recv) -> *mut doca_buf;
    /// `doca_comch_consumer.h`: the producer that filled the buffer (set on
    /// completion; 0 otherwise).
    pub fn doca_comch_consumer_task_post_recv_get_producer_id(task: *mut doca_comch_consumer_task_post_recv) -> u32;
    /// `doca_comch_consumer.h`: the immediate bytes (set on completion).
    pub fn doca_comch_consumer_task_post_recv_get_imm_data(task: *mut doca_comch_consumer_task_post_recv) -> *mut u8;
    /// `doca_comch_consumer.h`: the immediate's length (set on completion).
    pub fn doca_comch_consumer_task_post_recv_get_imm_data_len(task: *mut doca_comch_consumer_task_post_recv) -> u32;
    /// `doca_comch_consumer.h`: the generic task of a post-receive task.
    pub fn doca_comch_consumer_task_post_recv_as_task(task: *mut doca_comch_consumer_task_post_recv) -> *mut doca_task;

    /// `doca_comch_producer.h`: creates a producer on an established
    /// connection.
    pub fn doca_comch_producer_create(
        comch_connection: *mut doca_comch_connection,
        producer: *mut *mut doca_comch_producer,
    ) -> doca_error_t;
    /// `doca_comch_producer.h`: destroys a producer.
    pub fn doca_comch_producer_destroy(producer: *mut doca_comch_producer) -> doca_error_t;
    /// `doca_comch_producer.h`: the producer's id, unique per connection.
    pub fn doca_comch_producer_get_id(producer: *const doca_comch_producer, id: *mut u32) -> doca_error_t;
    /// `doca_comch_producer.h`: send tasks a producer on this device may
    /// allocate.
    pub fn doca_comch_producer_cap_get_max_num_tasks(
        devinfo: *const doca_devinfo,
        max_num_tasks: *mut u32,
    ) -> doca_error_t;
    /// `doca_comch_producer.h`: the largest buffer a producer on this
    /// device sends.
    pub fn doca_comch_producer_cap_get_max_buf_size(
        devinfo: *const doca_devinfo,
        max_buf_size: *mut u32,
    ) -> doca_error_t;
    /// `doca_comch_producer.h`: the producer as a generic context.
    pub fn doca_comch_producer_as_ctx(producer: *mut doca_comch_producer) -> *mut doca_ctx;
    /// `doca_comch_producer.h`: configures the send tasks.
    pub fn doca_comch_producer_task_send_set_conf(
        producer: *mut doca_comch_producer,
        task_completion_cb: doca_comch_producer_task_send_completion_cb_t,
        task_error_cb: doca_comch_producer_task_send_completion_cb_t,
        num_send_tasks: u32,
    ) -> doca_error_t;
    /// `doca_comch_producer.h`: allocates a send of `buf` with `imm_data`
    /// to consumer `consumer_id`.
    pub fn doca_comch_producer_task_send_alloc_init(
        producer: *mut doca_comch_producer,
        buf: *const doca_buf,
        imm_data: *mut u8,
        imm_data_len: u32,
        consumer_id: u32,
        task: *mut *mut doca_comch_producer_task_send,
    ) -> doca_error_t;
    /// `doca_comch_producer.h`: the task's buffer.
    pub fn doca_comch_producer_task_send_get_buf(task: *mut doca_comch_producer_task_send) -> *const doca_buf;
    /// `doca_comch_producer.h`: the generic task of a send task.
    pub fn doca_comch_producer_task_send_as_task(task: *mut doca_comch_producer_task_send) -> *mut doca_task;
}

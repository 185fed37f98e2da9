//! Shared-memory regions: one memfd mapping, accessed only through
//! bounds-checked volatile and atomic accessors.
//!
//! A region is created by one process (host-shimd) and mapped by others after
//! receiving its file descriptor. Any of them may write any byte at any time,
//! so this module never hands out `&T` or `&[u8]` into the mapping: plain data
//! is copied in and out with volatile accesses, shared counters are viewed as
//! atomics (which are allowed to change under a shared reference), and every
//! access is checked against the mapped length and the type's alignment first.

use core::ptr::NonNull;
use core::sync::atomic::{AtomicU32, AtomicU64};
use nix::fcntl::{FcntlArg, SealFlag, fcntl};
use nix::sys::memfd::{MFdFlags, memfd_create};
use nix::sys::mman::{MapFlags, ProtFlags, mlock, mmap, munmap};
use std::ffi::CString;
use std::num::NonZeroUsize;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use zerocopy::{FromBytes, Immutable, IntoBytes};

/// Size of the huge pages DNE uses.
pub const HUGE_PAGE: usize = 2 << 20;
const SMALL_PAGE: usize = 4096;

/// Which pages back a new region.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PagePolicy {
    /// 2 MiB hugetlb pages when the host has enough reserved and free,
    /// otherwise locked 4 KiB pages.
    Auto,
    /// 2 MiB hugetlb pages or an error.
    HugeOnly,
    /// Locked 4 KiB pages.
    Normal,
}

/// What backs a region, as chosen at creation (reported to the operator).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Backing {
    /// 2 MiB hugetlb pages (never swapped, few TLB entries).
    HugeTlb,
    /// 4 KiB pages locked in memory with `mlock`.
    Locked,
    /// 4 KiB pages that could not be locked (RLIMIT_MEMLOCK too low); they
    /// may be swapped, and RDMA registration may fail later.
    Unlocked,
}

impl core::fmt::Display for Backing {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        f.write_str(match self {
            Backing::HugeTlb => "hugetlb-2M",
            Backing::Locked => "locked-4K",
            Backing::Unlocked => "unlocked-4K",
        })
    }
}

/// A region could not be created or mapped.
#[derive(Debug, thiserror::Error)]
pub enum RegionError {
    /// Zero length, or a name with a NUL byte.
    #[error("invalid region request: {0}")]
    Invalid(&'static str),
    /// `HugeOnly` was asked for but the host has too few free huge pages.
    #[error("{need} free 2 MiB huge pages needed, {free} free (reserve more in /proc/sys/vm/nr_hugepages)")]
    NoHugePages {
        /// Pages needed.
        need: usize,
        /// Pages free.
        free: usize,
    },
    /// A region received from another process can change size: its
    /// memfd is not sealed against shrinking and growing. A process that
    /// shares it could truncate it and make every other one's next access
    /// fault (SIGBUS), so it is refused.
    #[error("the region's memfd is not sealed against resizing")]
    NotSealed,
    /// A system call failed.
    #[error("{call} failed: {err}")]
    Sys {
        /// The call.
        call: &'static str,
        /// The error.
        err: nix::Error,
    },
}

/// Seals every region carries from its creation on: its size is fixed.
const RESIZE_SEALS: SealFlag = SealFlag::F_SEAL_SHRINK.union(SealFlag::F_SEAL_GROW);

fn sys(call: &'static str) -> impl FnOnce(nix::Error) -> RegionError {
    move |err| RegionError::Sys { call, err }
}

/// An access outside the region or at a misaligned offset.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
pub enum AccessError {
    /// The range does not lie inside the mapping.
    #[error("access of {size} bytes at offset {offset} outside region of {len} bytes")]
    OutOfBounds {
        /// Offset asked for.
        offset: u64,
        /// Bytes asked for.
        size: usize,
        /// Bytes mapped.
        len: usize,
    },
    /// The offset is not aligned for the type.
    #[error("offset {offset} is not aligned to {align}")]
    Misaligned {
        /// Offset asked for.
        offset: u64,
        /// Alignment needed.
        align: usize,
    },
}

/// A shared mapping of a memfd.
#[derive(Debug)]
pub struct Region {
    base: NonNull<u8>,
    len: usize,
    fd: OwnedFd,
    backing: Backing,
}

// SAFETY: the mapping is process-wide and stays valid until `drop`; every
// access goes through volatile or atomic operations on checked ranges, which
// are sound from any thread (other processes write it concurrently anyway).
unsafe impl Send for Region {}
// SAFETY: as for `Send`: `&Region` only exposes volatile copies and atomics.
unsafe impl Sync for Region {}

/// Free 2 MiB huge pages on this host, from /proc/meminfo (0 when the host
/// has none or uses another default huge page size).
pub fn free_huge_pages() -> usize {
    let Ok(info) = std::fs::read_to_string("/proc/meminfo") else { return 0 };
    let field = |name: &str| {
        info.lines()
            .find_map(|l| l.strip_prefix(name))
            .and_then(|v| v.split_whitespace().next())
            .and_then(|v| v.parse::<usize>().ok())
    };
    match (field("HugePages_Free:"), field("Hugepagesize:")) {
        (Some(free), Some(2048)) => free,
        _ => 0,
    }
}

/// Bytes of memory this machine can give new regions now, at most:
/// `MemAvailable` and `SwapFree` (a region whose pages cannot be locked
/// may be swapped) plus the free 2 MiB huge pages (`None` when
/// `/proc/meminfo` has no `MemAvailable`). For a clear error before
/// mapping more than that: a populated mapping beyond it gets the process
/// killed by the kernel, with no message of its own.
pub fn memory_available() -> Option<u64> {
    let info = std::fs::read_to_string("/proc/meminfo").ok()?;
    let kib = |name: &str| {
        info.lines()
            .find_map(|l| l.strip_prefix(name))
            .and_then(|v| v.split_whitespace().next())
            .and_then(|v| v.parse::<u64>().ok())
    };
    Some((kib("MemAvailable:")? + kib("SwapFree:").unwrap_or(0)) * 1024 + free_huge_pages() as u64 * (2 << 20))
}

impl Region {
    /// Creates a region of at least `len` bytes (rounded up to the page
    /// size), zero-filled, populated, and locked or huge-page backed per
    /// `policy`.
    pub fn create(name: &str, len: usize, policy: PagePolicy) -> Result<Self, RegionError> {
        if len == 0 {
            return Err(RegionError::Invalid("zero length"));
        }
        let cname = CString::new(name).map_err(|_| RegionError::Invalid("name contains NUL"))?;
        let huge_need = len.div_ceil(HUGE_PAGE);
        let want_huge = match policy {
            PagePolicy::Normal => false,
            PagePolicy::Auto => free_huge_pages() >= huge_need,
            PagePolicy::HugeOnly => {
                let free = free_huge_pages();
                if free < huge_need {
                    return Err(RegionError::NoHugePages { need: huge_need, free });
                }
                true
            }
        };
        if want_huge {
            match Self::create_with(&cname, huge_need * HUGE_PAGE, true) {
                Ok(r) => return Ok(r),
                // Another process took the free pages between our look and
                // the mapping: fall back when allowed.
                Err(e) if policy == PagePolicy::HugeOnly => return Err(e),
                Err(e) => log::warn!("hugetlb region {name} failed ({e}); using 4 KiB pages"),
            }
        }
        Self::create_with(&cname, len.next_multiple_of(SMALL_PAGE), false)
    }

    fn create_with(name: &CString, len: usize, huge: bool) -> Result<Self, RegionError> {
        let mut flags = MFdFlags::MFD_CLOEXEC | MFdFlags::MFD_ALLOW_SEALING;
        if huge {
            flags |= MFdFlags::MFD_HUGETLB | MFdFlags::MFD_HUGE_2MB;
        }
        let fd = memfd_create(name.as_c_str(), flags).map_err(sys("memfd_create"))?;
        let size = i64::try_from(len).map_err(|_| RegionError::Invalid("length too large"))?;
        nix::unistd::ftruncate(&fd, size).map_err(sys("ftruncate"))?;
        // Every process it is passed to maps it whole: none may resize it
        // under the others (checked by `open`).
        fcntl(&fd, FcntlArg::F_ADD_SEALS(RESIZE_SEALS | SealFlag::F_SEAL_SEAL)).map_err(sys("fcntl(F_ADD_SEALS)"))?;
        let mut region = Self::map(fd, len, MapFlags::MAP_POPULATE)?;
        region.backing = if huge {
            Backing::HugeTlb
        } else {
            // SAFETY: `base..base+len` is the mapping just created and owned
            // by `region`; mlock only pins it.
            match unsafe { mlock(region.base.cast(), region.len) } {
                Ok(()) => Backing::Locked,
                Err(e) => {
                    log::warn!("mlock of {len} bytes failed ({e}); region is not locked, raise RLIMIT_MEMLOCK");
                    Backing::Unlocked
                }
            }
        };
        Ok(region)
    }

    /// Maps a region received from its creator (the whole file), which
    /// must be sealed against resizing ([`RegionError::NotSealed`]).
    pub fn open(fd: OwnedFd) -> Result<Self, RegionError> {
        let seals = fcntl(&fd, FcntlArg::F_GET_SEALS).map_err(sys("fcntl(F_GET_SEALS)"))?;
        if !SealFlag::from_bits_truncate(seals).contains(RESIZE_SEALS) {
            return Err(RegionError::NotSealed);
        }
        let st = nix::sys::stat::fstat(&fd).map_err(sys("fstat"))?;
        let len = usize::try_from(st.st_size).map_err(|_| RegionError::Invalid("negative size"))?;
        let huge = nix::sys::statfs::fstatfs(&fd)
            .map(|s| s.filesystem_type() == nix::sys::statfs::HUGETLBFS_MAGIC)
            .unwrap_or(false);
        let mut region = Self::map(fd, len, MapFlags::empty())?;
        region.backing = if huge { Backing::HugeTlb } else { Backing::Locked };
        Ok(region)
    }

    fn map(fd: OwnedFd, len: usize, extra: MapFlags) -> Result<Self, RegionError> {
        let nz = NonZeroUsize::new(len).ok_or(RegionError::Invalid("zero length"))?;
        // SAFETY: a fresh shared mapping chosen by the kernel (no fixed
        // address), so it aliases no Rust object; `Region` unmaps it on drop.
        let base = unsafe {
            mmap(None, nz, ProtFlags::PROT_READ | ProtFlags::PROT_WRITE, MapFlags::MAP_SHARED | extra, &fd, 0)
        }
        .map_err(sys("mmap"))?;
        Ok(Self { base: base.cast(), len, fd, backing: Backing::Unlocked })
    }

    /// Bytes mapped.
    pub fn len(&self) -> usize {
        self.len
    }

    /// Whether the region is empty (never true for a created region).
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// What backs the region.
    pub fn backing(&self) -> Backing {
        self.backing
    }

    /// The memfd, to pass to another process (SCM_RIGHTS) or export.
    pub fn fd(&self) -> BorrowedFd<'_> {
        self.fd.as_fd()
    }

    /// Address of the first byte, for registration with a NIC. Never
    /// dereference it; use the accessors.
    pub fn base_addr(&self) -> *mut u8 {
        self.base.as_ptr()
    }

    /// Checks that `size` bytes at `offset` lie inside the mapping and that
    /// `offset` is a multiple of `align`; returns the address.
    fn at(&self, offset: u64, size: usize, align: usize) -> Result<*mut u8, AccessError> {
        let oob = AccessError::OutOfBounds { offset, size, len: self.len };
        let start = usize::try_from(offset).map_err(|_| oob)?;
        let end = start.checked_add(size).ok_or(oob)?;
        if end > self.len {
            return Err(oob);
        }
        // The base is page aligned, so offset alignment is address alignment.
        if start % align != 0 {
            return Err(AccessError::Misaligned { offset, align });
        }
        // SAFETY: start + size <= len, checked above, so the result stays
        // inside the mapping.
        Ok(unsafe { self.base.as_ptr().add(start) })
    }

    /// Copies a `T` out of the region with one volatile read.
    pub fn read<T: FromBytes>(&self, offset: u64) -> Result<T, AccessError> {
        let p = self.at(offset, size_of::<T>(), align_of::<T>())?.cast::<T>();
        // SAFETY: `p` is in bounds and aligned (checked by `at`), and any bit
        // pattern is a valid `T` (`FromBytes`), whatever a peer wrote.
        Ok(unsafe { p.read_volatile() })
    }

    /// Writes a `T` into the region with one volatile write.
    pub fn write<T: IntoBytes + Immutable>(&self, offset: u64, value: T) -> Result<(), AccessError> {
        let p = self.at(offset, size_of::<T>(), align_of::<T>())?.cast::<T>();
        // SAFETY: `p` is in bounds and aligned (checked by `at`); the region
        // is plain bytes to every reader (`FromBytes` on their side).
        unsafe { p.write_volatile(value) };
        Ok(())
    }

    /// Views the `u32` at `offset` as an atomic.
    pub fn atomic_u32(&self, offset: u64) -> Result<&AtomicU32, AccessError> {
        let p = self.at(offset, 4, 4)?.cast::<AtomicU32>();
        // SAFETY: in bounds and 4-aligned (checked by `at`), valid for the
        // lifetime of `&self`; atomics may be changed by others under `&`.
        Ok(unsafe { &*p })
    }

    /// Views the `u64` at `offset` as an atomic.
    pub fn atomic_u64(&self, offset: u64) -> Result<&AtomicU64, AccessError> {
        let p = self.at(offset, 8, 8)?.cast::<AtomicU64>();
        // SAFETY: in bounds and 8-aligned (checked by `at`), valid for the
        // lifetime of `&self`; atomics may be changed by others under `&`.
        Ok(unsafe { &*p })
    }

    /// Borrows `len` bytes at `offset` as a mutable slice.
    ///
    /// # Safety
    ///
    /// For the lifetime of the slice, no other reference to these bytes may
    /// exist in this process, and no other process may write them except a
    /// peer that the caller accepts to see garbage bytes from (payload bytes
    /// of a buffer the caller owns, see `Pool::frag_mut`).
    #[allow(clippy::mut_from_ref)]
    pub unsafe fn bytes_mut(&self, offset: u64, len: usize) -> Result<&mut [u8], AccessError> {
        let p = self.at(offset, len, 1)?;
        // SAFETY: `p..p+len` is inside the mapping (checked by `at`) and
        // lives as long as `&self`; exclusivity is the caller's contract.
        Ok(unsafe { core::slice::from_raw_parts_mut(p, len) })
    }

    /// Copies `out.len()` bytes starting at `offset` out of the region.
    pub fn copy_out(&self, offset: u64, out: &mut [u8]) -> Result<(), AccessError> {
        let p = self.at(offset, out.len(), 1)?;
        // SAFETY: the source range is inside the mapping (checked by `at`)
        // and cannot overlap `out`, a Rust-owned buffer.
        unsafe { core::ptr::copy_nonoverlapping(p, out.as_mut_ptr(), out.len()) };
        Ok(())
    }

    /// Copies `data` into the region starting at `offset`.
    pub fn copy_in(&self, offset: u64, data: &[u8]) -> Result<(), AccessError> {
        let p = self.at(offset, data.len(), 1)?;
        // SAFETY: the destination range is inside the mapping (checked by
        // `at`) and cannot overlap `data`, a Rust-owned buffer.
        unsafe { core::ptr::copy_nonoverlapping(data.as_ptr(), p, data.len()) };
        Ok(())
    }
}

impl Drop for Region {
    fn drop(&mut self) {
        // SAFETY: `base..base+len` is our own mapping, and no reference into
        // it outlives `self` (accessors borrow `self`).
        if let Err(e) = unsafe { munmap(self.base.cast(), self.len) } {
            log::error!("munmap of region failed: {e}");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use core::sync::atomic::Ordering;
    use proptest::prelude::*;
    use wire::Descriptor;

    #[test]
    fn create_write_read_and_share() {
        let r = Region::create("dne-test", 10_000, PagePolicy::Normal).unwrap();
        assert_eq!(r.len(), 12_288);
        assert!(matches!(r.backing(), Backing::Locked | Backing::Unlocked));
        let d = Descriptor { tenant: 1, buf: 9, len: 77, ..Default::default() };
        r.write(64, d).unwrap();
        assert_eq!(r.read::<Descriptor>(64).unwrap(), d);
        r.atomic_u64(128).unwrap().store(42, Ordering::Relaxed);
        r.copy_in(4000, b"payload").unwrap();

        // A second mapping of the same memfd sees the same bytes.
        let other = Region::open(r.fd().try_clone_to_owned().unwrap()).unwrap();
        assert_eq!(other.len(), r.len());
        assert_eq!(other.read::<Descriptor>(64).unwrap(), d);
        assert_eq!(other.atomic_u64(128).unwrap().fetch_add(1, Ordering::Relaxed), 42);
        assert_eq!(r.atomic_u64(128).unwrap().load(Ordering::Relaxed), 43);
        let mut buf = [0u8; 7];
        other.copy_out(4000, &mut buf).unwrap();
        assert_eq!(&buf, b"payload");
    }

    /// Every process of a tenant gets its pool's and rings' memfds read-
    /// write: none may resize them under the others (a truncation made the
    /// next access of every other process, host-shimd's status scan
    /// included, die of SIGBUS), and a region that could be resized is
    /// not mapped.
    #[test]
    fn regions_cannot_be_resized_and_unsealed_ones_are_refused() {
        let r = Region::create("dne-test-seal", 8192, PagePolicy::Normal).unwrap();
        let peer = r.fd().try_clone_to_owned().unwrap();
        assert!(nix::unistd::ftruncate(&peer, 0).is_err(), "shrunk");
        assert!(nix::unistd::ftruncate(&peer, 1 << 20).is_err(), "grown");
        assert!(fcntl(&peer, FcntlArg::F_ADD_SEALS(SealFlag::F_SEAL_WRITE)).is_err(), "sealed further");
        assert_eq!(r.len(), 8192);
        assert!(Region::open(peer).is_ok());
        let plain = memfd_create(c"dne-test-unsealed", MFdFlags::MFD_CLOEXEC | MFdFlags::MFD_ALLOW_SEALING).unwrap();
        nix::unistd::ftruncate(&plain, 4096).unwrap();
        assert!(matches!(Region::open(plain), Err(RegionError::NotSealed)));
    }

    #[test]
    fn accesses_are_checked() {
        let r = Region::create("dne-test", 4096, PagePolicy::Normal).unwrap();
        assert_eq!(r.read::<u64>(4090), Err(AccessError::OutOfBounds { offset: 4090, size: 8, len: 4096 }));
        assert_eq!(r.atomic_u64(4).err(), Some(AccessError::Misaligned { offset: 4, align: 8 }));
        assert!(r.atomic_u32(u64::MAX - 1).is_err());
        assert!(r.copy_in(4095, b"ab").is_err());
        assert!(r.copy_out(4096, &mut []).is_ok());
        assert!(Region::create("dne-test", 0, PagePolicy::Normal).is_err());
        assert!(Region::create("bad\0name", 1, PagePolicy::Normal).is_err());
    }

    #[test]
    fn huge_pages_are_used_when_reserved_and_refused_when_not() {
        let free = free_huge_pages();
        let r = Region::create("dne-test-huge", 3 << 20, PagePolicy::HugeOnly);
        // qemu-user (the aarch64 test runner, which sets DNE_QEMU_USER)
        // refuses to map hugetlb memfds: mmap fails with EINVAL there. Auto
        // then falls back to 4 KiB pages, which the last assertion checks.
        let emulated = std::env::var_os("DNE_QEMU_USER").is_some();
        if emulated {
            assert!(
                matches!(r, Err(RegionError::Sys { call: "mmap", .. }) | Err(RegionError::NoHugePages { .. })),
                "{r:?}"
            );
        } else if free >= 2 {
            let r = r.unwrap();
            assert_eq!(r.backing(), Backing::HugeTlb);
            assert_eq!(r.len(), 4 << 20);
            let other = Region::open(r.fd().try_clone_to_owned().unwrap()).unwrap();
            assert_eq!(other.backing(), Backing::HugeTlb);
        } else {
            assert!(matches!(r, Err(RegionError::NoHugePages { need: 2, .. })), "{r:?}");
        }
        let free_now = free_huge_pages();
        let auto = Region::create("dne-test-auto", 3 << 20, PagePolicy::Auto).unwrap();
        assert_eq!(auto.backing() == Backing::HugeTlb, free_now >= 2 && !emulated, "{free_now} free huge pages");
    }

    proptest! {
        #[test]
        fn no_offset_escapes_the_mapping(offset in any::<u64>(), size in 0usize..10_000) {
            let r = Region::create("dne-prop", 8192, PagePolicy::Normal).unwrap();
            let mut buf = vec![0u8; size];
            let ok = r.copy_out(offset, &mut buf).is_ok();
            prop_assert_eq!(ok, offset.checked_add(size as u64).is_some_and(|e| e <= 8192));
        }
    }
}

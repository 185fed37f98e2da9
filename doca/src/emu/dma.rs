//! The emulated NIC's data mover: payload bytes go from an mmap's file to a
//! socket with `sendfile`, and from a socket into an mmap's file with
//! `splice` through a pipe, all inside the kernel. The process that
//! submitted the task never maps or copies the bytes.
//!
//! Fallback: hugetlbfs files accept neither `splice` writes nor (on some
//! kernels) `sendfile` reads. For those the emulated NIC maps the file
//! itself (a `shm::Region` private to this module, never exposed to the
//! task's owner) and copies through a bounce buffer sized once.
//!
//! Small payloads: a syscall per payload would cost more than the bytes
//! (a real NIC gathers a work request's header and payload into one
//! packet). When a send's memory is the sending process's own region,
//! [`read_mem`] copies the payload into the NIC's stream buffer so `rdma`
//! can write many frames with one call; imported memory is never read that
//! way (it still goes file to socket inside the kernel). On the receiving
//! side the NIC reads ahead into its own buffer, and [`write_mem`] places
//! buffered payload bytes: into the process's own region by copy, into any
//! other mmap (imported memory included) with `pwrite` on its file, so the
//! importer still never maps memory it imported.

use super::mem::MmapInner;
use rustix::io::Errno;
use rustix::pipe::SpliceFlags;
use std::io::{self, Read, Write};
use std::net::TcpStream;
use std::os::fd::OwnedFd;

/// Bytes moved per call (also the bounce buffer's size).
const CHUNK: usize = 64 << 10;

/// What one call moved.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Moved {
    Bytes(usize),
    WouldBlock,
    Eof,
}

fn unsupported(e: Errno) -> bool {
    e == Errno::INVAL || e == Errno::NOSYS || e == Errno::OPNOTSUPP
}

fn fallback_map(mmap: &MmapInner) -> io::Result<&shm::Region> {
    if let Some(r) = mmap.region() {
        return Ok(r);
    }
    mmap.dma_map
        .get_or_init(|| {
            let fd = mmap.fd().try_clone_to_owned().ok()?;
            shm::Region::open(fd).map_err(|e| log::warn!("emulated NIC could not map an mmap: {e}")).ok()
        })
        .as_ref()
        .ok_or_else(|| io::Error::other("emulated NIC cannot map this memory"))
}

fn bounce(b: &mut Vec<u8>) -> &mut [u8] {
    if b.is_empty() {
        b.resize(CHUNK, 0);
    }
    &mut b[..]
}

/// Copies `out.len()` bytes at `file_off` of `mmap`'s file into `out`
/// when the mmap is over the process's own region (the emulated NIC
/// reading a send's payload); `Ok(false)` for any other mmap (imported
/// memory: use [`Dma::send`]).
pub(crate) fn read_mem(mmap: &MmapInner, file_off: u64, out: &mut [u8]) -> io::Result<bool> {
    let Some(r) = mmap.region() else { return Ok(false) };
    r.copy_out(file_off, out).map_err(io::Error::other)?;
    Ok(true)
}

/// Writes `data` at `file_off` of `mmap`'s file (the emulated NIC placing
/// received bytes it holds in its own buffer): a copy into the process's
/// own region, `pwrite` for any other mmap (no mapping of imported
/// memory), the NIC's private mapping for files that refuse writes
/// (hugetlbfs).
pub(crate) fn write_mem(mmap: &MmapInner, file_off: u64, data: &[u8]) -> io::Result<()> {
    if let Some(r) = mmap.region() {
        return r.copy_in(file_off, data).map_err(io::Error::other);
    }
    let (mut off, mut rest) = (file_off, data);
    while !rest.is_empty() && !mmap.dma_slow() {
        match rustix::io::pwrite(mmap.fd(), rest, off) {
            Ok(0) => return Err(io::Error::new(io::ErrorKind::UnexpectedEof, "mmap file shorter than its range")),
            Ok(n) => {
                rest = &rest[n..];
                off += n as u64;
            }
            Err(Errno::INTR) => {}
            Err(e) if unsupported(e) => mmap.set_dma_slow(),
            Err(e) => return Err(e.into()),
        }
    }
    if rest.is_empty() {
        return Ok(());
    }
    fallback_map(mmap)?.copy_in(off, rest).map_err(io::Error::other)
}

/// A per-stream mover: a pipe for `splice`, and the fallback's bounce
/// buffer (allocated on first use only).
#[derive(Debug)]
pub(crate) struct Dma {
    pipe_r: OwnedFd,
    pipe_w: OwnedFd,
    in_pipe: usize,
    bounce: Vec<u8>,
}

impl Dma {
    pub(crate) fn new() -> io::Result<Self> {
        let (pipe_r, pipe_w) =
            rustix::pipe::pipe_with(rustix::pipe::PipeFlags::CLOEXEC | rustix::pipe::PipeFlags::NONBLOCK)?;
        Ok(Self { pipe_r, pipe_w, in_pipe: 0, bounce: Vec::new() })
    }

    /// Sends up to `len` bytes at `file_off` of `mmap` on `sock`.
    pub(crate) fn send(&mut self, sock: &TcpStream, mmap: &MmapInner, file_off: u64, len: usize) -> io::Result<Moved> {
        let len = len.min(CHUNK);
        if !mmap.dma_slow() {
            let mut off = file_off;
            match rustix::fs::sendfile(sock, mmap.fd(), Some(&mut off), len) {
                Ok(0) => return Err(io::Error::new(io::ErrorKind::UnexpectedEof, "mmap file shorter than its range")),
                Ok(n) => return Ok(Moved::Bytes(n)),
                Err(Errno::AGAIN) => return Ok(Moved::WouldBlock),
                Err(e) if unsupported(e) => mmap.set_dma_slow(),
                Err(e) => return Err(e.into()),
            }
        }
        let map = fallback_map(mmap)?;
        let b = &mut bounce(&mut self.bounce)[..len];
        map.copy_out(file_off, b).map_err(io::Error::other)?;
        match (&mut &*sock).write(b) {
            Ok(n) => Ok(Moved::Bytes(n)),
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => Ok(Moved::WouldBlock),
            Err(e) => Err(e),
        }
    }

    /// Moves up to `len` bytes from `sock` into `mmap` at `file_off`.
    /// Never reads more than `len` bytes from the socket.
    pub(crate) fn recv(&mut self, sock: &TcpStream, mmap: &MmapInner, file_off: u64, len: usize) -> io::Result<Moved> {
        if self.in_pipe > 0 {
            return self.drain_pipe(mmap, file_off);
        }
        let len = len.min(CHUNK);
        if !mmap.dma_slow() {
            let flags = SpliceFlags::NONBLOCK | SpliceFlags::MOVE;
            return match rustix::pipe::splice(sock, None, &self.pipe_w, None, len, flags) {
                Ok(0) => Ok(Moved::Eof),
                Ok(n) => {
                    self.in_pipe = n;
                    self.drain_pipe(mmap, file_off)
                }
                Err(Errno::AGAIN) => Ok(Moved::WouldBlock),
                Err(e) => Err(e.into()),
            };
        }
        let map = fallback_map(mmap)?;
        let b = &mut bounce(&mut self.bounce)[..len];
        match (&mut &*sock).read(b) {
            Ok(0) => Ok(Moved::Eof),
            Ok(n) => {
                map.copy_in(file_off, &b[..n]).map_err(io::Error::other)?;
                Ok(Moved::Bytes(n))
            }
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => Ok(Moved::WouldBlock),
            Err(e) => Err(e),
        }
    }

    fn drain_pipe(&mut self, mmap: &MmapInner, file_off: u64) -> io::Result<Moved> {
        if !mmap.dma_slow() {
            let mut off = file_off;
            match rustix::pipe::splice(&self.pipe_r, None, mmap.fd(), Some(&mut off), self.in_pipe, SpliceFlags::MOVE) {
                Ok(0) => return Err(io::Error::other("splice into the mmap file moved nothing")),
                Ok(n) => {
                    self.in_pipe -= n;
                    return Ok(Moved::Bytes(n));
                }
                Err(e) if unsupported(e) => mmap.set_dma_slow(),
                Err(e) => return Err(e.into()),
            }
        }
        let map = fallback_map(mmap)?;
        let n = self.in_pipe.min(CHUNK);
        let b = &mut bounce(&mut self.bounce)[..n];
        let got = rustix::io::read(&self.pipe_r, &mut *b)?;
        map.copy_in(file_off, &b[..got]).map_err(io::Error::other)?;
        self.in_pipe -= got;
        Ok(Moved::Bytes(got))
    }
}

//! The control connection between functions and host-shimd: a Unix
//! `SOCK_SEQPACKET` socket (message boundaries kept, peer death seen as
//! end-of-file), carrying one [`wire::CtrlFrame`] per message and file
//! descriptors (pool, ring, doorbell) as `SCM_RIGHTS`.

use rustix::net::{
    AddressFamily, RecvAncillaryBuffer, RecvAncillaryMessage, RecvFlags, ReturnFlags, SendAncillaryBuffer,
    SendAncillaryMessage, SendFlags, SocketAddrUnix, SocketFlags, SocketType,
};
use std::io::{self, IoSlice, IoSliceMut};
use std::mem::MaybeUninit;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::path::Path;
use wire::CtrlFrame;
use wire::ctrl::CTRL_MAX_FRAME;

/// A connected peer's credentials, as the kernel recorded them at
/// `connect`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PeerCred {
    /// Its process id in this process's pid namespace; 0 when that
    /// namespace cannot see it (host-shimd in a container, the peer
    /// outside it, say).
    pub pid: i32,
    /// Its user id.
    pub uid: u32,
    /// Its group id.
    pub gid: u32,
}

/// Most descriptors one message carries.
pub const MAX_FDS: usize = 4;

/// Longest host-shimd waits to send a reply (it is disconnected beyond).
/// A backstop only: host-shimd takes a client's next request only when a
/// reply to it can go at once (see `daemon`), so a client that does not
/// read its replies is not served, not waited for.
pub const SEND_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(1);

/// One end of a control connection.
#[derive(Debug)]
pub struct Conn(OwnedFd);

/// A received message: frame bytes and the descriptors that came with it.
#[derive(Debug)]
pub struct Received {
    /// Bytes of the frame, at the front of the caller's buffer.
    pub len: usize,
    /// Descriptors passed with it.
    pub fds: Vec<OwnedFd>,
}

impl Conn {
    /// Connects to host-shimd's socket.
    pub fn connect(path: &Path) -> io::Result<Self> {
        let fd = rustix::net::socket_with(AddressFamily::UNIX, SocketType::SEQPACKET, SocketFlags::CLOEXEC, None)?;
        rustix::net::connect(&fd, &SocketAddrUnix::new(path)?)?;
        Ok(Self(fd))
    }

    /// Sends one frame with `fds`.
    pub fn send(&self, frame: &CtrlFrame<'_>, fds: &[BorrowedFd<'_>]) -> io::Result<()> {
        let mut buf = [0u8; CTRL_MAX_FRAME];
        let n = frame.encode(&mut buf).map_err(|e| io::Error::new(io::ErrorKind::InvalidInput, e))?;
        let mut space = [MaybeUninit::uninit(); rustix::cmsg_space!(ScmRights(MAX_FDS))];
        let mut control = SendAncillaryBuffer::new(&mut space);
        if !fds.is_empty() && !control.push(SendAncillaryMessage::ScmRights(fds)) {
            return Err(io::Error::new(io::ErrorKind::InvalidInput, "too many descriptors"));
        }
        let sent = rustix::net::sendmsg(&self.0, &[IoSlice::new(&buf[..n])], &mut control, SendFlags::NOSIGNAL)?;
        if sent != n {
            return Err(io::Error::new(io::ErrorKind::WriteZero, "short seqpacket send"));
        }
        Ok(())
    }

    /// Receives one message into `buf`; `len == 0` means the peer closed the
    /// connection. A message or descriptor list that did not fit is an error
    /// (the descriptors that did arrive are closed).
    pub fn recv(&self, buf: &mut [u8]) -> io::Result<Received> {
        let mut space = [MaybeUninit::uninit(); rustix::cmsg_space!(ScmRights(MAX_FDS))];
        let mut control = RecvAncillaryBuffer::new(&mut space);
        let r = rustix::net::recvmsg(&self.0, &mut [IoSliceMut::new(buf)], &mut control, RecvFlags::CMSG_CLOEXEC)?;
        let mut fds = Vec::new();
        for msg in control.drain() {
            if let RecvAncillaryMessage::ScmRights(it) = msg {
                fds.extend(it);
            }
        }
        if r.flags.contains(ReturnFlags::TRUNC) || r.flags.contains(ReturnFlags::CTRUNC) {
            return Err(io::Error::new(io::ErrorKind::InvalidData, "control message truncated"));
        }
        Ok(Received { len: r.bytes, fds })
    }

    /// Credentials of the peer process (from the kernel, not from the peer).
    pub fn peer_cred(&self) -> io::Result<PeerCred> {
        // (Not rustix's `socket_peercred`: its pid is non-zero by type, and
        // a pid of 0 came back as an error.)
        let c = nix::sys::socket::getsockopt(&self.0, nix::sys::socket::sockopt::PeerCredentials)?;
        Ok(PeerCred { pid: c.pid(), uid: c.uid(), gid: c.gid() })
    }

    /// A pidfd of the peer process: it polls readable once the process
    /// has exited, and signals sent through it reach that process and no
    /// other. From `SO_PEERPIDFD` (Linux 6.5): the process that
    /// connected, whatever pid namespace it is in, with no race against
    /// the reuse of its pid. On older kernels, `pidfd_open` of the pid in
    /// [`peer_cred`](Self::peer_cred): wrong only if the peer exited and
    /// its pid was given to another process in between; and none (an
    /// error) when that pid is 0 (the peer in a pid namespace this process
    /// cannot see).
    pub fn peer_pidfd(&self) -> io::Result<OwnedFd> {
        match nix::sys::socket::getsockopt(&self.0, nix::sys::socket::sockopt::PeerPidfd) {
            Ok(fd) => Ok(fd),
            Err(nix::errno::Errno::ENOPROTOOPT) => {
                let pid = rustix::process::Pid::from_raw(self.peer_cred()?.pid).ok_or_else(|| {
                    io::Error::new(io::ErrorKind::NotFound, "the peer is in a pid namespace this process cannot see")
                })?;
                Ok(rustix::process::pidfd_open(pid, rustix::process::PidfdFlags::empty())?)
            }
            Err(e) => Err(e.into()),
        }
    }

    /// Makes a blocking [`recv`](Self::recv) give up (`WouldBlock`) after
    /// `timeout` (`None`: wait for ever).
    pub fn set_recv_timeout(&self, timeout: Option<std::time::Duration>) -> io::Result<()> {
        Ok(rustix::net::sockopt::set_socket_timeout(&self.0, rustix::net::sockopt::Timeout::Recv, timeout)?)
    }

    /// Sets or clears non-blocking mode.
    pub fn set_nonblocking(&self, on: bool) -> io::Result<()> {
        let flags = rustix::fs::fcntl_getfl(&self.0)?;
        let flags = if on { flags | rustix::fs::OFlags::NONBLOCK } else { flags - rustix::fs::OFlags::NONBLOCK };
        Ok(rustix::fs::fcntl_setfl(&self.0, flags)?)
    }
}

impl AsFd for Conn {
    fn as_fd(&self) -> BorrowedFd<'_> {
        self.0.as_fd()
    }
}

/// host-shimd's listening socket; the file is removed on drop.
#[derive(Debug)]
pub struct Listener {
    fd: OwnedFd,
    path: std::path::PathBuf,
    /// Held for as long as this listener lives: the socket file is this
    /// process's to replace and to remove.
    _lock: SocketLock,
}

/// The right to serve a socket path: `<path>.lock`, locked (`flock`) for
/// as long as this lives. Taken before anything costly (host-shimd takes
/// it before creating its pools), so a second server fails at once.
#[derive(Debug)]
pub struct SocketLock {
    _fd: OwnedFd,
}

impl SocketLock {
    /// Takes the lock of `path`; `AddrInUse` while a live process holds it.
    /// The file is opened read-only (`flock` needs no more), so a lock file
    /// left by another user (root, once) does not lock the service out.
    pub fn take(path: &Path) -> io::Result<Self> {
        let mut lock_path = path.as_os_str().to_owned();
        lock_path.push(".lock");
        let lock_path = std::path::PathBuf::from(lock_path);
        let lock = rustix::fs::open(
            &lock_path,
            rustix::fs::OFlags::CREATE | rustix::fs::OFlags::RDONLY | rustix::fs::OFlags::CLOEXEC,
            rustix::fs::Mode::from_raw_mode(0o644),
        )?;
        match rustix::fs::flock(&lock, rustix::fs::FlockOperation::NonBlockingLockExclusive) {
            Ok(()) => Ok(Self { _fd: lock }),
            Err(rustix::io::Errno::WOULDBLOCK) => Err(io::Error::new(
                io::ErrorKind::AddrInUse,
                format!("{} is served by another live process (it holds {})", path.display(), lock_path.display()),
            )),
            Err(e) => Err(e.into()),
        }
    }
}

impl Listener {
    /// Listens on `path`, replacing a stale socket file of a previous run.
    /// Fails with `AddrInUse` while another live listener holds `path`
    /// (another host-shimd of the node, or of a node sharing its runtime
    /// directory): replacing its socket would cut its functions off.
    ///
    /// The socket is bound and listening under a temporary name first and
    /// then renamed into place, so the file at `path` only ever names a
    /// socket that accepts: a client that sees it and connects at once is
    /// never refused (between `bind` and `listen` it would be).
    pub fn bind(path: &Path) -> io::Result<Self> {
        Self::bind_locked(path, SocketLock::take(path)?)
    }

    /// [`bind`](Self::bind) with the path's lock already taken.
    pub fn bind_locked(path: &Path, lock: SocketLock) -> io::Result<Self> {
        let mut tmp = path.as_os_str().to_owned();
        tmp.push(format!(".{}.tmp", std::process::id()));
        let tmp = std::path::PathBuf::from(tmp);
        let _ = std::fs::remove_file(&tmp);
        let fd = rustix::net::socket_with(
            AddressFamily::UNIX,
            SocketType::SEQPACKET,
            SocketFlags::CLOEXEC | SocketFlags::NONBLOCK,
            None,
        )?;
        rustix::net::bind(&fd, &SocketAddrUnix::new(tmp.as_path())?)?;
        let placed = rustix::net::listen(&fd, 128).map_err(io::Error::from).and_then(|()| {
            let stale = path.exists();
            std::fs::rename(&tmp, path)?;
            if stale {
                log::info!("replaced stale socket {}", path.display());
            }
            Ok(())
        });
        if let Err(e) = placed {
            let _ = std::fs::remove_file(&tmp);
            return Err(e);
        }
        Ok(Self { fd, path: path.to_owned(), _lock: lock })
    }

    /// Accepts one pending connection, `None` when there is none.
    pub fn accept(&self) -> io::Result<Option<Conn>> {
        match rustix::net::accept_with(&self.fd, SocketFlags::CLOEXEC) {
            Ok(fd) => {
                // host-shimd serves every client from one thread: no send
                // to a client may hold it for long. A send that waits
                // longer fails, and host-shimd then drops that client.
                let limit = rustix::net::sockopt::set_socket_timeout(
                    &fd,
                    rustix::net::sockopt::Timeout::Send,
                    Some(SEND_TIMEOUT),
                );
                if let Err(e) = limit {
                    log::warn!("control connection: cannot bound its send time: {e}");
                }
                Ok(Some(Conn(fd)))
            }
            Err(rustix::io::Errno::AGAIN) => Ok(None),
            Err(e) => Err(e.into()),
        }
    }
}

impl AsFd for Listener {
    fn as_fd(&self) -> BorrowedFd<'_> {
        self.fd.as_fd()
    }
}

impl Drop for Listener {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.path);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use wire::ctrl::{Ack, CtrlMsg};

    #[test]
    fn frames_and_fds_cross_the_socket() {
        let dir = std::env::temp_dir().join(format!("dne-sock-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("s.sock");
        let l = Listener::bind(&path).unwrap();
        let c = Conn::connect(&path).unwrap();
        let s = l.accept().unwrap().unwrap();
        assert_eq!(s.peer_cred().unwrap().pid, rustix::process::getpid().as_raw_nonzero().get());
        // The peer's pidfd: this process, alive (not readable).
        let pidfd = s.peer_pidfd().unwrap();
        let mut fds = [rustix::event::PollFd::new(&pidfd, rustix::event::PollFlags::IN)];
        assert_eq!(rustix::event::poll(&mut fds, Some(&rustix::event::Timespec::default())), Ok(0));
        let memfd = shm::Region::create("dne-sock-test", 4096, shm::PagePolicy::Normal).unwrap();
        memfd.copy_in(0, b"over the socket").unwrap();
        let f = CtrlFrame { seq: 7, msg: CtrlMsg::Ack(Ack { about_kind: 2, reserved: 0, about_seq: 3 }) };
        c.send(&f, &[memfd.fd()]).unwrap();
        let mut buf = [0u8; 256];
        let mut r = s.recv(&mut buf).unwrap();
        assert_eq!(CtrlFrame::decode(&buf[..r.len]).unwrap().0, f);
        let other = shm::Region::open(r.fds.pop().unwrap()).unwrap();
        let mut got = [0u8; 15];
        other.copy_out(0, &mut got).unwrap();
        assert_eq!(&got, b"over the socket");
        drop(c);
        assert_eq!(s.recv(&mut buf).unwrap().len, 0, "peer close reads as end-of-file");
        drop(l);
        assert!(!path.exists());
        std::fs::remove_dir_all(&dir).unwrap();
    }

    /// The socket file names a listening socket from the moment it exists:
    /// a client racing the bind is never refused. A stale file is replaced
    /// and no temporary name is left behind.
    #[test]
    fn the_socket_file_appears_only_once_it_accepts() {
        let dir = std::env::temp_dir().join(format!("dne-sock-race-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("s.sock");
        std::fs::write(&path, b"stale").unwrap();
        drop(Listener::bind(&path).unwrap());
        for round in 0..200 {
            let p = path.clone();
            let racer = std::thread::spawn(move || {
                while !p.exists() {
                    std::hint::spin_loop();
                }
                Conn::connect(&p)
            });
            let l = Listener::bind(&path).unwrap();
            racer.join().unwrap().unwrap_or_else(|e| panic!("round {round}: refused: {e}"));
            let mut names: Vec<_> = std::fs::read_dir(&dir).unwrap().map(|e| e.unwrap().file_name()).collect();
            names.sort();
            assert_eq!(names, ["s.sock", "s.sock.lock"].map(std::ffi::OsString::from), "round {round}");
            drop(l);
        }
        std::fs::remove_dir_all(&dir).unwrap();
    }

    /// A second listener on a path a live one serves is refused, and the
    /// live one keeps its socket file (and keeps accepting). Before, the
    /// second replaced the file as stale, and removed it when it stopped:
    /// the first, with every pool of the node, could no longer be reached.
    #[test]
    fn a_live_listener_is_not_replaced() {
        let dir = std::env::temp_dir().join(format!("dne-sock-live-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("s.sock");
        let first = Listener::bind(&path).unwrap();
        let second = Listener::bind(&path).map(|_| ()).unwrap_err();
        assert_eq!(second.kind(), io::ErrorKind::AddrInUse, "{second}");
        assert!(path.exists(), "the live listener's socket file is still there");
        Conn::connect(&path).unwrap();
        assert!(first.accept().unwrap().is_some(), "and it accepts");
        drop(first);
        // Gone: the next takes over.
        drop(Listener::bind(&path).unwrap());
        std::fs::remove_dir_all(&dir).unwrap();
    }
}

//! The emulated progress engine: every context connected to it does its
//! I/O, state transitions and completions only inside `progress()`.
//!
//! Event-driven waiting, as DOCA's notification handle, with DOCA's flow:
//! arm ([`ProgressEngine::request_notification`]), wait on the handle,
//! clear ([`ProgressEngine::clear_notification`]), progress until it
//! returns 0, arm again. Every socket an RDMA or comch context opens is
//! watched, edge-triggered, by an inner epoll instance that records what
//! happened since the last clear (also a progress that left behind what a
//! socket still holds, a full receive queue, say). The handle is a second
//! epoll instance that holds the inner one only while armed:
//! * not armed, the handle never turns readable, whatever happens;
//! * armed, it turns readable once something happened since the last clear,
//!   and arming when something already did makes it readable at once (so a
//!   completion that arrives between the last progress and the arm is not
//!   slept through);
//! * it stays readable until cleared; a clear forgets what happened and
//!   disarms (one shot): the handle stays quiet until armed again.

use crate::DocaError;
use rustix::event::epoll;
use std::cell::Cell;
use std::marker::PhantomData;
use std::mem::MaybeUninit;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, Weak};

/// A context driven by the progress engine.
pub(crate) trait Progress: Send + Sync {
    /// Does whatever can be done without blocking; returns how many events
    /// it produced.
    fn progress(&self) -> usize;
}

pub(crate) struct PeShared {
    ctxs: Mutex<Vec<Weak<dyn Progress>>>,
    /// The inner epoll instance: every context socket, edge-triggered.
    epoll: OwnedFd,
    /// The notification handle: an epoll instance holding [`Self::epoll`]
    /// while armed, nothing otherwise.
    handle: OwnedFd,
    /// An eventfd in the epoll set, written by a context that left work
    /// it could have done behind ([`PeShared::again`]).
    again: OwnedFd,
    /// Times the notification was cleared: a context that puts off looking
    /// at a socket looks in the first progress after a clear, which forgot
    /// that socket's readiness.
    clears: AtomicU64,
}

impl std::fmt::Debug for PeShared {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PeShared").finish_non_exhaustive()
    }
}

impl PeShared {
    /// Times the notification was cleared so far.
    pub(crate) fn clears(&self) -> u64 {
        self.clears.load(Ordering::Relaxed)
    }

    pub(crate) fn connect(&self, ctx: Weak<dyn Progress>) {
        crate::emu::lock(&self.ctxs).push(ctx);
    }

    /// Makes the notification handle readable: a context stopped short of
    /// what its sockets hold (a full receive queue, say). Their readiness
    /// was reported once, edge-triggered, and may have been cleared
    /// already; without this a caller would sleep with work waiting.
    pub(crate) fn again(&self) {
        if let Err(e) = rustix::io::write(&self.again, &1u64.to_ne_bytes()) {
            log::warn!("progress engine: cannot raise the notification: {e}");
        }
    }

    /// Watches a context's socket for the notification handle (until it is
    /// closed). A failure only costs wake-ups: callers also wake on their
    /// own timeouts.
    pub(crate) fn watch(&self, fd: BorrowedFd<'_>) {
        use epoll::EventFlags as F;
        let flags = F::IN | F::OUT | F::RDHUP | F::ET;
        if let Err(e) = epoll::add(&self.epoll, fd, epoll::EventData::new_u64(0), flags) {
            log::warn!("progress engine: cannot watch a socket: {e}");
        }
    }
}

/// The progress engine (`doca_pe`). It is `Send` but not `Sync`: one thread
/// owns it and calls [`progress`](Self::progress); contexts created on it
/// keep it alive.
#[derive(Debug)]
pub struct ProgressEngine {
    pub(crate) shared: Arc<PeShared>,
    _single_owner: PhantomData<Cell<()>>,
}

impl ProgressEngine {
    /// Creates a progress engine.
    pub fn new() -> Result<Self, DocaError> {
        let epoll = epoll::create(epoll::CreateFlags::CLOEXEC).map_err(|e| crate::error::os("epoll_create", e))?;
        let flags = rustix::event::EventfdFlags::CLOEXEC | rustix::event::EventfdFlags::NONBLOCK;
        let again = rustix::event::eventfd(0, flags).map_err(|e| crate::error::os("eventfd", e))?;
        // Edge-triggered: every write is an edge, so it wakes a sleeper
        // however many went unread.
        let watch = epoll::EventFlags::IN | epoll::EventFlags::ET;
        epoll::add(&epoll, &again, epoll::EventData::new_u64(0), watch)
            .map_err(|e| crate::error::os("epoll_ctl", e))?;
        let handle = epoll::create(epoll::CreateFlags::CLOEXEC).map_err(|e| crate::error::os("epoll_create", e))?;
        let shared = PeShared { ctxs: Mutex::new(Vec::new()), epoll, handle, again, clears: AtomicU64::new(0) };
        Ok(Self { shared: Arc::new(shared), _single_owner: PhantomData })
    }

    /// The notification handle (`doca_pe_get_notification_handle`): an fd
    /// to poll or add to an epoll set. It turns readable only while armed
    /// ([`request_notification`](Self::request_notification)), once
    /// something happened for a context since the last
    /// [`clear_notification`](Self::clear_notification).
    pub fn notification_handle(&self) -> Result<BorrowedFd<'_>, DocaError> {
        Ok(self.shared.handle.as_fd())
    }

    /// Arms the handle (`doca_pe_request_notification`), as DOCA requires
    /// before every wait on it: the handle turns readable once something
    /// happened since the last clear, at once if something already did.
    /// Arming an armed handle changes nothing.
    pub fn request_notification(&self) -> Result<(), DocaError> {
        // Level-triggered: readable while the inner set has something.
        let flags = epoll::EventFlags::IN;
        match epoll::add(&self.shared.handle, &self.shared.epoll, epoll::EventData::new_u64(0), flags) {
            Ok(()) | Err(rustix::io::Errno::EXIST) => Ok(()),
            Err(e) => Err(crate::error::os("epoll_ctl", e)),
        }
    }

    /// Clears the handle (`doca_pe_clear_notification`): forgets what it
    /// reported so far and disarms it. Then progress until nothing is
    /// left, and arm again before sleeping on it.
    pub fn clear_notification(&self) -> Result<(), DocaError> {
        match epoll::delete(&self.shared.handle, &self.shared.epoll) {
            Ok(()) | Err(rustix::io::Errno::NOENT) => {}
            Err(e) => return Err(crate::error::os("epoll_ctl", e)),
        }
        // The owning thread's next progress sees it (contexts are
        // progressed by the engine's one owner, after this returns).
        self.shared.clears.fetch_add(1, Ordering::Relaxed);
        let mut count = [0u8; 8];
        let _ = rustix::io::read(&self.shared.again, &mut count);
        let zero = rustix::event::Timespec { tv_sec: 0, tv_nsec: 0 };
        const N: usize = 32;
        let mut buf = [MaybeUninit::<epoll::Event>::uninit(); N];
        loop {
            match epoll::wait(&self.shared.epoll, &mut buf, Some(&zero)) {
                Ok((got, _)) if got.len() == N => continue,
                Ok(_) | Err(rustix::io::Errno::INTR) => return Ok(()),
                Err(e) => return Err(crate::error::os("epoll_wait", e)),
            }
        }
    }

    /// Runs every connected context once; never blocks. Returns the number
    /// of events produced (completions, connection and state changes).
    pub fn progress(&self) -> usize {
        let mut ctxs = crate::emu::lock(&self.shared.ctxs);
        let mut n = 0;
        ctxs.retain(|w| match w.upgrade() {
            Some(c) => {
                n += c.progress();
                true
            }
            None => false,
        });
        n
    }
}

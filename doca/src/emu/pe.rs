//! The emulated progress engine: every context connected to it does its
//! I/O, state transitions and completions only inside `progress()`.

use crate::DocaError;
use std::cell::Cell;
use std::marker::PhantomData;
use std::sync::{Arc, Mutex, Weak};

/// A context driven by the progress engine.
pub(crate) trait Progress: Send + Sync {
    /// Does whatever can be done without blocking; returns how many events
    /// it produced.
    fn progress(&self) -> usize;
}

#[derive(Default)]
pub(crate) struct PeShared {
    ctxs: Mutex<Vec<Weak<dyn Progress>>>,
}

impl std::fmt::Debug for PeShared {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PeShared").finish_non_exhaustive()
    }
}

impl PeShared {
    pub(crate) fn connect(&self, ctx: Weak<dyn Progress>) {
        crate::emu::lock(&self.ctxs).push(ctx);
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
        Ok(Self { shared: Arc::new(PeShared::default()), _single_owner: PhantomData })
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

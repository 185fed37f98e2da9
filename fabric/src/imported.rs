//! [`ImportedPool`]: a tenant pool another process exported to this one
//! (the host's pool on the DPU: a DOCA mmap PCI export), as a [`crate::Port`]
//! uses it without ever reading or writing its bytes.
//!
//! The pool's chain links and owner table live in the exporter's memory,
//! which the importer cannot read. So the importer keeps its own mirror of
//! the links of the chains it holds: the exporter names every buffer of a
//! message when it hands the message over ([`adopt`](ImportedPool::adopt)),
//! and received fragments are linked here ([`join`](ImportedPool::join))
//! and reported back by index. Fabric headers are written and read by the
//! exporter, which can touch the memory.

use shm::pool::Lease;
use std::sync::atomic::{AtomicU32, Ordering::Relaxed};
use wire::segment::{NIL, Owner, PoolLayout};
use wire::{PoolGeometry, desc::frags_for};

/// An imported tenant pool: its geometry, its export blob, and the chain
/// links of the messages this process holds (see the module docs).
#[derive(Debug)]
pub struct ImportedPool {
    layout: PoolLayout,
    blob: Vec<u8>,
    /// Chain links of held buffers (only the holder's thread touches
    /// them; atomics make the pool shareable between threads).
    next: Vec<AtomicU32>,
}

impl ImportedPool {
    /// The pool of `geometry` exported as `blob`.
    pub fn new(geometry: PoolGeometry, blob: Vec<u8>) -> Self {
        let next = (0..geometry.buf_count()).map(|_| AtomicU32::new(NIL)).collect();
        Self { layout: PoolLayout::new(geometry), blob, next }
    }

    /// The pool's geometry.
    pub fn geometry(&self) -> PoolGeometry {
        self.layout.geometry
    }

    /// The export blob (registered with the fabric as [`crate::Memory::Export`]).
    pub fn blob(&self) -> &[u8] {
        &self.blob
    }

    /// Offset of buffer `index` in the exported memory.
    pub fn buf_offset(&self, index: u32) -> Option<u64> {
        self.layout.buf_offset(index)
    }

    /// Takes over a message the exporter handed over as the buffer indices
    /// `chain` (in order) carrying `len` payload bytes: checks that the
    /// count fits `len` and every index is in the pool, records the links.
    /// `None` (nothing recorded) when the indices do not describe such a
    /// chain.
    pub fn adopt(&self, chain: impl Iterator<Item = u32> + Clone, len: u32, holder: Owner) -> Option<Lease> {
        let g = self.layout.geometry;
        let want = frags_for(len, g.payload_cap());
        let mut n = 0u32;
        for i in chain.clone() {
            n += 1;
            if i >= g.buf_count() || n > want {
                return None;
            }
        }
        let head = chain.clone().next().filter(|_| n == want && want <= g.max_chain())?;
        let mut prev: Option<u32> = None;
        for i in chain {
            if let Some(p) = prev {
                self.next[p as usize].store(i, Relaxed);
            }
            prev = Some(i);
        }
        if let Some(p) = prev {
            self.next[p as usize].store(NIL, Relaxed);
        }
        Some(Lease::by_index(head, len, n, holder))
    }

    /// One whole buffer the exporter lent (for a receive).
    pub fn lent(&self, index: u32, holder: Owner) -> Option<Lease> {
        let g = self.layout.geometry;
        (index < g.buf_count()).then(|| {
            self.next[index as usize].store(NIL, Relaxed);
            Lease::by_index(index, g.payload_cap(), 1, holder)
        })
    }

    /// The buffer indices of a chain this process holds, in order.
    pub fn chain<'a>(&'a self, lease: &Lease) -> impl Iterator<Item = u32> + 'a {
        let mut at = lease.head();
        let mut left = lease.frags();
        std::iter::from_fn(move || {
            if left == 0 || at as usize >= self.next.len() {
                return None;
            }
            left -= 1;
            let i = at;
            at = self.next[i as usize].load(Relaxed);
            Some(i)
        })
    }

    /// Links one-buffer leases, in order, into one chain of `len` payload
    /// bytes. `parts` is drained on success and untouched on failure (the
    /// count does not fit `len`, or `len` is beyond the pool's `max_chain`).
    pub fn join(&self, parts: &mut Vec<Lease>, len: u32) -> Option<Lease> {
        let g = self.layout.geometry;
        let first = parts.first().map(|l| (l.head(), l.holder()))?;
        let ok = parts.iter().all(|l| l.frags() == 1 && l.holder() == first.1 && l.head() < g.buf_count());
        if !ok || u64::from(len) > g.max_len() || frags_for(len, g.payload_cap()) as usize != parts.len() {
            return None;
        }
        for w in parts.windows(2) {
            self.next[w[0].head() as usize].store(w[1].head(), Relaxed);
        }
        if let Some(last) = parts.last() {
            self.next[last.head() as usize].store(NIL, Relaxed);
        }
        let frags = parts.len() as u32;
        parts.clear();
        Some(Lease::by_index(first.0, len, frags, first.1))
    }

    /// Splits a chain this process holds into its buffers, one lease each
    /// (to keep as receive buffers or give back).
    pub fn split(&self, lease: Lease, out: &mut impl FnMut(Lease)) {
        let cap = self.layout.geometry.payload_cap();
        let holder = lease.holder();
        let mut at = lease.head();
        for _ in 0..lease.frags() {
            let Some(next) = self.next.get(at as usize) else { break };
            let following = next.swap(NIL, Relaxed);
            out(Lease::by_index(at, cap, 1, holder));
            at = following;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pool() -> ImportedPool {
        // 8 buffers of 1 KiB (960 payload bytes each), chains up to 4.
        ImportedPool::new(PoolGeometry::new(0, 1024, 8, 64, 4).unwrap(), vec![1, 2, 3])
    }

    #[test]
    fn adopted_chains_are_walked_in_the_exporters_order() {
        let p = pool();
        let l = p.adopt([5u32, 2, 7].into_iter(), 2000, Owner::Agent).expect("three buffers carry 2000 bytes");
        assert_eq!((l.head(), l.len(), l.frags()), (5, 2000, 3));
        assert_eq!(p.chain(&l).collect::<Vec<_>>(), [5, 2, 7]);
        assert_eq!(p.buf_offset(2), Some(p.buf_offset(0).unwrap() + 2048));
        assert_eq!(p.buf_offset(8), None);
        let mut singles = Vec::new();
        p.split(l, &mut |s| singles.push((s.head(), s.frags())));
        assert_eq!(singles, [(5, 1), (2, 1), (7, 1)]);
    }

    #[test]
    fn chains_that_do_not_fit_their_length_or_the_pool_are_refused() {
        let p = pool();
        assert!(p.adopt([1u32, 2].into_iter(), 2000, Owner::Agent).is_none(), "too few buffers");
        assert!(p.adopt([1u32, 2, 3, 4].into_iter(), 2000, Owner::Agent).is_none(), "too many");
        assert!(p.adopt([1u32, 8, 3].into_iter(), 2000, Owner::Agent).is_none(), "index out of the pool");
        assert!(p.adopt(std::iter::empty(), 0, Owner::Agent).is_none(), "no buffer at all");
        assert!(p.adopt([0u32; 5].into_iter(), 4 * 960 + 1, Owner::Agent).is_none(), "longer than max_chain");
        assert!(p.lent(8, Owner::Agent).is_none());
    }

    #[test]
    fn received_fragments_join_into_one_chain() {
        let p = pool();
        let mut parts: Vec<Lease> = [3u32, 0, 6].iter().map(|&i| p.lent(i, Owner::Agent).unwrap()).collect();
        assert!(p.join(&mut parts, 960).is_none(), "three buffers are not a 960-byte message");
        assert_eq!(parts.len(), 3, "untouched on failure");
        let l = p.join(&mut parts, 1921).unwrap();
        assert!(parts.is_empty());
        assert_eq!(p.chain(&l).collect::<Vec<_>>(), [3, 0, 6]);
        assert_eq!((l.len(), l.frags()), (1921, 3));
    }

    #[test]
    fn received_fragments_beyond_max_chain_are_not_joined() {
        let p = pool();
        let mut parts: Vec<Lease> = [3u32, 0, 6, 1, 2].iter().map(|&i| p.lent(i, Owner::Agent).unwrap()).collect();
        assert!(p.join(&mut parts, 4 * 960 + 1).is_none(), "five buffers, max_chain 4");
        assert_eq!(parts.len(), 5, "untouched");
        parts.pop();
        assert!(p.join(&mut parts, 4 * 960).is_some());
    }
}

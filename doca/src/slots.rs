//! A fixed table of what tasks in flight hold (the SDK backend's task
//! user data is a slot of it). Kept out of the `sdk` module so that its
//! tests run in every build.
#![cfg_attr(not(feature = "sdk"), allow(dead_code))]

/// A fixed table of what tasks in flight hold (their buffers, tags): the
/// task's user data is its slot. Sized when the context is created, so a
/// submission never allocates.
#[derive(Debug)]
pub(crate) struct Slots<T> {
    items: Vec<Option<T>>,
    free: Vec<u32>,
}

impl<T> Slots<T> {
    pub(crate) fn new(n: u32) -> Self {
        Self { items: (0..n).map(|_| None).collect(), free: (0..n).rev().collect() }
    }

    /// Stores `v`, or gives it back when every slot is taken.
    pub(crate) fn put(&mut self, v: T) -> Result<u32, T> {
        match self.free.pop() {
            Some(i) => {
                self.items[i as usize] = Some(v);
                Ok(i)
            }
            None => Err(v),
        }
    }

    /// Slot `i`'s value, left in place (a fixed table: it does not move
    /// while the slot is taken).
    #[cfg_attr(not(feature = "sdk"), allow(dead_code))]
    pub(crate) fn get_mut(&mut self, i: u32) -> Option<&mut T> {
        self.items.get_mut(i as usize)?.as_mut()
    }

    /// Takes what slot `i` holds (`None` for a slot out of range or empty:
    /// a task this table never issued).
    pub(crate) fn take(&mut self, i: u64) -> Option<T> {
        let i = u32::try_from(i).ok()?;
        let v = self.items.get_mut(i as usize)?.take()?;
        self.free.push(i);
        Some(v)
    }
}

#[cfg(test)]
mod tests {
    use super::Slots;

    #[test]
    fn slots_are_fixed_and_reused() {
        let mut s = Slots::new(2);
        let a = s.put("a").unwrap();
        let b = s.put("b").unwrap();
        assert_eq!(s.put("c"), Err("c"));
        assert_eq!(s.take(u64::from(a)), Some("a"));
        assert_eq!(s.take(u64::from(a)), None);
        assert_eq!(s.take(99), None);
        assert_eq!(s.take(u64::MAX), None);
        assert_eq!(s.put("d"), Ok(a));
        assert_eq!(s.get_mut(b).copied(), Some("b"));
        assert_eq!(s.take(u64::from(b)), Some("b"));
        assert_eq!(s.get_mut(b), None);
    }
}

//! How noisy the machine is right now: a probe for CPU stalls.
//!
//! On a shared VM a vCPU is sometimes not running at all for a few
//! milliseconds (the host runs something else), and a kernel thread may
//! take a CPU for as long. A benchmark whose latencies are a few
//! milliseconds feels every such stall in its tail, so the suites that
//! report tails also report what this probe saw.
//!
//! The probe pins one thread to each CPU this process may use and has each
//! read the monotonic clock in a tight loop for a while. Between two
//! reads of a thread that never blocks, a gap longer than [`STALL`] is time
//! its CPU ran something else or nothing: a stall. Run it while the
//! machine is otherwise idle (between measurements); it then measures the
//! machine, not the benchmark.

use crate::harness::{Report, pin_to};
use anyhow::{Context, Result};
use std::time::{Duration, Instant};

/// The shortest gap between two clock reads counted as a stall.
pub const STALL: Duration = Duration::from_micros(500);

/// What one probe saw, summed over its CPUs.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct Stalls {
    /// CPU-seconds probed (wall time times CPUs).
    pub cpu_secs: f64,
    /// Gaps longer than [`STALL`].
    pub count: u64,
    /// Their total length.
    pub lost: Duration,
    /// The longest.
    pub largest: Duration,
}

impl Stalls {
    /// Stalls per CPU-second.
    pub fn per_cpu_sec(&self) -> f64 {
        if self.cpu_secs > 0.0 { self.count as f64 / self.cpu_secs } else { 0.0 }
    }

    /// Percent of the probed CPU time lost to stalls.
    pub fn lost_pct(&self) -> f64 {
        if self.cpu_secs > 0.0 { 100.0 * self.lost.as_secs_f64() / self.cpu_secs } else { 0.0 }
    }

    /// The longest stall in milliseconds.
    pub fn largest_ms(&self) -> f64 {
        self.largest.as_secs_f64() * 1e3
    }

    /// Adds `stalls_per_cpu_s`, `stall_lost_pct` and `stall_max_ms` to the
    /// RESULT line.
    pub fn put(&self, r: &mut Report) {
        r.put("stalls_per_cpu_s", self.per_cpu_sec());
        r.put("stall_lost_pct", self.lost_pct());
        r.put("stall_max_ms", self.largest_ms());
    }

    /// Both probes together.
    pub fn merge(&self, o: &Stalls) -> Stalls {
        Stalls {
            cpu_secs: self.cpu_secs + o.cpu_secs,
            count: self.count + o.count,
            lost: self.lost + o.lost,
            largest: self.largest.max(o.largest),
        }
    }
}

/// Probes every CPU of this process's affinity set for `dur`, one pinned
/// thread each, at once; what all of them saw together.
pub fn probe(dur: Duration) -> Result<Stalls> {
    Ok(probe_each(dur)?.iter().fold(Stalls::default(), |all, (_, s)| all.merge(s)))
}

/// Like [`probe`], CPU by CPU: (CPU number, what its thread saw).
pub fn probe_each(dur: Duration) -> Result<Vec<(usize, Stalls)>> {
    let cpus = affinity_cpus()?;
    let threads: Vec<_> = cpus
        .iter()
        .map(|&cpu| {
            std::thread::Builder::new().name(format!("stall-probe-{cpu}")).spawn(move || -> Result<Stalls> {
                pin_to(cpu).with_context(|| format!("pinning the stall probe to CPU {cpu}"))?;
                Ok(scan(dur, || {}))
            })
        })
        .collect::<std::io::Result<_>>()
        .context("starting the stall probe")?;
    cpus.into_iter()
        .zip(threads)
        .map(|(cpu, t)| Ok((cpu, t.join().map_err(|_| anyhow::anyhow!("a stall probe thread panicked"))??)))
        .collect()
}

/// The CPUs this process may run on.
fn affinity_cpus() -> Result<Vec<usize>> {
    use nix::sched::{CpuSet, sched_getaffinity};
    let set = sched_getaffinity(nix::unistd::Pid::from_raw(0)).context("sched_getaffinity")?;
    Ok((0..CpuSet::count()).filter(|&c| set.is_set(c).unwrap_or(false)).collect())
}

/// One thread's loop: reads the clock until `dur` has passed, calling
/// `between` between reads (nothing, except in tests), and counts the gaps.
fn scan(dur: Duration, mut between: impl FnMut()) -> Stalls {
    let start = Instant::now();
    let end = start + dur;
    let mut s = Stalls::default();
    let mut last = start;
    loop {
        between();
        let now = Instant::now();
        let gap = now - last;
        if gap > STALL {
            s.count += 1;
            s.lost += gap;
            s.largest = s.largest.max(gap);
        }
        last = now;
        if now >= end {
            break;
        }
    }
    s.cpu_secs = (last - start).as_secs_f64();
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_gap_in_the_loop_is_counted_with_its_length() {
        let mut once = true;
        let s = scan(Duration::from_millis(30), || {
            if std::mem::take(&mut once) {
                std::thread::sleep(Duration::from_millis(5));
            }
        });
        assert!(s.count >= 1, "{s:?}");
        assert!(s.largest >= Duration::from_millis(5), "{s:?}");
        assert!(s.lost >= s.largest && s.lost.as_secs_f64() <= s.cpu_secs, "{s:?}");
        assert!(s.cpu_secs >= 0.03, "{s:?}");
        assert!(s.lost_pct() > 0.0 && s.per_cpu_sec() > 0.0);
    }

    #[test]
    fn probe_covers_every_cpu_and_merges() {
        let s = probe(Duration::from_millis(20)).unwrap();
        let cpus = affinity_cpus().unwrap().len();
        // Each CPU's thread ran for at least the probe's length.
        assert!(s.cpu_secs >= 0.02 * cpus as f64, "{s:?} over {cpus} cpus");
        assert!(s.lost.as_secs_f64() <= s.cpu_secs);
        assert_eq!(probe_each(Duration::from_millis(5)).unwrap().len(), cpus);
        let twice = s.merge(&s);
        assert_eq!(twice.count, 2 * s.count);
        assert_eq!(twice.largest, s.largest);
    }
}

//! Tables, the RESULT line, and timing.

use std::fmt;
use std::time::Instant;

/// Options every suite receives.
#[derive(Clone, Copy, Debug, Default)]
pub struct Opts {
    /// Finish in under a minute.
    pub quick: bool,
}

/// A registered suite.
#[derive(Clone, Copy, Debug)]
pub struct Suite {
    /// Name given on the command line.
    pub name: &'static str,
    /// One line on what it compares.
    pub about: &'static str,
    /// Runs the suite.
    pub run: fn(&Opts) -> anyhow::Result<Report>,
}

/// What a suite produced: tables to print, then the RESULT pairs.
#[derive(Debug, Default)]
pub struct Report {
    /// Tables, printed in order.
    pub tables: Vec<Table>,
    /// `key=value` pairs of the RESULT line, in order.
    pub result: Vec<(String, String)>,
}

impl Report {
    /// Adds a RESULT pair; floats are printed with 3 significant decimals.
    pub fn put(&mut self, key: &str, value: impl ResultValue) {
        self.result.push((key.to_owned(), value.render()));
    }

    /// The RESULT line.
    pub fn result_line(&self) -> String {
        let mut s = String::from("RESULT");
        for (k, v) in &self.result {
            s.push(' ');
            s.push_str(k);
            s.push('=');
            s.push_str(v);
        }
        s
    }
}

/// A value that can appear on the RESULT line.
pub trait ResultValue {
    /// The text after `key=`.
    fn render(&self) -> String;
}

impl ResultValue for f64 {
    fn render(&self) -> String {
        fmt_num(*self)
    }
}
impl ResultValue for u64 {
    fn render(&self) -> String {
        self.to_string()
    }
}
impl ResultValue for &str {
    fn render(&self) -> String {
        (*self).to_owned()
    }
}

/// Formats a number with about three significant digits.
pub fn fmt_num(v: f64) -> String {
    if !v.is_finite() {
        return format!("{v}");
    }
    let a = v.abs();
    if a >= 100.0 {
        format!("{v:.0}")
    } else if a >= 10.0 {
        format!("{v:.1}")
    } else if a >= 1.0 {
        format!("{v:.2}")
    } else {
        format!("{v:.3}")
    }
}

/// A table with a title, a header row and aligned columns.
#[derive(Debug, Clone)]
pub struct Table {
    /// Printed above the table.
    pub title: String,
    /// Column names.
    pub header: Vec<String>,
    /// Rows; each as long as the header.
    pub rows: Vec<Vec<String>>,
}

impl Table {
    /// An empty table.
    pub fn new(title: impl Into<String>, header: &[&str]) -> Self {
        Self { title: title.into(), header: header.iter().map(|s| (*s).to_owned()).collect(), rows: Vec::new() }
    }

    /// Appends a row.
    pub fn row(&mut self, cells: Vec<String>) {
        debug_assert_eq!(cells.len(), self.header.len());
        self.rows.push(cells);
    }
}

impl fmt::Display for Table {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut width: Vec<usize> = self.header.iter().map(String::len).collect();
        for r in &self.rows {
            for (w, c) in width.iter_mut().zip(r) {
                *w = (*w).max(c.len());
            }
        }
        writeln!(f, "## {}", self.title)?;
        let line = |f: &mut fmt::Formatter<'_>, cells: &[String]| -> fmt::Result {
            for (i, (c, w)) in cells.iter().zip(&width).enumerate() {
                // First column left-aligned (names), the rest right-aligned (numbers).
                if i == 0 { write!(f, "{c:<w$}")? } else { write!(f, "  {c:>w$}")? }
            }
            writeln!(f)
        };
        line(f, &self.header)?;
        let rule: Vec<String> = width.iter().map(|w| "-".repeat(*w)).collect();
        line(f, &rule)?;
        for r in &self.rows {
            line(f, r)?;
        }
        Ok(())
    }
}

/// Pins the calling thread (and what it spawns later) to `cpu`.
pub fn pin_to(cpu: usize) -> anyhow::Result<()> {
    let mut set = nix::sched::CpuSet::new();
    set.set(cpu)?;
    nix::sched::sched_setaffinity(nix::unistd::Pid::from_raw(0), &set)?;
    Ok(())
}

/// Minimum, median and maximum of repeated measurements.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Stats {
    /// Smallest sample.
    pub min: f64,
    /// Median sample.
    pub median: f64,
    /// Largest sample.
    pub max: f64,
}

impl Stats {
    /// Statistics of `samples` (which must not be empty).
    pub fn of(samples: &mut [f64]) -> Stats {
        assert!(!samples.is_empty(), "no samples");
        samples.sort_by(f64::total_cmp);
        Stats { min: samples[0], median: samples[samples.len() / 2], max: samples[samples.len() - 1] }
    }
}

/// Times `op` in `rounds` rounds of `iters` calls and returns nanoseconds per
/// call. Rounds of the compared operations should be interleaved by the
/// caller (see [`interleaved`]) so that machine noise hits them alike.
pub fn ns_per_call(iters: u64, mut op: impl FnMut()) -> f64 {
    let t = Instant::now();
    for _ in 0..iters {
        op();
    }
    t.elapsed().as_nanos() as f64 / iters as f64
}

/// Runs every operation of `ops` once per round, `rounds` times, interleaved,
/// and returns per-operation statistics of nanoseconds per call.
pub fn interleaved(rounds: usize, iters: u64, ops: &mut [(&str, &mut dyn FnMut())]) -> Vec<Stats> {
    let mut samples = vec![Vec::with_capacity(rounds); ops.len()];
    for _ in 0..rounds {
        for (i, (_, op)) in ops.iter_mut().enumerate() {
            samples[i].push(ns_per_call(iters, &mut **op));
        }
    }
    samples.iter_mut().map(|s| Stats::of(s)).collect()
}

/// Index of the `p` percentile (nearest rank) in `n` sorted samples: the
/// smallest sample with at least `p` of them at or below it.
pub fn percentile_rank(n: usize, p: f64) -> usize {
    ((n as f64 * p).ceil() as usize).clamp(1, n.max(1)) - 1
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn table_aligns_and_result_line_is_parseable() {
        let mut t = Table::new("demo", &["op", "ns"]);
        t.row(vec!["copy".into(), "1.5".into()]);
        t.row(vec!["validate-long".into(), "12".into()]);
        let s = t.to_string();
        assert_eq!(s.lines().nth(1).unwrap(), "op              ns");
        assert_eq!(s.lines().nth(3).unwrap(), "copy           1.5");
        let mut r = Report::default();
        r.put("a", 1.23456);
        r.put("b", 7u64);
        assert_eq!(r.result_line(), "RESULT a=1.23 b=7");
    }

    #[test]
    fn stats_are_ordered() {
        let s = Stats::of(&mut [3.0, 1.0, 2.0]);
        assert_eq!((s.min, s.median, s.max), (1.0, 2.0, 3.0));
    }
}

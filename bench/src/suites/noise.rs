//! `noise`: how noisy this machine is right now, before trusting a
//! latency tail measured on it. On a shared VM a vCPU sometimes stops for
//! milliseconds; a system that answers in a few milliseconds feels each
//! such stall in its p99. The probe ([`crate::stalls`]) pins one thread
//! to each CPU, reads the clock in a tight loop and counts the gaps over
//! [`STALL`](crate::stalls::STALL). Whatever takes a CPU from its thread
//! counts: the host, a kernel thread, or any other busy process, so run it
//! on an otherwise idle machine. Rounds are reported one by one, since the
//! noise changes from second to second.

use crate::harness::{Opts, Report, Suite, Table, fmt_num};
use crate::stalls;
use anyhow::Result;
use std::time::Duration;

/// The suite.
pub const SUITE: Suite = Suite {
    name: "noise",
    about: "CPU stalls of this machine (a shared VM's vCPUs stop for milliseconds at times): read latency tails with it",
    run,
};

fn run(opts: &Opts) -> Result<Report> {
    let rounds = if opts.quick { 2 } else { 10 };
    let each = Duration::from_secs(1);
    let mut t = Table::new(
        format!(
            "noise: CPU stalls (gaps > {} us between two clock reads of a pinned thread), {rounds} rounds of {} s",
            stalls::STALL.as_micros(),
            each.as_secs()
        ),
        &["round", "cpu", "stalls", "CPU time lost", "largest ms"],
    );
    let mut all = stalls::Stalls::default();
    for r in 1..=rounds {
        for (cpu, s) in stalls::probe_each(each)? {
            t.row(vec![
                r.to_string(),
                cpu.to_string(),
                s.count.to_string(),
                format!("{:.2}%", s.lost_pct()),
                fmt_num(s.largest_ms()),
            ]);
            all = all.merge(&s);
        }
    }
    let mut report = Report::default();
    all.put(&mut report);
    report.tables = vec![t];
    Ok(report)
}

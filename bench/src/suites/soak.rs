//! `soak`: the demo's whole cluster (two worker nodes, an ingress, three
//! tenants, 29 processes; each node in its own network namespace when run
//! as root) under closed-loop HTTP load for 10 minutes, through the
//! cross-node chain of every tenant, every request body unique and every
//! reply checked byte for byte.
//!
//! Reported: requests, failed requests split into lost (no answer: timed
//! out or the connection broke) and wrong (another request's body, i.e. a
//! duplicated or misrouted reply, or a bad status), and every process's
//! resident memory after a warm-up and at the end. Targets (issue): growth
//! under 5 % for every process, zero lost or duplicated responses.
//! `--quick` runs 60 s with a 15 s warm-up: a smoke test, not a soak.

use crate::harness::{Opts, Report, Suite, Table, fmt_num};
use crate::suites::ingress::ROLE_ENV;
use anyhow::{Result, bail};
use dpu_agent::demo::{DemoOptions, execute};

/// The suite.
pub const SUITE: Suite = Suite {
    name: "soak",
    about: "the demo cluster under load for 10 minutes: memory growth of every process, lost or duplicated replies",
    run,
};

/// Growth allowed after the warm-up, percent.
const GROWTH_MAX: f64 = 5.0;

fn run(opts: &Opts) -> Result<Report> {
    let (duration, warmup) = if opts.quick { (60, 15) } else { (600, 60) };
    let demo = DemoOptions {
        duration,
        soak: false,
        serve: false,
        connections: 4,
        body: 1024,
        no_netns: false,
        port: 0,
        mode: "emulated".to_owned(),
        // The children are this binary in the agent's roles.
        child_env: vec![(ROLE_ENV.to_owned(), "cluster".to_owned())],
        memory_check: true,
        warmup_s: warmup,
        quiet: true,
    };
    let o = execute(&demo)?;
    // A run stopped early measured less than its name says: no result.
    if o.interrupted {
        bail!("the load was stopped after {:.0} s of {duration} s: no result", o.duration_s);
    }
    if o.rss.is_empty() {
        bail!("no memory sample was taken after the warm-up: no result");
    }
    let mut report = Report::default();
    let mut mem = Table::new(
        format!(
            "resident memory per process, after {warmup} s of warm-up and after {duration} s of load{}",
            if opts.quick { " (quick: not a soak)" } else { "" }
        ),
        &["process", "RSS warm KiB", "RSS end KiB", "growth"],
    );
    let mut worst: f64 = 0.0;
    for (name, warm, end) in &o.rss {
        let g = (*end as f64 - *warm as f64) / (*warm).max(1) as f64 * 100.0;
        // The bench process runs the load clients: shown, not judged.
        if name != "demo (clients)" {
            worst = worst.max(g);
        }
        mem.row(vec![name.clone(), warm.to_string(), end.to_string(), format!("{g:.2}%")]);
    }
    let mut reqs = Table::new("requests (closed loop, 4 connections per tenant, 1 KiB bodies)", &["what", "count"]);
    reqs.row(vec!["answered correctly".into(), o.requests.to_string()]);
    reqs.row(vec!["req/s".into(), fmt_num(o.requests as f64 / o.duration_s.max(1.0))]);
    reqs.row(vec!["failed".into(), o.errors.to_string()]);
    reqs.row(vec!["  lost (no answer)".into(), o.lost.to_string()]);
    reqs.row(vec!["  wrong answer (duplicated, misrouted, bad status)".into(), o.wrong.to_string()]);
    let mut verdict = Table::new("targets", &["target", "measured", "met"]);
    let yes = |b: bool| if b { "yes" } else { "NO" }.to_owned();
    verdict.row(vec![
        format!("memory growth < {GROWTH_MAX}% (every process)"),
        format!("{worst:.2}%"),
        yes(worst < GROWTH_MAX),
    ]);
    verdict.row(vec!["no lost reply".into(), o.lost.to_string(), yes(o.lost == 0)]);
    verdict.row(vec!["no duplicated or misrouted reply".into(), o.wrong.to_string(), yes(o.wrong == 0)]);
    report.tables = vec![reqs, mem, verdict];
    report.put("requests", o.requests);
    report.put("errors", o.errors);
    report.put("lost", o.lost);
    report.put("duplicated", o.wrong);
    report.put("rss_growth_pct_max", worst);
    report.put("duration_s", o.duration_s);
    report.put("soak", if opts.quick { "quick" } else { "full" });
    Ok(report)
}

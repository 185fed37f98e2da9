//! `dne-bench SUITE [--quick]`: runs one benchmark suite, prints its tables
//! and, last, its RESULT line. `dne-bench list` lists the suites.
#![allow(clippy::print_stdout, clippy::print_stderr)]

use dne_bench::harness::Opts;
use dne_bench::suites::{SUITES, find};
use std::process::ExitCode;

#[global_allocator]
static ALLOC: dne_bench::alloc_count::Counting = dne_bench::alloc_count::Counting;

fn usage() -> String {
    let mut s = String::from("usage: dne-bench SUITE [--quick]\n       dne-bench list\n\nsuites:\n");
    for suite in SUITES {
        s.push_str(&format!("  {:<12} {}\n", suite.name, suite.about));
    }
    s
}

fn main() -> ExitCode {
    // A peer process of a suite (the binary re-executed by itself).
    if let Some(outcome) = dne_bench::suites::ingress::peer_main().or_else(dne_bench::suites::intranode::peer_main) {
        return match outcome {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => {
                eprintln!("dne-bench peer: {e:#}");
                ExitCode::FAILURE
            }
        };
    }
    let args: Vec<String> = std::env::args().skip(1).collect();
    let quick = args.iter().any(|a| a == "--quick");
    let names: Vec<&String> = args.iter().filter(|a| !a.starts_with("--")).collect();
    if let Some(bad) = args.iter().find(|a| a.starts_with("--") && *a != "--quick") {
        eprintln!("dne-bench: unknown option {bad}\n\n{}", usage());
        return ExitCode::from(2);
    }
    let [name] = names.as_slice() else {
        eprintln!("{}", usage());
        return ExitCode::from(2);
    };
    if name.as_str() == "list" {
        print!("{}", usage());
        return ExitCode::SUCCESS;
    }
    let Some(suite) = find(name) else {
        eprintln!("dne-bench: unknown suite {name}\n\n{}", usage());
        return ExitCode::from(2);
    };
    println!("# dne-bench {} {}", suite.name, if quick { "(quick)" } else { "" });
    match (suite.run)(&Opts { quick }) {
        Ok(report) => {
            for t in &report.tables {
                println!("{t}");
            }
            println!("{}", report.result_line());
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("dne-bench {}: {e:#}", suite.name);
            ExitCode::FAILURE
        }
    }
}

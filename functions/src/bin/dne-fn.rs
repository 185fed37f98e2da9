//! `dne-fn`: the sample Rust function. Attaches to host-shimd as an instance
//! of a configured function, applies a transform to every message in place
//! (zero copy) and hands the same buffers on to `--next`, or frees them.
//!
//! `--hoard N` allocates N messages at start and never frees them (for crash
//! reclaim tests: kill -9 it and host-shimd must get them back).
#![allow(clippy::print_stdout, clippy::print_stderr)]

use clap::Parser;
use dne_functions::serve::{FnArgs, serve};

/// A sample DNE function.
#[derive(Debug, Parser)]
#[command(name = "dne-fn", version, about)]
struct Cli {
    #[command(flatten)]
    args: FnArgs,
}

fn main() -> std::process::ExitCode {
    env_logger::Builder::from_env(env_logger::Env::default().default_filter_or("warn")).init();
    match serve(Cli::parse().args) {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("dne-fn: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}

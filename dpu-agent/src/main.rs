//! The `dpu-agent` binary: a thin wrapper over the library.
#![allow(clippy::print_stdout, clippy::print_stderr)]

use clap::Parser;
use dpu_agent::cli::{Cli, run};

fn main() -> std::process::ExitCode {
    env_logger::Builder::from_env(env_logger::Env::default().default_filter_or("info")).init();
    let cli = Cli::parse();
    match run(&cli) {
        Ok(out) => {
            print!("{out}");
            std::process::ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("dpu-agent: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}

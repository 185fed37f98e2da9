//! `host-shimd --config FILE --node NAME`: the per-host DNE daemon.
#![allow(clippy::print_stderr)]

use clap::Parser;
use std::path::PathBuf;

/// The DNE per-host daemon: tenant pools, function registry, crash reclaim.
#[derive(Debug, Parser)]
#[command(name = "host-shimd", version, about)]
struct Args {
    /// Cluster file (TOML).
    #[arg(long)]
    config: PathBuf,
    /// Name of this node in the cluster file.
    #[arg(long)]
    node: String,
}

fn main() -> std::process::ExitCode {
    env_logger::Builder::from_env(env_logger::Env::default().default_filter_or("info")).init();
    let args = Args::parse();
    match run(&args) {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("host-shimd: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}

fn run(args: &Args) -> anyhow::Result<()> {
    let cfg = config::Cluster::load(&args.config)?;
    host_shim::daemon::serve_until_signalled(cfg, &args.node)
}

//! `host-shimd --config FILE --node NAME`: the per-host DNE daemon.
#![allow(clippy::print_stderr)]

use clap::Parser;
use host_shim::daemon::Shimd;
use nix::sys::signal::{SigSet, Signal};
use nix::sys::signalfd::{SfdFlags, SignalFd};
use std::os::fd::AsFd;
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
    let mut mask = SigSet::empty();
    mask.add(Signal::SIGINT);
    mask.add(Signal::SIGTERM);
    mask.thread_block()?;
    let stop = SignalFd::with_flags(&mask, SfdFlags::SFD_CLOEXEC | SfdFlags::SFD_NONBLOCK)?;
    let mut shimd = Shimd::new(cfg, &args.node)?;
    shimd.run(Some(stop.as_fd()))?;
    log::info!("host-shimd stopping: {:?}", shimd.stats());
    Ok(())
}

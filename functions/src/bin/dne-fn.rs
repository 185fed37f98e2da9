//! `dne-fn`: the sample Rust function. Attaches to host-shimd as an instance
//! of a configured function, applies a transform to every message in place
//! (zero copy) and hands the same buffers on to `--next`, or frees them.
//!
//! `--hoard N` allocates N messages at start and never frees them (for crash
//! reclaim tests: kill -9 it and host-shimd must get them back).
#![allow(clippy::print_stdout, clippy::print_stderr)]

use clap::Parser;
use dne_functions::Transform;
use host_shim::{Function, SendErrorKind};
use std::path::PathBuf;
use std::time::Duration;

/// A sample DNE function.
#[derive(Debug, Parser)]
#[command(name = "dne-fn", version, about)]
struct Args {
    /// host-shimd's socket (`<runtime_dir>/shimd.sock`).
    #[arg(long)]
    socket: PathBuf,
    /// Tenant name.
    #[arg(long)]
    tenant: String,
    /// Function name (as in the cluster file).
    #[arg(long)]
    function: String,
    /// Transform applied in place: echo, upper, rot13, reverse.
    #[arg(long, default_value = "echo")]
    transform: String,
    /// Function to hand each message to; without it messages are freed.
    #[arg(long)]
    next: Option<String>,
    /// Allocate this many messages at start and hold them forever.
    #[arg(long, default_value_t = 0)]
    hoard: u32,
}

fn main() -> std::process::ExitCode {
    env_logger::Builder::from_env(env_logger::Env::default().default_filter_or("warn")).init();
    match run(Args::parse()) {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("dne-fn: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}

fn run(args: Args) -> anyhow::Result<()> {
    let t = Transform::from_name(&args.transform)?;
    let mut f = Function::attach(&args.socket, &args.tenant, &args.function)?;
    let mut hoard = Vec::new();
    for _ in 0..args.hoard {
        hoard.push(f.alloc(1000)?);
    }
    // Tell a supervising process we are ready (after the hoard is taken).
    println!("ready slot={} hoard={}", f.info().slot, hoard.len());
    loop {
        let mut msg = f.recv()?;
        for k in 0..msg.frags() {
            t.apply(f.payload_mut(&mut msg, k));
        }
        match &args.next {
            None => {
                f.free(msg)?;
            }
            Some(next) => {
                let mut m = msg;
                // Back-pressure: a full ring means the next function is
                // behind; wait for it rather than drop.
                loop {
                    match f.send(m, next) {
                        Ok(()) => break,
                        Err(e) if matches!(e.kind, SendErrorKind::Full) && e.msg.is_some() => {
                            m = e.msg.expect("checked");
                            std::thread::sleep(Duration::from_micros(50));
                        }
                        Err(e) => {
                            log::warn!("send to {next}: {}", e.kind);
                            if let Some(m) = e.msg {
                                f.free(m)?;
                            }
                            break;
                        }
                    }
                }
            }
        }
    }
}

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
    /// Cluster file: messages that travel along an ingress route go to the
    /// next function of the route's chain, and the last function replies
    /// to the ingress.
    #[arg(long)]
    config: Option<PathBuf>,
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
    let routes: Vec<Vec<String>> = match &args.config {
        Some(p) => config::Cluster::load(p)?.routes.into_iter().map(|r| r.chain).collect(),
        None => Vec::new(),
    };
    loop {
        let mut msg = f.recv()?;
        if msg.desc().flags & wire::DescFlags::ERROR != 0 {
            // A message of ours came back undelivered.
            log::warn!("message {} came back: error {}", msg.request(), msg.desc().status);
            f.free(msg)?;
            continue;
        }
        let d = *msg.desc();
        let next = match routes.get(usize::from(d.route)) {
            // An HTTP request on an ingress route: transform the body of its
            // envelope in place; the last function turns it into the reply.
            Some(chain) => {
                let next = chain.get(usize::from(d.hop) + 1);
                let step = if next.is_some() {
                    dne_functions::Next::Forward
                } else {
                    dne_functions::Next::Reply {
                        status: 200,
                        headers: &[(b"content-type", b"application/octet-stream")],
                    }
                };
                let r = dne_functions::handle_envelope(&mut dne_functions::MsgFrags::new(&f, &mut msg), t, step);
                if let Err(e) = r {
                    log::warn!("request {}: {e}", d.request);
                    let dm = msg.desc_mut();
                    dm.flags |= wire::DescFlags::ERROR;
                    dm.status = wire::ErrorCode::BadDescriptor as u8;
                    if let Err(e) = send_retrying(&mut f, msg, None) {
                        log::warn!("error reply: {e}");
                    }
                    continue;
                }
                match next {
                    Some(n) => {
                        msg.desc_mut().hop += 1;
                        Some(n.as_str())
                    }
                    None => {
                        if let Err(e) = send_retrying(&mut f, msg, None) {
                            log::warn!("reply: {e}");
                        }
                        continue;
                    }
                }
            }
            None => {
                for k in 0..msg.frags() {
                    t.apply(f.payload_mut(&mut msg, k));
                }
                args.next.as_deref()
            }
        };
        match next {
            None => {
                f.free(msg)?;
            }
            Some(next) => {
                if let Err(e) = send_retrying(&mut f, msg, Some(next)) {
                    log::warn!("send to {next}: {e}");
                }
            }
        }
    }
}

/// Sends to `to` (or replies, for `None`), waiting while the destination
/// ring is full; frees the message if it cannot be sent.
fn send_retrying(f: &mut Function, msg: host_shim::Msg, to: Option<&str>) -> anyhow::Result<()> {
    let mut m = msg;
    loop {
        let r = match to {
            Some(to) => f.send(m, to),
            None => f.reply(m),
        };
        match r {
            Ok(()) => return Ok(()),
            Err(e) if matches!(e.kind, SendErrorKind::Full) && e.msg.is_some() => {
                m = e.msg.expect("checked");
                std::thread::sleep(Duration::from_micros(50));
            }
            Err(e) => {
                let kind = e.kind.to_string();
                if let Some(m) = e.msg {
                    f.free(m)?;
                }
                anyhow::bail!(kind);
            }
        }
    }
}

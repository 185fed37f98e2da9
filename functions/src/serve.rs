//! The sample function as a reusable program ([`serve`]): the `dne-fn`
//! binary, and the demo's function processes, run it.
//!
//! It attaches to host-shimd as an instance of a configured function and,
//! for every message: on an ingress route (`--config`), transforms the
//! body of the HTTP envelope in place and passes it down the route's chain,
//! the last function rewriting it into the reply; otherwise applies the
//! transform to the whole payload and hands the same buffers on to
//! `--next`, or frees them. Zero copy throughout.

use crate::Transform;
use host_shim::{Function, SendErrorKind};
use std::path::PathBuf;
use std::time::Duration;

/// Options of a sample function.
#[derive(Clone, Debug, clap::Args)]
pub struct FnArgs {
    /// host-shimd's socket (`<runtime_dir>/shimd.sock`).
    #[arg(long)]
    pub socket: PathBuf,
    /// Tenant name.
    #[arg(long)]
    pub tenant: String,
    /// Function name (as in the cluster file).
    #[arg(long)]
    pub function: String,
    /// Transform applied in place: echo, upper, rot13, reverse.
    #[arg(long, default_value = "echo")]
    pub transform: String,
    /// Function to hand each message to; without it messages are freed.
    #[arg(long)]
    pub next: Option<String>,
    /// Allocate this many messages at start and hold them forever.
    #[arg(long, default_value_t = 0)]
    pub hoard: u32,
    /// Cluster file: messages that travel along an ingress route go to the
    /// next function of the route's chain, and the last function replies
    /// to the ingress.
    #[arg(long)]
    pub config: Option<PathBuf>,
}

/// Runs a sample function until its host-shimd goes away: attaches, prints
/// `ready slot=N hoard=N` on stdout, then serves messages forever.
#[allow(clippy::print_stdout)]
pub fn serve(args: FnArgs) -> anyhow::Result<()> {
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
                    crate::Next::Forward
                } else {
                    crate::Next::Reply { status: 200, headers: &[(b"content-type", b"application/octet-stream")] }
                };
                let r = crate::handle_envelope(&mut crate::MsgFrags::new(&f, &mut msg), t, step);
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

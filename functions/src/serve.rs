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
    /// Fan-out (on an ingress route): send each request on to every
    /// function listed, a copy each, tagged with its branch number.
    #[arg(long, value_delimiter = ',')]
    pub fanout: Vec<String>,
    /// A fan-out branch: transform the request's body in place and send it
    /// on to this gathering function.
    #[arg(long)]
    pub branch_to: Option<String>,
    /// Gather: wait for this many branches of each request, then reply
    /// with their bodies concatenated in branch order.
    #[arg(long, default_value_t = 0)]
    pub gather: u16,
    /// Simulated work: sleep this many microseconds on each message before
    /// handling it (0: none), so a test can make a function slower than
    /// its callers whatever the machine's speed.
    #[arg(long, default_value_t = 0)]
    pub delay_us: u64,
    /// Instead of serving, allocate and free a message of this many bytes
    /// in a loop until killed (0: serve), so a test can kill a process in
    /// the middle of allocating or freeing.
    #[arg(long, default_value_t = 0)]
    pub churn: u32,
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
    if args.churn > 0 {
        loop {
            let m = f.alloc(args.churn)?;
            f.free(m)?;
        }
    }
    let routes: Vec<Vec<String>> = match &args.config {
        Some(p) => config::Cluster::load(p)?.routes.into_iter().map(|r| r.chain).collect(),
        None => Vec::new(),
    };
    let mut fan = Fan::default();
    let delay = std::time::Duration::from_micros(args.delay_us);
    loop {
        let mut msg = f.recv()?;
        if !delay.is_zero() {
            std::thread::sleep(delay);
        }
        if msg.desc().flags & wire::DescFlags::ERROR != 0 {
            // A message of ours came back undelivered.
            log::warn!("message {} came back: error {}", msg.request(), msg.desc().status);
            f.free(msg)?;
            continue;
        }
        let d = *msg.desc();
        if routes.get(usize::from(d.route)).is_some()
            && (!args.fanout.is_empty() || args.branch_to.is_some() || args.gather > 0)
        {
            fan.handle(&mut f, &args, t, msg)?;
            continue;
        }
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

/// How long a gathering function keeps the branches of a request that never
/// completes.
const GATHER_TIMEOUT: Duration = Duration::from_secs(10);

/// The fan-out and gather roles' state.
#[derive(Debug, Default)]
struct Fan {
    /// Branches received so far, per request.
    parts: std::collections::HashMap<u32, (std::time::Instant, Vec<Option<host_shim::Msg>>)>,
}

impl Fan {
    fn handle(&mut self, f: &mut Function, args: &FnArgs, t: Transform, mut msg: host_shim::Msg) -> anyhow::Result<()> {
        let d = *msg.desc();
        if !args.fanout.is_empty() {
            // One copy per branch but the last, which takes the original.
            let k = args.fanout.len();
            for (i, to) in args.fanout.iter().enumerate() {
                let mut m = if i + 1 == k {
                    std::mem::replace(&mut msg, f.alloc(0)?)
                } else {
                    let mut c = f.alloc(msg.len())?;
                    for j in 0..msg.frags() {
                        f.payload_mut(&mut c, j).copy_from_slice(f.payload(&msg, j));
                    }
                    c
                };
                let dm = m.desc_mut();
                *dm = wire::Descriptor { hop: i as u8, buf: dm.buf, len: dm.len, ..d };
                if let Err(e) = send_retrying(f, m, Some(to)) {
                    log::warn!("fan-out to {to}: {e}");
                }
            }
            f.free(msg)?;
            return Ok(());
        }
        if let Some(to) = &args.branch_to {
            if let Err(e) = crate::handle_envelope(&mut crate::MsgFrags::new(f, &mut msg), t, crate::Next::Forward) {
                log::warn!("request {}: {e}", d.request);
                f.free(msg)?;
                return Ok(());
            }
            return send_retrying(f, msg, Some(to));
        }
        // Gather.
        let now = std::time::Instant::now();
        let n = usize::from(args.gather);
        let stale: Vec<u32> = self
            .parts
            .iter()
            .filter(|(_, (t0, _))| now.duration_since(*t0) > GATHER_TIMEOUT)
            .map(|(r, _)| *r)
            .collect();
        for r in stale {
            for m in self.parts.remove(&r).into_iter().flat_map(|(_, v)| v).flatten() {
                f.free(m)?;
            }
        }
        let entry = self.parts.entry(d.request).or_insert_with(|| (now, (0..n).map(|_| None).collect()));
        match entry.1.get_mut(usize::from(d.hop)) {
            Some(slot @ None) => *slot = Some(msg),
            _ => {
                log::warn!("request {}: unexpected branch {}", d.request, d.hop);
                f.free(msg)?;
                return Ok(());
            }
        }
        if entry.1.iter().any(Option::is_none) {
            return Ok(());
        }
        let parts: Vec<host_shim::Msg> =
            self.parts.remove(&d.request).map(|(_, v)| v.into_iter().flatten().collect()).unwrap_or_default();
        let reply = gather_reply(f, &parts);
        for m in parts {
            f.free(m)?;
        }
        match reply {
            Ok(mut r) => {
                let dm = r.desc_mut();
                *dm = wire::Descriptor { hop: 0, buf: dm.buf, len: dm.len, ..d };
                send_retrying(f, r, None)
            }
            Err(e) => {
                log::warn!("request {}: gathering failed: {e}", d.request);
                Ok(())
            }
        }
    }
}

/// A response envelope whose body is the branches' bodies, in order.
fn gather_reply(f: &mut Function, parts: &[host_shim::Msg]) -> anyhow::Result<host_shim::Msg> {
    use wire::http::{HeadSpec, Start};
    let mut bodies = Vec::with_capacity(parts.len());
    for p in parts {
        let frags: Vec<&[u8]> = (0..p.frags()).map(|k| f.payload(p, k)).collect();
        let env = wire::http::decode(&frags[..])?;
        bodies.push((u64::from(env.body_offset), u64::from(env.body_len)));
    }
    let total: u64 = bodies.iter().map(|b| b.1).sum();
    let headers: [(&[u8], &[u8]); 1] = [(b"content-type", b"application/octet-stream")];
    let spec = HeadSpec { start: Start::Response { status: 200 }, headers: &headers };
    let head = spec.len()?;
    let len = u32::try_from(u64::from(head) + total)?;
    let mut out = f.alloc(len)?;
    let mut at = u64::from(head);
    {
        let f: &Function = f;
        let mut dst = crate::MsgFrags::new(f, &mut out);
        wire::http::encode_head(&mut dst, &spec, 0, u32::try_from(total)?)?;
        for (p, (off, blen)) in parts.iter().zip(&bodies) {
            let frags: Vec<&[u8]> = (0..p.frags()).map(|k| f.payload(p, k)).collect();
            let mut err = None;
            wire::http::for_each_piece(&frags[..], *off, *blen, |piece| {
                if err.is_none() {
                    err = wire::http::write_at(&mut dst, at, piece).err();
                    at += piece.len() as u64;
                }
            });
            if let Some(e) = err {
                return Err(e.into());
            }
        }
    }
    Ok(out)
}

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
use host_shim::{Function, Msg, SendError, SendErrorKind};
use std::path::PathBuf;
use std::time::Duration;
use wire::{DescFlags, Descriptor, ErrorCode};

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
        if msg.desc().flags & DescFlags::ERROR != 0 {
            // A message of ours came back undelivered.
            log::warn!("message {} came back: error {}", msg.request(), msg.desc().status);
            release(&mut f, msg);
            continue;
        }
        let d = *msg.desc();
        if routes.get(usize::from(d.route)).is_some()
            && (!args.fanout.is_empty() || args.branch_to.is_some() || args.gather > 0)
        {
            fan.handle(&mut f, &args, t, msg);
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
                    answer_error(&mut f, msg, ErrorCode::BadDescriptor);
                    continue;
                }
                match next {
                    Some(n) => {
                        msg.desc_mut().hop += 1;
                        Some(n.as_str())
                    }
                    None => {
                        send_or_free(&mut f, msg, None);
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
                release(&mut f, msg);
            }
            Some(next) => {
                if let Err(e) = send_retrying(&mut f, msg, Some(next)) {
                    log::warn!("request {}: send to {next}: {}", d.request, e.kind);
                    match e.msg {
                        // A call on a route: its caller hears of it now
                        // rather than at its timeout.
                        Some(m) if routes.get(usize::from(d.route)).is_some() => {
                            answer_error(&mut f, m, error_code(&e.kind));
                        }
                        Some(m) => release(&mut f, m),
                        // The receiver died holding it; host-shimd freed it.
                        None => {}
                    }
                }
            }
        }
    }
}

/// Sends to `to` (or replies, for `None`), waiting while the destination
/// ring is full. On another failure the message comes back in the error
/// (unless its receiver died holding it and host-shimd freed it).
fn send_retrying(f: &mut Function, msg: Msg, to: Option<&str>) -> Result<(), SendError> {
    let mut m = msg;
    loop {
        let r = match to {
            Some(to) => f.send(m, to),
            None => f.reply(m),
        };
        match r {
            Err(SendError { kind: SendErrorKind::Full, msg: Some(back) }) => {
                m = back;
                std::thread::sleep(Duration::from_micros(50));
            }
            r => return r,
        }
    }
}

/// [`send_retrying`], freeing the message if it cannot be sent (logged).
fn send_or_free(f: &mut Function, msg: Msg, to: Option<&str>) {
    if let Err(e) = send_retrying(f, msg, to) {
        log::warn!("send to {}: {}", to.unwrap_or("the agent (reply)"), e.kind);
        if let Some(m) = e.msg {
            release(f, m);
        }
    }
}

/// Frees a message; a failure (a chain whose links a process sharing the
/// pool rewrote) is logged, not fatal: one bad message does not end the
/// function (the buffers it could not free stay recorded as its own, and
/// host-shimd reclaims them when it exits).
fn release(f: &mut Function, msg: Msg) {
    let request = msg.request();
    if let Err(e) = f.free(msg) {
        log::warn!("request {request}: freeing: {e}");
    }
}

/// Answers a call on a route with an error descriptor made of `msg`'s own
/// buffers (flag [`DescFlags::ERROR`], status `code`), sent back toward
/// the caller as a reply; anything else (a reply, an error) is freed. When
/// its buffers cannot go (a link of its chain is broken, so it cannot be
/// handed over), a new empty message carries the answer.
fn answer_error(f: &mut Function, mut msg: Msg, code: ErrorCode) {
    if msg.desc().flags & (DescFlags::REPLY | DescFlags::ERROR) != 0 {
        return release(f, msg);
    }
    let dm = msg.desc_mut();
    dm.flags |= DescFlags::ERROR;
    dm.status = code as u8;
    let d = *dm;
    match send_retrying(f, msg, None) {
        Ok(()) => {}
        Err(SendError { kind: SendErrorKind::Ownership(why), msg: Some(m) }) => {
            log::warn!("request {}: its buffers cannot carry the error ({why}): a new message does", d.request);
            release(f, m);
            match f.alloc(0) {
                Ok(mut e) => {
                    set_header(&mut e, d);
                    send_or_free(f, e, None);
                }
                Err(e) => log::warn!("request {}: no buffer for the error: {e}", d.request),
            }
        }
        Err(e) => {
            log::warn!("request {}: error reply: {}", d.request, e.kind);
            if let Some(m) = e.msg {
                release(f, m);
            }
        }
    }
}

/// Gives `m` the header `d`, keeping its own buffers (chain head and
/// length).
fn set_header(m: &mut Msg, d: Descriptor) {
    let dm = m.desc_mut();
    *dm = Descriptor { buf: dm.buf, len: dm.len, ..d };
}

/// The error a caller is answered with when sending its call on failed.
fn error_code(kind: &SendErrorKind) -> ErrorCode {
    match kind {
        SendErrorKind::UnknownFunction | SendErrorKind::BadName(_) => ErrorCode::UnknownFunction,
        SendErrorKind::TenantMismatch => ErrorCode::TenantMismatch,
        // As the agent answers a call to a function without an instance.
        SendErrorKind::NoInstance => ErrorCode::PeerDied,
        SendErrorKind::Full => ErrorCode::Overloaded,
        // (A message of another pool: dne-fn has one attach, so none.)
        SendErrorKind::Ownership(_) | SendErrorKind::BadDescriptor(_) | SendErrorKind::ForeignMsg => {
            ErrorCode::BadDescriptor
        }
        SendErrorKind::Shimd(_) | SendErrorKind::ShimdGone => ErrorCode::Unreachable,
    }
}

/// A copy of `msg`'s payload in buffers of its own: `Overloaded` when the
/// pool has none free at the moment, `BadDescriptor` when `msg`'s chain is
/// broken (a link leads out of the pool: its fragment reads as empty).
fn copy_of(f: &mut Function, msg: &Msg) -> Result<Msg, ErrorCode> {
    let mut c = f.alloc(msg.len()).map_err(|e| {
        log::warn!("request {}: no buffer for a copy: {e}", msg.request());
        ErrorCode::Overloaded
    })?;
    // The copy has the same length in the same pool, so the same
    // fragment lengths, unless a link of `msg` is broken.
    let mut intact = true;
    for j in 0..msg.frags() {
        let src = f.payload(msg, j);
        match f.try_payload_mut(&mut c, j) {
            Ok(dst) if dst.len() == src.len() => dst.copy_from_slice(src),
            _ => {
                intact = false;
                break;
            }
        }
    }
    if intact {
        Ok(c)
    } else {
        log::warn!("request {}: broken chain, not copied", msg.request());
        release(f, c);
        Err(ErrorCode::BadDescriptor)
    }
}

/// How long a gathering function keeps the branches of a request that never
/// completes.
const GATHER_TIMEOUT: Duration = Duration::from_secs(10);

/// The fan-out and gather roles' state.
#[derive(Debug, Default)]
struct Fan {
    /// Branches received so far, per request.
    parts: std::collections::HashMap<u32, (std::time::Instant, Vec<Option<Msg>>)>,
}

impl Fan {
    /// Handles one call of the fan-out, branch or gather role. Never fails:
    /// what cannot be done (no buffer free at the moment, a broken chain, a
    /// send that failed) is answered to the caller as an error descriptor,
    /// and the function serves on.
    fn handle(&mut self, f: &mut Function, args: &FnArgs, t: Transform, mut msg: Msg) {
        let d = *msg.desc();
        if !args.fanout.is_empty() {
            return fan_out(f, &args.fanout, msg);
        }
        if let Some(to) = &args.branch_to {
            if let Err(e) = crate::handle_envelope(&mut crate::MsgFrags::new(f, &mut msg), t, crate::Next::Forward) {
                log::warn!("request {}: {e}", d.request);
                return answer_error(f, msg, ErrorCode::BadDescriptor);
            }
            if let Err(e) = send_retrying(f, msg, Some(to)) {
                log::warn!("request {}: branch to {to}: {}", d.request, e.kind);
                if let Some(m) = e.msg {
                    answer_error(f, m, error_code(&e.kind));
                }
            }
            return;
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
                release(f, m);
            }
        }
        let entry = self.parts.entry(d.request).or_insert_with(|| (now, (0..n).map(|_| None).collect()));
        match entry.1.get_mut(usize::from(d.hop)) {
            Some(slot @ None) => *slot = Some(msg),
            _ => {
                log::warn!("request {}: unexpected branch {}", d.request, d.hop);
                return release(f, msg);
            }
        }
        if entry.1.iter().any(Option::is_none) {
            return;
        }
        let mut parts: Vec<Msg> =
            self.parts.remove(&d.request).map(|(_, v)| v.into_iter().flatten().collect()).unwrap_or_default();
        match gather_reply(f, &parts) {
            Ok(mut r) => {
                for m in parts {
                    release(f, m);
                }
                set_header(&mut r, Descriptor { hop: 0, ..d });
                send_or_free(f, r, None);
            }
            Err(e) => {
                log::warn!("request {}: gathering failed: {e}", d.request);
                let code = if e.is::<shm::AllocError>() { ErrorCode::Overloaded } else { ErrorCode::BadDescriptor };
                // The first branch carries the error back; no buffer spent.
                let mut first = parts.remove(0);
                for m in parts {
                    release(f, m);
                }
                set_header(&mut first, Descriptor { hop: 0, ..d });
                answer_error(f, first, code);
            }
        }
    }
}

/// The fan-out role: the call goes on to every function of `fanout`, the
/// `i`-th tagged with hop `i`, the last taking the original buffers and the
/// others a copy each. The copies are made before anything is sent: when
/// the pool has no room for them at the moment (or the call's chain is
/// broken), the call goes back to its caller whole as an error descriptor
/// (`Overloaded`, `BadDescriptor`) and no branch waits at the gatherer for
/// the others. A branch that cannot be sent answers the caller with an
/// error (once per call; later failures are only freed).
fn fan_out(f: &mut Function, fanout: &[String], msg: Msg) {
    let d = *msg.desc();
    let mut branches = Vec::with_capacity(fanout.len());
    for _ in 1..fanout.len() {
        match copy_of(f, &msg) {
            Ok(c) => branches.push(c),
            Err(code) => {
                for c in branches {
                    release(f, c);
                }
                return answer_error(f, msg, code);
            }
        }
    }
    branches.push(msg);
    let mut answered = false;
    for (i, (to, mut m)) in fanout.iter().zip(branches).enumerate() {
        set_header(&mut m, Descriptor { hop: i as u8, ..d });
        if let Err(e) = send_retrying(f, m, Some(to)) {
            log::warn!("request {}: fan-out to {to}: {}", d.request, e.kind);
            match e.msg {
                Some(mut m) if !answered => {
                    answered = true;
                    set_header(&mut m, d);
                    answer_error(f, m, error_code(&e.kind));
                }
                Some(m) => release(f, m),
                None => {}
            }
        }
    }
}

/// A response envelope whose body is the branches' bodies, in order.
fn gather_reply(f: &mut Function, parts: &[Msg]) -> anyhow::Result<Msg> {
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

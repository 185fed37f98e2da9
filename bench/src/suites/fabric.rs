//! `fabric`: the emulated fabric (the `fabric` crate's [`Endpoint`] over the
//! `doca` crate's emulated RDMA, which runs over TCP) next to raw TCP
//! loopback moving the same bytes in the same pattern, between two
//! processes (this binary re-executed as a peer), at 64 B to 1 MiB:
//!
//! * round trip: one message of N bytes in flight; the pinger sends N
//!   bytes, the ponger receives them and sends N bytes back. Fabric
//!   payloads are already in registered memory (a 40-byte fabric header
//!   counts in the N); TCP writes N bytes, the peer reads N and writes N
//!   back (`TCP_NODELAY`, blocking I/O);
//! * message rate: a one-way stream of N-byte messages, many in flight.
//!   Fabric: up to `IN_FLIGHT` sends posted, bounded by the receiver's
//!   credits (`RECVS` receives posted, each re-posted as it completes);
//!   timed until the last send completion (the peer placed it). TCP: each
//!   message a 4-byte length prefix and N bytes in one write, the receiver
//!   reading through a 64 KiB buffer (the target's baseline) or, for
//!   reference, with one read for the prefix and one for the payload; timed
//!   until the receiver's 1-byte acknowledgement of the last message.
//!
//! Both sides busy-poll the fabric on a core of their own (when there are
//! two); TCP blocks. Rounds of all four measurements are interleaved;
//! cells are medians over rounds.

use super::intranode::proc::{Peer, PeerCtx, WATCHDOG, Watchdog, pin_pinger};
use crate::harness::{Opts, Report, Stats, Suite, Table, fmt_num};
use anyhow::{Context, Result, anyhow, bail};
use fabric::{
    Completion, ConnId, ConnSpec, DocaTransport, Endpoint, EndpointConfig, FabricHeader, HEADER_LEN, Immediate, Memory,
    MsgKind, RecvWr, RegionId, SendWr,
};
use std::io::{BufReader, Read, Write};
use std::net::{TcpListener, TcpStream};
use std::sync::Arc;
use std::time::{Duration, Instant};
use zerocopy::IntoBytes;

/// The suite.
pub const SUITE: Suite = Suite {
    name: "fabric",
    about: "emulated fabric (doca-emu over TCP) vs raw TCP loopback: round trip and message rate, 64 B..1 MiB",
    run,
};

/// Peer role running a fabric endpoint.
pub(crate) const FABRIC_ROLE: &str = "fabric";
/// Peer role running the TCP baseline.
pub(crate) const TCP_ROLE: &str = "fabric-tcp";
const ADDR_ENV: &str = "DNE_BENCH_FABRIC_TCP_ADDR";

const SIZES: [usize; 5] = [64, 1024, 16 << 10, 64 << 10, 1 << 20];
const SIZE_NAMES: [&str; 5] = ["64 B", "1 KiB", "16 KiB", "64 KiB", "1 MiB"];
const SIZE_KEYS: [&str; 5] = ["64", "1k", "16k", "64k", "1m"];
const MAX_SIZE: usize = 1 << 20;

/// Receives posted per side, each a slot of [`MAX_SIZE`] bytes.
const RECVS: u32 = 64;
/// Sends the streaming pinger keeps posted (credits bound what goes out).
const IN_FLIGHT: u64 = 256;
/// Round-trip targets: fabric at most this times TCP.
const RTT_TARGET: f64 = 1.25;
/// Message-rate target: fabric at least this times TCP.
const RATE_TARGET: f64 = 0.8;

const RTT: &str = "rtt";
const RATE: &str = "rate";

fn cfg() -> EndpointConfig {
    EndpointConfig {
        max_conns: 1,
        max_regions: 1,
        send_window: 64,
        recv_depth: RECVS,
        send_queue: IN_FLIGHT as u32 + 16,
        max_msg: MAX_SIZE as u32,
        ..Default::default()
    }
}

// ------------------------------------------------------------ fabric side

/// One fabric endpoint with one connection. Region layout: [`RECVS`]
/// receive slots of [`MAX_SIZE`], then the send buffer.
struct FabricSide {
    ep: Endpoint<DocaTransport>,
    mem: Arc<shm::Region>,
    reg: RegionId,
    conn: ConnId,
    out: Vec<Completion>,
    /// Size whose header is written in the send buffer.
    header_for: usize,
}

const SEND_OFFSET: u64 = RECVS as u64 * MAX_SIZE as u64;

impl FabricSide {
    /// An endpoint with its region and an open connection; returns it and
    /// the blob for the peer.
    fn open(peer: u32) -> Result<(Self, Vec<u8>)> {
        let cfg = cfg();
        let t = DocaTransport::for_config(&cfg).map_err(|e| anyhow!("DOCA transport: {e:?}"))?;
        let mut ep = Endpoint::new(t, cfg);
        let len = (RECVS as usize + 1) * MAX_SIZE;
        let mem = Arc::new(shm::Region::create("dne-bench-fabric", len, shm::PagePolicy::Normal)?);
        // Touch every page once so no measurement pays first-touch faults.
        let zeros = vec![0u8; MAX_SIZE];
        for i in 0..=u64::from(RECVS) {
            mem.copy_in(i * MAX_SIZE as u64, &zeros)?;
        }
        let reg = ep.register(Memory::Local(mem.clone()))?;
        let (conn, blob) = ep.open(ConnSpec { tenant: 1, peer })?;
        let out = vec![Completion::EMPTY; 64];
        Ok((Self { ep, mem, reg, conn, out, header_for: 0 }, blob))
    }

    /// Connects to the peer's blob, waits for the connection, posts the
    /// receives.
    fn connect(&mut self, blob: &[u8]) -> Result<()> {
        self.ep.connect(self.conn, blob)?;
        let mut wd = Watchdog::new();
        let mut up = false;
        while !up {
            let k = self.ep.poll(&mut self.out);
            for c in &self.out[..k] {
                match *c {
                    Completion::Connected(c) if c == self.conn => up = true,
                    other => bail!("unexpected completion while connecting: {other:?}"),
                }
            }
            if k == 0 {
                wd.tick()?;
            }
        }
        for slot in 0..u64::from(RECVS) {
            self.repost(slot)?;
        }
        Ok(())
    }

    fn repost(&mut self, slot: u64) -> Result<()> {
        let wr = RecvWr { region: self.reg, offset: slot * MAX_SIZE as u64, len: MAX_SIZE as u32, token: slot };
        self.ep.post_recv(self.conn, wr).map_err(|e| anyhow!("post_recv: {e:?}"))
    }

    /// Writes the fabric header of an N-byte message into the send buffer.
    fn prepare(&mut self, size: usize) -> Result<()> {
        if self.header_for != size {
            let payload = (size - HEADER_LEN) as u32;
            let d = wire::Descriptor { tenant: 1, dst_fn: 5, len: payload, ..Default::default() };
            let h = FabricHeader::new(MsgKind::Data, d, 0, 1, payload);
            self.mem.copy_in(SEND_OFFSET, h.as_bytes())?;
            self.header_for = size;
        }
        Ok(())
    }

    fn send(&mut self, size: usize, token: u64) -> Result<()> {
        let imm = Immediate::new(MsgKind::Data as u8, 5, true, true).0;
        let wr = SendWr { region: self.reg, offset: SEND_OFFSET, len: size as u32, imm, token };
        self.ep.post_send(self.conn, wr).map_err(|e| anyhow!("post_send: {e:?}"))
    }

    /// Polls once; counts send completions into `sent`, re-posts and counts
    /// received messages into `got`. Returns the completions taken.
    fn step(&mut self, size: usize, sent: &mut u64, got: &mut u64) -> Result<usize> {
        let k = self.ep.poll(&mut self.out);
        for i in 0..k {
            match self.out[i] {
                Completion::Sent { result: Ok(()), .. } => *sent += 1,
                Completion::Received { token, result: Ok(r), .. } => {
                    if r.len as usize != size {
                        bail!("received {} bytes, expected {size}", r.len);
                    }
                    *got += 1;
                    self.repost(token)?;
                }
                other => bail!("fabric: unexpected completion {other:?}"),
            }
        }
        Ok(k)
    }

    /// Pinger: `n` round trips of `size` bytes, one in flight.
    fn round_trips(&mut self, size: usize, n: u64) -> Result<Duration> {
        self.prepare(size)?;
        let (mut sent, mut got) = (0, 0);
        let mut wd = Watchdog::new();
        let t = Instant::now();
        for i in 0..n {
            self.send(size, i)?;
            while got <= i {
                if self.step(size, &mut sent, &mut got)? == 0 {
                    wd.tick()?;
                }
            }
        }
        let el = t.elapsed();
        while sent < n {
            if self.step(size, &mut sent, &mut got)? == 0 {
                wd.tick()?;
            }
        }
        Ok(el)
    }

    /// Ponger: answers `n` messages of `size` bytes with its own.
    fn pong(&mut self, size: usize, n: u64) -> Result<()> {
        self.prepare(size)?;
        let (mut sent, mut got) = (0, 0);
        let mut wd = Watchdog::new();
        while sent < n {
            let before = got;
            if self.step(size, &mut sent, &mut got)? == 0 {
                wd.tick()?;
            }
            for i in before..got {
                self.send(size, i)?;
            }
        }
        Ok(())
    }

    /// Pinger: a one-way stream of `n` messages of `size` bytes; returns the
    /// time until the last send completed (was placed by the peer).
    fn stream(&mut self, size: usize, n: u64) -> Result<Duration> {
        self.prepare(size)?;
        let (mut posted, mut sent, mut got) = (0, 0, 0);
        let mut wd = Watchdog::new();
        let t = Instant::now();
        while sent < n {
            while posted < n && posted - sent < IN_FLIGHT {
                self.send(size, posted)?;
                posted += 1;
            }
            if self.step(size, &mut sent, &mut got)? == 0 {
                wd.tick()?;
            }
        }
        Ok(t.elapsed())
    }

    /// Ponger: receives `n` messages of `size` bytes, re-posting each
    /// receive.
    fn sink(&mut self, size: usize, n: u64) -> Result<()> {
        let (mut sent, mut got) = (0, 0);
        let mut wd = Watchdog::new();
        while got < n {
            if self.step(size, &mut sent, &mut got)? == 0 {
                wd.tick()?;
            }
        }
        Ok(())
    }
}

fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

fn unhex(s: &str) -> Result<Vec<u8>> {
    (0..s.len() / 2).map(|i| u8::from_str_radix(&s[2 * i..2 * i + 2], 16).context("blob hex")).collect()
}

/// The fabric peer: `blob 0 0 HEX` connects (replying its own blob),
/// `rtt SIZE N -` pongs, `rate SIZE N -` sinks; each replies `done` with
/// the credit messages it sent so far.
pub(crate) fn fabric_peer(mut ctx: PeerCtx) -> Result<()> {
    let (mut side, blob) = FabricSide::open(0)?;
    ctx.say("ready")?;
    while let Some(cmd) = ctx.next_cmd()? {
        match cmd.verb.as_str() {
            "blob" => {
                // Reply first: the parent connects while this side polls.
                ctx.say(&format!("blob {}", hex(&blob)))?;
                side.connect(&unhex(&cmd.mode)?)?;
                ctx.say("up")?;
                continue;
            }
            RTT => side.pong(cmd.size, cmd.n)?,
            RATE => side.sink(cmd.size, cmd.n)?,
            v => bail!("unknown command {v:?}"),
        }
        ctx.say(&format!("done {}", side.ep.stats().credit_msgs_sent))?;
    }
    Ok(())
}

/// The parent's fabric endpoint and its peer.
struct FabricPair {
    peer: Peer,
    side: FabricSide,
    /// Credit messages the peer sent, as of its last reply.
    peer_credits: u64,
}

impl FabricPair {
    fn new() -> Result<Self> {
        let mut peer = Peer::spawn(FABRIC_ROLE, &[], &[])?;
        let (mut side, blob) = FabricSide::open(1)?;
        peer.send(&format!("blob 0 0 {}", hex(&blob)))?;
        let theirs = unhex(peer.expect("blob")?.trim())?;
        side.connect(&theirs)?;
        peer.expect("up")?;
        Ok(Self { peer, side, peer_credits: 0 })
    }

    /// Nanoseconds per operation.
    fn measure(&mut self, verb: &str, size: usize, n: u64) -> Result<f64> {
        self.peer.send(&format!("{verb} {size} {n} -"))?;
        let el = if verb == RTT { self.side.round_trips(size, n)? } else { self.side.stream(size, n)? };
        self.peer_credits = self.peer.expect("done")?.trim().parse().unwrap_or(0);
        Ok(el.as_nanos() as f64 / n as f64)
    }
}

// ---------------------------------------------------------------- TCP side

/// TCP stream receiver reading through a 64 KiB buffer.
const BUFFERED: &str = "buf";
/// TCP stream receiver with one read per prefix and one per payload.
const UNBUFFERED: &str = "unbuf";
/// Bytes of the stream's length prefix.
const PREFIX: usize = 4;

struct TcpPair {
    peer: Peer,
    s: TcpStream,
    /// Length prefix room, then the payload.
    tx: Vec<u8>,
    rx: Vec<u8>,
}

impl TcpPair {
    fn new() -> Result<Self> {
        let listener = TcpListener::bind("127.0.0.1:0")?;
        let addr = listener.local_addr()?.to_string();
        // The peer connects before it says `ready`; `accept` returns at once.
        let peer = Peer::spawn(TCP_ROLE, &[], &[(ADDR_ENV, addr)])?;
        let (s, _) = listener.accept()?;
        s.set_nodelay(true)?;
        s.set_read_timeout(Some(WATCHDOG))?;
        s.set_write_timeout(Some(WATCHDOG))?;
        Ok(Self { peer, s, tx: vec![0x5A; PREFIX + MAX_SIZE], rx: vec![0; MAX_SIZE] })
    }

    fn measure(&mut self, verb: &str, size: usize, n: u64, mode: &str) -> Result<f64> {
        self.peer.send(&format!("{verb} {size} {n} {mode}"))?;
        let t = Instant::now();
        if verb == RTT {
            for _ in 0..n {
                self.s.write_all(&self.tx[..size])?;
                self.s.read_exact(&mut self.rx[..size])?;
            }
        } else {
            self.tx[..PREFIX].copy_from_slice(&(size as u32).to_le_bytes());
            for _ in 0..n {
                self.s.write_all(&self.tx[..PREFIX + size])?;
            }
            self.s.read_exact(&mut self.rx[..1])?;
        }
        let el = t.elapsed();
        self.peer.expect("done")?;
        Ok(el.as_nanos() as f64 / n as f64)
    }
}

/// The TCP peer: `rtt SIZE N -` reads and writes back N bytes, N times;
/// `rate SIZE N MODE` reads N length-prefixed messages ([`BUFFERED`]:
/// through a 64 KiB buffer; [`UNBUFFERED`]: one read for the prefix, one
/// for the payload), then acknowledges with one byte.
pub(crate) fn tcp_peer(mut ctx: PeerCtx) -> Result<()> {
    let s = TcpStream::connect(std::env::var(ADDR_ENV)?)?;
    s.set_nodelay(true)?;
    s.set_read_timeout(Some(WATCHDOG))?;
    s.set_write_timeout(Some(WATCHDOG))?;
    let mut w = s.try_clone()?;
    let mut r = BufReader::with_capacity(64 << 10, s);
    let tx = vec![0xA5u8; MAX_SIZE];
    let mut rx = vec![0u8; MAX_SIZE];
    ctx.say("ready")?;
    while let Some(cmd) = ctx.next_cmd()? {
        let size = cmd.size.min(MAX_SIZE);
        match cmd.verb.as_str() {
            RTT => {
                for _ in 0..cmd.n {
                    r.get_mut().read_exact(&mut rx[..size])?;
                    w.write_all(&tx[..size])?;
                }
            }
            RATE => {
                let buffered = cmd.mode == BUFFERED;
                for _ in 0..cmd.n {
                    let mut p = [0u8; PREFIX];
                    let src: &mut dyn Read = if buffered { &mut r } else { r.get_mut() };
                    src.read_exact(&mut p)?;
                    let len = u32::from_le_bytes(p) as usize;
                    if len > MAX_SIZE {
                        bail!("message of {len} bytes");
                    }
                    src.read_exact(&mut rx[..len])?;
                }
                w.write_all(&[1])?;
            }
            v => bail!("unknown command {v:?}"),
        }
        // The sender waits for this reply before it sends again, so
        // nothing may be left in the buffer.
        if !r.buffer().is_empty() {
            bail!("{} bytes beyond the last message", r.buffer().len());
        }
        ctx.say("done")?;
    }
    Ok(())
}

// ------------------------------------------------------------------ runner

struct Plan {
    rounds: usize,
    /// Target time of one measurement.
    budget: Duration,
}

/// Operations per measurement so that one takes about `budget`, from a
/// calibration sample of `ns` per operation.
fn ops_for(budget: Duration, ns: f64, min: u64) -> u64 {
    ((budget.as_nanos() as f64 / ns.max(1.0)) as u64).clamp(min, 2_000_000)
}

fn run(opts: &Opts) -> Result<Report> {
    let plan = if opts.quick {
        Plan { rounds: 5, budget: Duration::from_millis(60) }
    } else {
        Plan { rounds: 9, budget: Duration::from_millis(250) }
    };
    let pinned = pin_pinger()?;
    let mut fab = FabricPair::new().context("fabric pair")?;
    let mut tcp = TcpPair::new().context("TCP pair")?;

    // Per size and measurement (fabric rtt, tcp rtt, fabric rate, tcp rate):
    // operations per round, calibrated on a short warm-up.
    // (fabric?, verb, mode) of each measurement.
    const M: usize = 5;
    let plan_m: [(bool, &str, &str); M] =
        [(true, RTT, "-"), (false, RTT, "-"), (true, RATE, "-"), (false, RATE, BUFFERED), (false, RATE, UNBUFFERED)];
    let mut n = [[0u64; M]; SIZES.len()];
    for (si, &size) in SIZES.iter().enumerate() {
        for (m, &(is_fab, verb, mode)) in plan_m.iter().enumerate() {
            let (warm, min) = if verb == RTT { (50, 20) } else { (2 * IN_FLIGHT, 2 * IN_FLIGHT) };
            let ns = if is_fab { fab.measure(verb, size, warm)? } else { tcp.measure(verb, size, warm, mode)? };
            n[si][m] = ops_for(plan.budget, ns, min);
        }
    }
    let mut samples: Vec<Vec<Vec<f64>>> =
        SIZES.iter().map(|_| (0..M).map(|_| Vec::with_capacity(plan.rounds)).collect()).collect();
    let mut stream_msgs = 0u64;
    let mut rtt_msgs = 0u64;
    let mut credit_split = [(0u64, 0u64); 2];
    for _ in 0..plan.rounds {
        for (si, &size) in SIZES.iter().enumerate() {
            for (m, &(is_fab, verb, mode)) in plan_m.iter().enumerate() {
                let k = n[si][m];
                let ns = if is_fab {
                    let before = (fab.side.ep.stats().credit_msgs_sent, fab.peer_credits);
                    let ns = fab.measure(verb, size, k)?;
                    let after = (fab.side.ep.stats().credit_msgs_sent, fab.peer_credits);
                    let which = usize::from(verb == RATE);
                    credit_split[which].0 += after.0 - before.0;
                    credit_split[which].1 += after.1 - before.1;
                    if verb == RTT {
                        rtt_msgs += k;
                    } else {
                        stream_msgs += k;
                    }
                    ns
                } else {
                    tcp.measure(verb, size, k, mode)?
                };
                samples[si][m].push(ns);
            }
        }
    }
    let stats: Vec<Vec<Stats>> = samples.iter_mut().map(|v| v.iter_mut().map(|s| Stats::of(s)).collect()).collect();
    drop(fab);
    drop(tcp);

    let mut report = Report::default();
    let mut rtt = Table::new(
        format!(
            "round trip, one message in flight (us, median of {} rounds; {}; target fabric <= {RTT_TARGET}x TCP)",
            plan.rounds,
            if pinned { "pinger and ponger on cores 0 and 1" } else { "unpinned" }
        ),
        &["size", "fabric", "fabric min..max", "TCP", "TCP min..max", "fabric/TCP", "target"],
    );
    let mut rate = Table::new(
        format!(
            "one-way stream (median of {} rounds; fabric <= {IN_FLIGHT} sends posted, {} receives; \
             TCP receiver buffered (64 KiB) or one read per prefix and payload; \
             target fabric >= {RATE_TARGET}x buffered TCP)",
            plan.rounds, RECVS
        ),
        &[
            "size",
            "fabric msg/s",
            "fabric GB/s",
            "TCP msg/s",
            "TCP GB/s",
            "fabric/TCP",
            "target",
            "TCP unbuf msg/s",
            "fabric/unbuf",
        ],
    );
    let (mut rtt_worst, mut rate_worst) = ((0.0f64, 0usize), (f64::INFINITY, 0usize));
    let us = |ns: f64| fmt_num(ns / 1000.0);
    let met = |ok: bool| if ok { "met" } else { "MISSED" }.to_owned();
    let mut keys = Vec::new();
    let mut unbuf_worst = f64::INFINITY;
    for (si, &size) in SIZES.iter().enumerate() {
        let [f_rtt, t_rtt, f_rate, t_rate, u_rate] =
            [stats[si][0], stats[si][1], stats[si][2], stats[si][3], stats[si][4]];
        let r = f_rtt.median / t_rtt.median;
        if r > rtt_worst.0 {
            rtt_worst = (r, si);
        }
        rtt.row(vec![
            SIZE_NAMES[si].into(),
            us(f_rtt.median),
            format!("{}..{}", us(f_rtt.min), us(f_rtt.max)),
            us(t_rtt.median),
            format!("{}..{}", us(t_rtt.min), us(t_rtt.max)),
            fmt_num(r),
            met(r <= RTT_TARGET),
        ]);
        let (f_mps, t_mps, u_mps) = (1e9 / f_rate.median, 1e9 / t_rate.median, 1e9 / u_rate.median);
        let q = f_mps / t_mps;
        if q < rate_worst.0 {
            rate_worst = (q, si);
        }
        unbuf_worst = unbuf_worst.min(f_mps / u_mps);
        let gbs = |mps: f64| fmt_num(mps * size as f64 / 1e9);
        rate.row(vec![
            SIZE_NAMES[si].into(),
            fmt_num(f_mps),
            gbs(f_mps),
            fmt_num(t_mps),
            gbs(t_mps),
            fmt_num(q),
            met(q >= RATE_TARGET),
            fmt_num(u_mps),
            fmt_num(f_mps / u_mps),
        ]);
        keys.push((si, f_rtt.median / 1000.0, t_rtt.median / 1000.0, f_mps, t_mps, u_mps));
    }
    let per = |c: u64, msgs: u64| if msgs == 0 { 0.0 } else { c as f64 / msgs as f64 };
    let mut notes =
        Table::new("fabric protocol overhead (measured rounds)", &["pattern", "credit msgs per data msg", "from"]);
    notes.row(vec![
        "round trip".into(),
        fmt_num(per(credit_split[0].0 + credit_split[0].1, 2 * rtt_msgs)),
        "both sides".into(),
    ]);
    notes.row(vec!["stream".into(), fmt_num(per(credit_split[1].1, stream_msgs)), "receiver".into()]);
    report.tables = vec![rtt, rate, notes];

    let rtt_ok = rtt_worst.0 <= RTT_TARGET;
    let rate_ok = rate_worst.0 >= RATE_TARGET;
    report.put("rtt_ratio_vs_tcp_max", rtt_worst.0);
    report.put("rtt_ratio_worst_size", SIZE_KEYS[rtt_worst.1]);
    report.put("rate_ratio_vs_tcp_min", rate_worst.0);
    report.put("rate_ratio_worst_size", SIZE_KEYS[rate_worst.1]);
    report.put("rtt_target", if rtt_ok { "met" } else { "missed" });
    report.put("rate_target", if rate_ok { "met" } else { "missed" });
    report.put("rate_ratio_vs_tcp_unbuffered_min", unbuf_worst);
    for (si, f_rtt, t_rtt, f_mps, t_mps, u_mps) in keys {
        let k = SIZE_KEYS[si];
        report.put(&format!("fabric_rtt_us_{k}"), f_rtt);
        report.put(&format!("tcp_rtt_us_{k}"), t_rtt);
        report.put(&format!("fabric_rate_mps_{k}"), f_mps);
        report.put(&format!("tcp_rate_mps_{k}"), t_mps);
        report.put(&format!("tcp_unbuf_rate_mps_{k}"), u_mps);
    }
    report.put("max_msg", u64::from(cfg().max_msg));
    report.put("credit_msgs_per_msg_stream", per(credit_split[1].1, stream_msgs));
    Ok(report)
}

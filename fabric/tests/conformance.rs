//! The `fabric` conformance suite: written once against [`Transport`] and
//! [`Endpoint`], run for every backend this build has:
//!
//! * `doca` (always; the emulated DOCA backend here, the SDK with
//!   `doca/sdk`);
//! * `verbs` (with the feature `verbs-hw`): rdma-core ibverbs on the device
//!   `DNE_VERBS_DEVICE` names, or the first one. It needs an RDMA device
//!   (SoftRoCE will do, see README.md); without one every test of it fails
//!   loudly, it never passes by testing nothing. Imported memory is a DOCA
//!   notion: that one test says it is skipped for verbs.
//!
//! Waiting is bounded by a watchdog; nothing asserts on elapsed time. The
//! peer-death test also runs the peer in a separate process (this binary
//! re-executed with `FABRIC_CONF_ROLE=peer`) and kills it mid-stream.

// The peer process talks to its parent on stdout; skips are printed.
#![allow(clippy::print_stdout, clippy::too_many_arguments)]

use fabric::*;
use std::sync::Arc;
use std::time::{Duration, Instant};
use wire::Descriptor;
use zerocopy::IntoBytes;

const WATCHDOG: Duration = Duration::from_secs(30);
const BUF: u64 = 16 * 1024;
const REGION: usize = 8 << 20;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Side {
    A,
    B,
}

struct Watch {
    start: Instant,
    what: String,
}

impl Watch {
    fn new(what: impl Into<String>) -> Self {
        Self { start: Instant::now(), what: what.into() }
    }
    fn check(&self) {
        assert!(self.start.elapsed() < WATCHDOG, "watchdog: {} did not happen", self.what);
    }
}

fn region() -> Arc<shm::Region> {
    Arc::new(shm::Region::create("dne-fabric-conf", REGION, shm::PagePolicy::Normal).expect("memfd region"))
}

fn cfg() -> EndpointConfig {
    EndpointConfig { max_conns: 4, send_window: 16, recv_depth: 32, send_queue: 256, ..Default::default() }
}

/// One side: endpoint, its local region and the region's id.
struct Node<T: Transport> {
    ep: Endpoint<T>,
    mem: Arc<shm::Region>,
    reg: RegionId,
}

fn node<T: Transport>(make: fn(&EndpointConfig) -> T, cfg: EndpointConfig) -> Node<T> {
    let mut ep = Endpoint::new(make(&cfg), cfg);
    let mem = region();
    let reg = ep.register(Memory::Local(mem.clone())).expect("register a local region");
    Node { ep, mem, reg }
}

/// Polls both endpoints once; returns what completed.
fn step<T: Transport>(a: &mut Node<T>, b: &mut Node<T>) -> Vec<(Side, Completion)> {
    let mut out = [Completion::EMPTY; 32];
    let mut v = Vec::new();
    let n = a.ep.poll(&mut out);
    v.extend(out[..n].iter().map(|c| (Side::A, *c)));
    let n = b.ep.poll(&mut out);
    v.extend(out[..n].iter().map(|c| (Side::B, *c)));
    if v.is_empty() {
        std::thread::yield_now();
    }
    v
}

/// Two connected nodes.
fn pair<T: Transport>(make: fn(&EndpointConfig) -> T, cfg: EndpointConfig) -> (Node<T>, Node<T>, ConnId, ConnId) {
    let mut a = node(make, cfg);
    let mut b = node(make, cfg);
    let (ca, blob_a) = a.ep.open(ConnSpec { tenant: 1, peer: 2 }).expect("open a");
    let (cb, blob_b) = b.ep.open(ConnSpec { tenant: 1, peer: 1 }).expect("open b");
    a.ep.connect(ca, &blob_b).expect("connect a");
    b.ep.connect(cb, &blob_a).expect("connect b");
    let (mut up_a, mut up_b) = (false, false);
    let w = Watch::new("connection");
    while !(up_a && up_b) {
        w.check();
        for (s, c) in step(&mut a, &mut b) {
            match (s, c) {
                (Side::A, Completion::Connected(c)) if c == ca => up_a = true,
                (Side::B, Completion::Connected(c)) if c == cb => up_b = true,
                other => panic!("unexpected completion while connecting: {other:?}"),
            }
        }
    }
    assert_eq!(a.ep.spec(ca), Some(ConnSpec { tenant: 1, peer: 2 }));
    reserve_recv(&mut a, ca);
    (a, b, ca, cb)
}

/// The sender's first receive: kept by its endpoint for the credit
/// messages of the peer (a side that posts no receive hears no credits).
fn reserve_recv<T: Transport>(n: &mut Node<T>, conn: ConnId) {
    n.ep.post_recv(conn, RecvWr { region: n.reg, offset: REGION as u64 - BUF, len: BUF as u32, token: 5000 }).unwrap();
}

fn pattern(seed: u64, len: usize) -> Vec<u8> {
    (0..len).map(|i| (i as u64).wrapping_mul(31).wrapping_add(seed.wrapping_mul(7919)) as u8).collect()
}

/// Writes fragment `index` of `count` (header + `payload`) at `offset`;
/// returns the send.
fn write_frag(
    mem: &shm::Region,
    reg: RegionId,
    offset: u64,
    index: u16,
    count: u16,
    payload: &[u8],
    total: u32,
    token: u64,
) -> SendWr {
    let d = Descriptor { tenant: 1, dst_fn: 5, len: total, ..Default::default() };
    let h = FabricHeader::new(MsgKind::Data, d, index, count, payload.len() as u32);
    mem.copy_in(offset, h.as_bytes()).unwrap();
    mem.copy_in(offset + HEADER_LEN as u64, payload).unwrap();
    let imm = Immediate::new(MsgKind::Data as u8, 5, index == 0, index + 1 == count).0;
    SendWr { region: reg, offset, len: (HEADER_LEN + payload.len()) as u32, imm, token }
}

fn post_recvs<T: Transport>(n: &mut Node<T>, conn: ConnId, first: u64, count: u64) {
    for i in first..first + count {
        let wr = RecvWr { region: n.reg, offset: (REGION as u64 / 2) + (i % 128) * BUF, len: BUF as u32, token: i };
        n.ep.post_recv(conn, wr).expect("post a receive");
    }
}

fn read(mem: &shm::Region, offset: u64, len: usize) -> Vec<u8> {
    let mut v = vec![0; len];
    mem.copy_out(offset, &mut v).unwrap();
    v
}

// ---------------------------------------------------------------- tests

/// Receiver-side bookkeeping: what landed, in order, verified.
struct Sink {
    next_token: u64,
    got: Vec<(u64, Received)>,
}

impl Sink {
    fn new(posted: u64) -> Self {
        Self { next_token: posted, got: Vec::new() }
    }
}

/// Handles one completion on the receiving side B: verifies the bytes of a
/// message against `expect(seq)` and re-posts a receive.
fn on_b<T: Transport>(b: &mut Node<T>, cb: ConnId, sink: &mut Sink, c: Completion, expect: &dyn Fn(u64) -> Vec<u8>) {
    match c {
        Completion::Received { conn, token, result: Ok(r) } => {
            assert_eq!(conn, cb);
            let seq = sink.got.len() as u64;
            let offset = (REGION as u64 / 2) + (token % 128) * BUF;
            let bytes = read(&b.mem, offset + HEADER_LEN as u64, r.len as usize - HEADER_LEN);
            assert_eq!(bytes, expect(seq), "payload of message {seq} (receive token {token})");
            sink.got.push((token, r));
            post_recvs(b, cb, sink.next_token, 1);
            sink.next_token += 1;
        }
        other => panic!("unexpected completion on the receiver: {other:?}"),
    }
}

/// Messages arrive in order per connection, with their immediates and
/// bytes, in the receives the receiver chose; sends complete once placed.
fn ordering_and_immediates<T: Transport>(make: fn(&EndpointConfig) -> T) {
    let (mut a, mut b, ca, cb) = pair(make, cfg());
    post_recvs(&mut b, cb, 0, 32);
    const N: u64 = 200;
    let size = |i: u64| (i as usize * 37) % 4000 + 1;
    for i in 0..N {
        let payload = pattern(i, size(i));
        // Distinct source buffers: none is rewritten before its send completes.
        let wr = write_frag(&a.mem, a.reg, i * BUF, 0, 1, &payload, payload.len() as u32, 1000 + i);
        a.ep.post_send(ca, wr).expect("post a send");
    }
    let mut sink = Sink::new(32);
    let mut sent = Vec::new();
    let w = Watch::new("200 messages");
    while sent.len() < N as usize || sink.got.len() < N as usize {
        w.check();
        for (s, c) in step(&mut a, &mut b) {
            match s {
                Side::A => match c {
                    Completion::Sent { conn, token, result: Ok(()) } if conn == ca => sent.push(token),
                    other => panic!("unexpected completion on the sender: {other:?}"),
                },
                Side::B => on_b(&mut b, cb, &mut sink, c, &|seq| pattern(seq, size(seq))),
            }
        }
    }
    assert_eq!(sent, (1000..1000 + N).collect::<Vec<_>>(), "sends complete in order");
    let imm = Immediate::new(MsgKind::Data as u8, 5, true, true).0;
    for (seq, (_, r)) in sink.got.iter().enumerate() {
        assert_eq!(r.imm, imm);
        assert_eq!(r.len as usize, HEADER_LEN + size(seq as u64));
        assert_eq!(r.frag, Frag { index: 0, last: true });
    }
    assert!(a.ep.stats().credit_msgs_received >= 1, "credits came from the receiver");
}

/// A chain of buffers is one send per buffer; the receiver gets each
/// fragment's place and reassembles the chain.
fn chains<T: Transport>(make: fn(&EndpointConfig) -> T) {
    let (mut a, mut b, ca, cb) = pair(make, cfg());
    post_recvs(&mut b, cb, 0, 32);
    const FRAGS: u16 = 7;
    let frag_len = (BUF as usize) - HEADER_LEN;
    let whole = pattern(99, frag_len * FRAGS as usize - 1000);
    let chunks: Vec<&[u8]> = whole.chunks(frag_len).collect();
    assert_eq!(chunks.len(), FRAGS as usize);
    for (i, chunk) in chunks.iter().enumerate() {
        let wr = write_frag(&a.mem, a.reg, i as u64 * BUF, i as u16, FRAGS, chunk, whole.len() as u32, i as u64);
        a.ep.post_send(ca, wr).unwrap();
    }
    let mut chain: Vec<u8> = Vec::new();
    let mut frags = Vec::new();
    let mut sent = 0;
    let w = Watch::new("a chain");
    while frags.last().is_none_or(|f: &Frag| !f.last) || sent < FRAGS {
        w.check();
        for (s, c) in step(&mut a, &mut b) {
            match (s, c) {
                (Side::A, Completion::Sent { result: Ok(()), .. }) => sent += 1,
                (Side::B, Completion::Received { token, result: Ok(r), .. }) => {
                    let offset = (REGION as u64 / 2) + (token % 128) * BUF;
                    chain.extend(read(&b.mem, offset + HEADER_LEN as u64, r.len as usize - HEADER_LEN));
                    assert_eq!(Immediate(r.imm).is_first(), r.frag.index == 0);
                    frags.push(r.frag);
                }
                other => panic!("unexpected completion: {other:?}"),
            }
        }
    }
    assert_eq!(frags.iter().map(|f| f.index).collect::<Vec<_>>(), (0..FRAGS).collect::<Vec<_>>());
    assert_eq!(frags.iter().filter(|f| f.last).count(), 1);
    assert!(chain == whole, "the reassembled chain equals what was sent");
}

/// A sender never posts more than the receiver granted; the rest waits in
/// its queue (never dropped) and goes once the receiver posts receives.
/// Sends posted before the receiver posted anything wait too.
fn credits_and_waits<T: Transport>(make: fn(&EndpointConfig) -> T) {
    let (mut a, mut b, ca, cb) = pair(make, cfg());
    const N: u64 = 40;
    let mut wire = 0;
    for i in 0..N {
        let p = pattern(i, 100);
        let wr = write_frag(&a.mem, a.reg, i * BUF, 0, 1, &p, 100, i);
        wire = u64::from(wr.len);
        a.ep.post_send(ca, wr).unwrap();
    }
    assert_eq!(a.ep.credits(ca), 0, "no receive posted, no credit");
    assert_eq!(a.ep.queued(ca), N as usize);
    assert_eq!(a.ep.queued_bytes(), N * wire);
    // Receiver not ready: nothing may move (bounded number of polls).
    for _ in 0..200 {
        assert!(step(&mut a, &mut b).is_empty(), "nothing completes before the receiver posts");
    }
    // Five receives: one is kept for credit messages, four are granted.
    post_recvs(&mut b, cb, 0, 5);
    let mut got = 0;
    let w = Watch::new("four granted messages");
    while got < 4 {
        w.check();
        for (s, c) in step(&mut a, &mut b) {
            match (s, c) {
                (Side::B, Completion::Received { result: Ok(_), .. }) => got += 1,
                (Side::A, Completion::Sent { result: Ok(()), .. }) => {}
                other => panic!("unexpected completion: {other:?}"),
            }
        }
    }
    for _ in 0..500 {
        for (s, c) in step(&mut a, &mut b) {
            assert!(
                !matches!((s, c), (Side::B, Completion::Received { .. })),
                "more messages than credits granted: {c:?}"
            );
        }
    }
    assert_eq!(a.ep.queued(ca), N as usize - 4, "the rest waits, none dropped");
    assert_eq!(a.ep.queued_bytes(), (N - 4) * wire);
    // Now receive everything, re-posting as we go.
    let mut sink = Sink::new(5);
    sink.got.extend((0..4).map(|i| (i, Received { len: 0, imm: 0, frag: Frag { index: 0, last: true } })));
    for _ in 0..4 {
        post_recvs(&mut b, cb, sink.next_token, 1);
        sink.next_token += 1;
    }
    let w = Watch::new("all queued messages");
    while sink.got.len() < N as usize {
        w.check();
        for (s, c) in step(&mut a, &mut b) {
            match s {
                Side::A => assert!(matches!(c, Completion::Sent { result: Ok(()), .. }), "{c:?}"),
                Side::B => on_b(&mut b, cb, &mut sink, c, &|seq| pattern(seq, 100)),
            }
        }
    }
    assert_eq!(a.ep.queued(ca), 0);
    assert_eq!(a.ep.queued_bytes(), 0);
}

/// A full send queue is an explicit error, not a drop.
fn queue_full<T: Transport>(make: fn(&EndpointConfig) -> T) {
    let (mut a, _b, ca, _cb) = pair(make, EndpointConfig { send_queue: 3, ..cfg() });
    let p = pattern(1, 10);
    for i in 0..3 {
        a.ep.post_send(ca, write_frag(&a.mem, a.reg, i * BUF, 0, 1, &p, 10, i)).unwrap();
    }
    let e = a.ep.post_send(ca, write_frag(&a.mem, a.reg, 3 * BUF, 0, 1, &p, 10, 3));
    assert_eq!(e, Err(WorkPostError::QueueFull));
    let bad = SendWr { region: a.reg, offset: 0, len: 10, imm: u32::MAX, token: 9 };
    assert_eq!(a.ep.post_send(ca, bad), Err(WorkPostError::BadImmediate(u32::MAX)));
    assert_eq!(a.ep.post_send(ca, SendWr { len: 0, imm: 1 << 16, ..bad }), Err(WorkPostError::Empty));
    let oob = SendWr { offset: REGION as u64 - 4, imm: 1 << 16, ..bad };
    assert_eq!(a.ep.post_send(ca, oob), Err(WorkPostError::OutOfRange));
}

/// Collects, until the watchdog, the errors of every outstanding operation
/// on `side`'s connection after a failure; returns (failed sends, failed
/// receives, connection error).
fn collect_failure<T: Transport>(
    n: &mut Node<T>,
    other: &mut dyn FnMut(),
    sends: usize,
    recvs: usize,
    what: &str,
) -> (Vec<CompletionError>, Vec<CompletionError>, CompletionError) {
    let (mut s_err, mut r_err, mut conn_err) = (Vec::new(), Vec::new(), None);
    let mut out = [Completion::EMPTY; 16];
    let w = Watch::new(what);
    while s_err.len() < sends || r_err.len() < recvs || conn_err.is_none() {
        w.check();
        other();
        let k = n.ep.poll(&mut out);
        for c in &out[..k] {
            match *c {
                Completion::ConnFailed { error, .. } => {
                    assert!(conn_err.is_none(), "one ConnFailed per connection");
                    conn_err = Some(error);
                }
                Completion::Sent { result: Err(e), .. } => s_err.push(e),
                Completion::Received { result: Err(e), .. } => r_err.push(e),
                // Operations that completed before the failure.
                Completion::Connected(_)
                | Completion::Sent { result: Ok(()), .. }
                | Completion::Received { result: Ok(_), .. } => {}
            }
        }
        if k == 0 {
            std::thread::yield_now();
        }
    }
    (s_err, r_err, conn_err.unwrap_or(CompletionError::Closed))
}

/// A peer that disappears mid-stream: every outstanding operation
/// completes with a typed error, the connection fails, nothing hangs.
fn peer_vanishes<T: Transport>(make: fn(&EndpointConfig) -> T) {
    let (mut a, mut b, ca, cb) = pair(make, cfg());
    post_recvs(&mut a, ca, 0, 8); // A's receives: outstanding when B goes
    post_recvs(&mut b, cb, 0, 3); // B grants 2
    for i in 0..20 {
        let p = pattern(i, 500);
        a.ep.post_send(ca, write_frag(&a.mem, a.reg, i * BUF, 0, 1, &p, 500, i)).unwrap();
    }
    // Let some traffic flow, B never re-posts.
    let mut got = 0;
    let w = Watch::new("two messages");
    let mut sent_ok = 0;
    while got < 2 {
        w.check();
        for (s, c) in step(&mut a, &mut b) {
            match (s, c) {
                (Side::B, Completion::Received { result: Ok(_), .. }) => got += 1,
                (Side::A, Completion::Sent { result: Ok(()), .. }) => sent_ok += 1,
                other => panic!("unexpected completion: {other:?}"),
            }
        }
    }
    drop(b);
    let (s, r, e) = collect_failure(&mut a, &mut || {}, 20 - sent_ok - 2, 9, "failure of every outstanding operation");
    assert_eq!(e, CompletionError::PeerGone);
    assert!(s.iter().chain(&r).all(|e| *e == CompletionError::PeerGone), "{s:?} {r:?}");
    assert_eq!(a.ep.queued_bytes(), 0, "the queued sends failed: none waits");
    assert!(matches!(
        a.ep.post_send(ca, SendWr { region: a.reg, offset: 0, len: 50, imm: 1 << 16, token: 0 }),
        Err(WorkPostError::Failed(_))
    ));
}

/// Closing a connection fails its outstanding work with `Closed` here and
/// the connection at the peer.
fn close_fails_outstanding<T: Transport>(make: fn(&EndpointConfig) -> T) {
    let (mut a, mut b, ca, cb) = pair(make, cfg());
    post_recvs(&mut a, ca, 0, 6);
    let p = pattern(3, 10);
    for i in 0..5 {
        a.ep.post_send(ca, write_frag(&a.mem, a.reg, i * BUF, 0, 1, &p, 10, i)).unwrap();
    }
    a.ep.close(ca);
    let (s, r, e) = collect_failure(&mut a, &mut || {}, 5, 7, "close");
    assert_eq!(e, CompletionError::Closed);
    assert!(s.iter().chain(&r).all(|e| *e == CompletionError::Closed), "{s:?} {r:?}");
    let (_, _, e) = collect_failure(&mut b, &mut || {}, 0, 0, "the peer sees the close");
    assert!(matches!(e, CompletionError::PeerGone | CompletionError::Aborted), "{e:?}");
    let _ = cb;
}

/// A peer that sends garbage (a bad header, a missing immediate): the
/// receiver fails the connection with a protocol error; no panic.
fn garbage_peer<T: Transport>(make: fn(&EndpointConfig) -> T) {
    // Bad header bytes behind a valid immediate, through an endpoint.
    let (mut a, mut b, ca, cb) = pair(make, cfg());
    post_recvs(&mut b, cb, 0, 4);
    a.mem.copy_in(0, &[0xEE; 200]).unwrap();
    let imm = Immediate::new(MsgKind::Data as u8, 1, true, true).0;
    a.ep.post_send(ca, SendWr { region: a.reg, offset: 0, len: 200, imm, token: 1 }).unwrap();
    let mut a_out = [Completion::EMPTY; 16];
    let mut a_events = Vec::new();
    let (_, r, e) = collect_failure(
        &mut b,
        &mut || {
            let k = a.ep.poll(&mut a_out);
            a_events.extend_from_slice(&a_out[..k]);
        },
        0,
        4,
        "protocol failure at the receiver",
    );
    assert!(matches!(e, CompletionError::Protocol(RecvCheckError::Header(_))), "{e:?}");
    assert!(r.iter().all(|x| *x == e), "{r:?}");
    assert_eq!(b.ep.stats().protocol_errors, 1);
    let (_, _, e) = match a_events.iter().find_map(|c| match c {
        Completion::ConnFailed { error, .. } => Some(*error),
        _ => None,
    }) {
        Some(e) => (vec![], vec![], e),
        None => collect_failure(&mut a, &mut || {}, 0, 0, "the garbage sender loses its connection"),
    };
    assert!(matches!(e, CompletionError::PeerGone | CompletionError::Aborted), "{e:?}");

    // A raw transport peer that sends without an immediate.
    let cfg = cfg();
    let mut raw = make(&cfg);
    let mem = region();
    let (rr, rc) = (RegionId::new(0), ConnId::new(0));
    raw.register(rr, Memory::Local(mem)).unwrap();
    let blob_r = raw.open(rc, ConnDepth { sends: 4, recvs: 4, max_msg: 1 << 16 }).unwrap();
    let mut b = node(make, cfg);
    let (cb, blob_b) = b.ep.open(ConnSpec::default()).unwrap();
    b.ep.connect(cb, &blob_r).unwrap();
    raw.connect(rc, &blob_b).unwrap();
    post_recvs(&mut b, cb, 0, 4);
    let mut raw_out = [RawCompletion::EMPTY; 8];
    let mut sent = false;
    let (_, r, e) = collect_failure(
        &mut b,
        &mut || {
            let k = raw.poll(&mut raw_out);
            if !sent && raw_out[..k].iter().any(|c| matches!(c, RawCompletion::Connected(_))) {
                raw.send(rc, Some((rr, 0, 100)), None, 7).unwrap();
                sent = true;
            }
        },
        0,
        4,
        "protocol failure on a send without an immediate",
    );
    assert_eq!(e, CompletionError::Protocol(RecvCheckError::NoImmediate(100)));
    assert!(r.iter().all(|x| *x == e), "{r:?}");
}

/// Memory imported from another process's export can be sent from and
/// received into (never read by the importer; only the immediate is
/// checked on receipt).
fn imported_memory<T: Transport>(make: fn(&EndpointConfig) -> T, export: fn(&T, &Arc<shm::Region>) -> Option<Vec<u8>>) {
    let (mut a, mut b, ca, cb) = pair(make, cfg());
    let host_a = region();
    let host_b = region();
    let (Some(ea), Some(eb)) = (export(a.ep.transport(), &host_a), export(b.ep.transport(), &host_b)) else {
        println!("skipped: the {} backend cannot import exported memory", a.ep.transport().name());
        return;
    };
    let ra = a.ep.register(Memory::Export(&ea)).expect("import on a");
    let rb = b.ep.register(Memory::Export(&eb)).expect("import on b");
    for i in 0..4 {
        b.ep.post_recv(cb, RecvWr { region: rb, offset: i * BUF, len: BUF as u32, token: i }).unwrap();
    }
    let p = pattern(42, 3000);
    let wr = write_frag(&host_a, ra, 5 * BUF, 0, 1, &p, 3000, 77);
    a.ep.post_send(ca, wr).unwrap();
    let mut done = (false, None);
    let w = Watch::new("a send between imported pools");
    while !done.0 || done.1.is_none() {
        w.check();
        for (s, c) in step(&mut a, &mut b) {
            match (s, c) {
                (Side::A, Completion::Sent { token: 77, result: Ok(()), .. }) => done.0 = true,
                (Side::B, Completion::Received { token, result: Ok(r), .. }) => done.1 = Some((token, r)),
                other => panic!("unexpected completion: {other:?}"),
            }
        }
    }
    let (token, r) = done.1.unwrap();
    assert_eq!(r.len as usize, HEADER_LEN + 3000);
    assert_eq!(read(&host_b, token * BUF + HEADER_LEN as u64, 3000), p, "the bytes landed in the host's pool");
}

// ------------------------------------------------ multi-process peer death

const ROLE_ENV: &str = "FABRIC_CONF_ROLE";

/// Runs as the peer process when `FABRIC_CONF_ROLE=peer`: prints its blob,
/// reads the parent's, then streams messages until it is killed.
fn peer_process<T: Transport>(make: fn(&EndpointConfig) -> T) {
    use std::io::BufRead;
    let mut a = node(make, cfg());
    let (ca, blob) = a.ep.open(ConnSpec { tenant: 1, peer: 0 }).unwrap();
    reserve_recv(&mut a, ca);
    println!("BLOB {}", hex(&blob));
    let mut line = String::new();
    std::io::stdin().lock().read_line(&mut line).unwrap();
    a.ep.connect(ca, &unhex(line.trim())).unwrap();
    let mut out = [Completion::EMPTY; 32];
    let mut i = 0u64;
    loop {
        if a.ep.queued(ca) < 64 {
            let p = pattern(i, 1000);
            a.ep.post_send(ca, write_frag(&a.mem, a.reg, (i % 256) * BUF, 0, 1, &p, 1000, i)).unwrap();
            i += 1;
        }
        a.ep.poll(&mut out);
    }
}

fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

fn unhex(s: &str) -> Vec<u8> {
    (0..s.len() / 2).map(|i| u8::from_str_radix(&s[2 * i..2 * i + 2], 16).unwrap()).collect()
}

/// The peer is a separate process, killed mid-stream.
fn peer_process_killed<T: Transport>(make: fn(&EndpointConfig) -> T, backend: &str, test_name: &str) {
    use std::io::{BufRead, BufReader, Write};
    if std::env::var_os("DNE_QEMU_USER").is_some() {
        println!("skipped: re-executing the test binary as a peer process is not possible under qemu-user");
        return;
    }
    let mut child = std::process::Command::new(std::env::current_exe().unwrap())
        .args([test_name, "--exact", "--nocapture", "--test-threads=1"])
        .env(ROLE_ENV, backend)
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .spawn()
        .expect("spawn the peer process");
    let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
    let blob = loop {
        let l = lines.next().expect("peer output").expect("peer output");
        // libtest may print "test name ... " on the same line first.
        if let Some(i) = l.find("BLOB ") {
            break unhex(l[i + 5..].trim());
        }
    };
    let mut b = node(make, cfg());
    let (cb, mine) = b.ep.open(ConnSpec { tenant: 1, peer: 9 }).unwrap();
    b.ep.connect(cb, &blob).unwrap();
    writeln!(child.stdin.as_mut().unwrap(), "{}", hex(&mine)).unwrap();
    post_recvs(&mut b, cb, 0, 32);
    let mut out = [Completion::EMPTY; 32];
    let mut got = 0;
    let mut next = 32;
    let w = Watch::new("messages from the peer process");
    while got < 100 {
        w.check();
        let k = b.ep.poll(&mut out);
        for c in &out[..k] {
            match *c {
                Completion::Connected(_) => {}
                Completion::Received { result: Ok(r), .. } => {
                    assert_eq!(r.len as usize, HEADER_LEN + 1000);
                    got += 1;
                    post_recvs(&mut b, cb, next, 1);
                    next += 1;
                }
                other => panic!("unexpected completion: {other:?}"),
            }
        }
    }
    child.kill().expect("kill the peer");
    child.wait().unwrap();
    // Every posted receive fails with PeerGone; messages already in flight
    // may still land first.
    let outstanding = (next - got) as usize;
    let mut failed = 0;
    let mut conn_err = None;
    let w = Watch::new("failure of every outstanding receive after the peer was killed");
    while failed < outstanding || conn_err.is_none() {
        w.check();
        let k = b.ep.poll(&mut out);
        for c in &out[..k] {
            match *c {
                Completion::Received { result: Ok(_), .. } => failed += 1,
                Completion::Received { result: Err(e), .. } => {
                    assert_eq!(e, CompletionError::PeerGone);
                    failed += 1;
                }
                Completion::ConnFailed { error, .. } => conn_err = Some(error),
                other => panic!("unexpected completion: {other:?}"),
            }
        }
        if k == 0 {
            std::thread::yield_now();
        }
    }
    assert_eq!(conn_err, Some(CompletionError::PeerGone));
}

// ------------------------------------------------------------- backends

macro_rules! conformance {
    ($backend:ident, $make:path, $export:path) => {
        mod $backend {
            use super::*;

            #[test]
            fn ordering_and_immediates() {
                super::ordering_and_immediates($make);
            }
            #[test]
            fn chains() {
                super::chains($make);
            }
            #[test]
            fn credits_and_waits() {
                super::credits_and_waits($make);
            }
            #[test]
            fn queue_full() {
                super::queue_full($make);
            }
            #[test]
            fn peer_vanishes() {
                super::peer_vanishes($make);
            }
            #[test]
            fn close_fails_outstanding() {
                super::close_fails_outstanding($make);
            }
            #[test]
            fn garbage_peer() {
                super::garbage_peer($make);
            }
            #[test]
            fn imported_memory() {
                super::imported_memory($make, $export);
            }
            #[test]
            fn peer_process_killed() {
                super::peer_process_killed(
                    $make,
                    stringify!($backend),
                    concat!(stringify!($backend), "::peer_process_entry"),
                );
            }
            /// The peer side of `peer_process_killed` (does nothing unless
            /// re-executed by it).
            #[test]
            fn peer_process_entry() {
                if std::env::var(ROLE_ENV).as_deref() == Ok(stringify!($backend)) {
                    super::peer_process($make);
                }
            }
        }
    };
}

fn make_doca(cfg: &EndpointConfig) -> DocaTransport {
    let devs = ::doca::devices().expect("DOCA device discovery");
    assert!(!devs.is_empty(), "no DOCA device found: this suite never passes by testing nothing");
    DocaTransport::for_config(cfg).expect("DOCA transport on the first device")
}

fn export_doca(t: &DocaTransport, r: &Arc<shm::Region>) -> Option<Vec<u8>> {
    let m = ::doca::Mmap::builder(::doca::MemRange::region(r.clone()))
        .permissions(::doca::Access::LOCAL_READ_WRITE | ::doca::Access::PCI_READ_WRITE)
        .add_device(t.device())
        .start()
        .expect("host mmap");
    let blob = m.export_pci(t.device()).expect("pci export");
    // The exporter's mmap must outlive the import in a real host; here the
    // region's memfd stays open through `r`, which the emulated import
    // reopens by fd.
    std::mem::forget(m);
    Some(blob)
}

conformance!(doca, make_doca, export_doca);

#[cfg(feature = "verbs-hw")]
fn make_verbs(cfg: &EndpointConfig) -> VerbsTransport {
    VerbsTransport::for_config(cfg).unwrap_or_else(|e| {
        panic!(
            "verbs-hw: no usable RDMA device: {e}. This suite never passes by testing nothing: \
             set up SoftRoCE (README.md, fabric over ibverbs) or build without the feature `verbs-hw`"
        )
    })
}

/// Verbs has no export/import of memory between processes (host mode maps
/// the pools itself).
#[cfg(feature = "verbs-hw")]
fn export_verbs(_: &VerbsTransport, _: &Arc<shm::Region>) -> Option<Vec<u8>> {
    None
}

#[cfg(feature = "verbs-hw")]
conformance!(verbs, make_verbs, export_verbs);

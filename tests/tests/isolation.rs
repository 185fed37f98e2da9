//! Isolation across nodes with real processes, while both tenants keep
//! loads running between n0 and n1:
//! * a function of tenant acme names a function of tenant globex on the
//!   other node, through the API (refused by host-shimd and counted) and by
//!   forging a descriptor into acme's uplink ring (dropped by the receiving
//!   agent and counted); globex is unaffected;
//! * a rogue acme process attached as a function writes garbage
//!   descriptors into n1's agent's uplink ring and scribbles over its own
//!   ring's header: the agent accepts none of the garbage, bounces the one
//!   well-formed descriptor with an unknown destination to its sender,
//!   and every other message passes intact.
//!
//! Every wait has a watchdog; nothing asserts on time.
#![allow(clippy::print_stdout)] // reports what was lost or rejected

use dne_tests::cluster::{Census, Cluster, FN_CACHE, Load, status_number};
use dne_tests::wait_for;
use host_shim::sock::Conn;
use host_shim::{AttachError, Function, SendErrorKind};
use shm::ring::{Doorbell, Ring};
use std::time::Duration;
use wire::ctrl::{Attach, AttachOk, CTRL_MAX_FRAME, CtrlMsg, Hello, Lookup, Peer, Role};
use wire::desc::{NO_NODE, NO_ROUTE};
use wire::{CtrlFrame, DescFlags, Descriptor, ErrorCode, Name, Owner};

const WATCHDOG: Duration = Duration::from_secs(30);
const WINDOW: usize = 32;

const CONFIG: &str = r#"
[[tenant]]
name = "acme"
weight = 1
buffers = 1024
recv_quota = 64
max_chain = 64

[[tenant]]
name = "globex"
weight = 1
buf_size = 4096
buffers = 512
recv_quota = 64

[[function]]
name = "client"
tenant = "acme"
node = "n0"

[[function]]
name = "upper"
tenant = "acme"
node = "n1"

[[function]]
name = "rogue"
tenant = "acme"
node = "n1"

[[function]]
name = "arogue"
tenant = "acme"
node = "n0"

[[function]]
name = "probe"
tenant = "acme"
node = "n1"

[[function]]
name = "gclient"
tenant = "globex"
node = "n0"

[[function]]
name = "gecho"
tenant = "globex"
node = "n1"

[[function]]
name = "gprobe"
tenant = "globex"
node = "n1"
"#;

/// Function ids: their order in the cluster file.
const ROGUE: u16 = 2;
const AROGUE: u16 = 3;
const GECHO: u16 = 6;

fn upper(d: &[u8]) -> Vec<u8> {
    d.to_ascii_uppercase()
}

fn echo(d: &[u8]) -> Vec<u8> {
    d.to_vec()
}

fn diag(c: &Cluster) -> String {
    let mut s = String::new();
    for i in 0..c.dirs.len() {
        s += &format!(
            "--- n{i} agent /status: {}\n--- n{i} host-shimd: {}\n--- n{i} agent log:\n{}\n",
            c.status(i).trim(),
            c.shimd_status(i).trim(),
            c.log_tail(&format!("agent-n{i}"), 15)
        );
    }
    s
}

fn counter(c: &Cluster, node: usize, name: &str, labels: &[(&str, &str)]) -> u64 {
    c.metric(node, name, labels).unwrap_or_else(|| panic!("n{node}: no sample {name}{labels:?}")) as u64
}

fn drops(c: &Cluster, node: usize, tenant: &str, reason: &str) -> u64 {
    counter(c, node, "dne_agent_drops_total", &[("tenant", tenant), ("reason", reason)])
}

fn all_drops(c: &Cluster, node: usize, tenant: &str) -> u64 {
    [
        "unknown_function",
        "unreachable",
        "peer_died",
        "no_instance",
        "bad_descriptor",
        "no_buffer",
        "protocol",
        "stalled_chain",
        "bad_origin",
        "tenant_mismatch",
        "overloaded",
        "unanswered",
    ]
    .iter()
    .map(|r| drops(c, node, tenant, r))
    .sum()
}

fn uplink(c: &Cluster, node: usize, tenant: &str) -> u64 {
    counter(c, node, "dne_agent_uplink_messages_total", &[("tenant", tenant)])
}

/// Steps both loads until `cond` holds (watchdog).
fn run_both(c: &Cluster, a: &mut Load, g: &mut Load, send_a: bool, what: &str, cond: impl Fn(&Load, &Load) -> bool) {
    let end = std::time::Instant::now() + WATCHDOG;
    while !cond(a, g) {
        assert!(
            std::time::Instant::now() < end,
            "timed out waiting for {what}: acme {:?} ({} in flight), globex {:?} ({} in flight)\n{}",
            a.dest(0),
            a.in_flight(),
            g.dest(0),
            g.in_flight(),
            diag(c)
        );
        a.step(send_a);
        g.step(true);
    }
}

/// Waits until `f`'s pool on node `i` is idle and clean (see
/// `Census::check_idle`): `others` are live function slots besides `f`.
fn wait_pool_idle(c: &Cluster, i: usize, tenant: &str, f: &Function, others: &[u16]) {
    let mut live: Vec<(u16, u32)> = others.iter().map(|&s| (s, FN_CACHE)).collect();
    live.push((f.info().slot, f.cached_buffers() as u32));
    let end = std::time::Instant::now() + WATCHDOG;
    loop {
        let posted = c.metric(i, "dne_agent_receives_posted", &[("tenant", tenant)]).unwrap_or(0.0) as u32;
        let Err(e) = Census::of(f).check_idle(&live, posted + FN_CACHE) else { return };
        assert!(std::time::Instant::now() < end, "n{i}: {tenant} pool not idle and clean: {e}\n{}", diag(c));
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// A process of the tenant that speaks host-shimd's control protocol by
/// hand, so it can reach rings and descriptors the function API guards.
struct Rogue {
    conn: Conn,
    ok: AttachOk,
    pool: shm::Pool,
    own_ring: std::os::fd::OwnedFd,
    seq: u32,
}

impl Rogue {
    fn attach(socket: &std::path::Path, tenant: &str, function: &str) -> Self {
        let conn = Conn::connect(socket).unwrap();
        let name = Name::new(function).unwrap();
        let hello =
            Hello { role: Role::Function as u8, reserved: 0, node: 0, pid: 1, layout_hash: wire::LAYOUT_HASH, name };
        conn.send(&CtrlFrame { seq: 0, msg: CtrlMsg::Hello(hello) }, &[]).unwrap();
        let attach = Attach { tenant: Name::new(tenant).unwrap(), function: name, instance: 0, reserved: 0, pid: 1 };
        conn.send(&CtrlFrame { seq: 1, msg: CtrlMsg::Attach(attach) }, &[]).unwrap();
        let mut buf = [0u8; CTRL_MAX_FRAME];
        let r = conn.recv(&mut buf).unwrap();
        let CtrlMsg::AttachOk(ok) = CtrlFrame::decode(&buf[..r.len]).unwrap().0.msg else { panic!("attach refused") };
        let mut fds = r.fds.into_iter();
        let pool = shm::Pool::open(fds.next().unwrap()).unwrap();
        let own_ring = fds.next().unwrap();
        Self { conn, ok, pool, own_ring, seq: 2 }
    }

    /// Looks `function` up: its ring (the agent's uplink when it lives on
    /// another node) and doorbell.
    fn lookup(&mut self, function: &str) -> (Peer, Ring, Doorbell) {
        let l = Lookup { function: Name::new(function).unwrap() };
        self.conn.send(&CtrlFrame { seq: self.seq, msg: CtrlMsg::Lookup(l) }, &[]).unwrap();
        self.seq += 1;
        let mut buf = [0u8; CTRL_MAX_FRAME];
        let r = self.conn.recv(&mut buf).unwrap();
        let CtrlMsg::Peer(peer) = CtrlFrame::decode(&buf[..r.len]).unwrap().0.msg else { panic!("lookup refused") };
        let mut fds = r.fds.into_iter();
        let ring = Ring::open(fds.next().unwrap()).unwrap();
        let bell = Doorbell::from_fd(fds.next().unwrap());
        // The Ack that ends the answer.
        let r = self.conn.recv(&mut buf).unwrap();
        assert!(matches!(CtrlFrame::decode(&buf[..r.len]).unwrap().0.msg, CtrlMsg::Ack(_)));
        (peer, ring, bell)
    }

    /// A message of `data` handed over to the owner of the ring in `slot`,
    /// as a descriptor naming `dst_fn`.
    fn hand_over(&self, data: &[u8], slot: u16, dst_fn: u16, request: u32) -> Descriptor {
        let mut m = self.pool.alloc(data.len() as u32, Owner::Held(self.ok.slot)).unwrap();
        self.pool.write(&mut m, data).unwrap();
        let (buf, len) = self.pool.hand_over(m, Owner::Function(slot)).unwrap();
        Descriptor {
            tenant: self.ok.tenant,
            src_fn: self.ok.function,
            dst_fn,
            buf,
            len,
            request,
            origin: NO_NODE,
            route: NO_ROUTE,
            ..Default::default()
        }
    }
}

#[test]
fn tenant_a_naming_tenant_b_on_another_node_is_refused_counted_and_b_is_unaffected() {
    let mut c = Cluster::start("iso-tenants", 2, CONFIG);
    let (_, upper_slot) = c.start_fn_slot(1, "acme", "upper", "upper", Some("client"));
    let (_, gecho_slot) = c.start_fn_slot(1, "globex", "gecho", "echo", Some("gclient"));
    let mut a = Load::new(c.attach(0, "acme", "client"), &[("upper", upper)], WINDOW);
    let mut g = Load::new(c.attach(0, "globex", "gclient"), &[("gecho", echo)], WINDOW);
    run_both(&c, &mut a, &mut g, true, "both tenants' traffic", |a, g| a.dest(0).ok >= 100 && g.dest(0).ok >= 100);

    // Through the API: naming globex's function on the other node, and
    // claiming globex's functions on either node, is refused.
    let m = a.f.alloc(10).unwrap();
    let e = a.f.send(m, "gecho").unwrap_err();
    assert!(matches!(e.kind, SendErrorKind::TenantMismatch), "{e}");
    a.f.free(e.msg.expect("a refused send hands the message back")).unwrap();
    for (node, function) in [(0, "gclient"), (1, "gecho")] {
        match Function::attach(&c.socket(node), "acme", function) {
            Err(AttachError::Refused(ErrorCode::TenantMismatch)) => {}
            other => panic!("n{node}: acme claiming {function}: expected a tenant refusal, got {other:?}"),
        }
    }
    // host-shimd rewrites its status file just after answering.
    wait_for("n0's host-shimd to count both refusals", WATCHDOG, || {
        let s = c.shimd_status(0);
        s.contains("\"lookup_refused\":{\"tenant_mismatch\":1}")
            && s.contains("\"attach_refused\":{\"tenant_mismatch\":1}")
    });
    wait_for("n1's host-shimd to count the refusal", WATCHDOG, || {
        c.shimd_status(1).contains("\"attach_refused\":{\"tenant_mismatch\":1}")
    });

    // By hand: a descriptor of acme naming gecho (globex, on n1) pushed
    // into acme's uplink on n0, and one claiming to be globex's. acme's
    // load pauses so the counters can be compared exactly; globex's runs.
    run_both(&c, &mut a, &mut g, false, "acme's load drained", |a, _| a.in_flight() == 0);
    let (up0, drops0, drops1, gdrops) =
        (uplink(&c, 0, "acme"), all_drops(&c, 0, "acme"), all_drops(&c, 1, "acme"), all_drops(&c, 1, "globex"));
    let mut rogue = Rogue::attach(&c.socket(0), "acme", "arogue");
    assert_eq!(rogue.ok.function, AROGUE);
    let (peer, ring, bell) = rogue.lookup("upper");
    assert_eq!(peer.slot, wire::segment::AGENT_SLOT, "a remote function is reached through the agent's uplink");
    let named_b = rogue.hand_over(b"forged for globex", peer.slot, GECHO, 0xF0F0_0001);
    let claims_b = Descriptor { tenant: rogue.ok.tenant + 1, request: 0xF0F0_0002, ..named_b };
    // `claims_b` comes first: it names the same buffers as `named_b`, which
    // then still belong to the agent to take.
    ring.push(&[claims_b, named_b]).unwrap();
    bell.ring().unwrap();
    run_both(&c, &mut a, &mut g, false, "n0 to refuse the forged message", |_, _| all_drops(&c, 0, "acme") > drops0);
    assert_eq!(
        drops(&c, 0, "acme", "tenant_mismatch"),
        1,
        "n0 refuses to forward it to another tenant's function (and returns it to the sender)\n{}",
        diag(&c)
    );
    assert_eq!(all_drops(&c, 0, "acme"), drops0 + 1);
    assert_eq!(all_drops(&c, 1, "acme"), drops1, "nothing reached n1");
    assert_eq!(uplink(&c, 0, "acme"), up0 + 1, "n0 took the well-formed one and refused the other tenant's claim");
    assert_eq!(all_drops(&c, 1, "globex"), gdrops, "globex saw nothing");
    drop((ring, bell, rogue));

    // globex was unaffected all along, and acme still works.
    let (a0, g0) = (a.dest(0).ok, g.dest(0).ok);
    run_both(&c, &mut a, &mut g, true, "both tenants' traffic again", |a, g| {
        a.dest(0).ok >= a0 + 100 && g.dest(0).ok >= g0 + 100
    });
    run_both(&c, &mut a, &mut g, false, "acme drained", |a, _| a.in_flight() == 0);
    let gd = g.dest(0);
    assert_eq!(gd.err(), 0, "globex lost nothing: {gd:?}");
    g.drain(WATCHDOG, || diag(&c));
    assert_eq!(g.dest(0).ok, g.dest(0).sent);
    assert_eq!(all_drops(&c, 0, "globex") + all_drops(&c, 1, "globex"), 0);

    // No buffer lost in any pool.
    let probe = c.attach(1, "acme", "probe");
    let gprobe = c.attach(1, "globex", "gprobe");
    wait_pool_idle(&c, 0, "acme", &a.f, &[]);
    wait_pool_idle(&c, 0, "globex", &g.f, &[]);
    wait_pool_idle(&c, 1, "globex", &gprobe, &[gecho_slot]);
    wait_pool_idle(&c, 1, "acme", &probe, &[upper_slot]);
}

#[test]
fn garbage_in_the_agents_uplink_is_rejected_counted_and_harmless() {
    let mut c = Cluster::start("iso-rogue", 2, CONFIG);
    let (_, upper_slot) = c.start_fn_slot(1, "acme", "upper", "upper", Some("client"));
    c.start_fn(1, "globex", "gecho", "echo", Some("gclient"));
    let mut a = Load::new(c.attach(0, "acme", "client"), &[("upper", upper)], WINDOW);
    let mut g = Load::new(c.attach(0, "globex", "gclient"), &[("gecho", echo)], WINDOW);
    run_both(&c, &mut a, &mut g, true, "both tenants' traffic", |a, g| a.dest(0).ok >= 100 && g.dest(0).ok >= 100);

    // Counters at a quiet moment of acme: every answer `upper` sends goes
    // through n1's uplink exactly once.
    run_both(&c, &mut a, &mut g, false, "acme's load drained", |a, _| a.in_flight() == 0);
    let (up0, ok0) = (uplink(&c, 1, "acme"), a.dest(0).ok);
    let unknown0 = drops(&c, 1, "acme", "unknown_function");

    // The rogue: an acme function on n1 that looks up a function on n0
    // and so gets n1's agent's uplink ring.
    let mut rogue = Rogue::attach(&c.socket(1), "acme", "rogue");
    assert_eq!(rogue.ok.function, ROGUE);
    let (peer, uplink_ring, bell) = rogue.lookup("client");
    assert_eq!(peer.slot, wire::segment::AGENT_SLOT);
    let (half, full) = (ok0 + 100, ok0 + 200);
    run_both(&c, &mut a, &mut g, true, "traffic before the garbage", |a, _| a.dest(0).ok >= half);

    // Garbage, pushed while `upper`'s answers flow through the same ring.
    let held = rogue.pool.alloc(10, Owner::Held(rogue.ok.slot)).unwrap();
    let good = Descriptor {
        tenant: rogue.ok.tenant,
        src_fn: ROGUE,
        dst_fn: 0,
        len: 10,
        buf: held.head(),
        request: 0xBAD0_0000,
        origin: NO_NODE,
        route: NO_ROUTE,
        ..Default::default()
    };
    let garbage = [
        Descriptor { tenant: rogue.ok.tenant + 1, ..good }, // another tenant
        Descriptor { buf: 1_000_000, ..good },              // outside the pool
        Descriptor { len: u32::MAX, ..good },               // longer than any chain
        Descriptor { flags: 0x4000, ..good },               // unknown flag
        Descriptor { flags: DescFlags::ERROR, status: 250, ..good }, // unknown status
        good,                                               // never handed over
        Descriptor { reserved: 7, ..good },                 // reserved bits
    ];
    for d in &garbage {
        uplink_ring.push(&[*d]).unwrap();
    }
    // One well-formed message whose destination does not exist: the agent
    // takes it and returns it to its sender, the rogue, as an error.
    let unknown = rogue.hand_over(b"to nobody", peer.slot, 999, 0xBAD0_0001);
    uplink_ring.push(&[unknown]).unwrap();
    bell.ring().unwrap();
    // The rogue also scribbles over its own ring's header.
    let raw = shm::Region::open(rogue.own_ring.try_clone().unwrap()).unwrap();
    let mut own = Ring::open(rogue.own_ring.try_clone().unwrap()).unwrap().into_consumer();
    let mut back = [Descriptor::default(); 4];
    let end = std::time::Instant::now() + WATCHDOG;
    let n = loop {
        a.step(true);
        g.step(true);
        let n = own.pop(&mut back);
        if n > 0 {
            break n;
        }
        assert!(std::time::Instant::now() < end, "the unknown destination never came back\n{}", diag(&c));
    };
    assert_eq!(n, 1, "{:?}", &back[..n]);
    let b = back[0];
    assert_eq!((b.request, b.flags & DescFlags::ERROR), (0xBAD0_0001, DescFlags::ERROR), "{b:?}");
    assert_eq!(ErrorCode::from_u8(b.status), Some(ErrorCode::UnknownFunction), "{b:?}");
    let lease = rogue.pool.accept(&b, rogue.ok.slot).expect("the rogue's own message, back");
    rogue.pool.free(lease).unwrap();
    raw.copy_in(0, &[0xEE; 32]).unwrap();

    // Everything else is untouched: acme's answers pass intact (the load
    // checks every payload and id), globex's too.
    run_both(&c, &mut a, &mut g, true, "traffic after the garbage", |a, _| a.dest(0).ok >= full);
    run_both(&c, &mut a, &mut g, false, "acme's load drained", |a, _| a.in_flight() == 0);
    let d = a.dest(0);
    assert_eq!((d.err(), d.ok, d.sent), (0, d.sent, d.sent), "{d:?}");
    assert_eq!(
        uplink(&c, 1, "acme"),
        up0 + (d.ok - ok0) + 1,
        "n1's agent took upper's answers and the one well-formed message, none of the garbage"
    );
    assert_eq!(drops(&c, 1, "acme", "unknown_function"), unknown0 + 1, "the unknown destination is counted");
    assert!(c.agents[1].is_running(), "n1's agent survived\n{}", diag(&c));
    // The agent counts what it rejects only in its attach's own counters
    // (`Function::rejected`), which no metric exports yet; its log says so.
    let log = std::fs::read_to_string(c.log_path("agent-n1")).unwrap_or_default();
    println!("n1 agent log on rejects: {:?}", log.lines().filter(|l| l.contains("bad descriptor")).collect::<Vec<_>>());

    // The rogue goes away: host-shimd survives its scribbled ring, takes
    // its buffers back, and still serves attaches.
    drop((own, raw, uplink_ring, bell, held, rogue));
    wait_for("host-shimd to see the rogue go", WATCHDOG, || status_number(&c.shimd_status(1), "deaths") == Some(1));
    let probe = c.attach(1, "acme", "probe");
    g.drain(WATCHDOG, || diag(&c));
    assert_eq!((g.dest(0).err(), g.dest(0).ok), (0, g.dest(0).sent), "globex untouched");
    wait_pool_idle(&c, 0, "acme", &a.f, &[]);
    wait_pool_idle(&c, 1, "acme", &probe, &[upper_slot]);
}

//! host-shimd's bridge to the DPU agent (`mode = "dpu"`) against an agent
//! played by hand: host-shimd runs in a thread of the test, the bridge is
//! stepped by the test, and the agent is a bare comch server that answers
//! (or does not) as each test needs.

use host_shim::Function;
use host_shim::bridge::{AGENT_GONE_GRACE, Bridge, BridgeFreeFailed, SharedStats, serve_with_hook};
use host_shim::comch::{Outbox, each_frame, server_name};
use host_shim::daemon::{Shimd, socket_path, status_path};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};
use wire::ctrl::{Ack, BufList, CtrlKind, CtrlMsg, LendRecv, MessageHdr};
use wire::segment::{AGENT_SLOT, Owner};

const WATCHDOG: Duration = Duration::from_secs(20);

/// Node `a` (dpu mode, its host-shimd and bridge here) runs `f`; node `b`
/// runs `g`, so what `f` sends to `g` goes to the agent.
fn cluster(tag: &str) -> (config::Cluster, std::path::PathBuf) {
    let node = format!("br-{tag}-{}", std::process::id());
    let dir = std::env::temp_dir().join(&node);
    let _ = std::fs::remove_dir_all(&dir);
    let text = format!(
        r#"
[[node]]
name = "{node}"
mode = "dpu"
address = "127.0.0.1:1"
runtime_dir = "{dir}"

[[node]]
name = "{node}-b"
mode = "dpu"
address = "127.0.0.1:2"
runtime_dir = "{dir}-b"

[[tenant]]
name = "t"
weight = 1
buffers = 64
recv_quota = 8

[[function]]
name = "f"
tenant = "t"
node = "{node}"

[[function]]
name = "g"
tenant = "t"
node = "{node}-b"
"#,
        dir = dir.display()
    );
    (config::Cluster::parse(&text).expect("cluster"), dir)
}

/// host-shimd of node 0, served on a thread until dropped.
struct ShimdThread {
    stop: Arc<AtomicBool>,
    thread: Option<std::thread::JoinHandle<()>>,
    dir: std::path::PathBuf,
}

impl ShimdThread {
    fn start(cfg: &config::Cluster, dir: std::path::PathBuf) -> Self {
        Self::start_with(cfg, dir, None)
    }

    /// [`start`](Self::start); `bridge`: the bridge counts its status file
    /// shows (as `serve_until_signalled` sets them in DPU mode).
    fn start_with(cfg: &config::Cluster, dir: std::path::PathBuf, bridge: Option<SharedStats>) -> Self {
        let stop = Arc::new(AtomicBool::new(false));
        let (cfg, s, name) = (cfg.clone(), stop.clone(), cfg.nodes[0].name.clone());
        let (tx, rx) = std::sync::mpsc::channel();
        let thread = std::thread::spawn(move || {
            let mut d = Shimd::new(cfg, &name).expect("host-shimd");
            if let Some(shared) = bridge {
                d.set_bridge(shared);
            }
            tx.send(()).unwrap();
            while !s.load(Ordering::Relaxed) {
                d.poll_once(None, Duration::from_millis(5)).expect("host-shimd round");
            }
        });
        rx.recv_timeout(WATCHDOG).expect("host-shimd started");
        Self { stop, thread: Some(thread), dir }
    }
}

impl Drop for ShimdThread {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// The agent, by hand: a comch server and what it has received.
struct FakeAgent {
    pe: doca::ProgressEngine,
    server: doca::ComchServer,
    conn: Option<doca::ComchConnId>,
    out: Outbox,
    rx: Vec<u8>,
    /// Kinds of the frames received, in order.
    got: Vec<CtrlKind>,
    /// Buffers lent to it, in order.
    lent: Vec<u32>,
    /// Buffers of the messages handed to it, in order.
    handed: Vec<u32>,
    /// Connections that went away.
    disconnects: usize,
    /// The descriptors of the `Lost` frames received, each with the number
    /// of frames of the comch message it came in.
    lost: Vec<(wire::Descriptor, usize)>,
}

impl FakeAgent {
    fn start(cfg: &config::Cluster) -> Self {
        let pe = doca::ProgressEngine::new().unwrap();
        let server = Self::server(&pe, cfg);
        server.start().unwrap();
        Self {
            pe,
            server,
            conn: None,
            out: Outbox::new(doca::COMCH_MAX_MSG_SIZE as usize),
            rx: vec![0; doca::COMCH_MAX_MSG_SIZE as usize],
            got: Vec::new(),
            lent: Vec::new(),
            handed: Vec::new(),
            disconnects: 0,
            lost: Vec::new(),
        }
    }

    fn server(pe: &doca::ProgressEngine, cfg: &config::Cluster) -> doca::ComchServer {
        let dev = doca::Device::open_first().unwrap();
        let ccfg = doca::ComchConfig { send_tasks: 64, recv_queue: 64, ..Default::default() };
        doca::ComchServer::new(pe, &dev, &server_name(&cfg.nodes[0]), ccfg).unwrap()
    }

    /// Drops the connection and serves on a new comch server, as the agent
    /// does when its host link goes (`comchlink::attach`): the agent lives
    /// on, the connection is gone, and what it was told is forgotten.
    fn restart(&mut self, cfg: &config::Cluster) {
        let fresh = Self::server(&self.pe, cfg);
        drop(std::mem::replace(&mut self.server, fresh));
        self.server.start().unwrap();
        self.conn = None;
        self.out = Outbox::new(doca::COMCH_MAX_MSG_SIZE as usize);
        self.got.clear();
        self.lent.clear();
        self.handed.clear();
    }

    fn poll(&mut self) {
        self.pe.progress();
        while let Some(ev) = self.server.poll_event(&mut self.rx) {
            match ev {
                doca::ComchEvent::Connected(c) => self.conn = Some(c),
                doca::ComchEvent::Disconnected(_) => self.disconnects += 1,
                doca::ComchEvent::Message { len, .. } => {
                    let (got, lent, handed) = (&mut self.got, &mut self.lent, &mut self.handed);
                    let mut lost = None;
                    let mut frames = 0;
                    each_frame(&self.rx[..len as usize], |f| {
                        match &f {
                            CtrlMsg::LendRecv(_, list) => lent.extend(list.iter()),
                            CtrlMsg::Message(_, list) => handed.extend(list.iter()),
                            CtrlMsg::Lost(b) => lost = Some(b.desc),
                            _ => {}
                        }
                        frames += 1;
                        got.push(f.kind());
                    })
                    .expect("frames from the bridge");
                    self.lost.extend(lost.map(|d| (d, frames)));
                }
                _ => {}
            }
        }
    }

    fn send(&mut self, msg: CtrlMsg<'_>) {
        let c = self.conn.expect("connected");
        let server = &self.server;
        let mut send = |m: &[u8]| server.send(c, m, 0);
        self.out.push(msg, &mut send).unwrap();
        self.out.flush(&mut send).unwrap();
    }
}

/// Steps the bridge and polls the agent until `done` or the watchdog.
fn drive(bridge: &mut Bridge, agent: &mut FakeAgent, what: &str, mut done: impl FnMut(&Bridge, &FakeAgent) -> bool) {
    let deadline = Instant::now() + WATCHDOG;
    while !done(bridge, agent) {
        assert!(Instant::now() < deadline, "watchdog: {what}");
        bridge.step();
        agent.poll();
        std::thread::sleep(Duration::from_micros(200));
    }
}

/// An agent that connected but has not taken the pools (it cannot decode
/// the exports: another protocol version, a cluster file that disagrees;
/// or it is not done importing them) is handed nothing: what functions
/// send to other nodes stays in the uplink, its buffers the functions'
/// to account for, until the agent says it took the pools.
#[test]
fn nothing_is_handed_to_an_agent_before_it_took_the_pools() {
    let (cfg, dir) = cluster("ack");
    let _shimd = ShimdThread::start(&cfg, dir.clone());
    let mut agent = FakeAgent::start(&cfg);
    let shared = SharedStats::default();
    let mut bridge = Bridge::new(Arc::new(cfg.clone()), 0, &socket_path(&dir), shared).expect("bridge");
    let mut f = Function::attach(&socket_path(&dir), "t", "f").expect("attach f");

    drive(&mut bridge, &mut agent, "the exports", |_, a| a.got.contains(&CtrlKind::PoolExport));
    let m = f.alloc(100).expect("a buffer");
    let buf = m.desc().buf;
    f.send(m, "g").expect("sent to the agent's uplink");
    // The agent does not answer: a while of the bridge's passes.
    let until = Instant::now() + Duration::from_millis(300);
    while Instant::now() < until {
        bridge.step();
        agent.poll();
        std::thread::sleep(Duration::from_micros(200));
    }
    assert_eq!(bridge.stats().to_agent, 0, "a message was handed to an agent that has not taken the pools");
    assert_ne!(f.pool().owner(buf), Ok(Owner::Agent));
    assert!(!agent.got.contains(&CtrlKind::Message));
    assert!(!bridge.is_up());

    // The agent took the pools: the message goes.
    agent.send(CtrlMsg::Ack(Ack { about_kind: CtrlKind::PoolExport as u16, reserved: 0, about_seq: 0 }));
    drive(&mut bridge, &mut agent, "the message", |_, a| a.got.contains(&CtrlKind::Message));
    assert!(bridge.is_up());
    assert_eq!(bridge.stats().to_agent, 1);
    assert_eq!(f.pool().owner(buf), Ok(Owner::Agent));
}

/// Steps the bridge and polls the agent for `d`.
fn run_for(bridge: &mut Bridge, agent: &mut FakeAgent, d: Duration) {
    let until = Instant::now() + d;
    while Instant::now() < until {
        bridge.step();
        agent.poll();
        std::thread::sleep(Duration::from_micros(200));
    }
}

fn took_pools() -> CtrlMsg<'static> {
    CtrlMsg::Ack(Ack { about_kind: CtrlKind::PoolExport as u16, reserved: 0, about_seq: 0 })
}

/// The agent takes the pools, is lent 8 receive buffers, and f hands it
/// one message: returns the 9 buffers now recorded as the agent's.
fn lend_eight_and_hand_over_one(bridge: &mut Bridge, agent: &mut FakeAgent, f: &mut Function) -> Vec<u32> {
    drive(bridge, agent, "the exports", |_, a| a.got.contains(&CtrlKind::PoolExport));
    agent.send(took_pools());
    agent.send(CtrlMsg::WantBufs(LendRecv { tenant: 0, reserved: 0, count: 8 }));
    drive(bridge, agent, "the lends", |_, a| a.lent.len() == 8);
    let m = f.alloc(100).expect("a buffer");
    let sent = m.desc().buf;
    f.send(m, "g").expect("sent to the agent's uplink");
    drive(bridge, agent, "the message", |_, a| a.got.contains(&CtrlKind::Message));
    let mut held = agent.lent.clone();
    held.push(sent);
    for &i in &held {
        assert_eq!(f.pool().owner(i), Ok(Owner::Agent), "buffer {i}");
    }
    held
}

/// The comch connection drops while the agent lives on (the connection
/// failed, not the agent): the agent's fabric still has receives posted in
/// the buffers it was lent, and sends reading the messages it was handed,
/// until it notices and tears down. Those buffers stay the agent's (not
/// free, not allocatable, not lent to the agent when it connects again,
/// not taken back from it on the new connection) for
/// [`AGENT_GONE_GRACE`]; then they are freed, and nothing else is left
/// recorded as the agent's.
#[test]
fn what_the_agent_held_when_the_connection_dropped_is_kept_for_the_grace_then_freed() {
    let (cfg, dir) = cluster("drop");
    let _shimd = ShimdThread::start(&cfg, dir.clone());
    let mut agent = FakeAgent::start(&cfg);
    let shared = SharedStats::default();
    let mut bridge = Bridge::new(Arc::new(cfg.clone()), 0, &socket_path(&dir), shared).expect("bridge");
    let mut f = Function::attach(&socket_path(&dir), "t", "f").expect("attach f");
    let cap = f.pool().geometry().payload_cap();

    let held = lend_eight_and_hand_over_one(&mut bridge, &mut agent, &mut f);

    // The connection drops; the agent is still there.
    agent.restart(&cfg);
    let deadline = Instant::now() + WATCHDOG;
    // No later than when the bridge saw the drop: its grace ends after
    // `dropped + AGENT_GONE_GRACE`.
    let dropped = loop {
        assert!(Instant::now() < deadline, "watchdog: the bridge never saw the connection drop");
        let before = Instant::now();
        bridge.step();
        if !bridge.is_up() {
            break before;
        }
        agent.poll();
        std::thread::sleep(Duration::from_micros(200));
    };
    let in_grace = || Instant::now() < dropped + AGENT_GONE_GRACE;
    assert!(in_grace(), "one pass of the bridge took the whole grace");
    for &i in &held {
        assert_eq!(f.pool().owner(i), Ok(Owner::Agent), "buffer {i} left the agent as soon as the connection dropped");
    }
    // Nothing the function can allocate is one of them.
    let mut all = Vec::new();
    while let Ok(m) = f.alloc(cap) {
        all.push(m);
    }
    assert!(in_grace(), "allocating the pool took the whole grace");
    for m in &all {
        assert!(!held.contains(&m.desc().buf), "buffer {} allocated while the agent may still use it", m.desc().buf);
    }
    for m in all {
        f.free(m).unwrap();
    }

    // The agent connects again: fresh exports, fresh lends, none of them.
    drive(&mut bridge, &mut agent, "the exports again", |_, a| a.got.contains(&CtrlKind::PoolExport));
    agent.send(took_pools());
    agent.send(CtrlMsg::WantBufs(LendRecv { tenant: 0, reserved: 0, count: 8 }));
    drive(&mut bridge, &mut agent, "the lends again", |_, a| a.lent.len() == 8);
    let fresh = agent.lent.clone();
    for i in &fresh {
        assert!(!held.contains(i), "buffer {i} lent again to the agent while its earlier receive may land in it");
    }
    // The new connection cannot take them back either (the agent there
    // was not given them).
    let refused = bridge.stats().refused;
    agent.send(CtrlMsg::ReturnBufs(LendRecv { tenant: 0, reserved: 0, count: 1 }, BufList::from_indices(&held[..1])));
    drive(&mut bridge, &mut agent, "the refusal", |b, _| b.stats().refused > refused);
    assert_eq!(bridge.stats().returned, 0);
    if in_grace() {
        assert_eq!(f.pool().owner(held[0]), Ok(Owner::Agent), "taken back on the new connection");
    }

    // After the grace: freed, all of them, and nothing else is recorded
    // as the agent's but what it was lent on the new connection.
    run_for(&mut bridge, &mut agent, (dropped + AGENT_GONE_GRACE).saturating_duration_since(Instant::now()));
    drive(&mut bridge, &mut agent, "the held buffers freed", |_, _| {
        held.iter().all(|&i| f.pool().owner(i) != Ok(Owner::Agent))
    });
    for &i in &held {
        // Free, or in the bridge's allocation cache.
        let o = f.pool().owner(i);
        assert!(o == Ok(Owner::Free) || o == Ok(Owner::Held(AGENT_SLOT)), "buffer {i}: {o:?}");
    }
    assert_eq!(bridge.stats().reclaimed, held.len() as u64);
    let agents: Vec<u32> =
        (0..f.pool().geometry().buf_count()).filter(|&i| f.pool().owner(i) == Ok(Owner::Agent)).collect();
    let mut fresh = fresh;
    fresh.sort_unstable();
    assert_eq!(agents, fresh, "recorded as the agent's");
}

/// A call the agent hands over for a function here whose instance dies as
/// the bridge pushes it into its ring, host-shimd taking the call's
/// buffers back, is reported to the agent: a `Lost` frame, alone in its
/// comch message (an agent of an earlier build refuses just that frame),
/// with the call's descriptor, `buf` the buffer the agent named (its key
/// for where the call came from), so that the agent answers the caller
/// `PeerDied`. The bridge counts it; the buffer is no longer the agent's.
/// An error lost that way is reported too (the agent drops and counts it).
#[test]
fn a_call_lost_with_its_dying_instance_is_reported_to_the_agent() {
    let (cfg, dir) = cluster("lost");
    let _shimd = ShimdThread::start(&cfg, dir.clone());
    let mut agent = FakeAgent::start(&cfg);
    let shared = SharedStats::default();
    let mut bridge = Bridge::new(Arc::new(cfg.clone()), 0, &socket_path(&dir), shared.clone()).expect("bridge");
    let f = Function::attach(&socket_path(&dir), "t", "f").expect("attach f");

    drive(&mut bridge, &mut agent, "the exports", |_, a| a.got.contains(&CtrlKind::PoolExport));
    agent.send(took_pools());
    agent.send(CtrlMsg::WantBufs(LendRecv { tenant: 0, reserved: 0, count: 2 }));
    drive(&mut bridge, &mut agent, "the lends", |_, a| a.lent.len() == 2);
    // f is function 0; g (function 1, on node b) called it.
    bridge.lose_deliveries_to(Some(0));
    let call = wire::Descriptor { dst_fn: 0, src_fn: 1, origin: wire::desc::NO_NODE, request: 7, ..Default::default() };
    let error = wire::Descriptor {
        flags: wire::DescFlags::ERROR,
        status: wire::ErrorCode::Overloaded as u8,
        request: 8,
        ..call
    };
    let mut sent = Vec::new();
    for (d, &buf) in [call, error].iter().zip(&agent.lent.clone()) {
        let d = wire::Descriptor { buf, len: 0, ..*d };
        let list = [buf];
        agent.send(CtrlMsg::Message(MessageHdr { desc: d, flags: 0, count: 1 }, BufList::from_indices(&list)));
        sent.push((d, 1));
    }
    drive(&mut bridge, &mut agent, "the reports of the lost messages", |_, a| a.lost.len() == 2);
    assert_eq!(agent.lost, sent, "each message's descriptor, alone in its comch message");
    let s = bridge.stats();
    assert_eq!((s.lost, s.delivered, s.handed_back, s.refused), (2, 0, 0, 0));
    assert_eq!(s.dropped, Default::default());
    for (d, _) in &sent {
        assert_ne!(f.pool().owner(d.buf), Ok(Owner::Agent), "buffer {}", d.buf);
    }
    assert_eq!(shared.lock().unwrap().lost, 2, "published for host-shimd's status file");
}

/// The bridge keeps delivery order for each tenant's own functions on this
/// node only (a function belongs to one tenant): what it sets up grows
/// with the functions, not with tenants times functions. Before, each
/// tenant's backlog had a counter for every function of the cluster: 40
/// tenants with 10 functions each made 16000, where 200 run here. Order
/// still holds for a function of the last tenant: a message that comes
/// while earlier ones wait for room in its ring waits behind them.
#[test]
fn the_bridge_keeps_order_for_each_tenants_own_functions_only() {
    let (tenants, per_tenant) = (40, 10);
    let node = format!("br-keys-{}", std::process::id());
    let dir = std::env::temp_dir().join(&node);
    let _ = std::fs::remove_dir_all(&dir);
    let mut text = format!(
        "[[node]]\nname = \"{node}\"\nmode = \"dpu\"\naddress = \"127.0.0.1:1\"\nruntime_dir = \"{d}\"\n\n\
         [[node]]\nname = \"{node}-b\"\nmode = \"dpu\"\naddress = \"127.0.0.1:2\"\nruntime_dir = \"{d}-b\"\n\n",
        d = dir.display()
    );
    for t in 0..tenants {
        text += &format!("[[tenant]]\nname = \"t{t}\"\nweight = 1\nbuffers = 64\nrecv_quota = 8\n\n");
    }
    for t in 0..tenants {
        for k in 0..per_tenant {
            let on = if k % 2 == 0 { node.clone() } else { format!("{node}-b") };
            text += &format!(
                "[[function]]\nname = \"f{t}-{k}\"\ntenant = \"t{t}\"\nnode = \"{on}\"\nring_capacity = 4\n\n"
            );
        }
    }
    let cfg = config::Cluster::parse(&text).expect("cluster");
    let _shimd = ShimdThread::start(&cfg, dir.clone());
    let mut agent = FakeAgent::start(&cfg);
    let mut bridge = Bridge::new(Arc::new(cfg.clone()), 0, &socket_path(&dir), SharedStats::default()).expect("bridge");
    let here = tenants * per_tenant / 2;
    assert!(bridge.backlog_keys() <= here, "{} backlog keys", bridge.backlog_keys());

    // Nine messages for the last tenant's f39-2, whose ring holds four.
    let last = tenants - 1;
    let dst = (last * per_tenant + 2) as u16;
    let mut f = Function::attach(&socket_path(&dir), &format!("t{last}"), &format!("f{last}-2")).expect("attach");
    drive(&mut bridge, &mut agent, "the exports", |_, a| a.got.contains(&CtrlKind::PoolExport));
    agent.send(took_pools());
    agent.send(CtrlMsg::WantBufs(LendRecv { tenant: last as u16, reserved: 0, count: 9 }));
    drive(&mut bridge, &mut agent, "the lends", |_, a| a.lent.len() == 9);
    let bufs = agent.lent.clone();
    let send = |agent: &mut FakeAgent, request: u32| {
        let buf = bufs[request as usize];
        let d = wire::Descriptor {
            tenant: last as u16,
            dst_fn: dst,
            src_fn: dst + 1,
            origin: wire::desc::NO_NODE,
            request,
            buf,
            len: 0,
            ..Default::default()
        };
        agent.send(CtrlMsg::Message(MessageHdr { desc: d, flags: 0, count: 1 }, BufList::from_indices(&[buf])));
    };
    let taken = |f: &Function, n: usize| bufs[..n].iter().all(|&b| f.pool().owner(b) != Ok(Owner::Agent));
    for r in 0..8 {
        send(&mut agent, r);
    }
    drive(&mut bridge, &mut agent, "the eight messages", |_, _| taken(&f, 8));
    assert_eq!(bridge.stats().delivered, 4, "the ring holds four");
    // Room for one; the ninth comes before the bridge tries the waiting
    // ones again, and waits behind them.
    let mut got = vec![f.try_recv().expect("the first message").desc().request];
    send(&mut agent, 8);
    // (On its way before the bridge's next pass, whose delivery of it
    // comes before its tries of the waiting ones.)
    for _ in 0..20 {
        agent.poll();
        std::thread::sleep(Duration::from_millis(1));
    }
    drive(&mut bridge, &mut agent, "the ninth message", |_, _| taken(&f, 9));
    let deadline = Instant::now() + WATCHDOG;
    while got.len() < 9 {
        assert!(Instant::now() < deadline, "watchdog: the messages, {got:?} so far");
        match f.try_recv() {
            Some(m) => got.push(m.desc().request),
            None => {
                bridge.step();
                agent.poll();
            }
        }
    }
    assert_eq!(got, (0..9).collect::<Vec<_>>(), "in order");
    assert_eq!(bridge.stats().refused, 0);
}

/// The bridge restarts inside a live host-shimd (`bridge::serve` builds a
/// new one when host-shimd dropped one of its control connections): the
/// buffers the old bridge had lent to the agent, or handed to it with
/// messages, are still recorded as the agent's, and the agent, its
/// connection to the old bridge gone, may still have receives posted in
/// them until it notices. The new bridge keeps them out of use for
/// [`AGENT_GONE_GRACE`] (not free, not lent again) and then frees them,
/// once each: the pool's free count comes back to the whole pool.
/// Before, nothing freed them: the new bridge had no record of them and
/// host-shimd frees only what the agent's slot holds, so each restart
/// leaked what the agent held.
#[test]
fn a_new_bridge_frees_what_the_agent_held_from_the_old_one_after_the_grace() {
    let (cfg, dir) = cluster("restart");
    let _shimd = ShimdThread::start(&cfg, dir.clone());
    let mut agent = FakeAgent::start(&cfg);
    let cfg_arc = Arc::new(cfg.clone());
    let mut bridge = Bridge::new(cfg_arc.clone(), 0, &socket_path(&dir), SharedStats::default()).expect("bridge");
    let mut f = Function::attach(&socket_path(&dir), "t", "f").expect("attach f");

    let held = lend_eight_and_hand_over_one(&mut bridge, &mut agent, &mut f);

    // The bridge goes (as when `run` returns in `serve`), the agent sees
    // its connection drop and serves anew, and a new bridge attaches (as
    // `serve` retries: host-shimd refuses it until it saw the old one go).
    drop(bridge);
    agent.restart(&cfg);
    let deadline = Instant::now() + WATCHDOG;
    let shared = SharedStats::default();
    let (mut bridge, built) = loop {
        let before = Instant::now();
        match Bridge::new(cfg_arc.clone(), 0, &socket_path(&dir), shared.clone()) {
            Ok(b) => break (b, before),
            Err(e) => assert!(Instant::now() < deadline, "watchdog: no new bridge: {e}"),
        }
        std::thread::sleep(Duration::from_millis(5));
    };
    let in_grace = || Instant::now() < built + AGENT_GONE_GRACE;
    for &i in &held {
        assert_eq!(f.pool().owner(i), Ok(Owner::Agent), "buffer {i} left the agent as soon as the bridge restarted");
    }
    // The new connection: fresh lends, none of the old ones, which it
    // cannot take back either.
    drive(&mut bridge, &mut agent, "the exports again", |_, a| a.got.contains(&CtrlKind::PoolExport));
    agent.send(took_pools());
    agent.send(CtrlMsg::WantBufs(LendRecv { tenant: 0, reserved: 0, count: 8 }));
    drive(&mut bridge, &mut agent, "the lends again", |_, a| a.lent.len() == 8);
    assert!(in_grace(), "the new connection took the whole grace");
    let fresh = agent.lent.clone();
    for i in &fresh {
        assert!(!held.contains(i), "buffer {i} lent again while the old bridge's lend may still take a receive");
    }
    let refused = bridge.stats().refused;
    agent.send(CtrlMsg::ReturnBufs(LendRecv { tenant: 0, reserved: 0, count: 1 }, BufList::from_indices(&held[..1])));
    drive(&mut bridge, &mut agent, "the refusal", |b, _| b.stats().refused > refused);
    assert_eq!(bridge.stats().returned, 0);
    if in_grace() {
        assert_eq!(bridge.stats().holding, held.len() as u64, "counted as held for the gone agent");
        for &i in &held {
            assert_eq!(f.pool().owner(i), Ok(Owner::Agent), "buffer {i} freed within the grace");
        }
    }

    // The agent gives the fresh lends back; after the grace nothing is
    // the agent's any more and the old bridge's buffers were freed once.
    agent.send(CtrlMsg::ReturnBufs(LendRecv { tenant: 0, reserved: 0, count: 8 }, BufList::from_indices(&fresh)));
    run_for(&mut bridge, &mut agent, (built + AGENT_GONE_GRACE).saturating_duration_since(Instant::now()));
    drive(&mut bridge, &mut agent, "the fresh lends returned", |b, _| b.stats().returned == 8);
    let until = Instant::now() + 2 * AGENT_GONE_GRACE;
    while Instant::now() < until && bridge.stats().reclaimed < held.len() as u64 {
        bridge.step();
        agent.poll();
        std::thread::sleep(Duration::from_micros(200));
    }
    let agents: Vec<u32> =
        (0..f.pool().geometry().buf_count()).filter(|&i| f.pool().owner(i) == Ok(Owner::Agent)).collect();
    assert_eq!(agents, Vec::<u32>::new(), "still recorded as the agent's after the grace");
    let s = bridge.stats();
    assert_eq!((s.reclaimed, s.holding), (held.len() as u64, 0));
    assert_eq!(shared.lock().unwrap().reclaimed, held.len() as u64, "published for host-shimd's status file");

    // With the bridge gone too (its cache given back), the whole pool.
    drop(bridge);
    whole_pool_comes_back(&mut f);
}

/// Every buffer of `f`'s pool is free or in `f`'s cache (waiting for that
/// up to the watchdog), and all of them can be allocated.
fn whole_pool_comes_back(f: &mut Function) {
    let count = f.pool().geometry().buf_count() as usize;
    let cap = f.pool().geometry().payload_cap();
    let deadline = Instant::now() + WATCHDOG;
    while (f.pool().free_buffers() as usize) + f.cached_buffers() != count {
        assert!(
            Instant::now() < deadline,
            "watchdog: {} of {count} buffers free, {} in f's cache",
            f.pool().free_buffers(),
            f.cached_buffers()
        );
        std::thread::sleep(Duration::from_millis(5));
    }
    let mut all = Vec::new();
    while let Ok(m) = f.alloc(cap) {
        all.push(m);
    }
    assert_eq!(all.len(), count);
}

/// `bridge::serve` on a thread until dropped, with a hook that panics in
/// the bridge's next pass when `panic` is set (taking the lock of the
/// bridge's shared counts first when `poison` is set too).
struct ServeThread {
    stop: Arc<AtomicBool>,
    panic: Arc<AtomicBool>,
    poison: Arc<AtomicBool>,
    /// The next panic's payload panics when dropped ([`Bomb`]).
    bomb: Arc<AtomicBool>,
    thread: Option<std::thread::JoinHandle<()>>,
}

/// A panic payload that panics when dropped.
struct Bomb;

impl Drop for Bomb {
    fn drop(&mut self) {
        panic!("test: the panic's payload panics as it is dropped");
    }
}

impl ServeThread {
    fn start(cfg: &config::Cluster, dir: &std::path::Path, shared: SharedStats) -> Self {
        let stop = Arc::new(AtomicBool::new(false));
        let panic = Arc::new(AtomicBool::new(false));
        let poison = Arc::new(AtomicBool::new(false));
        let bomb = Arc::new(AtomicBool::new(false));
        let (cfg, socket) = (Arc::new(cfg.clone()), socket_path(dir));
        let (s, p, q, b) = (stop.clone(), panic.clone(), poison.clone(), bomb.clone());
        let thread = std::thread::spawn(move || {
            let lock = shared.clone();
            serve_with_hook(cfg, 0, &socket, &s, shared, move |_| {
                if p.swap(false, Ordering::Relaxed) {
                    let _held = q.load(Ordering::Relaxed).then(|| lock.lock());
                    if b.swap(false, Ordering::Relaxed) {
                        std::panic::panic_any(Bomb);
                    }
                    panic!("test: the bridge panics");
                }
            })
        });
        Self { stop, panic, poison, bomb, thread: Some(thread) }
    }

    /// Whether `serve_with_hook` is still running.
    fn serving(&self) -> bool {
        self.thread.as_ref().is_some_and(|t| !t.is_finished())
    }
}

impl Drop for ServeThread {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// A bridge that panics with a payload whose own drop panics is replaced
/// like any other: the second panic, as the payload is dropped after its
/// message was logged, does not end the thread that serves the bridges.
#[test]
fn a_bridge_whose_panic_payload_panics_when_dropped_is_replaced() {
    let (cfg, dir) = cluster("bomb");
    let shared = SharedStats::default();
    let _shimd = ShimdThread::start_with(&cfg, dir.clone(), Some(shared.clone()));
    let mut agent = FakeAgent::start(&cfg);
    let mut f = Function::attach(&socket_path(&dir), "t", "f").expect("attach f");
    let serving = ServeThread::start(&cfg, &dir, shared.clone());
    wait_for(&mut agent, "the exports", |a| a.got.contains(&CtrlKind::PoolExport));
    agent.send(took_pools());

    serving.bomb.store(true, Ordering::Relaxed);
    let disconnects = agent.disconnects;
    serving.panic.store(true, Ordering::Relaxed);
    wait_for(&mut agent, "the panicking bridge's connection gone", |a| a.disconnects > disconnects);
    agent.restart(&cfg);
    wait_for(&mut agent, "the exports of a new bridge", |a| {
        assert!(serving.serving(), "the thread serving the bridges ended");
        a.got.contains(&CtrlKind::PoolExport)
    });
    agent.send(took_pools());
    let m = f.alloc(100).expect("a buffer");
    f.send(m, "g").expect("sent to the agent's uplink");
    wait_for(&mut agent, "a message through the new bridge", |a| a.handed.len() == 1);
    let s = *shared.lock().unwrap_or_else(|e| e.into_inner());
    assert_eq!((s.panics, s.restarts), (1, 1), "{s:?}");
}

/// Polls the agent until `done` or the watchdog.
fn wait_for(agent: &mut FakeAgent, what: &str, mut done: impl FnMut(&FakeAgent) -> bool) {
    let deadline = Instant::now() + WATCHDOG;
    while !done(agent) {
        assert!(Instant::now() < deadline, "watchdog: {what}");
        agent.poll();
        std::thread::sleep(Duration::from_micros(200));
    }
}

/// A bridge that panics inside host-shimd is replaced: `bridge::serve`
/// catches the panic, counts it (`panics` in host-shimd's status file,
/// `up` false until the new bridge's agent took the pools), and starts a
/// new bridge, which serves again; what the agent held from the bridge
/// that panicked is freed after the grace, so the whole pool comes back.
/// A panic that leaves the counts' lock poisoned does not stop the status
/// file from following them. Before, the panic ended the bridge's thread:
/// host-shimd ran on with no bridge, nothing crossed to the agent again,
/// and the status file kept the last counts.
#[test]
fn a_bridge_that_panics_is_counted_and_replaced() {
    let (cfg, dir) = cluster("panic");
    let shared = SharedStats::default();
    let _shimd = ShimdThread::start_with(&cfg, dir.clone(), Some(shared.clone()));
    let mut agent = FakeAgent::start(&cfg);
    let mut f = Function::attach(&socket_path(&dir), "t", "f").expect("attach f");
    let count = f.pool().geometry().buf_count() as usize;
    let serving = ServeThread::start(&cfg, &dir, shared.clone());

    wait_for(&mut agent, "the exports", |a| a.got.contains(&CtrlKind::PoolExport));
    agent.send(took_pools());
    agent.send(CtrlMsg::WantBufs(LendRecv { tenant: 0, reserved: 0, count: 8 }));
    wait_for(&mut agent, "the lends", |a| a.lent.len() == 8);
    let m = f.alloc(100).expect("a buffer");
    f.send(m, "g").expect("sent to the agent's uplink");
    wait_for(&mut agent, "the message", |a| a.handed.len() == 1);

    for panics in 1..=2u64 {
        // The second panic holds the lock of the shared counts as it
        // unwinds, poisoning it.
        serving.poison.store(panics == 2, Ordering::Relaxed);
        let disconnects = agent.disconnects;
        serving.panic.store(true, Ordering::Relaxed);
        wait_for(&mut agent, "the panicking bridge's connection gone", |a| a.disconnects > disconnects);
        agent.restart(&cfg);
        wait_for(&mut agent, "the exports of a new bridge", |a| a.got.contains(&CtrlKind::PoolExport));
        agent.send(took_pools());
        let m = f.alloc(100).expect("a buffer");
        f.send(m, "g").expect("sent to the agent's uplink");
        wait_for(&mut agent, "a message through the new bridge", |a| a.handed.len() == 1);
        let s = *shared.lock().unwrap_or_else(|e| e.into_inner());
        assert_eq!((s.panics, s.restarts, s.to_agent), (panics, panics, 1), "{s:?}");
        // host-shimd's status file shows it (refreshed every second).
        let deadline = Instant::now() + WATCHDOG;
        let want = format!("\"panics\":{panics},\"restarts\":{panics}");
        loop {
            let status = std::fs::read_to_string(status_path(&dir)).unwrap_or_default();
            if status.contains(&want) && status.contains("\"to_agent\":1,") && status.contains("\"up\":true") {
                break;
            }
            assert!(Instant::now() < deadline, "watchdog: {want} in the status file: {status}");
            agent.poll();
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    // The agent gives back what the last bridge handed it; what it held
    // from the bridges that panicked is freed after the grace: nothing is
    // the agent's any more.
    let handed = agent.handed.clone();
    agent.send(CtrlMsg::ReturnBufs(LendRecv { tenant: 0, reserved: 0, count: 1 }, BufList::from_indices(&handed)));
    let agents = |f: &Function| (0..count as u32).filter(|&i| f.pool().owner(i) == Ok(Owner::Agent)).count();
    let deadline = Instant::now() + WATCHDOG + AGENT_GONE_GRACE;
    while agents(&f) > 0 {
        assert!(Instant::now() < deadline, "watchdog: {} buffers still the agent's", agents(&f));
        agent.poll();
        std::thread::sleep(Duration::from_millis(5));
    }
    // With the bridge gone too (its cache given back), the whole pool.
    drop(serving);
    whole_pool_comes_back(&mut f);
}

/// A process of the tenant that rewrites the owner words of buffers the
/// bridge holds makes the bridge's frees of them fail. Here `f` moves the
/// owner word of every message the bridge keeps waiting for room in its
/// ring to itself: the bridge's next try of each fails (it does not hold
/// it), it hands the message back to the agent, which fails too, and its
/// free fails. The failures are counted by reason in the bridge's counts
/// and host-shimd's status file (`free_failed`).
#[test]
fn failed_frees_of_the_bridge_are_counted() {
    let (mut cfg, dir) = cluster("freefail");
    // f's ring holds four.
    cfg.functions[0].ring_capacity = 4;
    let shared = SharedStats::default();
    let _shimd = ShimdThread::start_with(&cfg, dir.clone(), Some(shared.clone()));
    let mut agent = FakeAgent::start(&cfg);
    let mut bridge = Bridge::new(Arc::new(cfg.clone()), 0, &socket_path(&dir), shared.clone()).expect("bridge");
    let mut f = Function::attach(&socket_path(&dir), "t", "f").expect("attach f");

    drive(&mut bridge, &mut agent, "the exports", |_, a| a.got.contains(&CtrlKind::PoolExport));
    agent.send(took_pools());
    agent.send(CtrlMsg::WantBufs(LendRecv { tenant: 0, reserved: 0, count: 8 }));
    drive(&mut bridge, &mut agent, "the lends", |_, a| a.lent.len() == 8);
    let bufs = agent.lent.clone();
    // Eight calls of f (function 0) from g (function 1, on node b).
    for (request, &buf) in (0u32..).zip(&bufs) {
        let d = wire::Descriptor {
            dst_fn: 0,
            src_fn: 1,
            origin: wire::desc::NO_NODE,
            request,
            buf,
            len: 100,
            ..Default::default()
        };
        agent.send(CtrlMsg::Message(MessageHdr { desc: d, flags: 0, count: 1 }, BufList::from_indices(&[buf])));
    }
    drive(&mut bridge, &mut agent, "the eight messages", |_, _| {
        bufs.iter().all(|&b| f.pool().owner(b) != Ok(Owner::Agent))
    });
    assert_eq!(bridge.stats().delivered, 4, "the ring holds four");
    // The four waiting are the bridge's; f takes them.
    let me = Owner::Held(f.info().slot);
    let waiting: Vec<u32> =
        bufs.iter().copied().filter(|&b| f.pool().owner(b) == Ok(Owner::Held(AGENT_SLOT))).collect();
    assert_eq!(waiting.len(), 4, "waiting in the bridge's backlog");
    let stolen: Vec<_> = waiting
        .iter()
        .map(|&b| f.pool().take_back(b, 100, Owner::Held(AGENT_SLOT), me).expect("owner word rewritten"))
        .collect();
    // The status file says so.
    let want = "\"not_owner\":4";
    let deadline = Instant::now() + WATCHDOG;
    loop {
        let status = std::fs::read_to_string(status_path(&dir)).unwrap_or_default();
        if status.contains("\"free_failed\":{") && status.contains(want) {
            break;
        }
        assert!(Instant::now() < deadline, "watchdog: free_failed {want} in the status file: {status}");
        bridge.step();
        agent.poll();
        std::thread::sleep(Duration::from_millis(5));
    }
    let s = bridge.stats();
    let want = BridgeFreeFailed { not_owner: 4, ..Default::default() };
    assert_eq!((s.free_failed, s.dropped.ownership), (want, 4), "{s:?}");
    assert_eq!(shared.lock().unwrap().free_failed, want, "published for host-shimd's status file");
    for lease in stolen {
        f.free(host_shim::Msg::from_parts(lease, wire::Descriptor::default())).expect("f frees what it took");
    }
}

//! The mesh sets up one fabric connection per (peer, tenant) from the
//! nodes' addresses alone, and repairs them when a peer goes away and comes
//! back (a new process on the same address). Watchdog-bounded; no timing
//! asserts.

use fabric::*;
use std::net::{SocketAddr, TcpListener};
use std::time::{Duration, Instant};

const WATCHDOG: Duration = Duration::from_secs(30);
/// The handshake deadline of these nodes: longer than a cluster's, so that
/// a loaded machine sets a peer up well within it (the tests on strangers
/// and stopped peers check that setup does not wait for it).
const HANDSHAKE: Duration = Duration::from_secs(5);

/// A loopback port distinct within this test binary (its tests run at
/// once): binding port 0 and letting it go could give two of them one port.
fn free_port() -> SocketAddr {
    dne_tests::free_port()
}

struct Side {
    mesh: Mesh,
    ep: Endpoint<DocaTransport>,
    up: Vec<ConnId>,
    events: Vec<MeshEvent>,
}

fn side(me: u16, addrs: &[SocketAddr]) -> Side {
    let cfg = EndpointConfig { max_conns: 8, ..Default::default() };
    let ep = Endpoint::new(DocaTransport::for_config(&cfg).unwrap(), cfg);
    let peers = (0..addrs.len() as u16).filter(|&i| i != me).map(|i| (i, addrs[usize::from(i)])).collect();
    let mesh = Mesh::start(MeshConfig {
        me,
        name: format!("n{me}"),
        listen: addrs[usize::from(me)],
        peers,
        tenants: vec![0, 1],
        backoff_max: Duration::from_millis(200),
        handshake: HANDSHAKE,
    })
    .unwrap();
    Side { mesh, ep, up: Vec::new(), events: Vec::new() }
}

fn step(s: &mut Side) {
    let mut ev = Vec::new();
    s.mesh.pump(&mut s.ep, &mut ev);
    for e in &ev {
        if let MeshEvent::PeerDown { conns, .. } = e {
            s.up.retain(|c| !conns.contains(c));
        }
    }
    s.events.extend(ev);
    let mut out = [Completion::EMPTY; 16];
    let n = s.ep.poll(&mut out);
    for c in &out[..n] {
        if let Completion::Connected(c) = c {
            s.up.push(*c);
        }
    }
    std::thread::sleep(Duration::from_micros(200));
}

fn until(what: &str, sides: &mut [&mut Side], done: impl Fn(&[&mut Side]) -> bool) {
    let start = Instant::now();
    while !done(sides) {
        assert!(start.elapsed() < WATCHDOG, "watchdog: {what}");
        for s in sides.iter_mut() {
            step(s);
        }
    }
}

#[test]
fn connections_come_up_and_are_repaired_after_a_peer_restart() {
    let addrs = [free_port(), free_port()];
    let mut a = side(0, &addrs);
    let mut b = side(1, &addrs);
    until("both tenants connected", &mut [&mut a, &mut b], |s| s.iter().all(|s| s.up.len() == 2));
    let before: Vec<_> = [0, 1].iter().map(|&t| a.mesh.conn(1, t).unwrap()).collect();
    assert_eq!(a.mesh.peers_up(), 1);

    // B dies: A closes both connections to it.
    drop(b);
    until("A sees B go", &mut [&mut a], |s| s[0].up.is_empty());
    assert!(a.events.iter().any(|e| matches!(e, MeshEvent::PeerDown { peer: 1, .. })));
    assert_eq!(a.mesh.conn(1, 0), None);

    // B comes back on the same address: the link is set up again, and A's
    // drained connections are reused.
    let mut b = side(1, &addrs);
    until("reconnected", &mut [&mut a, &mut b], |s| s.iter().all(|s| s.up.len() == 2));
    let after: Vec<_> = [0, 1].iter().map(|&t| a.mesh.conn(1, t).unwrap()).collect();
    let mut x = before.clone();
    let mut y = after.clone();
    x.sort();
    y.sort();
    assert_eq!(x, y, "connection ids are reused, not leaked");
}

#[test]
fn a_stranger_on_the_control_port_is_refused() {
    let addrs = [free_port(), free_port()];
    let mut a = side(0, &addrs);
    // Garbage, then a well-formed Hello from a node id that is no peer.
    let mut s = std::net::TcpStream::connect(addrs[0]).unwrap();
    std::io::Write::write_all(&mut s, b"GET / HTTP/1.1\r\n\r\n").unwrap();
    let mut out = Vec::new();
    let h = wire::mesh::MeshHello {
        node: 9,
        reserved: 0,
        pid: 1,
        layout_hash: wire::LAYOUT_HASH,
        name: wire::Name::new("x").unwrap(),
    };
    wire::mesh::MeshMsg::Hello(h).encode(&mut out).unwrap();
    let mut s2 = std::net::TcpStream::connect(addrs[0]).unwrap();
    std::io::Write::write_all(&mut s2, &out).unwrap();
    // Both are dropped by A (EOF on our side), and A keeps working.
    for mut s in [s, s2] {
        s.set_read_timeout(Some(WATCHDOG)).unwrap();
        let mut buf = [0u8; 64];
        let n = std::io::Read::read(&mut s, &mut buf).unwrap_or(0);
        assert_eq!(n, 0, "a stranger gets no answer");
    }
    let mut b = side(1, &addrs);
    until("the real peer still connects", &mut [&mut a, &mut b], |s| s.iter().all(|s| s.up.len() == 2));
}

/// A node whose tenants are split over two data-plane halves (one per
/// core): each half opens only its tenant's connections, on its own
/// endpoint; the peer, one half for both, sees one node; when the peer
/// restarts, both halves repair their own.
#[test]
fn halves_of_one_node_each_connect_their_own_tenants() {
    let addrs = [free_port(), free_port()];
    let cfg = EndpointConfig { max_conns: 8, ..Default::default() };
    let peers = vec![(1u16, addrs[1])];
    let halves = Mesh::start_shards(
        MeshConfig {
            me: 0,
            name: "n0".into(),
            listen: addrs[0],
            peers: peers.clone(),
            tenants: vec![0, 1],
            backoff_max: Duration::from_millis(200),
            handshake: HANDSHAKE,
        },
        &[vec![1], vec![0]],
    )
    .unwrap();
    let mut sides: Vec<Side> = halves
        .into_iter()
        .map(|mesh| Side {
            mesh,
            ep: Endpoint::new(DocaTransport::for_config(&cfg).unwrap(), cfg),
            up: Vec::new(),
            events: Vec::new(),
        })
        .collect();
    let mut b = side(1, &addrs);
    {
        let [h1, h0] = &mut sides[..] else { unreachable!() };
        until("every tenant connected", &mut [&mut *h1, &mut *h0, &mut b], |s| {
            s[0].up.len() == 1 && s[1].up.len() == 1 && s[2].up.len() == 2
        });
        assert!(h1.mesh.conn(1, 1).is_some() && h1.mesh.conn(1, 0).is_none(), "the first half has tenant 1 only");
        assert!(h0.mesh.conn(1, 0).is_some() && h0.mesh.conn(1, 1).is_none(), "the second half has tenant 0 only");
        assert_eq!(h0.mesh.peers_up(), 1);
    }
    drop(b);
    let [h1, h0] = &mut sides[..] else { unreachable!() };
    until("both halves see the peer go", &mut [&mut *h1, &mut *h0], |s| s.iter().all(|s| s.up.is_empty()));
    let mut b = side(1, &addrs);
    until("both halves repaired", &mut [&mut *h1, &mut *h0, &mut b], |s| {
        s[2].up.len() == 2 && s[0].up.len() == 1 && s[1].up.len() == 1
    });
    assert!(h1.events.iter().any(|e| matches!(e, MeshEvent::PeerDown { peer: 1, .. })));
    assert!(h0.events.iter().any(|e| matches!(e, MeshEvent::PeerDown { peer: 1, .. })));
    let bad = Mesh::start_shards(
        MeshConfig {
            me: 0,
            name: "n0".into(),
            listen: free_port(),
            peers,
            tenants: vec![0, 1],
            backoff_max: Duration::from_millis(200),
            handshake: HANDSHAKE,
        },
        &[vec![0]],
    );
    assert!(bad.is_err(), "halves must cover every tenant");
}

/// Whether `s` is still open: what the node sent it has been read and no
/// end-of-file follows (the node has not given up on it).
fn still_open(s: &mut std::net::TcpStream) -> bool {
    s.set_nonblocking(true).unwrap();
    let mut buf = [0u8; 256];
    loop {
        match std::io::Read::read(s, &mut buf) {
            Ok(0) => return false,
            Ok(_) => {}
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => return true,
            Err(_) => return false,
        }
    }
}

/// Connections that open the control port and say nothing (a port scan, a
/// stuck client) each get the handshake deadline, but none of them holds
/// the port for anyone else: the real peer, dialing in behind 24 of them,
/// is set up while the newest 15 are still waiting (the node keeps 16
/// connections waiting at most, the peer's was one of them, and the
/// oldest were dropped to make room). Without this, the node read each
/// stranger's Hello in turn, HANDSHAKE each, before the peer's.
#[test]
fn silent_strangers_on_the_control_port_do_not_hold_up_a_peer() {
    let addrs = [free_port(), free_port()];
    let mut a = side(0, &addrs);
    let mut strangers: Vec<_> = (0..24).map(|_| std::net::TcpStream::connect(addrs[0]).unwrap()).collect();
    let mut b = side(1, &addrs);
    until("the peer connects", &mut [&mut a, &mut b], |s| s.iter().all(|s| s.up.len() == 2));
    let open: Vec<bool> = strangers.iter_mut().map(still_open).collect();
    assert_eq!(open.iter().filter(|&&o| o).count(), 15, "the peer was set up only after A gave up on strangers");
    assert!(open[9..].iter().all(|&o| o), "the oldest strangers make room, not the newest: {open:?}");
    // Each stranger is still cut off at the handshake deadline.
    for mut s in strangers {
        s.set_nonblocking(false).unwrap();
        s.set_read_timeout(Some(WATCHDOG)).unwrap();
        let mut buf = [0u8; 64];
        match std::io::Read::read(&mut s, &mut buf) {
            Ok(0) => {}
            Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => {}
            other => panic!("a silent stranger is dropped: {other:?}"),
        }
    }
}

/// A peer whose process is stopped still completes TCP connections (its
/// kernel answers) but never its Hello. Dialing it must not hold up the
/// node's other links: C sets its link to A up while its first dial to the
/// stopped B is still waiting for B's Hello (without this, each dial to B
/// took C's control thread for the handshake deadline, and A's setup
/// waited behind it).
#[test]
fn a_stopped_peer_does_not_hold_up_the_other_links() {
    let addrs = [free_port(), free_port(), free_port()];
    // B: a listener whose process never accepts (what a SIGSTOPped node
    // looks like from the network).
    let stopped = TcpListener::bind(addrs[1]).unwrap();
    let mut a = side(0, &addrs);
    let mut c = side(2, &addrs);
    until("C and A connect", &mut [&mut a, &mut c], |s| s.iter().all(|s| s.up.len() == 2));
    let (mut first, _) = stopped.accept().unwrap();
    assert!(still_open(&mut first), "C's link to A was set up only after C gave up on its first dial to B");
    assert_eq!(c.mesh.peers_up(), 1);
}

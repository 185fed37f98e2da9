//! What a hostile or careless peer cannot do to the emulated backend, and
//! where the emulation is as strict as DOCA: each test failed before its
//! fix.
#![cfg(not(feature = "sdk"))]

use doca::emu_wire::{ConnBlob, ExportKind, FRAME_LEN, Frame, MmapBlob};
use doca::*;
use std::io::{Read, Write};
use std::os::fd::AsRawFd;
use std::sync::Arc;
use std::time::{Duration, Instant};

fn dev() -> Device {
    Device::open_first().unwrap()
}

fn readable(fd: std::os::fd::BorrowedFd<'_>, t: Duration) -> bool {
    use rustix::event::{PollFd, PollFlags, Timespec, poll};
    let ts = Timespec { tv_sec: t.as_secs() as i64, tv_nsec: i64::from(t.subsec_nanos()) };
    let mut fds = [PollFd::from_borrowed_fd(fd, PollFlags::IN)];
    poll(&mut fds, Some(&ts)).expect("poll") > 0
}

/// A started RDMA context with `tasks` send and receive tasks.
fn started_rdma(pe: &ProgressEngine, dev: &Device, tasks: u32) -> Rdma {
    let r = Rdma::new(pe, dev, RdmaConfig { send_tasks: tasks, recv_tasks: tasks, ..Default::default() }).unwrap();
    r.start().unwrap();
    pe.progress();
    r
}

/// A started mmap of all of `r` on `dev`.
fn mmap(r: &Arc<shm::Region>, dev: &Device, access: Access) -> Mmap {
    Mmap::builder(MemRange::region(r.clone())).permissions(access).add_device(dev).start().unwrap()
}

fn region(len: usize) -> Arc<shm::Region> {
    Arc::new(shm::Region::create("dne-review", len, shm::PagePolicy::Normal).unwrap())
}

/// A client that connects less than `ACCEPT_EVERY` (1 ms) after the
/// server's last accept wakes a server that follows the documented protocol
/// (clear, progress once more, arm, sleep). Before, the accept was put off and
/// nothing made the handle readable again: it slept with a client waiting.
#[test]
fn a_client_connecting_just_after_an_accept_wakes_the_sleeping_server() {
    let dev = dev();
    let (pe_s, pe_c) = (ProgressEngine::new().unwrap(), ProgressEngine::new().unwrap());
    let name = format!("rev-acc-{}", std::process::id());
    let server = ComchServer::new(&pe_s, &dev, &name, ComchConfig::default()).unwrap();
    server.start().unwrap();
    pe_s.progress(); // Running
    pe_s.progress(); // an accept that finds nobody
    let client = ComchClient::new(&pe_c, &dev, &name, ComchConfig::default()).unwrap();
    client.start().unwrap();
    pe_c.progress(); // connect + hello
    assert_eq!(client.state(), CtxState::Running);
    // The sleeper: clear, progress once more, arm, then sleep on the
    // handle.
    pe_s.clear_notification().unwrap();
    pe_s.progress();
    let mut buf = vec![0u8; COMCH_MAX_MSG_SIZE as usize];
    let connected = matches!(server.poll_event(&mut buf), Some(ComchEvent::Connected(_)));
    pe_s.request_notification().unwrap();
    let hs = pe_s.notification_handle().unwrap();
    assert!(
        connected || readable(hs, Duration::from_secs(2)),
        "a client is waiting in the listen backlog but the server's handle stays quiet"
    );
}

/// Accepted comch sockets that never send the hello are dropped after
/// `HELLO_WAIT`, and the one silent longest (over 100 ms) makes room when
/// the server is full. Before, `max_clients` of them locked every real client out.
#[test]
fn silent_comch_connections_do_not_lock_clients_out() {
    use rustix::net::{AddressFamily, SocketAddrUnix, SocketFlags, SocketType};
    let dev = dev();
    let pe = ProgressEngine::new().unwrap();
    let name = format!("rev-silent-{}", std::process::id());
    let cfg = ComchConfig { max_clients: 2, ..Default::default() };
    let server = ComchServer::new(&pe, &dev, &name, cfg).unwrap();
    server.start().unwrap();
    pe.progress();
    let path = runtime_dir().join(format!("comch-{name}.sock"));
    let addr = SocketAddrUnix::new(path.as_path()).unwrap();
    let mut silent = Vec::new();
    for _ in 0..2 {
        let fd =
            rustix::net::socket_with(AddressFamily::UNIX, SocketType::SEQPACKET, SocketFlags::CLOEXEC, None).unwrap();
        rustix::net::connect(&fd, &addr).unwrap();
        silent.push(fd); // connected, says nothing
    }
    // Silent for longer than a real client takes to say hello (100 ms).
    for _ in 0..100 {
        pe.progress();
        std::thread::sleep(Duration::from_millis(2));
    }
    let client = ComchClient::new(&pe, &dev, &name, ComchConfig::default()).unwrap();
    client.start().unwrap();
    let mut buf = vec![0u8; COMCH_MAX_MSG_SIZE as usize];
    let start = Instant::now();
    let mut connected = false;
    while !connected && start.elapsed() < Duration::from_secs(5) {
        pe.progress();
        while let Some(e) = server.poll_event(&mut buf) {
            connected |= matches!(e, ComchEvent::Connected(_));
        }
        while client.poll_event(&mut buf).is_some() {}
        std::thread::sleep(Duration::from_millis(1));
    }
    assert!(
        connected,
        "two silent sockets have locked the real client out for 5 s (client state {:?})",
        client.state()
    );
}

/// Memory imported from an RDMA export (which DOCA hands to a peer as the
/// *remote* side of an RDMA read or write) is not accepted as a receive's
/// buffer. Before, it was, and as a send's.
#[test]
fn memory_imported_from_an_rdma_export_is_not_a_local_buffer() {
    let dev = dev();
    let pe = ProgressEngine::new().unwrap();
    let r = region(64 << 10);
    let m = mmap(&r, &dev, Access::LOCAL_READ_WRITE | Access::RDMA_READ | Access::RDMA_WRITE);
    let remote = RemoteMmap::from_export(&dev, &m.export_rdma(&dev).unwrap()).unwrap();
    let rdma = Rdma::new(&pe, &dev, RdmaConfig::default()).unwrap();
    rdma.start().unwrap();
    pe.progress();
    let inv = BufInventory::new(4).unwrap();
    let res = rdma.submit_receive(inv.remote_buf(&remote, 0, 4096).unwrap(), 1);
    assert!(res.is_err(), "a receive into memory imported from an RDMA export was accepted");
}

/// An "export" blob that names an open file of a process the importer may
/// look into (here a plain file, never exported) is not imported: an
/// export is a memfd sealed against resizing. Before, it was imported,
/// writable, because the blob itself states the access rights.
#[test]
fn a_blob_naming_a_file_that_was_never_exported_is_not_imported() {
    let dev = dev();
    let path = std::env::temp_dir().join(format!("dne-review-notexported-{}", std::process::id()));
    let mut f = std::fs::OpenOptions::new().read(true).write(true).create(true).truncate(true).open(&path).unwrap();
    f.write_all(&[0u8; 8192]).unwrap();
    let st = rustix::fs::fstat(&f).unwrap();
    let blob = MmapBlob {
        kind: ExportKind::Pci,
        access: (Access::LOCAL_READ_WRITE | Access::PCI_READ_WRITE).bits(),
        pid: std::process::id(),
        fd: f.as_raw_fd() as u32,
        st_dev: st.st_dev,
        st_ino: st.st_ino,
        offset: 0,
        len: 8192,
    };
    let res = RemoteMmap::from_export(&dev, &blob.encode());
    let _ = std::fs::remove_file(&path);
    assert!(
        res.is_err(),
        "imported (writable = {:?}) a regular file that no mmap exported",
        res.map(|m| m.is_writable())
    );
}

/// An acknowledgement of a send that was never written fails the
/// connection without completing any send as placed. Before, every send
/// awaiting an acknowledgement completed `Ok` first (lost, and counted as
/// delivered).
#[test]
fn an_ack_beyond_what_was_sent_completes_no_send_as_placed() {
    let dev = dev();
    let pe = ProgressEngine::new().unwrap();
    let a = started_rdma(&pe, &dev, 8);
    let (ca, blob_a) = a.export().unwrap();
    let ba = ConnBlob::decode(&blob_a).unwrap();
    // The fake peer: a listener for a's stream, and its own stream to a.
    let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    l.set_nonblocking(true).unwrap();
    let fake = ConnBlob { addr: l.local_addr().unwrap(), token: 0x1234_5679, max_send: 4096 };
    a.connect(ca, &fake.encode()).unwrap();
    let mut to_a = std::net::TcpStream::connect(ba.addr).unwrap();
    to_a.write_all(&Frame::Hello { token: ba.token }.encode()).unwrap();
    let start = Instant::now();
    let mut from_a = loop {
        pe.progress();
        if let Ok((s, _)) = l.accept() {
            break s;
        }
        assert!(start.elapsed() < Duration::from_secs(10), "a never dialled");
    };
    from_a.set_nonblocking(false).unwrap();
    from_a.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    let mut hello = [0u8; FRAME_LEN];
    from_a.read_exact(&mut hello).unwrap();
    let mut up = false;
    while !up {
        pe.progress();
        while let Some(e) = a.poll_event() {
            up |= matches!(e, RdmaEvent::Connected(_));
        }
        assert!(start.elapsed() < Duration::from_secs(10), "never up");
    }
    let r = region(64 << 10);
    let m = mmap(&r, &dev, Access::LOCAL_READ_WRITE);
    let inv = BufInventory::new(8).unwrap();
    for i in 0..2u64 {
        let mut b = inv.buf(&m, i * 4096, 4096).unwrap();
        b.set_data_len(8).unwrap();
        a.submit_send(ca, b, None, i).unwrap();
    }
    for _ in 0..10 {
        pe.progress();
    }
    let mut sent = [0u8; 2 * (FRAME_LEN + 8)];
    from_a.read_exact(&mut sent).unwrap();
    // The peer placed nothing; it acknowledges a send that never existed.
    from_a.write_all(&Frame::Ack { seq: 77 }.encode()).unwrap();
    let mut ok = Vec::new();
    let mut failed = false;
    while !failed {
        pe.progress();
        while let Some(e) = a.poll_event() {
            match e {
                RdmaEvent::SendDone { user_data, result: Ok(()), .. } => ok.push(user_data),
                RdmaEvent::ConnectionFailed(..) => failed = true,
                _ => {}
            }
        }
        assert!(start.elapsed() < Duration::from_secs(10), "never failed");
    }
    assert!(ok.is_empty(), "sends {ok:?} completed Ok on an acknowledgement of send 77, which was never written");
}

/// A receive buffer that already holds data (`data_len` > 0) is refused:
/// DOCA places what arrives after the data, the emulation from the start.
/// Before, it was posted, and its data overwritten.
#[test]
fn a_receive_buffer_holding_data_is_refused() {
    let dev = dev();
    let pe = ProgressEngine::new().unwrap();
    let b = started_rdma(&pe, &dev, 4);
    let r = region(64 << 10);
    let m = mmap(&r, &dev, Access::LOCAL_READ_WRITE);
    let inv = BufInventory::new(8).unwrap();
    let mut rb = inv.buf(&m, 4096, 128).unwrap();
    rb.set_data_len(100).unwrap(); // 100 bytes of data already there
    let refused = b.submit_receive(rb, 9).map_err(|e| e.error);
    assert_eq!(refused, Err(DocaError::INVALID_VALUE), "a receive into a buffer holding data was posted");
    let empty = inv.buf(&m, 4096, 128).unwrap();
    b.submit_receive(empty, 10).unwrap();
}

/// A comch connection id names one connection: the next client to take
/// its slot gets another, and a send to the old id is refused, not sent
/// to the new client. Before, ids were slot numbers.
#[test]
fn a_send_to_a_client_that_left_does_not_reach_the_next() {
    let dev = dev();
    let pe = ProgressEngine::new().unwrap();
    let name = format!("hostile-ids-{}", std::process::id());
    let server = ComchServer::new(&pe, &dev, &name, ComchConfig { max_clients: 1, ..Default::default() }).unwrap();
    server.start().unwrap();
    pe.progress();
    let mut buf = vec![0u8; COMCH_MAX_MSG_SIZE as usize];
    let connect = |buf: &mut [u8]| {
        let client = ComchClient::new(&pe, &dev, &name, ComchConfig::default()).unwrap();
        client.start().unwrap();
        let start = Instant::now();
        loop {
            pe.progress();
            if let Some(ComchEvent::Connected(id)) = server.poll_event(buf) {
                return (client, id);
            }
            assert!(start.elapsed() < Duration::from_secs(10), "watchdog: no Connected");
        }
    };
    let (first, old) = connect(&mut buf);
    drop(first);
    let start = Instant::now();
    loop {
        pe.progress();
        if let Some(ComchEvent::Disconnected(id)) = server.poll_event(&mut buf) {
            assert_eq!(id, old);
            break;
        }
        assert!(start.elapsed() < Duration::from_secs(10), "watchdog: no Disconnected");
    }
    let (second, new) = connect(&mut buf);
    assert_eq!(new.index(), old.index(), "the same slot (one client at most)");
    assert_ne!(new, old);
    assert_eq!(server.send(old, b"for the first", 1), Err(DocaError::NOT_CONNECTED));
    server.send(new, b"for the second", 2).unwrap();
    let start = Instant::now();
    loop {
        pe.progress();
        if let Some(ComchEvent::Message { len, .. }) = second.poll_event(&mut buf) {
            assert_eq!(&buf[..len as usize], b"for the second");
            break;
        }
        assert!(start.elapsed() < Duration::from_secs(10), "watchdog: the second client's message");
    }
}

/// A client whose hello is already in its socket is not taken for silent
/// by a connection accepted right after it (the newcomer is refused, the
/// server being full). Before, the eviction of the silent longest evicted
/// it: a peer that kept connecting still locked real clients out.
#[test]
fn a_client_that_said_hello_is_not_evicted_by_the_next_connect() {
    use rustix::net::{AddressFamily, SocketAddrUnix, SocketFlags, SocketType};
    let dev = dev();
    let (pe, pe_c) = (ProgressEngine::new().unwrap(), ProgressEngine::new().unwrap());
    let name = format!("hostile-evict-{}", std::process::id());
    let server = ComchServer::new(&pe, &dev, &name, ComchConfig { max_clients: 1, ..Default::default() }).unwrap();
    server.start().unwrap();
    pe.progress();
    let path = runtime_dir().join(format!("comch-{name}.sock"));
    let addr = SocketAddrUnix::new(path.as_path()).unwrap();
    let client = ComchClient::new(&pe_c, &dev, &name, ComchConfig::default()).unwrap();
    client.start().unwrap();
    pe_c.progress(); // connect + hello, now in the server's backlog
    assert_eq!(client.state(), CtxState::Running);
    let silent =
        rustix::net::socket_with(AddressFamily::UNIX, SocketType::SEQPACKET, SocketFlags::CLOEXEC, None).unwrap();
    rustix::net::connect(&silent, &addr).unwrap();
    let mut buf = vec![0u8; COMCH_MAX_MSG_SIZE as usize];
    let mut connected = false;
    let start = Instant::now();
    while !connected && start.elapsed() < Duration::from_millis(500) {
        pe.progress();
        while let Some(e) = server.poll_event(&mut buf) {
            connected |= matches!(e, ComchEvent::Connected(_));
        }
        std::thread::sleep(Duration::from_millis(1));
    }
    assert!(connected, "the client that had said hello was dropped for a socket that connected after it");
    drop(silent);
}

/// A peer that connects to a fast-path consumer's socket and sends without
/// a credit, or sends garbage, loses its link; the consumer keeps its
/// posted receive for a real producer, which then fills it.
#[test]
fn a_fast_path_producer_sending_without_credit_is_cut_off() {
    use rustix::net::{AddressFamily, SendFlags, SocketAddrUnix, SocketFlags, SocketType};
    let t = FpRig::new("hostile-fp", Duration::from_secs(10));
    t.consumer.submit_receive(t.inv.buf(&t.m, 0, 1024).unwrap(), 1).unwrap();
    // Data without a credit; an immediate over the cap; credits given back
    // that were never granted.
    for bad in
        [&b"\x00\x01\x00\x00\x00\x00stolen"[..], &b"\x00\x01\x00\x00\x00\xffgarbage"[..], &b"\x02\x01\x00\x00\x00"[..]]
    {
        let fd =
            rustix::net::socket_with(AddressFamily::UNIX, SocketType::SEQPACKET, SocketFlags::CLOEXEC, None).unwrap();
        rustix::net::connect(&fd, &SocketAddrUnix::new(t.path.as_path()).unwrap()).unwrap();
        rustix::net::send(&fd, bad, SendFlags::NOSIGNAL).unwrap();
        let start = Instant::now();
        // Cut off: the consumer closes the link.
        let mut b = [0u8; 16];
        loop {
            t.pe.progress();
            if let Ok((0, _)) = rustix::net::recv(&fd, &mut b, rustix::net::RecvFlags::DONTWAIT) {
                break;
            }
            t.watchdog(start, "the consumer to cut the hostile link");
        }
        assert!(t.consumer.poll_event().is_none(), "the hostile packet consumed the posted receive");
    }
    t.real_producer_fills_receive_1(|| {});
}

/// A peer announcing consumer after consumer on its comch connection (and
/// never retiring them) is disconnected once past the cap, and its
/// announcements never queue beyond the receive queue. Before, every one
/// was remembered and queued as an event: memory without bound.
#[test]
fn a_comch_peer_announcing_consumers_without_end_is_disconnected() {
    use rustix::io::Errno;
    use rustix::net::{AddressFamily, SendFlags, SocketAddrUnix, SocketFlags, SocketType};
    let dev = dev();
    let pe = ProgressEngine::new().unwrap();
    let name = format!("rev-announce-{}", std::process::id());
    let cfg = ComchConfig { recv_queue: 8, ..Default::default() };
    let server = ComchServer::new(&pe, &dev, &name, cfg).unwrap();
    server.start().unwrap();
    pe.progress();
    let path = runtime_dir().join(format!("comch-{name}.sock"));
    let flags = SocketFlags::CLOEXEC | SocketFlags::NONBLOCK;
    let fd = rustix::net::socket_with(AddressFamily::UNIX, SocketType::SEQPACKET, flags, None).unwrap();
    rustix::net::connect(&fd, &SocketAddrUnix::new(path.as_path()).unwrap()).unwrap();
    rustix::net::send(&fd, b"DNECOMCH", SendFlags::NOSIGNAL).unwrap();
    let mut buf = vec![0u8; COMCH_MAX_MSG_SIZE as usize];
    let (mut ups, mut gone) = (0usize, false);
    let start = Instant::now();
    let mut id = 1u32;
    while !gone {
        // Unread, at most the receive queue's worth is queued.
        for _ in 0..4 {
            pe.progress();
        }
        let mut queued = 0;
        while let Some(e) = server.poll_event(&mut buf) {
            match e {
                ComchEvent::ConsumerUp { .. } => {
                    ups += 1;
                    queued += 1;
                }
                ComchEvent::Disconnected(_) => gone = true,
                _ => {}
            }
        }
        assert!(queued <= 8, "{queued} announcements queued past the receive queue of 8");
        let mut pkt = [0u8; 13];
        pkt[0] = 1; // a consumer up
        pkt[1..5].copy_from_slice(&id.to_le_bytes());
        pkt[5..].copy_from_slice(&u64::from(id).to_le_bytes());
        match rustix::net::send(&fd, &pkt, SendFlags::DONTWAIT | SendFlags::NOSIGNAL) {
            Ok(_) => id += 1,
            Err(Errno::AGAIN) => {}
            Err(_) => gone = true, // the server closed it
        }
        assert!(start.elapsed() < Duration::from_secs(10), "watchdog: still connected after {id} announcements");
    }
    assert!(ups <= 256, "{ups} consumers of one peer remembered");
}

/// A stranger that connects to a consumer's socket and says nothing gets
/// no credit, and a producer that asked for credits and never gives them
/// back when revoked loses its link after `REVOKE_WAIT` (5 s): a real
/// producer then fills the posted receive. Before, credits went round
/// robin to every link at once, the silent stranger's for ever.
#[test]
fn a_fast_path_link_hoarding_credits_is_cut_off() {
    use rustix::net::{AddressFamily, RecvFlags, SendFlags, SocketAddrUnix, SocketFlags, SocketType};
    let t = FpRig::new("hostile-hoard", Duration::from_secs(20));
    let stranger = || {
        let fd =
            rustix::net::socket_with(AddressFamily::UNIX, SocketType::SEQPACKET, SocketFlags::CLOEXEC, None).unwrap();
        rustix::net::connect(&fd, &SocketAddrUnix::new(t.path.as_path()).unwrap()).unwrap();
        fd
    };
    let silent = stranger();
    for _ in 0..20 {
        t.pe.progress();
    }
    t.consumer.submit_receive(t.inv.buf(&t.m, 0, 1024).unwrap(), 1).unwrap();
    let hoarder = stranger();
    rustix::net::send(&hoarder, &[1], SendFlags::NOSIGNAL).unwrap(); // want
    let mut b = [0u8; 16];
    let start = Instant::now();
    loop {
        t.pe.progress();
        if let Ok((n, _)) = rustix::net::recv(&hoarder, &mut b, RecvFlags::DONTWAIT) {
            assert_eq!(&b[..n], &[0, 1, 0, 0, 0], "one credit granted");
            break;
        }
        t.watchdog(start, "the credit for the one that asked");
    }
    // The hoarder is asked to give its credit back, then cut off (after
    // `REVOKE_WAIT`), before the real producer gets it.
    t.real_producer_fills_receive_1(|| std::thread::sleep(Duration::from_millis(1)));
    let (n, _) = rustix::net::recv(&hoarder, &mut b, RecvFlags::DONTWAIT).unwrap();
    assert_eq!(&b[..n], &[1], "a revoke");
    assert!(matches!(rustix::net::recv(&hoarder, &mut b, RecvFlags::DONTWAIT), Ok((0, _))), "the link closed");
    assert!(
        matches!(rustix::net::recv(&silent, &mut b, RecvFlags::DONTWAIT), Err(rustix::io::Errno::AGAIN)),
        "the silent stranger was granted something"
    );
}

/// A producer that never reads its socket fills it with the consumer's
/// grants, so later grants stay unwritten; it then spends those credits it
/// was never sent (`spend`: two data packets, or a `Return` of two). Its
/// link is cut for that, and another producer asking for credits gets
/// them. Before, the consumer counted the unwritten credits as the
/// producer's to spend, and a revoke then took back more unwritten
/// credits than the link still held: the consumer's progress panicked
/// ("attempt to subtract with overflow"; in a release build the credit
/// counts wrapped and no credit was granted again).
fn a_fast_path_producer_spending_unsent_credits_is_cut_off(name: &str, spend: &[&[u8]]) {
    use rustix::net::{AddressFamily, RecvFlags, SendFlags, SocketAddrUnix, SocketFlags, SocketType};
    let t = FpRig::new(name, Duration::from_secs(20));
    let stranger = || {
        let fd =
            rustix::net::socket_with(AddressFamily::UNIX, SocketType::SEQPACKET, SocketFlags::CLOEXEC, None).unwrap();
        rustix::net::connect(&fd, &SocketAddrUnix::new(t.path.as_path()).unwrap()).unwrap();
        fd
    };
    for k in 0..2u64 {
        t.consumer.submit_receive(t.inv.buf(&t.m, k * 1024, 1024).unwrap(), k).unwrap();
    }
    let hostile = stranger();
    rustix::net::send(&hostile, &[1], SendFlags::NOSIGNAL).unwrap(); // want
    for _ in 0..20 {
        t.pe.progress();
    }
    // Each round: spend the two credits, ask again, and let the consumer
    // grant two more (a grant the hostile producer never reads). Its
    // socket is full long before the last round (a few hundred grants).
    let mut cut = false;
    'rounds: for _ in 0..4000 {
        for &p in spend.iter().chain([&[1u8][..]].iter()) {
            if rustix::net::send(&hostile, p, SendFlags::NOSIGNAL).is_err() {
                cut = true;
                break 'rounds;
            }
        }
        t.pe.progress();
        // The receives data filled are posted again.
        while let Some(FastPathEvent::Received { buf, user_data, .. }) = t.consumer.poll_event() {
            let mut buf = buf;
            buf.set_data_len(0).unwrap();
            t.consumer.submit_receive(buf, user_data).unwrap();
        }
        t.pe.progress();
    }
    // Another producer asks: the consumer revokes the hostile one's
    // credits (if its link is still there) and grants to this one.
    let asker = stranger();
    rustix::net::send(&asker, &[1], SendFlags::NOSIGNAL).unwrap();
    let mut b = [0u8; 16];
    let start = Instant::now();
    loop {
        t.pe.progress();
        if let Ok((n, _)) = rustix::net::recv(&asker, &mut b, RecvFlags::DONTWAIT) {
            assert_eq!(b[0], 0, "a grant: {:?}", &b[..n]);
            break;
        }
        t.watchdog(start, "a credit for the producer that asked");
    }
    assert!(cut, "the link spending credits it was never sent was not cut");
}

#[test]
fn a_fast_path_producer_sending_on_unsent_credits_is_cut_off() {
    let data: &[u8] = b"\x00\x01\x00\x00\x00\x00stolen";
    a_fast_path_producer_spending_unsent_credits_is_cut_off("hostile-unsent-data", &[data, data]);
}

#[test]
fn a_fast_path_producer_returning_unsent_credits_is_cut_off() {
    a_fast_path_producer_spending_unsent_credits_is_cut_off("hostile-unsent-return", &[b"\x02\x02\x00\x00\x00"]);
}

/// Each [`FpRig`] finds its own consumer's socket, though the runtime
/// directory is shared with the other tests of this process (run in
/// parallel) and with other processes. Before, a rig took the first
/// socket that was not there when it began, which may be another's made
/// at the same time: a hostile test then talked to another test's
/// consumer, and failed with "Connection refused" once that test had
/// ended.
#[test]
fn fast_path_rigs_made_at_once_each_find_their_own_socket() {
    use std::sync::atomic::{AtomicUsize, Ordering};
    const RIGS: usize = 16;
    for round in 0..30 {
        let (ready, made) = (Arc::new(std::sync::Barrier::new(RIGS)), Arc::new(AtomicUsize::new(0)));
        let rigs: Vec<_> = (0..RIGS)
            .map(|i| {
                let (ready, made) = (ready.clone(), made.clone());
                std::thread::spawn(move || {
                    ready.wait();
                    let t = FpRig::new(&format!("rigs-at-once-{i}"), Duration::from_secs(20));
                    // Every rig stays up until all are made (Relaxed: only
                    // the count matters).
                    made.fetch_add(1, Ordering::Relaxed);
                    let start = Instant::now();
                    while made.load(Ordering::Relaxed) < RIGS {
                        std::thread::yield_now();
                        t.watchdog(start, "the other rigs");
                    }
                    t.path.clone()
                })
            })
            .collect();
        let mut paths: Vec<_> = rigs.into_iter().map(|r| r.join().unwrap()).collect();
        paths.sort();
        paths.dedup();
        assert_eq!(paths.len(), RIGS, "round {round}: rigs made at once found the same socket: {paths:?}");
    }
}

/// The comch fast-path sockets this process has bound: the paths
/// `/proc/net/unix` gives for the socket inodes among its fds.
fn own_fp_sockets() -> Vec<std::path::PathBuf> {
    let ours: Vec<u64> = std::fs::read_dir("/proc/self/fd")
        .unwrap()
        .flatten()
        .filter_map(|e| std::fs::read_link(e.path()).ok())
        .filter_map(|l| l.to_str()?.strip_prefix("socket:[")?.strip_suffix(']')?.parse().ok())
        .collect();
    let table = std::fs::read_to_string("/proc/net/unix").unwrap();
    let mut paths: Vec<std::path::PathBuf> = table
        .lines()
        .skip(1)
        .filter_map(|l| {
            // Num RefCount Protocol Flags Type St Inode Path
            let f: Vec<&str> = l.split_whitespace().collect();
            let (inode, path) = (f.get(6)?.parse::<u64>().ok()?, f.get(7)?);
            (ours.contains(&inode) && path.contains("/comch-fp-")).then(|| path.into())
        })
        .collect();
    // A consumer's accepted links show its path too.
    paths.sort();
    paths.dedup();
    paths
}

/// A comch connection on one engine with a started fast-path consumer on
/// the client's side (buffers of `m`), and the path of the consumer's
/// socket, for peers that talk to it directly.
struct FpRig {
    pe: ProgressEngine,
    server: ComchServer,
    conn: ComchConnId,
    r: Arc<shm::Region>,
    m: Mmap,
    inv: BufInventory,
    consumer: ComchConsumer,
    path: std::path::PathBuf,
    limit: Duration,
    _client: ComchClient,
}

impl FpRig {
    fn new(name: &str, limit: Duration) -> FpRig {
        let dev = dev();
        let pe = ProgressEngine::new().unwrap();
        let name = format!("{name}-{}", std::process::id());
        let server = ComchServer::new(&pe, &dev, &name, ComchConfig::default()).unwrap();
        server.start().unwrap();
        let client = ComchClient::new(&pe, &dev, &name, ComchConfig::default()).unwrap();
        client.start().unwrap();
        let mut msg = vec![0u8; COMCH_MAX_MSG_SIZE as usize];
        let watchdog = |start: Instant, what: &str| assert!(start.elapsed() < limit, "watchdog: {what}");
        let start = Instant::now();
        let conn = loop {
            pe.progress();
            if let Some(ComchEvent::Connected(c)) = server.poll_event(&mut msg) {
                break c;
            }
            watchdog(start, "connection");
        };
        let r = region(64 << 10);
        let m = mmap(&r, &dev, Access::LOCAL_READ_WRITE);
        let inv = BufInventory::new(8).unwrap();
        let consumer = ComchConsumer::new(&pe, ComchPeer::Client(&client), &m, FastPathConfig::default()).unwrap();
        // Its socket is the one of this process that `start` binds: other
        // tests of this process make consumers in parallel (so one rig
        // starts its consumer at a time), and other processes share the
        // runtime directory (so only this process's sockets count).
        static STARTING: std::sync::Mutex<()> = std::sync::Mutex::new(());
        let starting = STARTING.lock().unwrap_or_else(|e| e.into_inner());
        let before = own_fp_sockets();
        consumer.start().unwrap();
        let mut new: Vec<_> = own_fp_sockets().into_iter().filter(|p| !before.contains(p)).collect();
        drop(starting);
        assert_eq!(new.len(), 1, "the consumer's socket: {new:?}");
        let path = new.remove(0);
        let start = Instant::now();
        while !matches!(server.poll_event(&mut msg), Some(ComchEvent::ConsumerUp { .. })) {
            pe.progress();
            watchdog(start, "ConsumerUp");
        }
        FpRig { pe, server, conn, r, m, inv, consumer, path, limit, _client: client }
    }

    fn watchdog(&self, start: Instant, what: &str) {
        assert!(start.elapsed() < self.limit, "watchdog: {what}");
    }

    /// A real producer on the server's side sends "hello" (retrying on
    /// `AGAIN`, calling `between` after each refusal), and it lands in the
    /// consumer's receive posted with tag 1 at offset 0.
    fn real_producer_fills_receive_1(&self, between: impl Fn()) {
        let producer =
            ComchProducer::new(&self.pe, ComchPeer::Server(&self.server, self.conn), FastPathConfig::default())
                .unwrap();
        producer.start().unwrap();
        let mut src = self.inv.buf(&self.m, 4096, 64).unwrap();
        src.set_data_len(5).unwrap();
        self.r.copy_in(4096, b"hello").unwrap();
        let start = Instant::now();
        loop {
            self.pe.progress();
            match producer.submit_send(src, self.consumer.id(), b"", 2) {
                Ok(()) => break,
                Err(e) => {
                    assert!(matches!(e.error, DocaError::AGAIN | DocaError::BAD_STATE), "{e}");
                    src = e.buf;
                }
            }
            between();
            self.watchdog(start, "a credit for the real producer");
        }
        let start = Instant::now();
        let got = loop {
            self.pe.progress();
            if let Some(e) = self.consumer.poll_event() {
                break e;
            }
            self.watchdog(start, "the real producer's data");
        };
        assert!(matches!(got, FastPathEvent::Received { user_data: 1, result: Ok(()), .. }), "{got:?}");
        let mut landed = [0u8; 5];
        self.r.copy_out(0, &mut landed).unwrap();
        assert_eq!(&landed, b"hello");
    }
}

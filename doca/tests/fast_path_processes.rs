//! The comch fast path between two real processes (emulated backend): a
//! "host" process (this test binary re-executed with `DOCA_FP_ROLE=host`)
//! connects a comch client, starts a consumer on its own memfd pool and
//! posts receives; the "DPU" (the test) runs the server and a producer,
//! learns the consumer's id from `ConsumerUp`, and sends messages, retrying
//! on `AGAIN` while nothing is posted. The host checks every payload and
//! immediate byte for byte in its own pool and exits 0 only if all arrived
//! in order. Every wait is bounded by a watchdog.
#![cfg(not(feature = "sdk"))] // one machine plays both sides

use doca::*;
use std::io::Write;
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

const ROLE_ENV: &str = "DOCA_FP_ROLE";
const NAME_ENV: &str = "DOCA_FP_NAME";
const MESSAGES: u32 = 64;
const SLOT: u64 = 4096;
const WATCHDOG: Duration = Duration::from_secs(30);

fn payload(i: u32) -> Vec<u8> {
    let len = 100 + (i as usize * 37) % 3000;
    (0..len).map(|j| (j as u32).wrapping_mul(7).wrapping_add(i) as u8).collect()
}

fn imm(i: u32) -> [u8; 8] {
    (u64::from(i) | 0xfa57_0000_0000).to_le_bytes()
}

fn check(ok: bool, what: &str) {
    if !ok {
        let _ = writeln!(std::io::stderr(), "fast-path host: {what}");
        std::process::exit(1);
    }
}

/// The re-executed host process; returns at once in a normal run.
#[test]
fn host_entry() {
    if std::env::var_os(ROLE_ENV).is_none() {
        return;
    }
    let name = std::env::var(NAME_ENV).expect("the server's name");
    let dev = Device::open_first().unwrap();
    let pe = ProgressEngine::new().unwrap();
    let client = ComchClient::new(&pe, &dev, &name, ComchConfig::default()).unwrap();
    client.start().unwrap();
    let start = Instant::now();
    while client.state() != CtxState::Running {
        pe.progress();
        check(start.elapsed() < WATCHDOG, "no comch connection");
    }
    let pool = Arc::new(shm::Region::create("dne-fp-host", (SLOT * 8) as usize, shm::PagePolicy::Normal).unwrap());
    let mm = Mmap::builder(MemRange::region(pool.clone()))
        .permissions(Access::LOCAL_READ_WRITE | Access::PCI_READ_WRITE)
        .add_device(&dev)
        .start()
        .unwrap();
    let inv = BufInventory::new(16).unwrap();
    let consumer = ComchConsumer::new(&pe, ComchPeer::Client(&client), &mm, FastPathConfig { tasks: 8 }).unwrap();
    consumer.start().unwrap();
    // Eight slots, posted in turn: the producer must wait for reposts.
    for s in 0..8u64 {
        let start = Instant::now();
        while consumer.state() != CtxState::Running {
            pe.progress();
            check(start.elapsed() < WATCHDOG, "the consumer did not start");
        }
        consumer.submit_receive(inv.buf(&mm, s * SLOT, SLOT as u32).unwrap(), s).unwrap();
    }
    let mut msg = vec![0u8; COMCH_MAX_MSG_SIZE as usize];
    for i in 0..MESSAGES {
        let start = Instant::now();
        let ev = loop {
            pe.progress();
            while client.poll_event(&mut msg).is_some() {}
            if let Some(e) = consumer.poll_event() {
                break e;
            }
            check(start.elapsed() < WATCHDOG, &format!("message {i} never arrived"));
        };
        let FastPathEvent::Received { user_data, buf, imm: got, result, .. } = ev else {
            check(false, "a send completion at the consumer");
            return;
        };
        check(result.is_ok(), &format!("message {i}: {result:?}"));
        check(user_data == u64::from(i) % 8, &format!("message {i} landed out of order (slot {user_data})"));
        check(got.as_bytes() == imm(i), &format!("message {i}: immediate {got:?}"));
        let want = payload(i);
        check(buf.data_len() as usize == want.len(), &format!("message {i}: {} bytes", buf.data_len()));
        let mut have = vec![0u8; want.len()];
        pool.copy_out(buf.offset(), &mut have).unwrap();
        check(have == want, &format!("message {i}: payload differs"));
        let slot = buf.offset();
        drop(buf);
        consumer.submit_receive(inv.buf(&mm, slot, SLOT as u32).unwrap(), user_data).unwrap();
    }
    let _ = writeln!(std::io::stdout(), "fast-path host: {MESSAGES} messages checked");
    std::process::exit(0);
}

#[test]
fn a_producer_fills_the_posted_buffers_of_a_consumer_in_another_process() {
    let dev = Device::open_first().unwrap();
    let pe = ProgressEngine::new().unwrap();
    let name = format!("fp-proc-{}", std::process::id());
    let server = ComchServer::new(&pe, &dev, &name, ComchConfig::default()).unwrap();
    server.start().unwrap();
    pe.progress();
    let exe = std::env::current_exe().unwrap();
    // Under qemu-user (the aarch64 test run) the child is an aarch64
    // binary too: run it the same way (no binfmt needed).
    let mut cmd = if std::env::var_os("DNE_QEMU_USER").is_some() {
        let mut c = Command::new("qemu-aarch64");
        c.args(["-L", "/"]).arg(&exe);
        c
    } else {
        Command::new(&exe)
    };
    let mut child = cmd
        .args(["--exact", "host_entry", "--nocapture", "--test-threads=1"])
        .env(ROLE_ENV, "host")
        .env(NAME_ENV, &name)
        .stdin(Stdio::null())
        .spawn()
        .unwrap();
    // Killed on any failure below, so no host outlives the test.
    struct Kill<'a>(&'a mut std::process::Child);
    impl Drop for Kill<'_> {
        fn drop(&mut self) {
            let _ = self.0.kill();
            let _ = self.0.wait();
        }
    }
    let guard = Kill(&mut child);
    let mut msg = vec![0u8; COMCH_MAX_MSG_SIZE as usize];
    let (mut conn, mut consumer) = (None, None);
    let start = Instant::now();
    while consumer.is_none() {
        pe.progress();
        match server.poll_event(&mut msg) {
            Some(ComchEvent::Connected(c)) => conn = Some(c),
            Some(ComchEvent::ConsumerUp { conn: c, id }) if Some(c) == conn => consumer = Some(id),
            _ => {}
        }
        assert!(start.elapsed() < WATCHDOG, "watchdog: the host's consumer never came up");
    }
    let (conn, consumer) = (conn.unwrap(), consumer.unwrap());
    let producer = ComchProducer::new(&pe, ComchPeer::Server(&server, conn), FastPathConfig { tasks: 4 }).unwrap();
    producer.start().unwrap();
    let region = Arc::new(shm::Region::create("dne-fp-dpu", 64 << 10, shm::PagePolicy::Normal).unwrap());
    let mm = Mmap::builder(MemRange::region(region.clone()))
        .permissions(Access::LOCAL_READ_WRITE)
        .add_device(&dev)
        .start()
        .unwrap();
    let inv = BufInventory::new(16).unwrap();
    let (mut again, mut done) = (0u64, 0u32);
    for i in 0..MESSAGES {
        let p = payload(i);
        let at = u64::from(i % 4) * SLOT;
        region.copy_in(at, &p).unwrap();
        let mut buf = inv.buf(&mm, at, SLOT as u32).unwrap();
        buf.set_data_len(p.len() as u32).unwrap();
        let start = Instant::now();
        loop {
            pe.progress();
            while let Some(e) = producer.poll_event() {
                assert!(matches!(e, FastPathEvent::SendDone { result: Ok(()), .. }), "{e:?}");
                done += 1;
            }
            // A slot of the source region is rewritten only once its send
            // completed: at most four in flight.
            if i >= done + 4 {
                assert!(start.elapsed() < WATCHDOG, "watchdog: send completions");
                continue;
            }
            match producer.submit_send(buf, consumer, &imm(i), u64::from(i)) {
                Ok(()) => break,
                Err(e) if matches!(e.error, DocaError::AGAIN | DocaError::NO_MEMORY | DocaError::BAD_STATE) => {
                    again += 1;
                    buf = e.buf;
                }
                Err(e) => panic!("message {i}: {e}"),
            }
            assert!(start.elapsed() < WATCHDOG, "watchdog: message {i} was never accepted");
        }
    }
    let start = Instant::now();
    let status = loop {
        pe.progress();
        while producer.poll_event().is_some() {}
        if let Some(s) = guard.0.try_wait().unwrap() {
            break s;
        }
        assert!(start.elapsed() < WATCHDOG, "watchdog: the host never finished");
        std::thread::sleep(Duration::from_millis(1));
    };
    assert!(status.success(), "the host process failed ({status}); {again} sends were refused and retried");
}

//! The systems DNE is compared with: TCP loopback and Unix domain stream
//! sockets (which carry the payload bytes each way: that is what they do),
//! blocking or busy-polling, and iceoryx2 publish-subscribe with loaned
//! samples of the payload size, busy-polling its subscriber.

use super::proc::{Peer, PeerCtx, WATCHDOG, Watchdog};
use super::{SPIN, Side};
use anyhow::{Context, Result, anyhow, bail};
use iceoryx2::port::publisher::Publisher;
use iceoryx2::port::subscriber::Subscriber;
use iceoryx2::prelude::*;
use iceoryx2::sample_mut::SampleMut;
use iceoryx2::sample_mut_uninit::SampleMutUninit;
use iceoryx2::service::port_factory::publish_subscribe::PortFactory;
use std::hint::black_box;
use std::io::{ErrorKind, Read, Write};
use std::mem::MaybeUninit;
use std::net::{TcpListener, TcpStream};
use std::os::unix::net::{UnixListener, UnixStream};
use std::time::{Duration, Instant};

/// Largest payload of the suite.
pub(crate) const MAX_SIZE: usize = 1 << 20;

const ADDR_ENV: &str = "DNE_BENCH_PEER_ADDR";

// ---------------------------------------------------------------- streams

/// A connected stream socket.
pub(crate) trait Sock: Read + Write {
    /// Switches between blocking and non-blocking (busy-polled) I/O.
    fn set_nonblock(&self, on: bool) -> std::io::Result<()>;
    /// Blocking reads and writes give up after `d` (the watchdog).
    fn set_timeouts(&self, d: Duration) -> std::io::Result<()>;
}

impl Sock for TcpStream {
    fn set_nonblock(&self, on: bool) -> std::io::Result<()> {
        self.set_nonblocking(on)
    }
    fn set_timeouts(&self, d: Duration) -> std::io::Result<()> {
        self.set_read_timeout(Some(d))?;
        self.set_write_timeout(Some(d))
    }
}

impl Sock for UnixStream {
    fn set_nonblock(&self, on: bool) -> std::io::Result<()> {
        self.set_nonblocking(on)
    }
    fn set_timeouts(&self, d: Duration) -> std::io::Result<()> {
        self.set_read_timeout(Some(d))?;
        self.set_write_timeout(Some(d))
    }
}

/// Writes all of `buf`, spinning on `WouldBlock` when non-blocking.
fn send_all(s: &mut impl Sock, mut buf: &[u8], spin: bool, wd: &mut Watchdog) -> Result<()> {
    while !buf.is_empty() {
        match s.write(buf) {
            Ok(0) => bail!("peer closed the stream"),
            Ok(k) => buf = &buf[k..],
            Err(e) if e.kind() == ErrorKind::Interrupted => {}
            Err(e) if spin && e.kind() == ErrorKind::WouldBlock => wd.tick()?,
            Err(e) => return Err(e).context("stream write"),
        }
    }
    Ok(())
}

/// Fills `buf`, spinning on `WouldBlock` when non-blocking.
fn recv_exact(s: &mut impl Sock, mut buf: &mut [u8], spin: bool, wd: &mut Watchdog) -> Result<()> {
    while !buf.is_empty() {
        match s.read(buf) {
            Ok(0) => bail!("peer closed the stream"),
            Ok(k) => buf = &mut buf[k..],
            Err(e) if e.kind() == ErrorKind::Interrupted => {}
            Err(e) if spin && e.kind() == ErrorKind::WouldBlock => wd.tick()?,
            Err(e) => return Err(e).context("stream read"),
        }
    }
    Ok(())
}

/// One end of a stream ping-pong: its payload is written once, at start.
#[derive(Debug)]
pub(crate) struct StreamSide<S> {
    s: S,
    tx: Vec<u8>,
    rx: Vec<u8>,
}

impl<S: Sock> StreamSide<S> {
    fn new(s: S) -> Result<Self> {
        s.set_timeouts(WATCHDOG)?;
        Ok(Self { s, tx: vec![0x5A; MAX_SIZE], rx: vec![0; MAX_SIZE] })
    }

    fn set_mode(&mut self, mode: &str) -> Result<bool> {
        let spin = mode == SPIN;
        self.s.set_nonblock(spin)?;
        Ok(spin)
    }
}

impl<S: Sock> Side for StreamSide<S> {
    fn round_trips(&mut self, size: usize, n: u64, mode: &str) -> Result<Duration> {
        let spin = self.set_mode(mode)?;
        let mut wd = Watchdog::new();
        let t = Instant::now();
        for _ in 0..n {
            send_all(&mut self.s, &self.tx[..size], spin, &mut wd)?;
            recv_exact(&mut self.s, &mut self.rx[..size], spin, &mut wd)?;
        }
        let el = t.elapsed();
        black_box(&self.rx[..size]);
        Ok(el)
    }
}

/// TCP over loopback, `TCP_NODELAY` on both ends.
pub(crate) fn tcp_endpoint() -> Result<(Peer, StreamSide<TcpStream>)> {
    let listener = TcpListener::bind("127.0.0.1:0")?;
    let addr = listener.local_addr()?.to_string();
    // The peer connects before it says `ready`, so the connection waits in
    // the backlog and `accept` returns at once.
    let peer = Peer::spawn("tcp", &[], &[(ADDR_ENV, addr)])?;
    let (s, _) = listener.accept()?;
    s.set_nodelay(true)?;
    Ok((peer, StreamSide::new(s)?))
}

/// A Unix domain stream socket.
pub(crate) fn uds_endpoint() -> Result<(Peer, StreamSide<UnixStream>)> {
    let path = std::env::temp_dir().join(format!("dne-bench-{}.sock", std::process::id()));
    let _ = std::fs::remove_file(&path);
    let listener = UnixListener::bind(&path)?;
    let spawned = Peer::spawn("uds", &[], &[(ADDR_ENV, path.display().to_string())]);
    let accepted = spawned.and_then(|peer| Ok((peer, listener.accept()?.0)));
    let _ = std::fs::remove_file(&path);
    let (peer, s) = accepted?;
    Ok((peer, StreamSide::new(s)?))
}

/// The stream ponger: reads `size` bytes, writes its own `size` bytes back.
pub(crate) fn stream_peer(mut ctx: PeerCtx, tcp: bool) -> Result<()> {
    let addr = std::env::var(ADDR_ENV)?;
    if tcp {
        let s = TcpStream::connect(&addr)?;
        s.set_nodelay(true)?;
        stream_loop(&mut ctx, StreamSide::new(s)?)
    } else {
        stream_loop(&mut ctx, StreamSide::new(UnixStream::connect(&addr)?)?)
    }
}

fn stream_loop<S: Sock>(ctx: &mut PeerCtx, mut side: StreamSide<S>) -> Result<()> {
    ctx.say("ready")?;
    while let Some(cmd) = ctx.next_cmd()? {
        let spin = side.set_mode(&cmd.mode)?;
        let size = cmd.size.min(MAX_SIZE);
        let mut wd = Watchdog::new();
        for _ in 0..cmd.n {
            recv_exact(&mut side.s, &mut side.rx[..size], spin, &mut wd)?;
            send_all(&mut side.s, &side.tx[..size], spin, &mut wd)?;
        }
        ctx.say("done")?;
    }
    Ok(())
}

// ---------------------------------------------------------------- iceoryx2

type IoxPub = Publisher<ipc::Service, [u8], ()>;
type IoxSub = Subscriber<ipc::Service, [u8], ()>;
type IoxFactory = PortFactory<ipc::Service, [u8], ()>;

const PING_ENV: &str = "DNE_BENCH_IOX_PING";
const PONG_ENV: &str = "DNE_BENCH_IOX_PONG";

/// Sends with the first this many loans of a size writing the whole
/// payload, so that every chunk of the publisher's data segment holds
/// written bytes before the payload is treated as already written.
const IOX_PREFILL: u32 = 64;

/// One iceoryx2 participant: a publisher on one service, a subscriber on the
/// other.
#[derive(Debug)]
pub(crate) struct IoxSide {
    publisher: IoxPub,
    subscriber: IoxSub,
    _services: (IoxFactory, IoxFactory),
    _node: Node<ipc::Service>,
    /// Largest payload size already written into every chunk.
    prefilled: usize,
    prefill_left: u32,
}

fn iox_err(what: &'static str) -> impl FnOnce(&dyn std::fmt::Debug) -> anyhow::Error {
    move |e| anyhow!("iceoryx2 {what}: {e:?}")
}

impl IoxSide {
    /// Creates (or opens) both services and this side's ports: publishes on
    /// `tx`, subscribes to `rx`.
    fn new(tx: &str, rx: &str) -> Result<Self> {
        set_log_level(LogLevel::Error);
        let node = NodeBuilder::new()
            .signal_handling_mode(SignalHandlingMode::Disabled)
            .create::<ipc::Service>()
            .map_err(|e| iox_err("node")(&e))?;
        let service = |name: &str| -> Result<IoxFactory> {
            let name = ServiceName::new(name).map_err(|e| iox_err("service name")(&e))?;
            node.service_builder(&name)
                .publish_subscribe::<[u8]>()
                .max_publishers(1)
                .max_subscribers(1)
                .max_nodes(2)
                .history_size(0)
                .subscriber_max_buffer_size(2)
                .subscriber_max_borrowed_samples(2)
                .open_or_create()
                .map_err(|e| iox_err("service")(&e))
        };
        let (tx_s, rx_s) = (service(tx)?, service(rx)?);
        let publisher = tx_s
            .publisher_builder()
            .initial_max_slice_len(MAX_SIZE)
            .max_loaned_samples(2)
            .create()
            .map_err(|e| iox_err("publisher")(&e))?;
        let subscriber = rx_s.subscriber_builder().create().map_err(|e| iox_err("subscriber")(&e))?;
        Ok(Self {
            publisher,
            subscriber,
            _services: (tx_s, rx_s),
            _node: node,
            prefilled: 0,
            prefill_left: IOX_PREFILL,
        })
    }

    /// Loans a sample of `size` bytes and sends it (writing the payload only
    /// during the prefill of a new size).
    #[inline]
    fn send(&mut self, size: usize, wd: &mut Watchdog) -> Result<()> {
        if size > self.prefilled {
            self.prefill_left = IOX_PREFILL;
            self.prefilled = size;
        }
        loop {
            let s = self.publisher.loan_slice_uninit(size).map_err(|e| iox_err("loan")(&e))?;
            let s = if self.prefill_left > 0 {
                self.prefill_left -= 1;
                s.write_from_fn(|i| i as u8)
            } else {
                already_written(s)
            };
            // Zero subscribers reached: the peer's subscriber is not
            // connected yet (only possible on the very first sends).
            if s.send().map_err(|e| iox_err("send")(&e))? > 0 {
                return Ok(());
            }
            wd.tick()?;
        }
    }

    /// Busy-polls the subscriber for one sample; returns its length.
    #[inline]
    fn recv(&mut self, wd: &mut Watchdog) -> Result<usize> {
        loop {
            if let Some(s) = self.subscriber.receive().map_err(|e| iox_err("receive")(&e))? {
                return Ok(black_box(s.payload()).len());
            }
            wd.tick()?;
        }
    }
}

/// The sample's payload, as it is (the bytes of a chunk already written).
#[allow(unsafe_code)]
fn already_written(s: SampleMutUninit<ipc::Service, [MaybeUninit<u8>], ()>) -> SampleMut<ipc::Service, [u8], ()> {
    // SAFETY: `u8` has no invalid bit patterns, and the chunk lies in
    // iceoryx2's shared-memory data segment, a file mapping whose bytes are
    // always initialized memory (zero-filled by the kernel when created);
    // besides, `IoxSide::send` wrote the full payload in the first
    // `IOX_PREFILL` loans of every new size, which cycle through the
    // publisher's few chunks. This is "payload already written", as for the
    // other systems; nobody reads these bytes.
    unsafe { s.assume_init() }
}

impl Side for IoxSide {
    fn round_trips(&mut self, size: usize, n: u64, _mode: &str) -> Result<Duration> {
        let mut wd = Watchdog::new();
        let t = Instant::now();
        for _ in 0..n {
            self.send(size, &mut wd)?;
            self.recv(&mut wd)?;
        }
        Ok(t.elapsed())
    }
}

/// Creates the services and the pinger's ports, then starts the ponger.
pub(crate) fn iox_endpoint() -> Result<(Peer, IoxSide)> {
    let t = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH)?.as_nanos();
    let base = format!("dne-bench/{}/{t}", std::process::id());
    let (ping, pong) = (format!("{base}/ping"), format!("{base}/pong"));
    let side = IoxSide::new(&ping, &pong)?;
    let peer = Peer::spawn("iox", &[], &[(PING_ENV, ping), (PONG_ENV, pong)])?;
    Ok((peer, side))
}

/// The iceoryx2 ponger: receive a sample, drop it, send one of the same
/// size back.
pub(crate) fn iox_peer(mut ctx: PeerCtx) -> Result<()> {
    let mut side = IoxSide::new(&std::env::var(PONG_ENV)?, &std::env::var(PING_ENV)?)?;
    ctx.say("ready")?;
    while let Some(cmd) = ctx.next_cmd()? {
        let mut wd = Watchdog::new();
        for _ in 0..cmd.n {
            let len = side.recv(&mut wd)?;
            side.send(len, &mut wd)?;
        }
        ctx.say("done")?;
    }
    Ok(())
}

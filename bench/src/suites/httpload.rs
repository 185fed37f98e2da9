//! A lean HTTP/1.1 load generator for the `ingress` suite: one thread,
//! `conns` keep-alive connections with one request in flight each, driven
//! by one epoll set. The request bytes are built once; every reply is read
//! with one `read` when epoll reports it (level-triggered), parsed (status
//! line, `content-length`) and checked byte-exact against the expected
//! body. Per request that is one `write`, one `read` and a share of one
//! `epoll_wait`: the generator shares this machine's two cores with the
//! setups it measures, so the less it spends, the less it disturbs them
//! (the suite reports what it spent). For the same reason it runs under
//! `SCHED_BATCH` while it measures ([`Batch`]): its wake-ups do not
//! preempt the servers.
//!
//! Anything unexpected (a status other than 200, a body that differs, a
//! chunked or oversized reply, a closed connection, no reply for
//! [`STALL`]) fails the run with an error; nothing is skipped.

use anyhow::{Context, Result, anyhow, bail};
use rustix::event::{Timespec, epoll};
use std::io::{ErrorKind, Read, Write};
use std::mem::MaybeUninit;
use std::net::{SocketAddr, TcpStream};
use std::os::fd::OwnedFd;
use std::time::{Duration, Instant};

/// How long a request may wait for its reply (or a connection to take
/// it) before the run fails.
pub const STALL: Duration = Duration::from_secs(30);
/// The largest reply accepted (head and body).
const MAX_REPLY: usize = 64 * 1024;

/// The bytes of a `POST` with `body`.
pub fn post(path: &str, host: &str, content_type: &str, body: &[u8]) -> Vec<u8> {
    let mut r = format!(
        "POST {path} HTTP/1.1\r\nhost: {host}\r\ncontent-type: {content_type}\r\ncontent-length: {}\r\n\r\n",
        body.len()
    )
    .into_bytes();
    r.extend_from_slice(body);
    r
}

/// A complete reply at the start of `buf`: its status and the byte range
/// of its body. `Ok(None)`: more bytes are needed.
pub fn parse_reply(buf: &[u8]) -> Result<Option<(u16, std::ops::Range<usize>)>> {
    let Some(end) = buf.windows(4).position(|w| w == b"\r\n\r\n") else {
        if buf.len() > MAX_REPLY {
            bail!("reply head longer than {MAX_REPLY} bytes");
        }
        return Ok(None);
    };
    let head = std::str::from_utf8(&buf[..end]).context("reply head is not UTF-8")?;
    let mut lines = head.split("\r\n");
    let status = lines
        .next()
        .and_then(|l| l.strip_prefix("HTTP/1.1 "))
        .and_then(|l| l.get(..3))
        .and_then(|s| s.parse::<u16>().ok())
        .ok_or_else(|| anyhow!("bad status line in reply: {:?}", head.lines().next().unwrap_or("")))?;
    let mut len = None;
    for l in lines {
        let (name, value) = l.split_once(':').ok_or_else(|| anyhow!("bad header line in reply: {l:?}"))?;
        if name.eq_ignore_ascii_case("content-length") {
            len = Some(value.trim().parse::<usize>().with_context(|| format!("bad content-length {value:?}"))?);
        } else if name.eq_ignore_ascii_case("transfer-encoding") {
            bail!("reply with transfer-encoding {:?}: this generator reads content-length bodies only", value.trim());
        }
    }
    let len = len.ok_or_else(|| anyhow!("reply without content-length"))?;
    let start = end + 4;
    if len > MAX_REPLY {
        bail!("reply body of {len} bytes (at most {MAX_REPLY})");
    }
    if buf.len() < start + len {
        return Ok(None);
    }
    if buf.len() > start + len {
        bail!("{} bytes after the reply (one request is in flight)", buf.len() - start - len);
    }
    Ok(Some((status, start..start + len)))
}

/// Runs the calling thread (the generator) under `SCHED_BATCH` until
/// [`leave`](Self::leave) (or drop) puts it back under `SCHED_OTHER`.
/// The policy is the thread's own: the process's other threads keep
/// theirs. A process the thread started meanwhile would inherit it
/// (`SCHED_RESET_ON_FORK` resets only real-time policies), so the suite
/// starts and stops its setups' processes outside it.
///
/// The generator stands for clients on other machines, which take nothing
/// from the servers' CPUs and never preempt them. Here every reply wakes
/// it, and a woken `SCHED_OTHER` thread may preempt the server that wrote
/// the reply (the kernel prefers the waker's CPU for a thread woken by a
/// local socket write): in profiles of (a) under `SCHED_OTHER`, 11.8 % of
/// the ingress's samples were in the context switch after its `writev`,
/// against 0.9 % under `SCHED_BATCH`. A `SCHED_BATCH` thread does not
/// preempt the running thread at wake-up; it runs when that thread blocks
/// or its slice ends (or on an idle CPU), and gets the same fair share of
/// the CPUs. Both setups run under the same policy.
/// `DNE_BENCH_LOADGEN_POLICY=other` leaves the thread's policy alone (to
/// measure what the policy changes).
#[derive(Debug)]
pub struct Batch {
    set: bool,
}

/// The environment variable that keeps the generator under `SCHED_OTHER`.
pub const POLICY_ENV: &str = "DNE_BENCH_LOADGEN_POLICY";

impl Batch {
    /// Whether the generator runs under `SCHED_BATCH`, from [`POLICY_ENV`]
    /// (unset or `batch`: yes; `other`: no; anything else: an error).
    pub fn wanted() -> Result<bool> {
        match std::env::var(POLICY_ENV) {
            Ok(v) => Self::parse(Some(&v)),
            Err(std::env::VarError::NotPresent) => Self::parse(None),
            Err(e) => bail!("{POLICY_ENV}: {e}"),
        }
    }

    fn parse(v: Option<&str>) -> Result<bool> {
        match v {
            None | Some("batch") => Ok(true),
            Some("other") => Ok(false),
            Some(v) => bail!("{POLICY_ENV}={v:?}: want \"batch\" (the default) or \"other\""),
        }
    }

    /// Moves the calling thread from `SCHED_OTHER` to `SCHED_BATCH` if
    /// `batch` (else does nothing). A thread under another policy (the
    /// benchmark started under `chrt`) is refused: putting it back would
    /// need what it was, and the run would not measure what the tables say.
    pub fn enter(batch: bool) -> Result<Self> {
        if batch {
            let now = policy().context("sched_getscheduler for the load generator")?;
            if now != libc::SCHED_OTHER {
                bail!(
                    "the load generator's thread runs under scheduling policy {now}, not SCHED_OTHER: start the \
                     benchmark under SCHED_OTHER, or set {POLICY_ENV}=other to keep the policy it has"
                );
            }
            set_policy(libc::SCHED_BATCH).context("sched_setscheduler(SCHED_BATCH) for the load generator")?;
        }
        Ok(Self { set: batch })
    }

    /// Moves the thread back to `SCHED_OTHER`.
    pub fn leave(mut self) -> Result<()> {
        self.set = false;
        set_policy(libc::SCHED_OTHER).context("sched_setscheduler(SCHED_OTHER) for the load generator")
    }
}

impl Drop for Batch {
    /// On an early return (the run failed and is ending) the policy is put
    /// back as well as it can be; [`leave`](Self::leave) reports a failure.
    fn drop(&mut self) {
        if self.set {
            let _ = set_policy(libc::SCHED_OTHER);
        }
    }
}

/// The calling thread's scheduling policy.
#[allow(unsafe_code)]
fn policy() -> std::io::Result<libc::c_int> {
    // SAFETY: pid 0 names the calling thread; the call takes no pointer.
    let p = unsafe { libc::sched_getscheduler(0) };
    if p >= 0 { Ok(p) } else { Err(std::io::Error::last_os_error()) }
}

/// `sched_setscheduler` for the calling thread with priority 0 (the only
/// one `SCHED_OTHER` and `SCHED_BATCH` take).
#[allow(unsafe_code)]
fn set_policy(policy: libc::c_int) -> std::io::Result<()> {
    let param = libc::sched_param { sched_priority: 0 };
    // SAFETY: pid 0 names the calling thread, and `param` is a valid
    // sched_param that lives across the call, which only reads it.
    let rc = unsafe { libc::sched_setscheduler(0, policy, &raw const param) };
    if rc == 0 { Ok(()) } else { Err(std::io::Error::last_os_error()) }
}

#[derive(Debug)]
struct Conn {
    s: TcpStream,
    buf: Vec<u8>,
    sent: Instant,
    busy: bool,
}

/// The generator's connections and what it measured.
#[derive(Debug)]
pub struct Load {
    ep: OwnedFd,
    conns: Vec<Conn>,
    request: Vec<u8>,
    want: Vec<u8>,
    /// The measured window: requests sent in `[start, end)` are recorded
    /// when their replies come, however late (`end` unset: still open).
    window: Option<(Instant, Option<Instant>)>,
    /// When the connections were last checked for a stall.
    checked: Instant,
    /// Where each read lands (allocated once).
    scratch: Box<[u8]>,
    /// Latencies in microseconds of the requests sent in the measured
    /// window (see [`record_from`](Self::record_from)).
    pub lat: Vec<u32>,
}

impl Load {
    /// Opens `conns` connections to `addr`; each will carry `request`
    /// and must be answered 200 with body `want`.
    pub fn connect(addr: SocketAddr, conns: usize, request: Vec<u8>, want: Vec<u8>) -> Result<Self> {
        let ep = epoll::create(epoll::CreateFlags::CLOEXEC).context("epoll_create")?;
        let mut v = Vec::with_capacity(conns);
        for i in 0..conns {
            let s = TcpStream::connect(addr).with_context(|| format!("connecting to {addr}"))?;
            s.set_nodelay(true)?;
            s.set_nonblocking(true)?;
            epoll::add(&ep, &s, epoll::EventData::new_u64(i as u64), epoll::EventFlags::IN).context("epoll_ctl")?;
            v.push(Conn { s, buf: Vec::with_capacity(4096), sent: Instant::now(), busy: false });
        }
        Ok(Self {
            ep,
            conns: v,
            request,
            want,
            window: None,
            checked: Instant::now(),
            scratch: vec![0; 16 * 1024].into_boxed_slice(),
            lat: Vec::with_capacity(1 << 20),
        })
    }

    /// Opens the measured window at `t`: the latency of every request sent
    /// from `t` on, until [`stop_recording`](Self::stop_recording), is
    /// recorded.
    pub fn record_from(&mut self, t: Instant) {
        self.window = Some((t, None));
    }

    /// Closes the measured window now. The requests sent in it and still in
    /// flight are recorded when their replies come (in
    /// [`finish`](Self::finish)): leaving them out would drop exactly the
    /// slowest requests of the window's end, and lower the tail.
    pub fn stop_recording(&mut self) {
        if let Some((_, end)) = &mut self.window {
            *end = Some(Instant::now());
        }
    }

    /// Keeps one request in flight on every connection until `until`
    /// (requests in flight then stay in flight).
    pub fn run_until(&mut self, until: Instant) -> Result<()> {
        for i in 0..self.conns.len() {
            if !self.conns[i].busy {
                self.send(i)?;
            }
        }
        while Instant::now() < until {
            self.turn(until, true)?;
        }
        Ok(())
    }

    /// Sends nothing more and waits for the replies in flight.
    pub fn finish(&mut self) -> Result<()> {
        while self.conns.iter().any(|c| c.busy) {
            self.turn(Instant::now() + STALL, false)?;
        }
        Ok(())
    }

    /// One `epoll_wait` (up to `until`) and the replies it reports.
    fn turn(&mut self, until: Instant, resend: bool) -> Result<()> {
        let wait = until.saturating_duration_since(Instant::now()).min(STALL);
        let ts = Timespec { tv_sec: wait.as_secs() as i64, tv_nsec: i64::from(wait.subsec_nanos()) };
        let mut events = [MaybeUninit::<epoll::Event>::uninit(); 64];
        let got = match epoll::wait(&self.ep, &mut events, Some(&ts)) {
            Ok((got, _)) => got,
            Err(rustix::io::Errno::INTR) => return Ok(()),
            Err(e) => return Err(anyhow!("epoll_wait: {e}")),
        };
        for e in got.iter() {
            let i = e.data.u64() as usize;
            if self.read(i)? && resend {
                self.send(i)?;
            }
        }
        // Every connection, not just any (one that stops answering would
        // quietly lower the concurrency of the run), once a second.
        let now = Instant::now();
        if now.duration_since(self.checked) >= Duration::from_secs(1) {
            self.checked = now;
            if let Some(i) = self.conns.iter().position(|c| c.busy && now.duration_since(c.sent) > STALL) {
                bail!("connection {i}: no reply for {} s", STALL.as_secs());
            }
        }
        Ok(())
    }

    /// Writes connection `i`'s request. A request fits the socket's send
    /// buffer (an idle connection's is empty), so a short write is only
    /// retried, not waited for with epoll.
    fn send(&mut self, i: usize) -> Result<()> {
        let c = &mut self.conns[i];
        c.sent = Instant::now();
        c.busy = true;
        let mut off = 0;
        while off < self.request.len() {
            match c.s.write(&self.request[off..]) {
                Ok(0) => bail!("connection {i}: closed by the server while sending"),
                Ok(n) => off += n,
                Err(e) if e.kind() == ErrorKind::WouldBlock => {
                    if c.sent.elapsed() > STALL {
                        bail!("connection {i}: could not send for {} s", STALL.as_secs());
                    }
                    std::thread::yield_now();
                }
                Err(e) if e.kind() == ErrorKind::Interrupted => {}
                Err(e) => return Err(e).with_context(|| format!("connection {i}: sending")),
            }
        }
        Ok(())
    }

    /// Reads what connection `i` has; `true` when its reply is complete
    /// (checked and recorded).
    fn read(&mut self, i: usize) -> Result<bool> {
        let c = &mut self.conns[i];
        let n = match c.s.read(&mut self.scratch) {
            Ok(0) => bail!("connection {i}: closed by the server"),
            Ok(n) => n,
            Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::Interrupted) => return Ok(false),
            Err(e) => return Err(e).with_context(|| format!("connection {i}: reading")),
        };
        if !c.busy {
            bail!("connection {i}: {n} bytes with no request in flight");
        }
        c.buf.extend_from_slice(&self.scratch[..n]);
        let Some((status, body)) = parse_reply(&c.buf).with_context(|| format!("connection {i}"))? else {
            return Ok(false);
        };
        if status != 200 || c.buf[body.clone()] != self.want[..] {
            bail!("bad reply: {status}, {} bytes", body.len());
        }
        c.buf.clear();
        c.busy = false;
        if self.window.is_some_and(|(start, end)| c.sent >= start && end.is_none_or(|e| c.sent < e)) {
            self.lat.push(c.sent.elapsed().as_micros().min(u128::from(u32::MAX)) as u32);
        }
        Ok(true)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn replies_parse_only_when_complete_and_exact() {
        let r = b"HTTP/1.1 200 OK\r\nContent-Length: 3\r\ncontent-type: text/plain\r\n\r\nabc";
        assert_eq!(parse_reply(r).unwrap(), Some((200, r.len() - 3..r.len())));
        for cut in 0..r.len() {
            assert_eq!(parse_reply(&r[..cut]).unwrap(), None, "cut at {cut}");
        }
        let mut extra = r.to_vec();
        extra.push(b'x');
        assert!(parse_reply(&extra).is_err());
        assert_eq!(parse_reply(b"HTTP/1.1 503 Busy\r\ncontent-length: 0\r\n\r\n").unwrap(), Some((503, 40..40)));
    }

    #[test]
    fn what_it_cannot_read_is_an_error() {
        for bad in [
            &b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n"[..],
            b"HTTP/1.1 200 OK\r\n\r\n",
            b"HTTP/1.0 200 OK\r\ncontent-length: 0\r\n\r\n",
            b"HTTP/1.1 2x0 OK\r\ncontent-length: 0\r\n\r\n",
            b"HTTP/1.1 200 OK\r\ncontent-length: lots\r\n\r\n",
            b"HTTP/1.1 200 OK\r\nno colon\r\n\r\n",
            b"HTTP/1.1 200 OK\r\ncontent-length: 999999999\r\n\r\n",
        ] {
            assert!(parse_reply(bad).is_err(), "{:?}", String::from_utf8_lossy(bad));
        }
        assert!(parse_reply(&vec![b'a'; MAX_REPLY + 1]).is_err());
    }

    /// A request sent in the measured window whose reply comes after the
    /// window's end is recorded (before, it was not: a stall at the end of
    /// the window vanished from the percentiles).
    #[test]
    fn a_request_sent_in_the_window_is_recorded_however_late_its_reply() {
        use std::net::TcpListener;
        use std::sync::atomic::{AtomicUsize, Ordering};
        use std::sync::{Arc, mpsc};
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = l.local_addr().unwrap();
        let received = Arc::new(AtomicUsize::new(0));
        let (go, wait) = mpsc::channel::<()>();
        let r = received.clone();
        std::thread::spawn(move || {
            let mut s = l.accept().unwrap().0;
            let mut b = [0u8; 4096];
            while let Ok(n) = s.read(&mut b) {
                if n == 0 {
                    break;
                }
                // The second request is answered only once the window is
                // over (the watchdog: at most 60 s).
                if r.fetch_add(1, Ordering::SeqCst) == 1 {
                    let _ = wait.recv_timeout(Duration::from_secs(60));
                }
                if s.write_all(b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nhi").is_err() {
                    break;
                }
            }
        });
        let req = post("/x", "h", "text/plain", b"body");
        let mut load = Load::connect(addr, 1, req, b"hi".to_vec()).unwrap();
        let t0 = Instant::now();
        load.record_from(t0);
        load.run_until(t0 + Duration::from_millis(300)).unwrap();
        load.stop_recording();
        go.send(()).unwrap();
        load.finish().unwrap();
        // Every request was sent in the window: every one is recorded.
        assert_eq!(load.lat.len(), received.load(Ordering::SeqCst));
    }

    #[test]
    fn drives_a_server_and_checks_every_reply() {
        use std::net::TcpListener;
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = l.local_addr().unwrap();
        // An echo server that answers `reply` to every request it reads
        // (a request here is one read: the generator writes it at once).
        let serve = |reply: &'static [u8]| {
            move |mut s: TcpStream| {
                let mut b = [0u8; 4096];
                while let Ok(n) = s.read(&mut b) {
                    if n == 0 || s.write_all(reply).is_err() {
                        break;
                    }
                }
            }
        };
        let ok = serve(b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nhi");
        let t = std::thread::spawn(move || {
            for s in l.incoming().take(2) {
                std::thread::spawn(move || ok(s.unwrap()));
            }
        });
        let req = post("/x", "h", "text/plain", b"body");
        let mut load = Load::connect(addr, 2, req.clone(), b"hi".to_vec()).unwrap();
        let t0 = Instant::now();
        load.record_from(t0);
        load.run_until(t0 + Duration::from_millis(300)).unwrap();
        load.finish().unwrap();
        assert!(load.lat.len() > 10, "{} replies", load.lat.len());
        t.join().unwrap();

        // A reply that differs fails the run.
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = l.local_addr().unwrap();
        let bad = serve(b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nho");
        std::thread::spawn(move || bad(l.accept().unwrap().0));
        let mut load = Load::connect(addr, 1, req, b"hi".to_vec()).unwrap();
        let err = load.run_until(Instant::now() + Duration::from_secs(30)).unwrap_err();
        assert!(err.to_string().contains("bad reply"), "{err:#}");
    }

    /// The generator's thread runs under `SCHED_BATCH` between `enter` and
    /// `leave` (or drop), and under `SCHED_OTHER` after; the other threads
    /// of the process are not touched. `other` leaves the policy alone.
    #[test]
    fn the_batch_policy_is_the_threads_own_and_is_undone() {
        std::thread::spawn(|| {
            assert_eq!(policy().unwrap(), libc::SCHED_OTHER);
            let watcher = std::thread::spawn(|| {
                std::thread::sleep(Duration::from_millis(50));
                policy().unwrap()
            });
            let b = Batch::enter(true).unwrap();
            assert_eq!(policy().unwrap(), libc::SCHED_BATCH);
            assert_eq!(watcher.join().unwrap(), libc::SCHED_OTHER, "another thread changed policy");
            b.leave().unwrap();
            assert_eq!(policy().unwrap(), libc::SCHED_OTHER);
            // An early return (an error in the run) undoes it too.
            drop(Batch::enter(true).unwrap());
            assert_eq!(policy().unwrap(), libc::SCHED_OTHER);
            Batch::enter(false).unwrap().leave().unwrap();
            assert_eq!(policy().unwrap(), libc::SCHED_OTHER);
            // A thread under another policy is refused, and left as it is.
            set_policy(libc::SCHED_IDLE).unwrap();
            let e = Batch::enter(true).unwrap_err().to_string();
            assert!(e.contains("not SCHED_OTHER"), "{e}");
            assert_eq!(policy().unwrap(), libc::SCHED_IDLE);
        })
        .join()
        .unwrap();
    }

    #[test]
    fn the_policy_setting_is_batch_other_or_an_error() {
        assert!(Batch::parse(None).unwrap());
        assert!(Batch::parse(Some("batch")).unwrap());
        assert!(!Batch::parse(Some("other")).unwrap());
        let e = Batch::parse(Some("fifo")).unwrap_err().to_string();
        assert!(e.contains("DNE_BENCH_LOADGEN_POLICY=\"fifo\""), "{e}");
    }
}

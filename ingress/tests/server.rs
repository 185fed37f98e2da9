//! The ingress against real HTTP clients over loopback TCP: every edge
//! status, 1 MiB bodies byte-exact through a chain and back, concurrent
//! clients, a slow client, clients that vanish mid-request and mid-response
//! (no buffer leaked), graceful shutdown. Chains run in process
//! ([`ingress::InProcess`]) on the ingress's pool buffers.
//!
//! Every wait has a deadline; nothing asserts on wall-clock speed.

use bytes::Bytes;
use dne_functions::Transform;
use http_body_util::{BodyExt, Full};
use hyper::client::conn::http1;
use hyper::{Request, StatusCode};
use hyper_util::rt::TokioIo;
use ingress::{Behavior, InProcess, InProcessConfig, Ingress, Pools, Settings};
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use wire::ErrorCode;

const KEY: &str = "s3cret-key";

fn cluster(ingress_buffers: u32) -> config::Cluster {
    let text = format!(
        r#"
[[node]]
name = "n"
address = "127.0.0.1:1"
runtime_dir = "/tmp/dne-ingress-test"

[[tenant]]
name = "open"
weight = 1
buf_size = 16384
buffers = 256
recv_quota = 16
max_chain = 128

[[tenant]]
name = "acme"
weight = 1
buf_size = 4096
buffers = 64
recv_quota = 16
api_key = "{KEY}"

[[function]]
name = "upper"
tenant = "open"
node = "n"
[[function]]
name = "rot13"
tenant = "open"
node = "n"
[[function]]
name = "reverse"
tenant = "open"
node = "n"
[[function]]
name = "echo"
tenant = "open"
node = "n"
[[function]]
name = "fail"
tenant = "open"
node = "n"
[[function]]
name = "slow"
tenant = "open"
node = "n"
[[function]]
name = "fail-unreachable"
tenant = "open"
node = "n"
[[function]]
name = "fail-timeout"
tenant = "open"
node = "n"
[[function]]
name = "acme-echo"
tenant = "acme"
node = "n"

[[route]]
path = "/chain"
tenant = "open"
chain = ["upper", "rot13", "reverse"]
[[route]]
path = "/echo"
tenant = "open"
chain = ["echo"]
[[route]]
host = "special.example"
path = "/echo"
tenant = "open"
chain = ["reverse"]
[[route]]
path = "/fail"
tenant = "open"
chain = ["upper", "fail"]
[[route]]
path = "/fail-unreachable"
tenant = "open"
chain = ["upper", "fail-unreachable"]
[[route]]
path = "/fail-timeout"
tenant = "open"
chain = ["fail-timeout"]
[[route]]
path = "/slow"
tenant = "open"
chain = ["slow"]
timeout_ms = 200
[[route]]
path = "/patient"
tenant = "open"
chain = ["slow"]
timeout_ms = 10000
[[route]]
path = "/acme"
tenant = "acme"
chain = ["acme-echo"]

[[ingress]]
name = "edge"
address = "127.0.0.1:2"
http = "127.0.0.1:0"
runtime_dir = "/tmp/dne-ingress-test/edge"
body_limit = {limit}
buffers = {file_buffers}
"#,
        limit = (1 << 20) + 10,
        // The file's count must leave room beyond the receive quota the
        // fabric edge posts; these tests run the in-process upstream on
        // pools of `ingress_buffers` they make themselves.
        file_buffers = ingress_buffers.max(1024),
    );
    config::Cluster::parse(&text).unwrap()
}

const SLOW: Duration = Duration::from_millis(1000);

/// The in-process chains, behind a note of each request envelope's
/// `x-forwarded-for` (what the first function is told about the client).
struct Recording {
    inner: InProcess,
    xff: std::sync::Mutex<Vec<Option<Vec<u8>>>>,
    /// The headers of the last request envelope.
    last_headers: std::sync::Mutex<Vec<(Vec<u8>, Vec<u8>)>>,
    /// Non-zero: the HTTP status written into every reply envelope (a
    /// function answering with any code it likes).
    status: std::sync::atomic::AtomicU16,
    /// Headers added to every reply envelope (a function setting any
    /// headers it likes).
    reply_headers: std::sync::Mutex<Vec<(&'static str, &'static str)>>,
    /// Non-empty: the first place in every reply envelope's head where
    /// these bytes are is overwritten with those (as long): a function
    /// writing a head no encoder would.
    reply_patch: std::sync::Mutex<(&'static [u8], &'static [u8])>,
}

impl ingress::Upstream for Recording {
    fn call(&self, route: u16, tenant: u16, msg: ingress::PoolLease, request: u32) -> ingress::UpstreamFuture {
        let env = wire::http::decode(&msg.frags()).ok();
        let seen = env.as_ref().and_then(|e| e.header("x-forwarded-for").map(<[u8]>::to_vec));
        self.xff.lock().unwrap().push(seen);
        *self.last_headers.lock().unwrap() = env.map(|e| e.headers).unwrap_or_default();
        let reply = self.inner.call(route, tenant, msg, request);
        let status = self.status.load(std::sync::atomic::Ordering::Relaxed);
        let extra = self.reply_headers.lock().unwrap().clone();
        let (from, to) = *self.reply_patch.lock().unwrap();
        if status == 0 && extra.is_empty() && from.is_empty() {
            return reply;
        }
        Box::pin(async move {
            let mut reply = reply.await?;
            if !extra.is_empty() {
                // The head again, with the extra headers, ending where the
                // body starts (a reply leaves room before its body).
                let e = wire::http::decode(&reply.frags()).unwrap();
                let mut hs = Vec::new();
                let mut spec = e.spec(&mut hs);
                let mut all = spec.headers.to_vec();
                all.extend(extra.iter().map(|(n, v)| (n.as_bytes(), v.as_bytes())));
                spec.headers = &all;
                let pad = e.body_offset - spec.len().unwrap();
                wire::http::encode_head(&mut reply.frags_mut(), &spec, pad, e.body_len).unwrap();
            }
            if !from.is_empty() {
                let e = wire::http::decode(&reply.frags()).unwrap();
                let mut head = vec![0u8; e.body_offset as usize];
                wire::http::read_at(&reply.frags(), 0, &mut head).unwrap();
                let at = head.windows(from.len()).position(|w| w == from).unwrap();
                wire::http::write_at(&mut reply.frags_mut(), at as u64, to).unwrap();
            }
            if status != 0 {
                // The status is the u16 at offset 4 of the envelope header.
                wire::http::write_at(&mut reply.frags_mut(), 4, &status.to_le_bytes()).unwrap();
            }
            Ok(reply)
        })
    }
}

/// How long a test waits for a condition before it fails.
const WAIT: Duration = Duration::from_secs(10);

/// Polls `done` every few milliseconds until it holds; fails with `why()`
/// (worked out then) once [`WAIT`] has passed: a watchdog against a
/// condition that never comes, not a timing assertion.
async fn until<D: std::fmt::Display>(mut done: impl FnMut() -> bool, why: impl FnOnce() -> D) {
    let deadline = Instant::now() + WAIT;
    while !done() {
        if Instant::now() >= deadline {
            panic!("{}", why());
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

struct Server {
    addr: SocketAddr,
    ingress: Arc<Ingress>,
    upstream: Arc<Recording>,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    done: tokio::task::JoinHandle<std::io::Result<()>>,
}

impl Server {
    async fn start(ingress_buffers: u32, cfg: InProcessConfig) -> Self {
        Self::start_with(ingress_buffers, cfg, |_| {}).await
    }

    /// Like `start`, with `tune` applied to the edge settings.
    async fn start_with(ingress_buffers: u32, cfg: InProcessConfig, tune: impl FnOnce(&mut Settings)) -> Self {
        let c = cluster(ingress_buffers);
        let extra = vec![
            ("fail".to_owned(), Behavior::Fail(ErrorCode::FunctionFailed)),
            ("fail-unreachable".to_owned(), Behavior::Fail(ErrorCode::Unreachable)),
            ("fail-timeout".to_owned(), Behavior::Fail(ErrorCode::Timeout)),
            ("slow".to_owned(), Behavior::Slow(SLOW, Transform::Echo)),
            ("acme-echo".to_owned(), Behavior::Transform(Transform::Echo)),
        ];
        let up = InProcess::new(&c, cfg, InProcess::by_name(&extra)).unwrap();
        let pools = Pools::create(&c, "edge-test", ingress_buffers, shm::PagePolicy::Normal).unwrap();
        let mut settings =
            Settings { body_timeout: Duration::from_secs(2), ..Settings::for_ingress(&c, "edge").unwrap() };
        tune(&mut settings);
        let upstream = Arc::new(Recording {
            inner: up,
            xff: Default::default(),
            last_headers: Default::default(),
            status: Default::default(),
            reply_headers: Default::default(),
            reply_patch: std::sync::Mutex::new((b"", b"")),
        });
        let ingress = Arc::new(Ingress::new(&c, pools, upstream.clone(), settings));
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (tx, rx) = tokio::sync::oneshot::channel::<()>();
        let done = tokio::spawn(ingress.clone().serve(listener, None, async move {
            let _ = rx.await;
        }));
        Self { addr, ingress, upstream, stop: Some(tx), done }
    }

    async fn default() -> Self {
        Self::start(512, InProcessConfig::default()).await
    }

    /// Waits until every pool is full again and no request is in flight
    /// (deadline: [`WAIT`]).
    async fn assert_no_leak(&self) {
        until(|| self.leftovers().is_none(), || self.leftovers().unwrap_or_default()).await;
    }

    /// What is left behind, if anything: the buffers still held, as
    /// (tenant, count), and the `in_flight` series not at 0.
    fn leftovers(&self) -> Option<String> {
        let leaked: Vec<(u16, u32)> = self
            .ingress
            .pools()
            .iter()
            .filter(|p| p.free_buffers() != p.capacity())
            .map(|p| (p.tenant(), p.capacity() - p.free_buffers()))
            .collect();
        // Requests of clients that went away are not in flight either.
        let text = self.ingress.metrics_text();
        let in_flight: Vec<&str> =
            text.lines().filter(|l| l.starts_with("dne_ingress_in_flight{") && !l.ends_with(" 0")).collect();
        (!leaked.is_empty() || !in_flight.is_empty())
            .then(|| format!("buffers still held (tenant, count): {leaked:?}; still in flight: {in_flight:?}"))
    }

    async fn stop(mut self) {
        if let Some(tx) = self.stop.take() {
            let _ = tx.send(());
        }
        tokio::time::timeout(Duration::from_secs(20), self.done).await.unwrap().unwrap().unwrap();
    }
}

/// Makes every function of `s` answer with HTTP status `code` (0: their own).
fn c_status(s: &Server, code: u16) {
    s.upstream.status.store(code, std::sync::atomic::Ordering::Relaxed);
}

/// A keep-alive HTTP/1.1 client connection (hyper).
struct Client {
    tx: http1::SendRequest<Full<Bytes>>,
}

impl Client {
    async fn connect(addr: SocketAddr) -> Self {
        let s = TcpStream::connect(addr).await.unwrap();
        let (tx, conn) = http1::handshake(TokioIo::new(s)).await.unwrap();
        tokio::spawn(conn);
        Self { tx }
    }

    async fn send(&mut self, req: Request<Full<Bytes>>) -> (StatusCode, hyper::HeaderMap, Vec<u8>) {
        tokio::time::timeout(Duration::from_secs(20), self.tx.ready()).await.unwrap().unwrap();
        let r = tokio::time::timeout(Duration::from_secs(20), self.tx.send_request(req)).await.unwrap().unwrap();
        let (parts, body) = r.into_parts();
        let body = body.collect().await.unwrap().to_bytes().to_vec();
        (parts.status, parts.headers, body)
    }

    async fn post(&mut self, path: &str, body: &[u8]) -> (StatusCode, hyper::HeaderMap, Vec<u8>) {
        let req = Request::post(path)
            .header("host", "ingress.test")
            .header("content-type", "text/x-test")
            .body(Full::new(Bytes::copy_from_slice(body)))
            .unwrap();
        self.send(req).await
    }
}

fn chain(body: &[u8]) -> Vec<u8> {
    let mut v = body.to_vec();
    for t in [Transform::Upper, Transform::Rot13, Transform::Reverse] {
        t.apply(&mut v);
    }
    v
}

/// Reads one response from a raw stream: (status, head text, body).
async fn read_response(s: &mut TcpStream) -> (u16, String, Vec<u8>) {
    let mut buf = Vec::new();
    let mut chunk = [0u8; 65536];
    let head_end = loop {
        if let Some(i) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            break i + 4;
        }
        let n = tokio::time::timeout(Duration::from_secs(20), s.read(&mut chunk)).await.unwrap().unwrap();
        assert!(n > 0, "connection closed before a response head: {:?}", String::from_utf8_lossy(&buf));
        buf.extend_from_slice(&chunk[..n]);
    };
    let head = String::from_utf8_lossy(&buf[..head_end]).to_string();
    let status: u16 = head[9..12].parse().unwrap();
    let len: usize = head
        .lines()
        .find_map(|l| l.to_ascii_lowercase().strip_prefix("content-length:").map(|v| v.trim().parse().unwrap()))
        .unwrap_or(0);
    let mut body = buf[head_end..].to_vec();
    while body.len() < len {
        let n = tokio::time::timeout(Duration::from_secs(20), s.read(&mut chunk)).await.unwrap().unwrap();
        assert!(n > 0, "connection closed mid-body");
        body.extend_from_slice(&chunk[..n]);
    }
    (status, head, body)
}

/// Reads `n` responses to pipelined requests from a raw stream, each
/// framed by its `Content-Length` (none: no body; 1xx, and chunked bodies,
/// are not expected): (status, head text, body) each. Bytes after the
/// `n`th are an error.
async fn read_responses(s: &mut TcpStream, n: usize) -> Vec<(u16, String, Vec<u8>)> {
    let mut buf = Vec::new();
    let mut chunk = [0u8; 65536];
    let mut out = Vec::new();
    while out.len() < n {
        let parsed = buf.windows(4).position(|w| w == b"\r\n\r\n").and_then(|i| {
            let head = String::from_utf8_lossy(&buf[..i + 4]).to_string();
            let len: usize = head
                .lines()
                .find_map(|l| l.to_ascii_lowercase().strip_prefix("content-length:").map(|v| v.trim().parse().unwrap()))
                .unwrap_or(0);
            (buf.len() >= i + 4 + len).then(|| (head, i + 4, len))
        });
        if let Some((head, at, len)) = parsed {
            let status: u16 = head[9..12].parse().unwrap();
            out.push((status, head, buf[at..at + len].to_vec()));
            buf.drain(..at + len);
            continue;
        }
        let got = tokio::time::timeout(Duration::from_secs(20), s.read(&mut chunk)).await.unwrap().unwrap();
        assert!(got > 0, "closed after {} responses: {:?}", out.len(), String::from_utf8_lossy(&buf));
        buf.extend_from_slice(&chunk[..got]);
    }
    assert!(buf.is_empty(), "bytes after {n} responses: {:?}", String::from_utf8_lossy(&buf));
    out
}

async fn raw(addr: SocketAddr, bytes: &[u8]) -> (u16, String, Vec<u8>) {
    let mut s = TcpStream::connect(addr).await.unwrap();
    s.write_all(bytes).await.unwrap();
    read_response(&mut s).await
}

fn random_bytes(n: usize, seed: u64) -> Vec<u8> {
    let mut x = seed | 1;
    (0..n)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_edge_status() {
    let srv = Server::default().await;
    let mut c = Client::connect(srv.addr).await;

    // 200 through a 3-function chain, content type carried through.
    let (st, h, body) = c.post("/chain/x?y=1", b"Hello, DNE!").await;
    assert_eq!(st, StatusCode::OK);
    assert_eq!(body, b"!RAQ ,BYYRU");
    assert_eq!(h.get("content-type").unwrap(), "text/x-test");
    // Host-specific route.
    let req =
        Request::post("/echo").header("host", "Special.Example:8080").body(Full::new(Bytes::from("abc"))).unwrap();
    let (st, _, body) = c.send(req).await;
    assert_eq!((st, body.as_slice()), (StatusCode::OK, &b"cba"[..]));
    // GET without a body.
    let req = Request::get("/echo").header("host", "x").body(Full::new(Bytes::new())).unwrap();
    assert_eq!(c.send(req).await.0, StatusCode::OK);

    // 404: no route.
    assert_eq!(c.post("/nowhere", b"x").await.0, StatusCode::NOT_FOUND);
    assert_eq!(c.post("/chainsaw", b"x").await.0, StatusCode::NOT_FOUND);

    // 401: API key missing or wrong; 200 with the right one.
    assert_eq!(c.post("/acme", b"x").await.0, StatusCode::UNAUTHORIZED);
    let with_key = |k: &str| {
        Request::post("/acme")
            .header("host", "x")
            .header("authorization", format!("Bearer {k}"))
            .body(Full::new(Bytes::from("key")))
            .unwrap()
    };
    let (st, h, _) = c.send(with_key("wrong")).await;
    assert_eq!(st, StatusCode::UNAUTHORIZED);
    assert_eq!(h.get("www-authenticate").unwrap(), "Bearer");
    let (st, _, body) = c.send(with_key(KEY)).await;
    assert_eq!((st, body.as_slice()), (StatusCode::OK, &b"key"[..]));

    // 502: a function replies with an error.
    let (st, h, _) = c.post("/fail", b"x").await;
    assert_eq!(st, StatusCode::BAD_GATEWAY);
    assert_eq!(h.get("x-dne-error").unwrap(), "function_failed");
    // 503 + Retry-After: a node of the chain was unreachable from the
    // one before it (the cluster lacked room, the request may be retried).
    let (st, h, _) = c.post("/fail-unreachable", b"x").await;
    assert_eq!(st, StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(h.get("x-dne-error").unwrap(), "unreachable");
    assert!(h.get("retry-after").is_some());
    // 504: a hop of the chain timed out.
    let (st, h, _) = c.post("/fail-timeout", b"x").await;
    assert_eq!(st, StatusCode::GATEWAY_TIMEOUT);
    assert_eq!(h.get("x-dne-error").unwrap(), "timeout");

    // 502: a function answers with an interim (1xx) status, which is not a
    // reply hyper can send; any final status passes through.
    for (code, want) in [(100, 502), (101, 502), (103, 502), (204, 204), (599, 599)] {
        c_status(&srv, code);
        assert_eq!(c.post("/echo", b"x").await.0.as_u16(), want, "function status {code}");
    }
    c_status(&srv, 0);
    assert_eq!(c.post("/echo", b"x").await.0, StatusCode::OK);

    // 504: the chain takes longer than the route's timeout.
    assert_eq!(c.post("/slow", b"x").await.0, StatusCode::GATEWAY_TIMEOUT);

    // 501: unknown method.
    let req = Request::builder().method("BREW").uri("/echo").header("host", "x").body(Full::new(Bytes::new())).unwrap();
    assert_eq!(c.send(req).await.0, StatusCode::NOT_IMPLEMENTED);

    // 413: announced body over the limit (answered before any body byte).
    let (st, head, _) = raw(srv.addr, b"POST /echo HTTP/1.1\r\nHost: x\r\nContent-Length: 2000000\r\n\r\n").await;
    assert_eq!(st, 413, "{head}");
    // 413: chunked body growing over the limit.
    let mut s = TcpStream::connect(srv.addr).await.unwrap();
    s.write_all(b"POST /echo HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n").await.unwrap();
    let piece = vec![b'z'; 256 << 10];
    // Just over the limit, so little is left unread when the server closes.
    for _ in 0..5 {
        let mut chunk = format!("{:x}\r\n", piece.len()).into_bytes();
        chunk.extend_from_slice(&piece);
        chunk.extend_from_slice(b"\r\n");
        if s.write_all(&chunk).await.is_err() {
            break; // the server answered and stopped reading
        }
    }
    assert_eq!(read_response(&mut s).await.0, 413);

    // 400: malformed requests (hyper's parser, and a target the envelope
    // cannot carry).
    assert_eq!(raw(srv.addr, b"NOT HTTP AT ALL\r\n\r\n").await.0, 400);
    assert_eq!(raw(srv.addr, b"POST /echo HTTP/1.1\r\nHost: x\r\nContent-Length: zz\r\n\r\n").await.0, 400);
    let (st, _, _) =
        raw(srv.addr, b"POST /echo HTTP/1.1\r\nHost: x\r\nContent-Length: 3\r\nX-Request-Id: a\x7fb\r\n\r\nabc").await;
    assert_eq!(st, 400);

    // The metrics saw all of it.
    let req = Request::get("/metrics").header("host", "x").body(Full::new(Bytes::new())).unwrap();
    let (st, _, m) = c.send(req).await;
    assert_eq!(st, StatusCode::OK);
    let m = String::from_utf8(m).unwrap();
    for want in [
        r#"dne_ingress_requests_total{route="/chain",tenant="open",code="200"} 1"#,
        r#"dne_ingress_requests_total{route="",tenant="",code="404"} 2"#,
        r#"dne_ingress_requests_total{route="/acme",tenant="acme",code="401"} 2"#,
        r#"dne_ingress_requests_total{route="/fail",tenant="open",code="502"} 1"#,
        r#"dne_ingress_requests_total{route="/slow",tenant="open",code="504"} 1"#,
        r#"dne_ingress_rejections_total{tenant="open",reason="too_large"} 2"#,
        r#"dne_ingress_pool_buffers{tenant="open"} 512"#,
        "dne_ingress_request_duration_seconds_bucket",
    ] {
        assert!(m.contains(want), "metrics lack {want}:\n{m}");
    }
    srv.assert_no_leak().await;
    srv.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_mib_bodies_arrive_byte_exact_and_come_back() {
    let srv = Server::default().await;
    let mut c = Client::connect(srv.addr).await;
    let body = random_bytes(1 << 20, 7);
    let (st, _, got) = c.post("/echo", &body).await;
    assert_eq!(st, StatusCode::OK);
    assert!(got == body, "1 MiB echo differs");
    let (st, _, got) = c.post("/chain", &body).await;
    assert_eq!(st, StatusCode::OK);
    assert!(got == chain(&body), "1 MiB through the chain differs");
    // Chunked upload in odd pieces, raw.
    let mut s = TcpStream::connect(srv.addr).await.unwrap();
    let mut req = b"POST /echo HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n".to_vec();
    for piece in body.chunks(12_345) {
        req.extend_from_slice(format!("{:x}\r\n", piece.len()).as_bytes());
        req.extend_from_slice(piece);
        req.extend_from_slice(b"\r\n");
    }
    req.extend_from_slice(b"0\r\n\r\n");
    s.write_all(&req).await.unwrap();
    let (st, _, got) = read_response(&mut s).await;
    assert_eq!(st, 200);
    assert!(got == body, "chunked 1 MiB echo differs");
    srv.assert_no_leak().await;
    srv.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_clients_each_get_their_own_answer() {
    let srv = Server::default().await;
    let mut tasks = Vec::new();
    for i in 0..16u64 {
        let addr = srv.addr;
        tasks.push(tokio::spawn(async move {
            let mut c = Client::connect(addr).await;
            for j in 0..20u64 {
                let body = random_bytes(100 + (i * 977 + j * 131) as usize % 40_000, i * 1000 + j);
                let (st, _, got) = c.post("/chain", &body).await;
                assert_eq!(st, StatusCode::OK);
                assert!(got == chain(&body), "client {i} request {j}: wrong body");
            }
        }));
    }
    for t in tasks {
        tokio::time::timeout(Duration::from_secs(60), t).await.unwrap().unwrap();
    }
    // Every request told the chain who the client was (the address is
    // formatted once per connection).
    let xff = std::mem::take(&mut *srv.upstream.xff.lock().unwrap());
    assert_eq!(xff.len(), 16 * 20);
    assert!(xff.iter().all(|v| v.as_deref() == Some(&b"127.0.0.1"[..])), "x-forwarded-for seen: {:?}", xff.first());
    srv.assert_no_leak().await;
    srv.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slow_client_is_served_and_does_not_hold_up_others() {
    let srv = Server::default().await;
    let body = random_bytes(200_000, 3);
    let addr = srv.addr;
    let slow_body = body.clone();
    let (half_sent, half_sent_rx) = tokio::sync::oneshot::channel::<()>();
    let (go, go_rx) = tokio::sync::oneshot::channel::<()>();
    let slow = tokio::spawn(async move {
        let mut s = TcpStream::connect(addr).await.unwrap();
        let head = format!("POST /echo HTTP/1.1\r\nHost: x\r\nContent-Length: {}\r\n\r\n", slow_body.len());
        s.write_all(head.as_bytes()).await.unwrap();
        let pieces: Vec<&[u8]> = slow_body.chunks(slow_body.len() / 8 + 1).collect();
        let (first, second) = pieces.split_at(pieces.len() / 2);
        for piece in first {
            tokio::time::sleep(Duration::from_millis(50)).await;
            s.write_all(piece).await.unwrap();
        }
        // Half the body is in: let the others run, then go on.
        half_sent.send(()).unwrap();
        go_rx.await.unwrap();
        for piece in second {
            tokio::time::sleep(Duration::from_millis(50)).await;
            s.write_all(piece).await.unwrap();
        }
        // Read the reply slowly too.
        let mut got = Vec::new();
        let mut buf = [0u8; 4096];
        loop {
            let n = tokio::time::timeout(Duration::from_secs(20), s.read(&mut buf)).await.unwrap().unwrap();
            assert!(n > 0);
            got.extend_from_slice(&buf[..n]);
            let head_end = got.windows(4).position(|w| w == b"\r\n\r\n").map(|i| i + 4);
            if let Some(i) = head_end.filter(|&i| got.len() - i >= slow_body.len()) {
                assert!(got.starts_with(b"HTTP/1.1 200"));
                assert!(got[i..] == slow_body[..]);
                return;
            }
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
    });
    // While the slow client is half-way through its body, others go through.
    tokio::time::timeout(Duration::from_secs(20), half_sent_rx).await.unwrap().unwrap();
    let mut c = Client::connect(srv.addr).await;
    for i in 0..20 {
        let (st, _, got) = c.post("/echo", format!("fast {i}").as_bytes()).await;
        assert_eq!((st, got), (StatusCode::OK, format!("fast {i}").into_bytes()));
    }
    go.send(()).unwrap();
    tokio::time::timeout(Duration::from_secs(30), slow).await.unwrap().unwrap();
    srv.assert_no_leak().await;
    srv.stop().await;
}

/// A body trickled in (each piece well within `body_timeout`) is cut off
/// at `body_deadline` with 408, and its buffers come back.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_trickled_body_gets_408_at_the_body_deadline() {
    let srv =
        Server::start_with(512, InProcessConfig::default(), |s| s.body_deadline = Duration::from_millis(600)).await;
    let mut s = TcpStream::connect(srv.addr).await.unwrap();
    s.write_all(b"POST /echo HTTP/1.1\r\nHost: x\r\nContent-Length: 100000\r\n\r\n").await.unwrap();
    // One byte every 100 ms (well within `body_timeout`) until an answer
    // comes.
    let (start, mut got, mut buf) = (Instant::now(), Vec::new(), [0u8; 4096]);
    while got.is_empty() {
        assert!(start.elapsed() < Duration::from_secs(20), "the body was never cut off");
        let _ = s.write_all(b"x").await;
        match tokio::time::timeout(Duration::from_millis(100), s.read(&mut buf)).await {
            Ok(Ok(n)) => got.extend_from_slice(&buf[..n]),
            Ok(Err(e)) => panic!("reading the answer: {e}"),
            Err(_) => {}
        }
    }
    let st: u16 = String::from_utf8_lossy(&got[9..12]).parse().unwrap();
    assert_eq!(st, 408);
    srv.assert_no_leak().await;
    srv.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn clients_vanishing_mid_request_or_mid_response_leak_nothing() {
    let srv = Server::default().await;
    // Mid-body: 300 KiB of an announced 1 MiB, then gone.
    let mut s = TcpStream::connect(srv.addr).await.unwrap();
    s.write_all(b"POST /echo HTTP/1.1\r\nHost: x\r\nContent-Length: 1048576\r\n\r\n").await.unwrap();
    s.write_all(&vec![1u8; 300 << 10]).await.unwrap();
    tokio::time::sleep(Duration::from_millis(100)).await;
    drop(s);
    srv.assert_no_leak().await;
    // While the chain runs: the reply arrives after the client left. A
    // client that closed looks on the wire like one that only shut its
    // sending side (see `a_client_that_half_closes_after_its_request_still_gets_its_answer`),
    // so its complete request is answered, and (its short answer written
    // into the closed socket without an error) counted by its status; see
    // `an_answer_whose_write_fails_counts_as_client_gone` for a long one.
    let mut s = TcpStream::connect(srv.addr).await.unwrap();
    s.write_all(b"POST /patient HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\n\r\nhello").await.unwrap();
    tokio::time::sleep(Duration::from_millis(100)).await;
    drop(s);
    srv.assert_no_leak().await;
    // The one gone mid-body is counted: rejections, reason client_gone.
    let gone = r#"dne_ingress_rejections_total{tenant="open",reason="client_gone"} 1"#;
    let text = srv.ingress.metrics_text();
    assert!(text.lines().any(|l| l == gone), "{text}");
    let answered = r#"dne_ingress_requests_total{route="/patient",tenant="open",code="200"} 1"#;
    assert!(text.lines().any(|l| l == answered), "{text}");
    // Mid-response: read a little of a 1 MiB reply, then gone.
    let mut s = TcpStream::connect(srv.addr).await.unwrap();
    let body = random_bytes(1 << 20, 11);
    let mut req = format!("POST /echo HTTP/1.1\r\nHost: x\r\nContent-Length: {}\r\n\r\n", body.len()).into_bytes();
    req.extend_from_slice(&body);
    s.write_all(&req).await.unwrap();
    let mut buf = [0u8; 10_000];
    let n = tokio::time::timeout(Duration::from_secs(20), s.read(&mut buf)).await.unwrap().unwrap();
    assert!(n > 0);
    drop(s);
    srv.assert_no_leak().await;
    // The server is still fine.
    let mut c = Client::connect(srv.addr).await;
    assert_eq!(c.post("/echo", b"still here").await.2, b"still here");
    srv.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn exhausted_pool_and_full_queue_answer_503_with_retry_after() {
    // A pool of 3 buffers: three slow requests hold all of them.
    let srv = Server::start(3, InProcessConfig { workers: 4, ..Default::default() }).await;
    let mut held = Vec::new();
    for _ in 0..3 {
        let addr = srv.addr;
        held.push(tokio::spawn(async move { Client::connect(addr).await.post("/patient", b"hold").await.0 }));
    }
    until(|| srv.ingress.pools().get(0).unwrap().free_buffers() == 0, || "the slow requests never took the buffers")
        .await;
    let mut c = Client::connect(srv.addr).await;
    let (st, h, _) = c.post("/echo", b"no room").await;
    assert_eq!(st, StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(h.get("retry-after").unwrap(), "1");
    for t in held {
        assert_eq!(t.await.unwrap(), StatusCode::OK);
    }
    srv.assert_no_leak().await;
    srv.stop().await;

    // One worker, a queue of one: the third concurrent request is refused.
    let cfg = InProcessConfig { workers: 1, queue_depth: 1, queue_wait: Duration::from_millis(50) };
    let srv = Server::start(64, cfg).await;
    let mut busy = Vec::new();
    let pool = srv.ingress.pools().get(0).unwrap().clone();
    for n in 1..=2 {
        let addr = srv.addr;
        busy.push(tokio::spawn(async move { Client::connect(addr).await.post("/patient", b"busy").await.0 }));
        // Until the request holds its buffer (in the worker, then queued).
        until(|| pool.capacity() - pool.free_buffers() >= n, || format!("request {n} never arrived")).await;
        // Give the worker time to take the first one off the queue.
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let (st, h, _) = Client::connect(srv.addr).await.post("/echo", b"queued out").await;
    assert_eq!(st, StatusCode::SERVICE_UNAVAILABLE);
    assert!(h.contains_key("retry-after"));
    for t in busy {
        assert_eq!(t.await.unwrap(), StatusCode::OK);
    }
    srv.assert_no_leak().await;
    srv.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shutdown_finishes_in_flight_requests_then_refuses() {
    let srv = Server::default().await;
    let addr = srv.addr;
    // An idle keep-alive connection must not hold shutdown up.
    let mut idle = Client::connect(addr).await;
    assert_eq!(idle.post("/echo", b"x").await.0, StatusCode::OK);
    let in_flight = tokio::spawn(async move { Client::connect(addr).await.post("/patient", b"finish me").await });
    // Wait until the request is in the chain: the upstream has seen it
    // (its second call). A buffer missing from the pool is no sign of
    // that: the echo's reply may still be on its way back to the pool.
    until(|| srv.upstream.xff.lock().unwrap().len() >= 2, || "the request never arrived").await;
    let ingress = srv.ingress.clone();
    srv.stop().await;
    let (st, _, body) = in_flight.await.unwrap();
    assert_eq!((st, body.as_slice()), (StatusCode::OK, &b"finish me"[..]));
    assert!(TcpStream::connect(addr).await.is_err(), "still accepting after shutdown");
    for p in ingress.pools().iter() {
        assert_eq!(p.free_buffers(), p.capacity());
    }
}

/// A request body's buffers are taken as its bytes arrive, not for the
/// length its head announces: eight clients that send only a head with a
/// large `Content-Length` hold the envelope head's buffer each, and another
/// client of the tenant is served. (Before, each reserved its whole
/// announced body up front, so eight such heads held the pool of 512 and
/// every other client got 503.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_body_announced_but_not_sent_holds_no_buffers_for_itself() {
    let srv = Server::default().await;
    let pool = srv.ingress.pools().get(0).unwrap().clone();
    // Eight uploads of 64 buffers each (envelope head room included)
    // would cover the pool of 512; each is within the body limit.
    let cap = u64::from(pool.pool().geometry().payload_cap());
    let len = 64 * cap - 256;
    let mut silent = Vec::new();
    for _ in 0..8 {
        let mut s = TcpStream::connect(srv.addr).await.unwrap();
        let head = format!("POST /echo HTTP/1.1\r\nHost: x\r\nContent-Length: {len}\r\n\r\n");
        s.write_all(head.as_bytes()).await.unwrap();
        silent.push(s);
    }
    // Until all eight are being handled and each has taken a buffer.
    let held = || pool.capacity() - pool.free_buffers();
    until(
        || metric(&srv, r#"dne_ingress_in_flight{tenant="open"}"#) == Some(8) && held() >= 8,
        || format!("the eight heads never arrived: {} buffers held", held()),
    )
    .await;
    let held = pool.capacity() - pool.free_buffers();
    assert!(held <= 2 * 8, "eight requests with no body byte received hold {held} buffers");
    let (st, h, body) = Client::connect(srv.addr).await.post("/echo", b"hi").await;
    assert_eq!((st, body.as_slice()), (StatusCode::OK, &b"hi"[..]), "another client of the tenant: {h:?}");
    drop(silent);
    srv.assert_no_leak().await;
    srv.stop().await;
}

/// The value of the metric line that starts with `series` (labels
/// included), if there is one.
fn metric(srv: &Server, series: &str) -> Option<u64> {
    let text = srv.ingress.metrics_text();
    text.lines().find_map(|l| l.strip_prefix(series)?.trim().parse().ok())
}

/// A client that leaves mid-body is counted as `client_gone`, not as a 400
/// response and a `bad_request` rejection (hyper reports its leaving as an
/// error reading the body, which the edge took for a malformed body).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_gone_mid_body_counts_as_client_gone_not_as_a_400() {
    let srv = Server::default().await;
    let pool = srv.ingress.pools().get(0).unwrap().clone();
    // A malformed body (a chunk size that is not hex) is still a 400.
    let (st, head, _) =
        raw(srv.addr, b"POST /echo HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\nab\r\n").await;
    assert_eq!(st, 400, "{head}");
    let mut s = TcpStream::connect(srv.addr).await.unwrap();
    s.write_all(b"POST /echo HTTP/1.1\r\nHost: x\r\nContent-Length: 1048576\r\n\r\n").await.unwrap();
    s.write_all(&vec![1u8; 300 << 10]).await.unwrap();
    // Until the edge is reading the body (it holds buffers beyond the
    // envelope head's), then gone.
    until(|| pool.capacity() - pool.free_buffers() >= 2, || "the body never arrived").await;
    drop(s);
    srv.assert_no_leak().await;
    let text = srv.ingress.metrics_text();
    let lines: Vec<&str> =
        text.lines().filter(|l| l.contains("rejections_total{") || l.contains("requests_total{")).collect();
    let reason = |r: &str| metric(&srv, &format!(r#"dne_ingress_rejections_total{{tenant="open",reason="{r}"}}"#));
    assert_eq!((reason("client_gone"), reason("bad_request")), (Some(1), Some(1)), "{lines:#?}");
    let bad = metric(&srv, r#"dne_ingress_requests_total{route="/echo",tenant="open",code="400"}"#);
    assert_eq!(bad, Some(1), "only the malformed body is a 400: {lines:#?}");
    srv.stop().await;
}

/// The auth scheme's name is matched in any case, and one or more spaces
/// may follow it (RFC 9110 11.1, 11.4); the old edge took only "Bearer ".
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_bearer_scheme_is_case_insensitive() {
    let srv = Server::default().await;
    let mut c = Client::connect(srv.addr).await;
    for auth in [format!("bearer {KEY}"), format!("BEARER  {KEY}"), format!("Bearer {KEY}")] {
        let req = Request::post("/acme")
            .header("host", "x")
            .header("authorization", &auth)
            .body(Full::new(Bytes::from("key")))
            .unwrap();
        assert_eq!(c.send(req).await.0, StatusCode::OK, "{auth:?}");
    }
    let req = Request::post("/acme")
        .header("host", "x")
        .header("authorization", format!("bearer wrong-{KEY}"))
        .body(Full::new(Bytes::from("key")))
        .unwrap();
    assert_eq!(c.send(req).await.0, StatusCode::UNAUTHORIZED);
    srv.stop().await;
}

/// A request with two `Host` lines is refused (400), not routed by the
/// first; an absolute-form target's authority wins over `Host` (RFC 9112
/// 3.2 and 3.2.2). `special.example/echo` reverses the body, `/echo` on
/// any other host echoes it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_hosts_are_refused_and_an_absolute_target_wins_over_host() {
    let srv = Server::default().await;
    let two = b"POST /echo HTTP/1.1\r\nHost: special.example\r\nHost: x\r\nContent-Length: 3\r\n\r\nabc";
    let (st, head, body) = raw(srv.addr, two).await;
    assert_eq!(st, 400, "{head}{}", String::from_utf8_lossy(&body));
    let (st, head, body) =
        raw(srv.addr, b"POST http://special.example/echo HTTP/1.1\r\nHost: x\r\nContent-Length: 3\r\n\r\nabc").await;
    assert_eq!((st, body.as_slice()), (200, &b"cba"[..]), "{head}");
    let (st, head, body) =
        raw(srv.addr, b"POST http://x/echo HTTP/1.1\r\nHost: special.example\r\nContent-Length: 3\r\n\r\nabc").await;
    assert_eq!((st, body.as_slice()), (200, &b"abc"[..]), "{head}");
    assert_eq!(metric(&srv, r#"dne_ingress_requests_total{route="",tenant="",code="400"}"#), Some(1));
    srv.assert_no_leak().await;
    srv.stop().await;
}

/// An HTTP/1.1 request without `Host` is refused with 400 (RFC 9112 3.2:
/// "any HTTP/1.1 request message that lacks a Host header field"), one
/// with an absolute-form target too, as is one whose `Host` is not visible
/// ASCII; none is routed as if it had no host. HTTP/1.0 may omit it, with
/// either form of target.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_missing_or_unreadable_host_is_refused() {
    let srv = Server::default().await;
    let (st, head, body) = raw(srv.addr, b"POST /echo HTTP/1.1\r\nContent-Length: 3\r\n\r\nabc").await;
    assert_eq!(st, 400, "{head}{}", String::from_utf8_lossy(&body));
    let (st, head, _) = raw(srv.addr, b"POST /echo HTTP/1.1\r\nHost: sp\xe9cial\r\nContent-Length: 3\r\n\r\nabc").await;
    assert_eq!(st, 400, "{head}");
    let (st, head, body) =
        raw(srv.addr, b"POST http://x/echo HTTP/1.1\r\nConnection: close\r\nContent-Length: 3\r\n\r\nabc").await;
    assert_eq!(st, 400, "{head}{}", String::from_utf8_lossy(&body));
    let (st, head, body) = raw(srv.addr, b"POST /echo HTTP/1.0\r\nContent-Length: 3\r\n\r\nabc").await;
    assert_eq!((st, body.as_slice()), (200, &b"abc"[..]), "{head}");
    let (st, head, body) =
        raw(srv.addr, b"POST http://special.example/echo HTTP/1.0\r\nContent-Length: 3\r\n\r\nabc").await;
    assert_eq!((st, body.as_slice()), (200, &b"cba"[..]), "{head}");
    assert_eq!(metric(&srv, r#"dne_ingress_requests_total{route="",tenant="",code="400"}"#), Some(3));
    srv.assert_no_leak().await;
    srv.stop().await;
}

/// An absolute-form target is routed by its authority (RFC 9112 3.2.2), so
/// it is held to what an `http` URI's authority may be: no userinfo (RFC
/// 9110 4.2.4: a recipient treats it as an error; `special.example@x`
/// reads as a request to `special.example` to a careless eye or parser,
/// and the edge routed it to `x`), a host that is not empty (4.2.1: such a
/// URI is rejected as invalid), and the `http` or `https` scheme (a
/// `foo://` target names no resource of this server). Before, the edge
/// checked only the host part and routed all of them. `special.example/echo`
/// reverses the body, `/echo` on any other host echoes it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_absolute_target_with_userinfo_no_host_or_another_scheme_is_refused() {
    let srv = Server::default().await;
    for target in [
        "http://x@special.example/echo",
        "http://special.example@x/echo",
        "http://special.example:@x/echo",
        "http://:80/echo",
        "foo://special.example/echo",
        "ftp://x/echo",
    ] {
        let req = format!("POST {target} HTTP/1.1\r\nHost: special.example\r\nContent-Length: 3\r\n\r\nabc");
        let (st, head, body) = raw(srv.addr, req.as_bytes()).await;
        assert_eq!(st, 400, "{target}: {head}{}", String::from_utf8_lossy(&body));
    }
    for (target, want) in [
        ("http://special.example/echo", &b"cba"[..]),
        ("HTTPS://Special.Example:443/echo", b"cba"),
        ("http://x:8080/echo?q=@", b"abc"),
    ] {
        let req = format!("POST {target} HTTP/1.1\r\nHost: x\r\nContent-Length: 3\r\n\r\nabc");
        let (st, head, body) = raw(srv.addr, req.as_bytes()).await;
        assert_eq!((st, body.as_slice()), (200, want), "{target}: {head}");
    }
    assert_eq!(metric(&srv, r#"dne_ingress_requests_total{route="",tenant="",code="400"}"#), Some(6));
    srv.assert_no_leak().await;
    srv.stop().await;
}

/// A body arriving slowly still waits for buffers when the pool is short
/// mid-body (`pool_wait` counts time spent waiting for buffers, not the
/// time since the request began). Before, the wait was counted from the
/// first reservation: once the body had been arriving for longer than
/// `pool_wait`, a moment's shortage answered 503.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slow_body_still_waits_for_buffers_when_the_pool_is_short_mid_body() {
    let pool_wait = Duration::from_secs(1);
    let srv = Server::start_with(512, InProcessConfig::default(), |s| {
        s.pool_wait = pool_wait;
        s.body_timeout = Duration::from_secs(30);
    })
    .await;
    let pool = srv.ingress.pools().get(0).unwrap().clone();
    let cap = u64::from(pool.pool().geometry().payload_cap());
    let len = 4 * cap;
    let body: Vec<u8> = (0..len).map(|i| b'a' + (i % 26) as u8).collect();
    let mut s = TcpStream::connect(srv.addr).await.unwrap();
    let head = format!("POST /echo HTTP/1.1\r\nHost: x\r\nContent-Length: {len}\r\n\r\n");
    s.write_all(head.as_bytes()).await.unwrap();
    s.write_all(&body[..10]).await.unwrap();
    until(|| metric(&srv, r#"dne_ingress_in_flight{tenant="open"}"#) == Some(1), || "the request never arrived").await;
    // The body has now been arriving for longer than pool_wait.
    tokio::time::sleep(pool_wait + Duration::from_millis(200)).await;
    let mut taken = Vec::new();
    while let Ok(l) = pool.try_alloc(1) {
        taken.push(l);
    }
    s.write_all(&body[10..]).await.unwrap();
    // The shortage lasts far less than pool_wait.
    tokio::time::sleep(Duration::from_millis(100)).await;
    drop(taken);
    let (st, head, got) = tokio::time::timeout(Duration::from_secs(30), read_response(&mut s)).await.unwrap();
    assert_eq!(st, 200, "{head}");
    assert_eq!(got, body, "the body echoed byte for byte");
    drop(s);
    srv.assert_no_leak().await;
    srv.stop().await;
}

/// A `Host` whose value is not a host (and port) is refused with 400 (RFC
/// 9112 3.2), not routed as a request to no host in particular: among them
/// `Host: a, b`, what a proxy in front makes of two `Host` lines when it
/// joins them (RFC 9110 5.3), which the edge refuses as two lines. The
/// authority of an absolute-form target is held to the same grammar.
/// `special.example/echo` reverses the body, `/echo` on any other host
/// echoes it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_host_that_is_not_a_host_name_is_refused() {
    let srv = Server::default().await;
    let bad: [&[u8]; 7] = [
        b"Host: special.example, x\r\n",
        b"Host: x, special.example\r\n",
        b"Host: x@special.example\r\n",
        b"Host: special.example x\r\n",
        b"Host: special.example/x\r\n",
        b"Host: special.example:80:81\r\n",
        b"Host: special.example\tx\r\n",
    ];
    for host in bad {
        let mut req = b"POST /echo HTTP/1.1\r\n".to_vec();
        req.extend_from_slice(host);
        req.extend_from_slice(b"Content-Length: 3\r\n\r\nabc");
        let (st, head, body) = raw(srv.addr, &req).await;
        assert_eq!(st, 400, "{:?}: {head}{}", String::from_utf8_lossy(host), String::from_utf8_lossy(&body));
    }
    let (st, head, _) =
        raw(srv.addr, b"POST http://special.example,x/echo HTTP/1.1\r\nHost: x\r\nContent-Length: 3\r\n\r\nabc").await;
    assert_eq!(st, 400, "{head}");
    // Hosts and ports as they come.
    for (host, want) in [
        (&b"Host: Special.Example:8080\r\n"[..], &b"cba"[..]),
        (b"Host:  special.example.  \r\n", b"cba"),
        (b"Host: [::1]:8080\r\n", b"abc"),
        (b"Host: 127.0.0.1\r\n", b"abc"),
        (b"Host: my-host_1.example:\r\n", b"abc"),
    ] {
        let mut req = b"POST /echo HTTP/1.1\r\n".to_vec();
        req.extend_from_slice(host);
        req.extend_from_slice(b"Content-Length: 3\r\n\r\nabc");
        let (st, head, body) = raw(srv.addr, &req).await;
        assert_eq!((st, body.as_slice()), (200, want), "{:?}: {head}", String::from_utf8_lossy(host));
    }
    assert_eq!(metric(&srv, r#"dne_ingress_requests_total{route="",tenant="",code="400"}"#), Some(8));
    srv.assert_no_leak().await;
    srv.stop().await;
}

/// A request body in a transfer coding other than `chunked` alone (`gzip,
/// chunked`, say) gets 501 (RFC 9112 6.1), and the connection closes (its
/// body is not read). Before, hyper took the chunks off and the edge
/// handed the function what was left, still gzip, with nothing to say so:
/// the function took compressed bytes for the body.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_transfer_coding_other_than_chunked_gets_501() {
    let srv = Server::default().await;
    let body = b"3\r\nabc\r\n0\r\n\r\n";
    for te in [
        &b"Transfer-Encoding: gzip, chunked\r\n"[..],
        b"Transfer-Encoding: gzip\r\nTransfer-Encoding: chunked\r\n",
        b"Transfer-Encoding: chunked, chunked\r\n",
        b"Transfer-Encoding: identity, chunked\r\n",
        b"Transfer-Encoding: x-custom;q=1, chunked\r\n",
    ] {
        let mut req = b"POST /echo HTTP/1.1\r\nHost: x\r\n".to_vec();
        req.extend_from_slice(te);
        req.extend_from_slice(b"\r\n");
        req.extend_from_slice(body);
        // A request after it on the same connection is not read.
        req.extend_from_slice(b"POST /echo HTTP/1.1\r\nHost: x\r\nContent-Length: 3\r\n\r\nabc");
        let mut s = TcpStream::connect(srv.addr).await.unwrap();
        s.write_all(&req).await.unwrap();
        let (st, head, got) = read_response(&mut s).await;
        assert_eq!(st, 501, "{:?}: {head}{}", String::from_utf8_lossy(te), String::from_utf8_lossy(&got));
        assert!(head.to_ascii_lowercase().contains("connection: close"), "{head}");
        let mut rest = Vec::new();
        tokio::time::timeout(Duration::from_secs(20), s.read_to_end(&mut rest)).await.unwrap().unwrap();
        assert!(rest.is_empty(), "after the 501: {}", String::from_utf8_lossy(&rest));
    }
    // `chunked` alone, in any case and with empty list elements, is read.
    for te in
        [&b"Transfer-Encoding: chunked\r\n"[..], b"Transfer-Encoding: Chunked\r\n", b"Transfer-Encoding: , chunked\r\n"]
    {
        let mut req = b"POST /echo HTTP/1.1\r\nHost: x\r\n".to_vec();
        req.extend_from_slice(te);
        req.extend_from_slice(b"\r\n");
        req.extend_from_slice(body);
        let (st, head, got) = raw(srv.addr, &req).await;
        assert_eq!((st, got.as_slice()), (200, &b"abc"[..]), "{:?}: {head}", String::from_utf8_lossy(te));
    }
    assert_eq!(metric(&srv, r#"dne_ingress_requests_total{route="/echo",tenant="open",code="501"}"#), Some(5));
    srv.assert_no_leak().await;
    srv.stop().await;
}

/// A path with a `.` or `..` segment, spelt out or percent-escaped (a `/`
/// too), gets 400 and is not routed. Routes match the path as sent, so
/// `/echo/../chain` went to `/echo` (its function told a path that
/// resolves to `/chain`) and `/acme/%2e%2e/echo` to `/acme`: a proxy in
/// front that resolves the path first, as most do, judges such a request
/// as one for the other route (its authentication, say) while the edge
/// sends it down this one. Clients resolve dot segments before they send
/// (RFC 3986 5.2), so only a hostile one sends them.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_path_with_dot_segments_is_refused() {
    let srv = Server::default().await;
    for path in [
        "/echo/../chain",
        "/echo/./x",
        "/echo/.",
        "/echo/..",
        "/echo/x/..?q=1",
        "/echo/%2e%2E/chain",
        "/echo/.%2e",
        "/echo/..%2Fchain",
        "/echo/x%2F..%2F..%2Fchain",
        "/acme/%2e%2e/echo",
    ] {
        let req = format!("POST {path} HTTP/1.1\r\nHost: x\r\nContent-Length: 3\r\n\r\nabc");
        let (st, head, body) = raw(srv.addr, req.as_bytes()).await;
        assert_eq!(st, 400, "{path}: {head}{}", String::from_utf8_lossy(&body));
    }
    // Dots that are not a whole segment, and any in the query, are fine.
    for path in ["/echo/...", "/echo/..x", "/echo/x..", "/echo/.x/y.", "/echo/%2e%2ex", "/echo?a=/../b&c=.."] {
        let req = format!("POST {path} HTTP/1.1\r\nHost: x\r\nContent-Length: 3\r\n\r\nabc");
        let (st, head, body) = raw(srv.addr, req.as_bytes()).await;
        assert_eq!((st, body.as_slice()), (200, &b"abc"[..]), "{path}: {head}");
    }
    assert_eq!(metric(&srv, r#"dne_ingress_requests_total{route="",tenant="",code="400"}"#), Some(10));
    srv.assert_no_leak().await;
    srv.stop().await;
}

/// Forwarded headers beyond what an envelope carries (more than
/// `MAX_HEADERS` lines, or more than `MAX_HEADER_BYTES` bytes, of those the
/// edge passes on) get 431 (RFC 6585 5), as hyper answers heads over its
/// own limits, not 400 "malformed request": the request is well formed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn forwarded_headers_over_the_envelopes_limits_get_431() {
    let srv = Server::default().await;
    let mut many = String::from("POST /echo HTTP/1.1\r\nHost: x\r\nContent-Length: 3\r\n");
    for i in 0..wire::http::MAX_HEADERS {
        many.push_str(&format!("Accept: text/x-{i}\r\n"));
    }
    many.push_str("\r\nabc");
    let (st, head, body) = raw(srv.addr, many.as_bytes()).await;
    assert_eq!(st, 431, "{head}{}", String::from_utf8_lossy(&body));
    let ua = "u".repeat(wire::http::MAX_HEADER_BYTES as usize);
    let long = format!("POST /echo HTTP/1.1\r\nHost: x\r\nUser-Agent: {ua}\r\nContent-Length: 3\r\n\r\nabc");
    let (st, head, body) = raw(srv.addr, long.as_bytes()).await;
    assert_eq!(st, 431, "{head}{}", String::from_utf8_lossy(&body));
    // Within the limits (the edge's x-forwarded-for makes one more line).
    let mut fits = String::from("POST /echo HTTP/1.1\r\nHost: x\r\nContent-Length: 3\r\n");
    for i in 0..wire::http::MAX_HEADERS - 1 {
        fits.push_str(&format!("Accept: text/x-{i}\r\n"));
    }
    fits.push_str("\r\nabc");
    let (st, head, body) = raw(srv.addr, fits.as_bytes()).await;
    assert_eq!((st, body.as_slice()), (200, &b"abc"[..]), "{head}");
    srv.assert_no_leak().await;
    srv.stop().await;
}

/// Connections beyond `max_connections` are answered 503 with
/// `Retry-After` and closed at once, counted; the ones open are served on,
/// and once one closes a new connection is served. Before, every
/// connection was taken (each holds a descriptor, idle ones for up to the
/// head timeout) until accepting failed for lack of descriptors.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connections_beyond_max_connections_get_503_and_are_closed() {
    let srv = Server::start_with(512, InProcessConfig::default(), |s| s.max_connections = 2).await;
    let mut a = Client::connect(srv.addr).await;
    let (st, _, body) = a.post("/chain", b"first").await;
    assert_eq!((st, body), (StatusCode::OK, chain(b"first")));
    // An idle connection holds the second slot (the server counts it once
    // it has accepted it: wait for the gauge).
    let idle = TcpStream::connect(srv.addr).await.unwrap();
    until(|| metric(&srv, "dne_ingress_connections ") == Some(2), || srv.ingress.metrics_text()).await;
    // The third: its request is answered 503 and the connection closes.
    let (st, head, body) =
        raw(srv.addr, b"POST /chain HTTP/1.1\r\nhost: ingress.test\r\ncontent-length: 1\r\n\r\nx").await;
    assert_eq!(st, 503, "{head}");
    assert!(head.to_ascii_lowercase().contains("retry-after: 1\r\n"), "{head}");
    assert_eq!(body, b"too many connections\n");
    assert_eq!(metric(&srv, "dne_ingress_connections_refused_total "), Some(1));
    // The open ones are served on.
    let (st, _, body) = a.post("/chain", b"again").await;
    assert_eq!((st, body), (StatusCode::OK, chain(b"again")));
    // A slot freed is taken again.
    drop(idle);
    until(|| metric(&srv, "dne_ingress_connections ") == Some(1), || srv.ingress.metrics_text()).await;
    let mut b = Client::connect(srv.addr).await;
    let (st, _, body) = b.post("/chain", b"third").await;
    assert_eq!((st, body), (StatusCode::OK, chain(b"third")));
    drop((a, b));
    srv.assert_no_leak().await;
    srv.stop().await;
}

/// Reads until the server closes the connection (deadline: 20 s) and
/// returns what came after the response; fails if the connection is
/// still open.
async fn read_to_close(s: &mut (impl tokio::io::AsyncRead + Unpin)) -> std::io::Result<Vec<u8>> {
    let mut rest = Vec::new();
    tokio::time::timeout(Duration::from_secs(20), s.read_to_end(&mut rest))
        .await
        .expect("the server kept the connection open")?;
    Ok(rest)
}

/// A client may shut down its sending side once its request is complete
/// (`shutdown(SHUT_WR)`, what `nc -N` does) and still read the answer.
/// hyper by default takes the end of the client's stream for the client
/// leaving and closes the connection without answering. The chain takes a
/// second here, so the end of stream surely arrives before the reply does.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_that_half_closes_after_its_request_still_gets_its_answer() {
    let srv = Server::default().await;
    for (req, want) in [
        (&b"POST /patient HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\n\r\nhello"[..], &b"hello"[..]),
        (b"GET /patient HTTP/1.1\r\nHost: x\r\n\r\n", b""),
        (b"POST /patient HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n0\r\n\r\n", b"abc"),
    ] {
        let mut s = TcpStream::connect(srv.addr).await.unwrap();
        s.write_all(req).await.unwrap();
        s.shutdown().await.unwrap();
        let (st, head, body) = read_response(&mut s).await;
        assert_eq!((st, body.as_slice()), (200, want), "{head}");
        // Nothing more will come from the client: the server closes.
        assert_eq!(read_to_close(&mut s).await.unwrap(), b"");
    }
    srv.assert_no_leak().await;
    srv.stop().await;
}
/// An answer given before the request's body was read, after which the
/// server closes the connection, says `Connection: close` (RFC 9112 9.6):
/// 404, 401, 501 and 414 were sent without it (hyper decided to close only
/// after it had written the head). One to a request without a body, or
/// with a small one that arrives with it, keeps the connection open.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_early_answer_to_a_request_with_a_body_says_connection_close() {
    let srv = Server::default().await;
    let long = format!("/echo?{}", "q".repeat(wire::http::MAX_PATH as usize));
    for (method, target, auth, len, code) in [
        ("POST", "/nowhere", "", 100_000, 404),
        // (A small body is waited for a moment, then given up.)
        ("POST", "/nowhere", "", 1000, 404),
        ("POST", "/acme", "", 100_000, 401),
        ("POST", "/acme", "Authorization: Bearer wrong\r\n", 100_000, 401),
        ("BREW", "/echo", "", 100_000, 501),
        ("POST", long.as_str(), "", 100_000, 414),
    ] {
        let mut s = TcpStream::connect(srv.addr).await.unwrap();
        // A body announced, and only a little of it sent.
        let head = format!("{method} {target} HTTP/1.1\r\nHost: x\r\n{auth}Content-Length: {len}\r\n\r\n0123456789");
        s.write_all(head.as_bytes()).await.unwrap();
        let (st, head, _) = read_response(&mut s).await;
        assert_eq!(st, code, "{method} {target}: {head}");
        assert!(head.to_ascii_lowercase().contains("\r\nconnection: close\r\n"), "{method} {target}: {head}");
        assert_eq!(read_to_close(&mut s).await.unwrap(), b"", "{method} {target}");
    }
    // Without a body there is nothing left unread: the connection serves on.
    let mut s = TcpStream::connect(srv.addr).await.unwrap();
    s.write_all(b"GET /nowhere HTTP/1.1\r\nHost: x\r\n\r\n").await.unwrap();
    let (st, head, _) = read_response(&mut s).await;
    assert_eq!(st, 404, "{head}");
    assert!(!head.to_ascii_lowercase().contains("connection: close"), "{head}");
    // Nor with a small body sent whole.
    s.write_all(b"POST /acme HTTP/1.1\r\nHost: x\r\nContent-Length: 3\r\n\r\nabc").await.unwrap();
    let (st, head, _) = read_response(&mut s).await;
    assert_eq!(st, 401, "{head}");
    assert!(!head.to_ascii_lowercase().contains("connection: close"), "{head}");
    s.write_all(b"POST /echo HTTP/1.1\r\nHost: x\r\nContent-Length: 2\r\n\r\nok").await.unwrap();
    let (st, head, body) = read_response(&mut s).await;
    assert_eq!((st, body.as_slice()), (200, &b"ok"[..]), "{head}");
    srv.assert_no_leak().await;
    srv.stop().await;
}
/// A client that waits for `100 Continue` before sending its body is not
/// asked for a body the server will not use: an early answer (404, 401)
/// goes out as the first response, and the connection closes after it
/// (the body was announced and never read).
#[tokio::test]
async fn an_early_answer_to_a_request_expecting_100_continue_asks_for_no_body() {
    let srv = Server::default().await;
    for (target, code) in [("/nowhere", 404), ("/acme", 401)] {
        let mut s = TcpStream::connect(srv.addr).await.unwrap();
        let head = format!("POST {target} HTTP/1.1\r\nHost: x\r\nExpect: 100-continue\r\nContent-Length: 10\r\n\r\n");
        s.write_all(head.as_bytes()).await.unwrap();
        let (st, head, _) = read_response(&mut s).await;
        assert_eq!(st, code, "{target}: {head}");
        assert!(head.to_ascii_lowercase().contains("\r\nconnection: close\r\n"), "{target}: {head}");
        assert_eq!(read_to_close(&mut s).await.unwrap(), b"", "{target}");
    }
    // A routed request still gets its 100 Continue and its answer.
    let mut s = TcpStream::connect(srv.addr).await.unwrap();
    s.write_all(b"POST /echo HTTP/1.1\r\nHost: x\r\nExpect: 100-continue\r\nContent-Length: 2\r\n\r\n").await.unwrap();
    let (st, head, _) = read_response(&mut s).await;
    assert_eq!(st, 100, "{head}");
    s.write_all(b"ok").await.unwrap();
    let (st, head, body) = read_response(&mut s).await;
    assert_eq!((st, body.as_slice()), (200, &b"ok"[..]), "{head}");
    srv.assert_no_leak().await;
    srv.stop().await;
}

/// A client still sending a body the server will not read (413 over the
/// limit, 404 no route) can finish sending it and sees the connection end
/// in order. Before, the server closed the socket with the body's bytes
/// unread, which makes the kernel reset the connection: the client's
/// writes failed and its read ended in a reset, and a reset can destroy
/// the answer itself on its way (a response still in the server's send
/// queue is discarded, and some stacks discard what they received). Now
/// the server shuts its sending side, then reads and discards what comes
/// (bounded in bytes and time) before it closes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_still_sending_its_body_after_an_early_answer_is_not_reset() {
    let srv = Server::default().await;
    for (target, len, code) in [("/echo", 2_000_000usize, 413), ("/nowhere", 600_000, 404)] {
        let mut s = TcpStream::connect(srv.addr).await.unwrap();
        let head = format!("POST {target} HTTP/1.1\r\nHost: x\r\nContent-Length: {len}\r\n\r\n0123456789");
        s.write_all(head.as_bytes()).await.unwrap();
        let (st, head, _) = read_response(&mut s).await;
        assert_eq!(st, code, "{target}: {head}");
        // The client goes on sending its body (256 KiB more of it), as one
        // that writes all of its request before it reads would.
        let piece = [b'z'; 4096];
        let mut sent = 0;
        let mut failed = None;
        while sent < 256 << 10 {
            if let Err(e) = s.write_all(&piece).await {
                failed = Some(e);
                break;
            }
            sent += piece.len();
        }
        assert!(failed.is_none(), "{target}: sending the body failed after {sent} bytes: {failed:?}");
        // The connection ends with the server's FIN, not a reset.
        let end = read_to_close(&mut s).await;
        assert!(matches!(&end, Ok(rest) if rest.is_empty()), "{target}: {end:?}");
    }
    srv.assert_no_leak().await;
    srv.stop().await;
}
/// A function's reply cannot set the headers the ingress owns:
/// `x-dne-error` (the ingress's word that the cluster failed the
/// request), `Date` (the ingress's clock; hyper adds its own) and `Server`
/// (the ingress is the server the client talks to), as a reverse proxy
/// hides its upstream's `Date` and `Server` (nginx's `proxy_hide_header`
/// default). Before, all three passed through, and a function's `Date`
/// replaced the ingress's (two made two `Date` lines).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_functions_reply_cannot_set_the_headers_the_ingress_owns() {
    let srv = Server::default().await;
    *srv.upstream.reply_headers.lock().unwrap() = vec![
        ("x-dne-error", "function_failed"),
        ("date", "Thu, 01 Jan 1970 00:00:00 GMT"),
        ("Date", "Fri, 02 Jan 1970 00:00:00 GMT"),
        ("server", "not-the-ingress"),
        ("x-app", "kept"),
    ];
    let mut c = Client::connect(srv.addr).await;
    let (st, h, body) = c.post("/echo", b"abc").await;
    assert_eq!((st, body.as_slice()), (StatusCode::OK, &b"abc"[..]));
    assert_eq!(h.get("x-app").unwrap(), "kept", "{h:?}");
    assert!(h.get("x-dne-error").is_none(), "{h:?}");
    assert!(h.get("server").is_none(), "{h:?}");
    let dates: Vec<_> = h.get_all("date").iter().collect();
    assert_eq!(dates.len(), 1, "{h:?}");
    assert!(!dates[0].to_str().unwrap().contains("1970"), "{h:?}");
    srv.assert_no_leak().await;
    srv.stop().await;
}
/// A 205 (Reset Content) reply goes out without content, whatever body the
/// function gave it: RFC 9110 15.3.6 has a server generate none ("the 205
/// status code implies that no additional content will be provided"), and
/// a client that reads it so would take the body for the start of the
/// next response. Before, the function's body went out with its length.
/// The connection serves on.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_205_reply_goes_out_without_content() {
    let srv = Server::default().await;
    c_status(&srv, 205);
    let mut s = TcpStream::connect(srv.addr).await.unwrap();
    s.write_all(b"POST /echo HTTP/1.1\r\nHost: x\r\nContent-Length: 3\r\n\r\nabc").await.unwrap();
    let (st, head, body) = read_response(&mut s).await;
    assert_eq!((st, body.as_slice()), (205, &b""[..]), "{head}");
    assert!(head.to_ascii_lowercase().contains("\r\ncontent-length: 0\r\n"), "{head}");
    c_status(&srv, 0);
    s.write_all(b"POST /echo HTTP/1.1\r\nHost: x\r\nContent-Length: 2\r\n\r\nok").await.unwrap();
    let (st, head, body) = read_response(&mut s).await;
    assert_eq!((st, body.as_slice()), (200, &b"ok"[..]), "{head}");
    // A reply is counted once it is written, before its buffers go back.
    srv.assert_no_leak().await;
    assert_eq!(metric(&srv, r#"dne_ingress_response_body_bytes_total{tenant="open"}"#), Some(2));
    srv.stop().await;
}

/// A function's reply cannot frame the response: its `Content-Length`,
/// `Transfer-Encoding`, `Trailer`, `Connection` and `Keep-Alive` are not
/// passed on, and the edge frames the body by its real length (hyper writes
/// a `Content-Length` header it is given as it is, trusting it to match the
/// body: passed on, a function's would desynchronise the connection). The
/// same for a 204, which goes out with no length and no body. A request
/// pipelined behind each is answered as itself.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_functions_reply_cannot_frame_the_response() {
    let srv = Server::default().await;
    *srv.upstream.reply_headers.lock().unwrap() = vec![
        ("Content-Length", "999"),
        ("transfer-encoding", "gzip, chunked"),
        ("trailer", "x-t"),
        ("connection", "close"),
        ("keep-alive", "timeout=1"),
    ];
    let mut s = TcpStream::connect(srv.addr).await.unwrap();
    let two = b"POST /echo HTTP/1.1\r\nHost: x\r\nContent-Length: 3\r\n\r\nabc\
                POST /echo HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\n\r\nhello";
    s.write_all(two).await.unwrap();
    for ((st, head, body), want) in read_responses(&mut s, 2).await.into_iter().zip([&b"abc"[..], b"hello"]) {
        assert_eq!((st, body.as_slice()), (200, want), "{head}");
        let lower = head.to_ascii_lowercase();
        assert!(lower.contains(&format!("\r\ncontent-length: {}\r\n", want.len())), "{head}");
        for gone in ["999", "transfer-encoding", "trailer", "connection", "keep-alive"] {
            assert!(!lower.contains(gone), "{gone}: {head}");
        }
    }
    c_status(&srv, 204);
    s.write_all(two).await.unwrap();
    for (st, head, body) in read_responses(&mut s, 2).await {
        assert_eq!((st, body.as_slice()), (204, &b""[..]), "{head}");
        let lower = head.to_ascii_lowercase();
        assert!(!lower.contains("content-length") && !lower.contains("transfer-encoding"), "{head}");
    }
    c_status(&srv, 0);
    srv.upstream.reply_headers.lock().unwrap().clear();
    s.write_all(b"POST /echo HTTP/1.1\r\nHost: x\r\nContent-Length: 2\r\n\r\nok").await.unwrap();
    let (st, head, body) = read_response(&mut s).await;
    assert_eq!((st, body.as_slice()), (200, &b"ok"[..]), "{head}");
    srv.assert_no_leak().await;
    srv.stop().await;
}

/// A reply whose head has a header name or value that is not valid HTTP
/// (a space or colon in a name; CR, LF, NUL or DEL in a value: what would
/// split the response or inject a header) is not sent on: the client gets
/// 502, the reply is counted as `bad_reply`, nothing of its head reaches
/// the client, and the connection serves on.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reply_with_a_header_that_is_not_valid_http_gets_502_and_is_counted() {
    let srv = Server::default().await;
    *srv.upstream.reply_headers.lock().unwrap() = vec![("x-name", "vvvvvvvvvv")];
    let bad: [(&[u8], &[u8]); 6] = [
        (b"x-name", b"x name"),
        (b"x-name", b"x:name"),
        (b"vvvvvvvvvv", b"a\r\nset-x:1"),
        (b"vvvvvvvvvv", b"a\nset-x: 1"),
        (b"vvvvvvvvvv", b"vvvv\0vvvvv"),
        (b"vvvvvvvvvv", b"vvvv\x7fvvvvv"),
    ];
    let mut s = TcpStream::connect(srv.addr).await.unwrap();
    for (i, patch) in bad.into_iter().enumerate() {
        *srv.upstream.reply_patch.lock().unwrap() = patch;
        s.write_all(b"POST /echo HTTP/1.1\r\nHost: x\r\nContent-Length: 3\r\n\r\nabc").await.unwrap();
        let (st, head, body) = read_response(&mut s).await;
        let what = String::from_utf8_lossy(patch.1);
        assert_eq!(st, 502, "{what:?}: {head}{}", String::from_utf8_lossy(&body));
        assert!(!head.contains("x-name") && !head.contains("set-x") && !head.contains("vvvv"), "{what:?}: {head}");
        let bad_replies = metric(&srv, r#"dne_ingress_rejections_total{tenant="open",reason="bad_reply"}"#);
        assert_eq!(bad_replies, Some(i as u64 + 1), "{what:?}");
    }
    // The same head, valid, goes through.
    *srv.upstream.reply_patch.lock().unwrap() = (b"", b"");
    s.write_all(b"POST /echo HTTP/1.1\r\nHost: x\r\nContent-Length: 2\r\n\r\nok").await.unwrap();
    let (st, head, body) = read_response(&mut s).await;
    assert_eq!((st, body.as_slice()), (200, &b"ok"[..]), "{head}");
    assert!(head.contains("x-name: vvvvvvvvvv\r\n"), "{head}");
    srv.assert_no_leak().await;
    srv.stop().await;
}

/// An HTTP/1.0 client that asks for keep-alive is answered in HTTP/1.0,
/// with `Connection: keep-alive` when the connection stays open (it serves
/// the next request) and with `Connection: close` alone when it closes
/// after the answer (one given before a large body was read, a 413, a
/// 400). Before, the closing answers said `Connection: close, keep-alive`
/// (hyper appends `keep-alive` for such a client to an answer marked
/// HTTP/1.1 that lacks it, then closes anyway): a client that looks for
/// `keep-alive` (HTTP/1.0 persistence; ApacheBench's `-k` does) sends its
/// next request into a connection the server is closing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_http10_keep_alive_client_is_told_close_alone_when_the_connection_closes() {
    let srv = Server::default().await;
    for (req, code) in [
        (&b"POST /nowhere HTTP/1.0\r\nConnection: keep-alive\r\nContent-Length: 100000\r\n\r\nabc"[..], 404),
        (b"POST /echo HTTP/1.0\r\nConnection: keep-alive\r\nContent-Length: 2000000\r\n\r\nabc", 413),
        (b"POST /echo/../x HTTP/1.0\r\nConnection: keep-alive\r\nContent-Length: 3\r\n\r\nabc", 400),
    ] {
        let what = String::from_utf8_lossy(&req[..30]).to_string();
        let mut s = TcpStream::connect(srv.addr).await.unwrap();
        s.write_all(req).await.unwrap();
        let (st, head, _) = read_response(&mut s).await;
        assert_eq!(st, code, "{what}: {head}");
        assert!(head.starts_with("HTTP/1.0 "), "{what}: {head}");
        let lower = head.to_ascii_lowercase();
        assert!(lower.contains("\r\nconnection: close\r\n") && !lower.contains("keep-alive"), "{what}: {head}");
        assert_eq!(read_to_close(&mut s).await.unwrap(), b"", "{what}");
    }
    // An answer after which the connection stays open says keep-alive, and
    // the connection serves on.
    let mut s = TcpStream::connect(srv.addr).await.unwrap();
    for req in [
        &b"POST /nowhere HTTP/1.0\r\nConnection: keep-alive\r\nContent-Length: 3\r\n\r\nabc"[..],
        b"POST /echo HTTP/1.0\r\nConnection: keep-alive\r\nContent-Length: 2\r\n\r\nok",
    ] {
        s.write_all(req).await.unwrap();
        let (_, head, _) = read_response(&mut s).await;
        assert!(head.starts_with("HTTP/1.0 "), "{head}");
        assert!(head.to_ascii_lowercase().contains("\r\nconnection: keep-alive\r\n"), "{head}");
    }
    srv.assert_no_leak().await;
    srv.stop().await;
}

/// A segment that is `.` or `..` before a `;` (`..;`, `..;x=1`, `.;`,
/// also escaped) gets 400 like a `.` or `..` segment. RFC 3986 does not
/// make `..;` a dot segment (`;` is data in a segment), but servlet
/// containers (Tomcat, Jetty) take what follows a `;` in a segment for
/// path parameters and drop it before they resolve dot segments, so to
/// them `/echo/..;/chain` is `/chain` while the edge routed it by
/// `/echo` (the `..;/` bypass of a proxy's path rules).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dot_segment_with_path_parameters_is_refused() {
    let srv = Server::default().await;
    for path in [
        "/echo/..;/chain",
        "/echo/..;x=1/chain",
        "/echo/.;/x",
        "/echo/x/..;",
        "/echo/%2e%2e%3b/chain",
        "/echo/..%3Bx/y",
    ] {
        let req = format!("POST {path} HTTP/1.1\r\nHost: x\r\nContent-Length: 3\r\n\r\nabc");
        let (st, head, body) = raw(srv.addr, req.as_bytes()).await;
        assert_eq!(st, 400, "{path}: {head}{}", String::from_utf8_lossy(&body));
    }
    // A `;` elsewhere is data.
    for path in ["/echo/a;..", "/echo/;/x", "/echo/...;x", "/echo/x;y=1"] {
        let req = format!("POST {path} HTTP/1.1\r\nHost: x\r\nContent-Length: 3\r\n\r\nabc");
        let (st, head, body) = raw(srv.addr, req.as_bytes()).await;
        assert_eq!((st, body.as_slice()), (200, &b"abc"[..]), "{path}: {head}");
    }
    srv.assert_no_leak().await;
    srv.stop().await;
}

/// The header fields a reply's `Connection` names are hop-by-hop for that
/// reply (RFC 9110 7.6.1): the ingress, a proxy, removes them with the
/// `Connection` field itself. Before, only `Connection` and the fixed list
/// of hop-by-hop fields were removed, and `x-hop` below reached the client.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_headers_a_replys_connection_names_are_not_passed_on() {
    let srv = Server::default().await;
    *srv.upstream.reply_headers.lock().unwrap() = vec![
        ("connection", "X-Hop, ,x-other ,"),
        ("x-hop", "1"),
        ("x-other", "2"),
        ("x-hop", "3"),
        ("Connection", "x-third"),
        ("x-third", "4"),
        ("x-app", "kept"),
        ("x-hopper", "kept too"),
    ];
    let mut c = Client::connect(srv.addr).await;
    let (st, h, body) = c.post("/echo", b"abc").await;
    assert_eq!((st, body.as_slice()), (StatusCode::OK, &b"abc"[..]));
    for gone in ["x-hop", "x-other", "x-third", "connection"] {
        assert!(h.get(gone).is_none(), "{gone}: {h:?}");
    }
    assert_eq!(h.get("x-app").unwrap(), "kept", "{h:?}");
    assert_eq!(h.get("x-hopper").unwrap(), "kept too", "{h:?}");
    // The connection serves on, and a reply with no Connection is whole.
    srv.upstream.reply_headers.lock().unwrap().clear();
    let (st, h, body) = c.post("/echo", b"again").await;
    assert_eq!((st, body.as_slice()), (StatusCode::OK, &b"again"[..]));
    assert_eq!(h.get("content-type").unwrap(), "text/x-test", "{h:?}");
    srv.assert_no_leak().await;
    srv.stop().await;
}

/// The header fields a request's `Connection` names are hop-by-hop for
/// that request (RFC 9110 7.6.1) and are not forwarded to the function,
/// even those the ingress forwards otherwise (`FORWARDED_HEADERS`). The
/// ingress's own `x-forwarded-for` is kept whatever the client names.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_headers_a_requests_connection_names_are_not_forwarded() {
    let srv = Server::default().await;
    let mut s = TcpStream::connect(srv.addr).await.unwrap();
    s.write_all(
        b"POST /echo HTTP/1.1\r\nHost: x\r\nConnection: keep-alive, X-Request-Id\r\nx-request-id: r1\r\n\
          User-Agent: ua\r\nconnection: user-agent ,x-forwarded-for\r\nAccept: a/b\r\n\
          Content-Type: text/x-test\r\nContent-Length: 3\r\n\r\nabc",
    )
    .await
    .unwrap();
    let (st, head, body) = read_response(&mut s).await;
    assert_eq!((st, body.as_slice()), (200, &b"abc"[..]), "{head}");
    let names = |hs: &[(Vec<u8>, Vec<u8>)]| {
        hs.iter().map(|(n, v)| format!("{}: {}", String::from_utf8_lossy(n), String::from_utf8_lossy(v))).collect()
    };
    let seen: Vec<String> = names(&srv.upstream.last_headers.lock().unwrap());
    assert_eq!(seen, ["content-type: text/x-test", "accept: a/b", "x-forwarded-for: 127.0.0.1"]);
    // Without a Connection field, they are forwarded.
    s.write_all(b"POST /echo HTTP/1.1\r\nHost: x\r\nx-request-id: r2\r\nUser-Agent: ua\r\nContent-Length: 2\r\n\r\nok")
        .await
        .unwrap();
    let (st, head, _) = read_response(&mut s).await;
    assert_eq!(st, 200, "{head}");
    let seen: Vec<String> = names(&srv.upstream.last_headers.lock().unwrap());
    assert_eq!(seen, ["user-agent: ua", "x-request-id: r2", "x-forwarded-for: 127.0.0.1"]);
    srv.assert_no_leak().await;
    srv.stop().await;
}

/// hyper's own answers to a head it cannot parse (400 for a malformed
/// request line or header, 431 for a head over its buffer) close the
/// connection through the same lingering close as the edge's early
/// answers: a client still sending after such a head can read the answer,
/// go on sending, and see the connection end with the server's FIN.
/// Closed with the client's bytes unread, the socket would be reset, and
/// the client's writes, or its reads, would fail.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hypers_own_error_answers_close_without_a_reset() {
    let srv = Server::default().await;
    let long_head = format!("GET /echo HTTP/1.1\r\nHost: x\r\nx-long: {}", "h".repeat(500 << 10));
    for (head, code) in [
        ("POST /echo HTTP/1.1 extra\r\nHost: x\r\nContent-Length: 2000000\r\n\r\n".to_owned(), "400"),
        ("POST /echo HTTP/1.1\r\nHost: x\r\nBad Header\r\nContent-Length: 2000000\r\n\r\n".to_owned(), "400"),
        (long_head, "431"),
    ] {
        let what = &head[..30];
        let mut s = TcpStream::connect(srv.addr).await.unwrap();
        // The head and the first 64 KiB after it in one write: the server
        // has bytes unread when it answers.
        let mut first = head.clone().into_bytes();
        first.extend_from_slice(&[b'z'; 64 << 10]);
        s.write_all(&first).await.unwrap();
        // The answer (hyper's carry no body).
        let mut got = Vec::new();
        let mut chunk = [0u8; 4096];
        while !got.windows(4).any(|w| w == b"\r\n\r\n") {
            match tokio::time::timeout(Duration::from_secs(20), s.read(&mut chunk)).await.expect("no answer") {
                Ok(0) => panic!("{what}: closed before an answer: {:?}", String::from_utf8_lossy(&got)),
                Ok(n) => got.extend_from_slice(&chunk[..n]),
                Err(e) => panic!("{what}: reading the answer: {e}"),
            }
        }
        let text = String::from_utf8_lossy(&got);
        assert!(text.starts_with(&format!("HTTP/1.1 {code} ")), "{what}: {text:?}");
        // The client goes on sending (192 KiB more), as one that writes
        // all of its request before it reads would.
        let piece = [b'z'; 4096];
        let mut sent = 0;
        let mut failed = None;
        while sent < 192 << 10 {
            if let Err(e) = s.write_all(&piece).await {
                failed = Some(e);
                break;
            }
            sent += piece.len();
        }
        assert!(failed.is_none(), "{what}: sending failed after {sent} more bytes: {failed:?}");
        // The connection ends with the server's FIN, not a reset.
        let end = read_to_close(&mut s).await;
        assert!(matches!(&end, Ok(rest) if rest.is_empty()), "{what}: {end:?}");
    }
    srv.assert_no_leak().await;
    srv.stop().await;
}

/// With `half_close`, a client that closes entirely once its request is
/// sent is not seen to leave: its chain runs, and the answer goes into a
/// closed socket. Such requests are still bounded by their route's
/// timeout, and once their chains are done they hold no buffer, no
/// request is counted in flight and no connection is counted open.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn many_clients_that_close_after_sending_their_request_leave_nothing_behind() {
    let srv = Server::start(512, InProcessConfig { workers: 4, ..Default::default() }).await;
    let mut tasks = Vec::new();
    for i in 0..200 {
        // Four of them on a route whose chain takes longer than its
        // timeout; the rest on quick ones.
        let path = match i % 50 {
            0 => "/slow",
            n if n % 2 == 0 => "/chain",
            _ => "/echo",
        };
        let addr = srv.addr;
        tasks.push(tokio::spawn(async move {
            let mut s = TcpStream::connect(addr).await.unwrap();
            let body = random_bytes(1000 + i * 37, i as u64);
            let mut req =
                format!("POST {path} HTTP/1.1\r\nHost: x\r\nContent-Length: {}\r\n\r\n", body.len()).into_bytes();
            req.extend_from_slice(&body);
            s.write_all(&req).await.unwrap();
        }));
    }
    for t in tasks {
        tokio::time::timeout(Duration::from_secs(20), t).await.unwrap().unwrap();
    }
    srv.assert_no_leak().await;
    until(|| metric(&srv, "dne_ingress_connections ") == Some(0), || srv.ingress.metrics_text()).await;
    // Every request was answered, and those on `/slow` at its timeout
    // (504), not when their chain ended.
    let code = |route: &str, code: u16| {
        metric(&srv, &format!(r#"dne_ingress_requests_total{{route="{route}",tenant="open",code="{code}"}}"#))
    };
    assert_eq!(code("/slow", 504), Some(4), "{}", srv.ingress.metrics_text());
    assert_eq!(code("/chain", 200).unwrap_or(0) + code("/echo", 200).unwrap_or(0), 196);
    // The server is still fine.
    let mut c = Client::connect(srv.addr).await;
    assert_eq!(c.post("/echo", b"still here").await.2, b"still here");
    srv.stop().await;
}

/// A `Host` is held to RFC 3986's authority syntax (`host [":" port]`)
/// and to what an `http` URI may name (RFC 9110 4.2.1): a host that is
/// empty (`Host: :80`, `Host:`, in HTTP/1.1 and HTTP/1.0 alike), only
/// dots, or has percent-escapes (`%73pecial.example`: no DNS name has one,
/// and a proxy in front that undoes them routes the request to
/// `special.example` while the edge, comparing the bytes, routed it to a
/// route naming no host), a port beyond 65535, and an unclosed IP literal
/// are refused with 400, as is an absolute-form target's authority with
/// them. Before, all but the last were routed as a request to no host in
/// particular. An empty port (RFC 3986 3.2.3) and a bracketed IPv6
/// literal with a port pass. `special.example/echo` reverses the body,
/// `/echo` on any other host echoes it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_host_that_is_empty_escaped_or_out_of_range_is_refused() {
    let srv = Server::default().await;
    let mut refused = 0;
    for version in ["HTTP/1.1", "HTTP/1.0"] {
        for host in [
            "Host: :80\r\n",
            "Host:\r\n",
            "Host: \r\n",
            "Host: .\r\n",
            "Host: %73pecial.example\r\n",
            "Host: %78\r\n",
            "Host: example.com:99999\r\n",
            "Host: example.com:65536\r\n",
            "Host: [::1\r\n",
        ] {
            let req = format!("POST /echo {version}\r\n{host}Content-Length: 3\r\n\r\nabc");
            let (st, head, body) = raw(srv.addr, req.as_bytes()).await;
            assert_eq!(st, 400, "{version} {host:?}: {head}{}", String::from_utf8_lossy(&body));
            refused += 1;
        }
        for (host, want) in [
            ("Host: example.com:\r\n", &b"abc"[..]),
            ("Host: special.example:\r\n", b"cba"),
            ("Host: example.com:65535\r\n", b"abc"),
            ("Host: example.com:00080\r\n", b"abc"),
            ("Host: [::1]:80\r\n", b"abc"),
            ("Host: [::1]\r\n", b"abc"),
        ] {
            let req = format!("POST /echo {version}\r\n{host}Content-Length: 3\r\n\r\nabc");
            let (st, head, body) = raw(srv.addr, req.as_bytes()).await;
            assert_eq!((st, body.as_slice()), (200, want), "{version} {host:?}: {head}");
        }
    }
    // hyper's own URI parser refuses the escape in an authority (its 400
    // is counted when the connection closes); the edge refuses the rest.
    for target in ["http://%73pecial.example/echo", "http://x:99999/echo", "http://./echo"] {
        let req = format!("POST {target} HTTP/1.1\r\nHost: x\r\nContent-Length: 3\r\n\r\nabc");
        let (st, head, body) = raw(srv.addr, req.as_bytes()).await;
        assert_eq!(st, 400, "{target}: {head}{}", String::from_utf8_lossy(&body));
        refused += 1;
    }
    let req = b"POST http://special.example:/echo HTTP/1.1\r\nHost: x\r\nContent-Length: 3\r\n\r\nabc";
    let (st, head, body) = raw(srv.addr, req).await;
    assert_eq!((st, body.as_slice()), (200, &b"cba"[..]), "{head}");
    srv.assert_no_leak().await;
    until(
        || metric(&srv, r#"dne_ingress_requests_total{route="",tenant="",code="400"}"#) == Some(refused),
        || format!("{refused} refused: {}", srv.ingress.metrics_text()),
    )
    .await;
    srv.stop().await;
}

/// An HTTP/1.0 request's `Expect: 100-continue` is ignored (RFC 9110
/// 10.1.1: a server MUST ignore it in an HTTP/1.0 request, and such a
/// client does not wait for `100 Continue`). An early answer (404, 401)
/// to one with a small body reads and discards the body and keeps the
/// connection, as without `Expect`; before, the edge took the client for
/// one waiting, left the body unread and closed the connection. No
/// `100 Continue` is sent to an HTTP/1.0 client, routed or not.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_http10_request_with_expect_100_continue_is_answered_as_without_it() {
    let srv = Server::default().await;
    let mut s = TcpStream::connect(srv.addr).await.unwrap();
    for (target, code) in [("/nowhere", 404), ("/acme", 401)] {
        let req = format!(
            "POST {target} HTTP/1.0\r\nConnection: keep-alive\r\nExpect: 100-continue\r\nContent-Length: 10\r\n\r\n\
             0123456789"
        );
        s.write_all(req.as_bytes()).await.unwrap();
        let (st, head, _) = read_response(&mut s).await;
        assert_eq!(st, code, "{target}: {head}");
        let lower = head.to_ascii_lowercase();
        assert!(lower.contains("\r\nconnection: keep-alive\r\n") && !lower.contains("close"), "{target}: {head}");
    }
    // The same connection serves on; a routed request gets no 100 Continue
    // before its body is sent, only its answer after.
    s.write_all(b"POST /echo HTTP/1.0\r\nConnection: keep-alive\r\nExpect: 100-continue\r\nContent-Length: 2\r\n\r\n")
        .await
        .unwrap();
    let mut early = [0u8; 64];
    let got = tokio::time::timeout(Duration::from_millis(300), s.read(&mut early)).await;
    assert!(
        got.is_err(),
        "the server sent {:?} before the body",
        got.map(|n| String::from_utf8_lossy(&early[..n.unwrap()]).to_string())
    );
    s.write_all(b"ok").await.unwrap();
    let (st, head, body) = read_response(&mut s).await;
    assert_eq!((st, body.as_slice()), (200, &b"ok"[..]), "{head}");
    srv.assert_no_leak().await;
    srv.stop().await;
}

/// `HEAD /metrics` is answered like `GET /metrics` without the body (RFC
/// 9110 9.3.2), on the HTTP listener when there is no admin listener and
/// on the admin listener when there is; before, it got 404 (no route) on
/// both. The `Content-Length` of the HEAD answer, if any, is the GET's,
/// and no body follows it: the connection serves on.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn head_metrics_is_answered_like_get_without_the_body() {
    async fn get_then_head(addr: SocketAddr) {
        let mut s = TcpStream::connect(addr).await.unwrap();
        s.write_all(b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n").await.unwrap();
        let (st, get, body) = read_response(&mut s).await;
        assert_eq!(st, 200, "{get}");
        assert!(String::from_utf8_lossy(&body).contains("dne_ingress_requests"), "{get}");
        s.write_all(b"HEAD /metrics HTTP/1.1\r\nHost: x\r\n\r\nGET /nowhere-either HTTP/1.1\r\nHost: x\r\n\r\n")
            .await
            .unwrap();
        // The HEAD answer is read as a head alone (its length, if any,
        // frames no body), then the next answer.
        let mut buf = Vec::new();
        let mut chunk = [0u8; 65536];
        let count = |b: &[u8]| b.windows(4).filter(|w| w == b"\r\n\r\n").count();
        while count(&buf) < 2 {
            let n = tokio::time::timeout(Duration::from_secs(20), s.read(&mut chunk)).await.unwrap().unwrap();
            assert!(n > 0, "closed: {:?}", String::from_utf8_lossy(&buf));
            buf.extend_from_slice(&chunk[..n]);
        }
        let text = String::from_utf8_lossy(&buf).to_string();
        let (head, next) = text.split_once("\r\n\r\n").unwrap();
        assert!(head.starts_with("HTTP/1.1 200 "), "{head}");
        let field = |h: &str, name: &str| {
            h.lines().find_map(|l| l.to_ascii_lowercase().strip_prefix(name).map(|v| v.trim().to_owned()))
        };
        assert_eq!(field(head, "content-type:"), field(&get, "content-type:"), "{head}");
        if let Some(len) = field(head, "content-length:") {
            assert_eq!(Some(len), field(&get, "content-length:"), "{head}\n{get}");
        }
        assert!(next.starts_with("HTTP/1.1 404 "), "a body came after the HEAD answer: {next:?}");
    }
    let srv = Server::default().await;
    get_then_head(srv.addr).await;
    srv.stop().await;

    // With an admin listener, which serves the metrics alone.
    let srv = Server::default().await;
    let (http, admin) =
        (TcpListener::bind("127.0.0.1:0").await.unwrap(), TcpListener::bind("127.0.0.1:0").await.unwrap());
    let admin_addr = admin.local_addr().unwrap();
    let (tx, rx) = tokio::sync::oneshot::channel::<()>();
    let served = tokio::spawn(srv.ingress.clone().serve(http, Some(admin), async move {
        let _ = rx.await;
    }));
    get_then_head(admin_addr).await;
    let _ = tx.send(());
    tokio::time::timeout(Duration::from_secs(20), served).await.unwrap().unwrap().unwrap();
    srv.stop().await;
}

/// hyper answers 400 itself to a request it cannot parse (an absolute-form
/// target whose authority has a percent-escape, a header line without a
/// colon), before the edge sees it. Those answers are counted under no
/// route like the edge's own 400s (before, they were not counted at all).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hypers_own_400_answers_are_counted() {
    let srv = Server::default().await;
    let series = r#"dne_ingress_requests_total{route="",tenant="",code="400"}"#;
    let reqs =
        [&b"GET http://a%41b/ HTTP/1.1\r\nHost: x\r\n\r\n"[..], b"GET /echo HTTP/1.1\r\nHost: x\r\nBad Header\r\n\r\n"];
    for (want, req) in (1..).zip(reqs) {
        let (st, head, _) = raw(srv.addr, req).await;
        assert_eq!(st, 400, "{head}");
        // Counted when hyper ends the connection (the client closed it).
        until(
            || metric(&srv, series).unwrap_or(0) == want,
            || format!("{:?}: {}", String::from_utf8_lossy(req), srv.ingress.metrics_text()),
        )
        .await;
    }
    // A head over hyper's buffer: 431.
    let long_head = format!("GET /echo HTTP/1.1\r\nHost: x\r\nx-long: {}\r\n\r\n", "h".repeat(500 << 10));
    let (st, head, _) = raw(srv.addr, long_head.as_bytes()).await;
    assert_eq!(st, 431, "{head}");
    until(
        || metric(&srv, r#"dne_ingress_requests_total{route="",tenant="",code="431"}"#) == Some(1),
        || srv.ingress.metrics_text(),
    )
    .await;
    srv.stop().await;
}

/// hyper answers 414 itself to a request line whose target is over its
/// limit (64 KiB), before the edge sees it; the edge tells that answer
/// from hyper's 431 by hyper's error text, so this pins the text: the
/// client gets 414 and it is counted under no route with code 414 (a
/// hyper that words the error otherwise would count it as 431).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hypers_own_414_answers_are_counted_as_414() {
    let srv = Server::default().await;
    let req = format!("GET /echo?{} HTTP/1.1\r\nHost: x\r\n\r\n", "q".repeat(70_000));
    let (st, head, _) = raw(srv.addr, req.as_bytes()).await;
    assert_eq!(st, 414, "{head}");
    // Counted when hyper ends the connection (the client closed it).
    until(
        || metric(&srv, r#"dne_ingress_requests_total{route="",tenant="",code="414"}"#) == Some(1),
        || srv.ingress.metrics_text(),
    )
    .await;
    assert_eq!(metric(&srv, r#"dne_ingress_requests_total{route="",tenant="",code="431"}"#), None);
    srv.stop().await;
}

/// A client whose request the edge answers early and closes
/// (`Connection: close`, its large body unread), and which goes on
/// sending a few bytes every 50 ms and reads nothing: the server lingers
/// on it (up to 2 s). Returns once the client has read the answer and the
/// server's end of stream (lingering has begun), with the task that goes
/// on sending; it ends when a write fails (the server closed the
/// connection for good).
async fn lingering_client(addr: SocketAddr) -> tokio::task::JoinHandle<std::io::Error> {
    let mut s = TcpStream::connect(addr).await.unwrap();
    s.write_all(b"POST /nowhere HTTP/1.1\r\nHost: x\r\nContent-Length: 1000000\r\n\r\nsome").await.unwrap();
    let (st, head, _) = read_response(&mut s).await;
    assert_eq!(st, 404, "{head}");
    assert!(head.to_ascii_lowercase().contains("connection: close"), "{head}");
    let (mut rd, mut wr) = s.into_split();
    let mut rest = Vec::new();
    // The server's end of stream (or a reset, when it did not linger).
    let _ = tokio::time::timeout(Duration::from_secs(20), rd.read_to_end(&mut rest)).await.unwrap();
    tokio::spawn(async move {
        let _rd = rd;
        loop {
            if let Err(e) = wr.write_all(b"more").await {
                return e;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    })
}

/// A connection the server is closing with a lingering close holds no
/// `max_connections` slot: with one slot, the next client is served while
/// the first still lingers (before, it was refused 503 for up to 2 s).
/// Lingering connections have a bound of their own (here one): one more
/// is closed at once, without lingering.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lingering_close_holds_no_connection_slot() {
    let srv = Server::start_with(512, InProcessConfig::default(), |s| s.max_connections = 1).await;
    let first = lingering_client(srv.addr).await;
    let (st, head, body) = raw(srv.addr, b"POST /echo HTTP/1.1\r\nHost: x\r\nContent-Length: 2\r\n\r\nok").await;
    assert_eq!((st, body.as_slice()), (200, &b"ok"[..]), "{head}");
    assert!(!first.is_finished(), "the first connection stopped lingering");
    assert_eq!(metric(&srv, "dne_ingress_connections_lingering "), Some(1));
    // A second lingering one, beyond the bound: closed for good at once,
    // while the first still lingers. (Once the last client's connection
    // has given its slot back.)
    until(|| metric(&srv, "dne_ingress_connections ") == Some(0), || srv.ingress.metrics_text()).await;
    let second = lingering_client(srv.addr).await;
    let e = tokio::time::timeout(Duration::from_secs(20), second).await.unwrap().unwrap();
    assert!(!first.is_finished(), "the first connection stopped lingering before the second was closed ({e})");
    tokio::time::timeout(Duration::from_secs(20), first).await.unwrap().unwrap();
    until(|| metric(&srv, "dne_ingress_connections_lingering ") == Some(0), || srv.ingress.metrics_text()).await;
    srv.assert_no_leak().await;
    srv.stop().await;
}

/// A client that closes its connection once its request is sent cannot
/// be told from one that only shut its sending side (see
/// `a_client_that_half_closes_after_its_request_still_gets_its_answer`),
/// so its chain runs; but when writing the answer then fails (1 MiB here:
/// the first write draws the client's reset, the next fails), the request
/// is counted as `client_gone`, not by its status (before: a 200).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_answer_whose_write_fails_counts_as_client_gone() {
    let srv = Server::default().await;
    let body = random_bytes(1 << 20, 5);
    let mut req = format!("POST /patient HTTP/1.1\r\nHost: x\r\nContent-Length: {}\r\n\r\n", body.len()).into_bytes();
    req.extend_from_slice(&body);
    let mut s = TcpStream::connect(srv.addr).await.unwrap();
    s.write_all(&req).await.unwrap();
    drop(s);
    // Until the request is in the chain (the upstream has seen it).
    until(|| !srv.upstream.xff.lock().unwrap().is_empty(), || "the request never arrived").await;
    srv.assert_no_leak().await;
    let gone = metric(&srv, r#"dne_ingress_rejections_total{tenant="open",reason="client_gone"}"#);
    let ok = metric(&srv, r#"dne_ingress_requests_total{route="/patient",tenant="open",code="200"}"#);
    assert_eq!((gone, ok.unwrap_or(0)), (Some(1), 0), "{}", srv.ingress.metrics_text());
    // The server is still fine.
    let mut c = Client::connect(srv.addr).await;
    assert_eq!(c.post("/echo", b"still here").await.2, b"still here");
    srv.stop().await;
}

/// A reply still being written when `shutdown_grace` has passed never
/// reaches the client: `serve` stops its connection before it returns, and
/// the request counts as `client_gone`, not by its status, with the
/// reply's buffers back in the pool by then (before, both waited for the
/// runtime to be dropped). No I/O error is seen then; the connection is
/// only dropped.
#[test]
fn a_reply_cut_off_at_shutdown_counts_as_client_gone() {
    let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap();
    let ok = r#"dne_ingress_requests_total{route="/echo",tenant="open",code="200"}"#;
    let (ingress, seen) = rt.block_on(async {
        let srv = Server::start_with(512, InProcessConfig::default(), |s| {
            s.shutdown_grace = Duration::from_millis(200);
        })
        .await;
        // A client that pipelines eight 1 MiB echoes and reads nothing:
        // the kernel takes the first replies (up to its 4 MiB send buffer
        // and the client's small receive buffer), and the next one stays
        // in hyper's hands.
        let socket = tokio::net::TcpSocket::new_v4().unwrap();
        socket.set_recv_buffer_size(4096).unwrap();
        let mut s = socket.connect(srv.addr).await.unwrap();
        tokio::spawn(async move {
            for i in 0..8 {
                let body = random_bytes(1 << 20, i);
                let mut req =
                    format!("POST /echo HTTP/1.1\r\nHost: x\r\nContent-Length: {}\r\n\r\n", body.len()).into_bytes();
                req.extend_from_slice(&body);
                s.write_all(&req).await.unwrap();
            }
            std::future::pending::<()>().await;
        });
        // Until a reply is stuck: every request the chain saw but the
        // last is answered, that one is no longer in flight, and nothing
        // has moved for 100 ms.
        let (ingress, upstream) = (srv.ingress.clone(), srv.upstream.clone());
        let state = || {
            let seen = upstream.xff.lock().unwrap().len() as u64;
            let text = ingress.metrics_text();
            let series = |s: &str| text.lines().find_map(|l| l.strip_prefix(s)?.trim().parse::<u64>().ok());
            let stuck = seen > 0
                && series(r#"dne_ingress_in_flight{tenant="open"}"#) == Some(0)
                && series(ok).unwrap_or(0) == seen - 1;
            stuck.then_some(seen)
        };
        let mut last = (None, Instant::now());
        until(
            || {
                let now = state();
                if now != last.0 {
                    last = (now, Instant::now());
                }
                now.is_some() && last.1.elapsed() >= Duration::from_millis(100)
            },
            || ingress.metrics_text(),
        )
        .await;
        let seen = last.0.unwrap();
        let pool = ingress.pools().get(0).unwrap().clone();
        assert!(pool.free_buffers() < pool.capacity(), "no reply held: {}", ingress.metrics_text());
        srv.stop().await;
        (ingress, seen)
    });
    let pool = ingress.pools().get(0).unwrap().clone();
    let text = ingress.metrics_text();
    let series = |s: &str| text.lines().find_map(|l| l.strip_prefix(s)?.trim().parse::<u64>().ok());
    let gone = series(r#"dne_ingress_rejections_total{tenant="open",reason="client_gone"}"#);
    assert_eq!((gone, series(ok).unwrap_or(0)), (Some(1), seen - 1), "{text}");
    assert_eq!(pool.free_buffers(), pool.capacity());
    drop(rt);
}

/// When `shutdown_grace` passes with requests still in progress, `serve`
/// stops their connections before it returns: on a runtime that lives on,
/// a connection whose request is in its chain and one whose body is still
/// coming are closed with no answer, and both requests count as
/// `client_gone` by then. (Before, `serve` returned and left both
/// connections served: the first was answered 200 once its chain was done,
/// the second 408 at the body timeout.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connections_still_open_when_the_grace_expires_are_closed() {
    let srv = Server::start_with(512, InProcessConfig::default(), |s| {
        s.shutdown_grace = Duration::from_millis(200);
    })
    .await;
    // In its chain (the chain takes `SLOW`, well past the grace).
    let mut in_chain = TcpStream::connect(srv.addr).await.unwrap();
    in_chain.write_all(b"POST /patient HTTP/1.1\r\nHost: x\r\nContent-Length: 1\r\n\r\nx").await.unwrap();
    // Mid-body (the body timeout is 2 s, past the grace too).
    let mut mid_body = TcpStream::connect(srv.addr).await.unwrap();
    mid_body.write_all(b"POST /echo HTTP/1.1\r\nHost: x\r\nContent-Length: 1000\r\n\r\nsome").await.unwrap();
    let in_flight = r#"dne_ingress_in_flight{tenant="open"}"#;
    until(
        || metric(&srv, in_flight) == Some(2) && !srv.upstream.xff.lock().unwrap().is_empty(),
        || srv.ingress.metrics_text(),
    )
    .await;
    let ingress = srv.ingress.clone();
    srv.stop().await;
    let text = ingress.metrics_text();
    for (what, s) in [("in its chain", &mut in_chain), ("mid-body", &mut mid_body)] {
        // Closed (an end of stream or a reset), with nothing written.
        let end = read_to_close(s).await.map(|b| String::from_utf8_lossy(&b).into_owned());
        assert!(end.as_ref().is_err() || end.as_ref().is_ok_and(String::is_empty), "{what}: {end:?}");
    }
    // Counted by the time `serve` returned.
    let series = |s: &str| text.lines().find_map(|l| l.strip_prefix(s)?.trim().parse::<u64>().ok());
    let gone = series(r#"dne_ingress_rejections_total{tenant="open",reason="client_gone"}"#);
    assert_eq!((gone, series(in_flight)), (Some(2), Some(0)), "{text}");
    // The chain's buffers come back once the chain is done with them.
    let held = || ingress.pools().iter().map(|p| p.capacity() - p.free_buffers()).collect::<Vec<_>>();
    until(|| held().iter().all(|&n| n == 0), || format!("buffers still held: {:?}", held())).await;
}

/// A connection refused for `max_connections` is told so by a task that
/// waits, up to a second, for the client to close; when `serve` returns,
/// that task has ended and the connection is closed, whether the grace
/// outlasted it (the refusal ran its course) or expired first (it was
/// stopped). The client here reads its 503 and keeps the connection open;
/// once `serve` has returned it sends a byte, which the server answers
/// with a reset only if its socket is closed. (Before, `serve` returned
/// with the refusal's task still running: it read the byte, and no reset
/// came.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_refusal_is_still_being_told_when_serve_returns() {
    for grace in [Settings::default().shutdown_grace, Duration::from_millis(100)] {
        let srv = Server::start_with(512, InProcessConfig::default(), |s| {
            s.max_connections = 1;
            s.shutdown_grace = grace;
        })
        .await;
        // An idle connection holds the one slot.
        let _idle = TcpStream::connect(srv.addr).await.unwrap();
        until(|| metric(&srv, "dne_ingress_connections ") == Some(1), || srv.ingress.metrics_text()).await;
        let mut refused = TcpStream::connect(srv.addr).await.unwrap();
        let (st, head, _) = read_response(&mut refused).await;
        assert_eq!(st, 503, "{head}");
        assert_eq!(metric(&srv, "dne_ingress_connections_refused_total "), Some(1));
        srv.stop().await;
        refused.write_all(b"x").await.unwrap();
        until(
            || refused.take_error().ok().flatten().is_some(),
            || format!("grace {grace:?}: the refused connection was still served after serve returned"),
        )
        .await;
    }
}

//! The HTTP/1.1 edge: tokio (multi-thread) + hyper, keep-alive.
//!
//! Per request: refuse more than one `Host`, one that is not a host and port,
//! or none in HTTP/1.1 (400), an absolute-form target that is not an `http`
//! or `https` URI naming a host (400; see `target_authority_ok`), and a path
//! with a `.` or `..` segment (400; `..;x` counts too, see `has_dot_segment`),
//! route by host (an absolute-form target's authority, else `Host`) and path
//! (404), check the tenant's API key (401), check the method and the transfer
//! coding (501), the target (400/414) and the announced body length (413);
//! write the envelope head and then the body, frame by frame as it arrives
//! from the socket, straight into buffers of the tenant's ingress pool (the
//! body is copied once, from hyper's read buffer into the pool; it is never
//! gathered anywhere else), taking the buffers as the bytes arrive, not for
//! the length the client announced, and waiting a bounded time for them (503 +
//! `Retry-After`); call the [`Upstream`] with the route's timeout (504 on
//! expiry; 503 / 502 for its errors); decode the reply envelope (502 if
//! malformed) and stream its body to the client straight out of the pool
//! buffers (zero copy: each fragment is handed to hyper as a `Bytes` that
//! keeps the reply's lease alive, and the buffers are freed when the last
//! piece is written or the client goes away).
//!
//! `GET /metrics` (and `HEAD`) answers the Prometheus text on the main
//! listener (taking precedence over routes) unless an admin listener is
//! given, which then serves it alone. Shutdown stops accepting, lets in-flight requests
//! finish (bounded by [`Settings::shutdown_grace`], past which their
//! connections are closed unanswered) and closes idle connections.

use crate::metrics::{CodeLabels, Metrics, ReasonLabels, RejectLabels, RouteLabels, TenantLabels};
use crate::pool::{BuildError, MsgBuilder, PoolLease, Pools};
use crate::route::Router;
use crate::upstream::{Upstream, UpstreamError};
use bytes::Bytes;
use config::Cluster;
use http_body::{Body, Frame, SizeHint};
use http_body_util::{BodyExt, Either, Full};
use hyper::body::Incoming;
use hyper::header::{self, HeaderMap, HeaderName, HeaderValue};
use hyper::http::request::Parts;
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper::{Request, Response, StatusCode};
use hyper_util::rt::{TokioIo, TokioTimer};
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::Histogram;
use std::convert::Infallible;
use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering::Relaxed};
use std::sync::{Arc, Mutex, PoisonError};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};
use tokio::net::TcpListener;
use wire::ErrorCode;
use wire::http::{self as env, EnvelopeKind, HeadSpec, Method, REPLY_HEAD_ROOM, Start};

/// Request headers copied into the envelope (the rest stay at the edge),
/// but not those the request's `Connection` names (hop-by-hop for that
/// request, RFC 9110 7.6.1).
pub const FORWARDED_HEADERS: &[&str] =
    &["content-type", "content-encoding", "accept", "accept-encoding", "accept-language", "user-agent", "x-request-id"];

/// Reply headers the edge never copies to the client: hop-by-hop ones
/// (the edge frames the response itself), and those the edge owns: the
/// error code it reports for the cluster (`x-dne-error`: a function's own
/// would make a reply look like the cluster's failure), and `date` and
/// `server`, which describe the server the client talks to (hyper writes
/// the edge's `date`; a function's replaced it, or made two). A reverse
/// proxy hides its upstream's `Date` and `Server` the same way (nginx's
/// `proxy_hide_header` default). Those the reply's `Connection` names are
/// hop-by-hop for that reply and not copied either (RFC 9110 7.6.1).
const NOT_FROM_REPLIES: &[&str] = &[
    "connection",
    "keep-alive",
    "transfer-encoding",
    "content-length",
    "upgrade",
    "te",
    "trailer",
    "proxy-connection",
    "x-dne-error",
    "date",
    "server",
];

/// Edge settings.
#[derive(Clone, Copy, Debug)]
pub struct Settings {
    /// Largest request body (413 beyond).
    pub body_limit: u32,
    /// How long a request waits for pool buffers before 503 (in all, not
    /// per buffer; only time spent waiting for buffers counts, not the
    /// time its body takes to arrive).
    pub pool_wait: Duration,
    /// Deadline for a request head (hyper's header read timeout).
    pub header_timeout: Duration,
    /// Longest pause between two pieces of a request body (408 beyond).
    pub body_timeout: Duration,
    /// Longest a whole request body may take to arrive (408 beyond): a
    /// client trickling its body holds the buffers reserved for it no
    /// longer than this.
    pub body_deadline: Duration,
    /// Longest a response may wait for the client to take more of it (the
    /// connection is closed beyond): a client that stops reading holds the
    /// reply's buffers no longer than this.
    pub write_timeout: Duration,
    /// Longest wait for in-flight requests at shutdown; the connections
    /// still open then are closed where they are, their requests counted
    /// as `client_gone` (see [`Ingress::serve`]).
    pub shutdown_grace: Duration,
    /// Seconds announced in `Retry-After` with a 503.
    pub retry_after_s: u32,
    /// Client connections open at once (the HTTP listener's; the admin
    /// listener's are not counted); one more is answered 503 and closed.
    pub max_connections: usize,
}

impl Settings {
    /// Settings of ingress `name` of `cluster` (its `body_limit`), with
    /// defaults for the rest.
    pub fn for_ingress(cluster: &Cluster, name: &str) -> Option<Self> {
        let g = cluster.ingresses.iter().find(|g| g.name == name)?;
        Some(Self { body_limit: g.body_limit, max_connections: g.max_connections as usize, ..Self::default() })
    }
}

impl Default for Settings {
    fn default() -> Self {
        Self {
            body_limit: 1 << 20,
            pool_wait: Duration::from_millis(50),
            header_timeout: Duration::from_secs(10),
            body_timeout: Duration::from_secs(10),
            body_deadline: Duration::from_secs(60),
            write_timeout: Duration::from_secs(10),
            shutdown_grace: Duration::from_secs(30),
            retry_after_s: 1,
            max_connections: 4096,
        }
    }
}

struct RouteInfo {
    tenant: u16,
    timeout: Duration,
    label: &'static str,
    /// This route's series, resolved once (a family lookup hashes its
    /// labels under a lock): 200 responses and the latency histogram.
    ok: Counter,
    duration: Histogram,
}

struct TenantInfo {
    name: &'static str,
    api_key: Option<Vec<u8>>,
    /// This tenant's series, resolved once.
    in_flight: Gauge,
    bytes_in: Counter,
    bytes_out: Counter,
    /// `client_gone` rejections.
    client_gone: Counter,
}

/// The ingress: routes, tenants, pools, the upstream and the metrics.
pub struct Ingress {
    routes: Vec<RouteInfo>,
    router: Router,
    tenants: Vec<TenantInfo>,
    pools: Pools,
    upstream: Arc<dyn Upstream>,
    metrics: Metrics,
    /// Held while the upstream's drop counts are copied into the metrics
    /// (see [`Ingress::metrics_text`]).
    drops_copy: Mutex<()>,
    next_request: AtomicU32,
    settings: Settings,
    /// One permit per client connection the HTTP listener may hold open.
    conn_slots: Arc<tokio::sync::Semaphore>,
    /// One permit per connection being closed with a lingering close (see
    /// [`ClientIo`]); it holds no `conn_slots` permit meanwhile.
    linger_slots: Arc<tokio::sync::Semaphore>,
}

/// Refused connections told so at once; more are closed without a word
/// (telling one holds a descriptor, up to [`REFUSAL_WRITE_WITHIN`]).
const REFUSALS_AT_ONCE: usize = 64;
/// Longest a refused connection is given to take its 503.
const REFUSAL_WRITE_WITHIN: Duration = Duration::from_secs(1);
/// Most connections lingering at once (see [`ClientIo`]), and no more than
/// `max_connections`; one more is closed at once.
const LINGERING_AT_ONCE: usize = 256;
/// Descriptors the ingress keeps for itself beyond its connections (pools,
/// fabric, admin, logs), when it raises its descriptor limit.
const FD_RESERVE: u64 = 1024;

impl core::fmt::Debug for Ingress {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        f.debug_struct("Ingress").field("routes", &self.routes.len()).field("settings", &self.settings).finish()
    }
}

/// The body of every response: a small edge-made one, or a reply's body
/// streamed out of the pool.
pub type OutBody = Either<Full<Bytes>, ReplyBody>;

fn intern(s: String) -> &'static str {
    // Once per route and tenant at start: bounded by the config.
    Box::leak(s.into_boxed_str())
}

/// The client of one connection: its address, its IP as text for
/// `x-forwarded-for` (formatted once per connection, not per request), and
/// whether the connection broke.
#[derive(Debug)]
struct Client {
    addr: SocketAddr,
    ip: String,
    /// Set by [`ClientIo`] when reading from or writing to the client
    /// failed (a reset, a write into a closed socket, the write timeout),
    /// and by [`Connection`] when the connection goes: an answer not
    /// written completely by then never reached the client.
    broken: Arc<AtomicBool>,
}

impl Client {
    fn new(addr: SocketAddr, broken: Arc<AtomicBool>) -> Self {
        Self { addr, ip: addr.ip().to_string(), broken }
    }
}

impl std::fmt::Display for Client {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        self.addr.fmt(f)
    }
}

impl Ingress {
    /// An ingress over `pools` (one per tenant of `cluster`) sending through
    /// `upstream`.
    pub fn new(cluster: &Cluster, pools: Pools, upstream: Arc<dyn Upstream>, settings: Settings) -> Self {
        let metrics = Metrics::new();
        let tenants = cluster
            .tenants
            .iter()
            .map(|t| {
                let name = intern(t.name.clone());
                let tl = TenantLabels { tenant: name };
                TenantInfo {
                    name,
                    api_key: t.api_key.clone().map(String::into_bytes),
                    in_flight: metrics.in_flight.get_or_create(&tl).clone(),
                    bytes_in: metrics.bytes_in.get_or_create(&tl).clone(),
                    bytes_out: metrics.bytes_out.get_or_create(&tl).clone(),
                    client_gone: metrics
                        .rejections
                        .get_or_create(&RejectLabels { tenant: name, reason: "client_gone" })
                        .clone(),
                }
            })
            .collect::<Vec<_>>();
        let routes = cluster
            .routes
            .iter()
            .map(|r| {
                let label = intern(format!("{}{}", r.host.as_deref().unwrap_or(""), r.path));
                let id = cluster.tenant_id(&r.tenant).unwrap_or(0);
                let tenant = tenants.get(usize::from(id)).map_or("", |t| t.name);
                RouteInfo {
                    tenant: id,
                    timeout: Duration::from_millis(u64::from(r.timeout_ms)),
                    label,
                    ok: metrics.requests.get_or_create(&CodeLabels { route: label, tenant, code: 200 }).clone(),
                    duration: metrics.duration.get_or_create(&RouteLabels { route: label, tenant }).clone(),
                }
            })
            .collect();
        for (t, p) in tenants.iter().zip(pools.iter()) {
            metrics.pool_size.get_or_create(&TenantLabels { tenant: t.name }).set(i64::from(p.capacity()));
        }
        Self {
            routes,
            router: Router::new(cluster),
            tenants,
            pools,
            upstream,
            metrics,
            drops_copy: Mutex::new(()),
            next_request: AtomicU32::new(first_request_id()),
            conn_slots: Arc::new(tokio::sync::Semaphore::new(settings.max_connections)),
            linger_slots: Arc::new(tokio::sync::Semaphore::new(lingering_at_once(&settings))),
            settings,
        }
    }

    /// The pools (for the fabric side to register, and for tests).
    pub fn pools(&self) -> &Pools {
        &self.pools
    }

    /// The metrics in the Prometheus text format.
    pub fn metrics_text(&self) -> String {
        for (t, p) in self.tenants.iter().zip(self.pools.iter()) {
            self.metrics.pool_free.get_or_create(&TenantLabels { tenant: t.name }).set(i64::from(p.free_buffers()));
        }
        // The counters follow the upstream's totals by adding what they
        // lack. One scrape at a time: two at once could both read a counter
        // before either added, and add the same drops twice.
        let copying = self.drops_copy.lock().unwrap_or_else(PoisonError::into_inner);
        for (reason, n) in self.upstream.dropped() {
            let c = self.metrics.upstream_dropped.get_or_create(&ReasonLabels { reason });
            c.inc_by(n.saturating_sub(c.get()));
        }
        drop(copying);
        let open = self.settings.max_connections.saturating_sub(self.conn_slots.available_permits());
        self.metrics.connections.set(i64::try_from(open).unwrap_or(i64::MAX));
        let lingering = lingering_at_once(&self.settings).saturating_sub(self.linger_slots.available_permits());
        self.metrics.connections_lingering.set(i64::try_from(lingering).unwrap_or(i64::MAX));
        self.metrics.encode()
    }

    /// Serves HTTP/1.1 on `listener` (and the metrics alone on `admin`, if
    /// given) until `shutdown` completes, then drains in-flight requests.
    ///
    /// Draining stops accepting, closes idle connections and lets the
    /// others finish their request, for at most
    /// [`Settings::shutdown_grace`]. The connections still open then are
    /// stopped where they are: closed with no answer (or the rest of one),
    /// their requests counted as `client_gone` and the buffers they held
    /// released (a request's chain lets go of its buffers when it is done
    /// with them, as for any client that left). The connections refused
    /// for `max_connections` that are still being told so (each for at
    /// most `REFUSAL_WRITE_WITHIN`, 1 s) are waited for in the same grace
    /// and closed where they are when it expires. When `serve` returns, no
    /// connection it accepted or refused is served any more, so the
    /// runtime may live on. Dropping the future `serve` returns aborts
    /// every connection's task, with no drain: each is closed the same way
    /// once its task next runs.
    pub async fn serve(
        self: Arc<Self>,
        listener: TcpListener,
        admin: Option<TcpListener>,
        shutdown: impl Future<Output = ()>,
    ) -> std::io::Result<()> {
        let lingering = lingering_at_once(&self.settings);
        raise_fd_limit((self.settings.max_connections + lingering) as u64 + FD_RESERVE);
        let graceful = hyper_util::server::graceful::GracefulShutdown::new();
        // The connections' tasks, to be stopped when the grace has passed;
        // those that ended are taken out as they end.
        let mut conns = tokio::task::JoinSet::new();
        // The tasks telling refused connections so (see `refuse`), stopped
        // likewise; those that ended are taken out before each new one.
        let mut refusals = tokio::task::JoinSet::new();
        tokio::pin!(shutdown);
        let metrics_on_main = admin.is_none();
        loop {
            let admin_accept = async {
                match &admin {
                    Some(l) => l.accept().await,
                    None => std::future::pending().await,
                }
            };
            let (accepted, is_admin) = tokio::select! {
                r = listener.accept() => (r, false),
                r = admin_accept => (r, true),
                Some(ended) = conns.join_next(), if !conns.is_empty() => {
                    note_panic(ended);
                    continue;
                }
                () = &mut shutdown => break,
            };
            let (stream, peer) = match accepted {
                Ok(x) => x,
                Err(e) => {
                    // Out of descriptors and the like: back off, keep serving.
                    log::warn!("accept: {e}");
                    tokio::time::sleep(Duration::from_millis(10)).await;
                    continue;
                }
            };
            // Held by the connection until it ends or begins a lingering
            // close (see `ClientIo`).
            let slot = if is_admin {
                None
            } else {
                match self.conn_slots.clone().try_acquire_owned() {
                    Ok(slot) => Some(slot),
                    Err(_) => {
                        self.refuse(stream, peer, &mut refusals);
                        continue;
                    }
                }
            };
            let _ = stream.set_nodelay(true);
            let me = self.clone();
            let broken = Arc::new(AtomicBool::new(false));
            let client = Arc::new(Client::new(peer, broken.clone()));
            let svc = service_fn(move |req: Request<Incoming>| {
                let (me, client) = (me.clone(), client.clone());
                async move {
                    let version = req.version();
                    let r = me.handle(req, &client, is_admin, metrics_on_main).await;
                    Ok::<_, Infallible>(in_version(version, r))
                }
            });
            // `half_close`: a client that shuts its sending side once its
            // request is complete (`shutdown(SHUT_WR)`) still gets its
            // answer; by default hyper takes that end of stream for the
            // client leaving and drops the request unanswered. The end of
            // a client's stream mid-body is still the client leaving
            // (hyper's body reader reports it). The cost: a client that
            // closes entirely while its chain runs sends the same FIN, so
            // it is no longer seen to leave; its chain runs to the end (or
            // to the route's timeout) and the answer goes into a closed
            // socket (HAProxy's default, without `abortonclose`). Nothing
            // cheaper tells the two apart: the socket of either reads end
            // of stream and takes writes, and only the reset a write draws
            // shows the client gone. When writing a reply fails so, the
            // request counts as `client_gone` (see `Outgoing`).
            let conn = http1::Builder::new()
                .timer(TokioTimer::new())
                .header_read_timeout(self.settings.header_timeout)
                .keep_alive(true)
                .half_close(true)
                .serve_connection(
                    TokioIo::new(ClientIo::new(
                        stream,
                        self.settings.write_timeout,
                        slot,
                        self.linger_slots.clone(),
                        broken.clone(),
                    )),
                    svc,
                );
            let conn = Connection { conn: Box::pin(graceful.watch(conn)), broken };
            let me = self.clone();
            conns.spawn(async move {
                if let Err(e) = conn.await {
                    log::debug!("connection from {peer}: {e}");
                    // A head hyper could not parse was answered by hyper
                    // itself, without the service seeing it; it reports
                    // the error once the connection has closed.
                    if let Some(code) = hypers_answer(&e) {
                        me.unparsed(peer, code, &e);
                    }
                }
            });
        }
        drop(listener);
        drop(admin);
        log::info!("shutting down: finishing in-flight requests");
        let drained = async {
            graceful.shutdown().await;
            join_all(&mut refusals).await;
        };
        if tokio::time::timeout(self.settings.shutdown_grace, drained).await.is_err() {
            log::warn!(
                "shutdown: closing {} connections still open and {} refused ones still being told so after {:?}",
                still_running(&mut conns),
                still_running(&mut refusals),
                self.settings.shutdown_grace
            );
            // Each task's connection is dropped: `Connection` and
            // `InFlight` count what it cut off as they go.
            conns.abort_all();
            refusals.abort_all();
        }
        // Until every task has ended (and dropped its connection): when
        // drained, they end as their connections did.
        join_all(&mut conns).await;
        join_all(&mut refusals).await;
        Ok(())
    }

    /// A connection beyond `max_connections`: answered 503 with
    /// `Retry-After` and closed, without reading its request (counted in
    /// `dne_ingress_connections_refused_total`). At most
    /// [`REFUSALS_AT_ONCE`] are being told so at a time, each for at most
    /// [`REFUSAL_WRITE_WITHIN`]; beyond that one is closed without a word.
    /// Each is told so by a task in `refusals`; the tasks that ended are
    /// taken out first, so the set holds no more than those still running
    /// (at most `REFUSALS_AT_ONCE`), and each refusal costs the same
    /// however many came before it.
    fn refuse(&self, mut stream: tokio::net::TcpStream, peer: SocketAddr, refusals: &mut tokio::task::JoinSet<()>) {
        self.metrics.connections_refused.inc();
        let n = self.metrics.connections_refused.get();
        if n.is_power_of_two() {
            log::warn!(
                "{} client connections open (max_connections): refusing new ones ({n} so far; from {peer})",
                self.settings.max_connections
            );
        }
        if still_running(refusals) >= REFUSALS_AT_ONCE {
            return;
        }
        let answer = format!(
            "HTTP/1.1 503 Service Unavailable\r\ncontent-type: text/plain\r\ncontent-length: 21\r\n\
             retry-after: {}\r\nconnection: close\r\n\r\ntoo many connections\n",
            self.settings.retry_after_s
        );
        refusals.spawn(async move {
            use tokio::io::{AsyncReadExt, AsyncWriteExt};
            let _ = tokio::time::timeout(REFUSAL_WRITE_WITHIN, async {
                stream.write_all(answer.as_bytes()).await?;
                stream.shutdown().await?;
                // Read what the client sent until it closes: closing with
                // its request unread would reset the connection, and the
                // reset can reach the client before the 503.
                let mut sink = [0u8; 1024];
                while stream.read(&mut sink).await? > 0 {}
                std::io::Result::Ok(())
            })
            .await;
        });
    }

    async fn handle(
        &self,
        mut req: Request<Incoming>,
        peer: &Arc<Client>,
        admin: bool,
        metrics_on_main: bool,
    ) -> Response<OutBody> {
        let start = Instant::now();
        let method = req.method().clone();
        // The access log's copy of the target, only when that log is on.
        let target = if log::log_enabled!(target: ACCESS_LOG, log::Level::Info) {
            req.uri().path_and_query().map_or_else(|| req.uri().path().to_owned(), |p| p.as_str().to_owned())
        } else {
            String::new()
        };
        // HEAD is answered like GET (RFC 9110 9.3.2); hyper sends the head
        // alone, with the body's length.
        if (admin || metrics_on_main)
            && req.uri().path() == "/metrics"
            && (method == hyper::Method::GET || method == hyper::Method::HEAD)
        {
            let mut r = Response::new(Either::Left(Full::new(Bytes::from(self.metrics_text()))));
            r.headers_mut().insert(
                header::CONTENT_TYPE,
                HeaderValue::from_static("application/openmetrics-text; version=1.0.0; charset=utf-8"),
            );
            return early(&mut req, r).await;
        }
        // RFC 9112 3.2: a request with more than one Host line is refused
        // (which one it meant is anyone's guess, and a proxy in front may
        // have guessed the other), and an absolute-form target's authority
        // wins over Host (3.2.2).
        let mut hosts = req.headers().get_all(header::HOST).iter();
        let first_host = hosts.next();
        if hosts.next().is_some() {
            self.unrouted(peer, &method, &target, StatusCode::BAD_REQUEST, " two_hosts");
            return close(plain(StatusCode::BAD_REQUEST, "more than one Host header\n"));
        }
        // An HTTP/1.1 request must name its host (3.2): without one, or
        // with one that is not a host and port (`a, b`, say: what a proxy
        // in front makes of two Host lines when it joins them; an empty
        // host, `:80` or none at all, in any version; percent-escapes; see
        // `config::is_host`), it is refused rather than routed as if it
        // had none. An absolute-form target's authority is held to the
        // same grammar, and more (see `target_authority_ok`).
        let header_host = first_host.map(|h| h.to_str().ok().filter(|h| config::is_host(h)));
        if matches!(header_host, Some(None)) {
            self.unrouted(peer, &method, &target, StatusCode::BAD_REQUEST, " bad_host");
            return close(plain(StatusCode::BAD_REQUEST, "Host is not a host name and port\n"));
        }
        if !target_authority_ok(req.uri()) {
            self.unrouted(peer, &method, &target, StatusCode::BAD_REQUEST, " bad_target");
            return close(plain(StatusCode::BAD_REQUEST, "the target is not an http URI naming a host\n"));
        }
        // Even with an absolute-form target, whose authority then routes
        // it: RFC 9112 3.2 refuses "any HTTP/1.1 request message that lacks
        // a Host header field".
        if first_host.is_none() && req.version() >= hyper::Version::HTTP_11 {
            self.unrouted(peer, &method, &target, StatusCode::BAD_REQUEST, " no_host");
            return close(plain(StatusCode::BAD_REQUEST, "an HTTP/1.1 request needs a Host header\n"));
        }
        let host = req.uri().host().or(header_host.flatten());
        // Routes match the path as sent; one whose meaning changes when it
        // is resolved (`/a/../b`) is refused rather than routed by its
        // first segment (see `has_dot_segment`).
        if has_dot_segment(req.uri().path()) {
            self.unrouted(peer, &method, &target, StatusCode::BAD_REQUEST, " dot_segment");
            return close(plain(StatusCode::BAD_REQUEST, "a path with a . or .. segment\n"));
        }
        let route = if admin { None } else { self.router.lookup(host, req.uri().path()) };
        let Some(route) = route else {
            self.unrouted(peer, &method, &target, StatusCode::NOT_FOUND, "");
            return early(&mut req, plain(StatusCode::NOT_FOUND, "no route\n")).await;
        };
        let info = &self.routes[usize::from(route)];
        let tenant = &self.tenants[usize::from(info.tenant)];
        // Dropped with the request (a client gone mid-request too).
        let mut in_flight = InFlight::new(&tenant.in_flight, &self.metrics.rejections, tenant.name);
        let (mut resp, bytes_in, request) = self.exchange(req, route, peer).await;
        tenant.bytes_in.inc_by(bytes_in);
        if resp.extensions().get::<ClientGone>().is_some() {
            // No one will read this answer: `in_flight` counts the request
            // as `client_gone` when it drops, and no status is counted.
            log::info!(
                target: ACCESS_LOG,
                "{peer} \"{method} {target}\" - 0 {:.3}ms route={} tenant={} req=- client_gone",
                start.elapsed().as_secs_f64() * 1e3,
                info.label,
                tenant.name,
            );
            return resp;
        }
        in_flight.done();
        let code = resp.status().as_u16();
        // Responses that carry no body on the wire count none.
        let bodiless = method == hyper::Method::HEAD || code == 204 || code == 304;
        let bytes_out = if bodiless { 0 } else { resp.body().size_hint().exact().unwrap_or(0) };
        let answered = Answered {
            peer: peer.clone(),
            method,
            target,
            code,
            bytes_out,
            elapsed: start.elapsed(),
            request,
            route: info.label,
            tenant: tenant.name,
            count: if code == 200 {
                info.ok.clone()
            } else {
                self.metrics
                    .requests
                    .get_or_create(&CodeLabels { route: info.label, tenant: tenant.name, code })
                    .clone()
            },
            duration: info.duration.clone(),
            bytes: tenant.bytes_out.clone(),
            gone: tenant.client_gone.clone(),
        };
        // A chain's reply is counted once it is written, or is found not
        // to be (see `Outgoing`); the edge's own short answers, and in
        // effect bodiless replies, at once.
        let unsettled = match resp.body_mut() {
            Either::Right(body) => body.settle_when_written(answered),
            Either::Left(_) => Some(answered),
        };
        if let Some(a) = unsettled {
            a.settle(false);
        }
        resp
    }

    /// Counts and access-logs a request answered `code` before it had a
    /// route (`why`: appended to the log line).
    fn unrouted(&self, peer: &Client, method: &hyper::Method, target: &str, code: StatusCode, why: &str) {
        self.metrics.requests.get_or_create(&CodeLabels { route: "", tenant: "", code: code.as_u16() }).inc();
        log::info!(target: ACCESS_LOG, "{peer} \"{method} {target}\" {} 0 route=- tenant=-{why}", code.as_u16());
    }

    /// Counts and access-logs a request hyper answered `code` itself
    /// because it could not parse its head (`e`), so with no method,
    /// target or route known.
    fn unparsed(&self, peer: SocketAddr, code: StatusCode, e: &hyper::Error) {
        self.metrics.requests.get_or_create(&CodeLabels { route: "", tenant: "", code: code.as_u16() }).inc();
        log::info!(target: ACCESS_LOG, "{peer} \"- -\" {} 0 route=- tenant=- unparsed: {e}", code.as_u16());
    }

    fn reject(&self, tenant: u16, reason: &'static str) {
        let tenant = self.tenants[usize::from(tenant)].name;
        self.metrics.rejections.get_or_create(&RejectLabels { tenant, reason }).inc();
    }

    /// The answer to an error descriptor from the chain: 503 + `Retry-After`
    /// when the cluster lacked room (a node's queue or pool, a node down on
    /// the way), 504 when a hop timed out, 502 for everything else (a
    /// function failed or died with the request, a misconfigured chain).
    fn chain_error(&self, tenant: u16, code: ErrorCode) -> Response<OutBody> {
        match code {
            ErrorCode::Overloaded | ErrorCode::PoolExhausted | ErrorCode::Unreachable => {
                self.unavailable(tenant, code.as_str())
            }
            ErrorCode::Timeout => self.timed_out(tenant),
            _ => {
                self.reject(tenant, "function_error");
                plain(StatusCode::BAD_GATEWAY, "a function of the chain failed\n")
            }
        }
    }

    /// 504: the chain (the route's deadline, or a hop's) did not answer in
    /// time.
    fn timed_out(&self, tenant: u16) -> Response<OutBody> {
        self.reject(tenant, "timeout");
        plain(StatusCode::GATEWAY_TIMEOUT, "the function chain did not answer in time\n")
    }

    fn unavailable(&self, tenant: u16, reason: &'static str) -> Response<OutBody> {
        self.reject(tenant, reason);
        let mut r = plain(StatusCode::SERVICE_UNAVAILABLE, "overloaded, retry later\n");
        r.headers_mut().insert(header::RETRY_AFTER, HeaderValue::from(self.settings.retry_after_s));
        r
    }

    /// One routed request: returns the response, the request body bytes
    /// received and the request id (0 when none was assigned).
    async fn exchange(&self, req: Request<Incoming>, route: u16, peer: &Client) -> (Response<OutBody>, u64, u32) {
        let info = &self.routes[usize::from(route)];
        let t = info.tenant;
        let tenant = &self.tenants[usize::from(t)];
        let (req, mut body) = req.into_parts();
        if let Some(key) = &tenant.api_key {
            let given = req.headers.get(header::AUTHORIZATION).map(HeaderValue::as_bytes);
            let ok = given.and_then(bearer_token).is_some_and(|v| ct_eq(v, key));
            if !ok {
                self.reject(t, "unauthorized");
                let mut r = plain(StatusCode::UNAUTHORIZED, "missing or wrong API key\n");
                r.headers_mut().insert(header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"));
                return (early_parts(&req, &mut body, r).await, 0, 0);
            }
        }
        let Some(method) = Method::from_name(req.method.as_str()) else {
            self.reject(t, "bad_request");
            return (
                early_parts(&req, &mut body, plain(StatusCode::NOT_IMPLEMENTED, "method not supported\n")).await,
                0,
                0,
            );
        };
        if !chunked_alone(&req.headers) {
            // hyper takes the chunks off and would hand on the rest, still
            // in the other codings, as if it were the body.
            self.reject(t, "bad_request");
            return (close(plain(StatusCode::NOT_IMPLEMENTED, "transfer coding not supported\n")), 0, 0);
        }
        let path = req.uri.path_and_query().map_or("/", |p| p.as_str()).as_bytes();
        if path.len() > env::MAX_PATH as usize {
            self.reject(t, "bad_request");
            return (
                early_parts(&req, &mut body, plain(StatusCode::URI_TOO_LONG, "request target too long\n")).await,
                0,
                0,
            );
        }
        let mut hs: Vec<(&[u8], &[u8])> = Vec::with_capacity(FORWARDED_HEADERS.len() + 1);
        // The fields the client's `Connection` names were for the edge
        // alone (RFC 9110 7.6.1), even those forwarded otherwise.
        let options = req.headers.get_all(header::CONNECTION);
        let hop_by_hop = options.iter().next().is_some();
        for name in FORWARDED_HEADERS {
            if hop_by_hop && names_option(options.iter().map(HeaderValue::as_bytes), name.as_bytes()) {
                continue;
            }
            for v in req.headers.get_all(*name) {
                hs.push((name.as_bytes(), v.as_bytes()));
            }
        }
        hs.push((b"x-forwarded-for", peer.ip.as_bytes()));
        let spec = HeadSpec { start: Start::Request { method, path }, headers: &hs };
        let head_len = match spec.len() {
            Ok(n) => n,
            Err(e @ (env::EnvelopeError::HeaderCount(_) | env::EnvelopeError::HeadersLen(_))) => {
                // A well-formed request with more of the forwarded headers
                // than an envelope carries.
                self.reject(t, "bad_request");
                log::debug!("{peer}: request head not representable: {e}");
                let text = "request header fields too large\n";
                return (close(plain(StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE, text)), 0, 0);
            }
            Err(e) => {
                self.reject(t, "bad_request");
                log::debug!("{peer}: request head not representable: {e}");
                return (close(plain(StatusCode::BAD_REQUEST, "malformed request\n")), 0, 0);
            }
        };
        let body_off = head_len.max(REPLY_HEAD_ROOM);
        let limit = u64::from(self.settings.body_limit);
        let known = body.size_hint().exact();
        if known.is_some_and(|n| n > limit) {
            self.reject(t, "too_large");
            return (close(plain(StatusCode::PAYLOAD_TOO_LARGE, "body over the limit\n")), 0, 0);
        }
        let Some(pool) = self.pools.get(t) else {
            return (early_parts(&req, &mut body, plain(StatusCode::INTERNAL_SERVER_ERROR, "no pool\n")).await, 0, 0);
        };
        let mut msg = MsgBuilder::new(pool.clone());
        // A body announced larger than the tenant's largest message is
        // refused before any of it is read.
        if known.is_some_and(|n| u64::from(body_off) + n > msg.max_len()) {
            self.reject(t, "too_large");
            return (close(plain(StatusCode::PAYLOAD_TOO_LARGE, "body over the tenant's message size\n")), 0, 0);
        }
        let wait = self.settings.pool_wait;
        // Only the envelope head's room now; the body's buffers are taken
        // as its bytes arrive (below), never for what `Content-Length`
        // merely announces: otherwise a few clients sending only a head
        // with a large length would hold the tenant's whole pool.
        match msg.reserve(u64::from(body_off), wait).await {
            Ok(()) => {}
            Err(BuildError::TooLarge(_)) => {
                self.reject(t, "too_large");
                return (close(plain(StatusCode::PAYLOAD_TOO_LARGE, "body over the tenant's message size\n")), 0, 0);
            }
            Err(BuildError::Exhausted) => return (close(self.unavailable(t, "pool_exhausted")), 0, 0),
        }
        // Body: every frame straight into its place in the pool.
        let mut len: u64 = 0;
        let deadline = tokio::time::Instant::now() + self.settings.body_deadline;
        loop {
            let next = (tokio::time::Instant::now() + self.settings.body_timeout).min(deadline);
            let frame = match tokio::time::timeout_at(next, body.frame()).await {
                Err(_) => {
                    self.reject(t, "body_timeout");
                    return (close(plain(StatusCode::REQUEST_TIMEOUT, "request body too slow\n")), len, 0);
                }
                Ok(None) => break,
                Ok(Some(Err(e))) if client_left(&e) => {
                    // The buffers go back when `msg` drops; the request is
                    // counted as `client_gone` by the caller.
                    log::debug!("{peer}: the client left mid-body: {e}");
                    let mut r = close(plain(StatusCode::BAD_REQUEST, "incomplete body\n"));
                    r.extensions_mut().insert(ClientGone);
                    return (r, len, 0);
                }
                Ok(Some(Err(e))) => {
                    // A broken body (bad chunk framing).
                    self.reject(t, "bad_request");
                    log::debug!("{peer}: reading the body: {e}");
                    return (close(plain(StatusCode::BAD_REQUEST, "malformed body\n")), len, 0);
                }
                Ok(Some(Ok(f))) => f,
            };
            let Ok(data) = frame.into_data() else { continue }; // trailers: not forwarded
            let end = len + data.len() as u64;
            if end > limit {
                self.reject(t, "too_large");
                return (close(plain(StatusCode::PAYLOAD_TOO_LARGE, "body over the limit\n")), len, 0);
            }
            match msg.reserve(u64::from(body_off) + end, wait).await {
                Ok(()) => {}
                Err(BuildError::TooLarge(_)) => {
                    self.reject(t, "too_large");
                    return (
                        close(plain(StatusCode::PAYLOAD_TOO_LARGE, "body over the tenant's message size\n")),
                        len,
                        0,
                    );
                }
                Err(BuildError::Exhausted) => return (close(self.unavailable(t, "pool_exhausted")), len, 0),
            }
            if msg.write(u64::from(body_off) + len, &data).is_err() {
                return (close(plain(StatusCode::INTERNAL_SERVER_ERROR, "pool write\n")), len, 0);
            }
            len = end;
        }
        // `len <= body_limit < 2^32`, so these fit.
        let total = u64::from(body_off) + len;
        let head = env::encode_head(&mut msg.frags_mut(), &spec, body_off - head_len, len as u32);
        let msg =
            match head.map_err(|e| e.to_string()).and_then(|_| msg.finish(total as u32).map_err(|e| e.to_string())) {
                Ok(m) => m,
                Err(e) => {
                    log::error!("{peer}: building the envelope: {e}");
                    return (plain(StatusCode::INTERNAL_SERVER_ERROR, "envelope\n"), len, 0);
                }
            };
        drop(hs);
        let request = self.next_request.fetch_add(1, Relaxed);
        let reply = tokio::time::timeout(info.timeout, self.upstream.call(route, t, msg, request)).await;
        let reply = match reply {
            Err(_) | Ok(Err(UpstreamError::Timeout)) => {
                return (self.timed_out(t), len, request);
            }
            Ok(Err(e @ (UpstreamError::NoCredit | UpstreamError::QueueFull | UpstreamError::Unreachable))) => {
                return (self.unavailable(t, e.as_str()), len, request);
            }
            Ok(Err(UpstreamError::FunctionError(code))) => {
                let mut r = self.chain_error(t, code);
                r.headers_mut().insert(HeaderName::from_static("x-dne-error"), HeaderValue::from_static(code.as_str()));
                return (r, len, request);
            }
            Ok(Ok(reply)) => reply,
        };
        (self.respond(reply, t, peer), len, request)
    }

    fn respond(&self, reply: PoolLease, t: u16, peer: &Client) -> Response<OutBody> {
        let e = match env::decode(&reply.frags()) {
            Ok(e) if e.kind == EnvelopeKind::Response => e,
            Ok(_) => {
                self.reject(t, "bad_reply");
                log::warn!("{peer}: the chain replied with a request envelope");
                return plain(StatusCode::BAD_GATEWAY, "malformed reply\n");
            }
            Err(err) => {
                self.reject(t, "bad_reply");
                log::warn!("{peer}: malformed reply envelope: {err}");
                return plain(StatusCode::BAD_GATEWAY, "malformed reply\n");
            }
        };
        // A final status only: 1xx would make hyper send an interim
        // response (or switch protocols) instead of this reply.
        let Some(status) = e.status.filter(|s| (200..600).contains(s)).and_then(|s| StatusCode::from_u16(s).ok())
        else {
            self.reject(t, "bad_reply");
            log::warn!("{peer}: the chain replied with status {:?}, not a final one", e.status);
            return plain(StatusCode::BAD_GATEWAY, "malformed reply\n");
        };
        // A 205 carries no content (RFC 9110 15.3.6): a body the function
        // gave it is not sent (`Content-Length: 0`).
        let body_len = if status == StatusCode::RESET_CONTENT { 0 } else { e.body_len };
        let body = ReplyBody::new(reply, e.body_offset, body_len);
        let mut r = Response::new(Either::Right(body));
        *r.status_mut() = status;
        // The fields the reply's `Connection` names were for the hop from
        // the function alone (RFC 9110 7.6.1), as `Connection` itself is.
        let is_connection = |n: &[u8]| n.eq_ignore_ascii_case(b"connection");
        let hop_by_hop = e.headers.iter().any(|(n, _)| is_connection(n));
        let options = || e.headers.iter().filter(|(n, _)| is_connection(n)).map(|(_, v)| v.as_slice());
        for (n, v) in &e.headers {
            if NOT_FROM_REPLIES.iter().any(|h| n.eq_ignore_ascii_case(h.as_bytes()))
                || (hop_by_hop && names_option(options(), n))
            {
                continue;
            }
            // The decoder checked the grammar, so these parse.
            if let (Ok(n), Ok(v)) = (HeaderName::from_bytes(n), HeaderValue::from_bytes(v)) {
                r.headers_mut().append(n, v);
            }
        }
        r
    }
}

/// Whether the `Connection` field values `values` name `name` among their
/// connection options (a list of tokens separated by commas, in any case;
/// RFC 9110 7.6.1). Allocates nothing.
fn names_option<'a>(mut values: impl Iterator<Item = &'a [u8]>, name: &[u8]) -> bool {
    values.any(|v| v.split(|&b| b == b',').any(|t| t.trim_ascii().eq_ignore_ascii_case(name)))
}

/// Where this process's request ids start: random, so that a reply still
/// travelling for a request of an earlier run of the ingress (one that
/// stopped or crashed with requests in the cluster) does not match a
/// request of this one that happens to have the same id.
fn first_request_id() -> u32 {
    use std::hash::BuildHasher;
    // The standard library seeds `RandomState` from the OS's randomness.
    std::collections::hash_map::RandomState::new().hash_one(std::process::id()) as u32
}

/// Most bytes read and discarded from a client after the server shut its
/// side of the connection (see [`ClientIo`]).
const LINGER_BYTES: u64 = 1 << 20;
/// Longest the server waits for the client's end of stream after it shut
/// its side of the connection...
const LINGER_TIME: Duration = Duration::from_secs(2);
/// ... and longest it waits for the client's next bytes meanwhile (an idle
/// client closed at shutdown sends none).
const LINGER_QUIET: Duration = Duration::from_millis(500);

/// The client's socket, with two things hyper does not do:
/// * a bound on how long a write may make no progress: past
///   [`Settings::write_timeout`] without the client taking any bytes,
///   writes fail with `TimedOut` and hyper closes the connection, dropping
///   the response and the buffers behind it (the timer exists only while a
///   write waits);
/// * a lingering close: when the server ends a connection whose client has
///   not ended its stream (an early answer to a request whose body is
///   still coming, a closing answer to a pipelining client, hyper's own
///   answer to a head it cannot parse (400, 431), an idle connection at
///   shutdown), it shuts its sending side and then reads and
///   discards what comes until the client's end of stream,
///   [`LINGER_BYTES`], [`LINGER_TIME`], or [`LINGER_QUIET`] without a
///   byte. Closing
///   with bytes unread makes the kernel reset the connection, and the
///   reset can destroy the answer on its way (a response still in the
///   send queue is discarded, and some stacks drop what they received).
///
/// The connection's `max_connections` slot is given back when the server
/// begins to close it, before it lingers: a lingering connection serves no
/// one, and holding the slot for up to [`LINGER_TIME`] let a stream of
/// closing connections lock new clients out. Lingering takes a permit of
/// its own instead; when none is left, the connection is closed at once.
struct ClientIo<T> {
    io: T,
    limit: Duration,
    stalled: Option<Pin<Box<tokio::time::Sleep>>>,
    /// The client's end of stream has been read.
    eof: bool,
    /// The connection's `max_connections` slot (none on the admin
    /// listener), until the server begins to close it.
    slot: Option<tokio::sync::OwnedSemaphorePermit>,
    /// Permits for lingering connections, shared by all of them.
    linger_slots: Arc<tokio::sync::Semaphore>,
    /// Set when a read or a write fails (see [`Client::broken`]).
    broken: Arc<AtomicBool>,
    /// Lingering: bytes discarded so far, when it began, the deadline, and
    /// the permit it holds.
    linger: Option<(u64, tokio::time::Instant, Pin<Box<tokio::time::Sleep>>, tokio::sync::OwnedSemaphorePermit)>,
}

impl<T> ClientIo<T> {
    fn new(
        io: T,
        limit: Duration,
        slot: Option<tokio::sync::OwnedSemaphorePermit>,
        linger_slots: Arc<tokio::sync::Semaphore>,
        broken: Arc<AtomicBool>,
    ) -> Self {
        Self { io, limit, stalled: None, eof: false, slot, linger_slots, broken, linger: None }
    }

    /// Passes `r` on, noting a failure (see [`Client::broken`]).
    fn note<R>(&self, r: Poll<std::io::Result<R>>) -> Poll<std::io::Result<R>> {
        if let Poll::Ready(Err(_)) = &r {
            // Relaxed: read on this connection's task (see `Outgoing`).
            self.broken.store(true, Relaxed);
        }
        r
    }

    /// Passes a write's result on; a write still waiting past the limit
    /// becomes an error.
    fn check<R>(&mut self, cx: &mut Context<'_>, r: Poll<std::io::Result<R>>) -> Poll<std::io::Result<R>> {
        if r.is_ready() {
            self.stalled = None;
            return self.note(r);
        }
        let limit = self.limit;
        let timer = self.stalled.get_or_insert_with(|| Box::pin(tokio::time::sleep(limit)));
        if timer.as_mut().poll(cx).is_ready() {
            self.stalled = None;
            return self.note(Poll::Ready(Err(std::io::Error::new(
                std::io::ErrorKind::TimedOut,
                "the client took no response bytes within the write timeout",
            ))));
        }
        Poll::Pending
    }
}

impl<T: tokio::io::AsyncRead + Unpin> tokio::io::AsyncRead for ClientIo<T> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut tokio::io::ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        let (room, before) = (buf.remaining() > 0, buf.filled().len());
        let r = Pin::new(&mut self.io).poll_read(cx, buf);
        if room && matches!(r, Poll::Ready(Ok(()))) && buf.filled().len() == before {
            self.eof = true;
        }
        self.note(r)
    }
}

impl<T: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin> tokio::io::AsyncWrite for ClientIo<T> {
    fn poll_write(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<std::io::Result<usize>> {
        let r = Pin::new(&mut self.io).poll_write(cx, buf);
        self.check(cx, r)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> Poll<std::io::Result<usize>> {
        let r = Pin::new(&mut self.io).poll_write_vectored(cx, bufs);
        self.check(cx, r)
    }

    fn is_write_vectored(&self) -> bool {
        self.io.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        let r = Pin::new(&mut self.io).poll_flush(cx);
        self.check(cx, r)
    }

    /// Gives the connection's slot back, shuts the sending side, then
    /// lingers (see [`ClientIo`]) unless the client's end of stream was
    /// read already or too many connections linger.
    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        let this = self.get_mut();
        let (discarded, began, deadline, _) = match &mut this.linger {
            Some(l) => l,
            None => {
                // Before the end of stream is sent: a client that has seen
                // it finds the slot free.
                this.slot = None;
                std::task::ready!(Pin::new(&mut this.io).poll_shutdown(cx))?;
                if this.eof {
                    return Poll::Ready(Ok(()));
                }
                let Ok(permit) = this.linger_slots.clone().try_acquire_owned() else {
                    log::debug!("{LINGERING_AT_ONCE} or max_connections connections lingering: closing one at once");
                    return Poll::Ready(Ok(()));
                };
                let now = tokio::time::Instant::now();
                this.linger.insert((0, now, Box::pin(tokio::time::sleep_until(now + LINGER_QUIET)), permit))
            }
        };
        let mut sink = [0u8; 4096];
        while *discarded < LINGER_BYTES {
            let mut buf = tokio::io::ReadBuf::new(&mut sink);
            match Pin::new(&mut this.io).poll_read(cx, &mut buf) {
                Poll::Ready(Ok(())) if buf.filled().is_empty() => {
                    this.eof = true;
                    break;
                }
                Poll::Ready(Ok(())) => {
                    *discarded += buf.filled().len() as u64;
                    let quiet = tokio::time::Instant::now() + LINGER_QUIET;
                    deadline.as_mut().reset(quiet.min(*began + LINGER_TIME));
                }
                // Reset by the client: nothing more to wait for.
                Poll::Ready(Err(_)) => break,
                Poll::Pending => return deadline.as_mut().poll(cx).map(Ok),
            }
        }
        Poll::Ready(Ok(()))
    }
}

/// A client connection being served. When it goes, it marks the
/// connection broken ([`Client::broken`]) before hyper's state goes with
/// it: whatever of a reply hyper still holds then (pieces in its write
/// queue, the body) was never written. That happens with no I/O error when
/// the connection is dropped unfinished: at shutdown once `shutdown_grace`
/// has passed (`serve` stops the connections still open), or when the
/// runtime goes. A connection that ended by itself holds no reply: hyper
/// ends one once its last answer is written, or on an error, which leaves
/// the rest unwritten too. Costs a flag store per connection, nothing per
/// request.
struct Connection<F> {
    /// Boxed to be polled without pin projection; one allocation per
    /// connection.
    conn: Pin<Box<F>>,
    broken: Arc<AtomicBool>,
}

impl<F: Future> Future for Connection<F> {
    type Output = F::Output;

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<F::Output> {
        self.conn.as_mut().poll(cx)
    }
}

impl<F> Drop for Connection<F> {
    fn drop(&mut self) {
        // Relaxed: read by `Outgoing::drop` when `conn` drops, after this
        // function returns, on this thread.
        self.broken.store(true, Relaxed);
    }
}

/// The tasks of `set` still running: those that ended are taken out
/// first (each once: the cost is that of the tasks that ended since the
/// last call).
fn still_running(set: &mut tokio::task::JoinSet<()>) -> usize {
    while let Some(ended) = set.try_join_next() {
        note_panic(ended);
    }
    set.len()
}

/// Waits for every task of `set` to end.
async fn join_all(set: &mut tokio::task::JoinSet<()>) {
    while let Some(ended) = set.join_next().await {
        note_panic(ended);
    }
}

/// Logs a connection task that panicked (one aborted at shutdown is
/// expected); the panic ended that connection alone.
fn note_panic(ended: Result<(), tokio::task::JoinError>) {
    if let Err(e) = ended
        && e.is_panic()
    {
        log::error!("a connection's task panicked: {e}");
    }
}

/// Marks the answer to a request whose client left before its body was
/// complete: no one will read it, so it is counted as `client_gone`, not by
/// its status.
#[derive(Clone, Copy, Debug)]
struct ClientGone;

/// Whether an error reading a request body means the client went away
/// (closed or reset the connection before the body was complete) rather
/// than sent a malformed body. hyper reports both as a body error: a
/// malformed body (bad chunk framing) carries an I/O error of kind
/// `InvalidData` or `InvalidInput`; an end of stream mid-body carries
/// `UnexpectedEof`, a reset the socket's own error, and a connection that
/// failed while the body was read no I/O error at all.
fn client_left(e: &hyper::Error) -> bool {
    use std::io::ErrorKind::{InvalidData, InvalidInput};
    if e.is_incomplete_message() || e.is_closed() {
        return true;
    }
    let mut source = std::error::Error::source(e);
    while let Some(s) = source {
        if let Some(io) = s.downcast_ref::<std::io::Error>() {
            return !matches!(io.kind(), InvalidData | InvalidInput);
        }
        source = s.source();
    }
    true
}

/// The status hyper answered a connection's last request with itself,
/// if `e`, the error the connection ended with, is one hyper answers: a
/// request head it could not parse gets 400, one over its buffer 431, a
/// target over its length limit 414 (hyper's `on_error` for servers). An
/// HTTP/2 preface and an internal parser error get no answer, nor does
/// anything that is not a parse error (a header read timeout, a client that
/// left mid-head). hyper reports the error only if its answer was written:
/// a failed write ends the connection with the write's error instead.
fn hypers_answer(e: &hyper::Error) -> Option<StatusCode> {
    if !e.is_parse() || e.is_parse_version_h2() || e.is_parse_status() {
        return None;
    }
    // The public API tells the two kinds of too large, and an internal
    // error, apart only by their text (hyper's `description`).
    let text = e.to_string();
    if text.starts_with("internal error") {
        return None;
    }
    if e.is_parse_too_large() {
        let uri = text.starts_with("URI too long");
        return Some(if uri { StatusCode::URI_TOO_LONG } else { StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE });
    }
    Some(StatusCode::BAD_REQUEST)
}

/// What is counted and logged of a routed request once its answer has
/// been written, or has been found not to reach the client (then it is a
/// `client_gone` rejection, not a response).
struct Answered {
    peer: Arc<Client>,
    method: hyper::Method,
    /// The target, for the access log (empty when that log is off).
    target: String,
    code: u16,
    bytes_out: u64,
    /// From the request head to the response head.
    elapsed: Duration,
    request: u32,
    route: &'static str,
    tenant: &'static str,
    /// The route's series for `code`.
    count: Counter,
    duration: Histogram,
    bytes: Counter,
    gone: Counter,
}

impl Answered {
    /// Counts and logs the request: `gone`, its answer did not reach the
    /// client.
    fn settle(self, gone: bool) {
        let ms = self.elapsed.as_secs_f64() * 1e3;
        let Self { peer, method, target, code, route, tenant, request, .. } = &self;
        if gone {
            self.gone.inc();
            log::info!(
                target: ACCESS_LOG,
                "{peer} \"{method} {target}\" - 0 {ms:.3}ms route={route} tenant={tenant} req={request} client_gone",
            );
            return;
        }
        self.count.inc();
        self.duration.observe(self.elapsed.as_secs_f64());
        self.bytes.inc_by(self.bytes_out);
        log::info!(
            target: ACCESS_LOG,
            "{peer} \"{method} {target}\" {code} {} {ms:.3}ms route={route} tenant={tenant} req={request}",
            self.bytes_out,
        );
    }
}

/// The `log` target of the access log lines.
const ACCESS_LOG: &str = "dne_ingress::access";

/// A request being handled: counted in flight while it lives; dropped
/// before [`InFlight::done`] (the handler drops it for a client that left
/// mid-body, and with the handler when `serve` stops the connection at
/// shutdown; a client that leaves once its request is complete is not seen
/// to go before its answer is written, see `half_close` in
/// [`Ingress::serve`], and [`Outgoing`] for one whose reply fails to be
/// written), it counts a `client_gone` rejection.
struct InFlight<'a> {
    gauge: &'a Gauge,
    gone: Option<&'a Family<RejectLabels, Counter>>,
    tenant: &'static str,
}

impl<'a> InFlight<'a> {
    fn new(gauge: &'a Gauge, rejections: &'a Family<RejectLabels, Counter>, tenant: &'static str) -> Self {
        gauge.inc();
        Self { gauge, gone: Some(rejections), tenant }
    }

    /// The request got its response.
    fn done(&mut self) {
        self.gone = None;
    }
}

impl Drop for InFlight<'_> {
    fn drop(&mut self) {
        // Counted before the gauge drops, so whoever sees the request no
        // longer in flight sees it counted.
        if let Some(r) = self.gone {
            r.get_or_create(&RejectLabels { tenant: self.tenant, reason: "client_gone" }).inc();
        }
        self.gauge.dec();
    }
}

fn plain(status: StatusCode, text: &'static str) -> Response<OutBody> {
    let mut r = Response::new(Either::Left(Full::new(Bytes::from_static(text.as_bytes()))));
    *r.status_mut() = status;
    r.headers_mut().insert(header::CONTENT_TYPE, HeaderValue::from_static("text/plain; charset=utf-8"));
    r
}

/// The connection is not reusable after this response (unread body).
fn close(mut r: Response<OutBody>) -> Response<OutBody> {
    r.headers_mut().insert(header::CONNECTION, HeaderValue::from_static("close"));
    r
}

/// The answer `r` to a request of HTTP version `version`: a closing answer
/// to an HTTP/1.0 request is marked HTTP/1.0 (hyper writes every answer to
/// such a client as HTTP/1.0 anyway). To one marked HTTP/1.1 whose
/// `Connection` lacks `keep-alive`, hyper appends `keep-alive` when the
/// client asked for it, even after `close`, and then closes: the client
/// read `Connection: close, keep-alive`, and one that looks for
/// `keep-alive` (HTTP/1.0 persistence) sent its next request into a
/// connection being closed. To one marked HTTP/1.0, hyper adds nothing.
fn in_version(version: hyper::Version, mut r: Response<OutBody>) -> Response<OutBody> {
    if version == hyper::Version::HTTP_10
        && names_option(r.headers().get_all(header::CONNECTION).iter().map(HeaderValue::as_bytes), b"close")
    {
        *r.version_mut() = hyper::Version::HTTP_10;
    }
    r
}

/// Request bodies of at most this many bytes (by their `Content-Length`)
/// are read and discarded before an early answer (see [`early`]).
const DISCARD_MAX: u64 = 64 << 10;
/// Longest such a body is waited for.
const DISCARD_WITHIN: Duration = Duration::from_millis(200);

/// Answer `r`, given before any of the request's body was read (see
/// [`early_body`]).
async fn early(req: &mut Request<Incoming>, r: Response<OutBody>) -> Response<OutBody> {
    let expects = expects_continue(req.version(), req.headers());
    early_body(expects, req.body_mut(), r).await
}

/// [`early`] for a request taken apart into its `head` and `body`.
async fn early_parts(head: &Parts, body: &mut Incoming, r: Response<OutBody>) -> Response<OutBody> {
    early_body(expects_continue(head.version, &head.headers), body, r).await
}

/// Whether the client waits for `100 Continue` before sending its body.
/// An HTTP/1.0 client does not: a server MUST ignore the expectation in
/// an HTTP/1.0 request (RFC 9110 10.1.1), and hyper sends no `100
/// Continue` to one, so its body is read like any other.
fn expects_continue(version: hyper::Version, headers: &HeaderMap) -> bool {
    version >= hyper::Version::HTTP_11
        && headers.get_all(header::EXPECT).iter().any(|v| v.as_bytes().eq_ignore_ascii_case(b"100-continue"))
}

/// Answer `r`, given before any of the request's `body` was read. A small
/// body that arrives at once is read and discarded, and the connection
/// serves on; otherwise the connection closes after the answer, and the
/// answer says so (RFC 9112 9.6). Left to hyper, the connection stayed
/// open if the whole body happened to be in its read buffer already and
/// closed otherwise, decided after the head was written, too late to say
/// so. A client that waits for `100 Continue` before it sends its body is
/// not asked for it (reading the body would send `100 Continue` first):
/// the answer goes out at once and the connection closes (RFC 9110
/// 10.1.1).
async fn early_body(expects_continue: bool, body: &mut Incoming, r: Response<OutBody>) -> Response<OutBody> {
    if body.is_end_stream() {
        return r;
    }
    if !expects_continue && body.size_hint().exact().is_some_and(|n| n <= DISCARD_MAX) {
        let drain = async {
            while let Some(frame) = body.frame().await {
                frame.ok()?;
            }
            Some(())
        };
        if let Ok(Some(())) = tokio::time::timeout(DISCARD_WITHIN, drain).await {
            return r;
        }
    }
    close(r)
}

/// Whether the authority of an absolute-form (or authority-form) target,
/// by which the request is routed (RFC 9112 3.2.2), is a host and port
/// (`config::is_host`, which also refuses userinfo: RFC 9110 4.2.4 has a
/// recipient treat it as an error, as `special.example@x` reads as a
/// request to `special.example` while it names `x`; an empty host: RFC
/// 9110 4.2.1 has an `http` URI without one rejected as invalid; and
/// percent-escapes, which no DNS name has), under the `http` or `https`
/// scheme, if any (another names no resource of this server). A target
/// without an authority (origin form) passes. `Host` is held to the same
/// `config::is_host`.
fn target_authority_ok(uri: &hyper::Uri) -> bool {
    let Some(authority) = uri.authority() else { return true };
    config::is_host(authority.as_str())
        && uri.scheme_str().is_none_or(|s| s.eq_ignore_ascii_case("http") || s.eq_ignore_ascii_case("https"))
}

/// Whether `path` has a `.` or `..` segment once its percent-escapes are
/// undone (`%2e`, and `%2F` as a separator). Routes match the path as
/// sent, so `/a/../b` would go down `/a`'s route while it names `/b`; a
/// proxy in front that resolves paths before it judges them (most do, and
/// most undo escapes first) would judge it as a request for `/b` (its
/// authentication, say). Clients resolve dot segments before sending
/// (RFC 3986 5.2), so refusing them costs an honest client nothing.
///
/// A segment counts by what comes before its first `;` (`..;`, `..;x=1`,
/// `.;`, `%2e%2e%3b` are dot segments). To RFC 3986 they are not (`;` is
/// data in a segment), but servlet containers (Tomcat, Jetty) take what
/// follows a `;` in a segment for path parameters and drop it before
/// they resolve dot segments, so to them `/a/..;/b` is `/b` (the `..;/`
/// bypass of a proxy's path rules); no client sends such a segment for
/// any other meaning.
fn has_dot_segment(path: &str) -> bool {
    let p = path.as_bytes();
    let hex = |b: u8| char::from(b).to_digit(16);
    // The segment's length and dots before any `;`, and whether one came.
    let (mut i, mut len, mut dots, mut params) = (0, 0usize, 0usize, false);
    while i <= p.len() {
        // The next byte with escapes undone; the end closes the last segment.
        let (b, n) = match p.get(i..) {
            Some([b'%', h, l, ..]) => match (hex(*h), hex(*l)) {
                // Two hex digits: at most 255.
                (Some(h), Some(l)) => ((h * 16 + l) as u8, 3),
                _ => (b'%', 1),
            },
            Some([b, ..]) => (*b, 1),
            _ => (b'/', 1),
        };
        if b == b'/' {
            if len > 0 && len == dots && dots <= 2 {
                return true;
            }
            (len, dots, params) = (0, 0, false);
        } else if params || b == b';' {
            params = true;
        } else {
            len += 1;
            dots += usize::from(b == b'.');
        }
        i += n;
    }
    false
}

/// Connections that may linger at once under `settings` (see
/// [`LINGERING_AT_ONCE`]).
fn lingering_at_once(settings: &Settings) -> usize {
    settings.max_connections.clamp(1, LINGERING_AT_ONCE)
}

/// Raises this process's soft limit of open descriptors to `want` (at most
/// the hard limit) if it is lower: each client connection holds one, and
/// the usual soft limit (1024) is below the default `max_connections`.
fn raise_fd_limit(want: u64) {
    use rustix::process::{Resource, Rlimit, getrlimit, setrlimit};
    let lim = getrlimit(Resource::Nofile);
    let cur = lim.current.unwrap_or(u64::MAX);
    if cur >= want {
        return;
    }
    let new = want.min(lim.maximum.unwrap_or(u64::MAX));
    if new > cur
        && let Err(e) = setrlimit(Resource::Nofile, Rlimit { current: Some(new), maximum: lim.maximum })
    {
        log::warn!("cannot raise the open-file limit from {cur} to {new}: {e}");
        return;
    }
    if new < want {
        log::warn!(
            "open-file limit {new} (the hard limit) is below max_connections and the ingress's own \
             {FD_RESERVE}: connections beyond it fail to be accepted"
        );
    }
}

/// Whether a request's transfer codings, if it has any, are `chunked`
/// alone, the one the edge understands (RFC 9112 6.1: anything else gets
/// 501). hyper frames a body by its last coding only, `chunked`, and
/// leaves the others (`gzip, chunked`, or `chunked` applied twice) on it.
fn chunked_alone(headers: &hyper::HeaderMap) -> bool {
    let mut codings = headers
        .get_all(header::TRANSFER_ENCODING)
        .iter()
        .flat_map(|v| v.as_bytes().split(|&b| b == b','))
        .map(<[u8]>::trim_ascii)
        .filter(|c| !c.is_empty());
    match (codings.next(), codings.next()) {
        (None, _) => true,
        (Some(c), None) => c.eq_ignore_ascii_case(b"chunked"),
        (Some(_), Some(_)) => false,
    }
}

/// The token of an `Authorization: Bearer TOKEN` value: the scheme's name
/// in any case and one or more spaces after it (RFC 9110 11.1 and 11.4).
fn bearer_token(value: &[u8]) -> Option<&[u8]> {
    let (scheme, rest) = value.split_at_checked(b"bearer".len())?;
    if !scheme.eq_ignore_ascii_case(b"bearer") || rest.first() != Some(&b' ') {
        return None;
    }
    let start = rest.iter().position(|&b| b != b' ')?;
    Some(&rest[start..])
}

/// Compares secrets in time independent of where they differ.
fn ct_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

/// A reply's body, streamed out of the pool buffers that hold it: one
/// `Bytes` per fragment piece, each keeping the reply's lease alive; the
/// buffers are freed when the last piece and the body are gone.
#[derive(Debug)]
pub struct ReplyBody {
    reply: Arc<Outgoing>,
    pos: u64,
    end: u64,
    cap: u64,
}

impl ReplyBody {
    fn new(reply: PoolLease, off: u32, len: u32) -> Self {
        let cap = u64::from(reply.pool().pool().geometry().payload_cap());
        let reply = Arc::new(Outgoing { answered: None, lease: reply });
        Self { reply, pos: u64::from(off), end: u64::from(off) + u64::from(len), cap }
    }

    /// Has `a` settled when the reply's buffers are let go (see
    /// [`Outgoing`]); gives it back if pieces of the body are out already.
    fn settle_when_written(&mut self, a: Answered) -> Option<Answered> {
        match Arc::get_mut(&mut self.reply) {
            Some(o) => {
                o.answered = Some(a);
                None
            }
            None => Some(a),
        }
    }
}

/// A reply's lease, shared by its body and the pieces of it hyper holds.
/// hyper drops each piece once it has written it, or unwritten when the
/// connection fails or is dropped; so when the last one goes, the answer
/// was written to the socket in full unless the connection broke or went
/// ([`Client::broken`]).
/// The request is counted then, before the buffers go back to the pool.
/// An answer with no body bytes (to HEAD, a 204 or 304, an empty body) is
/// the exception: hyper queues its head and drops its body in the same
/// poll that took it from the handler, before writing anything, so it is
/// counted as the edge's own short answers are, at once (hyper takes an
/// answer only once the one before it is out of its write queue).
/// (A client that closed entirely before a short answer is not seen:
/// writing into its closed socket succeeds, and only draws the reset that
/// would fail the next write.)
struct Outgoing {
    answered: Option<Answered>,
    lease: PoolLease,
}

impl core::fmt::Debug for Outgoing {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        f.debug_struct("Outgoing").field("lease", &self.lease).finish_non_exhaustive()
    }
}

impl Drop for Outgoing {
    fn drop(&mut self) {
        if let Some(a) = self.answered.take() {
            // Relaxed: `ClientIo` (or `Connection`, as it goes) stores
            // the flag and hyper drops the pieces on the connection's
            // task, in that order, and the drop of the last `Arc` orders
            // the two besides.
            let gone = a.peer.broken.load(Relaxed);
            a.settle(gone);
        }
    }
}

struct Piece {
    reply: Arc<Outgoing>,
    frag: u32,
    start: usize,
    end: usize,
}

impl AsRef<[u8]> for Piece {
    fn as_ref(&self) -> &[u8] {
        let lease = &self.reply.lease;
        let f = lease.pool().pool().frag(lease.lease(), self.frag).unwrap_or(&[]);
        f.get(self.start..self.end).unwrap_or(&[])
    }
}

impl Body for ReplyBody {
    type Data = Bytes;
    type Error = Infallible;

    fn poll_frame(self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, Infallible>>> {
        let this = self.get_mut();
        if this.pos >= this.end {
            return Poll::Ready(None);
        }
        // Every fragment but the last holds `cap` bytes.
        let frag = this.pos / this.cap;
        let start = this.pos - frag * this.cap;
        let n = (this.cap - start).min(this.end - this.pos);
        let piece =
            Piece { reply: this.reply.clone(), frag: frag as u32, start: start as usize, end: (start + n) as usize };
        this.pos += n;
        Poll::Ready(Some(Ok(Frame::data(Bytes::from_owner(piece)))))
    }

    fn is_end_stream(&self) -> bool {
        self.pos >= self.end
    }

    fn size_hint(&self) -> SizeHint {
        SizeHint::with_exact(self.end - self.pos)
    }
}

/// The runtime an ingress serves on: `threads` workers (`None`: one per
/// core). One worker is a current-thread runtime: HTTP, the edge task and
/// the accept loop on one thread, with no work stealing and no cross-thread
/// wake-ups (on the 2-core test machine, in 10 alternating runs against a
/// one-worker multi-thread runtime, it served more requests in 7).
pub fn runtime(threads: Option<usize>) -> std::io::Result<tokio::runtime::Runtime> {
    match threads {
        Some(n) if n <= 1 => tokio::runtime::Builder::new_current_thread().enable_all().build(),
        Some(n) => tokio::runtime::Builder::new_multi_thread().worker_threads(n).enable_all().build(),
        None => tokio::runtime::Builder::new_multi_thread().enable_all().build(),
    }
}

/// Completes on SIGTERM or SIGINT.
pub async fn shutdown_signal() {
    use tokio::signal::unix::{SignalKind, signal};
    match (signal(SignalKind::terminate()), signal(SignalKind::interrupt())) {
        (Ok(mut term), Ok(mut int)) => {
            tokio::select! {
                _ = term.recv() => log::info!("SIGTERM"),
                _ = int.recv() => log::info!("SIGINT"),
            }
        }
        (Err(e), _) | (_, Err(e)) => {
            log::error!("cannot watch signals ({e}); stop with SIGKILL");
            std::future::pending::<()>().await;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    /// The count in the shutdown warning is of the tasks still running:
    /// three of four ended (but not yet taken out of the set) leave one.
    /// (Before, the warning counted the set's length, the ended ones too.)
    #[tokio::test]
    async fn still_running_counts_no_task_that_ended() {
        let ended = Arc::new(AtomicU32::new(0));
        let mut set = tokio::task::JoinSet::new();
        let (_keep, pending) = tokio::sync::oneshot::channel::<()>();
        set.spawn(async move {
            let _ = pending.await;
        });
        for _ in 0..3 {
            let ended = ended.clone();
            set.spawn(async move {
                ended.fetch_add(1, Relaxed);
            });
        }
        // One thread: the three run to their end while this task yields.
        for _ in 0..1000 {
            if ended.load(Relaxed) == 3 {
                break;
            }
            tokio::task::yield_now().await;
        }
        tokio::task::yield_now().await;
        assert_eq!(ended.load(Relaxed), 3, "the three tasks never ran");
        assert_eq!(still_running(&mut set), 1);
        assert_eq!(set.len(), 1, "the ended tasks are taken out of the set");
    }

    #[test]
    fn the_bearer_scheme_is_matched_in_any_case_with_any_spaces_after_it() {
        for v in ["Bearer k3y", "bearer k3y", "BEARER k3y", "beArer   k3y"] {
            assert_eq!(bearer_token(v.as_bytes()), Some(&b"k3y"[..]), "{v:?}");
        }
        for v in ["Bearer", "Bearer ", "Bearerk3y", "Basic k3y", "Bearer\tk3y", "Bear k3y", ""] {
            assert_eq!(bearer_token(v.as_bytes()), None, "{v:?}");
        }
    }

    #[test]
    fn connection_options_are_tokens_separated_by_commas_in_any_case() {
        let named = |vs: &[&str], n: &str| names_option(vs.iter().map(|v| v.as_bytes()), n.as_bytes());
        assert!(named(&["x-a"], "x-a"));
        assert!(named(&["close, X-A"], "x-a"));
        assert!(named(&[" ,x-b ,, x-a\t"], "x-a"));
        assert!(named(&["close", "x-a"], "x-a"));
        assert!(!named(&["x-ab, x-", "x"], "x-a"));
        assert!(!named(&[], "x-a"));
        assert!(!named(&[""], "x-a"));
    }

    #[test]
    fn dot_segments_are_found_spelt_out_or_escaped() {
        for p in ["/.", "/..", "/a/./b", "/a/../b", "/a/..", "/a/%2e", "/a/%2E%2e/b", "/a/.%2e", "/a%2f..%2Fb", "/./"] {
            assert!(has_dot_segment(p), "{p:?}");
        }
        for p in ["/", "", "/a", "/...", "/a/..b", "/a/b..", "/.a/", "/a/%2e%2ex", "/%2", "/a%", "/a/%zz"] {
            assert!(!has_dot_segment(p), "{p:?}");
        }
        // What comes after a `;` in a segment does not count.
        for p in ["/a/..;/b", "/a/..;x=1/b", "/a/.;", "/..;", "/a/%2e%2e%3b/b", "/a/..%3Bx", "/a/..;/"] {
            assert!(has_dot_segment(p), "{p:?}");
        }
        for p in ["/a;..", "/a/;/b", "/a/;..", "/a/...;x", "/a;b/c", "/a/x;.."] {
            assert!(!has_dot_segment(p), "{p:?}");
        }
    }

    /// A client connection over `near` with write limit `limit`, no
    /// connection slot, and a lingering permit of its own.
    fn test_io<T>(near: T, limit: Duration) -> ClientIo<T> {
        ClientIo::new(near, limit, None, Arc::new(tokio::sync::Semaphore::new(1)), Default::default())
    }

    /// Loopback sockets buffer megabytes, so the stall is made with an
    /// in-memory pipe of 64 bytes whose far end reads slowly or not at all.
    #[tokio::test]
    async fn a_write_that_makes_no_progress_fails_at_the_limit_and_progress_resets_it() {
        let (near, mut far) = tokio::io::duplex(64);
        let mut io = test_io(near, Duration::from_millis(200));
        // The reader takes 16 bytes every 50 ms: slow, but never stalled
        // for 200 ms, so 1 KiB goes through.
        let reader = tokio::spawn(async move {
            let mut got = Vec::new();
            let mut buf = [0u8; 16];
            while got.len() < 1024 {
                tokio::time::sleep(Duration::from_millis(50)).await;
                let n = far.read(&mut buf).await.unwrap();
                got.extend_from_slice(&buf[..n]);
            }
            far
        });
        io.write_all(&[7u8; 1024]).await.unwrap();
        let far = reader.await.unwrap();
        // Now nobody reads: the pipe fills and the write fails.
        let t = std::time::Instant::now();
        let e = io.write_all(&[7u8; 1024]).await.unwrap_err();
        assert_eq!(e.kind(), std::io::ErrorKind::TimedOut);
        assert!(t.elapsed() >= Duration::from_millis(200), "failed after {:?}", t.elapsed());
        drop(far);
    }

    /// Closing lingers until the client's end of stream, but a client that
    /// goes on sending is cut off after `LINGER_BYTES`, and a silent one
    /// after `LINGER_QUIET`.
    #[tokio::test]
    async fn a_lingering_close_ends_at_the_clients_end_of_stream_or_its_bounds() {
        let pipe = 64 << 10;
        let (near, mut far) = tokio::io::duplex(pipe);
        let mut io = test_io(near, Duration::from_secs(10));
        let writer = tokio::spawn(async move {
            let mut sent = 0u64;
            while far.write_all(&[1u8; 4096]).await.is_ok() {
                sent += 4096;
            }
            sent
        });
        tokio::time::timeout(Duration::from_secs(20), io.shutdown()).await.unwrap().unwrap();
        drop(io);
        let sent = writer.await.unwrap();
        assert!((LINGER_BYTES..=LINGER_BYTES + pipe as u64 + 4096).contains(&sent), "sent {sent}");

        let (near, far) = tokio::io::duplex(1024);
        let mut io = test_io(near, Duration::from_secs(10));
        let t = std::time::Instant::now();
        tokio::time::timeout(Duration::from_secs(20), io.shutdown()).await.unwrap().unwrap();
        assert!(t.elapsed() >= LINGER_QUIET, "ended after {:?}", t.elapsed());
        drop(far);

        // A client that ends its stream: the close ends then.
        let (near, mut far) = tokio::io::duplex(1024);
        let mut io = test_io(near, Duration::from_secs(10));
        let closer = tokio::spawn(async move {
            let mut got = Vec::new();
            far.read_to_end(&mut got).await.unwrap();
            far.write_all(b"rest of a body").await.unwrap();
            far.shutdown().await.unwrap();
        });
        tokio::time::timeout(Duration::from_secs(20), io.shutdown()).await.unwrap().unwrap();
        assert!(io.eof);
        closer.await.unwrap();
    }
}

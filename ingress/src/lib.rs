//! `ingress`: the cluster edge. Terminates HTTP/1.1 once, writes each request
//! as an HTTP envelope ([`wire::http`]) into buffers of its own pool for the
//! route's tenant, and hands it to an [`Upstream`] that carries it to the
//! chain's first function and brings the chain's reply back, matched by
//! request id; the reply's body is streamed to the client out of the pool.
//!
//! Contract:
//! * a request body is copied once, from hyper's read buffer into the pool;
//!   a reply body is not copied at all by the ingress;
//! * every buffer the ingress holds is inside a [`PoolLease`] and returns to
//!   the pool whatever happens to the request (client gone, timeout, error);
//! * waiting is bounded everywhere: for buffers ([`Settings::pool_wait`]),
//!   for queue room or credits (the upstream's), for the chain (the route's
//!   `timeout_ms`), for a slow client ([`Settings::body_timeout`] between
//!   pieces of a body, [`Settings::body_deadline`] for all of it), for a
//!   client that stops reading its response ([`Settings::write_timeout`]),
//!   for a client's end of stream after the server closed its side (a
//!   lingering close, so that unread bytes do not reset the connection
//!   under the answer: 2 s, 0.5 s without a byte, 1 MiB);
//! * edge statuses: 404 unknown route, 400 malformed, 401 bad API key, 408
//!   body too slow, 413 body over `body_limit` (or over the tenant's largest
//!   message), 414 target too long, 431 more forwarded headers than an
//!   envelope carries, 501 unknown method or transfer coding, 502 function
//!   error (a function failed, or died with the request, or the node holding
//!   it went down) or malformed reply, 503 + `Retry-After` pool/queue/credits
//!   exhausted (here or at a node of the chain) or a node of the chain
//!   unreachable, 504 chain timeout (the route's, or a hop's).
//!
//! Two upstreams: [`edge::Edge`] sends requests over the fabric to the
//! node of the route's first function; [`upstream::InProcess`] runs the
//! chains in this process, on the same pool buffers (tests, benchmarks).
//!
//! Modules:
//! * [`server`]: the hyper server, the request path, graceful shutdown;
//! * [`upstream`]: the [`Upstream`] seam and the in-process implementation;
//! * [`edge`]: the fabric upstream;
//! * [`pool`]: the ingress's pools, leases that free themselves, and the
//!   builder that streams a body into buffers;
//! * [`route`]: host + longest path prefix to route;
//! * [`metrics`]: Prometheus metrics.
#![forbid(unsafe_code)]

pub mod edge;
pub mod metrics;
pub mod pool;
pub mod route;
pub mod server;
pub mod upstream;

pub use pool::{PoolLease, Pools};
pub use server::{Ingress, Settings, runtime, shutdown_signal};
pub use upstream::{Behavior, InProcess, InProcessConfig, Upstream, UpstreamError, UpstreamFuture};

//! Per-route and per-tenant metrics in the Prometheus text format
//! (`prometheus-client`), served at `GET /metrics`.
//!
//! Label values are the configured route and tenant names, interned once at
//! start (`&'static str`), so counting a request allocates nothing.
//!
//! * `dne_ingress_requests_total{route,tenant,code}`: responses by status;
//!   requests that matched no route count under `route=""`, `tenant=""`,
//!   as do those hyper answered itself for a head it could not parse
//!   (counted when their connection closes);
//! * `dne_ingress_request_duration_seconds{route,tenant}`: time from the
//!   request head to the response head;
//! * `dne_ingress_request_body_bytes_total{tenant}`,
//!   `dne_ingress_response_body_bytes_total{tenant}`;
//! * `dne_ingress_rejections_total{tenant,reason}`: requests answered by the
//!   edge itself (unauthorized, too_large, pool_exhausted, queue_full,
//!   no_credit, timeout, function_error, unreachable, bad_reply, bad_request)
//!   and requests whose client left before its request was complete, or
//!   whose chain's reply could not be written to it (client_gone; such a
//!   reply is counted once written, not when its head is ready);
//! * `dne_ingress_in_flight{tenant}`: requests being handled;
//! * `dne_ingress_pool_free_buffers{tenant}`,
//!   `dne_ingress_pool_buffers{tenant}`: the tenant's ingress pool;
//! * `dne_ingress_connections`: client connections open (not counting
//!   those being closed with a lingering close);
//!   `dne_ingress_connections_lingering`: those;
//!   `dne_ingress_connections_refused_total`: connections answered 503 and
//!   closed because `max_connections` were open.

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;

/// Labels of a response.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct CodeLabels {
    /// Route name.
    pub route: &'static str,
    /// Tenant name.
    pub tenant: &'static str,
    /// HTTP status.
    pub code: u16,
}

/// Labels of a route.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RouteLabels {
    /// Route name.
    pub route: &'static str,
    /// Tenant name.
    pub tenant: &'static str,
}

/// Labels of a tenant.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct TenantLabels {
    /// Tenant name.
    pub tenant: &'static str,
}

/// Labels of an edge rejection.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RejectLabels {
    /// Tenant name.
    pub tenant: &'static str,
    /// Why.
    pub reason: &'static str,
}

type HistogramCtor = fn() -> Histogram;

fn latency_histogram() -> Histogram {
    // 50 us .. ~1.6 s.
    Histogram::new(exponential_buckets(50e-6, 2.0, 16))
}

/// The ingress's metrics.
#[derive(Debug)]
pub struct Metrics {
    registry: Registry,
    /// Responses by route, tenant and status.
    pub requests: Family<CodeLabels, Counter>,
    /// Latency by route.
    pub duration: Family<RouteLabels, Histogram, HistogramCtor>,
    /// Request body bytes by tenant.
    pub bytes_in: Family<TenantLabels, Counter>,
    /// Response body bytes by tenant.
    pub bytes_out: Family<TenantLabels, Counter>,
    /// Edge rejections by tenant and reason.
    pub rejections: Family<RejectLabels, Counter>,
    /// Requests in flight by tenant.
    pub in_flight: Family<TenantLabels, Gauge>,
    /// Free buffers of the tenant's ingress pool (set at scrape time).
    pub pool_free: Family<TenantLabels, Gauge>,
    /// Buffers of the tenant's ingress pool.
    pub pool_size: Family<TenantLabels, Gauge>,
    /// Messages from the cluster dropped by the upstream, by reason (set
    /// at scrape time from [`crate::Upstream::dropped`]).
    pub upstream_dropped: Family<ReasonLabels, Counter>,
    /// Client connections open (set at scrape time).
    pub connections: Gauge,
    /// Connections being closed with a lingering close (set at scrape
    /// time).
    pub connections_lingering: Gauge,
    /// Connections refused because `max_connections` were open.
    pub connections_refused: Counter,
}

/// Labels of [`Metrics::upstream_dropped`].
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ReasonLabels {
    /// Why.
    pub reason: &'static str,
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    /// Registers every metric.
    pub fn new() -> Self {
        let mut registry = Registry::default();
        let requests = Family::<CodeLabels, Counter>::default();
        let duration = Family::<RouteLabels, Histogram, HistogramCtor>::new_with_constructor(latency_histogram);
        let bytes_in = Family::<TenantLabels, Counter>::default();
        let bytes_out = Family::<TenantLabels, Counter>::default();
        let rejections = Family::<RejectLabels, Counter>::default();
        let in_flight = Family::<TenantLabels, Gauge>::default();
        let pool_free = Family::<TenantLabels, Gauge>::default();
        let pool_size = Family::<TenantLabels, Gauge>::default();
        let upstream_dropped = Family::<ReasonLabels, Counter>::default();
        let connections = Gauge::default();
        let connections_lingering = Gauge::default();
        let connections_refused = Counter::default();
        registry.register("dne_ingress_requests", "HTTP responses by route, tenant and status", requests.clone());
        registry.register(
            "dne_ingress_request_duration_seconds",
            "Time from request head to response head",
            duration.clone(),
        );
        registry.register("dne_ingress_request_body_bytes", "Request body bytes received", bytes_in.clone());
        registry.register("dne_ingress_response_body_bytes", "Response body bytes sent", bytes_out.clone());
        registry.register("dne_ingress_rejections", "Requests answered by the edge itself", rejections.clone());
        registry.register("dne_ingress_in_flight", "Requests being handled", in_flight.clone());
        registry.register("dne_ingress_pool_free_buffers", "Free buffers of the ingress pool", pool_free.clone());
        registry.register("dne_ingress_pool_buffers", "Buffers of the ingress pool", pool_size.clone());
        registry.register(
            "dne_ingress_upstream_dropped",
            "Messages from the cluster dropped with no request waiting for them, by reason",
            upstream_dropped.clone(),
        );
        registry.register("dne_ingress_connections", "Client connections open", connections.clone());
        registry.register(
            "dne_ingress_connections_lingering",
            "Connections being closed that wait for the client's end of stream (not in dne_ingress_connections)",
            connections_lingering.clone(),
        );
        registry.register(
            "dne_ingress_connections_refused",
            "Client connections answered 503 and closed because max_connections were open",
            connections_refused.clone(),
        );
        Self {
            registry,
            requests,
            duration,
            bytes_in,
            bytes_out,
            rejections,
            in_flight,
            pool_free,
            pool_size,
            upstream_dropped,
            connections,
            connections_lingering,
            connections_refused,
        }
    }

    /// The text exposition of every metric.
    pub fn encode(&self) -> String {
        let mut s = String::with_capacity(4096);
        // Writing into a String cannot fail.
        let _ = prometheus_client::encoding::text::encode(&mut s, &self.registry);
        s
    }
}

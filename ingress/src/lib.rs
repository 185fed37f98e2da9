//! `ingress`: the cluster edge. Terminates HTTP/1.1 once, writes each request
//! into a buffer of its own registered pool and sends it over `fabric` to the
//! node of the route's first function; returns the chain's reply to the
//! client, matched by request id.
//!
//! Being built in its own issue (ingress).
#![forbid(unsafe_code)]

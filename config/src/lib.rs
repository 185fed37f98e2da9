//! `config`: the one declarative cluster file (TOML) that every DNE component
//! reads: nodes, tenants, functions, ingress routes.
//!
//! Contract: [`Cluster::parse`] either returns a fully validated cluster, in
//! which every cross reference resolves and every number is usable, or an
//! error that names the bad field (`function[2].tenant: unknown tenant
//! "acme"`). Ids are positions: tenant `i` is the i-th `[[tenant]]`, and so
//! on, so every component derives the same ids from the same file.
//!
//! ```toml
//! [[node]]
//! name = "node-a"
//! mode = "emulated"          # emulated | dpu | host
//! fabric = "doca"            # doca | verbs
//! address = "127.0.0.1:7101" # fabric listen address
//! runtime_dir = "/run/dne/node-a"
//!
//! [[tenant]]
//! name = "acme"
//! weight = 6
//! buf_size = 16384           # bytes per pool buffer, headroom included
//! buffers = 4096             # buffers in the tenant's pool on each node
//! recv_quota = 512           # receive buffers the agent keeps posted per node
//! max_chain = 64             # longest buffer chain of one message
//! node_queue = 1024          # calls that may wait in an agent for one other node
//!
//! [[function]]
//! name = "upper"
//! tenant = "acme"
//! node = "node-a"            # or nodes = ["node-a", "node-b"]
//! instances = 1              # on each of its nodes
//!
//! [[route]]
//! path = "/acme/upper"
//! tenant = "acme"
//! chain = ["upper"]
//! ```
#![forbid(unsafe_code)]

use serde::Deserialize;
use std::collections::{HashMap, HashSet};
use std::path::{Path, PathBuf};
use wire::Name;

/// How a node's agent reaches its host and the fabric (DESIGN.md section 6).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Mode {
    /// Agent on the BlueField; comch + mmap export through DOCA.
    Dpu,
    /// Agent on the host CPU; shared-memory rings with host-shimd.
    Host,
    /// Everything in software on one Linux machine.
    Emulated,
}

/// Fabric backend of a node.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum FabricKind {
    /// DOCA RDMA (real or emulated).
    Doca,
    /// rdma-core ibverbs.
    Verbs,
}

/// One worker node.
#[derive(Clone, Debug, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Node {
    /// Unique name.
    pub name: String,
    /// Agent mode.
    #[serde(default = "default_mode")]
    pub mode: Mode,
    /// Fabric backend.
    #[serde(default = "default_fabric")]
    pub fabric: FabricKind,
    /// Fabric listen address (`host:port`).
    pub address: String,
    /// Directory of the node's sockets and shared-memory names.
    pub runtime_dir: PathBuf,
    /// Where the agent serves `/metrics`, `/status` and `/ready`
    /// (`host:port`); none by default.
    #[serde(default)]
    pub metrics: Option<String>,
    /// `mode = "dpu"`: name of the agent's comch server, which host-shimd
    /// connects to (default `dne-<node name>`).
    #[serde(default)]
    pub comch: Option<String>,
}

impl Node {
    /// Name of the node's agent's comch server (`mode = "dpu"`), which
    /// host-shimd connects to: `comch`, else `dne-` and the node's name
    /// with every byte other than a letter, a digit, `-` or `_` written `_`.
    pub fn comch_name(&self) -> String {
        self.comch.clone().unwrap_or_else(|| {
            let clean: String = self
                .name
                .chars()
                .map(|c| if c.is_ascii_alphanumeric() || c == '-' || c == '_' { c } else { '_' })
                .collect();
            format!("dne-{clean}")
        })
    }
}

fn default_mode() -> Mode {
    Mode::Emulated
}
fn default_fabric() -> FabricKind {
    FabricKind::Doca
}

/// One tenant: a security domain with its own pool on every node.
#[derive(Clone, Debug, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Tenant {
    /// Unique name.
    pub name: String,
    /// Share of the fabric under contention (>= 1).
    pub weight: u32,
    /// Bytes per pool buffer, headroom included (multiple of 64).
    #[serde(default = "default_buf_size")]
    pub buf_size: u32,
    /// Buffers in the tenant's pool on each node.
    pub buffers: u32,
    /// Receive buffers the agent keeps posted for the tenant.
    pub recv_quota: u32,
    /// Longest buffer chain of one message.
    #[serde(default = "default_max_chain")]
    pub max_chain: u32,
    /// Optional rate cap in megabytes per second.
    #[serde(default)]
    pub rate_cap_mbps: Option<u32>,
    /// Optional Unix user id the tenant's function processes must run as
    /// (checked by host-shimd from the kernel's peer credentials).
    #[serde(default)]
    pub uid: Option<u32>,
    /// Optional API key the ingress requires from the tenant's clients
    /// (`Authorization: Bearer KEY`); `None`: no key checked.
    #[serde(default)]
    pub api_key: Option<String>,
    /// Calls of the tenant that may wait in a node's agent for one other
    /// node (or for the other nodes of one function) before more calls
    /// for it go back to their senders as `Overloaded` (503 at the
    /// ingress): what a node that takes nothing can hold. Replies and
    /// errors are not refused. 1 to [`MAX_NODE_QUEUE`].
    #[serde(default = "default_node_queue")]
    pub node_queue: u32,
}

/// Messages of one tenant that may wait in an agent in all (the capacity
/// of the tenant's uplink ring): the largest `node_queue`.
pub const MAX_NODE_QUEUE: u32 = 4096;
/// Largest `tenant_queue` of an ingress.
pub const MAX_EDGE_QUEUE: u32 = 1 << 16;

fn default_node_queue() -> u32 {
    1024
}

fn default_buf_size() -> u32 {
    16384
}
fn default_max_chain() -> u32 {
    64
}

/// One function: runs `instances` processes on each of its nodes.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Function {
    /// Unique name.
    pub name: String,
    /// Owning tenant (by name).
    pub tenant: String,
    /// Nodes it runs on (by name; at least one, each once). In the file,
    /// `node = "a"` for one node or `nodes = ["a", "b"]` for several.
    /// Messages for the function go to an instance on the sender's node
    /// when it has one; the agents and the ingress spread the others over
    /// the function's nodes.
    pub nodes: Vec<String>,
    /// Instances on each node (>= 1).
    pub instances: u16,
    /// Inbound ring slots per instance (power of two).
    pub ring_capacity: u32,
}

/// A `[[function]]` as written: `node` or `nodes`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawFunction {
    name: String,
    tenant: String,
    #[serde(default)]
    node: Option<String>,
    #[serde(default)]
    nodes: Option<Vec<String>>,
    #[serde(default = "one")]
    instances: u16,
    #[serde(default = "default_ring")]
    ring_capacity: u32,
}

impl RawFunction {
    /// The function, its nodes checked against `known` (the nodes' ids).
    fn into_function(self, i: usize, known: &Ids) -> Result<Function, ConfigError> {
        let (nodes, one) = match (self.node, self.nodes) {
            (Some(n), None) => (vec![n], true),
            (None, Some(ns)) if !ns.is_empty() => (ns, false),
            (None, Some(_)) => return Err(bad(format!("function[{i}].nodes"), "must name at least one node")),
            (None, None) => return Err(bad(format!("function[{i}].node"), "missing (or give nodes = [...])")),
            (Some(_), Some(_)) => return Err(bad(format!("function[{i}].nodes"), "give node or nodes, not both")),
        };
        let mut seen = HashSet::new();
        for (j, n) in nodes.iter().enumerate() {
            // Named as written: `node`, or `nodes[j]`.
            let field = || if one { format!("function[{i}].node") } else { format!("function[{i}].nodes[{j}]") };
            if !known.contains_key(n.as_str()) {
                return Err(bad(field(), format!("unknown node \"{n}\"")));
            }
            if !seen.insert(n.as_str()) {
                return Err(bad(field(), format!("node \"{n}\" named twice")));
            }
        }
        Ok(Function {
            name: self.name,
            tenant: self.tenant,
            nodes,
            instances: self.instances,
            ring_capacity: self.ring_capacity,
        })
    }
}

fn one() -> u16 {
    1
}
fn default_ring() -> u32 {
    1024
}

/// An ingress route: requests whose host and path match go down a chain.
#[derive(Clone, Debug, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Route {
    /// Host header to match; `None` matches any host.
    #[serde(default)]
    pub host: Option<String>,
    /// Path prefix to match (starts with `/`).
    pub path: String,
    /// Tenant the requests belong to.
    pub tenant: String,
    /// Functions, in order; the last one replies.
    pub chain: Vec<String>,
    /// Reply deadline in milliseconds.
    #[serde(default = "default_timeout")]
    pub timeout_ms: u32,
}

fn default_timeout() -> u32 {
    5000
}

/// An ingress: the cluster edge. It is a fabric node too; its node id
/// follows the worker nodes' ([`Cluster::ingress_node_id`]).
#[derive(Clone, Debug, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Ingress {
    /// Unique name (among nodes and ingresses).
    pub name: String,
    /// Fabric listen address (`host:port`), where agents send replies.
    pub address: String,
    /// HTTP listen address (`host:port`).
    pub http: String,
    /// Directory of the ingress's shared-memory names.
    pub runtime_dir: PathBuf,
    /// Largest request body accepted, in bytes (413 beyond).
    #[serde(default = "default_body_limit")]
    pub body_limit: u32,
    /// Buffers of the ingress's own pool per tenant (tenant `buf_size`).
    #[serde(default = "default_ingress_buffers")]
    pub buffers: u32,
    /// Requests of one tenant that may wait at this edge for a node with
    /// credits before new ones are refused (503 with `Retry-After`). 1 to
    /// [`MAX_EDGE_QUEUE`].
    #[serde(default = "default_tenant_queue")]
    pub tenant_queue: u32,
    /// Requests of one route that may wait so (a route whose nodes take
    /// nothing holds this many, and the tenant's other routes keep room).
    /// 1 to `tenant_queue`.
    #[serde(default = "default_route_queue")]
    pub route_queue: u32,
    /// Milliseconds a request may wait at this edge for a node of its
    /// first function to grant credits; past that it is refused unsent
    /// (503 with `Retry-After`), not held to its route's `timeout_ms`
    /// (a node that stopped taking requests keeps its link up). On a route
    /// whose `timeout_ms` is not well beyond it the wait ends a little
    /// before that timeout (a fifth of it, at most 100 ms), so the answer
    /// is still 503 and not 504. At least 1.
    #[serde(default = "default_credit_wait")]
    pub credit_wait_ms: u32,
    /// Client connections open at once; one more is answered 503 and
    /// closed at once (each connection holds a file descriptor, and idle
    /// ones live up to the head timeout). 1 to [`MAX_INGRESS_CONNECTIONS`].
    #[serde(default = "default_max_connections")]
    pub max_connections: u32,
}

/// Most bytes of tenant pools one process maps: host-shimd and the agent
/// map the pool of every tenant on their node, an ingress its own pool of
/// every tenant. 64 TiB, half of what a process can map on x86_64 (128
/// TiB); with fewer than `u16::MAX` tenants the sizes add up in a u64.
pub const MAX_POOL_BYTES: u64 = 1 << 46;

/// Most buffers in one pool: a tenant's `buffers` and an ingress's. The
/// agent and the fabric keep tables of an entry or more per buffer, and
/// compute in u32 from the receive quota (below `buffers`), which a bound
/// of 2^24 keeps far from overflow.
pub const MAX_BUFFERS: u32 = 1 << 24;

/// Most client connections an ingress may be given (`max_connections`).
pub const MAX_INGRESS_CONNECTIONS: u32 = 1 << 20;

fn default_max_connections() -> u32 {
    4096
}

fn default_tenant_queue() -> u32 {
    1024
}
fn default_route_queue() -> u32 {
    256
}
fn default_credit_wait() -> u32 {
    1000
}

fn default_body_limit() -> u32 {
    1 << 20
}
fn default_ingress_buffers() -> u32 {
    1024
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct Raw {
    #[serde(default)]
    node: Vec<Node>,
    #[serde(default)]
    tenant: Vec<Tenant>,
    #[serde(default)]
    function: Vec<RawFunction>,
    #[serde(default)]
    route: Vec<Route>,
    #[serde(default)]
    ingress: Vec<Ingress>,
}

/// A validated cluster.
///
/// Look-ups by name ([`Cluster::node_id`] and the like) go through an
/// index made by [`Cluster::parse`], so that each takes time in proportion
/// to the name, not to the cluster. An entry added after parsing is still
/// found (by a scan); one renamed in place is found by neither name.
#[derive(Clone, Debug)]
pub struct Cluster {
    /// Nodes; node id = index.
    pub nodes: Vec<Node>,
    /// Tenants; tenant id = index.
    pub tenants: Vec<Tenant>,
    /// Functions; function id = index.
    pub functions: Vec<Function>,
    /// Routes; route id = index.
    pub routes: Vec<Route>,
    /// Ingresses; fabric node id = `nodes.len()` + index.
    pub ingresses: Vec<Ingress>,
    /// Names to ids, as parsed.
    index: Index,
}

/// Two clusters are equal when their entries are (the index follows from
/// them).
impl PartialEq for Cluster {
    fn eq(&self, o: &Self) -> bool {
        (&self.nodes, &self.tenants, &self.functions, &self.routes, &self.ingresses)
            == (&o.nodes, &o.tenants, &o.functions, &o.routes, &o.ingresses)
    }
}

impl Eq for Cluster {}

/// Names to positions in one list of a cluster.
type Ids = HashMap<Box<str>, u16>;

/// The names of a cluster's nodes, tenants, functions and ingresses, each
/// to its position in its list.
#[derive(Clone, Default)]
struct Index {
    nodes: Ids,
    tenants: Ids,
    functions: Ids,
    ingresses: Ids,
}

impl std::fmt::Debug for Index {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Index").finish_non_exhaustive()
    }
}

/// The id of the entry of `list` called `name`, by `ids` (made from the
/// list as it was parsed): what [`position`] gives for the list as it is
/// now, in time in proportion to the name. An id the index gives is the
/// answer when the list still has that name there; a name the index lacks
/// is taken to be in no list of the same length.
fn find<T>(ids: &Ids, list: &[T], name_of: impl Fn(&T) -> &str, name: &str) -> Option<u16> {
    match ids.get(name) {
        Some(&id) if list.get(usize::from(id)).map(&name_of) == Some(name) => Some(id),
        None if ids.len() == list.len() => None,
        _ => position(list.iter().map(name_of), name),
    }
}

/// A cluster file that cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The file could not be read.
    #[error("cannot read {path}: {err}")]
    Read {
        /// The file.
        path: PathBuf,
        /// Why.
        err: std::io::Error,
    },
    /// Not valid TOML, or fields of the wrong type or unknown fields.
    #[error("{0}")]
    Syntax(#[from] toml::de::Error),
    /// A field holds a value that is not allowed.
    #[error("{field}: {why}")]
    Invalid {
        /// Path of the field, e.g. `tenant[1].weight`.
        field: String,
        /// What is wrong.
        why: String,
    },
}

fn bad(field: impl Into<String>, why: impl Into<String>) -> ConfigError {
    ConfigError::Invalid { field: field.into(), why: why.into() }
}

fn check_name(field: String, name: &str) -> Result<(), ConfigError> {
    Name::new(name).map(|_| ()).map_err(|e| bad(field, e.to_string()))
}

/// Ids are positions, which the processes keep as u16 (some with u16::MAX
/// for "none").
fn count_fits(what: &str, n: usize) -> Result<(), ConfigError> {
    if n >= usize::from(u16::MAX) {
        return Err(bad(what, format!("{n} entries; at most {} allowed", u16::MAX - 1)));
    }
    Ok(())
}

/// The names of a list of `what`s to their ids, each name checked and
/// unique, and their count checked by [`count_fits`].
fn ids<'a>(what: &str, names: impl ExactSizeIterator<Item = &'a str>) -> Result<Ids, ConfigError> {
    count_fits(what, names.len())?;
    let mut ids = Ids::with_capacity(names.len());
    for (n, id) in names.zip(0u16..) {
        let field = || format!("{what}[{id}].name");
        check_name(field(), n)?;
        if ids.insert(n.into(), id).is_some() {
            return Err(bad(field(), format!("duplicate {what} \"{n}\"")));
        }
    }
    Ok(ids)
}

impl Cluster {
    /// Reads and validates a cluster file.
    pub fn load(path: &Path) -> Result<Self, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|err| ConfigError::Read { path: path.to_owned(), err })?;
        Self::parse(&text)
    }

    /// Parses and validates cluster TOML.
    pub fn parse(text: &str) -> Result<Self, ConfigError> {
        let raw: Raw = toml::from_str(text)?;
        let nodes = ids("node", raw.node.iter().map(|n| n.name.as_str()))?;
        let functions =
            raw.function.into_iter().enumerate().map(|(i, f)| f.into_function(i, &nodes)).collect::<Result<_, _>>()?;
        let mut c = Cluster {
            nodes: raw.node,
            tenants: raw.tenant,
            functions,
            routes: raw.route,
            ingresses: raw.ingress,
            index: Index::default(),
        };
        c.index = c.check(nodes)?;
        Ok(c)
    }

    /// Checks the cluster as [`Cluster::parse`] does.
    #[cfg(test)]
    fn validate(&self) -> Result<(), ConfigError> {
        self.check(ids("node", self.nodes.iter().map(|n| n.name.as_str()))?).map(|_| ())
    }

    /// Checks the cluster whose node names are `nodes` (made by [`ids`])
    /// and returns its index. Each reference by name below is one look-up
    /// in the index, so that a cluster is checked in time in proportion to
    /// its size.
    fn check(&self, nodes: Ids) -> Result<Index, ConfigError> {
        if self.nodes.is_empty() {
            return Err(bad("node", "at least one [[node]] is needed"));
        }
        if self.tenants.is_empty() {
            return Err(bad("tenant", "at least one [[tenant]] is needed"));
        }
        count_fits("tenant", self.tenants.len())?;
        count_fits("function", self.functions.len())?;
        count_fits("route", self.routes.len())?;
        for (i, n) in self.nodes.iter().enumerate() {
            let ok = |c: &str| {
                !c.is_empty()
                    && c.len() <= 60
                    && !c.starts_with('.')
                    && c.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'.' || b == b'-' || b == b'_')
            };
            if let Some(c) = n.comch.as_deref().filter(|c| !ok(c)) {
                return Err(bad(
                    format!("node[{i}].comch"),
                    format!("\"{c}\": 1 to 60 letters, digits, '.', '-', '_', not starting with '.'"),
                ));
            }
        }
        // host-shimd finds its node's agent by this name, so on one host
        // it names one agent (each node in dpu mode has one). Nodes on
        // different hosts (fabric addresses with different IPs) may share
        // a name: each host's comch is its own PCIe link to its own card.
        // (The emulated comch is one directory per machine, whatever the
        // addresses.) An address that does not parse is reported below.
        let mut comch: HashMap<(std::net::IpAddr, String), usize> = HashMap::new();
        for (i, n) in self.nodes.iter().enumerate().filter(|(_, n)| n.mode == Mode::Dpu) {
            let Ok(address) = n.address.parse() else { continue };
            let host = ipv4_unmapped(address).ip();
            let name = n.comch_name();
            if let Some(&j) = comch.get(&(host, name.clone())) {
                let other = format!("the comch name of node[{j}] (\"{}\") on the same host", self.nodes[j].name);
                return Err(match n.comch {
                    Some(_) => bad(format!("node[{i}].comch"), format!("\"{name}\" is also {other}")),
                    None => bad(
                        format!("node[{i}].name"),
                        format!(
                            "its default comch name \"{name}\" is also {other}; give one of them another \
                             (comch = \"...\")"
                        ),
                    ),
                });
            }
            comch.insert((host, name), i);
        }
        let ingresses = ids("ingress", self.ingresses.iter().map(|n| n.name.as_str()))?;
        for (i, g) in self.ingresses.iter().enumerate() {
            let f = |name: &str| format!("ingress[{i}].{name}");
            if nodes.contains_key(g.name.as_str()) {
                return Err(bad(f("name"), format!("\"{}\" is also a node's name", g.name)));
            }
            if g.body_limit == 0 {
                return Err(bad(f("body_limit"), "must be at least 1"));
            }
            if g.buffers < 2 {
                return Err(bad(f("buffers"), "must be at least 2"));
            }
            if !(1..=MAX_EDGE_QUEUE).contains(&g.tenant_queue) {
                return Err(bad(f("tenant_queue"), format!("must be 1 to {MAX_EDGE_QUEUE}")));
            }
            if !(1..=MAX_INGRESS_CONNECTIONS).contains(&g.max_connections) {
                return Err(bad(f("max_connections"), format!("must be 1 to {MAX_INGRESS_CONNECTIONS}")));
            }
            if g.credit_wait_ms == 0 {
                return Err(bad(f("credit_wait_ms"), "must be at least 1"));
            }
            if !(1..=g.tenant_queue).contains(&g.route_queue) {
                return Err(bad(f("route_queue"), format!("must be 1 to tenant_queue ({})", g.tenant_queue)));
            }
        }
        if self.nodes.len() + self.ingresses.len() >= usize::from(u16::MAX) {
            return Err(bad("ingress", "too many nodes and ingresses"));
        }
        let tenant_ids = ids("tenant", self.tenants.iter().map(|t| t.name.as_str()))?;
        let function_ids = ids("function", self.functions.iter().map(|f| f.name.as_str()))?;
        if let Some(i) = self.functions.iter().position(|f| f.name.starts_with('.')) {
            return Err(bad(format!("function[{i}].name"), "names starting with . are reserved"));
        }
        // Every address a process listens on: (field, address, fabric).
        let mut listens: Vec<(String, std::net::SocketAddr, bool)> = Vec::new();
        for (i, n) in self.nodes.iter().enumerate() {
            listens.push((format!("node[{i}].address"), socket_addr(&format!("node[{i}].address"), &n.address)?, true));
            if let Some(m) = &n.metrics {
                listens.push((format!("node[{i}].metrics"), socket_addr(&format!("node[{i}].metrics"), m)?, false));
            }
            runtime_dir(&format!("node[{i}].runtime_dir"), &n.runtime_dir, true)?;
        }
        for (i, g) in self.ingresses.iter().enumerate() {
            listens.push((
                format!("ingress[{i}].address"),
                socket_addr(&format!("ingress[{i}].address"), &g.address)?,
                true,
            ));
            listens.push((format!("ingress[{i}].http"), socket_addr(&format!("ingress[{i}].http"), &g.http)?, false));
            runtime_dir(&format!("ingress[{i}].runtime_dir"), &g.runtime_dir, false)?;
        }
        // Each address that names one listener, and the first to give it.
        let mut taken: HashMap<std::net::SocketAddr, &str> = HashMap::new();
        for (field, addr, fabric) in &listens {
            let canon = ipv4_unmapped(*addr);
            // Peers dial a fabric address: it names one machine and port.
            if *fabric && (canon.ip().is_unspecified() || addr.port() == 0) {
                return Err(bad(field.clone(), format!("{addr}: peers dial it; give an address and a port")));
            }
            // (A wildcard address is each machine's own: two nodes may
            // both serve metrics on 0.0.0.0:9477.)
            if addr.port() != 0 && !canon.ip().is_unspecified() {
                if let Some(other) = taken.get(&canon) {
                    return Err(bad(field.clone(), format!("{addr} is also {other}")));
                }
                taken.insert(canon, field);
            }
        }
        // What the tenants' pools take on each node, summed as host-shimd
        // does before making them.
        let mut node_bytes = 0u64;
        let dpu = self.nodes.iter().any(|n| n.mode == Mode::Dpu);
        for (i, t) in self.tenants.iter().enumerate() {
            let f = |name: &str| format!("tenant[{i}].{name}");
            if t.weight == 0 {
                return Err(bad(f("weight"), "weight must be at least 1"));
            }
            if let Err(e) = wire::PoolGeometry::new(0, t.buf_size, t.buffers, wire::fabric::HEADROOM, t.max_chain) {
                let field = match e {
                    wire::desc::GeometryError::BufSize { .. } => "buf_size",
                    wire::desc::GeometryError::BufCount(_) => "buffers",
                    wire::desc::GeometryError::MaxChain(_) => "max_chain",
                };
                return Err(bad(f(field), e.to_string()));
            }
            if t.buffers > MAX_BUFFERS {
                return Err(bad(f("buffers"), format!("{} buffers; at most {MAX_BUFFERS} in a pool", t.buffers)));
            }
            let chain_max = wire::ctrl::MAX_MESSAGE_CHAIN as u32;
            if t.max_chain > chain_max && dpu {
                return Err(bad(
                    f("max_chain"),
                    format!(
                        "at most {chain_max} with a node in dpu mode (one comch message names a message's buffers)"
                    ),
                ));
            }
            let bytes = u64::from(t.buf_size) * u64::from(t.buffers);
            if bytes > MAX_POOL_BYTES {
                return Err(bad(
                    f("buffers"),
                    format!(
                        "{} buffers of {} bytes take {bytes} bytes on every node; at most 64 TiB \
                         ({MAX_POOL_BYTES} bytes) of pools in all",
                        t.buffers, t.buf_size
                    ),
                ));
            }
            // Each is at most MAX_POOL_BYTES here: no overflow.
            node_bytes += bytes;
            if node_bytes > MAX_POOL_BYTES {
                return Err(bad(
                    f("buffers"),
                    format!(
                        "the pools of tenants 0 to {i} take {node_bytes} bytes on every node (buffers x buf_size); \
                         at most 64 TiB ({MAX_POOL_BYTES} bytes) in all"
                    ),
                ));
            }
            if t.recv_quota == 0 {
                return Err(bad(f("recv_quota"), "must be at least 1"));
            }
            if t.recv_quota >= t.buffers {
                return Err(bad(
                    f("recv_quota"),
                    format!("pool of {} buffers is not larger than the receive quota {}", t.buffers, t.recv_quota),
                ));
            }
            let posted = self.receives_posted(t);
            if posted >= u64::from(t.buffers) {
                return Err(bad(
                    f("buffers"),
                    format!(
                        "{} buffers: the agent keeps {posted} receives posted (at least 2, plus one for credit \
                         messages, per other fabric node), which leaves none",
                        t.buffers
                    ),
                ));
            }
            if t.api_key.as_deref() == Some("") {
                return Err(bad(f("api_key"), "empty; omit it for no key"));
            }
            if t.api_key.as_deref().is_some_and(|k| !k.bytes().all(|b| b.is_ascii_graphic())) {
                return Err(bad(
                    f("api_key"),
                    "printable ASCII without spaces only (a client sends it in an HTTP header)",
                ));
            }
            if t.rate_cap_mbps == Some(0) {
                return Err(bad(f("rate_cap_mbps"), "0 would block the tenant; omit it for no cap"));
            }
            if !(1..=MAX_NODE_QUEUE).contains(&t.node_queue) {
                return Err(bad(f("node_queue"), format!("must be 1 to {MAX_NODE_QUEUE}")));
            }
        }
        // An ingress makes a pool of its `buffers` for every tenant (as
        // `ingress::Pools::create` does), adds their sizes up first, and
        // keeps as many receives posted from each as an agent does. (The
        // pools' geometries hold: buf_size and max_chain passed the
        // tenants' own pools, and 2 <= buffers <= MAX_BUFFERS.)
        let buf_sizes: u64 = self.tenants.iter().map(|t| u64::from(t.buf_size)).sum(); // < 2^16 x 2^32
        // (`receives_posted` grows with the quota.)
        let most_quota = self.tenants.iter().rev().max_by_key(|t| t.recv_quota);
        for (i, g) in self.ingresses.iter().enumerate() {
            if g.buffers > MAX_BUFFERS {
                return Err(bad(
                    format!("ingress[{i}].buffers"),
                    format!("{} buffers; at most {MAX_BUFFERS} in a pool", g.buffers),
                ));
            }
            let bytes = u128::from(g.buffers) * u128::from(buf_sizes);
            if bytes > u128::from(MAX_POOL_BYTES) {
                return Err(bad(
                    format!("ingress[{i}].buffers"),
                    format!(
                        "{} buffers for each of the {} tenants take {bytes} bytes of pools (buffers x the \
                         tenants' buf_size); at most 64 TiB ({MAX_POOL_BYTES} bytes) in all",
                        g.buffers,
                        self.tenants.len()
                    ),
                ));
            }
            if let Some((t, posted)) =
                most_quota.map(|t| (t, self.receives_posted(t))).filter(|&(_, p)| u64::from(g.buffers) <= p)
            {
                return Err(bad(
                    format!("ingress[{i}].buffers"),
                    format!(
                        "{} buffers leave none for requests: the edge keeps {posted} receives of tenant {}'s \
                         posted (at least 2, plus one for credit messages, per other fabric node)",
                        g.buffers, t.name
                    ),
                ));
            }
        }
        // The agent numbers a tenant's send queues, one per fabric node and
        // one per function of the tenant, within a u16: each tenant's
        // functions are counted.
        let mut per_tenant = vec![0usize; self.tenants.len()];
        for (i, func) in self.functions.iter().enumerate() {
            let f = |name: &str| format!("function[{i}].{name}");
            let Some(&t) = tenant_ids.get(func.tenant.as_str()) else {
                return Err(bad(f("tenant"), format!("unknown tenant \"{}\"", func.tenant)));
            };
            per_tenant[usize::from(t)] += 1;
            if func.instances == 0 {
                return Err(bad(f("instances"), "must be at least 1"));
            }
            if let Err(e) = wire::segment::RingLayout::new(func.ring_capacity) {
                return Err(bad(f("ring_capacity"), e.to_string()));
            }
        }
        let fabric_nodes = self.nodes.len() + self.ingresses.len();
        if let Some((t, n)) = per_tenant.iter().enumerate().find(|&(_, &n)| fabric_nodes + n > usize::from(u16::MAX)) {
            return Err(bad(
                format!("tenant[{t}]"),
                format!("{n} functions and {fabric_nodes} nodes and ingresses: at most {} together", u16::MAX),
            ));
        }
        let mut seen = HashSet::new();
        for (i, r) in self.routes.iter().enumerate() {
            let f = |name: &str| format!("route[{i}].{name}");
            if !r.path.starts_with('/') {
                return Err(bad(f("path"), format!("\"{}\" must start with /", r.path)));
            }
            if !r.path.bytes().all(|b| b.is_ascii_graphic() && b != b'?' && b != b'#') {
                return Err(bad(f("path"), format!("\"{}\": printable ASCII, no spaces, '?' or '#'", r.path)));
            }
            if r.host.as_deref().is_some_and(|h| normalize_host(h).is_empty()) {
                return Err(bad(f("host"), "empty; omit it for every host"));
            }
            if let Some(h) = r.host.as_deref().filter(|h| !is_host(h)) {
                return Err(bad(
                    f("host"),
                    format!(
                        "\"{h}\": a name (letters, digits, '-', '.', '_', '~') or [IP literal], and an optional \
                         :port of at most 65535"
                    ),
                ));
            }
            let Some(&tenant) = tenant_ids.get(r.tenant.as_str()) else {
                return Err(bad(f("tenant"), format!("unknown tenant \"{}\"", r.tenant)));
            };
            if r.chain.is_empty() || r.chain.len() > usize::from(u8::MAX) {
                return Err(bad(f("chain"), "a chain has 1 to 255 functions"));
            }
            for (j, name) in r.chain.iter().enumerate() {
                let Some(&id) = function_ids.get(name.as_str()) else {
                    return Err(bad(format!("route[{i}].chain[{j}]"), format!("unknown function \"{name}\"")));
                };
                if tenant_ids.get(self.functions[usize::from(id)].tenant.as_str()) != Some(&tenant) {
                    return Err(bad(
                        format!("route[{i}].chain[{j}]"),
                        format!("function \"{name}\" belongs to another tenant than \"{}\"", r.tenant),
                    ));
                }
            }
            if r.timeout_ms == 0 {
                return Err(bad(f("timeout_ms"), "must be at least 1"));
            }
            if !seen.insert((r.host.as_deref().map(normalize_host), r.path.clone())) {
                return Err(bad(f("path"), format!("duplicate route for host {:?} path \"{}\"", r.host, r.path)));
            }
        }
        Ok(Index { nodes, tenants: tenant_ids, functions: function_ids, ingresses })
    }

    /// Ids of the nodes function `f` runs on, in the file's order.
    pub fn function_nodes(&self, f: &Function) -> Vec<u16> {
        f.nodes.iter().filter_map(|n| self.node_id(n)).collect()
    }

    /// Whether function `f` runs on node `node`.
    pub fn runs_on(&self, f: &Function, node: u16) -> bool {
        self.nodes.get(usize::from(node)).is_some_and(|n| f.nodes.contains(&n.name))
    }

    /// Id of the node called `name`.
    pub fn node_id(&self, name: &str) -> Option<u16> {
        find(&self.index.nodes, &self.nodes, |n| &n.name, name)
    }

    /// Fabric nodes: every worker node, then every ingress (fewer than
    /// `u16::MAX`, checked at parse).
    pub fn fabric_nodes(&self) -> u16 {
        (self.nodes.len() + self.ingresses.len()) as u16
    }

    /// Fabric node id of ingress `i` (after every worker node).
    pub fn ingress_node_id(&self, i: usize) -> Option<u16> {
        if i < self.ingresses.len() { u16::try_from(self.nodes.len() + i).ok() } else { None }
    }

    /// Fabric address of fabric node `id` (a worker node or an ingress).
    pub fn fabric_address(&self, id: u16) -> Option<&str> {
        let i = usize::from(id);
        match self.nodes.get(i) {
            Some(n) => Some(&n.address),
            None => self.ingresses.get(i - self.nodes.len()).map(|g| g.address.as_str()),
        }
    }

    /// Fabric node id of the node or ingress called `name`.
    pub fn fabric_node_id(&self, name: &str) -> Option<u16> {
        self.node_id(name).or_else(|| {
            find(&self.index.ingresses, &self.ingresses, |g| &g.name, name)
                .and_then(|i| self.ingress_node_id(usize::from(i)))
        })
    }

    /// Id of the tenant called `name`.
    pub fn tenant_id(&self, name: &str) -> Option<u16> {
        find(&self.index.tenants, &self.tenants, |t| &t.name, name)
    }

    /// Id of the function called `name`.
    pub fn function_id(&self, name: &str) -> Option<u16> {
        find(&self.index.functions, &self.functions, |f| &f.name, name)
    }

    /// What in a valid config can still wedge at run time, one sentence
    /// each (the agent logs them at start). Today: a tenant pool smaller
    /// than what the fabric alone may hold of it on a node, the receives
    /// it keeps posted plus a chain short of its last fragment from every
    /// other fabric node at once. Chains open on several connections can
    /// then take the whole pool, and none can finish until one is dropped
    /// as stalled (after `fabric::port::CHAIN_STALL`).
    pub fn warnings(&self) -> Vec<String> {
        let peers = u64::from(self.fabric_nodes().saturating_sub(1));
        let mut out = Vec::new();
        for t in self.tenants.iter().filter(|_| peers > 0) {
            let posted = self.receives_posted(t);
            let held = posted + peers * u64::from(t.max_chain.saturating_sub(1));
            if u64::from(t.buffers) <= held {
                out.push(format!(
                    "tenant {}: a pool of {} buffers can be held whole by the fabric ({posted} receives posted, \
                     and a chain of up to {} buffers open from each of the {peers} other fabric nodes, make {held}): \
                     messages from other nodes then stall and are dropped after 5 s; \
                     raise buffers or lower max_chain or recv_quota",
                    t.name,
                    t.buffers,
                    t.max_chain.saturating_sub(1),
                ));
            }
        }
        out
    }

    /// Receives the agent keeps posted for tenant `t` on a node: per other
    /// fabric node its share of `recv_quota` (at least 2), plus one kept
    /// for credit messages.
    pub fn receives_posted(&self, t: &Tenant) -> u64 {
        let peers = u64::from(self.fabric_nodes().saturating_sub(1));
        peers * (u64::from(t.recv_quota).checked_div(peers).unwrap_or(0).max(2) + 1)
    }

    /// The checked pool geometry of tenant `id`.
    pub fn pool_geometry(&self, id: u16) -> Option<wire::PoolGeometry> {
        let t = self.tenants.get(usize::from(id))?;
        wire::PoolGeometry::new(id, t.buf_size, t.buffers, wire::fabric::HEADROOM, t.max_chain).ok()
    }

    /// The geometry of an ingress's own pool of `buffers` buffers for
    /// tenant `t` (id `id`): the tenant's buffer size, its chains no longer
    /// than the pool.
    pub fn ingress_pool_geometry(
        t: &Tenant,
        id: u16,
        buffers: u32,
    ) -> Result<wire::PoolGeometry, wire::desc::GeometryError> {
        wire::PoolGeometry::new(id, t.buf_size, buffers, wire::fabric::HEADROOM, t.max_chain.min(buffers))
    }
}

/// `a` with an IPv4-mapped IPv6 address (`[::ffff:127.0.0.1]`) written as
/// the IPv4 address it is: a listener on either takes the port from one on
/// the other, and `[::ffff:0.0.0.0]` is the IPv4 wildcard.
fn ipv4_unmapped(a: std::net::SocketAddr) -> std::net::SocketAddr {
    match a {
        std::net::SocketAddr::V6(v6) => {
            v6.ip().to_ipv4_mapped().map_or(a, |v4| std::net::SocketAddr::new(v4.into(), v6.port()))
        }
        std::net::SocketAddr::V4(_) => a,
    }
}

/// A listen or dial address: an IP address and a port (no name lookup).
fn socket_addr(field: &str, s: &str) -> Result<std::net::SocketAddr, ConfigError> {
    s.parse().map_err(|_| {
        let why = if s.rsplit_once(':').is_some_and(|(h, _)| h.parse::<std::net::IpAddr>().is_err()) {
            "is not IP:port (host names are not looked up; write the address)"
        } else {
            "is not IP:port"
        };
        bad(field, format!("\"{s}\" {why}"))
    })
}

/// Longest node `runtime_dir`: host-shimd's socket goes in it, bound under
/// a temporary name (`shimd.sock.<pid>.tmp`), and a Unix socket's path has
/// at most 107 bytes.
pub const MAX_RUNTIME_DIR: usize = 107 - "/shimd.sock.4194304.tmp".len();

fn runtime_dir(field: &str, dir: &Path, node: bool) -> Result<(), ConfigError> {
    if !dir.is_absolute() {
        return Err(bad(field, format!("{}: must be an absolute path", dir.display())));
    }
    if node && dir.as_os_str().len() > MAX_RUNTIME_DIR {
        return Err(bad(
            field,
            format!("{}: at most {MAX_RUNTIME_DIR} bytes (host-shimd's Unix socket goes in it)", dir.display()),
        ));
    }
    Ok(())
}

/// A route's or a request's host as routes compare it: lowercase, without
/// a port or a trailing dot.
pub fn normalize_host(h: &str) -> String {
    host_name(h).to_ascii_lowercase()
}

/// `h` without a port or a trailing dot: equal to [`normalize_host`]`(h)`
/// but for ASCII case (compare with `eq_ignore_ascii_case`; allocates
/// nothing).
pub fn host_name(h: &str) -> &str {
    // Strip a port (but not the colons of a bracketed IPv6 literal).
    let h = match h.rfind(':') {
        Some(i) if !h[i..].contains(']') && h[i + 1..].bytes().all(|b| b.is_ascii_digit()) => &h[..i],
        _ => h,
    };
    h.trim_end_matches('.')
}

/// Whether `h` is a `Host` value: `uri-host [":" port]` (RFC 9110 7.2,
/// RFC 3986 3.2.2), where the host is an IP literal in brackets or a
/// name of letters, digits, `-`, `.`, `_` and `~` that is not empty once
/// its trailing dots are dropped (RFC 9110 4.2.1: an `http` URI with an
/// empty host is invalid), and the port is digits (none: the scheme's
/// default, RFC 3986 3.2.3) naming a TCP port (at most 65535). RFC 3986's
/// names may also hold sub-delimiters (`!$&'()*+,;=`) and percent-escapes;
/// they are refused too: no route's host has them, a comma is what a proxy
/// leaves where it joined two Host lines, and no DNS name has an escape
/// (`%73pecial.example` is `special.example` to a proxy that undoes
/// escapes, and another name to one that compares bytes). The ingress
/// holds requests' `Host` and absolute-form authorities to it, and the
/// config routes' `host`.
pub fn is_host(h: &str) -> bool {
    let h = h.as_bytes();
    // The port: digits after the last colon outside brackets.
    let host = match h.iter().rposition(|&b| b == b':') {
        Some(i) if !h[i..].contains(&b']') => {
            let port = h[i + 1..].iter().try_fold(0u32, |n, &b| {
                let n = n * 10 + u32::from(b.wrapping_sub(b'0'));
                (b.is_ascii_digit() && n <= u32::from(u16::MAX)).then_some(n)
            });
            if port.is_none() {
                return false;
            }
            &h[..i]
        }
        _ => h,
    };
    if let Some(literal) = host.strip_prefix(b"[") {
        let Some(inner) = literal.strip_suffix(b"]") else { return false };
        return !inner.is_empty() && inner.iter().all(|&b| b.is_ascii_hexdigit() || b == b':' || b == b'.');
    }
    host.iter().all(|&b| b.is_ascii_alphanumeric() || b"-._~".contains(&b)) && host.iter().any(|&b| b != b'.')
}

fn position<'a>(mut names: impl Iterator<Item = &'a str>, name: &str) -> Option<u16> {
    names.position(|n| n == name).and_then(|i| u16::try_from(i).ok())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_host_is_a_name_or_bracketed_ip_literal_and_an_optional_port() {
        for h in [
            "x",
            "Special.Example:8080",
            "a.b.",
            "127.0.0.1:80",
            "[::1]",
            "[::1]:443",
            "x:",
            "a-b_c~d",
            "x:65535",
            "x:080",
        ] {
            assert!(is_host(h), "{h:?}");
        }
        for h in [
            "a, b",
            "a,b",
            "a b",
            "u@h",
            "h/p",
            "h:80:81",
            "h:8x",
            "[::1",
            "::1",
            "[]",
            "[::1]x",
            "%4",
            "%zz",
            "é",
            "",
            ":80",
            ":",
            ".",
            "..:80",
            "%41b",
            "x%2e",
            "x:65536",
            "x:99999",
            "x:4294967296",
            "[::1]:65536",
        ] {
            assert!(!is_host(h), "{h:?}");
        }
    }

    #[test]
    fn chains_are_limited_to_one_comch_message_with_a_dpu_node() {
        let chain = |mode: &str, max_chain: u32| {
            let text = GOOD.replacen("mode = \"host\"", &format!("mode = \"{mode}\""), 1).replacen(
                "buffers = 1024",
                &format!("buffers = 4096\nmax_chain = {max_chain}"),
                1,
            );
            Cluster::parse(&text).map(|c| c.tenants[0].max_chain)
        };
        let most = wire::ctrl::MAX_MESSAGE_CHAIN as u32;
        assert_eq!(chain("dpu", most).unwrap(), most);
        let e = chain("dpu", most + 1).unwrap_err().to_string();
        assert!(e.contains("tenant[0].max_chain: at most 1008 with a node in dpu mode"), "{e}");
        assert_eq!(chain("host", 2000).unwrap(), 2000, "no comch without a dpu node");
    }

    const GOOD: &str = r#"
[[node]]
name = "node-a"
address = "127.0.0.1:7101"
runtime_dir = "/tmp/dne/node-a"

[[node]]
name = "node-b"
mode = "host"
fabric = "verbs"
address = "127.0.0.1:7102"
runtime_dir = "/tmp/dne/node-b"

[[tenant]]
name = "acme"
weight = 6
buffers = 1024
recv_quota = 128

[[tenant]]
name = "globex"
weight = 1
buf_size = 4096
buffers = 256
recv_quota = 64
rate_cap_mbps = 100

[[function]]
name = "upper"
tenant = "acme"
node = "node-a"

[[function]]
name = "rot13"
tenant = "acme"
node = "node-b"
instances = 2

[[function]]
name = "echo"
tenant = "globex"
node = "node-b"

[[route]]
path = "/acme"
tenant = "acme"
chain = ["upper", "rot13"]

[[route]]
host = "globex.example"
path = "/"
tenant = "globex"
chain = ["echo"]
timeout_ms = 100

[[ingress]]
name = "edge"
address = "127.0.0.1:7100"
http = "127.0.0.1:8080"
runtime_dir = "/tmp/dne/edge"
"#;

    #[test]
    fn good_file_parses_with_ids_by_position() {
        let c = Cluster::parse(GOOD).unwrap();
        assert_eq!(c.node_id("node-b"), Some(1));
        assert_eq!(c.tenant_id("globex"), Some(1));
        assert_eq!(c.function_id("echo"), Some(2));
        assert_eq!(c.nodes[0].mode, Mode::Emulated);
        assert_eq!(c.nodes[1].fabric, FabricKind::Verbs);
        assert_eq!(c.tenants[0].buf_size, 16384);
        assert_eq!(c.functions[1].instances, 2);
        assert_eq!(c.function_nodes(&c.functions[0]), [0]);
        assert!(c.runs_on(&c.functions[0], 0) && !c.runs_on(&c.functions[0], 1));
        let two = Cluster::parse(&GOOD.replacen("node = \"node-a\"", "nodes = [\"node-b\", \"node-a\"]", 1)).unwrap();
        assert_eq!(two.function_nodes(&two.functions[0]), [1, 0], "in the file's order");
        assert!(two.runs_on(&two.functions[0], 0) && two.runs_on(&two.functions[0], 1));
        assert_eq!(c.routes[1].timeout_ms, 100);
        assert_eq!(c.pool_geometry(1).unwrap().payload_cap(), 4096 - 64);
        assert_eq!(c.ingresses[0].body_limit, 1 << 20);
        assert_eq!(
            (c.tenants[0].node_queue, c.ingresses[0].tenant_queue, c.ingresses[0].route_queue),
            (1024, 1024, 256)
        );
        assert_eq!(c.ingresses[0].credit_wait_ms, 1000);
        assert_eq!(c.ingresses[0].max_connections, 4096);
        assert_eq!(c.ingress_node_id(0), Some(2));
        assert_eq!(c.fabric_node_id("edge"), Some(2));
        assert_eq!(c.fabric_address(2), Some("127.0.0.1:7100"));
        assert_eq!(c.fabric_address(1), Some("127.0.0.1:7102"));
        assert_eq!(c.fabric_address(3), None);
    }

    fn err(edit: impl Fn(&str) -> String) -> String {
        Cluster::parse(&edit(GOOD)).unwrap_err().to_string()
    }

    #[test]
    fn bad_fields_are_named() {
        let long = format!("runtime_dir = \"/{}\"", "d".repeat(MAX_RUNTIME_DIR));
        let long_dir = long.as_str();
        let cases: &[(&str, &str, &str)] = &[
            (
                "tenant = \"acme\"\nnode = \"node-a\"",
                "tenant = \"nope\"\nnode = \"node-a\"",
                "function[0].tenant: unknown tenant \"nope\"",
            ),
            ("node = \"node-a\"", "node = \"node-z\"", "function[0].node: unknown node \"node-z\""),
            ("node = \"node-a\"", "nodes = [\"node-b\", \"node-z\"]", "function[0].nodes[1]: unknown node \"node-z\""),
            (
                "node = \"node-a\"",
                "nodes = [\"node-a\", \"node-a\"]",
                "function[0].nodes[1]: node \"node-a\" named twice",
            ),
            ("node = \"node-a\"", "nodes = []", "function[0].nodes: must name at least one node"),
            ("node = \"node-a\"", "node = \"node-a\"\nnodes = [\"node-b\"]", "function[0].nodes: give node or nodes"),
            ("tenant = \"acme\"\nnode = \"node-a\"", "tenant = \"acme\"", "function[0].node: missing"),
            ("name = \"rot13\"", "name = \"upper\"", "function[1].name: duplicate function \"upper\""),
            ("weight = 6", "weight = 0", "tenant[0].weight: weight must be at least 1"),
            (
                "recv_quota = 128",
                "recv_quota = 1024",
                "tenant[0].recv_quota: pool of 1024 buffers is not larger than the receive quota 1024",
            ),
            ("buf_size = 4096", "buf_size = 1000", "tenant[1].buf_size"),
            (
                "chain = [\"upper\", \"rot13\"]",
                "chain = [\"upper\", \"echo\"]",
                "route[0].chain[1]: function \"echo\" belongs to another tenant",
            ),
            ("chain = [\"upper\", \"rot13\"]", "chain = []", "route[0].chain"),
            ("path = \"/acme\"", "path = \"acme\"", "route[0].path"),
            ("instances = 2", "instances = 0", "function[1].instances"),
            ("address = \"127.0.0.1:7101\"", "address = \"nowhere\"", "node[0].address"),
            (
                "address = \"127.0.0.1:7101\"",
                "address = \"127.0.0.1:7101\"\ncomch = \"../x\"",
                "node[0].comch: \"../x\"",
            ),
            ("rate_cap_mbps = 100", "rate_cap_mbps = 0", "tenant[1].rate_cap_mbps"),
            ("weight = 6", "weight = 6\nnode_queue = 0", "tenant[0].node_queue: must be 1 to 4096"),
            ("weight = 6", "weight = 6\nnode_queue = 4097", "tenant[0].node_queue: must be 1 to 4096"),
            (
                "runtime_dir = \"/tmp/dne/edge\"",
                "runtime_dir = \"/tmp/dne/edge\"\ntenant_queue = 0",
                "ingress[0].tenant_queue: must be 1 to 65536",
            ),
            (
                "runtime_dir = \"/tmp/dne/edge\"",
                "runtime_dir = \"/tmp/dne/edge\"\ntenant_queue = 8\nroute_queue = 9",
                "ingress[0].route_queue: must be 1 to tenant_queue (8)",
            ),
            (
                "runtime_dir = \"/tmp/dne/edge\"",
                "runtime_dir = \"/tmp/dne/edge\"\ncredit_wait_ms = 0",
                "ingress[0].credit_wait_ms: must be at least 1",
            ),
            (
                "runtime_dir = \"/tmp/dne/edge\"",
                "runtime_dir = \"/tmp/dne/edge\"\nmax_connections = 0",
                "ingress[0].max_connections: must be 1 to 1048576",
            ),
            ("name = \"acme\"", "name = \"ac me\"", "tenant[0].name"),
            ("weight = 6", "weight = 6\ncolour = \"red\"", "unknown field `colour`"),
            ("name = \"edge\"", "name = \"node-b\"", "ingress[0].name: \"node-b\" is also a node's name"),
            ("http = \"127.0.0.1:8080\"", "http = \"x\"", "ingress[0].http"),
            ("weight = 6", "weight = 6\napi_key = \"\"", "tenant[0].api_key"),
            (
                "runtime_dir = \"/tmp/dne/edge\"",
                "runtime_dir = \"/tmp/dne/edge\"\nbuffers = 64",
                "ingress[0].buffers: 64 buffers leave none for requests: the edge keeps 130 receives of tenant acme's posted",
            ),
            // From a review as a new user (each was accepted before).
            (
                "address = \"127.0.0.1:7102\"",
                "address = \"127.0.0.1:7101\"",
                "node[1].address: 127.0.0.1:7101 is also node[0].address",
            ),
            (
                "address = \"127.0.0.1:7100\"",
                "address = \"127.0.0.1:7102\"",
                "ingress[0].address: 127.0.0.1:7102 is also node[1].address",
            ),
            (
                "http = \"127.0.0.1:8080\"",
                "http = \"127.0.0.1:7101\"",
                "ingress[0].http: 127.0.0.1:7101 is also node[0].address",
            ),
            (
                "address = \"127.0.0.1:7101\"",
                "address = \"0.0.0.0:7101\"",
                "node[0].address: 0.0.0.0:7101: peers dial it",
            ),
            (
                "address = \"127.0.0.1:7101\"",
                "address = \"127.0.0.1:0\"",
                "node[0].address: 127.0.0.1:0: peers dial it",
            ),
            ("address = \"127.0.0.1:7101\"", "address = \"localhost:7101\"", "host names are not looked up"),
            (
                "runtime_dir = \"/tmp/dne/node-a\"",
                "runtime_dir = \"dne/node-a\"",
                "node[0].runtime_dir: dne/node-a: must be an absolute path",
            ),
            (
                "runtime_dir = \"/tmp/dne/edge\"",
                "runtime_dir = \"edge\"",
                "ingress[0].runtime_dir: edge: must be an absolute path",
            ),
            ("runtime_dir = \"/tmp/dne/node-a\"", long_dir, "node[0].runtime_dir: /ddd"),
            ("host = \"globex.example\"", "host = \"\"", "route[1].host: empty"),
            ("host = \"globex.example\"", "host = \"globex.example, x\"", "route[1].host: \"globex.example, x\""),
            ("host = \"globex.example\"", "host = \"u@globex.example\"", "route[1].host"),
            ("path = \"/acme\"", "path = \"/ac me\"", "route[0].path"),
            ("path = \"/acme\"", "path = \"/acme?x=1\"", "route[0].path"),
            ("weight = 6", "weight = 6\napi_key = \"a\\tb\"", "tenant[0].api_key: printable ASCII"),
        ];
        for (from, to, want) in cases {
            let got = err(|s| s.replacen(from, to, 1));
            assert!(got.contains(want), "replacing {from:?} by {to:?}: got {got:?}, want {want:?}");
        }
    }

    /// Routes compare hosts as the ingress matches them: a second route for
    /// the same host spelt otherwise (case, port, trailing dot) is a
    /// duplicate. Before, it was accepted and could never match.
    #[test]
    fn routes_for_one_host_spelt_two_ways_are_duplicates() {
        let twin =
            "\n[[route]]\nhost = \"GLOBEX.example.:8080\"\npath = \"/\"\ntenant = \"globex\"\nchain = [\"echo\"]\n";
        let got = Cluster::parse(&format!("{GOOD}{twin}")).unwrap_err().to_string();
        assert!(got.starts_with("route[2].path: duplicate route"), "{got}");
    }

    /// The cluster file the packages ship (and the README's examples
    /// start from) is valid, with nothing to warn about.
    #[test]
    fn the_packaged_cluster_file_is_valid() {
        let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../packaging/common/cluster.toml");
        let c = Cluster::load(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
        assert_eq!(c.warnings(), [] as [String; 0]);
        // Two ingresses on every address of their machines.
        let two = format!(
            "{GOOD}\n[[ingress]]\nname = \"edge2\"\naddress = \"127.0.0.1:7099\"\nhttp = \"0.0.0.0:8080\"\n\
             runtime_dir = \"/tmp/dne/edge2\"\n"
        )
        .replacen("http = \"127.0.0.1:8080\"", "http = \"0.0.0.0:8080\"", 1);
        Cluster::parse(&two).unwrap();
    }

    /// The edits the packaged cluster file and README.md tell a user to
    /// make give a valid file: uncommenting its `[[ingress]]` block as it
    /// stands, and README.md's host mode (every node `mode = "host"`).
    #[test]
    fn the_packaged_cluster_file_with_its_ingress_uncommented_is_valid() {
        let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../packaging/common/cluster.toml");
        let text = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
        let from = text.find("\n# [[ingress]]\n").expect("the packaged file has a commented [[ingress]] block") + 1;
        let mut edited = text[..from].to_string();
        for line in text[from..].lines() {
            let code = line.strip_prefix("# ").unwrap_or_else(|| panic!("not a commented line: {line:?}"));
            edited.push_str(code);
            edited.push('\n');
        }
        let c =
            Cluster::parse(&edited).unwrap_or_else(|e| panic!("{} with [[ingress]] uncommented: {e}", path.display()));
        assert_eq!(c.warnings(), [] as [String; 0]);
        let i = &c.ingresses[..];
        assert_eq!(i.len(), 1);
        // The values it shows are the defaults, so that a default changed
        // in the code cannot leave the example setting the old one.
        let defaults = Cluster::parse(&format!(
            "{}\n[[ingress]]\nname = \"{}\"\naddress = \"{}\"\nhttp = \"{}\"\nruntime_dir = \"{}\"\n",
            &text[..from],
            i[0].name,
            i[0].address,
            i[0].http,
            i[0].runtime_dir.display()
        ))
        .unwrap();
        assert_eq!(i, &defaults.ingresses[..], "the example's values are not the defaults");

        let host = text.replace("mode = \"dpu\"", "mode = \"host\"");
        let c = Cluster::parse(&host).unwrap_or_else(|e| panic!("{} in host mode: {e}", path.display()));
        assert!(c.nodes.iter().all(|n| n.mode == Mode::Host));
    }

    /// Tenants of the largest pools one geometry allows: each pool's size
    /// fits a u64, their sum (what host-shimd adds up before making any)
    /// need not. Before, the file was accepted and host-shimd's sum
    /// overflowed (a panic in a debug build; in a release build the sum
    /// wrapped to a small number and passed its memory check): two tenants
    /// of (2^32-2) buffers did it then; with counts bounded
    /// ([`MAX_BUFFERS`]), 256 tenants of such buffers still would.
    #[test]
    fn tenant_pools_larger_than_a_process_can_map_are_refused() {
        let huge = "buf_size = 4294967232\nbuffers = 16777216\nmax_chain = 1";
        let e = Cluster::parse(&GOOD.replacen("buffers = 1024", huge, 1)).unwrap_err().to_string();
        assert!(e.starts_with("tenant[0].buffers: 16777216 buffers of 4294967232 bytes"), "{e}");
        assert!(e.contains("at most 64 TiB"), "{e}");
        // Within the bound alone, beyond it together: the second is named.
        let half = "buf_size = 1073741824\nbuffers = 40000\nmax_chain = 1";
        let two = GOOD.replacen("buffers = 1024", half, 1).replacen("buf_size = 4096\nbuffers = 256", half, 1);
        let e = Cluster::parse(&two).unwrap_err().to_string();
        assert!(e.starts_with("tenant[1].buffers: the pools of tenants 0 to 1 take 85899345920000 bytes"), "{e}");
        // The largest allowed still parses.
        let most = GOOD.replacen("buffers = 1024", "buf_size = 1073741824\nbuffers = 65472\nmax_chain = 1", 1);
        Cluster::parse(&most).unwrap();
    }

    /// An ingress makes a pool of its own `buffers` for every tenant, of
    /// the tenant's `buf_size`, and adds their sizes up first. Before, only
    /// `buffers >= 2` was checked: a count no pool can have (u32::MAX, the
    /// nil index) failed when the ingress started, and pools whose sizes
    /// overflow a u64 together panicked there (debug build). Now the count
    /// is bounded ([`MAX_BUFFERS`]) and the sizes together too.
    #[test]
    fn ingress_pools_are_checked_at_parse() {
        let edge = |buffers: u32| {
            let text = GOOD.replacen("buf_size = 4096", "buf_size = 4194304", 1).replacen(
                "runtime_dir = \"/tmp/dne/edge\"",
                &format!("runtime_dir = \"/tmp/dne/edge\"\nbuffers = {buffers}"),
                1,
            );
            Cluster::parse(&text).map(|c| c.ingresses[0].buffers).map_err(|e| e.to_string())
        };
        let e = edge(u32::MAX).unwrap_err();
        assert!(e.starts_with("ingress[0].buffers: 4294967295 buffers; at most 16777216"), "{e}");
        let e = edge(MAX_BUFFERS).unwrap_err();
        assert!(
            e.starts_with("ingress[0].buffers: 16777216 buffers for each of the 2 tenants take 70643622084608 bytes"),
            "{e}"
        );
        assert!(e.contains("at most 64 TiB"), "{e}");
        assert_eq!(edge(MAX_BUFFERS / 2), Ok(MAX_BUFFERS / 2));
    }

    /// An ingress's port keeps receives posted from its pool of each
    /// tenant as an agent's does: the tenant's `recv_quota` spread over
    /// the other fabric nodes, at least 2 on each connection, which can be
    /// far more than `recv_quota`. Before, only `buffers > recv_quota` was
    /// checked: in [`GOOD`] with quotas of 1 (two other fabric nodes) an
    /// edge of 4 buffers was accepted, and its port's receives (2 on each
    /// of its 2 connections) take the whole pool, leaving none for a
    /// request. Now the bound is the tenant pools' own
    /// ([`Cluster::receives_posted`], which also counts one per node for
    /// credit messages).
    #[test]
    fn an_ingress_pool_leaves_buffers_beside_its_receives() {
        let edge = |buffers: u32| {
            let text = GOOD
                .replacen("recv_quota = 128", "recv_quota = 1", 1)
                .replacen("recv_quota = 64", "recv_quota = 1", 1)
                .replacen(
                    "runtime_dir = \"/tmp/dne/edge\"",
                    &format!("runtime_dir = \"/tmp/dne/edge\"\nbuffers = {buffers}"),
                    1,
                );
            Cluster::parse(&text)
                .map(|c| (c.receives_posted(&c.tenants[0]), c.ingresses[0].buffers))
                .map_err(|e| e.to_string())
        };
        let e = edge(4).expect_err("an edge pool its receives take whole");
        assert_eq!(
            e,
            "ingress[0].buffers: 4 buffers leave none for requests: the edge keeps 6 receives of tenant \
             acme's posted (at least 2, plus one for credit messages, per other fabric node)"
        );
        assert!(edge(6).is_err());
        assert_eq!(edge(7), Ok((6, 7)));
    }

    /// The agent and the fabric size tables by a pool's buffer count and
    /// do u32 arithmetic on its receive quota (the agent's comch link
    /// targets `recv_quota / peers * (peers + 1)` posted buffers, the
    /// fabric posts `recv_quota / peers + 1` receives per connection plus a
    /// send window). Before, any count below u32::MAX passed: this file
    /// (a 512 GiB pool, well within the pool bound) made the first product
    /// overflow a u32 in the agent of a dpu node, and tables of 4 G entries.
    #[test]
    fn buffer_counts_are_bounded() {
        let count = |tenant: &str, edge: u32| {
            let text = GOOD
                .replacen("buffers = 1024\nrecv_quota = 128", tenant, 1)
                .replacen(
                    "runtime_dir = \"/tmp/dne/edge\"",
                    &format!("runtime_dir = \"/tmp/dne/edge\"\nbuffers = {edge}"),
                    1,
                )
                .replacen("mode = \"host\"", "mode = \"dpu\"", 1);
            Cluster::parse(&text).map(|c| (c.tenants[0].buffers, c.ingresses[0].buffers)).map_err(|e| e.to_string())
        };
        let huge = "buf_size = 128\nbuffers = 4294967294\nrecv_quota = 4294967000\nmax_chain = 1";
        let e = count(huge, 4294967294).unwrap_err();
        assert_eq!(e, "tenant[0].buffers: 4294967294 buffers; at most 16777216 in a pool");
        let most = format!("buffers = {MAX_BUFFERS}\nrecv_quota = 128");
        assert_eq!(count(&most, MAX_BUFFERS), Ok((MAX_BUFFERS, MAX_BUFFERS)));
        let e = count("buffers = 1024\nrecv_quota = 128", MAX_BUFFERS + 1).unwrap_err();
        assert_eq!(e, "ingress[0].buffers: 16777217 buffers; at most 16777216 in a pool");
    }

    /// Route ids are positions, and the ingress keeps them as u16. Before,
    /// the number of routes was not bounded: route 65536 of a file got id
    /// 0 in the ingress's router, so its requests went down route 0's chain
    /// as route 0's tenant.
    #[test]
    fn route_ids_fit_a_u16() {
        // Built in memory (a file of 65535 routes takes seconds to parse
        // in a debug build) and checked as `parse` checks it.
        let routes = |n: usize| {
            let mut c = Cluster::parse(GOOD).unwrap();
            let r = c.routes[0].clone();
            c.routes.extend((c.routes.len()..n).map(|k| Route { path: format!("/r{k}"), ..r.clone() }));
            c.validate().map(|()| c.routes.len()).map_err(|e| e.to_string())
        };
        let most = usize::from(u16::MAX) - 1;
        assert_eq!(routes(most), Ok(most));
        assert_eq!(routes(most + 1), Err("route: 65535 entries; at most 65534 allowed".into()));
    }

    /// An IPv4 address written as an IPv4-mapped IPv6 one is the same
    /// address: a listener on one takes the port from a listener on the
    /// other, and `[::ffff:0.0.0.0]` is the IPv4 wildcard. Before, both
    /// spellings passed as different addresses (the second process failed
    /// to bind at start; a fabric address on the wildcard was dialled).
    #[test]
    fn ipv4_mapped_addresses_are_the_ipv4_ones() {
        let cases = [
            (
                "address = \"127.0.0.1:7102\"",
                "address = \"[::ffff:127.0.0.1]:7101\"",
                "node[1].address: [::ffff:127.0.0.1]:7101 is also node[0].address",
            ),
            (
                "http = \"127.0.0.1:8080\"",
                "http = \"[::ffff:127.0.0.1]:7100\"",
                "ingress[0].http: [::ffff:127.0.0.1]:7100 is also ingress[0].address",
            ),
            (
                "address = \"127.0.0.1:7101\"",
                "address = \"[::ffff:0.0.0.0]:7101\"",
                "node[0].address: [::ffff:0.0.0.0]:7101: peers dial it",
            ),
        ];
        for (from, to, want) in cases {
            let got = err(|s| s.replacen(from, to, 1));
            assert!(got.starts_with(want), "replacing {from:?} by {to:?}: got {got:?}, want {want:?}");
        }
    }

    /// Checking a cluster takes time in proportion to its size. Before,
    /// every function's tenant, every route's tenant and chain, and every
    /// listen address was looked up by a scan of the others: this cluster
    /// (the size of a 14 MB file) took minutes in a debug build.
    #[test]
    fn a_large_cluster_is_checked_in_linear_time() {
        let n = usize::from(u16::MAX) - 1;
        let mut c = Cluster::parse(GOOD).unwrap();
        c.ingresses.clear();
        let (node, tenant, function, route) =
            (c.nodes[0].clone(), c.tenants[1].clone(), c.functions[2].clone(), c.routes[0].clone());
        c.nodes = (0..n / 2)
            .map(|k| Node {
                name: format!("n{k}"),
                address: format!("127.1.{}.{}:7101", k / 256, k % 256),
                ..node.clone()
            })
            .collect();
        // Enough buffers for the receives posted to n / 2 - 1 peers.
        c.tenants = (0..n)
            .map(|k| Tenant { name: format!("t{k}"), buf_size: 128, buffers: 1 << 17, ..tenant.clone() })
            .collect();
        c.functions = (0..n)
            .map(|k| Function {
                name: format!("f{k}"),
                tenant: format!("t{}", n - 1 - k),
                nodes: vec![format!("n{}", k % (n / 2))],
                ..function.clone()
            })
            .collect();
        c.routes = (0..n)
            .map(|k| Route {
                host: None,
                path: format!("/r{k}"),
                tenant: format!("t{}", n - 1 - k),
                chain: vec![format!("f{k}")],
                ..route.clone()
            })
            .collect();
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || tx.send(c.validate().map_err(|e| e.to_string())));
        // A watchdog, not a measure: it takes well under a second.
        let got = rx.recv_timeout(std::time::Duration::from_secs(60));
        assert_eq!(got, Ok(Ok(())), "no answer within 60 s");
    }

    /// The agent numbers a tenant's send queues (one per fabric node, one
    /// per function of the tenant) within a u16: a tenant with more is
    /// refused at parse. Before, the file was taken and the agent refused
    /// it at start.
    #[test]
    fn a_tenants_functions_and_the_nodes_fit_the_agents_numbering() {
        use std::fmt::Write;
        let text = |functions: usize| {
            let mut text = String::new();
            for k in 0..2 {
                let _ = write!(
                    text,
                    "[[node]]\nname = \"n{k}\"\naddress = \"127.0.0.1:{}\"\nruntime_dir = \"/tmp/n{k}\"\n",
                    7101 + k
                );
            }
            text.push_str("[[tenant]]\nname = \"t\"\nweight = 1\nbuffers = 256\nrecv_quota = 64\n");
            for k in 0..functions {
                let _ = write!(text, "[[function]]\nname = \"f{k}\"\ntenant = \"t\"\nnode = \"n0\"\n");
            }
            text
        };
        Cluster::parse(&text(65533)).unwrap();
        let Err(e) = Cluster::parse(&text(65534)) else { panic!("65534 functions and 2 nodes parsed") };
        assert_eq!(e.to_string(), "tenant[0]: 65534 functions and 2 nodes and ingresses: at most 65535 together");
    }

    /// The look-ups by name take time in proportion to the name, not to
    /// the cluster, so that a process's start, which looks up every
    /// function's tenant and nodes and asks which functions run on its
    /// node, takes time in proportion to the cluster's size. Before, each
    /// look-up scanned the nodes, tenants or functions: the start-up
    /// pattern below, over every node of this cluster, did not end within
    /// the watchdog's 60 s in a debug build (now: a few seconds).
    #[test]
    fn look_ups_by_name_on_a_large_cluster_take_constant_time() {
        use std::fmt::Write;
        let (nodes, functions) = (1000usize, 30000usize);
        let mut text = String::new();
        for k in 0..nodes {
            let _ = write!(
                text,
                "[[node]]\nname = \"n{k}\"\naddress = \"127.1.{}.{}:7101\"\nruntime_dir = \"/tmp/dne/n{k}\"\n",
                k / 256,
                k % 256
            );
        }
        for t in 0..2 {
            let _ = write!(text, "[[tenant]]\nname = \"t{t}\"\nweight = 1\nbuffers = 8192\nrecv_quota = 128\n");
        }
        for k in 0..functions {
            let _ = write!(
                text,
                "[[function]]\nname = \"f{k}\"\ntenant = \"t{}\"\nnodes = [\"n{}\", \"n{}\"]\n",
                k % 2,
                k % nodes,
                (k + 1) % nodes
            );
        }
        let c = Cluster::parse(&text).unwrap();
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            let mut placed = 0;
            for (k, f) in c.functions.iter().enumerate() {
                assert_eq!(c.function_id(&f.name), u16::try_from(k).ok());
                assert_eq!(c.tenant_id(&f.tenant), u16::try_from(k % 2).ok());
                let ids = c.function_nodes(f);
                assert_eq!(ids, [k % nodes, (k + 1) % nodes].map(|n| n as u16));
                assert!(ids.iter().all(|&n| c.node_id(&c.nodes[usize::from(n)].name) == Some(n)));
            }
            for node in 0..c.nodes.len() as u16 {
                placed += c.functions.iter().filter(|f| c.runs_on(f, node)).count();
            }
            tx.send(placed)
        });
        // A watchdog, not a measure: it takes seconds in a debug build.
        let got = rx.recv_timeout(std::time::Duration::from_secs(60));
        assert_eq!(got, Ok(2 * functions), "no answer within 60 s");
    }

    /// The look-ups answer for the lists as they are: an entry added after
    /// parsing is found (by a scan), one renamed is not found by its old
    /// name, and the index does not take part in equality.
    #[test]
    fn look_ups_follow_entries_changed_after_parsing() {
        let mut c = Cluster::parse(GOOD).unwrap();
        let f = Function { name: "late".into(), ..c.functions[0].clone() };
        c.functions.push(f);
        assert_eq!(c.function_id("late"), Some(3));
        assert_eq!(c.function_id("echo"), Some(2));
        c.tenants[1].name = "initech".into();
        assert_eq!(c.tenant_id("globex"), None);
        assert_eq!(c.tenant_id("acme"), Some(0));
        c.nodes.swap(0, 1);
        assert_eq!((c.node_id("node-a"), c.node_id("node-b")), (Some(1), Some(0)));
        assert_eq!(c.fabric_node_id("edge"), Some(2));
        assert_eq!(c.fabric_node_id("nowhere"), None);
        let mut d = Cluster::parse(GOOD).unwrap();
        assert_ne!(c, d);
        d.functions.push(c.functions[3].clone());
        d.tenants[1].name = "initech".into();
        d.nodes.swap(0, 1);
        assert_eq!(c, d);
    }

    /// host-shimd finds its node's agent by the agent's comch server name,
    /// so two nodes in dpu mode on one host with one name are refused,
    /// whether written or the default (`dne-` and the node's name). Before,
    /// the file was accepted: with the emulated DOCA on one machine the
    /// second agent could not serve the name and the second host-shimd
    /// reached the first node's agent. Nodes on different hosts may share
    /// a name (a fleet that names every card's server alike).
    #[test]
    fn two_dpu_nodes_with_one_comch_name_are_refused() {
        let dpu = |a: &str, b: &str| {
            GOOD.replacen("name = \"node-a\"", &format!("name = \"node-a\"\nmode = \"dpu\"{a}"), 1).replacen(
                "mode = \"host\"",
                &format!("mode = \"dpu\"{b}"),
                1,
            )
        };
        let e = Cluster::parse(&dpu("\ncomch = \"x\"", "\ncomch = \"x\"")).unwrap_err().to_string();
        assert_eq!(e, "node[1].comch: \"x\" is also the comch name of node[0] (\"node-a\") on the same host");
        let e = Cluster::parse(&dpu("\ncomch = \"dne-node-b\"", "")).unwrap_err().to_string();
        assert_eq!(
            e,
            "node[1].name: its default comch name \"dne-node-b\" is also the comch name of node[0] (\"node-a\") \
             on the same host; give one of them another (comch = \"...\")"
        );
        let default_twins = |modes: &str| {
            dpu("", "")
                .replace("\"node-a\"", "\"node.a\"")
                .replace("\"node-b\"", "\"node_a\"")
                .replace("mode = \"dpu\"", &format!("mode = \"{modes}\""))
        };
        let e = Cluster::parse(&default_twins("dpu")).unwrap_err().to_string();
        assert!(
            e.starts_with(
                "node[1].name: its default comch name \"dne-node_a\" is also the comch name of node[0] (\"node.a\") on the same host"
            ),
            "{e}"
        );
        // Only nodes in dpu mode have a comch server.
        Cluster::parse(&default_twins("host")).unwrap();
        let one_dpu = dpu("\ncomch = \"x\"", "\ncomch = \"x\"").replacen(
            "mode = \"dpu\"\ncomch = \"x\"\nfabric",
            "mode = \"host\"\ncomch = \"x\"\nfabric",
            1,
        );
        Cluster::parse(&one_dpu).unwrap();
        Cluster::parse(&dpu("\ncomch = \"x\"", "\ncomch = \"y\"")).unwrap();
        // On two hosts, one name is each host's own.
        let two_hosts = dpu("\ncomch = \"x\"", "\ncomch = \"x\"").replacen("127.0.0.1:7102", "127.0.0.2:7102", 1);
        Cluster::parse(&two_hosts).unwrap();
        let mapped = dpu("\ncomch = \"x\"", "\ncomch = \"x\"").replacen("127.0.0.1:7102", "[::ffff:127.0.0.1]:7102", 1);
        assert!(Cluster::parse(&mapped).is_err(), "an IPv4-mapped address is the same host");
        // Addresses that do not parse are the error, not the name.
        let unknown = dpu("\ncomch = \"x\"", "\ncomch = \"x\"").replacen("127.0.0.1:7101", "nowhere", 1).replacen(
            "127.0.0.1:7102",
            "nowhere2",
            1,
        );
        let e = Cluster::parse(&unknown).unwrap_err().to_string();
        assert!(e.starts_with("node[0].address: \"nowhere\""), "{e}");
    }

    /// A route's host with a port beyond a TCP port's range: the error
    /// says what the range is. Before it said only ":port".
    #[test]
    fn a_route_port_beyond_65535_is_named_as_such() {
        let e = err(|s| s.replacen("host = \"globex.example\"", "host = \"globex.example:65536\"", 1));
        assert!(e.starts_with("route[1].host: \"globex.example:65536\""), "{e}");
        assert!(e.contains("port of at most 65535"), "{e}");
    }

    #[test]
    fn empty_file_needs_nodes_and_tenants() {
        assert!(Cluster::parse("").unwrap_err().to_string().starts_with("node:"));
    }

    #[test]
    fn a_pool_the_fabric_can_hold_whole_is_warned_about() {
        let c = Cluster::parse(GOOD).unwrap();
        assert_eq!(c.warnings(), [] as [String; 0]);
        let small = GOOD.replacen("buffers = 256", "buffers = 150", 1);
        let w = Cluster::parse(&small).unwrap().warnings();
        assert_eq!(w.len(), 1, "{w:?}");
        assert!(w[0].starts_with("tenant globex: a pool of 150 buffers can be held whole"), "{}", w[0]);
    }
}

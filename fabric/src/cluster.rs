//! [`open_port`]: the fabric [`Port`] of one fabric node of a cluster file
//! (an agent or an ingress), sized from the file: one connection per peer
//! and tenant, each tenant's receive quota split over its peers, the
//! largest buffer and chain of any tenant.

use crate::{
    Buffers, DocaTransport, Endpoint, EndpointConfig, Mesh, MeshConfig, Port, PortError, PortSizes, PortTenant,
};
use config::Cluster;
use std::net::SocketAddr;
use std::time::Duration;

/// Sends of one connection queued in the endpoint before
/// [`Port::can_send`] holds the tenant back (keeps the node's scheduler,
/// not the endpoint's FIFO, in charge of who goes next).
pub const ENDPOINT_QUEUE_HIGH: usize = 64;

/// The port could not be opened.
#[derive(Debug, thiserror::Error)]
pub enum ClusterPortError {
    /// The fabric node id has no (valid) address in the cluster file.
    #[error("fabric node {0} has no valid address in the cluster file")]
    NoNode(u16),
    /// The DOCA device could not be found or opened.
    #[error("fabric device: {0}")]
    Device(doca::DocaError),
    /// The ibverbs device could not be opened.
    #[error("verbs device: {0}")]
    Verbs(String),
    /// Setting the port up failed.
    #[error(transparent)]
    Port(#[from] PortError),
}

fn addr(cfg: &Cluster, id: u16) -> Result<SocketAddr, ClusterPortError> {
    let a = cfg.fabric_address(id).ok_or(ClusterPortError::NoNode(id))?;
    a.parse().map_err(|_| ClusterPortError::NoNode(id))
}

/// Makes the transport of a node: from the endpoint sizes and the node's
/// fabric address.
pub type MakeTransport<T> = fn(&EndpointConfig, SocketAddr) -> Result<T, ClusterPortError>;

/// The DOCA transport (the SDK's RDMA, or the emulation on the device whose
/// address is the node's).
pub fn doca_transport(ecfg: &EndpointConfig, addr: SocketAddr) -> Result<DocaTransport, ClusterPortError> {
    DocaTransport::new(open_device(addr)?, ecfg.max_conns, ecfg.send_window + 1 + ecfg.recv_depth)
        .map_err(ClusterPortError::Device)
}

/// The ibverbs transport on the device named by `DNE_VERBS_DEVICE` (or the
/// first one), see [`crate::VerbsConfig::from_env`].
#[cfg(feature = "verbs")]
pub fn verbs_transport(ecfg: &EndpointConfig, _addr: SocketAddr) -> Result<crate::VerbsTransport, ClusterPortError> {
    crate::VerbsTransport::for_config(ecfg).map_err(|e| ClusterPortError::Verbs(e.to_string()))
}

/// The fabric port of a fabric node (an agent or an ingress) of `cfg` over
/// the DOCA transport: see [`open_port_with`].
pub fn open_port<B: Buffers>(
    cfg: &Cluster,
    me: u16,
    bufs: Vec<B>,
    flights: usize,
) -> Result<Port<DocaTransport, B>, ClusterPortError> {
    open_port_with(cfg, me, bufs, flights, doca_transport)
}

/// The fabric port of a fabric node (an agent or an ingress) of `cfg`:
/// an endpoint sized for the cluster on the transport `make` opens, every
/// tenant pool registered (`bufs[i]` is tenant `i`'s), the mesh to every
/// other fabric node started.
pub fn open_port_with<T: crate::Transport, B: Buffers>(
    cfg: &Cluster,
    me: u16,
    bufs: Vec<B>,
    flights: usize,
    make: MakeTransport<T>,
) -> Result<Port<T, B>, ClusterPortError> {
    let all: Vec<u16> = (0..cfg.tenants.len() as u16).collect();
    let mesh = start_meshes(cfg, me, std::slice::from_ref(&all))?.pop().ok_or(ClusterPortError::NoNode(me))?;
    open_port_on(cfg, me, mesh, all.into_iter().zip(bufs).collect(), flights, make)
}

/// The mesh of fabric node `me`, with one data-plane half per entry of
/// `shards` (the tenant ids its port serves; together every tenant once):
/// several ports, one per data-plane core, that peers see as one node.
pub fn start_meshes(cfg: &Cluster, me: u16, shards: &[Vec<u16>]) -> Result<Vec<Mesh>, ClusterPortError> {
    let mesh = MeshConfig {
        me,
        name: node_name(cfg, me)?,
        listen: addr(cfg, me)?,
        peers: peers(cfg, me)?,
        tenants: (0..cfg.tenants.len() as u16).collect(),
        backoff_max: Duration::from_secs(1),
        handshake: MeshConfig::HANDSHAKE,
    };
    Mesh::start_shards(mesh, shards).map_err(|e| ClusterPortError::Port(PortError::Mesh(e)))
}

/// The port of the tenants `bufs` (tenant id and its buffers) of fabric
/// node `me` over `mesh` (a half of [`start_meshes`] for those tenants).
pub fn open_port_on<T: crate::Transport, B: Buffers>(
    cfg: &Cluster,
    me: u16,
    mesh: Mesh,
    bufs: Vec<(u16, B)>,
    flights: usize,
    make: MakeTransport<T>,
) -> Result<Port<T, B>, ClusterPortError> {
    let npeers = peers(cfg, me)?.len().max(1) as u32;
    let per_conn = |t: u16| (cfg.tenants[usize::from(t)].recv_quota / npeers).max(2);
    let max_buf = cfg.tenants.iter().map(|t| t.buf_size).max().unwrap_or(16384);
    let max_chain = cfg.tenants.iter().map(|t| t.max_chain).max().unwrap_or(64);
    let ecfg = EndpointConfig {
        max_conns: (bufs.len() as u32) * npeers * 2 + 4,
        max_regions: bufs.len() as u32 + 1,
        send_window: 64,
        recv_depth: bufs.iter().map(|(t, _)| per_conn(*t)).max().unwrap_or(2) + 1,
        send_queue: 2 * max_chain + 2 * ENDPOINT_QUEUE_HIGH as u32,
        max_msg: max_buf,
        max_chain: u16::try_from(max_chain).unwrap_or(u16::MAX),
        batch: 64,
    };
    let transport = make(&ecfg, addr(cfg, me)?)?;
    let tenants = bufs.into_iter().map(|(id, bufs)| PortTenant { id, bufs, per_conn: per_conn(id) }).collect();
    let sizes = PortSizes::new(flights, ENDPOINT_QUEUE_HIGH);
    Ok(Port::with_mesh(Endpoint::new(transport, ecfg), mesh, npeers as usize, tenants, sizes)?)
}

fn peers(cfg: &Cluster, me: u16) -> Result<Vec<(u16, SocketAddr)>, ClusterPortError> {
    (0..cfg.fabric_nodes()).filter(|&i| i != me).map(|i| Ok((i, addr(cfg, i)?))).collect()
}

fn node_name(cfg: &Cluster, me: u16) -> Result<String, ClusterPortError> {
    Ok(match cfg.nodes.get(usize::from(me)) {
        Some(n) => n.name.clone(),
        None => cfg.ingresses.get(usize::from(me) - cfg.nodes.len()).ok_or(ClusterPortError::NoNode(me))?.name.clone(),
    })
}

/// Opens the fabric device: the one whose address is the node's (on a card,
/// the port with that IPv4 address; emulated, the device listed with it in
/// `DNE_EMU_DEVICES`, or one made up on it).
fn open_device(addr: SocketAddr) -> Result<doca::Device, ClusterPortError> {
    doca::Device::open_by_ip(addr.ip()).map_err(ClusterPortError::Device)
}

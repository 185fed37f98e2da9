//! [`open_port`]: the fabric [`Port`] of one fabric node of a cluster file
//! (an agent or an ingress), sized from the file: one connection per peer
//! and tenant, each tenant's receive quota split over its peers, the
//! largest buffer and chain of any tenant.

use crate::{Buffers, DocaTransport, Endpoint, EndpointConfig, MeshConfig, Port, PortError, PortSizes, PortTenant};
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
/// tenant pool registered, the mesh to every other fabric node started.
pub fn open_port_with<T: crate::Transport, B: Buffers>(
    cfg: &Cluster,
    me: u16,
    bufs: Vec<B>,
    flights: usize,
    make: MakeTransport<T>,
) -> Result<Port<T, B>, ClusterPortError> {
    let fabric_nodes = (cfg.nodes.len() + cfg.ingresses.len()) as u16;
    let peers: Vec<(u16, SocketAddr)> = (0..fabric_nodes)
        .filter(|&i| i != me)
        .map(|i| Ok((i, addr(cfg, i)?)))
        .collect::<Result<_, ClusterPortError>>()?;
    let npeers = peers.len().max(1) as u32;
    let per_conn: Vec<u32> = cfg.tenants.iter().map(|t| (t.recv_quota / npeers).max(2)).collect();
    let max_buf = cfg.tenants.iter().map(|t| t.buf_size).max().unwrap_or(16384);
    let max_chain = cfg.tenants.iter().map(|t| t.max_chain).max().unwrap_or(64);
    let ecfg = EndpointConfig {
        max_conns: (cfg.tenants.len() as u32) * npeers * 2 + 4,
        max_regions: cfg.tenants.len() as u32 + 1,
        send_window: 64,
        recv_depth: per_conn.iter().copied().max().unwrap_or(2) + 1,
        send_queue: 2 * max_chain + 2 * ENDPOINT_QUEUE_HIGH as u32,
        max_msg: max_buf,
        max_chain: u16::try_from(max_chain).unwrap_or(u16::MAX),
        batch: 64,
    };
    let my_addr = addr(cfg, me)?;
    let transport = make(&ecfg, my_addr)?;
    let name = match cfg.nodes.get(usize::from(me)) {
        Some(n) => n.name.clone(),
        None => cfg.ingresses.get(usize::from(me) - cfg.nodes.len()).ok_or(ClusterPortError::NoNode(me))?.name.clone(),
    };
    let mesh = MeshConfig {
        me,
        name,
        listen: my_addr,
        peers,
        tenants: (0..cfg.tenants.len() as u16).collect(),
        backoff_max: Duration::from_secs(1),
    };
    let tenants = bufs.into_iter().zip(per_conn).map(|(bufs, per_conn)| PortTenant { bufs, per_conn }).collect();
    let sizes = PortSizes { flights, queue_high: ENDPOINT_QUEUE_HIGH };
    Ok(Port::new(Endpoint::new(transport, ecfg), mesh, tenants, sizes)?)
}

/// Opens the fabric device: the emulated device whose address is the
/// node's (listed in `DNE_EMU_DEVICES`, or made up from the node address).
fn open_device(addr: SocketAddr) -> Result<doca::Device, ClusterPortError> {
    let devs = doca::devices().map_err(ClusterPortError::Device)?;
    if let Some(d) = devs.iter().find(|d| d.ip == addr.ip()) {
        return d.open().map_err(ClusterPortError::Device);
    }
    doca::DeviceInfo::new("emu0", "0000:00:00.0", addr.ip()).open().map_err(ClusterPortError::Device)
}

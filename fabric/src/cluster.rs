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
    /// The port would have more connections than an endpoint can number.
    #[error("{tenants} tenants with {peers} peers make more connections than an endpoint can number ({})", u32::MAX)]
    TooManyConnections {
        /// Tenants of the port.
        tenants: usize,
        /// Its peers.
        peers: u32,
    },
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
    let ids: Vec<u16> = bufs.iter().map(|(t, _)| *t).collect();
    let ecfg = endpoint_config(cfg, &ids, npeers)?;
    let transport = make(&ecfg, addr(cfg, me)?)?;
    let tenants =
        bufs.into_iter().map(|(id, bufs)| PortTenant { id, bufs, per_conn: per_conn(cfg, id, npeers) }).collect();
    let sizes = PortSizes::new(flights, ENDPOINT_QUEUE_HIGH);
    Ok(Port::with_mesh(Endpoint::new(transport, ecfg), mesh, npeers as usize, tenants, sizes)?)
}

/// Receives each connection of tenant `t` keeps posted: its share of the
/// tenant's receive quota over `npeers` peers, at least 2.
fn per_conn(cfg: &Cluster, t: u16, npeers: u32) -> u32 {
    (cfg.tenants[usize::from(t)].recv_quota / npeers).max(2)
}

/// The sizes of the endpoint of a port of the tenants `ids` of `cfg`, with
/// `npeers` peers.
fn endpoint_config(cfg: &Cluster, ids: &[u16], npeers: u32) -> Result<EndpointConfig, ClusterPortError> {
    let max_buf = cfg.tenants.iter().map(|t| t.buf_size).max().unwrap_or(16384);
    let max_chain = cfg.tenants.iter().map(|t| t.max_chain).max().unwrap_or(64);
    Ok(EndpointConfig {
        max_conns: max_conns(ids.len(), npeers)?,
        max_regions: ids.len() as u32 + 1,
        send_window: 64,
        recv_depth: ids.iter().map(|&t| per_conn(cfg, t, npeers)).max().unwrap_or(2) + 1,
        send_queue: 2 * max_chain + 2 * ENDPOINT_QUEUE_HIGH as u32,
        max_msg: max_buf,
        max_chain: u16::try_from(max_chain).unwrap_or(u16::MAX),
        batch: 64,
    })
}

/// Connections of an endpoint of `tenants` tenants and `npeers` peers: one
/// per (tenant, peer), twice (a peer that comes back opens new ones before
/// the old are drained), and a few more; an error past `u32::MAX`.
fn max_conns(tenants: usize, npeers: u32) -> Result<u32, ClusterPortError> {
    u32::try_from(tenants)
        .ok()
        .and_then(|t| t.checked_mul(npeers)?.checked_mul(2)?.checked_add(4))
        .ok_or(ClusterPortError::TooManyConnections { tenants, peers: npeers })
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{ConnId, ConnSpec, NullTransport};

    /// A transport that opens connections and does nothing else: what an
    /// endpoint reserves is all that is allocated.
    fn cluster(tenants: usize, nodes: usize) -> Cluster {
        let mut text = String::new();
        for i in 0..nodes {
            let addr = dne_tests::free_port();
            text +=
                &format!("[[node]]\nname = \"n{i}\"\naddress = \"{addr}\"\nruntime_dir = \"/run/dne-test/n{i}\"\n\n");
        }
        for t in 0..tenants {
            text += &format!(
                "[[tenant]]\nname = \"t{t}\"\nweight = 1\nbuf_size = 1024\nbuffers = 2048\nrecv_quota = 256\n\n"
            );
        }
        Cluster::parse(&text).unwrap()
    }

    /// Bytes the endpoint of node 0 of a cluster of `tenants` tenants on
    /// `nodes` nodes reserves for its connections (one per tenant and
    /// peer), and the endpoint. Only the connections to the first `open`
    /// peers are opened, and the others counted as the same (every
    /// connection of an endpoint reserves alike; opening is linear in the
    /// connections open, so all of a large cluster's take minutes).
    fn reserved(tenants: usize, nodes: usize, open: usize) -> (usize, Endpoint<NullTransport>) {
        let cfg = cluster(tenants, nodes);
        let ids: Vec<u16> = (0..tenants as u16).collect();
        let mut ep = Endpoint::new(NullTransport::new(), endpoint_config(&cfg, &ids, (nodes - 1) as u32).unwrap());
        for peer in 1..=open as u32 {
            for tenant in 0..tenants as u16 {
                ep.open(ConnSpec { tenant, peer }).unwrap();
            }
        }
        let (table, tables) = ep.reserved_bytes(tenants * (nodes - 1));
        (table + tables / open * (nodes - 1), ep)
    }

    /// What an endpoint reserves for its connections stays bounded however
    /// many tenants and peers the cluster has: each connection reserves
    /// its share of a fixed total for its send queue and its send and
    /// receive slots (at least a few entries each), and grows only when a
    /// burst needs it. Before, each reserved all it could use (about 10
    /// KiB): 32 tenants on 64 nodes took 19 MiB of the node's memory, 1000
    /// tenants on 100 nodes 944 MiB, before a message moved (now 7.6 MiB
    /// and 71 MiB, 750 bytes a connection, 224 of them its record in the
    /// connection table). A small cluster's connections still reserve all
    /// they can use.
    #[test]
    fn the_connection_state_reserved_at_start_is_bounded() {
        let (mid, _) = reserved(32, 64, 63);
        let (large, _) = reserved(1000, 100, 2);
        assert!(
            mid <= 8 << 20 && large <= 1024 * 1000 * 99,
            "32 x 64: {mid} bytes reserved, 1000 x 100: {large} bytes"
        );
        let (_, small) = reserved(3, 2, 1);
        let c = small.config();
        for k in 0..3 {
            let got = small.conn_reserve(ConnId::new(k));
            let full = (c.send_queue as usize, c.send_window as usize, c.recv_depth as usize);
            assert!(got.0 >= full.0 && got.1 == full.1 && got.2 == full.2, "{got:?} of {full:?}");
        }
    }

    /// The connection count of a port of many tenants and peers does not
    /// overflow: past what an endpoint can number (u32) it is an error.
    /// Before, 65534 tenants with 65533 peers (the most a cluster file
    /// allows) overflowed: a panic in a debug build, in release a count
    /// wrapped to 4294311952 (of 8589279248).
    #[test]
    fn the_connection_count_does_not_overflow() {
        assert_eq!(max_conns(3, 1).unwrap(), 10);
        assert_eq!(max_conns(1, u32::MAX / 2 - 2).unwrap(), u32::MAX - 1);
        for (tenants, peers) in [(65534, 65533), (32769, 65535), (1, u32::MAX / 2)] {
            let e = max_conns(tenants, peers).unwrap_err();
            assert!(matches!(e, ClusterPortError::TooManyConnections { .. }), "{tenants} x {peers}: {e}");
        }
    }
}

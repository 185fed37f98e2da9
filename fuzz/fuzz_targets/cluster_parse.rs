//! Cluster files (every process starts from one; an operator or a tool
//! writes it): parsing any bytes gives a cluster or a typed error, never a
//! panic, an overflow or a huge allocation, and an accepted cluster gives
//! every value the processes derive from it at start without overflow:
//! the tenant pools' geometries and layouts, what host-shimd and each
//! ingress map in all, the receives an agent keeps posted, the fabric's
//! node ids and addresses, and the warnings the agent logs.
#![no_main]

use config::Cluster;
use libfuzzer_sys::fuzz_target;
use wire::segment::PoolLayout;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else { return };
    let Ok(c) = Cluster::parse(text) else { return };
    let fabric_nodes = c.fabric_nodes();
    assert_eq!(usize::from(fabric_nodes), c.nodes.len() + c.ingresses.len());
    for id in 0..fabric_nodes {
        assert!(c.fabric_address(id).is_some(), "fabric node {id} has an address");
    }
    assert_eq!(c.fabric_address(fabric_nodes), None);
    for (i, g) in c.ingresses.iter().enumerate() {
        assert_eq!(c.fabric_node_id(&g.name), c.ingress_node_id(i));
    }
    let _ = c.warnings();
    // host-shimd: one pool per tenant on every node, their sizes added up
    // before any is made.
    let mut node_bytes = 0u64;
    for (id, t) in (0u16..).zip(&c.tenants) {
        let g = c.pool_geometry(id).expect("a validated tenant has a pool geometry");
        assert!(c.receives_posted(t) < u64::from(g.buf_count()));
        let layout = PoolLayout::new(g);
        assert!(usize::try_from(layout.total_len).is_ok());
        let bytes = u64::from(g.buf_size()) * u64::from(g.buf_count());
        node_bytes = node_bytes.checked_add(bytes).expect("host-shimd's pool total fits a u64");
    }
    // An ingress: one pool per tenant of its own `buffers`.
    for g in &c.ingresses {
        let mut bytes = 0u64;
        for (id, t) in (0u16..).zip(&c.tenants) {
            let geometry = Cluster::ingress_pool_geometry(t, id, g.buffers)
                .expect("an ingress pool of a validated cluster has a geometry");
            assert!(usize::try_from(PoolLayout::new(geometry).total_len).is_ok());
            let b = u64::from(t.buf_size) * u64::from(g.buffers);
            bytes = bytes.checked_add(b).expect("an ingress's pool total fits a u64");
        }
        assert!(g.route_queue <= g.tenant_queue);
    }
    for f in &c.functions {
        let nodes = c.function_nodes(f);
        assert_eq!(nodes.len(), f.nodes.len(), "every node of a function resolves");
        assert!(nodes.iter().all(|&n| c.runs_on(f, n)));
        assert!(c.tenant_id(&f.tenant).is_some());
        assert!(wire::segment::RingLayout::new(f.ring_capacity).is_ok());
    }
    for r in &c.routes {
        assert!(c.tenant_id(&r.tenant).is_some());
        assert!(r.chain.iter().all(|n| c.function_id(n).is_some()));
    }
});

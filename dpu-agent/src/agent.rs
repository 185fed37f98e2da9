//! `dpu-agent run`: attaches to the node's host link, builds the engine and
//! runs it on this thread; the metrics endpoint runs on its own thread.
//! When host-shimd goes away the engine is torn down (peers see the fabric
//! link go and return in-flight messages to their senders) and rebuilt once
//! host-shimd is back.

use crate::engine::{Engine, Exit, Settings, attach_all};
use crate::metrics::{self, Metrics};
use config::{Cluster, FabricKind, Mode};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::AtomicBool;

/// What `run` needs.
#[derive(Clone, Debug)]
pub struct RunOptions {
    /// Cluster file.
    pub config: PathBuf,
    /// This node's name.
    pub node: String,
    /// Metrics address (overrides the node's `metrics`).
    pub metrics: Option<SocketAddr>,
    /// Spin forever instead of napping when idle.
    pub busy: bool,
}

/// Runs the agent until `stop` is set.
pub fn run(opts: &RunOptions, stop: &AtomicBool) -> anyhow::Result<()> {
    let cfg = Arc::new(Cluster::load(&opts.config)?);
    let node = cfg.node_id(&opts.node).ok_or_else(|| anyhow::anyhow!("node \"{}\" is not in the config", opts.node))?;
    let n = &cfg.nodes[usize::from(node)];
    #[cfg(not(feature = "verbs"))]
    if n.fabric == FabricKind::Verbs {
        anyhow::bail!(
            "node {}: fabric \"verbs\" needs an agent built with the feature `verbs` \
             (cargo build --release -p dpu-agent --features verbs)",
            n.name
        );
    }
    let m = Arc::new(Metrics::new(&cfg, &n.name));
    let maddr = match (opts.metrics, &n.metrics) {
        (Some(a), _) => Some(a),
        (None, Some(s)) => Some(s.parse()?),
        (None, None) => None,
    };
    if let Some(a) = maddr {
        let (local, _t) = metrics::serve(a, m.clone()).map_err(|e| anyhow::anyhow!("metrics on {a}: {e}"))?;
        log::info!("metrics, status and readiness on http://{local}/");
    }
    let socket = host_shim::daemon::socket_path(&n.runtime_dir);
    let set = Settings {
        node,
        // A dedicated core spins; an agent sharing cores (emulated, or the
        // DPU mode over the emulated DOCA on this machine) naps when idle.
        idle_sleep_after: if opts.busy || n.mode == Mode::Host || (n.mode == Mode::Dpu && doca::BACKEND == doca::Backend::Sdk) {
            None
        } else {
            Some(crate::engine::IDLE_SPIN)
        },
        epoch: std::time::Instant::now(),
        batch: crate::engine::UPLINK_BATCH,
    };
    loop {
        let exit = if n.mode == Mode::Dpu {
            let Some(links) = crate::comchlink::attach(&cfg, node, stop)? else { return Ok(()) };
            log::info!("node {}: host-shimd exported {} tenant pools over comch", n.name, links.len());
            engine(&cfg, &set, links, &m, n.fabric, stop)?
        } else {
            let Some(links) = attach_all(&cfg, &socket, stop) else { return Ok(()) };
            log::info!("node {}: attached to host-shimd for {} tenants", n.name, links.len());
            engine(&cfg, &set, links, &m, n.fabric, stop)?
        };
        m.set_ready(false);
        match exit {
            Exit::Stopped => {
                log::info!("node {}: stopped", n.name);
                return Ok(());
            }
            Exit::HostLost => log::warn!("node {}: host-shimd went away; re-attaching", n.name),
        }
    }
}

/// Builds the engine over `links` on the node's fabric and runs it.
fn engine<H: crate::hostlink::HostLink>(
    cfg: &Arc<Cluster>,
    set: &Settings,
    links: Vec<H>,
    m: &Arc<Metrics>,
    fabric: FabricKind,
    stop: &AtomicBool,
) -> anyhow::Result<Exit> {
    Ok(match fabric {
        FabricKind::Doca => {
            Engine::new(cfg.clone(), set.clone(), links, m.clone(), fabric::cluster::doca_transport)?.run(stop)
        }
        #[cfg(feature = "verbs")]
        FabricKind::Verbs => {
            Engine::new(cfg.clone(), set.clone(), links, m.clone(), fabric::cluster::verbs_transport)?.run(stop)
        }
        #[cfg(not(feature = "verbs"))]
        FabricKind::Verbs => anyhow::bail!("fabric \"verbs\" is not in this build"),
    })
}

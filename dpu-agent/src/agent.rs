//! `dpu-agent run`: attaches to the node's host link (host-shimd's shared
//! memory in `host` and `emulated` modes, comch and imported pools in `dpu`
//! mode), builds the engine and runs it on this thread, or with `--cores N`
//! one engine per data-plane thread, each over a share of the tenants; the
//! metrics endpoint runs on its own thread. When host-shimd goes away the
//! engines are torn down (peers see the fabric link go and return in-flight
//! messages to their senders) and rebuilt once host-shimd is back.

use crate::engine::{Engine, Exit, Settings, attach_all};
use crate::metrics::{self, Metrics};
use config::{Cluster, FabricKind, Mode};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

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
    /// Data-plane threads (the tenants are spread over them).
    pub cores: u16,
}

/// Runs the agent until `stop` is set.
pub fn run(opts: &RunOptions, stop: &AtomicBool) -> anyhow::Result<()> {
    let cfg = Arc::new(Cluster::load(&opts.config)?);
    for w in cfg.warnings() {
        log::warn!("config: {w}");
    }
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
    if n.mode == Mode::Dpu && doca::BACKEND == doca::Backend::Emu && std::env::var_os(doca::RUNTIME_DIR_ENV).is_none() {
        // On a card this agent waits for a host it cannot reach.
        log::warn!(
            "node {}: dpu mode with the emulated DOCA backend: the host link is a Unix socket (in ${}, \
             else /tmp/dne-emu-<uid>), not PCIe comch; on a BlueField build the agent with the DOCA SDK \
             (feature `sdk`)",
            n.name,
            doca::RUNTIME_DIR_ENV
        );
    }
    let cores = usize::from(opts.cores.max(1));
    if cores > cfg.tenants.len() {
        log::warn!(
            "--cores {cores}: the cluster has {} tenants, each served by one core; using {} cores",
            cfg.tenants.len(),
            cfg.tenants.len()
        );
    }
    let cores = cores.min(cfg.tenants.len()).max(1);
    let m = Arc::new(Metrics::with_cores(&cfg, &n.name, cores));
    let maddr = match (opts.metrics, &n.metrics) {
        (Some(a), _) => Some(a),
        (None, Some(s)) => Some(s.parse()?),
        (None, None) => None,
    };
    if let Some(a) = maddr {
        let (local, _t) = metrics::serve(a, m.clone()).map_err(|e| anyhow::anyhow!("metrics on {a}: {e}"))?;
        log::info!("metrics, status and readiness on http://{local}/");
        if a.ip().is_unspecified() && n.mode != config::Mode::Emulated {
            log::warn!(
                "metrics on {a}: /metrics and /status answer without authentication on every interface, the \
                 fabric network's included; give this machine's management address instead (on a BlueField, \
                 the tmfifo address 192.168.100.2)"
            );
        }
    }
    let socket = host_shim::daemon::socket_path(&n.runtime_dir);
    let set = Settings {
        node,
        // A dedicated core spins; an agent sharing cores (emulated, or the
        // DPU mode over the emulated DOCA on this machine) naps when idle.
        idle_sleep_after: if opts.busy
            || n.mode == Mode::Host
            || (n.mode == Mode::Dpu && doca::BACKEND == doca::Backend::Sdk)
        {
            None
        } else {
            Some(crate::engine::IDLE_SPIN)
        },
        epoch: std::time::Instant::now(),
        batch: crate::engine::UPLINK_BATCH,
        core: 0,
    };
    loop {
        let exit = if n.mode == Mode::Dpu {
            let Some(links) = crate::comchlink::attach(&cfg, node, stop)? else { return Ok(()) };
            log::info!("node {}: host-shimd exported {} tenant pools over comch", n.name, links.len());
            run_cores(&cfg, &set, links, &m, n.fabric, cores, stop)?
        } else {
            let Some(links) = attach_all(&cfg, &socket, stop) else { return Ok(()) };
            log::info!("node {}: attached to host-shimd for {} tenants", n.name, links.len());
            run_cores(&cfg, &set, links, &m, n.fabric, cores, stop)?
        };
        for core in 0..cores {
            m.set_ready(core, false);
        }
        match exit {
            Exit::Stopped => {
                log::info!("node {}: stopped", n.name);
                return Ok(());
            }
            Exit::HostLost => log::warn!("node {}: host-shimd went away; re-attaching", n.name),
        }
    }
}

/// Runs the node's engines: the tenants (`links[i]` is tenant `i`'s host
/// link) spread over `cores` data-plane threads, tenant `i` on core
/// `i % cores`, each with its own fabric port over one mesh. With one core
/// the engine runs on this thread. Returns when `stop` is set or one
/// engine lost its host (then every engine stops).
fn run_cores<H: crate::hostlink::HostLink + Send>(
    cfg: &Arc<Cluster>,
    set: &Settings,
    links: Vec<H>,
    m: &Arc<Metrics>,
    fabric: FabricKind,
    cores: usize,
    stop: &AtomicBool,
) -> anyhow::Result<Exit> {
    let shards: Vec<Vec<u16>> =
        (0..cores).map(|k| (0..links.len() as u16).filter(|t| usize::from(*t) % cores == k).collect()).collect();
    let meshes = fabric::cluster::start_meshes(cfg, set.node, &shards)?;
    let mut per: Vec<Vec<(u16, H)>> = (0..cores).map(|_| Vec::new()).collect();
    for (t, h) in links.into_iter().enumerate() {
        per[t % cores].push((t as u16, h));
    }
    let mut work: Vec<Core<H>> = meshes
        .into_iter()
        .zip(per)
        .enumerate()
        .map(|(k, (mesh, links))| Core { set: Settings { core: k, ..set.clone() }, mesh, links })
        .collect();
    if work.len() == 1 {
        let c = work.pop().ok_or_else(|| anyhow::anyhow!("no engine"))?;
        return engine(cfg, c, m, fabric, stop);
    }
    // Every engine stops when the agent stops or when one of them ends.
    let all = AtomicBool::new(false);
    std::thread::scope(|s| {
        let handles: Vec<_> = work
            .into_iter()
            .map(|c| {
                let all = &all;
                std::thread::Builder::new()
                    .name(format!("core{}", c.set.core))
                    .spawn_scoped(s, move || engine(cfg, c, m, fabric, all))
            })
            .collect::<Result<_, _>>()?;
        while !stop.load(Ordering::Relaxed)
            && !handles.iter().any(|h: &std::thread::ScopedJoinHandle<'_, _>| h.is_finished())
        {
            std::thread::sleep(std::time::Duration::from_millis(1));
        }
        all.store(true, Ordering::Relaxed);
        let mut exit = Exit::Stopped;
        for h in handles {
            match h.join() {
                Ok(Ok(Exit::HostLost)) => exit = Exit::HostLost,
                Ok(Ok(Exit::Stopped)) => {}
                Ok(Err(e)) => return Err(e),
                Err(_) => anyhow::bail!("a data-plane thread panicked"),
            }
        }
        Ok(if stop.load(Ordering::Relaxed) { Exit::Stopped } else { exit })
    })
}

/// What one data-plane core runs: its settings, its half of the node's
/// mesh, its tenants' host links (cluster tenant id, link).
struct Core<H> {
    set: Settings,
    mesh: fabric::Mesh,
    links: Vec<(u16, H)>,
}

/// Builds one core's engine on the node's fabric and runs it.
fn engine<H: crate::hostlink::HostLink>(
    cfg: &Arc<Cluster>,
    c: Core<H>,
    m: &Arc<Metrics>,
    fabric: FabricKind,
    stop: &AtomicBool,
) -> anyhow::Result<Exit> {
    let Core { set, mesh, links } = c;
    Ok(match fabric {
        FabricKind::Doca => {
            Engine::on_mesh(cfg.clone(), set, mesh, links, m.clone(), fabric::cluster::doca_transport)?.run(stop)
        }
        #[cfg(feature = "verbs")]
        FabricKind::Verbs => {
            Engine::on_mesh(cfg.clone(), set, mesh, links, m.clone(), fabric::cluster::verbs_transport)?.run(stop)
        }
        #[cfg(not(feature = "verbs"))]
        FabricKind::Verbs => anyhow::bail!("fabric \"verbs\" is not in this build"),
    })
}

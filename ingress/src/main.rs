//! `ingress --config FILE --name NAME`: the cluster edge of DNE.
//!
//! Serves the routes of the cluster file on the ingress's `http` address
//! and sends every request over the fabric to the node of its route's first
//! function ([`ingress::edge::Edge`]). With `--in-process` the chains run in
//! this process instead ([`ingress::InProcess`]; for tests and benchmarks):
//! every function of a route must then be named like a transform (`echo`,
//! `upper`, `rot13`, `reverse`) or be given one with
//! `--transform FUNCTION=TRANSFORM`.
#![allow(clippy::print_stderr)]

use anyhow::{Context, Result, anyhow};
use clap::Parser;
use ingress::{Behavior, InProcess, InProcessConfig, Ingress, Pools, Settings};
use std::path::PathBuf;
use std::sync::Arc;

/// The DNE ingress.
#[derive(Debug, Parser)]
#[command(name = "ingress", version, about)]
struct Args {
    /// Cluster file.
    #[arg(long)]
    config: PathBuf,
    /// This ingress's name (an `[[ingress]]` of the cluster file).
    #[arg(long)]
    name: String,
    /// Serve `/metrics` on this address instead of on the HTTP address.
    #[arg(long)]
    admin: Option<String>,
    /// Run the chains in this process instead of sending requests over the
    /// fabric to the cluster's nodes (a stand-in for tests and benchmarks).
    #[arg(long)]
    in_process: bool,
    /// In-process chains: the transform a function applies (repeatable).
    #[arg(long = "transform", value_name = "FUNCTION=TRANSFORM")]
    transforms: Vec<String>,
    /// In-process chains: worker threads.
    #[arg(long, default_value_t = 2)]
    workers: usize,
    /// Tokio worker threads (default: one per core; 1: a current-thread
    /// runtime).
    #[arg(long)]
    threads: Option<usize>,
}

fn main() -> std::process::ExitCode {
    env_logger::Builder::from_env(env_logger::Env::default().default_filter_or("warn")).init();
    match run(Args::parse()) {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("ingress: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}

fn run(args: Args) -> Result<()> {
    let cluster = config::Cluster::load(&args.config)?;
    let g = cluster
        .ingresses
        .iter()
        .find(|g| g.name == args.name)
        .ok_or_else(|| anyhow!("--name {}: no [[ingress]] of that name in {}", args.name, args.config.display()))?
        .clone();
    std::fs::create_dir_all(&g.runtime_dir).with_context(|| format!("creating {}", g.runtime_dir.display()))?;
    let mut extra = Vec::new();
    for t in &args.transforms {
        let (f, name) = t.split_once('=').ok_or_else(|| anyhow!("--transform {t}: expected FUNCTION=TRANSFORM"))?;
        let tr = dne_functions::Transform::from_name(name).with_context(|| format!("--transform {t}"))?;
        extra.push((f.to_owned(), Behavior::Transform(tr)));
    }
    let settings = Settings::for_ingress(&cluster, &args.name).unwrap_or_default();
    let pools = Pools::create(&cluster, &g.name, g.buffers, shm::PagePolicy::Auto)?;
    let rt = ingress::runtime(args.threads)?;
    let upstream: Arc<dyn ingress::Upstream> = if args.in_process {
        let cfg = InProcessConfig { workers: args.workers, ..Default::default() };
        Arc::new(InProcess::new(&cluster, cfg, InProcess::by_name(&extra))?)
    } else {
        let index = cluster.ingresses.iter().position(|x| x.name == g.name).unwrap_or(0);
        let _in_runtime = rt.enter();
        Arc::new(ingress::edge::Edge::spawn(Arc::new(cluster.clone()), index, pools.clone())?)
    };
    let ingress = Arc::new(Ingress::new(&cluster, pools, upstream, settings));
    rt.block_on(async move {
        let listener =
            tokio::net::TcpListener::bind(&g.http).await.with_context(|| format!("listening on {}", g.http))?;
        let admin = match &args.admin {
            Some(a) => Some(tokio::net::TcpListener::bind(a).await.with_context(|| format!("listening on {a}"))?),
            None => None,
        };
        log::info!("ingress {} serving on {}", g.name, g.http);
        ingress.serve(listener, admin, ingress::shutdown_signal()).await?;
        Ok(())
    })
}

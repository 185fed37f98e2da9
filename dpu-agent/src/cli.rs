//! The `dpu-agent` command line.

use clap::{Parser, Subcommand};
use std::fmt::Write as _;
use std::path::PathBuf;

/// DNE, the DPU network engine.
#[derive(Debug, Parser)]
#[command(name = "dpu-agent", version = version_line(), about, long_about = None)]
pub struct Cli {
    /// What to do.
    #[command(subcommand)]
    pub command: Command,
}

/// Subcommands.
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Print every wire layout (sizes, alignments, field offsets, magics) and
    /// the layout hash. Builds for different machines (x86_64 host,
    /// aarch64 DPU) must print the same text to work together.
    Layout,
    /// Run the engine of one node until SIGINT or SIGTERM.
    Run {
        /// The cluster file (TOML).
        #[arg(long)]
        config: PathBuf,
        /// This node's name in the cluster file.
        #[arg(long)]
        node: String,
        /// Serve /metrics, /status and /ready here (overrides the node's
        /// `metrics` field).
        #[arg(long)]
        metrics: Option<std::net::SocketAddr>,
        /// Data-plane threads, one per core given: the tenants are spread
        /// over them (tenant i on core i mod N), each core with its own
        /// fabric port and scheduler. At most one per tenant.
        #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u16).range(1..=64))]
        cores: u16,
        /// Never nap when idle (a dedicated core, as on the DPU); by default
        /// an emulated-mode agent naps 50 us between polls after 2 ms of no
        /// work, so it shares cores.
        #[arg(long)]
        busy: bool,
    },
    /// Run a whole cluster on this machine (two worker nodes, an ingress,
    /// three tenants) as child processes, in emulated mode or (`--mode
    /// dpu`) DPU mode over the emulated DOCA, drive load
    /// through the ingress, and print a summary. Needs nothing but this
    /// binary.
    Demo(crate::demo::DemoOptions),
    /// The other programs of a cluster, for the demo's child processes.
    #[command(hide = true)]
    Role {
        /// Which.
        #[command(subcommand)]
        role: Role,
    },
    /// Validate a cluster file: prints a summary, or fails naming the bad
    /// field.
    CheckConfig {
        /// The cluster file (TOML).
        file: PathBuf,
    },
}

/// The roles `dpu-agent demo` starts its child processes in.
#[derive(Debug, Subcommand)]
pub enum Role {
    /// host-shimd of a node.
    Shimd {
        /// The cluster file.
        #[arg(long)]
        config: PathBuf,
        /// The node.
        #[arg(long)]
        node: String,
    },
    /// A sample function.
    Fn(dne_functions::serve::FnArgs),
    /// The ingress.
    Ingress {
        /// The cluster file.
        #[arg(long)]
        config: PathBuf,
        /// The ingress's name.
        #[arg(long)]
        name: String,
        /// Tokio worker threads: HTTP and the fabric share them. One by
        /// default, as the demo runs a whole cluster on this machine's
        /// cores.
        #[arg(long, default_value_t = 1)]
        threads: usize,
    },
}

/// `--version` text: the crate version and the target triple, so an operator
/// can tell which build runs where.
pub fn version_line() -> &'static str {
    concat!(env!("CARGO_PKG_VERSION"), " (", env!("DNE_TARGET"), ")")
}

/// Runs a parsed command; returns what to print.
pub fn run(cli: &Cli) -> anyhow::Result<String> {
    crate::demo::die_with_the_demo()?;
    match cli.command {
        Command::Run { ref config, ref node, metrics, cores, busy } => {
            let stop = stop_on_signals()?;
            let opts = crate::agent::RunOptions { config: config.clone(), node: node.clone(), metrics, busy, cores };
            crate::agent::run(&opts, stop)?;
            Ok(String::new())
        }
        Command::Layout => {
            let mut out = String::new();
            writeln!(out, "# dpu-agent {} doca={}", version_line(), doca::BACKEND.as_str())?;
            wire::layout::write_layout_table(&mut out)?;
            Ok(out)
        }
        Command::Demo(ref opts) => {
            if crate::demo::run(opts)? {
                Ok(String::new())
            } else {
                anyhow::bail!("the demo saw errors (see above)")
            }
        }
        Command::Role { ref role } => {
            match role {
                Role::Shimd { config, node } => {
                    host_shim::daemon::serve_until_signalled(config::Cluster::load(config)?, node)?
                }
                Role::Fn(args) => dne_functions::serve::serve(args.clone())?,
                Role::Ingress { config, name, threads } => crate::demo::run_ingress(config, name, *threads)?,
            }
            Ok(String::new())
        }
        Command::CheckConfig { ref file } => {
            let c = config::Cluster::load(file)?;
            let mut out = format!(
                "{}: ok: {} nodes, {} tenants, {} functions, {} routes, {} ingresses\n",
                file.display(),
                c.nodes.len(),
                c.tenants.len(),
                c.functions.len(),
                c.routes.len(),
                c.ingresses.len()
            );
            for w in c.warnings() {
                out += &format!("warning: {w}\n");
            }
            // (A warning, not an error: the file is every machine's, and
            // this agent may run a node of another fabric.)
            #[cfg(not(feature = "verbs"))]
            for n in c.nodes.iter().filter(|n| n.fabric == config::FabricKind::Verbs) {
                out += &format!(
                    "warning: node {}: fabric \"verbs\" needs an agent built with the feature `verbs`; this one \
                     is not, and refuses to run it\n",
                    n.name
                );
            }
            Ok(out)
        }
    }
}

/// Blocks SIGINT and SIGTERM in this thread (and so in every thread it
/// starts afterwards) and sets the returned flag when one arrives.
fn stop_on_signals() -> anyhow::Result<&'static std::sync::atomic::AtomicBool> {
    use nix::sys::signal::{SigSet, Signal};
    static STOP: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);
    let mut set = SigSet::empty();
    set.add(Signal::SIGINT);
    set.add(Signal::SIGTERM);
    set.thread_block()?;
    std::thread::Builder::new().name("signals".into()).spawn(move || {
        if let Ok(sig) = set.wait() {
            log::info!("{sig}: stopping");
        }
        STOP.store(true, std::sync::atomic::Ordering::Relaxed);
    })?;
    Ok(&STOP)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn layout_prints_the_wire_table() {
        let cli = Cli::try_parse_from(["dpu-agent", "layout"]).unwrap();
        let out = run(&cli).unwrap();
        assert!(out.contains("Descriptor "));
        assert!(out.trim_end().ends_with(&format!("layout_hash={:#018x}", wire::LAYOUT_HASH)));
    }

    #[test]
    fn check_config_names_the_bad_field() {
        let dir = std::env::temp_dir().join(format!("dne-check-config-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let good = dir.join("good.toml");
        let text = "[[node]]\nname = \"a\"\naddress = \"127.0.0.1:7101\"\nruntime_dir = \"/tmp/a\"\n\n\
                    [[tenant]]\nname = \"t\"\nweight = 1\nbuffers = 64\nrecv_quota = 8\n";
        std::fs::write(&good, text).unwrap();
        let cli = Cli::try_parse_from(["dpu-agent", "check-config", good.to_str().unwrap()]).unwrap();
        let out = run(&cli).unwrap();
        assert!(out.contains("ok: 1 nodes, 1 tenants") && !out.contains("warning"), "{out}");
        // A second node: chains from it can hold the 64 buffers whole.
        let two = dir.join("two.toml");
        let second = "[[node]]\nname = \"b\"\naddress = \"127.0.0.1:7102\"\nruntime_dir = \"/tmp/b\"\n\n";
        std::fs::write(&two, format!("{second}{text}")).unwrap();
        let cli = Cli::try_parse_from(["dpu-agent", "check-config", two.to_str().unwrap()]).unwrap();
        let out = run(&cli).unwrap();
        assert!(out.contains("ok: 2 nodes") && out.contains("\nwarning: tenant t: a pool of 64 buffers"), "{out}");
        // A node on the verbs fabric: a warning from an agent built without it.
        let verbs = dir.join("verbs.toml");
        std::fs::write(
            &verbs,
            text.replace("runtime_dir = \"/tmp/a\"", "runtime_dir = \"/tmp/a\"\nfabric = \"verbs\""),
        )
        .unwrap();
        let cli = Cli::try_parse_from(["dpu-agent", "check-config", verbs.to_str().unwrap()]).unwrap();
        let out = run(&cli).unwrap();
        let warned = out.contains("warning: node a: fabric \"verbs\" needs an agent built with the feature `verbs`");
        assert_eq!(warned, cfg!(not(feature = "verbs")), "{out}");
        let bad = dir.join("bad.toml");
        std::fs::write(&bad, text.replace("weight = 1", "weight = 0")).unwrap();
        let cli = Cli::try_parse_from(["dpu-agent", "check-config", bad.to_str().unwrap()]).unwrap();
        assert_eq!(run(&cli).unwrap_err().to_string(), "tenant[0].weight: weight must be at least 1");
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn unknown_commands_are_refused() {
        assert!(Cli::try_parse_from(["dpu-agent", "frobnicate"]).is_err());
        assert!(Cli::try_parse_from(["dpu-agent"]).is_err());
    }
}

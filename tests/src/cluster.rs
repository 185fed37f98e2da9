//! A whole cluster of real processes on this machine, for system tests:
//! per node host-shimd and a `dpu-agent` in emulated mode on loopback, plus
//! sample functions. Everything is killed and removed when dropped.

use crate::{Proc, TempDir, bin_path, free_port, http_get, wait_for};
use host_shim::Function;
use std::net::SocketAddr;
use std::process::Command;
use std::time::Duration;

const WATCHDOG: Duration = Duration::from_secs(60);

/// A cluster of two nodes on loopback. Fields drop in order: functions,
/// agents, host-shimds, directories.
#[derive(Debug)]
pub struct Cluster {
    pub fns: Vec<Proc>,
    pub agents: Vec<Proc>,
    pub shimds: Vec<Proc>,
    pub metrics: Vec<SocketAddr>,
    pub config: std::path::PathBuf,
    pub dirs: Vec<TempDir>,
    pub top: TempDir,
}

fn config(dirs: &[TempDir], fabric: &[SocketAddr], metrics: &[SocketAddr], rest: &str) -> String {
    let mut s = String::new();
    for (i, d) in dirs.iter().enumerate() {
        s += &format!(
            "[[node]]\nname = \"n{i}\"\naddress = \"{}\"\nmetrics = \"{}\"\nruntime_dir = \"{}\"\n\n",
            fabric[i],
            metrics[i],
            d.path().display()
        );
    }
    s += rest;
    s
}

impl Cluster {
    /// Starts host-shimd and an agent per node (`n0`, `n1`, ...) on
    /// loopback; `rest` is the cluster file's tenants, functions and
    /// routes.
    pub fn start(name: &str, nodes: usize, rest: &str) -> Self {
        let top = TempDir::new(name);
        let dirs: Vec<TempDir> = (0..nodes).map(|i| TempDir::new(&format!("{name}-n{i}"))).collect();
        let fabric: Vec<SocketAddr> = (0..nodes).map(|_| free_port()).collect();
        let metrics: Vec<SocketAddr> = (0..nodes).map(|_| free_port()).collect();
        let path = top.path().join("cluster.toml");
        std::fs::write(&path, config(&dirs, &fabric, &metrics, rest)).unwrap();
        let mut c =
            Cluster { fns: Vec::new(), agents: Vec::new(), shimds: Vec::new(), metrics, config: path, dirs, top };
        for i in 0..nodes {
            c.shimds.push(c.spawn_shimd(i));
            wait_for("host-shimd socket", WATCHDOG, || c.socket(i).exists());
        }
        for i in 0..nodes {
            c.agents.push(c.spawn_agent(i));
        }
        c.wait_mesh();
        c
    }

    pub fn spawn_shimd(&self, i: usize) -> Proc {
        let mut cmd = Command::new(bin_path("host-shimd"));
        cmd.arg("--config").arg(&self.config).args(["--node", &format!("n{i}")]);
        Proc::spawn(&format!("host-shimd n{i}"), cmd)
    }

    pub fn spawn_agent(&self, i: usize) -> Proc {
        let mut cmd = Command::new(bin_path("dpu-agent"));
        cmd.arg("run").arg("--config").arg(&self.config).args(["--node", &format!("n{i}")]);
        Proc::spawn(&format!("dpu-agent n{i}"), cmd)
    }

    pub fn socket(&self, i: usize) -> std::path::PathBuf {
        host_shim::daemon::socket_path(self.dirs[i].path())
    }

    pub fn status(&self, i: usize) -> String {
        http_get(self.metrics[i], "/status").map(|(_, b)| b).unwrap_or_default()
    }

    pub fn metrics_text(&self, i: usize) -> String {
        http_get(self.metrics[i], "/metrics").map(|(_, b)| b).unwrap_or_default()
    }

    /// Waits until every agent is ready and has all its fabric
    /// connections up.
    pub fn wait_mesh(&self) {
        let cfg = config::Cluster::load(&self.config).expect("the cluster file");
        let want = cfg.tenants.len() * (self.dirs.len() - 1);
        self.wait_conns(want);
    }

    /// Waits until every agent has at least `want` tenant connections up.
    pub fn wait_conns(&self, want: usize) {
        for i in 0..self.dirs.len() {
            wait_for(&format!("agent n{i} has {want} fabric connections up"), WATCHDOG, || {
                status_number(&self.status(i), "conns_up").is_some_and(|n| n >= want as u64)
            });
        }
    }

    pub fn start_fn(&mut self, node: usize, tenant: &str, function: &str, transform: &str, next: Option<&str>) {
        let mut cmd = Command::new(bin_path("dne-fn"));
        cmd.arg("--socket").arg(self.socket(node)).args(["--tenant", tenant, "--function", function]);
        cmd.args(["--transform", transform]);
        if let Some(n) = next {
            cmd.args(["--next", n]);
        }
        let mut p = Proc::spawn_lines(function, cmd);
        p.wait_line("ready", WATCHDOG);
        self.fns.push(p);
    }

    /// Starts a sample function that follows ingress routes (`--config`):
    /// it forwards along the route's chain and the last one replies.
    pub fn start_route_fn(&mut self, node: usize, tenant: &str, function: &str, transform: &str) {
        let mut cmd = Command::new(bin_path("dne-fn"));
        cmd.arg("--socket").arg(self.socket(node)).args(["--tenant", tenant, "--function", function]);
        cmd.args(["--transform", transform]).arg("--config").arg(&self.config);
        let mut p = Proc::spawn_lines(function, cmd);
        p.wait_line("ready", WATCHDOG);
        self.fns.push(p);
    }

    pub fn attach(&self, node: usize, tenant: &str, function: &str) -> Function {
        Function::attach(&self.socket(node), tenant, function).expect("attach")
    }
}

/// The number after `"key":` in a JSON document (enough for status files).
pub fn status_number(json: &str, key: &str) -> Option<u64> {
    let at = json.find(&format!("\"{key}\":"))? + key.len() + 3;
    let digits: String = json[at..].chars().take_while(char::is_ascii_digit).collect();
    digits.parse().ok()
}

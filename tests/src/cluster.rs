//! A whole cluster of real processes on this machine, for system tests:
//! per node host-shimd and a `dpu-agent` in emulated mode on loopback (or,
//! with [`Cluster::start_netns`], each agent in its own network namespace),
//! plus sample functions. Everything is killed and removed when dropped.
//!
//! Agents and host-shimds log to files in the cluster's directory
//! ([`Cluster::log_tail`]), so a chatty process never blocks on a full pipe
//! and a failing test can show what they said.

use crate::{Proc, TempDir, bin_path, free_port, http_get, wait_for};
use host_shim::Function;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::path::PathBuf;
use std::process::Command;
use std::sync::Mutex;
use std::time::Duration;

const WATCHDOG: Duration = Duration::from_secs(60);

/// A cluster of nodes on this machine. Fields drop in order: functions,
/// agents, host-shimds, directories, network namespaces.
#[derive(Debug)]
pub struct Cluster {
    pub fns: Vec<Proc>,
    pub agents: Vec<Proc>,
    pub shimds: Vec<Proc>,
    pub metrics: Vec<SocketAddr>,
    pub config: std::path::PathBuf,
    pub dirs: Vec<TempDir>,
    pub top: TempDir,
    /// Network namespace of each node's agent (`None`: this namespace).
    pub netns: Vec<Option<String>>,
    /// Every node's `mode` (`emulated`, or `dpu`: the agent reaches its
    /// host over emulated comch and imported pools).
    pub mode: &'static str,
    /// Data-plane cores of every agent (`--cores`).
    pub cores: u16,
    /// The namespaces and links, removed last.
    pub net: Option<Netns>,
}

/// Where one node's agent runs and listens.
#[derive(Clone, Debug)]
pub struct NodeNet {
    /// Network namespace the agent runs in (`None`: this one).
    pub netns: Option<String>,
    /// Fabric address (the emulated device's IP is this address's IP).
    pub fabric: SocketAddr,
    /// Metrics/status address, reachable from this namespace.
    pub metrics: SocketAddr,
}

fn config(mode: &str, dirs: &[TempDir], nets: &[NodeNet], rest: &str) -> String {
    let mut s = String::new();
    for (i, d) in dirs.iter().enumerate() {
        s += &format!(
            "[[node]]\nname = \"n{i}\"\nmode = \"{mode}\"\naddress = \"{}\"\nmetrics = \"{}\"\nruntime_dir = \"{}\"\n\n",
            nets[i].fabric,
            nets[i].metrics,
            d.path().display()
        );
    }
    s += rest;
    s
}

/// An ingress named `edge` for a test's cluster file.
#[derive(Debug)]
pub struct IngressSpec {
    /// Its HTTP address.
    pub http: SocketAddr,
    fabric: SocketAddr,
    dir: TempDir,
    extra: String,
}

impl IngressSpec {
    /// A new ingress (free ports, a runtime directory named after `name`);
    /// `extra` lines go into its section (`buffers = 64`, ...).
    pub fn new(name: &str, extra: &str) -> Self {
        Self { http: free_port(), fabric: free_port(), dir: TempDir::new(name), extra: extra.to_owned() }
    }

    /// Its `[[ingress]]` section.
    pub fn section(&self) -> String {
        format!(
            "\n[[ingress]]\nname = \"edge\"\naddress = \"{}\"\nhttp = \"{}\"\nruntime_dir = \"{}\"\n{}\n",
            self.fabric,
            self.http,
            self.dir.path().display(),
            self.extra
        )
    }
}

impl Cluster {
    /// Starts host-shimd and an agent per node (`n0`, `n1`, ...) on
    /// loopback; `rest` is the cluster file's tenants, functions and
    /// routes.
    pub fn start(name: &str, nodes: usize, rest: &str) -> Self {
        Self::start_mode(name, nodes, "emulated", rest)
    }

    /// Like [`Cluster::start`], every node in `mode`.
    pub fn start_mode(name: &str, nodes: usize, mode: &'static str, rest: &str) -> Self {
        Self::start_cores(name, nodes, mode, 1, rest)
    }

    /// Like [`Cluster::start_mode`], every agent with `cores` data-plane
    /// threads.
    pub fn start_cores(name: &str, nodes: usize, mode: &'static str, cores: u16, rest: &str) -> Self {
        let nets: Vec<NodeNet> =
            (0..nodes).map(|_| NodeNet { netns: None, fabric: free_port(), metrics: free_port() }).collect();
        Self::start_on_mode(name, nets, None, mode, cores, rest)
    }

    /// Like [`Cluster::start`] with two nodes whose agents each run in a
    /// network namespace of their own, linked by a veth pair
    /// ([`Netns::two_nodes`]); host-shimd and the functions stay in this
    /// namespace (the host link is a Unix socket path and shared memory).
    /// `None` when not running as root.
    pub fn start_netns(name: &str, rest: &str) -> Option<Self> {
        Self::start_netns_mode(name, "emulated", rest)
    }

    /// Like [`Cluster::start_netns`], every node in `mode`.
    pub fn start_netns_mode(name: &str, mode: &'static str, rest: &str) -> Option<Self> {
        let (net, nets) = Netns::two_nodes()?;
        Some(Self::start_on_mode(name, nets, Some(net), mode, 1, rest))
    }

    /// Starts a cluster with one node per entry of `nets`.
    pub fn start_on(name: &str, nets: Vec<NodeNet>, net: Option<Netns>, rest: &str) -> Self {
        Self::start_on_mode(name, nets, net, "emulated", 1, rest)
    }

    fn start_on_mode(
        name: &str,
        nets: Vec<NodeNet>,
        net: Option<Netns>,
        mode: &'static str,
        cores: u16,
        rest: &str,
    ) -> Self {
        let nodes = nets.len();
        let top = TempDir::new(name);
        let dirs: Vec<TempDir> = (0..nodes).map(|i| TempDir::new(&format!("{name}-n{i}"))).collect();
        let path = top.path().join("cluster.toml");
        std::fs::write(&path, config(mode, &dirs, &nets, rest)).unwrap();
        let mut c = Cluster {
            fns: Vec::new(),
            agents: Vec::new(),
            shimds: Vec::new(),
            metrics: nets.iter().map(|n| n.metrics).collect(),
            config: path,
            dirs,
            top,
            netns: nets.iter().map(|n| n.netns.clone()).collect(),
            mode,
            cores,
            net,
        };
        for i in 0..nodes {
            c.shimds.push(c.spawn_shimd(i));
            wait_for("host-shimd socket", WATCHDOG, || c.socket(i).exists());
        }
        for i in 0..nodes {
            c.agents.push(c.spawn_agent(i));
        }
        // Loopback ports come from `free_port`, which releases them before
        // the agents bind: another test process may take one meanwhile.
        // Then the agent exits with "Address already in use"; start the
        // agents again on fresh ports (a few times) instead of failing.
        let mut nets = nets;
        for _ in 0..3 {
            if nets.iter().any(|n| n.netns.is_some()) || !c.agent_lost_a_port() {
                break;
            }
            for a in &mut c.agents {
                a.kill9();
            }
            for n in &mut nets {
                (n.fabric, n.metrics) = (free_port(), free_port());
            }
            c.metrics = nets.iter().map(|n| n.metrics).collect();
            std::fs::write(&c.config, config(mode, &c.dirs, &nets, rest)).unwrap();
            for i in 0..nodes {
                c.agents[i] = c.spawn_agent(i);
            }
        }
        c.wait_mesh();
        c
    }

    /// Waits until every agent has its connections up (`false`) or one
    /// exited because its address was taken (`true`).
    fn agent_lost_a_port(&mut self) -> bool {
        let n = self.dirs.len();
        let end = std::time::Instant::now() + WATCHDOG;
        while std::time::Instant::now() < end {
            for i in 0..n {
                if !self.agents[i].is_running() {
                    return self.log_tail(&format!("agent-n{i}"), 5).contains("Address already in use");
                }
            }
            if (0..n).all(|i| status_number(&self.status(i), "conns_up").is_some_and(|k| k >= (n - 1) as u64)) {
                return false;
            }
            std::thread::sleep(Duration::from_millis(2));
        }
        false
    }

    /// Log file of a process of the cluster (`agent-n0`, `shimd-n1`, ...).
    pub fn log_path(&self, what: &str) -> PathBuf {
        self.top.path().join(format!("{what}.log"))
    }

    /// The last `lines` lines of a process's log (see [`Cluster::log_path`]).
    pub fn log_tail(&self, what: &str, lines: usize) -> String {
        let s = std::fs::read_to_string(self.log_path(what)).unwrap_or_default();
        let v: Vec<&str> = s.lines().collect();
        v[v.len().saturating_sub(lines)..].join("\n")
    }

    pub fn spawn_shimd(&self, i: usize) -> Proc {
        let mut cmd = Command::new(bin_path("host-shimd"));
        cmd.arg("--config").arg(&self.config).args(["--node", &format!("n{i}")]).env("RUST_LOG", "info");
        cmd.env(doca::RUNTIME_DIR_ENV, self.top.path());
        Proc::spawn_logged(&format!("host-shimd n{i}"), cmd, &self.log_path(&format!("shimd-n{i}")))
    }

    pub fn spawn_agent(&self, i: usize) -> Proc {
        let mut cmd = match &self.netns[i] {
            Some(ns) => {
                // `ip netns exec` execs the command in place: the process
                // is the agent itself (kill -9 reaches it).
                let mut c = Command::new("ip");
                c.args(["netns", "exec", ns]).arg(bin_path("dpu-agent"));
                c
            }
            None => Command::new(bin_path("dpu-agent")),
        };
        cmd.arg("run").arg("--config").arg(&self.config).args(["--node", &format!("n{i}")]).env("RUST_LOG", "info");
        cmd.args(["--cores", &self.cores.to_string()]);
        cmd.env(doca::RUNTIME_DIR_ENV, self.top.path());
        Proc::spawn_logged(&format!("dpu-agent n{i}"), cmd, &self.log_path(&format!("agent-n{i}")))
    }

    /// Kills node `i`'s agent with SIGKILL.
    pub fn kill_agent(&mut self, i: usize) {
        self.agents[i].kill9();
    }

    /// Sends `sig` to node `i`'s agent (SIGSTOP and SIGCONT: a peer that
    /// stops answering and comes back). SIGSTOP returns once every thread
    /// of the agent is stopped (see [`crate::stop_process`]).
    pub fn signal_agent(&self, i: usize, sig: nix::sys::signal::Signal) -> nix::Result<()> {
        if sig == nix::sys::signal::Signal::SIGSTOP {
            crate::stop_process(self.agents[i].pid());
            return Ok(());
        }
        nix::sys::signal::kill(nix::unistd::Pid::from_raw(self.agents[i].pid() as i32), sig)
    }

    /// Starts node `i`'s agent again (after [`Cluster::kill_agent`]).
    pub fn restart_agent(&mut self, i: usize) {
        self.agents[i].kill9();
        self.agents[i] = self.spawn_agent(i);
    }

    /// Kills node `i`'s host-shimd with SIGKILL and removes the socket it
    /// left, so a wait for the socket waits for the next host-shimd.
    pub fn kill_shimd(&mut self, i: usize) {
        self.shimds[i].kill9();
        let _ = std::fs::remove_file(self.socket(i));
    }

    /// Stops node `i`'s host-shimd with SIGTERM, as `systemctl stop` does
    /// (it exits cleanly: every ring it made is marked abandoned), and
    /// removes the socket, as [`Cluster::kill_shimd`] does.
    pub fn stop_shimd(&mut self, i: usize) {
        let status = self.shimds[i].terminate(WATCHDOG);
        assert!(status.success(), "host-shimd n{i} after SIGTERM: {status:?}");
        let _ = std::fs::remove_file(self.socket(i));
    }

    /// Starts node `i`'s host-shimd again and waits for its socket.
    pub fn restart_shimd(&mut self, i: usize) {
        self.kill_shimd(i);
        self.shimds[i] = self.spawn_shimd(i);
        wait_for("restarted host-shimd socket", WATCHDOG, || self.socket(i).exists());
    }

    pub fn socket(&self, i: usize) -> std::path::PathBuf {
        host_shim::daemon::socket_path(self.dirs[i].path())
    }

    pub fn status(&self, i: usize) -> String {
        http_get(self.metrics[i], "/status").map(|(_, b)| b).unwrap_or_default()
    }

    /// Whether node `i`'s agent answers `/ready` with 200.
    pub fn ready(&self, i: usize) -> bool {
        http_get(self.metrics[i], "/ready").is_some_and(|(code, _)| code == 200)
    }

    /// host-shimd's status file of node `i` (JSON; empty when missing).
    pub fn shimd_status(&self, i: usize) -> String {
        std::fs::read_to_string(host_shim::daemon::status_path(self.dirs[i].path())).unwrap_or_default()
    }

    /// Free buffers of `tenant`'s pool on node `i`, as host-shimd's status
    /// file reports them.
    pub fn shimd_pool_free(&self, i: usize, tenant: &str) -> Option<u64> {
        let s = self.shimd_status(i);
        let at = s.find(&format!("{{\"tenant\":\"{tenant}\""))?;
        json_u64(&s[at..], "free")
    }

    /// Starts the ingress process of `spec` (in the cluster file) and waits
    /// until a POST to `path` answers 200 (the fabric links come up first);
    /// returns its pid.
    pub fn start_ingress(&mut self, spec: &IngressSpec, path: &str, within: Duration) -> u32 {
        let mut cmd = Command::new(bin_path("ingress"));
        cmd.arg("--config").arg(&self.config).args(["--name", "edge"]);
        let p = Proc::spawn_logged("ingress", cmd, &self.log_path("ingress"));
        let pid = p.pid();
        self.fns.push(p);
        let k = self.fns.len() - 1;
        wait_for("the ingress serves the chain", within, || {
            assert!(self.fns[k].is_running(), "the ingress exited");
            crate::http_post(spec.http, path, b"ping").is_some_and(|(code, _)| code == 200)
        });
        pid
    }

    /// A number of `tenant`'s object in node `i`'s agent `/status`
    /// (`free_buffers`, `queue`, `tx_messages`, ...).
    pub fn tenant_status(&self, i: usize, tenant: &str, key: &str) -> Option<u64> {
        let s = self.status(i);
        let at = s.find(&format!("{{\"name\":\"{tenant}\""))?;
        json_u64(&s[at..], key)
    }

    pub fn metrics_text(&self, i: usize) -> String {
        http_get(self.metrics[i], "/metrics").map(|(_, b)| b).unwrap_or_default()
    }

    /// Value of the Prometheus sample `name` whose labels include every
    /// `label="value"` of `labels`, on node `i`'s agent (`None`: no such
    /// sample, or the agent does not answer).
    pub fn metric(&self, i: usize, name: &str, labels: &[(&str, &str)]) -> Option<f64> {
        metric_value(&self.metrics_text(i), name, labels)
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
            let end = std::time::Instant::now() + WATCHDOG;
            while status_number(&self.status(i), "conns_up").is_none_or(|n| n < want as u64) {
                assert!(
                    std::time::Instant::now() < end,
                    "timed out after {WATCHDOG:?} waiting for agent n{i} to have {want} fabric connections up; \
                     status: {}\nagents' logs:\n{}",
                    self.status(i).trim(),
                    (0..self.dirs.len())
                        .map(|k| format!("n{k}:\n{}", self.log_tail(&format!("agent-n{k}"), 20)))
                        .collect::<Vec<_>>()
                        .join("\n")
                );
                std::thread::sleep(Duration::from_millis(2));
            }
        }
    }

    /// Starts a sample function that follows ingress routes (`--config`):
    /// it forwards along the route's chain and the last one replies.
    pub fn start_route_fn(&mut self, node: usize, tenant: &str, function: &str, transform: &str) {
        self.start_route_fn_with(node, tenant, function, transform, &[]);
    }

    /// [`start_route_fn`](Self::start_route_fn) with more options of the
    /// sample function (`--delay-us 2000`, say).
    pub fn start_route_fn_with(&mut self, node: usize, tenant: &str, function: &str, transform: &str, extra: &[&str]) {
        let mut cmd = Command::new(bin_path("dne-fn"));
        cmd.arg("--socket").arg(self.socket(node)).args(["--tenant", tenant, "--function", function]);
        cmd.args(["--transform", transform]).arg("--config").arg(&self.config).args(extra);
        let mut p = Proc::spawn_lines(function, cmd);
        p.wait_line("ready", WATCHDOG);
        self.fns.push(p);
    }

    /// Starts a sample function and waits until it is attached; returns
    /// its index in [`Cluster::fns`].
    pub fn start_fn(
        &mut self,
        node: usize,
        tenant: &str,
        function: &str,
        transform: &str,
        next: Option<&str>,
    ) -> usize {
        let mut cmd = Command::new(bin_path("dne-fn"));
        cmd.arg("--socket").arg(self.socket(node)).args(["--tenant", tenant, "--function", function]);
        cmd.args(["--transform", transform]);
        if let Some(n) = next {
            cmd.args(["--next", n]);
        }
        let mut p = Proc::spawn_lines(function, cmd);
        p.wait_line("ready", WATCHDOG);
        self.fns.push(p);
        self.fns.len() - 1
    }

    /// Like [`Cluster::start_fn`]; also returns the attach slot the
    /// function printed in its ready line.
    pub fn start_fn_slot(
        &mut self,
        node: usize,
        tenant: &str,
        function: &str,
        transform: &str,
        next: Option<&str>,
    ) -> (usize, u16) {
        let mut cmd = Command::new(bin_path("dne-fn"));
        cmd.arg("--socket").arg(self.socket(node)).args(["--tenant", tenant, "--function", function]);
        cmd.args(["--transform", transform]);
        if let Some(n) = next {
            cmd.args(["--next", n]);
        }
        let mut p = Proc::spawn_lines(function, cmd);
        let line = p.wait_line("ready", WATCHDOG);
        let slot = line
            .split_whitespace()
            .find_map(|w| w.strip_prefix("slot="))
            .and_then(|v| v.parse().ok())
            .unwrap_or_else(|| panic!("{function}: no slot in `{line}`"));
        self.fns.push(p);
        (self.fns.len() - 1, slot)
    }

    pub fn attach(&self, node: usize, tenant: &str, function: &str) -> Function {
        Function::attach(&self.socket(node), tenant, function).expect("attach")
    }
}

/// Who holds the buffers of a pool, from one scan of its owner records.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Census {
    /// Buffers in the pool.
    pub total: u32,
    /// Free.
    pub free: u32,
    /// Held by the agent (posted receives, its allocation cache, sends).
    pub agent_held: u32,
    /// Handed to the agent: waiting in the tenant's uplink ring.
    pub uplink: u32,
    /// Held by the function in each slot (its cache, messages it holds).
    pub held: std::collections::BTreeMap<u16, u32>,
    /// Handed to the function in each slot (waiting in its ring).
    pub handed: std::collections::BTreeMap<u16, u32>,
    /// Held by the agent on the DPU (`Owner::Agent`: lent receive buffers
    /// and messages it took; DPU mode only).
    pub dpu_held: u32,
    /// Recorded as held by the agent or host-shimd outside any slot, or
    /// unreadable.
    pub other: u32,
}

impl Census {
    /// Scans the pool `f` is attached to.
    pub fn of(f: &Function) -> Self {
        use wire::Owner;
        use wire::segment::AGENT_SLOT;
        let pool = f.pool();
        let total = pool.geometry().buf_count();
        let mut c = Census { total, ..Census::default() };
        for i in 0..total {
            match pool.owner(i) {
                Ok(Owner::Free) => c.free += 1,
                Ok(Owner::Held(AGENT_SLOT)) => c.agent_held += 1,
                Ok(Owner::Function(AGENT_SLOT)) => c.uplink += 1,
                Ok(Owner::Held(s)) => *c.held.entry(s).or_insert(0) += 1,
                Ok(Owner::Function(s)) => *c.handed.entry(s).or_insert(0) += 1,
                Ok(Owner::Agent) => c.dpu_held += 1,
                _ => c.other += 1,
            }
        }
        c
    }

    /// Checks an idle pool: nothing waits in any ring, nothing is held
    /// outside the slots in `live` (function slot and the most it may hold:
    /// its allocation cache plus messages it keeps), and the agent holds at
    /// most `agent_max` (posted receives plus its allocation cache). `Err`
    /// says what is wrong.
    pub fn check_idle(&self, live: &[(u16, u32)], agent_max: u32) -> Result<(), String> {
        let mut bad = Vec::new();
        if self.uplink != 0 || !self.handed.is_empty() || self.other != 0 {
            bad.push("buffers wait in a ring or have a stray owner".to_owned());
        }
        if self.agent_held > agent_max {
            bad.push(format!("the agent holds {} buffers, more than {agent_max}", self.agent_held));
        }
        for (slot, n) in &self.held {
            match live.iter().find(|(s, _)| s == slot) {
                None => bad.push(format!("slot {slot}, no live function, holds {n} buffers")),
                Some((_, max)) if n > max => bad.push(format!("slot {slot} holds {n} buffers, more than {max}")),
                Some(_) => {}
            }
        }
        if bad.is_empty() { Ok(()) } else { Err(format!("{}: {self:?}", bad.join("; "))) }
    }
}

/// A closed-loop load from one function: keeps up to `window` messages
/// in flight toward destinations that answer back to it, checks every
/// answer (a transformed payload, or an error descriptor carrying the
/// original one) against what was sent, and counts. A request id that
/// comes back twice, or that was never sent, fails the test at once.
#[derive(Debug)]
pub struct Load {
    /// The sending (and receiving) function.
    pub f: Function,
    dests: Vec<LoadDest>,
    window: usize,
    next: u32,
    outstanding: std::collections::HashMap<u32, (usize, usize)>,
    /// Messages given up on ([`Load::write_off`]): an answer may still come.
    written_off: std::collections::HashMap<u32, (usize, usize)>,
    held: Option<(host_shim::Msg, usize, usize)>,
    /// With [`Load::allow_maybe_delivered`]: messages answered once, and
    /// whether that answer was a PeerDied error.
    answered: Option<std::collections::HashMap<u32, (usize, usize, bool)>>,
}

/// What a destination does to a payload: the answer expected for it.
pub type Expect = fn(&[u8]) -> Vec<u8>;

/// One destination of a [`Load`] and what happened to its messages.
#[derive(Debug)]
pub struct LoadDest {
    /// Function name.
    pub name: String,
    /// What the destination does to a payload.
    pub expect: Expect,
    /// Messages sent.
    pub sent: u64,
    /// Answers that came back intact.
    pub ok: u64,
    /// Error descriptors, by error code.
    pub errors: std::collections::BTreeMap<u8, u64>,
    /// Messages written off ([`Load::write_off`]).
    pub written_off: u64,
    /// Answers to written-off messages that came after all (intact or
    /// errors; also counted in `ok` and `errors`).
    pub late: u64,
    /// Messages answered twice, at least once with PeerDied ("maybe
    /// delivered"; both answers also counted in `ok` and `errors`).
    pub maybe_twice: u64,
}

impl LoadDest {
    /// Error descriptors that came back.
    pub fn err(&self) -> u64 {
        self.errors.values().sum()
    }
}

/// Payload sizes the load cycles through: one buffer, and chains of two.
const LOAD_SIZES: [usize; 4] = [1, 700, 16_000, 20_000];

/// Payload of a load message.
pub fn load_payload(id: u32, len: usize) -> Vec<u8> {
    (0..len).map(|i| b"abcdefghijklmnopqrstuvwxyz"[(i * 7 + id as usize) % 26]).collect()
}

impl Load {
    /// A load from `f` to `dests` (name, expected transform).
    pub fn new(f: Function, dests: &[(&str, Expect)], window: usize) -> Self {
        let dests = dests
            .iter()
            .map(|(n, e)| LoadDest {
                name: (*n).to_owned(),
                expect: *e,
                sent: 0,
                ok: 0,
                errors: std::collections::BTreeMap::new(),
                written_off: 0,
                late: 0,
                maybe_twice: 0,
            })
            .collect();
        Self {
            f,
            dests,
            window,
            next: 0,
            outstanding: std::collections::HashMap::new(),
            written_off: std::collections::HashMap::new(),
            held: None,
            answered: None,
        }
    }

    /// Accepts one message answered twice when at least one of the answers
    /// is a PeerDied error: the agent returns PeerDied when the fabric send
    /// of a message fails, and a send can fail after the peer placed it
    /// (its node tore the connection down before the acknowledgement came
    /// back), so PeerDied means "maybe delivered", as a failed RPC does.
    /// The peer may then have answered it (its destination's reply) or
    /// failed it too (a PeerDied of its own: its host link went as it
    /// delivered the message). A third answer, or a second when neither
    /// is PeerDied, still fails the test.
    pub fn allow_maybe_delivered(&mut self) {
        self.answered.get_or_insert_with(std::collections::HashMap::new);
    }

    /// Destination `i`'s counts.
    pub fn dest(&self, i: usize) -> &LoadDest {
        &self.dests[i]
    }

    /// Messages sent and not answered yet.
    pub fn in_flight(&self) -> usize {
        self.outstanding.len()
    }

    /// All answers so far (intact or errors), every destination.
    pub fn answered(&self) -> u64 {
        self.dests.iter().map(|d| d.ok + d.err()).sum()
    }

    /// One step: sends while the window has room (round robin over the
    /// destinations; a full ring keeps the message for the next step)
    /// when `send` is set, then takes every answer waiting, sleeping up to
    /// a millisecond for one. Returns the answers taken.
    pub fn step(&mut self, send: bool) -> usize {
        if send {
            self.fill();
        }
        self.take()
    }

    /// Sends while the window has room and the destinations' rings take
    /// messages; returns how many are in flight.
    pub fn fill(&mut self) -> usize {
        while self.outstanding.len() < self.window {
            let (msg, d, len) = match self.held.take() {
                Some(h) => h,
                None => {
                    let id = self.next;
                    self.next += 1;
                    let d = id as usize % self.dests.len();
                    let len = LOAD_SIZES[(id as usize / self.dests.len()) % LOAD_SIZES.len()];
                    let mut m = self.f.alloc(len as u32).expect("alloc a load message");
                    self.f.write(&mut m, &load_payload(id, len)).expect("write");
                    m.set_request(id);
                    (m, d, len)
                }
            };
            let id = msg.request();
            match self.f.send(msg, &self.dests[d].name) {
                Ok(()) => {
                    self.dests[d].sent += 1;
                    self.outstanding.insert(id, (d, len));
                }
                Err(e) if matches!(e.kind, host_shim::SendErrorKind::Full) => {
                    self.held = Some((e.msg.expect("a full ring hands the message back"), d, len));
                    break;
                }
                Err(e) => panic!("send {id} to {}: {e}", self.dests[d].name),
            }
        }
        self.outstanding.len()
    }

    /// Takes every answer waiting, sleeping up to a millisecond for one;
    /// returns how many.
    fn take(&mut self) -> usize {
        let mut n = 0;
        let mut wait = Some(Duration::from_millis(1));
        while let Some(m) = self.f.recv_timeout(wait).expect("recv") {
            wait = Some(Duration::ZERO);
            n += 1;
            let id = m.request();
            let peer_died =
                m.desc().flags & wire::DescFlags::ERROR != 0 && m.desc().status == wire::ErrorCode::PeerDied as u8;
            let first = self.outstanding.remove(&id).or_else(|| {
                let v = self.written_off.remove(&id)?;
                self.dests[v.0].late += 1;
                Some(v)
            });
            let (d, len) = match first {
                Some((d, len)) => {
                    if let Some(a) = self.answered.as_mut() {
                        a.insert(id, (d, len, peer_died));
                    }
                    (d, len)
                }
                // A second answer: only a "maybe delivered" pair, once.
                None => match self.answered.as_mut().and_then(|a| a.remove(&id)) {
                    Some((d, len, first_died)) if first_died || peer_died => {
                        self.dests[d].maybe_twice += 1;
                        (d, len)
                    }
                    _ => panic!("answer {id} ({:?}) was never sent or came back twice", m.desc()),
                },
            };
            let data = load_payload(id, len);
            let desc = *m.desc();
            let got = self.f.read_to_vec(&m);
            self.f.free(m).expect("free an answer");
            let dest = &mut self.dests[d];
            if desc.flags & wire::DescFlags::ERROR != 0 {
                assert!(
                    wire::ErrorCode::from_u8(desc.status).is_some(),
                    "message {id}: error descriptor with an unknown status: {desc:?}"
                );
                assert!(got == data, "message {id}: an error descriptor came back with another payload");
                *dest.errors.entry(desc.status).or_insert(0) += 1;
            } else {
                assert!(got == (dest.expect)(&data), "message {id} to {}: payload of {len} B changed", dest.name);
                dest.ok += 1;
            }
        }
        n
    }

    /// Steps until `cond` holds; panics after `deadline` with the counts
    /// and `why()` (a watchdog against hangs, not a timing assertion).
    pub fn run_until(
        &mut self,
        send: bool,
        what: &str,
        deadline: Duration,
        why: impl Fn() -> String,
        cond: impl Fn(&Self) -> bool,
    ) {
        let end = std::time::Instant::now() + deadline;
        while !cond(self) {
            assert!(
                std::time::Instant::now() < end,
                "timed out after {deadline:?} waiting for {what}: {} in flight (ids {:?}...), {:?}\n{}",
                self.in_flight(),
                self.missing(),
                self.dests,
                why()
            );
            self.step(send);
        }
    }

    /// Stops sending and waits until every message sent was answered
    /// (intact or as an error descriptor): none is lost silently.
    pub fn drain(&mut self, deadline: Duration, why: impl Fn() -> String) {
        if let Some((m, _, _)) = self.held.take() {
            self.f.free(m).expect("free a message never sent");
        }
        self.run_until(false, "every message sent to be answered", deadline, why, |l| l.in_flight() == 0);
    }

    /// Gives up on the messages in flight to the destinations `which`
    /// selects (by index): they leave the window and the waits, but an
    /// answer that still comes is checked and counted as late, and a
    /// second answer still fails the test. Returns how many.
    pub fn write_off(&mut self, which: impl Fn(usize) -> bool) -> usize {
        let ids: Vec<u32> = self.outstanding.iter().filter(|(_, (d, _))| which(*d)).map(|(id, _)| *id).collect();
        for id in &ids {
            if let Some(v) = self.outstanding.remove(id) {
                self.dests[v.0].written_off += 1;
                self.written_off.insert(*id, v);
            }
        }
        ids.len()
    }

    /// Written-off messages never answered (so far).
    pub fn never_answered(&self) -> usize {
        self.written_off.len()
    }

    /// Messages in flight: (request id, destination index).
    pub fn pending(&self) -> Vec<(u32, usize)> {
        self.outstanding.iter().map(|(id, (d, _))| (*id, *d)).collect()
    }

    /// Request id the next new message gets.
    pub fn next_id(&self) -> u32 {
        self.next
    }

    /// Request ids still in flight (for failure messages), at most 20.
    pub fn missing(&self) -> Vec<u32> {
        let mut v: Vec<u32> = self.outstanding.keys().copied().collect();
        v.sort_unstable();
        v.truncate(20);
        v
    }
}

/// Buffers a function keeps in its private allocation cache at most
/// (host-shim's `CACHE`).
pub const FN_CACHE: u32 = 32;

/// The number after `"key":` in a JSON document (enough for status files).
pub fn status_number(json: &str, key: &str) -> Option<u64> {
    let at = json.find(&format!("\"{key}\":"))? + key.len() + 3;
    let digits: String = json[at..].chars().take_while(char::is_ascii_digit).collect();
    digits.parse().ok()
}

/// The unsigned number after `"key":` in `s`, first occurrence (the same
/// as [`status_number`]).
pub fn json_u64(s: &str, key: &str) -> Option<u64> {
    status_number(s, key)
}

/// Value of the sample `name{...}` in Prometheus text `text` whose labels
/// include all of `labels`.
pub fn metric_value(text: &str, name: &str, labels: &[(&str, &str)]) -> Option<f64> {
    text.lines().filter(|l| !l.starts_with('#')).find_map(|l| {
        let (series, value) = l.rsplit_once(' ')?;
        let (n, rest) = series.split_once('{').unwrap_or((series, ""));
        if n != name || !labels.iter().all(|(k, v)| rest.contains(&format!("{k}=\"{v}\""))) {
            return None;
        }
        value.parse().ok()
    })
}

/// Network namespaces and veth links made for one test, deleted (with the
/// links, and whatever runs inside is expected to be gone by then) when
/// dropped, also when the test panics. Names carry this process's id, and
/// leftovers of processes that no longer exist (a test run killed with
/// SIGKILL) are removed before new ones are made.
#[derive(Debug)]
pub struct Netns {
    /// The namespaces.
    pub names: Vec<String>,
    /// Links whose end lives in this namespace.
    links: Vec<String>,
}

/// Serializes namespace setup (subnet choice) between tests of a process.
static NETNS_SETUP: Mutex<u32> = Mutex::new(0);

fn ip(args: &[&str]) -> Result<(), String> {
    let out = Command::new("ip").args(args).output().map_err(|e| format!("cannot run `ip` (iproute2): {e}"))?;
    if out.status.success() {
        Ok(())
    } else {
        Err(format!("`ip {}` failed: {}", args.join(" "), String::from_utf8_lossy(&out.stderr).trim()))
    }
}

fn ip_out(args: &[&str]) -> String {
    Command::new("ip").args(args).output().map(|o| String::from_utf8_lossy(&o.stdout).into_owned()).unwrap_or_default()
}

/// Whether this process runs as root (needed for network namespaces).
pub fn is_root() -> bool {
    // Effective uid: the second field of `Uid:` in /proc/self/status.
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| s.lines().find_map(|l| l.strip_prefix("Uid:").map(|r| r.split_whitespace().nth(1) == Some("0"))))
        .unwrap_or(false)
}

const NETNS_PREFIX: &str = "dne-t";

impl Netns {
    /// Takes the fabric link between the two namespaces down (its end in
    /// the second one), or back up: node n1 vanishes for n0 without a FIN
    /// or a reset, as when a host or a cable is lost.
    pub fn set_fabric(&self, up: bool) {
        let f0 = self.links.first().expect("the fabric link");
        let f1 = format!("{}f1", f0.strip_suffix("f0").expect("the fabric link's name"));
        let state = if up { "up" } else { "down" };
        ip(&["-n", &self.names[1], "link", "set", &f1, state]).unwrap_or_else(|e| panic!("{e}"));
    }

    /// Two namespaces for two nodes: `<ns0>` and `<ns1>` joined by a veth
    /// pair carrying the fabric (10.213.X.1 and .2), and each joined to
    /// this namespace by a veth pair for metrics and status (the node's
    /// end 10.213.X.6 / .10, ours .5 / .9). No forwarding, no bridge, no
    /// firewall rule involved. `None` when not root; panics with the
    /// failing command when root but `ip` fails.
    pub fn two_nodes() -> Option<(Self, Vec<NodeNet>)> {
        if !is_root() {
            return None;
        }
        let mut n = NETNS_SETUP.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        if *n == 0 {
            Self::remove_stale();
        }
        let k = *n;
        *n += 1;
        let pid = std::process::id();
        let names: Vec<String> = (0..2).map(|i| format!("{NETNS_PREFIX}-{pid}-{k}-{i}")).collect();
        let ifname = |tag: &str| format!("dn{pid}_{k}{tag}");
        let mut me = Self { names: Vec::new(), links: Vec::new() };
        // A /24 no interface of this namespace uses yet.
        let used = ip_out(&["-o", "-4", "addr", "show"]);
        let x = (0..256u32)
            .map(|j| (pid.wrapping_mul(7).wrapping_add(k * 13).wrapping_add(j)) % 256)
            .find(|x| !used.contains(&format!("10.213.{x}.")))
            .expect("a free 10.213.X.0/24");
        let a = |h: u8| Ipv4Addr::new(10, 213, x as u8, h);
        let setup = |me: &mut Self| -> Result<Vec<NodeNet>, String> {
            for ns in &names {
                ip(&["netns", "add", ns])?;
                me.names.push(ns.clone());
                ip(&["-n", ns, "link", "set", "lo", "up"])?;
            }
            // Fabric: one veth pair between the two namespaces.
            let (f0, f1) = (ifname("f0"), ifname("f1"));
            ip(&["link", "add", &f0, "type", "veth", "peer", "name", &f1])?;
            me.links.push(f0.clone());
            for (i, f) in [&f0, &f1].into_iter().enumerate() {
                ip(&["link", "set", f, "netns", &names[i]])?;
                ip(&["-n", &names[i], "addr", "add", &format!("{}/30", a(1 + i as u8)), "dev", f])?;
                ip(&["-n", &names[i], "link", "set", f, "up"])?;
            }
            // Management: a veth pair from here into each namespace.
            let mut nets = Vec::new();
            for (i, ns) in names.iter().enumerate() {
                let (outer, inner) = (ifname(&format!("m{i}")), ifname(&format!("n{i}")));
                let (ours, theirs) = (a(5 + 4 * i as u8), a(6 + 4 * i as u8));
                ip(&["link", "add", &outer, "type", "veth", "peer", "name", &inner])?;
                me.links.push(outer.clone());
                ip(&["link", "set", &inner, "netns", ns])?;
                ip(&["addr", "add", &format!("{ours}/30"), "dev", &outer])?;
                ip(&["link", "set", &outer, "up"])?;
                ip(&["-n", ns, "addr", "add", &format!("{theirs}/30"), "dev", &inner])?;
                ip(&["-n", ns, "link", "set", &inner, "up"])?;
                nets.push(NodeNet {
                    netns: Some(ns.clone()),
                    fabric: SocketAddr::new(IpAddr::V4(a(1 + i as u8)), 7400),
                    metrics: SocketAddr::new(IpAddr::V4(theirs), 9400),
                });
            }
            Ok(nets)
        };
        match setup(&mut me) {
            Ok(nets) => Some((me, nets)),
            Err(e) => {
                drop(me);
                panic!("setting up network namespaces: {e}");
            }
        }
    }

    /// Whether namespace `name` exists now.
    pub fn exists(name: &str) -> bool {
        ip_out(&["netns", "list"]).lines().any(|l| l.split_whitespace().next() == Some(name))
    }

    /// Names of links in this namespace that start with `prefix`.
    pub fn links_named(prefix: &str) -> Vec<String> {
        ip_out(&["-o", "link", "show"])
            .lines()
            .filter_map(|l| l.split(':').nth(1))
            .map(|n| n.trim().split('@').next().unwrap_or("").to_owned())
            .filter(|n| n.starts_with(prefix))
            .collect()
    }

    /// Removes namespaces and links left by test processes that are gone.
    fn remove_stale() {
        let dead = |pid: &str| pid.parse::<u32>().is_ok_and(|p| !std::path::Path::new(&format!("/proc/{p}")).exists());
        for l in ip_out(&["netns", "list"]).lines() {
            let Some(name) = l.split_whitespace().next() else { continue };
            if let Some(rest) = name.strip_prefix(&format!("{NETNS_PREFIX}-"))
                && rest.split('-').next().is_some_and(dead)
            {
                let _ = ip(&["netns", "del", name]);
            }
        }
        for name in Self::links_named("dn") {
            if name[2..].split('_').next().is_some_and(dead) {
                let _ = ip(&["link", "del", &name]);
            }
        }
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        for l in &self.links {
            let _ = ip(&["link", "del", l]);
        }
        for ns in &self.names {
            let _ = ip(&["netns", "del", ns]);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_json_numbers_and_metric_samples() {
        let s = r#"{"tenants":[{"name":"acme","queue":0,"free_buffers":1017},{"name":"b","free_buffers":3}]}"#;
        let at = s.find("{\"name\":\"b\"").unwrap();
        assert_eq!(json_u64(&s[at..], "free_buffers"), Some(3));
        assert_eq!(json_u64(s, "free_buffers"), Some(1017));
        assert_eq!(json_u64(s, "missing"), None);
        let text = "# HELP x\ndne_agent_drops_total{node=\"n1\",tenant=\"acme\",reason=\"peer_died\"} 4\n\
                    dne_agent_drops_total{node=\"n1\",tenant=\"acme\",reason=\"unreachable\"} 2\n";
        assert_eq!(metric_value(text, "dne_agent_drops_total", &[("reason", "unreachable")]), Some(2.0));
        assert_eq!(metric_value(text, "dne_agent_drops_total", &[("tenant", "acme")]), Some(4.0));
        assert_eq!(metric_value(text, "dne_agent_drops", &[]), None);
    }
}

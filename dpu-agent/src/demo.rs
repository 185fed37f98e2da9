//! `dpu-agent demo`: a whole DNE cluster on this one machine, as real child
//! processes, in emulated mode, with load driven through the ingress and a
//! summary at the end.
//!
//! Every process is this same binary in another role (hidden subcommands
//! `role shimd|fn|ingress`, and `run` for the agents), so `cargo run -p
//! dpu-agent -- demo` needs nothing else built. The cluster:
//! * two worker nodes `n0` and `n1`, each with host-shimd, an agent and the
//!   sample functions; when run as root each agent runs in a network
//!   namespace of its own (veth pairs routed through the root namespace),
//!   on loopback otherwise;
//! * one ingress (HTTP on 127.0.0.1) that is a fabric node of its own;
//! * three tenants with weights 4, 2 and 1, each with an echo route (one
//!   function on `n0`), a chain route of three functions across both nodes
//!   (`upper` on n0, `rot13` on n1, `reverse` on n0), and a fan-out route
//!   (`fan` on n0 sends a copy to `b0` (upper, n0) and `b1` (rot13, n1);
//!   `agg` on n0 gathers both bodies into the reply).
//!
//! Everything it starts is killed, and its namespaces and scratch directory
//! removed, when it ends (normally, on an error, or on Ctrl-C).

use config::Cluster;
use std::fmt::Write as _;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

/// Demo options.
#[derive(Clone, Debug, clap::Args)]
pub struct DemoOptions {
    /// Seconds of load (with `--soak`: at least 600).
    #[arg(long, default_value_t = 10)]
    pub duration: u64,
    /// Soak: run at least 10 minutes, sample every process's resident
    /// memory after a 60 s warm-up and at the end, and fail if any grew by
    /// 5 % or more, or if any request was lost.
    #[arg(long)]
    pub soak: bool,
    /// Keep the cluster up (no load) and print curl commands; Ctrl-C ends.
    #[arg(long)]
    pub serve: bool,
    /// Client connections per tenant (1 to 1024).
    #[arg(long, default_value_t = 4, value_parser = clap::value_parser!(u16).range(1..=1024))]
    pub connections: u16,
    /// Request body bytes.
    #[arg(long, default_value_t = 1024)]
    pub body: usize,
    /// Stay on loopback even when root (no network namespaces).
    #[arg(long)]
    pub no_netns: bool,
    /// HTTP port of the ingress (0: any free port).
    #[arg(long, default_value_t = 8080)]
    pub port: u16,
    /// The worker nodes' mode: `emulated` (each agent attached to its
    /// host-shimd's shared memory) or `dpu` (each agent behind emulated
    /// DOCA comch, sending from and receiving into host pools it imported,
    /// as on a BlueField).
    #[arg(long, default_value = "emulated", value_parser = ["emulated", "dpu"])]
    pub mode: String,
    /// For programs that run the demo (the `soak` benchmark): environment
    /// set on every child process.
    #[arg(skip)]
    pub child_env: Vec<(String, String)>,
    /// For programs that run the demo: sample resident memory after
    /// `warmup_s` and at the end and judge growth, without `--soak`'s
    /// 10-minute minimum.
    #[arg(skip)]
    pub memory_check: bool,
    /// Warm-up before the first memory sample, seconds (0: 60).
    #[arg(skip)]
    pub warmup_s: u64,
    /// Print nothing (the caller reports the [`Outcome`]).
    #[arg(skip)]
    pub quiet: bool,
}

/// What a demo run measured.
#[derive(Clone, Debug, Default)]
pub struct Outcome {
    /// Requests answered correctly.
    pub requests: u64,
    /// Requests that failed in any way (`lost` + `wrong` + connection
    /// failures).
    pub errors: u64,
    /// Requests with no answer (timed out, or the connection broke).
    pub lost: u64,
    /// Answers that were not the request's own (wrong status, or another
    /// request's body: a duplicated or misrouted reply).
    pub wrong: u64,
    /// Seconds of load, as measured (shorter than asked when the run was
    /// stopped early).
    pub duration_s: f64,
    /// Whether the load was stopped early (Ctrl-C, SIGTERM, SIGHUP).
    pub interrupted: bool,
    /// Per process: name, resident KiB after the warm-up and at the end
    /// (with `--soak` or `memory_check`).
    pub rss: Vec<(String, u64, u64)>,
    /// Whether everything held (no error, memory within 5 %).
    pub ok: bool,
}

const TENANTS: [(&str, u32); 3] = [("gold", 4), ("silver", 2), ("bronze", 1)];

/// Every tenant's functions: name suffix, node, transform, and the fan-out
/// role (`--fanout`, `--branch-to` or `--gather`, with `{t}` the tenant).
const FUNCTIONS: [(&str, u16, &str, &[&str]); 8] = [
    ("echo", 0, "echo", &[]),
    ("upper", 0, "upper", &[]),
    ("rot13", 1, "rot13", &[]),
    ("reverse", 0, "reverse", &[]),
    ("fan", 0, "echo", &["--fanout", "{t}-b0,{t}-b1"]),
    ("b0", 0, "upper", &["--branch-to", "{t}-agg"]),
    ("b1", 1, "rot13", &["--branch-to", "{t}-agg"]),
    ("agg", 0, "echo", &["--gather", "2"]),
];
const READY_WITHIN: Duration = Duration::from_secs(60);

/// Two network namespaces, each joined to the root namespace by a veth
/// pair, routed through it. Removed on drop.
/// The demo's two network namespaces, their veth pairs and routes (as
/// root). Their addresses are fixed, so one demo at a time has them: a
/// lock file ([`Netns::LOCK`]), held while they exist.
#[derive(Debug)]
struct Netns {
    names: [String; 2],
    forward_was: Option<String>,
    /// The lock file, locked (`flock`; the kernel drops the lock when the
    /// demo dies, however it dies). Holds the pid and `ip_forward` as found.
    _lock: std::fs::File,
}

impl Netns {
    const ROOT_IP: [&'static str; 2] = ["10.231.1.1", "10.231.2.1"];
    const NS_IP: [&'static str; 2] = ["10.231.1.2", "10.231.2.2"];
    const LOCK: &'static str = "/run/dne-demo.lock";
    const PREFIX: &'static str = "dne-demo";

    fn create() -> anyhow::Result<Self> {
        use std::io::{Read, Seek, Write};
        use std::os::unix::fs::OpenOptionsExt;
        let mut lock = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .mode(0o600)
            .open(Self::LOCK)
            .map_err(|e| anyhow::anyhow!("opening {}: {e}", Self::LOCK))?;
        let mut held = String::new();
        match rustix::fs::flock(&lock, rustix::fs::FlockOperation::NonBlockingLockExclusive) {
            Ok(()) => {}
            Err(rustix::io::Errno::WOULDBLOCK) => {
                // The holder writes its pid just after taking the lock: it
                // may not be there yet (or be the previous holder's).
                let _ = lock.read_to_string(&mut held);
                let who = match held.lines().next().and_then(|p| p.parse::<u32>().ok()) {
                    Some(pid) if std::path::Path::new(&format!("/proc/{pid}")).exists() => format!(" (pid {pid})"),
                    _ => String::new(),
                };
                anyhow::bail!(
                    "another demo{who} has this machine's demo network namespaces; wait for it to end, \
                     or run this one with --no-netns"
                );
            }
            Err(e) => return Err(anyhow::anyhow!("locking {}: {e}", Self::LOCK)),
        }
        lock.read_to_string(&mut held)?;
        // Namespaces left now were a killed demo's (the lock was free), and
        // so was an `ip_forward` of 1: the value it found is in the file.
        let stale = Self::stale()?;
        let mut forward_was = std::fs::read_to_string("/proc/sys/net/ipv4/ip_forward").ok();
        if !stale.is_empty() {
            log::warn!("removing network namespaces left by a demo that was killed: {}", stale.join(", "));
            for n in &stale {
                ip(&["netns", "del", n])?;
            }
            if let Some(v) = held.lines().nth(1).filter(|v| matches!(*v, "0" | "1")) {
                forward_was = Some(format!("{v}\n"));
            }
        }
        lock.set_len(0)?;
        lock.rewind()?;
        write!(lock, "{}\n{}\n", std::process::id(), forward_was.as_deref().unwrap_or("").trim())?;
        let tag = std::process::id() % 100_000;
        let names = [format!("{}{tag}-0", Self::PREFIX), format!("{}{tag}-1", Self::PREFIX)];
        let ns = Self { names, forward_was, _lock: lock };
        for i in 0..2 {
            let n = &ns.names[i];
            let (host, peer) = (format!("dnd{tag}h{i}"), format!("dnd{tag}n{i}"));
            ip(&["netns", "add", n])?;
            ip(&["link", "add", &host, "type", "veth", "peer", "name", &peer])?;
            ip(&["link", "set", &peer, "netns", n])?;
            ip(&["addr", "add", &format!("{}/24", Self::ROOT_IP[i]), "dev", &host])?;
            ip(&["link", "set", &host, "up"])?;
            ip(&["-n", n, "addr", "add", &format!("{}/24", Self::NS_IP[i]), "dev", &peer])?;
            ip(&["-n", n, "link", "set", &peer, "up"])?;
            ip(&["-n", n, "link", "set", "lo", "up"])?;
            ip(&["-n", n, "route", "add", "default", "via", Self::ROOT_IP[i]])?;
        }
        std::fs::write("/proc/sys/net/ipv4/ip_forward", "1\n")?;
        Ok(ns)
    }

    /// The network namespaces named like a demo's.
    fn stale() -> anyhow::Result<Vec<String>> {
        let out = Command::new("ip").args(["netns", "list"]).output()?;
        anyhow::ensure!(out.status.success(), "ip netns list: {}", String::from_utf8_lossy(&out.stderr).trim());
        Ok(String::from_utf8_lossy(&out.stdout)
            .lines()
            .filter_map(|l| l.split_whitespace().next())
            .filter(|n| n.starts_with(Self::PREFIX))
            .map(str::to_owned)
            .collect())
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        for n in &self.names {
            // Deleting the namespace deletes its veth ends, and so the pairs.
            let _ = ip(&["netns", "del", n]);
        }
        if let Some(v) = &self.forward_was {
            let _ = std::fs::write("/proc/sys/net/ipv4/ip_forward", v);
        }
    }
}

fn ip(args: &[&str]) -> anyhow::Result<()> {
    let out = Command::new("ip").args(args).output()?;
    if !out.status.success() {
        anyhow::bail!("ip {}: {}", args.join(" "), String::from_utf8_lossy(&out.stderr).trim());
    }
    Ok(())
}

/// The running cluster; dropping it stops everything.
#[derive(Debug)]
struct Demo {
    children: Vec<(String, Child)>,
    dir: PathBuf,
    netns: Option<Netns>,
    config: PathBuf,
    cluster: Cluster,
    http: SocketAddr,
    child_env: Vec<(String, String)>,
}

impl Drop for Demo {
    fn drop(&mut self) {
        for (_, c) in &mut self.children {
            let _ = nix::sys::signal::kill(nix::unistd::Pid::from_raw(c.id() as i32), nix::sys::signal::SIGTERM);
        }
        let end = Instant::now() + Duration::from_secs(3);
        for (name, c) in &mut self.children {
            loop {
                match c.try_wait() {
                    Ok(Some(_)) => break,
                    Ok(None) if Instant::now() < end => std::thread::sleep(Duration::from_millis(10)),
                    _ => {
                        log::warn!("{name} did not stop: killing it");
                        let _ = c.kill();
                        let _ = c.wait();
                        break;
                    }
                }
            }
        }
        self.netns.take();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

fn cluster_file(
    mode: &str,
    dir: &Path,
    addrs: &[SocketAddr; 2],
    metrics: &[SocketAddr; 2],
    edge: SocketAddr,
    http: SocketAddr,
) -> String {
    let mut s = String::from("# Written by `dpu-agent demo`.\n");
    for i in 0..2 {
        let _ = write!(
            s,
            "\n[[node]]\nname = \"n{i}\"\nmode = \"{mode}\"\naddress = \"{}\"\nmetrics = \"{}\"\nruntime_dir = \"{}\"\n",
            addrs[i],
            metrics[i],
            dir.join(format!("n{i}")).display()
        );
    }
    let _ = write!(
        s,
        "\n[[ingress]]\nname = \"edge\"\naddress = \"{edge}\"\nhttp = \"{http}\"\nruntime_dir = \"{}\"\nbuffers = 2048\n",
        dir.join("edge").display()
    );
    for (t, w) in TENANTS {
        let _ = write!(
            s,
            "\n[[tenant]]\nname = \"{t}\"\nweight = {w}\nbuf_size = 4096\nbuffers = 2048\nrecv_quota = 256\nmax_chain = 300\n"
        );
        for (f, node, _, _) in FUNCTIONS {
            let _ = write!(s, "\n[[function]]\nname = \"{t}-{f}\"\ntenant = \"{t}\"\nnode = \"n{node}\"\n");
        }
        for (path, chain) in [("echo", "echo"), ("chain", "upper\", \"{t}-rot13\", \"{t}-reverse"), ("fanout", "fan")] {
            let chain = chain.replace("{t}", t);
            let _ = write!(s, "\n[[route]]\npath = \"/{t}/{path}\"\ntenant = \"{t}\"\nchain = [\"{t}-{chain}\"]\n");
        }
    }
    s
}

impl Demo {
    fn spawn(&mut self, name: &str, netns: Option<&str>, args: &[&str]) -> anyhow::Result<()> {
        let exe = std::env::current_exe()?;
        let mut cmd = match netns {
            Some(ns) => {
                let mut c = Command::new("ip");
                c.args(["netns", "exec", ns]).arg(&exe);
                c
            }
            None => Command::new(&exe),
        };
        cmd.args(args);
        cmd.envs(self.child_env.iter().map(|(k, v)| (k, v)));
        let log = std::fs::File::create(self.dir.join(format!("{name}.log")))?;
        cmd.stdin(Stdio::null()).stdout(Stdio::from(log.try_clone()?)).stderr(Stdio::from(log));
        // Its own process group: Ctrl-C reaches the demo, which stops the
        // children in order.
        std::os::unix::process::CommandExt::process_group(&mut cmd, 0);
        let child = cmd.spawn().map_err(|e| anyhow::anyhow!("starting {name}: {e}"))?;
        self.children.push((name.to_owned(), child));
        Ok(())
    }

    fn check_children(&mut self) -> anyhow::Result<()> {
        for (name, c) in &mut self.children {
            if let Some(st) = c.try_wait()? {
                let log = std::fs::read_to_string(self.dir.join(format!("{name}.log"))).unwrap_or_default();
                let tail: Vec<&str> = log.lines().rev().take(8).collect();
                let tail: Vec<&str> = tail.into_iter().rev().collect();
                anyhow::bail!("{name} exited ({st}):\n  {}", tail.join("\n  "));
            }
        }
        Ok(())
    }

    fn start(opts: &DemoOptions, stop: &StopWatch) -> anyhow::Result<Self> {
        // The namespaces first: a demo refused them has made nothing yet.
        let root = rustix::process::geteuid().is_root();
        let netns = if root && !opts.no_netns && which("ip") { Some(Netns::create()?) } else { None };
        let dir = std::env::temp_dir().join(format!("dne-demo-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir)?;
        // Each free port is held until the last is chosen: a port let go
        // at once can come back from the next bind, and two nodes given
        // one port make the cluster file invalid.
        let mut held = Vec::new();
        let mut free_port = || -> anyhow::Result<SocketAddr> {
            let l = std::net::TcpListener::bind(("127.0.0.1", 0))?;
            let a = l.local_addr()?;
            held.push(l);
            Ok(a)
        };
        let (addrs, metrics, edge) = match &netns {
            Some(_) => (
                [format!("{}:7101", Netns::NS_IP[0]).parse()?, format!("{}:7102", Netns::NS_IP[1]).parse()?],
                [format!("{}:9101", Netns::NS_IP[0]).parse()?, format!("{}:9102", Netns::NS_IP[1]).parse()?],
                format!("{}:7100", Netns::ROOT_IP[0]).parse()?,
            ),
            None => ([free_port()?, free_port()?], [free_port()?, free_port()?], free_port()?),
        };
        let http = match std::net::TcpListener::bind(("127.0.0.1", opts.port)) {
            Ok(l) => l.local_addr()?,
            Err(_) => free_port()?,
        };
        drop(held);
        let config = dir.join("cluster.toml");
        std::fs::write(&config, cluster_file(&opts.mode, &dir, &addrs, &metrics, edge, http))?;
        let cluster = Cluster::load(&config)?;
        // Emulated comch sockets live in the demo's directory.
        let mut child_env = opts.child_env.clone();
        child_env.push((doca::RUNTIME_DIR_ENV.to_owned(), dir.display().to_string()));
        child_env.push((PARENT_ENV.to_owned(), std::process::id().to_string()));
        let mut d = Demo { children: Vec::new(), dir, netns, config, cluster, http, child_env };
        let cfg = d.config.to_string_lossy().into_owned();
        for i in 0..2 {
            let node = format!("n{i}");
            d.spawn(&format!("host-shimd-{node}"), None, &["role", "shimd", "--config", &cfg, "--node", &node])?;
        }
        for i in 0..2 {
            let node = format!("n{i}");
            let ns = d.netns.as_ref().map(|n| n.names[i].clone());
            d.spawn(&format!("agent-{node}"), ns.as_deref(), &["run", "--config", &cfg, "--node", &node])?;
        }
        // One process per function and node it runs on.
        let placed: Vec<(config::Function, String)> =
            d.cluster.functions.iter().flat_map(|f| f.nodes.iter().map(move |n| (f.clone(), n.clone()))).collect();
        for (f, node) in placed {
            let socket = host_shim::daemon::socket_path(
                &d.cluster.nodes[usize::from(d.cluster.node_id(&node).unwrap_or(0))].runtime_dir,
            );
            let sock = socket.to_string_lossy().into_owned();
            let suffix = f.name.rsplit('-').next().unwrap_or("echo");
            let (_, _, transform, extra) =
                FUNCTIONS.iter().find(|x| x.0 == suffix).copied().unwrap_or(("", 0, "echo", &[]));
            let extra: Vec<String> = extra.iter().map(|a| a.replace("{t}", &f.tenant)).collect();
            let deadline = Instant::now() + READY_WITHIN;
            while !socket.exists() {
                stop.check()?;
                d.check_children()?;
                anyhow::ensure!(Instant::now() < deadline, "host-shimd of {node} did not start");
                std::thread::sleep(Duration::from_millis(10));
            }
            let name = if f.nodes.len() > 1 { format!("{}@{node}", f.name) } else { f.name.clone() };
            d.spawn(
                &name,
                None,
                &[
                    "role",
                    "fn",
                    "--socket",
                    &sock,
                    "--tenant",
                    &f.tenant,
                    "--function",
                    &f.name,
                    "--transform",
                    transform,
                    "--config",
                    &cfg,
                ]
                .into_iter()
                .chain(extra.iter().map(String::as_str))
                .collect::<Vec<_>>(),
            )?;
        }
        d.spawn("ingress", None, &["role", "ingress", "--config", &cfg, "--name", "edge"])?;
        Ok(d)
    }

    /// Waits until every route answers 200.
    fn wait_ready(&mut self, stop: &StopWatch) -> anyhow::Result<Duration> {
        let start = Instant::now();
        let routes: Vec<String> = self.cluster.routes.iter().map(|r| r.path.clone()).collect();
        for path in routes {
            loop {
                stop.check()?;
                self.check_children()?;
                if let Some((code, body)) = post(self.http, &path, b"ping")
                    && code == 200
                {
                    let want: &[u8] = if path.ends_with("/echo") {
                        b"ping"
                    } else if path.ends_with("/chain") {
                        b"TAVC"
                    } else {
                        b"PINGcvat"
                    };
                    anyhow::ensure!(body.ends_with(want), "route {path} answered {:?}", String::from_utf8_lossy(&body));
                    break;
                }
                anyhow::ensure!(
                    start.elapsed() < READY_WITHIN,
                    "route {path} did not answer within {READY_WITHIN:?}; logs in {}",
                    self.dir.display()
                );
                std::thread::sleep(Duration::from_millis(20));
            }
        }
        Ok(start.elapsed())
    }
}

fn which(prog: &str) -> bool {
    std::env::var_os("PATH").is_some_and(|p| std::env::split_paths(&p).any(|d| d.join(prog).is_file()))
}

/// One blocking `POST` (for readiness checks).
fn post(addr: SocketAddr, path: &str, body: &[u8]) -> Option<(u16, Vec<u8>)> {
    use std::io::{Read, Write};
    let mut s = std::net::TcpStream::connect_timeout(&addr, Duration::from_secs(1)).ok()?;
    s.set_read_timeout(Some(Duration::from_secs(5))).ok()?;
    write!(s, "POST {path} HTTP/1.1\r\nHost: demo\r\nConnection: close\r\nContent-Length: {}\r\n\r\n", body.len())
        .ok()?;
    s.write_all(body).ok()?;
    let mut out = Vec::new();
    s.read_to_end(&mut out).ok()?;
    let code = String::from_utf8_lossy(out.get(..12)?).split_whitespace().nth(1)?.parse().ok()?;
    Some((code, out))
}

/// What one tenant's clients saw.
#[derive(Debug)]
struct Tally {
    ok: AtomicU64,
    errors: AtomicU64,
    lost: AtomicU64,
    wrong: AtomicU64,
    /// Latency histogram: one bucket per microsecond up to [`HIST_US`].
    hist: std::sync::Mutex<Vec<u32>>,
}

impl Default for Tally {
    fn default() -> Self {
        Self {
            ok: AtomicU64::new(0),
            errors: AtomicU64::new(0),
            lost: AtomicU64::new(0),
            wrong: AtomicU64::new(0),
            hist: std::sync::Mutex::new(vec![0; HIST_US + 1]),
        }
    }
}

/// Latencies above this many microseconds count in the last bucket.
const HIST_US: usize = 1_000_000;
/// A request without an answer for this long counts as lost.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(10);

fn expected_chain(body: &[u8]) -> Vec<u8> {
    use dne_functions::Transform;
    let mut v = body.to_vec();
    for t in [Transform::Upper, Transform::Rot13, Transform::Reverse] {
        t.apply(&mut v);
    }
    v
}

/// One closed-loop client on a keep-alive connection until `stop`.
#[allow(clippy::too_many_arguments)]
async fn client(addr: SocketAddr, path: String, tag: String, len: usize, tally: Arc<Tally>, stop: Arc<AtomicBool>) {
    use http_body_util::{BodyExt, Full};
    let mut hist = vec![0u32; HIST_US + 1];
    let mut n: u64 = 0;
    'conn: while !stop.load(Ordering::Relaxed) {
        let Ok(stream) = tokio::net::TcpStream::connect(addr).await else {
            tally.errors.fetch_add(1, Ordering::Relaxed);
            tokio::time::sleep(Duration::from_millis(50)).await;
            continue;
        };
        let _ = stream.set_nodelay(true);
        let Ok((mut send, conn)) = hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(stream)).await
        else {
            tally.errors.fetch_add(1, Ordering::Relaxed);
            continue;
        };
        tokio::spawn(conn);
        while !stop.load(Ordering::Relaxed) {
            // Every body is unique, so a reply that is lost, duplicated or
            // given to the wrong request cannot pass the check.
            n += 1;
            let body = request_body(&tag, n, len);
            let want = expected_chain(&body);
            let req = hyper::Request::post(path.as_str())
                .header(hyper::header::HOST, "demo")
                .body(Full::new(bytes::Bytes::from(body)));
            let Ok(req) = req else { break 'conn };
            let t0 = Instant::now();
            let exchange = async {
                let resp = send.send_request(req).await.map_err(|_| ())?;
                let status = resp.status();
                let b = resp.into_body().collect().await.map_err(|_| ())?.to_bytes();
                Ok::<bool, ()>(status == hyper::StatusCode::OK && b[..] == want[..])
            };
            match tokio::time::timeout(REQUEST_TIMEOUT, exchange).await {
                Ok(Ok(true)) => {
                    tally.ok.fetch_add(1, Ordering::Relaxed);
                    let us = usize::try_from(t0.elapsed().as_micros()).unwrap_or(HIST_US).min(HIST_US);
                    hist[us] += 1;
                }
                Ok(Ok(false)) => {
                    tally.errors.fetch_add(1, Ordering::Relaxed);
                    tally.wrong.fetch_add(1, Ordering::Relaxed);
                }
                // Connection broken or no answer in time: a new connection.
                Ok(Err(())) | Err(_) => {
                    tally.errors.fetch_add(1, Ordering::Relaxed);
                    tally.lost.fetch_add(1, Ordering::Relaxed);
                    continue 'conn;
                }
            }
        }
    }
    if let Ok(mut h) = tally.hist.lock() {
        for (a, b) in h.iter_mut().zip(&hist) {
            *a += b;
        }
    }
}

/// A request body of `len` bytes that starts with a unique tag.
fn request_body(tag: &str, n: u64, len: usize) -> Vec<u8> {
    let mut v = format!("{tag}-{n:010} ").into_bytes();
    v.resize(len.max(v.len()), 0);
    for (i, b) in v.iter_mut().enumerate().skip(tag.len() + 12) {
        *b = b"abcdefghijklmnopqrstuvwxyz0123456789 "[i % 37];
    }
    v
}

/// The `p` quantile of a microsecond histogram.
fn percentile(hist: &[u32], p: f64) -> f64 {
    let total: u64 = hist.iter().map(|&c| u64::from(c)).sum();
    if total == 0 {
        return 0.0;
    }
    let want = (total as f64 * p).ceil().max(1.0) as u64;
    let mut seen = 0u64;
    for (us, &c) in hist.iter().enumerate() {
        seen += u64::from(c);
        if seen >= want {
            return us as f64;
        }
    }
    HIST_US as f64
}

/// Sum of a per-tenant counter over every agent's `/metrics`.
fn agent_counter(cluster: &Cluster, name: &str, tenant: &str) -> f64 {
    let mut sum = 0.0;
    for n in &cluster.nodes {
        let Some(addr) = n.metrics.as_ref().and_then(|m| m.parse::<SocketAddr>().ok()) else { continue };
        let Some(text) = get(addr, "/metrics") else { continue };
        for line in text.lines() {
            if line.starts_with(name) && line.contains(&format!("tenant=\"{tenant}\"")) {
                sum += line.rsplit(' ').next().and_then(|v| v.parse::<f64>().ok()).unwrap_or(0.0);
            }
        }
    }
    sum
}

fn get(addr: SocketAddr, path: &str) -> Option<String> {
    use std::io::{Read, Write};
    let mut s = std::net::TcpStream::connect_timeout(&addr, Duration::from_secs(1)).ok()?;
    s.set_read_timeout(Some(Duration::from_secs(5))).ok()?;
    write!(s, "GET {path} HTTP/1.0\r\nHost: demo\r\n\r\n").ok()?;
    let mut out = String::new();
    s.read_to_string(&mut out).ok()?;
    Some(out)
}

/// Resident memory of a process in KiB (`VmRSS`), `None` once it is gone.
fn rss_kib(pid: u32) -> Option<u64> {
    let s = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let line = s.lines().find(|l| l.starts_with("VmRSS:"))?;
    line.split_whitespace().nth(1)?.parse().ok()
}

/// Resident memory of every child and of the demo itself (the clients).
fn rss_all(demo: &Demo) -> Vec<(String, u64)> {
    let mut v: Vec<(String, u64)> =
        demo.children.iter().filter_map(|(n, c)| rss_kib(c.id()).map(|r| (n.clone(), r))).collect();
    if let Some(r) = rss_kib(std::process::id()) {
        v.push(("demo (clients)".into(), r));
    }
    v
}

/// `println!` unless `quiet`.
macro_rules! say {
    ($quiet:expr, $($t:tt)*) => {
        if !$quiet {
            println!($($t)*);
        }
    };
}

/// Set for the demo's children: the demo's pid. A child dies with the
/// demo ([`die_with_the_demo`]), however the demo ends (`kill -9`
/// included): the children run in process groups of their own, out of
/// reach of the terminal's Ctrl-C.
pub const PARENT_ENV: &str = "DNE_DEMO_PARENT";

/// In a child of the demo (it set [`PARENT_ENV`]): asks the kernel for a
/// SIGTERM when the demo exits, and fails if it already has.
pub fn die_with_the_demo() -> anyhow::Result<()> {
    let Some(parent) = std::env::var_os(PARENT_ENV) else { return Ok(()) };
    nix::sys::prctl::set_pdeathsig(nix::sys::signal::Signal::SIGTERM)?;
    if nix::unistd::getppid().as_raw().to_string() != parent.to_string_lossy() {
        anyhow::bail!("the demo that started this process (pid {}) is gone", parent.to_string_lossy());
    }
    Ok(())
}

/// Whether this process ignores SIGHUP (started by `nohup`): the kernel's
/// mask of ignored signals, `SigIgn` in `/proc/self/status`.
fn hup_ignored() -> bool {
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    let mask = status.lines().find_map(|l| l.strip_prefix("SigIgn:")).map(str::trim);
    mask.and_then(|m| u64::from_str_radix(m, 16).ok()).is_some_and(|m| m & 1 != 0)
}

/// Ctrl-C, SIGTERM (`kill`, `timeout`) or SIGHUP (the terminal closed,
/// unless SIGHUP is ignored),
/// watched from the demo's first step: whenever one comes, the demo stops
/// its children and removes what it made.
struct StopWatch(tokio::sync::watch::Receiver<bool>);

impl StopWatch {
    fn start(rt: &tokio::runtime::Runtime) -> std::io::Result<Self> {
        use tokio::signal::unix::{SignalKind, signal};
        let (tx, rx) = tokio::sync::watch::channel(false);
        // Under `nohup` (SIGHUP ignored) the demo outlives its terminal.
        let hangup = !hup_ignored();
        let (mut int, mut term, mut hup) = rt.block_on(async {
            Ok::<_, std::io::Error>((
                signal(SignalKind::interrupt())?,
                signal(SignalKind::terminate())?,
                if hangup { Some(signal(SignalKind::hangup())?) } else { None },
            ))
        })?;
        rt.spawn(async move {
            let hup = async {
                match hup.as_mut() {
                    Some(h) => h.recv().await,
                    None => std::future::pending().await,
                }
            };
            tokio::select! {
                _ = int.recv() => {}
                _ = term.recv() => {}
                _ = hup => {}
            }
            let _ = tx.send(true);
        });
        Ok(Self(rx))
    }

    /// An error once a stop was asked for.
    fn check(&self) -> anyhow::Result<()> {
        anyhow::ensure!(!*self.0.borrow(), "interrupted: stopping the cluster");
        Ok(())
    }

    /// Resolves when a stop is asked for.
    async fn requested(&self) {
        let mut rx = self.0.clone();
        let _ = rx.wait_for(|stop| *stop).await;
    }
}

/// Runs the demo; returns whether everything worked.
pub fn run(opts: &DemoOptions) -> anyhow::Result<bool> {
    execute(opts).map(|o| o.ok)
}

/// Runs the demo as [`run`] does, printing the same, and returns what it
/// measured.
#[allow(clippy::print_stdout, clippy::print_stderr)]
pub fn execute(opts: &DemoOptions) -> anyhow::Result<Outcome> {
    let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build()?;
    let stop_watch = StopWatch::start(&rt)?;
    say!(
        opts.quiet,
        "DNE demo: starting 2 worker nodes, an ingress and 3 tenants as child processes ({} mode)",
        opts.mode
    );
    let mut demo = Demo::start(opts, &stop_watch)?;
    let where_ = if demo.netns.is_some() { "each agent in its own network namespace" } else { "on loopback" };
    say!(opts.quiet, "  cluster file {}  ({where_})", demo.config.display());
    let took = demo.wait_ready(&stop_watch)?;
    say!(
        opts.quiet,
        "  {} processes up and every route answers correctly, in {:.1} s: per tenant /<t>/echo, /<t>/chain \
         (upper n0 -> rot13 n1 -> reverse n0), /<t>/fanout (branches upper n0 and rot13 n1, gathered on n0)",
        demo.children.len(),
        took.as_secs_f64()
    );
    if opts.serve {
        say!(opts.quiet, "\nThe cluster is up. Try:");
        for r in &demo.cluster.routes {
            say!(opts.quiet, "  curl -s --data-binary 'hello dne' http://{}{}; echo", demo.http, r.path);
        }
        say!(opts.quiet, "  curl -s http://{}/metrics | head", demo.http);
        for n in &demo.cluster.nodes {
            if let Some(m) = &n.metrics {
                say!(opts.quiet, "  curl -s http://{m}/status      # agent {}", n.name);
            }
        }
        say!(opts.quiet, "Ctrl-C stops the cluster.");
        rt.block_on(stop_watch.requested());
        say!(opts.quiet, "stopping");
        return Ok(Outcome { ok: true, ..Outcome::default() });
    }
    let duration = if opts.soak { opts.duration.max(600) } else { opts.duration };
    let memory = opts.soak || opts.memory_check;
    let warmup = Duration::from_secs(if opts.warmup_s == 0 { 60 } else { opts.warmup_s });
    let mut rss_warm: Option<Vec<(String, u64)>> = None;
    let stop = Arc::new(AtomicBool::new(false));
    let tallies: Vec<Arc<Tally>> = TENANTS.iter().map(|_| Arc::new(Tally::default())).collect();
    let (interrupted, loaded) = rt.block_on(async {
        let mut tasks = Vec::new();
        for (k, (t, _)) in TENANTS.iter().enumerate() {
            for c in 0..opts.connections {
                let path = format!("/{t}/chain");
                tasks.push(tokio::spawn(client(
                    demo.http,
                    path,
                    format!("{t}-{c}"),
                    opts.body,
                    tallies[k].clone(),
                    stop.clone(),
                )));
            }
        }
        let start = Instant::now();
        let mut last: Vec<u64> = vec![0; TENANTS.len()];
        let mut interrupted = false;
        let ctrl_c = stop_watch.requested();
        tokio::pin!(ctrl_c);
        while start.elapsed() < Duration::from_secs(duration) {
            if memory && rss_warm.is_none() && start.elapsed() >= warmup {
                rss_warm = Some(rss_all(&demo));
            }
            tokio::select! {
                _ = tokio::time::sleep(Duration::from_secs(1)) => {}
                _ = &mut ctrl_c => { interrupted = true; break; }
            }
            // A process of the cluster that died ends the run now (the
            // check after the run says which), not at its end.
            if demo.check_children().is_err() {
                break;
            }
            let mut line = format!("  {:>4.0}s ", start.elapsed().as_secs_f64());
            let mut errs = 0;
            for (k, (t, _)) in TENANTS.iter().enumerate() {
                let ok = tallies[k].ok.load(Ordering::Relaxed);
                errs += tallies[k].errors.load(Ordering::Relaxed);
                let _ = write!(line, " {t} {:>6} req/s ", ok - last[k]);
                last[k] = ok;
            }
            let _ = write!(line, " errors {errs}");
            say!(opts.quiet, "{line}");
        }
        stop.store(true, Ordering::Relaxed);
        for t in tasks {
            let _ = t.await;
        }
        (interrupted, start.elapsed())
    });
    let secs = loaded.as_secs_f64().max(1e-3);
    let mut soak_ok = true;
    let mut rss = Vec::new();
    if memory {
        let end = rss_all(&demo);
        say!(opts.quiet, "\n  {:<22} {:>12} {:>12} {:>8}", "process", "RSS warm KiB", "RSS end KiB", "growth");
        for (name, warm) in rss_warm.iter().flatten() {
            let Some((_, last)) = end.iter().find(|(n, _)| n == name) else { continue };
            let growth = (*last as f64 - *warm as f64) / (*warm).max(1) as f64 * 100.0;
            // The demo process itself (the load clients) is shown, not judged.
            if growth >= 5.0 && name != "demo (clients)" {
                soak_ok = false;
            }
            say!(opts.quiet, "  {name:<22} {warm:>12} {last:>12} {growth:>7.1}%");
            rss.push((name.clone(), *warm, *last));
        }
        if rss_warm.is_none() {
            say!(opts.quiet, "  (interrupted before the end of the warm-up: no memory verdict)");
            soak_ok = false;
        }
    }
    let total_ok: u64 = tallies.iter().map(|t| t.ok.load(Ordering::Relaxed)).sum();
    let total_err: u64 = tallies.iter().map(|t| t.errors.load(Ordering::Relaxed)).sum();
    let wsum: u32 = TENANTS.iter().map(|(_, w)| w).sum();
    say!(
        opts.quiet,
        "\n  {:<8} {:>6} {:>10} {:>9} {:>9} {:>9} {:>13} {:>7} {:>7} {:>7}",
        "tenant",
        "weight",
        "requests",
        "req/s",
        "p50 us",
        "p99 us",
        "fabric bytes",
        "share",
        "weight",
        "errors"
    );
    for (k, (t, w)) in TENANTS.iter().enumerate() {
        let ok = tallies[k].ok.load(Ordering::Relaxed);
        let lat = tallies[k].hist.lock().map(|h| h.clone()).unwrap_or_default();
        let bytes = agent_counter(&demo.cluster, "dne_agent_fabric_tx_bytes_total", t);
        say!(
            opts.quiet,
            "  {:<8} {:>6} {:>10} {:>9.0} {:>9.0} {:>9.0} {:>13.0} {:>6.1}% {:>6.1}% {:>7}",
            t,
            w,
            ok,
            ok as f64 / secs,
            percentile(&lat, 0.5),
            percentile(&lat, 0.99),
            bytes,
            100.0 * ok as f64 / total_ok.max(1) as f64,
            100.0 * f64::from(*w) / f64::from(wsum),
            tallies[k].errors.load(Ordering::Relaxed)
        );
    }
    say!(
        opts.quiet,
        "\n  Each request: HTTP at the ingress -> fabric -> {t}-upper (n0) -> {t}-rot13 (n1) -> {t}-reverse (n0) -> fabric -> ingress,",
        t = "<tenant>"
    );
    let cpus = std::thread::available_parallelism().map_or(1, std::num::NonZeroUsize::get);
    say!(opts.quiet, "{}", shares_note(cpus));
    let ok = soak_ok && !interrupted && total_err == 0 && tallies.iter().all(|t| t.ok.load(Ordering::Relaxed) > 0);
    demo.check_children()?;
    drop(demo);
    say!(opts.quiet, "RESULT requests={total_ok} errors={total_err} tenants={} nodes=2", TENANTS.len());
    let sum = |f: fn(&Tally) -> &AtomicU64| tallies.iter().map(|t| f(t).load(Ordering::Relaxed)).sum();
    Ok(Outcome {
        requests: total_ok,
        errors: total_err,
        lost: sum(|t| &t.lost),
        wrong: sum(|t| &t.wrong),
        duration_s: secs,
        interrupted,
        rss,
        ok,
    })
}

/// Runs the ingress role: HTTP on the ingress's address, requests over the
/// fabric, on a tokio runtime of `threads` workers ([`ingress::runtime`])
/// that also drives the fabric side ([`ingress::edge::Edge::spawn`]).
pub fn run_ingress(config: &Path, name: &str, threads: usize) -> anyhow::Result<()> {
    let cluster = Cluster::load(config)?;
    let (index, g) = cluster
        .ingresses
        .iter()
        .enumerate()
        .find(|(_, g)| g.name == name)
        .ok_or_else(|| anyhow::anyhow!("no [[ingress]] called {name}"))?;
    let g = g.clone();
    std::fs::create_dir_all(&g.runtime_dir)?;
    let settings = ingress::Settings::for_ingress(&cluster, name).unwrap_or_default();
    let pools = ingress::Pools::create(&cluster, name, g.buffers, shm::PagePolicy::Auto)?;
    let rt = ingress::runtime(Some(threads))?;
    let edge = {
        let _in_runtime = rt.enter();
        ingress::edge::Edge::spawn(Arc::new(cluster.clone()), index, pools.clone())?
    };
    let ing = Arc::new(ingress::Ingress::new(&cluster, pools, Arc::new(edge), settings));
    rt.block_on(async move {
        let listener = tokio::net::TcpListener::bind(&g.http).await?;
        ing.serve(listener, None, ingress::shutdown_signal()).await
    })?;
    Ok(())
}

/// The summary's last note: the shares follow the weights only when the
/// fabric is the bottleneck, not this machine's `cpus` CPUs (on the 2-core
/// machines the project is tested on, the CPUs are).
fn shares_note(cpus: usize) -> String {
    let (cpus, verb) = if cpus == 1 { ("1 CPU".to_string(), "is") } else { (format!("{cpus} CPUs"), "are") };
    format!(
        "  checked byte for byte. Shares follow weights only when the fabric is the bottleneck, not when this machine's {cpus} {verb}."
    )
}

#[cfg(test)]
mod tests {
    use super::shares_note;

    #[test]
    fn the_shares_note_names_this_machines_cpus() {
        assert!(shares_note(1).ends_with("not when this machine's 1 CPU is."), "{}", shares_note(1));
        assert!(shares_note(2).ends_with("not when this machine's 2 CPUs are."), "{}", shares_note(2));
        assert!(shares_note(64).contains("64 CPUs"));
    }
}

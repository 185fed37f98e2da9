//! `ingress`: the same 3-function chain behind two front doors, under the
//! same load generator, at 1, 16 and 64 keep-alive connections, 1 KiB
//! request bodies; every function applies ROT13 to the body (the same small
//! amount of work everywhere):
//!
//! * (a) DNE: the `ingress` crate's HTTP server writing each request once
//!   into its tenant pool and sending it over the emulated fabric to a
//!   worker node (host-shimd, the agent, the three functions chained
//!   through shared memory, as separate processes); the last function's
//!   reply comes back over the fabric and is streamed out of the pool.
//! * (a0) reference: the same HTTP server with the chain run in-process
//!   over the same pool buffers (ownership handed hop to hop as
//!   descriptors do): what the fabric and the process boundaries cost.
//! * (b) the Knative-style baseline: nginx (Debian package; installed with
//!   apt-get when missing) as the ingress, and each function an HTTP server
//!   (hyper, one thread) behind its own nginx sidecar proxy (like Knative's
//!   queue-proxy); function i calls function i+1 through i+1's sidecar over
//!   loopback HTTP with keep-alive, and the reply travels back the same way.
//!   Eight processes (nginx ingress master+2 workers ... see the table).
//!
//! Measured per setup and concurrency: requests per second, p50 and p99
//! latency, and CPU seconds per 10,000 requests summed over every process
//! of the setup (utime + stime from /proc, load generator excluded), and
//! at 64 connections the same CPU broken down by process. The load
//! generator runs in this process on one thread ([`super::httpload`]:
//! epoll, one request in flight per connection, every reply checked); its
//! own CPU per request is reported beside each cell, since on this
//! machine's two cores whatever it spends is taken from the setup under
//! test. It runs under `SCHED_BATCH` ([`httpload::Batch`]), so that the
//! wake-up each reply causes does not preempt the server that wrote it
//! (clients on other machines take no CPU from the servers);
//! `DNE_BENCH_LOADGEN_POLICY=other` runs it under `SCHED_OTHER` instead.
//! Both setups run in the same run, interleaved per concurrency level,
//! under the same policy.
//!
//! Before every round, with the machine idle, a probe measures how often
//! and how long this machine's CPUs stall ([`crate::stalls`]: on a shared
//! VM a vCPU is sometimes not running for milliseconds), printed as the
//! last table and in the RESULT line (`stalls_per_cpu_s`,
//! `stall_lost_pct`, `stall_max_ms`). It describes the machine at the
//! time of the run: (a) answers in 1-3 ms at 64 connections, and a stall
//! of several ms delays every request in flight behind the stalled
//! process. It is sampled between rounds, not during them, so it does not
//! say how many stalls hit a given round.
//!
//! `DNE_BENCH_INGRESS_PROFILE=SECS` runs (a) alone at 64 connections for
//! SECS seconds instead (to attach `perf` to its processes).

use super::httpload;
use crate::harness::{Opts, Report, Suite, Table, fmt_num, percentile_rank};
use crate::stalls;
use anyhow::{Context, Result, anyhow, bail};
use bytes::Bytes;
use dne_functions::Transform;
use http_body_util::{BodyExt, Full};
use hyper::{Request, Response};
use hyper_util::rt::TokioIo;
use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::os::unix::process::CommandExt as _;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// The suite.
pub const SUITE: Suite = Suite {
    name: "ingress",
    about: "HTTP edge + 3-function chain: DNE ingress over the fabric to a worker node vs nginx + per-function nginx sidecars",
    run,
};

pub(crate) const ROLE_ENV: &str = "DNE_BENCH_INGRESS_ROLE";
const NEXT_ENV: &str = "DNE_BENCH_INGRESS_NEXT";
const BODY: usize = 1024;
const CONNS: [usize; 3] = [1, 16, 64];
const CHAIN: usize = 3;
/// Set to a number of seconds, the suite runs (a) alone at 64 connections
/// for that long and reports it (a run to attach a profiler to).
const PROFILE_ENV: &str = "DNE_BENCH_INGRESS_PROFILE";

/// Runs a peer role of this suite when the binary was started as one.
pub fn peer_main() -> Option<Result<()>> {
    let role = std::env::var(ROLE_ENV).ok()?;
    // Die with the parent: never leave a server behind.
    let _ = nix::sys::prctl::set_pdeathsig(nix::sys::signal::Signal::SIGKILL);
    Some(match role.as_str() {
        "dne" => dne_peer(),
        // A process of the fabric cluster: the agent's command line, whose
        // hidden `role` subcommands run host-shimd, functions and the
        // ingress (the same binary the demo uses for every role).
        "cluster" => {
            let args = std::iter::once("dpu-agent".to_owned()).chain(std::env::args().skip(1));
            <dpu_agent::cli::Cli as clap::Parser>::try_parse_from(args)
                .map_err(|e| anyhow!("{e}"))
                .and_then(|cli| dpu_agent::cli::run(&cli).map(|_| ()))
        }
        "fn" => fn_peer(),
        other => Err(anyhow!("unknown ingress peer role {other:?}")),
    })
}

// ------------------------------------------------------------ (a) DNE

fn dne_cluster() -> String {
    let mut s = String::from(
        "[[node]]\nname = \"bench\"\naddress = \"127.0.0.1:1\"\nruntime_dir = \"/tmp/dne-bench-ingress\"\n\n\
         [[tenant]]\nname = \"bench\"\nweight = 1\nbuffers = 1024\nrecv_quota = 64\n\n",
    );
    for i in 1..=CHAIN {
        s.push_str(&format!("[[function]]\nname = \"f{i}\"\ntenant = \"bench\"\nnode = \"bench\"\n\n"));
    }
    s.push_str("[[route]]\npath = \"/chain\"\ntenant = \"bench\"\nchain = [\"f1\", \"f2\", \"f3\"]\n\n");
    s.push_str(
        "[[ingress]]\nname = \"edge\"\naddress = \"127.0.0.1:2\"\nhttp = \"127.0.0.1:0\"\n\
         runtime_dir = \"/tmp/dne-bench-ingress/edge\"\nbuffers = 1024\n",
    );
    s
}

#[allow(clippy::print_stdout)]
fn dne_peer() -> Result<()> {
    use ingress::{Behavior, InProcess, InProcessConfig, Ingress, Pools, Settings};
    let cluster = config::Cluster::parse(&dne_cluster())?;
    let behaviors: Vec<(String, Behavior)> =
        (1..=CHAIN).map(|i| (format!("f{i}"), Behavior::Transform(Transform::Rot13))).collect();
    let up = InProcess::new(&cluster, InProcessConfig::default(), InProcess::by_name(&behaviors))?;
    let pools = Pools::create(&cluster, "bench", 1024, shm::PagePolicy::Auto)?;
    let settings = Settings::for_ingress(&cluster, "edge").unwrap_or_default();
    let ing = Arc::new(Ingress::new(&cluster, pools, Arc::new(up), settings));
    let rt = tokio::runtime::Builder::new_multi_thread().enable_all().build()?;
    rt.block_on(async move {
        let l = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
        println!("ready {}", l.local_addr()?.port());
        ing.serve(l, None, std::future::pending()).await?;
        Ok(())
    })
}

// ------------------------------------------------------------ (b) functions behind sidecars

/// A baseline function: reads the body, applies ROT13, and either answers
/// with it or posts it to the next function (through its sidecar) and
/// answers with that reply. One thread, keep-alive connections to the next
/// hop kept in a small pool.
#[allow(clippy::print_stdout)]
fn fn_peer() -> Result<()> {
    let next: Option<SocketAddr> = match std::env::var(NEXT_ENV) {
        Ok(s) if !s.is_empty() => Some(s.parse().context("next address")?),
        _ => None,
    };
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
    rt.block_on(async move {
        let l = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
        println!("ready {}", l.local_addr()?.port());
        let pool: Arc<std::sync::Mutex<Vec<Conn>>> = Arc::default();
        loop {
            let (s, _) = l.accept().await?;
            let _ = s.set_nodelay(true);
            let pool = pool.clone();
            let svc = hyper::service::service_fn(move |req: Request<hyper::body::Incoming>| {
                let pool = pool.clone();
                async move { fn_handle(req, next, pool).await }
            });
            tokio::spawn(async move {
                let _ = hyper::server::conn::http1::Builder::new().serve_connection(TokioIo::new(s), svc).await;
            });
        }
    })
}

type Conn = hyper::client::conn::http1::SendRequest<Full<Bytes>>;

async fn connect(addr: SocketAddr) -> Result<Conn> {
    let s = tokio::net::TcpStream::connect(addr).await?;
    s.set_nodelay(true)?;
    let (tx, conn) = hyper::client::conn::http1::handshake(TokioIo::new(s)).await?;
    tokio::spawn(conn);
    Ok(tx)
}

async fn fn_handle(
    req: Request<hyper::body::Incoming>,
    next: Option<SocketAddr>,
    pool: Arc<std::sync::Mutex<Vec<Conn>>>,
) -> Result<Response<Full<Bytes>>, anyhow::Error> {
    let ct = req.headers().get(hyper::header::CONTENT_TYPE).cloned();
    let mut body = req.into_body().collect().await?.to_bytes().to_vec();
    Transform::Rot13.apply(&mut body);
    let Some(next) = next else {
        let mut r = Response::new(Full::new(Bytes::from(body)));
        if let Some(ct) = ct {
            r.headers_mut().insert(hyper::header::CONTENT_TYPE, ct);
        }
        return Ok(r);
    };
    // An idle pooled connection, or a new one (as many as requests in
    // flight, like an HTTP client library's pool).
    let mut tx = loop {
        let taken = pool.lock().map_err(|_| anyhow!("poisoned"))?.pop();
        match taken {
            Some(mut tx) => {
                if tx.ready().await.is_ok() {
                    break tx;
                }
            }
            None => {
                let mut tx = connect(next).await?;
                tx.ready().await?;
                break tx;
            }
        }
    };
    let mut fwd = Request::post("/chain").header(hyper::header::HOST, "fn");
    if let Some(ct) = ct {
        fwd = fwd.header(hyper::header::CONTENT_TYPE, ct);
    }
    let resp = tx.send_request(fwd.body(Full::new(Bytes::from(body)))?).await?;
    let (parts, b) = resp.into_parts();
    let b = b.collect().await?.to_bytes();
    pool.lock().map_err(|_| anyhow!("poisoned"))?.push(tx);
    Ok(Response::from_parts(parts, Full::new(b)))
}

// ------------------------------------------------------------ processes

struct Proc {
    name: String,
    child: Child,
}

impl Drop for Proc {
    fn drop(&mut self) {
        // Its whole process group: nginx's workers outlive a killed master.
        if let Ok(pid) = i32::try_from(self.child.id()) {
            let _ = nix::sys::signal::killpg(nix::unistd::Pid::from_raw(pid), nix::sys::signal::Signal::SIGKILL);
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Starts this binary in `role`; returns it and the port it printed.
fn spawn_peer(role: &str, next: Option<u16>) -> Result<(Proc, u16)> {
    let exe = std::env::current_exe()?;
    let mut cmd = Command::new(exe);
    cmd.env(ROLE_ENV, role).stdin(Stdio::null()).stdout(Stdio::piped()).stderr(Stdio::inherit());
    cmd.env("RUST_LOG", "error");
    if let Some(p) = next {
        cmd.env(NEXT_ENV, format!("127.0.0.1:{p}"));
    }
    let mut child = cmd.spawn().with_context(|| format!("starting peer {role}"))?;
    let out = child.stdout.take().ok_or_else(|| anyhow!("no stdout"))?;
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let mut line = String::new();
        let _ = BufReader::new(out).read_line(&mut line);
        let _ = tx.send(line);
    });
    let proc = Proc { name: role.to_owned(), child };
    let line = rx.recv_timeout(Duration::from_secs(30)).map_err(|_| anyhow!("peer {role} did not get ready"))?;
    let port = line.trim().strip_prefix("ready ").ok_or_else(|| anyhow!("peer {role} said {line:?}"))?.parse()?;
    Ok((proc, port))
}

fn free_port() -> Result<u16> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?.local_addr()?.port())
}

fn nginx_bin() -> Result<PathBuf> {
    for p in ["/usr/sbin/nginx", "/usr/bin/nginx"] {
        if Path::new(p).exists() {
            return Ok(p.into());
        }
    }
    log_line("nginx not found: installing the Debian package (apt-get install -y nginx)");
    let ok = Command::new("apt-get")
        .args(["install", "-y", "--no-install-recommends", "nginx"])
        .env("DEBIAN_FRONTEND", "noninteractive")
        .stdout(Stdio::null())
        .status()
        .is_ok_and(|s| s.success());
    if !ok {
        let _ = Command::new("apt-get").arg("update").stdout(Stdio::null()).status();
        let ok = Command::new("apt-get")
            .args(["install", "-y", "--no-install-recommends", "nginx"])
            .env("DEBIAN_FRONTEND", "noninteractive")
            .stdout(Stdio::null())
            .status()
            .is_ok_and(|s| s.success());
        if !ok {
            bail!("nginx is missing and apt-get could not install it");
        }
    }
    // The package may start a system nginx on port 80: not ours, leave it.
    Ok("/usr/sbin/nginx".into())
}

#[allow(clippy::print_stderr)]
fn log_line(s: &str) {
    eprintln!("dne-bench ingress: {s}");
}

/// One nginx instance (master + `workers`) proxying `listen` to `upstream`.
fn spawn_nginx(bin: &Path, dir: &Path, name: &str, listen: u16, upstream: u16, workers: usize) -> Result<Proc> {
    let d = dir.join(name);
    std::fs::create_dir_all(&d)?;
    let conf = format!(
        "daemon off;\nmaster_process on;\nworker_processes {workers};\npid {d}/nginx.pid;\n\
         error_log {d}/error.log warn;\nevents {{ worker_connections 4096; }}\n\
         http {{\n  access_log off;\n  keepalive_requests 10000000;\n  keepalive_timeout 60s;\n\
         client_body_temp_path {d}/body;\n  proxy_temp_path {d}/proxy;\n  fastcgi_temp_path {d}/fcgi;\n\
         uwsgi_temp_path {d}/uwsgi;\n  scgi_temp_path {d}/scgi;\n\
         upstream up {{ server 127.0.0.1:{upstream}; keepalive 256; keepalive_requests 10000000; }}\n\
         server {{\n    listen 127.0.0.1:{listen} reuseport;\n    location / {{\n      proxy_pass http://up;\n\
         proxy_http_version 1.1;\n      proxy_set_header Connection \"\";\n    }}\n  }}\n}}\n",
        d = d.display()
    );
    let conf_path = d.join("nginx.conf");
    std::fs::write(&conf_path, conf)?;
    let child = Command::new(bin)
        // A process group of its own, killed as a whole by `Proc`'s drop.
        .process_group(0)
        .arg("-c")
        .arg(&conf_path)
        .arg("-e")
        .arg(d.join("error.log"))
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::inherit())
        .spawn()
        .with_context(|| format!("starting nginx {name}"))?;
    let proc = Proc { name: format!("nginx-{name}"), child };
    wait_listening(listen).with_context(|| format!("nginx {name} (see {}/error.log)", d.display()))?;
    Ok(proc)
}

fn check_alive(procs: &mut [Proc]) -> Result<()> {
    for p in procs {
        if let Some(st) = p.child.try_wait()? {
            bail!("{} exited during the run: {st}", p.name);
        }
    }
    Ok(())
}

fn wait_listening(port: u16) -> Result<()> {
    let deadline = Instant::now() + Duration::from_secs(20);
    while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
        if Instant::now() > deadline {
            bail!("nothing listens on port {port}");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    Ok(())
}

/// The processes of a setup, children included (nginx workers).
fn all_pids(roots: &[u32]) -> Vec<u32> {
    let mut pids = roots.to_vec();
    if let Ok(dir) = std::fs::read_dir("/proc") {
        for e in dir.flatten() {
            let Some(pid) = e.file_name().to_str().and_then(|s| s.parse::<u32>().ok()) else { continue };
            if stat(pid).is_some_and(|(ppid, _)| roots.contains(&ppid)) {
                pids.push(pid);
            }
        }
    }
    pids
}

/// (ppid, utime + stime in clock ticks) of `pid`.
fn stat(pid: u32) -> Option<(u32, u64)> {
    let s = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // Fields after the command name (which may hold spaces) start at `) `.
    let rest = &s[s.rfind(')')? + 2..];
    let f: Vec<&str> = rest.split(' ').collect();
    // rest[0] = state (field 3); ppid = field 4; utime = 14; stime = 15.
    let ppid = f.get(1)?.parse().ok()?;
    let ut: u64 = f.get(11)?.parse().ok()?;
    let st: u64 = f.get(12)?.parse().ok()?;
    Some((ppid, ut + st))
}

/// CPU seconds of each of `pids`, charged to the root it is (or whose
/// child it is).
fn cpu_seconds(pids: &[u32], roots: &[u32]) -> Vec<(u32, f64)> {
    let hz = nix::unistd::sysconf(nix::unistd::SysconfVar::CLK_TCK).ok().flatten().unwrap_or(100) as f64;
    let mut out: Vec<(u32, f64)> = roots.iter().map(|&r| (r, 0.0)).collect();
    for &p in pids {
        let Some((ppid, t)) = stat(p) else { continue };
        let root = if roots.contains(&p) { p } else { ppid };
        if let Some(e) = out.iter_mut().find(|(r, _)| *r == root) {
            e.1 += t as f64 / hz;
        }
    }
    out
}

// ------------------------------------------------------------ load

struct Run {
    rps: f64,
    p50_us: f64,
    p99_us: f64,
    cpu_per_10k: f64,
    /// CPU s per 10k requests of each root process (children included),
    /// in the order of the setup's `pids`.
    per_proc: Vec<f64>,
    /// The load generator's own CPU s per 10k requests (not in `cpu_per_10k`).
    gen_cpu_per_10k: f64,
    requests: u64,
}

impl Run {
    /// Per-metric medians over rounds.
    fn median(runs: &mut [Run]) -> Run {
        let med = |runs: &mut [Run], f: fn(&Run) -> f64| {
            let mut v: Vec<f64> = runs.iter().map(f).collect();
            v.sort_by(f64::total_cmp);
            v[v.len() / 2]
        };
        Run {
            rps: med(runs, |r| r.rps),
            p50_us: med(runs, |r| r.p50_us),
            p99_us: med(runs, |r| r.p99_us),
            cpu_per_10k: med(runs, |r| r.cpu_per_10k),
            // Per process: the run whose total is the median.
            per_proc: {
                let m = med(runs, |r| r.cpu_per_10k);
                runs.iter().find(|r| r.cpu_per_10k == m).map(|r| r.per_proc.clone()).unwrap_or_default()
            },
            gen_cpu_per_10k: med(runs, |r| r.gen_cpu_per_10k),
            requests: runs.iter().map(|r| r.requests).sum(),
        }
    }
}

fn expected(body: &[u8]) -> Vec<u8> {
    let mut v = body.to_vec();
    for _ in 0..CHAIN {
        Transform::Rot13.apply(&mut v);
    }
    v
}

/// Drives `conns` keep-alive connections for `dur` (after `warm`), one
/// request in flight per connection, with the lean generator of
/// [`httpload`](super::httpload); checks every reply. CPU is summed over the
/// processes `roots` and their children; the generator's own CPU is
/// reported apart.
fn load(port: u16, conns: usize, warm: Duration, dur: Duration, roots: &[u32], batch: bool) -> Result<Run> {
    let policy = httpload::Batch::enter(batch)?;
    let body: Vec<u8> = (0..BODY).map(|i| b"abcdefghijklmnopqrstuvwxyz0123456789 ABC"[i % 40]).collect();
    let want = expected(&body);
    let request = httpload::post("/chain", "bench", "text/plain", &body);
    let mut lg = httpload::Load::connect(([127, 0, 0, 1], port).into(), conns, request, want)?;
    let measure_from = Instant::now() + warm;
    let end = measure_from + dur;
    lg.run_until(measure_from)?;
    // Sample CPU at the start and the end of the measured window, over the
    // setup's processes and their children as they are now (nginx forks its
    // workers after start).
    let pids = all_pids(roots);
    let c0 = cpu_seconds(&pids, roots);
    let (t0, g0) = (Instant::now(), thread_cpu());
    lg.record_from(t0);
    lg.run_until(end)?;
    lg.stop_recording();
    let (t1, g1) = (Instant::now(), thread_cpu());
    let c1 = cpu_seconds(&pids, roots);
    lg.finish()?;
    policy.leave()?;
    let mut all = std::mem::take(&mut lg.lat);
    all.sort_unstable();
    let n = all.len() as u64;
    if n == 0 {
        bail!("no request completed in the measured window");
    }
    let pct = |p: f64| f64::from(all[percentile_rank(all.len(), p)]);
    let secs = t1.duration_since(t0).as_secs_f64().max(dur.as_secs_f64());
    let per_proc: Vec<f64> = c1.iter().zip(&c0).map(|((_, b), (_, a))| (b - a) / n as f64 * 10_000.0).collect();
    Ok(Run {
        rps: n as f64 / secs,
        p50_us: pct(0.50),
        p99_us: pct(0.99),
        cpu_per_10k: per_proc.iter().sum(),
        per_proc,
        gen_cpu_per_10k: (g1 - g0) / n as f64 * 10_000.0,
        requests: n,
    })
}

/// CPU seconds this thread has used.
fn thread_cpu() -> f64 {
    use nix::time::{ClockId, clock_gettime};
    clock_gettime(ClockId::CLOCK_THREAD_CPUTIME_ID).map_or(0.0, |t| t.tv_sec() as f64 + t.tv_nsec() as f64 * 1e-9)
}

// ------------------------------------------------------------ the suite

struct Setup {
    procs: Vec<Proc>,
    port: u16,
    /// The processes started (their children count too).
    pids: Vec<u32>,
}

impl Drop for Setup {
    fn drop(&mut self) {
        // Last started, first stopped: the functions before the host-shimd
        // they are attached to, which they would otherwise report gone.
        while let Some(p) = self.procs.pop() {
            drop(p);
        }
    }
}

/// (a) over the fabric: one worker node in emulated mode (host-shimd, the
/// agent, the three functions chained through shared memory) and the
/// ingress, a fabric node of its own, as separate processes.
fn start_fabric(dir: &Path) -> Result<Setup> {
    let http = free_port()?;
    let (n0, edge) = (free_port()?, free_port()?);
    let node_dir = dir.join("n0");
    let mut cfg = format!(
        "[[node]]\nname = \"n0\"\naddress = \"127.0.0.1:{n0}\"\nruntime_dir = \"{}\"\n\n\
         [[tenant]]\nname = \"bench\"\nweight = 1\nbuf_size = 4096\nbuffers = 4096\nrecv_quota = 512\n\n",
        node_dir.display()
    );
    for i in 1..=CHAIN {
        cfg.push_str(&format!("[[function]]\nname = \"f{i}\"\ntenant = \"bench\"\nnode = \"n0\"\n\n"));
    }
    cfg.push_str("[[route]]\npath = \"/chain\"\ntenant = \"bench\"\nchain = [\"f1\", \"f2\", \"f3\"]\n\n");
    cfg.push_str(&format!(
        "[[ingress]]\nname = \"edge\"\naddress = \"127.0.0.1:{edge}\"\nhttp = \"127.0.0.1:{http}\"\n\
         runtime_dir = \"{}\"\nbuffers = 4096\n",
        dir.join("edge").display()
    ));
    let path = dir.join("cluster.toml");
    std::fs::write(&path, cfg)?;
    let c = path.to_string_lossy().into_owned();
    let spawn = |name: &str, args: &[&str]| -> Result<Proc> {
        let mut cmd = Command::new(std::env::current_exe()?);
        cmd.env(ROLE_ENV, "cluster").env("RUST_LOG", "error").args(args);
        cmd.stdin(Stdio::null()).stdout(Stdio::null()).stderr(Stdio::inherit());
        let child = cmd.spawn().with_context(|| format!("starting {name}"))?;
        Ok(Proc { name: name.to_owned(), child })
    };
    let mut procs = vec![spawn("host-shimd", &["role", "shimd", "--config", &c, "--node", "n0"])?];
    let socket = node_dir.join("shimd.sock");
    let deadline = Instant::now() + Duration::from_secs(20);
    while !socket.exists() {
        check_alive(&mut procs)?;
        if Instant::now() > deadline {
            bail!("host-shimd did not start");
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    procs.push(spawn("agent", &["run", "--config", &c, "--node", "n0"])?);
    let sock = socket.to_string_lossy().into_owned();
    for i in 1..=CHAIN {
        let f = format!("f{i}");
        let args = ["role", "fn", "--socket", &sock, "--tenant", "bench", "--function", &f, "--transform", "rot13"];
        procs.push(spawn(&f, &[&args[..], &["--config", &c]].concat())?);
    }
    procs.push(spawn("ingress", &["role", "ingress", "--config", &c, "--name", "edge"])?);
    wait_listening(http)?;
    // Ready when a request makes it through the fabric and back.
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        check_alive(&mut procs)?;
        if post_once(http).is_some_and(|code| code == 200) {
            break;
        }
        if Instant::now() > deadline {
            bail!("the fabric cluster did not answer /chain");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    let pids = procs.iter().map(|p| p.child.id()).collect();
    Ok(Setup { procs, port: http, pids })
}

/// The machine-noise table: what the stall probe saw (see [`stalls`]).
fn stall_table() -> Table {
    Table::new(
        format!(
            "machine noise: CPU stalls (gaps > {} us in a clock-reading loop, one pinned thread per CPU, \
             machine otherwise idle)",
            stalls::STALL.as_micros()
        ),
        &["probed before", "probe CPU s", "stalls per CPU s", "CPU time lost", "largest ms"],
    )
}

fn stall_row(t: &mut Table, when: &str, s: &stalls::Stalls) {
    t.row(vec![
        when.to_owned(),
        fmt_num(s.cpu_secs),
        fmt_num(s.per_cpu_sec()),
        format!("{:.2}%", s.lost_pct()),
        fmt_num(s.largest_ms()),
    ]);
}

/// The status of one `POST /chain` (readiness).
fn post_once(port: u16) -> Option<u16> {
    use std::io::{Read, Write};
    let mut s = std::net::TcpStream::connect(("127.0.0.1", port)).ok()?;
    s.set_read_timeout(Some(Duration::from_secs(5))).ok()?;
    write!(s, "POST /chain HTTP/1.1\r\nHost: b\r\nConnection: close\r\nContent-Length: 4\r\n\r\nping").ok()?;
    let mut out = Vec::new();
    s.read_to_end(&mut out).ok()?;
    String::from_utf8_lossy(out.get(..12)?).split_whitespace().nth(1)?.parse().ok()
}

fn start_dne() -> Result<Setup> {
    let (p, port) = spawn_peer("dne", None)?;
    let pids = vec![p.child.id()];
    Ok(Setup { procs: vec![p], port, pids })
}

fn start_baseline(dir: &Path) -> Result<Setup> {
    let bin = nginx_bin()?;
    let mut procs = Vec::new();
    // From the last function back to the ingress.
    let mut next_sidecar: Option<u16> = None;
    for i in (1..=CHAIN).rev() {
        let (f, port) = spawn_peer("fn", next_sidecar)?;
        procs.push(f);
        let sidecar = free_port()?;
        procs.push(spawn_nginx(&bin, dir, &format!("sidecar-f{i}"), sidecar, port, 1)?);
        next_sidecar = Some(sidecar);
    }
    let first = next_sidecar.ok_or_else(|| anyhow!("empty chain"))?;
    let port = free_port()?;
    procs.push(spawn_nginx(&bin, dir, "ingress", port, first, 2)?);
    let pids = procs.iter().map(|p| p.child.id()).collect();
    Ok(Setup { procs, port, pids })
}

fn run(opts: &Opts) -> Result<Report> {
    let (warm, dur, rounds) = if opts.quick {
        (Duration::from_millis(300), Duration::from_secs(2), 1)
    } else {
        (Duration::from_secs(1), Duration::from_secs(5), 3)
    };
    // Before every round of the three setups, with the machine idle.
    let probe_dur = if opts.quick { Duration::from_millis(500) } else { Duration::from_secs(1) };
    let batch = httpload::Batch::wanted()?;
    let policy = if batch { "SCHED_BATCH" } else { "SCHED_OTHER" };
    let dir = std::env::temp_dir().join(format!("dne-bench-ingress-{}", std::process::id()));
    std::fs::create_dir_all(&dir)?;
    let mut fab = start_fabric(&dir)?;
    let mut dne = start_dne()?;
    let mut base = start_baseline(&dir)?;
    let names = [
        "(a) DNE ingress -> fabric -> agent -> 3 functions (shm)",
        "(a0) DNE ingress + in-process chain (reference)",
        "(b) nginx ingress + 3 x (nginx sidecar + fn server)",
    ];
    let mut table = Table::new(
        format!(
            "ingress: 3-function chain (ROT13 on a {BODY} B body), keep-alive, median of {rounds} x {} s per cell \
             (rounds of a, a0 and b interleaved); CPU = all processes of the setup (a: 6 processes: host-shimd, \
             agent, 3 functions, ingress; a0: 1 process; b: {} processes incl. nginx workers); load generator \
             under {policy}",
            dur.as_secs(),
            "{B}"
        ),
        &["setup", "conns", "req/s", "p50 us", "p99 us", "CPU s/10k req", "requests", "load gen CPU s/10k"],
    );
    let mut ratios = Table::new(
        "ingress: (a) against (b) (rps: a/b; p99 and CPU: b/a; higher is better for a)",
        &["conns", "rps x", "p99 x", "CPU x"],
    );
    let mut report = Report::default();
    let mut by_proc = Table::new(
        "ingress: CPU s/10k requests by process at 64 connections (children counted with their parent)",
        &["setup", "process", "CPU s/10k req", "share"],
    );
    if let Some(secs) = std::env::var(PROFILE_ENV).ok().and_then(|s| s.parse().ok()) {
        // Profiling: (a) alone at 64 connections, for attaching perf.
        log_line(&format!("profile: (a) at 64 connections for {secs} s"));
        let before = stalls::probe(probe_dur)?;
        let r = load(fab.port, 64, warm, Duration::from_secs(secs), &fab.pids, batch)?;
        let after = stalls::probe(probe_dur)?;
        let mut t = Table::new(
            format!("ingress profile run: (a) at 64 connections, load generator under {policy}"),
            &["process", "CPU s/10k req"],
        );
        for (p, cpu) in fab.procs.iter().zip(&r.per_proc) {
            t.row(vec![p.name.clone(), fmt_num(*cpu)]);
        }
        let mut m = stall_table();
        stall_row(&mut m, "the profile run", &before);
        stall_row(&mut m, "(and after it)", &after);
        report.put("rps_c64_dne", r.rps);
        report.put("p99_us_c64_dne", r.p99_us);
        report.put("cpu_per_10k_c64_dne", r.cpu_per_10k);
        report.put("loadgen_policy", policy);
        before.merge(&after).put(&mut report);
        report.tables = vec![t, m];
        return Ok(report);
    }
    let mut noise = stall_table();
    let mut all_stalls = stalls::Stalls::default();
    for &c in &CONNS {
        let (mut ra, mut r0, mut rb) = (Vec::new(), Vec::new(), Vec::new());
        let mut level = stalls::Stalls::default();
        for _ in 0..rounds {
            level = level.merge(&stalls::probe(probe_dur)?);
            ra.push(load(fab.port, c, warm, dur, &fab.pids, batch).context("load on (a)")?);
            check_alive(&mut fab.procs)?;
            r0.push(load(dne.port, c, warm, dur, &dne.pids, batch).context("load on (a0)")?);
            check_alive(&mut dne.procs)?;
            rb.push(load(base.port, c, warm, dur, &base.pids, batch).context("load on (b)")?);
            check_alive(&mut base.procs)?;
        }
        stall_row(&mut noise, &format!("each round at {c} conns"), &level);
        all_stalls = all_stalls.merge(&level);
        let (a, a0, b) = (Run::median(&mut ra), Run::median(&mut r0), Run::median(&mut rb));
        report.put(&format!("rps_c{c}_dne_in_process"), a0.rps);
        for (name, r) in names.iter().zip([&a, &a0, &b]) {
            table.row(vec![
                (*name).to_owned(),
                c.to_string(),
                fmt_num(r.rps),
                fmt_num(r.p50_us),
                fmt_num(r.p99_us),
                fmt_num(r.cpu_per_10k),
                r.requests.to_string(),
                fmt_num(r.gen_cpu_per_10k),
            ]);
        }
        let (rx, px, cx) = (a.rps / b.rps, b.p99_us / a.p99_us, b.cpu_per_10k / a.cpu_per_10k);
        ratios.row(vec![c.to_string(), fmt_num(rx), fmt_num(px), fmt_num(cx)]);
        report.put(&format!("rps_c{c}_dne"), a.rps);
        report.put(&format!("rps_c{c}_nginx"), b.rps);
        report.put(&format!("rps_ratio_c{c}"), rx);
        report.put(&format!("p99_ratio_c{c}"), px);
        report.put(&format!("cpu_ratio_c{c}"), cx);
        if c == 64 {
            for (setup, (r, procs)) in
                ["(a)", "(a0)", "(b)"].iter().zip([(&a, &fab.procs), (&a0, &dne.procs), (&b, &base.procs)])
            {
                for (p, cpu) in procs.iter().zip(&r.per_proc) {
                    by_proc.row(vec![
                        (*setup).to_owned(),
                        p.name.clone(),
                        fmt_num(*cpu),
                        format!("{:.0}%", 100.0 * cpu / r.cpu_per_10k.max(1e-9)),
                    ]);
                }
            }
            report.put("cpu_ratio", cx);
            report.put("p99_us_c64_dne", a.p99_us);
            report.put("p99_us_c64_nginx", b.p99_us);
        }
    }
    report.put("dne_path", "fabric");
    report.put("loadgen_policy", policy);
    all_stalls.put(&mut report);
    // Counted now: nginx forks its workers after start.
    table.title = table.title.replace("{B}", &all_pids(&base.pids).len().to_string());
    drop(fab);
    drop(dne);
    drop(base);
    let _ = std::fs::remove_dir_all(&dir);
    report.tables = vec![table, ratios, by_proc, noise];
    Ok(report)
}

#[cfg(test)]
mod tests {
    use super::percentile_rank;

    /// Nearest rank: with samples 1..=100, p99 is 99 and p50 is 50; with
    /// 1000, p99 is the 990th. Before, each was one rank too high.
    #[test]
    fn percentiles_are_nearest_rank() {
        let v: Vec<u32> = (1..=100).collect();
        assert_eq!(v[percentile_rank(v.len(), 0.99)], 99);
        assert_eq!(v[percentile_rank(v.len(), 0.50)], 50);
        assert_eq!(percentile_rank(1000, 0.99), 989);
        assert_eq!(percentile_rank(1, 0.99), 0);
        assert_eq!(percentile_rank(3, 1.0), 2);
    }
}

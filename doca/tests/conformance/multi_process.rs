//! Multi-process conformance (emulated backend): real processes, the test
//! binary re-executed as a command-driven agent.
//!
//! Two "hosts" each create a pool (memfd) and export it for PCIe; two
//! "DPUs" import one pool each, connect RDMA to each other (over loopback,
//! or across two network namespaces joined by a veth pair when running as
//! root), and send from host A's memory into host B's memory. Host B then
//! finds the payloads in its own pool, while neither DPU ever mapped the
//! memory it imported (checked in `/proc/self/maps`). Finally DPU B is
//! killed with sends outstanding on DPU A, which must fail them.
//!
//! Processes are killed and namespaces deleted by guards, on failure too.

use super::*;
use std::io::{BufRead, BufReader, Write};
use std::process::{Child, ChildStdin, Command, Stdio};
use std::sync::mpsc;

const ROLE_ENV: &str = "DOCA_CONF_ROLE";

/// Entry point of the re-executed agent; returns at once in a normal run
/// (it is not a test of its own).
#[test]
fn agent_entry() {
    if std::env::var_os(ROLE_ENV).is_some() {
        agent();
        std::process::exit(0);
    }
}

fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

fn unhex(s: &str) -> Vec<u8> {
    (0..s.len()).step_by(2).map(|i| u8::from_str_radix(&s[i..i + 2], 16).expect("hex")).collect()
}

fn say(line: &str) {
    let mut o = std::io::stdout().lock();
    writeln!(o, "@@ {line}").expect("stdout");
    o.flush().expect("stdout");
}

fn describe(e: &RdmaEvent) -> String {
    match e {
        RdmaEvent::SendDone { result: Ok(()), .. } => "sent ok".into(),
        RdmaEvent::SendDone { result: Err(e), .. } => format!("sent err {}", e.name()),
        RdmaEvent::Received { result: Ok(()), buf, imm, .. } => format!("recv {} {}", buf.data_len(), imm.unwrap_or(0)),
        RdmaEvent::Received { result: Err(e), .. } => format!("recv err {}", e.name()),
        e => format!("event {e:?}"),
    }
}

/// Takes every event of the agent's context: connection state and task
/// completions (kept in order for `wait`).
fn pump(pe: &ProgressEngine, rdma: &Option<(Rdma, RdmaConnId)>, connected: &mut bool, done: &mut Vec<RdmaEvent>) {
    pe.progress();
    let Some((r, c)) = rdma else { return };
    while let Some(e) = r.poll_event() {
        match e {
            RdmaEvent::Connected(x) if x == *c => *connected = true,
            RdmaEvent::SendDone { .. } | RdmaEvent::Received { .. } => done.push(e),
            _ => {}
        }
    }
}

/// The agent: one command per stdin line, answers on stdout as `@@ ...`.
/// It progresses its engine all the time, also between commands, as a DPU
/// agent's busy loop does (its peer's connection setup needs it).
fn agent() {
    let dev = device();
    let pe = ProgressEngine::new().unwrap();
    let inv = BufInventory::new(256).unwrap();
    let mut pool: Option<(Arc<shm::Region>, Mmap)> = None;
    let mut remote: Option<RemoteMmap> = None;
    let mut rdma: Option<(Rdma, RdmaConnId)> = None;
    let mut connected = false;
    let mut done: Vec<RdmaEvent> = Vec::new();
    let (tx, rx) = mpsc::channel::<String>();
    std::thread::spawn(move || {
        for line in std::io::stdin().lines() {
            let Ok(line) = line else { break };
            if tx.send(line).is_err() {
                break;
            }
        }
    });
    loop {
        pump(&pe, &rdma, &mut connected, &mut done);
        let line = match rx.try_recv() {
            Ok(l) => l,
            Err(mpsc::TryRecvError::Empty) => {
                std::thread::yield_now();
                continue;
            }
            Err(mpsc::TryRecvError::Disconnected) => break,
        };
        let w: Vec<&str> = line.split_whitespace().collect();
        let num = |i: usize| w[i].parse::<u64>().expect("number");
        match w[0] {
            "pool" => {
                let name = format!("dne-conf-pool-{}", std::process::id());
                let r = Arc::new(shm::Region::create(&name, num(1) as usize, shm::PagePolicy::Normal).unwrap());
                let mm = local_mmap(&dev, &r, Access::LOCAL_READ_WRITE | Access::PCI_READ_WRITE);
                say(&format!("pool {} {name}", hex(&mm.export_pci(&dev).unwrap())));
                pool = Some((r, mm));
            }
            "fill" => {
                let r = &pool.as_ref().unwrap().0;
                r.copy_in(num(1), &pattern(num(3) as u32, num(2) as usize)).unwrap();
                say("ok");
            }
            "check" => {
                let r = &pool.as_ref().unwrap().0;
                let mut got = vec![0u8; num(2) as usize];
                r.copy_out(num(1), &mut got).unwrap();
                say(if got == pattern(num(3) as u32, got.len()) { "ok" } else { "bad" });
            }
            "import" => {
                remote = Some(RemoteMmap::from_export(&dev, &unhex(w[1])).unwrap());
                say("ok");
            }
            "rdma" => {
                let r = started_rdma(&pe, &dev, RdmaConfig { send_tasks: 16, recv_tasks: 16, ..Default::default() });
                let (c, blob) = r.export().unwrap();
                say(&format!("rdma {}", hex(&blob)));
                rdma = Some((r, c));
            }
            "connect" => {
                let (r, c) = rdma.as_ref().unwrap();
                r.connect(*c, &unhex(w[1])).unwrap();
                say("ok");
            }
            "wait-connected" => {
                let start = Instant::now();
                while !connected {
                    pump(&pe, &rdma, &mut connected, &mut done);
                    assert!(start.elapsed() < WATCHDOG, "watchdog: connection did not happen");
                }
                say("ok");
            }
            "recv" => {
                let (r, _) = rdma.as_ref().unwrap();
                for i in 0..num(3) {
                    let b = inv.remote_buf(remote.as_ref().unwrap(), num(1) + i * num(2), num(2) as u32).unwrap();
                    r.submit_receive(b, i).unwrap();
                }
                say("ok");
            }
            "send" => {
                // send <offset> <stride> <len> <first imm> <count>
                let (r, c) = rdma.as_ref().unwrap();
                for i in 0..num(5) {
                    let mut b = inv.remote_buf(remote.as_ref().unwrap(), num(1) + i * num(2), num(2) as u32).unwrap();
                    b.set_data_len(num(3) as u32).unwrap();
                    r.submit_send(*c, b, Some((num(4) + i) as u32), i).unwrap();
                }
                say("ok");
            }
            "wait" => {
                let n = num(1) as usize;
                let start = Instant::now();
                while done.len() < n {
                    pump(&pe, &rdma, &mut connected, &mut done);
                    assert!(start.elapsed() < WATCHDOG, "watchdog: {n} completions did not happen");
                }
                for e in done.drain(..n) {
                    say(&describe(&e));
                }
                say("done");
            }
            "maps" => {
                let maps = std::fs::read_to_string("/proc/self/maps").unwrap();
                say(if maps.contains(w[1]) { "maps yes" } else { "maps no" });
            }
            "quit" => break,
            other => panic!("agent: unknown command {other}"),
        }
    }
}

/// A running agent process.
struct Agent {
    name: String,
    child: Child,
    stdin: ChildStdin,
    lines: mpsc::Receiver<String>,
}

fn under_qemu() -> bool {
    std::env::var_os("DNE_QEMU_USER").is_some()
}

impl Agent {
    fn spawn(name: &str, netns: Option<&str>, devices: Option<&str>) -> Agent {
        let exe = std::env::current_exe().unwrap();
        let mut argv: Vec<String> = Vec::new();
        if let Some(ns) = netns {
            argv.extend(["ip", "netns", "exec", ns].map(String::from));
        }
        if under_qemu() {
            // The aarch64 test binary runs under qemu-user; so do its
            // children (no binfmt needed).
            argv.extend(["qemu-aarch64", "-L", "/"].map(String::from));
        }
        argv.push(exe.display().to_string());
        argv.extend(
            ["--exact", "multi_process::agent_entry", "--nocapture", "--test-threads=1", "-q"].map(String::from),
        );
        let mut cmd = Command::new(&argv[0]);
        cmd.args(&argv[1..]).env(ROLE_ENV, name).stdin(Stdio::piped()).stdout(Stdio::piped()).stderr(Stdio::inherit());
        match devices {
            Some(d) => cmd.env("DNE_EMU_DEVICES", d),
            None => cmd.env_remove("DNE_EMU_DEVICES"),
        };
        let mut child = cmd.spawn().unwrap_or_else(|e| panic!("spawn {argv:?}: {e}"));
        let stdin = child.stdin.take().unwrap();
        let stdout = child.stdout.take().unwrap();
        let (tx, lines) = mpsc::channel();
        let tag = name.to_owned();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines() {
                let Ok(line) = line else { break };
                match line.find("@@ ") {
                    Some(i) if tx.send(line[i + 3..].to_owned()).is_err() => break,
                    Some(_) => {}
                    None if line.starts_with("running ") || line.starts_with("test result") => {}
                    None if !line.trim().is_empty() => {
                        let _ = writeln!(std::io::stderr(), "[{tag}] {line}");
                    }
                    None => {}
                }
            }
        });
        Agent { name: name.to_owned(), child, stdin, lines }
    }

    fn reply(&mut self) -> String {
        match self.lines.recv_timeout(WATCHDOG) {
            Ok(l) => l,
            Err(mpsc::RecvTimeoutError::Timeout) => panic!("watchdog: agent {} did not answer", self.name),
            Err(mpsc::RecvTimeoutError::Disconnected) => panic!("agent {} exited (see its output above)", self.name),
        }
    }

    fn cmd(&mut self, line: &str) -> String {
        writeln!(self.stdin, "{line}").unwrap_or_else(|e| panic!("agent {}: {e}", self.name));
        self.stdin.flush().unwrap();
        self.reply()
    }

    /// `wait n`: the n completion lines.
    fn wait(&mut self, n: usize) -> Vec<String> {
        let mut out = Vec::new();
        writeln!(self.stdin, "wait {n}").unwrap();
        self.stdin.flush().unwrap();
        loop {
            let l = self.reply();
            if l == "done" {
                return out;
            }
            out.push(l);
        }
    }
}

impl Drop for Agent {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn run(args: &[&str]) -> Result<(), String> {
    let out = Command::new(args[0]).args(&args[1..]).output().map_err(|e| format!("{args:?}: {e}"))?;
    if out.status.success() {
        Ok(())
    } else {
        Err(format!("{args:?}: {}", String::from_utf8_lossy(&out.stderr).trim()))
    }
}

/// Two network namespaces joined by a veth pair; deleted on drop.
struct NetnsPair {
    ns: [String; 2],
    ip: [String; 2],
    veth: String,
}

impl NetnsPair {
    fn create() -> Result<NetnsPair, String> {
        let pid = std::process::id();
        let pair = NetnsPair {
            ns: [format!("dnec{pid}a"), format!("dnec{pid}b")],
            ip: [format!("10.213.{}.1", pid % 250), format!("10.213.{}.2", pid % 250)],
            veth: format!("dv{}a", pid % 100_000),
        };
        let veth = [pair.veth.clone(), format!("dv{}b", pid % 100_000)];
        for ns in &pair.ns {
            run(&["ip", "netns", "add", ns])?;
        }
        run(&["ip", "link", "add", &veth[0], "type", "veth", "peer", "name", &veth[1]])?;
        for ((ns, dev), ip) in pair.ns.iter().zip(&veth).zip(&pair.ip) {
            let ip = format!("{ip}/24");
            run(&["ip", "link", "set", dev, "netns", ns])?;
            run(&["ip", "-n", ns, "addr", "add", &ip, "dev", dev])?;
            run(&["ip", "-n", ns, "link", "set", dev, "up"])?;
            run(&["ip", "-n", ns, "link", "set", "lo", "up"])?;
        }
        Ok(pair)
    }
}

impl Drop for NetnsPair {
    fn drop(&mut self) {
        // Left in the root namespace only when setup failed half way.
        let _ = run(&["ip", "link", "del", &self.veth]);
        for ns in &self.ns {
            // Deleting the namespaces also deletes the veth pair.
            let _ = run(&["ip", "netns", "del", ns]);
        }
    }
}

const STRIDE: u64 = 64 << 10;
const LEN: u64 = 50_000;
const MSGS: u64 = 4;

fn two_nodes(netns: Option<&NetnsPair>) {
    let mut host_a = Agent::spawn("host-a", None, None);
    let mut host_b = Agent::spawn("host-b", None, None);
    let pool = |h: &mut Agent| {
        let r = h.cmd(&format!("pool {}", 1 << 20));
        let w: Vec<&str> = r.split_whitespace().collect();
        assert_eq!(w[0], "pool", "{r}");
        (w[1].to_owned(), w[2].to_owned())
    };
    let (blob_a, memfd_a) = pool(&mut host_a);
    let (blob_b, memfd_b) = pool(&mut host_b);
    for i in 0..MSGS {
        assert_eq!(host_a.cmd(&format!("fill {} {LEN} {i}", i * STRIDE)), "ok");
    }

    let (ns_a, ns_b) = match netns {
        Some(p) => (Some(p.ns[0].as_str()), Some(p.ns[1].as_str())),
        None => (None, None),
    };
    let (ip_a, ip_b) = match netns {
        Some(p) => (p.ip[0].clone(), p.ip[1].clone()),
        None => ("127.0.0.1".to_owned(), "127.0.0.1".to_owned()),
    };
    let mut dpu_a = Agent::spawn("dpu-a", ns_a, Some(&format!("dpua,pci=0000:03:00.0,ip={ip_a}")));
    let mut dpu_b = Agent::spawn("dpu-b", ns_b, Some(&format!("dpub,pci=0000:03:00.0,ip={ip_b}")));
    assert_eq!(dpu_a.cmd(&format!("import {blob_a}")), "ok");
    assert_eq!(dpu_b.cmd(&format!("import {blob_b}")), "ok");
    let ra = dpu_a.cmd("rdma");
    let rb = dpu_b.cmd("rdma");
    assert_eq!(dpu_a.cmd(&format!("connect {}", rb.trim_start_matches("rdma "))), "ok");
    assert_eq!(dpu_b.cmd(&format!("connect {}", ra.trim_start_matches("rdma "))), "ok");
    assert_eq!(dpu_a.cmd("wait-connected"), "ok");
    assert_eq!(dpu_b.cmd("wait-connected"), "ok");

    // Sends before receives: they wait (receiver not ready), then land.
    assert_eq!(dpu_a.cmd(&format!("send 0 {STRIDE} {LEN} 500 {MSGS}")), "ok");
    assert_eq!(dpu_b.cmd(&format!("recv 0 {STRIDE} {MSGS}")), "ok");
    let recvs = dpu_b.wait(MSGS as usize);
    let want: Vec<String> = (0..MSGS).map(|i| format!("recv {LEN} {}", 500 + i)).collect();
    assert_eq!(recvs, want, "in order, with immediates");
    assert_eq!(dpu_a.wait(MSGS as usize), vec!["sent ok".to_owned(); MSGS as usize]);
    for i in 0..MSGS {
        assert_eq!(host_b.cmd(&format!("check {} {LEN} {i}", i * STRIDE)), "ok", "payload {i} in host B's pool");
    }
    // Zero copy through the DPUs: neither mapped the pool it imported.
    assert_eq!(host_a.cmd(&format!("maps {memfd_a}")), "maps yes", "the check sees a mapping");
    assert_eq!(dpu_a.cmd(&format!("maps {memfd_a}")), "maps no");
    assert_eq!(dpu_b.cmd(&format!("maps {memfd_b}")), "maps no");

    // DPU B vanishes with DPU A's sends outstanding (no receive posted).
    assert_eq!(dpu_a.cmd(&format!("send 0 {STRIDE} {LEN} 900 2")), "ok");
    drop(dpu_b);
    for l in dpu_a.wait(2) {
        assert!(l.starts_with("sent err"), "outstanding send must fail: {l}");
    }
}

#[test]
fn hosts_export_dpus_import_and_send_between_processes() {
    two_nodes(None);
}

#[test]
fn dpus_in_separate_network_namespaces() {
    if under_qemu() {
        let _ =
            writeln!(std::io::stderr(), "SKIPPED: network namespaces are host-level; qemu-user run (DNE_QEMU_USER)");
        return;
    }
    if !rustix::process::geteuid().is_root() {
        let _ = writeln!(std::io::stderr(), "SKIPPED: creating network namespaces needs root");
        return;
    }
    let pair = NetnsPair::create().unwrap_or_else(|e| panic!("network namespace setup failed: {e}"));
    two_nodes(Some(&pair));
}

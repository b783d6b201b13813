//! `tracer load-gen cost` and `tracer load-gen floor`: the side of `cargo xtask bench-filter`
//! (what staying attached costs a node's traffic) that needs namespaces and sockets.
//!
//! `cost` builds a client and a server namespace joined by a veth pair, conntrack engaged
//! on both sides and the client's traffic MASQUERADEd (the SNAT scenario's shape), starts
//! one server per workload in them, prints `{"type":"ready",..}` and then reads commands
//! from stdin: `run WORKLOAD SECONDS` runs the workload's client for SECONDS and prints one
//! [`Window`] line; `quit` or the end of input removes everything. SIGINT/SIGTERM (also as
//! the death signal of its parent) remove everything too.
//!
//! `floor` attaches the object's programs that do nothing on the fallback programs' hooks
//! ([`crate::session::attach_floor`]), creates `--ready-file` and waits for SIGINT/SIGTERM.

use std::{
    io::{ErrorKind, Read as _, Write as _},
    net::{SocketAddr, TcpListener, TcpStream, UdpSocket},
    path::{Path, PathBuf},
    sync::atomic::{AtomicU64, Ordering},
    time::{Duration, Instant},
};

use anyhow::{ensure, Context as _, Result};
use clap::{Args, ValueEnum};
use serde::Serialize;

use super::{wire, FdLines};
use crate::{
    netns::{self, Netns},
    traffic,
};

/// Prefix of the namespaces (`ctcost-<pid>-<n>`).
pub const PREFIX: &str = "ctcost";
const CLIENT: &str = "10.248.0.2";
const SERVER: &str = "10.248.0.1";
/// Connected sockets (one thread each) of the UDP echo workloads.
const UDP_FLOWS: usize = 8;
/// Threads of the connect/close loop.
const CRR_THREADS: usize = 2;
/// A UDP echo that does not come back within this is counted lost and the flow sends again.
const ECHO_WAIT: Duration = Duration::from_millis(200);
/// Most commands one run takes.
const MAX_COMMANDS: usize = 10_000;

/// The traffic shapes. Only `dns` is traffic the tracer records.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, ValueEnum)]
#[serde(rename_all = "kebab-case")]
pub enum Workload {
    /// 64-byte UDP echo on the client namespace's loopback, 8 flows.
    UdpLo,
    /// 64-byte UDP echo across the veth pair, 8 flows.
    UdpVeth,
    /// One TCP stream across the veth pair, 64 KiB writes.
    TcpBulk,
    /// TCP connect, server closes, client closes: a new conntrack entry and SNAT per round.
    TcpCrr,
    /// DNS queries (port 53) across the veth pair, echoed back as answers, 8 flows.
    Dns,
}

impl Workload {
    fn unit(self) -> &'static str {
        match self {
            Workload::UdpLo | Workload::UdpVeth | Workload::Dns => "round trips/s",
            Workload::TcpBulk => "MB/s",
            Workload::TcpCrr => "connections/s",
        }
    }
}

/// One window's result.
#[derive(Debug, Serialize)]
pub struct Window {
    #[serde(rename = "type")]
    pub kind: &'static str,
    pub workload: Workload,
    pub seconds: f64,
    /// Round trips, bytes or connections.
    pub ops: u64,
    /// Per second (bytes as MB/s).
    pub rate: f64,
    pub unit: &'static str,
    /// UDP echoes that did not come back in time (sent again) or whose send was refused,
    /// TCP connects that timed out.
    pub lost: u64,
}

#[derive(Debug, Args)]
pub struct CostArgs {
    /// Stop when stdin stays silent this long, in seconds.
    #[arg(long, default_value_t = 900)]
    pub idle_limit: u32,
}

#[derive(Debug, Args)]
pub struct FloorArgs {
    /// Created once the programs are attached.
    #[arg(long)]
    pub ready_file: PathBuf,
    /// cgroup v2 directory to attach to (default: the cgroup2 mount).
    #[arg(long)]
    pub cgroup: Option<PathBuf>,
}

fn port(w: Workload) -> u16 {
    match w {
        Workload::UdpLo | Workload::UdpVeth => 9000,
        Workload::TcpBulk => 9001,
        Workload::TcpCrr => 9002,
        Workload::Dns => 53,
    }
}

fn addr(ip: &str, port: u16) -> SocketAddr {
    SocketAddr::new(ip.parse().expect("constant address"), port)
}

struct Net {
    client: Netns,
    _server: Netns,
}

impl Net {
    fn build() -> Result<Net> {
        let server = Netns::create(PREFIX)?;
        let client = Netns::create(PREFIX)?;
        netns::veth_pair_named(
            &client,
            "eth0",
            &[&format!("{CLIENT}/24")],
            &server,
            "eth0",
            &[&format!("{SERVER}/24")],
        )?;
        client.nft(
            "table ip cost {\n  chain post {\n    type nat hook postrouting priority 100; \
             policy accept;\n    oifname \"eth0\" masquerade\n  }\n  chain out {\n    type \
             filter hook output priority 0; policy accept;\n    ct state new counter accept\n  \
             }\n}\n",
        )?;
        server.nft(
            "table inet cost {\n  chain in {\n    type filter hook input priority 0; policy \
             accept;\n    ct state new counter accept\n  }\n}\n",
        )?;
        // The connect/close loop makes a connection per round: room for its TIME_WAITs.
        client.sysctl_set("net.ipv4.ip_local_port_range", "10000 65000")?;
        for w in [
            Workload::UdpVeth,
            Workload::TcpBulk,
            Workload::TcpCrr,
            Workload::Dns,
        ] {
            serve(&server.path(), addr(SERVER, port(w)), w)?;
        }
        serve(
            &client.path(),
            addr("127.0.0.1", port(Workload::UdpLo)),
            Workload::UdpLo,
        )?;
        Ok(Net {
            client,
            _server: server,
        })
    }
}

/// Starts `w`'s server on a thread in the namespace at `ns`; it runs until the process ends.
fn serve(ns: &Path, at: SocketAddr, w: Workload) -> Result<()> {
    let (tx, rx) = std::sync::mpsc::channel::<std::io::Result<()>>();
    traffic::spawn_in_netns(ns, "cost-server", move || match w {
        Workload::UdpLo | Workload::UdpVeth | Workload::Dns => match UdpSocket::bind(at) {
            Ok(s) => {
                let _ = tx.send(Ok(()));
                udp_echo(&s, w == Workload::Dns);
            }
            Err(e) => drop(tx.send(Err(e))),
        },
        Workload::TcpBulk | Workload::TcpCrr => match TcpListener::bind(at) {
            Ok(l) => {
                let _ = tx.send(Ok(()));
                tcp_serve(&l, w == Workload::TcpBulk);
            }
            Err(e) => drop(tx.send(Err(e))),
        },
    })?;
    rx.recv_timeout(Duration::from_secs(10))
        .context("the server did not start")?
        .with_context(|| format!("binding {at}"))
}

/// Sends every datagram back; as a DNS answer (QR set) when `dns`.
fn udp_echo(s: &UdpSocket, dns: bool) {
    let mut buf = [0u8; 2048];
    loop {
        let Ok((n, from)) = s.recv_from(&mut buf) else {
            continue;
        };
        if dns && n > 2 {
            buf[2] |= 0x80;
        }
        let _ = s.send_to(&buf[..n], from);
    }
}

/// Accepts forever: reads each stream to its end (`sink`) or closes it at once.
fn tcp_serve(l: &TcpListener, sink: bool) {
    for conn in l.incoming() {
        let Ok(mut c) = conn else { continue };
        if sink {
            std::thread::spawn(move || {
                let mut buf = vec![0u8; 1 << 16];
                while matches!(c.read(&mut buf), Ok(n) if n > 0) {}
            });
        }
    }
}

/// Runs `w`'s client in the client namespace for `window`.
fn run_window(net: &Net, w: Workload, window: Duration) -> Result<Window> {
    let ns = net.client.path();
    let ops = AtomicU64::new(0);
    let lost = AtomicU64::new(0);
    let start = Instant::now();
    let deadline = start + window;
    let threads = match w {
        Workload::UdpLo | Workload::UdpVeth | Workload::Dns => UDP_FLOWS,
        Workload::TcpBulk => 1,
        Workload::TcpCrr => CRR_THREADS,
    };
    std::thread::scope(|s| -> Result<()> {
        let mut handles = Vec::new();
        for flow in 0..threads {
            let (ns, ops, lost) = (&ns, &ops, &lost);
            handles.push(s.spawn(move || {
                traffic::in_netns(ns, || client(w, flow as u16, deadline, ops, lost))?
            }));
        }
        for h in handles {
            h.join()
                .map_err(|_| anyhow::anyhow!("a client thread panicked"))??;
        }
        Ok(())
    })?;
    let seconds = start.elapsed().as_secs_f64();
    let ops = ops.into_inner();
    let per_s = ops as f64 / seconds;
    Ok(Window {
        kind: "window",
        workload: w,
        seconds,
        ops,
        rate: if w == Workload::TcpBulk {
            per_s / 1e6
        } else {
            per_s
        },
        unit: w.unit(),
        lost: lost.into_inner(),
    })
}

fn client(
    w: Workload,
    flow: u16,
    deadline: Instant,
    ops: &AtomicU64,
    lost: &AtomicU64,
) -> Result<()> {
    let server = match w {
        Workload::UdpLo => addr("127.0.0.1", port(w)),
        _ => addr(SERVER, port(w)),
    };
    let mut n = 0u64;
    match w {
        Workload::UdpLo | Workload::UdpVeth | Workload::Dns => {
            let s = UdpSocket::bind(addr("0.0.0.0", 0))?;
            s.connect(server)?;
            s.set_read_timeout(Some(ECHO_WAIT))?;
            let out = [0x5au8; 64];
            let mut q = [0u8; wire::QUERY_LEN];
            let mut buf = [0u8; 2048];
            let mut seq = u64::from(flow) * 10_000_000;
            // Bounded by the deadline; every round either completes or times out.
            while Instant::now() < deadline {
                let msg: &[u8] = if w == Workload::Dns {
                    seq += 1;
                    wire::write_query(&mut q, seq as u16, seq);
                    &q
                } else {
                    &out[..]
                };
                // A send refused (a full conntrack table after the connect/close loop in a
                // small guest: EPERM) is counted like an echo that did not come back.
                if let Err(e) = s.send(msg) {
                    if matches!(e.raw_os_error(), Some(libc::EPERM | libc::ENOBUFS)) {
                        lost.fetch_add(1, Ordering::Relaxed);
                        std::thread::sleep(Duration::from_millis(1));
                        continue;
                    }
                    return Err(e).context("sending");
                }
                match s.recv(&mut buf) {
                    Ok(_) => n += 1,
                    Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => {
                        lost.fetch_add(1, Ordering::Relaxed);
                    }
                    Err(e) => return Err(e).context("receiving an echo"),
                }
            }
        }
        Workload::TcpBulk => {
            let mut c = TcpStream::connect_timeout(&server, Duration::from_secs(5))?;
            let chunk = vec![0x5au8; 1 << 16];
            while Instant::now() < deadline {
                c.write_all(&chunk)?;
                n += chunk.len() as u64;
            }
        }
        Workload::TcpCrr => {
            let mut buf = [0u8; 16];
            while Instant::now() < deadline {
                // A SYN lost under an emulated guest's load: counted, and the loop goes on.
                let mut c = match TcpStream::connect_timeout(&server, Duration::from_secs(1)) {
                    Ok(c) => c,
                    Err(e) if e.kind() == ErrorKind::TimedOut => {
                        lost.fetch_add(1, Ordering::Relaxed);
                        continue;
                    }
                    Err(e) => return Err(e).context("connecting"),
                };
                c.set_read_timeout(Some(Duration::from_secs(5)))?;
                // The server closes first: its end holds the TIME_WAIT, not our ports.
                while matches!(c.read(&mut buf), Ok(k) if k > 0) {}
                n += 1;
            }
        }
    }
    ops.fetch_add(n, Ordering::Relaxed);
    Ok(())
}

fn print_json(v: &impl Serialize) -> Result<()> {
    let mut out = std::io::stdout().lock();
    serde_json::to_writer(&mut out, v)?;
    writeln!(out)?;
    out.flush()?;
    Ok(())
}

/// `tracer load-gen cost`.
pub fn run(a: &CostArgs) -> Result<()> {
    super::cleanup_on_signal("cost-signals", |sig| {
        let ns = netns::remove_own(PREFIX);
        format!(
            "load-gen cost: signal {sig}: removed {} namespaces",
            ns.len()
        )
    })?;
    super::die_with_parent(libc::SIGTERM)?;
    let net = Net::build()?;
    print_json(&serde_json::json!({"type": "ready", "client": net.client.name()}))?;
    let mut stdin = FdLines::new(libc::STDIN_FILENO);
    let idle = Duration::from_secs(a.idle_limit.into());
    for _ in 0..MAX_COMMANDS {
        let Some(line) = stdin.next_line(idle)? else {
            break;
        };
        let words: Vec<&str> = line.split_whitespace().collect();
        match words.as_slice() {
            ["run", w, secs] => {
                let w = Workload::from_str(w, false).map_err(anyhow::Error::msg)?;
                let secs: f64 = secs.parse().context("seconds")?;
                ensure!((0.1..=300.0).contains(&secs), "seconds from 0.1 to 300");
                print_json(&run_window(&net, w, Duration::from_secs_f64(secs))?)?;
            }
            ["quit"] => break,
            _ => print_json(
                &serde_json::json!({"type": "error", "error": format!("unknown command {line:?}")}),
            )?,
        }
    }
    drop(net);
    let me = format!("{PREFIX}-{}-", std::process::id());
    let left: Vec<String> = netns::leftovers(PREFIX)
        .into_iter()
        .filter(|n| n.starts_with(&me))
        .collect();
    print_json(&serde_json::json!({"type": "done", "leftovers": left}))?;
    ensure!(left.is_empty(), "left behind: {left:?}");
    Ok(())
}

/// `tracer load-gen floor`.
pub fn floor(a: &FloorArgs) -> Result<()> {
    let set = super::blocked_stop_signals()?;
    super::die_with_parent(libc::SIGTERM)?;
    let _attached = crate::session::attach_floor(a.cgroup.as_deref())?;
    std::fs::write(&a.ready_file, b"")
        .with_context(|| format!("creating {}", a.ready_file.display()))?;
    super::wait_signal(&set);
    let _ = std::fs::remove_file(&a.ready_file);
    Ok(())
}

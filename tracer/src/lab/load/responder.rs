//! The bench's DNS responder: one UDP socket, `recvmmsg` batches (as many datagrams as are
//! waiting, up to `--batch`), every query answered with NOERROR and one record of the asked
//! type, the answers of a batch sent with one `sendmmsg`. It answers until its stdin ends
//! (or `--max-seconds`); a `stats` line on stdin prints its counters as one JSON line, so
//! the bench can tell its own misses from the tracer's.

use std::{
    io::Write as _,
    net::{SocketAddr, UdpSocket},
    os::fd::AsRawFd as _,
    sync::{
        atomic::{AtomicBool, AtomicU64, Ordering},
        Arc,
    },
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result};
use clap::Args;
use serde::{Deserialize, Serialize};

use super::{
    child_prologue,
    wire::{self, Batch},
    FdLines,
};

/// Receive and send buffers of the responder's socket: ~20,000 queries of backlog.
const SOCKET_BUFFER: i32 = 16 << 20;
/// How long one `recvmmsg` waits before the loop looks at the stop flag again.
const RECV_SLICE: Duration = Duration::from_millis(50);

#[derive(Debug, Args)]
pub struct ResponderArgs {
    /// Address to answer on.
    #[arg(long, default_value = "0.0.0.0:53")]
    pub bind: SocketAddr,
    /// Pin to this CPU.
    #[arg(long)]
    pub cpu: Option<usize>,
    /// Datagrams per recvmmsg/sendmmsg.
    #[arg(long, default_value_t = 64, value_parser = clap::value_parser!(u16).range(1..=1024))]
    pub batch: u16,
    /// Stop after this many seconds even if stdin stays open.
    #[arg(long, default_value_t = 7200, value_parser = clap::value_parser!(u32).range(1..=86_400))]
    pub max_seconds: u32,
}

/// The responder's counters since it started.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ResponderStats {
    /// Datagrams read.
    pub received: u64,
    /// Answers the kernel took.
    pub answered: u64,
    /// Datagrams that were not a query with one question (not answered).
    pub malformed: u64,
    /// Answers the kernel refused (`sendmmsg` errors).
    pub refused: u64,
    /// Datagrams the server's network namespace dropped at a full receive buffer.
    pub rcvbuf_errors: Option<u64>,
}

impl ResponderStats {
    /// What happened between `before` and `self`.
    pub fn since(&self, before: &ResponderStats) -> ResponderStats {
        ResponderStats {
            received: self.received.saturating_sub(before.received),
            answered: self.answered.saturating_sub(before.answered),
            malformed: self.malformed.saturating_sub(before.malformed),
            refused: self.refused.saturating_sub(before.refused),
            rcvbuf_errors: self
                .rcvbuf_errors
                .zip(before.rcvbuf_errors)
                .map(|(a, b)| a.saturating_sub(b)),
        }
    }
}

#[derive(Default)]
struct Counters {
    received: AtomicU64,
    answered: AtomicU64,
    malformed: AtomicU64,
    refused: AtomicU64,
}

impl Counters {
    fn snapshot(&self) -> ResponderStats {
        ResponderStats {
            received: self.received.load(Ordering::Relaxed),
            answered: self.answered.load(Ordering::Relaxed),
            malformed: self.malformed.load(Ordering::Relaxed),
            refused: self.refused.load(Ordering::Relaxed),
            rcvbuf_errors: wire::udp_rcvbuf_errors(),
        }
    }
}

fn print_line(v: &serde_json::Value) -> Result<()> {
    let mut out = std::io::stdout().lock();
    serde_json::to_writer(&mut out, v)?;
    writeln!(out)?;
    out.flush()?;
    Ok(())
}

fn stats_line(c: &Counters) -> Result<()> {
    let mut v = serde_json::to_value(c.snapshot())?;
    if let serde_json::Value::Object(m) = &mut v {
        m.insert("type".into(), "stats".into());
    }
    print_line(&v)
}

/// `tracer load-gen responder`.
pub fn run(a: &ResponderArgs) -> Result<()> {
    let cpu = child_prologue(b"load-responder\0", a.cpu)?;
    let sock = UdpSocket::bind(a.bind).with_context(|| format!("binding {}", a.bind))?;
    let fd = sock.as_raw_fd();
    wire::set_buffers(fd, SOCKET_BUFFER).context("socket buffers")?;
    sock.set_read_timeout(Some(RECV_SLICE))?;
    let counters = Arc::new(Counters::default());
    let stop = Arc::new(AtomicBool::new(false));
    let limit = Duration::from_secs(u64::from(a.max_seconds));
    {
        let (counters, stop) = (Arc::clone(&counters), Arc::clone(&stop));
        std::thread::Builder::new()
            .name("control".into())
            .spawn(move || {
                let mut lines = FdLines::new(libc::STDIN_FILENO);
                loop {
                    match lines.next_line(limit) {
                        Ok(Some(l)) if l == "stats" => {
                            if let Err(e) = stats_line(&counters) {
                                eprintln!("load-responder: {e:#}");
                                break;
                            }
                        }
                        Ok(Some(l)) => eprintln!("load-responder: unknown command {l:?}"),
                        Ok(None) | Err(_) => break,
                    }
                }
                stop.store(true, Ordering::Relaxed);
            })
            .context("spawning the control thread")?;
    }
    print_line(&serde_json::json!({
        "type": "ready",
        "addr": sock.local_addr()?.to_string(),
        "cpu": cpu,
    }))?;

    let (mut rx, mut tx) = (Batch::new(a.batch.into()), Batch::new(a.batch.into()));
    let deadline = Instant::now() + limit;
    while !stop.load(Ordering::Relaxed) && Instant::now() < deadline {
        let n = rx
            .recv(fd, libc::MSG_WAITFORONE, true)
            .context("recvmmsg")?;
        if n == 0 {
            continue;
        }
        let mut m = 0;
        for i in 0..n {
            if let Some(len) = wire::write_answer(rx.msg(i), tx.buf_mut(m)) {
                tx.set_len(m, len);
                tx.set_peer_from(m, &rx, i);
                m += 1;
            }
        }
        let (sent, refused) = tx.send(fd, m, true);
        counters.received.fetch_add(n as u64, Ordering::Relaxed);
        counters.answered.fetch_add(sent as u64, Ordering::Relaxed);
        counters
            .refused
            .fetch_add(refused as u64, Ordering::Relaxed);
        counters
            .malformed
            .fetch_add((n - m) as u64, Ordering::Relaxed);
    }
    stats_line(&counters)
}

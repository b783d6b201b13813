//! Shape "pods": one process per pod, in the pod's network namespace and kubelet-like
//! cgroup, doing lookups the way glibc's stub resolver does one: a new UDP socket,
//! connect, A and AAAA in one `sendmmsg`, both answers awaited (up to `--timeout-ms`; no
//! retry: a lookup missing an answer counts as unanswered), close.
//!
//! The lookups are paced open-loop: lookup k of pod i is due at `start + (k + i/pods) /
//! rate`, so the pods' lookups interleave evenly; a pod that falls behind runs its due
//! lookups back to back until it has caught up, and stops at the end of the window
//! whatever is left. `--hot-percent` of the lookups ask one of `--hot-names` shared names
//! (`hotN.load.test`), the others a name of their own (`u<pod>-<k>.load.test`). A pod
//! prints a ready line, then waits for its start instant on stdin (`go <CLOCK_MONOTONIC
//! ns>`, sent once every pod is ready), and ends with its report line.

use std::{
    net::SocketAddr,
    os::fd::AsRawFd as _,
    time::{Duration, Instant},
};

use anyhow::{bail, ensure, Context as _, Result};
use clap::Args;
use serde::{Deserialize, Serialize};

use super::{
    child_prologue, mono_ns, parse_seconds, sleep_until,
    wire::{self, Batch},
    FdLines, Latencies, LatencySummary,
};
use crate::traffic::{self, QTYPE_A, QTYPE_AAAA};

/// How long a pod waits for its start instant.
const GO_LIMIT: Duration = Duration::from_secs(120);
/// A lookup this far behind its due time counts as late.
const LATE: Duration = Duration::from_millis(100);

#[derive(Debug, Args)]
pub struct PodArgs {
    /// The DNS server (the service VIP).
    #[arg(long, default_value_t = super::service())]
    pub server: SocketAddr,
    /// This pod's index.
    #[arg(long)]
    pub pod: usize,
    /// How many pods share the rate.
    #[arg(long, value_parser = clap::value_parser!(u64).range(1..=super::MAX_PODS as u64))]
    pub pods: u64,
    /// Lookups per second of this pod (each one an A and an AAAA query).
    #[arg(long, value_parser = parse_lookup_rate)]
    pub lookups_per_s: f64,
    /// Length of the window.
    #[arg(long, value_parser = parse_seconds)]
    pub seconds: u32,
    /// How long a lookup waits for its answers, in ms.
    #[arg(long, default_value_t = 5000, value_parser = clap::value_parser!(u32).range(1..=30_000))]
    pub timeout_ms: u32,
    /// Shared names the repeated lookups choose from.
    #[arg(long, default_value_t = 16, value_parser = clap::value_parser!(u32).range(1..=1000))]
    pub hot_names: u32,
    /// Percent of the lookups that ask a shared name.
    #[arg(long, default_value_t = 50, value_parser = clap::value_parser!(u8).range(0..=100))]
    pub hot_percent: u8,
    /// Pin to this CPU.
    #[arg(long)]
    pub cpu: Option<usize>,
}

fn parse_lookup_rate(s: &str) -> Result<f64, String> {
    let max = f64::from(super::MAX_RATE);
    match s.parse::<f64>() {
        Ok(v) if (0.01..=max).contains(&v) => Ok(v),
        _ => Err(format!("'{s}': expected lookups/s from 0.01 to {max}")),
    }
}

/// Lookups by how they ended, as the application saw them.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Outcomes {
    /// Both answered, with a record.
    pub answered: u64,
    /// Both answered, NXDOMAIN or no record.
    pub negative: u64,
    /// Both answered, another rcode.
    pub error: u64,
    /// A query not sent or not answered in time.
    pub unanswered: u64,
}

impl Outcomes {
    pub fn add(&mut self, o: &Outcomes) {
        self.answered += o.answered;
        self.negative += o.negative;
        self.error += o.error;
        self.unanswered += o.unanswered;
    }

    pub fn total(&self) -> u64 {
        self.answered + self.negative + self.error + self.unanswered
    }
}

/// One pod's truth.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct PodReport {
    pub pod: usize,
    pub cpu: Option<usize>,
    pub lookups: u64,
    pub hot_lookups: u64,
    /// Queries the kernel took.
    pub sent: u64,
    /// Queries the kernel refused.
    pub refused: u64,
    /// Queries answered.
    pub answered: u64,
    pub outcomes: Outcomes,
    /// Lookups that started more than 100 ms after they were due.
    pub late: u64,
    pub max_lag_ms: f64,
    /// How long after the start instant the pod was ready, in ms (0: in time).
    pub started_late_ms: f64,
    /// From the start instant to the last lookup's end, at most the window, in seconds.
    pub window_s: f64,
    /// Lookup latency: first send to the last answer.
    pub latency: LatencySummary,
    /// Datagrams the pod's network namespace dropped at full receive buffers.
    pub rcvbuf_errors: Option<u64>,
}

/// One lookup's queries: (id, sent, answer's rcode and answer count).
struct Query {
    id: u16,
    sent: bool,
    reply: Option<(u8, u16)>,
}

/// Runs one lookup of `name`; the queries' states and the latency to the last answer.
fn lookup(
    server: &SocketAddr,
    name: &str,
    id: u16,
    timeout: Duration,
    tx: &mut Batch,
    rx: &mut Batch,
) -> Result<([Query; 2], Duration)> {
    let sock = traffic::new_socket(server, libc::SOCK_DGRAM, true).context("UDP socket")?;
    let fd = sock.as_raw_fd();
    traffic::connect_fd(fd, server).with_context(|| format!("connecting to {server}"))?;
    let mut qs = [(id, QTYPE_A), (id ^ 0x8000, QTYPE_AAAA)].map(|(id, _)| Query {
        id,
        sent: false,
        reply: None,
    });
    for (i, qtype) in [QTYPE_A, QTYPE_AAAA].into_iter().enumerate() {
        let q = traffic::dns_query(qs[i].id, name, qtype)?;
        let buf = tx.buf_mut(i);
        ensure!(q.len() <= buf.len(), "query for {name} too long");
        buf[..q.len()].copy_from_slice(&q);
        tx.set_len(i, q.len());
    }
    let t0 = Instant::now();
    tx.send(fd, 2, false);
    for (i, q) in qs.iter_mut().enumerate() {
        q.sent = !tx.was_refused(i);
    }
    let deadline = t0 + timeout;
    let mut last = t0;
    // Each pass reads at least one datagram or ends at the deadline.
    for _ in 0..1000 {
        if qs.iter().all(|q| !q.sent || q.reply.is_some()) {
            break;
        }
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() || traffic::poll_fd(fd, libc::POLLIN, left)? == 0 {
            break;
        }
        let n = rx.recv(fd, libc::MSG_DONTWAIT, false).context("recvmmsg")?;
        for i in 0..n {
            let Some(r) = wire::parse_reply(rx.msg(i)) else {
                continue;
            };
            if let Some(q) = qs
                .iter_mut()
                .find(|q| q.sent && q.id == r.id && q.reply.is_none())
            {
                q.reply = Some((r.rcode, r.ancount));
                last = Instant::now();
            }
        }
    }
    Ok((qs, last - t0))
}

fn outcome(qs: &[Query; 2]) -> Outcomes {
    let mut o = Outcomes::default();
    let replies: Vec<(u8, u16)> = qs.iter().filter_map(|q| q.reply).collect();
    if replies.len() < qs.len() {
        o.unanswered = 1;
    } else if replies.iter().any(|&(rcode, _)| rcode != 0 && rcode != 3) {
        o.error = 1;
    } else if replies.iter().any(|&(rcode, an)| rcode == 0 && an > 0) {
        o.answered = 1;
    } else {
        o.negative = 1;
    }
    o
}

/// Reads `go <ns>` from stdin.
fn start_instant() -> Result<u64> {
    let mut stdin = FdLines::new(libc::STDIN_FILENO);
    let Some(line) = stdin.next_line(GO_LIMIT)? else {
        bail!("stdin ended before the start instant");
    };
    let ns = line
        .strip_prefix("go ")
        .and_then(|v| v.parse::<u64>().ok())
        .with_context(|| format!("expected `go <ns>`, got {line:?}"))?;
    let now = mono_ns();
    ensure!(
        ns < now + 120_000_000_000 && ns + 120_000_000_000 > now,
        "start instant {ns} is more than 120 s from now ({now})"
    );
    Ok(ns)
}

/// `tracer load-gen pod`: prints one [`PodReport`] as a JSON line.
pub fn run(a: &PodArgs) -> Result<()> {
    let cpu = child_prologue(b"load-pod\0", a.cpu)?;
    ensure!(
        (a.pod as u64) < a.pods,
        "pod {} of {}: out of range",
        a.pod,
        a.pods
    );
    let timeout = Duration::from_millis(a.timeout_ms.into());
    let (mut tx, mut rx) = (Batch::new(2), Batch::new(4));
    let mut rng = traffic::Rng::seeded();
    let mut latencies = Latencies::new();
    let rcvbuf_before = wire::udp_rcvbuf_errors();
    let mut r = PodReport {
        pod: a.pod,
        cpu,
        ..PodReport::default()
    };

    println!("{}", serde_json::json!({"type": "ready", "pod": a.pod}));
    let start_ns = start_instant()?;
    let now = mono_ns();
    r.started_late_ms = now.saturating_sub(start_ns) as f64 / 1e6;
    let interval_ns = 1e9 / a.lookups_per_s;
    let phase = a.pod as f64 / a.pods as f64;
    let end_ns = start_ns + u64::from(a.seconds) * 1_000_000_000;
    let max_lookups = (a.lookups_per_s * f64::from(a.seconds)).ceil() as u64 + 1;
    for k in 0..max_lookups {
        let due = start_ns + ((k as f64 + phase) * interval_ns) as u64;
        let now = mono_ns();
        if due >= end_ns || now >= end_ns {
            break;
        }
        if due > now {
            sleep_until(due);
        } else {
            let lag = now - due;
            r.max_lag_ms = r.max_lag_ms.max(lag as f64 / 1e6);
            if lag > LATE.as_nanos() as u64 {
                r.late += 1;
            }
        }
        let hot = rng.next() % 100 < u64::from(a.hot_percent);
        let name = if hot {
            r.hot_lookups += 1;
            format!("hot{}.{}", rng.next() % u64::from(a.hot_names), wire::ZONE)
        } else {
            format!("u{}-{k}.{}", a.pod, wire::ZONE)
        };
        let (qs, latency) = lookup(
            &a.server,
            &name,
            rng.next() as u16,
            timeout,
            &mut tx,
            &mut rx,
        )?;
        r.lookups += 1;
        for q in &qs {
            r.sent += u64::from(q.sent);
            r.refused += u64::from(!q.sent);
            r.answered += u64::from(q.reply.is_some());
        }
        let o = outcome(&qs);
        if o.unanswered == 0 {
            latencies.add(u64::try_from(latency.as_micros()).unwrap_or(u64::MAX));
        }
        r.outcomes.add(&o);
    }
    // The sending window, as for the one-process generator: the answers of the last
    // lookups may come after it.
    r.window_s = (mono_ns().saturating_sub(start_ns) as f64 / 1e9).min(f64::from(a.seconds));
    r.latency = latencies.summary();
    r.rcvbuf_errors = wire::udp_rcvbuf_errors()
        .zip(rcvbuf_before)
        .map(|(a, b)| a.saturating_sub(b));
    println!("{}", serde_json::to_string(&r)?);
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn q(reply: Option<(u8, u16)>) -> Query {
        Query {
            id: 1,
            sent: true,
            reply,
        }
    }

    #[test]
    fn outcomes_as_glibc_sees_them() {
        let o = |a, b| outcome(&[q(a), q(b)]);
        assert_eq!(o(Some((0, 1)), Some((0, 1))).answered, 1);
        assert_eq!(o(Some((0, 1)), Some((0, 0))).answered, 1);
        assert_eq!(o(Some((3, 0)), Some((3, 0))).negative, 1);
        assert_eq!(o(Some((2, 0)), Some((0, 1))).error, 1);
        assert_eq!(o(Some((0, 1)), None).unanswered, 1);
    }
}

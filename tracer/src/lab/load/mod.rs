//! The workload of `cargo xtask bench-load`: real DNS traffic through real conntrack in
//! throwaway network namespaces, at a set rate, with the generators' own count of what
//! was sent and answered. Everything runs as the hidden `tracer load-gen` subcommand:
//!
//! - `bench` ([`bench`]): the driver the xtask talks to over stdin/stdout. It builds one
//!   shape's namespaces (and pod cgroups), starts the responder, then runs measuring
//!   windows on command (`run RATE SECONDS`), printing one JSON line of truth per window,
//!   and removes everything on `quit`, on end of input, on SIGINT/SIGTERM and when its
//!   parent dies.
//! - `responder` ([`responder`]): answers every query on one UDP socket with `recvmmsg`/
//!   `sendmmsg` batches (NOERROR, one A or AAAA record), in the server namespace.
//! - `blast` ([`blast`]): shape "one-process": one process, 64 connected UDP sockets, A
//!   queries for unique names at a paced rate, every answer matched to its query.
//! - `pod` ([`pod`]): shape "pods": one per pod (its own network namespace and
//!   kubelet-like cgroup), glibc-style lookups (new socket, A+AAAA in one `sendmmsg`,
//!   both answers awaited, close) at the pod's share of the rate.
//!
//! Every child dies with its parent (`PR_SET_PDEATHSIG`) and every loop is bounded in
//! count and time.

pub mod bench;
pub mod blast;
pub mod cost;
pub mod net;
pub mod pod;
pub mod responder;
pub mod wire;

use std::{
    io,
    net::{Ipv4Addr, SocketAddr},
    os::fd::RawFd,
    time::{Duration, Instant},
};

use anyhow::{ensure, Context as _, Result};
use clap::{Args, Subcommand};

use crate::traffic;

/// The service VIP the generators query; each shape DNATs it to the responder.
pub const VIP: Ipv4Addr = Ipv4Addr::new(10, 96, 0, 10);
/// The Kubernetes namespace of the bench's pods.
pub const POD_NAMESPACE: &str = "load-bench";
/// Highest total query rate accepted.
pub const MAX_RATE: u32 = 200_000;
/// Longest window accepted, in seconds.
pub const MAX_SECONDS: u32 = 300;
/// Most pods one bench makes (each gets a /24 of 10.250.0.0/16).
pub const MAX_PODS: usize = 250;

/// `tracer load-gen`: the load benchmark's processes (internal; `cargo xtask bench-load`).
#[derive(Debug, Args)]
pub struct LoadGenCmd {
    #[command(subcommand)]
    pub mode: LoadGenMode,
}

#[derive(Debug, Subcommand)]
pub enum LoadGenMode {
    /// Build a shape's namespaces, then run windows on command from stdin.
    Bench(bench::BenchArgs),
    /// Answer every DNS query on one UDP socket until stdin ends.
    Responder(responder::ResponderArgs),
    /// Shape one-process: paced A queries on many connected sockets.
    Blast(blast::BlastArgs),
    /// Shape pods: one pod's glibc-style lookups.
    Pod(pod::PodArgs),
    /// `cargo xtask bench-filter`'s namespaces and workloads, run on command from stdin.
    Cost(cost::CostArgs),
    /// Attach programs that do nothing where the fallback programs attach, until SIGINT.
    Floor(cost::FloorArgs),
}

/// Runs `tracer load-gen <mode>`.
pub fn run(cmd: LoadGenCmd) -> Result<()> {
    match cmd.mode {
        LoadGenMode::Bench(a) => bench::run(&a),
        LoadGenMode::Responder(a) => responder::run(&a),
        LoadGenMode::Blast(a) => blast::run(&a),
        LoadGenMode::Pod(a) => pod::run(&a),
        LoadGenMode::Cost(a) => cost::run(&a),
        LoadGenMode::Floor(a) => cost::floor(&a),
    }
}

/// The DNS service the generators query.
pub fn service() -> SocketAddr {
    SocketAddr::new(VIP.into(), 53)
}

pub(crate) fn parse_rate(s: &str) -> Result<u32, String> {
    match s.parse::<u32>() {
        Ok(v) if (1..=MAX_RATE).contains(&v) => Ok(v),
        _ => Err(format!("'{s}': expected queries/s from 1 to {MAX_RATE}")),
    }
}

pub(crate) fn parse_seconds(s: &str) -> Result<u32, String> {
    match s.parse::<u32>() {
        Ok(v) if (1..=MAX_SECONDS).contains(&v) => Ok(v),
        _ => Err(format!("'{s}': expected seconds from 1 to {MAX_SECONDS}")),
    }
}

/// Blocks SIGINT and SIGTERM for this thread and the threads it starts after, so that one
/// thread can take them with [`wait_signal`]; returns the set.
pub(crate) fn blocked_stop_signals() -> Result<libc::sigset_t> {
    // SAFETY: sigset_t is plain data initialized by sigemptyset; pthread_sigmask reads it.
    unsafe {
        let mut set: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&mut set);
        libc::sigaddset(&mut set, libc::SIGINT);
        libc::sigaddset(&mut set, libc::SIGTERM);
        ensure!(
            libc::pthread_sigmask(libc::SIG_BLOCK, &set, std::ptr::null_mut()) == 0,
            "blocking SIGINT/SIGTERM"
        );
        Ok(set)
    }
}

/// Waits for one of the signals of `set` (blocked by [`blocked_stop_signals`]); returns it.
pub(crate) fn wait_signal(set: &libc::sigset_t) -> i32 {
    let mut sig = 0;
    // SAFETY: `set` is an initialized signal set; sigwait writes `sig`.
    while unsafe { libc::sigwait(set, &mut sig) } != 0 {}
    sig
}

/// Blocks SIGINT/SIGTERM and starts a thread that, when one arrives, runs `cleanup` (what
/// the main thread's guards can not remove then), prints what it says and exits. Must run
/// before any other thread exists, so that every thread inherits the mask.
pub(crate) fn cleanup_on_signal(
    thread: &str,
    cleanup: impl FnOnce(i32) -> String + Send + 'static,
) -> Result<()> {
    let set = blocked_stop_signals()?;
    std::thread::Builder::new()
        .name(thread.into())
        .spawn(move || {
            let sig = wait_signal(&set);
            eprintln!("{}", cleanup(sig));
            std::process::exit(128 + sig);
        })?;
    Ok(())
}

/// Asks for `sig` when the parent dies, and fails if it is already gone.
pub(crate) fn die_with_parent(sig: i32) -> Result<()> {
    // SAFETY: plain prctl/getppid calls with integer arguments.
    unsafe {
        let parent = libc::getppid();
        ensure!(
            libc::prctl(libc::PR_SET_PDEATHSIG, sig as libc::c_ulong) == 0,
            "prctl(PR_SET_PDEATHSIG)"
        );
        ensure!(libc::getppid() == parent, "the parent is gone");
    }
    Ok(())
}

/// What every child does first: die with its parent (SIGKILL), take a name of its own for
/// the tracer's `comm`, take SIGINT/SIGTERM back (the bench blocks them for its signal
/// thread, and a mask is inherited), use the smallest timer slack and, if asked, pin
/// itself to `cpu`. Returns the CPU it is pinned to.
fn child_prologue(name: &'static [u8], cpu: Option<usize>) -> Result<Option<usize>> {
    ensure!(
        name.len() <= 16 && name.ends_with(b"\0"),
        "process name too long"
    );
    // SAFETY: plain prctl calls with integer arguments; PR_SET_NAME reads a NUL-terminated
    // string of at most 16 bytes (checked above).
    unsafe {
        if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL as libc::c_ulong) != 0 {
            return Err(io::Error::last_os_error()).context("prctl(PR_SET_PDEATHSIG)");
        }
        libc::prctl(libc::PR_SET_NAME, name.as_ptr());
        libc::prctl(libc::PR_SET_TIMERSLACK, 1 as libc::c_ulong);
    }
    // SAFETY: sigset_t is plain data initialized by sigemptyset; pthread_sigmask reads it.
    unsafe {
        let mut set: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&mut set);
        libc::sigaddset(&mut set, libc::SIGINT);
        libc::sigaddset(&mut set, libc::SIGTERM);
        libc::pthread_sigmask(libc::SIG_UNBLOCK, &set, std::ptr::null_mut());
    }
    let Some(cpu) = cpu else {
        return Ok(None);
    };
    ensure!(
        traffic::allowed_cpus().contains(&cpu),
        "CPU {cpu} is not one this process may run on ({:?})",
        traffic::allowed_cpus()
    );
    traffic::pin_to(cpu).with_context(|| format!("pinning to CPU {cpu}"))?;
    Ok(Some(cpu))
}

/// One clock for every process on the machine, and sleeping to an instant of it: the
/// lab's clients' own.
pub(crate) use super::client::{mono_ns, sleep_until};

/// Lines read from a pipe (stdin, a child's stdout) with a bound on every wait; the
/// bytes after a line stay buffered for the next call.
pub(crate) struct FdLines {
    fd: RawFd,
    buf: Vec<u8>,
    eof: bool,
}

impl FdLines {
    /// Reads from `fd`, which must stay open while this lives.
    pub(crate) fn new(fd: RawFd) -> FdLines {
        FdLines {
            fd,
            buf: Vec::new(),
            eof: false,
        }
    }

    /// The next line (without its newline), waiting at most `limit`; `Ok(None)` at end of
    /// input; an error when nothing complete came within `limit` or a line is over 1 MiB.
    pub(crate) fn next_line(&mut self, limit: Duration) -> Result<Option<String>> {
        const MAX_LINE: usize = 1 << 20;
        let deadline = Instant::now() + limit;
        loop {
            if let Some(i) = self.buf.iter().position(|&b| b == b'\n') {
                let line: Vec<u8> = self.buf.drain(..=i).collect();
                return Ok(Some(String::from_utf8_lossy(&line[..i]).trim().to_string()));
            }
            if self.eof {
                if self.buf.is_empty() {
                    return Ok(None);
                }
                let rest = std::mem::take(&mut self.buf);
                return Ok(Some(String::from_utf8_lossy(&rest).trim().to_string()));
            }
            ensure!(
                self.buf.len() <= MAX_LINE,
                "a line of over {MAX_LINE} bytes"
            );
            let left = deadline.saturating_duration_since(Instant::now());
            ensure!(!left.is_zero(), "no complete line within {limit:?}");
            if traffic::poll_fd(self.fd, libc::POLLIN, left.min(Duration::from_millis(100)))? == 0 {
                continue;
            }
            let mut chunk = [0u8; 4096];
            // SAFETY: reads at most chunk.len() bytes into a live stack buffer.
            let n = unsafe { libc::read(self.fd, chunk.as_mut_ptr().cast(), chunk.len()) };
            match n {
                0 => self.eof = true,
                n if n > 0 => self.buf.extend_from_slice(&chunk[..n as usize]),
                _ => {
                    let e = io::Error::last_os_error();
                    if !matches!(
                        e.kind(),
                        io::ErrorKind::Interrupted | io::ErrorKind::WouldBlock
                    ) {
                        return Err(e).context("reading a pipe");
                    }
                }
            }
        }
    }
}

/// Latencies in 10 µs buckets up to 100 ms (and the largest seen), for percentiles.
#[derive(Debug, Clone)]
pub(crate) struct Latencies {
    buckets: Vec<u64>,
    max_us: u64,
}

impl Latencies {
    const BUCKET_US: u64 = 10;
    const BUCKETS: usize = 10_000;

    pub(crate) fn new() -> Latencies {
        Latencies {
            buckets: vec![0; Self::BUCKETS],
            max_us: 0,
        }
    }

    pub(crate) fn add(&mut self, us: u64) {
        let i = ((us / Self::BUCKET_US) as usize).min(Self::BUCKETS - 1);
        self.buckets[i] += 1;
        self.max_us = self.max_us.max(us);
    }

    /// The upper edge of the bucket holding quantile `q` (0..1), in µs.
    pub(crate) fn quantile_us(&self, q: f64) -> u64 {
        let total: u64 = self.buckets.iter().sum();
        if total == 0 {
            return 0;
        }
        let want = ((total as f64) * q).ceil().max(1.0) as u64;
        let mut seen = 0;
        for (i, n) in self.buckets.iter().enumerate() {
            seen += n;
            if seen >= want {
                return ((i as u64 + 1) * Self::BUCKET_US).min(self.max_us.max(1));
            }
        }
        self.max_us
    }

    pub(crate) fn summary(&self) -> LatencySummary {
        LatencySummary {
            p50_us: self.quantile_us(0.5),
            p99_us: self.quantile_us(0.99),
            max_us: self.max_us,
        }
    }
}

/// Answer latencies a generator saw.
#[derive(Debug, Clone, Copy, Default, serde::Serialize, serde::Deserialize)]
pub struct LatencySummary {
    pub p50_us: u64,
    pub p99_us: u64,
    pub max_us: u64,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn latency_quantiles() {
        let mut l = Latencies::new();
        assert_eq!(l.quantile_us(0.5), 0);
        for us in 1..=100 {
            l.add(us);
        }
        l.add(1_000_000);
        let s = l.summary();
        assert_eq!((s.p50_us, s.max_us), (60, 1_000_000));
        assert!(s.p99_us >= 100, "{s:?}");
    }
}

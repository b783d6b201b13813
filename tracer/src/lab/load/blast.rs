//! Shape "one-process": one process with `--sockets` connected UDP sockets sends A queries
//! for unique names (`qNNNNNNNN.load.test`, N the query's sequence number) at a fixed
//! rate, paced on a 1 ms tick: at each tick the queries due by then (at most 4 ticks' worth,
//! so a stall is caught up gradually) go out round-robin over the sockets, one `sendmmsg`
//! per socket, and the loop waits in `ppoll` for answers until the next tick.
//!
//! Every answer is matched to its query by socket, DNS id and the sequence number in its
//! question, so the report is the generator's own truth: sent, answered, unanswered (no
//! answer by the end of `--linger-ms` after the window), and replies matching nothing.

use std::{
    io,
    net::{SocketAddr, UdpSocket},
    os::fd::{AsRawFd as _, RawFd},
    time::{Duration, Instant},
};

use anyhow::{ensure, Context as _, Result};
use clap::Args;
use serde::{Deserialize, Serialize};

use super::{
    child_prologue, parse_rate, parse_seconds,
    wire::{self, Batch, QUERY_LEN},
    Latencies, LatencySummary,
};

/// Queries per `sendmmsg` at most (a socket's share of one tick).
const SEND_BATCH: usize = 16;
/// Datagrams per `recvmmsg`.
const RECV_BATCH: usize = 64;
/// DNS ids per socket: a slot per id.
const IDS: usize = 1 << 16;
/// Receive and send buffers of each socket.
const SOCKET_BUFFER: i32 = 1 << 20;
const TICK: Duration = Duration::from_millis(1);

#[derive(Debug, Args)]
pub struct BlastArgs {
    /// The DNS server (the service VIP).
    #[arg(long, default_value_t = super::service())]
    pub server: SocketAddr,
    /// Connected UDP sockets.
    #[arg(long, default_value_t = 64, value_parser = clap::value_parser!(u16).range(1..=1024))]
    pub sockets: u16,
    /// Queries per second.
    #[arg(long, value_parser = parse_rate)]
    pub rate: u32,
    /// Length of the sending window.
    #[arg(long, value_parser = parse_seconds)]
    pub seconds: u32,
    /// How long answers are still awaited after the window, in ms.
    #[arg(long, default_value_t = 2000, value_parser = clap::value_parser!(u32).range(0..=30_000))]
    pub linger_ms: u32,
    /// Pin to this CPU.
    #[arg(long)]
    pub cpu: Option<usize>,
}

/// What the generator sent and got back.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct BlastReport {
    pub sockets: u16,
    pub rate: u32,
    pub seconds: u32,
    pub cpu: Option<usize>,
    /// `rate * seconds`.
    pub planned: u64,
    /// Queries the kernel took.
    pub sent: u64,
    /// Queries the kernel refused (`sendmmsg` errors).
    pub refused: u64,
    /// Queries answered (NOERROR with a record, or otherwise: see `negative`).
    pub answered: u64,
    /// Answered queries whose answer was not NOERROR with a record.
    pub negative: u64,
    /// Queries without an answer at the end.
    pub unanswered: u64,
    /// Replies that matched no outstanding query.
    pub unmatched: u64,
    /// From the first send to the end of the window, in seconds.
    pub window_s: f64,
    pub latency: LatencySummary,
    /// Datagrams the client's network namespace dropped at full receive buffers.
    pub rcvbuf_errors: Option<u64>,
}

struct Blaster {
    fds: Vec<RawFd>,
    /// Per socket and DNS id: `(sent µs since start) << 32 | (seq + 1)`, 0 when free.
    slots: Vec<u64>,
    outstanding: u64,
    start: Instant,
    latencies: Latencies,
    rx: Batch,
    report: BlastReport,
}

impl Blaster {
    fn now_us(&self) -> u64 {
        u64::try_from(self.start.elapsed().as_micros()).unwrap_or(u64::MAX)
    }

    /// Sends queries `seq..seq + n` round-robin over the sockets.
    fn send(&mut self, batches: &mut [Batch], mut seq: u64, n: u64) {
        let sockets = self.fds.len() as u64;
        let sent_us = self.now_us().min(u64::from(u32::MAX)) << 32;
        let mut fill = vec![0usize; self.fds.len()];
        for _ in 0..n {
            let s = (seq % sockets) as usize;
            if fill[s] == SEND_BATCH {
                self.flush(&mut batches[s], s, fill[s]);
                fill[s] = 0;
            }
            let id = ((seq / sockets) % IDS as u64) as u16;
            if let Some(q) = batches[s].buf_mut(fill[s]).first_chunk_mut::<QUERY_LEN>() {
                wire::write_query(q, id, seq);
            }
            batches[s].set_len(fill[s], QUERY_LEN);
            let slot = &mut self.slots[s * IDS + usize::from(id)];
            if *slot != 0 {
                // Its id came round again (after IDS * sockets queries): it never got an
                // answer.
                self.report.unanswered += 1;
                self.outstanding -= 1;
            }
            *slot = sent_us | (seq + 1);
            self.outstanding += 1;
            fill[s] += 1;
            seq += 1;
        }
        for (s, n) in fill.into_iter().enumerate() {
            if n > 0 {
                self.flush(&mut batches[s], s, n);
            }
        }
    }

    fn flush(&mut self, batch: &mut Batch, s: usize, n: usize) {
        let (sent, refused) = batch.send(self.fds[s], n, false);
        self.report.sent += sent as u64;
        self.report.refused += refused as u64;
        for i in (0..n).filter(|&i| refused > 0 && batch.was_refused(i)) {
            if let Some(id) = batch.msg(i).first_chunk::<2>() {
                let slot = &mut self.slots[s * IDS + usize::from(u16::from_be_bytes(*id))];
                if *slot != 0 {
                    *slot = 0;
                    self.outstanding -= 1;
                }
            }
        }
    }

    /// Reads every answer waiting on socket `s`.
    fn drain(&mut self, s: usize) -> io::Result<()> {
        // Bounded: a socket holds at most SOCKET_BUFFER bytes of answers.
        for _ in 0..(SOCKET_BUFFER as usize / 64 / RECV_BATCH + 1) {
            let n = self.rx.recv(self.fds[s], libc::MSG_DONTWAIT, false)?;
            let now = self.now_us();
            for i in 0..n {
                self.answer(s, i, now);
            }
            if n < RECV_BATCH {
                break;
            }
        }
        Ok(())
    }

    fn answer(&mut self, s: usize, i: usize, now_us: u64) {
        let Some(r) = wire::parse_reply(self.rx.msg(i)) else {
            self.report.unmatched += 1;
            return;
        };
        let slot = &mut self.slots[s * IDS + usize::from(r.id)];
        let v = *slot;
        if v == 0 || r.seq != Some((v & 0xffff_ffff) - 1) {
            self.report.unmatched += 1;
            return;
        }
        *slot = 0;
        self.outstanding -= 1;
        self.report.answered += 1;
        if r.rcode != 0 || r.ancount == 0 {
            self.report.negative += 1;
        }
        self.latencies.add(now_us.saturating_sub(v >> 32));
    }

    /// Waits for answers until `until`, reading them as they come.
    fn wait(&mut self, until: Instant) -> Result<()> {
        let mut pfds: Vec<libc::pollfd> = self
            .fds
            .iter()
            .map(|&fd| libc::pollfd {
                fd,
                events: libc::POLLIN,
                revents: 0,
            })
            .collect();
        // Each pass either reads what came or ends at `until`; the count bounds a storm.
        for _ in 0..10_000 {
            let left = until.saturating_duration_since(Instant::now());
            let ts = libc::timespec {
                tv_sec: left.as_secs() as libc::time_t,
                tv_nsec: left.subsec_nanos() as libc::c_long,
            };
            // SAFETY: `pfds` is a live array of pollfd of the given length; `ts` a valid
            // timespec; no signal mask.
            let rc = unsafe {
                libc::ppoll(
                    pfds.as_mut_ptr(),
                    pfds.len() as libc::nfds_t,
                    &ts,
                    std::ptr::null(),
                )
            };
            if rc < 0 {
                let e = io::Error::last_os_error();
                if e.kind() != io::ErrorKind::Interrupted {
                    return Err(e).context("ppoll");
                }
            }
            for (s, p) in pfds.iter().enumerate() {
                if p.revents != 0 {
                    self.drain(s).context("recvmmsg")?;
                }
            }
            if rc <= 0 && left.is_zero() || Instant::now() >= until {
                break;
            }
        }
        Ok(())
    }
}

/// `tracer load-gen blast`: prints one [`BlastReport`] as a JSON line.
pub fn run(a: &BlastArgs) -> Result<()> {
    let cpu = child_prologue(b"load-blast\0", a.cpu)?;
    let planned = u64::from(a.rate) * u64::from(a.seconds);
    ensure!(
        planned < wire::SEQ_LIMIT,
        "{planned} queries: too many for the names"
    );
    let mut socks = Vec::with_capacity(a.sockets.into());
    for _ in 0..a.sockets {
        let bind: SocketAddr = ([0, 0, 0, 0], 0).into();
        let s = UdpSocket::bind(bind).context("UDP socket")?;
        s.connect(a.server)
            .with_context(|| format!("connecting to {}", a.server))?;
        s.set_nonblocking(true)?;
        wire::set_buffers(s.as_raw_fd(), SOCKET_BUFFER).context("socket buffers")?;
        socks.push(s);
    }
    let mut batches: Vec<Batch> = (0..a.sockets).map(|_| Batch::new(SEND_BATCH)).collect();
    let rcvbuf_before = wire::udp_rcvbuf_errors();
    let mut b = Blaster {
        fds: socks.iter().map(|s| s.as_raw_fd()).collect(),
        slots: vec![0; usize::from(a.sockets) * IDS],
        outstanding: 0,
        start: Instant::now(),
        latencies: Latencies::new(),
        rx: Batch::new(RECV_BATCH),
        report: BlastReport {
            sockets: a.sockets,
            rate: a.rate,
            seconds: a.seconds,
            cpu,
            planned,
            ..BlastReport::default()
        },
    };
    let window = Duration::from_secs(a.seconds.into());
    let per_tick_cap = (u64::from(a.rate) / 1000 * 4).max(64);
    let mut seq = 0u64;
    let start = b.start;
    // One pass per tick: bounded by the window (time) and by `planned` (count).
    while seq < planned {
        let elapsed = start.elapsed();
        if elapsed >= window {
            break;
        }
        // The queries due by the end of this tick, so the last tick completes the window.
        let due = (u128::from(a.rate) * (elapsed + TICK).as_nanos() / 1_000_000_000) as u64;
        let n = due.min(planned).saturating_sub(seq).min(per_tick_cap);
        b.send(&mut batches, seq, n);
        seq += n;
        let ticks = (start.elapsed().as_nanos() / TICK.as_nanos()) as u32 + 1;
        b.wait(start + TICK * ticks)?;
    }
    b.report.window_s = start.elapsed().as_secs_f64().min(window.as_secs_f64());
    let linger_end = Instant::now() + Duration::from_millis(a.linger_ms.into());
    while b.outstanding > 0 && Instant::now() < linger_end {
        b.wait(linger_end.min(Instant::now() + Duration::from_millis(10)))?;
    }
    b.report.unanswered += b.outstanding;
    b.report.latency = b.latencies.summary();
    b.report.rcvbuf_errors = wire::udp_rcvbuf_errors()
        .zip(rcvbuf_before)
        .map(|(a, b)| a.saturating_sub(b));
    drop(socks);
    println!("{}", serde_json::to_string(&b.report)?);
    Ok(())
}

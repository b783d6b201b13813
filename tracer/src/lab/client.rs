//! The lab's DNS clients as separate processes: `tracer lab-client race|resolver ...`
//! (a hidden subcommand) runs inside a pod's network namespace (`ip netns exec`) and,
//! with the lab's cgroup hook, inside that pod's kubelet-like cgroup, so that the tracer
//! can name the pod that sent each query from the sender's cgroup. Each child writes one
//! JSON report on stdout and exits 0 (non-zero, with the reason on stderr, on any error).
//!
//! Two clients:
//! - `race` ([`run_race`]): the A/AAAA race on one socket of [`traffic::udp_race_named`]
//!   (two pinned threads, one `send()` each at the same moment), in the child's own netns.
//! - `resolver` ([`run_resolvers`]): one process per pod, behaving like glibc's stub
//!   resolver with `options timeout:T attempts:N`: per round a UDP socket bound to a
//!   source port (the same in every pod), connected to the server, A and AAAA in one
//!   `sendmmsg`, up to `timeout` for both answers, then the unanswered ones again on the
//!   same socket with the same ids, up to `attempts` tries. The pods' first datagrams of a
//!   round leave at the same instant, so they race in the node's SNAT.
//!
//! How the resolver processes start a round together: the parent makes a private
//! directory (`<tmp>/ctlab-<pid>-clients-<n>`, mode 0700) with a one-page file that every
//! child maps `MAP_SHARED`, holding atomics (`SyncArea`): a `ready` and a `done`
//! counter the children bump, and a round generation `go` plus a start instant
//! (`CLOCK_MONOTONIC`, a few ms ahead) that the parent publishes once every child is
//! ready. Waits on them are futex waits in 10 ms slices. Each child is pinned to a CPU
//! (pod i to the i-th allowed CPU, round robin), sleeps until shortly before the start
//! instant and spins for the last millisecond. With more pods than CPUs the first pod on
//! each CPU races and the others go right after those have sent (as in
//! [`traffic::snat_race_with`]). Measured on 2 vCPUs: the racing pods' first datagrams
//! leave a median 0.2-1 µs apart.
//!
//! Every wait is bounded, on both sides. A child dies with its parent (`PR_SET_PDEATHSIG`)
//! and gives up with an error when the parent is gone or a round does not start in time;
//! the parent ends every child by its pid (SIGKILL) and reaps it on any error, timeout or
//! panic (a guard), and removes the directory.
//!
//! The program the children run is chosen by the caller's `Command`: `tracer lab` uses
//! [`client_program`], i.e. it must itself be the `tracer` binary; tests that call these
//! functions from a test binary pass `env!("CARGO_BIN_EXE_tracer")` instead.

use std::{
    ffi::OsString,
    fs::{self, File, OpenOptions},
    io::{self, Write as _},
    net::SocketAddr,
    ops::Deref,
    os::{
        fd::{AsRawFd as _, OwnedFd, RawFd},
        unix::fs::{DirBuilderExt as _, OpenOptionsExt as _},
    },
    path::{Path, PathBuf},
    process::{Child, Command, ExitStatus, Stdio},
    ptr::NonNull,
    sync::atomic::{AtomicU32, AtomicU64, Ordering},
    time::{Duration, Instant},
};

use anyhow::{bail, ensure, Context as _, Result};
use log::warn;
use serde::{Deserialize, Serialize};

use super::topology::PREFIX;
use crate::{
    netns,
    traffic::{self, LatencyStats, RaceReport, QTYPE_A, QTYPE_AAAA},
};

/// The hidden subcommand of the `tracer` binary that runs a client.
pub const SUBCOMMAND: &str = "lab-client";
/// Upper bound for [`ResolverParams::attempts`].
pub const MAX_ATTEMPTS: u32 = 10;
/// Upper bound for the number of resolver processes.
pub const MAX_PODS: usize = traffic::MAX_CLIENTS;
/// How many consecutive source ports the rounds go through (see [`ResolverParams::port_for`]).
pub const PORT_SPAN: u16 = traffic::DEFAULT_ROTATE_PORT;

/// How long the parent waits for every child to be ready for the first round (process
/// start included).
const FIRST_READY_LIMIT: Duration = Duration::from_secs(10);
/// Added to every other bound of a round (scheduling, process exit).
const SLACK: Duration = Duration::from_secs(2);
/// How far ahead of "now" the parent puts a round's start instant.
const START_LEAD: Duration = Duration::from_millis(3);
/// A child refuses a start instant further away than this.
const MAX_LEAD: Duration = Duration::from_secs(2);
/// A racing child spins (instead of sleeping) for this long before the start instant.
const SPIN_WINDOW: Duration = Duration::from_micros(1000);
/// How long after the start instant a non-racing child waits for the racers of its round
/// to have sent, at most.
const NON_RACER_WAIT: Duration = Duration::from_millis(20);
/// Longest single futex wait / poll nap, so that exits and deadlines are seen promptly.
const SLICE: Duration = Duration::from_millis(10);
/// How long to wait for the children to exit after their last round.
const EXIT_LIMIT: Duration = Duration::from_secs(5);
/// How long a killed child may take to be reaped.
const KILL_WAIT: Duration = Duration::from_secs(3);
/// Per-round allowance of the race child on top of its timeout (socket, threads).
const RACE_ROUND_OVERHEAD: Duration = Duration::from_millis(100);
/// Size of the shared file (one page).
const SYNC_LEN: usize = 4096;
const SYNC_MAGIC: u64 = 0x6374_6c61_6273_796e; // "ctlabsyn"
/// How much of a failed child's stderr goes into the error.
const STDERR_TAIL: usize = 2000;

/// The program `tracer lab` runs the clients with: this executable, which must be the
/// `tracer` binary (it has the hidden [`SUBCOMMAND`]).
pub fn client_program() -> Result<PathBuf> {
    std::env::current_exe().context("finding this executable (the lab clients re-run it)")
}

// ---------------------------------------------------------------------------------------
// Requests: what a child is asked to do, and its command line

/// What the parent asks a child to do (built from `tracer lab-client ...` by the CLI).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Request {
    Race(RaceRequest),
    Resolver(ResolverRequest),
}

/// `tracer lab-client race`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RaceRequest {
    pub server: SocketAddr,
    pub qname: String,
    pub rounds: u32,
    pub timeout: Duration,
}

/// What every resolver process of one [`run_resolvers`] call does.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ResolverParams {
    /// The DNS server (each pod must reach it; through the node's SNAT for the race).
    pub server: SocketAddr,
    /// The name queried (A and AAAA) every round.
    pub qname: String,
    /// Source port of round 0, shared by every pod; round r uses
    /// [`ResolverParams::port_for`]. 0: ephemeral ports (each pod's kernel picks one).
    pub base_port: u16,
    pub rounds: u32,
    /// How long one try waits for the answers (glibc's `timeout:`).
    pub timeout: Duration,
    /// Tries per query, the first included (glibc's `attempts:`), 1..=[`MAX_ATTEMPTS`].
    pub attempts: u32,
}

impl ResolverParams {
    /// The source port of `round`: `base_port + round mod span` with
    /// `span = min(`[`PORT_SPAN`]`, 65536 - base_port)`, the same for every pod, like
    /// [`traffic::SnatOptions::rotate_port`] (a fresh flow every round, so every round is
    /// a new NAT decision rather than a match of last round's entry); `None` with
    /// `base_port` 0.
    pub fn port_for(&self, round: u32) -> Option<u16> {
        if self.base_port == 0 {
            return None;
        }
        let span = u32::from(PORT_SPAN).min(65536 - u32::from(self.base_port));
        Some(self.base_port + (round % span) as u16)
    }

    /// Checks the ranges (rounds, timeout, attempts, the name).
    pub fn validate(&self) -> Result<()> {
        traffic::check_rounds(self.rounds, self.timeout)?;
        ensure!(
            (1..=MAX_ATTEMPTS).contains(&self.attempts),
            "attempts must be 1..={MAX_ATTEMPTS}, got {}",
            self.attempts
        );
        traffic::dns_query(0, &self.qname, QTYPE_A)?;
        Ok(())
    }

    /// Longest a round may take for one child: every try's timeout.
    fn round_time(&self) -> Duration {
        self.timeout.saturating_mul(self.attempts)
    }
}

/// `tracer lab-client resolver`: one pod's process of [`run_resolvers`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ResolverRequest {
    pub params: ResolverParams,
    /// The shared file made by the parent.
    pub sync: PathBuf,
    /// This pod's index, 0..pods.
    pub pod: usize,
    /// How many pods take part.
    pub pods: usize,
}

fn timeout_us(d: Duration) -> String {
    d.as_micros().to_string()
}

impl RaceRequest {
    /// The arguments after the program: `lab-client race --server ...`.
    pub fn args(&self) -> Vec<OsString> {
        let mut v: Vec<OsString> = [SUBCOMMAND, "race", "--server"].map(OsString::from).into();
        v.push(self.server.to_string().into());
        v.push("--qname".into());
        v.push(self.qname.clone().into());
        v.push("--rounds".into());
        v.push(self.rounds.to_string().into());
        v.push("--timeout-us".into());
        v.push(timeout_us(self.timeout).into());
        v
    }
}

impl ResolverRequest {
    /// The arguments after the program: `lab-client resolver --server ...`.
    pub fn args(&self) -> Vec<OsString> {
        let p = &self.params;
        let mut v: Vec<OsString> = [SUBCOMMAND, "resolver"].map(OsString::from).into();
        for (k, val) in [
            ("--server", p.server.to_string()),
            ("--qname", p.qname.clone()),
            ("--base-port", p.base_port.to_string()),
            ("--rounds", p.rounds.to_string()),
            ("--timeout-us", timeout_us(p.timeout)),
            ("--attempts", p.attempts.to_string()),
            ("--pod", self.pod.to_string()),
            ("--pods", self.pods.to_string()),
        ] {
            v.push(k.into());
            v.push(val.into());
        }
        v.push("--sync".into());
        v.push(self.sync.clone().into_os_string());
        v
    }
}

// ---------------------------------------------------------------------------------------
// Reports

/// DNS query type of a [`ResolverQuery`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum QType {
    A,
    #[serde(rename = "AAAA")]
    Aaaa,
}

impl QType {
    fn code(self) -> u16 {
        match self {
            QType::A => QTYPE_A,
            QType::Aaaa => QTYPE_AAAA,
        }
    }
}

/// One query of one round of one pod.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ResolverQuery {
    pub qtype: QType,
    pub id: u16,
    /// When its first try went out, after the round's common start instant (ns). The
    /// spread of this over the pods is how closely they raced.
    pub sent_ns: u64,
    /// Tries made: 1 = no retry; more = it needed a retry (its earlier tries got no
    /// answer within the timeout).
    pub attempts: u32,
    pub answered: bool,
    /// From its first try to its answer (with a retry: at least the timeout).
    pub latency_us: Option<u64>,
    pub rcode: Option<u8>,
    pub answers: Option<u16>,
    /// The last error a send of it returned (EPERM: netfilter dropped it on the way out).
    pub send_error: Option<String>,
}

impl ResolverQuery {
    /// It needed a retry.
    pub fn retried(&self) -> bool {
        self.attempts > 1
    }
}

/// One round of one pod.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ResolverRound {
    pub round: u32,
    /// The source port bound (None: ephemeral).
    pub src_port: Option<u16>,
    /// The socket's local address inside the pod (before the node's SNAT).
    pub local: Option<SocketAddr>,
    /// CPU the process ran on at the first send.
    pub cpu: Option<u32>,
    pub a: ResolverQuery,
    pub aaaa: ResolverQuery,
}

/// What one pod's process reports (its stdout).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ResolverPod {
    pub pod: usize,
    /// The CPU it was pinned to.
    pub cpu: Option<usize>,
    /// It spun to the start instant (the first pod on each CPU) rather than going right
    /// after the racers.
    pub racer: bool,
    pub rounds: Vec<ResolverRound>,
}

/// Result of [`run_resolvers`].
#[derive(Debug, Clone, Serialize)]
pub struct ResolverReport {
    pub server: SocketAddr,
    pub qname: String,
    pub pods: usize,
    /// The source port of round 0, shared by every pod (None: ephemeral ports).
    pub base_port: Option<u16>,
    pub rounds: u32,
    pub timeout_ms: f64,
    /// Tries per query at most.
    pub attempts: u32,
    /// Queries (2 per pod per round).
    pub queries_sent: u64,
    /// Datagrams, retries included.
    pub datagrams_sent: u64,
    pub answered: u64,
    /// Queries that needed a retry (no answer to the first try within the timeout).
    pub lost_first_try: u64,
    /// Queries still unanswered after every try.
    pub unanswered: u64,
    /// Queries a send of which failed.
    pub send_errors: u64,
    /// Pod-rounds with at least one retried query.
    pub rounds_with_retry: u64,
    /// Of the answered queries.
    pub latency: Option<LatencyStats>,
    /// Of the answered queries that needed a retry.
    pub retried_latency: Option<LatencyStats>,
    /// Latency of every answered query (µs), pod by pod, round by round, A then AAAA.
    pub latencies_us: Vec<u64>,
    /// Per round, the time between the first and the last racing pod's first send; the
    /// median and the maximum over the rounds.
    pub median_start_spread_ns: Option<u64>,
    pub max_start_spread_ns: Option<u64>,
    pub elapsed_ms: u64,
    pub per_pod: Vec<ResolverPod>,
}

fn aggregate(params: &ResolverParams, pods: Vec<ResolverPod>, elapsed: Duration) -> ResolverReport {
    let mut r = ResolverReport {
        server: params.server,
        qname: params.qname.clone(),
        pods: pods.len(),
        base_port: params.port_for(0),
        rounds: params.rounds,
        timeout_ms: params.timeout.as_secs_f64() * 1000.0,
        attempts: params.attempts,
        queries_sent: 0,
        datagrams_sent: 0,
        answered: 0,
        lost_first_try: 0,
        unanswered: 0,
        send_errors: 0,
        rounds_with_retry: 0,
        latency: None,
        retried_latency: None,
        latencies_us: Vec::new(),
        median_start_spread_ns: None,
        max_start_spread_ns: None,
        elapsed_ms: u64::try_from(elapsed.as_millis()).unwrap_or(u64::MAX),
        per_pod: Vec::new(),
    };
    let mut retried_lat = Vec::new();
    for pod in &pods {
        for round in &pod.rounds {
            r.rounds_with_retry += u64::from(round.a.retried() || round.aaaa.retried());
            for q in [&round.a, &round.aaaa] {
                r.queries_sent += 1;
                r.datagrams_sent += u64::from(q.attempts);
                r.answered += u64::from(q.answered);
                r.unanswered += u64::from(!q.answered);
                r.lost_first_try += u64::from(q.retried());
                r.send_errors += u64::from(q.send_error.is_some());
                if let Some(l) = q.latency_us {
                    r.latencies_us.push(l);
                    if q.retried() {
                        retried_lat.push(l);
                    }
                }
            }
        }
    }
    let mut spreads: Vec<u64> = (0..params.rounds as usize)
        .filter_map(|i| {
            let sent = pods
                .iter()
                .filter(|p| p.racer)
                .filter_map(|p| p.rounds.get(i))
                .map(|x| x.a.sent_ns.min(x.aaaa.sent_ns));
            let (lo, hi) = sent.fold((u64::MAX, 0), |(lo, hi), s| (lo.min(s), hi.max(s)));
            hi.checked_sub(lo)
        })
        .collect();
    spreads.sort_unstable();
    r.median_start_spread_ns = spreads.get(spreads.len() / 2).copied();
    r.max_start_spread_ns = spreads.last().copied();
    r.latency = LatencyStats::of(&mut r.latencies_us.clone());
    r.retried_latency = LatencyStats::of(&mut retried_lat);
    r.per_pod = pods;
    r
}

// ---------------------------------------------------------------------------------------
// Parent side

/// Runs the A/AAAA race ([`traffic::udp_race_named`]) in a child process: `cmd` runs the
/// `tracer` binary inside a pod (e.g. `pod.command(client_program()?)` with the cgroup
/// hook applied); this adds the `lab-client race ...` arguments and stdio, waits for it
/// (at most `rounds * (timeout + 100 ms) + 2 s`) and returns its report. The child is
/// killed (by pid) and reaped on any error, also on a panic.
pub fn run_race(
    cmd: Command,
    server: SocketAddr,
    qname: &str,
    rounds: u32,
    timeout: Duration,
) -> Result<RaceReport> {
    traffic::check_rounds(rounds, timeout)?;
    traffic::dns_query(0, qname, QTYPE_A)?;
    let req = RaceRequest {
        server,
        qname: qname.to_string(),
        rounds,
        timeout,
    };
    let dir = WorkDir::create()?;
    let mut kids = Children::new("race client");
    let mut cmd = cmd;
    cmd.args(req.args());
    kids.spawn(0, cmd, dir.path())?;
    let limit = (timeout + RACE_ROUND_OVERHEAD).saturating_mul(rounds) + SLACK;
    let out = kids.finish(limit)?;
    let report: RaceReport = serde_json::from_str(out[0].trim()).with_context(|| {
        format!(
            "race client: its report ({} bytes) is not valid JSON",
            out[0].len()
        )
    })?;
    drop(kids);
    drop(dir);
    Ok(report)
}

/// The SNAT port race with resolver-like clients: `pods` processes, process i made by
/// `make(i)` (a `Command` that runs the `tracer` binary inside pod i's netns and cgroup,
/// e.g. `pods[i].command(client_program()?)` plus the cgroup hook; this adds the
/// `lab-client resolver ...` arguments and stdio). Each round starts in every pod at the
/// same instant (see the module documentation), so with a shared source port the pods'
/// first datagrams race in the node's SNAT, and a query whose datagram the node drops is
/// answered only after a retry.
///
/// Bounded: the first round waits at most 10 s for the processes to start; every round
/// at most `timeout * attempts + 2 s`; the exits 5 s. Any child that fails (or is killed)
/// ends the call with an error (its stderr included) within ~10 ms; every child is
/// killed by its pid and reaped, and the temporary directory removed, on every path.
pub fn run_resolvers(
    pods: usize,
    mut make: impl FnMut(usize) -> Command,
    params: &ResolverParams,
) -> Result<ResolverReport> {
    params.validate()?;
    ensure!(
        (1..=MAX_PODS).contains(&pods),
        "need 1..={MAX_PODS} pods, got {pods}"
    );
    let started = Instant::now();
    let dir = WorkDir::create()?;
    let sync_path = dir.path().join("sync");
    let map = SyncMap::create(&sync_path, pods)?;
    let mut kids = Children::new("resolver client");
    for pod in 0..pods {
        let req = ResolverRequest {
            params: params.clone(),
            sync: sync_path.clone(),
            pod,
            pods,
        };
        let mut cmd = make(pod);
        cmd.args(req.args());
        kids.spawn(pod, cmd, dir.path())?;
    }
    let area = map.area();
    let n = pods as u32;
    let round_limit = params.round_time() + SLACK;
    for round in 0..params.rounds {
        let target = n * (round + 1);
        let ready_limit = if round == 0 { FIRST_READY_LIMIT } else { SLACK };
        kids.wait_counter(&area.ready, target, ready_limit, || {
            format!("round {round}: pods ready to send")
        })?;
        let start = mono_ns() + nanos(START_LEAD);
        area.start.start_ns.store(start, Ordering::Relaxed);
        area.start.go.store(round + 1, Ordering::Release);
        futex_wake(&area.start.go);
        kids.wait_counter(&area.done, target, round_limit, || {
            format!("round {round}: pods done")
        })?;
    }
    let outputs = kids.finish(EXIT_LIMIT)?;
    drop(kids);
    drop(map);
    drop(dir);
    let mut reports = Vec::with_capacity(pods);
    for (pod, out) in outputs.iter().enumerate() {
        let r: ResolverPod = serde_json::from_str(out.trim())
            .with_context(|| format!("resolver client {pod}: its report is not valid JSON"))?;
        ensure!(
            r.pod == pod && r.rounds.len() == params.rounds as usize,
            "resolver client {pod}: report of pod {} with {} of {} rounds",
            r.pod,
            r.rounds.len(),
            params.rounds
        );
        reports.push(r);
    }
    Ok(aggregate(params, reports, started.elapsed()))
}

/// A private temporary directory (`<tmp>/ctlab-<pid>-clients-<n>`), removed on drop.
struct WorkDir(PathBuf);

impl WorkDir {
    fn create() -> Result<WorkDir> {
        static COUNTER: AtomicU64 = AtomicU64::new(0);
        let tmp = std::env::temp_dir();
        for _ in 0..1000 {
            let n = COUNTER.fetch_add(1, Ordering::Relaxed);
            let dir = tmp.join(format!("{PREFIX}-{}-clients-{n}", std::process::id()));
            match fs::DirBuilder::new().mode(0o700).create(&dir) {
                Ok(()) => return Ok(WorkDir(dir)),
                Err(e) if e.kind() == io::ErrorKind::AlreadyExists => continue,
                Err(e) => return Err(e).with_context(|| format!("creating {}", dir.display())),
            }
        }
        bail!(
            "no free name for a temporary directory in {}",
            tmp.display()
        )
    }

    fn path(&self) -> &Path {
        &self.0
    }
}

impl Drop for WorkDir {
    fn drop(&mut self) {
        if let Err(e) = fs::remove_dir_all(&self.0) {
            warn!("removing {}: {e}", self.0.display());
        }
    }
}

/// One child process and where its output goes.
struct Proc {
    index: usize,
    child: Child,
    cmdline: String,
    stdout: PathBuf,
    stderr: PathBuf,
    status: Option<ExitStatus>,
}

impl Proc {
    fn poll(&mut self) -> Option<ExitStatus> {
        if self.status.is_none() {
            match self.child.try_wait() {
                Ok(s) => self.status = s,
                Err(e) => warn!("waiting for pid {}: {e}", self.child.id()),
            }
        }
        self.status
    }

    fn failure(&self, what: &str, status: ExitStatus) -> anyhow::Error {
        let err = fs::read_to_string(&self.stderr).unwrap_or_default();
        let err = err.trim();
        let tail = match err.char_indices().rev().nth(STDERR_TAIL) {
            Some((i, _)) => &err[i..],
            None => err,
        };
        let hint = if err.contains("unrecognized subcommand") {
            " (is the program the `tracer` binary? see lab::client::client_program)"
        } else {
            ""
        };
        anyhow::anyhow!(
            "{what} {} (pid {}, `{}`) ended with {status}{hint}; stderr: {}",
            self.index,
            self.child.id(),
            self.cmdline,
            if tail.is_empty() { "(empty)" } else { tail }
        )
    }
}

/// The children of one run, killed by pid (SIGKILL) and reaped on drop unless they have
/// exited and been reaped already.
struct Children {
    what: &'static str,
    procs: Vec<Proc>,
}

impl Children {
    fn new(what: &'static str) -> Children {
        Children {
            what,
            procs: Vec::new(),
        }
    }

    /// Starts `cmd` with stdin from /dev/null and stdout/stderr into files in `dir`.
    fn spawn(&mut self, index: usize, mut cmd: Command, dir: &Path) -> Result<()> {
        let stdout = dir.join(format!("client-{index}.json"));
        let stderr = dir.join(format!("client-{index}.err"));
        let create = |p: &Path| {
            OpenOptions::new()
                .write(true)
                .create_new(true)
                .mode(0o600)
                .open(p)
                .with_context(|| format!("creating {}", p.display()))
        };
        cmd.stdin(Stdio::null())
            .stdout(create(&stdout)?)
            .stderr(create(&stderr)?);
        let cmdline = netns::render_command(&cmd);
        let child = cmd
            .spawn()
            .with_context(|| format!("{} {index}: could not start `{cmdline}`", self.what))?;
        self.procs.push(Proc {
            index,
            child,
            cmdline,
            stdout,
            stderr,
            status: None,
        });
        Ok(())
    }

    /// The error of the first child that has exited unsuccessfully, if any.
    fn failed(&mut self) -> Option<anyhow::Error> {
        let what = self.what;
        self.procs.iter_mut().find_map(|p| match p.poll() {
            Some(s) if !s.success() => Some(p.failure(what, s)),
            _ => None,
        })
    }

    /// Waits until `word >= target`, at most `limit`; fails as soon as a child fails.
    fn wait_counter(
        &mut self,
        word: &AtomicU32,
        target: u32,
        limit: Duration,
        what: impl Fn() -> String,
    ) -> Result<()> {
        let deadline = Instant::now() + limit;
        loop {
            let v = word.load(Ordering::Acquire);
            if v >= target {
                return Ok(());
            }
            if let Some(e) = self.failed() {
                return Err(e.context(what()));
            }
            let now = Instant::now();
            if now >= deadline {
                let alive: Vec<usize> = self
                    .procs
                    .iter_mut()
                    .filter_map(|p| p.poll().is_none().then_some(p.index))
                    .collect();
                bail!(
                    "{}: {}: {} of {target} after {limit:?} (still running: {alive:?})",
                    self.what,
                    what(),
                    v
                );
            }
            futex_wait(word, v, SLICE.min(deadline - now));
        }
    }

    /// Waits (at most `limit`) for every child to exit; each must succeed. Returns their
    /// stdout, in spawn order.
    fn finish(&mut self, limit: Duration) -> Result<Vec<String>> {
        let deadline = Instant::now() + limit;
        loop {
            if let Some(e) = self.failed() {
                return Err(e);
            }
            if self.procs.iter_mut().all(|p| p.poll().is_some()) {
                break;
            }
            ensure!(
                Instant::now() < deadline,
                "{}: not finished within {limit:?}",
                self.what
            );
            std::thread::sleep(SLICE.min(Duration::from_millis(2)));
        }
        self.procs
            .iter()
            .map(|p| {
                fs::read_to_string(&p.stdout)
                    .with_context(|| format!("reading {}", p.stdout.display()))
            })
            .collect()
    }

    /// SIGKILL to every child not reaped yet, by pid (each is unreaped, so its pid can not
    /// have been reused), then reaps them, together at most [`KILL_WAIT`].
    fn kill_all(&mut self) {
        for p in &mut self.procs {
            if p.poll().is_none() {
                if let Err(e) = p.child.kill() {
                    warn!("killing pid {}: {e}", p.child.id());
                }
            }
        }
        let deadline = Instant::now() + KILL_WAIT;
        while self.procs.iter_mut().any(|p| p.poll().is_none()) {
            if Instant::now() >= deadline {
                for p in self.procs.iter_mut() {
                    if p.poll().is_some() {
                        continue;
                    }
                    warn!(
                        "{} {} (pid {}) survived SIGKILL for {KILL_WAIT:?}",
                        self.what,
                        p.index,
                        p.child.id()
                    );
                }
                return;
            }
            std::thread::sleep(Duration::from_millis(1));
        }
    }
}

impl Drop for Children {
    fn drop(&mut self) {
        self.kill_all();
    }
}

// ---------------------------------------------------------------------------------------
// The shared file

/// One cache line, so that counters bumped by different CPUs do not share one.
#[repr(C, align(64))]
struct Line<T>(T);

impl<T> Deref for Line<T> {
    type Target = T;
    fn deref(&self) -> &T {
        &self.0
    }
}

#[repr(C)]
struct Head {
    magic: AtomicU64,
    parent_pid: AtomicU32,
    pods: AtomicU32,
}

#[repr(C)]
struct Start {
    /// Rounds released so far (round r may start once it is r + 1); a futex word.
    go: AtomicU32,
    /// The released round's start instant, CLOCK_MONOTONIC ns; written before `go`.
    start_ns: AtomicU64,
}

/// The layout of the shared file. Every field is an atomic integer, for which the file's
/// initial zeros are valid values; counters are cumulative over the rounds (round r is
/// complete at `pods * (r + 1)`).
#[repr(C)]
struct SyncArea {
    head: Line<Head>,
    start: Line<Start>,
    /// Children ready for the next round (socket bound, queries built); a futex word.
    ready: Line<AtomicU32>,
    /// Children done with their round; a futex word.
    done: Line<AtomicU32>,
    /// Racing children that have sent their round's first datagrams.
    fired: Line<AtomicU32>,
}

const _: () = assert!(std::mem::size_of::<SyncArea>() <= SYNC_LEN);

/// The shared file, mapped `MAP_SHARED`; unmapped on drop.
struct SyncMap {
    ptr: NonNull<SyncArea>,
}

// SAFETY: the mapping is only ever reached through `&SyncArea`, whose fields are all
// atomics (Sync), and it is unmapped only on drop, when no borrow of it is left.
unsafe impl Send for SyncMap {}
// SAFETY: as above.
unsafe impl Sync for SyncMap {}

impl SyncMap {
    /// Parent: creates the file (which must not exist) and fills in the header.
    fn create(path: &Path, pods: usize) -> Result<SyncMap> {
        let f = OpenOptions::new()
            .read(true)
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(path)
            .with_context(|| format!("creating {}", path.display()))?;
        f.set_len(SYNC_LEN as u64)?;
        let map = SyncMap::map(&f, path)?;
        let head = &map.area().head;
        head.parent_pid.store(std::process::id(), Ordering::Relaxed);
        head.pods.store(pods as u32, Ordering::Relaxed);
        head.magic.store(SYNC_MAGIC, Ordering::Release);
        Ok(map)
    }

    /// Child: maps the parent's file and checks its header.
    fn open(path: &Path, pods: usize) -> Result<SyncMap> {
        let f = OpenOptions::new()
            .read(true)
            .write(true)
            .open(path)
            .with_context(|| format!("opening the sync file {}", path.display()))?;
        let len = f.metadata()?.len();
        ensure!(
            len >= SYNC_LEN as u64,
            "sync file {} has {len} bytes, not {SYNC_LEN}",
            path.display()
        );
        let map = SyncMap::map(&f, path)?;
        let head = &map.area().head;
        ensure!(
            head.magic.load(Ordering::Acquire) == SYNC_MAGIC,
            "{} is not a lab sync file",
            path.display()
        );
        let want = head.pods.load(Ordering::Relaxed);
        ensure!(
            want as usize == pods,
            "sync file {} is for {want} pods, not {pods}",
            path.display()
        );
        Ok(map)
    }

    fn map(f: &File, path: &Path) -> Result<SyncMap> {
        // SAFETY: a new shared mapping of SYNC_LEN bytes of a file at least that long;
        // no existing memory is affected.
        let p = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                SYNC_LEN,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_SHARED,
                f.as_raw_fd(),
                0,
            )
        };
        if p == libc::MAP_FAILED {
            return Err(io::Error::last_os_error())
                .with_context(|| format!("mmap of {}", path.display()));
        }
        let ptr = NonNull::new(p.cast::<SyncArea>()).context("mmap returned null")?;
        Ok(SyncMap { ptr })
    }

    fn area(&self) -> &SyncArea {
        // SAFETY: the mapping is page aligned (more than SyncArea's 64), SYNC_LEN bytes
        // long (more than SyncArea), readable and writable, and stays mapped while `self`
        // lives. SyncArea is made of atomic integers only, so any bytes, zeros included,
        // are valid values, and every access, also by the other processes, is atomic.
        unsafe { self.ptr.as_ref() }
    }
}

impl Drop for SyncMap {
    fn drop(&mut self) {
        // SAFETY: unmaps exactly the mapping made in `map`; no reference into it outlives
        // `self` (they borrow it).
        unsafe {
            libc::munmap(self.ptr.as_ptr().cast(), SYNC_LEN);
        }
    }
}

/// Sleeps while `word == expected`, at most `timeout` (wakes early on [`futex_wake`] or
/// a signal). Shared (not `FUTEX_PRIVATE`): the word may be in a file mapped by other
/// processes.
fn futex_wait(word: &AtomicU32, expected: u32, timeout: Duration) {
    let ts = libc::timespec {
        tv_sec: timeout.as_secs() as libc::time_t,
        tv_nsec: timeout.subsec_nanos() as libc::c_long,
    };
    // SAFETY: `word` is a valid, aligned u32 for the duration of the call; the timeout
    // points to a timespec on our stack; the other arguments are unused by FUTEX_WAIT.
    unsafe {
        libc::syscall(
            libc::SYS_futex,
            word.as_ptr(),
            libc::FUTEX_WAIT,
            expected,
            &ts as *const libc::timespec,
            std::ptr::null::<u32>(),
            0u32,
        );
    }
}

/// Wakes every process waiting on `word`.
fn futex_wake(word: &AtomicU32) {
    // SAFETY: as in futex_wait; FUTEX_WAKE only uses the address and the count.
    unsafe {
        libc::syscall(
            libc::SYS_futex,
            word.as_ptr(),
            libc::FUTEX_WAKE,
            i32::MAX,
            std::ptr::null::<libc::timespec>(),
            std::ptr::null::<u32>(),
            0u32,
        );
    }
}

fn nanos(d: Duration) -> u64 {
    u64::try_from(d.as_nanos()).unwrap_or(u64::MAX)
}

/// CLOCK_MONOTONIC in ns: one clock for every process on the machine.
pub(crate) fn mono_ns() -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: valid pointer; CLOCK_MONOTONIC always exists.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) };
    (ts.tv_sec as u64)
        .saturating_mul(1_000_000_000)
        .saturating_add(ts.tv_nsec as u64)
}

/// Sleeps until CLOCK_MONOTONIC reaches `t_ns` (returns at once if it has).
pub(crate) fn sleep_until(t_ns: u64) {
    let ts = libc::timespec {
        tv_sec: (t_ns / 1_000_000_000) as libc::time_t,
        tv_nsec: (t_ns % 1_000_000_000) as libc::c_long,
    };
    // Interruptions only (bounded): each retry is for the same absolute instant.
    for _ in 0..1000 {
        // SAFETY: valid timespec; no remainder is needed with TIMER_ABSTIME.
        let rc = unsafe {
            libc::clock_nanosleep(
                libc::CLOCK_MONOTONIC,
                libc::TIMER_ABSTIME,
                &ts,
                std::ptr::null_mut(),
            )
        };
        if rc != libc::EINTR {
            return;
        }
    }
}

// ---------------------------------------------------------------------------------------
// Child side

/// Runs a child's request and writes its report as one JSON line on stdout.
pub fn run_child(req: Request) -> Result<()> {
    die_with_parent()?;
    // The name the tracer shows for the client (`comm`), instead of `tracer`.
    let name: &[u8] = match req {
        Request::Race(_) => b"lab-race\0",
        Request::Resolver(_) => b"lab-resolver\0",
    };
    // SAFETY: PR_SET_NAME reads a NUL-terminated string of at most 16 bytes.
    unsafe { libc::prctl(libc::PR_SET_NAME, name.as_ptr()) };
    let mut out = io::stdout().lock();
    match req {
        Request::Race(r) => {
            let report = traffic::udp_race_here(r.server, &r.qname, r.rounds, r.timeout)?;
            serde_json::to_writer(&mut out, &report)?;
        }
        Request::Resolver(r) => {
            let report = resolver_child(&r)?;
            serde_json::to_writer(&mut out, &report)?;
        }
    }
    writeln!(out)?;
    out.flush()?;
    Ok(())
}

/// SIGKILL when the parent (the thread that spawned us) ends, so a child never outlives
/// a lab that died without its guards running. Also the smallest timer slack, so that
/// sleeps end on time.
fn die_with_parent() -> Result<()> {
    // SAFETY: plain prctl with an integer argument.
    let rc = unsafe { libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL as libc::c_ulong) };
    if rc != 0 {
        return Err(io::Error::last_os_error()).context("prctl(PR_SET_PDEATHSIG)");
    }
    // SAFETY: as above; 1 ns is the smallest slack.
    unsafe { libc::prctl(libc::PR_SET_TIMERSLACK, 1 as libc::c_ulong) };
    Ok(())
}

fn parent_pid() -> u32 {
    // SAFETY: no arguments, never fails.
    unsafe { libc::getppid() as u32 }
}

fn resolver_child(req: &ResolverRequest) -> Result<ResolverPod> {
    let p = &req.params;
    p.validate()?;
    ensure!(
        (1..=MAX_PODS).contains(&req.pods) && req.pod < req.pods,
        "pod {} of {}: out of range",
        req.pod,
        req.pods
    );
    let map = SyncMap::open(&req.sync, req.pods)?;
    let area = map.area();
    let parent = area.head.parent_pid.load(Ordering::Relaxed);
    ensure!(
        parent_pid() == parent,
        "the parent that made {} (pid {parent}) is not this process's parent ({}): gone?",
        req.sync.display(),
        parent_pid()
    );
    let cpus = traffic::allowed_cpus();
    let mut pinned = (!cpus.is_empty()).then(|| cpus[req.pod % cpus.len()]);
    if let Some(cpu) = pinned {
        if let Err(e) = traffic::pin_to(cpu) {
            warn!("pod {}: pinning to CPU {cpu}: {e}", req.pod);
            pinned = None;
        }
    }
    // The first pod on each CPU spins to the start instant; a second one spinning on the
    // same CPU would only keep the first from running.
    let spinners = req.pods.min(cpus.len().max(1)) as u32;
    let racer = (req.pod as u32) < spinners;
    // Longer than the parent waits: it notices a stuck round first and ends everyone.
    let go_limit = |round: u32| match round {
        0 => FIRST_READY_LIMIT + SLACK,
        _ => p.round_time() + SLACK + SLACK,
    };
    let mut rng = traffic::Rng::seeded();
    let mut rounds = Vec::with_capacity(p.rounds as usize);
    for round in 0..p.rounds {
        let port = p.port_for(round);
        let sock = resolver_socket(p.server, port).with_context(|| match port {
            Some(port) => format!("UDP socket from port {port} connected to {}", p.server),
            None => format!("UDP socket connected to {}", p.server),
        })?;
        let local = traffic::local_addr_fd(sock.as_raw_fd());
        let id_a = (rng.next() & 0xffff) as u16;
        let id_aaaa = id_a.wrapping_add(1 + (rng.next() % 0xfffe) as u16);
        let queries = [
            (QType::A, id_a, traffic::dns_query(id_a, &p.qname, QTYPE_A)?),
            (
                QType::Aaaa,
                id_aaaa,
                traffic::dns_query(id_aaaa, &p.qname, QTYPE_AAAA)?,
            ),
        ];

        area.ready.fetch_add(1, Ordering::AcqRel);
        futex_wake(&area.ready);
        let start_ns = wait_go(area, round, parent, go_limit(round))?;
        let now = mono_ns();
        ensure!(
            start_ns <= now + nanos(MAX_LEAD),
            "round {round}: start instant {} ms away",
            (start_ns - now) / 1_000_000
        );
        let until = Instant::now() + Duration::from_nanos(start_ns - now.min(start_ns));
        let wait = || {
            if racer {
                sleep_until(start_ns.saturating_sub(nanos(SPIN_WINDOW)));
                while mono_ns() < start_ns {
                    std::hint::spin_loop();
                }
            } else {
                // Asleep until the racers have sent: woken at the start instant on a
                // racer's CPU it would take that CPU from the racer.
                let target = spinners * (round + 1);
                let until = until + NON_RACER_WAIT;
                loop {
                    let f = area.fired.load(Ordering::Acquire);
                    let now = Instant::now();
                    if f >= target || now >= until {
                        break;
                    }
                    futex_wait(&area.fired, f, SLICE.min(until - now));
                }
            }
        };
        let fired = racer.then_some(&*area.fired);
        let (cpu, [a, aaaa]) = resolve(sock.as_raw_fd(), &queries, p, start_ns, wait, fired);
        drop(sock);
        rounds.push(ResolverRound {
            round,
            src_port: port,
            local,
            cpu,
            a,
            aaaa,
        });
        area.done.fetch_add(1, Ordering::AcqRel);
        futex_wake(&area.done);
    }
    Ok(ResolverPod {
        pod: req.pod,
        cpu: pinned,
        racer,
        rounds,
    })
}

/// Waits for round `round` to be released; returns its start instant.
fn wait_go(area: &SyncArea, round: u32, parent: u32, limit: Duration) -> Result<u64> {
    let deadline = Instant::now() + limit;
    loop {
        let g = area.start.go.load(Ordering::Acquire);
        if g > round {
            return Ok(area.start.start_ns.load(Ordering::Relaxed));
        }
        ensure!(
            parent_pid() == parent,
            "round {round}: the parent (pid {parent}) is gone"
        );
        let now = Instant::now();
        ensure!(
            now < deadline,
            "round {round} was not released within {limit:?}"
        );
        futex_wait(&area.start.go, g, SLICE.min(deadline - now));
    }
}

/// A non-blocking UDP socket, bound to `port` (SO_REUSEADDR) if given, connected to
/// `server`.
fn resolver_socket(server: SocketAddr, port: Option<u16>) -> io::Result<OwnedFd> {
    let fd = traffic::new_socket(&server, libc::SOCK_DGRAM, true)?;
    if let Some(port) = port {
        traffic::set_reuseaddr(fd.as_raw_fd())?;
        traffic::bind_fd(fd.as_raw_fd(), &traffic::unspecified(&server, port))?;
    }
    traffic::connect_fd(fd.as_raw_fd(), &server)?;
    Ok(fd)
}

/// Sends `msgs` (at most 2) with one `sendmmsg` on a connected socket; how many went out.
/// Nothing is allocated: it runs right at a round's start instant.
fn send_batch(fd: RawFd, msgs: &[&[u8]]) -> io::Result<usize> {
    const MAX: usize = 2;
    assert!(msgs.len() <= MAX, "send_batch: at most {MAX} messages");
    // SAFETY: iovec and mmsghdr are plain data; zeroed is valid (null pointers, no
    // address, no control data).
    let mut iov: [libc::iovec; MAX] = unsafe { std::mem::zeroed() };
    // SAFETY: as above.
    let mut hdrs: [libc::mmsghdr; MAX] = unsafe { std::mem::zeroed() };
    for (i, m) in msgs.iter().enumerate() {
        iov[i].iov_base = m.as_ptr().cast_mut().cast();
        iov[i].iov_len = m.len();
    }
    for (h, v) in hdrs.iter_mut().zip(iov.iter_mut()) {
        h.msg_hdr.msg_iov = v;
        h.msg_hdr.msg_iovlen = 1;
    }
    loop {
        // SAFETY: the first msgs.len() headers each point to one iovec of `iov`, which
        // points into a live buffer of `msgs`; the kernel only reads them (and writes
        // msg_len).
        let rc = unsafe { libc::sendmmsg(fd, hdrs.as_mut_ptr(), msgs.len() as libc::c_uint, 0) };
        if rc >= 0 {
            return Ok(rc as usize);
        }
        let e = io::Error::last_os_error();
        if e.kind() != io::ErrorKind::Interrupted {
            return Err(e);
        }
    }
}

/// The state of one query during a round.
struct Pending {
    attempts: u32,
    sent_ns: Option<u64>,
    reply: Option<(Instant, traffic::DnsReply)>,
    send_error: Option<String>,
}

/// One round: A and AAAA in one `sendmmsg`, answers awaited up to `p.timeout`, the
/// unanswered ones sent again (same socket, same ids), up to `p.attempts` tries. Returns
/// the CPU of the first send and both queries' records. `wait` returns at the start
/// instant; between it and the first send there is nothing slow (no allocation, no other
/// syscall).
fn resolve(
    fd: RawFd,
    queries: &[(QType, u16, Vec<u8>); 2],
    p: &ResolverParams,
    start_ns: u64,
    wait: impl FnOnce(),
    fired: Option<&AtomicU32>,
) -> (Option<u32>, [ResolverQuery; 2]) {
    let mut st: [Pending; 2] = std::array::from_fn(|_| Pending {
        attempts: 0,
        sent_ns: None,
        reply: None,
        send_error: None,
    });
    let mut first = None;
    let mut cpu = None;
    let mut wait = Some(wait);
    for attempt in 0..p.attempts {
        let mut todo = [0usize; 2];
        let mut n = 0;
        for (i, q) in st.iter().enumerate() {
            if q.reply.is_none() {
                todo[n] = i;
                n += 1;
            }
        }
        if n == 0 {
            break;
        }
        let msgs: [&[u8]; 2] = [&queries[todo[0]].2, &queries[todo[1]].2];
        if let Some(wait) = wait.take() {
            wait();
        }
        let sent_at = Instant::now();
        let sent_ns = mono_ns().saturating_sub(start_ns);
        let result = send_batch(fd, &msgs[..n]);
        if attempt == 0 {
            if let Some(f) = fired {
                f.fetch_add(1, Ordering::AcqRel);
                futex_wake(f);
            }
            cpu = traffic::current_cpu();
        }
        first.get_or_insert(sent_at);
        for (j, &i) in todo[..n].iter().enumerate() {
            let q = &mut st[i];
            q.attempts += 1;
            q.sent_ns.get_or_insert(sent_ns);
            match &result {
                Ok(k) if j < *k => {}
                Ok(k) => q.send_error = Some(format!("sendmmsg sent {k} of {n}")),
                Err(e) => q.send_error = Some(format!("sendmmsg: {e}")),
            }
        }
        receive(fd, queries, &mut st, sent_at + p.timeout);
    }
    let first = first.unwrap_or_else(Instant::now);
    let rec = |i: usize| {
        let (qtype, id, _) = &queries[i];
        let q = &st[i];
        ResolverQuery {
            qtype: *qtype,
            id: *id,
            sent_ns: q.sent_ns.unwrap_or(0),
            attempts: q.attempts,
            answered: q.reply.is_some(),
            latency_us: q
                .reply
                .map(|(at, _)| traffic::micros(at.saturating_duration_since(first))),
            rcode: q.reply.map(|(_, r)| r.rcode),
            answers: q.reply.map(|(_, r)| r.ancount),
            send_error: q.send_error.clone(),
        }
    };
    (cpu, [rec(0), rec(1)])
}

/// Reads answers until every query has one or `deadline` passes.
fn receive(
    fd: RawFd,
    queries: &[(QType, u16, Vec<u8>); 2],
    st: &mut [Pending; 2],
    deadline: Instant,
) {
    let mut buf = [0u8; 1500];
    while st.iter().any(|q| q.reply.is_none()) {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return;
        }
        match traffic::poll_fd(fd, libc::POLLIN, left) {
            Ok(0) => return,
            Ok(_) => {}
            Err(e) => {
                warn!("poll: {e}");
                return;
            }
        }
        loop {
            // SAFETY: valid buffer; MSG_DONTWAIT so this never blocks.
            let n =
                unsafe { libc::recv(fd, buf.as_mut_ptr().cast(), buf.len(), libc::MSG_DONTWAIT) };
            let at = Instant::now();
            if n < 0 {
                break; // EAGAIN, or ECONNREFUSED (ICMP): keep waiting
            }
            let Some(r) = traffic::parse_dns_reply(&buf[..n as usize]) else {
                continue;
            };
            for (i, (qtype, id, _)) in queries.iter().enumerate() {
                if r.id == *id && r.qtype.is_none_or(|t| t == qtype.code()) {
                    st[i].reply.get_or_insert((at, r));
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use clap::Parser as _;

    use super::*;
    use crate::cli::{Cli, Command as CliCommand};

    fn params() -> ResolverParams {
        ResolverParams {
            server: "10.246.0.2:53".parse().unwrap(),
            qname: "svc.lab.example".into(),
            base_port: 40000,
            rounds: 100,
            timeout: Duration::from_micros(300_500),
            attempts: 3,
        }
    }

    fn parse(args: Vec<OsString>) -> Request {
        let mut argv = vec![OsString::from("tracer")];
        argv.extend(args);
        match Cli::try_parse_from(argv).unwrap().command {
            CliCommand::LabClient(c) => c.request(),
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn command_lines_round_trip_through_the_cli() {
        let r = RaceRequest {
            server: "[fd00::1]:5353".parse().unwrap(),
            qname: "race.test".into(),
            rounds: 7,
            timeout: Duration::from_millis(1500),
        };
        assert_eq!(parse(r.args()), Request::Race(r));
        let r = ResolverRequest {
            params: params(),
            sync: "/tmp/ctlab-1-clients-0/sync".into(),
            pod: 2,
            pods: 3,
        };
        assert_eq!(parse(r.args()), Request::Resolver(r));
    }

    #[test]
    fn the_subcommand_is_hidden() {
        use clap::CommandFactory as _;
        let help = Cli::command().render_help().to_string();
        assert!(!help.contains(SUBCOMMAND), "{help}");
        let mut argv: Vec<OsString> = vec!["tracer".into()];
        argv.extend(params_request(0).args());
        argv.push("--attempts".into());
        argv.push("0".into());
        assert!(Cli::try_parse_from(argv).is_err(), "attempts 0 accepted");
    }

    fn params_request(pod: usize) -> ResolverRequest {
        ResolverRequest {
            params: params(),
            sync: "/nonexistent".into(),
            pod,
            pods: 3,
        }
    }

    #[test]
    fn race_reports_come_back_from_json() {
        let json = r#"{"server":"10.0.0.1:53","qname":"x.test","cpus":[0,1],"rounds":1,
            "queries_sent":2,"answered":1,"unanswered":1,"rounds_fully_answered":0,
            "median_send_skew_ns":90,"elapsed_ms":3,"per_round":[{"round":0,
            "local":"10.0.0.2:40000","send_skew_ns":90,
            "a":{"id":1,"qtype":"A","cpu":0,"sent":true,"send_error":null,"answered":true,
                 "latency_us":70,"rcode":0,"answers":1},
            "aaaa":{"id":2,"qtype":"AAAA","cpu":1,"sent":true,"send_error":null,
                 "answered":false,"latency_us":null,"rcode":null,"answers":null}}]}"#;
        let r: RaceReport = serde_json::from_str(json).unwrap();
        assert_eq!(
            (r.per_round[0].a.qtype, r.per_round[0].aaaa.qtype),
            ("A", "AAAA")
        );
        let again: serde_json::Value = serde_json::to_value(&r).unwrap();
        assert_eq!(
            again,
            serde_json::from_str::<serde_json::Value>(json).unwrap()
        );
        let bad = json.replace(r#""qtype":"AAAA""#, r#""qtype":"MX""#);
        assert!(serde_json::from_str::<RaceReport>(&bad).is_err());
    }

    #[test]
    fn ports_rotate_like_snat_race() {
        let mut p = params();
        assert_eq!(p.port_for(0), Some(40000));
        assert_eq!(p.port_for(1023), Some(41023));
        assert_eq!(p.port_for(1024), Some(40000));
        p.base_port = 65000;
        assert_eq!(p.port_for(535), Some(65535));
        assert_eq!(p.port_for(536), Some(65000));
        p.base_port = 65535;
        assert_eq!(p.port_for(9), Some(65535));
        p.base_port = 0;
        assert_eq!(p.port_for(3), None);
    }

    #[test]
    fn bad_parameters() {
        let mut p = params();
        p.attempts = 0;
        assert!(p.validate().is_err());
        p.attempts = MAX_ATTEMPTS + 1;
        assert!(p.validate().is_err());
        let mut p = params();
        p.rounds = 0;
        assert!(p.validate().is_err());
        let mut p = params();
        p.timeout = Duration::ZERO;
        assert!(p.validate().is_err());
        let mut p = params();
        p.qname = "a..b".into();
        assert!(p.validate().is_err());
        let never = |_: usize| -> Command { panic!("no process may start") };
        assert!(run_resolvers(0, never, &params()).is_err());
        assert!(run_resolvers(MAX_PODS + 1, never, &params()).is_err());
    }

    fn query(qtype: QType, attempts: u32, latency_us: Option<u64>, sent_ns: u64) -> ResolverQuery {
        ResolverQuery {
            qtype,
            id: 1,
            sent_ns,
            attempts,
            answered: latency_us.is_some(),
            latency_us,
            rcode: latency_us.map(|_| 0),
            answers: latency_us.map(|_| 1),
            send_error: None,
        }
    }

    #[test]
    fn aggregation_counts_retries_and_spread() {
        let mut p = params();
        p.rounds = 2;
        let round = |r: u32, a: ResolverQuery, aaaa: ResolverQuery| ResolverRound {
            round: r,
            src_port: p.port_for(r),
            local: None,
            cpu: Some(0),
            a,
            aaaa,
        };
        let pods = vec![
            ResolverPod {
                pod: 0,
                cpu: Some(0),
                racer: true,
                rounds: vec![
                    round(
                        0,
                        query(QType::A, 1, Some(100), 1000),
                        query(QType::Aaaa, 1, Some(120), 1000),
                    ),
                    round(
                        1,
                        query(QType::A, 2, Some(300_400), 500),
                        query(QType::Aaaa, 1, Some(90), 500),
                    ),
                ],
            },
            ResolverPod {
                pod: 1,
                cpu: Some(1),
                racer: true,
                rounds: vec![
                    round(
                        0,
                        query(QType::A, 1, Some(80), 1700),
                        query(QType::Aaaa, 3, None, 1700),
                    ),
                    round(
                        1,
                        query(QType::A, 1, Some(70), 800),
                        query(QType::Aaaa, 1, Some(75), 800),
                    ),
                ],
            },
            ResolverPod {
                pod: 2,
                cpu: Some(0),
                racer: false,
                rounds: vec![
                    round(
                        0,
                        query(QType::A, 1, Some(50), 90_000),
                        query(QType::Aaaa, 1, Some(60), 90_000),
                    ),
                    round(
                        1,
                        query(QType::A, 1, Some(50), 90_000),
                        query(QType::Aaaa, 1, Some(60), 90_000),
                    ),
                ],
            },
        ];
        let r = aggregate(&p, pods, Duration::from_millis(5));
        assert_eq!(r.queries_sent, 12);
        assert_eq!(r.datagrams_sent, 12 + 1 + 2);
        assert_eq!((r.answered, r.unanswered), (11, 1));
        assert_eq!(r.lost_first_try, 2);
        assert_eq!(r.rounds_with_retry, 2);
        assert_eq!(r.latencies_us.len(), 11);
        assert_eq!(r.retried_latency.unwrap().min_us, 300_400);
        assert_eq!(r.latency.unwrap().max_us, 300_400);
        // Racers only: round 0 700 ns apart, round 1 300 ns.
        assert_eq!(r.max_start_spread_ns, Some(700));
        assert_eq!(r.median_start_spread_ns, Some(700));
        assert_eq!(r.base_port, Some(40000));
        let json = serde_json::to_value(&r).unwrap();
        assert_eq!(json["per_pod"][1]["rounds"][0]["aaaa"]["qtype"], "AAAA");
        let back: ResolverPod = serde_json::from_value(json["per_pod"][1].clone()).unwrap();
        assert_eq!(back, r.per_pod[1]);
    }

    #[test]
    fn shared_file_is_shared_and_checked() {
        let dir = WorkDir::create().unwrap();
        let path = dir.path().join("sync");
        let parent = SyncMap::create(&path, 3).unwrap();
        assert!(SyncMap::create(&path, 3).is_err(), "must not reuse a file");
        assert!(SyncMap::open(&path, 2).is_err());
        let child = SyncMap::open(&path, 3).unwrap();
        assert!(!std::ptr::eq(parent.area(), child.area()), "two mappings");
        child.area().ready.fetch_add(2, Ordering::AcqRel);
        assert_eq!(parent.area().ready.load(Ordering::Acquire), 2);
        // A futex wait on a value that is not there returns at once; one that is, after
        // its timeout at most.
        let t = Instant::now();
        futex_wait(&parent.area().ready, 99, Duration::from_secs(5));
        futex_wait(&parent.area().ready, 2, Duration::from_millis(20));
        assert!(t.elapsed() < crate::test_bound_ms(1000));
        std::thread::scope(|s| {
            s.spawn(|| {
                std::thread::sleep(Duration::from_millis(30));
                parent.area().done.store(1, Ordering::Release);
                futex_wake(&parent.area().done);
            });
            let mut kids = Children::new("test");
            kids.wait_counter(&child.area().done, 1, Duration::from_secs(5), String::new)
                .unwrap();
        });
        let not_sync = dir.path().join("other");
        fs::write(&not_sync, [0u8; SYNC_LEN]).unwrap();
        assert!(SyncMap::open(&not_sync, 3).is_err());
        let path_kept = dir.path().to_path_buf();
        drop((parent, child));
        drop(dir);
        assert!(!path_kept.exists());
    }

    fn sleep30() -> Command {
        let mut c = Command::new("sleep");
        c.arg("30");
        c
    }

    #[test]
    fn children_are_killed_and_failures_reported() {
        let dir = WorkDir::create().unwrap();
        let word = AtomicU32::new(0);
        let mut kids = Children::new("test client");
        kids.spawn(0, sleep30(), dir.path()).unwrap();
        let mut failing = Command::new("sh");
        failing.args(["-c", "sleep 0.1; echo 'it broke' >&2; exit 3"]);
        kids.spawn(1, failing, dir.path()).unwrap();
        let pid = kids.procs[0].child.id();
        let t = Instant::now();
        let e = kids
            .wait_counter(&word, 1, Duration::from_secs(10), || "waiting".into())
            .unwrap_err();
        assert!(
            t.elapsed() < crate::test_bound_ms(2000),
            "{:?}",
            t.elapsed()
        );
        let msg = format!("{e:#}");
        assert!(
            msg.contains("test client 1") && msg.contains("it broke"),
            "{msg}"
        );
        drop(kids);
        assert!(
            !Path::new(&format!("/proc/{pid}")).exists(),
            "pid {pid} still there"
        );
        // A timeout names the counter and who is still running.
        let mut kids = Children::new("test client");
        kids.spawn(0, sleep30(), dir.path()).unwrap_err(); // the output files of index 0 exist already
        kids.spawn(5, sleep30(), dir.path()).unwrap();
        let e = kids
            .wait_counter(&word, 1, Duration::from_millis(50), || "ready".into())
            .unwrap_err();
        assert!(format!("{e:#}").contains("still running: [5]"), "{e:#}");
    }
}

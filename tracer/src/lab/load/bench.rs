//! `tracer load-gen bench`: the side of `cargo xtask bench-load` that needs the tracer's
//! lab code. It builds one shape's namespaces ([`Topology`]) and prints
//!
//! ```text
//! {"type":"ready","shape":..,"root":..,"workdir":..,"namespaces":..,"setup_s":..}
//! ```
//!
//! then reads commands from stdin, one per line: `run RATE SECONDS` runs one window at RATE
//! queries/s and prints one [`RunReport`] line (the generators' and the responder's
//! truth); `quit` or the end of input removes everything and prints `{"type":"done",..}`.
//! SIGINT, SIGTERM (also as the death signal of its parent) and a silent stdin for
//! `--idle-limit` remove everything too.

use std::{
    fs::{self, File},
    io::Write as _,
    os::unix::fs::DirBuilderExt as _,
    path::{Path, PathBuf},
    process::{Child, Stdio},
    time::{Duration, Instant},
};

use anyhow::{bail, ensure, Context as _, Result};
use clap::Args;
use serde::Serialize;

use super::{
    blast::BlastReport,
    mono_ns,
    net::{Topology, PREFIX},
    pod::{Outcomes, PodReport},
    responder::ResponderStats,
    FdLines, LatencySummary,
};
use crate::netns;

/// Most commands one bench takes.
const MAX_COMMANDS: usize = 10_000;
/// Added to a window's own length when waiting for its generators.
const SLACK: Duration = Duration::from_secs(30);
/// How long the pods may take to start.
const PODS_READY: Duration = Duration::from_secs(60);
/// The pods' start instant is this far after the last one is ready.
const START_LEAD: Duration = Duration::from_millis(100);
/// A pod lookup's timeout (the pod's default).
const LOOKUP_TIMEOUT: Duration = Duration::from_secs(5);

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, clap::ValueEnum)]
#[serde(rename_all = "kebab-case")]
pub enum Shape {
    /// One process, many connected sockets, unique names.
    OneProcess,
    /// One process per pod, glibc-style lookups.
    Pods,
}

#[derive(Debug, Args)]
pub struct BenchArgs {
    #[arg(long, value_enum)]
    pub shape: Shape,
    /// Pods (shape pods): network namespaces with a cgroup each.
    #[arg(long, default_value_t = 200, value_parser = clap::value_parser!(u64).range(1..=super::MAX_PODS as u64))]
    pub pods: u64,
    /// Sockets of the one-process generator.
    #[arg(long, default_value_t = 64, value_parser = clap::value_parser!(u16).range(1..=1024))]
    pub sockets: u16,
    /// Pin the generators to this CPU.
    #[arg(long)]
    pub generator_cpu: Option<usize>,
    /// Pin the responder to this CPU.
    #[arg(long)]
    pub responder_cpu: Option<usize>,
    /// Give up (and clean up) when no command came for this many seconds.
    #[arg(long, default_value_t = 3600, value_parser = clap::value_parser!(u32).range(1..=86_400))]
    pub idle_limit: u32,
}

/// One window's truth, as the generators and the responder counted it.
#[derive(Debug, Clone, Serialize)]
pub struct RunReport {
    #[serde(rename = "type")]
    pub kind: &'static str,
    pub shape: Shape,
    pub rate: u32,
    pub seconds: u32,
    /// Queries the window should have sent.
    pub planned: u64,
    /// Queries the kernel took.
    pub sent: u64,
    /// Queries the kernel refused.
    pub refused: u64,
    /// Queries answered.
    pub answered: u64,
    /// Queries without an answer.
    pub unanswered: u64,
    /// Replies that matched no query (one-process).
    pub unmatched: u64,
    pub window_s: f64,
    pub sent_qps: f64,
    pub answered_qps: f64,
    /// Lookups by outcome (one-process: one lookup per query).
    pub lookups: Outcomes,
    /// One-process: over every answer; pods: median p50 and worst p99 of the pods.
    pub latency: LatencySummary,
    /// Datagrams the clients' namespaces dropped at full receive buffers.
    pub rcvbuf_errors: u64,
    /// The responder's counters over the window.
    pub responder: ResponderStats,
    /// Pods: lookups started over 100 ms late, the worst lag, the latest start.
    pub late: u64,
    pub max_lag_ms: f64,
    pub started_late_ms: f64,
    pub pods: usize,
}

impl RunReport {
    fn new(shape: Shape, rate: u32, seconds: u32) -> RunReport {
        RunReport {
            kind: "run",
            shape,
            rate,
            seconds,
            planned: u64::from(rate) * u64::from(seconds),
            sent: 0,
            refused: 0,
            answered: 0,
            unanswered: 0,
            unmatched: 0,
            window_s: 0.0,
            sent_qps: 0.0,
            answered_qps: 0.0,
            lookups: Outcomes::default(),
            latency: LatencySummary::default(),
            rcvbuf_errors: 0,
            responder: ResponderStats::default(),
            late: 0,
            max_lag_ms: 0.0,
            started_late_ms: 0.0,
            pods: 0,
        }
    }
}

/// Children of one window, killed by pid (SIGKILL) and reaped on drop unless reaped.
struct Kids(Vec<Child>);

impl Drop for Kids {
    fn drop(&mut self) {
        for c in &mut self.0 {
            if let Ok(None) = c.try_wait() {
                let _ = c.kill();
                let _ = c.wait();
            }
        }
    }
}

impl Kids {
    /// Waits until every child has exited, at most until `deadline`; each must succeed.
    fn wait_all(
        &mut self,
        deadline: Instant,
        what: &str,
        stderr: impl Fn(usize) -> String,
    ) -> Result<()> {
        loop {
            let mut running = 0;
            for (i, c) in self.0.iter_mut().enumerate() {
                match c.try_wait()? {
                    Some(s) if !s.success() => bail!("{what} {i} ended with {s}: {}", stderr(i)),
                    Some(_) => {}
                    None => running += 1,
                }
            }
            if running == 0 {
                return Ok(());
            }
            ensure!(
                Instant::now() < deadline,
                "{what}: {running} still running at the deadline"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

/// The bench's private directory (`<tmp>/ctload-<pid>-work`, mode 0700), removed on drop.
struct WorkDir(PathBuf);

impl WorkDir {
    fn path_for(pid: u32) -> PathBuf {
        std::env::temp_dir().join(format!("{PREFIX}-{pid}-work"))
    }

    fn create() -> Result<WorkDir> {
        let dir = WorkDir::path_for(std::process::id());
        let _ = fs::remove_dir_all(&dir); // a dead process with our pid left it
        fs::DirBuilder::new()
            .mode(0o700)
            .create(&dir)
            .with_context(|| format!("creating {}", dir.display()))?;
        Ok(WorkDir(dir))
    }
}

impl Drop for WorkDir {
    fn drop(&mut self) {
        let _ = fs::remove_dir_all(&self.0);
    }
}

struct Bench<'a> {
    // Field order is drop order.
    topo: Topology,
    work: WorkDir,
    bin: PathBuf,
    args: &'a BenchArgs,
    runs: u32,
}

fn tail(path: &Path) -> String {
    let s = fs::read_to_string(path).unwrap_or_default();
    let s = s.trim();
    let start = s.char_indices().rev().nth(2000).map_or(0, |(i, _)| i);
    if s.is_empty() {
        "(no stderr)".into()
    } else {
        s[start..].to_string()
    }
}

impl Bench<'_> {
    fn run_window(&mut self, rate: u32, seconds: u32) -> Result<RunReport> {
        self.runs += 1;
        let before = self.topo.responder.stats()?;
        let mut r = RunReport::new(self.args.shape, rate, seconds);
        match self.args.shape {
            Shape::OneProcess => self.blast(&mut r)?,
            Shape::Pods => self.pods(&mut r)?,
        }
        r.responder = self.topo.responder.stats()?.since(&before);
        if r.window_s > 0.0 {
            r.sent_qps = r.sent as f64 / r.window_s;
            r.answered_qps = r.answered as f64 / r.window_s;
        }
        Ok(r)
    }

    fn blast(&mut self, r: &mut RunReport) -> Result<()> {
        let mut cmd = self.topo.client_command(&self.bin)?;
        cmd.args(["load-gen", "blast", "--rate", &r.rate.to_string()])
            .args(["--seconds", &r.seconds.to_string()])
            .args(["--sockets", &self.args.sockets.to_string()]);
        if let Some(cpu) = self.args.generator_cpu {
            cmd.args(["--cpu", &cpu.to_string()]);
        }
        let err_path = self.work.0.join(format!("blast-{}.err", self.runs));
        cmd.stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(File::create(&err_path)?);
        let mut kids = Kids(vec![cmd.spawn().context("starting the generator")?]);
        let stdout = kids.0[0].stdout.take().context("no stdout pipe")?;
        let mut lines = FdLines::new(std::os::fd::AsRawFd::as_raw_fd(&stdout));
        let limit = Duration::from_secs(r.seconds.into()) + SLACK;
        let line = lines
            .next_line(limit)
            .with_context(|| format!("the generator: {}", tail(&err_path)))?
            .with_context(|| {
                format!("the generator ended without a report: {}", tail(&err_path))
            })?;
        let b: BlastReport =
            serde_json::from_str(&line).with_context(|| format!("the generator said {line:?}"))?;
        kids.wait_all(Instant::now() + SLACK, "generator", |_| tail(&err_path))?;
        r.sent = b.sent;
        r.refused = b.refused;
        r.answered = b.answered;
        r.unanswered = b.unanswered;
        r.unmatched = b.unmatched;
        r.window_s = b.window_s;
        r.lookups = Outcomes {
            answered: b.answered - b.negative,
            negative: b.negative,
            error: 0,
            unanswered: b.unanswered,
        };
        r.latency = b.latency;
        r.rcvbuf_errors = b.rcvbuf_errors.unwrap_or(0);
        Ok(())
    }

    fn pods(&mut self, r: &mut RunReport) -> Result<()> {
        let n = self.topo.pod_count();
        let dir = self.work.0.join(format!("run-{}", self.runs));
        fs::create_dir(&dir)?;
        let per_pod = f64::from(r.rate) / 2.0 / n as f64;
        let out = |i: usize| dir.join(format!("pod-{i}.json"));
        let err = |i: usize| dir.join(format!("pod-{i}.err"));
        let mut kids = Kids(Vec::with_capacity(n));
        let mut stdins = Vec::with_capacity(n);
        for i in 0..n {
            let mut cmd = self.topo.pod_command(i, &self.bin)?;
            cmd.args(["load-gen", "pod", "--pod", &i.to_string()])
                .args(["--pods", &n.to_string()])
                .args(["--lookups-per-s", &format!("{per_pod:.6}")])
                .args(["--seconds", &r.seconds.to_string()])
                .args(["--timeout-ms", &LOOKUP_TIMEOUT.as_millis().to_string()]);
            if let Some(cpu) = self.args.generator_cpu {
                cmd.args(["--cpu", &cpu.to_string()]);
            }
            cmd.stdin(Stdio::piped())
                .stdout(File::create(out(i))?)
                .stderr(File::create(err(i))?);
            let mut child = cmd.spawn().with_context(|| format!("starting pod {i}"))?;
            stdins.push(child.stdin.take().context("no stdin pipe")?);
            kids.0.push(child);
        }
        // Every pod prints a ready line before it waits for the start instant.
        let deadline = Instant::now() + PODS_READY;
        while (0..n).any(|i| fs::metadata(out(i)).map_or(true, |m| m.len() == 0)) {
            for (i, c) in kids.0.iter_mut().enumerate() {
                if let Some(s) = c.try_wait()? {
                    bail!("pod {i} ended with {s} before the start: {}", tail(&err(i)));
                }
            }
            ensure!(
                Instant::now() < deadline,
                "pods not ready within {PODS_READY:?}"
            );
            std::thread::sleep(Duration::from_millis(10));
        }
        let go = format!("go {}\n", mono_ns() + START_LEAD.as_nanos() as u64);
        for (i, mut s) in stdins.into_iter().enumerate() {
            s.write_all(go.as_bytes())
                .with_context(|| format!("starting pod {i}"))?;
        }
        let limit = Duration::from_secs(r.seconds.into()) + LOOKUP_TIMEOUT + SLACK;
        kids.wait_all(Instant::now() + limit, "pod", |i| tail(&err(i)))?;
        let mut p50s = Vec::with_capacity(n);
        for i in 0..n {
            let text = fs::read_to_string(out(i))?;
            let line = text.lines().last().unwrap_or_default();
            let p: PodReport =
                serde_json::from_str(line).with_context(|| format!("pod {i} said {line:?}"))?;
            r.sent += p.sent;
            r.refused += p.refused;
            r.answered += p.answered;
            r.lookups.add(&p.outcomes);
            r.window_s = r.window_s.max(p.window_s);
            r.latency.p99_us = r.latency.p99_us.max(p.latency.p99_us);
            r.latency.max_us = r.latency.max_us.max(p.latency.max_us);
            p50s.push(p.latency.p50_us);
            r.rcvbuf_errors += p.rcvbuf_errors.unwrap_or(0);
            r.late += p.late;
            r.max_lag_ms = r.max_lag_ms.max(p.max_lag_ms);
            r.started_late_ms = r.started_late_ms.max(p.started_late_ms);
        }
        p50s.sort_unstable();
        r.latency.p50_us = p50s.get(n / 2).copied().unwrap_or(0);
        r.unanswered = r.sent.saturating_sub(r.answered);
        r.pods = n;
        let _ = fs::remove_dir_all(&dir);
        Ok(())
    }
}

fn print_json(v: &impl Serialize) -> Result<()> {
    let mut out = std::io::stdout().lock();
    serde_json::to_writer(&mut out, v)?;
    writeln!(out)?;
    out.flush()?;
    Ok(())
}

/// `tracer load-gen bench`.
pub fn run(a: &BenchArgs) -> Result<()> {
    // On SIGINT/SIGTERM: the namespaces with their processes, the pod cgroups and node
    // roots, the bench's directory.
    super::cleanup_on_signal("bench-signals", |sig| {
        eprintln!("load-gen bench: signal {sig}: removing the bench's namespaces");
        let ns = netns::remove_own(PREFIX);
        let cg = crate::lab::kubepods::remove_own();
        let _ = fs::remove_dir_all(WorkDir::path_for(std::process::id()));
        format!(
            "load-gen bench: removed {} namespaces and {} pod cgroup trees",
            ns.len(),
            cg.len()
        )
    })?;
    super::die_with_parent(libc::SIGTERM)?;
    let started = Instant::now();
    let work = WorkDir::create()?;
    let bin = std::env::current_exe().context("finding this executable")?;
    let topo = match a.shape {
        Shape::OneProcess => Topology::one_process(&bin, a.responder_cpu)?,
        Shape::Pods => Topology::pods(&bin, a.pods as usize, a.responder_cpu)?,
    };
    let mut bench = Bench {
        topo,
        work,
        bin,
        args: a,
        runs: 0,
    };
    print_json(&serde_json::json!({
        "type": "ready",
        "shape": a.shape,
        "root": bench.topo.node_root(),
        "workdir": bench.work.0,
        "namespaces": bench.topo.namespaces(),
        "pods": bench.topo.pod_count(),
        "generator_cpu": a.generator_cpu,
        "responder_cpu": a.responder_cpu,
        "setup_s": started.elapsed().as_secs_f64(),
    }))?;
    let mut stdin = FdLines::new(libc::STDIN_FILENO);
    let idle = Duration::from_secs(a.idle_limit.into());
    for _ in 0..MAX_COMMANDS {
        let line = match stdin.next_line(idle) {
            Ok(Some(l)) => l,
            Ok(None) => break,
            Err(e) => {
                eprintln!("load-gen bench: {e:#}; cleaning up");
                break;
            }
        };
        let words: Vec<&str> = line.split_whitespace().collect();
        match words.as_slice() {
            ["run", rate, secs] => {
                let rate = super::parse_rate(rate).map_err(anyhow::Error::msg)?;
                let secs = super::parse_seconds(secs).map_err(anyhow::Error::msg)?;
                let report = bench.run_window(rate, secs)?;
                print_json(&report)?;
            }
            ["quit"] => break,
            _ => print_json(
                &serde_json::json!({"type": "error", "error": format!("unknown command {line:?}")}),
            )?,
        }
    }
    let cleanup = Instant::now();
    drop(bench);
    let me = std::process::id();
    let mut left: Vec<String> = netns::leftovers(PREFIX)
        .into_iter()
        .filter(|n| n.starts_with(&format!("{PREFIX}-{me}-")))
        .collect();
    left.extend(
        crate::lab::kubepods::leftovers()
            .into_iter()
            .map(|p| p.display().to_string())
            .filter(|p| p.contains(&format!("-{me}-"))),
    );
    print_json(&serde_json::json!({
        "type": "done",
        "cleanup_s": cleanup.elapsed().as_secs_f64(),
        "leftovers": left,
    }))?;
    ensure!(left.is_empty(), "left behind: {left:?}");
    Ok(())
}

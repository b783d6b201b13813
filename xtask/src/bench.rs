//! `cargo xtask bench-filter`: what staying attached costs a node's traffic. The release
//! tracer's hidden `tracer load-gen cost` builds a client and a server namespace (veth pair,
//! conntrack on both sides, the client MASQUERADEd) with one server per workload; this verb
//! runs the workloads' windows through it, three ways in rotating order per round:
//!
//! - detached: nothing of ours attached;
//! - floor: `tracer load-gen floor`, programs that return at once on the fallback
//!   programs' hooks (what the hooks' dispatch alone costs);
//! - attached: `tracer watch` with the plan it chooses on this kernel (fallback here,
//!   precise in the 6.1 guest);
//! - baseline (with `--baseline BIN`): another build's `tracer watch`, e.g. an earlier
//!   commit's, for a before/after in one run.
//!
//! The throughput figures are medians of the per-round ratios to the detached window of the
//! same round. Then, per workload, one floor and one attached window with the kernel's BPF
//! statistics on (`kernel.bpf_stats_enabled`, which itself costs every program run; off for
//! the throughput rounds) give each program's runs per operation and nanoseconds per run.
//! Needs root and `bpftool`.

use std::{
    collections::BTreeMap,
    fs,
    io::{BufRead as _, BufReader, Write as _},
    path::{Path, PathBuf},
    process::{Child, ChildStdin, Command, Stdio},
    sync::mpsc::{self, Receiver},
    thread,
    time::{Duration, Instant},
};

use anyhow::{bail, Context as _};
use serde_json::Value;

use crate::util::{self, Workspace};

pub(crate) const WORKLOADS: [&str; 5] = ["udp-lo", "udp-veth", "tcp-bulk", "tcp-crr", "dns"];

pub(crate) struct Args {
    pub(crate) seconds: f64,
    pub(crate) rounds: u32,
    pub(crate) workloads: Vec<&'static str>,
    /// A built tracer to use instead of building the release one (e.g. in the guest).
    pub(crate) tracer: Option<PathBuf>,
    /// Another build of the tracer (e.g. of an earlier commit) whose `watch` is measured as
    /// a fourth way in every round: a before/after in one run.
    pub(crate) baseline: Option<PathBuf>,
}

/// How long `tracer watch` may take to attach (an fentry/fexit attach takes ~2 s under TCG)
/// and to exit.
const READY_LIMIT: Duration = Duration::from_secs(180);
const STOP_LIMIT: Duration = Duration::from_secs(60);
/// Added to a window's length when waiting for its report.
const WINDOW_SLACK: Duration = Duration::from_secs(60);

#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Debug)]
enum Mode {
    Detached,
    Floor,
    Attached,
    Baseline,
}

impl Mode {
    fn label(self) -> &'static str {
        match self {
            Mode::Detached => "detached",
            Mode::Floor => "floor",
            Mode::Attached => "attached",
            Mode::Baseline => "baseline",
        }
    }
}

/// `tracer load-gen cost`, driven over stdin/stdout; told to quit (stdin closed) and
/// waited for on drop, then killed.
struct Cost {
    child: Child,
    stdin: Option<ChildStdin>,
    lines: Receiver<String>,
}

impl Cost {
    fn start(bin: &Path) -> anyhow::Result<Cost> {
        let mut child = Command::new(bin)
            .args(["load-gen", "cost"])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()
            .context("starting tracer load-gen cost")?;
        let stdin = child.stdin.take();
        let stdout = child.stdout.take().context("no stdout")?;
        let (tx, lines) = mpsc::channel();
        thread::spawn(move || {
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
        let mut c = Cost {
            child,
            stdin,
            lines,
        };
        let ready = c.next(Duration::from_secs(60))?;
        if ready["type"] != "ready" {
            bail!("load-gen cost: expected ready, got {ready}");
        }
        Ok(c)
    }

    fn next(&mut self, limit: Duration) -> anyhow::Result<Value> {
        let line = self
            .lines
            .recv_timeout(limit)
            .context("load-gen cost stopped answering")?;
        serde_json::from_str(&line).with_context(|| format!("load-gen cost printed {line:?}"))
    }

    /// One window; returns its rate.
    fn run(&mut self, workload: &str, seconds: f64) -> anyhow::Result<f64> {
        let stdin = self.stdin.as_mut().context("stdin closed")?;
        writeln!(stdin, "run {workload} {seconds}")?;
        stdin.flush()?;
        let v = self.next(Duration::from_secs_f64(seconds) + WINDOW_SLACK)?;
        if v["type"] != "window" {
            bail!("load-gen cost: {v}");
        }
        v["rate"].as_f64().context("window without a rate")
    }
}

impl Drop for Cost {
    fn drop(&mut self) {
        drop(self.stdin.take());
        let deadline = Instant::now() + Duration::from_secs(30);
        while Instant::now() < deadline {
            if let Ok(Some(_)) = self.child.try_wait() {
                return;
            }
            thread::sleep(Duration::from_millis(50));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The tracer measured, and the one it is compared with.
struct Bins {
    tracer: PathBuf,
    baseline: Option<PathBuf>,
}

/// `tracer watch` or `tracer load-gen floor`, attached until dropped (SIGINT, then kill).
struct Attached(Child);

impl Attached {
    /// Attaches the way `mode` says; `bins` are the tracer and the baseline.
    fn start(bins: &Bins, mode: Mode, ready: &Path) -> anyhow::Result<Option<Attached>> {
        let (bin, args): (&Path, &[&str]) = match mode {
            Mode::Detached => return Ok(None),
            Mode::Floor => (&bins.tracer, &["load-gen", "floor", "--ready-file"]),
            Mode::Attached => (&bins.tracer, &["watch", "--ready-file"]),
            Mode::Baseline => (
                bins.baseline.as_deref().context("no baseline")?,
                &["watch", "--ready-file"],
            ),
        };
        let _ = fs::remove_file(ready);
        let child = Command::new("setpriv")
            .args(["--pdeathsig", "INT", "--"])
            .arg(bin)
            .args(args)
            .arg(ready)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .context("starting the tracer")?;
        let mut t = Attached(child);
        let deadline = Instant::now() + READY_LIMIT;
        while !ready.exists() {
            if let Some(s) = t.0.try_wait()? {
                bail!(
                    "`tracer {}` exited with {s} before it was ready (run it by hand to see why)",
                    args[..args.len() - 1].join(" ")
                );
            }
            if Instant::now() > deadline {
                bail!("tracer not ready after {READY_LIMIT:?}");
            }
            thread::sleep(Duration::from_millis(20));
        }
        Ok(Some(t))
    }
}

impl Drop for Attached {
    fn drop(&mut self) {
        let _ = Command::new("kill")
            .args(["-INT", &self.0.id().to_string()])
            .status();
        let deadline = Instant::now() + STOP_LIMIT;
        while Instant::now() < deadline {
            if let Ok(Some(_)) = self.0.try_wait() {
                return;
            }
            thread::sleep(Duration::from_millis(20));
        }
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Every loaded program: id -> (name, run count, run time in ns).
fn programs() -> anyhow::Result<BTreeMap<u64, (String, u64, u64)>> {
    let out = util::output(Command::new("bpftool").args(["prog", "show", "--json"]))?;
    let v: Value = serde_json::from_str(&out).context("bpftool prog show --json")?;
    let mut m = BTreeMap::new();
    for p in v.as_array().context("bpftool: not a list")? {
        let id = p["id"].as_u64().context("bpftool: program without id")?;
        let name = p["name"].as_str().unwrap_or("?").to_string();
        let cnt = p["run_cnt"].as_u64().unwrap_or(0);
        let ns = p["run_time_ns"].as_u64().unwrap_or(0);
        m.insert(id, (name, cnt, ns));
    }
    Ok(m)
}

/// Sets `kernel.bpf_stats_enabled`; returns the value it had.
fn bpf_stats(on: bool) -> anyhow::Result<String> {
    let path = "/proc/sys/kernel/bpf_stats_enabled";
    let was = fs::read_to_string(path).context(path)?.trim().to_string();
    fs::write(path, if on { "1" } else { "0" }).context(path)?;
    Ok(was)
}

/// One program's figures in a statistics window.
struct ProgStat {
    name: String,
    runs: u64,
    ns: u64,
}

/// A window with BPF statistics on; returns the rate and the figures of the programs that
/// were loaded for `mode` (absent before it attached).
fn stats_window(
    cost: &mut Cost,
    bins: &Bins,
    ready: &Path,
    mode: Mode,
    workload: &str,
    seconds: f64,
) -> anyhow::Result<(f64, Vec<ProgStat>)> {
    let before = programs()?;
    let attached = Attached::start(bins, mode, ready)?;
    let a = programs()?;
    let rate = cost.run(workload, seconds)?;
    let b = programs()?;
    drop(attached);
    let mut out = Vec::new();
    for (id, (name, cnt, ns)) in b {
        if before.contains_key(&id) {
            continue;
        }
        let (c0, n0) = a.get(&id).map(|x| (x.1, x.2)).unwrap_or((0, 0));
        out.push(ProgStat {
            name,
            runs: cnt - c0,
            ns: ns - n0,
        });
    }
    Ok((rate, out))
}

fn median(v: &mut [f64]) -> f64 {
    v.sort_by(f64::total_cmp);
    let n = v.len();
    if n % 2 == 1 {
        v[n / 2]
    } else {
        (v[n / 2 - 1] + v[n / 2]) / 2.0
    }
}

fn pct_summary(ratios: &[f64]) -> String {
    let mut v = ratios.to_vec();
    let m = median(&mut v);
    format!(
        "{:.1} % ({:.1}-{:.1})",
        100.0 * m,
        100.0 * v[0],
        100.0 * v[v.len() - 1]
    )
}

pub(crate) fn run(ws: &Workspace, args: &Args) -> anyhow::Result<()> {
    if !util::is_root()? {
        bail!("bench-filter loads eBPF programs and makes namespaces: run it as root");
    }
    let tracer = util::release_tracer(ws, args.tracer.as_deref())?;
    let bins = Bins {
        tracer,
        baseline: args.baseline.clone(),
    };
    programs().context("bpftool is needed for the BPF statistics")?;
    let ready = std::env::temp_dir().join(format!("tracer-bench-{}.ready", std::process::id()));
    let mut cost = Cost::start(&bins.tracer)?;
    let mut modes = vec![Mode::Detached, Mode::Floor, Mode::Attached];
    if bins.baseline.is_some() {
        modes.push(Mode::Baseline);
    }
    let cpus = thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(1);
    println!(
        "bench-filter: {} rounds of {:.1} s windows per workload, {} in rotating order; the \
         workload's client, its server and the tracer share {cpus} CPUs unpinned",
        args.rounds,
        args.seconds,
        modes
            .iter()
            .map(|m| m.label())
            .collect::<Vec<_>>()
            .join(" / ")
    );
    let stats_were = bpf_stats(false)?;
    let result = (|| -> anyhow::Result<()> {
        for &w in &args.workloads {
            cost.run(w, 1.0)?; // warm-up
            let mut det = Vec::new();
            let mut ratios: BTreeMap<Mode, Vec<f64>> = BTreeMap::new();
            for round in 0..args.rounds {
                let mut order = modes.clone();
                order.rotate_left(round as usize % modes.len());
                let mut rates = BTreeMap::new();
                for mode in order {
                    let _on = Attached::start(&bins, mode, &ready)?;
                    let rate = cost.run(w, args.seconds)?;
                    eprintln!("  {w} round {}: {} {rate:.0}", round + 1, mode.label());
                    rates.insert(mode, rate);
                }
                let d = rates[&Mode::Detached];
                det.push(d);
                for (&m, &r) in rates.iter().filter(|(m, _)| **m != Mode::Detached) {
                    ratios.entry(m).or_default().push(r / d);
                }
            }
            let unit = match w {
                "tcp-bulk" => "MB/s",
                "tcp-crr" => "connections/s",
                _ => "round trips/s",
            };
            let shares: Vec<String> = ratios
                .iter()
                .map(|(m, r)| format!("{} {}", m.label(), pct_summary(r)))
                .collect();
            println!(
                "{w}: detached median {:.0} {unit}; {}",
                median(&mut det.clone()),
                shares.join("; ")
            );
            bpf_stats(true)?;
            for &mode in modes.iter().filter(|m| **m != Mode::Detached) {
                let (rate, progs) = stats_window(&mut cost, &bins, &ready, mode, w, args.seconds)?;
                // Operations of the window (MB for the stream).
                let ops = rate * args.seconds;
                let per = if w == "tcp-bulk" { "MB" } else { "op" };
                for p in progs.iter().filter(|p| p.runs > 0) {
                    println!(
                        "  {:<8} {:<22} {:>10} runs  {:>8.2} runs/{per}  {:>7.1} ns/run",
                        mode.label(),
                        p.name,
                        p.runs,
                        p.runs as f64 / ops.max(1.0),
                        p.ns as f64 / p.runs as f64
                    );
                }
            }
            bpf_stats(false)?;
        }
        Ok(())
    })();
    let _ = fs::write("/proc/sys/kernel/bpf_stats_enabled", &stats_were);
    let _ = fs::remove_file(&ready);
    result
}

//! `cargo xtask bench-load`: how `tracer watch --json` holds up under real DNS load. The
//! release tracer's hidden `tracer load-gen bench` builds one shape's network namespaces
//! (and pod cgroups), runs a responder and the generators in them and prints what they
//! counted; this verb starts and stops `tracer watch`, reads its `/proc` entries, reads
//! its output and prints one row per shape and rate.
//!
//! Per shape and rate: a window with the tracer detached, then the same window with it
//! attached, back to back on the same namespaces; the achieved rates of the two give the
//! paired ratio. Needs root. Everything the bench makes is removed by `load-gen bench`
//! on `quit`, on SIGINT/SIGTERM (Ctrl-C reaches the whole process group) and when this
//! process dies (its death signal); `tracer watch` is started under `setpriv --pdeathsig
//! INT` for the same reason, and its output goes to an unlinked file.

use std::{
    fs::{self, File},
    io::{BufRead as _, BufReader, Read as _, Seek as _, SeekFrom, Write as _},
    path::{Path, PathBuf},
    process::{Child, ChildStdin, Command, Stdio},
    sync::mpsc::{self, Receiver, RecvTimeoutError},
    thread,
    time::{Duration, Instant},
};

use anyhow::{bail, Context as _};
use serde_json::{json, Value};

use crate::{
    bench_load_report::{Row, WatchStats},
    util::{self, Workspace},
};

/// The generator shapes.
pub(crate) const SHAPES: [&str; 2] = ["one-process", "pods"];

pub(crate) struct Args {
    pub(crate) rates: Vec<u32>,
    pub(crate) seconds: u32,
    /// Names from [`SHAPES`].
    pub(crate) shapes: Vec<&'static str>,
    pub(crate) pods: u32,
    pub(crate) json: bool,
    /// A prebuilt tracer to run (nothing is built).
    pub(crate) tracer: Option<PathBuf>,
    /// Show the tail of watch's stderr after each attached window.
    pub(crate) stderr: bool,
}

/// How long setting up a shape may take (200 pods: a few seconds).
const SETUP_LIMIT: Duration = Duration::from_secs(300);
/// Added to a window's length when waiting for its report.
const RUN_SLACK: Duration = Duration::from_secs(60);
/// How long the tracer may take to attach, and to exit after SIGINT.
const READY_LIMIT: Duration = Duration::from_secs(30);
const STOP_LIMIT: Duration = Duration::from_secs(120);
/// Between two `/proc` samples of the tracer.
const SAMPLE_EVERY: Duration = Duration::from_millis(250);

/// `tracer load-gen bench`, driven over its stdin/stdout; told to quit (stdin closed) and
/// waited for on drop, then killed.
struct LoadGen {
    child: Child,
    stdin: Option<ChildStdin>,
    lines: Receiver<String>,
    ready: Value,
}

impl LoadGen {
    fn start(
        bin: &Path,
        shape: &str,
        args: &Args,
        cpus: Option<(usize, usize)>,
    ) -> anyhow::Result<LoadGen> {
        let mut cmd = Command::new(bin);
        cmd.args(["load-gen", "bench", "--shape", shape, "--pods"])
            .arg(args.pods.to_string());
        if let Some((g, r)) = cpus {
            cmd.args([
                "--generator-cpu",
                &g.to_string(),
                "--responder-cpu",
                &r.to_string(),
            ]);
        }
        cmd.stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit());
        let mut child = cmd.spawn().context("starting `tracer load-gen bench`")?;
        let stdout = child.stdout.take().context("no stdout pipe")?;
        let (tx, rx) = mpsc::channel();
        thread::spawn(move || {
            for line in BufReader::new(stdout).lines() {
                let Ok(line) = line else { break };
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
        let mut lg = LoadGen {
            stdin: child.stdin.take(),
            child,
            lines: rx,
            ready: Value::Null,
        };
        lg.ready = lg.wait_for("ready", SETUP_LIMIT, |_| {})?;
        Ok(lg)
    }

    /// Waits for the next line of type `kind`, at most `limit`, calling `tick` every
    /// [`SAMPLE_EVERY`] meanwhile with the time since the wait began.
    fn wait_for(
        &mut self,
        kind: &str,
        limit: Duration,
        mut tick: impl FnMut(Duration),
    ) -> anyhow::Result<Value> {
        let start = Instant::now();
        loop {
            let left = limit.saturating_sub(start.elapsed());
            if left.is_zero() {
                bail!("load-gen: no `{kind}` line within {limit:?}");
            }
            match self.lines.recv_timeout(left.min(SAMPLE_EVERY)) {
                Ok(line) => {
                    let v: Value = serde_json::from_str(&line)
                        .with_context(|| format!("load-gen printed {line:?}"))?;
                    match v["type"].as_str() {
                        Some(t) if t == kind => return Ok(v),
                        Some("error") => bail!("load-gen: {}", v["error"]),
                        _ => bail!("load-gen: expected `{kind}`, got {line}"),
                    }
                }
                Err(RecvTimeoutError::Timeout) => tick(start.elapsed()),
                Err(RecvTimeoutError::Disconnected) => {
                    let status = self.child.wait()?;
                    bail!(
                        "load-gen ended ({status}) before its `{kind}` line (its stderr is above)"
                    );
                }
            }
        }
    }

    /// One window; `tick` as in [`LoadGen::wait_for`].
    fn run(
        &mut self,
        rate: u32,
        seconds: u32,
        tick: impl FnMut(Duration),
    ) -> anyhow::Result<Value> {
        let stdin = self.stdin.as_mut().context("load-gen stopped")?;
        writeln!(stdin, "run {rate} {seconds}").context("writing to load-gen")?;
        stdin.flush()?;
        self.wait_for("run", Duration::from_secs(seconds.into()) + RUN_SLACK, tick)
    }

    /// Removes the shape's namespaces; fails if any were left behind.
    fn quit(mut self) -> anyhow::Result<Value> {
        drop(self.stdin.take());
        let done = self.wait_for("done", SETUP_LIMIT, |_| {})?;
        let left = done["leftovers"].as_array().map_or(0, Vec::len);
        if left > 0 {
            bail!("load-gen left behind {}", done["leftovers"]);
        }
        Ok(done)
    }
}

impl Drop for LoadGen {
    fn drop(&mut self) {
        drop(self.stdin.take());
        let deadline = Instant::now() + SETUP_LIMIT;
        while Instant::now() < deadline {
            if let Ok(Some(_)) = self.child.try_wait() {
                return;
            }
            thread::sleep(Duration::from_millis(50));
        }
        eprintln!("bench-load: load-gen did not exit; killing it (namespaces may be left: `ip netns list | grep ctload`)");
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A file that is already unlinked: gone once every descriptor of it is closed.
fn anon_file(tag: &str) -> anyhow::Result<File> {
    let path = std::env::temp_dir().join(format!("xtask-bench-load-{}-{tag}", std::process::id()));
    let f = fs::OpenOptions::new()
        .read(true)
        .write(true)
        .create_new(true)
        .open(&path)
        .with_context(|| format!("creating {}", path.display()))?;
    fs::remove_file(&path)?;
    Ok(f)
}

/// A running `tracer watch --json`; stopped on drop (SIGINT, then SIGKILL).
struct Watch {
    child: Option<Child>,
    out: File,
    err: File,
}

fn signal(pid: u32, sig: &str) {
    let _ = Command::new("kill").args([sig, &pid.to_string()]).status();
}

impl Watch {
    fn start(bin: &Path, ready: &Path, root: Option<&str>) -> anyhow::Result<Watch> {
        let _ = fs::remove_file(ready);
        let (out, err) = (anon_file("out")?, anon_file("err")?);
        let mut cmd = match util_setpriv() {
            Some(setpriv) => {
                let mut c = Command::new(setpriv);
                c.args(["--pdeathsig", "INT", "--"]).arg(bin);
                c
            }
            None => Command::new(bin),
        };
        cmd.args(["watch", "--json", "--ready-file"]).arg(ready);
        if let Some(root) = root {
            cmd.args(["--root", root]);
        }
        cmd.stdin(Stdio::null())
            .stdout(out.try_clone()?)
            .stderr(err.try_clone()?);
        let child = cmd.spawn().context("starting tracer watch")?;
        let mut w = Watch {
            child: Some(child),
            out,
            err,
        };
        let deadline = Instant::now() + READY_LIMIT;
        while !ready.exists() {
            if let Some(s) = w.child.as_mut().and_then(|c| c.try_wait().ok().flatten()) {
                bail!(
                    "tracer watch exited with {s} before it was ready: {}",
                    w.stderr_tail()
                );
            }
            if Instant::now() > deadline {
                bail!(
                    "tracer watch not ready after {READY_LIMIT:?}: {}",
                    w.stderr_tail()
                );
            }
            thread::sleep(Duration::from_millis(20));
        }
        Ok(w)
    }

    fn pid(&self) -> u32 {
        self.child.as_ref().map_or(0, Child::id)
    }

    fn stderr_tail(&mut self) -> String {
        let mut s = String::new();
        let _ = self.err.seek(SeekFrom::Start(0));
        let _ = (&self.err).take(1 << 20).read_to_string(&mut s);
        let lines: Vec<&str> = s.lines().collect();
        lines[lines.len().saturating_sub(15)..].join("\n")
    }

    /// SIGINT; waits for the exit. Returns the seconds it took and whether it had to be
    /// killed.
    fn stop(&mut self) -> (f64, bool) {
        let Some(mut child) = self.child.take() else {
            return (0.0, false);
        };
        let t = Instant::now();
        signal(child.id(), "-INT");
        while t.elapsed() < STOP_LIMIT {
            if let Ok(Some(_)) = child.try_wait() {
                return (t.elapsed().as_secs_f64(), false);
            }
            thread::sleep(Duration::from_millis(5));
        }
        let _ = child.kill();
        let _ = child.wait();
        (t.elapsed().as_secs_f64(), true)
    }
}

impl Drop for Watch {
    fn drop(&mut self) {
        self.stop();
    }
}

fn util_setpriv() -> Option<PathBuf> {
    ["/usr/bin/setpriv", "/bin/setpriv"]
        .iter()
        .map(PathBuf::from)
        .find(|p| p.is_file())
}

/// `/proc/PID/stat` utime + stime, in clock ticks.
fn cpu_ticks(pid: u32) -> Option<u64> {
    let stat = fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // After the `(comm)`, which may hold spaces: state is field 3, utime 14, stime 15.
    let rest = &stat[stat.rfind(')')? + 2..];
    let f: Vec<&str> = rest.split_whitespace().collect();
    Some(f.get(11)?.parse::<u64>().ok()? + f.get(12)?.parse::<u64>().ok()?)
}

/// A `/proc/PID/status` field in kB (VmRSS, VmHWM).
fn status_kib(pid: u32, field: &str) -> Option<u64> {
    let status = fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let line = status
        .lines()
        .find_map(|l| l.strip_prefix(field)?.strip_prefix(':'))?;
    line.split_whitespace().next()?.parse().ok()
}

fn clock_ticks_per_s() -> f64 {
    util::output(Command::new("getconf").arg("CLK_TCK"))
        .ok()
        .and_then(|s| s.trim().parse::<f64>().ok())
        .filter(|&t| t > 0.0)
        .unwrap_or(100.0)
}

/// Reads the tracer's JSON lines as a stream: counts lines and bytes, tallies the lookups
/// of the bench's names (`*.load.test`; pods: also in the bench's namespace) by outcome,
/// and keeps the summary line.
fn read_output(out: &mut File, stats: &mut WatchStats) -> anyhow::Result<()> {
    out.seek(SeekFrom::Start(0))?;
    let mut r = BufReader::with_capacity(1 << 20, &*out);
    let mut line = Vec::with_capacity(4096);
    // Bounded by the file's length.
    loop {
        line.clear();
        let n = r.read_until(b'\n', &mut line)?;
        if n == 0 {
            break;
        }
        stats.lines += 1;
        stats.bytes += n as u64;
        let Ok(text) = std::str::from_utf8(&line) else {
            continue;
        };
        let lookup = text.contains("\"type\":\"lookup\"");
        if !lookup && !text.contains("\"type\":\"summary\"") {
            continue;
        }
        let v: Value = match serde_json::from_str(text) {
            Ok(v) => v,
            Err(_) => continue,
        };
        match v["type"].as_str() {
            Some("lookup") => {
                let name = v["name"].as_str().unwrap_or_default();
                if !name.ends_with(".load.test") {
                    continue;
                }
                let outcome = v["outcome"].as_str().unwrap_or("?").to_string();
                *stats.lookups.entry(outcome).or_default() += 1;
                let w = &v["workload"];
                if w["namespace"] == "load-bench"
                    && w["pod"].as_str().is_some_and(|p| p.starts_with("load-"))
                {
                    stats.named += 1;
                }
            }
            Some("summary") => stats.summary = v,
            _ => {}
        }
    }
    Ok(())
}

/// One window with the tracer attached: the tracer's figures and the load's truth.
fn attached(
    bin: &Path,
    load: &mut LoadGen,
    rate: u32,
    seconds: u32,
    show_stderr: bool,
) -> anyhow::Result<(WatchStats, Value)> {
    let workdir = load.ready["workdir"]
        .as_str()
        .context("no workdir")?
        .to_string();
    let ready = Path::new(&workdir).join("watch.ready");
    let root = load.ready["root"].as_str().map(str::to_string);
    let mut watch = Watch::start(bin, &ready, root.as_deref())?;
    let pid = watch.pid();
    let mut stats = WatchStats::default();
    let cpu0 = cpu_ticks(pid).context("reading the tracer's /proc/PID/stat")?;
    let t0 = Instant::now();
    let half = Duration::from_secs(seconds.into()) / 2;
    let mut steady = Vec::new();
    let truth = load.run(rate, seconds, |since| {
        if since >= half && since <= Duration::from_secs(seconds.into()) {
            if let Some(kib) = status_kib(pid, "VmRSS") {
                steady.push(kib);
            }
        }
    })?;
    let wall = t0.elapsed().as_secs_f64();
    let cpu1 = cpu_ticks(pid).context("the tracer exited during the window")?;
    stats.cpu_pct = 100.0 * (cpu1 - cpu0) as f64 / clock_ticks_per_s() / wall;
    stats.rss_peak_kib = status_kib(pid, "VmHWM").unwrap_or(0);
    steady.sort_unstable();
    stats.rss_steady_kib = steady.get(steady.len() / 2).copied().unwrap_or(0);
    let (stop_s, killed) = watch.stop();
    stats.stop_s = stop_s;
    stats.killed = killed;
    if show_stderr {
        println!("tracer watch's stderr (tail):\n{}", watch.stderr_tail());
    }
    read_output(&mut watch.out, &mut stats)?;
    if stats.summary.is_null() {
        bail!(
            "tracer watch printed no summary line (stopped in {stop_s:.1} s{}): {}",
            if killed { ", killed" } else { "" },
            watch.stderr_tail()
        );
    }
    Ok((stats, truth))
}

pub(crate) fn run(ws: &Workspace, args: &Args) -> anyhow::Result<()> {
    if !util::is_root()? {
        bail!("bench-load builds network namespaces and loads eBPF programs: run it as root");
    }
    let bin = util::release_tracer(ws, args.tracer.as_deref())?;
    let cpus = thread::available_parallelism().map_or(1, usize::from);
    let pinning = (cpus >= 2).then_some((0, 1));
    println!(
        "bench-load: shapes {}, rates {:?} queries/s, {} s per window, detached then attached",
        args.shapes.join(", "),
        args.rates,
        args.seconds
    );
    match pinning {
        Some((g, r)) => println!(
            "bench-load: {cpus} CPUs shared: generator(s) pinned to CPU {g}, responder pinned to \
             CPU {r}, tracer watch unpinned (softirq work runs where each packet is sent)"
        ),
        None => println!("bench-load: 1 CPU: nothing pinned"),
    }
    let mut rows = Vec::new();
    for &shape in &args.shapes {
        let mut load = LoadGen::start(&bin, shape, args, pinning)?;
        println!(
            "bench-load: {shape}: {} namespaces{} ready in {:.1} s",
            load.ready["namespaces"],
            if shape == "pods" {
                format!(" ({} pods with cgroups)", load.ready["pods"])
            } else {
                String::new()
            },
            load.ready["setup_s"].as_f64().unwrap_or(0.0)
        );
        for &rate in &args.rates {
            let detached = load.run(rate, args.seconds, |_| {})?;
            println!(
                "  {shape} {rate}/s detached: {}",
                Row::truth_line(&detached)
            );
            let (watch, truth) = attached(&bin, &mut load, rate, args.seconds, args.stderr)?;
            println!("  {shape} {rate}/s attached: {}", Row::truth_line(&truth));
            let row = Row::new(shape, rate, args.seconds, detached, truth, watch);
            println!("  {}", row.tracer_line());
            rows.push(row);
        }
        let done = load.quit()?;
        println!(
            "bench-load: {shape}: removed everything in {:.1} s",
            done["cleanup_s"].as_f64().unwrap_or(0.0)
        );
    }
    println!();
    print!("{}", crate::bench_load_report::table(&rows));
    if args.json {
        for r in &rows {
            println!("{}", json!(r.to_json()));
        }
    }
    Ok(())
}

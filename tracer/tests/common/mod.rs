//! Shared pieces of the privileged integration tests: running the real `tracer` binary and
//! a two-namespace lab (client and server joined by a veth pair).
#![allow(dead_code, reason = "each test binary uses a different subset")]

pub mod chromium;
pub mod leaks;

pub use leaks::{assert_no_leftovers, Baseline};

use std::{
    fs,
    net::IpAddr,
    path::{Path, PathBuf},
    process::{Child, Command},
    time::{Duration, Instant},
};

use serde_json::Value;
use tracer::netns::{self, Netns};

pub const TRACER: &str = env!("CARGO_BIN_EXE_tracer");

/// Whether this kernel allows BPF trampolines: our build and CI kernels refuse them; the
/// guest tier (`cargo xtask test`, Debian's 6.1) sets `TRACER_TEST_TRAMPOLINES=allowed`.
/// There the precise sources (fentry/fexit) are chosen and the tests expect what only they
/// give.
pub fn trampolines() -> bool {
    std::env::var("TRACER_TEST_TRAMPOLINES").is_ok_and(|v| v == "allowed")
}

/// A bound on waiting for something that normally takes well under `secs`, stretched by
/// `TRACER_TEST_TIME_SCALE` where the machine is emulated: the guest tier runs under TCG,
/// where every fentry/fexit attach alone takes about 2 s. Bounds, not measurements: no
/// test asserts a speed with it.
pub fn bound(secs: u64) -> Duration {
    Duration::from_secs(secs * time_scale())
}

/// [`bound`] for a fraction of a second (a slack on top of a wait the kernel or a client
/// makes, e.g. a resolver's 1 s timeout plus at most `bound_ms(500)`).
pub fn bound_ms(ms: u64) -> Duration {
    Duration::from_millis(ms * time_scale())
}

/// `TRACER_TEST_TIME_SCALE` (at least 1).
pub fn time_scale() -> u64 {
    std::env::var("TRACER_TEST_TIME_SCALE")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(1u64)
        .max(1)
}

/// For a test this machine truly can not run (never for a missing tool `cargo xtask setup`
/// installs, nor for a missing privilege: those fail). Says so loudly and records
/// `SKIPPED: <binary>::<test>: <reason>` in `$TRACER_TEST_SKIPS`, which both tiers of
/// `cargo xtask test` collect, count and print; the caller then returns.
pub fn skip(reason: &str) {
    use std::io::Write as _;
    let thread = std::thread::current();
    let line = format!(
        "SKIPPED: {}::{}: {reason}",
        env!("CARGO_CRATE_NAME"),
        thread.name().unwrap_or("?")
    );
    eprintln!("{line}");
    println!("{line}");
    if let Some(path) = std::env::var_os("TRACER_TEST_SKIPS") {
        let mut f = fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&path)
            .unwrap_or_else(|e| panic!("{}: {e}", Path::new(&path).display()));
        writeln!(f, "{line}").unwrap();
    }
}

/// Panics unless root: these tests load programs into the running kernel.
pub fn require_root() {
    assert!(
        netns::is_root(),
        "the kernel tests load eBPF programs and build network namespaces: run them as root \
         (`cargo xtask test` does)"
    );
}

/// A running `tracer watch --json`, stopped (SIGINT, then SIGKILL) on drop. Stopping or
/// killing it checks that it left no program, map or link of ours loaded.
pub struct TracerRun {
    child: Option<Child>,
    dir: PathBuf,
    before: Baseline,
}

impl TracerRun {
    /// Starts `tracer watch --json` with `extra` args and waits for its ready file.
    pub fn start(extra: &[&str]) -> TracerRun {
        Self::start_verb("watch", extra)
    }

    /// Starts `tracer VERB --json` (watch or record) with `extra` args, in which `{dir}`
    /// stands for the run's own temporary directory, and waits for its ready file.
    pub fn start_verb(verb: &str, extra: &[&str]) -> TracerRun {
        let before = Baseline::take();
        let dir =
            std::env::temp_dir().join(format!("tracer-test-{}-{}", std::process::id(), unique()));
        fs::create_dir_all(&dir).unwrap();
        let ready = dir.join("ready");
        let out = fs::File::create(dir.join("out.jsonl")).unwrap();
        let err = fs::File::create(dir.join("err.log")).unwrap();
        let child = Command::new(TRACER)
            .args([verb, "--json", "--ready-file"])
            .arg(&ready)
            .args(
                extra
                    .iter()
                    .map(|a| a.replace("{dir}", &dir.display().to_string())),
            )
            .stdout(out)
            .stderr(err)
            .spawn()
            .expect("spawning tracer");
        let mut run = TracerRun {
            child: Some(child),
            dir,
            before,
        };
        let deadline = Instant::now() + bound(30);
        while !ready.exists() {
            if let Some(status) = run.child.as_mut().unwrap().try_wait().unwrap() {
                panic!(
                    "tracer exited with {status} before it was ready:\n{}",
                    run.stderr()
                );
            }
            assert!(
                Instant::now() < deadline,
                "tracer not ready after {:?}:\n{}",
                bound(30),
                run.stderr()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
        run
    }

    /// The run's temporary directory (removed on drop).
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Its stdout so far.
    pub fn stdout(&self) -> String {
        fs::read_to_string(self.dir.join("out.jsonl")).unwrap_or_default()
    }

    /// The process id (for a SIGKILL).
    pub fn pid(&self) -> u32 {
        self.child.as_ref().unwrap().id()
    }

    pub fn stderr(&self) -> String {
        fs::read_to_string(self.dir.join("err.log")).unwrap_or_default()
    }

    /// Stops the tracer with SIGINT (as Ctrl-C would) and returns every JSON line it wrote.
    /// Panics if it does not exit cleanly within 60 s (scaled).
    pub fn stop(self) -> Vec<Value> {
        self.stop_with(libc::SIGINT)
    }

    /// Stops the tracer with `sig` (SIGINT or SIGTERM) and returns every JSON line it wrote.
    pub fn stop_with(mut self, sig: i32) -> Vec<Value> {
        let text = self.stop_raw(sig);
        text.lines()
            .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("bad JSON line {l:?}: {e}")))
            .collect()
    }

    /// Stops the tracer with `sig`, asserts a clean exit, and returns its stdout as written.
    pub fn stop_raw(&mut self, sig: i32) -> String {
        let mut child = self.child.take().unwrap();
        signal(child.id(), sig);
        // `record --bundle` replays the trace and packs the bundle before it exits.
        let status = wait_timeout(&mut child, bound(60)).unwrap_or_else(|| {
            let _ = child.kill();
            let _ = child.wait();
            panic!(
                "tracer did not stop within {:?} of signal {sig}:\n{}",
                bound(60),
                self.stderr()
            )
        });
        assert!(
            status.success(),
            "tracer exited with {status}:\n{}",
            self.stderr()
        );
        self.before.assert_released("tracer");
        fs::read_to_string(self.dir.join("out.jsonl")).unwrap()
    }

    /// Ends the tracer with SIGKILL (nothing of it runs after) and reaps it. Whatever it
    /// had loaded must then be released: the caller checks, with [`TracerRun::before`],
    /// once nothing else it started is loading programs.
    pub fn kill(&mut self) {
        let mut child = self.child.take().unwrap();
        signal(child.id(), libc::SIGKILL);
        assert!(
            wait_timeout(&mut child, bound(10)).is_some(),
            "tracer still running {:?} after SIGKILL",
            bound(10)
        );
    }

    /// Ours loaded before this tracer started.
    pub fn before(&self) -> &Baseline {
        &self.before
    }
}

impl Drop for TracerRun {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
        let _ = fs::remove_dir_all(&self.dir);
    }
}

pub fn signal(pid: u32, sig: i32) {
    // SAFETY: kill(2) with a pid we spawned and still own (not yet reaped).
    unsafe { libc::kill(pid as i32, sig) };
}

pub fn wait_timeout(child: &mut Child, limit: Duration) -> Option<std::process::ExitStatus> {
    let deadline = Instant::now() + limit;
    loop {
        if let Some(s) = child.try_wait().unwrap() {
            return Some(s);
        }
        if Instant::now() >= deadline {
            return None;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn unique() -> u64 {
    use std::sync::atomic::{AtomicU64, Ordering};
    static N: AtomicU64 = AtomicU64::new(0);
    N.fetch_add(1, Ordering::Relaxed)
}

/// `/etc/netns/NAME/resolv.conf`, which `ip netns exec` bind-mounts over /etc/resolv.conf
/// for processes in that namespace; removed on drop.
pub struct NetnsResolvConf {
    dir: PathBuf,
}

impl NetnsResolvConf {
    pub fn write(ns: &Netns, text: &str) -> NetnsResolvConf {
        let dir = Path::new("/etc/netns").join(ns.name());
        fs::create_dir_all(&dir).unwrap();
        fs::write(dir.join("resolv.conf"), text).unwrap();
        NetnsResolvConf { dir }
    }
}

impl Drop for NetnsResolvConf {
    fn drop(&mut self) {
        let _ = fs::remove_dir_all(&self.dir);
    }
}

/// A client namespace and a server namespace joined by a veth pair, IPv4 and IPv6.
pub struct Lab {
    pub client: Netns,
    pub server: Netns,
}

pub const CLIENT_V4: &str = "10.77.0.2";
pub const SERVER_V4: &str = "10.77.0.1";
pub const CLIENT_V6: &str = "fd77::2";
pub const SERVER_V6: &str = "fd77::1";

impl Lab {
    pub fn new(prefix: &str) -> Lab {
        let client = Netns::create(&format!("{prefix}c")).unwrap();
        let server = Netns::create(&format!("{prefix}s")).unwrap();
        netns::veth_pair(
            &client,
            &[&format!("{CLIENT_V4}/24"), &format!("{CLIENT_V6}/64")],
            &server,
            &[&format!("{SERVER_V4}/24"), &format!("{SERVER_V6}/64")],
        )
        .unwrap();
        Lab { client, server }
    }

    pub fn server_ips() -> [IpAddr; 2] {
        [SERVER_V4.parse().unwrap(), SERVER_V6.parse().unwrap()]
    }
}

/// Events of one `type` from a tracer run.
pub fn of_type<'a>(events: &'a [Value], ty: &str) -> Vec<&'a Value> {
    events.iter().filter(|e| e["type"] == ty).collect()
}

/// The summary line every run ends with.
pub fn summary(events: &[Value]) -> &Value {
    events
        .iter()
        .rev()
        .find(|e| e["type"] == "summary")
        .expect("no summary line")
}

/// The lab's namespace prefix.
pub const PREFIX: &str = tracer::lab::topology::PREFIX;

/// Runs `tracer lab ARGS --json --quiet` and returns the report; asserts a clean exit,
/// all checks ok, no tracer losses or decode errors, and nothing of the lab left behind
/// (namespaces, processes, temp dirs, and the programs, maps and links it loaded).
pub fn lab(args: &[&str]) -> Value {
    require_root();
    let before = Baseline::take();
    let out = Command::new(TRACER)
        .arg("lab")
        .args(args)
        .args(["--json", "--quiet"])
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    let stdout = String::from_utf8_lossy(&out.stdout);
    let report: Value = stdout
        .lines()
        .last()
        .and_then(|l| serde_json::from_str(l).ok())
        .unwrap_or_else(|| panic!("no report from `tracer lab {args:?}`:\n{stdout}\n{stderr}"));
    assert_lab_report(&report);
    assert!(
        out.status.success(),
        "tracer lab {args:?} failed:\n{stderr}"
    );
    assert_no_leftovers(&before);
    report
}

/// A lab report whose checks all hold, with no tracer losses and no decode errors.
pub fn assert_lab_report(report: &Value) {
    assert_eq!(report["type"], "lab_report");
    for c in report["checks"].as_array().unwrap() {
        assert_eq!(c["ok"], true, "check failed: {c}\n{report:#}");
    }
    assert_eq!(report["tracer_lost"], 0, "{report:#}");
    assert_eq!(report["decode_errors"], 0, "{report:#}");
}

/// The body of `GET /metrics` at `addr`.
pub fn scrape(addr: &str) -> String {
    use std::io::{Read as _, Write as _};
    let mut s = std::net::TcpStream::connect(addr).expect("connect to the metrics endpoint");
    s.set_read_timeout(Some(bound(5))).unwrap();
    s.write_all(b"GET /metrics HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n")
        .unwrap();
    let mut out = String::new();
    s.read_to_string(&mut out).unwrap();
    assert!(out.starts_with("HTTP/1.1 200"), "{out}");
    out.split_once("\r\n\r\n")
        .map(|(_, b)| b.to_string())
        .unwrap_or_default()
}

/// The value of the sample `name{labels}` whose labels include all of `want`.
pub fn sample(body: &str, name: &str, want: &[(&str, &str)]) -> Option<f64> {
    body.lines().filter(|l| !l.starts_with('#')).find_map(|l| {
        let (series, value) = l.rsplit_once(' ')?;
        let (n, labels) = series.split_once('{').unwrap_or((series, "}"));
        if n != name {
            return None;
        }
        let labels = labels.trim_end_matches('}');
        let have: Vec<(&str, &str)> = labels
            .split(',')
            .filter_map(|kv| kv.split_once('='))
            .map(|(k, v)| (k, v.trim_matches('"')))
            .collect();
        want.iter()
            .all(|w| have.contains(w))
            .then(|| value.parse().ok())
            .flatten()
    })
}

//! Shared pieces of the privileged integration tests: running the real `tracer` binary and
//! a two-namespace lab (client and server joined by a veth pair).
#![allow(dead_code, reason = "each test binary uses a different subset")]

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

/// Panics unless root: these tests load programs into the running kernel.
pub fn require_root() {
    assert!(
        netns::is_root(),
        "the kernel tests load eBPF programs and build network namespaces: run them as root \
         (`cargo xtask test` does)"
    );
}

/// A running `tracer watch --json`, stopped (SIGINT, then SIGKILL) on drop.
pub struct TracerRun {
    child: Option<Child>,
    dir: PathBuf,
}

impl TracerRun {
    /// Starts `tracer watch --json` with `extra` args and waits for its ready file.
    pub fn start(extra: &[&str]) -> TracerRun {
        let dir =
            std::env::temp_dir().join(format!("tracer-test-{}-{}", std::process::id(), unique()));
        fs::create_dir_all(&dir).unwrap();
        let ready = dir.join("ready");
        let out = fs::File::create(dir.join("out.jsonl")).unwrap();
        let err = fs::File::create(dir.join("err.log")).unwrap();
        let child = Command::new(TRACER)
            .args(["watch", "--json", "--ready-file"])
            .arg(&ready)
            .args(extra)
            .stdout(out)
            .stderr(err)
            .spawn()
            .expect("spawning tracer");
        let mut run = TracerRun {
            child: Some(child),
            dir,
        };
        let deadline = Instant::now() + Duration::from_secs(30);
        while !ready.exists() {
            if let Some(status) = run.child.as_mut().unwrap().try_wait().unwrap() {
                panic!(
                    "tracer exited with {status} before it was ready:\n{}",
                    run.stderr()
                );
            }
            assert!(
                Instant::now() < deadline,
                "tracer not ready after 30 s:\n{}",
                run.stderr()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
        run
    }

    pub fn stderr(&self) -> String {
        fs::read_to_string(self.dir.join("err.log")).unwrap_or_default()
    }

    /// Stops the tracer with SIGINT (as Ctrl-C would) and returns every JSON line it wrote.
    /// Panics if it does not exit cleanly within 10 s.
    pub fn stop(self) -> Vec<Value> {
        self.stop_with(libc::SIGINT)
    }

    /// Stops the tracer with `sig` (SIGINT or SIGTERM) and returns every JSON line it wrote.
    pub fn stop_with(mut self, sig: i32) -> Vec<Value> {
        let mut child = self.child.take().unwrap();
        signal(child.id(), sig);
        let status = wait_timeout(&mut child, Duration::from_secs(10)).unwrap_or_else(|| {
            let _ = child.kill();
            let _ = child.wait();
            panic!(
                "tracer did not stop within 10 s of signal {sig}:\n{}",
                self.stderr()
            )
        });
        assert!(
            status.success(),
            "tracer exited with {status}:\n{}",
            self.stderr()
        );
        let text = fs::read_to_string(self.dir.join("out.jsonl")).unwrap();
        text.lines()
            .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("bad JSON line {l:?}: {e}")))
            .collect()
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

//! The bench's namespaces, pods and responder. Each shape puts the responder in a server
//! namespace behind the service VIP ([`super::VIP`]), DNATed the way kube-proxy does it,
//! with conntrack engaged on both sides:
//!
//! ```text
//! one-process:  client (10.247.0.2, ct rule)  ==veth==  server (10.247.0.1, nat PREROUTING: VIP -> 10.247.0.1, ct rule)
//! pods:         pod i (10.250.i.2)  ==veth==  node (forwarding, nat PREROUTING: VIP -> 10.246.0.2)
//!                                                ==veth==  server (10.246.0.2, ct rule)
//! ```
//!
//! The DNAT is on the far side of the veth, as a node's is for its pods, so the client sees
//! the VIP both ways. (A DNAT in the client's own OUTPUT hook, as for a host-network process,
//! shows the tracer's fallback path the query to the backend and the answer from the VIP.)
//!
//! In the pods shape every pod also gets a kubelet-like cgroup and a `/var/log/pods` entry
//! ([`LabPodCgroups`]) in a temporary node root that also links `proc` and `sys` to the real
//! ones, so `tracer watch --root <node root>` names the pods. The UDP conntrack timeouts of
//! the namespaces with rules are cut to 2 s: the pods' lookups each make a new flow (up to
//! 100,000/s), which at the default 30 s would fill the global `nf_conntrack_max`.
//!
//! Everything is removed on drop, field by field: the responder, the cgroups (and node root),
//! then the namespaces with anything still running in them.

use std::{
    io::Write as _,
    os::fd::AsRawFd as _,
    path::{Path, PathBuf},
    process::{Child, ChildStdin, ChildStdout, Command, Stdio},
    time::{Duration, Instant},
};

use anyhow::{bail, Context as _, Result};
use log::warn;

use super::{responder::ResponderStats, FdLines, POD_NAMESPACE, VIP};
use crate::{
    lab::kubepods::{LabPod, LabPodCgroups, Layout, PodSpec},
    netns::{self, Netns},
};

/// Prefix of the bench's namespaces (`ctload-<pid>-<n>`); not the lab's, whose runs check
/// that none of theirs are left.
pub const PREFIX: &str = "ctload";
/// Where the responder listens, in the server namespace.
const SERVER_ONE_PROCESS: &str = "10.247.0.1";
const SERVER_PODS: &str = "10.246.0.2";
/// The UDP conntrack timeouts in the namespaces with rules, in seconds.
const UDP_TIMEOUT: &str = "2";
/// How long the responder may take to start, and to answer `stats`.
const RESPONDER_WAIT: Duration = Duration::from_secs(10);

/// A rule that makes conntrack track the namespace's traffic at `hook` (`input`, `output`).
fn track(hook: &str) -> String {
    format!(
        "table inet load {{\n  chain {hook} {{\n    type filter hook {hook} priority 0; \
         policy accept;\n    ct state new counter accept\n  }}\n}}\n"
    )
}

/// The responder process and its control pipes; stopped (stdin closed, then SIGKILL) on drop.
pub struct Responder {
    stdin: Option<ChildStdin>,
    lines: FdLines,
    // Kept open for `lines`.
    _stdout: ChildStdout,
    child: Child,
}

impl Responder {
    fn start(server: &Netns, bin: &Path, cpu: Option<usize>) -> Result<Responder> {
        let mut cmd = server.command(bin);
        cmd.args(["load-gen", "responder", "--bind", "0.0.0.0:53"]);
        if let Some(cpu) = cpu {
            cmd.args(["--cpu", &cpu.to_string()]);
        }
        cmd.stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit());
        let mut child = cmd
            .spawn()
            .with_context(|| format!("starting `{}`", netns::render_command(&cmd)))?;
        let (stdin, stdout) = (child.stdin.take(), child.stdout.take());
        let Some(stdout) = stdout else {
            let _ = child.kill();
            let _ = child.wait();
            bail!("the responder has no stdout pipe");
        };
        let mut r = Responder {
            stdin,
            lines: FdLines::new(stdout.as_raw_fd()),
            _stdout: stdout,
            child,
        };
        match r.lines.next_line(RESPONDER_WAIT)? {
            Some(l) if l.contains("\"ready\"") => Ok(r),
            other => bail!("the responder did not start: {other:?}"),
        }
    }

    /// Its counters since it started.
    pub fn stats(&mut self) -> Result<ResponderStats> {
        let stdin = self.stdin.as_mut().context("responder stopped")?;
        stdin
            .write_all(b"stats\n")
            .and_then(|()| stdin.flush())
            .context("asking the responder for its counters")?;
        let line = self
            .lines
            .next_line(RESPONDER_WAIT)?
            .context("the responder ended")?;
        serde_json::from_str(&line).with_context(|| format!("responder said {line:?}"))
    }
}

impl Drop for Responder {
    fn drop(&mut self) {
        drop(self.stdin.take());
        let deadline = Instant::now() + Duration::from_secs(2);
        while Instant::now() < deadline {
            if let Ok(Some(_)) = self.child.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        if let Err(e) = self.child.kill() {
            warn!("killing the responder (pid {}): {e}", self.child.id());
        }
        let _ = self.child.wait();
    }
}

/// One shape's namespaces (and pods), with the responder running.
pub struct Topology {
    // Field order is drop order: processes, cgroups, then namespaces.
    pub responder: Responder,
    cgroups: Option<LabPodCgroups>,
    pods: Vec<Netns>,
    client: Option<Netns>,
    node: Option<Netns>,
    _server: Netns,
}

fn short_udp_timeouts(ns: &Netns) -> Result<()> {
    for key in [
        "net.netfilter.nf_conntrack_udp_timeout",
        "net.netfilter.nf_conntrack_udp_timeout_stream",
    ] {
        ns.sysctl_set(key, UDP_TIMEOUT)?;
    }
    Ok(())
}

fn dnat(chain: &str, hook: &str, to: &str) -> String {
    format!(
        "table ip load {{\n  chain {chain} {{\n    type nat hook {hook} priority -100; policy accept;\n    \
         ip daddr {VIP} udp dport 53 dnat to {to}\n  }}\n}}\n"
    )
}

impl Topology {
    /// Shape one-process: a client and a server namespace.
    pub fn one_process(bin: &Path, responder_cpu: Option<usize>) -> Result<Topology> {
        let server = Netns::create(PREFIX)?;
        let client = Netns::create(PREFIX)?;
        netns::veth_pair_named(
            &client,
            "eth0",
            &["10.247.0.2/24"],
            &server,
            "eth0",
            &[&format!("{SERVER_ONE_PROCESS}/24")],
        )?;
        client.route_add(&format!("default via {SERVER_ONE_PROCESS}"))?;
        client.nft(&track("output"))?;
        server.nft(&dnat("pre", "prerouting", SERVER_ONE_PROCESS))?;
        server.nft(&track("input"))?;
        for ns in [&client, &server] {
            short_udp_timeouts(ns)?;
        }
        let responder = Responder::start(&server, bin, responder_cpu)?;
        Ok(Topology {
            responder,
            cgroups: None,
            pods: Vec::new(),
            client: Some(client),
            node: None,
            _server: server,
        })
    }

    /// Shape pods: `pods` pod namespaces with their cgroups behind a node, and a server.
    pub fn pods(bin: &Path, pods: usize, responder_cpu: Option<usize>) -> Result<Topology> {
        anyhow::ensure!(
            (1..=super::MAX_PODS).contains(&pods),
            "need 1..={} pods, got {pods}",
            super::MAX_PODS
        );
        let server = Netns::create(PREFIX)?;
        let node = Netns::create(PREFIX)?;
        node.sysctl_set("net.ipv4.ip_forward", "1")?;
        netns::veth_pair_named(
            &server,
            "eth0",
            &[&format!("{SERVER_PODS}/24")],
            &node,
            "srv",
            &["10.246.0.1/24"],
        )?;
        server.route_add("default via 10.246.0.1")?;
        node.nft(&dnat("pre", "prerouting", SERVER_PODS))?;
        server.nft(&track("input"))?;
        for ns in [&node, &server] {
            short_udp_timeouts(ns)?;
        }
        let mut netns = Vec::with_capacity(pods);
        for i in 0..pods {
            let pod = Netns::create(PREFIX)?;
            netns::veth_pair_named(
                &pod,
                "eth0",
                &[&format!("10.250.{i}.2/24")],
                &node,
                &format!("p{i}"),
                &[&format!("10.250.{i}.1/24")],
            )
            .with_context(|| format!("pod {i}"))?;
            pod.route_add(&format!("default via 10.250.{i}.1"))?;
            netns.push(pod);
        }
        let specs: Vec<PodSpec> = (0..pods)
            .map(|i| PodSpec::new(POD_NAMESPACE, &pod_name(i), Layout::Systemd))
            .collect();
        let cgroups = LabPodCgroups::create(&specs)?;
        // The node root the tracer reads: the pods' logs, and the real /proc and cgroups.
        for dir in ["proc", "sys"] {
            let link = cgroups.node_root().join(dir);
            std::os::unix::fs::symlink(Path::new("/").join(dir), &link)
                .with_context(|| format!("linking {}", link.display()))?;
        }
        let responder = Responder::start(&server, bin, responder_cpu)?;
        Ok(Topology {
            responder,
            cgroups: Some(cgroups),
            pods: netns,
            client: None,
            node: Some(node),
            _server: server,
        })
    }

    /// The node root for `tracer watch --root` (pods shape).
    pub fn node_root(&self) -> Option<PathBuf> {
        self.cgroups.as_ref().map(|c| c.node_root().to_path_buf())
    }

    /// How many namespaces the shape made.
    pub fn namespaces(&self) -> usize {
        1 + self.pods.len() + usize::from(self.client.is_some()) + usize::from(self.node.is_some())
    }

    /// A command that runs `bin` in the one-process client namespace.
    pub fn client_command(&self, bin: &Path) -> Result<Command> {
        Ok(self
            .client
            .as_ref()
            .context("not the one-process shape")?
            .command(bin))
    }

    /// A command that runs `bin` in pod `i`'s namespace and cgroup.
    pub fn pod_command(&self, i: usize, bin: &Path) -> Result<Command> {
        let ns = self.pods.get(i).context("no such pod")?;
        let pod: &LabPod = self
            .cgroups
            .as_ref()
            .and_then(|c| c.pods().get(i))
            .context("no such pod cgroup")?;
        let mut cmd = ns.command(bin);
        pod.enter(&mut cmd);
        Ok(cmd)
    }

    pub fn pod_count(&self) -> usize {
        self.pods.len()
    }
}

/// The name of pod `i` (in [`POD_NAMESPACE`]).
pub fn pod_name(i: usize) -> String {
    format!("load-{i:03}")
}

//! `tracer doctor`: checks a node's kernel, netfilter rules, conntrack settings and pods for
//! the conditions behind conntrack-induced DNS timeouts and dropped connections, and prints
//! each finding with its evidence and the fix.
//!
//! Every node file is read through [`DoctorOptions::root`] (`/`, or e.g. `/host` when run
//! from a container with the host's root mounted there), so the checks can be pointed at
//! fixture trees. The rule dumps (`iptables-save`, `nft -j list ruleset`, `ip -j addr`) and
//! the per-namespace sysctls are taken inside [`DoctorOptions::netns`] from a short-lived
//! helper thread that joined it (the caller's thread never changes namespace); a
//! pre-captured [`NetSnapshot`] can be passed instead of running the tools.
//!
//! Check families (one module each), in report order:
//! - [`kernel`]: the running kernel against the conntrack clash-resolution fixes;
//! - [`masquerade`]: MASQUERADE rules without `--random-fully` / `fully-random`;
//! - [`capacity`]: table size, timeouts, fill ratio and new-flow rate;
//! - [`liberal`]: `nf_conntrack_tcp_be_liberal` and whether it survives a reboot;
//! - [`pods`]: per pod resolv.conf options and libc (musl ignores the glibc mitigations);
//! - [`bypass`]: DNS that skips conntrack (NOTRACK, NodeLocal DNSCache, Cilium BPF).
//!
//! [`rules`] holds the parsers of the rule dumps shared by `masquerade` and `bypass`.

pub mod bypass;
pub mod capacity;
pub mod kernel;
pub mod liberal;
pub mod masquerade;
pub mod pods;
pub mod rules;

use std::{
    fmt::Write as _,
    fs::{self, File},
    io,
    os::fd::AsRawFd as _,
    path::{Path, PathBuf},
    process::Command,
    time::Duration,
};

use anyhow::Context as _;
use serde::Serialize;

use crate::netns;

/// How bad a finding is. Ordered: `Ok < Info < Warn < Critical`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Severity {
    /// Checked, nothing to do.
    Ok,
    /// Worth knowing; no action needed.
    Info,
    /// Needs attention: a known cause of drops or timeouts is present.
    Warn,
    /// Drops are expected under ordinary load.
    Critical,
}

impl Severity {
    /// Short upper-case label for text output.
    pub fn label(self) -> &'static str {
        match self {
            Severity::Ok => "OK",
            Severity::Info => "INFO",
            Severity::Warn => "WARN",
            Severity::Critical => "CRIT",
        }
    }
}

/// One result of one check.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Finding {
    /// Stable identifier of the check (`kernel-clash-fixes`, `masquerade-random-fully`, ...).
    pub id: String,
    pub severity: Severity,
    /// One line: what was found.
    pub title: String,
    /// What the finding rests on (values read, rules seen, files consulted).
    pub evidence: Vec<String>,
    /// What to do about it, when something should be done.
    pub fix: Option<String>,
}

impl Finding {
    pub fn new(id: &str, severity: Severity, title: impl Into<String>) -> Finding {
        Finding {
            id: id.to_string(),
            severity,
            title: title.into(),
            evidence: Vec::new(),
            fix: None,
        }
    }

    /// Appends one evidence line.
    pub fn with(mut self, line: impl Into<String>) -> Finding {
        self.evidence.push(line.into());
        self
    }

    /// Sets the fix.
    pub fn fix(mut self, fix: impl Into<String>) -> Finding {
        self.fix = Some(fix.into());
        self
    }
}

/// Identifiers of the findings (stable; used by tests and `--json` consumers).
pub mod ids {
    pub const KERNEL: &str = "kernel-clash-fixes";
    pub const MASQUERADE: &str = "masquerade-random-fully";
    pub const CAPACITY: &str = "conntrack-capacity";
    pub const BE_LIBERAL: &str = "tcp-be-liberal";
    pub const POD_DNS: &str = "pod-dns";
    pub const DNS_NOTRACK: &str = "dns-notrack";
    pub const NODELOCAL: &str = "nodelocal-dnscache";
    pub const CILIUM: &str = "cilium-bpf";
    pub const DNS_BYPASS: &str = "dns-bypass";
    /// A check that could not run (tool missing, file unreadable); severity info.
    pub const CHECK_ERROR: &str = "check-error";
}

/// Which processes the per-pod DNS check looks at.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub enum PodSelection {
    /// Every process whose network namespace differs from the host's ([`host_netns_file`]).
    #[default]
    Auto,
    /// Skip the check.
    None,
    /// These processes (pids as seen in `<root>/proc`), whatever their namespace.
    Pids(Vec<u32>),
}

/// What `tracer doctor` looks at.
#[derive(Debug, Clone)]
pub struct DoctorOptions {
    /// Where the node's filesystem is: `/`, or e.g. `/host`. `proc/`, `etc/`, `lib/`, `sys/`
    /// below it are read.
    pub root: PathBuf,
    /// The network namespace whose rules and sysctls are audited (`/run/netns/NAME`,
    /// `/proc/PID/ns/net`); `None`: the caller's.
    pub netns: Option<PathBuf>,
    /// Which processes the per-pod DNS check covers.
    pub pods: PodSelection,
    /// How long to wait between the two samples of the conntrack count (the observed
    /// growth rate); zero takes one sample only.
    pub sample_interval: Duration,
    /// Pre-captured rule dumps; `None` runs `iptables-save`, `nft`, `ip` in the netns.
    pub snapshot: Option<NetSnapshot>,
}

impl Default for DoctorOptions {
    fn default() -> Self {
        DoctorOptions {
            root: PathBuf::from("/"),
            netns: None,
            pods: PodSelection::Auto,
            sample_interval: Duration::from_secs(1),
            snapshot: None,
        }
    }
}

/// Everything `tracer doctor` found.
#[derive(Debug, Clone, Serialize)]
pub struct Report {
    /// The node root the files were read from.
    pub root: String,
    /// The audited network namespace (`None`: the caller's).
    pub netns: Option<String>,
    pub findings: Vec<Finding>,
}

impl Report {
    /// The most severe finding's severity (`Ok` when there are none).
    pub fn worst(&self) -> Severity {
        self.findings
            .iter()
            .map(|f| f.severity)
            .max()
            .unwrap_or(Severity::Ok)
    }

    /// 0 when nothing needs attention, 1 when a warn or critical finding exists.
    pub fn exit_code(&self) -> i32 {
        i32::from(self.worst() >= Severity::Warn)
    }

    /// The first finding with this id.
    pub fn get(&self, id: &str) -> Option<&Finding> {
        self.findings.iter().find(|f| f.id == id)
    }

    /// Every finding with this id.
    pub fn all(&self, id: &str) -> Vec<&Finding> {
        self.findings.iter().filter(|f| f.id == id).collect()
    }

    /// Human-readable report: one block per finding, then a summary line.
    pub fn render_text(&self) -> String {
        let mut out = String::new();
        let _ = write!(out, "tracer doctor: node root {}", self.root);
        if let Some(ns) = &self.netns {
            let _ = write!(out, ", network namespace {ns}");
        }
        out.push_str("\n\n");
        for f in &self.findings {
            let _ = writeln!(out, "[{:<4}] {}: {}", f.severity.label(), f.id, f.title);
            for e in &f.evidence {
                let _ = writeln!(out, "       - {e}");
            }
            if let Some(fix) = &f.fix {
                let _ = writeln!(out, "       fix: {fix}");
            }
            out.push('\n');
        }
        let count = |s: Severity| self.findings.iter().filter(|f| f.severity == s).count();
        let _ = writeln!(
            out,
            "{} findings: {} critical, {} warn, {} info, {} ok. {}",
            self.findings.len(),
            count(Severity::Critical),
            count(Severity::Warn),
            count(Severity::Info),
            count(Severity::Ok),
            if self.exit_code() == 0 {
                "Nothing needs attention."
            } else {
                "Something needs attention."
            }
        );
        out
    }
}

// --- node files ----------------------------------------------------------------------------

/// The node's filesystem, seen through a root directory.
#[derive(Debug, Clone)]
pub struct Node {
    root: PathBuf,
}

impl Node {
    pub fn new(root: impl Into<PathBuf>) -> Node {
        Node { root: root.into() }
    }

    pub fn root(&self) -> &Path {
        &self.root
    }

    /// `rel` (e.g. `proc/sys/kernel/osrelease`) below the root. Leading `/` is ignored.
    pub fn path(&self, rel: impl AsRef<Path>) -> PathBuf {
        let rel = rel.as_ref();
        self.root.join(rel.strip_prefix("/").unwrap_or(rel))
    }

    pub fn read(&self, rel: impl AsRef<Path>) -> io::Result<String> {
        let p = self.path(rel);
        fs::read(&p).map(|b| String::from_utf8_lossy(&b).into_owned())
    }

    /// The file's content, trimmed; `None` when it can not be read.
    pub fn read_trim(&self, rel: impl AsRef<Path>) -> Option<String> {
        self.read(rel).ok().map(|s| s.trim().to_string())
    }

    /// The file's content parsed as an unsigned number (first whitespace-separated word).
    pub fn read_u64(&self, rel: impl AsRef<Path>) -> Option<u64> {
        self.read_trim(rel)?.split_whitespace().next()?.parse().ok()
    }

    pub fn exists(&self, rel: impl AsRef<Path>) -> bool {
        self.path(rel).exists()
    }

    /// Names of the entries of a directory below the root, sorted; empty if unreadable.
    pub fn list(&self, rel: impl AsRef<Path>) -> Vec<String> {
        let mut v: Vec<String> = fs::read_dir(self.path(rel))
            .map(|rd| {
                rd.filter_map(|e| e.ok()?.file_name().into_string().ok())
                    .collect()
            })
            .unwrap_or_default();
        v.sort();
        v
    }

    /// `true` when the root is the real `/` (live data: /proc of the running kernel).
    pub fn is_live_root(&self) -> bool {
        self.root == Path::new("/")
    }
}

// --- rule dumps ------------------------------------------------------------------------------

/// The output of one `*tables-save` run.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct RuleDump {
    /// The tool that produced it (`iptables-nft-save`, `ip6tables-legacy-save`, ...).
    pub tool: String,
    pub text: String,
}

/// The rule and address dumps of one network namespace.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct NetSnapshot {
    /// `iptables-save`-format dumps (nft and legacy backends, IPv4 and IPv6).
    pub iptables: Vec<RuleDump>,
    /// `nft -j list ruleset`.
    pub nft_json: Option<String>,
    /// `ip -j -d addr show`.
    pub ip_addr_json: Option<String>,
    /// What could not be captured, and why.
    pub notes: Vec<String>,
}

/// Finds a system tool in `$PATH` and the sbin directories.
pub use crate::netns::find_tool;

fn run_tool(path: &Path, args: &[&str]) -> anyhow::Result<String> {
    let mut cmd = Command::new(path);
    cmd.args(args);
    let out = netns::run_command(&mut cmd, None, netns::DEFAULT_TIMEOUT)?;
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

impl NetSnapshot {
    /// Runs the tools in the network namespace of the calling thread. `node` decides
    /// whether the legacy backend is in use (`proc/net/ip_tables_names` exists): running
    /// `iptables-legacy-save` otherwise would load the `ip_tables` module as a side effect.
    pub fn capture(node: &Node) -> NetSnapshot {
        let mut snap = NetSnapshot::default();
        for (generic, nft, legacy, names) in [
            (
                "iptables-save",
                "iptables-nft-save",
                "iptables-legacy-save",
                "proc/net/ip_tables_names",
            ),
            (
                "ip6tables-save",
                "ip6tables-nft-save",
                "ip6tables-legacy-save",
                "proc/net/ip6_tables_names",
            ),
        ] {
            let nft_bin = find_tool(nft);
            let legacy_bin = find_tool(legacy);
            let mut tools: Vec<(&str, PathBuf)> = Vec::new();
            if let Some(p) = nft_bin.clone() {
                tools.push((nft, p));
            }
            match legacy_bin.clone() {
                Some(p) if node.exists(names) => tools.push((legacy, p)),
                Some(_) => snap.notes.push(format!(
                    "{legacy} not run: {names} absent (legacy backend unused)"
                )),
                None => {}
            }
            if nft_bin.is_none() && legacy_bin.is_none() {
                match find_tool(generic) {
                    Some(p) => tools.push((generic, p)),
                    None => snap.notes.push(format!("{generic} not found")),
                }
            }
            for (name, path) in tools {
                match run_tool(&path, &[]) {
                    Ok(text) => snap.iptables.push(RuleDump {
                        tool: name.to_string(),
                        text,
                    }),
                    Err(e) => snap.notes.push(format!("{name}: {e:#}")),
                }
            }
        }
        match find_tool("nft") {
            Some(p) => match run_tool(&p, &["-j", "list", "ruleset"]) {
                Ok(t) => snap.nft_json = Some(t),
                Err(e) => snap.notes.push(format!("nft -j list ruleset: {e:#}")),
            },
            None => snap.notes.push("nft not found".to_string()),
        }
        match find_tool("ip") {
            Some(p) => match run_tool(&p, &["-j", "-d", "addr", "show"]) {
                Ok(t) => snap.ip_addr_json = Some(t),
                Err(e) => snap.notes.push(format!("ip -j -d addr show: {e:#}")),
            },
            None => snap.notes.push("ip (iproute2) not found".to_string()),
        }
        snap
    }
}

// --- running in a network namespace -----------------------------------------------------------

/// Runs `f` in the network namespace at `netns` (on a helper thread that joined it), or
/// directly when `netns` is `None`. Processes `f` starts inherit the namespace.
pub fn in_netns<T: Send>(netns: Option<&Path>, f: impl FnOnce() -> T + Send) -> anyhow::Result<T> {
    let Some(path) = netns else {
        return Ok(f());
    };
    let file = File::open(path)
        .with_context(|| format!("opening network namespace {}", path.display()))?;
    std::thread::scope(|scope| {
        let handle = std::thread::Builder::new()
            .name("doctor-netns".into())
            .spawn_scoped(scope, || -> anyhow::Result<T> {
                // SAFETY: plain syscall on an fd we own; it only changes this helper thread.
                if unsafe { libc::setns(file.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
                    return Err(io::Error::last_os_error())
                        .with_context(|| format!("setns({}, CLONE_NEWNET)", path.display()));
                }
                Ok(f())
            })
            .context("spawning the netns helper thread")?;
        handle
            .join()
            .map_err(|_| anyhow::anyhow!("netns helper thread panicked"))?
    })
}

/// The `(st_dev, st_ino)` identity of a namespace file, for comparing namespaces.
fn ns_identity(path: &Path) -> Option<(u64, u64)> {
    use std::os::unix::fs::MetadataExt as _;
    let m = fs::metadata(path).ok()?;
    Some((m.dev(), m.ino()))
}

/// The file naming the host's network namespace, below the node root: pid 1's
/// (`proc/1/ns/net`), or, when that is unreadable (some container runtimes deny it even to
/// root), this process's (`proc/self/ns/net`, the doctor runs in the host's namespace).
pub fn host_netns_file(node: &Node) -> Option<PathBuf> {
    ["proc/1/ns/net", "proc/self/ns/net"]
        .into_iter()
        .map(|rel| node.path(rel))
        .find(|p| fs::read_link(p).is_ok())
}

/// Whether the audited namespace is the host's.
fn audits_host_netns(node: &Node, netns: Option<&Path>) -> Option<bool> {
    let host = ns_identity(&host_netns_file(node)?)?;
    let audited = match netns {
        Some(p) => ns_identity(p)?,
        None => ns_identity(Path::new("/proc/thread-self/ns/net"))?,
    };
    Some(host == audited)
}

/// What is read inside the audited namespace.
struct NetSide {
    first: capacity::CtSysctls,
    second_count: Option<u64>,
    be_liberal: Option<u64>,
    snapshot: Option<NetSnapshot>,
}

fn gather_net_side(node: &Node, opts: &DoctorOptions) -> NetSide {
    let mut first = capacity::CtSysctls::read(node);
    if first.count.is_none() && node.is_live_root() {
        if let Ok(st) = crate::ctstats::read_current() {
            first.count = Some(u64::from(st.count));
            if first.max.is_none() {
                first.max = st.max.map(u64::from);
            }
        }
    }
    let second_count = if opts.sample_interval.is_zero() || first.count.is_none() {
        None
    } else {
        std::thread::sleep(opts.sample_interval);
        capacity::CtSysctls::read(node).count.or_else(|| {
            if node.is_live_root() {
                crate::ctstats::read_current()
                    .ok()
                    .map(|s| u64::from(s.count))
            } else {
                None
            }
        })
    };
    let be_liberal = node.read_u64(liberal::SYSCTL_PATH);
    let snapshot = if opts.snapshot.is_none() {
        Some(NetSnapshot::capture(node))
    } else {
        None
    };
    NetSide {
        first,
        second_count,
        be_liberal,
        snapshot,
    }
}

/// Runs every check and returns the report. Fails only when the audited namespace can not
/// be entered; a check that can not run becomes an info finding saying why.
pub fn run(opts: &DoctorOptions) -> anyhow::Result<Report> {
    let node = Node::new(&opts.root);
    let net = in_netns(opts.netns.as_deref(), || gather_net_side(&node, opts))?;
    let snapshot = match (&opts.snapshot, net.snapshot) {
        (Some(s), _) => s.clone(),
        (None, Some(s)) => s,
        (None, None) => NetSnapshot::default(),
    };
    let mut findings = Vec::new();

    findings.push(kernel::check_node(&node));
    findings.push(masquerade::check(&snapshot));
    findings.push(capacity::check(&capacity::CapacityInput {
        first: net.first,
        second_count: net.second_count,
        interval: opts.sample_interval,
    }));
    let release = node.read_trim("proc/sys/kernel/osrelease");
    let persistence = liberal::Persistence::scan(&node, release.as_deref());
    let host = audits_host_netns(&node, opts.netns.as_deref());
    findings.push(liberal::check(net.be_liberal, &persistence, host));
    findings.extend(pods::check(&node, &opts.pods));
    findings.extend(bypass::check(&snapshot, &node));
    if !snapshot.notes.is_empty() {
        let mut f = Finding::new(
            ids::CHECK_ERROR,
            Severity::Info,
            "Some rule dumps could not be taken",
        );
        for n in &snapshot.notes {
            f = f.with(n.clone());
        }
        findings.push(f);
    }
    Ok(Report {
        root: opts.root.display().to_string(),
        netns: opts.netns.as_ref().map(|p| p.display().to_string()),
        findings,
    })
}

/// Joins words for evidence lines (`a, b and c`).
fn join_list<S: AsRef<str>>(items: &[S]) -> String {
    match items.len() {
        0 => String::new(),
        1 => items[0].as_ref().to_string(),
        n => {
            let head: Vec<&str> = items[..n - 1].iter().map(|s| s.as_ref()).collect();
            format!("{} and {}", head.join(", "), items[n - 1].as_ref())
        }
    }
}

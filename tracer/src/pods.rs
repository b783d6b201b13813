//! Kernel identities to pods: the cgroup v2 id, network namespace inode and pid an event
//! carries -> the pod (namespace, name, UID, container, runtime) or host process behind it.
//!
//! Sources, read through [`NodePaths`] (`/`, or e.g. `/host` when the node's root is mounted
//! into a container), each tried only when the one before says nothing:
//!
//! 1. **cgroup id -> cgroup path**: on cgroup v2 the id is the inode number of the cgroup's
//!    directory, so a walk of the cgroup2 mount maps ids to paths (built lazily, rebuilt on a
//!    miss at most once per [`DEFAULT_RESCAN_INTERVAL`]). The path is parsed by
//!    [`parse_cgroup_path`] for every layout kubelet makes (below).
//! 2. **pid -> `/proc/PID/cgroup`**, when the event has a pid and its v2 cgroup is not a pod's:
//!    the `0::` line and then every v1 line, since on hybrid hosts runtimes may place
//!    containers in the v1 hierarchies only (the v2 path is then `/` or the runtime's service).
//! 3. **netns inode -> a process in it**, found by a scan of `/proc/*/ns/net` (rate-limited;
//!    the pid found is checked again on every hit, since namespace inodes are reused), then
//!    that process's cgroups as in 2. The host's network namespace (that of pid 1, or of
//!    kthreadd when pid 1's is unreadable) is never used this way: host-network pods share it.
//! 4. Otherwise a known cgroup or process that is not a pod's is the host
//!    ([`Workload::host`], with the process name when the pid was known); nothing known is
//!    [`WorkloadKind::Unknown`].
//!
//! Pod names, without the API server: `/var/log/pods/<namespace>_<name>_<uid>/` (kubelet makes
//! it before the pod's containers start; namespace and pod names are DNS labels, never `_`),
//! then `/var/lib/kubelet/pods/<uid>/etc-hosts` for the name (kubelet writes the pod's hostname
//! there, which is the pod's name unless `spec.hostname` sets another) and the pod's
//! service-account `namespace` file read through `/proc/PID/root` for the namespace (the pid
//! of the event, or the first process of the pod's cgroup). A pod none of these name is shown
//! by its UID. The CRI socket (`ListPodSandbox`) would also name pods, but it speaks gRPC,
//! which this crate has no client for: it is not used.
//!
//! Cgroup layouts ([`parse_cgroup_path`]), also below a prefix (kind's `/kubelet.slice/
//! kubelet-kubepods.slice/...`, `/kubelet/kubepods/...`), with the pod UID written with `_`
//! in systemd slice names:
//!
//! | driver, runtime | container cgroup |
//! |---|---|
//! | systemd, containerd | `/kubepods.slice/kubepods-besteffort.slice/kubepods-besteffort-pod<uid>.slice/cri-containerd-<id>.scope` |
//! | systemd, CRI-O | `.../kubepods-burstable-pod<uid>.slice/crio-<id>.scope` (conmon: `crio-conmon-<id>.scope`) |
//! | systemd, Docker (cri-dockerd) | `.../kubepods-pod<uid>.slice/docker-<id>.scope` (guaranteed) |
//! | cgroupfs, containerd or Docker | `/kubepods/besteffort/pod<uid>/<id>`, guaranteed: `/kubepods/pod<uid>/<id>` |
//! | cgroupfs, CRI-O | `/kubepods/burstable/pod<uid>/crio-<id>` |
//!
//! The pod sandbox (pause) is one more container of its pod; a pod's own cgroup (no
//! container part) is the pod; anything below a container's cgroup (crun's `container`
//! subgroup) is that container. The cgroupfs layouts do not name the runtime: it is then
//! guessed from the runtime's state directories under the node root.

use std::{
    collections::{HashMap, VecDeque},
    fs,
    hash::Hash,
    os::unix::fs::MetadataExt as _,
    path::{Path, PathBuf},
    sync::Arc,
    time::{Duration, Instant},
};

use serde::{Deserialize, Serialize};

use crate::preflight;

/// Entries each cache of a [`PodIndex`] holds at most (cgroups, pids, namespaces, pods).
pub const DEFAULT_CAPACITY: usize = 16 * 1024;
/// The least time between two scans of one source (cgroup tree, `/proc`, pods log dir).
pub const DEFAULT_RESCAN_INTERVAL: Duration = Duration::from_secs(1);
/// How long what a pid resolved to is reused (pids are reused by the kernel, slowly).
pub const PID_TTL: Duration = Duration::from_secs(2);
/// The most cgroup directories one walk visits (a sanity bound; nodes have thousands).
const WALK_BUDGET: usize = 1 << 20;

// --- node paths ------------------------------------------------------------------------------

/// Where the node's files are, as seen by this process.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NodePaths {
    /// The node's root: `/`, or e.g. `/host`.
    pub root: PathBuf,
    /// The node's cgroup2 mount, under `root` (e.g. `/host/sys/fs/cgroup`).
    pub cgroup2: PathBuf,
    /// The node's procfs: `<root>/proc`.
    pub proc: PathBuf,
    /// Kubelet's pod log directories: `<root>/var/log/pods`.
    pub pods_log: PathBuf,
    /// Kubelet's pod directories: `<root>/var/lib/kubelet/pods`.
    pub kubelet_pods: PathBuf,
}

/// `path` (absolute on the node) under `root`.
fn under_root(root: &Path, path: &Path) -> PathBuf {
    root.join(path.strip_prefix("/").unwrap_or(path))
}

impl NodePaths {
    /// The paths of a node whose root is at `root`; the cgroup2 mount is read from the mount
    /// table of the node's pid 1 (`<root>/proc/1/mountinfo`), else from this process's
    /// (`<root>/proc/self/mountinfo`). A hybrid layout mounts it at `/sys/fs/cgroup/unified`.
    pub fn for_root(root: &Path) -> anyhow::Result<NodePaths> {
        let mut tried = Vec::new();
        for rel in ["proc/1/mountinfo", "proc/self/mountinfo"] {
            let file = root.join(rel);
            let text = match fs::read_to_string(&file) {
                Ok(t) => t,
                Err(e) => {
                    tried.push(format!("{}: {e}", file.display()));
                    continue;
                }
            };
            let Some(mount) = preflight::cgroup2_mount(&text) else {
                tried.push(format!("{}: no cgroup2 mount", file.display()));
                continue;
            };
            let cgroup2 = under_root(root, &mount);
            if cgroup2.is_dir() {
                return Ok(NodePaths {
                    root: root.to_path_buf(),
                    cgroup2,
                    proc: root.join("proc"),
                    pods_log: root.join("var/log/pods"),
                    kubelet_pods: root.join("var/lib/kubelet/pods"),
                });
            }
            tried.push(format!(
                "{}: cgroup2 mounted at {}, but {} is not a directory",
                file.display(),
                mount.display(),
                cgroup2.display()
            ));
        }
        anyhow::bail!(
            "no cgroup v2 hierarchy found for the node root {} ({})",
            root.display(),
            tried.join("; ")
        )
    }
}

// --- cgroup paths ----------------------------------------------------------------------------

/// A pod's QoS class, from the cgroup level kubelet puts it in.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum QosClass {
    /// Directly under the kubepods cgroup.
    Guaranteed,
    Burstable,
    BestEffort,
}

impl QosClass {
    pub fn name(self) -> &'static str {
        match self {
            QosClass::Guaranteed => "guaranteed",
            QosClass::Burstable => "burstable",
            QosClass::BestEffort => "besteffort",
        }
    }
}

/// The container runtime a cgroup name shows.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Runtime {
    Containerd,
    CriO,
    Docker,
}

impl Runtime {
    pub fn name(self) -> &'static str {
        match self {
            Runtime::Containerd => "containerd",
            Runtime::CriO => "cri-o",
            Runtime::Docker => "docker",
        }
    }
}

/// Kubelet's cgroup driver, as the path shows it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum CgroupDriver {
    /// `kubepods.slice/kubepods-<qos>.slice/kubepods-<qos>-pod<uid>.slice/...`
    Systemd,
    /// `kubepods/<qos>/pod<uid>/...`
    Cgroupfs,
}

/// What a kubelet cgroup path says about a pod and container.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize)]
pub struct ContainerRef {
    /// The pod UID with dashes (`1f3a0c2e-...`), or 32 hex digits for a static pod.
    pub pod_uid: String,
    pub qos: QosClass,
    pub driver: CgroupDriver,
    /// 64 hex digits; `None` for the pod's own cgroup.
    pub container_id: Option<String>,
    /// `None` when the name does not show it (cgroupfs with containerd or Docker).
    pub runtime: Option<Runtime>,
    /// CRI-O's container monitor (`crio-conmon-<id>`) rather than the container.
    pub conmon: bool,
}

/// One path component, as kubelet's levels go.
enum Level {
    /// `kubepods`, `kubepods.slice`, `kubelet-kubepods.slice`.
    Root,
    Qos(QosClass, CgroupDriver),
    Pod(Option<QosClass>, String, CgroupDriver),
    Other,
}

fn qos_word(s: &str) -> Option<QosClass> {
    match s {
        "besteffort" => Some(QosClass::BestEffort),
        "burstable" => Some(QosClass::Burstable),
        "guaranteed" => Some(QosClass::Guaranteed),
        _ => None,
    }
}

/// A pod UID as written after `pod` in a cgroup name (dashes or underscores), normalized.
fn pod_uid(s: &str) -> Option<String> {
    let uid = s.replace('_', "-").to_ascii_lowercase();
    let b = uid.as_bytes();
    let ok = match b.len() {
        36 => b.iter().enumerate().all(|(i, c)| {
            if matches!(i, 8 | 13 | 18 | 23) {
                *c == b'-'
            } else {
                c.is_ascii_hexdigit()
            }
        }),
        // Static (mirror) pods: an MD5 of the manifest.
        32 => b.iter().all(u8::is_ascii_hexdigit),
        _ => false,
    };
    ok.then_some(uid)
}

fn level(c: &str) -> Level {
    if let Some(name) = c.strip_suffix(".slice") {
        let tokens: Vec<&str> = name.split('-').collect();
        let Some(p) = tokens.iter().position(|t| *t == "kubepods") else {
            return Level::Other;
        };
        let d = CgroupDriver::Systemd;
        return match tokens[p + 1..] {
            [] => Level::Root,
            [q] => match (qos_word(q), q.strip_prefix("pod").and_then(pod_uid)) {
                (Some(q), _) => Level::Qos(q, d),
                (None, Some(uid)) => Level::Pod(None, uid, d),
                _ => Level::Other,
            },
            [q, pod] => match (qos_word(q), pod.strip_prefix("pod").and_then(pod_uid)) {
                (Some(q), Some(uid)) => Level::Pod(Some(q), uid, d),
                _ => Level::Other,
            },
            _ => Level::Other,
        };
    }
    let d = CgroupDriver::Cgroupfs;
    if c == "kubepods" {
        return Level::Root;
    }
    if let Some(q) = qos_word(c) {
        return Level::Qos(q, d);
    }
    match c.strip_prefix("pod").and_then(pod_uid) {
        Some(uid) => Level::Pod(None, uid, d),
        None => Level::Other,
    }
}

fn is_container_id(s: &str) -> bool {
    s.len() == 64 && s.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f'))
}

/// A container cgroup's name -> (id, runtime, conmon).
fn container_part(c: &str) -> (Option<String>, Option<Runtime>, bool) {
    let name = c.strip_suffix(".scope").unwrap_or(c);
    for (prefix, runtime, conmon) in [
        ("cri-containerd-", Runtime::Containerd, false),
        ("crio-conmon-", Runtime::CriO, true),
        ("crio-", Runtime::CriO, false),
        ("docker-", Runtime::Docker, false),
    ] {
        if let Some(id) = name.strip_prefix(prefix) {
            if is_container_id(id) {
                return (Some(id.to_string()), Some(runtime), conmon);
            }
        }
    }
    if is_container_id(name) {
        return (Some(name.to_string()), None, false);
    }
    // Another runtime's `<prefix>-<id>`.
    match name.rsplit_once('-') {
        Some((_, id)) if is_container_id(id) => (Some(id.to_string()), None, false),
        _ => (None, None, false),
    }
}

/// Parses a cgroup path (v2, or a v1 hierarchy's) laid out by kubelet; `None` when it is not
/// a pod's (the host, the kubepods or QoS level itself, anything else).
///
/// The kubelet levels may sit below any prefix; a path made relative by a cgroup namespace
/// (`/../../kubepods-burstable-pod<uid>.slice/...`) is understood in the systemd layout.
pub fn parse_cgroup_path(path: &str) -> Option<ContainerRef> {
    let comps: Vec<&str> = path
        .split('/')
        .filter(|c| !c.is_empty() && *c != "." && *c != "..")
        .collect();
    let start = comps.iter().position(|c| {
        matches!(
            level(c),
            Level::Root
                | Level::Qos(_, CgroupDriver::Systemd)
                | Level::Pod(_, _, CgroupDriver::Systemd)
        )
    })?;
    let mut qos = None;
    let mut rest = comps[start..].iter();
    let mut pod = None;
    for c in rest.by_ref() {
        match level(c) {
            Level::Root => {}
            Level::Qos(q, _) => qos = Some(q),
            Level::Pod(q, uid, d) => {
                pod = Some((q.or(qos).unwrap_or(QosClass::Guaranteed), uid, d));
                break;
            }
            Level::Other => return None,
        }
    }
    let (qos, pod_uid, driver) = pod?;
    let (container_id, runtime, conmon) = rest
        .next()
        .map(|c| container_part(c))
        .unwrap_or((None, None, false));
    Some(ContainerRef {
        pod_uid,
        qos,
        driver,
        container_id,
        runtime,
        conmon,
    })
}

/// The lines of `/proc/PID/cgroup`: (hierarchy id, controllers, path).
pub fn proc_cgroup_lines(text: &str) -> Vec<(u32, &str, &str)> {
    text.lines()
        .filter_map(|l| {
            let mut it = l.splitn(3, ':');
            let id = it.next()?.parse().ok()?;
            Some((id, it.next()?, it.next()?))
        })
        .collect()
}

/// What `/proc/PID/cgroup` says: the pod (with the path that showed it) from the v2 line
/// first, then from the v1 lines in order; otherwise `Err` with the v2 path (or the first
/// line's) for the host.
pub fn pod_from_proc_cgroup(text: &str) -> Result<(ContainerRef, String), Option<String>> {
    let lines = proc_cgroup_lines(text);
    let v2 = lines.iter().find(|(id, ctl, _)| *id == 0 && ctl.is_empty());
    for (_, _, path) in v2
        .into_iter()
        .chain(lines.iter().filter(|(id, ..)| *id != 0))
    {
        if let Some(c) = parse_cgroup_path(path) {
            return Ok((c, path.to_string()));
        }
    }
    Err(v2.or(lines.first()).map(|(_, _, p)| p.to_string()))
}

// --- pod names -------------------------------------------------------------------------------

/// `<namespace>_<name>_<uid>` (a `/var/log/pods` directory) -> (uid, namespace, name).
pub fn parse_pods_log_dir(name: &str) -> Option<(String, String, String)> {
    let mut it = name.splitn(3, '_');
    let (ns, pod, uid) = (it.next()?, it.next()?, it.next()?);
    if ns.is_empty() || pod.is_empty() {
        return None;
    }
    Some((pod_uid(uid)?, ns.to_string(), pod.to_string()))
}

/// The pod's hostname from the `etc-hosts` kubelet writes for it: the first entry after the
/// standard localhost lines and before the HostAliases section; `None` for a host-network
/// pod (its file is a copy of the node's).
pub fn hostname_from_etc_hosts(text: &str) -> Option<String> {
    if text.lines().next()?.contains("host network") {
        return None;
    }
    for line in text.lines() {
        let line = line.trim();
        if line.starts_with("# Entries added by HostAliases") {
            return None;
        }
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        let names: Vec<&str> = line.split_whitespace().skip(1).collect();
        let Some(first) = names.first() else {
            continue;
        };
        if *first == "localhost" || first.starts_with("ip6-") {
            continue;
        }
        // `<ip> <fqdn> <hostname>` with a subdomain, else `<ip> <hostname>`.
        return names.last().map(|s| s.to_string());
    }
    None
}

/// The service-account namespace mounted into process `pid`'s container, if any.
fn sa_namespace(proc: &Path, pid: u32) -> Option<String> {
    let root = proc.join(pid.to_string()).join("root");
    // `/var/run` is usually a symlink to `/run`, where the runtime then mounted the secret;
    // an absolute link would resolve against this process's root, so it is not followed.
    let mut candidates = vec![root.join("run/secrets/kubernetes.io/serviceaccount/namespace")];
    if fs::symlink_metadata(root.join("var/run")).is_ok_and(|m| m.is_dir()) {
        candidates.push(root.join("var/run/secrets/kubernetes.io/serviceaccount/namespace"));
    }
    candidates.iter().find_map(|p| {
        let ns = fs::read_to_string(p).ok()?;
        let ns = ns.trim();
        (!ns.is_empty() && ns.len() <= 253).then(|| ns.to_string())
    })
}

fn netns_inode(link: &Path) -> Option<u32> {
    let target = fs::read_link(link).ok()?;
    let s = target.to_str()?;
    s.strip_prefix("net:[")?.strip_suffix(']')?.parse().ok()
}

// --- workloads -------------------------------------------------------------------------------

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum WorkloadKind {
    Pod,
    Host,
    Unknown,
}

/// Who is behind an event.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct Workload {
    pub kind: WorkloadKind,
    pub namespace: Option<String>,
    pub pod: Option<String>,
    pub uid: Option<String>,
    pub container_id: Option<String>,
    pub runtime: Option<String>,
    /// The cgroup path that identified it (v2, or the v1 hierarchy's).
    pub cgroup: Option<String>,
    /// The process name (`comm`) of a host process whose pid was known.
    pub process: Option<String>,
}

impl Workload {
    pub fn unknown() -> Workload {
        Workload {
            kind: WorkloadKind::Unknown,
            namespace: None,
            pod: None,
            uid: None,
            container_id: None,
            runtime: None,
            cgroup: None,
            process: None,
        }
    }

    /// A host process (not under kubepods), with its name when known.
    pub fn host(process: Option<String>) -> Workload {
        Workload {
            kind: WorkloadKind::Host,
            process,
            ..Workload::unknown()
        }
    }

    /// `namespace/name`; `pod <uid…>` (with `namespace/` when known) when the name is not;
    /// `host` or `host:<comm>`; `unknown`.
    pub fn label(&self) -> String {
        match self.kind {
            WorkloadKind::Unknown => "unknown".to_string(),
            WorkloadKind::Host => match &self.process {
                Some(comm) => format!("host:{comm}"),
                None => "host".to_string(),
            },
            WorkloadKind::Pod => {
                let who = match (&self.pod, &self.uid) {
                    (Some(name), _) => name.clone(),
                    (None, Some(uid)) => format!("pod {}…", &uid[..uid.len().min(8)]),
                    (None, None) => "pod ?".to_string(),
                };
                match &self.namespace {
                    Some(ns) => format!("{ns}/{who}"),
                    None if self.pod.is_some() => format!("pod {who}"),
                    None => who,
                }
            }
        }
    }

    /// A `--pod` filter: `namespace/name` (`namespace/` or `namespace/*`: any pod there),
    /// `name`, a prefix of the pod UID or container id (4 characters at least), or `host`.
    pub fn matches(&self, filter: &str) -> bool {
        let f = filter.trim();
        if f.is_empty() {
            return true;
        }
        match self.kind {
            WorkloadKind::Host => return f == "host",
            WorkloadKind::Unknown => return false,
            WorkloadKind::Pod => {}
        }
        if let Some((ns, name)) = f.split_once('/') {
            return self.namespace.as_deref() == Some(ns)
                && (name.is_empty() || name == "*" || self.pod.as_deref() == Some(name));
        }
        if self.pod.as_deref() == Some(f) {
            return true;
        }
        let lower = f.to_ascii_lowercase().replace('_', "-");
        lower.len() >= 4
            && (self.uid.as_deref().is_some_and(|u| u.starts_with(&lower))
                || self
                    .container_id
                    .as_deref()
                    .is_some_and(|c| c.starts_with(&lower)))
    }

    /// A `--namespace` filter: the pod's namespace is `ns`.
    pub fn matches_namespace(&self, ns: &str) -> bool {
        self.kind == WorkloadKind::Pod && self.namespace.as_deref() == Some(ns)
    }
}

// --- the index -------------------------------------------------------------------------------

/// A map with at most `cap` entries; the oldest insertion goes first.
#[derive(Debug)]
struct Bounded<K, V> {
    map: HashMap<K, V>,
    order: VecDeque<K>,
    cap: usize,
}

impl<K: Eq + Hash + Clone, V> Bounded<K, V> {
    fn new(cap: usize) -> Self {
        Bounded {
            map: HashMap::new(),
            order: VecDeque::new(),
            cap: cap.max(1),
        }
    }

    fn get(&self, k: &K) -> Option<&V> {
        self.map.get(k)
    }

    fn insert(&mut self, k: K, v: V) {
        if self.map.insert(k.clone(), v).is_none() {
            self.order.push_back(k);
            while self.map.len() > self.cap {
                let Some(old) = self.order.pop_front() else {
                    break;
                };
                self.map.remove(&old);
            }
        }
    }

    fn remove(&mut self, k: &K) {
        if self.map.remove(k).is_some() {
            self.order.retain(|x| x != k);
        }
    }

    fn clear(&mut self) {
        self.map.clear();
        self.order.clear();
    }

    fn len(&self) -> usize {
        self.map.len()
    }
}

/// When a source may be scanned again.
#[derive(Debug, Default)]
struct Scan {
    last: Option<Instant>,
    count: u64,
}

impl Scan {
    /// Whether a scan is allowed now; if so, it is counted as done.
    fn begin(&mut self, now: Instant, interval: Duration) -> bool {
        if self
            .last
            .is_some_and(|t| now.saturating_duration_since(t) < interval)
        {
            return false;
        }
        self.last = Some(now);
        self.count += 1;
        true
    }
}

/// Counters and sizes of a [`PodIndex`], for tests and metrics.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
pub struct IndexStats {
    /// Walks of the cgroup2 tree.
    pub cgroup_scans: u64,
    /// Scans of `/proc/*/ns/net`.
    pub netns_scans: u64,
    /// Scans of the pods log directory.
    pub pods_log_scans: u64,
    /// Entries now in the cgroup id -> path map.
    pub cgroups: usize,
    /// Entries now in the netns -> pid map.
    pub netns: usize,
    /// Pods now named from the pods log directory.
    pub pods: usize,
    /// Resolved workloads now cached by cgroup id and by pid.
    pub cached: usize,
}

/// Resolves kernel identities to workloads; see the module docs for the order of sources.
/// Every cache is bounded (by [`DEFAULT_CAPACITY`] unless set otherwise).
#[derive(Debug)]
pub struct PodIndex {
    paths: NodePaths,
    rescan_interval: Duration,
    /// cgroup id -> path below the cgroup2 mount (`/kubepods.slice/...`).
    cgroup_paths: Bounded<u64, Arc<str>>,
    cgroup_scan: Scan,
    /// Pod results by cgroup id: forever when named, else until the instant.
    by_cgroup: Bounded<u64, (Arc<Workload>, Option<Instant>)>,
    /// Results by pid, until the instant.
    by_pid: Bounded<u32, (Arc<Workload>, Instant)>,
    /// netns inode -> a pid in it.
    netns_pids: Bounded<u32, u32>,
    netns_scan: Scan,
    host_netns: Option<Option<u32>>,
    /// Pod UID -> (namespace, name) from the pods log directory.
    pod_names: Bounded<String, (String, String)>,
    pods_log_scan: Scan,
    unknown: Arc<Workload>,
}

impl PodIndex {
    pub fn new(paths: NodePaths) -> PodIndex {
        PodIndex::with_limits(paths, DEFAULT_CAPACITY, DEFAULT_RESCAN_INTERVAL)
    }

    /// An index whose caches hold at most `capacity` entries each and that scans one source
    /// at most once per `rescan_interval`.
    pub fn with_limits(paths: NodePaths, capacity: usize, rescan_interval: Duration) -> PodIndex {
        PodIndex {
            paths,
            rescan_interval,
            cgroup_paths: Bounded::new(capacity),
            cgroup_scan: Scan::default(),
            by_cgroup: Bounded::new(capacity),
            by_pid: Bounded::new(capacity),
            netns_pids: Bounded::new(capacity),
            netns_scan: Scan::default(),
            host_netns: None,
            pod_names: Bounded::new(capacity),
            pods_log_scan: Scan::default(),
            unknown: Arc::new(Workload::unknown()),
        }
    }

    pub fn paths(&self) -> &NodePaths {
        &self.paths
    }

    pub fn set_rescan_interval(&mut self, interval: Duration) {
        self.rescan_interval = interval;
    }

    pub fn stats(&self) -> IndexStats {
        IndexStats {
            cgroup_scans: self.cgroup_scan.count,
            netns_scans: self.netns_scan.count,
            pods_log_scans: self.pods_log_scan.count,
            cgroups: self.cgroup_paths.len(),
            netns: self.netns_pids.len(),
            pods: self.pod_names.len(),
            cached: self.by_cgroup.len() + self.by_pid.len(),
        }
    }

    /// Who is behind an event with this cgroup v2 id (0: none), network namespace inode
    /// (0: none) and pid.
    pub fn resolve(&mut self, cgroup_id: u64, netns: u32, pid: Option<u32>) -> Arc<Workload> {
        let now = Instant::now();
        let mut host_cgroup = None;
        if cgroup_id != 0 {
            if let Some((w, until)) = self.by_cgroup.get(&cgroup_id) {
                if until.is_none_or(|t| now < t) {
                    return w.clone();
                }
            }
            if let Some(path) = self.cgroup_path(cgroup_id, now) {
                if let Some(c) = parse_cgroup_path(&path) {
                    let w = self.pod_workload(c, &path, pid, true, now);
                    let until = (w.namespace.is_none() || w.pod.is_none())
                        .then(|| now + self.rescan_interval);
                    self.by_cgroup.insert(cgroup_id, (w.clone(), until));
                    return w;
                }
                host_cgroup = Some(path);
            }
        }
        if let Some(pid) = pid {
            if let Some(w) = self.pid_workload(pid, now) {
                return w;
            }
        }
        if netns != 0 && Some(netns) != self.host_netns() {
            if let Some(w) = self.netns_workload(netns, now) {
                return w;
            }
        }
        match host_cgroup {
            Some(path) => Arc::new(Workload {
                cgroup: Some(path.to_string()),
                ..Workload::host(None)
            }),
            None => self.unknown.clone(),
        }
    }

    /// The cgroup path of `id`, walking the tree again on a miss (rate-limited).
    fn cgroup_path(&mut self, id: u64, now: Instant) -> Option<Arc<str>> {
        if let Some(p) = self.cgroup_paths.get(&id) {
            return Some(p.clone());
        }
        if !self.cgroup_scan.begin(now, self.rescan_interval) {
            return None;
        }
        self.walk_cgroups(id)
    }

    /// Rebuilds the id -> path map; returns `target`'s path even if the bound evicted it.
    fn walk_cgroups(&mut self, target: u64) -> Option<Arc<str>> {
        self.cgroup_paths.clear();
        let root = self.paths.cgroup2.clone();
        let meta = fs::metadata(&root).ok()?;
        let mut found = None;
        let mut insert = |map: &mut Bounded<u64, Arc<str>>, ino: u64, path: &str| {
            let path: Arc<str> = Arc::from(path);
            if ino == target {
                found = Some(path.clone());
            }
            map.insert(ino, path);
        };
        insert(&mut self.cgroup_paths, meta.ino(), "/");
        let mut budget = WALK_BUDGET;
        let mut stack = vec![(root, String::new())];
        'walk: while let Some((dir, rel)) = stack.pop() {
            let Ok(entries) = fs::read_dir(&dir) else {
                continue;
            };
            for e in entries.flatten() {
                if budget == 0 {
                    log::warn!(
                        "{}: more than {WALK_BUDGET} cgroups; the rest are not mapped",
                        self.paths.cgroup2.display()
                    );
                    break 'walk;
                }
                let Ok(ft) = e.file_type() else {
                    continue;
                };
                if !ft.is_dir() {
                    continue;
                }
                let Ok(name) = e.file_name().into_string() else {
                    continue;
                };
                // st_ino, not d_ino: they differ on overlay filesystems (test trees).
                let Ok(m) = e.metadata() else {
                    continue;
                };
                budget -= 1;
                let path = format!("{rel}/{name}");
                insert(&mut self.cgroup_paths, m.ino(), &path);
                stack.push((e.path(), path));
            }
        }
        found
    }

    /// What process `pid` is, from its cgroups (cached for [`PID_TTL`]); `None` when the
    /// process can not be read (gone).
    fn pid_workload(&mut self, pid: u32, now: Instant) -> Option<Arc<Workload>> {
        if let Some((w, until)) = self.by_pid.get(&pid) {
            if now < *until {
                return Some(w.clone());
            }
        }
        let dir = self.paths.proc.join(pid.to_string());
        let text = fs::read_to_string(dir.join("cgroup")).ok()?;
        let w = match pod_from_proc_cgroup(&text) {
            Ok((c, path)) => {
                let v2 = proc_cgroup_lines(&text)
                    .iter()
                    .any(|(id, ctl, p)| *id == 0 && ctl.is_empty() && *p == path);
                self.pod_workload(c, &path, Some(pid), v2, now)
            }
            Err(path) => {
                let comm = fs::read_to_string(dir.join("comm"))
                    .ok()
                    .map(|c| c.trim().to_string());
                Arc::new(Workload {
                    cgroup: path,
                    ..Workload::host(comm)
                })
            }
        };
        self.by_pid.insert(pid, (w.clone(), now + PID_TTL));
        Some(w)
    }

    fn host_netns(&mut self) -> Option<u32> {
        *self.host_netns.get_or_insert_with(|| {
            // kthreadd (pid 2) is always in the initial namespace and readable when pid 1
            // is not (a non-dumpable init).
            ["1", "2"]
                .iter()
                .find_map(|p| netns_inode(&self.paths.proc.join(p).join("ns/net")))
        })
    }

    /// The pod owning network namespace `netns`, through a process in it.
    fn netns_workload(&mut self, netns: u32, now: Instant) -> Option<Arc<Workload>> {
        let in_ns = |proc: &Path, pid: u32| {
            netns_inode(&proc.join(pid.to_string()).join("ns/net")) == Some(netns)
        };
        let mut pid = self.netns_pids.get(&netns).copied();
        if let Some(p) = pid {
            if !in_ns(&self.paths.proc, p) {
                self.netns_pids.remove(&netns);
                pid = None;
            }
        }
        if pid.is_none() && self.netns_scan.begin(now, self.rescan_interval) {
            pid = self.scan_netns(netns);
        }
        let w = self.pid_workload(pid?, now)?;
        (w.kind == WorkloadKind::Pod).then_some(w)
    }

    /// Rebuilds netns -> the lowest pid in it (a pod's sandbox, usually); returns `target`'s.
    fn scan_netns(&mut self, target: u32) -> Option<u32> {
        let dir = fs::read_dir(&self.paths.proc).ok()?;
        let mut pids: Vec<u32> = dir
            .filter_map(|e| e.ok()?.file_name().to_str()?.parse().ok())
            .collect();
        pids.sort_unstable();
        let mut found: HashMap<u32, u32> = HashMap::new();
        for pid in pids {
            if let Some(ns) = netns_inode(&self.paths.proc.join(pid.to_string()).join("ns/net")) {
                found.entry(ns).or_insert(pid);
            }
        }
        self.netns_pids.clear();
        let pid = found.get(&target).copied();
        for (ns, pid) in found {
            self.netns_pids.insert(ns, pid);
        }
        if let Some(pid) = pid {
            self.netns_pids.insert(target, pid);
        }
        pid
    }

    /// (namespace, name) of pod `uid` from the pods log directory, scanning it again on a
    /// miss (rate-limited).
    fn pods_log_name(&mut self, uid: &str, now: Instant) -> Option<(String, String)> {
        let key = uid.to_string();
        if let Some(n) = self.pod_names.get(&key) {
            return Some(n.clone());
        }
        if !self.pods_log_scan.begin(now, self.rescan_interval) {
            return None;
        }
        self.pod_names.clear();
        let mut found = None;
        if let Ok(dir) = fs::read_dir(&self.paths.pods_log) {
            for e in dir.flatten() {
                if let Some((uid, ns, name)) = e.file_name().to_str().and_then(parse_pods_log_dir) {
                    if uid == key {
                        found = Some((ns.clone(), name.clone()));
                    }
                    self.pod_names.insert(uid, (ns, name));
                }
            }
        }
        found
    }

    /// The first process in cgroup v2 `path` or a cgroup below it (one level).
    fn first_pid_in(&self, path: &str) -> Option<u32> {
        let dir = under_root(&self.paths.cgroup2, Path::new(path));
        let first = |d: &Path| -> Option<u32> {
            fs::read_to_string(d.join("cgroup.procs"))
                .ok()?
                .lines()
                .find_map(|l| l.trim().parse().ok())
        };
        first(&dir).or_else(|| {
            fs::read_dir(&dir)
                .ok()?
                .flatten()
                .filter(|e| e.file_type().is_ok_and(|t| t.is_dir()))
                .find_map(|e| first(&e.path()))
        })
    }

    /// The runtime of a container whose cgroup name does not say, from the runtimes' state
    /// directories on the node.
    fn runtime_hint(&self, id: &str) -> Option<Runtime> {
        let root = &self.paths.root;
        [
            (
                "run/containerd/io.containerd.runtime.v2.task/k8s.io",
                Runtime::Containerd,
            ),
            ("var/lib/docker/containers", Runtime::Docker),
            (
                "var/lib/containers/storage/overlay-containers",
                Runtime::CriO,
            ),
        ]
        .into_iter()
        .find(|(dir, _)| root.join(dir).join(id).exists())
        .map(|(_, r)| r)
    }

    /// A pod's workload, named as well as the node allows. `v2`: `path` is below the cgroup2
    /// mount (its processes can be listed).
    fn pod_workload(
        &mut self,
        c: ContainerRef,
        path: &str,
        pid: Option<u32>,
        v2: bool,
        now: Instant,
    ) -> Arc<Workload> {
        let (mut namespace, mut pod) = match self.pods_log_name(&c.pod_uid, now) {
            Some((ns, name)) => (Some(ns), Some(name)),
            None => (None, None),
        };
        if pod.is_none() {
            pod = fs::read_to_string(self.paths.kubelet_pods.join(&c.pod_uid).join("etc-hosts"))
                .ok()
                .and_then(|t| hostname_from_etc_hosts(&t));
        }
        if namespace.is_none() {
            let pid = pid.or_else(|| v2.then(|| self.first_pid_in(path)).flatten());
            namespace = pid.and_then(|p| sa_namespace(&self.paths.proc, p));
        }
        let runtime = c.runtime.or_else(|| {
            c.container_id
                .as_deref()
                .and_then(|id| self.runtime_hint(id))
        });
        Arc::new(Workload {
            kind: WorkloadKind::Pod,
            namespace,
            pod,
            uid: Some(c.pod_uid),
            container_id: c.container_id,
            runtime: runtime.map(|r| r.name().to_string()),
            cgroup: Some(path.to_string()),
            process: None,
        })
    }
}

#[cfg(test)]
mod tests {
    use std::{
        os::unix::fs::MetadataExt as _,
        sync::atomic::{AtomicU64, Ordering},
    };

    use super::*;

    const UID: &str = "1f3a0c2e-5b6d-4e7f-8a9b-0c1d2e3f4a5b";
    const UID2: &str = "a0b1c2d3-e4f5-4607-8899-aabbccddeeff";
    const STATIC_UID: &str = "6f3ac1d2b4e5f60718293a4b5c6d7e8f";

    fn cid(c: char) -> String {
        std::iter::repeat_n(c, 64).collect()
    }

    fn us(uid: &str) -> String {
        uid.replace('-', "_")
    }

    #[test]
    fn systemd_layouts() {
        let id = cid('a');
        let p = format!(
            "/kubepods.slice/kubepods-besteffort.slice/kubepods-besteffort-pod{}.slice/cri-containerd-{id}.scope",
            us(UID)
        );
        let c = parse_cgroup_path(&p).unwrap();
        assert_eq!(c.pod_uid, UID);
        assert_eq!(c.qos, QosClass::BestEffort);
        assert_eq!(c.driver, CgroupDriver::Systemd);
        assert_eq!(c.container_id.as_deref(), Some(id.as_str()));
        assert_eq!(c.runtime, Some(Runtime::Containerd));
        assert!(!c.conmon);

        let p = format!(
            "/kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod{}.slice/crio-{id}.scope",
            us(UID)
        );
        let c = parse_cgroup_path(&p).unwrap();
        assert_eq!(
            (c.qos, c.runtime),
            (QosClass::Burstable, Some(Runtime::CriO))
        );
        // crun's nested subgroup is the same container.
        let c2 = parse_cgroup_path(&format!("{p}/container")).unwrap();
        assert_eq!(c, c2);
        let p = format!(
            "/kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod{}.slice/crio-conmon-{id}.scope",
            us(UID)
        );
        let c = parse_cgroup_path(&p).unwrap();
        assert!(c.conmon);
        assert_eq!(c.runtime, Some(Runtime::CriO));

        // Guaranteed: directly under kubepods.slice; Docker (cri-dockerd).
        let p = format!(
            "/kubepods.slice/kubepods-pod{}.slice/docker-{id}.scope",
            us(UID)
        );
        let c = parse_cgroup_path(&p).unwrap();
        assert_eq!(c.qos, QosClass::Guaranteed);
        assert_eq!(c.runtime, Some(Runtime::Docker));

        // kind: kubelet's root nested in /kubelet.slice.
        let p = format!(
            "/kubelet.slice/kubelet-kubepods.slice/kubelet-kubepods-besteffort.slice/kubelet-kubepods-besteffort-pod{}.slice/cri-containerd-{id}.scope",
            us(UID)
        );
        let c = parse_cgroup_path(&p).unwrap();
        assert_eq!((c.pod_uid.as_str(), c.qos), (UID, QosClass::BestEffort));
        assert_eq!(c.container_id.as_deref(), Some(id.as_str()));

        // The pod's own slice.
        let p = format!(
            "/kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod{}.slice",
            us(UID)
        );
        let c = parse_cgroup_path(&p).unwrap();
        assert_eq!(c.container_id, None);
        assert_eq!(c.runtime, None);

        // Relative to a cgroup namespace.
        let p = format!(
            "/../../kubepods-burstable-pod{}.slice/cri-containerd-{id}.scope",
            us(UID)
        );
        let c = parse_cgroup_path(&p).unwrap();
        assert_eq!((c.pod_uid.as_str(), c.qos), (UID, QosClass::Burstable));
    }

    #[test]
    fn cgroupfs_layouts() {
        let id = cid('b');
        let c = parse_cgroup_path(&format!("/kubepods/besteffort/pod{UID}/{id}")).unwrap();
        assert_eq!(c.qos, QosClass::BestEffort);
        assert_eq!(c.driver, CgroupDriver::Cgroupfs);
        assert_eq!(c.container_id.as_deref(), Some(id.as_str()));
        assert_eq!(c.runtime, None);
        let c = parse_cgroup_path(&format!("/kubepods/pod{UID}/{id}")).unwrap();
        assert_eq!(c.qos, QosClass::Guaranteed);
        let c = parse_cgroup_path(&format!("/kubepods/burstable/pod{UID}/crio-{id}")).unwrap();
        assert_eq!(
            (c.qos, c.runtime),
            (QosClass::Burstable, Some(Runtime::CriO))
        );
        // Nested under some prefix (kind with cgroupfs: /kubelet/kubepods).
        let c = parse_cgroup_path(&format!("/kubelet/kubepods/burstable/pod{UID}/{id}")).unwrap();
        assert_eq!(c.pod_uid, UID);
        // A static pod's UID.
        let c = parse_cgroup_path(&format!("/kubepods/burstable/pod{STATIC_UID}/{id}")).unwrap();
        assert_eq!(c.pod_uid, STATIC_UID);
        // The pod itself.
        let c = parse_cgroup_path(&format!("/kubepods/burstable/pod{UID}")).unwrap();
        assert_eq!(c.container_id, None);
    }

    #[test]
    fn not_pods() {
        for p in [
            "/",
            "",
            "/system.slice/containerd.service",
            "/user.slice/user-1000.slice/session-3.scope",
            "/kubepods.slice",
            "/kubepods.slice/kubepods-besteffort.slice",
            "/kubepods",
            "/kubepods/burstable",
            "/kubepods/burstable/notapod",
            "/kubepods/burstable/podxyz",
            "/docker/0123",
            "/besteffort/pod1f3a0c2e-5b6d-4e7f-8a9b-0c1d2e3f4a5b/x",
            "/system.slice/kubepods-helper.service",
        ] {
            assert_eq!(parse_cgroup_path(p), None, "{p}");
        }
    }

    #[test]
    fn proc_cgroup_v2_then_v1() {
        let id = cid('c');
        let hybrid = format!(
            "12:memory:/kubepods/burstable/pod{UID}/{id}\n1:name=systemd:/kubepods/burstable/pod{UID}/{id}\n0::/system.slice/containerd.service\n"
        );
        let (c, path) = pod_from_proc_cgroup(&hybrid).unwrap();
        assert_eq!(c.pod_uid, UID);
        assert_eq!(path, format!("/kubepods/burstable/pod{UID}/{id}"));
        assert_eq!(
            pod_from_proc_cgroup("0::/user.slice\n"),
            Err(Some("/user.slice".into()))
        );
        assert_eq!(pod_from_proc_cgroup("3:cpu:/\n"), Err(Some("/".into())));
        assert_eq!(pod_from_proc_cgroup(""), Err(None));
    }

    #[test]
    fn pods_log_names() {
        assert_eq!(
            parse_pods_log_dir(&format!("kube-system_coredns-5d78c9869d-abcde_{UID}")),
            Some((
                UID.into(),
                "kube-system".into(),
                "coredns-5d78c9869d-abcde".into()
            ))
        );
        assert_eq!(parse_pods_log_dir("default_web"), None);
        assert_eq!(parse_pods_log_dir("default_web_notauid"), None);
        assert_eq!(parse_pods_log_dir(&format!("_web_{UID}")), None);
    }

    #[test]
    fn etc_hosts() {
        let plain = "# Kubernetes-managed hosts file.\n127.0.0.1\tlocalhost\n::1\tlocalhost ip6-localhost ip6-loopback\nfe00::0\tip6-localnet\nfe00::0\tip6-mcastprefix\nfe00::1\tip6-allnodes\nfe00::2\tip6-allrouters\n10.244.1.5\tweb-7d9f\n";
        assert_eq!(hostname_from_etc_hosts(plain).as_deref(), Some("web-7d9f"));
        let sub = "# Kubernetes-managed hosts file.\n127.0.0.1\tlocalhost\n10.244.1.6\tweb-0.web.default.svc.cluster.local\tweb-0\n\n# Entries added by HostAliases.\n1.2.3.4\tfoo\n";
        assert_eq!(hostname_from_etc_hosts(sub).as_deref(), Some("web-0"));
        let aliases_only =
            "# Kubernetes-managed hosts file.\n127.0.0.1\tlocalhost\n\n# Entries added by HostAliases.\n1.2.3.4\tfoo\n";
        assert_eq!(hostname_from_etc_hosts(aliases_only), None);
        let host_net = "# Kubernetes-managed hosts file (host network).\n127.0.0.1\tlocalhost\n10.0.0.1\tnode-1\n";
        assert_eq!(hostname_from_etc_hosts(host_net), None);
    }

    #[test]
    fn labels_and_filters() {
        let pod = Workload {
            kind: WorkloadKind::Pod,
            namespace: Some("default".into()),
            pod: Some("web-7d9f".into()),
            uid: Some(UID.into()),
            container_id: Some(cid('d')),
            ..Workload::unknown()
        };
        assert_eq!(pod.label(), "default/web-7d9f");
        for f in [
            "default/web-7d9f",
            "web-7d9f",
            "default/",
            "default/*",
            "1f3a",
            "1F3A0C2E",
            "dddd",
            "",
        ] {
            assert!(pod.matches(f), "{f}");
        }
        for f in ["other/web-7d9f", "web", "1f3", "host", "default/web"] {
            assert!(!pod.matches(f), "{f}");
        }
        assert!(pod.matches_namespace("default"));
        assert!(!pod.matches_namespace("kube-system"));

        let uid_only = Workload {
            namespace: None,
            pod: None,
            ..pod.clone()
        };
        assert_eq!(uid_only.label(), "pod 1f3a0c2e…");
        let ns_uid = Workload {
            pod: None,
            ..pod.clone()
        };
        assert_eq!(ns_uid.label(), "default/pod 1f3a0c2e…");
        let name_only = Workload {
            namespace: None,
            ..pod.clone()
        };
        assert_eq!(name_only.label(), "pod web-7d9f");

        assert_eq!(Workload::host(None).label(), "host");
        let h = Workload::host(Some("sshd".into()));
        assert_eq!(h.label(), "host:sshd");
        assert!(h.matches("host"));
        assert!(!h.matches("sshd"));
        assert!(!h.matches_namespace("default"));
        assert_eq!(Workload::unknown().label(), "unknown");
        assert!(!Workload::unknown().matches("default/web-7d9f"));
        let json = serde_json::to_value(&pod).unwrap();
        assert_eq!(json["kind"], "pod");
        assert_eq!(json["namespace"], "default");
    }

    #[test]
    fn bounded_evicts_oldest() {
        let mut b = Bounded::new(3);
        for i in 0..5u32 {
            b.insert(i, i * 10);
        }
        assert_eq!(b.len(), 3);
        assert_eq!(b.get(&0), None);
        assert_eq!(b.get(&1), None);
        assert_eq!(b.get(&4), Some(&40));
        b.insert(4, 41);
        assert_eq!(b.len(), 3);
        b.remove(&3);
        b.insert(5, 50);
        b.insert(6, 60);
        assert_eq!(b.len(), 3);
        assert_eq!(b.order.len(), 3);
        assert_eq!(b.get(&2), None);
    }

    // --- fake node roots ------------------------------------------------------------------

    static COUNTER: AtomicU64 = AtomicU64::new(0);

    /// A temporary node root, removed on drop.
    struct FakeNode {
        root: PathBuf,
    }

    impl Drop for FakeNode {
        fn drop(&mut self) {
            let _ = fs::remove_dir_all(&self.root);
        }
    }

    impl FakeNode {
        fn new() -> FakeNode {
            let root = std::env::temp_dir().join(format!(
                "tracer-pods-test-{}-{}",
                std::process::id(),
                COUNTER.fetch_add(1, Ordering::Relaxed)
            ));
            let _ = fs::remove_dir_all(&root);
            fs::create_dir_all(root.join("proc/1")).unwrap();
            fs::create_dir_all(root.join("sys/fs/cgroup/unified")).unwrap();
            fs::create_dir_all(root.join("var/log/pods")).unwrap();
            fs::create_dir_all(root.join("var/lib/kubelet/pods")).unwrap();
            fs::write(
                root.join("proc/1/mountinfo"),
                "25 30 0:22 / /sys/fs/cgroup rw - tmpfs tmpfs rw\n\
                 26 25 0:23 / /sys/fs/cgroup/unified rw,nosuid - cgroup2 cgroup2 rw\n",
            )
            .unwrap();
            FakeNode { root }
        }

        fn paths(&self) -> NodePaths {
            NodePaths::for_root(&self.root).unwrap()
        }

        /// Makes cgroup `rel` (below the cgroup2 mount) and returns its id (inode).
        fn cgroup(&self, rel: &str) -> u64 {
            let p = self
                .root
                .join("sys/fs/cgroup/unified")
                .join(rel.trim_start_matches('/'));
            fs::create_dir_all(&p).unwrap();
            fs::metadata(&p).unwrap().ino()
        }

        fn pod_log(&self, ns: &str, name: &str, uid: &str) {
            fs::create_dir_all(
                self.root
                    .join("var/log/pods")
                    .join(format!("{ns}_{name}_{uid}"))
                    .join("app"),
            )
            .unwrap();
        }

        fn etc_hosts(&self, uid: &str, hostname: &str) {
            let d = self.root.join("var/lib/kubelet/pods").join(uid);
            fs::create_dir_all(&d).unwrap();
            fs::write(
                d.join("etc-hosts"),
                format!("# Kubernetes-managed hosts file.\n127.0.0.1\tlocalhost\n10.244.0.9\t{hostname}\n"),
            )
            .unwrap();
        }

        /// A process: its cgroup file, comm, network namespace link and optionally the
        /// service-account namespace seen through its root.
        fn process(&self, pid: u32, cgroup: &str, comm: &str, netns: u32, sa_ns: Option<&str>) {
            let d = self.root.join("proc").join(pid.to_string());
            fs::create_dir_all(d.join("ns")).unwrap();
            fs::write(d.join("cgroup"), cgroup).unwrap();
            fs::write(d.join("comm"), format!("{comm}\n")).unwrap();
            let link = d.join("ns/net");
            let _ = fs::remove_file(&link);
            std::os::unix::fs::symlink(format!("net:[{netns}]"), &link).unwrap();
            if let Some(ns) = sa_ns {
                let sa = d.join("root/run/secrets/kubernetes.io/serviceaccount");
                fs::create_dir_all(&sa).unwrap();
                fs::write(sa.join("namespace"), ns).unwrap();
            }
        }

        fn index(&self) -> PodIndex {
            PodIndex::new(self.paths())
        }
    }

    fn assert_pod(
        w: &Workload,
        ns: &str,
        name: &str,
        uid: &str,
        id: Option<&str>,
        runtime: Option<&str>,
    ) {
        assert_eq!(w.kind, WorkloadKind::Pod, "{w:?}");
        assert_eq!(w.namespace.as_deref(), Some(ns), "{w:?}");
        assert_eq!(w.pod.as_deref(), Some(name), "{w:?}");
        assert_eq!(w.uid.as_deref(), Some(uid), "{w:?}");
        assert_eq!(w.container_id.as_deref(), id, "{w:?}");
        assert_eq!(w.runtime.as_deref(), runtime, "{w:?}");
    }

    #[test]
    fn node_paths_for_root() {
        let n = FakeNode::new();
        let p = n.paths();
        assert_eq!(p.cgroup2, n.root.join("sys/fs/cgroup/unified"));
        assert_eq!(p.proc, n.root.join("proc"));
        assert_eq!(p.pods_log, n.root.join("var/log/pods"));
        assert_eq!(p.kubelet_pods, n.root.join("var/lib/kubelet/pods"));
        // Falls back to proc/self/mountinfo.
        fs::remove_file(n.root.join("proc/1/mountinfo")).unwrap();
        fs::create_dir_all(n.root.join("proc/self")).unwrap();
        fs::write(
            n.root.join("proc/self/mountinfo"),
            "26 25 0:23 / /sys/fs/cgroup/unified rw - cgroup2 cgroup2 rw\n",
        )
        .unwrap();
        assert_eq!(n.paths().cgroup2, n.root.join("sys/fs/cgroup/unified"));
        fs::write(n.root.join("proc/self/mountinfo"), "").unwrap();
        let e = NodePaths::for_root(&n.root).unwrap_err();
        assert!(format!("{e:#}").contains("no cgroup2 mount"), "{e:#}");
    }

    #[test]
    fn resolves_every_layout_by_inode() {
        let n = FakeNode::new();
        let layouts: Vec<(&str, &str, String, Option<&str>)> = {
            let id = |c| cid(c);
            vec![
                (
                    "default",
                    "web-containerd",
                    format!(
                        "/kubepods.slice/kubepods-besteffort.slice/kubepods-besteffort-pod{{U}}.slice/cri-containerd-{}.scope",
                        id('1')
                    ),
                    Some("containerd"),
                ),
                (
                    "shop",
                    "cart-crio",
                    format!(
                        "/kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod{{U}}.slice/crio-{}.scope",
                        id('2')
                    ),
                    Some("cri-o"),
                ),
                (
                    "legacy",
                    "api-docker",
                    format!(
                        "/kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod{{U}}.slice/docker-{}.scope",
                        id('3')
                    ),
                    Some("docker"),
                ),
                (
                    "default",
                    "db-cgroupfs",
                    format!("/kubepods/burstable/pod{{u}}/{}", id('4')),
                    None,
                ),
                (
                    "legacy",
                    "job-cgroupfs-docker",
                    format!("/kubepods/besteffort/pod{{u}}/{}", id('5')),
                    Some("docker"),
                ),
                (
                    "kube-system",
                    "coredns-kind",
                    format!(
                        "/kubelet.slice/kubelet-kubepods.slice/kubelet-kubepods-burstable.slice/kubelet-kubepods-burstable-pod{{U}}.slice/cri-containerd-{}.scope",
                        id('6')
                    ),
                    Some("containerd"),
                ),
                (
                    "prod",
                    "guaranteed-systemd",
                    format!("/kubepods.slice/kubepods-pod{{U}}.slice/cri-containerd-{}.scope", id('7')),
                    Some("containerd"),
                ),
                (
                    "prod",
                    "guaranteed-cgroupfs",
                    format!("/kubepods/pod{{u}}/{}", id('8')),
                    None,
                ),
            ]
        };
        // cgroupfs + Docker: the runtime is found from Docker's state directory.
        fs::create_dir_all(n.root.join("var/lib/docker/containers").join(cid('5'))).unwrap();
        let mut idx = n.index();
        let mut expected = Vec::new();
        for (i, (ns, name, tmpl, runtime)) in layouts.iter().enumerate() {
            let uid = format!("{:08x}-0000-4000-8000-{:012x}", i + 1, i + 1);
            let rel = tmpl.replace("{U}", &us(&uid)).replace("{u}", &uid);
            let ino = n.cgroup(&rel);
            n.pod_log(ns, name, &uid);
            let id = parse_cgroup_path(&rel).unwrap().container_id.unwrap();
            expected.push((ino, *ns, *name, uid, id, *runtime, rel));
        }
        for (ino, ns, name, uid, id, runtime, rel) in &expected {
            let w = idx.resolve(*ino, 0, None);
            assert_pod(&w, ns, name, uid, Some(id), *runtime);
            assert_eq!(w.cgroup.as_deref(), Some(rel.as_str()));
            assert_eq!(w.label(), format!("{ns}/{name}"));
        }
        // Everything was made before the first lookup: one walk, one pods log scan.
        let s = idx.stats();
        assert_eq!((s.cgroup_scans, s.pods_log_scans), (1, 1), "{s:?}");
        // Cached by cgroup id from now on.
        let again = idx.resolve(expected[0].0, 0, None);
        assert!(Arc::ptr_eq(&again, &idx.resolve(expected[0].0, 0, None)));

        // The pod's own slice and the QoS level, made after the walk.
        idx.set_rescan_interval(Duration::ZERO);
        let pod_ino = n.cgroup(&format!(
            "/kubepods.slice/kubepods-besteffort.slice/kubepods-besteffort-pod{}.slice",
            us(&expected[0].3)
        ));
        let qos_ino = n.cgroup("/kubepods.slice/kubepods-besteffort.slice");
        let root_ino = fs::metadata(n.root.join("sys/fs/cgroup/unified"))
            .unwrap()
            .ino();
        let w = idx.resolve(pod_ino, 0, None);
        assert_pod(&w, "default", "web-containerd", &expected[0].3, None, None);
        let w = idx.resolve(qos_ino, 0, None);
        assert_eq!(w.kind, WorkloadKind::Host);
        assert_eq!(
            w.cgroup.as_deref(),
            Some("/kubepods.slice/kubepods-besteffort.slice")
        );
        let w = idx.resolve(root_ino, 0, None);
        assert_eq!(
            (w.kind, w.cgroup.as_deref()),
            (WorkloadKind::Host, Some("/"))
        );
    }

    #[test]
    fn names_without_pods_log() {
        let n = FakeNode::new();
        let id = cid('e');
        let rel = format!(
            "/kubepods.slice/kubepods-besteffort.slice/kubepods-besteffort-pod{}.slice/cri-containerd-{id}.scope",
            us(UID)
        );
        let ino = n.cgroup(&rel);
        // Nothing at all: the UID.
        let mut idx = n.index();
        idx.set_rescan_interval(Duration::ZERO);
        let w = idx.resolve(ino, 0, None);
        assert_eq!(
            (w.kind, w.pod.as_deref(), w.namespace.as_deref()),
            (WorkloadKind::Pod, None, None)
        );
        assert_eq!(w.label(), "pod 1f3a0c2e…");
        // etc-hosts names it; a process of the cgroup (cgroup.procs) gives the namespace.
        n.etc_hosts(UID, "web-7d9f");
        let procs = n
            .root
            .join("sys/fs/cgroup/unified")
            .join(rel.trim_start_matches('/'))
            .join("cgroup.procs");
        fs::write(&procs, "4242\n").unwrap();
        n.process(
            4242,
            &format!("0::{rel}\n"),
            "nginx",
            4026532100,
            Some("default"),
        );
        let w = idx.resolve(ino, 0, None);
        assert_pod(
            &w,
            "default",
            "web-7d9f",
            UID,
            Some(&id),
            Some("containerd"),
        );
        // The pid of the event is used directly.
        fs::write(&procs, "").unwrap();
        let mut idx = n.index();
        let w = idx.resolve(ino, 0, Some(4242));
        assert_pod(
            &w,
            "default",
            "web-7d9f",
            UID,
            Some(&id),
            Some("containerd"),
        );
    }

    #[test]
    fn pid_and_netns_fallbacks() {
        let n = FakeNode::new();
        let id = cid('f');
        let v1 = format!("/kubepods/burstable/pod{UID2}/{id}");
        n.pod_log("payments", "api-0", UID2);
        fs::create_dir_all(
            n.root
                .join("run/containerd/io.containerd.runtime.v2.task/k8s.io")
                .join(&id),
        )
        .unwrap();
        // Hybrid host: the container is in v1 hierarchies only; its v2 cgroup is the
        // runtime's service.
        let service = n.cgroup("/system.slice/containerd.service");
        let cg =
            format!("4:memory:{v1}\n1:name=systemd:{v1}\n0::/system.slice/containerd.service\n");
        n.process(1, "0::/init.scope\n", "systemd", 4026531840, None);
        n.process(300, &cg, "pause", 4026532200, None);
        n.process(301, &cg, "api", 4026532200, None);
        n.process(
            500,
            "0::/system.slice/sshd.service\n",
            "sshd",
            4026531840,
            None,
        );
        let mut idx = n.index();
        // By pid.
        let w = idx.resolve(service, 4026532200, Some(301));
        assert_pod(&w, "payments", "api-0", UID2, Some(&id), Some("containerd"));
        assert_eq!(w.cgroup.as_deref(), Some(v1.as_str()));
        // By netns, no pid.
        let w = idx.resolve(service, 4026532200, None);
        assert_pod(&w, "payments", "api-0", UID2, Some(&id), Some("containerd"));
        // Unknown cgroup id, netns only.
        let w = idx.resolve(0, 4026532200, None);
        assert_eq!(w.label(), "payments/api-0");
        // Host processes; the host netns is never mapped through a process.
        let w = idx.resolve(0, 4026531840, Some(500));
        assert_eq!(w.kind, WorkloadKind::Host);
        assert_eq!(w.process.as_deref(), Some("sshd"));
        assert_eq!(w.cgroup.as_deref(), Some("/system.slice/sshd.service"));
        assert_eq!(w.label(), "host:sshd");
        let w = idx.resolve(service, 4026531840, None);
        assert_eq!(w.label(), "host");
        // Gone process, unknown cgroup, unknown netns.
        let w = idx.resolve(0, 0, Some(999));
        assert_eq!(w.kind, WorkloadKind::Unknown);
        let w = idx.resolve(123_456_789, 4026539999, None);
        assert_eq!(w.kind, WorkloadKind::Unknown);
        assert_eq!(w.label(), "unknown");

        // A reused netns inode: the cached pid is checked again.
        fs::remove_dir_all(n.root.join("proc/300")).unwrap();
        fs::remove_dir_all(n.root.join("proc/301")).unwrap();
        idx.set_rescan_interval(Duration::ZERO);
        n.process(600, "0::/user.slice\n", "bash", 4026532200, None);
        let w = idx.resolve(0, 4026532200, None);
        assert_eq!(w.kind, WorkloadKind::Unknown, "{w:?}");
    }

    #[test]
    fn rescans_are_rate_limited() {
        let n = FakeNode::new();
        let mut idx = PodIndex::with_limits(n.paths(), 64, Duration::from_secs(3600));
        assert_eq!(idx.resolve(42, 0, None).kind, WorkloadKind::Unknown);
        assert_eq!(idx.stats().cgroup_scans, 1);
        // A cgroup made after the walk is not seen until the interval has passed...
        let ino = n.cgroup(&format!("/kubepods/besteffort/pod{UID}/{}", cid('9')));
        for _ in 0..100 {
            assert_eq!(idx.resolve(ino, 0, None).kind, WorkloadKind::Unknown);
            assert_eq!(idx.resolve(0, 4026530000, None).kind, WorkloadKind::Unknown);
        }
        let s = idx.stats();
        assert_eq!((s.cgroup_scans, s.netns_scans), (1, 1), "{s:?}");
        // ... and is once it has.
        idx.set_rescan_interval(Duration::ZERO);
        let w = idx.resolve(ino, 0, None);
        assert_eq!((w.kind, w.uid.as_deref()), (WorkloadKind::Pod, Some(UID)));
        assert_eq!(idx.stats().cgroup_scans, 2);
        // The pods log is rate-limited too: this pod has no log dir, and looking it up again
        // within the interval scans nothing.
        idx.set_rescan_interval(Duration::from_secs(3600));
        let before = idx.stats().pods_log_scans;
        for _ in 0..10 {
            idx.resolve(ino, 0, None);
        }
        assert_eq!(idx.stats().pods_log_scans, before);
    }

    #[test]
    fn caches_are_bounded() {
        let n = FakeNode::new();
        let mut inos = Vec::new();
        for i in 0..40 {
            let uid = format!("{:08x}-0000-4000-8000-000000000000", i);
            inos.push(n.cgroup(&format!("/kubepods/besteffort/pod{uid}/{}", cid('a'))));
            n.pod_log("ns", &format!("p{i}"), &uid);
        }
        for pid in 1000..1040 {
            n.process(pid, "0::/user.slice\n", "sh", 4026533000 + pid, None);
        }
        let mut idx = PodIndex::with_limits(n.paths(), 16, Duration::ZERO);
        for &ino in &inos {
            idx.resolve(ino, 0, None);
        }
        for pid in 1000..1040 {
            idx.resolve(0, 4026533000 + pid, Some(pid));
        }
        let s = idx.stats();
        assert!(s.cgroups <= 16 && s.netns <= 16 && s.pods <= 16, "{s:?}");
        assert!(s.cached <= 32, "{s:?}");
        // Still correct for what was evicted: found again by a rescan.
        let w = idx.resolve(inos[0], 0, None);
        assert_eq!(w.pod.as_deref(), Some("p0"));
    }
}

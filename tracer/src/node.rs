//! What the pipeline asks of the node it runs on, besides the events themselves: conntrack
//! counter readings and entry lookups (over ctnetlink, inside a netns), kernel symbol names
//! and who is behind a cgroup. [`LiveNode`] asks the kernel and the filesystem; a recording
//! writes each answer down (`trace::Recording`) and a replay gives the same answers back in
//! the same order (`trace::Replay`), so a recorded run replays to the same findings.

use std::{
    collections::{BTreeMap, BTreeSet},
    fs,
    os::unix::fs::MetadataExt as _,
    path::{Path, PathBuf},
    sync::Arc,
    time::{Duration, Instant},
};

use crate::{
    ctstats::{self, CpuStats, CtEntry, TupleDir},
    events::FiveTuple,
    kallsyms::Symbols,
    pods::{PodIndex, Workload},
};

/// An answer about a network namespace, and whether the inode it is known by now names a
/// new namespace (the old one's books must go: the new one's counters started at zero).
#[derive(Debug, Clone, PartialEq)]
pub struct NsAnswer<T> {
    pub reborn: bool,
    pub value: T,
}

pub trait Node: Send {
    /// The counters of every network namespace that exists now (the start of a run).
    fn baselines(&mut self) -> Vec<(u32, CpuStats)>;
    /// Adds a namespace the caller knows by path; its inode and counters.
    fn track(&mut self, path: &Path) -> Result<(u32, CpuStats), String>;
    /// Namespaces the caller does not `know` whose counters can be read now, each with the
    /// reading its books start from: zero for one created after the run started (or one
    /// that had no conntrack then: nf_conntrack loaded later), its current counters for one
    /// that existed but could not be read then. A node that can not look finds none.
    fn discover(&mut self, _known: &dyn Fn(u32) -> bool) -> Vec<(u32, CpuStats)> {
        Vec::new()
    }
    /// The caller dropped its books of `netns` (gone, nothing counted): the node may drop
    /// what it keeps for it.
    fn forget(&mut self, _netns: u32) {}
    /// The counters of `netns` now; `None` when it can not be read (gone, no conntrack).
    fn counters(&mut self, netns: u32) -> NsAnswer<Option<CpuStats>>;
    /// The entry holding `key` in direction `dir` in `netns`.
    fn winner(
        &mut self,
        netns: u32,
        dir: TupleDir,
        key: &FiveTuple,
    ) -> NsAnswer<Result<Option<CtEntry>, String>>;
    /// `symbol+0xoff` of a kernel text address.
    fn symbol(&mut self, addr: u64) -> String;
    /// Who is behind a cgroup / netns / pid.
    fn workload(&mut self, cgroup_id: u64, netns: u32, pid: Option<u32>) -> Arc<Workload>;
}

/// Network namespace inode -> a path that opens it (`/run/netns/NAME`, `/proc/PID/ns/net`).
pub fn scan_netns() -> BTreeMap<u32, PathBuf> {
    let mut out = BTreeMap::new();
    let mut add = |p: PathBuf| {
        if let Ok(m) = fs::metadata(&p) {
            out.entry(m.ino() as u32).or_insert(p);
        }
    };
    if let Ok(dir) = fs::read_dir("/run/netns") {
        for e in dir.flatten() {
            add(e.path());
        }
    }
    if let Ok(dir) = fs::read_dir("/proc") {
        for e in dir.flatten() {
            if e.file_name()
                .to_string_lossy()
                .bytes()
                .all(|b| b.is_ascii_digit())
            {
                add(e.path().join("ns/net"));
            }
        }
    }
    out
}

/// How often an unknown netns may trigger a rescan of /proc.
const RESCAN_EVERY: Duration = Duration::from_millis(500);

/// The node this process runs on.
pub struct LiveNode {
    paths: BTreeMap<u32, PathBuf>,
    last_scan: Instant,
    symbols: Symbols,
    pods: PodIndex,
    /// The namespaces that existed when the run started.
    at_start: BTreeSet<u32>,
    /// Whether any namespace's counters could be read at the start (else conntrack was not
    /// loaded: every namespace's counters start from zero when it is).
    conntrack_at_start: bool,
}

impl LiveNode {
    pub fn new(symbols: Symbols, pods: PodIndex) -> Self {
        let paths = scan_netns();
        LiveNode {
            at_start: paths.keys().copied().collect(),
            paths,
            last_scan: Instant::now(),
            symbols,
            pods,
            conntrack_at_start: false,
        }
    }

    fn rescan(&mut self) {
        self.last_scan = Instant::now();
        for (k, v) in scan_netns() {
            self.paths.entry(k).or_insert(v);
        }
    }

    /// A path that opens `netns`, and whether its inode now names a new namespace.
    fn path_of(&mut self, netns: u32) -> (bool, Option<PathBuf>) {
        let mut reborn = false;
        match self.paths.get(&netns) {
            // Namespace inodes are reused: a path found earlier may now open nothing, or
            // another namespace. Look again; a namespace found with this inode is a new one.
            // A namespace that is simply gone keeps its books (its last reading still counts).
            Some(p) if !fs::metadata(p).is_ok_and(|m| m.ino() as u32 == netns) => {
                log::debug!("netns {netns}: {} is stale", p.display());
                self.paths.remove(&netns);
                self.rescan();
                reborn = self.paths.contains_key(&netns);
            }
            Some(_) => {}
            None if self.last_scan.elapsed() > RESCAN_EVERY => self.rescan(),
            None => {}
        }
        (reborn, self.paths.get(&netns).cloned())
    }
}

impl Node for LiveNode {
    fn baselines(&mut self) -> Vec<(u32, CpuStats)> {
        let mut out = Vec::new();
        for (inum, path) in &self.paths {
            match ctstats::read_in(path) {
                Ok(s) => out.push((*inum, s.totals())),
                Err(e) => log::debug!(
                    "no conntrack statistics for netns {inum} ({}): {e}",
                    path.display()
                ),
            }
        }
        self.conntrack_at_start = !out.is_empty();
        out
    }

    fn track(&mut self, path: &Path) -> Result<(u32, CpuStats), String> {
        let inum = fs::metadata(path).map_err(|e| e.to_string())?.ino() as u32;
        let s = ctstats::read_in(path).map_err(|e| e.to_string())?;
        self.paths.insert(inum, path.to_owned());
        Ok((inum, s.totals()))
    }

    fn forget(&mut self, netns: u32) {
        self.paths.remove(&netns);
    }

    fn discover(&mut self, known: &dyn Fn(u32) -> bool) -> Vec<(u32, CpuStats)> {
        self.rescan();
        let mut out = Vec::new();
        for (inum, path) in &self.paths {
            if known(*inum) {
                continue;
            }
            // No conntrack in it (yet), or gone: asked again at the next discovery.
            let Ok(s) = ctstats::read_in(path) else {
                continue;
            };
            let existed = self.at_start.contains(inum) && self.conntrack_at_start;
            log::debug!(
                "netns {inum} ({}): counters from {}",
                path.display(),
                if existed { "now" } else { "zero" }
            );
            out.push((
                *inum,
                if existed {
                    s.totals()
                } else {
                    CpuStats::default()
                },
            ));
        }
        out
    }

    fn counters(&mut self, netns: u32) -> NsAnswer<Option<CpuStats>> {
        let (reborn, path) = self.path_of(netns);
        let value = path.and_then(|p| match ctstats::read_in(&p) {
            Ok(s) => Some(s.totals()),
            Err(e) => {
                log::debug!("conntrack statistics of netns {netns}: {e}");
                None
            }
        });
        NsAnswer { reborn, value }
    }

    fn winner(
        &mut self,
        netns: u32,
        dir: TupleDir,
        key: &FiveTuple,
    ) -> NsAnswer<Result<Option<CtEntry>, String>> {
        let (reborn, path) = self.path_of(netns);
        let value = match path {
            Some(p) => ctstats::lookup_in(&p, dir, key).map_err(|e| e.to_string()),
            None => Err(format!("netns {netns} is gone")),
        };
        NsAnswer { reborn, value }
    }

    fn symbol(&mut self, addr: u64) -> String {
        self.symbols.resolve(addr)
    }

    fn workload(&mut self, cgroup_id: u64, netns: u32, pid: Option<u32>) -> Arc<Workload> {
        self.pods.resolve(cgroup_id, netns, pid)
    }
}

//! Findings for a live run: reads the conntrack counters of the network namespaces drops
//! happen in (over ctnetlink, inside each netns) and feeds them with the events to the
//! [`Classifier`].

use std::{
    collections::BTreeMap,
    fs,
    os::unix::fs::MetadataExt as _,
    path::{Path, PathBuf},
    time::{Duration, Instant},
};

use crate::{
    ctstats::{self, CpuStats, TupleDir},
    events::NfDropEvent,
    verdict::{is_rule_engine, Classifier, Finding, Verdict, PRECISE_CONFIRM_SOURCES},
};

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

pub struct Explainer {
    classifier: Classifier,
    paths: BTreeMap<u32, PathBuf>,
    last_scan: Instant,
}

/// How often an unknown netns may trigger a rescan of /proc.
const RESCAN_EVERY: Duration = Duration::from_millis(500);

impl Explainer {
    /// Baselines the counters of every network namespace that exists now.
    pub fn start() -> Self {
        let paths = scan_netns();
        let mut classifier = Classifier::new();
        for (inum, path) in &paths {
            match ctstats::read_in(path) {
                Ok(s) => classifier.baseline(*inum, &s.totals()),
                Err(e) => log::debug!(
                    "no conntrack statistics for netns {inum} ({}): {e}",
                    path.display()
                ),
            }
        }
        Explainer {
            classifier,
            paths,
            last_scan: Instant::now(),
        }
    }

    /// Adds (and baselines) a namespace the caller knows about.
    pub fn track(&mut self, path: &Path) -> anyhow::Result<u32> {
        let inum = fs::metadata(path)?.ino() as u32;
        let s = ctstats::read_in(path)?;
        self.classifier.baseline(inum, &s.totals());
        self.paths.insert(inum, path.to_owned());
        Ok(inum)
    }

    fn rescan(&mut self) {
        self.last_scan = Instant::now();
        for (k, v) in scan_netns() {
            self.paths.entry(k).or_insert(v);
        }
    }

    fn path_of(&mut self, netns: u32) -> Option<PathBuf> {
        match self.paths.get(&netns) {
            // Namespace inodes are reused: a path found earlier may now open nothing, or
            // another namespace. Look again; a namespace found with this inode is a new one,
            // whose counters started at zero, so the old one's books go. A namespace that
            // is simply gone keeps its books (its last reading still counts).
            Some(p) if !fs::metadata(p).is_ok_and(|m| m.ino() as u32 == netns) => {
                log::debug!("netns {netns}: {} is stale", p.display());
                self.paths.remove(&netns);
                self.rescan();
                if self.paths.contains_key(&netns) {
                    self.classifier.forget(netns);
                }
            }
            Some(_) => {}
            None if self.last_scan.elapsed() > RESCAN_EVERY => self.rescan(),
            None => {}
        }
        self.paths.get(&netns).cloned()
    }

    fn read(&mut self, netns: u32) -> Option<CpuStats> {
        let path = self.path_of(netns)?;
        match ctstats::read_in(&path) {
            Ok(s) => Some(s.totals()),
            Err(e) => {
                log::debug!("conntrack statistics of netns {netns}: {e}");
                None
            }
        }
    }

    /// The finding for one netfilter drop; `None` when a precise source already reported
    /// the same packet.
    pub fn drop_event(&mut self, ev: &NfDropEvent, location_sym: &str) -> Option<Finding> {
        // The counters move before the packet is freed, so a reading taken now covers it.
        // A rule's drop and an insert failure seen where it happened do not depend on the
        // counters: no reading (a netlink round trip in the netns) for those, which are also
        // the drops that can arrive at line rate.
        let precise = PRECISE_CONFIRM_SOURCES.contains(&ev.source);
        let stats = if precise || is_rule_engine(location_sym) {
            None
        } else {
            self.read(ev.netns)
        };
        let mut f = self
            .classifier
            .drop_event(ev, location_sym, stats.as_ref())?;
        if matches!(
            f.verdict,
            Verdict::SnatPortClash | Verdict::InsertClashDropped
        ) {
            self.name_the_winner(&mut f);
        }
        Some(f)
    }

    /// The finding for a clash a precise source saw (`nf_ct_resolve_clash`).
    pub fn clash_event(&mut self, ev: &NfDropEvent) -> Option<Finding> {
        self.classifier.clash_event(ev)
    }

    /// Looks up the entry the loser clashed with: the one holding its translated reply
    /// tuple (SNAT port clash) or its original tuple (insert race). The kernel matches a
    /// tuple against both directions of every entry; the loser itself was never inserted.
    fn name_the_winner(&mut self, f: &mut Finding) {
        let (Some(ct), Some(path)) = (f.conntrack.clone(), self.path_of(f.netns)) else {
            return;
        };
        let (dir, key) = match f.verdict {
            Verdict::SnatPortClash => (TupleDir::Reply, ct.reply),
            _ => (TupleDir::Orig, ct.orig),
        };
        match ctstats::lookup_in(&path, dir, &key) {
            Ok(Some(winner)) => {
                if f.verdict == Verdict::SnatPortClash {
                    f.explanation += &format!(
                        "; the port is held by {} -> {}",
                        winner.orig.src, winner.orig.dst
                    );
                } else {
                    // The NAT target is where each entry's reply comes from.
                    let differ = winner.reply.src != ct.reply.src;
                    f.nat_targets_differ = Some(differ);
                    f.explanation += &format!(
                        "; the winner was NATed to {}, this packet to {}{}",
                        winner.reply.src,
                        ct.reply.src,
                        if differ {
                            " (different backends)"
                        } else {
                            " (same backend)"
                        }
                    );
                }
                f.lost_to = Some(winner);
            }
            Ok(None) => f.explanation += "; the entry it lost to is already gone",
            Err(e) => log::debug!("looking up the clash winner in netns {}: {e}", f.netns),
        }
    }

    /// Counter-only findings (resolved clashes, early drops, INVALID) of every namespace
    /// whose books are open.
    pub fn poll(&mut self, ts_ns: u64) -> Vec<Finding> {
        let netns: Vec<u32> = self.classifier.deltas().keys().copied().collect();
        let mut out = Vec::new();
        for n in netns {
            if let Some(s) = self.read(n) {
                out.extend(self.classifier.counters(n, ts_ns, &s));
            }
        }
        out
    }

    /// The latest counter reading per namespace (for the metrics' gauges).
    pub fn readings(&self) -> BTreeMap<u32, CpuStats> {
        self.classifier.readings()
    }

    /// Counter deltas per namespace since its baseline.
    pub fn deltas(&self) -> BTreeMap<u32, CpuStats> {
        self.classifier.deltas()
    }
}

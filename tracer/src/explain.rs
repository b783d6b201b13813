//! Findings: feeds drop events and conntrack counter readings (asked of the [`Node`]: over
//! ctnetlink inside each netns on a live run, from the recording on a replay) to the
//! [`Classifier`].

use std::{collections::BTreeMap, path::Path};

use crate::{
    ctstats::{CpuStats, TupleDir},
    events::NfDropEvent,
    node::Node,
    verdict::{is_rule_engine, Classifier, Finding, Verdict, PRECISE_CONFIRM_SOURCES},
};

#[derive(Default)]
pub struct Explainer {
    classifier: Classifier,
}

/// The explainer's books at one moment (the head of a trace segment after a rotation).
pub type Books = Classifier;

impl Explainer {
    /// Baselines the counters of every network namespace that exists now.
    pub fn start(node: &mut dyn Node) -> Self {
        let mut classifier = Classifier::new();
        for (inum, stats) in node.baselines() {
            classifier.baseline(inum, &stats);
        }
        Explainer { classifier }
    }

    /// Whether the probe plan sees resolved clashes per packet ([`Classifier::expect_clashes_per_packet`]).
    pub fn expect_clashes_per_packet(&mut self, yes: bool) {
        self.classifier.expect_clashes_per_packet(yes);
    }

    /// A copy of the books, to restore a replay that starts mid-run.
    pub fn books(&self) -> Books {
        self.classifier.clone()
    }

    pub fn restore(&mut self, books: Books) {
        self.classifier = books;
    }

    /// Adds (and baselines) a namespace the caller knows about.
    pub fn track(&mut self, node: &mut dyn Node, path: &Path) -> anyhow::Result<u32> {
        let (inum, stats) = node.track(path).map_err(anyhow::Error::msg)?;
        self.classifier.baseline(inum, &stats);
        Ok(inum)
    }

    fn read(&mut self, node: &mut dyn Node, netns: u32) -> Option<CpuStats> {
        let a = node.counters(netns);
        if a.reborn {
            self.classifier.forget(netns);
        }
        a.value
    }

    /// The finding for one netfilter drop; `None` when a precise source already reported
    /// the same packet.
    pub fn drop_event(
        &mut self,
        node: &mut dyn Node,
        ev: &NfDropEvent,
        location_sym: &str,
    ) -> Option<Finding> {
        // The counters move before the packet is freed, so a reading taken now covers it.
        // A rule's drop and an insert failure seen where it happened do not depend on the
        // counters: no reading (a netlink round trip in the netns) for those, which are also
        // the drops that can arrive at line rate.
        let precise = PRECISE_CONFIRM_SOURCES.contains(&ev.source);
        let stats = if precise || is_rule_engine(location_sym) {
            None
        } else {
            self.read(node, ev.netns)
        };
        let mut f = self
            .classifier
            .drop_event(ev, location_sym, stats.as_ref())?;
        if matches!(
            f.verdict,
            Verdict::SnatPortClash | Verdict::InsertClashDropped
        ) {
            self.name_the_winner(node, &mut f);
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
    fn name_the_winner(&mut self, node: &mut dyn Node, f: &mut Finding) {
        let Some(ct) = f.conntrack.clone() else {
            return;
        };
        let (dir, key) = match f.verdict {
            Verdict::SnatPortClash => (TupleDir::Reply, ct.reply),
            _ => (TupleDir::Orig, ct.orig),
        };
        let answer = node.winner(f.netns, dir, &key);
        if answer.reborn {
            self.classifier.forget(f.netns);
        }
        match answer.value {
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
    /// whose books are open. `last`: the run's last reading.
    pub fn poll(&mut self, node: &mut dyn Node, ts_ns: u64, last: bool) -> Vec<Finding> {
        // Namespaces made since the start (a pod, a lab) count from their first counter.
        let classifier = &self.classifier;
        for (n, base) in node.discover(&|n| classifier.knows(n)) {
            if !self.classifier.knows(n) {
                self.classifier.baseline(n, &base);
            }
        }
        let netns = self.classifier.netns();
        let mut out = Vec::new();
        for n in netns {
            match self.read(node, n) {
                Some(s) => out.extend(self.classifier.counters(n, ts_ns, &s, last)),
                // Gone (a pod deleted) or unreadable, with nothing counted: its books go,
                // so churning pods do not grow them. Were it still there, the next poll
                // finds it again (and counts from zero if it was made after the start).
                None if self.classifier.idle(n) => {
                    self.classifier.forget(n);
                    node.forget(n);
                }
                None => {}
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

#[cfg(test)]
mod tests {
    use std::{collections::BTreeMap, path::Path, sync::Arc};

    use super::*;
    use crate::{ctstats::CtEntry, events::FiveTuple, node::NsAnswer, pods::Workload};

    /// A node whose namespaces and readings the test sets.
    #[derive(Default)]
    struct Fake {
        at_start: Vec<(u32, CpuStats)>,
        /// `None`: the namespace is gone.
        now: BTreeMap<u32, Option<CpuStats>>,
        found: Vec<(u32, CpuStats)>,
        forgotten: Vec<u32>,
    }

    impl Node for Fake {
        fn baselines(&mut self) -> Vec<(u32, CpuStats)> {
            self.at_start.clone()
        }
        fn track(&mut self, _: &Path) -> Result<(u32, CpuStats), String> {
            Err("not here".into())
        }
        fn discover(&mut self, known: &dyn Fn(u32) -> bool) -> Vec<(u32, CpuStats)> {
            let mut found = std::mem::take(&mut self.found);
            found.retain(|(n, _)| !known(*n));
            found
        }
        fn forget(&mut self, netns: u32) {
            self.forgotten.push(netns);
        }
        fn counters(&mut self, netns: u32) -> NsAnswer<Option<CpuStats>> {
            NsAnswer {
                reborn: false,
                value: self.now.get(&netns).cloned().flatten(),
            }
        }
        fn winner(
            &mut self,
            _: u32,
            _: TupleDir,
            _: &FiveTuple,
        ) -> NsAnswer<Result<Option<CtEntry>, String>> {
            NsAnswer {
                reborn: false,
                value: Ok(None),
            }
        }
        fn symbol(&mut self, addr: u64) -> String {
            format!("{addr:#x}")
        }
        fn workload(&mut self, _: u64, _: u32, _: Option<u32>) -> Arc<Workload> {
            Arc::new(Workload::unknown())
        }
    }

    fn reading(insert: u32, clash_resolve: u32) -> CpuStats {
        CpuStats {
            insert,
            clash_resolve,
            ..CpuStats::default()
        }
    }

    #[test]
    fn a_namespace_found_later_counts_from_where_the_node_says() {
        let mut node = Fake {
            at_start: vec![(1, reading(10, 4))],
            ..Fake::default()
        };
        let mut e = Explainer::start(&mut node);
        // Made after the start, 3 clashes already: all of them are this run's.
        node.found = vec![(2, CpuStats::default())];
        node.now.insert(1, Some(reading(10, 4)));
        node.now.insert(2, Some(reading(5, 3)));
        let f = e.poll(&mut node, 1, false);
        let got: Vec<(u32, Verdict, u64)> =
            f.iter().map(|f| (f.netns, f.verdict, f.count)).collect();
        assert_eq!(got, [(2, Verdict::InsertClashResolved, 3)]);
    }

    #[test]
    fn a_gone_namespace_with_nothing_counted_is_forgotten_and_others_are_kept() {
        let mut node = Fake {
            at_start: vec![(1, reading(10, 0)), (2, reading(10, 0))],
            ..Fake::default()
        };
        let mut e = Explainer::start(&mut node);
        // Traffic in both (`insert` moves); a clash in 2 only.
        node.now.insert(1, Some(reading(50, 0)));
        node.now.insert(2, Some(reading(50, 1)));
        assert_eq!(e.poll(&mut node, 1, false).len(), 1);
        // Both pods deleted.
        node.now.insert(1, None);
        node.now.insert(2, None);
        assert!(e.poll(&mut node, 2, false).is_empty());
        assert_eq!(node.forgotten, [1]);
        assert!(!e.classifier.knows(1));
        assert_eq!(e.deltas()[&2].clash_resolve, 1, "what was counted stays");
    }
}

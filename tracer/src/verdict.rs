//! From kernel events and conntrack counters to findings with one verdict each.
//!
//! On kernels where fexit is refused, a netfilter drop arrives from `kfree_skb` with the
//! skb's conntrack entry (or none) and the drop location. Those tell a rule's verdict
//! (freed inside the rule engine) from a drop on conntrack's own path, and an insert failure
//! (unconfirmed entry) from an allocation failure (no entry). Every conntrack verdict is then
//! backed by the kernel's own counter in that network namespace: a drop is called an insert
//! failure only while `insert_failed` has moved by more than the insert failures already
//! named, and `table-full` only while `drop` has moved by more than the insert failures;
//! a drop the counters do not account for stays unexplained rather than guessed.
//! Clashes the kernel resolved, early drops and INVALID packets that were let through drop
//! no packet: they come from the counters alone (`clash_resolve`, `early_drop`, `invalid`).

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};
use tracer_common::{IPS_DST_NAT, IPS_NAT_CLASH, IPS_SRC_NAT};

use crate::{
    ctstats::CpuStats,
    events::{Conntrack, FiveTuple, NfDropEvent},
};

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Verdict {
    /// Lost the race to insert its conntrack entry (same original tuple, e.g. A/AAAA to a
    /// DNATed VIP); the packet was dropped.
    InsertClashDropped,
    /// A race happened and the kernel resolved it; nothing was lost.
    InsertClashResolved,
    /// Insert failed because two flows got the same translated source port (SNAT).
    SnatPortClash,
    /// No entry could be allocated: the table is full.
    TableFull,
    /// An entry was evicted to make room for a new flow.
    EarlyDrop,
    /// A packet conntrack marked INVALID.
    Invalid,
    /// Dropped by an nftables/iptables rule: not conntrack's doing.
    RulesetDrop,
    /// Dropped on conntrack's path, but the counters of its netns do not account for it.
    Unexplained,
}

impl Verdict {
    pub const ALL: [Verdict; 8] = [
        Verdict::InsertClashDropped,
        Verdict::InsertClashResolved,
        Verdict::SnatPortClash,
        Verdict::TableFull,
        Verdict::EarlyDrop,
        Verdict::Invalid,
        Verdict::RulesetDrop,
        Verdict::Unexplained,
    ];

    pub fn name(self) -> &'static str {
        match self {
            Verdict::InsertClashDropped => "insert-clash-dropped",
            Verdict::InsertClashResolved => "insert-clash-resolved",
            Verdict::SnatPortClash => "snat-port-clash",
            Verdict::TableFull => "table-full",
            Verdict::EarlyDrop => "early-drop",
            Verdict::Invalid => "invalid",
            Verdict::RulesetDrop => "ruleset-drop",
            Verdict::Unexplained => "unexplained",
        }
    }

    /// Whether the verdict means a packet was lost.
    pub fn lost_packet(self) -> bool {
        !matches!(self, Verdict::InsertClashResolved | Verdict::EarlyDrop)
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Finding {
    pub verdict: Verdict,
    pub netns: u32,
    pub ts_ns: u64,
    /// How many occurrences this finding stands for (1 for a packet; a counter delta for
    /// counter-only verdicts).
    pub count: u64,
    /// Where the evidence came from: a kernel program, or the conntrack statistics.
    pub source: &'static str,
    pub packet: Option<FiveTuple>,
    pub conntrack: Option<Conntrack>,
    /// For a resolved clash seen per packet: the loser was inserted reply-only (NAT_CLASH).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub nat_clash: Option<bool>,
    /// The entry already in the table that the packet's entry clashed with (looked up over
    /// ctnetlink right after the drop), when it was still there.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub lost_to: Option<crate::ctstats::CtEntry>,
    /// For a clash on the original tuple: whether the winner was NATed to another target
    /// than the loser (e.g. two DNS backends behind one VIP).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub nat_targets_differ: Option<bool>,
    pub explanation: String,
}

/// Sources that see an insert failure where it happens (`__nf_conntrack_confirm` returned
/// NF_DROP).
pub const PRECISE_CONFIRM_SOURCES: [&str; 2] = [
    "fexit/__nf_conntrack_confirm",
    "kretprobe/__nf_conntrack_confirm",
];

/// Removes `t` from `v`; whether it was there.
fn take(v: &mut Vec<FiveTuple>, t: &FiveTuple) -> bool {
    match v.iter().position(|x| x == t) {
        Some(i) => {
            v.remove(i);
            true
        }
        None => false,
    }
}

/// Where a drop happened, from the symbolized location.
pub fn is_rule_engine(location_sym: &str) -> bool {
    let func = location_sym.split('+').next().unwrap_or("");
    func.starts_with("nft_")
        || func.starts_with("ipt_do_table")
        || func.starts_with("ip6t_do_table")
        || func.starts_with("ebt_do_table")
        || func.starts_with("arpt_do_table")
}

/// Counter state of one netns: the last reading, and what the findings so far accounted for.
#[derive(Debug, Default, Clone, PartialEq, Serialize, Deserialize)]
struct Books {
    baseline: CpuStats,
    /// The latest reading (drops and polls).
    last: CpuStats,
    /// The reading the counter-only verdicts were last taken from.
    polled: CpuStats,
    /// Rule drops of packets without a conntrack entry (INVALID ones among them) since the
    /// last poll.
    rule_drops_untracked: u64,
    /// Resolved clashes seen per packet (precise sources) since the last poll.
    clashes_named_since_poll: u64,
    /// `clash_resolve` rises not named yet: with a per-packet clash source, a rise read
    /// before its packet's event was (the counter moves inside `nf_ct_resolve_clash`, the
    /// event leaves at its return) waits one poll for the event.
    #[serde(default)]
    clashes_waiting: u64,
    /// Original tuples of insert failures reported by a precise source, awaiting the
    /// `kfree_skb` event of the same packet (which is then not reported twice).
    precise_drops: Vec<FiveTuple>,
    named_insert_failed: u64,
    named_table_full: u64,
}

impl Books {
    fn delta(&self) -> CpuStats {
        self.last.delta(&self.baseline)
    }
}

/// Turns drop events and counter readings into findings. Counter readings come from the
/// caller (ctnetlink in production, synthetic in tests).
#[derive(Debug, Default, Clone, PartialEq, Serialize, Deserialize)]
pub struct Classifier {
    #[serde(with = "as_pairs")]
    books: BTreeMap<u32, Books>,
    /// A source sees resolved clashes per packet (fexit or kretprobe `nf_ct_resolve_clash`).
    #[serde(default)]
    clashes_per_packet: bool,
}

/// A map as a list of `[key, value]` pairs: a trace line is an internally tagged enum, and
/// serde reads number-like map keys back only as strings there.
mod as_pairs {
    use std::collections::BTreeMap;

    use serde::{Deserialize, Deserializer, Serialize, Serializer};

    pub fn serialize<K: Serialize, V: Serialize, S: Serializer>(
        m: &BTreeMap<K, V>,
        s: S,
    ) -> Result<S::Ok, S::Error> {
        s.collect_seq(m.iter())
    }

    pub fn deserialize<'de, K, V, D>(d: D) -> Result<BTreeMap<K, V>, D::Error>
    where
        K: Deserialize<'de> + Ord,
        V: Deserialize<'de>,
        D: Deserializer<'de>,
    {
        Ok(Vec::<(K, V)>::deserialize(d)?.into_iter().collect())
    }
}

impl Classifier {
    pub fn new() -> Self {
        Self::default()
    }

    /// Starts the books of a netns at `stats` (nothing before this counts, also for the
    /// counter-only verdicts of the next poll).
    pub fn baseline(&mut self, netns: u32, stats: &CpuStats) {
        self.books.insert(
            netns,
            Books {
                baseline: stats.clone(),
                last: stats.clone(),
                polled: stats.clone(),
                ..Books::default()
            },
        );
    }

    /// Forgets a namespace whose inode was reused by a new one: the new namespace's books
    /// start at zero (it was created after the tracer started).
    pub fn forget(&mut self, netns: u32) {
        self.books.remove(&netns);
    }

    pub fn knows(&self, netns: u32) -> bool {
        self.books.contains_key(&netns)
    }

    /// The namespaces whose books are open.
    pub fn netns(&self) -> Vec<u32> {
        self.books.keys().copied().collect()
    }

    /// Whether the books of `netns` hold nothing a verdict is made of: none of the counters
    /// the verdicts are checked against moved since its baseline (traffic alone moves
    /// `insert` and `found`), and nothing waits to be named. Forgetting them loses no
    /// finding.
    pub fn idle(&self, netns: u32) -> bool {
        self.books.get(&netns).is_some_and(|b| {
            let d = b.delta();
            d.invalid == 0
                && d.insert_failed == 0
                && d.drop == 0
                && d.early_drop == 0
                && d.clash_resolve == 0
                && b.rule_drops_untracked == 0
                && b.clashes_named_since_poll == 0
                && b.clashes_waiting == 0
                && b.precise_drops.is_empty()
                && b.named_insert_failed == 0
                && b.named_table_full == 0
        })
    }

    /// Classifies one drop. `stats` is a reading of the drop's netns taken after the drop
    /// (the counters move before the packet is freed); `None` when it could not be read.
    pub fn drop_event(
        &mut self,
        ev: &NfDropEvent,
        location_sym: &str,
        stats: Option<&CpuStats>,
    ) -> Option<Finding> {
        // A netns without a baseline was created after the tracer took its baselines
        // (`baseline` for every netns at start), so its counters started at zero.
        let books = self.books.entry(ev.netns).or_default();
        if let Some(s) = stats {
            books.last = s.clone();
        }
        let d = books.delta();
        let mut f = Finding {
            verdict: Verdict::Unexplained,
            netns: ev.netns,
            ts_ns: ev.ts_ns,
            count: 1,
            source: ev.source,
            packet: ev.packet,
            conntrack: ev.conntrack.clone(),
            nat_clash: None,
            lost_to: None,
            nat_targets_differ: None,
            explanation: String::new(),
        };
        let precise = PRECISE_CONFIRM_SOURCES.contains(&ev.source);
        if precise {
            if let Some(ct) = &ev.conntrack {
                if books.precise_drops.len() >= 256 {
                    books.precise_drops.remove(0);
                }
                books.precise_drops.push(ct.orig);
            }
        }
        if is_rule_engine(location_sym) && !precise {
            if ev.conntrack.is_none() {
                books.rule_drops_untracked += 1;
            }
            f.verdict = Verdict::RulesetDrop;
            f.explanation =
                format!("dropped by a ruleset verdict at {location_sym}, not by conntrack");
            return Some(f);
        }
        match &ev.conntrack {
            // The same packet's insert failure was already reported by a precise source.
            Some(ct) if !ct.confirmed && !precise && take(&mut books.precise_drops, &ct.orig) => {
                return None;
            }
            Some(ct) if !ct.confirmed => {
                // A precise source saw the insert fail where it happened; the fallback needs
                // the counter to have moved.
                if precise || (d.insert_failed as u64) > books.named_insert_failed {
                    books.named_insert_failed += 1;
                    let snat = ct.status & IPS_SRC_NAT != 0 && ct.status & IPS_DST_NAT == 0;
                    if snat {
                        f.verdict = Verdict::SnatPortClash;
                        f.explanation = format!(
                            "insert failed: the source NAT gave {} -> {} the port {} that another flow already holds \
                             (insert_failed rose); the packet was dropped",
                            ct.orig.src, ct.orig.dst, ct.reply.dst.port()
                        );
                    } else {
                        f.verdict = Verdict::InsertClashDropped;
                        f.explanation = format!(
                            "lost the conntrack insert race: another packet of {} -> {} inserted its entry first \
                             (insert_failed rose); the packet was dropped",
                            ct.orig.src, ct.orig.dst
                        );
                    }
                } else {
                    f.explanation = format!(
                        "dropped at {location_sym} with an unconfirmed entry, but insert_failed did not move: \
                         not an insert failure (a legacy iptables rule?)"
                    );
                }
            }
            Some(_) => {
                f.explanation = format!(
                    "dropped at {location_sym} with a confirmed entry: not a conntrack insert"
                );
            }
            None => {
                let unexplained_drops = (d.drop as u64).saturating_sub(d.insert_failed as u64);
                if unexplained_drops > books.named_table_full {
                    books.named_table_full += 1;
                    f.verdict = Verdict::TableFull;
                    f.explanation =
                        "no conntrack entry could be allocated: the table is full (drop rose)"
                            .into();
                } else {
                    f.explanation = format!("dropped at {location_sym} before conntrack attached an entry, and drop did not move");
                }
            }
        }
        Some(f)
    }

    /// A clash seen per packet by a precise source (`nf_ct_resolve_clash` returned): resolved
    /// (`NF_ACCEPT`) is a finding of its own; unresolved is reported by the insert failure
    /// that follows it.
    pub fn clash_event(&mut self, ev: &NfDropEvent) -> Option<Finding> {
        const NF_ACCEPT: i32 = 1;
        if ev.verdict != NF_ACCEPT {
            return None;
        }
        let books = self.books.entry(ev.netns).or_default();
        books.clashes_named_since_poll += 1;
        let nat_clash = ev.conntrack.as_ref().map(Self::nat_clash);
        let how = match nat_clash {
            Some(true) => "the loser was inserted reply-only (IPS_NAT_CLASH, 1 s timeout)",
            Some(false) => "the loser was merged into the winner's entry",
            None => "",
        };
        let winner = ev
            .clash_winner
            .as_ref()
            .map(|w| format!(" with {} -> {}", w.src, w.dst))
            .unwrap_or_default();
        Some(Finding {
            verdict: Verdict::InsertClashResolved,
            netns: ev.netns,
            ts_ns: ev.ts_ns,
            count: 1,
            source: ev.source,
            packet: ev.packet,
            conntrack: ev.conntrack.clone(),
            nat_clash,
            lost_to: None,
            nat_targets_differ: None,
            explanation: format!("insert race{winner} resolved by the kernel: {how}; nothing lost"),
        })
    }

    /// The probe plan has a source that reports resolved clashes per packet: a
    /// `clash_resolve` rise is then named by the counter only if its packet's event has not
    /// come by the next poll (or the last reading).
    pub fn expect_clashes_per_packet(&mut self, yes: bool) {
        self.clashes_per_packet = yes;
    }

    /// A new counter reading for `netns`: findings for what moved without dropping a packet
    /// (resolved clashes, early drops, INVALID packets). `last`: the run's last reading
    /// (nothing waits any more).
    pub fn counters(
        &mut self,
        netns: u32,
        ts_ns: u64,
        stats: &CpuStats,
        last: bool,
    ) -> Vec<Finding> {
        let per_packet = self.clashes_per_packet;
        let books = self.books.entry(netns).or_default();
        // Measured from the previous poll, not from the latest reading: a drop's reading
        // must not hide what moved in between.
        let moved = stats.delta(&books.polled);
        books.polled = stats.clone();
        books.last = stats.clone();
        // INVALID packets carry no entry; rule drops of untracked packets in the same
        // interval are (at most) the INVALID ones a rule dropped.
        let invalid_dropped = books.rule_drops_untracked.min(u64::from(moved.invalid));
        books.rule_drops_untracked = 0;
        // Resolved clashes a precise source already named one by one; with such a source,
        // a rise first seen now may still have its event on the way (the next poll names
        // it if not).
        let unnamed = (books.clashes_waiting + u64::from(moved.clash_resolve))
            .saturating_sub(books.clashes_named_since_poll);
        books.clashes_named_since_poll = 0;
        let resolved_unnamed = if per_packet && !last {
            unnamed.min(books.clashes_waiting)
        } else {
            unnamed
        };
        books.clashes_waiting = unnamed - resolved_unnamed;
        let mut out = Vec::new();
        let mut push = |verdict: Verdict, n: u32, explanation: String| {
            if n > 0 {
                out.push(Finding {
                    verdict,
                    netns,
                    ts_ns,
                    count: u64::from(n),
                    source: "conntrack statistics",
                    packet: None,
                    conntrack: None,
                    nat_clash: None,
                    lost_to: None,
                    nat_targets_differ: None,
                    explanation,
                });
            }
        };
        push(
            Verdict::InsertClashResolved,
            resolved_unnamed as u32,
            format!(
                "{resolved_unnamed} insert race(s) resolved by the kernel (clash_resolve rose); nothing lost"
            ),
        );
        push(
            Verdict::EarlyDrop,
            moved.early_drop,
            format!(
                "{} entr(y/ies) evicted to make room for new flows (early_drop rose)",
                moved.early_drop
            ),
        );
        let passed = u64::from(moved.invalid) - invalid_dropped;
        push(
            Verdict::Invalid,
            moved.invalid,
            format!(
                "{} packet(s) marked INVALID by conntrack (invalid rose): {} dropped by a rule, {} passed on \
                 un-NATed (an out-of-window TCP segment then draws a RST from the peer: \
                 nf_conntrack_tcp_be_liberal=1 or a `ct state invalid drop` rule prevents it)",
                moved.invalid, invalid_dropped, passed
            ),
        );
        out
    }

    /// The latest raw counter reading of every netns with open books.
    pub fn readings(&self) -> BTreeMap<u32, CpuStats> {
        self.books
            .iter()
            .map(|(k, b)| (*k, b.last.clone()))
            .collect()
    }

    /// Counter deltas of every netns since its baseline.
    pub fn deltas(&self) -> BTreeMap<u32, CpuStats> {
        self.books.iter().map(|(k, b)| (*k, b.delta())).collect()
    }

    /// Whether a packet-level finding saw the NAT_CLASH bit (reply-only insertion).
    pub fn nat_clash(ct: &Conntrack) -> bool {
        ct.status & IPS_NAT_CLASH != 0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tuple(s: &str, d: &str) -> FiveTuple {
        FiveTuple {
            proto: 17,
            src: s.parse().unwrap(),
            dst: d.parse().unwrap(),
        }
    }

    fn drop_ev(ct: Option<Conntrack>) -> NfDropEvent {
        NfDropEvent {
            ts_ns: 1,
            source: "tp_btf/kfree_skb",
            netns: 7,
            ifindex: 0,
            location: 0,
            reason: 12,
            verdict: 0,
            packet: Some(tuple("10.0.0.2:1000", "10.0.1.1:80")),
            conntrack: ct,
            clash_winner: None,
            payload_len: 0,
            payload: vec![],
        }
    }

    fn ct(status: u64, confirmed: bool) -> Conntrack {
        Conntrack {
            status,
            confirmed,
            orig: tuple("10.0.0.2:1000", "10.0.1.1:80"),
            reply: tuple("10.0.1.1:80", "10.0.2.1:1000"),
        }
    }

    fn dropf(c: &mut Classifier, ev: &NfDropEvent, sym: &str, s: Option<&CpuStats>) -> Finding {
        c.drop_event(ev, sym, s).expect("a finding")
    }

    #[test]
    fn precise_insert_failures_are_reported_once() {
        let mut c = Classifier::new();
        c.baseline(7, &stats(0, 0));
        let mut precise = drop_ev(Some(ct(IPS_SRC_NAT, false)));
        precise.source = "kretprobe/__nf_conntrack_confirm";
        let f = dropf(&mut c, &precise, "0x0", Some(&stats(1, 1)));
        assert_eq!(f.verdict, Verdict::SnatPortClash);
        // The kfree_skb event of the same packet adds nothing.
        assert!(c
            .drop_event(
                &drop_ev(Some(ct(IPS_SRC_NAT, false))),
                "nf_hook_slow+0x7d",
                Some(&stats(1, 1))
            )
            .is_none());
    }

    #[test]
    fn resolved_clashes_seen_per_packet_are_not_counted_again_by_the_poll() {
        let mut c = Classifier::new();
        c.baseline(7, &CpuStats::default());
        let mut ev = drop_ev(Some(ct(IPS_DST_NAT | IPS_NAT_CLASH, false)));
        ev.source = "kretprobe/nf_ct_resolve_clash";
        ev.verdict = 1;
        let f = c.clash_event(&ev).unwrap();
        assert_eq!(
            (f.verdict, f.nat_clash),
            (Verdict::InsertClashResolved, Some(true))
        );
        ev.verdict = 0;
        assert!(
            c.clash_event(&ev).is_none(),
            "unresolved: the insert failure reports it"
        );
        let polled = c.counters(
            7,
            9,
            &CpuStats {
                clash_resolve: 3,
                ..CpuStats::default()
            },
            false,
        );
        assert_eq!(polled.len(), 1);
        assert_eq!(polled[0].count, 2, "3 resolved, 1 already named");
    }

    #[test]
    fn with_a_per_packet_clash_source_a_rise_read_before_its_event_is_not_named_twice() {
        let mut c = Classifier::new();
        c.expect_clashes_per_packet(true);
        c.baseline(7, &CpuStats::default());
        let resolved = |n| CpuStats {
            clash_resolve: n,
            ..CpuStats::default()
        };
        let mut ev = drop_ev(Some(ct(IPS_DST_NAT, false)));
        ev.source = "fexit/nf_ct_resolve_clash";
        ev.verdict = 1;
        // The counter moves inside nf_ct_resolve_clash, the event leaves at its return: a
        // poll can read the rise before the ring buffer gives the event.
        assert!(c.counters(7, 10, &resolved(1), false).is_empty(), "waits");
        assert!(c.clash_event(&ev).is_some());
        assert!(
            c.counters(7, 20, &resolved(1), false).is_empty(),
            "named once"
        );
        // A rise whose event does not come by the next poll is named by the counter.
        assert!(c.counters(7, 30, &resolved(2), false).is_empty());
        let f = c.counters(7, 40, &resolved(2), false);
        let got: Vec<(Verdict, u64)> = f.iter().map(|f| (f.verdict, f.count)).collect();
        assert_eq!(got, [(Verdict::InsertClashResolved, 1)]);
        // The run's last reading names what still waits.
        let f = c.counters(7, 50, &resolved(4), true);
        assert_eq!(f.iter().map(|f| f.count).sum::<u64>(), 2);
        // Without a per-packet source nothing waits.
        let mut c = Classifier::new();
        c.baseline(7, &CpuStats::default());
        assert_eq!(c.counters(7, 10, &resolved(1), false).len(), 1);
    }

    fn stats(insert_failed: u32, drop: u32) -> CpuStats {
        CpuStats {
            insert_failed,
            drop,
            ..CpuStats::default()
        }
    }

    #[test]
    fn rule_drops_are_never_conntrack_verdicts() {
        let mut c = Classifier::new();
        c.baseline(7, &stats(0, 0));
        let f = dropf(
            &mut c,
            &drop_ev(Some(ct(0, false))),
            "nft_do_chain+0x3e8",
            Some(&stats(1, 1)),
        );
        assert_eq!(f.verdict, Verdict::RulesetDrop);
        // The counter that moved is still available for a real insert failure.
        let f = dropf(
            &mut c,
            &drop_ev(Some(ct(IPS_SRC_NAT, false))),
            "nf_hook_slow+0x7d",
            Some(&stats(1, 1)),
        );
        assert_eq!(f.verdict, Verdict::SnatPortClash);
    }

    #[test]
    fn insert_failures_are_bounded_by_the_counter() {
        let mut c = Classifier::new();
        c.baseline(7, &stats(0, 0));
        let ev = drop_ev(Some(ct(IPS_DST_NAT, false)));
        assert_eq!(
            dropf(&mut c, &ev, "nf_hook_slow+0x7d", Some(&stats(1, 1))).verdict,
            Verdict::InsertClashDropped
        );
        // A second drop while insert_failed still says 1: not an insert failure.
        assert_eq!(
            dropf(&mut c, &ev, "nf_hook_slow+0x7d", Some(&stats(1, 1))).verdict,
            Verdict::Unexplained
        );
        assert_eq!(
            dropf(&mut c, &ev, "nf_hook_slow+0x7d", Some(&stats(2, 2))).verdict,
            Verdict::InsertClashDropped
        );
    }

    #[test]
    fn drops_without_an_entry_are_table_full_only_when_drop_moved_beyond_insert_failures() {
        let mut c = Classifier::new();
        c.baseline(7, &stats(0, 0));
        let ev = drop_ev(None);
        assert_eq!(
            dropf(&mut c, &ev, "nf_hook_slow+0x7d", Some(&stats(1, 1))).verdict,
            Verdict::Unexplained
        );
        assert_eq!(
            dropf(&mut c, &ev, "nf_hook_slow+0x7d", Some(&stats(1, 2))).verdict,
            Verdict::TableFull
        );
    }

    #[test]
    fn a_netns_born_after_the_baselines_counts_from_zero() {
        let mut c = Classifier::new();
        let f = dropf(
            &mut c,
            &drop_ev(Some(ct(IPS_SRC_NAT, false))),
            "nf_hook_slow+0x7d",
            Some(&stats(1, 1)),
        );
        assert_eq!(f.verdict, Verdict::SnatPortClash);
    }

    #[test]
    fn counter_only_verdicts_carry_the_delta() {
        let mut c = Classifier::new();
        c.baseline(9, &CpuStats::default());
        let s = CpuStats {
            clash_resolve: 3,
            early_drop: 5,
            ..CpuStats::default()
        };
        let f = c.counters(9, 100, &s, false);
        let got: Vec<(Verdict, u64)> = f.iter().map(|f| (f.verdict, f.count)).collect();
        assert_eq!(
            got,
            vec![(Verdict::InsertClashResolved, 3), (Verdict::EarlyDrop, 5)]
        );
        assert!(c.counters(9, 200, &s, false).is_empty(), "nothing moved");
        assert_eq!(c.deltas()[&9].clash_resolve, 3);
    }

    #[test]
    fn what_the_counters_held_before_the_baseline_is_no_finding() {
        let mut c = Classifier::new();
        let history = CpuStats {
            clash_resolve: 4000,
            early_drop: 12,
            invalid: 70,
            ..CpuStats::default()
        };
        c.baseline(3, &history);
        assert!(c.counters(3, 1, &history, false).is_empty());
        let later = CpuStats {
            clash_resolve: 4002,
            ..history.clone()
        };
        let f = c.counters(3, 2, &later, true);
        let got: Vec<(Verdict, u64)> = f.iter().map(|f| (f.verdict, f.count)).collect();
        assert_eq!(got, [(Verdict::InsertClashResolved, 2)]);
    }

    #[test]
    fn a_drop_reading_does_not_swallow_counter_only_movement() {
        let mut c = Classifier::new();
        c.baseline(7, &CpuStats::default());
        let with_invalid = CpuStats {
            invalid: 2,
            ..CpuStats::default()
        };
        let f = dropf(
            &mut c,
            &drop_ev(None),
            "nft_do_chain+0x10",
            Some(&with_invalid),
        );
        assert_eq!(f.verdict, Verdict::RulesetDrop);
        let f = c.counters(7, 5, &with_invalid, false);
        assert_eq!(f.len(), 1);
        assert_eq!((f[0].verdict, f[0].count), (Verdict::Invalid, 2));
    }

    #[test]
    fn invalid_findings_say_how_many_a_rule_dropped() {
        let mut c = Classifier::new();
        c.baseline(7, &CpuStats::default());
        let s = CpuStats {
            invalid: 3,
            ..CpuStats::default()
        };
        let _ = dropf(&mut c, &drop_ev(None), "nft_do_chain+0x10", Some(&s));
        let f = c.counters(7, 5, &s, false);
        assert!(
            f[0].explanation
                .contains("1 dropped by a rule, 2 passed on"),
            "{}",
            f[0].explanation
        );
    }

    #[test]
    fn rule_engine_locations() {
        assert!(is_rule_engine("nft_do_chain+0x3e8"));
        assert!(is_rule_engine("ipt_do_table+0x10"));
        assert!(!is_rule_engine("nf_hook_slow+0x7d"));
        assert!(!is_rule_engine("0xffffffff81000000"));
    }
}

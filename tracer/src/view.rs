//! What `tracer watch` shows: filters by namespace, pod, name and verdict, and the summary
//! of lookups on exit.

use std::{
    collections::BTreeMap,
    fmt::Write as _,
    io::{self, Write},
};

use serde::Serialize;
use serde_json::Value;

use crate::{
    dns,
    events::Event,
    lookups::{Lookup, Outcome, Stats},
    output::{Printer, Style},
    pods::Workload,
    timeline,
    verdict::{Finding, Verdict},
};

/// A `--verdict` value: a verdict name, or a lookup outcome.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum VerdictFilter {
    Verdict(Verdict),
    Unanswered,
    Retried,
}

impl std::str::FromStr for VerdictFilter {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        if let Some(v) = Verdict::ALL.iter().find(|v| v.name() == s) {
            return Ok(VerdictFilter::Verdict(*v));
        }
        match s {
            "unanswered" => Ok(VerdictFilter::Unanswered),
            "retried" => Ok(VerdictFilter::Retried),
            _ => Err(format!(
                "unknown verdict '{s}': expected one of {}, unanswered, retried",
                Verdict::ALL.map(|v| v.name()).join(", ")
            )),
        }
    }
}

#[derive(Debug, Clone, Default)]
pub struct Filter {
    /// Kubernetes namespace of the pod.
    pub namespace: Option<String>,
    /// Pod name, `namespace/name` or UID prefix.
    pub pod: Option<String>,
    /// A DNS name, or a suffix of one (`.svc.cluster.local`); case-insensitive.
    pub qname: Option<String>,
    pub verdicts: Vec<VerdictFilter>,
}

fn name_matches(pattern: &str, name: &str) -> bool {
    let p = pattern.trim_end_matches('.').to_ascii_lowercase();
    let n = name.trim_end_matches('.').to_ascii_lowercase();
    if let Some(suffix) = p.strip_prefix('.') {
        n.ends_with(&format!(".{suffix}")) || n == suffix
    } else {
        n == p || n.starts_with(&format!("{p}."))
    }
}

impl Filter {
    pub fn is_empty(&self) -> bool {
        self.namespace.is_none()
            && self.pod.is_none()
            && self.qname.is_none()
            && self.verdicts.is_empty()
    }

    fn workload(&self, w: Option<&Workload>) -> bool {
        if let Some(ns) = &self.namespace {
            if w.and_then(|w| w.namespace.as_deref()) != Some(ns.as_str()) {
                return false;
            }
        }
        if let Some(p) = &self.pod {
            if !w.is_some_and(|w| w.matches(p)) {
                return false;
            }
        }
        true
    }

    /// A raw event: its sender, and for DNS its name. Verdict filters hide raw events.
    pub fn event(&self, ev: &Event, w: Option<&Workload>) -> bool {
        if !self.verdicts.is_empty() {
            return false;
        }
        match ev {
            Event::DnsSend(d) | Event::DnsRecv(d) => {
                if !self.workload(w) {
                    return false;
                }
                match &self.qname {
                    None => true,
                    Some(q) => dns::parse(&d.payload, d.payload_len as usize)
                        .ok()
                        .and_then(|m| m.questions.first().map(|x| name_matches(q, &x.name)))
                        .unwrap_or(false),
                }
            }
            // Drops carry no pod of their own; they show when no pod or name is asked for.
            Event::NfDrop(_) | Event::CtClash(_) => {
                self.namespace.is_none() && self.pod.is_none() && self.qname.is_none()
            }
        }
    }

    pub fn finding(&self, f: &Finding, w: Option<&Workload>) -> bool {
        // Findings carry no name: a name filter leaves them to the lookups' timelines.
        if self.qname.is_some() || !self.workload(w) {
            return false;
        }
        self.verdicts.is_empty()
            || self
                .verdicts
                .iter()
                .any(|v| matches!(v, VerdictFilter::Verdict(x) if *x == f.verdict))
    }

    pub fn lookup(&self, l: &Lookup) -> bool {
        if !self.workload(Some(&l.workload)) {
            return false;
        }
        if let Some(q) = &self.qname {
            if !l.queries.iter().any(|x| name_matches(q, &x.qname)) && !name_matches(q, &l.name) {
                return false;
            }
        }
        self.verdicts.is_empty()
            || self.verdicts.iter().any(|v| match v {
                VerdictFilter::Verdict(x) => l.verdicts().contains(x),
                VerdictFilter::Unanswered => {
                    l.outcome == Outcome::Unanswered || l.queries.iter().any(|q| q.unanswered)
                }
                VerdictFilter::Retried => l.retries > 0,
            })
    }
}

#[derive(Debug, Clone, Default)]
pub struct View {
    pub filter: Filter,
    /// Show every raw event in text mode too (JSON always carries them).
    pub events: bool,
    /// Show healthy lookups too (one line each).
    pub all_lookups: bool,
    /// `None`: colour when stdout is a terminal.
    pub colour: Option<bool>,
}

#[derive(Debug, Clone, Default, Serialize)]
pub struct PodTally {
    pub lookups: u64,
    pub problems: u64,
    pub unanswered: u64,
    pub retries: u64,
    pub verdicts: BTreeMap<&'static str, u64>,
    /// The slowest lookup, in seconds.
    pub worst_latency_s: f64,
}

/// Pods are counted one by one up to this many; the rest go to `(other)`.
pub const MAX_PODS: usize = 10_000;

#[derive(Debug, Clone, Default)]
pub struct Summary {
    pub outcomes: BTreeMap<&'static str, u64>,
    pub pods: BTreeMap<String, PodTally>,
}

impl Summary {
    pub fn add(&mut self, l: &Lookup) {
        *self.outcomes.entry(l.outcome.name()).or_default() += 1;
        let mut key = l.workload.label();
        if !self.pods.contains_key(&key) && self.pods.len() >= MAX_PODS {
            key = "(other)".into();
        }
        let t = self.pods.entry(key).or_default();
        t.lookups += 1;
        t.problems += l.problem as u64;
        t.unanswered += l.queries.iter().filter(|q| q.unanswered).count() as u64;
        t.retries += l.retries as u64;
        for q in &l.queries {
            if let Some(f) = &q.fate {
                *t.verdicts.entry(f.verdict.name()).or_default() += 1;
            }
        }
        t.worst_latency_s = t.worst_latency_s.max(l.latency_ns as f64 / 1e9);
    }

    /// The end-of-run table: lookups per pod, worst first.
    pub fn render(&self, stats: &Stats, style: Style) -> String {
        let mut out = String::new();
        let _ = writeln!(
            out,
            "{}: {} lookups ({}), {} with a problem; {} queries, {} answers, {} drops/clashes on DNS flows",
            style.bold("lookups"),
            stats.lookups,
            self.outcomes
                .iter()
                .map(|(k, v)| format!("{k} {v}"))
                .collect::<Vec<_>>()
                .join(", "),
            stats.problems,
            stats.queries,
            stats.answers,
            stats.fates,
        );
        if stats.lost_records > 0 {
            let _ = writeln!(
                out,
                "{}",
                style.yellow(&format!(
                    "{} ring-buffer records lost: {} lookups open meanwhile are `incomplete` \
                     (no verdict drawn from them; see the per-CPU losses below)",
                    stats.lost_records, stats.incomplete
                ))
            );
        }
        if stats.shed.lookups + stats.shed.fates > 0 {
            let _ = writeln!(
                out,
                "{}",
                style.yellow(&format!(
                    "memory bound reached: {} lookups closed early, {} unmatched drops forgotten",
                    stats.shed.lookups, stats.shed.fates
                ))
            );
        }
        let mut pods: Vec<(&String, &PodTally)> = self.pods.iter().collect();
        pods.sort_by(|a, b| {
            b.1.problems
                .cmp(&a.1.problems)
                .then(b.1.worst_latency_s.total_cmp(&a.1.worst_latency_s))
        });
        for (pod, t) in pods.iter().take(20) {
            let verdicts = t
                .verdicts
                .iter()
                .map(|(k, v)| format!("{k} {v}"))
                .collect::<Vec<_>>()
                .join(", ");
            let _ = writeln!(
                out,
                "  {pod}: {} lookups, {} with a problem, {} retries, {} unanswered, worst {:.3} s{}",
                t.lookups,
                t.problems,
                t.retries,
                t.unanswered,
                t.worst_latency_s,
                if verdicts.is_empty() {
                    String::new()
                } else {
                    format!(" [{verdicts}]")
                }
            );
        }
        if pods.len() > 20 {
            let _ = writeln!(out, "  ... and {} more", pods.len() - 20);
        }
        out
    }
}

/// Printing pods, findings with their pod, and lookups.
impl<W: Write> Printer<W> {
    /// An event with the pod or host that sent or received it.
    pub fn event_of(&mut self, ev: &Event, w: Option<&Workload>) -> io::Result<()> {
        if self.json {
            self.write_event_json(ev, w)
        } else {
            let line = self.text(ev);
            match w {
                Some(w) => writeln!(self.out, "{line} [{}]", w.label()),
                None => writeln!(self.out, "{line}"),
            }
        }
    }

    /// A finding with the pod whose query it hit, when known.
    pub fn finding_of(&mut self, f: &Finding, w: Option<&Workload>) -> io::Result<()> {
        self.finding_as(
            f,
            w.map(|w| (w.label(), serde_json::to_value(w).unwrap_or(Value::Null))),
        )
    }

    /// A finished lookup: its timeline (text), or one JSON object.
    pub fn lookup(&mut self, l: &Lookup) -> io::Result<()> {
        if self.json {
            let line = crate::output::LookupLine {
                kind: "lookup",
                lookup: l,
                time: humantime::format_rfc3339_nanos(self.clock.wall(l.start_ns)).to_string(),
            };
            serde_json::to_writer(&mut self.out, &line)?;
            self.out.write_all(b"\n")
        } else if l.problem {
            let text = timeline::render(l, &self.clock, self.style);
            self.out.write_all(text.as_bytes())
        } else {
            writeln!(
                self.out,
                "{} lookup {} {} -> {}: {:.3} s, {}",
                timeline::clock_time(&self.clock, l.start_ns),
                timeline::who(l),
                l.name,
                l.server,
                l.latency_ns as f64 / 1e9,
                timeline::outcome_word(l)
            )
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_match_exactly_by_suffix_or_by_first_labels() {
        assert!(name_matches(
            "web.default.svc.cluster.local",
            "WEB.default.svc.cluster.local."
        ));
        assert!(name_matches(
            ".cluster.local",
            "web.default.svc.cluster.local"
        ));
        assert!(name_matches("web", "web.default.svc.cluster.local"));
        assert!(!name_matches("we", "web.default.svc.cluster.local"));
        assert!(!name_matches(".local", "notlocal"));
    }

    use crate::{
        lookups::{Fate, Query},
        pods::{Workload, WorkloadKind},
    };
    use std::sync::Arc;

    fn pod(ns: &str, name: &str) -> Arc<Workload> {
        Arc::new(Workload {
            kind: WorkloadKind::Pod,
            namespace: Some(ns.into()),
            pod: Some(name.into()),
            uid: Some("1f3a0c2e-0000-4000-8000-000000000001".into()),
            ..Workload::unknown()
        })
    }

    fn lookup(w: Arc<Workload>, name: &str, fate: Option<Verdict>, retries: u32) -> Lookup {
        let q = Query {
            ts_ns: 0,
            qname: name.into(),
            qtype: "AAAA".into(),
            qtype_code: 28,
            id: 1,
            src: "10.0.0.2:4000".parse().unwrap(),
            server: "10.96.0.10:53".parse().unwrap(),
            sock_cookie: 1,
            attempt: 1,
            batch: true,
            fate: fate.map(|verdict| Fate {
                ts_ns: 1,
                verdict,
                netns: 1,
                lost: verdict.lost_packet(),
                attribution: "packet",
                reply: false,
                nat_to: None,
                nat_from: None,
                explanation: String::new(),
            }),
            answer: None,
            unanswered: fate.is_some(),
        };
        Lookup {
            id: 1,
            workload: w,
            netns: 1,
            cgroup_id: 1,
            pid: Some(7),
            comm: Some("getent".into()),
            name: name.into(),
            server: q.server,
            start_ns: 0,
            end_ns: 5_000_000_000,
            latency_ns: 5_000_000_000,
            outcome: Outcome::Answered,
            siblings: None,
            retries,
            queries: vec![q],
            cause: "because".into(),
            problem: true,
            lost_records: 0,
        }
    }

    #[test]
    fn lookups_filter_by_namespace_pod_name_and_verdict() {
        let web = lookup(
            pod("shop", "web-0"),
            "db.shop.svc.cluster.local",
            Some(Verdict::SnatPortClash),
            1,
        );
        let api = lookup(pod("infra", "api-1"), "example.com", None, 0);
        let f = |f: Filter| [&web, &api].map(|l| f.lookup(l));
        assert_eq!(f(Filter::default()), [true, true]);
        assert_eq!(
            f(Filter {
                namespace: Some("shop".into()),
                ..Filter::default()
            }),
            [true, false]
        );
        assert_eq!(
            f(Filter {
                pod: Some("infra/api-1".into()),
                ..Filter::default()
            }),
            [false, true]
        );
        assert_eq!(
            f(Filter {
                qname: Some(".cluster.local".into()),
                ..Filter::default()
            }),
            [true, false]
        );
        let v = |v: &[&str]| Filter {
            verdicts: v.iter().map(|x| x.parse().unwrap()).collect(),
            ..Filter::default()
        };
        assert_eq!(f(v(&["snat-port-clash"])), [true, false]);
        assert_eq!(f(v(&["table-full"])), [false, false]);
        assert_eq!(f(v(&["retried"])), [true, false]);
        assert_eq!(f(v(&["unanswered", "table-full"])), [true, false]);
        // A finding without a pod is hidden by a pod filter, shown without one.
        let fi = Finding {
            verdict: Verdict::TableFull,
            netns: 1,
            ts_ns: 0,
            count: 1,
            source: "test",
            packet: None,
            conntrack: None,
            nat_clash: None,
            lost_to: None,
            nat_targets_differ: None,
            explanation: String::new(),
        };
        assert!(Filter::default().finding(&fi, None));
        assert!(!Filter {
            pod: Some("web-0".into()),
            ..Filter::default()
        }
        .finding(&fi, None));
        assert!(Filter {
            pod: Some("web-0".into()),
            ..Filter::default()
        }
        .finding(&fi, Some(&pod("shop", "web-0"))));
        assert!(!v(&["snat-port-clash"]).finding(&fi, None));
    }

    #[test]
    fn the_summary_ranks_pods_by_problems_and_bounds_their_number() {
        let mut s = Summary::default();
        s.add(&lookup(
            pod("shop", "web-0"),
            "a.example",
            Some(Verdict::SnatPortClash),
            1,
        ));
        let mut ok = lookup(pod("infra", "api-1"), "b.example", None, 0);
        ok.problem = false;
        ok.latency_ns = 1_000_000;
        s.add(&ok);
        let text = s.render(&Stats::default(), Style::default());
        let web = text.find("shop/web-0").unwrap();
        let api = text.find("infra/api-1").unwrap();
        assert!(web < api, "{text}");
        assert!(text.contains("[snat-port-clash 1]"), "{text}");
        for i in 0..MAX_PODS + 5 {
            s.add(&lookup(
                pod("many", &format!("p-{i}")),
                "c.example",
                None,
                0,
            ));
        }
        assert_eq!(s.pods.len(), MAX_PODS + 1, "the rest go to (other)");
        assert!(s.pods["(other)"].lookups >= 5);
    }

    #[test]
    fn verdict_filters_parse_with_a_helpful_error() {
        assert_eq!(
            "snat-port-clash".parse::<VerdictFilter>(),
            Ok(VerdictFilter::Verdict(Verdict::SnatPortClash))
        );
        assert_eq!(
            "unanswered".parse::<VerdictFilter>(),
            Ok(VerdictFilter::Unanswered)
        );
        let e = "lost".parse::<VerdictFilter>().unwrap_err();
        assert!(
            e.contains("insert-clash-dropped") && e.contains("retried"),
            "{e}"
        );
    }
}

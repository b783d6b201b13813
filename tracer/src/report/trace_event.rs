//! The run as Chrome trace-event JSON, for ui.perfetto.dev (or chrome://tracing).
//!
//! Timestamps are µs (the format's unit) from the earliest event of the run, with ns kept as
//! fractions; the wall-clock time of that origin is in `otherData.time_origin`.

use serde_json::{json, Value};

use super::{node_findings, pods_by_label, Page};
use crate::{lookups::Lookup, timeline};

/// Lookups of one pod spread over threads so that complete events on one thread never
/// overlap (the format nests them otherwise): the first lane free at each start.
fn lanes(lookups: &[&Lookup]) -> Vec<usize> {
    let mut ends: Vec<u64> = Vec::new();
    lookups
        .iter()
        .map(|l| {
            let end = l.end_ns.max(l.start_ns + 1);
            match ends.iter().position(|e| *e <= l.start_ns) {
                Some(i) => {
                    ends[i] = end;
                    i
                }
                None => {
                    ends.push(end);
                    ends.len() - 1
                }
            }
        })
        .collect()
}

pub(super) fn render(page: &Page) -> Value {
    let pods = pods_by_label(page.lookups);
    let node = node_findings(page);
    let mut t0 = u64::MAX;
    for l in page.lookups {
        t0 = t0.min(l.start_ns);
        for q in &l.queries {
            t0 = t0.min(q.ts_ns);
            if let Some(f) = &q.fate {
                t0 = t0.min(f.ts_ns);
            }
        }
    }
    for n in &node {
        t0 = t0.min(n.finding.ts_ns);
    }
    if t0 == u64::MAX {
        t0 = 0;
    }
    let us = |ts: u64| (ts as i128 - t0 as i128) as f64 / 1000.0;
    let mut ev: Vec<Value> = Vec::new();
    for (i, p) in pods.iter().enumerate() {
        let pid = i + 1;
        ev.push(json!({"ph": "M", "name": "process_name", "pid": pid, "tid": 0, "args": {"name": p.label}}));
        ev.push(json!({"ph": "M", "name": "process_sort_index", "pid": pid, "tid": 0, "args": {"sort_index": pid}}));
        let lanes = lanes(&p.lookups);
        let n_lanes = lanes.iter().max().map_or(0, |m| m + 1);
        for lane in 0..n_lanes {
            let name = if lane == 0 {
                "lookups".to_string()
            } else {
                format!("lookups (overlapping {})", lane + 1)
            };
            ev.push(json!({"ph": "M", "name": "thread_name", "pid": pid, "tid": lane + 1, "args": {"name": name}}));
        }
        for (l, lane) in p.lookups.iter().zip(lanes) {
            let tid = lane + 1;
            let verdicts: Vec<&str> = l.verdicts().iter().map(|v| v.name()).collect();
            ev.push(json!({
                "ph": "X",
                "cat": if l.problem { "lookup,problem" } else { "lookup" },
                "name": l.name,
                "pid": pid,
                "tid": tid,
                "ts": us(l.start_ns),
                "dur": l.latency_ns.max(1) as f64 / 1000.0,
                "args": {
                    "lookup": l.id,
                    "who": timeline::who(l),
                    "server": l.server.to_string(),
                    "outcome": l.outcome.name(),
                    "latency_ms": l.latency_ns as f64 / 1e6,
                    "cause": l.cause,
                    "problem": l.problem,
                    "retries": l.retries,
                    "siblings": l.siblings.as_ref().map(|s| s.how),
                    "verdicts": verdicts,
                    "start": timeline::clock_time(&page.clock, l.start_ns),
                },
            }));
            for q in &l.queries {
                let label = format!("{} #{}", q.qtype, q.attempt);
                ev.push(json!({
                    "ph": "i", "s": "t", "cat": "query",
                    "name": format!("{label} sent"),
                    "pid": pid, "tid": tid, "ts": us(q.ts_ns),
                    "args": {
                        "qname": q.qname, "qtype": q.qtype, "attempt": q.attempt,
                        "id": format!("{:#06x}", q.id), "src": q.src.to_string(),
                        "server": q.server.to_string(), "sendmmsg": q.batch,
                        "unanswered": q.unanswered,
                    },
                }));
                if let Some(a) = &q.answer {
                    ev.push(json!({
                        "ph": "i", "s": "t", "cat": "answer",
                        "name": format!("{label} {}", a.rcode),
                        "pid": pid, "tid": tid, "ts": us(a.ts_ns),
                        "args": {
                            "rcode": a.rcode, "answers": a.answers, "truncated": a.truncated,
                            "rtt_ms": a.ts_ns.saturating_sub(q.ts_ns) as f64 / 1e6,
                        },
                    }));
                }
                if let Some(f) = &q.fate {
                    ev.push(json!({
                        "ph": "i", "s": "t",
                        "cat": if f.lost { "drop" } else { "clash" },
                        "name": f.verdict.name(),
                        "pid": pid, "tid": tid, "ts": us(f.ts_ns),
                        "args": {
                            "verdict": f.verdict.name(), "query": label, "lost": f.lost,
                            "reply": f.reply, "netns": f.netns, "attribution": f.attribution,
                            "nat_to": f.nat_to.map(|a| a.to_string()),
                            "nat_from": f.nat_from.map(|a| a.to_string()),
                            "explanation": f.explanation,
                        },
                    }));
                }
            }
        }
    }
    if !node.is_empty() {
        let pid = pods.len() + 1;
        ev.push(json!({"ph": "M", "name": "process_name", "pid": pid, "tid": 0, "args": {"name": "node findings"}}));
        ev.push(json!({"ph": "M", "name": "process_sort_index", "pid": pid, "tid": 0, "args": {"sort_index": pid}}));
        ev.push(json!({"ph": "M", "name": "thread_name", "pid": pid, "tid": 1, "args": {"name": "findings"}}));
        for n in &node {
            let f = n.finding;
            ev.push(json!({
                "ph": "i", "s": "t",
                "cat": if f.verdict.lost_packet() { "drop" } else { "counter" },
                "name": if f.count > 1 { format!("{} ×{}", f.verdict.name(), f.count) } else { f.verdict.name().to_string() },
                "pid": pid, "tid": 1, "ts": us(f.ts_ns),
                "args": {
                    "verdict": f.verdict.name(), "count": f.count, "netns": f.netns,
                    "source": f.source,
                    "packet": f.packet.map(|p| format!("{} -> {}", p.src, p.dst)),
                    "pod": n.workload.map(|w| w.label()),
                    "placed_on_lookups": n.placed_on.iter().map(|l| l.id).collect::<Vec<_>>(),
                    "explanation": f.explanation,
                },
            }));
        }
    }
    let mut other = serde_json::Map::new();
    other.insert("title".into(), json!(page.title));
    other.insert(
        "time_origin".into(),
        json!(humantime::format_rfc3339_nanos(page.clock.wall(t0)).to_string()),
    );
    for (k, v) in &page.facts {
        other.insert(k.clone(), json!(v));
    }
    json!({
        "traceEvents": ev,
        "displayTimeUnit": "ns",
        "otherData": other,
    })
}

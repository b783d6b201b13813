//! The per-pod timeline of a lookup, as text: every query, drop or clash, answer and
//! silence in time order, and the one-sentence cause.

use std::fmt::Write as _;

use crate::{
    lookups::{Lookup, Outcome},
    output::{Clock, Style},
};

/// `HH:MM:SS.micros` of a monotonic timestamp.
pub fn clock_time(clock: &Clock, ts_ns: u64) -> String {
    let t = humantime::format_rfc3339_micros(clock.wall(ts_ns)).to_string();
    t.get(11..26).unwrap_or(&t).to_string()
}

fn secs(ns: u64) -> String {
    format!("{:.3} s", ns as f64 / 1e9)
}

/// Who sent the lookup: the pod (or host), and the process.
pub fn who(l: &Lookup) -> String {
    let proc = match (&l.comm, l.pid) {
        (Some(c), Some(p)) => format!(" {c}[{p}]"),
        _ => String::new(),
    };
    format!("{}{proc}", l.workload.label())
}

/// The outcome in a word.
pub fn outcome_word(l: &Lookup) -> &'static str {
    match l.outcome {
        Outcome::Answered => "answered",
        Outcome::Negative => "negative answer",
        Outcome::Error => "error answer",
        Outcome::Unanswered => "unanswered",
        Outcome::Shed => "shed",
        Outcome::Incomplete => "incomplete (records lost)",
    }
}

/// The timeline, several lines, ending with a newline.
pub fn render(l: &Lookup, clock: &Clock, style: Style) -> String {
    let mut rows: Vec<(u64, u8, String)> = Vec::new();
    for q in &l.queries {
        let label = format!("{:<5} #{}", q.qtype, q.attempt);
        let mut how = Vec::new();
        if q.batch {
            how.push("sendmmsg".to_string());
        }
        if q.attempt > 1 {
            let prev = l
                .queries
                .iter()
                .find(|p| p.qname == q.qname && p.qtype == q.qtype && p.attempt + 1 == q.attempt);
            if let Some(p) = prev {
                how.push(style.yellow(&format!(
                    "retry after {}",
                    secs(q.ts_ns - p.ts_ns.min(q.ts_ns))
                )));
            }
        }
        let how = if how.is_empty() {
            String::new()
        } else {
            format!(" ({})", how.join(", "))
        };
        let name = if q.qname != l.name {
            format!(" {}", q.qname)
        } else {
            String::new()
        };
        rows.push((
            q.ts_ns,
            0,
            format!(
                "{label} sent  id {:#06x} {} -> {}{name}{how}",
                q.id, q.src, q.server
            ),
        ));
        if let Some(f) = &q.fate {
            let nat = nat(f);
            let head = if f.lost {
                style.red(&format!("DROPPED {}", f.verdict.name()))
            } else {
                style.yellow(f.verdict.name())
            };
            let whose = if f.reply { " (the answer)" } else { "" };
            let by = if f.attribution == "counter" {
                " [counter]"
            } else {
                ""
            };
            rows.push((
                f.ts_ns,
                1,
                format!(
                    "{label} {head}{whose} in netns {}{nat}: {}{by}",
                    f.netns, f.explanation
                ),
            ));
        }
        match &q.answer {
            Some(a) => {
                let data = if a.answers.is_empty() {
                    String::new()
                } else {
                    format!(" {}", a.answers.join(" "))
                };
                let tc = if a.truncated { " TC" } else { "" };
                let rcode = if a.rcode == "NOERROR" {
                    style.green(&a.rcode)
                } else {
                    style.yellow(&a.rcode)
                };
                rows.push((a.ts_ns, 2, format!("{label} answer {rcode}{tc}{data}")));
            }
            None if q.unanswered => {
                let silent_until = silent_until(l, q);
                rows.push((
                    silent_until.saturating_sub(1),
                    3,
                    style.red(&format!(
                        "{label} no answer ({} of silence)",
                        secs(silent_until.saturating_sub(q.ts_ns))
                    )),
                ));
            }
            None => {}
        }
    }
    rows.sort_by_key(|(ts, order, _)| (*ts, *order));

    let mut out = String::new();
    let sib = match &l.siblings {
        Some(s) => format!(", A/AAAA siblings via {}", s.how),
        None => String::new(),
    };
    let latency = if l.latency_ns >= 1_000_000_000 {
        style.red(&secs(l.latency_ns))
    } else {
        secs(l.latency_ns)
    };
    let _ = writeln!(
        out,
        "{} {} {} {} -> {}: {latency}, {}{sib}",
        style.dim(&clock_time(clock, l.start_ns)),
        style.bold("LOOKUP"),
        who(l),
        l.name,
        l.server,
        outcome_word(l),
    );
    for (ts, _, text) in rows {
        let off = format!("+{:>10.6}", ts.saturating_sub(l.start_ns) as f64 / 1e9);
        let _ = writeln!(out, "  {} {text}", style.dim(&off));
    }
    let _ = writeln!(out, "  => {}", style.bold(&l.cause));
    out
}

/// `, NATed a -> b` / `, DNAT to b` / `, SNAT from a`: what NAT did to a packet with this
/// fate (empty without NAT).
pub(crate) fn nat(f: &crate::lookups::Fate) -> String {
    match (f.nat_from, f.nat_to) {
        (Some(from), Some(to)) => format!(", NATed {from} -> {to}"),
        (None, Some(to)) => format!(", DNAT to {to}"),
        (Some(from), None) => format!(", SNAT from {from}"),
        (None, None) => String::new(),
    }
}

/// When the resolver stopped waiting for `q`: its next attempt, or the end of the lookup.
pub(crate) fn silent_until(l: &Lookup, q: &crate::lookups::Query) -> u64 {
    l.queries
        .iter()
        .find(|r| r.qname == q.qname && r.qtype == q.qtype && r.attempt == q.attempt + 1)
        .map(|r| r.ts_ns)
        .unwrap_or(l.end_ns)
        .max(q.ts_ns)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{
        lookups::{Answer, Fate, Query, Siblings},
        pods::Workload,
        verdict::Verdict,
    };
    use std::sync::Arc;

    #[test]
    fn a_timeline_orders_sends_drops_silence_retries_and_answers() {
        let q = |ts, qtype: &str, attempt, fate, answer: Option<u64>| Query {
            ts_ns: ts,
            qname: "web.example".into(),
            qtype: qtype.into(),
            qtype_code: if qtype == "A" { 1 } else { 28 },
            id: 0x1234,
            src: "10.0.0.2:4000".parse().unwrap(),
            server: "10.96.0.10:53".parse().unwrap(),
            sock_cookie: 1,
            attempt,
            batch: attempt == 1,
            fate,
            answer: answer.map(|ts| Answer {
                ts_ns: ts,
                rcode: "NOERROR".into(),
                answers: vec!["192.0.2.1".into()],
                truncated: false,
            }),
            unanswered: answer.is_none(),
        };
        let drop = Fate {
            ts_ns: 20_000,
            verdict: Verdict::SnatPortClash,
            netns: 9,
            lost: true,
            attribution: "packet",
            reply: false,
            nat_to: None,
            nat_from: Some("192.168.0.1:4000".parse().unwrap()),
            explanation: "insert failed".into(),
        };
        let l = Lookup {
            id: 1,
            workload: Arc::new(Workload::host(Some("getent".into()))),
            netns: 1,
            cgroup_id: 1,
            pid: Some(7),
            comm: Some("getent".into()),
            name: "web.example".into(),
            server: "10.96.0.10:53".parse().unwrap(),
            start_ns: 0,
            end_ns: 5_000_300_000,
            latency_ns: 5_000_300_000,
            outcome: Outcome::Answered,
            siblings: Some(Siblings {
                how: "sendmmsg",
                gap_ns: 10_000,
            }),
            retries: 1,
            queries: vec![
                q(0, "A", 1, None, Some(100_000)),
                q(10_000, "AAAA", 1, Some(drop), None),
                q(5_000_010_000, "AAAA", 2, None, Some(5_000_300_000)),
            ],
            cause: "AAAA lost the SNAT port race".into(),
            problem: true,
            lost_records: 0,
        };
        let text = render(&l, &Clock::fixed(0), Style::default());
        let lines: Vec<&str> = text.lines().collect();
        assert!(lines[0].contains("LOOKUP host:getent getent[7] web.example -> 10.96.0.10:53: 5.000 s, answered, A/AAAA siblings via sendmmsg"), "{text}");
        // "+  0.000010 AAAA  #1 sent ...": the word after the attempt.
        let order: Vec<&str> = lines[1..lines.len() - 1]
            .iter()
            .map(|l| l.split_whitespace().nth(4).unwrap_or(""))
            .collect();
        assert_eq!(
            order,
            ["sent", "sent", "DROPPED", "answer", "no", "sent", "answer"],
            "{text}"
        );
        assert!(text.contains("AAAA  #1 DROPPED snat-port-clash in netns 9, SNAT from 192.168.0.1:4000: insert failed"), "{text}");
        assert!(
            text.contains("AAAA  #1 no answer (5.000 s of silence)"),
            "{text}"
        );
        assert!(text.contains("(retry after 5.000 s)"), "{text}");
        assert!(
            lines
                .last()
                .unwrap()
                .ends_with("=> AAAA lost the SNAT port race"),
            "{text}"
        );
        assert!(!text.contains('\x1b'), "no colour unless asked");
        let coloured = render(&l, &Clock::fixed(0), Style { colour: true });
        assert!(coloured.contains("\x1b[1;31mDROPPED snat-port-clash\x1b[0m"));
    }
}

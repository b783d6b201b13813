//! Conntrack capacity: table size, hash buckets, fill ratio, timeouts and new-flow rate.
//!
//! An entry lives for its protocol's timeout after the last packet, so the table can hold
//! at most `max / timeout` new flows per second in steady state: 512k entries and TCP's
//! 120 s TIME_WAIT sustain 4,369 short connections/s; with UDP's 30 s unreplied timeout a
//! one-shot DNS query costs a quarter of that. Past `max` the kernel drops new flows
//! (after trying to evict an unassured entry), on every kernel.

use std::time::Duration;

use serde::Serialize;

use super::{ids, Finding, Node, Severity};

const DIR: &str = "proc/sys/net/netfilter";

/// Fill ratio above which the finding is a warning.
pub const WARN_FILL: f64 = 0.80;
/// Fill ratio above which it is critical (drops are imminent).
pub const CRIT_FILL: f64 = 0.95;
/// Fraction of the sustainable rate above which the observed growth is a warning.
pub const WARN_RATE: f64 = 0.80;

/// The conntrack sysctls of one network namespace; `None`: absent (nf_conntrack not loaded).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct CtSysctls {
    pub max: Option<u64>,
    pub buckets: Option<u64>,
    pub count: Option<u64>,
    pub udp_timeout: Option<u64>,
    pub udp_timeout_stream: Option<u64>,
    pub tcp_timeout_established: Option<u64>,
    pub tcp_timeout_time_wait: Option<u64>,
    pub tcp_timeout_syn_sent: Option<u64>,
    pub tcp_timeout_close_wait: Option<u64>,
}

impl CtSysctls {
    /// Reads `proc/sys/net/netfilter/nf_conntrack_*` below the node root, in the network
    /// namespace of the calling thread.
    pub fn read(node: &Node) -> CtSysctls {
        let r = |name: &str| node.read_u64(format!("{DIR}/nf_conntrack_{name}"));
        CtSysctls {
            max: r("max"),
            buckets: r("buckets"),
            count: r("count"),
            udp_timeout: r("udp_timeout"),
            udp_timeout_stream: r("udp_timeout_stream"),
            tcp_timeout_established: r("tcp_timeout_established"),
            tcp_timeout_time_wait: r("tcp_timeout_time_wait"),
            tcp_timeout_syn_sent: r("tcp_timeout_syn_sent"),
            tcp_timeout_close_wait: r("tcp_timeout_close_wait"),
        }
    }
}

/// Two samples of the table, `interval` apart.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct CapacityInput {
    pub first: CtSysctls,
    /// The count at the second sample; `None`: one sample only.
    pub second_count: Option<u64>,
    pub interval: Duration,
}

/// New flows per second a table of `max` entries sustains when each lives `timeout_s`.
pub fn sustainable_rate(max: u64, timeout_s: u64) -> f64 {
    if timeout_s == 0 {
        return f64::INFINITY;
    }
    max as f64 / timeout_s as f64
}

/// `4369` → `4,369`.
pub fn thousands(n: u64) -> String {
    let s = n.to_string();
    let mut out = String::new();
    for (i, c) in s.chars().enumerate() {
        if i > 0 && (s.len() - i).is_multiple_of(3) {
            out.push(',');
        }
        out.push(c);
    }
    out
}

/// The capacity finding.
pub fn check(input: &CapacityInput) -> Finding {
    let s = &input.first;
    let (Some(max), Some(count)) = (s.max, s.count) else {
        return Finding::new(
            ids::CAPACITY,
            Severity::Info,
            "Conntrack table not visible (nf_conntrack not loaded, or no conntrack sysctls)",
        )
        .with(format!(
            "{DIR}/nf_conntrack_max: {}, nf_conntrack_count: {}",
            s.max.map_or("absent".into(), |v| v.to_string()),
            s.count.map_or("absent".into(), |v| v.to_string())
        ));
    };
    let fill = if max == 0 {
        1.0
    } else {
        count as f64 / max as f64
    };
    let mut evidence = vec![format!(
        "nf_conntrack_count {} of nf_conntrack_max {} ({:.1}% full)",
        thousands(count),
        thousands(max),
        fill * 100.0
    )];
    if let Some(b) = s.buckets {
        evidence.push(format!(
            "nf_conntrack_buckets {} ({:.1} entries per bucket when full)",
            thousands(b),
            if b == 0 { 0.0 } else { max as f64 / b as f64 }
        ));
    }
    let t = |v: Option<u64>| v.map_or("?".to_string(), |v| format!("{v} s"));
    evidence.push(format!(
        "timeouts: udp {} (unreplied / one-shot DNS), udp_stream {}, tcp established {}, \
         time_wait {}, syn_sent {}, close_wait {}",
        t(s.udp_timeout),
        t(s.udp_timeout_stream),
        t(s.tcp_timeout_established),
        t(s.tcp_timeout_time_wait),
        t(s.tcp_timeout_syn_sent),
        t(s.tcp_timeout_close_wait)
    ));
    // Sustainable new-flow rates for the two common short-lived kinds.
    let mut rates: Vec<(&str, u64, f64)> = Vec::new();
    if let Some(tw) = s.tcp_timeout_time_wait {
        rates.push((
            "short TCP connections (time_wait)",
            tw,
            sustainable_rate(max, tw),
        ));
    }
    if let Some(u) = s.udp_timeout {
        rates.push((
            "one-shot UDP such as DNS (udp_timeout)",
            u,
            sustainable_rate(max, u),
        ));
    }
    for (what, timeout, r) in &rates {
        evidence.push(format!(
            "sustainable new-flow rate for {what}: {} / {timeout} s = {} flows/s",
            thousands(max),
            thousands(r.round() as u64)
        ));
    }
    let limiting = rates
        .iter()
        .map(|(_, _, r)| *r)
        .fold(f64::INFINITY, f64::min);
    let mut rate_warn = false;
    if let Some(c2) = input.second_count {
        let secs = input.interval.as_secs_f64();
        if secs > 0.0 {
            let growth = c2.saturating_sub(count) as f64 / secs;
            evidence.push(format!(
                "observed: count {} -> {} in {:.1} s = {:.0} net new entries/s (growth, a lower \
                 bound of the new-flow rate)",
                thousands(count),
                thousands(c2),
                secs,
                growth
            ));
            if limiting.is_finite() && growth >= WARN_RATE * limiting {
                rate_warn = true;
                evidence.push(format!(
                    "the observed rate is {:.0}% of the sustainable {} flows/s",
                    growth / limiting * 100.0,
                    thousands(limiting.round() as u64)
                ));
            }
        }
    }
    let (severity, title) = if fill >= CRIT_FILL {
        (
            Severity::Critical,
            format!(
                "Conntrack table {:.0}% full: new flows are about to be dropped",
                fill * 100.0
            ),
        )
    } else if fill >= WARN_FILL {
        (
            Severity::Warn,
            format!("Conntrack table {:.0}% full", fill * 100.0),
        )
    } else if rate_warn {
        (
            Severity::Warn,
            "New conntrack entries arrive near the rate the table can sustain".to_string(),
        )
    } else {
        (
            Severity::Ok,
            format!(
                "Conntrack table {:.1}% full; sustains about {} short-lived flows/s",
                fill * 100.0,
                if limiting.is_finite() {
                    thousands(limiting.round() as u64)
                } else {
                    "?".into()
                }
            ),
        )
    };
    let mut f = Finding::new(ids::CAPACITY, severity, title);
    f.evidence = evidence;
    if severity >= Severity::Warn {
        f = f.fix(
            "raise net.netfilter.nf_conntrack_max (and nf_conntrack_buckets, the module's \
             hashsize, to max/4 or more), shorten nf_conntrack_tcp_timeout_time_wait / \
             nf_conntrack_udp_timeout, or keep DNS out of conntrack (NodeLocal DNSCache with \
             NOTRACK)",
        );
    }
    f
}

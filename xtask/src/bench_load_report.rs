//! The rows of `cargo xtask bench-load`: the load's truth (from `tracer load-gen bench`)
//! beside what `tracer watch` reported and what it cost, as a table and as JSON.

use std::{collections::BTreeMap, fmt::Write as _};

use serde_json::{json, Value};

/// What one attached window showed of the tracer.
#[derive(Debug, Default)]
pub(crate) struct WatchStats {
    /// utime + stime over the window, in % of one core.
    pub(crate) cpu_pct: f64,
    /// VmHWM just before SIGINT.
    pub(crate) rss_peak_kib: u64,
    /// Median VmRSS over the second half of the window.
    pub(crate) rss_steady_kib: u64,
    /// SIGINT to exit.
    pub(crate) stop_s: f64,
    /// It did not exit in time and was killed.
    pub(crate) killed: bool,
    /// Its stdout.
    pub(crate) lines: u64,
    pub(crate) bytes: u64,
    /// `{"type":"lookup"}` lines of the bench's names, by outcome.
    pub(crate) lookups: BTreeMap<String, u64>,
    /// Of those, the ones named as a bench pod (`load-bench/load-NNN`).
    pub(crate) named: u64,
    /// The `{"type":"summary"}` line.
    pub(crate) summary: Value,
}

pub(crate) struct Row {
    shape: &'static str,
    rate: u32,
    seconds: u32,
    detached: Value,
    attached: Value,
    watch: WatchStats,
}

fn n(v: &Value) -> u64 {
    v.as_u64().unwrap_or(0)
}

fn f(v: &Value) -> f64 {
    v.as_f64().unwrap_or(0.0)
}

fn mib(kib: u64) -> f64 {
    kib as f64 / 1024.0
}

/// Whether the responder answered every query of a window that reached it, and if not,
/// how many it missed (never read: dropped on the way or at its socket; read but not
/// answered).
fn responder_check(run: &Value) -> String {
    let r = &run["responder"];
    let (sent, received, answered) = (n(&run["sent"]), n(&r["received"]), n(&r["answered"]));
    if received >= sent && answered == received {
        format!("responder answered all {answered}")
    } else {
        format!(
            "RESPONDER MISSED: {} never read (its netns dropped {} at a full socket), {} read but \
             not answered",
            sent.saturating_sub(received),
            n(&r["rcvbuf_errors"]),
            received.saturating_sub(answered)
        )
    }
}

impl Row {
    pub(crate) fn new(
        shape: &'static str,
        rate: u32,
        seconds: u32,
        detached: Value,
        attached: Value,
        watch: WatchStats,
    ) -> Row {
        Row {
            shape,
            rate,
            seconds,
            detached,
            attached,
            watch,
        }
    }

    /// One window's truth in a line.
    pub(crate) fn truth_line(run: &Value) -> String {
        let l = &run["lookups"];
        let mut s = format!(
            "sent {} of {} ({:.0}/s), answered {} ({:.0}/s), unanswered {}, refused {}; {}; \
             lookups answered {} negative {} error {} unanswered {}; latency p50 {} µs p99 {} µs",
            n(&run["sent"]),
            n(&run["planned"]),
            f(&run["sent_qps"]),
            n(&run["answered"]),
            f(&run["answered_qps"]),
            n(&run["unanswered"]),
            n(&run["refused"]),
            responder_check(run),
            n(&l["answered"]),
            n(&l["negative"]),
            n(&l["error"]),
            n(&l["unanswered"]),
            n(&run["latency"]["p50_us"]),
            n(&run["latency"]["p99_us"]),
        );
        if n(&run["unmatched"]) > 0 {
            let _ = write!(s, "; {} replies matched no query", n(&run["unmatched"]));
        }
        if n(&run["rcvbuf_errors"]) > 0 {
            let _ = write!(
                s,
                "; clients' sockets overflowed {} times",
                n(&run["rcvbuf_errors"])
            );
        }
        if n(&run["pods"]) > 0 {
            let _ = write!(
                s,
                "; {} lookups over 100 ms late (worst {:.0} ms), latest pod start {:.0} ms",
                n(&run["late"]),
                f(&run["max_lag_ms"]),
                f(&run["started_late_ms"])
            );
        }
        s
    }

    fn by_kind(&self, kind: &str) -> u64 {
        n(&self.watch.summary["by_kind"][kind])
    }

    /// Two records per query: the query's `dns_send` and its answer's `dns_recv`.
    fn records_expected(&self) -> u64 {
        n(&self.attached["sent"]) + n(&self.attached["answered"])
    }

    fn records_seen(&self) -> u64 {
        self.by_kind("dns_send") + self.by_kind("dns_recv")
    }

    fn lost(&self) -> u64 {
        n(&self.watch.summary["lost"])
    }

    fn tracer_lookups(&self) -> u64 {
        self.watch.lookups.values().sum()
    }

    fn tracer_answered(&self) -> u64 {
        self.watch.lookups.get("answered").copied().unwrap_or(0)
    }

    /// Achieved answered queries/s, detached and attached, and attached / detached.
    fn qps(&self) -> (f64, f64, f64) {
        let (d, a) = (
            f(&self.detached["answered_qps"]),
            f(&self.attached["answered_qps"]),
        );
        (d, a, if d > 0.0 { a / d } else { 0.0 })
    }

    /// What the tracer reported, in a line.
    pub(crate) fn tracer_line(&self) -> String {
        let w = &self.watch;
        let mut s = format!(
            "tracer: records {} expected, {} seen (dns_send {}, dns_recv {}), lost {} (per CPU {}); \
             lookups of the bench's names {} {:?} (summary, all names: {}); truth {}",
            self.records_expected(),
            self.records_seen(),
            self.by_kind("dns_send"),
            self.by_kind("dns_recv"),
            self.lost(),
            w.summary["lost_per_cpu"],
            self.tracer_lookups(),
            w.lookups,
            w.summary["lookup_outcomes"],
            self.attached["lookups"],
        );
        if self.shape == "pods" {
            let _ = write!(
                s,
                "; named as a bench pod: {} of {}",
                w.named,
                self.tracer_lookups()
            );
        }
        let _ = write!(
            s,
            "; cpu {:.1} %, RSS peak {:.1} MiB, steady {:.1} MiB; stopped {:.2} s after SIGINT{}; \
             stdout {:.1} MiB in {} lines",
            w.cpu_pct,
            mib(w.rss_peak_kib),
            mib(w.rss_steady_kib),
            w.stop_s,
            if w.killed { " (KILLED)" } else { "" },
            mib(w.bytes / 1024),
            w.lines
        );
        s
    }

    pub(crate) fn to_json(&self) -> Value {
        let (d, a, ratio) = self.qps();
        let w = &self.watch;
        json!({
            "type": "bench_load_row",
            "shape": self.shape,
            "rate": self.rate,
            "seconds": self.seconds,
            "sent": self.attached["sent"],
            "answered": self.attached["answered"],
            "records_expected": self.records_expected(),
            "records_seen": self.records_seen(),
            "by_kind": w.summary["by_kind"],
            "lost": self.lost(),
            "lost_per_cpu": w.summary["lost_per_cpu"],
            "lookups_tracer": w.lookups,
            "lookups_named": w.named,
            "lookup_outcomes_summary": w.summary["lookup_outcomes"],
            "lookups_truth": self.attached["lookups"],
            "cpu_pct": w.cpu_pct,
            "rss_peak_kib": w.rss_peak_kib,
            "rss_steady_kib": w.rss_steady_kib,
            "stop_s": w.stop_s,
            "stop_killed": w.killed,
            "stdout_bytes": w.bytes,
            "answered_qps_detached": d,
            "answered_qps_attached": a,
            "ratio": ratio,
            "detached": self.detached,
            "attached": self.attached,
        })
    }
}

/// The table, one row per shape and rate, with a legend.
pub(crate) fn table(rows: &[Row]) -> String {
    let mut s = String::new();
    let _ = writeln!(
        s,
        "{:<11} {:>7} {:>9} {:>9} {:>9} {:>9} {:>8} {:>19} {:>6} {:>8} {:>8} {:>6} {:>9} {:>9} {:>6}",
        "shape",
        "rate/s",
        "sent",
        "answered",
        "rec exp",
        "rec seen",
        "lost",
        "lookups trc/truth",
        "cpu %",
        "RSS pk",
        "RSS st",
        "stop s",
        "qps det",
        "qps att",
        "ratio"
    );
    for r in rows {
        let (d, a, ratio) = r.qps();
        let w = &r.watch;
        let _ = writeln!(
            s,
            "{:<11} {:>7} {:>9} {:>9} {:>9} {:>9} {:>8} {:>19} {:>6.1} {:>8.1} {:>8.1} {:>6.2} {:>9.0} {:>9.0} {:>6.3}",
            r.shape,
            r.rate,
            n(&r.attached["sent"]),
            n(&r.attached["answered"]),
            r.records_expected(),
            r.records_seen(),
            r.lost(),
            format!(
                "{}/{}",
                r.tracer_answered(),
                n(&r.attached["lookups"]["answered"])
            ),
            w.cpu_pct,
            mib(w.rss_peak_kib),
            mib(w.rss_steady_kib),
            w.stop_s,
            d,
            a,
            ratio
        );
    }
    let _ = writeln!(
        s,
        "sent/answered: the generators' count (attached window); rec exp: 2 per query \
         (dns_send + dns_recv of its answer); rec seen/lost: the tracer's summary; lookups \
         trc/truth: answered lookups of the bench's names in the tracer's lookup lines / the \
         generators' (other outcomes in the lines above); cpu: tracer watch, % of one core from \
         the window's start to its report; RSS pk: VmHWM before SIGINT, st: median VmRSS of the \
         second half (MiB); stop: SIGINT to exit; qps: answered queries/s detached and \
         attached; ratio: attached / detached."
    );
    s
}

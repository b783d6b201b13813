//! Prometheus/OpenMetrics export of what the tracer sees: event and finding counters,
//! ring-buffer losses and the conntrack statistics per netns, served over a minimal
//! HTTP/1.1 endpoint (`GET /metrics`).
//!
//! Series are kept low-cardinality on purpose: labels are event kinds, verdict names,
//! netns inodes (bounded by the node's namespaces) and conntrack counter names.
//!
//! ```text
//! tracer_events_total{kind}                 counter  (dns_send, dns_recv, nf_drop, ct_clash)
//! tracer_findings_total{verdict,netns}      counter  (sum of Finding::count)
//! tracer_lost_events_total{cpu}             counter  (ring-buffer losses, per CPU)
//! tracer_conntrack_stat{netns,field}        gauge    (per-netns totals over CPUs)
//! tracer_lookups_total{namespace,pod,outcome}           counter (finished DNS lookups)
//! tracer_lookup_verdicts_total{namespace,pod,verdict}   counter (queries of lookups with a fate)
//! tracer_unanswered_queries_total{namespace,pod}        counter
//! tracer_lookup_latency_seconds{outcome}                histogram (what the application waited)
//! tracer_retry_delay_seconds                            histogram (first try to the retry)
//! tracer_build_info{version}                info     (always 1)
//! ```

use std::{future::Future, net::SocketAddr, sync::Arc, thread::JoinHandle, time::Duration};

use anyhow::Context as _;
use prometheus_client::{
    encoding::{text, EncodeLabelSet},
    metrics::{counter::Counter, family::Family, gauge::Gauge, histogram::Histogram, info::Info},
    registry::{Registry, Unit},
};
use tokio::{
    io::{AsyncReadExt as _, AsyncWriteExt as _},
    net::{TcpListener, TcpStream},
    sync::oneshot,
};

use crate::{
    ctstats::CpuStats,
    events::Event,
    lookups::{Lookup, Outcome as LookupOutcome},
    verdict::Finding,
};

/// The address the CLI binds to unless told otherwise: loopback only.
pub const DEFAULT_ADDR: SocketAddr =
    SocketAddr::new(std::net::IpAddr::V4(std::net::Ipv4Addr::LOCALHOST), 9464);

/// The media type of [`Metrics::encode`]'s output (OpenMetrics text, ends with `# EOF`).
pub const CONTENT_TYPE: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";

/// The conntrack counters exported per netns (names as in [`CpuStats::fields`]).
pub const CONNTRACK_FIELDS: [&str; 6] = [
    "found",
    "invalid",
    "insert_failed",
    "drop",
    "early_drop",
    "clash_resolve",
];

/// Event kind label values, in [`Event`] order.
pub const EVENT_KINDS: [&str; 4] = ["dns_send", "dns_recv", "nf_drop", "ct_clash"];

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct CpuLabels {
    cpu: u32,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct KindLabels {
    kind: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct FindingLabels {
    verdict: &'static str,
    netns: u32,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct StatLabels {
    netns: u32,
    field: &'static str,
}

/// A pod (or `host`), by Kubernetes namespace and name; `pod` is the workload's label when
/// the name is unknown (a UID, `host`).
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct PodLabels {
    namespace: String,
    pod: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct PodOutcomeLabels {
    namespace: String,
    pod: String,
    outcome: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct PodVerdictLabels {
    namespace: String,
    pod: String,
    verdict: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct OutcomeLabels {
    outcome: &'static str,
}

/// Bucket bounds of the latency histograms, in seconds: sub-millisecond answers up to the
/// 5 s / 10 s of resolver timeouts.
const LATENCY_BUCKETS: [f64; 12] = [
    0.001, 0.005, 0.01, 0.05, 0.1, 0.5, 1.0, 2.0, 3.0, 5.5, 10.5, 20.0,
];

fn outcome_label(o: LookupOutcome) -> &'static str {
    o.name()
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct BuildLabels {
    version: &'static str,
}

struct Inner {
    registry: Registry,
    events: Family<KindLabels, Counter>,
    findings: Family<FindingLabels, Counter>,
    lost: Family<CpuLabels, Counter>,
    /// The highest loss count per CPU passed to [`Metrics::set_lost`], so the counters move
    /// by deltas.
    lost_seen: std::sync::Mutex<Vec<u64>>,
    conntrack: Family<StatLabels, Gauge>,
    lookups: Family<PodOutcomeLabels, Counter>,
    lookup_verdicts: Family<PodVerdictLabels, Counter>,
    unanswered: Family<PodLabels, Counter>,
    latency: Family<OutcomeLabels, Histogram>,
    retry_delay: Histogram,
}

/// The tracer's metrics. Cheap to clone (an `Arc`); all methods take `&self` and are
/// safe to call from any thread while the registry is being scraped.
#[derive(Clone)]
pub struct Metrics {
    inner: Arc<Inner>,
}

impl std::fmt::Debug for Metrics {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Metrics").finish_non_exhaustive()
    }
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

fn kind_label(ev: &Event) -> &'static str {
    match ev {
        Event::DnsSend(_) => EVENT_KINDS[0],
        Event::DnsRecv(_) => EVENT_KINDS[1],
        Event::NfDrop(_) => EVENT_KINDS[2],
        Event::CtClash(_) => EVENT_KINDS[3],
    }
}

impl Metrics {
    pub fn new() -> Self {
        let mut registry = Registry::default();
        let events = Family::<KindLabels, Counter>::default();
        let findings = Family::<FindingLabels, Counter>::default();
        let lost = Family::<CpuLabels, Counter>::default();
        let conntrack = Family::<StatLabels, Gauge>::default();
        registry.register(
            "tracer_events",
            "Events decoded from the kernel, by kind",
            events.clone(),
        );
        registry.register(
            "tracer_findings",
            "Occurrences explained, by verdict and netns inode (sum of each finding's count)",
            findings.clone(),
        );
        registry.register(
            "tracer_lost_events",
            "Events the kernel could not submit to the ring buffer, by CPU",
            lost.clone(),
        );
        registry.register(
            "tracer_conntrack_stat",
            "Conntrack statistics of a netns, summed over CPUs (conntrack -S)",
            conntrack.clone(),
        );
        registry.register(
            "tracer_build",
            "Build information of the tracer",
            Info::new(BuildLabels {
                version: env!("CARGO_PKG_VERSION"),
            }),
        );
        let lookups = Family::<PodOutcomeLabels, Counter>::default();
        let lookup_verdicts = Family::<PodVerdictLabels, Counter>::default();
        let unanswered = Family::<PodLabels, Counter>::default();
        let latency = Family::<OutcomeLabels, Histogram>::new_with_constructor(
            (|| Histogram::new(LATENCY_BUCKETS)) as fn() -> Histogram,
        );
        let retry_delay = Histogram::new(LATENCY_BUCKETS);
        registry.register(
            "tracer_lookups",
            "DNS lookups finished, by pod and outcome",
            lookups.clone(),
        );
        registry.register(
            "tracer_lookup_verdicts",
            "Queries of DNS lookups that met a conntrack or firewall fate, by pod and verdict",
            lookup_verdicts.clone(),
        );
        registry.register(
            "tracer_unanswered_queries",
            "DNS queries that got no answer within the resolver's timeout, by pod",
            unanswered.clone(),
        );
        registry.register_with_unit(
            "tracer_lookup_latency",
            "What the application waited for a DNS lookup, by outcome",
            Unit::Seconds,
            latency.clone(),
        );
        registry.register_with_unit(
            "tracer_retry_delay",
            "Time from a DNS query to the resolver's retry of it",
            Unit::Seconds,
            retry_delay.clone(),
        );
        // Every kind is exported from the start, so rates work from the first scrape.
        for kind in EVENT_KINDS {
            let _ = events.get_or_create(&KindLabels { kind });
        }
        Metrics {
            inner: Arc::new(Inner {
                registry,
                events,
                findings,
                lost,
                lost_seen: std::sync::Mutex::new(Vec::new()),
                conntrack,
                lookups,
                lookup_verdicts,
                unanswered,
                latency,
                retry_delay,
            }),
        }
    }

    /// Counts one decoded event by kind.
    pub fn on_event(&self, ev: &Event) {
        self.inner
            .events
            .get_or_create(&KindLabels {
                kind: kind_label(ev),
            })
            .inc();
    }

    /// Adds `finding.count` to its verdict and netns.
    pub fn on_finding(&self, finding: &Finding) {
        self.inner
            .findings
            .get_or_create(&FindingLabels {
                verdict: finding.verdict.name(),
                netns: finding.netns,
            })
            .inc_by(finding.count);
    }

    /// Counts one finished lookup under its pod: outcome, the fates of its queries,
    /// unanswered queries, the latency and each retry's delay.
    pub fn on_lookup(&self, l: &Lookup) {
        let w = &l.workload;
        let namespace = w.namespace.clone().unwrap_or_default();
        let pod = w.pod.clone().unwrap_or_else(|| w.label());
        let outcome = outcome_label(l.outcome);
        self.inner
            .lookups
            .get_or_create(&PodOutcomeLabels {
                namespace: namespace.clone(),
                pod: pod.clone(),
                outcome,
            })
            .inc();
        for q in &l.queries {
            if let Some(f) = &q.fate {
                self.inner
                    .lookup_verdicts
                    .get_or_create(&PodVerdictLabels {
                        namespace: namespace.clone(),
                        pod: pod.clone(),
                        verdict: f.verdict.name(),
                    })
                    .inc();
            }
            if q.attempt > 1 {
                if let Some(prev) = l.queries.iter().find(|p| {
                    p.qname == q.qname && p.qtype == q.qtype && p.attempt + 1 == q.attempt
                }) {
                    self.inner
                        .retry_delay
                        .observe(q.ts_ns.saturating_sub(prev.ts_ns) as f64 / 1e9);
                }
            }
        }
        let unanswered = l.queries.iter().filter(|q| q.unanswered).count() as u64;
        if unanswered > 0 {
            self.inner
                .unanswered
                .get_or_create(&PodLabels { namespace, pod })
                .inc_by(unanswered);
        }
        self.inner
            .latency
            .get_or_create(&OutcomeLabels { outcome })
            .observe(l.latency_ns as f64 / 1e9);
    }

    /// Records the ring-buffer losses per CPU, as read from the kernel (every CPU gets a
    /// series, 0 included). Each counter follows the highest value seen; a lower one (never
    /// expected) is ignored.
    pub fn set_lost(&self, per_cpu: &[u64]) {
        let mut seen = self
            .inner
            .lost_seen
            .lock()
            .unwrap_or_else(|e| e.into_inner());
        if seen.len() < per_cpu.len() {
            seen.resize(per_cpu.len(), 0);
        }
        for (cpu, (&now, prev)) in per_cpu.iter().zip(seen.iter_mut()).enumerate() {
            let c = self
                .inner
                .lost
                .get_or_create(&CpuLabels { cpu: cpu as u32 });
            if now > *prev {
                c.inc_by(now - *prev);
                *prev = now;
            }
        }
    }

    /// Sets the conntrack gauges of `netns` from its counters summed over CPUs
    /// ([`crate::ctstats::CtStats::totals`]).
    pub fn set_conntrack(&self, netns: u32, stats: &CpuStats) {
        for (field, value) in stats.fields() {
            if let Some(field) = CONNTRACK_FIELDS.iter().find(|f| **f == field) {
                self.inner
                    .conntrack
                    .get_or_create(&StatLabels { netns, field })
                    .set(i64::from(value));
            }
        }
    }

    /// The registry in the OpenMetrics text format ([`CONTENT_TYPE`]), ending with `# EOF`.
    pub fn encode(&self) -> String {
        let mut out = String::new();
        text::encode(&mut out, &self.inner.registry).expect("writing to a String cannot fail");
        out
    }
}

/// Largest request head accepted (request line and headers).
const MAX_REQUEST: usize = 8 * 1024;
/// A client gets this long to send its request and read the answer.
const CONN_TIMEOUT: Duration = Duration::from_secs(5);

/// Serves `GET /metrics` on `addr` until `shutdown` completes.
pub async fn serve(
    addr: SocketAddr,
    metrics: Metrics,
    shutdown: impl Future<Output = ()>,
) -> anyhow::Result<()> {
    let listener = TcpListener::bind(addr)
        .await
        .with_context(|| format!("binding the metrics endpoint {addr}"))?;
    serve_listener(listener, metrics, shutdown).await
}

/// As [`serve`], on a listener already bound (e.g. to port 0, to learn the address first).
/// One connection is handled at a time, each bounded in size and time.
pub async fn serve_listener(
    listener: TcpListener,
    metrics: Metrics,
    shutdown: impl Future<Output = ()>,
) -> anyhow::Result<()> {
    tokio::pin!(shutdown);
    loop {
        let stream = tokio::select! {
            _ = &mut shutdown => return Ok(()),
            r = listener.accept() => match r {
                Ok((s, _)) => s,
                Err(e) => {
                    // E.g. EMFILE or a connection reset before accept: not fatal.
                    log::warn!("metrics endpoint: accept: {e}");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            },
        };
        tokio::select! {
            _ = &mut shutdown => return Ok(()),
            r = tokio::time::timeout(CONN_TIMEOUT, handle(stream, &metrics)) => match r {
                Ok(Ok(())) => {}
                Ok(Err(e)) => log::debug!("metrics endpoint: {e}"),
                Err(_) => log::debug!("metrics endpoint: client timed out"),
            },
        }
    }
}

/// What to answer to a request head.
fn route(head: &[u8], metrics: &Metrics) -> (&'static str, &'static str, String, bool) {
    const PLAIN: &str = "text/plain; charset=utf-8";
    let head = match std::str::from_utf8(head) {
        Ok(h) => h,
        Err(_) => return ("400 Bad Request", PLAIN, "bad request\n".into(), true),
    };
    let line = head.split("\r\n").next().unwrap_or_default();
    let mut parts = line.split(' ');
    let (Some(method), Some(target), Some(version), None) =
        (parts.next(), parts.next(), parts.next(), parts.next())
    else {
        return ("400 Bad Request", PLAIN, "bad request\n".into(), true);
    };
    if !version.starts_with("HTTP/1.") {
        return ("400 Bad Request", PLAIN, "bad request\n".into(), true);
    }
    let path = target.split('?').next().unwrap_or_default();
    if path != "/metrics" {
        return ("404 Not Found", PLAIN, "not found\n".into(), true);
    }
    match method {
        "GET" => ("200 OK", CONTENT_TYPE, metrics.encode(), true),
        "HEAD" => ("200 OK", CONTENT_TYPE, metrics.encode(), false),
        _ => (
            "405 Method Not Allowed",
            PLAIN,
            "method not allowed\n".into(),
            true,
        ),
    }
}

async fn handle(mut stream: TcpStream, metrics: &Metrics) -> std::io::Result<()> {
    let mut buf = Vec::with_capacity(1024);
    let mut chunk = [0u8; 1024];
    let head_end = loop {
        if let Some(i) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            break Some(i);
        }
        if buf.len() > MAX_REQUEST {
            break None;
        }
        let n = stream.read(&mut chunk).await?;
        if n == 0 {
            return Ok(()); // closed before a full request
        }
        buf.extend_from_slice(&chunk[..n]);
    };
    let (status, ctype, body, send_body) = match head_end {
        Some(i) => route(&buf[..i], metrics),
        None => (
            "431 Request Header Fields Too Large",
            "text/plain; charset=utf-8",
            "request too large\n".to_string(),
            true,
        ),
    };
    let mut resp = format!(
        "HTTP/1.1 {status}\r\nContent-Type: {ctype}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
        body.len()
    )
    .into_bytes();
    if send_body {
        resp.extend_from_slice(body.as_bytes());
    }
    stream.write_all(&resp).await?;
    stream.shutdown().await
}

/// A metrics endpoint running on its own thread; stops (and joins) when dropped.
#[derive(Debug)]
pub struct ServerHandle {
    addr: SocketAddr,
    stop: Option<oneshot::Sender<()>>,
    thread: Option<JoinHandle<anyhow::Result<()>>>,
}

impl ServerHandle {
    /// The address actually bound (useful after binding port 0).
    pub fn local_addr(&self) -> SocketAddr {
        self.addr
    }

    /// Stops the server and returns how it ended.
    pub fn stop(mut self) -> anyhow::Result<()> {
        self.stop_inner()
    }

    fn stop_inner(&mut self) -> anyhow::Result<()> {
        if let Some(tx) = self.stop.take() {
            let _ = tx.send(());
        }
        match self.thread.take() {
            Some(t) => match t.join() {
                Ok(r) => r,
                Err(_) => anyhow::bail!("the metrics thread panicked"),
            },
            None => Ok(()),
        }
    }
}

impl Drop for ServerHandle {
    fn drop(&mut self) {
        if let Err(e) = self.stop_inner() {
            log::warn!("metrics endpoint: {e:#}");
        }
    }
}

/// Binds `addr` (errors are returned here, not on the thread) and serves `metrics` from a
/// thread with a current-thread tokio runtime, for synchronous callers such as the lab.
pub fn spawn_blocking_server(addr: SocketAddr, metrics: Metrics) -> anyhow::Result<ServerHandle> {
    let std_listener = std::net::TcpListener::bind(addr)
        .with_context(|| format!("binding the metrics endpoint {addr}"))?;
    std_listener.set_nonblocking(true)?;
    let bound = std_listener.local_addr()?;
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_io()
        .enable_time()
        .build()
        .context("starting the metrics runtime")?;
    let (tx, rx) = oneshot::channel::<()>();
    let thread = std::thread::Builder::new()
        .name("metrics-http".into())
        .spawn(move || {
            rt.block_on(async move {
                let listener = TcpListener::from_std(std_listener)?;
                serve_listener(listener, metrics, async {
                    // A dropped sender also means stop.
                    let _ = rx.await;
                })
                .await
            })
        })
        .context("starting the metrics thread")?;
    Ok(ServerHandle {
        addr: bound,
        stop: Some(tx),
        thread: Some(thread),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{
        events::{DnsEvent, FiveTuple, NfDropEvent, TaskInfo},
        verdict::Verdict,
    };

    fn dns() -> DnsEvent {
        let a: SocketAddr = "10.0.0.1:5353".parse().unwrap();
        DnsEvent {
            ts_ns: 1,
            source: "test",
            task: TaskInfo {
                pid: None,
                tid: None,
                comm: None,
                cgroup_id: 0,
                netns: 7,
            },
            sock_cookie: 0,
            tuple: FiveTuple {
                proto: 17,
                src: a,
                dst: a,
            },
            batch: false,
            batch_len: 0,
            payload_len: 0,
            payload: vec![],
        }
    }

    fn drop_ev() -> NfDropEvent {
        NfDropEvent {
            ts_ns: 1,
            source: "test",
            netns: 7,
            ifindex: 0,
            location: 0,
            reason: 0,
            verdict: 0,
            packet: None,
            conntrack: None,
            clash_winner: None,
            payload_len: 0,
            payload: vec![],
        }
    }

    fn finding(verdict: Verdict, netns: u32, count: u64) -> Finding {
        Finding {
            verdict,
            netns,
            ts_ns: 0,
            count,
            source: "test",
            packet: None,
            conntrack: None,
            nat_clash: None,
            lost_to: None,
            nat_targets_differ: None,
            explanation: String::new(),
        }
    }

    fn lines(m: &Metrics) -> Vec<String> {
        m.encode().lines().map(str::to_owned).collect()
    }

    #[test]
    fn fresh_registry() {
        let m = Metrics::new();
        let text = m.encode();
        assert!(text.ends_with("# EOF\n"), "{text}");
        let l = lines(&m);
        for k in EVENT_KINDS {
            assert!(
                l.contains(&format!("tracer_events_total{{kind=\"{k}\"}} 0")),
                "{text}"
            );
        }
        assert!(l.contains(&"# TYPE tracer_events counter".to_string()));
        // prometheus-client leaves out families without series.
        assert!(!text.contains("tracer_findings"), "{text}");
        assert!(!text.contains("tracer_conntrack_stat"), "{text}");
        assert!(l.contains(&"# TYPE tracer_build info".to_string()));
        // Per-CPU loss series appear with the first reading (`watch` makes it at the start).
        assert!(!text.contains("tracer_lost_events_total"), "{text}");
        m.set_lost(&[0, 0]);
        let l = lines(&m);
        assert!(l.contains(&"tracer_lost_events_total{cpu=\"0\"} 0".to_string()));
        assert!(l.contains(&"tracer_lost_events_total{cpu=\"1\"} 0".to_string()));
        assert!(l.contains(&format!(
            "tracer_build_info{{version=\"{}\"}} 1",
            env!("CARGO_PKG_VERSION")
        )));
    }

    #[test]
    fn counts_and_gauges() {
        let m = Metrics::new();
        m.on_event(&Event::DnsSend(dns()));
        m.on_event(&Event::DnsSend(dns()));
        m.on_event(&Event::DnsRecv(dns()));
        m.on_event(&Event::NfDrop(drop_ev()));
        m.on_finding(&finding(Verdict::InsertClashDropped, 7, 1));
        m.on_finding(&finding(Verdict::InsertClashDropped, 7, 1));
        m.on_finding(&finding(Verdict::EarlyDrop, 9, 40));
        m.set_lost(&[3, 0]);
        m.set_lost(&[5, 1]);
        m.set_lost(&[4, 1]); // never goes back
        m.set_conntrack(
            7,
            &CpuStats {
                insert_failed: 2,
                drop: 2,
                found: 11,
                insert: 99,
                ..CpuStats::default()
            },
        );
        m.set_conntrack(
            7,
            &CpuStats {
                insert_failed: 3,
                drop: 2,
                found: 11,
                ..CpuStats::default()
            },
        );
        let l = lines(&m);
        let has = |s: &str| assert!(l.iter().any(|x| x == s), "missing {s}: {l:#?}");
        has("tracer_events_total{kind=\"dns_send\"} 2");
        has("tracer_events_total{kind=\"dns_recv\"} 1");
        has("tracer_events_total{kind=\"nf_drop\"} 1");
        has("tracer_events_total{kind=\"ct_clash\"} 0");
        has("tracer_findings_total{verdict=\"insert-clash-dropped\",netns=\"7\"} 2");
        has("tracer_findings_total{verdict=\"early-drop\",netns=\"9\"} 40");
        has("tracer_lost_events_total{cpu=\"0\"} 5");
        has("tracer_lost_events_total{cpu=\"1\"} 1");
        has("tracer_conntrack_stat{netns=\"7\",field=\"insert_failed\"} 3");
        has("tracer_conntrack_stat{netns=\"7\",field=\"drop\"} 2");
        has("tracer_conntrack_stat{netns=\"7\",field=\"found\"} 11");
        has("tracer_conntrack_stat{netns=\"7\",field=\"early_drop\"} 0");
        // Only the exported fields.
        assert!(!l.iter().any(|x| x.contains("field=\"insert\"")), "{l:#?}");
        assert_eq!(
            l.iter()
                .filter(|x| x.starts_with("tracer_conntrack_stat{"))
                .count(),
            CONNTRACK_FIELDS.len()
        );
    }

    #[test]
    fn routes() {
        let m = Metrics::new();
        assert_eq!(route(b"GET /metrics HTTP/1.1", &m).0, "200 OK");
        assert_eq!(route(b"GET /metrics?x=1 HTTP/1.0", &m).0, "200 OK");
        assert!(!route(b"HEAD /metrics HTTP/1.1", &m).3);
        assert_eq!(route(b"GET / HTTP/1.1", &m).0, "404 Not Found");
        assert_eq!(
            route(b"POST /metrics HTTP/1.1", &m).0,
            "405 Method Not Allowed"
        );
        assert_eq!(route(b"GET /metrics", &m).0, "400 Bad Request");
        assert_eq!(route(b"GET /metrics SPDY/3", &m).0, "400 Bad Request");
        assert_eq!(route(b"\xff\xfe", &m).0, "400 Bad Request");
    }
}

//! The metrics endpoint over real TCP on 127.0.0.1, parsed with a strict OpenMetrics text
//! parser (below). No root needed.
//!
//! prometheus-parse (the only text-format parser crate) targets the classic Prometheus
//! format, is regex based and skips lines it does not understand, and does not know
//! OpenMetrics' `# EOF` or `info` type; a strict parser here is a better check.

mod common;

use std::{
    collections::{BTreeMap, BTreeSet},
    io::{Read as _, Write as _},
    net::{SocketAddr, TcpStream},
    time::{Duration, Instant},
};

use std::sync::Arc;

use tracer::{
    ctstats::CpuStats,
    events::{DnsEvent, Event, FiveTuple, NfDropEvent, TaskInfo},
    lookups::{Fate, Lookup, Outcome as LookupOutcome, Query},
    metrics::{self, Metrics, CONNTRACK_FIELDS, CONTENT_TYPE},
    pods::{Workload, WorkloadKind},
    verdict::{Finding, Verdict},
};

// ---------------------------------------------------------------------------------------
// Strict OpenMetrics text parser (the subset the tracer emits: counter, gauge, info,
// histogram).

type Labels = BTreeMap<String, String>;

#[derive(Debug, Default)]
struct Exposition {
    /// Family name -> (type, help).
    families: BTreeMap<String, (String, Option<String>)>,
    /// (sample name, labels) -> value.
    samples: BTreeMap<(String, Labels), f64>,
}

fn valid_name(s: &str) -> bool {
    let mut c = s.chars();
    matches!(c.next(), Some(ch) if ch.is_ascii_alphabetic() || ch == '_' || ch == ':')
        && c.all(|ch| ch.is_ascii_alphanumeric() || ch == '_' || ch == ':')
}

fn valid_label_name(s: &str) -> bool {
    let mut c = s.chars();
    matches!(c.next(), Some(ch) if ch.is_ascii_alphabetic() || ch == '_')
        && c.all(|ch| ch.is_ascii_alphanumeric() || ch == '_')
}

/// Parses `{a="x",b="y"}` at the start of `s`; returns the labels and the rest.
fn parse_labels(s: &str) -> Result<(Labels, &str), String> {
    let mut labels = Labels::new();
    let mut rest = s.strip_prefix('{').ok_or("expected {")?;
    if let Some(r) = rest.strip_prefix('}') {
        return Ok((labels, r));
    }
    loop {
        let eq = rest.find('=').ok_or("label without =")?;
        let name = &rest[..eq];
        if !valid_label_name(name) {
            return Err(format!("bad label name {name:?}"));
        }
        rest = rest[eq + 1..]
            .strip_prefix('"')
            .ok_or("label value not quoted")?;
        let mut value = String::new();
        let mut chars = rest.char_indices();
        let end = loop {
            match chars.next() {
                None => return Err("unterminated label value".into()),
                Some((i, '"')) => break i,
                Some((_, '\\')) => match chars.next() {
                    Some((_, '\\')) => value.push('\\'),
                    Some((_, '"')) => value.push('"'),
                    Some((_, 'n')) => value.push('\n'),
                    other => return Err(format!("bad escape {other:?}")),
                },
                Some((_, '\n')) => return Err("newline in label value".into()),
                Some((_, c)) => value.push(c),
            }
        };
        if labels.insert(name.to_string(), value).is_some() {
            return Err(format!("duplicate label {name}"));
        }
        rest = &rest[end + 1..];
        if let Some(r) = rest.strip_prefix('}') {
            return Ok((labels, r));
        }
        rest = rest.strip_prefix(',').ok_or("expected , or }")?;
    }
}

fn parse_value(s: &str) -> Result<f64, String> {
    match s {
        "+Inf" => Ok(f64::INFINITY),
        "-Inf" => Ok(f64::NEG_INFINITY),
        "NaN" => Ok(f64::NAN),
        _ => {
            if s.is_empty()
                || !s
                    .chars()
                    .all(|c| c.is_ascii_digit() || matches!(c, '.' | '-' | '+' | 'e' | 'E'))
            {
                return Err(format!("bad value {s:?}"));
            }
            s.parse::<f64>()
                .map_err(|e| format!("bad value {s:?}: {e}"))
        }
    }
}

fn parse(text: &str) -> Result<Exposition, String> {
    let body = text
        .strip_suffix("# EOF\n")
        .ok_or("exposition does not end with `# EOF\\n`")?;
    let mut out = Exposition::default();
    // The family whose metadata/samples we are in; families may not be interleaved.
    let mut current: Option<String> = None;
    let mut closed: BTreeSet<String> = BTreeSet::new();
    let mut enter = |name: &str, current: &mut Option<String>| -> Result<(), String> {
        if current.as_deref() != Some(name) {
            if let Some(prev) = current.take() {
                closed.insert(prev);
            }
            if closed.contains(name) {
                return Err(format!("family {name} interleaved"));
            }
            *current = Some(name.to_string());
        }
        Ok(())
    };
    for (n, line) in body.split_terminator('\n').enumerate() {
        let err = |m: String| format!("line {}: {m}: {line:?}", n + 1);
        if line.is_empty() {
            return Err(err("empty line".into()));
        }
        if let Some(meta) = line.strip_prefix("# ") {
            let mut it = meta.splitn(3, ' ');
            let (kw, name, arg) = (it.next().unwrap(), it.next(), it.next());
            let name = name.ok_or_else(|| err("metadata without name".into()))?;
            if !valid_name(name) {
                return Err(err("bad family name".into()));
            }
            enter(name, &mut current).map_err(err)?;
            match kw {
                "TYPE" => {
                    let t = arg.ok_or_else(|| err("TYPE without type".into()))?;
                    if !["counter", "gauge", "info", "histogram", "unknown"].contains(&t) {
                        return Err(err(format!("unsupported type {t}")));
                    }
                    let fam = out.families.entry(name.to_string()).or_default();
                    if !fam.0.is_empty() {
                        return Err(err("second TYPE".into()));
                    }
                    fam.0 = t.to_string();
                }
                "HELP" => {
                    let fam = out.families.entry(name.to_string()).or_default();
                    if fam.1.is_some() {
                        return Err(err("second HELP".into()));
                    }
                    fam.1 = Some(arg.unwrap_or_default().to_string());
                }
                "UNIT" => {}
                _ => return Err(err(format!("unknown metadata {kw}"))),
            }
            continue;
        }
        if line.starts_with('#') {
            return Err(err("comment not allowed in OpenMetrics".into()));
        }
        // A sample: name[{labels}] value (no timestamps or exemplars expected).
        let name_end = line
            .find(['{', ' '])
            .ok_or_else(|| err("sample without value".into()))?;
        let name = &line[..name_end];
        if !valid_name(name) {
            return Err(err("bad sample name".into()));
        }
        let (labels, rest) = if line[name_end..].starts_with('{') {
            parse_labels(&line[name_end..]).map_err(err)?
        } else {
            (Labels::new(), &line[name_end..])
        };
        let value_str = rest
            .strip_prefix(' ')
            .ok_or_else(|| err("expected one space before the value".into()))?;
        if value_str.contains(' ') {
            return Err(err("unexpected timestamp or exemplar".into()));
        }
        let value = parse_value(value_str).map_err(err)?;
        let family = current
            .clone()
            .ok_or_else(|| err("sample before any TYPE".into()))?;
        let ftype = out
            .families
            .get(&family)
            .map(|f| f.0.clone())
            .filter(|t| !t.is_empty())
            .ok_or_else(|| err("sample before its TYPE".into()))?;
        let suffix = name
            .strip_prefix(family.as_str())
            .ok_or_else(|| err(format!("sample outside family {family}")))?;
        let ok = match ftype.as_str() {
            "counter" => suffix == "_total" && value >= 0.0 && value.fract() == 0.0,
            "gauge" | "unknown" => suffix.is_empty(),
            "info" => suffix == "_info" && value == 1.0,
            "histogram" => match suffix {
                "_bucket" => labels.contains_key("le") && value >= 0.0 && value.fract() == 0.0,
                "_count" => value >= 0.0 && value.fract() == 0.0,
                "_sum" => value.is_finite(),
                _ => false,
            },
            _ => false,
        };
        if !ok {
            return Err(err(format!("invalid sample for {ftype} family {family}")));
        }
        if out
            .samples
            .insert((name.to_string(), labels), value)
            .is_some()
        {
            return Err(err("duplicate series".into()));
        }
    }
    Ok(out)
}

fn labels(pairs: &[(&str, &str)]) -> Labels {
    pairs
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect()
}

/// The buckets of one histogram series: cumulative, ending at `+Inf` = `_count`.
fn check_histogram(e: &Exposition, family: &str, series: &Labels) -> Result<(), String> {
    let mut buckets: Vec<(f64, f64)> = e
        .samples
        .iter()
        .filter(|((n, l), _)| {
            n == &format!("{family}_bucket")
                && l.iter().filter(|(k, _)| *k != "le").eq(series.iter())
        })
        .map(|((_, l), v)| (parse_value(&l["le"]).unwrap(), *v))
        .collect();
    buckets.sort_by(|a, b| a.0.total_cmp(&b.0));
    let count = e
        .samples
        .get(&(format!("{family}_count"), series.clone()))
        .ok_or(format!("{family}: no _count"))?;
    if buckets.last().map(|b| b.0) != Some(f64::INFINITY) {
        return Err(format!("{family}: no +Inf bucket"));
    }
    if buckets.windows(2).any(|w| w[1].1 < w[0].1) {
        return Err(format!("{family}: buckets not cumulative: {buckets:?}"));
    }
    if buckets.last().map(|b| b.1) != Some(*count) {
        return Err(format!("{family}: +Inf bucket != _count"));
    }
    Ok(())
}

/// A lookup of pod shop/web-0 whose first AAAA lost the SNAT race and was retried 1 s later.
fn retried_lookup() -> Lookup {
    let q = |ts: u64, attempt: u32, fate: Option<Fate>| Query {
        ts_ns: ts,
        qname: "db.example".into(),
        qtype: "AAAA".into(),
        qtype_code: 28,
        id: 7,
        src: "10.0.0.2:4000".parse().unwrap(),
        server: "10.96.0.10:53".parse().unwrap(),
        sock_cookie: 1,
        attempt,
        batch: false,
        unanswered: fate.is_some(),
        fate,
        answer: None,
    };
    let lost = Fate {
        ts_ns: 1,
        verdict: Verdict::SnatPortClash,
        netns: 1,
        lost: true,
        attribution: "packet",
        reply: false,
        nat_to: None,
        nat_from: None,
        explanation: String::new(),
    };
    Lookup {
        id: 1,
        workload: Arc::new(Workload {
            kind: WorkloadKind::Pod,
            namespace: Some("shop".into()),
            pod: Some("web-0".into()),
            ..Workload::unknown()
        }),
        netns: 1,
        cgroup_id: 1,
        pid: Some(1),
        comm: Some("app".into()),
        name: "db.example".into(),
        server: "10.96.0.10:53".parse().unwrap(),
        start_ns: 0,
        end_ns: 1_000_300_000,
        latency_ns: 1_000_300_000,
        outcome: LookupOutcome::Answered,
        siblings: None,
        retries: 1,
        queries: vec![q(0, 1, Some(lost)), q(1_000_000_000, 2, None)],
        cause: String::new(),
        problem: true,
        lost_records: 0,
    }
}

#[test]
fn parser_is_strict() {
    let hist = "# TYPE h histogram\nh_bucket{le=\"1.0\"} 1\nh_bucket{le=\"+Inf\"} 2\nh_count 2\nh_sum 3.5\n# EOF\n";
    let e = parse(hist).unwrap();
    check_histogram(&e, "h", &Labels::new()).unwrap();
    assert!(
        parse("# TYPE h histogram\nh_bucket 1\n# EOF\n").is_err(),
        "bucket without le"
    );
    assert!(parse("# TYPE h histogram\nh_total 1\n# EOF\n").is_err());
    let bad =
        "# TYPE h histogram\nh_bucket{le=\"1.0\"} 3\nh_bucket{le=\"+Inf\"} 2\nh_count 2\n# EOF\n";
    assert!(check_histogram(&parse(bad).unwrap(), "h", &Labels::new()).is_err());

    let good = "# HELP a_b x\n# TYPE a_b counter\na_b_total{k=\"v\\\"\"} 3\n# EOF\n";
    let e = parse(good).unwrap();
    assert_eq!(
        e.samples[&("a_b_total".into(), labels(&[("k", "v\"")]))],
        3.0
    );
    for bad in [
        "# TYPE a counter\na_total 1\n",                     // no EOF
        "# TYPE a counter\na_total 1\n# EOF\nx\n",           // after EOF
        "# TYPE a counter\na 1\n# EOF\n",                    // counter without _total
        "# TYPE a gauge\na_total 1\n# EOF\n",                // wrong suffix
        "a 1\n# EOF\n",                                      // no TYPE
        "# TYPE a gauge\na{k=v} 1\n# EOF\n",                 // unquoted
        "# TYPE a gauge\na{k=\"v\",k=\"w\"} 1\n# EOF\n",     // duplicate label
        "# TYPE a gauge\na 1\na 2\n# EOF\n",                 // duplicate series
        "# TYPE a gauge\na  1\n# EOF\n",                     // two spaces
        "# TYPE a gauge\na one\n# EOF\n",                    // bad value
        "# TYPE a gauge\n# TYPE b gauge\nb 1\na 1\n# EOF\n", // interleaved
        "# TYPE a gauge\n\na 1\n# EOF\n",                    // empty line
        "# TYPE a info\na_info 2\n# EOF\n",                  // info must be 1
    ] {
        assert!(parse(bad).is_err(), "accepted {bad:?}");
    }
}

// ---------------------------------------------------------------------------------------
// Synthetic input.

fn sa(s: &str) -> std::net::SocketAddr {
    s.parse().unwrap()
}

fn dns(netns: u32) -> DnsEvent {
    DnsEvent {
        ts_ns: 1,
        source: "test",
        task: TaskInfo {
            pid: Some(1),
            tid: Some(1),
            comm: Some("dig".into()),
            cgroup_id: 0,
            netns,
        },
        sock_cookie: 1,
        tuple: FiveTuple {
            proto: 17,
            src: sa("10.0.0.2:40000"),
            dst: sa("10.96.0.10:53"),
        },
        batch: false,
        batch_len: 0,
        payload_len: 0,
        payload: vec![],
    }
}

fn nf(netns: u32) -> NfDropEvent {
    NfDropEvent {
        ts_ns: 2,
        source: "test",
        netns,
        ifindex: 1,
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
        ts_ns: 3,
        count,
        source: "test",
        packet: None,
        conntrack: None,
        nat_clash: None,
        lost_to: None,
        nat_targets_differ: None,
        explanation: "synthetic".into(),
    }
}

fn stats(seed: u32) -> CpuStats {
    CpuStats {
        cpu: u16::MAX,
        found: seed,
        invalid: seed + 1,
        insert: seed + 2,
        insert_failed: seed + 3,
        drop: seed + 4,
        early_drop: seed + 5,
        error: seed + 6,
        search_restart: seed + 7,
        clash_resolve: seed + 8,
        chaintoolong: seed + 9,
    }
}

// ---------------------------------------------------------------------------------------
// HTTP client.

struct Response {
    status: u16,
    headers: BTreeMap<String, String>,
    body: String,
}

fn request(addr: SocketAddr, raw: &[u8]) -> std::io::Result<Response> {
    let mut s = TcpStream::connect_timeout(&addr, Duration::from_secs(5))?;
    s.set_read_timeout(Some(Duration::from_secs(10)))?;
    s.write_all(raw)?;
    let mut buf = Vec::new();
    s.read_to_end(&mut buf)?;
    let text = String::from_utf8(buf).expect("utf-8 response");
    let (head, body) = text.split_once("\r\n\r\n").expect("response head");
    let mut lines = head.split("\r\n");
    let status_line = lines.next().unwrap();
    let mut parts = status_line.splitn(3, ' ');
    assert_eq!(parts.next(), Some("HTTP/1.1"), "{status_line}");
    let status = parts.next().unwrap().parse().unwrap();
    let headers: BTreeMap<String, String> = lines
        .map(|l| {
            let (k, v) = l.split_once(": ").expect("header");
            (k.to_ascii_lowercase(), v.to_string())
        })
        .collect();
    let len: usize = headers["content-length"].parse().unwrap();
    assert_eq!(len, body.len(), "Content-Length matches the body");
    Ok(Response {
        status,
        headers,
        body: body.to_string(),
    })
}

fn get(addr: SocketAddr, path: &str) -> Response {
    request(
        addr,
        format!("GET {path} HTTP/1.1\r\nHost: localhost\r\nAccept: */*\r\n\r\n").as_bytes(),
    )
    .unwrap()
}

fn scrape(addr: SocketAddr) -> Exposition {
    let r = get(addr, "/metrics");
    assert_eq!(r.status, 200);
    assert_eq!(r.headers["content-type"], CONTENT_TYPE);
    parse(&r.body).unwrap_or_else(|e| panic!("{e}\n{}", r.body))
}

fn localhost0() -> SocketAddr {
    sa("127.0.0.1:0")
}

// ---------------------------------------------------------------------------------------
// Tests.

#[test]
fn scrape_equals_what_was_fed() {
    let m = Metrics::new();
    let server = metrics::spawn_blocking_server(localhost0(), m.clone()).unwrap();
    let addr = server.local_addr();
    assert!(addr.ip().is_loopback() && addr.port() != 0, "{addr}");

    for _ in 0..3 {
        m.on_event(&Event::DnsSend(dns(11)));
    }
    for _ in 0..2 {
        m.on_event(&Event::DnsRecv(dns(11)));
    }
    m.on_event(&Event::NfDrop(nf(11)));
    for _ in 0..4 {
        m.on_event(&Event::CtClash(nf(12)));
    }
    m.on_finding(&finding(Verdict::InsertClashDropped, 11, 1));
    m.on_finding(&finding(Verdict::InsertClashDropped, 11, 1));
    m.on_finding(&finding(Verdict::InsertClashDropped, 12, 1));
    m.on_finding(&finding(Verdict::InsertClashResolved, 11, 17));
    m.on_finding(&finding(Verdict::EarlyDrop, 12, 1000));
    m.on_finding(&finding(Verdict::Unexplained, 4026531840, 5));
    m.set_lost(&[7, 0]);
    m.set_conntrack(11, &stats(100));
    m.set_conntrack(12, &stats(0));
    m.set_conntrack(12, &stats(200)); // the latest value wins
    m.on_lookup(&retried_lookup());

    let mut e = scrape(addr);
    // Histograms: their shape, count and sum here, then out of the exact comparison.
    for (family, series, sum, first_bucket) in [
        (
            "tracer_lookup_latency_seconds",
            labels(&[("outcome", "answered")]),
            1.0003,
            2.0,
        ),
        ("tracer_retry_delay_seconds", Labels::new(), 1.0, 1.0),
    ] {
        check_histogram(&e, family, &series).unwrap();
        let bucket = |le: f64| {
            e.samples
                .iter()
                .find(|((n, l), _)| {
                    n == &format!("{family}_bucket")
                        && l.get("le").map(|v| parse_value(v).unwrap()) == Some(le)
                        && l.iter().filter(|(k, _)| *k != "le").eq(series.iter())
                })
                .map(|(_, v)| *v)
        };
        assert_eq!(
            bucket(first_bucket),
            Some(1.0),
            "{family}: value in le={first_bucket}"
        );
        assert_eq!(bucket(0.5), Some(0.0), "{family}");
        let count = (format!("{family}_count"), series.clone());
        assert_eq!(e.samples.remove(&count), Some(1.0), "{family}");
        let got = e
            .samples
            .remove(&(format!("{family}_sum"), series.clone()))
            .unwrap();
        assert!((got - sum).abs() < 1e-9, "{family}: sum {got}");
        e.samples
            .retain(|(n, _), _| n != &format!("{family}_bucket"));
    }

    let mut want: BTreeMap<(String, Labels), f64> = BTreeMap::new();
    let mut put = |name: &str, l: &[(&str, &str)], v: f64| {
        want.insert((name.to_string(), labels(l)), v);
    };
    for (kind, v) in [
        ("dns_send", 3.0),
        ("dns_recv", 2.0),
        ("nf_drop", 1.0),
        ("ct_clash", 4.0),
    ] {
        put("tracer_events_total", &[("kind", kind)], v);
    }
    for (verdict, netns, v) in [
        ("insert-clash-dropped", "11", 2.0),
        ("insert-clash-dropped", "12", 1.0),
        ("insert-clash-resolved", "11", 17.0),
        ("early-drop", "12", 1000.0),
        ("unexplained", "4026531840", 5.0),
    ] {
        put(
            "tracer_findings_total",
            &[("verdict", verdict), ("netns", netns)],
            v,
        );
    }
    put("tracer_lost_events_total", &[("cpu", "0")], 7.0);
    put("tracer_lost_events_total", &[("cpu", "1")], 0.0);
    for (netns, seed) in [("11", 100.0), ("12", 200.0)] {
        for (field, off) in [
            ("found", 0.0),
            ("invalid", 1.0),
            ("insert_failed", 3.0),
            ("drop", 4.0),
            ("early_drop", 5.0),
            ("clash_resolve", 8.0),
        ] {
            put(
                "tracer_conntrack_stat",
                &[("netns", netns), ("field", field)],
                seed + off,
            );
        }
    }
    put(
        "tracer_build_info",
        &[("version", env!("CARGO_PKG_VERSION"))],
        1.0,
    );
    let pod = [("namespace", "shop"), ("pod", "web-0")];
    put(
        "tracer_lookups_total",
        &[pod[0], pod[1], ("outcome", "answered")],
        1.0,
    );
    put(
        "tracer_lookup_verdicts_total",
        &[pod[0], pod[1], ("verdict", "snat-port-clash")],
        1.0,
    );
    put("tracer_unanswered_queries_total", &pod, 1.0);
    assert_eq!(e.samples, want, "exactly the series fed, nothing else");
    assert_eq!(CONNTRACK_FIELDS.len(), 6);

    let types: BTreeMap<&str, &str> = e
        .families
        .iter()
        .map(|(k, (t, _))| (k.as_str(), t.as_str()))
        .collect();
    assert_eq!(
        types,
        BTreeMap::from([
            ("tracer_build", "info"),
            ("tracer_conntrack_stat", "gauge"),
            ("tracer_events", "counter"),
            ("tracer_findings", "counter"),
            ("tracer_lost_events", "counter"),
            ("tracer_lookup_latency_seconds", "histogram"),
            ("tracer_lookup_verdicts", "counter"),
            ("tracer_lookups", "counter"),
            ("tracer_retry_delay_seconds", "histogram"),
            ("tracer_unanswered_queries", "counter"),
        ])
    );
    assert!(
        e.families.values().all(|(_, h)| h.is_some()),
        "every family has HELP"
    );

    // Later updates show in the next scrape; losses only move forward.
    m.on_event(&Event::DnsSend(dns(11)));
    m.on_finding(&finding(Verdict::InsertClashDropped, 11, 3));
    m.set_lost(&[9, 2]);
    m.set_lost(&[8, 2]);
    let e2 = scrape(addr);
    assert_eq!(
        e2.samples[&(
            "tracer_events_total".into(),
            labels(&[("kind", "dns_send")])
        )],
        4.0
    );
    assert_eq!(
        e2.samples[&(
            "tracer_findings_total".into(),
            labels(&[("verdict", "insert-clash-dropped"), ("netns", "11")])
        )],
        5.0
    );
    assert_eq!(
        e2.samples[&("tracer_lost_events_total".into(), labels(&[("cpu", "0")]))],
        9.0
    );
    assert_eq!(
        e2.samples[&("tracer_lost_events_total".into(), labels(&[("cpu", "1")]))],
        2.0
    );
    server.stop().unwrap();
}

#[test]
fn fresh_scrape_has_zeroed_kinds() {
    let m = Metrics::new();
    let e = parse(&m.encode()).unwrap();
    // 4 kinds, build info, and the retry-delay histogram (12 buckets, +Inf, count, sum), all
    // zero; per-pod series appear with their first lookup, per-CPU losses with the first
    // reading of the loss counters (`watch` makes it at its start).
    assert_eq!(e.samples.len(), 4 + 1 + 15, "{:?}", e.samples);
    check_histogram(&e, "tracer_retry_delay_seconds", &Labels::new()).unwrap();
    assert_eq!(
        e.samples[&("tracer_retry_delay_seconds_count".into(), Labels::new())],
        0.0
    );
    for kind in ["dns_send", "dns_recv", "nf_drop", "ct_clash"] {
        assert_eq!(
            e.samples[&("tracer_events_total".into(), labels(&[("kind", kind)]))],
            0.0
        );
    }
}

#[test]
fn other_paths_and_methods() {
    let server = metrics::spawn_blocking_server(localhost0(), Metrics::new()).unwrap();
    let addr = server.local_addr();
    for path in ["/", "/metric", "/metrics/", "/metricsx", "/favicon.ico"] {
        assert_eq!(get(addr, path).status, 404, "{path}");
    }
    // A query string is ignored.
    assert_eq!(get(addr, "/metrics?name[]=x").status, 200);
    let post = request(
        addr,
        b"POST /metrics HTTP/1.1\r\nHost: x\r\nContent-Length: 0\r\n\r\n",
    )
    .unwrap();
    assert_eq!(post.status, 405);
    let garbage = request(addr, b"hello\r\n\r\n").unwrap();
    assert_eq!(garbage.status, 400);
    // Oversized request heads are refused, and the server keeps serving.
    let mut big = b"GET /metrics HTTP/1.1\r\nX-Pad: ".to_vec();
    big.extend(std::iter::repeat_n(b'a', 64 * 1024));
    big.extend_from_slice(b"\r\n\r\n");
    match request(addr, &big) {
        Ok(r) => assert_eq!(r.status, 431),
        // The server may close while we are still writing.
        Err(e) => assert!(
            matches!(
                e.kind(),
                std::io::ErrorKind::ConnectionReset | std::io::ErrorKind::BrokenPipe
            ),
            "{e}"
        ),
    }
    assert_eq!(get(addr, "/metrics").status, 200);
}

#[test]
fn head_has_no_body() {
    let server = metrics::spawn_blocking_server(localhost0(), Metrics::new()).unwrap();
    let mut s = TcpStream::connect(server.local_addr()).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    s.write_all(b"HEAD /metrics HTTP/1.1\r\nHost: x\r\n\r\n")
        .unwrap();
    let mut text = String::new();
    s.read_to_string(&mut text).unwrap();
    let (head, body) = text.split_once("\r\n\r\n").unwrap();
    assert!(head.starts_with("HTTP/1.1 200 OK\r\n"), "{head}");
    assert!(head.contains("Content-Length: "), "{head}");
    assert!(body.is_empty(), "{body}");
}

#[test]
fn stops_on_drop_even_with_an_idle_client() {
    let server = metrics::spawn_blocking_server(localhost0(), Metrics::new()).unwrap();
    let addr = server.local_addr();
    assert_eq!(get(addr, "/metrics").status, 200);
    // A client that connects and never sends anything must not hold up the shutdown.
    let idle = TcpStream::connect(addr).unwrap();
    std::thread::sleep(Duration::from_millis(100));
    let t = Instant::now();
    drop(server);
    assert!(t.elapsed() < common::bound(2), "{:?}", t.elapsed());
    drop(idle);
    let err = TcpStream::connect_timeout(&addr, Duration::from_secs(2)).unwrap_err();
    assert_eq!(err.kind(), std::io::ErrorKind::ConnectionRefused, "{err}");
    // The port can be bound again.
    let again = metrics::spawn_blocking_server(addr, Metrics::new()).unwrap();
    assert_eq!(again.local_addr(), addr);
}

#[test]
fn bind_errors_are_reported_by_spawn() {
    let server = metrics::spawn_blocking_server(localhost0(), Metrics::new()).unwrap();
    let err = metrics::spawn_blocking_server(server.local_addr(), Metrics::new()).unwrap_err();
    assert!(format!("{err:#}").contains("binding"), "{err:#}");
}

#[test]
fn async_serve_until_shutdown() {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        let m = Metrics::new();
        m.on_finding(&finding(Verdict::TableFull, 1, 2));
        let listener = tokio::net::TcpListener::bind(localhost0()).await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (tx, rx) = tokio::sync::oneshot::channel::<()>();
        let task = tokio::spawn(metrics::serve_listener(listener, m, async {
            let _ = rx.await;
        }));
        let e = tokio::task::spawn_blocking(move || scrape(addr))
            .await
            .unwrap();
        assert_eq!(
            e.samples[&(
                "tracer_findings_total".into(),
                labels(&[("verdict", "table-full"), ("netns", "1")])
            )],
            2.0
        );
        tx.send(()).unwrap();
        tokio::time::timeout(Duration::from_secs(2), task)
            .await
            .expect("serve returns after shutdown")
            .unwrap()
            .unwrap();

        // serve() binds itself and reports bind errors.
        let busy = std::net::TcpListener::bind(localhost0()).unwrap();
        let err = metrics::serve(busy.local_addr().unwrap(), Metrics::new(), async {})
            .await
            .unwrap_err();
        assert!(format!("{err:#}").contains("binding"), "{err:#}");
    });
}

#[test]
fn default_address_is_loopback() {
    assert!(metrics::DEFAULT_ADDR.ip().is_loopback());
}

#[test]
fn concurrent_updates_while_scraping() {
    let m = Metrics::new();
    let server = metrics::spawn_blocking_server(localhost0(), m.clone()).unwrap();
    let addr = server.local_addr();
    let writers: Vec<_> = (0..4)
        .map(|_| {
            let m = m.clone();
            std::thread::spawn(move || {
                for _ in 0..1000 {
                    m.on_event(&Event::NfDrop(nf(1)));
                    m.on_finding(&finding(Verdict::Invalid, 1, 2));
                }
            })
        })
        .collect();
    for _ in 0..5 {
        scrape(addr); // parses strictly at every point
    }
    for w in writers {
        w.join().unwrap();
    }
    let e = scrape(addr);
    assert_eq!(
        e.samples[&("tracer_events_total".into(), labels(&[("kind", "nf_drop")]))],
        4000.0
    );
    assert_eq!(
        e.samples[&(
            "tracer_findings_total".into(),
            labels(&[("verdict", "invalid"), ("netns", "1")])
        )],
        8000.0
    );
}

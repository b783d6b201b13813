//! Rendering events as readable lines or JSON lines, generic over `io::Write` so it is
//! tested without a kernel.

use std::{
    io::{self, Write},
    time::{Duration, SystemTime},
};

use serde::Serialize;
use serde_json::{json, Value};

use crate::{
    dns,
    events::{Event, FiveTuple},
    kallsyms::Symbols,
    pods::Workload,
    verdict::Finding,
};

/// Turns `bpf_ktime_get_ns()` (CLOCK_MONOTONIC) into wall-clock time.
#[derive(Debug, Clone, Copy)]
pub struct Clock {
    /// Wall-clock time minus monotonic time, in ns.
    offset_ns: i128,
}

impl Clock {
    pub fn now() -> Self {
        let mono = monotonic_ns();
        let wall = SystemTime::now()
            .duration_since(SystemTime::UNIX_EPOCH)
            .unwrap_or_default()
            .as_nanos() as i128;
        Clock {
            offset_ns: wall - mono as i128,
        }
    }

    pub fn fixed(offset_ns: i128) -> Self {
        Clock { offset_ns }
    }

    /// Wall-clock time minus monotonic time, in ns.
    pub fn offset_ns(&self) -> i128 {
        self.offset_ns
    }

    pub fn wall(&self, ts_ns: u64) -> SystemTime {
        let ns = (ts_ns as i128 + self.offset_ns).max(0) as u128;
        SystemTime::UNIX_EPOCH + Duration::from_nanos(ns as u64)
    }
}

pub fn monotonic_ns() -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: clock_gettime writes into a valid timespec.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) };
    ts.tv_sec as u64 * 1_000_000_000 + ts.tv_nsec as u64
}

/// `tcp`, `udp`, … or `proto N`.
pub(crate) fn proto(p: u8) -> String {
    match p {
        6 => "tcp".into(),
        17 => "udp".into(),
        1 => "icmp".into(),
        58 => "icmpv6".into(),
        n => format!("proto {n}"),
    }
}

fn flow(t: &FiveTuple) -> String {
    format!("{} {} -> {}", proto(t.proto), t.src, t.dst)
}

/// Names of the set `IPS_*` status bits.
pub fn ct_status_names(status: u64) -> String {
    const NAMES: [&str; 16] = [
        "EXPECTED",
        "SEEN_REPLY",
        "ASSURED",
        "CONFIRMED",
        "SRC_NAT",
        "DST_NAT",
        "SEQ_ADJUST",
        "SRC_NAT_DONE",
        "DST_NAT_DONE",
        "DYING",
        "FIXED_TIMEOUT",
        "TEMPLATE",
        "NAT_CLASH",
        "HELPER",
        "OFFLOAD",
        "HW_OFFLOAD",
    ];
    let names: Vec<&str> = (0..16)
        .filter(|b| status & (1 << b) != 0)
        .map(|b| NAMES[b])
        .collect();
    if names.is_empty() {
        "none".into()
    } else {
        names.join("|")
    }
}

/// One line for a DNS message: `query id 0x1234 A example.com rd EDNS 1232`, or
/// `answer id 0x1234 NOERROR A example.com -> [CNAME x.example.com, A 192.0.2.1] TC EDNS 1232`.
fn dns_text(payload: &[u8], full_len: u32) -> String {
    let m = match dns::parse(payload, full_len as usize) {
        Ok(m) => m,
        Err(e) => return format!("undecodable DNS ({e})"),
    };
    let mut s = format!(
        "{} id 0x{:04x}",
        if m.response { "answer" } else { "query" },
        m.id
    );
    if m.opcode != 0 {
        s.push_str(&format!(" opcode {}", m.opcode));
    }
    if m.response {
        s.push_str(&format!(" {}", m.rcode));
    }
    match m.questions.as_slice() {
        [] => s.push_str(" (no question)"),
        [q, rest @ ..] => {
            s.push_str(&format!(" {} {}", dns::qtype_name(q.qtype), q.name));
            if !rest.is_empty() {
                s.push_str(&format!(" (+{} questions)", rest.len()));
            }
        }
    }
    if m.response {
        let answers: Vec<String> = m
            .answers
            .iter()
            .map(|a| format!("{} {}", dns::qtype_name(a.rtype), a.data))
            .collect();
        s.push_str(&format!(" -> [{}]", answers.join(", ")));
        if m.authority > 0 {
            s.push_str(&format!(" authority {}", m.authority));
        }
    }
    let flags = m.flags.to_string();
    if !flags.is_empty() {
        s.push_str(&format!(" {}", flags.replace("tc", "TC")));
    }
    if let Some(e) = m.edns {
        s.push_str(&format!(
            " EDNS {}{}",
            e.udp_size,
            if e.dnssec_ok { " DO" } else { "" }
        ));
    }
    if m.capture_cut {
        s.push_str(&format!(
            " (capture cut: {} of {} answers)",
            m.answers.len(),
            m.answer_count
        ));
    }
    s
}

pub struct Printer<W: Write> {
    pub(crate) out: W,
    /// One JSON event line is built here, then written out in one piece (reused).
    line: Vec<u8>,
    pub(crate) json: bool,
    pub(crate) clock: Clock,
    symbols: Symbols,
    pub(crate) style: Style,
    /// Each pod's JSON, made once: the same few pods are in most event lines.
    workloads: WorkloadJson,
}

/// Serialized workloads by address, each checked against its content on use (an address
/// can be reused once a workload is freed). Bounded: cleared when full.
#[derive(Default)]
struct WorkloadJson {
    by_addr: std::collections::HashMap<usize, (Workload, Box<serde_json::value::RawValue>)>,
}

impl WorkloadJson {
    const MAX: usize = 4096;

    fn get(&mut self, w: &Workload) -> Option<&serde_json::value::RawValue> {
        let addr = std::ptr::from_ref(w) as usize;
        let fresh = self.by_addr.get(&addr).is_none_or(|(c, _)| c != w);
        if fresh {
            let raw = serde_json::value::to_raw_value(w).ok()?;
            if self.by_addr.len() >= Self::MAX {
                self.by_addr.clear();
            }
            self.by_addr.insert(addr, (w.clone(), raw));
        }
        self.by_addr.get(&addr).map(|(_, raw)| &**raw)
    }
}

/// ANSI colour, on a terminal only.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Style {
    pub colour: bool,
}

impl Style {
    fn paint(&self, code: &str, s: &str) -> String {
        if self.colour {
            format!("\x1b[{code}m{s}\x1b[0m")
        } else {
            s.to_string()
        }
    }
    pub fn red(&self, s: &str) -> String {
        self.paint("1;31", s)
    }
    pub fn yellow(&self, s: &str) -> String {
        self.paint("33", s)
    }
    pub fn green(&self, s: &str) -> String {
        self.paint("32", s)
    }
    pub fn dim(&self, s: &str) -> String {
        self.paint("2", s)
    }
    pub fn bold(&self, s: &str) -> String {
        self.paint("1", s)
    }
}

impl<W: Write> Printer<W> {
    pub fn new(out: W, json: bool, clock: Clock, symbols: Symbols) -> Self {
        Printer {
            out,
            line: Vec::with_capacity(4096),
            json,
            clock,
            symbols,
            style: Style::default(),
            workloads: WorkloadJson::default(),
        }
    }

    /// Colour for the text output (a terminal).
    pub fn with_style(mut self, style: Style) -> Self {
        self.style = style;
        self
    }

    pub fn is_json(&self) -> bool {
        self.json
    }
}

/// An event as one JSON object: the event's own fields (`type` first), then what the
/// printer adds. Borrowed, and written without building a `serde_json::Value`.
#[derive(Serialize)]
struct EventLine<'a> {
    #[serde(flatten)]
    ev: &'a Event,
    time: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    dns: Option<dns::Message>,
    #[serde(skip_serializing_if = "Option::is_none")]
    dns_error: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    location_sym: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    ct_status_names: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    workload: Option<&'a serde_json::value::RawValue>,
}

/// A finished lookup as one JSON object (`type` first).
#[derive(Serialize)]
pub(crate) struct LookupLine<'a> {
    #[serde(rename = "type")]
    pub(crate) kind: &'static str,
    #[serde(flatten)]
    pub(crate) lookup: &'a crate::lookups::Lookup,
    pub(crate) time: String,
}

impl<W: Write> Printer<W> {
    /// Text as it is (text mode only).
    pub fn raw(&mut self, text: &str) -> io::Result<()> {
        self.out.write_all(text.as_bytes())
    }

    pub fn event(&mut self, ev: &Event) -> io::Result<()> {
        if self.json {
            self.write_event_json(ev, None)
        } else {
            let line = self.text(ev);
            writeln!(self.out, "{line}")
        }
    }

    /// A line for something that is not an event (decode errors, the summary).
    pub fn note(&mut self, kind: &str, v: Value) -> io::Result<()> {
        if self.json {
            let mut v = v;
            if let Value::Object(m) = &mut v {
                m.insert("type".into(), Value::String(kind.into()));
            }
            serde_json::to_writer(&mut self.out, &v)?;
            self.out.write_all(b"\n")
        } else {
            writeln!(self.out, "{kind}: {v}")
        }
    }

    /// `symbol+0xoff` of a kernel text address.
    pub fn symbolize(&self, addr: u64) -> String {
        self.symbols.resolve(addr)
    }

    pub fn finding(&mut self, f: &Finding) -> io::Result<()> {
        self.finding_as(f, None)
    }

    /// A finding; `pod` is the label and JSON of the pod whose query it hit, when known.
    pub(crate) fn finding_as(
        &mut self,
        f: &Finding,
        pod: Option<(String, Value)>,
    ) -> io::Result<()> {
        if self.json {
            let mut v = serde_json::to_value(f).unwrap_or(Value::Null);
            if let Value::Object(m) = &mut v {
                m.insert("type".into(), json!("finding"));
                if let Some((_, w)) = &pod {
                    m.insert("workload".into(), w.clone());
                }
                let time = humantime::format_rfc3339_nanos(self.clock.wall(f.ts_ns)).to_string();
                m.insert("time".into(), json!(time));
            }
            serde_json::to_writer(&mut self.out, &v)?;
            self.out.write_all(b"\n")
        } else {
            let time = humantime::format_rfc3339_micros(self.clock.wall(f.ts_ns)).to_string();
            let time = time.get(11..26).unwrap_or(&time).to_string();
            let what = f
                .packet
                .as_ref()
                .map(|p| format!(" {}", flow(p)))
                .unwrap_or_default();
            let count = if f.count > 1 {
                format!(" x{}", f.count)
            } else {
                String::new()
            };
            let verdict = if f.verdict.lost_packet() {
                self.style.red(f.verdict.name())
            } else {
                self.style.yellow(f.verdict.name())
            };
            let pod = pod
                .map(|(label, _)| format!(" {label}"))
                .unwrap_or_default();
            writeln!(
                self.out,
                "{} FINDING {verdict}{count}{pod} netns {}{what}: {} [{}]",
                self.style.dim(&time),
                f.netns,
                f.explanation,
                f.source
            )
        }
    }

    pub fn flush(&mut self) -> io::Result<()> {
        self.out.flush()
    }

    /// One JSON line for `ev` (and the pod that sent or received it), serialized straight
    /// to the output: this runs for every event of a busy node.
    pub(crate) fn write_event_json(
        &mut self,
        ev: &Event,
        workload: Option<&Workload>,
    ) -> io::Result<()> {
        if let Event::DnsSend(d) | Event::DnsRecv(d) = ev {
            let kind = if matches!(ev, Event::DnsSend(_)) {
                "dns_send"
            } else {
                "dns_recv"
            };
            let wall = self.clock.wall(d.ts_ns);
            let workload = workload.and_then(|w| self.workloads.get(w));
            let mut line = std::mem::take(&mut self.line);
            line.clear();
            dns_event_line(&mut line, kind, d, wall, workload)?;
            let r = self.out.write_all(&line);
            self.line = line;
            return r;
        }
        let time = humantime::format_rfc3339_nanos(self.clock.wall(ev.ts_ns())).to_string();
        let mut line = EventLine {
            ev,
            time,
            dns: None,
            dns_error: None,
            location_sym: None,
            ct_status_names: None,
            workload: workload.and_then(|w| self.workloads.get(w)),
        };
        match ev {
            Event::DnsSend(d) | Event::DnsRecv(d) => {
                match dns::parse(&d.payload, d.payload_len as usize) {
                    Ok(msg) => line.dns = Some(msg),
                    Err(e) => line.dns_error = Some(e.to_string()),
                }
            }
            Event::NfDrop(n) | Event::CtClash(n) => {
                if n.location != 0 {
                    line.location_sym = Some(self.symbols.resolve(n.location));
                }
                line.ct_status_names = n.conntrack.as_ref().map(|ct| ct_status_names(ct.status));
            }
        }
        serde_json::to_writer(&mut self.out, &line)?;
        self.out.write_all(b"\n")
    }

    pub fn text(&mut self, ev: &Event) -> String {
        let time = humantime::format_rfc3339_micros(self.clock.wall(ev.ts_ns())).to_string();
        let time = time.get(11..26).unwrap_or(&time).to_string();
        match ev {
            Event::DnsSend(d) | Event::DnsRecv(d) => {
                let dir = if matches!(ev, Event::DnsSend(_)) {
                    "dns-send"
                } else {
                    "dns-recv"
                };
                let who = match (d.task.pid, &d.task.comm) {
                    (Some(pid), Some(comm)) => format!("{comm}[{pid}/{}]", d.task.tid.unwrap_or(0)),
                    _ => "?".into(),
                };
                let batch = if d.batch {
                    format!(" batch({})", d.batch_len)
                } else {
                    String::new()
                };
                format!(
                    "{time} {dir} {who} netns {} cgroup {} sock {:#x} {}{batch} {}",
                    d.task.netns,
                    d.task.cgroup_id,
                    d.sock_cookie,
                    flow(&d.tuple),
                    dns_text(&d.payload, d.payload_len)
                )
            }
            Event::NfDrop(n) | Event::CtClash(n) => {
                let what = if matches!(ev, Event::NfDrop(_)) {
                    "nf-drop "
                } else {
                    "ct-clash"
                };
                let pkt = n
                    .packet
                    .as_ref()
                    .map(flow)
                    .unwrap_or_else(|| "(headers unreadable)".into());
                let ct = match &n.conntrack {
                    Some(ct) => format!(
                        " ct[{} orig {} reply {}]",
                        ct_status_names(ct.status),
                        flow(&ct.orig),
                        flow(&ct.reply)
                    ),
                    None => " no-ct".into(),
                };
                let winner = n
                    .clash_winner
                    .as_ref()
                    .map(|w| format!(" lost to {}", flow(w)))
                    .unwrap_or_default();
                let at = if n.location != 0 {
                    format!(" at {}", self.symbols.resolve(n.location))
                } else {
                    String::new()
                };
                format!(
                    "{time} {what} netns {} if {} {pkt}{ct}{winner}{at} verdict {} via {}",
                    n.netns, n.ifindex, n.verdict, n.source
                )
            }
        }
    }
}

/// A DNS event's JSON line, byte for byte what serializing [`EventLine`] with serde_json
/// gives (`tests::dns_event_lines_match_serde` holds it to that), written without serde's
/// map machinery: the keys are constants, and only the strings that can hold anything (the
/// task's `comm`, the DNS message) go through serde_json's escaping. Every event of a busy
/// node is one of these.
fn dns_event_line(
    out: &mut Vec<u8>,
    kind: &str,
    d: &crate::events::DnsEvent,
    wall: SystemTime,
    workload: Option<&serde_json::value::RawValue>,
) -> io::Result<()> {
    fn num(out: &mut Vec<u8>, n: impl itoa::Integer) {
        out.extend_from_slice(itoa::Buffer::new().format(n).as_bytes());
    }
    fn opt(out: &mut Vec<u8>, n: Option<u32>) {
        match n {
            Some(n) => num(out, n),
            None => out.extend_from_slice(b"null"),
        }
    }
    const DIGITS: &[u8; 16] = b"0123456789abcdef";
    out.extend_from_slice(b"{\"type\":\"");
    out.extend_from_slice(kind.as_bytes());
    out.extend_from_slice(b"\",\"ts_ns\":");
    num(out, d.ts_ns);
    out.extend_from_slice(b",\"source\":");
    serde_json::to_writer(&mut *out, d.source)?;
    out.extend_from_slice(b",\"pid\":");
    opt(out, d.task.pid);
    out.extend_from_slice(b",\"tid\":");
    opt(out, d.task.tid);
    out.extend_from_slice(b",\"comm\":");
    match &d.task.comm {
        Some(c) => serde_json::to_writer(&mut *out, c)?,
        None => out.extend_from_slice(b"null"),
    }
    out.extend_from_slice(b",\"cgroup_id\":");
    num(out, d.task.cgroup_id);
    out.extend_from_slice(b",\"netns\":");
    num(out, d.task.netns);
    out.extend_from_slice(b",\"sock_cookie\":");
    num(out, d.sock_cookie);
    out.extend_from_slice(b",\"proto\":");
    num(out, d.tuple.proto);
    // Addresses and the time are made of digits, letters and `.:[]%-+TZ`: nothing to escape.
    write!(
        out,
        ",\"src\":\"{}\",\"dst\":\"{}\",\"batch\":{},\"batch_len\":",
        d.tuple.src, d.tuple.dst, d.batch
    )?;
    num(out, d.batch_len);
    out.extend_from_slice(b",\"payload_len\":");
    num(out, d.payload_len);
    out.extend_from_slice(b",\"payload\":\"");
    for &b in &d.payload {
        out.push(DIGITS[usize::from(b >> 4)]);
        out.push(DIGITS[usize::from(b & 0xf)]);
    }
    write!(
        out,
        "\",\"time\":\"{}\"",
        humantime::format_rfc3339_nanos(wall)
    )?;
    match dns::parse(&d.payload, d.payload_len as usize) {
        Ok(msg) => {
            out.extend_from_slice(b",\"dns\":");
            serde_json::to_writer(&mut *out, &msg)?;
        }
        Err(e) => {
            out.extend_from_slice(b",\"dns_error\":");
            serde_json::to_writer(&mut *out, &e.to_string())?;
        }
    }
    if let Some(w) = workload {
        out.extend_from_slice(b",\"workload\":");
        out.extend_from_slice(w.get().as_bytes());
    }
    out.extend_from_slice(b"}\n");
    Ok(())
}

#[cfg(test)]
mod dns_text_tests {
    use super::dns_text;

    fn hex(s: &str) -> Vec<u8> {
        let s: String = s.split_whitespace().collect();
        (0..s.len())
            .step_by(2)
            .map(|i| u8::from_str_radix(&s[i..i + 2], 16).unwrap())
            .collect()
    }

    #[test]
    fn query_answer_cut_and_error() {
        // glibc's query and dnsmasq's answer (see dns.rs).
        let q = hex(
            "7b61 0120 0001 0000 0000 0001 03777777 076578616d706c65 0474657374 00
            0001 0001 00 0029 04b0 00000000 0000",
        );
        assert_eq!(
            dns_text(&q, q.len() as u32),
            "query id 0x7b61 A www.example.test rd ad EDNS 1200"
        );
        let r = hex(
            "d213 8580 0001 0003 0000 0001 03777777076578616d706c65047465737400
            0001 0001 c00c 0005 0001 00000000 0012 03776562076578616d706c650474657374 00
            c02e 0005 0001 00000000 0013 04686f7374076578616d706c650474657374 00
            c04c 0001 0001 00000000 0004 0a010203 00 0029 04d0 00000000 0000",
        );
        assert_eq!(
            dns_text(&r, r.len() as u32),
            "answer id 0xd213 NOERROR A www.example.test -> [CNAME web.example.test, \
             CNAME host.example.test, A 10.1.2.3] aa rd ra EDNS 1232"
        );
        assert_eq!(
            dns_text(&r[..69], r.len() as u32),
            "answer id 0xd213 NOERROR A www.example.test -> [CNAME web.example.test] \
             aa rd ra (capture cut: 1 of 3 answers)"
        );
        assert_eq!(
            dns_text(&r[..20], r.len() as u32),
            "undecodable DNS (the payload ends at byte 20, inside the question section \
             (the capture kept 20 of 122 bytes))"
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::events::{DnsEvent, TaskInfo};

    fn hex(s: &str) -> Vec<u8> {
        let s: String = s.split_whitespace().collect();
        (0..s.len())
            .step_by(2)
            .map(|i| u8::from_str_radix(&s[i..i + 2], 16).unwrap())
            .collect()
    }

    /// What serde makes of the borrowed line (the reference the hand-written line follows).
    fn by_serde(ev: &Event, wall_ns: u64, w: Option<&serde_json::value::RawValue>) -> String {
        let d = match ev {
            Event::DnsSend(d) | Event::DnsRecv(d) => d,
            _ => unreachable!(),
        };
        let (dns, dns_error) = match dns::parse(&d.payload, d.payload_len as usize) {
            Ok(m) => (Some(m), None),
            Err(e) => (None, Some(e.to_string())),
        };
        let line = EventLine {
            ev,
            time: humantime::format_rfc3339_nanos(Clock::fixed(0).wall(wall_ns)).to_string(),
            dns,
            dns_error,
            location_sym: None,
            ct_status_names: None,
            workload: w,
        };
        serde_json::to_string(&line).unwrap() + "\n"
    }

    #[test]
    fn dns_event_lines_match_serde() {
        let query = hex(
            "7b61 0120 0001 0000 0000 0001 03777777 076578616d706c65 0474657374 00
            0001 0001 00 0029 04b0 00000000 0000",
        );
        let answer = hex(
            "d213 8580 0001 0003 0000 0001 03777777076578616d706c65047465737400
            0001 0001 c00c 0005 0001 00000000 0012 03776562076578616d706c650474657374 00
            c02e 0005 0001 00000000 0013 04686f7374076578616d706c650474657374 00
            c04c 0001 0001 00000000 0004 0a010203 00 0029 04d0 00000000 0000",
        );
        let pod = Workload::host(Some("a \"quoted\" \\ name\u{1}é".into()));
        let raw = serde_json::value::to_raw_value(&pod).unwrap();
        let base = DnsEvent {
            ts_ns: 1_733_000_000_123_456_789,
            source: "fentry/udp_sendmsg",
            task: TaskInfo {
                pid: Some(4242),
                tid: Some(4243),
                comm: Some("get\"ent\u{7f}\n\u{0}".into()),
                cgroup_id: u64::MAX,
                netns: 4_026_531_840,
            },
            sock_cookie: 0x1234_5678_9abc,
            tuple: FiveTuple {
                proto: 17,
                src: "10.0.0.2:40000".parse().unwrap(),
                dst: "10.96.0.10:53".parse().unwrap(),
            },
            batch: true,
            batch_len: 2,
            payload_len: query.len() as u32,
            payload: query.clone(),
        };
        let mut cases = Vec::new();
        cases.push(Event::DnsSend(base.clone()));
        let mut d = base.clone();
        d.task.pid = None;
        d.task.tid = None;
        d.task.comm = None;
        d.batch = false;
        d.batch_len = 0;
        d.tuple.src = "[fe80::1%7]:5353".parse().unwrap();
        d.tuple.dst = "[2001:db8::53]:53".parse().unwrap();
        d.payload = answer.clone();
        d.payload_len = answer.len() as u32;
        cases.push(Event::DnsRecv(d.clone()));
        // Cut captures and undecodable payloads (dns_error).
        d.payload = answer[..69].to_vec();
        cases.push(Event::DnsRecv(d.clone()));
        d.payload = answer[..20].to_vec();
        cases.push(Event::DnsRecv(d.clone()));
        d.payload = Vec::new();
        d.payload_len = 0;
        cases.push(Event::DnsSend(d));
        for ev in &cases {
            for w in [None, Some(&*raw)] {
                let ts = ev.ts_ns();
                let mut got = Vec::new();
                let kind = if matches!(ev, Event::DnsSend(_)) {
                    "dns_send"
                } else {
                    "dns_recv"
                };
                let (Event::DnsSend(d) | Event::DnsRecv(d)) = ev else {
                    unreachable!()
                };
                dns_event_line(&mut got, kind, d, Clock::fixed(0).wall(ts), w).unwrap();
                assert_eq!(String::from_utf8(got).unwrap(), by_serde(ev, ts, w));
            }
        }
        // Through the printer too, with its pod cache.
        let mut p = Printer::new(
            Vec::new(),
            true,
            Clock::fixed(5),
            Symbols::new("/nonexistent"),
        );
        p.write_event_json(&cases[0], Some(&pod)).unwrap();
        p.write_event_json(&cases[1], None).unwrap();
        let want = by_serde(&cases[0], cases[0].ts_ns() + 5, Some(&*raw))
            + &by_serde(&cases[1], cases[1].ts_ns() + 5, None);
        assert_eq!(String::from_utf8(p.out).unwrap(), want);
    }
}

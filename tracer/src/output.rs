//! Rendering events as readable lines or JSON lines, generic over `io::Write` so it is
//! tested without a kernel.

use std::{
    io::{self, Write},
    time::{Duration, SystemTime},
};

use serde_json::{json, Value};

use crate::{
    dns,
    events::{Event, FiveTuple},
    kallsyms::Symbols,
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

fn proto(p: u8) -> String {
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

fn dns_text(payload: &[u8]) -> String {
    match dns::summarize(payload) {
        Ok(s) => {
            let q = s
                .questions
                .first()
                .map(|q| format!("{} {}", q.qtype, q.name))
                .unwrap_or_default();
            if s.response {
                let answers: Vec<String> = s
                    .answers
                    .iter()
                    .map(|a| format!("{} {}", a.rtype, a.data))
                    .collect();
                format!(
                    "answer id 0x{:04x} {}{} {q} -> [{}]",
                    s.id,
                    s.rcode,
                    if s.truncated { " TC" } else { "" },
                    answers.join(", ")
                )
            } else {
                format!("query id 0x{:04x} {q}", s.id)
            }
        }
        Err(e) => format!("not DNS ({e})"),
    }
}

pub struct Printer<W: Write> {
    out: W,
    json: bool,
    clock: Clock,
    symbols: Symbols,
}

impl<W: Write> Printer<W> {
    pub fn new(out: W, json: bool, clock: Clock, symbols: Symbols) -> Self {
        Printer {
            out,
            json,
            clock,
            symbols,
        }
    }

    pub fn event(&mut self, ev: &Event) -> io::Result<()> {
        if self.json {
            let v = self.json_value(ev);
            serde_json::to_writer(&mut self.out, &v)?;
            self.out.write_all(b"\n")
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
        if self.json {
            let mut v = serde_json::to_value(f).unwrap_or(Value::Null);
            if let Value::Object(m) = &mut v {
                m.insert("type".into(), json!("finding"));
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
            writeln!(
                self.out,
                "{time} FINDING {}{count} netns {}{what}: {} [{}]",
                f.verdict.name(),
                f.netns,
                f.explanation,
                f.source
            )
        }
    }

    pub fn flush(&mut self) -> io::Result<()> {
        self.out.flush()
    }

    pub fn json_value(&mut self, ev: &Event) -> Value {
        let mut v = serde_json::to_value(ev).unwrap_or(Value::Null);
        let time = humantime::format_rfc3339_nanos(self.clock.wall(ev.ts_ns())).to_string();
        if let Value::Object(m) = &mut v {
            m.insert("time".into(), json!(time));
            match ev {
                Event::DnsSend(d) | Event::DnsRecv(d) => match dns::summarize(&d.payload) {
                    Ok(s) => {
                        m.insert("dns".into(), serde_json::to_value(s).unwrap_or(Value::Null));
                    }
                    Err(e) => {
                        m.insert("dns_error".into(), json!(e));
                    }
                },
                Event::NfDrop(n) | Event::CtClash(n) => {
                    if n.location != 0 {
                        m.insert(
                            "location_sym".into(),
                            json!(self.symbols.resolve(n.location)),
                        );
                    }
                    if let Some(ct) = &n.conntrack {
                        m.insert("ct_status_names".into(), json!(ct_status_names(ct.status)));
                    }
                }
            }
        }
        v
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
                    dns_text(&d.payload)
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

//! The differential harness behind `dns_diff`: one normal form ([`View`]) for what
//! `tracer::dns` and the candidate libraries (dns-parser 0.8, simple-dns 0.13, hickory-proto
//! 0.26) make of the same datagram, which fields differ, and a tally of outcomes written to a
//! report file (docs/dns.md quotes it).

use std::{
    cell::{Cell, RefCell},
    collections::BTreeMap,
    fmt::Write as _,
    net::{Ipv4Addr, Ipv6Addr},
    panic::{self, AssertUnwindSafe},
    sync::{Mutex, Once},
    time::{Duration, Instant},
};

use tracer::dns;

/// A name in the form `tracer::dns` writes (dig's escapes), lower-cased; `None` where a
/// decoder cannot say what the labels were (dns-parser joins labels with dots unescaped).
pub type CanonName = Option<String>;

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Data {
    A(Ipv4Addr),
    Aaaa(Ipv6Addr),
    /// CNAME or PTR target.
    Name(CanonName),
    Other,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Answer {
    pub name: CanonName,
    /// `None`: dns-parser does not say (it keeps the type of the records it decodes only).
    pub rtype: Option<u16>,
    pub ttl: u32,
    pub data: Data,
}

/// What a decoder says about a whole datagram. `None` fields: the decoder does not keep it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct View {
    pub id: u16,
    pub response: bool,
    pub opcode: Option<u8>,
    /// aa tc rd ra ad cd
    pub flags: [bool; 6],
    /// With the EDNS extended bits.
    pub rcode: Option<u16>,
    /// Name, type, class without the mDNS unicast bit.
    pub questions: Vec<(CanonName, u16, u16)>,
    pub answers: Vec<Answer>,
    pub authority: usize,
    /// Additional records other than OPT.
    pub additional: usize,
    /// UDP size, version, DO bit.
    pub edns: Option<(u16, u8, Option<bool>)>,
}

#[derive(Debug, Clone)]
pub enum Outcome {
    Accepted(Box<View>),
    /// The error's kind (see [`error_kind`]), so that tallies group.
    Rejected(String),
    Panicked(String),
}

/// A candidate library: its name and how to get its view of a datagram.
pub type Candidate = (&'static str, fn(&[u8]) -> Outcome);

pub const CANDIDATES: [Candidate; 3] = [
    ("dns-parser", dns_parser_view),
    ("simple-dns", simple_dns_view),
    ("hickory-proto", hickory_view),
];

/// The fields on which two views differ, by name.
pub fn differences(a: &View, b: &View) -> Vec<&'static str> {
    let mut d = Vec::new();
    if (a.id, a.response, a.flags) != (b.id, b.response, b.flags) {
        d.push("header");
    }
    if !opt_eq(&a.opcode, &b.opcode) {
        d.push("opcode");
    }
    if !opt_eq(&a.rcode, &b.rcode) {
        d.push("rcode");
    }
    let q_eq = a.questions.len() == b.questions.len()
        && a.questions
            .iter()
            .zip(&b.questions)
            .all(|(x, y)| name_eq(&x.0, &y.0) && (x.1, x.2) == (y.1, y.2));
    if !q_eq {
        d.push("questions");
    }
    if a.answers.len() != b.answers.len() {
        d.push("answer count");
    } else {
        let pairs = || a.answers.iter().zip(&b.answers);
        if !pairs().all(|(x, y)| name_eq(&x.name, &y.name)) {
            d.push("answer names");
        }
        if !pairs().all(|(x, y)| opt_eq(&x.rtype, &y.rtype)) {
            d.push("answer types");
        }
        if !pairs().all(|(x, y)| x.ttl == y.ttl) {
            d.push("answer TTLs");
        }
        let data_eq = |x: &Data, y: &Data| match (x, y) {
            (Data::Name(x), Data::Name(y)) => name_eq(x, y),
            _ => x == y,
        };
        if !pairs().all(|(x, y)| data_eq(&x.data, &y.data)) {
            d.push("answer data");
        }
    }
    if (a.authority, a.additional) != (b.authority, b.additional) {
        d.push("section counts");
    }
    let edns_eq = match (a.edns, b.edns) {
        (Some((s1, v1, d1)), Some((s2, v2, d2))) => (s1, v1) == (s2, v2) && opt_eq(&d1, &d2),
        (x, y) => x == y,
    };
    if !edns_eq {
        d.push("edns");
    }
    d
}

fn opt_eq<T: PartialEq>(a: &Option<T>, b: &Option<T>) -> bool {
    match (a, b) {
        (Some(a), Some(b)) => a == b,
        _ => true,
    }
}

fn name_eq(a: &CanonName, b: &CanonName) -> bool {
    opt_eq(a, b)
}

/// Raw labels in `tracer::dns`'s presentation form, lower-cased.
fn canon_labels<'a>(labels: impl Iterator<Item = &'a [u8]>) -> CanonName {
    let mut s = String::new();
    for label in labels {
        if !s.is_empty() {
            s.push('.');
        }
        for &b in label {
            match b {
                b'.' | b'\\' => {
                    s.push('\\');
                    s.push(char::from(b));
                }
                0x21..=0x7e => s.push(char::from(b)),
                _ => {
                    let _ = write!(s, "\\{b:03}");
                }
            }
        }
    }
    if s.is_empty() {
        s.push('.');
    }
    Some(s.to_ascii_lowercase())
}

/// An error's kind: its first word (`InvalidQueryType(65)` -> `InvalidQueryType`).
pub fn error_kind(s: &str) -> String {
    s.split(|c: char| !c.is_ascii_alphanumeric())
        .next()
        .unwrap_or("")
        .to_string()
}

fn class_in_data(class: u16, data: Data) -> Data {
    // tracer::dns decodes the data of class IN records only.
    if class & 0x7fff == 1 {
        data
    } else {
        Data::Other
    }
}

pub fn ours_view(bytes: &[u8]) -> Result<View, dns::DnsError> {
    let m = dns::parse(bytes, bytes.len())?;
    let f = m.flags;
    Ok(View {
        id: m.id,
        response: m.response,
        opcode: Some(m.opcode),
        flags: [f.aa, f.tc, f.rd, f.ra, f.ad, f.cd],
        rcode: Some(m.rcode.0),
        questions: m
            .questions
            .iter()
            .map(|q| {
                (
                    Some(q.name.to_ascii_lowercase()),
                    q.qtype,
                    q.qclass & 0x7fff,
                )
            })
            .collect(),
        answers: m
            .answers
            .iter()
            .map(|a| Answer {
                name: Some(a.name.to_ascii_lowercase()),
                rtype: Some(a.rtype),
                ttl: a.ttl,
                data: match &a.data {
                    dns::RData::A(a) => Data::A(*a),
                    dns::RData::Aaaa(a) => Data::Aaaa(*a),
                    dns::RData::Cname(n) | dns::RData::Ptr(n) => {
                        Data::Name(Some(n.to_ascii_lowercase()))
                    }
                    dns::RData::Other { .. } => Data::Other,
                },
            })
            .collect(),
        authority: usize::from(m.authority),
        additional: usize::from(m.additional) - usize::from(m.edns.is_some()),
        edns: m.edns.map(|e| (e.udp_size, e.version, Some(e.dnssec_ok))),
    })
}

fn dns_parser_view(bytes: &[u8]) -> Outcome {
    guarded(|| {
        let p = dns_parser::Packet::parse(bytes).map_err(|e| format!("{e:?}"))?;
        let h = &p.header;
        // dns-parser's Display joins labels with dots and escapes nothing.
        let name = |n: &dns_parser::Name<'_>| -> CanonName {
            let s = n.to_string();
            let plain = s.bytes().all(|b| b.is_ascii_graphic() && b != b'\\');
            plain.then(|| {
                if s.is_empty() {
                    ".".into()
                } else {
                    s.to_ascii_lowercase()
                }
            })
        };
        use dns_parser::{Opcode, ResponseCode};
        let low = match h.response_code {
            ResponseCode::NoError => 0,
            ResponseCode::FormatError => 1,
            ResponseCode::ServerFailure => 2,
            ResponseCode::NameError => 3,
            ResponseCode::NotImplemented => 4,
            ResponseCode::Refused => 5,
            ResponseCode::Reserved(n) => u16::from(n),
        };
        let rcode = low | p.opt.as_ref().map_or(0, |o| u16::from(o.extrcode) << 4);
        let opcode = match h.opcode {
            Opcode::StandardQuery => 0,
            Opcode::InverseQuery => 1,
            Opcode::ServerStatusRequest => 2,
            Opcode::Reserved(n) => n as u8,
        };
        Ok(View {
            id: h.id,
            response: !h.query,
            opcode: Some(opcode),
            flags: [
                h.authoritative,
                h.truncated,
                h.recursion_desired,
                h.recursion_available,
                h.authenticated_data,
                h.checking_disabled,
            ],
            rcode: Some(rcode),
            questions: p
                .questions
                .iter()
                .map(|q| (name(&q.qname), q.qtype as u16, q.qclass as u16 & 0x7fff))
                .collect(),
            answers: p
                .answers
                .iter()
                .map(|a| {
                    use dns_parser::RData;
                    let (rtype, data) = match &a.data {
                        RData::A(r) => (Some(1), Data::A(r.0)),
                        RData::AAAA(r) => (Some(28), Data::Aaaa(r.0)),
                        RData::CNAME(r) => (Some(5), Data::Name(name(&r.0))),
                        RData::PTR(r) => (Some(12), Data::Name(name(&r.0))),
                        RData::NS(_) => (Some(2), Data::Other),
                        RData::SOA(_) => (Some(6), Data::Other),
                        RData::MX(_) => (Some(15), Data::Other),
                        RData::TXT(_) => (Some(16), Data::Other),
                        RData::SRV(_) => (Some(33), Data::Other),
                        RData::Unknown(_) => (None, Data::Other),
                    };
                    Answer {
                        name: name(&a.name),
                        rtype,
                        ttl: a.ttl,
                        data: class_in_data(a.cls as u16, data),
                    }
                })
                .collect(),
            authority: p.nameservers.len(),
            additional: p.additional.len(),
            edns: p
                .opt
                .as_ref()
                .map(|o| (o.udp, o.version, Some(o.flags & 0x8000 != 0))),
        })
    })
}

fn simple_dns_view(bytes: &[u8]) -> Outcome {
    guarded(|| {
        use simple_dns::{PacketFlag, OPCODE, RCODE};
        let p = simple_dns::Packet::parse(bytes).map_err(|e| format!("{e:?}"))?;
        let name =
            |n: &simple_dns::Name<'_>| canon_labels(n.get_labels().iter().map(|l| l.as_ref()));
        let flag = |f| p.has_flags(f);
        let rcode = match p.rcode() {
            RCODE::Reserved => None,
            r => Some(r as u16),
        };
        let opcode = match p.opcode() {
            OPCODE::Reserved => None,
            o => Some(o as u8),
        };
        Ok(View {
            id: p.id(),
            response: flag(PacketFlag::RESPONSE),
            opcode,
            flags: [
                flag(PacketFlag::AUTHORITATIVE_ANSWER),
                flag(PacketFlag::TRUNCATION),
                flag(PacketFlag::RECURSION_DESIRED),
                flag(PacketFlag::RECURSION_AVAILABLE),
                flag(PacketFlag::AUTHENTIC_DATA),
                flag(PacketFlag::CHECKING_DISABLED),
            ],
            rcode,
            questions: p
                .questions
                .iter()
                .map(|q| {
                    (
                        name(&q.qname),
                        u16::from(q.qtype),
                        u16::from(q.qclass) & 0x7fff,
                    )
                })
                .collect(),
            answers: p
                .answers
                .iter()
                .map(|a| {
                    use simple_dns::rdata::RData;
                    let data = match &a.rdata {
                        RData::A(r) => Data::A(Ipv4Addr::from(r.address)),
                        RData::AAAA(r) => Data::Aaaa(Ipv6Addr::from(r.address)),
                        RData::CNAME(r) => Data::Name(name(&r.0)),
                        RData::PTR(r) => Data::Name(name(&r.0)),
                        _ => Data::Other,
                    };
                    Answer {
                        name: name(&a.name),
                        rtype: Some(u16::from(a.rdata.type_code())),
                        ttl: a.ttl,
                        data: class_in_data(u16::from(a.class), data),
                    }
                })
                .collect(),
            authority: p.name_servers.len(),
            additional: p.additional_records.len(),
            // simple-dns keeps no DO bit.
            edns: p.opt().map(|o| (o.udp_packet_size, o.version, None)),
        })
    })
}

fn hickory_view(bytes: &[u8]) -> Outcome {
    guarded(|| {
        use hickory_proto::{
            op::{Message, MessageType},
            rr::{Name, RData},
        };
        let m = Message::from_vec(bytes).map_err(|e| format!("{e:?}"))?;
        let name = |n: &Name| canon_labels(n.iter());
        let h = &m.metadata;
        Ok(View {
            id: h.id,
            response: h.message_type == MessageType::Response,
            opcode: Some(u8::from(h.op_code)),
            flags: [
                h.authoritative,
                h.truncation,
                h.recursion_desired,
                h.recursion_available,
                h.authentic_data,
                h.checking_disabled,
            ],
            rcode: Some(u16::from(h.response_code)),
            questions: m
                .queries
                .iter()
                .map(|q| {
                    (
                        name(&q.name),
                        u16::from(q.query_type),
                        u16::from(q.query_class) & 0x7fff,
                    )
                })
                .collect(),
            answers: m
                .answers
                .iter()
                .map(|a| {
                    let data = match &a.data {
                        RData::A(r) => Data::A(r.0),
                        RData::AAAA(r) => Data::Aaaa(r.0),
                        RData::CNAME(r) => Data::Name(name(&r.0)),
                        RData::PTR(r) => Data::Name(name(&r.0)),
                        _ => Data::Other,
                    };
                    Answer {
                        name: name(&a.name),
                        rtype: Some(u16::from(a.record_type())),
                        ttl: a.ttl,
                        data: class_in_data(u16::from(a.dns_class), data),
                    }
                })
                .collect(),
            authority: m.authorities.len(),
            additional: m.additionals.len(),
            edns: m
                .edns
                .as_ref()
                .map(|e| (e.max_payload(), e.version(), Some(e.flags().dnssec_ok))),
        })
    })
}

thread_local! {
    static IN_CANDIDATE: Cell<bool> = const { Cell::new(false) };
    static PANIC_MESSAGE: RefCell<String> = const { RefCell::new(String::new()) };
}

/// Runs a candidate decoder, turning its panic into [`Outcome::Panicked`]. A panic anywhere
/// else still aborts the process, as libFuzzer expects.
fn guarded(f: impl FnOnce() -> Result<View, String>) -> Outcome {
    static HOOK: Once = Once::new();
    HOOK.call_once(|| {
        let fuzzer_hook = panic::take_hook();
        panic::set_hook(Box::new(move |info| {
            if IN_CANDIDATE.with(Cell::get) {
                let at = info
                    .location()
                    .map(|l| {
                        format!(
                            "{}:{}",
                            l.file().rsplit("/src/").next().unwrap_or(""),
                            l.line()
                        )
                    })
                    .unwrap_or_default();
                let msg = info
                    .payload()
                    .downcast_ref::<&str>()
                    .map(|s| s.to_string())
                    .or_else(|| info.payload().downcast_ref::<String>().cloned())
                    .unwrap_or_default();
                PANIC_MESSAGE.with(|m| *m.borrow_mut() = format!("{msg} at {at}"));
            } else {
                fuzzer_hook(info);
            }
        }));
    });
    IN_CANDIDATE.with(|c| c.set(true));
    let r = panic::catch_unwind(AssertUnwindSafe(f));
    IN_CANDIDATE.with(|c| c.set(false));
    match r {
        Ok(Ok(v)) => Outcome::Accepted(Box::new(v)),
        Ok(Err(e)) => Outcome::Rejected(error_kind(&e)),
        Err(_) => Outcome::Panicked(PANIC_MESSAGE.with(|m| m.borrow().clone())),
    }
}

/// Outcome counts and the first examples of each, rewritten to a file every few seconds and
/// when the process exits.
pub struct Tally {
    entries: BTreeMap<String, (u64, Vec<String>)>,
    last_write: Option<Instant>,
}

pub static TALLY: Mutex<Tally> = Mutex::new(Tally {
    entries: BTreeMap::new(),
    last_write: None,
});

const EXAMPLES: usize = 3;

impl Tally {
    pub fn add(&mut self, key: String, example: impl FnOnce() -> String) {
        let e = self.entries.entry(key).or_default();
        e.0 += 1;
        if e.1.len() < EXAMPLES {
            let example = example();
            if !e.1.contains(&example) {
                e.1.push(example);
            }
        }
    }

    pub fn maybe_write(&mut self) {
        if self
            .last_write
            .is_none_or(|t| t.elapsed() > Duration::from_secs(5))
        {
            self.write();
        }
    }

    pub fn write(&mut self) {
        self.last_write = Some(Instant::now());
        let Some(path) = std::env::var_os("DNS_DIFF_REPORT") else {
            return;
        };
        let mut s = String::new();
        for (key, (n, examples)) in &self.entries {
            let _ = writeln!(s, "{n:>10}  {key}");
            for e in examples {
                let _ = writeln!(s, "            e.g. {e}");
            }
        }
        let _ = std::fs::write(path, s);
    }
}

pub fn hex(bytes: &[u8]) -> String {
    let mut s = String::new();
    for b in bytes.iter().take(200) {
        let _ = write!(s, "{b:02x}");
    }
    if bytes.len() > 200 {
        s.push_str("...");
    }
    s
}

//! DNS messages decoded from captured payloads: header, flags, rcode (with the EDNS extended
//! bits), questions, answers (A, AAAA, CNAME, PTR decoded; other types by length), EDNS and
//! truncation. A small hand-written parser: dns-parser, simple-dns and hickory-proto were
//! fuzzed against it and none returns what a capture prefix holds (docs/dns.md).
//!
//! A payload may be a prefix of the datagram: sends and receives capture the first 512 bytes,
//! netfilter drops the first 64. [`parse`] needs the header and the question section whole
//! ([`DnsError`] otherwise); records cut by the capture end the answer with
//! [`Message::capture_cut`] set. [`header_and_question`] reads only as far as the first
//! question. Nothing here panics or allocates more than the payload justifies: every count is
//! checked against the datagram length and every compression pointer must point backwards.

use std::{
    borrow::Cow,
    fmt,
    net::{Ipv4Addr, Ipv6Addr},
};

use serde::{Serialize, Serializer};

/// Bytes in the fixed DNS header.
pub const HEADER_LEN: usize = 12;
/// The longest name on the wire, length bytes included (RFC 1035 §2.3.4).
const MAX_NAME_WIRE: usize = 255;
/// The smallest question: the root name, type and class.
const MIN_QUESTION: usize = 1 + 4;
/// The smallest record: the root name, type, class, TTL and RDLENGTH.
const MIN_RECORD: usize = 1 + 10;

/// Record type numbers this module decodes or names.
pub mod rtype {
    pub const A: u16 = 1;
    pub const NS: u16 = 2;
    pub const CNAME: u16 = 5;
    pub const SOA: u16 = 6;
    pub const PTR: u16 = 12;
    pub const MX: u16 = 15;
    pub const TXT: u16 = 16;
    pub const AAAA: u16 = 28;
    pub const SRV: u16 = 33;
    pub const OPT: u16 = 41;
    pub const DS: u16 = 43;
    pub const RRSIG: u16 = 46;
    pub const NSEC: u16 = 47;
    pub const DNSKEY: u16 = 48;
    pub const SVCB: u16 = 64;
    pub const HTTPS: u16 = 65;
    pub const ANY: u16 = 255;
    pub const CAA: u16 = 257;
}

/// The mnemonic of a record type, or `TYPE<n>` (RFC 3597 §5) for the others.
pub fn qtype_name(t: u16) -> Cow<'static, str> {
    let name = match t {
        rtype::A => "A",
        rtype::NS => "NS",
        rtype::CNAME => "CNAME",
        rtype::SOA => "SOA",
        rtype::PTR => "PTR",
        rtype::MX => "MX",
        rtype::TXT => "TXT",
        rtype::AAAA => "AAAA",
        rtype::SRV => "SRV",
        rtype::OPT => "OPT",
        rtype::DS => "DS",
        rtype::RRSIG => "RRSIG",
        rtype::NSEC => "NSEC",
        rtype::DNSKEY => "DNSKEY",
        rtype::SVCB => "SVCB",
        rtype::HTTPS => "HTTPS",
        rtype::ANY => "ANY",
        rtype::CAA => "CAA",
        n => return Cow::Owned(format!("TYPE{n}")),
    };
    Cow::Borrowed(name)
}

/// Record types serialize as their mnemonic (`"AAAA"`, `"TYPE65280"`).
fn serialize_rtype<S: Serializer>(t: &u16, s: S) -> Result<S::Ok, S::Error> {
    s.serialize_str(&qtype_name(*t))
}

/// A response code: the header's 4 bits, plus the 8 extended bits of an OPT record.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Rcode(pub u16);

impl Rcode {
    pub const NOERROR: Rcode = Rcode(0);
    pub const FORMERR: Rcode = Rcode(1);
    pub const SERVFAIL: Rcode = Rcode(2);
    pub const NXDOMAIN: Rcode = Rcode(3);
    pub const NOTIMP: Rcode = Rcode(4);
    pub const REFUSED: Rcode = Rcode(5);
    pub const BADVERS: Rcode = Rcode(16);

    /// The name dig prints (`NOERROR`, `NXDOMAIN`, ...), or `RCODE<n>`.
    pub fn name(self) -> Cow<'static, str> {
        let name = match self.0 {
            0 => "NOERROR",
            1 => "FORMERR",
            2 => "SERVFAIL",
            3 => "NXDOMAIN",
            4 => "NOTIMP",
            5 => "REFUSED",
            6 => "YXDOMAIN",
            7 => "YXRRSET",
            8 => "NXRRSET",
            9 => "NOTAUTH",
            10 => "NOTZONE",
            16 => "BADVERS",
            23 => "BADCOOKIE",
            n => return Cow::Owned(format!("RCODE{n}")),
        };
        Cow::Borrowed(name)
    }
}

impl fmt::Display for Rcode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.name())
    }
}

impl Serialize for Rcode {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&self.name())
    }
}

/// The header flags other than QR (see [`Message::response`]).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
pub struct Flags {
    /// Authoritative answer.
    pub aa: bool,
    /// Truncated: the answer did not fit, and the client should retry over TCP.
    pub tc: bool,
    /// Recursion desired.
    pub rd: bool,
    /// Recursion available.
    pub ra: bool,
    /// Authentic data (DNSSEC-validated, or "I understand AD" in a query).
    pub ad: bool,
    /// Checking disabled.
    pub cd: bool,
}

impl Flags {
    fn from_bits(bits: u16) -> Self {
        let bit = |n: u16| bits & (1 << n) != 0;
        Flags {
            aa: bit(10),
            tc: bit(9),
            rd: bit(8),
            ra: bit(7),
            ad: bit(5),
            cd: bit(4),
        }
    }
}

impl fmt::Display for Flags {
    /// The set flags in dig's order and spelling (`aa rd ra`), or nothing.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let all = [
            (self.aa, "aa"),
            (self.tc, "tc"),
            (self.rd, "rd"),
            (self.ra, "ra"),
            (self.ad, "ad"),
            (self.cd, "cd"),
        ];
        let mut first = true;
        for (_, name) in all.iter().filter(|(set, _)| *set) {
            if !first {
                f.write_str(" ")?;
            }
            f.write_str(name)?;
            first = false;
        }
        Ok(())
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Question {
    /// The name as sent (case kept: resolvers may randomize it), without the trailing dot;
    /// the root is `"."`. Bytes other than letters, digits and punctuation are escaped as
    /// dig does (`\032`, `\.` for a dot inside a label).
    pub name: String,
    #[serde(serialize_with = "serialize_rtype")]
    pub qtype: u16,
    pub qclass: u16,
}

impl Question {
    /// Whether this asks for `name` (ASCII case-insensitive; a trailing dot is ignored).
    pub fn is_for(&self, name: &str) -> bool {
        same_name(&self.name, name)
    }
}

/// Compares two names as DNS does: ASCII case-insensitive, trailing dot ignored.
pub fn same_name(a: &str, b: &str) -> bool {
    fn key(s: &str) -> &str {
        match s {
            "." => s,
            s => s.strip_suffix('.').unwrap_or(s),
        }
    }
    key(a).eq_ignore_ascii_case(key(b))
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Record {
    pub name: String,
    #[serde(serialize_with = "serialize_rtype")]
    pub rtype: u16,
    pub ttl: u32,
    /// Serialized as text: the address, the target name, or `"<n> bytes"`.
    pub data: RData,
}

/// The data of an answer record, decoded for the types a DNS timeline needs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RData {
    A(Ipv4Addr),
    Aaaa(Ipv6Addr),
    Cname(String),
    Ptr(String),
    /// Any other type, a class other than IN, or no data: only its length.
    Other {
        len: u16,
    },
}

impl fmt::Display for RData {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            RData::A(a) => write!(f, "{a}"),
            RData::Aaaa(a) => write!(f, "{a}"),
            RData::Cname(n) | RData::Ptr(n) => f.write_str(n),
            RData::Other { len } => write!(f, "{len} bytes"),
        }
    }
}

impl Serialize for RData {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

/// EDNS(0) parameters from the OPT pseudo-record (RFC 6891).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct Edns {
    /// The largest UDP payload the sender can receive.
    pub udp_size: u16,
    pub version: u8,
    /// DNSSEC OK: the sender wants DNSSEC records.
    pub dnssec_ok: bool,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Message {
    pub id: u16,
    /// A response (QR bit set).
    pub response: bool,
    /// 0 for a standard query.
    pub opcode: u8,
    /// The header rcode, extended by the OPT record's upper bits when there is one.
    pub rcode: Rcode,
    pub flags: Flags,
    pub questions: Vec<Question>,
    /// The answer records decoded: all of them unless `capture_cut`.
    pub answers: Vec<Record>,
    /// Answer records the header counts.
    pub answer_count: u16,
    /// Authority records the header counts (walked, not kept).
    pub authority: u16,
    /// Additional records the header counts, the OPT record included.
    pub additional: u16,
    /// `None` when there is no OPT record (or it was past the capture: see `capture_cut`).
    pub edns: Option<Edns>,
    /// The capture ended inside the records: `answers` (and `edns`) hold only what it kept.
    pub capture_cut: bool,
}

/// The header and first question: all a 64-byte drop capture is sure to hold.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Head {
    pub id: u16,
    pub response: bool,
    pub opcode: u8,
    /// The header's 4 bits only (the extended bits live in the OPT record, at the end).
    pub rcode: Rcode,
    pub flags: Flags,
    /// The first question; `None` when the header counts none.
    pub question: Option<Question>,
}

/// A record section, for errors.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Section {
    Answer,
    Authority,
    Additional,
}

impl fmt::Display for Section {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Section::Answer => "answer",
            Section::Authority => "authority",
            Section::Additional => "additional",
        })
    }
}

/// Why a payload is not a DNS message we can report. Byte offsets count from the start of
/// the UDP payload.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DnsError {
    #[error("{len} bytes is shorter than the {HEADER_LEN}-byte DNS header")]
    ShortHeader { len: usize },
    /// `full`: the datagram's length, when known and longer than the capture.
    #[error("the payload ends at byte {at}, inside the question section{}", kept(*at, *full))]
    TruncatedQuestion { at: usize, full: Option<usize> },
    #[error(
        "the datagram ends at byte {at} inside {section} record {index} of {count}: \
         the header counts more records than were sent"
    )]
    TruncatedRecord {
        section: Section,
        index: u16,
        count: u16,
        at: usize,
    },
    #[error("label type 0x{byte:02x} at byte {at} is neither a plain label nor a pointer")]
    BadLabel { at: usize, byte: u8 },
    #[error(
        "the compression pointer at byte {at} points to byte {target}, not before the name \
         it continues (a loop, or a corrupt message)"
    )]
    CompressionLoop { at: usize, target: usize },
    #[error("the name at byte {at} is longer than {MAX_NAME_WIRE} bytes")]
    NameTooLong { at: usize },
    #[error(
        "the header counts {questions} questions and {records} records, more than fit in a \
         {len}-byte datagram"
    )]
    TooManyRecords {
        questions: u16,
        records: u32,
        len: usize,
    },
    #[error(
        "{section} record {index} ({rtype}) has {len} bytes of data where its type needs \
         {expected}",
        rtype = qtype_name(*rtype)
    )]
    BadRdata {
        section: Section,
        index: u16,
        rtype: u16,
        len: u16,
        expected: &'static str,
    },
    #[error("more than one OPT (EDNS) record (RFC 6891 §6.1.1)")]
    DuplicateOpt,
}

fn kept(at: usize, full: Option<usize>) -> String {
    match full {
        Some(full) if full > at => format!(" (the capture kept {at} of {full} bytes)"),
        _ => String::new(),
    }
}

/// Decodes the DNS message whose first bytes are `payload`; `full_len` is the datagram's
/// length (the capture's `payload_len`; a value below `payload.len()` counts as
/// `payload.len()`).
pub fn parse(payload: &[u8], full_len: usize) -> Result<Message, DnsError> {
    let full = full_len.max(payload.len());
    let h = RawHeader::read(payload)?;
    let records = u32::from(h.ancount) + u32::from(h.nscount) + u32::from(h.arcount);
    let needed = HEADER_LEN + usize::from(h.qdcount) * MIN_QUESTION + records as usize * MIN_RECORD;
    if needed > full {
        return Err(DnsError::TooManyRecords {
            questions: h.qdcount,
            records,
            len: full,
        });
    }

    let mut r = Reader {
        buf: payload,
        pos: HEADER_LEN,
    };
    let mut questions = Vec::new();
    for _ in 0..h.qdcount {
        questions.push(read_question(&mut r, Some(full))?);
    }

    let mut msg = Message {
        id: h.id,
        response: h.response(),
        opcode: h.opcode(),
        rcode: Rcode(h.flags & 0xf),
        flags: Flags::from_bits(h.flags),
        questions,
        answers: Vec::new(),
        answer_count: h.ancount,
        authority: h.nscount,
        additional: h.arcount,
        edns: None,
        capture_cut: false,
    };
    let sections = [
        (Section::Answer, h.ancount),
        (Section::Authority, h.nscount),
        (Section::Additional, h.arcount),
    ];
    for (section, count) in sections {
        for index in 0..count {
            let rec = match read_record(&mut r) {
                Ok(rec) => rec,
                Err(Fail::End) if payload.len() < full => {
                    msg.capture_cut = true;
                    return Ok(msg);
                }
                Err(Fail::End) => {
                    return Err(DnsError::TruncatedRecord {
                        section,
                        index,
                        count,
                        at: payload.len(),
                    })
                }
                Err(Fail::Bad(e)) => return Err(e),
            };
            let rdata = &payload[rec.rdata.clone()];
            let bad = |expected| DnsError::BadRdata {
                section,
                index,
                rtype: rec.rtype,
                len: rdata.len() as u16,
                expected,
            };
            match section {
                Section::Answer => {
                    // Class IN, with or without mDNS's cache-flush bit, and some data: empty
                    // records and other classes are what dynamic updates (RFC 2136) put in
                    // this section, and are not decoded.
                    let data = match rec.rtype {
                        _ if rec.class & 0x7fff != 1 || rdata.is_empty() => RData::Other {
                            len: rdata.len() as u16,
                        },
                        rtype::A => RData::A(Ipv4Addr::from(
                            <[u8; 4]>::try_from(rdata).map_err(|_| bad("4"))?,
                        )),
                        rtype::AAAA => RData::Aaaa(Ipv6Addr::from(
                            <[u8; 16]>::try_from(rdata).map_err(|_| bad("16"))?,
                        )),
                        rtype::CNAME | rtype::PTR => {
                            let name = rdata_name(payload, rec.rdata.clone())
                                .map_err(|e| e.unwrap_or_else(|| bad("exactly one name")))?;
                            if rec.rtype == rtype::CNAME {
                                RData::Cname(name)
                            } else {
                                RData::Ptr(name)
                            }
                        }
                        _ => RData::Other {
                            len: rdata.len() as u16,
                        },
                    };
                    msg.answers.push(Record {
                        name: rec.name,
                        rtype: rec.rtype,
                        ttl: rec.ttl,
                        data,
                    });
                }
                Section::Additional if rec.rtype == rtype::OPT => {
                    if msg.edns.is_some() {
                        return Err(DnsError::DuplicateOpt);
                    }
                    let ext = (rec.ttl >> 24) as u16;
                    msg.rcode = Rcode(ext << 4 | msg.rcode.0);
                    msg.edns = Some(Edns {
                        udp_size: rec.class,
                        version: (rec.ttl >> 16) as u8,
                        dnssec_ok: rec.ttl & 0x8000 != 0,
                    });
                }
                _ => {}
            }
        }
    }
    Ok(msg)
}

/// Decodes the header and the first question of `payload`, which may stop anywhere after
/// that question (a 64-byte drop capture); the rest is not looked at.
pub fn header_and_question(payload: &[u8]) -> Result<Head, DnsError> {
    let h = RawHeader::read(payload)?;
    let mut r = Reader {
        buf: payload,
        pos: HEADER_LEN,
    };
    let question = if h.qdcount > 0 {
        Some(read_question(&mut r, None)?)
    } else {
        None
    };
    Ok(Head {
        id: h.id,
        response: h.response(),
        opcode: h.opcode(),
        rcode: Rcode(h.flags & 0xf),
        flags: Flags::from_bits(h.flags),
        question,
    })
}

struct RawHeader {
    id: u16,
    flags: u16,
    qdcount: u16,
    ancount: u16,
    nscount: u16,
    arcount: u16,
}

impl RawHeader {
    fn read(payload: &[u8]) -> Result<Self, DnsError> {
        let Some(h) = payload.get(..HEADER_LEN) else {
            return Err(DnsError::ShortHeader { len: payload.len() });
        };
        let word = |i: usize| u16::from_be_bytes([h[i], h[i + 1]]);
        Ok(RawHeader {
            id: word(0),
            flags: word(2),
            qdcount: word(4),
            ancount: word(6),
            nscount: word(8),
            arcount: word(10),
        })
    }

    fn response(&self) -> bool {
        self.flags & 0x8000 != 0
    }

    fn opcode(&self) -> u8 {
        ((self.flags >> 11) & 0xf) as u8
    }
}

/// Why a read stopped: the bytes ran out (what that means depends on where), or the message
/// is malformed.
enum Fail {
    End,
    Bad(DnsError),
}

impl From<DnsError> for Fail {
    fn from(e: DnsError) -> Self {
        Fail::Bad(e)
    }
}

struct Reader<'a> {
    buf: &'a [u8],
    pos: usize,
}

impl Reader<'_> {
    fn bytes<const N: usize>(&mut self) -> Result<[u8; N], Fail> {
        let end = self.pos.checked_add(N).ok_or(Fail::End)?;
        let b = self.buf.get(self.pos..end).ok_or(Fail::End)?;
        self.pos = end;
        // The slice is N bytes long by construction.
        b.try_into().map_err(|_| Fail::End)
    }

    fn u16(&mut self) -> Result<u16, Fail> {
        self.bytes::<2>().map(u16::from_be_bytes)
    }

    fn u32(&mut self) -> Result<u32, Fail> {
        self.bytes::<4>().map(u32::from_be_bytes)
    }

    fn name(&mut self) -> Result<String, Fail> {
        let (name, end) = read_name(self.buf, self.pos)?;
        self.pos = end;
        Ok(name)
    }
}

fn read_question(r: &mut Reader<'_>, full: Option<usize>) -> Result<Question, DnsError> {
    let cut = |r: &Reader<'_>| DnsError::TruncatedQuestion {
        at: r.buf.len(),
        full,
    };
    let fields = |r: &mut Reader<'_>| -> Result<Question, Fail> {
        let name = r.name()?;
        let qtype = r.u16()?;
        let qclass = r.u16()?;
        Ok(Question {
            name,
            qtype,
            qclass,
        })
    };
    match fields(r) {
        Ok(q) => Ok(q),
        Err(Fail::End) => Err(cut(r)),
        Err(Fail::Bad(e)) => Err(e),
    }
}

struct RawRecord {
    name: String,
    rtype: u16,
    class: u16,
    ttl: u32,
    rdata: std::ops::Range<usize>,
}

fn read_record(r: &mut Reader<'_>) -> Result<RawRecord, Fail> {
    let name = r.name()?;
    let rtype = r.u16()?;
    let class = r.u16()?;
    let ttl = r.u32()?;
    let len = usize::from(r.u16()?);
    let start = r.pos;
    let end = start + len;
    if end > r.buf.len() {
        return Err(Fail::End);
    }
    r.pos = end;
    Ok(RawRecord {
        name,
        rtype,
        class,
        ttl,
        rdata: start..end,
    })
}

/// The name that must fill `rdata` exactly. `Err(None)`: it does not.
fn rdata_name(payload: &[u8], rdata: std::ops::Range<usize>) -> Result<String, Option<DnsError>> {
    // Pointers only lead backwards, so the message up to the end of the data is enough, and
    // running out of it means the name overruns the data.
    match read_name(&payload[..rdata.end], rdata.start) {
        Ok((name, end)) if end == rdata.end => Ok(name),
        Ok(_) | Err(Fail::End) => Err(None),
        Err(Fail::Bad(e)) => Err(Some(e)),
    }
}

/// Reads the (possibly compressed) name at `start`; returns it and the offset just past its
/// bytes at `start`. Every pointer must lead before the start of the labels it ends, so the
/// targets strictly decrease and the walk ends.
fn read_name(buf: &[u8], start: usize) -> Result<(String, usize), Fail> {
    let mut name = String::new();
    let mut pos = start;
    // Where the labels being read began: a pointer must lead before it.
    let mut segment = start;
    // Just past the name's own bytes, fixed at the first pointer.
    let mut end = None;
    let mut wire = 1; // the root label
    loop {
        let len = *buf.get(pos).ok_or(Fail::End)?;
        match len & 0xc0 {
            0x00 if len == 0 => {
                let end = end.unwrap_or(pos + 1);
                if name.is_empty() {
                    name.push('.');
                }
                return Ok((name, end));
            }
            0x00 => {
                let label = buf
                    .get(pos + 1..pos + 1 + usize::from(len))
                    .ok_or(Fail::End)?;
                wire += 1 + label.len();
                if wire > MAX_NAME_WIRE {
                    return Err(DnsError::NameTooLong { at: start }.into());
                }
                if !name.is_empty() {
                    name.push('.');
                }
                push_label(&mut name, label);
                pos += 1 + label.len();
            }
            0xc0 => {
                let low = *buf.get(pos + 1).ok_or(Fail::End)?;
                let target = usize::from(u16::from_be_bytes([len & 0x3f, low]));
                if target >= segment {
                    return Err(DnsError::CompressionLoop { at: pos, target }.into());
                }
                end.get_or_insert(pos + 2);
                segment = target;
                pos = target;
            }
            _ => return Err(DnsError::BadLabel { at: pos, byte: len }.into()),
        }
    }
}

/// Appends a label in presentation format (RFC 4343 §2.1), as dig prints it.
fn push_label(name: &mut String, label: &[u8]) {
    for &b in label {
        match b {
            b'.' | b'\\' => {
                name.push('\\');
                name.push(char::from(b));
            }
            0x21..=0x7e => name.push(char::from(b)),
            _ => {
                name.push('\\');
                name.push_str(&format!("{b:03}"));
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;

    fn hex(s: &str) -> Vec<u8> {
        let s: String = s.split_whitespace().collect();
        (0..s.len())
            .step_by(2)
            .map(|i| u8::from_str_radix(&s[i..i + 2], 16).unwrap())
            .collect()
    }

    /// `getent ahosts www.example.test` with `options edns0 trust-ad` (glibc 2.36): RD and
    /// AD set, EDNS with a 1200-byte UDP size, no options.
    const GLIBC_QUERY: &str = "7b61 0120 0001 0000 0000 0001
        03777777 076578616d706c65 0474657374 00 0001 0001
        00 0029 04b0 00000000 0000";

    /// dnsmasq 2.89's answer to the A query above: www -> web -> host CNAME chain and the
    /// address, owner names compressed (c00c, c02e, c04c), EDNS 1232.
    const DNSMASQ_CNAME_CHAIN: &str = "d213 8580 0001 0003 0000 0001
        03777777076578616d706c65047465737400 0001 0001
        c00c 0005 0001 00000000 0012 03776562076578616d706c650474657374 00
        c02e 0005 0001 00000000 0013 04686f7374076578616d706c650474657374 00
        c04c 0001 0001 00000000 0004 0a010203
        00 0029 04d0 00000000 0000";

    /// dnsmasq in authoritative mode: nope.auth.test does not exist; SOA in authority.
    const DNSMASQ_NXDOMAIN_SOA: &str = "bbff 8503 0001 0000 0001 0001
        046e6f706504617574680474657374 00 0001 0001
        04617574680474657374 00 0006 0001 00000258 003b
        026e7304617574680474657374 00
        0a686f73746d6173746572026e7304617574680474657374 00
        6b034ca8 000004b0 000000b4 00127500 00000258
        00 0029 04d0 00000000 0000";

    /// dig -x 10.1.2.3 answered by dnsmasq: a PTR whose owner is a pointer to the question.
    const DNSMASQ_PTR: &str = "9efc 8580 0001 0001 0000 0001
        0133013201310231300769 6e2d61646472 0461727061 00 000c 0001
        c00c 000c 0001 00000000 0013 04686f7374076578616d706c650474657374 00
        00 0029 04d0 00000000 0000";

    /// `dig +dnssec www.example.test` (DO bit) and a hand-made answer whose CNAME target is
    /// compressed *inside the data* and whose OPT carries extended rcode 1 (BADVERS, 16).
    const COMPRESSED_RDATA_BADVERS: &str = "4242 8180 0001 0002 0000 0001
        03777777 076578616d706c65 0474657374 00 0001 0001
        c00c 0005 0001 0000012c 0006 03 776562 c010
        c02e 0001 0001 0000012c 0004 0a010203
        00 0029 1000 01008000 0000";

    #[test]
    fn glibc_query_with_edns() {
        let bytes = hex(GLIBC_QUERY);
        let m = parse(&bytes, bytes.len()).unwrap();
        assert_eq!(m.id, 0x7b61);
        assert!(!m.response);
        assert_eq!(m.opcode, 0);
        assert_eq!(
            m.flags,
            Flags {
                rd: true,
                ad: true,
                ..Flags::default()
            }
        );
        assert_eq!(
            m.questions,
            vec![Question {
                name: "www.example.test".into(),
                qtype: rtype::A,
                qclass: 1,
            }]
        );
        assert_eq!(
            m.edns,
            Some(Edns {
                udp_size: 1200,
                version: 0,
                dnssec_ok: false
            })
        );
        assert_eq!((m.answer_count, m.authority, m.additional), (0, 0, 1));
        assert!(!m.capture_cut);
    }

    #[test]
    fn dnsmasq_cname_chain() {
        let bytes = hex(DNSMASQ_CNAME_CHAIN);
        let m = parse(&bytes, bytes.len()).unwrap();
        assert!(m.response);
        assert_eq!(m.rcode, Rcode::NOERROR);
        assert!(m.flags.aa && m.flags.rd && m.flags.ra && !m.flags.tc);
        let answers: Vec<(&str, u16, String)> = m
            .answers
            .iter()
            .map(|a| (a.name.as_str(), a.rtype, a.data.to_string()))
            .collect();
        assert_eq!(
            answers,
            [
                ("www.example.test", rtype::CNAME, "web.example.test".into()),
                ("web.example.test", rtype::CNAME, "host.example.test".into()),
                ("host.example.test", rtype::A, "10.1.2.3".into()),
            ]
        );
        assert_eq!(m.answers[2].data, RData::A(Ipv4Addr::new(10, 1, 2, 3)));
        assert_eq!(m.edns.map(|e| e.udp_size), Some(1232));
    }

    #[test]
    fn nxdomain_with_soa_in_authority() {
        let bytes = hex(DNSMASQ_NXDOMAIN_SOA);
        let m = parse(&bytes, bytes.len()).unwrap();
        assert_eq!(m.rcode, Rcode::NXDOMAIN);
        assert_eq!(m.rcode.name(), "NXDOMAIN");
        assert!(m.answers.is_empty());
        assert_eq!((m.answer_count, m.authority, m.additional), (0, 1, 1));
        assert!(m.questions[0].is_for("NOPE.auth.test."));
        assert!(m.edns.is_some());
    }

    #[test]
    fn ptr_answer() {
        let bytes = hex(DNSMASQ_PTR);
        let m = parse(&bytes, bytes.len()).unwrap();
        assert_eq!(m.questions[0].name, "3.2.1.10.in-addr.arpa");
        assert_eq!(qtype_name(m.questions[0].qtype), "PTR");
        assert_eq!(m.answers[0].name, "3.2.1.10.in-addr.arpa");
        assert_eq!(m.answers[0].data, RData::Ptr("host.example.test".into()));
    }

    #[test]
    fn pointer_inside_rdata_and_extended_rcode() {
        let bytes = hex(COMPRESSED_RDATA_BADVERS);
        let m = parse(&bytes, bytes.len()).unwrap();
        assert_eq!(m.answers[0].data, RData::Cname("web.example.test".into()));
        assert_eq!(m.answers[0].ttl, 300);
        assert_eq!(m.answers[1].name, "web.example.test");
        assert_eq!(m.rcode, Rcode::BADVERS);
        assert_eq!(
            m.edns,
            Some(Edns {
                udp_size: 4096,
                version: 0,
                dnssec_ok: true
            })
        );
    }

    #[test]
    fn aaaa_and_serialized_shape() {
        // dnsmasq's AAAA answer for host.example.test.
        let bytes = hex("4c37 8580 0001 0001 0000 0001
            04686f7374076578616d706c650474657374 00 001c 0001
            c00c 001c 0001 00000000 0010 fd000000000000000000000000000003
            00 0029 04d0 00000000 0000");
        let m = parse(&bytes, bytes.len()).unwrap();
        let v = serde_json::to_value(&m).unwrap();
        assert_eq!(v["questions"][0]["qtype"], "AAAA");
        assert_eq!(v["questions"][0]["name"], "host.example.test");
        assert_eq!(v["answers"][0]["rtype"], "AAAA");
        assert_eq!(v["answers"][0]["data"], "fd00::3");
        assert_eq!(v["rcode"], "NOERROR");
        assert_eq!(v["flags"]["aa"], true);
        assert_eq!(v["edns"]["udp_size"], 1232);
        assert_eq!(v["capture_cut"], false);
    }

    #[test]
    fn capture_cut_keeps_what_was_captured() {
        let bytes = hex(DNSMASQ_CNAME_CHAIN);
        // Header + question (34 bytes) + the first CNAME record (2+10+18 bytes).
        let m = parse(&bytes[..64 + 5], bytes.len()).unwrap();
        assert!(m.capture_cut);
        assert_eq!(m.answer_count, 3);
        assert_eq!(m.answers.len(), 1);
        assert_eq!(m.answers[0].data, RData::Cname("web.example.test".into()));
        assert_eq!(m.edns, None);
        // The same bytes as a whole datagram: the header lies about its counts.
        assert!(matches!(
            parse(&bytes[..69], 69),
            Err(DnsError::TruncatedRecord {
                section: Section::Answer,
                index: 1,
                count: 3,
                at: 69
            })
        ));
    }

    #[test]
    fn every_prefix_is_an_error_or_capture_cut() {
        for msg in [
            GLIBC_QUERY,
            DNSMASQ_CNAME_CHAIN,
            DNSMASQ_NXDOMAIN_SOA,
            DNSMASQ_PTR,
            COMPRESSED_RDATA_BADVERS,
        ] {
            let bytes = hex(msg);
            let whole = parse(&bytes, bytes.len()).unwrap();
            let question_end = 12 + whole.questions[0].name.len() + 2 + 4;
            for n in 0..bytes.len() {
                match parse(&bytes[..n], bytes.len()) {
                    Err(DnsError::ShortHeader { len }) => assert!(len == n && n < 12),
                    Err(DnsError::TruncatedQuestion { at, full }) => {
                        assert!((12..question_end).contains(&n) && at == n);
                        assert_eq!(full, Some(bytes.len()));
                    }
                    Ok(m) => {
                        assert!(n >= question_end, "{n}: {m:?}");
                        assert!(m.capture_cut, "{n}: {m:?}");
                        assert_eq!(m.questions, whole.questions);
                        assert!(whole.answers.starts_with(&m.answers));
                    }
                    Err(e) => panic!("{msg}: prefix of {n} bytes: {e}"),
                }
                // As a whole datagram, a prefix is never accepted (every message above
                // has records after its question).
                assert!(parse(&bytes[..n], n).is_err(), "{msg}: {n}");
            }
        }
    }

    #[test]
    fn header_and_question_reads_a_drop_capture() {
        let bytes = hex(DNSMASQ_CNAME_CHAIN);
        let h = header_and_question(&bytes[..34]).unwrap();
        assert_eq!(h.id, 0xd213);
        assert!(h.response);
        assert_eq!(h.rcode, Rcode::NOERROR);
        assert_eq!(h.question.unwrap().name, "www.example.test");
        // 64 bytes, as netfilter drops capture: cut inside the records.
        assert!(header_and_question(&bytes[..64]).is_ok());
        assert_eq!(
            header_and_question(&bytes[..33]),
            Err(DnsError::TruncatedQuestion { at: 33, full: None })
        );
        assert_eq!(
            parse(&bytes[..33], 120).unwrap_err().to_string(),
            "the payload ends at byte 33, inside the question section \
             (the capture kept 33 of 120 bytes)"
        );
        assert!(matches!(
            header_and_question(&bytes[..11]),
            Err(DnsError::ShortHeader { len: 11 })
        ));
        let mut none = bytes[..12].to_vec();
        none[5] = 0;
        assert_eq!(header_and_question(&none).unwrap().question, None);
    }

    #[test]
    fn pointer_loops_are_errors() {
        // The question name is a pointer to itself.
        let own = hex("0001 0100 0001 0000 0000 0000 c00c 0001 0001");
        assert_eq!(
            parse(&own, own.len()),
            Err(DnsError::CompressionLoop { at: 12, target: 12 })
        );
        // A forward pointer: label "a" at 12, then a pointer to byte 16, which points back.
        let ring = hex("0001 0100 0001 0000 0000 0000 01 61 c010 c00c 0001 0001");
        assert!(matches!(
            parse(&ring, ring.len()),
            Err(DnsError::CompressionLoop { at: 14, target: 16 })
        ));
        // Backwards, but into the middle of the label sequence already read: 12 "a" 14 -> 12.
        let back = hex("0001 0100 0001 0000 0000 0000 01 61 c00c 0001 0001");
        assert!(matches!(
            parse(&back, back.len()),
            Err(DnsError::CompressionLoop { at: 14, target: 12 })
        ));
    }

    #[test]
    fn malformed_messages_are_typed_errors() {
        // Extended label type 0x40.
        let ext = hex("0001 0100 0001 0000 0000 0000 41 00 0001 0001");
        assert_eq!(
            parse(&ext, ext.len()),
            Err(DnsError::BadLabel { at: 12, byte: 0x41 })
        );
        // 5 labels of 63 bytes: 320 bytes on the wire.
        let mut long = hex("0001 0100 0001 0000 0000 0000");
        for _ in 0..5 {
            long.push(63);
            long.extend([b'x'; 63]);
        }
        long.extend(hex("00 0001 0001"));
        assert_eq!(
            parse(&long, long.len()),
            Err(DnsError::NameTooLong { at: 12 })
        );
        // 65535 answers claimed in a 27-byte datagram.
        let many = hex("0001 8180 0001 ffff 0000 0000 01 61 00 0001 0001 0000000000000000");
        assert!(matches!(
            parse(&many, many.len()),
            Err(DnsError::TooManyRecords { records: 65535, .. })
        ));
        // An A record with 3 bytes of data.
        let short_a = hex("0001 8180 0000 0001 0000 0000 00 0001 0001 00000000 0003 0a0102");
        assert_eq!(
            parse(&short_a, short_a.len()),
            Err(DnsError::BadRdata {
                section: Section::Answer,
                index: 0,
                rtype: rtype::A,
                len: 3,
                expected: "4"
            })
        );
        // A CNAME whose name is shorter than its data.
        let cname = hex("0001 8180 0000 0001 0000 0000 00 0005 0001 00000000 0003 01 61 00");
        assert!(parse(&cname, cname.len()).is_ok());
        let cname = hex("0001 8180 0000 0001 0000 0000 00 0005 0001 00000000 0004 01 61 00 00");
        assert!(matches!(
            parse(&cname, cname.len()),
            Err(DnsError::BadRdata { .. })
        ));
        // Dynamic update (opcode 5): "delete the PTR RRset", class ANY, no data.
        let update = hex("0001 2800 0000 0001 0000 0000 00 000c 00ff 00000000 0000");
        let m = parse(&update, update.len()).unwrap();
        assert_eq!(m.opcode, 5);
        assert_eq!(m.answers[0].data, RData::Other { len: 0 });
        // Found by the differential fuzzer (docs/dns.md): an update whose prerequisite is
        // "a CNAME exists" (class IN, no data), which simple-dns and hickory-proto accept.
        let update = hex("5540 2e00 0000 0001 0000 0000 00 0005 0001 00000000 0000");
        let m = parse(&update, update.len()).unwrap();
        assert_eq!(m.answers[0].data, RData::Other { len: 0 });
        // mDNS: class IN with the cache-flush bit.
        let mdns = hex("0000 8400 0000 0001 0000 0000 00 0001 8001 00000078 0004 c0a80001");
        let m = parse(&mdns, mdns.len()).unwrap();
        assert_eq!(m.answers[0].data, RData::A(Ipv4Addr::new(192, 168, 0, 1)));
        // Two OPT records.
        let two = hex("0001 0100 0000 0000 0000 0002 00 0029 0200 00000000 0000
            00 0029 0200 00000000 0000");
        assert_eq!(parse(&two, two.len()), Err(DnsError::DuplicateOpt));
        assert_eq!(parse(b"", 0), Err(DnsError::ShortHeader { len: 0 }));
    }

    #[test]
    fn names_are_escaped_like_dig() {
        let bytes = hex("0001 0100 0001 0000 0000 0000 03 612e62 02 5c20 00 0001 0001");
        let m = parse(&bytes, bytes.len()).unwrap();
        assert_eq!(m.questions[0].name, r"a\.b.\\\032");
        let root = hex("0001 0100 0001 0000 0000 0000 00 0002 0001");
        assert_eq!(parse(&root, root.len()).unwrap().questions[0].name, ".");
    }

    #[test]
    fn names_and_codes() {
        assert_eq!(qtype_name(65), "HTTPS");
        assert_eq!(qtype_name(65280), "TYPE65280");
        assert_eq!(Rcode(2).name(), "SERVFAIL");
        assert_eq!(Rcode(4000).to_string(), "RCODE4000");
        assert!(same_name("Example.COM.", "example.com"));
        assert!(!same_name("example.co", "example.com"));
        assert_eq!(
            Flags::from_bits(0x85b0).to_string(),
            "aa rd ra ad cd",
            "QR and the opcode are not flags"
        );
    }

    proptest! {
        #[test]
        fn random_bytes_never_panic(
            bytes in proptest::collection::vec(any::<u8>(), 0..600),
            extra in 0usize..1000,
        ) {
            let _ = parse(&bytes, bytes.len() + extra);
            let _ = parse(&bytes, 0);
            let _ = header_and_question(&bytes);
        }

        #[test]
        fn mutated_real_messages_never_panic(
            which in 0usize..5,
            edits in proptest::collection::vec((any::<usize>(), any::<u8>()), 1..8),
            cut in any::<usize>(),
        ) {
            let msg = [
                GLIBC_QUERY,
                DNSMASQ_CNAME_CHAIN,
                DNSMASQ_NXDOMAIN_SOA,
                DNSMASQ_PTR,
                COMPRESSED_RDATA_BADVERS,
            ][which];
            let mut bytes = hex(msg);
            let full = bytes.len();
            for (at, b) in edits {
                let i = at % bytes.len();
                bytes[i] = b;
            }
            let n = cut % (full + 1);
            if let Ok(m) = parse(&bytes[..n], full) {
                prop_assert!(m.answers.len() <= usize::from(m.answer_count));
                prop_assert!(m.capture_cut || m.answers.len() == usize::from(m.answer_count));
            }
            let _ = header_and_question(&bytes[..n]);
        }
    }
}

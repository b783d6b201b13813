//! A recorded run as a pcapng file (draft-ietf-opsawg-pcapng), for Wireshark and tshark.
//!
//! The tracer keeps the 5-tuple and the first bytes of each packet's transport payload,
//! not the packet itself, so the IP and transport headers are synthesized around the
//! captured payload: IPv4 (header checksum computed) or IPv6, then UDP, or a minimal TCP
//! header for TCP drops. The interface is `LINKTYPE_RAW` (101: the packet starts at the IP
//! header) with nanosecond timestamps. A packet cut by the capture has a captured length
//! below its original length, as a snaplen-limited capture would. Each packet carries a
//! comment: who sent the DNS message and what became of it (its lookup, attempt and
//! conntrack fate), or the verdict of a netfilter drop.
//!
//! One section, one interface, little-endian, every block and option padded to 32 bits.

use std::{
    collections::HashMap,
    io::{self, Write},
    net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr},
    sync::Arc,
    time::UNIX_EPOCH,
};

use tracer_common::{DNS_PAYLOAD_CAP, DROP_PAYLOAD_CAP};

use crate::{
    dns,
    events::{DnsEvent, Event, NfDropEvent},
    lookups::{Lookup, Query},
    output::Clock,
    pods::Workload,
    verdict::Finding,
};

/// What [`write`] wrote.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct PcapStats {
    /// Enhanced Packet Blocks written.
    pub packets: u64,
    /// Of them, DNS messages sent or received.
    pub dns: u64,
    /// Of them, packets netfilter dropped.
    pub drops: u64,
    /// Packets that carry a comment.
    pub commented: u64,
}

const BLOCK_SHB: u32 = 0x0A0D_0D0A;
const BLOCK_IDB: u32 = 0x0000_0001;
const BLOCK_EPB: u32 = 0x0000_0006;
const BYTE_ORDER_MAGIC: u32 = 0x1A2B_3C4D;

/// Raw IPv4/IPv6 packets, no link-layer header.
const LINKTYPE_RAW: u16 = 101;

const OPT_ENDOFOPT: u16 = 0;
const OPT_COMMENT: u16 = 1;
const SHB_USERAPPL: u16 = 4;
const IF_NAME: u16 = 2;
const IF_DESCRIPTION: u16 = 3;
const IF_TSRESOL: u16 = 9;
const EPB_FLAGS: u16 = 2;

/// `epb_flags` direction bits.
const EPB_INBOUND: u32 = 0b01;
const EPB_OUTBOUND: u32 = 0b10;

/// The longest synthesized headers (IPv6 + TCP) plus the most payload a record holds.
const SNAPLEN: u32 = (40 + 20 + max(DNS_PAYLOAD_CAP, DROP_PAYLOAD_CAP)) as u32;

/// Comments are cut to this many bytes (at a character boundary).
const MAX_COMMENT: usize = 1024;

const IPPROTO_TCP: u8 = 6;
const IPPROTO_UDP: u8 = 17;

const fn max(a: usize, b: usize) -> usize {
    if a > b {
        a
    } else {
        b
    }
}

/// Writes the events as one pcapng section: every DNS message sent or received, every
/// netfilter drop and resolved clash whose packet tuple is known (UDP or TCP), sorted by
/// time, each with a comment from the lookups and findings it belongs to. Events without a
/// usable tuple are left out and not counted.
pub fn write<W: Write>(
    w: W,
    events: &[(Event, Option<Arc<Workload>>)],
    findings: &[(Finding, Option<Arc<Workload>>)],
    lookups: &[Lookup],
    clock: &Clock,
) -> io::Result<PcapStats> {
    let index = LookupIndex::new(lookups);
    let mut by_ts: HashMap<u64, Vec<usize>> = HashMap::new();
    for (i, (f, _)) in findings.iter().enumerate() {
        by_ts.entry(f.ts_ns).or_default().push(i);
    }

    let mut packets: Vec<Packet> = Vec::with_capacity(events.len());
    for (ev, workload) in events {
        let p = match ev {
            Event::DnsSend(d) => dns_packet(d, true, workload.as_deref(), &index),
            Event::DnsRecv(d) => dns_packet(d, false, workload.as_deref(), &index),
            Event::NfDrop(e) => nf_packet(e, true, findings, &by_ts),
            Event::CtClash(e) => nf_packet(e, false, findings, &by_ts),
        };
        packets.extend(p);
    }
    packets.sort_by_key(|p| p.ts_ns);

    let mut w = io::BufWriter::new(w);
    w.write_all(&section_header())?;
    w.write_all(&interface_description())?;
    let mut stats = PcapStats::default();
    for p in &packets {
        w.write_all(&enhanced_packet(p, clock))?;
        stats.packets += 1;
        match p.kind {
            Kind::Dns => stats.dns += 1,
            Kind::Drop => stats.drops += 1,
            Kind::Clash => {}
        }
        if p.comment.is_some() {
            stats.commented += 1;
        }
    }
    w.flush()?;
    Ok(stats)
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    Dns,
    Drop,
    Clash,
}

#[derive(Debug, Clone)]
struct Packet {
    /// Monotonic, as recorded.
    ts_ns: u64,
    kind: Kind,
    data: Vec<u8>,
    orig_len: u32,
    flags: Option<u32>,
    comment: Option<String>,
}

// ---------------------------------------------------------------------------------------
// Packets

fn dns_packet(
    d: &DnsEvent,
    sent: bool,
    workload: Option<&Workload>,
    index: &LookupIndex,
) -> Option<Packet> {
    let (data, orig_len) = synthesize(
        IPPROTO_UDP,
        d.tuple.src,
        d.tuple.dst,
        &d.payload,
        d.payload_len,
    )?;
    let head = dns::header_and_question(&d.payload).ok();
    let place = head.as_ref().and_then(|h| index.find(d, h.id, sent));
    Some(Packet {
        ts_ns: d.ts_ns,
        kind: Kind::Dns,
        data,
        orig_len,
        flags: Some(if sent { EPB_OUTBOUND } else { EPB_INBOUND }),
        comment: Some(bound(&dns_comment(d, sent, workload, head.as_ref(), place))),
    })
}

fn nf_packet(
    e: &NfDropEvent,
    drop: bool,
    findings: &[(Finding, Option<Arc<Workload>>)],
    by_ts: &HashMap<u64, Vec<usize>>,
) -> Option<Packet> {
    let t = e.packet?;
    let (data, orig_len) = synthesize(t.proto, t.src, t.dst, &e.payload, e.payload_len)?;
    let finding = by_ts.get(&e.ts_ns).and_then(|ids| {
        ids.iter()
            .map(|&i| &findings[i])
            .find(|(f, _)| f.packet.is_none_or(|p| p == t))
    });
    let what = if drop { "DROPPED" } else { "CLASH" };
    let comment = match finding {
        Some((f, wl)) => {
            let mut s = format!("{what}: {} — {}", f.verdict.name(), f.explanation);
            if let Some(wl) = wl {
                s.push_str(&format!(" (workload {})", wl.label()));
            }
            s
        }
        None if drop => format!("DROPPED (no finding; seen by {})", e.source),
        None => format!("CLASH (no finding; seen by {})", e.source),
    };
    Some(Packet {
        ts_ns: e.ts_ns,
        kind: if drop { Kind::Drop } else { Kind::Clash },
        data,
        orig_len,
        flags: None,
        comment: Some(bound(&comment)),
    })
}

enum Addrs {
    V4(Ipv4Addr, Ipv4Addr),
    V6(Ipv6Addr, Ipv6Addr),
}

fn addrs(src: IpAddr, dst: IpAddr) -> Option<Addrs> {
    if src.is_unspecified() && dst.is_unspecified() {
        return None;
    }
    let v6 = |a: IpAddr| match a {
        IpAddr::V4(a) => a.to_ipv6_mapped(),
        IpAddr::V6(a) => a,
    };
    Some(match (src, dst) {
        (IpAddr::V4(s), IpAddr::V4(d)) => Addrs::V4(s, d),
        (s, d) => Addrs::V6(v6(s), v6(d)),
    })
}

/// The internet checksum's running sum (RFC 1071), before folding.
fn sum16(mut acc: u64, bytes: &[u8]) -> u64 {
    let mut chunks = bytes.chunks_exact(2);
    for c in &mut chunks {
        acc += u64::from(u16::from_be_bytes([c[0], c[1]]));
    }
    if let [last] = chunks.remainder() {
        acc += u64::from(u16::from_be_bytes([*last, 0]));
    }
    acc
}

fn fold(mut acc: u64) -> u16 {
    while acc >> 16 != 0 {
        acc = (acc & 0xffff) + (acc >> 16);
    }
    !(acc as u16)
}

/// An IP packet around `payload`, the first bytes of a transport payload of `payload_len`
/// bytes: (the captured bytes, the original length). `None` for a protocol other than UDP
/// and TCP, or an all-unspecified address pair. The transport checksum is computed when
/// the whole payload was captured, else left 0.
fn synthesize(
    proto: u8,
    src: SocketAddr,
    dst: SocketAddr,
    payload: &[u8],
    payload_len: u32,
) -> Option<(Vec<u8>, u32)> {
    let addrs = addrs(src.ip(), dst.ip())?;
    let full = u64::from(payload_len).max(payload.len() as u64);
    let complete = full == payload.len() as u64;
    let mut l4 = match proto {
        IPPROTO_UDP => {
            let mut h = Vec::with_capacity(8 + payload.len());
            h.extend_from_slice(&src.port().to_be_bytes());
            h.extend_from_slice(&dst.port().to_be_bytes());
            h.extend_from_slice(&u16::try_from(8 + full).unwrap_or(0xffff).to_be_bytes());
            h.extend_from_slice(&[0, 0]);
            h
        }
        IPPROTO_TCP => {
            // Sequence numbers and flags are not recorded; the window is a placeholder
            // (0 would read as a zero-window advertisement).
            let mut h = Vec::with_capacity(20 + payload.len());
            h.extend_from_slice(&src.port().to_be_bytes());
            h.extend_from_slice(&dst.port().to_be_bytes());
            h.extend_from_slice(&[0; 8]); // seq, ack
            h.extend_from_slice(&[5 << 4, 0]); // data offset 5 words, no flags
            h.extend_from_slice(&0xffffu16.to_be_bytes()); // window
            h.extend_from_slice(&[0, 0, 0, 0]); // checksum, urgent pointer
            h
        }
        _ => return None,
    };
    let l4_hdr = l4.len();
    let csum_at = if proto == IPPROTO_UDP { 6 } else { 16 };
    l4.extend_from_slice(payload);
    let l4_len = l4_hdr as u64 + full;

    let mut pkt = match addrs {
        Addrs::V4(s, d) => {
            let mut ip = Vec::with_capacity(20 + l4.len());
            ip.extend_from_slice(&[0x45, 0]);
            ip.extend_from_slice(&u16::try_from(20 + l4_len).unwrap_or(0xffff).to_be_bytes());
            ip.extend_from_slice(&[0, 0, 0x40, 0]); // id 0, DF
            ip.extend_from_slice(&[64, proto, 0, 0]); // TTL, protocol, checksum
            ip.extend_from_slice(&s.octets());
            ip.extend_from_slice(&d.octets());
            let c = fold(sum16(0, &ip));
            ip[10..12].copy_from_slice(&c.to_be_bytes());
            if complete {
                let mut pseudo = Vec::with_capacity(12);
                pseudo.extend_from_slice(&s.octets());
                pseudo.extend_from_slice(&d.octets());
                pseudo.extend_from_slice(&[0, proto]);
                pseudo.extend_from_slice(&(l4_len as u16).to_be_bytes());
                set_l4_checksum(&mut l4, csum_at, proto, &pseudo);
            }
            ip
        }
        Addrs::V6(s, d) => {
            let mut ip = Vec::with_capacity(40 + l4.len());
            ip.extend_from_slice(&[0x60, 0, 0, 0]);
            ip.extend_from_slice(&u16::try_from(l4_len).unwrap_or(0xffff).to_be_bytes());
            ip.extend_from_slice(&[proto, 64]); // next header, hop limit
            ip.extend_from_slice(&s.octets());
            ip.extend_from_slice(&d.octets());
            if complete {
                let mut pseudo = Vec::with_capacity(40);
                pseudo.extend_from_slice(&s.octets());
                pseudo.extend_from_slice(&d.octets());
                pseudo.extend_from_slice(&(l4_len as u32).to_be_bytes());
                pseudo.extend_from_slice(&[0, 0, 0, proto]);
                set_l4_checksum(&mut l4, csum_at, proto, &pseudo);
            }
            ip
        }
    };
    let orig = pkt.len() as u64 + l4_len;
    pkt.extend_from_slice(&l4);
    Some((pkt, u32::try_from(orig).unwrap_or(u32::MAX)))
}

fn set_l4_checksum(l4: &mut [u8], at: usize, proto: u8, pseudo: &[u8]) {
    let mut c = fold(sum16(sum16(0, pseudo), l4));
    if c == 0 && proto == IPPROTO_UDP {
        // 0 means "no checksum" in UDP; a computed 0 is sent as all ones.
        c = 0xffff;
    }
    l4[at..at + 2].copy_from_slice(&c.to_be_bytes());
}

// ---------------------------------------------------------------------------------------
// Comments

/// Where a DNS message sits in the finished lookups.
struct Place<'a> {
    lookup: &'a Lookup,
    query: &'a Query,
}

struct LookupIndex<'a> {
    lookups: &'a [Lookup],
    /// (socket cookie, DNS id, send time) -> (lookup, query).
    queries: HashMap<(u64, u16, u64), (usize, usize)>,
    /// (DNS id, receive time) -> (lookup, query).
    answers: HashMap<(u16, u64), Vec<(usize, usize)>>,
}

impl<'a> LookupIndex<'a> {
    fn new(lookups: &'a [Lookup]) -> Self {
        let mut queries = HashMap::new();
        let mut answers: HashMap<(u16, u64), Vec<(usize, usize)>> = HashMap::new();
        for (li, l) in lookups.iter().enumerate() {
            for (qi, q) in l.queries.iter().enumerate() {
                queries.insert((q.sock_cookie, q.id, q.ts_ns), (li, qi));
                if let Some(a) = &q.answer {
                    answers.entry((q.id, a.ts_ns)).or_default().push((li, qi));
                }
            }
        }
        LookupIndex {
            lookups,
            queries,
            answers,
        }
    }

    fn place(&self, (li, qi): (usize, usize)) -> Place<'a> {
        let lookup = &self.lookups[li];
        Place {
            lookup,
            query: &lookup.queries[qi],
        }
    }

    /// The query this message is, or answers. An answer is matched by its socket, or by
    /// its flow when the receive source could not see the socket.
    fn find(&self, d: &DnsEvent, id: u16, sent: bool) -> Option<Place<'a>> {
        if sent {
            return self
                .queries
                .get(&(d.sock_cookie, id, d.ts_ns))
                .map(|&at| self.place(at));
        }
        let cands = self.answers.get(&(id, d.ts_ns))?;
        let by = |ok: &dyn Fn(&Query) -> bool| {
            cands.iter().map(|&at| self.place(at)).find(|p| ok(p.query))
        };
        by(&|q| q.sock_cookie == d.sock_cookie && d.sock_cookie != 0)
            .or_else(|| by(&|q| q.src == d.tuple.dst && q.server == d.tuple.src))
    }
}

/// `ctlab/client-0 (pid 123 lab-resolver) query A example.com attempt 1: snat-port-clash,
/// lost — …; lookup unanswered after 5.00 s: …`
fn dns_comment(
    d: &DnsEvent,
    sent: bool,
    workload: Option<&Workload>,
    head: Option<&dns::Head>,
    place: Option<Place>,
) -> String {
    let who = match (workload, &place) {
        (Some(w), _) => w.label(),
        (None, Some(p)) => p.lookup.workload.label(),
        (None, None) => "unknown".to_string(),
    };
    let mut s = who;
    match (d.task.pid, &d.task.comm) {
        (Some(pid), Some(comm)) if !comm.is_empty() => s.push_str(&format!(" (pid {pid} {comm})")),
        (Some(pid), _) => s.push_str(&format!(" (pid {pid})")),
        _ => {}
    }
    let response = head.map_or(!sent, |h| h.response);
    s.push_str(if response { " answer" } else { " query" });
    match head {
        Some(h) => {
            if let Some(q) = &h.question {
                s.push_str(&format!(" {} {}", dns::qtype_name(q.qtype), q.name));
            }
            if response {
                s.push_str(&format!(" {}", h.rcode.name()));
            }
        }
        None => s.push_str(" (not a DNS message)"),
    }
    if d.payload.len() < d.payload_len as usize {
        s.push_str(&format!(
            " (captured {} of {} bytes)",
            d.payload.len(),
            d.payload_len
        ));
    }
    let Some(Place { lookup, query }) = place else {
        return s;
    };
    s.push_str(&format!(" attempt {}", query.attempt));
    if let (Some(f), false) = (&query.fate, response) {
        s.push_str(&format!(
            ": {}{}, {} — {}",
            f.verdict.name(),
            if f.reply { " (its answer)" } else { "" },
            if f.lost { "lost" } else { "not lost" },
            f.explanation
        ));
    }
    s.push_str(&format!(
        "; lookup {} after {}",
        lookup.outcome.name(),
        crate::report::dur(lookup.latency_ns)
    ));
    if !lookup.cause.is_empty() {
        s.push_str(&format!(": {}", lookup.cause));
    }
    s
}

/// One line of valid UTF-8 of at most [`MAX_COMMENT`] bytes.
fn bound(s: &str) -> String {
    let s: String = s
        .chars()
        .map(|c| if c.is_control() { ' ' } else { c })
        .collect();
    if s.len() <= MAX_COMMENT {
        return s;
    }
    const ELLIPSIS: &str = "…";
    let mut end = MAX_COMMENT - ELLIPSIS.len();
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    format!("{}{ELLIPSIS}", &s[..end])
}

// ---------------------------------------------------------------------------------------
// Blocks

fn pad4(buf: &mut Vec<u8>) {
    while buf.len() & 3 != 0 {
        buf.push(0);
    }
}

/// Appends one option (value padded to 32 bits). Values longer than 65535 bytes are cut.
fn option(buf: &mut Vec<u8>, code: u16, value: &[u8]) {
    let value = &value[..value.len().min(usize::from(u16::MAX))];
    buf.extend_from_slice(&code.to_le_bytes());
    buf.extend_from_slice(&(value.len() as u16).to_le_bytes());
    buf.extend_from_slice(value);
    pad4(buf);
}

fn end_of_options(buf: &mut Vec<u8>) {
    buf.extend_from_slice(&OPT_ENDOFOPT.to_le_bytes());
    buf.extend_from_slice(&0u16.to_le_bytes());
}

/// Type, total length, `body` (padded), total length.
fn block(kind: u32, mut body: Vec<u8>) -> Vec<u8> {
    pad4(&mut body);
    let total = (12 + body.len()) as u32;
    let mut b = Vec::with_capacity(total as usize);
    b.extend_from_slice(&kind.to_le_bytes());
    b.extend_from_slice(&total.to_le_bytes());
    b.extend_from_slice(&body);
    b.extend_from_slice(&total.to_le_bytes());
    b
}

fn section_header() -> Vec<u8> {
    let mut body = Vec::new();
    body.extend_from_slice(&BYTE_ORDER_MAGIC.to_le_bytes());
    body.extend_from_slice(&1u16.to_le_bytes());
    body.extend_from_slice(&0u16.to_le_bytes());
    body.extend_from_slice(&(-1i64).to_le_bytes()); // section length not given
    let app = format!("conntrack tracer {}", env!("CARGO_PKG_VERSION"));
    option(&mut body, SHB_USERAPPL, app.as_bytes());
    end_of_options(&mut body);
    block(BLOCK_SHB, body)
}

fn interface_description() -> Vec<u8> {
    let mut body = Vec::new();
    body.extend_from_slice(&LINKTYPE_RAW.to_le_bytes());
    body.extend_from_slice(&0u16.to_le_bytes());
    body.extend_from_slice(&SNAPLEN.to_le_bytes());
    option(&mut body, IF_NAME, b"tracer");
    option(
        &mut body,
        IF_DESCRIPTION,
        b"DNS messages and netfilter drops recorded by the conntrack tracer; IP, UDP and TCP \
          headers are synthesized from the recorded tuples (TCP sequence numbers and flags \
          unknown)",
    );
    option(&mut body, IF_TSRESOL, &[9]);
    end_of_options(&mut body);
    block(BLOCK_IDB, body)
}

fn enhanced_packet(p: &Packet, clock: &Clock) -> Vec<u8> {
    let ts = clock
        .wall(p.ts_ns)
        .duration_since(UNIX_EPOCH)
        .unwrap_or_default()
        .as_nanos();
    let ts = u64::try_from(ts).unwrap_or(u64::MAX);
    let mut body = Vec::with_capacity(20 + p.data.len() + 64);
    body.extend_from_slice(&0u32.to_le_bytes()); // interface 0
    body.extend_from_slice(&((ts >> 32) as u32).to_le_bytes());
    body.extend_from_slice(&(ts as u32).to_le_bytes());
    body.extend_from_slice(&(p.data.len() as u32).to_le_bytes());
    body.extend_from_slice(&p.orig_len.max(p.data.len() as u32).to_le_bytes());
    body.extend_from_slice(&p.data);
    pad4(&mut body);
    if p.comment.is_some() || p.flags.is_some() {
        if let Some(c) = &p.comment {
            option(&mut body, OPT_COMMENT, c.as_bytes());
        }
        if let Some(f) = p.flags {
            option(&mut body, EPB_FLAGS, &f.to_le_bytes());
        }
        end_of_options(&mut body);
    }
    block(BLOCK_EPB, body)
}

#[cfg(test)]
mod tests {
    use std::net::SocketAddr;

    use super::*;
    use crate::lookups::Outcome;
    use crate::{
        events::{Conntrack, FiveTuple, TaskInfo},
        lookups::{Answer, Fate},
        pods::WorkloadKind,
        traffic::{dns_query, dns_response, QTYPE_A, QTYPE_AAAA},
        verdict::Verdict,
    };

    const MS: u64 = 1_000_000;
    /// Wall clock = monotonic + 1.7e9 s.
    const OFFSET_NS: i128 = 1_700_000_000_000_000_000;

    fn clock() -> Clock {
        Clock::fixed(OFFSET_NS)
    }

    fn addr(s: &str) -> SocketAddr {
        s.parse().unwrap()
    }

    fn pod() -> Arc<Workload> {
        Arc::new(Workload {
            kind: WorkloadKind::Pod,
            namespace: Some("ctlab".into()),
            pod: Some("client-0".into()),
            ..Workload::unknown()
        })
    }

    fn dns(ts: u64, cookie: u64, src: &str, dst: &str, payload: Vec<u8>) -> DnsEvent {
        DnsEvent {
            ts_ns: ts,
            source: "cgroup_skb/egress",
            task: TaskInfo {
                pid: Some(123),
                tid: Some(123),
                comm: Some("lab-resolver".into()),
                cgroup_id: 7,
                netns: 1,
            },
            sock_cookie: cookie,
            tuple: FiveTuple {
                proto: 17,
                src: addr(src),
                dst: addr(dst),
            },
            batch: false,
            batch_len: 0,
            payload_len: payload.len() as u32,
            payload,
        }
    }

    fn nf(ts: u64, packet: Option<FiveTuple>, payload: &[u8], payload_len: u32) -> NfDropEvent {
        NfDropEvent {
            ts_ns: ts,
            source: "tp_btf/kfree_skb",
            netns: 2,
            ifindex: 3,
            location: 0,
            reason: 12,
            verdict: 0,
            packet,
            conntrack: None::<Conntrack>,
            clash_winner: None,
            payload_len,
            payload: payload.to_vec(),
        }
    }

    fn finding(verdict: Verdict, ts: u64, packet: Option<FiveTuple>) -> Finding {
        Finding {
            verdict,
            netns: 2,
            ts_ns: ts,
            count: 1,
            source: "tp_btf/kfree_skb",
            packet,
            conntrack: None,
            nat_clash: None,
            lost_to: None,
            nat_targets_differ: None,
            explanation: format!("{} for the test", verdict.name()),
        }
    }

    fn query(ts: u64, id: u16, attempt: u32) -> Query {
        Query {
            ts_ns: ts,
            qname: "example.com".into(),
            qtype: "A".into(),
            qtype_code: QTYPE_A,
            id,
            src: addr("10.0.0.2:40000"),
            server: addr("10.96.0.10:53"),
            sock_cookie: 9,
            attempt,
            batch: false,
            fate: None,
            answer: None,
            unanswered: false,
        }
    }

    struct Scenario {
        events: Vec<(Event, Option<Arc<Workload>>)>,
        findings: Vec<(Finding, Option<Arc<Workload>>)>,
        lookups: Vec<Lookup>,
    }

    /// A lookup whose first query a SNAT port clash dropped and whose retry was answered,
    /// plus an IPv6 query, a truncated answer, a TCP drop, a resolved clash and two events
    /// without a usable tuple. Listed out of time order, as events from several CPUs are.
    fn scenario() -> Scenario {
        let q1 = dns_query(0x1111, "example.com", QTYPE_A).unwrap();
        let q2 = dns_query(0x2222, "example.com", QTYPE_A).unwrap();
        let a2 = dns_response(&q2, 0, true);
        let q6 = dns_query(0x6666, "example.com", QTYPE_AAAA).unwrap();
        let big_q = dns_query(0x7777, "big.example", QTYPE_A).unwrap();
        let mut big = dns_response(&big_q, 0, true);
        big.resize(700, 0);

        let snat = FiveTuple {
            proto: 17,
            src: addr("192.168.0.1:40000"),
            dst: addr("10.96.0.10:53"),
        };
        let tcp = FiveTuple {
            proto: 6,
            src: addr("[fd00::2]:41000"),
            dst: addr("[fd00::80]:80"),
        };
        let clash = FiveTuple {
            proto: 17,
            src: addr("10.0.0.3:40002"),
            dst: addr("10.96.0.10:53"),
        };

        let mut first = query(1000 * MS, 0x1111, 1);
        first.fate = Some(Fate {
            ts_ns: 1000 * MS + 50_000,
            verdict: Verdict::SnatPortClash,
            netns: 2,
            lost: true,
            attribution: "packet",
            reply: false,
            nat_to: None,
            nat_from: None,
            explanation: "two pods got the same SNAT port".into(),
        });
        first.unanswered = true;
        let mut retry = query(6000 * MS, 0x2222, 2);
        retry.answer = Some(Answer {
            ts_ns: 6002 * MS,
            rcode: "NOERROR".into(),
            answers: vec!["10.77.0.99".into()],
            truncated: false,
        });
        let lookup = Lookup {
            id: 1,
            workload: pod(),
            netns: 1,
            cgroup_id: 7,
            pid: Some(123),
            comm: Some("lab-resolver".into()),
            name: "example.com".into(),
            server: addr("10.96.0.10:53"),
            start_ns: 1000 * MS,
            end_ns: 6002 * MS,
            latency_ns: 5002 * MS,
            outcome: Outcome::Answered,
            siblings: None,
            retries: 1,
            queries: vec![first, retry],
            cause: "the first try was lost to a SNAT port clash".into(),
            problem: true,
            lost_records: 0,
        };

        let mut unspecified = dns(9000 * MS, 5, "0.0.0.0:1", "0.0.0.0:53", q1.clone());
        unspecified.tuple.proto = 0;
        let events = vec![
            (
                Event::NfDrop(nf(1000 * MS + 50_000, Some(snat), &q1, q1.len() as u32)),
                None,
            ),
            (
                Event::DnsSend(dns(1000 * MS, 9, "10.0.0.2:40000", "10.96.0.10:53", q1)),
                Some(pod()),
            ),
            (
                Event::DnsSend(dns(6000 * MS, 9, "10.0.0.2:40000", "10.96.0.10:53", q2)),
                Some(pod()),
            ),
            (
                // The receive source could not see the socket: matched by flow.
                Event::DnsRecv(dns(6002 * MS, 0, "10.96.0.10:53", "10.0.0.2:40000", a2)),
                Some(pod()),
            ),
            (
                Event::DnsSend(dns(7000 * MS, 11, "[fd00::2]:40001", "[fd00::53]:53", q6)),
                None,
            ),
            (
                Event::DnsRecv({
                    let mut e = dns(8000 * MS, 12, "10.96.0.10:53", "10.0.0.2:40003", big);
                    e.payload.truncate(DNS_PAYLOAD_CAP);
                    e
                }),
                Some(pod()),
            ),
            (
                Event::NfDrop(nf(8500 * MS, Some(tcp), b"GET / HTTP", 300)),
                None,
            ),
            (Event::NfDrop(nf(8600 * MS, None, b"", 0)), None),
            (Event::DnsSend(unspecified), None),
            (Event::CtClash(nf(8700 * MS, Some(clash), b"", 0)), None),
        ];
        let findings = vec![
            (
                finding(Verdict::SnatPortClash, 1000 * MS + 50_000, Some(snat)),
                Some(pod()),
            ),
            // Same time, other packet: must not be picked for the drop above.
            (
                finding(Verdict::RulesetDrop, 1000 * MS + 50_000, Some(clash)),
                None,
            ),
            (finding(Verdict::InsertClashResolved, 8700 * MS, None), None),
        ];
        Scenario {
            events,
            findings,
            lookups: vec![lookup],
        }
    }

    // --- a tiny pcapng reader --------------------------------------------------------

    #[derive(Debug)]
    struct Epb {
        ts_ns: u64,
        orig_len: u32,
        data: Vec<u8>,
        comment: Option<String>,
        flags: Option<u32>,
    }

    #[derive(Debug)]
    struct File {
        userappl: String,
        linktype: u16,
        snaplen: u32,
        if_name: String,
        tsresol: u8,
        packets: Vec<Epb>,
    }

    fn u16le(b: &[u8], at: usize) -> u16 {
        u16::from_le_bytes(b[at..at + 2].try_into().unwrap())
    }
    fn u32le(b: &[u8], at: usize) -> u32 {
        u32::from_le_bytes(b[at..at + 4].try_into().unwrap())
    }

    /// Options up to and including opt_endofopt, which must end the block body.
    fn options(mut b: &[u8]) -> Vec<(u16, Vec<u8>)> {
        let mut out = Vec::new();
        loop {
            assert!(b.len() >= 4, "options run past the block: {b:?}");
            let (code, len) = (u16le(b, 0), usize::from(u16le(b, 2)));
            if code == OPT_ENDOFOPT {
                assert_eq!(len, 0, "opt_endofopt with a length");
                assert!(b.len() == 4, "{} bytes after opt_endofopt", b.len() - 4);
                return out;
            }
            let padded = (len + 3) & !3;
            assert!(4 + padded <= b.len(), "option {code} longer than its block");
            assert!(
                b[4 + len..4 + padded].iter().all(|&x| x == 0),
                "option padding not zero"
            );
            out.push((code, b[4..4 + len].to_vec()));
            b = &b[4 + padded..];
        }
    }

    fn opt(opts: &[(u16, Vec<u8>)], code: u16) -> Option<&[u8]> {
        opts.iter().find(|(c, _)| *c == code).map(|(_, v)| &v[..])
    }

    fn read(mut b: &[u8]) -> File {
        let mut f = File {
            userappl: String::new(),
            linktype: 0,
            snaplen: 0,
            if_name: String::new(),
            tsresol: 6,
            packets: Vec::new(),
        };
        let mut blocks = Vec::new();
        while !b.is_empty() {
            let kind = u32le(b, 0);
            let total = u32le(b, 4) as usize;
            assert!(total >= 12 && total & 3 == 0, "block length {total}");
            assert!(total <= b.len(), "block runs past the file");
            assert_eq!(u32le(b, total - 4) as usize, total, "trailing length");
            let body = &b[8..total - 4];
            match kind {
                BLOCK_SHB => {
                    assert_eq!(u32le(body, 0), BYTE_ORDER_MAGIC);
                    assert_eq!((u16le(body, 4), u16le(body, 6)), (1, 0));
                    let opts = options(&body[16..]);
                    f.userappl =
                        String::from_utf8(opt(&opts, SHB_USERAPPL).unwrap().to_vec()).unwrap();
                }
                BLOCK_IDB => {
                    f.linktype = u16le(body, 0);
                    assert_eq!(u16le(body, 2), 0, "reserved");
                    f.snaplen = u32le(body, 4);
                    let opts = options(&body[8..]);
                    f.if_name = String::from_utf8(opt(&opts, IF_NAME).unwrap().to_vec()).unwrap();
                    f.tsresol = opt(&opts, IF_TSRESOL).unwrap()[0];
                }
                BLOCK_EPB => {
                    assert_eq!(u32le(body, 0), 0, "interface id");
                    let ts = (u64::from(u32le(body, 4)) << 32) | u64::from(u32le(body, 8));
                    let cap = u32le(body, 12) as usize;
                    let orig = u32le(body, 16);
                    assert!(cap as u32 <= orig, "captured {cap} > original {orig}");
                    let padded = (cap + 3) & !3;
                    let data = body[20..20 + cap].to_vec();
                    assert!(body[20 + cap..20 + padded].iter().all(|&x| x == 0));
                    let rest = &body[20 + padded..];
                    let opts = if rest.is_empty() {
                        Vec::new()
                    } else {
                        options(rest)
                    };
                    f.packets.push(Epb {
                        ts_ns: ts,
                        orig_len: orig,
                        data,
                        comment: opt(&opts, OPT_COMMENT)
                            .map(|c| String::from_utf8(c.to_vec()).expect("comment is UTF-8")),
                        flags: opt(&opts, EPB_FLAGS).map(|v| u32le(v, 0)),
                    });
                }
                other => panic!("unexpected block type {other:#x}"),
            }
            blocks.push(kind);
            b = &b[total..];
        }
        assert_eq!(blocks[..2], [BLOCK_SHB, BLOCK_IDB], "SHB then IDB first");
        assert!(blocks[2..].iter().all(|&k| k == BLOCK_EPB));
        f
    }

    fn export(s: &Scenario) -> (File, PcapStats) {
        let mut out = Vec::new();
        let stats = write(&mut out, &s.events, &s.findings, &s.lookups, &clock()).unwrap();
        (read(&out), stats)
    }

    fn checksum_ok(pseudo: &[u8], bytes: &[u8]) -> bool {
        fold(sum16(sum16(0, pseudo), bytes)) == 0
    }

    /// (IP header length, transport protocol, pseudo header) of a synthesized packet, with
    /// the IP header's own checks.
    fn ip_header(p: &Epb) -> (usize, u8, Vec<u8>) {
        let d = &p.data;
        match d[0] >> 4 {
            4 => {
                assert_eq!(d[0], 0x45);
                assert!(checksum_ok(&[], &d[..20]), "IPv4 header checksum");
                let total = u16::from_be_bytes([d[2], d[3]]) as u32;
                assert_eq!(total, p.orig_len, "IPv4 total length = original length");
                let mut pseudo = d[12..20].to_vec();
                pseudo.extend_from_slice(&[0, d[9]]);
                pseudo.extend_from_slice(&((total - 20) as u16).to_be_bytes());
                (20, d[9], pseudo)
            }
            6 => {
                let plen = u16::from_be_bytes([d[4], d[5]]) as u32;
                assert_eq!(plen + 40, p.orig_len, "IPv6 payload length");
                let mut pseudo = d[8..40].to_vec();
                pseudo.extend_from_slice(&plen.to_be_bytes());
                pseudo.extend_from_slice(&[0, 0, 0, d[6]]);
                (40, d[6], pseudo)
            }
            v => panic!("IP version {v}"),
        }
    }

    #[test]
    fn blocks_options_and_interface() {
        let (f, stats) = export(&scenario());
        assert!(f.userappl.starts_with("conntrack tracer "));
        assert_eq!(f.linktype, 101);
        assert_eq!(f.tsresol, 9);
        assert_eq!(f.if_name, "tracer");
        assert_eq!(f.snaplen, SNAPLEN);
        assert!(f.packets.iter().all(|p| p.data.len() as u32 <= f.snaplen));
        // 10 events: the drop without a tuple and the DNS event without addresses are out.
        assert_eq!(
            stats,
            PcapStats {
                packets: 8,
                dns: 5,
                drops: 2,
                commented: 8
            }
        );
        assert_eq!(f.packets.len(), 8);
    }

    #[test]
    fn packets_sorted_with_nanosecond_wall_timestamps() {
        let (f, _) = export(&scenario());
        let ts: Vec<u64> = f.packets.iter().map(|p| p.ts_ns).collect();
        let base = OFFSET_NS as u64;
        assert_eq!(
            ts,
            [
                1000 * MS,
                1000 * MS + 50_000,
                6000 * MS,
                6002 * MS,
                7000 * MS,
                8000 * MS,
                8500 * MS,
                8700 * MS
            ]
            .map(|t| base + t)
        );
    }

    #[test]
    fn checksums_and_lengths() {
        let (f, _) = export(&scenario());
        for p in &f.packets {
            let (ip_len, proto, pseudo) = ip_header(p);
            let l4 = &p.data[ip_len..];
            let complete = p.data.len() as u32 == p.orig_len;
            match proto {
                17 => {
                    let udp_len = u16::from_be_bytes([l4[4], l4[5]]) as u32;
                    assert_eq!(udp_len, p.orig_len - ip_len as u32);
                    let sum = u16::from_be_bytes([l4[6], l4[7]]);
                    if complete {
                        assert_ne!(sum, 0, "a complete UDP packet gets its checksum");
                        assert!(checksum_ok(&pseudo, l4), "UDP checksum of {p:?}");
                    } else {
                        assert_eq!(sum, 0, "no checksum over bytes not captured");
                    }
                }
                6 => {
                    assert_eq!(l4[12], 5 << 4, "20-byte TCP header");
                    assert!(!complete);
                    assert_eq!(u16::from_be_bytes([l4[16], l4[17]]), 0);
                }
                p => panic!("protocol {p}"),
            }
        }
    }

    #[test]
    fn truncated_captures_keep_their_original_length() {
        let (f, _) = export(&scenario());
        // The 700-byte answer, captured to DNS_PAYLOAD_CAP.
        let big = &f.packets[5];
        assert_eq!(big.data.len(), 20 + 8 + DNS_PAYLOAD_CAP);
        assert_eq!(big.orig_len, 20 + 8 + 700);
        // The TCP drop: 10 of 300 payload bytes behind a synthesized 20-byte header.
        let tcp = &f.packets[6];
        assert_eq!(tcp.data.len(), 40 + 20 + 10);
        assert_eq!(tcp.orig_len, 40 + 20 + 300);
        assert_eq!(&tcp.data[60..], b"GET / HTTP");
        assert_eq!(&tcp.data[40..44], &[0xa0, 0x28, 0, 80]); // 41000 -> 80
                                                             // A complete IPv6 query: original = captured.
        let v6 = &f.packets[4];
        assert_eq!(v6.data[0] >> 4, 6);
        assert_eq!(v6.data.len() as u32, v6.orig_len);
    }

    #[test]
    fn directions() {
        let (f, _) = export(&scenario());
        let flags: Vec<Option<u32>> = f.packets.iter().map(|p| p.flags).collect();
        assert_eq!(
            flags,
            [
                Some(EPB_OUTBOUND),
                None,
                Some(EPB_OUTBOUND),
                Some(EPB_INBOUND),
                Some(EPB_OUTBOUND),
                Some(EPB_INBOUND),
                None,
                None
            ]
        );
    }

    #[test]
    fn comments_tell_lookup_fate_and_verdict() {
        let (f, _) = export(&scenario());
        let c: Vec<&str> = f
            .packets
            .iter()
            .map(|p| p.comment.as_deref().unwrap())
            .collect();
        assert_eq!(
            c[0],
            "ctlab/client-0 (pid 123 lab-resolver) query A example.com attempt 1: \
             snat-port-clash, lost — two pods got the same SNAT port; lookup answered after \
             5.00 s: the first try was lost to a SNAT port clash"
        );
        assert_eq!(
            c[1],
            "DROPPED: snat-port-clash — snat-port-clash for the test (workload ctlab/client-0)"
        );
        assert!(
            c[2].starts_with("ctlab/client-0 (pid 123 lab-resolver) query A example.com attempt 2; lookup answered"),
            "{}",
            c[2]
        );
        assert!(
            c[3].starts_with("ctlab/client-0 (pid 123 lab-resolver) answer A example.com NOERROR attempt 2; lookup answered"),
            "{}",
            c[3]
        );
        assert_eq!(
            c[4],
            "unknown (pid 123 lab-resolver) query AAAA example.com"
        );
        assert_eq!(
            c[5],
            "ctlab/client-0 (pid 123 lab-resolver) answer A big.example NOERROR \
             (captured 512 of 700 bytes)"
        );
        assert_eq!(c[6], "DROPPED (no finding; seen by tp_btf/kfree_skb)");
        assert_eq!(
            c[7],
            "CLASH: insert-clash-resolved — insert-clash-resolved for the test"
        );
    }

    #[test]
    fn comments_are_bounded_single_line_utf8() {
        let mut s = scenario();
        let long = format!("line one\nline two\t{}", "é€".repeat(2000));
        s.findings[0].0.explanation = long;
        let (f, _) = export(&s);
        let c = f.packets[1].comment.as_deref().unwrap();
        assert!(c.len() <= MAX_COMMENT, "{} bytes", c.len());
        assert!(c.len() > MAX_COMMENT - 8);
        assert!(c.ends_with('…'));
        assert!(!c.contains(['\n', '\t']));
        assert!(c.contains("line one line two"));
        for n in 0..20 {
            let b = bound(&"€".repeat(340 + n));
            assert!(b.len() <= MAX_COMMENT);
        }
    }

    #[test]
    fn nothing_but_headers() {
        let (f, stats) = export(&Scenario {
            events: Vec::new(),
            findings: Vec::new(),
            lookups: Vec::new(),
        });
        assert!(f.packets.is_empty());
        assert_eq!(stats, PcapStats::default());
    }

    #[test]
    fn other_protocols_and_mixed_families() {
        assert!(synthesize(1, addr("10.0.0.1:0"), addr("10.0.0.2:0"), b"", 0).is_none());
        // A v4 and a v6 address: both written as IPv6 (v4-mapped).
        let (d, orig) =
            synthesize(17, addr("10.0.0.1:1"), addr("[fd00::1]:53"), b"abc", 3).unwrap();
        assert_eq!(d[0] >> 4, 6);
        assert_eq!(
            &d[8..24],
            &"::ffff:10.0.0.1".parse::<Ipv6Addr>().unwrap().octets()
        );
        assert_eq!(orig, 40 + 8 + 3);
        // A checksum that computes to 0 goes out as 0xffff in UDP.
        let mut l4 = vec![0u8; 8];
        set_l4_checksum(&mut l4, 6, 17, &[0xff, 0xff]);
        assert_eq!(&l4[6..8], &[0xff, 0xff]);
    }
}

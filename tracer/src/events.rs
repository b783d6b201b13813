//! Ring-buffer bytes -> typed events. Pure: no kernel, no IO; unit-tested and fuzzed.

use std::{
    mem::size_of,
    net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr},
};

use serde::{Deserialize, Serialize};
use tracer_common::{
    DnsPacket, DnsPacketOf, DnsPacketSmall, EventKind, Header, NfEvent, SourceId, Task, Tuple,
    AF_INET, AF_INET6, CT_FLAG_OTHER, CT_FLAG_PRESENT, DNS_FLAG_BATCH, DNS_FLAG_NO_TASK,
    DNS_PAYLOAD_CAP, DNS_PAYLOAD_SMALL, DROP_PAYLOAD_CAP,
};

/// Why a record could not be decoded.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DecodeError {
    #[error("record of {got} bytes is shorter than its {what} ({need} bytes)")]
    Short {
        what: &'static str,
        need: usize,
        got: usize,
    },
    #[error("unknown record kind {0} (tracer and kernel programs from different builds?)")]
    UnknownKind(u32),
    #[error("unknown source id {0}")]
    UnknownSource(u16),
    #[error("captured length {cap_len} exceeds the {cap} bytes a record holds")]
    BadCapLen { cap_len: u32, cap: usize },
    #[error("record of {got} bytes is no {what} (those are {sizes} bytes long)")]
    BadSize {
        what: &'static str,
        got: usize,
        sizes: &'static str,
    },
}

/// The lengths a DNS record can have, for [`DecodeError::BadSize`].
const DNS_SIZES: &str = "256 or 640";
const _: () = assert!(
    size_of::<DnsPacketSmall>() == 256 && size_of::<DnsPacket>() == 640,
    "update DNS_SIZES"
);

/// Reads a `T` from the start of `bytes` (any alignment).
fn read<T: Copy>(bytes: &[u8], what: &'static str) -> Result<T, DecodeError> {
    let need = size_of::<T>();
    if bytes.len() < need {
        return Err(DecodeError::Short {
            what,
            need,
            got: bytes.len(),
        });
    }
    // SAFETY: `bytes` holds at least size_of::<T>() bytes; `read_unaligned` has no alignment
    // requirement, and the only `T`s used here are tracer-common records made of integers
    // and integer arrays, for which every bit pattern is valid.
    Ok(unsafe { std::ptr::read_unaligned(bytes.as_ptr().cast::<T>()) })
}

/// A decoded ring-buffer record.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum Event {
    DnsSend(DnsEvent),
    DnsRecv(DnsEvent),
    NfDrop(NfDropEvent),
    CtClash(NfDropEvent),
}

impl Event {
    pub fn kind(&self) -> EventKind {
        match self {
            Event::DnsSend(_) => EventKind::DnsSend,
            Event::DnsRecv(_) => EventKind::DnsRecv,
            Event::NfDrop(_) => EventKind::NfDrop,
            Event::CtClash(_) => EventKind::CtClash,
        }
    }

    pub fn ts_ns(&self) -> u64 {
        match self {
            Event::DnsSend(e) | Event::DnsRecv(e) => e.ts_ns,
            Event::NfDrop(e) | Event::CtClash(e) => e.ts_ns,
        }
    }
}

/// The kernel program a record came from, by the name the probe plan uses.
pub fn source_name(id: SourceId) -> &'static str {
    match id {
        SourceId::FentryUdpSendmsg => "fentry/udp_sendmsg",
        SourceId::FentryUdpv6Sendmsg => "fentry/udpv6_sendmsg",
        SourceId::CgroupSkbEgress => "cgroup_skb/egress",
        SourceId::FentrySkbConsumeUdp => "fentry/skb_consume_udp",
        SourceId::CgroupSkbIngress => "cgroup_skb/ingress",
        SourceId::FexitNfConntrackConfirm => "fexit/__nf_conntrack_confirm",
        SourceId::FexitNfCtResolveClash => "fexit/nf_ct_resolve_clash",
        SourceId::TpBtfKfreeSkb => "tp_btf/kfree_skb",
        SourceId::KretprobeNfConntrackConfirm => "kretprobe/__nf_conntrack_confirm",
        SourceId::KretprobeNfCtResolveClash => "kretprobe/nf_ct_resolve_clash",
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct TaskInfo {
    /// Thread group id; `None` when the source could not see the owning task.
    pub pid: Option<u32>,
    pub tid: Option<u32>,
    pub comm: Option<String>,
    pub cgroup_id: u64,
    pub netns: u32,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct FiveTuple {
    pub proto: u8,
    pub src: SocketAddr,
    pub dst: SocketAddr,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct DnsEvent {
    pub ts_ns: u64,
    pub source: &'static str,
    #[serde(flatten)]
    pub task: TaskInfo,
    pub sock_cookie: u64,
    #[serde(flatten)]
    pub tuple: FiveTuple,
    /// Part of a `sendmmsg(2)` batch of `batch_len` messages.
    pub batch: bool,
    pub batch_len: u32,
    /// The whole UDP payload length; `payload` holds the first bytes of it.
    pub payload_len: u32,
    #[serde(serialize_with = "crate::hex::serialize")]
    pub payload: Vec<u8>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Conntrack {
    pub status: u64,
    pub confirmed: bool,
    pub orig: FiveTuple,
    pub reply: FiveTuple,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct NfDropEvent {
    pub ts_ns: u64,
    pub source: &'static str,
    pub netns: u32,
    pub ifindex: u32,
    /// Kernel address the drop was reported from (symbolized by the printer).
    pub location: u64,
    pub reason: u32,
    /// Return value of the hooked function (fexit sources).
    pub verdict: i32,
    /// The packet's own headers; `None` when they could not be parsed.
    pub packet: Option<FiveTuple>,
    pub conntrack: Option<Conntrack>,
    /// The conntrack entry the packet clashed with (fexit `nf_ct_resolve_clash`).
    pub clash_winner: Option<FiveTuple>,
    pub payload_len: u32,
    #[serde(serialize_with = "crate::hex::serialize")]
    pub payload: Vec<u8>,
}

fn ip(family: u8, raw: &[u8; 16]) -> Option<IpAddr> {
    match family {
        AF_INET => Some(IpAddr::V4(Ipv4Addr::new(raw[0], raw[1], raw[2], raw[3]))),
        AF_INET6 => Some(IpAddr::V6(Ipv6Addr::from(*raw))),
        _ => None,
    }
}

/// `None` for an all-zero or unknown-family tuple.
fn tuple(t: &Tuple) -> Option<FiveTuple> {
    Some(FiveTuple {
        proto: t.proto,
        src: SocketAddr::new(ip(t.family, &t.saddr)?, t.sport),
        dst: SocketAddr::new(ip(t.family, &t.daddr)?, t.dport),
    })
}

fn comm(raw: &[u8; 16]) -> String {
    let end = raw.iter().position(|&b| b == 0).unwrap_or(raw.len());
    String::from_utf8_lossy(&raw[..end]).into_owned()
}

fn task(t: &Task, known: bool) -> TaskInfo {
    TaskInfo {
        pid: known.then_some(t.pid),
        tid: known.then_some(t.tid),
        comm: known.then(|| comm(&t.comm)),
        cgroup_id: t.cgroup_id,
        netns: t.netns,
    }
}

fn captured(payload: &[u8], cap_len: u32) -> Result<Vec<u8>, DecodeError> {
    let n = cap_len as usize;
    if n > payload.len() {
        return Err(DecodeError::BadCapLen {
            cap_len,
            cap: payload.len(),
        });
    }
    Ok(payload[..n].to_vec())
}

/// Decodes one ring-buffer record.
pub fn decode(bytes: &[u8]) -> Result<Event, DecodeError> {
    let h: Header = read(bytes, "header")?;
    let kind = EventKind::from_u32(h.kind).ok_or(DecodeError::UnknownKind(h.kind))?;
    let source = SourceId::from_u16(h.source).ok_or(DecodeError::UnknownSource(h.source))?;
    let source = source_name(source);
    match kind {
        EventKind::DnsSend | EventKind::DnsRecv => {
            // The record's length says its payload capacity (the head is the same).
            const WHAT: &str = "DNS packet record";
            let ev = match bytes.len() {
                n if n == size_of::<DnsPacketSmall>() => {
                    dns_event::<DNS_PAYLOAD_SMALL>(bytes, source)?
                }
                n if n == size_of::<DnsPacket>() => dns_event::<DNS_PAYLOAD_CAP>(bytes, source)?,
                n if n < size_of::<DnsPacketSmall>() => {
                    return Err(DecodeError::Short {
                        what: WHAT,
                        need: size_of::<DnsPacketSmall>(),
                        got: n,
                    })
                }
                n => {
                    return Err(DecodeError::BadSize {
                        what: WHAT,
                        got: n,
                        sizes: DNS_SIZES,
                    })
                }
            };
            Ok(if kind == EventKind::DnsSend {
                Event::DnsSend(ev)
            } else {
                Event::DnsRecv(ev)
            })
        }
        EventKind::NfDrop | EventKind::CtClash => {
            let r: NfEvent = read(bytes, "netfilter record")?;
            let conntrack = (r.ct_flags & CT_FLAG_PRESENT != 0).then(|| Conntrack {
                status: r.ct_status,
                confirmed: r.ct_status & tracer_common::IPS_CONFIRMED != 0,
                orig: tuple(&r.ct_orig).unwrap_or(ZERO_TUPLE),
                reply: tuple(&r.ct_reply).unwrap_or(ZERO_TUPLE),
            });
            let ev = NfDropEvent {
                ts_ns: h.ts_ns,
                source,
                netns: r.netns,
                ifindex: r.ifindex,
                location: r.location,
                reason: r.reason,
                verdict: r.verdict,
                packet: tuple(&r.packet),
                conntrack,
                clash_winner: if r.ct_flags & CT_FLAG_OTHER != 0 {
                    tuple(&r.other)
                } else {
                    None
                },
                payload_len: r.payload_len,
                payload: captured(&r.payload[..DROP_PAYLOAD_CAP], r.cap_len)?,
            };
            Ok(if kind == EventKind::NfDrop {
                Event::NfDrop(ev)
            } else {
                Event::CtClash(ev)
            })
        }
    }
}

/// The event of a DNS record with room for `N` payload bytes (`bytes` is that long).
fn dns_event<const N: usize>(bytes: &[u8], source: &'static str) -> Result<DnsEvent, DecodeError> {
    let r: DnsPacketOf<N> = read(bytes, "DNS packet record")?;
    Ok(DnsEvent {
        ts_ns: r.header.ts_ns,
        source,
        task: task(&r.task, r.flags & DNS_FLAG_NO_TASK == 0),
        sock_cookie: r.sock_cookie,
        tuple: tuple(&r.tuple).unwrap_or(FiveTuple {
            proto: r.tuple.proto,
            src: SocketAddr::from(([0, 0, 0, 0], r.tuple.sport)),
            dst: SocketAddr::from(([0, 0, 0, 0], r.tuple.dport)),
        }),
        batch: r.flags & DNS_FLAG_BATCH != 0,
        batch_len: r.batch_len,
        payload_len: r.payload_len,
        payload: captured(&r.payload, r.cap_len)?,
    })
}

const ZERO_TUPLE: FiveTuple = FiveTuple {
    proto: 0,
    src: SocketAddr::V4(std::net::SocketAddrV4::new(Ipv4Addr::UNSPECIFIED, 0)),
    dst: SocketAddr::V4(std::net::SocketAddrV4::new(Ipv4Addr::UNSPECIFIED, 0)),
};

/// Encodes records the way the kernel lays them out: for tests, fuzzing and benchmarks.
pub mod encode {
    use tracer_common::{
        DnsPacket, DnsPacketOf, DnsPacketSmall, NfEvent, DNS_HEAD_LEN, DNS_PAYLOAD_SMALL,
    };

    fn bytes_of<T: Copy>(v: &T) -> Vec<u8> {
        let mut out = vec![0u8; std::mem::size_of::<T>()];
        // SAFETY: `out` has exactly size_of::<T>() bytes; T is a plain-integer record.
        unsafe { std::ptr::write_unaligned(out.as_mut_ptr().cast::<T>(), *v) };
        out
    }

    /// The record the kernel writes for `r`: the small one ([`DnsPacketSmall`], 256 bytes)
    /// when the whole payload fits it (and so does `cap_len`, which the kernel never sets
    /// past the capacity), else the full one (640 bytes).
    pub fn dns(r: &DnsPacket) -> Vec<u8> {
        if r.payload_len as usize <= DNS_PAYLOAD_SMALL && r.cap_len as usize <= DNS_PAYLOAD_SMALL {
            bytes_of(&small(r))
        } else {
            bytes_of(r)
        }
    }

    /// The full 640-byte record whatever the payload, as tracers before the small record
    /// wrote every DNS packet (old traces hold these).
    pub fn dns_full(r: &DnsPacket) -> Vec<u8> {
        bytes_of(r)
    }

    /// A record of any capacity, as it is.
    pub fn dns_of<const N: usize>(r: &DnsPacketOf<N>) -> Vec<u8> {
        bytes_of(r)
    }

    /// `r` in the small record: the same head and the first `DNS_PAYLOAD_SMALL` payload
    /// bytes.
    pub fn small(r: &DnsPacket) -> DnsPacketSmall {
        let full = bytes_of(r);
        let mut out = vec![0u8; std::mem::size_of::<DnsPacketSmall>()];
        out.copy_from_slice(&full[..DNS_HEAD_LEN + DNS_PAYLOAD_SMALL]);
        // SAFETY: `out` holds size_of::<DnsPacketSmall>() bytes; the record is plain
        // integers, so every bit pattern is a value.
        unsafe { std::ptr::read_unaligned(out.as_ptr().cast::<DnsPacketSmall>()) }
    }

    pub fn nf(r: &NfEvent) -> Vec<u8> {
        bytes_of(r)
    }
}

#[cfg(test)]
mod tests {
    use std::mem::offset_of;

    use proptest::prelude::*;
    use tracer_common::{Header, DNS_HEAD_LEN, IPPROTO_UDP};

    use super::*;

    fn dns_record(kind: EventKind, payload: &[u8]) -> DnsPacket {
        let mut r = DnsPacket {
            header: Header {
                kind: kind as u32,
                source: SourceId::CgroupSkbEgress as u16,
                _pad: 0,
                ts_ns: 42,
            },
            task: Task {
                pid: 7,
                tid: 8,
                cgroup_id: 9,
                comm: *b"dig\0\0\0\0\0\0\0\0\0\0\0\0\0",
                netns: 4026531840,
                _pad: 0,
            },
            tuple: Tuple {
                family: AF_INET,
                proto: IPPROTO_UDP,
                sport: 40000,
                dport: 53,
                ..Tuple::default()
            },
            sock_cookie: 77,
            ifindex: 0,
            flags: DNS_FLAG_BATCH,
            batch_len: 2,
            payload_len: payload.len() as u32,
            cap_len: payload.len() as u32,
            _pad: 0,
            payload: [0; DNS_PAYLOAD_CAP],
        };
        r.tuple.saddr[..4].copy_from_slice(&[10, 0, 0, 2]);
        r.tuple.daddr[..4].copy_from_slice(&[10, 0, 0, 1]);
        r.payload[..payload.len()].copy_from_slice(payload);
        r
    }

    #[test]
    fn dns_send_round_trip() {
        let bytes = encode::dns(&dns_record(EventKind::DnsSend, b"\x12\x34hello"));
        assert_eq!(bytes.len(), 256, "a short payload takes the small record");
        let Event::DnsSend(e) = decode(&bytes).unwrap() else {
            panic!("wrong kind")
        };
        assert_eq!(e.task.pid, Some(7));
        assert_eq!(e.task.comm.as_deref(), Some("dig"));
        assert_eq!(e.tuple.src, "10.0.0.2:40000".parse().unwrap());
        assert_eq!(e.tuple.dst, "10.0.0.1:53".parse().unwrap());
        assert!(e.batch);
        assert_eq!(e.batch_len, 2);
        assert_eq!(e.payload, b"\x12\x34hello");
        assert_eq!(e.source, "cgroup_skb/egress");
    }

    #[test]
    fn receive_without_owner_has_no_task() {
        let mut r = dns_record(EventKind::DnsRecv, b"x");
        r.flags = DNS_FLAG_NO_TASK;
        let Event::DnsRecv(e) = decode(&encode::dns(&r)).unwrap() else {
            panic!("wrong kind")
        };
        assert_eq!(e.task.pid, None);
        assert_eq!(e.task.netns, 4026531840);
    }

    /// Both record sizes, at and around the small capacity, decode to the same event; the
    /// encoder picks the size the kernel would.
    #[test]
    fn small_and_full_records_round_trip() {
        for n in [0, 1, 60, DNS_PAYLOAD_SMALL - 1, DNS_PAYLOAD_SMALL] {
            let payload: Vec<u8> = (0..n).map(|i| i as u8 ^ 0x5a).collect();
            let r = dns_record(EventKind::DnsRecv, &payload);
            let small = encode::dns(&r);
            assert_eq!(small.len(), size_of::<DnsPacketSmall>(), "{n} bytes");
            let full = encode::dns_full(&r);
            assert_eq!(full.len(), size_of::<DnsPacket>());
            assert_eq!(small[..DNS_HEAD_LEN], full[..DNS_HEAD_LEN], "the same head");
            let ev = decode(&small).unwrap();
            assert_eq!(
                ev,
                decode(&full).unwrap(),
                "{n} bytes: small and full agree"
            );
            let Event::DnsRecv(e) = ev else {
                panic!("wrong kind")
            };
            assert_eq!(e.payload, payload);
            assert_eq!(e.payload_len, n as u32);
            assert_eq!(e.ts_ns, 42);
        }
        for n in [DNS_PAYLOAD_SMALL + 1, 300, DNS_PAYLOAD_CAP] {
            let payload = vec![0xab; n];
            let bytes = encode::dns(&dns_record(EventKind::DnsSend, &payload));
            assert_eq!(bytes.len(), size_of::<DnsPacket>(), "{n} bytes");
            let Event::DnsSend(e) = decode(&bytes).unwrap() else {
                panic!("wrong kind")
            };
            assert_eq!(e.payload, payload);
        }
        // A payload longer than the capture: the full record, its first 512 bytes.
        let mut r = dns_record(EventKind::DnsRecv, &[7; DNS_PAYLOAD_CAP]);
        r.payload_len = 1400;
        let bytes = encode::dns(&r);
        assert_eq!(bytes.len(), size_of::<DnsPacket>());
        let Event::DnsRecv(e) = decode(&bytes).unwrap() else {
            panic!("wrong kind")
        };
        assert_eq!((e.payload_len, e.payload.len()), (1400, DNS_PAYLOAD_CAP));
    }

    /// What older tracers (and their traces) wrote: every DNS packet in a 640-byte record,
    /// the unused payload tail zero (a replayed trace) or garbage (the ring).
    #[test]
    fn old_full_records_decode_as_before() {
        let r = dns_record(EventKind::DnsSend, b"\x12\x34\x01\x00\x00\x01");
        let mut bytes = encode::dns_full(&r);
        let zero_tail = decode(&bytes).unwrap();
        for b in &mut bytes[DNS_HEAD_LEN + 6..] {
            *b = 0xAA;
        }
        assert_eq!(decode(&bytes).unwrap(), zero_tail);
        let Event::DnsSend(e) = zero_tail else {
            panic!("wrong kind")
        };
        assert_eq!(e.payload, b"\x12\x34\x01\x00\x00\x01");
        assert_eq!(e.source, "cgroup_skb/egress");
    }

    #[test]
    fn dns_records_of_other_sizes_are_typed_errors() {
        let r = dns_record(EventKind::DnsSend, b"abc");
        let full = encode::dns_full(&r);
        for len in [16, 100, 255] {
            assert_eq!(
                decode(&full[..len]),
                Err(DecodeError::Short {
                    what: "DNS packet record",
                    need: 256,
                    got: len
                }),
                "{len} bytes"
            );
        }
        for len in [257, 264, 639] {
            assert_eq!(
                decode(&full[..len]),
                Err(DecodeError::BadSize {
                    what: "DNS packet record",
                    got: len,
                    sizes: "256 or 640"
                }),
                "{len} bytes"
            );
        }
        let mut long = full.clone();
        long.extend_from_slice(&[0; 8]);
        assert!(matches!(
            decode(&long),
            Err(DecodeError::BadSize { got: 648, .. })
        ));
        // cap_len is held to the capacity of the record it is in.
        let mut r = dns_record(EventKind::DnsSend, b"");
        r.cap_len = DNS_PAYLOAD_SMALL as u32 + 1;
        let mut small = encode::dns_of(&encode::small(&r));
        assert_eq!(
            decode(&small),
            Err(DecodeError::BadCapLen {
                cap_len: DNS_PAYLOAD_SMALL as u32 + 1,
                cap: DNS_PAYLOAD_SMALL
            })
        );
        assert!(
            decode(&encode::dns_full(&r)).is_ok(),
            "fits the full record"
        );
        small[offset_of!(DnsPacketSmall, cap_len)] = DNS_PAYLOAD_SMALL as u8;
        assert!(decode(&small).is_ok());
        let msg = decode(&full[..300]).unwrap_err().to_string();
        assert_eq!(
            msg,
            "record of 300 bytes is no DNS packet record (those are 256 or 640 bytes long)"
        );
    }

    #[test]
    fn short_and_unknown_records_are_typed_errors() {
        let bytes = encode::dns(&dns_record(EventKind::DnsSend, b""));
        assert!(matches!(
            decode(&bytes[..10]),
            Err(DecodeError::Short { what: "header", .. })
        ));
        assert!(matches!(
            decode(&bytes[..100]),
            Err(DecodeError::Short {
                need: 256,
                got: 100,
                ..
            })
        ));
        let mut bad = bytes.clone();
        bad[0] = 99;
        assert_eq!(decode(&bad), Err(DecodeError::UnknownKind(99)));
        let mut bad = bytes.clone();
        bad[4] = 0xee;
        assert_eq!(decode(&bad), Err(DecodeError::UnknownSource(0xee)));
        let mut r = dns_record(EventKind::DnsSend, b"");
        r.cap_len = 10_000;
        assert!(matches!(
            decode(&encode::dns(&r)),
            Err(DecodeError::BadCapLen { .. })
        ));
    }

    #[test]
    fn nf_drop_with_conntrack() {
        let mut r: NfEvent = unsafe { std::mem::zeroed() };
        r.header = Header {
            kind: EventKind::NfDrop as u32,
            source: SourceId::TpBtfKfreeSkb as u16,
            _pad: 0,
            ts_ns: 1,
        };
        r.ct_flags = CT_FLAG_PRESENT;
        r.ct_status = tracer_common::IPS_CONFIRMED | tracer_common::IPS_DST_NAT;
        r.ct_orig = Tuple {
            family: AF_INET6,
            proto: IPPROTO_UDP,
            sport: 1,
            dport: 53,
            ..Tuple::default()
        };
        r.ct_orig.daddr[15] = 1;
        r.packet = r.ct_orig;
        r.cap_len = 3;
        r.payload[..3].copy_from_slice(b"abc");
        let Event::NfDrop(e) = decode(&encode::nf(&r)).unwrap() else {
            panic!("wrong kind")
        };
        let ct = e.conntrack.unwrap();
        assert!(ct.confirmed);
        assert_eq!(ct.orig.dst, "[::1]:53".parse().unwrap());
        assert_eq!(e.packet.unwrap().dst.port(), 53);
        assert_eq!(e.payload, b"abc");
        assert_eq!(e.clash_winner, None);
    }

    proptest! {
        /// Arbitrary bytes never panic the decoder, and anything it accepts re-serializes.
        #[test]
        fn decode_never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..1024)) {
            if let Ok(ev) = decode(&bytes) {
                serde_json::to_string(&ev).unwrap();
            }
        }

        /// Valid headers with arbitrary bodies and lengths: the typed result their length
        /// and kind call for, no panic. A record shorter than its header or its body is
        /// `Short`; a DNS record decodes only at one of its two sizes (else `Short` or
        /// `BadSize`); a whole one is an event of its own kind, or `BadCapLen` when the
        /// arbitrary body claims more payload than the record holds. Source 11 is unknown:
        /// `UnknownSource` once the header is whole.
        #[test]
        fn decode_truncated_valid_records(kind in 1u32..=4, source in 1u16..=11, len in 0usize..700, fill in any::<u8>()) {
            let mut bytes = vec![fill; len.max(16)];
            bytes[..4].copy_from_slice(&kind.to_ne_bytes());
            bytes[4..6].copy_from_slice(&source.to_ne_bytes());
            bytes.truncate(len);
            let got = decode(&bytes);
            let dns = kind == 1 || kind == 2;
            let whole = if dns {
                len == size_of::<DnsPacketSmall>() || len == size_of::<DnsPacket>()
            } else {
                len >= size_of::<NfEvent>()
            };
            match got {
                Ok(ev) => {
                    prop_assert!(whole, "{len}-byte record of kind {kind} decoded");
                    let same = matches!(
                        (kind, &ev),
                        (1, Event::DnsSend(_)) | (2, Event::DnsRecv(_))
                            | (3, Event::NfDrop(_)) | (4, Event::CtClash(_))
                    );
                    prop_assert!(same, "kind {kind} decoded as {ev:?}");
                }
                Err(DecodeError::BadCapLen { .. }) => prop_assert!(whole, "{len} bytes"),
                Err(DecodeError::Short { need, got, .. }) => {
                    prop_assert!(!whole && got == len && need > len, "{len} bytes: need {need}");
                }
                Err(DecodeError::UnknownSource(s)) => {
                    // 11 is one past the last source: a whole header, an unknown source.
                    prop_assert!(s == source && SourceId::from_u16(source).is_none());
                }
                Err(DecodeError::BadSize { got, .. }) => {
                    prop_assert!(dns && !whole && got == len && len > size_of::<DnsPacketSmall>());
                }
                Err(e) => prop_assert!(false, "{len} bytes of kind {kind}: {e}"),
            }
        }

        /// A valid DNS record (either size) cut anywhere short of its length is an error;
        /// whole, it decodes, and to the same event as its full-size twin.
        #[test]
        fn decode_cut_dns_records(payload in proptest::collection::vec(any::<u8>(), 0..=DNS_PAYLOAD_CAP), recv in any::<bool>(), cut in any::<prop::sample::Index>()) {
            let kind = if recv { EventKind::DnsRecv } else { EventKind::DnsSend };
            let r = dns_record(kind, &payload);
            let bytes = encode::dns(&r);
            let whole = decode(&bytes).unwrap();
            prop_assert_eq!(&whole, &decode(&encode::dns_full(&r)).unwrap());
            let (Event::DnsSend(e) | Event::DnsRecv(e)) = &whole else { unreachable!() };
            prop_assert_eq!(&e.payload, &payload);
            let at = cut.index(bytes.len());
            prop_assert!(decode(&bytes[..at]).is_err(), "cut at {} of {}", at, bytes.len());
        }
    }
}

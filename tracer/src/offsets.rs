//! Fills [`KernelOffsets`] from the running kernel's BTF.
//!
//! [`TABLE`] is the single source of truth: one row per `KernelOffsets` field, with the
//! `struct.path` (or `enum::VARIANT`) candidates tried in order, newest layout first. A field
//! none of whose candidates resolves stays [`OFFSET_NONE`] and the report says why.
//!
//! Layout notes (kernels 5.10 .. 6.18):
//! - `sk_buff.{network,transport}_header`/`protocol` sit in the anonymous half of
//!   `struct_group(headers)` since 5.15, directly in `sk_buff` before; `dev`/`sk` sit in
//!   anonymous unions. The path walker looks through anonymous members, so one path covers all.
//! - `sock.sk_cookie` and friends are `#define`s for `__sk_common.skc_*`: BTF only knows the
//!   `sock_common` names.
//! - `net.ns` is `struct ns_common` in every supported kernel; 6.18 reworked `ns_common`
//!   (`ns_type`, `__ns_ref`, `ns_id`, ...) but `inum` is still a plain `unsigned int` member.
//! - `iov_iter`: `iter_type` (u8) since 5.14 (before: `unsigned int type` mixing in the
//!   direction bit, deliberately not a candidate); `ubuf`/`ITER_UBUF` since 6.0; `iov` was
//!   renamed `__iov` in 6.4; `count` moved into an anonymous struct in 6.0.
//! - `SKB_DROP_REASON_NETFILTER_DROP` exists since 5.17.

use std::fmt::Write as _;

use tracer_common::{KernelOffsets, OFFSET_NONE};

use crate::btf::KernelBtf;

/// How wide the value a program reads at the offset is, checked against BTF so that a
/// same-named member of another width (a different kernel's meaning) is not taken.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Width {
    /// Any size (the program reads a sub-structure by further offsets).
    Any,
    /// Exactly this many bytes.
    Bytes(u32),
    /// A pointer or `long` (the kernel's `long unsigned int`).
    Word,
}

#[derive(Clone, Copy, Debug)]
enum Kind {
    /// Candidates are `struct.member.path`.
    Member(Width),
    /// Candidates are `enum_name::VARIANT`.
    Enum,
}

struct FieldSpec {
    /// The `KernelOffsets` field name.
    name: &'static str,
    kind: Kind,
    candidates: &'static [&'static str],
    slot: fn(&mut KernelOffsets) -> &mut u32,
}

macro_rules! member {
    ($field:ident, $width:expr, [$($c:literal),+ $(,)?]) => {
        FieldSpec {
            name: stringify!($field),
            kind: Kind::Member($width),
            candidates: &[$($c),+],
            slot: |o: &mut KernelOffsets| &mut o.$field,
        }
    };
}

macro_rules! enum_value {
    ($field:ident, [$($c:literal),+ $(,)?]) => {
        FieldSpec {
            name: stringify!($field),
            kind: Kind::Enum,
            candidates: &[$($c),+],
            slot: |o: &mut KernelOffsets| &mut o.$field,
        }
    };
}

use Width::{Any, Bytes, Word};

/// Every `KernelOffsets` field except `_pad`, in declaration order.
static TABLE: &[FieldSpec] = &[
    // struct sk_buff
    member!(skb_head, Word, ["sk_buff.head"]),
    member!(skb_len, Bytes(4), ["sk_buff.len"]),
    member!(skb_network_header, Bytes(2), ["sk_buff.network_header"]),
    member!(skb_transport_header, Bytes(2), ["sk_buff.transport_header"]),
    member!(skb_protocol, Bytes(2), ["sk_buff.protocol"]),
    member!(skb_nfct, Word, ["sk_buff._nfct"]),
    member!(skb_dev, Word, ["sk_buff.dev"]),
    member!(skb_sk, Word, ["sk_buff.sk"]),
    // struct net_device
    member!(dev_nd_net, Word, ["net_device.nd_net.net"]),
    member!(dev_ifindex, Bytes(4), ["net_device.ifindex"]),
    // struct net
    member!(net_inum, Bytes(4), ["net.ns.inum"]),
    // struct nf_conn
    member!(ct_status, Word, ["nf_conn.status"]),
    member!(ct_tuple_orig, Any, ["nf_conn.tuplehash[0].tuple"]),
    member!(ct_tuple_reply, Any, ["nf_conn.tuplehash[1].tuple"]),
    member!(ct_net, Word, ["nf_conn.ct_net.net"]),
    // struct nf_conntrack_tuple_hash
    member!(tuplehash_tuple, Any, ["nf_conntrack_tuple_hash.tuple"]),
    // struct nf_conntrack_tuple
    member!(tuple_src_u3, Bytes(16), ["nf_conntrack_tuple.src.u3"]),
    member!(tuple_src_port, Bytes(2), ["nf_conntrack_tuple.src.u.all"]),
    member!(tuple_src_l3num, Bytes(2), ["nf_conntrack_tuple.src.l3num"]),
    member!(tuple_dst_u3, Bytes(16), ["nf_conntrack_tuple.dst.u3"]),
    member!(tuple_dst_port, Bytes(2), ["nf_conntrack_tuple.dst.u.all"]),
    member!(
        tuple_dst_protonum,
        Bytes(1),
        ["nf_conntrack_tuple.dst.protonum"]
    ),
    // struct task_struct / nsproxy
    member!(task_nsproxy, Word, ["task_struct.nsproxy"]),
    member!(task_pid, Bytes(4), ["task_struct.pid"]),
    member!(task_tgid, Bytes(4), ["task_struct.tgid"]),
    member!(task_comm, Bytes(16), ["task_struct.comm"]),
    member!(nsproxy_net_ns, Word, ["nsproxy.net_ns"]),
    // struct sock / sock_common
    member!(sk_net, Word, ["sock.__sk_common.skc_net.net"]),
    member!(sk_cookie, Bytes(8), ["sock.__sk_common.skc_cookie"]),
    member!(sk_family, Bytes(2), ["sock.__sk_common.skc_family"]),
    member!(sk_daddr, Bytes(4), ["sock.__sk_common.skc_daddr"]),
    member!(sk_rcv_saddr, Bytes(4), ["sock.__sk_common.skc_rcv_saddr"]),
    member!(sk_dport, Bytes(2), ["sock.__sk_common.skc_dport"]),
    member!(sk_num, Bytes(2), ["sock.__sk_common.skc_num"]),
    member!(sk_v6_daddr, Bytes(16), ["sock.__sk_common.skc_v6_daddr"]),
    member!(
        sk_v6_rcv_saddr,
        Bytes(16),
        ["sock.__sk_common.skc_v6_rcv_saddr"]
    ),
    // struct msghdr / iov_iter
    member!(msg_name, Word, ["msghdr.msg_name"]),
    member!(msg_iter, Any, ["msghdr.msg_iter"]),
    member!(iter_type, Bytes(1), ["iov_iter.iter_type"]),
    member!(iter_ubuf, Word, ["iov_iter.ubuf"]),
    member!(iter_iov, Word, ["iov_iter.__iov", "iov_iter.iov"]),
    member!(iter_count, Word, ["iov_iter.count"]),
    member!(iter_offset, Word, ["iov_iter.iov_offset"]),
    // enum values
    enum_value!(iter_type_ubuf, ["iter_type::ITER_UBUF"]),
    enum_value!(iter_type_iovec, ["iter_type::ITER_IOVEC"]),
    enum_value!(
        drop_reason_netfilter,
        ["skb_drop_reason::SKB_DROP_REASON_NETFILTER_DROP"]
    ),
];

/// How one `KernelOffsets` field was resolved.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct FieldReport {
    /// The `KernelOffsets` field name.
    pub name: &'static str,
    /// `struct.path` (or `enum::VARIANT`) candidates, tried in order.
    pub candidates: &'static [&'static str],
    /// The candidate that matched and the offset (or enum value) it gave.
    pub resolved: Option<(String, u32)>,
    /// Why each candidate failed, when none matched.
    pub error: Option<String>,
}

/// The offsets for the running kernel and how each was found.
#[derive(Clone, Debug)]
pub struct Resolved {
    pub offsets: KernelOffsets,
    pub fields: Vec<FieldReport>,
}

impl Resolved {
    /// Fields the kernel does not have (left at [`OFFSET_NONE`]).
    pub fn missing(&self) -> impl Iterator<Item = &FieldReport> {
        self.fields.iter().filter(|f| f.resolved.is_none())
    }

    /// The report for the `KernelOffsets` field `name`.
    pub fn field(&self, name: &str) -> Option<&FieldReport> {
        self.fields.iter().find(|f| f.name == name)
    }

    /// One line per field: name, matched path, offset (or enum value) — or why it is missing.
    pub fn report_table(&self) -> String {
        let name_w = self.fields.iter().map(|f| f.name.len()).max().unwrap_or(0);
        let path_w = self
            .fields
            .iter()
            .map(|f| match &f.resolved {
                Some((p, _)) => p.len(),
                None => 0,
            })
            .max()
            .unwrap_or(0);
        let mut out = String::new();
        for f in &self.fields {
            match &f.resolved {
                Some((path, v)) => {
                    let _ = writeln!(out, "{:name_w$}  {path:path_w$}  {v}", f.name);
                }
                None => {
                    let why = f.error.as_deref().unwrap_or("no candidate");
                    let _ = writeln!(out, "{:name_w$}  missing: {why}", f.name);
                }
            }
        }
        out
    }
}

/// Resolves every `KernelOffsets` field against `btf`.
pub fn resolve(btf: &KernelBtf) -> Resolved {
    let word = btf.type_size("long unsigned int").unwrap_or(8);
    let mut offsets = KernelOffsets::NONE;
    let mut fields = Vec::with_capacity(TABLE.len());
    for spec in TABLE {
        let mut errors = Vec::new();
        let mut resolved = None;
        for &cand in spec.candidates {
            match resolve_candidate(btf, spec.kind, cand, word) {
                Ok(v) => {
                    resolved = Some((cand.to_string(), v));
                    break;
                }
                Err(e) => errors.push(format!("{cand}: {e}")),
            }
        }
        if let Some((_, v)) = &resolved {
            *(spec.slot)(&mut offsets) = *v;
        }
        fields.push(FieldReport {
            name: spec.name,
            candidates: spec.candidates,
            error: resolved.is_none().then(|| errors.join("; ")),
            resolved,
        });
    }
    Resolved { offsets, fields }
}

fn resolve_candidate(btf: &KernelBtf, kind: Kind, cand: &str, word: u32) -> Result<u32, String> {
    match kind {
        Kind::Member(width) => {
            let (strukt, path) = cand
                .split_once('.')
                .ok_or_else(|| "candidate is not `struct.path`".to_string())?;
            let m = btf.member(strukt, path).map_err(|e| e.to_string())?;
            if m.bitfield {
                return Err("is a bitfield".to_string());
            }
            let want = match width {
                Width::Any => None,
                Width::Bytes(n) => Some(n),
                Width::Word => Some(word),
            };
            if let Some(want) = want {
                if m.size != want {
                    return Err(format!("is {} bytes, programs read {want}", m.size));
                }
            }
            if m.byte_offset == OFFSET_NONE {
                return Err("offset collides with OFFSET_NONE".to_string());
            }
            Ok(m.byte_offset)
        }
        Kind::Enum => {
            let (name, variant) = cand
                .split_once("::")
                .ok_or_else(|| "candidate is not `enum::VARIANT`".to_string())?;
            let v = btf.enum_value(name, variant).map_err(|e| e.to_string())?;
            match u32::try_from(v) {
                Ok(v) if v != OFFSET_NONE => Ok(v),
                _ => Err(format!("value {v} does not fit the u32 slot")),
            }
        }
    }
}

/// The value of the `KernelOffsets` field called `name`; `None` for an unknown name.
pub fn field_value(offsets: &KernelOffsets, name: &str) -> Option<u32> {
    let mut copy = *offsets;
    TABLE
        .iter()
        .find(|f| f.name == name)
        .map(|f| *(f.slot)(&mut copy))
}

#[cfg(test)]
mod tests {
    use std::collections::HashSet;
    use std::mem::size_of;

    use super::*;

    const FIELDS: usize = size_of::<KernelOffsets>() / 4;

    fn as_words(o: &KernelOffsets) -> [u32; FIELDS] {
        // SAFETY: KernelOffsets is #[repr(C)], made only of u32s, no padding (size asserted
        // in tracer-common), so it has the layout of [u32; FIELDS].
        unsafe { core::mem::transmute_copy(o) }
    }

    #[test]
    fn table_covers_every_field_once() {
        // `_pad` is the last word and not in the table.
        assert_eq!(TABLE.len(), FIELDS - 1);
        let mut o = KernelOffsets::NONE;
        for (i, spec) in TABLE.iter().enumerate() {
            let slot = (spec.slot)(&mut o);
            assert_eq!(*slot, OFFSET_NONE, "{} written twice", spec.name);
            *slot = i as u32;
        }
        let words = as_words(&o);
        for (i, w) in words[..FIELDS - 1].iter().enumerate() {
            assert_eq!(*w, i as u32, "word {i} not covered in declaration order");
        }
        assert_eq!(words[FIELDS - 1], 0, "_pad touched");
        let names: HashSet<_> = TABLE.iter().map(|s| s.name).collect();
        assert_eq!(names.len(), TABLE.len());
    }

    #[test]
    fn candidates_are_well_formed() {
        for spec in TABLE {
            assert!(!spec.candidates.is_empty(), "{}", spec.name);
            for cand in spec.candidates {
                match spec.kind {
                    Kind::Member(_) => {
                        let (s, p) = cand.split_once('.').expect(cand);
                        assert!(!s.is_empty(), "{cand}");
                        crate::btf::parse_path(p).unwrap_or_else(|e| panic!("{cand}: {e}"));
                    }
                    Kind::Enum => {
                        let (e, v) = cand.split_once("::").expect(cand);
                        assert!(!e.is_empty() && !v.is_empty(), "{cand}");
                    }
                }
            }
        }
    }

    #[test]
    fn report_table_lists_paths_and_reasons() {
        let mut offsets = KernelOffsets::NONE;
        offsets.skb_len = 112;
        let r = Resolved {
            offsets,
            fields: vec![
                FieldReport {
                    name: "skb_len",
                    candidates: &["sk_buff.len"],
                    resolved: Some(("sk_buff.len".to_string(), 112)),
                    error: None,
                },
                FieldReport {
                    name: "iter_ubuf",
                    candidates: &["iov_iter.ubuf"],
                    resolved: None,
                    error: Some("iov_iter.ubuf: no member".to_string()),
                },
            ],
        };
        let t = r.report_table();
        let lines: Vec<_> = t.lines().collect();
        assert_eq!(lines.len(), 2);
        assert!(lines[0].starts_with("skb_len") && lines[0].contains("sk_buff.len"));
        assert!(lines[0].ends_with("112"));
        assert!(lines[1].contains("missing: iov_iter.ubuf: no member"));
        assert_eq!(r.missing().count(), 1);
        assert_eq!(
            r.field("skb_len").unwrap().resolved.as_ref().unwrap().1,
            112
        );
    }
}

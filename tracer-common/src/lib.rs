//! Records shared between the kernel programs (`tracer-ebpf`) and userspace (`tracer`).
//!
//! Rules every type here follows:
//! - `#[repr(C)]`, no implicit padding (explicit `_pad` fields), no `bool`;
//! - a size assertion, so a layout change is a compile error on both sides;
//! - every ring-buffer record starts with [`Header`], whose `kind` is one of the fixed
//!   [`EventKind`] numbers; userspace decodes with `TryFrom`, never `transmute`.
#![no_std]

use core::mem::size_of;

/// Bumped whenever a record layout or a tag's meaning changes.
pub const ABI_VERSION: u32 = 2;

pub const COMM_LEN: usize = 16;
/// Bytes of UDP payload captured for DNS sends and receives.
pub const DNS_PAYLOAD_CAP: usize = 512;
/// Payload capacity of the small DNS record ([`DnsPacketSmall`]), used when the whole UDP
/// payload fits: a glibc or musl query and a one-record answer do (docs/design.md, "Loss
/// accounting"). A power of two, like [`DNS_PAYLOAD_CAP`] (the kernel's bounds need it).
pub const DNS_PAYLOAD_SMALL: usize = 128;
/// Bytes of transport payload captured for netfilter drops.
pub const DROP_PAYLOAD_CAP: usize = 64;

/// Record tags. Numbers are part of the ABI: never reuse one.
#[repr(u32)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum EventKind {
    DnsSend = 1,
    DnsRecv = 2,
    NfDrop = 3,
    CtClash = 4,
}

impl EventKind {
    pub const fn from_u32(v: u32) -> Option<Self> {
        match v {
            1 => Some(Self::DnsSend),
            2 => Some(Self::DnsRecv),
            3 => Some(Self::NfDrop),
            4 => Some(Self::CtClash),
            _ => None,
        }
    }
}

/// Which kernel program produced a record. Numbers are part of the ABI.
#[repr(u16)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SourceId {
    FentryUdpSendmsg = 1,
    FentryUdpv6Sendmsg = 2,
    CgroupSkbEgress = 3,
    FentrySkbConsumeUdp = 4,
    CgroupSkbIngress = 5,
    FexitNfConntrackConfirm = 6,
    FexitNfCtResolveClash = 7,
    TpBtfKfreeSkb = 8,
    KretprobeNfConntrackConfirm = 9,
    KretprobeNfCtResolveClash = 10,
}

impl SourceId {
    pub const fn from_u16(v: u16) -> Option<Self> {
        match v {
            1 => Some(Self::FentryUdpSendmsg),
            2 => Some(Self::FentryUdpv6Sendmsg),
            3 => Some(Self::CgroupSkbEgress),
            4 => Some(Self::FentrySkbConsumeUdp),
            5 => Some(Self::CgroupSkbIngress),
            6 => Some(Self::FexitNfConntrackConfirm),
            7 => Some(Self::FexitNfCtResolveClash),
            8 => Some(Self::TpBtfKfreeSkb),
            9 => Some(Self::KretprobeNfConntrackConfirm),
            10 => Some(Self::KretprobeNfCtResolveClash),
            _ => None,
        }
    }
}

#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Header {
    /// An [`EventKind`] number.
    pub kind: u32,
    /// A [`SourceId`] number.
    pub source: u16,
    pub _pad: u16,
    /// `bpf_ktime_get_ns()` (CLOCK_MONOTONIC).
    pub ts_ns: u64,
}
const _: () = assert!(size_of::<Header>() == 16);

/// `AF_INET` / `AF_INET6` as the kernel uses them.
pub const AF_INET: u8 = 2;
pub const AF_INET6: u8 = 10;
pub const IPPROTO_TCP: u8 = 6;
pub const IPPROTO_UDP: u8 = 17;

/// A 5-tuple. IPv4 addresses sit in the first 4 bytes of `saddr`/`daddr`; ports are in
/// host byte order.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Tuple {
    pub saddr: [u8; 16],
    pub daddr: [u8; 16],
    pub sport: u16,
    pub dport: u16,
    /// [`AF_INET`] or [`AF_INET6`]; 0 when unknown.
    pub family: u8,
    /// IP protocol number.
    pub proto: u8,
    pub _pad: [u8; 2],
}
const _: () = assert!(size_of::<Tuple>() == 40);

/// The task a packet was sent or received by.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Task {
    /// Thread group id (the "pid" users know).
    pub pid: u32,
    pub tid: u32,
    /// cgroup v2 id of the socket (egress) or of the task.
    pub cgroup_id: u64,
    pub comm: [u8; COMM_LEN],
    /// Inode number of the network namespace.
    pub netns: u32,
    pub _pad: u32,
}
const _: () = assert!(size_of::<Task>() == 40);

/// `DnsPacketOf::flags`: the send was part of a `sendmmsg(2)` batch.
pub const DNS_FLAG_BATCH: u32 = 1 << 0;
/// `DnsPacketOf::flags`: the task fields are not the packet's owner (softirq context).
pub const DNS_FLAG_NO_TASK: u32 = 1 << 1;

/// A UDP datagram to (send) or from (receive) one of the configured ports, with room for
/// `N` bytes of its payload. Two sizes exist, [`DnsPacket`] (the full capture) and
/// [`DnsPacketSmall`]: the kernel reserves the small one when the whole payload fits it, so a
/// typical query or one-record answer takes 256 bytes of the ring instead of 640. Both share
/// the same head (every field before `payload`, [`DNS_HEAD_LEN`] bytes); a record's length
/// says which one it is.
#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct DnsPacketOf<const N: usize> {
    pub header: Header,
    pub task: Task,
    /// Source and destination as on the wire (receive: the server is `saddr`).
    pub tuple: Tuple,
    /// `SO_COOKIE` of the socket; 0 when the source can not see the socket.
    pub sock_cookie: u64,
    pub ifindex: u32,
    /// `DNS_FLAG_*` bits.
    pub flags: u32,
    /// Messages in the `sendmmsg` batch (0 when not batched).
    pub batch_len: u32,
    /// Full UDP payload length.
    pub payload_len: u32,
    /// Bytes of `payload` that are valid.
    pub cap_len: u32,
    pub _pad: u32,
    pub payload: [u8; N],
}

/// The full DNS record: up to [`DNS_PAYLOAD_CAP`] bytes of payload.
pub type DnsPacket = DnsPacketOf<DNS_PAYLOAD_CAP>;
/// The small DNS record, for a payload of at most [`DNS_PAYLOAD_SMALL`] bytes.
pub type DnsPacketSmall = DnsPacketOf<DNS_PAYLOAD_SMALL>;

/// Bytes of a DNS record before its payload (the same for every capacity).
pub const DNS_HEAD_LEN: usize = 128;
const _: () = assert!(size_of::<DnsPacket>() == 640);
const _: () = assert!(size_of::<DnsPacketSmall>() == 256);
const _: () = assert!(core::mem::offset_of!(DnsPacket, payload) == DNS_HEAD_LEN);
const _: () = assert!(core::mem::offset_of!(DnsPacketSmall, payload) == DNS_HEAD_LEN);
const _: () = assert!(
    core::mem::offset_of!(DnsPacket, cap_len) == core::mem::offset_of!(DnsPacketSmall, cap_len)
);
// Ring-buffer records are 8-byte aligned: no hidden tail padding in either size.
const _: () = assert!(DNS_HEAD_LEN.is_multiple_of(8) && DNS_PAYLOAD_CAP.is_multiple_of(8));
const _: () = assert!(DNS_PAYLOAD_SMALL.is_multiple_of(8) && DNS_PAYLOAD_SMALL < DNS_PAYLOAD_CAP);

/// The payload capacity of a DNS record `len` bytes long, or `None` when no DNS record has
/// that length.
pub const fn dns_payload_cap(len: usize) -> Option<usize> {
    if len == size_of::<DnsPacketSmall>() {
        Some(DNS_PAYLOAD_SMALL)
    } else if len == size_of::<DnsPacket>() {
        Some(DNS_PAYLOAD_CAP)
    } else {
        None
    }
}

/// `NfEvent::ct_flags`: the skb carried a conntrack entry.
pub const CT_FLAG_PRESENT: u32 = 1 << 0;
/// `NfEvent::ct_flags`: `other` holds a valid tuple (the clash winner).
pub const CT_FLAG_OTHER: u32 = 1 << 1;

/// Conntrack status bits (`enum ip_conntrack_status`, uapi: stable).
pub const IPS_EXPECTED: u64 = 1 << 0;
pub const IPS_SEEN_REPLY: u64 = 1 << 1;
pub const IPS_ASSURED: u64 = 1 << 2;
pub const IPS_CONFIRMED: u64 = 1 << 3;
pub const IPS_SRC_NAT: u64 = 1 << 4;
pub const IPS_DST_NAT: u64 = 1 << 5;
pub const IPS_SRC_NAT_DONE: u64 = 1 << 7;
pub const IPS_DST_NAT_DONE: u64 = 1 << 8;
pub const IPS_DYING: u64 = 1 << 9;
pub const IPS_TEMPLATE: u64 = 1 << 11;
pub const IPS_NAT_CLASH: u64 = 1 << 12;

/// A netfilter drop (`kind = NfDrop`) or a conntrack insert clash (`kind = CtClash`).
#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct NfEvent {
    pub header: Header,
    /// Kernel text address the drop was reported from (`kfree_skb` location), or 0.
    pub location: u64,
    pub netns: u32,
    pub ifindex: u32,
    /// `enum skb_drop_reason` value (kernel-specific numbering), or 0.
    pub reason: u32,
    /// `CT_FLAG_*` bits.
    pub ct_flags: u32,
    /// `nf_conn::status` (`IPS_*` bits).
    pub ct_status: u64,
    /// Return value of the hooked function (fexit sources), else 0.
    pub verdict: i32,
    pub _pad: u32,
    /// The packet's own headers.
    pub packet: Tuple,
    /// The skb's conntrack entry, original direction.
    pub ct_orig: Tuple,
    /// The skb's conntrack entry, reply direction.
    pub ct_reply: Tuple,
    /// The entry the packet clashed with (original direction), when known.
    pub other: Tuple,
    pub payload_len: u32,
    pub cap_len: u32,
    pub payload: [u8; DROP_PAYLOAD_CAP],
}
const _: () = assert!(size_of::<NfEvent>() == 288);

/// Marks an offset the running kernel's BTF does not have.
pub const OFFSET_NONE: u32 = u32::MAX;

/// Byte offsets of the kernel struct fields the programs read, resolved from the running
/// kernel's BTF at load time and handed to the programs as a read-only global.
/// [`OFFSET_NONE`] marks a field the kernel does not have; a program that needs it is not
/// loaded (the probe plan says so).
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct KernelOffsets {
    // struct sk_buff
    pub skb_head: u32,
    pub skb_len: u32,
    pub skb_network_header: u32,
    pub skb_transport_header: u32,
    pub skb_protocol: u32,
    pub skb_nfct: u32,
    pub skb_dev: u32,
    pub skb_sk: u32,
    // struct net_device
    pub dev_nd_net: u32,
    pub dev_ifindex: u32,
    // struct net
    pub net_inum: u32,
    // struct nf_conn
    pub ct_status: u32,
    pub ct_tuple_orig: u32,
    pub ct_tuple_reply: u32,
    pub ct_net: u32,
    // struct nf_conntrack_tuple_hash
    pub tuplehash_tuple: u32,
    // struct nf_conntrack_tuple
    pub tuple_src_u3: u32,
    pub tuple_src_port: u32,
    pub tuple_src_l3num: u32,
    pub tuple_dst_u3: u32,
    pub tuple_dst_port: u32,
    pub tuple_dst_protonum: u32,
    // struct task_struct / nsproxy
    pub task_nsproxy: u32,
    pub task_pid: u32,
    pub task_tgid: u32,
    pub task_comm: u32,
    pub nsproxy_net_ns: u32,
    // struct sock / sock_common
    pub sk_net: u32,
    pub sk_cookie: u32,
    pub sk_family: u32,
    pub sk_daddr: u32,
    pub sk_rcv_saddr: u32,
    pub sk_dport: u32,
    pub sk_num: u32,
    pub sk_v6_daddr: u32,
    pub sk_v6_rcv_saddr: u32,
    // struct msghdr / iov_iter
    pub msg_name: u32,
    pub msg_iter: u32,
    pub iter_type: u32,
    pub iter_ubuf: u32,
    pub iter_iov: u32,
    pub iter_count: u32,
    pub iter_offset: u32,
    // enum values
    pub iter_type_ubuf: u32,
    pub iter_type_iovec: u32,
    /// `SKB_DROP_REASON_NETFILTER_DROP`.
    pub drop_reason_netfilter: u32,
    pub _pad: u32,
}
const _: () = assert!(size_of::<KernelOffsets>() == 47 * 4);

impl KernelOffsets {
    pub const NONE: Self = Self {
        skb_head: OFFSET_NONE,
        skb_len: OFFSET_NONE,
        skb_network_header: OFFSET_NONE,
        skb_transport_header: OFFSET_NONE,
        skb_protocol: OFFSET_NONE,
        skb_nfct: OFFSET_NONE,
        skb_dev: OFFSET_NONE,
        skb_sk: OFFSET_NONE,
        dev_nd_net: OFFSET_NONE,
        dev_ifindex: OFFSET_NONE,
        net_inum: OFFSET_NONE,
        ct_status: OFFSET_NONE,
        ct_tuple_orig: OFFSET_NONE,
        ct_tuple_reply: OFFSET_NONE,
        ct_net: OFFSET_NONE,
        tuplehash_tuple: OFFSET_NONE,
        tuple_src_u3: OFFSET_NONE,
        tuple_src_port: OFFSET_NONE,
        tuple_src_l3num: OFFSET_NONE,
        tuple_dst_u3: OFFSET_NONE,
        tuple_dst_port: OFFSET_NONE,
        tuple_dst_protonum: OFFSET_NONE,
        task_nsproxy: OFFSET_NONE,
        task_pid: OFFSET_NONE,
        task_tgid: OFFSET_NONE,
        task_comm: OFFSET_NONE,
        nsproxy_net_ns: OFFSET_NONE,
        sk_net: OFFSET_NONE,
        sk_cookie: OFFSET_NONE,
        sk_family: OFFSET_NONE,
        sk_daddr: OFFSET_NONE,
        sk_rcv_saddr: OFFSET_NONE,
        sk_dport: OFFSET_NONE,
        sk_num: OFFSET_NONE,
        sk_v6_daddr: OFFSET_NONE,
        sk_v6_rcv_saddr: OFFSET_NONE,
        msg_name: OFFSET_NONE,
        msg_iter: OFFSET_NONE,
        iter_type: OFFSET_NONE,
        iter_ubuf: OFFSET_NONE,
        iter_iov: OFFSET_NONE,
        iter_count: OFFSET_NONE,
        iter_offset: OFFSET_NONE,
        iter_type_ubuf: OFFSET_NONE,
        iter_type_iovec: OFFSET_NONE,
        drop_reason_netfilter: OFFSET_NONE,
        _pad: 0,
    };
}

/// Number of 64-bit words in the port bitmap map (`PORTS`): one bit per UDP port.
pub const PORT_WORDS: u32 = 65536 / 64;

#[cfg(feature = "user")]
mod user {
    // SAFETY: every type below is `#[repr(C)]`, `Copy`, made only of integers and integer
    // arrays, and has no implicit padding (asserted by the size checks above), so every bit
    // pattern is a valid value.
    unsafe impl aya::Pod for super::Header {}
    // SAFETY: see above.
    unsafe impl aya::Pod for super::KernelOffsets {}
}

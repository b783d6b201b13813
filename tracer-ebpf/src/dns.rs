//! DNS send and receive: UDP datagrams to (send) or from (receive) the configured ports.
//!
//! Sources, most precise first (the loader picks per kernel):
//! - send: fentry `udp_sendmsg` / `udpv6_sendmsg` (process context, the msghdr);
//!   fallback `cgroup_skb/egress` on the cgroup v2 root (process context for UDP sends,
//!   the packet as it leaves the socket).
//! - receive: fentry `skb_consume_udp` (the reader's context, only datagrams the
//!   application reads); fallback `cgroup_skb/ingress` (softirq: every datagram delivered to
//!   a socket, attributed to the socket's last sender through `SOCK_OWNER`).
//! - batching: tracepoints `syscalls/sys_{enter,exit}_sendmmsg` mark threads in a batch.

use core::{ffi::c_void, ptr::addr_of_mut};

use aya_ebpf::{
    helpers::{
        bpf_get_current_cgroup_id,
        generated::{
            bpf_get_socket_cookie, bpf_probe_read_user, bpf_skb_cgroup_id, bpf_skb_load_bytes,
        },
    },
    macros::{cgroup_skb, fentry, tracepoint},
    programs::{FEntryContext, SkBuffContext, TracePointContext},
};
use tracer_common::{
    DnsPacketOf, EventKind, SourceId, Task, Tuple, AF_INET, AF_INET6, DNS_FLAG_BATCH,
    DNS_FLAG_NO_TASK, DNS_PAYLOAD_CAP, DNS_PAYLOAD_SMALL, IPPROTO_UDP,
};

use crate::{
    kernel::{
        clamp_nonzero, copy_kernel, count_lost, current_netns, current_task_into,
        current_task_read_into, header, off, parse_l3l4, port_wanted, read, read_ptr, skb_l4,
        sock_netns,
    },
    EVENTS, IN_SENDMMSG, SOCK_OWNER,
};

/// Does a payload of `len` bytes fit the small record ([`tracer_common::DnsPacketSmall`])?
/// Every source knows the length before it reserves, and calls its generic part with
/// `N = DNS_PAYLOAD_SMALL` when it does, else `N = DNS_PAYLOAD_CAP`: `bpf_ringbuf_reserve`
/// takes a constant size, so each size is its own monomorphized reservation.
#[inline(always)]
fn fits_small(len: usize) -> bool {
    len <= DNS_PAYLOAD_SMALL
}

/// Reserves a `DnsPacketOf<N>`, lets `fill` write every field but the header and the batch
/// fields, and submits it; counts a loss when the ring buffer is full. Records are filled
/// in place: the BPF stack (512 bytes) can not hold one.
#[inline(always)]
fn emit<const N: usize>(kind: EventKind, source: SourceId, fill: impl FnOnce(*mut DnsPacketOf<N>)) {
    let Some(mut entry) = EVENTS.reserve::<DnsPacketOf<N>>(0) else {
        count_lost(kind);
        return;
    };
    let p = entry.as_mut_ptr();
    // SAFETY: `p` points at a reserved, exclusively owned `DnsPacketOf<N>`; `fill` writes every
    // other field before submit (payload bytes past `cap_len` are never read).
    unsafe {
        (*p).header = header(kind, source);
        (*p).ifindex = 0;
        (*p)._pad = 0;
        (*p).flags = 0;
        (*p).batch_len = 0;
        fill(p);
        if kind == EventKind::DnsSend {
            if let Some(vlen) = IN_SENDMMSG.get_ptr((*p).task.tid) {
                (*p).flags |= DNS_FLAG_BATCH;
                (*p).batch_len = *vlen;
            }
        }
    }
    entry.submit(0);
}

/// Parses the packet of a cgroup_skb program (data starts at the IP header). Headers are
/// read with direct packet access, which costs a few loads; only a header that is not in
/// the linear part of the skb goes through the `bpf_skb_load_bytes` helper. This runs for
/// every packet on the machine, so it is the tracer's main overhead (see docs/benchmarks.md).
#[inline(always)]
fn skb_parse(ctx: &SkBuffContext) -> Option<crate::kernel::L4> {
    let skb = ctx.skb.skb;
    // SAFETY: `data`/`data_end` are context fields the verifier turns into packet pointers.
    let (data, end) = unsafe { ((*skb).data as usize, (*skb).data_end as usize) };
    parse_l3l4(
        |o, buf| {
            let p = data + o as usize;
            if p + buf.len() <= end {
                // SAFETY: [p, p + len) lies inside the packet's linear data (checked above).
                unsafe {
                    core::ptr::copy_nonoverlapping(p as *const u8, buf.as_mut_ptr(), buf.len())
                };
                true
            } else {
                // SAFETY: `buf` is writable for its (constant, non-zero) length; the helper
                // bounds-checks the packet.
                unsafe {
                    bpf_skb_load_bytes(
                        skb as *const c_void,
                        o,
                        buf.as_mut_ptr() as *mut c_void,
                        buf.len() as u32,
                    ) == 0
                }
            }
        },
        ctx.len(),
    )
}

/// Copies the UDP payload (at most `N` bytes) out of a cgroup_skb packet.
#[inline(always)]
fn skb_payload<const N: usize>(ctx: &SkBuffContext, off: u32, dst: *mut [u8; N]) -> u32 {
    let Some(n) = clamp_nonzero::<N>(ctx.len().saturating_sub(off)) else {
        return 0;
    };
    // SAFETY: `dst` holds N writable bytes and 0 < n <= N.
    let rc =
        unsafe { bpf_skb_load_bytes(ctx.skb.skb as *const c_void, off, dst as *mut c_void, n) };
    if rc == 0 {
        n
    } else {
        0
    }
}

/// Socket cookie and socket cgroup id of a cgroup_skb packet. (The verifier forbids
/// offsets into `__sk_buff->sk`, so the socket's own fields are out of reach here.)
#[inline(always)]
fn skb_socket(ctx: &SkBuffContext) -> (u64, u64) {
    let skb = ctx.skb.skb;
    // SAFETY: `skb` is the program's context; the helpers accept it.
    unsafe {
        (
            bpf_get_socket_cookie(skb as *mut c_void),
            bpf_skb_cgroup_id(skb),
        )
    }
}

/// Which port of a datagram says it is DNS: the destination of a send, the source of an
/// answer.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Side {
    Dst,
    Src,
}

/// The first look every packet of every cgroup on the node gets, so it must cost next to
/// nothing: with direct packet access and no copies, is this a UDP datagram whose port (on
/// `side`) is in the DNS port set? `false` only when it is certainly not one; headers that
/// are not all in the linear data get `true` and the full parse ([`skb_parse`]) decides. (A non-first fragment's "ports"
/// are payload bytes: if they look like ours, the full parse rejects the fragment.)
#[inline(always)]
fn skb_maybe_dns(ctx: &SkBuffContext, side: Side) -> bool {
    let skb = ctx.skb.skb;
    // SAFETY: `data`/`data_end` are context fields the verifier turns into packet pointers.
    let (data, end) = unsafe { ((*skb).data as usize, (*skb).data_end as usize) };
    // Bounds are checked as `pointer + constant > end`, the form the verifier learns a
    // packet range from (LLVM turns `data + 1 > end` into `data >= end`, which it does not).
    // 24 bytes: an option-less IPv4 header and the ports; anything shorter is not UDP with
    // ports in its linear data, and the full parse decides.
    if data + 24 > end {
        return true;
    }
    // SAFETY: [data, data + 24) lies inside the packet's linear data (checked above).
    let b0 = unsafe { *(data as *const u8) };
    // `l4`: where the transport header starts (IPv4 options included; the full parse
    // rejects IPv6 extension headers, so a next header that is not UDP is not ours).
    let (proto, l4) = match b0 >> 4 {
        // SAFETY: 9 < 24.
        4 => (
            unsafe { *((data + 9) as *const u8) },
            usize::from(b0 & 0x0f) * 4,
        ),
        // SAFETY: 6 < 24.
        6 => (unsafe { *((data + 6) as *const u8) }, 40),
        _ => return false,
    };
    if proto != IPPROTO_UDP || l4 < 20 {
        return false; // not UDP, or a broken IPv4 header the full parse rejects too
    }
    let ports = data + l4;
    if ports + 4 > end {
        return true;
    }
    let at = ports + if side == Side::Dst { 2 } else { 0 };
    // SAFETY: at + 2 <= ports + 4 <= end.
    let port = unsafe { u16::from_be_bytes([*(at as *const u8), *((at + 1) as *const u8)]) };
    port_wanted(port)
}

#[cgroup_skb(egress)]
pub fn dns_egress(ctx: SkBuffContext) -> i32 {
    if skb_maybe_dns(&ctx, Side::Dst) {
        try_dns_egress(&ctx);
    }
    1 // never drop: we only observe
}

#[inline(always)]
fn try_dns_egress(ctx: &SkBuffContext) {
    let Some(l4) = skb_parse(ctx) else { return };
    if l4.tuple.proto != IPPROTO_UDP || !port_wanted(l4.tuple.dport) {
        return;
    }
    let (cookie, cgroup_id) = skb_socket(ctx);
    if fits_small(l4.payload_len as usize) {
        egress_emit::<DNS_PAYLOAD_SMALL>(ctx, &l4, cookie, cgroup_id);
    } else {
        egress_emit::<DNS_PAYLOAD_CAP>(ctx, &l4, cookie, cgroup_id);
    }
}

#[inline(always)]
fn egress_emit<const N: usize>(
    ctx: &SkBuffContext,
    l4: &crate::kernel::L4,
    cookie: u64,
    cgroup_id: u64,
) {
    emit::<N>(EventKind::DnsSend, SourceId::CgroupSkbEgress, |p| {
        // SAFETY: `p` is the exclusively owned record handed out by `emit`.
        unsafe {
            current_task_read_into(addr_of_mut!((*p).task));
            (*p).task.cgroup_id = cgroup_id;
            // A UDP send runs in the sender's context: its netns is the socket's unless the
            // task moved (setns) after creating the socket.
            (*p).task.netns = current_netns();
            (*p).tuple = l4.tuple;
            (*p).sock_cookie = cookie;
            (*p).payload_len = l4.payload_len;
            (*p).cap_len = skb_payload(ctx, l4.payload_off, addr_of_mut!((*p).payload));
            // A stack copy: older verifiers refuse ring-buffer memory as a map value.
            let owner: Task = (*p).task;
            let _ = SOCK_OWNER.insert(cookie, &owner, 0);
        }
    });
}

#[cgroup_skb(ingress)]
pub fn dns_ingress(ctx: SkBuffContext) -> i32 {
    if skb_maybe_dns(&ctx, Side::Src) {
        try_dns_ingress(&ctx);
    }
    1
}

#[inline(always)]
fn try_dns_ingress(ctx: &SkBuffContext) {
    let Some(l4) = skb_parse(ctx) else { return };
    if l4.tuple.proto != IPPROTO_UDP || !port_wanted(l4.tuple.sport) {
        return;
    }
    let (cookie, cgroup_id) = skb_socket(ctx);
    if fits_small(l4.payload_len as usize) {
        ingress_emit::<DNS_PAYLOAD_SMALL>(ctx, &l4, cookie, cgroup_id);
    } else {
        ingress_emit::<DNS_PAYLOAD_CAP>(ctx, &l4, cookie, cgroup_id);
    }
}

#[inline(always)]
fn ingress_emit<const N: usize>(
    ctx: &SkBuffContext,
    l4: &crate::kernel::L4,
    cookie: u64,
    cgroup_id: u64,
) {
    emit::<N>(EventKind::DnsRecv, SourceId::CgroupSkbIngress, |p| {
        // SAFETY: `p` is the exclusively owned record handed out by `emit`.
        unsafe {
            // Softirq context: the current task is not the receiver. Attribute the datagram
            // (and its netns) to the task that last sent on this socket.
            match SOCK_OWNER.get_ptr(cookie) {
                Some(owner) => (*p).task = *owner,
                None => {
                    (*p).task = Task::default();
                    (*p).flags = DNS_FLAG_NO_TASK;
                }
            }
            (*p).task.cgroup_id = cgroup_id;
            (*p).tuple = l4.tuple;
            (*p).sock_cookie = cookie;
            (*p).payload_len = l4.payload_len;
            (*p).cap_len = skb_payload(ctx, l4.payload_off, addr_of_mut!((*p).payload));
        }
    });
}

/// Reads the first user buffer of a `msghdr`'s iterator (ITER_UBUF or ITER_IOVEC).
#[inline(always)]
fn msg_payload<const N: usize>(msg: *const u8, len: u32, dst: *mut [u8; N]) -> u32 {
    let Ok(moff) = crate::kernel::need(off!(msg_iter)) else {
        return 0;
    };
    let iter = msg.wrapping_add(moff);
    let ty: u8 = read(iter, off!(iter_type)).unwrap_or(u8::MAX);
    let skip: u64 = read(iter, off!(iter_offset)).unwrap_or(0);
    let base: *const u8 = if u32::from(ty) == off!(iter_type_ubuf) {
        read(iter, off!(iter_ubuf)).unwrap_or(core::ptr::null())
    } else if u32::from(ty) == off!(iter_type_iovec) {
        match read_ptr(iter, off!(iter_iov)) {
            // struct iovec is uapi: iov_base at 0.
            Ok(iov) => read(iov, 0).unwrap_or(core::ptr::null()),
            Err(_) => core::ptr::null(),
        }
    } else {
        core::ptr::null()
    };
    if base.is_null() {
        return 0;
    }
    let Some(n) = clamp_nonzero::<N>(len) else {
        return 0;
    };
    // SAFETY: `dst` holds N writable bytes and n <= N; the
    // helper validates the user address.
    let rc = unsafe {
        bpf_probe_read_user(
            dst as *mut c_void,
            n,
            base.wrapping_add(skip as usize) as *const c_void,
        )
    };
    if rc == 0 {
        n
    } else {
        0
    }
}

/// The destination of a send: `msg_name` when given (sendto), else the connected peer.
#[inline(always)]
fn send_tuple(sk: *const u8, msg: *const u8, v6: bool) -> Tuple {
    let mut t = Tuple {
        proto: IPPROTO_UDP,
        ..Tuple::default()
    };
    t.sport = read(sk, off!(sk_num)).unwrap_or(0u16);
    let name = read_ptr(msg, off!(msg_name)).ok();
    // sockaddr_in / sockaddr_in6 are uapi: family at 0, port at 2, v4 addr at 4, v6 at 8.
    let family: u16 = match name {
        Some(n) => read(n, 0).unwrap_or(0),
        None => 0,
    };
    if v6 {
        t.family = AF_INET6;
        t.saddr = read(sk, off!(sk_v6_rcv_saddr)).unwrap_or([0; 16]);
        match name {
            Some(n) if u32::from(family) == u32::from(AF_INET6) => {
                t.dport = u16::from_be(read(n, 2).unwrap_or(0));
                t.daddr = read(n, 8).unwrap_or([0; 16]);
            }
            _ => {
                t.dport = u16::from_be(read(sk, off!(sk_dport)).unwrap_or(0));
                t.daddr = read(sk, off!(sk_v6_daddr)).unwrap_or([0; 16]);
            }
        }
    } else {
        t.family = AF_INET;
        let s: [u8; 4] = read(sk, off!(sk_rcv_saddr)).unwrap_or([0; 4]);
        t.saddr[..4].copy_from_slice(&s);
        let (dport, d): (u16, [u8; 4]) = match name {
            Some(n) if u32::from(family) == u32::from(AF_INET) => {
                (read(n, 2).unwrap_or(0), read(n, 4).unwrap_or([0; 4]))
            }
            _ => (
                read(sk, off!(sk_dport)).unwrap_or(0),
                read(sk, off!(sk_daddr)).unwrap_or([0; 4]),
            ),
        };
        t.dport = u16::from_be(dport);
        t.daddr[..4].copy_from_slice(&d);
    }
    t
}

/// The socket cookie of argument 0 (`struct sock *`), assigning one if the socket has none
/// yet, as `SO_COOKIE` and the cgroup programs do. The pointer must reach the helper
/// straight from the context, as the verifier's trusted BTF pointer.
#[inline(always)]
fn sock_cookie(ctx: &FEntryContext) -> u64 {
    let sk: *mut c_void = ctx.arg(0);
    // SAFETY: `sk` is the traced function's `struct sock *` argument.
    unsafe { bpf_get_socket_cookie(sk) }
}

/// The destination port of a send (`msg_name`'s when given, else the connected peer's),
/// read with as few kernel reads as possible: every UDP send on the node pays for them.
#[inline(always)]
fn send_dport(sk: *const u8, msg: *const u8, v6: bool) -> u16 {
    let family = if v6 { AF_INET6 } else { AF_INET };
    if let Ok(n) = read_ptr(msg, off!(msg_name)) {
        // sockaddr_in / sockaddr_in6 are uapi: family (host order) at 0, port at 2.
        let head: [u8; 4] = read(n, 0).unwrap_or([0; 4]);
        if u16::from_ne_bytes([head[0], head[1]]) == u16::from(family) {
            return u16::from_be_bytes([head[2], head[3]]);
        }
    }
    u16::from_be(read(sk, off!(sk_dport)).unwrap_or(0))
}

#[inline(always)]
fn try_fentry_send(ctx: &FEntryContext, v6: bool, source: SourceId) {
    let sk: *const u8 = ctx.arg(0);
    let msg: *const u8 = ctx.arg(1);
    let len: usize = ctx.arg(2);
    if !port_wanted(send_dport(sk, msg, v6)) {
        return;
    }
    let tuple = send_tuple(sk, msg, v6);
    if fits_small(len) {
        fentry_send_emit::<DNS_PAYLOAD_SMALL>(ctx, sk, msg, len, tuple, source);
    } else {
        fentry_send_emit::<DNS_PAYLOAD_CAP>(ctx, sk, msg, len, tuple, source);
    }
}

#[inline(always)]
fn fentry_send_emit<const N: usize>(
    ctx: &FEntryContext,
    sk: *const u8,
    msg: *const u8,
    len: usize,
    tuple: Tuple,
    source: SourceId,
) {
    emit::<N>(EventKind::DnsSend, source, |p| {
        // SAFETY: `p` is the exclusively owned record handed out by `emit`.
        unsafe {
            current_task_into(addr_of_mut!((*p).task));
            (*p).task.cgroup_id = bpf_get_current_cgroup_id();
            (*p).task.netns = sock_netns(sk);
            (*p).tuple = tuple;
            (*p).sock_cookie = sock_cookie(ctx);
            (*p).payload_len = len as u32;
            (*p).cap_len = msg_payload(msg, len as u32, addr_of_mut!((*p).payload));
        }
    });
}

#[fentry(function = "udp_sendmsg")]
pub fn dns_udp_sendmsg(ctx: FEntryContext) -> i32 {
    try_fentry_send(&ctx, false, SourceId::FentryUdpSendmsg);
    0
}

#[fentry(function = "udpv6_sendmsg")]
pub fn dns_udpv6_sendmsg(ctx: FEntryContext) -> i32 {
    try_fentry_send(&ctx, true, SourceId::FentryUdpv6Sendmsg);
    0
}

/// `skb_consume_udp(sk, skb, len)`: called by udp(v6)_recvmsg in the reader's context
/// once a datagram has been copied to the application.
#[fentry(function = "skb_consume_udp")]
pub fn dns_skb_consume_udp(ctx: FEntryContext) -> i32 {
    try_consume(&ctx);
    0
}

/// The source port of a received datagram, from its UDP header (`skb->head +
/// skb->transport_header`), in three kernel reads: every UDP datagram read on the node pays
/// for them. `None` when it can not be read (the full parse then decides).
#[inline(always)]
fn recv_sport(skb: *const u8) -> Option<u16> {
    let head: *const u8 = read(skb, off!(skb_head)).ok()?;
    let th: u16 = read(skb, off!(skb_transport_header)).ok()?;
    if head.is_null() || th == u16::MAX {
        return None;
    }
    let port: [u8; 2] = read(head.wrapping_add(usize::from(th)), 0).ok()?;
    Some(u16::from_be_bytes(port))
}

#[inline(always)]
fn try_consume(ctx: &FEntryContext) {
    let sk: *const u8 = ctx.arg(0);
    let skb: *const u8 = ctx.arg(1);
    if let Some(port) = recv_sport(skb) {
        if !port_wanted(port) {
            return;
        }
    }
    let Some((l4, ip)) = skb_l4(skb) else { return };
    if l4.tuple.proto != IPPROTO_UDP || !port_wanted(l4.tuple.sport) {
        return;
    }
    if fits_small(l4.payload_len as usize) {
        consume_emit::<DNS_PAYLOAD_SMALL>(ctx, sk, &l4, ip);
    } else {
        consume_emit::<DNS_PAYLOAD_CAP>(ctx, sk, &l4, ip);
    }
}

#[inline(always)]
fn consume_emit<const N: usize>(
    ctx: &FEntryContext,
    sk: *const u8,
    l4: &crate::kernel::L4,
    ip: *const u8,
) {
    let src = ip.wrapping_add(l4.payload_off as usize);
    emit::<N>(EventKind::DnsRecv, SourceId::FentrySkbConsumeUdp, |p| {
        // SAFETY: `p` is the exclusively owned record handed out by `emit`.
        unsafe {
            current_task_into(addr_of_mut!((*p).task));
            (*p).task.cgroup_id = bpf_get_current_cgroup_id();
            (*p).task.netns = sock_netns(sk);
            (*p).tuple = l4.tuple;
            (*p).sock_cookie = sock_cookie(ctx);
            (*p).payload_len = l4.payload_len;
            (*p).cap_len = copy_kernel(addr_of_mut!((*p).payload), src, l4.payload_len);
        }
    });
}

/// Offset of `vlen` in the `syscalls/sys_enter_sendmmsg` record (stable syscall ABI layout).
const SENDMMSG_VLEN_OFFSET: usize = 32;

#[tracepoint]
pub fn sendmmsg_enter(ctx: TracePointContext) -> u32 {
    // SAFETY: the offset is inside the tracepoint record (see the event's format file).
    let vlen: u64 = unsafe { ctx.read_at(SENDMMSG_VLEN_OFFSET) }.unwrap_or(0);
    let tid = aya_ebpf::helpers::bpf_get_current_pid_tgid() as u32;
    let _ = IN_SENDMMSG.insert(tid, vlen as u32, 0);
    0
}

#[tracepoint]
pub fn sendmmsg_exit(_ctx: TracePointContext) -> u32 {
    let tid = aya_ebpf::helpers::bpf_get_current_pid_tgid() as u32;
    let _ = IN_SENDMMSG.remove(tid);
    0
}

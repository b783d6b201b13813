//! Reading kernel memory at BTF-resolved offsets, and the pieces every probe shares:
//! the port filter, the current task, packet headers, conntrack tuples, loss accounting.

use core::ffi::c_void;

use aya_ebpf::helpers::{
    bpf_get_current_pid_tgid, bpf_ktime_get_ns, bpf_probe_read_kernel,
    generated::{
        bpf_get_current_comm as raw_get_current_comm,
        bpf_probe_read_kernel as raw_probe_read_kernel,
    },
};
use tracer_common::{
    EventKind, Header, SourceId, Task, Tuple, AF_INET, AF_INET6, IPPROTO_TCP, IPPROTO_UDP,
    OFFSET_NONE,
};

use crate::{LOST, PORTS};

/// Reads one `KernelOffsets` field. The global lives in `.rodata`; the volatile read stops
/// the compiler from folding the placeholder value the object was built with.
macro_rules! off {
    ($field:ident) => {
        $crate::kernel::offset_of_field(&$crate::OFFSETS.$field)
    };
}
pub(crate) use off;

/// Volatile read of one `OFFSETS` field (see [`off!`]).
#[inline(always)]
pub fn offset_of_field(field: &u32) -> u32 {
    // SAFETY: `field` is a reference to a plain integer in a static; always readable.
    unsafe { core::ptr::read_volatile(field) }
}

/// Fails when the loader could not resolve the offset on this kernel.
#[inline(always)]
pub fn need(offset: u32) -> Result<usize, i64> {
    if offset == OFFSET_NONE {
        Err(-1)
    } else {
        Ok(offset as usize)
    }
}

/// Reads a `T` at `base + offset` from kernel memory.
#[inline(always)]
pub fn read<T>(base: *const u8, offset: u32) -> Result<T, i64> {
    let offset = need(offset)?;
    // SAFETY: bpf_probe_read_kernel validates the address; a bad pointer yields an error.
    unsafe { bpf_probe_read_kernel(base.wrapping_add(offset) as *const T) }.map_err(|e| e as i64)
}

/// Reads a pointer at `base + offset` and fails on NULL.
#[inline(always)]
pub fn read_ptr(base: *const u8, offset: u32) -> Result<*const u8, i64> {
    let p: *const u8 = read(base, offset)?;
    if p.is_null() {
        Err(-2)
    } else {
        Ok(p)
    }
}

/// `min(len, N)` computed so that the verifier can see the bound: LLVM folds an ordinary
/// `min` into forms the verifier loses track of, so the short branch masks a value LLVM can
/// not see through. `N` must be a power of two.
#[inline(always)]
pub fn clamp_len<const N: usize>(len: u32) -> u32 {
    const { assert!(N.is_power_of_two()) };
    if len as usize >= N {
        N as u32
    } else {
        core::hint::black_box(len) & (N as u32 - 1)
    }
}

/// `min(len, N)` for a non-zero `len`, as a value the verifier knows is in `1..=N` (some
/// verifiers, e.g. 6.1's, lose a separate `!= 0` check): the mask bounds `len - 1` to
/// `0..N`, and one is added after. `None` for 0. `N` must be a power of two.
#[inline(always)]
pub fn clamp_nonzero<const N: usize>(len: u32) -> Option<u32> {
    if len == 0 {
        return None;
    }
    Some(clamp_len::<N>(len - 1).min(N as u32 - 1) + 1)
}

/// Copies up to `N` bytes from kernel memory into `dst`; returns the bytes copied.
#[inline(always)]
pub fn copy_kernel<const N: usize>(dst: *mut [u8; N], src: *const u8, len: u32) -> u32 {
    let Some(n) = clamp_nonzero::<N>(len) else {
        return 0;
    };
    // SAFETY: `dst` points at N writable bytes of a ring-buffer reservation and n <= N;
    // the helper validates `src`.
    let rc = unsafe { raw_probe_read_kernel(dst as *mut c_void, n, src as *const c_void) };
    if rc == 0 {
        n
    } else {
        0
    }
}

/// Is `port` (host order) in the configured DNS port set?
#[inline(always)]
pub fn port_wanted(port: u16) -> bool {
    match PORTS.get(u32::from(port >> 6)) {
        Some(word) => (*word >> (port & 63)) & 1 == 1,
        None => false,
    }
}

#[inline(always)]
pub fn header(kind: EventKind, source: SourceId) -> Header {
    Header {
        kind: kind as u32,
        source: source as u16,
        _pad: 0,
        // SAFETY: no preconditions.
        ts_ns: unsafe { bpf_ktime_get_ns() },
    }
}

/// Counts a ring-buffer reservation failure for this CPU.
#[inline(always)]
pub fn count_lost(kind: EventKind) {
    if let Some(slot) = LOST.get_ptr_mut(kind as u32) {
        // SAFETY: per-CPU slot, only this CPU writes it while the program runs.
        unsafe { *slot += 1 };
    }
}

/// `net->ns.inum` of a `struct net *`.
#[inline(always)]
pub fn net_inum(net: *const u8) -> u32 {
    read::<u32>(net, off!(net_inum)).unwrap_or(0)
}

/// Network namespace inode of a `struct sock *`.
#[inline(always)]
pub fn sock_netns(sk: *const u8) -> u32 {
    match read_ptr(sk, off!(sk_net)) {
        Ok(net) => net_inum(net),
        Err(_) => 0,
    }
}

/// Network namespace inode of the current task.
#[inline(always)]
pub fn current_netns() -> u32 {
    // SAFETY: no preconditions.
    let task = unsafe { aya_ebpf::helpers::bpf_get_current_task() } as *const u8;
    let Ok(nsproxy) = read_ptr(task, off!(task_nsproxy)) else {
        return 0;
    };
    match read_ptr(nsproxy, off!(nsproxy_net_ns)) {
        Ok(net) => net_inum(net),
        Err(_) => 0,
    }
}

/// Fills pid, tid and comm of the current task in place; the caller fills the rest.
#[inline(always)]
pub fn current_task_into(dst: *mut Task) {
    let pid_tgid = bpf_get_current_pid_tgid();
    // SAFETY: `dst` points at a `Task` inside an exclusively owned ring-buffer record.
    unsafe {
        (*dst).pid = (pid_tgid >> 32) as u32;
        (*dst).tid = pid_tgid as u32;
        (*dst)._pad = 0;
        if raw_get_current_comm(core::ptr::addr_of_mut!((*dst).comm) as *mut c_void, 16) != 0 {
            (*dst).comm = [0; 16];
        }
    }
}

/// Fills pid, tid and comm of the current task in place by reading `task_struct` (for
/// program types that may not call `bpf_get_current_pid_tgid`/`_comm`, e.g. cgroup_skb
/// before Linux 6.x): `bpf_get_current_task` is in the base helper set for CAP_PERFMON.
#[inline(always)]
pub fn current_task_read_into(dst: *mut Task) {
    // SAFETY: no preconditions.
    let task = unsafe { aya_ebpf::helpers::bpf_get_current_task() } as *const u8;
    // SAFETY: `dst` points at a `Task` inside an exclusively owned ring-buffer record.
    unsafe {
        (*dst).pid = read::<u32>(task, off!(task_tgid)).unwrap_or(0);
        (*dst).tid = read::<u32>(task, off!(task_pid)).unwrap_or(0);
        (*dst)._pad = 0;
        read_into(core::ptr::addr_of_mut!((*dst).comm), task, off!(task_comm));
    }
}

/// Where the transport payload of a parsed packet starts, and how long it is.
pub struct L4 {
    pub tuple: Tuple,
    /// Offset of the transport payload from the start of the IP header.
    pub payload_off: u32,
    pub payload_len: u32,
}

/// Parses an IPv4 or IPv6 header (no extension headers) plus a UDP or TCP header, using
/// `load(offset, buf)` to fetch exactly `buf.len()` bytes relative to the IP header.
/// `total_hint` is the packet length to use when the IP header says 0 (GSO).
#[inline(always)]
pub fn parse_l3l4(load: impl Fn(u32, &mut [u8]) -> bool, total_hint: u32) -> Option<L4> {
    let mut h = [0u8; 40];
    if !load(0, &mut h[..20]) {
        return None;
    }
    let mut t = Tuple::default();
    let (l4_off, l3_total) = match h[0] >> 4 {
        4 => {
            let ihl = u32::from(h[0] & 0x0f) * 4;
            // Fragments other than the first carry no transport header.
            if ihl < 20 || (u16::from_be_bytes([h[6], h[7]]) & 0x1fff) != 0 {
                return None;
            }
            t.family = AF_INET;
            t.proto = h[9];
            t.saddr[..4].copy_from_slice(&h[12..16]);
            t.daddr[..4].copy_from_slice(&h[16..20]);
            (ihl, u32::from(u16::from_be_bytes([h[2], h[3]])))
        }
        6 => {
            if !load(0, &mut h) {
                return None;
            }
            t.family = AF_INET6;
            t.proto = h[6];
            t.saddr.copy_from_slice(&h[8..24]);
            t.daddr.copy_from_slice(&h[24..40]);
            let plen = u32::from(u16::from_be_bytes([h[4], h[5]]));
            (40, if plen == 0 { 0 } else { 40 + plen })
        }
        _ => return None,
    };
    let total = if l3_total == 0 { total_hint } else { l3_total };
    let hdr = match t.proto {
        IPPROTO_UDP => {
            let mut u = [0u8; 8];
            if !load(l4_off, &mut u) {
                return None;
            }
            t.sport = u16::from_be_bytes([u[0], u[1]]);
            t.dport = u16::from_be_bytes([u[2], u[3]]);
            8
        }
        IPPROTO_TCP => {
            let mut u = [0u8; 20];
            if !load(l4_off, &mut u) {
                return None;
            }
            t.sport = u16::from_be_bytes([u[0], u[1]]);
            t.dport = u16::from_be_bytes([u[2], u[3]]);
            u32::from(u[12] >> 4) * 4
        }
        _ => 0,
    };
    let payload_off = l4_off + hdr;
    Some(L4 {
        tuple: t,
        payload_off,
        payload_len: total.saturating_sub(payload_off),
    })
}

/// Reads the IP/transport headers of an skb from kernel memory
/// (`skb->head + skb->network_header`). Returns the parse and the address of the IP header.
#[inline(always)]
pub fn skb_l4(skb: *const u8) -> Option<(L4, *const u8)> {
    let head: *const u8 = read(skb, off!(skb_head)).ok()?;
    let nh: u16 = read(skb, off!(skb_network_header)).ok()?;
    if head.is_null() || nh == u16::MAX {
        return None;
    }
    let ip = head.wrapping_add(usize::from(nh));
    let skb_len: u32 = read(skb, off!(skb_len)).unwrap_or(0);
    let l4 = parse_l3l4(
        |o, buf| {
            // SAFETY: the helper validates the source address; `buf` is writable.
            unsafe {
                raw_probe_read_kernel(
                    buf.as_mut_ptr() as *mut c_void,
                    buf.len() as u32,
                    ip.wrapping_add(o as usize) as *const c_void,
                ) == 0
            }
        },
        skb_len,
    )?;
    Some((l4, ip))
}

/// Copies `size_of::<T>()` bytes at `src + offset` straight into `dst` (ring-buffer memory),
/// leaving zeroes when the offset is unknown or the read fails.
#[inline(always)]
pub fn read_into<T>(dst: *mut T, src: *const u8, offset: u32) {
    let size = core::mem::size_of::<T>() as u32;
    let ok = match need(offset) {
        // SAFETY: `dst` is writable for size bytes; the helper validates `src`.
        Ok(o) => unsafe {
            raw_probe_read_kernel(
                dst as *mut c_void,
                size,
                src.wrapping_add(o) as *const c_void,
            ) == 0
        },
        Err(_) => false,
    };
    if !ok {
        // SAFETY: as above.
        unsafe { core::ptr::write_bytes(dst as *mut u8, 0, size as usize) };
    }
}

/// Fills `dst` in place from a `struct nf_conntrack_tuple` at `t` (a NULL `t` gives zeroes).
#[inline(always)]
pub fn ct_tuple_into(dst: *mut Tuple, t: *const u8) {
    // SAFETY: `dst` points at a `Tuple` inside an exclusively owned ring-buffer record.
    unsafe {
        let l3num: u16 = read(t, off!(tuple_src_l3num)).unwrap_or(0);
        (*dst).family = l3num as u8;
        (*dst).proto = read(t, off!(tuple_dst_protonum)).unwrap_or(0);
        (*dst)._pad = [0; 2];
        read_into(core::ptr::addr_of_mut!((*dst).saddr), t, off!(tuple_src_u3));
        read_into(core::ptr::addr_of_mut!((*dst).daddr), t, off!(tuple_dst_u3));
        (*dst).sport = u16::from_be(read(t, off!(tuple_src_port)).unwrap_or(0));
        (*dst).dport = u16::from_be(read(t, off!(tuple_dst_port)).unwrap_or(0));
    }
}

/// The `struct nf_conn *` attached to an skb (`skb->_nfct & ~NFCT_INFOMASK`), or NULL.
#[inline(always)]
pub fn skb_conntrack(skb: *const u8) -> *const u8 {
    let nfct: u64 = read(skb, off!(skb_nfct)).unwrap_or(0);
    (nfct & !7u64) as *const u8
}

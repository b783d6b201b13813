//! Netfilter drops and conntrack insert clashes.
//!
//! Sources, most precise first:
//! - fexit `__nf_conntrack_confirm` (returns NF_DROP when the insert failed) and fexit
//!   `nf_ct_resolve_clash` (the clash itself, its verdict, and `h`: the entry that won);
//! - tp_btf `kfree_skb` with reason `SKB_DROP_REASON_NETFILTER_DROP`: every packet
//!   netfilter drops, with the conntrack entry still attached to the skb.

use core::ptr::{addr_of_mut, null};

use aya_ebpf::{
    macros::{btf_tracepoint, fexit, kprobe, kretprobe, map},
    maps::PerCpuArray,
    programs::{BtfTracePointContext, FExitContext, ProbeContext, RetProbeContext},
};
use aya_log_ebpf::warn;
use tracer_common::{
    EventKind, NfEvent, SourceId, Tuple, CT_FLAG_OTHER, CT_FLAG_PRESENT, DROP_PAYLOAD_CAP,
};

use crate::{
    kernel::{
        copy_kernel, count_lost, ct_tuple_into, header, need, net_inum, off, read, read_ptr,
        skb_conntrack, skb_l4,
    },
    EVENTS,
};

const NF_DROP: i32 = 0;

/// Fills and submits one `NfEvent` for `skb`; `other` is the clash winner's tuple, if any.
/// Returns `false` when the packet's headers could not be read.
#[inline(always)]
fn emit(
    kind: EventKind,
    source: SourceId,
    skb: *const u8,
    location: u64,
    reason: u32,
    verdict: i32,
    other: *const u8,
) -> bool {
    let Some(mut entry) = EVENTS.reserve::<NfEvent>(0) else {
        count_lost(kind);
        return true;
    };
    let p = entry.as_mut_ptr();
    let ct = skb_conntrack(skb);
    let dev = read_ptr(skb, off!(skb_dev)).ok();
    let ifindex: u32 = match dev {
        Some(d) => read(d, off!(dev_ifindex)).unwrap_or(0),
        None => 0,
    };
    // The entry's namespace is where conntrack ran; without one, the device's.
    // A locally generated packet dropped before conntrack attached an entry (table full)
    // has no device yet either: its socket says where it was.
    let net = if !ct.is_null() {
        read_ptr(ct, off!(ct_net)).ok()
    } else if let Some(d) = dev {
        read_ptr(d, off!(dev_nd_net)).ok()
    } else {
        read_ptr(skb, off!(skb_sk))
            .and_then(|sk| read_ptr(sk, off!(sk_net)))
            .ok()
    };
    let l4 = skb_l4(skb);
    let parsed = l4.is_some();
    // SAFETY: `p` points at a reserved, exclusively owned `NfEvent`; every field is written
    // before submit (payload bytes past `cap_len` are never read).
    unsafe {
        (*p).header = header(kind, source);
        (*p).location = location;
        (*p).netns = match net {
            Some(n) => net_inum(n),
            None => 0,
        };
        (*p).ifindex = ifindex;
        (*p).reason = reason;
        (*p).verdict = verdict;
        (*p)._pad = 0;
        let mut flags = 0;
        if other.is_null() {
            (*p).other = Tuple::default();
        } else {
            flags |= CT_FLAG_OTHER;
            ct_tuple_into(addr_of_mut!((*p).other), other);
        }
        if ct.is_null() {
            (*p).ct_status = 0;
            (*p).ct_orig = Tuple::default();
            (*p).ct_reply = Tuple::default();
        } else {
            flags |= CT_FLAG_PRESENT;
            (*p).ct_status = read(ct, off!(ct_status)).unwrap_or(0);
            ct_tuple_at(addr_of_mut!((*p).ct_orig), ct, off!(ct_tuple_orig));
            ct_tuple_at(addr_of_mut!((*p).ct_reply), ct, off!(ct_tuple_reply));
        }
        (*p).ct_flags = flags;
        match l4 {
            Some((l4, ip)) => {
                (*p).packet = l4.tuple;
                (*p).payload_len = l4.payload_len;
                (*p).cap_len = copy_kernel::<DROP_PAYLOAD_CAP>(
                    core::ptr::addr_of_mut!((*p).payload),
                    ip.wrapping_add(l4.payload_off as usize),
                    l4.payload_len,
                );
            }
            None => {
                (*p).packet = Tuple::default();
                (*p).payload_len = 0;
                (*p).cap_len = 0;
            }
        }
    }
    entry.submit(0);
    parsed
}

/// Fills `dst` from the tuple at `base + offset`, or zeroes when the offset is unknown.
#[inline(always)]
fn ct_tuple_at(dst: *mut Tuple, base: *const u8, offset: u32) {
    match need(offset) {
        Ok(o) => ct_tuple_into(dst, base.wrapping_add(o)),
        // SAFETY: `dst` points at a `Tuple` inside an exclusively owned record.
        Err(_) => unsafe { *dst = Tuple::default() },
    }
}

/// `trace_kfree_skb(skb, location, reason[, rx_sk])`: keep netfilter's drops only.
#[btf_tracepoint(function = "kfree_skb")]
pub fn nf_kfree_skb(ctx: BtfTracePointContext) -> u32 {
    let reason: u32 = ctx.arg(2);
    if reason != off!(drop_reason_netfilter) {
        return 0;
    }
    let skb: *const u8 = ctx.arg(0);
    let location: u64 = ctx.arg(1);
    let parsed = emit(
        EventKind::NfDrop,
        SourceId::TpBtfKfreeSkb,
        skb,
        location,
        reason,
        0,
        null(),
    );
    if !parsed {
        warn!(
            &ctx,
            "netfilter drop at {:x}: packet headers unreadable", location
        );
    }
    0
}

/// `__nf_conntrack_confirm(skb)`: NF_DROP means the entry could not be inserted.
#[fexit(function = "__nf_conntrack_confirm")]
pub fn nf_confirm_exit(ctx: FExitContext) -> i32 {
    let ret: i32 = ctx.arg(1);
    if ret == NF_DROP {
        let skb: *const u8 = ctx.arg(0);
        let _ = emit(
            EventKind::NfDrop,
            SourceId::FexitNfConntrackConfirm,
            skb,
            0,
            0,
            ret,
            null(),
        );
    }
    0
}

/// `nf_ct_resolve_clash(skb, h, repl_idx)`: a clash on insert; `h` is the entry already in
/// the table (the winner). The return value says whether the kernel resolved it.
#[fexit(function = "nf_ct_resolve_clash")]
pub fn nf_resolve_clash_exit(ctx: FExitContext) -> i32 {
    let skb: *const u8 = ctx.arg(0);
    let h: *const u8 = ctx.arg(1);
    let ret: i32 = ctx.arg(3);
    let winner = match need(off!(tuplehash_tuple)) {
        Ok(o) if !h.is_null() => h.wrapping_add(o),
        _ => null(),
    };
    let _ = emit(
        EventKind::CtClash,
        SourceId::FexitNfCtResolveClash,
        skb,
        0,
        0,
        ret,
        winner,
    );
    0
}

// kprobe/kretprobe pairs for kernels that refuse trampolines on these functions, or where
// they live in the nf_conntrack module (fexit needs the module's BTF there). A kretprobe has
// no arguments: the entry probe leaves them per CPU (the packet path runs the function to
// completion on one CPU; a softirq nesting into the same function on that CPU between entry
// and return would overwrite them, which is why fexit is preferred).

/// Per CPU: `[skb, h]` of `__nf_conntrack_confirm` (slot 0) and `nf_ct_resolve_clash` (slot 1).
#[map]
static NF_ARGS: PerCpuArray<[u64; 2]> = PerCpuArray::with_max_entries(2, 0);

#[inline(always)]
fn stash(slot: u32, a: u64, b: u64) {
    if let Some(p) = NF_ARGS.get_ptr_mut(slot) {
        // SAFETY: per-CPU slot owned by this CPU while the program runs.
        unsafe { *p = [a, b] };
    }
}

#[inline(always)]
fn take(slot: u32) -> [u64; 2] {
    match NF_ARGS.get_ptr_mut(slot) {
        // SAFETY: as above; the slot is cleared so a stale value is never reused.
        Some(p) => unsafe { core::mem::replace(&mut *p, [0, 0]) },
        None => [0, 0],
    }
}

#[kprobe]
pub fn nf_confirm_entry(ctx: ProbeContext) -> u32 {
    stash(0, ctx.arg::<u64>(0).unwrap_or(0), 0);
    0
}

#[kretprobe]
pub fn nf_confirm_ret(ctx: RetProbeContext) -> u32 {
    let ret: i32 = ctx.ret();
    let [skb, _] = take(0);
    if ret == NF_DROP && skb != 0 {
        let _ = emit(
            EventKind::NfDrop,
            SourceId::KretprobeNfConntrackConfirm,
            skb as *const u8,
            0,
            0,
            ret,
            null(),
        );
    }
    0
}

#[kprobe]
pub fn nf_clash_entry(ctx: ProbeContext) -> u32 {
    stash(
        1,
        ctx.arg::<u64>(0).unwrap_or(0),
        ctx.arg::<u64>(1).unwrap_or(0),
    );
    0
}

#[kretprobe]
pub fn nf_clash_ret(ctx: RetProbeContext) -> u32 {
    let ret: i32 = ctx.ret();
    let [skb, h] = take(1);
    if skb == 0 {
        return 0;
    }
    let winner = match need(off!(tuplehash_tuple)) {
        Ok(o) if h != 0 => (h as *const u8).wrapping_add(o),
        _ => null(),
    };
    let _ = emit(
        EventKind::CtClash,
        SourceId::KretprobeNfCtResolveClash,
        skb as *const u8,
        0,
        0,
        ret,
        winner,
    );
    0
}

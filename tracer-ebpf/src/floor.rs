//! Programs that do nothing, attached where the DNS programs attach (fentry where the
//! kernel allows BPF trampolines, else cgroup_skb) and on `kfree_skb`, by the hidden `tracer
//! load-gen floor` only: what `cargo xtask bench-filter` measures our programs against. A
//! run of these is the cost of the hook's dispatch and of the kernel's own BPF statistics
//! on this machine, which no program attached there can go below.

use aya_ebpf::{
    macros::{btf_tracepoint, cgroup_skb, fentry},
    programs::{BtfTracePointContext, FEntryContext, SkBuffContext},
};

#[fentry(function = "udp_sendmsg")]
pub fn floor_udp_sendmsg(_ctx: FEntryContext) -> i32 {
    0
}

#[fentry(function = "skb_consume_udp")]
pub fn floor_skb_consume_udp(_ctx: FEntryContext) -> i32 {
    0
}

#[cgroup_skb(egress)]
pub fn floor_egress(_ctx: SkBuffContext) -> i32 {
    1
}

#[cgroup_skb(ingress)]
pub fn floor_ingress(_ctx: SkBuffContext) -> i32 {
    1
}

#[btf_tracepoint(function = "kfree_skb")]
pub fn floor_kfree_skb(_ctx: BtfTracePointContext) -> u32 {
    0
}

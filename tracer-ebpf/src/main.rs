//! Kernel programs of the conntrack tracer.
//!
//! One module per hook family; entry points are thin and delegate to `try_*` functions.
//! Every kernel struct field is read with `bpf_probe_read_kernel` at an offset the loader
//! resolved from the running kernel's BTF (`OFFSETS`): Rust eBPF objects carry no CO-RE
//! relocations, so nothing about kernel layouts is hard-coded here.
#![no_std]
#![no_main]

mod dns;
mod floor;
mod kernel;
mod netfilter;

use aya_ebpf::{
    macros::map,
    maps::{Array, LruHashMap, PerCpuArray, RingBuf},
};
use tracer_common::{KernelOffsets, PORT_WORDS};

/// Resolved from BTF by the loader (`EbpfLoader::set_global`).
#[unsafe(no_mangle)]
static OFFSETS: KernelOffsets = KernelOffsets::NONE;

/// Every record goes through this one ring buffer. The size here is a placeholder: the loader
/// sets it (`--ring-size`, default 16 MiB) with `EbpfLoader::map_max_entries`.
#[map]
static EVENTS: RingBuf = RingBuf::with_byte_size(16 << 20, 0);

/// Ring-buffer reservation failures, per CPU, indexed by `EventKind` number.
#[map]
static LOST: PerCpuArray<u64> = PerCpuArray::with_max_entries(8, 0);

/// One bit per UDP port: the DNS port set (default 53), written by the loader.
#[map]
static PORTS: Array<u64> = Array::with_max_entries(PORT_WORDS, 0);

/// Threads inside `sendmmsg(2)`: tid -> vlen.
#[map]
static IN_SENDMMSG: LruHashMap<u32, u32> = LruHashMap::with_max_entries(4096, 0);

/// Socket cookie -> the task that last sent on it, so a reply delivered in softirq context
/// is attributed to the process that owns the socket.
#[map]
static SOCK_OWNER: LruHashMap<u64, tracer_common::Task> = LruHashMap::with_max_entries(16384, 0);

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    loop {}
}

#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 4] = *b"GPL\0";

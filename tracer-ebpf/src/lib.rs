//! Library target so that `tracer` can name this crate as a build dependency (cargo
//! rebuilds the eBPF object when it changes). The programs live in `main.rs`.
#![no_std]

//! Userspace of the conntrack tracer: decoding, enrichment, output and the probe plan.
//! The `tracer` binary (`main.rs`) is a thin shell over this library.

pub mod btf;
pub mod bundle;
pub mod cli;
pub mod commands;
pub mod ctstats;
pub mod dns;
pub mod doctor;
pub mod events;
pub mod explain;
pub mod hex;
pub mod kallsyms;
pub mod lab;
pub mod lookups;
pub mod metrics;
pub mod modbtf;
pub mod netns;
pub mod node;
pub mod offsets;
pub mod output;
pub mod pcapng;
pub mod pipeline;
pub mod plan;
pub mod pods;
pub mod preflight;
pub mod replay;
pub mod report;
pub mod session;
pub mod timeline;
pub mod trace;
pub mod traffic;
pub mod verdict;
pub mod view;
pub mod watch;

/// A bound on a wait in a unit test, stretched by `TRACER_TEST_TIME_SCALE` as the
/// integration tests' `common::bound_ms` is (docs/testing.md).
#[cfg(test)]
pub(crate) fn test_bound_ms(ms: u64) -> std::time::Duration {
    let scale: u64 = std::env::var("TRACER_TEST_TIME_SCALE")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(1);
    std::time::Duration::from_millis(ms * scale.max(1))
}

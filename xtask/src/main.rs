//! Project automation: `cargo xtask <verb>` (alias in `.cargo/config.toml`).
//!
//! Verbs: `setup` (toolchain, tools, mounts; idempotent), `test`, `lint`, `watch`,
//! `bench-filter`, `bench-pipeline`, `bench-load`, `fuzz-dns`.

mod bench;
mod bench_load;
mod bench_load_report;
mod bench_pipeline;
mod fuzz;
mod guest;
mod lint;
mod parity;
mod setup;
mod test;
mod util;
mod vm;
mod watch;

use std::process::ExitCode;

use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(
    name = "cargo xtask",
    bin_name = "cargo xtask",
    about = "Build, test and run the conntrack/DNS tracer"
)]
struct Cli {
    #[command(subcommand)]
    verb: Verb,
}

#[derive(Subcommand)]
enum Verb {
    /// Install the Debian toolchain and tools, bpf-linker, and mount tracefs/bpffs (idempotent).
    Setup,
    /// Setup, build everything, then run unit, doc and (as root) integration tests, then
    /// the guest tier: the precise-path tests again, as root, in QEMU guests on Debian's 6.1.
    ///
    /// Arguments after `--` are passed to every `cargo test`; a second `--` inside them
    /// separates arguments for the test harness, e.g. `cargo xtask test -- dns -- --nocapture`.
    Test {
        /// Skip the guest tier.
        #[arg(long, conflicts_with = "guest_only")]
        no_guest: bool,
        /// Only the guest tier (after setup and build).
        #[arg(long)]
        guest_only: bool,
        #[arg(last = true)]
        args: Vec<String>,
    },
    /// Run clippy (host crates and the eBPF crate) with warnings denied, and rustfmt --check.
    Lint,
    /// Setup, build the tracer in release mode, then run `tracer watch <args>`.
    Watch {
        #[arg(last = true)]
        args: Vec<String>,
    },
    /// Setup, release build, then `tracer lab snat-race --rounds 100 <args>`: the tracer at
    /// work on a quiet machine.
    Demo {
        #[arg(last = true)]
        args: Vec<String>,
    },
    /// Measure what staying attached costs a node's traffic: UDP echo on loopback and over
    /// a veth pair, a TCP stream, a TCP connect/close loop and DNS, each detached, with
    /// programs that do nothing (the floor) and with the tracer attached, in rotating order
    /// per round; then each program's runs per operation and ns per run from the kernel's
    /// BPF statistics (root, bpftool).
    BenchFilter {
        /// Length of each measuring window, in seconds.
        #[arg(long, default_value_t = 2.0, value_parser = parse_seconds)]
        seconds: f64,
        /// Rounds (one window of each way) per workload.
        #[arg(long, default_value_t = 6, value_parser = clap::value_parser!(u32).range(1..=100))]
        rounds: u32,
        /// Workloads, comma-separated.
        #[arg(long, value_delimiter = ',', default_values = bench::WORKLOADS, value_parser = clap::builder::PossibleValuesParser::new(bench::WORKLOADS))]
        workloads: Vec<String>,
        /// Use this tracer binary instead of building the release one (e.g. inside the
        /// guest: `cargo xtask vm-test -- target/debug/xtask bench-filter --tracer
        /// target/release/tracer`).
        #[arg(long)]
        tracer: Option<std::path::PathBuf>,
        /// Also measure this build's `tracer watch` in every round (a before/after in one
        /// run, e.g. a build of an earlier commit).
        #[arg(long)]
        baseline: Option<std::path::PathBuf>,
    },
    /// Measure `tracer watch --json` under real DNS load: queries through real conntrack in
    /// throwaway network namespaces at set rates (one process with 64 sockets, or 200 pods
    /// doing glibc-style lookups), each rate detached then attached; per row the load's
    /// truth, the tracer's records, losses and lookups, its CPU and memory, and the
    /// attached/detached ratio of the achieved rate (root).
    BenchLoad {
        /// Total query rates to run, queries/s.
        #[arg(long, value_delimiter = ',', default_value = "10000,50000,100000",
              value_parser = parse_rate)]
        rates: Vec<u32>,
        /// Length of each window, in seconds.
        #[arg(long, default_value_t = 60, value_parser = clap::value_parser!(u32).range(1..=300))]
        seconds: u32,
        /// The generators' shape.
        #[arg(long, default_value = "both",
              value_parser = clap::builder::PossibleValuesParser::new(["one-process", "pods", "both"]))]
        shape: String,
        /// Pods of the pods shape (each its own network namespace and cgroup).
        #[arg(long, default_value_t = 200, value_parser = clap::value_parser!(u32).range(1..=250))]
        pods: u32,
        /// Also print one JSON line per row.
        #[arg(long)]
        json: bool,
        /// Run this tracer binary instead of building the release one (A/B runs of two
        /// builds in one sitting).
        #[arg(long)]
        tracer: Option<std::path::PathBuf>,
        /// Print the last lines of `tracer watch`'s stderr after each attached window.
        #[arg(long)]
        stderr: bool,
    },
    /// Measure the userspace event path on one core: decode, pod enrichment and lookup
    /// correlation throughput, then resident memory at 50k lookups/s and under hostile
    /// streams. Arguments after `--` go to the bench (`--runs N`, `--seconds S`, `--rate R`).
    BenchPipeline {
        #[arg(last = true)]
        args: Vec<String>,
    },
    /// Run `<command...>` as root in a QEMU guest on Debian's own kernel (fentry/fexit and
    /// kprobes work there), with this machine's `/` shared read-only under a tmpfs overlay,
    /// in the same directory; its stdout, stderr and exit status become this verb's.
    VmTest(vm::Args),
    /// Every lab scenario on this kernel (the fallback path here) and in a guest on
    /// Debian's 6.1 on each path (fallback, kprobes, fentry/fexit), with the same binary:
    /// one table of each `verdicts = counter` check (root; fails if a check fails).
    Parity,
    /// Fuzz the DNS decoder with cargo-fuzz (installed into .tools; needs rustup's nightly):
    /// `dns_parse` (tracer::dns alone) and `dns_diff` (against dns-parser, simple-dns and
    /// hickory-proto), for `--minutes` each; fails on a crash. See docs/dns.md.
    FuzzDns {
        /// Minutes per target.
        #[arg(long, default_value_t = 10.0, value_parser = parse_minutes)]
        minutes: f64,
        /// Run only this target (repeatable).
        #[arg(long, value_parser = clap::builder::PossibleValuesParser::new(fuzz::TARGETS))]
        target: Vec<String>,
    },
}

fn parse_minutes(s: &str) -> Result<f64, String> {
    match s.parse::<f64>() {
        Ok(v) if (0.05..=1440.0).contains(&v) => Ok(v),
        _ => Err(format!("'{s}': expected minutes from 0.05 to 1440")),
    }
}

fn parse_seconds(s: &str) -> Result<f64, String> {
    match s.parse::<f64>() {
        Ok(v) if (0.1..=600.0).contains(&v) => Ok(v),
        _ => Err(format!("'{s}': expected seconds from 0.1 to 600")),
    }
}

fn parse_rate(s: &str) -> Result<u32, String> {
    match s.parse::<u32>() {
        Ok(v) if (1..=200_000).contains(&v) => Ok(v),
        _ => Err(format!("'{s}': expected queries/s from 1 to 200000")),
    }
}

fn main() -> ExitCode {
    let verb = Cli::parse().verb;
    if std::env::var_os("CARGO").is_some_and(|c| c == "/usr/bin/cargo") {
        eprintln!(
            "xtask: warning: running under Debian's /usr/bin/cargo (cargo-web, meant for the \
             eBPF crate only); put ~/.cargo/bin first on PATH to use rustup's stable"
        );
    }
    let result = util::Workspace::locate().and_then(|ws| match verb {
        Verb::Setup => setup::run(&ws),
        Verb::Test {
            no_guest,
            guest_only,
            args,
        } => test::run(
            &ws,
            test::Tiers {
                host: !guest_only,
                guest: !no_guest,
            },
            &args,
        ),
        Verb::Lint => lint::run(&ws),
        Verb::Watch { args } => watch::run(&ws, &args),
        Verb::Demo { args } => watch::demo(&ws, &args),
        Verb::BenchFilter {
            seconds,
            rounds,
            workloads,
            tracer,
            baseline,
        } => bench::run(
            &ws,
            &bench::Args {
                seconds,
                rounds,
                workloads: workloads
                    .iter()
                    .filter_map(|w| bench::WORKLOADS.iter().find(|k| **k == w.as_str()).copied())
                    .collect(),
                tracer,
                baseline,
            },
        ),
        Verb::BenchPipeline { args } => bench_pipeline::run(&ws, &args),
        Verb::BenchLoad {
            rates,
            seconds,
            shape,
            pods,
            json,
            tracer,
            stderr,
        } => bench_load::run(
            &ws,
            &bench_load::Args {
                rates,
                seconds,
                shapes: bench_load::SHAPES
                    .into_iter()
                    .filter(|s| shape == "both" || shape == *s)
                    .collect(),
                pods,
                json,
                tracer,
                stderr,
            },
        ),
        Verb::VmTest(args) => vm::run(&ws, &args),
        Verb::Parity => parity::run(&ws),
        Verb::FuzzDns { minutes, target } => fuzz::run(
            &ws,
            &fuzz::Args {
                minutes,
                targets: target,
            },
        ),
    });
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            // `{:#}`: the whole context chain on one line, without anyhow's backtrace.
            eprintln!("xtask: error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

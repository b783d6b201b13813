//! `cargo xtask fuzz-dns`: fuzz the DNS decoder (`tracer::dns`) with libFuzzer through
//! cargo-fuzz, alone (`dns_parse`) and against dns-parser, simple-dns and hickory-proto
//! (`dns_diff`). Installs cargo-fuzz into `.tools` and needs rustup's nightly (for
//! `-Zsanitizer=address`). The fuzz crate is `fuzz/`, outside the workspace; its corpus and
//! crash artifacts stay in the gitignored `fuzz/corpus` and `fuzz/artifacts`.

use std::{
    fs,
    io::{BufRead as _, BufReader},
    path::Path,
    process::{Command, Stdio},
};

use anyhow::{bail, Context as _};

use crate::util::{self, Workspace};

pub(crate) const CARGO_FUZZ_VERSION: &str = "0.13.2";
const TOOLCHAIN: &str = "nightly";
pub(crate) const TARGETS: [&str; 2] = ["dns_parse", "dns_diff"];
/// Larger than any capture (512 bytes) and than most DNS datagrams.
const MAX_LEN: u32 = 1024;

pub(crate) struct Args {
    pub(crate) minutes: f64,
    pub(crate) targets: Vec<String>,
}

pub(crate) fn run(ws: &Workspace, args: &Args) -> anyhow::Result<()> {
    nightly()?;
    cargo_fuzz(ws)?;
    let fuzz_dir = ws.root.join("fuzz");
    let target_dir = ws.target_dir().join("fuzz");
    util::run(
        fuzz_command(ws, &fuzz_dir)?
            .args(["build", "-O", "-a", "--target-dir"])
            .arg(&target_dir),
    )?;

    let targets: Vec<&str> = if args.targets.is_empty() {
        TARGETS.to_vec()
    } else {
        args.targets.iter().map(String::as_str).collect()
    };
    let seconds = (args.minutes * 60.0).round().max(1.0) as u64;
    let mut summaries = Vec::new();
    for target in targets {
        let corpus = fuzz_dir.join("corpus").join(target);
        let artifacts = fuzz_dir.join("artifacts").join(target);
        fs::create_dir_all(&corpus).with_context(|| format!("creating {}", corpus.display()))?;
        fs::create_dir_all(&artifacts)
            .with_context(|| format!("creating {}", artifacts.display()))?;
        let report = artifacts.join("report.txt");
        let before = count_files(&corpus)?;
        let mut cmd = fuzz_command(ws, &fuzz_dir)?;
        cmd.args(["run", "-O", "-a", "--target-dir"])
            .arg(&target_dir)
            .arg(target)
            .arg(&corpus)
            .arg(fuzz_dir.join("seeds").join("dns"))
            .arg("--")
            .arg(format!("-max_total_time={seconds}"))
            .arg(format!("-max_len={MAX_LEN}"))
            .arg("-print_final_stats=1");
        if target == "dns_diff" {
            cmd.env("DNS_DIFF_REPORT", &report);
        }
        let stats = run_fuzzer(&mut cmd).with_context(|| {
            format!(
                "fuzz target {target} failed: the input that crashed it is in {}",
                artifacts.display()
            )
        })?;
        let after = count_files(&corpus)?;
        let mut line = format!(
            "fuzz-dns: {target}: {} s, {} executions ({} /s), {}, corpus directory {before} \
             -> {after} files, 0 crashes",
            stats.seconds.map_or("?".into(), |s| s.to_string()),
            stats.executions.as_deref().unwrap_or("?"),
            stats.per_second.as_deref().unwrap_or("?"),
            stats.coverage.as_deref().unwrap_or("cov: ?"),
        );
        if target == "dns_diff" {
            // Every corpus input once more, for a tally of distinct inputs rather than
            // of executions (which repeat the same mutations many times).
            let corpus_report = artifacts.join("corpus-report.txt");
            run_fuzzer(
                fuzz_command(ws, &fuzz_dir)?
                    .env("DNS_DIFF_REPORT", &corpus_report)
                    .args(["run", "-O", "-a", "--target-dir"])
                    .arg(&target_dir)
                    .arg(target)
                    .arg(&corpus)
                    .args(["--", "-runs=0"]),
            )?;
            line.push_str(&format!(
                "; tallies in {} (executions) and {} (corpus)",
                report.display(),
                corpus_report.display()
            ));
        }
        println!("{line}");
        summaries.push(line);
    }
    println!();
    for line in summaries {
        println!("{line}");
    }
    Ok(())
}

/// `rustup run nightly cargo fuzz` in `fuzz/`, with `.tools/bin` (cargo-fuzz) on `PATH`.
fn fuzz_command(ws: &Workspace, fuzz_dir: &Path) -> anyhow::Result<Command> {
    let mut cmd = Command::new("rustup");
    cmd.current_dir(fuzz_dir)
        .env("PATH", ws.path_with_tools()?)
        // `--target-dir` (a `fuzz` subdirectory) keeps the nightly, instrumented builds
        // apart from the workspace's.
        .env_remove("CARGO_TARGET_DIR")
        .env_remove("RUSTFLAGS")
        .env_remove("CARGO_ENCODED_RUSTFLAGS")
        .args(["run", TOOLCHAIN, "cargo", "fuzz"]);
    Ok(cmd)
}

fn nightly() -> anyhow::Result<()> {
    let list = util::output(Command::new("rustup").args(["toolchain", "list"]))?;
    if list
        .lines()
        .any(|l| l.starts_with(&format!("{TOOLCHAIN}-")))
    {
        println!("fuzz-dns: rustup {TOOLCHAIN}: installed");
        return Ok(());
    }
    util::run(Command::new("rustup").args([
        "toolchain",
        "install",
        TOOLCHAIN,
        "--profile",
        "minimal",
    ]))
}

fn cargo_fuzz(ws: &Workspace) -> anyhow::Result<()> {
    let bin = ws.tools_bin().join("cargo-fuzz");
    if util::tool_at("fuzz-dns: cargo-fuzz", &bin, CARGO_FUZZ_VERSION) {
        return Ok(());
    }
    util::run(
        ws.cargo()?
            .args([
                "install",
                &format!("cargo-fuzz@{CARGO_FUZZ_VERSION}"),
                "--locked",
            ])
            .arg("--root")
            .arg(ws.tools()),
    )
}

#[derive(Default)]
struct Stats {
    executions: Option<String>,
    per_second: Option<String>,
    /// From libFuzzer's `Done N runs in S second(s)`: fuzzing time, builds excluded.
    seconds: Option<u64>,
    /// `cov: N ft: N corp: N/SIZE` of libFuzzer's last status line: its live corpus (the
    /// directory also keeps inputs that were since reduced).
    coverage: Option<String>,
}

/// Runs libFuzzer, passing its output through, and picks the final stats out of it.
fn run_fuzzer(cmd: &mut Command) -> anyhow::Result<Stats> {
    let shown = std::iter::once(cmd.get_program())
        .chain(cmd.get_args())
        .map(|a| a.to_string_lossy())
        .collect::<Vec<_>>()
        .join(" ");
    println!("+ {shown}");
    let mut child = cmd
        .stderr(Stdio::piped())
        .spawn()
        .with_context(|| format!("failed to start `{shown}`"))?;
    let mut stats = Stats::default();
    if let Some(stderr) = child.stderr.take() {
        for line in BufReader::new(stderr).lines() {
            let line = line.context("reading libFuzzer's output")?;
            eprintln!("{line}");
            let value = |key: &str| line.strip_prefix(key).map(|v| v.trim().to_string());
            if line.starts_with('#') {
                if let Some(i) = line.find("cov: ") {
                    let fields: Vec<&str> = line[i..].split_whitespace().take(6).collect();
                    stats.coverage = Some(fields.join(" "));
                }
            } else if let Some(done) = line.strip_prefix("Done ") {
                stats.seconds = done.split_whitespace().nth(3).and_then(|s| s.parse().ok());
            } else if let Some(v) = value("stat::number_of_executed_units:") {
                stats.executions = Some(v);
            } else if let Some(v) = value("stat::average_exec_per_sec:") {
                stats.per_second = Some(v);
            }
        }
    }
    let status = child.wait().context("waiting for libFuzzer")?;
    if !status.success() {
        bail!("libFuzzer exited with {status}");
    }
    Ok(stats)
}

fn count_files(dir: &Path) -> anyhow::Result<usize> {
    Ok(fs::read_dir(dir)
        .with_context(|| format!("reading {}", dir.display()))?
        .filter(|e| e.as_ref().is_ok_and(|e| e.path().is_file()))
        .count())
}

//! `cargo xtask test`: setup, build everything, unit + doc tests, then the privileged
//! integration tests (they load real BPF programs and create network namespaces) one at a
//! time, then the guest tier (`guest.rs`): the precise-path test binaries again, in QEMU
//! guests on Debian's 6.1 kernel, where fentry/fexit and kprobes work.
//!
//! Skips: a privileged test that can not run fails, unless this machine truly can not do
//! the thing; such a test says so (`common::skip`: a `SKIPPED: <test>: <reason>` line in
//! `$TRACER_TEST_SKIPS`) and each tier counts and prints its skips. An `#[ignore]`d test
//! is run all the same (`--include-ignored`).

use std::{fs, time::Instant};

use anyhow::{bail, Context as _};

use crate::{
    guest, setup,
    util::{self, Workspace},
};

/// The eBPF crate only builds for bpfel-unknown-none (tracer's build.rs does that).
pub(crate) const HOST_CRATES: &[&str] = &["--workspace", "--exclude", "tracer-ebpf"];

/// Which tiers to run: the host's tests (unit, doc, integration) and the guest tier.
#[derive(Clone, Copy)]
pub(crate) struct Tiers {
    pub(crate) host: bool,
    pub(crate) guest: bool,
}

pub(crate) fn run(ws: &Workspace, tiers: Tiers, args: &[String]) -> anyhow::Result<()> {
    let start = Instant::now();
    let result = steps(ws, tiers, args);
    let outcome = if result.is_ok() { "passed" } else { "FAILED" };
    println!(
        "test: {outcome}; total wall time {:.1} s",
        start.elapsed().as_secs_f64()
    );
    result
}

fn steps(ws: &Workspace, tiers: Tiers, args: &[String]) -> anyhow::Result<()> {
    // `cargo xtask test -- <cargo test args> [-- <harness args>]`
    let (cargo_args, harness_args) = match args.iter().position(|a| a == "--") {
        Some(i) => (&args[..i], &args[i + 1..]),
        None => (args, &[][..]),
    };

    step("setup", || setup::run(ws))?;

    step("build", || {
        util::run(
            ws.cargo()?
                .arg("build")
                .args(HOST_CRATES)
                .arg("--all-targets"),
        )
    })?;

    let skips = ws.target_dir().join("test-skips.txt");
    let _ = fs::remove_file(&skips);
    let cargo_test = |selection: &[&str], harness: &[&str]| -> anyhow::Result<()> {
        util::run(
            ws.cargo()?
                .env("RUST_BACKTRACE", "1")
                .env("TRACER_TEST_SKIPS", &skips)
                .arg("test")
                .args(HOST_CRATES)
                .args(selection)
                .args(cargo_args)
                .arg("--")
                .args(harness)
                .args(harness_args),
        )
    };

    if tiers.host {
        step("unit tests", || cargo_test(&["--lib", "--bins"], &[]))?;
        step("doc tests", || cargo_test(&["--doc"], &[]))?;
    }

    if !has_integration_tests(ws)? {
        println!("test: no tests/*.rs in any workspace crate; no integration tests to run");
        return Ok(());
    }
    if !util::is_root()? {
        bail!(
            "test: the integration tests load BPF programs and create network namespaces: \
             they need root (running as uid {}); rerun `cargo xtask test` as root",
            util::euid()?
        );
    }
    // The guest tier runs even when the host's integration tests failed: CI reports both.
    let host = if tiers.host {
        let result = step("integration tests (root, one at a time)", || {
            cargo_test(&["--test", "*"], &["--test-threads=1", "--include-ignored"])
        });
        report_skips("host", &read_skips(&skips));
        result
    } else {
        Ok(())
    };
    let guest = if tiers.guest {
        step(
            "guest tier (precise-path tests in QEMU on Debian's 6.1 kernel)",
            || guest::run(ws, cargo_args, harness_args),
        )
    } else {
        Ok(())
    };
    match (host, guest) {
        (Ok(()), Ok(())) => Ok(()),
        (Err(e), Ok(())) | (Ok(()), Err(e)) => Err(e),
        (Err(h), Err(g)) => bail!("{h:#}; and {g:#}"),
    }
}

fn step(name: &str, f: impl FnOnce() -> anyhow::Result<()>) -> anyhow::Result<()> {
    println!("test: == {name}");
    let start = Instant::now();
    let result = f();
    println!(
        "test: == {name}: {} in {:.1} s",
        if result.is_ok() { "ok" } else { "FAILED" },
        start.elapsed().as_secs_f64()
    );
    result
}

/// The `SKIPPED: ...` lines tests wrote to `path` (none if it does not exist).
fn read_skips(path: &std::path::Path) -> Vec<String> {
    skip_lines(&fs::read_to_string(path).unwrap_or_default())
}

/// The `SKIPPED: <binary>::<test>: <reason>` lines of a skips file.
pub(crate) fn skip_lines(text: &str) -> Vec<String> {
    text.lines()
        .filter(|l| l.starts_with("SKIPPED: "))
        .map(str::to_string)
        .collect()
}

/// `test: host: 2 tests skipped (this machine can not run them):` and each line.
pub(crate) fn report_skips(tier: &str, skips: &[String]) {
    if skips.is_empty() {
        println!("test: {tier}: no test skipped");
        return;
    }
    println!(
        "test: {tier}: {} test{} SKIPPED (this machine can not run them):",
        skips.len(),
        if skips.len() == 1 { "" } else { "s" }
    );
    for s in skips {
        println!("test: {tier}:   {s}");
    }
}

/// `cargo test --test '*'` fails when no crate has an integration test, so look first.
fn has_integration_tests(ws: &Workspace) -> anyhow::Result<bool> {
    for krate in fs::read_dir(&ws.root).context("listing the workspace root")? {
        let tests = krate?.path().join("tests");
        let Ok(entries) = fs::read_dir(&tests) else {
            continue;
        };
        for entry in entries {
            let path = entry?.path();
            if path.extension().is_some_and(|e| e == "rs") || path.join("main.rs").is_file() {
                return Ok(true);
            }
        }
    }
    Ok(false)
}

#[cfg(test)]
mod tests {
    #[test]
    fn skip_lines_keep_only_the_markers() {
        let text =
            "SKIPPED: lab::a: no /dev/kvm\nnoise\n  SKIPPED: indented\nSKIPPED: doctor::b: x\n";
        assert_eq!(
            super::skip_lines(text),
            ["SKIPPED: lab::a: no /dev/kvm", "SKIPPED: doctor::b: x"]
        );
        assert!(super::skip_lines("").is_empty());
    }
}

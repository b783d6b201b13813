//! `cargo xtask parity`: every lab scenario once on this machine's kernel (the fallback
//! path here), then in one guest on Debian's 6.1 on each path (the fallback, forced with
//! `--skip`; the kprobe pairs, `--skip fexit`; and the precise path: fentry/fexit, the
//! nf_conntrack functions through the module's BTF), with the same debug binary, then one
//! table: per scenario and path, each non-zero check `verdicts = counter` of the lab's
//! report and the per-packet records behind it. Fails if a check failed anywhere. The
//! figures in docs/vm.md ("Parity") come from it.

use std::{collections::BTreeMap, process::Command, time::Duration};

use anyhow::{bail, Context as _};
use serde_json::Value;

use crate::{
    setup,
    util::{self, Workspace},
    vm::{self, quote},
};

/// (name, `tracer lab` arguments).
const SCENARIOS: &[(&str, &str)] = &[
    ("dns-race", "dns-race --rounds 30"),
    (
        "dns-race, glibc, first AAAA dropped",
        "dns-race --rounds 2 --client glibc --lose-first-aaaa",
    ),
    ("snat-race, UDP", "snat-race --rounds 30"),
    ("snat-race, TCP", "snat-race --rounds 30 --proto tcp"),
    ("table-full", "table-full --rounds 20"),
    ("early-drop", "early-drop --rounds 20"),
    ("invalid", "invalid --rounds 5"),
];

/// The paths run in the guest, each with every scenario: (column, `--skip` arguments).
const GUEST_PATHS: &[(&str, &str)] = &[
    ("fallback", "--skip fentry --skip fexit --skip kprobes"),
    ("kprobes", "--skip fexit"),
    ("fentry/fexit", ""),
];

/// The guest runs every scenario on every path in one boot; generous for TCG.
const GUEST_LIMIT: Duration = Duration::from_secs(3000);

pub(crate) fn run(ws: &Workspace) -> anyhow::Result<()> {
    if !util::is_root()? {
        bail!("parity: the lab builds network namespaces and loads BPF programs: run as root");
    }
    setup::run(ws)?;
    util::run(ws.cargo()?.args(["build", "--package", "tracer"]))?;
    let tracer = ws.target_dir().join("debug").join("tracer");

    // Column 0: this machine; then one per guest path.
    let mut columns: Vec<(String, Vec<Result<Report, String>>)> = Vec::new();
    let mut host = Vec::new();
    for (name, args) in SCENARIOS {
        println!("parity: host: tracer lab {args}");
        let out = Command::new(&tracer)
            .arg("lab")
            .args(args.split_whitespace())
            .args(["--json", "--quiet"])
            .output()
            .with_context(|| format!("running {}", tracer.display()))?;
        host.push(report(name, &String::from_utf8_lossy(&out.stdout)));
    }
    columns.push((format!("host {}", release()), host));

    let guest = vm::prepare(ws, None)?;
    let t = quote(&tracer.to_string_lossy());
    let mut script = String::from("#!/bin/sh\n# Written by `cargo xtask parity`.\n");
    for (p, (_, skip)) in GUEST_PATHS.iter().enumerate() {
        for (i, (_, args)) in SCENARIOS.iter().enumerate() {
            script += &format!(
                "echo 'parity: guest: tracer lab {args} {skip}'\n\
                 {t} lab {args} {skip} --json --quiet > /run/vm-test/report-{p}-{i}.json\n"
            );
        }
    }
    let job = vm::Job {
        cwd: ws.root.clone(),
        command: vec!["/bin/sh".into(), "/run/vm-test/parity.sh".into()],
        env: Vec::new(),
        files: vec![("parity.sh".into(), script.into_bytes())],
        timeout: GUEST_LIMIT,
        name: "parity".into(),
        prefix_output: false,
        common: None,
    };
    let outcome = vm::boot(ws, &guest, &job)?;
    if let Err(failure) = &outcome.status {
        bail!("parity: the guest did not finish: {failure}");
    }
    for (p, (path, _)) in GUEST_PATHS.iter().enumerate() {
        let reports = SCENARIOS
            .iter()
            .enumerate()
            .map(|(i, (name, _))| {
                let bytes = outcome
                    .files
                    .get(&format!("report-{p}-{i}.json"))
                    .cloned()
                    .unwrap_or_default();
                report(name, &String::from_utf8_lossy(&bytes))
            })
            .collect();
        columns.push((format!("guest {}, {path}", guest.release), reports));
    }

    // One row per scenario: the checks that counted something, then per column each
    // check's verdicts/counter and the per-packet events behind them.
    let mut head = String::from("| scenario | check |");
    let mut rule = String::from("|---|---|");
    for (c, _) in &columns {
        head += &format!(" {c} |");
        rule += "---|";
    }
    println!("\n{head}\n{rule}");
    let mut failed = Vec::new();
    for (i, (name, _)) in SCENARIOS.iter().enumerate() {
        let mut checks: Vec<&str> = Vec::new();
        for (_, reports) in &columns {
            if let Ok(r) = &reports[i] {
                for (what, _, _) in &r.checks {
                    if !checks.contains(&what.as_str()) {
                        checks.push(what);
                    }
                }
            }
        }
        let mut row = format!("| {name} | {} |", checks.join("; "));
        for (column, reports) in &columns {
            let cell = match &reports[i] {
                Ok(r) => {
                    if !r.ok {
                        failed.push(format!("{name} ({column})"));
                    }
                    r.cell(&checks)
                }
                Err(e) => {
                    failed.push(format!("{name} ({column}): {e}"));
                    format!("no report: {e}")
                }
            };
            row += &format!(" {cell} |");
        }
        println!("{row}");
    }
    println!(
        "\nparity: the guest's boot and {} runs took {:.0} s",
        GUEST_PATHS.len() * SCENARIOS.len(),
        outcome.wall.as_secs_f64()
    );
    if !failed.is_empty() {
        bail!("parity: checks failed: {}", failed.join("; "));
    }
    Ok(())
}

/// What the table shows of one lab report.
struct Report {
    ok: bool,
    /// (`what (namespace)`, verdicts, counter) of each check that counted something, or
    /// failed.
    checks: Vec<(String, u64, u64)>,
    events: BTreeMap<String, u64>,
}

impl Report {
    fn cell(&self, order: &[&str]) -> String {
        let mut parts: Vec<String> = order
            .iter()
            .map(
                |what| match self.checks.iter().find(|(w, _, _)| w == what) {
                    Some((_, v, c)) => format!("{v}/{c}"),
                    None => "0/0".into(),
                },
            )
            .collect();
        // Records seen per packet: clashes at nf_ct_resolve_clash, drops.
        for kind in ["ct_clash", "nf_drop"] {
            if let Some(n) = self.events.get(kind) {
                parts.push(format!("{kind} {n}"));
            }
        }
        let cell = parts.join(", ");
        if self.ok {
            cell
        } else {
            format!("**FAILED** {cell}")
        }
    }
}

/// The lab's report: the last line of its `--json` output.
fn report(name: &str, stdout: &str) -> Result<Report, String> {
    let v: Value = stdout
        .lines()
        .last()
        .and_then(|l| serde_json::from_str(l).ok())
        .ok_or_else(|| format!("{name}: no JSON report"))?;
    let checks = v["checks"]
        .as_array()
        .ok_or_else(|| format!("{name}: report without checks"))?;
    let mut ok = true;
    let mut shown = Vec::new();
    for c in checks {
        let (verdicts, counter) = (
            c["verdicts"].as_u64().unwrap_or(0),
            c["counter"].as_u64().unwrap_or(0),
        );
        let good = c["ok"] == true;
        ok &= good;
        if !good || verdicts > 0 || counter > 0 {
            shown.push((
                format!(
                    "{} ({})",
                    c["what"].as_str().unwrap_or("?"),
                    c["namespace"].as_str().unwrap_or("?")
                ),
                verdicts,
                counter,
            ));
        }
    }
    let events = v["events"]
        .as_object()
        .map(|m| {
            m.iter()
                .map(|(k, n)| (k.clone(), n.as_u64().unwrap_or(0)))
                .collect()
        })
        .unwrap_or_default();
    Ok(Report {
        ok,
        checks: shown,
        events,
    })
}

fn release() -> String {
    std::fs::read_to_string("/proc/sys/kernel/osrelease")
        .map(|s| s.trim().to_string())
        .unwrap_or_else(|_| "?".into())
}

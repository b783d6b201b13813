//! `cargo xtask parity`: every lab scenario once on this machine's kernel (the fallback
//! path here) and once in a guest on Debian's 6.1 (the precise path: fentry/fexit, the
//! nf_conntrack functions through the module's BTF), with the same debug binary, then one
//! table: per scenario and kernel, each non-zero check `verdicts = counter` of the lab's
//! report and the events that backed it. Fails if a check failed on either kernel. The
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

/// The guest runs every scenario in one boot; generous for TCG.
const GUEST_LIMIT: Duration = Duration::from_secs(1500);

pub(crate) fn run(ws: &Workspace) -> anyhow::Result<()> {
    if !util::is_root()? {
        bail!("parity: the lab builds network namespaces and loads BPF programs: run as root");
    }
    setup::run(ws)?;
    util::run(ws.cargo()?.args(["build", "--package", "tracer"]))?;
    let tracer = ws.target_dir().join("debug").join("tracer");

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

    let guest = vm::prepare(ws, None)?;
    let t = quote(&tracer.to_string_lossy());
    let mut script = String::from("#!/bin/sh\n# Written by `cargo xtask parity`.\n");
    for (i, (_, args)) in SCENARIOS.iter().enumerate() {
        script += &format!(
            "echo 'parity: guest: tracer lab {args}'\n\
             {t} lab {args} --json --quiet > /run/vm-test/report-{i}.json\n"
        );
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
    let guest_reports: Vec<Result<Report, String>> = SCENARIOS
        .iter()
        .enumerate()
        .map(|(i, (name, _))| {
            let bytes = outcome
                .files
                .get(&format!("report-{i}.json"))
                .cloned()
                .unwrap_or_default();
            report(name, &String::from_utf8_lossy(&bytes))
        })
        .collect();

    println!(
        "\n| scenario | host {} (fallback) | guest {} (precise) |\n|---|---|---|",
        release(),
        guest.release
    );
    let mut failed = Vec::new();
    for (i, (name, _)) in SCENARIOS.iter().enumerate() {
        let cell = |r: &Result<Report, String>, side: &str, failed: &mut Vec<String>| match r {
            Ok(r) => {
                if !r.ok {
                    failed.push(format!("{name} ({side})"));
                }
                r.cell()
            }
            Err(e) => {
                failed.push(format!("{name} ({side}): {e}"));
                format!("no report: {e}")
            }
        };
        let h = cell(&host[i], "host", &mut failed);
        let g = cell(&guest_reports[i], "guest", &mut failed);
        println!("| {name} | {h} | {g} |");
    }
    println!(
        "\nparity: guest boot and runs {:.0} s",
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
    /// `what: verdicts/counter` of each check that counted something, or failed.
    checks: Vec<String>,
    events: BTreeMap<String, u64>,
}

impl Report {
    fn cell(&self) -> String {
        let events: Vec<String> = self
            .events
            .iter()
            .map(|(k, v)| format!("{k} {v}"))
            .collect();
        format!(
            "{}{}; events: {}",
            if self.ok { "" } else { "**FAILED** " },
            self.checks.join("; "),
            events.join(", ")
        )
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
        let (verdicts, counter) = (c["verdicts"].as_u64(), c["counter"].as_u64());
        let good = c["ok"] == true;
        ok &= good;
        if !good || verdicts.unwrap_or(0) > 0 || counter.unwrap_or(0) > 0 {
            shown.push(format!(
                "{} ({}): {}/{}",
                c["what"].as_str().unwrap_or("?"),
                c["namespace"].as_str().unwrap_or("?"),
                verdicts.unwrap_or(0),
                counter.unwrap_or(0)
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

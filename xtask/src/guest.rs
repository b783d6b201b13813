//! The guest tier of `cargo xtask test`: the privileged test binaries that exercise the
//! precise path (fentry/fexit, kprobes, module BTF, offsets from another kernel's BTF) run
//! again, as root, in QEMU guests booted on Debian's 6.1 kernel (`vm.rs`), where the kernel
//! allows what this machine's refuses. `TRACER_TEST_TRAMPOLINES=allowed` tells the tests
//! which kernel they are on.
//!
//! `GUESTS` guests boot at once and share a work list: every test of every binary, one
//! process per test (`--exact`), longest binaries first. Each guest goes down the list and
//! runs the tests it claims first (`mkdir` in the directory the guests share is atomic), so
//! they finish within about one test of each other, and the tests of a guest that crashes
//! are still run by the other. The tests wait on timers and clients as much as they
//! compute: two guests on two cores take about half the time of one. Each test runs under
//! `timeout`, its output streamed (prefixed with the guest's name) and kept with its exit
//! status; QEMU is killed if a guest overruns `GUEST_LIMIT`.
//!
//! The tier fails, naming the tests, if a test fails, times out, crashes its guest, or does
//! not pass as the one test of its run (libtest's `test result:` must count 1 passed, 0
//! ignored): an ignored guest test is a failure too. A test that says this machine can not
//! run it (`common::skip`, a `SKIPPED:` line in `$TRACER_TEST_SKIPS`, here the guest's
//! `<id>.skip`) passes and is counted and printed as skipped, with its reason.

use std::{
    collections::BTreeMap,
    fmt::Write as _,
    fs,
    path::{Path, PathBuf},
    process::Command,
    thread,
    time::{Duration, Instant},
};

use anyhow::{bail, Context as _};

use crate::{
    test::HOST_CRATES,
    util::{self, Workspace},
    vm::{self, quote},
};

/// The tracer's integration test binaries run in the guests, in this order (longest first),
/// with the longest one test may take there. Measured (one guest running a whole binary on
/// this 2-core machine while others used it): lab 500-560 s (17 tests of 5-55 s),
/// kernel_watch 53 s, lab_clients 46 s, invalid 19 s, ctstats 17 s, btf_offsets 11 s,
/// ctlookup 6 s. `tests/vm_*.rs` binaries (guest-only tests) run last, with `VM_TEST_LIMIT`.
const GUEST_TESTS: &[(&str, u64)] = &[
    // Every lab scenario with the precise programs attached.
    ("lab", 240),
    ("lab_clients", 180),
    // `tracer probes` and `tracer watch` on the precise sources.
    ("kernel_watch", 180),
    ("invalid", 120),
    // The counters and ctnetlink lookups the verdicts are checked against, on 6.1.
    ("ctstats", 60),
    // Offsets from 6.1's BTF, read by the same binary that reads 6.18's on the host.
    ("btf_offsets", 60),
    ("ctlookup", 60),
];
const VM_TEST_LIMIT: u64 = 300;
/// Guests booted at once.
const GUESTS: usize = 2;
/// QEMU is killed after this long (the tier takes about 9 minutes).
const GUEST_LIMIT: u64 = 1500;

/// One test binary: its tests (as it lists them) and how long one test may take.
struct Binary {
    name: String,
    exe: PathBuf,
    tests: Vec<String>,
    limit: u64,
}

/// How one test went, from the guest that ran it.
struct Ran {
    guest: usize,
    rc: Option<i32>,
    secs: Option<f64>,
    log: String,
}

pub(crate) fn run(
    ws: &Workspace,
    cargo_args: &[String],
    harness_args: &[String],
) -> anyhow::Result<()> {
    let start = Instant::now();
    let mut wanted: Vec<(String, u64)> = GUEST_TESTS
        .iter()
        .map(|(n, l)| (n.to_string(), *l))
        .collect();
    wanted.extend(vm_only_tests(ws)?.into_iter().map(|n| (n, VM_TEST_LIMIT)));
    let exes = executables(ws, &wanted, cargo_args)?;
    let mut binaries = Vec::new();
    for ((name, limit), exe) in wanted.into_iter().zip(exes) {
        let tests = list_tests(&exe, harness_args)?;
        if tests.is_empty() && harness_args.is_empty() {
            bail!("guest tier: {name} lists no tests");
        }
        binaries.push(Binary {
            name,
            exe,
            tests,
            limit,
        });
    }
    let guest = vm::prepare(ws, None)?;

    // The work list, the same for every guest: `run <id> <label> <limit> <command...>`.
    let crate_dir = ws.root.join("tracer");
    let mut work = String::new();
    let mut ids: Vec<(usize, usize, String)> = Vec::new();
    for (bi, b) in binaries.iter().enumerate() {
        for (ti, t) in b.tests.iter().enumerate() {
            let id = format!("t{:03}", ids.len());
            let _ = write!(
                work,
                "run {id} {} {} {} --exact {} --test-threads=1",
                quote(&format!("{}::{t}", b.name)),
                b.limit,
                quote(&b.exe.to_string_lossy()),
                quote(t)
            );
            // The filters already chose the tests (`list_tests`); passed on, several names
            // would each match exactly beside `--exact` and run more than the one test.
            for a in harness_args.iter().filter(|a| a.starts_with('-')) {
                let _ = write!(work, " {}", quote(a));
            }
            work.push('\n');
            ids.push((bi, ti, id));
        }
    }
    let common = env_temp_dir("xtask-guests")?;
    let jobs: Vec<vm::Job> = (0..GUESTS)
        .map(|g| {
            let script = format!(
                "#!/bin/sh\n# Written by `cargo xtask test`: guest {g} of the guest tier.\n\
                 cd {} || exit 1\n{RUN_FN}{work}exit 0\n",
                quote(&crate_dir.to_string_lossy()),
            );
            vm::Job {
                cwd: crate_dir.clone(),
                command: vec!["/bin/sh".into(), "/run/vm-test/tests.sh".into()],
                env: vec![
                    ("TRACER_TEST_TRAMPOLINES".into(), "allowed".into()),
                    // TCG: waits for the tracer and the clients get 4 times as long.
                    ("TRACER_TEST_TIME_SCALE".into(), "4".into()),
                    ("RUST_BACKTRACE".into(), "1".into()),
                ],
                files: vec![("tests.sh".into(), script.into_bytes())],
                timeout: Duration::from_secs(GUEST_LIMIT),
                name: format!("guest{g}"),
                prefix_output: true,
                common: Some(common.clone()),
            }
        })
        .collect();
    println!(
        "test: guest: {GUESTS} guests on Debian's {} under QEMU (TCG), {} test binaries, \
         {} tests (set-up {:.1} s)",
        guest.release,
        binaries.len(),
        ids.len(),
        start.elapsed().as_secs_f64()
    );
    let booted = Instant::now();
    let outcomes: Vec<anyhow::Result<vm::Outcome>> = thread::scope(|s| {
        let handles: Vec<_> = jobs
            .iter()
            .map(|job| {
                let guest = &guest;
                s.spawn(move || vm::boot(ws, guest, job))
            })
            .collect();
        handles
            .into_iter()
            .map(|h| h.join().expect("a guest thread panicked"))
            .collect()
    });
    let wall = booted.elapsed();
    let _ = fs::remove_dir_all(&common);

    let mut problems = Vec::new();
    let mut busy = [(0usize, 0.0f64); GUESTS];
    for (job, outcome) in jobs.iter().zip(&outcomes) {
        match outcome {
            Err(e) => problems.push(format!("{}: {e:#}", job.name)),
            Ok(o) => {
                if let Err(e) = &o.status {
                    problems.push(format!("{}: {e}", job.name));
                }
            }
        }
    }
    // Which guest ran each test: the one whose shared directory has its log.
    let mut ran: BTreeMap<&str, Ran> = BTreeMap::new();
    let mut skips: Vec<String> = Vec::new();
    for (g, outcome) in outcomes.iter().enumerate() {
        let Ok(o) = outcome else { continue };
        for (_, _, id) in &ids {
            let text = |suffix: &str| {
                o.files
                    .get(&format!("{id}.{suffix}"))
                    .map(|b| String::from_utf8_lossy(b).into_owned())
            };
            let Some(log) = text("log") else { continue };
            let secs = text("ms")
                .and_then(|s| s.trim().parse::<u64>().ok())
                .map(|ms| ms as f64 / 1000.0);
            skips.extend(crate::test::skip_lines(&text("skip").unwrap_or_default()));
            busy[g].0 += 1;
            busy[g].1 += secs.unwrap_or(0.0);
            ran.insert(
                id,
                Ran {
                    guest: g,
                    rc: text("rc").and_then(|s| s.trim().parse().ok()),
                    secs,
                    log,
                },
            );
        }
    }
    let mut report = String::new();
    for (g, job) in jobs.iter().enumerate() {
        let (tests, secs) = busy[g];
        let state = match &outcomes[g] {
            Ok(o) => format!(
                "{:.1} s, {tests} tests ({secs:.1} s), {}",
                o.wall.as_secs_f64(),
                o.status
                    .as_ref()
                    .map_or_else(|e| e.clone(), |_| "powered off".into())
            ),
            Err(e) => format!("{e:#}"),
        };
        let _ = writeln!(report, "test: guest:   {}: {state}", job.name);
    }

    // Each binary's tests' outputs, one file per binary, beside the guests' consoles.
    let logs = ws.target_dir().join("vm-test");
    fs::create_dir_all(&logs).with_context(|| format!("creating {}", logs.display()))?;
    let _ = writeln!(report, "test: guest:   binary          passed  test time");
    for (bi, b) in binaries.iter().enumerate() {
        let mut kept = String::new();
        let (mut passed, mut secs) = (0, 0.0);
        for (_, ti, id) in ids.iter().filter(|(i, _, _)| *i == bi) {
            let test = &b.tests[*ti];
            let Some(r) = ran.get(id.as_str()) else {
                problems.push(format!("{}::{test}: did not run", b.name));
                continue;
            };
            secs += r.secs.unwrap_or(0.0);
            let _ = writeln!(
                kept,
                "==== {test} (guest{}, exit {}, {})\n{}",
                r.guest,
                r.rc.map_or("-".to_string(), |c| c.to_string()),
                r.secs.map_or("-".to_string(), |s| format!("{s:.1} s")),
                r.log
            );
            let summary = Summary::parse(&r.log);
            let problem = match (r.rc, &summary) {
                (None, _) => Some(format!("did not finish in guest{}", r.guest)),
                (Some(124 | 137), _) => Some(format!("timed out after {} s", b.limit)),
                (_, None) => Some(format!("exit status {:?} and no `test result:` line", r.rc)),
                (_, Some(s)) if s.failed > 0 => Some("failed".to_string()),
                (_, Some(s)) if s.ignored > 0 => {
                    Some("ignored (a skipped guest test is a failure)".to_string())
                }
                (Some(0), Some(s)) if s.passed == 1 => None,
                (Some(rc), Some(s)) => Some(format!("exit status {rc}, {} passed", s.passed)),
            };
            match problem {
                None => passed += 1,
                Some(p) => problems.push(format!("{}::{test}: {p}", b.name)),
            }
        }
        let _ = fs::write(logs.join(format!("{}.log", b.name)), kept);
        let _ = writeln!(
            report,
            "test: guest:   {:<15} {:>3}/{:<3}  {secs:.1} s",
            b.name,
            passed,
            b.tests.len()
        );
    }
    println!(
        "test: guest: {GUESTS} guests in {:.1} s (wall, from the first boot to the last \
         power-off)",
        wall.as_secs_f64()
    );
    print!("{report}");
    crate::test::report_skips("guest", &skips);
    if !problems.is_empty() {
        bail!(
            "guest tier: {} (outputs and consoles: {})",
            problems.join("; "),
            logs.display()
        );
    }
    Ok(())
}

/// Runs one test if this guest claims it first, with a time limit, its output both
/// streamed and kept in the guest's shared directory with its exit status and wall time (ms).
const RUN_FN: &str = r#"run() {
	id=$1 label=$2 limit=$3
	shift 3
	mkdir "/run/vm-common/$id" 2>/dev/null || return 0
	echo "guest: == $label"
	start=$(date +%s%N)
	{ TRACER_TEST_SKIPS="/run/vm-test/$id.skip" timeout -k 10 "$limit" "$@" 2>&1; echo $? >"/run/vm-test/$id.rc"; } | tee "/run/vm-test/$id.log"
	end=$(date +%s%N)
	echo $(((end - start) / 1000000)) >"/run/vm-test/$id.ms"
}
"#;

/// A new empty directory under the temp dir (removed by the caller).
fn env_temp_dir(what: &str) -> anyhow::Result<PathBuf> {
    let dir = std::env::temp_dir().join(format!("{what}-{}", std::process::id()));
    let _ = fs::remove_dir_all(&dir);
    fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
    Ok(dir)
}

/// The counts of libtest's last `test result:` line.
struct Summary {
    passed: u64,
    failed: u64,
    ignored: u64,
}

impl Summary {
    /// `test result: ok. 5 passed; 0 failed; 0 ignored; 0 measured; 0 filtered out; ...`
    fn parse(log: &str) -> Option<Self> {
        let line = log
            .lines()
            .rev()
            .find_map(|l| l.strip_prefix("test result: "))?;
        let count = |what: &str| -> Option<u64> {
            line.split(';')
                .find_map(|part| part.trim().strip_suffix(what))
                .and_then(|n| n.split_whitespace().last())
                .and_then(|n| n.parse().ok())
        };
        Some(Self {
            passed: count(" passed")?,
            failed: count(" failed")?,
            ignored: count(" ignored")?,
        })
    }
}

/// `tracer/tests/vm_*.rs`: tests meant for the guest only, by target name.
fn vm_only_tests(ws: &Workspace) -> anyhow::Result<Vec<String>> {
    let dir = ws.root.join("tracer/tests");
    let mut names = Vec::new();
    for entry in fs::read_dir(&dir).with_context(|| format!("listing {}", dir.display()))? {
        let name = entry?.file_name().to_string_lossy().into_owned();
        if let Some(stem) = name.strip_suffix(".rs") {
            if stem.starts_with("vm_") {
                names.push(stem.to_string());
            }
        }
    }
    names.sort();
    Ok(names)
}

/// The built test binaries, in the order of `tests`, from cargo's JSON messages (so they
/// are where `CARGO_TARGET_DIR` says).
fn executables(
    ws: &Workspace,
    tests: &[(String, u64)],
    cargo_args: &[String],
) -> anyhow::Result<Vec<PathBuf>> {
    let mut cmd = ws.cargo()?;
    // The host tier's package selection: the same feature resolution, so nothing rebuilds.
    cmd.args(["test", "--no-run", "--message-format=json"])
        .args(HOST_CRATES);
    for (name, _) in tests {
        cmd.args(["--test", name]);
    }
    cmd.args(cargo_args);
    let out = util::output(&mut cmd)?;
    let mut found = Vec::new();
    for line in out.lines() {
        if !line.contains(r#""reason":"compiler-artifact""#) {
            continue;
        }
        // The first "name" of an artifact message is its target's.
        let (Some(exe), Some(target)) =
            (json_string(line, "executable"), json_string(line, "name"))
        else {
            continue;
        };
        found.push((target, PathBuf::from(exe)));
    }
    tests
        .iter()
        .map(|(name, _)| {
            found
                .iter()
                .find(|(t, _)| t == name)
                .map(|(_, p)| p.clone())
                .with_context(|| format!("cargo built no test binary named {name}"))
        })
        .collect()
}

/// The tests a binary lists (`<name>: test` lines of `--list`), with the harness arguments
/// (filters) applied.
fn list_tests(exe: &Path, harness_args: &[String]) -> anyhow::Result<Vec<String>> {
    let out = util::output(Command::new(exe).arg("--list").args(harness_args))?;
    Ok(out
        .lines()
        .filter_map(|l| l.strip_suffix(": test"))
        .map(str::to_string)
        .collect())
}

/// The first `"key":"value"` string of a JSON line (cargo writes no spaces and our paths and
/// target names need no escapes).
fn json_string(line: &str, key: &str) -> Option<String> {
    let start = line.find(&format!(r#""{key}":""#))? + key.len() + 4;
    let len = line[start..].find('"')?;
    Some(line[start..start + len].to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    const LOG: &str = "running 3 tests
test a ... ok
test b ... FAILED
test c ... ok

failures:

---- b stdout ----
thread 'b' panicked at tracer/tests/lab.rs:1:1:
boom

failures:
    b

test result: FAILED. 2 passed; 1 failed; 0 ignored; 0 measured; 14 filtered out; finished in 1.00s
";

    #[test]
    fn summary_and_failures_from_a_libtest_log() {
        let s = Summary::parse(LOG).unwrap();
        assert_eq!((s.passed, s.failed, s.ignored), (2, 1, 0));
        assert!(Summary::parse("running 1 test\ntest a ... ").is_none());
        let ok = "test result: ok. 5 passed; 0 failed; 1 ignored; 0 measured; 0 filtered out; \
                  finished in 52.55s";
        let s = Summary::parse(ok).unwrap();
        assert_eq!((s.passed, s.failed, s.ignored), (5, 0, 1));
    }

    #[test]
    fn executables_from_cargo_json() {
        let line = r#"{"reason":"compiler-artifact","package_id":"path+file:///w/tracer#0.1.0","manifest_path":"/w/tracer/Cargo.toml","target":{"kind":["test"],"crate_types":["bin"],"name":"lab","src_path":"/w/tracer/tests/lab.rs"},"executable":"/t/debug/deps/lab-3438d1b9c37edcaf","fresh":true}"#;
        assert_eq!(json_string(line, "name").as_deref(), Some("lab"));
        assert_eq!(
            json_string(line, "executable").as_deref(),
            Some("/t/debug/deps/lab-3438d1b9c37edcaf")
        );
        assert_eq!(json_string(r#"{"executable":null}"#, "executable"), None);
    }
}

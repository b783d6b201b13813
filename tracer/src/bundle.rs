//! `tracer record --bundle PATH` and `tracer report`: the postmortem artefacts.
//!
//! A bundle is one `.tar.gz` with everything a colleague needs later, without the node:
//! the trace, a pcapng and the HTML report made from it, the conntrack statistics per
//! netns and CPU before and after, the conntrack sysctls, the nft and iptables rulesets,
//! the resolv.conf of each pod involved, the kernel and the probe plan (see docs/trace.md).
//! It is built in `PATH.<pid>.partial.d/` and renamed into place whole: a bundle that
//! exists is complete (a killed run leaves the directory, whose trace still replays).

use std::{
    collections::BTreeMap,
    fs::{self, File},
    io::{self, Read as _, Write as _},
    path::{Path, PathBuf},
    process::Command,
    time::{Duration, SystemTime},
};

use anyhow::Context as _;
use serde_json::{json, Value};

use crate::{
    cli::{RecordCmd, ReportCmd},
    ctstats,
    node::scan_netns,
    replay::{self, Run},
    trace::Rotation,
    watch::{self, TraceOptions},
};

/// How long one external command (nft, iptables-save) may take.
const COMMAND_TIMEOUT: Duration = Duration::from_secs(20);

/// `tracer record`.
pub async fn record(cmd: RecordCmd) -> anyhow::Result<()> {
    let bundle = cmd.bundle.clone();
    let mut args = cmd.watch.into_args();
    let Some(bundle) = bundle else {
        anyhow::ensure!(
            args.trace.is_some(),
            "tracer record: say where to: --output FILE (a trace), --bundle PATH (a .tar.gz), \
             or both"
        );
        return watch::run(args).await;
    };
    check_output(&bundle)?;
    let work = partial_dir(&bundle);
    fs::create_dir(&work).with_context(|| format!("creating {}", work.display()))?;
    // The trace goes into the bundle; with --output too, it is written there and copied.
    let trace_path = match &args.trace {
        Some(t) => t.path.clone(),
        None => {
            let p = work.join("trace.jsonl");
            args.trace = Some(TraceOptions {
                path: p.clone(),
                rotation: Rotation {
                    max_bytes: None,
                    keep: 0,
                },
            });
            p
        }
    };
    let root = args.node_root.clone();
    let mut manifest = Manifest::new(&bundle);
    manifest.put_json(&work, "conntrack/before.json", &conntrack_snapshot())?;
    manifest.put_text(&work, "sysctl/before.txt", &sysctls(None))?;
    let started = SystemTime::now();
    let watched = watch::run(args).await;
    let watched_error = watched.as_ref().err().map(|e| format!("{e:#}"));
    if !trace_path.exists() {
        let _ = fs::remove_dir_all(&work);
        return watched.context("nothing was recorded, so no bundle was written");
    }
    eprintln!(
        "bundle: collecting the node's state into {}",
        bundle.display()
    );
    manifest.put_json(&work, "conntrack/after.json", &conntrack_snapshot())?;
    manifest.put_text(&work, "sysctl/after.txt", &sysctls(None))?;
    let segments = trace_segments(&trace_path);
    if trace_path.parent() != Some(work.as_path()) {
        for s in &segments {
            let name = s
                .file_name()
                .expect("a file")
                .to_string_lossy()
                .into_owned();
            fs::copy(s, work.join(&name))
                .with_context(|| format!("copying {} into the bundle", s.display()))?;
            manifest.file(&name, "the trace (JSON lines, docs/trace.md)");
        }
    } else {
        manifest.file("trace.jsonl", "the trace (JSON lines, docs/trace.md)");
    }
    let run = replay::collect(&segments);
    match &run {
        Ok(run) => {
            manifest.put_text(&work, "plan.txt", &(run.header.plan.join("\n") + "\n"))?;
            write_exports(run, &work, &mut manifest)?;
            pods_state(run, &root, &work, &mut manifest)?;
        }
        Err(e) => manifest.missing("trace.pcapng, report.html", format!("replay failed: {e:#}")),
    }
    manifest.put_text(
        &work,
        "rules/nft.txt",
        &command_output("nft", &["list", "ruleset"], None),
    )?;
    for tool in ["iptables-save", "ip6tables-save"] {
        manifest.put_text(
            &work,
            &format!("rules/{tool}.txt"),
            &command_output(tool, &[], None),
        )?;
    }
    manifest.put_text(&work, "kernel.txt", &kernel_facts())?;
    manifest.finish(&work, started, watched_error.as_deref())?;
    pack(&work, &bundle)?;
    fs::remove_dir_all(&work).with_context(|| format!("removing {}", work.display()))?;
    eprintln!("bundle written to {}", bundle.display());
    watched
}

/// A path the bundle or report can be written to (its directory exists, it is no directory).
fn check_output(path: &Path) -> anyhow::Result<()> {
    anyhow::ensure!(!path.is_dir(), "{} is a directory", path.display());
    crate::session::check_writable_parent(path)?;
    // Writable? Try, next to it.
    let probe = partial_dir(path).with_extension("probe");
    File::create(&probe)
        .and_then(|_| fs::remove_file(&probe))
        .with_context(|| format!("can not write next to {}", path.display()))
}

fn partial_dir(bundle: &Path) -> PathBuf {
    let mut p = bundle.as_os_str().to_owned();
    p.push(format!(".{}.partial.d", std::process::id()));
    PathBuf::from(p)
}

/// The segments of a trace that exist, oldest first: FILE.N … FILE.1, FILE.
pub fn trace_segments(path: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    for n in (1..=1000u32).rev() {
        let mut p = path.as_os_str().to_owned();
        p.push(format!(".{n}"));
        let p = PathBuf::from(p);
        if p.exists() {
            out.push(p);
        }
    }
    out.push(path.to_owned());
    out
}

/// What is in the bundle and what could not be collected.
struct Manifest {
    bundle: PathBuf,
    files: BTreeMap<String, String>,
    missing: BTreeMap<String, String>,
}

impl Manifest {
    fn new(bundle: &Path) -> Self {
        Manifest {
            bundle: bundle.to_owned(),
            files: BTreeMap::new(),
            missing: BTreeMap::new(),
        }
    }

    fn file(&mut self, name: &str, what: &str) {
        self.files.insert(name.into(), what.into());
    }

    fn missing(&mut self, name: &str, why: String) {
        self.missing.insert(name.into(), why);
    }

    fn put_text(&mut self, dir: &Path, name: &str, text: &str) -> anyhow::Result<()> {
        let p = dir.join(name);
        if let Some(parent) = p.parent() {
            fs::create_dir_all(parent)?;
        }
        fs::write(&p, text).with_context(|| format!("writing {}", p.display()))?;
        self.file(name, "");
        Ok(())
    }

    fn put_json(&mut self, dir: &Path, name: &str, v: &Value) -> anyhow::Result<()> {
        self.put_text(dir, name, &(serde_json::to_string_pretty(v)? + "\n"))
    }

    fn finish(
        &mut self,
        dir: &Path,
        started: SystemTime,
        error: Option<&str>,
    ) -> anyhow::Result<()> {
        let v = json!({
            "bundle": self.bundle,
            "tracer": env!("CARGO_PKG_VERSION"),
            "command": std::env::args().collect::<Vec<_>>(),
            "recording_started": humantime::format_rfc3339_millis(started).to_string(),
            "bundled": humantime::format_rfc3339_millis(SystemTime::now()).to_string(),
            "recording_error": error,
            "files": self.files,
            "missing": self.missing,
        });
        fs::write(
            dir.join("manifest.json"),
            serde_json::to_string_pretty(&v)? + "\n",
        )?;
        Ok(())
    }
}

/// Conntrack statistics of every network namespace, per CPU, with the table size.
fn conntrack_snapshot() -> Value {
    let mut out = Vec::new();
    for (inum, path) in scan_netns() {
        match ctstats::read_in(&path) {
            Ok(s) => out.push(json!({
                "netns": inum,
                "path": path,
                "count": s.count,
                "max": s.max,
                "totals": s.totals(),
                "per_cpu": s.per_cpu,
            })),
            Err(e) => out.push(json!({ "netns": inum, "path": path, "error": e.to_string() })),
        }
    }
    json!({
        "taken": humantime::format_rfc3339_millis(SystemTime::now()).to_string(),
        "netns": out,
    })
}

/// `sysctl` of conntrack and the port range, in this netns or the one at `netns`.
fn sysctls(netns: Option<&Path>) -> String {
    command_output(
        "sysctl",
        &[
            "-a",
            "-r",
            r"^net\.(netfilter\.|nf_conntrack_max|ipv4\.ip_local_port_range|ipv4\.ip_forward$)",
        ],
        netns,
    )
}

/// A command's stdout, or why there is none (a missing tool is a line in the file, not an
/// error: the bundle is still worth having).
fn command_output(tool: &str, args: &[&str], netns: Option<&Path>) -> String {
    let Some(bin) = crate::netns::find_tool(tool) else {
        return format!("# {tool}: not installed on this node\n");
    };
    let mut cmd = match netns {
        Some(ns) => {
            let mut c = Command::new("nsenter");
            c.arg(format!("--net={}", ns.display())).arg(&bin);
            c
        }
        None => Command::new(&bin),
    };
    cmd.args(args);
    let line = crate::netns::render_command(&cmd);
    match crate::netns::run_command(&mut cmd, None, COMMAND_TIMEOUT) {
        Ok(o) => format!("# {line}\n{}", String::from_utf8_lossy(&o.stdout)),
        Err(e) => format!("# {line}\n# failed: {e}\n"),
    }
}

fn kernel_facts() -> String {
    let read = |p: &str| {
        fs::read_to_string(p)
            .map(|s| s.trim().to_owned())
            .unwrap_or_else(|e| format!("({e})"))
    };
    format!(
        "release: {}\nversion: {}\nbtf: {}\nlockdown: {}\ncmdline: {}\n",
        read("/proc/sys/kernel/osrelease"),
        read("/proc/version"),
        if Path::new(crate::btf::VMLINUX_BTF).exists() {
            "present"
        } else {
            "absent"
        },
        read("/sys/kernel/security/lockdown"),
        read("/proc/cmdline"),
    )
}

/// The pcapng, the HTML report and the Perfetto trace of a replayed run.
fn write_exports(run: &Run, dir: &Path, manifest: &mut Manifest) -> anyhow::Result<()> {
    let f = File::create(dir.join("trace.pcapng"))?;
    let stats = crate::pcapng::write(
        io::BufWriter::new(f),
        &run.events,
        &run.findings,
        &run.lookups,
        &run.clock,
    )?;
    manifest.file(
        "trace.pcapng",
        &format!(
            "{} packets ({} DNS, {} dropped), each commented with its pod and verdict",
            stats.packets, stats.dns, stats.drops
        ),
    );
    let page = page(run, &[]);
    fs::write(dir.join("report.html"), crate::report::html(&page))?;
    manifest.file(
        "report.html",
        "per-pod timelines (open in a browser; fetches nothing)",
    );
    fs::write(
        dir.join("perfetto.json"),
        serde_json::to_vec(&crate::report::perfetto(&page))?,
    )?;
    manifest.file("perfetto.json", "the same, for ui.perfetto.dev");
    Ok(())
}

/// For each pod (or host process) with a lookup: its resolv.conf, and the conntrack
/// sysctls and rulesets of its network namespace.
fn pods_state(run: &Run, root: &Path, dir: &Path, manifest: &mut Manifest) -> anyhow::Result<()> {
    let mut seen = BTreeMap::new();
    for l in &run.lookups {
        let label = l.workload.label();
        if let Some(pid) = l.pid {
            seen.entry(label).or_insert((pid, l.netns));
        }
    }
    let netns_paths = scan_netns();
    for (label, (pid, netns)) in seen {
        let safe: String = label
            .chars()
            .map(|c| {
                if c.is_ascii_alphanumeric() || "-_.".contains(c) {
                    c
                } else {
                    '_'
                }
            })
            .collect();
        let name = format!("pods/{safe}/resolv.conf");
        let p = root.join(format!("proc/{pid}/root/etc/resolv.conf"));
        match fs::read_to_string(&p) {
            Ok(text) => manifest.put_text(dir, &name, &text)?,
            Err(e) => manifest.missing(
                &name,
                format!("{}: {e} (the process is gone?)", p.display()),
            ),
        }
        match netns_paths.get(&netns) {
            Some(ns) => {
                manifest.put_text(dir, &format!("pods/{safe}/sysctl.txt"), &sysctls(Some(ns)))?;
                manifest.put_text(
                    dir,
                    &format!("pods/{safe}/nft.txt"),
                    &command_output("nft", &["list", "ruleset"], Some(ns)),
                )?;
            }
            None => manifest.missing(
                &format!("pods/{safe}/sysctl.txt"),
                format!("network namespace {netns} is gone"),
            ),
        }
    }
    Ok(())
}

/// `dir` as `<bundle stem>/...` in a .tar.gz at `bundle`, written whole then renamed.
fn pack(dir: &Path, bundle: &Path) -> anyhow::Result<()> {
    let stem = bundle
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_else(|| "bundle".into());
    let stem = stem
        .trim_end_matches(".tar.gz")
        .trim_end_matches(".tgz")
        .to_owned();
    let mut tmp = bundle.as_os_str().to_owned();
    tmp.push(".partial");
    let tmp = PathBuf::from(tmp);
    let f = File::create(&tmp).with_context(|| format!("creating {}", tmp.display()))?;
    let gz = flate2::write::GzEncoder::new(f, flate2::Compression::default());
    let mut tar = tar::Builder::new(gz);
    tar.mode(tar::HeaderMode::Deterministic);
    tar.append_dir_all(&stem, dir)
        .with_context(|| format!("packing {}", dir.display()))?;
    let f = tar.into_inner()?.finish()?;
    f.sync_all()?;
    fs::rename(&tmp, bundle).with_context(|| format!("renaming into {}", bundle.display()))?;
    Ok(())
}

/// The trace segments inside a bundle, extracted to `into`; oldest first.
fn unpack_traces(bundle: &Path, into: &Path) -> anyhow::Result<Vec<PathBuf>> {
    let f = File::open(bundle).with_context(|| format!("opening {}", bundle.display()))?;
    let mut tar = tar::Archive::new(flate2::read::GzDecoder::new(f));
    let mut names = Vec::new();
    for entry in tar
        .entries()
        .with_context(|| format!("reading {}", bundle.display()))?
    {
        let mut entry = entry.with_context(|| format!("reading {}", bundle.display()))?;
        let path = entry.path()?.into_owned();
        let Some(name) = path.file_name().map(|n| n.to_string_lossy().into_owned()) else {
            continue;
        };
        if path.components().count() == 2 && name.starts_with("trace.jsonl") {
            let out = into.join(&name);
            let mut data = Vec::new();
            entry.read_to_end(&mut data)?;
            fs::write(&out, data)?;
            names.push(name);
        }
    }
    anyhow::ensure!(
        !names.is_empty(),
        "{}: no trace.jsonl in this bundle",
        bundle.display()
    );
    // trace.jsonl.N (oldest: highest N) first, trace.jsonl last.
    names.sort_by_key(|n| {
        std::cmp::Reverse(
            n.rsplit('.')
                .next()
                .and_then(|x| x.parse::<u32>().ok())
                .unwrap_or(0),
        )
    });
    Ok(names.into_iter().map(|n| into.join(n)).collect())
}

fn is_gzip(path: &Path) -> bool {
    let mut magic = [0u8; 2];
    File::open(path)
        .and_then(|mut f| f.read_exact(&mut magic))
        .is_ok()
        && magic == [0x1f, 0x8b]
}

fn page<'a>(run: &'a Run, inputs: &[PathBuf]) -> crate::report::Page<'a> {
    let h = &run.header;
    let mut facts = vec![
        ("node".to_owned(), h.hostname.clone()),
        ("kernel".to_owned(), h.kernel.clone()),
        ("recording started".to_owned(), h.started.clone()),
        ("tracer".to_owned(), h.tracer.clone()),
        ("run".to_owned(), h.run.clone()),
        (
            "DNS ports".to_owned(),
            h.ports
                .iter()
                .map(u16::to_string)
                .collect::<Vec<_>>()
                .join(", "),
        ),
        (
            "probe plan".to_owned(),
            // The chosen sources: the lines `tracer probes` marks with `*`.
            h.plan
                .iter()
                .filter_map(|l| l.trim_start().strip_prefix("* "))
                .map(|l| l.split_whitespace().collect::<Vec<_>>().join(" "))
                .collect::<Vec<_>>()
                .join("; "),
        ),
        (
            "events".to_owned(),
            format!(
                "{} recorded, {} lost by the ring buffer{}",
                run.outcome.records,
                run.outcome.lost,
                if run.outcome.finished {
                    ""
                } else {
                    " (the recording was cut: no finish line)"
                }
            ),
        ),
        ("lookups".to_owned(), run.lookups.len().to_string()),
    ];
    if !inputs.is_empty() {
        facts.push((
            "trace".to_owned(),
            inputs
                .iter()
                .map(|p| p.display().to_string())
                .collect::<Vec<_>>()
                .join(", "),
        ));
    }
    if run.outcome.errors() > 0 {
        facts.push((
            "trace problems".to_owned(),
            format!("{} damaged line(s) skipped", run.outcome.errors()),
        ));
    }
    crate::report::Page {
        title: format!("DNS and conntrack on {} — {}", h.hostname, h.started),
        facts,
        lookups: &run.lookups,
        findings: &run.findings,
        clock: run.clock,
    }
}

/// `tracer report`.
pub fn report(cmd: &ReportCmd) -> anyhow::Result<()> {
    check_output(&cmd.output)?;
    if let Some(p) = &cmd.perfetto {
        check_output(p)?;
    }
    let tmp;
    let files = if cmd.input.len() == 1 && is_gzip(&cmd.input[0]) {
        tmp = std::env::temp_dir().join(format!("tracer-report-{}", std::process::id()));
        fs::create_dir_all(&tmp)?;
        let r = unpack_traces(&cmd.input[0], &tmp);
        if r.is_err() {
            let _ = fs::remove_dir_all(&tmp);
        }
        Some(r?)
    } else {
        tmp = PathBuf::new();
        None
    };
    let inputs = files.clone().unwrap_or_else(|| cmd.input.clone());
    let run = replay::collect(&inputs);
    if files.is_some() {
        let _ = fs::remove_dir_all(&tmp);
    }
    let run = run?;
    let errors = replay::report_problems(&run.outcome);
    let page = page(&run, &cmd.input);
    write_whole(&cmd.output, crate::report::html(&page).as_bytes())?;
    eprintln!(
        "report written to {} ({} lookups, {} with a problem)",
        cmd.output.display(),
        run.lookups.len(),
        run.lookups.iter().filter(|l| l.problem).count()
    );
    if let Some(p) = &cmd.perfetto {
        write_whole(p, &serde_json::to_vec(&crate::report::perfetto(&page))?)?;
        eprintln!("Perfetto trace written to {}", p.display());
    }
    anyhow::ensure!(
        errors == 0,
        "{errors} problem(s) in the trace (listed above); the report shows everything else"
    );
    Ok(())
}

/// Writes `path` whole: a temporary file next to it, renamed into place.
fn write_whole(path: &Path, data: &[u8]) -> anyhow::Result<()> {
    let mut tmp = path.as_os_str().to_owned();
    tmp.push(".partial");
    let tmp = PathBuf::from(tmp);
    let mut f = File::create(&tmp).with_context(|| format!("creating {}", tmp.display()))?;
    f.write_all(data)
        .and_then(|_| f.sync_all())
        .with_context(|| format!("writing {}", tmp.display()))?;
    fs::rename(&tmp, path).with_context(|| format!("renaming into {}", path.display()))?;
    Ok(())
}

//! Privileged tests of the postmortem artefacts: a trace recorded while a lab provokes real
//! drops replays to exactly what the live run printed; its pcapng opens in tshark with the
//! verdicts in the packet comments; the bundle holds the node's state; the HTML report
//! renders in headless Chromium; a SIGKILL leaves only whole lines.

mod common;

use std::{
    collections::BTreeSet,
    fs,
    path::{Path, PathBuf},
    process::{Command, Output},
    time::{Duration, Instant},
};

use common::*;
use serde_json::Value;

fn tracer(args: &[&str]) -> Output {
    Command::new(TRACER).args(args).output().unwrap()
}

fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

/// Waits (bounded) until the recorder has printed `n` lines containing `needle`.
fn wait_for(run: &TracerRun, needle: &str, n: usize) {
    let deadline = Instant::now() + bound(15);
    while run.stdout().matches(needle).count() < n {
        assert!(
            Instant::now() < deadline,
            "the recorder printed fewer than {n} `{needle}` within {:?}:\n{}\n{}",
            bound(15),
            run.stdout(),
            run.stderr()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// The lines of `text` whose JSON `type` is one of `types`.
fn lines_of<'a>(text: &'a str, types: &[&str]) -> Vec<&'a str> {
    text.lines()
        .filter(|l| {
            let v: Value = serde_json::from_str(l).unwrap();
            types.iter().any(|t| v["type"] == *t)
        })
        .collect()
}

fn values(text: &str) -> Vec<Value> {
    text.lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect()
}

fn p(path: &Path) -> &str {
    path.to_str().unwrap()
}

#[test]
fn a_recorded_lab_run_replays_exports_and_bundles() {
    require_root();
    let mut rec = TracerRun::start_verb(
        "record",
        &[
            "--output",
            "{dir}/trace.jsonl",
            "--bundle",
            "{dir}/incident.tar.gz",
        ],
    );
    let dir = rec.dir().to_owned();
    let report = lab(&[
        "dns-race",
        "--client",
        "glibc",
        "--lose-first-aaaa",
        "--rounds",
        "2",
    ]);
    let dropped = report["lookups"]["list"]
        .as_array()
        .expect("the lab's lookups")
        .iter()
        .filter(|l| l["problem"] == true)
        .count();
    assert_eq!(dropped, 2, "the lab's own lookups: {report:#}");
    wait_for(&rec, r#""verdict":"ruleset-drop""#, 2);
    // A lookup from this (still running) process, to loopback: the bundle collects the
    // resolv.conf of every process with a lookup that still exists at the end.
    let sock = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
    let query = b"\x4b\x1d\x01\x00\x00\x01\x00\x00\x00\x00\x00\x00\x0apostmortem\x07example\x00\x00\x01\x00\x01";
    sock.send_to(query, "127.0.0.1:53").unwrap();
    wait_for(&rec, "postmortem.example", 1);
    // SIGTERM: the recording ends cleanly and the bundle is written before the exit.
    let live = rec.stop_raw(libc::SIGTERM);
    let trace = dir.join("trace.jsonl");

    // What the live run printed: findings of the rule's drops and the two lookups.
    let live_v = values(&live);
    let findings = of_type(&live_v, "finding");
    let rule_drops = findings
        .iter()
        .filter(|f| f["verdict"] == "ruleset-drop")
        .count();
    // The recorder sees the whole node: the lab's own are those of its node netns and pod.
    let node_netns = &report["namespaces"]
        .as_array()
        .unwrap()
        .iter()
        .find(|n| n["role"] == "node")
        .expect("the lab's node")["netns"];
    let lab_drops = findings
        .iter()
        .filter(|f| f["verdict"] == "ruleset-drop" && f["netns"] == *node_netns)
        .count();
    assert_eq!(lab_drops, 2, "one lost AAAA per lookup: {live}");
    let uid = &report["lookups"]["list"][0]["workload"]["uid"];
    assert!(uid.is_string(), "{report:#}");
    let lookups: Vec<&Value> = of_type(&live_v, "lookup")
        .into_iter()
        .filter(|l| l["problem"] == true)
        .collect();
    let lab_lookups = lookups
        .iter()
        .filter(|l| l["workload"]["uid"] == *uid)
        .count();
    assert_eq!(lab_lookups, 2, "the lab pod's two lookups: {live}");

    // Replay: byte for byte what the live run printed (events, findings, lookups, summary).
    let out = tracer(&["replay", "--json", p(&trace)]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert_eq!(text(&out.stdout), live, "replay differs from the live run");
    assert!(
        !text(&out.stderr).contains("warning"),
        "{}",
        text(&out.stderr)
    );
    // The trace's own copies of the findings and lookups are the live ones.
    let recorded = fs::read_to_string(&trace).unwrap();
    // The lab's namespaces were made after the recording started: its polls found them,
    // and the replay above read where their books start from the trace.
    assert!(
        recorded.contains(r#"{"type":"discovered","netns":[{"netns":"#),
        "no namespace discovered in the trace"
    );
    assert_eq!(
        lines_of(&recorded, &["finding", "lookup"]),
        lines_of(&live, &["finding", "lookup"])
    );

    damaged_lines_are_named_and_the_rest_is_read(&dir, &recorded, rule_drops);
    pcapng_opens_in_tshark_with_the_verdicts(&dir, &trace, &live_v);
    bundle_holds_the_node_state(&dir);
    report_renders_in_chromium(&dir, &lookups);
}

/// A copy of the trace with a line cut short, a garbage line, an unknown line type and a
/// record whose data is not base64: each is named, everything else still replays.
fn damaged_lines_are_named_and_the_rest_is_read(dir: &Path, recorded: &str, rule_drops: usize) {
    let mut lines: Vec<String> = recorded.lines().map(str::to_owned).collect();
    // Damage lines after the header and the baselines, away from the drops' records.
    let poll = lines
        .iter()
        .position(|l| l.contains(r#""type":"poll""#))
        .unwrap();
    lines[poll] = lines[poll][..lines[poll].len() / 2].to_owned();
    lines.insert(poll + 1, "this is not json".into());
    lines.insert(poll + 2, r#"{"type":"from_the_future","x":1}"#.into());
    let damaged = dir.join("damaged.jsonl");
    fs::write(&damaged, lines.join("\n") + "\n").unwrap();
    let out = tracer(&["replay", "--json", p(&damaged)]);
    let err = text(&out.stderr);
    assert!(!out.status.success(), "damage is an error status");
    let name = p(&damaged);
    for (n, what) in [
        (poll + 1, "not JSON"),
        (poll + 2, "not JSON"),
        (poll + 3, "unknown line type \"from_the_future\""),
    ] {
        assert!(
            err.contains(&format!("{name}:{n}: {what}")),
            "line {n} ({what}) not named:\n{err}"
        );
    }
    assert!(err.contains("3 problem(s) in the trace"), "{err}");
    let replayed = values(&text(&out.stdout));
    let drops = replayed
        .iter()
        .filter(|v| v["type"] == "finding" && v["verdict"] == "ruleset-drop")
        .count();
    assert_eq!(drops, rule_drops, "the rest of the trace was read");

    // A trace whose header says a schema version this tracer does not know.
    let newer = dir.join("newer.jsonl");
    fs::write(
        &newer,
        recorded.replacen(
            &format!(r#""schema":{},"#, tracer::trace::SCHEMA),
            r#""schema":99,"#,
            1,
        ),
    )
    .unwrap();
    let out = tracer(&["replay", "--json", p(&newer)]);
    let err = text(&out.stderr);
    assert!(!out.status.success());
    assert!(
        err.contains(&format!("{}:1: schema version 99", p(&newer))),
        "{err}"
    );
}

fn pcapng_opens_in_tshark_with_the_verdicts(dir: &Path, trace: &Path, live: &[Value]) {
    let pcap = dir.join("trace.pcapng");
    let out = tracer(&["replay", p(trace), "--pcapng", p(&pcap)]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    let out = Command::new("tshark")
        .args([
            "-r",
            p(&pcap),
            "-T",
            "fields",
            "-e",
            "dns.id",
            "-e",
            "frame.comment",
        ])
        .output()
        .expect("tshark (cargo xtask setup installs it)");
    assert!(out.status.success(), "{}", text(&out.stderr));
    let rows = text(&out.stdout);
    let seen: BTreeSet<String> = rows
        .lines()
        .filter_map(|l| l.split('\t').next())
        .filter(|id| !id.is_empty())
        .map(str::to_owned)
        .collect();
    let sent: BTreeSet<String> = of_type(live, "dns_send")
        .iter()
        .map(|e| format!("0x{:04x}", e["dns"]["id"].as_u64().unwrap()))
        .collect();
    assert!(!sent.is_empty());
    assert!(
        sent.is_subset(&seen),
        "tshark sees the DNS ids the tracer saw: {sent:?} in {seen:?}"
    );
    assert!(
        rows.lines().any(|l| l.contains("DROPPED: ruleset-drop")),
        "a dropped packet's comment carries its verdict:\n{rows}"
    );
    assert!(
        rows.lines().any(|l| l.contains("ruleset-drop, lost")),
        "the lost query's comment carries its fate:\n{rows}"
    );
}

fn bundle_holds_the_node_state(dir: &Path) {
    let bundle = dir.join("incident.tar.gz");
    assert!(bundle.exists(), "SIGTERM leaves a complete bundle");
    let leftover: Vec<PathBuf> = fs::read_dir(dir)
        .unwrap()
        .flatten()
        .map(|e| e.path())
        .filter(|p| p.to_string_lossy().contains(".partial"))
        .collect();
    assert!(leftover.is_empty(), "work files left: {leftover:?}");
    let x = dir.join("x");
    fs::create_dir_all(&x).unwrap();
    let out = Command::new("tar")
        .args(["-xzf", p(&bundle), "-C", p(&x)])
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", text(&out.stderr));
    let root = x.join("incident");
    for f in [
        "manifest.json",
        "trace.jsonl",
        "trace.pcapng",
        "report.html",
        "perfetto.json",
        "plan.txt",
        "kernel.txt",
        "conntrack/before.json",
        "conntrack/after.json",
        "sysctl/before.txt",
        "sysctl/after.txt",
        "rules/nft.txt",
        "rules/iptables-save.txt",
        "rules/ip6tables-save.txt",
    ] {
        assert!(root.join(f).is_file(), "{f} missing from the bundle");
    }
    let manifest: Value =
        serde_json::from_str(&fs::read_to_string(root.join("manifest.json")).unwrap()).unwrap();
    assert!(manifest["recording_error"].is_null(), "{manifest:#}");
    for side in ["before", "after"] {
        let ct: Value = serde_json::from_str(
            &fs::read_to_string(root.join(format!("conntrack/{side}.json"))).unwrap(),
        )
        .unwrap();
        let host = ct["netns"]
            .as_array()
            .unwrap()
            .iter()
            .find(|n| n["per_cpu"].is_array())
            .unwrap_or_else(|| panic!("no readable netns in {side}: {ct:#}"));
        assert!(!host["per_cpu"].as_array().unwrap().is_empty());
    }
    // This test process's lookup: its resolv.conf, read through /proc/PID/root.
    let files = manifest["files"].as_object().unwrap();
    let ours = files
        .keys()
        .find(|k| k.starts_with("pods/host_") && k.ends_with("/resolv.conf"))
        .unwrap_or_else(|| panic!("no resolv.conf of a host process: {manifest:#}"));
    assert_eq!(
        fs::read_to_string(root.join(ours)).unwrap(),
        fs::read_to_string("/etc/resolv.conf").unwrap()
    );
    // The lab's pods are gone by now: said in the manifest, not silently left out.
    assert!(
        manifest["missing"]
            .as_object()
            .unwrap()
            .keys()
            .any(|k| k.starts_with("pods/") && k.ends_with("/resolv.conf")),
        "{manifest:#}"
    );
    let sysctl = fs::read_to_string(root.join("sysctl/after.txt")).unwrap();
    assert!(
        sysctl.contains("net.netfilter.nf_conntrack_max"),
        "{sysctl}"
    );
    let kernel = fs::read_to_string(root.join("kernel.txt")).unwrap();
    let release = fs::read_to_string("/proc/sys/kernel/osrelease").unwrap();
    assert!(kernel.contains(release.trim()), "{kernel}");
    let plan = fs::read_to_string(root.join("plan.txt")).unwrap();
    assert!(plan.contains("dns-send"), "{plan}");
    // The trace in the bundle replays on its own.
    let out = tracer(&["replay", "--json", p(&root.join("trace.jsonl"))]);
    assert!(out.status.success(), "{}", text(&out.stderr));
}

fn report_renders_in_chromium(dir: &Path, lookups: &[&Value]) {
    let html = dir.join("report.html");
    let perfetto = dir.join("perfetto.json");
    let out = tracer(&[
        "report",
        p(&dir.join("incident.tar.gz")),
        "-o",
        p(&html),
        "--perfetto",
        p(&perfetto),
    ]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    let page = fs::read_to_string(&html).unwrap();
    assert!(
        !page.contains("src=\"http") && !page.contains("href=\"http"),
        "the page fetches nothing"
    );
    let shot = chromium::artefacts_dir().join("postmortem-report.png");
    chromium::screenshot(&html, &shot, (1400, 2000), dir);
    let dom = chromium::dump_dom(&html, dir).stdout;
    assert!(dom.contains("ruleset-drop"), "verdicts in the DOM");
    // The probe plan in force: every source `tracer probes` marked as chosen.
    let plan = fs::read_to_string(dir.join("x/incident/plan.txt")).unwrap();
    let chosen: Vec<&str> = plan
        .lines()
        .filter_map(|l| l.trim_start().strip_prefix("* "))
        .map(|l| l.split("  ").next().unwrap().trim())
        .collect();
    assert!(!chosen.is_empty(), "{plan}");
    for source in chosen {
        assert!(dom.contains(source), "chosen source {source:?} in the DOM");
    }
    for l in lookups {
        let w = &l["workload"];
        let who = match (
            w["namespace"].as_str(),
            w["pod"].as_str(),
            w["uid"].as_str(),
        ) {
            (Some(ns), Some(pod), _) => format!("{ns}/{pod}"),
            (_, _, Some(uid)) => uid[..8].to_owned(),
            _ if w["kind"] == "host" => format!("host:{}", w["process"].as_str().unwrap()),
            _ => panic!("a lookup without a pod or process: {l}"),
        };
        assert!(dom.contains(&who), "pod {who} in the DOM");
    }
    let v: Value = serde_json::from_str(&fs::read_to_string(&perfetto).unwrap()).unwrap();
    assert!(
        !v["traceEvents"].as_array().unwrap().is_empty(),
        "Perfetto trace events"
    );
}

#[test]
fn sigkill_mid_recording_leaves_only_whole_lines() {
    require_root();
    let mut rec = TracerRun::start(&["--output", "{dir}/trace.jsonl"]);
    let trace = rec.dir().join("trace.jsonl");
    // The racing client sends as fast as it can: records stream in while the tracer dies.
    let mut lab = Command::new(TRACER)
        .args(["lab", "dns-race", "--rounds", "3000", "--quiet", "--json"])
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let deadline = Instant::now() + bound(30);
    while fs::read_to_string(&trace)
        .map(|t| t.matches(r#""type":"record""#).count())
        .unwrap_or(0)
        < 200
    {
        assert!(
            Instant::now() < deadline,
            "no records within {:?}:\n{}",
            bound(30),
            rec.stderr()
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    rec.kill();
    let status = wait_timeout(&mut lab, bound(120));
    if status.is_none() {
        let _ = lab.kill();
        let _ = lab.wait();
    }
    assert!(
        status.is_some(),
        "the lab did not end within {:?}",
        bound(120)
    );
    // Neither the killed recorder nor the lab left anything.
    assert_no_leftovers(rec.before());

    let data = fs::read(&trace).unwrap();
    let complete = match data.iter().rposition(|&b| b == b'\n') {
        Some(i) => &data[..=i],
        None => panic!("no complete line in the trace"),
    };
    let mut records = 0;
    for (n, l) in complete.split(|&b| b == b'\n').enumerate() {
        if l.is_empty() {
            continue;
        }
        let v: Value = serde_json::from_slice(l).unwrap_or_else(|e| {
            panic!(
                "line {} is complete but does not parse ({e}): {}",
                n + 1,
                text(l)
            )
        });
        if v["type"] == "record" {
            records += 1;
        }
    }
    assert!(records >= 200);
    // It replays: the cut is noted, not an error.
    let out = tracer(&["replay", "--json", p(&trace)]);
    let err = text(&out.stderr);
    assert!(out.status.success(), "{err}");
    assert!(err.contains("no finish line"), "{err}");
    assert!(
        err.contains(&format!("replayed {records} records")),
        "{err}"
    );
}

#[test]
fn rotated_segments_replay_together_and_alone() {
    require_root();
    let mut rec = TracerRun::start_verb(
        "record",
        &[
            "--output",
            "{dir}/t.jsonl",
            "--output-max-size",
            "64K",
            "--output-keep",
            "100",
        ],
    );
    let dir = rec.dir().to_owned();
    let report = lab(&["snat-race", "--dns", "--rounds", "40"]);
    let node = report["namespaces"]
        .as_array()
        .unwrap()
        .iter()
        .find(|n| n["role"] == "node")
        .expect("the lab's node");
    let failed = node["counters"]["insert_failed"]
        .as_u64()
        .expect("the node's insert_failed");
    wait_for(&rec, r#""type":"dns_recv""#, 100);
    std::thread::sleep(Duration::from_millis(1500));
    let live = rec.stop_raw(libc::SIGINT);
    let base = dir.join("t.jsonl");
    let mut segments: Vec<PathBuf> = (1..100)
        .rev()
        .map(|n| dir.join(format!("t.jsonl.{n}")))
        .filter(|p| p.exists())
        .collect();
    segments.push(base.clone());
    assert!(
        segments.len() >= 3,
        "64K segments: {segments:?} (lab insert_failed {failed})"
    );
    for s in &segments {
        assert!(fs::metadata(s).unwrap().len() < 64 * 1024 + 70 * 1024);
    }
    // All segments, oldest first: exactly the live output.
    let mut args = vec!["replay", "--json"];
    args.extend(segments.iter().map(|s| p(s)));
    let out = tracer(&args);
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert_eq!(text(&out.stdout), live, "replay of all segments");
    // Every port clash of the lab's node (none in a run without a race) is in the
    // recording, once.
    let clashes = values(&live)
        .iter()
        .filter(|v| {
            v["type"] == "finding"
                && v["verdict"] == "snat-port-clash"
                && v["netns"] == node["netns"]
        })
        .count() as u64;
    assert_eq!(clashes, failed, "snat-port-clash findings vs insert_failed");
    // The last segment alone: it starts mid-run, which is said, and replays.
    let out = tracer(&["replay", "--json", p(&base)]);
    let err = text(&out.stderr);
    assert!(out.status.success(), "{err}");
    assert!(err.contains("starts mid-run"), "{err}");
}

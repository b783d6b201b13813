//! Offline checks of the deployment files (no root, no network, no cluster):
//! `deploy/*.yaml`, `Dockerfile` and `docs/deploy.md` against each other, against the
//! binary's own flags and against `xtask/src/setup.rs`, so they can not drift apart.

use std::{
    collections::{BTreeMap, BTreeSet},
    fs,
    path::{Path, PathBuf},
};

use serde::Deserialize as _;
use serde_norway::Value;

/// Capabilities the tracer container gets, and the code path that needs each one.
/// Nothing outside this table may be added; every entry must be added and documented.
const CAPABILITIES: &[(&str, &str)] = &[
    (
        "BPF",
        "bpf(2): load programs, create maps, attach (preflight::check_privileges)",
    ),
    (
        "PERFMON",
        "tracing programs read kernel memory; perf_event_open for kprobe/tracepoint links",
    ),
    (
        "NET_ADMIN",
        "cgroup_skb programs; NETLINK_NETFILTER counter dumps (ctstats)",
    ),
    (
        "SYS_ADMIN",
        "setns(CLONE_NEWNET) into pod netns for their conntrack counters (ctstats::read_in)",
    ),
    (
        "SYS_PTRACE",
        "stat/open /proc/PID/ns/net of processes of another uid (explain::scan_netns)",
    ),
    (
        "SYSLOG",
        "/proc/kallsyms with real addresses: drop locations as symbol+off (kallsyms::Symbols)",
    ),
];

/// hostPath mounts of the DaemonSet: (mountPath, hostPath, readOnly, why).
/// Nothing outside this table may be mounted from the host.
const HOST_MOUNTS: &[(&str, &str, bool, &str)] = &[
    (
        "/sys/kernel/btf",
        "/sys/kernel/btf",
        true,
        "btf::VMLINUX_BTF offsets",
    ),
    (
        "/sys/kernel/tracing",
        "/sys/kernel/tracing",
        true,
        "preflight::ensure_tracefs, tracepoint ids",
    ),
    (
        "/host/sys/fs/cgroup",
        "/sys/fs/cgroup",
        true,
        "--cgroup: the node's cgroup v2 root for cgroup_skb",
    ),
    (
        "/run/netns",
        "/run/netns",
        true,
        "explain::scan_netns: named network namespaces",
    ),
    (
        "/host/proc",
        "/proc",
        true,
        "pods::NodePaths under --root /host: mountinfo, /proc/PID/cgroup, ns/net",
    ),
    (
        "/host/var/log/pods",
        "/var/log/pods",
        true,
        "pods::PodIndex: pod namespace/name by UID",
    ),
];

/// Pods allowed `privileged: true`, with the reason (also required in docs/deploy.md).
const PRIVILEGED_OK: &[(&str, &str)] = &[(
    "conntrack-tracer-oneshot",
    "short-lived `doctor` run that setns()es into every pod netns and runs iptables-save/nft/ip",
)];

/// (kind, apiVersion) pairs the manifests may use.
const KINDS: &[(&str, &str)] = &[
    ("Namespace", "v1"),
    ("ServiceAccount", "v1"),
    ("Pod", "v1"),
    ("DaemonSet", "apps/v1"),
];

/// Builder packages that are not in setup.rs, with the reason.
const BUILDER_EXTRA_PACKAGES: &[(&str, &str)] = &[(
    "ca-certificates",
    "cargo fetches crates over https in a bare debian:bookworm",
)];

/// Runtime packages allowed in the final image: what `tracer doctor` execs.
const RUNTIME_PACKAGES: &[(&str, &str)] = &[
    (
        "iptables",
        "doctor: iptables-save / ip6tables-save (nft and legacy variants)",
    ),
    ("nftables", "doctor: nft -j list ruleset"),
    ("iproute2", "doctor: ip -j -d addr show"),
];

const TRACER_BIN: &str = "/usr/local/bin/tracer";

fn workspace() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("tracer/ has a parent")
        .to_path_buf()
}

fn read(rel: &str) -> String {
    let p = workspace().join(rel);
    fs::read_to_string(&p).unwrap_or_else(|e| panic!("reading {}: {e}", p.display()))
}

/// Every document of every YAML file in deploy/, with the file it came from.
fn documents() -> Vec<(String, Value)> {
    let dir = workspace().join("deploy");
    let mut files: Vec<PathBuf> = fs::read_dir(&dir)
        .unwrap_or_else(|e| panic!("reading {}: {e}", dir.display()))
        .map(|e| e.unwrap().path())
        .filter(|p| matches!(p.extension().and_then(|e| e.to_str()), Some("yaml" | "yml")))
        .collect();
    files.sort();
    assert!(!files.is_empty(), "no YAML in {}", dir.display());
    let mut out = Vec::new();
    for f in files {
        let text = fs::read_to_string(&f).unwrap();
        let name = f.file_name().unwrap().to_string_lossy().into_owned();
        for de in serde_norway::Deserializer::from_str(&text) {
            let v = Value::deserialize(de).unwrap_or_else(|e| panic!("{name}: {e}"));
            if !v.is_null() {
                out.push((name.clone(), v));
            }
        }
    }
    out
}

fn s<'a>(v: &'a Value, key: &str) -> Option<&'a str> {
    v.get(key).and_then(Value::as_str)
}

fn seq<'a>(v: &'a Value, key: &str) -> &'a [Value] {
    v.get(key)
        .and_then(Value::as_sequence)
        .map(Vec::as_slice)
        .unwrap_or(&[])
}

fn strings(v: &[Value]) -> Vec<String> {
    v.iter()
        .map(|x| x.as_str().expect("a string").to_string())
        .collect()
}

fn find<'a>(docs: &'a [(String, Value)], kind: &str, name: &str) -> &'a Value {
    docs.iter()
        .map(|(_, d)| d)
        .find(|d| s(d, "kind") == Some(kind) && d["metadata"]["name"].as_str() == Some(name))
        .unwrap_or_else(|| panic!("no {kind} {name} in deploy/"))
}

fn daemonset_pod_spec(docs: &[(String, Value)]) -> &Value {
    &find(docs, "DaemonSet", "conntrack-tracer")["spec"]["template"]["spec"]
}

fn container<'a>(pod_spec: &'a Value, name: &str) -> &'a Value {
    seq(pod_spec, "containers")
        .iter()
        .find(|c| s(c, "name") == Some(name))
        .unwrap_or_else(|| panic!("no container {name}"))
}

/// The value following `flag` in `args`.
fn flag_value<'a>(args: &'a [String], flag: &str) -> Option<&'a str> {
    args.iter()
        .position(|a| a == flag)
        .and_then(|i| args.get(i + 1))
        .map(String::as_str)
}

#[test]
fn every_document_has_a_known_kind_and_api_version() {
    let docs = documents();
    let known: BTreeMap<&str, &str> = KINDS.iter().copied().collect();
    for (file, d) in &docs {
        let kind = s(d, "kind").unwrap_or_else(|| panic!("{file}: a document without kind"));
        let api = s(d, "apiVersion").unwrap_or_else(|| panic!("{file}: {kind} without apiVersion"));
        assert_eq!(
            known.get(kind),
            Some(&api),
            "{file}: {kind} {api} unexpected"
        );
        let name = d["metadata"]["name"].as_str();
        assert!(
            name.is_some_and(|n| !n.is_empty()),
            "{file}: {kind} without a name"
        );
        if kind != "Namespace" {
            assert!(
                d["metadata"]["namespace"].as_str().is_some(),
                "{file}: {kind} {name:?} without namespace"
            );
        }
    }
    // Every namespace used is created by a manifest here.
    let namespaces: BTreeSet<&str> = docs
        .iter()
        .filter(|(_, d)| s(d, "kind") == Some("Namespace"))
        .filter_map(|(_, d)| d["metadata"]["name"].as_str())
        .collect();
    for (file, d) in &docs {
        if let Some(ns) = d["metadata"]["namespace"].as_str() {
            assert!(
                namespaces.contains(ns) || ns == "kube-system",
                "{file}: namespace {ns} is not created in deploy/"
            );
        }
    }
}

#[test]
fn daemonset_runs_watch_on_every_node() {
    let docs = documents();
    let ds = find(&docs, "DaemonSet", "conntrack-tracer");
    let spec = daemonset_pod_spec(&docs);
    // The selector matches the template.
    let sel = &ds["spec"]["selector"]["matchLabels"];
    let labels = &ds["spec"]["template"]["metadata"]["labels"];
    for (k, v) in sel.as_mapping().expect("matchLabels") {
        assert_eq!(
            labels.get(k),
            Some(v),
            "selector label {k:?} not on the template"
        );
    }
    assert_eq!(
        spec["hostPID"].as_bool(),
        Some(true),
        "hostPID: /proc must list the node's processes"
    );
    assert_eq!(
        spec["hostNetwork"].as_bool(),
        Some(true),
        "hostNetwork: the node's conntrack table"
    );
    assert!(spec["terminationGracePeriodSeconds"]
        .as_u64()
        .is_some_and(|t| t >= 5));
    assert!(
        seq(spec, "tolerations")
            .iter()
            .any(|t| s(t, "operator") == Some("Exists") && t.get("key").is_none()),
        "tolerate every taint: one tracer per node"
    );
    let c = container(spec, "tracer");
    let args = strings(seq(c, "args"));
    assert_eq!(
        args.first().map(String::as_str),
        Some("watch"),
        "args: {args:?}"
    );
    assert!(args.iter().any(|a| a == "--json"), "args: {args:?}");
    // Pods are named from the node's /proc, cgroups and /var/log/pods under --root.
    let root = flag_value(&args, "--root").expect("watch --root");
    for sub in ["proc", "sys/fs/cgroup", "var/log/pods"] {
        let want = format!("{}/{sub}", root.trim_end_matches('/'));
        assert!(
            seq(c, "volumeMounts")
                .iter()
                .any(|m| s(m, "mountPath") == Some(want.as_str())),
            "watch --root {root} but nothing is mounted at {want}"
        );
    }
    assert!(
        c.get("command").is_none(),
        "the image's ENTRYPOINT is the tracer; use args"
    );
    for key in ["requests", "limits"] {
        for r in ["cpu", "memory"] {
            assert!(
                c["resources"][key][r].as_str().is_some(),
                "resources.{key}.{r} missing"
            );
        }
    }
}

#[test]
fn daemonset_capabilities_are_exactly_the_table() {
    let docs = documents();
    let c = container(daemonset_pod_spec(&docs), "tracer");
    let sc = &c["securityContext"];
    assert_ne!(
        sc["privileged"].as_bool(),
        Some(true),
        "the DaemonSet must not be privileged"
    );
    assert_eq!(sc["allowPrivilegeEscalation"].as_bool(), Some(false));
    assert_eq!(sc["readOnlyRootFilesystem"].as_bool(), Some(true));
    assert_ne!(s(&sc["seccompProfile"], "type"), Some("Unconfined"));
    let drop = strings(seq(&sc["capabilities"], "drop"));
    assert_eq!(drop, ["ALL"], "drop everything, add back the table");
    let add: BTreeSet<String> = strings(seq(&sc["capabilities"], "add"))
        .into_iter()
        .collect();
    let want: BTreeSet<String> = CAPABILITIES.iter().map(|(c, _)| c.to_string()).collect();
    let missing: Vec<_> = want.difference(&add).collect();
    let extra: Vec<_> = add.difference(&want).collect();
    assert!(missing.is_empty(), "capabilities missing: {missing:?}");
    assert!(
        extra.is_empty(),
        "capabilities without a reason in the table: {extra:?}"
    );
    // No CAP_ prefix: Kubernetes wants the bare names.
    assert!(add.iter().all(|c| !c.starts_with("CAP_")));
}

#[test]
fn daemonset_host_mounts_are_exactly_the_table() {
    let docs = documents();
    let spec = daemonset_pod_spec(&docs);
    let c = container(spec, "tracer");
    let volumes: BTreeMap<&str, &Value> = seq(spec, "volumes")
        .iter()
        .map(|v| (s(v, "name").expect("volume name"), v))
        .collect();
    // mountPath -> (hostPath, readOnly)
    let mut host: BTreeMap<String, (String, bool)> = BTreeMap::new();
    for m in seq(c, "volumeMounts") {
        let name = s(m, "name").expect("mount name");
        let v = volumes
            .get(name)
            .unwrap_or_else(|| panic!("volumeMount {name}: no such volume"));
        if let Some(hp) = v.get("hostPath") {
            let mp = s(m, "mountPath").expect("mountPath").to_string();
            let ro = m["readOnly"].as_bool().unwrap_or(false);
            host.insert(mp, (s(hp, "path").expect("hostPath.path").to_string(), ro));
        }
    }
    for (mp, hp, ro, why) in HOST_MOUNTS {
        let got = host
            .get(*mp)
            .unwrap_or_else(|| panic!("no hostPath mount at {mp} ({why})"));
        assert_eq!(got.0, *hp, "{mp}: wrong hostPath");
        assert_eq!(got.1, *ro, "{mp}: readOnly should be {ro}");
    }
    let table: BTreeSet<&str> = HOST_MOUNTS.iter().map(|m| m.0).collect();
    for (mp, (hp, _)) in &host {
        assert!(
            table.contains(mp.as_str()),
            "hostPath {hp} at {mp} has no reason in the table"
        );
    }
    // --cgroup points into the mounted node cgroup hierarchy.
    let args = strings(seq(c, "args"));
    let cg = flag_value(&args, "--cgroup")
        .expect("--cgroup: the container's own /sys/fs/cgroup is its cgroup namespace");
    assert!(
        host.get(cg).is_some_and(|(hp, _)| hp == "/sys/fs/cgroup"),
        "--cgroup {cg} is not the node's cgroup mount"
    );
    // --btf, if given, is under a mount.
    if let Some(btf) = flag_value(&args, "--btf") {
        assert!(
            host.keys().any(|mp| btf.starts_with(mp.as_str())),
            "--btf {btf} not mounted"
        );
    }
}

#[test]
fn readiness_probe_matches_ready_file() {
    let docs = documents();
    let spec = daemonset_pod_spec(&docs);
    let c = container(spec, "tracer");
    let args = strings(seq(c, "args"));
    let ready = flag_value(&args, "--ready-file").expect("--ready-file in args");
    let cmd = strings(seq(&c["readinessProbe"]["exec"], "command"));
    assert_eq!(
        cmd,
        ["test", "-f", ready],
        "readiness probe must test the --ready-file path"
    );
    // The root filesystem is read-only: the ready file's directory must be a writable emptyDir.
    let dir = Path::new(ready)
        .parent()
        .expect("ready file has a directory");
    let m = seq(c, "volumeMounts")
        .iter()
        .find(|m| s(m, "mountPath").map(Path::new) == Some(dir))
        .unwrap_or_else(|| panic!("no volume mounted at {}", dir.display()));
    assert_ne!(m["readOnly"].as_bool(), Some(true));
    let vol = seq(spec, "volumes")
        .iter()
        .find(|v| s(v, "name") == s(m, "name"))
        .expect("volume");
    assert!(
        vol.get("emptyDir").is_some(),
        "{} must be an emptyDir",
        dir.display()
    );
}

#[test]
fn privileged_only_where_justified() {
    let docs = documents();
    let doc = read("docs/deploy.md");
    let ok: BTreeMap<&str, &str> = PRIVILEGED_OK.iter().copied().collect();
    for (file, d) in &docs {
        let (name, spec) = match s(d, "kind") {
            Some("Pod") => (d["metadata"]["name"].as_str().unwrap(), &d["spec"]),
            Some("DaemonSet") => (
                d["metadata"]["name"].as_str().unwrap(),
                &d["spec"]["template"]["spec"],
            ),
            _ => continue,
        };
        for c in seq(spec, "containers") {
            if c["securityContext"]["privileged"].as_bool() == Some(true) {
                assert!(
                    ok.contains_key(name),
                    "{file}: {name} is privileged without a reason in PRIVILEGED_OK"
                );
                assert!(
                    doc.contains(name),
                    "docs/deploy.md does not explain why {name} is privileged"
                );
            }
            let args = strings(seq(c, "args"));
            let verb = args.first().map(String::as_str);
            assert!(
                matches!(verb, Some("watch" | "doctor" | "probes" | "offsets")),
                "{file}: {name}: unknown verb {verb:?}"
            );
            if verb == Some("doctor") {
                // doctor --root R needs the node's / at R.
                let root = flag_value(&args, "--root").unwrap_or("/");
                let host_root = seq(c, "volumeMounts").iter().any(|m| {
                    s(m, "mountPath") == Some(root)
                        && seq(spec, "volumes").iter().any(|v| {
                            s(v, "name") == s(m, "name")
                                && v["hostPath"]["path"].as_str() == Some("/")
                        })
                });
                assert!(
                    root == "/" || host_root,
                    "{file}: doctor --root {root} but / is not mounted there"
                );
            }
        }
    }
}

#[test]
fn docs_explain_every_capability_and_mount() {
    let doc = read("docs/deploy.md");
    for (cap, why) in CAPABILITIES {
        assert!(
            doc.contains(&format!("CAP_{cap}")),
            "docs/deploy.md: CAP_{cap} ({why}) not explained"
        );
    }
    for (mp, hp, _, why) in HOST_MOUNTS {
        assert!(
            doc.contains(mp) && doc.contains(hp),
            "docs/deploy.md: mount {hp} -> {mp} ({why}) not explained"
        );
    }
    for key in [
        "hostPID",
        "hostNetwork",
        "readOnlyRootFilesystem",
        "kubectl debug node/",
    ] {
        assert!(doc.contains(key), "docs/deploy.md does not cover {key}");
    }
}

// ---- Dockerfile ----

/// Dockerfile stages: (FROM line, instructions with continuation lines joined).
fn dockerfile_stages() -> Vec<(String, Vec<String>)> {
    let text = read("Dockerfile");
    let mut joined = Vec::new();
    let mut cur = String::new();
    for line in text.lines() {
        let t = line.trim();
        if cur.is_empty() && (t.is_empty() || t.starts_with('#')) {
            continue;
        }
        if t.starts_with('#') {
            continue; // a comment inside a continued instruction
        }
        match t.strip_suffix('\\') {
            Some(head) => {
                cur.push_str(head);
                cur.push(' ');
            }
            None => {
                cur.push_str(t);
                joined.push(std::mem::take(&mut cur));
            }
        }
    }
    assert!(cur.is_empty(), "Dockerfile ends inside a continued line");
    let mut stages: Vec<(String, Vec<String>)> = Vec::new();
    for ins in joined {
        if ins.to_ascii_uppercase().starts_with("FROM ") {
            stages.push((ins, Vec::new()));
        } else if let Some(st) = stages.last_mut() {
            st.1.push(ins);
        } else {
            assert!(
                ins.to_ascii_uppercase().starts_with("ARG "),
                "before FROM: {ins}"
            );
        }
    }
    stages
}

/// Packages of every `apt-get install` in the instructions; `${LLVM_MAJOR}` -> `{}`.
fn apt_packages(instructions: &[String]) -> BTreeSet<String> {
    let mut out = BTreeSet::new();
    for ins in instructions.iter().filter(|i| i.starts_with("RUN ")) {
        for cmd in ins.split("&&").flat_map(|c| c.split(';')) {
            let words: Vec<&str> = cmd.split_whitespace().collect();
            let Some(i) = words.windows(2).position(|w| w == ["apt-get", "install"]) else {
                continue;
            };
            for w in &words[i + 2..] {
                if !w.starts_with('-') {
                    out.insert(
                        w.replace("${LLVM_MAJOR}", "{}")
                            .replace("$LLVM_MAJOR", "{}"),
                    );
                }
            }
        }
    }
    out
}

/// The string literals of `const NAME: &[&str] = &[...];` in a Rust source.
fn const_str_list(src: &str, name: &str) -> Vec<String> {
    let start = src
        .find(&format!("const {name}: &[&str] = &["))
        .unwrap_or_else(|| panic!("no const {name} in setup.rs"));
    let body = &src[start..];
    let body = &body[body.find("= &[").unwrap() + 4..body.find("];").unwrap()];
    body.split('"')
        .skip(1)
        .step_by(2)
        .map(str::to_string)
        .collect()
}

fn const_str(src: &str, name: &str) -> String {
    let start = src
        .find(&format!("const {name}: &str = \""))
        .unwrap_or_else(|| panic!("no const {name}"));
    src[start..].split('"').nth(1).unwrap().to_string()
}

#[test]
fn dockerfile_final_stage_is_slim_with_tracer_entrypoint() {
    let stages = dockerfile_stages();
    assert!(stages.len() >= 2, "multi-stage Dockerfile expected");
    let (from, ins) = stages.last().unwrap();
    let image = from.split_whitespace().nth(1).unwrap();
    assert_eq!(image, "debian:bookworm-slim", "final stage: {from}");
    let entry: Vec<&String> = ins
        .iter()
        .filter(|i| i.starts_with("ENTRYPOINT "))
        .collect();
    assert_eq!(entry.len(), 1, "one ENTRYPOINT in the final stage");
    let json: Vec<String> = serde_json::from_str(entry[0]["ENTRYPOINT ".len()..].trim())
        .expect("ENTRYPOINT in exec (JSON) form");
    assert_eq!(json, [TRACER_BIN]);
    assert!(
        ins.iter()
            .any(|i| i.starts_with("COPY --from=") && i.trim_end().ends_with(TRACER_BIN)),
        "the final stage copies the binary to {TRACER_BIN}"
    );
    let allowed: BTreeSet<&str> = RUNTIME_PACKAGES.iter().map(|p| p.0).collect();
    for p in apt_packages(ins) {
        assert!(
            allowed.contains(p.as_str()),
            "runtime package {p} has no reason in RUNTIME_PACKAGES"
        );
    }
    if let Some(cmd) = ins.iter().find(|i| i.starts_with("CMD ")) {
        let cmd: Vec<String> = serde_json::from_str(cmd[4..].trim()).expect("CMD in JSON form");
        assert_eq!(cmd.first().map(String::as_str), Some("watch"));
    }
}

#[test]
fn dockerfile_builder_installs_what_setup_installs() {
    let setup = read("xtask/src/setup.rs");
    let mut want: BTreeSet<String> = BTreeSet::new();
    for list in ["TOOLCHAIN_PACKAGES", "LLVM_PACKAGES"] {
        let pkgs = const_str_list(&setup, list);
        assert!(!pkgs.is_empty(), "{list} is empty?");
        want.extend(pkgs);
    }
    let stages = dockerfile_stages();
    let (from, ins) = &stages[0];
    let image = from.split_whitespace().nth(1).unwrap();
    assert_eq!(image, "debian:bookworm", "builder: {from}");
    let mut got = apt_packages(ins);
    for (extra, _) in BUILDER_EXTRA_PACKAGES {
        assert!(
            got.remove(*extra),
            "BUILDER_EXTRA_PACKAGES lists {extra}, which the builder does not install"
        );
    }
    assert_eq!(
        got, want,
        "Dockerfile builder packages vs xtask/src/setup.rs"
    );

    // bpf-linker: same version, same LLVM features and prefix as setup.rs.
    let version = const_str(&setup, "BPF_LINKER_VERSION");
    let install = ins
        .iter()
        .find(|i| i.contains("cargo install bpf-linker@"))
        .expect("the builder installs bpf-linker with cargo install");
    assert!(
        install.contains(&format!("bpf-linker@{version} ")),
        "bpf-linker version != {version}: {install}"
    );
    for needle in [
        "--locked",
        "--no-default-features",
        "llvm-${LLVM_MAJOR}",
        "LLVM_PREFIX=\"/usr/lib/llvm-${LLVM_MAJOR}\"",
    ] {
        assert!(
            install.contains(needle),
            "bpf-linker install lacks {needle}: {install}"
        );
    }
    // The LLVM major comes from Debian's rustc, as setup.rs's llvm_major() does.
    assert!(setup.contains("LLVM version:"));
    assert!(ins
        .iter()
        .any(|i| i.contains("/usr/bin/rustc -vV") && i.contains("LLVM version:")));
    // build.rs insists on `rustup` on PATH; the builder provides the `rustup run` stand-in.
    let build_rs = read("tracer/build.rs");
    if build_rs.contains("find_in_path(\"rustup\")") {
        assert!(
            ins.iter().any(|i| i.contains("/usr/local/bin/rustup")),
            "no rustup stand-in in the builder"
        );
    }
    assert!(ins
        .iter()
        .any(|i| i.contains("cargo build --release") && i.contains("-p tracer")));
}

#[test]
fn dockerignore_keeps_build_outputs_out() {
    let ignore = read(".dockerignore");
    for p in ["target/", ".tools/", ".git/"] {
        assert!(
            ignore.lines().any(|l| l.trim() == p),
            ".dockerignore lacks {p}"
        );
    }
}

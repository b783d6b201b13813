//! Tests of `tracer::doctor`: the pure checks on fixture trees and captured rule dumps
//! (tests/fixtures/doctor/), and live checks in network namespaces made with the harness
//! (MASQUERADE in nft, iptables-nft and iptables-legacy, be_liberal, NOTRACK, a real pod
//! process with its own resolv.conf). The live tests need root; they fail, never skip.

mod common;

use std::{
    fs,
    path::{Path, PathBuf},
    process::Command,
    time::Duration,
};

use tracer::{
    doctor::{
        self, bypass, capacity, ids, kernel, liberal, masquerade, pods, rules, DoctorOptions,
        Finding, NetSnapshot, Node, PodSelection, Report, RuleDump, Severity,
    },
    netns::{self, Netns},
};

const PREFIX: &str = "ctdoc";

fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/doctor")
}

fn fixture(rel: &str) -> String {
    fs::read_to_string(fixtures().join(rel)).unwrap_or_else(|e| panic!("fixture {rel}: {e}"))
}

fn dump(tool: &str, file: &str) -> RuleDump {
    RuleDump {
        tool: tool.to_string(),
        text: fixture(&format!("rules/{file}")),
    }
}

fn require_root() {
    assert!(
        netns::is_root(),
        "the doctor's live tests build network namespaces and load rules into them: run them \
         as root"
    );
}

fn evidence_has(f: &Finding, needle: &str) -> bool {
    f.evidence.iter().any(|e| e.contains(needle))
}

// --- kernel ------------------------------------------------------------------------------

#[test]
fn kernel_versions_against_the_clash_fixes() {
    let ubuntu = "Linux version 4.15.0-56-generic (buildd@lcy01) #62-Ubuntu SMP";
    let cases: &[(&str, Option<&str>, Severity)] = &[
        ("6.18.44-fc-v595", None, Severity::Ok),
        ("5.6.0", None, Severity::Ok),
        ("5.10.0-28-amd64", None, Severity::Ok),
        ("5.5.19", None, Severity::Warn),
        ("5.4.0-150-generic", Some("#167-Ubuntu SMP"), Severity::Warn),
        ("5.0.0", None, Severity::Warn),
        ("4.20.17", None, Severity::Critical),
        ("4.19.29", None, Severity::Warn),
        ("4.19.28", None, Severity::Critical),
        ("4.19.0", None, Severity::Critical),
        ("4.14.173", None, Severity::Warn),
        // B (4.14.106) without A (4.14.173) does not help.
        ("4.14.106", None, Severity::Critical),
        ("4.14.105", None, Severity::Critical),
        ("4.9.163", None, Severity::Warn),
        ("4.9.162", None, Severity::Critical),
        ("4.15.0-56-generic", Some(ubuntu), Severity::Warn),
        ("4.15.0-1030-azure", Some("#31-Ubuntu SMP"), Severity::Warn),
        (
            "4.15.0-55-generic",
            Some("#60-Ubuntu SMP"),
            Severity::Critical,
        ),
        // The same string without Ubuntu's proc/version is a mainline 4.15: unfixed.
        ("4.15.0-56-generic", None, Severity::Critical),
        ("4.18.0-513.5.1.el8_9.x86_64", None, Severity::Warn),
        ("5.14.0-362.8.1.el9_3.x86_64", None, Severity::Ok),
        ("3.10.0", None, Severity::Critical),
        ("not-a-version", None, Severity::Info),
    ];
    for (rel, ver, want) in cases {
        let f = kernel::check(rel, *ver);
        assert_eq!(f.id, ids::KERNEL);
        assert_eq!(f.severity, *want, "{rel} {ver:?}: {f:#?}");
        if f.severity != Severity::Info {
            assert!(evidence_has(&f, "on every kernel"), "{rel}: {f:#?}");
        }
    }
    let k = kernel::parse_release("4.15.0-56-generic", Some(ubuntu)).unwrap();
    assert_eq!(
        (k.major, k.minor, k.patch, k.ubuntu_abi),
        (4, 15, 0, Some(56))
    );
    let a = kernel::assess(&kernel::parse_release("5.4.0", None).unwrap());
    assert_eq!(
        (a.matching, a.same_origin, a.different_backends),
        (
            kernel::Fix::Present,
            kernel::Fix::Present,
            kernel::Fix::Missing
        )
    );
    let f = kernel::check("5.5.0", None);
    assert!(evidence_has(&f, "6a757c07e51f"), "{f:#?}");
    assert!(f.fix.is_some());
    let rhel = kernel::parse_release("4.18.0-513.5.1.el8_9.x86_64", None).unwrap();
    assert_eq!(rhel.vendor.as_deref(), Some("el8"));
}

#[test]
fn kernel_fixture_trees() {
    for (dir, want, needle) in [
        ("ubuntu-4.15.0-55", Severity::Critical, "Ubuntu ABI 55"),
        ("ubuntu-4.15.0-56", Severity::Warn, "Ubuntu ABI 56"),
        ("debian-6.1", Severity::Ok, "6.1.0-18-amd64"),
        ("rhel-8", Severity::Warn, "vendor el8"),
    ] {
        let f = kernel::check_node(&Node::new(fixtures().join("kernel").join(dir)));
        assert_eq!(f.severity, want, "{dir}: {f:#?}");
        assert!(evidence_has(&f, needle), "{dir}: {f:#?}");
    }
    let f = kernel::check_node(&Node::new(fixtures().join("pods")));
    assert_eq!((f.id.as_str(), f.severity), (ids::KERNEL, Severity::Info));
}

// --- MASQUERADE ----------------------------------------------------------------------------

#[test]
fn iptables_save_words_and_ports() {
    assert_eq!(
        rules::split_words(r#"-A X -m comment --comment "a \"b\" c" -j MASQUERADE"#),
        [
            "-A",
            "X",
            "-m",
            "comment",
            "--comment",
            r#"a "b" c"#,
            "-j",
            "MASQUERADE"
        ]
    );
    assert!(rules::port_list_contains("53", 53));
    assert!(rules::port_list_contains("80,53", 53));
    assert!(rules::port_list_contains("1:1024", 53));
    assert!(!rules::port_list_contains("5353", 53));
}

#[test]
fn masquerade_rules_in_captured_dumps() {
    // iptables-nft: one kube-proxy rule with --random-fully, one without (IPv4), one IPv6.
    let r =
        rules::parse_iptables_save("iptables-nft-save", &fixture("rules/iptables-nft-save.txt"));
    let m = masquerade::from_iptables(&r);
    assert_eq!(m.len(), 2, "{m:#?}");
    assert_eq!(
        m.iter().map(|x| x.fully_random).collect::<Vec<_>>(),
        [false, true]
    );
    assert!(m[1]
        .rule
        .contains("kubernetes service traffic requiring SNAT"));
    let m6 = masquerade::from_iptables(&rules::parse_iptables_save(
        "ip6tables-nft-save",
        &fixture("rules/ip6tables-nft-save.txt"),
    ));
    assert_eq!(m6.len(), 1);
    assert!(!m6[0].fully_random);
    // iptables-legacy.
    let ml = masquerade::from_iptables(&rules::parse_iptables_save(
        "iptables-legacy-save",
        &fixture("rules/iptables-legacy-save.txt"),
    ));
    assert_eq!(
        ml.iter()
            .map(|x| (x.rule.as_str(), x.fully_random))
            .collect::<Vec<_>>(),
        [
            ("-A POSTROUTING -o eth0 -j MASQUERADE", false),
            ("-A POSTROUTING -o eth1 -j MASQUERADE --random-fully", true)
        ]
    );
    // Native nft: masquerade, fully-random, fully-random,persistent with a port range, random.
    let nft = rules::parse_nft_json(&fixture("rules/nft-native.json")).unwrap();
    let mn = masquerade::from_nft(&nft, &Default::default());
    assert_eq!(
        mn.iter().map(|x| x.fully_random).collect::<Vec<_>>(),
        [false, true, true, false],
        "{mn:#?}"
    );
    assert!(
        mn[0].rule.contains("meta oifname srv masquerade"),
        "{mn:#?}"
    );
    assert!(mn[3].rule.ends_with("masquerade random"), "{mn:#?}");
    // iptables-nft rules seen through nft JSON are xt targets without options: skipped when
    // the iptables-nft dump covers the table, reported as unknown otherwise.
    let xt = rules::parse_nft_json(&fixture("rules/nft-iptables-nft.json")).unwrap();
    let covered = rules::xtables_chains(&[
        dump("iptables-nft-save", "iptables-nft-save.txt"),
        dump("ip6tables-nft-save", "ip6tables-nft-save.txt"),
    ]);
    assert!(
        covered.contains(&("ip".into(), "nat".into(), "KUBE-POSTROUTING".into())),
        "{covered:?}"
    );
    assert!(masquerade::from_nft(&xt, &covered).is_empty());
    let unknown = masquerade::from_nft(&xt, &Default::default());
    assert!(
        !unknown.is_empty() && unknown.iter().all(|x| !x.flags_known),
        "{unknown:#?}"
    );
    // A native nft chain inside iptables-nft's `ip nat` table: iptables-nft-save can not show
    // it ("incompatible base-chains"), so it is read from the JSON; the iptables-nft rule is
    // read from the dump only.
    let mixed = NetSnapshot {
        iptables: vec![dump("iptables-nft-save", "mixed-iptables-nft-save.txt")],
        nft_json: Some(fixture("rules/mixed-nft.json")),
        ..Default::default()
    };
    let (m, problems) = masquerade::collect(&mixed);
    assert!(problems.is_empty());
    assert_eq!(
        m.iter()
            .map(|x| (x.location.as_str(), x.fully_random))
            .collect::<Vec<_>>(),
        [
            ("iptables-nft-save nat/POSTROUTING", true),
            ("nft ip nat/post handle 2", false)
        ],
        "{m:#?}"
    );
}

#[test]
fn masquerade_finding_from_snapshots() {
    let snap = NetSnapshot {
        iptables: vec![
            dump("iptables-nft-save", "iptables-nft-save.txt"),
            dump("ip6tables-nft-save", "ip6tables-nft-save.txt"),
            dump("iptables-legacy-save", "iptables-legacy-save.txt"),
        ],
        nft_json: Some(fixture("rules/nft-iptables-nft.json")),
        ..Default::default()
    };
    let f = masquerade::check(&snap);
    assert_eq!(
        (f.id.as_str(), f.severity),
        (ids::MASQUERADE, Severity::Warn)
    );
    // Two without the flag in iptables-nft (v4 + v6), one in legacy; none twice.
    assert!(f.title.starts_with("3 of 5 "), "{f:#?}");
    assert_eq!(
        f.evidence
            .iter()
            .filter(|e| !e.starts_with("ok:") && e.contains("MASQUERADE"))
            .count(),
        3,
        "{f:#?}"
    );
    assert!(f.fix.as_deref().unwrap().contains("--random-fully"));

    let nft = NetSnapshot {
        nft_json: Some(fixture("rules/nft-native.json")),
        ..Default::default()
    };
    assert_eq!(masquerade::check(&nft).severity, Severity::Warn);

    let all_random = NetSnapshot {
        iptables: vec![RuleDump {
            tool: "iptables-nft-save".into(),
            text: "*nat\n-A POSTROUTING -j MASQUERADE --random-fully\nCOMMIT\n".into(),
        }],
        ..Default::default()
    };
    let f = masquerade::check(&all_random);
    assert_eq!(f.severity, Severity::Ok, "{f:#?}");
    assert!(f.fix.is_none());
    let none = masquerade::check(&NetSnapshot::default());
    assert_eq!(
        (none.severity, none.title.as_str()),
        (Severity::Ok, "No MASQUERADE rules")
    );
}

// --- DNS bypass ------------------------------------------------------------------------------

#[test]
fn notrack_nodelocal_and_cilium_from_fixtures() {
    let snap = NetSnapshot {
        iptables: vec![dump("iptables-nft-save", "iptables-nft-save.txt")],
        nft_json: Some(fixture("rules/nft-native.json")),
        ip_addr_json: Some(fixture("rules/ip-addr.json")),
        ..Default::default()
    };
    let (nt, problems) = bypass::dns_notrack_rules(&snap);
    assert!(problems.is_empty());
    let rules: Vec<&str> = nt.iter().map(|r| r.rule.as_str()).collect();
    assert_eq!(
        rules,
        [
            "-A PREROUTING -d 169.254.20.10/32 -p udp -m udp --dport 53 -j NOTRACK",
            "-A OUTPUT -s 169.254.20.10/32 -p tcp -m tcp --sport 53 -j CT --notrack",
            "udp dport 53 notrack",
            "meta l4proto { tcp,udp } th dport { 53,853 } notrack",
        ],
        "{nt:#?}"
    );
    let found = bypass::check(&snap, &Node::new(fixtures().join("cilium")));
    let got: Vec<(&str, Severity)> = found.iter().map(|f| (f.id.as_str(), f.severity)).collect();
    assert_eq!(
        got,
        [
            (ids::DNS_NOTRACK, Severity::Info),
            (ids::NODELOCAL, Severity::Info),
            (ids::CILIUM, Severity::Info)
        ],
        "{found:#?}"
    );
    assert!(evidence_has(
        &found[1],
        "interface nodelocaldns (veth) has 169.254.20.10/32"
    ));
    assert!(evidence_has(&found[2], "interface cilium_host"));
    assert!(evidence_has(&found[2], "5 pinned maps"));

    let legacy = NetSnapshot {
        iptables: vec![dump("iptables-legacy-save", "iptables-legacy-save.txt")],
        ..Default::default()
    };
    assert_eq!(bypass::dns_notrack_rules(&legacy).0.len(), 1);

    let plain = NetSnapshot {
        ip_addr_json: Some(fixture("rules/ip-addr-plain.json")),
        ..Default::default()
    };
    let found = bypass::check(&plain, &Node::new(fixtures().join("pods")));
    assert_eq!(found.len(), 1);
    assert_eq!(
        (found[0].id.as_str(), found[0].severity),
        (ids::DNS_BYPASS, Severity::Ok)
    );
}

// --- capacity --------------------------------------------------------------------------------

#[test]
fn conntrack_capacity_from_fixtures() {
    assert_eq!(capacity::sustainable_rate(524_288, 120).round(), 4369.0);
    assert_eq!(capacity::thousands(4369), "4,369");
    assert_eq!(capacity::thousands(524_288), "524,288");

    let full = capacity::CtSysctls::read(&Node::new(fixtures().join("capacity/full")));
    assert_eq!(
        (full.max, full.count, full.buckets),
        (Some(524_288), Some(450_000), Some(131_072))
    );
    let f = capacity::check(&capacity::CapacityInput {
        first: full.clone(),
        ..Default::default()
    });
    assert_eq!(
        (f.id.as_str(), f.severity),
        (ids::CAPACITY, Severity::Warn),
        "{f:#?}"
    );
    assert!(
        evidence_has(&f, "524,288 / 120 s = 4,369 flows/s"),
        "{f:#?}"
    );
    assert!(
        evidence_has(&f, "524,288 / 30 s = 17,476 flows/s"),
        "{f:#?}"
    );
    assert!(f.fix.is_some());

    let healthy = capacity::CtSysctls::read(&Node::new(fixtures().join("capacity/healthy")));
    let quiet = capacity::check(&capacity::CapacityInput {
        first: healthy.clone(),
        second_count: Some(1_300),
        interval: Duration::from_secs(1),
    });
    assert_eq!(quiet.severity, Severity::Ok, "{quiet:#?}");
    assert!(evidence_has(&quiet, "100 net new entries/s"), "{quiet:#?}");
    // 4,000 new entries/s is 92% of the 4,369/s the table sustains.
    let busy = capacity::check(&capacity::CapacityInput {
        first: healthy.clone(),
        second_count: Some(1_200 + 4_000),
        interval: Duration::from_secs(1),
    });
    assert_eq!(busy.severity, Severity::Warn, "{busy:#?}");
    let mut nearly = healthy.clone();
    nearly.count = Some(510_000);
    assert_eq!(
        capacity::check(&capacity::CapacityInput {
            first: nearly,
            ..Default::default()
        })
        .severity,
        Severity::Critical
    );
    let absent = capacity::check(&capacity::CapacityInput::default());
    assert_eq!(absent.severity, Severity::Info);
}

// --- be_liberal --------------------------------------------------------------------------------

fn liberal_fixture(name: &str) -> (Finding, liberal::Persistence) {
    let node = Node::new(fixtures().join("liberal").join(name));
    let release = node.read_trim("proc/sys/kernel/osrelease");
    let p = liberal::Persistence::scan(&node, release.as_deref());
    let value = node.read_u64(liberal::SYSCTL_PATH);
    (liberal::check(value, &p, Some(true)), p)
}

#[test]
fn be_liberal_persistence_from_fixtures() {
    let (f, p) = liberal_fixture("persistent-modules-load");
    assert_eq!(
        (f.id.as_str(), f.severity),
        (ids::BE_LIBERAL, Severity::Ok),
        "{f:#?}"
    );
    assert_eq!(
        p.autoload.as_deref(),
        Some("etc/modules-load.d/k8s.conf: nf_conntrack")
    );
    assert!(matches!(p.builtin, liberal::Builtin::No(_)), "{p:#?}");

    let (f, p) = liberal_fixture("persistent-builtin");
    assert_eq!(f.severity, Severity::Ok, "{f:#?}");
    assert_eq!(
        p.configured,
        Some(("etc/sysctl.conf".to_string(), "1".to_string()))
    );
    assert!(matches!(p.builtin, liberal::Builtin::Yes(_)), "{p:#?}");

    let (f, p) = liberal_fixture("not-applied");
    assert_eq!(f.severity, Severity::Warn, "{f:#?}");
    assert!(f.title.contains("configured but not applied"), "{f:#?}");
    assert_eq!(p.loaded_at_sysctl_time(), Some(false));
    assert!(f.fix.as_deref().unwrap().contains("modules-load.d"));

    let (f, p) = liberal_fixture("runtime-only");
    assert_eq!(f.severity, Severity::Warn, "{f:#?}");
    assert!(f.title.contains("lost on reboot"), "{f:#?}");
    assert!(p.configured.is_none(), "README is not a .conf file: {p:#?}");

    let (f, _) = liberal_fixture("off");
    assert_eq!(f.severity, Severity::Info, "{f:#?}");

    // /etc/sysctl.d/90-ct.conf shadows /usr/lib/sysctl.d/90-ct.conf; /etc/modules loads nf_nat.
    let (f, p) = liberal_fixture("overridden");
    assert_eq!(f.severity, Severity::Ok, "{f:#?}");
    assert_eq!(
        p.assignments,
        [("etc/sysctl.d/90-ct.conf".into(), "1".into())]
    );
    assert_eq!(p.autoload.as_deref(), Some("etc/modules: nf_nat"));

    // A non-host namespace says that sysctl.d does not reach it.
    let node = Node::new(fixtures().join("liberal/runtime-only"));
    let p = liberal::Persistence::scan(&node, Some("5.15.0-91-generic"));
    let f = liberal::check(Some(1), &p, Some(false));
    assert!(evidence_has(&f, "not the host's"), "{f:#?}");
    let f = liberal::check(None, &p, None);
    assert_eq!(f.severity, Severity::Info);

    assert_eq!(
        liberal::parse_sysctl_conf("# c\n -net/netfilter/nf_conntrack_tcp_be_liberal = 1 \n"),
        ["1"]
    );
    assert_eq!(
        liberal::parse_modules_load("# x\nnf-conntrack\n; y\n"),
        ["nf_conntrack"]
    );
}

// --- pods ------------------------------------------------------------------------------------

#[test]
fn resolv_conf_and_libc_detection() {
    let rc = pods::parse_resolv_conf(
        "# generated\nnameserver 10.96.0.10\nsearch a b\nsearch ns.svc.cluster.local \
         svc.cluster.local cluster.local\noptions ndots:5 timeout:2\noptions single-request\n",
    );
    assert_eq!(rc.nameservers, ["10.96.0.10"]);
    assert_eq!(rc.search.len(), 3);
    assert_eq!(rc.effective_ndots(), 5);
    assert!(rc.has("single-request") && !rc.has("use-vc"));
    assert_eq!(
        pods::parse_resolv_conf("nameserver 1.1.1.1\n").effective_ndots(),
        1
    );

    assert_eq!(
        pods::libc_from_maps("7f-8f r-xp 0 00:2f 12 /lib/ld-musl-x86_64.so.1\n")
            .unwrap()
            .0,
        pods::Libc::Musl
    );
    // Debian's musl layout: the loader symlink resolves into x86_64-linux-musl/.
    assert_eq!(
        pods::libc_from_maps("7f-8f r-xp 0 00:2f 12 /usr/lib/x86_64-linux-musl/libc.so\n")
            .unwrap()
            .0,
        pods::Libc::Musl
    );
    assert_eq!(
        pods::libc_from_maps("7f-8f r-xp 0 08:01 9 /usr/lib/x86_64-linux-gnu/libc.so.6\n")
            .unwrap()
            .0,
        pods::Libc::Glibc
    );
    assert!(pods::libc_from_maps("7f-8f r-xp 0 08:01 9 /app/static\n").is_none());
    let musl_exe = fs::read(fixtures().join("pods/proc/700/exe")).unwrap();
    assert_eq!(
        pods::elf_interp(&musl_exe).as_deref(),
        Some("/lib/ld-musl-x86_64.so.1")
    );
    let static_exe = fs::read(fixtures().join("pods/proc/600/exe")).unwrap();
    assert_eq!(pods::elf_interp(&static_exe), None);
    assert_eq!(pods::elf_interp(b"#!/bin/sh\n"), None);
    assert_eq!(pods::elf_interp(&musl_exe[..80]), None, "truncated");
    // This test binary: glibc on Debian.
    let me = fs::read("/proc/self/exe").unwrap();
    assert_eq!(
        pods::libc_from_interp(&pods::elf_interp(&me).expect("dynamic test binary")),
        pods::Libc::Glibc
    );
}

fn pod_finding<'a>(found: &'a [Finding], comm: &str) -> &'a Finding {
    found
        .iter()
        .find(|f| evidence_has(f, &format!("({comm})")))
        .unwrap_or_else(|| panic!("no finding for {comm}: {found:#?}"))
}

#[test]
fn pod_dns_from_fixture_tree() {
    let node = Node::new(fixtures().join("pods"));
    assert_eq!(
        pods::select(&node, &PodSelection::Auto),
        [100, 101, 200, 300, 600, 700]
    );
    let found = pods::check(&node, &PodSelection::Auto);
    assert_eq!(found.len(), 6, "{found:#?}");
    assert!(found.iter().all(|f| f.id == ids::POD_DNS));

    let app = pod_finding(&found, "app");
    assert_eq!(
        app.severity,
        Severity::Warn,
        "ndots:5 with 3 search domains: {app:#?}"
    );
    assert!(
        evidence_has(app, "up to 4 lookups x 2 (A and AAAA) = 8 queries"),
        "{app:#?}"
    );
    assert!(
        evidence_has(app, "glibc honours single-request-reopen"),
        "{app:#?}"
    );

    let sidecar = pod_finding(&found, "sidecar");
    assert_eq!(sidecar.severity, Severity::Warn);
    assert!(sidecar.title.contains("musl resolver"), "{sidecar:#?}");
    assert!(
        evidence_has(sidecar, "options single-request-reopen have no effect"),
        "{sidecar:#?}"
    );

    let api = pod_finding(&found, "api");
    assert_eq!(api.severity, Severity::Ok, "ndots:2, RES_OPTIONS: {api:#?}");
    assert!(
        evidence_has(api, "RES_OPTIONS=single-request-reopen"),
        "{api:#?}"
    );

    let worker = pod_finding(&found, "worker");
    assert_eq!(
        worker.severity,
        Severity::Info,
        "glibc without mitigations: {worker:#?}"
    );

    let stat = pod_finding(&found, "static-app");
    assert_eq!(stat.severity, Severity::Info);
    assert!(evidence_has(stat, "statically linked"), "{stat:#?}");

    let alpine = pod_finding(&found, "alpine-tool");
    assert_eq!(alpine.severity, Severity::Warn);
    assert!(
        evidence_has(alpine, "ELF interpreter /lib/ld-musl-x86_64.so.1"),
        "{alpine:#?}"
    );
    assert!(
        evidence_has(alpine, "options use-vc have no effect"),
        "{alpine:#?}"
    );

    // Explicit pids: the host's sshd is included; a missing pid is reported.
    let found = pods::check(&node, &PodSelection::Pids(vec![400, 999_999]));
    assert_eq!(found.len(), 2, "{found:#?}");
    assert_eq!(pod_finding(&found, "sshd").severity, Severity::Info);
    assert!(found[1].title.contains("not found"), "{found:#?}");
    assert!(pods::check(&node, &PodSelection::None).is_empty());
}

// --- the whole report ----------------------------------------------------------------------------

#[test]
fn whole_report_on_a_fixture_tree() {
    let opts = DoctorOptions {
        root: fixtures().join("capacity/full"),
        netns: None,
        pods: PodSelection::None,
        sample_interval: Duration::ZERO,
        snapshot: Some(NetSnapshot {
            iptables: vec![dump("iptables-legacy-save", "iptables-legacy-save.txt")],
            nft_json: Some(fixture("rules/nft-native.json")),
            ip_addr_json: Some(fixture("rules/ip-addr-plain.json")),
            notes: vec!["ip6tables-nft-save: not captured".into()],
        }),
    };
    let report = doctor::run(&opts).unwrap();
    let got: Vec<(&str, Severity)> = report
        .findings
        .iter()
        .map(|f| (f.id.as_str(), f.severity))
        .collect();
    assert_eq!(
        got,
        [
            (ids::KERNEL, Severity::Info),
            (ids::MASQUERADE, Severity::Warn),
            (ids::CAPACITY, Severity::Warn),
            (ids::BE_LIBERAL, Severity::Info),
            (ids::DNS_NOTRACK, Severity::Info),
            (ids::CHECK_ERROR, Severity::Info),
        ],
        "{report:#?}"
    );
    assert_eq!(report.worst(), Severity::Warn);
    assert_eq!(report.exit_code(), 1);
    let text = report.render_text();
    assert!(text.contains("[WARN] masquerade-random-fully: "), "{text}");
    assert!(text.contains("       fix: "), "{text}");
    assert!(text.contains("Something needs attention."), "{text}");
    let json: serde_json::Value = serde_json::to_value(&report).unwrap();
    assert_eq!(json["findings"][1]["id"], ids::MASQUERADE);
    assert_eq!(json["findings"][1]["severity"], "warn");
    assert!(json["findings"][0]["fix"].is_null());

    let calm = Report {
        root: "/".into(),
        netns: None,
        findings: vec![Finding::new("x", Severity::Info, "fine")],
    };
    assert_eq!(calm.exit_code(), 0);
    assert!(calm.render_text().contains("Nothing needs attention."));
}

// --- live: rules in network namespaces ---------------------------------------------------------

fn live_opts(ns: &Netns) -> DoctorOptions {
    DoctorOptions {
        root: PathBuf::from("/"),
        netns: Some(ns.path()),
        pods: PodSelection::None,
        sample_interval: Duration::ZERO,
        snapshot: None,
    }
}

fn live(ns: &Netns) -> Report {
    doctor::run(&live_opts(ns)).expect("doctor run in netns")
}

fn bad_masq_lines(f: &Finding) -> Vec<&String> {
    f.evidence
        .iter()
        .filter(|e| !e.starts_with("ok:") && !e.starts_with("read:"))
        .collect()
}

#[test]
fn live_masquerade_nft() {
    require_root();
    let plain = Netns::create(PREFIX).unwrap();
    plain
        .nft("table ip t {\n chain post {\n  type nat hook postrouting priority 100; policy accept;\n  oifname \"eth9\" masquerade\n }\n}\n")
        .unwrap();
    let random = Netns::create(PREFIX).unwrap();
    random
        .nft("table ip t {\n chain post {\n  type nat hook postrouting priority 100; policy accept;\n  oifname \"eth9\" masquerade fully-random\n }\n}\n")
        .unwrap();

    let r = live(&plain);
    let f = r.get(ids::MASQUERADE).unwrap();
    assert_eq!(f.severity, Severity::Warn, "{f:#?}");
    assert_eq!(
        bad_masq_lines(f),
        [&"nft ip t/post handle 2: meta oifname eth9 masquerade".to_string()],
        "{f:#?}"
    );
    assert_eq!(r.exit_code(), 1);

    let r = live(&random);
    let f = r.get(ids::MASQUERADE).unwrap();
    assert_eq!(f.severity, Severity::Ok, "{f:#?}");
    assert!(evidence_has(f, "masquerade fully-random"), "{f:#?}");
    // The kernel here has every clash fix; nothing else is wrong in an empty namespace.
    assert_eq!(r.get(ids::KERNEL).unwrap().severity, Severity::Ok);
    assert_eq!(r.get(ids::DNS_BYPASS).unwrap().severity, Severity::Ok);
}

fn iptables_masq(tool: &str, fully_random: bool) -> Report {
    let ns = Netns::create(PREFIX).unwrap();
    let mut args = vec![
        tool,
        "-t",
        "nat",
        "-A",
        "POSTROUTING",
        "-o",
        "eth9",
        "-j",
        "MASQUERADE",
    ];
    if fully_random {
        args.push("--random-fully");
    }
    ns.run(&args).unwrap();
    live(&ns)
}

#[test]
fn live_masquerade_iptables_nft() {
    require_root();
    assert!(
        doctor::find_tool("iptables-nft").is_some(),
        "iptables-nft is required"
    );
    let r = iptables_masq("iptables-nft", false);
    let f = r.get(ids::MASQUERADE).unwrap();
    assert_eq!(f.severity, Severity::Warn, "{f:#?}");
    // Reported once (from iptables-nft-save), not again as an xt target from the nft JSON.
    assert_eq!(
        bad_masq_lines(f),
        [&"iptables-nft-save nat/POSTROUTING: -A POSTROUTING -o eth9 -j MASQUERADE".to_string()],
        "{f:#?}"
    );
    let r = iptables_masq("iptables-nft", true);
    let f = r.get(ids::MASQUERADE).unwrap();
    assert_eq!(f.severity, Severity::Ok, "{f:#?}");
    assert!(evidence_has(f, "--random-fully"), "{f:#?}");
}

#[test]
fn live_masquerade_iptables_legacy() {
    require_root();
    // Debian's `iptables` package ships both backends; `cargo xtask setup` installs it.
    assert!(
        doctor::find_tool("iptables-legacy").is_some(),
        "iptables-legacy not found: install Debian's `iptables` package (`cargo xtask setup`)"
    );
    let r = iptables_masq("iptables-legacy", false);
    let f = r.get(ids::MASQUERADE).unwrap();
    assert_eq!(f.severity, Severity::Warn, "{f:#?}");
    assert_eq!(
        bad_masq_lines(f),
        [
            &"iptables-legacy-save nat/POSTROUTING: -A POSTROUTING -o eth9 -j MASQUERADE"
                .to_string()
        ],
        "{f:#?}"
    );
    let r = iptables_masq("iptables-legacy", true);
    assert_eq!(r.get(ids::MASQUERADE).unwrap().severity, Severity::Ok);
}

#[test]
fn live_be_liberal() {
    require_root();
    let node = Node::new("/");
    let release = node.read_trim("proc/sys/kernel/osrelease");
    let host = liberal::Persistence::scan(&node, release.as_deref());
    for value in ["1", "0"] {
        let ns = Netns::create(PREFIX).unwrap();
        ns.sysctl_set("net.netfilter.nf_conntrack_tcp_be_liberal", value)
            .unwrap();
        let r = live(&ns);
        let f = r.get(ids::BE_LIBERAL).unwrap();
        assert!(
            evidence_has(
                f,
                &format!("nf_conntrack_tcp_be_liberal = {value} in the audited")
            ),
            "{f:#?}"
        );
        assert!(evidence_has(f, "not the host's"), "{f:#?}");
        let v: u64 = value.parse().unwrap();
        let expected = liberal::check(Some(v), &host, Some(false));
        assert_eq!(f.severity, expected.severity, "{f:#?}");
        // This machine's /etc sets nothing: 1 is runtime-only (warn), 0 is the default (info).
        if host.configured.is_none() {
            let want = if v == 1 {
                Severity::Warn
            } else {
                Severity::Info
            };
            assert_eq!(f.severity, want, "{f:#?}");
        }
    }
}

#[test]
fn live_dns_notrack() {
    require_root();
    let ipt = Netns::create(PREFIX).unwrap();
    ipt.run([
        "iptables",
        "-t",
        "raw",
        "-A",
        "PREROUTING",
        "-p",
        "udp",
        "--dport",
        "53",
        "-j",
        "NOTRACK",
    ])
    .unwrap();
    ipt.run([
        "iptables",
        "-t",
        "raw",
        "-A",
        "OUTPUT",
        "-p",
        "udp",
        "--sport",
        "53",
        "-j",
        "CT",
        "--notrack",
    ])
    .unwrap();
    let f = live(&ipt)
        .get(ids::DNS_NOTRACK)
        .cloned()
        .expect("dns-notrack finding");
    assert_eq!(f.severity, Severity::Info);
    assert!(f.title.starts_with("2 NOTRACK rule(s)"), "{f:#?}");

    let nft = Netns::create(PREFIX).unwrap();
    nft.nft("table inet raw {\n chain pre {\n  type filter hook prerouting priority raw; policy accept;\n  udp dport 53 notrack\n  tcp dport 443 notrack\n }\n}\n")
        .unwrap();
    let r = live(&nft);
    let f = r.get(ids::DNS_NOTRACK).expect("dns-notrack finding");
    assert_eq!(f.severity, Severity::Info);
    assert!(f.title.starts_with("1 NOTRACK rule(s)"), "{f:#?}");
    assert!(
        evidence_has(f, "nft inet raw/pre handle 2: udp dport 53 notrack"),
        "{f:#?}"
    );
    assert!(r.get(ids::DNS_BYPASS).is_none());

    let none = Netns::create(PREFIX).unwrap();
    let r = live(&none);
    assert!(r.get(ids::DNS_NOTRACK).is_none());
    assert_eq!(r.get(ids::DNS_BYPASS).unwrap().severity, Severity::Ok);
}

#[test]
fn live_capacity_and_full_report() {
    require_root();
    let ns = Netns::create(PREFIX).unwrap();
    ns.nft("table inet t {\n chain out {\n  type filter hook output priority 0; policy accept;\n  ct state new counter accept\n }\n}\n")
        .unwrap();
    let mut opts = live_opts(&ns);
    opts.sample_interval = Duration::from_millis(100);
    let r = doctor::run(&opts).unwrap();
    let f = r.get(ids::CAPACITY).unwrap();
    assert_eq!(f.severity, Severity::Ok, "{f:#?}");
    assert!(
        evidence_has(f, "nf_conntrack_count 0 of nf_conntrack_max"),
        "{f:#?}"
    );
    assert!(evidence_has(f, "net new entries/s"), "{f:#?}");
    let ids_seen: Vec<&str> = r.findings.iter().map(|f| f.id.as_str()).collect();
    for id in [
        ids::KERNEL,
        ids::MASQUERADE,
        ids::CAPACITY,
        ids::BE_LIBERAL,
        ids::DNS_BYPASS,
    ] {
        assert!(ids_seen.contains(&id), "{id} missing: {ids_seen:?}");
    }
    let json = serde_json::to_string(&r).unwrap();
    assert!(
        json.contains(&format!("\"netns\":\"{}\"", ns.path().display())),
        "{json}"
    );
    assert!(
        r.render_text().contains("[OK  ] conntrack-capacity: "),
        "{}",
        r.render_text()
    );
}

// --- live: a real process in a pod namespace --------------------------------------------------

/// `/etc/netns/NAME/` (what `ip netns exec` bind-mounts over /etc), removed on drop.
struct EtcNetns(PathBuf);

impl EtcNetns {
    fn new(ns: &Netns, resolv: &str) -> EtcNetns {
        let dir = Path::new("/etc/netns").join(ns.name());
        fs::create_dir_all(&dir).unwrap();
        fs::write(dir.join("resolv.conf"), resolv).unwrap();
        EtcNetns(dir)
    }
}

impl Drop for EtcNetns {
    fn drop(&mut self) {
        let _ = fs::remove_dir_all(&self.0);
    }
}

fn wait_pid(ns: &Netns) -> u32 {
    let deadline = std::time::Instant::now() + common::bound(2);
    while std::time::Instant::now() < deadline {
        if let Some(&pid) = ns.pids().first() {
            // Wait for the exec into the target program (comm changes from `ip`).
            let comm = fs::read_to_string(format!("/proc/{pid}/comm")).unwrap_or_default();
            if comm.trim() != "ip" {
                return pid;
            }
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    panic!("no process appeared in {}", ns.name());
}

#[test]
fn live_pod_process_glibc() {
    require_root();
    let ns = Netns::create(PREFIX).unwrap();
    let _etc = EtcNetns::new(
        &ns,
        "search default.svc.cluster.local svc.cluster.local cluster.local\n\
         nameserver 10.96.0.10\noptions ndots:5 single-request-reopen\n",
    );
    let _sleep = ns.spawn(["sleep", "30"]).unwrap();
    let pid = wait_pid(&ns);
    let node = Node::new("/");
    let found = pods::check(&node, &PodSelection::Pids(vec![pid]));
    assert_eq!(found.len(), 1, "{found:#?}");
    let f = &found[0];
    assert_eq!(
        (f.id.as_str(), f.severity),
        (ids::POD_DNS, Severity::Warn),
        "{f:#?}"
    );
    assert!(f.title.contains(&format!("net:[{}]", ns.inode())), "{f:#?}");
    assert!(evidence_has(f, &format!("{pid} (sleep)")), "{f:#?}");
    assert!(evidence_has(f, "libc: glibc"), "{f:#?}");
    assert!(
        evidence_has(f, "options ndots:5 single-request-reopen"),
        "{f:#?}"
    );
    assert!(evidence_has(f, "ndots:5 with 3 search domain(s)"), "{f:#?}");

    // Automatic selection finds it too (it is outside the host's namespace).
    assert!(pods::select(&node, &PodSelection::Auto).contains(&pid));
}

#[test]
fn live_pod_process_musl() {
    require_root();
    let dir = std::env::temp_dir().join(format!("ctdoc-musl-{}", std::process::id()));
    fs::create_dir_all(&dir).unwrap();
    let src = dir.join("sleeper.c");
    fs::write(
        &src,
        "#include <unistd.h>\nint main(void) { sleep(30); return 0; }\n",
    )
    .unwrap();
    let bin = dir.join("sleeper");
    let out = Command::new("musl-gcc")
        .arg("-O1")
        .arg("-o")
        .arg(&bin)
        .arg(&src)
        .output()
        .expect("musl-gcc (Debian package musl-tools) is required");
    assert!(
        out.status.success(),
        "musl-gcc: {}",
        String::from_utf8_lossy(&out.stderr)
    );

    let ns = Netns::create(PREFIX).unwrap();
    let _etc = EtcNetns::new(
        &ns,
        "nameserver 10.96.0.10\noptions single-request use-vc\n",
    );
    let _proc = ns.spawn([bin.as_os_str()]).unwrap();
    let pid = wait_pid(&ns);
    let found = pods::check(&Node::new("/"), &PodSelection::Pids(vec![pid]));
    let _ = fs::remove_dir_all(&dir);
    assert_eq!(found.len(), 1, "{found:#?}");
    let f = &found[0];
    assert_eq!(f.severity, Severity::Warn, "{f:#?}");
    assert!(f.title.contains("musl resolver"), "{f:#?}");
    assert!(evidence_has(f, "libc: musl"), "{f:#?}");
    assert!(
        evidence_has(f, "options single-request and use-vc have no effect"),
        "{f:#?}"
    );
}

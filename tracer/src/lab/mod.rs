//! `tracer lab <scenario>`: reproduce a conntrack failure mode on purpose in throwaway
//! network namespaces, with the tracer watching, and check that every verdict it names is
//! matched by the kernel's own counters.

pub mod client;
pub mod collect;
pub mod kubepods;
pub mod load;
pub mod topology;

use std::{
    collections::BTreeMap,
    io::Write,
    net::{IpAddr, SocketAddr},
    path::PathBuf,
    time::{Duration, Instant},
};

use anyhow::Context as _;
use serde::Serialize;

use crate::{
    ctstats::CpuStats,
    events::Event,
    lookups::{self, Lookup},
    output::Printer,
    pipeline::Item,
    session::Options,
    traffic::{self, Proto},
    verdict::{Finding, Verdict},
};
pub use topology::{Cluster, Rules};

use crate::pods::{QosClass, Runtime};
use kubepods::{LabPodCgroups, Layout, PodSpec};

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, clap::ValueEnum)]
#[serde(rename_all = "kebab-case")]
pub enum Scenario {
    /// A/AAAA sent at once from one socket to a DNS VIP DNATed to two backends.
    DnsRace,
    /// Pods behind MASQUERADE connecting to one server from the same source port.
    SnatRace,
    /// The node's conntrack table filled with assured entries, then new flows.
    TableFull,
    /// The node's table filled with unassured entries, then new flows.
    EarlyDrop,
    /// A forged out-of-window TCP segment from a backend through a DNAT node.
    Invalid,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, clap::ValueEnum)]
#[serde(rename_all = "kebab-case")]
pub enum Mitigation {
    /// MASQUERADE with `--random-fully` (nft `fully-random`).
    RandomFully,
    /// `nf_conntrack_tcp_be_liberal=1` on the node: out-of-window segments are not INVALID.
    BeLiberal,
    /// `ct state invalid drop` on the node: INVALID packets never reach the pod.
    InvalidDrop,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, clap::ValueEnum)]
#[serde(rename_all = "kebab-case")]
pub enum DnsClient {
    /// Two threads on two CPUs sending A and AAAA on one socket at the same moment.
    Race,
    /// glibc's resolver (`getent ahosts`): A and AAAA with one sendmmsg.
    Glibc,
    /// musl's resolver (a static getaddrinfo client built with musl-gcc): A and AAAA back
    /// to back with sendto on one socket.
    Musl,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, clap::ValueEnum)]
#[serde(rename_all = "kebab-case")]
pub enum SourcePort {
    /// Every pod binds the same source port (the worst case for SNAT).
    Fixed,
    /// Ephemeral ports chosen by each pod's kernel.
    Ephemeral,
}

#[derive(Debug, Clone)]
pub struct LabArgs {
    pub scenario: Scenario,
    pub rounds: u32,
    pub mitigations: Vec<Mitigation>,
    pub rules: Rules,
    pub proto: Proto,
    pub source_port: SourcePort,
    pub client: DnsClient,
    pub pods: usize,
    /// snat-race with DNS lookups instead of echo datagrams.
    pub dns: bool,
    /// dns-race: drop the first AAAA of every lookup with a rule on the node.
    pub lose_first_aaaa: bool,
    pub session: Options,
}

/// One check of verdicts against the kernel's counter in one namespace.
#[derive(Debug, Clone, Serialize)]
pub struct Check {
    pub namespace: String,
    pub what: &'static str,
    pub verdicts: u64,
    pub counter: u64,
    pub ok: bool,
}

#[derive(Debug, Clone, Serialize)]
pub struct NamespaceReport {
    pub role: String,
    pub name: String,
    pub netns: u32,
    pub counters: CpuStats,
    pub verdicts: BTreeMap<&'static str, u64>,
}

#[derive(Debug, Clone, Serialize)]
pub struct LabReport {
    pub scenario: Scenario,
    pub rules: Rules,
    pub mitigations: Vec<Mitigation>,
    pub rounds: u32,
    pub did: String,
    /// What the traffic generator saw (client side).
    pub traffic: serde_json::Value,
    pub attempts: u64,
    pub failed: u64,
    pub loss_rate: f64,
    pub namespaces: Vec<NamespaceReport>,
    pub checks: Vec<Check>,
    pub events: BTreeMap<&'static str, u64>,
    /// The DNS lookups the tracer put together from the pods' queries.
    pub lookups: LookupsReport,
    pub tracer_lost: u64,
    pub decode_errors: u64,
    pub seconds: f64,
}

/// The lookups of a lab run, tallied, and every one of them.
#[derive(Debug, Clone, Default, Serialize)]
pub struct LookupsReport {
    pub total: u64,
    pub problems: u64,
    pub by_outcome: BTreeMap<String, u64>,
    /// Verdicts on the lookups' queries (one per query with a fate).
    pub by_verdict: BTreeMap<&'static str, u64>,
    /// Lookups per pod label.
    pub by_pod: BTreeMap<String, u64>,
    /// How the A/AAAA siblings left (`sendmmsg`, `same-socket`, `two-sockets`).
    pub siblings: BTreeMap<&'static str, u64>,
    pub retries: u64,
    /// Packet findings on conntrack's path in the lab's namespaces that matched no query.
    pub unmatched_drops: u64,
    pub list: Vec<Lookup>,
}

impl LookupsReport {
    pub fn new(lookups: &[Lookup], unmatched_drops: u64) -> LookupsReport {
        let mut r = LookupsReport {
            unmatched_drops,
            ..LookupsReport::default()
        };
        for l in lookups {
            r.total += 1;
            r.problems += l.problem as u64;
            let outcome = serde_json::to_value(l.outcome)
                .ok()
                .and_then(|v| v.as_str().map(str::to_string))
                .unwrap_or_default();
            *r.by_outcome.entry(outcome).or_default() += 1;
            *r.by_pod.entry(l.workload.label()).or_default() += 1;
            if let Some(s) = &l.siblings {
                *r.siblings.entry(s.how).or_default() += 1;
            }
            r.retries += l.retries as u64;
            for q in &l.queries {
                if let Some(f) = &q.fate {
                    *r.by_verdict.entry(f.verdict.name()).or_default() += 1;
                }
            }
        }
        r.list = lookups.to_vec();
        r
    }
}

impl LabReport {
    pub fn all_checks_ok(&self) -> bool {
        self.checks.iter().all(|c| c.ok)
    }

    pub fn verdict_total(&self, v: Verdict) -> u64 {
        self.namespaces
            .iter()
            .map(|n| n.verdicts.get(v.name()).copied().unwrap_or(0))
            .sum()
    }

    pub fn render(&self) -> String {
        let mut s = format!(
            "lab {:?} ({:?} rules{}): {}\n  client side: {} attempts, {} failed or slow ({:.2} %)\n",
            self.scenario,
            self.rules,
            if self.mitigations.is_empty() { String::new() } else { format!(", mitigations {:?}", self.mitigations) },
            self.did,
            self.attempts,
            self.failed,
            self.loss_rate * 100.0
        );
        for n in &self.namespaces {
            let c = &n.counters;
            if c.fields().iter().all(|(_, v)| *v == 0) && n.verdicts.is_empty() {
                continue;
            }
            s += &format!(
                "  {:<9} netns {:<10} counters: insert {} insert_failed {} drop {} early_drop {} invalid {} clash_resolve {}\n",
                n.role, n.netns, c.insert, c.insert_failed, c.drop, c.early_drop, c.invalid, c.clash_resolve
            );
            if !n.verdicts.is_empty() {
                let v: Vec<String> = n.verdicts.iter().map(|(k, v)| format!("{k} {v}")).collect();
                s += &format!("  {:<9} verdicts: {}\n", "", v.join(", "));
            }
        }
        // The text shows the checks with something in them, and every failing one.
        for c in self
            .checks
            .iter()
            .filter(|c| !c.ok || c.verdicts > 0 || c.counter > 0)
        {
            s += &format!(
                "  check {:<9} {:<52} verdicts {:>6} counter {:>6}  {}\n",
                c.namespace,
                c.what,
                c.verdicts,
                c.counter,
                if c.ok { "ok" } else { "MISMATCH" }
            );
        }
        let quiet = self
            .checks
            .iter()
            .filter(|c| c.ok && c.verdicts == 0 && c.counter == 0)
            .count();
        s += &format!("  ({quiet} other checks: 0 verdicts = 0 in the counters)\n");
        let l = &self.lookups;
        if l.total > 0 {
            let tally = |m: &BTreeMap<String, u64>| {
                m.iter()
                    .map(|(k, v)| format!("{k} {v}"))
                    .collect::<Vec<_>>()
                    .join(", ")
            };
            s += &format!(
                "  lookups: {} ({}), {} with a problem, {} retries; pods: {}\n",
                l.total,
                tally(&l.by_outcome),
                l.problems,
                l.retries,
                tally(&l.by_pod)
            );
            if !l.by_verdict.is_empty() || !l.siblings.is_empty() {
                let v: Vec<String> = l
                    .by_verdict
                    .iter()
                    .map(|(k, v)| format!("{k} {v}"))
                    .collect();
                let sib: Vec<String> = l.siblings.iter().map(|(k, v)| format!("{k} {v}")).collect();
                s += &format!(
                    "  lookups: query verdicts [{}], siblings [{}]\n",
                    v.join(", "),
                    sib.join(", ")
                );
            }
        }
        s += &format!(
            "  tracer: {} events, {} lost, {} undecodable; {:.1} s\n",
            self.events.values().sum::<u64>(),
            self.tracer_lost,
            self.decode_errors,
            self.seconds
        );
        s
    }
}

/// Verdict counts against counters, per namespace.
pub fn checks(
    role: &str,
    counters: &CpuStats,
    verdicts: &BTreeMap<&'static str, u64>,
) -> Vec<Check> {
    let v = |x: Verdict| verdicts.get(x.name()).copied().unwrap_or(0);
    let mut out = vec![
        Check {
            namespace: role.into(),
            what: "insert-clash-dropped + snat-port-clash = insert_failed",
            verdicts: v(Verdict::InsertClashDropped) + v(Verdict::SnatPortClash),
            counter: u64::from(counters.insert_failed),
            ok: false,
        },
        Check {
            namespace: role.into(),
            what: "table-full = drop - insert_failed",
            verdicts: v(Verdict::TableFull),
            counter: u64::from(counters.drop.saturating_sub(counters.insert_failed)),
            ok: false,
        },
        Check {
            namespace: role.into(),
            what: "insert-clash-resolved = clash_resolve",
            verdicts: v(Verdict::InsertClashResolved),
            counter: u64::from(counters.clash_resolve),
            ok: false,
        },
        Check {
            namespace: role.into(),
            what: "early-drop = early_drop",
            verdicts: v(Verdict::EarlyDrop),
            counter: u64::from(counters.early_drop),
            ok: false,
        },
        Check {
            namespace: role.into(),
            what: "invalid = invalid",
            verdicts: v(Verdict::Invalid),
            counter: u64::from(counters.invalid),
            ok: false,
        },
        Check {
            namespace: role.into(),
            what: "unexplained = 0",
            verdicts: v(Verdict::Unexplained),
            counter: 0,
            ok: false,
        },
    ];
    for c in &mut out {
        c.ok = c.verdicts == c.counter;
    }
    out
}

fn count_verdicts(findings: &[Finding], netns: u32) -> BTreeMap<&'static str, u64> {
    let mut m = BTreeMap::new();
    for f in findings.iter().filter(|f| f.netns == netns) {
        *m.entry(f.verdict.name()).or_default() += f.count;
    }
    m
}

/// What a scenario's traffic did, in numbers common to all of them.
struct Outcome {
    did: String,
    report: serde_json::Value,
    attempts: u64,
    failed: u64,
}

/// Runs a scenario end to end; `live` prints events and findings as they happen.
pub fn run(args: &LabArgs, live: Option<collect::Live>) -> anyhow::Result<LabReport> {
    anyhow::ensure!(
        !args.dns || args.scenario == Scenario::SnatRace,
        "--dns is an option of snat-race"
    );
    anyhow::ensure!(
        !args.lose_first_aaaa || args.scenario == Scenario::DnsRace,
        "--lose-first-aaaa is an option of dns-race"
    );
    let started = Instant::now();
    let fully_random = args.mitigations.contains(&Mitigation::RandomFully);
    let cluster = match args.scenario {
        Scenario::DnsRace => Cluster::build(1, 2, false)?,
        Scenario::SnatRace => Cluster::build(args.pods.max(2), 0, true)?,
        Scenario::TableFull | Scenario::EarlyDrop | Scenario::Invalid => {
            Cluster::build(1, 0, true)?
        }
    };
    match args.scenario {
        Scenario::DnsRace => {
            cluster.dns_service(args.rules)?;
            if args.lose_first_aaaa {
                cluster.node.nft(&lose_first_aaaa_rule())?;
            }
        }
        Scenario::SnatRace => cluster.masquerade(args.rules, fully_random)?,
        Scenario::TableFull | Scenario::EarlyDrop => {
            cluster.masquerade(args.rules, false)?;
            cluster.track_everything()?;
        }
        Scenario::Invalid => {
            traffic::setup_invalid_dnat(&cluster)?;
            if args.mitigations.contains(&Mitigation::BeLiberal) {
                traffic::set_tcp_be_liberal(&cluster.node, true)?;
            }
            if args.mitigations.contains(&Mitigation::InvalidDrop) {
                traffic::drop_invalid(&cluster.node)?;
            }
        }
    }
    // Filling happens before the baselines: what the fill itself does to the counters is
    // not part of the experiment.
    let filled = match args.scenario {
        Scenario::TableFull => Some(fill_table(&cluster, true)?),
        Scenario::EarlyDrop => Some(fill_table(&cluster, false)?),
        _ => None,
    };
    let paths: Vec<PathBuf> = cluster.namespaces().iter().map(|(_, n)| n.path()).collect();
    // The pods' processes run in cgroups laid out as kubelet does, with the names the
    // tracer reads from /var/log/pods under a node root of the lab's own.
    let kube = LabPodCgroups::create(&pod_specs(cluster.pods.len()))?;
    let collector = collect::Collector::start(
        args.session.clone(),
        paths,
        kube.node_paths(),
        lookup_config(args),
        live,
    )?;
    let outcome = drive(args, &cluster, &kube, fully_random, filled)?;
    let collected = collector.finish()?;

    let mut namespaces = Vec::new();
    let mut all_checks = Vec::new();
    for (role, ns) in cluster.namespaces() {
        let netns = ns.inode() as u32;
        // A namespace whose counters were never read would hold every verdict to zeros,
        // and every "expect zero" check would pass: that is a failed run, not a clean one.
        let counters = collected.deltas.get(&netns).cloned().with_context(|| {
            format!(
                "no conntrack counters were read for the lab's {role} namespace (netns                  {netns}): its verdicts can not be checked"
            )
        })?;
        let verdicts = count_verdicts(&collected.findings, netns);
        all_checks.extend(checks(&role, &counters, &verdicts));
        if role == "node" && args.lose_first_aaaa && args.scenario == Scenario::DnsRace {
            let rule = lose_rule_counter(&cluster)?;
            let named = verdicts
                .get(Verdict::RulesetDrop.name())
                .copied()
                .unwrap_or(0);
            all_checks.push(Check {
                namespace: role.clone(),
                what: "ruleset-drop = the AAAA drop rule's counter",
                verdicts: named,
                counter: rule,
                ok: named == rule,
            });
        }
        namespaces.push(NamespaceReport {
            role,
            name: ns.name().to_string(),
            netns,
            counters,
            verdicts,
        });
    }
    let mut events: BTreeMap<&'static str, u64> = BTreeMap::new();
    for e in &collected.events {
        let lab_ns: Vec<u32> = namespaces.iter().map(|n| n.netns).collect();
        let (k, ns) = match e {
            Event::DnsSend(d) => ("dns_send", d.task.netns),
            Event::DnsRecv(d) => ("dns_recv", d.task.netns),
            Event::NfDrop(d) => ("nf_drop", d.netns),
            Event::CtClash(d) => ("ct_clash", d.netns),
        };
        if lab_ns.contains(&ns) {
            *events.entry(k).or_default() += 1;
        }
    }
    let lab_ns: Vec<u32> = namespaces.iter().map(|n| n.netns).collect();
    let lookups: Vec<Lookup> = collected
        .lookups
        .iter()
        .filter(|l| lab_ns.contains(&l.netns))
        .cloned()
        .collect();
    let unmatched_drops = collected
        .findings
        .iter()
        .zip(&collected.finding_pods)
        .filter(|(f, pod)| {
            let dns = f
                .conntrack
                .as_ref()
                .map(|c| c.orig)
                .or(f.packet)
                .is_some_and(|t| t.dst.port() == 53);
            pod.is_none() && dns && lab_ns.contains(&f.netns)
        })
        .count() as u64;
    let lookups_report = LookupsReport::new(&lookups, unmatched_drops);
    if args.dns || args.scenario == Scenario::DnsRace {
        // Every DNS packet the kernel dropped on conntrack's path or by a rule found its
        // query, and the lookups carry as many lost queries as the node's counters say.
        all_checks.push(Check {
            namespace: "lookups".into(),
            what: "DNS drops that matched no query = 0",
            verdicts: unmatched_drops,
            counter: 0,
            ok: unmatched_drops == 0,
        });
        if let Some(node) = namespaces.iter().find(|n| n.role == "node") {
            let fates = lookups_report
                .by_verdict
                .get(Verdict::SnatPortClash.name())
                .copied()
                .unwrap_or(0)
                + lookups_report
                    .by_verdict
                    .get(Verdict::InsertClashDropped.name())
                    .copied()
                    .unwrap_or(0);
            all_checks.push(Check {
                namespace: "lookups".into(),
                what: "queries lost to an insert failure = node insert_failed",
                verdicts: fates,
                counter: u64::from(node.counters.insert_failed),
                ok: fates == u64::from(node.counters.insert_failed),
            });
        }
    }
    let report = LabReport {
        scenario: args.scenario,
        rules: args.rules,
        mitigations: args.mitigations.clone(),
        rounds: args.rounds,
        did: outcome.did,
        traffic: outcome.report,
        attempts: outcome.attempts,
        failed: outcome.failed,
        loss_rate: if outcome.attempts == 0 {
            0.0
        } else {
            outcome.failed as f64 / outcome.attempts as f64
        },
        namespaces,
        checks: all_checks,
        events,
        lookups: lookups_report,
        tracer_lost: collected.lost,
        decode_errors: collected.decode_errors,
        seconds: started.elapsed().as_secs_f64(),
    };
    drop(cluster);
    Ok(report)
}

/// Table and chain of the `--lose-first-aaaa` rule.
const LOSE_TABLE: &str = "labloss";

/// Drops every other AAAA query for [`topology::LAB_NAME`] in the node's forward hook
/// (after the DNAT), i.e. the first try of every lookup when each lookup sends one AAAA and
/// retries it once. The qtype sits right after the question name: UDP header (8) + DNS
/// header (12) + the name in wire format.
fn lose_first_aaaa_rule() -> String {
    let wire_len: usize = topology::LAB_NAME
        .split('.')
        .map(|l| l.len() + 1)
        .sum::<usize>()
        + 1;
    let qtype_bits = (8 + 12 + wire_len) * 8;
    format!(
        "table ip {LOSE_TABLE} {{\n  chain forward_dns {{\n    type filter hook forward priority 0; policy accept;\n    \
         udp dport 53 @th,{qtype_bits},16 0x001c numgen inc mod 2 0 counter drop\n  }}\n}}\n"
    )
}

/// Packets the `--lose-first-aaaa` rule dropped, from its own counter.
fn lose_rule_counter(cluster: &Cluster) -> anyhow::Result<u64> {
    let out = cluster
        .node
        .run_stdout(["nft", "list", "table", "ip", LOSE_TABLE])?;
    let n = out
        .split_whitespace()
        .skip_while(|w| *w != "packets")
        .nth(1)
        .and_then(|n| n.parse().ok())
        .context("no packet counter in the drop rule")?;
    Ok(n)
}

/// The correlator as the lab's clients behave: they give up on an answer after
/// [`DNS_TIMEOUT`]; finished lookups wait for the next counter reading.
fn lookup_config(args: &LabArgs) -> lookups::Config {
    let timeout = if args.dns {
        RESOLVER_TIMEOUT
    } else {
        DNS_TIMEOUT
    };
    lookups::Config {
        timeout_ns: timeout.as_nanos() as u64,
        idle_ns: 3 * timeout.as_nanos() as u64,
        hold_ns: 1_200_000_000,
        ..lookups::Config::default()
    }
}

/// How long a UDP answer may take on these veth links before it counts as lost.
const UDP_TIMEOUT: Duration = Duration::from_millis(300);
/// Longer than one SYN retransmission (1 s): a dropped SYN shows as a slow connect.
const TCP_TIMEOUT: Duration = Duration::from_millis(1500);
/// glibc and the racing client wait this long for a DNS answer.
const DNS_TIMEOUT: Duration = Duration::from_secs(2);

/// The lab's pods: namespace `ctlab`, names `client-N`, every kubelet layout in turn
/// (systemd + containerd, cgroupfs + containerd, systemd + CRI-O).
pub fn pod_specs(n: usize) -> Vec<PodSpec> {
    (0..n)
        .map(|i| {
            let name = format!("client-{i}");
            match i % 3 {
                0 => PodSpec::new(POD_NAMESPACE, &name, Layout::Systemd),
                1 => PodSpec::new(POD_NAMESPACE, &name, Layout::Cgroupfs).qos(QosClass::Burstable),
                _ => PodSpec::new(POD_NAMESPACE, &name, Layout::Systemd).runtime(Runtime::CriO),
            }
        })
        .collect()
}

/// The Kubernetes namespace of the lab's pods.
pub const POD_NAMESPACE: &str = "ctlab";

/// The tracer binary itself in pod `i`'s netns and cgroup (the lab's racing clients).
fn pod_command(
    cluster: &Cluster,
    kube: &LabPodCgroups,
    exe: &std::path::Path,
    i: usize,
) -> std::process::Command {
    let mut cmd = cluster.pods[i].command(exe);
    kube.pods()[i].enter(&mut cmd);
    cmd
}

/// The lab's resolver clients (snat-race --dns) wait this long for an answer before they
/// send the query again, like glibc with `options timeout:1`.
const RESOLVER_TIMEOUT: Duration = Duration::from_secs(1);
const RESOLVER_ATTEMPTS: u32 = 3;

/// `argv` in pod `i`'s netns and cgroup, with a time limit.
fn run_in_pod(
    cluster: &Cluster,
    kube: &LabPodCgroups,
    i: usize,
    argv: &[String],
    timeout: Duration,
) -> anyhow::Result<std::process::Output> {
    let (program, rest) = argv.split_first().context("empty command line")?;
    let mut cmd = cluster.pods[i].command(program);
    cmd.args(rest);
    kube.pods()[i].enter(&mut cmd);
    crate::netns::run_command(&mut cmd, None, timeout)
}

fn drive(
    args: &LabArgs,
    cluster: &Cluster,
    kube: &LabPodCgroups,
    fully_random: bool,
    filled: Option<u64>,
) -> anyhow::Result<Outcome> {
    let rounds = args.rounds;
    match args.scenario {
        Scenario::DnsRace => {
            let vip = std::net::SocketAddr::from((topology::DNS_VIP, 53));
            match args.client {
                DnsClient::Race => {
                    let r = client::run_race(
                        pod_command(cluster, kube, &client::client_program()?, 0),
                        vip,
                        topology::LAB_NAME,
                        rounds,
                        DNS_TIMEOUT,
                    )?;
                    Ok(Outcome {
                        did: format!("{rounds} rounds of A+AAAA sent at once by two threads on one socket to {vip}"),
                        attempts: r.queries_sent,
                        failed: r.unanswered,
                        report: serde_json::to_value(&r)?,
                    })
                }
                DnsClient::Glibc | DnsClient::Musl => {
                    let (what, argv) = match args.client {
                        DnsClient::Musl => (
                            "musl",
                            vec![
                                musl_client()?.display().to_string(),
                                topology::LAB_NAME.into(),
                            ],
                        ),
                        _ => (
                            "glibc (`getent ahosts`)",
                            vec!["getent".into(), "ahosts".into(), topology::LAB_NAME.into()],
                        ),
                    };
                    let mut failed = 0;
                    for _ in 0..rounds {
                        let out = run_in_pod(cluster, kube, 0, &argv, Duration::from_secs(12));
                        if !matches!(&out, Ok(o) if o.status.success()) {
                            failed += 1;
                        }
                    }
                    Ok(Outcome {
                        did: format!(
                            "{rounds} lookups of {} with {what} via {vip}",
                            topology::LAB_NAME
                        ),
                        attempts: u64::from(rounds),
                        failed,
                        report: serde_json::json!({ "lookups": rounds, "failed": failed }),
                    })
                }
            }
        }
        Scenario::SnatRace if args.dns => {
            let srv = cluster.server.as_ref().context("no server")?;
            let server = SocketAddr::new(IpAddr::V4(topology::SERVER_IP), 53);
            let _dns = crate::netns::Dnsmasq::start(
                srv,
                &[server.ip()],
                53,
                &[
                    (topology::LAB_NAME, IpAddr::V4(topology::LAB_A)),
                    (topology::LAB_NAME, topology::LAB_AAAA.parse()?),
                ],
            )
            .context("the DNS server behind the node")?;
            let params = client::ResolverParams {
                server,
                qname: topology::LAB_NAME.into(),
                base_port: match args.source_port {
                    SourcePort::Fixed => 40000,
                    SourcePort::Ephemeral => 0,
                },
                rounds,
                timeout: RESOLVER_TIMEOUT,
                attempts: RESOLVER_ATTEMPTS,
            };
            let exe = client::client_program()?;
            let r = client::run_resolvers(
                cluster.pods.len(),
                |i| pod_command(cluster, kube, &exe, i),
                &params,
            )?;
            Ok(Outcome {
                did: format!(
                    "{rounds} rounds: {} pods look up {} (A+AAAA in one sendmmsg, retried after {:?}) at {server} at once from {} source ports, MASQUERADE{}",
                    cluster.pods.len(),
                    topology::LAB_NAME,
                    RESOLVER_TIMEOUT,
                    if params.base_port != 0 { "the same" } else { "ephemeral" },
                    if fully_random { " fully-random" } else { "" }
                ),
                attempts: r.queries_sent,
                failed: r.lost_first_try + r.unanswered,
                report: serde_json::to_value(&r)?,
            })
        }
        Scenario::SnatRace => {
            let srv = cluster.server.as_ref().context("no server")?;
            let _server = traffic::echo_server(&srv.path(), Cluster::server_addr(), args.proto)?;
            let pods: Vec<PathBuf> = cluster.pods.iter().map(|p| p.path()).collect();
            let port = match args.source_port {
                SourcePort::Fixed => Some(40000),
                SourcePort::Ephemeral => None,
            };
            let timeout = if args.proto == Proto::Tcp {
                TCP_TIMEOUT
            } else {
                UDP_TIMEOUT
            };
            let r = traffic::snat_race(
                &pods,
                Cluster::server_addr(),
                args.proto,
                port,
                rounds,
                timeout,
            )?;
            Ok(Outcome {
                did: format!(
                    "{rounds} rounds: {} pods {} {:?} to {} at once from {} source ports, MASQUERADE{}",
                    pods.len(),
                    if args.proto == Proto::Tcp { "connect" } else { "send" },
                    args.proto,
                    Cluster::server_addr(),
                    if port.is_some() { "the same" } else { "ephemeral" },
                    if fully_random { " fully-random" } else { "" }
                ),
                attempts: r.attempts,
                failed: r.failed + r.slow,
                report: serde_json::to_value(&r)?,
            })
        }
        Scenario::TableFull | Scenario::EarlyDrop => {
            let assured = args.scenario == Scenario::TableFull;
            let filled = filled.unwrap_or(0);
            let srv = cluster.server.as_ref().context("no server")?;
            let _server = traffic::echo_server(&srv.path(), Cluster::server_addr(), Proto::Udp)?;
            let r = traffic::udp_echo_flows(
                &cluster.pods[0].path(),
                Cluster::server_addr(),
                rounds,
                UDP_TIMEOUT,
            )?;
            Ok(Outcome {
                did: format!(
                    "filled the node's table with {filled} {} entries, then {rounds} new UDP flows pod -> server",
                    if assured { "ASSURED" } else { "unassured" }
                ),
                attempts: r.attempts,
                failed: r.failed,
                report: serde_json::to_value(&r)?,
            })
        }
        Scenario::Invalid => {
            let (vip, backend) = (
                std::net::SocketAddr::from((traffic::INVALID_VIP, traffic::INVALID_VIP_PORT)),
                Cluster::server_addr(),
            );
            let srv = cluster.server.as_ref().context("no server")?;
            let r = traffic::invalid_segment(
                &cluster.pods[0].path(),
                &srv.path(),
                vip,
                backend,
                rounds,
                UDP_TIMEOUT,
            )?;
            Ok(Outcome {
                did: format!(
                    "{rounds} TCP connections pod -> {vip} (DNAT to {backend}); the backend side then sends an \
                     out-of-window segment; {} reached the pod untranslated, {} the pod answered with RST",
                    r.forged_untranslated, r.rst_from_pod
                ),
                attempts: r.rounds,
                failed: r.server_resets,
                report: serde_json::to_value(&r)?,
            })
        }
    }
}

/// The musl client, built once per source version with `musl-gcc -static` (musl-tools).
fn musl_client() -> anyhow::Result<PathBuf> {
    const SOURCE: &str = include_str!("musl_lookup.c");
    let hash = SOURCE.bytes().fold(0xcbf2_9ce4_8422_2325u64, |h, b| {
        (h ^ u64::from(b)).wrapping_mul(0x100_0000_01b3)
    });
    let bin = std::env::temp_dir().join(format!("tracer-musl-lookup-{hash:016x}"));
    if bin.is_file() {
        return Ok(bin);
    }
    let src = bin.with_extension("c");
    std::fs::write(&src, SOURCE)?;
    let partial = bin.with_extension("partial");
    let out = std::process::Command::new("musl-gcc")
        .args(["-static", "-O2", "-o"])
        .arg(&partial)
        .arg(&src)
        .output()
        .context("running musl-gcc (Debian package musl-tools; `cargo xtask setup` installs it)")?;
    let _ = std::fs::remove_file(&src);
    anyhow::ensure!(
        out.status.success(),
        "musl-gcc failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    std::fs::rename(&partial, &bin)?;
    Ok(bin)
}

/// Fills the node's conntrack table to `nf_conntrack_max` with UDP entries (`conntrack -R`).
fn fill_table(cluster: &Cluster, assured: bool) -> anyhow::Result<u64> {
    let max: u64 = std::fs::read_to_string("/proc/sys/net/netfilter/nf_conntrack_max")?
        .trim()
        .parse()?;
    anyhow::ensure!(
        max <= 2_000_000,
        "nf_conntrack_max is {max}: too large to fill in a lab run"
    );
    let path = std::env::temp_dir().join(format!("tracer-lab-fill-{}.txt", std::process::id()));
    {
        let mut f = std::io::BufWriter::new(std::fs::File::create(&path)?);
        let status = if assured { " -u ASSURED" } else { "" };
        for i in 0..max {
            writeln!(
                f,
                "-A -t 300{status} -p udp --orig-src 172.{}.{}.{} --orig-dst 10.250.0.1 --orig-port-src 1000 --orig-port-dst 2000",
                16 + ((i >> 16) & 15),
                (i >> 8) & 255,
                i & 255
            )?;
        }
    }
    let out = cluster.node.run_timeout(
        ["conntrack", "-R", &path.display().to_string()],
        Duration::from_secs(120),
    );
    let _ = std::fs::remove_file(&path);
    out.context("filling the conntrack table")?;
    Ok(max)
}

/// Prints the lab's live stream (events, findings and lookups) like `tracer watch --events`.
pub fn live_printer<W: Write + Send + 'static>(mut printer: Printer<W>) -> collect::Live {
    Box::new(move |item: Item<'_>| {
        let _ = match item {
            Item::Event { ev, workload } => printer.event_of(ev, workload.as_deref()),
            Item::Finding { finding, workload } => printer.finding_of(finding, workload.as_deref()),
            Item::Lookup(l) => printer.lookup(l),
        };
        let _ = printer.flush();
    })
}

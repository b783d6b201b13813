//! `tracer lab <scenario>`: reproduce a conntrack failure mode on purpose in throwaway
//! network namespaces, with the tracer watching, and check that every verdict it names is
//! matched by the kernel's own counters.

pub mod collect;
pub mod topology;

use std::{
    collections::BTreeMap,
    io::Write,
    path::PathBuf,
    time::{Duration, Instant},
};

use anyhow::Context as _;
use serde::Serialize;

use crate::{
    ctstats::CpuStats,
    events::Event,
    output::Printer,
    session::Options,
    traffic::{self, Proto},
    verdict::{Finding, Verdict},
};
pub use topology::{Cluster, Rules};

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
    pub tracer_lost: u64,
    pub decode_errors: u64,
    pub seconds: f64,
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
        Scenario::DnsRace => cluster.dns_service(args.rules)?,
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
    let collector = collect::Collector::start(args.session.clone(), paths, live)?;
    let outcome = drive(args, &cluster, fully_random, filled)?;
    let collected = collector.finish()?;

    let mut namespaces = Vec::new();
    let mut all_checks = Vec::new();
    for (role, ns) in cluster.namespaces() {
        let netns = ns.inode() as u32;
        let counters = collected.deltas.get(&netns).cloned().unwrap_or_default();
        let verdicts = count_verdicts(&collected.findings, netns);
        all_checks.extend(checks(&role, &counters, &verdicts));
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
        tracer_lost: collected.lost,
        decode_errors: collected.decode_errors,
        seconds: started.elapsed().as_secs_f64(),
    };
    drop(cluster);
    Ok(report)
}

/// How long a UDP answer may take on these veth links before it counts as lost.
const UDP_TIMEOUT: Duration = Duration::from_millis(300);
/// Longer than one SYN retransmission (1 s): a dropped SYN shows as a slow connect.
const TCP_TIMEOUT: Duration = Duration::from_millis(1500);
/// glibc and the racing client wait this long for a DNS answer.
const DNS_TIMEOUT: Duration = Duration::from_secs(2);

fn drive(
    args: &LabArgs,
    cluster: &Cluster,
    fully_random: bool,
    filled: Option<u64>,
) -> anyhow::Result<Outcome> {
    let rounds = args.rounds;
    match args.scenario {
        Scenario::DnsRace => {
            let vip = std::net::SocketAddr::from((topology::DNS_VIP, 53));
            match args.client {
                DnsClient::Race => {
                    let r = traffic::udp_race_named(
                        &cluster.pods[0].path(),
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
                        let out = cluster.pods[0].run_timeout(&argv, Duration::from_secs(12));
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

/// Prints the lab's live stream (events and findings) like `tracer watch`.
pub fn live_printer<W: Write + Send + 'static>(mut printer: Printer<W>) -> collect::Live {
    Box::new(move |ev: &Event, finding: Option<&Finding>| {
        let _ = printer.event(ev);
        if let Some(f) = finding {
            let _ = printer.finding(f);
        }
        let _ = printer.flush();
    })
}

//! Command-line interface (clap derive). `main.rs` only parses and dispatches.

use std::{path::PathBuf, time::Duration};

use clap::{Args, Parser, Subcommand};

use crate::{
    btf::VMLINUX_BTF,
    lab, session,
    traffic::Proto,
    view::{Filter, VerdictFilter, View},
    watch,
};

#[derive(Debug, Parser)]
#[command(
    name = "tracer",
    version,
    about = "Explains the conntrack races behind DNS timeouts and dropped connections"
)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Stream DNS queries, replies and netfilter drops as the kernel sees them.
    Watch(WatchCmd),
    /// `watch` that records a trace (`--output`) and/or a postmortem bundle (`--bundle`).
    Record(RecordCmd),
    /// Run a recorded trace through the same pipeline, offline: the same findings and
    /// lookups as the live run.
    Replay(ReplayCmd),
    /// A self-contained HTML page (and a Perfetto trace) of a trace or bundle: per-pod
    /// timelines of the lookups with their drops, retries and the time lost.
    Report(ReportCmd),
    /// Show which kernel source serves each signal on this machine, and why others were refused.
    Probes(ProbesCmd),
    /// Show the kernel struct offsets resolved from BTF.
    Offsets(KernelOpts),
    /// Reproduce a conntrack failure mode in throwaway network namespaces, with the tracer
    /// watching, and check its verdicts against the kernel's counters.
    Lab(LabCmd),
    /// Audit the node: what makes the conntrack races likely here, with evidence and the fix.
    /// Exits 1 when something needs attention.
    Doctor(DoctorCmd),
    /// Internal: a DNS client that `tracer lab` starts inside a pod's network namespace and
    /// cgroup (see `lab::client`); prints one JSON report.
    #[command(hide = true)]
    LabClient(LabClientCmd),
    /// Internal: the namespaces, DNS responder and generators of `cargo xtask bench-load`
    /// (see `lab::load`).
    #[command(hide = true)]
    LoadGen(lab::load::LoadGenCmd),
}

#[derive(Debug, Args)]
pub struct LabClientCmd {
    #[command(subcommand)]
    pub mode: LabClientMode,
}

#[derive(Debug, Subcommand)]
pub enum LabClientMode {
    /// The A/AAAA race on one socket: two pinned threads send at the same moment.
    Race(LabClientRace),
    /// One pod's resolver of the SNAT race: A+AAAA in one sendmmsg, retried on timeout.
    Resolver(LabClientResolver),
}

#[derive(Debug, Args)]
pub struct LabClientRace {
    /// DNS server address (ip:port).
    #[arg(long)]
    pub server: std::net::SocketAddr,
    #[arg(long)]
    pub qname: String,
    #[arg(long, value_parser = clap::value_parser!(u32).range(1..=i64::from(crate::traffic::MAX_ROUNDS)))]
    pub rounds: u32,
    /// How long a round waits for its answers, in microseconds.
    #[arg(long, value_parser = parse_client_timeout)]
    pub timeout_us: Duration,
}

#[derive(Debug, Args)]
pub struct LabClientResolver {
    /// DNS server address (ip:port).
    #[arg(long)]
    pub server: std::net::SocketAddr,
    #[arg(long)]
    pub qname: String,
    /// Source port of round 0 (0: ephemeral ports).
    #[arg(long)]
    pub base_port: u16,
    #[arg(long, value_parser = clap::value_parser!(u32).range(1..=i64::from(crate::traffic::MAX_ROUNDS)))]
    pub rounds: u32,
    /// How long one try waits for the answers, in microseconds.
    #[arg(long, value_parser = parse_client_timeout)]
    pub timeout_us: Duration,
    /// Tries per query.
    #[arg(long, value_parser = clap::value_parser!(u32).range(1..=i64::from(lab::client::MAX_ATTEMPTS)))]
    pub attempts: u32,
    /// The shared file made by the parent.
    #[arg(long)]
    pub sync: PathBuf,
    /// This pod's index.
    #[arg(long)]
    pub pod: usize,
    /// How many pods take part.
    #[arg(long, value_parser = clap::value_parser!(u64).range(1..=lab::client::MAX_PODS as u64))]
    pub pods: u64,
}

fn parse_client_timeout(s: &str) -> Result<Duration, String> {
    let max = crate::traffic::MAX_TIMEOUT;
    match s.parse::<u64>() {
        Ok(us) if us > 0 && Duration::from_micros(us) <= max => Ok(Duration::from_micros(us)),
        _ => Err(format!(
            "'{s}': expected microseconds from 1 to {}",
            max.as_micros()
        )),
    }
}

impl LabClientCmd {
    pub fn request(self) -> lab::client::Request {
        use lab::client::{RaceRequest, Request, ResolverParams, ResolverRequest};
        match self.mode {
            LabClientMode::Race(r) => Request::Race(RaceRequest {
                server: r.server,
                qname: r.qname,
                rounds: r.rounds,
                timeout: r.timeout_us,
            }),
            LabClientMode::Resolver(r) => Request::Resolver(ResolverRequest {
                params: ResolverParams {
                    server: r.server,
                    qname: r.qname,
                    base_port: r.base_port,
                    rounds: r.rounds,
                    timeout: r.timeout_us,
                    attempts: r.attempts,
                },
                sync: r.sync,
                pod: r.pod,
                pods: r.pods as usize,
            }),
        }
    }
}

#[derive(Debug, Args)]
pub struct DoctorCmd {
    /// Where the node's filesystem is (a container sees the node at e.g. /host).
    #[arg(long, default_value = "/")]
    pub root: PathBuf,
    /// Network namespace whose rules and sysctls to audit (/run/netns/NAME, /proc/PID/ns/net);
    /// default: this process's.
    #[arg(long)]
    pub netns: Option<PathBuf>,
    /// Audit the DNS set-up of these processes (repeatable); default: every process in
    /// another network namespace than the host's.
    #[arg(long = "pid")]
    pub pids: Vec<u32>,
    /// Skip the per-pod DNS check.
    #[arg(long, conflicts_with = "pids")]
    pub no_pods: bool,
    /// Seconds between the two samples of the conntrack entry count (0: one sample).
    #[arg(long, default_value_t = 1.0, value_parser = parse_sample)]
    pub sample: f64,
    /// JSON instead of text.
    #[arg(long)]
    pub json: bool,
}

fn parse_sample(s: &str) -> Result<f64, String> {
    match s.parse::<f64>() {
        Ok(v) if (0.0..=60.0).contains(&v) => Ok(v),
        _ => Err(format!("'{s}': expected seconds from 0 to 60")),
    }
}

impl DoctorCmd {
    pub fn options(&self) -> crate::doctor::DoctorOptions {
        use crate::doctor::PodSelection;
        crate::doctor::DoctorOptions {
            root: self.root.clone(),
            netns: self.netns.clone(),
            pods: if self.no_pods {
                PodSelection::None
            } else if self.pids.is_empty() {
                PodSelection::Auto
            } else {
                PodSelection::Pids(self.pids.clone())
            },
            sample_interval: Duration::from_secs_f64(self.sample),
            snapshot: None,
        }
    }
}

#[derive(Debug, Args)]
pub struct LabCmd {
    #[arg(value_enum)]
    pub scenario: lab::Scenario,
    /// Rounds of traffic (each loop is also bounded in time).
    #[arg(long, default_value_t = 200, value_parser = clap::value_parser!(u32).range(1..=100_000))]
    pub rounds: u32,
    /// Mitigations to apply (repeatable).
    #[arg(long, value_enum)]
    pub mitigation: Vec<lab::Mitigation>,
    /// How the node's NAT rules are written.
    #[arg(long, value_enum, default_value = "nft")]
    pub rules: lab::Rules,
    /// snat-race: transport protocol.
    #[arg(long, value_enum, default_value = "udp")]
    pub proto: Proto,
    /// snat-race: whether the pods share one source port.
    #[arg(long, value_enum, default_value = "fixed")]
    pub source_port: lab::SourcePort,
    /// dns-race: which client sends the queries.
    #[arg(long, value_enum, default_value = "race")]
    pub client: lab::DnsClient,
    /// snat-race: number of pods.
    #[arg(long, default_value_t = 3, value_parser = clap::value_parser!(u64).range(2..=16))]
    pub pods: u64,
    /// snat-race: the pods look up a name (A and AAAA in one sendmmsg, retried after a
    /// timeout like glibc) from a DNS server behind the node, instead of echo datagrams.
    #[arg(long)]
    pub dns: bool,
    /// dns-race: a rule on the node drops the first AAAA query of every lookup, so the
    /// client's real timeout and retry show (a firewall's doing, not a conntrack race).
    #[arg(long)]
    pub lose_first_aaaa: bool,
    /// JSON lines (live events and findings, then the report) instead of text.
    #[arg(long)]
    pub json: bool,
    /// Only the report, no live stream.
    #[arg(long)]
    pub quiet: bool,
    #[command(flatten)]
    pub kernel: KernelOpts,
}

impl LabCmd {
    pub fn args(&self) -> lab::LabArgs {
        lab::LabArgs {
            scenario: self.scenario,
            rounds: self.rounds,
            mitigations: self.mitigation.clone(),
            rules: self.rules,
            proto: self.proto,
            source_port: self.source_port,
            client: self.client,
            pods: self.pods as usize,
            dns: self.dns,
            lose_first_aaaa: self.lose_first_aaaa,
            session: self.kernel.session(false),
        }
    }
}

#[derive(Debug, Clone, Args)]
pub struct KernelOpts {
    /// UDP ports that carry DNS (list and ranges: 53,5353,5300-5310).
    #[arg(long, default_value = "53", value_parser = parse_ports)]
    pub ports: PortList,
    /// Kernel BTF to resolve struct offsets from.
    #[arg(long, default_value = VMLINUX_BTF)]
    pub btf: PathBuf,
    /// cgroup v2 directory the DNS programs attach to (default: the cgroup2 mount).
    #[arg(long)]
    pub cgroup: Option<PathBuf>,
    /// Do not use this kind of program (repeatable): the plan takes the next source of
    /// each signal that needs it (e.g. `--skip fexit` for the kprobes on the conntrack
    /// functions, or where BPF trampolines are unwanted).
    #[arg(long, value_enum, value_name = "KIND")]
    pub skip: Vec<crate::plan::Skip>,
    /// Size of the ring buffer every record goes through, in MiB (a power of two, 1 to
    /// 1024). Locked kernel memory; a bigger ring rides out longer bursts and reader stalls
    /// before records are lost (16 MiB holds about 64k small DNS records).
    #[arg(long, value_name = "MIB", default_value = "16", value_parser = parse_ring_size)]
    pub ring_size: u32,
}

#[derive(Debug, Args)]
pub struct WatchCmd {
    #[command(flatten)]
    pub kernel: KernelOpts,
    /// JSON lines instead of readable lines.
    #[arg(long)]
    pub json: bool,
    /// Create this file once every program is attached.
    #[arg(long)]
    pub ready_file: Option<PathBuf>,
    /// Stop after this many seconds.
    #[arg(long, value_parser = parse_duration)]
    pub duration: Option<Duration>,
    /// Serve Prometheus metrics at http://ADDR/metrics (e.g. 127.0.0.1:9464; name a
    /// non-loopback address explicitly to expose them).
    #[arg(long, value_name = "ADDR")]
    pub metrics: Option<std::net::SocketAddr>,
    /// Where the node's filesystem is mounted (`/host` in a container): cgroups, /proc,
    /// /var/log/pods and /var/lib/kubelet/pods are read under it.
    #[arg(long, default_value = "/")]
    pub root: PathBuf,
    #[command(flatten)]
    pub view: ViewOpts,
    #[command(flatten)]
    pub output: OutputOpts,
}

/// What the terminal shows (watch and replay).
#[derive(Debug, Clone, Args)]
pub struct ViewOpts {
    /// Only this Kubernetes namespace.
    #[arg(long)]
    pub namespace: Option<String>,
    /// Only this pod (`name`, `namespace/name` or a UID prefix).
    #[arg(long)]
    pub pod: Option<String>,
    /// Only lookups of this name, or of names ending in it when it starts with a dot
    /// (`.svc.cluster.local`).
    #[arg(long)]
    pub qname: Option<String>,
    /// Only lookups and findings with this verdict (a verdict name, `unanswered` or
    /// `retried`); repeat or separate with commas.
    #[arg(long = "verdict", value_delimiter = ',')]
    pub verdicts: Vec<VerdictFilter>,
    /// Also print every DNS packet and drop (text mode; JSON always has them).
    #[arg(long)]
    pub events: bool,
    /// Also print healthy lookups, one line each (lookups with a problem get a timeline).
    #[arg(long)]
    pub all_lookups: bool,
    /// Colour: auto (on a terminal), always or never.
    #[arg(long, value_enum, default_value = "auto")]
    pub color: ColorChoice,
}

impl ViewOpts {
    pub fn view(self) -> View {
        View {
            filter: Filter {
                namespace: self.namespace,
                pod: self.pod,
                qname: self.qname,
                verdicts: self.verdicts,
            },
            events: self.events,
            all_lookups: self.all_lookups,
            colour: match self.color {
                ColorChoice::Auto => None,
                ColorChoice::Always => Some(true),
                ColorChoice::Never => Some(false),
            },
        }
    }
}

/// Recording a trace (docs/trace.md).
#[derive(Debug, Clone, Args)]
pub struct OutputOpts {
    /// Record a trace (JSON lines: raw events, the node's answers, findings, lookups) to
    /// this file, for `tracer replay` and `tracer report`.
    #[arg(long, short = 'o', value_name = "FILE")]
    pub output: Option<PathBuf>,
    /// Start a new trace segment when this one reaches SIZE (e.g. 100M, 2G); the old one
    /// becomes FILE.1, FILE.1 becomes FILE.2, ...
    #[arg(long, value_name = "SIZE", value_parser = parse_size, requires = "output")]
    pub output_max_size: Option<u64>,
    /// Closed segments to keep (older ones are deleted).
    #[arg(
        long,
        value_name = "N",
        default_value_t = 4,
        requires = "output_max_size"
    )]
    pub output_keep: u32,
}

impl OutputOpts {
    pub fn trace(&self) -> Option<watch::TraceOptions> {
        self.output.as_ref().map(|p| watch::TraceOptions {
            path: p.clone(),
            rotation: crate::trace::Rotation {
                max_bytes: self.output_max_size,
                keep: self.output_keep,
            },
        })
    }
}

/// `100M`, `2G`, `4096`, `64K` (powers of 1024); at least 64 KiB.
pub fn parse_size(s: &str) -> Result<u64, String> {
    let t = s.trim();
    let (num, mult) = match t.char_indices().last() {
        Some((i, c)) if c.is_ascii_alphabetic() => {
            let m = match c.to_ascii_uppercase() {
                'K' => 1u64 << 10,
                'M' => 1 << 20,
                'G' => 1 << 30,
                _ => return Err(format!("'{s}': size units are K, M and G")),
            };
            (&t[..i], m)
        }
        _ => (t, 1),
    };
    let n: u64 = num
        .parse()
        .map_err(|_| format!("'{s}': expected a size such as 100M"))?;
    let bytes = n
        .checked_mul(mult)
        .ok_or_else(|| format!("'{s}' is too large"))?;
    if bytes < 64 << 10 {
        return Err(format!("'{s}': a trace segment must hold at least 64K"));
    }
    Ok(bytes)
}

#[derive(Debug, Args)]
pub struct RecordCmd {
    #[command(flatten)]
    pub watch: WatchCmd,
    /// Also write a postmortem bundle (.tar.gz): the trace, a pcapng, an HTML report, the
    /// conntrack statistics before and after, sysctls, rulesets, the pods' resolv.conf,
    /// the kernel and the probe plan.
    #[arg(long, value_name = "PATH")]
    pub bundle: Option<PathBuf>,
}

#[derive(Debug, Args)]
pub struct ReplayCmd {
    /// Trace files; the segments of a rotated trace oldest first (FILE.2 FILE.1 FILE).
    #[arg(required = true, value_name = "TRACE")]
    pub files: Vec<PathBuf>,
    /// JSON lines instead of readable lines.
    #[arg(long)]
    pub json: bool,
    #[command(flatten)]
    pub view: ViewOpts,
    /// Also write the DNS packets and drops as pcapng, with the pod and verdict of each
    /// packet in its comment.
    #[arg(long, value_name = "FILE")]
    pub pcapng: Option<PathBuf>,
}

#[derive(Debug, Args)]
pub struct ReportCmd {
    /// A trace (or its segments, oldest first), or a bundle from `tracer record --bundle`.
    #[arg(required = true, value_name = "TRACE|BUNDLE")]
    pub input: Vec<PathBuf>,
    /// The HTML page to write (self-contained: it fetches nothing).
    #[arg(long, short = 'o', value_name = "FILE")]
    pub output: PathBuf,
    /// Also write a Perfetto / Chrome trace-event JSON file (ui.perfetto.dev).
    #[arg(long, value_name = "FILE")]
    pub perfetto: Option<PathBuf>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum ColorChoice {
    Auto,
    Always,
    Never,
}

#[derive(Debug, Args)]
pub struct ProbesCmd {
    #[command(flatten)]
    pub kernel: KernelOpts,
    /// JSON instead of a table.
    #[arg(long)]
    pub json: bool,
}

/// A parsed `--ports` value.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PortList(pub Vec<u16>);

fn parse_port(s: &str, whole: &str) -> Result<u16, String> {
    match s.trim().parse::<u16>() {
        Ok(p) if p > 0 => Ok(p),
        _ => Err(format!(
            "invalid port '{s}' in '{whole}': expected a number from 1 to 65535"
        )),
    }
}

/// `53`, `53,5353`, `5300-5310`, or a mix; no empty items, ranges low-high.
pub fn parse_ports(s: &str) -> Result<PortList, String> {
    let mut out = Vec::new();
    for item in s.split(',') {
        if item.trim().is_empty() {
            return Err(format!("empty item in port list '{s}'"));
        }
        match item.split_once('-') {
            Some((lo, hi)) => {
                let (lo, hi) = (parse_port(lo, s)?, parse_port(hi, s)?);
                if lo > hi {
                    return Err(format!("range '{item}' in '{s}' runs backwards"));
                }
                out.extend(lo..=hi);
            }
            None => out.push(parse_port(item, s)?),
        }
    }
    out.sort_unstable();
    out.dedup();
    Ok(PortList(out))
}

/// `--ring-size`: MiB (`16`, `16M`, `16MiB`) -> bytes. The kernel takes a power-of-two
/// multiple of the page size; a power of two MiB up to 1024 is one on every page size Linux
/// has (the page size is checked too).
pub fn parse_ring_size(s: &str) -> Result<u32, String> {
    let t = s.trim();
    let num = t
        .strip_suffix("MiB")
        .or_else(|| t.strip_suffix('M'))
        .unwrap_or(t);
    let mib: u32 = num.trim().parse().map_err(|_| {
        format!("invalid ring size '{s}': expected MiB as a power of two from 1 to 1024, e.g. 16")
    })?;
    if !(1..=1024).contains(&mib) || !mib.is_power_of_two() {
        return Err(format!(
            "ring size {mib} MiB: expected a power of two from 1 to 1024 MiB (the kernel \
             takes a power-of-two multiple of the page size)"
        ));
    }
    let bytes = mib << 20;
    // SAFETY: sysconf has no preconditions.
    let page = unsafe { libc::sysconf(libc::_SC_PAGESIZE) };
    if page > 0 && !u64::from(bytes).is_multiple_of(page as u64) {
        return Err(format!(
            "ring size {mib} MiB is not a multiple of the page size ({page} bytes)"
        ));
    }
    Ok(bytes)
}

fn parse_duration(s: &str) -> Result<Duration, String> {
    let secs: f64 = s
        .parse()
        .map_err(|_| format!("invalid duration '{s}': expected seconds, e.g. 30 or 0.5"))?;
    if !(secs > 0.0 && secs < 1e9) {
        return Err(format!("duration '{s}' out of range"));
    }
    Ok(Duration::from_secs_f64(secs))
}

impl KernelOpts {
    pub fn session(&self, try_all: bool) -> session::Options {
        session::Options {
            ports: self.ports.0.clone(),
            btf_path: self.btf.clone(),
            cgroup: self.cgroup.clone(),
            try_all,
            skip: self.skip.clone(),
            ring_size: self.ring_size,
        }
    }
}

impl WatchCmd {
    pub fn into_args(self) -> watch::WatchArgs {
        watch::WatchArgs {
            session: self.kernel.session(false),
            json: self.json,
            ready_file: self.ready_file,
            duration: self.duration,
            metrics: self.metrics,
            node_root: self.root,
            trace: self.output.trace(),
            view: self.view.view(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ports() {
        assert_eq!(parse_ports("53").unwrap().0, vec![53]);
        assert_eq!(
            parse_ports("5353, 53,5300-5302").unwrap().0,
            vec![53, 5300, 5301, 5302, 5353]
        );
        assert!(parse_ports("0").unwrap_err().contains("1 to 65535"));
        assert!(parse_ports("53,").unwrap_err().contains("empty item"));
        assert!(parse_ports("70000")
            .unwrap_err()
            .contains("invalid port '70000'"));
        assert!(parse_ports("60-50").unwrap_err().contains("backwards"));
        assert!(parse_ports("dns").is_err());
    }

    #[test]
    fn cli_parses() {
        Cli::command_for_test();
        let c = Cli::try_parse_from([
            "tracer",
            "watch",
            "--ports",
            "53,5353",
            "--json",
            "--duration",
            "1.5",
        ])
        .unwrap();
        let Command::Watch(w) = c.command else {
            panic!()
        };
        assert_eq!(w.kernel.ports.0, vec![53, 5353]);
        assert_eq!(w.duration, Some(Duration::from_millis(1500)));
        assert!(Cli::try_parse_from(["tracer", "watch", "--ports", "x"]).is_err());
        assert_eq!(w.kernel.session(false).ring_size, 16 << 20);
    }

    #[test]
    fn ring_size() {
        assert_eq!(parse_ring_size("16"), Ok(16 << 20));
        assert_eq!(parse_ring_size("1"), Ok(1 << 20));
        assert_eq!(parse_ring_size("64M"), Ok(64 << 20));
        assert_eq!(parse_ring_size("1024MiB"), Ok(1 << 30));
        assert!(parse_ring_size("24").unwrap_err().contains("power of two"));
        assert!(parse_ring_size("0").unwrap_err().contains("power of two"));
        assert!(parse_ring_size("2048")
            .unwrap_err()
            .contains("power of two"));
        assert!(parse_ring_size("big")
            .unwrap_err()
            .contains("invalid ring size"));
        let c = Cli::try_parse_from(["tracer", "lab", "dns-race", "--ring-size", "64"]).unwrap();
        let Command::Lab(l) = c.command else { panic!() };
        assert_eq!(l.args().session.ring_size, 64 << 20);
        let e = Cli::try_parse_from(["tracer", "watch", "--ring-size", "3"]).unwrap_err();
        assert!(e.to_string().contains("power of two"), "{e}");
    }

    impl Cli {
        fn command_for_test() {
            use clap::CommandFactory as _;
            Cli::command().debug_assert();
        }
    }
}

//! The probe plan: for each signal an ordered list of sources, most precise first. The
//! loader tries each source's programs on the running kernel and keeps the first that
//! loads and attaches; the report says which was chosen, what was refused and why (errno),
//! and what the fallback loses.

use std::{collections::BTreeMap, fs::File, io, os::fd::AsFd as _};

use aya::{
    programs::{
        BtfTracePoint, CgroupAttachMode, CgroupSkb, CgroupSkbAttachType, FEntry, FExit, KProbe,
        ProgramError, TracePoint,
    },
    Btf, Ebpf,
};
use serde::Serialize;
use tracer_common::{KernelOffsets, OFFSET_NONE};

use crate::{modbtf::ModulePrograms, offsets::Resolved};

/// How a program attaches.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Attach {
    FEntry(&'static str),
    FExit(&'static str),
    BtfTracePoint(&'static str),
    KProbe(&'static str),
    KRetProbe(&'static str),
    CgroupSkb(CgroupDir),
    TracePoint(&'static str, &'static str),
}

/// Kinds of program the plan can be told not to use (`--skip`): a kernel where trampolines
/// or kprobes are unwanted, or to see what the next source gives.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Skip {
    Fentry,
    Fexit,
    Kprobes,
}

impl Skip {
    fn matches(self, a: Attach) -> bool {
        matches!(
            (self, a),
            (Skip::Fentry, Attach::FEntry(_))
                | (Skip::Fexit, Attach::FExit(_))
                | (Skip::Kprobes, Attach::KProbe(_) | Attach::KRetProbe(_))
        )
    }

    fn flag(self) -> &'static str {
        match self {
            Skip::Fentry => "fentry",
            Skip::Fexit => "fexit",
            Skip::Kprobes => "kprobes",
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CgroupDir {
    Egress,
    Ingress,
}

impl Attach {
    pub fn describe(&self) -> String {
        match self {
            Attach::FEntry(f) => format!("fentry/{f}"),
            Attach::FExit(f) => format!("fexit/{f}"),
            Attach::BtfTracePoint(t) => format!("tp_btf/{t}"),
            Attach::KProbe(f) => format!("kprobe/{f}"),
            Attach::KRetProbe(f) => format!("kretprobe/{f}"),
            Attach::CgroupSkb(CgroupDir::Egress) => "cgroup_skb/egress".into(),
            Attach::CgroupSkb(CgroupDir::Ingress) => "cgroup_skb/ingress".into(),
            Attach::TracePoint(c, n) => format!("tracepoint/{c}/{n}"),
        }
    }
}

/// One kernel program of the eBPF object and where it goes.
#[derive(Debug, Clone, Copy)]
pub struct Prog {
    /// Function name in `tracer-ebpf`.
    pub name: &'static str,
    pub attach: Attach,
    /// `KernelOffsets` fields the program can not work without.
    pub needs: &'static [&'static str],
}

#[derive(Debug, Clone, Copy)]
pub struct Source {
    pub name: &'static str,
    pub programs: &'static [Prog],
    /// What this source loses compared with the first source of its signal.
    pub loses: &'static str,
    /// What staying attached costs the node, from `cargo xtask bench-filter`
    /// (docs/benchmarks.md): what runs it, how often, and for how long.
    pub costs: &'static str,
}

#[derive(Debug, Clone, Copy)]
pub struct Signal {
    pub name: &'static str,
    pub what: &'static str,
    pub sources: &'static [Source],
}

const SKB_NEEDS: &[&str] = &["skb_head", "skb_network_header", "skb_len"];
const SOCK_NEEDS: &[&str] = &["sk_net", "net_inum", "sk_cookie"];

const SENDMMSG: [Prog; 2] = [
    Prog {
        name: "sendmmsg_enter",
        attach: Attach::TracePoint("syscalls", "sys_enter_sendmmsg"),
        needs: &[],
    },
    Prog {
        name: "sendmmsg_exit",
        attach: Attach::TracePoint("syscalls", "sys_exit_sendmmsg"),
        needs: &[],
    },
];

const SEND_FENTRY_NEEDS: &[&str] = &[
    "sk_net",
    "net_inum",
    "sk_cookie",
    "sk_num",
    "sk_rcv_saddr",
    "sk_daddr",
    "sk_dport",
    "sk_v6_daddr",
    "sk_v6_rcv_saddr",
    "msg_name",
    "msg_iter",
    "iter_type",
    "iter_offset",
];

pub const SIGNALS: &[Signal] = &[
    Signal {
        name: "dns-send",
        what: "UDP datagrams sent to the DNS ports: task, socket, 5-tuple, sendmmsg batch, payload",
        sources: &[
            Source {
                name: "fentry udp_sendmsg + udpv6_sendmsg",
                programs: &[
                    Prog { name: "dns_udp_sendmsg", attach: Attach::FEntry("udp_sendmsg"), needs: SEND_FENTRY_NEEDS },
                    Prog { name: "dns_udpv6_sendmsg", attach: Attach::FEntry("udpv6_sendmsg"), needs: SEND_FENTRY_NEEDS },
                    SENDMMSG[0],
                    SENDMMSG[1],
                ],
                loses: "",
                costs: "one run per UDP send call on the node (per call, not per packet; TCP and other \
                        protocols pay nothing); a send that is not DNS leaves after reading its \
                        destination port (2-3 kernel reads)",
            },
            Source {
                name: "cgroup_skb egress (cgroup v2 root)",
                programs: &[
                    Prog { name: "dns_egress", attach: Attach::CgroupSkb(CgroupDir::Egress), needs: &["task_nsproxy", "nsproxy_net_ns", "net_inum", "task_pid", "task_tgid", "task_comm"] },
                    SENDMMSG[0],
                    SENDMMSG[1],
                ],
                loses: "sees the datagram as it leaves the socket's IP output, after the sender's own \
                        netfilter OUTPUT/POSTROUTING hooks: a send refused before that (no route, \
                        a drop rule in the pod) is not seen",
                costs: "one run per packet any socket on the node sends, TCP included; a packet that is not \
                        DNS leaves after a look at its protocol and port: ~10 ns above the hook's \
                        own cost (64-78 ns per run against 55-72 ns for a program that does \
                        nothing, on a 2-vCPU VM); a DNS query ~1.2 µs. `--cgroup <kubepods \
                        cgroup>` spares the node's own traffic",
            },
        ],
    },
    Signal {
        name: "dns-receive",
        what: "UDP datagrams from the DNS ports delivered to sockets",
        sources: &[
            Source {
                name: "fentry skb_consume_udp",
                programs: &[Prog { name: "dns_skb_consume_udp", attach: Attach::FEntry("skb_consume_udp"), needs: SKB_NEEDS }],
                loses: "",
                costs: "one run per datagram a UDP socket on the node reads; one that is not from a DNS \
                        port leaves after reading its source port (3 kernel reads)",
            },
            Source {
                name: "cgroup_skb ingress (cgroup v2 root)",
                programs: &[Prog { name: "dns_ingress", attach: Attach::CgroupSkb(CgroupDir::Ingress), needs: SOCK_NEEDS }],
                loses: "runs in softirq: the receiving task is the socket's last sender (joined by \
                        socket cookie), not observed in the reader's own context",
                costs: "one run per packet delivered to any socket on the node, TCP included; as the send \
                        side: ~10 ns above the hook's own cost for a packet that is not DNS, a DNS \
                        answer ~1.2 µs. `--cgroup <kubepods cgroup>` spares the node's own traffic",
            },
        ],
    },
    Signal {
        name: "netfilter-drop",
        what: "packets netfilter drops, with the conntrack entry on the skb; conntrack insert failures and clashes",
        sources: &[
            Source {
                name: "fexit __nf_conntrack_confirm + nf_ct_resolve_clash, tp_btf kfree_skb",
                programs: &[
                    Prog { name: "nf_confirm_exit", attach: Attach::FExit("__nf_conntrack_confirm"), needs: &["skb_nfct", "ct_status", "ct_tuple_orig", "ct_tuple_reply"] },
                    Prog { name: "nf_resolve_clash_exit", attach: Attach::FExit("nf_ct_resolve_clash"), needs: &["skb_nfct", "ct_status", "ct_tuple_orig", "tuplehash_tuple"] },
                    Prog { name: "nf_kfree_skb", attach: Attach::BtfTracePoint("kfree_skb"), needs: &["drop_reason_netfilter", "skb_nfct", "skb_head", "skb_network_header", "ct_net", "net_inum"] },
                ],
                loses: "",
                costs: "fexit: one run per conntrack confirmation (the first packet of each new flow), \
                        leaving at once unless the entry was dropped; tp_btf kfree_skb: one run \
                        per skb the kernel drops, for any reason, leaving at once unless \
                        netfilter dropped it",
            },
            Source {
                name: "kprobes __nf_conntrack_confirm + nf_ct_resolve_clash, tp_btf kfree_skb",
                programs: &[
                    Prog { name: "nf_confirm_entry", attach: Attach::KProbe("__nf_conntrack_confirm"), needs: &[] },
                    Prog { name: "nf_confirm_ret", attach: Attach::KRetProbe("__nf_conntrack_confirm"), needs: &["skb_nfct", "ct_status", "ct_tuple_orig", "ct_tuple_reply"] },
                    Prog { name: "nf_clash_entry", attach: Attach::KProbe("nf_ct_resolve_clash"), needs: &[] },
                    Prog { name: "nf_clash_ret", attach: Attach::KRetProbe("nf_ct_resolve_clash"), needs: &["skb_nfct", "ct_status", "ct_tuple_orig", "tuplehash_tuple"] },
                    Prog { name: "nf_kfree_skb", attach: Attach::BtfTracePoint("kfree_skb"), needs: &["drop_reason_netfilter", "skb_nfct", "skb_head", "skb_network_header", "ct_net", "net_inum"] },
                ],
                loses: "kprobes cost more per call than fexit, and the arguments travel from entry to \
                        return per CPU (a softirq nesting into the same function between the two \
                        would mix them up)",
                costs: "kprobes: two runs (entry and return) per conntrack confirmation; tp_btf kfree_skb: \
                        one run per skb the kernel drops, for any reason, leaving at once unless \
                        netfilter dropped it",
            },
            Source {
                name: "tp_btf kfree_skb (reason NETFILTER_DROP)",
                programs: &[
                    Prog { name: "nf_kfree_skb", attach: Attach::BtfTracePoint("kfree_skb"), needs: &["drop_reason_netfilter", "skb_nfct", "skb_head", "skb_network_header", "ct_net", "net_inum"] },
                ],
                loses: "an insert failure is told apart from a rule drop only by the skb's \
                        unconfirmed conntrack entry and the conntrack counters; clashes the kernel \
                        resolved are not seen per packet, and the entry that won is not known",
                costs: "one run per skb the kernel drops, for any reason (a few ns above the tracepoint's \
                        own cost), leaving at once unless netfilter dropped it",
            },
        ],
    },
];

/// Every kernel function an fentry/fexit program of the plan attaches to.
pub fn tracing_functions() -> Vec<&'static str> {
    let mut v: Vec<&'static str> = SIGNALS
        .iter()
        .flat_map(|s| s.sources)
        .flat_map(|s| s.programs)
        .filter_map(|p| match p.attach {
            Attach::FEntry(f) | Attach::FExit(f) => Some(f),
            _ => None,
        })
        .collect();
    v.sort_unstable();
    v.dedup();
    v
}

/// What happened to one source.
#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
#[serde(tag = "status", rename_all = "snake_case")]
pub enum Outcome {
    Chosen,
    /// Loads and attaches, but a more precise source was chosen.
    Available,
    Refused(Box<Refusal>),
    NotTried,
    /// Not tried: `--skip` names a kind of program it uses.
    Skipped {
        by: String,
    },
}

/// Why a source could not be used: the program, the stage that failed and the errno.
#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
pub struct Refusal {
    pub program: String,
    pub attach: String,
    pub stage: &'static str,
    pub errno: Option<i32>,
    pub errno_name: Option<&'static str>,
    pub meaning: String,
    pub detail: String,
}

#[derive(Debug, Clone, Serialize)]
pub struct SourceReport {
    pub source: &'static str,
    #[serde(flatten)]
    pub outcome: Outcome,
    #[serde(skip_serializing_if = "str::is_empty")]
    pub loses: &'static str,
    pub costs: &'static str,
}

#[derive(Debug, Clone, Serialize)]
pub struct SignalReport {
    pub signal: &'static str,
    pub what: &'static str,
    pub chosen: Option<&'static str>,
    pub sources: Vec<SourceReport>,
}

#[derive(Debug, Clone, Serialize)]
pub struct PlanReport {
    pub signals: Vec<SignalReport>,
}

impl PlanReport {
    /// The signals no source could serve.
    pub fn unserved(&self) -> Vec<&'static str> {
        self.signals
            .iter()
            .filter(|s| s.chosen.is_none())
            .map(|s| s.signal)
            .collect()
    }

    /// Whether the chosen netfilter source sees resolved clashes per packet (its programs
    /// include one on `nf_ct_resolve_clash`).
    pub fn clashes_per_packet(&self) -> bool {
        self.signals.iter().any(|s| {
            SIGNALS
                .iter()
                .filter(|sig| sig.name == s.signal)
                .flat_map(|sig| sig.sources)
                .filter(|src| Some(src.name) == s.chosen)
                .flat_map(|src| src.programs)
                .any(|p| {
                    matches!(p.attach, Attach::FExit(f) | Attach::KRetProbe(f) if f == "nf_ct_resolve_clash")
                })
        })
    }

    /// Human-readable table for `tracer probes` and the start of `tracer watch`.
    pub fn render(&self) -> String {
        let mut out = String::new();
        let width = self
            .signals
            .iter()
            .flat_map(|s| s.sources.iter().map(|r| r.source.len()))
            .max()
            .unwrap_or(0);
        for s in &self.signals {
            out += &format!("{}: {}\n", s.signal, s.what);
            for r in &s.sources {
                let (mark, text) = match &r.outcome {
                    Outcome::Chosen => ("*", "chosen".to_string()),
                    Outcome::Available => {
                        ("+", "available (a more precise source was chosen)".into())
                    }
                    Outcome::NotTried => {
                        (" ", "not tried (a more precise source was chosen)".into())
                    }
                    Outcome::Skipped { by } => ("-", format!("skipped ({by})")),
                    Outcome::Refused(r) => {
                        let Refusal {
                            program,
                            attach,
                            stage,
                            errno,
                            errno_name,
                            meaning,
                            ..
                        } = &**r;
                        let e = match (errno, errno_name) {
                            (Some(n), Some(name)) => format!("{name} ({n})"),
                            (Some(n), None) => format!("errno {n}"),
                            _ => "error".into(),
                        };
                        (
                            "x",
                            format!("refused at {stage} of {program} ({attach}): {e}: {meaning}"),
                        )
                    }
                };
                out += &format!("  {mark} {:<width$} {text}\n", r.source);
                if matches!(r.outcome, Outcome::Chosen) {
                    if !r.loses.is_empty() {
                        out += &format!("      fallback loses: {}\n", r.loses);
                    }
                    out += &format!("      costs: {}\n", r.costs);
                }
            }
            if s.chosen.is_none() {
                out += "  ! no source serves this signal on this kernel\n";
            }
        }
        out
    }
}

/// Where cgroup programs attach, which BTF to load against, and the loader for functions
/// that live in a kernel module.
pub struct Target<'a> {
    pub btf: &'a Btf,
    pub cgroup_root: &'a File,
    pub modules: &'a ModulePrograms,
    /// The kernel's BTF as parsed for the offsets (module BTF is split on it).
    pub kernel_btf: &'a crate::btf::KernelBtf,
    /// Kinds of program not to use.
    pub skip: &'a [Skip],
}

/// Loads and attaches the plan. With `try_all`, every source is tried (for `tracer probes`)
/// and those that work after the chosen one are reported `Available`.
pub fn apply(
    ebpf: &mut Ebpf,
    target: &Target<'_>,
    resolved: &Resolved,
    try_all: bool,
) -> PlanReport {
    // A program shared by two sources (sendmmsg markers) is loaded once.
    let mut loaded: BTreeMap<&'static str, Result<(), Outcome>> = BTreeMap::new();
    let mut signals = Vec::new();
    for signal in SIGNALS {
        let mut chosen = None;
        let mut sources = Vec::new();
        for source in signal.sources {
            let skipped_by = target
                .skip
                .iter()
                .find(|k| source.programs.iter().any(|p| k.matches(p.attach)));
            let outcome = if let Some(k) = skipped_by {
                Outcome::Skipped {
                    by: format!("--skip {}", k.flag()),
                }
            } else if chosen.is_some() && !try_all {
                Outcome::NotTried
            } else {
                match try_source(
                    ebpf,
                    target,
                    &resolved.offsets,
                    source,
                    &mut loaded,
                    chosen.is_none(),
                ) {
                    Ok(()) if chosen.is_none() => {
                        chosen = Some(source.name);
                        Outcome::Chosen
                    }
                    Ok(()) => Outcome::Available,
                    Err(refused) => refused,
                }
            };
            sources.push(SourceReport {
                source: source.name,
                outcome,
                loses: source.loses,
                costs: source.costs,
            });
        }
        signals.push(SignalReport {
            signal: signal.name,
            what: signal.what,
            chosen,
            sources,
        });
    }
    PlanReport { signals }
}

fn try_source(
    ebpf: &mut Ebpf,
    target: &Target<'_>,
    offsets: &KernelOffsets,
    source: &Source,
    loaded: &mut BTreeMap<&'static str, Result<(), Outcome>>,
    keep: bool,
) -> Result<(), Outcome> {
    let mut fresh = Vec::new();
    let mut result = Ok(());
    for prog in source.programs {
        if let Some(prev) = loaded.get(prog.name) {
            if let Err(e) = prev {
                result = Err(e.clone());
                break;
            }
            continue;
        }
        let start = std::time::Instant::now();
        let r = load_and_attach(ebpf, target, offsets, prog);
        log::debug!(
            "{} ({}): {} in {:?}",
            prog.name,
            prog.attach.describe(),
            if r.is_ok() { "attached" } else { "refused" },
            start.elapsed()
        );
        loaded.insert(prog.name, r.clone());
        if let Err(e) = r {
            result = Err(e);
            break;
        }
        fresh.push(prog);
    }
    // A source that failed part-way, or one only probed, gives back what it attached.
    if result.is_err() || !keep {
        for prog in fresh {
            unload(ebpf, target, prog);
            loaded.remove(prog.name);
        }
    }
    result
}

/// Detaches and unloads one program (best effort: it was loaded by us a moment ago).
fn unload(ebpf: &mut Ebpf, target: &Target<'_>, prog: &Prog) {
    if target.modules.detach(prog.name) {
        return;
    }
    let Some(program) = ebpf.program_mut(prog.name) else {
        return;
    };
    let r = match prog.attach {
        Attach::FEntry(_) => <&mut FEntry>::try_from(program).and_then(|p| p.unload()),
        Attach::FExit(_) => <&mut FExit>::try_from(program).and_then(|p| p.unload()),
        Attach::BtfTracePoint(_) => {
            <&mut BtfTracePoint>::try_from(program).and_then(|p| p.unload())
        }
        Attach::TracePoint(..) => <&mut TracePoint>::try_from(program).and_then(|p| p.unload()),
        Attach::KProbe(_) | Attach::KRetProbe(_) => {
            <&mut KProbe>::try_from(program).and_then(|p| p.unload())
        }
        Attach::CgroupSkb(_) => <&mut CgroupSkb>::try_from(program).and_then(|p| p.unload()),
    };
    if let Err(e) = r {
        log::warn!("unloading {}: {e}", prog.name);
    }
}

fn refused(prog: &Prog, stage: &'static str, err: &(dyn std::error::Error + 'static)) -> Outcome {
    let errno = errno_of(err);
    let no_kprobes = matches!(prog.attach, Attach::KProbe(_) | Attach::KRetProbe(_))
        && !std::path::Path::new("/sys/bus/event_source/devices/kprobe").exists();
    // aya looked the function up in vmlinux's BTF only after `/proc/kallsyms` placed it in
    // no module: it is in neither.
    let no_function = matches!(
        err.downcast_ref::<ProgramError>(),
        Some(ProgramError::Btf(aya::BtfError::UnknownBtfTypeName { .. }))
    );
    Outcome::Refused(Box::new(Refusal {
        program: prog.name.to_string(),
        attach: prog.attach.describe(),
        stage,
        errno,
        errno_name: errno.and_then(errno_name),
        meaning: if no_kprobes {
            "this kernel has no kprobes (CONFIG_KPROBES=n: no kprobe event source in sysfs)".into()
        } else if no_function {
            "no such function in vmlinux's BTF nor in a loaded module (for the conntrack \
             functions: nf_conntrack is not loaded yet; it is on any node running kube-proxy)"
                .into()
        } else {
            errno.map(meaning).unwrap_or_else(|| "see detail".into())
        },
        detail: error_chain(err),
    }))
}

fn missing_offsets(prog: &Prog, offsets: &KernelOffsets) -> Option<Outcome> {
    let missing: Vec<&str> = prog
        .needs
        .iter()
        .copied()
        .filter(|f| crate::offsets::field_value(offsets, f).is_none_or(|v| v == OFFSET_NONE))
        .collect();
    (!missing.is_empty()).then(|| {
        Outcome::Refused(Box::new(Refusal {
            program: prog.name.to_string(),
            attach: prog.attach.describe(),
            stage: "btf",
            errno: None,
            errno_name: None,
            meaning: format!("this kernel's BTF lacks {}", missing.join(", ")),
            detail: String::new(),
        }))
    })
}

fn load_and_attach(
    ebpf: &mut Ebpf,
    target: &Target<'_>,
    offsets: &KernelOffsets,
    prog: &Prog,
) -> Result<(), Outcome> {
    if let Some(o) = missing_offsets(prog, offsets) {
        return Err(o);
    }
    // A function in a module (nf_conntrack on most distributions) is described by the
    // module's BTF, which aya can not attach through: see `modbtf`.
    if let Attach::FEntry(f) | Attach::FExit(f) = prog.attach {
        if let Some(module) = target.modules.module_for(f) {
            return target
                .modules
                .attach(prog.name, f, &module, target.kernel_btf)
                .map_err(|e| refused(prog, e.stage, &e));
        }
    }
    let program = ebpf.program_mut(prog.name).ok_or_else(|| {
        Outcome::Refused(Box::new(Refusal {
            program: prog.name.to_string(),
            attach: prog.attach.describe(),
            stage: "object",
            errno: None,
            errno_name: None,
            meaning: "program missing from the eBPF object (build mismatch)".into(),
            detail: String::new(),
        }))
    })?;
    let wrong_type = |e: ProgramError| refused(prog, "object", &e);
    macro_rules! la {
        ($ty:ty, $load:expr, $attach:expr) => {{
            let p: &mut $ty = program.try_into().map_err(wrong_type)?;
            #[allow(clippy::redundant_closure_call)]
            ($load)(&mut *p).map_err(|e: ProgramError| refused(prog, "load", &e))?;
            #[allow(clippy::redundant_closure_call)]
            ($attach)(&mut *p).map_err(|e: ProgramError| refused(prog, "attach", &e))?;
        }};
    }
    match prog.attach {
        Attach::FEntry(f) => la!(
            FEntry,
            |p: &mut FEntry| p.load(f, target.btf),
            |p: &mut FEntry| p.attach().map(drop)
        ),
        Attach::FExit(f) => la!(
            FExit,
            |p: &mut FExit| p.load(f, target.btf),
            |p: &mut FExit| p.attach().map(drop)
        ),
        Attach::BtfTracePoint(t) => la!(
            BtfTracePoint,
            |p: &mut BtfTracePoint| p.load(t, target.btf),
            |p: &mut BtfTracePoint| p.attach().map(drop)
        ),
        Attach::TracePoint(c, n) => la!(
            TracePoint,
            |p: &mut TracePoint| p.load(),
            |p: &mut TracePoint| p.attach(c, n).map(drop)
        ),
        // The program's section (kprobe or kretprobe) decides which it is.
        Attach::KProbe(f) | Attach::KRetProbe(f) => {
            la!(KProbe, |p: &mut KProbe| p.load(), |p: &mut KProbe| p
                .attach(f, 0)
                .map(drop))
        }
        Attach::CgroupSkb(dir) => {
            // With bpf_link (5.7+) cgroup programs always coexist with others; the
            // "multi" flag is only for the legacy attach and makes link_create fail.
            let ty = match dir {
                CgroupDir::Egress => CgroupSkbAttachType::Egress,
                CgroupDir::Ingress => CgroupSkbAttachType::Ingress,
            };
            la!(
                CgroupSkb,
                |p: &mut CgroupSkb| p.load(),
                |p: &mut CgroupSkb| p
                    .attach(target.cgroup_root.as_fd(), ty, CgroupAttachMode::Single)
                    .map(drop)
            )
        }
    }
    Ok(())
}

/// The first errno found along an error's source chain.
pub fn errno_of(err: &(dyn std::error::Error + 'static)) -> Option<i32> {
    let mut cur: Option<&(dyn std::error::Error + 'static)> = Some(err);
    while let Some(e) = cur {
        if let Some(io) = e.downcast_ref::<io::Error>() {
            if let Some(n) = io.raw_os_error() {
                return Some(n);
            }
        }
        if let Some(ProgramError::LoadError { io_error, .. }) = e.downcast_ref::<ProgramError>() {
            return io_error.raw_os_error();
        }
        if let Some(ProgramError::SyscallError(s)) = e.downcast_ref::<ProgramError>() {
            return s.io_error.raw_os_error();
        }
        cur = e.source();
    }
    None
}

fn error_chain(err: &dyn std::error::Error) -> String {
    let mut s = err.to_string();
    let mut cur = err.source();
    while let Some(e) = cur {
        let t = e.to_string();
        if !s.contains(&t) {
            s += ": ";
            s += &t;
        }
        cur = e.source();
    }
    // Verifier logs are long; the reason for a rejection is at their end.
    const HEAD: usize = 300;
    const TAIL: usize = 1700;
    if s.len() > HEAD + TAIL {
        let head_end = (0..=HEAD)
            .rev()
            .find(|&i| s.is_char_boundary(i))
            .unwrap_or(0);
        let tail_start = (s.len() - TAIL..s.len())
            .find(|&i| s.is_char_boundary(i))
            .unwrap_or(s.len());
        s = format!("{} … {}", &s[..head_end], &s[tail_start..]);
    }
    s
}

pub fn errno_name(n: i32) -> Option<&'static str> {
    Some(match n {
        libc::EPERM => "EPERM",
        libc::ENOENT => "ENOENT",
        libc::ESRCH => "ESRCH",
        libc::E2BIG => "E2BIG",
        libc::EACCES => "EACCES",
        libc::EBUSY => "EBUSY",
        libc::EEXIST => "EEXIST",
        libc::EINVAL => "EINVAL",
        libc::EOPNOTSUPP => "EOPNOTSUPP",
        524 => "ENOTSUPP",
        _ => return None,
    })
}

/// What an errno from loading or attaching a program means for the user.
pub fn meaning(n: i32) -> String {
    match n {
        libc::EPERM => "the kernel refused the program: this kernel does not allow this program type \
                        (e.g. BPF trampolines blocked by lockdown) or the process lacks CAP_BPF/CAP_PERFMON"
            .into(),
        libc::ENOENT | libc::ESRCH => "the kernel has no such function or tracepoint (renamed, inlined, or in a module)".into(),
        libc::EACCES => "the verifier rejected the program on this kernel".into(),
        libc::EINVAL => "the kernel rejected the program or its attach type (too old, or not supported here)".into(),
        libc::E2BIG => "the program is too large for this kernel's verifier".into(),
        libc::EBUSY => "the attach point is busy".into(),
        libc::EOPNOTSUPP | 524 => "the kernel does not support this attach type on this architecture or configuration".into(),
        _ => io::Error::from_raw_os_error(n).to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_source_says_what_it_costs() {
        for s in SIGNALS {
            for src in s.sources {
                assert!(
                    src.costs.contains("one run per") || src.costs.contains("runs per"),
                    "{} / {} does not say what runs it and how often",
                    s.name,
                    src.name
                );
            }
        }
    }

    #[test]
    fn every_signal_has_a_fallback_that_explains_its_loss() {
        for s in SIGNALS {
            assert!(s.sources.len() >= 2, "{} has no fallback", s.name);
            assert!(s.sources[0].loses.is_empty());
            for src in &s.sources[1..] {
                assert!(
                    !src.loses.is_empty(),
                    "{} / {} does not say what it loses",
                    s.name,
                    src.name
                );
            }
        }
    }

    #[test]
    fn clashes_are_seen_per_packet_by_the_fexit_and_kprobe_sources_only() {
        let netfilter = SIGNALS.iter().find(|s| s.name == "netfilter-drop").unwrap();
        let with = |chosen: &'static str| PlanReport {
            signals: vec![SignalReport {
                signal: netfilter.name,
                what: netfilter.what,
                chosen: Some(chosen),
                sources: vec![],
            }],
        };
        let names: Vec<bool> = netfilter
            .sources
            .iter()
            .map(|s| with(s.name).clashes_per_packet())
            .collect();
        assert_eq!(names, [true, true, false], "fexit, kprobes, tp_btf");
    }

    #[test]
    fn skip_names_the_kinds_of_program_it_keeps_out() {
        let kinds = |a: Attach| {
            [Skip::Fentry, Skip::Fexit, Skip::Kprobes]
                .into_iter()
                .filter(|k| k.matches(a))
                .map(Skip::flag)
                .collect::<Vec<_>>()
        };
        assert_eq!(kinds(Attach::FEntry("udp_sendmsg")), ["fentry"]);
        assert_eq!(kinds(Attach::FExit("nf_ct_resolve_clash")), ["fexit"]);
        assert_eq!(kinds(Attach::KRetProbe("nf_ct_resolve_clash")), ["kprobes"]);
        assert!(kinds(Attach::BtfTracePoint("kfree_skb")).is_empty());
        assert!(kinds(Attach::CgroupSkb(CgroupDir::Egress)).is_empty());
        let skipped = PlanReport {
            signals: vec![SignalReport {
                signal: "netfilter-drop",
                what: "",
                chosen: None,
                sources: vec![SourceReport {
                    source: "fexit x",
                    outcome: Outcome::Skipped {
                        by: "--skip fexit".into(),
                    },
                    loses: "",
                    costs: "",
                }],
            }],
        };
        assert!(skipped
            .render()
            .contains("- fexit x skipped (--skip fexit)"));
        assert_eq!(
            serde_json::to_value(&skipped.signals[0].sources[0]).unwrap()["status"],
            "skipped"
        );
    }

    #[test]
    fn needs_name_real_offset_fields() {
        for s in SIGNALS {
            for src in s.sources {
                for p in src.programs {
                    for f in p.needs {
                        assert!(
                            crate::offsets::field_value(&KernelOffsets::NONE, f).is_some(),
                            "{} needs unknown field {f}",
                            p.name
                        );
                    }
                }
            }
        }
    }

    #[test]
    fn errno_is_found_through_the_chain() {
        let e = ProgramError::SyscallError(aya::sys::SyscallError {
            call: "bpf_prog_load",
            io_error: io::Error::from_raw_os_error(libc::EPERM),
        });
        assert_eq!(errno_of(&e), Some(libc::EPERM));
        assert_eq!(errno_name(libc::EPERM), Some("EPERM"));
    }
}

//! `tracer watch`: stream what the kernel saw until Ctrl-C, SIGTERM or `--duration`.

use std::{
    collections::BTreeMap,
    io::{self, Write},
    path::PathBuf,
    time::Duration,
};

use anyhow::Context as _;
use aya::maps::{MapData, RingBuf};
use serde_json::json;
use tokio::{
    io::{unix::AsyncFd, Interest},
    signal::unix::{signal, SignalKind},
};

use crate::{
    events::{self, Event},
    explain::Explainer,
    kallsyms::Symbols,
    metrics::Metrics,
    output::{monotonic_ns, Clock, Printer},
    session::{check_writable_parent, Options, Session},
    verdict::Finding,
};

#[derive(Debug, Clone)]
pub struct WatchArgs {
    pub session: Options,
    pub json: bool,
    pub ready_file: Option<PathBuf>,
    pub duration: Option<Duration>,
    /// Serve Prometheus metrics here.
    pub metrics: Option<std::net::SocketAddr>,
}

/// What a watch run saw, for the summary.
#[derive(Default, Clone)]
pub struct Counts {
    pub by_kind: BTreeMap<&'static str, u64>,
    pub verdicts: BTreeMap<&'static str, u64>,
    pub decode_errors: u64,
    /// The same numbers for Prometheus, when `--metrics` is given.
    pub metrics: Option<Metrics>,
}

impl Counts {
    pub fn total(&self) -> u64 {
        self.by_kind.values().sum()
    }
}

fn kind_name(ev: &Event) -> &'static str {
    match ev {
        Event::DnsSend(_) => "dns_send",
        Event::DnsRecv(_) => "dns_recv",
        Event::NfDrop(_) => "nf_drop",
        Event::CtClash(_) => "ct_clash",
    }
}

/// Writes to stdout; a closed pipe (`tracer watch | head`) ends the run quietly.
fn is_broken_pipe(e: &io::Error) -> bool {
    e.kind() == io::ErrorKind::BrokenPipe
}

pub async fn run(args: WatchArgs) -> anyhow::Result<()> {
    if let Some(p) = &args.ready_file {
        check_writable_parent(p)?;
    }
    let mut session = Session::start(&args.session)?;
    eprint!("{}", session.plan.render());
    let unserved = session.plan.unserved();
    anyhow::ensure!(
        unserved.len() < session.plan.signals.len(),
        "no signal could be attached on this kernel (see the plan above)"
    );
    if !unserved.is_empty() {
        eprintln!(
            "warning: not observed on this kernel: {}",
            unserved.join(", ")
        );
    }

    let ring = session.take_events()?;
    // SAFETY: the ring buffer and the logger own their map file descriptors, which stay
    // open and unchanged until the AsyncFd (which owns them) is dropped.
    let mut ring = unsafe { AsyncFd::register_with_interest(ring, Interest::READABLE) }
        .map_err(io::Error::from)
        .context("polling the ring buffer")?;
    let mut logger = match session.logger.take() {
        // SAFETY: as above.
        Some(l) => Some(
            unsafe { AsyncFd::register_with_interest(l, Interest::READABLE) }
                .map_err(io::Error::from)
                .context("polling the kernel log")?,
        ),
        None => None,
    };

    let mut sigint = signal(SignalKind::interrupt())?;
    let mut sigterm = signal(SignalKind::terminate())?;
    if let Some(p) = &args.ready_file {
        std::fs::write(p, b"ready\n")
            .with_context(|| format!("writing ready file {}", p.display()))?;
    }
    eprintln!("watching (ports {:?}); Ctrl-C to stop", args.session.ports);

    let stdout = io::stdout();
    let mut printer = Printer::new(
        io::BufWriter::new(stdout.lock()),
        args.json,
        Clock::now(),
        Symbols::new("/proc/kallsyms"),
    );
    let mut counts = Counts::default();
    let _metrics_server = match args.metrics {
        Some(addr) => {
            let m = Metrics::new();
            let server = crate::metrics::spawn_blocking_server(addr, m.clone())
                .with_context(|| format!("serving metrics on {addr}"))?;
            eprintln!("metrics on http://{}/metrics", server.local_addr());
            counts.metrics = Some(m);
            Some(server)
        }
        None => None,
    };
    let mut explainer = Explainer::start();
    let mut poll = tokio::time::interval(POLL_EVERY);
    let deadline = async {
        match args.duration {
            Some(d) => tokio::time::sleep(d).await,
            None => std::future::pending().await,
        }
    };
    tokio::pin!(deadline);

    let mut stop = false;
    while !stop {
        tokio::select! {
            guard = ring.readable_mut() => {
                let mut guard = guard?;
                if drain(guard.get_inner_mut(), &mut printer, &mut counts, &mut explainer)? {
                    stop = true;
                }
                guard.clear_ready();
            }
            Some(guard) = async {
                match logger.as_mut() {
                    Some(l) => Some(l.readable_mut().await),
                    None => std::future::pending().await,
                }
            } => {
                let mut guard = guard?;
                guard.get_inner_mut().flush();
                guard.clear_ready();
            }
            _ = poll.tick() => {
                if let Some(m) = &counts.metrics {
                    m.set_lost(session.lost_per_cpu()?.iter().sum());
                }
                let findings = explainer.poll(monotonic_ns());
                if let Some(m) = &counts.metrics {
                    for (netns, stats) in explainer.readings() {
                        m.set_conntrack(netns, &stats);
                    }
                }
                if emit_findings(&mut printer, &mut counts, &findings)? {
                    stop = true;
                }
            }
            _ = sigint.recv() => stop = true,
            _ = sigterm.recv() => stop = true,
            _ = &mut deadline => stop = true,
        }
    }
    // What the kernel wrote before we stopped still counts.
    let _ = drain(ring.get_mut(), &mut printer, &mut counts, &mut explainer)?;
    let findings = explainer.poll(monotonic_ns());
    let _ = emit_findings(&mut printer, &mut counts, &findings)?;
    let lost = session.lost_per_cpu()?;
    let lost_total: u64 = lost.iter().sum();
    let summary = json!({
        "events": counts.total(),
        "by_kind": counts.by_kind,
        "verdicts": counts.verdicts,
        "lost": lost_total,
        "lost_per_cpu": lost,
        "decode_errors": counts.decode_errors,
    });
    match printer
        .note("summary", summary)
        .and_then(|_| printer.flush())
    {
        Err(e) if !is_broken_pipe(&e) => return Err(e.into()),
        _ => {}
    }
    eprintln!(
        "seen {} events ({}), lost {} (per CPU: {}), undecodable {}",
        counts.total(),
        counts
            .by_kind
            .iter()
            .map(|(k, v)| format!("{k} {v}"))
            .collect::<Vec<_>>()
            .join(", "),
        lost_total,
        lost.iter()
            .enumerate()
            .map(|(c, v)| format!("cpu{c} {v}"))
            .collect::<Vec<_>>()
            .join(", "),
        counts.decode_errors,
    );
    Ok(())
}

/// How often the conntrack counters are read for findings that drop no packet.
const POLL_EVERY: Duration = Duration::from_secs(1);

/// Prints findings; `true` when stdout is gone.
fn emit_findings<W: Write>(
    printer: &mut Printer<W>,
    counts: &mut Counts,
    findings: &[Finding],
) -> anyhow::Result<bool> {
    for f in findings {
        *counts.verdicts.entry(f.verdict.name()).or_default() += f.count;
        if let Some(m) = &counts.metrics {
            m.on_finding(f);
        }
        match printer.finding(f) {
            Ok(()) => {}
            Err(e) if is_broken_pipe(&e) => return Ok(true),
            Err(e) => return Err(e.into()),
        }
    }
    Ok(false)
}

/// Reads every pending record. Returns `true` when stdout is gone (stop quietly).
fn drain<W: Write>(
    ring: &mut RingBuf<MapData>,
    printer: &mut Printer<W>,
    counts: &mut Counts,
    explainer: &mut Explainer,
) -> anyhow::Result<bool> {
    while let Some(item) = ring.next() {
        let r = match events::decode(&item) {
            Ok(ev) => {
                *counts.by_kind.entry(kind_name(&ev)).or_default() += 1;
                if let Some(m) = &counts.metrics {
                    m.on_event(&ev);
                }
                let printed = printer.event(&ev);
                let finding = match (&printed, &ev) {
                    (Ok(()), Event::NfDrop(d)) => {
                        let sym = printer.symbolize(d.location);
                        explainer.drop_event(d, &sym)
                    }
                    (Ok(()), Event::CtClash(c)) => explainer.clash_event(c),
                    _ => None,
                };
                if let Some(f) = finding {
                    if emit_findings(printer, counts, std::slice::from_ref(&f))? {
                        return Ok(true);
                    }
                }
                printed
            }
            Err(e) => {
                counts.decode_errors += 1;
                printer.note(
                    "decode_error",
                    json!({ "error": e.to_string(), "len": item.len() }),
                )
            }
        };
        match r {
            Ok(()) => {}
            Err(e) if is_broken_pipe(&e) => return Ok(true),
            Err(e) => return Err(e.into()),
        }
    }
    match printer.flush() {
        Ok(()) => Ok(false),
        Err(e) if is_broken_pipe(&e) => Ok(true),
        Err(e) => Err(e.into()),
    }
}

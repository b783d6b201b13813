//! `tracer watch`: stream what the kernel saw until Ctrl-C, SIGTERM or `--duration`.

use std::{
    collections::BTreeMap,
    io::{self, IsTerminal as _, Write},
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
    events::Event,
    kallsyms::Symbols,
    lookups,
    metrics::Metrics,
    node::LiveNode,
    node::Node,
    output::{monotonic_ns, Clock, Printer, Style},
    pipeline::{Item, Pipeline},
    pods::{NodePaths, PodIndex},
    session::{check_writable_parent, Options, Session},
    trace::{self, Line, TraceOut},
    view::{Summary, View},
};

#[derive(Debug, Clone)]
pub struct WatchArgs {
    pub session: Options,
    pub json: bool,
    pub ready_file: Option<PathBuf>,
    pub duration: Option<Duration>,
    /// Serve Prometheus metrics here.
    pub metrics: Option<std::net::SocketAddr>,
    /// Where the node's filesystem is (`/`, or `/host` in a container).
    pub node_root: PathBuf,
    pub view: View,
    /// Record a trace here (`--output`).
    pub trace: Option<TraceOptions>,
}

#[derive(Debug, Clone)]
pub struct TraceOptions {
    pub path: PathBuf,
    pub rotation: trace::Rotation,
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
    if let Some(t) = &args.trace {
        trace::check_path(&t.path)?;
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

    // Before the ready file: the first drop must not wait for kallsyms to be parsed.
    let symbols = Symbols::new("/proc/kallsyms");
    symbols.load();
    let mut sigint = signal(SignalKind::interrupt())?;
    let mut sigterm = signal(SignalKind::terminate())?;
    if let Some(p) = &args.ready_file {
        std::fs::write(p, b"ready\n")
            .with_context(|| format!("writing ready file {}", p.display()))?;
    }
    eprintln!("watching (ports {:?}); Ctrl-C to stop", args.session.ports);

    let clock = Clock::now();
    let mut recorder = match &args.trace {
        Some(t) => Some(Recorder::create(t, &session, &args, clock, &symbols)?),
        None => None,
    };
    let stdout = io::stdout();
    let style = Style {
        colour: args.view.colour.unwrap_or_else(|| stdout.is_terminal()),
    };
    let mut printer = Printer::new(
        io::BufWriter::new(stdout.lock()),
        args.json,
        clock,
        symbols.clone(),
    )
    .with_style(style);
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
    let pods = PodIndex::new(NodePaths::for_root(&args.node_root)?);
    let cfg = lookup_config();
    let live: Box<dyn Node> = Box::new(LiveNode::new(symbols, pods));
    let node: Box<dyn Node> = match &recorder {
        Some(r) => Box::new(trace::Recording::new(live, r.shared.clone())),
        None => live,
    };
    let mut pipeline = Pipeline::new(node, cfg);
    pipeline
        .explainer
        .expect_clashes_per_packet(session.plan.clashes_per_packet());
    if let Some(r) = recorder.as_mut() {
        r.settle(&pipeline, true)?;
    }
    let mut show = Show {
        printer: &mut printer,
        counts: &mut counts,
        view: &args.view,
        summary: Summary::default(),
        shed_warned: false,
        recorder,
    };
    let mut poll = tokio::time::interval(POLL_EVERY);
    let mut sweep = tokio::time::interval(SWEEP_EVERY);
    let deadline = async {
        match args.duration {
            Some(d) => tokio::time::sleep(d).await,
            None => std::future::pending().await,
        }
    };
    tokio::pin!(deadline);

    let mut losses = Losses::new(&session, &show)?;
    let mut stop = false;
    // The last drain stopped at its slice with records still queued: the kernel does not
    // wake a reader that has not caught up, so the loop drains again right away (between
    // the other branches, which stay served).
    let mut behind = false;
    while !stop {
        tokio::select! {
            guard = ring.readable_mut(), if !behind => {
                let mut guard = guard?;
                // Clear first, then drain: the kernel wakes the reader only for a record
                // submitted while the reader had caught up, so a record that arrives after
                // the drain wakes us again, and one that arrives during it is read by it.
                // (Draining first and clearing after loses the wake-up of a record that
                // lands in between, and then every later one.)
                guard.clear_ready();
                let d = drain(guard.get_inner_mut(), &mut pipeline, &mut show, Budget::Slice)?;
                behind = d.more;
                if d.gone || losses.read(&session, &mut pipeline, &mut show, false)? {
                    stop = true;
                }
            }
            // Yields to the runtime first: a branch that is always ready would keep this
            // task from ever returning to tokio's scheduler, which then never drives its
            // timers and signals (the counter poll, the sweep, Ctrl-C) while the consumer
            // stays behind: under a sustained load that starved the polls for up to 10 s
            // (finished lookups piled up in their hold, to ~600 MB) and delayed the stop.
            _ = tokio::task::yield_now(), if behind => {
                let d = drain(ring.get_mut(), &mut pipeline, &mut show, Budget::Slice)?;
                behind = d.more;
                if d.gone || losses.read(&session, &mut pipeline, &mut show, false)? {
                    stop = true;
                }
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
            _ = sweep.tick() => {
                // A safety net for the wake-ups: whatever is in the ring is read within
                // SWEEP_EVERY, so a drop is explained while its network namespace exists.
                let d = drain(ring.get_mut(), &mut pipeline, &mut show, Budget::Slice)?;
                behind = d.more;
                if d.gone || losses.read(&session, &mut pipeline, &mut show, false)? {
                    stop = true;
                }
            }
            _ = poll.tick() => {
                // Records first, so the counter reading comes after the drops it covers:
                // every record stamped before now (a consumer behind reads the rest after).
                let now = monotonic_ns();
                let d = drain(ring.get_mut(), &mut pipeline, &mut show, Budget::Through(now))?;
                behind = d.more;
                if d.gone || losses.read(&session, &mut pipeline, &mut show, true)? {
                    stop = true;
                }
                let now = monotonic_ns();
                if let Some(rec) = show.recorder.as_mut() {
                    rec.line(&Line::Poll { now_ns: now });
                }
                let r = pipeline.poll(now, &mut |item| show.item(item));
                if let Some(rec) = show.recorder.as_mut() {
                    rec.settle(&pipeline, true)?;
                }
                if let Some(m) = &show.counts.metrics {
                    for (netns, stats) in pipeline.explainer.readings() {
                        m.set_conntrack(netns, &stats);
                    }
                }
                if quiet_stop(r)? {
                    stop = true;
                }
            }
            _ = sigint.recv() => stop = true,
            _ = sigterm.recv() => stop = true,
            _ = &mut deadline => stop = true,
        }
    }
    // What the kernel wrote before we stopped still counts, as much of it as can be read
    // within FINAL_DRAIN; the rest is skipped, counted and treated as lost.
    let stopped = std::time::Instant::now();
    let skipped = drain(
        ring.get_mut(),
        &mut pipeline,
        &mut show,
        Budget::Until(stopped + FINAL_DRAIN),
    )?
    .skipped;
    losses.skipped = skipped;
    let _ = losses.read(&session, &mut pipeline, &mut show, true)?;
    losses.report_burst();
    let lost = losses.total_per_cpu();
    let lost_total: u64 = lost.iter().sum::<u64>() + skipped;
    let now = monotonic_ns();
    if let Some(rec) = show.recorder.as_mut() {
        rec.line(&Line::Finish {
            now_ns: now,
            lost: lost_total,
            lost_per_cpu: lost.clone(),
        });
    }
    let r = pipeline.finish(now, &mut |item| show.item(item));
    let _ = quiet_stop(r)?;
    let stats = pipeline.correlator.stats.clone();
    let Show {
        printer,
        summary,
        counts,
        recorder,
        ..
    } = show;
    // Records skipped at the stop are in `lookups.lost_records` (they made lookups
    // incomplete, in the trace's `loss` line too), and in the stderr line below.
    let summary_json = summary_json(counts, &summary, &stats, &lost);
    if let Some(mut rec) = recorder {
        rec.out.note("summary", summary_json.clone())?;
        let path = rec.path();
        rec.close()
            .with_context(|| format!("closing trace {}", path.display()))?;
        eprintln!("trace written to {}", path.display());
    }
    print_summary(printer, summary_json, &summary, &stats, args.json, style)?;
    if skipped > 0 {
        eprintln!(
            "warning: {skipped} records still queued at the stop were not processed within \
             {FINAL_DRAIN:?} (counted as lost; the lookups they may belong to are `incomplete`)"
        );
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

/// How often the ring is read even without a wake-up.
const SWEEP_EVERY: Duration = Duration::from_millis(50);

/// How long the records still queued at a stop are processed; the rest are counted.
const FINAL_DRAIN: Duration = Duration::from_millis(1000);

/// The loss counters are read after a drain at most this often (and at every poll).
const LOSS_READ_EVERY: Duration = Duration::from_millis(10);

/// While losses go on, at most one line a second says so on stderr.
const LOSS_LINE_EVERY: Duration = Duration::from_secs(1);

/// How often the conntrack counters are read for findings that drop no packet.
const POLL_EVERY: Duration = Duration::from_secs(1);

/// Finished lookups are held this long for the next counter reading (see
/// `lookups::Config::hold_ns`): a little more than [`POLL_EVERY`].
const HOLD: Duration = Duration::from_millis(1200);

/// The summary object, as `--json` prints it last.
pub(crate) fn summary_json(
    counts: &Counts,
    summary: &Summary,
    stats: &lookups::Stats,
    lost_per_cpu: &[u64],
) -> serde_json::Value {
    json!({
        "events": counts.total(),
        "by_kind": counts.by_kind,
        "verdicts": counts.verdicts,
        "lost": lost_per_cpu.iter().sum::<u64>(),
        "lost_per_cpu": lost_per_cpu,
        "decode_errors": counts.decode_errors,
        "lookups": stats,
        "lookup_outcomes": summary.outcomes,
        "pods": summary.pods,
    })
}

/// The summary on stdout: the JSON object, or the per-pod table.
pub(crate) fn print_summary<W: Write>(
    printer: &mut Printer<W>,
    summary_json: serde_json::Value,
    summary: &Summary,
    stats: &lookups::Stats,
    json: bool,
    style: Style,
) -> anyhow::Result<()> {
    match printer
        .note("summary", summary_json)
        .and_then(|_| {
            if json {
                Ok(())
            } else {
                printer.raw(&summary.render(stats, style))
            }
        })
        .and_then(|_| printer.flush())
    {
        Err(e) if !is_broken_pipe(&e) => Err(e.into()),
        _ => Ok(()),
    }
}

/// The correlator's settings for a live run.
fn lookup_config() -> lookups::Config {
    lookups::Config {
        hold_ns: HOLD.as_nanos() as u64,
        // Every drain is followed by a reading of the loss counters (`Losses`).
        loss_gate: true,
        ..lookups::Config::default()
    }
}

/// `Ok(true)` when stdout is gone (stop quietly).
fn quiet_stop(r: io::Result<()>) -> anyhow::Result<bool> {
    match r {
        Ok(()) => Ok(false),
        Err(e) if is_broken_pipe(&e) => Ok(true),
        Err(e) => Err(e.into()),
    }
}

/// What the terminal shows, and the tallies for the summary (watch and replay).
pub(crate) struct Show<'a, W: Write> {
    pub(crate) printer: &'a mut Printer<W>,
    pub(crate) counts: &'a mut Counts,
    view: &'a View,
    pub(crate) summary: Summary,
    /// The shedding warning was printed.
    shed_warned: bool,
    /// Where the trace goes (`--output`).
    recorder: Option<Recorder>,
}

/// Writes the trace: raw records, clock ticks and (through the recording node) the node's
/// answers, plus every finding and lookup the run printed, unfiltered.
struct Recorder {
    shared: trace::Shared,
    /// The printed lines, as `--json` prints them.
    out: Printer<TraceOut>,
}

impl Recorder {
    fn create(
        t: &TraceOptions,
        session: &Session,
        args: &WatchArgs,
        clock: Clock,
        symbols: &Symbols,
    ) -> anyhow::Result<Recorder> {
        let read = |p: &str| {
            std::fs::read_to_string(p)
                .map(|s| s.trim().to_owned())
                .unwrap_or_default()
        };
        let hostname = read("/proc/sys/kernel/hostname");
        let header = trace::Header {
            schema: trace::SCHEMA,
            tracer: env!("CARGO_PKG_VERSION").into(),
            run: format!("{hostname}-{}-{}", std::process::id(), monotonic_ns()),
            segment: 0,
            hostname,
            kernel: read("/proc/sys/kernel/osrelease"),
            started: humantime::format_rfc3339_millis(std::time::SystemTime::now()).to_string(),
            clock_offset_ns: clock.offset_ns() as i64,
            ports: args.session.ports.clone(),
            plan: session.plan.render().lines().map(str::to_owned).collect(),
            clashes_per_packet: session.plan.clashes_per_packet(),
            lookups: lookup_config(),
            command: std::env::args().collect(),
        };
        let w = trace::TraceWriter::create(&t.path, header, t.rotation)?;
        let shared = std::sync::Arc::new(std::sync::Mutex::new(w));
        let out = Printer::new(TraceOut(shared.clone()), true, clock, symbols.clone());
        Ok(Recorder { shared, out })
    }

    fn path(&self) -> PathBuf {
        trace::lock(&self.shared).path().to_owned()
    }

    fn line(&mut self, l: &Line) {
        trace::lock(&self.shared).line(l);
    }

    fn record(&mut self, bytes: &[u8]) {
        trace::lock(&self.shared).record(bytes);
    }

    /// After a unit (a record with what it caused, a poll): at the size limit (written and
    /// buffered lines together) the segment ends with this unit and the next one starts;
    /// otherwise the lines are written out when many are buffered (`all`: always).
    fn settle(&mut self, pipeline: &Pipeline, all: bool) -> anyhow::Result<()> {
        let mut t = trace::lock(&self.shared);
        if t.full() {
            let path = t.path().to_owned();
            t.rotate(pipeline.explainer.books())
                .with_context(|| format!("rotating trace {}", path.display()))?;
        } else if all {
            t.commit()?;
        } else {
            t.commit_if_large()?;
        }
        Ok(())
    }

    fn close(&mut self) -> io::Result<()> {
        trace::lock(&self.shared).close()
    }
}

impl<'a, W: Write> Show<'a, W> {
    /// Without a trace (a replay).
    pub(crate) fn new(printer: &'a mut Printer<W>, counts: &'a mut Counts, view: &'a View) -> Self {
        Show {
            printer,
            counts,
            view,
            summary: Summary::default(),
            shed_warned: false,
            recorder: None,
        }
    }

    pub(crate) fn decode_error(
        &mut self,
        e: &crate::events::DecodeError,
        len: usize,
    ) -> io::Result<()> {
        self.counts.decode_errors += 1;
        let v = json!({ "error": e.to_string(), "len": len });
        if let Some(rec) = self.recorder.as_mut() {
            rec.out.note("decode_error", v.clone())?;
        }
        self.printer.note("decode_error", v)
    }

    pub(crate) fn item(&mut self, item: Item<'_>) -> io::Result<()> {
        match item {
            Item::Event { ev, workload } => {
                *self.counts.by_kind.entry(kind_name(ev)).or_default() += 1;
                if let Some(m) = &self.counts.metrics {
                    m.on_event(ev);
                }
                if (self.printer.is_json() || self.view.events)
                    && self.view.filter.event(ev, workload.as_deref())
                {
                    self.printer.event_of(ev, workload.as_deref())?;
                }
            }
            Item::Finding { finding, workload } => {
                *self
                    .counts
                    .verdicts
                    .entry(finding.verdict.name())
                    .or_default() += finding.count;
                if let Some(m) = &self.counts.metrics {
                    m.on_finding(finding);
                }
                if let Some(rec) = self.recorder.as_mut() {
                    rec.out.finding_of(finding, workload.as_deref())?;
                }
                if self.view.filter.finding(finding, workload.as_deref()) {
                    self.printer.finding_of(finding, workload.as_deref())?;
                }
            }
            Item::Lookup(l) => {
                if l.outcome == lookups::Outcome::Shed && !self.shed_warned {
                    self.shed_warned = true;
                    eprintln!(
                        "warning: more DNS lookups open than the memory bound allows; \
                         the oldest are closed early as `shed` (counted in the summary)"
                    );
                }
                self.summary.add(l);
                if let Some(rec) = self.recorder.as_mut() {
                    rec.out.lookup(l)?;
                }
                if let Some(m) = &self.counts.metrics {
                    m.on_lookup(l);
                }
                // JSON carries every lookup; text shows the healthy ones on request.
                let shown = self.printer.is_json() || l.problem || self.view.all_lookups;
                if shown && self.view.filter.lookup(l) {
                    self.printer.lookup(l)?;
                }
            }
        }
        Ok(())
    }
}

/// How much of the ring one drain reads.
#[derive(Clone, Copy)]
enum Budget {
    /// At most [`DRAIN_SLICE`] records, so that a ring that never empties (the consumer
    /// behind a busy node) still leaves room for loss readings, counter polls and signals.
    Slice,
    /// Every record stamped up to this time (`CLOCK_MONOTONIC`): what was in the ring when
    /// the counters are read, however many that is (at most a ringful), and no more.
    Through(u64),
    /// Everything, processed until the deadline and only counted after it (a stop).
    Until(std::time::Instant),
}

/// What a drain did.
struct Drained {
    /// Stdout is gone (stop quietly).
    gone: bool,
    /// The slice ended with records still queued.
    more: bool,
    /// Records read but not processed (past the deadline of a stop).
    skipped: u64,
}

/// Records one drain reads at most (`Budget::Slice`): ~20-50 ms of work.
const DRAIN_SLICE: u64 = 8192;

/// Reads pending records, within `budget`.
fn drain<W: Write>(
    ring: &mut RingBuf<MapData>,
    pipeline: &mut Pipeline,
    show: &mut Show<'_, W>,
    budget: Budget,
) -> anyhow::Result<Drained> {
    let mut n: u64 = 0;
    let mut out = Drained {
        gone: false,
        more: false,
        skipped: 0,
    };
    loop {
        n += 1;
        match budget {
            Budget::Slice if n > DRAIN_SLICE => {
                out.more = true;
                break;
            }
            Budget::Until(d) if n.is_multiple_of(256) && std::time::Instant::now() >= d => {
                // Bounded: the programs are still attached, so stop after more than one
                // ring can hold.
                while out.skipped < MAX_SKIP && ring.next().is_some() {
                    out.skipped += 1;
                }
                break;
            }
            _ => {}
        }
        let Some(item) = ring.next() else { break };
        // The header's timestamp (`tracer_common::Header::ts_ns`, bytes 8..16).
        let stamped = item
            .get(8..16)
            .and_then(|b| b.try_into().ok())
            .map_or(0, u64::from_ne_bytes);
        if let Some(rec) = show.recorder.as_mut() {
            rec.record(&item);
        }
        let r = match pipeline.record(&item, &mut |i| show.item(i)) {
            Ok(Ok(())) => Ok(()),
            Ok(Err(e)) => show.decode_error(&e, item.len()),
            Err(e) => Err(e),
        };
        if let Some(rec) = show.recorder.as_mut() {
            rec.settle(pipeline, false)?;
        }
        if quiet_stop(r)? {
            out.gone = true;
            return Ok(out);
        }
        if matches!(budget, Budget::Through(t) if stamped > t) {
            out.more = true;
            break;
        }
    }
    if let Some(rec) = show.recorder.as_mut() {
        rec.settle(pipeline, true)?;
    }
    out.gone = quiet_stop(show.printer.flush())?;
    Ok(out)
}

/// At most this many records are skipped at a stop (more than the largest ring holds).
const MAX_SKIP: u64 = 1 << 24;

/// Reads the ring buffer's loss counters, hands each reading to the pipeline (which marks
/// the lookups of the window `incomplete` and hands out the ones the reading clears),
/// records it in the trace, exports it per CPU, and says on stderr when records are lost.
struct Losses {
    per_cpu: Vec<u64>,
    at_ns: u64,
    last_read: std::time::Instant,
    /// Records lost since the last stderr line, and when that line was printed.
    unreported: u64,
    reported_at: Option<std::time::Instant>,
    /// Records read but not processed at a stop, for the next reading.
    skipped: u64,
}

impl Losses {
    fn new<W: Write>(session: &Session, show: &Show<'_, W>) -> anyhow::Result<Losses> {
        let at_ns = monotonic_ns();
        let per_cpu = session.lost_per_cpu()?;
        if let Some(m) = &show.counts.metrics {
            m.set_lost(&per_cpu);
        }
        Ok(Losses {
            per_cpu,
            at_ns,
            last_read: std::time::Instant::now(),
            unreported: 0,
            reported_at: None,
            skipped: 0,
        })
    }

    /// A reading (at most every LOSS_READ_EVERY unless `now`). Returns `true` when stdout
    /// is gone.
    fn read<W: Write>(
        &mut self,
        session: &Session,
        pipeline: &mut Pipeline,
        show: &mut Show<'_, W>,
        now: bool,
    ) -> anyhow::Result<bool> {
        if !now && self.last_read.elapsed() < LOSS_READ_EVERY {
            return Ok(false);
        }
        self.last_read = std::time::Instant::now();
        // The time first: every loss before it is in the counters read next.
        let to_ns = monotonic_ns();
        let cur = session.lost_per_cpu()?;
        let delta: Vec<u64> = cur
            .iter()
            .enumerate()
            .map(|(i, v)| v.saturating_sub(self.per_cpu.get(i).copied().unwrap_or(0)))
            .collect();
        let skipped = std::mem::take(&mut self.skipped);
        let records: u64 = delta.iter().sum::<u64>() + skipped;
        let from_ns = self.at_ns;
        self.per_cpu = cur;
        self.at_ns = to_ns;
        if let Some(m) = &show.counts.metrics {
            m.set_lost(&self.per_cpu);
        }
        if records > 0 {
            self.unreported += records;
            if self
                .reported_at
                .is_none_or(|t| t.elapsed() >= LOSS_LINE_EVERY)
            {
                self.report_burst();
            }
        }
        // A reading changes the correlator only when it found losses or lookups wait for
        // one; only those are recorded, and a replay makes the same calls.
        if records == 0 && !pipeline.correlator.awaits_loss_reading() {
            return Ok(false);
        }
        if let Some(rec) = show.recorder.as_mut() {
            rec.line(&Line::Loss {
                from_ns,
                to_ns,
                lost_per_cpu: delta,
                skipped,
            });
        }
        let r = pipeline.losses(from_ns, to_ns, records, &mut |item| show.item(item));
        quiet_stop(r)
    }

    /// Says on stderr how many records were lost since the last line.
    fn report_burst(&mut self) {
        if self.unreported == 0 {
            return;
        }
        let per_cpu = self
            .per_cpu
            .iter()
            .enumerate()
            .filter(|(_, v)| **v > 0)
            .map(|(c, v)| format!("cpu{c} {v}"))
            .collect::<Vec<_>>()
            .join(", ");
        eprintln!(
            "warning: the ring buffer was full: {} records lost (so far per CPU: {per_cpu}); \
             lookups open meanwhile are reported `incomplete`, not unanswered",
            self.unreported
        );
        self.unreported = 0;
        self.reported_at = Some(std::time::Instant::now());
    }

    fn total_per_cpu(&self) -> Vec<u64> {
        self.per_cpu.clone()
    }
}

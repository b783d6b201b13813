//! `tracer replay TRACE...`: runs a recorded trace (docs/trace.md) through the same decode /
//! enrich / explain / correlate pipeline as the live run, with the node's answers taken
//! from the recording, so it reaches the same findings and lookups.
//!
//! A damaged line is reported with its file and line number and skipped; the rest is read.
//! An incomplete last line (the recorder was killed mid-write) is noted, not an error.

use std::{
    collections::{HashMap, VecDeque},
    fmt,
    fs::File,
    io::{self, BufRead as _, BufReader, Read as _},
    path::{Path, PathBuf},
    sync::{Arc, Mutex, RwLock},
};

use anyhow::Context as _;

use crate::{
    ctstats::{CpuStats, CtEntry, TupleDir},
    events::{DecodeError, FiveTuple},
    explain::Books,
    kallsyms::Symbols,
    node::{Node, NsAnswer},
    output::Clock,
    pipeline::{Item, Pipeline},
    pods::Workload,
    trace::{self, Header, Line, NetnsStats, SCHEMA},
};

/// Where a line is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Loc {
    pub file: PathBuf,
    pub line: u64,
}

impl fmt::Display for Loc {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}:{}", self.file.display(), self.line)
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Severity {
    /// Expected after a kill: said, not an error.
    Note,
    /// Something in the trace could not be read or does not fit.
    Error,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Problem {
    pub at: Loc,
    pub severity: Severity,
    pub what: String,
}

impl fmt::Display for Problem {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.at, self.what)
    }
}

/// Longest line read; longer ones are damage (no line the tracer writes comes close).
const MAX_LINE: usize = 16 << 20;

enum Read {
    Line(Loc, Box<Line>),
    /// A line the live run printed (a finding, a lookup, ...): not replayed.
    Output,
    Problem(Problem),
}

/// The lines of the trace files, in order.
struct Lines {
    files: VecDeque<PathBuf>,
    current: Option<(PathBuf, BufReader<File>, u64)>,
    buf: Vec<u8>,
}

impl Lines {
    fn new(files: &[PathBuf]) -> Self {
        Lines {
            files: files.iter().cloned().collect(),
            current: None,
            buf: Vec::new(),
        }
    }

    fn next(&mut self) -> Option<Read> {
        loop {
            if self.current.is_none() {
                let path = self.files.pop_front()?;
                match File::open(&path) {
                    Ok(f) => self.current = Some((path, BufReader::new(f), 0)),
                    Err(e) => {
                        return Some(Read::Problem(Problem {
                            at: Loc {
                                file: path.clone(),
                                line: 0,
                            },
                            severity: Severity::Error,
                            what: format!("can not open it: {e}"),
                        }))
                    }
                }
            }
            let (path, reader, n) = self.current.as_mut().expect("opened above");
            self.buf.clear();
            let got = reader
                .by_ref()
                .take(MAX_LINE as u64 + 1)
                .read_until(b'\n', &mut self.buf);
            *n += 1;
            let at = Loc {
                file: path.clone(),
                line: *n,
            };
            match got {
                Ok(0) => {
                    self.current = None;
                    continue;
                }
                Err(e) => {
                    self.current = None;
                    return Some(problem(at, Severity::Error, format!("read error: {e}")));
                }
                Ok(_) => {}
            }
            if self.buf.last() != Some(&b'\n') {
                if self.buf.len() > MAX_LINE {
                    // Skip the rest of this overlong line.
                    let mut sink = Vec::new();
                    let _ = reader.read_until(b'\n', &mut sink);
                    return Some(problem(
                        at,
                        Severity::Error,
                        format!("line longer than {MAX_LINE} bytes; skipped"),
                    ));
                }
                self.current = None;
                return Some(problem(
                    at,
                    Severity::Note,
                    format!(
                        "incomplete last line ({} bytes, no newline: the recorder was stopped \
                         mid-write); ignored",
                        self.buf.len()
                    ),
                ));
            }
            let text = &self.buf[..self.buf.len() - 1];
            if text.iter().all(u8::is_ascii_whitespace) {
                continue;
            }
            return Some(parse(at, text));
        }
    }
}

fn problem(at: Loc, severity: Severity, what: String) -> Read {
    Read::Problem(Problem { at, severity, what })
}

fn parse(at: Loc, text: &[u8]) -> Read {
    let v: serde_json::Value = match serde_json::from_slice(text) {
        Ok(v) => v,
        Err(e) => return problem(at, Severity::Error, format!("not JSON ({e}); skipped")),
    };
    let Some(ty) = v.get("type").and_then(|t| t.as_str()).map(str::to_owned) else {
        return problem(
            at,
            Severity::Error,
            "a JSON line without a \"type\"; skipped".into(),
        );
    };
    if trace::OUTPUT_TYPES.contains(&ty.as_str()) {
        return Read::Output;
    }
    match serde_json::from_value::<Line>(v) {
        Ok(l) => Read::Line(at, Box::new(l)),
        Err(e) if e.to_string().starts_with("unknown variant") => problem(
            at,
            Severity::Error,
            format!("unknown line type \"{ty}\"; skipped"),
        ),
        Err(e) => problem(
            at,
            Severity::Error,
            format!("damaged \"{ty}\" line ({e}); skipped"),
        ),
    }
}

/// What the replay node answers from: the answers recorded after the line being replayed.
#[derive(Default)]
struct Answers {
    queue: VecDeque<(Loc, Line)>,
    workloads: HashMap<(u64, u32, Option<u32>), Arc<Workload>>,
    /// A segment other than the first has no baselines (its books come instead).
    mid_run: bool,
    mismatches: u64,
    first_mismatches: Vec<String>,
}

impl Answers {
    fn mismatch(&mut self, what: String) {
        self.mismatches += 1;
        if self.first_mismatches.len() < 10 {
            self.first_mismatches.push(what);
        }
    }

    /// The first queued answer `pick` accepts (normally the first one).
    fn take<T>(&mut self, asked: &str, mut pick: impl FnMut(&Line) -> Option<T>) -> Option<T> {
        let i = self.queue.iter().position(|(_, l)| pick(l).is_some());
        match i {
            Some(0) => {}
            Some(i) => {
                let at = self.queue[0].0.clone();
                self.mismatch(format!(
                    "{at}: asked {asked}, answered by a later line ({})",
                    self.queue[i].0
                ));
            }
            None => {
                let at = self
                    .queue
                    .front()
                    .map(|(l, _)| l.to_string())
                    .unwrap_or_else(|| "(no answer recorded)".into());
                self.mismatch(format!(
                    "{at}: asked {asked}, which the trace does not answer"
                ));
                return None;
            }
        }
        let (_, l) = self.queue.remove(i?)?;
        pick(&l)
    }
}

/// A node that answers what the recording answered.
struct ReplayNode {
    answers: Arc<Mutex<Answers>>,
    symbols: Arc<RwLock<HashMap<u64, String>>>,
}

impl ReplayNode {
    fn answers(&self) -> std::sync::MutexGuard<'_, Answers> {
        self.answers.lock().unwrap_or_else(|e| e.into_inner())
    }
}

impl Node for ReplayNode {
    fn baselines(&mut self) -> Vec<(u32, CpuStats)> {
        let mut a = self.answers();
        if a.mid_run {
            return Vec::new();
        }
        a.take("the baselines", |l| match l {
            Line::Baselines { netns } => Some(NetnsStats::pairs(netns)),
            _ => None,
        })
        .unwrap_or_default()
    }

    fn discover(&mut self, _known: &dyn Fn(u32) -> bool) -> Vec<(u32, CpuStats)> {
        // Recorded only when something was found (and never by older versions): the
        // answer is the next line or there is none.
        let mut a = self.answers();
        match a.queue.front() {
            Some((_, Line::Discovered { netns })) => {
                let v = NetnsStats::pairs(netns);
                a.queue.pop_front();
                v
            }
            _ => Vec::new(),
        }
    }

    fn track(&mut self, path: &Path) -> Result<(u32, CpuStats), String> {
        self.answers()
            .take(&format!("to track {}", path.display()), |l| match l {
                Line::Track {
                    path: p,
                    netns,
                    stats,
                    error,
                } if p == path => Some(match (netns, stats) {
                    (Some(n), Some(s)) => Ok((*n, s.clone())),
                    _ => Err(error.clone().unwrap_or_else(|| "not recorded".into())),
                }),
                _ => None,
            })
            .unwrap_or_else(|| Err("not in the trace".into()))
    }

    fn counters(&mut self, netns: u32) -> NsAnswer<Option<CpuStats>> {
        self.answers()
            .take(&format!("the counters of netns {netns}"), |l| match l {
                Line::Counters {
                    netns: n,
                    reborn,
                    stats,
                } if *n == netns => Some(NsAnswer {
                    reborn: *reborn,
                    value: stats.clone(),
                }),
                _ => None,
            })
            .unwrap_or(NsAnswer {
                reborn: false,
                value: None,
            })
    }

    fn winner(
        &mut self,
        netns: u32,
        dir: TupleDir,
        key: &FiveTuple,
    ) -> NsAnswer<Result<Option<CtEntry>, String>> {
        self.answers()
            .take(&format!("the clash winner in netns {netns}"), |l| match l {
                Line::Winner {
                    netns: n,
                    reborn,
                    dir: d,
                    key: k,
                    entry,
                    error,
                } if *n == netns && *d == dir && k == key => Some(NsAnswer {
                    reborn: *reborn,
                    value: match error {
                        Some(e) => Err(e.clone()),
                        None => Ok(entry.clone()),
                    },
                }),
                _ => None,
            })
            .unwrap_or(NsAnswer {
                reborn: false,
                value: Err("not in the trace".into()),
            })
    }

    fn symbol(&mut self, addr: u64) -> String {
        let name = self
            .symbols
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .get(&addr)
            .cloned();
        name.unwrap_or_else(|| {
            self.answers()
                .mismatch(format!("the name of {addr:#x} is not in the trace"));
            format!("{addr:#x}")
        })
    }

    fn workload(&mut self, cgroup_id: u64, netns: u32, pid: Option<u32>) -> Arc<Workload> {
        let mut a = self.answers();
        match a.workloads.get(&(cgroup_id, netns, pid)) {
            Some(w) => w.clone(),
            None => {
                a.mismatch(format!(
                    "the pod of cgroup {cgroup_id} netns {netns} pid {pid:?} is not in the trace"
                ));
                Arc::new(Workload::unknown())
            }
        }
    }
}

/// What a replay found besides the items.
#[derive(Debug, Default)]
pub struct Outcome {
    /// Ring-buffer records replayed.
    pub records: u64,
    pub decode_errors: u64,
    /// From the finish line (0 when the recording was cut).
    pub lost: u64,
    pub lost_per_cpu: Vec<u64>,
    /// The recording has its finish line (it was stopped, not killed).
    pub finished: bool,
    pub problems: Vec<Problem>,
    /// Questions the replay asked that the recording did not answer the same way (another
    /// tracer version's trace, or a damaged one); the first few are listed.
    pub mismatches: u64,
    pub first_mismatches: Vec<String>,
    /// Segments read (and the run they belong to).
    pub segments: Vec<u32>,
    /// The correlator's tallies at the end.
    pub lookup_stats: crate::lookups::Stats,
}

impl Outcome {
    pub fn errors(&self) -> usize {
        self.problems
            .iter()
            .filter(|p| p.severity == Severity::Error)
            .count()
    }
}

/// A trace opened for replay: its first header has been read.
pub struct Replay {
    lines: Lines,
    header: Header,
    header_at: Loc,
    answers: Arc<Mutex<Answers>>,
    symbols: Arc<RwLock<HashMap<u64, String>>>,
    /// A line read ahead (the next input line).
    pending: Option<(Loc, Line)>,
    outcome: Outcome,
}

impl Replay {
    /// Opens the trace files (segments in order, oldest first) and reads the first header.
    pub fn open(files: &[PathBuf]) -> anyhow::Result<Replay> {
        anyhow::ensure!(!files.is_empty(), "no trace file given");
        for f in files {
            File::open(f).with_context(|| format!("opening trace {}", f.display()))?;
        }
        let mut lines = Lines::new(files);
        let mut outcome = Outcome::default();
        let not_a_trace = |at: &dyn fmt::Display| {
            anyhow::anyhow!(
                "{at}: not a tracer trace: the first line is not a \"trace\" header \
                 (`tracer watch --output` and `tracer record` write one)"
            )
        };
        let (header_at, header) = loop {
            match lines.next() {
                Some(Read::Line(at, l)) if matches!(*l, Line::Trace(_)) => {
                    let Line::Trace(h) = *l else { unreachable!() };
                    break (at, h);
                }
                // A damaged first line: said, and the next one may be the header.
                Some(Read::Problem(p)) if outcome.problems.len() < 10 => outcome.problems.push(p),
                Some(Read::Problem(p)) => return Err(not_a_trace(&p)),
                Some(Read::Line(at, _)) => return Err(not_a_trace(&at)),
                Some(Read::Output) => return Err(not_a_trace(&files[0].display())),
                None => anyhow::bail!(
                    "{}: no trace header in it{}",
                    files[0].display(),
                    outcome
                        .problems
                        .first()
                        .map(|p| format!(" ({p})"))
                        .unwrap_or_default()
                ),
            }
        };
        if !(1..=SCHEMA).contains(&header.schema) {
            outcome.problems.push(Problem {
                at: header_at.clone(),
                severity: Severity::Error,
                what: format!(
                    "schema version {} (this tracer reads version {SCHEMA}, written by tracer \
                     {}); reading on, lines it does not know are reported",
                    header.schema, header.tracer
                ),
            });
        }
        outcome.segments.push(header.segment);
        let answers = Arc::new(Mutex::new(Answers {
            mid_run: header.segment > 0,
            ..Answers::default()
        }));
        Ok(Replay {
            lines,
            header,
            header_at,
            answers,
            symbols: Arc::new(RwLock::new(HashMap::new())),
            pending: None,
            outcome,
        })
    }

    pub fn header(&self) -> &Header {
        &self.header
    }

    /// The live run's clock: wall-clock times print as they did.
    pub fn clock(&self) -> Clock {
        Clock::fixed(i128::from(self.header.clock_offset_ns))
    }

    /// Kernel symbol names as the recording kept them (filled as the replay goes).
    pub fn symbols(&self) -> Symbols {
        Symbols::known(self.symbols.clone())
    }

    fn answers(&self) -> std::sync::MutexGuard<'_, Answers> {
        self.answers.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Reads the answers after an input line, up to the next input line (kept pending).
    /// Returns the books of a segment header, when one came.
    fn gather(&mut self) -> Option<Books> {
        let mut books = None;
        loop {
            match self.lines.next() {
                None => return books,
                Some(Read::Output) => {}
                Some(Read::Problem(p)) => self.outcome.problems.push(p),
                Some(Read::Line(at, l)) => match *l {
                    l @ (Line::Record { .. }
                    | Line::Poll { .. }
                    | Line::Loss { .. }
                    | Line::Finish { .. }
                    | Line::Trace(_)) => {
                        self.pending = Some((at, l));
                        return books;
                    }
                    Line::Books { books: b } => books = Some(b),
                    Line::Symbol { addr, name } => {
                        self.symbols
                            .write()
                            .unwrap_or_else(|e| e.into_inner())
                            .insert(addr, name);
                    }
                    Line::Workload {
                        cgroup_id,
                        netns,
                        pid,
                        workload,
                    } => {
                        self.answers()
                            .workloads
                            .insert((cgroup_id, netns, pid), workload);
                    }
                    other => self.answers().queue.push_back((at, other)),
                },
            }
        }
    }

    /// Answers recorded but not asked for.
    fn unasked(&mut self) {
        let mut a = self.answers();
        while let Some((at, _)) = a.queue.pop_front() {
            a.mismatch(format!("{at}: recorded, but the replay did not ask for it"));
        }
    }

    /// Replays everything. `sink` gets the items as the live run's sink did;
    /// `decode_error` each record the decoder refused (with its length).
    pub fn run(
        mut self,
        sink: &mut dyn FnMut(Item<'_>) -> io::Result<()>,
        decode_error: &mut dyn FnMut(&DecodeError, usize) -> io::Result<()>,
    ) -> anyhow::Result<Outcome> {
        let books = self.gather();
        let node = ReplayNode {
            answers: self.answers.clone(),
            symbols: self.symbols.clone(),
        };
        let mut pipeline = Pipeline::new(Box::new(node), self.header.lookups.clone());
        pipeline
            .explainer
            .expect_clashes_per_packet(self.header.clashes_per_packet);
        match books {
            Some(b) => pipeline.explainer.restore(b),
            None if self.header.segment > 0 => self.outcome.problems.push(Problem {
                at: self.header_at.clone(),
                severity: Severity::Error,
                what: "a later segment without its books: counter findings start from zero".into(),
            }),
            None => {}
        }
        if self.header.segment > 0 {
            self.outcome.problems.push(Problem {
                at: self.header_at.clone(),
                severity: Severity::Note,
                what: format!(
                    "this segment ({}) starts mid-run: lookups begun in earlier segments are not \
                     in it; give the older segments first to replay them",
                    self.header.segment
                ),
            });
        }
        self.unasked();
        self.answers().mid_run = false;
        let last_ns = std::cell::Cell::new(0u64);
        let mut sink = |item: Item<'_>| -> io::Result<()> {
            if let Item::Event { ev, .. } = &item {
                last_ns.set(last_ns.get().max(ev.ts_ns()));
            }
            sink(item)
        };
        while let Some((at, line)) = self.pending.take() {
            match line {
                Line::Record { len, data, .. } => {
                    let bytes = match trace::decode_record(len, &data) {
                        Ok(b) => b,
                        Err(e) => {
                            self.outcome.problems.push(Problem {
                                at,
                                severity: Severity::Error,
                                what: format!("{e}; skipped"),
                            });
                            self.gather();
                            self.unasked();
                            continue;
                        }
                    };
                    self.gather();
                    self.outcome.records += 1;
                    if let Err(e) = pipeline.record(&bytes, &mut sink)? {
                        self.outcome.decode_errors += 1;
                        decode_error(&e, bytes.len())?;
                    }
                }
                Line::Poll { now_ns } => {
                    self.gather();
                    pipeline.poll(now_ns, &mut sink)?;
                }
                Line::Loss {
                    from_ns,
                    to_ns,
                    lost_per_cpu,
                    skipped,
                } => {
                    self.gather();
                    let records = lost_per_cpu.iter().sum::<u64>() + skipped;
                    pipeline.losses(from_ns, to_ns, records, &mut sink)?;
                }
                Line::Finish {
                    now_ns,
                    lost,
                    lost_per_cpu,
                } => {
                    self.gather();
                    pipeline.finish(now_ns, &mut sink)?;
                    self.outcome.finished = true;
                    self.outcome.lost = lost;
                    self.outcome.lost_per_cpu = lost_per_cpu;
                }
                Line::Trace(h) => {
                    let prev = self.outcome.segments.last().copied().unwrap_or(0);
                    if h.run != self.header.run || h.segment != prev + 1 {
                        self.outcome.problems.push(Problem {
                            at: at.clone(),
                            severity: Severity::Error,
                            what: format!(
                                "segment {} of run {} does not continue segment {prev} of run {}; \
                                 replaying on as if it did",
                                h.segment, h.run, self.header.run
                            ),
                        });
                    }
                    self.outcome.segments.push(h.segment);
                    // The books are for replaying this segment alone: ours carry on.
                    let _ = self.gather();
                }
                _ => unreachable!("gather keeps only input lines pending"),
            }
            self.unasked();
        }
        if !self.outcome.finished {
            self.outcome.problems.push(Problem {
                at: self.header_at.clone(),
                severity: Severity::Note,
                what: "the trace has no finish line (the recorder was killed, or this is not \
                       the last segment): lookups still open are closed at the last event"
                    .into(),
            });
            pipeline.flush(last_ns.get(), &mut sink)?;
        }
        self.outcome.lookup_stats = pipeline.correlator.stats.clone();
        let answers = self.answers.clone();
        let a = answers.lock().unwrap_or_else(|e| e.into_inner());
        self.outcome.mismatches = a.mismatches;
        self.outcome.first_mismatches = a.first_mismatches.clone();
        Ok(self.outcome)
    }
}

/// Everything a replay produced, for exports (pcapng, report, bundle).
pub struct Run {
    pub header: Header,
    pub clock: Clock,
    pub events: Vec<(crate::events::Event, Option<Arc<Workload>>)>,
    pub findings: Vec<(crate::verdict::Finding, Option<Arc<Workload>>)>,
    pub lookups: Vec<crate::lookups::Lookup>,
    pub outcome: Outcome,
}

/// Replays `files` and keeps every item.
pub fn collect(files: &[PathBuf]) -> anyhow::Result<Run> {
    let replay = Replay::open(files)?;
    let header = replay.header().clone();
    let clock = replay.clock();
    let mut events = Vec::new();
    let mut findings = Vec::new();
    let mut lookups = Vec::new();
    let outcome = replay.run(
        &mut |item| {
            match item {
                Item::Event { ev, workload } => events.push((ev.clone(), workload)),
                Item::Finding { finding, workload } => findings.push((finding.clone(), workload)),
                Item::Lookup(l) => lookups.push(l.clone()),
            }
            Ok(())
        },
        &mut |_, _| Ok(()),
    )?;
    Ok(Run {
        header,
        clock,
        events,
        findings,
        lookups,
        outcome,
    })
}

/// Says on stderr what was wrong with the trace; the number of errors.
pub fn report_problems(outcome: &Outcome) -> usize {
    for p in &outcome.problems {
        let tag = match p.severity {
            Severity::Note => "note",
            Severity::Error => "error",
        };
        eprintln!("replay: {tag}: {p}");
    }
    if outcome.mismatches > 0 {
        eprintln!(
            "replay: warning: {} question(s) of the replay were not answered by the trace the \
             way they were asked (a trace from another tracer version, or a damaged one); \
             findings may differ from the live run's. First ones:",
            outcome.mismatches
        );
        for m in &outcome.first_mismatches {
            eprintln!("  {m}");
        }
    }
    outcome.errors()
}

/// `tracer replay`.
pub fn command(cmd: crate::cli::ReplayCmd) -> anyhow::Result<()> {
    use std::io::IsTerminal as _;

    use crate::{
        output::{Printer, Style},
        watch::{print_summary, summary_json, Counts, Show},
    };
    if let Some(p) = &cmd.pcapng {
        crate::session::check_writable_parent(p)?;
    }
    let replay = Replay::open(&cmd.files)?;
    let h = replay.header().clone();
    eprintln!(
        "replaying run {} of {} (kernel {}, tracer {}), started {}, segment {}",
        h.run, h.hostname, h.kernel, h.tracer, h.started, h.segment
    );
    let view = cmd.view.view();
    let stdout = io::stdout();
    let style = Style {
        colour: view.colour.unwrap_or_else(|| stdout.is_terminal()),
    };
    let mut printer = Printer::new(
        io::BufWriter::new(stdout.lock()),
        cmd.json,
        replay.clock(),
        replay.symbols(),
    )
    .with_style(style);
    let mut counts = Counts::default();
    let mut show = Show::new(&mut printer, &mut counts, &view);
    let keep = cmd.pcapng.is_some();
    let mut events = Vec::new();
    let mut findings = Vec::new();
    let mut lookups = Vec::new();
    let clock = replay.clock();
    let outcome = {
        let show = std::cell::RefCell::new(&mut show);
        replay.run(
            &mut |item| {
                if keep {
                    match &item {
                        Item::Event { ev, workload } => {
                            events.push(((*ev).clone(), workload.clone()))
                        }
                        Item::Finding { finding, workload } => {
                            findings.push(((*finding).clone(), workload.clone()))
                        }
                        Item::Lookup(l) => lookups.push((*l).clone()),
                    }
                }
                show.borrow_mut().item(item)
            },
            &mut |e, len| show.borrow_mut().decode_error(e, len),
        )?
    };
    let summary = std::mem::take(&mut show.summary);
    drop(show);
    let v = summary_json(
        &counts,
        &summary,
        &outcome.lookup_stats,
        &outcome.lost_per_cpu,
    );
    print_summary(
        &mut printer,
        v,
        &summary,
        &outcome.lookup_stats,
        cmd.json,
        style,
    )?;
    drop(printer);
    eprintln!(
        "replayed {} records ({} undecodable), segments {:?}; the live run lost {}",
        outcome.records, outcome.decode_errors, outcome.segments, outcome.lost
    );
    if let Some(p) = &cmd.pcapng {
        let f = File::create(p).with_context(|| format!("creating {}", p.display()))?;
        let stats =
            crate::pcapng::write(io::BufWriter::new(f), &events, &findings, &lookups, &clock)
                .with_context(|| format!("writing {}", p.display()))?;
        eprintln!(
            "pcapng written to {} ({} packets: {} DNS, {} dropped)",
            p.display(),
            stats.packets,
            stats.dns,
            stats.drops
        );
    }
    let errors = report_problems(&outcome);
    anyhow::ensure!(
        errors == 0,
        "{errors} problem(s) in the trace (listed above); everything else was replayed"
    );
    Ok(())
}

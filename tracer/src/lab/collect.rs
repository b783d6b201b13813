//! The tracer running inside `tracer lab`: the same session, decoder and classifier as
//! `tracer watch`, on a thread, with the lab's namespaces tracked from the start.

use std::{
    path::PathBuf,
    sync::{
        atomic::{AtomicBool, Ordering},
        mpsc, Arc,
    },
    thread::{self, JoinHandle},
    time::Duration,
};

use anyhow::Context as _;

use crate::{
    ctstats::CpuStats,
    events::{self, Event},
    explain::Explainer,
    kallsyms::Symbols,
    output::monotonic_ns,
    plan::PlanReport,
    session::{Options, Session},
    verdict::Finding,
};

/// What the tracer saw during a lab run.
#[derive(Debug, Default)]
pub struct Collected {
    pub events: Vec<Event>,
    pub findings: Vec<Finding>,
    pub lost: u64,
    pub decode_errors: u64,
    /// Counter deltas per netns inode, from the baselines taken before the traffic.
    pub deltas: std::collections::BTreeMap<u32, CpuStats>,
    pub plan: Option<PlanReport>,
}

pub struct Collector {
    stop: Arc<AtomicBool>,
    handle: Option<JoinHandle<anyhow::Result<Collected>>>,
}

/// Callback for each event and finding as it happens (the lab's live stream).
pub type Live = Box<dyn FnMut(&Event, Option<&Finding>) + Send>;

impl Collector {
    /// Loads the programs and starts collecting; returns once every program is attached
    /// and the counters of `track` are baselined.
    pub fn start(
        opts: Options,
        track: Vec<PathBuf>,
        mut live: Option<Live>,
    ) -> anyhow::Result<Collector> {
        let stop = Arc::new(AtomicBool::new(false));
        let (ready_tx, ready_rx) = mpsc::channel::<anyhow::Result<()>>();
        let stop2 = stop.clone();
        let handle = thread::Builder::new().name("lab-tracer".into()).spawn(
            move || -> anyhow::Result<Collected> {
                let setup = (|| -> anyhow::Result<_> {
                    let mut session = Session::start(&opts)?;
                    let unserved = session.plan.unserved();
                    anyhow::ensure!(
                        unserved.is_empty(),
                        "not observable on this kernel: {}",
                        unserved.join(", ")
                    );
                    let ring = session.take_events()?;
                    let mut explainer = Explainer::start();
                    for p in &track {
                        explainer
                            .track(p)
                            .with_context(|| format!("conntrack statistics of {}", p.display()))?;
                    }
                    Ok((session, ring, explainer))
                })();
                let (session, mut ring, mut explainer) = match setup {
                    Ok(v) => {
                        let _ = ready_tx.send(Ok(()));
                        v
                    }
                    Err(e) => {
                        let _ = ready_tx.send(Err(anyhow::anyhow!("{e:#}")));
                        return Err(e);
                    }
                };
                let symbols = Symbols::new("/proc/kallsyms");
                let mut out = Collected {
                    plan: Some(session.plan.clone()),
                    ..Collected::default()
                };
                loop {
                    // Read the flag before draining, so everything submitted before stop is read.
                    let stopping = stop2.load(Ordering::Acquire);
                    while let Some(item) = ring.next() {
                        match events::decode(&item) {
                            Ok(ev) => {
                                let finding = match &ev {
                                    Event::NfDrop(d) => {
                                        let sym = symbols.resolve(d.location);
                                        explainer.drop_event(d, &sym)
                                    }
                                    Event::CtClash(c) => explainer.clash_event(c),
                                    _ => None,
                                };
                                if let Some(cb) = live.as_mut() {
                                    cb(&ev, finding.as_ref());
                                }
                                out.findings.extend(finding);
                                out.events.push(ev);
                            }
                            Err(_) => out.decode_errors += 1,
                        }
                    }
                    if stopping {
                        break;
                    }
                    thread::sleep(Duration::from_millis(5));
                }
                out.findings.extend(explainer.poll(monotonic_ns()));
                out.deltas = explainer.deltas();
                out.lost = session.lost_per_cpu()?.iter().sum();
                Ok(out)
            },
        )?;
        match ready_rx.recv() {
            Ok(Ok(())) => Ok(Collector {
                stop,
                handle: Some(handle),
            }),
            Ok(Err(e)) => {
                let _ = handle.join();
                Err(e)
            }
            Err(_) => Err(match handle.join() {
                Ok(Err(e)) => e,
                _ => anyhow::anyhow!("the tracer thread died while starting"),
            }),
        }
    }

    /// Stops after a short grace period (events of the last packets are still in flight)
    /// and returns what was collected.
    pub fn finish(mut self) -> anyhow::Result<Collected> {
        thread::sleep(Duration::from_millis(300));
        self.stop.store(true, Ordering::Release);
        match self.handle.take().expect("finish called once").join() {
            Ok(r) => r,
            Err(_) => anyhow::bail!("the tracer thread panicked"),
        }
    }
}

impl Drop for Collector {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Release);
        if let Some(h) = self.handle.take() {
            let _ = h.join();
        }
    }
}

//! The tracer running inside `tracer lab`: the same session and pipeline (decode, pods,
//! classifier, lookups) as `tracer watch`, on a thread, with the lab's namespaces tracked
//! from the start.

use std::{
    path::PathBuf,
    sync::{
        atomic::{AtomicBool, Ordering},
        mpsc, Arc,
    },
    thread::{self, JoinHandle},
    time::{Duration, Instant},
};

use anyhow::Context as _;

use crate::{
    ctstats::CpuStats,
    events::Event,
    kallsyms::Symbols,
    lookups::{self, Lookup},
    node::LiveNode,
    output::monotonic_ns,
    pipeline::{Item, Pipeline},
    plan::PlanReport,
    pods::{NodePaths, PodIndex, Workload},
    session::{Options, Session},
    verdict::Finding,
};

/// What the tracer saw during a lab run.
#[derive(Debug, Default)]
pub struct Collected {
    pub events: Vec<Event>,
    pub findings: Vec<Finding>,
    /// Finished lookups, with the pod that sent each.
    pub lookups: Vec<Lookup>,
    /// The pod of each finding that hit a query, in `findings` order.
    pub finding_pods: Vec<Option<std::sync::Arc<Workload>>>,
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

/// Callback for each event, finding and lookup as it happens (the lab's live stream).
pub type Live = Box<dyn FnMut(Item<'_>) + Send>;

/// How often the lab's tracer reads the counters, like `tracer watch`.
const POLL_EVERY: Duration = Duration::from_secs(1);

impl Collector {
    /// Loads the programs and starts collecting; returns once every program is attached
    /// and the counters of `track` are baselined.
    pub fn start(
        opts: Options,
        track: Vec<PathBuf>,
        node: NodePaths,
        lookups: lookups::Config,
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
                    let symbols = Symbols::new("/proc/kallsyms");
                    symbols.load();
                    let node = LiveNode::new(symbols, PodIndex::new(node));
                    let mut pipeline = Pipeline::new(Box::new(node), lookups);
                    pipeline
                        .explainer
                        .expect_clashes_per_packet(session.plan.clashes_per_packet());
                    for p in &track {
                        pipeline
                            .track(p)
                            .with_context(|| format!("conntrack statistics of {}", p.display()))?;
                    }
                    Ok((session, ring, pipeline))
                })();
                let (session, mut ring, mut pipeline) = match setup {
                    Ok(v) => {
                        let _ = ready_tx.send(Ok(()));
                        v
                    }
                    Err(e) => {
                        let _ = ready_tx.send(Err(anyhow::anyhow!("{e:#}")));
                        return Err(e);
                    }
                };
                let mut out = Collected {
                    plan: Some(session.plan.clone()),
                    ..Collected::default()
                };
                let mut sink = |item: Item<'_>| -> Result<(), std::convert::Infallible> {
                    match &item {
                        Item::Event { ev, .. } => out.events.push((*ev).clone()),
                        Item::Finding { finding, workload } => {
                            out.findings.push((*finding).clone());
                            out.finding_pods.push(workload.clone());
                        }
                        Item::Lookup(l) => out.lookups.push((*l).clone()),
                    }
                    if let Some(cb) = live.as_mut() {
                        cb(item);
                    }
                    Ok(())
                };
                let mut next_poll = Instant::now() + POLL_EVERY;
                let mut decode_errors = 0;
                let (mut loss_at, mut lost_seen) =
                    (monotonic_ns(), session.lost_per_cpu()?.iter().sum::<u64>());
                loop {
                    // Read the flag before draining, so everything submitted before stop is read.
                    let stopping = stop2.load(Ordering::Acquire);
                    while let Some(item) = ring.next() {
                        let Ok(r) = pipeline.record(&item, &mut sink);
                        if r.is_err() {
                            decode_errors += 1;
                        }
                    }
                    // Lookups open while records were lost are `incomplete`, as in `watch`.
                    let to_ns = monotonic_ns();
                    let lost: u64 = session.lost_per_cpu()?.iter().sum();
                    if lost > lost_seen || pipeline.correlator.awaits_loss_reading() {
                        let Ok(()) = pipeline.losses(loss_at, to_ns, lost - lost_seen, &mut sink);
                    }
                    (loss_at, lost_seen) = (to_ns, lost);
                    if stopping {
                        break;
                    }
                    if Instant::now() >= next_poll {
                        let Ok(()) = pipeline.poll(monotonic_ns(), &mut sink);
                        next_poll = Instant::now() + POLL_EVERY;
                    }
                    thread::sleep(Duration::from_millis(5));
                }
                let Ok(()) = pipeline.finish(monotonic_ns(), &mut sink);
                out.decode_errors = decode_errors;
                let explainer = &pipeline.explainer;
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

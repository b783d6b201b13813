//! decode → enrich → explain → correlate, shared by `tracer watch` and `tracer lab`:
//! one record in, the items to show out (the event with its pod, findings, finished lookups).

use std::sync::Arc;

use crate::{
    events::{self, DecodeError, Event},
    explain::Explainer,
    lookups::{Config, Correlator, Lookup},
    node::Node,
    pods::{Workload, WorkloadKind},
    verdict::Finding,
};

/// Something to show, in the order it happened.
pub enum Item<'a> {
    Event {
        ev: &'a Event,
        /// Who sent or received it (DNS events).
        workload: Option<Arc<Workload>>,
    },
    Finding {
        finding: &'a Finding,
        /// The pod whose query the finding was about, when it matched one.
        workload: Option<Arc<Workload>>,
    },
    Lookup(&'a Lookup),
}

pub struct Pipeline {
    pub explainer: Explainer,
    /// Everything asked of the node besides the events (live, recorded or replayed).
    pub node: Box<dyn Node>,
    pub correlator: Correlator,
    /// Ring-buffer records lost since the previous counter reading.
    lost_since_poll: u64,
}

impl Pipeline {
    /// Baselines the counters of every network namespace the node has now.
    pub fn new(mut node: Box<dyn Node>, cfg: Config) -> Self {
        Pipeline {
            explainer: Explainer::start(node.as_mut()),
            node,
            correlator: Correlator::new(cfg),
            lost_since_poll: 0,
        }
    }

    /// Adds (and baselines) a namespace the caller knows by path.
    pub fn track(&mut self, path: &std::path::Path) -> anyhow::Result<u32> {
        self.explainer.track(self.node.as_mut(), path)
    }

    /// One ring-buffer record.
    pub fn record<E>(
        &mut self,
        bytes: &[u8],
        sink: &mut impl FnMut(Item<'_>) -> Result<(), E>,
    ) -> Result<Result<(), DecodeError>, E> {
        match events::decode(bytes) {
            Ok(ev) => self.event(&ev, sink).map(Ok),
            Err(e) => Ok(Err(e)),
        }
    }

    /// One decoded event.
    pub fn event<E>(
        &mut self,
        ev: &Event,
        sink: &mut impl FnMut(Item<'_>) -> Result<(), E>,
    ) -> Result<(), E> {
        match ev {
            Event::DnsSend(d) | Event::DnsRecv(d) => {
                let mut w = self
                    .node
                    .workload(d.task.cgroup_id, d.task.netns, d.task.pid);
                // A host process that exited before it was looked up in /proc (a short
                // `getent`) still has the name the kernel saw with its pid.
                if w.kind == WorkloadKind::Host && w.process.is_none() && d.task.pid.is_some() {
                    if let Some(comm) = &d.task.comm {
                        w = Arc::new(Workload::host(Some(comm.clone())));
                    }
                }
                sink(Item::Event {
                    ev,
                    workload: Some(w.clone()),
                })?;
                if matches!(ev, Event::DnsSend(_)) {
                    self.correlator.on_send(d, w);
                } else {
                    self.correlator.on_recv(d);
                }
            }
            Event::NfDrop(n) | Event::CtClash(n) => {
                // Named before the event is shown: the printer names the location too.
                let sym = matches!(ev, Event::NfDrop(_)).then(|| self.node.symbol(n.location));
                sink(Item::Event { ev, workload: None })?;
                let finding = if let Some(sym) = sym {
                    self.explainer.drop_event(self.node.as_mut(), n, &sym)
                } else {
                    self.explainer.clash_event(n)
                };
                if let Some(f) = finding {
                    let workload = self.correlator.on_packet_finding(n, &f);
                    sink(Item::Finding {
                        finding: &f,
                        workload,
                    })?;
                }
            }
        }
        self.emit_done(sink)
    }

    /// A reading of the ring buffer's loss counters at `to_ns`: `records` lost since the
    /// previous reading at `from_ns` (see [`Correlator::on_loss_reading`]).
    pub fn losses<E>(
        &mut self,
        from_ns: u64,
        to_ns: u64,
        records: u64,
        sink: &mut impl FnMut(Item<'_>) -> Result<(), E>,
    ) -> Result<(), E> {
        self.lost_since_poll += records;
        self.correlator.on_loss_reading(from_ns, to_ns, records);
        self.emit_done(sink)
    }

    /// Reads the counters (findings that drop no packet) and advances the correlator's clock.
    pub fn poll<E>(
        &mut self,
        now_ns: u64,
        sink: &mut impl FnMut(Item<'_>) -> Result<(), E>,
    ) -> Result<(), E> {
        self.read_counters(now_ns, false, sink)
    }

    fn read_counters<E>(
        &mut self,
        now_ns: u64,
        last: bool,
        sink: &mut impl FnMut(Item<'_>) -> Result<(), E>,
    ) -> Result<(), E> {
        let lost = std::mem::take(&mut self.lost_since_poll);
        for mut f in self.explainer.poll(self.node.as_mut(), now_ns, last) {
            if lost > 0 && f.packet.is_none() {
                // The per-packet events this counter finding lacks may be among the lost.
                f.explanation.push_str(&format!(
                    " ({lost} ring-buffer records were lost since the previous reading: \
                     the per-packet events of these may be among them)"
                ));
            }
            // A counter-only clash is placed on the pairs seen in flight only when none
            // could be missing: with records lost, a pair not seen may be the one.
            if lost == 0 {
                self.correlator.on_counter_finding(&f);
            }
            sink(Item::Finding {
                finding: &f,
                workload: None,
            })?;
        }
        self.correlator.tick(now_ns);
        self.emit_done(sink)
    }

    /// End of the run: the last counter reading, and every lookup still open.
    pub fn finish<E>(
        &mut self,
        now_ns: u64,
        sink: &mut impl FnMut(Item<'_>) -> Result<(), E>,
    ) -> Result<(), E> {
        self.read_counters(now_ns, true, sink)?;
        self.flush(now_ns, sink)
    }

    /// Closes every lookup still open, without a last counter reading.
    pub fn flush<E>(
        &mut self,
        now_ns: u64,
        sink: &mut impl FnMut(Item<'_>) -> Result<(), E>,
    ) -> Result<(), E> {
        self.correlator.flush(now_ns);
        self.emit_done(sink)
    }

    fn emit_done<E>(&mut self, sink: &mut impl FnMut(Item<'_>) -> Result<(), E>) -> Result<(), E> {
        for l in self.correlator.take_done() {
            sink(Item::Lookup(&l))?;
        }
        Ok(())
    }
}

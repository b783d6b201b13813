//! decode → enrich → explain → correlate, shared by `tracer watch` and `tracer lab`:
//! one record in, the items to show out (the event with its pod, findings, finished lookups).

use std::sync::Arc;

use crate::{
    events::{self, DecodeError, Event},
    explain::Explainer,
    kallsyms::Symbols,
    lookups::{Config, Correlator, Lookup},
    pods::{PodIndex, Workload},
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
    pub pods: PodIndex,
    pub correlator: Correlator,
    pub symbols: Symbols,
}

impl Pipeline {
    pub fn new(explainer: Explainer, pods: PodIndex, cfg: Config, symbols: Symbols) -> Self {
        Pipeline {
            explainer,
            pods,
            correlator: Correlator::new(cfg),
            symbols,
        }
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
                let w = self
                    .pods
                    .resolve(d.task.cgroup_id, d.task.netns, d.task.pid);
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
                sink(Item::Event { ev, workload: None })?;
                let finding = if matches!(ev, Event::NfDrop(_)) {
                    let sym = self.symbols.resolve(n.location);
                    self.explainer.drop_event(n, &sym)
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

    /// Reads the counters (findings that drop no packet) and advances the correlator's clock.
    pub fn poll<E>(
        &mut self,
        now_ns: u64,
        sink: &mut impl FnMut(Item<'_>) -> Result<(), E>,
    ) -> Result<(), E> {
        for f in self.explainer.poll(now_ns) {
            self.correlator.on_counter_finding(&f);
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
        self.poll(now_ns, sink)?;
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

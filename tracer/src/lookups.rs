//! From DNS packets to lookups: what one `getaddrinfo()` call looked like on the wire and
//! on the node, and what the application felt.
//!
//! A lookup is the set of queries a resolver sent for one name from one process:
//! - **siblings**: A and AAAA for the same name from one socket within a short window
//!   (glibc's `sendmmsg`, musl's back-to-back `sendto`), or from two sockets of the process;
//! - **retries**: the same name and type again after a gap (same socket, or a new socket
//!   with `single-request-reopen`);
//! - **search expansions**: with `ndots`, the resolver tries `name.<search domain>` for each
//!   search domain and moves on after a negative answer; those belong to the same lookup.
//!
//! Each query gets its conntrack fate from the drop or clash the kernel reported for it,
//! matched by the entry's original tuple (the query as the pod sent it, before DNAT/SNAT)
//! and the DNS id in the dropped payload, and its answer (matched by the client address,
//! server address, DNS id, name and type). Counter-only findings (a resolved clash seen only
//! as `clash_resolve` moving) are attached to the sibling pairs that were in flight in that
//! window, marked as such.
//!
//! Pure: no IO, no clock. The caller feeds events in ring order (which may differ slightly
//! from time order across CPUs), findings, and the time, and collects finished lookups.
//! Memory is bounded by [`Config::max_open`] lookups and [`Config::max_pending`] unmatched
//! fates; what is shed is counted.

use std::{
    collections::{HashMap, VecDeque},
    hash::BuildHasher as _,
    net::SocketAddr,
    sync::Arc,
};

use serde::{Deserialize, Serialize};

use crate::{
    dns,
    events::{DnsEvent, NfDropEvent},
    pods::Workload,
    verdict::{Finding, Verdict},
};

const MS: u64 = 1_000_000;
const SEC: u64 = 1_000_000_000;

/// The correlator's indexes are hit several times per packet: a fast hasher, with a fixed
/// seed so that a replay walks them as the live run did.
type Map<K, V> = HashMap<K, V, foldhash::fast::FixedState>;

/// A DNS name (already lowercased) as an index key; a collision only costs a comparison,
/// since every hit is checked against the name itself.
fn name_key(name: &str) -> u64 {
    foldhash::fast::FixedState::default().hash_one(name)
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Config {
    /// A and AAAA of one name sent this close together are siblings.
    pub sibling_window_ns: u64,
    /// The resolver's per-try timeout: a query without an answer after this is
    /// `unanswered` (glibc and musl default to 5 s).
    pub timeout_ns: u64,
    /// A retry is at least this long after the query it repeats; closer is a concurrent
    /// lookup of the same name by another thread.
    pub min_retry_gap_ns: u64,
    /// A lookup with no activity for this long is closed.
    pub idle_ns: u64,
    /// After the last answer of a name, wait this long for a sibling sent late or the next
    /// search expansion before closing the lookup.
    pub settle_ns: u64,
    /// A drop or clash belongs to a query sent at most this long before it.
    pub fate_window_ns: u64,
    /// Lookups of at least this latency are a problem even without a drop.
    pub slow_ns: u64,
    /// Finished lookups are held back this long before they are handed out, so a counter
    /// reading (every second) can still place a resolved clash on them. 0 for none.
    pub hold_ns: u64,
    pub max_open: usize,
    pub max_pending: usize,
    /// Lookups are handed out only once a ring-loss reading ([`Correlator::on_loss_reading`])
    /// covers their close, so that one whose records may have been lost is never handed out
    /// as complete. Set by live runs, which read the loss counters; traces keep it.
    #[serde(default)]
    pub loss_gate: bool,
}

impl Default for Config {
    fn default() -> Self {
        Config {
            sibling_window_ns: 100 * MS,
            timeout_ns: 5 * SEC,
            min_retry_gap_ns: 500 * MS,
            idle_ns: 12 * SEC,
            settle_ns: 100 * MS,
            fate_window_ns: 2 * SEC,
            slow_ns: SEC,
            hold_ns: 0,
            max_open: 65_536,
            max_pending: 16_384,
            loss_gate: false,
        }
    }
}

/// The DNS content of a packet, as much as the correlator needs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Wire {
    pub id: u16,
    pub response: bool,
    pub qname: String,
    pub qtype: u16,
    pub rcode: String,
    /// NOERROR with at least one answer record.
    pub positive: bool,
    pub answers: Vec<String>,
    pub truncated: bool,
}

impl Wire {
    /// `None` when the payload has no complete header and question.
    pub fn parse(payload: &[u8], full_len: usize) -> Option<Wire> {
        let m = dns::parse(payload, full_len).ok()?;
        let q = m.questions.first()?;
        let answers: Vec<String> = m.answers.iter().map(|r| r.data.to_string()).collect();
        let rcode = m.rcode.name().to_string();
        Some(Wire {
            id: m.id,
            response: m.response,
            qname: q.name.to_ascii_lowercase(),
            qtype: q.qtype,
            positive: rcode == "NOERROR" && !m.answers.is_empty(),
            rcode,
            answers,
            truncated: m.flags.tc,
        })
    }
}

/// The conntrack fate of one query (or of its answer).
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Fate {
    pub ts_ns: u64,
    pub verdict: Verdict,
    /// The netns whose conntrack did it (the node's, for a pod's query).
    pub netns: u32,
    /// The packet was lost.
    pub lost: bool,
    /// `packet`: a kernel event for this very packet; `counter`: a counter moved while
    /// this query was in flight and no other query could have caused it.
    pub attribution: &'static str,
    /// The answer, not the query, was hit.
    pub reply: bool,
    /// Where the entry sent the query (the DNAT target), when the entry was seen.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub nat_to: Option<SocketAddr>,
    /// The source the entry would have used after SNAT.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub nat_from: Option<SocketAddr>,
    pub explanation: String,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Answer {
    pub ts_ns: u64,
    pub rcode: String,
    pub answers: Vec<String>,
    pub truncated: bool,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Query {
    pub ts_ns: u64,
    pub qname: String,
    pub qtype: String,
    #[serde(skip)]
    pub qtype_code: u16,
    pub id: u16,
    /// The client's address and port. On the precise send path an unbound socket says
    /// `0.0.0.0:PORT` at send time; a finished lookup shows the routed address its answer
    /// or conntrack entry carried.
    pub src: SocketAddr,
    /// Where it was sent, as the pod addressed it (a service VIP before DNAT).
    pub server: SocketAddr,
    pub sock_cookie: u64,
    /// 1 for the first try of this name and type, 2 for the first retry, ...
    pub attempt: u32,
    /// Sent in one `sendmmsg` batch with its sibling.
    pub batch: bool,
    pub fate: Option<Fate>,
    pub answer: Option<Answer>,
    /// No answer came within the resolver's timeout.
    pub unanswered: bool,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Outcome {
    /// A positive answer.
    Answered,
    /// Every name tried was answered negatively (NXDOMAIN or no records).
    Negative,
    /// SERVFAIL, REFUSED and other error rcodes.
    Error,
    /// The resolver gave up: no answer for some query.
    Unanswered,
    /// Closed early to bound memory.
    Shed,
    /// Records of the tracer's ring buffer were lost while it was open (or shortly before
    /// it started): a query, answer or drop of it may be missing, so no verdict is drawn.
    Incomplete,
}

impl Outcome {
    /// Its name in JSON (`answered`, `negative`, …).
    pub fn name(self) -> &'static str {
        match self {
            Outcome::Answered => "answered",
            Outcome::Negative => "negative",
            Outcome::Error => "error",
            Outcome::Unanswered => "unanswered",
            Outcome::Shed => "shed",
            Outcome::Incomplete => "incomplete",
        }
    }
}

/// How the siblings of a lookup left the pod.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Siblings {
    /// `sendmmsg` (one batch), `same-socket` (back to back) or `two-sockets`.
    pub how: &'static str,
    pub gap_ns: u64,
}

/// A finished lookup.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Lookup {
    pub id: u64,
    pub workload: Arc<Workload>,
    pub netns: u32,
    pub cgroup_id: u64,
    pub pid: Option<u32>,
    pub comm: Option<String>,
    /// The first name tried.
    pub name: String,
    pub server: SocketAddr,
    pub start_ns: u64,
    pub end_ns: u64,
    /// What the application waited: first query to the answer that ended the lookup (or to
    /// when the resolver gave up).
    pub latency_ns: u64,
    pub outcome: Outcome,
    pub siblings: Option<Siblings>,
    /// Tries after the first (the highest attempt number minus one).
    pub retries: u32,
    pub queries: Vec<Query>,
    /// Why it took as long as it did, in one sentence.
    pub cause: String,
    /// Worth a timeline: something was lost, retried, raced, unanswered, failed or slow.
    pub problem: bool,
    /// Ring-buffer records lost (on any CPU) while it was open: then the outcome is
    /// `incomplete`.
    #[serde(skip_serializing_if = "is_zero")]
    pub lost_records: u64,
}

fn is_zero(n: &u64) -> bool {
    *n == 0
}

impl Lookup {
    /// The verdicts of the fates of its queries.
    pub fn verdicts(&self) -> Vec<Verdict> {
        let mut v: Vec<Verdict> = self
            .queries
            .iter()
            .filter_map(|q| q.fate.as_ref().map(|f| f.verdict))
            .collect();
        v.sort();
        v.dedup();
        v
    }
}

/// Who sent a query, for grouping: the process, or the cgroup and address when the
/// source could not see the process.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
enum ClientKey {
    Process {
        netns: u32,
        tgid: u32,
    },
    Cgroup {
        netns: u32,
        cgroup: u64,
        ip: std::net::IpAddr,
    },
}

/// (client address, server address) as the pod sees them: the key both the answer and the
/// conntrack entry's original tuple carry.
type FlowKey = (SocketAddr, SocketAddr);

/// The key a query of `flow` was filed under if its socket had no source address yet. The
/// precise send source (fentry `udp_sendmsg`) reads the socket before the kernel routes
/// the datagram: an unbound, unconnected socket (musl's resolver) still says `0.0.0.0:PORT`
/// there, while the answer and the conntrack entry carry the address the route chose.
fn unbound(flow: FlowKey) -> Option<FlowKey> {
    let any: std::net::IpAddr = match flow.0 {
        SocketAddr::V4(_) => std::net::Ipv4Addr::UNSPECIFIED.into(),
        SocketAddr::V6(_) => std::net::Ipv6Addr::UNSPECIFIED.into(),
    };
    (flow.0.ip() != any).then(|| (SocketAddr::new(any, flow.0.port()), flow.1))
}

struct Open {
    lookup: Lookup,
    client: ClientKey,
    last_ns: u64,
    /// Every type asked for the current name is answered: when, and what the lookup's
    /// outcome is unless another query joins within `settle_ns` (the sibling of a
    /// `sendmmsg` batch can leave after the first answer came back; a negative answer is
    /// followed by the next search expansion).
    settled: Option<(u64, Outcome)>,
    /// (address the socket said, server) -> the routed client address a packet of that
    /// flow carried, for queries sent before their socket had an address ([`unbound`]).
    routed: Vec<(FlowKey, SocketAddr)>,
    /// The last `sendmmsg` batch seen: its socket and how many of its messages have not
    /// been seen yet. A thread preempted inside `sendmmsg` can send the AAAA well after the
    /// A was answered; the lookup waits up to [`BATCH_WAIT_NS`] for it instead of settling.
    batch: Option<(u64, u32)>,
}

/// How long a settled lookup waits for the rest of its `sendmmsg` batch.
const BATCH_WAIT_NS: u64 = SEC;

impl Open {
    /// When a lookup settled at `t` closes: `settle_ns` later, or [`BATCH_WAIT_NS`] later
    /// while a message of its last `sendmmsg` batch is still to come.
    fn settle_due(&self, t: u64, cfg: &Config) -> u64 {
        let wait = if self.batch.is_some_and(|(_, left)| left > 0) {
            BATCH_WAIT_NS.max(cfg.settle_ns)
        } else {
            cfg.settle_ns
        };
        t.saturating_add(wait)
    }
}

/// A fate whose query has not been seen yet (events from another CPU can come first).
struct Pending {
    flow: FlowKey,
    dns_id: Option<u16>,
    fate: Fate,
}

/// What was shed to keep memory bounded.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct Shed {
    pub lookups: u64,
    pub fates: u64,
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct Stats {
    pub queries: u64,
    pub answers: u64,
    /// Answers no open query was waiting for (late, or the query was not seen).
    pub unmatched_answers: u64,
    pub fates: u64,
    /// Drops and clashes of DNS flows whose query was never seen.
    pub unmatched_fates: u64,
    /// Payloads that were not DNS the correlator could read.
    pub undecodable: u64,
    pub lookups: u64,
    pub problems: u64,
    /// Lookups handed out as `incomplete` (records lost in their window).
    pub incomplete: u64,
    /// Ring-buffer records lost, as the loss readings reported them.
    pub lost_records: u64,
    pub shed: Shed,
}

/// A finished lookup on its way out.
struct Closed {
    /// When it was settled (its last answer) or given up.
    at: u64,
    lookup: Lookup,
}

impl Closed {
    /// Until when a record of it could still come: a sibling sent late joins within
    /// `settle_ns` of the last answer.
    fn until(&self, cfg: &Config) -> u64 {
        self.at.saturating_add(cfg.settle_ns)
    }
}

/// The last ring-loss reading that found losses.
#[derive(Debug, Clone, Copy)]
struct Loss {
    /// The previous reading: the records were lost after it...
    from_ns: u64,
    /// ... and before this one.
    to_ns: u64,
    records: u64,
}

pub struct Correlator {
    cfg: Config,
    next_id: u64,
    open: Map<u64, Open>,
    /// Lookup ids in creation order, for shedding the oldest.
    order: VecDeque<u64>,
    /// (client, name) -> the open lookups of that client that asked that name.
    by_name: Map<(ClientKey, u64), Refs<u64>>,
    /// (client, first label) -> open lookups whose current name was answered negatively:
    /// where the next search expansion goes. Checked on use (a lookup may have moved on).
    negative: Map<(ClientKey, u64), Refs<u64>>,
    /// (flow, DNS id) -> the queries sent on it, as (lookup, query index).
    by_flow: Map<(FlowKey, u16), Refs<(u64, usize)>>,
    /// (client, DNS id) -> the same queries, for a packet whose server address is not the
    /// one the query was seen with: a DNAT in the sender's own OUTPUT hook (a host-network
    /// process asking a service VIP) shows the query to the backend on the fallback send
    /// path, while its answer comes back from the VIP, and the conntrack entry says VIP.
    by_client_id: Map<(SocketAddr, u16), Refs<(u64, usize)>>,
    pending: VecDeque<Pending>,
    /// Lookups whose every name was answered, by the time that happened: closed once
    /// `settle_ns` has passed on the correlator's clock.
    /// (when it is due, when it settled, lookup).
    settling: VecDeque<(u64, u64, u64)>,
    /// The latest time seen in an event or a tick.
    clock_ns: u64,
    /// The time of the previous `tick` (the previous counter reading).
    prev_tick_ns: u64,
    /// Finished lookups a counter reading can still place a resolved clash on, held for
    /// `hold_ns`.
    closing: VecDeque<Closed>,
    /// Finished lookups waiting for a loss reading that covers their close (`loss_gate`).
    unconfirmed: VecDeque<Closed>,
    /// Every loss before this time is known (`loss_gate`).
    loss_known_ns: u64,
    last_loss: Option<Loss>,
    done: Vec<Lookup>,
    pub stats: Stats,
}

fn client_key(d: &DnsEvent) -> ClientKey {
    match d.task.pid {
        Some(tgid) => ClientKey::Process {
            netns: d.task.netns,
            tgid,
        },
        None => ClientKey::Cgroup {
            netns: d.task.netns,
            cgroup: d.task.cgroup_id,
            ip: d.tuple.src.ip(),
        },
    }
}

fn first_label(name: &str) -> &str {
    name.split('.').next().unwrap_or(name)
}

/// The DNS id in a dropped payload, and whether it was an answer.
fn dropped_dns(ev: &NfDropEvent) -> Option<(u16, bool)> {
    if ev.payload.len() < 12 {
        return None;
    }
    let id = u16::from_be_bytes([ev.payload[0], ev.payload[1]]);
    Some((id, ev.payload[2] & 0x80 != 0))
}

impl Correlator {
    pub fn new(cfg: Config) -> Self {
        Correlator {
            cfg,
            next_id: 1,
            open: Map::default(),
            order: VecDeque::new(),
            by_name: Map::default(),
            negative: Map::default(),
            by_flow: Map::default(),
            by_client_id: Map::default(),
            pending: VecDeque::new(),
            settling: VecDeque::new(),
            clock_ns: 0,
            prev_tick_ns: 0,
            closing: VecDeque::new(),
            unconfirmed: VecDeque::new(),
            loss_known_ns: 0,
            last_loss: None,
            done: Vec::new(),
            stats: Stats::default(),
        }
    }

    pub fn config(&self) -> &Config {
        &self.cfg
    }

    /// Lookups still open.
    pub fn open_lookups(&self) -> usize {
        self.open.len()
    }

    /// A DNS query leaving a socket. `workload` is who sent it.
    pub fn on_send(&mut self, d: &DnsEvent, workload: Arc<Workload>) {
        let Some(w) = Wire::parse(&d.payload, d.payload_len as usize) else {
            self.stats.undecodable += 1;
            return;
        };
        if w.response {
            return;
        }
        self.advance(d.ts_ns);
        self.stats.queries += 1;
        let client = client_key(d);
        let lid = self.find_lookup(&client, d, &w);
        let lid = match lid {
            Some(lid) => lid,
            None => self.new_lookup(client, d, &w, workload),
        };
        let Some(open) = self.open.get_mut(&lid) else {
            return;
        };
        if !open.lookup.queries.iter().any(|q| q.qname == w.qname) {
            index_lid(&mut self.by_name, (client, name_key(&w.qname)), lid);
        }
        let attempt = 1 + open
            .lookup
            .queries
            .iter()
            .filter(|q| q.qname == w.qname && q.qtype_code == w.qtype)
            .count() as u32;
        // A repeat of a query that got no answer: the earlier one is now known unanswered.
        if attempt > 1 {
            open.lookup.retries = open.lookup.retries.max(attempt - 1);
            for q in open.lookup.queries.iter_mut() {
                if q.qname == w.qname && q.qtype_code == w.qtype && q.answer.is_none() {
                    q.unanswered = true;
                }
            }
        }
        // Siblings: the other type of the same name, close in time.
        if open.lookup.siblings.is_none() {
            if let Some(sib) = open.lookup.queries.iter().find(|q| {
                q.qname == w.qname
                    && q.qtype_code != w.qtype
                    && d.ts_ns.saturating_sub(q.ts_ns) <= self.cfg.sibling_window_ns
            }) {
                let how = if sib.sock_cookie == d.sock_cookie && sib.src == d.tuple.src {
                    if sib.batch && d.batch {
                        "sendmmsg"
                    } else {
                        "same-socket"
                    }
                } else {
                    "two-sockets"
                };
                open.lookup.siblings = Some(Siblings {
                    how,
                    gap_ns: d.ts_ns.saturating_sub(sib.ts_ns),
                });
            }
        }
        open.settled = None;
        if d.batch && d.batch_len > 0 {
            open.batch = match open.batch {
                Some((cookie, left)) if cookie == d.sock_cookie && left > 0 => {
                    Some((cookie, left - 1))
                }
                _ => Some((d.sock_cookie, d.batch_len - 1)),
            };
        }
        open.last_ns = open.last_ns.max(d.ts_ns);
        let idx = open.lookup.queries.len();
        open.lookup.queries.push(Query {
            ts_ns: d.ts_ns,
            qname: w.qname.clone(),
            qtype: dns::qtype_name(w.qtype).to_string(),
            qtype_code: w.qtype,
            id: w.id,
            src: d.tuple.src,
            server: d.tuple.dst,
            sock_cookie: d.sock_cookie,
            attempt,
            batch: d.batch,
            fate: None,
            answer: None,
            unanswered: false,
        });
        let flow = (d.tuple.src, d.tuple.dst);
        index(&mut self.by_flow, (flow, w.id), (lid, idx));
        index(&mut self.by_client_id, (d.tuple.src, w.id), (lid, idx));
        self.match_pending(flow);
    }

    /// A DNS answer delivered to a socket.
    pub fn on_recv(&mut self, d: &DnsEvent) {
        let Some(mut w) = Wire::parse(&d.payload, d.payload_len as usize) else {
            self.stats.undecodable += 1;
            return;
        };
        if !w.response {
            return;
        }
        self.advance(d.ts_ns);
        self.stats.answers += 1;
        let refs = self.refs(d.tuple.dst, d.tuple.src, w.id);
        // The latest try this answer can belong to: same id, name and type, sent before it,
        // not yet answered; a try whose packet was lost can not have been answered.
        let mut best: Option<(u64, usize, bool)> = None;
        for (lid, idx) in refs {
            let Some(q) = self.open.get(&lid).and_then(|o| o.lookup.queries.get(idx)) else {
                continue;
            };
            if q.id != w.id || q.qtype_code != w.qtype || q.qname != w.qname {
                continue;
            }
            if q.answer.is_some() || q.ts_ns > d.ts_ns + MS {
                continue;
            }
            let lost = q.fate.as_ref().is_some_and(|f| f.lost && !f.reply);
            let better = match best {
                None => true,
                Some((_, _, best_lost)) => best_lost || !lost,
            };
            if better {
                best = Some((lid, idx, lost));
            }
        }
        let Some((lid, idx, _)) = best else {
            self.stats.unmatched_answers += 1;
            return;
        };
        let Some(open) = self.open.get_mut(&lid) else {
            return;
        };
        if let Some(q) = open.lookup.queries.get_mut(idx) {
            learn_routed(&mut open.routed, q, d.tuple.dst);
            q.answer = Some(Answer {
                ts_ns: d.ts_ns,
                rcode: w.rcode.clone(),
                answers: std::mem::take(&mut w.answers),
                truncated: w.truncated,
            });
            q.unanswered = false;
        }
        open.last_ns = open.last_ns.max(d.ts_ns);
        // Is the current name complete? Every type asked for it has an answer on some try.
        let name = &w.qname;
        let mut types: Vec<(u16, Option<&Answer>)> = Vec::new();
        for q in open.lookup.queries.iter().filter(|q| &q.qname == name) {
            match types.iter_mut().find(|(t, _)| *t == q.qtype_code) {
                Some(e) => {
                    if q.answer.is_some() {
                        e.1 = q.answer.as_ref();
                    }
                }
                None => types.push((q.qtype_code, q.answer.as_ref())),
            }
        }
        if types.iter().any(|(_, a)| a.is_none()) {
            return;
        }
        let positive = types
            .iter()
            .any(|(_, a)| a.is_some_and(|a| a.rcode == "NOERROR" && !a.answers.is_empty()));
        let negative = types
            .iter()
            .all(|(_, a)| a.is_some_and(|a| a.rcode == "NOERROR" || a.rcode == "NXDOMAIN"));
        let outcome = if positive {
            Outcome::Answered
        } else if negative {
            Outcome::Negative
        } else {
            Outcome::Error
        };
        if let Some(o) = self.open.get_mut(&lid) {
            o.settled = Some((d.ts_ns, outcome));
            let due = o.settle_due(d.ts_ns, &self.cfg);
            self.settling.push_back((due, d.ts_ns, lid));
            if outcome == Outcome::Negative {
                let key = (o.client, name_key(first_label(&o.lookup.name)));
                index_lid(&mut self.negative, key, lid);
            }
        }
    }

    /// Moves the correlator's clock to `ts_ns` (if later) and closes the lookups that have
    /// been settled for `settle_ns` by then, so that a busy client's answered lookups do not
    /// pile up until the next tick.
    fn advance(&mut self, ts_ns: u64) {
        self.clock_ns = self.clock_ns.max(ts_ns);
        while let Some(&(due, t, lid)) = self.settling.front() {
            if self.clock_ns < due {
                break;
            }
            self.settling.pop_front();
            let Some(o) = self.open.get(&lid) else {
                continue;
            };
            // Still settled as of then: no query joined since.
            if let Some((st, outcome)) = o.settled {
                if st == t {
                    self.close(lid, t, outcome);
                }
            }
        }
    }

    /// A netfilter drop or a clash the kernel reported for one packet, with the finding the
    /// classifier made of it.
    /// Returns who sent the query it was about, when that query was seen.
    pub fn on_packet_finding(&mut self, ev: &NfDropEvent, f: &Finding) -> Option<Arc<Workload>> {
        let ct_orig = ev.conntrack.as_ref().map(|c| c.orig);
        let orig = ct_orig.or(ev.packet)?;
        let dns = dropped_dns(ev);
        let reply = dns.is_some_and(|(_, r)| r)
            || ev
                .packet
                .is_some_and(|p| ct_orig.is_some_and(|o| p.src == o.dst || p.src.port() == 53));
        // The flow as the pod sees it: from the entry's original tuple for a query; for an
        // answer dropped on the way back the original tuple is the query's too.
        let flow = (orig.src, orig.dst);
        let fate = Fate {
            ts_ns: ev.ts_ns,
            verdict: f.verdict,
            netns: f.netns,
            lost: f.verdict.lost_packet(),
            attribution: "packet",
            reply,
            nat_to: ev
                .conntrack
                .as_ref()
                .filter(|c| c.reply.src != c.orig.dst)
                .map(|c| c.reply.src),
            nat_from: ev
                .conntrack
                .as_ref()
                .filter(|c| c.reply.dst != c.orig.src)
                .map(|c| c.reply.dst),
            explanation: f.explanation.clone(),
        };
        self.stats.fates += 1;
        let who = self.attach(flow, dns.map(|(id, _)| id), &fate);
        if who.is_none() {
            self.pending.push_back(Pending {
                flow,
                dns_id: dns.map(|(id, _)| id),
                fate,
            });
            if self.pending.len() > self.cfg.max_pending {
                self.pending.pop_front();
                self.stats.shed.fates += 1;
            }
        }
        who
    }

    /// A finding from the counters alone (no packet), read after the previous `tick`. Only
    /// resolved clashes can be placed: on the A/AAAA pairs sent on one tuple since the
    /// previous reading, when there are no more of them than clashes counted.
    pub fn on_counter_finding(&mut self, f: &Finding) {
        if f.packet.is_some() || f.verdict != Verdict::InsertClashResolved {
            return;
        }
        let since = self.prev_tick_ns;
        let in_window = |l: &Lookup, q: &Query| {
            q.fate.is_none() && q.ts_ns > since && q.ts_ns <= f.ts_ns && same_tuple_sibling(l, q)
        };
        let lookups = self
            .open
            .values_mut()
            .map(|o| &mut o.lookup)
            .chain(self.closing.iter_mut().map(|c| &mut c.lookup));
        let candidates: Vec<&mut Lookup> = lookups
            .filter(|l| l.queries.iter().any(|q| in_window(l, q)))
            .collect();
        if candidates.is_empty() || candidates.len() as u64 > f.count {
            return;
        }
        for l in candidates {
            // The later sibling of the pair is the one that found the other's entry.
            let Some(i) = (0..l.queries.len())
                .rev()
                .find(|&i| in_window(l, &l.queries[i]))
            else {
                continue;
            };
            let q = &mut l.queries[i];
            {
                q.fate = Some(Fate {
                    ts_ns: f.ts_ns,
                    verdict: f.verdict,
                    netns: f.netns,
                    lost: false,
                    attribution: "counter",
                    reply: false,
                    nat_to: None,
                    nat_from: None,
                    explanation: format!(
                    "clash_resolve rose by {} in netns {} while this A/AAAA pair was in flight \
                     (not seen per packet on this kernel); nothing lost",
                    f.count, f.netns
                ),
                });
            }
            if l.cause.is_empty() || l.cause == "answered" {
                l.cause = cause(l);
                l.problem = true;
            }
        }
    }

    /// Gives `fate` to its query; who sent that query.
    fn attach(&mut self, flow: FlowKey, dns_id: Option<u16>, fate: &Fate) -> Option<Arc<Workload>> {
        // The latest query of this flow (and id) sent before the fate, without a fate yet.
        let mut best: Option<(u64, usize, u64)> = None;
        let refs: Vec<(u64, usize)> = match dns_id {
            Some(id) => self.refs(flow.0, flow.1, id).collect(),
            // No DNS header in the dropped packet: every query of the flow (rare; a walk).
            None => self
                .by_flow
                .iter()
                .filter(|(((c, s), _), _)| (*c, *s) == flow || unbound(flow) == Some((*c, *s)))
                .flat_map(|(_, v)| v.as_slice().iter().copied())
                .collect(),
        };
        for (lid, idx) in refs {
            let Some(q) = self.open.get(&lid).and_then(|o| o.lookup.queries.get(idx)) else {
                continue;
            };
            if dns_id.is_some_and(|id| id != q.id) || q.fate.is_some() {
                continue;
            }
            // Clocks are per CPU but the same source; allow a little skew.
            if q.ts_ns > fate.ts_ns + MS || fate.ts_ns > q.ts_ns + self.cfg.fate_window_ns {
                continue;
            }
            if fate.reply && q.answer.is_some() {
                continue;
            }
            if best.is_none_or(|(_, _, ts)| q.ts_ns >= ts) {
                best = Some((lid, idx, q.ts_ns));
            }
        }
        let (lid, idx, _) = best?;
        let o = self.open.get_mut(&lid)?;
        if let Some(q) = o.lookup.queries.get_mut(idx) {
            learn_routed(&mut o.routed, q, flow.0);
            q.fate = Some(fate.clone());
        }
        o.last_ns = o.last_ns.max(fate.ts_ns);
        Some(o.lookup.workload.clone())
    }

    /// The queries a packet from `client` to `server` can belong to: those of its flow,
    /// then those filed before the socket had an address ([`unbound`]).
    fn refs(
        &self,
        client: SocketAddr,
        server: SocketAddr,
        id: u16,
    ) -> impl Iterator<Item = (u64, usize)> + '_ {
        let flow = (client, server);
        let exact = self.by_flow.get(&(flow, id));
        let wild = unbound(flow).and_then(|w| self.by_flow.get(&(w, id)));
        // Only when the server address matched nothing: the same client and id, any server.
        let any_server = (exact.is_none() && wild.is_none())
            .then(|| {
                let c = self.by_client_id.get(&(client, id)).into_iter().flatten();
                let w = unbound(flow)
                    .and_then(|(w, _)| self.by_client_id.get(&(w, id)))
                    .into_iter()
                    .flatten();
                c.chain(w)
            })
            .into_iter()
            .flatten();
        exact
            .into_iter()
            .flatten()
            .chain(wild.into_iter().flatten())
            .chain(any_server)
            .copied()
    }

    fn match_pending(&mut self, flow: FlowKey) {
        if self.pending.is_empty() {
            return;
        }
        let mut i = 0;
        while i < self.pending.len() {
            let pending = self.pending[i].flow;
            if pending == flow || unbound(pending) == Some(flow) {
                let p = &self.pending[i];
                let (fl, id, fate) = (p.flow, p.dns_id, p.fate.clone());
                if self.attach(fl, id, &fate).is_some() {
                    self.pending.remove(i);
                    continue;
                }
            }
            i += 1;
        }
    }

    /// The open lookup a query joins, if any: the newest lookup of the same client that
    /// asked this name and takes the query as a sibling or a retry, or whose name was
    /// answered negatively and this is the next search expansion.
    fn find_lookup(&self, client: &ClientKey, d: &DnsEvent, w: &Wire) -> Option<u64> {
        // The newest lookup that takes the query: ids are kept ascending ([`index_lid`]), so
        // the first from the end.
        let same_name = self
            .by_name
            .get(&(*client, name_key(&w.qname)))
            .into_iter()
            .flatten()
            .rev()
            .copied()
            .find(|lid| {
                self.open
                    .get(lid)
                    .is_some_and(|o| self.takes_same_name(o, d, w))
            });
        let expansion = self
            .negative
            .get(&(*client, name_key(first_label(&w.qname))))
            .into_iter()
            .flatten()
            .rev()
            .copied()
            .find(|lid| {
                self.open.get(lid).is_some_and(|o| {
                    o.settled.is_some_and(|(_, x)| x == Outcome::Negative)
                        && first_label(&o.lookup.name) == first_label(&w.qname)
                        && !o.lookup.queries.iter().any(|q| q.qname == w.qname)
                })
            });
        same_name.max(expansion)
    }

    /// Whether `o`, which asked this query's name, takes it: as the sibling of a query
    /// already there, or as a retry.
    fn takes_same_name(&self, o: &Open, d: &DnsEvent, w: &Wire) -> bool {
        let l = &o.lookup;
        if !l.queries.iter().any(|q| q.qname == w.qname) {
            return false;
        }
        let prev = l
            .queries
            .iter()
            .rev()
            .find(|q| q.qname == w.qname && q.qtype_code == w.qtype);
        match prev {
            // The sibling of a query already there.
            None => true,
            Some(prev) => {
                let gap = d.ts_ns.saturating_sub(prev.ts_ns);
                // A retry: after a gap, on any socket of the process, of a query not
                // answered (or answered truncated or with SERVFAIL), or of an answered one
                // while the lookup still waits for another type (glibc resends both A and
                // AAAA, from a new socket).
                let redo = match &prev.answer {
                    None => true,
                    Some(a) => a.truncated || a.rcode == "SERVFAIL" || o.settled.is_none(),
                };
                gap >= self.cfg.min_retry_gap_ns && redo
            }
        }
    }

    fn new_lookup(
        &mut self,
        client: ClientKey,
        d: &DnsEvent,
        w: &Wire,
        workload: Arc<Workload>,
    ) -> u64 {
        let lid = self.next_id;
        self.next_id += 1;
        self.open.insert(
            lid,
            Open {
                lookup: Lookup {
                    id: lid,
                    workload,
                    netns: d.task.netns,
                    cgroup_id: d.task.cgroup_id,
                    pid: d.task.pid,
                    comm: d.task.comm.clone(),
                    name: w.qname.clone(),
                    server: d.tuple.dst,
                    start_ns: d.ts_ns,
                    end_ns: d.ts_ns,
                    latency_ns: 0,
                    outcome: Outcome::Unanswered,
                    siblings: None,
                    retries: 0,
                    queries: Vec::new(),
                    cause: String::new(),
                    problem: false,
                    // Its first try may have been among records lost shortly before: then
                    // this query is a retry and the lookup started earlier.
                    lost_records: self
                        .last_loss
                        .filter(|l| d.ts_ns <= l.to_ns.saturating_add(self.cfg.timeout_ns))
                        .map_or(0, |l| l.records),
                },
                client,
                last_ns: d.ts_ns,
                settled: None,
                routed: Vec::new(),
                batch: None,
            },
        );
        self.order.push_back(lid);
        while self.open.len() > self.cfg.max_open {
            let Some(old) = self.order.pop_front() else {
                break;
            };
            if self.open.contains_key(&old) {
                self.stats.shed.lookups += 1;
                self.close(old, d.ts_ns, Outcome::Shed);
            }
        }
        lid
    }

    /// Advances time: marks queries unanswered after the timeout, closes lookups that are
    /// idle or settled, and drops fates that never found their query.
    pub fn tick(&mut self, now_ns: u64) {
        self.advance(now_ns);
        let mut to_close = Vec::new();
        for (lid, o) in self.open.iter_mut() {
            for q in o.lookup.queries.iter_mut() {
                if q.answer.is_none() && now_ns.saturating_sub(q.ts_ns) >= self.cfg.timeout_ns {
                    q.unanswered = true;
                }
            }
            if let Some((t, outcome)) = o.settled {
                if now_ns >= o.settle_due(t, &self.cfg) {
                    to_close.push((*lid, t, outcome));
                    continue;
                }
            }
            if now_ns.saturating_sub(o.last_ns) >= self.cfg.idle_ns {
                to_close.push((*lid, now_ns, Outcome::Unanswered));
            }
        }
        to_close.sort_by_key(|(lid, _, _)| *lid);
        for (lid, ts, outcome) in to_close {
            self.close(lid, ts, outcome);
        }
        while let Some(p) = self.pending.front() {
            if now_ns.saturating_sub(p.fate.ts_ns) < self.cfg.fate_window_ns {
                break;
            }
            self.pending.pop_front();
            self.stats.unmatched_fates += 1;
        }
        while let Some(c) = self.closing.front() {
            if now_ns.saturating_sub(c.at) < self.cfg.hold_ns {
                break;
            }
            if let Some(c) = self.closing.pop_front() {
                self.release(c);
            }
        }
        self.prev_tick_ns = now_ns;
        if self.order.len() > 2 * self.open.len() + 1024 {
            let open = &self.open;
            self.order.retain(|id| open.contains_key(id));
        }
    }

    /// Closes everything still open (end of a run) as of `now_ns`.
    pub fn flush(&mut self, now_ns: u64) {
        self.tick(now_ns);
        let mut ids: Vec<u64> = self.open.keys().copied().collect();
        ids.sort();
        for lid in ids {
            let o = &self.open[&lid];
            let outcome = o.settled.map_or(Outcome::Unanswered, |(_, x)| x);
            self.close(lid, now_ns, outcome);
        }
        self.stats.unmatched_fates += self.pending.len() as u64;
        self.pending.clear();
        self.loss_known_ns = u64::MAX;
        while let Some(c) = self.closing.pop_front() {
            self.release(c);
        }
        self.confirm();
    }

    /// A reading of the ring-buffer loss counters at `to_ns`: `records` were lost since
    /// the previous reading (at `from_ns`). Every lookup that was open in that window, or
    /// closed within it, is `incomplete`; so is one that starts within the resolver's
    /// timeout after it (its first try may have been lost). With `loss_gate`, lookups
    /// closed before `to_ns` are handed out now.
    pub fn on_loss_reading(&mut self, from_ns: u64, to_ns: u64, records: u64) {
        if records > 0 {
            self.stats.lost_records += records;
            self.last_loss = Some(Loss {
                from_ns,
                to_ns,
                records,
            });
            for o in self.open.values_mut() {
                o.lookup.lost_records += records;
            }
            for c in self.closing.iter_mut().chain(self.unconfirmed.iter_mut()) {
                if c.until(&self.cfg) >= from_ns {
                    c.lookup.lost_records += records;
                    incomplete(&mut c.lookup);
                }
            }
        }
        self.loss_known_ns = self.loss_known_ns.max(to_ns);
        self.confirm();
    }

    /// Finished lookups wait for a loss reading (`loss_gate`).
    pub fn awaits_loss_reading(&self) -> bool {
        !self.unconfirmed.is_empty()
    }

    /// The last reading that found ring-buffer losses: (from, to, records).
    pub fn last_loss(&self) -> Option<(u64, u64, u64)> {
        self.last_loss.map(|l| (l.from_ns, l.to_ns, l.records))
    }

    /// A finished lookup leaves the hold: handed out, or (with `loss_gate`) kept until a
    /// loss reading covers its close.
    fn release(&mut self, c: Closed) {
        if self.cfg.loss_gate && c.until(&self.cfg) > self.loss_known_ns {
            self.unconfirmed.push_back(c);
        } else {
            self.done.push(c.lookup);
        }
    }

    /// Hands out the lookups that a loss reading now covers.
    fn confirm(&mut self) {
        while let Some(c) = self.unconfirmed.front() {
            if c.until(&self.cfg) > self.loss_known_ns {
                break;
            }
            if let Some(c) = self.unconfirmed.pop_front() {
                self.done.push(c.lookup);
            }
        }
    }

    /// Lookups finished since the last call, in the order they finished.
    pub fn take_done(&mut self) -> Vec<Lookup> {
        self.stats.lookups += self.done.len() as u64;
        self.stats.problems += self.done.iter().filter(|l| l.problem).count() as u64;
        self.stats.incomplete += self
            .done
            .iter()
            .filter(|l| l.outcome == Outcome::Incomplete)
            .count() as u64;
        std::mem::take(&mut self.done)
    }

    fn close(&mut self, lid: u64, end_ns: u64, outcome: Outcome) {
        let Some(o) = self.open.remove(&lid) else {
            return;
        };
        for (i, q) in o.lookup.queries.iter().enumerate() {
            let of_this = |&(l, _): &(u64, usize)| l == lid;
            unindex(&mut self.by_flow, ((q.src, q.server), q.id), of_this);
            unindex(&mut self.by_client_id, (q.src, q.id), of_this);
            // Each name once.
            if o.lookup.queries[..i].iter().all(|p| p.qname != q.qname) {
                unindex_lid(&mut self.by_name, (o.client, name_key(&q.qname)), lid);
            }
        }
        unindex_lid(
            &mut self.negative,
            (o.client, name_key(first_label(&o.lookup.name))),
            lid,
        );
        let mut l = o.lookup;
        // Every query from an unbound socket gets the address one of that socket's packets
        // was seen with (so a pair stays one tuple, also when only one was answered).
        for q in l.queries.iter_mut() {
            if let Some((_, routed)) = o.routed.iter().find(|(k, _)| *k == (q.src, q.server)) {
                q.src = *routed;
            }
        }
        l.outcome = outcome;
        let last_answer = l
            .queries
            .iter()
            .filter_map(|q| q.answer.as_ref().map(|a| a.ts_ns))
            .max();
        l.end_ns = match outcome {
            Outcome::Answered | Outcome::Error | Outcome::Negative => last_answer.unwrap_or(end_ns),
            Outcome::Unanswered | Outcome::Shed | Outcome::Incomplete => {
                // The resolver gave up one timeout after its last try.
                let last_send = l
                    .queries
                    .iter()
                    .map(|q| q.ts_ns)
                    .max()
                    .unwrap_or(l.start_ns);
                for q in l.queries.iter_mut().filter(|q| q.answer.is_none()) {
                    if outcome == Outcome::Unanswered {
                        q.unanswered = true;
                    }
                }
                (last_send + self.cfg.timeout_ns).min(end_ns.max(last_send))
            }
        };
        l.latency_ns = l.end_ns.saturating_sub(l.start_ns);
        l.cause = cause(&l);
        l.problem = outcome != Outcome::Answered && outcome != Outcome::Negative
            || l.retries > 0
            || l.latency_ns >= self.cfg.slow_ns
            || l.queries.iter().any(|q| q.fate.is_some() || q.unanswered);
        if l.lost_records > 0 {
            incomplete(&mut l);
        }
        // Held only if a counter reading can still place a resolved clash on it.
        let hold = self.cfg.hold_ns > 0
            && l.queries
                .iter()
                .any(|q| q.fate.is_none() && same_tuple_sibling(&l, q));
        let c = Closed {
            at: end_ns,
            lookup: l,
        };
        if hold {
            self.closing.push_back(c);
        } else {
            self.release(c);
        }
    }
}

/// The values of one index key: almost always one, kept inline (no allocation per query).
#[derive(Debug)]
enum Refs<T> {
    One(T),
    Many(Vec<T>),
}

impl<T> Refs<T> {
    fn as_slice(&self) -> &[T] {
        match self {
            Refs::One(v) => std::slice::from_ref(v),
            Refs::Many(v) => v,
        }
    }
}

impl<'a, T> IntoIterator for &'a Refs<T> {
    type Item = &'a T;
    type IntoIter = std::slice::Iter<'a, T>;

    fn into_iter(self) -> Self::IntoIter {
        self.as_slice().iter()
    }
}

/// Adds `v` to the index entry `key`, once.
fn index<K: std::hash::Hash + Eq, T: Copy + PartialEq>(map: &mut Map<K, Refs<T>>, key: K, v: T) {
    match map.entry(key) {
        std::collections::hash_map::Entry::Vacant(e) => {
            e.insert(Refs::One(v));
        }
        std::collections::hash_map::Entry::Occupied(mut e) => {
            let refs = e.get_mut();
            if refs.as_slice().contains(&v) {
                return;
            }
            match refs {
                Refs::One(a) => *refs = Refs::Many(vec![*a, v]),
                Refs::Many(all) => all.push(v),
            }
        }
    }
}

/// Adds lookup id `lid` to the index entry `key`, once, keeping the ids ascending. A new
/// lookup has the highest id, so this is a push; a busy client's hot name can have
/// thousands of open lookups, and [`Correlator::find_lookup`] wants the newest that takes a
/// query: it walks from the end and stops at the first.
fn index_lid<K: std::hash::Hash + Eq>(map: &mut Map<K, Refs<u64>>, key: K, lid: u64) {
    match map.entry(key) {
        std::collections::hash_map::Entry::Vacant(e) => {
            e.insert(Refs::One(lid));
        }
        std::collections::hash_map::Entry::Occupied(mut e) => {
            let refs = e.get_mut();
            match refs {
                Refs::One(a) if *a == lid => {}
                Refs::One(a) => {
                    let a = *a;
                    *refs = Refs::Many(if a < lid { vec![a, lid] } else { vec![lid, a] });
                }
                Refs::Many(all) => {
                    if let Err(at) = all.binary_search(&lid) {
                        all.insert(at, lid);
                    }
                }
            }
        }
    }
}

/// Takes lookup id `lid` out of the index entry `key` (and the entry, once empty).
fn unindex_lid<K: std::hash::Hash + Eq>(map: &mut Map<K, Refs<u64>>, key: K, lid: u64) {
    let empty = match map.get_mut(&key) {
        None => return,
        Some(Refs::One(v)) => *v == lid,
        Some(Refs::Many(all)) => {
            if let Ok(at) = all.binary_search(&lid) {
                all.remove(at);
            }
            all.is_empty()
        }
    };
    if empty {
        map.remove(&key);
    }
}

/// Takes what `gone` says out of the index entry `key` (and the entry, once empty).
fn unindex<K: std::hash::Hash + Eq, T>(
    map: &mut Map<K, Refs<T>>,
    key: K,
    gone: impl Fn(&T) -> bool,
) {
    let empty = match map.get_mut(&key) {
        None => return,
        Some(Refs::One(v)) => gone(v),
        Some(Refs::Many(all)) => {
            all.retain(|r| !gone(r));
            all.is_empty()
        }
    };
    if empty {
        map.remove(&key);
    }
}

/// Makes a finished lookup `incomplete`: records were lost in its window, so what it
/// lacks (an answer, a retry, a drop) may be the tracer's loss, not the network's. The
/// queries, answers and drops that were seen stay; no query is called unanswered.
fn incomplete(l: &mut Lookup) {
    if l.outcome == Outcome::Shed {
        return;
    }
    l.outcome = Outcome::Incomplete;
    for q in l.queries.iter_mut() {
        q.unanswered = false;
    }
    l.cause = cause(l);
    // A drop the kernel reported for one of its packets is evidence still worth showing.
    l.problem = l
        .queries
        .iter()
        .any(|q| q.fate.as_ref().is_some_and(|f| f.attribution == "packet"));
}

/// Notes the routed client address a packet of `q` carried, if `q` was sent before its
/// socket had one.
fn learn_routed(routed: &mut Vec<(FlowKey, SocketAddr)>, q: &Query, client: SocketAddr) {
    let key = (q.src, q.server);
    if unbound((client, q.server)) == Some(key) && !routed.iter().any(|(k, _)| *k == key) {
        routed.push((key, client));
    }
}

/// `q` is one of an A/AAAA pair sent on the same tuple (the pair that can race).
fn same_tuple_sibling(l: &Lookup, q: &Query) -> bool {
    l.queries.iter().any(|o| {
        o.qname == q.qname && o.qtype_code != q.qtype_code && o.src == q.src && o.server == q.server
    })
}

fn secs(ns: u64) -> String {
    format!("{:.1} s", ns as f64 / 1e9)
}

/// Who retried: the process name, or "the resolver".
fn resolver(l: &Lookup) -> String {
    l.comm.clone().unwrap_or_else(|| "the resolver".into())
}

/// What happened to a packet the kernel dropped, as the end of a sentence.
fn dropped_words(v: Verdict) -> String {
    match v {
        Verdict::InsertClashDropped => "lost the conntrack insert race on the node".to_string(),
        Verdict::SnatPortClash => "lost the SNAT port race on the node (insert failed)".to_string(),
        Verdict::TableFull => "was dropped because the node's conntrack table was full".to_string(),
        Verdict::Invalid => "was dropped as INVALID by conntrack".to_string(),
        Verdict::RulesetDrop => "was dropped by a firewall rule on the node".to_string(),
        v => format!("was dropped ({})", v.name()),
    }
}

/// One sentence: why the lookup took what it took.
pub fn cause(l: &Lookup) -> String {
    let lost = l
        .queries
        .iter()
        .find(|q| q.fate.as_ref().is_some_and(|f| f.lost));
    if l.outcome == Outcome::Incomplete {
        let missing = format!(
            "{} ring-buffer record(s) were lost while it was open (the tracer fell behind)",
            l.lost_records
        );
        return match lost.and_then(|q| Some((q, q.fate.as_ref()?))) {
            Some((q, f)) => format!(
                "{} {}; {missing}, so its retries and answers may be missing",
                q.qtype,
                dropped_words(f.verdict)
            ),
            None => format!(
                "incomplete: {missing}; a query, answer or drop of it may be missing, so no \
                 verdict is drawn"
            ),
        };
    }
    if let Some(q) = lost {
        let f = q.fate.as_ref().expect("found with a fate");
        let what = dropped_words(f.verdict);
        let dir = if f.reply { " (its answer)" } else { "" };
        let retry = l.queries.iter().find(|r| {
            r.qname == q.qname && r.qtype_code == q.qtype_code && r.attempt == q.attempt + 1
        });
        let after = match retry {
            Some(r) => format!(
                ", {} retried after {}",
                resolver(l),
                secs(r.ts_ns.saturating_sub(q.ts_ns))
            ),
            None if l.outcome == Outcome::Unanswered => ", and no retry was answered".into(),
            None => String::new(),
        };
        return format!("{}{dir} {what}{after}", q.qtype);
    }
    if let Some(q) = l.queries.iter().find(|q| q.unanswered) {
        let retry = l.queries.iter().find(|r| {
            r.qname == q.qname && r.qtype_code == q.qtype_code && r.attempt == q.attempt + 1
        });
        let after = match retry {
            Some(r) => format!(
                ", {} retried after {}",
                resolver(l),
                secs(r.ts_ns.saturating_sub(q.ts_ns))
            ),
            None => String::new(),
        };
        return format!(
            "{} got no answer and no drop was seen on this node (lost upstream, or the server did not answer){after}",
            q.qtype
        );
    }
    if l.queries.iter().any(|q| {
        q.fate
            .as_ref()
            .is_some_and(|f| f.verdict == Verdict::InsertClashResolved)
    }) {
        return "A and AAAA raced to insert one conntrack entry; the kernel resolved the clash, nothing lost"
            .into();
    }
    match l.outcome {
        Outcome::Error => {
            let rcode = l
                .queries
                .iter()
                .filter_map(|q| q.answer.as_ref())
                .map(|a| a.rcode.clone())
                .find(|r| r != "NOERROR" && r != "NXDOMAIN")
                .unwrap_or_default();
            format!("the server answered {rcode}")
        }
        Outcome::Shed => "closed early: too many lookups open (memory bound)".into(),
        _ if l.retries > 0 => format!(
            "retried {} time(s) without a drop seen on this node",
            l.retries
        ),
        _ => "answered".into(),
    }
}

#[cfg(test)]
#[path = "lookups_tests.rs"]
mod tests;

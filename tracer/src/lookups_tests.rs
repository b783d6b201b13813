//! The correlator driven by synthetic event streams (real DNS wire bytes, no kernel).

use std::{net::SocketAddr, sync::Arc};

use super::*;
use crate::{
    events::{Conntrack, FiveTuple, TaskInfo},
    pods::Workload,
    traffic::{dns_query, dns_response as response, QTYPE_A, QTYPE_AAAA},
};

const MS: u64 = 1_000_000;
const S: u64 = 1_000_000_000;
const POD_NETNS: u32 = 4026530001;
const NODE_NETNS: u32 = 4026530002;

fn pod_addr(port: u16) -> SocketAddr {
    SocketAddr::from(([10, 0, 0, 2], port))
}
fn vip() -> SocketAddr {
    SocketAddr::from(([10, 96, 0, 10], 53))
}
fn backend() -> SocketAddr {
    SocketAddr::from(([10, 1, 0, 5], 53))
}

fn workload() -> Arc<Workload> {
    Arc::new(Workload::host(Some("test".into())))
}

struct Stream {
    c: Correlator,
    pid: u32,
}

#[allow(clippy::too_many_arguments)]
fn dns_event(
    ts: u64,
    pid: Option<u32>,
    cookie: u64,
    src: SocketAddr,
    dst: SocketAddr,
    batch: bool,
    payload: Vec<u8>,
) -> DnsEvent {
    DnsEvent {
        ts_ns: ts,
        source: "cgroup_skb/egress",
        task: TaskInfo {
            pid,
            tid: pid,
            comm: pid.map(|_| "getent".to_string()),
            cgroup_id: 77,
            netns: POD_NETNS,
        },
        sock_cookie: cookie,
        tuple: FiveTuple {
            proto: 17,
            src,
            dst,
        },
        batch,
        batch_len: if batch { 2 } else { 0 },
        payload_len: payload.len() as u32,
        payload,
    }
}

impl Stream {
    fn new() -> Self {
        Stream::with(Config::default())
    }
    fn with(cfg: Config) -> Self {
        Stream {
            c: Correlator::new(cfg),
            pid: 4242,
        }
    }
    #[allow(clippy::too_many_arguments)]
    fn send(
        &mut self,
        ts: u64,
        port: u16,
        cookie: u64,
        id: u16,
        name: &str,
        qtype: u16,
        batch: bool,
    ) -> Vec<u8> {
        let q = dns_query(id, name, qtype).unwrap();
        self.c.on_send(
            &dns_event(
                ts,
                Some(self.pid),
                cookie,
                pod_addr(port),
                vip(),
                batch,
                q.clone(),
            ),
            workload(),
        );
        q
    }
    fn answer(&mut self, ts: u64, port: u16, query: &[u8], rcode: u8, positive: bool) {
        let r = response(query, rcode, positive);
        self.c.on_recv(&dns_event(
            ts,
            Some(self.pid),
            1,
            vip(),
            pod_addr(port),
            false,
            r,
        ));
    }
    fn drop_query(
        &mut self,
        ts: u64,
        port: u16,
        query: &[u8],
        verdict: Verdict,
        snat: bool,
    ) -> Option<Arc<Workload>> {
        let orig = FiveTuple {
            proto: 17,
            src: pod_addr(port),
            dst: vip(),
        };
        let reply = if snat {
            FiveTuple {
                proto: 17,
                src: vip(),
                dst: SocketAddr::from(([192, 168, 0, 1], port)),
            }
        } else {
            FiveTuple {
                proto: 17,
                src: backend(),
                dst: pod_addr(port),
            }
        };
        let ev = NfDropEvent {
            ts_ns: ts,
            source: "tp_btf/kfree_skb",
            netns: NODE_NETNS,
            ifindex: 3,
            location: 0,
            reason: 12,
            verdict: 0,
            packet: Some(FiveTuple {
                proto: 17,
                src: reply.dst,
                dst: reply.src,
            }),
            conntrack: Some(Conntrack {
                status: 0,
                confirmed: false,
                orig,
                reply,
            }),
            clash_winner: None,
            payload_len: query.len() as u32,
            payload: query[..query.len().min(64)].to_vec(),
        };
        let f = finding(verdict, ts, ev.packet, ev.conntrack.clone());
        self.c.on_packet_finding(&ev, &f)
    }
    fn done(&mut self, now: u64) -> Vec<Lookup> {
        self.c.tick(now);
        self.c.take_done()
    }
}

fn finding(
    verdict: Verdict,
    ts: u64,
    packet: Option<FiveTuple>,
    conntrack: Option<Conntrack>,
) -> Finding {
    Finding {
        verdict,
        netns: NODE_NETNS,
        ts_ns: ts,
        count: 1,
        source: "tp_btf/kfree_skb",
        packet,
        conntrack,
        nat_clash: None,
        lost_to: None,
        nat_targets_differ: None,
        explanation: format!("{} for the test", verdict.name()),
    }
}

#[test]
fn sendmmsg_siblings_answered_make_one_healthy_lookup() {
    let mut s = Stream::new();
    let a = s.send(0, 40000, 9, 0x1111, "svc.example", QTYPE_A, true);
    let aaaa = s.send(20_000, 40000, 9, 0x2222, "svc.example", QTYPE_AAAA, true);
    s.answer(300_000, 40000, &a, 0, true);
    assert!(s.done(400_000).is_empty(), "closed before the AAAA answer");
    s.answer(500_000, 40000, &aaaa, 0, true);
    assert!(s.done(50 * MS).is_empty(), "a late query may still join");
    let done = s.done(200 * MS);
    assert_eq!(done.len(), 1);
    let l = &done[0];
    assert_eq!(l.outcome, Outcome::Answered);
    assert_eq!(l.name, "svc.example");
    assert_eq!(
        l.siblings,
        Some(Siblings {
            how: "sendmmsg",
            gap_ns: 20_000
        })
    );
    assert_eq!(l.latency_ns, 500_000);
    assert_eq!(l.retries, 0);
    assert!(!l.problem);
    assert_eq!(
        l.queries[0].answer.as_ref().unwrap().answers,
        vec!["10.77.0.99"]
    );
    assert_eq!(
        l.queries[1].answer.as_ref().unwrap().answers,
        vec!["fd77::99"]
    );
    assert_eq!(s.c.open_lookups(), 0);
    assert_eq!(s.c.stats.lookups, 1);
}

#[test]
fn a_sibling_that_leaves_after_the_first_answer_still_joins() {
    // Seen with glibc on veth: the A answer is delivered inside sendmmsg, before the
    // AAAA of the same batch leaves.
    let mut s = Stream::new();
    let a = s.send(0, 40000, 9, 1, "svc.example", QTYPE_A, true);
    s.answer(100_000, 40000, &a, 0, true);
    let aaaa = s.send(110_000, 40000, 9, 2, "svc.example", QTYPE_AAAA, true);
    s.answer(150_000, 40000, &aaaa, 0, true);
    let done = s.done(200 * MS);
    assert_eq!(done.len(), 1, "{done:#?}");
    assert_eq!(done[0].queries.len(), 2);
    assert_eq!(done[0].siblings.as_ref().unwrap().how, "sendmmsg");
    assert_eq!(done[0].latency_ns, 150_000);
}

#[test]
fn aaaa_lost_to_the_snat_race_then_retried_after_the_timeout() {
    let mut s = Stream::new();
    let a = s.send(0, 40000, 9, 0x1111, "svc.example", QTYPE_A, false);
    let aaaa = s.send(10_000, 40000, 9, 0x2222, "svc.example", QTYPE_AAAA, false);
    let who = s.drop_query(30_000, 40000, &aaaa, Verdict::SnatPortClash, true);
    assert_eq!(
        who.unwrap().label(),
        workload().label(),
        "the finding names the sender"
    );
    s.answer(200_000, 40000, &a, 0, true);
    assert!(s.done(S).is_empty());
    // glibc resends on the same socket with the same id after 5 s.
    let aaaa2 = s.send(
        5 * S + 10_000,
        40000,
        9,
        0x2222,
        "svc.example",
        QTYPE_AAAA,
        false,
    );
    s.answer(5 * S + 400_000, 40000, &aaaa2, 0, true);
    let done = s.done(6 * S);
    assert_eq!(done.len(), 1);
    let l = &done[0];
    assert_eq!(l.outcome, Outcome::Answered);
    assert_eq!(l.retries, 1);
    assert_eq!(l.siblings.as_ref().unwrap().how, "same-socket");
    assert_eq!(l.latency_ns, 5 * S + 400_000);
    let first = &l.queries[1];
    assert_eq!((first.qtype.as_str(), first.attempt), ("AAAA", 1));
    let fate = first.fate.as_ref().expect("the drop is on AAAA #1");
    assert_eq!(fate.verdict, Verdict::SnatPortClash);
    assert!(fate.lost && !fate.reply);
    assert_eq!(
        fate.nat_from,
        Some(SocketAddr::from(([192, 168, 0, 1], 40000)))
    );
    assert!(first.unanswered && first.answer.is_none());
    let retry = &l.queries[2];
    assert_eq!((retry.attempt, retry.fate.is_none()), (2, true));
    assert!(
        retry.answer.is_some(),
        "the answer belongs to the retry, not the lost try"
    );
    assert!(l.problem);
    assert_eq!(
        l.cause,
        "AAAA lost the SNAT port race on the node (insert failed), getent retried after 5.0 s"
    );
    assert_eq!(l.verdicts(), vec![Verdict::SnatPortClash]);
}

#[test]
fn glibc_resending_both_types_from_a_new_socket_is_one_retry_of_the_lookup() {
    // Measured with getent: A answered, AAAA dropped; after the timeout glibc sends A and
    // AAAA again from a new socket.
    let mut s = Stream::new();
    let a = s.send(0, 40000, 9, 1, "svc.example", QTYPE_A, true);
    let aaaa = s.send(10_000, 40000, 9, 2, "svc.example", QTYPE_AAAA, true);
    s.drop_query(11_000, 40000, &aaaa, Verdict::RulesetDrop, false);
    s.answer(200_000, 40000, &a, 0, true);
    let a2 = s.send(2 * S, 40001, 10, 3, "svc.example", QTYPE_A, true);
    let aaaa2 = s.send(
        2 * S + 10_000,
        40001,
        10,
        4,
        "svc.example",
        QTYPE_AAAA,
        true,
    );
    s.answer(2 * S + 100_000, 40001, &a2, 0, true);
    s.answer(2 * S + 200_000, 40001, &aaaa2, 0, true);
    let done = s.done(3 * S);
    assert_eq!(done.len(), 1, "{done:#?}");
    let l = &done[0];
    assert_eq!(l.queries.len(), 4);
    assert_eq!(l.retries, 1);
    assert_eq!(l.latency_ns, 2 * S + 200_000);
    assert_eq!(l.outcome, Outcome::Answered);
    assert_eq!(
        l.cause,
        "AAAA was dropped by a firewall rule on the node, getent retried after 2.0 s"
    );
}

#[test]
fn a_drop_reported_before_its_query_is_matched_when_the_query_arrives() {
    let mut s = Stream::new();
    let aaaa = dns_query(0x2222, "svc.example", QTYPE_AAAA).unwrap();
    // The drop came from another CPU and was read first.
    assert!(s
        .drop_query(30_000, 40000, &aaaa, Verdict::InsertClashDropped, false)
        .is_none());
    let a = s.send(0, 40000, 9, 0x1111, "svc.example", QTYPE_A, true);
    s.send(10_000, 40000, 9, 0x2222, "svc.example", QTYPE_AAAA, true);
    s.answer(100_000, 40000, &a, 0, true);
    let l = s.c.flush_one(20 * S);
    let fate = l.queries[1].fate.as_ref().expect("pending fate attached");
    assert_eq!(fate.verdict, Verdict::InsertClashDropped);
    assert_eq!(
        fate.nat_to,
        Some(backend()),
        "the DNAT target from the entry's reply tuple"
    );
    assert!(
        l.queries[0].fate.is_none(),
        "the A query (other id) has no fate"
    );
    assert_eq!(l.outcome, Outcome::Unanswered);
    assert!(
        l.cause
            .starts_with("AAAA lost the conntrack insert race on the node"),
        "{}",
        l.cause
    );
    assert_eq!(s.c.stats.unmatched_fates, 0);
}

#[test]
fn a_fate_that_never_finds_its_query_expires() {
    let mut s = Stream::new();
    let q = dns_query(0x3333, "other.example", QTYPE_A).unwrap();
    assert!(s
        .drop_query(S, 41000, &q, Verdict::TableFull, true)
        .is_none());
    s.c.tick(S + 1);
    assert_eq!(s.c.stats.unmatched_fates, 0);
    s.c.tick(S + s.c.config().fate_window_ns);
    assert_eq!(s.c.stats.unmatched_fates, 1);
}

#[test]
fn no_answer_and_no_drop_is_unanswered_upstream() {
    let mut s = Stream::new();
    s.send(0, 40000, 9, 0x1111, "svc.example", QTYPE_A, false);
    assert!(s.done(4 * S).is_empty());
    let done = s.done(13 * S);
    assert_eq!(done.len(), 1);
    let l = &done[0];
    assert_eq!(l.outcome, Outcome::Unanswered);
    assert!(l.queries[0].unanswered);
    assert_eq!(
        l.latency_ns,
        5 * S,
        "the resolver gives up one timeout after its last try"
    );
    assert!(
        l.cause.contains("no drop was seen on this node"),
        "{}",
        l.cause
    );
    assert!(l.problem);
}

#[test]
fn search_expansions_belong_to_one_lookup() {
    let mut s = Stream::new();
    let names = [
        "web.default.svc.cluster.local",
        "web.svc.cluster.local",
        "web",
    ];
    let mut t = 0;
    for (i, name) in names.iter().enumerate() {
        let id = 0x100 * (i as u16 + 1);
        let a = s.send(t, 40000 + i as u16, 9 + i as u64, id, name, QTYPE_A, true);
        let aaaa = s.send(
            t + 1000,
            40000 + i as u16,
            9 + i as u64,
            id + 1,
            name,
            QTYPE_AAAA,
            true,
        );
        let last = i == names.len() - 1;
        s.answer(
            t + 200_000,
            40000 + i as u16,
            &a,
            if last { 0 } else { 3 },
            last,
        );
        s.answer(
            t + 300_000,
            40000 + i as u16,
            &aaaa,
            if last { 0 } else { 3 },
            last,
        );
        t += 400_000;
        if !last {
            assert!(s.done(t - 50_000).is_empty(), "closed between expansions");
        }
    }
    let done = s.done(t + 200 * MS);
    assert_eq!(done.len(), 1, "{done:#?}");
    let l = &done[0];
    assert_eq!(l.queries.len(), 6);
    assert_eq!(l.name, names[0]);
    assert_eq!(l.outcome, Outcome::Answered);
    assert_eq!(l.retries, 0);
}

#[test]
fn a_negative_answer_closes_after_the_settle_time() {
    let mut s = Stream::new();
    let a = s.send(0, 40000, 9, 1, "nope.example", QTYPE_A, false);
    s.answer(1000, 40000, &a, 3, false);
    assert!(s.done(50 * MS).is_empty());
    let done = s.done(200 * MS);
    assert_eq!(done[0].outcome, Outcome::Negative);
    assert_eq!(done[0].latency_ns, 1000);
    assert!(!done[0].problem);
}

#[test]
fn servfail_is_an_error_outcome() {
    let mut s = Stream::new();
    let a = s.send(0, 40000, 9, 1, "bad.example", QTYPE_A, false);
    s.answer(1000, 40000, &a, 2, false);
    let done = s.done(200 * MS);
    assert_eq!(done[0].outcome, Outcome::Error);
    assert_eq!(done[0].cause, "the server answered SERVFAIL");
    assert!(done[0].problem);
}

#[test]
fn the_same_name_from_another_socket_at_once_is_another_lookup_not_a_retry() {
    let mut s = Stream::new();
    let a1 = s.send(0, 40000, 9, 1, "svc.example", QTYPE_A, false);
    let a2 = s.send(2 * MS, 40001, 10, 2, "svc.example", QTYPE_A, false);
    s.answer(3 * MS, 40000, &a1, 0, true);
    s.answer(4 * MS, 40001, &a2, 0, true);
    let done = s.done(200 * MS);
    assert_eq!(done.len(), 2);
    assert!(done
        .iter()
        .all(|l| l.retries == 0 && l.outcome == Outcome::Answered));
}

#[test]
fn a_retry_on_a_new_socket_single_request_reopen_joins_the_lookup() {
    let mut s = Stream::new();
    s.send(0, 40000, 9, 1, "svc.example", QTYPE_A, false);
    let a2 = s.send(S, 40002, 11, 7, "svc.example", QTYPE_A, false);
    s.answer(S + 1000, 40002, &a2, 0, true);
    let done = s.done(2 * S);
    assert_eq!(done.len(), 1);
    assert_eq!(done[0].retries, 1);
    assert_eq!(done[0].latency_ns, S + 1000);
    assert!(done[0].queries[0].unanswered);
    assert_eq!(
        done[0].cause,
        "A got no answer and no drop was seen on this node (lost upstream, or the server did not answer), getent retried after 1.0 s"
    );
}

#[test]
fn a_dropped_answer_is_a_reply_fate() {
    let mut s = Stream::new();
    let q = s.send(0, 40000, 9, 5, "svc.example", QTYPE_A, false);
    let r = response(&q, 0, true);
    let orig = FiveTuple {
        proto: 17,
        src: pod_addr(40000),
        dst: vip(),
    };
    let reply = FiveTuple {
        proto: 17,
        src: backend(),
        dst: pod_addr(40000),
    };
    let ev = NfDropEvent {
        ts_ns: 1000,
        source: "tp_btf/kfree_skb",
        netns: NODE_NETNS,
        ifindex: 2,
        location: 0,
        reason: 12,
        verdict: 0,
        packet: Some(reply),
        conntrack: Some(Conntrack {
            status: 0,
            confirmed: true,
            orig,
            reply,
        }),
        clash_winner: None,
        payload_len: r.len() as u32,
        payload: r[..r.len().min(64)].to_vec(),
    };
    let f = finding(
        Verdict::RulesetDrop,
        1000,
        Some(reply),
        ev.conntrack.clone(),
    );
    assert!(s.c.on_packet_finding(&ev, &f).is_some());
    let l = s.c.flush_one(20 * S);
    let fate = l.queries[0].fate.as_ref().unwrap();
    assert!(fate.reply && fate.lost);
    assert_eq!(
        l.cause,
        "A (its answer) was dropped by a firewall rule on the node, and no retry was answered"
    );
}

#[test]
fn a_resolved_clash_seen_only_by_the_counter_is_placed_on_the_pair_in_flight() {
    let cfg = Config {
        hold_ns: 1200 * MS,
        ..Config::default()
    };
    let mut s = Stream::with(cfg);
    s.c.tick(0);
    let a = s.send(10 * MS, 40000, 9, 1, "svc.example", QTYPE_A, true);
    let aaaa = s.send(10 * MS + 5000, 40000, 9, 2, "svc.example", QTYPE_AAAA, true);
    s.answer(11 * MS, 40000, &a, 0, true);
    s.answer(12 * MS, 40000, &aaaa, 0, true);
    assert!(
        s.c.take_done().is_empty(),
        "held for the next counter reading"
    );
    let mut f = finding(Verdict::InsertClashResolved, S, None, None);
    f.source = "conntrack statistics";
    s.c.on_counter_finding(&f);
    let done = s.done(S);
    assert!(done.is_empty());
    let done = s.done(2 * S);
    assert_eq!(done.len(), 1);
    let l = &done[0];
    let fate = l.queries[1]
        .fate
        .as_ref()
        .expect("the later sibling gets the clash");
    assert_eq!(
        (fate.verdict, fate.attribution, fate.lost),
        (Verdict::InsertClashResolved, "counter", false)
    );
    assert!(l.queries[0].fate.is_none());
    assert!(l.problem);
    assert!(
        l.cause.contains("the kernel resolved the clash"),
        "{}",
        l.cause
    );
}

#[test]
fn a_counter_is_not_placed_when_more_pairs_than_clashes_were_in_flight() {
    let cfg = Config {
        hold_ns: 1200 * MS,
        ..Config::default()
    };
    let mut s = Stream::with(cfg);
    s.c.tick(0);
    for (i, port) in [40000u16, 40001].into_iter().enumerate() {
        let a = s.send(10 * MS, port, 9 + i as u64, 1, "svc.example", QTYPE_A, true);
        let aaaa = s.send(
            10 * MS + 5000,
            port,
            9 + i as u64,
            2,
            "svc.example",
            QTYPE_AAAA,
            true,
        );
        s.answer(11 * MS, port, &a, 0, true);
        s.answer(12 * MS, port, &aaaa, 0, true);
    }
    s.c.on_counter_finding(&finding(Verdict::InsertClashResolved, S, None, None));
    let done = s.done(3 * S);
    assert_eq!(done.len(), 2);
    assert!(done
        .iter()
        .all(|l| l.queries.iter().all(|q| q.fate.is_none()) && !l.problem));
}

#[test]
fn memory_is_bounded_and_shedding_is_counted() {
    let cfg = Config {
        max_open: 8,
        max_pending: 4,
        ..Config::default()
    };
    let mut s = Stream::with(cfg);
    for i in 0..20u16 {
        s.pid = 1000 + i as u32;
        s.send(
            i as u64 * 1000,
            40000 + i,
            i as u64,
            i,
            "svc.example",
            QTYPE_A,
            false,
        );
        assert!(s.c.open_lookups() <= 8);
    }
    let shed = s.c.take_done();
    assert_eq!(shed.len(), 12);
    assert!(shed.iter().all(|l| l.outcome == Outcome::Shed));
    assert_eq!(s.c.stats.shed.lookups, 12);
    for i in 0..10u16 {
        let q = dns_query(i, "x.example", QTYPE_A).unwrap();
        s.drop_query(S, 50000 + i, &q, Verdict::TableFull, true);
    }
    assert_eq!(s.c.stats.shed.fates, 6);
}

#[test]
fn undecodable_payloads_are_counted_not_fatal() {
    let mut s = Stream::new();
    let ev = dns_event(0, Some(1), 1, pod_addr(1), vip(), false, vec![0xff; 5]);
    s.c.on_send(&ev, workload());
    s.c.on_recv(&ev);
    assert_eq!(s.c.stats.undecodable, 2);
    assert_eq!(s.c.open_lookups(), 0);
}

impl Correlator {
    /// Flushes and returns the only lookup.
    fn flush_one(&mut self, now: u64) -> Lookup {
        self.flush(now);
        let mut d = self.take_done();
        assert_eq!(d.len(), 1, "{d:#?}");
        d.remove(0)
    }
}

#[test]
fn outcome_names_are_their_json_names() {
    for o in [
        Outcome::Answered,
        Outcome::Negative,
        Outcome::Error,
        Outcome::Unanswered,
        Outcome::Shed,
    ] {
        assert_eq!(serde_json::to_value(o).unwrap(), o.name());
    }
}

#[test]
fn a_query_from_an_unbound_socket_is_answered_and_given_its_fate_by_the_routed_address() {
    // fentry udp_sendmsg sees musl's unconnected, unbound socket as 0.0.0.0:PORT; the
    // answer and the conntrack entry carry the address the route chose (10.0.0.2).
    let mut s = Stream::new();
    let unbound = SocketAddr::from(([0, 0, 0, 0], 38485));
    let a = dns_query(0x1111, "svc.example", QTYPE_A).unwrap();
    let aaaa = dns_query(0x2222, "svc.example", QTYPE_AAAA).unwrap();
    for (ts, q) in [(0, &a), (5 * MS, &aaaa)] {
        s.c.on_send(
            &dns_event(ts, Some(s.pid), 24, unbound, vip(), false, q.clone()),
            workload(),
        );
    }
    assert!(
        s.drop_query(6 * MS, 38485, &aaaa, Verdict::InsertClashDropped, false)
            .is_some(),
        "the drop's entry says 10.0.0.2:38485 and finds the query filed as 0.0.0.0:38485"
    );
    s.answer(10 * MS, 38485, &a, 0, true);
    // Another port's answer is not taken for it.
    s.answer(11 * MS, 38486, &aaaa, 0, true);
    assert_eq!(s.c.stats.unmatched_answers, 1);
    let l = s.c.flush_one(20 * S);
    assert!(l.queries[0].answer.is_some(), "{l:#?}");
    assert!(l.queries[1].answer.is_none());
    assert_eq!(
        l.queries[1].fate.as_ref().map(|f| f.verdict),
        Some(Verdict::InsertClashDropped)
    );
    // The lookup shows the address the packets left with, not what the socket said.
    let routed = SocketAddr::from(([10, 0, 0, 2], 38485));
    assert_eq!(l.queries[0].src, routed);
    assert_eq!(l.queries[1].src, routed);
}

#[test]
fn an_unbound_sockets_pair_takes_the_routed_address_one_of_them_was_seen_with() {
    // Only the A is answered; the AAAA was lost without a packet-level fate. Both were
    // sent from one socket, so both show the address the A's answer came to.
    let mut s = Stream::new();
    let unbound = SocketAddr::from(([0, 0, 0, 0], 38485));
    let other = SocketAddr::from(([0, 0, 0, 0], 40000));
    let a = dns_query(0x1111, "svc.example", QTYPE_A).unwrap();
    let aaaa = dns_query(0x2222, "svc.example", QTYPE_AAAA).unwrap();
    // The AAAA's retry leaves from another socket, and is not answered either.
    let send = |s: &mut Stream, ts, src, q: &Vec<u8>| {
        s.c.on_send(
            &dns_event(ts, Some(s.pid), 24, src, vip(), false, q.clone()),
            workload(),
        )
    };
    send(&mut s, 0, unbound, &a);
    send(&mut s, MS, unbound, &aaaa);
    s.answer(10 * MS, 38485, &a, 0, true);
    send(&mut s, S, other, &aaaa);
    let l = s.c.flush_one(20 * S);
    let routed = SocketAddr::from(([10, 0, 0, 2], 38485));
    assert_eq!(l.queries[0].src, routed, "{l:#?}");
    assert_eq!(l.queries[1].src, routed, "{l:#?}");
    assert_eq!(
        l.queries[2].src, other,
        "no packet of that socket was seen routed"
    );
}

#[test]
fn an_answered_lookup_closes_on_the_event_clock_without_a_tick() {
    let mut s = Stream::new();
    let a = s.send(0, 40000, 9, 1, "svc.example", QTYPE_A, false);
    s.answer(MS, 40000, &a, 0, true);
    assert!(s.c.take_done().is_empty(), "settling");
    // Another client's query 100 ms later moves the clock past the settle time.
    let _ = s.send(101 * MS, 40001, 10, 2, "other.example", QTYPE_A, false);
    let done = s.c.take_done();
    assert_eq!(done.len(), 1);
    assert_eq!(done[0].outcome, Outcome::Answered);
    assert_eq!(s.c.open_lookups(), 1);
}

#[test]
fn one_busy_client_keeps_each_name_in_its_own_lookup() {
    // One process, 64 sockets, 20,000 unique names at 10 µs apart, every one answered:
    // each query finds its lookup through the (client, name) index, not a walk.
    let mut s = Stream::new();
    let n = 20_000u64;
    for i in 0..n {
        let port = 40000 + (i % 64) as u16;
        let name = format!("q{i:08}.load.test");
        let q = s.send(
            i * 10_000,
            port,
            100 + i % 64,
            (i % 65_536) as u16,
            &name,
            QTYPE_A,
            false,
        );
        s.answer(i * 10_000 + 200_000, port, &q, 0, true);
    }
    let mut done = s.c.take_done();
    s.c.flush(n * 10_000 + S);
    done.extend(s.c.take_done());
    assert_eq!(done.len() as u64, n);
    assert!(done.iter().all(|l| l.outcome == Outcome::Answered
        && l.queries.len() == 1
        && l.retries == 0
        && !l.problem));
    assert_eq!(s.c.stats.unmatched_answers, 0);
}

#[test]
fn a_loss_makes_the_lookups_open_in_its_window_incomplete_never_unanswered() {
    let cfg = Config {
        loss_gate: true,
        ..Config::default()
    };
    let mut s = Stream::with(cfg);
    s.c.on_loss_reading(0, 0, 0);
    // Answered before the loss: handed out once a reading covers it.
    let a = s.send(10 * MS, 40000, 9, 1, "before.example", QTYPE_A, false);
    s.answer(11 * MS, 40000, &a, 0, true);
    // Open during the loss; its answer was among the lost records.
    let _ = s.send(20 * MS, 40001, 10, 2, "lost.example", QTYPE_A, false);
    s.c.tick(200 * MS);
    assert!(s.c.take_done().is_empty(), "no loss reading covers it yet");
    s.c.on_loss_reading(0, 150 * MS, 0);
    let done = s.c.take_done();
    assert_eq!(done.len(), 1);
    assert_eq!(
        (done[0].name.as_str(), done[0].outcome),
        ("before.example", Outcome::Answered)
    );
    s.c.on_loss_reading(150 * MS, 250 * MS, 7);
    // Starts after the loss, within the resolver's timeout: may be the retry of a lost try.
    let b = s.send(300 * MS, 40002, 11, 3, "after.example", QTYPE_A, false);
    s.answer(301 * MS, 40002, &b, 0, true);
    let done = s.done(20 * S);
    s.c.on_loss_reading(250 * MS, 21 * S, 0);
    let mut done: Vec<Lookup> = done.into_iter().chain(s.c.take_done()).collect();
    done.sort_by_key(|l| l.start_ns);
    assert_eq!(done.len(), 2);
    for l in &done {
        assert_eq!(l.outcome, Outcome::Incomplete, "{}", l.name);
        assert_eq!(l.lost_records, 7);
        assert!(l.queries.iter().all(|q| !q.unanswered));
        assert!(!l.problem);
        assert!(
            l.cause.contains("7 ring-buffer record(s) were lost"),
            "{}",
            l.cause
        );
    }
    assert_eq!(s.c.stats.incomplete, 2);
    assert_eq!(s.c.stats.lost_records, 7);
}

#[test]
fn without_the_loss_gate_lookups_are_handed_out_as_before() {
    let mut s = Stream::new();
    let a = s.send(0, 40000, 9, 1, "svc.example", QTYPE_A, false);
    s.answer(MS, 40000, &a, 0, true);
    assert_eq!(s.done(S).len(), 1);
}

#[test]
fn a_query_dnated_in_the_senders_own_output_hook_still_meets_its_answer_and_fate() {
    // The fallback send path sees the query after the sender's OUTPUT DNAT (to the
    // backend); the answer comes back from the VIP and the conntrack entry says VIP.
    let mut s = Stream::new();
    let q = dns_query(7, "svc.example", QTYPE_A).unwrap();
    s.c.on_send(
        &dns_event(
            0,
            Some(s.pid),
            9,
            pod_addr(40000),
            backend(),
            false,
            q.clone(),
        ),
        workload(),
    );
    let dropped = s.drop_query(MS, 40000, &q, Verdict::InsertClashDropped, false);
    assert!(
        dropped.is_some(),
        "the fate found the query sent to the backend"
    );
    s.answer(2 * MS, 40000, &q, 0, true);
    let done = s.done(S);
    assert_eq!(done.len(), 1);
    let l = &done[0];
    assert_eq!(l.queries.len(), 1);
    assert!(
        l.queries[0].answer.is_some(),
        "the answer from the VIP found it"
    );
    assert_eq!(
        l.queries[0].fate.as_ref().map(|f| f.verdict),
        Some(Verdict::InsertClashDropped)
    );
    assert_eq!(s.c.stats.unmatched_answers, 0);
}

#[test]
fn a_sendmmsg_batch_split_by_preemption_stays_one_lookup() {
    // glibc's A and AAAA in one sendmmsg; the thread is preempted after the A, whose answer
    // comes back; the AAAA leaves 300 ms later, while another client's traffic moves the
    // clock on.
    let mut s = Stream::new();
    let a = s.send(0, 40000, 9, 1, "svc.example", QTYPE_A, true);
    s.answer(MS, 40000, &a, 0, true);
    let _ = s.send(200 * MS, 40001, 10, 7, "other.example", QTYPE_A, false);
    let aaaa = s.send(300 * MS, 40000, 9, 2, "svc.example", QTYPE_AAAA, true);
    s.answer(301 * MS, 40000, &aaaa, 0, true);
    let done: Vec<Lookup> = s
        .done(5 * S)
        .into_iter()
        .filter(|l| l.name == "svc.example")
        .collect();
    assert_eq!(done.len(), 1, "{done:#?}");
    assert_eq!(done[0].queries.len(), 2);
    assert_eq!(done[0].outcome, Outcome::Answered);
    // Without a batch, an A answered and settled is a lookup of its own.
    let mut s = Stream::new();
    let a = s.send(0, 40000, 9, 1, "svc.example", QTYPE_A, false);
    s.answer(MS, 40000, &a, 0, true);
    let _ = s.send(200 * MS, 40001, 10, 7, "other.example", QTYPE_A, false);
    assert_eq!(
        s.c.take_done()
            .iter()
            .filter(|l| l.name == "svc.example")
            .count(),
        1
    );
}

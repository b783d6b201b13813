// A recorded run for the report's tests: real DNS wire bytes (`traffic::dns_query`,
// `traffic::dns_response`), drops with their conntrack entries, and counter findings, fed
// through the correlator the way `pipeline.rs` does (counter readings once a second).
//
// `include!`d by the unit tests (`src/report/tests.rs`, after `use crate as tracer;`) and by
// the browser test (`tests/report.rs`), so both check the same page. Only public API.

use std::{net::SocketAddr, sync::Arc};

use tracer::{
    events::{Conntrack, DnsEvent, FiveTuple, NfDropEvent, TaskInfo},
    lookups::{Config, Correlator, Lookup},
    output::Clock,
    pods::{Workload, WorkloadKind},
    traffic::{dns_query, dns_response, QTYPE_A, QTYPE_AAAA},
    verdict::{Finding, Verdict},
};

pub const MS: u64 = 1_000_000;
pub const SEC: u64 = 1_000_000_000;
/// Monotonic time of the run's first event (an hour after boot).
pub const T0: u64 = 3_600 * SEC;
/// 2026-11-22T20:25:45.051067Z, the wall-clock time of `T0`.
pub const WALL_T0_NS: i128 = 1_795_379_145_051_067_000;
pub const NODE_NETNS: u32 = 4026531840;
pub const VIP: ([u8; 4], u16) = ([10, 96, 0, 10], 53);
/// The host process whose comm and query name try to inject markup.
pub const EVIL_COMM: &str = "<img src=x onerror=alert(1)>";
pub const EVIL_NAME: &str = "<script>alert(1)</script>.example";

pub struct Run {
    pub lookups: Vec<Lookup>,
    pub findings: Vec<(Finding, Option<Arc<Workload>>)>,
    pub clock: Clock,
    pub facts: Vec<(String, String)>,
}

pub fn clock() -> Clock {
    Clock::fixed(WALL_T0_NS - T0 as i128)
}

pub fn pod(namespace: &str, name: &str) -> Arc<Workload> {
    Arc::new(Workload {
        kind: WorkloadKind::Pod,
        namespace: Some(namespace.into()),
        pod: Some(name.into()),
        uid: Some("1f3a0c2e-4b5d-4e6f-8a9b-0c1d2e3f4a5b".into()),
        container_id: None,
        runtime: Some("containerd".into()),
        cgroup: None,
        process: None,
    })
}

/// Who sends: a process in a pod's network namespace.
pub struct Client {
    pub workload: Arc<Workload>,
    pub pid: u32,
    pub comm: String,
    pub netns: u32,
    pub ip: [u8; 4],
}

impl Client {
    pub fn new(workload: Arc<Workload>, pid: u32, comm: &str, ip: [u8; 4]) -> Client {
        Client {
            workload,
            pid,
            comm: comm.into(),
            netns: 4026532000 + pid,
            ip,
        }
    }
    fn addr(&self, port: u16) -> SocketAddr {
        SocketAddr::from((self.ip, port))
    }
}

fn vip() -> SocketAddr {
    SocketAddr::from(VIP)
}

/// The correlator, fed like `pipeline.rs` feeds it, and the findings it was given.
pub struct Recorder {
    pub c: Correlator,
    pub findings: Vec<(Finding, Option<Arc<Workload>>)>,
    next_poll: u64,
    lookups: Vec<Lookup>,
}

impl Default for Recorder {
    fn default() -> Self {
        Recorder::new()
    }
}

impl Recorder {
    pub fn new() -> Recorder {
        let mut c = Correlator::new(Config {
            hold_ns: 1200 * MS,
            ..Config::default()
        });
        c.tick(T0 - SEC);
        Recorder {
            c,
            findings: Vec::new(),
            next_poll: T0,
            lookups: Vec::new(),
        }
    }

    /// The counter readings (ticks) due before `ts`.
    fn advance(&mut self, ts: u64) {
        while self.next_poll <= ts {
            self.c.tick(self.next_poll);
            self.lookups.extend(self.c.take_done());
            self.next_poll += SEC;
        }
    }

    fn event(
        &self,
        who: &Client,
        ts: u64,
        port: u16,
        out: bool,
        batch: bool,
        payload: Vec<u8>,
    ) -> DnsEvent {
        let (src, dst) = if out {
            (who.addr(port), vip())
        } else {
            (vip(), who.addr(port))
        };
        DnsEvent {
            ts_ns: ts,
            source: if out {
                "cgroup_skb/egress"
            } else {
                "cgroup_skb/ingress"
            },
            task: TaskInfo {
                pid: Some(who.pid),
                tid: Some(who.pid),
                comm: Some(who.comm.clone()),
                cgroup_id: 1000 + who.pid as u64,
                netns: who.netns,
            },
            sock_cookie: port as u64,
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

    /// A query leaves the pod; its bytes.
    #[expect(clippy::too_many_arguments, reason = "a packet has that many parts")]
    pub fn send(
        &mut self,
        who: &Client,
        ts: u64,
        port: u16,
        id: u16,
        name: &str,
        qtype: u16,
        batch: bool,
    ) -> Vec<u8> {
        self.advance(ts);
        let q = dns_query(id, name, qtype).expect("a valid name");
        let ev = self.event(who, ts, port, true, batch, q.clone());
        self.c.on_send(&ev, who.workload.clone());
        q
    }

    /// The answer to `query` reaches the pod.
    pub fn answer(
        &mut self,
        who: &Client,
        ts: u64,
        port: u16,
        query: &[u8],
        rcode: u8,
        positive: bool,
    ) {
        self.advance(ts);
        let ev = self.event(
            who,
            ts,
            port,
            false,
            false,
            dns_response(query, rcode, positive),
        );
        self.c.on_recv(&ev);
    }

    /// The node drops `query` (its conntrack entry: SNAT to `nat_from`, or DNAT to `nat_to`).
    #[expect(clippy::too_many_arguments, reason = "a packet has that many parts")]
    pub fn drop_query(
        &mut self,
        who: &Client,
        ts: u64,
        port: u16,
        query: &[u8],
        verdict: Verdict,
        nat_from: Option<SocketAddr>,
        nat_to: Option<SocketAddr>,
        explanation: &str,
    ) {
        self.advance(ts);
        let orig = FiveTuple {
            proto: 17,
            src: who.addr(port),
            dst: vip(),
        };
        let reply = FiveTuple {
            proto: 17,
            src: nat_to.unwrap_or(vip()),
            dst: nat_from.unwrap_or(who.addr(port)),
        };
        let ev = NfDropEvent {
            ts_ns: ts,
            source: "tp_btf/kfree_skb",
            netns: NODE_NETNS,
            ifindex: 3,
            location: 0,
            reason: 12,
            verdict: 0,
            packet: Some(orig),
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
        let f = finding(verdict, ts, 1, "tp_btf/kfree_skb", Some(orig), explanation);
        let who = self.c.on_packet_finding(&ev, &f);
        self.findings.push((f, who));
    }

    /// A drop of a packet whose flow the tracer saw no query for (no pod).
    pub fn drop_other(&mut self, ts: u64, verdict: Verdict, packet: FiveTuple, explanation: &str) {
        self.advance(ts);
        let ev = NfDropEvent {
            ts_ns: ts,
            source: "tp_btf/kfree_skb",
            netns: NODE_NETNS,
            ifindex: 3,
            location: 0,
            reason: 12,
            verdict: 0,
            packet: Some(packet),
            conntrack: None,
            clash_winner: None,
            payload_len: 0,
            payload: Vec::new(),
        };
        let f = finding(
            verdict,
            ts,
            1,
            "tp_btf/kfree_skb",
            Some(packet),
            explanation,
        );
        let who = self.c.on_packet_finding(&ev, &f);
        self.findings.push((f, who));
    }

    /// A counter reading that moved (`pipeline.rs`'s `poll`): the finding, then the tick.
    pub fn counter(&mut self, ts: u64, verdict: Verdict, count: u64, explanation: &str) {
        self.advance(ts - 1);
        let f = finding(
            verdict,
            ts,
            count,
            "conntrack statistics",
            None,
            explanation,
        );
        self.c.on_counter_finding(&f);
        self.c.tick(ts);
        self.lookups.extend(self.c.take_done());
        if self.next_poll == ts {
            self.next_poll += SEC;
        }
        self.findings.push((f, None));
    }

    pub fn finish(mut self, now: u64) -> Run {
        self.advance(now);
        self.c.flush(now);
        self.lookups.extend(self.c.take_done());
        Run {
            lookups: self.lookups,
            findings: self.findings,
            clock: clock(),
            facts: facts(),
        }
    }
}

fn finding(
    verdict: Verdict,
    ts: u64,
    count: u64,
    source: &'static str,
    packet: Option<FiveTuple>,
    explanation: &str,
) -> Finding {
    Finding {
        verdict,
        netns: NODE_NETNS,
        ts_ns: ts,
        count,
        source,
        packet,
        conntrack: None,
        nat_clash: None,
        lost_to: None,
        nat_targets_differ: None,
        explanation: explanation.into(),
    }
}

pub fn facts() -> Vec<(String, String)> {
    [
        ("node", "worker-3 (fixture)"),
        ("kernel", "Linux 6.18.0 x86_64"),
        ("probes", "dns-send cgroup_skb/egress, dns-receive cgroup_skb/ingress, netfilter-drop tp_btf/kfree_skb + conntrack counters"),
        ("started", "2026-11-22T20:25:45.051067Z"),
        ("ended", "2026-11-22T20:26:05.051067Z"),
        ("tracer", "0.1.0"),
        ("trace file", "/var/tmp/trace-<fixture>.jsonl"),
        ("lost events", "0"),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_string(), v.to_string()))
    .collect()
}

/// A healthy A/AAAA lookup (sendmmsg, both answered within a millisecond).
fn healthy(r: &mut Recorder, who: &Client, ts: u64, port: u16, id: u16, name: &str) {
    let a = r.send(who, ts, port, id, name, QTYPE_A, true);
    let aaaa = r.send(
        who,
        ts + 12_000,
        port,
        id.wrapping_add(1),
        name,
        QTYPE_AAAA,
        true,
    );
    r.answer(
        who,
        ts + 310_000 + (id as u64 % 7) * 40_000,
        port,
        &a,
        0,
        true,
    );
    r.answer(
        who,
        ts + 420_000 + (id as u64 % 5) * 60_000,
        port,
        &aaaa,
        0,
        true,
    );
}

/// The run the page is judged on: three pods and a host process, an SNAT port race that
/// cost a 5 s retry, a firewall drop retried after 2 s, a resolved clash, an unanswered
/// lookup with markup in its name and comm, healthy lookups, and node findings.
pub fn run() -> Run {
    let mut r = Recorder::new();
    let client0 = Client::new(pod("ctlab", "client-0"), 30090, "getent", [10, 244, 0, 2]);
    let client1 = Client::new(pod("ctlab", "client-1"), 30100, "getent", [10, 244, 1, 2]);
    let web = Client::new(pod("ctlab", "web-0"), 4100, "nginx", [10, 244, 2, 2]);
    let evil = Client::new(
        Arc::new(Workload::host(Some(EVIL_COMM.into()))),
        777,
        EVIL_COMM,
        [10, 0, 0, 1],
    );
    let node_ip = |port| Some(SocketAddr::from(([172, 18, 0, 2], port)));
    let backend = Some(SocketAddr::from(([10, 245, 0, 2], 53)));

    // ctlab/client-0: AAAA loses the SNAT port race, glibc retries both after 5 s.
    let t = T0;
    let a = r.send(&client0, t, 55888, 0x5c48, "svc.lab.example", QTYPE_A, true);
    r.answer(&client0, t + 152_000, 55888, &a, 0, true);
    let aaaa = r.send(
        &client0,
        t + 166_000,
        55888,
        0x744a,
        "svc.lab.example",
        QTYPE_AAAA,
        true,
    );
    r.drop_query(
        &client0,
        t + 172_000,
        55888,
        &aaaa,
        Verdict::SnatPortClash,
        node_ip(55888),
        None,
        "insert failed: the entry would SNAT to 172.18.0.2:55888, which the entry of \
         udp 10.244.1.2:55888 -> 10.96.0.10:53 already holds; insert_failed +1 in netns 4026531840",
    );
    let a2 = r.send(
        &client0,
        t + 5_001_286_000,
        55888,
        0x5c48,
        "svc.lab.example",
        QTYPE_A,
        true,
    );
    r.answer(&client0, t + 5_001_439_000, 55888, &a2, 0, true);
    let aaaa2 = r.send(
        &client0,
        t + 5_001_462_000,
        55888,
        0x744a,
        "svc.lab.example",
        QTYPE_AAAA,
        true,
    );
    r.answer(&client0, t + 5_001_490_000, 55888, &aaaa2, 0, true);

    // ctlab/web-0: healthy traffic all along.
    for i in 0..36u16 {
        let name = ["redis.lab.example", "db.lab.example", "api.lab.example"][i as usize % 3];
        healthy(
            &mut r,
            &web,
            T0 + 40 * MS + i as u64 * 400 * MS,
            41000 + i,
            0x1000 + 2 * i,
            name,
        );
    }

    // ctlab/client-1: A dropped by a firewall rule (DNATed to a backend), retried after 2 s.
    let t = T0 + 1_200 * MS;
    let a = r.send(
        &client1,
        t,
        40100,
        0x2001,
        "api.lab.example",
        QTYPE_A,
        false,
    );
    let aaaa = r.send(
        &client1,
        t + 35_000,
        40100,
        0x2002,
        "api.lab.example",
        QTYPE_AAAA,
        false,
    );
    r.drop_query(
        &client1,
        t + 61_000,
        40100,
        &a,
        Verdict::RulesetDrop,
        None,
        backend,
        "dropped by a ruleset verdict at nft_do_chain+0x3e8, not by conntrack",
    );
    r.answer(&client1, t + 540_000, 40100, &aaaa, 0, true);
    let a2 = r.send(
        &client1,
        t + 2_000_950_000,
        40100,
        0x2001,
        "api.lab.example",
        QTYPE_A,
        false,
    );
    r.answer(&client1, t + 2_001_210_000, 40100, &a2, 0, true);

    // The host process: markup in its comm and in the name; nobody answers.
    r.send(
        &evil,
        T0 + 2_500 * MS,
        47000,
        0x6666,
        EVIL_NAME,
        QTYPE_A,
        false,
    );

    // Node: 2 resolved clashes seen only by the counter, while 3 A/AAAA pairs of web-0 were
    // in flight: more pairs than clashes, so no lookup gets them.
    r.counter(
        T0 + 3 * SEC,
        Verdict::InsertClashResolved,
        2,
        "clash_resolve rose by 2 in netns 4026531840: 2 insert race(s) resolved, nothing lost",
    );

    // ctlab/client-1: a race the kernel resolved (precise path, per packet): nothing lost.
    let t = T0 + 4_100 * MS;
    let a = r.send(&client1, t, 40200, 0x3001, "db.lab.example", QTYPE_A, true);
    let aaaa = r.send(
        &client1,
        t + 9_000,
        40200,
        0x3002,
        "db.lab.example",
        QTYPE_AAAA,
        true,
    );
    r.drop_query(
        &client1,
        t + 14_000,
        40200,
        &aaaa,
        Verdict::InsertClashResolved,
        None,
        backend,
        "A and AAAA raced to insert one entry; the kernel merged the loser into the winner",
    );
    r.answer(&client1, t + 390_000, 40200, &a, 0, true);
    r.answer(&client1, t + 460_000, 40200, &aaaa, 0, true);

    // Node: a table-full drop of a flow the tracer saw no query for.
    r.drop_other(
        T0 + 6_500 * MS,
        Verdict::TableFull,
        FiveTuple {
            proto: 6,
            src: SocketAddr::from(([10, 244, 3, 2], 40512)),
            dst: SocketAddr::from(([10, 96, 5, 5], 443)),
        },
        "no conntrack entry on the skb and drop +1 beyond insert_failed in netns 4026531840: \
         the table is full",
    );

    // ctlab/client-0: healthy afterwards, and one NXDOMAIN.
    healthy(
        &mut r,
        &client0,
        T0 + 7 * SEC,
        56000,
        0x7000,
        "svc.lab.example",
    );
    let n = r.send(
        &client0,
        T0 + 7_500 * MS,
        56001,
        0x7100,
        "nope.lab.example",
        QTYPE_A,
        false,
    );
    r.answer(&client0, T0 + 7_500 * MS + 280_000, 56001, &n, 3, false);

    r.counter(
        T0 + 8 * SEC,
        Verdict::EarlyDrop,
        5,
        "early_drop rose by 5 in netns 4026531840: unassured entries evicted for new flows",
    );
    r.finish(T0 + 20 * SEC)
}

/// A busy pod: `problems` lookups that each lost an AAAA to the SNAT port race and retried
/// after 5 s, and `healthy` healthy ones.
pub fn busy(problems: usize, healthy_lookups: usize) -> Run {
    let mut r = Recorder::new();
    let w = pod("ctlab", "load-0");
    let mut t = T0;
    for i in 0..problems {
        let who = Client::new(w.clone(), 50_000 + i as u32, "getent", [10, 244, 9, 2]);
        let port = 30_000 + i as u16;
        let name = format!("svc-{i}.lab.example");
        let id = 2 * i as u16;
        let a = r.send(&who, t, port, id, &name, QTYPE_A, true);
        let aaaa = r.send(&who, t + 10_000, port, id + 1, &name, QTYPE_AAAA, true);
        r.drop_query(
            &who,
            t + 15_000,
            port,
            &aaaa,
            Verdict::SnatPortClash,
            Some(SocketAddr::from(([172, 18, 0, 2], port))),
            None,
            "insert failed (SNAT port taken)",
        );
        r.answer(&who, t + 200_000, port, &a, 0, true);
        let aaaa2 = r.send(
            &who,
            t + 5 * SEC + (i as u64 % 10) * MS,
            port,
            id + 1,
            &name,
            QTYPE_AAAA,
            true,
        );
        r.answer(
            &who,
            t + 5 * SEC + (i as u64 % 10) * MS + 300_000,
            port,
            &aaaa2,
            0,
            true,
        );
        t += 50 * MS;
    }
    let who = Client::new(w.clone(), 49_999, "nginx", [10, 244, 9, 3]);
    for i in 0..healthy_lookups {
        healthy(
            &mut r,
            &who,
            T0 + 7 * SEC + i as u64 * 2 * MS,
            20_000 + (i % 10_000) as u16,
            (i % 30_000) as u16 * 2,
            &format!("h{}.lab.example", i % 50),
        );
    }
    r.finish(T0 + 60 * SEC)
}

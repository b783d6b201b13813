//! Userspace cost of the event path: ring-buffer record -> `events::decode` -> pod
//! enrichment (`PodIndex::resolve`) -> lookup correlation (`Correlator`), on one core.
//!
//! ```text
//! cargo bench -p tracer --bench pipeline                 throughput per stage (events/s, ns/event)
//! cargo bench -p tracer --bench pipeline -- memory       RSS under 50k lookups/s, then hostile streams
//! ```
//!
//! Options (after `--`): `--runs N`, `--seconds S` (simulated seconds of traffic),
//! `--rate R` (lookups per simulated second), `--tick-ms MS` (correlator tick, throughput),
//! `--pods N` (only the first N pods send), `--stage decode|enrich|full` (repeatable).
//! `memory` takes scenario names: `steady`, `unanswered-unique`, `unanswered-repeat`,
//! `stray-drops` (all by default, each in a process of its own). Figures go to
//! docs/benchmarks.md.
//!
//! The records are built as the kernel writes them (`tracer_common` structs, serialized by
//! `events::encode`) for a synthetic node: 500 pods, each lookup an A + AAAA `sendmmsg` batch
//! and two answers; some lookups lose their AAAA (an insert-clash drop with its conntrack
//! entry and the query's first bytes) and retry it after glibc's 5 s timeout, some are never
//! answered, some walk the search list (NXDOMAIN) first. The pods live in a small fake node
//! tree (cgroup2, /proc, pods log) in a temporary directory: most pods' cgroup ids are in it
//! (the cache hits), some are host processes, some are not in the tree (found by pid), a
//! few are gone (nothing finds them).

use std::{
    cmp::Ordering,
    collections::BinaryHeap,
    fs,
    hint::black_box,
    mem,
    os::unix::fs::MetadataExt as _,
    path::PathBuf,
    process::Command,
    rc::Rc,
    time::{Duration, Instant},
};

use tracer::{
    events::{self, Event},
    kallsyms::Symbols,
    lookups::{Config, Correlator},
    output::{Clock, Printer},
    pods::{NodePaths, PodIndex, WorkloadKind},
    traffic::{self, dns_query, dns_response as response, QTYPE_A, QTYPE_AAAA},
    verdict::Classifier,
};
use tracer_common::{
    DnsPacket, EventKind, Header, NfEvent, SourceId, Task, Tuple, AF_INET, COMM_LEN,
    CT_FLAG_PRESENT, DNS_FLAG_BATCH, DNS_PAYLOAD_CAP, DROP_PAYLOAD_CAP, IPPROTO_UDP, IPS_DST_NAT,
};

const SEC: u64 = 1_000_000_000;
const PODS: usize = 500;
/// The node's (host) network namespace: where the service VIP is DNATed.
const HOST_NETNS: u32 = 4026531840;
const VIP: [u8; 4] = [10, 96, 0, 10];
const COREDNS: [[u8; 4]; 2] = [[10, 244, 7, 3], [10, 244, 9, 4]];
/// `SKB_DROP_REASON_NETFILTER_DROP` on 6.x kernels.
const REASON_NETFILTER_DROP: u32 = 12;
const NF_DROP: i32 = 0;

// --- a tiny deterministic PRNG (no dependency) ------------------------------------------------

struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        // xorshift64*
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }
    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
    /// Uniform in [0, 1).
    fn unit(&mut self) -> f64 {
        (self.next() >> 11) as f64 / (1u64 << 53) as f64
    }
}

// --- the fake node ----------------------------------------------------------------------------

/// How a pod's events resolve.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum PodKind {
    /// Its container's cgroup is in the tree and its pods-log directory names it: cached by
    /// cgroup id after the first event.
    Mapped,
    /// A host process (cgroup `/system.slice/...`): the cgroup path is cached, the workload
    /// by pid (re-read from /proc every `PID_TTL`).
    Host,
    /// A pod whose cgroup id the walk does not find (each miss may trigger a walk, at most
    /// one per rescan interval); resolved through `/proc/PID/cgroup`, cached by pid.
    Unmapped,
    /// A process already gone: nothing resolves it; every event tries /proc again.
    Gone,
}

struct Pod {
    kind: PodKind,
    cgroup_id: u64,
    netns: u32,
    pid: u32,
    ip: [u8; 4],
    comm: [u8; COMM_LEN],
    /// `<namespace>.svc.cluster.local`, the first search domain.
    search: String,
}

struct FakeNode {
    root: PathBuf,
    paths: NodePaths,
    pods: Vec<Pod>,
}

impl Drop for FakeNode {
    fn drop(&mut self) {
        let _ = fs::remove_dir_all(&self.root);
    }
}

fn uid_of(i: usize) -> String {
    format!("{:08x}-7a1c-4e2b-9f00-{:012x}", 0x5eed_0000 + i, i)
}

fn container_id(i: usize) -> String {
    format!("{:064x}", 0x00c0_ffee_0000_u64 + i as u64)
}

impl FakeNode {
    /// 500 pods: 80 % mapped, 10 % host processes, 8 % unmapped, 2 % gone.
    fn new() -> FakeNode {
        let root = std::env::temp_dir().join(format!("tracer-bench-node-{}", std::process::id()));
        let _ = fs::remove_dir_all(&root);
        let paths = NodePaths {
            root: root.clone(),
            cgroup2: root.join("sys/fs/cgroup"),
            proc: root.join("proc"),
            pods_log: root.join("var/log/pods"),
            kubelet_pods: root.join("var/lib/kubelet/pods"),
        };
        for d in [
            &paths.cgroup2,
            &paths.proc,
            &paths.pods_log,
            &paths.kubelet_pods,
        ] {
            fs::create_dir_all(d).expect("fake node dir");
        }
        // The host's netns, as the index learns it (pid 1), and some system cgroups.
        let p1 = paths.proc.join("1");
        fs::create_dir_all(p1.join("ns")).expect("proc/1");
        fs::write(p1.join("cgroup"), "0::/init.scope\n").expect("proc/1/cgroup");
        std::os::unix::fs::symlink(format!("net:[{HOST_NETNS}]"), p1.join("ns/net"))
            .expect("proc/1/ns/net");
        for s in [
            "init.scope",
            "system.slice/kubelet.service",
            "system.slice/containerd.service",
        ] {
            fs::create_dir_all(paths.cgroup2.join(s)).expect("system cgroup");
        }
        let namespaces = ["default", "shop", "payments", "kube-system", "monitoring"];
        let mut pods = Vec::with_capacity(PODS);
        for i in 0..PODS {
            let kind = match i % 50 {
                0..=39 => PodKind::Mapped,
                40..=44 => PodKind::Host,
                45..=48 => PodKind::Unmapped,
                _ => PodKind::Gone,
            };
            let ns = namespaces[i % namespaces.len()];
            let uid = uid_of(i);
            let pod_cgroup = format!(
                "/kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod{}.slice/cri-containerd-{}.scope",
                uid.replace('-', "_"),
                container_id(i)
            );
            let pid = 20_000 + i as u32;
            let netns = 4026540000 + i as u32;
            let proc_dir = paths.proc.join(pid.to_string());
            let mut comm = [0u8; COMM_LEN];
            let name: &[u8] = match kind {
                PodKind::Host => b"node-exporter",
                _ => b"app",
            };
            comm[..name.len()].copy_from_slice(name);
            let write_proc = |cgroup: &str| {
                fs::create_dir_all(proc_dir.join("ns")).expect("proc dir");
                fs::write(proc_dir.join("cgroup"), format!("0::{cgroup}\n")).expect("cgroup");
                fs::write(proc_dir.join("comm"), "app\n").expect("comm");
                std::os::unix::fs::symlink(format!("net:[{netns}]"), proc_dir.join("ns/net"))
                    .expect("ns/net");
            };
            let cgroup_id = match kind {
                PodKind::Mapped => {
                    let dir = paths.cgroup2.join(pod_cgroup.trim_start_matches('/'));
                    fs::create_dir_all(&dir).expect("pod cgroup");
                    fs::create_dir_all(paths.pods_log.join(format!("{ns}_web-{i}_{uid}/app")))
                        .expect("pods log");
                    write_proc(&pod_cgroup);
                    fs::metadata(&dir).expect("pod cgroup").ino()
                }
                PodKind::Host => {
                    let rel = format!("/system.slice/agent-{i}.service");
                    let dir = paths.cgroup2.join(rel.trim_start_matches('/'));
                    fs::create_dir_all(&dir).expect("host cgroup");
                    write_proc(&rel);
                    fs::metadata(&dir).expect("host cgroup").ino()
                }
                PodKind::Unmapped => {
                    fs::create_dir_all(paths.pods_log.join(format!("{ns}_job-{i}_{uid}/app")))
                        .expect("pods log");
                    write_proc(&pod_cgroup);
                    0x7000_0000_0000 + i as u64
                }
                PodKind::Gone => 0x7100_0000_0000 + i as u64,
            };
            pods.push(Pod {
                kind,
                cgroup_id,
                netns,
                pid,
                ip: [10, 244, (i / 200) as u8, (i % 200) as u8 + 2],
                comm,
                search: format!("{ns}.svc.cluster.local"),
            });
        }
        FakeNode { root, paths, pods }
    }
}

// --- the synthetic stream ---------------------------------------------------------------------

/// The shape of a stream.
#[derive(Clone, Debug)]
struct Mix {
    /// Lookups per simulated second.
    rate: u64,
    /// Fraction of lookups whose queries are never answered (one retry, then give up).
    unanswered: f64,
    /// Fraction of lookups whose AAAA is dropped (insert clash) and retried after 5 s.
    dropped: f64,
    /// Fraction of lookups that walk the search list (three NXDOMAIN pairs) first.
    search: f64,
    /// Every lookup asks a name never asked before (a random-subdomain flood).
    unique_names: bool,
    /// Drops per simulated second of DNS flows no query was seen for.
    stray_drops: u64,
}

impl Mix {
    fn realistic(rate: u64) -> Mix {
        Mix {
            rate,
            unanswered: 0.01,
            dropped: 0.01,
            search: 0.05,
            unique_names: false,
            stray_drops: 0,
        }
    }
}

#[derive(Clone, Copy)]
enum What {
    Query {
        qtype: u16,
        id: u16,
        batch: bool,
    },
    Answer {
        qtype: u16,
        id: u16,
        rcode: u8,
    },
    /// The query was dropped by conntrack on the node (lost the insert race).
    Drop {
        qtype: u16,
        id: u16,
    },
    /// A drop whose flow no query was seen for.
    Stray,
}

/// One scheduled record.
struct Spec {
    ts: u64,
    seq: u64,
    pod: u32,
    sport: u16,
    cookie: u64,
    backend: u8,
    name: Rc<str>,
    what: What,
}

impl PartialEq for Spec {
    fn eq(&self, o: &Self) -> bool {
        (self.ts, self.seq) == (o.ts, o.seq)
    }
}
impl Eq for Spec {}
impl PartialOrd for Spec {
    fn partial_cmp(&self, o: &Self) -> Option<Ordering> {
        Some(self.cmp(o))
    }
}
impl Ord for Spec {
    /// Reversed: the heap pops the earliest.
    fn cmp(&self, o: &Self) -> Ordering {
        (o.ts, o.seq).cmp(&(self.ts, self.seq))
    }
}

/// Produces the records of a stream in time order.
struct Generator<'a> {
    pods: &'a [Pod],
    mix: Mix,
    rng: Rng,
    heap: BinaryHeap<Spec>,
    seq: u64,
    next_lookup: u64,
    lookups: u64,
    next_stray: u64,
    strays: u64,
    ports: Vec<u16>,
    next_cookie: u64,
    names: Vec<Rc<str>>,
    buf: Vec<u8>,
}

impl<'a> Generator<'a> {
    fn new(pods: &'a [Pod], mix: Mix, seed: u64) -> Self {
        // 200 service names; pods ask them in a skewed way (a few are hot).
        let names = (0..200)
            .map(|k| Rc::from(format!("svc-{k}.ns-{}.svc.cluster.local", k % 7)))
            .collect();
        Generator {
            pods,
            mix,
            rng: Rng(seed | 1),
            heap: BinaryHeap::new(),
            seq: 0,
            next_lookup: 0,
            lookups: 0,
            next_stray: 0,
            strays: 0,
            ports: vec![32768; pods.len()],
            next_cookie: 1,
            names,
            buf: Vec::with_capacity(DNS_PAYLOAD_CAP + 64),
        }
    }

    fn push(
        &mut self,
        ts: u64,
        pod: u32,
        sock: (u16, u64),
        backend: u8,
        name: &Rc<str>,
        what: What,
    ) {
        self.seq += 1;
        self.heap.push(Spec {
            ts,
            seq: self.seq,
            pod,
            sport: sock.0,
            cookie: sock.1,
            backend,
            name: name.clone(),
            what,
        });
    }

    /// A new socket of `pod`: (ephemeral port, cookie).
    fn socket(&mut self, pod: usize) -> (u16, u64) {
        let p = &mut self.ports[pod];
        *p = if *p >= 60999 { 32768 } else { *p + 1 };
        self.next_cookie += 1;
        (*p, self.next_cookie)
    }

    /// Schedules every record of one lookup starting at `t0`.
    fn lookup(&mut self, t0: u64) {
        let pod = self.rng.below(self.pods.len() as u64) as usize;
        let backend = self.rng.below(2) as u8;
        let name: Rc<str> = if self.mix.unique_names {
            Rc::from(format!("x{:x}.example.com", self.rng.next()))
        } else {
            // Skewed: half the lookups go to 10 hot names.
            let k = if self.rng.unit() < 0.5 {
                self.rng.below(10)
            } else {
                self.rng.below(self.names.len() as u64)
            };
            self.names[k as usize].clone()
        };
        let roll = self.rng.unit();
        let m = self.mix.clone();
        let mut t = t0;
        if roll < m.search {
            // `ndots:5`: three search domains answered NXDOMAIN, then the name itself.
            let base = format!("api-{}.example.com", self.rng.below(50));
            let search = &self.pods[pod].search;
            let mut tries: Vec<Rc<str>> = Vec::new();
            tries.push(Rc::from(format!("{base}.{search}")));
            let rest = search.split_once('.').map_or("", |(_, r)| r);
            tries.push(Rc::from(format!("{base}.{rest}")));
            tries.push(Rc::from(format!("{base}.cluster.local")));
            tries.push(Rc::from(base));
            let n = tries.len();
            for (i, nm) in tries.iter().enumerate() {
                let rcode = if i + 1 == n { 0 } else { 3 };
                t = self.pair(t, pod, backend, nm, rcode, false);
            }
            return;
        }
        if roll < m.search + m.unanswered {
            let sock = self.socket(pod);
            let (ia, iaaaa) = (self.rng.next() as u16, self.rng.next() as u16);
            for (dt, batch) in [(0, true), (5 * SEC, false)] {
                self.push(
                    t + dt,
                    pod as u32,
                    sock,
                    backend,
                    &name,
                    What::Query {
                        qtype: QTYPE_A,
                        id: ia,
                        batch,
                    },
                );
                self.push(
                    t + dt + 12_000,
                    pod as u32,
                    sock,
                    backend,
                    &name,
                    What::Query {
                        qtype: QTYPE_AAAA,
                        id: iaaaa,
                        batch,
                    },
                );
            }
            return;
        }
        let drop = roll < m.search + m.unanswered + m.dropped;
        self.pair(t, pod, backend, &name, 0, drop);
    }

    /// A + AAAA of `name` from a new socket at `t` (sendmmsg), their answers (`rcode`), or
    /// the AAAA dropped and resent on the same socket 5 s later; returns when the last
    /// answer came.
    fn pair(
        &mut self,
        t: u64,
        pod: usize,
        backend: u8,
        name: &Rc<str>,
        rcode: u8,
        drop: bool,
    ) -> u64 {
        let sock = self.socket(pod);
        let (ia, iaaaa) = (self.rng.next() as u16, self.rng.next() as u16);
        let p = pod as u32;
        let rtt_a = 250_000 + self.rng.below(600_000);
        let rtt_aaaa = 250_000 + self.rng.below(600_000);
        self.push(
            t,
            p,
            sock,
            backend,
            name,
            What::Query {
                qtype: QTYPE_A,
                id: ia,
                batch: true,
            },
        );
        self.push(
            t + 12_000,
            p,
            sock,
            backend,
            name,
            What::Query {
                qtype: QTYPE_AAAA,
                id: iaaaa,
                batch: true,
            },
        );
        self.push(
            t + rtt_a,
            p,
            sock,
            backend,
            name,
            What::Answer {
                qtype: QTYPE_A,
                id: ia,
                rcode,
            },
        );
        if drop {
            self.push(
                t + 40_000,
                p,
                sock,
                backend,
                name,
                What::Drop {
                    qtype: QTYPE_AAAA,
                    id: iaaaa,
                },
            );
            let t2 = t + 5 * SEC + 12_000;
            self.push(
                t2,
                p,
                sock,
                backend,
                name,
                What::Query {
                    qtype: QTYPE_AAAA,
                    id: iaaaa,
                    batch: false,
                },
            );
            self.push(
                t2 + rtt_aaaa,
                p,
                sock,
                backend,
                name,
                What::Answer {
                    qtype: QTYPE_AAAA,
                    id: iaaaa,
                    rcode,
                },
            );
            return t2 + rtt_aaaa;
        }
        self.push(
            t + 12_000 + rtt_aaaa,
            p,
            sock,
            backend,
            name,
            What::Answer {
                qtype: QTYPE_AAAA,
                id: iaaaa,
                rcode,
            },
        );
        t + (12_000 + rtt_aaaa).max(rtt_a)
    }

    /// Emits every record with a timestamp before `until`, in time order.
    fn run(&mut self, until: u64, mut emit: impl FnMut(u64, &[u8])) {
        let lookup_gap = SEC / self.mix.rate.max(1);
        let stray_gap = SEC.checked_div(self.mix.stray_drops).unwrap_or(u64::MAX);
        if self.strays == 0 && self.mix.stray_drops == 0 {
            self.next_stray = u64::MAX;
        }
        loop {
            let next_start = self.next_lookup.min(self.next_stray);
            if self.heap.peek().is_some_and(|s| s.ts <= next_start) {
                let s = self.heap.pop().expect("peeked");
                if s.ts >= until {
                    self.heap.push(s);
                    return;
                }
                self.encode(&s);
                emit(s.ts, &self.buf);
                continue;
            }
            if next_start >= until {
                return;
            }
            if self.next_lookup <= self.next_stray {
                self.lookup(self.next_lookup);
                self.lookups += 1;
                self.next_lookup = self.lookups * lookup_gap;
            } else {
                let pod = self.rng.below(self.pods.len() as u64) as u32;
                let sock = (1024 + self.rng.below(60000) as u16, 0);
                let name = self.names[0].clone();
                self.push(self.next_stray, pod, sock, 0, &name, What::Stray);
                self.strays += 1;
                self.next_stray = self.strays.saturating_mul(stray_gap);
            }
        }
    }

    /// The record of `s`, as the kernel lays it out, into `self.buf`.
    fn encode(&mut self, s: &Spec) {
        let pod = &self.pods[s.pod as usize];
        let client = tuple(pod.ip, s.sport, VIP, 53);
        let backend = COREDNS[s.backend as usize];
        self.buf.clear();
        match s.what {
            What::Query { qtype, id, batch } => {
                let q = dns_query(id, &s.name, qtype).expect("valid name");
                let mut r = dns_record(EventKind::DnsSend, SourceId::FentryUdpSendmsg, s, pod, &q);
                r.tuple = client;
                if batch {
                    r.flags |= DNS_FLAG_BATCH;
                    r.batch_len = 2;
                }
                self.buf.extend_from_slice(&events::encode::dns(&r));
            }
            What::Answer { qtype, id, rcode } => {
                let q = dns_query(id, &s.name, qtype).expect("valid name");
                let a = response(&q, rcode, rcode == 0);
                let mut r = dns_record(
                    EventKind::DnsRecv,
                    SourceId::FentrySkbConsumeUdp,
                    s,
                    pod,
                    &a,
                );
                r.tuple = tuple(VIP, 53, pod.ip, s.sport);
                self.buf.extend_from_slice(&events::encode::dns(&r));
            }
            What::Drop { qtype, id } => {
                let q = dns_query(id, &s.name, qtype).expect("valid name");
                let r = nf_record(s.ts, client, backend, pod.ip, s.sport, &q);
                self.buf.extend_from_slice(&events::encode::nf(&r));
            }
            What::Stray => {
                let q = dns_query(self.rng.next() as u16, &s.name, QTYPE_A).expect("valid name");
                let r = nf_record(s.ts, client, backend, pod.ip, s.sport, &q);
                self.buf.extend_from_slice(&events::encode::nf(&r));
            }
        }
    }
}

fn tuple(src: [u8; 4], sport: u16, dst: [u8; 4], dport: u16) -> Tuple {
    let mut t = Tuple {
        sport,
        dport,
        family: AF_INET,
        proto: IPPROTO_UDP,
        ..Tuple::default()
    };
    t.saddr[..4].copy_from_slice(&src);
    t.daddr[..4].copy_from_slice(&dst);
    t
}

fn dns_record(kind: EventKind, source: SourceId, s: &Spec, pod: &Pod, payload: &[u8]) -> DnsPacket {
    let n = payload.len().min(DNS_PAYLOAD_CAP);
    let mut r = DnsPacket {
        header: Header {
            kind: kind as u32,
            source: source as u16,
            _pad: 0,
            ts_ns: s.ts,
        },
        task: Task {
            pid: pod.pid,
            tid: pod.pid,
            cgroup_id: pod.cgroup_id,
            comm: pod.comm,
            netns: pod.netns,
            _pad: 0,
        },
        tuple: Tuple::default(),
        sock_cookie: s.cookie,
        ifindex: 0,
        flags: 0,
        batch_len: 0,
        payload_len: payload.len() as u32,
        cap_len: n as u32,
        _pad: 0,
        payload: [0; DNS_PAYLOAD_CAP],
    };
    r.payload[..n].copy_from_slice(&payload[..n]);
    r
}

/// The insert-clash drop of a query to the VIP, DNATed to `backend`, as
/// `fexit/__nf_conntrack_confirm` reports it: the unconfirmed entry and the query's first
/// bytes.
fn nf_record(
    ts: u64,
    orig: Tuple,
    backend: [u8; 4],
    pod_ip: [u8; 4],
    sport: u16,
    q: &[u8],
) -> NfEvent {
    let n = q.len().min(DROP_PAYLOAD_CAP);
    let mut payload = [0u8; DROP_PAYLOAD_CAP];
    payload[..n].copy_from_slice(&q[..n]);
    NfEvent {
        header: Header {
            kind: EventKind::NfDrop as u32,
            source: SourceId::FexitNfConntrackConfirm as u16,
            _pad: 0,
            ts_ns: ts,
        },
        location: 0,
        netns: HOST_NETNS,
        ifindex: 0,
        reason: REASON_NETFILTER_DROP,
        ct_flags: CT_FLAG_PRESENT,
        ct_status: IPS_DST_NAT,
        verdict: NF_DROP,
        _pad: 0,
        packet: tuple(pod_ip, sport, backend, 53),
        ct_orig: orig,
        ct_reply: tuple(backend, 53, pod_ip, sport),
        other: Tuple::default(),
        payload_len: q.len() as u32,
        cap_len: n as u32,
        payload,
    }
}

// --- the stages -------------------------------------------------------------------------------

/// Records laid out back to back, as a ring-buffer consumer sees them.
struct Records {
    buf: Vec<u8>,
    spans: Vec<(usize, usize)>,
    sends: u64,
    recvs: u64,
    drops: u64,
}

impl Records {
    fn generate(node: &FakeNode, mix: Mix, seconds: u64, pods: usize) -> Records {
        let mut r = Records {
            buf: Vec::new(),
            spans: Vec::new(),
            sends: 0,
            recvs: 0,
            drops: 0,
        };
        let mut g = Generator::new(&node.pods[..pods], mix, 0x5eed);
        g.run(seconds * SEC, |_, bytes| {
            match u32::from_ne_bytes(bytes[..4].try_into().expect("4 bytes")) {
                k if k == EventKind::DnsSend as u32 => r.sends += 1,
                k if k == EventKind::DnsRecv as u32 => r.recvs += 1,
                _ => r.drops += 1,
            }
            r.spans.push((r.buf.len(), bytes.len()));
            r.buf.extend_from_slice(bytes);
        });
        r
    }

    fn iter(&self) -> impl Iterator<Item = &[u8]> {
        self.spans.iter().map(|&(o, n)| &self.buf[o..o + n])
    }
}

/// decode -> enrich -> classify drops -> correlate, with a tick every simulated second.
struct Full<'a> {
    pods: &'a mut PodIndex,
    /// Prints every event and lookup as `tracer watch --json` does (the `json` stage).
    printer: Option<Printer<std::io::BufWriter<std::io::Sink>>>,
    corr: Correlator,
    classifier: Classifier,
    tick_every: u64,
    next_tick: u64,
    lookups: u64,
    problems: u64,
    findings: u64,
}

impl<'a> Full<'a> {
    fn new(pods: &'a mut PodIndex, cfg: Config, tick_every: u64) -> Self {
        Full {
            pods,
            printer: None,
            corr: Correlator::new(cfg),
            classifier: Classifier::new(),
            tick_every,
            next_tick: tick_every,
            lookups: 0,
            problems: 0,
            findings: 0,
        }
    }

    /// Ticks the correlator up to `ts` (every `tick_every` of simulated time, as `tracer
    /// watch` does every second); `on_tick` runs after each, with the lookups open before it.
    fn advance(&mut self, ts: u64, on_tick: &mut impl FnMut(u64, usize, &Correlator)) {
        while ts >= self.next_tick {
            let open = self.corr.open_lookups();
            self.corr.tick(self.next_tick);
            self.take_done();
            on_tick(self.next_tick, open, &self.corr);
            self.next_tick += self.tick_every;
        }
    }

    /// Hands out finished lookups, as `Pipeline` does after every event (the sink is not
    /// measured: they are dropped).
    fn take_done(&mut self) {
        for l in self.corr.take_done() {
            self.lookups += 1;
            self.problems += u64::from(l.problem);
            if let Some(p) = self.printer.as_mut() {
                p.lookup(&l).expect("a sink takes everything");
            }
            black_box(&l);
        }
    }

    fn event(&mut self, ev: &Event) {
        match ev {
            Event::DnsSend(d) => {
                let w = self
                    .pods
                    .resolve(d.task.cgroup_id, d.task.netns, d.task.pid);
                if let Some(p) = self.printer.as_mut() {
                    p.event_of(ev, Some(&w)).expect("a sink takes everything");
                }
                self.corr.on_send(d, w);
            }
            Event::DnsRecv(d) => {
                let w = self
                    .pods
                    .resolve(d.task.cgroup_id, d.task.netns, d.task.pid);
                if let Some(p) = self.printer.as_mut() {
                    p.event_of(ev, Some(&w)).expect("a sink takes everything");
                }
                black_box(w);
                self.corr.on_recv(d);
            }
            Event::NfDrop(n) => {
                // A precise source: the classifier reads no counters for it.
                if let Some(f) = self.classifier.drop_event(n, "", None) {
                    self.findings += 1;
                    black_box(self.corr.on_packet_finding(n, &f));
                }
            }
            Event::CtClash(n) => {
                if let Some(f) = self.classifier.clash_event(n) {
                    self.findings += 1;
                    black_box(self.corr.on_packet_finding(n, &f));
                }
            }
        }
    }

    fn record(&mut self, bytes: &[u8], on_tick: &mut impl FnMut(u64, usize, &Correlator)) {
        let ev = events::decode(bytes).expect("the generator writes valid records");
        self.advance(ev.ts_ns(), on_tick);
        self.event(&ev);
        self.take_done();
    }
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Stage {
    Decode,
    Enrich,
    Full,
    /// Full, and every event and lookup printed as JSON lines (into a sink).
    Json,
}

impl Stage {
    fn name(self) -> &'static str {
        match self {
            Stage::Decode => "decode",
            Stage::Enrich => "decode + enrich",
            Stage::Full => "decode + enrich + correlate",
            Stage::Json => "... + JSON lines",
        }
    }
}

/// One timed pass over every record; returns the elapsed time.
fn pass(stage: Stage, recs: &Records, pods: &mut PodIndex, tick_every: u64) -> Duration {
    let start = Instant::now();
    match stage {
        Stage::Decode => {
            for bytes in recs.iter() {
                black_box(events::decode(black_box(bytes)).expect("valid record"));
            }
        }
        Stage::Enrich => {
            for bytes in recs.iter() {
                let ev = events::decode(black_box(bytes)).expect("valid record");
                if let Event::DnsSend(d) | Event::DnsRecv(d) = &ev {
                    black_box(pods.resolve(d.task.cgroup_id, d.task.netns, d.task.pid));
                }
                black_box(ev);
            }
        }
        Stage::Full | Stage::Json => {
            let mut full = Full::new(pods, Config::default(), tick_every);
            if stage == Stage::Json {
                full.printer = Some(Printer::new(
                    std::io::BufWriter::new(std::io::sink()),
                    true,
                    Clock::fixed(0),
                    Symbols::new("/proc/kallsyms"),
                ));
            }
            for bytes in recs.iter() {
                full.record(bytes, &mut |_, _, _| {});
            }
            let elapsed = start.elapsed();
            black_box((full.lookups, full.problems, full.findings));
            // Dropping the correlator (its open lookups) is not part of the stream's cost.
            return elapsed;
        }
    }
    start.elapsed()
}

// --- helpers ----------------------------------------------------------------------------------

/// Pins the process to one CPU (the last one it may run on); returns it.
fn pin() -> Option<usize> {
    let cpu = *traffic::allowed_cpus().last()?;
    // SAFETY: cpu_set_t is plain data; all-zero is the empty set.
    let mut set: libc::cpu_set_t = unsafe { mem::zeroed() };
    // SAFETY: `cpu` came from the allowed set, so it is below CPU_SETSIZE.
    unsafe { libc::CPU_SET(cpu, &mut set) };
    // SAFETY: pid 0 is this thread; the pointer and size describe `set`.
    let rc = unsafe { libc::sched_setaffinity(0, mem::size_of::<libc::cpu_set_t>(), &set) };
    (rc == 0).then_some(cpu)
}

/// (VmRSS, VmHWM) in KiB, from /proc/self/status.
fn memory() -> (u64, u64) {
    let s = fs::read_to_string("/proc/self/status").unwrap_or_default();
    let field = |name: &str| {
        s.lines()
            .find_map(|l| l.strip_prefix(name))
            .and_then(|v| v.split_whitespace().next()?.parse().ok())
            .unwrap_or(0)
    };
    (field("VmRSS:"), field("VmHWM:"))
}

fn median(v: &mut [f64]) -> f64 {
    v.sort_by(f64::total_cmp);
    let n = v.len();
    if n == 0 {
        return 0.0;
    }
    if n % 2 == 1 {
        v[n / 2]
    } else {
        (v[n / 2 - 1] + v[n / 2]) / 2.0
    }
}

fn mib(kib: u64) -> f64 {
    kib as f64 / 1024.0
}

/// Resolves every pod once, so timed passes see the index in its steady state, and checks
/// the fake node resolves as intended.
fn warm(pods: &mut PodIndex, node: &FakeNode) {
    for p in &node.pods {
        let w = pods.resolve(p.cgroup_id, p.netns, Some(p.pid));
        let expected = match p.kind {
            PodKind::Mapped | PodKind::Unmapped => WorkloadKind::Pod,
            PodKind::Host => WorkloadKind::Host,
            PodKind::Gone => WorkloadKind::Unknown,
        };
        assert_eq!(w.kind, expected, "{:?} pod resolved to {w:?}", p.kind);
        if p.kind != PodKind::Gone {
            assert!(w.kind == WorkloadKind::Host || w.pod.is_some(), "{w:?}");
        }
    }
}

fn cpu_model() -> String {
    fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("model name"))
                .map(|v| v.trim_start_matches([' ', '\t', ':']).to_string())
        })
        .unwrap_or_else(|| "unknown CPU".into())
}

// --- modes ------------------------------------------------------------------------------------

struct Opts {
    runs: usize,
    /// Only these stages (all when empty).
    stages: Vec<Stage>,
    seconds: Option<u64>,
    rate: Option<u64>,
    /// Simulated time between two correlator ticks.
    tick_every: u64,
    /// Only the first N pods send (all when `None`).
    pods: Option<usize>,
    rest: Vec<String>,
}

/// Every shape: the lookups spread over 500 pods, then all of them from one process (one
/// busy client, e.g. CoreDNS forwarding upstream); only the one `--pods` names, if given.
fn throughput(o: &Opts) {
    match o.pods {
        Some(n) => throughput_of(o, n),
        None => {
            throughput_of(o, PODS);
            throughput_of(o, 1);
        }
    }
}

fn throughput_of(o: &Opts, senders: usize) {
    let online = traffic::allowed_cpus().len();
    let cpu = pin();
    let node = FakeNode::new();
    let rate = o.rate.unwrap_or(10_000);
    let seconds = o.seconds.unwrap_or(10);
    let t = Instant::now();
    let recs = Records::generate(&node, Mix::realistic(rate), seconds, senders);
    let n = recs.spans.len() as f64;
    println!(
        "pipeline throughput: {} ({} CPUs online), pinned to CPU {}",
        cpu_model(),
        online,
        cpu.map_or("none (sched_setaffinity failed)".into(), |c| c.to_string())
    );
    println!(
        "  stream: {rate} lookups/s for {seconds} simulated s from {senders} pods: {} records \
         ({} sends, {} receives, {} drops; {:.0} MiB), generated in {:.1} s",
        recs.spans.len(),
        recs.sends,
        recs.recvs,
        recs.drops,
        recs.buf.len() as f64 / (1 << 20) as f64,
        t.elapsed().as_secs_f64()
    );
    let mut pods = PodIndex::new(node.paths.clone());
    warm(&mut pods, &node);
    let mut summary = Vec::new();
    for stage in [Stage::Decode, Stage::Enrich, Stage::Full, Stage::Json] {
        if !o.stages.is_empty() && !o.stages.contains(&stage) {
            continue;
        }
        pass(stage, &recs, &mut pods, o.tick_every); // warm-up
        let before = pods.stats();
        let mut rates: Vec<f64> = (0..o.runs)
            .map(|_| n / pass(stage, &recs, &mut pods, o.tick_every).as_secs_f64())
            .collect();
        let after = pods.stats();
        let (lo, hi) = (
            rates.iter().copied().fold(f64::INFINITY, f64::min),
            rates.iter().copied().fold(0.0, f64::max),
        );
        let m = median(&mut rates);
        println!(
            "  {:<28} {:>12.0} events/s  {:>7.1} ns/event  (median of {}, range {:.0}-{:.0}; \
             cgroup walks {}, /proc scans {})",
            stage.name(),
            m,
            1e9 / m,
            o.runs,
            lo,
            hi,
            after.cgroup_scans - before.cgroup_scans,
            after.netns_scans - before.netns_scans
        );
        summary.push((stage, m));
    }
    if o.stages.is_empty() || o.stages.contains(&Stage::Enrich) {
        resolve_by_kind(&node, &mut pods);
    }
    if summary.len() < 4 {
        return;
    }
    // Marginal cost of each stage.
    let ns = |s: Stage| {
        summary
            .iter()
            .find(|(x, _)| *x == s)
            .map_or(0.0, |(_, r)| 1e9 / r)
    };
    println!(
        "  per stage: decode {:.1} ns, enrich +{:.1} ns, correlate +{:.1} ns, JSON lines +{:.1} ns \
         per event",
        ns(Stage::Decode),
        ns(Stage::Enrich) - ns(Stage::Decode),
        ns(Stage::Full) - ns(Stage::Enrich),
        ns(Stage::Json) - ns(Stage::Full)
    );
    let full = 1e9 / ns(Stage::Full);
    println!(
        "  target >= 1,000,000 events/s (full pipeline, one core): {}",
        if full >= 1e6 { "met" } else { "NOT met" }
    );
}

/// What one `PodIndex::resolve` costs in the steady state, by how the pod resolves.
fn resolve_by_kind(node: &FakeNode, pods: &mut PodIndex) {
    let mut line = String::from("  resolve, ns/call by pod kind:");
    for (kind, what) in [
        (PodKind::Mapped, "pod cgroup in the tree"),
        (PodKind::Host, "host cgroup"),
        (PodKind::Unmapped, "cgroup not in the tree, by pid"),
        (PodKind::Gone, "process gone"),
    ] {
        let ps: Vec<&Pod> = node.pods.iter().filter(|p| p.kind == kind).collect();
        let share = 100.0 * ps.len() as f64 / node.pods.len() as f64;
        let calls = 200_000;
        let start = Instant::now();
        for i in 0..calls {
            let p = ps[i % ps.len()];
            black_box(pods.resolve(p.cgroup_id, p.netns, Some(p.pid)));
        }
        let ns = start.elapsed().as_nanos() as f64 / calls as f64;
        line += &format!(" {what} ({share:.0} % of pods) {ns:.0};");
    }
    println!("{}", line.trim_end_matches(';'));
}

/// A stream for the memory mode.
fn scenario(name: &str, o: &Opts) -> Option<(Mix, u64, &'static str)> {
    let rate = o.rate.unwrap_or(50_000);
    let realistic = Mix::realistic(rate);
    Some(match name {
        "steady" => (
            realistic,
            o.seconds.unwrap_or(60),
            "1 % never answered, 1 % AAAA dropped and retried, 5 % search expansions",
        ),
        "unanswered-unique" => (
            Mix {
                unanswered: 1.0,
                dropped: 0.0,
                search: 0.0,
                unique_names: true,
                ..realistic
            },
            o.seconds.unwrap_or(20),
            "hostile: every query unanswered, every lookup a new name",
        ),
        "unanswered-repeat" => (
            Mix {
                unanswered: 1.0,
                dropped: 0.0,
                search: 0.0,
                ..realistic
            },
            o.seconds.unwrap_or(20),
            "hostile: every query unanswered (upstream down), the usual names",
        ),
        "stray-drops" => (
            Mix {
                stray_drops: rate,
                ..realistic
            },
            o.seconds.unwrap_or(20),
            "hostile: the steady stream plus as many drops of flows no query was seen for",
        ),
        _ => return None,
    })
}

const SCENARIOS: [&str; 4] = [
    "steady",
    "unanswered-unique",
    "unanswered-repeat",
    "stray-drops",
];

/// Runs every scenario (or those named) in a process of its own, so each peak is its own.
fn memory_mode(o: &Opts) {
    let names: Vec<&str> = if o.rest.is_empty() {
        SCENARIOS.to_vec()
    } else {
        o.rest.iter().map(String::as_str).collect()
    };
    let exe = std::env::current_exe().expect("current exe");
    for name in names {
        let mut cmd = Command::new(&exe);
        cmd.args(["memory-run", name, "--runs", &o.runs.to_string()]);
        if let Some(p) = o.pods {
            cmd.args(["--pods", &p.to_string()]);
        }
        if let Some(s) = o.seconds {
            cmd.args(["--seconds", &s.to_string()]);
        }
        if let Some(r) = o.rate {
            cmd.args(["--rate", &r.to_string()]);
        }
        let status = cmd.status().expect("running a memory scenario");
        assert!(status.success(), "scenario {name}: {status}");
    }
}

fn memory_run(name: &str, o: &Opts) {
    let Some((mix, seconds, about)) = scenario(name, o) else {
        panic!("unknown scenario {name:?} (one of {SCENARIOS:?})");
    };
    let cpu = pin();
    let node = FakeNode::new();
    let mut pods = PodIndex::new(node.paths.clone());
    warm(&mut pods, &node);
    let cfg = Config::default();
    let (max_open, max_pending) = (cfg.max_open, cfg.max_pending);
    let (base, _) = memory();
    println!(
        "memory [{name}]: {} lookups/s for {seconds} simulated s from {} pods, {about}; pinned to CPU {}; \
         max_open {max_open}, max_pending {max_pending}; RSS before the stream {:.1} MiB",
        mix.rate,
        o.pods.unwrap_or(PODS),
        cpu.map_or("none".into(), |c| c.to_string()),
        mib(base)
    );
    let senders = &node.pods[..o.pods.unwrap_or(PODS)];
    let mut g = Generator::new(senders, mix, 0xfeed);
    let mut full = Full::new(&mut pods, cfg, SEC);
    let start = Instant::now();
    let mut events = 0u64;
    // (second, RSS, HWM, open lookups before the tick)
    let mut samples: Vec<(u64, u64, u64, usize)> = Vec::new();
    let mut on_tick = |now: u64, open: usize, c: &Correlator| {
        let (rss, hwm) = memory();
        let s = now / SEC;
        samples.push((s, rss, hwm, open));
        if s.is_multiple_of(10) || s == seconds {
            println!(
                "  t={s:>3} s  RSS {:>6.1} MiB  HWM {:>6.1} MiB  open lookups {open:>6} before \
                 the tick, {:>6} after  shed {} lookups, {} fates  wall {:.1} s",
                mib(rss),
                mib(hwm),
                c.open_lookups(),
                c.stats.shed.lookups,
                c.stats.shed.fates,
                start.elapsed().as_secs_f64()
            );
        }
    };
    g.run(seconds * SEC, |_, bytes| {
        events += 1;
        full.record(bytes, &mut on_tick);
    });
    full.advance(seconds * SEC, &mut on_tick);
    let wall = start.elapsed().as_secs_f64();
    let (rss_end, hwm) = memory();
    let late: Vec<&(u64, u64, u64, usize)> =
        samples.iter().filter(|(s, ..)| *s > seconds / 2).collect();
    let mut rss: Vec<f64> = late.iter().map(|x| x.1 as f64).collect();
    let (rss_lo, rss_hi) = (
        rss.iter().copied().fold(f64::INFINITY, f64::min),
        rss.iter().copied().fold(0.0, f64::max),
    );
    let rss_med = median(&mut rss);
    let open_max = late.iter().map(|x| x.3).max().unwrap_or(0);
    let open_min = late.iter().map(|x| x.3).min().unwrap_or(0);
    let st = &full.corr.stats;
    println!(
        "memory [{name}]: {events} records in {wall:.1} s wall ({:.0} records/s); \
         RSS in the second half: median {:.1} MiB (range {:.1}-{:.1}), at the end {:.1} MiB; \
         peak (VmHWM) {:.1} MiB; open lookups {open_min}-{open_max}",
        events as f64 / wall,
        rss_med / 1024.0,
        rss_lo / 1024.0,
        rss_hi / 1024.0,
        mib(rss_end),
        mib(hwm)
    );
    println!(
        "memory [{name}]: lookups done {} ({} problems), queries {}, answers {} ({} unmatched), \
         fates {} ({} never matched), shed: {} lookups, {} fates",
        full.lookups,
        full.problems,
        st.queries,
        st.answers,
        st.unmatched_answers,
        st.fates,
        st.unmatched_fates,
        st.shed.lookups,
        st.shed.fates
    );
    // What was still open, by size (after the figures: flushing allocates).
    full.corr.flush(seconds * SEC);
    let mut sizes: Vec<usize> = full
        .corr
        .take_done()
        .iter()
        .map(|l| l.queries.len())
        .collect();
    sizes.sort_unstable();
    if let Some(&max) = sizes.last() {
        println!(
            "memory [{name}]: queries per lookup still open at the end: median {}, p99 {}, max {max}",
            sizes[sizes.len() / 2],
            sizes[sizes.len() * 99 / 100]
        );
    }
}

fn main() {
    let mut args = std::env::args().skip(1).filter(|a| a != "--bench");
    let mut o = Opts {
        runs: 7,
        stages: Vec::new(),
        seconds: None,
        rate: None,
        tick_every: SEC,
        pods: None,
        rest: Vec::new(),
    };
    let mut mode = None;
    while let Some(a) = args.next() {
        let mut num = |what: &str| -> u64 {
            args.next()
                .and_then(|v| v.parse().ok())
                .filter(|v| *v > 0)
                .unwrap_or_else(|| panic!("{what} needs a positive number"))
        };
        match a.as_str() {
            "--runs" => o.runs = num("--runs") as usize,
            "--seconds" => o.seconds = Some(num("--seconds")),
            "--rate" => o.rate = Some(num("--rate")),
            "--tick-ms" => o.tick_every = num("--tick-ms") * 1_000_000,
            "--pods" => o.pods = Some((num("--pods") as usize).min(PODS)),
            "--stage" => o.stages.push(match args.next().as_deref() {
                Some("decode") => Stage::Decode,
                Some("enrich") => Stage::Enrich,
                Some("full") => Stage::Full,
                Some("json") => Stage::Json,
                s => panic!("--stage: decode, enrich or full, not {s:?}"),
            }),
            "throughput" | "memory" | "memory-run" if mode.is_none() => mode = Some(a),
            _ if a.starts_with('-') => panic!("unknown option {a}"),
            _ => o.rest.push(a),
        }
    }
    match mode.as_deref() {
        None | Some("throughput") => throughput(&o),
        Some("memory") => memory_mode(&o),
        Some("memory-run") => {
            let name = o.rest.first().cloned().unwrap_or_else(|| "steady".into());
            memory_run(&name, &o);
        }
        Some(m) => unreachable!("mode {m}"),
    }
}

//! Privileged tests of the lab's client processes (`tracer::lab::client`): the real
//! `tracer lab-client` binary started inside pod namespaces made here, against a real
//! dnsmasq, through a real masquerading node whose conntrack counters (read over
//! ctnetlink with `tracer::ctstats`) must account for every retried query. Run as root;
//! they fail (never skip) otherwise.

mod common;

use std::{
    net::{IpAddr, SocketAddr},
    process::Command,
    sync::Mutex,
    time::{Duration, Instant},
};

use tracer::{
    ctstats,
    lab::{
        client::{self, ResolverParams, ResolverReport},
        topology, Cluster, Rules,
    },
    netns::{self, veth_pair, Dnsmasq, Netns},
};

const TRACER: &str = env!("CARGO_BIN_EXE_tracer");
const QNAME: &str = "svc.clients.test";

/// The clients pin themselves to the CPUs and race each other: one test at a time.
static SERIAL: Mutex<()> = Mutex::new(());

fn serial() -> std::sync::MutexGuard<'static, ()> {
    SERIAL.lock().unwrap_or_else(|p| p.into_inner())
}

fn require_root() {
    assert!(
        netns::is_root(),
        "the lab client tests build network namespaces and read conntrack counters: run them as root"
    );
}

/// A dnsmasq answering [`QNAME`] (A and AAAA) on `ip`:53 in `ns`.
fn dns(ns: &Netns, ip: IpAddr) -> Dnsmasq {
    Dnsmasq::start(
        ns,
        &[ip],
        53,
        &[
            (QNAME, "10.96.5.5".parse().unwrap()),
            (QNAME, "fd96::5".parse().unwrap()),
        ],
    )
    .unwrap()
}

/// Nothing of a run is left: no process in the pods, no client process of ours, no
/// temporary directory of ours.
fn assert_nothing_left(pods: &[Netns]) {
    for p in pods {
        assert_eq!(
            p.pids(),
            Vec::<u32>::new(),
            "processes left in {}",
            p.name()
        );
    }
    let ours = format!(
        "{}-{}-clients-",
        tracer::lab::topology::PREFIX,
        std::process::id()
    );
    let tmp: Vec<String> = std::fs::read_dir(std::env::temp_dir())
        .unwrap()
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| n.starts_with(&ours))
        .collect();
    assert!(tmp.is_empty(), "temporary directories left: {tmp:?}");
    let procs: Vec<String> = std::fs::read_dir("/proc")
        .unwrap()
        .flatten()
        .filter_map(|e| std::fs::read(e.path().join("cmdline")).ok())
        .map(|c| String::from_utf8_lossy(&c).replace('\0', " "))
        .filter(|c| c.contains(client::SUBCOMMAND) && c.contains(&ours))
        .collect();
    assert!(procs.is_empty(), "client processes left: {procs:?}");
}

// --- (a) the A/AAAA race in a child process ------------------------------------------------

#[test]
fn race_client_process_answers_every_query() {
    require_root();
    let _s = serial();
    let p = "lcrace";
    {
        let pod = Netns::create(p).unwrap();
        let server = Netns::create(p).unwrap();
        veth_pair(&pod, &["10.240.0.2/24"], &server, &["10.240.0.1/24"]).unwrap();
        let srv: IpAddr = "10.240.0.1".parse().unwrap();
        let _dns = dns(&server, srv);
        let t = Instant::now();
        let r = client::run_race(
            pod.command(TRACER),
            SocketAddr::new(srv, 53),
            QNAME,
            20,
            common::bound(2),
        )
        .unwrap();
        eprintln!(
            "run_race: {} rounds, sent {}, answered {}, median send skew {:?} ns, cpus {:?}, {:?}",
            r.rounds,
            r.queries_sent,
            r.answered,
            r.median_send_skew_ns,
            r.cpus,
            t.elapsed()
        );
        assert_eq!((r.rounds, r.queries_sent), (20, 40), "{r:#?}");
        assert_eq!((r.answered, r.unanswered), (40, 0), "{r:#?}");
        assert_eq!(r.rounds_fully_answered, 20);
        for round in &r.per_round {
            // Sent from inside the pod: its address, not the test's.
            assert_eq!(
                round.local.map(|l| l.ip()),
                Some("10.240.0.2".parse().unwrap()),
                "{round:?}"
            );
            assert_ne!(round.a.id, round.aaaa.id);
            assert_eq!(round.a.qtype, "A");
            assert_eq!(round.aaaa.qtype, "AAAA");
            for q in [&round.a, &round.aaaa] {
                assert_eq!((q.rcode, q.answers), (Some(0), Some(1)), "{round:?}");
            }
            if r.cpus.len() == 2 {
                assert_ne!(round.a.cpu, round.aaaa.cpu, "not on two CPUs: {round:?}");
            }
        }
        assert_nothing_left(std::slice::from_ref(&pod));
    }
    assert_eq!(netns::leftovers(p), Vec::<String>::new());
}

// --- (b) resolvers racing in the node's SNAT -----------------------------------------------

/// The lab's own topology (`lab::topology::Cluster`): `n` pods behind a node that
/// masquerades them toward a server with no route back to the pods, here running dnsmasq.
struct Lab {
    // Field order is drop order: dnsmasq before the namespaces.
    _dns: Dnsmasq,
    cluster: Cluster,
}

fn server() -> SocketAddr {
    SocketAddr::new(IpAddr::V4(topology::SERVER_IP), 53)
}

impl Lab {
    fn new(n: usize, fully_random: bool) -> Lab {
        let cluster = Cluster::build(n, 0, true).unwrap();
        cluster.masquerade(Rules::Nft, fully_random).unwrap();
        let dns = dns(cluster.server.as_ref().unwrap(), server().ip());
        Lab { _dns: dns, cluster }
    }

    fn pods(&self) -> &[Netns] {
        &self.cluster.pods
    }

    fn params(base_port: u16, rounds: u32) -> ResolverParams {
        ResolverParams {
            server: server(),
            qname: QNAME.into(),
            base_port,
            rounds,
            // Scaled: in an emulated guest an answer can take longer than 300 ms, and a
            // retry nothing dropped would break the retries = insert_failed relation.
            timeout: common::bound_ms(300),
            attempts: 3,
        }
    }

    /// Runs the resolvers; returns the report and the node's `insert_failed` and `drop`
    /// deltas.
    fn run(&self, params: &ResolverParams) -> (ResolverReport, u32, u32) {
        let read = || {
            ctstats::read_in(&self.cluster.node.path())
                .unwrap()
                .totals()
        };
        let before = read();
        let t = Instant::now();
        let r = client::run_resolvers(
            self.pods().len(),
            |i| self.pods()[i].command(TRACER),
            params,
        )
        .unwrap();
        let took = t.elapsed();
        let d = read().delta(&before);
        let retried: Vec<String> = r
            .per_pod
            .iter()
            .flat_map(|p| p.rounds.iter().map(move |x| (p.pod, x)))
            .flat_map(|(pod, x)| [(pod, x.round, &x.a), (pod, x.round, &x.aaaa)])
            .filter(|(_, _, q)| q.retried())
            .take(6)
            .map(|(pod, round, q)| {
                format!(
                    "pod {pod} round {round} {:?}: {} tries, {:?} us",
                    q.qtype, q.attempts, q.latency_us
                )
            })
            .collect();
        eprintln!(
            "run_resolvers: {} pods, base port {:?}, {} rounds: queries {} datagrams {} answered {} \
             lost_first_try {} unanswered {} (rounds with a retry {}); start spread median {:?} ns, \
             max {:?} ns; latency {:?}, retried {:?}; node insert_failed {} drop {}; {:?}\n  {}",
            r.pods,
            r.base_port,
            r.rounds,
            r.queries_sent,
            r.datagrams_sent,
            r.answered,
            r.lost_first_try,
            r.unanswered,
            r.rounds_with_retry,
            r.median_start_spread_ns,
            r.max_start_spread_ns,
            r.latency,
            r.retried_latency,
            d.insert_failed,
            d.drop,
            took,
            retried.join("\n  ")
        );
        for pod in &r.per_pod {
            let mut v: Vec<u64> = pod.rounds.iter().map(|x| x.a.sent_ns).collect();
            v.sort_unstable();
            eprintln!(
                "  pod {} (cpu {:?}, racer {}): first send after the start instant: p10 {} ns, \
                 median {} ns, p90 {} ns, max {} ns",
                pod.pod,
                pod.cpu,
                pod.racer,
                v[v.len() / 10],
                v[v.len() / 2],
                v[v.len() * 9 / 10],
                v[v.len() - 1]
            );
        }
        assert_nothing_left(self.pods());
        (r, d.insert_failed, d.drop)
    }
}

/// Three pods resolve at the same instant from the same source port: every query whose
/// first datagram the node dropped (`insert_failed`) is answered after one retry, at least
/// one timeout late, and nothing else needs a retry. Runs of 100 rounds clashed 1 to 67
/// times here; up to 3 runs (on fresh ports) are made until one clashes.
#[test]
fn resolvers_retry_exactly_the_queries_the_snat_race_dropped() {
    require_root();
    let _s = serial();
    let p = topology::PREFIX;
    {
        let lab = Lab::new(3, false);
        let mut clashes = 0;
        for base_port in [42000, 46000, 50000] {
            clashes += check_retries_match_insert_failed(&lab, base_port);
            if clashes > 0 {
                break;
            }
        }
        assert!(
            clashes > 0,
            "the pods never clashed in the node's SNAT in 3 x 100 rounds"
        );
    }
    assert_eq!(netns::leftovers(p), Vec::<String>::new());
}

/// One run of 100 rounds from `base_port`; checks it and returns `insert_failed`.
fn check_retries_match_insert_failed(lab: &Lab, base_port: u16) -> u32 {
    let params = Lab::params(base_port, 100);
    let (r, insert_failed, drop) = lab.run(&params);
    assert_eq!((r.pods, r.rounds), (3, 100));
    assert_eq!(r.queries_sent, 600);
    assert_eq!(r.send_errors, 0, "{r:#?}");
    assert_eq!(
        (r.answered, r.unanswered),
        (600, 0),
        "every query is answered, after a retry at worst"
    );
    // Every datagram the node dropped cost exactly one retry, and nothing else did.
    let retries = r.datagrams_sent - r.queries_sent;
    assert_eq!(
        retries,
        u64::from(insert_failed),
        "retries vs insert_failed"
    );
    assert_eq!(drop, insert_failed);
    // A retry goes out alone (300 ms after the race), so it is not dropped again, and the
    // queries that needed a retry are the node's insert_failed. (Should two pods' retries
    // of one round ever clash, a query takes 3 tries; the line above still holds.)
    let third_tries = r
        .per_pod
        .iter()
        .flat_map(|p| &p.rounds)
        .flat_map(|x| [&x.a, &x.aaaa])
        .filter(|q| q.attempts > 2)
        .count() as u64;
    assert_eq!(
        r.lost_first_try + third_tries,
        u64::from(insert_failed),
        "queries that needed a retry vs the node's insert_failed"
    );
    if third_tries > 0 {
        eprintln!("  {third_tries} queries needed a third try");
    }
    let timeout_us = params.timeout.as_micros() as u64;
    for pod in &r.per_pod {
        assert_eq!(pod.rounds.len(), 100);
        for (i, round) in pod.rounds.iter().enumerate() {
            let port = params.port_for(i as u32);
            assert_eq!(round.src_port, port);
            assert_eq!(round.local.map(|l| l.port()), port, "{round:?}");
            for q in [&round.a, &round.aaaa] {
                assert_eq!((q.rcode, q.answers), (Some(0), Some(1)), "{q:?}");
                let lat = q.latency_us.unwrap();
                if q.retried() {
                    assert!(lat >= timeout_us, "retried but answered in {lat} us: {q:?}");
                } else {
                    assert!(lat < timeout_us, "{q:?}");
                }
            }
        }
    }
    assert!(r.retried_latency.is_none_or(|l| l.min_us >= timeout_us));
    assert_eq!(r.latencies_us.len(), 600);
    serde_json::to_string(&r).unwrap();
    insert_failed
}

/// `masquerade fully-random`, or ephemeral source ports: no clash, no retry.
#[test]
fn resolvers_need_no_retry_with_fully_random_or_ephemeral_ports() {
    require_root();
    let _s = serial();
    let p = topology::PREFIX;
    {
        let random = Lab::new(3, true);
        let (r, insert_failed, _) = random.run(&Lab::params(43000, 100));
        assert_eq!((insert_failed, r.lost_first_try), (0, 0), "fully-random");
        assert_eq!((r.answered, r.unanswered), (600, 0));
        drop(random);
        let plain = Lab::new(3, false);
        let (r, insert_failed, _) = plain.run(&Lab::params(0, 100));
        assert_eq!((insert_failed, r.lost_first_try), (0, 0), "ephemeral ports");
        assert_eq!((r.answered, r.unanswered), (600, 0));
        assert_eq!(r.base_port, None);
        let ports: std::collections::BTreeSet<u16> = r
            .per_pod
            .iter()
            .flat_map(|p| &p.rounds)
            .map(|x| x.local.unwrap().port())
            .collect();
        assert!(
            ports.len() > 250,
            "ephemeral ports should vary: {}",
            ports.len()
        );
    }
    assert_eq!(netns::leftovers(p), Vec::<String>::new());
}

/// A client killed mid-run ends the run with an error within a moment, and every other
/// client, the shared file and its directory go with it.
#[test]
fn a_killed_client_ends_the_run_promptly_and_leaves_nothing() {
    require_root();
    let _s = serial();
    let p = topology::PREFIX;
    {
        let lab = Lab::new(3, false);
        let params = Lab::params(44000, 10_000);
        let victim = &lab.pods()[1];
        let killed_at = Mutex::new(None);
        let result = std::thread::scope(|s| {
            s.spawn(|| {
                let deadline = Instant::now() + common::bound(10);
                let pid = loop {
                    if let Some(&pid) = victim.pids().first() {
                        break pid;
                    }
                    assert!(Instant::now() < deadline, "no client in pod 1");
                    std::thread::sleep(Duration::from_millis(5));
                };
                std::thread::sleep(Duration::from_millis(500));
                // SAFETY: kill(2) of a pid just read from the pod's namespace.
                assert_eq!(unsafe { libc::kill(pid as i32, libc::SIGKILL) }, 0);
                *killed_at.lock().unwrap() = Some(Instant::now());
            });
            client::run_resolvers(3, |i| lab.pods()[i].command(TRACER), &params)
        });
        let returned = Instant::now();
        let err = format!("{:#}", result.expect_err("the run went on without pod 1"));
        let after = returned - killed_at.lock().unwrap().expect("killed");
        eprintln!("killed pod 1's client: run_resolvers returned {after:?} later: {err}");
        assert!(after < common::bound(1) / 2, "{after:?}");
        assert!(
            err.contains("resolver client 1") && err.contains("signal: 9"),
            "{err}"
        );
        assert_nothing_left(lab.pods());

        // A child that fails at set-up (no route to the server) says why.
        let unreachable = ResolverParams {
            server: "[fd00::53]:53".parse().unwrap(),
            ..Lab::params(45000, 10)
        };
        let t = Instant::now();
        let err = client::run_resolvers(3, |i| lab.pods()[i].command(TRACER), &unreachable)
            .expect_err("connected to an unreachable server");
        let err = format!("{err:#}");
        eprintln!("unreachable server: error after {:?}: {err}", t.elapsed());
        assert!(t.elapsed() < common::bound(3));
        assert!(
            err.contains("connected to [fd00::53]:53") && err.contains("unreachable"),
            "{err}"
        );
        assert_nothing_left(lab.pods());

        // The wrong program: clap's complaint, and a hint.
        let err = client::run_resolvers(3, |i| lab.pods()[i].command("/bin/false"), &params)
            .expect_err("/bin/false is no client");
        assert!(format!("{err:#}").contains("exit status: 1"), "{err:#}");
        assert_nothing_left(lab.pods());
    }
    assert_eq!(netns::leftovers(p), Vec::<String>::new());
}

/// What a child does when its parent is gone: it dies with it (PR_SET_PDEATHSIG) rather
/// than wait for rounds that never come. Checked from a helper thread that spawns and
/// ends, like a parent dying mid-run.
#[test]
fn a_client_dies_with_its_parent() {
    require_root();
    let _s = serial();
    let p = "lcorph";
    {
        let pod = Netns::create(p).unwrap();
        let mut child = std::thread::spawn({
            let mut cmd: Command = pod.command(TRACER);
            move || {
                cmd.args([
                    client::SUBCOMMAND,
                    "race",
                    "--server",
                    "127.0.0.1:9",
                    "--qname",
                    QNAME,
                    "--rounds",
                    "1000",
                    "--timeout-us",
                    "60000000",
                ]);
                let mut child = cmd.spawn().unwrap();
                // Give it time to set the death signal (longer in the emulated guest), then
                // end this (its parent) thread without waiting for it.
                std::thread::sleep(common::bound(1) * 3 / 10);
                assert!(
                    child.try_wait().unwrap().is_none(),
                    "the client ended early"
                );
                child
            }
        })
        .join()
        .unwrap();
        let deadline = Instant::now() + common::bound(3);
        while !pod.pids().is_empty() {
            if Instant::now() > deadline {
                let _ = child.kill();
                let _ = child.wait();
                panic!("client {} outlived its parent thread", child.id());
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        // Still a child of this process (another thread of it inherits it): reap it.
        let status = child.wait().unwrap();
        assert_eq!(
            std::os::unix::process::ExitStatusExt::signal(&status),
            Some(libc::SIGKILL),
            "{status}"
        );
    }
    assert_eq!(netns::leftovers(p), Vec::<String>::new());
}

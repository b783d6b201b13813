//! Privileged tests of the traffic generators (`tracer::traffic`) in namespaces made here:
//! the A/AAAA race against a real DNS server (dnsmasq), and the SNAT port race through a
//! masquerading node, checked against the node's own conntrack counters (`conntrack -S`).
//! Run as root; they fail (not skip) otherwise.

mod common;

use std::collections::BTreeMap;
use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use tracer::netns::{self, veth_pair, veth_pair_named, Dnsmasq, Netns};
use tracer::traffic::{self, Proto, SnatOptions, SnatReport};

/// The race tests pin threads to both CPUs: running two at once would disturb each other.
static SERIAL: Mutex<()> = Mutex::new(());

fn serial() -> std::sync::MutexGuard<'static, ()> {
    SERIAL.lock().unwrap_or_else(|p| p.into_inner())
}

fn require_root() {
    assert!(
        netns::is_root(),
        "the traffic tests build network namespaces and nft rules: run them as root"
    );
}

/// `conntrack -S` inside `ns`, summed over CPUs: key -> value.
fn ct_stats(ns: &Netns) -> BTreeMap<String, u64> {
    let out = ns.run_stdout(["conntrack", "-S"]).expect("conntrack -S");
    let mut sum = BTreeMap::new();
    for line in out.lines() {
        for kv in line.split_whitespace() {
            if let Some((k, v)) = kv.split_once('=') {
                if k == "cpu" {
                    continue;
                }
                if let Ok(v) = v.parse::<u64>() {
                    *sum.entry(k.to_string()).or_insert(0) += v;
                }
            }
        }
    }
    assert!(
        sum.contains_key("insert_failed"),
        "unexpected `conntrack -S` output: {out}"
    );
    sum
}

fn delta(before: &BTreeMap<String, u64>, after: &BTreeMap<String, u64>) -> BTreeMap<String, u64> {
    after
        .iter()
        .map(|(k, v)| (k.clone(), v - before.get(k).copied().unwrap_or(0)))
        .filter(|(_, v)| *v != 0)
        .collect()
}

// --- (a) the A/AAAA race ------------------------------------------------------------------

#[test]
fn udp_race_answers_every_query() {
    require_root();
    let _s = serial();
    let p = "trrace";
    {
        let client = Netns::create(p).unwrap();
        let server = Netns::create(p).unwrap();
        veth_pair(&client, &["10.230.0.2/24"], &server, &["10.230.0.1/24"]).unwrap();
        let srv: IpAddr = "10.230.0.1".parse().unwrap();
        let _dns = Dnsmasq::start(
            &server,
            &[srv],
            53,
            &[
                ("race.test", "10.96.7.7".parse().unwrap()),
                ("race.test", "fd96::7".parse().unwrap()),
            ],
        )
        .unwrap();
        let t = Instant::now();
        let r = traffic::udp_race(
            &client.path(),
            SocketAddr::new(srv, 53),
            20,
            common::bound(2),
        )
        .unwrap();
        eprintln!(
            "udp_race: {} rounds, sent {}, answered {}, unanswered {}, median send skew {:?} ns, cpus {:?}, {:?}",
            r.rounds, r.queries_sent, r.answered, r.unanswered, r.median_send_skew_ns, r.cpus, t.elapsed()
        );
        assert_eq!(r.rounds, 20);
        assert_eq!(r.queries_sent, 40, "{r:#?}");
        assert_eq!((r.answered, r.unanswered), (40, 0), "{r:#?}");
        assert_eq!(r.rounds_fully_answered, 20);
        let mut ports = std::collections::BTreeSet::new();
        for round in &r.per_round {
            assert_ne!(round.a.id, round.aaaa.id);
            assert_eq!(round.a.rcode, Some(0), "{round:?}");
            assert_eq!(round.a.answers, Some(1), "{round:?}");
            assert_eq!(round.aaaa.answers, Some(1), "{round:?}");
            assert!(round.a.latency_us.is_some() && round.aaaa.latency_us.is_some());
            ports.insert(round.local.expect("local address").port());
            if r.cpus.len() == 2 {
                assert_ne!(
                    round.a.cpu, round.aaaa.cpu,
                    "senders not on two CPUs: {round:?}"
                );
            }
        }
        assert_eq!(ports.len(), 20, "a fresh source port every round");
        serde_json::to_string(&r).unwrap();
    }
    assert_eq!(netns::leftovers(p), Vec::<String>::new());
}

/// Same race to a VIP DNATed at random to two backends in the client's own namespace: the
/// two queries of a round are real conntrack races (`clash_resolve` rises) and 6.18 resolves
/// every one (nothing is lost).
#[test]
fn udp_race_through_random_dnat_races_and_is_resolved() {
    require_root();
    let _s = serial();
    let p = "trdnat";
    {
        let client = Netns::create(p).unwrap();
        let server = Netns::create(p).unwrap();
        veth_pair(
            &client,
            &["10.233.0.2/24"],
            &server,
            &["10.233.0.1/24", "10.233.0.3/24"],
        )
        .unwrap();
        let b1: IpAddr = "10.233.0.1".parse().unwrap();
        let b2: IpAddr = "10.233.0.3".parse().unwrap();
        client.route_add("default via 10.233.0.1").unwrap();
        let _dns = Dnsmasq::start(
            &server,
            &[b1, b2],
            53,
            &[("race.test", "10.96.7.7".parse().unwrap())],
        )
        .unwrap();
        client
            .nft(
                "table ip nat {\n chain out {\n  type nat hook output priority -100;\n  \
                 ip daddr 10.96.0.10 udp dport 53 dnat to numgen random mod 2 map { 0 : 10.233.0.1, 1 : 10.233.0.3 }\n }\n}\n",
            )
            .unwrap();
        let before = ct_stats(&client);
        let r = traffic::udp_race(
            &client.path(),
            "10.96.0.10:53".parse().unwrap(),
            50,
            common::bound(2),
        )
        .unwrap();
        let d = delta(&before, &ct_stats(&client));
        eprintln!(
            "udp_race via DNAT: sent {}, answered {}, unanswered {}, median skew {:?} ns; conntrack delta {d:?}",
            r.queries_sent, r.answered, r.unanswered, r.median_send_skew_ns
        );
        assert_eq!(r.unanswered, 0, "{r:#?}");
        assert!(
            d.get("clash_resolve").copied().unwrap_or(0) > 0,
            "the two sends never raced in 50 rounds: {d:?}"
        );
        assert_eq!(d.get("insert_failed"), None, "{d:?}");
    }
    assert_eq!(netns::leftovers(p), Vec::<String>::new());
}

// --- (b) the SNAT port race ---------------------------------------------------------------

struct SnatLab {
    pods: Vec<Netns>,
    node: Netns,
    server: Netns,
    server_addr: IpAddr,
}

impl SnatLab {
    /// `n` pods 10.<b>.<i>.2/24 each behind its own veth to the node (10.<b>.<i>.1), the node
    /// masquerading out of `toserver` (10.<b>.100.1/24) toward the server 10.<b>.100.2, which
    /// has no route back to the pods.
    fn new(prefix: &str, b: u8, n: u8, fully_random: bool) -> SnatLab {
        let node = Netns::create(prefix).unwrap();
        let server = Netns::create(prefix).unwrap();
        let mut pods = Vec::new();
        for i in 1..=n {
            let pod = Netns::create(prefix).unwrap();
            veth_pair(
                &pod,
                &[&format!("10.{b}.{i}.2/24")],
                &node,
                &[&format!("10.{b}.{i}.1/24")],
            )
            .unwrap();
            pod.route_add(&format!("default via 10.{b}.{i}.1")).unwrap();
            pods.push(pod);
        }
        veth_pair_named(
            &node,
            "toserver",
            &[&format!("10.{b}.100.1/24")],
            &server,
            "eth0",
            &[&format!("10.{b}.100.2/24")],
        )
        .unwrap();
        node.sysctl_set("net.ipv4.ip_forward", "1").unwrap();
        let random = if fully_random { " fully-random" } else { "" };
        node.nft(&format!(
            "table ip nat {{\n chain post {{\n  type nat hook postrouting priority 100;\n  \
             oifname \"toserver\" masquerade{random}\n }}\n}}\n"
        ))
        .unwrap();
        SnatLab {
            pods,
            node,
            server,
            server_addr: format!("10.{b}.100.2").parse().unwrap(),
        }
    }

    fn pod_paths(&self) -> Vec<PathBuf> {
        self.pods.iter().map(Netns::path).collect()
    }

    /// Runs the race against an echo server and returns the report and the node's
    /// conntrack counter deltas.
    fn race(
        &self,
        proto: Proto,
        src_port: Option<u16>,
        rounds: u32,
        timeout: Duration,
        opts: &SnatOptions,
    ) -> (SnatReport, BTreeMap<String, u64>) {
        let addr = SocketAddr::new(self.server_addr, 8080);
        let server = traffic::echo_server(&self.server.path(), addr, proto).unwrap();
        let before = ct_stats(&self.node);
        let r = traffic::snat_race_with(
            &self.pod_paths(),
            addr,
            proto,
            src_port,
            rounds,
            timeout,
            opts,
        )
        .unwrap();
        let after = ct_stats(&self.node);
        let handled = server.handled();
        server.stop().unwrap();
        let d = delta(&before, &after);
        let lost_rounds: Vec<String> = r
            .per_round
            .iter()
            .filter(|x| x.failed > 0 || x.slow > 0)
            .take(8)
            .map(|x| {
                let a: Vec<String> = x
                    .attempts
                    .iter()
                    .map(|a| {
                        format!(
                            "c{} cpu{:?} {:?} {}us",
                            a.client, a.cpu, a.outcome, a.latency_us
                        )
                    })
                    .collect();
                format!("round {}: {}", x.round, a.join(", "))
            })
            .collect();
        eprintln!(
            "{proto:?} src_port={src_port:?} rotate={} pods={} rounds={rounds} timeout={timeout:?}: attempts {} ok {} failed {} \
             (timeouts {} errors {}) slow {} lossy rounds {} latency {:?} server handled {handled} in {} ms; \
             node conntrack delta {d:?}\n  {}",
            opts.rotate_port,
            self.pods.len(),
            r.attempts,
            r.succeeded,
            r.failed,
            r.timeouts,
            r.errors,
            r.slow,
            r.rounds_with_loss,
            r.latency,
            r.elapsed_ms,
            lost_rounds.join("\n  ")
        );
        (r, d)
    }
}

fn get(d: &BTreeMap<String, u64>, k: &str) -> u64 {
    d.get(k).copied().unwrap_or(0)
}

/// Checks that `r` had no losses and the node no clashes.
fn assert_clean(r: &SnatReport, d: &BTreeMap<String, u64>, what: &str) {
    assert_eq!(r.attempts, u64::from(r.rounds) * r.clients as u64, "{what}");
    assert_eq!(
        (r.succeeded, r.failed, r.slow),
        (r.attempts, 0, 0),
        "{what}: losses: {:?}",
        r.per_round
            .iter()
            .filter(|x| x.failed + x.slow > 0)
            .collect::<Vec<_>>()
    );
    assert_eq!(get(d, "insert_failed"), 0, "{what}: {d:?}");
    assert_eq!(get(d, "drop"), 0, "{what}: {d:?}");
}

/// Three pods send one UDP datagram each at the same moment from the same source port:
/// every lost datagram is exactly one `insert_failed` (and one `drop`) in the node.
#[test]
fn snat_udp_shared_port_losses_are_insert_failed() {
    require_root();
    let _s = serial();
    let p = "trsnu";
    {
        let lab = SnatLab::new(p, 234, 3, false);
        let (r, d) = lab.race(
            Proto::Udp,
            Some(20000),
            200,
            common::bound_ms(100),
            &SnatOptions::default(),
        );
        assert_eq!(r.attempts, 600);
        assert_eq!(
            r.errors,
            0,
            "{:?}",
            r.per_round.iter().find(|x| x.failed > 0)
        );
        let insert_failed = get(&d, "insert_failed");
        assert!(insert_failed > 0, "no SNAT clash in 200 rounds: {d:?}");
        assert_eq!(
            r.timeouts, insert_failed,
            "lost datagrams vs insert_failed: {d:?}"
        );
        assert_eq!(get(&d, "drop"), insert_failed, "{d:?}");
        assert_eq!(r.slow, 0);
        // One source port per round, shared by all pods, never the same twice.
        let ports: std::collections::BTreeSet<_> = r.per_round.iter().map(|x| x.src_port).collect();
        assert_eq!(ports.len(), 200);
        for round in &r.per_round {
            assert!(round.succeeded >= 1, "somebody wins every clash: {round:?}");
            for a in &round.attempts {
                assert_eq!(a.local.map(|l| l.port()), round.src_port, "{a:?}");
            }
        }
        serde_json::to_string(&r).unwrap();
    }
    assert_eq!(netns::leftovers(p), Vec::<String>::new());
}

/// The same with TCP connects: a clash drops the SYN. With a timeout below the SYN
/// retransmission (1 s) every drop is a timed-out connect; with a longer one every drop is a
/// connect that took ~1 s ("slow"), and none fails.
#[test]
fn snat_tcp_shared_port_dropped_syns_are_insert_failed() {
    require_root();
    let _s = serial();
    let p = "trsnt";
    {
        let lab = SnatLab::new(p, 235, 3, false);
        let opts = SnatOptions::default();
        let (r, d) = lab.race(Proto::Tcp, Some(30000), 200, common::bound_ms(100), &opts);
        let insert_failed = get(&d, "insert_failed");
        assert!(insert_failed > 0, "no SNAT clash in 200 rounds: {d:?}");
        assert_eq!(
            r.errors,
            0,
            "{:?}",
            r.per_round.iter().find(|x| x.failed > 0)
        );
        assert_eq!(
            r.timeouts, insert_failed,
            "timed-out connects vs insert_failed: {d:?}"
        );
        assert_eq!(get(&d, "drop"), insert_failed, "{d:?}");

        // Longer than the SYN retransmission: each dropped SYN is one ~1 s connect. With
        // two CPUs only one client per round loses, so its retransmission goes alone and
        // never clashes again.
        // The race is a matter of scheduling: on a loaded machine a batch of 20 rounds
        // can pass without one, so run up to 5 batches (bounded) until one clashes; every
        // batch is held to the same relation.
        let mut clashed = false;
        for _ in 0..5 {
            let (r, d) = lab.race(Proto::Tcp, Some(40000), 20, common::bound_ms(1500), &opts);
            let insert_failed = get(&d, "insert_failed");
            assert_eq!(r.failed, 0, "{r:#?}");
            assert_eq!(
                r.slow, insert_failed,
                "slow connects vs insert_failed: {d:?}"
            );
            // Prompt, or one SYN retransmit (1 s) later; a slower machine adds to both.
            let slack = common::bound_ms(300).as_micros() as u64;
            for a in r.per_round.iter().flat_map(|x| &x.attempts) {
                let us = a.latency_us;
                assert!(
                    us < slack || (900_000..1_000_000 + slack).contains(&us),
                    "neither prompt nor one RTO: {a:?}"
                );
            }
            if insert_failed > 0 {
                clashed = true;
                break;
            }
        }
        assert!(clashed, "no SNAT clash in 5 batches of 20 rounds");
    }
    assert_eq!(netns::leftovers(p), Vec::<String>::new());
}

/// `rotate_port: 1` = literally the same port every round. UDP: the winner's conntrack
/// entry from round 0 outlives the round, so later rounds reuse it (and the loser gets
/// another port for good): only round 0 can clash. TCP: the RST-closed entries are
/// re-opened by the next SYN, so it clashes in later rounds too, with the same relation.
#[test]
fn snat_literally_fixed_port() {
    require_root();
    let _s = serial();
    let p = "trsnf";
    {
        let lab = SnatLab::new(p, 239, 2, false);
        let fixed = SnatOptions {
            rotate_port: 1,
            ..Default::default()
        };
        let t = common::bound_ms(100);
        let (r, d) = lab.race(Proto::Udp, Some(20000), 200, t, &fixed);
        assert_eq!(r.failed, get(&d, "insert_failed"), "{d:?}");
        assert!(r.failed <= 1, "{r:#?}");
        // The 199 later rounds ran, and none clashed.
        assert_eq!(r.per_round.len(), 200);
        assert!(r.per_round[1..].iter().all(|x| x.failed == 0));
        // TCP clashes in later rounds too: up to 3 batches (bounded) until one does,
        // every batch held to the relation.
        let mut clashed = false;
        for _ in 0..3 {
            let (r, d) = lab.race(Proto::Tcp, Some(30000), 100, t, &fixed);
            assert_eq!(r.timeouts, get(&d, "insert_failed"), "{d:?}");
            assert_eq!(r.errors, 0);
            for x in &r.per_round {
                for a in &x.attempts {
                    assert_eq!(a.local.unwrap().port(), 30000, "{a:?}");
                }
            }
            if r.timeouts > 0 {
                clashed = true;
                break;
            }
        }
        assert!(
            clashed,
            "no TCP clash on the fixed port in 3 batches of 100 rounds"
        );
    }
    assert_eq!(netns::leftovers(p), Vec::<String>::new());
}

/// `masquerade fully-random`, or ephemeral source ports: no clash, nothing lost.
#[test]
fn snat_no_losses_with_fully_random_or_ephemeral_ports() {
    require_root();
    let _s = serial();
    let p = "trsnok";
    {
        let t = common::bound_ms(500);
        let opts = SnatOptions::default();
        let random = SnatLab::new(p, 236, 3, true);
        for proto in [Proto::Udp, Proto::Tcp] {
            let (r, d) = random.race(proto, Some(20000), 200, t, &opts);
            assert_clean(&r, &d, &format!("{proto:?} fully-random"));
        }
        drop(random);
        let plain = SnatLab::new(p, 237, 3, false);
        for proto in [Proto::Udp, Proto::Tcp] {
            let (r, d) = plain.race(proto, None, 200, t, &opts);
            assert_clean(&r, &d, &format!("{proto:?} ephemeral"));
            let ports: std::collections::BTreeSet<u16> = r
                .per_round
                .iter()
                .flat_map(|x| &x.attempts)
                .map(|a| a.local.unwrap().port())
                .collect();
            assert!(
                ports.len() > 500,
                "ephemeral ports should vary: {}",
                ports.len()
            );
        }
    }
    assert_eq!(netns::leftovers(p), Vec::<String>::new());
}

// --- (c) helpers ----------------------------------------------------------------------------

/// `in_netns` sockets stay in their namespace; `send_udp` sends from the given address;
/// `udp_flows` makes exactly n conntrack entries; `udp_echo_flows` counts echoes.
#[test]
fn send_udp_and_flows() {
    require_root();
    let _s = serial();
    let p = "trflow";
    {
        let lab = SnatLab::new(p, 238, 1, false);
        let pod = &lab.pods[0];
        // A socket made in the server's namespace, used from this thread afterwards.
        let rx = traffic::in_netns(&lab.server.path(), || {
            let s = std::net::UdpSocket::bind("10.238.100.2:9999").unwrap();
            s.set_read_timeout(Some(common::bound(2))).unwrap();
            s
        })
        .unwrap();
        let ino = traffic::in_netns(&pod.path(), || {
            std::fs::read_link("/proc/thread-self/ns/net").unwrap()
        })
        .unwrap();
        assert_eq!(ino.to_string_lossy(), format!("net:[{}]", pod.inode()));
        traffic::send_udp(
            &pod.path(),
            Some("10.238.1.2:4242".parse().unwrap()),
            "10.238.100.2:9999".parse().unwrap(),
            b"hello",
        )
        .unwrap();
        let mut buf = [0u8; 16];
        let (n, from) = rx.recv_from(&mut buf).unwrap();
        assert_eq!(&buf[..n], b"hello");
        // Masqueraded by the node, which keeps the port.
        assert_eq!(from, "10.238.100.1:4242".parse().unwrap());
        traffic::send_udp(
            &pod.path(),
            None,
            "10.238.100.2:9999".parse().unwrap(),
            b"x",
        )
        .unwrap();
        assert_eq!(rx.recv_from(&mut buf).unwrap().0, 1);

        let count = || -> u64 {
            lab.node
                .run_stdout(["conntrack", "-C"])
                .unwrap()
                .trim()
                .parse()
                .unwrap()
        };
        let before = count();
        traffic::udp_flows(&pod.path(), "10.238.100.2".parse().unwrap(), 7, 1000).unwrap();
        assert_eq!(count() - before, 1000, "one conntrack entry per flow");

        let addr: SocketAddr = "10.238.100.2:8080".parse().unwrap();
        let server = traffic::echo_server(&lab.server.path(), addr, Proto::Udp).unwrap();
        let before = count();
        let r = traffic::udp_echo_flows(&pod.path(), addr, 600, common::bound(1)).unwrap();
        assert_eq!((r.attempts, r.succeeded, r.failed), (600, 600, 0), "{r:?}");
        assert_eq!(count() - before, 600);
        assert_eq!(server.handled(), 600);
        // Nobody listening: a refused echo is a failure, not a hang.
        let r = traffic::udp_echo_flows(
            &pod.path(),
            "10.238.100.2:8081".parse().unwrap(),
            3,
            common::bound_ms(300),
        )
        .unwrap();
        assert_eq!((r.attempts, r.succeeded, r.failed), (3, 0, 3), "{r:?}");
        // A server address not in the namespace is an error at start.
        let err = traffic::echo_server(
            &lab.server.path(),
            "10.9.9.9:1".parse().unwrap(),
            Proto::Tcp,
        )
        .unwrap_err();
        assert!(
            format!("{err:#}").contains("Cannot assign requested address"),
            "{err:#}"
        );
    }
    assert_eq!(netns::leftovers(p), Vec::<String>::new());
}

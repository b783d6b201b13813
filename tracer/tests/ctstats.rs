//! Privileged tests of `tracer::ctstats`: the kernel's conntrack counters read over ctnetlink,
//! in namespaces made here, checked against `conntrack -S` / `conntrack -C`
//! (conntrack-tools). Run as root; they fail (never skip) otherwise.

mod common;

use std::{
    collections::BTreeMap,
    net::{Ipv4Addr, SocketAddr, UdpSocket},
    path::Path,
    time::Duration,
};

use common::bound;
use tracer::{
    ctstats::{self, CpuStats, CtStats, CtStatsError},
    netns::{self, Netns},
};

fn require_root() {
    assert!(
        netns::is_root(),
        "the ctstats tests build network namespaces and talk ctnetlink: run them as root"
    );
}

/// A ruleset that makes conntrack engage in the namespace (nft_ct registers the conntrack
/// hooks for the family) and counts new connections.
const CT_RULES: &str = "
table inet ctstats_test {
    chain output {
        type filter hook output priority filter; policy accept;
        ct state new counter accept
    }
    chain nat_output {
        type nat hook output priority -100; policy accept;
        ip daddr 127.0.0.2 counter dnat ip to 127.0.0.1
    }
}
";

fn ns_with_conntrack(prefix: &str) -> Netns {
    let ns = Netns::create(prefix).expect("creating netns (needs root and iproute2)");
    ns.nft(CT_RULES).expect("loading the conntrack ruleset");
    ns
}

/// Runs `f` on a thread that joined `ns` (the test thread stays where it is).
fn in_netns<T: Send>(ns: &Netns, f: impl FnOnce() -> T + Send) -> T {
    tracer::traffic::in_netns(&ns.path(), f).expect("entering the test netns")
}

/// Sends one UDP datagram on each of `n` distinct flows (distinct source ports) to a bound
/// receiver on 127.0.0.1 inside `ns`, and waits until all arrived.
fn udp_flows(ns: &Netns, n: usize) {
    in_netns(ns, || {
        let rx = UdpSocket::bind((Ipv4Addr::LOCALHOST, 0)).unwrap();
        rx.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        let to = rx.local_addr().unwrap();
        let senders: Vec<UdpSocket> = (0..n)
            .map(|_| UdpSocket::bind((Ipv4Addr::LOCALHOST, 0)).unwrap())
            .collect();
        for s in &senders {
            s.send_to(b"ctstats", to).unwrap();
        }
        let mut buf = [0u8; 16];
        for i in 0..n {
            rx.recv_from(&mut buf)
                .unwrap_or_else(|e| panic!("datagram {i} of {n} did not arrive: {e}"));
        }
    });
}

fn read(ns: &Netns) -> CtStats {
    ctstats::read_in(&ns.path()).unwrap_or_else(|e| panic!("read_in: {e}"))
}

/// `conntrack -S` in `ns`: cpu number -> (counter name -> value), every `key=value` it prints.
fn conntrack_s(ns: &Netns) -> BTreeMap<u16, BTreeMap<String, u32>> {
    let out = ns.run_stdout(["conntrack", "-S"]).expect("conntrack -S");
    let mut cpus = BTreeMap::new();
    for line in out.lines().filter(|l| !l.trim().is_empty()) {
        let mut cpu = None;
        let mut fields = BTreeMap::new();
        for kv in line.split_whitespace() {
            let (k, v) = kv
                .split_once('=')
                .unwrap_or_else(|| panic!("unexpected `conntrack -S` line {line:?}"));
            let v: u32 = v
                .parse()
                .unwrap_or_else(|_| panic!("bad value in `conntrack -S` line {line:?}"));
            if k == "cpu" {
                cpu = Some(u16::try_from(v).unwrap());
            } else {
                fields.insert(k.to_string(), v);
            }
        }
        let cpu = cpu.unwrap_or_else(|| panic!("no cpu= in `conntrack -S` line {line:?}"));
        cpus.insert(cpu, fields);
    }
    cpus
}

fn conntrack_c(ns: &Netns) -> u32 {
    let out = ns.run_stdout(["conntrack", "-C"]).expect("conntrack -C");
    out.trim()
        .parse()
        .unwrap_or_else(|_| panic!("bad `conntrack -C` output {out:?}"))
}

/// Reads the stats, runs the tools, reads again: the namespace must be quiet (both reads
/// equal) and every counter must equal what conntrack-tools printed. Returns the stats.
fn read_and_compare_with_tools(ns: &Netns) -> CtStats {
    let ours = read(ns);
    let tool = conntrack_s(ns);
    let tool_count = conntrack_c(ns);
    let again = read(ns);
    assert_eq!(
        ours,
        again,
        "netns {} was not quiet while comparing with conntrack-tools",
        ns.name()
    );

    let our_cpus: Vec<u16> = ours.per_cpu.iter().map(|c| c.cpu).collect();
    let tool_cpus: Vec<u16> = tool.keys().copied().collect();
    assert_eq!(our_cpus, tool_cpus, "CPU sets differ from `conntrack -S`");
    for c in &ours.per_cpu {
        let t = &tool[&c.cpu];
        let ours_named: BTreeMap<String, u32> = c
            .fields()
            .iter()
            .map(|(k, v)| (k.to_string(), *v))
            .collect();
        assert_eq!(
            &ours_named, t,
            "cpu {}: counters differ from `conntrack -S` (left: ours, right: the tool)",
            c.cpu
        );
    }
    assert_eq!(ours.count, tool_count, "count differs from `conntrack -C`");
    let max: u32 = ns
        .sysctl_get("net.netfilter.nf_conntrack_max")
        .unwrap()
        .parse()
        .unwrap();
    assert_eq!(ours.max, Some(max), "max differs from nf_conntrack_max");
    ours
}

/// Number of possible CPUs (`/sys/devices/system/cpu/possible`, e.g. `0-3,5`): the kernel
/// sends one message per possible CPU.
fn possible_cpus() -> Vec<u16> {
    let s = std::fs::read_to_string("/sys/devices/system/cpu/possible").unwrap();
    let mut cpus = Vec::new();
    for part in s.trim().split(',') {
        match part.split_once('-') {
            Some((a, b)) => cpus.extend(a.parse::<u16>().unwrap()..=b.parse::<u16>().unwrap()),
            None => cpus.push(part.parse().unwrap()),
        }
    }
    cpus
}

fn thread_netns() -> std::path::PathBuf {
    std::fs::read_link("/proc/thread-self/ns/net").unwrap()
}

#[test]
fn untouched_netns_answers_zeros() {
    require_root();
    let ns = Netns::create("cts-zero").unwrap();
    let s = read_and_compare_with_tools(&ns);
    let cpus: Vec<u16> = s.per_cpu.iter().map(|c| c.cpu).collect();
    assert_eq!(cpus, possible_cpus());
    assert_eq!(s.count, 0);
    for c in &s.per_cpu {
        assert_eq!(
            *c,
            CpuStats {
                cpu: c.cpu,
                ..CpuStats::default()
            },
            "conntrack never engaged in {}, yet counters are not zero",
            ns.name()
        );
    }
}

#[test]
fn udp_flows_are_counted_like_conntrack_tools() {
    require_root();
    const N: usize = 25;
    let ns = ns_with_conntrack("cts-udp");
    let before = read_and_compare_with_tools(&ns);
    assert_eq!(before.count, 0, "fresh netns has conntrack entries");

    udp_flows(&ns, N);

    let after = read_and_compare_with_tools(&ns);
    let d = after.totals().delta(&before.totals());
    assert_eq!(
        after.count as usize, N,
        "entries after {N} flows; delta = {d:?}"
    );
    // Entries confirmed on the packet path do not bump `insert` (only ctnetlink-created
    // ones do, see `ctnetlink_inserts_are_counted`); nothing may have failed or dropped.
    assert_eq!(d.insert_failed, 0, "delta = {d:?}");
    assert_eq!(d.drop, 0, "delta = {d:?}");
    assert_eq!(d.early_drop, 0, "delta = {d:?}");

    // The ruleset's own counter agrees: N new connections went through output.
    let rules = ns.run_stdout(["nft", "list", "chain", "inet", "ctstats_test", "output"]);
    let rules = rules.unwrap();
    assert!(
        rules.contains(&format!("counter packets {N} ")),
        "nft counter does not show {N} new connections:\n{rules}"
    );
}

/// Entries created over ctnetlink (`conntrack -I`) go through
/// `nf_conntrack_hash_check_insert`, which counts `insert`.
fn ctnetlink_insert(ns: &Netns, sport: u16) {
    let sport = sport.to_string();
    ns.run([
        "conntrack",
        "-I",
        "-p",
        "udp",
        "-s",
        "10.9.0.1",
        "-d",
        "10.9.0.2",
        "--sport",
        &sport,
        "--dport",
        "53",
        "--timeout",
        "120",
    ])
    .expect("conntrack -I");
}

#[test]
fn ctnetlink_inserts_are_counted() {
    require_root();
    const N: u16 = 12;
    // No ruleset: ctnetlink creates entries even where no rule engaged conntrack.
    let ns = Netns::create("cts-ins").unwrap();
    let before = read_and_compare_with_tools(&ns);
    for i in 0..N {
        ctnetlink_insert(&ns, 1000 + i);
    }
    let after = read_and_compare_with_tools(&ns);
    let d = after.totals().delta(&before.totals());
    assert_eq!(d.insert, u32::from(N), "insert delta; delta = {d:?}");
    assert_eq!(after.count, u32::from(N));
    assert_eq!(d.insert_failed, 0, "delta = {d:?}");
}

#[test]
fn nat_flows_are_counted() {
    require_root();
    const N: usize = 7;
    let ns = ns_with_conntrack("cts-nat");
    let before = read(&ns);
    in_netns(&ns, || {
        // 127.0.0.2 is DNATed to 127.0.0.1 (the nat chain above).
        let rx = UdpSocket::bind((Ipv4Addr::LOCALHOST, 0)).unwrap();
        rx.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        let to = SocketAddr::from((Ipv4Addr::new(127, 0, 0, 2), rx.local_addr().unwrap().port()));
        for _ in 0..N {
            let s = UdpSocket::bind((Ipv4Addr::LOCALHOST, 0)).unwrap();
            s.send_to(b"nat", to).unwrap();
            let mut buf = [0u8; 8];
            rx.recv_from(&mut buf)
                .expect("DNATed datagram did not arrive");
        }
    });
    let after = read_and_compare_with_tools(&ns);
    let d = after.totals().delta(&before.totals());
    assert_eq!(after.count as usize, N, "delta = {d:?}");
    assert_eq!(d.insert_failed + d.drop, 0, "delta = {d:?}");
    let list = ns.run_stdout(["conntrack", "-L", "-p", "udp"]).unwrap();
    assert_eq!(
        list.lines().filter(|l| l.contains("dst=127.0.0.2")).count(),
        N,
        "expected {N} DNATed entries:\n{list}"
    );
}

#[test]
fn namespaces_are_independent() {
    require_root();
    let a = ns_with_conntrack("cts-a");
    let b = ns_with_conntrack("cts-b");
    let b_before = read(&b);
    let a_before = read(&a);

    udp_flows(&a, 10);
    ctnetlink_insert(&a, 7);

    let a_after = read(&a);
    let b_after = read(&b);
    assert_eq!(a_after.count, 11, "activity in A not seen in A");
    assert_eq!(a_after.totals().delta(&a_before.totals()).insert, 1);
    assert_eq!(b_after, b_before, "activity in A changed the stats of B");

    udp_flows(&b, 3);
    ctnetlink_insert(&b, 7);
    ctnetlink_insert(&b, 8);
    let b_final = read(&b);
    assert_eq!(b_final.count, 5);
    assert_eq!(b_final.totals().delta(&b_before.totals()).insert, 2);
    assert_eq!(read(&a), a_after, "activity in B changed the stats of A");
}

/// TCP checksum over the IPv4 pseudo header (127.0.0.1 -> 127.0.0.1) and `seg`.
fn tcp_checksum(seg: &[u8]) -> u16 {
    let mut sum: u32 = 0;
    let mut add = |b: &[u8]| {
        for ch in b.chunks(2) {
            let w = u16::from_be_bytes([ch[0], *ch.get(1).unwrap_or(&0)]);
            sum += u32::from(w);
        }
    };
    add(&[127, 0, 0, 1, 127, 0, 0, 1, 0, 6]);
    add(&(seg.len() as u16).to_be_bytes());
    add(seg);
    while sum > 0xffff {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    !(sum as u16)
}

/// How many times conntrack counts one SYN+FIN segment sent over lo to a closed port:
/// the segment in the output and the input hook, and the RST the stack answers with in both.
const INVALID_PER_SEGMENT: u32 = 4;

#[test]
fn invalid_packets_are_counted() {
    require_root();
    let ns = ns_with_conntrack("cts-inv");
    let before = read(&ns);
    in_netns(&ns, || {
        // A TCP segment with SYN and FIN set: conntrack's TCP tracker calls it invalid.
        // SAFETY: plain syscalls on a descriptor closed below.
        unsafe {
            let fd = libc::socket(libc::AF_INET, libc::SOCK_RAW, libc::IPPROTO_TCP);
            assert!(fd >= 0, "raw socket: {}", std::io::Error::last_os_error());
            let mut seg = [0u8; 20];
            seg[0..2].copy_from_slice(&40000u16.to_be_bytes());
            seg[2..4].copy_from_slice(&40001u16.to_be_bytes());
            seg[4..8].copy_from_slice(&1u32.to_be_bytes());
            seg[12] = 5 << 4;
            seg[13] = 0x03; // FIN | SYN
            seg[14..16].copy_from_slice(&1024u16.to_be_bytes());
            let c = tcp_checksum(&seg);
            seg[16..18].copy_from_slice(&c.to_be_bytes());
            let mut to: libc::sockaddr_in = std::mem::zeroed();
            to.sin_family = libc::AF_INET as libc::sa_family_t;
            to.sin_addr.s_addr = u32::from(Ipv4Addr::LOCALHOST).to_be();
            let n = libc::sendto(
                fd,
                seg.as_ptr().cast(),
                seg.len(),
                0,
                (&raw const to).cast(),
                size_of::<libc::sockaddr_in>() as libc::socklen_t,
            );
            assert_eq!(n, 20, "sendto: {}", std::io::Error::last_os_error());
            libc::close(fd);
        }
    });
    // Delivery over lo is synchronous in sendto; a bounded wait all the same.
    let deadline = std::time::Instant::now() + bound(5);
    while read(&ns).totals().delta(&before.totals()).invalid < INVALID_PER_SEGMENT {
        assert!(
            std::time::Instant::now() < deadline,
            "fewer than {INVALID_PER_SEGMENT} invalid packets counted"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    let after = read_and_compare_with_tools(&ns);
    let d = after.totals().delta(&before.totals());
    assert_eq!(d.invalid, INVALID_PER_SEGMENT, "delta = {d:?}");
    assert_eq!(
        d.insert, 0,
        "an invalid packet created an entry: delta = {d:?}"
    );
    assert_eq!(after.count, 0);
}

#[test]
fn read_current_on_a_joined_thread_matches_read_in() {
    require_root();
    let ns = ns_with_conntrack("cts-cur");
    udp_flows(&ns, 4);
    let via_thread = in_netns(&ns, || ctstats::read_current().unwrap());
    let via_read_in = read(&ns);
    assert_eq!(via_thread, via_read_in);
    assert_eq!(via_thread.count, 4);
    // /proc/PID/ns/net paths work too: our own namespace.
    let own = ctstats::read_in(Path::new("/proc/self/ns/net")).unwrap();
    assert!(!own.per_cpu.is_empty());
}

#[test]
fn read_in_keeps_the_callers_netns_and_names_the_path_in_errors() {
    require_root();
    let ns = Netns::create("cts-err").unwrap();
    let home = thread_netns();
    read(&ns);
    assert_eq!(thread_netns(), home, "read_in moved the calling thread");

    let missing = ns.path().with_file_name("ctstats-no-such-netns");
    let e = ctstats::read_in(&missing).unwrap_err();
    assert!(matches!(e, CtStatsError::OpenNetns { .. }), "{e:?}");
    assert!(e.to_string().contains(&*missing.to_string_lossy()), "{e}");

    // Not a network namespace: setns(CLONE_NEWNET) refuses it.
    let uts = Path::new("/proc/self/ns/uts");
    let e = ctstats::read_in(uts).unwrap_err();
    assert!(matches!(e, CtStatsError::Setns { .. }), "{e:?}");
    assert!(e.to_string().contains("/proc/self/ns/uts"), "{e}");
    assert_eq!(thread_netns(), home);
}

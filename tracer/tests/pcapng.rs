//! The pcapng export read back by the real tshark (Wireshark 4.0 on Debian 12; `cargo xtask
//! setup` installs it). Fails, not skips, when tshark is missing. Needs no root.

use std::{
    net::SocketAddr,
    path::{Path, PathBuf},
    process::Command,
    sync::Arc,
};

use tracer::{
    events::{DnsEvent, Event, FiveTuple, NfDropEvent, TaskInfo},
    lookups::{Answer, Fate, Lookup, Outcome, Query},
    output::Clock,
    pcapng::{self, PcapStats},
    pods::{Workload, WorkloadKind},
    traffic::{dns_query, dns_response, QTYPE_A, QTYPE_AAAA},
    verdict::{Finding, Verdict},
};

const MS: u64 = 1_000_000;

fn addr(s: &str) -> SocketAddr {
    s.parse().unwrap()
}

fn pod(name: &str) -> Arc<Workload> {
    Arc::new(Workload {
        kind: WorkloadKind::Pod,
        namespace: Some("ctlab".into()),
        pod: Some(name.into()),
        ..Workload::unknown()
    })
}

fn dns(ts: u64, cookie: u64, src: &str, dst: &str, payload: Vec<u8>) -> DnsEvent {
    DnsEvent {
        ts_ns: ts,
        source: "cgroup_skb/egress",
        task: TaskInfo {
            pid: Some(123),
            tid: Some(123),
            comm: Some("lab-resolver".into()),
            cgroup_id: 7,
            netns: 1,
        },
        sock_cookie: cookie,
        tuple: FiveTuple {
            proto: 17,
            src: addr(src),
            dst: addr(dst),
        },
        batch: false,
        batch_len: 0,
        payload_len: payload.len() as u32,
        payload,
    }
}

fn drop_event(ts: u64, packet: FiveTuple, payload: &[u8], payload_len: u32) -> NfDropEvent {
    NfDropEvent {
        ts_ns: ts,
        source: "tp_btf/kfree_skb",
        netns: 2,
        ifindex: 3,
        location: 0,
        reason: 12,
        verdict: 0,
        packet: Some(packet),
        conntrack: None,
        clash_winner: None,
        payload_len,
        payload: payload[..payload.len().min(64)].to_vec(),
    }
}

fn finding(verdict: Verdict, ts: u64, packet: FiveTuple, explanation: &str) -> Finding {
    Finding {
        verdict,
        netns: 2,
        ts_ns: ts,
        count: 1,
        source: "tp_btf/kfree_skb",
        packet: Some(packet),
        conntrack: None,
        nat_clash: None,
        lost_to: None,
        nat_targets_differ: None,
        explanation: explanation.into(),
    }
}

fn query(ts: u64, id: u16, attempt: u32) -> Query {
    Query {
        ts_ns: ts,
        qname: "example.com".into(),
        qtype: "A".into(),
        qtype_code: QTYPE_A,
        id,
        src: addr("10.0.0.2:40000"),
        server: addr("10.96.0.10:53"),
        sock_cookie: 9,
        attempt,
        batch: false,
        fate: None,
        answer: None,
        unanswered: false,
    }
}

/// A SNAT race as the lab runs it: client-0's first query is dropped by a SNAT port clash
/// (the drop is seen after SNAT, from the node's address), its retry is answered; an IPv6
/// AAAA query and answer of another pod; an answer longer than the capture; a TCP segment
/// dropped by a rule.
fn run_pcap(path: &Path) -> PcapStats {
    let q1 = dns_query(0x1111, "example.com", QTYPE_A).unwrap();
    let q2 = dns_query(0x2222, "example.com", QTYPE_A).unwrap();
    let a2 = dns_response(&q2, 0, true);
    let q6 = dns_query(0x6666, "example.com", QTYPE_AAAA).unwrap();
    let a6 = dns_response(&q6, 0, true);
    let big_q = dns_query(0x7777, "big.example", QTYPE_A).unwrap();
    let mut big = dns_response(&big_q, 0, true);
    // Room for records the capture did not keep: the additional count says 20 more.
    big[11] = 20;
    big.resize(700, 0);

    let snat = FiveTuple {
        proto: 17,
        src: addr("192.168.0.1:40000"),
        dst: addr("10.96.0.10:53"),
    };
    let tcp = FiveTuple {
        proto: 6,
        src: addr("[fd00::2]:41000"),
        dst: addr("[fd00::80]:80"),
    };

    let mut first = query(1000 * MS, 0x1111, 1);
    first.fate = Some(Fate {
        ts_ns: 1000 * MS + 50_000,
        verdict: Verdict::SnatPortClash,
        netns: 2,
        lost: true,
        attribution: "packet",
        reply: false,
        nat_to: None,
        nat_from: Some(snat.src),
        explanation: "client-1 took SNAT port 40000 first".into(),
    });
    first.unanswered = true;
    let mut retry = query(6000 * MS, 0x2222, 2);
    retry.answer = Some(Answer {
        ts_ns: 6002 * MS,
        rcode: "NOERROR".into(),
        answers: vec!["10.77.0.99".into()],
        truncated: false,
    });
    let lookup = Lookup {
        id: 1,
        workload: pod("client-0"),
        netns: 1,
        cgroup_id: 7,
        pid: Some(123),
        comm: Some("lab-resolver".into()),
        name: "example.com".into(),
        server: addr("10.96.0.10:53"),
        start_ns: 1000 * MS,
        end_ns: 6002 * MS,
        latency_ns: 5002 * MS,
        outcome: Outcome::Answered,
        siblings: None,
        retries: 1,
        queries: vec![first, retry],
        cause: "the first try was lost to a SNAT port clash".into(),
        problem: true,
        lost_records: 0,
    };

    let c0 = Some(pod("client-0"));
    let c1 = Some(pod("client-1"));
    let events = vec![
        (
            Event::NfDrop(drop_event(1000 * MS + 50_000, snat, &q1, q1.len() as u32)),
            None,
        ),
        (
            Event::DnsSend(dns(1000 * MS, 9, "10.0.0.2:40000", "10.96.0.10:53", q1)),
            c0.clone(),
        ),
        (
            Event::DnsSend(dns(6000 * MS, 9, "10.0.0.2:40000", "10.96.0.10:53", q2)),
            c0.clone(),
        ),
        (
            Event::DnsRecv(dns(6002 * MS, 9, "10.96.0.10:53", "10.0.0.2:40000", a2)),
            c0.clone(),
        ),
        (
            Event::DnsSend(dns(7000 * MS, 11, "[fd00::3]:40001", "[fd00::53]:53", q6)),
            c1.clone(),
        ),
        (
            Event::DnsRecv(dns(7001 * MS, 11, "[fd00::53]:53", "[fd00::3]:40001", a6)),
            c1.clone(),
        ),
        (
            Event::DnsRecv({
                let mut e = dns(8000 * MS, 12, "10.96.0.10:53", "10.0.0.2:40003", big);
                e.payload.truncate(512);
                e
            }),
            c0.clone(),
        ),
        (
            Event::NfDrop(drop_event(8500 * MS, tcp, b"GET / HTTP/1.1\r\n", 300)),
            None,
        ),
    ];
    let findings = vec![
        (
            finding(
                Verdict::SnatPortClash,
                1000 * MS + 50_000,
                snat,
                "two flows got the same translated source port",
            ),
            c0,
        ),
        (
            finding(
                Verdict::RulesetDrop,
                8500 * MS,
                tcp,
                "dropped by an nftables rule",
            ),
            None,
        ),
    ];
    let file = std::fs::File::create(path).unwrap();
    // Monotonic 0 = 2023-11-14T22:13:20Z.
    let clock = Clock::fixed(1_700_000_000_000_000_000);
    pcapng::write(file, &events, &findings, &[lookup], &clock).unwrap()
}

struct TempFile(PathBuf);

impl Drop for TempFile {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

fn tshark(file: &Path, args: &[&str]) -> String {
    let out = Command::new("tshark")
        .arg("-r")
        .arg(file)
        .args(args)
        .output()
        .expect("tshark is needed for this test: `cargo xtask setup` installs it");
    assert!(
        out.status.success(),
        "tshark {args:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).expect("tshark output is UTF-8")
}

#[test]
fn tshark_reads_ids_comments_and_no_malformed_packet() {
    let file = TempFile(
        std::env::temp_dir().join(format!("tracer-pcapng-test-{}.pcapng", std::process::id())),
    );
    let stats = run_pcap(&file.0);
    assert_eq!(
        stats,
        PcapStats {
            packets: 8,
            dns: 6,
            drops: 2,
            commented: 8
        }
    );

    // Wireshark 4.0 names a packet comment `frame.comment` (`pkt_comment` is the protocol,
    // which has no value to print).
    let fields = tshark(
        &file.0,
        &[
            "-T",
            "fields",
            "-E",
            "separator=/t",
            "-e",
            "dns.id",
            "-e",
            "frame.len",
            "-e",
            "frame.cap_len",
            "-e",
            "frame.packet_flags_direction",
            "-e",
            "frame.comment",
        ],
    );
    let rows: Vec<Vec<&str>> = fields
        .lines()
        .map(|l| l.split('\t').collect::<Vec<_>>())
        .collect();
    assert_eq!(rows.len(), 8, "{fields}");
    let col = |i: usize| rows.iter().map(|r| r[i]).collect::<Vec<_>>();
    assert_eq!(
        col(0),
        ["0x1111", "0x1111", "0x2222", "0x2222", "0x6666", "0x6666", "0x7777", ""],
        "{fields}"
    );
    // The truncated answer and the TCP drop: captured < original.
    assert_eq!((rows[6][1], rows[6][2]), ("728", "540"), "{fields}");
    assert_eq!((rows[7][1], rows[7][2]), ("360", "76"), "{fields}");
    assert_eq!(
        col(3),
        [
            "0x00000002",
            "",
            "0x00000002",
            "0x00000001",
            "0x00000002",
            "0x00000001",
            "0x00000001",
            ""
        ],
        "{fields}"
    );
    let comments = col(4);
    assert_eq!(
        comments[0],
        "ctlab/client-0 (pid 123 lab-resolver) query A example.com attempt 1: snat-port-clash, \
         lost — client-1 took SNAT port 40000 first; lookup answered after 5.00 s: the first \
         try was lost to a SNAT port clash"
    );
    assert_eq!(
        comments[1],
        "DROPPED: snat-port-clash — two flows got the same translated source port (workload \
         ctlab/client-0)"
    );
    assert!(
        comments[3].starts_with(
            "ctlab/client-0 (pid 123 lab-resolver) answer A example.com NOERROR attempt 2; \
             lookup answered after 5.00 s"
        ),
        "{}",
        comments[3]
    );
    assert_eq!(
        comments[4],
        "ctlab/client-1 (pid 123 lab-resolver) query AAAA example.com"
    );
    assert!(comments[6].contains("(captured 512 of 700 bytes)"));
    assert_eq!(
        comments[7],
        "DROPPED: ruleset-drop — dropped by an nftables rule"
    );

    // Display filters on the comments find the verdicts.
    let lost = tshark(
        &file.0,
        &[
            "-Y",
            "frame.comment contains \"snat-port-clash\"",
            "-T",
            "fields",
            "-e",
            "frame.number",
        ],
    );
    assert_eq!(lost.lines().collect::<Vec<_>>(), ["1", "2"]);

    // Every packet dissects: no malformed packet, no error-level expert info (checksums of
    // the synthesized headers are checked too).
    let verbose = tshark(
        &file.0,
        &[
            "-V",
            "-o",
            "ip.check_checksum:TRUE",
            "-o",
            "udp.check_checksum:TRUE",
        ],
    );
    assert!(!verbose.contains("Malformed"), "{verbose}");
    assert!(
        !verbose.to_lowercase().contains("status: bad]"),
        "a bad checksum: {verbose}"
    );
    assert_eq!(
        verbose.matches("[Header checksum status: Good]").count(),
        5,
        "the five IPv4 packets' header checksums verify"
    );
    let expert = tshark(&file.0, &["-q", "-z", "expert,error"]);
    assert!(!expert.contains("Malformed"), "{expert}");
    assert!(!expert.contains("Errors ("), "{expert}");
}

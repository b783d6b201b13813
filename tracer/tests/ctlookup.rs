//! Privileged tests of `tracer::ctstats::lookup_in` / `lookup_current`: single conntrack
//! entries looked up by tuple over ctnetlink, in namespaces made here, filled with
//! `conntrack -I` and checked against `conntrack -L -o extended,id` (conntrack-tools).
//! Run as root; they fail (never skip) otherwise.

use std::{
    net::{IpAddr, SocketAddr},
    path::Path,
};

use tracer::{
    ctstats::{self, CtEntry, CtStatsError, TupleDir},
    events::FiveTuple,
    netns::{self, Netns},
};

const IPS_SEEN_REPLY: u32 = 1 << 1;
const IPS_ASSURED: u32 = 1 << 2;
const IPS_CONFIRMED: u32 = 1 << 3;

fn require_root() {
    assert!(
        netns::is_root(),
        "the ctlookup tests build network namespaces and talk ctnetlink: run them as root"
    );
}

fn new_ns(prefix: &str) -> Netns {
    Netns::create(prefix).expect("creating netns (needs root and iproute2)")
}

fn tuple(proto: u8, src: &str, dst: &str) -> FiveTuple {
    FiveTuple {
        proto,
        src: src.parse().unwrap(),
        dst: dst.parse().unwrap(),
    }
}

/// `conntrack -I <args>` in `ns` (`args` split at whitespace).
fn insert(ns: &Netns, args: &str) {
    let mut cmd = vec!["conntrack", "-I"];
    cmd.extend(args.split_whitespace());
    ns.run(&cmd)
        .unwrap_or_else(|e| panic!("`{}` in {}: {e:#}", cmd.join(" "), ns.name()));
}

fn lookup(ns: &Netns, dir: TupleDir, t: &FiveTuple) -> Option<CtEntry> {
    ctstats::lookup_in(&ns.path(), dir, t)
        .unwrap_or_else(|e| panic!("lookup_in({}, {dir:?}, {t:?}): {e}", ns.name()))
}

/// One line of `conntrack -L -o extended,id`.
#[derive(Debug, Clone, PartialEq, Eq)]
struct ToolEntry {
    orig: FiveTuple,
    reply: FiveTuple,
    timeout: u32,
    unreplied: bool,
    assured: bool,
    mark: Option<u32>,
    zone: Option<u16>,
    id: u32,
}

/// Parses e.g. `ipv4 2 udp 17 29 src=.. dst=.. sport=.. dport=.. [UNREPLIED] src=.. dst=..
/// sport=.. dport=.. [ASSURED] mark=0 zone=5 use=1 id=123`; ICMP tuples print
/// `type= code= id=` instead of ports (mapped like the library does: id in the source port,
/// `type << 8 | code` in the destination port).
fn parse_tool_line(line: &str) -> ToolEntry {
    let bad = |why: &str| -> ! { panic!("unexpected `conntrack -L` line ({why}): {line:?}") };
    let toks: Vec<&str> = line.split_whitespace().collect();
    if toks.len() < 6 {
        bad("too short");
    }
    let proto: u8 = toks[3].parse().unwrap_or_else(|_| bad("protocol number"));
    let timeout: u32 = toks[4].parse().unwrap_or_else(|_| bad("timeout"));

    #[derive(Default)]
    struct Half {
        src: Option<IpAddr>,
        dst: Option<IpAddr>,
        sport: Option<u16>,
        dport: Option<u16>,
        ty: Option<u8>,
        code: Option<u8>,
        id: Option<u16>,
    }
    let mut halves: Vec<Half> = Vec::new();
    let mut in_meta = false;
    let (mut unreplied, mut assured) = (false, false);
    let (mut mark, mut zone, mut id) = (None, None, None);
    for tok in &toks[5..] {
        match *tok {
            "[UNREPLIED]" => unreplied = true,
            "[ASSURED]" => assured = true,
            _ => {}
        }
        let Some((k, v)) = tok.split_once('=') else {
            continue; // state name or flag
        };
        if k == "src" {
            halves.push(Half::default());
        }
        if matches!(k, "mark" | "zone" | "use" | "secctx" | "labels") {
            in_meta = true;
        }
        if in_meta {
            match k {
                "mark" => mark = Some(v.parse().unwrap_or_else(|_| bad("mark"))),
                "zone" => zone = Some(v.parse().unwrap_or_else(|_| bad("zone"))),
                "id" => id = Some(v.parse().unwrap_or_else(|_| bad("id"))),
                _ => {}
            }
            continue;
        }
        let Some(h) = halves.last_mut() else {
            bad("key before the first src=")
        };
        match k {
            "src" => h.src = Some(v.parse().unwrap_or_else(|_| bad("src"))),
            "dst" => h.dst = Some(v.parse().unwrap_or_else(|_| bad("dst"))),
            "sport" => h.sport = Some(v.parse().unwrap_or_else(|_| bad("sport"))),
            "dport" => h.dport = Some(v.parse().unwrap_or_else(|_| bad("dport"))),
            "type" => h.ty = Some(v.parse().unwrap_or_else(|_| bad("type"))),
            "code" => h.code = Some(v.parse().unwrap_or_else(|_| bad("code"))),
            "id" => h.id = Some(v.parse().unwrap_or_else(|_| bad("icmp id"))),
            _ => {}
        }
    }
    let five = |h: &Half| -> FiveTuple {
        let (sport, dport) = match (h.sport, h.dport, h.ty) {
            (Some(s), Some(d), _) => (s, d),
            (None, None, Some(ty)) => (
                h.id.unwrap_or_else(|| bad("icmp id")),
                u16::from_be_bytes([ty, h.code.unwrap_or_else(|| bad("icmp code"))]),
            ),
            _ => bad("ports"),
        };
        FiveTuple {
            proto,
            src: SocketAddr::new(h.src.unwrap_or_else(|| bad("src")), sport),
            dst: SocketAddr::new(h.dst.unwrap_or_else(|| bad("dst")), dport),
        }
    };
    let [orig, reply] = &halves[..] else {
        bad("not two tuples")
    };
    ToolEntry {
        orig: five(orig),
        reply: five(reply),
        timeout,
        unreplied,
        assured,
        mark,
        zone,
        id: id.unwrap_or_else(|| bad("no conntrack id")),
    }
}

/// Every entry in `ns`, as `conntrack -L -o extended,id` prints them.
fn tool_entries(ns: &Netns) -> Vec<ToolEntry> {
    let out = ns
        .run_stdout(["conntrack", "-L", "-o", "extended,id"])
        .expect("conntrack -L");
    out.lines()
        .filter(|l| !l.trim().is_empty())
        .map(parse_tool_line)
        .collect()
}

/// The tool's view of the entry with original tuple `orig`.
fn tool_entry(ns: &Netns, orig: &FiveTuple) -> ToolEntry {
    let all = tool_entries(ns);
    let mut hits = all.iter().filter(|e| e.orig == *orig);
    let hit = hits
        .next()
        .unwrap_or_else(|| panic!("`conntrack -L` has no entry {orig:?}: {all:#?}"));
    assert!(hits.next().is_none(), "two entries {orig:?}: {all:#?}");
    hit.clone()
}

/// Checks `e` against conntrack-tools' view of the same entry and against what was
/// inserted (`orig`, `reply`, status bits `want_bits`, `mark`).
fn check_entry(
    ns: &Netns,
    e: &CtEntry,
    orig: &FiveTuple,
    reply: &FiveTuple,
    want_bits: u32,
    mark: u32,
) {
    assert_eq!(e.orig, *orig, "{e:#?}");
    assert_eq!(e.reply, *reply, "{e:#?}");
    assert_eq!(
        e.status & want_bits,
        want_bits,
        "status {:#x} lacks bits {want_bits:#x}",
        e.status
    );
    assert_eq!(e.mark, Some(mark));
    assert_eq!(e.zone, None, "zone 0 is not sent");

    let tool = tool_entry(ns, orig);
    assert_eq!(tool.orig, e.orig);
    assert_eq!(tool.reply, e.reply);
    assert_eq!(Some(tool.id), e.id, "conntrack id");
    assert_eq!(tool.mark, e.mark);
    assert_eq!(tool.zone, e.zone);
    assert_eq!(tool.unreplied, e.status & IPS_SEEN_REPLY == 0, "{e:#?}");
    assert_eq!(tool.assured, e.status & IPS_ASSURED != 0, "{e:#?}");
    let timeout = e.timeout.expect("CTA_TIMEOUT");
    assert!(
        timeout.abs_diff(tool.timeout) <= 2,
        "timeout {timeout} vs the tool's {}",
        tool.timeout
    );
}

/// Runs `f` on a thread that joined `ns` (the test thread stays where it is).
fn in_netns<T: Send>(ns: &Netns, f: impl FnOnce() -> T + Send) -> T {
    tracer::traffic::in_netns(&ns.path(), f).expect("entering the test netns")
}

#[test]
fn ipv4_dnat_shaped_udp_by_orig_and_by_reply() {
    require_root();
    let ns = new_ns("ctlookup");
    // A DNATed DNS flow: 10.1.0.2:1000 -> 10.2.0.1:53, answered by 10.2.0.9.
    insert(
        &ns,
        concat!(
            "-p udp -s 10.1.0.2 -d 10.2.0.1 --sport 1000 --dport 53",
            " -r 10.2.0.9 -q 10.1.0.2 --reply-port-src 53 --reply-port-dst 1000",
            " -t 30 -u SEEN_REPLY",
        ),
    );
    let orig = tuple(17, "10.1.0.2:1000", "10.2.0.1:53");
    let reply = tuple(17, "10.2.0.9:53", "10.1.0.2:1000");

    let by_orig = lookup(&ns, TupleDir::Orig, &orig).expect("entry by its original tuple");
    check_entry(
        &ns,
        &by_orig,
        &orig,
        &reply,
        IPS_SEEN_REPLY | IPS_CONFIRMED,
        0,
    );
    assert_eq!(by_orig.status & IPS_ASSURED, 0, "{by_orig:#?}");
    assert!((25..=30).contains(&by_orig.timeout.unwrap()));

    let by_reply = lookup(&ns, TupleDir::Reply, &reply).expect("entry by its reply tuple");
    assert_eq!(by_reply.id, by_orig.id);
    assert_eq!((by_reply.orig, by_reply.reply), (orig, reply));
    assert_eq!(by_reply.status, by_orig.status);

    // The kernel matches a tuple against both directions of every entry, whichever
    // attribute carries it.
    let swapped = lookup(&ns, TupleDir::Orig, &reply).expect("reply tuple sent as orig");
    assert_eq!(swapped.id, by_orig.id);
    let swapped = lookup(&ns, TupleDir::Reply, &orig).expect("orig tuple sent as reply");
    assert_eq!(swapped.id, by_orig.id);

    // The inverted original tuple is no direction of this NAT-shaped entry.
    let inverted = tuple(17, "10.2.0.1:53", "10.1.0.2:1000");
    assert_eq!(lookup(&ns, TupleDir::Reply, &inverted), None);

    // lookup_current from a thread that is already in the namespace agrees.
    let here = in_netns(&ns, || {
        ctstats::lookup_current(TupleDir::Orig, &orig).unwrap()
    });
    assert_eq!(here.map(|e| e.id), Some(by_orig.id));
}

#[test]
fn ipv6_snat_shaped_tcp_with_mark() {
    require_root();
    let ns = new_ns("ctlookup");
    // SNAT: fd00:1::2:40000 -> fd00:2::53:80 leaves as fd00:9::1:61000.
    insert(
        &ns,
        concat!(
            "-p tcp -s fd00:1::2 -d fd00:2::53 --sport 40000 --dport 80",
            " -r fd00:2::53 -q fd00:9::1 --reply-port-src 80 --reply-port-dst 61000",
            " -t 120 --state ESTABLISHED -u SEEN_REPLY,ASSURED -m 42",
        ),
    );
    let orig = tuple(6, "[fd00:1::2]:40000", "[fd00:2::53]:80");
    let reply = tuple(6, "[fd00:2::53]:80", "[fd00:9::1]:61000");
    let e = lookup(&ns, TupleDir::Orig, &orig).expect("entry by its original tuple");
    check_entry(
        &ns,
        &e,
        &orig,
        &reply,
        IPS_SEEN_REPLY | IPS_ASSURED | IPS_CONFIRMED,
        42,
    );
    assert!((110..=120).contains(&e.timeout.unwrap()), "{e:#?}");
    let by_reply = lookup(&ns, TupleDir::Reply, &reply).expect("entry by its reply tuple");
    assert_eq!(
        by_reply,
        CtEntry {
            timeout: by_reply.timeout,
            ..e.clone()
        }
    );

    // Another source port: nothing.
    let other = tuple(6, "[fd00:1::2]:40001", "[fd00:2::53]:80");
    assert_eq!(lookup(&ns, TupleDir::Orig, &other), None);
    // Same addresses and ports, other protocol: nothing.
    let udp = tuple(17, "[fd00:1::2]:40000", "[fd00:2::53]:80");
    assert_eq!(lookup(&ns, TupleDir::Orig, &udp), None);
}

#[test]
fn icmp_and_icmpv6_ids_in_the_ports() {
    require_root();
    let ns = new_ns("ctlookup");
    insert(
        &ns,
        "-p icmp -s 10.0.0.1 -d 10.0.0.2 --icmp-type 8 --icmp-code 0 --icmp-id 77 -t 30",
    );
    insert(
        &ns,
        "-p icmpv6 -s fd00::1 -d fd00::2 --icmpv6-type 128 --icmpv6-code 0 --icmpv6-id 79 -t 30",
    );
    // Echo request type 8 / code 0 -> dst port 0x0800; the reply is an echo reply (0).
    let orig = tuple(1, "10.0.0.1:77", "10.0.0.2:2048");
    let reply = tuple(1, "10.0.0.2:77", "10.0.0.1:0");
    let e = lookup(&ns, TupleDir::Orig, &orig).expect("ICMP entry");
    check_entry(&ns, &e, &orig, &reply, IPS_CONFIRMED, 0);
    assert_eq!(e.status & IPS_SEEN_REPLY, 0);

    // ICMPv6 echo request 128 -> 0x8000, echo reply 129 -> 0x8100.
    let orig6 = tuple(58, "[fd00::1]:79", "[fd00::2]:32768");
    let reply6 = tuple(58, "[fd00::2]:79", "[fd00::1]:33024");
    let e6 = lookup(&ns, TupleDir::Reply, &reply6).expect("ICMPv6 entry");
    check_entry(&ns, &e6, &orig6, &reply6, IPS_CONFIRMED, 0);
    assert_eq!(
        lookup(
            &ns,
            TupleDir::Orig,
            &tuple(58, "[fd00::1]:80", "[fd00::2]:32768")
        ),
        None
    );
}

#[test]
fn missing_tuples_are_none() {
    require_root();
    let ns = new_ns("ctlookup");
    // An empty table.
    let t4 = tuple(17, "10.1.0.2:1000", "10.2.0.1:53");
    let t6 = tuple(17, "[fd00::1]:1000", "[fd00::2]:53");
    assert_eq!(lookup(&ns, TupleDir::Orig, &t4), None);
    assert_eq!(lookup(&ns, TupleDir::Reply, &t6), None);

    // An entry in zone 5 is not found by a lookup, which is in zone 0.
    insert(
        &ns,
        "-p udp -s 10.1.0.2 -d 10.2.0.1 --sport 1000 --dport 53 -t 30 --zone 5",
    );
    assert_eq!(tool_entry(&ns, &t4).zone, Some(5));
    assert_eq!(lookup(&ns, TupleDir::Orig, &t4), None);

    // A near miss next to an existing entry.
    insert(
        &ns,
        "-p udp -s 10.1.0.2 -d 10.2.0.1 --sport 1001 --dport 53 -t 30",
    );
    assert!(lookup(
        &ns,
        TupleDir::Orig,
        &tuple(17, "10.1.0.2:1001", "10.2.0.1:53")
    )
    .is_some());
    assert_eq!(
        lookup(
            &ns,
            TupleDir::Orig,
            &tuple(17, "10.1.0.2:1001", "10.2.0.1:54")
        ),
        None
    );
    assert_eq!(
        lookup(
            &ns,
            TupleDir::Orig,
            &tuple(17, "10.1.0.3:1001", "10.2.0.1:53")
        ),
        None
    );
}

#[test]
fn entries_stay_in_their_namespace() {
    require_root();
    let a = new_ns("ctlookup");
    let b = new_ns("ctlookup");
    insert(
        &a,
        "-p udp -s 10.1.0.2 -d 10.2.0.1 --sport 1000 --dport 53 -t 30 -u SEEN_REPLY",
    );
    let t = tuple(17, "10.1.0.2:1000", "10.2.0.1:53");
    let in_a = lookup(&a, TupleDir::Orig, &t).expect("entry in netns A");
    assert_eq!(in_a.reply, tuple(17, "10.2.0.1:53", "10.1.0.2:1000"));
    assert_eq!(
        lookup(&b, TupleDir::Orig, &t),
        None,
        "netns B sees A's entry"
    );
    assert!(tool_entries(&b).is_empty());
    // The same tuple inserted in B is B's own entry.
    insert(
        &b,
        "-p udp -s 10.1.0.2 -d 10.2.0.1 --sport 1000 --dport 53 -t 30",
    );
    let in_b = lookup(&b, TupleDir::Orig, &t).expect("entry in netns B");
    assert_ne!(in_b.id, in_a.id);
    assert_eq!(in_b.status & IPS_SEEN_REPLY, 0);
    assert_eq!(lookup(&a, TupleDir::Orig, &t).map(|e| e.id), Some(in_a.id));
}

#[test]
fn errors_name_the_namespace_and_the_problem() {
    require_root();
    let t = tuple(17, "10.1.0.2:1000", "10.2.0.1:53");
    let missing = Path::new("/run/netns/ctlookup-does-not-exist");
    let e = ctstats::lookup_in(missing, TupleDir::Orig, &t).unwrap_err();
    assert!(matches!(e, CtStatsError::OpenNetns { .. }), "{e:?}");
    assert!(e.to_string().contains("ctlookup-does-not-exist"), "{e}");

    let ns = new_ns("ctlookup");
    let mixed = tuple(17, "10.1.0.2:1000", "[fd00::2]:53");
    let e = ctstats::lookup_in(&ns.path(), TupleDir::Orig, &mixed).unwrap_err();
    match &e {
        CtStatsError::InNetns { path, inner } => {
            assert_eq!(path, &ns.path());
            assert!(matches!(**inner, CtStatsError::BadTuple(_)), "{e:?}");
        }
        other => panic!("{other:?}"),
    }
}

//! Privileged test of `tracer::traffic::invalid_segment` (kubernetes/kubernetes#74839): a
//! forged out-of-window segment from a DNATed backend through the lab's node, without and
//! with the two mitigations, checked against the node's own conntrack counters
//! (`ctstats::read_in`). Run as root; it fails (never skips) otherwise.

mod common;

use std::sync::Mutex;
use std::time::Duration;

use tracer::ctstats::{self, CpuStats};
use tracer::lab::topology::{Cluster, PREFIX};
use tracer::netns;
use tracer::traffic::{self, InvalidReport};

const ROUNDS: u32 = 10;
/// How long a round waits for the server's reset (and for each set-up step): 300 ms,
/// scaled for an emulated guest.
fn timeout() -> Duration {
    common::bound_ms(300)
}

/// One lab at a time: the cases share nothing, but they compete for the two CPUs.
static SERIAL: Mutex<()> = Mutex::new(());

fn require_root() {
    assert!(
        netns::is_root(),
        "the INVALID test builds network namespaces, nft rules and raw sockets: run it as root"
    );
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Mitigation {
    None,
    BeLiberal,
    DropInvalid,
}

/// Builds a cluster (1 pod, the server), the DNAT, the mitigation, runs the rounds, and
/// returns the report with the node's counter deltas. Every namespace is gone afterwards.
fn run(m: Mitigation) -> (InvalidReport, CpuStats) {
    require_root();
    let _s = SERIAL.lock().unwrap_or_else(|p| p.into_inner());
    let own = format!("-{}-", std::process::id());
    let out = {
        let cluster = Cluster::build(1, 0, true).expect("building the lab cluster");
        let (vip, backend) = traffic::setup_invalid_dnat(&cluster).expect("setup_invalid_dnat");
        match m {
            Mitigation::None => {}
            Mitigation::BeLiberal => {
                traffic::set_tcp_be_liberal(&cluster.node, true).expect("be_liberal=1");
                assert_eq!(
                    cluster.node.sysctl_get(traffic::TCP_BE_LIBERAL).unwrap(),
                    "1"
                );
            }
            Mitigation::DropInvalid => traffic::drop_invalid(&cluster.node).expect("nft drop"),
        }
        let node = cluster.node.path();
        let before = ctstats::read_in(&node).expect("node counters").totals();
        let report = traffic::invalid_segment(
            &cluster.pods[0].path(),
            &cluster.server.as_ref().expect("server netns").path(),
            vip,
            backend,
            ROUNDS,
            timeout(),
        )
        .expect("invalid_segment");
        let after = ctstats::read_in(&node).expect("node counters").totals();
        let delta = after.delta(&before);
        eprintln!(
            "{m:?}: rounds={} server_resets={} client_alive={} rst_from_pod={} \
             forged untranslated/translated/unseen={}/{}/{} errors={} elapsed={}ms; \
             node delta invalid={} drop={} insert={} found={}",
            report.rounds,
            report.server_resets,
            report.client_alive,
            report.rst_from_pod,
            report.forged_untranslated,
            report.forged_translated,
            report.forged_unseen,
            report.errors,
            report.elapsed_ms,
            delta.invalid,
            delta.drop,
            delta.insert,
            delta.found,
        );
        if m == Mitigation::DropInvalid {
            let rules = cluster
                .node
                .run_stdout(["nft", "list", "table", "inet", traffic::INVALID_DROP_TABLE])
                .unwrap_or_default();
            eprintln!("{rules}");
        }
        (report, delta)
    };
    let left: Vec<String> = netns::leftovers(PREFIX)
        .into_iter()
        .filter(|n| n.contains(&own))
        .collect();
    assert!(left.is_empty(), "namespaces left behind: {left:?}");
    out
}

fn check_common(r: &InvalidReport) {
    let errors: Vec<_> = r
        .per_round
        .iter()
        .filter_map(|x| x.error.as_ref())
        .collect();
    assert_eq!(r.errors, 0, "rounds that could not be set up: {errors:?}");
    assert_eq!(r.rounds, u64::from(ROUNDS));
}

#[test]
fn invalid_segment_resets_the_server_without_mitigation() {
    let (r, delta) = run(Mitigation::None);
    check_common(&r);
    let n = u64::from(ROUNDS);
    assert_eq!(
        r.forged_untranslated, n,
        "the forged segment must reach the pod un-NATed: {r:#?}"
    );
    assert_eq!(r.rst_from_pod, n, "the pod must answer with RST: {r:#?}");
    assert_eq!(r.server_resets, n, "the server must be reset: {r:#?}");
    assert_eq!(
        r.client_alive, 0,
        "the pod's connection must be dead: {r:#?}"
    );
    // Per round: the forged segment (out of window) and the pod's RST to the backend's
    // real address (matches no entry; an RST can not create one) are both INVALID.
    assert!(
        u64::from(delta.invalid) >= n,
        "node invalid delta {} < rounds {n}",
        delta.invalid
    );
    assert_eq!(
        u64::from(delta.invalid),
        2 * n,
        "expected exactly 2 invalid per round (forged segment + the pod's RST)"
    );
}

#[test]
fn be_liberal_keeps_the_connection() {
    let (r, delta) = run(Mitigation::BeLiberal);
    check_common(&r);
    let n = u64::from(ROUNDS);
    assert_eq!(
        r.forged_translated, n,
        "the forged segment must reach the pod reverse-NATed: {r:#?}"
    );
    assert_eq!(r.server_resets, 0, "{r:#?}");
    assert_eq!(r.rst_from_pod, 0, "{r:#?}");
    assert_eq!(r.client_alive, n, "{r:#?}");
    assert_eq!(delta.invalid, 0, "be_liberal: nothing is INVALID");
}

#[test]
fn ct_state_invalid_drop_keeps_the_connection() {
    let (r, delta) = run(Mitigation::DropInvalid);
    check_common(&r);
    let n = u64::from(ROUNDS);
    assert_eq!(
        r.forged_unseen, n,
        "the forged segment must be dropped: {r:#?}"
    );
    assert_eq!(r.server_resets, 0, "{r:#?}");
    assert_eq!(r.rst_from_pod, 0, "{r:#?}");
    assert_eq!(r.client_alive, n, "{r:#?}");
    assert!(
        u64::from(delta.invalid) >= n,
        "node invalid delta {} < rounds {n}",
        delta.invalid
    );
    assert_eq!(
        u64::from(delta.invalid),
        n,
        "expected exactly 1 invalid per round (the forged segment, then dropped)"
    );
}

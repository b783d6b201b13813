//! MASQUERADE without `--random-fully` / `fully-random`.
//!
//! Without it, the source port of a masqueraded flow is chosen by a search that starts at
//! the original port and checks only *confirmed* entries: two flows from different pods
//! leaving at the same moment can be given the same port, and the second to be confirmed
//! is dropped (`insert_failed`) on every kernel, since its reply tuple clashes with a
//! different connection. `--random-fully` (NF_NAT_RANGE_PROTO_RANDOM_FULLY) picks the port
//! at random, which makes that collision rare.

use std::collections::BTreeSet;

use serde::Serialize;

use super::{
    ids,
    rules::{self, IptRule, NftRule},
    Finding, NetSnapshot, Severity,
};

/// One MASQUERADE rule found in a dump.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct MasqRule {
    /// Where: `iptables-nft-save nat/POSTROUTING`, `nft ip lab/post handle 3`.
    pub location: String,
    /// The rule as dumped (iptables) or rendered (nft).
    pub rule: String,
    pub fully_random: bool,
    /// `false` when the dump can not show the flags (an `xt` target in the nft JSON).
    pub flags_known: bool,
}

/// MASQUERADE rules of `iptables-save` dumps.
pub fn from_iptables(rules: &[IptRule]) -> Vec<MasqRule> {
    rules
        .iter()
        .filter(|r| r.target() == Some("MASQUERADE"))
        .map(|r| MasqRule {
            location: r.location(),
            rule: r.line.clone(),
            fully_random: r.has_flag("--random-fully"),
            flags_known: true,
        })
        .collect()
}

/// `masquerade` statements of nft rules, skipping the chains in `skip` (read from an
/// `iptables-save` dump instead, see [`rules::xtables_chains`]). An `xt` MASQUERADE outside `skip` is reported with
/// `flags_known: false`.
pub fn from_nft(rules: &[NftRule], skip: &BTreeSet<(String, String, String)>) -> Vec<MasqRule> {
    rules
        .iter()
        .filter(|r| !skip.contains(&rules::chain_key(r)))
        .filter_map(|r| {
            if let Some(stmt) = r.stmt("masquerade") {
                let flags = rules::flags_of(stmt);
                Some(MasqRule {
                    location: r.location(),
                    rule: r.describe(),
                    fully_random: flags.iter().any(|f| f == "fully-random"),
                    flags_known: true,
                })
            } else if r.xt_targets().contains(&"MASQUERADE") {
                Some(MasqRule {
                    location: r.location(),
                    rule: r.describe(),
                    fully_random: false,
                    flags_known: false,
                })
            } else {
                None
            }
        })
        .collect()
}

/// Every MASQUERADE rule of a snapshot, plus parse problems.
pub fn collect(snap: &NetSnapshot) -> (Vec<MasqRule>, Vec<String>) {
    let mut out = Vec::new();
    let mut problems = Vec::new();
    for d in &snap.iptables {
        out.extend(from_iptables(&rules::parse_iptables_save(&d.tool, &d.text)));
    }
    if let Some(json) = &snap.nft_json {
        match rules::parse_nft_json(json) {
            Ok(r) => out.extend(from_nft(&r, &rules::xtables_chains(&snap.iptables))),
            Err(e) => problems.push(format!("nft -j list ruleset: unparsable JSON: {e}")),
        }
    }
    (out, problems)
}

/// The MASQUERADE finding of a snapshot.
pub fn check(snap: &NetSnapshot) -> Finding {
    let (masq, problems) = collect(snap);
    let sources: Vec<String> = snap
        .iptables
        .iter()
        .map(|d| d.tool.clone())
        .chain(
            snap.nft_json
                .as_ref()
                .map(|_| "nft -j list ruleset".to_string()),
        )
        .collect();
    let bad: Vec<&MasqRule> = masq.iter().filter(|m| !m.fully_random).collect();
    let mut f = if masq.is_empty() {
        Finding::new(ids::MASQUERADE, Severity::Ok, "No MASQUERADE rules")
    } else if bad.is_empty() {
        Finding::new(
            ids::MASQUERADE,
            Severity::Ok,
            format!(
                "All {} MASQUERADE rule(s) use fully-random port selection",
                masq.len()
            ),
        )
    } else {
        Finding::new(
            ids::MASQUERADE,
            Severity::Warn,
            format!(
                "{} of {} MASQUERADE rule(s) lack --random-fully: flows SNATed at the same \
                 moment can get the same source port, and one is dropped",
                bad.len(),
                masq.len()
            ),
        )
    };
    for m in &bad {
        let note = if m.flags_known {
            ""
        } else {
            " (flags not visible in nft JSON; check with iptables-nft-save)"
        };
        f = f.with(format!("{}: {}{note}", m.location, m.rule));
    }
    for m in masq.iter().filter(|m| m.fully_random) {
        f = f.with(format!("ok: {}: {}", m.location, m.rule));
    }
    f = f.with(if sources.is_empty() {
        "no rule dump was available".to_string()
    } else {
        format!("read: {}", super::join_list(&sources))
    });
    for p in problems {
        f = f.with(p);
    }
    if !bad.is_empty() {
        f = f.fix(
            "add `--random-fully` to the MASQUERADE rules (iptables 1.6.2+), or `fully-random` \
             to nft `masquerade`; kube-proxy and most CNI plugins do this when the iptables \
             binary supports it, so check the version they run with",
        );
    }
    f
}

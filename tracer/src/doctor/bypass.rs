//! DNS that bypasses conntrack: NOTRACK rules for port 53, NodeLocal DNSCache, Cilium's BPF
//! datapath. Reported as information: each changes which of the races apply.

use serde::Serialize;

use super::{
    ids,
    rules::{self, IptRule, NftRule},
    Finding, NetSnapshot, Node, Severity,
};

/// NodeLocal DNSCache's default link-local listen address.
pub const NODELOCAL_IP: &str = "169.254.20.10";
/// Where Cilium pins its tc programs' maps.
pub const CILIUM_PINS: &str = "sys/fs/bpf/tc/globals";

/// One NOTRACK rule that covers DNS.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct NotrackRule {
    pub location: String,
    pub rule: String,
}

fn iptables_notrack(r: &IptRule) -> bool {
    r.table == "raw"
        && match r.target() {
            Some("NOTRACK") => true,
            Some("CT") => r.has_flag("--notrack"),
            _ => false,
        }
}

/// NOTRACK rules (iptables `-j NOTRACK` / `-j CT --notrack` in raw, nft `notrack`) that
/// match port 53 or the NodeLocal DNSCache address.
pub fn dns_notrack_rules(snap: &NetSnapshot) -> (Vec<NotrackRule>, Vec<String>) {
    let mut out = Vec::new();
    let mut problems = Vec::new();
    for d in &snap.iptables {
        for r in rules::parse_iptables_save(&d.tool, &d.text) {
            if iptables_notrack(&r) && (r.matches_port(53) || r.matches_addr(NODELOCAL_IP)) {
                out.push(NotrackRule {
                    location: r.location(),
                    rule: r.line.clone(),
                });
            }
        }
    }
    if let Some(json) = &snap.nft_json {
        match rules::parse_nft_json(json) {
            Ok(rs) => {
                let skip = rules::xtables_chains(&snap.iptables);
                out.extend(
                    rs.iter()
                        .filter(|r| !skip.contains(&rules::chain_key(r)))
                        .filter(|r| nft_notrack(r))
                        .filter(|r| r.matches_port(53) || r.matches_addr(NODELOCAL_IP))
                        .map(|r| NotrackRule {
                            location: r.location(),
                            rule: r.describe(),
                        }),
                );
            }
            Err(e) => problems.push(format!("nft -j list ruleset: unparsable JSON: {e}")),
        }
    }
    (out, problems)
}

fn nft_notrack(r: &NftRule) -> bool {
    r.stmt("notrack").is_some()
}

/// The bypass findings: `dns-notrack`, `nodelocal-dnscache`, `cilium-bpf` when present,
/// else one `dns-bypass` ok finding.
pub fn check(snap: &NetSnapshot, node: &Node) -> Vec<Finding> {
    let mut out = Vec::new();
    let (notrack, problems) = dns_notrack_rules(snap);
    if !notrack.is_empty() {
        let mut f = Finding::new(
            ids::DNS_NOTRACK,
            Severity::Info,
            format!(
                "{} NOTRACK rule(s) keep DNS out of conntrack",
                notrack.len()
            ),
        );
        for r in &notrack {
            f = f.with(format!("{}: {}", r.location, r.rule));
        }
        f = f.with(
            "untracked packets create no conntrack entry: no clash, no table pressure; but \
             they are not NATed either, so this only works for DNS answered locally (NodeLocal \
             DNSCache) or addressed to the backend directly",
        );
        out.push(f);
    }

    let ifaces = match snap.ip_addr_json.as_deref().map(rules::parse_ip_addr_json) {
        Some(Ok(i)) => i,
        Some(Err(e)) => {
            out.push(
                Finding::new(
                    ids::CHECK_ERROR,
                    Severity::Info,
                    "Unparsable `ip -j addr` output",
                )
                .with(e.to_string()),
            );
            Vec::new()
        }
        None => Vec::new(),
    };
    let local_dns: Vec<String> = ifaces
        .iter()
        .filter(|i| {
            i.addrs
                .iter()
                .any(|a| a.split('/').next() == Some(NODELOCAL_IP))
                || i.name == "nodelocaldns"
        })
        .map(|i| {
            format!(
                "interface {} ({}) has {}",
                i.name,
                i.kind.as_deref().unwrap_or("kind unknown"),
                if i.addrs.is_empty() {
                    "no address".into()
                } else {
                    i.addrs.join(", ")
                }
            )
        })
        .collect();
    if !local_dns.is_empty() {
        let mut f = Finding::new(
            ids::NODELOCAL,
            Severity::Info,
            "NodeLocal DNSCache is present",
        );
        for l in &local_dns {
            f = f.with(l.clone());
        }
        let covered = !notrack.is_empty();
        f = f.with(if covered {
            "with its NOTRACK rules, pod queries to the node-local cache skip conntrack and \
             DNAT; by default (force_tcp) the cache reaches the cluster DNS over TCP, so the UDP \
             clash cannot happen"
        } else {
            "no NOTRACK rule for it was found: pod queries to the cache are still tracked \
             (but not DNATed to several backends, so only the same-backend races remain)"
        });
        out.push(f);
    }

    let cilium_ifaces: Vec<&rules::Iface> = ifaces
        .iter()
        .filter(|i| i.name == "cilium_host" || i.name == "cilium_net")
        .collect();
    let pins: Vec<String> = node
        .list(CILIUM_PINS)
        .into_iter()
        .filter(|n| n.starts_with("cilium_"))
        .collect();
    if !cilium_ifaces.is_empty() || !pins.is_empty() {
        let mut f = Finding::new(ids::CILIUM, Severity::Info, "Cilium BPF datapath detected");
        for i in &cilium_ifaces {
            f = f.with(format!("interface {} ({})", i.name, i.addrs.join(", ")));
        }
        if !pins.is_empty() {
            let shown: Vec<&str> = pins.iter().take(4).map(String::as_str).collect();
            f = f.with(format!(
                "{} pinned maps in {}/ ({}{})",
                pins.len(),
                node.path(CILIUM_PINS).display(),
                shown.join(", "),
                if pins.len() > 4 { ", ..." } else { "" }
            ));
        }
        f = f.with(
            "with kube-proxy replacement, service DNAT happens in BPF (at connect/sendmsg for \
             socket-LB), not in netfilter, and BPF host routing bypasses the host's iptables \
             and conntrack for pod traffic: the netfilter DNAT races do not apply to it; \
             `cilium status` shows `Host Routing: BPF` vs `Legacy`",
        );
        out.push(f);
    }

    if out.is_empty() {
        out.push(
            Finding::new(
                ids::DNS_BYPASS,
                Severity::Ok,
                "DNS goes through conntrack (no NOTRACK rule, NodeLocal DNSCache or Cilium BPF \
                 datapath found)",
            )
            .with("the kernel and MASQUERADE findings above apply to DNS traffic"),
        );
    }
    if !problems.is_empty() {
        let mut f = Finding::new(ids::CHECK_ERROR, Severity::Info, "NOTRACK check incomplete");
        for p in problems {
            f = f.with(p);
        }
        out.push(f);
    }
    out
}

//! The running kernel against the conntrack clash-resolution fixes.
//!
//! Three upstream commits matter for A/AAAA sent in parallel from one UDP socket through a
//! DNAT (kube-proxy's DNS service rule):
//!
//! - **A** `ed07d9a021df` "netfilter: nf_conntrack: resolve clash for matching conntracks"
//!   (mainline 4.19; 4.14.y since 4.14.173): two entries with identical tuples *and*
//!   identical NAT are merged instead of dropping the loser.
//! - **B** `4e35c1cb9460` "netfilter: nf_nat: skip nat clash resolution for same-origin
//!   entries" (mainline 5.0; 4.9.163, 4.14.106, 4.19.29; Ubuntu 4.15.0-56): the second
//!   packet no longer gets a different (port-rewritten) reply tuple, so A can merge them.
//! - **C** `6a757c07e51f` "netfilter: conntrack: allow insertion of clashing entries"
//!   (mainline 5.6; `nf_ct_resolve_clash_harder`, `IPS_NAT_CLASH`): when the two packets
//!   were DNATed to *different* backends, the loser is inserted reply-direction-only with a
//!   short fixed timeout instead of being dropped. Before C, one of A/AAAA is dropped
//!   whenever the service has more than one backend and the two packets pick different ones.
//!
//! Distribution kernels carry backports the version number can not show (RHEL, ...); the
//! finding says so instead of guessing.

use serde::Serialize;

use super::{ids, Finding, Node, Severity};

/// A parsed kernel release.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct KernelVersion {
    /// The raw `osrelease` string.
    pub release: String,
    pub major: u32,
    pub minor: u32,
    pub patch: u32,
    /// Ubuntu's ABI number (`56` in `4.15.0-56-generic`), when the kernel is Ubuntu's.
    pub ubuntu_abi: Option<u32>,
    /// A vendor kernel whose backports the version can not show (`el8`, ...).
    pub vendor: Option<String>,
}

/// Whether one fix is in the kernel.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Fix {
    Present,
    Missing,
    /// The version can not tell (vendor kernel, no known backport data).
    Unknown,
}

/// The three fixes for one kernel.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Assessment {
    /// A: identical tuples and NAT merged (`ed07d9a021df`).
    pub matching: Fix,
    /// B: same origin keeps the same reply tuple (`4e35c1cb9460`).
    pub same_origin: Fix,
    /// C: DNAT to different backends inserted reply-only (`6a757c07e51f`, 5.6).
    pub different_backends: Fix,
    /// Why, one line per fix.
    pub notes: Vec<String>,
}

fn leading_number(s: &str) -> Option<u32> {
    let digits: String = s.chars().take_while(|c| c.is_ascii_digit()).collect();
    digits.parse().ok()
}

/// Parses `osrelease` (`6.1.0-18-amd64`, `4.15.0-56-generic`, `5.4.0`, `4.18.0-513.el8.x86_64`)
/// with `proc/version` (optional) telling Ubuntu kernels apart.
pub fn parse_release(osrelease: &str, proc_version: Option<&str>) -> Option<KernelVersion> {
    let release = osrelease.trim();
    let (numbers, rest) = match release.find(|c: char| !(c.is_ascii_digit() || c == '.')) {
        Some(i) => (&release[..i], &release[i..]),
        None => (release, ""),
    };
    let mut parts = numbers.split('.').filter(|p| !p.is_empty());
    let major = parts.next()?.parse().ok()?;
    let minor = parts.next()?.parse().ok()?;
    let patch = parts.next().and_then(|p| p.parse().ok()).unwrap_or(0);
    let is_ubuntu = proc_version.is_some_and(|v| v.contains("Ubuntu"));
    let ubuntu_abi = if is_ubuntu {
        rest.strip_prefix('-').and_then(leading_number)
    } else {
        None
    };
    // RHEL-family kernels (`4.18.0-513.el8.x86_64`) are opaque: fixes are backported without
    // the version moving. Cloud flavours (`-aws`, `-azure`) follow stable or Ubuntu.
    let vendor = rest.find(".el").and_then(|i| {
        let tag: String = rest[i + 1..]
            .chars()
            .take_while(|c| c.is_ascii_alphanumeric())
            .collect();
        tag[2..]
            .starts_with(|c: char| c.is_ascii_digit())
            .then_some(tag)
    });
    Some(KernelVersion {
        release: release.to_string(),
        major,
        minor,
        patch,
        ubuntu_abi,
        vendor,
    })
}

fn ver(k: &KernelVersion) -> (u32, u32, u32) {
    (k.major, k.minor, k.patch)
}

/// Which fixes `k` has, from the mainline, longterm and Ubuntu versions above.
pub fn assess(k: &KernelVersion) -> Assessment {
    let v = ver(k);
    let mut notes = Vec::new();
    if let Some(vendor) = &k.vendor {
        if v < (5, 6, 0) {
            notes.push(format!(
                "{vendor} kernel {}: the distribution backports netfilter fixes the version \
                 number does not show; measure instead (watch the insert_failed/drop counters)",
                k.release
            ));
            return Assessment {
                matching: if v >= (4, 19, 0) {
                    Fix::Present
                } else {
                    Fix::Unknown
                },
                same_origin: if v >= (5, 0, 0) {
                    Fix::Present
                } else {
                    Fix::Unknown
                },
                different_backends: Fix::Unknown,
                notes,
            };
        }
    }
    // A: ed07d9a021df.
    let matching = if v >= (4, 19, 0) {
        notes.push("A ed07d9a021df (identical clashing entries merged): mainline 4.19".into());
        Fix::Present
    } else if k.ubuntu_abi.is_some() && (k.major, k.minor) == (4, 15) {
        if k.ubuntu_abi >= Some(56) {
            notes.push("A ed07d9a021df: in Ubuntu 4.15.0-56 and later".into());
            Fix::Present
        } else {
            notes.push("A ed07d9a021df: Ubuntu 4.15 kernels have it from 4.15.0-56".into());
            Fix::Missing
        }
    } else if (k.major, k.minor) == (4, 14) && v >= (4, 14, 173) {
        notes.push("A ed07d9a021df: backported to 4.14.173".into());
        Fix::Present
    } else if (k.major, k.minor) == (4, 14) {
        notes.push("A ed07d9a021df: 4.14.y has it only from 4.14.173".into());
        Fix::Missing
    } else if (k.major, k.minor) == (4, 9) && v >= (4, 9, 163) {
        notes.push(
            "A ed07d9a021df: no 4.9.y backport known (B is in 4.9.163); the identical-tuple \
             race may remain"
                .into(),
        );
        Fix::Unknown
    } else {
        notes.push(format!(
            "A ed07d9a021df: missing (mainline 4.19, 4.14.173; this is {})",
            k.release
        ));
        Fix::Missing
    };
    // B: 4e35c1cb9460.
    let same_origin = if v >= (5, 0, 0) {
        notes.push("B 4e35c1cb9460 (same origin keeps its reply tuple): mainline 5.0".into());
        Fix::Present
    } else {
        let stable_min = match (k.major, k.minor) {
            (4, 19) => Some(29),
            (4, 14) => Some(106),
            (4, 9) => Some(163),
            _ => None,
        };
        if k.ubuntu_abi.is_some() && (k.major, k.minor) == (4, 15) {
            if k.ubuntu_abi >= Some(56) {
                notes.push("B 4e35c1cb9460: in Ubuntu 4.15.0-56 and later".into());
                Fix::Present
            } else {
                notes.push("B 4e35c1cb9460: Ubuntu 4.15 kernels have it from 4.15.0-56".into());
                Fix::Missing
            }
        } else if let Some(min) = stable_min {
            if k.patch >= min {
                notes.push(format!(
                    "B 4e35c1cb9460: backported to {}.{}.{min}",
                    k.major, k.minor
                ));
                Fix::Present
            } else {
                notes.push(format!(
                    "B 4e35c1cb9460: {}.{}.y has it only from {}.{}.{min}",
                    k.major, k.minor, k.major, k.minor
                ));
                Fix::Missing
            }
        } else {
            notes.push(format!(
                "B 4e35c1cb9460: missing (mainline 5.0; longterm 4.9.163, 4.14.106, 4.19.29; \
                 Ubuntu 4.15.0-56; this is {})",
                k.release
            ));
            Fix::Missing
        }
    };
    // C: 6a757c07e51f.
    let different_backends = if v >= (5, 6, 0) {
        notes.push(
            "C 6a757c07e51f (clash with a different DNAT target inserted reply-only, \
             nf_ct_resolve_clash_harder): mainline 5.6"
                .into(),
        );
        Fix::Present
    } else {
        notes.push(format!(
            "C 6a757c07e51f: missing (mainline 5.6, no longterm backport known; this is {}): \
             A and AAAA DNATed to different DNS backends still lose one packet",
            k.release
        ));
        Fix::Missing
    };
    Assessment {
        matching,
        same_origin,
        different_backends,
        notes,
    }
}

/// What no kernel fixes, said on every kernel finding.
pub const REMAINING: &[&str] = &[
    "on every kernel: a clash whose reply tuple also collides is still dropped, e.g. two \
     different flows MASQUERADEd to the same source port at the same moment (see \
     masquerade-random-fully)",
    "on every kernel: TCP gets no clash resolution (a clashing SYN is dropped and resent after \
     the 1 s initial retransmission timeout); only UDP and UDP-Lite (GRE since 6.5) entries are \
     resolved",
    "on every kernel: a full conntrack table drops new flows (see conntrack-capacity)",
    "kernels before 6.12 (unless backported): packets that went through NFQUEUE, e.g. of \
     NFQUEUE-based network policy agents, had their own clash path (8af79d3edb5f, netfilter \
     bugzilla 1766)",
];

/// The kernel finding for an `osrelease` / `proc/version` pair.
pub fn check(osrelease: &str, proc_version: Option<&str>) -> Finding {
    let Some(k) = parse_release(osrelease, proc_version) else {
        return Finding::new(
            ids::KERNEL,
            Severity::Info,
            format!("Can not parse the kernel release {osrelease:?}"),
        );
    };
    let a = assess(&k);
    let same_backend = match (a.matching, a.same_origin) {
        (Fix::Present, Fix::Present) => Fix::Present,
        (Fix::Missing, _) | (_, Fix::Missing) => Fix::Missing,
        _ => Fix::Unknown,
    };
    let (severity, title) = match (same_backend, a.different_backends) {
        (Fix::Missing, _) => (
            Severity::Critical,
            format!(
                "Kernel {} lacks the conntrack clash fixes: parallel A/AAAA through a DNAT \
                 drop one query even with a single DNS backend",
                k.release
            ),
        ),
        (Fix::Unknown, _) => (
            Severity::Warn,
            format!(
                "Kernel {}: can not tell whether the conntrack clash fixes are in",
                k.release
            ),
        ),
        (Fix::Present, Fix::Present) => (
            Severity::Ok,
            format!(
                "Kernel {} has the conntrack clash fixes (same and different DNAT targets)",
                k.release
            ),
        ),
        (Fix::Present, _) => (
            Severity::Warn,
            format!(
                "Kernel {} resolves clashes only when both packets get the same DNAT target: \
                 with several DNS backends one of A/AAAA can still be dropped",
                k.release
            ),
        ),
    };
    let mut f = Finding::new(ids::KERNEL, severity, title).with(format!(
        "release {} (parsed {}.{}.{}{}){}",
        k.release,
        k.major,
        k.minor,
        k.patch,
        k.ubuntu_abi
            .map(|abi| format!(", Ubuntu ABI {abi}"))
            .unwrap_or_default(),
        k.vendor
            .as_ref()
            .map(|v| format!(", vendor {v}"))
            .unwrap_or_default()
    ));
    for n in &a.notes {
        f = f.with(n.clone());
    }
    for r in REMAINING {
        f = f.with(*r);
    }
    match severity {
        Severity::Critical | Severity::Warn => f.fix(
            "upgrade to a 5.6+ kernel (or a longterm/vendor kernel with these commits); until \
             then: one DNS backend per node (NodeLocal DNSCache), `options single-request-reopen` \
             for glibc pods, and `--random-fully` on MASQUERADE",
        ),
        _ => f,
    }
}

/// [`check`] on the node's `proc/sys/kernel/osrelease` and `proc/version`.
pub fn check_node(node: &Node) -> Finding {
    match node.read_trim("proc/sys/kernel/osrelease") {
        Some(rel) => check(&rel, node.read("proc/version").ok().as_deref()),
        None => Finding::new(
            ids::KERNEL,
            Severity::Info,
            "Can not read the kernel release",
        )
        .with(format!(
            "{} unreadable",
            node.path("proc/sys/kernel/osrelease").display()
        )),
    }
}

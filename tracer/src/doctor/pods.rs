//! Per pod DNS: resolv.conf options and which libc resolver the pod's processes use.
//!
//! glibc sends A and AAAA in parallel from one socket (the pattern behind the conntrack
//! clash); `options single-request-reopen` (a new socket for the second query),
//! `single-request` (one after the other) or `use-vc` (TCP) avoid it. musl sends them back
//! to back from one socket too, but ignores all three options: the glibc mitigations do
//! not apply to musl (Alpine) images. A high `ndots` with a search list multiplies the
//! queries: a name with fewer dots than `ndots` is first tried with every search domain,
//! two queries (A and AAAA) each.
//!
//! Processes are read through `<root>/proc/PID`: `ns/net` (which pod), `root/etc/resolv.conf`
//! (the file as the process sees it, through its mount namespace), `maps` and `exe` (the
//! ELF interpreter) for the libc, `environ` for `RES_OPTIONS`.

use std::{collections::BTreeMap, fs, io::Read as _, path::Path};

use serde::Serialize;

use super::{ids, Finding, Node, PodSelection, Severity};

/// `ndots` at or above this, with a search list, is flagged.
pub const HIGH_NDOTS: u32 = 3;
/// Process names skipped by automatic selection (the pod sandbox, no resolver).
pub const SKIP_COMM: &[&str] = &["pause"];

/// Which resolver a process uses.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Libc {
    Glibc,
    Musl,
    /// Statically linked: libc unknown (Go programs use Go's own resolver unless built
    /// with cgo).
    Static,
    Unknown,
}

impl Libc {
    pub fn name(self) -> &'static str {
        match self {
            Libc::Glibc => "glibc",
            Libc::Musl => "musl",
            Libc::Static => "static",
            Libc::Unknown => "unknown",
        }
    }
}

/// The parts of resolv.conf that matter here, with glibc's precedence (the last `search`
/// wins, later options override earlier ones, `RES_OPTIONS` overrides the file).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct ResolvConf {
    pub nameservers: Vec<String>,
    pub search: Vec<String>,
    pub ndots: Option<u32>,
    /// Every option word, in order.
    pub options: Vec<String>,
}

impl ResolvConf {
    pub fn has(&self, opt: &str) -> bool {
        self.options.iter().any(|o| o == opt)
    }

    /// The effective ndots (glibc's default is 1; capped at 15).
    pub fn effective_ndots(&self) -> u32 {
        self.ndots.unwrap_or(1).min(15)
    }

    /// Applies an `options` word list (from the file or `RES_OPTIONS`).
    pub fn apply_options(&mut self, words: &str) {
        for w in words.split_whitespace() {
            if let Some(n) = w.strip_prefix("ndots:") {
                if let Ok(n) = n.parse() {
                    self.ndots = Some(n);
                }
            }
            self.options.push(w.to_string());
        }
    }
}

/// Parses resolv.conf text.
pub fn parse_resolv_conf(text: &str) -> ResolvConf {
    let mut rc = ResolvConf::default();
    for line in text.lines() {
        let line = line.trim();
        if line.starts_with('#') || line.starts_with(';') {
            continue;
        }
        let mut words = line.splitn(2, char::is_whitespace);
        let key = words.next().unwrap_or("");
        let rest = words.next().unwrap_or("").trim();
        match key {
            "nameserver" => {
                if let Some(ns) = rest.split_whitespace().next() {
                    rc.nameservers.push(ns.to_string());
                }
            }
            "search" => rc.search = rest.split_whitespace().map(String::from).collect(),
            "domain" => rc.search = rest.split_whitespace().take(1).map(String::from).collect(),
            "options" => rc.apply_options(rest),
            _ => {}
        }
    }
    rc
}

/// The libc from `/proc/PID/maps`: a mapped musl loader / libc, or glibc's `libc.so.6`.
pub fn libc_from_maps(maps: &str) -> Option<(Libc, String)> {
    let mut glibc = None;
    for line in maps.lines() {
        let Some(path) = line.split_whitespace().nth(5) else {
            continue;
        };
        let file = path.rsplit('/').next().unwrap_or(path);
        if file.starts_with("ld-musl")
            || file.starts_with("libc.musl")
            || path.contains("-linux-musl/")
        {
            return Some((Libc::Musl, path.to_string()));
        }
        if glibc.is_none() && (file == "libc.so.6" || file.starts_with("libc-2.")) {
            glibc = Some((Libc::Glibc, path.to_string()));
        }
    }
    glibc
}

/// The ELF program interpreter (`PT_INTERP`) of an executable, from its first bytes.
/// `None` for a static executable or anything that is not ELF (or is truncated).
pub fn elf_interp(bytes: &[u8]) -> Option<String> {
    if bytes.len() < 52 || &bytes[..4] != b"\x7fELF" {
        return None;
    }
    let class64 = match bytes[4] {
        1 => false,
        2 => true,
        _ => return None,
    };
    let le = match bytes[5] {
        1 => true,
        2 => false,
        _ => return None,
    };
    let u16_at = |o: usize| -> Option<u64> {
        let b: [u8; 2] = bytes.get(o..o + 2)?.try_into().ok()?;
        Some(u64::from(if le {
            u16::from_le_bytes(b)
        } else {
            u16::from_be_bytes(b)
        }))
    };
    let u32_at = |o: usize| -> Option<u64> {
        let b: [u8; 4] = bytes.get(o..o + 4)?.try_into().ok()?;
        Some(u64::from(if le {
            u32::from_le_bytes(b)
        } else {
            u32::from_be_bytes(b)
        }))
    };
    let u64_at = |o: usize| -> Option<u64> {
        let b: [u8; 8] = bytes.get(o..o + 8)?.try_into().ok()?;
        Some(if le {
            u64::from_le_bytes(b)
        } else {
            u64::from_be_bytes(b)
        })
    };
    let (phoff, phentsize, phnum) = if class64 {
        (u64_at(0x20)?, u16_at(0x36)?, u16_at(0x38)?)
    } else {
        (u32_at(0x1c)?, u16_at(0x2a)?, u16_at(0x2c)?)
    };
    const PT_INTERP: u64 = 3;
    for i in 0..phnum.min(256) {
        let ph = usize::try_from(phoff + i * phentsize).ok()?;
        if u32_at(ph)? != PT_INTERP {
            continue;
        }
        let (off, size) = if class64 {
            (u64_at(ph + 8)?, u64_at(ph + 32)?)
        } else {
            (u32_at(ph + 4)?, u32_at(ph + 16)?)
        };
        let start = usize::try_from(off).ok()?;
        let end = start.checked_add(usize::try_from(size).ok()?)?;
        let raw = bytes.get(start..end)?;
        let s = raw.split(|&b| b == 0).next()?;
        return Some(String::from_utf8_lossy(s).into_owned());
    }
    None
}

/// The libc an ELF interpreter path implies.
pub fn libc_from_interp(interp: &str) -> Libc {
    let file = interp.rsplit('/').next().unwrap_or(interp);
    if file.starts_with("ld-musl") {
        Libc::Musl
    } else if file.starts_with("ld-linux") || file.starts_with("ld64.so") || file == "ld.so.1" {
        Libc::Glibc
    } else {
        Libc::Unknown
    }
}

/// How far into an executable to look for its program headers and interpreter.
const ELF_PREFIX: u64 = 64 * 1024;

fn read_prefix(path: &Path) -> Option<Vec<u8>> {
    let f = fs::File::open(path).ok()?;
    let mut buf = Vec::new();
    f.take(ELF_PREFIX).read_to_end(&mut buf).ok()?;
    Some(buf)
}

/// The libc of process `pid`: from its maps, else its executable's interpreter.
pub fn detect_libc(node: &Node, pid: u32) -> (Libc, String) {
    if let Ok(maps) = node.read(format!("proc/{pid}/maps")) {
        if let Some((l, path)) = libc_from_maps(&maps) {
            return (l, format!("maps: {path}"));
        }
    }
    match read_prefix(&node.path(format!("proc/{pid}/exe"))) {
        Some(bytes) if bytes.starts_with(b"\x7fELF") => match elf_interp(&bytes) {
            Some(interp) => (
                libc_from_interp(&interp),
                format!("ELF interpreter {interp}"),
            ),
            None => (
                Libc::Static,
                "statically linked executable (no ELF interpreter)".to_string(),
            ),
        },
        Some(_) => (Libc::Unknown, "executable is not ELF".to_string()),
        None => (Libc::Unknown, "executable and maps unreadable".to_string()),
    }
}

/// One inspected process.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct PodProcess {
    pub pid: u32,
    pub comm: String,
    /// `net:[INODE]`.
    pub netns: String,
    pub libc: Libc,
    pub libc_evidence: String,
    /// The resolv.conf as the process sees it, or why it could not be read.
    pub resolv_text: Result<String, String>,
    /// `RES_OPTIONS` from the process environment, if set.
    pub res_options: Option<String>,
}

impl PodProcess {
    pub fn resolv(&self) -> Option<ResolvConf> {
        let mut rc = parse_resolv_conf(self.resolv_text.as_ref().ok()?);
        if let Some(o) = &self.res_options {
            rc.apply_options(o);
        }
        Some(rc)
    }
}

fn read_link(node: &Node, rel: &str) -> Option<String> {
    fs::read_link(node.path(rel))
        .ok()
        .map(|p| p.to_string_lossy().into_owned())
}

/// Reads what the check needs about `pid`; `None` if the process is gone.
pub fn inspect(node: &Node, pid: u32) -> Option<PodProcess> {
    let netns = read_link(node, &format!("proc/{pid}/ns/net"))?;
    let comm = node
        .read_trim(format!("proc/{pid}/comm"))
        .unwrap_or_else(|| "?".into());
    let (libc, libc_evidence) = detect_libc(node, pid);
    let resolv_path = node.path(format!("proc/{pid}/root/etc/resolv.conf"));
    let resolv_text = fs::read(&resolv_path)
        .map(|b| String::from_utf8_lossy(&b).into_owned())
        .map_err(|e| format!("{}: {e}", resolv_path.display()));
    let res_options = fs::read(node.path(format!("proc/{pid}/environ")))
        .ok()
        .and_then(|env| {
            env.split(|&b| b == 0)
                .find_map(|kv| kv.strip_prefix(b"RES_OPTIONS="))
                .map(|v| String::from_utf8_lossy(v).into_owned())
        });
    Some(PodProcess {
        pid,
        comm,
        netns,
        libc,
        libc_evidence,
        resolv_text,
        res_options,
    })
}

/// The pids the check covers: for [`PodSelection::Auto`], every process whose network
/// namespace differs from the host's ([`super::host_netns_file`]; the pod sandbox `pause`
/// skipped).
pub fn select(node: &Node, sel: &PodSelection) -> Vec<u32> {
    match sel {
        PodSelection::None => Vec::new(),
        PodSelection::Pids(p) => p.clone(),
        PodSelection::Auto => {
            let Some(host) = super::host_netns_file(node)
                .and_then(|p| fs::read_link(p).ok())
                .map(|l| l.to_string_lossy().into_owned())
            else {
                return Vec::new();
            };
            let mut pids: Vec<u32> = node
                .list("proc")
                .iter()
                .filter_map(|n| n.parse().ok())
                .filter(|pid| {
                    read_link(node, &format!("proc/{pid}/ns/net")).is_some_and(|ns| ns != host)
                })
                .filter(|pid| {
                    let comm = node
                        .read_trim(format!("proc/{pid}/comm"))
                        .unwrap_or_default();
                    !SKIP_COMM.contains(&comm.as_str())
                })
                .collect();
            pids.sort_unstable();
            pids
        }
    }
}

/// The finding for a group of processes sharing netns, libc and resolv.conf.
pub fn check_group(procs: &[PodProcess]) -> Finding {
    let first = &procs[0];
    let mut ev = Vec::new();
    let shown: Vec<String> = procs
        .iter()
        .take(5)
        .map(|p| format!("{} ({})", p.pid, p.comm))
        .collect();
    ev.push(format!(
        "processes: {}{}",
        shown.join(", "),
        if procs.len() > 5 {
            format!(" and {} more", procs.len() - 5)
        } else {
            String::new()
        }
    ));
    ev.push(format!(
        "libc: {} ({})",
        first.libc.name(),
        first.libc_evidence
    ));
    let mut severity = Severity::Ok;
    let mut problems: Vec<String> = Vec::new();
    let mut fixes: Vec<&str> = Vec::new();
    let rc = first.resolv();
    match (&first.resolv_text, &rc) {
        (Ok(_), Some(rc)) => {
            ev.push(format!(
                "resolv.conf: nameserver {}; search {}; options {}{}",
                if rc.nameservers.is_empty() {
                    "(none)".into()
                } else {
                    rc.nameservers.join(" ")
                },
                if rc.search.is_empty() {
                    "(none)".into()
                } else {
                    rc.search.join(" ")
                },
                if rc.options.is_empty() {
                    "(none)".into()
                } else {
                    rc.options.join(" ")
                },
                first
                    .res_options
                    .as_ref()
                    .map(|o| format!(" (RES_OPTIONS={o})"))
                    .unwrap_or_default()
            ));
        }
        (Err(e), _) => {
            ev.push(format!("resolv.conf unreadable: {e}"));
            severity = severity.max(Severity::Info);
            problems.push("resolv.conf unreadable".into());
        }
        _ => {}
    }
    let mitigations: Vec<&str> = ["single-request", "single-request-reopen", "use-vc"]
        .into_iter()
        .filter(|o| rc.as_ref().is_some_and(|rc| rc.has(o)))
        .collect();
    match first.libc {
        Libc::Musl => {
            severity = severity.max(Severity::Warn);
            problems.push("musl resolver".into());
            ev.push(
                "musl sends A and AAAA back to back from one socket and ignores \
                 single-request, single-request-reopen and use-vc"
                    .into(),
            );
            if !mitigations.is_empty() {
                ev.push(format!(
                    "options {} have no effect here",
                    super::join_list(&mitigations)
                ));
            }
            fixes.push(
                "for musl images rely on the node: a 5.6+ kernel, NodeLocal DNSCache, or a \
                 single DNS backend per node; or rebuild on a glibc base image",
            );
        }
        Libc::Glibc => {
            if mitigations.is_empty() {
                severity = severity.max(Severity::Info);
                ev.push(
                    "glibc sends A and AAAA in parallel from one socket; \
                     `options single-request-reopen` avoids the clash on kernels before 5.6"
                        .into(),
                );
            } else {
                ev.push(format!("glibc honours {}", super::join_list(&mitigations)));
            }
        }
        Libc::Static => {
            severity = severity.max(Severity::Info);
            ev.push(
                "static executable: resolver unknown (Go's own resolver sends A and AAAA from \
                 separate sockets)"
                    .into(),
            );
        }
        Libc::Unknown => severity = severity.max(Severity::Info),
    }
    if let Some(rc) = &rc {
        let ndots = rc.effective_ndots();
        if ndots >= HIGH_NDOTS && !rc.search.is_empty() {
            severity = severity.max(Severity::Warn);
            problems.push(format!("ndots:{ndots}"));
            let lookups = rc.search.len() as u32 + 1;
            ev.push(format!(
                "ndots:{ndots} with {} search domain(s): a name with fewer than {ndots} dots \
                 is tried with every search domain first: up to {lookups} lookups x 2 (A and \
                 AAAA) = {} queries, each a conntrack entry",
                rc.search.len(),
                lookups * 2
            ));
            fixes.push(
                "lower ndots (pod dnsConfig `options: [{name: ndots, value: \"2\"}]`) or use \
                 fully qualified names with a trailing dot",
            );
        }
    }
    let title = format!(
        "pod netns {} ({}): {}",
        first.netns,
        first.comm,
        if problems.is_empty() {
            format!(
                "{} resolver, ndots:{}",
                first.libc.name(),
                rc.map_or(1, |r| r.effective_ndots())
            )
        } else {
            problems.join(", ")
        }
    );
    let mut f = Finding::new(ids::POD_DNS, severity, title);
    f.evidence = ev;
    if !fixes.is_empty() {
        f = f.fix(fixes.join("; "));
    }
    f
}

/// One finding per group of processes sharing network namespace, libc and resolv.conf.
pub fn check(node: &Node, sel: &PodSelection) -> Vec<Finding> {
    let mut groups: BTreeMap<(String, Libc, String), Vec<PodProcess>> = BTreeMap::new();
    let pids = select(node, sel);
    let mut missing = Vec::new();
    for pid in &pids {
        match inspect(node, *pid) {
            Some(p) => {
                let key = (
                    p.netns.clone(),
                    p.libc,
                    p.resolv_text.clone().unwrap_or_default(),
                );
                groups.entry(key).or_default().push(p);
            }
            None => missing.push(pid.to_string()),
        }
    }
    let mut out: Vec<Finding> = groups.values().map(|g| check_group(g)).collect();
    if !missing.is_empty() {
        out.push(
            Finding::new(
                ids::POD_DNS,
                Severity::Info,
                format!(
                    "{} selected process(es) not found or not readable",
                    missing.len()
                ),
            )
            .with(format!("pids: {}", missing.join(", "))),
        );
    }
    if out.is_empty() && matches!(sel, PodSelection::Auto) {
        out.push(Finding::new(
            ids::POD_DNS,
            Severity::Ok,
            "No processes outside the host network namespace",
        ));
    }
    out
}

//! `nf_conntrack_tcp_be_liberal`: its value, and whether it survives a reboot.
//!
//! With 0 (the default) conntrack marks TCP segments outside the tracked window INVALID;
//! such packets are not de-NATed, so a pod behind a DNAT sees a segment from the backend's
//! real address, answers RST, and the connection dies. With 1 they are accepted.
//!
//! The setting is a per-netns sysctl that exists only while nf_conntrack is loaded.
//! `systemd-sysctl` (ordered after `systemd-modules-load`) applies `sysctl.d` at boot; if
//! nf_conntrack is a module loaded later (by the first iptables/nft rule that needs it),
//! the key does not exist yet and the setting is silently skipped. It sticks only when
//! nf_conntrack is built in or listed in `modules-load.d`.

use serde::Serialize;

use super::{ids, Finding, Node, Severity};

/// The sysctl below the node root.
pub const SYSCTL_PATH: &str = "proc/sys/net/netfilter/nf_conntrack_tcp_be_liberal";
/// The sysctl's key.
pub const KEY: &str = "net.netfilter.nf_conntrack_tcp_be_liberal";

/// `sysctl.d` directories in systemd's precedence order (earlier wins for a file name).
pub const SYSCTL_DIRS: &[&str] = &[
    "etc/sysctl.d",
    "run/sysctl.d",
    "usr/local/lib/sysctl.d",
    "usr/lib/sysctl.d",
    "lib/sysctl.d",
];
/// `modules-load.d` directories in systemd's precedence order.
pub const MODULES_LOAD_DIRS: &[&str] = &[
    "etc/modules-load.d",
    "run/modules-load.d",
    "usr/local/lib/modules-load.d",
    "usr/lib/modules-load.d",
    "lib/modules-load.d",
];

/// Modules whose loading loads nf_conntrack (they depend on it).
pub const CONNTRACK_USERS: &[&str] = &[
    "nf_conntrack",
    "nf_conntrack_netlink",
    "nf_nat",
    "nft_ct",
    "nft_nat",
    "nft_masq",
    "xt_conntrack",
    "xt_nat",
    "xt_masquerade",
    "xt_ct",
    "iptable_nat",
    "ip6table_nat",
    "nf_conntrack_ipv4",
    "nf_nat_ipv4",
    "ip_vs",
];

/// Whether nf_conntrack is built into the kernel.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Builtin {
    Yes(String),
    No(String),
    Unknown(String),
}

/// What the node's boot configuration does with the setting.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Persistence {
    /// The value the boot configuration sets (the last assignment wins) and where.
    pub configured: Option<(String, String)>,
    /// Every file that sets it, in application order.
    pub assignments: Vec<(String, String)>,
    /// A `modules-load.d` entry that loads nf_conntrack at boot (file: module).
    pub autoload: Option<String>,
    pub builtin: Builtin,
}

fn strip_comment(line: &str) -> Option<&str> {
    let l = line.trim();
    (!l.is_empty() && !l.starts_with('#') && !l.starts_with(';')).then_some(l)
}

/// The `sysctl.d` files in application order: by file name, the first directory in
/// [`SYSCTL_DIRS`] holding a name wins; `etc/sysctl.conf` last (as procps applies it; on
/// Debian it is also linked as `99-sysctl.conf`).
pub fn sysctl_files(node: &Node) -> Vec<String> {
    ordered_conf_files(node, SYSCTL_DIRS)
        .into_iter()
        .chain(
            node.exists("etc/sysctl.conf")
                .then(|| "etc/sysctl.conf".to_string()),
        )
        .collect()
}

fn ordered_conf_files(node: &Node, dirs: &[&str]) -> Vec<String> {
    let mut by_name: std::collections::BTreeMap<String, String> = Default::default();
    for dir in dirs {
        for name in node.list(dir) {
            if name.ends_with(".conf") {
                by_name
                    .entry(name.clone())
                    .or_insert(format!("{dir}/{name}"));
            }
        }
    }
    by_name.into_values().collect()
}

/// `key = value` assignments of `KEY` in one sysctl file (`-key = value` and the `/` form
/// count too).
pub fn parse_sysctl_conf(text: &str) -> Vec<String> {
    text.lines()
        .filter_map(strip_comment)
        .filter_map(|l| l.split_once('='))
        .filter(|(k, _)| {
            let k = k.trim().trim_start_matches('-').replace('/', ".");
            k == KEY
        })
        .map(|(_, v)| v.trim().to_string())
        .collect()
}

/// Module names listed in one `modules-load.d` file.
pub fn parse_modules_load(text: &str) -> Vec<String> {
    text.lines()
        .filter_map(strip_comment)
        .filter_map(|l| l.split_whitespace().next())
        .map(|m| m.replace('-', "_"))
        .collect()
}

impl Persistence {
    /// Reads the boot configuration below the node root. `release` is the running kernel's
    /// `osrelease` (for `lib/modules/RELEASE/modules.builtin`).
    pub fn scan(node: &Node, release: Option<&str>) -> Persistence {
        let mut assignments = Vec::new();
        for file in sysctl_files(node) {
            if let Ok(text) = node.read(&file) {
                for v in parse_sysctl_conf(&text) {
                    assignments.push((file.clone(), v));
                }
            }
        }
        let configured = assignments.last().cloned();

        let mut files = ordered_conf_files(node, MODULES_LOAD_DIRS);
        if node.exists("etc/modules") {
            files.push("etc/modules".to_string());
        }
        let autoload = files.iter().find_map(|file| {
            let text = node.read(file).ok()?;
            parse_modules_load(&text)
                .into_iter()
                .find(|m| CONNTRACK_USERS.contains(&m.to_ascii_lowercase().as_str()))
                .map(|m| format!("{file}: {m}"))
        });

        Persistence {
            configured,
            assignments,
            autoload,
            builtin: builtin(node, release),
        }
    }

    /// Whether nf_conntrack exists when systemd-sysctl runs at boot.
    pub fn loaded_at_sysctl_time(&self) -> Option<bool> {
        if self.autoload.is_some() || matches!(self.builtin, Builtin::Yes(_)) {
            Some(true)
        } else if matches!(self.builtin, Builtin::No(_)) {
            Some(false)
        } else {
            None
        }
    }
}

/// Whether nf_conntrack is built in: `modules.builtin` of the running release, else the
/// live `sys/module/nf_conntrack` (no `initstate` = built in), else a kernel without module
/// support (`proc/modules` absent).
pub fn builtin(node: &Node, release: Option<&str>) -> Builtin {
    if let Some(rel) = release {
        for base in ["lib/modules", "usr/lib/modules"] {
            let file = format!("{base}/{rel}/modules.builtin");
            if let Ok(text) = node.read(&file) {
                return if text.lines().any(|l| l.trim().ends_with("/nf_conntrack.ko")) {
                    Builtin::Yes(format!("{file} lists nf_conntrack.ko"))
                } else {
                    Builtin::No(format!(
                        "{file} does not list nf_conntrack.ko: it is a module"
                    ))
                };
            }
        }
    }
    if node.exists("sys/module/nf_conntrack") {
        return if node.exists("sys/module/nf_conntrack/initstate") {
            Builtin::No("sys/module/nf_conntrack/initstate exists: a loadable module".into())
        } else {
            Builtin::Yes("sys/module/nf_conntrack has no initstate: built in".into())
        };
    }
    if node.exists("proc/sys/kernel") && !node.exists("proc/modules") {
        return Builtin::Yes("proc/modules absent: kernel without module support".into());
    }
    Builtin::Unknown("no modules.builtin for the running kernel".into())
}

/// The be_liberal finding. `value`: the sysctl in the audited netns (`None`: absent);
/// `host_netns`: whether the audited netns is the host's (boot configuration applies only
/// there).
pub fn check(value: Option<u64>, p: &Persistence, host_netns: Option<bool>) -> Finding {
    let Some(value) = value else {
        return Finding::new(
            ids::BE_LIBERAL,
            Severity::Info,
            "nf_conntrack_tcp_be_liberal absent: nf_conntrack is not loaded",
        )
        .with(format!("{SYSCTL_PATH} does not exist"));
    };
    let configured = p.configured.as_ref().map(|(f, v)| (f.as_str(), v.as_str()));
    let configured_on = configured.is_some_and(|(_, v)| v == "1");
    let loaded = p.loaded_at_sysctl_time();
    let mut ev = vec![format!("{KEY} = {value} in the audited network namespace")];
    match configured {
        Some((file, v)) => ev.push(format!("boot configuration sets {v} ({file})")),
        None => ev.push("no sysctl.d / sysctl.conf file sets it".to_string()),
    }
    ev.push(match &p.autoload {
        Some(a) => format!("nf_conntrack loaded at boot via {a}"),
        None => "no modules-load.d entry loads nf_conntrack".to_string(),
    });
    ev.push(match &p.builtin {
        Builtin::Yes(w) | Builtin::No(w) | Builtin::Unknown(w) => w.clone(),
    });
    if host_netns == Some(false) {
        ev.push(
            "the audited namespace is not the host's: sysctl.d applies to the host namespace \
             only; a new namespace starts with 0 unless its creator sets it"
                .to_string(),
        );
    }
    let persist_fix = "put `net.netfilter.nf_conntrack_tcp_be_liberal = 1` in \
                       /etc/sysctl.d/ and `nf_conntrack` in /etc/modules-load.d/ so the module \
                       exists when systemd-sysctl runs";
    let (severity, title, fix) = match (value, configured_on, loaded) {
        (1, true, Some(true)) => (
            Severity::Ok,
            "tcp_be_liberal is on and survives a reboot".to_string(),
            None,
        ),
        (1, true, Some(false)) => (
            Severity::Warn,
            "tcp_be_liberal is on now but will be off after a reboot: nf_conntrack is a \
             module not loaded when systemd-sysctl runs"
                .to_string(),
            Some(persist_fix),
        ),
        (1, true, None) => (
            Severity::Warn,
            "tcp_be_liberal is on; can not tell whether nf_conntrack is loaded early enough \
             at boot for the setting to stick"
                .to_string(),
            Some(persist_fix),
        ),
        (1, false, _) => (
            Severity::Warn,
            "tcp_be_liberal is on, set at runtime only: it is lost on reboot".to_string(),
            Some(persist_fix),
        ),
        (_, true, Some(false)) => (
            Severity::Warn,
            "tcp_be_liberal is configured but not applied: nf_conntrack was loaded after \
             systemd-sysctl ran"
                .to_string(),
            Some(persist_fix),
        ),
        (_, true, _) => (
            Severity::Warn,
            format!("tcp_be_liberal is configured to 1 but is {value}"),
            Some(persist_fix),
        ),
        (_, false, _) => (
            Severity::Info,
            format!(
                "tcp_be_liberal is {value}: out-of-window TCP segments are INVALID (not \
                 de-NATed); drop INVALID packets or set it to 1"
            ),
            Some(persist_fix),
        ),
    };
    let mut f = Finding::new(ids::BE_LIBERAL, severity, title);
    f.evidence = ev;
    match fix {
        Some(x) => f.fix(x),
        None => f,
    }
}

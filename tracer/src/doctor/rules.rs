//! Parsers of the rule dumps the rule-based checks read: `iptables-save` text (both
//! backends, IPv4 and IPv6) and `nft -j list ruleset` JSON. Pure functions; malformed input
//! is skipped (text) or an error (JSON), never a panic.
//!
//! Rules written by iptables-nft appear twice: in `iptables-nft-save` (with every option)
//! and in the nft JSON, where extensions nft can not express natively show up as
//! `{"xt": {"type": "target", "name": "MASQUERADE"}}` without their options. The checks read
//! such chains from the `iptables-save` dump and skip them in the JSON
//! ([`xtables_chains`]).

use std::collections::BTreeSet;

use serde_json::Value;

/// Address family of a rule.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Family {
    Ip,
    Ip6,
}

/// One `-A CHAIN ...` line of an `iptables-save` dump.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct IptRule {
    /// The tool that dumped it (`iptables-nft-save`, ...).
    pub tool: String,
    pub family: Family,
    /// `nat`, `raw`, `filter`, ...
    pub table: String,
    pub chain: String,
    /// The words after `-A CHAIN`, unquoted.
    pub args: Vec<String>,
    /// The line as dumped.
    pub line: String,
}

/// Splits an `iptables-save` line into words: whitespace-separated, `"..."` quoted with
/// `\"` and `\\` escapes (how `-m comment --comment` is dumped).
pub fn split_words(line: &str) -> Vec<String> {
    let mut words = Vec::new();
    let mut cur = String::new();
    let mut in_word = false;
    let mut quoted = false;
    let mut chars = line.chars();
    while let Some(c) = chars.next() {
        match c {
            '\\' if quoted => {
                if let Some(n) = chars.next() {
                    cur.push(n);
                }
            }
            '"' => {
                quoted = !quoted;
                in_word = true;
            }
            c if c.is_whitespace() && !quoted => {
                if in_word {
                    words.push(std::mem::take(&mut cur));
                    in_word = false;
                }
            }
            c => {
                cur.push(c);
                in_word = true;
            }
        }
    }
    if in_word {
        words.push(cur);
    }
    words
}

/// The family a `*tables-save` tool dumps.
pub fn tool_family(tool: &str) -> Family {
    if tool.starts_with("ip6") {
        Family::Ip6
    } else {
        Family::Ip
    }
}

/// Whether a dump came from the nf_tables backend (tool name or the dump's header).
pub fn is_nft_backend(tool: &str, text: &str) -> bool {
    tool.contains("-nft")
        || text
            .lines()
            .take_while(|l| l.starts_with('#') || l.trim().is_empty())
            .any(|l| l.contains("(nf_tables)"))
}

/// Every rule of an `iptables-save` dump.
pub fn parse_iptables_save(tool: &str, text: &str) -> Vec<IptRule> {
    let family = tool_family(tool);
    let mut table = String::new();
    let mut rules = Vec::new();
    for raw in text.lines() {
        let line = raw.trim();
        if let Some(t) = line.strip_prefix('*') {
            table = t.trim().to_string();
            continue;
        }
        let Some(rest) = line.strip_prefix("-A ") else {
            continue;
        };
        let mut words = split_words(rest);
        if words.is_empty() {
            continue;
        }
        let chain = words.remove(0);
        rules.push(IptRule {
            tool: tool.to_string(),
            family,
            table: table.clone(),
            chain,
            args: words,
            line: line.to_string(),
        });
    }
    rules
}

impl IptRule {
    /// The `-j` / `--jump` target.
    pub fn target(&self) -> Option<&str> {
        self.value_of(&["-j", "--jump"])
    }

    /// The word after the first of `names`.
    pub fn value_of(&self, names: &[&str]) -> Option<&str> {
        self.args
            .windows(2)
            .find(|w| names.contains(&w[0].as_str()))
            .map(|w| w[1].as_str())
    }

    /// Every word after any of `names`, ignoring negated matches (`! --dport 53`).
    pub fn values_of(&self, names: &[&str]) -> Vec<&str> {
        self.args
            .windows(2)
            .enumerate()
            .filter(|(i, w)| names.contains(&w[0].as_str()) && !(*i > 0 && self.args[i - 1] == "!"))
            .map(|(_, w)| w[1].as_str())
            .collect()
    }

    pub fn has_flag(&self, flag: &str) -> bool {
        self.args.iter().any(|a| a == flag)
    }

    /// Where the rule is, for evidence lines.
    pub fn location(&self) -> String {
        format!("{} {}/{}", self.tool, self.table, self.chain)
    }

    /// Whether a source or destination port match includes `port` (`--dport 53`,
    /// `--dports 53,853`, `--dport 1:1024`).
    pub fn matches_port(&self, port: u16) -> bool {
        self.values_of(&[
            "--dport",
            "--sport",
            "--dports",
            "--sports",
            "--destination-port",
            "--source-port",
        ])
        .iter()
        .any(|v| port_list_contains(v, port))
    }

    /// Whether a `-s`/`-d` match names `addr` (with or without `/32`).
    pub fn matches_addr(&self, addr: &str) -> bool {
        self.values_of(&["-s", "-d", "--source", "--destination"])
            .iter()
            .flat_map(|v| v.split(','))
            .any(|v| v.split('/').next() == Some(addr))
    }
}

/// `53`, `53,853`, `1:1024` (iptables) or `1-1024`.
pub fn port_list_contains(list: &str, port: u16) -> bool {
    list.split(',').any(|item| {
        let item = item.trim();
        if let Some((a, b)) = item.split_once([':', '-']) {
            let lo = if a.is_empty() {
                Some(0)
            } else {
                a.parse::<u16>().ok()
            };
            let hi = if b.is_empty() {
                Some(u16::MAX)
            } else {
                b.parse::<u16>().ok()
            };
            matches!((lo, hi), (Some(lo), Some(hi)) if lo <= port && port <= hi)
        } else {
            item.parse::<u16>().ok() == Some(port) || (port == 53 && item == "domain")
        }
    })
}

/// Chains dumped by an nf_tables-backend `iptables-save`: `(nft family, table, chain)`, e.g.
/// `("ip", "nat", "POSTROUTING")`. Their rules are read from the dump, not from the nft
/// JSON. Native nft chains in the same table (which iptables-nft-save can not show: "contains
/// incompatible base-chains") are not in the set.
pub fn xtables_chains(dumps: &[super::RuleDump]) -> BTreeSet<(String, String, String)> {
    let mut set = BTreeSet::new();
    for d in dumps {
        if !is_nft_backend(&d.tool, &d.text) {
            continue;
        }
        let fam = match tool_family(&d.tool) {
            Family::Ip => "ip",
            Family::Ip6 => "ip6",
        };
        let mut table = String::new();
        for line in d.text.lines() {
            let line = line.trim();
            if let Some(t) = line.strip_prefix('*') {
                table = t.trim().to_string();
            } else if let Some(decl) = line.strip_prefix(':') {
                if let Some(chain) = decl.split_whitespace().next() {
                    set.insert((fam.to_string(), table.clone(), chain.to_string()));
                }
            }
        }
    }
    set
}

/// The key [`xtables_chains`] holds for an nft rule.
pub fn chain_key(r: &NftRule) -> (String, String, String) {
    (r.family.clone(), r.table.clone(), r.chain.clone())
}

// --- nft JSON ------------------------------------------------------------------------------

/// One rule of `nft -j list ruleset`.
#[derive(Debug, Clone, PartialEq)]
pub struct NftRule {
    pub family: String,
    pub table: String,
    pub chain: String,
    pub handle: Option<u64>,
    /// The rule's expressions / statements, as nft prints them.
    pub expr: Vec<Value>,
}

/// Every rule of a `nft -j list ruleset` dump. An empty dump (no ruleset) is no rules.
pub fn parse_nft_json(text: &str) -> anyhow::Result<Vec<NftRule>> {
    if text.trim().is_empty() {
        return Ok(Vec::new());
    }
    let v: Value = serde_json::from_str(text)?;
    let items = v
        .get("nftables")
        .and_then(Value::as_array)
        .ok_or_else(|| anyhow::anyhow!("no \"nftables\" array in the nft JSON"))?;
    let mut rules = Vec::new();
    for item in items {
        let Some(r) = item.get("rule") else {
            continue;
        };
        let s = |k: &str| r.get(k).and_then(Value::as_str).unwrap_or("").to_string();
        rules.push(NftRule {
            family: s("family"),
            table: s("table"),
            chain: s("chain"),
            handle: r.get("handle").and_then(Value::as_u64),
            expr: r
                .get("expr")
                .and_then(Value::as_array)
                .cloned()
                .unwrap_or_default(),
        });
    }
    Ok(rules)
}

/// Renders a match operand: `meta oifname`, `udp dport`, `ct state`, values and sets.
fn render_value(v: &Value) -> String {
    match v {
        Value::String(s) => s.clone(),
        Value::Number(n) => n.to_string(),
        Value::Bool(b) => b.to_string(),
        Value::Null => "null".into(),
        Value::Array(a) => a.iter().map(render_value).collect::<Vec<_>>().join(","),
        Value::Object(o) => {
            if let Some(m) = o.get("meta") {
                return format!(
                    "meta {}",
                    render_value(m.get("key").unwrap_or(&Value::Null))
                );
            }
            if let Some(p) = o.get("payload") {
                let proto = p.get("protocol").and_then(Value::as_str).unwrap_or("?");
                let field = p.get("field").and_then(Value::as_str).unwrap_or("?");
                return format!("{proto} {field}");
            }
            if let Some(c) = o.get("ct") {
                return format!("ct {}", render_value(c.get("key").unwrap_or(&Value::Null)));
            }
            if let Some(s) = o.get("set") {
                return format!("{{ {} }}", render_value(s));
            }
            if let Some(p) = o.get("prefix") {
                let addr = p.get("addr").map(render_value).unwrap_or_default();
                let len = p.get("len").map(render_value).unwrap_or_default();
                return format!("{addr}/{len}");
            }
            if let Some(r) = o.get("range").and_then(Value::as_array) {
                return r.iter().map(render_value).collect::<Vec<_>>().join("-");
            }
            match o.iter().next() {
                Some((k, v)) if v.is_null() => k.clone(),
                Some((k, v)) => format!("{k} {}", render_value(v)),
                None => String::new(),
            }
        }
    }
}

/// nft flags are a string or a list of strings.
pub fn flags_of(stmt: &Value) -> Vec<String> {
    match stmt.get("flags") {
        Some(Value::String(s)) => vec![s.clone()],
        Some(Value::Array(a)) => a
            .iter()
            .filter_map(|f| f.as_str().map(String::from))
            .collect(),
        _ => Vec::new(),
    }
}

impl NftRule {
    /// `ip lab/post handle 3`.
    pub fn location(&self) -> String {
        match self.handle {
            Some(h) => format!(
                "nft {} {}/{} handle {h}",
                self.family, self.table, self.chain
            ),
            None => format!("nft {} {}/{}", self.family, self.table, self.chain),
        }
    }

    /// A readable rendering of the rule, close to `nft list ruleset`.
    pub fn describe(&self) -> String {
        let parts: Vec<String> = self
            .expr
            .iter()
            .map(|e| {
                if let Some(m) = e.get("match") {
                    let left = render_value(m.get("left").unwrap_or(&Value::Null));
                    let right = render_value(m.get("right").unwrap_or(&Value::Null));
                    let op = m.get("op").and_then(Value::as_str).unwrap_or("==");
                    if op == "==" || op == "in" {
                        format!("{left} {right}")
                    } else {
                        format!("{left} {op} {right}")
                    }
                } else if let Some((k, v)) = e.as_object().and_then(|o| o.iter().next()) {
                    match k.as_str() {
                        "masquerade" | "snat" | "dnat" | "redirect" => {
                            let flags = flags_of(v);
                            let mut s = k.clone();
                            if let Some(addr) = v.get("addr") {
                                s.push_str(&format!(" to {}", render_value(addr)));
                            }
                            if let Some(port) = v.get("port") {
                                s.push_str(&format!(" port {}", render_value(port)));
                            }
                            if !flags.is_empty() {
                                s.push(' ');
                                s.push_str(&flags.join(","));
                            }
                            s
                        }
                        "xt" => format!(
                            "xt {} {}",
                            v.get("type").and_then(Value::as_str).unwrap_or("?"),
                            v.get("name").and_then(Value::as_str).unwrap_or("?")
                        ),
                        "counter" => "counter".into(),
                        _ if v.is_null() => k.clone(),
                        _ => format!("{k} {}", render_value(v)),
                    }
                } else {
                    render_value(e)
                }
            })
            .collect();
        parts.join(" ")
    }

    /// The first statement with this key (`masquerade`, `notrack`, `xt`, ...).
    pub fn stmt(&self, key: &str) -> Option<&Value> {
        self.expr.iter().find_map(|e| e.get(key))
    }

    /// The `xt` target names in the rule (rules written by iptables-nft).
    pub fn xt_targets(&self) -> Vec<&str> {
        self.expr
            .iter()
            .filter_map(|e| e.get("xt"))
            .filter(|x| x.get("type").and_then(Value::as_str) == Some("target"))
            .filter_map(|x| x.get("name").and_then(Value::as_str))
            .collect()
    }

    fn matches(&self) -> impl Iterator<Item = (&Value, &str, &Value)> {
        self.expr.iter().filter_map(|e| {
            let m = e.get("match")?;
            let op = m.get("op").and_then(Value::as_str).unwrap_or("==");
            Some((m.get("left")?, op, m.get("right")?))
        })
    }

    /// Whether a (non-negated) port match includes `port`.
    pub fn matches_port(&self, port: u16) -> bool {
        self.matches().any(|(left, op, right)| {
            let field = left
                .get("payload")
                .and_then(|p| p.get("field"))
                .and_then(Value::as_str);
            matches!(field, Some("dport" | "sport")) && op != "!=" && value_has_port(right, port)
        })
    }

    /// Whether a (non-negated) address match names `addr`.
    pub fn matches_addr(&self, addr: &str) -> bool {
        self.matches().any(|(left, op, right)| {
            let field = left
                .get("payload")
                .and_then(|p| p.get("field"))
                .and_then(Value::as_str);
            matches!(field, Some("saddr" | "daddr")) && op != "!=" && value_has_addr(right, addr)
        })
    }
}

fn value_has_port(v: &Value, port: u16) -> bool {
    match v {
        Value::Number(n) => n.as_u64() == Some(u64::from(port)),
        Value::String(s) => port_list_contains(s, port),
        Value::Array(a) => a.iter().any(|x| value_has_port(x, port)),
        Value::Object(o) => {
            if let Some(s) = o.get("set") {
                return value_has_port(s, port);
            }
            if let Some(r) = o.get("range").and_then(Value::as_array) {
                let lo = r.first().and_then(Value::as_u64);
                let hi = r.get(1).and_then(Value::as_u64);
                return matches!((lo, hi), (Some(lo), Some(hi)) if lo <= u64::from(port) && u64::from(port) <= hi);
            }
            false
        }
        _ => false,
    }
}

fn value_has_addr(v: &Value, addr: &str) -> bool {
    match v {
        Value::String(s) => s == addr,
        Value::Array(a) => a.iter().any(|x| value_has_addr(x, addr)),
        Value::Object(o) => {
            if let Some(s) = o.get("set") {
                return value_has_addr(s, addr);
            }
            if let Some(p) = o.get("prefix") {
                return p.get("addr").and_then(Value::as_str) == Some(addr)
                    && p.get("len").and_then(Value::as_u64) == Some(32);
            }
            false
        }
        _ => false,
    }
}

/// Addresses of interfaces from `ip -j -d addr show`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Iface {
    pub name: String,
    /// `dummy`, `veth`, ... (from `linkinfo.info_kind`), if any.
    pub kind: Option<String>,
    /// `addr/prefixlen`.
    pub addrs: Vec<String>,
}

/// Parses `ip -j [-d] addr show`.
pub fn parse_ip_addr_json(text: &str) -> anyhow::Result<Vec<Iface>> {
    if text.trim().is_empty() {
        return Ok(Vec::new());
    }
    let v: Value = serde_json::from_str(text)?;
    let arr = v
        .as_array()
        .ok_or_else(|| anyhow::anyhow!("`ip -j addr` output is not an array"))?;
    Ok(arr
        .iter()
        .filter_map(|i| {
            let name = i.get("ifname")?.as_str()?.to_string();
            let kind = i
                .get("linkinfo")
                .and_then(|l| l.get("info_kind"))
                .and_then(Value::as_str)
                .map(String::from);
            let addrs = i
                .get("addr_info")
                .and_then(Value::as_array)
                .map(|a| {
                    a.iter()
                        .filter_map(|x| {
                            let local = x.get("local")?.as_str()?;
                            let len = x.get("prefixlen").and_then(Value::as_u64).unwrap_or(0);
                            Some(format!("{local}/{len}"))
                        })
                        .collect()
                })
                .unwrap_or_default();
            Some(Iface { name, kind, addrs })
        })
        .collect())
}

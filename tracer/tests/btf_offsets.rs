//! Checks every `KernelOffsets` field resolved from the running kernel's BTF against an
//! independent oracle:
//! - member offsets: `pahole -C STRUCT /sys/kernel/btf/vmlinux`, whose text layout is parsed
//!   here (no code shared with `src/btf.rs`);
//! - enum values: `bpftool btf dump file /sys/kernel/btf/vmlinux format raw`.
//!
//! Reading `/sys/kernel/btf/vmlinux` needs no root. The file and both tools are required:
//! a missing one fails the test (`cargo xtask setup` installs the tools).

use std::{
    collections::HashMap,
    env,
    path::{Path, PathBuf},
    process::Command,
};

use tracer::{btf, offsets};
use tracer_common::{KernelOffsets, OFFSET_NONE};

const VMLINUX: &str = "/sys/kernel/btf/vmlinux";

/// Where the test expects each field to live on the kernels our machines run (6.x);
/// alternatives are for older layouts. Written independently of `offsets::TABLE`.
enum Oracle {
    /// `struct.path` alternatives, the first pahole knows is used.
    Member(&'static [&'static str]),
    /// `(enum, VARIANT)`.
    Enum(&'static str, &'static str),
}

struct Expect {
    name: &'static str,
    get: fn(&KernelOffsets) -> u32,
    oracle: Oracle,
}

macro_rules! m {
    ($f:ident, $($p:literal),+) => {
        Expect { name: stringify!($f), get: |o| o.$f, oracle: Oracle::Member(&[$($p),+]) }
    };
}
macro_rules! e {
    ($f:ident, $en:literal, $v:literal) => {
        Expect {
            name: stringify!($f),
            get: |o| o.$f,
            oracle: Oracle::Enum($en, $v),
        }
    };
}

fn expectations() -> Vec<Expect> {
    vec![
        m!(skb_head, "sk_buff.head"),
        m!(skb_len, "sk_buff.len"),
        m!(skb_network_header, "sk_buff.network_header"),
        m!(skb_transport_header, "sk_buff.transport_header"),
        m!(skb_protocol, "sk_buff.protocol"),
        m!(skb_nfct, "sk_buff._nfct"),
        m!(skb_dev, "sk_buff.dev"),
        m!(skb_sk, "sk_buff.sk"),
        m!(dev_nd_net, "net_device.nd_net.net"),
        m!(dev_ifindex, "net_device.ifindex"),
        m!(net_inum, "net.ns.inum"),
        m!(ct_status, "nf_conn.status"),
        m!(ct_tuple_orig, "nf_conn.tuplehash[0].tuple"),
        m!(ct_tuple_reply, "nf_conn.tuplehash[1].tuple"),
        m!(ct_net, "nf_conn.ct_net.net"),
        m!(tuplehash_tuple, "nf_conntrack_tuple_hash.tuple"),
        m!(tuple_src_u3, "nf_conntrack_tuple.src.u3"),
        m!(tuple_src_port, "nf_conntrack_tuple.src.u.all"),
        m!(tuple_src_l3num, "nf_conntrack_tuple.src.l3num"),
        m!(tuple_dst_u3, "nf_conntrack_tuple.dst.u3"),
        m!(tuple_dst_port, "nf_conntrack_tuple.dst.u.all"),
        m!(tuple_dst_protonum, "nf_conntrack_tuple.dst.protonum"),
        m!(task_nsproxy, "task_struct.nsproxy"),
        m!(task_pid, "task_struct.pid"),
        m!(task_tgid, "task_struct.tgid"),
        m!(task_comm, "task_struct.comm"),
        m!(nsproxy_net_ns, "nsproxy.net_ns"),
        m!(sk_net, "sock.__sk_common.skc_net.net"),
        m!(sk_cookie, "sock.__sk_common.skc_cookie"),
        m!(sk_family, "sock.__sk_common.skc_family"),
        m!(sk_daddr, "sock.__sk_common.skc_daddr"),
        m!(sk_rcv_saddr, "sock.__sk_common.skc_rcv_saddr"),
        m!(sk_dport, "sock.__sk_common.skc_dport"),
        m!(sk_num, "sock.__sk_common.skc_num"),
        m!(sk_v6_daddr, "sock.__sk_common.skc_v6_daddr"),
        m!(sk_v6_rcv_saddr, "sock.__sk_common.skc_v6_rcv_saddr"),
        m!(msg_name, "msghdr.msg_name"),
        m!(msg_iter, "msghdr.msg_iter"),
        m!(iter_type, "iov_iter.iter_type"),
        m!(iter_ubuf, "iov_iter.ubuf"),
        m!(iter_iov, "iov_iter.__iov", "iov_iter.iov"),
        m!(iter_count, "iov_iter.count"),
        m!(iter_offset, "iov_iter.iov_offset"),
        e!(iter_type_ubuf, "iter_type", "ITER_UBUF"),
        e!(iter_type_iovec, "iter_type", "ITER_IOVEC"),
        e!(
            drop_reason_netfilter,
            "skb_drop_reason",
            "SKB_DROP_REASON_NETFILTER_DROP"
        ),
    ]
}

// ---------------------------------------------------------------------------------------
// Tools

fn find_tool(name: &str, package: &str) -> PathBuf {
    let mut dirs: Vec<PathBuf> = env::var_os("PATH")
        .map(|p| env::split_paths(&p).collect())
        .unwrap_or_default();
    // bpftool lives in sbin, which a non-root PATH often lacks.
    dirs.extend(["/usr/local/sbin", "/usr/sbin", "/sbin"].map(PathBuf::from));
    dirs.into_iter()
        .map(|d| d.join(name))
        .find(|p| p.is_file())
        .unwrap_or_else(|| {
            panic!(
                "`{name}` not found in PATH, /usr/local/sbin, /usr/sbin or /sbin; this test needs \
                 it as an oracle. Run `cargo xtask setup` to install it (Debian/Ubuntu package \
                 `{package}`)."
            )
        })
}

fn vmlinux() -> &'static Path {
    let p = Path::new(VMLINUX);
    assert!(
        p.exists(),
        "{VMLINUX} is missing: this test needs a kernel built with CONFIG_DEBUG_INFO_BTF=y"
    );
    p
}

fn run(tool: &Path, args: &[&str]) -> String {
    let out = Command::new(tool)
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("running {} {args:?}: {e}", tool.display()));
    assert!(
        out.status.success(),
        "{} {args:?} failed: {}",
        tool.display(),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).expect("tool output is UTF-8")
}

// ---------------------------------------------------------------------------------------
// pahole oracle
//
// `pahole -C T` prints T's members with `/* offset size */` comments (bitfields:
// `/* byte: bit size */`). Members of anonymous struct/union types (whether the member
// itself is anonymous, like `union { ... };`, or named, like `struct { ... } dst;`) are
// expanded inline and their offsets are absolute, i.e. relative to T. Members of named
// types (`struct sock_common __sk_common;`) are not expanded: their type is printed with
// another `pahole -C` and its offsets are added to the member's.

#[derive(Debug)]
struct PNode {
    /// `None` for an anonymous member (`union { ... };`).
    name: Option<String>,
    /// Declared type text, e.g. `struct sock_common`, `possible_net_t`, `struct sock *`.
    ty: String,
    offset: u64,
    size: u64,
    /// Array dimensions, e.g. `[2]` in `tuplehash[2]`.
    dims: Vec<u64>,
    /// Inline-expanded members (anonymous struct/union type).
    children: Option<Vec<PNode>>,
}

fn strip_attributes(s: &str) -> String {
    let mut s = s.to_string();
    while let Some(start) = s.find("__attribute__") {
        // Skip to the matching close of `((...))`.
        let mut depth = 0i32;
        let mut end = s.len();
        for (i, c) in s[start..].char_indices() {
            match c {
                '(' => depth += 1,
                ')' => {
                    depth -= 1;
                    if depth == 0 {
                        end = start + i + 1;
                        break;
                    }
                }
                _ => {}
            }
        }
        s.replace_range(start..end, "");
    }
    s
}

/// `/* 16 8 */`, `/* 126: 0  1 */` or `/* 1256:16  4 */` (bitfields: byte, then bit) ->
/// (offset, size).
fn parse_comment(line: &str) -> Option<(u64, u64)> {
    let start = line.find("/*")?;
    let end = line[start..].find("*/")? + start;
    let toks: Vec<&str> = line[start + 2..end].split_whitespace().collect();
    if toks.len() < 2 {
        return None;
    }
    let off = toks[0].split(':').next()?.parse().ok()?;
    let size = toks[toks.len() - 1].parse().ok()?;
    Some((off, size))
}

/// `name[2][3]` -> ("name", [2, 3]); also strips a bitfield width.
fn split_dims(decl: &str) -> (String, Vec<u64>) {
    let decl = match decl.rfind(':') {
        Some(i) if decl[i + 1..].trim().bytes().all(|b| b.is_ascii_digit()) => &decl[..i],
        _ => decl,
    };
    let mut s = decl.trim_end().to_string();
    let mut dims = Vec::new();
    while s.ends_with(']') {
        let open = s.rfind('[').expect("unbalanced [");
        dims.insert(0, s[open + 1..s.len() - 1].trim().parse().unwrap_or(0));
        s.truncate(open);
        s = s.trim_end().to_string();
    }
    (s, dims)
}

fn parse_pahole(text: &str) -> Vec<PNode> {
    // Stack of open containers: (type text, children).
    let mut stack: Vec<(String, Vec<PNode>)> = Vec::new();
    for raw in text.lines() {
        let line = strip_attributes(raw);
        let line = line.trim();
        if line.is_empty() || line.starts_with("/*") {
            continue;
        }
        let code = match line.find("/*") {
            Some(i) => line[..i].trim(),
            None => line,
        };
        if let Some(head) = code.strip_suffix('{') {
            stack.push((head.trim().to_string(), Vec::new()));
            continue;
        }
        if let Some(rest) = code.strip_prefix('}') {
            let (ty, children) = stack.pop().expect("unbalanced } in pahole output");
            if stack.is_empty() {
                return children;
            }
            let (offset, size) = parse_comment(line)
                .unwrap_or_else(|| panic!("no offset comment on pahole line {raw:?}"));
            let (name, dims) = split_dims(rest.trim().trim_end_matches(';'));
            let name = name.trim();
            stack.last_mut().unwrap().1.push(PNode {
                name: (!name.is_empty()).then(|| name.to_string()),
                ty,
                offset,
                size,
                dims,
                children: Some(children),
            });
            continue;
        }
        let Some((offset, size)) = parse_comment(line) else {
            continue;
        };
        let decl = code.trim_end_matches(';').trim();
        let (ty, name, dims) = if let Some(i) = decl.find("(*") {
            // Function pointer: `void (*name)(args)`.
            let close = decl[i..].find(')').unwrap() + i;
            (
                decl.to_string(),
                decl[i + 2..close].trim().to_string(),
                Vec::new(),
            )
        } else {
            let (d, dims) = split_dims(decl);
            let cut = d
                .rfind(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
                .map_or(0, |i| i + 1);
            (d[..cut].trim().to_string(), d[cut..].to_string(), dims)
        };
        stack
            .last_mut()
            .expect("member outside a struct in pahole output")
            .1
            .push(PNode {
                name: Some(name),
                ty,
                offset,
                size,
                dims,
                children: None,
            });
    }
    panic!("pahole output ended inside a struct:\n{text}")
}

struct Pahole {
    tool: PathBuf,
    cache: HashMap<String, Vec<PNode>>,
}

impl Pahole {
    fn layout(&mut self, ty: &str) -> &[PNode] {
        if !self.cache.contains_key(ty) {
            let out = run(&self.tool, &["-C", ty, VMLINUX]);
            assert!(!out.trim().is_empty(), "pahole knows no type `{ty}`");
            self.cache.insert(ty.to_string(), parse_pahole(&out));
        }
        &self.cache[ty]
    }

    /// (absolute offset, size) of `path` in `strukt`, or None when pahole has no such member.
    fn member(&mut self, strukt: &str, path: &str) -> Option<(u64, u64)> {
        let mut ty = strukt.to_string();
        let mut base = 0u64;
        // Index path into inline-expanded children of the current pahole printout.
        let mut inline: Vec<usize> = Vec::new();
        let comps: Vec<&str> = path.split('.').collect();
        for (n, comp) in comps.iter().enumerate() {
            let (name, idx) = match comp.split_once('[') {
                Some((nm, rest)) => (nm, Some(rest.trim_end_matches(']').parse::<u64>().unwrap())),
                None => (*comp, None),
            };
            let mut nodes = self.layout(&ty);
            for &i in &inline {
                nodes = nodes[i].children.as_deref().unwrap();
            }
            let mut found = find_pnode(nodes, name)?;
            // Turn the found path (through anonymous containers) into a node.
            let mut node = &nodes[found[0]];
            for &i in &found[1..] {
                node = &node.children.as_ref().unwrap()[i];
            }
            let mut off = base + node.offset;
            let mut size = node.size;
            if let Some(i) = idx {
                assert_eq!(
                    node.dims.len(),
                    1,
                    "{strukt}.{path}: {name} is not a 1-d array"
                );
                size = node.size / node.dims[0];
                off += i * size;
            }
            if n + 1 == comps.len() {
                return Some((off, size));
            }
            if node.children.is_some() {
                // Inline type: offsets inside are already relative to `ty`'s printout.
                assert!(idx.is_none() || idx == Some(0), "index into inline array");
                inline.append(&mut found);
            } else {
                let t = node.ty.as_str();
                assert!(
                    !t.ends_with('*'),
                    "{strukt}.{path}: can not descend through a pointer"
                );
                let t = t
                    .split_whitespace()
                    .filter(|w| !matches!(*w, "struct" | "union" | "const" | "volatile"))
                    .collect::<Vec<_>>()
                    .join(" ");
                ty = t;
                base = off;
                inline.clear();
            }
        }
        unreachable!()
    }
}

/// Finds member `name`, looking through anonymous members; returns child indices.
fn find_pnode(nodes: &[PNode], name: &str) -> Option<Vec<usize>> {
    for (i, n) in nodes.iter().enumerate() {
        match (&n.name, &n.children) {
            (Some(nm), _) if nm == name => return Some(vec![i]),
            (None, Some(children)) => {
                if let Some(mut rest) = find_pnode(children, name) {
                    rest.insert(0, i);
                    return Some(rest);
                }
            }
            _ => {}
        }
    }
    None
}

// ---------------------------------------------------------------------------------------
// bpftool oracle for enums: `[12205] ENUM 'skb_drop_reason' encoding=UNSIGNED size=4 vlen=130`
// followed by `\t'SKB_DROP_REASON_NOT_SPECIFIED' val=2` lines (same for ENUM64).

fn bpftool_enums(tool: &Path) -> HashMap<(String, String), i128> {
    let text = run(tool, &["btf", "dump", "file", VMLINUX, "format", "raw"]);
    let mut out = HashMap::new();
    let mut current: Option<String> = None;
    for line in text.lines() {
        if line.starts_with('[') {
            current = None;
            let mut words = line.split_whitespace().skip(1);
            if matches!(words.next(), Some("ENUM" | "ENUM64")) {
                if let Some(name) = words.next() {
                    current = Some(name.trim_matches('\'').to_string());
                }
            }
        } else if let (Some(e), Some(rest)) = (&current, line.strip_prefix('\t')) {
            let mut words = rest.split_whitespace();
            let (Some(v), Some(val)) = (words.next(), words.next()) else {
                continue;
            };
            let val: i128 = val
                .strip_prefix("val=")
                // ENUM64 values carry a C suffix: `val=1ULL`, `val=-1LL`.
                .map(|x| x.trim_end_matches(['U', 'L']))
                .and_then(|x| x.parse().ok())
                .unwrap_or_else(|| panic!("unparsed bpftool enum line {line:?}"));
            out.entry((e.clone(), v.trim_matches('\'').to_string()))
                .or_insert(val);
        }
    }
    out
}

// ---------------------------------------------------------------------------------------

#[test]
fn pahole_parser_reads_anonymous_and_bitfield_members() {
    let sample = "struct x {
	u8                         a;                    /*     0     1 */
	unsigned char              b:4;                  /*     1: 0  1 */
	union {
		struct {
			void *     p;            /*     8     8 */
		};                                       /*     8     8 */
		void       (*fn)(struct x *); /*     8     8 */
	};                                               /*     8     8 */
	struct {
		u16        q;                /*    16     2 */
	} named;                                         /*    16     2 */
	struct nf_conntrack_tuple_hash tuplehash[2] __attribute__((__aligned__(8))); /*    24   112 */
	enum {
		RTNL_LINK_INITIALIZED = 0,
		RTNL_LINK_INITIALIZING = 1,
	} state:16;                                      /*   136:16  4 */

	/* size: 144, cachelines: 3, members: 6 */
};
";
    let nodes = parse_pahole(sample);
    assert_eq!(nodes.len(), 6);
    assert_eq!(nodes[1].name.as_deref(), Some("b"));
    assert_eq!((nodes[1].offset, nodes[1].size), (1, 1));
    let p = find_pnode(&nodes, "p").unwrap();
    assert_eq!(p, vec![2, 0, 0]);
    assert_eq!(find_pnode(&nodes, "fn").unwrap(), vec![2, 1]);
    assert_eq!(find_pnode(&nodes, "q"), None, "q is inside a named member");
    assert_eq!(nodes[3].children.as_ref().unwrap()[0].offset, 16);
    let th = &nodes[4];
    assert_eq!(th.name.as_deref(), Some("tuplehash"));
    assert_eq!(th.ty, "struct nf_conntrack_tuple_hash");
    assert_eq!(
        (th.offset, th.size, th.dims.as_slice()),
        (24, 112, &[2u64][..])
    );
    // A bitfield of an inline enum type (6.1's `net_device.rtnl_link_state`): byte 136.
    let state = &nodes[5];
    assert_eq!(state.name.as_deref(), Some("state"));
    assert_eq!((state.offset, state.size), (136, 4));
}

#[test]
fn every_offset_matches_pahole_and_bpftool() {
    let vmlinux = vmlinux();
    let mut pahole = Pahole {
        tool: find_tool("pahole", "dwarves"),
        cache: HashMap::new(),
    };
    let bpftool = find_tool("bpftool", "bpftool");
    let enums = bpftool_enums(&bpftool);

    let kbtf = btf::KernelBtf::from_file(vmlinux).expect("parse vmlinux BTF");
    let resolved = offsets::resolve(&kbtf);
    println!("{}", resolved.report_table());

    // No field may be missing on this kernel, including any the table forgot.
    let words: [u32; std::mem::size_of::<KernelOffsets>() / 4] =
        // SAFETY: KernelOffsets is #[repr(C)] of u32s only, without padding.
        unsafe { std::mem::transmute_copy(&resolved.offsets) };
    let expects = expectations();
    assert_eq!(
        expects.len(),
        words.len() - 1,
        "KernelOffsets gained or lost a field: update this test's expectations"
    );
    for (i, w) in words[..words.len() - 1].iter().enumerate() {
        assert_ne!(
            *w, OFFSET_NONE,
            "KernelOffsets word {i} ({}) unresolved",
            expects[i].name
        );
    }
    let mut report_names: Vec<_> = resolved.fields.iter().map(|f| f.name).collect();
    let mut expect_names: Vec<_> = expects.iter().map(|e| e.name).collect();
    report_names.sort_unstable();
    expect_names.sort_unstable();
    assert_eq!(
        report_names, expect_names,
        "resolver table and test disagree on the fields"
    );

    let mut failures = Vec::new();
    for e in &expects {
        let got = (e.get)(&resolved.offsets);
        let report = resolved.field(e.name).unwrap();
        if got == OFFSET_NONE {
            failures.push(format!("{}: missing ({:?})", e.name, report.error));
            continue;
        }
        if report.resolved.as_ref().map(|r| r.1) != Some(got) {
            failures.push(format!(
                "{}: report {:?} != struct value {got}",
                e.name, report.resolved
            ));
        }
        match &e.oracle {
            Oracle::Member(alts) => {
                let hit = alts.iter().find_map(|a| {
                    let (s, p) = a.split_once('.').unwrap();
                    pahole.member(s, p).map(|r| (*a, s, p, r))
                });
                let Some((alt, s, p, (off, size))) = hit else {
                    failures.push(format!("{}: pahole knows none of {alts:?}", e.name));
                    continue;
                };
                if u64::from(got) != off {
                    failures.push(format!(
                        "{}: resolved {got} (via {:?}), pahole says {alt} is at {off}",
                        e.name, report.resolved
                    ));
                }
                // The wrapper's size for the same path must agree too.
                match kbtf.member(s, p) {
                    Ok(m) if u64::from(m.size) == size && u64::from(m.byte_offset) == off => {}
                    other => failures.push(format!(
                        "{}: KernelBtf::member({s}, {p}) = {other:?}, pahole says offset {off} size {size}",
                        e.name
                    )),
                }
            }
            Oracle::Enum(en, v) => {
                match enums.get(&(en.to_string(), v.to_string())) {
                    Some(&want) if want == i128::from(got) => {}
                    other => failures.push(format!(
                        "{}: resolved {got}, bpftool says {en}::{v} = {other:?}",
                        e.name
                    )),
                }
                match kbtf.enum_value(en, v) {
                    Ok(x) if i128::from(x) == i128::from(got) => {}
                    other => failures.push(format!("{}: enum_value = {other:?}", e.name)),
                }
            }
        }
    }
    assert!(failures.is_empty(), "mismatches:\n{}", failures.join("\n"));
}

//! A small typed view of the running kernel's BTF (`/sys/kernel/btf/vmlinux`), built on
//! `btf-rs`: member offsets by dotted path, enum values, function presence, type sizes.
//!
//! Rust eBPF objects carry no CO-RE relocations, so the loader asks this module where the
//! fields the programs read live in this kernel (see [`crate::offsets`]).

use std::path::{Path, PathBuf};

use btf_rs::{Btf, Type};

/// Default location of the kernel's own BTF.
pub const VMLINUX_BTF: &str = "/sys/kernel/btf/vmlinux";

/// Typedef/modifier chains and anonymous nesting longer than this are treated as broken BTF.
const MAX_DEPTH: usize = 64;

#[derive(Debug, thiserror::Error)]
pub enum BtfError {
    #[error(
        "kernel BTF not found at {}: the kernel must be built with CONFIG_DEBUG_INFO_BTF=y",
        path.display()
    )]
    Missing { path: PathBuf },
    #[error("can not read kernel BTF {}: {source}", path.display())]
    Load {
        path: PathBuf,
        #[source]
        source: btf_rs::Error,
    },
    #[error("invalid member path `{path}`: {reason}")]
    BadPath { path: String, reason: &'static str },
    #[error("no type `{name}` in kernel BTF")]
    TypeNotFound { name: String },
    #[error("`{name}` is a {kind}, not a struct or union")]
    NotComposite { name: String, kind: &'static str },
    #[error("`{strukt}.{path}`: {container} has no member `{component}`")]
    MemberNotFound {
        strukt: String,
        path: String,
        /// The failing path component.
        component: String,
        /// The type searched, e.g. `struct sock_common`.
        container: String,
    },
    #[error("`{strukt}.{path}`: `{component}` is a {kind}, can not descend into it")]
    NotDescendable {
        strukt: String,
        path: String,
        component: String,
        kind: &'static str,
    },
    #[error("`{strukt}.{path}`: `{component}` is a {kind}, not an array")]
    NotAnArray {
        strukt: String,
        path: String,
        component: String,
        kind: &'static str,
    },
    #[error("`{strukt}.{path}`: index {index} out of bounds for `{component}` ({len} elements)")]
    IndexOutOfBounds {
        strukt: String,
        path: String,
        component: String,
        index: u32,
        len: u32,
    },
    #[error("`{strukt}.{path}`: bitfield at bit offset {bit_offset} is not byte aligned")]
    UnalignedBitfield {
        strukt: String,
        path: String,
        bit_offset: u64,
    },
    #[error("`{strukt}.{path}`: offset does not fit in 32 bits")]
    Overflow { strukt: String, path: String },
    #[error("can not size type: {what}")]
    Unsized { what: String },
    #[error("no enum `{name}` in kernel BTF")]
    EnumNotFound { name: String },
    #[error("enum `{enum_name}` has no variant `{variant}`")]
    VariantNotFound { enum_name: String, variant: String },
    #[error("type chain too deep (loop?) while resolving `{what}`")]
    TooDeep { what: String },
    #[error("BTF lookup failed: {0}")]
    Btf(#[from] btf_rs::Error),
}

/// Where a member lives inside the outermost struct.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Member {
    /// Byte offset from the start of the outermost struct.
    pub byte_offset: u32,
    /// Size in bytes of the member's type (for a byte-aligned bitfield: the bytes its bits
    /// span).
    pub size: u32,
    /// The member is a (byte-aligned) bitfield.
    pub bitfield: bool,
}

/// One `name[i][j]` element of a dotted member path.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct PathComponent {
    pub(crate) name: String,
    pub(crate) indices: Vec<u32>,
}

/// Splits `a.b[1].c` into components. Names are C identifiers; indices are decimal.
pub(crate) fn parse_path(path: &str) -> Result<Vec<PathComponent>, BtfError> {
    let bad = |reason| BtfError::BadPath {
        path: path.to_string(),
        reason,
    };
    if path.is_empty() {
        return Err(bad("empty path"));
    }
    let mut out = Vec::new();
    for part in path.split('.') {
        let (name, mut rest) = match part.find('[') {
            Some(i) => part.split_at(i),
            None => (part, ""),
        };
        if name.is_empty() {
            return Err(bad("empty member name"));
        }
        let mut chars = name.chars();
        let first_ok = chars
            .next()
            .is_some_and(|c| c.is_ascii_alphabetic() || c == '_');
        if !first_ok || !chars.all(|c| c.is_ascii_alphanumeric() || c == '_') {
            return Err(bad("member names must be C identifiers"));
        }
        let mut indices = Vec::new();
        while !rest.is_empty() {
            let Some(inner) = rest.strip_prefix('[') else {
                return Err(bad("unexpected text after `]`"));
            };
            let Some(close) = inner.find(']') else {
                return Err(bad("unclosed `[`"));
            };
            let digits = &inner[..close];
            if digits.is_empty() || !digits.bytes().all(|b| b.is_ascii_digit()) {
                return Err(bad("array index must be a decimal number"));
            }
            indices.push(digits.parse().map_err(|_| bad("array index too large"))?);
            rest = &inner[close + 1..];
        }
        out.push(PathComponent {
            name: name.to_string(),
            indices,
        });
    }
    Ok(out)
}

/// The kernel's BTF, parsed once.
pub struct KernelBtf {
    btf: Btf,
    path: PathBuf,
    ptr_size: u32,
}

impl std::fmt::Debug for KernelBtf {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("KernelBtf")
            .field("path", &self.path)
            .finish()
    }
}

impl KernelBtf {
    /// Parses the vmlinux BTF at `path` (normally [`VMLINUX_BTF`]).
    pub fn from_file(path: &Path) -> Result<Self, BtfError> {
        if !path.exists() {
            return Err(BtfError::Missing {
                path: path.to_path_buf(),
            });
        }
        let btf = Btf::from_file(path).map_err(|source| BtfError::Load {
            path: path.to_path_buf(),
            source,
        })?;
        let mut kb = Self {
            btf,
            path: path.to_path_buf(),
            ptr_size: 8,
        };
        // Pointers are as wide as `long` in the kernel.
        if let Ok(n) = kb.type_size("long unsigned int") {
            kb.ptr_size = n;
        }
        Ok(kb)
    }

    /// The file this BTF was read from.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The BTF id of function `name` in a module's BTF (`/sys/kernel/btf/<module>`), which
    /// is split on this one: its ids follow vmlinux's, as the kernel numbers them.
    pub fn module_function(&self, module_btf: &Path, name: &str) -> Result<u32, BtfError> {
        let load = |source| BtfError::Load {
            path: module_btf.to_path_buf(),
            source,
        };
        let btf = Btf::from_split_file(module_btf, &self.btf).map_err(load)?;
        btf.resolve_ids_by_name(name)
            .unwrap_or_default()
            .into_iter()
            .find(|&id| matches!(btf.resolve_type_by_id(id), Ok(Type::Func(_))))
            .ok_or_else(|| BtfError::TypeNotFound {
                name: format!("{name} (function, in {})", module_btf.display()),
            })
    }

    /// Offset and size of `path` (dotted, e.g. `__sk_common.skc_daddr`, `tuplehash[1].tuple`)
    /// inside struct or union `strukt`. Anonymous struct/union members are searched
    /// transparently; typedefs and qualifiers are followed.
    pub fn member(&self, strukt: &str, path: &str) -> Result<Member, BtfError> {
        let comps = parse_path(path)?;
        let mut container = self.composite(strukt)?;
        let mut container_desc = format!("{} {strukt}", self.composite_kind(strukt));
        let mut bits: u64 = 0;

        for (i, comp) in comps.iter().enumerate() {
            let Some((rel_bits, m)) = self.find_member(&container, &comp.name, 0)? else {
                return Err(BtfError::MemberNotFound {
                    strukt: strukt.to_string(),
                    path: path.to_string(),
                    component: comp.name.clone(),
                    container: container_desc,
                });
            };
            bits += rel_bits;
            let bitfield_bits = m.bitfield_size().filter(|&b| b > 0);
            let mut ty = self.strip(self.btf.resolve_chained_type(&m)?, &comp.name)?;

            for &index in &comp.indices {
                let Type::Array(arr) = &ty else {
                    return Err(BtfError::NotAnArray {
                        strukt: strukt.to_string(),
                        path: path.to_string(),
                        component: comp.name.clone(),
                        kind: ty.name(),
                    });
                };
                let len = u32::try_from(arr.len()).unwrap_or(u32::MAX);
                // A zero-length (flexible) array has no bound to check.
                if len != 0 && index >= len {
                    return Err(BtfError::IndexOutOfBounds {
                        strukt: strukt.to_string(),
                        path: path.to_string(),
                        component: comp.name.clone(),
                        index,
                        len,
                    });
                }
                let elem = self.strip(self.btf.resolve_chained_type(arr)?, &comp.name)?;
                bits += u64::from(index) * u64::from(self.size_of(&elem, &comp.name)?) * 8;
                ty = elem;
            }

            let last = i + 1 == comps.len();
            if last {
                if !bits.is_multiple_of(8) {
                    return Err(BtfError::UnalignedBitfield {
                        strukt: strukt.to_string(),
                        path: path.to_string(),
                        bit_offset: bits,
                    });
                }
                let byte_offset = u32::try_from(bits / 8).map_err(|_| BtfError::Overflow {
                    strukt: strukt.to_string(),
                    path: path.to_string(),
                })?;
                let size = match bitfield_bits {
                    Some(b) => b.div_ceil(8),
                    None => self.size_of(&ty, &comp.name)?,
                };
                return Ok(Member {
                    byte_offset,
                    size,
                    bitfield: bitfield_bits.is_some(),
                });
            }

            match ty {
                Type::Struct(s) | Type::Union(s) if bitfield_bits.is_none() => {
                    container_desc = format!("type of `{}`", comp.name);
                    container = s;
                }
                other => {
                    return Err(BtfError::NotDescendable {
                        strukt: strukt.to_string(),
                        path: path.to_string(),
                        component: comp.name.clone(),
                        kind: other.name(),
                    })
                }
            }
        }
        unreachable!("parse_path never returns an empty path")
    }

    /// Value of `variant` in `enum enum_name` (BTF `ENUM` or `ENUM64`).
    pub fn enum_value(&self, enum_name: &str, variant: &str) -> Result<i64, BtfError> {
        let mut found_enum = false;
        for ty in self.btf.resolve_types_by_name(enum_name)? {
            let ty = match ty {
                Type::Typedef(_) => self.strip(ty, enum_name)?,
                other => other,
            };
            match ty {
                Type::Enum(e) => {
                    found_enum = true;
                    for m in &e.members {
                        if self.btf.resolve_name(m)? == variant {
                            let v = m.val();
                            return Ok(if e.is_signed() {
                                i64::from(v as i32)
                            } else {
                                i64::from(v)
                            });
                        }
                    }
                }
                Type::Enum64(e) => {
                    found_enum = true;
                    for m in &e.members {
                        if self.btf.resolve_name(m)? == variant {
                            // Unsigned values above i64::MAX wrap; no kernel enum we read has one.
                            return Ok(m.val() as i64);
                        }
                    }
                }
                _ => {}
            }
        }
        if found_enum {
            Err(BtfError::VariantNotFound {
                enum_name: enum_name.to_string(),
                variant: variant.to_string(),
            })
        } else {
            Err(BtfError::EnumNotFound {
                name: enum_name.to_string(),
            })
        }
    }

    /// Whether vmlinux BTF has a `FUNC` named `name` (i.e. it can be an fentry/fexit target).
    pub fn has_function(&self, name: &str) -> bool {
        self.btf
            .resolve_types_by_name(name)
            .is_ok_and(|tys| tys.iter().any(|t| matches!(t, Type::Func(_))))
    }

    /// `sizeof` the named type (struct, union, typedef, enum, int, float).
    pub fn type_size(&self, name: &str) -> Result<u32, BtfError> {
        for ty in self.btf.resolve_types_by_name(name)? {
            if matches!(
                ty,
                Type::Struct(_)
                    | Type::Union(_)
                    | Type::Typedef(_)
                    | Type::Int(_)
                    | Type::Enum(_)
                    | Type::Enum64(_)
                    | Type::Float(_)
            ) {
                return self.size_of(&ty, name);
            }
        }
        Err(BtfError::TypeNotFound {
            name: name.to_string(),
        })
    }

    /// The struct or union named `name` (a typedef to one also works).
    fn composite(&self, name: &str) -> Result<btf_rs::Struct, BtfError> {
        let mut other_kind = None;
        for ty in self.btf.resolve_types_by_name(name)? {
            match ty {
                Type::Struct(s) | Type::Union(s) => return Ok(s),
                Type::Typedef(_) => match self.strip(ty, name)? {
                    Type::Struct(s) | Type::Union(s) => return Ok(s),
                    other => other_kind = Some(other.name()),
                },
                other => other_kind = other_kind.or(Some(other.name())),
            }
        }
        match other_kind {
            Some(kind) => Err(BtfError::NotComposite {
                name: name.to_string(),
                kind,
            }),
            None => Err(BtfError::TypeNotFound {
                name: name.to_string(),
            }),
        }
    }

    /// "struct" or "union", for messages.
    fn composite_kind(&self, name: &str) -> &'static str {
        let tys = self.btf.resolve_types_by_name(name).unwrap_or_default();
        if tys.iter().any(|t| matches!(t, Type::Struct(_))) {
            "struct"
        } else if tys.iter().any(|t| matches!(t, Type::Union(_))) {
            "union"
        } else {
            "type"
        }
    }

    /// Finds member `name` in `s`, looking through anonymous struct/union members.
    /// Returns its bit offset relative to `s`.
    fn find_member(
        &self,
        s: &btf_rs::Struct,
        name: &str,
        depth: usize,
    ) -> Result<Option<(u64, btf_rs::Member)>, BtfError> {
        if depth > MAX_DEPTH {
            return Err(BtfError::TooDeep {
                what: name.to_string(),
            });
        }
        for m in &s.members {
            let m_name = self.btf.resolve_name(m)?;
            if m_name == name {
                return Ok(Some((u64::from(m.bit_offset()), m.clone())));
            }
            if m_name.is_empty() {
                if let Type::Struct(inner) | Type::Union(inner) =
                    self.strip(self.btf.resolve_chained_type(m)?, name)?
                {
                    if let Some((off, found)) = self.find_member(&inner, name, depth + 1)? {
                        return Ok(Some((u64::from(m.bit_offset()) + off, found)));
                    }
                }
            }
        }
        Ok(None)
    }

    /// Follows typedef, const, volatile, restrict and type tags to the underlying type.
    fn strip(&self, mut ty: Type, what: &str) -> Result<Type, BtfError> {
        for _ in 0..MAX_DEPTH {
            ty = match &ty {
                Type::Typedef(t) => self.btf.resolve_chained_type(t)?,
                Type::Const(t) | Type::Volatile(t) | Type::Restrict(t) => {
                    self.btf.resolve_chained_type(t)?
                }
                Type::TypeTag(t) => self.btf.resolve_chained_type(t)?,
                _ => return Ok(ty),
            };
        }
        Err(BtfError::TooDeep {
            what: what.to_string(),
        })
    }

    fn size_of(&self, ty: &Type, what: &str) -> Result<u32, BtfError> {
        let size = match self.strip(ty.clone(), what)? {
            Type::Int(t) => t.size(),
            Type::Struct(t) | Type::Union(t) => t.size(),
            Type::Enum(t) => t.size(),
            Type::Enum64(t) => t.size(),
            Type::Float(t) => t.size(),
            Type::Ptr(_) => return Ok(self.ptr_size),
            Type::Array(a) => {
                let elem = self.btf.resolve_chained_type(&a)?;
                let n = u32::try_from(a.len()).ok();
                let s = self.size_of(&elem, what)?;
                return n
                    .and_then(|n| n.checked_mul(s))
                    .ok_or_else(|| BtfError::Unsized {
                        what: format!("array `{what}` is too large"),
                    });
            }
            other => {
                return Err(BtfError::Unsized {
                    what: format!("`{what}` is a {}", other.name()),
                })
            }
        };
        u32::try_from(size).map_err(|_| BtfError::Unsized {
            what: format!("`{what}` is too large"),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn comp(name: &str, indices: &[u32]) -> PathComponent {
        PathComponent {
            name: name.to_string(),
            indices: indices.to_vec(),
        }
    }

    #[test]
    fn parses_plain_and_dotted_paths() {
        assert_eq!(parse_path("_nfct").unwrap(), vec![comp("_nfct", &[])]);
        assert_eq!(
            parse_path("__sk_common.skc_daddr").unwrap(),
            vec![comp("__sk_common", &[]), comp("skc_daddr", &[])]
        );
        assert_eq!(
            parse_path("tuplehash[1].tuple").unwrap(),
            vec![comp("tuplehash", &[1]), comp("tuple", &[])]
        );
        assert_eq!(parse_path("a[2][30]").unwrap(), vec![comp("a", &[2, 30])]);
    }

    #[test]
    fn rejects_malformed_paths() {
        for bad in [
            "",
            ".",
            "a.",
            ".a",
            "a..b",
            "a[",
            "a[]",
            "a[x]",
            "a[1]b",
            "a]",
            "1a",
            "a-b",
            "a[-1]",
            "a [1]",
            "[0]",
            "a[99999999999]",
        ] {
            assert!(
                matches!(parse_path(bad), Err(BtfError::BadPath { .. })),
                "{bad:?} accepted"
            );
        }
    }

    #[test]
    fn missing_file_says_config_debug_info_btf() {
        let err = KernelBtf::from_file(Path::new("/nonexistent/btf/vmlinux")).unwrap_err();
        assert!(matches!(err, BtfError::Missing { .. }));
        let msg = err.to_string();
        assert!(msg.contains("CONFIG_DEBUG_INFO_BTF=y"), "{msg}");
        assert!(msg.contains("/nonexistent/btf/vmlinux"), "{msg}");
    }

    /// Checks against the running kernel's BTF, which the tracer needs and every machine
    /// that builds and tests it has (docs/design.md); layouts are not asserted here
    /// (tests/btf_offsets.rs does that against pahole), only the walking rules.
    #[test]
    fn walks_running_kernel_btf() {
        let path = Path::new(VMLINUX_BTF);
        assert!(
            path.exists(),
            "{VMLINUX_BTF} absent: the tracer needs a kernel with CONFIG_DEBUG_INFO_BTF=y"
        );
        let btf = KernelBtf::from_file(path).unwrap();

        // Array indexing: element 1 is one element size after element 0.
        let t0 = btf.member("nf_conn", "tuplehash[0].tuple").unwrap();
        let t1 = btf.member("nf_conn", "tuplehash[1].tuple").unwrap();
        let elem = btf.type_size("nf_conntrack_tuple_hash").unwrap();
        assert_eq!(t1.byte_offset - t0.byte_offset, elem);
        assert_eq!(t0.size, btf.type_size("nf_conntrack_tuple").unwrap());
        assert!(matches!(
            btf.member("nf_conn", "tuplehash[2]"),
            Err(BtfError::IndexOutOfBounds {
                index: 2,
                len: 2,
                ..
            })
        ));
        assert!(matches!(
            btf.member("nf_conn", "status[0]"),
            Err(BtfError::NotAnArray { .. })
        ));

        // Anonymous unions and a named nested struct, through a typedef (possible_net_t).
        let daddr = btf.member("sock", "__sk_common.skc_daddr").unwrap();
        let common = btf.member("sock", "__sk_common").unwrap();
        let direct = btf.member("sock_common", "skc_daddr").unwrap();
        assert_eq!(daddr.byte_offset, common.byte_offset + direct.byte_offset);
        assert_eq!(daddr.size, 4);
        let net = btf.member("net_device", "nd_net.net").unwrap();
        assert_eq!(net.size, btf.type_size("long unsigned int").unwrap());

        // Errors name the struct and the component.
        let err = btf.member("sock", "__sk_common.no_such_field").unwrap_err();
        let msg = err.to_string();
        assert!(
            msg.contains("sock") && msg.contains("no_such_field"),
            "{msg}"
        );
        assert!(matches!(
            btf.member("no_such_struct_xyz", "a"),
            Err(BtfError::TypeNotFound { .. })
        ));
        assert!(matches!(
            btf.member("sock", "__sk_common.skc_daddr.x"),
            Err(BtfError::NotDescendable { .. })
        ));

        // A byte-aligned bitfield is fine; one that is not is an error. (sock_common has
        // `unsigned char skc_reuse:4; skc_reuseport:1;` on 5.10 .. 6.18.)
        if let Ok(m) = btf.member("sock_common", "skc_reuse") {
            assert!(m.bitfield);
            assert_eq!(m.size, 1);
            assert!(matches!(
                btf.member("sock_common", "skc_reuseport"),
                Err(BtfError::UnalignedBitfield { .. })
            ));
        }

        assert!(btf.has_function("udp_sendmsg"));
        assert!(!btf.has_function("sk_buff"));
        assert!(!btf.has_function("no_such_function_xyz"));

        assert!(btf.enum_value("iter_type", "ITER_IOVEC").is_ok());
        assert!(matches!(
            btf.enum_value("iter_type", "NO_SUCH_VARIANT"),
            Err(BtfError::VariantNotFound { .. })
        ));
        assert!(matches!(
            btf.enum_value("no_such_enum_xyz", "X"),
            Err(BtfError::EnumNotFound { .. })
        ));
        assert_eq!(btf.type_size("sk_buff").unwrap() % 8, 0);
    }
}

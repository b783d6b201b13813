//! Kernel text addresses -> `symbol+0xoff`, from `/proc/kallsyms`, read lazily or up front
//! with [`Symbols::load`] (parsing takes most of a second in a debug build, which a drop must
//! not wait for while its network namespace may be going away), and read again when the
//! kernel's modules changed: a module loaded after the tracer started (`nf_tables` at the
//! first nft rule) has text no earlier table knows, and its drops must not be named after
//! whichever symbol happened to lie below them. Resolved addresses are cached; only an
//! address not seen before compares the module list (`/proc/modules`, next to kallsyms).
//! Clones share the table. A replay has no kallsyms: its names are the ones the recording
//! kept ([`Symbols::known`]).

use std::{
    collections::HashMap,
    path::PathBuf,
    sync::{Arc, Mutex, RwLock},
};

#[derive(Clone)]
pub struct Symbols {
    path: PathBuf,
    table: Arc<Mutex<Option<Table>>>,
    /// Names given by address (a replay); `None`: read kallsyms.
    known: Option<Arc<RwLock<HashMap<u64, String>>>>,
}

/// One reading of kallsyms.
struct Table {
    syms: Vec<(u64, String)>,
    /// The module list (names and load addresses) the table was read with.
    modules: String,
    /// Addresses already resolved against `syms`.
    resolved: HashMap<u64, String>,
}

impl Symbols {
    pub fn new(path: impl Into<PathBuf>) -> Self {
        Symbols {
            path: path.into(),
            table: Arc::new(Mutex::new(None)),
            known: None,
        }
    }

    /// Resolves from `names` only (filled by whoever holds it); unknown addresses print as
    /// hex.
    pub fn known(names: Arc<RwLock<HashMap<u64, String>>>) -> Self {
        Symbols {
            path: PathBuf::new(),
            table: Arc::new(Mutex::new(None)),
            known: Some(names),
        }
    }

    /// Reads the table now.
    pub fn load(&self) {
        let mut t = self.table.lock().unwrap_or_else(|e| e.into_inner());
        if t.is_none() {
            *t = Some(self.read(self.modules()));
        }
    }

    /// Names and load addresses of the loaded modules (not their use counts, which change
    /// with every rule); empty when the list can not be read.
    fn modules(&self) -> String {
        let text = std::fs::read_to_string(self.path.with_file_name("modules")).unwrap_or_default();
        let mut out = String::with_capacity(text.len() / 2);
        for l in text.lines() {
            let f: Vec<&str> = l.split_whitespace().collect();
            out += f.first().copied().unwrap_or("");
            out += f.get(5).copied().unwrap_or("");
            out.push('\n');
        }
        out
    }

    fn read(&self, modules: String) -> Table {
        Table {
            syms: Self::parse(&std::fs::read_to_string(&self.path).unwrap_or_default()),
            modules,
            resolved: HashMap::new(),
        }
    }

    /// Parses kallsyms text: `ADDR TYPE NAME [MODULE]`; keeps text symbols with a real address.
    pub fn parse(text: &str) -> Vec<(u64, String)> {
        let mut v: Vec<(u64, String)> = text
            .lines()
            .filter_map(|l| {
                let mut it = l.split_whitespace();
                let addr = u64::from_str_radix(it.next()?, 16).ok()?;
                let ty = it.next()?;
                let name = it.next()?;
                (addr != 0 && matches!(ty, "t" | "T")).then(|| (addr, name.to_string()))
            })
            .collect();
        v.sort_unstable();
        v
    }

    pub fn resolve(&self, addr: u64) -> String {
        if let Some(names) = &self.known {
            let names = names.read().unwrap_or_else(|e| e.into_inner());
            return names
                .get(&addr)
                .cloned()
                .unwrap_or_else(|| format!("{addr:#x}"));
        }
        let mut guard = self.table.lock().unwrap_or_else(|e| e.into_inner());
        let t = match guard.as_mut() {
            Some(t) => {
                if let Some(name) = t.resolved.get(&addr) {
                    return name.clone();
                }
                let modules = self.modules();
                if modules != t.modules {
                    log::debug!("the kernel's modules changed: reading kallsyms again");
                    *t = self.read(modules);
                }
                t
            }
            None => guard.insert(self.read(self.modules())),
        };
        let name = match t.syms.partition_point(|(a, _)| *a <= addr) {
            0 => format!("{addr:#x}"),
            i => {
                let (base, name) = &t.syms[i - 1];
                format!("{name}+{:#x}", addr - base)
            }
        };
        t.resolved.insert(addr, name.clone());
        name
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn resolves_nearest_lower_symbol() {
        let dir = std::env::temp_dir().join(format!("kallsyms-test-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let kallsyms = dir.join("kallsyms");
        std::fs::write(
            &kallsyms,
            "ffffffff81000000 T _stext\nffffffff81000100 t nf_hook_slow\n0000000000000000 T hidden\n",
        )
        .unwrap();
        std::fs::write(
            dir.join("modules"),
            "nf_conntrack 188416 1 - Live 0xffffffffc0a00000\n",
        )
        .unwrap();
        let s = Symbols::new(&kallsyms);
        assert_eq!(s.resolve(0xffffffff81000106), "nf_hook_slow+0x6");
        assert_eq!(s.resolve(0x10), "0x10");

        // A module loaded after the first reading: its text resolves once the module list
        // says so, and not to the symbol that lay below it before.
        let late = 0xffffffffc0b00010;
        assert_eq!(s.resolve(late), "nf_hook_slow+0x3fafff10");
        std::fs::write(
            &kallsyms,
            "ffffffff81000000 T _stext\nffffffff81000100 t nf_hook_slow\nffffffffc0b00000 t nft_do_chain\t[nf_tables]\n",
        )
        .unwrap();
        std::fs::write(
            dir.join("modules"),
            "nf_conntrack 188416 2 - Live 0xffffffffc0a00000\nnf_tables 307200 0 - Live 0xffffffffc0b00000\n",
        )
        .unwrap();
        assert_eq!(s.resolve(late + 4), "nft_do_chain+0x14");
        // The cache was read again with the table: the old name of `late` is gone.
        assert_eq!(s.resolve(late), "nft_do_chain+0x10");
        // A use count that changes is not a new module list: no new reading.
        std::fs::write(
            dir.join("modules"),
            "nf_conntrack 188416 7 - Live 0xffffffffc0a00000\nnf_tables 307200 3 - Live 0xffffffffc0b00000\n",
        )
        .unwrap();
        std::fs::write(&kallsyms, "").unwrap();
        assert_eq!(s.resolve(late + 8), "nft_do_chain+0x18");
        std::fs::remove_dir_all(&dir).unwrap();
    }
}

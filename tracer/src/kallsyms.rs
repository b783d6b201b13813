//! Kernel text addresses -> `symbol+0xoff`, from `/proc/kallsyms`, read once (lazily, or
//! up front with [`Symbols::load`]: parsing takes most of a second in a debug build, which a
//! drop must not wait for while its network namespace may be going away). Clones share the
//! table. A replay has no kallsyms: its names are the ones the recording kept
//! ([`Symbols::known`]).

use std::{
    collections::HashMap,
    path::PathBuf,
    sync::{Arc, OnceLock, RwLock},
};

#[derive(Clone)]
pub struct Symbols {
    path: PathBuf,
    table: Arc<OnceLock<Vec<(u64, String)>>>,
    /// Names given by address (a replay); `None`: read kallsyms.
    known: Option<Arc<RwLock<HashMap<u64, String>>>>,
}

impl Symbols {
    pub fn new(path: impl Into<PathBuf>) -> Self {
        Symbols {
            path: path.into(),
            table: Arc::new(OnceLock::new()),
            known: None,
        }
    }

    /// Resolves from `names` only (filled by whoever holds it); unknown addresses print as
    /// hex.
    pub fn known(names: Arc<RwLock<HashMap<u64, String>>>) -> Self {
        Symbols {
            path: PathBuf::new(),
            table: Arc::new(OnceLock::new()),
            known: Some(names),
        }
    }

    /// Reads the table now.
    pub fn load(&self) {
        self.table();
    }

    fn table(&self) -> &Vec<(u64, String)> {
        self.table
            .get_or_init(|| Self::parse(&std::fs::read_to_string(&self.path).unwrap_or_default()))
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
        let table = self.table();
        match table.partition_point(|(a, _)| *a <= addr) {
            0 => format!("{addr:#x}"),
            i => {
                let (base, name) = &table[i - 1];
                format!("{name}+{:#x}", addr - base)
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn resolves_nearest_lower_symbol() {
        let s = Symbols::new("/nonexistent");
        s.table
            .set(Symbols::parse("ffffffff81000000 T _stext\nffffffff81000100 t nf_hook_slow\n0000000000000000 T hidden\n"))
            .unwrap();
        assert_eq!(s.resolve(0xffffffff81000106), "nf_hook_slow+0x6");
        assert_eq!(s.resolve(0x10), "0x10");
    }
}

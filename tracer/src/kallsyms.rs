//! Kernel text addresses -> `symbol+0xoff`, from `/proc/kallsyms`, read once (lazily, or
//! up front with [`Symbols::load`]: parsing takes most of a second in a debug build, which a
//! drop must not wait for while its network namespace may be going away). Clones share the
//! table.

use std::{
    path::PathBuf,
    sync::{Arc, OnceLock},
};

#[derive(Clone)]
pub struct Symbols {
    path: PathBuf,
    table: Arc<OnceLock<Vec<(u64, String)>>>,
}

impl Symbols {
    pub fn new(path: impl Into<PathBuf>) -> Self {
        Symbols {
            path: path.into(),
            table: Arc::new(OnceLock::new()),
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

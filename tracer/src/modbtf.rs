//! fentry/fexit on functions that live in a kernel module.
//!
//! `nf_conntrack` is a module on most distributions' kernels (Debian's among them), so
//! `__nf_conntrack_confirm` and `nf_ct_resolve_clash` are described by the module's own
//! BTF (`/sys/kernel/btf/nf_conntrack`, split on vmlinux's), not by vmlinux's. The kernel
//! attaches a tracing program to such a function when the load names the module's BTF
//! object (`attach_btf_obj_fd`) and the function's id in it. aya 0.14 only attaches to
//! vmlinux functions (aya-rs/aya#301), so this module loads those programs itself:
//!
//! 1. right after aya created the maps, [`ModulePrograms::prepare`] keeps a duplicate of
//!    each map's fd (aya-log takes its map out of the object later);
//! 2. the first [`ModulePrograms::attach`] parses the same object with `aya-obj` and
//!    relocates its map references and calls against those fds, which gives each tracing
//!    program's final instructions (on a kernel without module functions this never runs);
//! 3. each attach finds the function's id in the module's BTF (parsed split on the
//!    kernel's) and the module's BTF object (walking the kernel's BTF ids), then
//!    `BPF_PROG_LOAD`s with both and attaches with `BPF_RAW_TRACEPOINT_OPEN`.
//!
//! Programs loaded here are not in the `Ebpf` object; they stay attached as long as the
//! `ModulePrograms` lives (it holds their program and link fds).

use std::{
    cell::{OnceCell, RefCell},
    collections::{BTreeMap, HashSet},
    ffi::CString,
    fmt, fs, io, mem,
    os::fd::{AsFd as _, AsRawFd as _, FromRawFd as _, OwnedFd},
    path::Path,
};

use aya::{
    maps::{Map, MapData},
    Ebpf,
};

use crate::btf::KernelBtf;
use aya_obj::{
    generated::{bpf_attach_type, bpf_attr, bpf_btf_info, bpf_cmd, bpf_insn, bpf_prog_type},
    Object, ProgramSection,
};

/// Why a module function could not be traced: the stage, the errno if the kernel refused,
/// and what to tell the user. The `io::Error` is kept as the source so the plan's errno
/// lookup finds it.
#[derive(Debug)]
pub struct ModuleError {
    pub stage: &'static str,
    what: String,
    io: Option<io::Error>,
}

impl ModuleError {
    fn new(stage: &'static str, what: impl Into<String>) -> Self {
        ModuleError {
            stage,
            what: what.into(),
            io: None,
        }
    }

    fn os(stage: &'static str, what: impl Into<String>, io: io::Error) -> Self {
        ModuleError {
            stage,
            what: what.into(),
            io: Some(io),
        }
    }
}

impl fmt::Display for ModuleError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.what)
    }
}

impl std::error::Error for ModuleError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        self.io.as_ref().map(|e| e as _)
    }
}

/// A tracing program's relocated instructions.
struct Prepared {
    insns: Vec<bpf_insn>,
    license: CString,
    exit: bool,
}

/// A program loaded and attached to a module function.
struct Attached {
    _prog: OwnedFd,
    _link: OwnedFd,
}

pub struct ModulePrograms {
    object: &'static [u8],
    /// Every map of the object by name, as aya created it (duplicated fds).
    maps: Result<Vec<(String, OwnedFd)>, String>,
    prepared: OnceCell<Result<BTreeMap<String, Prepared>, String>>,
    /// The functions the plan may trace, and (once `/proc/kallsyms` was read) the module
    /// each lives in.
    functions: Vec<&'static str>,
    owners: OnceCell<BTreeMap<String, String>>,
    attached: RefCell<BTreeMap<String, Attached>>,
}

impl ModulePrograms {
    /// Keeps the maps aya created for `object` in `ebpf`, to relocate the object's tracing
    /// programs against when a module function is asked for. Call before any map is taken
    /// out of `ebpf`. A failure is kept and reported then. `functions`: every function an
    /// fentry/fexit program of the plan attaches to.
    pub fn prepare(object: &'static [u8], ebpf: &Ebpf, functions: Vec<&'static str>) -> Self {
        let maps = ebpf
            .maps()
            .map(|(name, map)| {
                let fd = map_data(map).fd().as_fd().try_clone_to_owned();
                fd.map(|fd| (name.to_string(), fd))
                    .map_err(|e| format!("duplicating the fd of map {name}: {e}"))
            })
            .collect();
        ModulePrograms {
            object,
            maps,
            prepared: OnceCell::new(),
            functions,
            owners: OnceCell::new(),
            attached: RefCell::new(BTreeMap::new()),
        }
    }

    /// The module `function` (one of those given to [`Self::prepare`]) lives in (`None`:
    /// vmlinux, or not in this kernel at all). `/proc/kallsyms` is read once.
    pub fn module_for(&self, function: &str) -> Option<String> {
        self.owners
            .get_or_init(|| {
                let text = fs::read_to_string("/proc/kallsyms").unwrap_or_default();
                self.functions
                    .iter()
                    .filter_map(|f| Some((f.to_string(), module_of(&text, f)?)))
                    .collect()
            })
            .get(function)
            .cloned()
    }

    /// Loads `program` (an fentry or fexit program of the object) against `function` in
    /// `module`, whose BTF is split on `kernel`'s, and attaches it.
    pub fn attach(
        &self,
        program: &str,
        function: &str,
        module: &str,
        kernel: &KernelBtf,
    ) -> Result<(), ModuleError> {
        let prepared = self
            .prepared
            .get_or_init(|| {
                let maps = self.maps.as_ref().map_err(String::clone)?;
                let start = std::time::Instant::now();
                let r = relocate(self.object, maps);
                log::debug!("module programs relocated in {:?}", start.elapsed());
                r
            })
            .as_ref()
            .map_err(|e| ModuleError::new("object", format!("relocating the object: {e}")))?;
        let prog = prepared.get(program).ok_or_else(|| {
            ModuleError::new(
                "object",
                format!("{program} is not a tracing program of the object"),
            )
        })?;
        let path = Path::new("/sys/kernel/btf").join(module);
        let btf_id = kernel.module_function(&path, function).map_err(|e| {
            ModuleError::new(
                "btf",
                format!(
                    "{e} (module BTF needs CONFIG_DEBUG_INFO_BTF_MODULES, and the kernel's own \
                     BTF as its base)"
                ),
            )
        })?;
        let btf_obj = module_btf_fd(module)?;
        let fd = prog_load(program, prog, btf_id, &btf_obj)?;
        let link = raw_tracepoint_open(&fd)?;
        self.attached.borrow_mut().insert(
            program.to_string(),
            Attached {
                _prog: fd,
                _link: link,
            },
        );
        Ok(())
    }

    /// Detaches and unloads `program` if it was attached here; `false` if it was not.
    pub fn detach(&self, program: &str) -> bool {
        self.attached.borrow_mut().remove(program).is_some()
    }
}

/// The module `function` lives in, from `/proc/kallsyms` (`ADDR t NAME [MODULE]`); `None`
/// for a vmlinux function or one the kernel does not have.
pub fn module_of(kallsyms: &str, function: &str) -> Option<String> {
    kallsyms.lines().find_map(|l| {
        let mut it = l.split_whitespace();
        let (_addr, ty, name, module) = (it.next()?, it.next()?, it.next()?, it.next()?);
        (name == function && matches!(ty, "t" | "T"))
            .then(|| {
                module
                    .strip_prefix('[')?
                    .strip_suffix(']')
                    .map(str::to_string)
            })
            .flatten()
    })
}

fn relocate(
    object: &[u8],
    maps: &[(String, OwnedFd)],
) -> Result<BTreeMap<String, Prepared>, String> {
    let mut obj = Object::parse(object).map_err(|e| format!("parsing: {e}"))?;
    // The same maps aya created, by name; the data sections aya skipped on kernels without
    // global data are skipped here too (their references then fail to relocate, as in aya).
    let fds: BTreeMap<&str, i32> = maps
        .iter()
        .map(|(name, fd)| (name.as_str(), fd.as_raw_fd()))
        .collect();
    let objs: Vec<(String, i32, aya_obj::Map)> = obj
        .maps
        .iter()
        .filter_map(|(name, m)| Some((name.clone(), *fds.get(name.as_str())?, m.clone())))
        .collect();
    let text: HashSet<usize> = obj.functions.keys().map(|(section, _)| *section).collect();
    obj.relocate_maps(objs.iter().map(|(n, fd, m)| (n.as_str(), *fd, m)), &text)
        .map_err(|e| format!("map relocation: {e}"))?;
    obj.relocate_calls(&text)
        .map_err(|e| format!("call relocation: {e}"))?;
    obj.sanitize_functions(aya::features());
    let mut out = BTreeMap::new();
    for (name, prog) in &obj.programs {
        let exit = match prog.section {
            ProgramSection::FEntry { .. } => false,
            ProgramSection::FExit { .. } => true,
            _ => continue,
        };
        let Some(function) = obj.functions.get(&prog.function_key()) else {
            continue;
        };
        out.insert(
            name.clone(),
            Prepared {
                insns: function.instructions.clone(),
                license: prog.license.clone(),
                exit,
            },
        );
    }
    Ok(out)
}

fn map_data(map: &Map) -> &MapData {
    match map {
        Map::Array(d)
        | Map::ArrayOfMaps(d)
        | Map::BloomFilter(d)
        | Map::CgroupArray(d)
        | Map::CgroupStorage(d)
        | Map::CgrpStorage(d)
        | Map::CpuMap(d)
        | Map::DevMap(d)
        | Map::DevMapHash(d)
        | Map::HashMap(d)
        | Map::HashOfMaps(d)
        | Map::InodeStorage(d)
        | Map::LpmTrie(d)
        | Map::LruHashMap(d)
        | Map::PerCpuArray(d)
        | Map::PerCpuCgroupStorage(d)
        | Map::PerCpuHashMap(d)
        | Map::PerCpuLruHashMap(d)
        | Map::PerfEventArray(d)
        | Map::ProgramArray(d)
        | Map::Queue(d)
        | Map::ReusePortSockArray(d)
        | Map::RingBuf(d)
        | Map::SockHash(d)
        | Map::SockMap(d)
        | Map::SkStorage(d)
        | Map::Stack(d)
        | Map::StackTraceMap(d)
        | Map::Unsupported(d)
        | Map::XskMap(d) => d,
    }
}

/// `bpf(2)`; a non-negative result is returned as is.
fn sys_bpf(cmd: bpf_cmd, attr: &mut bpf_attr) -> io::Result<i64> {
    // SAFETY: `attr` is a valid, zero-initialised-then-filled `bpf_attr` that outlives the
    // call; every pointer inside it points at memory that also outlives the call.
    let r = unsafe {
        libc::syscall(
            libc::SYS_bpf,
            cmd as libc::c_int,
            attr as *mut bpf_attr,
            mem::size_of::<bpf_attr>(),
        )
    };
    if r < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(r)
    }
}

fn zeroed_attr() -> bpf_attr {
    // SAFETY: `bpf_attr` is a plain C union of integers; all-zero is its documented
    // "unused" value.
    unsafe { mem::zeroed() }
}

fn owned(fd: i64) -> OwnedFd {
    // SAFETY: the kernel just returned this fd to us and nothing else owns it.
    unsafe { OwnedFd::from_raw_fd(fd as i32) }
}

/// The kernel's BTF object of `module`: walks the BTF ids and asks each for its name.
fn module_btf_fd(module: &str) -> Result<OwnedFd, ModuleError> {
    let mut id = 0u32;
    loop {
        let mut attr = zeroed_attr();
        attr.__bindgen_anon_6.__bindgen_anon_1.start_id = id;
        match sys_bpf(bpf_cmd::BPF_BTF_GET_NEXT_ID, &mut attr) {
            Ok(_) => {}
            Err(e) if e.raw_os_error() == Some(libc::ENOENT) => {
                return Err(ModuleError::new(
                    "btf",
                    format!("the kernel has no BTF object named {module}"),
                ))
            }
            Err(e) => {
                return Err(ModuleError::os(
                    "btf",
                    "walking the kernel's BTF objects",
                    e,
                ))
            }
        }
        // SAFETY: the kernel filled `next_id` of the union member it was asked about.
        id = unsafe { attr.__bindgen_anon_6.next_id };
        let mut attr = zeroed_attr();
        attr.__bindgen_anon_6.__bindgen_anon_1.btf_id = id;
        let fd = match sys_bpf(bpf_cmd::BPF_BTF_GET_FD_BY_ID, &mut attr) {
            Ok(fd) => owned(fd),
            // Unloaded between the two calls.
            Err(e) if e.raw_os_error() == Some(libc::ENOENT) => continue,
            Err(e) => {
                return Err(ModuleError::os(
                    "btf",
                    format!("opening BTF object {id}"),
                    e,
                ))
            }
        };
        let mut name = [0u8; 64];
        // SAFETY: `bpf_btf_info` is plain integers.
        let mut info: bpf_btf_info = unsafe { mem::zeroed() };
        info.name = name.as_mut_ptr() as u64;
        info.name_len = name.len() as u32;
        let mut attr = zeroed_attr();
        attr.info.bpf_fd = fd.as_raw_fd() as u32;
        attr.info.info_len = mem::size_of::<bpf_btf_info>() as u32;
        attr.info.info = &mut info as *mut bpf_btf_info as u64;
        sys_bpf(bpf_cmd::BPF_OBJ_GET_INFO_BY_FD, &mut attr)
            .map_err(|e| ModuleError::os("btf", format!("reading BTF object {id}"), e))?;
        let len = name.iter().position(|&b| b == 0).unwrap_or(name.len());
        if info.kernel_btf != 0 && &name[..len] == module.as_bytes() {
            return Ok(fd);
        }
    }
}

fn prog_load(
    name: &str,
    prog: &Prepared,
    btf_id: u32,
    btf_obj: &OwnedFd,
) -> Result<OwnedFd, ModuleError> {
    let load = |log: &mut [u8]| {
        let mut attr = zeroed_attr();
        // SAFETY: writing plain integer fields of the PROG_LOAD member.
        let u = unsafe { &mut attr.__bindgen_anon_3 };
        u.prog_type = bpf_prog_type::BPF_PROG_TYPE_TRACING as u32;
        u.expected_attach_type = if prog.exit {
            bpf_attach_type::BPF_TRACE_FEXIT
        } else {
            bpf_attach_type::BPF_TRACE_FENTRY
        } as u32;
        u.insns = prog.insns.as_ptr() as u64;
        u.insn_cnt = prog.insns.len() as u32;
        u.license = prog.license.as_ptr() as u64;
        u.attach_btf_id = btf_id;
        u.__bindgen_anon_1.attach_btf_obj_fd = btf_obj.as_raw_fd() as u32;
        for (d, s) in u.prog_name.iter_mut().zip(name.bytes().take(15)) {
            *d = s as libc::c_char;
        }
        if !log.is_empty() {
            u.log_level = 1;
            u.log_buf = log.as_mut_ptr() as u64;
            u.log_size = log.len() as u32;
        }
        sys_bpf(bpf_cmd::BPF_PROG_LOAD, &mut attr)
    };
    match load(&mut []) {
        Ok(fd) => Ok(owned(fd)),
        Err(e) => {
            // Again with the verifier's log, for the report (its end says why).
            let mut log = vec![0u8; 1 << 20];
            let _ = load(&mut log);
            let end = log.iter().position(|&b| b == 0).unwrap_or(0);
            let text = String::from_utf8_lossy(&log[..end]);
            let tail: String = text
                .lines()
                .rev()
                .take(8)
                .collect::<Vec<_>>()
                .into_iter()
                .rev()
                .collect::<Vec<_>>()
                .join("; ");
            Err(ModuleError::os(
                "load",
                if tail.is_empty() {
                    format!("BPF_PROG_LOAD of {name} against module BTF")
                } else {
                    format!("BPF_PROG_LOAD of {name} against module BTF: verifier: {tail}")
                },
                e,
            ))
        }
    }
}

fn raw_tracepoint_open(prog: &OwnedFd) -> Result<OwnedFd, ModuleError> {
    let mut attr = zeroed_attr();
    attr.raw_tracepoint.name = 0;
    attr.raw_tracepoint.prog_fd = prog.as_raw_fd() as u32;
    sys_bpf(bpf_cmd::BPF_RAW_TRACEPOINT_OPEN, &mut attr)
        .map(owned)
        .map_err(|e| ModuleError::os("attach", "attaching through the BPF trampoline", e))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn module_of_names_the_owning_module_of_a_text_symbol() {
        let text = "ffffffff81000000 T _stext\n\
                    ffffffffc0a01230 t __nf_conntrack_confirm\t[nf_conntrack]\n\
                    ffffffffc0a05670 t nf_ct_resolve_clash\t[nf_conntrack]\n\
                    ffffffffc0b00000 d nf_ct_data\t[nf_conntrack]\n\
                    ffffffff81234560 T udp_sendmsg\n";
        assert_eq!(
            module_of(text, "nf_ct_resolve_clash").as_deref(),
            Some("nf_conntrack")
        );
        assert_eq!(module_of(text, "udp_sendmsg"), None, "vmlinux function");
        assert_eq!(module_of(text, "nf_ct_data"), None, "not text");
        assert_eq!(module_of(text, "missing"), None);
    }
}

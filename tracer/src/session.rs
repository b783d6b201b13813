//! A loaded tracer: preflight, BTF offsets, the eBPF object with its globals and port set,
//! the kernel log forwarder, and the applied probe plan.

use std::{
    fs::File,
    path::{Path, PathBuf},
};

use anyhow::Context as _;
use aya::{
    maps::{Array, MapData, PerCpuArray, RingBuf},
    Btf, Ebpf, EbpfLoader,
};
use tracer_common::{EventKind, PORT_WORDS};

use crate::{btf::KernelBtf, modbtf, offsets, plan, preflight};

/// The eBPF object built by `build.rs` from `tracer-ebpf`.
static OBJECT: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/tracer"));

/// The ring buffer's size when `--ring-size` is not given: 16 MiB, about 64k small DNS
/// records (docs/design.md, "Loss accounting").
pub const DEFAULT_RING_SIZE: u32 = 16 << 20;

#[derive(Debug, Clone)]
pub struct Options {
    pub ports: Vec<u16>,
    pub btf_path: PathBuf,
    pub cgroup: Option<PathBuf>,
    /// Try every source of every signal (for `tracer probes`).
    pub try_all: bool,
    /// Kinds of program the plan must not use.
    pub skip: Vec<plan::Skip>,
    /// Bytes of the `EVENTS` ring buffer: a power-of-two multiple of the page size
    /// (`cli::parse_ring_size` checks it).
    pub ring_size: u32,
}

impl Default for Options {
    /// Port 53, the running kernel's BTF, the cgroup2 mount, the default plan and ring.
    fn default() -> Self {
        Options {
            ports: vec![53],
            btf_path: PathBuf::from(crate::btf::VMLINUX_BTF),
            cgroup: None,
            try_all: false,
            skip: Vec::new(),
            ring_size: DEFAULT_RING_SIZE,
        }
    }
}

pub struct Session {
    pub ebpf: Ebpf,
    pub plan: plan::PlanReport,
    pub offsets: offsets::Resolved,
    pub logger: Option<aya_log::EbpfLogger<&'static dyn log::Log>>,
    /// Programs attached to module functions (outside `ebpf`; attached while this lives).
    pub modules: modbtf::ModulePrograms,
}

/// One bit per port, as the kernel's `PORTS` map holds them.
pub fn port_words(ports: &[u16]) -> Vec<u64> {
    let mut words = vec![0u64; PORT_WORDS as usize];
    for &p in ports {
        words[usize::from(p >> 6)] |= 1u64 << (p & 63);
    }
    words
}

impl Session {
    pub fn start(opts: &Options) -> anyhow::Result<Self> {
        preflight::check_privileges()?;
        preflight::check_btf(&opts.btf_path)?;
        let cgroup_path = preflight::cgroup_root(opts.cgroup.as_deref())?;
        preflight::ensure_tracefs()?;
        bump_memlock_rlimit();

        let t0 = std::time::Instant::now();
        let kbtf = KernelBtf::from_file(&opts.btf_path)?;
        let offsets = offsets::resolve(&kbtf);
        let t_offsets = t0.elapsed();
        for f in offsets.missing() {
            log::debug!(
                "offset {} unresolved: {}",
                f.name,
                f.error.as_deref().unwrap_or("?")
            );
        }
        let btf = Btf::parse_file(&opts.btf_path, aya::Endianness::default())
            .with_context(|| format!("parsing BTF {}", opts.btf_path.display()))?;
        let mut ebpf = EbpfLoader::new()
            .btf(Some(&btf))
            .override_global("OFFSETS", &offsets.offsets, true)
            .map_max_entries("EVENTS", opts.ring_size)
            .load(OBJECT)
            .with_context(|| {
                format!(
                    "loading the eBPF object (maps and globals; a {} ring buffer)",
                    ring_size_text(opts.ring_size)
                )
            })?;
        let t_object = t0.elapsed();

        let mut ports: Array<&mut MapData, u64> =
            Array::try_from(ebpf.map_mut("PORTS").context("PORTS map missing")?)?;
        for (i, w) in port_words(&opts.ports).into_iter().enumerate() {
            if w != 0 {
                ports.set(i as u32, w, 0).context("writing the port set")?;
            }
        }

        // Before the logger takes its map: the relocation needs every map's fd.
        let modules = modbtf::ModulePrograms::prepare(OBJECT, &ebpf, plan::tracing_functions());

        let logger = match aya_log::EbpfLogger::init(&mut ebpf) {
            Ok(l) => Some(l),
            Err(e) => {
                log::debug!("no kernel-side log: {e}");
                None
            }
        };

        let cgroup_root = File::open(&cgroup_path)
            .with_context(|| format!("opening cgroup {}", cgroup_path.display()))?;
        let target = plan::Target {
            btf: &btf,
            cgroup_root: &cgroup_root,
            modules: &modules,
            kernel_btf: &kbtf,
            skip: &opts.skip,
        };
        let plan = plan::apply(&mut ebpf, &target, &offsets, opts.try_all);
        log::debug!(
            "started: BTF offsets after {t_offsets:?}, object and maps after {t_object:?}, \
             probe plan applied after {:?}",
            t0.elapsed()
        );
        Ok(Session {
            ebpf,
            plan,
            offsets,
            logger,
            modules,
        })
    }

    /// The ring buffer every record arrives through (once: the map moves out of the object).
    pub fn take_events(&mut self) -> anyhow::Result<RingBuf<MapData>> {
        let map = self.ebpf.take_map("EVENTS").context("EVENTS map missing")?;
        Ok(RingBuf::try_from(map)?)
    }

    /// Ring-buffer reservation failures per CPU, summed over record kinds.
    pub fn lost_per_cpu(&self) -> anyhow::Result<Vec<u64>> {
        let lost: PerCpuArray<&MapData, u64> =
            PerCpuArray::try_from(self.ebpf.map("LOST").context("LOST map missing")?)?;
        let mut per_cpu: Vec<u64> = Vec::new();
        for kind in [
            EventKind::DnsSend,
            EventKind::DnsRecv,
            EventKind::NfDrop,
            EventKind::CtClash,
        ] {
            let values = lost.get(&(kind as u32), 0)?;
            if per_cpu.len() < values.len() {
                per_cpu.resize(values.len(), 0);
            }
            for (cpu, v) in values.iter().enumerate() {
                per_cpu[cpu] += v;
            }
        }
        Ok(per_cpu)
    }
}

/// Loads the object and attaches only its programs that do nothing (`floor_*`), where the
/// DNS programs attach: fentry on `udp_sendmsg` and `skb_consume_udp` where the kernel
/// allows it, else cgroup_skb egress and ingress on the cgroup v2 root; and tp_btf
/// `kfree_skb`. For `cargo xtask bench-filter` to measure ours against. Attached while
/// the returned object lives.
pub fn attach_floor(cgroup: Option<&Path>) -> anyhow::Result<Ebpf> {
    use std::os::fd::AsFd as _;

    use aya::programs::{BtfTracePoint, CgroupAttachMode, CgroupSkb, CgroupSkbAttachType, FEntry};

    preflight::check_privileges()?;
    let root = File::open(preflight::cgroup_root(cgroup)?).context("opening the cgroup root")?;
    bump_memlock_rlimit();
    let btf = Btf::from_sys_fs().context("reading the kernel's BTF")?;
    let mut ebpf = EbpfLoader::new()
        .btf(Some(&btf))
        .map_max_entries("EVENTS", 4096)
        .load(OBJECT)
        .context("loading the eBPF object")?;
    let fentry = |ebpf: &mut Ebpf, name: &str, function: &str| -> anyhow::Result<()> {
        let p: &mut FEntry = ebpf.program_mut(name).context("missing")?.try_into()?;
        p.load(function, &btf)?;
        p.attach()?;
        Ok(())
    };
    let precise = fentry(&mut ebpf, "floor_udp_sendmsg", "udp_sendmsg")
        .and_then(|()| fentry(&mut ebpf, "floor_skb_consume_udp", "skb_consume_udp"));
    if let Err(e) = precise {
        log::debug!("no fentry floor ({e:#}): the cgroup_skb one");
        for (name, ty) in [
            ("floor_egress", CgroupSkbAttachType::Egress),
            ("floor_ingress", CgroupSkbAttachType::Ingress),
        ] {
            let p: &mut CgroupSkb = ebpf
                .program_mut(name)
                .with_context(|| format!("{name} missing from the object"))?
                .try_into()?;
            p.load().with_context(|| format!("loading {name}"))?;
            p.attach(root.as_fd(), ty, CgroupAttachMode::Single)
                .with_context(|| format!("attaching {name}"))?;
        }
    }
    let p: &mut BtfTracePoint = ebpf
        .program_mut("floor_kfree_skb")
        .context("floor_kfree_skb missing from the object")?
        .try_into()?;
    p.load("kfree_skb", &btf)
        .context("loading floor_kfree_skb")?;
    p.attach().context("attaching floor_kfree_skb")?;
    Ok(ebpf)
}

/// The names of every program and every map in the embedded eBPF object, whichever the
/// plan attaches on this kernel (fentry, fexit, kprobes, tp_btf, cgroup_skb, tracepoints):
/// what the privileged tests look for in `bpftool prog/map show` after a run (the kernel
/// keeps the first 15 bytes of a name; bpftool may print the full one from BTF).
pub fn object_names() -> anyhow::Result<(Vec<String>, Vec<String>)> {
    let obj = aya_obj::Object::parse(OBJECT).context("parsing the embedded eBPF object")?;
    let programs = obj.programs.keys().cloned().collect();
    let maps = obj.maps.keys().cloned().collect();
    Ok((programs, maps))
}

/// `16 MiB`, `512 KiB`: a ring size as people write it.
pub fn ring_size_text(bytes: u32) -> String {
    if bytes >= 1 << 20 && bytes.is_multiple_of(1 << 20) {
        format!("{} MiB", bytes >> 20)
    } else {
        format!("{} KiB", bytes >> 10)
    }
}

/// Kernels before 5.11 charge BPF memory to RLIMIT_MEMLOCK.
fn bump_memlock_rlimit() {
    let rlim = libc::rlimit {
        rlim_cur: libc::RLIM_INFINITY,
        rlim_max: libc::RLIM_INFINITY,
    };
    // SAFETY: setrlimit reads a valid, initialized struct.
    if unsafe { libc::setrlimit(libc::RLIMIT_MEMLOCK, &rlim) } != 0 {
        log::debug!("could not raise RLIMIT_MEMLOCK (only matters before Linux 5.11)");
    }
}

/// Creates the readiness file (pwru's `--ready-file`), after checking its directory.
pub fn check_writable_parent(path: &Path) -> anyhow::Result<()> {
    let dir = path
        .parent()
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    anyhow::ensure!(
        dir.is_dir(),
        "{}: directory {} does not exist",
        path.display(),
        dir.display()
    );
    Ok(())
}

#[cfg(test)]
mod tests {
    #[test]
    fn port_bits() {
        let w = super::port_words(&[53, 5353, 65535]);
        assert_eq!(w[0], 1 << 53);
        assert_eq!(w[5353 / 64], 1 << (5353 % 64));
        assert_eq!(w[1023], 1 << 63);
        assert_eq!(w.iter().map(|x| x.count_ones()).sum::<u32>(), 3);
    }

    #[test]
    fn default_options() {
        let o = super::Options::default();
        assert_eq!(o.ports, vec![53]);
        assert_eq!(o.ring_size, 16 << 20);
        assert_eq!(super::ring_size_text(o.ring_size), "16 MiB");
        assert_eq!(super::ring_size_text(256 << 10), "256 KiB");
    }

    #[test]
    fn object_names_list_every_program_and_map() {
        let (programs, maps) = super::object_names().unwrap();
        // Fallbacks and the precise programs the guest tier attaches alike.
        for p in [
            "dns_egress",
            "dns_ingress",
            "dns_udp_sendmsg",
            "dns_udpv6_sendmsg",
            "dns_skb_consume_udp",
            "sendmmsg_enter",
            "sendmmsg_exit",
            "nf_kfree_skb",
            "nf_confirm_exit",
            "nf_resolve_clash_exit",
            "nf_confirm_entry",
            "nf_confirm_ret",
            "nf_clash_entry",
            "nf_clash_ret",
        ] {
            assert!(programs.iter().any(|n| n == p), "{p} not in {programs:?}");
        }
        for m in [
            "EVENTS",
            "LOST",
            "PORTS",
            "IN_SENDMMSG",
            "SOCK_OWNER",
            "NF_ARGS",
        ] {
            assert!(maps.iter().any(|n| n == m), "{m} not in {maps:?}");
        }
    }
}

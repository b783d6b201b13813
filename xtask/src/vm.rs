//! `cargo xtask vm-test [--kernel VMLINUX] [--timeout SECS] -- <command...>`: run a command
//! as root inside a QEMU guest booted on Debian's own kernel (6.1: BTF, kprobes, BPF
//! trampolines allowed), where this machine's kernel refuses fentry/fexit and has no kprobes.
//!
//! The guest sees this machine's `/` read-only over 9p with a tmpfs overlay on top, runs the
//! command in the same directory with the environment variables that matter, and its stdout,
//! stderr and exit status become ours. Everything xtask itself says goes to stderr, so stdout
//! carries the command's stdout only.
//!
//! Set-up is idempotent and cached in `<workspace>/.tools/vm/`: the apt packages, the ELF
//! `vmlinux` extracted from `/boot/vmlinuz-<ver>` (booted directly, PVH: no decompression
//! under TCG) and a small initramfs (busybox-static, the virtio-pci/9p/overlay modules and
//! `xtask/vm/init`), each rebuilt only when its inputs change.
//!
//! Per run, a temp dir holds the FIFOs that QEMU's extra serial ports (ttyS1 = stdout,
//! ttyS2 = stderr) write to, and a 9p-shared directory with the generated `stage2.sh`
//! (environment, directory, command) and the `status` the guest writes back. The guest's
//! console goes to `target/vm-test/console.log` and is shown (last 50 lines) on failure only.

use std::{
    collections::{BTreeSet, HashMap},
    env,
    fs::{self, File, OpenOptions},
    io::{self, Read as _, Write},
    os::{fd::AsFd as _, unix::fs::OpenOptionsExt as _},
    path::{Path, PathBuf},
    process::{Command, ExitStatus, Stdio},
    sync::{
        atomic::{AtomicBool, Ordering},
        Arc,
    },
    thread,
    time::{Duration, Instant, UNIX_EPOCH},
};

use anyhow::{bail, Context as _};

use crate::setup::installed;
use crate::util::{self, Workspace};

/// QEMU, the guest kernel (with its modules in /lib/modules), busybox for the initramfs,
/// and kmod: the guest's module auto-loading runs `/sbin/modprobe` from this machine's `/`.
const PACKAGES: &[&str] = &[
    "qemu-system-x86",
    "linux-image-amd64",
    "busybox-static",
    "kmod",
];
/// What the initramfs must load to reach the shared root: virtio-pci, 9p over virtio,
/// overlayfs (plus their dependencies from modules.dep; built-in ones are skipped).
const MODULES: &[&str] = &["virtio_pci", "9pnet_virtio", "9p", "overlay"];
const INIT: &str = include_str!("../vm/init");
/// Bump when the initramfs layout changes, so cached ones are rebuilt.
const INITRAMFS_FORMAT: u32 = 1;
const QEMU: &str = "qemu-system-x86_64";
const BUSYBOX: &str = "/bin/busybox";
/// Environment variables passed into the guest (plus every `TRACER_*`).
const PASS_ENV: &[&str] = &[
    "PATH",
    "HOME",
    "RUST_BACKTRACE",
    "RUST_LIB_BACKTRACE",
    "RUST_LOG",
    "CARGO_TARGET_DIR",
];
const CONSOLE_TAIL_LINES: usize = 50;
/// O_NONBLOCK on Linux (x86_64 and aarch64); xtask has no libc dependency.
const O_NONBLOCK: i32 = 0o4000;

#[derive(clap::Args)]
pub(crate) struct Args {
    /// Guest kernel: an ELF vmlinux or a vmlinuz (default: linux-image-amd64's).
    #[arg(long, value_name = "VMLINUX")]
    kernel: Option<PathBuf>,
    /// Give up, killing QEMU, after this many seconds.
    #[arg(long, value_name = "SECS", default_value_t = 300,
          value_parser = clap::value_parser!(u64).range(1..=86400))]
    timeout: u64,
    /// The command and its arguments.
    #[arg(last = true, required = true)]
    command: Vec<String>,
}

pub(crate) fn run(ws: &Workspace, args: &Args) -> anyhow::Result<()> {
    if args.command.is_empty() {
        bail!("vm-test: no command given: `cargo xtask vm-test -- <command...>`");
    }
    let guest = prepare(ws, args.kernel.as_deref())?;
    let code = boot(ws, &guest, args)?;
    if code != 0 {
        // The command's own status; main's ExitCode can only say success or failure.
        let _ = io::stdout().flush();
        std::process::exit(code);
    }
    Ok(())
}

/// What a boot needs: the ELF kernel and a matching initramfs.
struct Guest {
    release: String,
    vmlinux: PathBuf,
    initramfs: PathBuf,
}

fn prepare(ws: &Workspace, kernel: Option<&Path>) -> anyhow::Result<Guest> {
    let start = Instant::now();
    ensure_packages(PACKAGES)?;
    let dir = ws.tools().join("vm");
    fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;

    let source = match kernel {
        Some(k) => k.to_path_buf(),
        None => Path::new("/boot").join(format!("vmlinuz-{}", debian_kernel_release()?)),
    };
    let vmlinux = vmlinux(&dir, &source)?;
    let release = kernel_release(&vmlinux)?;
    let initramfs = initramfs(&dir, &release)?;
    let took = start.elapsed().as_secs_f64();
    if took > 1.0 {
        eprintln!("vm-test: set-up done in {took:.1} s");
    }
    Ok(Guest {
        release,
        vmlinux,
        initramfs,
    })
}

// ---------------------------------------------------------------------------------------
// Packages (like setup's apt helper, but everything goes to stderr: stdout is the command's).

fn ensure_packages(packages: &[&str]) -> anyhow::Result<()> {
    let missing: Vec<&str> = packages.iter().copied().filter(|p| !installed(p)).collect();
    if missing.is_empty() {
        return Ok(());
    }
    if !util::is_root()? {
        bail!(
            "vm-test: apt: missing {}; installing them needs root (running as uid {})",
            missing.join(" "),
            util::euid()?
        );
    }
    eprintln!(
        "vm-test: apt: installing {} (adds /boot and /lib/modules files only; the running \
         kernel is untouched)",
        missing.join(" ")
    );
    run_to_stderr(Command::new("apt-get").arg("update"))?;
    // Say up front what apt will remove to make room (on this image: a backported
    // qemu-utils that conflicts with bookworm's qemu-system-x86).
    let plan = util::output(
        Command::new("apt-get")
            .args(["-s", "install", "--no-install-recommends"])
            .args(&missing),
    )?;
    let removed: Vec<&str> = plan
        .lines()
        .filter_map(|l| l.strip_prefix("Remv "))
        .filter_map(|l| l.split_whitespace().next())
        .collect();
    if !removed.is_empty() {
        eprintln!(
            "vm-test: apt: warning: installing them removes {} (conflicts)",
            removed.join(" ")
        );
    }
    run_to_stderr(
        Command::new("apt-get")
            .env("DEBIAN_FRONTEND", "noninteractive")
            .args(["install", "-y", "--no-install-recommends"])
            .args(&missing),
    )?;
    let still: Vec<&str> = missing.iter().copied().filter(|p| !installed(p)).collect();
    if !still.is_empty() {
        bail!(
            "vm-test: apt: still not installed after apt-get: {}",
            still.join(" ")
        );
    }
    Ok(())
}

/// Like `util::run`, but the command line and the command's stdout go to stderr.
fn run_to_stderr(cmd: &mut Command) -> anyhow::Result<()> {
    let shown = format!(
        "{} {}",
        cmd.get_program().to_string_lossy(),
        cmd.get_args()
            .map(|a| a.to_string_lossy())
            .collect::<Vec<_>>()
            .join(" ")
    );
    eprintln!("+ {shown}");
    let stderr = io::stderr().as_fd().try_clone_to_owned()?;
    let status = cmd
        .stdout(Stdio::from(stderr))
        .status()
        .with_context(|| format!("failed to start `{shown}`"))?;
    if !status.success() {
        bail!("`{shown}` failed: {status}");
    }
    Ok(())
}

/// The release `linux-image-amd64` depends on: `linux-image-6.1.0-44-amd64 (= …)` -> `6.1.0-44-amd64`.
fn debian_kernel_release() -> anyhow::Result<String> {
    let depends = util::output(Command::new("dpkg-query").args([
        "-W",
        "-f=${Depends}",
        "linux-image-amd64",
    ]))?;
    depends
        .split([',', '|'])
        .filter_map(|d| d.split_whitespace().next())
        .find_map(|d| d.strip_prefix("linux-image-"))
        .map(str::to_string)
        .with_context(|| {
            format!("no linux-image-<release> in linux-image-amd64's Depends: {depends}")
        })
}

// ---------------------------------------------------------------------------------------
// vmlinux: the ELF kernel, extracted once from the compressed vmlinuz.

/// `source` itself if it is an ELF, else `<dir>/vmlinux-<name>` extracted from it (cached;
/// a stamp records the source's path, size and mtime).
fn vmlinux(dir: &Path, source: &Path) -> anyhow::Result<PathBuf> {
    let mut head = [0u8; 4];
    File::open(source)
        .and_then(|mut f| f.read_exact(&mut head))
        .with_context(|| format!("reading the kernel {}", source.display()))?;
    if head == *b"\x7fELF" {
        return Ok(source.to_path_buf());
    }
    let name = source
        .file_name()
        .context("kernel path has no file name")?
        .to_string_lossy();
    let name = name.strip_prefix("vmlinuz-").unwrap_or(&name);
    let out = dir.join(format!("vmlinux-{name}"));
    let stamp = format!("{}\n", file_stamp(source)?);
    if out.is_file() && read_stamp(&out) == stamp {
        return Ok(out);
    }
    eprintln!(
        "vm-test: extracting the ELF vmlinux from {} into {}",
        source.display(),
        out.display()
    );
    let data = fs::read(source).with_context(|| format!("reading {}", source.display()))?;
    let elf = extract_vmlinux(&data)
        .with_context(|| format!("extracting vmlinux from {}", source.display()))?;
    write_atomic(&out, &elf)?;
    write_atomic(&stamp_path(&out), stamp.as_bytes())?;
    Ok(out)
}

/// The kernel's compressed payload: find each format's magic, decompress from there with
/// the matching tool and keep the first output that is an ELF (what
/// `scripts/extract-vmlinux` does; trailing bytes after the stream make the tools complain,
/// so their exit status is ignored).
fn extract_vmlinux(data: &[u8]) -> anyhow::Result<Vec<u8>> {
    const FORMATS: &[(&[u8], &str, &[&str])] = &[
        (b"\xfd7zXZ\x00", "xz", &["-dc"]),
        (b"\x28\xb5\x2f\xfd", "zstd", &["-dcq"]),
        (b"\x1f\x8b\x08", "gzip", &["-dc"]),
        (b"\x02\x21\x4c\x18", "lz4", &["-dc"]),
        (b"BZh", "bzip2", &["-dc"]),
        (b"\x5d\x00\x00", "xz", &["-dc", "--format=lzma"]),
        (b"\x89\x4c\x5a", "lzop", &["-dc"]),
    ];
    let mut tried = Vec::new();
    for (magic, tool, args) in FORMATS {
        let offsets: Vec<usize> = data
            .windows(magic.len())
            .enumerate()
            .filter(|(_, w)| w == magic)
            .map(|(i, _)| i)
            .take(8)
            .collect();
        for off in offsets {
            tried.push(format!("{tool}@{off}"));
            let Ok(out) = decompress(tool, args, &data[off..]) else {
                continue;
            };
            if out.starts_with(b"\x7fELF") {
                return Ok(out);
            }
        }
    }
    bail!(
        "no compressed ELF payload found (tried {})",
        if tried.is_empty() {
            "nothing: no known magic".to_string()
        } else {
            tried.join(", ")
        }
    )
}

fn decompress(tool: &str, args: &[&str], input: &[u8]) -> io::Result<Vec<u8>> {
    let mut child = Command::new(tool)
        .args(args)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()?;
    let mut stdin = child.stdin.take().expect("piped stdin");
    let out = thread::scope(|s| {
        // The tool may stop reading at the end of its stream: a broken pipe is expected.
        s.spawn(move || {
            let _ = stdin.write_all(input);
        });
        let mut out = Vec::new();
        let read = child
            .stdout
            .take()
            .expect("piped stdout")
            .read_to_end(&mut out);
        read.map(|_| out)
    });
    let _ = child.wait();
    out
}

/// `6.1.0-44-amd64` from the `Linux version 6.1.0-44-amd64 (…)` banner inside the kernel.
fn kernel_release(vmlinux: &Path) -> anyhow::Result<String> {
    let data = fs::read(vmlinux).with_context(|| format!("reading {}", vmlinux.display()))?;
    const BANNER: &[u8] = b"Linux version ";
    let mut rest = &data[..];
    while let Some(i) = rest.windows(BANNER.len()).position(|w| w == BANNER) {
        let after = &rest[i + BANNER.len()..];
        let end = after
            .iter()
            .position(|b| !b.is_ascii_graphic())
            .unwrap_or(after.len());
        if end > 0 && after[0].is_ascii_digit() {
            return Ok(String::from_utf8_lossy(&after[..end]).into_owned());
        }
        rest = after;
    }
    bail!(
        "no `Linux version <release>` banner in {}",
        vmlinux.display()
    )
}

// ---------------------------------------------------------------------------------------
// initramfs: busybox, the modules and /init in an uncompressed newc cpio.

fn initramfs(dir: &Path, release: &str) -> anyhow::Result<PathBuf> {
    let out = dir.join(format!("initramfs-{release}.cpio"));
    let moddir = Path::new("/lib/modules").join(release);
    let modules = if moddir.is_dir() {
        module_load_order(&moddir, MODULES)?
    } else {
        eprintln!(
            "vm-test: warning: {} does not exist: assuming {} are built into the kernel",
            moddir.display(),
            MODULES.join(", ")
        );
        Vec::new()
    };

    let mut stamp = format!(
        "format {INITRAMFS_FORMAT}\ninit {:016x}\n{}\n",
        fnv1a(INIT.as_bytes()),
        file_stamp(Path::new(BUSYBOX))?
    );
    for (_, path) in &modules {
        stamp.push_str(&file_stamp(path)?);
        stamp.push('\n');
    }
    if out.is_file() && read_stamp(&out) == stamp {
        return Ok(out);
    }
    eprintln!(
        "vm-test: building {} (busybox, init, modules: {})",
        out.display(),
        modules
            .iter()
            .map(|(n, _)| n.as_str())
            .collect::<Vec<_>>()
            .join(" ")
    );

    let mut cpio = Cpio::default();
    for d in ["bin", "dev", "proc", "sys", "modules"] {
        cpio.dir(d);
    }
    cpio.char_dev("dev/console", 0o600, 5, 1);
    let busybox = fs::read(BUSYBOX).with_context(|| format!("reading {BUSYBOX}"))?;
    cpio.file("bin/busybox", 0o755, &busybox);
    cpio.file("init", 0o755, INIT.as_bytes());
    let mut order = String::new();
    for (name, path) in &modules {
        let ko = read_module(path)?;
        cpio.file(&format!("modules/{name}.ko"), 0o644, &ko);
        order.push_str(name);
        order.push('\n');
    }
    cpio.file("modules/order", 0o644, order.as_bytes());
    write_atomic(&out, &cpio.finish())?;
    write_atomic(&stamp_path(&out), stamp.as_bytes())?;
    Ok(out)
}

/// `wanted` and their dependencies from modules.dep, dependencies first, minus built-ins:
/// (name, path) pairs.
fn module_load_order(moddir: &Path, wanted: &[&str]) -> anyhow::Result<Vec<(String, PathBuf)>> {
    let dep_file = moddir.join("modules.dep");
    let deps =
        fs::read_to_string(&dep_file).with_context(|| format!("reading {}", dep_file.display()))?;
    let mut table: HashMap<String, (String, Vec<String>)> = HashMap::new();
    for line in deps.lines() {
        let Some((path, needs)) = line.split_once(':') else {
            continue;
        };
        let needs = needs.split_whitespace().map(str::to_string).collect();
        table.insert(module_name(path), (path.to_string(), needs));
    }
    let builtin: BTreeSet<String> = fs::read_to_string(moddir.join("modules.builtin"))
        .unwrap_or_default()
        .lines()
        .map(module_name)
        .collect();

    fn visit(
        name: &str,
        table: &HashMap<String, (String, Vec<String>)>,
        moddir: &Path,
        order: &mut Vec<(String, PathBuf)>,
    ) -> anyhow::Result<()> {
        if order.iter().any(|(n, _)| n == name) {
            return Ok(());
        }
        let (path, needs) = table
            .get(name)
            .with_context(|| format!("module {name} is neither in modules.dep nor built in"))?;
        for dep in needs {
            visit(&module_name(dep), table, moddir, order)?;
        }
        order.push((name.to_string(), moddir.join(path)));
        Ok(())
    }
    let mut order = Vec::new();
    for name in wanted {
        let name = name.replace('-', "_");
        if !builtin.contains(&name) {
            visit(&name, &table, moddir, &mut order)?;
        }
    }
    Ok(order)
}

/// `kernel/net/9p/9pnet_virtio.ko.xz` -> `9pnet_virtio`.
fn module_name(path: &str) -> String {
    let file = path.rsplit('/').next().unwrap_or(path);
    let stem = file.split(".ko").next().unwrap_or(file);
    stem.replace('-', "_")
}

/// A module's ELF, decompressed if it is `.ko.xz`/`.ko.zst`/`.ko.gz` (busybox insmod wants
/// it plain).
fn read_module(path: &Path) -> anyhow::Result<Vec<u8>> {
    let name = path.to_string_lossy();
    let tool = if name.ends_with(".xz") {
        Some(("xz", "-dc"))
    } else if name.ends_with(".zst") {
        Some(("zstd", "-dcq"))
    } else if name.ends_with(".gz") {
        Some(("gzip", "-dc"))
    } else {
        None
    };
    match tool {
        None => fs::read(path).with_context(|| format!("reading {name}")),
        Some((tool, arg)) => {
            let out = Command::new(tool)
                .arg(arg)
                .arg(path)
                .output()
                .with_context(|| format!("running {tool} on {name}"))?;
            if !out.status.success() {
                bail!("`{tool} {arg} {name}` failed: {}", out.status);
            }
            Ok(out.stdout)
        }
    }
}

/// A newc ("070701") cpio archive, as the kernel unpacks into its rootfs.
#[derive(Default)]
struct Cpio {
    buf: Vec<u8>,
    ino: u32,
}

impl Cpio {
    fn dir(&mut self, name: &str) {
        self.entry(name, 0o040_755, 0, 0, &[]);
    }

    fn file(&mut self, name: &str, perm: u32, data: &[u8]) {
        self.entry(name, 0o100_000 | perm, 0, 0, data);
    }

    fn char_dev(&mut self, name: &str, perm: u32, major: u32, minor: u32) {
        self.entry(name, 0o020_000 | perm, major, minor, &[]);
    }

    fn entry(&mut self, name: &str, mode: u32, rmajor: u32, rminor: u32, data: &[u8]) {
        self.ino += 1;
        let nlink = if mode & 0o170_000 == 0o040_000 { 2 } else { 1 };
        let fields = [
            self.ino,
            mode,
            0, // uid
            0, // gid
            nlink,
            0, // mtime: reproducible
            u32::try_from(data.len()).expect("initramfs member under 4 GiB"),
            0, // devmajor
            0, // devminor
            rmajor,
            rminor,
            u32::try_from(name.len() + 1).expect("short name"),
            0, // check
        ];
        self.buf.extend_from_slice(b"070701");
        for f in fields {
            self.buf.extend_from_slice(format!("{f:08x}").as_bytes());
        }
        self.buf.extend_from_slice(name.as_bytes());
        self.buf.push(0);
        self.pad();
        self.buf.extend_from_slice(data);
        self.pad();
    }

    fn pad(&mut self) {
        while !self.buf.len().is_multiple_of(4) {
            self.buf.push(0);
        }
    }

    fn finish(mut self) -> Vec<u8> {
        self.entry("TRAILER!!!", 0, 0, 0, &[]);
        self.buf
    }
}

// ---------------------------------------------------------------------------------------
// Cache stamps.

fn stamp_path(out: &Path) -> PathBuf {
    let mut s = out.as_os_str().to_owned();
    s.push(".stamp");
    PathBuf::from(s)
}

fn read_stamp(out: &Path) -> String {
    fs::read_to_string(stamp_path(out)).unwrap_or_default()
}

/// `path size mtime_ns`: enough to notice a reinstalled package.
fn file_stamp(path: &Path) -> anyhow::Result<String> {
    let meta = fs::metadata(path).with_context(|| format!("stat {}", path.display()))?;
    let mtime = meta
        .modified()
        .ok()
        .and_then(|t| t.duration_since(UNIX_EPOCH).ok())
        .map_or(0, |d| d.as_nanos());
    Ok(format!("{} {} {mtime}", path.display(), meta.len()))
}

fn fnv1a(data: &[u8]) -> u64 {
    data.iter().fold(0xcbf2_9ce4_8422_2325, |h, b| {
        (h ^ u64::from(*b)).wrapping_mul(0x0100_0000_01b3)
    })
}

/// Write via a temp file and rename, so a concurrent or interrupted run never sees half a file.
fn write_atomic(path: &Path, data: &[u8]) -> anyhow::Result<()> {
    let tmp = path.with_extension(format!("tmp{}", std::process::id()));
    fs::write(&tmp, data).with_context(|| format!("writing {}", tmp.display()))?;
    fs::rename(&tmp, path).with_context(|| format!("renaming to {}", path.display()))
}

// ---------------------------------------------------------------------------------------
// One run.

/// Boot, run, and return the command's exit status (errors: the guest failed to deliver one).
fn boot(ws: &Workspace, guest: &Guest, args: &Args) -> anyhow::Result<i32> {
    remove_stale_run_dirs();
    let tmp = env::temp_dir().join(format!("xtask-vm-{}", std::process::id()));
    let _ = fs::remove_dir_all(&tmp);
    let share = tmp.join("share");
    fs::create_dir_all(&share).with_context(|| format!("creating {}", share.display()))?;
    let result = boot_in(ws, guest, args, &tmp, &share);
    let _ = fs::remove_dir_all(&tmp);
    result
}

fn boot_in(
    ws: &Workspace,
    guest: &Guest,
    args: &Args,
    tmp: &Path,
    share: &Path,
) -> anyhow::Result<i32> {
    let cwd = env::current_dir().context("current directory")?;
    fs::write(share.join("stage2.sh"), stage2(&cwd, &args.command)).context("writing stage2.sh")?;

    // QEMU's pipe chardev writes to `<path>.out` (and reads `<path>.in`, never fed).
    for name in ["out.in", "out.out", "err.in", "err.out"] {
        util::output(Command::new("mkfifo").arg(tmp.join(name)))?;
    }
    // Read+write so that neither this open nor QEMU's blocks, non-blocking so that the
    // readers can stop once QEMU has exited and the FIFOs are drained.
    let open_fifo = |name: &str| {
        OpenOptions::new()
            .read(true)
            .write(true)
            .custom_flags(O_NONBLOCK)
            .open(tmp.join(name))
            .with_context(|| format!("opening FIFO {name}"))
    };
    let (out_fifo, err_fifo) = (open_fifo("out.out")?, open_fifo("err.out")?);

    let console = tmp.join("console.log");
    let qemu_log = tmp.join("qemu.log");
    let log = File::create(&qemu_log).context("creating qemu.log")?;
    let mut qemu = Command::new(QEMU);
    qemu.args(["-accel", "tcg", "-machine", "pc", "-cpu", "max"])
        .args(["-m", "1G", "-smp", "2"])
        .args(["-nodefaults", "-no-user-config", "-no-reboot"])
        .args(["-display", "none", "-monitor", "none"])
        .arg("-kernel")
        .arg(&guest.vmlinux)
        .arg("-initrd")
        .arg(&guest.initramfs)
        .args([
            "-append",
            "console=ttyS0 oops=panic panic=-1 quiet loglevel=4 mitigations=off rdinit=/init",
        ])
        .arg("-chardev")
        .arg(format!("file,id=con,path={}", console.display()))
        .args(["-serial", "chardev:con"])
        .arg("-chardev")
        .arg(format!("pipe,id=out,path={}", tmp.join("out").display()))
        .args(["-serial", "chardev:out"])
        .arg("-chardev")
        .arg(format!("pipe,id=err,path={}", tmp.join("err").display()))
        .args(["-serial", "chardev:err"])
        .args([
            "-fsdev",
            "local,id=root,path=/,security_model=none,readonly=on,multidevs=remap",
            "-device",
            "virtio-9p-pci,fsdev=root,mount_tag=hostroot",
        ])
        .arg("-fsdev")
        .arg(format!(
            "local,id=share,path={},security_model=none",
            share.display()
        ))
        .args(["-device", "virtio-9p-pci,fsdev=share,mount_tag=vmshare"])
        .stdin(Stdio::null())
        .stdout(log.try_clone()?)
        .stderr(log);

    let done = Arc::new(AtomicBool::new(false));
    let start = Instant::now();
    let mut child = qemu
        .spawn()
        .with_context(|| format!("failed to start {QEMU}"))?;
    let pumps = [
        spawn_pump(out_fifo, Box::new(io::stdout()), done.clone()),
        spawn_pump(err_fifo, Box::new(io::stderr()), done.clone()),
    ];

    let timeout = Duration::from_secs(args.timeout);
    let exited: Option<ExitStatus> = loop {
        if let Some(status) = child.try_wait().context("waiting for QEMU")? {
            break Some(status);
        }
        if start.elapsed() >= timeout {
            let _ = child.kill();
            let _ = child.wait();
            break None;
        }
        thread::sleep(Duration::from_millis(20));
    };
    done.store(true, Ordering::Release);
    for pump in pumps {
        let _ = pump.join();
    }

    // Keep the console of the last run; no other run writes it while it is running.
    let kept = ws.target_dir().join("vm-test").join("console.log");
    let _ = fs::create_dir_all(kept.parent().expect("has a parent"));
    let _ = fs::copy(&console, &kept);

    let status = fs::read_to_string(share.join("status")).ok();
    let failure = match (exited, &status) {
        (None, _) => Some(format!(
            "the guest did not finish within {} s (--timeout); killed QEMU",
            args.timeout
        )),
        (Some(st), _) if !st.success() => Some(format!("QEMU failed: {st}")),
        (Some(_), None) => Some(
            "the guest ended without writing an exit status (a kernel panic, or the \
             guest's init failed: see its console)"
                .to_string(),
        ),
        (Some(_), Some(s)) => s
            .trim()
            .parse::<i32>()
            .err()
            .map(|_| format!("the guest wrote a malformed exit status {s:?}")),
    };
    if let Some(failure) = failure {
        show_failure(&qemu_log, &console, &kept);
        bail!(
            "vm-test: {failure} (guest kernel {}, after {:.1} s)",
            guest.release,
            start.elapsed().as_secs_f64()
        );
    }
    Ok(status
        .and_then(|s| s.trim().parse().ok())
        .expect("checked above"))
}

/// Copy a FIFO to `sink` until `done` is set and the FIFO is empty. A closed sink (e.g.
/// `| head`) stops the copying but not the draining, so the guest never stalls.
fn spawn_pump(
    mut fifo: File,
    mut sink: Box<dyn Write + Send>,
    done: Arc<AtomicBool>,
) -> thread::JoinHandle<()> {
    thread::spawn(move || {
        let mut buf = vec![0u8; 64 * 1024];
        let mut sink_ok = true;
        loop {
            // Read the flag first: once QEMU has exited, an empty FIFO stays empty.
            let finished = done.load(Ordering::Acquire);
            match fifo.read(&mut buf) {
                Ok(0) => return,
                Ok(n) => {
                    if sink_ok {
                        sink_ok = sink
                            .write_all(&buf[..n])
                            .and_then(|()| sink.flush())
                            .is_ok();
                    }
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                    if finished {
                        return;
                    }
                    thread::sleep(Duration::from_millis(5));
                }
                Err(_) => return,
            }
        }
    })
}

fn show_failure(qemu_log: &Path, console: &Path, kept: &Path) {
    let qemu = fs::read_to_string(qemu_log).unwrap_or_default();
    if !qemu.trim().is_empty() {
        eprintln!("---- QEMU said ----\n{}", qemu.trim_end());
    }
    let text = fs::read(console).unwrap_or_default();
    let text = String::from_utf8_lossy(&text);
    let lines: Vec<&str> = text.lines().collect();
    let tail = &lines[lines.len().saturating_sub(CONSOLE_TAIL_LINES)..];
    eprintln!(
        "---- last {} lines of the guest console (all: {}) ----",
        tail.len(),
        kept.display()
    );
    for line in tail {
        eprintln!("{}", line.trim_end_matches('\r'));
    }
    eprintln!("---- end of the guest console ----");
}

/// The guest's PID 1 after switch_root (dash from this machine's `/`): run the command
/// through in-guest FIFOs (so it sees pipes, not ttys, like a host run under a pipe) into
/// the raw serial ports (raw: the tty would turn `\n` into `\r\n`), write its status to
/// the shared directory, power off.
fn stage2(cwd: &Path, command: &[String]) -> String {
    let mut env_args = Vec::new();
    for (key, value) in env::vars_os() {
        let key = key.to_string_lossy().into_owned();
        if PASS_ENV.contains(&key.as_str()) || key.starts_with("TRACER_") {
            env_args.push(quote(&format!("{key}={}", value.to_string_lossy())));
        }
    }
    env_args.sort();
    let command: Vec<String> = command.iter().map(|a| quote(a)).collect();
    format!(
        r#"#!/bin/sh
# Written by `cargo xtask vm-test` for one run.
for t in /dev/ttyS1 /dev/ttyS2; do stty -F $t raw -echo; done
mkfifo /run/out /run/err
cat /run/out >/dev/ttyS1 &
o=$!
cat /run/err >/dev/ttyS2 &
e=$!
(cd {cwd} && exec env -i {env} {command}) </dev/null >/run/out 2>/run/err
status=$?
# Background processes still holding the FIFOs get 5 s more to finish their output.
(sleep 5; kill $o $e) 2>/dev/null &
wait $o $e
echo $status >/run/vm-test/status
exec /bin/busybox poweroff -f
"#,
        cwd = quote(&cwd.to_string_lossy()),
        env = env_args.join(" "),
        command = command.join(" "),
    )
}

/// Single-quote for sh.
fn quote(s: &str) -> String {
    format!("'{}'", s.replace('\'', r"'\''"))
}

/// Run dirs of xtask processes that are gone (e.g. ended by Ctrl-C).
fn remove_stale_run_dirs() {
    let Ok(entries) = fs::read_dir(env::temp_dir()) else {
        return;
    };
    for entry in entries.flatten() {
        let name = entry.file_name();
        let Some(pid) = name.to_str().and_then(|n| n.strip_prefix("xtask-vm-")) else {
            continue;
        };
        if pid.parse::<u32>().is_ok() && !Path::new("/proc").join(pid).exists() {
            let _ = fs::remove_dir_all(entry.path());
        }
    }
}

//! `cargo xtask vm-test [--kernel VMLINUX] [--timeout SECS] -- <command...>`: run a command
//! as root inside a QEMU guest booted on Debian's own kernel (6.1: BTF, kprobes, BPF
//! trampolines allowed), where this machine's kernel refuses fentry/fexit and has no kprobes.
//! `cargo xtask test` runs its guest tier through the same code (`boot` with a `Job`).
//!
//! The guest sees this machine's `/` read-only over 9p with a tmpfs overlay on top, runs the
//! command in the same directory with the environment variables that matter, and its stdout,
//! stderr and exit status become ours. Everything xtask itself says goes to stderr, so stdout
//! carries the command's stdout only.
//!
//! Nothing is installed on this machine: QEMU (with its firmware and the libraries this
//! machine lacks), Debian's kernel package, kmod and busybox-static are fetched with
//! `apt-get download` and unpacked with `dpkg-deb -x` into `<workspace>/.tools/vm/root`
//! (installing bookworm's qemu-system-x86 would remove the backported qemu-utils of the CI
//! image and upgrade systemd). The system's QEMU, `/boot` and `/lib/modules` are never used:
//! QEMU runs from the tree (`LD_LIBRARY_PATH`, `QEMU_MODULE_DIR`, `-L`), the initramfs's
//! modules come from the tree, and the guest's init bind-mounts the tree's modules onto
//! `/lib/modules/<release>` and points the kernel's modprobe at the tree's kmod.
//!
//! Set-up is idempotent and cached in `<workspace>/.tools/vm/`: the tree (rebuilt when the
//! resolved package versions change), the ELF `vmlinux` extracted from the tree's
//! `vmlinuz-<release>` (booted directly, PVH: no decompression under TCG) and a small
//! initramfs (busybox, the virtio-pci/9p/overlay modules and `xtask/vm/init`), each rebuilt
//! only when its inputs change.
//!
//! Per run, a temp dir holds the FIFOs that QEMU's extra serial ports (ttyS1 = stdout,
//! ttyS2 = stderr) write to, and a 9p-shared directory with the generated `stage2.sh`
//! (environment, directory, command), `vm.conf` (for the init), the `modprobe` wrapper, the
//! job's own files and the `status` the guest writes back. The guest's console goes to
//! `<target>/vm-test/console-<run name>.log` and is shown (last 50 lines) on failure only.
//!
//! The guest's `/tmp`, `/run` and `/etc/netns` are its own empty tmpfs (a command can not
//! live in this machine's `/tmp`), and `lo` is up.

use std::{
    collections::{BTreeMap, BTreeSet, HashMap},
    env,
    ffi::OsString,
    fs::{self, File, OpenOptions},
    io::{self, Read as _, Write},
    os::{
        fd::AsFd as _,
        unix::fs::{OpenOptionsExt as _, PermissionsExt as _},
    },
    path::{Path, PathBuf},
    process::{Command, ExitStatus, Stdio},
    sync::{
        atomic::{AtomicBool, AtomicUsize, Ordering},
        Arc,
    },
    thread,
    time::{Duration, Instant, UNIX_EPOCH},
};

use anyhow::{bail, Context as _};

use crate::util::{self, Workspace};

/// Unpacked into the tree whether or not this machine has them installed, so that a run
/// never depends on the system's QEMU, firmware, kmod or busybox.
const TREE_PACKAGES: &[&str] = &[
    "qemu-system-x86",
    "qemu-system-common",
    "qemu-system-data",
    "seabios",
    "kmod",
    "busybox-static",
];
/// Whose `Depends`/`Pre-Depends` are followed: the libraries QEMU and kmod load. A
/// dependency this machine has installed is used from the system; one it lacks is unpacked
/// into the tree too (and its own dependencies followed in turn).
const WALK_DEPENDS: &[&str] = &["qemu-system-x86", "qemu-system-common", "kmod"];
/// The kernel: the `linux-image-<release>` package this metapackage depends on.
const KERNEL_META: &str = "linux-image-amd64";
/// Bump when the tree's layout changes, so cached ones are rebuilt.
const TREE_FORMAT: u32 = 1;
/// What the initramfs must load to reach the shared root: virtio-pci, 9p over virtio,
/// overlayfs (plus their dependencies from modules.dep; built-in ones are skipped).
const MODULES: &[&str] = &["virtio_pci", "9pnet_virtio", "9p", "overlay"];
const INIT: &str = include_str!("../vm/init");
/// Bump when the initramfs layout changes, so cached ones are rebuilt.
const INITRAMFS_FORMAT: u32 = 2;
const QEMU: &str = "qemu-system-x86_64";
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
    /// Guest kernel: an ELF vmlinux or a vmlinuz (default: the one unpacked from Debian's
    /// linux-image-amd64). Its modules come from the tree if it has that release, else from
    /// this machine's /lib/modules/<release>.
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
    let job = Job {
        cwd: env::current_dir().context("current directory")?,
        command: args.command.clone(),
        env: Vec::new(),
        files: Vec::new(),
        timeout: Duration::from_secs(args.timeout),
        name: "vm-test".to_string(),
        prefix_output: false,
        common: None,
    };
    let outcome = boot(ws, &guest, &job)?;
    let code = match outcome.status {
        Ok(code) => code,
        Err(failure) => bail!("vm-test: {failure}"),
    };
    if code != 0 {
        // The command's own status; main's ExitCode can only say success or failure.
        let _ = io::stdout().flush();
        std::process::exit(code);
    }
    Ok(())
}

/// What a boot needs: QEMU, the ELF kernel, a matching initramfs and the guest's modules.
pub(crate) struct Guest {
    pub(crate) release: String,
    vmlinux: PathBuf,
    initramfs: PathBuf,
    tree: Tree,
    /// The guest kernel's modules (bind-mounted onto `/lib/modules/<release>` in the guest).
    modules: Option<PathBuf>,
}

pub(crate) fn prepare(ws: &Workspace, kernel: Option<&Path>) -> anyhow::Result<Guest> {
    let start = Instant::now();
    let dir = ws.tools().join("vm");
    fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
    let _lock = DirLock::acquire(&dir.join("lock"))?;
    let tree = provision(&dir)?;

    let source = match kernel {
        Some(k) => k.to_path_buf(),
        None => tree.root.join(format!("boot/vmlinuz-{}", tree.release)),
    };
    let vmlinux = vmlinux(&dir, &source)?;
    let release = kernel_release(&vmlinux)?;
    let modules = [
        tree.modules(&release),
        Path::new("/lib/modules").join(&release),
    ]
    .into_iter()
    .find(|d| d.join("modules.dep").is_file());
    if kernel.is_none() && modules.as_deref() != Some(tree.modules(&release).as_path()) {
        bail!(
            "vm-test: the unpacked kernel is {release} but {} has no modules.dep",
            tree.modules(&release).display()
        );
    }
    let initramfs = initramfs(&dir, &tree, &release, modules.as_deref())?;
    let took = start.elapsed().as_secs_f64();
    if took > 1.0 {
        eprintln!("vm-test: set-up done in {took:.1} s");
    }
    Ok(Guest {
        release,
        vmlinux,
        initramfs,
        tree,
        modules,
    })
}

/// A lock directory (mkdir is atomic), so concurrent runs in one checkout do not build the
/// tree or the initramfs at the same time. A lock left by a process that is gone is taken over.
struct DirLock(PathBuf);

impl DirLock {
    fn acquire(path: &Path) -> anyhow::Result<Self> {
        let deadline = Instant::now() + Duration::from_secs(900);
        let mut said = false;
        loop {
            match fs::create_dir(path) {
                Ok(()) => {
                    fs::write(path.join("pid"), std::process::id().to_string())
                        .with_context(|| format!("writing {}/pid", path.display()))?;
                    return Ok(Self(path.to_path_buf()));
                }
                Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {}
                Err(e) => return Err(e).with_context(|| format!("creating {}", path.display())),
            }
            let holder = fs::read_to_string(path.join("pid")).unwrap_or_default();
            let holder = holder.trim();
            // No pid yet: its owner is between mkdir and write; give it a moment.
            let gone = holder.parse::<u32>().is_ok_and(|pid| {
                pid != std::process::id() && !Path::new("/proc").join(pid.to_string()).exists()
            });
            if gone {
                let _ = fs::remove_dir_all(path);
                continue;
            }
            if Instant::now() > deadline {
                bail!(
                    "vm-test: {} is still held by pid {holder} after 15 minutes",
                    path.display()
                );
            }
            if !said {
                eprintln!("vm-test: waiting for pid {holder} ({})", path.display());
                said = true;
            }
            thread::sleep(Duration::from_millis(200));
        }
    }
}

impl Drop for DirLock {
    fn drop(&mut self) {
        let _ = fs::remove_dir_all(&self.0);
    }
}

// ---------------------------------------------------------------------------------------
// The tree: Debian packages unpacked into `.tools/vm/root`, never installed.

pub(crate) struct Tree {
    root: PathBuf,
    /// The release of the unpacked kernel package (`6.1.0-56-amd64`).
    release: String,
}

impl Tree {
    fn qemu(&self) -> PathBuf {
        self.root.join("usr/bin").join(QEMU)
    }

    fn busybox(&self) -> PathBuf {
        self.root.join("bin/busybox")
    }

    fn modprobe(&self) -> PathBuf {
        self.root.join("sbin/modprobe")
    }

    fn modules(&self, release: &str) -> PathBuf {
        let usr = self.root.join("usr/lib/modules").join(release);
        if usr.is_dir() {
            usr
        } else {
            self.root.join("lib/modules").join(release)
        }
    }

    /// The tree's library directories, for `LD_LIBRARY_PATH`.
    fn lib_dirs(&self) -> Vec<PathBuf> {
        ["usr/lib/x86_64-linux-gnu", "lib/x86_64-linux-gnu"]
            .iter()
            .map(|d| self.root.join(d))
            .filter(|d| d.is_dir())
            .collect()
    }

    fn ld_library_path(&self) -> anyhow::Result<OsString> {
        let mut dirs = self.lib_dirs();
        if let Some(old) = env::var_os("LD_LIBRARY_PATH") {
            dirs.extend(env::split_paths(&old));
        }
        env::join_paths(dirs).context("joining LD_LIBRARY_PATH")
    }

    /// A command for one of the tree's programs, finding the tree's libraries first.
    fn command(&self, program: &Path) -> anyhow::Result<Command> {
        let mut cmd = Command::new(program);
        cmd.env("LD_LIBRARY_PATH", self.ld_library_path()?);
        Ok(cmd)
    }
}

/// A package version to unpack (the candidate of this machine's apt sources).
#[derive(Clone, PartialEq, Eq, PartialOrd, Ord)]
struct Deb {
    name: String,
    version: String,
    arch: String,
}

impl Deb {
    /// The file name `apt-get download` gives it (`:` of an epoch written `%3a`).
    fn file_name(&self) -> String {
        format!(
            "{}_{}_{}.deb",
            self.name,
            self.version.replace(':', "%3a"),
            self.arch
        )
    }
}

fn provision(dir: &Path) -> anyhow::Result<Tree> {
    let root = dir.join("root");
    let (release, debs) = match resolve() {
        Ok(plan) => plan,
        Err(e) if util::is_root()? => {
            eprintln!("vm-test: {e:#}; refreshing apt's package lists");
            run_to_stderr(Command::new("apt-get").args(["-q", "update"]))?;
            resolve()?
        }
        Err(e) => return Err(e),
    };
    let mut manifest = format!("format {TREE_FORMAT}\nkernel {release}\n");
    for d in &debs {
        manifest.push_str(&format!("{} {} {}\n", d.name, d.version, d.arch));
    }
    let manifest_path = dir.join("root.manifest");
    if root.is_dir() && fs::read_to_string(&manifest_path).ok().as_deref() == Some(&*manifest) {
        return Ok(Tree { root, release });
    }

    let start = Instant::now();
    let cache = dir.join("debs");
    fs::create_dir_all(&cache).with_context(|| format!("creating {}", cache.display()))?;
    download(&cache, &debs)?;
    let wanted: BTreeSet<String> = debs.iter().map(Deb::file_name).collect();
    for entry in fs::read_dir(&cache)?.flatten() {
        if !wanted.contains(&*entry.file_name().to_string_lossy()) {
            let _ = fs::remove_file(entry.path());
        }
    }

    eprintln!(
        "vm-test: unpacking {} packages into {} (not installing them)",
        debs.len(),
        root.display()
    );
    let new = dir.join("root.new");
    let _ = fs::remove_dir_all(&new);
    fs::create_dir_all(&new).with_context(|| format!("creating {}", new.display()))?;
    for d in &debs {
        util::output(
            Command::new("dpkg-deb")
                .arg("-x")
                .arg(cache.join(d.file_name()))
                .arg(&new),
        )?;
    }
    relativize_symlinks(&new, &new)?;
    let staged = Tree {
        root: new.clone(),
        release: release.clone(),
    };
    // Debian's kernel package ships no modules.dep (its postinst runs depmod).
    util::output(
        staged
            .command(&staged.root.join("sbin/depmod"))?
            .arg("-b")
            .arg(&staged.root)
            .arg(&release),
    )
    .context("depmod for the unpacked kernel")?;
    let version = util::output(staged.command(&staged.qemu())?.arg("--version"))
        .context("the unpacked QEMU does not start (a library missing from the tree?)")?;

    let _ = fs::remove_file(&manifest_path);
    if root.exists() {
        fs::remove_dir_all(&root).with_context(|| format!("removing {}", root.display()))?;
    }
    fs::rename(&new, &root).with_context(|| format!("renaming to {}", root.display()))?;
    write_atomic(&manifest_path, manifest.as_bytes())?;
    eprintln!(
        "vm-test: tree ready in {:.1} s: kernel {release}, {}",
        start.elapsed().as_secs_f64(),
        version.lines().next().unwrap_or_default()
    );
    Ok(Tree { root, release })
}

/// What to unpack: the kernel release and the packages, with the candidate versions of
/// this machine's apt sources.
fn resolve() -> anyhow::Result<(String, Vec<Deb>)> {
    let meta = apt_show(&[KERNEL_META.to_string()])?;
    let kernel = meta
        .first()
        .and_then(|m| {
            m.depends
                .iter()
                .flatten()
                .find(|d| d.starts_with("linux-image-"))
        })
        .cloned()
        .with_context(|| {
            format!(
                "apt knows no candidate of {KERNEL_META} that depends on a linux-image-<release>"
            )
        })?;
    let release = kernel["linux-image-".len()..].to_string();

    let mut chosen: BTreeMap<String, Deb> = BTreeMap::new();
    let mut level: Vec<String> = TREE_PACKAGES.iter().map(|p| p.to_string()).collect();
    level.push(kernel.clone());
    let mut walk: BTreeSet<String> = WALK_DEPENDS.iter().map(|p| p.to_string()).collect();
    while !level.is_empty() {
        let shown = apt_show(&level)?;
        for name in &level {
            if !shown.iter().any(|s| &s.deb.name == name) {
                bail!("apt has no candidate version of {name}");
            }
        }
        let mut groups = Vec::new();
        for s in shown {
            if walk.contains(&s.deb.name) {
                groups.extend(s.depends);
            }
            chosen.insert(s.deb.name.clone(), s.deb);
        }
        let names: Vec<String> = groups
            .iter()
            .flatten()
            .cloned()
            .collect::<BTreeSet<_>>()
            .into_iter()
            .collect();
        let policy = apt_policy(&names)?;
        let mut next = BTreeSet::new();
        for group in &groups {
            let satisfied = group.iter().any(|n| {
                chosen.contains_key(n)
                    || next.contains(n)
                    || policy.get(n).is_some_and(|p| p.installed)
            });
            if satisfied {
                continue;
            }
            match group
                .iter()
                .find(|n| policy.get(*n).is_some_and(|p| p.candidate))
            {
                Some(n) => {
                    next.insert(n.clone());
                }
                // Only virtual names (provided by something installed, or nothing QEMU
                // loads): the `--version` check after unpacking tells if it mattered.
                None => eprintln!(
                    "vm-test: note: no installable candidate for the dependency `{}`",
                    group.join(" | ")
                ),
            }
        }
        walk.extend(next.iter().cloned());
        level = next.into_iter().collect();
    }
    Ok((release, chosen.into_values().collect()))
}

struct Shown {
    deb: Deb,
    /// `Pre-Depends` and `Depends`: groups of alternatives, package names only.
    depends: Vec<Vec<String>>,
}

/// `apt-cache show --no-all-versions`: the candidate of each package (unknown names are
/// left out).
fn apt_show(names: &[String]) -> anyhow::Result<Vec<Shown>> {
    let out = util::output(
        Command::new("apt-cache")
            .args(["show", "--no-all-versions"])
            .args(names),
    )?;
    Ok(parse_show(&out))
}

fn parse_show(out: &str) -> Vec<Shown> {
    let mut shown = Vec::new();
    for stanza in out.split("\n\n") {
        let field = |key: &str| {
            stanza
                .lines()
                .find_map(|l| l.strip_prefix(key)?.strip_prefix(':'))
                .map(str::trim)
        };
        let (Some(name), Some(version), Some(arch)) =
            (field("Package"), field("Version"), field("Architecture"))
        else {
            continue;
        };
        let mut depends = Vec::new();
        for key in ["Pre-Depends", "Depends"] {
            for group in field(key).unwrap_or_default().split(',') {
                let alternatives: Vec<String> = group
                    .split('|')
                    .filter_map(|a| a.split_whitespace().next())
                    .map(|a| a.split(':').next().unwrap_or(a).to_string())
                    .filter(|a| !a.is_empty())
                    .collect();
                if !alternatives.is_empty() {
                    depends.push(alternatives);
                }
            }
        }
        shown.push(Shown {
            deb: Deb {
                name: name.to_string(),
                version: version.to_string(),
                arch: arch.to_string(),
            },
            depends,
        });
    }
    shown
}

struct Policy {
    installed: bool,
    candidate: bool,
}

/// `apt-cache policy`: whether each package is installed and has a candidate (unknown
/// names are left out; virtual ones have neither).
fn apt_policy(names: &[String]) -> anyhow::Result<HashMap<String, Policy>> {
    if names.is_empty() {
        return Ok(HashMap::new());
    }
    let out = util::output(Command::new("apt-cache").arg("policy").args(names))?;
    Ok(parse_policy(&out))
}

fn parse_policy(out: &str) -> HashMap<String, Policy> {
    let mut policy = HashMap::new();
    let mut current: Option<String> = None;
    for line in out.lines() {
        if !line.starts_with(' ') {
            current = line.strip_suffix(':').map(|n| {
                let n = n.split(':').next().unwrap_or(n).to_string();
                policy.insert(
                    n.clone(),
                    Policy {
                        installed: false,
                        candidate: false,
                    },
                );
                n
            });
            continue;
        }
        let Some(p) = current.as_ref().and_then(|n| policy.get_mut(n)) else {
            continue;
        };
        let line = line.trim();
        if let Some(v) = line.strip_prefix("Installed:") {
            p.installed = v.trim() != "(none)";
        } else if let Some(v) = line.strip_prefix("Candidate:") {
            p.candidate = v.trim() != "(none)";
        }
    }
    policy
}

/// `apt-get download` the debs not in `cache` yet (once more after `apt-get update` if that
/// fails: the lists may name versions the mirror no longer has).
fn download(cache: &Path, debs: &[Deb]) -> anyhow::Result<()> {
    let missing: Vec<&Deb> = debs
        .iter()
        .filter(|d| !cache.join(d.file_name()).is_file())
        .collect();
    if missing.is_empty() {
        return Ok(());
    }
    let root = util::is_root()?;
    let fetch = || {
        let mut cmd = Command::new("apt-get");
        cmd.current_dir(cache).arg("-q");
        if root {
            // apt drops to `_apt` to download, which can not write into our directory.
            cmd.args(["-o", "APT::Sandbox::User=root"]);
        }
        cmd.arg("download")
            .args(missing.iter().map(|d| format!("{}={}", d.name, d.version)));
        run_to_stderr(&mut cmd)
    };
    let start = Instant::now();
    if let Err(e) = fetch() {
        if !root {
            return Err(e);
        }
        eprintln!("vm-test: {e:#}; refreshing apt's package lists and trying again");
        run_to_stderr(Command::new("apt-get").args(["-q", "update"]))?;
        fetch()?;
    }
    let bytes: u64 = missing
        .iter()
        .filter_map(|d| fs::metadata(cache.join(d.file_name())).ok())
        .map(|m| m.len())
        .sum();
    eprintln!(
        "vm-test: downloaded {} packages ({:.1} MB) in {:.1} s",
        missing.len(),
        bytes as f64 / 1e6,
        start.elapsed().as_secs_f64()
    );
    Ok(())
}

/// dpkg-deb -x keeps symlinks as packaged; absolute ones (`/sbin/modprobe -> /bin/kmod`)
/// would point into this machine's `/`. Make them relative, inside the tree.
fn relativize_symlinks(root: &Path, dir: &Path) -> anyhow::Result<()> {
    for entry in fs::read_dir(dir).with_context(|| format!("listing {}", dir.display()))? {
        let entry = entry?;
        let path = entry.path();
        let kind = entry.file_type()?;
        if kind.is_dir() {
            relativize_symlinks(root, &path)?;
        } else if kind.is_symlink() {
            let target = fs::read_link(&path)?;
            let Ok(inside) = target.strip_prefix("/") else {
                continue;
            };
            let depth = path
                .parent()
                .and_then(|p| p.strip_prefix(root).ok())
                .map_or(0, |p| p.components().count());
            let mut relative = PathBuf::new();
            for _ in 0..depth {
                relative.push("..");
            }
            relative.push(inside);
            fs::remove_file(&path)?;
            std::os::unix::fs::symlink(&relative, &path)
                .with_context(|| format!("re-linking {}", path.display()))?;
        }
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

fn initramfs(
    dir: &Path,
    tree: &Tree,
    release: &str,
    moddir: Option<&Path>,
) -> anyhow::Result<PathBuf> {
    let out = dir.join(format!("initramfs-{release}.cpio"));
    let modules = match moddir {
        Some(moddir) => module_load_order(moddir, MODULES)?,
        None => {
            eprintln!(
                "vm-test: warning: no modules for {release}: assuming {} are built into the kernel",
                MODULES.join(", ")
            );
            Vec::new()
        }
    };
    let busybox_path = tree.busybox();

    let mut stamp = format!(
        "format {INITRAMFS_FORMAT}\ninit {:016x}\n{}\n",
        fnv1a(INIT.as_bytes()),
        file_stamp(&busybox_path)?
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
    let busybox =
        fs::read(&busybox_path).with_context(|| format!("reading {}", busybox_path.display()))?;
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

/// One command to run as root in a guest.
pub(crate) struct Job {
    /// Where the command runs (the same path in the guest: `/` is shared).
    pub(crate) cwd: PathBuf,
    pub(crate) command: Vec<String>,
    /// Set in the guest on top of the passed-through `PASS_ENV` and `TRACER_*` variables.
    pub(crate) env: Vec<(String, String)>,
    /// Put in the run's shared directory, `/run/vm-test/<name>` in the guest (executable).
    pub(crate) files: Vec<(String, Vec<u8>)>,
    /// QEMU is killed after this long.
    pub(crate) timeout: Duration,
    /// Names the run: its console is kept as `<target>/vm-test/console-<name>.log`, and with
    /// `prefix_output` every line of the command's stdout and stderr goes to our stdout as
    /// `[<name>] line` (several guests at once); otherwise they go to our stdout and stderr.
    pub(crate) name: String,
    pub(crate) prefix_output: bool,
    /// A directory of this machine that several guests of one run share read-write,
    /// `/run/vm-common` in the guest (e.g. to hand out work: `mkdir` there is atomic).
    pub(crate) common: Option<PathBuf>,
}

/// How a boot ended.
pub(crate) struct Outcome {
    /// The command's exit status, or why the guest did not deliver one (timeout, crash).
    pub(crate) status: Result<i32, String>,
    /// What the guest left in the shared directory (name -> contents), read after QEMU exited.
    pub(crate) files: BTreeMap<String, Vec<u8>>,
    /// From starting QEMU to its exit.
    pub(crate) wall: Duration,
}

/// Files of the shared directory that are ours, not the job's.
const SHARE_OWN: &[&str] = &["stage2.sh", "vm.conf", "modprobe", "status"];

/// Boot, run the job and say how it ended (errors: QEMU could not even be started).
pub(crate) fn boot(ws: &Workspace, guest: &Guest, job: &Job) -> anyhow::Result<Outcome> {
    static RUNS: AtomicUsize = AtomicUsize::new(0);
    remove_stale_run_dirs();
    let tmp = env::temp_dir().join(format!(
        "xtask-vm-{}-{}",
        std::process::id(),
        RUNS.fetch_add(1, Ordering::Relaxed)
    ));
    let _ = fs::remove_dir_all(&tmp);
    let share = tmp.join("share");
    fs::create_dir_all(&share).with_context(|| format!("creating {}", share.display()))?;
    let result = boot_in(ws, guest, job, &tmp, &share);
    let _ = fs::remove_dir_all(&tmp);
    result
}

fn boot_in(
    ws: &Workspace,
    guest: &Guest,
    job: &Job,
    tmp: &Path,
    share: &Path,
) -> anyhow::Result<Outcome> {
    let executable = |name: &str, data: &[u8]| -> anyhow::Result<()> {
        let path = share.join(name);
        fs::write(&path, data).with_context(|| format!("writing {}", path.display()))?;
        fs::set_permissions(&path, fs::Permissions::from_mode(0o755))
            .with_context(|| format!("chmod {}", path.display()))
    };
    for (name, data) in &job.files {
        if SHARE_OWN.contains(&name.as_str()) || name.contains('/') {
            bail!("vm-test: a job file can not be named {name:?}");
        }
        executable(name, data)?;
    }
    let stage2 = stage2(&job.cwd, &job.command, &job.env, &guest.tree.busybox());
    executable("stage2.sh", stage2.as_bytes())?;
    executable("vm.conf", vm_conf(guest, job.common.is_some()).as_bytes())?;
    executable("modprobe", modprobe_wrapper(&guest.tree)?.as_bytes())?;

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
    let tree = &guest.tree;
    let mut qemu = tree.command(&tree.qemu())?;
    qemu.env(
        "QEMU_MODULE_DIR",
        tree.root.join("usr/lib/x86_64-linux-gnu/qemu"),
    )
    .arg("-L")
    .arg(tree.root.join("usr/share/qemu"))
    .arg("-L")
    .arg(tree.root.join("usr/share/seabios"))
    .args(["-accel", "tcg", "-machine", "pc", "-cpu", "max"])
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
    .args(["-device", "virtio-9p-pci,fsdev=share,mount_tag=vmshare"]);
    if let Some(common) = &job.common {
        qemu.arg("-fsdev")
            .arg(format!(
                "local,id=common,path={},security_model=none",
                common.display()
            ))
            .args(["-device", "virtio-9p-pci,fsdev=common,mount_tag=vmcommon"]);
    }
    qemu.stdin(Stdio::null())
        .stdout(log.try_clone()?)
        .stderr(log);

    let done = Arc::new(AtomicBool::new(false));
    let start = Instant::now();
    let mut child = qemu
        .spawn()
        .with_context(|| format!("failed to start {}", tree.qemu().display()))?;
    let sink = |stdout: bool| -> Box<dyn Write + Send> {
        match (job.prefix_output, stdout) {
            (true, _) => Box::new(Prefixed::new(format!("[{}] ", job.name))),
            (false, true) => Box::new(io::stdout()),
            (false, false) => Box::new(io::stderr()),
        }
    };
    let pumps = [
        spawn_pump(out_fifo, sink(true), done.clone()),
        spawn_pump(err_fifo, sink(false), done.clone()),
    ];

    let timeout = job.timeout;
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

    // Keep the console of the last run of this name.
    let kept = ws
        .target_dir()
        .join("vm-test")
        .join(format!("console-{}.log", job.name));
    let _ = fs::create_dir_all(kept.parent().expect("has a parent"));
    let _ = fs::copy(&console, &kept);

    let wall = start.elapsed();
    let status = fs::read_to_string(share.join("status")).ok();
    let failure = match (exited, &status) {
        (None, _) => Some(format!(
            "the guest did not finish within {} s; killed QEMU",
            timeout.as_secs()
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
    let mut files = BTreeMap::new();
    for entry in fs::read_dir(share)
        .context("listing the shared directory")?
        .flatten()
    {
        let name = entry.file_name().to_string_lossy().into_owned();
        let ours = SHARE_OWN.contains(&name.as_str()) || job.files.iter().any(|(n, _)| *n == name);
        if !ours && entry.file_type().is_ok_and(|t| t.is_file()) {
            files.insert(name, fs::read(entry.path()).unwrap_or_default());
        }
    }
    let status = match failure {
        Some(failure) => {
            show_failure(&qemu_log, &console, &kept);
            Err(format!(
                "{failure} (guest kernel {}, after {:.1} s)",
                guest.release,
                wall.as_secs_f64()
            ))
        }
        None => Ok(status
            .and_then(|s| s.trim().parse().ok())
            .expect("checked above")),
    };
    Ok(Outcome {
        status,
        files,
        wall,
    })
}

/// Sourced by the guest's init (`xtask/vm/init`) once the shared directory is mounted.
fn vm_conf(guest: &Guest, common: bool) -> String {
    let modules = guest
        .modules
        .as_ref()
        .map(|m| m.to_string_lossy().into_owned())
        .unwrap_or_default();
    format!(
        "# Written by xtask for one run of the guest.\nrelease={}\nmodules={}\n\
         modprobe=/run/vm-test/modprobe\ncommon={}\n",
        quote(&guest.release),
        quote(&modules),
        if common { "1" } else { "" },
    )
}

/// The guest kernel's modprobe (`/proc/sys/kernel/modprobe`, and `/sbin/modprobe` in the
/// guest): the tree's kmod, finding the tree's libraries first.
fn modprobe_wrapper(tree: &Tree) -> anyhow::Result<String> {
    Ok(format!(
        "#!/bin/sh\n# Written by xtask for one run of the guest: the tree's kmod.\n\
         LD_LIBRARY_PATH={} exec {} \"$@\"\n",
        quote(&tree.ld_library_path()?.to_string_lossy()),
        quote(&tree.modprobe().to_string_lossy()),
    ))
}

/// Each line prefixed, written whole (one `write_all` per batch of whole lines: on our
/// stdout, two guests' lines do not mix).
struct Prefixed<W: Write> {
    inner: W,
    prefix: String,
    partial: Vec<u8>,
}

impl Prefixed<io::Stdout> {
    fn new(prefix: String) -> Self {
        Self {
            inner: io::stdout(),
            prefix,
            partial: Vec::new(),
        }
    }
}

impl<W: Write> Write for Prefixed<W> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.partial.extend_from_slice(buf);
        let Some(end) = self.partial.iter().rposition(|b| *b == b'\n') else {
            return Ok(buf.len());
        };
        let mut out = Vec::new();
        for line in self.partial[..end].split(|b| *b == b'\n') {
            out.extend_from_slice(self.prefix.as_bytes());
            out.extend_from_slice(line);
            out.push(b'\n');
        }
        self.partial.drain(..=end);
        self.inner.write_all(&out)?;
        Ok(buf.len())
    }

    fn flush(&mut self) -> io::Result<()> {
        self.inner.flush()
    }
}

impl<W: Write> Drop for Prefixed<W> {
    fn drop(&mut self) {
        if !self.partial.is_empty() {
            let line = [self.prefix.as_bytes(), &self.partial, b"\n"].concat();
            self.partial.clear();
            let _ = self.inner.write_all(&line);
        }
    }
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
fn stage2(cwd: &Path, command: &[String], extra: &[(String, String)], busybox: &Path) -> String {
    let mut vars = BTreeMap::new();
    for (key, value) in env::vars_os() {
        let key = key.to_string_lossy().into_owned();
        if PASS_ENV.contains(&key.as_str()) || key.starts_with("TRACER_") {
            vars.insert(key, value.to_string_lossy().into_owned());
        }
    }
    for (key, value) in extra {
        vars.insert(key.clone(), value.clone());
    }
    let env_args: Vec<String> = vars
        .iter()
        .map(|(k, v)| quote(&format!("{k}={v}")))
        .collect();
    let command: Vec<String> = command.iter().map(|a| quote(a)).collect();
    format!(
        r#"#!/bin/sh
# Written by xtask for one run of the guest.
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
# The tree's busybox: this machine may have none.
exec {busybox} poweroff -f
"#,
        busybox = quote(&busybox.to_string_lossy()),
        cwd = quote(&cwd.to_string_lossy()),
        env = env_args.join(" "),
        command = command.join(" "),
    )
}

/// Single-quote for sh.
pub(crate) fn quote(s: &str) -> String {
    format!("'{}'", s.replace('\'', r"'\''"))
}

/// Run dirs of xtask processes that are gone (e.g. ended by Ctrl-C).
fn remove_stale_run_dirs() {
    let Ok(entries) = fs::read_dir(env::temp_dir()) else {
        return;
    };
    for entry in entries.flatten() {
        let name = entry.file_name();
        let Some(pid) = name
            .to_str()
            .and_then(|n| n.strip_prefix("xtask-vm-"))
            .and_then(|n| n.split('-').next())
        else {
            continue;
        };
        if pid.parse::<u32>().is_ok() && !Path::new("/proc").join(pid).exists() {
            let _ = fs::remove_dir_all(entry.path());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn show_gives_candidates_and_dependency_groups() {
        let out = "Package: qemu-system-x86\nVersion: 1:7.2+dfsg-7+deb12u18+b3\n\
                   Architecture: amd64\nPre-Depends: libc6 (>= 2.34)\n\
                   Depends: libaio1 (>= 0.3.93), debconf (>= 0.5) | debconf-2.0, \
                   python3:any, qemu-system-common (= 1:7.2+dfsg-7+deb12u18+b3)\n\
                   Description: QEMU\n multi-line\n\n\
                   Package: seabios\nVersion: 1.16.2-1\nArchitecture: all\n";
        let shown = parse_show(out);
        assert_eq!(shown.len(), 2);
        assert_eq!(
            shown[0].deb.file_name(),
            "qemu-system-x86_1%3a7.2+dfsg-7+deb12u18+b3_amd64.deb"
        );
        assert_eq!(
            shown[0].depends,
            [
                vec!["libc6"],
                vec!["libaio1"],
                vec!["debconf", "debconf-2.0"],
                vec!["python3"],
                vec!["qemu-system-common"],
            ]
        );
        assert_eq!(shown[1].deb.file_name(), "seabios_1.16.2-1_all.deb");
        assert!(shown[1].depends.is_empty());
    }

    #[test]
    fn policy_tells_installed_and_candidate() {
        let out = "libc6:\n  Installed: 2.36-9+deb12u14\n  Candidate: 2.36-9+deb12u14\n\
                   \x20 Version table:\n *** 2.36-9+deb12u14 500\n\
                   debconf-2.0:\n  Installed: (none)\n  Candidate: (none)\n  Version table:\n\
                   libslirp0:\n  Installed: (none)\n  Candidate: 4.7.0-1\n";
        let p = parse_policy(out);
        assert!(p["libc6"].installed && p["libc6"].candidate);
        assert!(!p["debconf-2.0"].installed && !p["debconf-2.0"].candidate);
        assert!(!p["libslirp0"].installed && p["libslirp0"].candidate);
        assert!(!p.contains_key("Version table"));
    }

    #[test]
    fn absolute_symlinks_become_relative_inside_the_tree() {
        let root = env::temp_dir().join(format!("xtask-vm-test-links-{}", std::process::id()));
        let _ = fs::remove_dir_all(&root);
        fs::create_dir_all(root.join("sbin")).unwrap();
        fs::create_dir_all(root.join("bin")).unwrap();
        fs::write(root.join("bin/kmod"), "").unwrap();
        std::os::unix::fs::symlink("/bin/kmod", root.join("sbin/modprobe")).unwrap();
        std::os::unix::fs::symlink("kmod", root.join("bin/lsmod")).unwrap();
        relativize_symlinks(&root, &root).unwrap();
        assert_eq!(
            fs::read_link(root.join("sbin/modprobe")).unwrap(),
            Path::new("../bin/kmod")
        );
        assert_eq!(
            fs::read_link(root.join("bin/lsmod")).unwrap(),
            Path::new("kmod")
        );
        assert!(root.join("sbin/modprobe").is_file());
        fs::remove_dir_all(&root).unwrap();
    }

    #[test]
    fn prefixed_output_is_whole_lines() {
        let mut p = Prefixed {
            inner: Vec::new(),
            prefix: "[g] ".into(),
            partial: Vec::new(),
        };
        p.write_all(b"one\ntw").unwrap();
        assert_eq!(p.inner, b"[g] one\n");
        p.write_all(b"o\n\nthree\nfour").unwrap();
        assert_eq!(p.inner, b"[g] one\n[g] two\n[g] \n[g] three\n");
        p.flush().unwrap();
        let mut inner = Vec::new();
        std::mem::swap(&mut inner, &mut p.inner);
        drop(p);
        assert_eq!(inner, b"[g] one\n[g] two\n[g] \n[g] three\n");
    }
}

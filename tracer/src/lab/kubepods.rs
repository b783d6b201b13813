//! Kubelet-like cgroup trees on the real cgroup2 mount, for the privileged tests and the
//! lab: pods whose processes sit in cgroups laid out the way kubelet lays them out, and a
//! temporary node root with the pods' `/var/log/pods` directories and `etc-hosts` files, so
//! that [`PodIndex`](crate::pods::PodIndex) names them as it would on a node.
//!
//! Every tree sits below a lab-owned prefix, `<cgroup2>/ctlab-<pid>-<n>.slice/`, e.g.
//!
//! ```text
//! ctlab-4242-0.slice/kubepods.slice/kubepods-besteffort.slice/
//!     kubepods-besteffort-pod1f3a0c2e_5b6d_4e7f_8a9b_0c1d2e3f4a5b.slice/cri-containerd-<64 hex>.scope
//! ctlab-4242-0.slice/kubepods/burstable/pod1f3a0c2e-5b6d-4e7f-8a9b-0c1d2e3f4a5b/<64 hex>
//! ```
//!
//! On drop, the processes still in the tree are moved to this process's own cgroup and the
//! directories are removed bottom-up (a cgroup can only be removed when it is empty), then
//! the node root. If the creating process dies before that, [`leftovers`] lists the trees and
//! [`remove_stale`] removes those whose creator is gone.

use std::{
    ffi::CString,
    fs,
    io::{self, Write as _},
    os::unix::{ffi::OsStrExt as _, fs::MetadataExt as _, process::CommandExt as _},
    path::{Path, PathBuf},
    process::Command,
    sync::atomic::{AtomicU64, Ordering},
    time::{Duration, Instant, SystemTime},
};

use anyhow::Context as _;

use super::topology::PREFIX;
use crate::{
    pods::{NodePaths, QosClass, Runtime},
    preflight,
};

/// How long removing one cgroup directory is retried (exiting processes leave late).
const RMDIR_WAIT: Duration = Duration::from_secs(3);

static COUNTER: AtomicU64 = AtomicU64::new(0);

/// Kubelet's cgroup driver to imitate.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Layout {
    /// `kubepods.slice/kubepods-<qos>.slice/kubepods-<qos>-pod<uid_>.slice/<runtime>-<id>.scope`
    Systemd,
    /// `kubepods/<qos>/pod<uid>/<id>` (`crio-<id>` for CRI-O)
    Cgroupfs,
}

/// One pod to make.
#[derive(Debug, Clone)]
pub struct PodSpec {
    pub namespace: String,
    pub name: String,
    pub layout: Layout,
    pub qos: QosClass,
    pub runtime: Runtime,
}

impl PodSpec {
    /// A best-effort containerd pod.
    pub fn new(namespace: &str, name: &str, layout: Layout) -> PodSpec {
        PodSpec {
            namespace: namespace.to_string(),
            name: name.to_string(),
            layout,
            qos: QosClass::BestEffort,
            runtime: Runtime::Containerd,
        }
    }

    pub fn qos(mut self, qos: QosClass) -> PodSpec {
        self.qos = qos;
        self
    }

    pub fn runtime(mut self, runtime: Runtime) -> PodSpec {
        self.runtime = runtime;
        self
    }
}

/// One pod made by [`LabPodCgroups`], with one container.
#[derive(Debug)]
pub struct LabPod {
    pub namespace: String,
    pub name: String,
    /// With dashes.
    pub uid: String,
    /// The container's name (its log directory).
    pub container: String,
    /// 64 hex digits.
    pub container_id: String,
    pub layout: Layout,
    pub qos: QosClass,
    pub runtime: Runtime,
    /// The container's cgroup directory.
    pub dir: PathBuf,
    /// The container's cgroup path below the cgroup2 mount, as `/proc/PID/cgroup` shows it.
    pub cgroup: String,
    procs: CString,
}

impl LabPod {
    /// `namespace/name`, as [`Workload::label`](crate::pods::Workload::label) shows it.
    pub fn label(&self) -> String {
        format!("{}/{}", self.namespace, self.name)
    }

    /// The container cgroup's id (its inode number), what the kernel reports.
    pub fn cgroup_id(&self) -> io::Result<u64> {
        Ok(fs::metadata(&self.dir)?.ino())
    }

    /// Makes `cmd` start in the container's cgroup: the child writes `0` to `cgroup.procs`
    /// after fork and before exec, so it is there before it runs anything.
    pub fn enter(&self, cmd: &mut Command) {
        join_on_exec(cmd, self.procs.clone());
    }

    /// The processes in the container's cgroup.
    pub fn pids(&self) -> Vec<u32> {
        procs_of(&self.dir)
    }
}

/// Makes `cmd` join the cgroup whose `cgroup.procs` is `procs`, between fork and exec.
pub fn join_on_exec(cmd: &mut Command, procs: CString) {
    let join = move || -> io::Result<()> {
        // SAFETY: open/write/close are async-signal-safe; `procs` was allocated before the
        // fork and is only read.
        let fd = unsafe { libc::open(procs.as_ptr(), libc::O_WRONLY | libc::O_CLOEXEC) };
        if fd < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: writes one byte from a static buffer to the fd opened above.
        let n = unsafe { libc::write(fd, b"0".as_ptr().cast(), 1) };
        let err = (n != 1).then(io::Error::last_os_error);
        // SAFETY: closes the fd opened above, once.
        unsafe { libc::close(fd) };
        err.map_or(Ok(()), Err)
    };
    // SAFETY: the closure only makes async-signal-safe calls (see above), as required
    // between fork and exec.
    unsafe {
        cmd.pre_exec(join);
    }
}

/// Kubelet-like cgroup trees below a lab-owned prefix of the cgroup2 mount, plus a temporary
/// node root; removed on drop.
#[derive(Debug)]
pub struct LabPodCgroups {
    cgroup2: PathBuf,
    top: PathBuf,
    node_root: PathBuf,
    pods: Vec<LabPod>,
}

/// Pseudo-random 64-bit words (splitmix64) seeded from the pid, a counter and the clock.
fn words(n: usize) -> Vec<u64> {
    let nanos = SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos() as u64);
    let mut x = nanos
        ^ (u64::from(std::process::id()) << 32)
        ^ COUNTER
            .fetch_add(1, Ordering::Relaxed)
            .wrapping_mul(0x9e37_79b9_7f4a_7c15);
    (0..n)
        .map(|_| {
            x = x.wrapping_add(0x9e37_79b9_7f4a_7c15);
            let mut z = x;
            z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
            z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
            z ^ (z >> 31)
        })
        .collect()
}

fn new_uid() -> String {
    let w = words(2);
    format!(
        "{:08x}-{:04x}-4{:03x}-{:04x}-{:012x}",
        w[0] >> 32,
        (w[0] >> 16) & 0xffff,
        w[0] & 0xfff,
        ((w[1] >> 48) & 0x3fff) | 0x8000,
        w[1] & 0xffff_ffff_ffff
    )
}

fn new_container_id() -> String {
    words(4).iter().map(|w| format!("{w:016x}")).collect()
}

/// The container cgroup's path below the lab prefix.
fn pod_path(spec: &PodSpec, uid: &str, id: &str) -> String {
    let qos = match spec.qos {
        QosClass::Guaranteed => None,
        q => Some(q.name()),
    };
    match spec.layout {
        Layout::Systemd => {
            let scope = match spec.runtime {
                Runtime::Containerd => "cri-containerd",
                Runtime::CriO => "crio",
                Runtime::Docker => "docker",
            };
            let u = uid.replace('-', "_");
            match qos {
                Some(q) => format!(
                    "kubepods.slice/kubepods-{q}.slice/kubepods-{q}-pod{u}.slice/{scope}-{id}.scope"
                ),
                None => format!("kubepods.slice/kubepods-pod{u}.slice/{scope}-{id}.scope"),
            }
        }
        Layout::Cgroupfs => {
            let leaf = match spec.runtime {
                Runtime::CriO => format!("crio-{id}"),
                Runtime::Containerd | Runtime::Docker => id.to_string(),
            };
            match qos {
                Some(q) => format!("kubepods/{q}/pod{uid}/{leaf}"),
                None => format!("kubepods/pod{uid}/{leaf}"),
            }
        }
    }
}

impl LabPodCgroups {
    /// Makes the pods' cgroups below a new `ctlab-<pid>-<n>.slice` of the cgroup2 mount and
    /// their log directories in a new temporary node root. Needs root.
    pub fn create(specs: &[PodSpec]) -> anyhow::Result<LabPodCgroups> {
        let cgroup2 = preflight::cgroup_root(None)?;
        let pid = std::process::id();
        let (top, node_root) = loop {
            let n = COUNTER.fetch_add(1, Ordering::Relaxed);
            let top = cgroup2.join(format!("{PREFIX}-{pid}-{n}.slice"));
            match fs::create_dir(&top) {
                Ok(()) => {
                    break (
                        top,
                        std::env::temp_dir().join(format!("{PREFIX}-pods-{pid}-{n}")),
                    )
                }
                Err(e) if e.kind() == io::ErrorKind::AlreadyExists => continue,
                Err(e) => {
                    return Err(e)
                        .with_context(|| format!("creating cgroup {} (needs root)", top.display()))
                }
            }
        };
        // From here on the guard cleans up on error.
        let mut lab = LabPodCgroups {
            cgroup2,
            top,
            node_root,
            pods: Vec::new(),
        };
        let _ = fs::remove_dir_all(&lab.node_root);
        fs::create_dir_all(lab.node_root.join("var/log/pods"))?;
        fs::create_dir_all(lab.node_root.join("var/lib/kubelet/pods"))?;
        for (i, spec) in specs.iter().enumerate() {
            let uid = new_uid();
            let container_id = new_container_id();
            let dir = lab.top.join(pod_path(spec, &uid, &container_id));
            fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
            let container = "app".to_string();
            let logs = lab
                .node_root
                .join("var/log/pods")
                .join(format!("{}_{}_{uid}", spec.namespace, spec.name))
                .join(&container);
            fs::create_dir_all(&logs)?;
            fs::write(logs.join("0.log"), "")?;
            let kubelet = lab.node_root.join("var/lib/kubelet/pods").join(&uid);
            fs::create_dir_all(&kubelet)?;
            fs::write(
                kubelet.join("etc-hosts"),
                format!(
                    "# Kubernetes-managed hosts file.\n127.0.0.1\tlocalhost\n\
                     ::1\tlocalhost ip6-localhost ip6-loopback\n10.244.{i}.2\t{}\n",
                    spec.name
                ),
            )?;
            let rel = dir
                .strip_prefix(&lab.cgroup2)
                .context("container cgroup outside the cgroup2 mount")?;
            let procs = CString::new(dir.join("cgroup.procs").as_os_str().as_bytes())
                .context("cgroup path with a NUL byte")?;
            lab.pods.push(LabPod {
                namespace: spec.namespace.clone(),
                name: spec.name.clone(),
                uid,
                container,
                container_id,
                layout: spec.layout,
                qos: spec.qos,
                runtime: spec.runtime,
                cgroup: format!("/{}", rel.display()),
                dir,
                procs,
            });
        }
        Ok(lab)
    }

    pub fn pods(&self) -> &[LabPod] {
        &self.pods
    }

    pub fn pod(&self, name: &str) -> Option<&LabPod> {
        self.pods.iter().find(|p| p.name == name)
    }

    /// The lab's prefix cgroup (`<cgroup2>/ctlab-<pid>-<n>.slice`).
    pub fn top(&self) -> &Path {
        &self.top
    }

    /// The temporary node root holding `var/log/pods` and `var/lib/kubelet/pods`.
    pub fn node_root(&self) -> &Path {
        &self.node_root
    }

    /// The real cgroup2 mount and `/proc`, with the lab's pods log and kubelet directories.
    pub fn node_paths(&self) -> NodePaths {
        NodePaths {
            root: PathBuf::from("/"),
            cgroup2: self.cgroup2.clone(),
            proc: PathBuf::from("/proc"),
            pods_log: self.node_root.join("var/log/pods"),
            kubelet_pods: self.node_root.join("var/lib/kubelet/pods"),
        }
    }
}

impl Drop for LabPodCgroups {
    fn drop(&mut self) {
        if let Err(e) = remove_tree(&self.cgroup2, &self.top) {
            log::warn!("removing lab cgroups {}: {e}", self.top.display());
        }
        let _ = fs::remove_dir_all(&self.node_root);
    }
}

fn procs_of(dir: &Path) -> Vec<u32> {
    fs::read_to_string(dir.join("cgroup.procs"))
        .unwrap_or_default()
        .lines()
        .filter_map(|l| l.trim().parse().ok())
        .collect()
}

/// Where processes left in a lab tree go: this process's own cgroup v2, unless that is in
/// the tree (then the root).
fn evacuation_target(cgroup2: &Path, top: &Path) -> PathBuf {
    let own = fs::read_to_string("/proc/self/cgroup")
        .unwrap_or_default()
        .lines()
        .find_map(|l| l.strip_prefix("0::").map(str::to_string));
    match own {
        Some(p) => {
            let dir = cgroup2.join(p.trim_start_matches('/'));
            if dir.starts_with(top) || !dir.is_dir() {
                cgroup2.to_path_buf()
            } else {
                dir
            }
        }
        None => cgroup2.to_path_buf(),
    }
}

fn evacuate(dir: &Path, target: &Path) {
    for pid in procs_of(dir) {
        let moved = fs::OpenOptions::new()
            .write(true)
            .open(target.join("cgroup.procs"))
            .and_then(|mut f| f.write_all(pid.to_string().as_bytes()));
        if let Err(e) = moved {
            // ESRCH: it exited meanwhile.
            if e.raw_os_error() != Some(libc::ESRCH) {
                log::warn!(
                    "moving pid {pid} from {} to {}: {e}",
                    dir.display(),
                    target.display()
                );
            }
        }
    }
}

/// Moves every process out of the tree at `top` and removes its directories bottom-up.
fn remove_tree(cgroup2: &Path, top: &Path) -> Result<(), String> {
    let target = evacuation_target(cgroup2, top);
    // Parents before children; removed in reverse.
    let mut dirs = Vec::new();
    let mut stack = vec![top.to_path_buf()];
    while let Some(d) = stack.pop() {
        if let Ok(rd) = fs::read_dir(&d) {
            for e in rd.flatten() {
                if e.file_type().is_ok_and(|t| t.is_dir()) {
                    stack.push(e.path());
                }
            }
        }
        dirs.push(d);
    }
    for d in dirs.iter().rev() {
        let deadline = Instant::now() + RMDIR_WAIT;
        loop {
            evacuate(d, &target);
            match fs::remove_dir(d) {
                Ok(()) => break,
                Err(e) if e.kind() == io::ErrorKind::NotFound => break,
                Err(e) if Instant::now() >= deadline => {
                    return Err(format!("{}: {e}", d.display()));
                }
                Err(_) => std::thread::sleep(Duration::from_millis(10)),
            }
        }
    }
    Ok(())
}

/// Lab cgroup trees (`ctlab-*`) under the cgroup2 mount, from any process.
pub fn leftovers() -> Vec<PathBuf> {
    let Ok(cgroup2) = preflight::cgroup_root(None) else {
        return Vec::new();
    };
    let Ok(dir) = fs::read_dir(&cgroup2) else {
        return Vec::new();
    };
    let mut out: Vec<PathBuf> = dir
        .flatten()
        .filter(|e| {
            e.file_type().is_ok_and(|t| t.is_dir())
                && e.file_name()
                    .to_str()
                    .is_some_and(|n| n.starts_with(&format!("{PREFIX}-")))
        })
        .map(|e| e.path())
        .collect();
    out.sort();
    out
}

/// `ctlab-<pid>-<n>.slice` -> pid.
fn creator(path: &Path) -> Option<u32> {
    let name = path.file_name()?.to_str()?;
    let rest = name.strip_prefix(PREFIX)?.strip_prefix('-')?;
    let rest = rest.strip_suffix(".slice")?;
    let (pid, n) = rest.split_once('-')?;
    n.parse::<u64>().ok()?;
    pid.parse().ok()
}

fn pid_alive(pid: u32) -> bool {
    let Ok(p) = libc::pid_t::try_from(pid) else {
        return false;
    };
    // SAFETY: signal 0 only checks for existence.
    let rc = unsafe { libc::kill(p, 0) };
    rc == 0 || io::Error::last_os_error().raw_os_error() != Some(libc::ESRCH)
}

/// Removes this process's own lab trees and node roots (the signal path of `tracer lab`,
/// where no destructor runs); returns the trees removed.
pub fn remove_own() -> Vec<PathBuf> {
    let me = std::process::id();
    let mut removed = Vec::new();
    if let Ok(cgroup2) = preflight::cgroup_root(None) {
        for top in leftovers() {
            if creator(&top) != Some(me) {
                continue;
            }
            match remove_tree(&cgroup2, &top) {
                Ok(()) => removed.push(top),
                Err(e) => log::warn!("removing lab cgroups {}: {e}", top.display()),
            }
        }
    }
    let roots = format!("{PREFIX}-pods-{me}-");
    if let Ok(dir) = fs::read_dir(std::env::temp_dir()) {
        for e in dir.flatten() {
            if e.file_name()
                .to_str()
                .is_some_and(|n| n.starts_with(&roots))
            {
                let _ = fs::remove_dir_all(e.path());
            }
        }
    }
    removed
}

/// Removes the lab trees whose creating process no longer exists (moving the processes in
/// them out first); returns the trees removed.
pub fn remove_stale() -> Vec<PathBuf> {
    let Ok(cgroup2) = preflight::cgroup_root(None) else {
        return Vec::new();
    };
    let mut removed = Vec::new();
    for top in leftovers() {
        let Some(pid) = creator(&top) else {
            continue;
        };
        if pid == std::process::id() || pid_alive(pid) {
            continue;
        }
        match remove_tree(&cgroup2, &top) {
            Ok(()) => removed.push(top),
            Err(e) => log::warn!("removing stale lab cgroups {}: {e}", top.display()),
        }
    }
    removed
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::pods::{parse_cgroup_path, CgroupDriver};

    #[test]
    fn paths_parse_back() {
        for layout in [Layout::Systemd, Layout::Cgroupfs] {
            for qos in [
                QosClass::Guaranteed,
                QosClass::Burstable,
                QosClass::BestEffort,
            ] {
                for runtime in [Runtime::Containerd, Runtime::CriO, Runtime::Docker] {
                    let spec = PodSpec::new("ns", "p", layout).qos(qos).runtime(runtime);
                    let (uid, id) = (new_uid(), new_container_id());
                    let path = format!("/{PREFIX}-1-0.slice/{}", pod_path(&spec, &uid, &id));
                    let c = parse_cgroup_path(&path).unwrap_or_else(|| panic!("{path}"));
                    assert_eq!(c.pod_uid, uid, "{path}");
                    assert_eq!(c.container_id.as_deref(), Some(id.as_str()), "{path}");
                    assert_eq!(c.qos, qos, "{path}");
                    let (driver, rt) = match layout {
                        Layout::Systemd => (CgroupDriver::Systemd, Some(runtime)),
                        Layout::Cgroupfs => (
                            CgroupDriver::Cgroupfs,
                            (runtime == Runtime::CriO).then_some(runtime),
                        ),
                    };
                    assert_eq!((c.driver, c.runtime), (driver, rt), "{path}");
                }
            }
        }
        assert_ne!(new_uid(), new_uid());
        assert_eq!(creator(Path::new("/x/ctlab-4242-7.slice")), Some(4242));
        assert_eq!(creator(Path::new("/x/ctlab-4242.slice")), None);
    }
}

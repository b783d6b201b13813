//! Checks made before anything is loaded, each with an error that says what to do.

use std::{
    fs,
    path::{Path, PathBuf},
};

#[derive(Debug, thiserror::Error)]
pub enum PreflightError {
    #[error(
        "not privileged enough: missing {missing} (effective uid {uid}). Run as root, or as a \
         privileged container, or grant CAP_BPF, CAP_PERFMON and CAP_NET_ADMIN"
    )]
    NotPrivileged { missing: String, uid: u32 },
    #[error(
        "no kernel BTF at {path}: this kernel was built without CONFIG_DEBUG_INFO_BTF=y, so struct \
         offsets can not be resolved (in a container, mount the node's /sys/kernel/btf)"
    )]
    NoBtf { path: PathBuf },
    #[error(
        "no cgroup v2 hierarchy is mounted (looked in {mountinfo}); the DNS programs attach to the \
         cgroup v2 root. Mount one, e.g. `mount -t cgroup2 none /sys/fs/cgroup/unified`, or pass --cgroup"
    )]
    NoCgroup2 { mountinfo: String },
    #[error("--cgroup {path}: {why}")]
    BadCgroup { path: PathBuf, why: String },
    #[error("tracefs is not mounted and mounting it at {path} failed: {why}")]
    NoTracefs { path: PathBuf, why: String },
}

const CAP_NET_ADMIN: u32 = 12;
const CAP_SYS_ADMIN: u32 = 21;
const CAP_PERFMON: u32 = 38;
const CAP_BPF: u32 = 39;

/// Effective capability set from `/proc/self/status` (`CapEff`).
fn effective_caps(status: &str) -> u64 {
    status
        .lines()
        .find_map(|l| l.strip_prefix("CapEff:"))
        .and_then(|v| u64::from_str_radix(v.trim(), 16).ok())
        .unwrap_or(0)
}

/// The capabilities missing for loading tracing programs and attaching cgroup programs.
pub fn missing_caps(caps: u64) -> Vec<&'static str> {
    let has = |c: u32| caps & (1u64 << c) != 0;
    let mut missing = Vec::new();
    // CAP_SYS_ADMIN covers BPF and PERFMON on every kernel.
    if !has(CAP_SYS_ADMIN) {
        if !has(CAP_BPF) {
            missing.push("CAP_BPF");
        }
        if !has(CAP_PERFMON) {
            missing.push("CAP_PERFMON");
        }
    }
    if !has(CAP_NET_ADMIN) {
        missing.push("CAP_NET_ADMIN");
    }
    missing
}

pub fn check_privileges() -> Result<(), PreflightError> {
    let status = fs::read_to_string("/proc/self/status").unwrap_or_default();
    let missing = missing_caps(effective_caps(&status));
    if missing.is_empty() {
        return Ok(());
    }
    // SAFETY: geteuid has no preconditions and can not fail.
    let uid = unsafe { libc::geteuid() };
    Err(PreflightError::NotPrivileged {
        missing: missing.join(", "),
        uid,
    })
}

pub fn check_btf(path: &Path) -> Result<(), PreflightError> {
    if path.is_file() {
        Ok(())
    } else {
        Err(PreflightError::NoBtf {
            path: path.to_owned(),
        })
    }
}

/// The first cgroup2 mount point in a mountinfo text.
pub fn cgroup2_mount(mountinfo: &str) -> Option<PathBuf> {
    mountinfo.lines().find_map(|line| {
        let (pre, post) = line.split_once(" - ")?;
        let fstype = post.split_whitespace().next()?;
        if fstype == "cgroup2" {
            Some(PathBuf::from(pre.split_whitespace().nth(4)?))
        } else {
            None
        }
    })
}

/// The cgroup v2 directory the DNS programs attach to: `explicit`, or the cgroup2 mount.
pub fn cgroup_root(explicit: Option<&Path>) -> Result<PathBuf, PreflightError> {
    if let Some(p) = explicit {
        let meta = fs::metadata(p).map_err(|e| PreflightError::BadCgroup {
            path: p.into(),
            why: e.to_string(),
        })?;
        if !meta.is_dir() || !p.join("cgroup.procs").exists() {
            return Err(PreflightError::BadCgroup {
                path: p.into(),
                why: "not a cgroup v2 directory".into(),
            });
        }
        return Ok(p.to_owned());
    }
    let path = "/proc/self/mountinfo";
    let text = fs::read_to_string(path).unwrap_or_default();
    cgroup2_mount(&text).ok_or(PreflightError::NoCgroup2 {
        mountinfo: path.into(),
    })
}

/// Makes sure tracefs is reachable for classic tracepoints; mounts it if needed.
pub fn ensure_tracefs() -> Result<(), PreflightError> {
    let candidates = ["/sys/kernel/tracing", "/sys/kernel/debug/tracing"];
    if candidates
        .iter()
        .any(|p| Path::new(p).join("events").is_dir())
    {
        return Ok(());
    }
    let target = PathBuf::from(candidates[0]);
    let status = std::process::Command::new("mount")
        .args(["-t", "tracefs", "tracefs"])
        .arg(&target)
        .status();
    match status {
        Ok(s) if s.success() && target.join("events").is_dir() => {
            log::info!("mounted tracefs at {}", target.display());
            Ok(())
        }
        Ok(s) => Err(PreflightError::NoTracefs {
            path: target,
            why: format!("mount exited with {s}"),
        }),
        Err(e) => Err(PreflightError::NoTracefs {
            path: target,
            why: e.to_string(),
        }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn caps() {
        assert!(missing_caps(u64::MAX).is_empty());
        assert_eq!(
            missing_caps(0),
            vec!["CAP_BPF", "CAP_PERFMON", "CAP_NET_ADMIN"]
        );
        assert!(missing_caps((1 << CAP_SYS_ADMIN) | (1 << CAP_NET_ADMIN)).is_empty());
        assert_eq!(
            effective_caps("Name:\tx\nCapEff:\t000001ffffffffff\n"),
            0x1ff_ffff_ffff
        );
    }

    #[test]
    fn finds_cgroup2_in_hybrid_layout() {
        let mi = "25 30 0:22 / /sys/fs/cgroup rw - tmpfs tmpfs rw\n\
                  26 25 0:23 / /sys/fs/cgroup/unified rw,nosuid - cgroup2 cgroup2 rw\n";
        assert_eq!(
            cgroup2_mount(mi),
            Some(PathBuf::from("/sys/fs/cgroup/unified"))
        );
        assert_eq!(
            cgroup2_mount("25 30 0:22 / /sys/fs/cgroup rw - tmpfs tmpfs rw\n"),
            None
        );
    }
}

//! `cargo xtask setup`: make this machine able to build, test and run the tracer.
//!
//! Idempotent: every step checks first and prints one line saying what it found or did.
//! Root is needed only when something has to be installed or mounted.

use std::{fs, path::Path, process::Command};

use anyhow::{bail, Context as _};

use crate::util::{self, Workspace};

/// Debian's rustc/cargo (1.96, with a prebuilt `core` for bpfel-unknown-none) at /usr/bin.
const TOOLCHAIN_PACKAGES: &[&str] = &["rustc-web", "cargo-web", "libstd-rust-web-dev-bpf"];
/// Needed to build bpf-linker against the LLVM that rustc-web uses; `{}` is the LLVM major.
const LLVM_PACKAGES: &[&str] = &[
    "llvm-{}-dev",
    "libpolly-{}-dev",
    "libzstd-dev",
    "zlib1g-dev",
];
/// Used by the integration tests and for inspecting a running tracer.
const TOOL_PACKAGES: &[&str] = &[
    "bpftool",
    "dwarves",
    "conntrack",
    "nftables",
    "iptables",
    "iproute2",
    "dnsmasq-base",
    "dnsutils",
    "procps",
    "util-linux",
    "iputils-ping",
    "musl-tools",
    // The postmortem checks: tshark reads the exported pcapng, headless Chromium renders
    // the HTML report (screenshot + DOM).
    "tshark",
    "chromium",
];

pub(crate) const DEBIAN_RUSTC: &str = "/usr/bin/rustc";
pub(crate) const BPF_LINKER_VERSION: &str = "0.13.0";

pub(crate) fn run(ws: &Workspace) -> anyhow::Result<()> {
    let root = util::is_root()?;
    let mut apt = Apt {
        updated: false,
        root,
    };

    // Round 1: rustc-web must be in place before we can ask it for its LLVM major.
    let round1: Vec<String> = TOOLCHAIN_PACKAGES
        .iter()
        .chain(TOOL_PACKAGES)
        .map(|p| p.to_string())
        .collect();
    apt.ensure("toolchain + test tools", &round1)?;

    let major = llvm_major()?;
    let round2: Vec<String> = LLVM_PACKAGES
        .iter()
        .map(|p| p.replace("{}", &major.to_string()))
        .collect();
    apt.ensure(&format!("LLVM {major} dev"), &round2)?;

    bpf_linker(ws, major)?;

    mount(root, "tracefs", "/sys/kernel/tracing", "tracefs")?;
    mount(root, "bpffs", "/sys/fs/bpf", "bpf")?;
    Ok(())
}

struct Apt {
    updated: bool,
    root: bool,
}

impl Apt {
    fn ensure(&mut self, what: &str, packages: &[String]) -> anyhow::Result<()> {
        let missing: Vec<&str> = packages
            .iter()
            .map(String::as_str)
            .filter(|p| !installed(p))
            .collect();
        if missing.is_empty() {
            println!(
                "setup: apt ({what}): all {} packages installed",
                packages.len()
            );
            return Ok(());
        }
        if !self.root {
            bail!(
                "setup: apt ({what}): missing {}; installing them needs root \
                 (running as uid {}): rerun `cargo xtask setup` as root",
                missing.join(" "),
                util::euid()?
            );
        }
        println!("setup: apt ({what}): installing {}", missing.join(" "));
        if !self.updated {
            util::run(Command::new("apt-get").arg("update"))?;
            self.updated = true;
        }
        util::run(
            Command::new("apt-get")
                .env("DEBIAN_FRONTEND", "noninteractive")
                .args(["install", "-y", "--no-install-recommends"])
                .args(&missing),
        )?;
        let still: Vec<&str> = missing.iter().copied().filter(|p| !installed(p)).collect();
        if !still.is_empty() {
            bail!(
                "setup: apt ({what}): still not installed after apt-get: {}",
                still.join(" ")
            );
        }
        Ok(())
    }
}

/// `dpkg-query` says "install ok installed" only for a fully installed package.
pub(crate) fn installed(package: &str) -> bool {
    Command::new("dpkg-query")
        .args(["-W", "-f=${Status}", package])
        .output()
        .is_ok_and(|o| o.status.success() && o.stdout == b"install ok installed")
}

/// The LLVM major version Debian's rustc was built with (`LLVM version: 22.1.8` -> 22).
pub(crate) fn llvm_major() -> anyhow::Result<u32> {
    let vv = util::output(Command::new(DEBIAN_RUSTC).arg("-vV"))?;
    let version = vv
        .lines()
        .find_map(|l| l.strip_prefix("LLVM version:"))
        .with_context(|| format!("no `LLVM version:` line in `{DEBIAN_RUSTC} -vV`:\n{vv}"))?;
    let major = version.trim().split('.').next().unwrap_or_default();
    major
        .parse()
        .with_context(|| format!("bad LLVM version `{}` from {DEBIAN_RUSTC}", version.trim()))
}

fn bpf_linker(ws: &Workspace, major: u32) -> anyhow::Result<()> {
    let bin = ws.tools_bin().join("bpf-linker");
    if util::tool_at("setup: bpf-linker", &bin, BPF_LINKER_VERSION) {
        return Ok(());
    }
    let llvm_prefix = format!("/usr/lib/llvm-{major}");
    if !Path::new(&llvm_prefix).join("bin/llvm-config").exists() {
        bail!("setup: bpf-linker: {llvm_prefix}/bin/llvm-config not found (is llvm-{major}-dev installed?)");
    }
    util::run(
        ws.cargo()?
            .env("LLVM_PREFIX", &llvm_prefix)
            .args(["install", &format!("bpf-linker@{BPF_LINKER_VERSION}")])
            .args(["--locked", "--no-default-features", "--features"])
            .arg(format!("llvm-{major}"))
            .arg("--root")
            .arg(ws.tools()),
    )?;
    Ok(())
}

/// Mount `fstype` at `target` unless something of that type is mounted there already.
fn mount(root: bool, what: &str, target: &str, fstype: &str) -> anyhow::Result<()> {
    let mounts = fs::read_to_string("/proc/mounts").context("reading /proc/mounts")?;
    let mounted = mounts.lines().any(|l| {
        let mut f = l.split_whitespace();
        let (_src, dst, ty) = (f.next(), f.next(), f.next());
        dst == Some(target) && ty == Some(fstype)
    });
    if mounted {
        println!("setup: {what}: mounted at {target}");
        return Ok(());
    }
    if !root {
        bail!("setup: {what}: not mounted at {target}; mounting needs root: rerun `cargo xtask setup` as root");
    }
    util::run(Command::new("mount").args(["-t", fstype, fstype, target]))?;
    println!("setup: {what}: mounted {fstype} at {target}");
    Ok(())
}

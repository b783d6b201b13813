//! `cargo xtask lint`: rustfmt, clippy on the host crates, and a warnings-denied check of
//! the eBPF crate with Debian's toolchain (which has no clippy).

use std::{env, process::Command};

use crate::{
    setup::DEBIAN_RUSTC,
    util::{self, Workspace},
};

pub(crate) fn run(ws: &Workspace) -> anyhow::Result<()> {
    util::run(ws.cargo()?.args(["fmt", "--all", "--", "--check"]))?;
    util::run(ws.cargo()?.args([
        "clippy",
        "--workspace",
        "--exclude",
        "tracer-ebpf",
        "--all-targets",
        "--",
        "-D",
        "warnings",
    ]))?;

    // Same flags aya-build uses, minus the linker ones (check does not link), plus -D warnings.
    let toolchain = DEBIAN_RUSTC
        .strip_suffix("/bin/rustc")
        .expect("DEBIAN_RUSTC ends in /bin/rustc");
    let rustflags = format!(
        "--cfg=bpf_target_arch=\"{}\"\x1f-Dwarnings",
        env::consts::ARCH
    );
    util::run(
        Command::new("rustup")
            .current_dir(&ws.root)
            .env("PATH", ws.path_with_tools()?)
            .env("RUSTC_BOOTSTRAP", "aya_ebpf")
            .env("CARGO_ENCODED_RUSTFLAGS", rustflags)
            .env_remove("RUSTC")
            .env_remove("RUSTC_WORKSPACE_WRAPPER")
            .args([
                "run",
                toolchain,
                "cargo",
                "check",
                "--package",
                "tracer-ebpf",
            ])
            .args(["--bins", "--release", "--target", "bpfel-unknown-none"])
            .arg("--target-dir")
            .arg(ws.target_dir().join("ebpf-lint")),
    )
}

//! Builds `tracer-ebpf` for bpfel-unknown-none with Debian's rustc (/usr/bin, which ships a
//! prebuilt `core` for that target) and bpf-linker, via aya-build. The resulting ELF lands in
//! `$OUT_DIR/tracer` (named after tracer-ebpf's `[[bin]]`); the rest of this crate builds with
//! the ordinary (rustup) toolchain. `cargo xtask setup` installs everything this needs.

use std::{
    env,
    ffi::OsString,
    path::{Path, PathBuf},
};

use anyhow::{bail, Context as _};

/// `rustup run <this>` is the toolchain aya-build uses: Debian's rustc-web/cargo-web.
const EBPF_TOOLCHAIN: &str = "/usr";
const SETUP_HINT: &str = "run `cargo xtask setup` (as root) to install the eBPF toolchain";

fn main() {
    if let Err(e) = run() {
        // `{:#}`: the context chain on one line; no anyhow backtrace drowning the hint.
        eprintln!("error: {e:#}");
        std::process::exit(1);
    }
}

fn run() -> anyhow::Result<()> {
    let manifest_dir =
        PathBuf::from(env::var_os("CARGO_MANIFEST_DIR").context("CARGO_MANIFEST_DIR not set")?);
    let workspace = manifest_dir
        .parent()
        .context("tracer has no parent directory")?;
    let ebpf_dir = workspace.join("tracer-ebpf");
    let tools_bin = workspace.join(".tools").join("bin");

    // Rebuild the eBPF object when anything that goes into it changes. aya-build adds
    // tracer-ebpf's directory itself; the shared record layouts live in tracer-common.
    for path in [
        workspace.join("tracer-common"),
        workspace.join("Cargo.toml"),
        workspace.join("Cargo.lock"),
        PathBuf::from(EBPF_TOOLCHAIN).join("bin/rustc"),
    ] {
        println!("cargo:rerun-if-changed={}", path.display());
    }

    let rustc = Path::new(EBPF_TOOLCHAIN).join("bin/rustc");
    if !rustc.is_file() {
        bail!(
            "{} not found (Debian's rustc-web builds the eBPF programs): {SETUP_HINT}",
            rustc.display()
        );
    }
    if find_in_path("rustup").is_none() {
        bail!("rustup not found on PATH: aya-build runs `rustup run {EBPF_TOOLCHAIN} cargo build ...`; \
             build with rustup's cargo (~/.cargo/bin first on PATH), not Debian's /usr/bin/cargo");
    }

    // bpf-linker: the one `cargo xtask setup` put in <workspace>/.tools/bin wins.
    let path = env::var_os("PATH").unwrap_or_default();
    let mut dirs = vec![tools_bin.clone()];
    dirs.extend(env::split_paths(&path).filter(|d| *d != tools_bin));
    let path: OsString = env::join_paths(dirs).context("joining PATH")?;
    env::set_var("PATH", &path);
    let Some(bpf_linker) = find_in_path("bpf-linker") else {
        bail!(
            "bpf-linker not found in {} nor on PATH: {SETUP_HINT}",
            tools_bin.display()
        );
    };
    println!("cargo:rerun-if-changed={}", bpf_linker.display());

    // aya-ebpf uses an unstable feature; allow it for that crate only. ("1" would make
    // aya-build add `-Z build-std`, which needs rust-src that this toolchain lacks.)
    env::set_var("RUSTC_BOOTSTRAP", "aya_ebpf");
    // aya-build turns every stderr line of the inner cargo into a `cargo:warning`; keep
    // its "Compiling ..." progress out of them (compiler diagnostics still come through).
    env::set_var("CARGO_TERM_QUIET", "true");
    env::remove_var("CARGO_TERM_VERBOSE");

    let root_dir = ebpf_dir.to_str().context("tracer-ebpf path is not UTF-8")?;
    aya_build::build_ebpf(
        [aya_build::Package {
            name: "tracer-ebpf",
            root_dir,
            ..Default::default()
        }],
        aya_build::Toolchain::Custom(EBPF_TOOLCHAIN),
    )
    .with_context(|| {
        format!("building tracer-ebpf with `rustup run {EBPF_TOOLCHAIN} cargo` failed")
    })
}

fn find_in_path(name: &str) -> Option<PathBuf> {
    env::split_paths(&env::var_os("PATH")?)
        .map(|d| d.join(name))
        .find(|p| p.is_file())
}

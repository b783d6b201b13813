//! Helpers shared by the verbs: workspace paths and running commands loudly.

use std::{
    env,
    ffi::OsString,
    fs,
    path::{Path, PathBuf},
    process::Command,
};

use anyhow::{bail, Context as _};

pub(crate) struct Workspace {
    /// The workspace root (parent of the xtask crate).
    pub(crate) root: PathBuf,
}

impl Workspace {
    pub(crate) fn locate() -> anyhow::Result<Self> {
        let root = Path::new(env!("CARGO_MANIFEST_DIR"))
            .parent()
            .context("xtask's manifest dir has no parent")?
            .to_path_buf();
        Ok(Self { root })
    }

    /// `<root>/.tools`: where `cargo install --root` puts bpf-linker (gitignored).
    pub(crate) fn tools(&self) -> PathBuf {
        self.root.join(".tools")
    }

    pub(crate) fn tools_bin(&self) -> PathBuf {
        self.tools().join("bin")
    }

    /// The cargo target directory (honours `CARGO_TARGET_DIR`).
    pub(crate) fn target_dir(&self) -> PathBuf {
        match env::var_os("CARGO_TARGET_DIR") {
            Some(dir) => self.root.join(dir),
            None => self.root.join("target"),
        }
    }

    /// `PATH` with `<root>/.tools/bin` in front, so every cargo we start finds bpf-linker.
    pub(crate) fn path_with_tools(&self) -> anyhow::Result<OsString> {
        let tools_bin = self.tools_bin();
        let old = env::var_os("PATH").unwrap_or_default();
        let mut dirs = vec![tools_bin.clone()];
        dirs.extend(env::split_paths(&old).filter(|d| *d != tools_bin));
        env::join_paths(dirs).context("joining PATH")
    }

    /// A `cargo` command run in the workspace root with `.tools/bin` on `PATH`.
    pub(crate) fn cargo(&self) -> anyhow::Result<Command> {
        let mut cmd = Command::new(env::var_os("CARGO").unwrap_or_else(|| "cargo".into()));
        cmd.current_dir(&self.root)
            .env("PATH", self.path_with_tools()?);
        Ok(cmd)
    }
}

/// Print the command, run it with inherited stdio, fail if it fails.
/// A tool in `.tools/bin`: whether it reports `version` in its `--version` output. Prints
/// what it found, prefixed with `who`.
pub(crate) fn tool_at(who: &str, bin: &std::path::Path, version: &str) -> bool {
    let current = Command::new(bin)
        .arg("--version")
        .output()
        .ok()
        .filter(|o| o.status.success())
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string());
    let ok = current
        .as_deref()
        .is_some_and(|v| v.split_whitespace().any(|w| w == version));
    match &current {
        Some(v) if ok => println!("{who}: {} reports `{v}`", bin.display()),
        Some(v) => println!(
            "{who}: {} reports `{v}`; installing {version}",
            bin.display()
        ),
        None => println!("{who}: {} missing; installing {version}", bin.display()),
    }
    ok
}

pub(crate) fn run(cmd: &mut Command) -> anyhow::Result<()> {
    let shown = show(cmd);
    println!("+ {shown}");
    let status = cmd
        .status()
        .with_context(|| format!("failed to start `{shown}`"))?;
    if !status.success() {
        bail!("`{shown}` failed: {status}");
    }
    Ok(())
}

/// Run a command quietly and return its stdout (fails if it fails).
pub(crate) fn output(cmd: &mut Command) -> anyhow::Result<String> {
    let shown = show(cmd);
    let out = cmd
        .output()
        .with_context(|| format!("failed to start `{shown}`"))?;
    if !out.status.success() {
        bail!(
            "`{shown}` failed: {}\n{}",
            out.status,
            String::from_utf8_lossy(&out.stderr).trim_end()
        );
    }
    String::from_utf8(out.stdout).with_context(|| format!("`{shown}` printed non-UTF-8"))
}

fn show(cmd: &Command) -> String {
    let mut s = String::new();
    for (k, v) in cmd.get_envs() {
        if k != "PATH" {
            if let Some(v) = v {
                s.push_str(&format!("{}={} ", k.to_string_lossy(), v.to_string_lossy()));
            }
        }
    }
    // `$CARGO` is a long toolchain path; the file name says enough.
    let program = Path::new(cmd.get_program());
    s.push_str(
        &program
            .file_name()
            .unwrap_or(program.as_os_str())
            .to_string_lossy(),
    );
    for a in cmd.get_args() {
        s.push(' ');
        s.push_str(&a.to_string_lossy());
    }
    s.escape_debug().to_string()
}

/// The effective uid, from `/proc/self/status` (no libc dependency needed).
pub(crate) fn euid() -> anyhow::Result<u32> {
    let status = fs::read_to_string("/proc/self/status").context("reading /proc/self/status")?;
    let line = status
        .lines()
        .find_map(|l| l.strip_prefix("Uid:"))
        .context("no Uid: line in /proc/self/status")?;
    let euid = line
        .split_whitespace()
        .nth(1)
        .context("malformed Uid: line in /proc/self/status")?;
    euid.parse().context("parsing euid")
}

pub(crate) fn is_root() -> anyhow::Result<bool> {
    Ok(euid()? == 0)
}

/// The tracer a benchmark runs: `given` (canonical), or the release build, built now.
pub(crate) fn release_tracer(
    ws: &Workspace,
    given: Option<&std::path::Path>,
) -> anyhow::Result<std::path::PathBuf> {
    use anyhow::Context as _;
    match given {
        Some(bin) => std::fs::canonicalize(bin).with_context(|| format!("{}", bin.display())),
        None => {
            run(ws
                .cargo()?
                .args(["build", "--release", "--package", "tracer"]))?;
            Ok(ws.target_dir().join("release").join("tracer"))
        }
    }
}

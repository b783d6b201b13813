//! Headless Chromium for the report checks (tests/report.rs, tests/postmortem.rs).

use std::{
    fs,
    os::unix::process::CommandExt as _,
    path::{Path, PathBuf},
    process::{Command, Stdio},
    sync::atomic::{AtomicUsize, Ordering},
    time::{Duration, Instant},
};

/// Chromium is killed (with every process it started) after this long.
pub const CHROMIUM_TIMEOUT: Duration = Duration::from_secs(60);

/// The browser: `$CHROMIUM`, else Debian's.
pub fn chromium_binary() -> PathBuf {
    std::env::var_os("CHROMIUM")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("/usr/bin/chromium"))
}

/// Where screenshots are kept: `$CARGO_TARGET_DIR/artefacts`, else the workspace's
/// `target/artefacts` (created).
pub fn artefacts_dir() -> PathBuf {
    let target = std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| Path::new(env!("CARGO_MANIFEST_DIR")).join("../target"));
    let dir = target.join("artefacts");
    fs::create_dir_all(&dir).unwrap_or_else(|e| panic!("creating {}: {e}", dir.display()));
    dir
}

/// A fresh directory under the system's temp dir, removed by [`Scratch::drop`].
pub struct Scratch(pub PathBuf);

impl Scratch {
    pub fn new(what: &str) -> Scratch {
        static N: AtomicUsize = AtomicUsize::new(0);
        let dir = std::env::temp_dir().join(format!(
            "tracer-{what}-{}-{}",
            std::process::id(),
            N.fetch_add(1, Ordering::Relaxed)
        ));
        fs::create_dir_all(&dir).unwrap();
        Scratch(dir)
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = fs::remove_dir_all(&self.0);
    }
}

/// `file://` URL of an absolute path.
fn file_url(path: &Path) -> String {
    let mut url = String::from("file://");
    for b in path.to_str().expect("a UTF-8 path").bytes() {
        match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'/' | b'-' | b'_' | b'.' | b'~' => {
                url.push(b as char)
            }
            _ => url.push_str(&format!("%{b:02X}")),
        }
    }
    url
}

/// What one Chromium run printed.
pub struct ChromiumRun {
    pub stdout: String,
    pub stderr: String,
}

impl ChromiumRun {
    /// What the page logged to its console (CSP violations, failed loads, script errors).
    pub fn console(&self) -> Vec<&str> {
        self.stderr
            .lines()
            .filter(|l| l.contains(":CONSOLE"))
            .collect()
    }
}

/// Waits (up to 5 s) until no process of the group `pgid` (which this test created) is left,
/// then kills what is.
fn reap_group(pgid: i32) {
    let deadline = Instant::now() + Duration::from_secs(5);
    // SAFETY: signal 0 only checks whether the group this test created still has members.
    while unsafe { libc::kill(-pgid, 0) } == 0 {
        if Instant::now() >= deadline {
            // SAFETY: kill(2) on the process group this test created, still populated.
            unsafe { libc::kill(-pgid, libc::SIGKILL) };
            return;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Runs headless Chromium on the local file `page` with `args` (`--screenshot=PATH`,
/// `--dump-dom`, `--window-size=W,H`, ...): a fresh profile under `work`, no sandbox (needed
/// as root), no name resolution at all (`MAP * ~NOTFOUND`: nothing on the network can be
/// reached), the page's console logged to stderr. Chromium runs in its own process group:
/// after `timeout` the whole group is killed and this returns an error, so a test can never
/// hang; after a normal exit the group's stragglers are reaped too. Panics when Chromium is
/// not installed.
pub fn try_chromium(
    page: &Path,
    args: &[&str],
    work: &Path,
    timeout: Duration,
) -> Result<ChromiumRun, String> {
    static N: AtomicUsize = AtomicUsize::new(0);
    let n = N.fetch_add(1, Ordering::Relaxed);
    let bin = chromium_binary();
    assert!(
        bin.exists(),
        "{} not found: `cargo xtask setup` installs chromium (or set CHROMIUM)",
        bin.display()
    );
    let page = fs::canonicalize(page).map_err(|e| format!("{}: {e}", page.display()))?;
    let out_path = work.join(format!("chromium-{n}.out"));
    let err_path = work.join(format!("chromium-{n}.err"));
    let mut cmd = Command::new(&bin);
    cmd.args([
        "--headless",
        "--disable-gpu",
        "--no-sandbox",
        "--hide-scrollbars",
        "--force-device-scale-factor=1",
        "--no-first-run",
        "--no-default-browser-check",
        "--disable-extensions",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        "--host-resolver-rules=MAP * ~NOTFOUND",
        "--enable-logging=stderr",
        "--v=0",
    ])
    .arg(format!(
        "--user-data-dir={}",
        work.join(format!("chromium-profile-{n}")).display()
    ))
    .args(args)
    .arg(file_url(&page))
    .stdin(Stdio::null())
    .stdout(fs::File::create(&out_path).map_err(|e| e.to_string())?)
    .stderr(fs::File::create(&err_path).map_err(|e| e.to_string())?)
    .process_group(0);
    let mut child = cmd
        .spawn()
        .map_err(|e| format!("starting {}: {e}", bin.display()))?;
    let pgid = child.id() as i32;
    let deadline = Instant::now() + timeout;
    let status = loop {
        if let Some(status) = child.try_wait().map_err(|e| e.to_string())? {
            break status;
        }
        if Instant::now() >= deadline {
            // SAFETY: kill(2) on the process group this test created (Chromium's own pid).
            unsafe { libc::kill(-pgid, libc::SIGKILL) };
            let _ = child.wait();
            reap_group(pgid);
            return Err(format!(
                "chromium {args:?} did not finish in {timeout:?}: killed with its process group\n{}",
                fs::read_to_string(&err_path).unwrap_or_default()
            ));
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    // Its helpers (zygote, renderer, GPU process) leave right after it; make sure.
    reap_group(pgid);
    let run = ChromiumRun {
        stdout: fs::read_to_string(&out_path).unwrap_or_default(),
        stderr: fs::read_to_string(&err_path).unwrap_or_default(),
    };
    if !status.success() {
        return Err(format!(
            "chromium {args:?} failed: {status}\n{}",
            run.stderr
        ));
    }
    Ok(run)
}

/// [`try_chromium`] with [`CHROMIUM_TIMEOUT`]; panics when it fails.
pub fn chromium(page: &Path, args: &[&str], work: &Path) -> ChromiumRun {
    try_chromium(page, args, work, CHROMIUM_TIMEOUT).unwrap_or_else(|e| panic!("{e}"))
}

/// A screenshot of `page` at `width`×`height` to `png`; checks it is a PNG of that size.
pub fn screenshot(
    page: &Path,
    png: &Path,
    (width, height): (u32, u32),
    work: &Path,
) -> ChromiumRun {
    let _ = fs::remove_file(png);
    let run = chromium(
        page,
        &[
            &format!("--screenshot={}", png.display()),
            &format!("--window-size={width},{height}"),
        ],
        work,
    );
    let bytes = fs::read(png)
        .unwrap_or_else(|e| panic!("no screenshot {}: {e}\n{}", png.display(), run.stderr));
    assert_eq!(&bytes[..8], b"\x89PNG\r\n\x1a\n", "a PNG");
    assert_eq!(&bytes[12..16], b"IHDR");
    let w = u32::from_be_bytes(bytes[16..20].try_into().unwrap());
    let h = u32::from_be_bytes(bytes[20..24].try_into().unwrap());
    assert_eq!((w, h), (width, height), "screenshot size");
    run
}

/// The DOM of `page` after it loaded, serialized.
pub fn dump_dom(page: &Path, work: &Path) -> ChromiumRun {
    let run = chromium(page, &["--dump-dom", "--window-size=1400,2000"], work);
    assert!(
        run.stdout.contains("</html>"),
        "no DOM dumped:\n{}",
        run.stderr
    );
    run
}

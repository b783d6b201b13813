//! Network-namespace harness: disposable namespaces, veth links, processes and a real DNS
//! server (dnsmasq), all cleaned up by guards.
//!
//! Used by the privileged integration tests and by `tracer lab`, which builds small
//! "clusters" out of network namespaces. Everything here needs root (CAP_SYS_ADMIN and
//! CAP_NET_ADMIN) and the `ip` tool from iproute2; `nft`, `ss` (iproute2) and `dnsmasq` are
//! needed by the helpers that use them.
//!
//! The tests in this module need root and, besides those tools, `ping` (iputils-ping) and
//! `dig` (bind9-dnsutils); they fail (not skip) when not run as root.
//!
//! Rules the guards enforce:
//! - every namespace is created with a unique name `<prefix>-<pid>-<counter>` and removed
//!   on drop (also while unwinding from a panic); every process still inside it is killed
//!   by its own pid first;
//! - every external command runs with a time limit; every wait is bounded;
//! - links are created directly inside the namespaces (`ip link add ... netns NAME`), so
//!   nothing is ever added to the caller's namespace and no traffic leaves the namespaces.
//!
//! If a process is killed before its guards run (SIGKILL, abort), its namespaces stay
//! behind; [`leftovers`] lists them and [`remove_stale`] removes those whose creating
//! process is gone.

use std::ffi::OsStr;
use std::fmt::Write as _;
use std::fs::{self, File, OpenOptions};
use std::io::{self, Read as _, Seek as _, SeekFrom, Write as _};
use std::net::IpAddr;
use std::os::unix::fs::{DirBuilderExt as _, MetadataExt as _, OpenOptionsExt as _};
use std::os::unix::process::CommandExt as _;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Output, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use anyhow::{bail, ensure, Context as _, Result};
use log::{debug, warn};

/// Where `ip netns add` bind-mounts named namespaces.
pub const NETNS_RUN_DIR: &str = "/run/netns";
/// Default time limit for one external command ([`Netns::run`] and friends).
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(10);
/// How long a [`NetnsChild`] gets between SIGTERM and SIGKILL.
pub const TERM_GRACE: Duration = Duration::from_secs(2);
/// How long to wait for killed processes to disappear.
pub const KILL_WAIT: Duration = Duration::from_secs(3);
/// How long [`Dnsmasq::start`] waits for dnsmasq to bind its sockets.
pub const DNSMASQ_READY_TIMEOUT: Duration = Duration::from_secs(3);
/// Linux limit for interface names (IFNAMSIZ - 1).
pub const IFNAME_MAX: usize = 15;

static NETNS_COUNTER: AtomicU64 = AtomicU64::new(0);
static VETH_COUNTER: AtomicU64 = AtomicU64::new(0);
static TMP_COUNTER: AtomicU64 = AtomicU64::new(0);

/// A failed external command. Returned inside `anyhow::Error`; downcast to inspect it.
#[derive(Debug, thiserror::Error)]
pub enum CommandError {
    #[error("`{cmdline}` failed ({status}): {}", summarize(stderr, stdout))]
    Failed {
        cmdline: String,
        status: ExitStatus,
        stdout: String,
        stderr: String,
    },
    #[error(
        "`{cmdline}` did not finish within {timeout:?} and was killed; stderr: {}",
        summarize(stderr, "")
    )]
    TimedOut {
        cmdline: String,
        timeout: Duration,
        stderr: String,
    },
}

fn summarize(stderr: &str, stdout: &str) -> String {
    let s = stderr.trim();
    if !s.is_empty() {
        return s.to_string();
    }
    let o = stdout.trim();
    if !o.is_empty() {
        return format!("(no stderr) stdout: {o}");
    }
    "(no output)".to_string()
}

/// Renders a command line for error messages, quoting arguments that need it.
pub fn render_command(cmd: &Command) -> String {
    let mut out = String::new();
    let parts = std::iter::once(cmd.get_program()).chain(cmd.get_args());
    for (i, part) in parts.enumerate() {
        if i > 0 {
            out.push(' ');
        }
        let s = part.to_string_lossy();
        let plain = !s.is_empty()
            && s.chars()
                .all(|c| c.is_ascii_alphanumeric() || "-_./:=,@%+[]#".contains(c));
        if plain {
            out.push_str(&s);
        } else {
            let _ = write!(out, "'{}'", s.replace('\'', r"'\''"));
        }
    }
    out
}

/// Finds a system tool: `$PATH` first, then the sbin directories (not in a user's `$PATH`
/// on Debian).
pub fn find_tool(name: &str) -> Option<PathBuf> {
    let path_dirs = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path_dirs)
        .chain(
            ["/usr/sbin", "/sbin", "/usr/bin", "/bin"]
                .iter()
                .map(PathBuf::from),
        )
        .map(|d| d.join(name))
        .find(|p| p.is_file())
}

/// [`find_tool`], falling back to the bare name so the spawn error names it.
fn tool(name: &str) -> PathBuf {
    find_tool(name).unwrap_or_else(|| PathBuf::from(name))
}

/// An unnamed temporary file (O_TMPFILE, or created and unlinked at once).
fn anon_file() -> io::Result<File> {
    let dir = std::env::temp_dir();
    let tmpfile = OpenOptions::new()
        .read(true)
        .write(true)
        .mode(0o600)
        .custom_flags(libc::O_TMPFILE)
        .open(&dir);
    if let Ok(f) = tmpfile {
        return Ok(f);
    }
    let path = dir.join(format!(
        ".netns-harness-{}-{}",
        std::process::id(),
        TMP_COUNTER.fetch_add(1, Ordering::Relaxed)
    ));
    let f = OpenOptions::new()
        .read(true)
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(&path)?;
    let _ = fs::remove_file(&path);
    Ok(f)
}

fn read_back(f: &mut File) -> Vec<u8> {
    let mut buf = Vec::new();
    if f.seek(SeekFrom::Start(0)).is_ok() {
        let _ = f.read_to_end(&mut buf);
    }
    buf
}

/// Sends `sig` to the process group led by `pgid`. Refuses the values that would address
/// our own group or every process (0, 1, negative).
fn signal_group(pgid: u32, sig: libc::c_int) {
    let Ok(pgid) = i32::try_from(pgid) else {
        return;
    };
    if pgid <= 1 {
        return;
    }
    // SAFETY: plain syscall with a checked positive process group id.
    unsafe {
        libc::kill(-pgid, sig);
    }
}

/// Polls `child` until it exits or `limit` passes; `None` if it is still running.
fn wait_bounded(child: &mut Child, limit: Duration) -> Option<ExitStatus> {
    let deadline = Instant::now() + limit;
    let mut nap = Duration::from_millis(1);
    loop {
        match child.try_wait() {
            Ok(Some(status)) => return Some(status),
            Ok(None) => {}
            Err(e) => {
                warn!("waiting for pid {}: {e}", child.id());
                return None;
            }
        }
        let now = Instant::now();
        if now >= deadline {
            return None;
        }
        std::thread::sleep(nap.min(deadline - now));
        nap = (nap * 2).min(Duration::from_millis(20));
    }
}

/// Runs `cmd` to completion within `timeout`, feeding it `stdin` (or /dev/null).
///
/// The command gets its own process group; on timeout the whole group is killed. Output
/// goes to unnamed temporary files, not pipes, so a background process that inherits them
/// can not make this hang. A non-zero exit status is an error ([`CommandError::Failed`])
/// carrying the command line and stderr.
pub fn run_command(cmd: &mut Command, stdin: Option<&[u8]>, timeout: Duration) -> Result<Output> {
    let cmdline = render_command(cmd);
    debug!("running `{cmdline}`");
    let mut out_f = anon_file().context("creating a temporary file")?;
    let mut err_f = anon_file().context("creating a temporary file")?;
    let stdin_stdio = match stdin {
        Some(data) => {
            let mut f = anon_file().context("creating a temporary file")?;
            f.write_all(data)?;
            f.seek(SeekFrom::Start(0))?;
            Stdio::from(f)
        }
        None => Stdio::null(),
    };
    cmd.stdin(stdin_stdio)
        .stdout(Stdio::from(out_f.try_clone()?))
        .stderr(Stdio::from(err_f.try_clone()?))
        .process_group(0);
    let mut child = cmd
        .spawn()
        .with_context(|| format!("could not start `{cmdline}`"))?;
    // The Command keeps copies of the Stdio handles until it is dropped or respawned;
    // that does not matter for files.
    let Some(status) = wait_bounded(&mut child, timeout) else {
        signal_group(child.id(), libc::SIGKILL);
        if wait_bounded(&mut child, KILL_WAIT).is_none() {
            warn!(
                "`{cmdline}` (pid {}) survived SIGKILL for {KILL_WAIT:?}",
                child.id()
            );
        }
        let stderr = String::from_utf8_lossy(&read_back(&mut err_f)).into_owned();
        return Err(CommandError::TimedOut {
            cmdline,
            timeout,
            stderr,
        }
        .into());
    };
    let output = Output {
        status,
        stdout: read_back(&mut out_f),
        stderr: read_back(&mut err_f),
    };
    if !status.success() {
        return Err(CommandError::Failed {
            cmdline,
            status,
            stdout: String::from_utf8_lossy(&output.stdout).into_owned(),
            stderr: String::from_utf8_lossy(&output.stderr).into_owned(),
        }
        .into());
    }
    Ok(output)
}

fn ip_cmd() -> Command {
    Command::new(tool("ip"))
}

fn valid_name_part(s: &str) -> bool {
    !s.is_empty()
        && s.chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_' || c == '.')
        && !s.starts_with('.')
}

fn valid_ifname(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= IFNAME_MAX
        && s != "."
        && s != ".."
        && !s.contains(|c: char| c == '/' || c == ':' || c.is_whitespace() || c.is_control())
}

/// Identity of a namespace file: (st_dev, st_ino) of the nsfs inode.
fn ns_id(path: &Path) -> io::Result<(u64, u64)> {
    let m = fs::metadata(path)?;
    Ok((m.dev(), m.ino()))
}

/// Processes (thread-group ids) whose network namespace is `id`; never our own pid.
fn pids_in(id: (u64, u64)) -> Vec<u32> {
    let me = std::process::id();
    let Ok(dir) = fs::read_dir("/proc") else {
        return Vec::new();
    };
    let mut pids: Vec<u32> = dir
        .filter_map(|e| e.ok()?.file_name().to_str()?.parse::<u32>().ok())
        .filter(|&pid| pid != me)
        .filter(|pid| ns_id(Path::new(&format!("/proc/{pid}/ns/net"))).ok() == Some(id))
        .collect();
    pids.sort_unstable();
    pids
}

/// SIGKILLs `pid` if (and only if) it is still in namespace `id`, without a pid-reuse race:
/// the pidfd pins the process, the namespace is checked, then the signal goes via the pidfd.
fn kill_if_in(pid: u32, id: (u64, u64)) {
    let Ok(pid_i) = libc::pid_t::try_from(pid) else {
        return;
    };
    if pid_i <= 1 || pid == std::process::id() {
        return;
    }
    // SAFETY: pidfd_open(pid, 0) takes no pointers; the result is an fd or -1.
    let fd = unsafe { libc::syscall(libc::SYS_pidfd_open, pid_i, 0) };
    if fd < 0 {
        return; // already gone (ESRCH)
    }
    let fd = fd as libc::c_int;
    if ns_id(Path::new(&format!("/proc/{pid}/ns/net"))).ok() == Some(id) {
        // SAFETY: valid pidfd, null siginfo, no flags.
        let rc = unsafe {
            libc::syscall(
                libc::SYS_pidfd_send_signal,
                fd,
                libc::SIGKILL,
                std::ptr::null::<libc::siginfo_t>(),
                0,
            )
        };
        if rc != 0 {
            let e = io::Error::last_os_error();
            if e.raw_os_error() != Some(libc::ESRCH) {
                warn!("killing pid {pid}: {e}");
            }
        }
    }
    // SAFETY: closing the fd we opened above.
    unsafe {
        libc::close(fd);
    }
}

/// Kills every process in namespace `id` and waits (bounded) until none is left.
/// Returns the pids that survived.
fn kill_all_in(id: (u64, u64), what: &str) -> Vec<u32> {
    let deadline = Instant::now() + KILL_WAIT;
    loop {
        let pids = pids_in(id);
        if pids.is_empty() {
            return pids;
        }
        if Instant::now() >= deadline {
            warn!("netns {what}: processes {pids:?} still alive {KILL_WAIT:?} after SIGKILL");
            return pids;
        }
        debug!("netns {what}: killing {pids:?}");
        for pid in pids {
            kill_if_in(pid, id);
        }
        std::thread::sleep(Duration::from_millis(10));
    }
}

fn netns_del(name: &str) -> Result<()> {
    let r = run_command(ip_cmd().args(["netns", "del", name]), None, DEFAULT_TIMEOUT);
    if r.is_err() && !Path::new(NETNS_RUN_DIR).join(name).exists() {
        return Ok(()); // already gone
    }
    r.map(|_| ())
}

/// A named network namespace that is removed (with every process in it) on drop.
#[derive(Debug)]
pub struct Netns {
    name: String,
    id: (u64, u64),
    removed: bool,
}

impl Netns {
    /// Creates `<prefix>-<pid>-<counter>` with `ip netns add` and brings `lo` up.
    ///
    /// `prefix` may contain ASCII letters, digits, `-`, `_` and `.`. Keep it short: the
    /// name shows up in tool output and logs.
    pub fn create(prefix: &str) -> Result<Netns> {
        ensure!(
            valid_name_part(prefix) && prefix.len() <= 64,
            "invalid netns prefix {prefix:?} (use [A-Za-z0-9_.-], at most 64 chars)"
        );
        let pid = std::process::id();
        // Skip names left behind by an earlier process that had the same pid.
        let name = loop {
            let n = NETNS_COUNTER.fetch_add(1, Ordering::Relaxed);
            let name = format!("{prefix}-{pid}-{n}");
            if !Path::new(NETNS_RUN_DIR).join(&name).exists() {
                break name;
            }
        };
        run_command(
            ip_cmd().args(["netns", "add", &name]),
            None,
            DEFAULT_TIMEOUT,
        )
        .with_context(|| format!("creating netns {name} (needs root)"))?;
        let id = match ns_id(&Path::new(NETNS_RUN_DIR).join(&name)) {
            Ok(id) => id,
            Err(e) => {
                if let Err(e2) = netns_del(&name) {
                    warn!("removing netns {name}: {e2:#}");
                }
                return Err(e).with_context(|| format!("stat {NETNS_RUN_DIR}/{name}"));
            }
        };
        // From here on the guard cleans up on error.
        let ns = Netns {
            name,
            id,
            removed: false,
        };
        ns.ip(["link", "set", "lo", "up"])?;
        debug!("created netns {} (inode {})", ns.name, ns.id.1);
        Ok(ns)
    }

    /// The namespace's name (as used by `ip netns`).
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The namespace's inode number (`st_ino` of `/run/netns/NAME`), which is what the
    /// kernel reports as `net->ns.inum` and what `readlink /proc/PID/ns/net` shows.
    pub fn inode(&self) -> u64 {
        self.id.1
    }

    /// Path of the namespace file, e.g. for `setns(2)`.
    pub fn path(&self) -> PathBuf {
        Path::new(NETNS_RUN_DIR).join(&self.name)
    }

    /// A `Command` that runs `program` inside this namespace (`ip netns exec NAME program`)
    /// in its own process group. Add arguments and stdio, then run it with [`run_command`]
    /// or [`NetnsChild::spawn`].
    pub fn command<S: AsRef<OsStr>>(&self, program: S) -> Command {
        let mut cmd = ip_cmd();
        cmd.args(["netns", "exec", &self.name]).arg(program);
        cmd.process_group(0);
        cmd
    }

    fn command_from<I, S>(&self, args: I) -> Result<Command>
    where
        I: IntoIterator<Item = S>,
        S: AsRef<OsStr>,
    {
        let mut it = args.into_iter();
        let Some(program) = it.next() else {
            bail!("empty command line for netns {}", self.name);
        };
        let mut cmd = self.command(program);
        cmd.args(it);
        Ok(cmd)
    }

    /// Runs a command inside the namespace with [`DEFAULT_TIMEOUT`]; a non-zero exit status
    /// is an error that names the command line and includes its stderr.
    pub fn run<I, S>(&self, args: I) -> Result<Output>
    where
        I: IntoIterator<Item = S>,
        S: AsRef<OsStr>,
    {
        self.run_timeout(args, DEFAULT_TIMEOUT)
    }

    /// [`Netns::run`] with an explicit time limit.
    pub fn run_timeout<I, S>(&self, args: I, timeout: Duration) -> Result<Output>
    where
        I: IntoIterator<Item = S>,
        S: AsRef<OsStr>,
    {
        run_command(&mut self.command_from(args)?, None, timeout)
    }

    /// [`Netns::run`] with `input` on stdin.
    pub fn run_stdin<I, S>(&self, args: I, input: &[u8]) -> Result<Output>
    where
        I: IntoIterator<Item = S>,
        S: AsRef<OsStr>,
    {
        run_command(&mut self.command_from(args)?, Some(input), DEFAULT_TIMEOUT)
    }

    /// Runs a command and returns its stdout as (lossy) UTF-8.
    pub fn run_stdout<I, S>(&self, args: I) -> Result<String>
    where
        I: IntoIterator<Item = S>,
        S: AsRef<OsStr>,
    {
        let out = self.run(args)?;
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    }

    /// `ip -n NAME <args>` (no process is left inside the namespace).
    pub fn ip<I, S>(&self, args: I) -> Result<Output>
    where
        I: IntoIterator<Item = S>,
        S: AsRef<OsStr>,
    {
        let mut cmd = ip_cmd();
        cmd.args(["-n", &self.name]).args(args);
        run_command(&mut cmd, None, DEFAULT_TIMEOUT)
    }

    /// Starts a long-running process inside the namespace (stdin and stdout /dev/null,
    /// stderr inherited). The returned guard stops it on drop. For other stdio use
    /// [`Netns::command`] and [`NetnsChild::spawn`].
    pub fn spawn<I, S>(&self, args: I) -> Result<NetnsChild>
    where
        I: IntoIterator<Item = S>,
        S: AsRef<OsStr>,
    {
        let mut cmd = self.command_from(args)?;
        cmd.stdin(Stdio::null()).stdout(Stdio::null());
        NetnsChild::spawn(&mut cmd)
    }

    /// Sets a sysctl inside this namespace. `key` is `net.ipv4.ip_forward` or
    /// `net/ipv4/ip_forward` (use the slash form when a component contains a dot, e.g.
    /// a VLAN interface).
    pub fn sysctl_set(&self, key: &str, value: &str) -> Result<()> {
        let path = sysctl_path(key)?;
        self.run_stdin([OsStr::new("tee"), path.as_os_str()], value.as_bytes())
            .with_context(|| format!("setting {key}={value} in netns {}", self.name))?;
        Ok(())
    }

    /// Reads a sysctl inside this namespace (trimmed).
    pub fn sysctl_get(&self, key: &str) -> Result<String> {
        let path = sysctl_path(key)?;
        let out = self.run_stdout([OsStr::new("cat"), path.as_os_str()])?;
        Ok(out.trim().to_string())
    }

    /// Loads an nftables ruleset into this namespace (`nft -f -`).
    pub fn nft(&self, ruleset: &str) -> Result<()> {
        self.run_stdin(
            [tool("nft").as_os_str(), OsStr::new("-f"), OsStr::new("-")],
            ruleset.as_bytes(),
        )
        .with_context(|| format!("loading nft ruleset into netns {}", self.name))?;
        Ok(())
    }

    /// `ip -n NAME route add <route>`, e.g. `"default via 10.0.0.1"`.
    pub fn route_add(&self, route: &str) -> Result<()> {
        route_add(self, route)
    }

    /// Pids of the processes currently inside the namespace (like `ip netns pids NAME`).
    pub fn pids(&self) -> Vec<u32> {
        pids_in(self.id)
    }

    /// Removes the namespace now and reports errors (drop does the same but only logs).
    pub fn remove(mut self) -> Result<()> {
        self.removed = true;
        let survivors = kill_all_in(self.id, &self.name);
        netns_del(&self.name).with_context(|| format!("removing netns {}", self.name))?;
        ensure!(
            survivors.is_empty(),
            "netns {} removed, but processes {survivors:?} survived SIGKILL",
            self.name
        );
        Ok(())
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        if self.removed {
            return;
        }
        self.removed = true;
        kill_all_in(self.id, &self.name);
        match netns_del(&self.name) {
            Ok(()) => debug!("removed netns {}", self.name),
            Err(e) => warn!("removing netns {}: {e:#}", self.name),
        }
    }
}

fn sysctl_path(key: &str) -> Result<PathBuf> {
    let rel = if key.contains('/') {
        key.trim_start_matches('/').to_string()
    } else {
        key.replace('.', "/")
    };
    ensure!(
        !rel.is_empty() && !rel.split('/').any(|c| c.is_empty() || c == ".."),
        "invalid sysctl key {key:?}"
    );
    Ok(Path::new("/proc/sys").join(rel))
}

/// `ip -n NS route add <route>`; `route` is split on whitespace, e.g.
/// `"default via 10.0.0.1"` or `"10.96.0.0/12 via 10.0.0.1 dev eth0"`.
pub fn route_add(ns: &Netns, route: &str) -> Result<()> {
    let words: Vec<&str> = route.split_whitespace().collect();
    ensure!(!words.is_empty(), "empty route");
    ns.ip(["route", "add"].into_iter().chain(words))
        .with_context(|| format!("adding route {route:?} in netns {}", ns.name))?;
    Ok(())
}

/// Creates a veth pair with generated names (`vh<N>a` in `a`, `vh<N>b` in `b`) and returns
/// the two interface names. See [`veth_pair_named`].
pub fn veth_pair(
    a: &Netns,
    a_addrs: &[&str],
    b: &Netns,
    b_addrs: &[&str],
) -> Result<(String, String)> {
    let n = VETH_COUNTER.fetch_add(1, Ordering::Relaxed);
    let (a_if, b_if) = (format!("vh{n}a"), format!("vh{n}b"));
    veth_pair_named(a, &a_if, a_addrs, b, &b_if, b_addrs)?;
    Ok((a_if, b_if))
}

/// Creates a veth pair with one end in each namespace (directly: nothing appears in the
/// caller's namespace), assigns the addresses (`"10.0.0.1/24"`, `"fd00::1/64"`; IPv6 ones
/// get `nodad` so they are usable at once) and brings both ends up. `a` and `b` may be the
/// same namespace. On error the pair is deleted again.
pub fn veth_pair_named(
    a: &Netns,
    a_if: &str,
    a_addrs: &[&str],
    b: &Netns,
    b_if: &str,
    b_addrs: &[&str],
) -> Result<()> {
    for name in [a_if, b_if] {
        ensure!(
            valid_ifname(name),
            "invalid interface name {name:?} (at most {IFNAME_MAX} chars, no '/', ':' or spaces)"
        );
    }
    ensure!(
        a.name != b.name || a_if != b_if,
        "both veth ends named {a_if} in netns {}",
        a.name
    );
    let mut cmd = ip_cmd();
    cmd.args([
        "link", "add", a_if, "netns", &a.name, "type", "veth", "peer", "name", b_if,
    ])
    .args(["netns", &b.name]);
    run_command(&mut cmd, None, DEFAULT_TIMEOUT)
        .with_context(|| format!("creating veth {}:{a_if} <-> {}:{b_if}", a.name, b.name))?;
    // Links first, addresses second: IPv6 addresses added while the link was down (even
    // with nodad) did not answer the first neighbour solicitation after the link came up
    // (measured on 6.18: the first `ping -6 -W1` failed in most runs); added to an up link
    // they work at once.
    let configure = || -> Result<()> {
        for (ns, ifname) in [(a, a_if), (b, b_if)] {
            ns.ip(["link", "set", ifname, "up"])?;
        }
        for (ns, ifname, addrs) in [(a, a_if, a_addrs), (b, b_if, b_addrs)] {
            for addr in addrs {
                add_addr(ns, ifname, addr)?;
            }
        }
        Ok(())
    };
    if let Err(e) = configure() {
        if let Err(e2) = a.ip(["link", "del", a_if]) {
            warn!("deleting veth {a_if} in netns {}: {e2:#}", a.name);
        }
        return Err(e);
    }
    Ok(())
}

/// `ip -n NS addr add ADDR dev IF` (+ `nodad` for IPv6). Bring the link up first: IPv6
/// addresses added to a down link missed the first neighbour solicitation after it came up.
pub fn add_addr(ns: &Netns, ifname: &str, addr: &str) -> Result<()> {
    let ip_part = addr.split('/').next().unwrap_or(addr);
    let parsed: IpAddr = ip_part.parse().with_context(|| {
        format!("invalid address {addr:?} (want e.g. 10.0.0.1/24 or fd00::1/64)")
    })?;
    let mut args = vec!["addr", "add", addr, "dev", ifname];
    if parsed.is_ipv6() {
        args.push("nodad");
    }
    ns.ip(args)
        .with_context(|| format!("adding {addr} to {ifname} in netns {}", ns.name))?;
    Ok(())
}

/// Netns names created with `prefix` (by any process) that still exist.
pub fn leftovers(prefix: &str) -> Vec<String> {
    let Ok(dir) = fs::read_dir(NETNS_RUN_DIR) else {
        return Vec::new();
    };
    let mut names: Vec<String> = dir
        .filter_map(|e| e.ok()?.file_name().into_string().ok())
        .filter(|n| parse_netns_name(prefix, n).is_some())
        .collect();
    names.sort();
    names
}

/// `<prefix>-<pid>-<counter>` -> pid.
fn parse_netns_name(prefix: &str, name: &str) -> Option<u32> {
    let rest = name.strip_prefix(prefix)?.strip_prefix('-')?;
    let (pid, counter) = rest.split_once('-')?;
    let digits = |s: &str| !s.is_empty() && s.bytes().all(|b| b.is_ascii_digit());
    if !digits(pid) || !digits(counter) {
        return None;
    }
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

/// Removes leftover namespaces with `prefix` whose creating process no longer exists
/// (killing the processes inside them first). Returns the names removed. Namespaces of
/// live processes, including this one, are left alone.
pub fn remove_stale(prefix: &str) -> Vec<String> {
    remove_where(prefix, |pid| pid != std::process::id() && !pid_alive(pid))
}

/// Removes every namespace with `prefix` that this process created, with the processes in
/// them and their `/etc/netns/NAME` directories: the last resort of a signal handler, when
/// the guards will not get to run.
pub fn remove_own(prefix: &str) -> Vec<String> {
    let removed = remove_where(prefix, |pid| pid == std::process::id());
    for name in &removed {
        let _ = fs::remove_dir_all(Path::new("/etc/netns").join(name));
    }
    removed
}

fn remove_where(prefix: &str, created_by: impl Fn(u32) -> bool) -> Vec<String> {
    let mut removed = Vec::new();
    for name in leftovers(prefix) {
        let Some(pid) = parse_netns_name(prefix, &name) else {
            continue;
        };
        if !created_by(pid) {
            continue;
        }
        if let Ok(id) = ns_id(&Path::new(NETNS_RUN_DIR).join(&name)) {
            kill_all_in(id, &name);
        }
        match netns_del(&name) {
            Ok(()) => removed.push(name),
            Err(e) => warn!("removing netns {name}: {e:#}"),
        }
    }
    removed
}

/// A process started inside a namespace. On drop: SIGTERM to its process group, up to
/// [`TERM_GRACE`], then SIGKILL, up to [`KILL_WAIT`]; the process is reaped.
#[derive(Debug)]
pub struct NetnsChild {
    child: Child,
    cmdline: String,
    status: Option<ExitStatus>,
}

impl NetnsChild {
    /// Spawns `cmd` (typically from [`Netns::command`]) in its own process group.
    pub fn spawn(cmd: &mut Command) -> Result<NetnsChild> {
        let cmdline = render_command(cmd);
        cmd.process_group(0);
        let child = cmd
            .spawn()
            .with_context(|| format!("could not start `{cmdline}`"))?;
        debug!("started pid {}: `{cmdline}`", child.id());
        Ok(NetnsChild {
            child,
            cmdline,
            status: None,
        })
    }

    /// The process id (also its process group id). `ip netns exec` execs the program, so
    /// this is the program itself.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// The command line, for messages.
    pub fn cmdline(&self) -> &str {
        &self.cmdline
    }

    /// The underlying child, e.g. to take piped stdout. Do not wait on it directly.
    pub fn child_mut(&mut self) -> &mut Child {
        &mut self.child
    }

    /// The exit status if the process has exited (reaps it).
    pub fn try_wait(&mut self) -> Result<Option<ExitStatus>> {
        if self.status.is_none() {
            self.status = self.child.try_wait()?;
        }
        Ok(self.status)
    }

    /// Waits up to `limit` for the process to exit on its own.
    pub fn wait_timeout(&mut self, limit: Duration) -> Option<ExitStatus> {
        if self.status.is_none() {
            self.status = wait_bounded(&mut self.child, limit);
        }
        self.status
    }

    /// Stops the process now (SIGTERM, then SIGKILL) and returns its exit status, or
    /// `None` if it could not be reaped in time.
    pub fn stop(mut self) -> Option<ExitStatus> {
        self.terminate()
    }

    fn terminate(&mut self) -> Option<ExitStatus> {
        if let Some(status) = self.status {
            return Some(status);
        }
        let pid = self.child.id();
        // While the child is not reaped its pid (= process group id) can not be reused,
        // so signalling the group is safe.
        if let Ok(Some(status)) = self.child.try_wait() {
            self.status = Some(status);
            return self.status;
        }
        signal_group(pid, libc::SIGTERM);
        self.status = wait_bounded(&mut self.child, TERM_GRACE);
        if self.status.is_none() {
            debug!("pid {pid} ignored SIGTERM for {TERM_GRACE:?}; sending SIGKILL");
            signal_group(pid, libc::SIGKILL);
            self.status = wait_bounded(&mut self.child, KILL_WAIT);
            if self.status.is_none() {
                warn!(
                    "pid {pid} (`{}`) survived SIGKILL for {KILL_WAIT:?}",
                    self.cmdline
                );
            }
        }
        self.status
    }
}

impl Drop for NetnsChild {
    fn drop(&mut self) {
        self.terminate();
    }
}

/// A real dnsmasq DNS server running inside a namespace; stopped on drop.
#[derive(Debug)]
pub struct Dnsmasq {
    child: Option<NetnsChild>,
    dir: PathBuf,
    listen: Vec<IpAddr>,
    port: u16,
}

impl Dnsmasq {
    /// Starts dnsmasq in `ns` answering on `listen` (addresses already configured in `ns`;
    /// IPv6 ones must not be tentative, see [`add_addr`]) at `port`, with `records`
    /// (name, address) as A/AAAA records (TTL 0). Every other name gets NXDOMAIN; nothing is
    /// forwarded. Returns once dnsmasq has bound all its sockets (at most
    /// [`DNSMASQ_READY_TIMEOUT`]). Queries are logged to [`Dnsmasq::log_path`].
    pub fn start(
        ns: &Netns,
        listen: &[IpAddr],
        port: u16,
        records: &[(&str, IpAddr)],
    ) -> Result<Dnsmasq> {
        Self::start_with_args(ns, listen, port, records, &[])
    }

    /// [`Dnsmasq::start`] with extra dnsmasq options (e.g. `--max-ttl=5`).
    pub fn start_with_args(
        ns: &Netns,
        listen: &[IpAddr],
        port: u16,
        records: &[(&str, IpAddr)],
        extra_args: &[&str],
    ) -> Result<Dnsmasq> {
        ensure!(
            !listen.is_empty(),
            "dnsmasq needs at least one listen address"
        );
        ensure!(port != 0, "dnsmasq needs a fixed port");
        let dir = std::env::temp_dir().join(format!(
            "{}-dnsmasq-{}",
            ns.name(),
            TMP_COUNTER.fetch_add(1, Ordering::Relaxed)
        ));
        fs::DirBuilder::new()
            .mode(0o700)
            .create(&dir)
            .with_context(|| format!("creating {}", dir.display()))?;
        // From here on the guard removes the directory (and the process) on error.
        let mut guard = Dnsmasq {
            child: None,
            dir,
            listen: listen.to_vec(),
            port,
        };
        let stderr_file = File::create(guard.stderr_path())
            .with_context(|| format!("creating {}", guard.stderr_path().display()))?;

        // Group records by name so a name can have several A/AAAA records.
        let mut by_name: Vec<(String, Vec<IpAddr>)> = Vec::new();
        for (name, ip) in records {
            ensure!(
                !name.is_empty()
                    && !name.contains(|c: char| c == ',' || c == '/' || c.is_whitespace()),
                "invalid DNS name {name:?}"
            );
            let name = name.trim_end_matches('.').to_string();
            match by_name.iter_mut().find(|(n, _)| *n == name) {
                Some((_, ips)) => ips.push(*ip),
                None => by_name.push((name, vec![*ip])),
            }
        }

        let mut cmd = ns.command(tool("dnsmasq"));
        cmd.args([
            "--keep-in-foreground",
            "--conf-file=/dev/null", // ignore /etc/dnsmasq.conf
            "--no-resolv",           // no upstream servers ...
            "--no-hosts",            // ... and no /etc/hosts
            "--local=/#/",           // unknown names: NXDOMAIN, not REFUSED
            "--bind-interfaces",
            "--pid-file",  // no pid file
            "--user=root", // do not drop privileges (to dnsmasq/nobody)
            "--group=root",
            "--log-queries",
        ]);
        cmd.arg(format!("--log-facility={}", guard.log_path().display()))
            .arg(format!("--port={port}"));
        for addr in listen {
            cmd.arg(format!("--listen-address={addr}"));
        }
        for (name, ips) in &by_name {
            let mut rec = format!("--host-record={name}");
            for ip in ips {
                let _ = write!(rec, ",{ip}");
            }
            cmd.arg(rec);
        }
        cmd.args(extra_args);
        cmd.stdin(Stdio::null())
            .stdout(Stdio::from(stderr_file.try_clone()?))
            .stderr(Stdio::from(stderr_file));
        guard.child = Some(NetnsChild::spawn(&mut cmd)?);

        let deadline = Instant::now() + DNSMASQ_READY_TIMEOUT;
        loop {
            let exited = match guard.child.as_mut() {
                Some(c) => c.try_wait()?,
                None => None,
            };
            if let Some(status) = exited {
                let stderr = guard.stderr();
                let hint = if stderr.contains("Cannot assign requested address") {
                    " (is every listen address configured in the netns? IPv6 ones need nodad)"
                } else {
                    ""
                };
                bail!(
                    "dnsmasq in netns {} exited at start ({status}){hint}: {}",
                    ns.name(),
                    stderr.trim()
                );
            }
            let remaining = deadline.saturating_duration_since(Instant::now());
            let missing = guard.unbound_addrs(ns, remaining.max(Duration::from_millis(500)))?;
            if missing.is_empty() {
                debug!(
                    "dnsmasq ready in netns {} on {listen:?} port {port}",
                    ns.name()
                );
                return Ok(guard);
            }
            if Instant::now() >= deadline {
                bail!(
                    "dnsmasq in netns {} did not bind {missing:?} port {port} within {:?}; stderr: {}",
                    ns.name(),
                    DNSMASQ_READY_TIMEOUT,
                    guard.stderr().trim()
                );
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Listen addresses that have no bound UDP socket on our port yet (`ss -Hlnu` in `ns`).
    fn unbound_addrs(&self, ns: &Netns, timeout: Duration) -> Result<Vec<IpAddr>> {
        let out = ns.run_timeout([tool("ss").as_os_str(), OsStr::new("-Hlnu")], timeout)?;
        let text = String::from_utf8_lossy(&out.stdout);
        let bound: Vec<IpAddr> = text
            .split_whitespace()
            .filter_map(|tok| {
                let (addr, port) = tok.rsplit_once(':')?;
                if port.parse::<u16>().ok()? != self.port {
                    return None;
                }
                let addr = addr.trim_start_matches('[').trim_end_matches(']');
                let addr = addr.split('%').next()?;
                addr.parse().ok()
            })
            .collect();
        Ok(self
            .listen
            .iter()
            .filter(|a| !bound.contains(a))
            .copied()
            .collect())
    }

    /// The dnsmasq process id.
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(NetnsChild::pid)
    }

    pub fn port(&self) -> u16 {
        self.port
    }

    pub fn listen(&self) -> &[IpAddr] {
        &self.listen
    }

    /// The query log (`--log-queries`).
    pub fn log_path(&self) -> PathBuf {
        self.dir.join("queries.log")
    }

    /// The query log's current contents.
    pub fn log(&self) -> String {
        fs::read_to_string(self.log_path()).unwrap_or_default()
    }

    fn stderr_path(&self) -> PathBuf {
        self.dir.join("stderr.log")
    }

    fn stderr(&self) -> String {
        fs::read_to_string(self.stderr_path()).unwrap_or_default()
    }

    /// Stops dnsmasq now; returns its exit status if it was reaped.
    pub fn stop(mut self) -> Option<ExitStatus> {
        self.child.take().and_then(NetnsChild::stop)
    }
}

impl Drop for Dnsmasq {
    fn drop(&mut self) {
        if let Some(child) = self.child.take() {
            drop(child); // SIGTERM, SIGKILL, reap
        }
        if let Err(e) = fs::remove_dir_all(&self.dir) {
            if e.kind() != io::ErrorKind::NotFound {
                warn!("removing {}: {e}", self.dir.display());
            }
        }
    }
}

/// True when running as root (the harness needs it).
pub fn is_root() -> bool {
    // SAFETY: geteuid has no preconditions.
    unsafe { libc::geteuid() == 0 }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::{Ipv4Addr, Ipv6Addr};

    fn require_root() {
        assert!(
            is_root(),
            "the netns harness tests need root (CAP_SYS_ADMIN, CAP_NET_ADMIN): run them as root"
        );
    }

    /// Unique per test: tests run in parallel and each asserts on its own prefix.
    fn prefix(test: &str) -> String {
        format!("nt{test}")
    }

    fn ns_has_processes(ino: u64) -> Vec<u32> {
        let Ok(dir) = fs::read_dir("/proc") else {
            return Vec::new();
        };
        dir.filter_map(|e| e.ok()?.file_name().to_str()?.parse::<u32>().ok())
            .filter(|pid| {
                fs::metadata(format!("/proc/{pid}/ns/net"))
                    .map(|m| m.ino())
                    .ok()
                    == Some(ino)
            })
            .collect()
    }

    fn is_dnsmasq(pid: u32) -> bool {
        fs::read_to_string(format!("/proc/{pid}/comm"))
            .map(|c| c.trim() == "dnsmasq")
            .unwrap_or(false)
    }

    fn dig(ns: &Netns, server: IpAddr, port: u16, name: &str, qtype: &str) -> String {
        let out = ns
            .run_timeout(
                [
                    "dig".to_string(),
                    format!("@{server}"),
                    "-p".to_string(),
                    port.to_string(),
                    name.to_string(),
                    qtype.to_string(),
                    "+short".to_string(),
                    "+time=1".to_string(),
                    "+tries=1".to_string(),
                ],
                Duration::from_secs(5),
            )
            .expect("dig");
        String::from_utf8_lossy(&out.stdout).trim().to_string()
    }

    #[test]
    fn netns_inode_and_run() {
        require_root();
        let p = prefix("inode");
        {
            let ns = Netns::create(&p).unwrap();
            assert!(ns
                .name()
                .starts_with(&format!("{p}-{}-", std::process::id())));
            let link = ns.run_stdout(["readlink", "/proc/self/ns/net"]).unwrap();
            assert_eq!(link.trim(), format!("net:[{}]", ns.inode()));
            let lo = ns.run_stdout(["ip", "-o", "link", "show", "lo"]).unwrap();
            assert!(lo.contains("UP"), "lo not up: {lo}");
            // Errors carry the command line and stderr.
            let err = ns.run(["ip", "link", "show", "nosuchdev0"]).unwrap_err();
            let msg = format!("{err:#}");
            assert!(msg.contains("ip link show nosuchdev0"), "{msg}");
            assert!(msg.contains("does not exist"), "{msg}");
            assert!(err.downcast_ref::<CommandError>().is_some());
            // Timeouts are enforced.
            let t = Instant::now();
            let err = ns
                .run_timeout(["sleep", "10"], Duration::from_millis(300))
                .unwrap_err();
            assert!(t.elapsed() < crate::test_bound_ms(3000));
            assert!(
                matches!(
                    err.downcast_ref::<CommandError>(),
                    Some(CommandError::TimedOut { .. })
                ),
                "{err:#}"
            );
            ns.sysctl_set("net.ipv4.ip_forward", "1").unwrap();
            assert_eq!(ns.sysctl_get("net.ipv4.ip_forward").unwrap(), "1");
        }
        assert_eq!(leftovers(&p), Vec::<String>::new());
    }

    #[test]
    fn veth_ping_v4_v6() {
        require_root();
        let p = prefix("ping");
        {
            let a = Netns::create(&p).unwrap();
            let b = Netns::create(&p).unwrap();
            let (ia, ib) = veth_pair(
                &a,
                &["10.200.0.1/24", "fd20::1/64"],
                &b,
                &["10.200.0.2/24", "fd20::2/64"],
            )
            .unwrap();
            assert!(ia.len() <= IFNAME_MAX && ib.len() <= IFNAME_MAX);
            a.run(["ping", "-c1", "-W1", "10.200.0.2"]).unwrap();
            b.run(["ping", "-c1", "-W1", "10.200.0.1"]).unwrap();
            a.run(["ping", "-6", "-c1", "-W1", "fd20::2"]).unwrap();
            // The ends are inside the namespaces, not in ours.
            assert!(!Path::new("/sys/class/net").join(&ia).exists());
            assert!(!Path::new("/sys/class/net").join(&ib).exists());
        }
        assert_eq!(leftovers(&p), Vec::<String>::new());
    }

    /// client -- router -- server, with a default route, forwarding and an nft ruleset.
    #[test]
    fn routed_with_nft_masquerade() {
        require_root();
        let p = prefix("route");
        {
            let client = Netns::create(&p).unwrap();
            let router = Netns::create(&p).unwrap();
            let server = Netns::create(&p).unwrap();
            veth_pair(&client, &["10.201.1.2/24"], &router, &["10.201.1.1/24"]).unwrap();
            veth_pair_named(
                &router,
                "toserver",
                &["10.201.2.1/24"],
                &server,
                "eth0",
                &["10.201.2.2/24"],
            )
            .unwrap();
            assert!(server
                .run_stdout(["ip", "-o", "addr", "show", "eth0"])
                .unwrap()
                .contains("10.201.2.2/24"));
            route_add(&client, "default via 10.201.1.1").unwrap();
            router.sysctl_set("net.ipv4.ip_forward", "1").unwrap();
            router
                .nft(
                    "table ip lab {\n chain post {\n  type nat hook postrouting priority srcnat;\n  oifname \"toserver\" masquerade\n }\n}\n",
                )
                .unwrap();
            // The server has no route back to 10.201.1.0/24: only works via masquerade.
            client.run(["ping", "-c1", "-W1", "10.201.2.2"]).unwrap();
            let rules = router.run_stdout(["nft", "list", "ruleset"]).unwrap();
            assert!(rules.contains("masquerade"), "{rules}");
            // A bad ruleset is reported with nft's message.
            let err = router
                .nft("table ip lab { chain x { bogus } }")
                .unwrap_err();
            assert!(format!("{err:#}").contains("Error:"), "{err:#}");
        }
        assert_eq!(leftovers(&p), Vec::<String>::new());
    }

    #[test]
    fn dnsmasq_answers_v4_and_v6() {
        require_root();
        let p = prefix("dns");
        let (pid, ino, log_dir);
        {
            let server = Netns::create(&p).unwrap();
            let client = Netns::create(&p).unwrap();
            veth_pair(
                &server,
                &["10.202.0.1/24", "fd22::1/64"],
                &client,
                &["10.202.0.2/24", "fd22::2/64"],
            )
            .unwrap();
            let v4: IpAddr = Ipv4Addr::new(10, 202, 0, 1).into();
            let v6: IpAddr = "fd22::1".parse::<Ipv6Addr>().unwrap().into();
            let dns = Dnsmasq::start(
                &server,
                &[v4, v6],
                5353,
                &[
                    ("kube-dns.test", "10.96.0.10".parse().unwrap()),
                    ("svc.cluster.local", "10.96.1.1".parse().unwrap()),
                    ("svc.cluster.local", "fd96::1".parse().unwrap()),
                ],
            )
            .unwrap();
            pid = dns.pid().unwrap();
            ino = server.inode();
            log_dir = dns.log_path().parent().unwrap().to_path_buf();
            assert!(is_dnsmasq(pid));
            for srv in [v4, v6] {
                assert_eq!(
                    dig(&client, srv, 5353, "svc.cluster.local", "A"),
                    "10.96.1.1"
                );
                assert_eq!(
                    dig(&client, srv, 5353, "svc.cluster.local", "AAAA"),
                    "fd96::1"
                );
                assert_eq!(dig(&client, srv, 5353, "kube-dns.test", "A"), "10.96.0.10");
                assert_eq!(dig(&client, srv, 5353, "kube-dns.test", "AAAA"), "");
                assert_eq!(dig(&client, srv, 5353, "unknown.test", "A"), "");
            }
            let status = client
                .run_stdout([
                    "dig",
                    "@10.202.0.1",
                    "-p",
                    "5353",
                    "unknown.test",
                    "+time=1",
                    "+tries=1",
                ])
                .unwrap();
            assert!(status.contains("NXDOMAIN"), "{status}");
            let log = dns.log();
            assert!(log.contains("query[AAAA] svc.cluster.local"), "{log}");
            // A second server on port 53 in the same netns works too.
            let dns53 = Dnsmasq::start(&server, &[v4], 53, &[("x.test", v4)]).unwrap();
            assert_eq!(dig(&client, v4, 53, "x.test", "A"), "10.202.0.1");
            drop(dns53);
        }
        assert_eq!(leftovers(&p), Vec::<String>::new());
        assert!(!is_dnsmasq(pid), "dnsmasq pid {pid} still running");
        assert_eq!(ns_has_processes(ino), Vec::<u32>::new());
        assert!(!log_dir.exists(), "{} not removed", log_dir.display());
    }

    #[test]
    fn dnsmasq_start_errors_are_reported() {
        require_root();
        let p = prefix("dnserr");
        {
            let ns = Netns::create(&p).unwrap();
            // Address not configured in the netns: dnsmasq exits, we say why.
            let err = Dnsmasq::start(&ns, &["10.203.0.1".parse().unwrap()], 53, &[]).unwrap_err();
            let msg = format!("{err:#}");
            assert!(msg.contains("Cannot assign requested address"), "{msg}");
            assert_eq!(ns.pids(), Vec::<u32>::new());
        }
        assert_eq!(leftovers(&p), Vec::<String>::new());
    }

    #[test]
    fn child_guard_kills_term_ignoring_process() {
        require_root();
        let p = prefix("child");
        let ns = Netns::create(&p).unwrap();
        let plain = ns.spawn(["sleep", "100"]).unwrap();
        let stubborn = ns
            .spawn(["sh", "-c", "trap '' TERM; sleep 100 & wait"])
            .unwrap();
        let (pp, sp) = (plain.pid(), stubborn.pid());
        std::thread::sleep(Duration::from_millis(100));
        assert!(
            ns.pids().contains(&pp) && ns.pids().contains(&sp),
            "{:?}",
            ns.pids()
        );
        let t = Instant::now();
        assert!(plain.stop().is_some());
        assert!(t.elapsed() < crate::test_bound_ms(1000));
        let t = Instant::now();
        drop(stubborn); // TERM ignored: SIGKILL after the grace period
        let took = t.elapsed();
        assert!(
            took >= TERM_GRACE && took < TERM_GRACE + crate::test_bound_ms(2000),
            "{took:?}"
        );
        // The group (the background sleep) got the SIGKILL too.
        let deadline = Instant::now() + crate::test_bound_ms(2000);
        while !ns.pids().is_empty() && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(10));
        }
        assert_eq!(ns.pids(), Vec::<u32>::new());
        drop(ns);
        assert_eq!(leftovers(&p), Vec::<String>::new());
    }

    #[test]
    fn netns_drop_kills_processes_not_guarded() {
        require_root();
        let p = prefix("orphan");
        let ns = Netns::create(&p).unwrap();
        let ino = ns.inode();
        // A process that escapes every guard (setsid, own session, not our child).
        ns.run(["sh", "-c", "setsid sleep 100 </dev/null >/dev/null 2>&1 &"])
            .unwrap();
        let deadline = Instant::now() + crate::test_bound_ms(2000);
        while ns.pids().is_empty() && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(10));
        }
        assert_eq!(ns.pids().len(), 1);
        drop(ns);
        assert_eq!(ns_has_processes(ino), Vec::<u32>::new());
        assert_eq!(leftovers(&p), Vec::<String>::new());
    }

    #[test]
    fn cleanup_happens_when_a_test_panics() {
        require_root();
        let p = prefix("panic");
        let mut seen: Option<(u32, u64, u64)> = None;
        let result = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            let a = Netns::create(&p).unwrap();
            let b = Netns::create(&p).unwrap();
            veth_pair(&a, &["10.204.0.1/24"], &b, &["10.204.0.2/24"]).unwrap();
            let dns = Dnsmasq::start(
                &a,
                &["10.204.0.1".parse().unwrap()],
                53,
                &[("a.test", "10.204.0.1".parse().unwrap())],
            )
            .unwrap();
            let _sleeper = b.spawn(["sleep", "100"]).unwrap();
            seen = Some((dns.pid().unwrap(), a.inode(), b.inode()));
            assert_eq!(leftovers(&p).len(), 2);
            panic!("deliberate panic with guards alive");
        }));
        assert!(result.is_err());
        let (pid, ia, ib) = seen.expect("guards were created");
        assert_eq!(leftovers(&p), Vec::<String>::new());
        assert!(!is_dnsmasq(pid), "dnsmasq pid {pid} still running");
        assert_eq!(ns_has_processes(ia), Vec::<u32>::new());
        assert_eq!(ns_has_processes(ib), Vec::<u32>::new());
    }

    #[test]
    fn stale_namespaces_are_found_and_removed() {
        require_root();
        let p = prefix("stale");
        // A name as a crashed process (pid above pid_max, so surely dead) would leave it.
        let stale = format!("{p}-4194305-0");
        run_command(
            ip_cmd().args(["netns", "add", &stale]),
            None,
            DEFAULT_TIMEOUT,
        )
        .unwrap();
        let live = Netns::create(&p).unwrap();
        assert_eq!(leftovers(&p), {
            let mut v = vec![stale.clone(), live.name().to_string()];
            v.sort();
            v
        });
        // Another prefix that merely starts the same is not ours.
        assert!(!leftovers("nt").contains(&stale));
        assert_eq!(remove_stale(&p), vec![stale]);
        assert_eq!(leftovers(&p), vec![live.name().to_string()]);
        live.remove().unwrap();
        assert_eq!(leftovers(&p), Vec::<String>::new());
    }

    #[test]
    fn bad_inputs_are_rejected() {
        assert!(Netns::create("").is_err());
        assert!(Netns::create("a/b").is_err());
        assert!(sysctl_path("net..x").is_err());
        assert_eq!(
            sysctl_path("net.ipv4.ip_forward").unwrap(),
            Path::new("/proc/sys/net/ipv4/ip_forward")
        );
        assert!(sysctl_path("net/../x").is_err());
        assert!(!valid_ifname("sixteen-chars-xx"));
        assert!(valid_ifname("fifteen-chars-x"));
        assert_eq!(parse_netns_name("ab", "ab-12-3"), Some(12));
        assert_eq!(parse_netns_name("ab", "ab-x-12-3"), None);
        assert_eq!(parse_netns_name("ab", "abc-12-3"), None);
    }
}

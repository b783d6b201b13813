//! Traffic generators that run inside a given network namespace, from threads of the
//! calling process.
//!
//! Mechanism: a thread calls `setns(open(netns_path), CLONE_NEWNET)`. Only that thread
//! moves; every socket it creates lives in that namespace for its whole life, whichever
//! thread later uses it. See [`in_netns`].
//!
//! Generators:
//! - [`udp_race`]: the A/AAAA race of glibc's resolver made deterministic: per round one
//!   fresh UDP socket, two threads pinned to two CPUs, released together, each `send()`s one
//!   DNS query on that socket (A and AAAA for the same name, distinct ids).
//! - [`snat_race`]: several pod namespaces behind one masquerading node connect (TCP) or
//!   send (UDP) to the same server at the same moment, optionally from the same source
//!   port; with [`echo_server`] as the other end.
//! - [`send_udp`] and [`udp_flows`]: single datagrams and many distinct flows (to fill
//!   conntrack tables).
//!
//! Every loop is bounded in count and in time; traffic goes only where the caller says,
//! which must be addresses inside namespaces the caller made.
//!
//! [`crate::lab::client`] runs the A/AAAA race and a resolver-like SNAT race as separate
//! processes inside the pods instead (so that their cgroup names the pod), with the
//! building blocks here.

use std::collections::HashMap;
use std::fs::File;
use std::io;
use std::mem;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, SocketAddrV4, SocketAddrV6, UdpSocket};
use std::os::fd::{AsRawFd as _, FromRawFd as _, OwnedFd, RawFd};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Barrier};
use std::thread::JoinHandle;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::{bail, ensure, Context as _, Result};
use log::{debug, warn};
use serde::{Deserialize, Serialize};

/// A connect (TCP) or echo (UDP) slower than this counts as "slow": a dropped SYN is
/// retransmitted after ~1 s (the initial RTO), so a connect that took longer than this had
/// its first SYN lost.
pub const SLOW_THRESHOLD: Duration = Duration::from_millis(900);
/// Default query name of [`udp_race`].
pub const RACE_QNAME: &str = "race.test";
/// Upper bound for `rounds` in the race generators.
pub const MAX_ROUNDS: u32 = 1_000_000;
/// Upper bound for the per-round / per-attempt timeouts.
pub const MAX_TIMEOUT: Duration = Duration::from_secs(60);
/// Upper bound for the number of clients of [`snat_race`].
pub const MAX_CLIENTS: usize = 64;
/// How long [`echo_server`]'s loop runs at most, even if its guard is never dropped.
pub const ECHO_SERVER_MAX_LIFETIME: Duration = Duration::from_secs(3600);
/// How often [`echo_server`]'s loop looks at its stop flag.
const SERVER_POLL: Duration = Duration::from_millis(20);
/// How long released threads spin-wait for each other after the barrier at most.
const SPIN_LIMIT: Duration = Duration::from_millis(20);
/// Time limit for [`udp_flows`].
const FLOWS_TIME_LIMIT: Duration = Duration::from_secs(120);

// ---------------------------------------------------------------------------------------
// Entering a namespace

fn open_netns(netns: &Path) -> Result<File> {
    File::open(netns).with_context(|| format!("opening netns file {}", netns.display()))
}

/// Moves the calling thread into the network namespace `ns` (an open nsfs file).
fn enter_netns(ns: &File, what: &Path) -> Result<()> {
    // SAFETY: setns with a valid fd and a namespace type flag.
    let rc = unsafe { libc::setns(ns.as_raw_fd(), libc::CLONE_NEWNET) };
    if rc != 0 {
        let e = io::Error::last_os_error();
        bail!(
            "setns({}, CLONE_NEWNET): {e} (needs CAP_SYS_ADMIN; is it a network namespace?)",
            what.display()
        );
    }
    Ok(())
}

/// Runs `f` on a new thread that first enters the network namespace at `netns` (e.g.
/// `/run/netns/NAME`, [`crate::netns::Netns::path`]) and returns its result. Only that
/// thread moves; sockets it creates stay in that namespace. A panic in `f` is propagated.
pub fn in_netns<T: Send>(netns: &Path, f: impl FnOnce() -> T + Send) -> Result<T> {
    let ns = open_netns(netns)?;
    std::thread::scope(|s| {
        let handle = std::thread::Builder::new()
            .name("in-netns".into())
            .spawn_scoped(s, || -> Result<T> {
                enter_netns(&ns, netns)?;
                Ok(f())
            })
            .context("spawning a thread")?;
        match handle.join() {
            Ok(r) => r,
            Err(panic) => std::panic::resume_unwind(panic),
        }
    })
}

/// Like [`in_netns`] but not joined: the thread keeps running (for servers).
pub(crate) fn spawn_in_netns<T: Send + 'static>(
    netns: &Path,
    name: &str,
    f: impl FnOnce() -> T + Send + 'static,
) -> Result<JoinHandle<Result<T>>> {
    let ns = open_netns(netns)?;
    let path = netns.to_path_buf();
    std::thread::Builder::new()
        .name(name.into())
        .spawn(move || -> Result<T> {
            enter_netns(&ns, &path)?;
            drop(ns);
            Ok(f())
        })
        .context("spawning a thread")
}

// ---------------------------------------------------------------------------------------
// CPUs

/// The CPUs this process may run on (sched_getaffinity), ascending.
pub fn allowed_cpus() -> Vec<usize> {
    // SAFETY: cpu_set_t is plain data; zeroed is a valid empty set.
    let mut set: libc::cpu_set_t = unsafe { mem::zeroed() };
    // SAFETY: valid pointer and size.
    let rc = unsafe { libc::sched_getaffinity(0, mem::size_of::<libc::cpu_set_t>(), &mut set) };
    if rc != 0 {
        return Vec::new();
    }
    (0..libc::CPU_SETSIZE as usize)
        // SAFETY: index below CPU_SETSIZE.
        .filter(|&c| unsafe { libc::CPU_ISSET(c, &set) })
        .collect()
}

/// Pins the calling thread to `cpu`.
pub(crate) fn pin_to(cpu: usize) -> io::Result<()> {
    // SAFETY: as above.
    let mut set: libc::cpu_set_t = unsafe { mem::zeroed() };
    // SAFETY: cpu is checked by the caller to be below CPU_SETSIZE (it came from
    // allowed_cpus).
    unsafe { libc::CPU_SET(cpu, &mut set) };
    // SAFETY: pid 0 = the calling thread; valid pointer and size.
    let rc = unsafe { libc::sched_setaffinity(0, mem::size_of::<libc::cpu_set_t>(), &set) };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

pub(crate) fn current_cpu() -> Option<u32> {
    // SAFETY: no arguments.
    let c = unsafe { libc::sched_getcpu() };
    u32::try_from(c).ok()
}

/// After a `Barrier` releases `n` threads, each calls this: it spins (bounded) until all
/// `n` have arrived, so they leave within a few hundred nanoseconds of each other rather
/// than one futex wake-up apart. `target` = n * (round + 1) on a counter shared by rounds.
fn spin_sync(counter: &AtomicUsize, target: usize) {
    counter.fetch_add(1, Ordering::AcqRel);
    let start = Instant::now();
    while counter.load(Ordering::Acquire) < target {
        std::hint::spin_loop();
        if start.elapsed() > SPIN_LIMIT {
            break;
        }
    }
}

/// Yields (bounded) until `counter` reaches `target`.
fn wait_for(counter: &AtomicUsize, target: usize) {
    let start = Instant::now();
    while counter.load(Ordering::Acquire) < target && start.elapsed() < SPIN_LIMIT {
        std::thread::yield_now();
    }
}

// ---------------------------------------------------------------------------------------
// Sockets (libc, so options can be set before bind/connect)

fn sockaddr_of(addr: &SocketAddr) -> (libc::sockaddr_storage, libc::socklen_t) {
    // SAFETY: sockaddr_storage is plain data; zeroed is valid.
    let mut ss: libc::sockaddr_storage = unsafe { mem::zeroed() };
    let len = match addr {
        SocketAddr::V4(a) => {
            let sin = libc::sockaddr_in {
                sin_family: libc::AF_INET as libc::sa_family_t,
                sin_port: a.port().to_be(),
                sin_addr: libc::in_addr {
                    s_addr: u32::from_ne_bytes(a.ip().octets()),
                },
                sin_zero: [0; 8],
            };
            // SAFETY: sockaddr_storage is larger than and aligned for sockaddr_in.
            unsafe { std::ptr::write(std::ptr::from_mut(&mut ss).cast(), sin) };
            mem::size_of::<libc::sockaddr_in>()
        }
        SocketAddr::V6(a) => {
            let sin6 = libc::sockaddr_in6 {
                sin6_family: libc::AF_INET6 as libc::sa_family_t,
                sin6_port: a.port().to_be(),
                sin6_flowinfo: a.flowinfo(),
                sin6_addr: libc::in6_addr {
                    s6_addr: a.ip().octets(),
                },
                sin6_scope_id: a.scope_id(),
            };
            // SAFETY: as above, for sockaddr_in6.
            unsafe { std::ptr::write(std::ptr::from_mut(&mut ss).cast(), sin6) };
            mem::size_of::<libc::sockaddr_in6>()
        }
    };
    (ss, len as libc::socklen_t)
}

fn socketaddr_from(ss: &libc::sockaddr_storage) -> Option<SocketAddr> {
    match i32::from(ss.ss_family) {
        libc::AF_INET => {
            // SAFETY: family says it is a sockaddr_in; storage is large enough.
            let sin: libc::sockaddr_in = unsafe { std::ptr::read(std::ptr::from_ref(ss).cast()) };
            Some(SocketAddr::V4(SocketAddrV4::new(
                Ipv4Addr::from(sin.sin_addr.s_addr.to_ne_bytes()),
                u16::from_be(sin.sin_port),
            )))
        }
        libc::AF_INET6 => {
            // SAFETY: as above, for sockaddr_in6.
            let sin6: libc::sockaddr_in6 = unsafe { std::ptr::read(std::ptr::from_ref(ss).cast()) };
            Some(SocketAddr::V6(SocketAddrV6::new(
                Ipv6Addr::from(sin6.sin6_addr.s6_addr),
                u16::from_be(sin6.sin6_port),
                sin6.sin6_flowinfo,
                sin6.sin6_scope_id,
            )))
        }
        _ => None,
    }
}

fn cvt(rc: libc::c_int) -> io::Result<libc::c_int> {
    if rc < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(rc)
    }
}

pub(crate) fn new_socket(
    family_of: &SocketAddr,
    ty: libc::c_int,
    nonblocking: bool,
) -> io::Result<OwnedFd> {
    let domain = if family_of.is_ipv4() {
        libc::AF_INET
    } else {
        libc::AF_INET6
    };
    let mut flags = ty | libc::SOCK_CLOEXEC;
    if nonblocking {
        flags |= libc::SOCK_NONBLOCK;
    }
    // SAFETY: plain syscall.
    let fd = cvt(unsafe { libc::socket(domain, flags, 0) })?;
    // SAFETY: fd is a new, owned descriptor.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

fn setsockopt<T>(fd: RawFd, level: libc::c_int, name: libc::c_int, value: &T) -> io::Result<()> {
    // SAFETY: value points to a T of the given size.
    cvt(unsafe {
        libc::setsockopt(
            fd,
            level,
            name,
            std::ptr::from_ref(value).cast(),
            mem::size_of::<T>() as libc::socklen_t,
        )
    })?;
    Ok(())
}

pub(crate) fn set_reuseaddr(fd: RawFd) -> io::Result<()> {
    setsockopt(fd, libc::SOL_SOCKET, libc::SO_REUSEADDR, &1 as &libc::c_int)
}

/// SO_LINGER {on, 0}: close() sends RST and leaves no TIME_WAIT.
fn set_linger_zero(fd: RawFd) -> io::Result<()> {
    let l = libc::linger {
        l_onoff: 1,
        l_linger: 0,
    };
    setsockopt(fd, libc::SOL_SOCKET, libc::SO_LINGER, &l)
}

pub(crate) fn bind_fd(fd: RawFd, addr: &SocketAddr) -> io::Result<()> {
    let (ss, len) = sockaddr_of(addr);
    // SAFETY: ss/len describe a valid sockaddr.
    cvt(unsafe { libc::bind(fd, std::ptr::from_ref(&ss).cast(), len) })?;
    Ok(())
}

pub(crate) fn connect_fd(fd: RawFd, addr: &SocketAddr) -> io::Result<()> {
    let (ss, len) = sockaddr_of(addr);
    // SAFETY: ss/len describe a valid sockaddr.
    cvt(unsafe { libc::connect(fd, std::ptr::from_ref(&ss).cast(), len) })?;
    Ok(())
}

pub(crate) fn local_addr_fd(fd: RawFd) -> Option<SocketAddr> {
    // SAFETY: zeroed storage; getsockname fills at most len bytes.
    let mut ss: libc::sockaddr_storage = unsafe { mem::zeroed() };
    let mut len = mem::size_of::<libc::sockaddr_storage>() as libc::socklen_t;
    // SAFETY: valid pointers.
    let rc = unsafe { libc::getsockname(fd, std::ptr::from_mut(&mut ss).cast(), &mut len) };
    if rc != 0 {
        return None;
    }
    socketaddr_from(&ss)
}

fn so_error(fd: RawFd) -> io::Result<libc::c_int> {
    let mut err: libc::c_int = 0;
    let mut len = mem::size_of::<libc::c_int>() as libc::socklen_t;
    // SAFETY: valid pointers and size.
    cvt(unsafe {
        libc::getsockopt(
            fd,
            libc::SOL_SOCKET,
            libc::SO_ERROR,
            std::ptr::from_mut(&mut err).cast(),
            &mut len,
        )
    })?;
    Ok(err)
}

/// poll(2) for `events` on `fd` for at most `timeout`; retries on EINTR. Returns revents
/// (0 on timeout).
pub(crate) fn poll_fd(
    fd: RawFd,
    events: libc::c_short,
    timeout: Duration,
) -> io::Result<libc::c_short> {
    let deadline = Instant::now() + timeout;
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        // Round up so a sub-millisecond remainder still waits.
        let ms = left.as_micros().div_ceil(1000).min(i32::MAX as u128) as libc::c_int;
        let mut p = libc::pollfd {
            fd,
            events,
            revents: 0,
        };
        // SAFETY: one valid pollfd.
        let rc = unsafe { libc::poll(&mut p, 1, ms) };
        if rc < 0 {
            let e = io::Error::last_os_error();
            if e.kind() == io::ErrorKind::Interrupted {
                continue;
            }
            return Err(e);
        }
        if rc == 0 {
            if Instant::now() >= deadline {
                return Ok(0);
            }
            continue;
        }
        return Ok(p.revents);
    }
}

/// A UDP socket, optionally bound to `from` (with SO_REUSEADDR) and connected to `to`.
fn udp_socket(
    from: Option<SocketAddr>,
    to: Option<SocketAddr>,
    family_of: &SocketAddr,
) -> io::Result<UdpSocket> {
    let fd = new_socket(family_of, libc::SOCK_DGRAM, false)?;
    if let Some(from) = from {
        set_reuseaddr(fd.as_raw_fd())?;
        bind_fd(fd.as_raw_fd(), &from)?;
    }
    if let Some(to) = to {
        connect_fd(fd.as_raw_fd(), &to)?;
    }
    Ok(UdpSocket::from(fd))
}

pub(crate) fn unspecified(like: &SocketAddr, port: u16) -> SocketAddr {
    match like {
        SocketAddr::V4(_) => SocketAddr::new(Ipv4Addr::UNSPECIFIED.into(), port),
        SocketAddr::V6(_) => SocketAddr::new(Ipv6Addr::UNSPECIFIED.into(), port),
    }
}

pub(crate) fn micros(d: Duration) -> u64 {
    u64::try_from(d.as_micros()).unwrap_or(u64::MAX)
}

/// A small non-cryptographic generator (splitmix64) for DNS ids and nonces.
pub(crate) struct Rng(u64);

impl Rng {
    pub(crate) fn seeded() -> Rng {
        static SALT: AtomicU64 = AtomicU64::new(0);
        let t = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_nanos() as u64)
            .unwrap_or(0);
        Rng(t
            ^ (u64::from(std::process::id()) << 32)
            ^ SALT.fetch_add(0x9e37_79b9, Ordering::Relaxed))
    }
    pub(crate) fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }
}

pub(crate) fn check_rounds(rounds: u32, timeout: Duration) -> Result<()> {
    ensure!(
        (1..=MAX_ROUNDS).contains(&rounds),
        "rounds must be 1..={MAX_ROUNDS}, got {rounds}"
    );
    ensure!(
        !timeout.is_zero() && timeout <= MAX_TIMEOUT,
        "timeout must be > 0 and <= {MAX_TIMEOUT:?}, got {timeout:?}"
    );
    Ok(())
}

// ---------------------------------------------------------------------------------------
// DNS messages

/// DNS type A.
pub const QTYPE_A: u16 = 1;
/// DNS type AAAA.
pub const QTYPE_AAAA: u16 = 28;

/// A DNS query: header (id, RD set, one question) and the question `qname`/`qtype`/IN.
pub fn dns_query(id: u16, qname: &str, qtype: u16) -> Result<Vec<u8>> {
    let name = qname.strip_suffix('.').unwrap_or(qname);
    ensure!(
        !name.is_empty() && name.len() <= 253,
        "invalid DNS name {qname:?}"
    );
    let mut q = Vec::with_capacity(18 + name.len());
    q.extend_from_slice(&id.to_be_bytes());
    q.extend_from_slice(&0x0100u16.to_be_bytes()); // RD
    q.extend_from_slice(&1u16.to_be_bytes()); // QDCOUNT
    q.extend_from_slice(&[0; 6]); // AN, NS, AR
    for label in name.split('.') {
        ensure!(
            !label.is_empty() && label.len() <= 63,
            "invalid label {label:?} in DNS name {qname:?}"
        );
        q.push(label.len() as u8);
        q.extend_from_slice(label.as_bytes());
    }
    q.push(0);
    q.extend_from_slice(&qtype.to_be_bytes());
    q.extend_from_slice(&1u16.to_be_bytes()); // IN
    Ok(q)
}

/// The answer to `query` (one from [`dns_query`]) as a server writes it: QR and RA set,
/// `rcode`, the question echoed and, when `positive`, one record of the question's type
/// (A 10.77.0.99 or AAAA fd77::99, TTL 30) whose name is a pointer to the question's.
/// For tests and benchmarks that need real answer bytes without a server.
pub fn dns_response(query: &[u8], rcode: u8, positive: bool) -> Vec<u8> {
    let mut r = query.to_vec();
    r[2] |= 0x80;
    r[3] = 0x80 | rcode;
    let qtype = u16::from_be_bytes([query[query.len() - 4], query[query.len() - 3]]);
    if positive {
        r[7] = 1;
        r.extend_from_slice(&[0xc0, 12]);
        r.extend_from_slice(&qtype.to_be_bytes());
        r.extend_from_slice(&[0, 1, 0, 0, 0, 30]);
        if qtype == QTYPE_AAAA {
            r.extend_from_slice(&16u16.to_be_bytes());
            r.extend_from_slice(&[0xfd, 0x77, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0x99]);
        } else {
            r.extend_from_slice(&4u16.to_be_bytes());
            r.extend_from_slice(&[10, 77, 0, 99]);
        }
    }
    r
}

/// The header fields of a DNS reply, and the type of its first question.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct DnsReply {
    pub(crate) id: u16,
    pub(crate) rcode: u8,
    pub(crate) ancount: u16,
    pub(crate) qtype: Option<u16>,
}

pub(crate) fn parse_dns_reply(buf: &[u8]) -> Option<DnsReply> {
    if buf.len() < 12 || buf[2] & 0x80 == 0 {
        return None; // too short, or not a response
    }
    let id = u16::from_be_bytes([buf[0], buf[1]]);
    let rcode = buf[3] & 0x0f;
    let qdcount = u16::from_be_bytes([buf[4], buf[5]]);
    let ancount = u16::from_be_bytes([buf[6], buf[7]]);
    let mut qtype = None;
    if qdcount >= 1 {
        let mut i = 12;
        while i < buf.len() {
            let l = buf[i] as usize;
            if l == 0 {
                i += 1;
                if i + 2 <= buf.len() {
                    qtype = Some(u16::from_be_bytes([buf[i], buf[i + 1]]));
                }
                break;
            }
            if l & 0xc0 != 0 {
                i += 2;
                if i + 2 <= buf.len() {
                    qtype = Some(u16::from_be_bytes([buf[i], buf[i + 1]]));
                }
                break;
            }
            i += 1 + l;
        }
    }
    Some(DnsReply {
        id,
        rcode,
        ancount,
        qtype,
    })
}

// ---------------------------------------------------------------------------------------
// 1. The A/AAAA race on one UDP socket

/// One query of a [`RaceRound`].
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct RaceQuery {
    pub id: u16,
    /// "A" or "AAAA".
    #[serde(deserialize_with = "qtype_name")]
    pub qtype: StaticStr,
    /// CPU the sending thread ran on when it sent.
    pub cpu: Option<u32>,
    pub sent: bool,
    /// The error `send()` returned (EPERM = netfilter dropped it on the way out).
    pub send_error: Option<String>,
    pub answered: bool,
    /// From just before `send()` to the reply being read.
    pub latency_us: Option<u64>,
    pub rcode: Option<u8>,
    pub answers: Option<u16>,
}

/// One round of [`udp_race`].
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct RaceRound {
    pub round: u32,
    /// The socket's local address (fresh source port every round).
    pub local: Option<SocketAddr>,
    /// Time between the two `send()` calls.
    pub send_skew_ns: Option<u64>,
    pub a: RaceQuery,
    pub aaaa: RaceQuery,
}

/// Result of [`udp_race`] (and of `tracer lab-client race`, see [`crate::lab::client`]).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct RaceReport {
    pub server: SocketAddr,
    pub qname: String,
    /// The CPUs the two senders were pinned to (empty: not pinned, fewer than 2 CPUs).
    pub cpus: Vec<usize>,
    pub rounds: u32,
    pub queries_sent: u64,
    pub answered: u64,
    pub unanswered: u64,
    /// Rounds in which both queries were answered.
    pub rounds_fully_answered: u64,
    /// Median of the two sends' time difference over the rounds.
    pub median_send_skew_ns: Option<u64>,
    pub elapsed_ms: u64,
    pub per_round: Vec<RaceRound>,
}

/// `&'static str` under another name: serde's derive borrows every field it sees written
/// as `&str` from the input (which, with `'static`, would only deserialize from `'static`
/// data); [`qtype_name`] makes the `'static` value instead.
type StaticStr = &'static str;

/// [`RaceQuery::qtype`] back from JSON (a `&'static str`, so only the names it can hold).
fn qtype_name<'de, D: serde::Deserializer<'de>>(
    d: D,
) -> std::result::Result<&'static str, D::Error> {
    let s = String::deserialize(d)?;
    match s.as_str() {
        "A" => Ok("A"),
        "AAAA" => Ok("AAAA"),
        other => Err(serde::de::Error::custom(format!(
            "unknown qtype {other:?}: expected \"A\" or \"AAAA\""
        ))),
    }
}

struct SendRecord {
    at: Instant,
    cpu: Option<u32>,
    result: io::Result<usize>,
}

fn race_sender(
    sock: &UdpSocket,
    query: &[u8],
    cpu: Option<usize>,
    barrier: &Barrier,
    counter: &AtomicUsize,
    target: usize,
) -> SendRecord {
    if let Some(cpu) = cpu {
        if let Err(e) = pin_to(cpu) {
            debug!("pinning to cpu {cpu}: {e}");
        }
    }
    barrier.wait();
    spin_sync(counter, target);
    let at = Instant::now();
    let result = sock.send(query);
    SendRecord {
        at,
        cpu: current_cpu(),
        result,
    }
}

/// [`udp_race_named`] with the name [`RACE_QNAME`].
pub fn udp_race(
    netns: &Path,
    server: SocketAddr,
    rounds: u32,
    timeout: Duration,
) -> Result<RaceReport> {
    udp_race_named(netns, server, RACE_QNAME, rounds, timeout)
}

/// The A/AAAA race: per round one fresh UDP socket in `netns` connected to `server`; two
/// threads pinned to two different CPUs, released together by a barrier (plus a bounded
/// spin so they leave within nanoseconds), each `send()` one query for `qname` on that
/// socket at the same moment (thread 1 A, thread 2 AAAA, distinct ids). Replies are read
/// on that socket until both ids are answered or `timeout` passes.
pub fn udp_race_named(
    netns: &Path,
    server: SocketAddr,
    qname: &str,
    rounds: u32,
    timeout: Duration,
) -> Result<RaceReport> {
    check_rounds(rounds, timeout)?;
    dns_query(0, qname, QTYPE_A)?; // validate the name once
    in_netns(netns, || udp_race_here(server, qname, rounds, timeout))?
}

/// [`udp_race_named`] in the calling thread's own network namespace: what `tracer
/// lab-client race` runs inside a pod (see [`crate::lab::client`]).
pub(crate) fn udp_race_here(
    server: SocketAddr,
    qname: &str,
    rounds: u32,
    timeout: Duration,
) -> Result<RaceReport> {
    check_rounds(rounds, timeout)?;
    dns_query(0, qname, QTYPE_A)?; // validate the name once
    let cpus: Vec<usize> = allowed_cpus().into_iter().take(2).collect();
    let cpus = if cpus.len() == 2 {
        cpus
    } else {
        warn!("udp_race: fewer than 2 CPUs available; the senders are not pinned");
        Vec::new()
    };
    let started = Instant::now();
    let per_round = {
        let mut rng = Rng::seeded();
        let counter = AtomicUsize::new(0);
        let mut out = Vec::with_capacity(rounds as usize);
        for round in 0..rounds {
            let id_a = (rng.next() & 0xffff) as u16;
            let id_aaaa = id_a.wrapping_add(1 + (rng.next() % 0xfffe) as u16);
            let q_a = dns_query(id_a, qname, QTYPE_A)?;
            let q_aaaa = dns_query(id_aaaa, qname, QTYPE_AAAA)?;
            let sock = udp_socket(None, Some(server), &server)
                .with_context(|| format!("UDP socket connected to {server}"))?;
            // Bind now (connect did) so the local address is known.
            let local = sock.local_addr().ok();
            let barrier = Barrier::new(2);
            let target = 2 * (round as usize + 1);
            let (cpu_a, cpu_aaaa) = (cpus.first().copied(), cpus.get(1).copied());
            let mut replies: HashMap<u16, (Instant, DnsReply)> = HashMap::new();
            let (rec_a, rec_aaaa) = std::thread::scope(|s| {
                let h_a = s.spawn(|| race_sender(&sock, &q_a, cpu_a, &barrier, &counter, target));
                let h_aaaa =
                    s.spawn(|| race_sender(&sock, &q_aaaa, cpu_aaaa, &barrier, &counter, target));
                // Read replies meanwhile; the deadline counts from now (just before the
                // sends), so a round lasts at most `timeout`.
                let deadline = Instant::now() + timeout;
                let mut buf = [0u8; 1500];
                while !(replies.contains_key(&id_a) && replies.contains_key(&id_aaaa)) {
                    let left = deadline.saturating_duration_since(Instant::now());
                    if left.is_zero() {
                        break;
                    }
                    match poll_fd(sock.as_raw_fd(), libc::POLLIN, left) {
                        Ok(0) => break,
                        Ok(_) => {}
                        Err(e) => {
                            warn!("poll: {e}");
                            break;
                        }
                    }
                    loop {
                        // SAFETY: valid buffer; MSG_DONTWAIT so this never blocks.
                        let n = unsafe {
                            libc::recv(
                                sock.as_raw_fd(),
                                buf.as_mut_ptr().cast(),
                                buf.len(),
                                libc::MSG_DONTWAIT,
                            )
                        };
                        let at = Instant::now();
                        if n < 0 {
                            break; // EAGAIN, or ECONNREFUSED (ICMP): keep waiting
                        }
                        if let Some(r) = parse_dns_reply(&buf[..n as usize]) {
                            if r.id == id_a || r.id == id_aaaa {
                                replies.entry(r.id).or_insert((at, r));
                            }
                        }
                    }
                }
                // The senders never block for long (one send each).
                let a = h_a.join().unwrap_or_else(|p| std::panic::resume_unwind(p));
                let b = h_aaaa
                    .join()
                    .unwrap_or_else(|p| std::panic::resume_unwind(p));
                (a, b)
            });
            let mk = |id: u16, qtype: &'static str, rec: &SendRecord| {
                let reply = replies.get(&id);
                RaceQuery {
                    id,
                    qtype,
                    cpu: rec.cpu,
                    sent: rec.result.is_ok(),
                    send_error: rec.result.as_ref().err().map(ToString::to_string),
                    answered: reply.is_some(),
                    latency_us: reply.map(|(at, _)| micros(at.saturating_duration_since(rec.at))),
                    rcode: reply.map(|(_, r)| r.rcode),
                    answers: reply.map(|(_, r)| r.ancount),
                }
            };
            let skew = if rec_a.at > rec_aaaa.at {
                rec_a.at - rec_aaaa.at
            } else {
                rec_aaaa.at - rec_a.at
            };
            out.push(RaceRound {
                round,
                local,
                send_skew_ns: Some(u64::try_from(skew.as_nanos()).unwrap_or(u64::MAX)),
                a: mk(id_a, "A", &rec_a),
                aaaa: mk(id_aaaa, "AAAA", &rec_aaaa),
            });
        }
        out
    };
    let mut report = RaceReport {
        server,
        qname: qname.to_string(),
        cpus,
        rounds,
        queries_sent: 0,
        answered: 0,
        unanswered: 0,
        rounds_fully_answered: 0,
        median_send_skew_ns: None,
        elapsed_ms: u64::try_from(started.elapsed().as_millis()).unwrap_or(u64::MAX),
        per_round: Vec::new(),
    };
    let mut skews = Vec::new();
    for r in &per_round {
        for q in [&r.a, &r.aaaa] {
            report.queries_sent += u64::from(q.sent);
            report.answered += u64::from(q.answered);
            report.unanswered += u64::from(!q.answered);
        }
        report.rounds_fully_answered += u64::from(r.a.answered && r.aaaa.answered);
        skews.extend(r.send_skew_ns);
    }
    skews.sort_unstable();
    report.median_send_skew_ns = skews.get(skews.len() / 2).copied();
    report.per_round = per_round;
    Ok(report)
}

// ---------------------------------------------------------------------------------------
// 2. The SNAT port race, and its server

/// Transport protocol of [`snat_race`] and [`echo_server`] (a `clap::ValueEnum` for the
/// `lab` command line: `tcp`, `udp`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum Proto {
    Tcp,
    Udp,
}

/// A server thread inside a namespace; stopped (and joined) on drop.
#[derive(Debug)]
pub struct ServerGuard {
    addr: SocketAddr,
    proto: Proto,
    stop: Arc<AtomicBool>,
    handled: Arc<AtomicU64>,
    handle: Option<JoinHandle<Result<Result<()>>>>,
}

impl ServerGuard {
    /// The address it listens on.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }
    pub fn proto(&self) -> Proto {
        self.proto
    }
    /// Connections accepted (TCP) or datagrams echoed (UDP) so far.
    pub fn handled(&self) -> u64 {
        self.handled.load(Ordering::Relaxed)
    }
    /// Stops the server and returns the error its loop ended with, if any.
    pub fn stop(mut self) -> Result<()> {
        self.shutdown()
    }
    fn shutdown(&mut self) -> Result<()> {
        self.stop.store(true, Ordering::Relaxed);
        match self.handle.take() {
            Some(h) => match h.join() {
                Ok(r) => r.and_then(|inner| inner),
                Err(_) => bail!("echo server thread panicked"),
            },
            None => Ok(()),
        }
    }
}

impl Drop for ServerGuard {
    fn drop(&mut self) {
        if let Err(e) = self.shutdown() {
            warn!("echo server {:?} {}: {e:#}", self.proto, self.addr);
        }
    }
}

/// Starts a server on a thread inside `netns`: TCP accepts and closes every connection at
/// once (FIN; the client's RST close, see [`snat_race`], then ends it without TIME_WAIT, so
/// the server keeps no state); UDP echoes every datagram to its sender. Returns once the socket is bound. Non-blocking with a stop flag
/// looked at every 20 ms; stops on drop of the guard (or after
/// [`ECHO_SERVER_MAX_LIFETIME`]).
pub fn echo_server(netns: &Path, addr: SocketAddr, proto: Proto) -> Result<ServerGuard> {
    let stop = Arc::new(AtomicBool::new(false));
    let handled = Arc::new(AtomicU64::new(0));
    let (ready_tx, ready_rx) = std::sync::mpsc::channel::<io::Result<()>>();
    let (stop_c, handled_c) = (stop.clone(), handled.clone());
    let handle = spawn_in_netns(netns, "echo-server", move || -> Result<()> {
        let fd = match server_socket(addr, proto) {
            Ok(fd) => {
                let _ = ready_tx.send(Ok(()));
                fd
            }
            Err(e) => {
                let _ = ready_tx.send(Err(e));
                return Ok(());
            }
        };
        server_loop(&fd, proto, &stop_c, &handled_c)
    })?;
    let mut guard = ServerGuard {
        addr,
        proto,
        stop,
        handled,
        handle: Some(handle),
    };
    match ready_rx.recv_timeout(Duration::from_secs(5)) {
        Ok(Ok(())) => Ok(guard),
        Ok(Err(e)) => {
            let _ = guard.shutdown();
            Err(e).with_context(|| format!("echo server: binding {proto:?} {addr}"))
        }
        Err(_) => {
            // The thread ended (setns failed) or is stuck.
            let err = guard.shutdown().err();
            match err {
                Some(e) => Err(e).context("echo server"),
                None => bail!("echo server did not start within 5 s"),
            }
        }
    }
}

fn server_socket(addr: SocketAddr, proto: Proto) -> io::Result<OwnedFd> {
    let ty = match proto {
        Proto::Tcp => libc::SOCK_STREAM,
        Proto::Udp => libc::SOCK_DGRAM,
    };
    let fd = new_socket(&addr, ty, true)?;
    set_reuseaddr(fd.as_raw_fd())?;
    bind_fd(fd.as_raw_fd(), &addr)?;
    if proto == Proto::Tcp {
        // SAFETY: valid fd.
        cvt(unsafe { libc::listen(fd.as_raw_fd(), 4096) })?;
    }
    Ok(fd)
}

fn server_loop(fd: &OwnedFd, proto: Proto, stop: &AtomicBool, handled: &AtomicU64) -> Result<()> {
    let started = Instant::now();
    let raw = fd.as_raw_fd();
    let mut buf = [0u8; 65536];
    while !stop.load(Ordering::Relaxed) && started.elapsed() < ECHO_SERVER_MAX_LIFETIME {
        if poll_fd(raw, libc::POLLIN, SERVER_POLL)? == 0 {
            continue;
        }
        // Drain what is there, bounded per wake-up so the stop flag stays responsive.
        for _ in 0..4096 {
            match proto {
                Proto::Tcp => {
                    // SAFETY: valid fd; null address pointers are allowed.
                    let c = unsafe {
                        libc::accept4(
                            raw,
                            std::ptr::null_mut(),
                            std::ptr::null_mut(),
                            libc::SOCK_CLOEXEC,
                        )
                    };
                    if c < 0 {
                        break;
                    }
                    // SAFETY: a new descriptor we own.
                    let conn = unsafe { OwnedFd::from_raw_fd(c) };
                    // A plain close (FIN): the client's RST (it closes with SO_LINGER 0)
                    // then ends this side without TIME_WAIT. An RST from here instead can
                    // reach the client before its thread has looked at the finished
                    // connect, which then reads ECONNRESET.
                    drop(conn);
                    handled.fetch_add(1, Ordering::Relaxed);
                }
                Proto::Udp => {
                    // SAFETY: zeroed storage; valid buffer and lengths.
                    let mut ss: libc::sockaddr_storage = unsafe { mem::zeroed() };
                    let mut len = mem::size_of::<libc::sockaddr_storage>() as libc::socklen_t;
                    // SAFETY: as above.
                    let n = unsafe {
                        libc::recvfrom(
                            raw,
                            buf.as_mut_ptr().cast(),
                            buf.len(),
                            libc::MSG_DONTWAIT,
                            std::ptr::from_mut(&mut ss).cast(),
                            &mut len,
                        )
                    };
                    if n < 0 {
                        break;
                    }
                    // SAFETY: echo back to the address recvfrom filled in.
                    let rc = unsafe {
                        libc::sendto(
                            raw,
                            buf.as_ptr().cast(),
                            n as usize,
                            libc::MSG_DONTWAIT,
                            std::ptr::from_ref(&ss).cast(),
                            len,
                        )
                    };
                    if rc >= 0 {
                        handled.fetch_add(1, Ordering::Relaxed);
                    }
                }
            }
        }
    }
    Ok(())
}

/// How one attempt of [`snat_race`] ended.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub enum Outcome {
    /// Connected (TCP) or got the echo back (UDP).
    Ok,
    /// No connection / no echo within the timeout.
    Timeout,
    /// A socket call failed (e.g. ECONNREFUSED, EPERM, EADDRINUSE).
    Error(String),
}

/// One client's attempt in one round of [`snat_race`].
#[derive(Debug, Clone, Serialize)]
pub struct SnatAttempt {
    pub client: usize,
    /// CPU the client ran on when it started.
    pub cpu: Option<u32>,
    /// Local address inside the pod (before masquerade).
    pub local: Option<SocketAddr>,
    pub outcome: Outcome,
    /// Connect time (TCP) or echo round trip (UDP); for a timeout, the time waited.
    pub latency_us: u64,
    /// Succeeded, but only after more than [`SLOW_THRESHOLD`] (a retransmitted SYN).
    pub slow: bool,
}

/// One round of [`snat_race`].
#[derive(Debug, Clone, Serialize)]
pub struct SnatRound {
    pub round: u32,
    /// The source port every client bound this round (None: ephemeral).
    pub src_port: Option<u16>,
    pub succeeded: u32,
    pub failed: u32,
    pub slow: u32,
    pub attempts: Vec<SnatAttempt>,
}

/// Minimum, median and maximum in microseconds.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct LatencyStats {
    pub min_us: u64,
    pub median_us: u64,
    pub max_us: u64,
}

impl LatencyStats {
    pub(crate) fn of(values: &mut [u64]) -> Option<LatencyStats> {
        values.sort_unstable();
        Some(LatencyStats {
            min_us: *values.first()?,
            median_us: values[values.len() / 2],
            max_us: *values.last()?,
        })
    }
}

/// Result of [`snat_race`].
#[derive(Debug, Clone, Serialize)]
pub struct SnatReport {
    pub proto: Proto,
    pub server: SocketAddr,
    pub clients: usize,
    pub src_port: Option<u16>,
    pub rounds: u32,
    pub timeout_ms: u64,
    pub attempts: u64,
    pub succeeded: u64,
    /// `timeouts + errors`.
    pub failed: u64,
    pub timeouts: u64,
    pub errors: u64,
    /// Succeeded but slower than [`SLOW_THRESHOLD`] (counted in `succeeded` too).
    pub slow: u64,
    /// Rounds with at least one failed or slow attempt.
    pub rounds_with_loss: u64,
    /// Latencies of the successful attempts.
    pub latency: Option<LatencyStats>,
    pub elapsed_ms: u64,
    pub per_round: Vec<SnatRound>,
}

/// Everything a client needs before the barrier: the socket is made and bound, so after
/// the release only `connect` / `send` remains.
fn snat_prepare(proto: Proto, server: SocketAddr, src_port: Option<u16>) -> io::Result<OwnedFd> {
    let (ty, nonblocking) = match proto {
        Proto::Tcp => (libc::SOCK_STREAM, true),
        Proto::Udp => (libc::SOCK_DGRAM, true),
    };
    let fd = new_socket(&server, ty, nonblocking)?;
    if let Some(p) = src_port {
        set_reuseaddr(fd.as_raw_fd())?;
        bind_fd(fd.as_raw_fd(), &unspecified(&server, p))?;
    }
    if proto == Proto::Tcp {
        // Close with RST: no TIME_WAIT, so the next round can bind the port again.
        set_linger_zero(fd.as_raw_fd())?;
    } else {
        connect_fd(fd.as_raw_fd(), &server)?;
    }
    Ok(fd)
}

fn snat_attempt(
    fd: &OwnedFd,
    proto: Proto,
    server: SocketAddr,
    payload: &[u8],
    timeout: Duration,
    on_sent: &dyn Fn(),
) -> (Outcome, Duration) {
    let raw = fd.as_raw_fd();
    let start = Instant::now();
    let deadline = start + timeout;
    match proto {
        Proto::Tcp => {
            let connected = connect_fd(raw, &server);
            on_sent();
            match connected {
                Ok(()) => return (Outcome::Ok, start.elapsed()),
                Err(e) if e.raw_os_error() == Some(libc::EINPROGRESS) => {}
                Err(e) => return (Outcome::Error(format!("connect: {e}")), start.elapsed()),
            }
            match poll_fd(raw, libc::POLLOUT, timeout) {
                Ok(0) => (Outcome::Timeout, start.elapsed()),
                Ok(_) => {
                    let took = start.elapsed();
                    match so_error(raw) {
                        Ok(0) => (Outcome::Ok, took),
                        // Reset after the handshake completed (a reset in SYN_SENT is
                        // ECONNREFUSED): the connect itself succeeded.
                        Ok(libc::ECONNRESET) | Ok(libc::EPIPE) => (Outcome::Ok, took),
                        Ok(e) => (
                            Outcome::Error(format!("connect: {}", io::Error::from_raw_os_error(e))),
                            took,
                        ),
                        Err(e) => (Outcome::Error(format!("SO_ERROR: {e}")), took),
                    }
                }
                Err(e) => (Outcome::Error(format!("poll: {e}")), start.elapsed()),
            }
        }
        Proto::Udp => {
            // SAFETY: valid buffer.
            let rc = unsafe { libc::send(raw, payload.as_ptr().cast(), payload.len(), 0) };
            on_sent();
            if rc < 0 {
                let e = io::Error::last_os_error();
                return (Outcome::Error(format!("send: {e}")), start.elapsed());
            }
            let mut buf = [0u8; 512];
            loop {
                let left = deadline.saturating_duration_since(Instant::now());
                if left.is_zero() {
                    return (Outcome::Timeout, start.elapsed());
                }
                match poll_fd(raw, libc::POLLIN, left) {
                    Ok(0) => return (Outcome::Timeout, start.elapsed()),
                    Ok(_) => {}
                    Err(e) => return (Outcome::Error(format!("poll: {e}")), start.elapsed()),
                }
                // SAFETY: valid buffer; non-blocking socket.
                let n = unsafe { libc::recv(raw, buf.as_mut_ptr().cast(), buf.len(), 0) };
                if n < 0 {
                    let e = io::Error::last_os_error();
                    if e.kind() == io::ErrorKind::WouldBlock
                        || e.kind() == io::ErrorKind::Interrupted
                    {
                        continue;
                    }
                    return (Outcome::Error(format!("recv: {e}")), start.elapsed());
                }
                if &buf[..n as usize] == payload {
                    return (Outcome::Ok, start.elapsed());
                }
            }
        }
    }
}

/// The SNAT port race: per round one thread per client namespace in `clients` (pods behind
/// a masquerading node), each pinned to a CPU (client i to the i-th allowed CPU, round
/// robin) and released together by a barrier (plus a bounded spin), connects to `server`
/// (TCP: non-blocking connect + poll, up to `timeout`) or sends one datagram and waits up
/// to `timeout` for its echo (UDP). Run [`echo_server`] at `server`.
///
/// `src_port`: `Some(p)` = in each round every client binds the same source port
/// (SO_REUSEADDR): `p + round mod 1024` by default, see [`SnatOptions::rotate_port`];
/// `None` = ephemeral ports. Sockets are closed after every round (TCP with SO_LINGER 0,
/// i.e. RST, so no TIME_WAIT keeps the port). A dropped SYN is retransmitted after ~1 s:
/// with `timeout` above that it shows as a "slow" connect, below it as a timeout.
///
/// Why the port moves by default: the node's conntrack entry of a UDP flow outlives the
/// round (30 s), so with literally the same port every round the next datagram of the same
/// 5-tuple matches that entry, no new NAT decision happens and only round 0 can race
/// (measured: 1 loss in 200 rounds). TCP entries closed by RST are re-opened by the next
/// SYN, so TCP races every round either way.
pub fn snat_race(
    clients: &[PathBuf],
    server: SocketAddr,
    proto: Proto,
    src_port: Option<u16>,
    rounds: u32,
    timeout: Duration,
) -> Result<SnatReport> {
    snat_race_with(
        clients,
        server,
        proto,
        src_port,
        rounds,
        timeout,
        &SnatOptions::default(),
    )
}

/// Extra knobs of [`snat_race_with`].
#[derive(Debug, Clone)]
pub struct SnatOptions {
    /// With a fixed source port `p`: round `r` uses port `p + r mod span` with
    /// `span = min(rotate_port, 65536 - p)` (still the same port for every client in a
    /// round), so every round is a fresh set of flows without leftover conntrack entries.
    /// 0 or 1 = always exactly `p`. Default [`DEFAULT_ROTATE_PORT`].
    pub rotate_port: u16,
    /// Do not pin the client threads to CPUs.
    pub no_pinning: bool,
}

/// Default [`SnatOptions::rotate_port`].
pub const DEFAULT_ROTATE_PORT: u16 = 1024;

impl Default for SnatOptions {
    fn default() -> SnatOptions {
        SnatOptions {
            rotate_port: DEFAULT_ROTATE_PORT,
            no_pinning: false,
        }
    }
}

/// [`snat_race`] with [`SnatOptions`].
pub fn snat_race_with(
    clients: &[PathBuf],
    server: SocketAddr,
    proto: Proto,
    src_port: Option<u16>,
    rounds: u32,
    timeout: Duration,
    opts: &SnatOptions,
) -> Result<SnatReport> {
    check_rounds(rounds, timeout)?;
    ensure!(
        (1..=MAX_CLIENTS).contains(&clients.len()),
        "need 1..={MAX_CLIENTS} client namespaces, got {}",
        clients.len()
    );
    if let Some(p) = src_port {
        ensure!(p != 0, "src_port Some(0): use None for ephemeral ports");
    }
    let span = src_port.map_or(1, |p| {
        u32::from(opts.rotate_port.max(1)).min(65536 - u32::from(p))
    });
    let files: Vec<File> = clients
        .iter()
        .map(|p| open_netns(p))
        .collect::<Result<_>>()?;
    let cpus = if opts.no_pinning {
        Vec::new()
    } else {
        allowed_cpus()
    };
    let ncpus = allowed_cpus().len();
    let started = Instant::now();
    let counter = AtomicUsize::new(0);
    let fired = AtomicUsize::new(0);
    let mut rng = Rng::seeded();
    let n = clients.len();
    let mut per_round = Vec::with_capacity(rounds as usize);
    for round in 0..rounds {
        let port = src_port.map(|p| p + (round % span) as u16);
        let barrier = Barrier::new(n);
        // With more clients than CPUs, the first client on each CPU races (spins until
        // all those are there, then goes) and the others go right after those have sent:
        // a thread spinning on a CPU would keep a second client pinned there from running,
        // two clients on one CPU can not send at the same moment anyway, and one that went
        // first would take the shared port before the racers' NAT lookups.
        let spinners = n.min(ncpus.max(1));
        let target = spinners * (round as usize + 1);
        let nonce = rng.next();
        let attempts: Vec<SnatAttempt> = std::thread::scope(|s| {
            let handles: Vec<_> = files
                .iter()
                .enumerate()
                .map(|(i, f)| {
                    let (barrier, counter, fired, path) = (&barrier, &counter, &fired, &clients[i]);
                    let cpu = (!cpus.is_empty()).then(|| cpus[i % cpus.len()]);
                    s.spawn(move || {
                        // Whatever fails, every thread still goes through the barrier.
                        let setup =
                            enter_netns(f, path)
                                .map_err(|e| format!("{e:#}"))
                                .and_then(|()| {
                                    snat_prepare(proto, server, port)
                                        .map_err(|e| format!("socket/bind port {port:?}: {e}"))
                                });
                        if let Some(cpu) = cpu {
                            let _ = pin_to(cpu);
                        }
                        let mut payload = Vec::with_capacity(20);
                        payload.extend_from_slice(b"snat");
                        payload.extend_from_slice(&nonce.to_be_bytes());
                        payload.extend_from_slice(&(i as u32).to_be_bytes());
                        payload.extend_from_slice(&round.to_be_bytes());
                        let racer = i < spinners;
                        let notify = || {
                            if racer {
                                fired.fetch_add(1, Ordering::AcqRel);
                            }
                        };
                        barrier.wait();
                        if racer {
                            spin_sync(counter, target);
                        } else {
                            wait_for(fired, target);
                        }
                        let cpu_now = current_cpu();
                        let (outcome, took, local) = match &setup {
                            Ok(fd) => {
                                let (o, t) =
                                    snat_attempt(fd, proto, server, &payload, timeout, &notify);
                                (o, t, local_addr_fd(fd.as_raw_fd()))
                            }
                            Err(e) => {
                                notify();
                                (Outcome::Error(e.clone()), Duration::ZERO, None)
                            }
                        };
                        drop(setup); // close (RST for TCP) before the next round
                        SnatAttempt {
                            client: i,
                            cpu: cpu_now,
                            local,
                            slow: outcome == Outcome::Ok && took > SLOW_THRESHOLD,
                            outcome,
                            latency_us: micros(took),
                        }
                    })
                })
                .collect();
            handles
                .into_iter()
                .map(|h| h.join().unwrap_or_else(|p| std::panic::resume_unwind(p)))
                .collect()
        });
        let succeeded = attempts.iter().filter(|a| a.outcome == Outcome::Ok).count() as u32;
        let slow = attempts.iter().filter(|a| a.slow).count() as u32;
        per_round.push(SnatRound {
            round,
            src_port: port,
            succeeded,
            failed: n as u32 - succeeded,
            slow,
            attempts,
        });
    }
    let mut report = SnatReport {
        proto,
        server,
        clients: n,
        src_port,
        rounds,
        timeout_ms: u64::try_from(timeout.as_millis()).unwrap_or(u64::MAX),
        attempts: 0,
        succeeded: 0,
        failed: 0,
        timeouts: 0,
        errors: 0,
        slow: 0,
        rounds_with_loss: 0,
        latency: None,
        elapsed_ms: u64::try_from(started.elapsed().as_millis()).unwrap_or(u64::MAX),
        per_round: Vec::new(),
    };
    let mut lat = Vec::new();
    for r in &per_round {
        report.rounds_with_loss += u64::from(r.failed > 0 || r.slow > 0);
        for a in &r.attempts {
            report.attempts += 1;
            match &a.outcome {
                Outcome::Ok => {
                    report.succeeded += 1;
                    lat.push(a.latency_us);
                }
                Outcome::Timeout => report.timeouts += 1,
                Outcome::Error(_) => report.errors += 1,
            }
            report.slow += u64::from(a.slow);
        }
    }
    report.failed = report.timeouts + report.errors;
    report.latency = LatencyStats::of(&mut lat);
    report.per_round = per_round;
    Ok(report)
}

// ---------------------------------------------------------------------------------------
// 3. Single datagrams and many flows

/// Sends one UDP datagram from inside `netns` to `to`, from `from` if given (bound with
/// SO_REUSEADDR; port 0 = ephemeral) or an ephemeral port.
pub fn send_udp(
    netns: &Path,
    from: Option<SocketAddr>,
    to: SocketAddr,
    payload: &[u8],
) -> Result<()> {
    ensure!(
        payload.len() <= 65507,
        "payload of {} bytes is too large",
        payload.len()
    );
    if let Some(f) = from {
        ensure!(
            f.is_ipv4() == to.is_ipv4(),
            "from {f} and to {to} are of different address families"
        );
    }
    in_netns(netns, || -> Result<()> {
        let sock = udp_socket(from, None, &to).with_context(|| match from {
            Some(f) => format!("UDP socket bound to {f}"),
            None => "UDP socket".to_string(),
        })?;
        let n = sock
            .send_to(payload, to)
            .with_context(|| format!("sending {} bytes to {to}", payload.len()))?;
        ensure!(
            n == payload.len(),
            "short send to {to}: {n} of {}",
            payload.len()
        );
        Ok(())
    })?
}

fn local_port_range() -> (u16, u16) {
    std::fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range")
        .ok()
        .and_then(|s| {
            let mut it = s.split_whitespace().map(|w| w.parse::<u16>().ok());
            Some((it.next()??, it.next()??))
        })
        .filter(|(lo, hi)| lo <= hi && *lo >= 1024)
        .unwrap_or((32768, 60999))
}

/// Every port of 1024..=65535 once: `start..=hi`, `lo..start`, then the rest.
fn source_ports(lo: u16, hi: u16, start: u16) -> impl Iterator<Item = u16> {
    let start = start.clamp(lo, hi);
    (start..=hi)
        .chain(lo..start)
        .chain(1024..lo)
        .chain((u32::from(hi) + 1..=65535).map(|p| p as u16))
}

/// Upper bound for flows per call of [`udp_flows`] / [`udp_echo_flows`] (one per
/// non-privileged source port).
pub const MAX_FLOWS: u32 = 64_512;

/// Sends `n` one-byte datagrams from inside `netns` to `to_ip:port`, each from its own
/// source port, so they are `n` distinct flows (conntrack entries, where conntrack is
/// active). Ports are taken in order from the namespace's `ip_local_port_range`, then from
/// the rest of 1024..=65535, skipping ports in use; at most [`MAX_FLOWS`]. Stops at the
/// first failed send (EPERM: netfilter dropped it on the way out, e.g. a full conntrack
/// table in this namespace) with an error that says how many were sent.
pub fn udp_flows(netns: &Path, to_ip: IpAddr, port: u16, n: u32) -> Result<()> {
    ensure!(
        n <= MAX_FLOWS,
        "at most {MAX_FLOWS} flows per destination, asked for {n}"
    );
    ensure!(port != 0, "destination port 0");
    let to = SocketAddr::new(to_ip, port);
    in_netns(netns, || -> Result<()> {
        let (lo, hi) = local_port_range();
        let started = Instant::now();
        let mut sent = 0u32;
        let mut in_use = 0u32;
        for p in source_ports(lo, hi, lo) {
            if sent == n {
                break;
            }
            ensure!(
                started.elapsed() < FLOWS_TIME_LIMIT,
                "udp_flows: only {sent} of {n} sent within {FLOWS_TIME_LIMIT:?}"
            );
            let sock = match udp_socket(Some(unspecified(&to, p)), None, &to) {
                Ok(s) => s,
                Err(e) if e.kind() == io::ErrorKind::AddrInUse => {
                    in_use += 1;
                    continue;
                }
                Err(e) => {
                    return Err(e).with_context(|| {
                        format!("udp_flows: binding port {p} ({sent} of {n} sent)")
                    })
                }
            };
            sock.send_to(&[0], to).with_context(|| {
                format!("udp_flows: sending from port {p} to {to} ({sent} of {n} sent)")
            })?;
            sent += 1;
        }
        ensure!(
            sent == n,
            "udp_flows: ran out of source ports after {sent} of {n} ({in_use} in use)"
        );
        Ok(())
    })?
}

/// Result of [`udp_echo_flows`].
#[derive(Debug, Clone, Serialize)]
pub struct EchoFlowsReport {
    pub server: SocketAddr,
    pub attempts: u64,
    pub succeeded: u64,
    /// `timeouts + errors`.
    pub failed: u64,
    pub timeouts: u64,
    /// Socket errors, e.g. EPERM from `send()` when netfilter in this namespace dropped it.
    pub errors: u64,
    /// The first few error messages.
    pub first_errors: Vec<String>,
    /// Echo round trips of the successful flows.
    pub latency: Option<LatencyStats>,
    pub elapsed_ms: u64,
}

/// Flows per batch of [`udp_echo_flows`] (sockets open at once).
const ECHO_BATCH: usize = 256;

/// `n` new UDP flows from inside `netns` to `server` (run [`echo_server`] there), each from
/// its own source port (distinct within the call; a random start in the local port range),
/// each sending one datagram and waiting for its echo. Flows go in batches of 256 sockets
/// sent back to back, then waited for together: a batch takes at most `timeout`, so the
/// call at most `ceil(n / 256) * timeout`.
pub fn udp_echo_flows(
    netns: &Path,
    server: SocketAddr,
    n: u32,
    timeout: Duration,
) -> Result<EchoFlowsReport> {
    ensure!(
        n <= MAX_FLOWS,
        "at most {MAX_FLOWS} flows per destination, asked for {n}"
    );
    check_rounds(n.max(1), timeout)?;
    let started = Instant::now();
    let mut report = EchoFlowsReport {
        server,
        attempts: 0,
        succeeded: 0,
        failed: 0,
        timeouts: 0,
        errors: 0,
        first_errors: Vec::new(),
        latency: None,
        elapsed_ms: 0,
    };
    let mut lat = Vec::new();
    in_netns(netns, || -> Result<()> {
        let (lo, hi) = local_port_range();
        let mut rng = Rng::seeded();
        let start = lo + (rng.next() % (u64::from(hi - lo) + 1)) as u16;
        let mut ports = source_ports(lo, hi, start);
        let nonce = rng.next();
        let mut done = 0u32;
        let note = |report: &mut EchoFlowsReport, msg: String| {
            report.errors += 1;
            if report.first_errors.len() < 5 {
                report.first_errors.push(msg);
            }
        };
        while done < n {
            // Open and send a batch.
            let mut batch: Vec<(UdpSocket, Instant, [u8; 12])> = Vec::with_capacity(ECHO_BATCH);
            while batch.len() < ECHO_BATCH && done < n {
                let Some(p) = ports.next() else {
                    bail!("udp_echo_flows: ran out of source ports after {done} of {n}");
                };
                let sock = match udp_socket(Some(unspecified(&server, p)), Some(server), &server) {
                    Ok(s) => s,
                    Err(e) if e.kind() == io::ErrorKind::AddrInUse => continue,
                    Err(e) => {
                        return Err(e)
                            .with_context(|| format!("udp_echo_flows: socket on port {p}"))
                    }
                };
                sock.set_nonblocking(true)?;
                done += 1;
                report.attempts += 1;
                let mut payload = [0u8; 12];
                payload[..8].copy_from_slice(&nonce.to_be_bytes());
                payload[8..].copy_from_slice(&done.to_be_bytes());
                let at = Instant::now();
                match sock.send(&payload) {
                    Ok(_) => batch.push((sock, at, payload)),
                    Err(e) => note(&mut report, format!("send from port {p}: {e}")),
                }
            }
            // Wait for the echoes of this batch.
            let deadline = Instant::now() + timeout;
            let mut pending: Vec<bool> = vec![true; batch.len()];
            let mut left_n = batch.len();
            let mut buf = [0u8; 64];
            while left_n > 0 {
                let left = deadline.saturating_duration_since(Instant::now());
                if left.is_zero() {
                    break;
                }
                let idx: Vec<usize> = (0..batch.len()).filter(|&i| pending[i]).collect();
                let mut fds: Vec<libc::pollfd> = idx
                    .iter()
                    .map(|&i| libc::pollfd {
                        fd: batch[i].0.as_raw_fd(),
                        events: libc::POLLIN,
                        revents: 0,
                    })
                    .collect();
                let ms = left.as_micros().div_ceil(1000).min(i32::MAX as u128) as libc::c_int;
                // SAFETY: fds is a valid array of pollfd.
                let rc = unsafe { libc::poll(fds.as_mut_ptr(), fds.len() as libc::nfds_t, ms) };
                if rc < 0 {
                    let e = io::Error::last_os_error();
                    if e.kind() == io::ErrorKind::Interrupted {
                        continue;
                    }
                    return Err(e).context("udp_echo_flows: poll");
                }
                for (k, pfd) in fds.iter().enumerate() {
                    if pfd.revents == 0 {
                        continue;
                    }
                    let i = idx[k];
                    let (sock, at, payload) = &batch[i];
                    match sock.recv(&mut buf) {
                        Ok(m) if buf[..m] == payload[..] => {
                            pending[i] = false;
                            left_n -= 1;
                            report.succeeded += 1;
                            lat.push(micros(at.elapsed()));
                        }
                        Ok(_) => {}
                        Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                        Err(e) => {
                            pending[i] = false;
                            left_n -= 1;
                            note(&mut report, format!("recv: {e}"));
                        }
                    }
                }
            }
            report.timeouts += left_n as u64;
        }
        Ok(())
    })??;
    report.failed = report.timeouts + report.errors;
    report.latency = LatencyStats::of(&mut lat);
    report.elapsed_ms = u64::try_from(started.elapsed().as_millis()).unwrap_or(u64::MAX);
    Ok(report)
}

// ---------------------------------------------------------------------------------------
// 4. An out-of-window segment through a DNAT node (INVALID, kubernetes#74839)
//
// A pod talks TCP to a service VIP that the node DNATs to a backend which routes its
// replies straight back to the pods (no SNAT). A segment from the backend that the node's
// conntrack finds out of window is INVALID: conntrack detaches from it, so it is not
// reverse-NATed and reaches the pod with the backend's real address as its source. The pod
// has no socket for that 4-tuple and answers with RST, which resets the backend's side of
// the connection. `nf_conntrack_tcp_be_liberal=1` (the segment is reverse-NATed and the
// pod's socket just ACKs it) and `ct state invalid drop` (it never reaches the pod) both
// keep the connection alive.

use crate::lab::topology::{Cluster, SERVER_IP, SERVER_PORT};
use crate::netns::Netns;

/// The service VIP of the INVALID scenario, DNATed by [`setup_invalid_dnat`] to the lab's
/// server ([`SERVER_IP`]:[`SERVER_PORT`]).
pub const INVALID_VIP: Ipv4Addr = Ipv4Addr::new(10, 96, 0, 20);
/// The VIP's TCP port.
pub const INVALID_VIP_PORT: u16 = 80;
/// The node's nft table with the VIP's DNAT rule.
pub const INVALID_DNAT_TABLE: &str = "labinvalid";
/// The node's nft table of [`drop_invalid`].
pub const INVALID_DROP_TABLE: &str = "labinvaliddrop";
/// The node's sysctl of [`set_tcp_be_liberal`].
pub const TCP_BE_LIBERAL: &str = "net.netfilter.nf_conntrack_tcp_be_liberal";
/// How far beyond the backend's `snd_nxt` the forged segment's sequence number lies. Far
/// above any window this lab can open (a receive window is at most 2^30 with the largest
/// window scale), and below 2^31 so sequence-number arithmetic calls it "after", not
/// "before".
pub const FORGED_SEQ_OFFSET: u32 = 0x6000_0000;
/// Payload of the forged segment.
const FORGED_PAYLOAD: &[u8] = b"conntrack-out-of-window";
/// The forged segment's window field.
const FORGED_WINDOW: u16 = 502;
/// Packets looked at per drain of the pod's packet socket, at most.
const SNIFF_MAX_PACKETS: usize = 4096;

const TCP_FLAG_RST: u8 = 0x04;
const TCP_FLAG_PSH: u8 = 0x08;
const TCP_FLAG_ACK: u8 = 0x10;
/// `enum tcp_repair_queue` values and `TCP_REPAIR_OFF_NO_WP` of `<linux/tcp.h>`.
const TCP_RECV_QUEUE: libc::c_int = 1;
const TCP_SEND_QUEUE: libc::c_int = 2;
const TCP_REPAIR_ON: libc::c_int = 1;
const TCP_REPAIR_OFF_NO_WP: libc::c_int = -1;
/// `sll_pkttype` of `<linux/if_packet.h>`.
const PACKET_HOST: u8 = 0;
const PACKET_OUTGOING: u8 = 4;

/// Sets up the INVALID scenario on a lab cluster built with a server namespace: on the
/// node, table [`INVALID_DNAT_TABLE`] DNATs TCP to [`INVALID_VIP`]:[`INVALID_VIP_PORT`] to
/// the server ([`SERVER_IP`]:[`SERVER_PORT`]); the server gets a route back to the pods
/// (10.244.0.0/16) via the node, so replies are not SNATed. Returns `(vip, backend)` for
/// [`invalid_segment`].
pub fn setup_invalid_dnat(cluster: &Cluster) -> Result<(SocketAddr, SocketAddr)> {
    let server = cluster.server.as_ref().context(
        "the INVALID scenario needs the lab's server namespace (Cluster::build(.., .., true))",
    )?;
    cluster.node.nft(&format!(
        "table ip {INVALID_DNAT_TABLE} {{\n  chain pre {{\n    \
         type nat hook prerouting priority -100; policy accept;\n    \
         ip daddr {INVALID_VIP} tcp dport {INVALID_VIP_PORT} dnat to {SERVER_IP}:{SERVER_PORT}\n  \
         }}\n}}\n"
    ))?;
    server
        .route_add("10.244.0.0/16 via 10.246.0.1")
        .context("route from the server back to the pods via the node")?;
    Ok((
        SocketAddr::new(IpAddr::V4(INVALID_VIP), INVALID_VIP_PORT),
        SocketAddr::new(IpAddr::V4(SERVER_IP), SERVER_PORT),
    ))
}

/// Mitigation 1: `net.netfilter.nf_conntrack_tcp_be_liberal` in `node` (per netns; the
/// conntrack module must be loaded, which any nat or ct rule does).
pub fn set_tcp_be_liberal(node: &Netns, on: bool) -> Result<()> {
    node.sysctl_set(TCP_BE_LIBERAL, if on { "1" } else { "0" })
}

/// Mitigation 2: table [`INVALID_DROP_TABLE`] in `node` with `ct state invalid counter drop`
/// in a forward chain.
pub fn drop_invalid(node: &Netns) -> Result<()> {
    node.nft(&format!(
        "table inet {INVALID_DROP_TABLE} {{\n  chain forward {{\n    \
         type filter hook forward priority 0; policy accept;\n    \
         ct state invalid counter drop\n  }}\n}}\n"
    ))
}

/// One round of [`invalid_segment`].
#[derive(Debug, Clone, Default, Serialize)]
pub struct InvalidRound {
    pub round: u32,
    /// The pod socket's local address.
    pub pod: Option<SocketAddr>,
    /// The pod as the server sees it (`getpeername` of the accepted socket): the forged
    /// segment's destination.
    pub peer: Option<SocketAddr>,
    /// The forged segment's sequence number (the server's `snd_nxt` +
    /// [`FORGED_SEQ_OFFSET`]) and acknowledgment number (the server's `rcv_nxt`).
    pub forged_seq: Option<u32>,
    pub forged_ack: Option<u32>,
    /// The source address the forged segment had when it arrived in the pod: the backend
    /// (not reverse-NATed: the node's conntrack found it INVALID), the VIP (reverse-NATed),
    /// or None (it never arrived, e.g. dropped on the node).
    pub forged_arrived_from: Option<SocketAddr>,
    /// The pod sent an RST from its socket's port to the backend's real address.
    pub rst_from_pod: bool,
    /// The server's accepted socket was reset.
    pub server_reset: bool,
    /// From sending the forged segment to the server socket reporting the reset.
    pub reset_after_us: Option<u64>,
    /// After the forged segment, a byte sent by the pod came back echoed by the server.
    pub client_alive: bool,
    /// Why the pod's socket was not alive (e.g. "Connection reset by peer").
    pub client_error: Option<String>,
    /// The round could not be set up (connect, accept, data exchange, forging); its
    /// outcome fields then stay false / None.
    pub error: Option<String>,
}

/// Result of [`invalid_segment`].
#[derive(Debug, Clone, Serialize)]
pub struct InvalidReport {
    pub vip: SocketAddr,
    pub backend: SocketAddr,
    pub timeout_ms: u64,
    /// Rounds run (including those with an `error`).
    pub rounds: u64,
    /// Rounds in which the server's connection was reset.
    pub server_resets: u64,
    /// Rounds in which the pod's connection still worked afterwards.
    pub client_alive: u64,
    /// Rounds in which the pod sent an RST to the backend's real address.
    pub rst_from_pod: u64,
    /// Rounds in which the forged segment reached the pod with the backend's address.
    pub forged_untranslated: u64,
    /// ... with the VIP's address (reverse-NATed).
    pub forged_translated: u64,
    /// ... not at all.
    pub forged_unseen: u64,
    /// Rounds that could not be set up.
    pub errors: u64,
    pub elapsed_ms: u64,
    pub per_round: Vec<InvalidRound>,
}

/// The INVALID failure mode, `rounds` times: per round the pod (a thread in `pod`) connects
/// to `vip` (DNATed by the node to `backend`), a listener in `server` on `backend` (one for
/// all rounds) accepts, and they exchange 4 bytes each way (ESTABLISHED, ASSURED). Then a
/// raw socket in `server` sends a forged segment backend -> pod (the accepted socket's
/// peer) with ACK and PSH, [`FORGED_SEQ_OFFSET`] beyond the server's `snd_nxt` (out of any
/// window), acknowledging exactly the server's `rcv_nxt` (so an RST the pod derives from it
/// carries the sequence number the server's socket accepts as a reset). Both are read with
/// `TCP_REPAIR` (root). Then:
/// - waits up to `timeout` for the server's socket to be reset (ECONNRESET);
/// - the pod sends one byte; unless reset, the server echoes it; the pod waits up to
///   `timeout` for it (`client_alive`);
/// - a packet socket in `pod` tells how the forged segment arrived (from the backend or the
///   VIP) and whether the pod answered with RST to the backend.
///
/// Every socket is closed at the end of its round (SO_LINGER 0, the server's first). A round
/// takes at most 11 x `timeout` (each step waits up to `timeout`); one without a reset at
/// least `timeout` (the wait for it). IPv4 only.
pub fn invalid_segment(
    pod: &Path,
    server: &Path,
    vip: SocketAddr,
    backend: SocketAddr,
    rounds: u32,
    timeout: Duration,
) -> Result<InvalidReport> {
    check_rounds(rounds, timeout)?;
    let SocketAddr::V4(backend4) = backend else {
        bail!("invalid_segment: IPv4 only, backend {backend}");
    };
    ensure!(vip.is_ipv4(), "invalid_segment: IPv4 only, vip {vip}");
    let started = Instant::now();
    let (listener, raw) = in_netns(server, move || -> Result<(OwnedFd, OwnedFd)> {
        let l = new_socket(&backend, libc::SOCK_STREAM, true).context("TCP socket")?;
        set_reuseaddr(l.as_raw_fd())?;
        bind_fd(l.as_raw_fd(), &backend).with_context(|| format!("binding {backend}"))?;
        // SAFETY: plain syscall on a valid fd.
        cvt(unsafe { libc::listen(l.as_raw_fd(), 16) }).context("listen")?;
        // SAFETY: plain syscall; IPPROTO_RAW implies IP_HDRINCL.
        let fd = cvt(unsafe {
            libc::socket(
                libc::AF_INET,
                libc::SOCK_RAW | libc::SOCK_CLOEXEC,
                libc::IPPROTO_RAW,
            )
        })
        .context("raw socket (needs CAP_NET_RAW)")?;
        // SAFETY: fd is a new, owned descriptor.
        Ok((l, unsafe { OwnedFd::from_raw_fd(fd) }))
    })?
    .with_context(|| format!("server side in {}", server.display()))?;
    let sniffer = in_netns(pod, packet_socket)?
        .with_context(|| format!("packet socket in {}", pod.display()))?;
    let ctx = InvalidCtx {
        pod,
        vip,
        backend: backend4,
        listener,
        raw,
        sniffer,
        timeout,
    };
    let per_round: Vec<InvalidRound> = (0..rounds)
        .map(|round| {
            let mut r = InvalidRound {
                round,
                ..InvalidRound::default()
            };
            if let Err(e) = invalid_round(&ctx, &mut r) {
                r.error = Some(format!("{e:#}"));
            }
            r
        })
        .collect();
    let count =
        |f: &dyn Fn(&InvalidRound) -> bool| per_round.iter().filter(|r| f(r)).count() as u64;
    let is_backend = |a: &Option<SocketAddr>| *a == Some(backend);
    Ok(InvalidReport {
        vip,
        backend,
        timeout_ms: u64::try_from(timeout.as_millis()).unwrap_or(u64::MAX),
        rounds: per_round.len() as u64,
        server_resets: count(&|r| r.server_reset),
        client_alive: count(&|r| r.client_alive),
        rst_from_pod: count(&|r| r.rst_from_pod),
        forged_untranslated: count(&|r| is_backend(&r.forged_arrived_from)),
        forged_translated: count(&|r| {
            r.forged_arrived_from.is_some() && !is_backend(&r.forged_arrived_from)
        }),
        forged_unseen: count(&|r| r.error.is_none() && r.forged_arrived_from.is_none()),
        errors: count(&|r| r.error.is_some()),
        elapsed_ms: u64::try_from(started.elapsed().as_millis()).unwrap_or(u64::MAX),
        per_round,
    })
}

struct InvalidCtx<'a> {
    pod: &'a Path,
    vip: SocketAddr,
    backend: SocketAddrV4,
    /// In the server netns, on `backend`.
    listener: OwnedFd,
    /// IPPROTO_RAW in the server netns.
    raw: OwnedFd,
    /// AF_PACKET in the pod netns.
    sniffer: OwnedFd,
    timeout: Duration,
}

fn timed_out(what: &str) -> io::Error {
    io::Error::new(io::ErrorKind::TimedOut, format!("{what}: timed out"))
}

/// Sends all of `data` on a non-blocking socket within `timeout` (MSG_NOSIGNAL).
fn send_all_nb(fd: RawFd, data: &[u8], timeout: Duration) -> io::Result<()> {
    let deadline = Instant::now() + timeout;
    let mut off = 0;
    while off < data.len() {
        // SAFETY: valid buffer; no SIGPIPE.
        let n = unsafe {
            libc::send(
                fd,
                data[off..].as_ptr().cast(),
                data.len() - off,
                libc::MSG_NOSIGNAL | libc::MSG_DONTWAIT,
            )
        };
        if n >= 0 {
            off += n as usize;
            continue;
        }
        let e = io::Error::last_os_error();
        match e.kind() {
            io::ErrorKind::Interrupted => {}
            io::ErrorKind::WouldBlock => {
                let left = deadline.saturating_duration_since(Instant::now());
                if left.is_zero() || poll_fd(fd, libc::POLLOUT, left)? == 0 {
                    return Err(timed_out("send"));
                }
            }
            _ => return Err(e),
        }
    }
    Ok(())
}

/// Reads exactly `n` bytes from a non-blocking socket within `timeout`.
fn recv_exact_nb(fd: RawFd, n: usize, timeout: Duration) -> io::Result<Vec<u8>> {
    let deadline = Instant::now() + timeout;
    let mut out = vec![0u8; n];
    let mut got = 0;
    while got < n {
        // SAFETY: valid buffer of the given length.
        let m = unsafe {
            libc::recv(
                fd,
                out[got..].as_mut_ptr().cast(),
                n - got,
                libc::MSG_DONTWAIT,
            )
        };
        if m > 0 {
            got += m as usize;
            continue;
        }
        if m == 0 {
            return Err(io::Error::new(
                io::ErrorKind::UnexpectedEof,
                format!("recv: connection closed after {got} of {n} bytes"),
            ));
        }
        let e = io::Error::last_os_error();
        match e.kind() {
            io::ErrorKind::Interrupted => {}
            io::ErrorKind::WouldBlock => {
                let left = deadline.saturating_duration_since(Instant::now());
                if left.is_zero() || poll_fd(fd, libc::POLLIN, left)? == 0 {
                    return Err(timed_out("recv"));
                }
            }
            _ => return Err(e),
        }
    }
    Ok(out)
}

fn getsockopt_int(fd: RawFd, level: libc::c_int, name: libc::c_int) -> io::Result<libc::c_int> {
    let mut v: libc::c_int = 0;
    let mut len = mem::size_of::<libc::c_int>() as libc::socklen_t;
    // SAFETY: valid pointers and size.
    cvt(unsafe { libc::getsockopt(fd, level, name, std::ptr::from_mut(&mut v).cast(), &mut len) })?;
    Ok(v)
}

/// `(snd_nxt, rcv_nxt)` of a connected TCP socket (`write_seq` and `rcv_nxt`: with nothing
/// unsent, `write_seq` is `snd_nxt`), read in `TCP_REPAIR` mode, which is left again without
/// a window probe. Needs CAP_NET_ADMIN.
fn tcp_seqs(fd: RawFd) -> io::Result<(u32, u32)> {
    setsockopt(fd, libc::IPPROTO_TCP, libc::TCP_REPAIR, &TCP_REPAIR_ON)?;
    let read = || -> io::Result<(u32, u32)> {
        setsockopt(
            fd,
            libc::IPPROTO_TCP,
            libc::TCP_REPAIR_QUEUE,
            &TCP_SEND_QUEUE,
        )?;
        let snd = getsockopt_int(fd, libc::IPPROTO_TCP, libc::TCP_QUEUE_SEQ)?;
        setsockopt(
            fd,
            libc::IPPROTO_TCP,
            libc::TCP_REPAIR_QUEUE,
            &TCP_RECV_QUEUE,
        )?;
        let rcv = getsockopt_int(fd, libc::IPPROTO_TCP, libc::TCP_QUEUE_SEQ)?;
        Ok((snd as u32, rcv as u32))
    };
    let seqs = read();
    let off = setsockopt(
        fd,
        libc::IPPROTO_TCP,
        libc::TCP_REPAIR,
        &TCP_REPAIR_OFF_NO_WP,
    );
    let seqs = seqs?;
    off?;
    Ok(seqs)
}

/// The Internet checksum (RFC 1071) of `data`, continuing from the partial sum `sum`.
fn csum_add(mut sum: u32, data: &[u8]) -> u32 {
    let mut chunks = data.chunks_exact(2);
    for c in &mut chunks {
        sum = sum.wrapping_add(u32::from(u16::from_be_bytes([c[0], c[1]])));
    }
    if let [last] = chunks.remainder() {
        sum = sum.wrapping_add(u32::from(*last) << 8);
    }
    sum
}

fn csum_fold(mut sum: u32) -> u16 {
    while sum >> 16 != 0 {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    !(sum as u16)
}

/// An IPv4 packet (20-byte header, DF, TTL 64, id 0: a raw socket's kernel fills in an id
/// and recomputes the header checksum) carrying a TCP segment (20-byte header, no options,
/// window [`FORGED_WINDOW`]) with both checksums filled in.
fn tcp_segment_v4(
    src: SocketAddrV4,
    dst: SocketAddrV4,
    seq: u32,
    ack: u32,
    flags: u8,
    payload: &[u8],
) -> Vec<u8> {
    let tcp_len = 20 + payload.len();
    let total = 20 + tcp_len;
    let mut p = Vec::with_capacity(total);
    p.extend_from_slice(&[0x45, 0]);
    p.extend_from_slice(&(total as u16).to_be_bytes());
    p.extend_from_slice(&[0, 0]); // id
    p.extend_from_slice(&0x4000u16.to_be_bytes()); // DF
    p.extend_from_slice(&[64, libc::IPPROTO_TCP as u8, 0, 0]);
    p.extend_from_slice(&src.ip().octets());
    p.extend_from_slice(&dst.ip().octets());
    let ip_sum = csum_fold(csum_add(0, &p));
    p[10..12].copy_from_slice(&ip_sum.to_be_bytes());
    p.extend_from_slice(&src.port().to_be_bytes());
    p.extend_from_slice(&dst.port().to_be_bytes());
    p.extend_from_slice(&seq.to_be_bytes());
    p.extend_from_slice(&ack.to_be_bytes());
    p.extend_from_slice(&[5 << 4, flags]);
    p.extend_from_slice(&FORGED_WINDOW.to_be_bytes());
    p.extend_from_slice(&[0, 0, 0, 0]); // checksum, urgent pointer
    p.extend_from_slice(payload);
    let mut pseudo = [0u8; 12];
    pseudo[..4].copy_from_slice(&src.ip().octets());
    pseudo[4..8].copy_from_slice(&dst.ip().octets());
    pseudo[9] = libc::IPPROTO_TCP as u8;
    pseudo[10..].copy_from_slice(&(tcp_len as u16).to_be_bytes());
    let tcp_sum = csum_fold(csum_add(csum_add(0, &pseudo), &p[20..]));
    p[36..38].copy_from_slice(&tcp_sum.to_be_bytes());
    p
}

/// The addresses, sequence number and flags of an IPv4 packet carrying TCP (first
/// fragment), or None.
fn parse_tcp_v4(pkt: &[u8]) -> Option<(SocketAddrV4, SocketAddrV4, u32, u8)> {
    if pkt.len() < 20 || pkt[0] >> 4 != 4 || pkt[9] != libc::IPPROTO_TCP as u8 {
        return None;
    }
    let ihl = usize::from(pkt[0] & 0x0f) * 4;
    let frag_off = u16::from_be_bytes([pkt[6], pkt[7]]) & 0x1fff;
    if ihl < 20 || frag_off != 0 || pkt.len() < ihl + 20 {
        return None;
    }
    let ip = |o: usize| Ipv4Addr::new(pkt[o], pkt[o + 1], pkt[o + 2], pkt[o + 3]);
    let t = &pkt[ihl..];
    let port = |o: usize| u16::from_be_bytes([t[o], t[o + 1]]);
    Some((
        SocketAddrV4::new(ip(12), port(0)),
        SocketAddrV4::new(ip(16), port(2)),
        u32::from_be_bytes([t[4], t[5], t[6], t[7]]),
        t[13],
    ))
}

/// AF_PACKET / SOCK_DGRAM on every interface of the calling thread's netns, non-blocking.
/// ETH_P_ALL, not ETH_P_IP: only ETH_P_ALL taps see outgoing packets.
fn packet_socket() -> io::Result<OwnedFd> {
    let proto = libc::c_int::from((libc::ETH_P_ALL as u16).to_be());
    // SAFETY: plain syscall.
    let fd = cvt(unsafe {
        libc::socket(
            libc::AF_PACKET,
            libc::SOCK_DGRAM | libc::SOCK_NONBLOCK | libc::SOCK_CLOEXEC,
            proto,
        )
    })?;
    // SAFETY: fd is a new, owned descriptor.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

/// Reads what is queued on a packet socket (at most [`SNIFF_MAX_PACKETS`]) and passes each
/// TCP/IPv4 packet to `f` with whether it was outgoing.
fn drain_packets(fd: RawFd, mut f: impl FnMut(bool, SocketAddrV4, SocketAddrV4, u32, u8)) {
    let mut buf = [0u8; 2048];
    for _ in 0..SNIFF_MAX_PACKETS {
        // SAFETY: sockaddr_ll is plain data; zeroed is valid.
        let mut sll: libc::sockaddr_ll = unsafe { mem::zeroed() };
        let mut len = mem::size_of::<libc::sockaddr_ll>() as libc::socklen_t;
        // SAFETY: valid buffer and address storage.
        let n = unsafe {
            libc::recvfrom(
                fd,
                buf.as_mut_ptr().cast(),
                buf.len(),
                libc::MSG_DONTWAIT,
                std::ptr::from_mut(&mut sll).cast(),
                &mut len,
            )
        };
        if n < 0 {
            if io::Error::last_os_error().kind() == io::ErrorKind::Interrupted {
                continue;
            }
            return; // EAGAIN: nothing more
        }
        if sll.sll_protocol != (libc::ETH_P_IP as u16).to_be() {
            continue;
        }
        let outgoing = match sll.sll_pkttype {
            PACKET_OUTGOING => true,
            PACKET_HOST => false,
            _ => continue,
        };
        if let Some((src, dst, seq, flags)) = parse_tcp_v4(&buf[..n as usize]) {
            f(outgoing, src, dst, seq, flags);
        }
    }
}

/// Waits up to `timeout` for `fd` to be reset; Some(time waited) if it was.
fn wait_reset(fd: RawFd, timeout: Duration) -> io::Result<Option<Duration>> {
    let start = Instant::now();
    let deadline = start + timeout;
    let mut buf = [0u8; 256];
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() || poll_fd(fd, libc::POLLIN, left)? == 0 {
            return Ok(None);
        }
        // SAFETY: valid buffer.
        let n = unsafe { libc::recv(fd, buf.as_mut_ptr().cast(), buf.len(), libc::MSG_DONTWAIT) };
        if n > 0 {
            continue; // unexpected data: ignore it
        }
        if n == 0 {
            return Err(io::Error::new(
                io::ErrorKind::UnexpectedEof,
                "server socket: the pod closed the connection",
            ));
        }
        let e = io::Error::last_os_error();
        match e.raw_os_error() {
            Some(libc::ECONNRESET) => return Ok(Some(start.elapsed())),
            Some(libc::EAGAIN) | Some(libc::EINTR) => {}
            _ => return Err(e),
        }
    }
}

fn is_reset(e: &io::Error) -> bool {
    matches!(e.raw_os_error(), Some(libc::ECONNRESET) | Some(libc::EPIPE))
}

fn invalid_round(ctx: &InvalidCtx<'_>, r: &mut InvalidRound) -> Result<()> {
    let timeout = ctx.timeout;
    // Forget what the pod's packet socket saw before this round.
    drain_packets(ctx.sniffer.as_raw_fd(), |_, _, _, _, _| {});

    // Connect (pod -> VIP) and accept (server).
    let vip = ctx.vip;
    let client = in_netns(ctx.pod, move || -> io::Result<OwnedFd> {
        let fd = new_socket(&vip, libc::SOCK_STREAM, true)?;
        set_linger_zero(fd.as_raw_fd())?;
        match connect_fd(fd.as_raw_fd(), &vip) {
            Ok(()) => {}
            Err(e) if e.raw_os_error() == Some(libc::EINPROGRESS) => {}
            Err(e) => return Err(e),
        }
        Ok(fd)
    })?
    .with_context(|| format!("pod: connect to {vip}"))?;
    let c = client.as_raw_fd();
    ensure!(
        poll_fd(c, libc::POLLOUT, timeout)? != 0,
        "pod: connect to {vip} timed out after {timeout:?}"
    );
    match so_error(c)? {
        0 => {}
        e => bail!("pod: connect to {vip}: {}", io::Error::from_raw_os_error(e)),
    }
    r.pod = local_addr_fd(c);
    let l = ctx.listener.as_raw_fd();
    ensure!(
        poll_fd(l, libc::POLLIN, timeout)? != 0,
        "server: no connection to accept within {timeout:?}"
    );
    // SAFETY: zeroed storage; accept4 fills at most len bytes.
    let mut ss: libc::sockaddr_storage = unsafe { mem::zeroed() };
    let mut len = mem::size_of::<libc::sockaddr_storage>() as libc::socklen_t;
    // SAFETY: valid pointers.
    let fd = cvt(unsafe {
        libc::accept4(
            l,
            std::ptr::from_mut(&mut ss).cast(),
            &mut len,
            libc::SOCK_NONBLOCK | libc::SOCK_CLOEXEC,
        )
    })
    .context("server: accept")?;
    // SAFETY: fd is a new, owned descriptor. Declared after `client`, so dropped (closed)
    // before it.
    let accepted = unsafe { OwnedFd::from_raw_fd(fd) };
    let s = accepted.as_raw_fd();
    set_linger_zero(s)?;
    let peer = socketaddr_from(&ss);
    r.peer = peer;
    let Some(SocketAddr::V4(peer4)) = peer else {
        bail!("server: accepted a connection from {peer:?}, not IPv4");
    };

    // A little data both ways: ESTABLISHED and ASSURED on the node.
    send_all_nb(c, b"ping", timeout).context("pod: send")?;
    recv_exact_nb(s, 4, timeout).context("server: recv")?;
    send_all_nb(s, b"pong", timeout).context("server: send")?;
    recv_exact_nb(c, 4, timeout).context("pod: recv")?;

    // Forge the out-of-window segment backend -> pod.
    let (snd_nxt, rcv_nxt) = tcp_seqs(s).context("server: TCP_REPAIR sequence numbers")?;
    let seq = snd_nxt.wrapping_add(FORGED_SEQ_OFFSET);
    r.forged_seq = Some(seq);
    r.forged_ack = Some(rcv_nxt);
    let pkt = tcp_segment_v4(
        ctx.backend,
        peer4,
        seq,
        rcv_nxt,
        TCP_FLAG_ACK | TCP_FLAG_PSH,
        FORGED_PAYLOAD,
    );
    let (dst, dst_len) = sockaddr_of(&SocketAddr::V4(SocketAddrV4::new(*peer4.ip(), 0)));
    // SAFETY: valid buffer and sockaddr.
    let sent = unsafe {
        libc::sendto(
            ctx.raw.as_raw_fd(),
            pkt.as_ptr().cast(),
            pkt.len(),
            0,
            std::ptr::from_ref(&dst).cast(),
            dst_len,
        )
    };
    if sent < 0 {
        return Err(io::Error::last_os_error()).context("server: sending the forged segment");
    }

    // Outcome 1: is the server's connection reset?
    if let Some(after) = wait_reset(s, timeout).context("server: waiting for a reset")? {
        r.server_reset = true;
        r.reset_after_us = Some(micros(after));
    }

    // Outcome 2: does the pod's connection still work?
    let alive = (|| -> std::result::Result<(), String> {
        send_all_nb(c, b"!", timeout).map_err(|e| format!("send: {e}"))?;
        if !r.server_reset {
            match recv_exact_nb(s, 1, timeout) {
                Ok(_) => {
                    send_all_nb(s, b"!", timeout).map_err(|e| format!("server side: echo: {e}"))?
                }
                Err(e) => {
                    if is_reset(&e) {
                        r.server_reset = true; // later than `timeout`
                    }
                    return Err(format!("server side: recv: {e}"));
                }
            }
        }
        match recv_exact_nb(c, 1, timeout) {
            Ok(b) if b == b"!" => Ok(()),
            Ok(b) => Err(format!("unexpected echo {b:?}")),
            Err(e) => Err(format!("recv: {e}")),
        }
    })();
    match alive {
        Ok(()) => r.client_alive = true,
        Err(e) => r.client_error = Some(e),
    }

    // Outcome 3: what the pod saw and sent.
    let pod_port = r.pod.map_or(peer4.port(), |a| a.port());
    let backend = ctx.backend;
    drain_packets(
        ctx.sniffer.as_raw_fd(),
        |outgoing, src, dst, pseq, flags| {
            if !outgoing && dst == peer4 && pseq == seq && r.forged_arrived_from.is_none() {
                r.forged_arrived_from = Some(SocketAddr::V4(src));
            }
            if outgoing && flags & TCP_FLAG_RST != 0 && src.port() == pod_port && dst == backend {
                r.rst_from_pod = true;
            }
        },
    );

    // The server's socket first (an RST that the pod's socket takes while it is still
    // ESTABLISHED on the node), then the pod's.
    drop(accepted);
    drop(client);
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dns_query_bytes() {
        let q = dns_query(0x1234, "a.bc", QTYPE_AAAA).unwrap();
        assert_eq!(
            q,
            [
                0x12, 0x34, 0x01, 0x00, 0, 1, 0, 0, 0, 0, 0, 0, 1, b'a', 2, b'b', b'c', 0, 0, 28,
                0, 1
            ]
        );
        assert_eq!(dns_query(0x1234, "a.bc.", QTYPE_AAAA).unwrap(), q);
        assert!(dns_query(1, "", QTYPE_A).is_err());
        assert!(dns_query(1, "a..b", QTYPE_A).is_err());
        assert!(dns_query(1, &"x".repeat(64), QTYPE_A).is_err());
    }

    #[test]
    fn dns_reply_parsing() {
        let mut r = dns_query(7, "x.test", QTYPE_AAAA).unwrap();
        assert_eq!(parse_dns_reply(&r), None, "a query is not a reply");
        r[2] |= 0x80;
        r[3] |= 3; // NXDOMAIN
        r[7] = 2;
        assert_eq!(
            parse_dns_reply(&r),
            Some(DnsReply {
                id: 7,
                rcode: 3,
                ancount: 2,
                qtype: Some(QTYPE_AAAA)
            })
        );
        assert_eq!(parse_dns_reply(&r[..5]), None);
        assert_eq!(parse_dns_reply(&r[..14]).unwrap().qtype, None);
    }

    #[test]
    fn sockaddr_round_trip() {
        for a in ["10.1.2.3:53", "[fd00::1]:5353", "0.0.0.0:0"] {
            let a: SocketAddr = a.parse().unwrap();
            let (ss, _) = sockaddr_of(&a);
            assert_eq!(socketaddr_from(&ss), Some(a));
        }
    }

    #[test]
    fn latency_stats() {
        assert_eq!(LatencyStats::of(&mut []), None);
        assert_eq!(
            LatencyStats::of(&mut [5, 1, 9]),
            Some(LatencyStats {
                min_us: 1,
                median_us: 5,
                max_us: 9
            })
        );
    }

    #[test]
    fn bad_arguments() {
        let p = Path::new("/proc/self/ns/net");
        let s: SocketAddr = "127.0.0.1:9".parse().unwrap();
        assert!(udp_race(p, s, 0, Duration::from_secs(1)).is_err());
        assert!(udp_race(p, s, 1, Duration::ZERO).is_err());
        assert!(snat_race(&[], s, Proto::Udp, None, 1, Duration::from_secs(1)).is_err());
        assert!(snat_race(
            &[p.into()],
            s,
            Proto::Udp,
            Some(0),
            1,
            Duration::from_secs(1)
        )
        .is_err());
        assert!(in_netns(Path::new("/nonexistent/netns"), || ()).is_err());
    }

    #[test]
    fn source_ports_cover_every_port_once() {
        let v: Vec<u16> = source_ports(32768, 60999, 40000).collect();
        assert_eq!(v.len(), 65535 - 1023);
        assert_eq!(v[0], 40000);
        assert_eq!(v[60999 - 40000 + 1], 32768);
        let mut sorted = v.clone();
        sorted.sort_unstable();
        sorted.dedup();
        assert_eq!(sorted.len(), v.len());
        assert_eq!(source_ports(1024, 65535, 1024).count(), 64512);
    }
}

#[cfg(test)]
mod invalid_tests {
    use super::*;

    #[test]
    fn ip_checksum_of_a_known_header() {
        // RFC 1071-style example: 45 00 00 73 00 00 40 00 40 11 [b8 61] c0 a8 00 01 c0 a8 00 c7
        let h = [
            0x45, 0x00, 0x00, 0x73, 0x00, 0x00, 0x40, 0x00, 0x40, 0x11, 0x00, 0x00, 0xc0, 0xa8,
            0x00, 0x01, 0xc0, 0xa8, 0x00, 0xc7,
        ];
        assert_eq!(csum_fold(csum_add(0, &h)), 0xb861);
    }

    #[test]
    fn forged_segment_checksums_verify() {
        let src: SocketAddrV4 = "10.246.0.2:8080".parse().unwrap();
        let dst: SocketAddrV4 = "10.244.0.2:40000".parse().unwrap();
        for payload in [&b""[..], b"x", b"odd-length payload"] {
            let p = tcp_segment_v4(src, dst, 0xdead_beef, 7, TCP_FLAG_ACK, payload);
            assert_eq!(p.len(), 40 + payload.len());
            // A header with its checksum in place sums to 0xffff (folds to 0).
            assert_eq!(csum_fold(csum_add(0, &p[..20])), 0);
            let mut pseudo = [0u8; 12];
            pseudo[..4].copy_from_slice(&src.ip().octets());
            pseudo[4..8].copy_from_slice(&dst.ip().octets());
            pseudo[9] = 6;
            pseudo[10..].copy_from_slice(&((20 + payload.len()) as u16).to_be_bytes());
            assert_eq!(csum_fold(csum_add(csum_add(0, &pseudo), &p[20..])), 0);
            assert_eq!(
                parse_tcp_v4(&p),
                Some((src, dst, 0xdead_beef, TCP_FLAG_ACK))
            );
        }
        assert_eq!(parse_tcp_v4(&[0x45; 19]), None);
    }
}

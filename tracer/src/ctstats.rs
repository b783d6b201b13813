//! The kernel's own conntrack counters (what `conntrack -S` / `conntrack -C` show), per
//! network namespace, read over ctnetlink.
//!
//! [`read_current`] asks the namespace the calling thread is in; [`read_in`] asks another one
//! from a short-lived helper thread, so the caller's thread never changes namespace.
//!
//! Wire format (`include/uapi/linux/netfilter/nfnetlink_conntrack.h`): a dump request of
//! `IPCTNL_MSG_CT_GET_STATS_CPU` is answered with one message per possible CPU, each an
//! `nfgenmsg` (CPU number in `res_id`, big-endian) followed by flat (not nested) attributes
//! `CTA_STATS_*` holding big-endian u32 values; `IPCTNL_MSG_CT_GET_STATS` is answered with
//! one message carrying `CTA_STATS_GLOBAL_ENTRIES` (and, on newer kernels, `..._MAX_ENTRIES`).
//!
//! The counters exist as soon as the namespace does: in a namespace where conntrack never
//! engaged (no rule needs it) the kernel answers zeros for every CPU and a count of 0.
//!
//! Semantics worth knowing (measured on 6.18): `insert` counts only entries created over
//! ctnetlink (`conntrack -I`, `nf_conntrack_hash_check_insert`); entries confirmed on the
//! packet path raise `count` but not `insert`. A packet-path confirm that loses a race to an
//! entry with the same tuple counts `clash_resolve` when the clash is resolved and
//! `insert_failed` (plus `drop`) when the packet is dropped.
//!
//! The parsers ([`parse_stats_cpu`], [`parse_stats_global`]) are pure functions over the bytes
//! of one received datagram; malformed or truncated input is a typed error, never a panic.
//!
//! [`lookup_current`] / [`lookup_in`] fetch one conntrack entry by tuple
//! (`IPCTNL_MSG_CT_GET`, not a dump); [`parse_lookup`] parses the reply the same way.

use std::{
    fs::File,
    io,
    net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr},
    os::fd::{AsRawFd as _, FromRawFd as _, OwnedFd},
    path::{Path, PathBuf},
    time::Duration,
};

use crate::events::FiveTuple;

// --- netlink / nfnetlink constants -------------------------------------------------------

const NETLINK_NETFILTER: libc::c_int = 12;

const NLMSG_HDRLEN: usize = 16;
const NLA_HDRLEN: usize = 4;
/// `sizeof(struct nfgenmsg)` (already 4-aligned).
const NFGENMSG_LEN: usize = 4;

const NLMSG_NOOP: u16 = 1;
const NLMSG_ERROR: u16 = 2;
const NLMSG_DONE: u16 = 3;
const NLMSG_OVERRUN: u16 = 4;

const NLM_F_REQUEST: u16 = 0x1;
const NLM_F_DUMP: u16 = 0x300; // NLM_F_ROOT | NLM_F_MATCH

/// `NLA_F_NESTED | NLA_F_NET_BYTEORDER` are flag bits in `nla_type`.
const NLA_TYPE_MASK: u16 = 0x3fff;

const NFNL_SUBSYS_CTNETLINK: u16 = 1;
const NFNETLINK_V0: u8 = 0;

const IPCTNL_MSG_CT_GET_STATS_CPU: u16 = 4;
const IPCTNL_MSG_CT_GET_STATS: u16 = 5;

/// nlmsg_type of the per-CPU request and its replies.
const MSG_STATS_CPU: u16 = (NFNL_SUBSYS_CTNETLINK << 8) | IPCTNL_MSG_CT_GET_STATS_CPU;
/// nlmsg_type of the global request and its reply.
const MSG_STATS: u16 = (NFNL_SUBSYS_CTNETLINK << 8) | IPCTNL_MSG_CT_GET_STATS;

// enum ctattr_stats_cpu. 1 (SEARCHED), 3 (NEW), 5 (IGNORE), 6 (DELETE), 7 (DELETE_LIST) are
// no longer sent by the kernel.
const CTA_STATS_FOUND: u16 = 2;
const CTA_STATS_INVALID: u16 = 4;
const CTA_STATS_INSERT: u16 = 8;
const CTA_STATS_INSERT_FAILED: u16 = 9;
const CTA_STATS_DROP: u16 = 10;
const CTA_STATS_EARLY_DROP: u16 = 11;
const CTA_STATS_ERROR: u16 = 12;
const CTA_STATS_SEARCH_RESTART: u16 = 13;
const CTA_STATS_CLASH_RESOLVE: u16 = 14;
const CTA_STATS_CHAIN_TOOLONG: u16 = 15;

// enum ctattr_stats_global.
const CTA_STATS_GLOBAL_ENTRIES: u16 = 1;
const CTA_STATS_GLOBAL_MAX_ENTRIES: u16 = 2;

const REQ_CPU: &str = "IPCTNL_MSG_CT_GET_STATS_CPU";
const REQ_GLOBAL: &str = "IPCTNL_MSG_CT_GET_STATS";

/// How long one `recv` may wait for the kernel.
const RECV_TIMEOUT: Duration = Duration::from_secs(5);
/// Upper bound on per-CPU replies accepted from one dump (guards against a runaway loop).
const MAX_CPUS: usize = 1 << 16;

// --- types -------------------------------------------------------------------------------

/// Errors of [`read_current`], [`read_in`] and the parsers.
#[derive(Debug, thiserror::Error)]
pub enum CtStatsError {
    #[error("{op} on a NETLINK_NETFILTER socket: {source}")]
    Socket { op: &'static str, source: io::Error },
    #[error("no reply from the kernel to {request} within {timeout:?}")]
    Timeout {
        request: &'static str,
        timeout: Duration,
    },
    #[error("kernel rejected {request}: {} (errno {errno})", io::Error::from_raw_os_error(*errno))]
    Kernel { request: &'static str, errno: i32 },
    #[error("truncated netlink reply: {what} at offset {offset} needs {need} bytes, {have} left")]
    Truncated {
        what: &'static str,
        offset: usize,
        need: usize,
        have: usize,
    },
    #[error("malformed netlink reply: {0}")]
    Malformed(String),
    /// A tuple that can not be looked up ([`lookup_current`]).
    #[error("can not look up the tuple {0}")]
    BadTuple(String),
    #[error("unexpected netlink message type {ty:#06x} in the reply to {request}")]
    UnexpectedType { request: &'static str, ty: u16 },
    #[error("kernel reply to {request} lacks {attr}")]
    MissingAttr {
        request: &'static str,
        attr: &'static str,
    },
    #[error("can not open network namespace {}: {source}", path.display())]
    OpenNetns { path: PathBuf, source: io::Error },
    #[error("setns({}, CLONE_NEWNET): {source}", path.display())]
    Setns { path: PathBuf, source: io::Error },
    #[error("helper thread for network namespace {}: {what}", path.display())]
    Thread { path: PathBuf, what: String },
    /// Any other error while reading the stats of the namespace at `path`.
    #[error("network namespace {}: {inner}", path.display())]
    InNetns {
        path: PathBuf,
        inner: Box<CtStatsError>,
    },
}

/// One CPU's counters (`struct ip_conntrack_stat`), as `conntrack -S` shows them.
/// Attributes the kernel did not send stay 0.
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct CpuStats {
    /// CPU number; `u16::MAX` in [`CtStats::totals`].
    pub cpu: u16,
    pub found: u32,
    pub invalid: u32,
    pub insert: u32,
    pub insert_failed: u32,
    pub drop: u32,
    pub early_drop: u32,
    pub error: u32,
    pub search_restart: u32,
    pub clash_resolve: u32,
    pub chaintoolong: u32,
}

impl CpuStats {
    /// `self - before`, field by field, saturating at 0 (e.g. after a counter wrapped).
    /// `cpu` is taken from `self`.
    pub fn delta(&self, before: &CpuStats) -> CpuStats {
        self.zip(before, |a, b| a.saturating_sub(b))
    }

    /// The counters with the names `conntrack -S` prints, in its order.
    pub fn fields(&self) -> [(&'static str, u32); 10] {
        [
            ("found", self.found),
            ("invalid", self.invalid),
            ("insert", self.insert),
            ("insert_failed", self.insert_failed),
            ("drop", self.drop),
            ("early_drop", self.early_drop),
            ("error", self.error),
            ("search_restart", self.search_restart),
            ("clash_resolve", self.clash_resolve),
            ("chaintoolong", self.chaintoolong),
        ]
    }

    fn zip(&self, other: &CpuStats, f: impl Fn(u32, u32) -> u32) -> CpuStats {
        CpuStats {
            cpu: self.cpu,
            found: f(self.found, other.found),
            invalid: f(self.invalid, other.invalid),
            insert: f(self.insert, other.insert),
            insert_failed: f(self.insert_failed, other.insert_failed),
            drop: f(self.drop, other.drop),
            early_drop: f(self.early_drop, other.early_drop),
            error: f(self.error, other.error),
            search_restart: f(self.search_restart, other.search_restart),
            clash_resolve: f(self.clash_resolve, other.clash_resolve),
            chaintoolong: f(self.chaintoolong, other.chaintoolong),
        }
    }

    /// Stores a `CTA_STATS_*` value; unknown attribute types are ignored.
    fn set(&mut self, attr: u16, value: u32) {
        let slot = match attr {
            CTA_STATS_FOUND => &mut self.found,
            CTA_STATS_INVALID => &mut self.invalid,
            CTA_STATS_INSERT => &mut self.insert,
            CTA_STATS_INSERT_FAILED => &mut self.insert_failed,
            CTA_STATS_DROP => &mut self.drop,
            CTA_STATS_EARLY_DROP => &mut self.early_drop,
            CTA_STATS_ERROR => &mut self.error,
            CTA_STATS_SEARCH_RESTART => &mut self.search_restart,
            CTA_STATS_CLASH_RESOLVE => &mut self.clash_resolve,
            CTA_STATS_CHAIN_TOOLONG => &mut self.chaintoolong,
            _ => return,
        };
        *slot = value;
    }
}

/// The conntrack counters of one network namespace.
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize)]
pub struct CtStats {
    /// One entry per possible CPU, sorted by CPU number.
    pub per_cpu: Vec<CpuStats>,
    /// Entries in this namespace's table (`CTA_STATS_GLOBAL_ENTRIES`, `conntrack -C`).
    pub count: u32,
    /// Table limit (`CTA_STATS_GLOBAL_MAX_ENTRIES`), if the kernel sent it.
    pub max: Option<u32>,
}

impl CtStats {
    /// Sum over all CPUs (saturating), with `cpu = u16::MAX`.
    pub fn totals(&self) -> CpuStats {
        let zero = CpuStats {
            cpu: u16::MAX,
            ..CpuStats::default()
        };
        self.per_cpu
            .iter()
            .fold(zero, |acc, c| acc.zip(c, u32::saturating_add))
    }
}

/// What one datagram of the per-CPU dump contained.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct CpuBatch {
    /// The CPUs' counters, in message order.
    pub cpus: Vec<CpuStats>,
    /// `NLMSG_DONE` was seen: the dump is complete.
    pub done: bool,
}

/// The reply to `IPCTNL_MSG_CT_GET_STATS`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct GlobalStats {
    pub count: u32,
    pub max: Option<u32>,
}

// --- pure parsing --------------------------------------------------------------------------

fn truncated(what: &'static str, offset: usize, need: usize, have: usize) -> CtStatsError {
    CtStatsError::Truncated {
        what,
        offset,
        need,
        have,
    }
}

fn align4(n: usize) -> usize {
    n.saturating_add(3) & !3
}

fn ne_u16(b: &[u8], at: usize) -> u16 {
    u16::from_ne_bytes([b[at], b[at + 1]])
}

fn ne_u32(b: &[u8], at: usize) -> u32 {
    u32::from_ne_bytes([b[at], b[at + 1], b[at + 2], b[at + 3]])
}

/// One netlink message of a datagram.
struct RawMsg<'a> {
    ty: u16,
    /// Bytes after the `nlmsghdr`, up to `nlmsg_len`.
    payload: &'a [u8],
    /// Offset of the payload in the datagram (for error messages).
    offset: usize,
}

/// Splits a datagram into its netlink messages.
fn messages(buf: &[u8]) -> Result<Vec<RawMsg<'_>>, CtStatsError> {
    let mut out = Vec::new();
    let mut off = 0;
    while off < buf.len() {
        let rest = &buf[off..];
        if rest.len() < NLMSG_HDRLEN {
            return Err(truncated("nlmsghdr", off, NLMSG_HDRLEN, rest.len()));
        }
        let len = ne_u32(rest, 0) as usize;
        let ty = ne_u16(rest, 4);
        if len < NLMSG_HDRLEN {
            return Err(CtStatsError::Malformed(format!(
                "nlmsg_len {len} at offset {off} is shorter than the header"
            )));
        }
        if len > rest.len() {
            return Err(truncated("netlink message", off, len, rest.len()));
        }
        out.push(RawMsg {
            ty,
            payload: &rest[NLMSG_HDRLEN..len],
            offset: off + NLMSG_HDRLEN,
        });
        // The padding after the last message may be missing.
        off = off.saturating_add(align4(len));
    }
    Ok(out)
}

/// The kinds of message a reply can hold.
enum Reply<'a> {
    Done,
    /// `NLMSG_ERROR` with error 0.
    Ack,
    Noop,
    /// An nfnetlink message: `res_id` (host order) and its attribute bytes.
    Data {
        ty: u16,
        res_id: u16,
        attrs: &'a [u8],
        attrs_offset: usize,
    },
}

fn classify<'a>(msg: &RawMsg<'a>, request: &'static str) -> Result<Reply<'a>, CtStatsError> {
    let p = msg.payload;
    match msg.ty {
        NLMSG_NOOP => Ok(Reply::Noop),
        NLMSG_ERROR => {
            if p.len() < 4 {
                return Err(truncated("nlmsgerr", msg.offset, 4, p.len()));
            }
            let err = ne_u32(p, 0) as i32;
            if err == 0 {
                Ok(Reply::Ack)
            } else {
                Err(CtStatsError::Kernel {
                    request,
                    errno: err.checked_neg().unwrap_or(i32::MAX),
                })
            }
        }
        NLMSG_DONE => {
            // Dumps put their final status (0 or -errno) after the header.
            if p.len() >= 4 {
                let status = ne_u32(p, 0) as i32;
                if status < 0 {
                    return Err(CtStatsError::Kernel {
                        request,
                        errno: status.checked_neg().unwrap_or(i32::MAX),
                    });
                }
            }
            Ok(Reply::Done)
        }
        NLMSG_OVERRUN => Err(CtStatsError::Malformed(format!(
            "NLMSG_OVERRUN in the reply to {request}"
        ))),
        ty => {
            if p.len() < NFGENMSG_LEN {
                return Err(truncated("nfgenmsg", msg.offset, NFGENMSG_LEN, p.len()));
            }
            Ok(Reply::Data {
                ty,
                res_id: u16::from_be_bytes([p[2], p[3]]),
                attrs: &p[NFGENMSG_LEN..],
                attrs_offset: msg.offset + NFGENMSG_LEN,
            })
        }
    }
}

/// Walks flat netlink attributes, calling `f(type, value)` for each; every attribute with a
/// type in `known` must hold exactly one big-endian u32, others are skipped.
fn for_each_be32_attr(
    attrs: &[u8],
    base: usize,
    known: impl Fn(u16) -> bool,
    mut f: impl FnMut(u16, u32),
) -> Result<(), CtStatsError> {
    let mut off = 0;
    while off < attrs.len() {
        let rest = &attrs[off..];
        if rest.len() < NLA_HDRLEN {
            return Err(truncated("nlattr", base + off, NLA_HDRLEN, rest.len()));
        }
        let len = usize::from(ne_u16(rest, 0));
        let ty = ne_u16(rest, 2) & NLA_TYPE_MASK;
        if len < NLA_HDRLEN {
            return Err(CtStatsError::Malformed(format!(
                "nla_len {len} at offset {} is shorter than the header",
                base + off
            )));
        }
        if len > rest.len() {
            return Err(truncated("netlink attribute", base + off, len, rest.len()));
        }
        if known(ty) {
            let value = &rest[NLA_HDRLEN..len];
            let Ok(bytes) = <[u8; 4]>::try_from(value) else {
                return Err(CtStatsError::Malformed(format!(
                    "attribute {ty} at offset {} has {} value bytes, expected 4",
                    base + off,
                    value.len()
                )));
            };
            f(ty, u32::from_be_bytes(bytes));
        }
        off = off.saturating_add(align4(len));
    }
    Ok(())
}

/// Parses one datagram of the reply to the `IPCTNL_MSG_CT_GET_STATS_CPU` dump: the per-CPU
/// messages it holds and whether it ended the dump (`NLMSG_DONE`). Messages after
/// `NLMSG_DONE` are ignored; an `NLMSG_ERROR` with an errno is [`CtStatsError::Kernel`].
pub fn parse_stats_cpu(buf: &[u8]) -> Result<CpuBatch, CtStatsError> {
    let mut batch = CpuBatch::default();
    for msg in messages(buf)? {
        match classify(&msg, REQ_CPU)? {
            Reply::Done => {
                batch.done = true;
                break;
            }
            Reply::Ack | Reply::Noop => {}
            Reply::Data {
                ty,
                res_id,
                attrs,
                attrs_offset,
            } => {
                if ty != MSG_STATS_CPU {
                    return Err(CtStatsError::UnexpectedType {
                        request: REQ_CPU,
                        ty,
                    });
                }
                let mut cpu = CpuStats {
                    cpu: res_id,
                    ..CpuStats::default()
                };
                for_each_be32_attr(
                    attrs,
                    attrs_offset,
                    |t| (CTA_STATS_FOUND..=CTA_STATS_CHAIN_TOOLONG).contains(&t),
                    |t, v| cpu.set(t, v),
                )?;
                batch.cpus.push(cpu);
            }
        }
    }
    Ok(batch)
}

/// Parses one datagram of the reply to `IPCTNL_MSG_CT_GET_STATS`: `Some` once the stats
/// message is in it, `None` if it held only no-ops/acks.
pub fn parse_stats_global(buf: &[u8]) -> Result<Option<GlobalStats>, CtStatsError> {
    for msg in messages(buf)? {
        match classify(&msg, REQ_GLOBAL)? {
            Reply::Done => {
                return Err(CtStatsError::MissingAttr {
                    request: REQ_GLOBAL,
                    attr: "a stats message before NLMSG_DONE",
                })
            }
            Reply::Ack | Reply::Noop => {}
            Reply::Data {
                ty,
                attrs,
                attrs_offset,
                ..
            } => {
                if ty != MSG_STATS {
                    return Err(CtStatsError::UnexpectedType {
                        request: REQ_GLOBAL,
                        ty,
                    });
                }
                let (mut count, mut max) = (None, None);
                for_each_be32_attr(
                    attrs,
                    attrs_offset,
                    |t| t == CTA_STATS_GLOBAL_ENTRIES || t == CTA_STATS_GLOBAL_MAX_ENTRIES,
                    |t, v| match t {
                        CTA_STATS_GLOBAL_ENTRIES => count = Some(v),
                        _ => max = Some(v),
                    },
                )?;
                let Some(count) = count else {
                    return Err(CtStatsError::MissingAttr {
                        request: REQ_GLOBAL,
                        attr: "CTA_STATS_GLOBAL_ENTRIES",
                    });
                };
                return Ok(Some(GlobalStats { count, max }));
            }
        }
    }
    Ok(None)
}

/// The request: `nlmsghdr` + `nfgenmsg { AF_UNSPEC, NFNETLINK_V0, res_id 0 }`.
fn request(ty: u16, flags: u16, seq: u32) -> [u8; NLMSG_HDRLEN + NFGENMSG_LEN] {
    let mut b = [0u8; NLMSG_HDRLEN + NFGENMSG_LEN];
    b[0..4].copy_from_slice(&((NLMSG_HDRLEN + NFGENMSG_LEN) as u32).to_ne_bytes());
    b[4..6].copy_from_slice(&ty.to_ne_bytes());
    b[6..8].copy_from_slice(&flags.to_ne_bytes());
    b[8..12].copy_from_slice(&seq.to_ne_bytes());
    // nlmsg_pid 0: addressed to the kernel.
    b[16] = libc::AF_UNSPEC as u8;
    b[17] = NFNETLINK_V0;
    // res_id 0 (big-endian)
    b
}

// --- the socket --------------------------------------------------------------------------

fn sock_err(op: &'static str) -> CtStatsError {
    CtStatsError::Socket {
        op,
        source: io::Error::last_os_error(),
    }
}

struct NlSocket {
    fd: OwnedFd,
}

impl NlSocket {
    /// A NETLINK_NETFILTER socket in the calling thread's network namespace.
    fn open() -> Result<NlSocket, CtStatsError> {
        // SAFETY: plain syscall; the returned fd is owned below.
        let fd = unsafe {
            libc::socket(
                libc::AF_NETLINK,
                libc::SOCK_RAW | libc::SOCK_CLOEXEC,
                NETLINK_NETFILTER,
            )
        };
        if fd < 0 {
            return Err(sock_err("socket"));
        }
        // SAFETY: fd is a fresh descriptor nobody else owns.
        let sock = NlSocket {
            fd: unsafe { OwnedFd::from_raw_fd(fd) },
        };
        let tv = libc::timeval {
            tv_sec: RECV_TIMEOUT.as_secs() as libc::time_t,
            tv_usec: RECV_TIMEOUT.subsec_micros() as libc::suseconds_t,
        };
        // SAFETY: tv outlives the call; the length matches.
        let r = unsafe {
            libc::setsockopt(
                sock.fd.as_raw_fd(),
                libc::SOL_SOCKET,
                libc::SO_RCVTIMEO,
                (&raw const tv).cast(),
                size_of::<libc::timeval>() as libc::socklen_t,
            )
        };
        if r < 0 {
            return Err(sock_err("setsockopt(SO_RCVTIMEO)"));
        }
        // SAFETY: all-zero is a valid sockaddr_nl (pid 0: the kernel assigns one).
        let mut addr: libc::sockaddr_nl = unsafe { std::mem::zeroed() };
        addr.nl_family = libc::AF_NETLINK as libc::sa_family_t;
        // SAFETY: addr outlives the call; the length matches.
        let r = unsafe {
            libc::bind(
                sock.fd.as_raw_fd(),
                (&raw const addr).cast(),
                size_of::<libc::sockaddr_nl>() as libc::socklen_t,
            )
        };
        if r < 0 {
            return Err(sock_err("bind"));
        }
        Ok(sock)
    }

    fn send(&self, msg: &[u8]) -> Result<(), CtStatsError> {
        // SAFETY: all-zero is a valid sockaddr_nl; pid 0 is the kernel.
        let mut to: libc::sockaddr_nl = unsafe { std::mem::zeroed() };
        to.nl_family = libc::AF_NETLINK as libc::sa_family_t;
        loop {
            // SAFETY: msg and to outlive the call; lengths match.
            let n = unsafe {
                libc::sendto(
                    self.fd.as_raw_fd(),
                    msg.as_ptr().cast(),
                    msg.len(),
                    0,
                    (&raw const to).cast(),
                    size_of::<libc::sockaddr_nl>() as libc::socklen_t,
                )
            };
            if n >= 0 {
                if n as usize != msg.len() {
                    return Err(CtStatsError::Socket {
                        op: "sendto",
                        source: io::Error::other(format!("sent {n} of {} bytes", msg.len())),
                    });
                }
                return Ok(());
            }
            let e = io::Error::last_os_error();
            if e.kind() != io::ErrorKind::Interrupted {
                return Err(CtStatsError::Socket {
                    op: "sendto",
                    source: e,
                });
            }
        }
    }

    /// Receives one whole datagram into `buf` (grown if the datagram is larger).
    fn recv<'b>(
        &self,
        buf: &'b mut Vec<u8>,
        request: &'static str,
    ) -> Result<&'b [u8], CtStatsError> {
        loop {
            // Peek with MSG_TRUNC: returns the datagram's real size, so a large one is
            // never cut.
            // SAFETY: buf is valid for buf.len() bytes.
            let n = unsafe {
                libc::recv(
                    self.fd.as_raw_fd(),
                    buf.as_mut_ptr().cast(),
                    buf.len(),
                    libc::MSG_PEEK | libc::MSG_TRUNC,
                )
            };
            if n < 0 {
                let e = io::Error::last_os_error();
                match e.kind() {
                    io::ErrorKind::Interrupted => continue,
                    io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut => {
                        return Err(CtStatsError::Timeout {
                            request,
                            timeout: RECV_TIMEOUT,
                        })
                    }
                    _ => {
                        return Err(CtStatsError::Socket {
                            op: "recv",
                            source: e,
                        })
                    }
                }
            }
            let size = n as usize;
            if size > buf.len() {
                buf.resize(size, 0);
            }
            // SAFETY: as above.
            let n = unsafe {
                libc::recv(
                    self.fd.as_raw_fd(),
                    buf.as_mut_ptr().cast(),
                    buf.len(),
                    libc::MSG_TRUNC,
                )
            };
            if n < 0 {
                let e = io::Error::last_os_error();
                if e.kind() == io::ErrorKind::Interrupted {
                    continue;
                }
                return Err(CtStatsError::Socket {
                    op: "recv",
                    source: e,
                });
            }
            let n = n as usize;
            if n > buf.len() {
                return Err(truncated("datagram", 0, n, buf.len()));
            }
            return Ok(&buf[..n]);
        }
    }
}

// --- public entry points -----------------------------------------------------------------

/// The conntrack counters of the network namespace the calling thread is in.
pub fn read_current() -> Result<CtStats, CtStatsError> {
    let sock = NlSocket::open()?;
    let mut buf = vec![0u8; 64 * 1024];

    sock.send(&request(MSG_STATS_CPU, NLM_F_REQUEST | NLM_F_DUMP, 1))?;
    let mut per_cpu = Vec::new();
    loop {
        let batch = parse_stats_cpu(sock.recv(&mut buf, REQ_CPU)?)?;
        per_cpu.extend(batch.cpus);
        if per_cpu.len() > MAX_CPUS {
            return Err(CtStatsError::Malformed(format!(
                "more than {MAX_CPUS} per-CPU messages in the reply to {REQ_CPU}"
            )));
        }
        if batch.done {
            break;
        }
    }
    per_cpu.sort_by_key(|c| c.cpu);

    sock.send(&request(MSG_STATS, NLM_F_REQUEST, 2))?;
    let global = loop {
        if let Some(g) = parse_stats_global(sock.recv(&mut buf, REQ_GLOBAL)?)? {
            break g;
        }
    };
    Ok(CtStats {
        per_cpu,
        count: global.count,
        max: global.max,
    })
}

/// The conntrack counters of the network namespace at `netns` (`/run/netns/NAME`,
/// `/proc/PID/ns/net`, ...). Runs [`read_current`] on a short-lived helper thread that
/// joins that namespace; the calling thread stays where it is. Every error names the path.
pub fn read_in(netns: &Path) -> Result<CtStats, CtStatsError> {
    run_in_netns(netns, read_current)
}

/// Runs `f` on a short-lived helper thread that joined the network namespace at `netns`;
/// the calling thread stays where it is. Errors of `f` are wrapped in
/// [`CtStatsError::InNetns`], so every error names the path.
fn run_in_netns<T: Send>(
    netns: &Path,
    f: impl FnOnce() -> Result<T, CtStatsError> + Send,
) -> Result<T, CtStatsError> {
    let path = netns.to_path_buf();
    let file = File::open(netns).map_err(|source| CtStatsError::OpenNetns {
        path: path.clone(),
        source,
    })?;
    std::thread::scope(|scope| {
        let handle = std::thread::Builder::new()
            .name("ctstats-netns".into())
            .spawn_scoped(scope, || -> Result<T, CtStatsError> {
                // SAFETY: plain syscall on an fd we own; it only changes this (helper) thread.
                if unsafe { libc::setns(file.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
                    return Err(CtStatsError::Setns {
                        path: path.clone(),
                        source: io::Error::last_os_error(),
                    });
                }
                f().map_err(|e| CtStatsError::InNetns {
                    path: path.clone(),
                    inner: Box::new(e),
                })
            })
            .map_err(|e| CtStatsError::Thread {
                path: path.clone(),
                what: format!("spawn failed: {e}"),
            })?;
        match handle.join() {
            Ok(r) => r,
            Err(_) => Err(CtStatsError::Thread {
                path: path.clone(),
                what: "panicked".into(),
            }),
        }
    })
}

// --- looking up one entry by tuple -------------------------------------------------------
//
// `IPCTNL_MSG_CT_GET` without `NLM_F_DUMP` asks for the one entry with a given tuple
// (`ctnetlink_get_conntrack`): the request carries the tuple as a nested `CTA_TUPLE_ORIG`
// or `CTA_TUPLE_REPLY` attribute and the nfgenmsg family says how to read its addresses.
// The kernel answers with one `IPCTNL_MSG_CT_NEW` message holding the whole entry
// (`ctnetlink_fill_info`) and then, as asked by `NLM_F_ACK`, an `NLMSG_ERROR` with error 0;
// or only with `NLMSG_ERROR` `-ENOENT` when no entry has the tuple.
//
// The kernel looks the tuple up in the conntrack hash, which holds both directions of every
// entry: whichever attribute carries it, a tuple matches an entry whose original *or* reply
// direction equals it. Lookups are in zone 0 (the default zone).

const NLM_F_ACK: u16 = 0x4;
/// `NLA_F_NESTED`, set on attributes that hold attributes.
const NLA_F_NESTED: u16 = 0x8000;

const IPCTNL_MSG_CT_NEW: u16 = 0;
const IPCTNL_MSG_CT_GET: u16 = 1;
/// nlmsg_type of the lookup request.
const MSG_CT_GET: u16 = (NFNL_SUBSYS_CTNETLINK << 8) | IPCTNL_MSG_CT_GET;
/// nlmsg_type of the entry in the reply.
const MSG_CT_NEW: u16 = (NFNL_SUBSYS_CTNETLINK << 8) | IPCTNL_MSG_CT_NEW;

// enum ctattr_type.
const CTA_TUPLE_ORIG: u16 = 1;
const CTA_TUPLE_REPLY: u16 = 2;
const CTA_STATUS: u16 = 3;
const CTA_TIMEOUT: u16 = 7;
const CTA_MARK: u16 = 8;
const CTA_ID: u16 = 12;
const CTA_ZONE: u16 = 18;

// enum ctattr_tuple.
const CTA_TUPLE_IP: u16 = 1;
const CTA_TUPLE_PROTO: u16 = 2;

// enum ctattr_ip.
const CTA_IP_V4_SRC: u16 = 1;
const CTA_IP_V4_DST: u16 = 2;
const CTA_IP_V6_SRC: u16 = 3;
const CTA_IP_V6_DST: u16 = 4;

// enum ctattr_l4proto.
const CTA_PROTO_NUM: u16 = 1;
const CTA_PROTO_SRC_PORT: u16 = 2;
const CTA_PROTO_DST_PORT: u16 = 3;
const CTA_PROTO_ICMP_ID: u16 = 4;
const CTA_PROTO_ICMP_TYPE: u16 = 5;
const CTA_PROTO_ICMP_CODE: u16 = 6;
const CTA_PROTO_ICMPV6_ID: u16 = 7;
const CTA_PROTO_ICMPV6_TYPE: u16 = 8;
const CTA_PROTO_ICMPV6_CODE: u16 = 9;

const IPPROTO_ICMP: u8 = 1;
const IPPROTO_ICMPV6: u8 = 58;

const REQ_LOOKUP: &str = "IPCTNL_MSG_CT_GET";

/// Which direction of an entry a looked-up tuple is given as (`CTA_TUPLE_ORIG` or
/// `CTA_TUPLE_REPLY`). The kernel matches the tuple against both directions either way.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum TupleDir {
    Orig,
    Reply,
}

/// One conntrack entry as ctnetlink reports it.
///
/// For ICMP and ICMPv6 tuples the ports hold what `struct nf_conntrack_tuple` holds in their
/// place (and what the eBPF side reads there): `src.port()` is the echo id, `dst.port()` is
/// `type << 8 | code`. Protocols without ports have port 0.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct CtEntry {
    pub orig: FiveTuple,
    pub reply: FiveTuple,
    /// `IPS_*` bits (`CTA_STATUS`).
    pub status: u32,
    /// `CTA_ID`: the id `conntrack -o id` prints.
    pub id: Option<u32>,
    /// Seconds left (`CTA_TIMEOUT`).
    pub timeout: Option<u32>,
    pub mark: Option<u32>,
    /// `CTA_ZONE`; the kernel sends it only for a zone other than 0.
    pub zone: Option<u16>,
}

/// How the kernel ended its answer to a lookup.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LookupEnd {
    /// `NLMSG_ERROR` with error 0: the entry (if any) came before it.
    Acked,
    /// `NLMSG_ERROR` with `ENOENT`: no entry has the tuple.
    NotFound,
}

/// What one datagram of the reply to a lookup contained.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct LookupBatch {
    /// The entry (`IPCTNL_MSG_CT_NEW`), if this datagram held it.
    pub entry: Option<CtEntry>,
    /// Set once the final message was seen; later messages are ignored.
    pub end: Option<LookupEnd>,
}

/// Builds netlink attributes.
#[derive(Default)]
struct NlaBuf(Vec<u8>);

impl NlaBuf {
    fn put(&mut self, ty: u16, value: &[u8]) {
        let start = self.0.len();
        self.0.extend_from_slice(&[0; NLA_HDRLEN]);
        self.0.extend_from_slice(value);
        self.finish(start, ty);
    }

    fn nest(&mut self, ty: u16, fill: impl FnOnce(&mut NlaBuf)) {
        let start = self.0.len();
        self.0.extend_from_slice(&[0; NLA_HDRLEN]);
        fill(self);
        self.finish(start, ty | NLA_F_NESTED);
    }

    /// Writes the header of the attribute starting at `start` and pads it to 4 bytes.
    /// Attributes built here are a few dozen bytes: nla_len always fits.
    fn finish(&mut self, start: usize, ty: u16) {
        let len = (self.0.len() - start) as u16;
        self.0[start..start + 2].copy_from_slice(&len.to_ne_bytes());
        self.0[start + 2..start + 4].copy_from_slice(&ty.to_ne_bytes());
        self.0.resize(align4(self.0.len()), 0);
    }

    /// `CTA_TUPLE_IP` and `CTA_TUPLE_PROTO` of `t` (the content of `CTA_TUPLE_ORIG/REPLY`).
    fn tuple(&mut self, t: &FiveTuple) {
        self.nest(CTA_TUPLE_IP, |b| match (t.src.ip(), t.dst.ip()) {
            (IpAddr::V6(s), IpAddr::V6(d)) => {
                b.put(CTA_IP_V6_SRC, &s.octets());
                b.put(CTA_IP_V6_DST, &d.octets());
            }
            (s, d) => {
                b.put(CTA_IP_V4_SRC, &ipv4_octets(s));
                b.put(CTA_IP_V4_DST, &ipv4_octets(d));
            }
        });
        self.nest(CTA_TUPLE_PROTO, |b| {
            b.put(CTA_PROTO_NUM, &[t.proto]);
            let [ty, code] = t.dst.port().to_be_bytes();
            let icmp = match t.proto {
                IPPROTO_ICMP => Some((CTA_PROTO_ICMP_ID, CTA_PROTO_ICMP_TYPE, CTA_PROTO_ICMP_CODE)),
                IPPROTO_ICMPV6 => Some((
                    CTA_PROTO_ICMPV6_ID,
                    CTA_PROTO_ICMPV6_TYPE,
                    CTA_PROTO_ICMPV6_CODE,
                )),
                _ => None,
            };
            if let Some((id_attr, type_attr, code_attr)) = icmp {
                b.put(id_attr, &t.src.port().to_be_bytes());
                b.put(type_attr, &[ty]);
                b.put(code_attr, &[code]);
            } else {
                b.put(CTA_PROTO_SRC_PORT, &t.src.port().to_be_bytes());
                b.put(CTA_PROTO_DST_PORT, &t.dst.port().to_be_bytes());
            }
        });
    }
}

fn ipv4_octets(a: IpAddr) -> [u8; 4] {
    match a {
        IpAddr::V4(a) => a.octets(),
        IpAddr::V6(_) => [0; 4],
    }
}

/// The lookup request for `tuple` given as direction `dir`: `nlmsghdr` + `nfgenmsg` (family
/// of the tuple) + the nested tuple. Both addresses must be of the same family.
fn lookup_request(dir: TupleDir, tuple: &FiveTuple, seq: u32) -> Result<Vec<u8>, CtStatsError> {
    let family = match (tuple.src, tuple.dst) {
        (SocketAddr::V4(_), SocketAddr::V4(_)) => libc::AF_INET,
        (SocketAddr::V6(_), SocketAddr::V6(_)) => libc::AF_INET6,
        _ => {
            return Err(CtStatsError::BadTuple(format!(
                "{} -> {}: source and destination are of different address families",
                tuple.src, tuple.dst
            )))
        }
    };
    let mut b = NlaBuf(vec![0; NLMSG_HDRLEN]);
    b.0.extend_from_slice(&[family as u8, NFNETLINK_V0, 0, 0]);
    let which = match dir {
        TupleDir::Orig => CTA_TUPLE_ORIG,
        TupleDir::Reply => CTA_TUPLE_REPLY,
    };
    b.nest(which, |b| b.tuple(tuple));
    let mut msg = b.0;
    let len = msg.len() as u32;
    msg[0..4].copy_from_slice(&len.to_ne_bytes());
    msg[4..6].copy_from_slice(&MSG_CT_GET.to_ne_bytes());
    msg[6..8].copy_from_slice(&(NLM_F_REQUEST | NLM_F_ACK).to_ne_bytes());
    msg[8..12].copy_from_slice(&seq.to_ne_bytes());
    // nlmsg_pid 0: addressed to the kernel.
    Ok(msg)
}

/// Walks netlink attributes, calling `f(type without flag bits, value, value offset)` for
/// each. `base` is the offset of `attrs` in the datagram (for error messages).
fn for_each_attr<'a>(
    attrs: &'a [u8],
    base: usize,
    mut f: impl FnMut(u16, &'a [u8], usize) -> Result<(), CtStatsError>,
) -> Result<(), CtStatsError> {
    let mut off = 0;
    while off < attrs.len() {
        let rest = &attrs[off..];
        if rest.len() < NLA_HDRLEN {
            return Err(truncated("nlattr", base + off, NLA_HDRLEN, rest.len()));
        }
        let len = usize::from(ne_u16(rest, 0));
        let ty = ne_u16(rest, 2) & NLA_TYPE_MASK;
        if len < NLA_HDRLEN {
            return Err(CtStatsError::Malformed(format!(
                "nla_len {len} at offset {} is shorter than the header",
                base + off
            )));
        }
        if len > rest.len() {
            return Err(truncated("netlink attribute", base + off, len, rest.len()));
        }
        f(ty, &rest[NLA_HDRLEN..len], base + off + NLA_HDRLEN)?;
        off = off.saturating_add(align4(len));
    }
    Ok(())
}

/// The value of attribute `what` as exactly `N` bytes.
fn fixed<const N: usize>(
    what: &'static str,
    value: &[u8],
    offset: usize,
) -> Result<[u8; N], CtStatsError> {
    <[u8; N]>::try_from(value).map_err(|_| {
        CtStatsError::Malformed(format!(
            "{what} at offset {offset} has {} value bytes, expected {N}",
            value.len()
        ))
    })
}

fn be32_attr(what: &'static str, value: &[u8], offset: usize) -> Result<u32, CtStatsError> {
    fixed::<4>(what, value, offset).map(u32::from_be_bytes)
}

fn be16_attr(what: &'static str, value: &[u8], offset: usize) -> Result<u16, CtStatsError> {
    fixed::<2>(what, value, offset).map(u16::from_be_bytes)
}

fn u8_attr(what: &'static str, value: &[u8], offset: usize) -> Result<u8, CtStatsError> {
    fixed::<1>(what, value, offset).map(|[b]| b)
}

/// Parses the content of a `CTA_TUPLE_ORIG` / `CTA_TUPLE_REPLY` attribute (`which`).
fn parse_tuple(attrs: &[u8], base: usize, which: &str) -> Result<FiveTuple, CtStatsError> {
    let (mut src, mut dst) = (None::<IpAddr>, None::<IpAddr>);
    let mut proto = None;
    let (mut sport, mut dport) = (None, None);
    let (mut icmp_id, mut icmp_type, mut icmp_code) = (None, None, None);
    for_each_attr(attrs, base, |ty, value, off| match ty {
        CTA_TUPLE_IP => for_each_attr(value, off, |ty, v, off| {
            match ty {
                CTA_IP_V4_SRC => src = Some(Ipv4Addr::from(fixed("CTA_IP_V4_SRC", v, off)?).into()),
                CTA_IP_V4_DST => dst = Some(Ipv4Addr::from(fixed("CTA_IP_V4_DST", v, off)?).into()),
                CTA_IP_V6_SRC => src = Some(Ipv6Addr::from(fixed("CTA_IP_V6_SRC", v, off)?).into()),
                CTA_IP_V6_DST => dst = Some(Ipv6Addr::from(fixed("CTA_IP_V6_DST", v, off)?).into()),
                _ => {}
            }
            Ok(())
        }),
        CTA_TUPLE_PROTO => for_each_attr(value, off, |ty, v, off| {
            match ty {
                CTA_PROTO_NUM => proto = Some(u8_attr("CTA_PROTO_NUM", v, off)?),
                CTA_PROTO_SRC_PORT => sport = Some(be16_attr("CTA_PROTO_SRC_PORT", v, off)?),
                CTA_PROTO_DST_PORT => dport = Some(be16_attr("CTA_PROTO_DST_PORT", v, off)?),
                CTA_PROTO_ICMP_ID | CTA_PROTO_ICMPV6_ID => {
                    icmp_id = Some(be16_attr("CTA_PROTO_ICMP(V6)_ID", v, off)?)
                }
                CTA_PROTO_ICMP_TYPE | CTA_PROTO_ICMPV6_TYPE => {
                    icmp_type = Some(u8_attr("CTA_PROTO_ICMP(V6)_TYPE", v, off)?)
                }
                CTA_PROTO_ICMP_CODE | CTA_PROTO_ICMPV6_CODE => {
                    icmp_code = Some(u8_attr("CTA_PROTO_ICMP(V6)_CODE", v, off)?)
                }
                _ => {}
            }
            Ok(())
        }),
        _ => Ok(()),
    })?;
    let (Some(src), Some(dst)) = (src, dst) else {
        return Err(CtStatsError::Malformed(format!(
            "{which} at offset {base} lacks its source or destination address"
        )));
    };
    if src.is_ipv4() != dst.is_ipv4() {
        return Err(CtStatsError::Malformed(format!(
            "{which} at offset {base} mixes IPv4 and IPv6 addresses"
        )));
    }
    let Some(proto) = proto else {
        return Err(CtStatsError::Malformed(format!(
            "{which} at offset {base} lacks CTA_PROTO_NUM"
        )));
    };
    let icmp = icmp_id.is_some() || icmp_type.is_some() || icmp_code.is_some();
    let (sport, dport) = if sport.is_none() && dport.is_none() && icmp {
        (
            icmp_id.unwrap_or(0),
            u16::from_be_bytes([icmp_type.unwrap_or(0), icmp_code.unwrap_or(0)]),
        )
    } else {
        (sport.unwrap_or(0), dport.unwrap_or(0))
    };
    Ok(FiveTuple {
        proto,
        src: SocketAddr::new(src, sport),
        dst: SocketAddr::new(dst, dport),
    })
}

/// Parses the attributes of an `IPCTNL_MSG_CT_NEW` message into an entry.
fn parse_entry(attrs: &[u8], base: usize) -> Result<CtEntry, CtStatsError> {
    let (mut orig, mut reply, mut status) = (None, None, None);
    let (mut id, mut timeout, mut mark, mut zone) = (None, None, None, None);
    for_each_attr(attrs, base, |ty, v, off| {
        match ty {
            CTA_TUPLE_ORIG => orig = Some(parse_tuple(v, off, "CTA_TUPLE_ORIG")?),
            CTA_TUPLE_REPLY => reply = Some(parse_tuple(v, off, "CTA_TUPLE_REPLY")?),
            CTA_STATUS => status = Some(be32_attr("CTA_STATUS", v, off)?),
            CTA_TIMEOUT => timeout = Some(be32_attr("CTA_TIMEOUT", v, off)?),
            CTA_MARK => mark = Some(be32_attr("CTA_MARK", v, off)?),
            CTA_ID => id = Some(be32_attr("CTA_ID", v, off)?),
            CTA_ZONE => zone = Some(be16_attr("CTA_ZONE", v, off)?),
            _ => {}
        }
        Ok(())
    })?;
    let missing = |attr| CtStatsError::MissingAttr {
        request: REQ_LOOKUP,
        attr,
    };
    Ok(CtEntry {
        orig: orig.ok_or_else(|| missing("CTA_TUPLE_ORIG"))?,
        reply: reply.ok_or_else(|| missing("CTA_TUPLE_REPLY"))?,
        status: status.ok_or_else(|| missing("CTA_STATUS"))?,
        id,
        timeout,
        mark,
        zone,
    })
}

/// Parses one datagram of the reply to a lookup (`IPCTNL_MSG_CT_GET` with `NLM_F_ACK`).
/// `NLMSG_ERROR` with `ENOENT` is [`LookupEnd::NotFound`], with another errno
/// [`CtStatsError::Kernel`]; messages after the final one are ignored.
pub fn parse_lookup(buf: &[u8]) -> Result<LookupBatch, CtStatsError> {
    let mut batch = LookupBatch::default();
    for msg in messages(buf)? {
        match classify(&msg, REQ_LOOKUP) {
            Err(CtStatsError::Kernel { errno, .. }) if errno == libc::ENOENT => {
                batch.end = Some(LookupEnd::NotFound);
                break;
            }
            Err(e) => return Err(e),
            Ok(Reply::Ack) => {
                batch.end = Some(LookupEnd::Acked);
                break;
            }
            Ok(Reply::Noop) => {}
            Ok(Reply::Done) => {
                return Err(CtStatsError::Malformed(format!(
                    "NLMSG_DONE in the reply to {REQ_LOOKUP}, which is not a dump"
                )))
            }
            Ok(Reply::Data {
                ty,
                attrs,
                attrs_offset,
                ..
            }) => {
                if ty != MSG_CT_NEW {
                    return Err(CtStatsError::UnexpectedType {
                        request: REQ_LOOKUP,
                        ty,
                    });
                }
                if batch.entry.is_some() {
                    return Err(CtStatsError::Malformed(format!(
                        "more than one entry in the reply to {REQ_LOOKUP}"
                    )));
                }
                batch.entry = Some(parse_entry(attrs, attrs_offset)?);
            }
        }
    }
    Ok(batch)
}

/// The conntrack entry (zone 0) with `tuple` in either direction, in the network namespace
/// the calling thread is in; `Ok(None)` when there is none. `dir` says which direction the
/// tuple is sent as.
pub fn lookup_current(dir: TupleDir, tuple: &FiveTuple) -> Result<Option<CtEntry>, CtStatsError> {
    let request = lookup_request(dir, tuple, 1)?;
    let sock = NlSocket::open()?;
    let mut buf = vec![0u8; 16 * 1024];
    sock.send(&request)?;
    let mut entry = None;
    loop {
        let batch = parse_lookup(sock.recv(&mut buf, REQ_LOOKUP)?)?;
        if let Some(e) = batch.entry {
            if entry.is_some() {
                return Err(CtStatsError::Malformed(format!(
                    "more than one entry in the reply to {REQ_LOOKUP}"
                )));
            }
            entry = Some(e);
        }
        match batch.end {
            None => {}
            Some(LookupEnd::NotFound) if entry.is_none() => return Ok(None),
            Some(LookupEnd::NotFound) => {
                return Err(CtStatsError::Malformed(format!(
                    "ENOENT after an entry in the reply to {REQ_LOOKUP}"
                )))
            }
            Some(LookupEnd::Acked) => {
                return match entry {
                    Some(e) => Ok(Some(e)),
                    None => Err(CtStatsError::MissingAttr {
                        request: REQ_LOOKUP,
                        attr: "an IPCTNL_MSG_CT_NEW message before the ACK",
                    }),
                }
            }
        }
    }
}

/// [`lookup_current`] in the network namespace at `netns`, on a short-lived helper thread
/// that joins it (see [`read_in`]). Every error names the path.
pub fn lookup_in(
    netns: &Path,
    dir: TupleDir,
    tuple: &FiveTuple,
) -> Result<Option<CtEntry>, CtStatsError> {
    run_in_netns(netns, || lookup_current(dir, tuple))
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;

    pub(super) fn nlmsg(ty: u16, flags: u16, seq: u32, payload: &[u8]) -> Vec<u8> {
        let len = NLMSG_HDRLEN + payload.len();
        let mut b = Vec::new();
        b.extend_from_slice(&(len as u32).to_ne_bytes());
        b.extend_from_slice(&ty.to_ne_bytes());
        b.extend_from_slice(&flags.to_ne_bytes());
        b.extend_from_slice(&seq.to_ne_bytes());
        b.extend_from_slice(&4242u32.to_ne_bytes());
        b.extend_from_slice(payload);
        b.resize(align4(b.len()), 0);
        b
    }

    pub(super) fn attr(ty: u16, value: &[u8]) -> Vec<u8> {
        let mut b = Vec::new();
        b.extend_from_slice(&((NLA_HDRLEN + value.len()) as u16).to_ne_bytes());
        b.extend_from_slice(&ty.to_ne_bytes());
        b.extend_from_slice(value);
        b.resize(align4(b.len()), 0);
        b
    }

    pub(super) fn nfgen(res_id: u16, attrs: &[Vec<u8>]) -> Vec<u8> {
        let mut b = vec![libc::AF_UNSPEC as u8, NFNETLINK_V0];
        b.extend_from_slice(&res_id.to_be_bytes());
        for a in attrs {
            b.extend_from_slice(a);
        }
        b
    }

    /// A per-CPU reply message as the kernel builds it (ctnetlink_ct_stat_cpu_fill_info).
    fn cpu_msg(s: &CpuStats) -> Vec<u8> {
        let attrs = [
            (CTA_STATS_FOUND, s.found),
            (CTA_STATS_INVALID, s.invalid),
            (CTA_STATS_INSERT, s.insert),
            (CTA_STATS_INSERT_FAILED, s.insert_failed),
            (CTA_STATS_DROP, s.drop),
            (CTA_STATS_EARLY_DROP, s.early_drop),
            (CTA_STATS_ERROR, s.error),
            (CTA_STATS_SEARCH_RESTART, s.search_restart),
            (CTA_STATS_CLASH_RESOLVE, s.clash_resolve),
            (CTA_STATS_CHAIN_TOOLONG, s.chaintoolong),
        ]
        .map(|(t, v)| attr(t, &v.to_be_bytes()));
        nlmsg(
            MSG_STATS_CPU,
            2, /* NLM_F_MULTI */
            1,
            &nfgen(s.cpu, &attrs),
        )
    }

    fn done() -> Vec<u8> {
        nlmsg(NLMSG_DONE, 2, 1, &0i32.to_ne_bytes())
    }

    pub(super) fn error(errno: i32, request: &[u8]) -> Vec<u8> {
        let mut p = errno.wrapping_neg().to_ne_bytes().to_vec();
        p.extend_from_slice(request);
        nlmsg(NLMSG_ERROR, 0, 1, &p)
    }

    fn sample(cpu: u16) -> CpuStats {
        let b = u32::from(cpu) * 100;
        CpuStats {
            cpu,
            found: b + 1,
            invalid: b + 2,
            insert: b + 3,
            insert_failed: b + 4,
            drop: b + 5,
            early_drop: b + 6,
            error: b + 7,
            search_restart: b + 8,
            clash_resolve: b + 9,
            chaintoolong: u32::MAX - b,
        }
    }

    #[test]
    fn request_layout() {
        let r = request(MSG_STATS_CPU, NLM_F_REQUEST | NLM_F_DUMP, 7);
        assert_eq!(ne_u32(&r, 0), 20);
        assert_eq!(ne_u16(&r, 4), 0x0104);
        assert_eq!(ne_u16(&r, 6), 0x0301);
        assert_eq!(ne_u32(&r, 8), 7);
        assert_eq!(ne_u32(&r, 12), 0);
        assert_eq!(&r[16..], &[0, 0, 0, 0]);
        assert_eq!(ne_u16(&request(MSG_STATS, NLM_F_REQUEST, 1), 4), 0x0105);
    }

    #[test]
    fn multi_part_dump() {
        let mut dgram = cpu_msg(&sample(0));
        dgram.extend(cpu_msg(&sample(1)));
        let b = parse_stats_cpu(&dgram).unwrap();
        assert_eq!(b.cpus, vec![sample(0), sample(1)]);
        assert!(!b.done);

        let mut dgram = cpu_msg(&sample(300));
        dgram.extend(done());
        dgram.extend(cpu_msg(&sample(5))); // after DONE: ignored
        let b = parse_stats_cpu(&dgram).unwrap();
        assert_eq!(b.cpus, vec![sample(300)]);
        assert!(b.done);

        let b = parse_stats_cpu(&done()).unwrap();
        assert_eq!(
            b,
            CpuBatch {
                cpus: vec![],
                done: true
            }
        );
        // NLMSG_DONE without a status word (older families) is fine too.
        assert!(parse_stats_cpu(&nlmsg(NLMSG_DONE, 2, 1, &[])).unwrap().done);
        assert_eq!(parse_stats_cpu(&[]).unwrap(), CpuBatch::default());
    }

    #[test]
    fn cpu_is_big_endian_res_id_and_missing_attrs_are_zero() {
        let msg = nlmsg(
            MSG_STATS_CPU,
            2,
            1,
            &nfgen(
                0x0102,
                &[
                    attr(CTA_STATS_INSERT, &9u32.to_be_bytes()),
                    attr(1 /* SEARCHED, obsolete */, &5u32.to_be_bytes()),
                    attr(99 /* unknown, future */, &[1, 2, 3, 4, 5, 6, 7]),
                    // NLA_F_NET_BYTEORDER set on the type: still recognised.
                    attr(CTA_STATS_DROP | 0x4000, &3u32.to_be_bytes()),
                ],
            ),
        );
        let b = parse_stats_cpu(&msg).unwrap();
        assert_eq!(
            b.cpus,
            vec![CpuStats {
                cpu: 0x0102,
                insert: 9,
                drop: 3,
                ..CpuStats::default()
            }]
        );
    }

    #[test]
    fn last_message_without_padding() {
        let mut msg = nlmsg(
            MSG_STATS_CPU,
            2,
            1,
            &nfgen(
                0,
                &[attr(99, &[1]), attr(CTA_STATS_FOUND, &1u32.to_be_bytes())],
            ),
        );
        assert_eq!(msg.len() % 4, 0);
        // An odd-length trailing attribute whose padding is cut off.
        let mut odd = nlmsg(MSG_STATS_CPU, 2, 1, &nfgen(0, &[]));
        let a = [5u8, 0, 99, 0, 7]; // nla_len 5, type 99, 1 value byte, no padding
        odd.extend_from_slice(&a);
        let len = odd.len() as u32;
        odd[0..4].copy_from_slice(&len.to_ne_bytes());
        assert_eq!(parse_stats_cpu(&odd).unwrap().cpus.len(), 1);
        msg.extend(odd);
        assert_eq!(parse_stats_cpu(&msg).unwrap().cpus.len(), 2);
    }

    #[test]
    fn kernel_errors() {
        let req = request(MSG_STATS_CPU, NLM_F_REQUEST | NLM_F_DUMP, 1);
        match parse_stats_cpu(&error(libc::EPERM, &req[..16])) {
            Err(CtStatsError::Kernel { errno, request }) => {
                assert_eq!(errno, libc::EPERM);
                assert_eq!(request, REQ_CPU);
            }
            other => panic!("{other:?}"),
        }
        // An ACK is not an error.
        assert_eq!(
            parse_stats_cpu(&error(0, &req[..16])).unwrap(),
            CpuBatch::default()
        );
        // A dump that ends with a negative status.
        let d = nlmsg(NLMSG_DONE, 2, 1, &(-libc::ENOMEM).to_ne_bytes());
        assert!(matches!(
            parse_stats_cpu(&d),
            Err(CtStatsError::Kernel { errno, .. }) if errno == libc::ENOMEM
        ));
        let e = parse_stats_global(&error(libc::EOPNOTSUPP, &[])).unwrap_err();
        assert!(e.to_string().contains(REQ_GLOBAL), "{e}");
        // i32::MIN can not be negated: no overflow panic.
        assert!(parse_stats_cpu(&error(i32::MIN, &[])).is_err());
        assert!(matches!(
            parse_stats_cpu(&nlmsg(NLMSG_OVERRUN, 0, 1, &[])),
            Err(CtStatsError::Malformed(_))
        ));
    }

    #[test]
    fn truncations_are_typed_errors() {
        let mut full = cpu_msg(&sample(3));
        full.extend(done());
        let first = full.len() - done().len();
        for cut in 1..full.len() {
            let r = parse_stats_cpu(&full[..cut]);
            if cut == first {
                assert_eq!(r.unwrap().cpus, vec![sample(3)]);
            } else {
                // Every cut inside a message is an error.
                assert!(
                    matches!(r, Err(CtStatsError::Truncated { .. })),
                    "cut {cut}: {r:?}"
                );
            }
        }
        // nlmsg_len claims more than there is.
        let mut m = cpu_msg(&sample(0));
        m[0..4].copy_from_slice(&1000u32.to_ne_bytes());
        assert!(matches!(
            parse_stats_cpu(&m),
            Err(CtStatsError::Truncated { need: 1000, .. })
        ));
        // nlmsg_len shorter than the header.
        m[0..4].copy_from_slice(&8u32.to_ne_bytes());
        assert!(matches!(
            parse_stats_cpu(&m),
            Err(CtStatsError::Malformed(_))
        ));
        // Data message without a whole nfgenmsg.
        assert!(matches!(
            parse_stats_cpu(&nlmsg(MSG_STATS_CPU, 2, 1, &[0, 0])),
            Err(CtStatsError::Truncated {
                what: "nfgenmsg",
                ..
            })
        ));
        // nla_len < 4.
        let bad = nlmsg(MSG_STATS_CPU, 2, 1, &[0, 0, 0, 0, 2, 0, 8, 0]);
        assert!(matches!(
            parse_stats_cpu(&bad),
            Err(CtStatsError::Malformed(_))
        ));
        // A known counter with a 2-byte value.
        let bad = nlmsg(
            MSG_STATS_CPU,
            2,
            1,
            &nfgen(0, &[attr(CTA_STATS_INSERT, &[0, 1])]),
        );
        assert!(matches!(
            parse_stats_cpu(&bad),
            Err(CtStatsError::Malformed(_))
        ));
    }

    #[test]
    fn unexpected_type() {
        let m = nlmsg(MSG_STATS, 0, 1, &nfgen(0, &[]));
        assert!(matches!(
            parse_stats_cpu(&m),
            Err(CtStatsError::UnexpectedType { ty: 0x0105, .. })
        ));
        let m = cpu_msg(&sample(0));
        assert!(matches!(
            parse_stats_global(&m),
            Err(CtStatsError::UnexpectedType { ty: 0x0104, .. })
        ));
    }

    #[test]
    fn global() {
        let m = nlmsg(
            MSG_STATS,
            0,
            2,
            &nfgen(
                0,
                &[
                    attr(CTA_STATS_GLOBAL_ENTRIES, &17u32.to_be_bytes()),
                    attr(CTA_STATS_GLOBAL_MAX_ENTRIES, &262144u32.to_be_bytes()),
                ],
            ),
        );
        assert_eq!(
            parse_stats_global(&m).unwrap(),
            Some(GlobalStats {
                count: 17,
                max: Some(262144)
            })
        );
        let m = nlmsg(
            MSG_STATS,
            0,
            2,
            &nfgen(0, &[attr(CTA_STATS_GLOBAL_ENTRIES, &0u32.to_be_bytes())]),
        );
        assert_eq!(
            parse_stats_global(&m).unwrap(),
            Some(GlobalStats {
                count: 0,
                max: None
            })
        );
        let m = nlmsg(MSG_STATS, 0, 2, &nfgen(0, &[]));
        assert!(matches!(
            parse_stats_global(&m),
            Err(CtStatsError::MissingAttr { .. })
        ));
        assert_eq!(parse_stats_global(&error(0, &[])).unwrap(), None);
        assert_eq!(parse_stats_global(&[]).unwrap(), None);
    }

    #[test]
    fn totals_and_delta() {
        let s = CtStats {
            per_cpu: vec![sample(0), sample(1)],
            count: 0,
            max: None,
        };
        let t = s.totals();
        assert_eq!(t.cpu, u16::MAX);
        assert_eq!(t.found, 1 + 101);
        assert_eq!(t.clash_resolve, 9 + 109);
        assert_eq!(t.chaintoolong, u32::MAX, "saturates");
        assert_eq!(CtStats::default().totals().insert, 0);

        let d = sample(1).delta(&sample(0));
        assert_eq!(d.cpu, 1);
        assert_eq!(d.found, 100);
        assert_eq!(d.chaintoolong, 0, "saturates at 0");
        assert_eq!(
            sample(2).fields().map(|(n, _)| n).join(" "),
            "found invalid insert insert_failed drop early_drop error search_restart \
             clash_resolve chaintoolong"
        );
    }

    #[test]
    fn error_messages_name_things() {
        let e = CtStatsError::InNetns {
            path: "/run/netns/x".into(),
            inner: Box::new(CtStatsError::Kernel {
                request: REQ_CPU,
                errno: libc::EPERM,
            }),
        };
        let s = e.to_string();
        assert!(s.contains("/run/netns/x") && s.contains(REQ_CPU), "{s}");
    }

    fn arb_cpu() -> impl Strategy<Value = CpuStats> {
        (any::<u16>(), proptest::array::uniform10(any::<u32>())).prop_map(|(cpu, v)| CpuStats {
            cpu,
            found: v[0],
            invalid: v[1],
            insert: v[2],
            insert_failed: v[3],
            drop: v[4],
            early_drop: v[5],
            error: v[6],
            search_restart: v[7],
            clash_resolve: v[8],
            chaintoolong: v[9],
        })
    }

    proptest! {
        #[test]
        fn parsers_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..1024)) {
            let _ = parse_stats_cpu(&bytes);
            let _ = parse_stats_global(&bytes);
        }

        #[test]
        fn roundtrip(cpus in proptest::collection::vec(arb_cpu(), 0..8), with_done: bool) {
            let mut dgram = Vec::new();
            for c in &cpus {
                dgram.extend(cpu_msg(c));
            }
            if with_done {
                dgram.extend(done());
            }
            let b = parse_stats_cpu(&dgram).unwrap();
            prop_assert_eq!(b.cpus, cpus);
            prop_assert_eq!(b.done, with_done);
        }

        /// Valid replies with bytes flipped or cut off: errors, never panics.
        #[test]
        fn mutated_replies_never_panic(
            cpus in proptest::collection::vec(arb_cpu(), 1..4),
            flips in proptest::collection::vec((any::<prop::sample::Index>(), any::<u8>()), 0..8),
            cut in any::<prop::sample::Index>(),
        ) {
            let mut dgram = Vec::new();
            for c in &cpus {
                dgram.extend(cpu_msg(c));
            }
            dgram.extend(done());
            for (i, v) in flips {
                let i = i.index(dgram.len());
                dgram[i] = v;
            }
            let cut = cut.index(dgram.len() + 1);
            let _ = parse_stats_cpu(&dgram[..cut]);
            let _ = parse_stats_global(&dgram[..cut]);
        }
    }
}

#[cfg(test)]
mod lookup_tests {
    use proptest::prelude::*;

    use super::{
        tests::{attr, error, nfgen, nlmsg},
        *,
    };

    fn t(proto: u8, src: &str, dst: &str) -> FiveTuple {
        FiveTuple {
            proto,
            src: src.parse().unwrap(),
            dst: dst.parse().unwrap(),
        }
    }

    fn nested(ty: u16, parts: &[Vec<u8>]) -> Vec<u8> {
        attr(ty | NLA_F_NESTED, &parts.concat())
    }

    /// A tuple as the kernel dumps it (ctnetlink_dump_tuples), with the ports given as raw
    /// CTA_PROTO_* attributes.
    fn kernel_tuple(ty: u16, ip: [Vec<u8>; 2], proto: &[Vec<u8>]) -> Vec<u8> {
        nested(
            ty,
            &[nested(CTA_TUPLE_IP, &ip), nested(CTA_TUPLE_PROTO, proto)],
        )
    }

    fn v4(ty: u16, a: [u8; 4]) -> Vec<u8> {
        attr(ty, &a)
    }

    fn ports(proto: u8, s: u16, d: u16) -> Vec<Vec<u8>> {
        vec![
            attr(CTA_PROTO_NUM, &[proto]),
            attr(CTA_PROTO_SRC_PORT, &s.to_be_bytes()),
            attr(CTA_PROTO_DST_PORT, &d.to_be_bytes()),
        ]
    }

    /// The kernel's answer to a lookup of a DNATed UDP flow, attribute by attribute as
    /// ctnetlink_fill_info lays it out (including ones the parser skips).
    fn dnat_udp_msg() -> Vec<u8> {
        let attrs = vec![
            kernel_tuple(
                CTA_TUPLE_ORIG,
                [
                    v4(CTA_IP_V4_SRC, [10, 1, 0, 2]),
                    v4(CTA_IP_V4_DST, [10, 2, 0, 1]),
                ],
                &ports(17, 1000, 53),
            ),
            kernel_tuple(
                CTA_TUPLE_REPLY,
                [
                    v4(CTA_IP_V4_SRC, [10, 2, 0, 9]),
                    v4(CTA_IP_V4_DST, [10, 1, 0, 2]),
                ],
                &ports(17, 53, 1000),
            ),
            attr(CTA_STATUS, &0x1aau32.to_be_bytes()),
            attr(CTA_TIMEOUT, &29u32.to_be_bytes()),
            nested(
                9, /* CTA_COUNTERS_ORIG */
                &[attr(1, &7u64.to_be_bytes())],
            ),
            attr(CTA_MARK, &0u32.to_be_bytes()),
            attr(11 /* CTA_USE */, &1u32.to_be_bytes()),
            attr(CTA_ID, &922549011u32.to_be_bytes()),
            attr(99 /* future */, &[1, 2, 3]),
        ];
        nlmsg(MSG_CT_NEW, 0, 1, &nfgen_family(libc::AF_INET as u8, &attrs))
    }

    fn nfgen_family(family: u8, attrs: &[Vec<u8>]) -> Vec<u8> {
        let mut p = nfgen(0, attrs);
        p[0] = family;
        p
    }

    fn dnat_udp_entry() -> CtEntry {
        CtEntry {
            orig: t(17, "10.1.0.2:1000", "10.2.0.1:53"),
            reply: t(17, "10.2.0.9:53", "10.1.0.2:1000"),
            status: 0x1aa,
            id: Some(922549011),
            timeout: Some(29),
            mark: Some(0),
            zone: None,
        }
    }

    fn ack() -> Vec<u8> {
        error(0, &[0; 16])
    }

    /// An entry message built by this module's own attribute writer.
    fn entry_msg(e: &CtEntry) -> Vec<u8> {
        let mut b = NlaBuf::default();
        b.nest(CTA_TUPLE_ORIG, |b| b.tuple(&e.orig));
        b.nest(CTA_TUPLE_REPLY, |b| b.tuple(&e.reply));
        b.put(CTA_STATUS, &e.status.to_be_bytes());
        if let Some(v) = e.timeout {
            b.put(CTA_TIMEOUT, &v.to_be_bytes());
        }
        if let Some(v) = e.mark {
            b.put(CTA_MARK, &v.to_be_bytes());
        }
        if let Some(v) = e.id {
            b.put(CTA_ID, &v.to_be_bytes());
        }
        if let Some(v) = e.zone {
            b.put(CTA_ZONE, &v.to_be_bytes());
        }
        let family = if e.orig.src.is_ipv4() {
            libc::AF_INET
        } else {
            libc::AF_INET6
        };
        let mut p = vec![family as u8, NFNETLINK_V0, 0, 0];
        p.extend(b.0);
        nlmsg(MSG_CT_NEW, 0, 1, &p)
    }

    /// The tuple a lookup request carries, read back with the reply parser.
    fn request_tuple(req: &[u8]) -> (u8, u16, FiveTuple) {
        let msgs = messages(req).unwrap();
        assert_eq!(msgs.len(), 1);
        let p = msgs[0].payload;
        let mut found = None;
        for_each_attr(&p[4..], 20, |ty, v, off| {
            assert!(found.is_none(), "one attribute");
            found = Some((ty, parse_tuple(v, off, "request")?));
            Ok(())
        })
        .unwrap();
        let (ty, tuple) = found.unwrap();
        (p[0], ty, tuple)
    }

    #[test]
    #[cfg(target_endian = "little")]
    fn request_bytes() {
        let r = lookup_request(TupleDir::Orig, &t(17, "10.1.0.2:1000", "10.2.0.1:53"), 1).unwrap();
        #[rustfmt::skip]
        let want: &[u8] = &[
            72, 0, 0, 0, 0x01, 0x01, 0x05, 0x00, 1, 0, 0, 0, 0, 0, 0, 0, // nlmsghdr
            2, 0, 0, 0, // nfgenmsg: AF_INET, v0, res_id 0
            52, 0, 0x01, 0x80, // CTA_TUPLE_ORIG | NLA_F_NESTED
            20, 0, 0x01, 0x80, // CTA_TUPLE_IP
            8, 0, 1, 0, 10, 1, 0, 2, // CTA_IP_V4_SRC
            8, 0, 2, 0, 10, 2, 0, 1, // CTA_IP_V4_DST
            28, 0, 0x02, 0x80, // CTA_TUPLE_PROTO
            5, 0, 1, 0, 17, 0, 0, 0, // CTA_PROTO_NUM
            6, 0, 2, 0, 0x03, 0xe8, 0, 0, // CTA_PROTO_SRC_PORT 1000
            6, 0, 3, 0, 0, 53, 0, 0, // CTA_PROTO_DST_PORT 53
        ];
        assert_eq!(r, want);
    }

    #[test]
    fn request_families_directions_and_icmp() {
        let tup = t(6, "[fd00::1]:40000", "[fd00::2]:80");
        let r = lookup_request(TupleDir::Reply, &tup, 9).unwrap();
        assert_eq!(ne_u16(&r, 4), MSG_CT_GET);
        assert_eq!(ne_u16(&r, 6), NLM_F_REQUEST | NLM_F_ACK);
        assert_eq!(ne_u32(&r, 8), 9);
        assert_eq!(ne_u32(&r, 0) as usize, r.len());
        assert_eq!(
            request_tuple(&r),
            (libc::AF_INET6 as u8, CTA_TUPLE_REPLY, tup)
        );
        // The nested flag is on every attribute that holds attributes.
        assert_eq!(ne_u16(&r, 22), CTA_TUPLE_REPLY | NLA_F_NESTED);

        // ICMP: echo id in the source port, type << 8 | code in the destination port.
        let icmp = t(1, "10.0.0.1:77", "10.0.0.2:2048");
        let r = lookup_request(TupleDir::Orig, &icmp, 1).unwrap();
        assert_eq!(
            request_tuple(&r),
            (libc::AF_INET as u8, CTA_TUPLE_ORIG, icmp)
        );
        let p = &r[NLMSG_HDRLEN + NFGENMSG_LEN..];
        let mut types = Vec::new();
        for_each_attr(p, 0, |_, v, off| {
            for_each_attr(v, off, |ty, v, off| {
                if ty == CTA_TUPLE_PROTO {
                    for_each_attr(v, off, |ty, _, _| {
                        types.push(ty);
                        Ok(())
                    })?;
                }
                Ok(())
            })
        })
        .unwrap();
        assert_eq!(
            types,
            [
                CTA_PROTO_NUM,
                CTA_PROTO_ICMP_ID,
                CTA_PROTO_ICMP_TYPE,
                CTA_PROTO_ICMP_CODE
            ]
        );
        let icmp6 = t(58, "[fd00::1]:5", "[fd00::2]:32768");
        let r = lookup_request(TupleDir::Orig, &icmp6, 1).unwrap();
        assert_eq!(request_tuple(&r).2, icmp6);

        let mixed = t(17, "10.0.0.1:1", "[fd00::2]:2");
        assert!(matches!(
            lookup_request(TupleDir::Orig, &mixed, 1),
            Err(CtStatsError::BadTuple(_))
        ));
    }

    #[test]
    fn kernel_reply() {
        let b = parse_lookup(&dnat_udp_msg()).unwrap();
        assert_eq!(b.entry, Some(dnat_udp_entry()));
        assert_eq!(b.end, None, "the ACK comes in its own datagram");
        assert_eq!(
            parse_lookup(&ack()).unwrap(),
            LookupBatch {
                entry: None,
                end: Some(LookupEnd::Acked)
            }
        );
        let mut both = dnat_udp_msg();
        both.extend(ack());
        both.extend(dnat_udp_msg()); // after the end: ignored
        let b = parse_lookup(&both).unwrap();
        assert_eq!(b.entry, Some(dnat_udp_entry()));
        assert_eq!(b.end, Some(LookupEnd::Acked));
        assert_eq!(parse_lookup(&[]).unwrap(), LookupBatch::default());
    }

    #[test]
    fn ipv6_icmp_generic_and_zone() {
        let v6 = |ty, s: &str| attr(ty, &s.parse::<Ipv6Addr>().unwrap().octets());
        let attrs = vec![
            kernel_tuple(
                CTA_TUPLE_ORIG,
                [v6(CTA_IP_V6_SRC, "fd00::1"), v6(CTA_IP_V6_DST, "fd00::2")],
                &[
                    attr(CTA_PROTO_NUM, &[58]),
                    attr(CTA_PROTO_ICMPV6_ID, &77u16.to_be_bytes()),
                    attr(CTA_PROTO_ICMPV6_TYPE, &[128]),
                    attr(CTA_PROTO_ICMPV6_CODE, &[0]),
                ],
            ),
            kernel_tuple(
                CTA_TUPLE_REPLY,
                [v6(CTA_IP_V6_SRC, "fd00::2"), v6(CTA_IP_V6_DST, "fd00::1")],
                &[
                    attr(CTA_PROTO_NUM, &[58]),
                    attr(CTA_PROTO_ICMPV6_ID, &77u16.to_be_bytes()),
                    attr(CTA_PROTO_ICMPV6_TYPE, &[129]),
                    attr(CTA_PROTO_ICMPV6_CODE, &[0]),
                ],
            ),
            // NLA_F_NET_BYTEORDER on the type is masked off.
            attr(CTA_STATUS | 0x4000, &8u32.to_be_bytes()),
            attr(CTA_ZONE, &7u16.to_be_bytes()),
        ];
        let m = nlmsg(
            MSG_CT_NEW,
            0,
            1,
            &nfgen_family(libc::AF_INET6 as u8, &attrs),
        );
        let e = parse_lookup(&m).unwrap().entry.unwrap();
        assert_eq!(e.orig, t(58, "[fd00::1]:77", "[fd00::2]:32768"));
        assert_eq!(e.reply, t(58, "[fd00::2]:77", "[fd00::1]:33024"));
        assert_eq!((e.status, e.zone, e.id, e.mark), (8, Some(7), None, None));

        // A protocol without ports (e.g. generic/OSPF): ports 0.
        let tuple = |ty| {
            kernel_tuple(
                ty,
                [
                    v4(CTA_IP_V4_SRC, [1, 2, 3, 4]),
                    v4(CTA_IP_V4_DST, [5, 6, 7, 8]),
                ],
                &[attr(CTA_PROTO_NUM, &[89])],
            )
        };
        let attrs = vec![
            tuple(CTA_TUPLE_ORIG),
            tuple(CTA_TUPLE_REPLY),
            attr(CTA_STATUS, &0u32.to_be_bytes()),
        ];
        let m = nlmsg(MSG_CT_NEW, 0, 1, &nfgen_family(libc::AF_INET as u8, &attrs));
        let e = parse_lookup(&m).unwrap().entry.unwrap();
        assert_eq!(e.orig, t(89, "1.2.3.4:0", "5.6.7.8:0"));
    }

    #[test]
    fn not_found_and_kernel_errors() {
        let r = parse_lookup(&error(libc::ENOENT, &[0; 16])).unwrap();
        assert_eq!(r.end, Some(LookupEnd::NotFound));
        assert_eq!(r.entry, None);
        match parse_lookup(&error(libc::EINVAL, &[0; 16])) {
            Err(CtStatsError::Kernel { request, errno }) => {
                assert_eq!((request, errno), (REQ_LOOKUP, libc::EINVAL));
            }
            other => panic!("{other:?}"),
        }
        assert!(parse_lookup(&error(i32::MIN, &[])).is_err());
        assert!(matches!(
            parse_lookup(&nlmsg(NLMSG_DONE, 2, 1, &0i32.to_ne_bytes())),
            Err(CtStatsError::Malformed(_))
        ));
        assert!(matches!(
            parse_lookup(&nlmsg(MSG_STATS, 0, 1, &nfgen(0, &[]))),
            Err(CtStatsError::UnexpectedType { ty: 0x0105, .. })
        ));
        let mut two = dnat_udp_msg();
        two.extend(dnat_udp_msg());
        assert!(matches!(
            parse_lookup(&two),
            Err(CtStatsError::Malformed(_))
        ));
    }

    #[test]
    fn malformed_entries() {
        let orig = kernel_tuple(
            CTA_TUPLE_ORIG,
            [
                v4(CTA_IP_V4_SRC, [10, 0, 0, 1]),
                v4(CTA_IP_V4_DST, [10, 0, 0, 2]),
            ],
            &ports(17, 1, 2),
        );
        let reply = kernel_tuple(
            CTA_TUPLE_REPLY,
            [
                v4(CTA_IP_V4_SRC, [10, 0, 0, 2]),
                v4(CTA_IP_V4_DST, [10, 0, 0, 1]),
            ],
            &ports(17, 2, 1),
        );
        let status = attr(CTA_STATUS, &8u32.to_be_bytes());
        let msg = |attrs: &[Vec<u8>]| nlmsg(MSG_CT_NEW, 0, 1, &nfgen(0, attrs));
        assert!(parse_lookup(&msg(&[orig.clone(), reply.clone(), status.clone()])).is_ok());
        for (attrs, attr_name) in [
            (vec![reply.clone(), status.clone()], "CTA_TUPLE_ORIG"),
            (vec![orig.clone(), status.clone()], "CTA_TUPLE_REPLY"),
            (vec![orig.clone(), reply.clone()], "CTA_STATUS"),
        ] {
            match parse_lookup(&msg(&attrs)) {
                Err(CtStatsError::MissingAttr { attr, .. }) => assert_eq!(attr, attr_name),
                other => panic!("{attr_name}: {other:?}"),
            }
        }
        let bad_tuples = [
            // no destination address
            kernel_tuple(
                CTA_TUPLE_ORIG,
                [v4(CTA_IP_V4_SRC, [10, 0, 0, 1]), attr(99, &[])],
                &ports(17, 1, 2),
            ),
            // IPv4 source, IPv6 destination
            kernel_tuple(
                CTA_TUPLE_ORIG,
                [
                    v4(CTA_IP_V4_SRC, [10, 0, 0, 1]),
                    attr(CTA_IP_V6_DST, &[0; 16]),
                ],
                &ports(17, 1, 2),
            ),
            // a 3-byte IPv4 address
            kernel_tuple(
                CTA_TUPLE_ORIG,
                [
                    attr(CTA_IP_V4_SRC, &[10, 0, 0]),
                    v4(CTA_IP_V4_DST, [10, 0, 0, 2]),
                ],
                &ports(17, 1, 2),
            ),
            // no protocol number
            kernel_tuple(
                CTA_TUPLE_ORIG,
                [
                    v4(CTA_IP_V4_SRC, [10, 0, 0, 1]),
                    v4(CTA_IP_V4_DST, [10, 0, 0, 2]),
                ],
                &ports(17, 1, 2)[1..],
            ),
            // a 4-byte port
            kernel_tuple(
                CTA_TUPLE_ORIG,
                [
                    v4(CTA_IP_V4_SRC, [10, 0, 0, 1]),
                    v4(CTA_IP_V4_DST, [10, 0, 0, 2]),
                ],
                &[attr(CTA_PROTO_NUM, &[6]), attr(CTA_PROTO_SRC_PORT, &[0; 4])],
            ),
        ];
        for bad in bad_tuples {
            let r = parse_lookup(&msg(&[bad, reply.clone(), status.clone()]));
            assert!(matches!(r, Err(CtStatsError::Malformed(_))), "{r:?}");
        }
        let r = parse_lookup(&msg(&[orig, reply, attr(CTA_STATUS, &[0; 2])]));
        assert!(matches!(r, Err(CtStatsError::Malformed(ref s)) if s.contains("CTA_STATUS")));
    }

    #[test]
    fn truncations_are_typed_errors() {
        let full = dnat_udp_msg();
        for cut in 1..full.len() {
            let r = parse_lookup(&full[..cut]);
            assert!(
                matches!(r, Err(CtStatsError::Truncated { .. })),
                "cut {cut}: {r:?}"
            );
        }
        // A nested attribute whose nla_len runs past its parent.
        let mut m = dnat_udp_msg();
        let at = NLMSG_HDRLEN + NFGENMSG_LEN + NLA_HDRLEN; // CTA_TUPLE_IP header
        m[at..at + 2].copy_from_slice(&200u16.to_ne_bytes());
        assert!(matches!(
            parse_lookup(&m),
            Err(CtStatsError::Truncated { need: 200, .. })
        ));
    }

    fn arb_tuple() -> impl Strategy<Value = FiveTuple> {
        (
            any::<u8>(),
            any::<bool>(),
            any::<[u8; 16]>(),
            any::<[u8; 16]>(),
            any::<u16>(),
            any::<u16>(),
        )
            .prop_map(|(proto, v6, s, d, sp, dp)| {
                let ip = |b: [u8; 16]| -> IpAddr {
                    if v6 {
                        Ipv6Addr::from(b).into()
                    } else {
                        Ipv4Addr::new(b[0], b[1], b[2], b[3]).into()
                    }
                };
                FiveTuple {
                    proto,
                    src: SocketAddr::new(ip(s), sp),
                    dst: SocketAddr::new(ip(d), dp),
                }
            })
    }

    fn arb_entry() -> impl Strategy<Value = CtEntry> {
        (
            arb_tuple(),
            arb_tuple(),
            any::<u32>(),
            any::<Option<u32>>(),
            any::<Option<u32>>(),
            any::<Option<u32>>(),
            any::<Option<u16>>(),
        )
            .prop_map(|(orig, reply, status, id, timeout, mark, zone)| CtEntry {
                orig,
                reply,
                status,
                id,
                timeout,
                mark,
                zone,
            })
    }

    proptest! {
        #[test]
        fn never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..1024)) {
            let _ = parse_lookup(&bytes);
        }

        #[test]
        fn entry_roundtrip(e in arb_entry(), with_ack: bool) {
            let mut dgram = entry_msg(&e);
            if with_ack {
                dgram.extend(ack());
            }
            let b = parse_lookup(&dgram).unwrap();
            prop_assert_eq!(b.entry, Some(e));
            prop_assert_eq!(b.end, with_ack.then_some(LookupEnd::Acked));
        }

        #[test]
        fn request_roundtrip(tuple in arb_tuple(), reply: bool, seq: u32) {
            let dir = if reply { TupleDir::Reply } else { TupleDir::Orig };
            let r = lookup_request(dir, &tuple, seq).unwrap();
            let (family, ty, back) = request_tuple(&r);
            let want_family = if tuple.src.is_ipv4() { libc::AF_INET } else { libc::AF_INET6 };
            prop_assert_eq!(family, want_family as u8);
            prop_assert_eq!(ty, if reply { CTA_TUPLE_REPLY } else { CTA_TUPLE_ORIG });
            prop_assert_eq!(back, tuple);
        }

        /// Valid replies with bytes flipped or cut off: errors, never panics.
        #[test]
        fn mutated_replies_never_panic(
            e in arb_entry(),
            flips in proptest::collection::vec((any::<prop::sample::Index>(), any::<u8>()), 0..8),
            cut in any::<prop::sample::Index>(),
        ) {
            let mut dgram = entry_msg(&e);
            dgram.extend(dnat_udp_msg());
            dgram.extend(ack());
            for (i, v) in flips {
                let i = i.index(dgram.len());
                dgram[i] = v;
            }
            let cut = cut.index(dgram.len() + 1);
            let _ = parse_lookup(&dgram[..cut]);
        }
    }
}

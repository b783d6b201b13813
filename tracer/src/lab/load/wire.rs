//! The bytes and syscalls of the load benchmark: queries built in place from a template,
//! answers written in place by the responder, replies parsed without allocating, and
//! batched `sendmmsg`/`recvmmsg` on raw UDP sockets.

use std::{
    io, mem,
    net::{Ipv4Addr, SocketAddr, SocketAddrV4},
    os::fd::RawFd,
};

use crate::traffic::{QTYPE_A, QTYPE_AAAA};

/// Longest datagram either side reads or writes (plain DNS over UDP).
pub const DGRAM_MAX: usize = 512;
/// The zone every bench name is in.
pub const ZONE: &str = "load.test";
/// Digits of the sequence number in a one-process query name (`qNNNNNNNN.load.test`).
pub const SEQ_DIGITS: usize = 8;
/// Sequence numbers a query name can carry.
pub const SEQ_LIMIT: u64 = 100_000_000;
/// Length of a one-process query: header, `q` + 8 digits, `load`, `test`, root, type, class.
pub const QUERY_LEN: usize = 12 + (2 + SEQ_DIGITS) + 5 + 5 + 1 + 4;
/// Offset of the first digit of the sequence number in such a query.
const SEQ_AT: usize = 12 + 2;

/// Writes the A query `qNNNNNNNN.load.test` (id `id`, RD set) for sequence number `seq`
/// (below [`SEQ_LIMIT`]) into `buf`.
pub fn write_query(buf: &mut [u8; QUERY_LEN], id: u16, seq: u64) {
    buf[..2].copy_from_slice(&id.to_be_bytes());
    buf[2..12].copy_from_slice(&[0x01, 0x00, 0, 1, 0, 0, 0, 0, 0, 0]); // RD, QDCOUNT 1
    buf[12] = 1 + SEQ_DIGITS as u8;
    buf[13] = b'q';
    let mut n = seq % SEQ_LIMIT;
    for i in (0..SEQ_DIGITS).rev() {
        buf[SEQ_AT + i] = b'0' + (n % 10) as u8;
        n /= 10;
    }
    let tail = &mut buf[SEQ_AT + SEQ_DIGITS..];
    tail[..11].copy_from_slice(b"\x04load\x04test\x00");
    tail[11..13].copy_from_slice(&QTYPE_A.to_be_bytes());
    tail[13..15].copy_from_slice(&1u16.to_be_bytes()); // IN
}

/// What the generators need of a reply.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Reply {
    pub id: u16,
    pub rcode: u8,
    pub ancount: u16,
    pub qtype: u16,
    /// The sequence number of a `qNNNNNNNN.*` question.
    pub seq: Option<u64>,
}

/// The end of the question that starts at offset 12 (after its type and class), with the
/// type; `None` when the name runs past the buffer, is compressed or is too long.
fn question(msg: &[u8]) -> Option<(usize, u16)> {
    let mut i = 12;
    // A name has at most 127 labels; the bound also ends the walk on garbage.
    for _ in 0..128 {
        let len = *msg.get(i)? as usize;
        if len == 0 {
            let qtype = u16::from_be_bytes([*msg.get(i + 1)?, *msg.get(i + 2)?]);
            let end = i + 5;
            return (end <= msg.len()).then_some((end, qtype));
        }
        if len & 0xc0 != 0 {
            return None;
        }
        i += 1 + len;
    }
    None
}

/// Parses a DNS response with one question; `None` for anything else.
pub fn parse_reply(msg: &[u8]) -> Option<Reply> {
    if msg.len() < 12 || msg[2] & 0x80 == 0 || u16::from_be_bytes([msg[4], msg[5]]) != 1 {
        return None;
    }
    let (_, qtype) = question(msg)?;
    let seq = (msg.get(12) == Some(&(1 + SEQ_DIGITS as u8)) && msg.get(13) == Some(&b'q'))
        .then(|| msg.get(SEQ_AT..SEQ_AT + SEQ_DIGITS))
        .flatten()
        .and_then(|d| {
            d.iter().try_fold(0u64, |n, &c| {
                c.is_ascii_digit().then(|| n * 10 + u64::from(c - b'0'))
            })
        });
    Some(Reply {
        id: u16::from_be_bytes([msg[0], msg[1]]),
        rcode: msg[3] & 0x0f,
        ancount: u16::from_be_bytes([msg[6], msg[7]]),
        qtype,
        seq,
    })
}

/// The responder's answer to `query`, written into `out`: the header and question echoed
/// with QR and RA set, NOERROR and, for A and AAAA, one record of the asked type (the
/// records of [`traffic::dns_response`](crate::traffic::dns_response)); no authority or
/// additional records. Returns its length, or `None` when `query` is not a query with
/// exactly one well-formed question (then nothing is answered).
pub fn write_answer(query: &[u8], out: &mut [u8; DGRAM_MAX]) -> Option<usize> {
    if query.len() < 12 || query[2] & 0x80 != 0 || u16::from_be_bytes([query[4], query[5]]) != 1 {
        return None;
    }
    let (end, qtype) = question(query)?;
    let rdata: &[u8] = match qtype {
        QTYPE_A => &[10, 77, 0, 99],
        QTYPE_AAAA => &[0xfd, 0x77, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0x99],
        _ => &[],
    };
    let len = end
        + if rdata.is_empty() {
            0
        } else {
            12 + rdata.len()
        };
    if len > out.len() {
        return None;
    }
    out[..end].copy_from_slice(&query[..end]);
    out[2] |= 0x80; // QR; opcode and RD as asked
    out[3] = 0x80; // RA, NOERROR
    out[6..12].copy_from_slice(&[0, u8::from(!rdata.is_empty()), 0, 0, 0, 0]);
    if !rdata.is_empty() {
        let rr = &mut out[end..len];
        rr[..2].copy_from_slice(&[0xc0, 12]); // the question's name
        rr[2..4].copy_from_slice(&qtype.to_be_bytes());
        rr[4..10].copy_from_slice(&[0, 1, 0, 0, 0, 30]); // IN, TTL 30
        rr[10..12].copy_from_slice(&(rdata.len() as u16).to_be_bytes());
        rr[12..].copy_from_slice(rdata);
    }
    Some(len)
}

/// A socket option that takes an int.
pub fn set_int_opt(fd: RawFd, level: libc::c_int, name: libc::c_int, v: i32) -> io::Result<()> {
    // SAFETY: `v` is a live c_int and the length is its size.
    let rc = unsafe {
        libc::setsockopt(
            fd,
            level,
            name,
            std::ptr::from_ref(&v).cast(),
            mem::size_of::<libc::c_int>() as libc::socklen_t,
        )
    };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// Socket buffers of `bytes` each way: the `FORCE` options (root) past `rmem_max`, else
/// the plain ones (capped by the kernel).
pub fn set_buffers(fd: RawFd, bytes: i32) -> io::Result<()> {
    for (force, plain) in [
        (libc::SO_RCVBUFFORCE, libc::SO_RCVBUF),
        (libc::SO_SNDBUFFORCE, libc::SO_SNDBUF),
    ] {
        if set_int_opt(fd, libc::SOL_SOCKET, force, bytes).is_err() {
            set_int_opt(fd, libc::SOL_SOCKET, plain, bytes)?;
        }
    }
    Ok(())
}

/// `RcvbufErrors` of `/proc/self/net/snmp`: datagrams this process's network namespace
/// dropped because a socket's receive buffer was full.
pub fn udp_rcvbuf_errors() -> Option<u64> {
    let text = std::fs::read_to_string("/proc/self/net/snmp").ok()?;
    let mut udp = text.lines().filter(|l| l.starts_with("Udp: "));
    let (names, values) = (udp.next()?, udp.next()?);
    let i = names.split_whitespace().position(|n| n == "RcvbufErrors")?;
    values.split_whitespace().nth(i)?.parse().ok()
}

/// `n` datagram buffers with their `mmsghdr`s for one `recvmmsg` or `sendmmsg`, with
/// room for the peers' IPv4 addresses. The headers' pointers are set again before every
/// call, so the batch may move.
pub struct Batch {
    bufs: Vec<[u8; DGRAM_MAX]>,
    lens: Vec<usize>,
    refused: Vec<bool>,
    iovs: Vec<libc::iovec>,
    addrs: Vec<libc::sockaddr_in>,
    hdrs: Vec<libc::mmsghdr>,
}

impl Batch {
    pub fn new(n: usize) -> Batch {
        // SAFETY: iovec, sockaddr_in and mmsghdr are plain C data for which all-zero
        // bytes are valid (null pointers, zero lengths).
        let (iov, addr, hdr) = unsafe { (mem::zeroed(), mem::zeroed(), mem::zeroed()) };
        Batch {
            bufs: vec![[0; DGRAM_MAX]; n],
            lens: vec![0; n],
            refused: vec![false; n],
            iovs: vec![iov; n],
            addrs: vec![addr; n],
            hdrs: vec![hdr; n],
        }
    }

    pub fn capacity(&self) -> usize {
        self.bufs.len()
    }

    /// Buffer `i`, to fill before a send (set its length with [`Batch::set_len`]).
    pub fn buf_mut(&mut self, i: usize) -> &mut [u8; DGRAM_MAX] {
        &mut self.bufs[i]
    }

    pub fn set_len(&mut self, i: usize, len: usize) {
        self.lens[i] = len.min(DGRAM_MAX);
    }

    /// Datagram `i` as received (or as set for sending).
    pub fn msg(&self, i: usize) -> &[u8] {
        &self.bufs[i][..self.lens[i]]
    }

    /// Whether the kernel refused datagram `i` in the last [`Batch::send`].
    pub fn was_refused(&self, i: usize) -> bool {
        self.refused[i]
    }

    /// The peer of datagram `i` (for a send on an unconnected socket: from `recv`).
    pub fn peer(&self, i: usize) -> SocketAddr {
        let a = &self.addrs[i];
        SocketAddr::V4(SocketAddrV4::new(
            Ipv4Addr::from(u32::from_be(a.sin_addr.s_addr)),
            u16::from_be(a.sin_port),
        ))
    }

    /// Copies the peer of datagram `from` of `other` to datagram `i` of this batch.
    pub fn set_peer_from(&mut self, i: usize, other: &Batch, from: usize) {
        self.addrs[i] = other.addrs[from];
    }

    /// Points headers `range` at their buffers, lengths and (with `addressed`) peers.
    fn prepare(&mut self, range: std::ops::Range<usize>, recv: bool, addressed: bool) {
        for i in range {
            self.iovs[i].iov_base = self.bufs[i].as_mut_ptr().cast();
            self.iovs[i].iov_len = if recv { DGRAM_MAX } else { self.lens[i] };
            let h = &mut self.hdrs[i].msg_hdr;
            h.msg_iov = &mut self.iovs[i];
            h.msg_iovlen = 1;
            if addressed {
                h.msg_name = std::ptr::from_mut(&mut self.addrs[i]).cast();
                h.msg_namelen = mem::size_of::<libc::sockaddr_in>() as libc::socklen_t;
            } else {
                h.msg_name = std::ptr::null_mut();
                h.msg_namelen = 0;
            }
            self.hdrs[i].msg_len = 0;
        }
    }

    /// `recvmmsg` of up to the whole batch with `flags` (e.g. `MSG_DONTWAIT`,
    /// `MSG_WAITFORONE`); how many arrived (0 when none was waiting, the socket's receive
    /// timeout passed, or it reported a port unreachable: its queries go unanswered).
    pub fn recv(&mut self, fd: RawFd, flags: libc::c_int, addressed: bool) -> io::Result<usize> {
        let n = self.capacity();
        self.prepare(0..n, true, addressed);
        loop {
            // SAFETY: the first n headers each point to one iovec over a live buffer of
            // DGRAM_MAX bytes and, if addressed, to a live sockaddr_in; no timeout.
            let rc = unsafe {
                libc::recvmmsg(
                    fd,
                    self.hdrs.as_mut_ptr(),
                    n as libc::c_uint,
                    flags,
                    std::ptr::null_mut(),
                )
            };
            if rc >= 0 {
                for i in 0..rc as usize {
                    self.lens[i] = (self.hdrs[i].msg_len as usize).min(DGRAM_MAX);
                }
                return Ok(rc as usize);
            }
            let e = io::Error::last_os_error();
            match e.kind() {
                io::ErrorKind::Interrupted => continue,
                // ECONNREFUSED: an ICMP port unreachable for an earlier send on a
                // connected socket (the responder gone); reading it cleared it.
                io::ErrorKind::WouldBlock | io::ErrorKind::ConnectionRefused => return Ok(0),
                _ => return Err(e),
            }
        }
    }

    /// `sendmmsg` of datagrams `0..n` (to their peers when `addressed`). A datagram the
    /// kernel refuses is skipped, counted in the second value and marked (see
    /// [`Batch::was_refused`]); returns (sent, refused).
    pub fn send(&mut self, fd: RawFd, n: usize, addressed: bool) -> (usize, usize) {
        let n = n.min(self.capacity());
        self.prepare(0..n, false, addressed);
        self.refused[..n].fill(false);
        let (mut at, mut refused) = (0, 0);
        // Each pass sends at least one datagram or skips one: at most n passes, plus
        // interruptions.
        let mut interrupted = 0;
        while at < n {
            // SAFETY: headers at..n each point to one iovec over a live buffer of at
            // least its length and, if addressed, to a live sockaddr_in; the kernel only
            // reads them and writes msg_len.
            let rc = unsafe {
                libc::sendmmsg(
                    fd,
                    self.hdrs[at..].as_mut_ptr(),
                    (n - at) as libc::c_uint,
                    libc::MSG_DONTWAIT,
                )
            };
            if rc > 0 {
                at += rc as usize;
            } else if rc < 0
                && io::Error::last_os_error().kind() == io::ErrorKind::Interrupted
                && interrupted < 16
            {
                interrupted += 1;
            } else {
                // The datagram at `at` was refused (EAGAIN, ENOBUFS, EPERM from a rule).
                self.refused[at] = true;
                at += 1;
                refused += 1;
            }
        }
        (n - refused, refused)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::traffic::{dns_query, dns_response};

    #[test]
    fn queries_and_answers_match_the_lab_builders() {
        let mut q = [0u8; QUERY_LEN];
        write_query(&mut q, 0xbeef, 1234);
        assert_eq!(
            q.to_vec(),
            dns_query(0xbeef, "q00001234.load.test", QTYPE_A).unwrap()
        );
        let mut out = [0u8; DGRAM_MAX];
        for qtype in [QTYPE_A, QTYPE_AAAA] {
            let query = dns_query(7, "hot3.load.test", qtype).unwrap();
            let n = write_answer(&query, &mut out).unwrap();
            assert_eq!(&out[..n], dns_response(&query, 0, true).as_slice());
            let r = parse_reply(&out[..n]).unwrap();
            assert_eq!(
                (r.id, r.rcode, r.ancount, r.qtype, r.seq),
                (7, 0, 1, qtype, None)
            );
        }
        let n = write_answer(&q, &mut out).unwrap();
        assert_eq!(parse_reply(&out[..n]).unwrap().seq, Some(1234));
        // Another type: NOERROR, no record.
        let mx = dns_query(9, "x.load.test", 15).unwrap();
        let n = write_answer(&mx, &mut out).unwrap();
        assert_eq!(parse_reply(&out[..n]).unwrap().ancount, 0);
    }

    #[test]
    fn bad_input_is_refused_not_a_panic() {
        let mut out = [0u8; DGRAM_MAX];
        let q = dns_query(1, "a.load.test", QTYPE_A).unwrap();
        for cut in 0..q.len() {
            assert_eq!(write_answer(&q[..cut], &mut out), None, "cut at {cut}");
            assert_eq!(parse_reply(&q[..cut]), None);
        }
        // A response is not answered; a compressed question is refused.
        let r = dns_response(&q, 0, true);
        assert_eq!(write_answer(&r, &mut out), None);
        let mut ptr = q.clone();
        ptr.truncate(12);
        ptr.extend_from_slice(&[0xc0, 12, 0, 1, 0, 1]);
        assert_eq!(write_answer(&ptr, &mut out), None);
        // A name longer than the buffer allows.
        let mut long = q[..12].to_vec();
        for _ in 0..9 {
            long.push(63);
            long.extend_from_slice(&[b'a'; 63]);
        }
        long.extend_from_slice(&[0, 0, 1, 0, 1]);
        assert_eq!(write_answer(&long, &mut out), None);
    }

    #[test]
    fn snmp_counter_is_read() {
        assert!(udp_rcvbuf_errors().is_some());
    }
}

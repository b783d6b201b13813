//! The JSON-lines trace (`tracer watch --output FILE`, `tracer record`): one object per
//! line, documented in docs/trace.md.
//!
//! A trace keeps what a replay needs to reach the same findings without the node: every raw
//! ring-buffer record, every counter reading and clock tick, and every answer the node gave
//! (counters, clash winners, kernel symbol names, pods). The findings and lookups the live
//! run printed are in it too, in the same form as `tracer watch --json`, for jq and for a
//! check that a replay agrees.
//!
//! Writing is line-atomic: lines are buffered whole and appended with one `write` per
//! batch, so a kill leaves at most one incomplete last line. Segments rotate at a size limit
//! (`FILE` → `FILE.1` → … → `FILE.<keep>`); each starts with its own header, the
//! explainer's books and, as they are asked again, the node's answers, so one replays alone.

use std::{
    collections::{HashMap, HashSet},
    fs::{self, File},
    io::{self, Write},
    path::{Path, PathBuf},
    sync::{Arc, Mutex, MutexGuard},
};

use base64::Engine as _;
use serde::{Deserialize, Serialize};

use crate::{
    ctstats::{CpuStats, CtEntry, TupleDir},
    events::FiveTuple,
    explain::Books,
    lookups,
    node::{Node, NsAnswer},
    pods::Workload,
};

/// The version of the line format; a replay reads this version only (and says so).
/// Version 2 added `loss` lines and `lookups.loss_gate`; version 1 traces replay as before.
pub const SCHEMA: u32 = 2;

fn is_zero(n: &u64) -> bool {
    *n == 0
}

/// The first line of every segment.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Header {
    pub schema: u32,
    /// The tracer version that wrote it.
    pub tracer: String,
    /// Tells segments of one run from another's.
    pub run: String,
    /// 0 for the first; rotation numbers the next ones.
    pub segment: u32,
    pub hostname: String,
    pub kernel: String,
    /// Wall-clock time the run started (RFC 3339).
    pub started: String,
    /// Wall-clock minus monotonic time (ns): kernel timestamps → wall-clock time.
    pub clock_offset_ns: i64,
    /// UDP ports watched.
    pub ports: Vec<u16>,
    /// The probe plan in force, as `tracer probes` prints it.
    pub plan: Vec<String>,
    /// The plan's netfilter source reports resolved clashes per packet (the replay's
    /// counter findings wait for them as the live run's did).
    #[serde(default)]
    pub clashes_per_packet: bool,
    /// The correlator's settings (a replay uses the same).
    pub lookups: lookups::Config,
    /// The command line.
    pub command: Vec<String>,
}

/// Every line a replay reads. The lines the live run printed (findings, lookups, the
/// summary: `tracer watch --json` objects) are in the trace as well, and replays skip them.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum Line {
    Trace(Header),
    /// After the header of a segment other than the first: the explainer's books.
    Books {
        books: Books,
    },
    /// One ring-buffer record: `len` bytes, of which `data` (base64) holds the leading
    /// ones the decoder reads; the rest were zero-filled or unused.
    Record {
        seq: u64,
        len: u32,
        data: String,
    },
    /// The counters were read and the correlator's clock advanced to `now_ns`.
    Poll {
        now_ns: u64,
    },
    /// The ring buffer's loss counters were read at `to_ns` (after the records before this
    /// line): `lost_per_cpu` lost since the previous reading at `from_ns`.
    Loss {
        from_ns: u64,
        to_ns: u64,
        lost_per_cpu: Vec<u64>,
        /// Records read but not processed (at a stop, past its time bound).
        #[serde(default, skip_serializing_if = "is_zero")]
        skipped: u64,
    },
    /// The end of the run: the last reading, and what the ring buffer lost.
    Finish {
        now_ns: u64,
        lost: u64,
        lost_per_cpu: Vec<u64>,
    },
    // The node's answers, right after the line that asked.
    Baselines {
        netns: Vec<NetnsStats>,
    },
    /// Namespaces found at a poll (only when there were some), with their books' start.
    Discovered {
        netns: Vec<NetnsStats>,
    },
    Track {
        path: PathBuf,
        netns: Option<u32>,
        stats: Option<CpuStats>,
        error: Option<String>,
    },
    Counters {
        netns: u32,
        reborn: bool,
        stats: Option<CpuStats>,
    },
    Winner {
        netns: u32,
        reborn: bool,
        dir: TupleDir,
        key: FiveTuple,
        entry: Option<CtEntry>,
        error: Option<String>,
    },
    Symbol {
        addr: u64,
        name: String,
    },
    Workload {
        cgroup_id: u64,
        netns: u32,
        pid: Option<u32>,
        workload: Arc<Workload>,
    },
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct NetnsStats {
    pub netns: u32,
    pub stats: CpuStats,
}

impl NetnsStats {
    pub(crate) fn list(v: &[(u32, CpuStats)]) -> Vec<NetnsStats> {
        v.iter()
            .map(|(n, s)| NetnsStats {
                netns: *n,
                stats: s.clone(),
            })
            .collect()
    }

    pub(crate) fn pairs(v: &[NetnsStats]) -> Vec<(u32, CpuStats)> {
        v.iter().map(|n| (n.netns, n.stats.clone())).collect()
    }
}

/// `type`s of the lines the live run printed; a replay skips them.
pub const OUTPUT_TYPES: &[&str] = &[
    "finding",
    "lookup",
    "summary",
    "decode_error",
    "dns_send",
    "dns_recv",
    "nf_drop",
    "ct_clash",
];

/// The bytes of a record the decoder reads: everything up to the end of the captured
/// payload. The rest of a record is never read (and the kernel need not have written it).
pub fn significant(bytes: &[u8]) -> &[u8] {
    use tracer_common::{DnsPacket, EventKind, Header as RecHeader, NfEvent};
    fn cut<T>(bytes: &[u8], payload_at: usize, cap_len_at: usize, cap: usize) -> usize {
        if bytes.len() < size_of::<T>() {
            return bytes.len();
        }
        let raw = [
            bytes[cap_len_at],
            bytes[cap_len_at + 1],
            bytes[cap_len_at + 2],
            bytes[cap_len_at + 3],
        ];
        let cap_len = u32::from_ne_bytes(raw) as usize;
        // A bad cap_len is kept whole: the decoder will say what is wrong with it.
        if cap_len > cap {
            bytes.len()
        } else {
            payload_at + cap_len
        }
    }
    if bytes.len() < size_of::<RecHeader>() {
        return bytes;
    }
    let kind = u32::from_ne_bytes([bytes[0], bytes[1], bytes[2], bytes[3]]);
    let end = match EventKind::from_u32(kind) {
        // Two DNS record sizes, one head: the length says the capacity.
        Some(EventKind::DnsSend | EventKind::DnsRecv)
            if bytes.len() == size_of::<tracer_common::DnsPacketSmall>() =>
        {
            cut::<tracer_common::DnsPacketSmall>(
                bytes,
                std::mem::offset_of!(tracer_common::DnsPacketSmall, payload),
                std::mem::offset_of!(tracer_common::DnsPacketSmall, cap_len),
                tracer_common::DNS_PAYLOAD_SMALL,
            )
        }
        Some(EventKind::DnsSend | EventKind::DnsRecv) => cut::<DnsPacket>(
            bytes,
            std::mem::offset_of!(DnsPacket, payload),
            std::mem::offset_of!(DnsPacket, cap_len),
            tracer_common::DNS_PAYLOAD_CAP,
        ),
        Some(EventKind::NfDrop | EventKind::CtClash) => cut::<NfEvent>(
            bytes,
            std::mem::offset_of!(NfEvent, payload),
            std::mem::offset_of!(NfEvent, cap_len),
            tracer_common::DROP_PAYLOAD_CAP,
        ),
        None => bytes.len(),
    };
    &bytes[..end.min(bytes.len())]
}

pub fn encode_record(seq: u64, bytes: &[u8]) -> Line {
    Line::Record {
        seq,
        len: bytes.len() as u32,
        data: base64::engine::general_purpose::STANDARD.encode(significant(bytes)),
    }
}

/// The record a `Record` line stands for (zero-filled to its length).
pub fn decode_record(len: u32, data: &str) -> Result<Vec<u8>, String> {
    let mut bytes = base64::engine::general_purpose::STANDARD
        .decode(data)
        .map_err(|e| format!("record data is not base64: {e}"))?;
    if bytes.len() > len as usize {
        return Err(format!(
            "record data holds {} bytes, more than its length {len}",
            bytes.len()
        ));
    }
    bytes.resize(len as usize, 0);
    Ok(bytes)
}

/// Size limit and rotation of a trace.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Rotation {
    /// A segment is closed once it holds this many bytes (`None`: one file, no limit).
    pub max_bytes: Option<u64>,
    /// Closed segments kept (`FILE.1` newest … `FILE.<keep>`); older ones are deleted.
    pub keep: u32,
}

/// Writes a trace; shared (`Shared`) by the run loop and the recording node.
pub struct TraceWriter {
    path: PathBuf,
    file: File,
    buf: Vec<u8>,
    /// Bytes in the current segment's file.
    size: u64,
    rotation: Rotation,
    header: Header,
    seq: u64,
    /// The first write error; every later write is refused with it.
    error: Option<String>,
}

/// The buffer is written out once it holds this much (a batch of whole lines).
const COMMIT_AT: usize = 64 * 1024;

pub type Shared = Arc<Mutex<TraceWriter>>;

/// Locks the writer (a panic elsewhere does not make the trace unwritable).
pub fn lock(t: &Shared) -> MutexGuard<'_, TraceWriter> {
    t.lock().unwrap_or_else(|e| e.into_inner())
}

/// Refuses a path that can not be written, before anything is loaded.
pub fn check_path(path: &Path) -> anyhow::Result<()> {
    if path.is_dir() {
        anyhow::bail!("trace output {} is a directory", path.display());
    }
    crate::session::check_writable_parent(path)
}

impl TraceWriter {
    /// Creates (truncates) `path` and writes the first header.
    pub fn create(path: &Path, header: Header, rotation: Rotation) -> anyhow::Result<Self> {
        use anyhow::Context as _;
        let file = File::create(path)
            .with_context(|| format!("creating trace output {}", path.display()))?;
        let mut w = TraceWriter {
            path: path.to_owned(),
            file,
            buf: Vec::with_capacity(COMMIT_AT * 2),
            size: 0,
            rotation,
            header,
            seq: 0,
            error: None,
        };
        let h = w.header.clone();
        w.line(&Line::Trace(h));
        w.commit()
            .with_context(|| format!("writing trace output {}", path.display()))?;
        Ok(w)
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    pub fn header(&self) -> &Header {
        &self.header
    }

    /// Appends one line to the buffer.
    pub fn line<T: Serialize>(&mut self, v: &T) {
        // Serializing our own types into memory does not fail.
        if serde_json::to_writer(&mut self.buf, v).is_ok() {
            self.buf.push(b'\n');
        }
    }

    /// Appends a raw ring-buffer record.
    pub fn record(&mut self, bytes: &[u8]) {
        let l = encode_record(self.seq, bytes);
        self.seq += 1;
        self.line(&l);
    }

    /// The segment being written.
    pub fn segment(&self) -> u32 {
        self.header.segment
    }

    /// Writes the buffered lines when there are many. Call between units (a record with
    /// its answers and outputs, a poll): a batch never splits one.
    pub fn commit_if_large(&mut self) -> io::Result<()> {
        if self.buf.len() >= COMMIT_AT {
            self.commit()
        } else {
            Ok(())
        }
    }

    /// Writes the buffered lines (whole lines only: the buffer holds nothing else).
    pub fn commit(&mut self) -> io::Result<()> {
        if let Some(e) = &self.error {
            return Err(io::Error::other(e.clone()));
        }
        if self.buf.is_empty() {
            return Ok(());
        }
        match self.file.write_all(&self.buf) {
            Ok(()) => {
                self.size += self.buf.len() as u64;
                self.buf.clear();
                Ok(())
            }
            Err(e) => {
                let msg = format!("writing trace {}: {e}", self.path.display());
                self.error = Some(msg.clone());
                Err(io::Error::new(e.kind(), msg))
            }
        }
    }

    /// Whether the segment reached its size limit.
    pub fn full(&self) -> bool {
        self.rotation
            .max_bytes
            .is_some_and(|max| self.size + self.buf.len() as u64 >= max)
    }

    /// Closes the segment and starts the next with a header and `books`.
    pub fn rotate(&mut self, books: Books) -> io::Result<()> {
        self.commit()?;
        self.file.sync_all()?;
        let keep = self.rotation.keep;
        let numbered = |n: u32| {
            let mut p = self.path.clone().into_os_string();
            p.push(format!(".{n}"));
            PathBuf::from(p)
        };
        if keep == 0 {
            fs::remove_file(&self.path)?;
        } else {
            let _ = fs::remove_file(numbered(keep));
            for n in (1..keep).rev() {
                match fs::rename(numbered(n), numbered(n + 1)) {
                    Err(e) if e.kind() != io::ErrorKind::NotFound => return Err(e),
                    _ => {}
                }
            }
            fs::rename(&self.path, numbered(1))?;
        }
        self.file = File::create(&self.path)?;
        self.size = 0;
        self.header.segment += 1;
        let h = self.header.clone();
        self.line(&Line::Trace(h));
        self.line(&Line::Books { books });
        self.commit()
    }

    /// Writes what is buffered and syncs it to disk.
    pub fn close(&mut self) -> io::Result<()> {
        self.commit()?;
        self.file.sync_all()
    }

    /// The first write error, if any.
    pub fn error(&self) -> Option<&str> {
        self.error.as_deref()
    }
}

/// Lines the live run prints go into the trace through this (`Printer` writes pieces of a
/// line; the buffer is written out only by [`TraceWriter::commit`], whole lines only).
pub struct TraceOut(pub Shared);

impl Write for TraceOut {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        lock(&self.0).buf.extend_from_slice(buf);
        Ok(buf.len())
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

/// Most pods remembered as written per segment; past that the memory starts over (and
/// pods are written again as they are seen).
const MAX_REMEMBERED: usize = 65_536;

/// A node whose every answer is also written to the trace.
pub struct Recording {
    inner: Box<dyn Node>,
    trace: Shared,
    /// The segment the memories below are about.
    segment: u32,
    workloads: HashMap<(u64, u32, Option<u32>), Arc<Workload>>,
    symbols: HashSet<u64>,
}

impl Recording {
    pub fn new(inner: Box<dyn Node>, trace: Shared) -> Self {
        let segment = lock(&trace).segment();
        Recording {
            inner,
            trace,
            segment,
            workloads: HashMap::new(),
            symbols: HashSet::new(),
        }
    }

    fn write(&mut self, line: &Line) {
        self.fresh_segment();
        lock(&self.trace).line(line);
    }

    /// A new segment repeats what it needs: forget what was written to the old one.
    fn fresh_segment(&mut self) {
        let seg = lock(&self.trace).segment();
        if seg != self.segment {
            self.segment = seg;
            self.workloads.clear();
            self.symbols.clear();
        }
    }
}

impl Node for Recording {
    fn baselines(&mut self) -> Vec<(u32, CpuStats)> {
        let v = self.inner.baselines();
        self.write(&Line::Baselines {
            netns: NetnsStats::list(&v),
        });
        v
    }

    fn discover(&mut self, known: &dyn Fn(u32) -> bool) -> Vec<(u32, CpuStats)> {
        let v = self.inner.discover(known);
        if !v.is_empty() {
            self.write(&Line::Discovered {
                netns: NetnsStats::list(&v),
            });
        }
        v
    }

    fn forget(&mut self, netns: u32) {
        self.inner.forget(netns);
    }

    fn track(&mut self, path: &Path) -> Result<(u32, CpuStats), String> {
        let r = self.inner.track(path);
        self.write(&Line::Track {
            path: path.to_owned(),
            netns: r.as_ref().ok().map(|(n, _)| *n),
            stats: r.as_ref().ok().map(|(_, s)| s.clone()),
            error: r.as_ref().err().cloned(),
        });
        r
    }

    fn counters(&mut self, netns: u32) -> NsAnswer<Option<CpuStats>> {
        let a = self.inner.counters(netns);
        self.write(&Line::Counters {
            netns,
            reborn: a.reborn,
            stats: a.value.clone(),
        });
        a
    }

    fn winner(
        &mut self,
        netns: u32,
        dir: TupleDir,
        key: &FiveTuple,
    ) -> NsAnswer<Result<Option<CtEntry>, String>> {
        let a = self.inner.winner(netns, dir, key);
        self.write(&Line::Winner {
            netns,
            reborn: a.reborn,
            dir,
            key: *key,
            entry: a.value.as_ref().ok().cloned().flatten(),
            error: a.value.as_ref().err().cloned(),
        });
        a
    }

    fn symbol(&mut self, addr: u64) -> String {
        let name = self.inner.symbol(addr);
        self.fresh_segment();
        if self.symbols.len() >= MAX_REMEMBERED {
            self.symbols.clear();
        }
        if self.symbols.insert(addr) {
            self.write(&Line::Symbol {
                addr,
                name: name.clone(),
            });
        }
        name
    }

    fn workload(&mut self, cgroup_id: u64, netns: u32, pid: Option<u32>) -> Arc<Workload> {
        let w = self.inner.workload(cgroup_id, netns, pid);
        self.fresh_segment();
        let key = (cgroup_id, netns, pid);
        if self.workloads.get(&key) != Some(&w) {
            if self.workloads.len() >= MAX_REMEMBERED {
                self.workloads.clear();
            }
            self.workloads.insert(key, w.clone());
            self.write(&Line::Workload {
                cgroup_id,
                netns,
                pid,
                workload: w.clone(),
            });
        }
        w
    }
}

#[cfg(test)]
mod tests {
    use tracer_common::{DnsPacket, EventKind, Header as RecHeader, SourceId};

    use super::*;
    use crate::events;

    fn dns_record(payload: &[u8]) -> Vec<u8> {
        let mut r: DnsPacket = unsafe { std::mem::zeroed() };
        r.header = RecHeader {
            kind: EventKind::DnsSend as u32,
            source: SourceId::CgroupSkbEgress as u16,
            ..r.header
        };
        r.payload_len = payload.len() as u32;
        r.cap_len = payload.len() as u32;
        r.payload[..payload.len()].copy_from_slice(payload);
        let mut bytes = events::encode::dns(&r);
        // What the kernel left past the capture: never read.
        for b in &mut bytes[std::mem::offset_of!(DnsPacket, payload) + payload.len()..] {
            *b = 0xAA;
        }
        bytes
    }

    #[test]
    fn a_record_keeps_what_the_decoder_reads() {
        let bytes = dns_record(b"\x12\x34\x01\x00\x00\x01");
        let Line::Record { len, data, .. } = encode_record(7, &bytes) else {
            unreachable!()
        };
        assert_eq!(len as usize, bytes.len());
        let back = decode_record(len, &data).unwrap();
        assert_eq!(back.len(), bytes.len());
        assert!(
            data.len() < 300,
            "the unused tail is not written ({} base64 chars)",
            data.len()
        );
        assert_eq!(events::decode(&back), events::decode(&bytes));
    }

    #[test]
    fn short_and_unknown_records_are_kept_whole() {
        for bytes in [vec![1u8, 2, 3], vec![0xEEu8; 40]] {
            let Line::Record { len, data, .. } = encode_record(0, &bytes) else {
                unreachable!()
            };
            assert_eq!(decode_record(len, &data).unwrap(), bytes);
        }
        assert!(decode_record(2, "AAAAAA==").is_err());
        assert!(decode_record(8, "not base64!").is_err());
    }

    fn header() -> Header {
        Header {
            schema: SCHEMA,
            tracer: "test".into(),
            run: "r1".into(),
            segment: 0,
            hostname: "node".into(),
            kernel: "6.18".into(),
            started: "2026-11-22T00:00:00Z".into(),
            clock_offset_ns: 5,
            ports: vec![53],
            plan: vec![],
            clashes_per_packet: false,
            lookups: lookups::Config::default(),
            command: vec!["tracer".into()],
        }
    }

    #[test]
    fn books_survive_a_trace_line() {
        let mut books = Books::default();
        let stats = CpuStats {
            insert_failed: 3,
            ..CpuStats::default()
        };
        books.baseline(4_026_531_833, &stats);
        let l = Line::Books { books };
        let back: Line = serde_json::from_str(&serde_json::to_string(&l).unwrap()).unwrap();
        assert_eq!(back, l);
    }

    #[test]
    fn rotation_keeps_whole_lines_and_numbers_segments() {
        let dir = std::env::temp_dir().join(format!("trace-rot-{}", std::process::id()));
        fs::create_dir_all(&dir).unwrap();
        let path = dir.join("t.jsonl");
        let rot = Rotation {
            max_bytes: Some(2000),
            keep: 2,
        };
        let mut w = TraceWriter::create(&path, header(), rot).unwrap();
        for i in 0..400u64 {
            w.line(&Line::Poll { now_ns: i });
            w.commit().unwrap();
            if w.full() {
                w.rotate(Books::default()).unwrap();
            }
        }
        w.close().unwrap();
        let mut segments = Vec::new();
        for p in [dir.join("t.jsonl.2"), dir.join("t.jsonl.1"), path.clone()] {
            let text = fs::read_to_string(&p).unwrap();
            assert!(text.ends_with('\n'));
            let lines: Vec<Line> = text
                .lines()
                .map(|l| serde_json::from_str(l).unwrap())
                .collect();
            let Line::Trace(h) = &lines[0] else {
                panic!("{} starts without a header", p.display())
            };
            segments.push(h.segment);
            if h.segment > 0 {
                assert!(matches!(lines[1], Line::Books { .. }));
            }
        }
        assert!(!dir.join("t.jsonl.3").exists(), "only `keep` segments stay");
        assert_eq!(segments[1] + 1, segments[2]);
        assert_eq!(segments[0] + 1, segments[1]);
        assert!(segments[0] > 0, "older segments were deleted");
        fs::remove_dir_all(&dir).unwrap();
    }
}

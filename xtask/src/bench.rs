//! `cargo xtask bench-filter`: what the kernel-side port filter costs a workload that sends
//! no DNS at all. UDP datagrams to a non-DNS port on loopback, counted over fixed windows,
//! alternating tracer detached / attached in one run (so drift hits both alike); the figure
//! is the ratio of the medians. Needs root (the tracer loads its programs).

use std::{
    fs,
    net::UdpSocket,
    path::Path,
    process::{Child, Command, Stdio},
    thread,
    time::{Duration, Instant},
};

use anyhow::{bail, Context as _};

use crate::util::{self, Workspace};

pub(crate) struct Args {
    pub(crate) seconds: f64,
    pub(crate) rounds: u32,
}

/// Sends 64-byte datagrams on a connected socket for `window`; returns datagrams per second.
fn blast(tx: &UdpSocket, window: Duration) -> anyhow::Result<f64> {
    let payload = [0x5au8; 64];
    let start = Instant::now();
    let mut sent: u64 = 0;
    // Check the clock every 256 sends: cheap, and the loop is bounded by the window.
    while start.elapsed() < window {
        for _ in 0..256 {
            match tx.send(&payload) {
                Ok(_) => sent += 1,
                // A full receive queue on loopback surfaces as ENOBUFS now and then.
                Err(e) if e.raw_os_error() == Some(105) => {}
                Err(e) => return Err(e).context("send"),
            }
        }
    }
    Ok(sent as f64 / start.elapsed().as_secs_f64())
}

struct Tracer(Child);

impl Tracer {
    fn start(bin: &Path, ready: &Path) -> anyhow::Result<Tracer> {
        let _ = fs::remove_file(ready);
        let child = Command::new(bin)
            .args(["watch", "--ready-file"])
            .arg(ready)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .context("starting tracer")?;
        let mut t = Tracer(child);
        let deadline = Instant::now() + Duration::from_secs(30);
        while !ready.exists() {
            if let Some(s) = t.0.try_wait()? {
                bail!("tracer exited with {s} before it was ready (run `tracer watch` by hand to see why)");
            }
            if Instant::now() > deadline {
                bail!("tracer not ready after 30 s");
            }
            thread::sleep(Duration::from_millis(20));
        }
        Ok(t)
    }
}

impl Drop for Tracer {
    fn drop(&mut self) {
        let _ = Command::new("kill")
            .args(["-INT", &self.0.id().to_string()])
            .status();
        let deadline = Instant::now() + Duration::from_secs(10);
        while Instant::now() < deadline {
            if let Ok(Some(_)) = self.0.try_wait() {
                return;
            }
            thread::sleep(Duration::from_millis(20));
        }
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn median(v: &mut [f64]) -> f64 {
    v.sort_by(f64::total_cmp);
    let n = v.len();
    if n % 2 == 1 {
        v[n / 2]
    } else {
        (v[n / 2 - 1] + v[n / 2]) / 2.0
    }
}

pub(crate) fn run(ws: &Workspace, args: &Args) -> anyhow::Result<()> {
    if !util::is_root()? {
        bail!("bench-filter loads eBPF programs: run it as root");
    }
    util::run(
        ws.cargo()?
            .args(["build", "--release", "--package", "tracer"]),
    )?;
    let bin = ws.target_dir().join("release").join("tracer");
    let ready = std::env::temp_dir().join(format!("tracer-bench-{}.ready", std::process::id()));

    // Receiver on an ephemeral (non-DNS) loopback port, drained by a thread as a real
    // application would (on the other core); the loop ends when the socket times out.
    let rx = UdpSocket::bind("127.0.0.1:0")?;
    let drain = rx.try_clone()?;
    drain.set_read_timeout(Some(Duration::from_secs(2)))?;
    let drainer = thread::spawn(move || {
        let mut buf = [0u8; 128];
        while drain.recv(&mut buf).is_ok() {}
    });
    let tx = UdpSocket::bind("127.0.0.1:0")?;
    tx.connect(rx.local_addr()?)?;
    let window = Duration::from_secs_f64(args.seconds);
    println!(
        "bench-filter: 64-byte UDP to {} (not a DNS port), {} rounds of {:.1} s off / on",
        rx.local_addr()?,
        args.rounds,
        args.seconds
    );
    blast(&tx, Duration::from_millis(500))?; // warm-up

    let (mut off, mut on, mut ratios) = (Vec::new(), Vec::new(), Vec::new());
    for round in 1..=args.rounds {
        let a = blast(&tx, window)?;
        let b = {
            let _tracer = Tracer::start(&bin, &ready)?;
            blast(&tx, window)?
        };
        println!(
            "  round {round}: detached {a:>12.0} /s   attached {b:>12.0} /s   ratio {:.3}",
            b / a
        );
        off.push(a);
        on.push(b);
        ratios.push(b / a);
    }
    let _ = fs::remove_file(&ready);
    let _ = drainer.join();
    let (m_off, m_on) = (median(&mut off), median(&mut on));
    let mut sorted = ratios.clone();
    let m_ratio = median(&mut sorted);
    println!(
        "bench-filter: median detached {m_off:.0} /s, attached {m_on:.0} /s; median of the paired \
         ratios attached/detached = {:.1} % (range {:.1}-{:.1} %)",
        100.0 * m_ratio,
        100.0 * sorted[0],
        100.0 * sorted[sorted.len() - 1],
    );
    Ok(())
}

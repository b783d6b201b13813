//! The verbs other than `watch`: small enough to live together.

use std::io::Write as _;

use crate::{btf::KernelBtf, cli, offsets, session::Session};

/// `tracer probes`: apply the whole plan (every source tried), print it, detach.
pub fn probes(cmd: &cli::ProbesCmd) -> anyhow::Result<()> {
    let session = Session::start(&cmd.kernel.session(true))?;
    let mut out = std::io::stdout().lock();
    if cmd.json {
        serde_json::to_writer_pretty(&mut out, &session.plan)?;
        writeln!(out)?;
    } else {
        write!(out, "{}", session.plan.render())?;
    }
    Ok(())
}

/// `tracer offsets`: every struct offset the programs use, and where it came from.
pub fn offsets(opts: &cli::KernelOpts) -> anyhow::Result<()> {
    crate::preflight::check_btf(&opts.btf)?;
    let btf = KernelBtf::from_file(&opts.btf)?;
    print!("{}", offsets::resolve(&btf).report_table());
    Ok(())
}

/// On SIGINT/SIGTERM the guards of a running lab can not run (the signal would end the
/// process), so a thread waits for those signals instead and removes what the lab made.
/// Must run before any other thread exists, so that every thread inherits the mask.
fn cleanup_on_signal(prefix: &'static str) -> anyhow::Result<()> {
    // SAFETY: sigset_t is plain data initialized by sigemptyset; pthread_sigmask and
    // sigwait only read it.
    unsafe {
        let mut set: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&mut set);
        libc::sigaddset(&mut set, libc::SIGINT);
        libc::sigaddset(&mut set, libc::SIGTERM);
        anyhow::ensure!(
            libc::pthread_sigmask(libc::SIG_BLOCK, &set, std::ptr::null_mut()) == 0,
            "blocking SIGINT/SIGTERM"
        );
        std::thread::Builder::new()
            .name("lab-signals".into())
            .spawn(move || {
                let mut sig = 0;
                if libc::sigwait(&set, &mut sig) == 0 {
                    eprintln!("lab: signal {sig}: removing the lab's namespaces");
                    let removed = crate::netns::remove_own(prefix);
                    let cgroups = crate::lab::kubepods::remove_own();
                    eprintln!(
                        "lab: removed {} namespaces and {} pod cgroup trees",
                        removed.len(),
                        cgroups.len()
                    );
                    std::process::exit(128 + sig);
                }
            })?;
    }
    Ok(())
}

/// `tracer lab <scenario>`: build, drive, check, clean up; exit status 1 on a mismatch.
pub fn lab(cmd: &cli::LabCmd) -> anyhow::Result<()> {
    cleanup_on_signal(crate::lab::topology::PREFIX)?;
    let live = (!cmd.quiet).then(|| {
        let printer = crate::output::Printer::new(
            std::io::stdout(),
            cmd.json,
            crate::output::Clock::now(),
            crate::kallsyms::Symbols::new("/proc/kallsyms"),
        );
        crate::lab::live_printer(printer)
    });
    let report = crate::lab::run(&cmd.args(), live)?;
    let mut out = std::io::stdout().lock();
    if cmd.json {
        let mut v = serde_json::to_value(&report)?;
        if let serde_json::Value::Object(m) = &mut v {
            m.insert("type".into(), "lab_report".into());
        }
        serde_json::to_writer(&mut out, &v)?;
        writeln!(out)?;
    } else {
        write!(out, "{}", report.render())?;
    }
    let leftovers = crate::netns::leftovers(crate::lab::topology::PREFIX);
    anyhow::ensure!(
        leftovers.is_empty(),
        "namespaces left behind: {leftovers:?}"
    );
    let cgroups = crate::lab::kubepods::leftovers();
    anyhow::ensure!(cgroups.is_empty(), "pod cgroups left behind: {cgroups:?}");
    anyhow::ensure!(
        report.all_checks_ok(),
        "verdicts and kernel counters disagree (see the checks above)"
    );
    Ok(())
}

/// `tracer doctor`: the node audit. `Ok(true)` when something needs attention.
pub fn doctor(cmd: &cli::DoctorCmd) -> anyhow::Result<bool> {
    let report = crate::doctor::run(&cmd.options())?;
    let mut out = std::io::stdout().lock();
    if cmd.json {
        serde_json::to_writer_pretty(&mut out, &report)?;
        writeln!(out)?;
    } else {
        write!(out, "{}", report.render_text())?;
    }
    Ok(report.exit_code() != 0)
}

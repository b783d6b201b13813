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

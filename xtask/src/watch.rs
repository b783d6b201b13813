//! `cargo xtask watch -- <args>` and `cargo xtask demo -- <args>`: setup, release build, then
//! become `tracer watch <args>` or `tracer lab snat-race --rounds 100 <args>`.

use std::{os::unix::process::CommandExt as _, process::Command};

use anyhow::Context as _;

use crate::{
    setup,
    util::{self, Workspace},
};

pub(crate) fn run(ws: &Workspace, args: &[String]) -> anyhow::Result<()> {
    exec_tracer(ws, "watch", args)
}

/// `cargo xtask demo -- <args>`: the tracer at work on a quiet machine: `tracer lab
/// snat-race` builds a small cluster in namespaces, provokes the SNAT port race with the
/// tracer watching, streams what it sees and checks its verdicts against the kernel.
pub(crate) fn demo(ws: &Workspace, args: &[String]) -> anyhow::Result<()> {
    let mut lab = vec!["snat-race".to_string(), "--rounds".into(), "100".into()];
    lab.extend(args.iter().cloned());
    exec_tracer(ws, "lab", &lab)
}

/// Setup, release build, then become `tracer <verb> <args>`.
fn exec_tracer(ws: &Workspace, verb: &str, args: &[String]) -> anyhow::Result<()> {
    setup::run(ws)?;
    util::run(
        ws.cargo()?
            .args(["build", "--release", "--package", "tracer"]),
    )?;
    let tracer = ws.target_dir().join("release").join("tracer");
    println!("+ {} {verb} {}", tracer.display(), args.join(" "));
    let err = Command::new(&tracer).arg(verb).args(args).exec();
    Err(err).with_context(|| format!("failed to exec {}", tracer.display()))
}

//! `cargo xtask watch -- <args>`: setup, release build, then become `tracer watch <args>`.

use std::{os::unix::process::CommandExt as _, process::Command};

use anyhow::Context as _;

use crate::{
    setup,
    util::{self, Workspace},
};

pub(crate) fn run(ws: &Workspace, args: &[String]) -> anyhow::Result<()> {
    setup::run(ws)?;
    util::run(
        ws.cargo()?
            .args(["build", "--release", "--package", "tracer"]),
    )?;
    let tracer = ws.target_dir().join("release").join("tracer");
    println!("+ {} watch {}", tracer.display(), args.join(" "));
    let err = Command::new(&tracer).arg("watch").args(args).exec();
    Err(err).with_context(|| format!("failed to exec {}", tracer.display()))
}

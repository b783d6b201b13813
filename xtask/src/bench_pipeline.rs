//! `cargo xtask bench-pipeline`: the userspace event path on one core. Runs the `pipeline`
//! bench of the tracer crate twice: throughput per stage (decode, + pod enrichment, +
//! lookup correlation), then resident memory under a 50k lookups/s synthetic stream and
//! under hostile streams (each in its own process). No root needed: the node is a fake
//! tree in a temporary directory. Figures: docs/benchmarks.md.

use crate::util::{self, Workspace};

pub(crate) fn run(ws: &Workspace, args: &[String]) -> anyhow::Result<()> {
    for mode in ["throughput", "memory"] {
        util::run(
            ws.cargo()?
                .args([
                    "bench",
                    "--package",
                    "tracer",
                    "--bench",
                    "pipeline",
                    "--",
                    mode,
                ])
                .args(args),
        )?;
    }
    Ok(())
}

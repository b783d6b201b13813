use std::process::ExitCode;

use clap::Parser as _;
use tracer::cli::{Cli, Command};

fn main() -> ExitCode {
    env_logger::Builder::from_env(env_logger::Env::default().default_filter_or("info")).init();
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Watch(cmd) => tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .map_err(anyhow::Error::from)
            .and_then(|rt| rt.block_on(tracer::watch::run(cmd.into_args()))),
        Command::Record(cmd) => tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .map_err(anyhow::Error::from)
            .and_then(|rt| rt.block_on(tracer::bundle::record(cmd))),
        Command::Replay(cmd) => tracer::replay::command(cmd),
        Command::Report(cmd) => tracer::bundle::report(&cmd),
        Command::Probes(cmd) => tracer::commands::probes(&cmd),
        Command::Offsets(opts) => tracer::commands::offsets(&opts),
        Command::Lab(cmd) => tracer::commands::lab(&cmd),
        Command::Doctor(cmd) => match tracer::commands::doctor(&cmd) {
            // Findings that need attention: status 1, like a linter.
            Ok(true) => return ExitCode::from(1),
            other => other.map(drop),
        },
        Command::LabClient(cmd) => tracer::lab::client::run_child(cmd.request()),
        Command::LoadGen(cmd) => tracer::lab::load::run(cmd),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

//! `granule logs`: the stored stdout/stderr of a stage's fragments.

use super::StageArg;
use crate::{BadInput, EXIT_DONE};
use anyhow::Result;

#[derive(clap::Args)]
pub(crate) struct LogsArgs {
    #[command(flatten)]
    stage: StageArg,
    /// Only this fragment.
    #[arg(long)]
    fragment: Option<i64>,
}

/// Prints each fragment's stored stdout and stderr under a header naming it.
pub(crate) fn logs(args: LogsArgs) -> Result<u8> {
    let (mut store, job) = args.stage.open()?;
    let logs = store.logs(&job, &args.stage.stage, args.fragment)?;
    if logs.is_empty() {
        return Err(BadInput(format!(
            "no fragments recorded for stage \"{}\" of job \"{job}\"",
            args.stage.stage
        ))
        .into());
    }
    for log in logs {
        let cause = log
            .detail
            .or(log.cause)
            .map(|c| format!(": {c}"))
            .unwrap_or_default();
        println!(
            "== fragment {} [{}, {}) {}{cause} ==",
            log.fragment, log.start, log.end, log.state
        );
        for (name, bytes) in [("stdout", &log.stdout), ("stderr", &log.stderr)] {
            if !bytes.is_empty() {
                println!("-- {name} --");
                print!("{}", String::from_utf8_lossy(bytes));
                if !bytes.ends_with(b"\n") {
                    println!();
                }
            }
        }
    }
    Ok(EXIT_DONE)
}

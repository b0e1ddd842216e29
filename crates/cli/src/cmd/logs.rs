//! `granule logs`: the stored stdout/stderr of a stage's fragments.

use super::{job_with_stage, open_store, StateArg};
use crate::{BadInput, EXIT_DONE};
use anyhow::Result;

#[derive(clap::Args)]
pub(crate) struct LogsArgs {
    /// The stage.
    stage: String,
    #[command(flatten)]
    state: StateArg,
    /// The job (default: the latest job that has this stage).
    #[arg(long)]
    job: Option<String>,
    /// Only this fragment.
    #[arg(long)]
    fragment: Option<i64>,
}

/// Prints each fragment's stored stdout and stderr under a header naming it.
pub(crate) fn logs(args: LogsArgs) -> Result<u8> {
    let mut store = open_store(&args.state)?;
    let job = job_with_stage(store.as_mut(), args.job, &args.stage)?;
    let logs = store.logs(&job, &args.stage, args.fragment)?;
    if logs.is_empty() {
        return Err(BadInput(format!(
            "no fragments recorded for stage \"{}\" of job \"{job}\"",
            args.stage
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

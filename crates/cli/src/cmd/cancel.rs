//! `granule cancel`: stop a job; its done items are kept.

use super::{open_store, StateArg};
use crate::{host, BadInput, EXIT_DONE};
use anyhow::Result;

#[derive(clap::Args)]
pub(crate) struct CancelArgs {
    /// The job.
    job: String,
    #[command(flatten)]
    state: StateArg,
}

/// Cancels a running job; exit 2 if it is not running.
pub(crate) fn cancel(args: CancelArgs) -> Result<u8> {
    let mut store = open_store(&args.state)?;
    if !store.cancel(&args.job, host::now_ms())? {
        return Err(BadInput(format!(
            "job \"{}\" is not running (see granule status)",
            args.job
        ))
        .into());
    }
    eprintln!(
        "granule: job \"{}\" cancelled; its running fragments stop at the workers' next flush",
        args.job
    );
    Ok(EXIT_DONE)
}

//! `granule cancel`: stop a job; its done items are kept.

use super::StateArg;
use crate::{host, BadInput, EXIT_DONE};
use anyhow::Result;

#[derive(clap::Args)]
pub(crate) struct CancelArgs {
    /// The job.
    job: String,
    #[command(flatten)]
    state: StateArg,
}

/// Cancels a running job; exit 2 if there is no such job or it is not running.
pub(crate) fn cancel(args: CancelArgs) -> Result<u8> {
    let mut store = super::open_existing_store(&args.state)?;
    if !store.cancel(&args.job, host::now_ms())? {
        let why = match store.job(&args.job)? {
            None => format!(
                "no job named \"{}\" in this store (see granule jobs)",
                args.job
            ),
            Some(job) => format!("job \"{}\" is not running: it is {}", args.job, job.state),
        };
        return Err(BadInput(why).into());
    }
    eprintln!(
        "granule: job \"{}\" cancelled; its running fragments stop at the workers' next flush",
        args.job
    );
    Ok(EXIT_DONE)
}

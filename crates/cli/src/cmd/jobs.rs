//! `granule jobs`, `granule wait` and `granule retry`: the list of jobs, waiting
//! for one to end, and running its quarantined items again.

use super::{open_existing_store, plural, StateArg};
use crate::{host, BadInput, EXIT_DONE};
use anyhow::Result;
use granule_store::JobState;
use std::time::{Duration, Instant};

#[derive(clap::Args)]
pub(crate) struct JobsArgs {
    #[command(flatten)]
    state: StateArg,
    /// Machine-readable output.
    #[arg(long)]
    json: bool,
}

/// Lists the jobs of the store, oldest first, with their progress.
pub(crate) fn jobs(args: JobsArgs) -> Result<u8> {
    let mut store = open_existing_store(&args.state)?;
    let jobs = store.job_list()?;
    let mut rows = Vec::new();
    for job in jobs {
        let stages = store.progress(job.id)?;
        let items: u64 = stages.iter().map(|s| s.items).sum();
        let done: u64 = stages.iter().map(|s| s.done).sum();
        let quarantined: u64 = stages.iter().map(|s| s.quarantined).sum();
        rows.push((job, items, done, quarantined));
    }
    if args.json {
        let list: Vec<_> = rows
            .iter()
            .map(|(job, items, done, quarantined)| {
                serde_json::json!({
                    "name": job.name, "state": job.state, "created_ms": job.created_ms,
                    "finished_ms": job.finished_ms, "error": job.error, "stages": job.stages,
                    "items": items, "done": done, "quarantined": quarantined,
                })
            })
            .collect();
        println!("{}", serde_json::json!({ "jobs": list }));
        return Ok(EXIT_DONE);
    }
    if rows.is_empty() {
        println!("no jobs in {}", args.state.state.display());
        return Ok(EXIT_DONE);
    }
    let width = rows
        .iter()
        .map(|(j, ..)| j.name.len())
        .max()
        .unwrap_or(4)
        .max(4);
    println!(
        "{:<width$}  {:<9}  {:>21}  {:>11}  submitted",
        "job", "state", "done/items", "quarantined"
    );
    let now = host::now_ms();
    for (job, items, done, quarantined) in &rows {
        println!(
            "{:<width$}  {:<9}  {:>21}  {:>11}  {} ago, {}",
            job.name,
            job.state.as_str(),
            format!("{done}/{items}"),
            quarantined,
            ago(now - job.created_ms),
            plural(job.stages, "stage"),
        );
    }
    Ok(EXIT_DONE)
}

/// `3m 12s` for a span of milliseconds (whole seconds).
fn ago(ms: i64) -> String {
    humantime::format_duration(Duration::from_secs((ms.max(0) / 1000) as u64)).to_string()
}

#[derive(clap::Args)]
pub(crate) struct WaitArgs {
    /// The job.
    job: String,
    #[command(flatten)]
    state: StateArg,
    /// Give up after this long (exit 124, like `timeout`).
    #[arg(long, value_parser = super::duration)]
    timeout: Option<Duration>,
}

/// Exit code of `wait` when `--timeout` ran out first.
const EXIT_TIMEOUT: u8 = 124;

/// Waits until the job is no longer running; exits with the code `run` would have.
pub(crate) fn wait(args: WaitArgs) -> Result<u8> {
    let mut store = open_existing_store(&args.state)?;
    let started = Instant::now();
    loop {
        let Some(job) = store.job(&args.job)? else {
            return Err(BadInput(format!(
                "no job named \"{}\" in this store (see granule jobs)",
                args.job
            ))
            .into());
        };
        if job.state != JobState::Running {
            eprintln!(
                "granule: job \"{}\" {}{}",
                job.name,
                job.state,
                job.error.map(|e| format!(": {e}")).unwrap_or_default()
            );
            return Ok(exit_code(job.state));
        }
        if args.timeout.is_some_and(|t| started.elapsed() >= t) {
            eprintln!("granule: job \"{}\" still running", job.name);
            return Ok(EXIT_TIMEOUT);
        }
        std::thread::sleep(Duration::from_millis(250));
    }
}

/// The exit code of a job that ended in `state`, as `run` gives it.
pub(crate) fn exit_code(state: JobState) -> u8 {
    match state {
        JobState::Running | JobState::Done => EXIT_DONE,
        JobState::Failed => crate::EXIT_QUARANTINED,
        JobState::Cancelled => crate::EXIT_CANCELLED,
        JobState::Refused => crate::EXIT_BAD_INPUT,
        JobState::Halted => crate::EXIT_HALTED,
        JobState::Broken | JobState::Removed => crate::EXIT_BROKEN,
    }
}

#[derive(clap::Args)]
pub(crate) struct RetryArgs {
    /// The job.
    job: String,
    /// Only this stage's quarantined items (default: every stage's).
    stage: Option<String>,
    #[command(flatten)]
    state: StateArg,
}

/// Puts quarantined items back to pending with fresh retries; done work is kept.
pub(crate) fn retry(args: RetryArgs) -> Result<u8> {
    let mut store = open_existing_store(&args.state)?;
    let items = store.retry(&args.job, args.stage.as_deref(), host::now_ms())?;
    let job = store.job(&args.job)?.map(|j| j.state);
    let next = if job == Some(JobState::Running) {
        format!(
            "it runs again: `granule run` its spec here, or workers take it (granule wait {})",
            args.job
        )
    } else {
        "nothing was left to run".to_string()
    };
    eprintln!(
        "granule: {} of job \"{}\" back to pending; {next}",
        plural(items, "quarantined item"),
        args.job
    );
    Ok(EXIT_DONE)
}

//! `granule run`: submit a spec and run it here until it is finished.

use super::submit::submit_job;
use super::{count_signals, open_store, slots, StateArg, TuningArgs};
use crate::{engine, BadInput};
use crate::{
    EXIT_BAD_INPUT, EXIT_BROKEN, EXIT_CANCELLED, EXIT_DONE, EXIT_HALTED, EXIT_INTERRUPTED,
    EXIT_QUARANTINED,
};
use anyhow::{Context, Result};
use granule_spec::JobSpec;
use granule_store::{JobState, Submitted};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

#[derive(clap::Args)]
pub(crate) struct RunArgs {
    /// The job spec (TOML).
    spec: PathBuf,
    #[command(flatten)]
    state: StateArg,
    /// Worker slots (concurrent fragments); default: number of CPUs.
    #[arg(long)]
    slots: Option<u32>,
    /// Discard the stored state of a job of the same name and start over.
    #[arg(long)]
    fresh: bool,
    /// Time a yielding fragment gets after stdin closes before SIGTERM, and after SIGTERM before SIGKILL.
    #[arg(long, default_value = "10s", value_parser = crate::cmd::duration)]
    grace: Duration,
    #[command(flatten)]
    tuning: TuningArgs,
    /// No progress output.
    #[arg(long, short)]
    quiet: bool,
    /// Print the tasks' stdout and stderr as they come, each line labelled
    /// `[stage fragment N]` (batch) or `[stage VALUE]` (per item).
    #[arg(long)]
    output: bool,
    /// Also write the tasks' output to files in this folder: `STAGE/INDEX.stdout`
    /// and `.stderr` per item (per-item stages), `STAGE/fragment-N.stdout` (batch).
    #[arg(long, value_name = "DIR")]
    results: Option<PathBuf>,
    /// Append a tab-separated line per finished fragment to this file (stage,
    /// items, worker, start, seconds, acked, failed, state, failure).
    #[arg(long, value_name = "FILE")]
    joblog: Option<PathBuf>,
}

/// Submits (or resumes) the spec and runs it here; the exit code says how it ended.
pub(crate) fn run(args: RunArgs) -> Result<u8> {
    let spec = granule_spec::load(&args.spec)?;
    let slots = slots(args.slots)?;
    let local = engine::EngineConfig {
        slots,
        ..engine::EngineConfig::default()
    };
    runnable_here(&spec, &engine::offer(&local))?;
    let mut store = open_store(&args.state)?;
    let submitted = submit_job(store.as_mut(), &spec, args.fresh)?;
    if let Submitted::AlreadyFinished(_) = submitted {
        let record = store.job(&spec.name)?.context("job vanished")?;
        let again = match record.state {
            JobState::Failed | JobState::Halted => format!(
                "`granule retry {}` runs its failed items again, --fresh all of it",
                spec.name
            ),
            _ => "use --fresh to run it again".to_string(),
        };
        eprintln!(
            "granule: job \"{}\" already finished ({}); nothing to run: {again}",
            spec.name, record.state
        );
        if let Some(error) = &record.error {
            eprintln!("granule: {error}");
        }
        return Ok(super::jobs::exit_code(record.state));
    }
    if let Submitted::Resumed(_) = submitted {
        eprintln!("granule: resuming job \"{}\"", spec.name);
    }
    let interrupts = count_signals()?;
    let name = spec.name.clone();
    let config = engine::EngineConfig {
        slots,
        flush: args.tuning.flush,
        lease: args.tuning.lease,
        grace: args.grace,
        checkpoint_level: args.tuning.zstd_level,
        blobs: args.tuning.blobs.clone(),
        cache_bytes: args.tuning.cache_mb.saturating_mul(1 << 20),
        shared_store: args.state.store.is_some(),
        state_dir: args.state.state.clone(),
        quiet: args.quiet,
        output: args.output,
        results_dir: args.results.clone(),
        joblog: args.joblog.clone(),
        job: Some((submitted.id(), Arc::new(spec))),
        write_counts: args.tuning.write_counts,
        ..engine::EngineConfig::default()
    };
    Ok(
        match engine::run_worker(store.as_mut(), &config, &interrupts)? {
            engine::Outcome::Done => EXIT_DONE,
            engine::Outcome::Quarantined => {
                eprintln!(
                    "granule: job \"{name}\" finished with quarantined items: `granule status {name}` names them, `granule logs STAGE` shows their output; fix the task, then `granule retry {name}`"
                );
                EXIT_QUARANTINED
            }
            engine::Outcome::Stopped => EXIT_INTERRUPTED,
            engine::Outcome::Cancelled => {
                eprintln!(
                    "granule: job \"{name}\" was cancelled; its done items are kept (granule status {name})"
                );
                EXIT_CANCELLED
            }
            engine::Outcome::Refused(why) => {
                eprintln!("granule: error: job \"{name}\" refused: {why}");
                EXIT_BAD_INPUT
            }
            engine::Outcome::Broken(why) => {
                eprintln!("granule: error: job \"{name}\" stopped: {why}");
                EXIT_BROKEN
            }
            engine::Outcome::Halted(why) => {
                eprintln!("granule: error: job \"{name}\" {why}");
                EXIT_HALTED
            }
        },
    )
}

/// `run` runs a job here: a stage that no slot of this machine could ever take
/// (a GPU, a class, more memory than it has) is refused before anything runs.
fn runnable_here(spec: &JobSpec, offer: &granule_core::WorkerOffer) -> Result<()> {
    for stage in &spec.stages {
        if let Err(misfit) = granule_core::fits(&stage.needs, offer) {
            let misfit = match misfit {
                granule_core::Misfit::Class(class) => format!(
                    "requires class {class}, and `granule run` runs it here as class {}",
                    offer.class
                ),
                granule_core::Misfit::Short(what, need, have) => {
                    format!("needs {need} {what} per fragment; this machine has {have}")
                }
            };
            return Err(BadInput(format!(
                "stage \"{}\" cannot run on this machine: {misfit} (submit it with `granule submit` and start a `granule worker` where it fits)",
                stage.name
            ))
            .into());
        }
    }
    Ok(())
}

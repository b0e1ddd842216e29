//! The `granule` binary: glue between the spec, the store, the runner and the user.

mod cmd;
mod engine;
mod fetch;
mod host;
mod progress;

use clap::{Parser, Subcommand};
use granule_store::StoreError;
use std::process::ExitCode;

/// Exit code: every item done.
pub(crate) const EXIT_DONE: u8 = 0;
/// Exit code: the job finished with quarantined items.
pub(crate) const EXIT_QUARANTINED: u8 = 1;
/// Exit code: bad input (spec, arguments).
pub(crate) const EXIT_BAD_INPUT: u8 = 2;
/// Exit code: granule itself failed (store, IO), or the job's stored state cannot be read.
pub(crate) const EXIT_BROKEN: u8 = 3;
/// Exit code: the job was cancelled (`granule cancel`).
pub(crate) const EXIT_CANCELLED: u8 = 4;
/// Exit code: the job halted: its task failed too often (`halt` in the spec).
pub(crate) const EXIT_HALTED: u8 = 5;
/// Exit code: interrupted (Ctrl-C); the job resumes on the next run.
pub(crate) const EXIT_INTERRUPTED: u8 = 130;

#[derive(Parser)]
#[command(
    name = "granule",
    version,
    about = "Run big batch jobs in adaptive, resumable fragments"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Submit a job spec and run it here until done (resumes an unfinished job).
    Run(cmd::run::RunArgs),
    /// Record a job spec in the store without running it.
    Submit(cmd::submit::SubmitArgs),
    /// Claim and run fragments of any job in the store until the work is done.
    Worker(cmd::worker::WorkerArgs),
    /// Show jobs and their stages.
    Status(cmd::status::StatusArgs),
    /// List the jobs of the store with their state and progress.
    Jobs(cmd::jobs::JobsArgs),
    /// Wait until a job ends; exit with the code `run` would have given.
    Wait(cmd::jobs::WaitArgs),
    /// Put a job's quarantined items back to pending with fresh retries (done work is kept).
    Retry(cmd::jobs::RetryArgs),
    /// Print the stored stdout/stderr of a stage's fragments.
    Logs(cmd::logs::LogsArgs),
    /// Write out a stage's results (the final checkpoint of each finished fragment).
    Results(cmd::results::ResultsArgs),
    /// List a stage's committed outputs (with the upstream item of each), or write them out.
    Outputs(cmd::outputs::OutputsArgs),
    /// Fair share across jobs: set owners' (or accounts') shares and the usage half-life; show each owner's standing.
    Shares(cmd::shares::SharesArgs),
    /// Cancel a job: nothing more of it is claimed, its running fragments are stopped.
    Cancel(cmd::cancel::CancelArgs),
    /// Remove finished jobs from the store, with the files only they referred to.
    Rm(cmd::gc::RmArgs),
    /// Delete blobs (output files) that no job in the store refers to any more.
    Gc(cmd::gc::GcArgs),
    /// Serve the dashboard, HTTP API and /metrics; with --pools, plan the pools and start or drain their workers.
    Serve(cmd::serve::ServeArgs),
    /// Simulate a scenario (pool and workload) in virtual time with the same core.
    Sim(cmd::sim::SimArgs),
    /// Benchmark the store's own path: clients looping claim-one-item -> finish.
    #[command(hide = true)]
    BenchStore(cmd::bench_store::BenchStoreArgs),
}

/// An error that is the user's input, not granule's fault: exit code 2.
#[derive(Debug)]
pub(crate) struct BadInput(pub(crate) String);

impl std::fmt::Display for BadInput {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for BadInput {}

fn main() -> ExitCode {
    let cli = Cli::parse();
    if matches!(
        cli.command,
        Command::Status(_)
            | Command::Jobs(_)
            | Command::Logs(_)
            | Command::Results(_)
            | Command::Outputs(_)
    ) {
        // Printing into a closed pipe (`granule status | head`) ends quietly, as
        // other Unix tools do, instead of panicking.
        // SAFETY: restoring the default disposition of SIGPIPE before any thread exists.
        unsafe { libc::signal(libc::SIGPIPE, libc::SIG_DFL) };
    }
    let result = match cli.command {
        Command::Run(args) => cmd::run::run(args),
        Command::Submit(args) => cmd::submit::submit(args),
        Command::Worker(args) => cmd::worker::worker(args),
        Command::Status(args) => cmd::status::status(args),
        Command::Jobs(args) => cmd::jobs::jobs(args),
        Command::Wait(args) => cmd::jobs::wait(args),
        Command::Retry(args) => cmd::jobs::retry(args),
        Command::Logs(args) => cmd::logs::logs(args),
        Command::Results(args) => cmd::results::results(args),
        Command::Outputs(args) => cmd::outputs::outputs(args),
        Command::Shares(args) => cmd::shares::shares(args),
        Command::Cancel(args) => cmd::cancel::cancel(args),
        Command::Rm(args) => cmd::gc::rm(args),
        Command::Gc(args) => cmd::gc::gc(args),
        Command::Serve(args) => cmd::serve::serve(args),
        Command::Sim(args) => cmd::sim::sim(args),
        Command::BenchStore(args) => cmd::bench_store::bench_store(args),
    };
    match result {
        Ok(code) => ExitCode::from(code),
        Err(err) => {
            let bad_input = err.downcast_ref::<BadInput>().is_some()
                || err.downcast_ref::<granule_spec::SpecError>().is_some()
                || matches!(
                    err.downcast_ref::<StoreError>(),
                    Some(
                        StoreError::SpecChanged(_)
                            | StoreError::NoSuchJob(_)
                            | StoreError::NoSuchStage(..)
                            | StoreError::NotRetryable(..)
                            | StoreError::Running(_)
                    )
                );
            eprintln!("granule: error: {err:#}");
            ExitCode::from(if bad_input {
                EXIT_BAD_INPUT
            } else {
                EXIT_BROKEN
            })
        }
    }
}

//! `granule rm` and `granule gc`: removing finished jobs, and the blobs no job
//! refers to any more.

use super::StateArg;
use crate::{BadInput, EXIT_DONE};
use anyhow::Result;
use granule_exec::DataStore;
use std::collections::HashSet;
use std::time::Duration;

#[derive(clap::Args)]
pub(crate) struct RmArgs {
    /// Jobs to remove (finished, failed or cancelled ones; cancel a running one first).
    #[arg(required = true)]
    jobs: Vec<String>,
    #[command(flatten)]
    state: StateArg,
    /// The blob store (as given to the workers).
    #[arg(long, env = "GRANULE_BLOBS")]
    blobs: Option<String>,
}

/// Deletes jobs with everything the store kept of them, and the blobs (output
/// files, checkpoints stored as files) only they referred to.
pub(crate) fn rm(args: RmArgs) -> Result<u8> {
    let mut store = super::open_existing_store(&args.state)?;
    let location = args
        .blobs
        .clone()
        .unwrap_or_else(|| args.state.state.join("blobs").display().to_string());
    let data = DataStore::open(&location, 3).map_err(|e| BadInput(format!("--blobs: {e}")))?;
    for job in &args.jobs {
        let before: HashSet<String> = store.blob_keys()?.into_iter().collect();
        if !store.remove(job)? {
            return Err(BadInput(format!("no job named \"{job}\" in this store")).into());
        }
        let after: HashSet<String> = store.blob_keys()?.into_iter().collect();
        let (mut removed, mut failed) = (0u64, 0u64);
        for key in before.difference(&after) {
            match data.delete(key) {
                Ok(()) => removed += 1,
                Err(_) => failed += 1,
            }
        }
        let left = if failed > 0 {
            format!("; {failed} could not be deleted now (`granule gc` tries again)")
        } else {
            String::new()
        };
        eprintln!("granule: removed job \"{job}\" and {removed} of its files{left}");
    }
    Ok(EXIT_DONE)
}

#[derive(clap::Args)]
pub(crate) struct GcArgs {
    #[command(flatten)]
    state: StateArg,
    /// The blob store (as given to the workers).
    #[arg(long, env = "GRANULE_BLOBS")]
    blobs: Option<String>,
    /// Only blobs stored at least this long ago go: a running task's output is
    /// stored before the ack that makes a job refer to it.
    #[arg(long, default_value = "1h", value_parser = super::duration)]
    min_age: Duration,
    /// Say what would go, remove nothing.
    #[arg(long)]
    dry_run: bool,
}

/// Removes the blobs no job in the store refers to.
pub(crate) fn gc(args: GcArgs) -> Result<u8> {
    let mut store = super::open_store(&args.state)?;
    let location = args
        .blobs
        .clone()
        .unwrap_or_else(|| args.state.state.join("blobs").display().to_string());
    let data = DataStore::open(&location, 3).map_err(|e| BadInput(format!("--blobs: {e}")))?;
    let keep: HashSet<String> = store.blob_keys()?.into_iter().collect();
    let (mut removed, mut bytes) = (0u64, 0u64);
    for (key, size) in data.aged(args.min_age)? {
        if keep.contains(&key) {
            continue;
        }
        if !args.dry_run {
            data.delete(&key)?;
        }
        removed += 1;
        bytes += size;
    }
    let verb = if args.dry_run {
        "would remove"
    } else {
        "removed"
    };
    eprintln!(
        "granule: gc {verb} {removed} blobs ({:.1} MiB stored) from {location}; {} referred to by jobs kept",
        bytes as f64 / (1 << 20) as f64,
        keep.len()
    );
    Ok(EXIT_DONE)
}

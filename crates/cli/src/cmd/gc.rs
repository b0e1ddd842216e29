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

/// A job's blobs `rm` deletes: those untouched since the job ended (a job running
/// now that stored the same contents, blobs being content-addressed, touched it
/// since); for a job without an end time, those older than this.
const RM_MIN_AGE: Duration = Duration::from_secs(3600);

/// Deletes jobs with everything the store kept of them, and the blobs (output
/// files) only they referred to.
pub(crate) fn rm(args: RmArgs) -> Result<u8> {
    let mut store = super::open_existing_store(&args.state)?;
    // A shared store's files are where its workers put them: only --blobs says.
    let location = match (&args.blobs, &args.state.store) {
        (Some(l), _) => Some(l.clone()),
        (None, None) => Some(args.state.state.join("blobs").display().to_string()),
        (None, Some(_)) => None,
    };
    let data = location.as_deref().map(|l| DataStore::open(l, 3));
    for job in &args.jobs {
        let ended = store
            .job_list()?
            .into_iter()
            .find(|j| &j.name == job)
            .and_then(|j| j.finished_ms);
        let min_age = ended.map_or(RM_MIN_AGE, |at| {
            Duration::from_millis((crate::host::now_ms() - at).max(0) as u64)
        });
        let before: HashSet<String> = store.blob_keys()?.into_iter().collect();
        if !store.remove(job)? {
            return Err(BadInput(format!("no job named \"{job}\" in this store")).into());
        }
        let after: HashSet<String> = store.blob_keys()?.into_iter().collect();
        let gone: Vec<&String> = before.difference(&after).collect();
        let files = match &data {
            _ if gone.is_empty() => String::new(),
            None => format!(
                "; its {} files stay until `granule gc --blobs LOCATION` (give --blobs to rm them with it)",
                gone.len()
            ),
            Some(Err(e)) => format!("; its files stay: the blob store cannot be opened ({e})"),
            Some(Ok(data)) => {
                let old: HashSet<String> = data
                    .aged(min_age)?
                    .into_iter()
                    .map(|(key, _)| key)
                    .collect();
                let (mut removed, mut left) = (0u64, 0u64);
                for key in gone {
                    if old.contains(key) && data.delete(key).is_ok() {
                        removed += 1;
                    } else {
                        left += 1;
                    }
                }
                let left = if left > 0 {
                    format!(" ({left} touched since it ended, or not deletable now, stay for `granule gc`)")
                } else {
                    String::new()
                };
                format!(" and {removed} of its files{left}")
            }
        };
        eprintln!("granule: removed job \"{job}\"{files}");
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

//! `granule results`: a stage's results (the final checkpoint of each chain).

use super::StageArg;
use crate::{EXIT_DONE, EXIT_QUARANTINED};
use anyhow::{Context, Result};
use granule_spec::JobSpec;
use std::path::PathBuf;

#[derive(clap::Args)]
pub(crate) struct ResultsArgs {
    #[command(flatten)]
    stage: StageArg,
    /// Write each result to DIR/fragment-ID instead of concatenating them on stdout.
    #[arg(long)]
    out: Option<PathBuf>,
}

/// Writes a stage's results to stdout (or one file per chain under `--out`); exit 1
/// when the set is incomplete, saying why.
pub(crate) fn results(args: ResultsArgs) -> Result<u8> {
    let (mut store, job) = args.stage.open()?;
    // A result is at most the stage's max_checkpoint: a record claiming more is corrupt.
    let limit = store
        .job(&job)?
        .and_then(|r| serde_json::from_str::<JobSpec>(&r.spec_json).ok())
        .and_then(|spec| spec.stages.into_iter().find(|s| s.name == args.stage.stage))
        .map_or(granule_spec::DEFAULT_MAX_CHECKPOINT_BYTES, |s| {
            s.max_checkpoint_bytes
        });
    let mut stdout = std::io::stdout().lock();
    let mut unreadable = 0u64;
    for result in store.results(&job, &args.stage.stage)? {
        let fragment = result.fragment;
        let blob = crate::engine::sealed(result.blob);
        let raw = match blob.open(limit) {
            Ok(raw) => raw,
            Err(e) => {
                // Said, and counted: the set is incomplete, never silently short.
                eprintln!(
                    "granule: the result of fragment {fragment} (the state of {} items) cannot be read: {e}",
                    result.covers.len()
                );
                unreadable += result.covers.len();
                continue;
            }
        };
        match &args.out {
            Some(dir) => write_new(dir, &format!("fragment-{fragment}"), &raw)?,
            None => {
                use std::io::Write;
                stdout.write_all(&raw)?;
                if !raw.ends_with(b"\n") {
                    stdout.write_all(b"\n")?;
                }
            }
        }
    }
    // Exact or it says so: items whose state is in no result make the set incomplete.
    let missing = store
        .status(Some(&job))?
        .into_iter()
        .flat_map(|j| j.stages)
        .find(|s| s.name == args.stage.stage)
        .map_or(0, |s| s.results_missing)
        + unreadable;
    if missing > 0 {
        eprintln!(
            "granule: the results of stage \"{}\" are incomplete: the state of {missing} done items is in no readable result (see granule status and granule logs {})",
            args.stage.stage, args.stage.stage
        );
        return Ok(EXIT_QUARANTINED);
    }
    Ok(EXIT_DONE)
}

/// Writes `bytes` to `dir/name` without following what is there: a temporary file
/// created new, then renamed over the name (a symlink at the name is replaced, its
/// target untouched).
pub(crate) fn write_new(dir: &std::path::Path, name: &str, bytes: &[u8]) -> Result<()> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    let target = dir.join(name);
    let temp = dir.join(format!(".{name}.{}.tmp", std::process::id()));
    let mut file = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .custom_flags(libc::O_NOFOLLOW)
        .open(&temp)
        .with_context(|| format!("creating {}", temp.display()))?;
    file.write_all(bytes)
        .and_then(|_| file.sync_all())
        .with_context(|| format!("writing {}", temp.display()))?;
    std::fs::rename(&temp, &target).with_context(|| format!("writing {}", target.display()))?;
    Ok(())
}

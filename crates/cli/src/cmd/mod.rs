//! One module per subcommand; what several share lives here: the state and store
//! arguments, opening the store, signals, slots.

pub(crate) mod bench_store;
pub(crate) mod cancel;
pub(crate) mod gc;
pub(crate) mod jobs;
pub(crate) mod logs;
pub(crate) mod outputs;
pub(crate) mod results;
pub(crate) mod run;
pub(crate) mod serve;
pub(crate) mod shares;
pub(crate) mod sim;
pub(crate) mod status;
pub(crate) mod submit;
pub(crate) mod worker;

use crate::BadInput;
use anyhow::{Context, Result};
use granule_store::{PgStore, SqliteStore, Store};
use std::path::PathBuf;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

#[derive(clap::Args, Clone)]
pub(crate) struct StateArg {
    /// State directory (holds the SQLite store, restored checkpoints).
    #[arg(long, default_value = ".granule", env = "GRANULE_STATE")]
    pub(crate) state: PathBuf,
    /// Shared store instead of the embedded one: `postgres://user@host/db`.
    #[arg(long, env = "GRANULE_STORE")]
    pub(crate) store: Option<String>,
}

/// How a worker talks to the store and stores checkpoints (`run` and `worker`).
#[derive(clap::Args)]
pub(crate) struct TuningArgs {
    /// How often acks are flushed to the store (the heartbeat, which renews leases).
    #[arg(long, default_value = "100ms", value_parser = crate::cmd::duration)]
    pub(crate) flush: Duration,
    /// Lease length: a worker silent this long loses its fragments.
    #[arg(long, default_value = "30s", value_parser = crate::cmd::duration)]
    pub(crate) lease: Duration,
    /// zstd level of stored checkpoints (1 fast .. 19 small).
    #[arg(long, default_value_t = 3, value_parser = clap::value_parser!(i32).range(1..=19))]
    pub(crate) zstd_level: i32,
    /// Print the rows the store wrote per claim, flush and finish at exit (benchmarks).
    #[arg(long, hide = true)]
    pub(crate) write_counts: bool,
    /// Where output files go: a folder (shared by the hosts that run the job), or
    /// `s3://bucket/prefix` with credentials and endpoint from the `AWS_*`
    /// environment. Default: `blobs` in the state directory.
    #[arg(long, env = "GRANULE_BLOBS")]
    pub(crate) blobs: Option<String>,
    /// Bound of this host's cache of fetched blobs, MiB.
    #[arg(long, default_value_t = 4096)]
    pub(crate) cache_mb: u64,
}

/// The store named by `--store`, or the SQLite file in the state directory.
pub(crate) fn open_store(args: &StateArg) -> Result<Box<dyn Store + Send>> {
    let state = &args.state;
    std::fs::create_dir_all(state)
        .with_context(|| format!("creating state directory {}", state.display()))?;
    match args.store.as_deref() {
        Some(url) if url.starts_with("postgres://") || url.starts_with("postgresql://") => {
            let store =
                PgStore::open(url).with_context(|| format!("opening store {}", redact(url)))?;
            Ok(Box::new(store))
        }
        Some(other) => Err(BadInput(format!(
            "--store {:?}: expected a postgres:// URL",
            redact(other)
        ))
        .into()),
        None => {
            let path = state.join("granule.db");
            let store = SqliteStore::open(&path)
                .with_context(|| format!("opening store {}", path.display()))?;
            Ok(Box::new(store))
        }
    }
}

/// Where no store exists yet, the message saying so: an embedded store whose
/// file is missing (a shared store always exists).
pub(crate) fn missing_store(args: &StateArg) -> Option<String> {
    (args.store.is_none() && !args.state.join("granule.db").exists()).then(|| {
        format!(
            "no granule store in {} (run a job here first, or give --state or --store)",
            args.state.display()
        )
    })
}

/// The store to read from: like [`open_store`], but an embedded store that does
/// not exist yet is bad input instead of a new empty file (`status` in the wrong
/// folder must not leave a `.granule` behind).
pub(crate) fn open_existing_store(args: &StateArg) -> Result<Box<dyn Store + Send>> {
    if let Some(missing) = missing_store(args) {
        return Err(BadInput(missing).into());
    }
    open_store(args)
}

/// A duration argument (`30s`, `5m`, `1h30m`), with an error that says what one
/// looks like.
pub(crate) fn duration(text: &str) -> std::result::Result<Duration, String> {
    humantime::parse_duration(text.trim()).map_err(|_| {
        format!("\"{text}\" is not a duration: give a number with a unit, such as 90s, 5m or 1h30m")
    })
}

/// `1 stage`, `2 stages`.
pub(crate) fn plural(n: u64, what: &str) -> String {
    if n == 1 {
        format!("1 {what}")
    } else {
        format!("{n} {what}s")
    }
}

/// A store URL without its password, for messages: the user info loses what
/// follows its first `:`, and `password=` parameters their value, however
/// malformed the rest of the URL is.
fn redact(url: &str) -> String {
    let mut out = match (url.find("://"), url.rfind('@')) {
        (Some(scheme), Some(at)) if at > scheme => {
            let userinfo = &url[scheme + 3..at];
            let user = userinfo.split(':').next().unwrap_or("");
            let hidden = if userinfo.contains(':') { ":***" } else { "" };
            format!("{}{user}{hidden}@{}", &url[..scheme + 3], &url[at + 1..])
        }
        (None, Some(at)) => format!("***@{}", &url[at + 1..]),
        _ => url.to_string(),
    };
    while let Some(at) = out.to_ascii_lowercase().find("password=") {
        let start = at + "password=".len();
        let end = out[start..]
            .find(['&', ' '])
            .map_or(out.len(), |i| start + i);
        out.replace_range(at..end, "pass***");
    }
    out
}

/// A stage named on the command line, with the store and the job it belongs to
/// (`logs`, `results`).
#[derive(clap::Args)]
pub(crate) struct StageArg {
    /// The stage.
    pub(crate) stage: String,
    #[command(flatten)]
    pub(crate) state: StateArg,
    /// The job (default: the latest job that has this stage).
    #[arg(long)]
    pub(crate) job: Option<String>,
}

impl StageArg {
    /// The store, and the job named (or the latest one that has the stage).
    pub(crate) fn open(&self) -> Result<(Box<dyn Store + Send>, String)> {
        let mut store = open_existing_store(&self.state)?;
        let job = job_with_stage(store.as_mut(), self.job.clone(), &self.stage)?;
        Ok((store, job))
    }
}

/// The named job, or the latest job that has a stage called `stage`.
fn job_with_stage(store: &mut dyn Store, job: Option<String>, stage: &str) -> Result<String> {
    match job {
        Some(job) => Ok(job),
        None => Ok(store
            .status(None)?
            .into_iter()
            .rev()
            .find(|j| j.stages.iter().any(|s| s.name == stage))
            .map(|j| j.name)
            .ok_or_else(|| BadInput(format!("no job has a stage named \"{stage}\"")))?),
    }
}

/// Counts SIGINT and SIGTERM: the first asks for a clean stop, the second for a kill.
pub(crate) fn count_signals() -> Result<Arc<AtomicUsize>> {
    let interrupts = Arc::new(AtomicUsize::new(0));
    for signal in [signal_hook::consts::SIGINT, signal_hook::consts::SIGTERM] {
        let counter = interrupts.clone();
        // SAFETY: the handler only increments an atomic, which is async-signal-safe.
        unsafe {
            signal_hook::low_level::register(signal, move || {
                counter.fetch_add(1, Ordering::SeqCst);
            })
        }
        .context("installing signal handler")?;
    }
    Ok(interrupts)
}

/// `--slots`, by default the number of CPUs; 0 is refused.
pub(crate) fn slots(arg: Option<u32>) -> Result<u32> {
    let slots =
        arg.unwrap_or_else(|| std::thread::available_parallelism().map_or(1, |n| n.get() as u32));
    if slots == 0 {
        return Err(BadInput("--slots must be at least 1".into()).into());
    }
    Ok(slots)
}

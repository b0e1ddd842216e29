//! The `granule` binary: glue between the spec, the store, the runner and the user.

mod engine;
mod host;
mod progress;
mod sim;

use anyhow::{Context, Result};
use clap::{Parser, Subcommand};
use granule_spec::JobSpec;
use granule_store::{NewJob, NewStage, PgStore, SqliteStore, Store, StoreError, Submitted};
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// Exit code: every item done.
const EXIT_DONE: u8 = 0;
/// Exit code: the job finished with quarantined items.
const EXIT_QUARANTINED: u8 = 1;
/// Exit code: bad input (spec, arguments).
const EXIT_BAD_INPUT: u8 = 2;
/// Exit code: granule itself failed (store, IO), or the job's stored state cannot be read.
const EXIT_BROKEN: u8 = 3;
/// Exit code: the job was cancelled (`granule cancel`).
const EXIT_CANCELLED: u8 = 4;
/// Exit code: interrupted (Ctrl-C); the job resumes on the next run.
const EXIT_INTERRUPTED: u8 = 130;

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
    Run(RunArgs),
    /// Record a job spec in the store without running it.
    Submit(SubmitArgs),
    /// Claim and run fragments of any job in the store until the work is done.
    Worker(WorkerArgs),
    /// Show jobs and their stages.
    Status(StatusArgs),
    /// Print the stored stdout/stderr of a stage's fragments.
    Logs(LogsArgs),
    /// Write out a stage's results (the final checkpoint of each finished fragment).
    Results(ResultsArgs),
    /// Cancel a job: nothing more of it is claimed, its running fragments are stopped.
    Cancel(CancelArgs),
    /// Simulate a scenario (pool and workload) in virtual time with the same core.
    Sim(sim::SimArgs),
    /// Benchmark the store's own path: clients looping claim-one-item -> finish.
    #[command(hide = true)]
    BenchStore(BenchStoreArgs),
}

#[derive(clap::Args)]
struct StateArg {
    /// State directory (holds the SQLite store, restored checkpoints).
    #[arg(long, default_value = ".granule", env = "GRANULE_STATE")]
    state: PathBuf,
    /// Shared store instead of the embedded one: `postgres://user@host/db`.
    #[arg(long, env = "GRANULE_STORE")]
    store: Option<String>,
}

#[derive(clap::Args)]
struct RunArgs {
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
    #[arg(long, default_value = "10s", value_parser = humantime::parse_duration)]
    grace: Duration,
    #[command(flatten)]
    tuning: TuningArgs,
    /// No progress output.
    #[arg(long, short)]
    quiet: bool,
}

/// How a worker talks to the store and stores checkpoints (`run` and `worker`).
#[derive(clap::Args)]
struct TuningArgs {
    /// How often acks are flushed to the store (the heartbeat, which renews leases).
    #[arg(long, default_value = "100ms", value_parser = humantime::parse_duration)]
    flush: Duration,
    /// Lease length: a worker silent this long loses its fragments.
    #[arg(long, default_value = "30s", value_parser = humantime::parse_duration)]
    lease: Duration,
    /// zstd level of stored checkpoints (1 fast .. 19 small).
    #[arg(long, default_value_t = 3, value_parser = clap::value_parser!(i32).range(1..=19))]
    zstd_level: i32,
    /// Print the rows the store wrote per claim, flush and finish at exit (benchmarks).
    #[arg(long, hide = true)]
    write_counts: bool,
}

#[derive(clap::Args)]
struct SubmitArgs {
    /// The job spec (TOML).
    spec: PathBuf,
    #[command(flatten)]
    state: StateArg,
    /// Discard the stored state of a job of the same name and start over.
    #[arg(long)]
    fresh: bool,
}

#[derive(clap::Args)]
struct WorkerArgs {
    #[command(flatten)]
    state: StateArg,
    /// Worker slots (concurrent fragments); default: number of CPUs.
    #[arg(long)]
    slots: Option<u32>,
    /// Wall-clock time this worker has (a walltime, a serverless limit).
    #[arg(long, value_parser = humantime::parse_duration)]
    lifespan: Option<Duration>,
    /// The moment this worker must be gone (RFC 3339 or unix seconds).
    #[arg(long)]
    deadline: Option<String>,
    /// Exit after this long with no work (default: exit once no unfinished job is left).
    #[arg(long, value_parser = humantime::parse_duration)]
    idle_exit: Option<Duration>,
    /// Preemption notice: on SIGTERM, yield everything and exit within this time.
    #[arg(long, default_value = "30s", value_parser = humantime::parse_duration)]
    grace: Duration,
    #[command(flatten)]
    tuning: TuningArgs,
    /// Executor class of this worker (cpu, memory, io, gpu, latency, or any name).
    #[arg(long, default_value = "default")]
    class: String,
    /// What this worker costs per hour (any currency).
    #[arg(long, default_value_t = 0.0)]
    cost: f64,
    /// This worker is spot (preemptible) capacity.
    #[arg(long)]
    spot: bool,
    /// A custom resource this worker has, `NAME=AMOUNT` (repeatable), e.g. `licenses=4`.
    #[arg(long = "resource")]
    resources: Vec<String>,
    /// Print what this worker would declare (detected and declared resources) and exit.
    #[arg(long)]
    describe: bool,
    /// Never ask to split running fragments (for benchmarks comparing with splitting).
    #[arg(long, hide = true)]
    no_steal: bool,
    /// No notes on stderr.
    #[arg(long, short)]
    quiet: bool,
}

#[derive(clap::Args)]
struct StatusArgs {
    /// Only this job.
    job: Option<String>,
    /// Explain where this stage's work can go and why (per live worker).
    #[arg(long, value_name = "STAGE")]
    explain: Option<String>,
    #[command(flatten)]
    state: StateArg,
    /// Machine-readable output.
    #[arg(long)]
    json: bool,
}

#[derive(clap::Args)]
struct LogsArgs {
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

#[derive(clap::Args)]
struct BenchStoreArgs {
    #[command(flatten)]
    state: StateArg,
    /// Concurrent clients (each with its own connection).
    #[arg(long, default_value_t = 32)]
    clients: u32,
    /// How long to run.
    #[arg(long, default_value = "10s", value_parser = humantime::parse_duration)]
    duration: Duration,
}

#[derive(clap::Args)]
struct CancelArgs {
    /// The job.
    job: String,
    #[command(flatten)]
    state: StateArg,
}

#[derive(clap::Args)]
struct ResultsArgs {
    /// The stage.
    stage: String,
    #[command(flatten)]
    state: StateArg,
    /// The job (default: the latest job that has this stage).
    #[arg(long)]
    job: Option<String>,
    /// Write each result to DIR/fragment-ID instead of concatenating them on stdout.
    #[arg(long)]
    out: Option<PathBuf>,
}

/// An error that is the user's input, not granule's fault: exit code 2.
#[derive(Debug)]
struct BadInput(String);

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
        Command::Status(_) | Command::Logs(_) | Command::Results(_)
    ) {
        // Printing into a closed pipe (`granule status | head`) ends quietly, as
        // other Unix tools do, instead of panicking.
        // SAFETY: restoring the default disposition of SIGPIPE before any thread exists.
        unsafe { libc::signal(libc::SIGPIPE, libc::SIG_DFL) };
    }
    let result = match cli.command {
        Command::Run(args) => run(args),
        Command::Submit(args) => submit(args),
        Command::Worker(args) => worker(args),
        Command::Status(args) => status(args),
        Command::Logs(args) => logs(args),
        Command::Results(args) => results(args),
        Command::Cancel(args) => cancel(args),
        Command::Sim(args) => sim::sim(args),
        Command::BenchStore(args) => bench_store(args),
    };
    match result {
        Ok(code) => ExitCode::from(code),
        Err(err) => {
            let bad_input = err.downcast_ref::<BadInput>().is_some()
                || err.downcast_ref::<granule_spec::SpecError>().is_some()
                || matches!(
                    err.downcast_ref::<StoreError>(),
                    Some(StoreError::SpecChanged(_) | StoreError::NoSuchJob(_))
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

/// The store named by `--store`, or the SQLite file in the state directory.
fn open_store(args: &StateArg) -> Result<Box<dyn Store>> {
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

/// The store's view of a spec.
fn new_job(spec: &JobSpec) -> NewJob {
    let index = |name: &String| {
        spec.stages
            .iter()
            .position(|s| &s.name == name)
            .expect("validated")
    };
    NewJob {
        name: spec.name.clone(),
        spec_hash: granule_spec::job_hash(spec),
        spec_json: serde_json::to_string(spec).expect("plain data"),
        stages: spec
            .stages
            .iter()
            .map(|s| NewStage {
                name: s.name.clone(),
                items: s.items.count(),
                after: s.after.iter().map(index).collect(),
                retries: s.retries,
                sizer: s.sizer.clone(),
                needs: {
                    // Before any history, a stage without a declared class prefers
                    // the one its name and command suggest.
                    let mut needs = s.needs.clone();
                    if needs.class.is_none() {
                        needs.guess =
                            granule_core::guess_class(&s.name, &s.command).map(Into::into);
                    }
                    needs
                },
            })
            .collect(),
    }
}

fn run(args: RunArgs) -> Result<u8> {
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
        eprintln!("granule: job \"{}\" already finished ({}); nothing to run. Use --fresh to run it again.", spec.name, record.state);
        if let Some(error) = &record.error {
            eprintln!("granule: {error}");
        }
        return Ok(match record.state.as_str() {
            "done" => EXIT_DONE,
            "cancelled" => EXIT_CANCELLED,
            "refused" => EXIT_BAD_INPUT,
            "broken" => EXIT_BROKEN,
            _ => EXIT_QUARANTINED,
        });
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
        state_dir: args.state.state.clone(),
        quiet: args.quiet,
        job: Some((submitted.id(), Arc::new(spec))),
        write_counts: args.tuning.write_counts,
        ..engine::EngineConfig::default()
    };
    Ok(
        match engine::run_worker(store.as_mut(), &config, &interrupts)? {
            engine::Outcome::Done => EXIT_DONE,
            engine::Outcome::Quarantined => EXIT_QUARANTINED,
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

/// Submits a job; a changed spec under an existing name is refused, naming an
/// items file that changed since the job was submitted when that is the change.
fn submit_job(store: &mut dyn Store, spec: &JobSpec, fresh: bool) -> Result<Submitted> {
    match store.submit(&new_job(spec), host::now_ms(), fresh) {
        Err(StoreError::SpecChanged(name)) => {
            let stored = store
                .job(&name)?
                .and_then(|r| serde_json::from_str::<JobSpec>(&r.spec_json).ok());
            let changed = stored.and_then(|old| changed_items_file(&old, spec));
            match changed {
                Some(path) => Err(BadInput(format!(
                    "job \"{name}\": items file {} changed since the job was submitted; restore it, or rerun with --fresh to start over with the new file",
                    path.display()
                ))
                .into()),
                None => Err(StoreError::SpecChanged(name).into()),
            }
        }
        other => Ok(other?),
    }
}

/// The first `lines` file whose content differs between two versions of a spec,
/// when nothing else differs.
fn changed_items_file(old: &JobSpec, new: &JobSpec) -> Option<std::path::PathBuf> {
    use granule_spec::ItemsSpec;
    if old.stages.len() != new.stages.len() {
        return None;
    }
    let mut changed = None;
    let mut unpinned = old.clone();
    for (o, n) in unpinned.stages.iter_mut().zip(&new.stages) {
        if let (ItemsSpec::Lines { path: op, .. }, ItemsSpec::Lines { path: np, .. }) =
            (&o.items, &n.items)
        {
            if op == np && o.items != n.items {
                changed.get_or_insert(np.clone());
                o.items = n.items.clone();
            }
        }
    }
    unpinned.name = new.name.clone();
    (unpinned == *new).then_some(changed).flatten()
}

/// Counts SIGINT and SIGTERM: the first asks for a clean stop, the second for a kill.
fn count_signals() -> Result<Arc<AtomicUsize>> {
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

fn slots(arg: Option<u32>) -> Result<u32> {
    let slots =
        arg.unwrap_or_else(|| std::thread::available_parallelism().map_or(1, |n| n.get() as u32));
    if slots == 0 {
        return Err(BadInput("--slots must be at least 1".into()).into());
    }
    Ok(slots)
}

/// `NAME=AMOUNT` of a custom resource. (Checked here rather than by clap, whose
/// errors echo the raw value: a name may hold terminal escapes.)
fn parse_resource(text: &str) -> Result<(String, f64), String> {
    let (name, amount) = text
        .split_once('=')
        .ok_or_else(|| format!("{text:?}: expected NAME=AMOUNT"))?;
    let amount: f64 = amount
        .trim()
        .parse()
        .map_err(|_| format!("{text:?}: AMOUNT must be a number"))?;
    if !amount.is_finite() || amount < 0.0 {
        return Err(format!("{text:?}: AMOUNT must be a number, 0 or more"));
    }
    let name = name.trim();
    granule_spec::check_name(name).map_err(|why| format!("{text:?}: the name {why}"))?;
    Ok((name.to_string(), amount))
}

/// The worker's declared class and resources, checked: names bounded and printable,
/// amounts numbers (values are shown escaped in errors, never raw).
fn declared(args: &WorkerArgs) -> Result<Vec<(String, f64)>> {
    granule_spec::check_name(&args.class)
        .map_err(|why| BadInput(format!("--class {:?}: the name {why}", args.class)))?;
    args.resources
        .iter()
        .map(|r| parse_resource(r).map_err(|why| BadInput(format!("--resource {why}")).into()))
        .collect()
}

fn worker(args: WorkerArgs) -> Result<u8> {
    let resources = declared(&args)?;
    if args.describe {
        let mut description = engine::describe(&resources);
        description["class"] = args.class.clone().into();
        description["cost_per_hour"] = args.cost.into();
        description["spot"] = args.spot.into();
        println!("{description}");
        return Ok(EXIT_DONE);
    }
    if !args.cost.is_finite() || args.cost < 0.0 {
        return Err(BadInput(format!(
            "--cost {}: must be a non-negative number",
            args.cost
        ))
        .into());
    }
    let mut store = open_store(&args.state)?;
    let now = Instant::now();
    let now_ms = host::now_ms();
    let lifespan = match (args.lifespan, &args.deadline) {
        (Some(_), Some(_)) => {
            return Err(BadInput("give --lifespan or --deadline, not both".into()).into())
        }
        (Some(d), None) => Some(d),
        (None, Some(text)) => Some(deadline_in(text, now_ms)?),
        (None, None) => None,
    };
    let interrupts = count_signals()?;
    let config = engine::EngineConfig {
        slots: slots(args.slots)?,
        flush: args.tuning.flush,
        lease: args.tuning.lease,
        grace: args.grace,
        checkpoint_level: args.tuning.zstd_level,
        write_counts: args.tuning.write_counts,
        class: args.class,
        state_dir: args.state.state.clone(),
        quiet: args.quiet,
        lifespan_end: lifespan.map(|d| (now + d, now_ms + d.as_millis() as i64)),
        // Stop with a tenth of the lifespan (at most the grace) left to yield in.
        drain_margin: lifespan.map_or(Duration::ZERO, |d| (d / 10).min(args.grace)),
        idle_exit: args.idle_exit,
        cost_per_hour: args.cost,
        spot: args.spot,
        custom: resources,
        steal: !args.no_steal,
        ..engine::EngineConfig::default()
    };
    engine::run_worker(store.as_mut(), &config, &interrupts)?;
    Ok(EXIT_DONE)
}

/// Time left until `text` (RFC 3339, e.g. `2026-11-22T18:00:00Z`, or unix seconds).
fn deadline_in(text: &str, now_ms: i64) -> Result<Duration> {
    let end_ms = match text.parse::<f64>() {
        Ok(secs) => (secs * 1e3) as i64,
        Err(_) => humantime::parse_rfc3339_weak(text)
            .map_err(|e| {
                BadInput(format!(
                    "--deadline {text:?}: {e} (want RFC 3339 or unix seconds)"
                ))
            })?
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_millis() as i64),
    };
    if end_ms <= now_ms {
        return Err(BadInput(format!("--deadline {text:?} is in the past")).into());
    }
    Ok(Duration::from_millis((end_ms - now_ms) as u64))
}

fn submit(args: SubmitArgs) -> Result<u8> {
    let spec = granule_spec::load(&args.spec)?;
    let mut store = open_store(&args.state)?;
    let what = match submit_job(store.as_mut(), &spec, args.fresh)? {
        Submitted::Created(_) => "submitted",
        Submitted::Resumed(_) => "already submitted, unfinished",
        Submitted::AlreadyFinished(_) => "already finished",
    };
    let items: u64 = spec.stages.iter().map(|s| s.items.count()).sum();
    eprintln!(
        "granule: job \"{}\" {what}: {} stages, {items} items",
        spec.name,
        spec.stages.len()
    );
    Ok(EXIT_DONE)
}

/// Workers shown by `status`: those seen in the last minute, or holding work.
const WORKERS_SEEN_MS: i64 = 60_000;

fn status(args: StatusArgs) -> Result<u8> {
    let mut store = open_store(&args.state)?;
    let jobs = store.status(args.job.as_deref())?;
    let now = host::now_ms();
    let workers = store.workers(now, WORKERS_SEEN_MS)?;
    // Each class's slots 10 minutes ahead and its losses, from the last hour.
    let history = store.worker_history(now, now - granule_core::FORECAST_WINDOW_MS)?;
    let pool = granule_core::forecast_recent(&history, now);
    if let Some(stage) = &args.explain {
        return explain(&jobs, &workers, &pool, stage);
    }
    if args.json {
        println!(
            "{}",
            serde_json::json!({ "jobs": jobs, "workers": workers, "pool": pool })
        );
        return Ok(EXIT_DONE);
    }
    if jobs.is_empty() {
        println!("no jobs in {}", args.state.state.display());
    }
    for job in &jobs {
        println!("job {}: {}", job.name, job.state);
        if let Some(error) = &job.error {
            println!("  {error}");
        }
        for s in &job.stages {
            println!(
                "  {:<16} {:<8} {}/{} done, {} running, {} pending, {} quarantined; {} fragments (last {} items), {:.1} µs/item",
                s.name, s.state, s.done, s.items, s.running, s.pending, s.quarantined, s.fragments, s.fragment_size, s.item_cost_us
            );
            println!(
                "  {:<16} {} yields, {} splits, {} lost, {} checkpoints ({} fallbacks), {:.1}s of work wasted",
                "", s.yields, s.splits, s.lost, s.checkpoints, s.checkpoint_fallbacks, s.wasted_s
            );
            if s.state_reruns > 0 {
                println!(
                    "  {:<16} {} items ran again because the state they were acked into was lost",
                    "", s.state_reruns
                );
            }
            if s.results_missing > 0 {
                println!(
                    "  {:<16} results incomplete: {} done items are in no result (acked after the last checkpoint)",
                    "", s.results_missing
                );
            }
            if let (Some(median), Some(p90)) = (s.prediction_error_median, s.prediction_error_p90) {
                println!("  {:<16} predicted fragment durations off by {median:.1}% (median), {p90:.1}% (p90)", "");
            }
            if let (Some(profile), Some(source)) = (&s.profile, &s.profile_source) {
                println!("  {:<16} profile: {profile} ({source})", "");
            }
            if s.classes.len() > 1 {
                for c in &s.classes {
                    println!(
                        "  {:<16} on {}: {} items in {} fragments (~{:.0} items each), {:.1} ± {:.1} µs/item",
                        "", c.class, c.items, c.fragments, c.fragment_size, c.item_cost_us, c.item_cost_spread_us
                    );
                }
            }
            if !s.quarantined_items.is_empty() {
                let items: Vec<String> = s
                    .quarantined_items
                    .iter()
                    .map(|[a, b]| {
                        if b - a == 1 {
                            a.to_string()
                        } else {
                            format!("{a}-{}", b - 1)
                        }
                    })
                    .collect();
                println!("    quarantined items: {}", items.join(", "));
            }
        }
    }
    if !workers.is_empty() {
        println!("workers:");
    }
    for w in &workers {
        let life = w.lifespan_left_ms.map_or("no lifespan".to_string(), |ms| {
            format!("{:.1}s of lifespan left", ms as f64 / 1e3)
        });
        let gpus = w.resources["gpus"].as_array().map_or(0, |g| g.len());
        let spot = if w.spot { ", spot" } else { "" };
        println!(
            "  {} ({}, {}{spot}, {}/h, {} cpus, {} gpus): {}/{} slots busy, {} fragments done, {life}, last heard {:.1}s ago",
            w.id, w.class, w.state, w.cost_per_hour, w.resources["cpus"], gpus, w.busy, w.slots, w.fragments_done,
            w.heartbeat_age_ms as f64 / 1e3
        );
    }
    if !pool.is_empty() {
        println!("pool (last hour, forecast 10 min ahead):");
    }
    for c in &pool {
        let spot = if c.spot { " (spot)" } else { "" };
        println!(
            "  class {}{spot}: {} slots now, ~{:.1} expected, {:.2} workers lost per worker-hour",
            c.class, c.slots_now, c.slots_ahead, c.losses_per_hour
        );
    }
    Ok(EXIT_DONE)
}

/// Why a stage's work goes where it goes: its needs, then per worker seen lately whether one
/// fragment fits (or what is short) and the rank it would have there.
fn explain(
    jobs: &[granule_store::JobStatus],
    workers: &[granule_store::WorkerStatus],
    forecast: &[granule_core::ClassForecast],
    name: &str,
) -> Result<u8> {
    let Some((job, stage)) = jobs
        .iter()
        .rev()
        .find_map(|j| j.stages.iter().find(|s| s.name == name).map(|s| (j, s)))
    else {
        return Err(BadInput(format!("no stage named \"{name}\"")).into());
    };
    let n = &stage.needs;
    let class = match (&n.class, n.class_required) {
        (Some(c), true) => format!("requires class {c}"),
        (Some(c), false) => format!("prefers class {c}"),
        (None, _) => "any class".into(),
    };
    println!(
        "stage {} of job {} ({}): per fragment {} cpus, {} MiB, {} gpus, resources {:?}; {class}; priority {}",
        stage.name, job.name, stage.state, n.cpus, n.memory_mb, n.gpus, n.resources, n.priority
    );
    println!("  {} pending, {} running; stages that fit go by priority, then the owner with fewer fragments running, then the class's relative speed on each stage (learned), then the preferred class, then the longest path of work left in the DAG, then fewest running", stage.pending, stage.running_fragments);
    if let (Some(profile), Some(source)) = (&stage.profile, &stage.profile_source) {
        println!("  profile: {profile} ({source}: history is CPU time / wall time, peak memory and block I/O; before any, the declared class or a guess from the name and command)");
    }
    let best = stage
        .classes
        .iter()
        .filter(|c| c.item_cost_us > 0.0)
        .map(|c| c.item_cost_us)
        .fold(f64::INFINITY, f64::min);
    for c in &stage.classes {
        let relative = if c.item_cost_us > 0.0 && best.is_finite() {
            format!(", {:.2}x the best class", c.item_cost_us / best)
        } else {
            ", not learned yet".into()
        };
        println!(
            "  on class {}: {:.1} µs/item{relative}; {} items done in {} fragments",
            c.class, c.item_cost_us, c.items, c.fragments
        );
    }
    if let Some(ms) = n.deadline_ms {
        println!("  {}", deadline_verdict(job, stage, workers, forecast, ms));
    }
    if workers.is_empty() {
        println!("  no workers seen in the last minute");
    }
    for w in workers {
        let r = &w.resources;
        let offer = granule_core::WorkerOffer {
            class: w.class.clone(),
            slots: w.slots,
            cpus: r["cpus"].as_f64().unwrap_or(0.0),
            memory_mb: r["memory_mb"].as_u64().unwrap_or(0),
            gpus: r["gpus"].as_array().map_or(0, |g| g.len() as u32),
            resources: r["custom"].as_object().map_or_else(Default::default, |m| {
                m.iter()
                    .map(|(k, v)| (k.clone(), v.as_f64().unwrap_or(0.0)))
                    .collect()
            }),
            spot: w.spot,
        };
        let verdict = match granule_core::fits(n, &offer) {
            Ok(()) => {
                let elsewhere = n.class.as_ref().is_some_and(|c| *c != offer.class);
                let preference = if elsewhere {
                    ", not its preferred class"
                } else {
                    ""
                };
                format!(
                    "fits (priority {}{preference}); {}/{} slots busy",
                    n.priority, w.busy, w.slots
                )
            }
            Err(misfit) => format!("does not fit: {misfit}"),
        };
        println!("  {} ({}, {}): {verdict}", w.id, w.class, w.state);
    }
    Ok(EXIT_DONE)
}

/// What the deadline plan makes of a stage now: the time left, the soonest the live
/// workers could finish it, and which classes the cheapest plan that still makes the
/// deadline lets take its work (the pool, costs and plan the claims use).
fn deadline_verdict(
    job: &granule_store::JobStatus,
    stage: &granule_store::StageStatus,
    workers: &[granule_store::WorkerStatus],
    forecast: &[granule_core::ClassForecast],
    deadline_ms: f64,
) -> String {
    let left_ms = (job.created_ms + deadline_ms as i64 - host::now_ms()) as f64;
    let when = format!(
        "deadline {} after submission, {:.0}s left",
        humantime::format_duration(Duration::from_millis(deadline_ms as u64)),
        left_ms / 1e3
    );
    let mut pool = granule_core::pool_classes(
        workers
            .iter()
            .filter(|w| w.state == "running")
            .map(|w| (w.class.clone(), f64::from(w.slots), w.cost_per_hour)),
    );
    granule_core::expect_drops(&mut pool, forecast);
    let learned: Vec<(String, f64)> = stage
        .classes
        .iter()
        .filter(|c| c.item_cost_us > 0.0)
        .map(|c| (c.class.clone(), c.item_cost_us / 1e3))
        .collect();
    if pool.is_empty() || learned.is_empty() {
        return format!("{when}; no live workers or no cost learned yet: every class takes it");
    }
    let work = [granule_core::StageWork {
        items: (stage.pending + stage.running) as f64,
        per_item_ms: granule_core::per_class_costs(&learned, &pool),
    }];
    let Some((soonest, plan)) = granule_core::pool_deadline_plan(&work, &pool, left_ms) else {
        return format!("{when}; the live workers cannot run it");
    };
    // A class that has not learned its cost here is let in, as claims do.
    let (taking, waiting): (Vec<_>, Vec<_>) = pool
        .iter()
        .zip(&plan.planned[0])
        .partition(|(p, planned)| **planned || !learned.iter().any(|(c, _)| *c == p.class));
    let names = |classes: &[(&granule_core::PoolClass, &bool)]| {
        classes
            .iter()
            .map(|(p, _)| p.class.as_str())
            .collect::<Vec<_>>()
            .join(", ")
    };
    format!(
        "{when}; every live worker together would need {:.0}s; the cheapest plan that makes it{} lets class {} take the work{}",
        soonest / 1e3,
        if soonest > granule_core::DEADLINE_SHARE * left_ms { " (it cannot: as soon as possible)" } else { "" },
        names(&taking),
        if waiting.is_empty() {
            String::new()
        } else {
            format!("; {} wait (dearer, not needed)", names(&waiting))
        }
    )
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

/// Clients loop claim (one item) -> finish on a fresh job for `duration`; prints
/// cycles per second as JSON and fails if any item was claimed twice.
fn bench_store(args: BenchStoreArgs) -> Result<u8> {
    use granule_core::{ClaimContext, SizerConfig};
    use granule_store::{ClaimRequest, FragmentEnd, WorkerInfo};
    let name = format!("bench-store-{}", host::now_ms());
    let job = NewJob {
        name: name.clone(),
        spec_hash: String::new(),
        spec_json: "{}".into(),
        stages: vec![NewStage {
            name: "s".into(),
            items: 1 << 40,
            after: vec![],
            retries: 0,
            sizer: SizerConfig::default(),
            needs: Default::default(),
        }],
    };
    let id = open_store(&args.state)?
        .submit(&job, host::now_ms(), true)?
        .id();
    let deadline = Instant::now() + args.duration;
    let started = Instant::now();
    let claimed: Vec<Vec<(u64, u64)>> = std::thread::scope(|scope| {
        let handles: Vec<_> = (0..args.clients)
            .map(|c| {
                let state = &args.state;
                scope.spawn(move || -> Result<Vec<(u64, u64)>> {
                    let mut store = open_store(state)?;
                    let worker = format!("bench-{c}");
                    let info = WorkerInfo {
                        id: worker.clone(),
                        host: "bench".into(),
                        pid: 0,
                        proc_start: 0,
                        slots: 1,
                        class: "default".into(),
                        lifespan_end_ms: None,
                        cost_per_hour: 0.0,
                        spot: false,
                        resources: "{}".into(),
                        locality: String::new(),
                    };
                    store.register_worker(&info, host::now_ms())?;
                    let mut mine = Vec::new();
                    while Instant::now() < deadline {
                        let req = ClaimRequest {
                            expected_life_ms: None,
                            job: Some(id),
                            worker: worker.clone(),
                            class: "default".into(),
                            now_ms: host::now_ms(),
                            lease_ms: 60_000,
                            slots: 1,
                            max_items: Some(1),
                            offer: Default::default(),
                            context: ClaimContext {
                                remaining: 0,
                                slots: 1,
                                free_memory: 1.0,
                                load_per_cpu: 0.0,
                                lifespan_ms: None,
                            },
                        };
                        let Some(a) = store.claim(&req)? else {
                            continue;
                        };
                        mine.push((a.span.start, a.span.end));
                        let end = FragmentEnd::success(a.fragment, a.span.end);
                        store.finish(&worker, host::now_ms(), &end)?;
                    }
                    Ok(mine)
                })
            })
            .collect();
        handles
            .into_iter()
            .map(|h| h.join().expect("client thread"))
            .collect::<Result<Vec<_>>>()
    })?;
    let seconds = started.elapsed().as_secs_f64();
    let mut all: Vec<(u64, u64)> = claimed.into_iter().flatten().collect();
    all.sort_unstable();
    let twice = all.windows(2).filter(|w| w[1].0 < w[0].1).count();
    let cycles = all.len() as f64 / seconds;
    println!(
        "{}",
        serde_json::json!({ "clients": args.clients, "cycles": all.len(), "seconds": seconds, "cycles_per_s": cycles, "claimed_twice": twice })
    );
    open_store(&args.state)?.cancel(&name, host::now_ms())?;
    Ok(if twice == 0 { EXIT_DONE } else { EXIT_BROKEN })
}

fn cancel(args: CancelArgs) -> Result<u8> {
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

fn results(args: ResultsArgs) -> Result<u8> {
    let mut store = open_store(&args.state)?;
    let job = job_with_stage(store.as_mut(), args.job, &args.stage)?;
    // A result is at most the stage's max_checkpoint: a record claiming more is corrupt.
    let limit = store
        .job(&job)?
        .and_then(|r| serde_json::from_str::<JobSpec>(&r.spec_json).ok())
        .and_then(|spec| spec.stages.into_iter().find(|s| s.name == args.stage))
        .map_or(granule_spec::DEFAULT_MAX_CHECKPOINT_BYTES, |s| {
            s.max_checkpoint_bytes
        });
    let mut stdout = std::io::stdout().lock();
    let mut unreadable = 0u64;
    for result in store.results(&job, &args.stage)? {
        let fragment = result.fragment;
        let blob = granule_exec::Blob {
            data: result.blob.data,
            raw_len: result.blob.raw_len,
            hash: result.blob.hash,
        };
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
        .find(|s| s.name == args.stage)
        .map_or(0, |s| s.results_missing)
        + unreadable;
    if missing > 0 {
        eprintln!(
            "granule: the results of stage \"{}\" are incomplete: the state of {missing} done items is in no readable result (see granule status and granule logs {})",
            args.stage, args.stage
        );
        return Ok(EXIT_QUARANTINED);
    }
    Ok(EXIT_DONE)
}

/// Writes `bytes` to `dir/name` without following what is there: a temporary file
/// created new, then renamed over the name (a symlink at the name is replaced, its
/// target untouched).
fn write_new(dir: &std::path::Path, name: &str, bytes: &[u8]) -> Result<()> {
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

fn logs(args: LogsArgs) -> Result<u8> {
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

//! `granule worker`: claim and run fragments of any job until the work is done.

use super::{count_signals, open_store, slots, StateArg, TuningArgs};
use crate::{engine, host, BadInput, EXIT_DONE};
use anyhow::Result;
use std::time::{Duration, Instant};

#[derive(clap::Args)]
pub(crate) struct WorkerArgs {
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

/// Runs a worker until no job is left (or its idle time, lifespan or deadline ends).
pub(crate) fn worker(args: WorkerArgs) -> Result<u8> {
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
        blobs: args.tuning.blobs.clone(),
        cache_bytes: args.tuning.cache_mb.saturating_mul(1 << 20),
        shared_store: args.state.store.is_some(),
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

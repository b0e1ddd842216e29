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
    #[arg(long, value_parser = crate::cmd::duration)]
    lifespan: Option<Duration>,
    /// The moment this worker must be gone (RFC 3339 or unix seconds), or `slurm`:
    /// the end of the Slurm job it runs in. With `--lifespan`, the earlier end.
    #[arg(long)]
    deadline: Option<String>,
    /// Exit after this long with no work (default: exit once no unfinished job is left).
    #[arg(long, value_parser = crate::cmd::duration)]
    idle_exit: Option<Duration>,
    /// Preemption notice: on SIGTERM, yield everything and exit within this time.
    #[arg(long, default_value = "30s", value_parser = crate::cmd::duration)]
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
    let deadline = match args.deadline.as_deref() {
        // With a lifespan, a Slurm that cannot say the time left is not fatal.
        Some("slurm") if args.lifespan.is_some() => slurm_time_left().unwrap_or_else(|e| {
            eprintln!("granule: {e:#}; going by --lifespan");
            None
        }),
        Some("slurm") => slurm_time_left()?,
        Some(text) => Some(deadline_in(text, now_ms)?),
        None => None,
    };
    let lifespan = match (args.lifespan, deadline) {
        (Some(a), Some(b)) => Some(a.min(b)),
        (a, b) => a.or(b),
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

/// The time left to the Slurm job this worker runs in (`squeue -o %L`; Slurm sets no
/// end-time variable); `None` for a job without a limit.
fn slurm_time_left() -> Result<Option<Duration>> {
    let job = std::env::var("SLURM_JOB_ID").map_err(|_| {
        BadInput("--deadline slurm: SLURM_JOB_ID is not set (not in a Slurm job)".into())
    })?;
    let out = std::process::Command::new("squeue")
        .args(["-h", "-j", &job, "-o", "%L"])
        .output()
        .map_err(|e| anyhow::anyhow!("--deadline slurm: cannot run squeue: {e}"))?;
    let text = String::from_utf8_lossy(&out.stdout);
    if !out.status.success() {
        anyhow::bail!(
            "--deadline slurm: squeue failed: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(slurm_duration(text.trim()))
}

/// A Slurm time (`M:SS`, `H:MM:SS`, `D-HH:MM:SS`); `None` for `UNLIMITED`,
/// `NOT_SET` or anything else that is not one.
pub(crate) fn slurm_duration(text: &str) -> Option<Duration> {
    let (days, rest) = match text.split_once('-') {
        Some((d, rest)) => (d.parse::<u64>().ok()?, rest),
        None => (0, text),
    };
    let parts: Vec<u64> = rest
        .split(':')
        .map(|p| p.parse().ok())
        .collect::<Option<_>>()?;
    let secs = match parts[..] {
        [m, s] => m * 60 + s,
        [h, m, s] => h * 3600 + m * 60 + s,
        _ => return None,
    };
    Some(Duration::from_secs(days * 86_400 + secs))
}

#[cfg(test)]
mod tests {
    use super::slurm_duration;
    use std::time::Duration;

    #[test]
    fn slurm_times_parse() {
        assert_eq!(slurm_duration("0:58"), Some(Duration::from_secs(58)));
        assert_eq!(slurm_duration("1:00:05"), Some(Duration::from_secs(3605)));
        assert_eq!(
            slurm_duration("2-01:00:00"),
            Some(Duration::from_secs(2 * 86_400 + 3600))
        );
        assert_eq!(slurm_duration("UNLIMITED"), None);
        assert_eq!(slurm_duration(""), None);
    }
}

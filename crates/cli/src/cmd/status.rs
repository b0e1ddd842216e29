//! `granule status`: jobs, stages, workers and the pool; `--explain STAGE` says
//! where a stage's work can go and why.

use super::{open_existing_store, StateArg};
use crate::{host, BadInput, EXIT_DONE};
use anyhow::Result;
use granule_core::ClassForecast;
use granule_store::{PoolStatus, StageState, StageStatus, WorkerState, WorkerStatus};
use std::time::Duration;

#[derive(clap::Args)]
pub(crate) struct StatusArgs {
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

/// Workers shown by `status`: those seen in the last minute, or holding work.
const WORKERS_SEEN_MS: i64 = 60_000;

/// Prints jobs, workers and the pool (or JSON, or `--explain STAGE`).
pub(crate) fn status(args: StatusArgs) -> Result<u8> {
    // Nothing has run here: say so (scripts poll status while a run starts) and
    // leave no store behind.
    if let (Some(missing), None) = (super::missing_store(&args.state), &args.job) {
        if args.json {
            println!(
                "{}",
                serde_json::json!({
                    "jobs": [], "workers": [], "pool": [], "pools": [],
                    "fair_share": { "half_life_s": granule_core::fair::DEFAULT_HALF_LIFE_MS / 1000.0, "owners": [] },
                })
            );
        } else {
            println!("no jobs: {missing}");
        }
        return Ok(EXIT_DONE);
    }
    let mut store = open_existing_store(&args.state)?;
    let mut jobs = store.status(args.job.as_deref())?;
    name_quarantined(store.as_mut(), &mut jobs)?;
    let now = host::now_ms();
    let mut workers = store.workers(now, WORKERS_SEEN_MS)?;
    mark_gone(&mut workers);
    // Each class's slots 10 minutes ahead and its losses, from the last hour.
    let history = store.worker_history(now, now - granule_core::FORECAST_WINDOW_MS)?;
    let pool = granule_core::forecast_recent(&history, now);
    let pools = store.pools()?;
    let fair = store.fair_share(now)?;
    if let Some(stage) = &args.explain {
        return explain(&jobs, &workers, &history, stage);
    }
    if args.json {
        println!(
            "{}",
            serde_json::json!({
                "jobs": jobs, "workers": workers, "pool": pool, "pools": pools, "fair_share": fair,
            })
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
        job.stages.iter().for_each(print_stage);
    }
    print_workers(&workers);
    print_pool(&pool);
    print_pools(&pools, now);
    // Owners matter once there are several, or shares were set.
    if fair.owners.len() > 1 || fair.owners.iter().any(|o| o.shares != 1.0) {
        super::shares::print(&fair);
    }
    Ok(EXIT_DONE)
}

/// Most quarantined items named by value per stage.
const VALUES_SHOWN: usize = 20;

/// Fills each stage's `quarantined_values` with the values of its first
/// quarantined items, read from the job's stored spec.
pub(crate) fn name_quarantined(
    store: &mut dyn granule_store::Store,
    jobs: &mut [granule_store::JobStatus],
) -> Result<()> {
    for job in jobs.iter_mut() {
        if job.stages.iter().all(|s| s.quarantined == 0) {
            continue;
        }
        let Some(record) = store.job(&job.name)? else {
            continue;
        };
        let Ok(spec) = serde_json::from_str::<granule_spec::JobSpec>(&record.spec_json) else {
            continue;
        };
        for stage in &mut job.stages {
            let Some(items) = spec
                .stages
                .iter()
                .find(|s| s.name == stage.name)
                .map(|s| &s.items)
            else {
                continue;
            };
            let indices: Vec<u64> = stage
                .quarantined_items
                .iter()
                .flat_map(|[a, b]| *a..*b)
                .take(VALUES_SHOWN)
                .collect();
            if let Some(values) = items.values_at(&indices) {
                stage.quarantined_values = values;
            }
        }
    }
    Ok(())
}

/// Workers of this host whose process is gone (killed without a word) show as
/// exited with nothing busy, instead of running until their lease runs out.
pub(crate) fn mark_gone(workers: &mut [WorkerStatus]) {
    let (here, name) = (host::locality(), host::hostname());
    for w in workers.iter_mut() {
        let local = if w.locality.is_empty() {
            w.host == name
        } else {
            w.locality == here
        };
        if w.state != WorkerState::Exited && local && !host::alive(w.pid, w.proc_start) {
            w.state = WorkerState::Exited;
            w.busy = 0;
        }
    }
}

/// The pools of `granule serve`: what its last round wanted and found, and the
/// last launch error.
fn print_pools(pools: &[PoolStatus], now: i64) {
    if !pools.is_empty() {
        println!("pools (granule serve):");
    }
    for p in pools {
        println!(
            "  {} ({}, class {}): {} wanted, {} pending, {} running, {} draining; {} started; planned {:.0}s ago",
            p.name,
            p.provider,
            p.class,
            p.wanted,
            p.pending,
            p.running,
            p.draining,
            p.launched,
            (now - p.updated_ms) as f64 / 1e3
        );
        if let Some((error, at)) = &p.last_error {
            println!(
                "  {:<16} last error {:.0}s ago: {error}",
                "",
                (now - at) as f64 / 1e3
            );
        }
    }
}

/// A stage's lines of `granule status`.
fn print_stage(s: &StageStatus) {
    println!(
        "  {:<16} {:<8} {}/{} done, {} running, {} pending, {} quarantined; {} fragments (last {} items), {:.1} µs/item",
        s.name, s.state, s.done, s.items, s.running, s.pending, s.quarantined, s.fragments, s.fragment_size, s.item_cost_us
    );
    println!(
        "  {:<16} {} yields, {} splits, {} lost, {} checkpoints ({} fallbacks), {:.1}s of work wasted",
        "", s.yields, s.splits, s.lost, s.checkpoints, s.checkpoint_fallbacks, s.wasted_s
    );
    if let Some(cap) = s.size_cap {
        println!(
            "  {:<16} last fragment sized by {}: {}",
            "",
            serde_json::to_string(&cap)
                .unwrap_or_default()
                .trim_matches('"'),
            cap.explain()
        );
    }
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
        println!(
            "  {:<16} predicted fragment durations off by {median:.1}% (median), {p90:.1}% (p90)",
            ""
        );
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
        if s.quarantined_values.is_empty() {
            println!("    quarantined items (indices): {}", items.join(", "));
        } else {
            let more = s
                .quarantined
                .saturating_sub(s.quarantined_values.len() as u64);
            let more = if more > 0 {
                format!(" and {more} more")
            } else {
                String::new()
            };
            let values: Vec<String> = s
                .quarantined_values
                .iter()
                .map(|v| format!("{v:?}"))
                .collect();
            println!("    quarantined items: {}{more}", values.join(", "));
            println!(
                "    (indices: {}; granule retry runs them again)",
                items.join(", ")
            );
        }
        if !s.feeds.is_empty() {
            println!(
                "    their outputs are missing downstream, in: {}",
                s.feeds.join(", ")
            );
        }
    }
    if s.outputs > 0 || s.results > 0 {
        println!(
            "  {:<16} published {} outputs, {} results (granule outputs {}, granule results {})",
            "", s.outputs, s.results, s.name, s.name
        );
    }
    if !s.streams_from.is_empty() {
        let growth = match (s.producing, s.expected_items) {
            (true, Some(n)) => format!("still producing: about {n} expected"),
            (true, None) => "still producing: more items to come".to_string(),
            (false, _) => "finished: every item known".to_string(),
        };
        println!(
            "  {:<16} items from {} ({growth}): {} known so far",
            "",
            s.streams_from.join(", "),
            s.items
        );
    }
    if !s.skipped_for.is_empty() {
        println!(
            "  {:<16} skipped: it comes after {}, which quarantined items (after_any = [...] runs a stage whatever its upstream did)",
            "",
            s.skipped_for.join(", ")
        );
    }
}

/// The workers seen lately, a line each.
fn print_workers(workers: &[WorkerStatus]) {
    if !workers.is_empty() {
        println!("workers:");
    }
    for w in workers {
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
}

/// Each class of the pool: slots now, expected ahead, losses.
fn print_pool(pool: &[ClassForecast]) {
    if !pool.is_empty() {
        println!("pool (last hour, forecast 10 min ahead):");
    }
    for c in pool {
        let spot = if c.spot { " (spot)" } else { "" };
        println!(
            "  class {}{spot}: {} slots now, ~{:.1} expected, {:.2} workers lost per worker-hour",
            c.class, c.slots_now, c.slots_ahead, c.losses_per_hour
        );
    }
}

/// Why a stage's work goes where it goes: its needs, then per worker seen lately whether one
/// fragment fits (or what is short) and the rank it would have there.
fn explain(
    jobs: &[granule_store::JobStatus],
    workers: &[granule_store::WorkerStatus],
    history: &[granule_core::WorkerSpan],
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
    println!("  {} items pending, {} running in {}; stages that fit go by priority, then the owner's turn in the fair share (fewest slots per share, then least recent usage per share), then the class's relative speed on each stage (learned), then the preferred class, then the longest path of work left in the DAG, then fewest running", stage.pending, stage.running, crate::cmd::plural(stage.running_fragments, "fragment"));
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
        println!("  {}", deadline_verdict(job, stage, workers, history, ms));
    }
    if workers.is_empty() {
        println!("  no workers seen in the last minute");
    }
    for w in workers {
        let verdict = match w.state {
            WorkerState::Exited => format!("exited: takes no work (it {})", worker_verdict(n, w)),
            WorkerState::Draining => {
                format!("draining: takes no new work (it {})", worker_verdict(n, w))
            }
            WorkerState::Running => worker_verdict(n, w),
        };
        println!("  {} ({}, {}): {verdict}", w.id, w.class, w.state);
    }
    Ok(EXIT_DONE)
}

/// Whether one fragment of a stage with needs `n` fits worker `w`, or what is short.
fn worker_verdict(n: &granule_core::StageNeeds, w: &WorkerStatus) -> String {
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
    match granule_core::fits(n, &offer) {
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
    }
}

/// What the deadline plan makes of a stage now: the time left, the soonest the live
/// workers could finish the job's ready work, and which classes the plan lets take
/// this stage's work. It is the plan claims use (`job_deadline_plan` over the job's
/// stages and the live pool, discounted by the forecast), as a worker that every
/// ready stage fits sees it.
pub(crate) fn deadline_verdict(
    job: &granule_store::JobStatus,
    stage: &granule_store::StageStatus,
    workers: &[WorkerStatus],
    history: &[granule_core::WorkerSpan],
    deadline_ms: f64,
) -> String {
    let now = host::now_ms();
    let left_ms = (job.created_ms + deadline_ms as i64 - now) as f64;
    let when = format!(
        "deadline {} after submission, {:.0}s left",
        humantime::format_duration(Duration::from_millis(deadline_ms as u64)),
        left_ms / 1e3
    );
    let rows = workers
        .iter()
        .filter(|w| w.state == "running")
        .map(|w| (w.class.clone(), i64::from(w.slots), w.cost_per_hour))
        .collect();
    let pool = granule_core::live_pool(rows, history, now);
    let views: Vec<granule_core::StageView> = job
        .stages
        .iter()
        .enumerate()
        .map(|(idx, s)| granule_core::StageView {
            idx,
            needs: s.needs.clone(),
            after: Vec::new(),
            ready: s.state == StageState::Running,
            running: s.running_fragments,
            left: s.pending + s.running,
            learned: s
                .classes
                .iter()
                .filter(|c| c.item_cost_us > 0.0)
                .map(|c| (c.class.clone(), c.item_cost_us / 1e3))
                .collect(),
            checkpoints: s.checkpoints > 0,
            deadline_at_ms: s.needs.deadline_ms.map(|ms| job.created_ms + ms as i64),
            owner_turn: 0,
        })
        .collect();
    let Some(plan) = granule_core::job_deadline_plan(&views, &pool, now) else {
        return format!(
            "{when}; no live workers, no cost learned yet, or no ready stage with a deadline: every class takes it"
        );
    };
    let me = job
        .stages
        .iter()
        .position(|s| s.name == stage.name)
        .expect("the stage is the job's");
    let (taking, waiting): (Vec<_>, Vec<_>) = pool
        .iter()
        .zip(&plan.takes[me])
        .partition(|(_, takes)| **takes);
    let names = |classes: &[(&granule_core::PoolClass, &bool)]| {
        classes
            .iter()
            .map(|(p, _)| p.class.as_str())
            .collect::<Vec<_>>()
            .join(", ")
    };
    format!(
        "{when}; every live worker together would need {:.0}s for the job's ready work; the cheapest plan that makes it{} lets class {} take this stage's work{}",
        plan.soonest_ms / 1e3,
        if plan.soonest_ms > granule_core::DEADLINE_SHARE * plan.time_left_ms { " (it cannot: as soon as possible)" } else { "" },
        names(&taking),
        if waiting.is_empty() {
            String::new()
        } else {
            format!("; {} wait (dearer, not needed)", names(&waiting))
        }
    )
}

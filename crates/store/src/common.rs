//! Pieces both backends share: JSON columns, the stored sizer config, the choice
//! of where to split a running fragment, placement order and status figures.

use crate::{
    Acks, ClaimRequest, ClassStatus, FragmentEnd, FragmentState, JobHalt, JobState, Result,
    StageState, StoreError,
};
use granule_core::{
    critical_paths, expect_drops, forecast_recent, order, per_class_costs, pool_classes,
    pool_deadline_plan, prediction_error, profile, Candidate, ClaimContext, CostModel,
    FinishOutcome, FinishReport, IntervalSet, PendingRange, PoolClass, Sizer, SizerConfig, Span,
    StageNeeds, StageWork, WorkerOffer, WorkerSpan,
};

/// `lease_expires_ms` of a fragment its worker has confirmed holding (listed in a
/// heartbeat once half its claim lease is spent): from then on it expires with its
/// worker's lease (`lease_until_ms`), so a heartbeat writes one worker row however many
/// fragments the worker runs. A claim whose reply never reached its worker is never
/// confirmed and expires on its own.
pub(crate) const FOLLOWS_WORKER: i64 = i64::MAX;

/// The state a status shows for a stage stored as `stored` (a stage with work
/// claimed is `running`, whatever word an older store kept).
pub(crate) fn stage_state(stored: &str) -> StageState {
    match stored {
        "done" => StageState::Done,
        "waiting" => StageState::Waiting,
        _ => StageState::Running,
    }
}

/// A job's stored state word; one that cannot be read shows the job broken.
pub(crate) fn job_state(stored: &str) -> JobState {
    stored.parse().unwrap_or(JobState::Broken)
}

/// A value as a JSON column.
pub(crate) fn json<T: serde::Serialize>(value: &T) -> String {
    serde_json::to_string(value).expect("serializing plain data")
}

/// A JSON column back to a value; `what` names it in the error.
pub(crate) fn parse<T: serde::de::DeserializeOwned>(text: &str, what: &str) -> Result<T> {
    serde_json::from_str(text).map_err(|e| StoreError::Corrupt(format!("{what}: {e}")))
}

/// A sizer config as stored: the tunables plus the stage keys that `serde(skip)` leaves out.
#[derive(serde::Serialize, serde::Deserialize)]
struct StoredSizerConfig {
    tunables: SizerConfig,
    target_ms: Option<f64>,
    limit_ms: Option<f64>,
    initial: Option<u64>,
}

/// The JSON a stage's sizer config is stored as.
pub(crate) fn sizer_config_json(cfg: &SizerConfig) -> String {
    json(&StoredSizerConfig {
        tunables: cfg.clone(),
        target_ms: cfg.target_ms,
        limit_ms: cfg.limit_ms,
        initial: cfg.initial,
    })
}

/// Reads a stored sizer config back.
pub(crate) fn decode_sizer_config(text: &str) -> Result<SizerConfig> {
    let stored: StoredSizerConfig = parse(text, "sizer config")?;
    Ok(SizerConfig {
        target_ms: stored.target_ms,
        limit_ms: stored.limit_ms,
        initial: stored.initial,
        ..stored.tunables
    })
}

/// Where to split a running fragment, and how much work its tail holds: the owner
/// keeps the first half of what it has not acked. Its remaining work is judged by
/// the model's per-item cost, or by its own pace once it runs past its prediction
/// (a straggler). `None` if the remaining work is under `min_ms` or 4 overheads.
pub(crate) fn split_point(
    span: Span,
    acked: &IntervalSet,
    model: &CostModel,
    elapsed_ms: i64,
    predicted_ms: f64,
    min_ms: f64,
) -> Option<(f64, u64)> {
    let left = span.len() - acked.len();
    let elapsed = elapsed_ms as f64;
    let pace = if acked.is_empty() {
        0.0
    } else {
        elapsed / acked.len() as f64
    };
    let per_item = if elapsed > predicted_ms {
        model.b_ms.max(pace)
    } else {
        model.b_ms
    };
    let remaining_ms = left as f64 * per_item;
    let tail_start = acked
        .spans()
        .last()
        .map_or(span.start, |s| s.end.max(span.start));
    let at = tail_start + (span.end - tail_start) / 2;
    (remaining_ms >= min_ms.max(4.0 * model.a_ms) && at > tail_start).then_some((remaining_ms, at))
}

/// One stage of a job as the claim path sees it, for placement.
pub(crate) struct StageView {
    /// Position in the job.
    pub(crate) idx: usize,
    /// Its needs, class, priority and owner.
    pub(crate) needs: StageNeeds,
    /// The stages it waits for.
    pub(crate) after: Vec<usize>,
    /// Whether a worker of the asking offer could take from it now.
    pub(crate) ready: bool,
    /// Fragments running.
    pub(crate) running: u64,
    /// Items not yet done.
    pub(crate) left: u64,
    /// Per-item cost learned on each class (classes with a ready model only).
    pub(crate) learned: Vec<(String, f64)>,
    /// Whether its tasks have written checkpoints.
    pub(crate) checkpoints: bool,
    /// When it should be done (its job's submission + its `deadline`), unix ms.
    pub(crate) deadline_at_ms: Option<i64>,
}

/// What the claim path reads of one stage for placement.
pub(crate) struct StageReading {
    /// Fragments running.
    pub(crate) running: i64,
    /// Items not yet done.
    pub(crate) left: i64,
    /// Whether its tasks have written checkpoints.
    pub(crate) checkpoints: bool,
    /// Its sizer rows: class and stored state.
    pub(crate) sizers: Vec<(String, String)>,
}

impl StageView {
    /// The view of a stage (position, needs, `after`, readiness) from what was read
    /// of it; `created_ms` is its job's submission, for the deadline.
    pub(crate) fn read(
        idx: usize,
        needs: &StageNeeds,
        after: &[usize],
        ready: bool,
        created_ms: i64,
        reading: StageReading,
    ) -> Result<StageView> {
        let mut learned = Vec::new();
        for (class, state) in reading.sizers {
            if let Some(b) = learned_cost(&state)? {
                learned.push((class, b));
            }
        }
        Ok(StageView {
            idx,
            needs: needs.clone(),
            after: after.to_vec(),
            ready,
            running: reading.running.max(0) as u64,
            left: reading.left.max(0) as u64,
            learned,
            checkpoints: reading.checkpoints,
            deadline_at_ms: needs.deadline_ms.map(|ms| created_ms + ms as i64),
        })
    }
}

/// The sizer state with the most history among a stage's classes.
pub(crate) fn busiest(sizers: &[(String, Sizer)]) -> Sizer {
    sizers
        .iter()
        .map(|(_, s)| s)
        .max_by_key(|s| s.model.observations)
        .cloned()
        .unwrap_or_default()
}

/// The live pool a deadline plan sees: live workers' `(class, slots, cost per
/// worker-hour)` rows, each class counted as its forecast capacity when that is
/// lower (`history` covers the forecast window).
pub(crate) fn live_pool(
    rows: Vec<(String, i64, f64)>,
    history: &[WorkerSpan],
    now_ms: i64,
) -> Vec<PoolClass> {
    let mut pool = pool_classes(rows.into_iter().map(|(c, s, cost)| (c, s as f64, cost)));
    expect_drops(&mut pool, &forecast_recent(history, now_ms));
    pool
}

/// With a deadline on a ready stage: for each view, whether the asking class is
/// in the cheapest plan that still finishes the ready work by the earliest
/// deadline (90% of the time left, or as soon as possible if that is too late).
/// A class whose cost on a stage is not learned yet is planned there (to learn
/// it). `None` when no ready stage has a deadline or no cost is learned at all.
pub(crate) fn deadline_plan(
    views: &[StageView],
    pool: &[PoolClass],
    class: &str,
    now_ms: i64,
) -> Option<Vec<bool>> {
    let deadline = views
        .iter()
        .filter(|v| v.ready)
        .filter_map(|v| v.deadline_at_ms)
        .min()?;
    let me = pool.iter().position(|p| p.class == class)?;
    let work: Vec<StageWork> = views
        .iter()
        .map(|v| StageWork {
            items: if v.ready { v.left as f64 } else { 0.0 },
            per_item_ms: per_class_costs(&v.learned, pool),
        })
        .collect();
    if work
        .iter()
        .all(|w| w.items <= 0.0 || w.per_item_ms.iter().all(Option::is_none))
    {
        return None;
    }
    let (_, plan) = pool_deadline_plan(&work, pool, (deadline - now_ms) as f64)?;
    Some(
        views
            .iter()
            .enumerate()
            .map(|(i, v)| {
                let unknown = !v.learned.iter().any(|(c, _)| c == class);
                plan.planned[i][me] || unknown
            })
            .collect(),
    )
}

/// A stored sizer state's learned per-item cost, if its model is ready.
pub(crate) fn learned_cost(state: &str) -> Result<Option<f64>> {
    let sizer: Sizer = parse(state, "sizer state")?;
    Ok(sizer.model.ready().then_some(sizer.model.b_ms))
}

/// The ready stages (by `idx`) in the order a worker offering `offer` should try
/// them: the core's `order` over what the store knows (the deadline plan, priority,
/// owner fairness within the job, comparative advantage from the per-class cost
/// models, the preferred class, the critical path, the least-served stage). With
/// a deadline plan (`planned`, per view), stages it keeps from this class are left
/// out: their work waits for cheaper classes, or for the plan to change.
pub(crate) fn placement_order(
    views: &[StageView],
    offer: &WorkerOffer,
    planned: Option<&[bool]>,
) -> Vec<usize> {
    let best: Vec<Option<f64>> = views
        .iter()
        .map(|v| v.learned.iter().map(|(_, b)| *b).min_by(f64::total_cmp))
        .collect();
    let work: Vec<f64> = views
        .iter()
        .zip(&best)
        .map(|(v, b)| v.left as f64 * b.unwrap_or(1.0))
        .collect();
    let after: Vec<Vec<usize>> = views.iter().map(|v| v.after.clone()).collect();
    let critical = critical_paths(&after, &work);
    let mut candidates: Vec<Candidate<'_>> = views
        .iter()
        .enumerate()
        .filter(|(_, v)| v.ready)
        .map(|(i, v)| {
            let here = v
                .learned
                .iter()
                .find(|(c, _)| *c == offer.class)
                .map(|(_, b)| *b);
            Candidate {
                needs: &v.needs,
                index: v.idx,
                running: v.running,
                owner_running: views
                    .iter()
                    .filter(|o| o.needs.owner == v.needs.owner)
                    .map(|o| o.running)
                    .sum(),
                critical_ms: critical[i],
                slowdown: match (here, best[i]) {
                    (Some(h), Some(b)) if b > 0.0 => h / b,
                    _ => 1.0,
                },
                planned: planned.is_none_or(|p| p[i]),
                checkpoints: v.checkpoints,
            }
        })
        .collect();
    order(&mut candidates, offer);
    candidates
        .iter()
        .filter(|c| c.planned)
        .map(|c| c.index)
        .collect()
}

/// Ranges lost with their worker this many times go to on-demand workers.
pub(crate) const ESCALATE_AFTER_LOST: u32 = 2;

/// Which pending ranges a worker may take. Items that ran out of memory go to a
/// worker with more memory, and items lost with spot workers twice go to an
/// on-demand worker, while such a worker is alive; otherwise anyone takes them.
#[derive(Clone, Copy, Debug, PartialEq)]
pub(crate) struct Admission {
    /// Ranges with a memory floor at or above this are left for others.
    pub(crate) below_floor_mb: u64,
    /// Ranges lost this often or more are left for others.
    pub(crate) lost_under: u32,
}

impl Admission {
    /// What the asking worker itself can take.
    pub(crate) fn strict(offer: &WorkerOffer) -> Admission {
        Admission {
            below_floor_mb: offer.memory_mb,
            lost_under: if offer.spot {
                ESCALATE_AFTER_LOST
            } else {
                u32::MAX
            },
        }
    }

    /// With no alive worker better placed for the held-back ranges (the largest
    /// memory among alive workers; whether an on-demand one is alive), the asking
    /// worker takes them too.
    pub(crate) fn relaxed(self, max_alive_memory_mb: u64, on_demand_alive: bool) -> Admission {
        Admission {
            below_floor_mb: if max_alive_memory_mb > self.below_floor_mb {
                self.below_floor_mb
            } else {
                u64::MAX
            },
            lost_under: if on_demand_alive {
                self.lost_under
            } else {
                u32::MAX
            },
        }
    }

    /// Whether a pending range is for this worker.
    pub(crate) fn admits(&self, r: &PendingRange) -> bool {
        (r.floor_memory_mb == 0 || r.floor_memory_mb < self.below_floor_mb)
            && r.lost < self.lost_under
    }
}

/// What accounting does with a fragment's end: a job that halts charges nothing.
pub(crate) fn accounted_outcome(end: &FragmentEnd) -> FinishOutcome {
    match end.halt {
        Some(_) => FinishOutcome::Yielded,
        None => end.outcome.clone(),
    }
}

/// What a finished fragment's row records, after the ledger's judgement.
pub(crate) struct Verdict {
    /// `Done`, `Yielded`, `Failed` or `Refused`/`Broken`.
    pub(crate) state: FragmentState,
    /// Failure cause.
    pub(crate) cause: Option<String>,
    /// Human-readable detail.
    pub(crate) detail: Option<String>,
    /// Whether its items finished (the model learns from it).
    pub(crate) finished: bool,
    /// Whether it finished without a single ack (an all-or-nothing task).
    pub(crate) all_or_nothing: bool,
}

/// The row's state, cause and detail: a task that exited 0 without acking in a
/// stage known to ack failed its items (`unacked`); a halt is no failure.
pub(crate) fn verdict(end: &FragmentEnd, report: &FinishReport) -> Verdict {
    if let Some(halt) = &end.halt {
        return Verdict {
            state: match halt {
                JobHalt::Refused(_) => FragmentState::Refused,
                JobHalt::Broken(_) => FragmentState::Broken,
            },
            cause: Some(halt.state().to_string()),
            detail: Some(halt.message().to_string()),
            finished: false,
            all_or_nothing: false,
        };
    }
    if report.unacked {
        let fed = end.fed.saturating_sub(end.acks);
        let mut detail = format!(
            "exited 0 without acking any of the {fed} items it was fed, in a stage whose tasks ack"
        );
        if let Some(more) = &end.detail {
            detail = format!("{detail}; {more}");
        }
        return Verdict {
            state: FragmentState::Failed,
            cause: Some("unacked".into()),
            detail: Some(detail),
            finished: false,
            all_or_nothing: false,
        };
    }
    let all_or_nothing = matches!(end.outcome, FinishOutcome::AllOrNothing { .. });
    Verdict {
        state: end.state,
        cause: end.cause.clone(),
        detail: end.detail.clone(),
        finished: end.outcome == FinishOutcome::Success || all_or_nothing,
        all_or_nothing,
    }
}

/// The total memory (MiB) a worker's stored self-description reports.
pub(crate) fn memory_of(resources: &str) -> u64 {
    serde_json::from_str::<serde_json::Value>(resources)
        .ok()
        .and_then(|v| v["memory_mb"].as_u64())
        .unwrap_or(0)
}

/// The sizing context of a claim on a stage whose `acks` are as stored: a stage
/// not known to ack loses a whole fragment to a preemption, so on spot capacity
/// its fragments must fit a tenth of the worker's expected life.
pub(crate) fn claim_context(
    req: &ClaimRequest,
    acks: Acks,
    remaining: u64,
    slots: u32,
) -> ClaimContext {
    let mut ctx = req.context.clone();
    ctx.remaining = remaining;
    ctx.slots = slots;
    if let (Some(expected), false) = (req.expected_life_ms, acks == Acks::Yes) {
        let cap = expected / 10.0;
        ctx.lifespan_ms = Some(ctx.lifespan_ms.map_or(cap, |l| l.min(cap)));
    }
    ctx
}

/// A worker silent this long is taken for ended in the pool's history.
const SILENT_MS: i64 = 60_000;

/// A worker's life as the store keeps it, for the pool forecast.
pub(crate) struct HistoryRow {
    pub(crate) class: String,
    pub(crate) spot: bool,
    pub(crate) slots: i64,
    pub(crate) started_ms: i64,
    /// Its last heartbeat.
    pub(crate) heard_ms: i64,
    /// `running`, `draining` or `exited`.
    pub(crate) state: String,
    /// Whether it lost a fragment in the window.
    pub(crate) lost: bool,
}

/// The pool history as the core's forecast takes it.
pub(crate) fn worker_span(now_ms: i64, row: HistoryRow) -> WorkerSpan {
    let ended = row.state == "exited" || row.heard_ms < now_ms - SILENT_MS;
    WorkerSpan {
        class: row.class,
        spot: row.spot,
        slots: row.slots.max(0) as u32,
        start_ms: row.started_ms,
        end_ms: ended.then_some(row.heard_ms),
        lost: row.lost,
    }
}

/// A finished fragment, as the status figures need it.
pub(crate) struct DoneRow {
    pub(crate) class: String,
    pub(crate) n: u64,
    pub(crate) predicted_ms: f64,
    pub(crate) observed_ms: f64,
    pub(crate) cpu_ms: f64,
    pub(crate) peak_rss_kb: u64,
    pub(crate) io_bytes: u64,
}

/// Per-class figures of a stage from its finished fragments (in finish order) and
/// its sizer states.
pub(crate) fn class_statuses(rows: &[DoneRow], sizers: &[(String, Sizer)]) -> Vec<ClassStatus> {
    let mut classes: Vec<&str> = sizers.iter().map(|(c, _)| c.as_str()).collect();
    classes.extend(rows.iter().map(|r| r.class.as_str()));
    classes.sort_unstable();
    classes.dedup();
    classes
        .into_iter()
        .map(|class| {
            let mine: Vec<&DoneRow> = rows.iter().filter(|r| r.class == class).collect();
            let model = sizers
                .iter()
                .find(|(c, _)| c == class)
                .map(|(_, s)| s.model.clone())
                .unwrap_or_default();
            let pairs: Vec<(f64, f64)> = mine
                .iter()
                .map(|r| (r.predicted_ms, r.observed_ms))
                .collect();
            let (median, p90) = prediction_error(&pairs);
            let recent = &mine[mine.len().saturating_sub(10)..];
            ClassStatus {
                class: class.to_string(),
                fragments: mine.len() as u64,
                items: mine.iter().map(|r| r.n).sum(),
                item_cost_us: model.b_ms * 1e3,
                item_cost_spread_us: model.b_var.max(0.0).sqrt() * 1e3,
                overhead_ms: model.a_ms,
                fragment_size: recent.iter().map(|r| r.n as f64).sum::<f64>()
                    / recent.len().max(1) as f64,
                prediction_error_median: median,
                prediction_error_p90: p90,
            }
        })
        .collect()
}

/// What bounds a stage, and where that judgement comes from: its history, else
/// its declared class, else the class its name and command suggest.
pub(crate) fn stage_profile(
    rows: &[DoneRow],
    needs: &StageNeeds,
) -> (Option<String>, Option<String>) {
    let cpu: f64 = rows.iter().map(|r| r.cpu_ms).sum();
    let wall: f64 = rows.iter().map(|r| r.observed_ms).sum();
    let rss = rows.iter().map(|r| r.peak_rss_kb).max().unwrap_or(0);
    let io: u64 = rows.iter().map(|r| r.io_bytes).sum();
    let known =
        |p: Option<&str>, source: &str| p.map(|p| (Some(p.to_string()), Some(source.to_string())));
    known(profile(cpu, wall, rss, io), "history")
        .or_else(|| known(needs.class.as_deref(), "declared"))
        .or_else(|| known(needs.guess.as_deref(), "guess"))
        .unwrap_or((None, None))
}

/// How much more a running fragment's remaining work is worth splitting off for
/// an idle worker of a class that is faster on its stage: the owner's learned
/// per-item cost over the asker's (at least 1; 1 when either is unknown). A
/// fragment stuck on a slow class moves first when a better placement appears.
pub(crate) fn split_gain(owner: &CostModel, asker: &CostModel) -> f64 {
    if owner.ready() && asker.ready() && asker.b_ms > 0.0 {
        (owner.b_ms / asker.b_ms).max(1.0)
    } else {
        1.0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_class_whose_capacity_is_falling_counts_as_what_it_will_have() {
        let minute = 60_000;
        // 20 spot workers an hour ago; one gone every 3 minutes since, 10 left.
        let history: Vec<WorkerSpan> = (0..20)
            .map(|i| WorkerSpan {
                class: "spot".into(),
                spot: true,
                slots: 1,
                start_ms: 0,
                end_ms: (i < 10).then_some(30 * minute + (i + 1) * 3 * minute),
                lost: true,
            })
            .collect();
        let now = 60 * minute;
        let mut pool = vec![
            PoolClass {
                class: "spot".into(),
                slots: 10.0,
                cost_per_slot_hour: 0.1,
            },
            PoolClass {
                class: "ondemand".into(),
                slots: 4.0,
                cost_per_slot_hour: 1.0,
            },
        ];
        expect_drops(&mut pool, &forecast_recent(&history, now));
        assert!(pool[0].slots < 9.0, "{}", pool[0].slots);
        assert_eq!(pool[1].slots, 4.0, "no history: as it is");
    }
}

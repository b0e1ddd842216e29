//! What a claim decides, as pure functions over what the store read: which ready
//! stages a worker tries and in what order (placement, the deadline plan), which
//! pending ranges it may take (admission), the sizing context, and where a running
//! fragment is split for an idle worker. Both backends call these; nothing here
//! reads a store.

use crate::{
    critical_paths, expect_drops, forecast_recent, order, per_class_costs, pool_classes,
    pool_deadline_plan, Candidate, ClaimContext, CostModel, IntervalSet, PendingRange, PoolClass,
    Sizer, Span, StageNeeds, StageWork, WorkerOffer, WorkerSpan,
};

/// One stage of a job as the claim path sees it, for placement.
pub struct StageView {
    /// Position in the job.
    pub idx: usize,
    /// Its needs, class, priority and owner.
    pub needs: StageNeeds,
    /// The stages it waits for.
    pub after: Vec<usize>,
    /// Whether a worker of the asking offer could take from it now.
    pub ready: bool,
    /// Fragments running.
    pub running: u64,
    /// Items not yet done.
    pub left: u64,
    /// Per-item cost learned on each class (classes with a ready model only).
    pub learned: Vec<(String, f64)>,
    /// Whether its tasks have written checkpoints.
    pub checkpoints: bool,
    /// When it should be done (its job's submission + its `deadline`), unix ms.
    pub deadline_at_ms: Option<i64>,
    /// Its owner's turn in the fair share order across jobs (`fair::turns`; 0 first).
    pub owner_turn: u64,
}

/// The sizer state with the most history among a stage's classes.
pub fn busiest(sizers: &[(String, Sizer)]) -> Sizer {
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
pub fn live_pool(
    rows: Vec<(String, i64, f64)>,
    history: &[WorkerSpan],
    now_ms: i64,
) -> Vec<PoolClass> {
    let mut pool = pool_classes(rows.into_iter().map(|(c, s, cost)| (c, s as f64, cost)));
    expect_drops(&mut pool, &forecast_recent(history, now_ms));
    pool
}

/// A job's deadline plan over the live pool: the time left to the earliest
/// deadline of a ready stage, the soonest the pool could finish the ready work, and
/// per view per pool class whether that class may take the stage's work (the
/// cheapest plan that still finishes it by the deadline, 90% of the time left, or as
/// soon as possible if that is too late; a class whose cost on the stage is not
/// learned yet is let in, to learn it).
#[derive(Clone, Debug, PartialEq)]
pub struct JobDeadlinePlan {
    /// Until the earliest deadline, ms.
    pub time_left_ms: f64,
    /// The soonest every live slot together could finish the ready work, ms.
    pub soonest_ms: f64,
    /// `takes[view][pool class]`.
    pub takes: Vec<Vec<bool>>,
}

/// The plan of [`JobDeadlinePlan`]; `None` when no ready stage has a deadline, no
/// cost is learned at all, or the pool cannot run the work.
pub fn job_deadline_plan(
    views: &[StageView],
    pool: &[PoolClass],
    now_ms: i64,
) -> Option<JobDeadlinePlan> {
    let deadline = views
        .iter()
        .filter(|v| v.ready)
        .filter_map(|v| v.deadline_at_ms)
        .min()?;
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
    let time_left_ms = (deadline - now_ms) as f64;
    let (soonest_ms, plan) = pool_deadline_plan(&work, pool, time_left_ms)?;
    let takes = views
        .iter()
        .enumerate()
        .map(|(i, v)| {
            pool.iter()
                .enumerate()
                .map(|(c, p)| {
                    let unknown = !v.learned.iter().any(|(k, _)| *k == p.class);
                    plan.planned[i][c] || unknown
                })
                .collect()
        })
        .collect();
    Some(JobDeadlinePlan {
        time_left_ms,
        soonest_ms,
        takes,
    })
}

/// With a deadline on a ready stage: for each view, whether the asking class may
/// take its work in the job's deadline plan ([`job_deadline_plan`]). `None` when
/// there is no plan or the class is not in the live pool.
pub fn class_deadline_plan(
    views: &[StageView],
    pool: &[PoolClass],
    class: &str,
    now_ms: i64,
) -> Option<Vec<bool>> {
    let me = pool.iter().position(|p| p.class == class)?;
    let plan = job_deadline_plan(views, pool, now_ms)?;
    Some(plan.takes.iter().map(|row| row[me]).collect())
}

/// The ready stages (by `idx`) in the order a worker offering `offer` should try
/// them: the core's `order` over what the store knows (the deadline plan, priority,
/// owner fairness across jobs (each view's `owner_turn`), comparative advantage from the per-class cost
/// models, the preferred class, the critical path, the least-served stage). With
/// a deadline plan (`planned`, per view), stages it keeps from this class are left
/// out: their work waits for cheaper classes, or for the plan to change.
pub fn placement_order(
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
                owner_turn: v.owner_turn,
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
pub const ESCALATE_AFTER_LOST: u32 = 2;

/// Which pending ranges a worker may take. Items that ran out of memory go to a
/// worker with more memory, and items lost with spot workers twice go to an
/// on-demand worker, while such a worker is alive; otherwise anyone takes them.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Admission {
    /// Ranges with a memory floor at or above this are left for others.
    pub below_floor_mb: u64,
    /// Ranges lost this often or more are left for others.
    pub lost_under: u32,
}

impl Admission {
    /// What the asking worker itself can take.
    pub fn strict(offer: &WorkerOffer) -> Admission {
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
    pub fn relaxed(self, max_alive_memory_mb: u64, on_demand_alive: bool) -> Admission {
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
    pub fn admits(&self, r: &PendingRange) -> bool {
        (r.floor_memory_mb == 0 || r.floor_memory_mb < self.below_floor_mb)
            && r.lost < self.lost_under
    }
}

/// Whether a worker offering `offer` could take from a stage now: the stage is not
/// finished, every stage it waits for (`after`) is, and one of its slots fits the
/// worker (`finished` is per stage of the job, by position).
pub fn stage_ready(
    finished: &[bool],
    idx: usize,
    after: &[usize],
    needs: &StageNeeds,
    offer: &WorkerOffer,
) -> bool {
    !finished[idx]
        && after
            .iter()
            .all(|&a| finished.get(a).copied().unwrap_or(true))
        && crate::fits(needs, offer).is_ok()
}

/// The sizing context of a claim on a stage: one not known to ack (`acking` false)
/// loses a whole fragment to a preemption, so on spot capacity (an expected life
/// `M`) its fragments are capped at Young's optimal interval `sqrt(2 · a · M)`,
/// `a` the model's start cost (a tenth of `M` while it is not known), and never
/// under room for one item at a high cost (twice the start and the upper quantile
/// of an item, plus the drain margin): the life is a forecast, and a cap one item
/// cannot fit would keep the stage off spot capacity for good. Young (CACM 17(9),
/// 1974) derived it for checkpoints: the length whose start cost and expected loss
/// to a failure together are least. (A tenth of the life, the rule it replaced,
/// lost 5% to preemptions where starts were cheap and made 30 s starts a fifth of
/// every fragment.)
pub fn claim_context(
    base: &ClaimContext,
    expected_life_ms: Option<f64>,
    model: &CostModel,
    acking: bool,
    remaining: u64,
    slots: u32,
) -> ClaimContext {
    let mut ctx = base.clone();
    ctx.remaining = remaining;
    ctx.slots = slots;
    ctx.acking = acking;
    if let (Some(expected), false) = (expected_life_ms, acking) {
        let young = match model.a_ms > 0.0 {
            true => (2.0 * model.a_ms * expected).sqrt().min(expected),
            false => expected / 10.0,
        };
        let one = 2.0 * (model.a_ms + model.b_high_ms()) + base.all_or_nothing_margin_ms;
        let cap = young.max(one);
        ctx.lifespan_ms = Some(ctx.lifespan_ms.map_or(cap, |l| l.min(cap)));
    }
    ctx
}

/// Items a running fragment has likely not run yet, judged by time where its acks
/// do not tell (a task that does not ack, or slots that do not split): its `left`
/// items in proportion to the part of its predicted duration not yet spent, none
/// once past it. A claim counts these with the pending items, so that it takes its
/// share of all the work outstanding, not of what is unclaimed: near the end an
/// idle slot takes what evens its finish with the busy ones. The stores compute
/// the same in SQL (`store::ops::claim`), when [`size_with_unrun`] asks.
pub fn unrun_estimate(left: u64, elapsed_ms: f64, predicted_ms: f64) -> f64 {
    if predicted_ms <= 0.0 || elapsed_ms <= 0.0 {
        return left as f64;
    }
    left as f64 * (1.0 - elapsed_ms / predicted_ms).max(0.0)
}

/// Sizes a claim whose context counts only pending items (and, where idle slots
/// split a task that acks, running fragments' unacked items: `ctx.remaining`).
/// Elsewhere running fragments' unrun items count too ([`unrun_estimate`]), but
/// reading them costs the stores a scan per claim: they are asked for (`unrun`)
/// only where the size depends on the work left (factoring's share, the tail),
/// and the claim is sized again from the sizer as it was. More work left only
/// loosens the tail cap (monotone in it) and raises factoring's share, so a size
/// another rule set stands; where the share counted with them would have passed
/// the model's size, the claim stays at the model's: smaller, never larger.
pub fn size_with_unrun<E>(
    sizer: &mut Sizer,
    cfg: &crate::SizerConfig,
    ctx: &ClaimContext,
    unrun: impl FnOnce() -> Result<u64, E>,
) -> Result<crate::Sizing, E> {
    let before = sizer.clone();
    let sizing = sizer.size(cfg, ctx);
    let counted = ctx.acking && ctx.splits;
    if counted || !matches!(sizing.cap, crate::SizeCap::Share | crate::SizeCap::Tail) {
        return Ok(sizing);
    }
    let more = unrun()?;
    if more == 0 {
        return Ok(sizing);
    }
    *sizer = before;
    let ctx = ClaimContext {
        remaining: ctx.remaining + more,
        ..ctx.clone()
    };
    Ok(sizer.size(cfg, &ctx))
}

/// Where to split a running fragment, and how much work its tail holds: the owner
/// keeps `keep` (see [`split_share`]) of what it has not acked. Its remaining work
/// is judged by the model's per-item cost, or by its own pace once it runs past its
/// prediction (a straggler). `None` if the remaining work is under `min_ms` or 4
/// overheads, or the owner keeps it all.
pub fn split_point(
    span: Span,
    acked: &IntervalSet,
    model: &CostModel,
    elapsed_ms: i64,
    predicted_ms: f64,
    min_ms: f64,
    keep: f64,
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
    let kept = ((span.end - tail_start) as f64 * keep.clamp(0.0, 1.0)).ceil() as u64;
    let at = tail_start + kept;
    (remaining_ms >= min_ms.max(4.0 * model.a_ms) && at > tail_start && at < span.end)
        .then_some((remaining_ms, at))
}

/// The share of a running fragment's unacked tail its owner keeps when an idle
/// slot splits it: where both classes learned the stage, such that both halves end
/// together (`asker / (owner + asker)` per-item costs: a CPU splitting a GPU's
/// fragment of a stage the GPU runs 20x faster takes 1/21 of it); else half.
pub fn split_share(owner: &CostModel, asker: &CostModel) -> f64 {
    if owner.ready() && asker.ready() && owner.b_ms > 0.0 && asker.b_ms > 0.0 {
        asker.b_ms / (owner.b_ms + asker.b_ms)
    } else {
        0.5
    }
}

/// How much more a running fragment's remaining work is worth splitting off for
/// an idle worker of a class that is faster on its stage: the owner's learned
/// per-item cost over the asker's (at least 1; 1 when either is unknown). A
/// fragment stuck on a slow class moves first when a better placement appears.
pub fn split_gain(owner: &CostModel, asker: &CostModel) -> f64 {
    if owner.ready() && asker.ready() && asker.b_ms > 0.0 {
        (owner.b_ms / asker.b_ms).max(1.0)
    } else {
        1.0
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{PoolClass, SizeCap};

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

    /// A claim's context on a quiet worker with no life limit, of a task not known
    /// to ack, where slots do not split.
    fn quiet(remaining: u64, slots: u32) -> ClaimContext {
        ClaimContext {
            remaining,
            slots,
            free_memory: 1.0,
            load_per_cpu: 0.0,
            lifespan_ms: None,
            acking: false,
            splits: false,
            all_or_nothing_margin_ms: 0.0,
        }
    }

    #[test]
    fn work_that_cannot_keep_partial_results_is_cut_at_youngs_interval_on_spot() {
        let base = quiet(0, 1);
        let model = |a_ms: f64, b_ms: f64| {
            let mut m = CostModel::default();
            (m.a_ms, m.b_ms) = (a_ms, b_ms);
            m
        };
        let half_hour = 1_800_000.0;
        // A 30 s start, a preemption every 30 minutes: fragments of ~5.5 minutes,
        // where a tenth of the life (3 minutes) paid the start a sixth of the time.
        let ctx = claim_context(&base, Some(half_hour), &model(30_000.0, 1.0), false, 10, 1);
        let young = (2.0 * 30_000.0 * half_hour).sqrt();
        assert_eq!(ctx.lifespan_ms, Some(young));
        assert!((328_000.0..329_000.0).contains(&young));
        // A 20 ms start: 8.5 s, where a tenth of the life lost 5% to preemptions.
        let cheap = claim_context(&base, Some(half_hour), &model(20.0, 1.0), false, 10, 1);
        assert!(cheap.lifespan_ms.unwrap() < 9_000.0, "{cheap:?}");
        // ...but never under room for one item: 10 s items still fit (a cap one item
        // cannot fit would keep the stage off spot workers for good).
        let dear = claim_context(&base, Some(half_hour), &model(20.0, 10_000.0), false, 10, 1);
        assert!(dear.lifespan_ms.unwrap() >= 20_000.0, "{dear:?}");
        // Start cost not known yet: a tenth of the life.
        let unknown = claim_context(&base, Some(half_hour), &model(0.0, 0.0), false, 10, 1);
        assert_eq!(unknown.lifespan_ms, Some(half_hour / 10.0));
        // A task that acks keeps its work: no cap; a shorter own life still binds.
        let acking = claim_context(&base, Some(half_hour), &model(30_000.0, 1.0), true, 10, 1);
        assert_eq!(acking.lifespan_ms, None);
        let short = ClaimContext {
            lifespan_ms: Some(60_000.0),
            ..base.clone()
        };
        let ctx = claim_context(&short, Some(half_hour), &model(30_000.0, 1.0), false, 10, 1);
        assert_eq!(ctx.lifespan_ms, Some(60_000.0));
    }

    #[test]
    fn a_running_fragment_counts_the_items_its_predicted_time_has_not_reached() {
        assert_eq!(unrun_estimate(1_000, 0.0, 500.0), 1_000.0);
        assert_eq!(unrun_estimate(1_000, 250.0, 500.0), 500.0);
        assert_eq!(
            unrun_estimate(1_000, 900.0, 500.0),
            0.0,
            "past its prediction"
        );
        assert_eq!(
            unrun_estimate(1_000, 10.0, 0.0),
            1_000.0,
            "nothing predicted"
        );
    }

    #[test]
    fn running_work_is_read_only_where_the_size_depends_on_the_work_left() {
        let cfg = crate::SizerConfig::default();
        let mut sizer = Sizer::default();
        sizer.model.observations = 9;
        sizer.model.ack_intervals = 100.0;
        (sizer.model.a_ms, sizer.model.b_ms) = (20.0, 0.1);
        let ctx = |remaining| quiet(remaining, 2);
        let asked = std::cell::Cell::new(0);
        let unrun = |n: u64| {
            asked.set(asked.get() + 1);
            Ok::<u64, ()>(n)
        };
        // Near the end (the tail): the running fragment's 1,200 unrun items count,
        // and the claim is an equal share of the 3,200 outstanding.
        let mut s = sizer.clone();
        let end = size_with_unrun(&mut s, &cfg, &ctx(2_000), || unrun(1_200)).unwrap();
        assert_eq!((end.n, asked.get()), (1_600, 1), "{end:?}");
        assert_eq!(s, sizer, "sized again from the state it had");
        // A size the model sets alone does not read them.
        let far = ClaimContext {
            splits: true,
            ..ctx(u64::MAX / 4)
        };
        let mut s = sizer.clone();
        let model = size_with_unrun(&mut s, &cfg, &far, || unrun(1)).unwrap();
        assert_eq!((model.cap, asked.get()), (SizeCap::Model, 1));
        // Where idle slots split a task that acks, the context counts them already.
        let acking = ClaimContext {
            acking: true,
            splits: true,
            ..ctx(3_000)
        };
        let mut s = sizer.clone();
        size_with_unrun(&mut s, &cfg, &acking, || unrun(1)).unwrap();
        assert_eq!(asked.get(), 1, "never asked");
    }

    fn view(idx: usize, left: u64, deadline_at_ms: Option<i64>) -> StageView {
        StageView {
            idx,
            needs: StageNeeds::default(),
            after: Vec::new(),
            ready: true,
            running: 0,
            left,
            learned: vec![("cheap".into(), 1.0), ("dear".into(), 0.5)],
            checkpoints: false,
            deadline_at_ms,
            owner_turn: 0,
        }
    }

    #[test]
    fn the_deadline_plan_keeps_dear_classes_waiting_while_cheap_ones_make_it() {
        let pool = vec![
            PoolClass {
                class: "cheap".into(),
                slots: 10.0,
                cost_per_slot_hour: 1.0,
            },
            PoolClass {
                class: "dear".into(),
                slots: 10.0,
                cost_per_slot_hour: 10.0,
            },
        ];
        let hour = 3_600_000;
        // 1,000 items of 1 ms on 10 cheap slots: far inside the hour.
        let views = vec![view(0, 1_000, Some(hour))];
        let plan = job_deadline_plan(&views, &pool, 0).expect("a plan");
        assert_eq!(plan.takes, vec![vec![true, false]]);
        assert_eq!(plan.time_left_ms, hour as f64);
        assert!(plan.soonest_ms < 1_000.0, "{}", plan.soonest_ms);
        // What a claim asks is the same plan, one class's column.
        assert_eq!(
            class_deadline_plan(&views, &pool, "dear", 0),
            Some(vec![false])
        );
        assert_eq!(
            class_deadline_plan(&views, &pool, "cheap", 0),
            Some(vec![true])
        );
        // Far more work than the cheap class can do by the deadline: the dear one helps.
        let views = vec![view(0, 100_000_000, Some(hour))];
        assert_eq!(
            class_deadline_plan(&views, &pool, "dear", 0),
            Some(vec![true])
        );
        // No deadline on a ready stage: no plan.
        assert_eq!(job_deadline_plan(&[view(0, 1_000, None)], &pool, 0), None);
    }
}

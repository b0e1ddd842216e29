//! Planning: which ready stage a free slot serves, given what has been learned of
//! each stage on each executor class, of the pool and of the deadlines.
//!
//! `fits` (in `placement`) is the hard rule. `class_plan` is the periodic fluid
//! plan: the cheapest assignment of the remaining work to classes that still
//! finishes within a horizon (the deadline, or a little past the soonest possible
//! finish). `order` sorts the stages that fit, by: the plan (a class the plan
//! leaves out of a stage goes last), priority, owner
//! fairness (the owner's turn in the fair share order, `fair::turns`), comparative advantage
//! (the stage this class is relatively best at), the declared preferred class,
//! checkpointing work on spot workers (and the rest on on-demand ones), the
//! critical path of the DAG (the stage with the most work behind it first), then
//! the least-served stage. The worker, the store's claim path and the simulator all
//! call these functions.

use crate::forecast::ClassForecast;
use crate::placement::{StageNeeds, WorkerOffer};

/// One ready stage that fits a worker, as placement sees it from that worker.
#[derive(Clone, Debug, PartialEq)]
pub struct Candidate<'a> {
    /// What a slot of the stage needs, and its class, priority and owner.
    pub needs: &'a StageNeeds,
    /// The stage's position in its job (DAG order); breaks the last tie.
    pub index: usize,
    /// Fragments of the stage running now.
    pub running: u64,
    /// Its owner's turn in the fair share order across jobs (`fair::turns`; 0 first).
    pub owner_turn: u64,
    /// Predicted work, ms, on the longest DAG path that starts at this stage.
    pub critical_ms: f64,
    /// This worker's class's per-item cost on the stage over the best class's
    /// (1.0: no class is better, or nothing is known yet).
    pub slowdown: f64,
    /// Whether the plan (`class_plan`) lets this worker's class take the stage's work.
    pub planned: bool,
    /// Whether the stage's tasks write checkpoints (a preemption then loses
    /// little): such work goes to spot workers first, other work to on-demand ones.
    pub checkpoints: bool,
}

/// Sort key of a candidate: smaller goes first. Slowdowns within 10% of each
/// other count as equal, so noise in the estimates does not reorder stages.
pub fn order_key(c: &Candidate<'_>, offer: &WorkerOffer) -> impl Ord {
    let preferred_elsewhere = c.needs.preferred_class().is_some_and(|x| x != offer.class);
    let slowdown = (c.slowdown.max(1.0).ln() / 1.1f64.ln()).floor() as i64;
    (
        !c.planned,
        -c.needs.priority,
        c.owner_turn,
        slowdown,
        preferred_elsewhere,
        c.checkpoints != offer.spot,
        -(c.critical_ms.max(0.0) as i64),
        c.running,
        c.index,
    )
}

/// Sorts candidates into the order a free slot of `offer` should try them.
pub fn order(candidates: &mut [Candidate<'_>], offer: &WorkerOffer) {
    candidates.sort_by_cached_key(|c| order_key(c, offer));
}

/// For each stage, its remaining work plus the longest chain of work behind it.
/// `after[i]` are the stages stage `i` waits for; `work_ms[i]` its remaining work.
pub fn critical_paths(after: &[Vec<usize>], work_ms: &[f64]) -> Vec<f64> {
    let n = work_ms.len();
    let mut memo: Vec<Option<f64>> = vec![None; n];
    // The stages that wait for each stage.
    let mut next: Vec<Vec<usize>> = vec![Vec::new(); n];
    for (i, deps) in after.iter().enumerate() {
        for &d in deps {
            if d < n {
                next[d].push(i);
            }
        }
    }
    fn walk(i: usize, next: &[Vec<usize>], work: &[f64], memo: &mut [Option<f64>]) -> f64 {
        if let Some(v) = memo[i] {
            return v;
        }
        memo[i] = Some(work[i]); // a cycle (refused by the spec) cannot recurse forever
        let tail = next[i]
            .iter()
            .map(|&j| walk(j, next, work, memo))
            .fold(0.0, f64::max);
        memo[i] = Some(work[i] + tail);
        work[i] + tail
    }
    (0..n).map(|i| walk(i, &next, work_ms, &mut memo)).collect()
}

/// The remaining work of one stage, as the fluid plan sees it.
#[derive(Clone, Debug, PartialEq)]
pub struct StageWork {
    /// Items left (pending and running unacked).
    pub items: f64,
    /// Predicted per-item cost on each class, ms; `None` where the class may not run it.
    pub per_item_ms: Vec<Option<f64>>,
}

/// The cheapest fluid assignment of every stage's items to classes that fits each
/// class's capacity (slot-ms): `Some(items[stage][class])`, or `None` if no
/// assignment fits. `cost_per_ms[c]` is what a slot-ms of class `c` costs.
pub fn assign(
    work: &[StageWork],
    capacity_ms: &[f64],
    cost_per_ms: &[f64],
) -> Option<Vec<Vec<f64>>> {
    use microlp::{ComparisonOp, OptimizationDirection, Problem, SolveOutcome};
    let classes = capacity_ms.len();
    let mut lp = Problem::new(OptimizationDirection::Minimize);
    let mut vars = vec![vec![None; classes]; work.len()];
    let mut per_class: Vec<Vec<(microlp::Variable, f64)>> = vec![Vec::new(); classes];
    for (s, w) in work.iter().enumerate() {
        let mut row = Vec::new();
        for c in 0..classes {
            let Some(ms) = w.per_item_ms.get(c).copied().flatten() else {
                continue;
            };
            let x = lp.add_var(
                ms * cost_per_ms.get(c).copied().unwrap_or(0.0),
                (0.0, f64::INFINITY),
            );
            vars[s][c] = Some(x);
            row.push((x, 1.0));
            per_class[c].push((x, ms));
        }
        if w.items > 0.0 {
            if row.is_empty() {
                return None;
            }
            lp.add_constraint(&row, ComparisonOp::Eq, w.items);
        }
    }
    for (c, col) in per_class.iter().enumerate() {
        if !col.is_empty() {
            lp.add_constraint(col, ComparisonOp::Le, capacity_ms[c].max(0.0));
        }
    }
    let Ok(SolveOutcome::Solution(solution)) = lp.solve() else {
        return None;
    };
    Some(
        vars.iter()
            .map(|row| row.iter().map(|v| v.map_or(0.0, |x| solution[x])).collect())
            .collect(),
    )
}

/// The least time within which the pool (`slots` per class) could finish all the
/// work in the fluid relaxation, to within 0.1%; `None` if not by `upper_ms`.
pub fn fluid_finish(work: &[StageWork], slots: &[f64], upper_ms: f64) -> Option<f64> {
    let fits = |h: f64| {
        let capacity: Vec<f64> = slots.iter().map(|s| s * h).collect();
        assign(work, &capacity, &[]).is_some()
    };
    if !fits(upper_ms) {
        return None;
    }
    let (mut lo, mut hi) = (0.0, upper_ms);
    while hi - lo > hi * 1e-3 {
        let mid = (lo + hi) / 2.0;
        if fits(mid) {
            hi = mid;
        } else {
            lo = mid;
        }
    }
    Some(hi)
}

/// The plan for the pool: which classes take which stage, and how many slots of
/// each class the work needs (the rest may leave).
#[derive(Clone, Debug, PartialEq)]
pub struct ClassPlan {
    /// `planned[stage][class]`: whether the class takes the stage's work.
    pub planned: Vec<Vec<bool>>,
    /// Slots of each class the plan keeps busy until the horizon.
    pub slots_wanted: Vec<f64>,
    /// The horizon the plan finishes the work within, ms.
    pub horizon_ms: f64,
}

/// The cheapest assignment of the remaining work to classes that still finishes
/// everything within `horizon_ms`. Where nothing fits the horizon, every class
/// that may run a stage is planned for it, and every slot is wanted.
pub fn class_plan(
    work: &[StageWork],
    slots: &[f64],
    cost_per_ms: &[f64],
    horizon_ms: f64,
) -> ClassPlan {
    let capacity: Vec<f64> = slots.iter().map(|s| s * horizon_ms).collect();
    let Some(assigned) = assign(work, &capacity, cost_per_ms) else {
        return ClassPlan {
            planned: work
                .iter()
                .map(|w| {
                    (0..slots.len())
                        .map(|c| w.per_item_ms.get(c).copied().flatten().is_some())
                        .collect()
                })
                .collect(),
            slots_wanted: slots.to_vec(),
            horizon_ms,
        };
    };
    let planned = work
        .iter()
        .zip(&assigned)
        .map(|(w, row)| {
            (0..slots.len())
                .map(|c| {
                    w.per_item_ms.get(c).copied().flatten().is_some()
                        && (row[c] > 0.5 || w.items <= 0.0)
                })
                .collect()
        })
        .collect();
    let slots_wanted = (0..slots.len())
        .map(|c| {
            let busy_ms: f64 = work
                .iter()
                .zip(&assigned)
                .map(|(w, row)| row[c] * w.per_item_ms.get(c).copied().flatten().unwrap_or(0.0))
                .sum();
            busy_ms / horizon_ms.max(1e-9)
        })
        .collect();
    ClassPlan {
        planned,
        slots_wanted,
        horizon_ms,
    }
}

/// Share of the time left before a deadline that a plan aims to finish within.
pub const DEADLINE_SHARE: f64 = 0.9;
/// How far past the soonest possible finish a plan may go when that is cheaper
/// (or when the deadline cannot be made anyway).
pub const PLAN_SLACK: f64 = 0.05;

/// The plan for finishing `work` by a deadline `time_left_ms` away at least cost:
/// the soonest possible finish (every class busy), and the cheapest assignment
/// within `DEADLINE_SHARE` of the time left, or `PLAN_SLACK` past the soonest
/// finish if that is later (the deadline cannot be made: as soon as possible).
/// `None` if the pool cannot run the work at all.
pub fn deadline_plan(
    work: &[StageWork],
    slots: &[f64],
    cost_per_ms: &[f64],
    time_left_ms: f64,
) -> Option<(f64, ClassPlan)> {
    let soonest = fluid_finish(work, slots, 1e12)?;
    let horizon = (DEADLINE_SHARE * time_left_ms).max(soonest * (1.0 + PLAN_SLACK));
    Some((soonest, class_plan(work, slots, cost_per_ms, horizon)))
}

/// A class of live workers, as a deadline plan sees the pool.
#[derive(Clone, Debug, PartialEq)]
pub struct PoolClass {
    /// The class.
    pub class: String,
    /// Its live slots (or fewer, if its capacity is forecast to drop).
    pub slots: f64,
    /// Its price per slot-hour.
    pub cost_per_slot_hour: f64,
}

/// Live worker classes from one `(class, slots, cost per worker-hour)` per worker.
pub fn pool_classes(workers: impl IntoIterator<Item = (String, f64, f64)>) -> Vec<PoolClass> {
    let mut pool: Vec<PoolClass> = Vec::new();
    for (class, slots, cost) in workers {
        let slots = slots.max(1.0);
        match pool.iter_mut().find(|p| p.class == class) {
            Some(p) => {
                let total = p.slots + slots;
                p.cost_per_slot_hour = (p.cost_per_slot_hour * p.slots + cost) / total;
                p.slots = total;
            }
            None => pool.push(PoolClass {
                class,
                slots,
                cost_per_slot_hour: cost / slots,
            }),
        }
    }
    pool
}

/// Counts each class's slots as what its history forecasts ahead when that is
/// less than what is alive now: a plan brings in other classes before capacity
/// drops, not after (growth counts once it is here).
pub fn expect_drops(pool: &mut [PoolClass], forecast: &[ClassForecast]) {
    for p in pool.iter_mut() {
        if let Some(f) = forecast.iter().find(|f| f.class == p.class) {
            p.slots = p.slots.min(f.slots_ahead.max(1.0));
        }
    }
}

/// A stage's per-item cost on each class of `pool`: what that class learned, else
/// the best any class learned (`None` where nothing is learned at all).
pub fn per_class_costs(learned: &[(String, f64)], pool: &[PoolClass]) -> Vec<Option<f64>> {
    let best = learned.iter().map(|(_, b)| *b).min_by(f64::total_cmp);
    pool.iter()
        .map(|p| {
            learned
                .iter()
                .find(|(c, _)| *c == p.class)
                .map(|(_, b)| *b)
                .or(best)
        })
        .collect()
}

/// `deadline_plan` over a pool of live classes.
pub fn pool_deadline_plan(
    work: &[StageWork],
    pool: &[PoolClass],
    time_left_ms: f64,
) -> Option<(f64, ClassPlan)> {
    let slots: Vec<f64> = pool.iter().map(|p| p.slots).collect();
    let prices: Vec<f64> = pool
        .iter()
        .map(|p| p.cost_per_slot_hour / 3_600_000.0)
        .collect();
    deadline_plan(work, &slots, &prices, time_left_ms)
}

/// Holt's linear exponential smoothing of a series sampled at a steady interval:
/// forecasts a class's available slots or preemption rate a few steps ahead.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Holt {
    level: Option<f64>,
    trend: f64,
}

impl Holt {
    /// Smoothing of the level.
    pub const ALPHA: f64 = 0.3;
    /// Smoothing of the trend.
    pub const BETA: f64 = 0.1;

    /// Takes the next sample.
    pub fn observe(&mut self, x: f64) {
        match self.level {
            None => self.level = Some(x),
            Some(level) => {
                let next = Self::ALPHA * x + (1.0 - Self::ALPHA) * (level + self.trend);
                self.trend = Self::BETA * (next - level) + (1.0 - Self::BETA) * self.trend;
                self.level = Some(next);
            }
        }
    }

    /// The value expected `steps` samples ahead (never below zero); `None` before
    /// the first sample.
    pub fn forecast(&self, steps: f64) -> Option<f64> {
        self.level.map(|l| (l + self.trend * steps).max(0.0))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn needs(priority: i64, owner: &str, class: Option<&str>) -> StageNeeds {
        StageNeeds {
            priority,
            owner: Some(owner.into()),
            class: class.map(Into::into),
            ..StageNeeds::default()
        }
    }

    fn candidate(needs: &StageNeeds, index: usize) -> Candidate<'_> {
        Candidate {
            needs,
            index,
            running: 0,
            owner_turn: 0,
            critical_ms: 0.0,
            slowdown: 1.0,
            planned: true,
            checkpoints: false,
        }
    }

    fn offer(class: &str) -> WorkerOffer {
        WorkerOffer {
            class: class.into(),
            slots: 1,
            ..WorkerOffer::default()
        }
    }

    proptest! {
        /// Among planned stages a higher priority always comes first, whatever
        /// else differs.
        #[test]
        fn priority_orders_first(
            pa in -3i64..3, pb in -3i64..3,
            ra in 0u64..9, rb in 0u64..9, oa in 0u64..9, ob in 0u64..9,
            sa in 1.0f64..20.0, sb in 1.0f64..20.0, ca in 0.0f64..1e6, cb in 0.0f64..1e6,
        ) {
            let (na, nb) = (needs(pa, "x", Some("gpu")), needs(pb, "y", None));
            let a = Candidate { running: ra, owner_turn: oa, slowdown: sa, critical_ms: ca, ..candidate(&na, 1) };
            let b = Candidate { running: rb, owner_turn: ob, slowdown: sb, critical_ms: cb, ..candidate(&nb, 0) };
            let o = offer("cpu");
            if pa > pb {
                prop_assert!(order_key(&a, &o) < order_key(&b, &o));
            }
        }

        /// Fairness: at equal priority, stages of an owner with fewer fragments
        /// running come first, so no owner starves while another runs.
        #[test]
        fn the_least_served_owner_goes_first(oa in 0u64..50, ob in 0u64..50, sa in 1.0f64..50.0) {
            let (na, nb) = (needs(0, "a", None), needs(0, "b", None));
            let a = Candidate { owner_turn: oa, slowdown: sa, ..candidate(&na, 1) };
            let b = Candidate { owner_turn: ob, ..candidate(&nb, 0) };
            let o = offer("cpu");
            if oa < ob {
                prop_assert!(order_key(&a, &o) < order_key(&b, &o));
            }
        }

        /// The plan never sends a stage to a class that may not run it, and when
        /// the horizon allows it, the cheapest assignment fits every class.
        #[test]
        fn plans_respect_classes_and_capacity(
            items in 0.0f64..1e6, other in 0.0f64..1e6,
            b1 in 1.0f64..100.0, b2 in 1.0f64..100.0, s1 in 0.0f64..50.0, s2 in 0.0f64..50.0,
            only in any::<bool>(), stretch in 1.0f64..3.0,
        ) {
            let work = [
                StageWork { items, per_item_ms: vec![Some(b1), (!only).then_some(b2)] },
                StageWork { items: other, per_item_ms: vec![Some(b2), Some(b1)] },
            ];
            let slots = [s1, s2];
            if let Some(finish) = fluid_finish(&work, &slots, 1e12) {
                let horizon = finish * stretch * 1.01;
                let plan = class_plan(&work, &slots, &[1.0, 5.0], horizon);
                prop_assert!(!(only && plan.planned[0][1]));
                let capacity: Vec<f64> = slots.iter().map(|s| s * horizon).collect();
                let a = assign(&work, &capacity, &[1.0, 5.0]);
                prop_assert!(a.is_some());
                let a = a.unwrap();
                for c in 0..2 {
                    let used: f64 = (0..2).map(|s| a[s][c] * work[s].per_item_ms[c].unwrap_or(0.0)).sum();
                    prop_assert!(used <= capacity[c] * 1.0001 + 1e-6);
                }
            }
        }
    }

    #[test]
    fn a_class_goes_where_it_is_relatively_best() {
        let (a, b) = (needs(0, "o", None), needs(0, "o", None));
        // This class is 10x slower on stage a than the best class, on par on b.
        let slow_here = Candidate {
            slowdown: 10.0,
            ..candidate(&a, 0)
        };
        let on_par = Candidate {
            slowdown: 1.05,
            running: 5,
            ..candidate(&b, 1)
        };
        let mut all = [slow_here, on_par];
        order(&mut all, &offer("cpu"));
        assert_eq!(all[0].index, 1);
        // Not planned for this class: last, even at a higher priority.
        let high = needs(5, "o", None);
        let unplanned = Candidate {
            planned: false,
            ..candidate(&high, 0)
        };
        let mut all = [unplanned, candidate(&b, 1)];
        order(&mut all, &offer("cpu"));
        assert_eq!(all[0].index, 1);
    }

    #[test]
    fn checkpointing_work_goes_to_spot_workers_first() {
        let (a, b) = (needs(0, "o", None), needs(0, "o", None));
        let plain = candidate(&a, 0);
        let checkpointing = Candidate {
            checkpoints: true,
            ..candidate(&b, 1)
        };
        let spot = WorkerOffer {
            spot: true,
            ..offer("cpu")
        };
        let mut all = [plain.clone(), checkpointing.clone()];
        order(&mut all, &spot);
        assert_eq!(all[0].index, 1);
        let mut all = [checkpointing, plain];
        order(&mut all, &offer("cpu"));
        assert_eq!(all[0].index, 0);
    }

    #[test]
    fn the_critical_path_counts_the_work_behind_a_stage() {
        // 0 -> 1 -> 3, 2 -> 3
        let after = vec![vec![], vec![0], vec![], vec![1, 2]];
        let paths = critical_paths(&after, &[10.0, 20.0, 5.0, 1.0]);
        assert_eq!(paths, vec![31.0, 21.0, 6.0, 1.0]);
    }

    #[test]
    fn the_plan_keeps_a_dear_class_to_what_only_it_does_well() {
        // Stage 0 runs 20x faster on class 1 (dear); stage 1 the same on both.
        let work = [
            StageWork {
                items: 1_000.0,
                per_item_ms: vec![Some(2_000.0), Some(100.0)],
            },
            StageWork {
                items: 100_000.0,
                per_item_ms: vec![Some(100.0), Some(100.0)],
            },
        ];
        let (slots, price) = ([100.0, 10.0], [1.0, 10.0]);
        let finish = fluid_finish(&work, &slots, 1e9).unwrap();
        // All 110 slots busy: (1000 * 100 + 100000 * 100) / 110 slots.
        assert!(
            (finish - 10_100_000.0 / 110.0).abs() / finish < 0.01,
            "{finish}"
        );
        let plan = class_plan(&work, &slots, &price, finish * 1.05);
        assert_eq!(plan.planned[0], vec![false, true]);
        // The dear class must still help with stage 1 to make the horizon.
        assert_eq!(plan.planned[1], vec![true, true]);
        // Given time, the cheap class does all of stage 1 alone, and the dear class
        // needs only a few slots for stage 0.
        let horizon = 1e6 * 100.0;
        let plan = class_plan(&work, &slots, &price, horizon);
        assert_eq!(plan.planned[1], vec![true, false]);
        assert!((plan.slots_wanted[1] - 1_000.0 * 100.0 / horizon).abs() < 1e-6);
        // A horizon nothing fits: every class that may run a stage, every slot.
        let plan = class_plan(&work, &slots, &price, 1.0);
        assert_eq!(plan.planned[0], vec![true, true]);
        assert_eq!(plan.slots_wanted, slots.to_vec());
    }

    #[test]
    fn holt_follows_a_trend() {
        let mut h = Holt::default();
        assert_eq!(h.forecast(1.0), None);
        for x in 0..50 {
            h.observe(100.0 - x as f64);
        }
        let ahead = h.forecast(10.0).unwrap();
        assert!((ahead - 41.0).abs() < 3.0, "{ahead}");
    }
}

//! How many workers of each pool should exist: the one scaling policy, called by
//! the simulator (parking and recalling its workers) and by `granule serve`
//! (starting and draining workers through providers).
//!
//! The decision is the fluid class plan (`plan::deadline_plan`) over what every pool
//! could bring: the cheapest assignment of the ready work that still finishes by the
//! deadline (or within a little of the soonest possible finish), turned into wanted
//! slots per pool with a margin for fragments not being fluid. An idle worker whose
//! pool has at least its wanted slots busy may leave; a pool with fewer slots here
//! (or on their way) than wanted starts more, within its limits.

use crate::plan::{deadline_plan, StageWork};

/// A pool of workers as the planner sees it: one class, one price, what is here and
/// what may still be started.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct PoolView {
    /// Slots of one worker.
    pub slots_per_worker: f64,
    /// Price of one slot for an hour.
    pub cost_per_slot_hour: f64,
    /// Spot (preemptible) capacity.
    pub spot: bool,
    /// Slots alive or on their way (counted as the caller expects them to last).
    pub here: f64,
    /// Slots that may still be started (the pool's limits and budget less `here`).
    pub startable: f64,
}

/// One stage's ready work as the planner sees it.
#[derive(Clone, Debug, PartialEq)]
pub struct StageDemand {
    /// Items left (pending and running), 0 for a stage that is not ready.
    pub items: f64,
    /// Per pool: whether its workers may run the stage (class and resources fit).
    pub fits: Vec<bool>,
    /// Per pool: the per-item cost its class learned on the stage, ms.
    pub learned: Vec<Option<f64>>,
    /// Whether a preempted fragment keeps its progress (the task acks or
    /// checkpoints): only such work is planned on spot pools, unless nothing else
    /// can run it.
    pub resumable: bool,
}

/// What the planner decided.
#[derive(Clone, Debug, PartialEq)]
pub struct Scaling {
    /// `planned[stage][pool]`: whether the pool's class takes the stage's work.
    pub planned: Vec<Vec<bool>>,
    /// Slots each pool should have (busy until the horizon, with a margin).
    pub wanted: Vec<f64>,
    /// Within how long the plan finishes the ready work, ms (`None` while no cost
    /// is known: the first fragments teach it).
    pub horizon_ms: Option<f64>,
}

/// Share added to the slots the fluid plan needs, plus one slot: fragments are
/// not fluid (a slot finishing its last fragment early idles).
const MARGIN: f64 = 0.1;

/// The slots each pool should have for `demand`, with `time_left_ms` to the
/// earliest deadline (`None`: as soon as possible, at least cost). Only stages some
/// pool can run (it fits, and has or may start slots) are planned: one that none
/// can must not hold the others' workers. While a ready stage has no cost learned
/// on any pool, the cheapest pool allowed to run it grows to its limit (the work's
/// size is unknown) and the others keep what they have.
pub fn scale(demand: &[StageDemand], pools: &[PoolView], time_left_ms: Option<f64>) -> Scaling {
    let n = pools.len();
    let capacity: Vec<f64> = pools.iter().map(|p| p.here + p.startable).collect();
    let here: Vec<f64> = pools.iter().map(|p| p.here).collect();
    let runnable = |d: &StageDemand| (0..n).any(|c| allowed(d, pools, c) && capacity[c] > 0.0);
    let planned: Vec<Vec<bool>> = demand.iter().map(|d| d.fits.clone()).collect();
    let ready: Vec<&StageDemand> = demand
        .iter()
        .filter(|d| d.items > 0.0 && runnable(d))
        .collect();
    if ready.is_empty() {
        return Scaling {
            planned,
            wanted: vec![0.0; n],
            horizon_ms: Some(0.0),
        };
    }
    let unlearned: Vec<&&StageDemand> = ready
        .iter()
        .filter(|d| d.learned.iter().all(Option::is_none))
        .collect();
    if !unlearned.is_empty() {
        let mut wanted = here.clone();
        for d in unlearned {
            let cheapest = (0..n)
                .filter(|&c| allowed(d, pools, c) && capacity[c] > 0.0)
                .min_by(|&a, &b| {
                    pools[a]
                        .cost_per_slot_hour
                        .total_cmp(&pools[b].cost_per_slot_hour)
                });
            if let Some(c) = cheapest {
                wanted[c] = capacity[c];
            }
        }
        return Scaling {
            planned,
            wanted,
            horizon_ms: None,
        };
    }
    let work: Vec<StageWork> = demand
        .iter()
        .map(|d| StageWork {
            items: if runnable(d) { d.items } else { 0.0 },
            ..stage_work(d, pools)
        })
        .collect();
    let prices: Vec<f64> = pools
        .iter()
        .map(|p| p.cost_per_slot_hour / 3_600_000.0)
        .collect();
    let Some((_, plan)) = deadline_plan(&work, &capacity, &prices, time_left_ms.unwrap_or(0.0))
    else {
        // No assignment at all (should not happen for runnable work): keep what is here.
        return Scaling {
            planned,
            wanted: here,
            horizon_ms: None,
        };
    };
    let wanted = plan
        .slots_wanted
        .iter()
        .zip(&capacity)
        .map(|(&w, &cap)| {
            if w <= 1e-9 {
                0.0
            } else {
                (w * (1.0 + MARGIN) + 1.0).ceil().min(cap.max(1.0))
            }
        })
        .collect();
    Scaling {
        planned: plan.planned,
        wanted,
        horizon_ms: Some(plan.horizon_ms),
    }
}

/// Whether pool `c` may run stage `d`: it fits, and a spot pool only where the
/// work acks or checkpoints or no on-demand pool fits.
fn allowed(d: &StageDemand, pools: &[PoolView], c: usize) -> bool {
    let on_demand_fits = (0..pools.len()).any(|k| d.fits[k] && !pools[k].spot);
    d.fits[c] && (d.resumable || !pools[c].spot || !on_demand_fits)
}

/// A stage's work as the fluid plan sees it: on each pool that fits, its learned
/// cost, else the best any pool learned (a pool must run it to learn); spot pools
/// only for resumable work while an on-demand pool fits.
fn stage_work(d: &StageDemand, pools: &[PoolView]) -> StageWork {
    let best = d.learned.iter().flatten().copied().min_by(f64::total_cmp);
    StageWork {
        items: d.items,
        per_item_ms: (0..pools.len())
            .map(|c| {
                allowed(d, pools, c)
                    .then(|| d.learned[c].or(best))
                    .flatten()
            })
            .collect(),
    }
}

/// Workers a pool should start now: enough for its wanted slots, within what may
/// still be started.
pub fn to_start(wanted: f64, pool: &PoolView) -> u32 {
    let per = pool.slots_per_worker.max(1.0);
    let missing = ((wanted - pool.here) / per).ceil().max(0.0);
    missing.min((pool.startable / per).floor()).max(0.0) as u32
}

/// Whether an idle worker of a pool with `busy` slots running fragments may leave:
/// the pool has at least the slots the plan wants busy.
pub fn spare(wanted: f64, busy: f64) -> bool {
    busy >= wanted
}

/// The walltime to ask for a new worker: the plan's horizon with a quarter more and
/// `start_ms` (the time a worker takes to begin), within `[min_ms, max_ms]`;
/// `max_ms` while the horizon is unknown. Never an hour when minutes of work remain.
pub fn walltime_ms(scaling: &Scaling, start_ms: f64, min_ms: f64, max_ms: f64) -> f64 {
    match scaling.horizon_ms {
        Some(h) => (h * 1.25 + start_ms).clamp(min_ms.min(max_ms), max_ms),
        None => max_ms,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pool(cost: f64, here: f64, startable: f64) -> PoolView {
        PoolView {
            slots_per_worker: 1.0,
            cost_per_slot_hour: cost,
            spot: false,
            here,
            startable,
        }
    }

    fn stage(items: f64, learned: Vec<Option<f64>>) -> StageDemand {
        StageDemand {
            items,
            fits: vec![true; learned.len()],
            learned,
            resumable: true,
        }
    }

    #[test]
    fn learning_starts_only_the_cheapest_pool() {
        let pools = [pool(4.0, 0.0, 4.0), pool(1.0, 0.0, 4.0)];
        let s = scale(&[stage(100.0, vec![None, None])], &pools, None);
        assert_eq!(s.wanted, vec![0.0, 4.0]);
        assert_eq!(s.horizon_ms, None);
        assert_eq!(to_start(s.wanted[0], &pools[0]), 0);
        assert_eq!(to_start(s.wanted[1], &pools[1]), 4);
    }

    #[test]
    fn a_deadline_the_cheap_pool_makes_wants_nothing_dear() {
        // 3x slower and 4x cheaper: 100 items of 300 ms on 4 cheap slots take 7.5 s.
        let pools = [pool(4.0, 0.0, 4.0), pool(1.0, 4.0, 0.0)];
        let d = stage(100.0, vec![Some(100.0), Some(300.0)]);
        let s = scale(std::slice::from_ref(&d), &pools, Some(60_000.0));
        assert_eq!(s.wanted[0], 0.0, "{s:?}");
        assert!(s.wanted[1] >= 1.0);
        // A deadline it cannot make: the dear pool is wanted too.
        let s = scale(&[d], &pools, Some(5_000.0));
        assert!(s.wanted[0] >= 1.0, "{s:?}");
        assert!(to_start(s.wanted[0], &pools[0]) >= 1);
    }

    #[test]
    fn no_work_wants_nothing_and_idle_workers_leave() {
        let pools = [pool(1.0, 2.0, 0.0)];
        let s = scale(&[stage(0.0, vec![Some(1.0)])], &pools, None);
        assert_eq!(s.wanted, vec![0.0]);
        assert!(spare(s.wanted[0], 0.0));
        assert_eq!(to_start(s.wanted[0], &pools[0]), 0);
    }

    #[test]
    fn spot_pools_take_only_resumable_work_while_on_demand_fits() {
        let mut spot = pool(0.1, 0.0, 4.0);
        spot.spot = true;
        let pools = [spot, pool(1.0, 0.0, 4.0)];
        let mut d = stage(100.0, vec![Some(100.0), Some(100.0)]);
        d.resumable = false;
        let s = scale(std::slice::from_ref(&d), &pools, None);
        assert_eq!(s.wanted[0], 0.0, "{s:?}");
        d.resumable = true;
        let s = scale(&[d], &pools, None);
        assert!(s.wanted[0] > 0.0, "{s:?}");
    }

    #[test]
    fn a_stage_no_pool_can_run_holds_no_workers() {
        let pools = [pool(1.0, 0.0, 4.0)];
        let mut orphan = stage(100.0, vec![None]);
        orphan.fits = vec![false];
        let work = stage(100.0, vec![None]);
        // Unlearned: the runnable stage still starts the pool.
        let s = scale(&[orphan.clone(), work], &pools, None);
        assert_eq!(s.wanted, vec![4.0], "{s:?}");
        // Alone, it wants nothing.
        let s = scale(&[orphan.clone()], &pools, None);
        assert_eq!(s.wanted, vec![0.0], "{s:?}");
        // Learned: the plan covers the runnable stage only (a second of work with an
        // hour to go wants a couple of slots, not the pool's limit).
        orphan.learned = vec![Some(10.0)];
        let learned = stage(100.0, vec![Some(10.0)]);
        let s = scale(
            &[orphan, learned],
            &[pool(1.0, 2.0, 8.0)],
            Some(3_600_000.0),
        );
        assert!(s.wanted[0] <= 2.0, "{s:?}");
    }

    #[test]
    fn learning_keeps_spot_pools_for_resumable_work() {
        let mut spot = pool(0.1, 0.0, 4.0);
        spot.spot = true;
        let pools = [spot, pool(1.0, 0.0, 4.0)];
        let mut d = stage(100.0, vec![None, None]);
        d.resumable = false;
        let s = scale(&[d], &pools, None);
        assert_eq!(s.wanted, vec![0.0, 4.0], "{s:?}");
    }

    #[test]
    fn starts_within_limits_and_walltime_follows_the_work() {
        let p = pool(1.0, 1.0, 2.0);
        assert_eq!(to_start(10.0, &p), 2);
        assert_eq!(to_start(1.0, &p), 0);
        let s = scale(&[stage(100.0, vec![Some(1_000.0)])], &[p], None);
        // 100 s of work on 3 slots: about 35 s, asked for with a quarter more.
        let wall = walltime_ms(&s, 1_000.0, 60_000.0, 3_600_000.0);
        assert_eq!(wall, 60_000.0, "the floor");
        // 8,000 s of work on 3 slots: 2,800 s with the plan's slack, asked with a quarter more.
        let long = scale(&[stage(8_000.0, vec![Some(1_000.0)])], &[p], None);
        let wall = walltime_ms(&long, 1_000.0, 60_000.0, 3_600_000.0);
        assert!(wall < 3_600_000.0 && wall > 3_000_000.0, "{wall}");
        let short = walltime_ms(&long, 1_000.0, 60_000.0, 600_000.0);
        assert_eq!(short, 600_000.0, "the pool's walltime");
    }
}

//! A lower bound on the makespan of a scenario: no placement can beat it.
//!
//! Two relaxations, the larger wins. (1) Fluid: items are infinitely divisible,
//! fragments cost no overhead, and every class's alive slot-time in `[0, T)` may
//! go to any stage it can run, at that stage's mean item cost there; the least `T`
//! for which a linear program finds such an assignment. (2) Chains: the stages of
//! each path of the DAG run one after another, each with the whole pool to itself.
//! Item costs are taken at their mean, and drift only ever counted when it speeds
//! items up, so both stay bounds.

use crate::pool::capacity;
use crate::scenario::{Scenario, StageSpec};
use microlp::{ComparisonOp, OptimizationDirection, Problem, SolveOutcome};

/// Mean item cost of stage `s` on class `c`, ms, for the bound (the cheapest the
/// drift allows); `None` if the class may not run the stage.
fn cost(sc: &Scenario, st: &StageSpec, c: usize) -> Option<f64> {
    let class = &sc.classes[c];
    if st.class_required && st.class.as_deref() != Some(class.name.as_str()) {
        return None;
    }
    // A band of items (by index) costs what it costs, exactly; a drift in time
    // counts only where it speeds items up.
    let band = st.drift_items.map_or(1.0, |[from, to]| {
        let len = to.min(st.items).saturating_sub(from) as f64;
        (st.items as f64 + (st.drift_factor - 1.0) * len) / st.items.max(1) as f64
    });
    let in_time = match (st.drift_at, st.drift_items) {
        (None, Some(_)) => 1.0,
        _ => st.drift_factor.min(1.0),
    };
    Some(st.item_ms_on(class) * band * in_time)
}

/// Whether the stages in `stages` fit the capacity `cap` (slot-ms per class).
fn feasible(sc: &Scenario, stages: &[usize], cap: &[f64]) -> bool {
    let mut lp = Problem::new(OptimizationDirection::Minimize);
    let mut per_class: Vec<Vec<(microlp::Variable, f64)>> = vec![Vec::new(); sc.classes.len()];
    for &s in stages {
        let st = &sc.stages[s];
        let mut row = Vec::new();
        for (c, col) in per_class.iter_mut().enumerate() {
            if let Some(ms) = cost(sc, st, c) {
                let x = lp.add_var(0.0, (0.0, f64::INFINITY));
                row.push((x, 1.0));
                col.push((x, ms));
            }
        }
        if row.is_empty() {
            return false;
        }
        lp.add_constraint(&row, ComparisonOp::Eq, st.items as f64);
    }
    for (c, col) in per_class.iter().enumerate() {
        if !col.is_empty() {
            lp.add_constraint(col, ComparisonOp::Le, cap[c]);
        }
    }
    matches!(lp.solve(), Ok(SolveOutcome::Solution(_)))
}

/// The least time `t >= from` by which `stages` fit into the capacity of
/// `[from, t)`: the window doubles from 1 s until they fit (or reaches `horizon`,
/// returned if they never do), then bisection to 0.01% of it. It never looks at a
/// makespan reached, so a simulated makespan below it is a bug that shows.
fn least_time(sc: &Scenario, stages: &[usize], from: f64, horizon: f64) -> f64 {
    let fits = |t: f64| feasible(sc, stages, &capacity(sc, from, t));
    let (mut lo, mut hi) = (from, (from + 1_000.0).min(horizon));
    while !fits(hi) {
        if hi >= horizon {
            return horizon;
        }
        lo = hi;
        hi = (from + 2.0 * (hi - from)).min(horizon);
    }
    while hi - lo > (hi - from) * 1e-4 + 1.0 {
        let mid = (lo + hi) / 2.0;
        if fits(mid) {
            hi = mid;
        } else {
            lo = mid;
        }
    }
    hi
}

/// Every path from a stage without `after` to one nothing waits for.
fn paths(sc: &Scenario) -> Vec<Vec<usize>> {
    let index = |name: &str| {
        sc.stages
            .iter()
            .position(|s| s.name == name)
            .expect("checked")
    };
    let next = |i: usize| -> Vec<usize> {
        (0..sc.stages.len())
            .filter(|&j| sc.stages[j].after.iter().any(|a| index(a) == i))
            .collect()
    };
    let mut out = Vec::new();
    let mut stack: Vec<Vec<usize>> = (0..sc.stages.len())
        .filter(|&i| sc.stages[i].after.is_empty())
        .map(|i| vec![i])
        .collect();
    while let Some(path) = stack.pop() {
        let last = *path.last().expect("non-empty");
        let after = next(last);
        if after.is_empty() || out.len() > 1000 {
            out.push(path);
            continue;
        }
        for j in after {
            let mut p = path.clone();
            p.push(j);
            stack.push(p);
        }
    }
    out
}

/// The lower bound, ms, from the scenario alone (searched up to its horizon).
pub fn lower_bound(sc: &Scenario) -> f64 {
    let all: Vec<usize> = (0..sc.stages.len()).collect();
    let mut bound = least_time(sc, &all, 0.0, sc.horizon);
    for path in paths(sc) {
        let mut t = 0.0;
        for s in path {
            t = least_time(sc, &[s], t, sc.horizon);
        }
        bound = bound.max(t);
    }
    bound
}

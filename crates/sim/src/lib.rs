//! granule's discrete-event simulator: the same core (sizer, ledger, placement
//! and plan) driven in virtual time over a described pool and workload, seeded and
//! deterministic, at a scale one machine cannot host for real.

mod bound;
mod engine;
mod pool;
mod scenario;
mod svg;

pub use bound::lower_bound;
pub use engine::{
    simulate, ClassReport, OwnerReport, Policy, Report, StageReport, TraceRow, OWNER_BUCKET_MS,
};
pub use scenario::{parse, ClassSpec, Scenario, StageSpec};
pub use svg::timeline;

/// Simulates `sc` under `policy` and fills in the lower bound of its makespan.
pub fn run<'a>(
    sc: &'a Scenario,
    policy: Policy,
    trace: Option<&'a mut dyn FnMut(&TraceRow)>,
) -> Report {
    let mut report = simulate(sc, policy, trace);
    // Computed from the scenario alone: bounded by the makespan reached, a broken
    // bound would read as 1.000 and `makespan >= bound` could not fail.
    report.lower_bound_ms = lower_bound(sc);
    report
}

/// A span of virtual time for people: `850 ms`, `12.4 s`, `7.5 min`, `3.20 h`.
pub fn human_duration(ms: f64) -> String {
    if ms < 1_000.0 {
        format!("{ms:.0} ms")
    } else if ms < 120_000.0 {
        format!("{:.1} s", ms / 1e3)
    } else if ms < 7_200_000.0 {
        format!("{:.1} min", ms / 60_000.0)
    } else {
        format!("{:.2} h", ms / 3_600_000.0)
    }
}

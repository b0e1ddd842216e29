//! The pure scheduling core of granule.
//!
//! Everything here is a function of its inputs: no IO, no clock, no randomness it
//! does not receive. Time arrives as `now_ms` arguments. The same code runs in the
//! worker, in the store's claim path and in the simulator, so a policy
//! tested here is the policy that runs.

mod claim;
pub mod fair;
mod forecast;
mod ids;
mod intervals;
mod ledger;
pub mod outputs;
mod placement;
mod plan;
mod predictor;
mod profile;
mod scale;
mod sizer;

pub use claim::{
    busiest, claim_context, class_deadline_plan, job_deadline_plan, live_pool, placement_order,
    size_with_unrun, split_gain, split_point, split_share, stage_ready, unrun_estimate, Admission,
    JobDeadlinePlan, StageView, ESCALATE_AFTER_LOST,
};
pub use forecast::{
    forecast_pool, forecast_recent, ClassForecast, WorkerSpan, FORECAST_AHEAD_MS, FORECAST_STEP_MS,
    FORECAST_WINDOW_MS,
};
pub use ids::{FragmentId, JobId, StageId};
pub use intervals::{IntervalSet, Span};
pub use ledger::{
    retry_budget, Acked, Claim, FinishOutcome, FinishReport, Pending, PendingRange,
    RunningFragment, StageLedger,
};
pub use outputs::{ItemOutputs, Output, Published};
pub use placement::{fits, Misfit, StageNeeds, WorkerOffer};
pub use plan::{
    assign, class_plan, critical_paths, deadline_plan, expect_drops, fluid_finish, order,
    order_key, per_class_costs, pool_classes, pool_deadline_plan, Candidate, ClassPlan, Holt,
    PoolClass, StageWork, DEADLINE_SHARE, PLAN_SLACK,
};
pub use predictor::{absolute_errors, median_p90, prediction_error, WARM_UP_FRAGMENTS};
pub use profile::{guess_class, profile};
pub use scale::{scale, spare, to_start, walltime_ms, PoolView, Scaling, StageDemand};
pub use sizer::{
    ClaimContext, CostModel, LinearFit, Observation, Pid, SizeCap, Sizer, SizerConfig, Sizing,
};

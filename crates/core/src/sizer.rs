//! The fragment sizer: an online cost model corrected by a PID controller.
//!
//! For each (stage, worker class) the model is `duration(n) ≈ a + b·n`: `a` the
//! per-fragment overhead (process start, warm-up), `b` the per-item cost. `b` is
//! measured from the spacing of acks inside a fragment when the task acks (the
//! start-up cost then drops out), else by least squares over whole fragments. Old
//! observations fade by `forget` per fragment, so a drifting cost is followed.
//! A PID controller on `ln(target / observed)` removes what bias the model keeps.
//! Caps, each from something measured, bound the result: the hard limit, the
//! worker's lifespan, the tail of the stage and resource pressure.

use serde::{Deserialize, Serialize};

/// Tunables of the sizer (`[stage.sizer]` in a job spec) and the stage's own
/// `target`, `limit` and `initial`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct SizerConfig {
    /// Target fragment duration in ms; `None` picks one from the overhead.
    #[serde(skip)]
    pub target_ms: Option<f64>,
    /// Hard per-fragment limit in ms.
    #[serde(skip)]
    pub limit_ms: Option<f64>,
    /// First fragment size before any history (slow start doubles from it).
    #[serde(skip)]
    pub initial: Option<u64>,
    /// Proportional gain of the PID on the log-duration error.
    pub kp: f64,
    /// Integral gain.
    pub ki: f64,
    /// Derivative gain.
    pub kd: f64,
    /// Weight the old history keeps at each new observation (0..1).
    pub forget: f64,
    /// Largest share of a fragment's time the overhead `a` may take when the target is derived.
    pub overhead_share: f64,
    /// Smallest derived target, ms.
    pub target_min_ms: f64,
    /// Largest derived target, ms.
    pub target_max_ms: f64,
    /// Fewest items in a fragment.
    pub min_items: u64,
    /// Most items in a fragment.
    pub max_items: u64,
    /// Tail factoring: a fragment takes at most `remaining / (tail_factor · slots)` items...
    pub tail_factor: f64,
    /// ...but never so few that the overhead exceeds this share of it.
    pub tail_overhead_share: f64,
    /// Free memory share below which fragments shrink in proportion.
    pub min_free_memory: f64,
    /// No longer used (accepted so older specs still parse): load does not shrink
    /// fragments, the model predicts the per-item cost at the claimer's load.
    pub max_load: f64,
    /// Share of the limit or of the remaining lifespan a fragment may be predicted to use.
    pub deadline_share: f64,
}

impl Default for SizerConfig {
    fn default() -> Self {
        SizerConfig {
            target_ms: None,
            limit_ms: None,
            initial: None,
            kp: 0.2,
            ki: 0.1,
            kd: 0.0,
            forget: 0.7,
            overhead_share: 0.01,
            target_min_ms: 1_000.0,
            target_max_ms: 60_000.0,
            min_items: 1,
            max_items: 10_000_000,
            tail_factor: 2.0,
            tail_overhead_share: 0.1,
            min_free_memory: 0.05,
            max_load: 2.0,
            deadline_share: 0.8,
        }
    }
}

/// What a finished fragment teaches the model.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Observation {
    /// Items the fragment ran (fed and finished).
    pub n: u64,
    /// Wall time from start to exit, ms.
    pub duration_ms: f64,
    /// Acks received and when the first and last arrived (ms after start).
    pub acks: u64,
    /// Time of the first ack, ms after start.
    pub first_ack_ms: Option<f64>,
    /// Time of the last ack, ms after start.
    pub last_ack_ms: Option<f64>,
    /// Whether the fragment's size was set by the model and PID alone (only such
    /// fragments feed the PID, else a cap would wind it up).
    pub sized_by_model: bool,
    /// Bytes of the items it ran, where items have a size (lines of a file).
    pub bytes: Option<u64>,
    /// Load per CPU on its worker, where known.
    pub load: Option<f64>,
}

/// Online estimate of `duration(n) ≈ a + b·n` with forgetting.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct CostModel {
    /// Per-fragment overhead, ms.
    pub a_ms: f64,
    /// Mean per-item cost, ms.
    pub b_ms: f64,
    /// Variance of the per-item cost between fragments, ms².
    pub b_var: f64,
    /// Fragments observed.
    pub observations: u64,
    /// Ack intervals observed (how much the ack-based estimate has seen).
    pub ack_intervals: f64,
    /// Largest fragment observed.
    pub n_max: u64,
    b_weight: f64,
    a_weight: f64,
    // Exponentially weighted least-squares sums over (n, duration).
    sw: f64,
    sn: f64,
    sd: f64,
    snn: f64,
    snd: f64,
    /// Per-item cost against item size (bytes), for items that have one.
    #[serde(default)]
    pub size: LinearFit,
    /// Per-item cost against the worker's load per CPU.
    #[serde(default)]
    pub load: LinearFit,
}

/// Online weighted least squares of a fragment's per-item cost (ms) on one
/// feature (mean item size in bytes, or load per CPU), with forgetting:
/// `cost(x) = intercept + slope * x`.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct LinearFit {
    sw: f64,
    sx: f64,
    sy: f64,
    sxx: f64,
    sxy: f64,
    /// Fragments fitted.
    pub fragments: u64,
}

impl LinearFit {
    fn observe(&mut self, size: f64, cost: f64, lambda: f64) {
        self.sw = lambda * self.sw + 1.0;
        self.sx = lambda * self.sx + size;
        self.sy = lambda * self.sy + cost;
        self.sxx = lambda * self.sxx + size * size;
        self.sxy = lambda * self.sxy + size * cost;
        self.fragments += 1;
    }

    /// `(intercept, slope)` once fragments with different values of the feature
    /// were seen and cost grows with it; `None` otherwise.
    pub fn line(&self) -> Option<(f64, f64)> {
        let var = self.sw * self.sxx - self.sx * self.sx;
        if self.fragments < 3 || var <= 1e-6 * self.sw * self.sxx.max(1e-12) {
            return None;
        }
        let slope = (self.sw * self.sxy - self.sx * self.sy) / var;
        let intercept = (self.sy - slope * self.sx) / self.sw;
        (slope > 0.0).then_some((intercept, slope))
    }
}

impl CostModel {
    /// Whether there is enough history to size from the model.
    pub fn ready(&self) -> bool {
        self.observations >= 1
            && (self.ack_intervals >= 8.0
                || (self.observations >= 2 && self.b_ms * self.n_max as f64 >= self.a_ms))
    }

    /// Predicted duration of `n` items, ms.
    pub fn predict_ms(&self, n: u64) -> f64 {
        self.a_ms + self.b_ms * n as f64
    }

    /// Per-item cost for items of mean size `bytes_per_item`, ms: from the size
    /// fit once it has one, else the mean per-item cost.
    pub fn per_item_for_size(&self, bytes_per_item: f64) -> f64 {
        match self.size.line() {
            Some((intercept, slope)) => (intercept + slope * bytes_per_item).max(0.0),
            None => self.b_ms,
        }
    }

    /// Per-item cost on a worker at `load` per CPU, ms: from the load fit once it
    /// has one, else the mean per-item cost.
    pub fn per_item_at_load(&self, load: f64) -> f64 {
        match self.load.line() {
            Some((intercept, slope)) => (intercept + slope * load).max(0.0),
            None => self.b_ms,
        }
    }

    /// Predicted duration of `n` items on a worker at `load` per CPU, ms (the load
    /// fit where there is one).
    pub fn predict_at_load_ms(&self, n: u64, load: f64) -> f64 {
        self.a_ms + self.per_item_at_load(load) * n as f64
    }

    /// Predicted duration of `n` items of `bytes` in all, ms (the size fit where
    /// there is one).
    pub fn predict_sized_ms(&self, n: u64, bytes: u64) -> f64 {
        let per_item = bytes as f64 / n.max(1) as f64;
        self.a_ms + self.per_item_for_size(per_item) * n as f64
    }

    /// An upper quantile (about the 97th percentile) of the per-item cost, ms.
    pub fn b_high_ms(&self) -> f64 {
        self.b_ms + 2.0 * self.b_var.max(0.0).sqrt()
    }

    /// Folds one finished fragment into the model.
    pub fn observe(&mut self, obs: &Observation, forget: f64) {
        let n = obs.n.max(1) as f64;
        let d = obs.duration_ms.max(0.0);
        let lambda = forget.clamp(0.0, 1.0);
        self.sw = lambda * self.sw + 1.0;
        self.sn = lambda * self.sn + n;
        self.sd = lambda * self.sd + d;
        self.snn = lambda * self.snn + n * n;
        self.snd = lambda * self.snd + n * d;

        let own = ack_spacing(obs);
        let b_sample = match own {
            Some(spacing) => {
                let intervals = (obs.acks - 1) as f64;
                self.ack_intervals += intervals;
                Some((spacing, intervals))
            }
            // Without ack spacing, only a fit over fragments of different sizes
            // separates overhead from per-item cost; one fragment alone does not.
            _ => self.least_squares().map(|(_, b)| (b, n)),
        };
        if let Some((b_sample, weight)) = b_sample {
            self.b_weight = lambda * self.b_weight + weight;
            let share = weight / self.b_weight;
            let delta = b_sample - self.b_ms;
            self.b_ms += share * delta;
            self.b_var = (1.0 - share) * (self.b_var + share * delta * delta);
        }
        // The fragment's own overhead: what its acks do not account for. Taken at
        // the mean cost instead, a fragment of heavy items read as a slow start
        // (sigma 2: `a` 4x too high, and the target it sets with it).
        let a_sample = (d - n * own.unwrap_or(self.b_ms)).max(0.0);
        self.a_weight = lambda * self.a_weight + 1.0;
        self.a_ms += (a_sample - self.a_ms) / self.a_weight;

        let per_item = (d - self.a_ms).max(0.0) / n;
        if let (Some(bytes), true) = (obs.bytes, obs.n > 0) {
            self.size.observe(bytes as f64 / n, per_item, lambda);
        }
        if let (Some(load), true) = (obs.load, obs.n > 0) {
            self.load.observe(load, per_item, lambda);
        }
        self.observations += 1;
        self.n_max = self.n_max.max(obs.n);
    }

    fn least_squares(&self) -> Option<(f64, f64)> {
        let det = self.sw * self.snn - self.sn * self.sn;
        if self.sw < 1.5 || det <= 1e-3 * self.sw * self.snn {
            return None;
        }
        let b = (self.sw * self.snd - self.sn * self.sd) / det;
        let a = (self.sd - b * self.sn) / self.sw;
        (b > 0.0).then_some((a.max(0.0), b))
    }
}

/// A PID controller on the log-ratio of target to observed duration.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct Pid {
    /// Integral of the error.
    pub integral: f64,
    /// Last error, for the derivative.
    pub last_error: Option<f64>,
    /// Current output `u`; fragments are scaled by `exp(u)`.
    pub output: f64,
}

/// Bound on the PID output: fragments are scaled by at most e^±1.5 (×4.5).
const PID_OUTPUT_MAX: f64 = 1.5;

impl Pid {
    /// Feeds one error `ln(target / observed)` and updates the output.
    pub fn update(&mut self, error: f64, cfg: &SizerConfig) {
        let derivative = self.last_error.map_or(0.0, |last| error - last);
        self.last_error = Some(error);
        // Anti-windup: the integral never asks for more than the output bound.
        let limit = if cfg.ki > 0.0 {
            PID_OUTPUT_MAX / cfg.ki
        } else {
            0.0
        };
        self.integral = (self.integral + error).clamp(-limit, limit);
        self.output = (cfg.kp * error + cfg.ki * self.integral + cfg.kd * derivative)
            .clamp(-PID_OUTPUT_MAX, PID_OUTPUT_MAX);
    }
}

/// What the claimer knows of its situation when it asks for a size.
#[derive(Clone, Debug, PartialEq)]
pub struct ClaimContext {
    /// Items of the stage still to run: pending, and those running fragments have
    /// not run yet (their unacked items where idle slots split fragments of a task
    /// that acks, else [`crate::unrun_estimate`]).
    pub remaining: u64,
    /// Slots working on the stage, the claimer's included.
    pub slots: u32,
    /// Share of memory free on the claiming worker (1.0 when unknown).
    pub free_memory: f64,
    /// Load average per CPU on the claiming worker (0.0 when unknown).
    pub load_per_cpu: f64,
    /// Remaining lifespan of the worker, ms, if it has one.
    pub lifespan_ms: Option<f64>,
    /// Whether the stage's tasks ack: a fragment then yields at the end of the
    /// worker's life and hands back what it did not run, so it may fill the life.
    pub acking: bool,
    /// Whether idle slots split running fragments (`granule worker` unless
    /// `--no-steal`; not the simulator): with acks, the tail then needs no factoring.
    pub splits: bool,
    /// How much sooner than `lifespan_ms` a fragment whose task does not ack must
    /// end: its worker starts draining that much earlier while it runs.
    pub all_or_nothing_margin_ms: f64,
}

/// Which rule set the size.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum SizeCap {
    /// The cost model and the PID.
    Model,
    /// Cold start: the initial size or doubling.
    SlowStart,
    /// Half of a slot's share of the work left (factoring), above the model's size.
    Share,
    /// The hard per-fragment limit.
    Limit,
    /// The worker's remaining lifespan.
    Lifespan,
    /// Tail factoring near the end of the stage.
    Tail,
    /// Low free memory.
    Pressure,
    /// The configured minimum or maximum.
    Bounds,
    /// Elastic: an equal share of the work left, ended by its worker at the target.
    Elastic,
}

impl SizeCap {
    /// Why a fragment sized by this rule has the size it has, for `granule status`.
    pub fn explain(&self) -> &'static str {
        match self {
            SizeCap::Model => "the cost model's target duration per fragment",
            SizeCap::SlowStart => {
                "slow start: the model has too little history yet, sizes grow as fragments finish"
            }
            SizeCap::Share => {
                "factoring: half of each slot's share of the work left, fewer task starts"
            }
            SizeCap::Limit => "the stage's time limit per fragment",
            SizeCap::Lifespan => "the claiming worker's remaining lifespan",
            SizeCap::Tail => {
                "the end of the stage: what is left is shared among the slots working on it"
            }
            SizeCap::Pressure => "low free memory on the claiming worker",
            SizeCap::Bounds => {
                "the stage's min_items/max_items, the claim's own maximum or the end of a range"
            }
            SizeCap::Elastic => {
                "an equal share of the work left, fed until the fragment reaches its target duration at the pace its acks show, the rest handed back"
            }
        }
    }
}

/// The sizer's answer for one claim.
#[derive(Clone, Debug, PartialEq)]
pub struct Sizing {
    /// Items to claim; 0 means this worker should not take from this stage now.
    pub n: u64,
    /// Predicted duration, ms.
    pub predicted_ms: f64,
    /// The rule that decided `n`.
    pub cap: SizeCap,
    /// Elastic end: the fragment is fed only while the items fed are predicted to
    /// finish within this many ms of its start (at its own ack pace); its worker
    /// hands back the rest. `None`: fed to its end.
    pub feed_for_ms: Option<f64>,
}

/// The sizer state of one (stage, class): persisted between claims.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct Sizer {
    /// The cost model.
    pub model: CostModel,
    /// The bias corrector.
    pub pid: Pid,
    /// Next slow-start size (0 = not started yet).
    pub slow_start_next: u64,
}

/// How finely ack times are known, ms: the worker reads acks in batches (at least
/// a millisecond apart), so acks of fast items share a read time.
const ACK_RESOLUTION_MS: f64 = 2.0;

/// The per-item cost a fragment's acks show, ms: the spacing of its first and last
/// ack, widened by [`ACK_RESOLUTION_MS`] so that a few fast items read at once do
/// not read as free (a cost of ~0 made the next fragment the whole stage).
fn ack_spacing(obs: &Observation) -> Option<f64> {
    match (obs.first_ack_ms, obs.last_ack_ms) {
        (Some(first), Some(last)) if obs.acks >= 2 => {
            Some(((last - first).max(0.0) + ACK_RESOLUTION_MS) / (obs.acks - 1) as f64)
        }
        _ => None,
    }
}

/// How much slow start grows after a fragment: twice, or up to 16 times where
/// that is safe and saves rounds. Where its acks show a start that dwarfs its
/// items' work (the start up to the first ack, the item cost from the spacing of
/// the acks), by that ratio. Where the task did not ack and the fragment took a
/// small part of `budget_ms` (the smallest target), by what keeps the next one
/// inside the budget even if all of its time was items: a 20 ms start and 0.08 ms
/// items took nine rounds of doubling, each a task start, before a fragment's
/// work matched its start.
fn growth(obs: &Observation, budget_ms: f64) -> f64 {
    let grow = match (ack_spacing(obs), obs.first_ack_ms) {
        (Some(per_item), Some(first)) => {
            let start = (first - per_item).max(0.0);
            start / (per_item * obs.n.max(1) as f64)
        }
        // A task that acks shows its start within two items; one that does not
        // shows nothing but its duration.
        _ if obs.acks == 0 => budget_ms / obs.duration_ms.max(1e-9),
        _ => 2.0,
    };
    grow.clamp(2.0, 16.0)
}

/// The least factoring ratio: a claim on a stage whose fragments are not split
/// takes at most `remaining / (ratio · slots)`, so however even the items look,
/// a fifth of the work stays back to balance what the spread did not show (a
/// cost that drifts with the index).
const FACTORING_MIN: f64 = 1.25;

impl Sizer {
    /// A new stage's sizer that starts from what an earlier stage of the same task
    /// learned (its cost model), not from slow start: a rerun or a new worker does
    /// not pay a task start per doubling again. The bias the controller corrected
    /// was that stage's; this one corrects its own. Old history fades as fast as
    /// any (`forget`), so a task whose cost changed is followed within fragments.
    pub fn from_history(learned: Sizer) -> Sizer {
        Sizer {
            model: learned.model,
            ..Sizer::default()
        }
    }

    /// Target fragment duration, ms.
    pub fn target_ms(&self, cfg: &SizerConfig) -> f64 {
        cfg.target_ms.unwrap_or_else(|| {
            (self.model.a_ms / cfg.overhead_share.max(1e-6))
                .clamp(cfg.target_min_ms, cfg.target_max_ms)
        })
    }

    /// The factoring ratio of a stage whose fragments are not split: a claim takes
    /// at most `remaining / (ratio · slots)`. From the spread the model measured
    /// (the coefficient of variation of the per-item cost between fragments, `c`):
    /// `1 + 2·c·sqrt(slots)` keeps back enough work to even out what `slots`
    /// fragments of that spread leave uneven (after Hummel, Schonberg & Flynn's
    /// factoring, whose batches assume the items' spread is known), between
    /// [`FACTORING_MIN`] and the stage's `tail_factor` (the classic 2 by default).
    /// Each claim fewer saves a task start.
    pub fn factoring(&self, cfg: &SizerConfig, slots: u32) -> f64 {
        let most = cfg.tail_factor.max(1.0);
        let model = &self.model;
        let spread = match model.ready() && model.b_ms > 0.0 {
            true => model.b_var.max(0.0).sqrt() / model.b_ms,
            false => f64::INFINITY,
        };
        (1.0 + 2.0 * spread * f64::from(slots.max(1)).sqrt()).clamp(FACTORING_MIN.min(most), most)
    }

    /// Picks the size of the next fragment.
    pub fn size(&mut self, cfg: &SizerConfig, ctx: &ClaimContext) -> Sizing {
        let model = &self.model;
        let (mut n, mut cap) = if model.ready() {
            let target = self.target_ms(cfg);
            // Load is a feature of the prediction, not a reason to shrink: on a busy
            // machine items cost what the load fit says, and the fragment is sized
            // to the target at that cost.
            let per_item = model.per_item_at_load(ctx.load_per_cpu).max(1e-9);
            let n_model = ((target - model.a_ms).max(per_item) / per_item) * self.pid.output.exp();
            (n_model, SizeCap::Model)
        } else {
            // Doubling happens as fragments finish (in `observe`), not per claim:
            // a hundred workers starting at once must not get 1, 2, 4 .. 2^99 items.
            if self.slow_start_next == 0 {
                self.slow_start_next = cfg.initial.unwrap_or(1).max(1);
            }
            (self.slow_start_next as f64, SizeCap::SlowStart)
        };
        // Elastic fragments (a task that acks, idle slots that split): the size is
        // decided while the fragment runs, not at the claim. It claims an equal share
        // of the work left, like the oracle's split, and its worker stops feeding where
        // the fragment reaches the target at the pace its acks show (the rest comes
        // back at once). No round of slow start after the first fragment (which told
        // the start cost and that the task acks), no fragment ended early on a wrong
        // per-item cost; an idle slot splits the busiest fragment at the end.
        let elastic = ctx.acking && ctx.splits && model.observations >= 1;
        if elastic {
            let share = ctx.remaining as f64 / f64::from(ctx.slots.max(1));
            (n, cap) = (share.ceil().max(1.0), SizeCap::Elastic);
        }
        if cap == SizeCap::Model && !ctx.splits {
            // Factoring (Hummel, Schonberg & Flynn 1992): where running fragments are
            // not split, while much work is left a fragment may take a slot's share of
            // it over the factoring ratio (see `factoring`), up to the longest target.
            // Fewer task starts, and what is left still balances the slots. (Where
            // idle slots split, the model's target stands: splitting balances, and
            // short fragments lose less.)
            let per_item = model.per_item_at_load(ctx.load_per_cpu).max(1e-9);
            let share = ctx.remaining as f64
                / (self.factoring(cfg, ctx.slots) * f64::from(ctx.slots.max(1)));
            let longest = ((cfg.target_max_ms - model.a_ms) / per_item).max(0.0);
            let floor = share.min(longest).floor();
            if floor > n {
                (n, cap) = (floor, SizeCap::Share);
            }
        }
        fn lower(n: &mut f64, cap: &mut SizeCap, bound: f64, why: SizeCap) {
            if bound < *n {
                *n = bound;
                *cap = why;
            }
        }
        let b_high = model.b_high_ms().max(1e-9);
        if let Some(limit) = cfg.limit_ms {
            lower(
                &mut n,
                &mut cap,
                ((cfg.deadline_share * limit - model.a_ms) / b_high).max(0.0),
                SizeCap::Limit,
            );
        }
        if let Some(life) = ctx.lifespan_ms {
            // A fragment that acks yields where the life ends and hands back what it
            // did not run: it may be sized to fill the life at the mean cost. One that
            // does not ack loses all at the end: it must fit a share of the life even
            // at a high per-item cost.
            let fits = match ctx.acking {
                true => (life - model.a_ms) / model.b_ms.max(1e-9),
                false => {
                    let life = (life - ctx.all_or_nothing_margin_ms).max(0.0);
                    (cfg.deadline_share * life - model.a_ms) / b_high
                }
            };
            if ctx.acking && model.ready() && cap == SizeCap::Model && fits < 2.0 * n {
                // What the life would leave after this fragment is less than another
                // one's worth: take it now rather than pay one more task start.
                (n, cap) = (fits, SizeCap::Lifespan);
            }
            lower(&mut n, &mut cap, fits.max(0.0), SizeCap::Lifespan);
        }
        // Near the end of a stage, fragments shrink so slots finish together. Where
        // tasks ack, an idle slot splits the busiest fragment instead (its unfed
        // tail comes back at once): an equal share per slot is enough, and each
        // fragment fewer saves a task start.
        let factor = match ctx.acking && ctx.splits {
            true => 1.0,
            false => self.factoring(cfg, ctx.slots),
        };
        let tail = ctx.remaining as f64 / (factor * f64::from(ctx.slots.max(1)));
        let tail_floor = if model.ready() {
            model.a_ms / cfg.tail_overhead_share.max(1e-6) / model.b_ms.max(1e-9)
        } else {
            1.0
        };
        // At the very end (a factored share under the floor), the floor, and once
        // an equal share of the work outstanding is under it, that share, down to a
        // fragment as long as its start: the last claims even out the slots'
        // finishes (the floor left one slot a last fragment of up to a floor's
        // worth while the other stood idle), and they are the last whatever their
        // size: what this one leaves, the others take. The bound never falls as
        // the work outstanding grows (`size_with_unrun` relies on it).
        let one_start = match model.ready() {
            true => model.a_ms / model.b_ms.max(1e-9),
            false => 1.0,
        };
        let tail = match tail < tail_floor {
            true => (ctx.remaining as f64 / f64::from(ctx.slots.max(1)))
                .min(tail_floor)
                .max(one_start),
            false => tail,
        };
        lower(&mut n, &mut cap, tail.ceil(), SizeCap::Tail);
        // Fragments shrink only when memory would run out, and not in slow start:
        // its fragments are small already and must grow for the model to learn
        // anything. (Shrinking under load kept a loaded machine at 1-item fragments,
        // each paying a task start and teaching nothing.)
        if model.ready() && ctx.free_memory < cfg.min_free_memory {
            let pressure = (ctx.free_memory / cfg.min_free_memory).max(0.0);
            let shrunk = (n * pressure).floor();
            lower(&mut n, &mut cap, shrunk, SizeCap::Pressure);
        }
        lower(&mut n, &mut cap, cfg.max_items as f64, SizeCap::Bounds);
        let mut n = n.floor() as u64;
        // A deadline that leaves no room for one item means: not here.
        let fits = !matches!(cap, SizeCap::Limit | SizeCap::Lifespan) || n >= 1;
        if fits && n < cfg.min_items.max(1) {
            n = cfg.min_items.max(1);
            cap = SizeCap::Bounds;
        }
        // Where the life holds less than two targets, what would be left after the
        // cut is less than another fragment's worth: fed to the end of the life.
        let target = self.target_ms(cfg);
        let feed_for_ms =
            (elastic && ctx.lifespan_ms.is_none_or(|life| life >= 2.0 * target)).then_some(target);
        Sizing {
            n,
            predicted_ms: self.claim_ms(n, ctx.load_per_cpu, feed_for_ms),
            cap,
            feed_for_ms,
        }
    }

    /// Predicted duration of a claim of `n` items at `load` per CPU, ms: the
    /// model's, or an elastic end's `feed_for_ms` where that comes first.
    pub fn claim_ms(&self, n: u64, load: f64, feed_for_ms: Option<f64>) -> f64 {
        let ms = self.model.predict_at_load_ms(n, load);
        feed_for_ms.map_or(ms, |t| ms.min(t))
    }

    /// Learns from a finished fragment.
    pub fn observe(&mut self, cfg: &SizerConfig, obs: &Observation) {
        let was_ready = self.model.ready();
        self.model.observe(obs, cfg.forget);
        if !was_ready {
            // Twice what just finished (one doubling per round of fragments, however
            // many workers finish one of the same size), or more: see `growth`.
            let budget = cfg.target_ms.unwrap_or(cfg.target_min_ms);
            let next = obs.n.max(cfg.initial.unwrap_or(1)) as f64 * growth(obs, budget);
            self.slow_start_next = self.slow_start_next.max(next.min(u64::MAX as f64) as u64);
        }
        if was_ready && obs.sized_by_model && obs.duration_ms > 0.0 {
            let error = (self.target_ms(cfg) / obs.duration_ms).ln();
            self.pid.update(error, cfg);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A deterministic noisy task: duration a + sum of n item costs with spread.
    struct Synthetic {
        a_ms: f64,
        b_ms: f64,
        seed: u64,
    }

    impl Synthetic {
        fn noise(&mut self) -> f64 {
            // xorshift, uniform in [0.5, 1.5)
            self.seed ^= self.seed << 13;
            self.seed ^= self.seed >> 7;
            self.seed ^= self.seed << 17;
            0.5 + (self.seed % 10_000) as f64 / 10_000.0
        }

        fn run(&mut self, n: u64) -> Observation {
            let item = self.b_ms * self.noise();
            let first = self.a_ms * 0.9 + item;
            let duration = self.a_ms + self.b_ms * n as f64 * (0.95 + 0.1 * self.noise() / 1.5);
            Observation {
                n,
                duration_ms: duration,
                acks: n,
                first_ack_ms: Some(first),
                last_ack_ms: Some(duration - self.a_ms * 0.1),
                sized_by_model: true,
                bytes: None,
                load: None,
            }
        }
    }

    fn roomy() -> ClaimContext {
        ClaimContext {
            remaining: u64::MAX / 4,
            slots: 2,
            free_memory: 0.5,
            load_per_cpu: 1.0,
            splits: true,
            all_or_nothing_margin_ms: 0.0,
            acking: false,
            lifespan_ms: None,
        }
    }

    fn drive(
        sizer: &mut Sizer,
        cfg: &SizerConfig,
        task: &mut Synthetic,
        fragments: usize,
    ) -> Vec<f64> {
        (0..fragments)
            .map(|_| {
                let sizing = sizer.size(cfg, &roomy());
                let mut obs = task.run(sizing.n);
                obs.sized_by_model = sizing.cap == SizeCap::Model;
                sizer.observe(cfg, &obs);
                obs.duration_ms
            })
            .collect()
    }

    fn within(durations: &[f64], target: f64, share: f64) -> bool {
        durations.iter().all(|d| (d / target - 1.0).abs() <= share)
    }

    #[test]
    fn reaches_the_target_within_20_percent() {
        for (a, b) in [(40.0, 0.093), (5.0, 2.0), (200.0, 0.001), (1.0, 50.0)] {
            let cfg = SizerConfig {
                target_ms: Some(3_000.0),
                ..SizerConfig::default()
            };
            let mut sizer = Sizer::default();
            let mut task = Synthetic {
                a_ms: a,
                b_ms: b,
                seed: 99,
            };
            let durations = drive(&mut sizer, &cfg, &mut task, 40);
            assert!(
                within(&durations[25..], 3_000.0, 0.2),
                "a={a} b={b}: {durations:?}"
            );
        }
    }

    #[test]
    fn follows_a_step_change_in_item_cost() {
        let cfg = SizerConfig {
            target_ms: Some(2_000.0),
            ..SizerConfig::default()
        };
        let mut sizer = Sizer::default();
        let mut task = Synthetic {
            a_ms: 30.0,
            b_ms: 0.5,
            seed: 7,
        };
        let before = drive(&mut sizer, &cfg, &mut task, 30);
        assert!(within(&before[20..], 2_000.0, 0.2), "{before:?}");
        task.b_ms = 2.0; // every item now costs 4x
        let after = drive(&mut sizer, &cfg, &mut task, 30);
        assert!(within(&after[10..], 2_000.0, 0.2), "{after:?}");
    }

    #[test]
    fn derived_target_keeps_overhead_near_one_percent() {
        let cfg = SizerConfig::default();
        let mut sizer = Sizer::default();
        let mut task = Synthetic {
            a_ms: 40.0,
            b_ms: 0.1,
            seed: 3,
        };
        drive(&mut sizer, &cfg, &mut task, 30);
        let target = sizer.target_ms(&cfg);
        assert!((3_000.0..5_000.0).contains(&target), "target {target}");
    }

    #[test]
    fn per_item_cost_is_learned_against_item_size() {
        // Items cost 0.01 ms per byte plus 0.5 ms; fragments of light and heavy items.
        let mut model = CostModel::default();
        for (i, per_item_bytes) in [100.0, 2_000.0, 500.0, 5_000.0, 50.0, 1_000.0]
            .iter()
            .cycle()
            .take(30)
            .enumerate()
        {
            let n = 100 + (i as u64 % 3) * 50;
            let cost = 0.5 + 0.01 * per_item_bytes;
            let duration = 20.0 + n as f64 * cost;
            model.observe(
                &Observation {
                    n,
                    duration_ms: duration,
                    acks: n,
                    first_ack_ms: Some(20.0 + cost),
                    last_ack_ms: Some(duration),
                    sized_by_model: true,
                    bytes: Some((per_item_bytes * n as f64) as u64),
                    load: Some(1.0),
                },
                0.9,
            );
        }
        let (intercept, slope) = model.size.line().expect("a size fit");
        assert!((slope - 0.01).abs() < 0.002, "slope {slope}");
        assert!(intercept < 3.0, "intercept {intercept}");
        // A heavy fragment is predicted far longer than the mean cost would say.
        let heavy = model.predict_sized_ms(100, 100 * 8_000);
        let truth = 20.0 + 100.0 * 80.5;
        assert!((heavy - truth).abs() / truth < 0.15, "{heavy} vs {truth}");
        assert!(heavy > 2.0 * model.predict_ms(100));
        // Load was the same throughout: no load fit, the mean cost stands.
        assert!(model.load.line().is_none());
        assert_eq!(model.predict_at_load_ms(100, 3.0), model.predict_ms(100));
    }

    #[test]
    fn per_item_cost_is_learned_against_load() {
        // Items cost 1 ms on an idle worker, twice that at a load of 2 per CPU.
        let mut model = CostModel::default();
        for i in 0..30 {
            let load = [0.2, 1.0, 2.0][i % 3];
            let n = 100;
            let cost = 1.0 + 0.5 * load;
            let duration = 20.0 + n as f64 * cost;
            model.observe(
                &Observation {
                    n,
                    duration_ms: duration,
                    acks: n,
                    first_ack_ms: Some(20.0 + cost),
                    last_ack_ms: Some(duration),
                    sized_by_model: true,
                    bytes: None,
                    load: Some(load),
                },
                0.9,
            );
        }
        let busy = model.predict_at_load_ms(100, 2.0);
        let idle = model.predict_at_load_ms(100, 0.0);
        assert!(busy > 1.6 * idle, "{busy} vs {idle}");
    }

    /// A finished fragment of `n` items of a task that did not ack.
    fn unacked(n: u64, duration_ms: f64) -> Observation {
        Observation {
            n,
            duration_ms,
            acks: 0,
            first_ack_ms: None,
            last_ack_ms: None,
            sized_by_model: false,
            bytes: None,
            load: None,
        }
    }

    #[test]
    fn slow_start_doubles_per_finished_fragment_not_per_claim() {
        let cfg = SizerConfig::default();
        let mut sizer = Sizer::default();
        // Many workers claiming at once, before anything finished: all get one item.
        let sizes: Vec<u64> = (0..4).map(|_| sizer.size(&cfg, &roomy()).n).collect();
        assert_eq!(sizes, vec![1, 1, 1, 1]);
        // Overhead-dominated fragments without acks leave the model unready: doubling
        // (where a fragment takes over half the smallest target; see the next test).
        let quick = |n| unacked(n, 600.0);
        sizer.observe(&cfg, &quick(1));
        assert_eq!(sizer.size(&cfg, &roomy()).n, 2);
        // The other workers' one-item fragments finishing do not double it again.
        sizer.observe(&cfg, &quick(1));
        sizer.observe(&cfg, &quick(1));
        assert_eq!(sizer.size(&cfg, &roomy()).n, 2);
        sizer.observe(&cfg, &quick(2));
        assert_eq!(sizer.size(&cfg, &roomy()).n, 4);
        let cfg = SizerConfig {
            initial: Some(100),
            ..SizerConfig::default()
        };
        let mut sizer = Sizer::default();
        assert_eq!(sizer.size(&cfg, &roomy()).n, 100);
        assert_eq!(sizer.size(&cfg, &roomy()).n, 100);
        sizer.observe(&cfg, &quick(100));
        assert_eq!(sizer.size(&cfg, &roomy()).n, 200);
    }

    #[test]
    fn slow_start_grows_fast_while_fragments_are_short_beside_the_smallest_target() {
        // No acks, a 20 ms start, 0.08 ms items: each round is a task start, and a
        // fragment 16 times one that took 20 ms stays far inside the 1 s target even if
        // all of its time were items.
        let cfg = SizerConfig::default();
        let mut sizer = Sizer::default();
        let run = |n: u64| unacked(n, 20.0 + 0.08 * n as f64);
        let mut sizes = Vec::new();
        while !sizer.model.ready() {
            let n = sizer.size(&cfg, &roomy()).n;
            sizes.push(n);
            sizer.observe(&cfg, &run(n));
        }
        assert_eq!(sizes, [1, 16, 256], "doubling took nine rounds");
        // Growth never takes a fragment past the budget: after 300 ms, ×3.
        let mut long = Sizer::default();
        long.observe(&cfg, &unacked(10, 300.0));
        assert_eq!(long.size(&cfg, &roomy()).n, 33);
    }

    /// A sizer whose model is ready with overhead `a_ms`, per-item cost `b_ms` and
    /// its variance between fragments `b_var`.
    fn learned(a_ms: f64, b_ms: f64, b_var: f64) -> Sizer {
        let mut sizer = Sizer::default();
        sizer.model.observations = 9;
        sizer.model.ack_intervals = 100.0;
        (sizer.model.a_ms, sizer.model.b_ms, sizer.model.b_var) = (a_ms, b_ms, b_var);
        sizer
    }

    #[test]
    fn the_factoring_ratio_follows_the_spread_between_fragments() {
        let cfg = SizerConfig::default();
        let even = learned(0.0, 1.0, 0.0001); // 1% between fragments
        assert_eq!(even.factoring(&cfg, 2), FACTORING_MIN);
        let mut uneven = even.clone();
        uneven.model.b_var = 0.09; // 30%
        let ratio = uneven.factoring(&cfg, 2);
        assert!((ratio - (1.0 + 0.6 * 2f64.sqrt())).abs() < 1e-9, "{ratio}");
        uneven.model.b_var = 1.0;
        assert_eq!(uneven.factoring(&cfg, 2), 2.0, "never above tail_factor");
        // A model not ready yet knows no spread: the classic factor.
        assert_eq!(Sizer::default().factoring(&cfg, 2), 2.0);
        let one = SizerConfig {
            tail_factor: 1.0,
            ..SizerConfig::default()
        };
        assert_eq!(even.factoring(&one, 2), 1.0, "tail_factor 1 turns it off");
    }

    #[test]
    fn at_the_end_an_idle_slot_takes_what_evens_its_finish_with_the_busy_one() {
        // No acks, 2 slots, a 20 ms start and 0.1 ms items: the floor is 2,000 items.
        let cfg = SizerConfig::default();
        let sizer = learned(20.0, 0.1, 0.0);
        let at = |remaining: u64| {
            let ctx = ClaimContext {
                remaining,
                slots: 2,
                splits: false,
                ..roomy()
            };
            sizer.clone().size(&cfg, &ctx)
        };
        // 2,000 pending while the other slot has ~1,200 items still to run: an equal
        // share of the 3,200 outstanding evens the finishes, where the floor (a
        // fragment whose start is a tenth, 2,000 items) took all 2,000 and left the
        // other slot idle once its 1,200 were done.
        let remaining = 2_000 + crate::unrun_estimate(1_800, 100.0, 300.0).round() as u64;
        assert_eq!(remaining, 3_200);
        let even = at(remaining);
        assert_eq!((even.n, even.cap), (1_600, SizeCap::Tail), "{even:?}");
        // Between the floor and the factored share: the floor, so the bound never
        // falls as the work outstanding grows.
        assert_eq!(at(4_800).n, 2_000);
        assert_eq!(at(3_000).n, 1_500);
        // Never under a fragment as long as its start (200 items).
        assert_eq!(at(300).n, 200);
    }

    #[test]
    fn tail_factoring_shrinks_the_last_fragments() {
        let cfg = SizerConfig {
            target_ms: Some(10_000.0),
            ..SizerConfig::default()
        };
        let mut sizer = Sizer::default();
        let mut task = Synthetic {
            a_ms: 10.0,
            b_ms: 1.0,
            seed: 5,
        };
        drive(&mut sizer, &cfg, &mut task, 20);
        // Far from the end the model decides; near the end each claim takes at
        // most remaining / (ratio * slots), down to the floor where overhead is 10%
        // or an equal share of what is left.
        let ratio = sizer.factoring(&cfg, 4);
        assert!((FACTORING_MIN..=2.0).contains(&ratio), "{ratio}");
        let floor = (sizer.model.a_ms / cfg.tail_overhead_share / sizer.model.b_ms).ceil();
        let mut remaining = 40_000u64;
        let mut sizes = Vec::new();
        while remaining > 0 {
            let ctx = ClaimContext {
                remaining,
                slots: 4,
                ..roomy()
            };
            let s = sizer.size(&cfg, &ctx);
            let n = s.n.min(remaining);
            // At the very end, where the factored share is under the floor, an equal
            // share of what is left evens the slots' finishes.
            let factored = (remaining as f64 / (ratio * 4.0)).ceil();
            let most = match factored < floor {
                true => (remaining as f64 / 4.0).ceil().max(floor),
                false => factored,
            };
            assert!(n as f64 <= most + 1.0, "{n} of {remaining}");
            sizes.push(n);
            remaining -= n;
        }
        assert!(
            sizes.windows(2).all(|w| w[1] <= w[0]),
            "sizes grow at the tail: {sizes:?}"
        );
        assert!(
            *sizes.last().unwrap() as f64 <= floor + 1.0,
            "last fragment too big: {sizes:?}"
        );
        assert!(sizes.len() < 60, "too many tail fragments: {}", sizes.len());
    }

    #[test]
    fn limit_and_lifespan_cap_with_the_upper_quantile() {
        let cfg = SizerConfig {
            limit_ms: Some(1_000.0),
            target_ms: Some(10_000.0),
            ..SizerConfig::default()
        };
        let mut sizer = Sizer::default();
        let mut task = Synthetic {
            a_ms: 10.0,
            b_ms: 1.0,
            seed: 11,
        };
        drive(&mut sizer, &cfg, &mut task, 20);
        let s = sizer.size(&cfg, &roomy());
        assert_eq!(s.cap, SizeCap::Limit);
        assert!(s.predicted_ms <= 800.0, "{s:?}");
        let ctx = ClaimContext {
            lifespan_ms: Some(300.0),
            ..roomy()
        };
        let s = sizer.size(&cfg, &ctx);
        assert_eq!(s.cap, SizeCap::Lifespan);
        assert!(s.predicted_ms <= 240.0, "{s:?}");
        let ctx = ClaimContext {
            lifespan_ms: Some(5.0),
            ..roomy()
        };
        assert_eq!(sizer.size(&cfg, &ctx).n, 0, "nothing fits in 5 ms");
    }

    #[test]
    fn memory_pressure_shrinks_fragments() {
        let cfg = SizerConfig {
            target_ms: Some(1_000.0),
            ..SizerConfig::default()
        };
        let mut sizer = Sizer::default();
        let mut task = Synthetic {
            a_ms: 10.0,
            b_ms: 1.0,
            seed: 13,
        };
        drive(&mut sizer, &cfg, &mut task, 20);
        let free = sizer.size(&cfg, &roomy()).n;
        let tight = sizer.size(
            &cfg,
            &ClaimContext {
                free_memory: 0.01,
                ..roomy()
            },
        );
        assert_eq!(tight.cap, SizeCap::Pressure);
        assert!(tight.n * 4 < free, "{} vs {free}", tight.n);
    }

    #[test]
    fn slow_start_grows_on_a_loaded_machine() {
        // Other programs keep the load at 5 per CPU (over max_load = 2): fragments still
        // grow until the model can size them (they once stayed at 1 item for good).
        let cfg = SizerConfig::default();
        let loaded = ClaimContext {
            load_per_cpu: 5.0,
            ..roomy()
        };
        let mut sizer = Sizer::default();
        let mut sizes = Vec::new();
        for _ in 0..6 {
            let n = sizer.size(&cfg, &loaded).n;
            sizes.push(n);
            sizer.observe(
                &cfg,
                &Observation {
                    n,
                    duration_ms: 300.0 + n as f64,
                    acks: 0,
                    first_ack_ms: None,
                    last_ack_ms: None,
                    sized_by_model: false,
                    bytes: None,
                    load: Some(5.0),
                },
            );
        }
        assert!(sizes.windows(2).all(|w| w[1] >= 2 * w[0]), "{sizes:?}");
    }

    fn acked(n: u64, first_ack_ms: f64, per_item_ms: f64) -> Observation {
        let last = first_ack_ms + per_item_ms * (n - 1) as f64;
        Observation {
            n,
            duration_ms: last + 1.0,
            acks: n,
            first_ack_ms: Some(first_ack_ms),
            last_ack_ms: Some(last),
            sized_by_model: true,
            bytes: None,
            load: None,
        }
    }

    #[test]
    fn slow_start_grows_fast_when_the_start_dwarfs_the_items() {
        // A 100 ms interpreter start, 0.1 ms items: after 2 items, 32.
        let cfg = SizerConfig::default();
        let mut sizer = Sizer::default();
        assert_eq!(sizer.size(&cfg, &roomy()).n, 1);
        sizer.observe(&cfg, &acked(1, 100.0, 0.1));
        assert_eq!(
            sizer.size(&cfg, &roomy()).n,
            2,
            "one ack: no spacing, doubling"
        );
        sizer.observe(&cfg, &acked(2, 100.0, 0.1));
        assert_eq!(sizer.size(&cfg, &roomy()).n, 32);
        // Items that cost more than the start: doubling, as before.
        let mut slow = Sizer::default();
        slow.observe(&cfg, &acked(2, 10_000.0, 9_000.0));
        assert_eq!(slow.size(&cfg, &roomy()).n, 4);
    }

    #[test]
    fn a_fragment_that_acks_may_fill_the_life_and_shares_the_tail_equally() {
        // (An equal share at the tail needs idle slots that split: `splits`.)
        let cfg = SizerConfig {
            target_ms: Some(100_000.0),
            ..SizerConfig::default()
        };
        let mut sizer = Sizer::default();
        let mut task = Synthetic {
            a_ms: 10.0,
            b_ms: 1.0,
            seed: 17,
        };
        drive(&mut sizer, &cfg, &mut task, 20);
        let life = ClaimContext {
            lifespan_ms: Some(1_000.0),
            ..roomy()
        };
        let all_or_nothing = sizer.size(&cfg, &life);
        let acking = sizer.size(
            &cfg,
            &ClaimContext {
                acking: true,
                ..life
            },
        );
        assert_eq!(acking.cap, SizeCap::Lifespan);
        // It yields at the end of the life: the whole life at the mean cost...
        assert!(
            (950.0..=1_000.0).contains(&acking.predicted_ms),
            "{acking:?}"
        );
        // ...where one that does not ack keeps to a share at a high cost, of a life
        // that ends where its worker would drain it.
        assert!(all_or_nothing.predicted_ms <= 800.0, "{all_or_nothing:?}");
        let drained_early = sizer.size(
            &cfg,
            &ClaimContext {
                all_or_nothing_margin_ms: 500.0,
                ..life.clone()
            },
        );
        assert!(
            drained_early.n < all_or_nothing.n,
            "{drained_early:?} vs {all_or_nothing:?}"
        );
        let acking_alike = sizer.size(
            &cfg,
            &ClaimContext {
                all_or_nothing_margin_ms: 500.0,
                acking: true,
                ..life.clone()
            },
        );
        assert_eq!(
            acking_alike.n, acking.n,
            "the margin is not for acking tasks"
        );
        let tail = ClaimContext {
            remaining: 40_000,
            slots: 4,
            ..roomy()
        };
        let factored = sizer.size(&cfg, &tail);
        let shared = sizer.size(
            &cfg,
            &ClaimContext {
                acking: true,
                splits: true,
                ..tail
            },
        );
        assert_eq!(
            (shared.n, shared.cap),
            (10_000, SizeCap::Elastic),
            "an equal share"
        );
        let ratio = sizer.factoring(&cfg, 4);
        assert_eq!(
            factored.n,
            (40_000.0 / (ratio * 4.0)).ceil() as u64,
            "without acks, factored: {factored:?}"
        );
        assert!(factored.n < 10_000, "{factored:?}");
    }

    #[test]
    fn a_fragment_that_acks_takes_the_rest_of_a_life_too_short_for_two() {
        let cfg = SizerConfig {
            target_ms: Some(600.0),
            ..SizerConfig::default()
        };
        let mut sizer = Sizer::default();
        let mut task = Synthetic {
            a_ms: 10.0,
            b_ms: 1.0,
            seed: 19,
        };
        drive(&mut sizer, &cfg, &mut task, 30);
        let at = |life: f64, acking: bool| {
            let ctx = ClaimContext {
                lifespan_ms: Some(life),
                acking,
                ..roomy()
            };
            sizer.clone().size(&cfg, &ctx)
        };
        // A long life: the fragment is fed until the target (elastic), the life
        // bounding what it claims.
        let long = at(60_000.0, true);
        assert_eq!(long.feed_for_ms, Some(600.0), "{long:?}");
        // 1 s left: a 0.6 s fragment would leave 0.4 s, less than another one's
        // worth; the fragment takes the whole life (it yields at its end).
        let rest = at(1_000.0, true);
        assert_eq!(rest.cap, SizeCap::Lifespan, "{rest:?}");
        assert!(rest.predicted_ms > 900.0, "{rest:?}");
        // Without acks it keeps to the target.
        assert_eq!(at(1_000.0, false).cap, SizeCap::Model);
    }

    #[test]
    fn load_changes_the_prediction_not_a_floor_under_the_size() {
        // Items cost 1 ms idle and 1 + 0.5 * load under load; fragments aim at 1 s.
        let cfg = SizerConfig {
            target_ms: Some(1_000.0),
            ..SizerConfig::default()
        };
        let mut sizer = Sizer::default();
        for i in 0..40 {
            let load = [0.0, 2.0, 4.0][i % 3];
            let n = 500;
            let per_item = 1.0 + 0.5 * load;
            sizer.observe(
                &cfg,
                &Observation {
                    n,
                    duration_ms: 10.0 + per_item * n as f64,
                    acks: n,
                    first_ack_ms: Some(10.0 + per_item),
                    last_ack_ms: Some(10.0 + per_item * n as f64),
                    sized_by_model: false,
                    bytes: None,
                    load: Some(load),
                },
            );
        }
        let at = |load: f64| {
            let ctx = ClaimContext {
                load_per_cpu: load,
                ..roomy()
            };
            sizer.clone().size(&cfg, &ctx)
        };
        let (idle, busy) = (at(0.0), at(6.0));
        // At 6 per CPU (over the old max_load of 2) items cost 4 ms: a quarter the
        // items, still a fragment of the target, sized by the model.
        assert_eq!(busy.cap, SizeCap::Model, "{busy:?}");
        let ratio = idle.n as f64 / busy.n as f64;
        assert!((3.0..5.0).contains(&ratio), "{} vs {}", idle.n, busy.n);
        assert!((800.0..1_200.0).contains(&busy.predicted_ms), "{busy:?}");
    }

    #[test]
    fn fast_items_acked_in_one_read_do_not_read_as_free() {
        // A 160 ms start, 11 us items: 32 of them are acked within one read of fd 3,
        // so their acks share a time. Their cost must not read as zero (the next
        // fragment was the whole stage).
        let cfg = SizerConfig {
            target_ms: Some(300.0),
            ..SizerConfig::default()
        };
        let mut sizer = Sizer::default();
        for n in [1, 2, 32] {
            sizer.observe(&cfg, &acked(n, 160.0, 0.0));
        }
        let next = sizer.size(&cfg, &roomy());
        assert!(next.n <= 10_000, "{next:?}");
    }

    #[test]
    fn where_fragments_are_not_split_a_claim_takes_a_factored_share_of_the_work_left() {
        let cfg = SizerConfig {
            target_ms: Some(1_000.0),
            ..SizerConfig::default()
        };
        let mut sizer = Sizer::default();
        let mut task = Synthetic {
            a_ms: 20.0,
            b_ms: 1.0,
            seed: 5,
        };
        drive(&mut sizer, &cfg, &mut task, 30);
        let at = |remaining: u64, splits: bool| {
            let ctx = ClaimContext {
                remaining,
                slots: 4,
                splits,
                ..roomy()
            };
            sizer.clone().size(&cfg, &ctx)
        };
        // 40,000 items of ~1 ms on 4 slots: a slot's share over the factoring ratio
        // (1.25 to 2) is 5,000 to 8,000 items (5 to 8 s), far above the 1 s target.
        let share = at(40_000, false);
        assert_eq!(share.cap, SizeCap::Share, "{share:?}");
        let ratio = sizer.factoring(&cfg, 4);
        assert_eq!(share.n, (40_000.0 / (ratio * 4.0)).floor() as u64);
        assert!((5_000..=8_000).contains(&share.n), "{share:?}");
        // Never past the longest target (60 s).
        let most = at(40_000_000, false);
        assert_eq!(most.cap, SizeCap::Share);
        assert!(most.predicted_ms <= cfg.target_max_ms + 1.0, "{most:?}");
        // Where idle slots split running fragments, the target stands.
        assert_eq!(at(40_000, true).cap, SizeCap::Model);
    }

    #[test]
    fn where_the_task_acks_and_slots_split_a_claim_takes_an_equal_share_ended_at_the_target() {
        let cfg = SizerConfig::default();
        let mut sizer = Sizer::default();
        let ctx = |acking: bool, splits: bool| ClaimContext {
            remaining: 150_000,
            slots: 2,
            acking,
            splits,
            ..roomy()
        };
        // Nothing seen yet: slow start, whatever the task does.
        assert_eq!(sizer.size(&cfg, &ctx(true, true)).cap, SizeCap::SlowStart);
        // One 1-item fragment told the start cost (300 ms, a version manager's
        // shim) and that the task acks: the next claim is half of the work left,
        // fed until it reaches the target the start cost sets (30 s).
        sizer.observe(
            &cfg,
            &Observation {
                n: 1,
                duration_ms: 300.0,
                acks: 1,
                first_ack_ms: Some(299.0),
                last_ack_ms: Some(299.0),
                sized_by_model: false,
                bytes: None,
                load: None,
            },
        );
        let elastic = sizer.size(&cfg, &ctx(true, true));
        assert_eq!(elastic.cap, SizeCap::Elastic, "{elastic:?}");
        assert_eq!(elastic.n, 75_000);
        assert_eq!(elastic.feed_for_ms, Some(sizer.target_ms(&cfg)));
        assert!((elastic.feed_for_ms.unwrap() - 30_000.0).abs() < 1_000.0);
        // A task that does not ack, or slots that do not split: sized at the claim.
        for (acking, splits) in [(false, true), (true, false)] {
            let sizing = sizer.size(&cfg, &ctx(acking, splits));
            assert_ne!(sizing.cap, SizeCap::Elastic, "{sizing:?}");
            assert_eq!(sizing.feed_for_ms, None);
        }
    }

    #[test]
    fn a_fragment_of_heavy_items_does_not_read_as_a_slow_start() {
        let cfg = SizerConfig::default();
        let mut sizer = Sizer::default();
        let light = |n: u64, per_item: f64| Observation {
            n,
            duration_ms: 50.0 + per_item * n as f64,
            acks: n,
            first_ack_ms: Some(50.0 + per_item),
            last_ack_ms: Some(50.0 + per_item * n as f64),
            sized_by_model: false,
            bytes: None,
            load: None,
        };
        for _ in 0..10 {
            sizer.observe(&cfg, &light(100, 1.0));
        }
        // A fragment of items ten times heavier than the mean (a skewed draw): its
        // start is still 50 ms, not the 900 ms its extra work would add.
        sizer.observe(&cfg, &light(100, 10.0));
        assert!(sizer.model.a_ms < 80.0, "{:?}", sizer.model);
    }
}

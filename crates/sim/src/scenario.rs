//! The scenario file: a pool of worker classes and a workload of stages.

use serde::{Deserialize, Deserializer};
use std::collections::BTreeMap;

/// A simulated pool and workload, read from TOML.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Scenario {
    /// Its name, for reports.
    pub name: String,
    /// Seed of every random draw: the same scenario and seed give the same result.
    #[serde(default)]
    pub seed: u64,
    /// How often a worker flushes acks (what a hard kill loses), default 5 s.
    #[serde(default = "default_heartbeat", deserialize_with = "millis")]
    pub heartbeat: f64,
    /// How long a fragment of a worker killed without notice stays held before
    /// its work goes back (its lease, from the last heartbeat), default 30 s as
    /// `granule worker --lease`.
    #[serde(default = "default_lease", deserialize_with = "millis")]
    pub lease: f64,
    /// How long a worker with nothing to do stays (and is paid for), default 2 min.
    #[serde(default = "default_idle_exit", deserialize_with = "millis")]
    pub idle_exit: f64,
    /// Whether the planner forecasts preemptions (Holt smoothing of each class's
    /// preemption rate) and sizes all-or-nothing fragments on spot workers to a
    /// small share of the expected time to the next one (default true; false to
    /// compare).
    #[serde(default = "yes")]
    pub forecast: bool,
    /// How often the planner runs (`granule serve --interval`), default 1 min.
    #[serde(default = "default_plan_every", deserialize_with = "millis")]
    pub plan_every: f64,
    /// What the run may cost at most (reported against, not enforced).
    #[serde(default)]
    pub budget: Option<f64>,
    /// Sigma of the log-normal factor each fragment's work is drawn with (a machine
    /// a little faster or slower than its class's nominal speed), default 0.05.
    #[serde(default = "default_jitter")]
    pub jitter: f64,
    /// Stop the simulation at this virtual time, default 30 days.
    #[serde(default = "default_horizon", deserialize_with = "millis")]
    pub horizon: f64,
    /// Worker classes of the pool.
    #[serde(rename = "class")]
    pub classes: Vec<ClassSpec>,
    /// Stages of the workload (`after` makes the DAG; `job` and `submit_at` make
    /// several jobs arriving over time).
    #[serde(rename = "stage")]
    pub stages: Vec<StageSpec>,
    /// Fair-share shares per owner (`granule shares`), default 1 each.
    #[serde(default)]
    pub shares: BTreeMap<String, f64>,
    /// Fair-share shares per account, default 1 each.
    #[serde(default)]
    pub account_shares: BTreeMap<String, f64>,
    /// Half-life of the usage fair share judges owners by, default 10 min.
    #[serde(default = "default_half_life", deserialize_with = "millis")]
    pub fair_half_life: f64,
}

fn default_half_life() -> f64 {
    granule_core::fair::DEFAULT_HALF_LIFE_MS
}

/// One class of workers.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ClassSpec {
    /// Class name (`cpu`, `gpu`, ...).
    pub name: String,
    /// Workers of the class alive at once (each replaced when it ends).
    pub count: u32,
    /// Slots per worker.
    #[serde(default = "one")]
    pub slots: u32,
    /// Speed: item costs are divided by it.
    #[serde(default = "one_f")]
    pub speed: f64,
    /// Price of one worker per hour.
    #[serde(default)]
    pub cost: f64,
    /// Spot capacity: preempted at random (`preempt_per_hour`).
    #[serde(default)]
    pub spot: bool,
    /// Mean preemptions per worker-hour (spot only).
    #[serde(default)]
    pub preempt_per_hour: f64,
    /// Warning before a preemption (0: killed without notice).
    #[serde(default, deserialize_with = "millis")]
    pub notice: f64,
    /// Fixed lifespan of each worker (serverless, walltime), if any.
    #[serde(default, deserialize_with = "opt_millis")]
    pub lifespan: Option<f64>,
    /// Delay before a worker that ended is replaced, default 1 min.
    #[serde(default = "default_replace", deserialize_with = "millis")]
    pub replace_after: f64,
    /// Workers start only when the scaling policy asks for them, as `granule serve`
    /// launches a pool's workers (`count` is the pool's limit, `replace_after` the
    /// time a launch takes, `lifespan` the walltime); default false: every worker
    /// is there from the start and replaced when it ends.
    #[serde(default)]
    pub autoscale: bool,
    /// The first workers arrive spread evenly over this long, default 0.
    #[serde(default, deserialize_with = "millis")]
    pub arrive_over: f64,
}

/// One stage of the workload.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StageSpec {
    /// Stage name.
    pub name: String,
    /// Number of items.
    pub items: u64,
    /// Mean cost of one item on a speed-1 worker, ms.
    pub item_ms: f64,
    /// Spread of item costs (sigma of a log-normal), default 0.3.
    #[serde(default = "default_spread")]
    pub spread: f64,
    /// Fixed cost of starting a fragment, ms (default 200).
    #[serde(default = "default_overhead")]
    pub overhead_ms: f64,
    /// Stages this one waits for.
    #[serde(default)]
    pub after: Vec<String>,
    /// Higher runs first.
    #[serde(default)]
    pub priority: i64,
    /// Who the work is for (fairness between owners).
    #[serde(default)]
    pub owner: Option<String>,
    /// The account above its owner.
    #[serde(default)]
    pub account: Option<String>,
    /// The job it belongs to (for reports; jobs differ by `submit_at`).
    #[serde(default)]
    pub job: Option<String>,
    /// When its job is submitted, virtual time (default 0: at the start).
    #[serde(default, deserialize_with = "millis")]
    pub submit_at: f64,
    /// Preferred (or, with `class_required`, required) class.
    #[serde(default)]
    pub class: Option<String>,
    /// Whether `class` is required.
    #[serde(default)]
    pub class_required: bool,
    /// Per-class factor on the item cost (`gpu = 0.1`: ten times faster there).
    #[serde(default)]
    pub speed: BTreeMap<String, f64>,
    /// From this virtual time on, item costs are multiplied by `drift_factor`.
    #[serde(default, deserialize_with = "opt_millis")]
    pub drift_at: Option<f64>,
    /// Items `[from, to)` cost `drift_factor` times the others (a band of costly
    /// items, by index rather than by time).
    #[serde(default)]
    pub drift_items: Option<[u64; 2]>,
    /// Drift multiplier (default 1).
    #[serde(default = "one_f")]
    pub drift_factor: f64,
    /// Finish by this virtual time: the cost plan uses the cheapest classes that make it.
    #[serde(default, deserialize_with = "opt_millis")]
    pub deadline: Option<f64>,
    /// Target fragment duration (default: the sizer's).
    #[serde(default, deserialize_with = "opt_millis")]
    pub target: Option<f64>,
    /// Whether its tasks ack items as they go (default). A task that does not is
    /// all-or-nothing: a fragment cut off by a preemption loses all its work.
    #[serde(default = "yes")]
    pub acks: bool,
}

impl StageSpec {
    /// Mean item cost on a class, ms, before drift.
    pub fn item_ms_on(&self, class: &ClassSpec) -> f64 {
        self.item_ms * self.speed.get(&class.name).copied().unwrap_or(1.0) / class.speed.max(1e-9)
    }
}

fn yes() -> bool {
    true
}
fn one() -> u32 {
    1
}
fn one_f() -> f64 {
    1.0
}
fn default_spread() -> f64 {
    0.3
}
fn default_overhead() -> f64 {
    200.0
}
fn default_heartbeat() -> f64 {
    5_000.0
}
fn default_lease() -> f64 {
    30_000.0
}
fn default_idle_exit() -> f64 {
    120_000.0
}
fn default_plan_every() -> f64 {
    60_000.0
}
fn default_jitter() -> f64 {
    0.05
}

fn default_horizon() -> f64 {
    30.0 * 86_400_000.0
}
fn default_replace() -> f64 {
    60_000.0
}

/// A duration as milliseconds: seconds as a number, or a humantime string.
fn millis<'de, D: Deserializer<'de>>(d: D) -> Result<f64, D::Error> {
    #[derive(Deserialize)]
    #[serde(untagged)]
    enum Raw {
        Seconds(f64),
        Text(String),
    }
    match Raw::deserialize(d)? {
        Raw::Seconds(s) if s.is_finite() && s >= 0.0 => Ok(s * 1e3),
        Raw::Seconds(s) => Err(serde::de::Error::custom(format!(
            "bad duration {s}: must be a finite number of seconds >= 0"
        ))),
        Raw::Text(t) => humantime::parse_duration(t.trim())
            .map(|d| d.as_secs_f64() * 1e3)
            .map_err(|e| serde::de::Error::custom(format!("bad duration \"{t}\": {e}"))),
    }
}

fn opt_millis<'de, D: Deserializer<'de>>(d: D) -> Result<Option<f64>, D::Error> {
    millis(d).map(Some)
}

/// Reads a scenario; errors name the file, line and column.
pub fn parse(path: &str, text: &str) -> Result<Scenario, String> {
    let scenario: Scenario = toml::from_str(text).map_err(|e| {
        let (line, col) = e.span().map_or((1, 1), |s| line_col(text, s.start));
        format!("{path}:{line}:{col}: {}", e.message())
    })?;
    check(&scenario).map_err(|e| format!("{path}: {e}"))?;
    Ok(scenario)
}

fn line_col(text: &str, at: usize) -> (usize, usize) {
    let before = &text[..at.min(text.len())];
    let line = before.matches('\n').count() + 1;
    let col = before.len() - before.rfind('\n').map_or(0, |i| i + 1) + 1;
    (line, col)
}

/// Refuses what the simulation cannot run: no classes or stages, unknown names in
/// `after` or `class`, cycles, zero items, non-positive costs.
fn check(s: &Scenario) -> Result<(), String> {
    if s.classes.is_empty() || s.stages.is_empty() {
        return Err("a scenario needs at least one [[class]] and one [[stage]]".into());
    }
    for (name, shares) in s.shares.iter().chain(&s.account_shares) {
        if !(shares.is_finite() && *shares > 0.0) {
            return Err(format!(
                "shares of {name}: must be a number above 0, not {shares}"
            ));
        }
    }
    if s.fair_half_life <= 0.0 {
        return Err("fair_half_life must be longer than 0".into());
    }
    let classes: Vec<&str> = s.classes.iter().map(|c| c.name.as_str()).collect();
    for c in &s.classes {
        if c.count == 0 || c.slots == 0 || c.speed <= 0.0 || c.cost < 0.0 {
            return Err(format!(
                "class {}: count, slots and speed must be > 0, cost >= 0",
                c.name
            ));
        }
    }
    let names: Vec<&str> = s.stages.iter().map(|st| st.name.as_str()).collect();
    for (i, st) in s.stages.iter().enumerate() {
        if names[..i].contains(&st.name.as_str()) {
            return Err(format!("stage {}: duplicate name", st.name));
        }
        if st.items == 0 || st.item_ms <= 0.0 || st.overhead_ms < 0.0 || st.spread < 0.0 {
            return Err(format!(
                "stage {}: items and item_ms must be > 0, overhead_ms and spread >= 0",
                st.name
            ));
        }
        for a in &st.after {
            if !names.contains(&a.as_str()) {
                return Err(format!("stage {}: after names unknown stage {a}", st.name));
            }
        }
        let named = st.class.iter().chain(st.speed.keys());
        for c in named {
            if !classes.contains(&c.as_str()) {
                return Err(format!("stage {}: unknown class {c}", st.name));
            }
        }
        if st.class_required && st.class.is_none() {
            return Err(format!("stage {}: class_required without a class", st.name));
        }
    }
    // Cycles: repeatedly drop stages whose dependencies are all dropped.
    let mut left: Vec<usize> = (0..s.stages.len()).collect();
    while !left.is_empty() {
        let before = left.len();
        let snapshot = left.clone();
        left.retain(|&i| {
            s.stages[i]
                .after
                .iter()
                .any(|a| snapshot.iter().any(|&j| s.stages[j].name == *a))
        });
        if left.len() == before {
            return Err(format!(
                "stages form a cycle through `after`: {}",
                left.iter()
                    .map(|&i| s.stages[i].name.as_str())
                    .collect::<Vec<_>>()
                    .join(", ")
            ));
        }
    }
    Ok(())
}

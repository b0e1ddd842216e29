//! Pieces both backends share: JSON columns, the stored sizer config, the choice
//! of where to split a running fragment, placement order and status figures.

use crate::{
    ClassStatus, FragmentEnd, FragmentState, JobHalt, JobState, Result, StageState, StoreError,
};
use granule_core::{
    prediction_error, profile, FinishOutcome, FinishReport, Sizer, SizerConfig, StageNeeds,
    StageView, WorkerSpan,
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
        "skipped" => StageState::Skipped,
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

/// The view of a stage (position, needs, `after`, readiness) from what was read of
/// it; `created_ms` is its job's submission, for the deadline.
pub(crate) fn stage_view(
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
        owner_turn: 0,
    })
}

/// A stored sizer state's learned per-item cost, if its model is ready.
pub(crate) fn learned_cost(state: &str) -> Result<Option<f64>> {
    let sizer: Sizer = parse(state, "sizer state")?;
    Ok(sizer.model.ready().then_some(sizer.model.b_ms))
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
    /// Where it is.
    pub(crate) state: crate::WorkerState,
    /// Whether it lost a fragment in the window.
    pub(crate) lost: bool,
}

/// The pool history as the core's forecast takes it.
pub(crate) fn worker_span(now_ms: i64, row: HistoryRow) -> WorkerSpan {
    let ended = row.state == crate::WorkerState::Exited || row.heard_ms < now_ms - SILENT_MS;
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

/// The cost of an item, µs: the model's slope, or where it has none (every
/// fragment one item long, acks in one batch) the observed time per item of the
/// finished fragments, start-up included.
pub(crate) fn item_cost_us<'r>(slope_ms: f64, rows: impl IntoIterator<Item = &'r DoneRow>) -> f64 {
    if slope_ms > 1e-6 {
        return slope_ms * 1e3;
    }
    let (ms, n) = rows
        .into_iter()
        .fold((0.0, 0u64), |(ms, n), r| (ms + r.observed_ms, n + r.n));
    if n == 0 {
        slope_ms.max(0.0) * 1e3
    } else {
        ms / n as f64 * 1e3
    }
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
                learned: model.ready(),
                item_cost_us: item_cost_us(model.b_ms, mine.iter().copied()),
                item_cost_spread_us: model.b_var.max(0.0).sqrt() * 1e3,
                overhead_ms: model.a_ms,
                // `+ 0.0`: an empty sum of floats is -0.0.
                fragment_size: recent.iter().map(|r| r.n as f64).sum::<f64>()
                    / recent.len().max(1) as f64
                    + 0.0,
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

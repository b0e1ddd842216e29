//! What the store shows: status, progress, workers, logs, results, blobs, accounting.

use super::{stages_of, Backend, StageRow, TxKind};
use crate::common::{
    class_statuses, job_state, parse, stage_profile, stage_state, worker_span, DoneRow, HistoryRow,
};
use crate::db::{args, Db};
use crate::{
    Accounting, BlobRow, FragmentLog, JobState, JobStatus, PoolStatus, ResultRow, RunningClass,
    StageProgress, StageStatus, StoreError, StoredBlob, WorkerInfo, WorkerStatus,
};
use crate::{JobId, Result, StageState};
use granule_core::{busiest, prediction_error, IntervalSet, SizeCap, Sizer, Span, WorkerSpan};

/// Workers that hold running fragments.
pub(crate) fn workers_holding_work(b: &mut impl Backend) -> Result<Vec<WorkerInfo>> {
    b.transaction(TxKind::Read, |tx| {
        let rows = tx.query(
            "SELECT id, host, pid, proc_start, slots, class, lifespan_end_ms, cost, spot, resources, locality, allocation FROM workers
             WHERE id IN (SELECT DISTINCT worker FROM fragments WHERE state = 'running')",
            args![],
        )?;
        Ok(rows
            .iter()
            .map(|r| WorkerInfo {
                id: r.string(0),
                host: r.string(1),
                pid: r.i64(2),
                proc_start: r.i64(3),
                slots: r.u32(4),
                class: r.string(5),
                lifespan_end_ms: r.opt_i64(6),
                cost_per_hour: r.f64(7),
                spot: r.bool(8),
                resources: r.string(9),
                locality: r.string(10),
                allocation: r.opt_string(11),
            })
            .collect())
    })
}

/// Columns of a [`crate::FragmentRow`], with `f` the fragment, `s` its stage and
/// `j` its job.
const FRAGMENT_COLUMNS: &str =
    "f.id, j.name, s.name, f.worker, f.class, f.start_idx, f.end_idx, f.n,
    f.done_count, f.state, f.cause, f.claimed_ms, f.finished_ms, f.predicted_ms, f.observed_ms,
    f.splits, f.size_cap, f.claim_us";

fn fragment_row(r: &crate::db::Row) -> crate::FragmentRow {
    crate::FragmentRow {
        id: r.i64(0),
        job: r.string(1),
        stage: r.string(2),
        worker: r.string(3),
        class: r.string(4),
        start_idx: r.u64(5),
        end_idx: r.u64(6),
        items: r.u64(7),
        acked: r.u64(8),
        state: r.string(9),
        cause: r.opt_string(10),
        claimed_ms: r.i64(11),
        finished_ms: r.opt_i64(12),
        predicted_ms: r.f64(13),
        observed_ms: r.opt_f64(14),
        splits: r.u64(15),
        size_cap: r.string(16),
        claim_us: r.opt_i64(17),
    }
}

/// A job's fragments claimed since `since_ms` or still running then, oldest first;
/// past `limit`, the newest.
pub(crate) fn fragments(
    b: &mut impl Backend,
    job: &str,
    since_ms: i64,
    limit: u32,
) -> Result<Vec<crate::FragmentRow>> {
    b.transaction(TxKind::Read, |tx| {
        let sql = format!(
            "SELECT {FRAGMENT_COLUMNS}
             FROM fragments f JOIN stages s ON s.id = f.stage_id JOIN jobs j ON j.id = s.job_id
             WHERE j.name = $1 AND (f.claimed_ms >= $2 OR f.finished_ms IS NULL OR f.finished_ms >= $2)
             ORDER BY f.id DESC LIMIT $3"
        );
        let rows = tx.query(&sql, args![job, since_ms, i64::from(limit)])?;
        let mut out: Vec<crate::FragmentRow> = rows.iter().map(fragment_row).collect();
        out.reverse();
        Ok(out)
    })
}

/// Fragments of every job claimed (or, with `finished`, ended) after the cursor
/// `(ms, id)`, in that order, at most `limit`.
pub(crate) fn fragments_after(
    b: &mut impl Backend,
    finished: bool,
    after: (i64, i64),
    limit: u32,
) -> Result<Vec<crate::FragmentRow>> {
    let at = if finished {
        "f.finished_ms"
    } else {
        "f.claimed_ms"
    };
    b.transaction(TxKind::Read, |tx| {
        let sql = format!(
            "SELECT {FRAGMENT_COLUMNS}
             FROM fragments f JOIN stages s ON s.id = f.stage_id JOIN jobs j ON j.id = s.job_id
             WHERE {at} IS NOT NULL AND ({at} > $1 OR ({at} = $1 AND f.id > $2))
             ORDER BY {at}, f.id LIMIT $3"
        );
        let rows = tx.query(&sql, args![after.0, after.1, i64::from(limit)])?;
        Ok(rows.iter().map(fragment_row).collect())
    })
}

/// Status of one job or all; a job whose stored state cannot be read shows broken.
pub(crate) fn status(b: &mut impl Backend, job: Option<&str>) -> Result<Vec<JobStatus>> {
    b.transaction(TxKind::Read, |tx| {
        let jobs = tx.query(
            "SELECT id, name, state, created_ms, error FROM jobs
             WHERE ($1::TEXT IS NULL OR name = $1) AND state != 'removed' ORDER BY id",
            args![job],
        )?;
        if let (Some(name), true) = (job, jobs.is_empty()) {
            return Err(StoreError::NoSuchJob(name.to_string()));
        }
        let mut out = Vec::new();
        for j in &jobs {
            let stages = stages_of(tx, j.i64(0), false).and_then(|stages| {
                let mut out = stages
                    .iter()
                    .map(|stage| stage_status(tx, stage))
                    .collect::<Result<Vec<_>>>()?;
                let finished: Vec<bool> = stages.iter().map(StageRow::is_done).collect();
                for (s, row) in out.iter_mut().zip(&stages) {
                    s.ready = !finished[row.idx]
                        && row
                            .after
                            .iter()
                            .all(|&a| finished.get(a).copied().unwrap_or(true));
                }
                links(tx, j.i64(0), &mut out)?;
                for s in &mut out {
                    if s.state == StageState::Done && s.quarantined > 0 {
                        s.state = StageState::Failed;
                    }
                }
                Ok(out)
            });
            let (mut state, mut error) = (job_state(j.str(2)), j.opt_string(4));
            let stages = match stages {
                Ok(stages) => stages,
                Err(StoreError::Corrupt(why)) => {
                    state = JobState::Broken;
                    error = Some(format!("its stored state cannot be read: {why}"));
                    Vec::new()
                }
                Err(e) => return Err(e),
            };
            out.push(JobStatus {
                name: j.string(1),
                state,
                created_ms: j.i64(3),
                error,
                stages,
            });
        }
        Ok(out)
    })
}

/// Fills in how a job's stages feed each other (`streams_from`, `producing`,
/// `feeds`, `skipped_for`); `stages` are in spec order.
fn links(tx: &mut dyn Db, job: i64, stages: &mut [StageStatus]) -> Result<()> {
    let rows = tx.query(
        "SELECT sources, after, after_any, published, results_published, from_results
         FROM stages WHERE job_id = $1 ORDER BY idx",
        args![job],
    )?;
    let mut edges = Vec::new();
    let mut results = Vec::new();
    for (i, r) in rows.iter().enumerate() {
        let sources: Vec<usize> = parse(r.str(0), "stage sources")?;
        let after: Vec<usize> = parse(r.str(1), "stage after")?;
        let any: Vec<usize> = parse(r.str(2), "stage after_any")?;
        edges.push((sources, after, any));
        results.push(r.bool(5));
        if let Some(s) = stages.get_mut(i) {
            (s.outputs, s.results) = (r.u64(3), r.u64(4));
        }
    }
    let ended = |s: &StageStatus| {
        matches!(
            s.state,
            StageState::Done | StageState::Failed | StageState::Skipped
        )
    };
    for i in 0..stages.len().min(edges.len()) {
        let (sources, after, any) = &edges[i];
        let name = |k: &usize| stages.get(*k).map(|s| s.name.clone());
        let streams_from: Vec<String> = sources.iter().filter_map(name).collect();
        let producing = sources
            .iter()
            .any(|k| stages.get(*k).is_some_and(|s| !ended(s)));
        let feeds: Vec<String> = edges
            .iter()
            .enumerate()
            .filter(|(_, e)| e.0.contains(&i))
            .filter_map(|(k, _)| name(&k))
            .collect();
        let skipped_for = match stages[i].state {
            StageState::Skipped => after
                .iter()
                .filter(|a| !any.contains(a))
                .filter(|a| {
                    stages
                        .get(**a)
                        .is_some_and(|s| s.quarantined > 0 || s.state == StageState::Skipped)
                })
                .filter_map(name)
                .collect(),
            _ => Vec::new(),
        };
        // Each source's outputs per item done so far, over all its items.
        let expected = producing.then(|| {
            sources
                .iter()
                .filter_map(|k| stages.get(*k))
                .map(|src| {
                    let made = if results[i] { src.results } else { src.outputs };
                    let settled = src.done + src.quarantined;
                    match (ended(src), settled) {
                        (true, _) => made,
                        (false, 0) => made.max(src.items),
                        (false, n) => {
                            (made as f64 * src.items.max(n) as f64 / n as f64).round() as u64
                        }
                    }
                })
                .sum::<u64>()
        });
        let s = &mut stages[i];
        (
            s.streams_from,
            s.producing,
            s.feeds,
            s.skipped_for,
            s.expected_items,
        ) = (streams_from, producing, feeds, skipped_for, expected);
    }
    Ok(())
}

/// What a stage's fragments and pending rows add up to.
struct Totals {
    done: u64,
    running: u64,
    running_fragments: u64,
    fragments: u64,
    failed: u64,
    yields: u64,
    lost: u64,
    splits: u64,
    fallbacks: u64,
    wasted_ms: f64,
    last_n: u64,
    pending: u64,
    checkpoints: u64,
    quarantined: IntervalSet,
    state_reruns: u64,
    results_missing: u64,
    /// The rule that sized the latest fragment (its stored word).
    last_cap: Option<String>,
}

fn totals(tx: &mut dyn Db, stage: i64) -> Result<Totals> {
    let r = tx.query_one(
        "SELECT coalesce(sum(done_count), 0)::BIGINT,
                coalesce(sum(end_idx - start_idx - done_count) FILTER (WHERE state = 'running'), 0)::BIGINT,
                count(*) FILTER (WHERE state = 'running'),
                count(*) FILTER (WHERE state != 'migrated'),
                count(*) FILTER (WHERE state = 'failed'),
                count(*) FILTER (WHERE state = 'yielded'),
                count(*) FILTER (WHERE state = 'lost'),
                coalesce(sum(splits), 0)::BIGINT,
                coalesce(sum(checkpoint_fallbacks), 0)::BIGINT,
                coalesce(sum(wasted_ms), 0)::DOUBLE PRECISION,
                (SELECT n FROM fragments WHERE stage_id = $1 ORDER BY id DESC LIMIT 1),
                (SELECT coalesce(sum(end_idx - start_idx), 0)::BIGINT FROM pending WHERE stage_id = $1),
                (SELECT count(*) FROM blobs WHERE stage_id = $1 AND kind = 'checkpoint'),
                (SELECT quarantined FROM stages WHERE id = $1),
                coalesce(sum(state_reruns), 0)::BIGINT,
                coalesce(sum(results_missing) FILTER (WHERE state = 'done'), 0)::BIGINT,
                (SELECT size_cap FROM fragments WHERE stage_id = $1 ORDER BY id DESC LIMIT 1)
         FROM fragments WHERE stage_id = $1",
        args![stage],
    )?;
    Ok(Totals {
        done: r.u64(0),
        running: r.u64(1),
        running_fragments: r.u64(2),
        fragments: r.u64(3),
        failed: r.u64(4),
        yields: r.u64(5),
        lost: r.u64(6),
        splits: r.u64(7),
        fallbacks: r.u64(8),
        wasted_ms: r.f64(9),
        last_n: r.opt_i64(10).unwrap_or(0).max(0) as u64,
        pending: r.u64(11),
        checkpoints: r.u64(12),
        quarantined: parse(r.str(13), "quarantined")?,
        state_reruns: r.u64(14),
        results_missing: r.u64(15),
        last_cap: r.opt_string(16),
    })
}

/// A stage's running fragments per class: how many, their claim times and acks.
fn running_by_class(tx: &mut dyn Db, stage: i64) -> Result<Vec<RunningClass>> {
    Ok(tx
        .query(
            "SELECT class, count(*), coalesce(sum(claimed_ms), 0)::BIGINT, coalesce(sum(done_count), 0)::BIGINT
             FROM fragments WHERE stage_id = $1 AND state = 'running' GROUP BY class ORDER BY class",
            args![stage],
        )?
        .iter()
        .map(|r| RunningClass {
            class: r.string(0),
            fragments: r.u64(1),
            claimed_ms_sum: r.i64(2),
            acked: r.u64(3),
        })
        .collect())
}

/// A stage's finished fragments in finish order, for its profile and prediction error.
fn done_rows(tx: &mut dyn Db, stage: i64) -> Result<Vec<DoneRow>> {
    Ok(tx
        .query(
            "SELECT class, end_idx - start_idx, predicted_ms, coalesce(observed_ms, 0), coalesce(cpu_ms, 0),
                    coalesce(peak_rss_kb, 0), io_bytes
             FROM fragments WHERE stage_id = $1 AND state = 'done' ORDER BY finished_ms, id",
            args![stage],
        )?
        .iter()
        .map(|r| DoneRow {
            class: r.string(0),
            n: r.u64(1),
            predicted_ms: r.f64(2),
            observed_ms: r.f64(3),
            cpu_ms: r.f64(4),
            peak_rss_kb: r.u64(5),
            io_bytes: r.u64(6),
        })
        .collect())
}

/// A stage's sizer states by class.
pub(crate) fn sizers(tx: &mut dyn Db, stage: i64) -> Result<Vec<(String, Sizer)>> {
    tx.query(
        "SELECT class, state FROM sizers WHERE stage_id = $1 ORDER BY class",
        args![stage],
    )?
    .iter()
    .map(|s| Ok((s.string(0), parse::<Sizer>(s.str(1), "sizer state")?)))
    .collect()
}

fn stage_status(tx: &mut dyn Db, stage: &StageRow) -> Result<StageStatus> {
    let t = totals(tx, stage.id)?;
    let rows = done_rows(tx, stage.id)?;
    let pairs: Vec<(f64, f64)> = rows
        .iter()
        .map(|r| (r.predicted_ms, r.observed_ms))
        .collect();
    let error = prediction_error(&pairs);
    let sizers = sizers(tx, stage.id)?;
    let sizer = busiest(&sizers);
    let (profile, profile_source) = stage_profile(&rows, &stage.needs);
    // A cap word this version does not know is left out.
    let cap = t
        .last_cap
        .as_deref()
        .and_then(|w| serde_json::from_value::<SizeCap>(w.into()).ok());
    Ok(StageStatus {
        name: stage.name.clone(),
        state: stage_state(&stage.state),
        items: stage.items,
        done: t.done,
        running: t.running,
        pending: t.pending,
        quarantined: t.quarantined.len(),
        quarantined_items: t.quarantined.spans().map(|s| [s.start, s.end]).collect(),
        quarantined_values: Vec::new(),
        fragments: t.fragments,
        running_fragments: t.running_fragments,
        failed_fragments: t.failed,
        fragment_size: t.last_n,
        size_cap: cap,
        size_cap_why: cap.map(|c| c.explain().to_string()),
        acks: stage.acks.expected(),
        ready: false,
        running_by_class: running_by_class(tx, stage.id)?,
        item_cost_us: crate::common::item_cost_us(sizer.model.b_ms, &rows),
        overhead_ms: sizer.model.a_ms,
        target_ms: sizer.target_ms(&stage.sizer_config),
        yields: t.yields,
        lost: t.lost,
        splits: t.splits,
        checkpoint_fallbacks: t.fallbacks,
        state_reruns: t.state_reruns,
        results_missing: t.results_missing,
        checkpoints: t.checkpoints,
        wasted_s: t.wasted_ms / 1e3,
        prediction_error_median: error.0,
        prediction_error_p90: error.1,
        needs: stage.needs.clone(),
        classes: class_statuses(&rows, &sizers),
        profile,
        profile_source,
        streams_from: Vec::new(),
        producing: false,
        expected_items: None,
        outputs: 0,
        results: 0,
        feeds: Vec::new(),
        skipped_for: Vec::new(),
    })
}

/// Progress of a job's stages in spec order.
pub(crate) fn progress(b: &mut impl Backend, job: JobId) -> Result<Vec<StageProgress>> {
    b.transaction(TxKind::Read, |tx| {
        let rows = tx.query(
            "SELECT s.items,
                    (SELECT coalesce(sum(done_count), 0)::BIGINT FROM fragments WHERE stage_id = s.id),
                    s.quarantined,
                    (SELECT n FROM fragments WHERE stage_id = s.id ORDER BY id DESC LIMIT 1),
                    s.state IN ('done', 'skipped'),
                    s.state != 'waiting',
                    s.after
             FROM stages s WHERE s.job_id = $1 ORDER BY s.idx",
            args![job.0],
        )?;
        let ended: Vec<bool> = rows.iter().map(|r| r.bool(4)).collect();
        rows.iter()
            .map(|r| {
                let after: Vec<usize> = parse(r.str(6), "stage after")?;
                Ok(StageProgress {
                    items: r.u64(0),
                    done: r.u64(1),
                    quarantined: parse::<IntervalSet>(r.str(2), "quarantined")?.len(),
                    fragment_size: r.opt_i64(3).unwrap_or(0).max(0) as u64,
                    ended: r.bool(4),
                    // Claimed from, or free to be: the stages before it ended.
                    started: r.bool(5)
                        || after.iter().all(|&a| ended.get(a).copied().unwrap_or(true)),
                })
            })
            .collect()
    })
}

/// Lives of the workers alive since `since_ms` (see `Store::worker_history`).
pub(crate) fn history(tx: &mut dyn Db, now_ms: i64, since_ms: i64) -> Result<Vec<WorkerSpan>> {
    let rows = tx.query(
        "SELECT w.class, w.spot, w.slots::BIGINT, w.started_ms, w.heartbeat_ms, w.state,
                w.id IN (SELECT worker FROM fragments WHERE state = 'lost' AND finished_ms >= $1)
         FROM workers w WHERE w.state != 'exited' OR w.heartbeat_ms >= $1",
        args![since_ms],
    )?;
    rows.iter()
        .map(|r| {
            let row = HistoryRow {
                class: r.string(0),
                spot: r.bool(1),
                slots: r.i64(2),
                started_ms: r.i64(3),
                heard_ms: r.i64(4),
                state: r.str(5).parse()?,
                lost: r.bool(6),
            };
            Ok(worker_span(now_ms, row))
        })
        .collect()
}

/// Workers seen within `window_ms`, or still holding work.
pub(crate) fn workers(
    b: &mut impl Backend,
    now_ms: i64,
    window_ms: i64,
) -> Result<Vec<WorkerStatus>> {
    b.transaction(TxKind::Read, |tx| {
        let rows = tx.query(
            "SELECT w.id, w.host, w.state, w.class, w.slots, w.busy, w.lifespan_end_ms, w.heartbeat_ms,
                    (SELECT count(*) FROM fragments f WHERE f.worker = w.id AND f.state = 'done'),
                    w.cost, w.spot, w.resources, w.allocation, w.pid, w.proc_start, w.locality
             FROM workers w
             WHERE w.heartbeat_ms >= $1 OR w.id IN (SELECT worker FROM fragments WHERE state = 'running')
             ORDER BY w.started_ms",
            args![now_ms - window_ms],
        )?;
        rows.iter()
            .map(|r| {
                Ok(WorkerStatus {
                id: r.string(0),
                host: r.string(1),
                state: r.str(2).parse()?,
                class: r.string(3),
                slots: r.u32(4),
                busy: r.u32(5),
                lifespan_left_ms: r.opt_i64(6).map(|end| end - now_ms),
                heartbeat_age_ms: now_ms - r.i64(7),
                fragments_done: r.u64(8),
                cost_per_hour: r.f64(9),
                spot: r.bool(10),
                resources: serde_json::from_str(r.str(11)).unwrap_or_default(),
                allocation: r.opt_string(12),
                pid: r.i64(13),
                proc_start: r.i64(14),
                locality: r.string(15),
            })
            })
            .collect()
    })
}

/// Stored output tails of a stage's fragments (or one fragment).
pub(crate) fn logs(
    b: &mut impl Backend,
    job: &str,
    stage: &str,
    fragment: Option<i64>,
) -> Result<Vec<FragmentLog>> {
    b.transaction(TxKind::Read, |tx| {
        let rows = tx.query(
            "SELECT f.id, f.start_idx, f.end_idx, f.state, f.cause, f.detail, f.stdout, f.stderr
             FROM fragments f JOIN stages s ON s.id = f.stage_id JOIN jobs j ON j.id = s.job_id
             WHERE j.name = $1 AND s.name = $2 AND ($3::BIGINT IS NULL OR f.id = $3)
               AND f.state != 'migrated'
             ORDER BY f.id",
            args![job, stage, fragment],
        )?;
        rows.iter()
            .map(|r| {
                Ok(FragmentLog {
                    fragment: r.i64(0),
                    start: r.u64(1),
                    end: r.u64(2),
                    state: r.str(3).parse()?,
                    cause: r.opt_string(4),
                    detail: r.opt_string(5),
                    stdout: r.bytes(6),
                    stderr: r.bytes(7),
                })
            })
            .collect()
    })
}

/// Results of a stage: the state each chain of attempts ended with, in item order.
pub(crate) fn results(b: &mut impl Backend, job: &str, stage: &str) -> Result<Vec<ResultRow>> {
    b.transaction(TxKind::Read, |tx| {
        let rows = tx.query(
            "SELECT f.id, b.data, b.raw_len, b.hash, b.meta, b.covers
             FROM fragments f JOIN stages s ON s.id = f.stage_id JOIN jobs j ON j.id = s.job_id
               JOIN blobs b ON b.id = f.result
             WHERE j.name = $1 AND s.name = $2 ORDER BY f.start_idx, f.id",
            args![job, stage],
        )?;
        rows.iter()
            .map(|r| {
                Ok(ResultRow {
                    fragment: r.i64(0),
                    blob: BlobRow {
                        data: r.bytes(1),
                        raw_len: r.u64(2),
                        hash: r.string(3),
                        meta: r.string(4),
                    },
                    covers: parse(r.str(5), "result covers")?,
                })
            })
            .collect()
    })
}

/// A checkpoint blob by id, with the one before it and what it covers.
pub(crate) fn blob(b: &mut impl Backend, id: i64) -> Result<Option<StoredBlob>> {
    b.transaction(TxKind::Read, |tx| {
        let row = tx.query_opt(
            "SELECT data, raw_len, hash, meta, prev, covers FROM blobs WHERE id = $1",
            args![id],
        )?;
        row.map(|r| {
            Ok(StoredBlob {
                row: BlobRow {
                    data: r.bytes(0),
                    raw_len: r.u64(1),
                    hash: r.string(2),
                    meta: r.string(3),
                },
                prev: r.opt_i64(4),
                covers: parse(r.str(5), "checkpoint covers")?,
            })
        })
        .transpose()
    })
}

/// The checkpoint before `id` in its chain, found even when `id`'s own record is
/// gone (from the fragment that wrote it).
pub(crate) fn checkpoint_before(b: &mut impl Backend, id: i64) -> Result<Option<i64>> {
    b.transaction(TxKind::Read, |tx| {
        if let Some(r) = tx.query_opt("SELECT prev FROM blobs WHERE id = $1", args![id])? {
            return Ok(r.opt_i64(0));
        }
        let writer = tx.query_opt(
            "SELECT id, resumed_from FROM fragments
             WHERE checkpoint_id = $1 AND resumed_from IS DISTINCT FROM $1 ORDER BY id LIMIT 1",
            args![id],
        )?;
        let Some(w) = writer else { return Ok(None) };
        let earlier = tx
            .query_one(
                "SELECT max(id) FROM blobs WHERE fragment_id = $1 AND id < $2",
                args![w.i64(0), id],
            )?
            .opt_i64(0);
        Ok(earlier.or(w.opt_i64(1)))
    })
}

/// Where every item of a stage is now, as sets.
pub(crate) fn accounting(b: &mut impl Backend, job: &str, stage: &str) -> Result<Accounting> {
    b.transaction(TxKind::Read, |tx| {
        let row = tx
            .query_opt(
                "SELECT s.id, s.quarantined FROM stages s JOIN jobs j ON j.id = s.job_id
                 WHERE j.name = $1 AND s.name = $2",
                args![job, stage],
            )?
            .ok_or_else(|| StoreError::NoSuchJob(format!("{job}/{stage}")))?;
        let id = row.i64(0);
        let mut acc = Accounting {
            quarantined: parse(row.str(1), "quarantined")?,
            ..Accounting::default()
        };
        for r in tx.query(
            "SELECT start_idx, end_idx FROM pending WHERE stage_id = $1",
            args![id],
        )? {
            acc.pending.insert(Span::new(r.u64(0), r.u64(1)));
        }
        for r in tx.query(
            "SELECT start_idx, end_idx, acked, state = 'running' FROM fragments WHERE stage_id = $1",
            args![id],
        )? {
            let acked: IntervalSet = parse(r.str(2), "fragment acks")?;
            if r.bool(3) {
                acc.running
                    .union_with(&acked.complement_within(Span::new(r.u64(0), r.u64(1))));
            }
            acc.done.union_with(&acked);
        }
        Ok(acc)
    })
}

/// Every pool `granule serve` has written, by name.
pub(crate) fn pools(b: &mut impl Backend) -> Result<Vec<PoolStatus>> {
    b.transaction(TxKind::Read, |tx| {
        let rows = tx.query("SELECT state FROM pools ORDER BY name", args![])?;
        rows.iter().map(|r| parse(r.str(0), "pool state")).collect()
    })
}

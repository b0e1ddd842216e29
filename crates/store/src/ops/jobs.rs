//! Jobs and workers: submit, look up, cancel, register.

use super::fragment::insert_pending;
use super::{Backend, TxKind, SHARDS};
use crate::common::{json, parse, sizer_config_json};
use crate::db::{args, Db};
use crate::{
    JobRecord, JobSummary, NewJob, PoolStatus, Result, StoreError, Submitted, WorkerInfo,
    WorkerState,
};
use granule_core::{IntervalSet, JobId, PendingRange, Span};

/// How a job is looked up.
pub(crate) enum JobKey<'a> {
    /// By name.
    Name(&'a str),
    /// By id.
    Id(i64),
}

/// Records a job (see `Store::submit`). Two submits of a new job at once may both
/// find no row and insert it (PostgreSQL): the loser's unique violation means the
/// job now exists, so it looks again (and resumes it, or refuses a different spec).
pub(crate) fn submit(
    b: &mut impl Backend,
    job: &NewJob,
    now_ms: i64,
    fresh: bool,
) -> Result<Submitted> {
    let mut attempt = 0;
    loop {
        match b.transaction(TxKind::Write, |tx| submit_once(tx, job, now_ms, fresh)) {
            Err(e) if e.is_unique_violation() && attempt < 3 => attempt += 1,
            other => return other,
        }
    }
}

fn submit_once(tx: &mut dyn Db, job: &NewJob, now_ms: i64, fresh: bool) -> Result<Submitted> {
    let existing = tx.query_opt(
        "SELECT id, spec_hash, state FROM jobs WHERE name = $1 FOR UPDATE",
        args![&job.name],
    )?;
    if let Some(r) = existing {
        let id = r.i64(0);
        if !fresh {
            if r.str(1) != job.spec_hash {
                return Err(StoreError::SpecChanged(job.name.clone()));
            }
            return match r.str(2) {
                "refused" => {
                    // Submitted again as it was: its items are as submitted again.
                    tx.execute(
                        "UPDATE jobs SET state = 'running', error = NULL, finished_ms = NULL WHERE id = $1",
                        args![id],
                    )?;
                    tx.notify()?;
                    Ok(Submitted::Resumed(JobId(id)))
                }
                "running" => Ok(Submitted::Resumed(JobId(id))),
                _ => Ok(Submitted::AlreadyFinished(JobId(id))),
            };
        }
        retire(tx, id)?;
    }
    let id = tx
        .query_one(
            "INSERT INTO jobs (name, spec_hash, spec, state, created_ms) VALUES ($1, $2, $3, 'running', $4) RETURNING id",
            args![&job.name, &job.spec_hash, &job.spec_json, now_ms],
        )?
        .i64(0);
    for (idx, stage) in job.stages.iter().enumerate() {
        let streamed = !stage.sources.is_empty();
        let state = if stage.items == 0 && !streamed {
            "done"
        } else {
            "waiting"
        };
        let stage_id = tx
            .query_one(
                "INSERT INTO stages (job_id, idx, name, items, after, retries, sizer_config, state, needs, quarantined, cost_key,
                   sources, from_results, after_any)
                 VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, '[]', $10, $11, $12, $13) RETURNING id",
                args![
                    id,
                    idx,
                    &stage.name,
                    stage.items,
                    &json(&stage.after),
                    stage.retries,
                    &sizer_config_json(&stage.sizer),
                    state,
                    &json(&stage.needs),
                    &stage.cost_key,
                    &json(&stage.sources),
                    stage.from_results,
                    &json(&stage.after_any),
                ],
            )?
            .i64(0);
        insert_pending(tx, stage_id, &shards(stage.items))?;
    }
    tx.notify()?;
    Ok(Submitted::Created(JobId(id)))
}

/// A new stage's items as pending ranges: up to [`SHARDS`] of about equal size.
fn shards(items: u64) -> Vec<PendingRange> {
    let shard = items.div_ceil(SHARDS.min(items.max(1))).max(1);
    (0..items)
        .step_by(shard as usize)
        .map(|start| PendingRange::fresh(Span::new(start, (start + shard).min(items))))
        .collect()
}

/// A job's stored spec and state.
pub(crate) fn job(b: &mut impl Backend, key: JobKey<'_>) -> Result<Option<JobRecord>> {
    b.transaction(TxKind::Read, |tx| {
        let row = match key {
            JobKey::Name(name) => tx.query_opt(
                "SELECT id, name, state, spec, error FROM jobs WHERE name = $1",
                args![name],
            )?,
            JobKey::Id(id) => tx.query_opt(
                "SELECT id, name, state, spec, error FROM jobs WHERE id = $1",
                args![id],
            )?,
        };
        row.map(|r| {
            Ok(JobRecord {
                id: JobId(r.i64(0)),
                name: r.string(1),
                state: r.str(2).parse()?,
                spec_json: r.string(3),
                error: r.opt_string(4),
            })
        })
        .transpose()
    })
}

/// Cancels a running job; false if there is none of that name.
pub(crate) fn cancel(b: &mut impl Backend, name: &str, now_ms: i64) -> Result<bool> {
    b.transaction(TxKind::Write, |tx| {
        let n = tx.execute(
            "UPDATE jobs SET state = 'cancelled', finished_ms = $2 WHERE name = $1 AND state = 'running'",
            args![name, now_ms],
        )?;
        Ok(n == 1)
    })
}

/// Stops a running job whose task looks broken (`halt`): state `halted` with
/// `why`; its running fragments stop at their next flush, their acks kept.
pub(crate) fn halt(b: &mut impl Backend, job: JobId, why: &str, now_ms: i64) -> Result<bool> {
    b.transaction(TxKind::Write, |tx| {
        let n = tx.execute(
            "UPDATE jobs SET state = 'halted', error = $2, finished_ms = $3 WHERE id = $1 AND state = 'running'",
            args![job.0, why, now_ms],
        )?;
        Ok(n == 1)
    })
}

/// Puts a job's quarantined items (of one stage, or all) back to pending with
/// fresh retries and reopens the job itself if it failed or halted; done work stays
/// done. Stages that stream from a retried stage run again (they take what it
/// publishes now); a stage skipped for quarantined items upstream is reopened once
/// none of the stages it strictly comes after keeps any. Returns the items made
/// pending again.
pub(crate) fn retry(
    b: &mut impl Backend,
    name: &str,
    stage: Option<&str>,
    now_ms: i64,
) -> Result<u64> {
    let _ = now_ms;
    b.transaction(TxKind::Write, |tx| {
        let Some(job) = tx.query_opt(
            "SELECT id, state FROM jobs WHERE name = $1 FOR UPDATE",
            args![name],
        )?
        else {
            return Err(StoreError::NoSuchJob(name.to_string()));
        };
        let id = job.i64(0);
        if !matches!(job.str(1), "running" | "failed" | "halted" | "done") {
            return Err(StoreError::NotRetryable(name.to_string(), job.string(1)));
        }
        struct S {
            id: i64,
            name: String,
            state: String,
            quarantined: IntervalSet,
            items: u64,
            strict: Vec<usize>,
            sources: Vec<usize>,
        }
        let mut stages = Vec::new();
        for r in tx.query(
            "SELECT id, name, state, quarantined, items, after, after_any, sources FROM stages
             WHERE job_id = $1 ORDER BY idx FOR UPDATE",
            args![id],
        )? {
            let after: Vec<usize> = parse(r.str(5), "stage after")?;
            let any: Vec<usize> = parse(r.str(6), "stage after_any")?;
            stages.push(S {
                id: r.i64(0),
                name: r.string(1),
                state: r.string(2),
                quarantined: parse(r.str(3), "quarantined")?,
                items: r.u64(4),
                strict: after.into_iter().filter(|a| !any.contains(a)).collect(),
                sources: parse(r.str(7), "stage sources")?,
            });
        }
        if let Some(wanted) = stage {
            if !stages.iter().any(|s| s.name == wanted) {
                return Err(StoreError::NoSuchStage(
                    name.to_string(),
                    wanted.to_string(),
                ));
            }
        }
        let mut again = 0;
        for s in stages.iter_mut() {
            if stage.is_some_and(|wanted| wanted != s.name) {
                continue;
            }
            if !s.quarantined.is_empty() {
                let ranges: Vec<PendingRange> =
                    s.quarantined.spans().map(PendingRange::fresh).collect();
                insert_pending(tx, s.id, &ranges)?;
                again += s.quarantined.len();
                s.quarantined = IntervalSet::new();
                s.state = "running".into();
                tx.execute(
                    "UPDATE stages SET quarantined = '[]', state = 'running' WHERE id = $1",
                    args![s.id],
                )?;
            }
            // Fresh retries for what a halt left pending.
            tx.execute(
                "UPDATE pending SET failures = 0 WHERE stage_id = $1",
                args![s.id],
            )?;
        }
        // Until nothing changes: stages fed by a reopened stage run again, and a
        // skipped stage whose strict upstreams keep no quarantined item reopens.
        loop {
            let open: Vec<bool> = stages
                .iter()
                .map(|s| !matches!(s.state.as_str(), "done" | "skipped"))
                .collect();
            let tainted: Vec<bool> = stages
                .iter()
                .map(|s| !s.quarantined.is_empty() || s.state == "skipped")
                .collect();
            let mut changed = false;
            for s in stages.iter_mut() {
                if s.state == "done" && s.sources.iter().any(|&k| open.get(k) == Some(&true)) {
                    s.state = "running".into();
                    tx.execute(
                        "UPDATE stages SET state = 'running' WHERE id = $1",
                        args![s.id],
                    )?;
                    changed = true;
                } else if s.state == "skipped"
                    && s.strict.iter().all(|&k| tainted.get(k) == Some(&false))
                {
                    s.state = "waiting".into();
                    tx.execute("DELETE FROM pending WHERE stage_id = $1", args![s.id])?;
                    if s.sources.is_empty() {
                        insert_pending(tx, s.id, &shards(s.items))?;
                    }
                    tx.execute(
                        "UPDATE stages SET state = 'waiting' WHERE id = $1",
                        args![s.id],
                    )?;
                    changed = true;
                }
            }
            if !changed {
                break;
            }
        }
        let reopened = stages
            .iter()
            .any(|s| !matches!(s.state.as_str(), "done" | "skipped"));
        if reopened && matches!(job.str(1), "failed" | "halted" | "done") {
            tx.execute(
                "UPDATE jobs SET state = 'running', error = NULL, finished_ms = NULL WHERE id = $1",
                args![id],
            )?;
        }
        tx.notify()?;
        Ok(again)
    })
}

/// Every job, oldest first, with its counters (`granule jobs`).
pub(crate) fn list(b: &mut impl Backend) -> Result<Vec<JobSummary>> {
    b.transaction(TxKind::Read, |tx| {
        let rows = tx.query(
            "SELECT j.id, j.name, j.state, j.created_ms, j.finished_ms, j.error,
                    (SELECT count(*) FROM stages s WHERE s.job_id = j.id)
             FROM jobs j WHERE j.state != 'removed' ORDER BY j.id",
            args![],
        )?;
        Ok(rows
            .iter()
            .map(|r| JobSummary {
                id: JobId(r.i64(0)),
                name: r.string(1),
                state: crate::common::job_state(r.str(2)),
                created_ms: r.i64(3),
                finished_ms: r.opt_i64(4),
                error: r.opt_string(5),
                stages: r.u64(6),
            })
            .collect())
    })
}

/// Deletes what a job kept (its stages, and with them its fragments, checkpoints
/// and outputs) and leaves its row as a nameless `removed` mark: SQLite gives a new
/// row the largest id plus one, so a deleted newest job's id would go to the next
/// job, and a long-lived worker that cached the old job's spec by id would run the
/// old command on the new job's items.
fn retire(tx: &mut dyn Db, id: i64) -> Result<()> {
    tx.execute("DELETE FROM stages WHERE job_id = $1", args![id])?;
    tx.execute(
        "UPDATE jobs SET name = $2, state = 'removed', spec = '{}', spec_hash = '' WHERE id = $1",
        // Names cannot hold control characters: no job can be called this.
        args![id, &format!("\u{1}removed:{id}")],
    )?;
    Ok(())
}

/// Deletes a job that no longer runs, with its stages, fragments, checkpoints and
/// outputs (its blobs become garbage for `gc`).
pub(crate) fn remove(b: &mut impl Backend, name: &str) -> Result<bool> {
    b.transaction(TxKind::Write, |tx| {
        let Some(r) = tx.query_opt(
            "SELECT state FROM jobs WHERE name = $1 FOR UPDATE",
            args![name],
        )?
        else {
            return Ok(false);
        };
        if r.str(0) == "running" {
            return Err(crate::StoreError::Running(name.to_string()));
        }
        let id = tx
            .query_one("SELECT id FROM jobs WHERE name = $1", args![name])?
            .i64(0);
        retire(tx, id)?;
        Ok(true)
    })
}

/// Jobs not yet finished, oldest first.
pub(crate) fn open_jobs(b: &mut impl Backend) -> Result<Vec<JobId>> {
    b.transaction(TxKind::Read, |tx| {
        let rows = tx.query(
            "SELECT id FROM jobs WHERE state = 'running' ORDER BY id",
            args![],
        )?;
        Ok(rows.iter().map(|r| JobId(r.i64(0))).collect())
    })
}

/// Registers or refreshes a worker.
pub(crate) fn register_worker(b: &mut impl Backend, w: &WorkerInfo, now_ms: i64) -> Result<()> {
    b.transaction(TxKind::Write, |tx| {
        tx.execute(
            "INSERT INTO workers (id, host, pid, proc_start, slots, class, started_ms, heartbeat_ms, lifespan_end_ms,
               state, cost, spot, resources, locality, allocation)
             VALUES ($1, $2, $3, $4, $5, $6, $7, $7, $8, 'running', $9, $10, $11, $12, $13)
             ON CONFLICT (id) DO UPDATE SET slots = $5, class = $6, heartbeat_ms = $7, lifespan_end_ms = $8,
               state = 'running', cost = $9, spot = $10, resources = $11, locality = $12, allocation = $13",
            args![
                &w.id,
                &w.host,
                w.pid,
                w.proc_start,
                w.slots,
                &w.class,
                now_ms,
                w.lifespan_end_ms,
                w.cost_per_hour,
                w.spot,
                &w.resources,
                &w.locality,
                w.allocation.as_deref(),
            ],
        )?;
        Ok(())
    })
}

/// Marks a worker `draining` or `exited` (an exited one holds no lease).
pub(crate) fn set_worker_state(
    b: &mut impl Backend,
    worker: &str,
    state: &str,
    now_ms: i64,
) -> Result<()> {
    let state: WorkerState = state.parse()?;
    b.transaction(TxKind::Write, |tx| {
        tx.execute(
            "UPDATE workers SET state = $2, heartbeat_ms = $3, busy = CASE WHEN $2 = 'exited' THEN 0 ELSE busy END,
               lease_until_ms = CASE WHEN $2 = 'exited' THEN 0 ELSE lease_until_ms END
             WHERE id = $1",
            args![worker, state, now_ms],
        )?;
        Ok(())
    })
}

/// Writes each pool's state as `granule serve` last decided it.
pub(crate) fn set_pools(b: &mut impl Backend, pools: &[PoolStatus]) -> Result<()> {
    b.transaction(TxKind::Write, |tx| {
        for p in pools {
            let state = serde_json::to_string(p).expect("a pool's state serializes");
            tx.execute(
                "INSERT INTO pools (name, state, updated_ms) VALUES ($1, $2, $3)
                 ON CONFLICT (name) DO UPDATE SET state = $2, updated_ms = $3",
                args![&p.name, &state, p.updated_ms],
            )?;
        }
        Ok(())
    })
}

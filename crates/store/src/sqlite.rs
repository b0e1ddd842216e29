//! The embedded backend: one SQLite file in WAL mode, safe across processes.
//!
//! SQLite has no `SKIP LOCKED`; every transition takes the write lock up front
//! (`BEGIN IMMEDIATE`) so two claimers serialize instead of deadlocking, and each
//! holds it for a few row reads and writes only.

use crate::common::{
    accounted_outcome, class_statuses, decode_sizer_config, job_state, json, memory_of, parse,
    sizer_config_json, stage_profile, stage_state, stage_view, verdict, worker_span, DoneRow,
    HistoryRow, StageReading, FOLLOWS_WORKER,
};
use crate::schema::{CURRENT, MIGRATIONS};
use crate::*;
use crate::{Heartbeat, SplitAnswer};
use granule_core::{
    busiest, claim_context, class_deadline_plan, live_pool, placement_order, prediction_error,
    split_gain, split_point, stage_ready, Admission, PoolClass, StageView,
};
use granule_core::{
    retry_budget, FinishOutcome, FragmentId, IntervalSet, JobId, Observation, Pending,
    RunningFragment, SizeCap, Sizer, SizerConfig, Span, StageId, StageLedger, StageNeeds,
};
use rusqlite::{params, Connection, OptionalExtension, Transaction, TransactionBehavior};
use std::collections::hash_map::Entry;
use std::collections::HashMap;
use std::path::Path;
use std::time::Duration;

/// What a stage's fragments add up to, for its status.
struct FragmentCounts {
    fragments: i64,
    failed: i64,
    yields: i64,
    lost: i64,
    splits: i64,
    fallbacks: i64,
    checkpoints: i64,
    wasted_ms: f64,
    last_n: i64,
    state_reruns: i64,
    results_missing: i64,
}

/// A store in one SQLite file.
pub struct SqliteStore {
    conn: Connection,
    writes: WriteCounts,
}

/// The calls whose writes are counted (see [`WriteCounts`]).
#[derive(Clone, Copy)]
enum Call {
    Claim,
    Flush,
    Finish,
}

/// The columns of a stage row the transitions need.
struct StageRow {
    id: i64,
    idx: usize,
    name: String,
    items: u64,
    after: Vec<usize>,
    retries: u32,
    sizer_config: SizerConfig,
    state: String,
    needs: StageNeeds,
}

const STAGE_COLUMNS: &str = "id, idx, name, items, after, retries, sizer_config, state, needs";

type RawStage = (StageRow, String, String, String);

fn stage_row(row: &rusqlite::Row<'_>) -> rusqlite::Result<RawStage> {
    Ok((
        StageRow {
            id: row.get(0)?,
            idx: row.get::<_, i64>(1)? as usize,
            name: row.get(2)?,
            items: row.get::<_, i64>(3)? as u64,
            after: Vec::new(),
            retries: row.get(5)?,
            sizer_config: SizerConfig::default(),
            state: row.get(7)?,
            needs: StageNeeds::default(),
        },
        row.get(4)?,
        row.get(6)?,
        row.get(8)?,
    ))
}

fn stages_of(tx: &Connection, job: i64) -> Result<Vec<StageRow>> {
    let mut stmt = tx.prepare_cached(&format!(
        "SELECT {STAGE_COLUMNS} FROM stages WHERE job_id = ?1 ORDER BY idx"
    ))?;
    let rows = stmt
        .query_map([job], stage_row)?
        .collect::<rusqlite::Result<Vec<_>>>()?;
    rows.into_iter().map(decode_stage).collect()
}

fn stage_by_id(tx: &Connection, stage: i64) -> Result<StageRow> {
    let mut stmt =
        tx.prepare_cached(&format!("SELECT {STAGE_COLUMNS} FROM stages WHERE id = ?1"))?;
    decode_stage(stmt.query_row([stage], stage_row)?)
}

fn decode_stage((mut row, after, config, needs): RawStage) -> Result<StageRow> {
    row.after = parse(&after, "stage after")?;
    row.sizer_config = decode_sizer_config(&config)?;
    row.needs = parse(&needs, "stage needs")?;
    Ok(row)
}

fn load_ledger(tx: &Connection, stage: i64) -> Result<StageLedger> {
    type StageCols = (i64, String, String, String, String, String, (bool, String));
    let (items, pending, done, quarantined, acks, unconfirmed, (stateful, stateless)): StageCols =
        tx.query_row(
            "SELECT items, pending, done, quarantined, acks, unconfirmed, stateful, stateless_done
             FROM stages WHERE id = ?1",
            [stage],
            |r| {
                Ok((
                    r.get(0)?,
                    r.get(1)?,
                    r.get(2)?,
                    r.get(3)?,
                    r.get(4)?,
                    r.get(5)?,
                    (r.get(6)?, r.get(7)?),
                ))
            },
        )?;
    let mut stmt = tx.prepare_cached(
        "SELECT id, start_idx, end_idx, acked, failures, checkpoint_id, lost, floor_memory_mb, covers,
                inherited, resumed_from
         FROM fragments WHERE stage_id = ?1 AND state = 'running'",
    )?;
    let rows = stmt.query_map([stage], |r| {
        Ok((
            FragmentId(r.get(0)?),
            Span::new(r.get::<_, i64>(1)? as u64, r.get::<_, i64>(2)? as u64),
            r.get::<_, String>(3)?,
            r.get::<_, u32>(4)?,
            r.get::<_, Option<i64>>(5)?,
            r.get::<_, u32>(6)?,
            r.get::<_, i64>(7)? as u64,
            (r.get::<_, String>(8)?, r.get::<_, String>(9)?),
            r.get::<_, Option<i64>>(10)?,
        ))
    })?;
    let mut running = Vec::new();
    for row in rows {
        let (id, span, acked, failures, checkpoint, lost, floor, (covers, inherited), resumed) =
            row?;
        running.push(RunningFragment {
            id,
            span,
            acked: parse(&acked, "fragment acks")?,
            failures,
            checkpoint,
            lost,
            floor_memory_mb: floor,
            covers: parse(&covers, "fragment covers")?,
            resumed_from: resumed,
            inherited: parse(&inherited, "fragment inherited state")?,
        });
    }
    Ok(StageLedger {
        items: items as u64,
        pending: parse::<Pending>(&pending, "pending")?,
        done: parse(&done, "done")?,
        quarantined: parse(&quarantined, "quarantined")?,
        running,
        acking: acks == "yes",
        unconfirmed: parse(&unconfirmed, "unconfirmed")?,
        stateful,
        stateless_done: parse(&stateless, "stateless done")?,
    })
}

/// The largest memory (MiB) among live workers, and whether a live one is on-demand.
fn alive_capacity(tx: &Connection, req: &ClaimRequest) -> Result<(u64, bool)> {
    let mut stmt = tx.prepare_cached(
        "SELECT spot, resources FROM workers WHERE state = 'running' AND heartbeat_ms >= ?1",
    )?;
    let rows = stmt
        .query_map([req.now_ms - req.lease_ms], |r| {
            Ok((r.get::<_, bool>(0)?, r.get::<_, String>(1)?))
        })?
        .collect::<rusqlite::Result<Vec<_>>>()?;
    let memory = rows.iter().map(|(_, r)| memory_of(r)).max().unwrap_or(0);
    Ok((memory, rows.iter().any(|(spot, _)| !spot)))
}

/// The total memory (MiB) a worker reported of itself.
fn worker_memory(tx: &Connection, worker: &str) -> Result<u64> {
    let resources: Option<String> = tx
        .query_row(
            "SELECT resources FROM workers WHERE id = ?1",
            [worker],
            |r| r.get(0),
        )
        .optional()?;
    Ok(resources.map_or(0, |r| memory_of(&r)))
}

/// Lives of the workers alive since `since_ms` (see `Store::worker_history`).
fn history(tx: &Connection, now_ms: i64, since_ms: i64) -> Result<Vec<WorkerSpan>> {
    let mut stmt = tx.prepare_cached(
        "SELECT w.class, w.spot, w.slots, w.started_ms, w.heartbeat_ms, w.state,
                w.id IN (SELECT worker FROM fragments WHERE state = 'lost' AND finished_ms >= ?1)
         FROM workers w WHERE w.state != 'exited' OR w.heartbeat_ms >= ?1",
    )?;
    let rows = stmt
        .query_map([since_ms], |r| {
            Ok(HistoryRow {
                class: r.get(0)?,
                spot: r.get(1)?,
                slots: r.get(2)?,
                started_ms: r.get(3)?,
                heard_ms: r.get(4)?,
                state: r.get(5)?,
                lost: r.get(6)?,
            })
        })?
        .collect::<rusqlite::Result<Vec<HistoryRow>>>()?;
    Ok(rows
        .into_iter()
        .map(|row| worker_span(now_ms, row))
        .collect())
}

/// A stage's ledger as this transaction read it and as it stands now: only what
/// differs is written back, so a flush or finish costs the rows it changed, not a
/// row per running fragment of the stage.
struct Loaded {
    before: StageLedger,
    now: StageLedger,
}

impl Loaded {
    fn read(tx: &Connection, stage: i64) -> Result<Loaded> {
        let before = load_ledger(tx, stage)?;
        Ok(Loaded {
            now: before.clone(),
            before,
        })
    }
}

/// The ledger of `stage`, loaded once per transaction.
fn ledger_of<'a>(
    tx: &Connection,
    ledgers: &'a mut HashMap<i64, Loaded>,
    stage: i64,
) -> Result<&'a mut StageLedger> {
    Ok(match ledgers.entry(stage) {
        Entry::Occupied(e) => &mut e.into_mut().now,
        Entry::Vacant(e) => &mut e.insert(Loaded::read(tx, stage)?).now,
    })
}

/// Writes back what changed in a stage's ledger since it was loaded: the stage row
/// if its sets moved, and each running fragment that is new or differs.
fn save_ledger(tx: &Connection, stage: i64, loaded: &Loaded) -> Result<()> {
    let (before, ledger) = (&loaded.before, &loaded.now);
    let stage_moved = before.pending != ledger.pending
        || before.done != ledger.done
        || before.quarantined != ledger.quarantined
        || before.acking != ledger.acking
        || before.unconfirmed != ledger.unconfirmed
        || before.stateful != ledger.stateful
        || before.stateless_done != ledger.stateless_done
        || before.is_finished() != ledger.is_finished();
    if stage_moved {
        let state = if ledger.is_finished() {
            "done"
        } else {
            "running"
        };
        tx.prepare_cached(
            "UPDATE stages SET pending = ?2, done = ?3, done_count = ?4, quarantined = ?5, state = ?6,
               unconfirmed = ?7, acks = CASE WHEN ?8 THEN 'yes' ELSE acks END, stateful = ?9,
               stateless_done = ?10 WHERE id = ?1",
        )?
        .execute(params![
            stage,
            json(&ledger.pending),
            json(&ledger.done),
            ledger.done.len() as i64,
            json(&ledger.quarantined),
            state,
            json(&ledger.unconfirmed),
            ledger.acking,
            ledger.stateful,
            json(&ledger.stateless_done)
        ])?;
    }
    let old: HashMap<FragmentId, &RunningFragment> =
        before.running.iter().map(|f| (f.id, f)).collect();
    let mut stmt = tx.prepare_cached(
        "UPDATE fragments SET end_idx = ?2, acked = ?3, checkpoint_id = ?4, covers = ?5, inherited = ?6,
           resumed_from = ?7 WHERE id = ?1",
    )?;
    for f in ledger.running.iter().filter(|f| old.get(&f.id) != Some(f)) {
        stmt.execute(params![
            f.id.0,
            f.span.end as i64,
            json(&f.acked),
            f.checkpoint,
            json(&f.covers),
            json(&f.inherited),
            f.resumed_from
        ])?;
    }
    Ok(())
}

fn load_sizer(tx: &Connection, stage: i64, class: &str) -> Result<Sizer> {
    let state: Option<String> = tx
        .query_row(
            "SELECT state FROM sizers WHERE stage_id = ?1 AND class = ?2",
            params![stage, class],
            |r| r.get(0),
        )
        .optional()?;
    state.map_or(Ok(Sizer::default()), |s| parse(&s, "sizer state"))
}

fn save_sizer(tx: &Connection, stage: i64, class: &str, sizer: &Sizer) -> Result<()> {
    tx.prepare_cached(
        "INSERT OR REPLACE INTO sizers (stage_id, class, state) VALUES (?1, ?2, ?3)",
    )?
    .execute(params![stage, class, json(sizer)])?;
    Ok(())
}

/// Applies one flush to a loaded ledger; returns items newly done.
fn apply_flush(
    tx: &Connection,
    ledger: &mut StageLedger,
    stage: i64,
    f: &FragmentFlush,
    now_ms: i64,
) -> Result<u64> {
    if let Some(restored) = f.restored {
        let covers = match restored {
            Some(blob) => blob_covers(tx, blob)?,
            None => IntervalSet::new(),
        };
        let lost = ledger.fallback(f.fragment, restored, &covers);
        tx.prepare_cached("UPDATE fragments SET state_reruns = state_reruns + ?2 WHERE id = ?1")?
            .execute(params![f.fragment.0, lost as i64])?;
    }
    let acked = ledger.ack(f.fragment, &f.acked);
    if !acked.reverted.is_empty() {
        // The stage's first ack: what all-or-nothing fragments counted is undone.
        tx.prepare_cached(
            "UPDATE fragments SET state = 'reverted', result = NULL WHERE stage_id = ?1 AND state = 'done'",
        )?
        .execute([stage])?;
    }
    for cp in &f.checkpoints {
        let Some(covers) = ledger.checkpoint_covers(f.fragment, &cp.acked) else {
            continue;
        };
        let prev = ledger.fragment(f.fragment).and_then(|r| r.checkpoint);
        let b = &cp.blob;
        tx.prepare_cached(
            "INSERT INTO blobs (stage_id, fragment_id, kind, raw_len, hash, data, meta, created_ms, prev, covers)
             VALUES (?1, ?2, 'checkpoint', ?3, ?4, ?5, ?6, ?7, ?8, ?9)",
        )?
        .execute(params![
            stage,
            f.fragment.0,
            b.raw_len as i64,
            b.hash,
            b.data,
            b.meta,
            now_ms,
            prev,
            json(&covers)
        ])?;
        ledger.checkpoint(f.fragment, tx.last_insert_rowid(), &cp.acked);
    }
    match f.split {
        Some(SplitAnswer::At(at)) => {
            if ledger.split(f.fragment, at) > 0 {
                tx.prepare_cached("UPDATE fragments SET splits = splits + 1 WHERE id = ?1")?
                    .execute([f.fragment.0])?;
            }
            clear_split_request(tx, f.fragment)?;
        }
        Some(SplitAnswer::Refused) => clear_split_request(tx, f.fragment)?,
        None => {}
    }
    Ok(acked.done)
}

/// The result a finish ended a chain with, if its checkpoint is still there; if it
/// is gone, the items it held run again (returns how many).
fn kept_result(
    tx: &Connection,
    ledger: &mut StageLedger,
    report: &granule_core::FinishReport,
) -> Result<(Option<i64>, u64)> {
    let Some((blob, covers)) = &report.result else {
        return Ok((None, 0));
    };
    let found = tx
        .prepare_cached("SELECT 1 FROM blobs WHERE id = ?1")?
        .query_row([blob], |_| Ok(()))
        .optional()?;
    Ok(match found {
        Some(()) => (Some(*blob), 0),
        None => (None, ledger.forget(covers)),
    })
}

/// The items a stored checkpoint holds the state of (none if it is gone).
fn blob_covers(tx: &Connection, blob: i64) -> Result<IntervalSet> {
    let covers: Option<String> = tx
        .prepare_cached("SELECT covers FROM blobs WHERE id = ?1")?
        .query_row([blob], |r| r.get(0))
        .optional()?;
    covers.map_or(Ok(IntervalSet::new()), |c| parse(&c, "checkpoint covers"))
}

fn clear_split_request(tx: &Connection, fragment: FragmentId) -> Result<()> {
    tx.prepare_cached("UPDATE fragments SET split_request = NULL WHERE id = ?1")?
        .execute([fragment.0])?;
    Ok(())
}

/// Slots of live workers (heartbeat within a lease), for tail factoring; at least `own`.
fn active_slots(tx: &Connection, now_ms: i64, lease_ms: i64, own: u32) -> Result<u32> {
    let slots: Option<i64> = tx
        .prepare_cached(
            "SELECT sum(slots) FROM workers WHERE state != 'exited' AND heartbeat_ms >= ?1",
        )?
        .query_row([now_ms - lease_ms], |r| r.get(0))?;
    Ok((slots.unwrap_or(0) as u32).max(own))
}

fn job_record(r: &rusqlite::Row<'_>) -> rusqlite::Result<JobRecord> {
    Ok(JobRecord {
        id: JobId(r.get(0)?),
        name: r.get(1)?,
        state: r.get(2)?,
        spec_json: r.get(3)?,
        error: r.get(4)?,
    })
}

/// The stage of a fragment if `worker` still holds it running.
fn held_stage(tx: &Connection, fragment: FragmentId, worker: &str) -> Result<Option<i64>> {
    Ok(tx
        .prepare_cached(
            "SELECT stage_id FROM fragments WHERE id = ?1 AND state = 'running' AND worker = ?2",
        )?
        .query_row(params![fragment.0, worker], |r| r.get(0))
        .optional()?)
}

/// Whether the job of a stage still runs (not cancelled, refused or broken).
fn job_running(tx: &Connection, stage: i64) -> Result<bool> {
    let state: String = tx
        .prepare_cached(
            "SELECT j.state FROM jobs j JOIN stages s ON s.job_id = j.id WHERE s.id = ?1",
        )?
        .query_row([stage], |r| r.get(0))?;
    Ok(state == "running")
}

/// Stops a running job with an error (`refused`, `broken`); its running fragments
/// are told at their next flush and their accounting is kept.
fn halt_job(tx: &Connection, job: i64, halt: &JobHalt, now_ms: i64) -> Result<()> {
    tx.execute(
        "UPDATE jobs SET state = ?2, error = ?3, finished_ms = ?4 WHERE id = ?1 AND state = 'running'",
        params![job, halt.state(), halt.message(), now_ms],
    )?;
    Ok(())
}

/// Marks the job finished once every stage is.
fn settle_job(tx: &Connection, stage: i64, now_ms: i64) -> Result<bool> {
    let job: i64 = tx.query_row("SELECT job_id FROM stages WHERE id = ?1", [stage], |r| {
        r.get(0)
    })?;
    let open: i64 = tx.query_row(
        "SELECT count(*) FROM stages WHERE job_id = ?1 AND state != 'done'",
        [job],
        |r| r.get(0),
    )?;
    if open > 0 {
        return Ok(false);
    }
    let quarantined: i64 = tx.query_row(
        "SELECT count(*) FROM stages WHERE job_id = ?1 AND quarantined != '[]'",
        [job],
        |r| r.get(0),
    )?;
    let state = if quarantined > 0 { "failed" } else { "done" };
    tx.execute(
        "UPDATE jobs SET state = ?2, finished_ms = ?3 WHERE id = ?1 AND state = 'running'",
        params![job, state, now_ms],
    )?;
    Ok(true)
}

impl SqliteStore {
    /// Opens (creating if needed) the store at `path` and applies pending migrations.
    /// Several processes may open it at once; a busy database is retried for 30 s.
    pub fn open(path: &Path) -> Result<SqliteStore> {
        let deadline = std::time::Instant::now() + Duration::from_secs(30);
        loop {
            match SqliteStore::try_open(path) {
                Err(StoreError::Sqlite(e))
                    if e.sqlite_error_code() == Some(rusqlite::ErrorCode::DatabaseBusy)
                        && std::time::Instant::now() < deadline =>
                {
                    std::thread::sleep(Duration::from_millis(20));
                }
                other => return other,
            }
        }
    }

    fn try_open(path: &Path) -> Result<SqliteStore> {
        let conn = Connection::open(path)?;
        conn.busy_timeout(Duration::from_secs(30))?;
        let mode: String = conn.query_row("PRAGMA journal_mode", [], |r| r.get(0))?;
        if !mode.eq_ignore_ascii_case("wal") {
            conn.pragma_update(None, "journal_mode", "WAL")?;
        }
        conn.pragma_update(None, "synchronous", "NORMAL")?;
        conn.pragma_update(None, "foreign_keys", "ON")?;
        let mut store = SqliteStore {
            conn,
            writes: WriteCounts::default(),
        };
        store.migrate()?;
        Ok(store)
    }

    fn migrate(&mut self) -> Result<()> {
        let tx = self
            .conn
            .transaction_with_behavior(TransactionBehavior::Immediate)?;
        let mut version: usize =
            tx.query_row("PRAGMA user_version", [], |r| r.get::<_, i64>(0))? as usize;
        if version == 0 {
            tx.execute_batch(CURRENT)?;
            version = MIGRATIONS.len();
            tx.pragma_update(None, "user_version", version as i64)?;
        }
        for (i, sql) in MIGRATIONS.iter().enumerate().skip(version) {
            tx.execute_batch(sql)?;
            tx.pragma_update(None, "user_version", (i + 1) as i64)?;
        }
        tx.commit()?;
        Ok(())
    }

    /// Runs one counted call, adding the rows it wrote to `writes`.
    fn counted<T>(&mut self, call: Call, f: impl FnOnce(&mut Self) -> Result<T>) -> Result<T> {
        let before = self.conn.total_changes();
        let result = f(self);
        let rows = self.conn.total_changes() - before;
        let w = &mut self.writes;
        let (calls, written) = match call {
            Call::Claim => (&mut w.claims, &mut w.claim_rows),
            Call::Flush => (&mut w.flushes, &mut w.flush_rows),
            Call::Finish => (&mut w.finishes, &mut w.finish_rows),
        };
        *calls += 1;
        *written += rows;
        result
    }

    fn write(&mut self) -> Result<Transaction<'_>> {
        Ok(self
            .conn
            .transaction_with_behavior(TransactionBehavior::Immediate)?)
    }
}

impl Store for SqliteStore {
    fn submit(&mut self, job: &NewJob, now_ms: i64, fresh: bool) -> Result<Submitted> {
        let tx = self.write()?;
        let existing: Option<(i64, String, String)> = tx
            .query_row(
                "SELECT id, spec_hash, state FROM jobs WHERE name = ?1",
                [&job.name],
                |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)),
            )
            .optional()?;
        if let Some((id, hash, state)) = existing {
            if !fresh {
                if hash != job.spec_hash {
                    return Err(StoreError::SpecChanged(job.name.clone()));
                }
                if state == "refused" {
                    // Submitted again as it was: its items are as submitted again.
                    tx.execute(
                        "UPDATE jobs SET state = 'running', error = NULL, finished_ms = NULL WHERE id = ?1",
                        [id],
                    )?;
                    tx.commit()?;
                    return Ok(Submitted::Resumed(JobId(id)));
                }
                return Ok(if state == "running" {
                    Submitted::Resumed(JobId(id))
                } else {
                    Submitted::AlreadyFinished(JobId(id))
                });
            }
            tx.execute(
                "DELETE FROM fragments WHERE stage_id IN (SELECT id FROM stages WHERE job_id = ?1)",
                [id],
            )?;
            tx.execute("DELETE FROM jobs WHERE id = ?1", [id])?;
        }
        tx.execute(
            "INSERT INTO jobs (name, spec_hash, spec, state, created_ms) VALUES (?1, ?2, ?3, 'running', ?4)",
            params![job.name, job.spec_hash, job.spec_json, now_ms],
        )?;
        let id = tx.last_insert_rowid();
        for (idx, stage) in job.stages.iter().enumerate() {
            let ledger = StageLedger::new(stage.items);
            tx.execute(
                "INSERT INTO stages (job_id, idx, name, items, after, retries, sizer_config, state, pending, done,
                   quarantined, needs)
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, '[]', '[]', ?10)",
                params![
                    id,
                    idx as i64,
                    stage.name,
                    stage.items as i64,
                    json(&stage.after),
                    stage.retries,
                    sizer_config_json(&stage.sizer),
                    if stage.items == 0 { "done" } else { "waiting" },
                    json(&ledger.pending),
                    json(&stage.needs)
                ],
            )?;
        }
        tx.commit()?;
        Ok(Submitted::Created(JobId(id)))
    }

    fn job(&mut self, name: &str) -> Result<Option<JobRecord>> {
        Ok(self
            .conn
            .query_row(
                "SELECT id, name, state, spec, error FROM jobs WHERE name = ?1",
                [name],
                job_record,
            )
            .optional()?)
    }

    fn job_by_id(&mut self, id: JobId) -> Result<Option<JobRecord>> {
        Ok(self
            .conn
            .query_row(
                "SELECT id, name, state, spec, error FROM jobs WHERE id = ?1",
                [id.0],
                job_record,
            )
            .optional()?)
    }

    fn cancel(&mut self, name: &str, now_ms: i64) -> Result<bool> {
        let n = self.conn.execute(
            "UPDATE jobs SET state = 'cancelled', finished_ms = ?2 WHERE name = ?1 AND state = 'running'",
            params![name, now_ms],
        )?;
        Ok(n == 1)
    }

    fn open_jobs(&mut self) -> Result<Vec<JobId>> {
        let mut stmt = self
            .conn
            .prepare_cached("SELECT id FROM jobs WHERE state = 'running' ORDER BY id")?;
        let ids = stmt.query_map([], |r| Ok(JobId(r.get(0)?)))?;
        Ok(ids.collect::<rusqlite::Result<Vec<_>>>()?)
    }

    fn register_worker(&mut self, w: &WorkerInfo, now_ms: i64) -> Result<()> {
        self.conn.execute(
            "INSERT INTO workers (id, host, pid, proc_start, slots, class, started_ms, heartbeat_ms, lifespan_end_ms,
               state, cost, spot, resources, locality)
             VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?7, ?8, 'running', ?9, ?10, ?11, ?12)
             ON CONFLICT (id) DO UPDATE SET slots = ?5, class = ?6, heartbeat_ms = ?7, lifespan_end_ms = ?8,
               state = 'running', cost = ?9, spot = ?10, resources = ?11, locality = ?12",
            params![
                w.id,
                w.host,
                w.pid,
                w.proc_start,
                w.slots,
                w.class,
                now_ms,
                w.lifespan_end_ms,
                w.cost_per_hour,
                w.spot,
                w.resources,
                w.locality
            ],
        )?;
        Ok(())
    }

    fn set_worker_state(&mut self, worker: &str, state: &str, now_ms: i64) -> Result<()> {
        self.conn.execute(
            "UPDATE workers SET state = ?2, heartbeat_ms = ?3, busy = CASE WHEN ?2 = 'exited' THEN 0 ELSE busy END,
               lease_until_ms = CASE WHEN ?2 = 'exited' THEN 0 ELSE lease_until_ms END
             WHERE id = ?1",
            params![worker, state, now_ms],
        )?;
        Ok(())
    }

    fn claim(&mut self, req: &ClaimRequest) -> Result<Option<Assignment>> {
        Ok(self
            .counted(Call::Claim, |s| s.claim_tx(req, 1))?
            .into_iter()
            .next())
    }

    fn claim_many(&mut self, req: &ClaimRequest, slots: usize) -> Result<Vec<Assignment>> {
        self.counted(Call::Claim, |s| s.claim_tx(req, slots))
    }

    fn flush(
        &mut self,
        worker: &str,
        now_ms: i64,
        lease_ms: i64,
        heartbeat: &Heartbeat,
        batch: &[FragmentFlush],
    ) -> Result<FlushReply> {
        self.counted(Call::Flush, |s| {
            s.flush_tx(worker, now_ms, lease_ms, heartbeat, batch)
        })
    }

    fn request_split(
        &mut self,
        job: Option<JobId>,
        now_ms: i64,
        min_ms: f64,
        asker: &str,
    ) -> Result<Option<FragmentId>> {
        let tx = self.write()?;
        let mut stmt = tx.prepare_cached(
            "SELECT f.id, f.stage_id, f.start_idx, f.end_idx, f.acked, f.class, f.claimed_ms, f.predicted_ms
             FROM fragments f JOIN stages s ON s.id = f.stage_id
             WHERE f.state = 'running' AND f.split_request IS NULL AND (?1 IS NULL OR s.job_id = ?1)",
        )?;
        type Row = (i64, i64, i64, i64, String, String, i64, f64);
        let rows: Vec<Row> = stmt
            .query_map([job.map(|j| j.0)], |r| {
                Ok((
                    r.get(0)?,
                    r.get(1)?,
                    r.get(2)?,
                    r.get(3)?,
                    r.get(4)?,
                    r.get(5)?,
                    r.get(6)?,
                    r.get(7)?,
                ))
            })?
            .collect::<rusqlite::Result<Vec<_>>>()?;
        drop(stmt);
        let mut best: Option<(f64, i64, u64)> = None;
        for (id, stage, start, end, acked, class, claimed_ms, predicted_ms) in rows {
            let acked: granule_core::IntervalSet = parse(&acked, "fragment acks")?;
            let model = load_sizer(&tx, stage, &class)?.model;
            let gain = split_gain(&model, &load_sizer(&tx, stage, asker)?.model);
            let candidate = split_point(
                Span::new(start as u64, end as u64),
                &acked,
                &model,
                now_ms - claimed_ms,
                predicted_ms,
                min_ms,
            );
            if let Some((remaining_ms, at)) = candidate {
                let worth = remaining_ms * gain;
                if best.is_none_or(|b| worth > b.0) {
                    best = Some((worth, id, at));
                }
            }
        }
        let chosen = best.map(|(_, id, at)| (FragmentId(id), at));
        if let Some((id, at)) = chosen {
            tx.execute(
                "UPDATE fragments SET split_request = ?2 WHERE id = ?1",
                params![id.0, at as i64],
            )?;
        }
        tx.commit()?;
        Ok(chosen.map(|(id, _)| id))
    }

    fn finish(&mut self, worker: &str, now_ms: i64, end: &FragmentEnd) -> Result<Finished> {
        self.counted(Call::Finish, |s| s.finish_tx(worker, now_ms, end))
    }

    fn workers_holding_work(&mut self) -> Result<Vec<WorkerInfo>> {
        let mut stmt = self.conn.prepare(
            "SELECT id, host, pid, proc_start, slots, class, lifespan_end_ms, cost, spot, resources, locality FROM workers
             WHERE id IN (SELECT DISTINCT worker FROM fragments WHERE state = 'running')",
        )?;
        let rows = stmt.query_map([], |r| {
            Ok(WorkerInfo {
                id: r.get(0)?,
                host: r.get(1)?,
                pid: r.get(2)?,
                proc_start: r.get(3)?,
                slots: r.get(4)?,
                class: r.get(5)?,
                lifespan_end_ms: r.get(6)?,
                cost_per_hour: r.get(7)?,
                spot: r.get(8)?,
                resources: r.get(9)?,
                locality: r.get(10)?,
            })
        })?;
        Ok(rows.collect::<rusqlite::Result<Vec<_>>>()?)
    }

    fn release(&mut self, now_ms: i64, dead: &[String]) -> Result<u64> {
        let tx = self.write()?;
        let mut stmt = tx.prepare(
            "SELECT f.id, f.stage_id, f.worker,
                    CASE WHEN f.lease_expires_ms = ?1 THEN coalesce(w.lease_until_ms, 0)
                         ELSE f.lease_expires_ms END
             FROM fragments f LEFT JOIN workers w ON w.id = f.worker WHERE f.state = 'running'",
        )?;
        let lost: Vec<(i64, i64, String)> = stmt
            .query_map([FOLLOWS_WORKER], |r| {
                Ok((
                    r.get::<_, i64>(0)?,
                    r.get::<_, i64>(1)?,
                    r.get::<_, String>(2)?,
                    r.get::<_, i64>(3)?,
                ))
            })?
            .collect::<rusqlite::Result<Vec<_>>>()?
            .into_iter()
            .filter(|(_, _, worker, expires)| *expires < now_ms || dead.contains(worker))
            .map(|(id, stage, worker, _)| (id, stage, worker))
            .collect();
        drop(stmt);
        let mut ledgers: HashMap<i64, Loaded> = HashMap::new();
        for (id, stage, worker) in &lost {
            let ledger = ledger_of(&tx, &mut ledgers, *stage)?;
            let report = ledger.finish(FragmentId(*id), &FinishOutcome::Lost, u32::MAX);
            let (result, forgotten) = kept_result(&tx, ledger, &report)?;
            let why = if dead.contains(worker) {
                "worker died"
            } else {
                "lease expired"
            };
            tx.execute(
                "UPDATE fragments SET state = 'lost', finished_ms = ?2, cause = 'lost', detail = ?3,
                   split_request = NULL, result = ?4, state_reruns = state_reruns + ?5 WHERE id = ?1",
                params![
                    id,
                    now_ms,
                    format!("{why}: {worker}"),
                    result,
                    (report.undone + forgotten) as i64
                ],
            )?;
        }
        for (stage, loaded) in &ledgers {
            save_ledger(&tx, *stage, loaded)?;
            // A fragment released with every item acked may have been its stage's last.
            if loaded.now.is_finished() {
                settle_job(&tx, *stage, now_ms)?;
            }
        }
        for worker in dead {
            tx.execute(
                "UPDATE workers SET state = 'exited', busy = 0, lease_until_ms = 0 WHERE id = ?1",
                [worker],
            )?;
        }
        tx.commit()?;
        Ok(lost.len() as u64)
    }

    fn status(&mut self, job: Option<&str>) -> Result<Vec<JobStatus>> {
        type Row = (i64, String, String, i64, Option<String>);
        let jobs: Vec<Row> = {
            let mut stmt = self.conn.prepare(
                "SELECT id, name, state, created_ms, error FROM jobs WHERE ?1 IS NULL OR name = ?1 ORDER BY id",
            )?;
            let rows = stmt.query_map([job], |r| {
                Ok((r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?, r.get(4)?))
            })?;
            rows.collect::<rusqlite::Result<Vec<_>>>()?
        };
        if let (Some(name), true) = (job, jobs.is_empty()) {
            return Err(StoreError::NoSuchJob(name.to_string()));
        }
        let mut out = Vec::new();
        for (id, name, state, created_ms, error) in jobs {
            let stages = stages_of(&self.conn, id).and_then(|stages| {
                stages
                    .iter()
                    .map(|stage| self.stage_status(stage))
                    .collect::<Result<Vec<_>>>()
            });
            out.push(match stages {
                Ok(stages) => JobStatus {
                    name,
                    state: job_state(&state),
                    created_ms,
                    error,
                    stages,
                },
                // A job whose stored state cannot be read is shown broken; the
                // others are shown as they are.
                Err(StoreError::Corrupt(why)) => JobStatus {
                    name,
                    state: JobState::Broken,
                    created_ms,
                    error: Some(format!("its stored state cannot be read: {why}")),
                    stages: Vec::new(),
                },
                Err(e) => return Err(e),
            });
        }
        Ok(out)
    }

    fn write_counts(&self) -> Option<WriteCounts> {
        Some(self.writes.clone())
    }

    fn progress(&mut self, job: JobId) -> Result<Vec<StageProgress>> {
        let mut stmt = self.conn.prepare_cached(
            "SELECT items, done_count, quarantined, last_n FROM stages WHERE job_id = ?1 ORDER BY idx",
        )?;
        let rows = stmt
            .query_map([job.0], |r| {
                Ok((
                    r.get::<_, i64>(0)?,
                    r.get::<_, i64>(1)?,
                    r.get::<_, String>(2)?,
                    r.get::<_, i64>(3)?,
                ))
            })?
            .collect::<rusqlite::Result<Vec<_>>>()?;
        rows.into_iter()
            .map(|(items, done, quarantined, last_n)| {
                Ok(StageProgress {
                    items: items as u64,
                    done: done as u64,
                    quarantined: parse::<IntervalSet>(&quarantined, "quarantined")?.len(),
                    fragment_size: last_n as u64,
                })
            })
            .collect()
    }

    fn worker_history(&mut self, now_ms: i64, since_ms: i64) -> Result<Vec<WorkerSpan>> {
        history(&self.conn, now_ms, since_ms)
    }

    fn workers(&mut self, now_ms: i64, window_ms: i64) -> Result<Vec<WorkerStatus>> {
        let mut stmt = self.conn.prepare(
            "SELECT w.id, w.host, w.state, w.class, w.slots, w.busy, w.lifespan_end_ms, w.heartbeat_ms,
                    (SELECT count(*) FROM fragments f WHERE f.worker = w.id AND f.state = 'done'),
                    w.cost, w.spot, w.resources
             FROM workers w
             WHERE w.heartbeat_ms >= ?1 OR w.id IN (SELECT worker FROM fragments WHERE state = 'running')
             ORDER BY w.started_ms",
        )?;
        let rows = stmt.query_map([now_ms - window_ms], |r| {
            Ok(WorkerStatus {
                id: r.get(0)?,
                host: r.get(1)?,
                state: r.get(2)?,
                class: r.get(3)?,
                slots: r.get(4)?,
                busy: r.get(5)?,
                lifespan_left_ms: r.get::<_, Option<i64>>(6)?.map(|end| end - now_ms),
                heartbeat_age_ms: now_ms - r.get::<_, i64>(7)?,
                fragments_done: r.get::<_, i64>(8)? as u64,
                cost_per_hour: r.get(9)?,
                spot: r.get(10)?,
                resources: serde_json::from_str(&r.get::<_, String>(11)?).unwrap_or_default(),
            })
        })?;
        Ok(rows.collect::<rusqlite::Result<Vec<_>>>()?)
    }

    fn logs(&mut self, job: &str, stage: &str, fragment: Option<i64>) -> Result<Vec<FragmentLog>> {
        let mut stmt = self.conn.prepare(
            "SELECT f.id, f.start_idx, f.end_idx, f.state, f.cause, f.detail, f.stdout, f.stderr
             FROM fragments f JOIN stages s ON s.id = f.stage_id JOIN jobs j ON j.id = s.job_id
             WHERE j.name = ?1 AND s.name = ?2 AND (?3 IS NULL OR f.id = ?3) ORDER BY f.id",
        )?;
        let rows = stmt.query_map(params![job, stage, fragment], |r| {
            Ok(FragmentLog {
                fragment: r.get(0)?,
                start: r.get::<_, i64>(1)? as u64,
                end: r.get::<_, i64>(2)? as u64,
                state: r.get(3)?,
                cause: r.get(4)?,
                detail: r.get(5)?,
                stdout: r.get::<_, Option<Vec<u8>>>(6)?.unwrap_or_default(),
                stderr: r.get::<_, Option<Vec<u8>>>(7)?.unwrap_or_default(),
            })
        })?;
        Ok(rows.collect::<rusqlite::Result<Vec<_>>>()?)
    }

    fn results(&mut self, job: &str, stage: &str) -> Result<Vec<ResultRow>> {
        let mut stmt = self.conn.prepare(
            "SELECT f.id, b.data, b.raw_len, b.hash, b.meta, b.covers
             FROM fragments f JOIN stages s ON s.id = f.stage_id JOIN jobs j ON j.id = s.job_id
               JOIN blobs b ON b.id = f.result
             WHERE j.name = ?1 AND s.name = ?2 ORDER BY f.start_idx, f.id",
        )?;
        let rows = stmt.query_map(params![job, stage], |r| {
            Ok((
                r.get::<_, i64>(0)?,
                BlobRow {
                    data: r.get(1)?,
                    raw_len: r.get::<_, i64>(2)? as u64,
                    hash: r.get(3)?,
                    meta: r.get(4)?,
                },
                r.get::<_, String>(5)?,
            ))
        })?;
        let mut out = Vec::new();
        for row in rows {
            let (fragment, blob, covers) = row?;
            out.push(ResultRow {
                fragment,
                blob,
                covers: parse(&covers, "result covers")?,
            });
        }
        Ok(out)
    }

    fn checkpoint_before(&mut self, id: i64) -> Result<Option<i64>> {
        checkpoint_before(&self.conn, id)
    }

    fn accounting(&mut self, job: &str, stage: &str) -> Result<Accounting> {
        let id: i64 = self
            .conn
            .query_row(
                "SELECT s.id FROM stages s JOIN jobs j ON j.id = s.job_id WHERE j.name = ?1 AND s.name = ?2",
                params![job, stage],
                |r| r.get(0),
            )
            .optional()?
            .ok_or_else(|| StoreError::NoSuchJob(format!("{job}/{stage}")))?;
        let ledger = load_ledger(&self.conn, id)?;
        let mut running = IntervalSet::new();
        for f in &ledger.running {
            running.union_with(&f.acked.complement_within(f.span));
        }
        Ok(Accounting {
            pending: ledger.pending.to_set(),
            running,
            done: ledger.done,
            quarantined: ledger.quarantined,
        })
    }

    fn wait_for_work(&mut self, timeout: Duration) -> Result<bool> {
        std::thread::sleep(timeout.min(self.idle_poll()));
        Ok(true)
    }

    fn idle_poll(&self) -> Duration {
        // A claim is a local transaction: polling is cheap.
        Duration::from_millis(100)
    }

    fn blob(&mut self, id: i64) -> Result<Option<StoredBlob>> {
        let found = self
            .conn
            .query_row(
                "SELECT data, raw_len, hash, meta, prev, covers FROM blobs WHERE id = ?1",
                [id],
                |r| {
                    Ok((
                        BlobRow {
                            data: r.get(0)?,
                            raw_len: r.get::<_, i64>(1)? as u64,
                            hash: r.get(2)?,
                            meta: r.get(3)?,
                        },
                        r.get(4)?,
                        r.get::<_, String>(5)?,
                    ))
                },
            )
            .optional()?;
        found
            .map(|(row, prev, covers)| {
                Ok(StoredBlob {
                    row,
                    prev,
                    covers: parse(&covers, "checkpoint covers")?,
                })
            })
            .transpose()
    }
}

/// The checkpoint before `id` in its chain: its row's `prev`, or, when its row is
/// gone, what the fragment that wrote it had before it (an earlier checkpoint of its
/// own, else the one it resumed from).
/// The transactions behind the counted `Store` calls.
impl SqliteStore {
    fn claim_tx(&mut self, req: &ClaimRequest, wanted: usize) -> Result<Vec<Assignment>> {
        let mut tx = self.write()?;
        let mut req = req.clone();
        let mut out = Vec::new();
        while out.len() < wanted {
            let Some(a) = claim_one(&mut tx, &req)? else {
                break;
            };
            req.offer = req.offer.less(&a.needs);
            out.push(a);
        }
        tx.commit()?;
        Ok(out)
    }

    fn flush_tx(
        &mut self,
        worker: &str,
        now_ms: i64,
        lease_ms: i64,
        heartbeat: &Heartbeat,
        batch: &[FragmentFlush],
    ) -> Result<FlushReply> {
        let tx = self.write()?;
        let mut ledgers: HashMap<i64, Loaded> = HashMap::new();
        let mut reply = FlushReply::default();
        for f in batch {
            let Some(stage) = held_stage(&tx, f.fragment, worker)? else {
                reply.lost.push(f.fragment);
                continue;
            };
            let ledger = ledger_of(&tx, &mut ledgers, stage)?;
            reply.done += apply_flush(&tx, ledger, stage, f, now_ms)?;
            if !job_running(&tx, stage)? {
                // Cancelled or stopped: its acks stand, the rest is pending again.
                ledger.finish(f.fragment, &FinishOutcome::Yielded, 0);
                tx.execute(
                    "UPDATE fragments SET state = 'cancelled', finished_ms = ?2, split_request = NULL WHERE id = ?1",
                    params![f.fragment.0, now_ms],
                )?;
                reply.stopped.push(f.fragment);
            }
        }
        for (stage, loaded) in &ledgers {
            save_ledger(&tx, *stage, loaded)?;
        }
        // What the worker says it holds follows its lease from now on, once half of its
        // own claim lease is spent (one write per fragment, none for short ones); a claim
        // whose reply never reached the worker is never confirmed and expires.
        let mut confirm = tx.prepare_cached(
            "UPDATE fragments SET lease_expires_ms = ?3
             WHERE id = ?1 AND worker = ?2 AND state = 'running' AND lease_expires_ms < ?4",
        )?;
        for id in &heartbeat.held {
            confirm.execute(params![id.0, worker, FOLLOWS_WORKER, now_ms + lease_ms / 2])?;
        }
        drop(confirm);
        tx.prepare_cached(
            "UPDATE workers SET heartbeat_ms = ?2, busy = ?3, free_memory = ?4, load = ?5, lease_until_ms = ?6
             WHERE id = ?1",
        )?
        .execute(params![
            worker,
            now_ms,
            heartbeat.busy,
            heartbeat.free_memory,
            heartbeat.load,
            now_ms + lease_ms
        ])?;
        let mut stmt = tx.prepare_cached(
            "SELECT id, split_request FROM fragments
             WHERE worker = ?1 AND state = 'running' AND split_request IS NOT NULL",
        )?;
        reply.split_requests = stmt
            .query_map([worker], |r| {
                Ok((FragmentId(r.get(0)?), r.get::<_, i64>(1)? as u64))
            })?
            .collect::<rusqlite::Result<Vec<_>>>()?;
        drop(stmt);
        tx.commit()?;
        Ok(reply)
    }

    fn finish_tx(&mut self, worker: &str, now_ms: i64, end: &FragmentEnd) -> Result<Finished> {
        let tx = self.write()?;
        let id = end.flush.fragment;
        let Some(stage) = held_stage(&tx, id, worker)? else {
            return Ok(Finished::default());
        };
        let stage_row = stage_by_id(&tx, stage)?;
        let (size_cap, class): (String, String) = tx.query_row(
            "SELECT size_cap, class FROM fragments WHERE id = ?1",
            [id.0],
            |r| Ok((r.get(0)?, r.get(1)?)),
        )?;
        let mut loaded = Loaded::read(&tx, stage)?;
        let ledger = &mut loaded.now;
        apply_flush(&tx, ledger, stage, &end.flush, now_ms)?;
        if ledger.fragment(id).is_some_and(|f| end.end < f.span.end)
            && ledger.split(id, end.end) > 0
        {
            tx.execute(
                "UPDATE fragments SET splits = splits + 1 WHERE id = ?1",
                [id.0],
            )?;
        }
        let span = ledger.fragment(id).map_or(Span::new(0, 0), |f| f.span);
        let acked = ledger
            .fragment(id)
            .map(|f| f.acked.clone())
            .unwrap_or_default();
        let checkpoint = ledger.fragment(id).and_then(|f| f.checkpoint);
        let report = ledger.finish(
            id,
            &accounted_outcome(end),
            retry_budget(end.cause.as_deref(), stage_row.retries),
        );
        let verdict = verdict(end, &report);
        let (result, forgotten) = kept_result(&tx, ledger, &report)?;
        if end.cause.as_deref() == Some("oom") {
            // Retried on a worker with more memory than this one, while one is alive.
            ledger.raise_floor(span, worker_memory(&tx, worker)?);
        }
        let finished = ledger.is_finished();
        save_ledger(&tx, stage, &loaded)?;
        tx.prepare_cached(
            "UPDATE fragments SET state = ?2, finished_ms = ?3, observed_ms = ?4, cpu_ms = ?5, peak_rss_kb = ?6,
              load = ?7, fed = ?8, acks = ?9, cause = ?10, detail = ?11, stdout = ?12, stderr = ?13,
              end_idx = ?14, acked = ?15, wasted_ms = ?16, checkpoint_fallbacks = ?17, split_request = NULL,
              checkpoint_id = ?18, io_bytes = ?19, predicted_ms = coalesce(?20, predicted_ms), result = ?21,
              state_reruns = state_reruns + ?22, results_missing = ?23
             WHERE id = ?1",
        )?
        .execute(params![
            id.0,
            verdict.state,
            now_ms,
            end.observed_ms,
            end.cpu_ms,
            end.peak_rss_kb as i64,
            end.load,
            end.fed as i64,
            end.acks as i64,
            verdict.cause,
            verdict.detail,
            end.stdout,
            end.stderr,
            span.end as i64,
            json(&acked),
            end.wasted_ms,
            end.checkpoint_fallbacks,
            checkpoint,
            end.io_bytes as i64,
            end.predicted_ms,
            result,
            (report.undone + forgotten) as i64,
            report.uncovered as i64
        ])?;
        if verdict.all_or_nothing && end.fed > 0 {
            // Finished all its input without a single ack: an all-or-nothing task.
            tx.execute(
                "UPDATE stages SET acks = 'no' WHERE id = ?1 AND acks = 'unknown'",
                [stage],
            )?;
        }
        if verdict.finished && end.fed > 0 {
            let mut sizer = load_sizer(&tx, stage, &class)?;
            sizer.observe(
                &stage_row.sizer_config,
                &Observation {
                    n: end.fed,
                    duration_ms: end.observed_ms,
                    acks: end.acks,
                    first_ack_ms: end.first_ack_ms,
                    last_ack_ms: end.last_ack_ms,
                    sized_by_model: size_cap == "model",
                    bytes: end.bytes,
                    load: Some(end.load),
                },
            );
            save_sizer(&tx, stage, &class, &sizer)?;
        }
        if let Some(halt) = &end.halt {
            let job: i64 =
                tx.query_row("SELECT job_id FROM stages WHERE id = ?1", [stage], |r| {
                    r.get(0)
                })?;
            halt_job(&tx, job, halt, now_ms)?;
        }
        let job_finished = finished && settle_job(&tx, stage, now_ms)?;
        tx.commit()?;
        Ok(Finished {
            accepted: true,
            quarantined: report.quarantined,
            job_finished,
        })
    }
}

/// One claim inside an open transaction: the running jobs in priority order, each
/// in a savepoint (a job whose stored state cannot be read breaks alone).
fn claim_one(tx: &mut Transaction<'_>, req: &ClaimRequest) -> Result<Option<Assignment>> {
    let jobs: Vec<i64> = match req.job {
        Some(job) => {
            let state: Option<String> = tx
                .query_row("SELECT state FROM jobs WHERE id = ?1", [job.0], |r| {
                    r.get(0)
                })
                .optional()?;
            if state.as_deref() == Some("running") {
                vec![job.0]
            } else {
                vec![]
            }
        }
        None => {
            let mut stmt =
                tx.prepare_cached("SELECT id FROM jobs WHERE state = 'running' ORDER BY id")?;
            let ids = stmt
                .query_map([], |r| r.get(0))?
                .collect::<rusqlite::Result<Vec<_>>>()?;
            ids
        }
    };
    let slots = active_slots(tx, req.now_ms, req.lease_ms, req.slots)?;
    let jobs = by_priority(tx, jobs, req.now_ms)?;
    for job in jobs {
        let sp = tx.savepoint()?;
        match claim_in_job(&sp, req, job, slots) {
            Ok(Some(assignment)) => {
                sp.commit()?;
                return Ok(Some(assignment));
            }
            Ok(None) => sp.commit()?,
            Err(StoreError::Corrupt(why)) => {
                drop(sp);
                let halt = JobHalt::Broken(format!("its stored state cannot be read: {why}"));
                halt_job(tx, job, &halt, req.now_ms)?;
            }
            Err(e) => return Err(e),
        }
    }
    Ok(None)
}

fn checkpoint_before(tx: &Connection, id: i64) -> Result<Option<i64>> {
    let prev: Option<Option<i64>> = tx
        .query_row("SELECT prev FROM blobs WHERE id = ?1", [id], |r| r.get(0))
        .optional()?;
    if let Some(prev) = prev {
        return Ok(prev);
    }
    let writer: Option<(i64, Option<i64>)> = tx
        .query_row(
            "SELECT id, resumed_from FROM fragments
             WHERE checkpoint_id = ?1 AND (resumed_from IS NULL OR resumed_from != ?1) ORDER BY id LIMIT 1",
            [id],
            |r| Ok((r.get(0)?, r.get(1)?)),
        )
        .optional()?;
    let Some((fragment, resumed_from)) = writer else {
        return Ok(None);
    };
    let earlier: Option<i64> = tx.query_row(
        "SELECT max(id) FROM blobs WHERE fragment_id = ?1 AND id < ?2",
        params![fragment, id],
        |r| r.get(0),
    )?;
    Ok(earlier.or(resumed_from))
}

/// Jobs ordered by their highest stage priority (then oldest first). A job whose
/// stages cannot be read is marked broken and left out.
fn by_priority(tx: &Connection, jobs: Vec<i64>, now_ms: i64) -> Result<Vec<i64>> {
    let mut keyed = Vec::with_capacity(jobs.len());
    for job in jobs {
        let stages = match stages_of(tx, job) {
            Ok(stages) => stages,
            Err(StoreError::Corrupt(why)) => {
                let halt = JobHalt::Broken(format!("its stored state cannot be read: {why}"));
                halt_job(tx, job, &halt, now_ms)?;
                continue;
            }
            Err(e) => return Err(e),
        };
        let top = stages.iter().map(|s| s.needs.priority).max().unwrap_or(0);
        keyed.push((-top, job));
    }
    keyed.sort_unstable();
    Ok(keyed.into_iter().map(|(_, job)| job).collect())
}

fn claim_in_job(
    tx: &Connection,
    req: &ClaimRequest,
    job: i64,
    slots: u32,
) -> Result<Option<Assignment>> {
    let stages = stages_of(tx, job)?;
    for stage in ready_in_order(tx, req, job, &stages)? {
        if let Some(assignment) = claim_in_stage(tx, req, job, stage, slots)? {
            return Ok(Some(assignment));
        }
    }
    Ok(None)
}

/// The job's stages this worker could take from now, in the order it should try
/// them (core's `placement_order`, with the deadline plan when a ready stage has a
/// deadline); never a stage whose slots need more than the worker has.
fn ready_in_order<'a>(
    tx: &Connection,
    req: &ClaimRequest,
    job: i64,
    stages: &'a [StageRow],
) -> Result<Vec<&'a StageRow>> {
    let finished: Vec<bool> = stages.iter().map(|s| s.state == "done").collect();
    let is_ready = |s: &StageRow| stage_ready(&finished, s.idx, &s.after, &s.needs, &req.offer);
    let ready: Vec<&StageRow> = stages.iter().filter(|s| is_ready(s)).collect();
    let deadlines = ready.iter().any(|s| s.needs.deadline_ms.is_some());
    if ready.len() <= 1 && !deadlines {
        return Ok(ready);
    }
    let created: i64 = tx.query_row("SELECT created_ms FROM jobs WHERE id = ?1", [job], |r| {
        r.get(0)
    })?;
    let views = stages
        .iter()
        .map(|stage| read_view(tx, stage, is_ready(stage), created))
        .collect::<Result<Vec<_>>>()?;
    let plan = if deadlines {
        let pool = live_pool_of(tx, req)?;
        class_deadline_plan(&views, &pool, &req.class, req.now_ms)
    } else {
        None
    };
    Ok(placement_order(&views, &req.offer, plan.as_deref())
        .into_iter()
        .map(|idx| &stages[idx])
        .collect())
}

/// What placement reads of a stage: running fragments, work left (neither done nor
/// quarantined), checkpoints, and its learned per-class costs.
fn read_view(tx: &Connection, stage: &StageRow, ready: bool, created: i64) -> Result<StageView> {
    let (running, undone, quarantined, checkpoints): (i64, i64, String, bool) = tx
        .prepare_cached(
            "SELECT (SELECT count(*) FROM fragments WHERE stage_id = ?1 AND state = 'running'),
                    items - done_count, quarantined,
                    EXISTS (SELECT 1 FROM blobs WHERE stage_id = ?1 AND kind = 'checkpoint')
             FROM stages WHERE id = ?1",
        )?
        .query_row([stage.id], |r| {
            Ok((r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?))
        })?;
    let quarantined = parse::<IntervalSet>(&quarantined, "quarantined")?.len();
    let mut stmt = tx.prepare_cached("SELECT class, state FROM sizers WHERE stage_id = ?1")?;
    let sizers = stmt
        .query_map([stage.id], |r| Ok((r.get(0)?, r.get(1)?)))?
        .collect::<rusqlite::Result<Vec<_>>>()?;
    let reading = StageReading {
        running,
        left: undone - quarantined as i64,
        checkpoints,
        sizers,
    };
    stage_view(
        stage.idx,
        &stage.needs,
        &stage.after,
        ready,
        created,
        reading,
    )
}

/// The live pool a deadline plan sees: live workers' classes, slots and costs,
/// discounted by the forecast from the recent history.
fn live_pool_of(tx: &Connection, req: &ClaimRequest) -> Result<Vec<PoolClass>> {
    let mut stmt = tx.prepare_cached(
        "SELECT class, slots, cost FROM workers WHERE state = 'running' AND heartbeat_ms >= ?1",
    )?;
    let rows = stmt
        .query_map([req.now_ms - req.lease_ms], |r| {
            Ok((r.get(0)?, r.get(1)?, r.get(2)?))
        })?
        .collect::<rusqlite::Result<Vec<_>>>()?;
    let ahead = history(
        tx,
        req.now_ms,
        req.now_ms - granule_core::FORECAST_WINDOW_MS,
    )?;
    Ok(live_pool(rows, &ahead, req.now_ms))
}

/// Carves a fragment of `stage` for the worker: sized by the stage's sizer for its
/// class, from the pending ranges admission lets it take.
fn claim_in_stage(
    tx: &Connection,
    req: &ClaimRequest,
    job: i64,
    stage: &StageRow,
    slots: u32,
) -> Result<Option<Assignment>> {
    let mut ledger = load_ledger(tx, stage.id)?;
    if ledger.pending.is_empty() {
        return Ok(None);
    }
    let mut sizer = load_sizer(tx, stage.id, &req.class)?;
    let acks: Acks = tx.query_row("SELECT acks FROM stages WHERE id = ?1", [stage.id], |r| {
        r.get(0)
    })?;
    let ctx = claim_context(
        &req.context,
        req.expected_life_ms,
        acks == Acks::Yes,
        ledger.pending.len(),
        slots,
    );
    let sizing = sizer.size(&stage.sizer_config, &ctx);
    let n = req.max_items.map_or(sizing.n, |max| sizing.n.min(max));
    if n == 0 {
        return Ok(None);
    }
    let strict = Admission::strict(&req.offer);
    let mut claim = ledger.claim_where(FragmentId(0), n, |r| strict.admits(r));
    if claim.is_none() {
        // Held back for better placed workers: only while one is alive.
        let (memory, on_demand) = alive_capacity(tx, req)?;
        let relaxed = strict.relaxed(memory, on_demand);
        claim = ledger.claim_where(FragmentId(0), n, |r| relaxed.admits(r));
    }
    let Some(claim) = claim else {
        return Ok(None);
    };
    let predicted_ms = sizer
        .model
        .predict_at_load_ms(claim.span.len(), ctx.load_per_cpu);
    let cap = if claim.span.len() < sizing.n {
        SizeCap::Bounds
    } else {
        sizing.cap
    };
    tx.prepare_cached(
        "INSERT INTO fragments (stage_id, start_idx, end_idx, state, worker, class, lease_expires_ms, failures,
          checkpoint_id, n, predicted_ms, size_cap, claimed_ms, lost, floor_memory_mb, resumed_from, covers,
          inherited)
         VALUES (?1, ?2, ?3, 'running', ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12, ?13, ?14, ?8, ?15, ?15)",
    )?
    .execute(params![
        stage.id,
        claim.span.start as i64,
        claim.span.end as i64,
        req.worker,
        req.class,
        req.now_ms + req.lease_ms,
        claim.failures,
        claim.checkpoint,
        claim.span.len() as i64,
        predicted_ms,
        json(&cap).trim_matches('"'),
        req.now_ms,
        claim.lost,
        claim.floor_memory_mb as i64,
        json(&claim.covers)
    ])?;
    let id = FragmentId(tx.last_insert_rowid());
    tx.prepare_cached(
        "UPDATE stages SET pending = ?2, state = 'running', last_n = ?3 WHERE id = ?1",
    )?
    .execute(params![
        stage.id,
        json(&ledger.pending),
        claim.span.len() as i64
    ])?;
    save_sizer(tx, stage.id, &req.class, &sizer)?;
    let expect_acks = acks.expected();
    Ok(Some(Assignment {
        fragment: id,
        job: JobId(job),
        stage: StageId(stage.id),
        stage_index: stage.idx,
        span: claim.span,
        failures: claim.failures,
        checkpoint: claim.checkpoint,
        n: claim.span.len(),
        predicted_ms,
        cap,
        item_cost_ms: sizer.model.b_ms,
        overhead_ms: sizer.model.a_ms,
        size_fit: sizer.model.size.line(),
        expect_acks,
        needs: stage.needs.clone(),
    }))
}

impl SqliteStore {
    fn stage_status(&self, stage: &StageRow) -> Result<StageStatus> {
        let ledger = load_ledger(&self.conn, stage.id)?;
        let c: FragmentCounts = self.conn.query_row(
            "SELECT count(*),
                    count(*) FILTER (WHERE state = 'failed'),
                    count(*) FILTER (WHERE state = 'yielded'),
                    count(*) FILTER (WHERE state = 'lost'),
                    coalesce(sum(splits), 0),
                    coalesce(sum(checkpoint_fallbacks), 0),
                    (SELECT count(*) FROM blobs WHERE stage_id = ?1 AND kind = 'checkpoint'),
                    coalesce(sum(wasted_ms), 0.0),
                    (SELECT last_n FROM stages WHERE id = ?1),
                    coalesce(sum(state_reruns), 0),
                    coalesce(sum(results_missing) FILTER (WHERE state = 'done'), 0)
             FROM fragments WHERE stage_id = ?1",
            [stage.id],
            |r| {
                Ok(FragmentCounts {
                    fragments: r.get(0)?,
                    failed: r.get(1)?,
                    yields: r.get(2)?,
                    lost: r.get(3)?,
                    splits: r.get(4)?,
                    fallbacks: r.get(5)?,
                    checkpoints: r.get(6)?,
                    wasted_ms: r.get(7)?,
                    last_n: r.get(8)?,
                    state_reruns: r.get(9)?,
                    results_missing: r.get(10)?,
                })
            },
        )?;
        let rows: Vec<DoneRow> = self
            .conn
            .prepare_cached(
                "SELECT class, end_idx - start_idx, predicted_ms, coalesce(observed_ms, 0), coalesce(cpu_ms, 0),
                        coalesce(peak_rss_kb, 0), io_bytes
                 FROM fragments WHERE stage_id = ?1 AND state = 'done' ORDER BY finished_ms, id",
            )?
            .query_map([stage.id], |r| {
                Ok(DoneRow {
                    class: r.get(0)?,
                    n: r.get::<_, i64>(1)? as u64,
                    predicted_ms: r.get(2)?,
                    observed_ms: r.get(3)?,
                    cpu_ms: r.get(4)?,
                    peak_rss_kb: r.get::<_, i64>(5)? as u64,
                    io_bytes: r.get::<_, i64>(6)? as u64,
                })
            })?
            .collect::<rusqlite::Result<Vec<_>>>()?;
        let pairs: Vec<(f64, f64)> = rows
            .iter()
            .map(|r| (r.predicted_ms, r.observed_ms))
            .collect();
        let error = prediction_error(&pairs);
        let sizers = self.sizers(stage.id)?;
        let sizer = busiest(&sizers);
        let (profile, profile_source) = stage_profile(&rows, &stage.needs);
        Ok(StageStatus {
            name: stage.name.clone(),
            state: stage_state(&stage.state),
            items: stage.items,
            done: ledger.done.len(),
            running: ledger.running_unacked(),
            pending: ledger.pending.len(),
            quarantined: ledger.quarantined.len(),
            quarantined_items: ledger
                .quarantined
                .spans()
                .map(|s| [s.start, s.end])
                .collect(),
            fragments: c.fragments as u64,
            running_fragments: ledger.running.len() as u64,
            failed_fragments: c.failed as u64,
            fragment_size: c.last_n as u64,
            item_cost_us: sizer.model.b_ms * 1e3,
            overhead_ms: sizer.model.a_ms,
            target_ms: sizer.target_ms(&stage.sizer_config),
            yields: c.yields as u64,
            lost: c.lost as u64,
            splits: c.splits as u64,
            checkpoint_fallbacks: c.fallbacks as u64,
            state_reruns: c.state_reruns as u64,
            results_missing: c.results_missing as u64,
            checkpoints: c.checkpoints as u64,
            wasted_s: c.wasted_ms / 1e3,
            prediction_error_median: error.0,
            prediction_error_p90: error.1,
            needs: stage.needs.clone(),
            classes: class_statuses(&rows, &sizers),
            profile,
            profile_source,
        })
    }

    /// The sizer state of each class that claimed from the stage.
    fn sizers(&self, stage: i64) -> Result<Vec<(String, Sizer)>> {
        let mut stmt = self
            .conn
            .prepare_cached("SELECT class, state FROM sizers WHERE stage_id = ?1 ORDER BY class")?;
        let states = stmt
            .query_map([stage], |r| {
                Ok((r.get::<_, String>(0)?, r.get::<_, String>(1)?))
            })?
            .collect::<rusqlite::Result<Vec<_>>>()?;
        states
            .into_iter()
            .map(|(class, s)| Ok((class, parse::<Sizer>(&s, "sizer state")?)))
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every table's columns (name, type, not null, default, key), foreign keys and
    /// AUTOINCREMENT, and every index, as text to compare.
    fn shape(conn: &Connection) -> Vec<String> {
        let mut out = Vec::new();
        let objects: Vec<(String, String, String)> = conn
            .prepare("SELECT type, name, coalesce(sql, '') FROM sqlite_master ORDER BY type, name")
            .unwrap()
            .query_map([], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)))
            .unwrap()
            .map(|r| r.unwrap())
            .collect();
        for (kind, name, sql) in objects {
            if kind == "index" {
                out.push(format!("index {name}: {sql}"));
                continue;
            }
            out.push(format!(
                "{kind} {name} autoincrement={}",
                sql.contains("AUTOINCREMENT")
            ));
            for pragma in ["table_info", "foreign_key_list"] {
                let mut stmt = conn.prepare(&format!("PRAGMA {pragma}({name})")).unwrap();
                let width = stmt.column_count();
                let rows: Vec<String> = stmt
                    .query_map([], |r| {
                        Ok((0..width)
                            .map(|i| format!("{:?}", r.get_ref(i).unwrap()))
                            .collect::<Vec<_>>()
                            .join(" "))
                    })
                    .unwrap()
                    .map(|r| r.unwrap())
                    .collect();
                out.extend(rows.into_iter().map(|row| format!("  {pragma}: {row}")));
            }
        }
        out
    }

    /// A new store, made from the current schema at once, is the store the
    /// migrations make one step at a time.
    #[test]
    fn the_current_schema_is_what_the_migrations_build() {
        let migrated = Connection::open_in_memory().unwrap();
        for sql in MIGRATIONS {
            migrated.execute_batch(sql).unwrap();
        }
        let fresh = Connection::open_in_memory().unwrap();
        fresh.execute_batch(CURRENT).unwrap();
        assert_eq!(shape(&fresh), shape(&migrated));
    }

    /// A store written before migration 7 keeps its checkpoints through it, and the
    /// recreated blobs table never hands out an id it already used.
    #[test]
    fn checkpoints_survive_the_upgrade_to_protocol_2() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("granule.db");
        {
            let conn = Connection::open(&path).unwrap();
            for sql in &MIGRATIONS[..6] {
                conn.execute_batch(sql).unwrap();
            }
            conn.execute_batch(
                "PRAGMA user_version = 6;
                 INSERT INTO jobs (id, name, spec_hash, spec, state, created_ms)
                     VALUES (1, 'j', 'h', '{}', 'running', 0);
                 INSERT INTO stages (id, job_id, idx, name, items, after, retries,
                     sizer_config, state, pending, done, quarantined)
                     VALUES (1, 1, 0, 's', 10, '[]', 2, '{}', 'running', '[]', '[]', '[]');
                 INSERT INTO stages (id, job_id, idx, name, items, after, retries,
                     sizer_config, state, pending, done, quarantined, acks)
                     VALUES (2, 1, 1, 't', 10, '[]', 2, '{}', 'running', '[]', '[[0,4]]', '[]', 'no');
                 INSERT INTO blobs (id, stage_id, fragment_id, kind, raw_len, hash, data,
                     meta, created_ms, prev)
                     VALUES (5, 1, 2, 'checkpoint', 0, 'w', X'', '{}', 0, NULL),
                            (7, 1, 3, 'checkpoint', 5, 'x', X'68656C6C6F', '{}', 0, 6);
                 INSERT INTO fragments (id, stage_id, start_idx, end_idx, state, worker, class,
                     lease_expires_ms, failures, acked, checkpoint_id, n, predicted_ms,
                     size_cap, claimed_ms)
                     VALUES (3, 1, 0, 10, 'running', 'w', 'default', 0, 0, '[[0,2]]', 7, 10, 1, '', 0),
                            (4, 1, 10, 20, 'running', 'w', 'default', 0, 0, '[[10,12]]', 5, 10, 1, '', 0);",
            )
            .unwrap();
        }
        let mut store = SqliteStore::open(&path).unwrap();
        let kept = store.blob(7).unwrap().expect("blob 7 kept");
        assert_eq!(kept.row.data, b"hello");
        assert_eq!(kept.prev, Some(6));
        let stateful: i64 = store
            .conn
            .query_row("SELECT stateful FROM stages WHERE id = 1", [], |r| r.get(0))
            .unwrap();
        assert_eq!(stateful, 1, "a stage with checkpoints is known stateful");
        let text = |store: &SqliteStore, sql: &str| -> String {
            store.conn.query_row(sql, [], |r| r.get(0)).unwrap()
        };
        // Its own last checkpoint holds a running fragment's acks (as schema 6 took
        // it); one another fragment wrote is where it resumed, holding none of them.
        assert_eq!(
            text(&store, "SELECT covers FROM fragments WHERE id = 3"),
            "[[0,2]]"
        );
        let resumed = |id: i64| -> Option<i64> {
            store
                .conn
                .query_row(
                    "SELECT resumed_from FROM fragments WHERE id = ?1",
                    [id],
                    |r| r.get(0),
                )
                .unwrap()
        };
        assert_eq!((resumed(3), resumed(4)), (None, Some(5)));
        assert_eq!(
            text(&store, "SELECT covers FROM fragments WHERE id = 4"),
            "[]"
        );
        // All-or-nothing items of a stage not known to ack await its first ack.
        assert_eq!(
            text(&store, "SELECT unconfirmed FROM stages WHERE id = 2"),
            "[[0,4]]"
        );
        assert_eq!(
            text(&store, "SELECT stateless_done FROM stages WHERE id = 2"),
            "[[0,4]]"
        );
        store
            .conn
            .execute("DELETE FROM blobs WHERE id = 7", [])
            .unwrap();
        store
            .conn
            .execute(
                "INSERT INTO blobs (stage_id, fragment_id, kind, raw_len, hash, data, meta,
                     created_ms) VALUES (1, 4, 'checkpoint', 0, 'y', X'', '{}', 0)",
                [],
            )
            .unwrap();
        assert_eq!(
            store.conn.last_insert_rowid(),
            8,
            "blob id 7 is never reused"
        );
    }
}

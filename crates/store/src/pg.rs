//! The shared backend: one PostgreSQL database for workers on many hosts.
//!
//! Unlike the SQLite store, nothing hot lives on one row. Pending items are rows of
//! ranges (a stage starts as up to 64 of them); a claim locks one with
//! `FOR UPDATE SKIP LOCKED`, so concurrent claimers take different ranges instead of
//! queueing. Done items are counted on the fragment rows that did them. The sizer
//! row is written only by whoever gets its lock without waiting (`SKIP LOCKED`):
//! under contention the model learns from a sample of fragments. Each transition
//! runs the same pure ledger functions as SQLite on the rows it touches.
//!
//! One connection per worker. A lost connection makes every call fail as
//! `Unavailable` until a reconnect (tried at most once per backoff step) succeeds;
//! the worker buffers acks meanwhile.

use crate::common::{
    accounted_outcome, class_statuses, decode_sizer_config, job_state, json, memory_of, parse,
    sizer_config_json, stage_profile, stage_state, stage_view, verdict, worker_span, DoneRow,
    HistoryRow, StageReading, FOLLOWS_WORKER,
};
use crate::*;
use granule_core::{
    busiest, claim_context, class_deadline_plan, live_pool, placement_order, prediction_error,
    split_gain, split_point, stage_ready, Admission, PoolClass, StageView,
};
use granule_core::{
    retry_budget, FinishOutcome, FragmentId, IntervalSet, JobId, Observation, PendingRange,
    RunningFragment, SizeCap, Sizer, SizerConfig, Span, StageId, StageLedger, StageNeeds,
};
use postgres::fallible_iterator::FallibleIterator;
use postgres::types::ToSql;
use postgres::{Client, NoTls, Statement, Transaction};
use std::collections::HashMap;
use std::str::FromStr;
use std::time::{Duration, Instant};

/// Pending ranges a new stage starts as, so that claimers do not queue on one row.
const SHARDS: u64 = 64;
/// The channel idle workers listen on.
const CHANNEL: &str = "granule_work";
/// Longest wait between reconnect attempts.
const BACKOFF_MAX: Duration = Duration::from_secs(5);
/// How long the server lets one of our sessions sit idle inside a transaction before
/// it ends the session and frees its locks (see `connect`).
const IDLE_IN_TRANSACTION: Duration = Duration::from_secs(10);

/// Migrations in order; never edit one that has shipped, append a new one.
const MIGRATIONS: &[&str] = &[
    r#"
CREATE TABLE jobs (
    id BIGSERIAL PRIMARY KEY,
    name TEXT NOT NULL UNIQUE,
    spec_hash TEXT NOT NULL,
    spec TEXT NOT NULL,
    state TEXT NOT NULL,
    created_ms BIGINT NOT NULL,
    finished_ms BIGINT
);
CREATE TABLE stages (
    id BIGSERIAL PRIMARY KEY,
    job_id BIGINT NOT NULL REFERENCES jobs(id) ON DELETE CASCADE,
    idx INT NOT NULL,
    name TEXT NOT NULL,
    items BIGINT NOT NULL,
    after TEXT NOT NULL,
    retries INT NOT NULL,
    sizer_config TEXT NOT NULL,
    state TEXT NOT NULL,
    quarantined TEXT NOT NULL DEFAULT '[]',
    acks TEXT NOT NULL DEFAULT 'unknown',
    UNIQUE (job_id, idx)
);
CREATE TABLE pending (
    id BIGSERIAL PRIMARY KEY,
    stage_id BIGINT NOT NULL REFERENCES stages(id) ON DELETE CASCADE,
    start_idx BIGINT NOT NULL,
    end_idx BIGINT NOT NULL,
    failures INT NOT NULL,
    checkpoint_id BIGINT
);
CREATE INDEX pending_by_stage ON pending (stage_id, start_idx);
CREATE TABLE sizers (
    stage_id BIGINT NOT NULL REFERENCES stages(id) ON DELETE CASCADE,
    class TEXT NOT NULL,
    state TEXT NOT NULL,
    PRIMARY KEY (stage_id, class)
);
CREATE TABLE workers (
    id TEXT PRIMARY KEY,
    host TEXT NOT NULL,
    pid BIGINT NOT NULL,
    proc_start BIGINT NOT NULL,
    slots INT NOT NULL,
    class TEXT NOT NULL,
    started_ms BIGINT NOT NULL,
    heartbeat_ms BIGINT NOT NULL,
    state TEXT NOT NULL DEFAULT 'running',
    lifespan_end_ms BIGINT,
    busy INT NOT NULL DEFAULT 0,
    free_memory DOUBLE PRECISION,
    load DOUBLE PRECISION
);
CREATE TABLE fragments (
    id BIGSERIAL PRIMARY KEY,
    stage_id BIGINT NOT NULL REFERENCES stages(id) ON DELETE CASCADE,
    start_idx BIGINT NOT NULL,
    end_idx BIGINT NOT NULL,
    state TEXT NOT NULL,
    worker TEXT NOT NULL,
    class TEXT NOT NULL,
    lease_expires_ms BIGINT NOT NULL,
    failures INT NOT NULL,
    acked TEXT NOT NULL DEFAULT '[]',
    done_count BIGINT NOT NULL DEFAULT 0,
    checkpoint_id BIGINT,
    n BIGINT NOT NULL,
    predicted_ms DOUBLE PRECISION NOT NULL,
    size_cap TEXT NOT NULL,
    claimed_ms BIGINT NOT NULL,
    finished_ms BIGINT,
    observed_ms DOUBLE PRECISION,
    cpu_ms DOUBLE PRECISION,
    peak_rss_kb BIGINT,
    load DOUBLE PRECISION,
    fed BIGINT,
    acks BIGINT,
    cause TEXT,
    detail TEXT,
    stdout BYTEA,
    stderr BYTEA,
    split_request BIGINT,
    splits INT NOT NULL DEFAULT 0,
    wasted_ms DOUBLE PRECISION NOT NULL DEFAULT 0,
    checkpoint_fallbacks INT NOT NULL DEFAULT 0
);
CREATE INDEX fragments_by_stage ON fragments (stage_id, state);
CREATE INDEX fragments_by_worker ON fragments (worker, state);
CREATE TABLE blobs (
    id BIGSERIAL PRIMARY KEY,
    stage_id BIGINT NOT NULL REFERENCES stages(id) ON DELETE CASCADE,
    fragment_id BIGINT NOT NULL,
    kind TEXT NOT NULL,
    raw_len BIGINT NOT NULL,
    hash TEXT NOT NULL,
    data BYTEA NOT NULL,
    meta TEXT NOT NULL,
    created_ms BIGINT NOT NULL,
    prev BIGINT
);
"#,
    // 2: workers describe themselves.
    r#"
ALTER TABLE workers ADD COLUMN cost DOUBLE PRECISION NOT NULL DEFAULT 0;
ALTER TABLE workers ADD COLUMN spot BOOLEAN NOT NULL DEFAULT false;
ALTER TABLE workers ADD COLUMN resources TEXT NOT NULL DEFAULT '{}';
"#,
    // 3: what a stage's slots need, its class and priority.
    r#"
ALTER TABLE stages ADD COLUMN needs TEXT NOT NULL DEFAULT '{}';
"#,
    // 4: what placement keeps of items' history (lost with workers, out of memory).
    r#"
ALTER TABLE pending ADD COLUMN lost INT NOT NULL DEFAULT 0;
ALTER TABLE pending ADD COLUMN floor_memory_mb BIGINT NOT NULL DEFAULT 0;
ALTER TABLE fragments ADD COLUMN lost INT NOT NULL DEFAULT 0;
ALTER TABLE fragments ADD COLUMN floor_memory_mb BIGINT NOT NULL DEFAULT 0;
"#,
    // 5: block I/O of a fragment's task, for the stage's profile.
    r#"
ALTER TABLE fragments ADD COLUMN io_bytes BIGINT NOT NULL DEFAULT 0;
"#,
    // 6: exact at the task boundary: the state each checkpoint, pending range and
    // running fragment covers, chain results, jobs that stop with an error.
    r#"
ALTER TABLE pending ADD COLUMN covers TEXT NOT NULL DEFAULT '[]';
ALTER TABLE stages ADD COLUMN stateful BOOLEAN NOT NULL DEFAULT false;
UPDATE stages SET stateful = true WHERE id IN (SELECT stage_id FROM blobs);
ALTER TABLE fragments ADD COLUMN covers TEXT NOT NULL DEFAULT '[]';
ALTER TABLE fragments ADD COLUMN inherited TEXT NOT NULL DEFAULT '[]';
ALTER TABLE fragments ADD COLUMN resumed_from BIGINT;
ALTER TABLE fragments ADD COLUMN result BIGINT;
ALTER TABLE fragments ADD COLUMN state_reruns BIGINT NOT NULL DEFAULT 0;
ALTER TABLE fragments ADD COLUMN results_missing BIGINT NOT NULL DEFAULT 0;
ALTER TABLE fragments ADD COLUMN unconfirmed BOOLEAN NOT NULL DEFAULT false;
ALTER TABLE blobs ADD COLUMN covers TEXT NOT NULL DEFAULT '[]';
ALTER TABLE jobs ADD COLUMN error TEXT;
UPDATE fragments SET result = checkpoint_id WHERE state = 'done' AND checkpoint_id IS NOT NULL;
-- What schema 5 knew, said the new way (as in the SQLite store's migration 7).
UPDATE fragments SET unconfirmed = true WHERE state = 'done' AND done_count > 0
    AND stage_id IN (SELECT id FROM stages WHERE acks != 'yes');
UPDATE fragments SET resumed_from = checkpoint_id WHERE state = 'running'
    AND checkpoint_id IN (SELECT b.id FROM blobs b WHERE b.fragment_id != fragments.id);
UPDATE fragments SET covers = acked WHERE state = 'running'
    AND checkpoint_id IN (SELECT b.id FROM blobs b WHERE b.fragment_id = fragments.id);
"#,
    // 7: a fragment its worker has confirmed holding follows the worker's lease (one
    // row per heartbeat, not one per fragment); where a worker's pids mean something.
    r#"
ALTER TABLE workers ADD COLUMN lease_until_ms BIGINT NOT NULL DEFAULT 0;
ALTER TABLE workers ADD COLUMN locality TEXT NOT NULL DEFAULT '';
"#,
];

/// A store in a PostgreSQL database.
pub struct PgStore {
    config: postgres::Config,
    client: Option<Client>,
    /// Prepared statements of the current connection, by SQL text.
    statements: HashMap<String, Statement>,
    next_attempt: Instant,
    backoff: Duration,
    /// The server's clock minus this host's, measured at connect (see `clock_offset`).
    clock_offset_ms: i64,
}

/// A transaction whose statements are prepared once per connection: each query is
/// then one round trip instead of two.
struct Tx<'a, 'b> {
    tx: &'a mut Transaction<'b>,
    statements: &'a mut HashMap<String, Statement>,
    clock_offset_ms: i64,
}

type Params<'p> = [&'p (dyn ToSql + Sync)];

impl Tx<'_, '_> {
    /// A time of this host's clock on the server's: leases are written and judged
    /// there, so hosts whose clocks disagree do not expire each other's leases.
    fn lease_clock(&self, local_ms: i64) -> i64 {
        local_ms + self.clock_offset_ms
    }

    fn statement(&mut self, sql: &str) -> Result<Statement> {
        if let Some(s) = self.statements.get(sql) {
            return Ok(s.clone());
        }
        let s = self.tx.prepare(sql)?;
        self.statements.insert(sql.to_string(), s.clone());
        Ok(s)
    }

    fn query(&mut self, sql: &str, params: &Params<'_>) -> Result<Vec<postgres::Row>> {
        let s = self.statement(sql)?;
        Ok(self.tx.query(&s, params)?)
    }

    fn query_one(&mut self, sql: &str, params: &Params<'_>) -> Result<postgres::Row> {
        let s = self.statement(sql)?;
        Ok(self.tx.query_one(&s, params)?)
    }

    fn query_opt(&mut self, sql: &str, params: &Params<'_>) -> Result<Option<postgres::Row>> {
        let s = self.statement(sql)?;
        Ok(self.tx.query_opt(&s, params)?)
    }

    fn execute(&mut self, sql: &str, params: &Params<'_>) -> Result<u64> {
        let s = self.statement(sql)?;
        Ok(self.tx.execute(&s, params)?)
    }
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
    acks: Acks,
    needs: StageNeeds,
}

const STAGE_COLUMNS: &str =
    "id, idx, name, items, after, retries, sizer_config, state, acks, needs";

fn stage_row(r: &postgres::Row) -> Result<StageRow> {
    Ok(StageRow {
        id: r.get(0),
        idx: r.get::<_, i32>(1) as usize,
        name: r.get(2),
        items: r.get::<_, i64>(3) as u64,
        after: parse(r.get(4), "stage after")?,
        retries: r.get::<_, i32>(5) as u32,
        sizer_config: decode_sizer_config(r.get(6))?,
        state: r.get(7),
        acks: r.get(8),
        needs: parse(r.get(9), "stage needs")?,
    })
}

fn stages_of(tx: &mut Tx<'_, '_>, job: i64) -> Result<Vec<StageRow>> {
    let sql = format!("SELECT {STAGE_COLUMNS} FROM stages WHERE job_id = $1 ORDER BY idx");
    tx.query(&sql, &[&job])?.iter().map(stage_row).collect()
}

fn stage_by_id(tx: &mut Tx<'_, '_>, stage: i64) -> Result<StageRow> {
    let sql = format!("SELECT {STAGE_COLUMNS} FROM stages WHERE id = $1");
    stage_row(&tx.query_one(&sql, &[&stage])?)
}

/// A running fragment, locked for this transaction, as long as `worker` holds it.
struct HeldFragment {
    stage: i64,
    fragment: RunningFragment,
    class: String,
    size_cap: String,
    /// Whether its stage was known to ack when read (without a lock).
    acking: bool,
    /// Whether its stage was known to keep state when read (without a lock).
    stateful: bool,
    /// Whether its job still runs (not cancelled, refused or broken).
    job_running: bool,
}

fn hold(tx: &mut Tx<'_, '_>, id: FragmentId, worker: &str) -> Result<Option<HeldFragment>> {
    let row = tx.query_opt(
        "SELECT stage_id, start_idx, end_idx, acked, failures, checkpoint_id, class, size_cap, lost, floor_memory_mb,
                covers, inherited, resumed_from,
                (SELECT s.acks = 'yes' FROM stages s WHERE s.id = f.stage_id),
                (SELECT s.stateful FROM stages s WHERE s.id = f.stage_id),
                (SELECT j.state = 'running' FROM stages s JOIN jobs j ON j.id = s.job_id WHERE s.id = f.stage_id)
         FROM fragments f WHERE id = $1 AND worker = $2 AND state = 'running' FOR UPDATE OF f",
        &[&id.0, &worker],
    )?;
    let Some(r) = row else { return Ok(None) };
    Ok(Some(HeldFragment {
        stage: r.get(0),
        fragment: RunningFragment {
            id,
            span: Span::new(r.get::<_, i64>(1) as u64, r.get::<_, i64>(2) as u64),
            acked: parse(r.get(3), "fragment acks")?,
            failures: r.get::<_, i32>(4) as u32,
            checkpoint: r.get(5),
            lost: r.get::<_, i32>(8) as u32,
            floor_memory_mb: r.get::<_, i64>(9) as u64,
            covers: parse(r.get(10), "fragment covers")?,
            inherited: parse(r.get(11), "fragment inherited state")?,
            resumed_from: r.get(12),
        },
        class: r.get(6),
        size_cap: r.get(7),
        acking: r.get(13),
        stateful: r.get(14),
        job_running: r.get(15),
    }))
}

/// A ledger holding just one running fragment: the core's transitions applied to
/// the rows one transaction touches. Its `done` (the items this fragment's row
/// counts) and `pending` are what changed. Items other rows count are undone with
/// [`undo_done`]; the stage's first ack is handled by [`learn_acking`].
fn mini_ledger(held: &HeldFragment) -> StageLedger {
    let f = &held.fragment;
    StageLedger {
        items: f.span.end,
        pending: Default::default(),
        done: f.acked.clone(),
        quarantined: IntervalSet::new(),
        running: vec![f.clone()],
        acking: held.acking,
        unconfirmed: IntervalSet::new(),
        stateful: held.stateful,
        stateless_done: IntervalSet::new(),
    }
}

/// Whether the stage's tasks are known to ack and to keep state, read under the
/// stage row's lock: a finish that counts items with no state (or an all-or-nothing
/// fragment) and a flush that brings the stage's first checkpoint
/// ([`learn_stateful`]) or first ack ([`learn_acking`]) see each other. The lock
/// is exclusive, not shared: a finish may go on to lock the row for update (a
/// quarantine, the stage's end), and two share holders that both upgrade deadlock.
fn flags_locked(tx: &mut Tx<'_, '_>, stage: i64) -> Result<(bool, bool)> {
    let r = tx.query_one(
        "SELECT acks = 'yes', stateful FROM stages WHERE id = $1 FOR UPDATE",
        &[&stage],
    )?;
    Ok((r.get(0), r.get(1)))
}

/// The stage's first checkpoint: items finished fragments counted done with no
/// state go back to pending (their state, if any, is nowhere).
fn learn_stateful(tx: &mut Tx<'_, '_>, stage: i64) -> Result<bool> {
    let stateful: bool = tx
        .query_one(
            "SELECT stateful FROM stages WHERE id = $1 FOR UPDATE",
            &[&stage],
        )?
        .get(0);
    if stateful {
        return Ok(false);
    }
    let rows = tx.query(
        "UPDATE fragments f SET acked = '[]', done_count = 0, unconfirmed = false
         FROM fragments old
         WHERE old.id = f.id AND f.stage_id = $1 AND f.state != 'running' AND f.done_count > 0
         RETURNING old.acked",
        &[&stage],
    )?;
    let mut reverted = IntervalSet::new();
    for r in &rows {
        reverted.union_with(&parse::<IntervalSet>(r.get(0), "fragment acks")?);
    }
    let fresh: Vec<PendingRange> = reverted.spans().map(PendingRange::fresh).collect();
    insert_pending(tx, stage, &fresh)?;
    tx.execute("UPDATE stages SET stateful = true WHERE id = $1", &[&stage])?;
    Ok(!fresh.is_empty())
}

/// The stage's first ack: every item an all-or-nothing fragment counted done goes
/// back to pending (no ack vouches for it), and from now on no ack is a failure.
fn learn_acking(tx: &mut Tx<'_, '_>, stage: i64) -> Result<bool> {
    let acks: Acks = tx
        .query_one(
            "SELECT acks FROM stages WHERE id = $1 FOR UPDATE",
            &[&stage],
        )?
        .get(0);
    if acks == Acks::Yes {
        return Ok(false);
    }
    let reverted = tx.query(
        "UPDATE fragments f SET state = 'reverted', done_count = 0, acked = '[]', result = NULL, unconfirmed = false
         FROM fragments old WHERE old.id = f.id AND f.stage_id = $1 AND f.unconfirmed RETURNING old.acked",
        &[&stage],
    )?;
    let mut items = IntervalSet::new();
    for r in &reverted {
        items.union_with(&parse::<IntervalSet>(r.get(0), "fragment acks")?);
    }
    let ranges: Vec<PendingRange> = items.spans().map(PendingRange::fresh).collect();
    insert_pending(tx, stage, &ranges)?;
    tx.execute("UPDATE stages SET acks = 'yes' WHERE id = $1", &[&stage])?;
    Ok(!ranges.is_empty())
}

/// Items other fragments' rows count done go back to pending: their state was
/// lost with a checkpoint that could not be restored.
fn undo_done(tx: &mut Tx<'_, '_>, stage: i64, lost: &IntervalSet) -> Result<()> {
    let (Some(first), Some(last)) = (lost.first(), lost.spans().last().map(|s| s.end)) else {
        return Ok(());
    };
    let rows = tx.query(
        "SELECT id, acked FROM fragments
         WHERE stage_id = $1 AND state != 'running' AND done_count > 0 AND start_idx < $3 AND end_idx > $2
         FOR UPDATE",
        &[&stage, &(first as i64), &(last as i64)],
    )?;
    for r in &rows {
        let mut acked: IntervalSet = parse(r.get(1), "fragment acks")?;
        if !acked.intersects(lost) {
            continue;
        }
        acked.subtract(lost);
        tx.execute(
            "UPDATE fragments SET acked = $2, done_count = $3 WHERE id = $1",
            &[&r.get::<_, i64>(0), &json(&acked), &(acked.len() as i64)],
        )?;
    }
    Ok(())
}

/// The result a finish ended a chain with, if its checkpoint is still there; if it
/// is gone, the items it held run again (this fragment's through `ledger`, other
/// rows' here). Returns the result and how many items run again.
fn kept_result(
    tx: &mut Tx<'_, '_>,
    stage: i64,
    ledger: &mut StageLedger,
    report: &granule_core::FinishReport,
) -> Result<(Option<i64>, u64)> {
    let Some((blob, covers)) = &report.result else {
        return Ok((None, 0));
    };
    if tx
        .query_opt("SELECT 1 FROM blobs WHERE id = $1", &[blob])?
        .is_some()
    {
        return Ok((Some(*blob), 0));
    }
    let mine = covers.intersection(&ledger.done);
    let others = covers.difference(&mine);
    undo_done(tx, stage, &others)?;
    let fresh: Vec<PendingRange> = others.spans().map(PendingRange::fresh).collect();
    insert_pending(tx, stage, &fresh)?;
    Ok((None, ledger.forget(&mine) + others.len()))
}

/// Stops a running job with an error (`refused`, `broken`); its running fragments
/// are told at their next flush and their accounting is kept.
fn halt_job(tx: &mut Tx<'_, '_>, job: i64, halt: &JobHalt, now_ms: i64) -> Result<()> {
    tx.execute(
        "UPDATE jobs SET state = $2, error = $3, finished_ms = $4 WHERE id = $1 AND state = 'running'",
        &[&job, &halt.state(), &halt.message(), &now_ms],
    )?;
    Ok(())
}

fn insert_pending(tx: &mut Tx<'_, '_>, stage: i64, ranges: &[PendingRange]) -> Result<()> {
    for r in ranges {
        tx.execute(
            "INSERT INTO pending (stage_id, start_idx, end_idx, failures, checkpoint_id, lost, floor_memory_mb, covers)
             VALUES ($1, $2, $3, $4, $5, $6, $7, $8)",
            &[
                &stage,
                &(r.span.start as i64),
                &(r.span.end as i64),
                &(r.failures as i32),
                &r.checkpoint,
                &(r.lost as i32),
                &(r.floor_memory_mb as i64),
                &json(&r.covers),
            ],
        )?;
    }
    Ok(())
}

/// Applies acks, checkpoints and a split answer to a held fragment; returns the
/// items newly done and whether pending work appeared.
fn apply_flush(
    tx: &mut Tx<'_, '_>,
    held: &HeldFragment,
    ledger: &mut StageLedger,
    f: &FragmentFlush,
    now_ms: i64,
) -> Result<(u64, bool)> {
    let mut appeared = false;
    if let Some(restored) = f.restored {
        let covers = match restored {
            Some(blob) => match tx.query_opt("SELECT covers FROM blobs WHERE id = $1", &[&blob])? {
                Some(r) => parse(r.get(0), "checkpoint covers")?,
                None => IntervalSet::new(),
            },
            None => IntervalSet::new(),
        };
        // The lost state's items are counted on the rows of earlier attempts: they
        // are undone there (the mini ledger holds only this fragment's own).
        let before = ledger
            .fragment(f.fragment)
            .map(|r| r.inherited.clone())
            .unwrap_or_default();
        ledger.fallback(f.fragment, restored, &covers);
        let lost = before.difference(&covers);
        if !lost.is_empty() {
            undo_done(tx, held.stage, &lost)?;
            let fresh: Vec<PendingRange> = lost.spans().map(PendingRange::fresh).collect();
            insert_pending(tx, held.stage, &fresh)?;
            tx.execute(
                "UPDATE fragments SET state_reruns = state_reruns + $2 WHERE id = $1",
                &[&f.fragment.0, &(lost.len() as i64)],
            )?;
            appeared = true;
        }
    }
    if !f.acked.is_empty() && !ledger.acking {
        appeared |= learn_acking(tx, held.stage)?;
        ledger.acking = true;
    }
    let done = ledger.ack(f.fragment, &f.acked).done;
    if !f.checkpoints.is_empty() && !ledger.stateful {
        appeared |= learn_stateful(tx, held.stage)?;
        ledger.stateful = true;
    }
    for cp in &f.checkpoints {
        let Some(covers) = ledger.checkpoint_covers(f.fragment, &cp.acked) else {
            continue;
        };
        let prev = ledger.fragment(f.fragment).and_then(|r| r.checkpoint);
        let b = &cp.blob;
        let id: i64 = tx
            .query_one(
                "INSERT INTO blobs (stage_id, fragment_id, kind, raw_len, hash, data, meta, created_ms, prev, covers)
                 VALUES ($1, $2, 'checkpoint', $3, $4, $5, $6, $7, $8, $9) RETURNING id",
                &[&held.stage, &f.fragment.0, &(b.raw_len as i64), &b.hash, &b.data, &b.meta, &now_ms, &prev, &json(&covers)],
            )?
            .get(0);
        ledger.checkpoint(f.fragment, id, &cp.acked);
    }
    if let Some(answer) = f.split {
        if let SplitAnswer::At(at) = answer {
            if ledger.split(f.fragment, at) > 0 {
                let tail = ledger.pending.ranges().to_vec();
                insert_pending(tx, held.stage, &tail)?;
                ledger.pending = Default::default();
                tx.execute(
                    "UPDATE fragments SET splits = splits + 1 WHERE id = $1",
                    &[&f.fragment.0],
                )?;
                appeared = true;
            }
        }
        tx.execute(
            "UPDATE fragments SET split_request = NULL WHERE id = $1",
            &[&f.fragment.0],
        )?;
    }
    Ok((done, appeared))
}

fn save_fragment(tx: &mut Tx<'_, '_>, ledger: &StageLedger, id: FragmentId) -> Result<()> {
    if let Some(f) = ledger.fragment(id) {
        tx.execute(
            "UPDATE fragments SET end_idx = $2, acked = $3, done_count = $4, checkpoint_id = $5, covers = $6,
               inherited = $7, resumed_from = $8 WHERE id = $1",
            &[
                &id.0,
                &(f.span.end as i64),
                &json(&f.acked),
                &(f.acked.len() as i64),
                &f.checkpoint,
                &json(&f.covers),
                &json(&f.inherited),
                &f.resumed_from,
            ],
        )?;
    }
    Ok(())
}

/// The sizer of (stage, class), and whether this transaction holds its row lock
/// (taken only if free: a busy sizer is read, not waited for).
fn sizer_for(tx: &mut Tx<'_, '_>, stage: i64, class: &str) -> Result<(Sizer, bool)> {
    let locked = tx.query_opt(
        "SELECT state FROM sizers WHERE stage_id = $1 AND class = $2 FOR UPDATE SKIP LOCKED",
        &[&stage, &class],
    )?;
    if let Some(r) = locked {
        return Ok((parse(r.get(0), "sizer state")?, true));
    }
    let plain = tx.query_opt(
        "SELECT state FROM sizers WHERE stage_id = $1 AND class = $2",
        &[&stage, &class],
    )?;
    match plain {
        Some(r) => Ok((parse(r.get(0), "sizer state")?, false)),
        None => {
            let created = tx.execute(
                "INSERT INTO sizers (stage_id, class, state) VALUES ($1, $2, $3) ON CONFLICT DO NOTHING",
                &[&stage, &class, &json(&Sizer::default())],
            )?;
            Ok((Sizer::default(), created == 1))
        }
    }
}

fn save_sizer(tx: &mut Tx<'_, '_>, stage: i64, class: &str, sizer: &Sizer) -> Result<()> {
    tx.execute(
        "UPDATE sizers SET state = $3 WHERE stage_id = $1 AND class = $2",
        &[&stage, &class, &json(sizer)],
    )?;
    Ok(())
}

fn notify(tx: &mut Tx<'_, '_>) -> Result<()> {
    tx.execute(&format!("NOTIFY {CHANNEL}"), &[])?;
    Ok(())
}

/// Marks the stage done if nothing of it is pending or running, and its job once
/// every stage is. The stage row lock makes two last finishers see each other.
fn settle(tx: &mut Tx<'_, '_>, stage: i64, now_ms: i64) -> Result<bool> {
    let open: i64 = tx
        .query_one(
            "SELECT count(*) FROM pending WHERE stage_id = $1",
            &[&stage],
        )?
        .get(0);
    if open > 0 {
        return Ok(false);
    }
    let job: i64 = tx
        .query_one(
            "SELECT job_id FROM stages WHERE id = $1 FOR UPDATE",
            &[&stage],
        )?
        .get(0);
    let busy: i64 = tx
        .query_one(
            "SELECT (SELECT count(*) FROM pending WHERE stage_id = $1)
                  + (SELECT count(*) FROM fragments WHERE stage_id = $1 AND state = 'running')",
            &[&stage],
        )?
        .get(0);
    if busy > 0 {
        return Ok(false);
    }
    tx.execute("UPDATE stages SET state = 'done' WHERE id = $1", &[&stage])?;
    // Stages that waited for this one may be ready now.
    notify(tx)?;
    tx.query_one("SELECT id FROM jobs WHERE id = $1 FOR UPDATE", &[&job])?;
    let open: i64 = tx
        .query_one(
            "SELECT count(*) FROM stages WHERE job_id = $1 AND state != 'done'",
            &[&job],
        )?
        .get(0);
    if open > 0 {
        return Ok(false);
    }
    let quarantined: i64 = tx
        .query_one(
            "SELECT count(*) FROM stages WHERE job_id = $1 AND quarantined != '[]'",
            &[&job],
        )?
        .get(0);
    let state = if quarantined > 0 { "failed" } else { "done" };
    tx.execute(
        "UPDATE jobs SET state = $2, finished_ms = $3 WHERE id = $1 AND state = 'running'",
        &[&job, &state, &now_ms],
    )?;
    Ok(true)
}

/// The server's clock minus this host's (ms), from one round trip's midpoint. Under
/// a second is taken as none: that is the measurement's own noise on a loaded host,
/// and synchronized clocks agree closer than a lease needs.
fn clock_offset(client: &mut Client) -> Result<i64> {
    let local = || {
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_millis() as i64)
    };
    let before = local();
    let server: i64 = client
        .query_one(
            "SELECT (extract(epoch FROM clock_timestamp()) * 1000)::BIGINT",
            &[],
        )?
        .get(0);
    let offset = server - (before + local()) / 2;
    Ok(if offset.abs() < 1000 { 0 } else { offset })
}

impl PgStore {
    /// Connects to the database at `url` (`postgres://…`) and applies pending migrations.
    pub fn open(url: &str) -> Result<PgStore> {
        let mut config = postgres::Config::from_str(url)?;
        config
            .connect_timeout(Duration::from_secs(5))
            // A cut link surfaces as an error within seconds instead of hanging a call.
            .tcp_user_timeout(Duration::from_secs(5))
            .keepalives(true)
            .keepalives_idle(Duration::from_secs(5))
            .keepalives_interval(Duration::from_secs(1))
            .keepalives_retries(3);
        if config.get_application_name().is_none() {
            config.application_name("granule");
        }
        let mut store = PgStore {
            config,
            client: None,
            statements: HashMap::new(),
            next_attempt: Instant::now(),
            backoff: Duration::ZERO,
            clock_offset_ms: 0,
        };
        store.connect()?;
        Ok(store)
    }

    fn connect(&mut self) -> Result<()> {
        let mut client = self.config.connect(NoTls)?;
        let mut tx = client.transaction()?;
        // One migrator at a time, across every worker that starts at once.
        tx.execute("SELECT pg_advisory_xact_lock(7267435)", &[])?;
        tx.batch_execute("CREATE TABLE IF NOT EXISTS granule_schema (version INT NOT NULL)")?;
        let version: i64 = tx
            .query_one(
                "SELECT coalesce(max(version), 0)::BIGINT FROM granule_schema",
                &[],
            )?
            .get(0);
        for (i, sql) in MIGRATIONS.iter().enumerate().skip(version as usize) {
            tx.batch_execute(sql)?;
            tx.execute(
                "INSERT INTO granule_schema (version) VALUES ($1)",
                &[&((i + 1) as i32)],
            )?;
        }
        tx.commit()?;
        client.batch_execute(&format!("LISTEN {CHANNEL}"))?;
        // A worker cut off mid-transaction (a partition, a frozen host) must not hold
        // its row locks until the server's TCP keepalive notices, hours later: the
        // server ends a session left idle inside a transaction. Ours never pause that
        // long between statements; one that does is retried as a lost connection.
        client.batch_execute(&format!(
            "SET idle_in_transaction_session_timeout = {}",
            IDLE_IN_TRANSACTION.as_millis()
        ))?;
        self.clock_offset_ms = clock_offset(&mut client)?;
        self.client = Some(client);
        self.statements.clear();
        self.backoff = Duration::ZERO;
        Ok(())
    }

    /// The connection, reconnecting (with backoff) if it was lost.
    fn client(&mut self) -> Result<&mut Client> {
        if self.client.as_ref().is_some_and(|c| c.is_closed()) {
            self.client = None;
        }
        if self.client.is_none() {
            if Instant::now() < self.next_attempt {
                return Err(StoreError::Unavailable("reconnecting to PostgreSQL".into()));
            }
            if let Err(e) = self.connect() {
                self.backoff = (self.backoff * 2).clamp(Duration::from_millis(100), BACKOFF_MAX);
                self.next_attempt = Instant::now() + self.backoff;
                return Err(StoreError::Unavailable(format!(
                    "cannot reach PostgreSQL: {e}"
                )));
            }
        }
        Ok(self.client.as_mut().expect("connected above"))
    }

    /// Runs `f` in a transaction; a broken connection is dropped for a reconnect.
    fn with_tx<T>(&mut self, f: impl FnOnce(&mut Tx<'_, '_>) -> Result<T>) -> Result<T> {
        self.client()?;
        let (client, statements, clock_offset_ms) = (
            self.client.as_mut().expect("connected"),
            &mut self.statements,
            self.clock_offset_ms,
        );
        let result: Result<T> = (|| {
            let mut tx = client.transaction()?;
            let value = f(&mut Tx {
                tx: &mut tx,
                statements,
                clock_offset_ms,
            })?;
            tx.commit()?;
            Ok(value)
        })();
        if let Err(e) = &result {
            if e.is_transient() {
                self.client = None;
                self.statements.clear();
            }
        }
        result
    }
}

impl PgStore {
    /// One try at recording a job (see `Store::submit`).
    fn submit_once(&mut self, job: &NewJob, now_ms: i64, fresh: bool) -> Result<Submitted> {
        self.with_tx(|tx| {
            let existing = tx.query_opt("SELECT id, spec_hash, state FROM jobs WHERE name = $1 FOR UPDATE", &[&job.name])?;
            if let Some(r) = existing {
                let (id, hash, state): (i64, String, String) = (r.get(0), r.get(1), r.get(2));
                if !fresh {
                    if hash != job.spec_hash {
                        return Err(StoreError::SpecChanged(job.name.clone()));
                    }
                    if state == "refused" {
                        // Submitted again as it was: its items are as submitted again.
                        tx.execute(
                            "UPDATE jobs SET state = 'running', error = NULL, finished_ms = NULL WHERE id = $1",
                            &[&id],
                        )?;
                        notify(tx)?;
                        return Ok(Submitted::Resumed(JobId(id)));
                    }
                    return Ok(if state == "running" { Submitted::Resumed(JobId(id)) } else { Submitted::AlreadyFinished(JobId(id)) });
                }
                tx.execute("DELETE FROM jobs WHERE id = $1", &[&id])?;
            }
            let id: i64 = tx
                .query_one(
                    "INSERT INTO jobs (name, spec_hash, spec, state, created_ms) VALUES ($1, $2, $3, 'running', $4) RETURNING id",
                    &[&job.name, &job.spec_hash, &job.spec_json, &now_ms],
                )?
                .get(0);
            for (idx, stage) in job.stages.iter().enumerate() {
                let state = if stage.items == 0 { "done" } else { "waiting" };
                let stage_id: i64 = tx
                    .query_one(
                        "INSERT INTO stages (job_id, idx, name, items, after, retries, sizer_config, state, needs)
                         VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9) RETURNING id",
                        &[
                            &id,
                            &(idx as i32),
                            &stage.name,
                            &(stage.items as i64),
                            &json(&stage.after),
                            &(stage.retries as i32),
                            &sizer_config_json(&stage.sizer),
                            &state,
                            &json(&stage.needs),
                        ],
                    )?
                    .get(0);
                let shards = SHARDS.min(stage.items.max(1));
                let shard = stage.items.div_ceil(shards);
                let ranges: Vec<PendingRange> = (0..stage.items)
                    .step_by(shard.max(1) as usize)
                    .map(|start| PendingRange::fresh(Span::new(start, (start + shard).min(stage.items))))
                    .collect();
                insert_pending(tx, stage_id, &ranges)?;
            }
            notify(tx)?;
            Ok(Submitted::Created(JobId(id)))
        })
    }
}

impl Store for PgStore {
    fn submit(&mut self, job: &NewJob, now_ms: i64, fresh: bool) -> Result<Submitted> {
        // Two submits of a new job at once both find no row and insert it: the loser's
        // unique violation means the job now exists, so it looks again (and resumes it,
        // or refuses a different spec under that name).
        let mut attempt = 0;
        loop {
            match self.submit_once(job, now_ms, fresh) {
                Err(StoreError::Postgres(e))
                    if e.code() == Some(&postgres::error::SqlState::UNIQUE_VIOLATION)
                        && attempt < 3 =>
                {
                    attempt += 1;
                }
                other => return other,
            }
        }
    }

    fn job(&mut self, name: &str) -> Result<Option<JobRecord>> {
        let row = self.client()?.query_opt(
            "SELECT id, name, state, spec, error FROM jobs WHERE name = $1",
            &[&name],
        )?;
        Ok(row.map(|r| JobRecord {
            id: JobId(r.get(0)),
            name: r.get(1),
            state: r.get(2),
            spec_json: r.get(3),
            error: r.get(4),
        }))
    }

    fn job_by_id(&mut self, id: JobId) -> Result<Option<JobRecord>> {
        let row = self.client()?.query_opt(
            "SELECT id, name, state, spec, error FROM jobs WHERE id = $1",
            &[&id.0],
        )?;
        Ok(row.map(|r| JobRecord {
            id: JobId(r.get(0)),
            name: r.get(1),
            state: r.get(2),
            spec_json: r.get(3),
            error: r.get(4),
        }))
    }

    fn cancel(&mut self, name: &str, now_ms: i64) -> Result<bool> {
        let n = self.client()?.execute(
            "UPDATE jobs SET state = 'cancelled', finished_ms = $2 WHERE name = $1 AND state = 'running'",
            &[&name, &now_ms],
        )?;
        Ok(n == 1)
    }

    fn open_jobs(&mut self) -> Result<Vec<JobId>> {
        let rows = self.client()?.query(
            "SELECT id FROM jobs WHERE state = 'running' ORDER BY id",
            &[],
        )?;
        Ok(rows.iter().map(|r| JobId(r.get(0))).collect())
    }

    fn register_worker(&mut self, w: &WorkerInfo, now_ms: i64) -> Result<()> {
        self.client()?.execute(
            "INSERT INTO workers (id, host, pid, proc_start, slots, class, started_ms, heartbeat_ms, lifespan_end_ms,
               state, cost, spot, resources, locality)
             VALUES ($1, $2, $3, $4, $5, $6, $7, $7, $8, 'running', $9, $10, $11, $12)
             ON CONFLICT (id) DO UPDATE SET slots = $5, class = $6, heartbeat_ms = $7, lifespan_end_ms = $8,
               state = 'running', cost = $9, spot = $10, resources = $11, locality = $12",
            &[
                &w.id,
                &w.host,
                &w.pid,
                &w.proc_start,
                &(w.slots as i32),
                &w.class,
                &now_ms,
                &w.lifespan_end_ms,
                &w.cost_per_hour,
                &w.spot,
                &w.resources,
                &w.locality,
            ],
        )?;
        Ok(())
    }

    fn set_worker_state(&mut self, worker: &str, state: &str, now_ms: i64) -> Result<()> {
        self.client()?.execute(
            "UPDATE workers SET state = $2, heartbeat_ms = $3, busy = CASE WHEN $2 = 'exited' THEN 0 ELSE busy END,
               lease_until_ms = CASE WHEN $2 = 'exited' THEN 0 ELSE lease_until_ms END
             WHERE id = $1",
            &[&worker, &state, &now_ms],
        )?;
        Ok(())
    }

    fn claim(&mut self, req: &ClaimRequest) -> Result<Option<Assignment>> {
        Ok(self.claim_many(req, 1)?.into_iter().next())
    }

    fn claim_many(&mut self, req: &ClaimRequest, slots: usize) -> Result<Vec<Assignment>> {
        // A range locked by another claimer is skipped; if that was the only one
        // left, try again shortly rather than report "no work".
        for attempt in 0..4 {
            let (claimed, contended) = self.with_tx(|tx| {
                let mut req = req.clone();
                let (mut claimed, mut contended) = (Vec::new(), false);
                while claimed.len() < slots {
                    let (assignment, locked_out) = claim_once(tx, &req)?;
                    contended |= locked_out;
                    let Some(a) = assignment else { break };
                    req.offer = req.offer.less(&a.needs);
                    claimed.push(a);
                }
                Ok((claimed, contended))
            })?;
            if !claimed.is_empty() || !contended {
                return Ok(claimed);
            }
            std::thread::sleep(Duration::from_millis(2 << attempt));
        }
        Ok(Vec::new())
    }

    fn flush(
        &mut self,
        worker: &str,
        now_ms: i64,
        lease_ms: i64,
        heartbeat: &Heartbeat,
        batch: &[FragmentFlush],
    ) -> Result<FlushReply> {
        self.with_tx(|tx| {
            let mut reply = FlushReply::default();
            let mut appeared = false;
            for f in batch {
                let Some(held) = hold(tx, f.fragment, worker)? else {
                    reply.lost.push(f.fragment);
                    continue;
                };
                let mut ledger = mini_ledger(&held);
                let (done, new_work) = apply_flush(tx, &held, &mut ledger, f, now_ms)?;
                reply.done += done;
                appeared |= new_work;
                save_fragment(tx, &ledger, f.fragment)?;
                if !held.job_running {
                    // Cancelled or stopped: its acks stand, the rest is pending again.
                    let report = ledger.finish(f.fragment, &FinishOutcome::Yielded, 0);
                    insert_pending(tx, held.stage, ledger.pending.ranges())?;
                    tx.execute(
                        "UPDATE fragments SET state = 'cancelled', finished_ms = $2, split_request = NULL,
                           acked = $3, done_count = $4, state_reruns = state_reruns + $5 WHERE id = $1",
                        &[
                            &f.fragment.0,
                            &now_ms,
                            &json(&ledger.done),
                            &(ledger.done.len() as i64),
                            &(report.undone as i64),
                        ],
                    )?;
                    reply.stopped.push(f.fragment);
                }
            }
            // What the worker says it holds follows its lease from now on, once half of
            // its own claim lease is spent (one write per fragment, none for short ones);
            // a claim whose reply never reached the worker is never confirmed and expires.
            let held: Vec<i64> = heartbeat.held.iter().map(|f| f.0).collect();
            let half_spent = tx.lease_clock(now_ms + lease_ms / 2);
            tx.execute(
                "UPDATE fragments SET lease_expires_ms = $2
                 WHERE worker = $1 AND state = 'running' AND id = ANY($3) AND lease_expires_ms < $4",
                &[&worker, &FOLLOWS_WORKER, &held, &half_spent],
            )?;
            let lease_until = tx.lease_clock(now_ms + lease_ms);
            tx.execute(
                "UPDATE workers SET heartbeat_ms = $2, busy = $3, free_memory = $4, load = $5, lease_until_ms = $6
                 WHERE id = $1",
                &[
                    &worker,
                    &now_ms,
                    &(heartbeat.busy as i32),
                    &heartbeat.free_memory,
                    &heartbeat.load,
                    &lease_until,
                ],
            )?;
            reply.split_requests = tx
                .query(
                    "SELECT id, split_request FROM fragments
                     WHERE worker = $1 AND state = 'running' AND split_request IS NOT NULL",
                    &[&worker],
                )?
                .iter()
                .map(|r| (FragmentId(r.get(0)), r.get::<_, i64>(1) as u64))
                .collect();
            if appeared {
                notify(tx)?;
            }
            Ok(reply)
        })
    }

    fn request_split(
        &mut self,
        job: Option<JobId>,
        now_ms: i64,
        min_ms: f64,
        asker: &str,
    ) -> Result<Option<FragmentId>> {
        self.with_tx(|tx| {
            let rows = tx.query(
                "SELECT f.id, f.stage_id, f.start_idx, f.end_idx, f.acked, f.class, f.claimed_ms, f.predicted_ms
                 FROM fragments f JOIN stages s ON s.id = f.stage_id
                 WHERE f.state = 'running' AND f.split_request IS NULL AND ($1::BIGINT IS NULL OR s.job_id = $1)",
                &[&job.map(|j| j.0)],
            )?;
            let mut best: Option<(f64, i64, u64)> = None;
            for r in &rows {
                let (stage, class): (i64, String) = (r.get(1), r.get(5));
                let mut model_of = |class: &str| -> Result<granule_core::CostModel> {
                    let state = tx.query_opt(
                        "SELECT state FROM sizers WHERE stage_id = $1 AND class = $2",
                        &[&stage, &class],
                    )?;
                    Ok(match state {
                        Some(s) => parse::<Sizer>(s.get(0), "sizer state")?.model,
                        None => Default::default(),
                    })
                };
                let model = model_of(&class)?;
                let gain = split_gain(&model, &model_of(asker)?);
                let acked: IntervalSet = parse(r.get(4), "fragment acks")?;
                let span = Span::new(r.get::<_, i64>(2) as u64, r.get::<_, i64>(3) as u64);
                let elapsed = now_ms - r.get::<_, i64>(6);
                if let Some((remaining, at)) = split_point(span, &acked, &model, elapsed, r.get(7), min_ms) {
                    let worth = remaining * gain;
                    if best.is_none_or(|b| worth > b.0) {
                        best = Some((worth, r.get(0), at));
                    }
                }
            }
            let Some((_, id, at)) = best else { return Ok(None) };
            let set = tx.execute(
                "UPDATE fragments SET split_request = $2 WHERE id = $1 AND state = 'running' AND split_request IS NULL",
                &[&id, &(at as i64)],
            )?;
            Ok((set == 1).then_some(FragmentId(id)))
        })
    }

    fn finish(&mut self, worker: &str, now_ms: i64, end: &FragmentEnd) -> Result<Finished> {
        self.with_tx(|tx| {
            let id = end.flush.fragment;
            let Some(held) = hold(tx, id, worker)? else { return Ok(Finished::default()) };
            let stage = stage_by_id(tx, held.stage)?;
            let mut ledger = mini_ledger(&held);
            let (_, mut appeared) = apply_flush(tx, &held, &mut ledger, &end.flush, now_ms)?;
            let mut splits = 0;
            if ledger.fragment(id).is_some_and(|f| end.end < f.span.end) && ledger.split(id, end.end) > 0 {
                splits = 1;
            }
            let f = ledger.fragment(id).expect("held fragment").clone();
            let outcome = accounted_outcome(end);
            let all_or_nothing = matches!(outcome, FinishOutcome::AllOrNothing { .. });
            if (all_or_nothing && !ledger.acking) || (!ledger.stateful && !f.acked.is_empty()) {
                // Judged against a first ack or first checkpoint another worker may be
                // committing now.
                (ledger.acking, ledger.stateful) = flags_locked(tx, held.stage)?;
            }
            let report = ledger.finish(id, &outcome, retry_budget(end.cause.as_deref(), stage.retries));
            let verdict = verdict(end, &report);
            let (result, forgotten) = kept_result(tx, held.stage, &mut ledger, &report)?;
            appeared |= forgotten > 0;
            if end.cause.as_deref() == Some("oom") {
                // Retried on a worker with more memory than this one, while one is alive.
                let resources: Option<String> = tx
                    .query_opt("SELECT resources FROM workers WHERE id = $1", &[&worker])?
                    .map(|r| r.get(0));
                ledger.raise_floor(f.span, resources.map_or(0, |r| memory_of(&r)));
            }
            let requeue = ledger.pending.ranges().to_vec();
            appeared |= !requeue.is_empty();
            insert_pending(tx, held.stage, &requeue)?;
            if !report.quarantined.is_empty() {
                let q: String =
                    tx.query_one("SELECT quarantined FROM stages WHERE id = $1 FOR UPDATE", &[&held.stage])?.get(0);
                let mut q: IntervalSet = parse(&q, "quarantined")?;
                q.union_with(&report.quarantined);
                tx.execute("UPDATE stages SET quarantined = $2 WHERE id = $1", &[&held.stage, &json(&q)])?;
            }
            tx.execute(
                "UPDATE fragments SET state = $2, finished_ms = $3, observed_ms = $4, cpu_ms = $5, peak_rss_kb = $6,
                  load = $7, fed = $8, acks = $9, cause = $10, detail = $11, stdout = $12, stderr = $13,
                  end_idx = $14, acked = $15, done_count = $16, wasted_ms = $17, checkpoint_fallbacks = $18,
                  split_request = NULL, checkpoint_id = $19, splits = splits + $20, io_bytes = $21,
                  predicted_ms = coalesce($22, predicted_ms), result = $23, state_reruns = state_reruns + $24,
                  results_missing = $25, unconfirmed = $26
                 WHERE id = $1",
                &[
                    &id.0,
                    &verdict.state,
                    &now_ms,
                    &end.observed_ms,
                    &end.cpu_ms,
                    &(end.peak_rss_kb as i64),
                    &end.load,
                    &(end.fed as i64),
                    &(end.acks as i64),
                    &verdict.cause,
                    &verdict.detail,
                    &end.stdout,
                    &end.stderr,
                    &(f.span.end as i64),
                    &json(&ledger.done),
                    &(ledger.done.len() as i64),
                    &end.wasted_ms,
                    &(end.checkpoint_fallbacks as i32),
                    &f.checkpoint,
                    &splits,
                    &(end.io_bytes as i64),
                    &end.predicted_ms,
                    &result,
                    &((report.undone + forgotten) as i64),
                    &(report.uncovered as i64),
                    &(verdict.all_or_nothing && !ledger.acking),
                ],
            )?;
            if verdict.all_or_nothing && end.fed > 0 && stage.acks == Acks::Unknown {
                tx.execute("UPDATE stages SET acks = 'no' WHERE id = $1 AND acks = 'unknown'", &[&held.stage])?;
            }
            if let Some(halt) = &end.halt {
                let job: i64 = tx.query_one("SELECT job_id FROM stages WHERE id = $1", &[&held.stage])?.get(0);
                halt_job(tx, job, halt, now_ms)?;
            }
            if verdict.finished && end.fed > 0 {
                let (mut sizer, locked) = sizer_for(tx, held.stage, &held.class)?;
                if locked {
                    sizer.observe(
                        &stage.sizer_config,
                        &Observation {
                            n: end.fed,
                            duration_ms: end.observed_ms,
                            acks: end.acks,
                            first_ack_ms: end.first_ack_ms,
                            last_ack_ms: end.last_ack_ms,
                            sized_by_model: held.size_cap == "model",
                            bytes: end.bytes,
                load: Some(end.load),
                        },
                    );
                    save_sizer(tx, held.stage, &held.class, &sizer)?;
                }
            }
            if appeared {
                notify(tx)?;
            }
            let job_finished = requeue.is_empty() && settle(tx, held.stage, now_ms)?;
            Ok(Finished { accepted: true, quarantined: report.quarantined, job_finished })
        })
    }

    fn workers_holding_work(&mut self) -> Result<Vec<WorkerInfo>> {
        let rows = self.client()?.query(
            "SELECT id, host, pid, proc_start, slots, class, lifespan_end_ms, cost, spot, resources, locality FROM workers
             WHERE id IN (SELECT DISTINCT worker FROM fragments WHERE state = 'running')",
            &[],
        )?;
        Ok(rows
            .iter()
            .map(|r| WorkerInfo {
                id: r.get(0),
                host: r.get(1),
                pid: r.get(2),
                proc_start: r.get(3),
                slots: r.get::<_, i32>(4) as u32,
                class: r.get(5),
                lifespan_end_ms: r.get(6),
                cost_per_hour: r.get(7),
                spot: r.get(8),
                resources: r.get(9),
                locality: r.get(10),
            })
            .collect())
    }

    fn release(&mut self, now_ms: i64, dead: &[String]) -> Result<u64> {
        self.with_tx(|tx| {
            let now_lease = tx.lease_clock(now_ms);
            let rows = tx.query(
                "SELECT f.id, f.worker FROM fragments f LEFT JOIN workers w ON w.id = f.worker
                 WHERE f.state = 'running' AND f.worker = ANY($2)
                    OR f.state = 'running' AND f.lease_expires_ms < $1
                    OR f.state = 'running' AND f.lease_expires_ms = $3 AND coalesce(w.lease_until_ms, 0) < $1
                 ORDER BY f.stage_id, f.id
                 FOR UPDATE OF f SKIP LOCKED",
                &[&now_lease, &dead, &FOLLOWS_WORKER],
            )?;
            let mut drained = Vec::new();
            for r in &rows {
                let (id, worker): (i64, String) = (r.get(0), r.get(1));
                let Some(held) = hold(tx, FragmentId(id), &worker)? else { continue };
                let mut ledger = mini_ledger(&held);
                if !ledger.stateful && !held.fragment.acked.is_empty() {
                    (ledger.acking, ledger.stateful) = flags_locked(tx, held.stage)?;
                }
                let report = ledger.finish(FragmentId(id), &FinishOutcome::Lost, u32::MAX);
                let (result, forgotten) = kept_result(tx, held.stage, &mut ledger, &report)?;
                insert_pending(tx, held.stage, ledger.pending.ranges())?;
                if ledger.pending.is_empty() {
                    drained.push(held.stage);
                }
                let why = if dead.contains(&worker) { "worker died" } else { "lease expired" };
                tx.execute(
                    "UPDATE fragments SET state = 'lost', finished_ms = $2, cause = 'lost', detail = $3, split_request = NULL,
                       acked = $4, done_count = $5, result = $6, state_reruns = state_reruns + $7
                     WHERE id = $1",
                    &[
                        &id,
                        &now_ms,
                        &format!("{why}: {worker}"),
                        &json(&ledger.done),
                        &(ledger.done.len() as i64),
                        &result,
                        &((report.undone + forgotten) as i64),
                    ],
                )?;
            }
            if !dead.is_empty() {
                tx.execute(
                    "UPDATE workers SET state = 'exited', busy = 0, lease_until_ms = 0 WHERE id = ANY($1)",
                    &[&dead],
                )?;
            }
            // A fragment released with every item acked may have been its stage's last.
            drained.sort_unstable();
            drained.dedup();
            for stage in drained {
                settle(tx, stage, now_ms)?;
            }
            if !rows.is_empty() {
                notify(tx)?;
            }
            Ok(rows.len() as u64)
        })
    }

    fn status(&mut self, job: Option<&str>) -> Result<Vec<JobStatus>> {
        self.with_tx(|tx| {
            let jobs = tx.query(
                "SELECT id, name, state, created_ms, error FROM jobs WHERE $1::TEXT IS NULL OR name = $1 ORDER BY id",
                &[&job],
            )?;
            if let (Some(name), true) = (job, jobs.is_empty()) {
                return Err(StoreError::NoSuchJob(name.to_string()));
            }
            let mut out = Vec::new();
            for j in &jobs {
                let stages = stages_of(tx, j.get(0)).and_then(|stages| {
                    stages.iter().map(|stage| stage_status(tx, stage)).collect::<Result<Vec<_>>>()
                });
                let (mut state, mut error) = (job_state(j.get(2)), j.get::<_, Option<String>>(4));
                let stages = match stages {
                    Ok(stages) => stages,
                    // A job whose stored state cannot be read is shown broken; the
                    // others are shown as they are.
                    Err(StoreError::Corrupt(why)) => {
                        state = JobState::Broken;
                        error = Some(format!("its stored state cannot be read: {why}"));
                        Vec::new()
                    }
                    Err(e) => return Err(e),
                };
                out.push(JobStatus { name: j.get(1), state, created_ms: j.get(3), error, stages });
            }
            Ok(out)
        })
    }

    fn progress(&mut self, job: JobId) -> Result<Vec<StageProgress>> {
        self.with_tx(|tx| {
            tx.query(
                "SELECT s.items,
                        (SELECT coalesce(sum(done_count), 0)::BIGINT FROM fragments WHERE stage_id = s.id),
                        s.quarantined,
                        (SELECT n FROM fragments WHERE stage_id = s.id ORDER BY id DESC LIMIT 1)
                 FROM stages s WHERE s.job_id = $1 ORDER BY s.idx",
                &[&job.0],
            )?
            .iter()
            .map(|r| {
                Ok(StageProgress {
                    items: r.get::<_, i64>(0) as u64,
                    done: r.get::<_, i64>(1) as u64,
                    quarantined: parse::<IntervalSet>(r.get(2), "quarantined")?.len(),
                    fragment_size: r.get::<_, Option<i64>>(3).unwrap_or(0) as u64,
                })
            })
            .collect()
        })
    }

    fn worker_history(&mut self, now_ms: i64, since_ms: i64) -> Result<Vec<WorkerSpan>> {
        self.with_tx(|tx| history(tx, now_ms, since_ms))
    }

    fn workers(&mut self, now_ms: i64, window_ms: i64) -> Result<Vec<WorkerStatus>> {
        let rows = self.client()?.query(
            "SELECT w.id, w.host, w.state, w.class, w.slots, w.busy, w.lifespan_end_ms, w.heartbeat_ms,
                    (SELECT count(*) FROM fragments f WHERE f.worker = w.id AND f.state = 'done'),
                    w.cost, w.spot, w.resources
             FROM workers w
             WHERE w.heartbeat_ms >= $1 OR w.id IN (SELECT worker FROM fragments WHERE state = 'running')
             ORDER BY w.started_ms",
            &[&(now_ms - window_ms)],
        )?;
        Ok(rows
            .iter()
            .map(|r| WorkerStatus {
                id: r.get(0),
                host: r.get(1),
                state: r.get(2),
                class: r.get(3),
                slots: r.get::<_, i32>(4) as u32,
                busy: r.get::<_, i32>(5) as u32,
                lifespan_left_ms: r.get::<_, Option<i64>>(6).map(|end| end - now_ms),
                heartbeat_age_ms: now_ms - r.get::<_, i64>(7),
                fragments_done: r.get::<_, i64>(8) as u64,
                cost_per_hour: r.get(9),
                spot: r.get(10),
                resources: serde_json::from_str(r.get(11)).unwrap_or_default(),
            })
            .collect())
    }

    fn logs(&mut self, job: &str, stage: &str, fragment: Option<i64>) -> Result<Vec<FragmentLog>> {
        let rows = self.client()?.query(
            "SELECT f.id, f.start_idx, f.end_idx, f.state, f.cause, f.detail, f.stdout, f.stderr
             FROM fragments f JOIN stages s ON s.id = f.stage_id JOIN jobs j ON j.id = s.job_id
             WHERE j.name = $1 AND s.name = $2 AND ($3::BIGINT IS NULL OR f.id = $3) ORDER BY f.id",
            &[&job, &stage, &fragment],
        )?;
        Ok(rows
            .iter()
            .map(|r| FragmentLog {
                fragment: r.get(0),
                start: r.get::<_, i64>(1) as u64,
                end: r.get::<_, i64>(2) as u64,
                state: r.get(3),
                cause: r.get(4),
                detail: r.get(5),
                stdout: r.get::<_, Option<Vec<u8>>>(6).unwrap_or_default(),
                stderr: r.get::<_, Option<Vec<u8>>>(7).unwrap_or_default(),
            })
            .collect())
    }

    fn results(&mut self, job: &str, stage: &str) -> Result<Vec<ResultRow>> {
        let rows = self.client()?.query(
            "SELECT f.id, b.data, b.raw_len, b.hash, b.meta, b.covers
             FROM fragments f JOIN stages s ON s.id = f.stage_id JOIN jobs j ON j.id = s.job_id
               JOIN blobs b ON b.id = f.result
             WHERE j.name = $1 AND s.name = $2 ORDER BY f.start_idx, f.id",
            &[&job, &stage],
        )?;
        rows.iter()
            .map(|r| {
                Ok(ResultRow {
                    fragment: r.get(0),
                    blob: BlobRow {
                        data: r.get(1),
                        raw_len: r.get::<_, i64>(2) as u64,
                        hash: r.get(3),
                        meta: r.get(4),
                    },
                    covers: parse(r.get(5), "result covers")?,
                })
            })
            .collect()
    }

    fn accounting(&mut self, job: &str, stage: &str) -> Result<Accounting> {
        self.with_tx(|tx| {
            let row = tx
                .query_opt(
                    "SELECT s.id, s.quarantined FROM stages s JOIN jobs j ON j.id = s.job_id
                     WHERE j.name = $1 AND s.name = $2",
                    &[&job, &stage],
                )?
                .ok_or_else(|| StoreError::NoSuchJob(format!("{job}/{stage}")))?;
            let (id, quarantined): (i64, String) = (row.get(0), row.get(1));
            let mut acc = Accounting {
                quarantined: parse(&quarantined, "quarantined")?,
                ..Accounting::default()
            };
            for r in tx.query("SELECT start_idx, end_idx FROM pending WHERE stage_id = $1", &[&id])? {
                acc.pending.insert(Span::new(r.get::<_, i64>(0) as u64, r.get::<_, i64>(1) as u64));
            }
            for r in tx.query(
                "SELECT start_idx, end_idx, acked, state = 'running' FROM fragments WHERE stage_id = $1",
                &[&id],
            )? {
                let acked: IntervalSet = parse(r.get(2), "fragment acks")?;
                if r.get::<_, bool>(3) {
                    let span = Span::new(r.get::<_, i64>(0) as u64, r.get::<_, i64>(1) as u64);
                    acc.running.union_with(&acked.complement_within(span));
                }
                acc.done.union_with(&acked);
            }
            Ok(acc)
        })
    }

    fn checkpoint_before(&mut self, id: i64) -> Result<Option<i64>> {
        let client = self.client()?;
        if let Some(r) = client.query_opt("SELECT prev FROM blobs WHERE id = $1", &[&id])? {
            return Ok(r.get(0));
        }
        // Its record is gone: ask the fragment that wrote it what came before.
        let writer = client.query_opt(
            "SELECT id, resumed_from FROM fragments
             WHERE checkpoint_id = $1 AND resumed_from IS DISTINCT FROM $1 ORDER BY id LIMIT 1",
            &[&id],
        )?;
        let Some(w) = writer else { return Ok(None) };
        let (fragment, resumed_from): (i64, Option<i64>) = (w.get(0), w.get(1));
        let earlier: Option<i64> = client
            .query_one(
                "SELECT max(id) FROM blobs WHERE fragment_id = $1 AND id < $2",
                &[&fragment, &id],
            )?
            .get(0);
        Ok(earlier.or(resumed_from))
    }

    fn blob(&mut self, id: i64) -> Result<Option<StoredBlob>> {
        let row = self.client()?.query_opt(
            "SELECT data, raw_len, hash, meta, prev, covers FROM blobs WHERE id = $1",
            &[&id],
        )?;
        row.map(|r| {
            Ok(StoredBlob {
                row: BlobRow {
                    data: r.get(0),
                    raw_len: r.get::<_, i64>(1) as u64,
                    hash: r.get(2),
                    meta: r.get(3),
                },
                prev: r.get(4),
                covers: parse(r.get(5), "checkpoint covers")?,
            })
        })
        .transpose()
    }

    fn wait_for_work(&mut self, timeout: Duration) -> Result<bool> {
        let client = match self.client() {
            Ok(c) => c,
            Err(e) => {
                std::thread::sleep(timeout.min(Duration::from_millis(100)));
                return Err(e);
            }
        };
        let mut notifications = client.notifications();
        let mut got = false;
        // Drain what is there, then wait for one more only if there was nothing.
        while notifications.iter().next()?.is_some() {
            got = true;
        }
        if !got && !timeout.is_zero() {
            got = notifications.timeout_iter(timeout).next()?.is_some();
        }
        Ok(got)
    }

    fn idle_poll(&self) -> Duration {
        // Notifications wake idle workers; the poll is only a safety net.
        Duration::from_secs(2)
    }
}

/// One claim attempt; also says whether a range existed but was locked by others.
fn claim_once(tx: &mut Tx<'_, '_>, req: &ClaimRequest) -> Result<(Option<Assignment>, bool)> {
    let jobs: Vec<i64> = match req.job {
        Some(job) => tx
            .query(
                "SELECT id FROM jobs WHERE id = $1 AND state = 'running'",
                &[&job.0],
            )?
            .iter()
            .map(|r| r.get(0))
            .collect(),
        None => tx
            .query(
                "SELECT id FROM jobs WHERE state = 'running' ORDER BY id",
                &[],
            )?
            .iter()
            .map(|r| r.get(0))
            .collect(),
    };
    let mut contended = false;
    // Jobs by their highest stage priority, then oldest first. A job whose stored
    // state cannot be read breaks alone: the others go on.
    let mut keyed = Vec::with_capacity(jobs.len());
    for job in jobs {
        let stages = match stages_of(tx, job) {
            Ok(stages) => stages,
            Err(StoreError::Corrupt(why)) => {
                let halt = JobHalt::Broken(format!("its stored state cannot be read: {why}"));
                halt_job(tx, job, &halt, req.now_ms)?;
                continue;
            }
            Err(e) => return Err(e),
        };
        let top = stages.iter().map(|s| s.needs.priority).max().unwrap_or(0);
        keyed.push((-top, job, stages));
    }
    keyed.sort_by_key(|(top, job, _)| (*top, *job));
    for (_, job, stages) in keyed {
        match claim_in_job(tx, req, job, &stages) {
            Ok((Some(a), _)) => return Ok((Some(a), false)),
            Ok((None, busy)) => contended |= busy,
            Err(StoreError::Corrupt(why)) => {
                let halt = JobHalt::Broken(format!("its stored state cannot be read: {why}"));
                halt_job(tx, job, &halt, req.now_ms)?;
            }
            Err(e) => return Err(e),
        }
    }
    Ok((None, contended))
}

/// Tries the ready stages of one job in placement order; claims from the first
/// that has an admitted range; also says whether a range existed but was locked.
fn claim_in_job(
    tx: &mut Tx<'_, '_>,
    req: &ClaimRequest,
    job: i64,
    stages: &[StageRow],
) -> Result<(Option<Assignment>, bool)> {
    let mut contended = false;
    let ready = ready_in_order(tx, req, job, stages)?;
    let strict = Admission::strict(&req.offer);
    let mut relaxed: Option<Admission> = None;
    for stage in ready {
        let mut row = pending_row(tx, stage.id, &strict)?;
        if row.is_none() {
            // Ranges held back for better placed workers: only while one is alive.
            let admission = match relaxed {
                Some(a) => a,
                None => {
                    let (memory, on_demand) = alive_capacity(tx, req)?;
                    *relaxed.insert(strict.relaxed(memory, on_demand))
                }
            };
            if admission != strict {
                row = pending_row(tx, stage.id, &admission)?;
            }
        }
        let Some(row) = row else {
            let any: bool = tx
                .query_one(
                    "SELECT EXISTS (SELECT 1 FROM pending WHERE stage_id = $1)",
                    &[&stage.id],
                )?
                .get(0);
            contended |= any;
            continue;
        };
        if let Some(a) = claim_range(tx, req, job, stage, &row)? {
            return Ok((Some(a), false));
        }
    }
    Ok((None, contended))
}

/// The job's stages this worker could take from now, in the order it should try
/// them (core's `placement_order`, with the deadline plan when a ready stage has a
/// deadline); never a stage whose slots need more than the worker has.
fn ready_in_order<'a>(
    tx: &mut Tx<'_, '_>,
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
    let created: i64 = tx
        .query_one("SELECT created_ms FROM jobs WHERE id = $1", &[&job])?
        .get(0);
    let mut views = Vec::with_capacity(stages.len());
    for stage in stages {
        views.push(read_view(tx, stage, is_ready(stage), created)?);
    }
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

/// What placement reads of a stage: running fragments, work left (pending and
/// running unacked: neither done nor quarantined), checkpoints, learned costs.
fn read_view(
    tx: &mut Tx<'_, '_>,
    stage: &StageRow,
    ready: bool,
    created: i64,
) -> Result<StageView> {
    let r = tx.query_one(
        "SELECT (SELECT count(*) FROM fragments WHERE stage_id = $1 AND state = 'running'),
                (SELECT coalesce(sum(end_idx - start_idx), 0)::BIGINT FROM pending WHERE stage_id = $1)
              + (SELECT coalesce(sum(end_idx - start_idx - done_count), 0)::BIGINT
                   FROM fragments WHERE stage_id = $1 AND state = 'running'),
                EXISTS (SELECT 1 FROM blobs WHERE stage_id = $1 AND kind = 'checkpoint')",
        &[&stage.id],
    )?;
    let sizers = tx
        .query(
            "SELECT class, state FROM sizers WHERE stage_id = $1",
            &[&stage.id],
        )?
        .iter()
        .map(|s| (s.get(0), s.get(1)))
        .collect();
    let reading = StageReading {
        running: r.get(0),
        left: r.get(1),
        checkpoints: r.get(2),
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
fn live_pool_of(tx: &mut Tx<'_, '_>, req: &ClaimRequest) -> Result<Vec<PoolClass>> {
    let rows = tx
        .query(
            "SELECT class, slots::BIGINT, cost FROM workers
             WHERE state = 'running' AND heartbeat_ms >= $1",
            &[&(req.now_ms - req.lease_ms)],
        )?
        .iter()
        .map(|r| (r.get(0), r.get(1), r.get(2)))
        .collect();
    let ahead = history(
        tx,
        req.now_ms,
        req.now_ms - granule_core::FORECAST_WINDOW_MS,
    )?;
    Ok(live_pool(rows, &ahead, req.now_ms))
}

/// The first pending range of a stage that `admission` lets the worker take,
/// locked (ranges others hold locked are skipped).
fn pending_row(
    tx: &mut Tx<'_, '_>,
    stage: i64,
    admission: &Admission,
) -> Result<Option<postgres::Row>> {
    let below = i64::try_from(admission.below_floor_mb).unwrap_or(i64::MAX);
    let lost = i32::try_from(admission.lost_under).unwrap_or(i32::MAX);
    tx.query_opt(
        "SELECT id, start_idx, end_idx, failures, checkpoint_id, lost, floor_memory_mb, covers FROM pending
         WHERE stage_id = $1 AND (floor_memory_mb = 0 OR floor_memory_mb < $2) AND lost < $3
         ORDER BY start_idx LIMIT 1 FOR UPDATE SKIP LOCKED",
        &[&stage, &below, &lost],
    )
}

/// The largest memory (MiB) among live workers, and whether a live one is on-demand.
fn alive_capacity(tx: &mut Tx<'_, '_>, req: &ClaimRequest) -> Result<(u64, bool)> {
    let rows = tx.query(
        "SELECT spot, resources FROM workers WHERE state = 'running' AND heartbeat_ms >= $1",
        &[&(req.now_ms - req.lease_ms)],
    )?;
    let memory = rows.iter().map(|r| memory_of(r.get(1))).max().unwrap_or(0);
    Ok((memory, rows.iter().any(|r| !r.get::<_, bool>(0))))
}

/// Lives of the workers alive since `since_ms` (see `Store::worker_history`).
fn history(tx: &mut Tx<'_, '_>, now_ms: i64, since_ms: i64) -> Result<Vec<WorkerSpan>> {
    let rows = tx.query(
        "SELECT w.class, w.spot, w.slots::BIGINT, w.started_ms, w.heartbeat_ms, w.state,
                w.id IN (SELECT worker FROM fragments WHERE state = 'lost' AND finished_ms >= $1)
         FROM workers w WHERE w.state != 'exited' OR w.heartbeat_ms >= $1",
        &[&since_ms],
    )?;
    Ok(rows
        .iter()
        .map(|r| {
            let row = HistoryRow {
                class: r.get(0),
                spot: r.get(1),
                slots: r.get(2),
                started_ms: r.get(3),
                heard_ms: r.get(4),
                state: r.get(5),
                lost: r.get(6),
            };
            worker_span(now_ms, row)
        })
        .collect())
}

/// Carves a fragment from a locked pending range.
fn claim_range(
    tx: &mut Tx<'_, '_>,
    req: &ClaimRequest,
    job: i64,
    stage: &StageRow,
    row: &postgres::Row,
) -> Result<Option<Assignment>> {
    let (range_id, start, end): (i64, i64, i64) = (row.get(0), row.get(1), row.get(2));
    let range = PendingRange {
        span: Span::new(start as u64, end as u64),
        failures: row.get::<_, i32>(3) as u32,
        checkpoint: row.get(4),
        lost: row.get::<_, i32>(5) as u32,
        floor_memory_mb: row.get::<_, i64>(6) as u64,
        covers: parse(row.get(7), "pending covers")?,
    };
    // Items left and live slots, for tail factoring.
    let counts = tx.query_one(
        "SELECT (SELECT coalesce(sum(end_idx - start_idx), 0)::BIGINT FROM pending WHERE stage_id = $1),
                (SELECT coalesce(sum(slots), 0)::BIGINT FROM workers WHERE state != 'exited' AND heartbeat_ms >= $2)",
        &[&stage.id, &(req.now_ms - req.lease_ms)],
    )?;
    let (remaining, slots): (i64, i64) = (counts.get(0), counts.get(1));
    let slots = (slots as u32).max(req.slots);
    let (mut sizer, locked) = sizer_for(tx, stage.id, &req.class)?;
    let ctx = claim_context(
        &req.context,
        req.expected_life_ms,
        stage.acks == Acks::Yes,
        remaining as u64,
        slots,
    );
    let sizing = sizer.size(&stage.sizer_config, &ctx);
    let n = req.max_items.map_or(sizing.n, |max| sizing.n.min(max));
    if n == 0 {
        return Ok(None);
    }
    let take = take_from(tx, stage.id, range_id, &range, n)?;
    let span = Span::new(range.span.start, range.span.start + take);
    let predicted_ms = sizer.model.predict_at_load_ms(take, ctx.load_per_cpu);
    let cap = if take < sizing.n {
        SizeCap::Bounds
    } else {
        sizing.cap
    };
    let lease_expires = tx.lease_clock(req.now_ms + req.lease_ms);
    let id: i64 = tx
        .query_one(
            "INSERT INTO fragments (stage_id, start_idx, end_idx, state, worker, class, lease_expires_ms, failures,
              checkpoint_id, n, predicted_ms, size_cap, claimed_ms, lost, floor_memory_mb, resumed_from, covers,
              inherited)
             VALUES ($1, $2, $3, 'running', $4, $5, $6, $7, $8, $9, $10, $11, $12, $13, $14, $8, $15, $15)
             RETURNING id",
            &[
                &stage.id,
                &(span.start as i64),
                &(span.end as i64),
                &req.worker,
                &req.class,
                &lease_expires,
                &(range.failures as i32),
                &range.checkpoint,
                &(take as i64),
                &predicted_ms,
                &json(&cap).trim_matches('"'),
                &req.now_ms,
                &(range.lost as i32),
                &(range.floor_memory_mb as i64),
                &json(&range.covers),
            ],
        )?
        .get(0);
    if locked {
        save_sizer(tx, stage.id, &req.class, &sizer)?;
    }
    if stage.state == "waiting" {
        tx.execute(
            "UPDATE stages SET state = 'running' WHERE id = $1 AND state = 'waiting'",
            &[&stage.id],
        )?;
    }
    let expect_acks = stage.acks.expected();
    Ok(Some(Assignment {
        fragment: FragmentId(id),
        job: JobId(job),
        stage: StageId(stage.id),
        stage_index: stage.idx,
        span,
        failures: range.failures,
        checkpoint: range.checkpoint,
        n: take,
        predicted_ms,
        cap,
        item_cost_ms: sizer.model.b_ms,
        overhead_ms: sizer.model.a_ms,
        size_fit: sizer.model.size.line(),
        expect_acks,
        needs: stage.needs.clone(),
    }))
}

/// Takes `n` items from the front of a locked pending range and, while that is not
/// enough, from the ranges that follow it without a gap (if no one else holds
/// them); returns how many were taken. Ranges with a history never merge.
fn take_from(
    tx: &mut Tx<'_, '_>,
    stage: i64,
    first_id: i64,
    first: &PendingRange,
    n: u64,
) -> Result<u64> {
    let (mut id, mut span, mut taken) = (first_id, first.span, 0);
    loop {
        let here = (n - taken).min(span.len());
        taken += here;
        if here == span.len() {
            tx.execute("DELETE FROM pending WHERE id = $1", &[&id])?;
        } else {
            tx.execute(
                "UPDATE pending SET start_idx = $2, checkpoint_id = NULL, covers = '[]' WHERE id = $1",
                &[&id, &((span.start + here) as i64)],
            )?;
            return Ok(taken);
        }
        let history = first.failures > 0 || first.lost > 0 || first.floor_memory_mb > 0;
        if taken == n || history || first.checkpoint.is_some() {
            return Ok(taken);
        }
        let next = tx.query_opt(
            "SELECT id, end_idx FROM pending
             WHERE stage_id = $1 AND start_idx = $2 AND failures = 0 AND checkpoint_id IS NULL
               AND lost = 0 AND floor_memory_mb = 0
             FOR UPDATE SKIP LOCKED",
            &[&stage, &(span.end as i64)],
        )?;
        let Some(row) = next else { return Ok(taken) };
        id = row.get(0);
        span = Span::new(span.end, row.get::<_, i64>(1) as u64);
    }
}

fn stage_status(tx: &mut Tx<'_, '_>, stage: &StageRow) -> Result<StageStatus> {
    let r = tx.query_one(
        "SELECT coalesce(sum(done_count), 0)::BIGINT,
                coalesce(sum(end_idx - start_idx - done_count) FILTER (WHERE state = 'running'), 0)::BIGINT,
                count(*) FILTER (WHERE state = 'running'),
                count(*),
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
                coalesce(sum(results_missing) FILTER (WHERE state = 'done'), 0)::BIGINT
         FROM fragments WHERE stage_id = $1",
        &[&stage.id],
    )?;
    let rows: Vec<DoneRow> = tx
        .query(
            "SELECT class, end_idx - start_idx, predicted_ms, coalesce(observed_ms, 0), coalesce(cpu_ms, 0),
                    coalesce(peak_rss_kb, 0), io_bytes
             FROM fragments WHERE stage_id = $1 AND state = 'done' ORDER BY finished_ms, id",
            &[&stage.id],
        )?
        .iter()
        .map(|r| DoneRow {
            class: r.get(0),
            n: r.get::<_, i64>(1) as u64,
            predicted_ms: r.get(2),
            observed_ms: r.get(3),
            cpu_ms: r.get(4),
            peak_rss_kb: r.get::<_, i64>(5) as u64,
            io_bytes: r.get::<_, i64>(6) as u64,
        })
        .collect();
    let pairs: Vec<(f64, f64)> = rows
        .iter()
        .map(|r| (r.predicted_ms, r.observed_ms))
        .collect();
    let error = prediction_error(&pairs);
    let quarantined: IntervalSet = parse(r.get(13), "quarantined")?;
    let sizers = tx
        .query(
            "SELECT class, state FROM sizers WHERE stage_id = $1 ORDER BY class",
            &[&stage.id],
        )?
        .iter()
        .map(|s| {
            Ok((
                s.get::<_, String>(0),
                parse::<Sizer>(s.get(1), "sizer state")?,
            ))
        })
        .collect::<Result<Vec<_>>>()?;
    let sizer = busiest(&sizers);
    let (profile, profile_source) = stage_profile(&rows, &stage.needs);
    Ok(StageStatus {
        name: stage.name.clone(),
        state: stage_state(&stage.state),
        items: stage.items,
        done: r.get::<_, i64>(0) as u64,
        running: r.get::<_, i64>(1) as u64,
        pending: r.get::<_, i64>(11) as u64,
        quarantined: quarantined.len(),
        quarantined_items: quarantined.spans().map(|s| [s.start, s.end]).collect(),
        fragments: r.get::<_, i64>(3) as u64,
        running_fragments: r.get::<_, i64>(2) as u64,
        failed_fragments: r.get::<_, i64>(4) as u64,
        fragment_size: r.get::<_, Option<i64>>(10).unwrap_or(0) as u64,
        item_cost_us: sizer.model.b_ms * 1e3,
        overhead_ms: sizer.model.a_ms,
        target_ms: sizer.target_ms(&stage.sizer_config),
        yields: r.get::<_, i64>(5) as u64,
        lost: r.get::<_, i64>(6) as u64,
        splits: r.get::<_, i64>(7) as u64,
        checkpoint_fallbacks: r.get::<_, i64>(8) as u64,
        state_reruns: r.get::<_, i64>(14) as u64,
        results_missing: r.get::<_, i64>(15) as u64,
        checkpoints: r.get::<_, i64>(12) as u64,
        wasted_s: r.get::<_, f64>(9) / 1e3,
        prediction_error_median: error.0,
        prediction_error_p90: error.1,
        needs: stage.needs.clone(),
        classes: class_statuses(&rows, &sizers),
        profile,
        profile_source,
    })
}

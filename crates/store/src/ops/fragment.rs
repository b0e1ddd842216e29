//! A running fragment's life after its claim: flushes (acks, checkpoints, split
//! answers), splits asked for, its finish, and its release when its worker is gone.
//! Each holds the fragment's row and applies core's ledger transition to a
//! [`window`] of the stage: the fragment and the stage's flags.

use super::{data, halt_job, Backend, TxKind};
use crate::common::{
    accounted_outcome, decode_sizer_config, json, memory_of, parse, verdict, FOLLOWS_WORKER,
};
use crate::db::{args, Db};
use crate::{
    Acks, Assignment, ClaimRequest, Finished, FlushReply, FragmentEnd, FragmentFlush, Heartbeat,
    JobHalt, Result, SplitAnswer,
};
use granule_core::{
    retry_budget, split_gain, split_point, split_share, FinishOutcome, FinishReport, FragmentId,
    IntervalSet, ItemOutputs, JobId, Observation, Output, PendingRange, RunningFragment, SizeCap,
    Sizer, Span, StageLedger,
};

/// A running fragment, locked for this transaction, as long as `worker` holds it.
pub(crate) struct HeldFragment {
    stage: i64,
    fragment: RunningFragment,
    class: String,
    size_cap: SizeCap,
    /// What its stage knew of acks when read (without a lock).
    acks: Acks,
    /// Whether that was `yes`.
    acking: bool,
    /// Whether its stage was known to keep state when read (without a lock).
    stateful: bool,
    /// Whether its job still runs (not cancelled, refused or broken).
    job_running: bool,
    /// Its stage's retries.
    retries: u32,
    /// Its stage's sizer config.
    sizer_config: granule_core::SizerConfig,
    /// Its class's sizer, as a finish found it.
    sizer: SizerHeld,
    /// Its stage's pending rows when a finish held it (other holds: none read).
    pending: Option<i64>,
    /// Whether its stage has published outputs.
    published: bool,
    /// Its job.
    job: i64,
    /// Its stage's name.
    stage_name: String,
}

/// The sizer of a held fragment's class, as a finish found it (other holds say
/// `Busy`: they never learn).
enum SizerHeld {
    /// Its stored state; this transaction holds its row lock.
    Locked(String),
    /// Another transaction holds it: this finish does not learn (under contention
    /// the model learns from a sample of fragments).
    Busy,
    /// The stage has no sizer of this class yet.
    Missing,
}

/// What a hold reads, with `$extra` columns, row locked.
macro_rules! held_sql {
    ($extra:literal) => {
        concat!(
            "SELECT f.stage_id, f.start_idx, f.end_idx, f.acked, f.failures, f.checkpoint_id, f.class,
                    f.size_cap, f.lost, f.floor_memory_mb, f.covers, f.inherited, f.resumed_from,
                    s.acks, s.stateful, j.state = 'running', s.retries, s.sizer_config,
                    s.published > 0, s.job_id, s.name",
            $extra,
            " FROM fragments f JOIN stages s ON s.id = f.stage_id JOIN jobs j ON j.id = s.job_id
             WHERE f.id = $1 AND f.worker = $2 AND f.state = 'running' FOR UPDATE OF f"
        )
    };
}

/// The running fragment `id` as long as `worker` holds it, row locked.
fn hold(tx: &mut dyn Db, id: FragmentId, worker: &str) -> Result<Option<HeldFragment>> {
    hold_with(tx, held_sql!(""), id, worker, false)
}

/// As [`hold`], for a finish: also locks its class's sizer if that is free (the
/// finish learns from it) and counts its stage's pending rows (for [`settle_seen`]),
/// in the same round trip.
fn hold_to_finish(tx: &mut dyn Db, id: FragmentId, worker: &str) -> Result<Option<HeldFragment>> {
    const SQL: &str = held_sql!(
        ", (SELECT l.state FROM sizers l WHERE l.stage_id = f.stage_id AND l.class = f.class
            FOR UPDATE SKIP LOCKED),
           EXISTS (SELECT 1 FROM sizers l WHERE l.stage_id = f.stage_id AND l.class = f.class),
           (SELECT count(*) FROM pending p WHERE p.stage_id = f.stage_id)"
    );
    hold_with(tx, SQL, id, worker, true)
}

/// A hold by `sql`, which reads the sizer's two columns and the pending count after
/// the others if `sizer`.
fn hold_with(
    tx: &mut dyn Db,
    sql: &str,
    id: FragmentId,
    worker: &str,
    sizer: bool,
) -> Result<Option<HeldFragment>> {
    let row = tx.query_opt(sql, args![id.0, worker])?;
    let Some(r) = row else { return Ok(None) };
    let acks: Acks = r.str(13).parse()?;
    Ok(Some(HeldFragment {
        stage: r.i64(0),
        fragment: RunningFragment {
            id,
            span: Span::new(r.u64(1), r.u64(2)),
            acked: parse(r.str(3), "fragment acks")?,
            failures: r.u32(4),
            checkpoint: r.opt_i64(5),
            lost: r.u32(8),
            floor_memory_mb: r.u64(9),
            covers: parse(r.str(10), "fragment covers")?,
            inherited: parse(r.str(11), "fragment inherited state")?,
            resumed_from: r.opt_i64(12),
        },
        class: r.string(6),
        // A cap word this version does not know sized nothing it can learn from.
        size_cap: serde_json::from_value(r.str(7).into()).unwrap_or(SizeCap::Bounds),
        acks,
        acking: acks == Acks::Yes,
        stateful: r.bool(14),
        job_running: r.bool(15),
        retries: r.u32(16),
        sizer_config: decode_sizer_config(r.str(17))?,
        sizer: match sizer {
            true if !r.bool(22) => SizerHeld::Missing,
            true => r.opt_string(21).map_or(SizerHeld::Busy, SizerHeld::Locked),
            false => SizerHeld::Busy,
        },
        pending: sizer.then(|| r.i64(23)),
        published: r.bool(18),
        job: r.i64(19),
        stage_name: r.string(20),
    }))
}

/// The ledger a transition on a held fragment runs on: just that fragment. Its
/// `done` (the items this fragment's row counts) and `pending` are what changed.
/// Items other rows count are undone with [`undo_done`]; the stage's first ack is
/// handled by [`learn_acking`], its first checkpoint by [`learn_stateful`].
fn window(held: &HeldFragment) -> StageLedger {
    StageLedger::window(
        Vec::new(),
        Some(held.fragment.clone()),
        held.acking,
        held.stateful,
    )
}

/// Whether the stage's tasks are known to ack and to keep state, read under the
/// stage row's lock: a finish that counts items with no state (or an all-or-nothing
/// fragment) and a flush that brings the stage's first checkpoint or first ack see
/// each other. The lock is exclusive, not shared: a finish may go on to lock the
/// row for update (a quarantine, the stage's end), and two share holders that both
/// upgrade deadlock.
fn flags_locked(tx: &mut dyn Db, stage: i64) -> Result<(bool, bool)> {
    let r = tx.query_one(
        "SELECT acks = 'yes', stateful FROM stages WHERE id = $1 FOR UPDATE",
        args![stage],
    )?;
    Ok((r.bool(0), r.bool(1)))
}

/// Resets the finished fragments of `stage` that `filter` picks (SQL over `f`) to
/// count nothing, with `state` set as given; returns the items they counted.
fn revert_counted(tx: &mut dyn Db, stage: i64, filter: &str, set: &str) -> Result<IntervalSet> {
    let rows = tx.query(
        &format!(
            "SELECT id, acked FROM fragments f WHERE f.stage_id = $1 AND {filter} FOR UPDATE OF f"
        ),
        args![stage],
    )?;
    let mut items = IntervalSet::new();
    for r in &rows {
        items.union_with(&parse::<IntervalSet>(r.str(1), "fragment acks")?);
    }
    // Exactly the rows read (and locked): one committed since is not reverted
    // without its items.
    let ids: Vec<i64> = rows.iter().map(|r| r.i64(0)).collect();
    if !ids.is_empty() {
        tx.execute(
            &format!(
                "UPDATE fragments SET {set} acked = '[]', done_count = 0, unconfirmed = false
                 WHERE id = ANY($1)"
            ),
            args![&ids],
        )?;
    }
    Ok(items)
}

/// The stage's first checkpoint: items finished fragments counted done with no
/// state go back to pending (their state, if any, is nowhere).
fn learn_stateful(tx: &mut dyn Db, stage: i64) -> Result<bool> {
    let stateful = tx
        .query_one(
            "SELECT stateful FROM stages WHERE id = $1 FOR UPDATE",
            args![stage],
        )?
        .bool(0);
    if stateful {
        return Ok(false);
    }
    let reverted = revert_counted(tx, stage, "f.state != 'running' AND f.done_count > 0", "")?;
    let fresh: Vec<PendingRange> = reverted.spans().map(PendingRange::fresh).collect();
    insert_pending(tx, stage, &fresh)?;
    tx.execute(
        "UPDATE stages SET stateful = true WHERE id = $1",
        args![stage],
    )?;
    Ok(!fresh.is_empty())
}

/// The stage's first ack: every item an all-or-nothing fragment counted done goes
/// back to pending (no ack vouches for it), and from now on no ack is a failure.
fn learn_acking(tx: &mut dyn Db, stage: i64) -> Result<bool> {
    let acks: Acks = tx
        .query_one(
            "SELECT acks FROM stages WHERE id = $1 FOR UPDATE",
            args![stage],
        )?
        .str(0)
        .parse()?;
    if acks == Acks::Yes {
        return Ok(false);
    }
    let items = revert_counted(
        tx,
        stage,
        "f.unconfirmed",
        "state = 'reverted', result = NULL,",
    )?;
    let ranges: Vec<PendingRange> = items.spans().map(PendingRange::fresh).collect();
    insert_pending(tx, stage, &ranges)?;
    tx.execute("UPDATE stages SET acks = 'yes' WHERE id = $1", args![stage])?;
    Ok(!ranges.is_empty())
}

/// Items other fragments' rows count done go back to pending: their state was
/// lost with a checkpoint that could not be restored.
fn undo_done(tx: &mut dyn Db, stage: i64, lost: &IntervalSet) -> Result<()> {
    let (Some(first), Some(last)) = (lost.first(), lost.spans().last().map(|s| s.end)) else {
        return Ok(());
    };
    let rows = tx.query(
        "SELECT id, acked FROM fragments
         WHERE stage_id = $1 AND state != 'running' AND done_count > 0 AND start_idx < $3 AND end_idx > $2
         FOR UPDATE",
        args![stage, first, last],
    )?;
    for r in &rows {
        let mut acked: IntervalSet = parse(r.str(1), "fragment acks")?;
        if !acked.intersects(lost) {
            continue;
        }
        acked.subtract(lost);
        tx.execute(
            "UPDATE fragments SET acked = $2, done_count = $3 WHERE id = $1",
            args![r.i64(0), &json(&acked), acked.len()],
        )?;
    }
    Ok(())
}

/// Items whose state is gone run again: other rows' counts are undone and the items
/// go back to pending.
fn rerun(tx: &mut dyn Db, stage: i64, items: &IntervalSet) -> Result<()> {
    undo_done(tx, stage, items)?;
    let fresh: Vec<PendingRange> = items.spans().map(PendingRange::fresh).collect();
    insert_pending(tx, stage, &fresh)
}

/// The result a finish ended a chain with, if its checkpoint is still there; if it
/// is gone, the items it held run again (this fragment's through `ledger`, other
/// rows' here). Returns the result and how many items run again.
fn kept_result(
    tx: &mut dyn Db,
    stage: i64,
    ledger: &mut StageLedger,
    report: &FinishReport,
) -> Result<(Option<i64>, u64)> {
    let Some((blob, covers)) = &report.result else {
        return Ok((None, 0));
    };
    if tx
        .query_opt("SELECT 1 FROM blobs WHERE id = $1", args![blob])?
        .is_some()
    {
        return Ok((Some(*blob), 0));
    }
    let mine = covers.intersection(&ledger.done);
    let others = covers.difference(&mine);
    rerun(tx, stage, &others)?;
    Ok((None, ledger.forget(&mine) + others.len()))
}

/// Adds pending rows.
pub(crate) fn insert_pending(tx: &mut dyn Db, stage: i64, ranges: &[PendingRange]) -> Result<()> {
    for r in ranges {
        write_range(
            tx,
            "INSERT INTO pending (stage_id, start_idx, end_idx, failures, checkpoint_id, lost, floor_memory_mb, covers)
             VALUES ($1, $2, $3, $4, $5, $6, $7, $8)",
            stage,
            r,
        )?;
    }
    Ok(())
}

/// Writes (deferred: nobody reads its count) `sql`, an insert or update of a pending
/// row, with `key` as `$1` and the range's columns as `$2` to `$8`.
pub(crate) fn write_range(tx: &mut dyn Db, sql: &str, key: i64, r: &PendingRange) -> Result<()> {
    tx.defer(
        sql,
        args![
            key,
            r.span.start,
            r.span.end,
            r.failures,
            r.checkpoint,
            r.lost,
            r.floor_memory_mb,
            &json(&r.covers),
        ],
    )
}

/// A restored checkpoint (or none) replaces the state the fragment inherited: the
/// items of the lost state run again. Returns whether work appeared.
fn apply_restore(
    tx: &mut dyn Db,
    held: &HeldFragment,
    ledger: &mut StageLedger,
    fragment: FragmentId,
    restored: Option<i64>,
) -> Result<bool> {
    let covers = match restored {
        Some(blob) => match tx.query_opt("SELECT covers FROM blobs WHERE id = $1", args![blob])? {
            Some(r) => parse(r.str(0), "checkpoint covers")?,
            None => IntervalSet::new(),
        },
        None => IntervalSet::new(),
    };
    // The lost state's items are counted on the rows of earlier attempts: they are
    // undone there (the window holds only this fragment's own).
    let before = ledger
        .fragment(fragment)
        .map(|r| r.inherited.clone())
        .unwrap_or_default();
    ledger.fallback(fragment, restored, &covers);
    let lost = before.difference(&covers);
    if lost.is_empty() {
        return Ok(false);
    }
    rerun(tx, held.stage, &lost)?;
    tx.execute(
        "UPDATE fragments SET state_reruns = state_reruns + $2 WHERE id = $1",
        args![fragment.0, lost.len()],
    )?;
    Ok(true)
}

/// Stores a flush's checkpoints as blobs, each chained to the one before.
fn store_checkpoints(
    tx: &mut dyn Db,
    held: &HeldFragment,
    ledger: &mut StageLedger,
    f: &FragmentFlush,
    now_ms: i64,
) -> Result<()> {
    for cp in &f.checkpoints {
        let Some(covers) = ledger.checkpoint_covers(f.fragment, &cp.acked) else {
            continue;
        };
        let prev = ledger.fragment(f.fragment).and_then(|r| r.checkpoint);
        let b = &cp.blob;
        let id = tx
            .query_one(
                "INSERT INTO blobs (stage_id, fragment_id, kind, raw_len, hash, data, meta, created_ms, prev, covers)
                 VALUES ($1, $2, 'checkpoint', $3, $4, $5, $6, $7, $8, $9) RETURNING id",
                args![
                    held.stage,
                    f.fragment.0,
                    b.raw_len,
                    &b.hash,
                    &b.data,
                    &b.meta,
                    now_ms,
                    prev,
                    &json(&covers),
                ],
            )?
            .i64(0);
        ledger.checkpoint(f.fragment, id, &cp.acked);
    }
    Ok(())
}

/// Applies acks, checkpoints and a split answer to a held fragment; returns the
/// items newly done and whether pending work appeared.
fn apply_flush(
    tx: &mut dyn Db,
    held: &HeldFragment,
    ledger: &mut StageLedger,
    f: &FragmentFlush,
    now_ms: i64,
) -> Result<(u64, bool)> {
    let mut appeared = false;
    let outputs_with_state =
        !f.outputs.is_empty() && (ledger.stateful || !f.checkpoints.is_empty());
    if outputs_with_state || (!f.checkpoints.is_empty() && held.published) {
        // A stateful stage's acks can be undone (a lost checkpoint, its first
        // checkpoint), and a published output cannot: the task is wrong for this
        // stage, said once, with nothing of this flush applied.
        let why = format!(
            "stage {}: its tasks wrote both outputs and checkpoints; a stage's tasks do one or the other (a combining stage takes results with items = {{ results_of = \"{}\" }})",
            held.stage_name, held.stage_name
        );
        halt_job(tx, held.job, &JobHalt::Refused(why), now_ms)?;
        return Ok((0, false));
    }
    if let Some(restored) = f.restored {
        appeared |= apply_restore(tx, held, ledger, f.fragment, restored)?;
    }
    if !f.acked.is_empty() && !ledger.acking {
        appeared |= learn_acking(tx, held.stage)?;
        ledger.acking = true;
    }
    // What the fragment had acked, read only when there are outputs to publish.
    let before = (!f.outputs.is_empty())
        .then(|| ledger.fragment(f.fragment).map(|x| x.acked.clone()))
        .flatten();
    let done = ledger.ack(f.fragment, &f.acked).done;
    if !f.outputs.is_empty() {
        // Only the items this flush counted publish: an item acked before (a rerun
        // after a lost flush, a repeated flush) published its outputs then.
        let now = ledger.fragment(f.fragment).map(|x| x.acked.clone());
        let new = now
            .unwrap_or_default()
            .difference(&before.unwrap_or_default());
        let items = f
            .outputs
            .iter()
            .filter(|o| new.contains(o.item))
            .cloned()
            .collect();
        appeared |= data::publish(tx, held.stage, f.fragment.0, data::OUTPUTS, items)?;
    }
    if !f.checkpoints.is_empty() && !ledger.stateful {
        appeared |= learn_stateful(tx, held.stage)?;
        ledger.stateful = true;
    }
    store_checkpoints(tx, held, ledger, f, now_ms)?;
    if let Some(answer) = f.split {
        if let SplitAnswer::At(at) = answer {
            if ledger.split(f.fragment, at) > 0 {
                let tail = std::mem::take(&mut ledger.pending);
                insert_pending(tx, held.stage, tail.ranges())?;
                tx.execute(
                    "UPDATE fragments SET splits = splits + 1 WHERE id = $1",
                    args![f.fragment.0],
                )?;
                appeared = true;
            }
        }
        tx.execute(
            "UPDATE fragments SET split_request = NULL WHERE id = $1",
            args![f.fragment.0],
        )?;
    }
    Ok((done, appeared))
}

fn save_fragment(tx: &mut dyn Db, ledger: &StageLedger, id: FragmentId) -> Result<()> {
    if let Some(f) = ledger.fragment(id) {
        tx.execute(
            "UPDATE fragments SET end_idx = $2, acked = $3, done_count = $4, checkpoint_id = $5, covers = $6,
               inherited = $7, resumed_from = $8 WHERE id = $1",
            args![
                id.0,
                f.span.end,
                &json(&f.acked),
                f.acked.len(),
                f.checkpoint,
                &json(&f.covers),
                &json(&f.inherited),
                f.resumed_from,
            ],
        )?;
    }
    Ok(())
}

/// A new sizer row of (stage, class), unless another transaction made one first;
/// its stored text, and whether this transaction made it (and so holds its lock).
/// It starts from what earlier stages of the same task learned on this class.
fn create_sizer(tx: &mut dyn Db, stage: i64, class: &str) -> Result<(String, bool)> {
    let learned = tx.query_opt(
        "SELECT l.sizer FROM learned l JOIN stages s ON s.cost_key = l.cost_key
          WHERE s.id = $1 AND l.class = $2 AND s.cost_key != ''",
        args![stage, class],
    )?;
    let sizer = match learned {
        Some(row) => Sizer::from_history(parse(&row.string(0), "learned sizer")?),
        None => Sizer::default(),
    };
    let text = json(&sizer);
    let created = tx.execute(
        "INSERT INTO sizers (stage_id, class, state) VALUES ($1, $2, $3) ON CONFLICT DO NOTHING",
        args![stage, class, &text],
    )?;
    Ok((text, created == 1))
}

/// The sizer of (stage, class) as stored, and its stored text, without a lock: a
/// claim only reads it (sizing changes nothing but a new sizer's first step).
pub(crate) fn sizer_read(tx: &mut dyn Db, stage: i64, class: &str) -> Result<(Sizer, String)> {
    let row = tx.query_opt(
        "SELECT state FROM sizers WHERE stage_id = $1 AND class = $2",
        args![stage, class],
    )?;
    let text = match row {
        Some(r) => r.string(0),
        None => create_sizer(tx, stage, class)?.0,
    };
    Ok((parse(&text, "sizer state")?, text))
}

/// Writes a sizer a claim changed, unless another transaction changed it first
/// (what it wrote is as good).
pub(crate) fn save_sizer_if(
    tx: &mut dyn Db,
    stage: i64,
    class: &str,
    sizer: &Sizer,
    was: &str,
) -> Result<()> {
    let now = json(sizer);
    if now != was {
        tx.defer(
            "UPDATE sizers SET state = $3 WHERE stage_id = $1 AND class = $2 AND state = $4",
            args![stage, class, &now, was],
        )?;
    }
    Ok(())
}

/// Writes a sizer state back (its row lock is held).
pub(crate) fn save_sizer(tx: &mut dyn Db, stage: i64, class: &str, sizer: &Sizer) -> Result<()> {
    tx.defer(
        "UPDATE sizers SET state = $3 WHERE stage_id = $1 AND class = $2",
        args![stage, class, &json(sizer)],
    )?;
    Ok(())
}

fn count(tx: &mut dyn Db, sql: &str, id: i64) -> Result<i64> {
    Ok(tx.query_one(sql, args![id])?.i64(0))
}

/// Keeps what a finished stage's sizers learned, per class, for later stages of
/// the same task (`learned`, keyed by the stage's cost key). A sizer that never
/// left slow start has nothing worth keeping and leaves an older model in place.
fn keep_learned(tx: &mut dyn Db, stage: i64, now_ms: i64) -> Result<()> {
    let rows = tx.query(
        "SELECT s.class, s.state, st.cost_key FROM sizers s JOIN stages st ON st.id = s.stage_id
          WHERE s.stage_id = $1 AND st.cost_key != ''",
        args![stage],
    )?;
    for row in rows {
        let sizer: Sizer = parse(&row.string(1), "sizer state")?;
        if !sizer.model.ready() {
            continue;
        }
        tx.execute(
            "INSERT INTO learned (cost_key, class, sizer, updated_ms) VALUES ($1, $2, $3, $4)
             ON CONFLICT (cost_key, class) DO UPDATE SET sizer = excluded.sizer, updated_ms = excluded.updated_ms",
            args![&row.string(2), &row.string(0), &row.string(1), now_ms],
        )?;
    }
    Ok(())
}

/// Marks the stage done if nothing of it is pending or running, and its job once
/// every stage is. The stage row lock makes two last finishers see each other.
fn settle(tx: &mut dyn Db, stage: i64, now_ms: i64) -> Result<bool> {
    const PENDING: &str = "SELECT count(*) FROM pending WHERE stage_id = $1";
    let pending = count(tx, PENDING, stage)?;
    settle_seen(tx, stage, now_ms, pending)
}

/// [`settle`], given a count of the stage's pending rows this transaction read
/// earlier (a finish reads it with its hold: no round trip of its own). A count
/// too low only costs the recount under the stage's lock; one gone stale high (a
/// claimer took and ended that work since) leaves the stage to the next
/// [`release`], which settles stranded stages.
fn settle_seen(tx: &mut dyn Db, stage: i64, now_ms: i64, pending: i64) -> Result<bool> {
    if pending > 0 {
        return Ok(false);
    }
    let r = tx.query_one(
        "SELECT job_id, state FROM stages WHERE id = $1 FOR UPDATE",
        args![stage],
    )?;
    let job = r.i64(0);
    if matches!(r.str(1), "done" | "skipped") {
        return Ok(false);
    }
    let busy = count(
        tx,
        "SELECT (SELECT count(*) FROM pending WHERE stage_id = $1)
              + (SELECT count(*) FROM fragments WHERE stage_id = $1 AND state = 'running')",
        stage,
    )?;
    if busy > 0 || !data::sources_ended(tx, stage)? {
        // A streamed stage ends only once every stage it streams from has.
        return Ok(false);
    }
    let idx = tx
        .query_one(
            "UPDATE stages SET state = 'done' WHERE id = $1 RETURNING idx",
            args![stage],
        )?
        .u64(0) as usize;
    keep_learned(tx, stage, now_ms)?;
    // Stages that waited for this one may be ready now.
    tx.notify()?;
    // Stages after it are skipped if it quarantined items (afterok); stages that
    // stream from it may have ended with it.
    for consumer in data::after_end(tx, job, idx)? {
        settle(tx, consumer, now_ms)?;
    }
    count(tx, "SELECT id FROM jobs WHERE id = $1 FOR UPDATE", job)?;
    const OPEN: &str =
        "SELECT count(*) FROM stages WHERE job_id = $1 AND state NOT IN ('done', 'skipped')";
    if count(tx, OPEN, job)? > 0 {
        return Ok(false);
    }
    const FAILED: &str = "SELECT count(*) FROM stages WHERE job_id = $1
         AND (quarantined != '[]' OR state = 'skipped')";
    let state = if count(tx, FAILED, job)? > 0 {
        "failed"
    } else {
        "done"
    };
    tx.execute(
        "UPDATE jobs SET state = $2, finished_ms = $3 WHERE id = $1 AND state = 'running'",
        args![job, state, now_ms],
    )?;
    Ok(true)
}

/// Records a worker's flush (see `Store::flush`).
pub(crate) fn flush(
    b: &mut impl Backend,
    worker: &str,
    now_ms: i64,
    lease_ms: i64,
    heartbeat: &Heartbeat,
    batch: &[FragmentFlush],
) -> Result<FlushReply> {
    b.transaction(TxKind::Flush, |tx| {
        let mut reply = FlushReply::default();
        let mut appeared = false;
        for f in batch {
            let Some(held) = hold(tx, f.fragment, worker)? else {
                reply.lost.push(f.fragment);
                continue;
            };
            let mut ledger = window(&held);
            let (done, new_work) = apply_flush(tx, &held, &mut ledger, f, now_ms)?;
            reply.done += done;
            appeared |= new_work;
            // A flush with nothing new for a fragment writes nothing for it: a
            // heartbeat costs the same rows however many fragments run.
            if ledger.fragment(f.fragment) != Some(&held.fragment) {
                save_fragment(tx, &ledger, f.fragment)?;
            }
            if !held.job_running {
                stop(tx, &held, &mut ledger, now_ms)?;
                reply.stopped.push(f.fragment);
            }
        }
        renew(tx, worker, now_ms, lease_ms, heartbeat)?;
        super::fair::split(tx, worker, now_ms)?;
        reply.split_requests = tx
            .query(
                "SELECT id, split_request FROM fragments
                 WHERE worker = $1 AND state = 'running' AND split_request IS NOT NULL",
                args![worker],
            )?
            .iter()
            .map(|r| (FragmentId(r.i64(0)), r.u64(1)))
            .collect();
        if appeared {
            tx.notify()?;
        }
        Ok(reply)
    })
}

/// A fragment of a job that no longer runs (cancelled or stopped): its acks stand,
/// the rest is pending again.
fn stop(tx: &mut dyn Db, held: &HeldFragment, ledger: &mut StageLedger, now_ms: i64) -> Result<()> {
    let id = held.fragment.id;
    let report = ledger.finish(id, &FinishOutcome::Yielded, 0);
    insert_pending(tx, held.stage, ledger.pending.ranges())?;
    tx.execute(
        "UPDATE fragments SET state = 'cancelled', finished_ms = $2, split_request = NULL,
           acked = $3, done_count = $4, state_reruns = state_reruns + $5 WHERE id = $1",
        args![
            id.0,
            now_ms,
            &json(&ledger.done),
            ledger.done.len(),
            report.undone
        ],
    )?;
    Ok(())
}

/// Renews a worker's lease and heartbeat. What the worker says it holds follows its
/// lease from then on, once half of its own claim lease is spent (one write per
/// fragment, none for short ones); a claim whose reply never reached the worker is
/// never confirmed and expires.
fn renew(
    tx: &mut dyn Db,
    worker: &str,
    now_ms: i64,
    lease_ms: i64,
    heartbeat: &Heartbeat,
) -> Result<()> {
    let held: Vec<i64> = heartbeat.held.iter().map(|f| f.0).collect();
    let half_spent = tx.lease_clock(now_ms + lease_ms / 2);
    if !held.is_empty() {
        tx.execute(
            "UPDATE fragments SET lease_expires_ms = $2
             WHERE worker = $1 AND state = 'running' AND id = ANY($3) AND lease_expires_ms < $4",
            args![worker, FOLLOWS_WORKER, &held, half_spent],
        )?;
    }
    let lease_until = tx.lease_clock(now_ms + lease_ms);
    tx.execute(
        "UPDATE workers SET heartbeat_ms = $2, busy = $3, free_memory = $4, load = $5, lease_until_ms = $6
         WHERE id = $1",
        args![
            worker,
            now_ms,
            heartbeat.busy,
            heartbeat.free_memory,
            heartbeat.load,
            lease_until,
        ],
    )?;
    Ok(())
}

/// Asks for a split of the running fragment with the most predicted remaining work
/// (see `Store::request_split`); core's `split_point` and `split_gain` decide.
pub(crate) fn request_split(
    b: &mut impl Backend,
    job: Option<JobId>,
    now_ms: i64,
    min_ms: f64,
    asker: &str,
) -> Result<Option<FragmentId>> {
    b.transaction(TxKind::Write, |tx| {
        let rows = tx.query(
            "SELECT f.id, f.stage_id, f.start_idx, f.end_idx, f.acked, f.class, f.claimed_ms, f.predicted_ms
             FROM fragments f JOIN stages s ON s.id = f.stage_id
             WHERE f.state = 'running' AND f.split_request IS NULL AND ($1::BIGINT IS NULL OR s.job_id = $1)",
            args![job.map(|j| j.0)],
        )?;
        let mut best: Option<(f64, i64, u64)> = None;
        for r in &rows {
            let stage = r.i64(1);
            let mut model_of = |class: &str| -> Result<granule_core::CostModel> {
                let state = tx.query_opt(
                    "SELECT state FROM sizers WHERE stage_id = $1 AND class = $2",
                    args![stage, class],
                )?;
                Ok(match state {
                    Some(s) => parse::<Sizer>(s.str(0), "sizer state")?.model,
                    None => Default::default(),
                })
            };
            let model = model_of(r.str(5))?;
            let asker_model = model_of(asker)?;
            let gain = split_gain(&model, &asker_model);
            let keep = split_share(&model, &asker_model);
            let acked: IntervalSet = parse(r.str(4), "fragment acks")?;
            let span = Span::new(r.u64(2), r.u64(3));
            let elapsed = now_ms - r.i64(6);
            if let Some((remaining, at)) = split_point(span, &acked, &model, elapsed, r.f64(7), min_ms, keep) {
                let worth = remaining * gain;
                if best.is_none_or(|b| worth > b.0) {
                    best = Some((worth, r.i64(0), at));
                }
            }
        }
        let Some((_, id, at)) = best else { return Ok(None) };
        let set = tx.execute(
            "UPDATE fragments SET split_request = $2 WHERE id = $1 AND state = 'running' AND split_request IS NULL",
            args![id, at],
        )?;
        Ok((set == 1).then_some(FragmentId(id)))
    })
}

/// Ends a fragment (see `Store::finish`).
pub(crate) fn finish(
    b: &mut impl Backend,
    worker: &str,
    now_ms: i64,
    end: &FragmentEnd,
) -> Result<Finished> {
    let mut used = Vec::new();
    let finished = b.transaction(TxKind::Finish, |tx| {
        let Some(held) = hold_to_finish(tx, end.flush.fragment, worker)? else {
            return Ok(Finished::default());
        };
        used.push((held.stage, end.observed_ms));
        finish_held(tx, worker, now_ms, end, &held)
    })?;
    super::fair::record_usage(b, &used, now_ms)?;
    Ok(finished)
}

/// Ends a fragment and claims for the slots it frees, in one transaction (see
/// `Store::finish_and_claim`).
pub(crate) fn finish_and_claim(
    b: &mut impl Backend,
    worker: &str,
    now_ms: i64,
    end: &FragmentEnd,
    next: Option<(&ClaimRequest, usize)>,
) -> Result<(Finished, Vec<Assignment>)> {
    let mut used = Vec::new();
    let out = b.transaction(TxKind::Finish, |tx| {
        let finished = match hold_to_finish(tx, end.flush.fragment, worker)? {
            Some(held) => {
                used.push((held.stage, end.observed_ms));
                finish_held(tx, worker, now_ms, end, &held)?
            }
            None => Finished::default(),
        };
        let claimed = match next {
            Some((req, slots)) => super::claim::claim_slots(tx, req, slots)?.0,
            None => Vec::new(),
        };
        Ok((finished, claimed))
    })?;
    super::fair::record_usage(b, &used, now_ms)?;
    Ok(out)
}

/// What a finish decided, for its row.
struct Ended {
    report: FinishReport,
    verdict: crate::common::Verdict,
    result: Option<i64>,
    reruns: u64,
    splits: u64,
}

fn finish_held(
    tx: &mut dyn Db,
    worker: &str,
    now_ms: i64,
    end: &FragmentEnd,
    held: &HeldFragment,
) -> Result<Finished> {
    let id = held.fragment.id;
    let mut ledger = window(held);
    let (_, mut appeared) = apply_flush(tx, held, &mut ledger, &end.flush, now_ms)?;
    let splits = u64::from(
        ledger.fragment(id).is_some_and(|f| end.end < f.span.end) && ledger.split(id, end.end) > 0,
    );
    let f = ledger.fragment(id).expect("held fragment").clone();
    let outcome = accounted_outcome(end);
    let all_or_nothing = matches!(outcome, FinishOutcome::AllOrNothing { .. });
    if (all_or_nothing && !ledger.acking) || (!ledger.stateful && !f.acked.is_empty()) {
        // Judged against a first ack or first checkpoint another worker may be
        // committing now.
        (ledger.acking, ledger.stateful) = flags_locked(tx, held.stage)?;
    }
    let report = ledger.finish(
        id,
        &outcome,
        retry_budget(end.cause.as_deref(), held.retries),
    );
    let verdict = verdict(end, &report);
    let (result, forgotten) = kept_result(tx, held.stage, &mut ledger, &report)?;
    appeared |= forgotten > 0;
    if let (Some(blob), Some((_, covers))) = (result, &report.result) {
        // A result is an item of the stages that take this stage's results.
        let item = covers.first().unwrap_or(f.span.start);
        let outputs = vec![Output::Result(blob)];
        let result = ItemOutputs { item, outputs };
        appeared |= data::publish(tx, held.stage, id.0, data::RESULTS, vec![result])?;
    }
    if end.cause.as_deref() == Some("oom") {
        // Retried on a worker with more memory than this one, while one is alive.
        let resources = tx
            .query_opt("SELECT resources FROM workers WHERE id = $1", args![worker])?
            .map(|r| r.string(0));
        ledger.raise_floor(f.span, resources.map_or(0, |r| memory_of(&r)));
    }
    let requeue = ledger.pending.ranges().to_vec();
    appeared |= !requeue.is_empty();
    insert_pending(tx, held.stage, &requeue)?;
    quarantine(tx, held.stage, &report.quarantined)?;
    let ended = Ended {
        reruns: report.undone + forgotten,
        report,
        verdict,
        result,
        splits,
    };
    write_end(tx, end, &f, &ledger, &ended, now_ms)?;
    if ended.verdict.all_or_nothing && end.fed > 0 && held.acks == Acks::Unknown {
        tx.execute(
            "UPDATE stages SET acks = 'no' WHERE id = $1 AND acks = 'unknown'",
            args![held.stage],
        )?;
    }
    if let Some(halt) = &end.halt {
        let job = count(tx, "SELECT job_id FROM stages WHERE id = $1", held.stage)?;
        halt_job(tx, job, halt, now_ms)?;
    }
    if ended.verdict.finished && end.fed > 0 {
        learn(tx, held, end)?;
    }
    if appeared {
        tx.notify()?;
    }
    let job_finished = requeue.is_empty()
        && match end.halt {
            // A halt may have taken the stage's pending rows away since.
            Some(_) => settle(tx, held.stage, now_ms)?,
            None => settle_seen(tx, held.stage, now_ms, held.pending.unwrap_or(0))?,
        };
    Ok(Finished {
        accepted: true,
        quarantined: ended.report.quarantined,
        job_finished,
    })
}

/// Adds items to the stage's quarantine.
fn quarantine(tx: &mut dyn Db, stage: i64, items: &IntervalSet) -> Result<()> {
    if items.is_empty() {
        return Ok(());
    }
    let row = tx.query_one(
        "SELECT quarantined FROM stages WHERE id = $1 FOR UPDATE",
        args![stage],
    )?;
    let mut q: IntervalSet = parse(row.str(0), "quarantined")?;
    q.union_with(items);
    tx.execute(
        "UPDATE stages SET quarantined = $2 WHERE id = $1",
        args![stage, &json(&q)],
    )?;
    Ok(())
}

/// The finished fragment's row (sent with the next statement: nothing reads it).
fn write_end(
    tx: &mut dyn Db,
    end: &FragmentEnd,
    f: &RunningFragment,
    ledger: &StageLedger,
    ended: &Ended,
    now_ms: i64,
) -> Result<()> {
    tx.defer(
        "UPDATE fragments SET state = $2, finished_ms = $3, observed_ms = $4, cpu_ms = $5, peak_rss_kb = $6,
          load = $7, fed = $8, acks = $9, cause = $10, detail = $11, stdout = $12, stderr = $13,
          end_idx = $14, acked = $15, done_count = $16, wasted_ms = $17, checkpoint_fallbacks = $18,
          split_request = NULL, checkpoint_id = $19, splits = splits + $20, io_bytes = $21,
          predicted_ms = coalesce($22, predicted_ms), result = $23, state_reruns = state_reruns + $24,
          results_missing = $25, unconfirmed = $26
         WHERE id = $1",
        args![
            f.id.0,
            ended.verdict.state,
            now_ms,
            end.observed_ms,
            end.cpu_ms,
            end.peak_rss_kb,
            end.load,
            end.fed,
            end.acks,
            &ended.verdict.cause,
            &ended.verdict.detail,
            &end.stdout,
            &end.stderr,
            f.span.end,
            &json(&ledger.done),
            ledger.done.len(),
            end.wasted_ms,
            end.checkpoint_fallbacks,
            f.checkpoint,
            ended.splits,
            end.io_bytes,
            end.predicted_ms,
            ended.result,
            ended.reruns,
            ended.report.uncovered,
            ended.verdict.all_or_nothing && !ledger.acking,
        ],
    )
}

/// The sizer of the fragment's class learns from its finish, if its row is free.
fn learn(tx: &mut dyn Db, held: &HeldFragment, end: &FragmentEnd) -> Result<()> {
    let mut sizer: Sizer = match &held.sizer {
        SizerHeld::Locked(text) => parse(text, "sizer state")?,
        SizerHeld::Busy => return Ok(()),
        SizerHeld::Missing => match create_sizer(tx, held.stage, &held.class)? {
            (text, true) => parse(&text, "sizer state")?,
            (_, false) => return Ok(()),
        },
    };
    sizer.observe(
        &held.sizer_config,
        &Observation {
            n: end.fed,
            duration_ms: end.observed_ms,
            acks: end.acks,
            first_ack_ms: end.first_ack_ms,
            last_ack_ms: end.last_ack_ms,
            sized_by_model: held.size_cap == SizeCap::Model,
            bytes: end.bytes,
            load: Some(end.load),
        },
    );
    save_sizer(tx, held.stage, &held.class, &sizer)
}

/// Returns to pending the unacked items of fragments whose lease expired or whose
/// worker is in `dead` (see `Store::release`).
pub(crate) fn release(b: &mut impl Backend, now_ms: i64, dead: &[String]) -> Result<u64> {
    let mut used = Vec::new();
    let released = b.transaction(TxKind::Write, |tx| {
        let now_lease = tx.lease_clock(now_ms);
        let rows = tx.query(
            "SELECT f.id, f.worker FROM fragments f LEFT JOIN workers w ON w.id = f.worker
             WHERE f.state = 'running' AND f.worker = ANY($2)
                OR f.state = 'running' AND f.lease_expires_ms < $1
                OR f.state = 'running' AND f.lease_expires_ms = $3 AND coalesce(w.lease_until_ms, 0) < $1
             ORDER BY f.stage_id, f.id
             FOR UPDATE OF f SKIP LOCKED",
            args![now_lease, dead, FOLLOWS_WORKER],
        )?;
        let mut drained = Vec::new();
        for r in &rows {
            let (id, worker) = (FragmentId(r.i64(0)), r.str(1));
            let Some(held) = hold(tx, id, worker)? else { continue };
            let why = if dead.iter().any(|d| d == worker) {
                "worker died"
            } else {
                "lease expired"
            };
            if lose(tx, &held, &format!("{why}: {worker}"), now_ms, &mut used)? {
                drained.push(held.stage);
            }
        }
        if !dead.is_empty() {
            tx.execute(
                "UPDATE workers SET state = 'exited', busy = 0, lease_until_ms = 0 WHERE id = ANY($1)",
                args![dead],
            )?;
        }
        // A fragment released with every item acked may have been its stage's last.
        drained.extend(stranded(tx)?);
        drained.sort_unstable();
        drained.dedup();
        for stage in drained {
            settle(tx, stage, now_ms)?;
        }
        if !rows.is_empty() {
            tx.notify()?;
        }
        Ok(rows.len() as u64)
    })?;
    super::fair::record_usage(b, &used, now_ms)?;
    Ok(released)
}

/// Running stages of running jobs with nothing pending or running. Two last
/// finishers of a stage can each count the other as running (each reads before the
/// other commits) and leave it so; a release settles what they left.
fn stranded(tx: &mut dyn Db) -> Result<Vec<i64>> {
    Ok(tx
        .query(
            "SELECT s.id FROM stages s JOIN jobs j ON j.id = s.job_id
             WHERE j.state = 'running' AND s.state = 'running'
               AND NOT EXISTS (SELECT 1 FROM pending p WHERE p.stage_id = s.id)
               AND NOT EXISTS (SELECT 1 FROM fragments f WHERE f.stage_id = s.id AND f.state = 'running')",
            args![],
        )?
        .iter()
        .map(|r| r.i64(0))
        .collect())
}

/// Ends a held fragment as lost: its unacked items go back to pending. Returns
/// whether nothing of it went back (it may have been its stage's last).
/// `used`: gets the fragment's stage and the slot-ms it held, for fair share.
fn lose(
    tx: &mut dyn Db,
    held: &HeldFragment,
    detail: &str,
    now_ms: i64,
    used: &mut Vec<(i64, f64)>,
) -> Result<bool> {
    let id = held.fragment.id;
    let mut ledger = window(held);
    if !ledger.stateful && !held.fragment.acked.is_empty() {
        (ledger.acking, ledger.stateful) = flags_locked(tx, held.stage)?;
    }
    let report = ledger.finish(id, &FinishOutcome::Lost, u32::MAX);
    let (result, forgotten) = kept_result(tx, held.stage, &mut ledger, &report)?;
    insert_pending(tx, held.stage, ledger.pending.ranges())?;
    // The work lost with it: its time from the claim to its worker's last sign of
    // life, less the share its acked items stand for.
    let seen = tx.query_one(
        "SELECT f.claimed_ms, (SELECT w.heartbeat_ms FROM workers w WHERE w.id = f.worker)
         FROM fragments f WHERE f.id = $1",
        args![id.0],
    )?;
    let alive_ms = (seen.opt_i64(1).unwrap_or(now_ms).min(now_ms) - seen.i64(0)).max(0) as f64;
    // Its span as it stood (a split gave its tail away).
    let kept = ledger.done.len() as f64 / held.fragment.span.len().max(1) as f64;
    let wasted_ms = alive_ms * (1.0 - kept.min(1.0));
    used.push((held.stage, alive_ms));
    tx.execute(
        "UPDATE fragments SET state = 'lost', finished_ms = $2, cause = 'lost', detail = $3, split_request = NULL,
           acked = $4, done_count = $5, result = $6, state_reruns = state_reruns + $7, wasted_ms = $8
         WHERE id = $1",
        args![
            id.0,
            now_ms,
            detail,
            &json(&ledger.done),
            ledger.done.len(),
            result,
            report.undone + forgotten,
            wasted_ms,
        ],
    )?;
    Ok(ledger.pending.is_empty())
}

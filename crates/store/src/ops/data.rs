//! Data between stages: outputs published with the ack that counts their item,
//! the items of streamed stages (`from`, `results_of`), and how a stage that
//! others wait for or stream from ends (afterok).
//!
//! A stage's outputs are numbered in the order they are published (`published` on
//! its row): each publish is one `outputs` row holding a batch (`core::outputs`),
//! never a row per output. Each stage streaming from it gets the batch appended to
//! its own items (a `feeds` row mapping its indices to the batch, and a pending
//! range), so its indices never move once given, and it can run them at once.

use super::fragment::insert_pending;
use super::Backend;
use super::TxKind;
use crate::common::parse;
use crate::db::{args, Db};
use crate::{OutputRow, Result, StoreError};
use granule_core::outputs::{decode, encode, publish_order};
use granule_core::{ItemOutputs, Output, PendingRange, Published, Span};

/// Kind of a published batch: outputs of items, or results of fragments.
pub(crate) const OUTPUTS: &str = "output";
/// See [`OUTPUTS`].
pub(crate) const RESULTS: &str = "result";

/// Publishes the outputs of the items in `items` (those this transaction counted
/// done, so a rerun item, already counted, publishes nothing) and appends them
/// to the items of the stages that stream from `stage`. Returns whether any
/// stage got new items.
pub(crate) fn publish(
    tx: &mut dyn Db,
    stage: i64,
    fragment: i64,
    kind: &str,
    items: Vec<ItemOutputs>,
) -> Result<bool> {
    let batch = publish_order(items);
    if batch.is_empty() {
        return Ok(false);
    }
    let n = batch.len() as i64;
    let column = if kind == RESULTS {
        "results_published"
    } else {
        "published"
    };
    let r = tx.query_one(
        &format!(
            "UPDATE stages SET {column} = {column} + $2 WHERE id = $1 RETURNING {column}, job_id, idx"
        ),
        args![stage, n],
    )?;
    let (start, job, idx) = (r.i64(0) - n, r.i64(1), r.u64(2) as usize);
    tx.execute(
        "INSERT INTO outputs (stage_id, kind, start_idx, end_idx, fragment_id, data)
         VALUES ($1, $2, $3, $4, $5, $6)",
        args![stage, kind, start, start + n, fragment, &encode(&batch)],
    )?;
    let consumers = consumers_of(tx, job, idx, kind == RESULTS)?;
    for consumer in &consumers {
        let end = tx
            .query_one(
                "UPDATE stages SET items = items + $2 WHERE id = $1 RETURNING items",
                args![*consumer, n],
            )?
            .i64(0);
        let first = end - n;
        tx.execute(
            "INSERT INTO feeds (stage_id, start_idx, end_idx, src_stage, src_start)
             VALUES ($1, $2, $3, $4, $5)",
            args![*consumer, first, end, stage, start],
        )?;
        let range = PendingRange::fresh(Span::new(first as u64, end as u64));
        insert_pending(tx, *consumer, &[range])?;
    }
    Ok(!consumers.is_empty())
}

/// The stages of `job` whose items are the outputs (or with `results`, the
/// results) of the stage at index `idx`, by id.
fn consumers_of(tx: &mut dyn Db, job: i64, idx: usize, results: bool) -> Result<Vec<i64>> {
    let rows = tx.query(
        "SELECT id, sources, from_results FROM stages WHERE job_id = $1 AND sources != '[]' ORDER BY idx",
        args![job],
    )?;
    let mut out = Vec::new();
    for r in rows {
        let sources: Vec<usize> = parse(r.str(1), "stage sources")?;
        if sources.contains(&idx) && r.bool(2) == results {
            out.push(r.i64(0));
        }
    }
    Ok(out)
}

/// The published outputs behind items `span` of streamed stage `stage`, in index
/// order (one per item). Fails if the store does not hold them all.
pub(crate) fn stream_values(tx: &mut dyn Db, stage: i64, span: Span) -> Result<Vec<Published>> {
    let feeds = tx.query(
        "SELECT f.start_idx, f.end_idx, f.src_stage, f.src_start, s.from_results
         FROM feeds f JOIN stages s ON s.id = f.stage_id
         WHERE f.stage_id = $1 AND f.end_idx > $2 AND f.start_idx < $3 ORDER BY f.start_idx",
        args![stage, span.start as i64, span.end as i64],
    )?;
    let mut out = Vec::with_capacity(span.len() as usize);
    for f in feeds {
        let (start, end, src, src_start) = (f.u64(0), f.u64(1), f.i64(2), f.u64(3));
        let kind = if f.bool(4) { RESULTS } else { OUTPUTS };
        // This feed's part of the span, in the source's numbering.
        let lo = span.start.max(start) - start + src_start;
        let hi = span.end.min(end) - start + src_start;
        out.extend(source_range(tx, src, kind, lo, hi)?);
    }
    if out.len() as u64 != span.len() {
        return Err(StoreError::Corrupt(format!(
            "stage {stage}: items {}..{} have {} published values",
            span.start,
            span.end,
            out.len()
        )));
    }
    Ok(out)
}

/// Published outputs `lo..hi` of stage `src` (of `kind`), in order.
fn source_range(tx: &mut dyn Db, src: i64, kind: &str, lo: u64, hi: u64) -> Result<Vec<Published>> {
    let rows = tx.query(
        "SELECT start_idx, data FROM outputs
         WHERE stage_id = $1 AND kind = $2 AND end_idx > $3 AND start_idx < $4 ORDER BY start_idx",
        args![src, kind, lo as i64, hi as i64],
    )?;
    let mut out = Vec::new();
    for r in rows {
        let start = r.u64(0);
        let batch = batch_at(&r.bytes(1), &src, start)?;
        let from = lo.saturating_sub(start) as usize;
        let to = ((hi - start) as usize).min(batch.len());
        out.extend(batch.into_iter().take(to).skip(from));
    }
    Ok(out)
}

/// A stored batch of `stage`'s outputs (numbered from `start`), decoded.
fn batch_at(data: &[u8], stage: &dyn std::fmt::Display, start: u64) -> Result<Vec<Published>> {
    decode(data)
        .ok_or_else(|| StoreError::Corrupt(format!("stage {stage}: an output batch at {start}")))
}

/// Every output a stage published, in its published order (by upstream item
/// within each publish), with the upstream item each came from.
pub(crate) fn outputs(b: &mut impl Backend, job: &str, stage: &str) -> Result<Vec<OutputRow>> {
    b.transaction(TxKind::Read, |tx| {
        let rows = tx.query(
            "SELECT o.start_idx, o.data, o.fragment_id FROM outputs o
               JOIN stages s ON s.id = o.stage_id JOIN jobs j ON j.id = s.job_id
             WHERE j.name = $1 AND s.name = $2 AND o.kind = $3 ORDER BY o.start_idx",
            args![job, stage, OUTPUTS],
        )?;
        let mut out = Vec::new();
        for r in rows {
            let start = r.u64(0);
            let batch = batch_at(&r.bytes(1), &stage, start)?;
            for (k, p) in batch.into_iter().enumerate() {
                out.push(OutputRow {
                    index: start + k as u64,
                    item: p.item,
                    ordinal: p.ordinal,
                    fragment: r.i64(2),
                    output: p.output,
                });
            }
        }
        Ok(out)
    })
}

/// Every blob key the store's jobs still refer to (files among their outputs).
pub(crate) fn blob_keys(b: &mut impl Backend) -> Result<Vec<String>> {
    b.transaction(TxKind::Read, |tx| {
        let rows = tx.query("SELECT data FROM outputs WHERE kind = $1", args![OUTPUTS])?;
        let mut keys = Vec::new();
        for r in rows {
            let batch =
                decode(&r.bytes(0)).ok_or_else(|| StoreError::Corrupt("an output batch".into()))?;
            keys.extend(batch.into_iter().filter_map(|p| match p.output {
                Output::File { key, .. } => Some(key),
                _ => None,
            }));
        }
        keys.sort();
        keys.dedup();
        Ok(keys)
    })
}

/// Whether every stage `stage` streams from has ended (so its items are all
/// known); true for a stage with items fixed at submit.
pub(crate) fn sources_ended(tx: &mut dyn Db, stage: i64) -> Result<bool> {
    let r = tx.query_one(
        "SELECT job_id, sources FROM stages WHERE id = $1",
        args![stage],
    )?;
    let (job, sources): (i64, Vec<usize>) = (r.i64(0), parse(r.str(1), "stage sources")?);
    if sources.is_empty() {
        return Ok(true);
    }
    let open = tx.query(
        "SELECT idx FROM stages WHERE job_id = $1 AND state NOT IN ('done', 'skipped')",
        args![job],
    )?;
    Ok(!open.iter().any(|r| sources.contains(&(r.u64(0) as usize))))
}

/// After stage `stage` (at `idx` in `job`) ended: the stages that come after it
/// without `after_any` are skipped if it ended with quarantined items (or was
/// skipped), and so on down the DAG. Returns the stages whose sources may all have
/// ended now (its consumers and theirs), to be settled by the caller.
pub(crate) fn after_end(tx: &mut dyn Db, job: i64, idx: usize) -> Result<Vec<i64>> {
    let rows = tx.query(
        "SELECT id, idx, after, after_any, sources, state, quarantined != '[]' FROM stages
         WHERE job_id = $1 ORDER BY idx",
        args![job],
    )?;
    struct S {
        id: i64,
        idx: usize,
        strict: Vec<usize>,
        sources: Vec<usize>,
        state: String,
        failed: bool,
    }
    let mut stages = Vec::new();
    for r in rows {
        let after: Vec<usize> = parse(r.str(2), "stage after")?;
        let any: Vec<usize> = parse(r.str(3), "stage after_any")?;
        stages.push(S {
            id: r.i64(0),
            idx: r.u64(1) as usize,
            strict: after.into_iter().filter(|a| !any.contains(a)).collect(),
            sources: parse(r.str(4), "stage sources")?,
            state: r.string(5),
            failed: r.bool(6),
        });
    }
    let mut ended = vec![idx];
    let mut settle = Vec::new();
    while let Some(done) = ended.pop() {
        let bad = stages
            .iter()
            .any(|s| s.idx == done && (s.failed || s.state == "skipped"));
        for s in stages.iter_mut() {
            if bad && s.strict.contains(&done) && s.state != "skipped" && s.state != "done" {
                tx.execute(
                    "UPDATE stages SET state = 'skipped' WHERE id = $1",
                    args![s.id],
                )?;
                tx.execute("DELETE FROM pending WHERE stage_id = $1", args![s.id])?;
                s.state = "skipped".into();
                ended.push(s.idx);
            } else if s.sources.contains(&done) && !settle.contains(&s.id) {
                settle.push(s.id);
            }
        }
    }
    Ok(settle)
}

//! The claim path: which job, which stage, which pending range, how many items.
//! Every choice is core's (`placement_order`, `class_deadline_plan`, `Admission`,
//! the sizer, `StageLedger::claim`); this reads what those need and writes the
//! fragment they decide on.

use super::fragment::{save_sizer_if, sizer_read, write_range};
use super::read::history;
use super::{fair, halt_job, stages_of, Backend, StageRow, TxKind};
use crate::common::{json, memory_of, parse, stage_view, StageReading};
use crate::db::{args, Db, Row};
use crate::{Acks, Assignment, ClaimRequest, JobHalt, Result, StoreError};
use granule_core::{
    claim_context, class_deadline_plan, live_pool, placement_order, size_with_unrun, stage_ready,
    Admission, FragmentId, JobId, PendingRange, PoolClass, SizeCap, Sizing, Span, StageId,
    StageLedger, StageView,
};
use std::time::Duration;

/// Claims for up to `slots` free slots in one transaction (see `Store::claim_many`).
/// A range locked by another claimer is skipped; if that was the only one left, it
/// tries again shortly rather than report "no work".
pub(crate) fn claim_many(
    b: &mut impl Backend,
    req: &ClaimRequest,
    slots: usize,
) -> Result<Vec<Assignment>> {
    for attempt in 0..4 {
        let (claimed, contended) =
            b.transaction(TxKind::Claim, |tx| claim_slots(tx, req, slots))?;
        if !claimed.is_empty() || !contended || !b.skips_locked_rows() {
            return Ok(claimed);
        }
        std::thread::sleep(Duration::from_millis(2 << attempt));
    }
    Ok(Vec::new())
}

/// Claims for up to `slots` slots, each offered what the ones before it left; also
/// says whether a range existed but was locked by others.
pub(crate) fn claim_slots(
    tx: &mut dyn Db,
    req: &ClaimRequest,
    slots: usize,
) -> Result<(Vec<Assignment>, bool)> {
    let mut req = req.clone();
    let (mut claimed, mut contended) = (Vec::new(), false);
    while claimed.len() < slots {
        let started = std::time::Instant::now();
        let (assignment, locked_out) = claim_once(tx, &req, started)?;
        contended |= locked_out;
        let Some(a) = assignment else { break };
        req.offer = req.offer.less(&a.needs);
        claimed.push(a);
    }
    Ok((claimed, contended))
}

/// The stages of the jobs a claim may take from (the one asked for, or every
/// running job), each job's stages in spec order; a job whose stored state cannot
/// be read is stopped as broken and left out.
pub(crate) fn running_stages(
    tx: &mut dyn Db,
    job: Option<JobId>,
    now_ms: i64,
) -> Result<Vec<(i64, Vec<StageRow>)>> {
    let jobs: Vec<i64> = match job {
        Some(job) => vec![job.0],
        None => tx
            .query(
                "SELECT id FROM jobs WHERE state = 'running' ORDER BY id",
                args![],
            )?
            .iter()
            .map(|r| r.i64(0))
            .collect(),
    };
    let mut out = Vec::new();
    for job in jobs {
        match stages_of(tx, job, true) {
            Ok(stages) if stages.is_empty() => {}
            Ok(stages) => out.push((job, stages)),
            Err(StoreError::Corrupt(why)) => halt_job(tx, job, &broken(why), now_ms)?,
            Err(e) => return Err(e),
        }
    }
    Ok(out)
}

fn broken(why: String) -> JobHalt {
    JobHalt::Broken(format!("its stored state cannot be read: {why}"))
}

/// One claim; also says whether a range existed but was locked by others. Jobs go
/// by their highest stage priority, then by their owner's turn in the fair share
/// (core's `fair::turns`, when more than one owner has unfinished work), then
/// oldest first. A job whose stored state cannot be read breaks alone: the others
/// go on. `started`: when this claim began, for the claim's recorded latency.
fn claim_once(
    tx: &mut dyn Db,
    req: &ClaimRequest,
    started: std::time::Instant,
) -> Result<(Option<Assignment>, bool)> {
    let jobs = running_stages(tx, req.job, req.now_ms)?;
    let turns = fair::turns(tx, &jobs, req.now_ms)?;
    let turn = |s: &StageRow| {
        turns
            .as_ref()
            .map_or(0, |t| t.get(&s.needs.owner_key()).copied().unwrap_or(0))
    };
    let mut keyed: Vec<((i64, u64, i64), Vec<StageRow>)> = jobs
        .into_iter()
        .map(|(job, stages)| {
            let top = stages.iter().map(|s| s.needs.priority).max().unwrap_or(0);
            let first = stages
                .iter()
                .filter(|s| !s.is_done())
                .map(turn)
                .min()
                .unwrap_or(0);
            ((-top, first, job), stages)
        })
        .collect();
    keyed.sort_by_key(|(key, _)| *key);
    let mut contended = false;
    for ((_, _, job), stages) in keyed {
        let turns: Vec<u64> = stages.iter().map(turn).collect();
        match claim_in_job(tx, req, job, &stages, &turns, started) {
            Ok((Some(a), _)) => return Ok((Some(a), false)),
            Ok((None, busy)) => contended |= busy,
            Err(StoreError::Corrupt(why)) => halt_job(tx, job, &broken(why), req.now_ms)?,
            Err(e) => return Err(e),
        }
    }
    Ok((None, contended))
}

/// Tries the ready stages of one job in placement order; claims from the first
/// that has an admitted range; also says whether a range existed but was locked.
/// `turns`: each stage's owner's turn in the fair share.
fn claim_in_job(
    tx: &mut dyn Db,
    req: &ClaimRequest,
    job: i64,
    stages: &[StageRow],
    turns: &[u64],
    started: std::time::Instant,
) -> Result<(Option<Assignment>, bool)> {
    let mut contended = false;
    let ready = ready_in_order(tx, req, job, stages, turns)?;
    let strict = Admission::strict(&req.offer);
    let mut relaxed: Option<Admission> = None;
    for stage in ready {
        let mut range = pending_range(tx, req, stage, &strict)?;
        if range.is_none() {
            // Ranges held back for better placed workers: only while one is alive.
            let admission = match relaxed {
                Some(a) => a,
                None => {
                    let (memory, on_demand) = alive_capacity(tx, req)?;
                    *relaxed.insert(strict.relaxed(memory, on_demand))
                }
            };
            if admission != strict {
                range = pending_range(tx, req, stage, &admission)?;
            }
        }
        let Some(range) = range else {
            contended |= tx
                .query_one(
                    "SELECT EXISTS (SELECT 1 FROM pending WHERE stage_id = $1)",
                    args![stage.id],
                )?
                .bool(0);
            continue;
        };
        if let Some(a) = claim_range(tx, req, job, stage, range, started)? {
            return Ok((Some(a), false));
        }
    }
    Ok((None, contended))
}

/// The job's stages this worker could take from now, in the order it should try
/// them (core's `placement_order`, with the deadline plan when a ready stage has a
/// deadline); never a stage whose slots need more than the worker has.
fn ready_in_order<'a>(
    tx: &mut dyn Db,
    req: &ClaimRequest,
    job: i64,
    stages: &'a [StageRow],
    turns: &[u64],
) -> Result<Vec<&'a StageRow>> {
    let finished: Vec<bool> = stages.iter().map(StageRow::is_done).collect();
    let is_ready = |s: &StageRow| stage_ready(&finished, s.idx, &s.after, &s.needs, &req.offer);
    let ready: Vec<&StageRow> = stages.iter().filter(|s| is_ready(s)).collect();
    let deadlines = ready.iter().any(|s| s.needs.deadline_ms.is_some());
    if ready.len() <= 1 && !deadlines {
        return Ok(ready);
    }
    let created = tx
        .query_one("SELECT created_ms FROM jobs WHERE id = $1", args![job])?
        .i64(0);
    let mut views = Vec::with_capacity(stages.len());
    for (stage, turn) in stages.iter().zip(turns) {
        let mut view = read_view(tx, stage, is_ready(stage), created)?;
        view.owner_turn = *turn;
        views.push(view);
    }
    let plan = if deadlines {
        let key = super::PlanKey::new(job, &req.class, &views);
        match tx.plans().fresh(&key, req.now_ms) {
            Some(plan) => plan,
            None => {
                let pool = live_pool_of(tx, req.now_ms, req.lease_ms)?;
                let plan = class_deadline_plan(&views, &pool, &req.class, req.now_ms);
                tx.plans().keep(key, req.now_ms, plan.clone());
                plan
            }
        }
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
pub(crate) fn read_view(
    tx: &mut dyn Db,
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
        args![stage.id],
    )?;
    let sizers = tx
        .query(
            "SELECT class, state FROM sizers WHERE stage_id = $1",
            args![stage.id],
        )?
        .iter()
        .map(|s| (s.string(0), s.string(1)))
        .collect();
    let reading = StageReading {
        running: r.i64(0),
        left: r.i64(1),
        checkpoints: r.bool(2),
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
pub(crate) fn live_pool_of(tx: &mut dyn Db, now_ms: i64, lease_ms: i64) -> Result<Vec<PoolClass>> {
    let rows = tx
        .query(
            "SELECT class, slots::BIGINT, cost FROM workers
             WHERE state = 'running' AND heartbeat_ms >= $1",
            args![now_ms - lease_ms],
        )?
        .iter()
        .map(|r| (r.string(0), r.i64(1), r.f64(2)))
        .collect();
    let ahead = history(tx, now_ms, now_ms - granule_core::FORECAST_WINDOW_MS)?;
    Ok(live_pool(rows, &ahead, now_ms))
}

const RANGE_COLUMNS: &str =
    "id, start_idx, end_idx, failures, checkpoint_id, lost, floor_memory_mb, covers";

/// A pending row: its id and range.
fn range_row(r: &Row) -> Result<(i64, PendingRange)> {
    Ok((
        r.i64(0),
        PendingRange {
            span: Span::new(r.u64(1), r.u64(2)),
            failures: r.u32(3),
            checkpoint: r.opt_i64(4),
            lost: r.u32(5),
            floor_memory_mb: r.u64(6),
            covers: parse(r.str(7), "pending covers")?,
        },
    ))
}

/// A pending range locked for a claim, with what the sizer's tail factoring reads
/// of the stage and the pool, taken in the same round trip.
struct Locked {
    id: i64,
    range: PendingRange,
    /// Items pending in the stage.
    remaining: u64,
    /// Slots of live workers.
    live_slots: u32,
    /// The claimer's class's sizer state, if the stage has one yet.
    sizer: Option<String>,
    /// Items of running fragments not acked yet, where the stage acks and idle
    /// slots split (else 0; judged by time when the sizer asks: [`unrun_items`]).
    running_left: u64,
    /// The id the fragment will have, where the database hands ids out ahead
    /// (PostgreSQL's sequence): its insert then needs no round trip of its own.
    fragment_id: Option<i64>,
}

/// The first pending range of a stage that `admission` lets the worker take,
/// locked (ranges others hold locked are skipped).
fn pending_range(
    tx: &mut dyn Db,
    req: &ClaimRequest,
    stage: &StageRow,
    admission: &Admission,
) -> Result<Option<Locked>> {
    let below = i64::try_from(admission.below_floor_mb).unwrap_or(i64::MAX);
    let lost = i64::from(admission.lost_under.min(i32::MAX as u32));
    let sql = format!(
        "SELECT {RANGE_COLUMNS},
                (SELECT coalesce(sum(end_idx - start_idx), 0)::BIGINT FROM pending WHERE stage_id = $1),
                (SELECT coalesce(sum(slots), 0)::BIGINT FROM workers WHERE state != 'exited' AND heartbeat_ms >= $4),
                (SELECT state FROM sizers WHERE stage_id = $1 AND class = $5),
                (SELECT nextval('fragments_id_seq')),
                CASE WHEN $6 THEN (SELECT coalesce(sum(end_idx - start_idx - done_count), 0)::BIGINT
                                   FROM fragments WHERE stage_id = $1 AND state = 'running') ELSE 0 END
         FROM pending p
         WHERE stage_id = $1 AND (floor_memory_mb = 0 OR floor_memory_mb < $2) AND lost < $3
         ORDER BY start_idx LIMIT 1 FOR UPDATE OF p SKIP LOCKED"
    );
    let live_since = req.now_ms - req.lease_ms;
    let Some(r) = tx.query_opt(
        &sql,
        args![
            stage.id,
            below,
            lost,
            live_since,
            &req.class,
            stage.acks == Acks::Yes && req.context.splits
        ],
    )?
    else {
        return Ok(None);
    };
    let (id, range) = range_row(&r)?;
    Ok(Some(Locked {
        id,
        range,
        remaining: r.u64(8),
        live_slots: r.u32(9),
        sizer: r.opt_string(10),
        fragment_id: r.opt_i64(11),
        running_left: r.u64(12),
    }))
}

/// The largest memory (MiB) among live workers, and whether a live one is on-demand.
fn alive_capacity(tx: &mut dyn Db, req: &ClaimRequest) -> Result<(u64, bool)> {
    let rows = tx.query(
        "SELECT spot, resources FROM workers WHERE state = 'running' AND heartbeat_ms >= $1",
        args![req.now_ms - req.lease_ms],
    )?;
    let memory = rows.iter().map(|r| memory_of(r.str(1))).max().unwrap_or(0);
    Ok((memory, rows.iter().any(|r| !r.bool(0))))
}

/// Items the running fragments of a stage have likely not run yet, judged by time:
/// `granule_core::unrun_estimate` summed in SQL.
fn unrun_items(tx: &mut dyn Db, stage: i64, now_ms: i64) -> Result<u64> {
    let row = tx.query_one(
        "SELECT CAST(coalesce(sum(CASE
             WHEN predicted_ms <= 0 OR $2 <= claimed_ms THEN end_idx - start_idx - done_count
             WHEN $2 - claimed_ms >= predicted_ms THEN 0
             ELSE (end_idx - start_idx - done_count) * (1.0 - ($2 - claimed_ms) / predicted_ms)
           END), 0) AS DOUBLE PRECISION)
         FROM fragments WHERE stage_id = $1 AND state = 'running'",
        args![stage, now_ms],
    )?;
    // Whole items, the same on both databases (PostgreSQL's cast rounds, SQLite's
    // truncates) and in the simulator.
    Ok(row.f64(0).max(0.0).floor() as u64)
}

/// How many items the sizer gives this claim on `stage`, with the sizer as it
/// stands after sizing (and its stored text, to save it only if sizing changed it).
fn size_claim(
    tx: &mut dyn Db,
    req: &ClaimRequest,
    stage: &StageRow,
    locked: &Locked,
) -> Result<(Sizing, granule_core::Sizer, String, f64)> {
    let (mut sizer, stored) = match &locked.sizer {
        Some(text) => (parse(text, "sizer state")?, text.clone()),
        None => sizer_read(tx, stage.id, &req.class)?,
    };
    let ctx = claim_context(
        &req.context,
        req.expected_life_ms,
        &sizer.model,
        stage.acks == Acks::Yes,
        locked.remaining + locked.running_left,
        locked.live_slots.max(req.slots),
    );
    let mut sizing = size_with_unrun(&mut sizer, &stage.sizer_config, &ctx, || {
        unrun_items(tx, stage.id, req.now_ms)
    })?;
    if let Some(max) = req.max_items.filter(|&max| max < sizing.n) {
        (sizing.n, sizing.cap) = (max, SizeCap::Bounds);
    }
    Ok((sizing, sizer, stored, ctx.load_per_cpu))
}

/// The locked range and, while that holds fewer than `n` items, the ranges that
/// follow it without a gap (if no one else holds them). Ranges with a history
/// never join: a claim takes from the first only.
fn lock_window(
    tx: &mut dyn Db,
    stage: i64,
    first: (i64, PendingRange),
    n: u64,
) -> Result<Vec<(i64, PendingRange)>> {
    let r = &first.1;
    let history = r.failures > 0 || r.lost > 0 || r.floor_memory_mb > 0 || r.checkpoint.is_some();
    let (mut end, mut held) = (r.span.end, r.span.len());
    let mut window = vec![first];
    let sql = format!(
        "SELECT {RANGE_COLUMNS} FROM pending
         WHERE stage_id = $1 AND start_idx = $2 AND failures = 0 AND checkpoint_id IS NULL
           AND lost = 0 AND floor_memory_mb = 0
         FOR UPDATE SKIP LOCKED"
    );
    while held < n && !history {
        let Some(row) = tx.query_opt(&sql, args![stage, end])? else {
            break;
        };
        let next = range_row(&row)?;
        (end, held) = (next.1.span.end, held + next.1.span.len());
        window.push(next);
    }
    Ok(window)
}

/// Writes back what a claim left of the ranges it locked: rows keep their ids in
/// order, the ones left over are deleted.
fn save_window(tx: &mut dyn Db, stage: i64, ids: &[i64], rest: &[PendingRange]) -> Result<()> {
    for (i, id) in ids.iter().enumerate() {
        match rest.get(i) {
            Some(r) => write_range(
                tx,
                "UPDATE pending SET start_idx = $2, end_idx = $3, failures = $4, checkpoint_id = $5, lost = $6,
                   floor_memory_mb = $7, covers = $8 WHERE id = $1",
                *id,
                r,
            )?,
            None => tx.defer("DELETE FROM pending WHERE id = $1", args![id])?,
        };
    }
    super::fragment::insert_pending(tx, stage, rest.get(ids.len()..).unwrap_or_default())
}

/// Carves a fragment from a locked pending range (and the ranges that join it).
fn claim_range(
    tx: &mut dyn Db,
    req: &ClaimRequest,
    job: i64,
    stage: &StageRow,
    first: Locked,
    started: std::time::Instant,
) -> Result<Option<Assignment>> {
    let (sizing, sizer, stored, load) = size_claim(tx, req, stage, &first)?;
    let n = sizing.n;
    if n == 0 {
        return Ok(None);
    }
    let window = lock_window(tx, stage.id, (first.id, first.range), n)?;
    let ids: Vec<i64> = window.iter().map(|(id, _)| *id).collect();
    let mut ledger = StageLedger::window(
        window.into_iter().map(|(_, r)| r).collect(),
        None,
        false,
        false,
    );
    let claim = ledger
        .claim(FragmentId(0), n)
        .expect("a locked window holds a range");
    save_window(tx, stage.id, &ids, ledger.pending.ranges())?;
    let (span, take) = (claim.span, claim.span.len());
    let predicted_ms = sizer.claim_ms(take, load, sizing.feed_for_ms);
    let cap = if take < n {
        SizeCap::Bounds
    } else {
        sizing.cap
    };
    const INSERT: &str =
        "INSERT INTO fragments (stage_id, start_idx, end_idx, state, worker, class, lease_expires_ms, failures,
          checkpoint_id, n, predicted_ms, size_cap, claimed_ms, lost, floor_memory_mb, resumed_from, covers,
          inherited, id, claim_us)
         VALUES ($1, $2, $3, 'running', $4, $5, $6, $7, $8, $9, $10, $11, $12, $13, $14, $8, $15, $15, $16, $17)
         RETURNING id";
    let lease_expires = tx.lease_clock(req.now_ms + req.lease_ms);
    let (cap_word, covers) = (json(&cap), json(&claim.covers));
    let values = args![
        stage.id,
        span.start,
        span.end,
        &req.worker,
        &req.class,
        lease_expires,
        claim.failures,
        claim.checkpoint,
        take,
        predicted_ms,
        cap_word.trim_matches('"'),
        req.now_ms,
        claim.lost,
        claim.floor_memory_mb,
        &covers,
        first.fragment_id,
        started.elapsed().as_micros() as i64,
    ];
    // An id given ahead: nothing reads the insert back, it goes with what follows.
    let id = match first.fragment_id {
        Some(id) => tx.defer(INSERT, values).map(|()| id)?,
        None => tx.query_one(INSERT, values)?.i64(0),
    };
    save_sizer_if(tx, stage.id, &req.class, &sizer, &stored)?;
    if stage.state == "waiting" {
        tx.defer(
            "UPDATE stages SET state = 'running' WHERE id = $1 AND state = 'waiting'",
            args![stage.id],
        )?;
    }
    Ok(Some(Assignment {
        fragment: FragmentId(id),
        job: JobId(job),
        stage: StageId(stage.id),
        stage_index: stage.idx,
        span,
        failures: claim.failures,
        checkpoint: claim.checkpoint,
        n: take,
        predicted_ms,
        cap,
        item_cost_ms: sizer.model.b_ms,
        overhead_ms: sizer.model.a_ms,
        size_fit: sizer.model.size.line(),
        expect_acks: stage.acks.expected(),
        needs: stage.needs.clone(),
        feed_for_ms: sizing.feed_for_ms,
    }))
}

//! Every transition of the store, written once over [`Db`]: both backends run these
//! functions in their own transactions and differ only in how they connect, migrate
//! and speak SQL (`db.rs`).
//!
//! Layout: pending items are rows of ranges (a stage starts as up to [`SHARDS`] of
//! them); a claim locks one with `FOR UPDATE SKIP LOCKED`, so concurrent claimers on
//! PostgreSQL take different ranges instead of queueing (SQLite serializes writers
//! anyway). Done items are counted on the fragment rows that did them, so nothing
//! hot lives on one row. What a transition decides, the core decides: claims carve
//! through `StageLedger::claim` over the ranges they locked, and flushes, finishes
//! and releases apply the ledger's transitions to the fragment they hold
//! ([`fragment::window`]).

pub(crate) mod claim;
pub(crate) mod data;
pub(crate) mod fair;
pub(crate) mod fragment;
pub(crate) mod jobs;
pub(crate) mod read;

use crate::common::{decode_sizer_config, parse};
use crate::db::{args, Db, Row};
use crate::{Acks, JobHalt, Result, StageState};
use granule_core::{SizerConfig, StageNeeds};
use std::collections::HashMap;

/// Deadline plans a connection computed, with the claim time each was made at: a
/// claim within [`PLAN_REUSE_MS`] of it whose inputs are the same ([`PlanKey`]:
/// the job, the asking class, and per stage whether it is ready, the work left to
/// within a few percent and each learned cost to within a few percent) reuses the
/// plan instead of reading the pool and solving its LPs again inside its
/// transaction. The pool is not in the key: it is what the time bound is for.
#[derive(Default)]
pub(crate) struct Plans(
    HashMap<PlanKey, (i64, Option<Vec<bool>>)>,
    /// When this connection last looked for a fairness split (`fair::split`).
    i64,
);

/// What a deadline plan was made from (see [`Plans`]).
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub(crate) struct PlanKey {
    job: i64,
    class: String,
    stages: Vec<StageKey>,
}

/// A stage as a plan's key sees it: ready, work left and learned costs (bucketed).
type StageKey = (bool, i64, Vec<(String, i64)>);

impl PlanKey {
    /// The key of a plan of `job`'s stages `views` for a claim by `class`.
    pub(crate) fn new(job: i64, class: &str, views: &[granule_core::StageView]) -> PlanKey {
        // Within about 3%: what moves less than that does not change a plan.
        let bucket = |x: f64| (x.max(1e-9).ln() * 32.0).round() as i64;
        let stages = views
            .iter()
            .map(|v| {
                let learned = v
                    .learned
                    .iter()
                    .map(|(c, b)| (c.clone(), bucket(*b)))
                    .collect();
                (v.ready, bucket(v.left as f64 + 1.0), learned)
            })
            .collect();
        PlanKey {
            job,
            class: class.to_string(),
            stages,
        }
    }
}

/// How long (claim time, ms) a deadline plan is reused.
pub(crate) const PLAN_REUSE_MS: i64 = 1000;

impl Plans {
    /// The plan for `key` made within [`PLAN_REUSE_MS`] of `now_ms`, if any.
    pub(crate) fn fresh(&self, key: &PlanKey, now_ms: i64) -> Option<Option<Vec<bool>>> {
        self.0
            .get(key)
            .filter(|(at, _)| (now_ms - at).abs() < PLAN_REUSE_MS)
            .map(|(_, plan)| plan.clone())
    }

    /// Whether a fairness split is due on this connection at `now_ms` (once per
    /// `every_ms`); marks it done if so.
    pub(crate) fn fair_split_due(&mut self, now_ms: i64, every_ms: i64) -> bool {
        let due = (now_ms - self.1).abs() >= every_ms;
        if due {
            self.1 = now_ms;
        }
        due
    }

    /// Keeps a plan made at `now_ms`.
    pub(crate) fn keep(&mut self, key: PlanKey, now_ms: i64, plan: Option<Vec<bool>>) {
        if self.0.len() > 256 {
            self.0.clear();
        }
        self.0.insert(key, (now_ms, plan));
    }
}

/// Pending ranges a new stage starts as, so that claimers do not queue on one row.
pub(crate) const SHARDS: u64 = 64;

/// What a transaction is for: a backend may take its write lock up front for the
/// ones that write, and counts rows written by claims, flushes and finishes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum TxKind {
    /// Reads only.
    Read,
    /// Writes (not counted).
    Write,
    /// A claim.
    Claim,
    /// A flush.
    Flush,
    /// A finish.
    Finish,
}

/// The columns of a stage row the transitions need.
pub(crate) struct StageRow {
    pub(crate) id: i64,
    pub(crate) idx: usize,
    pub(crate) name: String,
    pub(crate) items: u64,
    pub(crate) after: Vec<usize>,
    pub(crate) sizer_config: SizerConfig,
    pub(crate) state: String,
    pub(crate) acks: Acks,
    pub(crate) needs: StageNeeds,
}

impl StageRow {
    /// Whether it has ended: every item done or quarantined, or skipped.
    pub(crate) fn is_done(&self) -> bool {
        self.state == StageState::Done.as_str() || self.state == StageState::Skipped.as_str()
    }
}

const STAGE_COLUMNS: &str = "id, idx, name, items, after, sizer_config, state, acks, needs";

fn stage_row(r: &Row) -> Result<StageRow> {
    Ok(StageRow {
        id: r.i64(0),
        idx: r.u64(1) as usize,
        name: r.string(2),
        items: r.u64(3),
        after: parse(r.str(4), "stage after")?,
        sizer_config: decode_sizer_config(r.str(5))?,
        state: r.string(6),
        acks: r.str(7).parse()?,
        needs: parse(r.str(8), "stage needs")?,
    })
}

/// A job's stages in spec order; with `running`, none unless the job still runs.
pub(crate) fn stages_of(tx: &mut dyn Db, job: i64, running: bool) -> Result<Vec<StageRow>> {
    let sql = format!(
        "SELECT {STAGE_COLUMNS} FROM stages WHERE job_id = $1
           AND ($2 = 0 OR EXISTS (SELECT 1 FROM jobs WHERE id = $1 AND state = 'running'))
         ORDER BY idx"
    );
    tx.query(&sql, args![job, i64::from(running)])?
        .iter()
        .map(stage_row)
        .collect()
}

/// Stops a running job with an error (`refused`, `broken`); its running fragments
/// are told at their next flush and their accounting is kept.
pub(crate) fn halt_job(tx: &mut dyn Db, job: i64, halt: &JobHalt, now_ms: i64) -> Result<()> {
    tx.execute(
        "UPDATE jobs SET state = $2, error = $3, finished_ms = $4 WHERE id = $1 AND state = 'running'",
        args![job, halt.state(), halt.message(), now_ms],
    )?;
    Ok(())
}

/// How a backend runs the transitions: a transaction, and how idle workers wait.
pub(crate) trait Backend {
    /// Runs `f` in one transaction of kind `kind`, committed if it returns `Ok`.
    fn transaction<T>(
        &mut self,
        kind: TxKind,
        f: impl FnOnce(&mut dyn Db) -> Result<T>,
    ) -> Result<T>;
    /// Rows written so far by claims, flushes and finishes, where counted.
    fn counted_writes(&self) -> Option<crate::WriteCounts>;
    /// Whether a claim may skip rows other transactions hold locked (then a claim
    /// that found only those tries again shortly).
    fn skips_locked_rows(&self) -> bool;
    /// See `Store::wait_for_work`.
    fn wait(&mut self, timeout: std::time::Duration) -> Result<bool>;
    /// See `Store::idle_poll`.
    fn poll_interval(&self) -> std::time::Duration;
}

/// Implements `Store` for a [`Backend`] by running each call's transition in one of
/// its transactions.
macro_rules! store_over_backend {
    ($t:ty) => {
        impl $crate::Store for $t {
            fn submit(
                &mut self,
                job: &$crate::NewJob,
                now_ms: i64,
                fresh: bool,
            ) -> $crate::Result<$crate::Submitted> {
                $crate::ops::jobs::submit(self, job, now_ms, fresh)
            }
            fn job(&mut self, name: &str) -> $crate::Result<Option<$crate::JobRecord>> {
                $crate::ops::jobs::job(self, $crate::ops::jobs::JobKey::Name(name))
            }
            fn job_by_id(
                &mut self,
                id: granule_core::JobId,
            ) -> $crate::Result<Option<$crate::JobRecord>> {
                $crate::ops::jobs::job(self, $crate::ops::jobs::JobKey::Id(id.0))
            }
            fn cancel(&mut self, name: &str, now_ms: i64) -> $crate::Result<bool> {
                $crate::ops::jobs::cancel(self, name, now_ms)
            }
            fn halt(
                &mut self,
                job: granule_core::JobId,
                why: &str,
                now_ms: i64,
            ) -> $crate::Result<bool> {
                $crate::ops::jobs::halt(self, job, why, now_ms)
            }
            fn retry(
                &mut self,
                job: &str,
                stage: Option<&str>,
                now_ms: i64,
            ) -> $crate::Result<u64> {
                $crate::ops::jobs::retry(self, job, stage, now_ms)
            }
            fn job_list(&mut self) -> $crate::Result<Vec<$crate::JobSummary>> {
                $crate::ops::jobs::list(self)
            }
            fn set_shares(&mut self, account: bool, name: &str, shares: f64) -> $crate::Result<()> {
                $crate::ops::fair::set_shares(self, account, name, shares)
            }
            fn set_half_life(&mut self, half_life_ms: f64) -> $crate::Result<()> {
                $crate::ops::fair::set_half_life(self, half_life_ms)
            }
            fn fair_share(&mut self, now_ms: i64) -> $crate::Result<$crate::FairShare> {
                $crate::ops::fair::report(self, now_ms)
            }
            fn fragments(
                &mut self,
                job: &str,
                since_ms: i64,
                limit: u32,
            ) -> $crate::Result<Vec<$crate::FragmentRow>> {
                $crate::ops::read::fragments(self, job, since_ms, limit)
            }
            fn fragments_after(
                &mut self,
                finished: bool,
                after: (i64, i64),
                limit: u32,
            ) -> $crate::Result<Vec<$crate::FragmentRow>> {
                $crate::ops::read::fragments_after(self, finished, after, limit)
            }
            fn open_jobs(&mut self) -> $crate::Result<Vec<granule_core::JobId>> {
                $crate::ops::jobs::open_jobs(self)
            }
            fn register_worker(
                &mut self,
                w: &$crate::WorkerInfo,
                now_ms: i64,
            ) -> $crate::Result<()> {
                $crate::ops::jobs::register_worker(self, w, now_ms)
            }
            fn set_worker_state(
                &mut self,
                worker: &str,
                state: &str,
                now_ms: i64,
            ) -> $crate::Result<()> {
                $crate::ops::jobs::set_worker_state(self, worker, state, now_ms)
            }
            fn claim(
                &mut self,
                req: &$crate::ClaimRequest,
            ) -> $crate::Result<Option<$crate::Assignment>> {
                Ok($crate::ops::claim::claim_many(self, req, 1)?
                    .into_iter()
                    .next())
            }
            fn claim_many(
                &mut self,
                req: &$crate::ClaimRequest,
                slots: usize,
            ) -> $crate::Result<Vec<$crate::Assignment>> {
                $crate::ops::claim::claim_many(self, req, slots)
            }
            fn flush(
                &mut self,
                worker: &str,
                now_ms: i64,
                lease_ms: i64,
                heartbeat: &$crate::Heartbeat,
                batch: &[$crate::FragmentFlush],
            ) -> $crate::Result<$crate::FlushReply> {
                $crate::ops::fragment::flush(self, worker, now_ms, lease_ms, heartbeat, batch)
            }
            fn request_split(
                &mut self,
                job: Option<granule_core::JobId>,
                now_ms: i64,
                min_ms: f64,
                class: &str,
            ) -> $crate::Result<Option<granule_core::FragmentId>> {
                $crate::ops::fragment::request_split(self, job, now_ms, min_ms, class)
            }
            fn finish(
                &mut self,
                worker: &str,
                now_ms: i64,
                end: &$crate::FragmentEnd,
            ) -> $crate::Result<$crate::Finished> {
                $crate::ops::fragment::finish(self, worker, now_ms, end)
            }
            fn finish_and_claim(
                &mut self,
                worker: &str,
                now_ms: i64,
                end: &$crate::FragmentEnd,
                next: Option<(&$crate::ClaimRequest, usize)>,
            ) -> $crate::Result<($crate::Finished, Vec<$crate::Assignment>)> {
                $crate::ops::fragment::finish_and_claim(self, worker, now_ms, end, next)
            }
            fn workers_holding_work(&mut self) -> $crate::Result<Vec<$crate::WorkerInfo>> {
                $crate::ops::read::workers_holding_work(self)
            }
            fn release(&mut self, now_ms: i64, dead: &[String]) -> $crate::Result<u64> {
                $crate::ops::fragment::release(self, now_ms, dead)
            }
            fn status(&mut self, job: Option<&str>) -> $crate::Result<Vec<$crate::JobStatus>> {
                $crate::ops::read::status(self, job)
            }
            fn progress(
                &mut self,
                job: granule_core::JobId,
            ) -> $crate::Result<Vec<$crate::StageProgress>> {
                $crate::ops::read::progress(self, job)
            }
            fn write_counts(&self) -> Option<$crate::WriteCounts> {
                $crate::ops::Backend::counted_writes(self)
            }
            fn workers(
                &mut self,
                now_ms: i64,
                window_ms: i64,
            ) -> $crate::Result<Vec<$crate::WorkerStatus>> {
                $crate::ops::read::workers(self, now_ms, window_ms)
            }
            fn pools(&mut self) -> $crate::Result<Vec<$crate::PoolStatus>> {
                $crate::ops::read::pools(self)
            }
            fn set_pools(&mut self, pools: &[$crate::PoolStatus]) -> $crate::Result<()> {
                $crate::ops::jobs::set_pools(self, pools)
            }
            fn worker_history(
                &mut self,
                now_ms: i64,
                since_ms: i64,
            ) -> $crate::Result<Vec<granule_core::WorkerSpan>> {
                $crate::ops::Backend::transaction(self, $crate::ops::TxKind::Read, |tx| {
                    $crate::ops::read::history(tx, now_ms, since_ms)
                })
            }
            fn logs(
                &mut self,
                job: &str,
                stage: &str,
                fragment: Option<i64>,
            ) -> $crate::Result<Vec<$crate::FragmentLog>> {
                $crate::ops::read::logs(self, job, stage, fragment)
            }
            fn stream_values(
                &mut self,
                stage: granule_core::StageId,
                span: granule_core::Span,
            ) -> $crate::Result<Vec<granule_core::Published>> {
                $crate::ops::Backend::transaction(self, $crate::ops::TxKind::Read, |tx| {
                    $crate::ops::data::stream_values(tx, stage.0, span)
                })
            }
            fn outputs(
                &mut self,
                job: &str,
                stage: &str,
            ) -> $crate::Result<Vec<$crate::OutputRow>> {
                $crate::ops::data::outputs(self, job, stage)
            }
            fn blob_keys(&mut self) -> $crate::Result<Vec<String>> {
                $crate::ops::data::blob_keys(self)
            }
            fn remove(&mut self, name: &str) -> $crate::Result<bool> {
                $crate::ops::jobs::remove(self, name)
            }
            fn results(
                &mut self,
                job: &str,
                stage: &str,
            ) -> $crate::Result<Vec<$crate::ResultRow>> {
                $crate::ops::read::results(self, job, stage)
            }
            fn blob(&mut self, id: i64) -> $crate::Result<Option<$crate::StoredBlob>> {
                $crate::ops::read::blob(self, id)
            }
            fn checkpoint_before(&mut self, id: i64) -> $crate::Result<Option<i64>> {
                $crate::ops::read::checkpoint_before(self, id)
            }
            fn accounting(&mut self, job: &str, stage: &str) -> $crate::Result<$crate::Accounting> {
                $crate::ops::read::accounting(self, job, stage)
            }
            fn wait_for_work(&mut self, timeout: std::time::Duration) -> $crate::Result<bool> {
                $crate::ops::Backend::wait(self, timeout)
            }
            fn idle_poll(&self) -> std::time::Duration {
                $crate::ops::Backend::poll_interval(self)
            }
        }
    };
}
pub(crate) use store_over_backend;

#[cfg(test)]
mod tests {
    use super::*;
    use granule_core::StageView;

    fn view(left: u64, cost: Option<f64>) -> StageView {
        StageView {
            idx: 0,
            needs: StageNeeds::default(),
            after: Vec::new(),
            ready: true,
            running: 0,
            left,
            learned: cost.map(|b| ("a".to_string(), b)).into_iter().collect(),
            checkpoints: false,
            deadline_at_ms: Some(1),
            owner_turn: 0,
        }
    }

    /// A plan is reused for a second of claim time while its inputs hold; work left
    /// or a learned cost that moved, or another class, needs a new one.
    #[test]
    fn a_plan_is_reused_only_while_its_inputs_hold() {
        let mut plans = Plans::default();
        let key = PlanKey::new(1, "a", &[view(10_000, Some(1.0))]);
        plans.keep(key.clone(), 5_000, Some(vec![true]));
        assert_eq!(plans.fresh(&key, 5_900), Some(Some(vec![true])));
        assert_eq!(plans.fresh(&key, 6_000), None, "a second later");
        let nearly = PlanKey::new(1, "a", &[view(10_050, Some(1.01))]);
        assert_eq!(nearly, key, "within a few percent");
        for moved in [
            PlanKey::new(1, "a", &[view(9_000, Some(1.0))]),
            PlanKey::new(1, "a", &[view(10_000, Some(1.5))]),
            PlanKey::new(1, "a", &[view(10_000, None)]),
            PlanKey::new(1, "b", &[view(10_000, Some(1.0))]),
        ] {
            assert_eq!(plans.fresh(&moved, 5_100), None);
        }
    }
}

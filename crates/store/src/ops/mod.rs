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
pub(crate) mod fragment;
pub(crate) mod jobs;
pub(crate) mod read;

use crate::common::{decode_sizer_config, parse};
use crate::db::{args, Db, Row};
use crate::{Acks, JobHalt, Result, StageState};
use granule_core::{SizerConfig, StageNeeds};

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
    pub(crate) retries: u32,
    pub(crate) sizer_config: SizerConfig,
    pub(crate) state: String,
    pub(crate) acks: Acks,
    pub(crate) needs: StageNeeds,
}

impl StageRow {
    /// Whether every item of it is done or quarantined.
    pub(crate) fn is_done(&self) -> bool {
        self.state == StageState::Done.as_str()
    }
}

const STAGE_COLUMNS: &str =
    "id, idx, name, items, after, retries, sizer_config, state, acks, needs";

fn stage_row(r: &Row) -> Result<StageRow> {
    Ok(StageRow {
        id: r.i64(0),
        idx: r.u64(1) as usize,
        name: r.string(2),
        items: r.u64(3),
        after: parse(r.str(4), "stage after")?,
        retries: r.u32(5),
        sizer_config: decode_sizer_config(r.str(6))?,
        state: r.string(7),
        acks: r.str(8).parse()?,
        needs: parse(r.str(9), "stage needs")?,
    })
}

/// A job's stages in spec order.
pub(crate) fn stages_of(tx: &mut dyn Db, job: i64) -> Result<Vec<StageRow>> {
    let sql = format!("SELECT {STAGE_COLUMNS} FROM stages WHERE job_id = $1 ORDER BY idx");
    tx.query(&sql, args![job])?.iter().map(stage_row).collect()
}

/// One stage by id.
pub(crate) fn stage_by_id(tx: &mut dyn Db, stage: i64) -> Result<StageRow> {
    let sql = format!("SELECT {STAGE_COLUMNS} FROM stages WHERE id = $1");
    stage_row(&tx.query_one(&sql, args![stage])?)
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

//! granule's durable state, behind one [`Store`] trait.
//!
//! Every state transition (submit, claim, ack flush, finish, recovery) is one
//! transaction that reads the rows it needs, applies the pure transition from
//! `granule-core`, and writes what changed: written once in `ops`, over the `Db`
//! seam (`db.rs`) both backends implement. Item sets are interval sets stored as
//! JSON, so the store grows with fragments, never with items. Writes by a
//! fragment's holder are fenced by its worker id and `running` state: a worker
//! whose lease was taken over cannot count anything.

mod common;
mod db;
mod model;
mod ops;
mod pg;
mod schema;
mod sqlite;
pub mod testing;

pub use model::*;
pub use pg::PgStore;
pub use sqlite::SqliteStore;

use granule_core::{FragmentId, JobId, Published, Span, StageId, WorkerSpan};

/// Errors of the store.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum StoreError {
    /// A job of that name exists with another spec.
    #[error("job \"{0}\" already exists with a different spec; rerun with --fresh to discard its state and start over, or rename the job")]
    SpecChanged(String),
    /// No job of that name.
    #[error("no job named \"{0}\" in this store")]
    NoSuchJob(String),
    /// The job is cancelled or removed: nothing to retry.
    #[error("job \"{0}\" is {1}; only a job that runs or ended can be retried")]
    NotRetryable(String, String),
    /// The job has no stage of that name.
    #[error("job \"{0}\" has no stage named \"{1}\"")]
    NoSuchStage(String, String),
    /// The job still runs: cancel it first.
    #[error("job \"{0}\" is still running; cancel it first (granule cancel {0})")]
    Running(String),
    /// The database said no.
    #[error("sqlite: {0}")]
    Sqlite(#[from] rusqlite::Error),
    /// Stored state could not be decoded.
    #[error("stored state is corrupt: {0}")]
    Corrupt(String),
    /// PostgreSQL said no.
    #[error("postgres: {0}")]
    Postgres(#[from] postgres::Error),
    /// The database cannot be reached now (it may come back: retry later).
    #[error("store unavailable: {0}")]
    Unavailable(String),
}

impl StoreError {
    /// Whether the database's disk is full (SQLite's `SQLITE_FULL`).
    pub fn is_disk_full(&self) -> bool {
        matches!(self, StoreError::Sqlite(e) if e.sqlite_error_code() == Some(rusqlite::ErrorCode::DiskFull))
            || matches!(self, StoreError::Postgres(e) if e.code().is_some_and(|c| c.code() == "53100"))
    }

    /// Whether a unique constraint refused a row (two inserts of one key raced).
    pub fn is_unique_violation(&self) -> bool {
        match self {
            StoreError::Postgres(e) => {
                e.code() == Some(&postgres::error::SqlState::UNIQUE_VIOLATION)
            }
            StoreError::Sqlite(e) => {
                e.sqlite_error_code() == Some(rusqlite::ErrorCode::ConstraintViolation)
            }
            _ => false,
        }
    }

    /// Whether trying again later may succeed (a lost connection, a busy database).
    pub fn is_transient(&self) -> bool {
        match self {
            StoreError::Unavailable(_) => true,
            StoreError::Postgres(e) => {
                e.is_closed()
                    || e.code().is_none_or(|c| {
                        // 08: connection, 57: shutdown, 53100: disk full, 40001 and
                        // 40P01: a serialization failure or deadlock victim, whose
                        // transaction rolled back whole and may simply run again;
                        // 25P03: the session sat idle in a transaction too long.
                        let c = c.code();
                        c.starts_with("08")
                            || c.starts_with("57")
                            || c == "53100"
                            || c == "40001"
                            || c == "40P01"
                            || c == "25P03"
                    })
            }
            StoreError::Sqlite(e) => matches!(
                e.sqlite_error_code(),
                Some(
                    rusqlite::ErrorCode::DatabaseBusy
                        | rusqlite::ErrorCode::DatabaseLocked
                        | rusqlite::ErrorCode::DiskFull
                )
            ),
            _ => false,
        }
    }
}

/// Result alias of the store.
pub type Result<T, E = StoreError> = std::result::Result<T, E>;

/// The operations every backend provides.
pub trait Store {
    /// Records a job (or finds it again): the same spec resumes, a changed one is
    /// refused unless `fresh`, which discards the old state.
    fn submit(&mut self, job: &NewJob, now_ms: i64, fresh: bool) -> Result<Submitted>;
    /// A job's stored spec and state, by name.
    fn job(&mut self, name: &str) -> Result<Option<JobRecord>>;
    /// A job's stored spec and state, by id.
    fn job_by_id(&mut self, id: JobId) -> Result<Option<JobRecord>>;
    /// Cancels a running job; false if there is no running job of that name.
    fn cancel(&mut self, name: &str, now_ms: i64) -> Result<bool>;
    /// Stops a running job whose task looks broken (`halt`); false if it was not
    /// running.
    fn halt(&mut self, job: JobId, why: &str, now_ms: i64) -> Result<bool>;
    /// Puts quarantined items (of `stage`, or every stage) back to pending with
    /// fresh retries and reopens the job; returns how many items.
    fn retry(&mut self, job: &str, stage: Option<&str>, now_ms: i64) -> Result<u64>;
    /// Every job, oldest first (`granule jobs`).
    fn job_list(&mut self) -> Result<Vec<JobSummary>>;
    /// Sets the fair-share shares of an owner, or with `account` of an account.
    fn set_shares(&mut self, account: bool, name: &str, shares: f64) -> Result<()>;
    /// Sets the half-life of the usage fair share judges owners by, ms.
    fn set_half_life(&mut self, half_life_ms: f64) -> Result<()>;
    /// Each owner's shares, recent usage and slots now (`granule status`).
    fn fair_share(&mut self, now_ms: i64) -> Result<FairShare>;
    /// A job's fragments claimed since `since_ms` or still running then, oldest
    /// first, at most `limit` (the newest kept): the dashboard's timeline.
    fn fragments(&mut self, job: &str, since_ms: i64, limit: u32) -> Result<Vec<FragmentRow>>;
    /// Fragments of every job claimed (or, with `finished`, ended) after the cursor
    /// `(unix ms, id)`, in that order, at most `limit`: what `/metrics` counts.
    fn fragments_after(
        &mut self,
        finished: bool,
        after: (i64, i64),
        limit: u32,
    ) -> Result<Vec<FragmentRow>>;
    /// Jobs not yet finished, oldest first.
    fn open_jobs(&mut self) -> Result<Vec<JobId>>;
    /// Registers or refreshes a worker.
    fn register_worker(&mut self, worker: &WorkerInfo, now_ms: i64) -> Result<()>;
    /// Marks a worker `draining` or `exited`.
    fn set_worker_state(&mut self, worker: &str, state: &str, now_ms: i64) -> Result<()>;
    /// Carves a fragment for a slot of `req.worker`, sized by the stage's sizer.
    fn claim(&mut self, req: &ClaimRequest) -> Result<Option<Assignment>>;
    /// Claims for up to `slots` free slots of `req.worker` in one transaction, each
    /// claim offered what the ones before it left (`WorkerOffer::less`); stops at the
    /// first slot nothing is left for.
    fn claim_many(&mut self, req: &ClaimRequest, slots: usize) -> Result<Vec<Assignment>>;
    /// Records acks, checkpoints and split answers of running fragments, renews the
    /// worker's leases and heartbeat; answers with split requests and lost fragments.
    fn flush(
        &mut self,
        worker: &str,
        now_ms: i64,
        lease_ms: i64,
        heartbeat: &Heartbeat,
        batch: &[FragmentFlush],
    ) -> Result<FlushReply>;
    /// Asks the owner of the running fragment with the most predicted remaining
    /// work (at least `min_ms`) to give up the second half of it; returns that
    /// fragment, or `None` if nothing is worth splitting. Remaining work counts
    /// `split_gain` times more on a class slower than the asker's (`class`) there.
    fn request_split(
        &mut self,
        job: Option<JobId>,
        now_ms: i64,
        min_ms: f64,
        class: &str,
    ) -> Result<Option<FragmentId>>;
    /// Ends a fragment; its final acks and checkpoints are in `end.flush`.
    fn finish(&mut self, worker: &str, now_ms: i64, end: &FragmentEnd) -> Result<Finished>;
    /// Ends a fragment and, in the same transaction, claims for up to `slots` free
    /// slots (`next`, as `claim_many`): the slot a finish frees is refilled without a
    /// second round of the store. A claim that finds nothing returns no assignment.
    fn finish_and_claim(
        &mut self,
        worker: &str,
        now_ms: i64,
        end: &FragmentEnd,
        next: Option<(&ClaimRequest, usize)>,
    ) -> Result<(Finished, Vec<Assignment>)>;
    /// Workers that hold running fragments, for a liveness check by the caller.
    fn workers_holding_work(&mut self) -> Result<Vec<WorkerInfo>>;
    /// Returns to pending the unacked items of fragments whose lease expired or
    /// whose worker is in `dead`; returns how many fragments were released.
    fn release(&mut self, now_ms: i64, dead: &[String]) -> Result<u64>;
    /// Status of one job or all.
    fn status(&mut self, job: Option<&str>) -> Result<Vec<JobStatus>>;
    /// Progress of a job's stages in spec order, from kept counters (cheap: no history).
    fn progress(&mut self, job: JobId) -> Result<Vec<StageProgress>>;
    /// Rows written so far by this connection's claims, flushes and finishes, where
    /// the backend counts them (SQLite); for benchmarks of write amplification.
    fn write_counts(&self) -> Option<WriteCounts> {
        None
    }
    /// Workers seen within `window_ms`, or still holding work.
    fn workers(&mut self, now_ms: i64, window_ms: i64) -> Result<Vec<WorkerStatus>>;
    /// Every pool `granule serve` has written (its last decision and launch error).
    fn pools(&mut self) -> Result<Vec<PoolStatus>>;
    /// Writes pools' state (`granule serve`, every planning round).
    fn set_pools(&mut self, pools: &[PoolStatus]) -> Result<()>;
    /// Lives of the workers alive since `since_ms`, for forecasts of the pool: a
    /// worker silent for a minute counts as ended; `lost` if it lost a fragment.
    fn worker_history(&mut self, now_ms: i64, since_ms: i64) -> Result<Vec<WorkerSpan>>;
    /// Stored output tails of a stage's fragments (or one fragment).
    fn logs(&mut self, job: &str, stage: &str, fragment: Option<i64>) -> Result<Vec<FragmentLog>>;
    /// Results of a stage: the state each chain of attempts ended with, in item order.
    fn results(&mut self, job: &str, stage: &str) -> Result<Vec<ResultRow>>;
    /// The published outputs behind items `span` of a streamed stage, one per item
    /// in index order (the upstream item each came from, and the output).
    fn stream_values(&mut self, stage: StageId, span: Span) -> Result<Vec<Published>>;
    /// Every output a stage published, in published order.
    fn outputs(&mut self, job: &str, stage: &str) -> Result<Vec<OutputRow>>;
    /// Every blob key the store's jobs refer to (what `gc` keeps).
    fn blob_keys(&mut self) -> Result<Vec<String>>;
    /// Deletes a job that is not running, with everything it kept; false if there
    /// is no such job. A running job is refused (`StoreError::Running`).
    fn remove(&mut self, name: &str) -> Result<bool>;
    /// A checkpoint blob by id, with the checkpoint before it and what it covers.
    fn blob(&mut self, id: i64) -> Result<Option<StoredBlob>>;
    /// The checkpoint before `id` in its chain, found even when `id`'s own record
    /// is gone (from the fragment that wrote it).
    fn checkpoint_before(&mut self, id: i64) -> Result<Option<i64>>;
    /// Where every item of a stage is now, as sets (for checks and model tests).
    fn accounting(&mut self, job: &str, stage: &str) -> Result<Accounting>;
    /// Waits up to `timeout` for a sign that work appeared (a notification where the
    /// backend has them); true if one came. Backends without them just sleep.
    fn wait_for_work(&mut self, timeout: std::time::Duration) -> Result<bool>;
    /// How often an idle worker should try to claim without a sign of new work.
    fn idle_poll(&self) -> std::time::Duration;
}

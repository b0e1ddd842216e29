//! The values that cross the store boundary.

use granule_core::{
    ClaimContext, FinishOutcome, FragmentId, IntervalSet, JobId, SizeCap, SizerConfig, Span,
    StageId, StageNeeds, WorkerOffer,
};
use serde::{Deserialize, Serialize};

/// A job to record: its name, a digest of its spec, the spec as JSON, and per stage
/// what the store needs to account and size it.
#[derive(Clone, Debug)]
pub struct NewJob {
    /// Unique name.
    pub name: String,
    /// Digest of the spec; a different digest under the same name is a changed spec.
    pub spec_hash: String,
    /// The whole spec, JSON (workers rebuild their commands from it).
    pub spec_json: String,
    /// Stages in spec order.
    pub stages: Vec<NewStage>,
}

/// One stage of a [`NewJob`].
#[derive(Clone, Debug, Default)]
pub struct NewStage {
    /// Name.
    pub name: String,
    /// Number of items.
    pub items: u64,
    /// Indices (in the job) of the stages it waits for.
    pub after: Vec<usize>,
    /// Retries before bisection.
    pub retries: u32,
    /// Sizer configuration.
    pub sizer: SizerConfig,
    /// What one slot needs, class, priority (placement).
    pub needs: StageNeeds,
    /// Digest of the task (see `granule_spec::cost_key`): stages with the same key
    /// start from the costs earlier stages of it learned; empty learns nothing.
    pub cost_key: String,
    /// Indices of the stages whose outputs (or results) are its items, published
    /// while they run; empty for items fixed at submit.
    pub sources: Vec<usize>,
    /// Its items are its sources' results (final checkpoints), not their outputs.
    pub from_results: bool,
    /// Indices (also in `after`) of the stages it waits for however they ended;
    /// the others must end without quarantined items, or it is skipped.
    pub after_any: Vec<usize>,
}

/// What `submit` found.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Submitted {
    /// A new job.
    Created(JobId),
    /// An unfinished job with the same spec.
    Resumed(JobId),
    /// A finished job with the same spec: nothing to do.
    AlreadyFinished(JobId),
}

impl Submitted {
    /// The job's id.
    pub fn id(&self) -> JobId {
        match *self {
            Submitted::Created(id) | Submitted::Resumed(id) | Submitted::AlreadyFinished(id) => id,
        }
    }
}

/// A state the store keeps as a word: `Display` and `as_str` give the word, `FromStr`
/// reads it back (an unknown word is a corrupt store), serde writes the word, and it
/// compares equal to its word.
macro_rules! stored_state {
    ($(#[$doc:meta])* $name:ident { $($(#[$vdoc:meta])* $variant:ident = $text:literal),+ $(,)? }) => {
        $(#[$doc])*
        #[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize)]
        pub enum $name {
            $($(#[$vdoc])* #[serde(rename = $text)] $variant),+
        }

        impl $name {
            /// The word the store keeps.
            pub fn as_str(self) -> &'static str {
                match self {
                    $($name::$variant => $text),+
                }
            }
        }

        impl std::fmt::Display for $name {
            fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str(self.as_str())
            }
        }

        impl std::str::FromStr for $name {
            type Err = crate::StoreError;
            fn from_str(s: &str) -> Result<Self, Self::Err> {
                match s {
                    $($text => Ok($name::$variant),)+
                    other => Err(crate::StoreError::Corrupt(format!(
                        concat!("unknown ", stringify!($name), " {:?}"),
                        other
                    ))),
                }
            }
        }

        impl PartialEq<&str> for $name {
            fn eq(&self, other: &&str) -> bool {
                self.as_str() == *other
            }
        }

        impl<'a> crate::db::IntoArg<'a> for $name {
            fn arg(self) -> crate::db::Arg<'a> {
                crate::db::Arg::Text(self.as_str())
            }
        }
    };
}

stored_state! {
    /// Where a job is.
    JobState {
        /// Claimable work remains or runs.
        Running = "running",
        /// Every item done.
        Done = "done",
        /// Finished with quarantined items.
        Failed = "failed",
        /// Cancelled; its done items are kept.
        Cancelled = "cancelled",
        /// Its input is not what was submitted.
        Refused = "refused",
        /// Its stored state cannot be read.
        Broken = "broken",
        /// Stopped because its task failed too often (`halt`); `granule retry`
        /// resumes it.
        Halted = "halted",
        /// Removed (`granule rm`, `--fresh`): only its id is kept, never to be
        /// given to another job.
        Removed = "removed",
    }
}

stored_state! {
    /// Where a stage is.
    StageState {
        /// Waits for the stages before it.
        Waiting = "waiting",
        /// Its items are being claimed and run.
        Running = "running",
        /// Every item done or quarantined.
        Done = "done",
        /// Ended with quarantined items (shown, never stored: stored as `done`).
        Failed = "failed",
        /// Never ran: a stage it comes `after` ended with quarantined items.
        Skipped = "skipped",
    }
}

stored_state! {
    /// How a fragment stands or ended.
    FragmentState {
        /// Held by a worker.
        Running = "running",
        /// Ran to its end.
        Done = "done",
        /// Failed (exit, signal, timeout, oom, protocol).
        Failed = "failed",
        /// Stopped early at a safe point; its rest went back to pending.
        Yielded = "yielded",
        /// Its worker vanished or its lease expired.
        Lost = "lost",
        /// Its job was cancelled while it ran.
        Cancelled = "cancelled",
        /// Counted all-or-nothing, then undone by its stage's first ack.
        Reverted = "reverted",
        /// Its job was refused while it ran.
        Refused = "refused",
        /// Its job broke while it ran.
        Broken = "broken",
    }
}

stored_state! {
    /// Whether a stage's tasks ack items, as learned from its fragments.
    Acks {
        /// No fragment has finished yet.
        Unknown = "unknown",
        /// A task acked: from now on unacked fed items fail.
        Yes = "yes",
        /// A task finished its input without a single ack: all-or-nothing.
        No = "no",
    }
}

stored_state! {
    /// Where a worker is.
    WorkerState {
        /// Claims and runs work.
        Running = "running",
        /// Stopping: yields its fragments and claims nothing.
        Draining = "draining",
        /// Gone (said so, or found dead).
        Exited = "exited",
    }
}

impl Acks {
    /// What a worker expects of a fragment's task: acks (`Some(true)`), none
    /// (`Some(false)`), or not known yet.
    pub fn expected(self) -> Option<bool> {
        match self {
            Acks::Yes => Some(true),
            Acks::No => Some(false),
            Acks::Unknown => None,
        }
    }
}

/// A stored job.
#[derive(Clone, Debug)]
pub struct JobRecord {
    /// Id.
    pub id: JobId,
    /// Name.
    pub name: String,
    /// Where it is.
    pub state: JobState,
    /// The spec, JSON.
    pub spec_json: String,
    /// Why it was refused or broke.
    pub error: Option<String>,
}

/// A worker as the store knows it.
#[derive(Clone, Debug, PartialEq)]
pub struct WorkerInfo {
    /// Unique id, `host:pid:random` (random per start, so hosts sharing a name never
    /// share an id).
    pub id: String,
    /// Host name.
    pub host: String,
    /// Process id on that host.
    pub pid: i64,
    /// Process start time (ticks since boot), to tell a reused pid apart.
    pub proc_start: i64,
    /// Slots it runs.
    pub slots: u32,
    /// Executor class.
    pub class: String,
    /// When its lifespan ends, unix ms, if it has one.
    pub lifespan_end_ms: Option<i64>,
    /// What it costs per hour (any currency; 0 when not declared).
    pub cost_per_hour: f64,
    /// Whether it is spot (preemptible) capacity.
    pub spot: bool,
    /// Detected and declared resources, JSON (`{"cpus":..,"memory_mb":..,"gpus":[..],"custom":{..}}`).
    pub resources: String,
    /// Where its pid means something (kernel boot and pid namespace): only a worker of
    /// the same locality can tell from the pid that it died.
    pub locality: String,
    /// The allocation a provider of `granule serve` started it in (`GRANULE_ALLOCATION`).
    pub allocation: Option<String>,
}

/// What a worker reports of itself with every flush.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Heartbeat {
    /// Slots running a fragment now.
    pub busy: u32,
    /// Share of memory free.
    pub free_memory: f64,
    /// Load per CPU.
    pub load: f64,
    /// Fragments the worker knows it runs: only their leases are renewed.
    pub held: Vec<FragmentId>,
}

/// A worker as `status` shows it.
#[derive(Clone, Debug, Serialize)]
pub struct WorkerStatus {
    /// Id.
    pub id: String,
    /// Host.
    pub host: String,
    /// Where it is.
    pub state: WorkerState,
    /// Executor class.
    pub class: String,
    /// Slots.
    pub slots: u32,
    /// Slots busy at the last heartbeat.
    pub busy: u32,
    /// Fragments it finished successfully.
    pub fragments_done: u64,
    /// Lifespan left, ms (negative once past), if it has one.
    pub lifespan_left_ms: Option<i64>,
    /// Time since its last heartbeat, ms.
    pub heartbeat_age_ms: i64,
    /// What it costs per hour.
    pub cost_per_hour: f64,
    /// Whether it is spot capacity.
    pub spot: bool,
    /// Detected and declared resources.
    pub resources: serde_json::Value,
    /// The allocation `granule serve` started it in, if it did.
    pub allocation: Option<String>,
    /// Its process id on its host.
    pub pid: i64,
    /// When that process started (to tell a reused pid apart).
    pub proc_start: i64,
    /// Its host's boot and pid namespace: where `pid` means this process.
    pub locality: String,
}

/// A pool of `granule serve` as its last planning round left it, for `status`.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct PoolStatus {
    /// The pool's name.
    pub name: String,
    /// Its workers' class.
    pub class: String,
    /// How it starts workers (`local`, `slurm`, `command`).
    pub provider: String,
    /// Workers the plan wants.
    pub wanted: u32,
    /// Allocations asked for and not started yet.
    pub pending: u32,
    /// Allocations running a worker.
    pub running: u32,
    /// Workers asked to leave and not gone yet.
    pub draining: u32,
    /// Allocations started since `serve` began.
    pub launched: u64,
    /// The last launch or provider error, and when (unix ms).
    pub last_error: Option<(String, i64)>,
    /// When `serve` wrote this, unix ms.
    pub updated_ms: i64,
}

/// A slot asking for work.
#[derive(Clone, Debug)]
pub struct ClaimRequest {
    /// The job to take from; `None`: any unfinished job, oldest first.
    pub job: Option<JobId>,
    /// The claiming worker.
    pub worker: String,
    /// Its class (selects the sizer state).
    pub class: String,
    /// Now, unix ms.
    pub now_ms: i64,
    /// Lease length, ms.
    pub lease_ms: i64,
    /// Slots sharing the job (for tail factoring).
    pub slots: u32,
    /// Most items the fragment may hold, whatever the sizer says.
    pub max_items: Option<u64>,
    /// What the worker offers: only stages that fit it are claimed.
    pub offer: WorkerOffer,
    /// Resource readings and lifespan; `remaining` and `slots` are filled per stage.
    pub context: ClaimContext,
    /// On spot capacity: how long such a worker is expected to last, from the pool's
    /// forecast loss rate. Fragments of stages whose tasks do not ack (a preemption
    /// loses them whole) are capped at Young's interval from it (`claim_context`).
    pub expected_life_ms: Option<f64>,
}

/// A claimed fragment.
#[derive(Clone, Debug)]
pub struct Assignment {
    /// Its id.
    pub fragment: FragmentId,
    /// Its job.
    pub job: JobId,
    /// Its stage.
    pub stage: StageId,
    /// The stage's position in the job spec.
    pub stage_index: usize,
    /// Its items.
    pub span: Span,
    /// Failures its items had before (attempt = failures + 1).
    pub failures: u32,
    /// Checkpoint to resume from.
    pub checkpoint: Option<i64>,
    /// Size chosen, predicted duration and the rule that decided.
    pub n: u64,
    /// Predicted duration, ms.
    pub predicted_ms: f64,
    /// Which rule decided the size.
    pub cap: SizeCap,
    /// The model's per-item cost, ms.
    pub item_cost_ms: f64,
    /// The model's per-fragment overhead, ms.
    pub overhead_ms: f64,
    /// Per-item cost against item size, `(intercept ms, ms per byte)`, once learned.
    pub size_fit: Option<(f64, f64)>,
    /// Whether the stage's tasks ack (`None`: not known yet).
    pub expect_acks: Option<bool>,
    /// What one slot of its stage needs (taken from the worker's offer while it runs).
    pub needs: StageNeeds,
    /// Elastic end (see `Sizing::feed_for_ms`): fed only while the items fed are
    /// predicted to finish within this many ms of the start; the rest handed back.
    pub feed_for_ms: Option<f64>,
}

/// A checkpoint a running fragment handed over, with the acks it came after.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct NewCheckpoint {
    /// The sealed state.
    pub blob: BlobRow,
    /// The fragment's own acks before it (their state is in it).
    pub acked: IntervalSet,
}

/// A stored checkpoint: the blob, the checkpoint before it in its chain, and the
/// items whose state it holds.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct StoredBlob {
    /// The sealed state.
    pub row: BlobRow,
    /// The checkpoint before it in its chain.
    pub prev: Option<i64>,
    /// Items whose state it holds.
    pub covers: IntervalSet,
}

/// A result of a stage: the state a chain of attempts ended with.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ResultRow {
    /// The fragment that ended the chain.
    pub fragment: i64,
    /// The state.
    pub blob: BlobRow,
    /// Items whose state it holds.
    pub covers: IntervalSet,
}

/// A sealed checkpoint as stored.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct BlobRow {
    /// Compressed bytes.
    pub data: Vec<u8>,
    /// Uncompressed length.
    pub raw_len: u64,
    /// blake3 of the uncompressed bytes, hex.
    pub hash: String,
    /// Metadata JSON (fragment size, resources, predicted remaining time).
    pub meta: String,
}

/// Acks and checkpoints of one fragment since its last flush.
#[derive(Clone, Debug, Default)]
pub struct FragmentFlush {
    /// The fragment.
    pub fragment: FragmentId,
    /// Newly acked items.
    pub acked: IntervalSet,
    /// Checkpoints in arrival order.
    pub checkpoints: Vec<NewCheckpoint>,
    /// The owner's answer to a split request.
    pub split: Option<SplitAnswer>,
    /// The checkpoint it was handed could not be restored: it started from this
    /// older one of its chain, or from none (`Some(None)`).
    pub restored: Option<Option<i64>>,
    /// Outputs of items acked in `acked` (or earlier: those publish nothing).
    pub outputs: Vec<granule_core::ItemOutputs>,
}

/// One published output of a stage, as `granule outputs` lists it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct OutputRow {
    /// Its index in the stage's published order (the item index of a stage that
    /// streams from it alone).
    pub index: u64,
    /// The upstream item it came from.
    pub item: u64,
    /// Its position among that item's outputs.
    pub ordinal: u32,
    /// The fragment whose ack published it.
    pub fragment: i64,
    /// The output.
    pub output: granule_core::Output,
}

/// How the owner of a fragment answered a split request.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SplitAnswer {
    /// It stopped feeding at this index: the tail from here on is free.
    At(u64),
    /// Nothing left to split (everything was fed already).
    Refused,
}

/// What a flush tells the worker back.
#[derive(Clone, Debug, Default)]
pub struct FlushReply {
    /// Items newly counted done.
    pub done: u64,
    /// Split requests for its fragments: (fragment, wanted end).
    pub split_requests: Vec<(FragmentId, u64)>,
    /// Its fragments it no longer holds (lease lost): stop them, count nothing.
    pub lost: Vec<FragmentId>,
    /// Its fragments of jobs that were cancelled or stopped: stop them; their
    /// acks are kept and the rest is pending again.
    pub stopped: Vec<FragmentId>,
}

/// How a fragment ended, with its measurements.
#[derive(Clone, Debug)]
pub struct FragmentEnd {
    /// Final acks and checkpoints.
    pub flush: FragmentFlush,
    /// Where it ended after any split (its span is cut there first).
    pub end: u64,
    /// What accounting does with the unacked rest.
    pub outcome: FinishOutcome,
    /// `Done`, `Yielded`, `Failed`.
    pub state: FragmentState,
    /// Failure cause (`exit`, `signal`, `timeout`, `oom`, ...), if any.
    pub cause: Option<String>,
    /// Human-readable detail.
    pub detail: Option<String>,
    /// Work run and then lost (fed but unacked items × cost), ms.
    pub wasted_ms: f64,
    /// Checkpoints that did not verify and were skipped when it started.
    pub checkpoint_fallbacks: u32,
    /// Wall time, ms.
    pub observed_ms: f64,
    /// CPU time, ms.
    pub cpu_ms: f64,
    /// Peak RSS, KiB.
    pub peak_rss_kb: u64,
    /// Block I/O of the task, bytes.
    pub io_bytes: u64,
    /// Bytes of the item values fed, where items have sizes (lines, lists).
    pub bytes: Option<u64>,
    /// The worker's own prediction of the duration (by item size), if it made one.
    pub predicted_ms: Option<f64>,
    /// Load per CPU at the end from others than the worker's own slots.
    pub load: f64,
    /// Items fed.
    pub fed: u64,
    /// Items acked.
    pub acks: u64,
    /// First and last ack, ms after start.
    pub first_ack_ms: Option<f64>,
    /// See `first_ack_ms`.
    pub last_ack_ms: Option<f64>,
    /// Output tails.
    pub stdout: Vec<u8>,
    /// See `stdout`.
    pub stderr: Vec<u8>,
    /// The worker cannot run the fragment's job at all: nothing is charged and the
    /// job stops, with this reason.
    pub halt: Option<JobHalt>,
}

/// Why a job stops before its items are done.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum JobHalt {
    /// Its input is not what was submitted (an items file changed): `refused`.
    Refused(String),
    /// Its stored state cannot be read: `broken`.
    Broken(String),
}

impl JobHalt {
    /// The job state it leaves.
    pub fn state(&self) -> JobState {
        match self {
            JobHalt::Refused(_) => JobState::Refused,
            JobHalt::Broken(_) => JobState::Broken,
        }
    }

    /// The message.
    pub fn message(&self) -> &str {
        match self {
            JobHalt::Refused(m) | JobHalt::Broken(m) => m,
        }
    }
}

impl FragmentEnd {
    /// A fragment that ended at `end` with every item done and nothing measured
    /// (for benchmarks and tests of the store's own path).
    pub fn success(fragment: FragmentId, end: u64) -> FragmentEnd {
        FragmentEnd {
            flush: FragmentFlush {
                fragment,
                ..FragmentFlush::default()
            },
            end,
            outcome: FinishOutcome::Success,
            state: FragmentState::Done,
            cause: None,
            detail: None,
            wasted_ms: 0.0,
            checkpoint_fallbacks: 0,
            observed_ms: 0.0,
            cpu_ms: 0.0,
            peak_rss_kb: 0,
            io_bytes: 0,
            bytes: None,
            predicted_ms: None,
            load: 0.0,
            fed: 1,
            acks: 0,
            first_ack_ms: None,
            last_ack_ms: None,
            stdout: Vec::new(),
            stderr: Vec::new(),
            halt: None,
        }
    }
}

/// What a finish changed.
#[derive(Clone, Debug, Default)]
pub struct Finished {
    /// False if the fragment was no longer ours (lease lost): nothing counted.
    pub accepted: bool,
    /// Items newly quarantined.
    pub quarantined: IntervalSet,
    /// Whether the job is now finished.
    pub job_finished: bool,
}

/// Status of a job.
#[derive(Clone, Debug, Serialize)]
pub struct JobStatus {
    /// Name.
    pub name: String,
    /// Where it is.
    pub state: JobState,
    /// When it was submitted, unix ms (deadlines count from here).
    pub created_ms: i64,
    /// Why it was refused or broke.
    pub error: Option<String>,
    /// Stages in spec order (none when its stored state cannot be read).
    pub stages: Vec<StageStatus>,
}

/// Rows a store's connection wrote, by kind of call: a benchmark checks with it that
/// a heartbeat or a finish costs the same however many fragments a worker runs.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize)]
pub struct WriteCounts {
    /// Claims made.
    pub claims: u64,
    /// Rows their transactions inserted, updated or deleted.
    pub claim_rows: u64,
    /// Flushes (heartbeats with their acks).
    pub flushes: u64,
    /// Rows their transactions wrote.
    pub flush_rows: u64,
    /// Finishes.
    pub finishes: u64,
    /// Rows their transactions wrote.
    pub finish_rows: u64,
}

/// How far a stage is, from counters the store keeps: what a progress bar shows
/// ten times a second, without the history `StageStatus` reads.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct StageProgress {
    /// Items in all.
    pub items: u64,
    /// Items done.
    pub done: u64,
    /// Items quarantined.
    pub quarantined: u64,
    /// Size of the latest fragment claimed.
    pub fragment_size: u64,
    /// Whether the stage has ended (a streamed stage may have no items left now
    /// and still get more).
    pub ended: bool,
    /// Whether work of it was ever claimed (it no longer waits for the stages
    /// before it).
    pub started: bool,
}

/// Fair share across jobs as `granule status` and `granule shares` show it.
#[derive(Clone, Debug, Serialize)]
pub struct FairShare {
    /// Half-life of recorded usage, seconds.
    pub half_life_s: f64,
    /// Every owner with shares set, usage or running work.
    pub owners: Vec<OwnerShare>,
}

/// One owner's standing in the fair share.
#[derive(Clone, Debug, Serialize)]
pub struct OwnerShare {
    /// The account above the owner, if any.
    pub account: Option<String>,
    /// The owner (`None`: work without an owner).
    pub owner: Option<String>,
    /// Its shares.
    pub shares: f64,
    /// Its account's shares, if it has an account.
    pub account_shares: Option<f64>,
    /// Recent usage, slot-seconds, decayed to now.
    pub usage_s: f64,
    /// Slots it runs now.
    pub slots: u64,
}

/// A job in the list of `granule jobs`.
#[derive(Clone, Debug, Serialize)]
pub struct JobSummary {
    /// Id.
    pub id: JobId,
    /// Name.
    pub name: String,
    /// Where it is.
    pub state: JobState,
    /// Submitted, unix ms.
    pub created_ms: i64,
    /// Finished, unix ms.
    pub finished_ms: Option<i64>,
    /// Why it was refused, broke or halted.
    pub error: Option<String>,
    /// Its number of stages.
    pub stages: u64,
}

/// A fragment as the timeline of the dashboard draws it.
#[derive(Clone, Debug, Serialize)]
pub struct FragmentRow {
    /// Id.
    pub id: i64,
    /// Its job.
    pub job: String,
    /// Its stage.
    pub stage: String,
    /// The worker that ran it.
    pub worker: String,
    /// That worker's class.
    pub class: String,
    /// First item.
    pub start_idx: u64,
    /// One past the last item.
    pub end_idx: u64,
    /// Items it was claimed with.
    pub items: u64,
    /// Items acked (done) in it.
    pub acked: u64,
    /// How it stands or ended.
    pub state: String,
    /// Why it failed (`exit`, `signal`, `timeout`, `oom`, ...).
    pub cause: Option<String>,
    /// Claimed, unix ms.
    pub claimed_ms: i64,
    /// Ended, unix ms.
    pub finished_ms: Option<i64>,
    /// What the cost model predicted, ms.
    pub predicted_ms: f64,
    /// What it took, ms.
    pub observed_ms: Option<f64>,
    /// Times it gave its tail to another worker.
    pub splits: u64,
    /// What bounded its size (`SizeCap` as a word).
    pub size_cap: String,
    /// How long its claim's transaction took in the store, µs (unknown for
    /// fragments claimed before it was kept).
    pub claim_us: Option<i64>,
}

/// Status of a stage.
#[derive(Clone, Debug, Serialize)]
pub struct StageStatus {
    /// Name.
    pub name: String,
    /// Where it is.
    pub state: StageState,
    /// Items in all.
    pub items: u64,
    /// Items done.
    pub done: u64,
    /// Items inside running fragments, not yet acked.
    pub running: u64,
    /// Items waiting for a claim.
    pub pending: u64,
    /// The values of the first quarantined items (filled by the CLI from the
    /// spec; empty when it could not tell them).
    #[serde(default)]
    pub quarantined_values: Vec<String>,
    /// Items quarantined.
    pub quarantined: u64,
    /// Quarantined items as `[start, end)` spans.
    pub quarantined_items: Vec<[u64; 2]>,
    /// Fragments claimed so far.
    pub fragments: u64,
    /// Fragments running now.
    pub running_fragments: u64,
    /// Failed fragments.
    pub failed_fragments: u64,
    /// Size of the latest fragment.
    pub fragment_size: u64,
    /// The rule that sized the latest fragment (why it has that size).
    pub size_cap: Option<granule_core::SizeCap>,
    /// That rule in words.
    pub size_cap_why: Option<String>,
    /// Whether its tasks ack items (`None` until a fragment has shown it).
    pub acks: Option<bool>,
    /// Whether it may run now: not finished, and every stage it comes after is.
    pub ready: bool,
    /// Its running fragments per class: what their acks show of the per-item cost
    /// before any of them ends.
    pub running_by_class: Vec<RunningClass>,
    /// The model's per-item cost, µs.
    pub item_cost_us: f64,
    /// The model's per-fragment overhead, ms.
    pub overhead_ms: f64,
    /// The sizer's target duration, ms.
    pub target_ms: f64,
    /// Fragments that yielded (stopped early at a safe point).
    pub yields: u64,
    /// Tails split off running fragments.
    pub splits: u64,
    /// Fragments whose worker vanished or whose lease expired.
    pub lost: u64,
    /// Checkpoints stored.
    pub checkpoints: u64,
    /// Checkpoints that failed verification and were skipped for an older one.
    pub checkpoint_fallbacks: u64,
    /// Items run again because the state they were acked into was lost (acked
    /// after a fragment's last checkpoint, or held only by a checkpoint that failed).
    pub state_reruns: u64,
    /// Items done whose state is in no result: their task acked them after its
    /// last checkpoint and finished, so `granule results` is incomplete.
    pub results_missing: u64,
    /// Median absolute percentage error of predicted vs observed fragment durations
    /// (finished fragments after the stage's first 20).
    pub prediction_error_median: Option<f64>,
    /// 90th percentile of the same.
    pub prediction_error_p90: Option<f64>,
    /// What one slot needs, its class and priority.
    pub needs: StageNeeds,
    /// Work run and then lost by yields and failures (fed, never acked), seconds.
    /// Lost fragments are counted in `lost`: how much they ran is not known.
    pub wasted_s: f64,
    /// What bounds the stage by its history (`cpu`, `memory`, `io`, `mixed`); before
    /// any, the class its name and command suggest, if any.
    pub profile: Option<String>,
    /// Whether `profile` comes from `history`, the `declared` class or a `guess`.
    pub profile_source: Option<String>,
    /// What was learned on each executor class that ran the stage.
    pub classes: Vec<ClassStatus>,
    /// Stages whose outputs (or results) are its items, by name.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub streams_from: Vec<String>,
    /// Whether one of those still runs: its item count still grows.
    pub producing: bool,
    /// While its sources still produce: the items it will have, estimated from
    /// their outputs (or results) per item done so far.
    pub expected_items: Option<u64>,
    /// Outputs this stage published so far.
    pub outputs: u64,
    /// Results this stage published so far (for stages that take `results_of` it).
    pub results: u64,
    /// Stages that stream its outputs (or results): its quarantined items'
    /// outputs are missing there.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub feeds: Vec<String>,
    /// For a skipped stage: the stages it comes after that ended with quarantined
    /// items or were skipped.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub skipped_for: Vec<String>,
}

/// A stage's running fragments on one class.
#[derive(Clone, Debug, Default, Serialize)]
pub struct RunningClass {
    /// The class.
    pub class: String,
    /// Fragments running there.
    pub fragments: u64,
    /// The sum of their claim times, unix ms (their time so far is
    /// `fragments * now - claimed_ms_sum`).
    pub claimed_ms_sum: i64,
    /// Items they acked so far.
    pub acked: u64,
}

impl RunningClass {
    /// Slot-ms per acked item so far (`None` before 8 acks).
    pub fn pace_ms(&self, now_ms: i64) -> Option<f64> {
        let elapsed = self.fragments as i64 * now_ms - self.claimed_ms_sum;
        (self.acked >= 8).then(|| elapsed.max(0) as f64 / self.acked as f64)
    }
}

/// A stage on one executor class: what has been learned there.
#[derive(Clone, Debug, Default, Serialize)]
pub struct ClassStatus {
    /// The class.
    pub class: String,
    /// Fragments it finished.
    pub fragments: u64,
    /// Items those fragments did.
    pub items: u64,
    /// Whether its model is ready (enough acks or fragments to trust the costs).
    pub learned: bool,
    /// Per-item cost learned there, µs.
    pub item_cost_us: f64,
    /// Spread (standard deviation) of the per-item cost, µs.
    pub item_cost_spread_us: f64,
    /// Per-fragment overhead learned there, ms.
    pub overhead_ms: f64,
    /// Mean size of its last 10 finished fragments.
    pub fragment_size: f64,
    /// Median absolute percentage error of its fragment durations (after the first 20).
    pub prediction_error_median: Option<f64>,
    /// 90th percentile of the same.
    pub prediction_error_p90: Option<f64>,
}

/// Output of one fragment.
#[derive(Clone, Debug, Serialize)]
pub struct FragmentLog {
    /// Fragment id.
    pub fragment: i64,
    /// Its span.
    pub start: u64,
    /// See `start`.
    pub end: u64,
    /// Its state.
    pub state: FragmentState,
    /// Failure cause and detail.
    pub cause: Option<String>,
    /// See `cause`.
    pub detail: Option<String>,
    /// stdout tail.
    pub stdout: Vec<u8>,
    /// stderr tail.
    pub stderr: Vec<u8>,
}

/// Where every item of a stage is: the four sets partition its items.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Accounting {
    /// Waiting for a claim.
    pub pending: IntervalSet,
    /// Inside running fragments, not acked.
    pub running: IntervalSet,
    /// Counted done.
    pub done: IntervalSet,
    /// Failed alone after every retry.
    pub quarantined: IntervalSet,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stored_states_read_back_the_word_they_write_and_refuse_others() {
        for s in [
            JobState::Running,
            JobState::Done,
            JobState::Failed,
            JobState::Cancelled,
            JobState::Refused,
            JobState::Broken,
        ] {
            assert_eq!(s.to_string().parse::<JobState>().unwrap(), s);
            assert_eq!(serde_json::to_value(s).unwrap(), s.as_str());
        }
        assert_eq!("yes".parse::<Acks>().unwrap(), Acks::Yes);
        assert!(matches!(
            "finished".parse::<JobState>(),
            Err(crate::StoreError::Corrupt(_))
        ));
    }
}

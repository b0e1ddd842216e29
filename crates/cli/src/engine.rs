//! The worker loop: claim fragments for free slots, run them on threads, flush
//! acks and checkpoints in batches, finish each fragment in one transaction.
//!
//! One loop serves `granule run` (one job, embedded, Ctrl-C yields) and
//! `granule worker` (any job in the store, a lifespan, SIGTERM as a preemption
//! notice). It owns the store connection, so every store write happens here and
//! the runner threads only touch their [`Control`].

use crate::fetch::{self, Unusable, Wanted};
use crate::host;
use crate::progress::Progress;
use anyhow::{Context, Result};
use granule_core::{ClaimContext, FinishOutcome, FragmentId, JobId, Output, WorkerOffer};
use granule_exec::{
    run_fragment, Blob, Cache, Control, DataStore, Failure, FragmentJob, ItemSource, ItemsError,
    RunReport, Sampler,
};
use granule_spec::JobSpec;
use granule_store::{
    Assignment, BlobRow, ClaimRequest, Finished, FragmentEnd, FragmentFlush, FragmentState,
    Heartbeat, JobHalt, JobState, NewCheckpoint, SplitAnswer, Store, StoreError, WorkerInfo,
};
use std::collections::{HashMap, HashSet};
use std::path::PathBuf;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{mpsc, Arc};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

/// Heartbeat period of a worker with nothing running.
const IDLE_HEARTBEAT: Duration = Duration::from_secs(1);
/// How often a worker looks for dead workers on its host and expired leases.
const REAP_EVERY: Duration = Duration::from_secs(1);
/// How often a spot worker reads the pool's history to forecast its own life.
const FORECAST_EVERY: Duration = Duration::from_secs(60);

/// How a worker runs.
#[derive(Clone, Debug)]
pub(crate) struct EngineConfig {
    /// Concurrent fragments.
    pub(crate) slots: u32,
    /// Ack flush (and heartbeat, lease renewal) period.
    pub(crate) flush: Duration,
    /// Lease length.
    pub(crate) lease: Duration,
    /// Time a yielding fragment gets (run: before SIGTERM and again before SIGKILL;
    /// worker: the whole preemption notice).
    pub(crate) grace: Duration,
    /// Most items in flight beyond the last ack (what a task may leave unacked);
    /// slow items get about 100 ms of work (`granule_exec::feed_window`).
    pub(crate) window: u64,
    /// Bytes of stdout/stderr kept per fragment.
    pub(crate) log_tail_bytes: usize,
    /// zstd level of checkpoint blobs.
    pub(crate) checkpoint_level: i32,
    /// Executor class (selects the sizer's history).
    pub(crate) class: String,
    /// State directory (restored checkpoints are written under it).
    pub(crate) state_dir: PathBuf,
    /// No progress output.
    pub(crate) quiet: bool,
    /// `run`: only this job, with its progress, until it is finished.
    pub(crate) job: Option<(JobId, Arc<JobSpec>)>,
    /// When the worker's lifespan ends (instant and unix ms), if it has one.
    pub(crate) lifespan_end: Option<(Instant, i64)>,
    /// How long before the end of its lifespan the worker stops and yields.
    pub(crate) drain_margin: Duration,
    /// `worker`: exit after this long without work (default: when no job is left).
    pub(crate) idle_exit: Option<Duration>,
    /// Whether idle slots ask for the tails of running fragments.
    pub(crate) steal: bool,
    /// Most items per fragment, whatever the sizer says.
    pub(crate) max_items: Option<u64>,
    /// Declared cost per hour.
    pub(crate) cost_per_hour: f64,
    /// Declared spot (preemptible) capacity.
    pub(crate) spot: bool,
    /// Declared custom resources (`--resource name=amount`).
    pub(crate) custom: Vec<(String, f64)>,
    /// Print the rows the store wrote per claim, flush and finish at exit (benchmarks).
    pub(crate) write_counts: bool,
    /// Where output files go and streamed files come from (`--blobs`); default: a
    /// folder under the state directory.
    pub(crate) blobs: Option<String>,
    /// Bound of the host's cache of fetched blobs, bytes.
    pub(crate) cache_bytes: u64,
    /// The store is shared by hosts (PostgreSQL), not this host's SQLite file.
    pub(crate) shared_store: bool,
    /// Print the tasks' output lines as they come, labelled (`--output`).
    pub(crate) output: bool,
    /// A folder for the tasks' output files, a subfolder per stage (`--results`).
    pub(crate) results_dir: Option<PathBuf>,
    /// A file that gets a line per finished fragment (`--joblog`).
    pub(crate) joblog: Option<PathBuf>,
}

impl Default for EngineConfig {
    fn default() -> Self {
        EngineConfig {
            slots: 1,
            flush: Duration::from_millis(100),
            lease: Duration::from_secs(30),
            grace: Duration::from_secs(10),
            window: 64,
            log_tail_bytes: 64 * 1024,
            checkpoint_level: 3,
            class: "default".into(),
            state_dir: PathBuf::from(".granule"),
            quiet: false,
            job: None,
            lifespan_end: None,
            drain_margin: Duration::ZERO,
            idle_exit: None,
            steal: true,
            max_items: None,
            cost_per_hour: 0.0,
            spot: false,
            custom: Vec::new(),
            write_counts: false,
            blobs: None,
            cache_bytes: DEFAULT_CACHE_BYTES,
            shared_store: false,
            output: false,
            results_dir: None,
            joblog: None,
        }
    }
}

/// The host's cache of fetched blobs, unless `--cache-mb` says otherwise: 4 GiB.
pub(crate) const DEFAULT_CACHE_BYTES: u64 = 4 << 30;

/// The blob store and the host's cache of it.
pub(crate) struct DataPlane {
    pub(crate) store: Arc<DataStore>,
    pub(crate) cache: Arc<Cache>,
    /// Local scratch space (an output compressed on its way to a remote store).
    pub(crate) scratch: PathBuf,
}

impl DataPlane {
    /// Opens the blob store of `cfg` (a folder under the state dir by default) and
    /// the host's cache under the state dir.
    pub(crate) fn open(cfg: &EngineConfig) -> Result<DataPlane> {
        let location = match &cfg.blobs {
            Some(l) => l.clone(),
            None => cfg.state_dir.join("blobs").display().to_string(),
        };
        let store = DataStore::open(&location, cfg.checkpoint_level)
            .map_err(|e| crate::BadInput(format!("--blobs: {e}")))?;
        let cache = Cache::new(&cfg.state_dir.join("cache"), cfg.cache_bytes)?;
        let scratch = cfg.state_dir.join("scratch");
        std::fs::create_dir_all(&scratch)
            .with_context(|| format!("creating {}", scratch.display()))?;
        granule_exec::sweep(&scratch, "");
        Ok(DataPlane {
            store: Arc::new(store),
            cache: Arc::new(cache),
            scratch,
        })
    }
}

/// How a run ended.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) enum Outcome {
    /// Every item done (`run`), or no work left (`worker`).
    Done,
    /// Finished, with quarantined items.
    Quarantined,
    /// Stopped by a signal or its lifespan after yielding its fragments.
    Stopped,
    /// The job was cancelled.
    Cancelled,
    /// The job was refused: its input is not what was submitted (the message says why).
    Refused(String),
    /// The job's stored state cannot be read.
    Broken(String),
    /// The job stopped because its task failed too often (`halt`).
    Halted(String),
}

/// What is needed to report a fragment's end once the store has taken it.
struct FinishContext {
    id: FragmentId,
    job: JobId,
    stage: String,
    stage_index: usize,
    span: granule_core::Span,
    n: u64,
    failure: Option<String>,
    /// The stage's `halt`, judged on this worker's attempts.
    halt: Option<granule_spec::Halt>,
    /// Items this attempt failed, and items it acked.
    failed_items: u64,
    acked: u64,
    /// How it ended, for the job log: `done`, `failed`, `yielded`.
    state: &'static str,
    /// When it started (unix ms) and how long it ran.
    started_ms: i64,
    duration_ms: f64,
}

/// Shortest time before the end of its life at which a worker stops feeding a
/// fragment whose task acks, and the shortest drain of such fragments.
const YIELD_MARGIN_MIN: Duration = Duration::from_millis(100);

/// How long a fragment whose task acks takes to yield once feeding stops: its
/// fed-ahead `window` run out, plus what ending it costs (at least
/// [`YIELD_MARGIN_MIN`]).
fn yield_latency(window: u64, item_cost_ms: f64) -> Duration {
    let ms = window as f64 * item_cost_ms.max(0.0) + 50.0;
    Duration::from_secs_f64(ms / 1e3).max(YIELD_MARGIN_MIN)
}

struct Slot {
    assignment: Assignment,
    spec: Arc<JobSpec>,
    control: Arc<Control>,
    /// Its runner thread (taken when it is joined).
    handle: Option<JoinHandle<RunReport>>,
    checkpoint_fallbacks: u32,
    notes: Vec<String>,
    /// Whether its items have sizes (their bytes are reported to the model).
    sized: bool,
    /// Its duration as predicted here from the bytes of its items, if it was.
    predicted_ms: Option<f64>,
}

/// The store failing for a while: writes are retried with backoff (never faster
/// than `retry_at`), and the user is told again every `OUTAGE_NOTE_EVERY`.
struct Outage {
    since: Instant,
    retry_at: Instant,
    backoff: Duration,
    /// When it was last said (`None`: not said, an outage just before was).
    said_at: Option<Instant>,
}

/// Longest wait between two tries of a failing store.
const OUTAGE_BACKOFF_MAX: Duration = Duration::from_secs(2);
/// How often a lasting outage is said again.
const OUTAGE_NOTE_EVERY: Duration = Duration::from_secs(5);

/// A worker stopping: since when, by when everything must be gone, and whether
/// the remaining fragments were killed already.
struct Drain {
    deadline: Instant,
    killed: bool,
}

struct Worker<'a> {
    store: &'a mut dyn Store,
    cfg: &'a EngineConfig,
    info: WorkerInfo,
    specs: HashMap<JobId, Arc<JobSpec>>,
    sources: HashMap<(JobId, usize), ItemSource>,
    running: HashMap<FragmentId, Slot>,
    /// Fragments the store told us to stop (their job was cancelled or stopped):
    /// their ends are not "lost leases".
    stopped: HashSet<FragmentId>,
    /// Claimed but not started: the store went away while reading its spec or
    /// checkpoint. Started (or left to lease expiry, if draining) later.
    deferred: Vec<Assignment>,
    unflushed: HashMap<FragmentId, FragmentFlush>,
    finished_tx: mpsc::Sender<FragmentId>,
    sampler: Sampler,
    progress: Progress,
    cpus: f64,
    /// Ends the store could not take yet, with what is needed to report them.
    unfinished: Vec<(FragmentEnd, FinishContext)>,
    /// The store failing (unreachable, out of space) since some time.
    outage: Option<Outage>,
    /// When an outage was last said: one that flickers is said every few seconds,
    /// not at every failed write.
    outage_said: Option<Instant>,
    /// What this worker offers to stages (class and resources).
    offer: WorkerOffer,
    /// On spot capacity: how long a worker of this class is expected to live, from
    /// the pool's recorded losses (see `forecast`).
    expected_life_ms: Option<f64>,
    data: DataPlane,
    /// The blob store was out of reach: no claims until then.
    data_paused_until: Option<Instant>,
    /// The last wait for it (doubling while it stays out of reach).
    data_backoff: Option<Duration>,
    /// Failed fragments per stage name (the first few are shown).
    failures_seen: HashMap<String, u64>,
    /// Failed and acked item attempts per stage, for `halt`.
    attempts: HashMap<(JobId, usize), (u64, u64)>,
    /// Stages whose tasks ack in batches larger than a small feed window
    /// (`RunReport::acks_in_batches`): fed `window` items from the start.
    batch_ackers: HashSet<(JobId, usize)>,
}

/// Failures of a stage shown one by one before only counts are.
const FAILURES_SHOWN: u64 = 3;

/// Runs fragments with `cfg.slots` local slots until the job (or all work) is
/// finished, the worker is told to stop, or its lifespan ends.
pub(crate) fn run_worker(
    store: &mut dyn Store,
    cfg: &EngineConfig,
    interrupts: &AtomicUsize,
) -> Result<Outcome> {
    let pid = i64::from(std::process::id());
    let proc_start = host::proc_start(pid).unwrap_or(0);
    let host_name = host::hostname();
    let info = WorkerInfo {
        // Random per start: hosts sharing a name (or a reused pid) never share an id.
        id: format!("{host_name}:{pid}:{}", granule_exec::random_hex()),
        host: host_name,
        pid,
        proc_start,
        slots: cfg.slots,
        class: cfg.class.clone(),
        lifespan_end_ms: cfg.lifespan_end.map(|(_, ms)| ms),
        cost_per_hour: cfg.cost_per_hour,
        spot: cfg.spot,
        resources: describe(&cfg.custom).to_string(),
        locality: host::locality(),
        allocation: std::env::var("GRANULE_ALLOCATION").ok(),
    };
    let offer = offer(cfg);
    let data = DataPlane::open(cfg)?;
    store.register_worker(&info, host::now_ms())?;
    release_dead_workers(store, &info)?;
    let (finished_tx, finished_rx) = mpsc::channel();
    let progress = match &cfg.job {
        Some((_, spec)) => Progress::new(spec, cfg.quiet, !cfg.output),
        None => Progress::notes_only(cfg.quiet),
    };
    if cfg.shared_store && cfg.blobs.is_none() {
        progress.note(&format!(
            "output files go to {} on this host only: with workers on several hosts, give them --blobs (a shared folder or s3://bucket/prefix)",
            data.store.location()
        ));
    }
    let mut specs = HashMap::new();
    if let Some((id, spec)) = &cfg.job {
        specs.insert(*id, spec.clone());
    }
    let mut worker = Worker {
        store,
        cfg,
        info,
        specs,
        sources: HashMap::new(),
        running: HashMap::new(),
        stopped: HashSet::new(),
        deferred: Vec::new(),
        unflushed: HashMap::new(),
        finished_tx,
        sampler: Sampler::new(),
        progress,
        cpus: std::thread::available_parallelism().map_or(1.0, |n| n.get() as f64),
        unfinished: Vec::new(),
        outage: None,
        outage_said: None,
        offer,
        expected_life_ms: None,
        data,
        data_paused_until: None,
        data_backoff: None,
        failures_seen: HashMap::new(),
        batch_ackers: HashSet::new(),
        attempts: HashMap::new(),
    };
    let outcome = worker.run(&finished_rx, interrupts);
    if cfg.write_counts {
        if let Some(w) = worker.store.write_counts() {
            eprintln!("granule: store writes {}", serde_json::json!(w));
        }
    }
    let id = worker.info.id.clone();
    match worker.store.set_worker_state(&id, "exited", host::now_ms()) {
        // Best effort: a worker that cannot say it left is taken for gone later.
        Err(e) if e.is_transient() => {}
        other => other?,
    }
    outcome
}

/// A checkpoint blob as the store keeps it, to open (and verify).
pub(crate) fn sealed(row: BlobRow) -> Blob {
    Blob {
        data: row.data,
        raw_len: row.raw_len,
        hash: row.hash,
    }
}

/// Runs a streamed stage's fragment on its own thread: its inputs made into values
/// first (files fetched into the host cache and pinned until it ends). A missing or
/// corrupt blob fails it; a blob store out of reach hands it back uncharged.
fn run_streamed(
    mut job: FragmentJob,
    control: &Arc<Control>,
    inputs: Result<Vec<Wanted>, String>,
    (store, cache): &(Arc<DataStore>, Arc<Cache>),
) -> RunReport {
    let inputs = inputs.map_err(Unusable::Bad);
    match inputs.and_then(|w| fetch::resolve(w, store, cache)) {
        Ok(fetch::Inputs { values, pins, note }) => {
            job.source = ItemSource::Values {
                first: job.span.start,
                values: Arc::new(values),
            };
            let mut report = run_fragment(&job, control);
            drop(pins);
            report.notes.extend(note);
            report
        }
        Err(Unusable::Bad(why)) => granule_exec::failed_before_start(&job, Failure::Items(why)),
        Err(Unusable::Unavailable(why)) => granule_exec::unavailable_before_start(&job, why),
    }
}

/// What this worker offers to stages: its class and resources (detected and declared).
pub(crate) fn offer(cfg: &EngineConfig) -> WorkerOffer {
    let detected = granule_exec::detect();
    WorkerOffer {
        class: cfg.class.clone(),
        slots: cfg.slots,
        cpus: f64::from(detected.cpus),
        memory_mb: detected.memory_mb,
        gpus: detected.gpus.len() as u32,
        resources: cfg.custom.iter().cloned().collect(),
        spot: cfg.spot,
    }
}

/// Where to cut a fragment whose items are heavier than the store could know, and
/// its duration predicted from the bytes of its items: with a learned size fit, a
/// fragment predicted past 1.5x the store's prediction keeps only what fits that
/// prediction (the rest goes back to pending at once). `(None, None)` without sizes
/// or a fit.
fn sized_prediction(a: &Assignment, bytes: Option<u64>) -> (Option<u64>, Option<f64>) {
    let (Some(bytes), Some((intercept, slope))) = (bytes, a.size_fit) else {
        return (None, None);
    };
    let n = a.span.len().max(1);
    let per_item = (intercept + slope * bytes as f64 / n as f64).max(0.0);
    let full = a.overhead_ms + per_item * n as f64;
    if full <= 1.5 * a.predicted_ms || n < 2 || per_item <= 0.0 {
        return (None, Some(full));
    }
    let keep = (((a.predicted_ms - a.overhead_ms).max(per_item) / per_item) as u64).clamp(1, n - 1);
    (
        Some(a.span.start + keep),
        Some(a.overhead_ms + per_item * keep as f64),
    )
}

/// What this worker has: detected CPUs, memory and GPUs, plus declared resources.
pub(crate) fn describe(custom: &[(String, f64)]) -> serde_json::Value {
    let mut value = serde_json::to_value(granule_exec::detect()).expect("plain data");
    let custom: serde_json::Map<String, serde_json::Value> = custom
        .iter()
        .map(|(name, amount)| (name.clone(), (*amount).into()))
        .collect();
    value["custom"] = custom.into();
    value
}

/// Fragments held by workers of this host that are gone, and fragments whose lease
/// expired, go back to pending (other hosts' workers are left to their leases). A
/// worker is judged by its pid only where that pid means something: same kernel boot
/// and pid namespace (workers recorded before localities were kept: same hostname).
fn release_dead_workers(store: &mut dyn Store, me: &WorkerInfo) -> Result<u64, StoreError> {
    let dead: Vec<String> = store
        .workers_holding_work()?
        .into_iter()
        .filter(|w| {
            let here = if w.locality.is_empty() {
                w.host == me.host
            } else {
                w.locality == me.locality
            };
            here && !host::alive(w.pid, w.proc_start)
        })
        .map(|w| w.id)
        .collect();
    store.release(host::now_ms(), &dead)
}

/// What the worker loop keeps from one turn to the next.
struct Turns {
    last_flush: Instant,
    last_reap: Instant,
    last_forecast: Option<Instant>,
    last_split_ask: Option<Instant>,
    idle_since: Option<Instant>,
    drain: Option<Drain>,
    /// When the last claim found nothing; claims wait for a sign of work or the poll.
    claim_found_nothing: Option<Instant>,
}

/// What a turn of the worker loop does next.
enum Turn {
    /// Goes on with this turn.
    Go,
    /// Starts the next turn.
    Again,
    /// The worker is done.
    Done(Outcome),
}

impl Worker<'_> {
    fn run(
        &mut self,
        finished: &mpsc::Receiver<FragmentId>,
        interrupts: &AtomicUsize,
    ) -> Result<Outcome> {
        let mut t = Turns {
            last_flush: Instant::now(),
            last_reap: Instant::now(),
            last_forecast: None,
            last_split_ask: None,
            idle_since: None,
            drain: None,
            claim_found_nothing: None,
        };
        self.refresh_progress()?;
        loop {
            let now = Instant::now();
            self.watch_drain(&mut t, now, interrupts.load(Ordering::SeqCst));
            if !self.store_paused() {
                self.retry_finishes()?;
            }
            let free = self.claim_for_free_slots(&mut t)?;
            // Past the drain's deadline a store that still fails is given up on: the
            // leases of what it could not take run out and the work returns.
            let given_up = t
                .drain
                .as_ref()
                .is_some_and(|d| d.killed && now >= d.deadline);
            let idle = self.running.is_empty()
                && (self.unfinished.is_empty() || given_up)
                && self.deferred.is_empty();
            match self.when_idle(&mut t, idle, given_up)? {
                Turn::Done(outcome) => return Ok(outcome),
                Turn::Again => continue,
                Turn::Go => {}
            }
            self.ask_for_split(&mut t, free)?;
            self.wait_for_ends(&mut t, idle, finished)?;
            self.periodic(&mut t)?;
        }
    }

    /// How long before the end of its life the worker drains: the configured
    /// margin, or less while every running fragment acks (they yield within their
    /// [`yield_latency`]; a tenth of a short life was lost to waiting).
    fn drain_margin(&self) -> Duration {
        let acking = self
            .running
            .values()
            .all(|s| s.assignment.expect_acks == Some(true));
        if !acking {
            return self.cfg.drain_margin;
        }
        self.running
            .values()
            .map(|s| yield_latency(self.window_for(&s.assignment), s.assignment.item_cost_ms))
            .max()
            .unwrap_or(YIELD_MARGIN_MIN)
            .min(self.cfg.drain_margin)
    }

    /// Starts a drain when asked to stop or when the lifespan ends, and kills what
    /// still runs at its deadline (or at a second interrupt).
    fn watch_drain(&mut self, t: &mut Turns, now: Instant, signals: usize) {
        if t.drain.is_none() {
            if signals >= 1 {
                t.drain = Some(self.start_drain(
                    now + self.cfg.grace,
                    "stop requested: yielding every fragment",
                ));
            } else if let Some((end, _)) = self.cfg.lifespan_end {
                if now + self.drain_margin() >= end {
                    t.drain =
                        Some(self.start_drain(end, "lifespan ending: yielding every fragment"));
                }
            }
        }
        if let Some(d) = t.drain.as_mut() {
            if (signals >= 2 || now >= d.deadline) && !d.killed {
                d.killed = true;
                self.running.values().for_each(|s| s.control.kill());
            }
        }
    }

    /// Claims for free slots when a claim may find something (a sign of work, or
    /// the poll is due); returns how many slots stay free.
    fn claim_for_free_slots(&mut self, t: &mut Turns) -> Result<usize> {
        let mut free = self.free_slots();
        if t.drain.is_none() && free > 0 && !self.store_paused() {
            let poll_due = t
                .claim_found_nothing
                .is_none_or(|at| at.elapsed() >= self.store.idle_poll());
            let signalled = poll_due || self.wait_for_work(Duration::ZERO)?;
            if signalled {
                free = self.fill_slots()?;
                t.claim_found_nothing = (free > 0).then(Instant::now);
            }
        }
        Ok(free)
    }

    /// With nothing running: saves the last acks while stopping, or ends the worker
    /// if its work is done.
    fn when_idle(&mut self, t: &mut Turns, idle: bool, given_up: bool) -> Result<Turn> {
        if !idle {
            t.idle_since = None;
            return Ok(Turn::Go);
        }
        let unsaved = !self.unflushed.is_empty() || !self.unfinished.is_empty();
        if t.drain.is_some() && unsaved && !given_up {
            // Stopping: the last acks wait for the store until the deadline.
            if !self.store_paused() {
                self.flush()?;
            }
            std::thread::sleep(Duration::from_millis(50));
            return Ok(Turn::Again);
        }
        if t.drain.is_some() {
            self.flush()?;
            self.refresh_progress()?;
            self.progress.finish();
            return Ok(Turn::Done(Outcome::Stopped));
        }
        if let Some(outcome) = self.finished_work(&mut t.idle_since)? {
            self.refresh_progress()?;
            self.progress.finish();
            return Ok(Turn::Done(outcome));
        }
        Ok(Turn::Go)
    }

    /// Free slots and nothing to claim: asks for the tail of the longest fragment.
    fn ask_for_split(&mut self, t: &mut Turns, free: usize) -> Result<()> {
        let due = t
            .last_split_ask
            .is_none_or(|at| at.elapsed() >= self.cfg.flush);
        let anything = !self.running.is_empty() | self.cfg.job.is_none();
        if free == 0 || !self.cfg.steal || t.drain.is_some() || !anything || !due {
            return Ok(());
        }
        let job = self.cfg.job.as_ref().map(|(id, _)| *id);
        let min_ms = 2.0 * self.cfg.flush.as_secs_f64() * 1e3;
        let asked = self
            .store
            .request_split(job, host::now_ms(), min_ms, &self.cfg.class);
        if self.available(asked)?.flatten().is_some() {
            // The tail becomes pending at the owner's next flush: look again soon.
            t.claim_found_nothing = None;
        }
        t.last_split_ask = Some(Instant::now());
        Ok(())
    }

    /// Waits for a fragment to end (or for work, when idle) until the next flush is
    /// due, and records every end that came.
    fn wait_for_ends(
        &mut self,
        t: &mut Turns,
        idle: bool,
        finished: &mpsc::Receiver<FragmentId>,
    ) -> Result<()> {
        // An idle worker heartbeats once a second, not at the flush rate: idle
        // workers must not load a shared store.
        let flush_every = if idle && self.unflushed.is_empty() {
            self.cfg.flush.max(IDLE_HEARTBEAT)
        } else {
            self.cfg.flush
        };
        let wait = flush_every.saturating_sub(t.last_flush.elapsed());
        let mut ended = Vec::new();
        if idle {
            // Nothing runs: sleep until work is announced (or the next flush is due).
            if self.wait_for_work(wait)? {
                t.claim_found_nothing = None;
            }
        } else {
            match finished.recv_timeout(wait) {
                Ok(id) => ended.push(id),
                Err(mpsc::RecvTimeoutError::Timeout) => {}
                Err(mpsc::RecvTimeoutError::Disconnected) => {
                    unreachable!("the worker holds a sender")
                }
            }
        }
        ended.extend(finished.try_iter());
        for id in ended {
            // The slot it frees is claimed for in the same store transaction. What
            // that claim left free is looked for again at once: it may have found
            // the only ranges left locked by other claimers for a moment.
            let claim = t.drain.is_none() && !self.store_paused();
            self.finish(id, claim)?;
            t.claim_found_nothing = None;
        }
        if t.last_flush.elapsed() >= flush_every && !self.store_paused() {
            self.flush()?;
            t.last_flush = Instant::now();
            self.refresh_progress()?;
        }
        Ok(())
    }

    /// Reaps lost workers' fragments and refreshes the forecast, when due.
    fn periodic(&mut self, t: &mut Turns) -> Result<()> {
        if t.last_reap.elapsed() >= REAP_EVERY {
            let released = release_dead_workers(self.store, &self.info);
            if let Some(released) = self.available(released)? {
                if released > 0 {
                    self.progress
                        .note(&format!("released {released} fragment(s) of lost workers"));
                    t.claim_found_nothing = None;
                }
            }
            t.last_reap = Instant::now();
        }
        if self.cfg.spot
            && t.last_forecast
                .is_none_or(|at| at.elapsed() >= FORECAST_EVERY)
        {
            self.forecast()?;
            t.last_forecast = Some(Instant::now());
        }
        Ok(())
    }

    /// Reads the pool's last hour and forecasts how long a worker of this class
    /// lives: one over its rate of lost workers (none while it has lost none).
    fn forecast(&mut self) -> Result<()> {
        let now = host::now_ms();
        let history = self
            .store
            .worker_history(now, now - granule_core::FORECAST_WINDOW_MS);
        let Some(history) = self.available(history)? else {
            return Ok(());
        };
        self.expected_life_ms = granule_core::forecast_recent(&history, now)
            .iter()
            .find(|c| c.class == self.cfg.class)
            .filter(|c| c.losses_per_hour > 0.0)
            .map(|c| 3_600_000.0 / c.losses_per_hour);
        Ok(())
    }

    /// A store result, with a failing store (unreachable, out of space) turned into
    /// `None`: the worker keeps its fragments running and its acks buffered, tries
    /// again with backoff, and says so when it starts and every few seconds after.
    fn available<T>(&mut self, result: Result<T, StoreError>) -> Result<Option<T>> {
        match result {
            Ok(value) => Ok(Some(value)),
            Err(e) if e.is_transient() => {
                let now = Instant::now();
                let quiet = self
                    .outage_said
                    .is_some_and(|t| now.duration_since(t) < OUTAGE_NOTE_EVERY);
                let o = self.outage.get_or_insert(Outage {
                    since: now,
                    retry_at: now,
                    backoff: Duration::from_millis(100),
                    said_at: None,
                });
                o.retry_at = now + o.backoff;
                o.backoff = (o.backoff * 2).min(OUTAGE_BACKOFF_MAX);
                let first = o.said_at.is_none();
                let secs = now.duration_since(o.since).as_secs_f64();
                if !quiet {
                    o.said_at = Some(now);
                    self.outage_said = Some(now);
                    let why = self.outage_reason(&e);
                    self.progress.note(&if first {
                        format!("{why}; keeping fragments running and acks buffered, retrying")
                    } else {
                        format!("{why}; still retrying ({secs:.0}s so far; nothing acked is lost)")
                    });
                }
                Ok(None)
            }
            Err(e) => Err(e.into()),
        }
    }

    /// What a transient store error means, in words: a full disk under the embedded
    /// store names the state directory and the space left there (PostgreSQL's own
    /// message says which of the server's files could not grow).
    fn outage_reason(&self, e: &StoreError) -> String {
        if !e.is_disk_full() || matches!(e, StoreError::Postgres(_)) {
            return e.to_string();
        }
        let dir = &self.cfg.state_dir;
        let free = host::free_bytes(dir).map_or("unknown".into(), |b| {
            format!("{:.1} MiB free", b as f64 / f64::from(1 << 20))
        });
        format!(
            "no space left for the store under {} ({free})",
            std::path::absolute(dir)
                .unwrap_or_else(|_| dir.clone())
                .display()
        )
    }

    /// A store write went through: an outage, if any, is over.
    fn store_writable(&mut self) {
        if let Some(o) = self.outage.take() {
            if o.said_at.is_some() {
                self.progress.note(&format!(
                    "store writable again after {:.1}s",
                    o.since.elapsed().as_secs_f64()
                ));
            }
        }
    }

    /// Whether store writes wait (an outage's backoff has not run out).
    fn store_paused(&self) -> bool {
        self.outage
            .as_ref()
            .is_some_and(|o| Instant::now() < o.retry_at)
    }

    fn wait_for_work(&mut self, timeout: Duration) -> Result<bool> {
        let woke = self.store.wait_for_work(timeout);
        Ok(self.available(woke)?.unwrap_or(false))
    }

    /// Retries finishes the store could not take (it was unreachable).
    fn retry_finishes(&mut self) -> Result<()> {
        while let Some((end, context)) = self.unfinished.pop() {
            let result = self.store.finish(&self.info.id, host::now_ms(), &end);
            match self.available(result)? {
                Some(finished) => {
                    self.store_writable();
                    self.report_finish(&context, &finished)
                }
                None => {
                    self.unfinished.push((end, context));
                    break;
                }
            }
        }
        Ok(())
    }

    fn start_drain(&mut self, deadline: Instant, why: &str) -> Drain {
        self.progress.stopping(why);
        // Never started, nothing acked: their leases run out and others take them.
        self.deferred.clear();
        self.running
            .values()
            .for_each(|s| s.control.request_yield());
        let _ = self
            .store
            .set_worker_state(&self.info.id, "draining", host::now_ms());
        Drain {
            deadline,
            killed: false,
        }
    }

    /// With nothing running and nothing claimable: the outcome if this worker is done.
    fn finished_work(&mut self, idle_since: &mut Option<Instant>) -> Result<Option<Outcome>> {
        if let Some((job, _)) = &self.cfg.job {
            let job = *job;
            let record = self.store.job_by_id(job);
            let Some(record) = self.available(record)? else {
                return Ok(None);
            };
            let record = record.context("job vanished from the store")?;
            // Otherwise other workers still hold its fragments: wait for them.
            let error = record.error.unwrap_or_default();
            return Ok(match record.state {
                JobState::Done => Some(Outcome::Done),
                JobState::Failed => Some(Outcome::Quarantined),
                JobState::Cancelled => Some(Outcome::Cancelled),
                JobState::Refused => Some(Outcome::Refused(error)),
                JobState::Broken => Some(Outcome::Broken(error)),
                JobState::Halted => Some(Outcome::Halted(error)),
                JobState::Removed => Some(Outcome::Broken(
                    "the job was removed (granule rm, or --fresh elsewhere)".into(),
                )),
                JobState::Running => None,
            });
        }
        let since = *idle_since.get_or_insert_with(Instant::now);
        Ok(match self.cfg.idle_exit {
            Some(limit) => (since.elapsed() >= limit).then_some(Outcome::Done),
            None => {
                let open = self.store.open_jobs();
                self.available(open)?
                    .is_some_and(|jobs| jobs.is_empty())
                    .then_some(Outcome::Done)
            }
        })
    }

    /// Claims for free slots; returns how many stay free.
    fn fill_slots(&mut self) -> Result<usize> {
        for a in std::mem::take(&mut self.deferred) {
            self.start_or_defer(a)?;
        }
        while self.free_slots() > 0 && self.deferred.is_empty() && !self.data_paused() {
            let req = self.claim_request();
            // Every free slot in one transaction, each offered what the others left.
            let claimed = self.store.claim_many(&req, self.free_slots());
            let batch = self.available(claimed)?.unwrap_or_default();
            if batch.is_empty() {
                break;
            }
            for assignment in batch {
                self.start_or_defer(assignment)?;
            }
        }
        Ok(self.free_slots())
    }

    /// Whether claims wait for the blob store to come back.
    fn data_paused(&self) -> bool {
        self.data_paused_until.is_some_and(|t| Instant::now() < t)
    }

    /// A claim for this worker's free slots, as it stands now.
    fn claim_request(&mut self) -> ClaimRequest {
        let sample = self.sampler.sample();
        let others_load = self.others_load(sample.load_per_cpu);
        let now_ms = host::now_ms();
        ClaimRequest {
            job: self.cfg.job.as_ref().map(|(id, _)| *id),
            worker: self.info.id.clone(),
            class: self.cfg.class.clone(),
            now_ms,
            lease_ms: self.cfg.lease.as_millis() as i64,
            slots: self.cfg.slots,
            max_items: self.cfg.max_items,
            offer: self.free_offer(),
            expected_life_ms: self.expected_life_ms,
            context: ClaimContext {
                remaining: 0,
                slots: self.cfg.slots,
                free_memory: sample.free_memory,
                load_per_cpu: others_load,
                splits: self.cfg.steal,
                // Set per stage by the claim.
                acking: false,
                // The life a fragment may use ends where the drain begins: late
                // for fragments that ack (they yield in time), a full drain margin
                // before the end for those that do not.
                lifespan_ms: self.cfg.lifespan_end.map(|(_, end)| {
                    let margin = self.cfg.drain_margin.min(YIELD_MARGIN_MIN);
                    (end - now_ms - margin.as_millis() as i64).max(0) as f64
                }),
                all_or_nothing_margin_ms: self
                    .cfg
                    .drain_margin
                    .saturating_sub(YIELD_MARGIN_MIN)
                    .as_secs_f64()
                    * 1e3,
            },
        }
    }

    fn free_slots(&self) -> usize {
        self.cfg.slots as usize - self.running.len() - self.deferred.len()
    }

    /// Starts a claimed fragment, or keeps it for later if the store is unreachable.
    fn start_or_defer(&mut self, a: Assignment) -> Result<()> {
        if let Some(a) = self.start(a)? {
            self.deferred.push(a);
        }
        Ok(())
    }

    /// Load per CPU beyond this worker's own slots: the load average counts our own
    /// busy slots, and only others' load is pressure (and a feature of the model).
    fn others_load(&self, load_per_cpu: f64) -> f64 {
        (load_per_cpu * self.cpus - f64::from(self.cfg.slots)).max(0.0) / self.cpus
    }

    /// What this worker has free for one more fragment: its resources less what
    /// its running fragments' stages need.
    fn free_offer(&self) -> WorkerOffer {
        self.running
            .values()
            .fold(self.offer.clone(), |free, slot| {
                free.less(&slot.spec.stages[slot.assignment.stage_index].needs)
            })
    }

    /// The job's spec, or `None` while the store is unreachable.
    /// The job's spec (or why its stored spec cannot be read), or `None` while the
    /// store is unreachable.
    #[allow(clippy::type_complexity)]
    fn spec(&mut self, job: JobId) -> Result<Option<Result<Arc<JobSpec>, String>>> {
        if let Some(spec) = self.specs.get(&job) {
            return Ok(Some(Ok(spec.clone())));
        }
        let record = self.store.job_by_id(job);
        let Some(record) = self.available(record)? else {
            return Ok(None);
        };
        let record = record.context("claimed a fragment of a job that is gone")?;
        let spec: JobSpec = match serde_json::from_str(&record.spec_json) {
            Ok(spec) => spec,
            Err(e) => return Ok(Some(Err(e.to_string()))),
        };
        let spec = Arc::new(spec);
        self.specs.insert(job, spec.clone());
        Ok(Some(Ok(spec)))
    }

    /// Starts a claimed fragment; hands it back if the store is unreachable.
    fn start(&mut self, a: Assignment) -> Result<Option<Assignment>> {
        let spec = match self.spec(a.job)? {
            None => return Ok(Some(a)),
            Some(Ok(spec)) => spec,
            Some(Err(why)) => {
                let halt = JobHalt::Broken(format!("its stored spec cannot be read: {why}"));
                return self.halt(a, halt);
            }
        };
        let stage = &spec.stages[a.stage_index];
        let mut wanted = None;
        let source = if stage.items.streamed() {
            // What the store published for these items; files are fetched on the
            // fragment's thread.
            match self.stream_inputs(&a)? {
                None => return Ok(Some(a)),
                Some(inputs) => wanted = Some(inputs),
            }
            ItemSource::Values {
                first: a.span.start,
                values: Arc::default(),
            }
        } else {
            match self.source(a.job, a.stage_index, &stage.items) {
                Ok(source) => source,
                Err(e) => {
                    let halt = JobHalt::Refused(format!(
                        "stage {}: {e} (on host {})",
                        stage.name, self.info.host
                    ));
                    return self.halt(a, halt);
                }
            }
        };
        let (mut env, by_life) = self.task_env(&spec, a.stage_index, &a);
        if stage.items.streamed() {
            let dir = self.data.cache.dir().display().to_string();
            env.push(("GRANULE_INPUT_DIR".into(), dir));
        }
        let Some((restored, checkpoint_fallbacks, notes)) =
            self.restore_checkpoint(&a, stage.max_checkpoint_bytes)?
        else {
            return Ok(Some(a));
        };
        if checkpoint_fallbacks > 0 {
            // It starts from an older state than it was handed: the store reruns what
            // only the lost checkpoints held.
            self.unflushed_entry(a.fragment).restored = Some(restored.as_ref().map(|r| r.0));
        }
        if let Some((_, state, meta)) = restored {
            env.push(("GRANULE_CHECKPOINT".into(), state.display().to_string()));
            env.push(("GRANULE_CHECKPOINT_META".into(), meta.display().to_string()));
        }
        // Items with sizes: predict by the bytes of this very span, and hand back at
        // once the part that would run far past the target.
        let sized = source.sized();
        let (keep_until, predicted_ms) = sized_prediction(&a, sized.then(|| source.bytes(a.span)));
        let mut job = self.fragment_job(&a, stage, env, source, by_life);
        job.cwd = spec.task_dir(stage);
        let control = Control::new(a.span);
        if let Some(at) = keep_until.and_then(|at| control.split_at(at)) {
            self.unflushed_entry(a.fragment).split = Some(SplitAnswer::At(at));
        }
        let handle = {
            let (control, tx, id) = (control.clone(), self.finished_tx.clone(), a.fragment);
            let data = (self.data.store.clone(), self.data.cache.clone());
            std::thread::Builder::new()
                .name(format!("fragment-{id}"))
                .spawn(move || {
                    let report = match wanted {
                        None => run_fragment(&job, &control),
                        Some(inputs) => run_streamed(job, &control, inputs, &data),
                    };
                    let _ = tx.send(id);
                    report
                })?
        };
        let slot = Slot {
            assignment: a,
            spec,
            control,
            handle: Some(handle),
            checkpoint_fallbacks,
            notes,
            sized,
            predicted_ms,
        };
        self.running.insert(slot.assignment.fragment, slot);
        Ok(None)
    }

    /// What a fragment's task finds in its environment, and when the worker's life
    /// wants it to yield by (unix ms), if it has a lifespan.
    fn task_env(
        &self,
        spec: &JobSpec,
        stage_index: usize,
        a: &Assignment,
    ) -> (Vec<(String, String)>, Option<i64>) {
        let stage = &spec.stages[stage_index];
        let mut env: Vec<(String, String)> = stage
            .env
            .iter()
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect();
        env.extend([
            ("GRANULE_JOB".to_string(), spec.name.clone()),
            ("GRANULE_STAGE".to_string(), stage.name.clone()),
            ("GRANULE_FRAGMENT".to_string(), a.fragment.to_string()),
            ("GRANULE_FIRST".to_string(), a.span.start.to_string()),
            ("GRANULE_COUNT".to_string(), a.span.len().to_string()),
            ("GRANULE_ATTEMPT".to_string(), (a.failures + 1).to_string()),
            ("GRANULE_CLASS".to_string(), self.cfg.class.clone()),
        ]);
        let now_ms = host::now_ms();
        let share = stage.sizer.deadline_share;
        let by_limit = stage.sizer.limit_ms.map(|ms| now_ms + (ms * share) as i64);
        // A task that acks stops being fed when its life is about to end, and yields
        // what it was not fed; one that does not is told to end at a share of it.
        let acking = a.expect_acks == Some(true);
        let latency = yield_latency(self.window_for(a), a.item_cost_ms).min(self.cfg.drain_margin);
        let by_life = self.cfg.lifespan_end.map(|(_, end)| match acking {
            true => end - latency.as_millis() as i64,
            false => now_ms + ((end - now_ms) as f64 * share) as i64,
        });
        if let Some(deadline) = by_limit.into_iter().chain(by_life).min() {
            env.push(("GRANULE_DEADLINE".to_string(), deadline.to_string()));
        }
        (env, by_life)
    }

    /// How long a task is given at each step of being stopped.
    fn task_grace(&self) -> Duration {
        match (&self.cfg.job, self.cfg.lifespan_end) {
            // `run`: the grace before SIGTERM and again before SIGKILL, as documented.
            (Some(_), None) => self.cfg.grace,
            // `worker`: the whole notice covers stdin close, SIGTERM and SIGKILL.
            _ => {
                self.cfg.grace.min(if self.cfg.lifespan_end.is_some() {
                    self.cfg.drain_margin
                } else {
                    self.cfg.grace
                }) / 3
            }
        }
    }

    /// Where a stage's task output goes besides the stored tails: printed line by
    /// line as `[stage label] line` (stdout to stdout, stderr to stderr), and files
    /// under the results folder's `stage/`.
    fn tee_for(&self, stage: &granule_spec::StageSpec) -> Option<granule_exec::OutputTee> {
        if !self.cfg.output && self.cfg.results_dir.is_none() {
            return None;
        }
        let name = stage.name.clone();
        let echo = self.cfg.output.then(|| {
            Arc::new(move |label: &str, stderr: bool, line: &[u8]| {
                use std::io::Write;
                let line = String::from_utf8_lossy(line);
                let text = format!("[{name} {label}] {line}\n");
                let _ = if stderr {
                    std::io::stderr().lock().write_all(text.as_bytes())
                } else {
                    std::io::stdout().lock().write_all(text.as_bytes())
                };
            }) as granule_exec::Echo
        });
        Some(granule_exec::OutputTee {
            echo,
            dir: self.cfg.results_dir.as_ref().map(|d| d.join(&stage.name)),
        })
    }

    /// Items a fragment's task is fed beyond its last ack: `window`, or for slow
    /// items about 100 ms of work unless its stage's tasks ack in batches.
    fn window_for(&self, a: &Assignment) -> u64 {
        if self.batch_ackers.contains(&(a.job, a.stage_index)) {
            self.cfg.window
        } else {
            granule_exec::feed_window(self.cfg.window, a.item_cost_ms)
        }
    }

    /// What the runner of a fragment needs to run its task.
    fn fragment_job(
        &self,
        a: &Assignment,
        stage: &granule_spec::StageSpec,
        env: Vec<(String, String)>,
        source: ItemSource,
        by_life: Option<i64>,
    ) -> FragmentJob {
        let (now, now_ms) = (Instant::now(), host::now_ms());
        FragmentJob {
            fragment: a.fragment,
            span: a.span,
            argv: stage.command.clone(),
            per_item: stage.per_item,
            env,
            source,
            limit: stage
                .sizer
                .limit_ms
                .map(|ms| Duration::from_secs_f64(ms / 1e3)),
            item_cost_ms: a.item_cost_ms,
            deadline_share: stage.sizer.deadline_share,
            yield_by: by_life.map(|ms| now + Duration::from_millis((ms - now_ms).max(0) as u64)),
            feed_for: a.feed_for_ms.map(|ms| Duration::from_secs_f64(ms / 1e3)),
            grace: self.task_grace(),
            window: self.window_for(a),
            window_max: self.cfg.window,
            expect_acks: a.expect_acks,
            first_ack_patience: Duration::from_secs_f64(
                (a.predicted_ms * 4.0 / 1e3).clamp(1.0, 60.0),
            ),
            log_tail_bytes: self.cfg.log_tail_bytes,
            checkpoint_level: self.cfg.checkpoint_level,
            max_checkpoint_bytes: stage.max_checkpoint_bytes,
            data: Some(self.data.store.clone()),
            scratch: self.data.scratch.clone(),
            stdout_outputs: stage.stdout_outputs,
            cwd: stage.cwd.clone(),
            tee: self.tee_for(stage),
        }
    }

    /// What the next flush says of fragment `id`.
    fn unflushed_entry(&mut self, id: FragmentId) -> &mut FragmentFlush {
        self.unflushed.entry(id).or_insert_with(|| FragmentFlush {
            fragment: id,
            ..FragmentFlush::default()
        })
    }

    /// Writes the checkpoint a resumed fragment starts from, and its metadata. A
    /// checkpoint that is missing or fails verification is skipped for the one
    /// before it in its chain, down to none (then the fragment starts at its first
    /// item without state). Returns the checkpoint restored (its id and files), the
    /// checkpoints skipped, and notes; `None` while the store is unreachable.
    #[allow(clippy::type_complexity)]
    fn restore_checkpoint(
        &mut self,
        a: &Assignment,
        stage_max_checkpoint: u64,
    ) -> Result<Option<(Option<(i64, PathBuf, PathBuf)>, u32, Vec<String>)>> {
        let (mut next, mut fallbacks, mut notes) = (a.checkpoint, 0, Vec::new());
        // A chain longer than this is not walked: the fragment starts without state.
        let mut walk = 64;
        while let Some(id) = next {
            walk -= 1;
            if walk == 0 {
                break;
            }
            let found = self.store.blob(id);
            let Some(found) = self.available(found)? else {
                return Ok(None);
            };
            let Some(stored) = found else {
                notes.push(format!("checkpoint {id} is missing"));
                fallbacks += 1;
                let before = self.store.checkpoint_before(id);
                let Some(before) = self.available(before)? else {
                    return Ok(None);
                };
                next = before;
                continue;
            };
            let blob = Blob {
                data: stored.row.data,
                raw_len: stored.row.raw_len,
                hash: stored.row.hash,
            };
            match blob.open(stage_max_checkpoint) {
                Ok(raw) => {
                    let dir = self.cfg.state_dir.join("checkpoints");
                    std::fs::create_dir_all(&dir)?;
                    let state =
                        std::path::absolute(dir.join(format!("fragment-{}.state", a.fragment)))?;
                    let meta = std::path::absolute(
                        dir.join(format!("fragment-{}.meta.json", a.fragment)),
                    )?;
                    std::fs::write(&state, raw)?;
                    std::fs::write(&meta, stored.row.meta)?;
                    if fallbacks > 0 {
                        notes.push(format!(
                            "resumed from older checkpoint {id}; items only the skipped ones held run again"
                        ));
                    }
                    self.show_notes(a.fragment, &notes);
                    return Ok(Some((Some((id, state, meta)), fallbacks, notes)));
                }
                Err(e) => {
                    notes.push(format!("checkpoint {id} is unusable ({e})"));
                    fallbacks += 1;
                    next = stored.prev;
                }
            }
        }
        if fallbacks > 0 {
            notes.push(
                "no good checkpoint left: started without state; items the lost ones held run again"
                    .into(),
            );
        }
        self.show_notes(a.fragment, &notes);
        Ok(Some((None, fallbacks, notes)))
    }

    /// Ends a claimed fragment without running it: its job cannot run here (its
    /// items changed, its stored spec is unreadable). Nothing is charged; the job
    /// stops with `halt`'s message.
    fn halt(&mut self, a: Assignment, halt: JobHalt) -> Result<Option<Assignment>> {
        self.progress
            .note(&format!("job stopped: {}", halt.message()));
        let end = FragmentEnd {
            outcome: FinishOutcome::Yielded,
            state: FragmentState::Yielded,
            fed: 0,
            halt: Some(halt),
            ..FragmentEnd::success(a.fragment, a.span.end)
        };
        let context = FinishContext {
            id: a.fragment,
            job: a.job,
            stage: String::new(),
            stage_index: a.stage_index,
            span: a.span,
            n: a.n,
            failure: None,
            halt: None,
            failed_items: 0,
            acked: 0,
            state: "yielded",
            started_ms: host::now_ms(),
            duration_ms: 0.0,
        };
        let result = self.store.finish(&self.info.id, host::now_ms(), &end);
        if self.available(result)?.is_none() {
            self.unfinished.push((end, context));
        }
        Ok(None)
    }

    /// The items of a stage, opened (and verified) once per worker and again when the
    /// file moved since.
    fn source(
        &mut self,
        job: JobId,
        stage: usize,
        items: &granule_spec::ItemsSpec,
    ) -> Result<ItemSource, ItemsError> {
        if let Some(source) = self.sources.get(&(job, stage)) {
            if source.unchanged() {
                return Ok(source.clone());
            }
        }
        let source = ItemSource::open(items)?;
        self.sources.insert((job, stage), source.clone());
        Ok(source)
    }

    /// What the store published for a streamed fragment's items, with results
    /// read (and verified) from the store: `None` while the store is unreachable.
    fn stream_inputs(&mut self, a: &Assignment) -> Result<Option<Result<Vec<Wanted>, String>>> {
        let fetched = self.store.stream_values(a.stage, a.span);
        let Some(published) = self.available(fetched)? else {
            return Ok(None);
        };
        let mut wanted = Vec::with_capacity(published.len());
        for p in published {
            wanted.push(match p.output {
                Output::Record(bytes) => Wanted::Value(bytes),
                Output::File { key, name, bytes } => Wanted::File { key, name, bytes },
                Output::Result(id) => {
                    let blob = self.store.blob(id);
                    let Some(blob) = self.available(blob)? else {
                        return Ok(None);
                    };
                    let Some(stored) = blob else {
                        return Ok(Some(Err(format!("result {id} is missing from the store"))));
                    };
                    let blob = sealed(stored.row);
                    match blob.open(u64::MAX) {
                        Ok(raw) => Wanted::Result {
                            key: blob.hash,
                            raw,
                        },
                        Err(e) => return Ok(Some(Err(format!("result {id}: {e}")))),
                    }
                }
            });
        }
        Ok(Some(Ok(wanted)))
    }

    fn show_notes(&self, fragment: FragmentId, notes: &[String]) {
        for note in notes {
            self.progress.note(&format!("fragment {fragment}: {note}"));
        }
    }

    /// Moves what the runner acked since the last call into `unflushed`.
    fn collect(&mut self, id: FragmentId) {
        let Some(slot) = self.running.get(&id) else {
            return;
        };
        let granule_exec::Unflushed {
            acked,
            checkpoints,
            outputs,
        } = slot.control.take_unflushed();
        let n = slot.assignment.n;
        let b = slot.assignment.item_cost_ms;
        let entry = self.unflushed.entry(id).or_insert_with(|| FragmentFlush {
            fragment: id,
            ..FragmentFlush::default()
        });
        entry.acked.union_with(&acked);
        entry.outputs.extend(outputs);
        let sample = (!checkpoints.is_empty()).then(|| self.sampler.sample());
        for cp in checkpoints {
            entry.checkpoints.push(NewCheckpoint {
                blob: BlobRow {
                    data: cp.blob.data,
                    raw_len: cp.blob.raw_len,
                    hash: cp.blob.hash,
                    meta: serde_json::json!({
                        "fragment_size": n,
                        "acks": cp.acks,
                        "at_ms": cp.at_ms,
                        "predicted_remaining_ms": (n.saturating_sub(cp.acks)) as f64 * b,
                        "free_memory": sample.map(|s| s.free_memory),
                        "load_per_cpu": sample.map(|s| s.load_per_cpu),
                    })
                    .to_string(),
                },
                acked: cp.acked,
            });
        }
    }

    fn flush(&mut self) -> Result<()> {
        let ids: Vec<FragmentId> = self.running.keys().copied().collect();
        for id in ids {
            self.collect(id);
        }
        // In stage order: every flush locks stage rows (a publish, its producer's
        // then its consumers') in the same order, so two workers' flushes do not
        // deadlock on PostgreSQL.
        let mut batch: Vec<FragmentFlush> = self.unflushed.values().cloned().collect();
        batch.sort_by_key(|f| {
            let stage = self.running.get(&f.fragment).map(|s| s.assignment.stage.0);
            (stage.unwrap_or(i64::MAX), f.fragment.0)
        });
        let sample = self.sampler.sample();
        let heartbeat = Heartbeat {
            busy: self.running.len() as u32,
            free_memory: sample.free_memory,
            load: sample.load_per_cpu,
            held: self
                .running
                .keys()
                .copied()
                .chain(self.deferred.iter().map(|a| a.fragment))
                .collect(),
        };
        let lease_ms = self.cfg.lease.as_millis() as i64;
        let result = self
            .store
            .flush(&self.info.id, host::now_ms(), lease_ms, &heartbeat, &batch);
        // Unreachable: keep the acks and try again next time; nothing acked is dropped.
        let Some(reply) = self.available(result)? else {
            return Ok(());
        };
        self.store_writable();
        self.unflushed.clear();
        for id in reply.stopped {
            if let Some(slot) = self.running.get(&id) {
                self.stopped.insert(id);
                slot.control.kill();
            }
        }
        for id in reply.lost {
            if let Some(slot) = self.running.get(&id) {
                self.progress.note(&format!(
                    "fragment {id} was taken over (lease lost): stopping it"
                ));
                slot.control.kill();
            }
        }
        for (id, at) in reply.split_requests {
            let Some(slot) = self.running.get(&id) else {
                continue;
            };
            let answer = slot
                .control
                .split_at(at)
                .map_or(SplitAnswer::Refused, SplitAnswer::At);
            self.unflushed_entry(id).split = Some(answer);
        }
        Ok(())
    }

    /// Records a fragment's end; with `claim`, claims for the free slots in the same
    /// store transaction.
    fn finish(&mut self, id: FragmentId, claim: bool) -> Result<()> {
        self.collect(id);
        let mut slot = self
            .running
            .remove(&id)
            .expect("a finished fragment is running");
        let report = slot
            .handle
            .take()
            .expect("joined once")
            .join()
            .map_err(|_| anyhow::anyhow!("runner of fragment {id} panicked"))?;
        let flush = self.unflushed.remove(&id).unwrap_or_else(|| FragmentFlush {
            fragment: id,
            ..FragmentFlush::default()
        });
        for note in &report.notes {
            self.progress.note(&format!("fragment {id}: {note}"));
        }
        match &report.unavailable {
            Some(why) => {
                // Its items went back uncharged; this worker waits before claiming
                // again (2 s, doubling to a minute) instead of failing everything.
                let wait = self.data_backoff.map_or(Duration::from_secs(2), |d| {
                    (d * 2).min(Duration::from_secs(60))
                });
                self.progress.note(&format!(
                    "fragment {id} handed back: {why}; claiming again in {}s",
                    wait.as_secs()
                ));
                self.data_backoff = Some(wait);
                self.data_paused_until = Some(Instant::now() + wait);
            }
            None if report.failure.is_none() => self.data_backoff = None,
            None => {}
        }
        if report.acks_in_batches {
            let stage = (slot.assignment.job, slot.assignment.stage_index);
            self.batch_ackers.insert(stage);
        }
        let end = self.end_of(&slot, &report, flush);
        let stage_spec = &slot.spec.stages[slot.assignment.stage_index];
        let failed_items = match &report.outcome {
            FinishOutcome::Failed { .. } if stage_spec.per_item => report.culprits.len().max(1),
            FinishOutcome::Failed { .. } => report.fed.saturating_sub(report.acks).max(1),
            _ => report.culprits.len(),
        };
        let context = FinishContext {
            id,
            job: slot.assignment.job,
            stage: stage_spec.name.clone(),
            stage_index: slot.assignment.stage_index,
            span: slot.assignment.span,
            n: slot.assignment.n,
            failure: report.failure.as_ref().map(|f| f.to_string()),
            halt: stage_spec.halt,
            failed_items,
            acked: report.acks,
            state: match end.state {
                FragmentState::Done => "done",
                FragmentState::Failed => "failed",
                _ => "yielded",
            },
            started_ms: host::now_ms() - report.duration_ms as i64,
            duration_ms: report.duration_ms,
        };
        let claim = claim && self.deferred.is_empty() && !self.data_paused();
        let req = claim.then(|| self.claim_request());
        let free = self.free_slots();
        let next = req.as_ref().map(|r| (r, free));
        let result = self
            .store
            .finish_and_claim(&self.info.id, host::now_ms(), &end, next);
        let Some((finished, claimed)) = self.available(result)? else {
            // Kept (with its acks) until the store is back.
            self.unfinished.push((end, context));
            return Ok(());
        };
        self.store_writable();
        self.report_finish(&context, &finished);
        for assignment in claimed {
            self.start_or_defer(assignment)?;
        }
        Ok(())
    }

    /// The store's record of a fragment's end, from its runner's report.
    fn end_of(&mut self, slot: &Slot, report: &RunReport, flush: FragmentFlush) -> FragmentEnd {
        let state = match report.outcome {
            FinishOutcome::Success | FinishOutcome::AllOrNothing { .. } => FragmentState::Done,
            FinishOutcome::Yielded | FinishOutcome::Lost => FragmentState::Yielded,
            FinishOutcome::Failed { .. } => FragmentState::Failed,
        };
        let mut detail: Vec<String> = report.failure.iter().map(|f| f.to_string()).collect();
        detail.extend(slot.notes.iter().cloned());
        // The time spent on items that must run again: the unacked share of the
        // run (all of it for a task that failed before taking an item).
        let wasted_ms = match (&report.outcome, report.fed) {
            (FinishOutcome::Success | FinishOutcome::AllOrNothing { .. }, _) => 0.0,
            (FinishOutcome::Failed { .. }, 0) => report.duration_ms,
            (_, 0) => 0.0,
            (_, fed) => {
                report.duration_ms * report.fed.saturating_sub(report.acks) as f64 / fed as f64
            }
        };
        let load_now = self.sampler.sample().load_per_cpu;
        let end = FragmentEnd {
            flush,
            end: report.end,
            outcome: report.outcome.clone(),
            state,
            cause: report.failure.as_ref().map(|f| f.cause().to_string()),
            detail: (!detail.is_empty()).then(|| detail.join("; ")),
            wasted_ms,
            checkpoint_fallbacks: slot.checkpoint_fallbacks,
            observed_ms: report.duration_ms,
            cpu_ms: report.cpu_ms,
            peak_rss_kb: report.peak_rss_kb,
            io_bytes: report.io_bytes,
            bytes: slot.sized.then_some(report.fed_bytes),
            predicted_ms: slot.predicted_ms,
            load: self.others_load(load_now),
            fed: report.fed,
            acks: report.acks,
            first_ack_ms: report.first_ack_ms,
            last_ack_ms: report.last_ack_ms,
            stdout: report.stdout_tail.clone(),
            stderr: report.stderr_tail.clone(),
            halt: None,
        };
        end
    }

    /// Counts a finished fragment's failed and acked items for its stage's `halt`,
    /// and stops the job when they trip it.
    fn judge_halt(&mut self, c: &FinishContext) {
        let Some(halt) = c.halt else {
            return;
        };
        let seen = self
            .attempts
            .entry((c.job, c.stage_index))
            .or_insert((0, 0));
        seen.0 += c.failed_items;
        seen.1 += c.acked;
        let (failed, done) = *seen;
        // Judged when a fragment fails: successes alone never halt a job.
        if c.failed_items == 0 || !halt.trips(failed, done) {
            return;
        }
        // Counted afresh from here: a job retried after this halt starts clean.
        self.attempts.remove(&(c.job, c.stage_index));
        let why = format!(
            "stage \"{}\" halted: {failed} of {} item attempts failed (halt: fail_ratio {} after {}); fix the task, then `granule retry`",
            c.stage,
            failed + done,
            halt.fail_ratio,
            halt.after
        );
        let halted = self.store.halt(c.job, &why, host::now_ms());
        if let Ok(Some(true)) = self.available(halted) {
            self.progress.note(&format!("job stopped: {why}"));
        }
    }

    /// Names of the items of `span` (their values, at most a few), with their indices.
    fn item_values(&self, job: JobId, stage: usize, span: granule_core::Span) -> String {
        const SHOWN: u64 = 5;
        let range = if span.len() == 1 {
            format!("(index {})", span.start)
        } else {
            format!("(indices {}..{})", span.start, span.end)
        };
        let Some(source) = self.sources.get(&(job, stage)) else {
            return range;
        };
        let shown = granule_core::Span::new(span.start, span.end.min(span.start + SHOWN));
        let Ok(mut iter) = source.iter(shown) else {
            return range;
        };
        let (mut values, mut value) = (Vec::new(), Vec::new());
        while let Ok(true) = iter.next_value(&mut value) {
            values.push(format!("{:?}", String::from_utf8_lossy(&value)));
        }
        if span.len() > SHOWN {
            values.push(format!("and {} more", span.len() - SHOWN));
        }
        format!("{} {range}", values.join(", "))
    }

    /// Appends a fragment's line to the job log (`--joblog`): tab-separated, a
    /// header first when the file is new.
    fn write_joblog(&self, c: &FinishContext) {
        use std::io::Write;
        let Some(path) = &self.cfg.joblog else {
            return;
        };
        if c.stage.is_empty() {
            return; // never ran: its job could not run here
        }
        let new = !path.exists();
        let Ok(mut file) = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(path)
        else {
            return;
        };
        if new {
            let _ = writeln!(
                file,
                "fragment\tstage\tfirst\tend\tworker\tstart_unix\tseconds\tacked\tfailed\tstate\tfailure"
            );
        }
        let _ = writeln!(
            file,
            "{}\t{}\t{}\t{}\t{}\t{:.3}\t{:.3}\t{}\t{}\t{}\t{}",
            c.id,
            c.stage,
            c.span.start,
            c.span.end,
            self.info.id,
            c.started_ms as f64 / 1e3,
            c.duration_ms / 1e3,
            c.acked,
            c.failed_items,
            c.state,
            c.failure
                .as_deref()
                .unwrap_or("")
                .replace(['\t', '\n'], " ")
        );
    }

    fn report_finish(&mut self, c: &FinishContext, finished: &Finished) {
        let (id, stage) = (c.id, &c.stage);
        if self.stopped.remove(&id) {
            return; // its job was cancelled or stopped: said once already
        }
        if !finished.accepted {
            self.progress.note(&format!("stage {stage}: fragment {id} was no longer ours; its late results were not counted"));
            return;
        }
        self.write_joblog(c);
        if let Some(failure) = &c.failure {
            // The first few failures of a stage are shown; then a count, every
            // tenth time, so a task that fails on every item does not flood.
            let shown = self.failures_seen.entry(stage.clone()).or_insert(0);
            *shown += 1;
            if *shown <= FAILURES_SHOWN {
                self.progress.note(&format!(
                    "stage {stage}: fragment {id} [{}, {}) failed: {failure} (see: granule logs {stage} --fragment {id})",
                    c.span.start, c.span.end
                ));
            } else if shown.is_multiple_of(10) || *shown == FAILURES_SHOWN + 1 {
                self.progress.note(&format!(
                    "stage {stage}: {shown} fragments failed so far (the rest are not shown: granule logs {stage})"
                ));
            }
        }
        for span in finished.quarantined.spans() {
            let values = self.item_values(c.job, c.stage_index, span);
            self.progress.note(&format!(
                "stage {stage}: quarantined {} {values}",
                if span.len() == 1 { "item" } else { "items" }
            ));
        }
        self.judge_halt(c);
        if self.cfg.job.is_some() {
            self.progress.fragment_size(c.stage_index, c.n);
        }
    }

    fn refresh_progress(&mut self) -> Result<()> {
        let Some((job, _)) = &self.cfg.job else {
            return Ok(());
        };
        let progress = self.store.progress(*job);
        if let Some(stages) = self.available(progress)? {
            self.progress.update(&stages);
        }
        Ok(())
    }
}

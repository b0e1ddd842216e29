//! The fragment runner: one child (batch) or one child per item, supervised.
//!
//! This module holds what both modes share: the job description, the control
//! handle a supervisor drives, the failure taxonomy, the supervision loop and the
//! verdict on how a fragment ended. `batch.rs` feeds stdin and reads fd 3;
//! `per_item.rs` starts a process per item.

use crate::blob::Blob;
use crate::items::ItemSource;
use crate::sys::{self, Exit, Waiter};
use granule_core::{FinishOutcome, FragmentId, IntervalSet, ItemOutputs, Output, Span};
use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::time::{Duration, Instant};

/// How often the supervisor wakes to check yields, kills and deadlines.
pub(crate) const TICK: Duration = Duration::from_millis(20);

/// Environment variables a task never inherits: granule's own credentials.
pub(crate) const PRIVATE_ENV: &[&str] = &["GRANULE_STORE", "GRANULE_TOKEN"];

/// Everything needed to run one fragment.
#[derive(Clone, Debug)]
pub struct FragmentJob {
    /// The fragment's id (for the environment and logs).
    pub fragment: FragmentId,
    /// Its items.
    pub span: Span,
    /// The command's argv.
    pub argv: Vec<String>,
    /// Per-item mode (`{}` replaced, one process per item).
    pub per_item: bool,
    /// Extra environment (the `GRANULE_*` variables).
    pub env: Vec<(String, String)>,
    /// Item values.
    pub source: ItemSource,
    /// Hard limit: killed and failed past it.
    pub limit: Option<Duration>,
    /// Predicted per-item cost, ms, to foresee a limit overrun.
    pub item_cost_ms: f64,
    /// Share of the limit a fragment may be predicted to reach before it yields.
    pub deadline_share: f64,
    /// The worker's own soft deadline for this fragment (from its lifespan): it
    /// yields when the unacked items are predicted to run past it, or at it.
    pub yield_by: Option<Instant>,
    /// Elastic end: a task that acks is fed only while the items fed are predicted
    /// (at its own ack pace) to finish within this long of the start; the rest is
    /// handed back when it ends. `None`: fed to the end of its span.
    pub feed_for: Option<Duration>,
    /// Time between closing stdin and SIGTERM, and between SIGTERM and SIGKILL.
    pub grace: Duration,
    /// Items fed beyond the last ack, once the task has acked ([`feed_window`]:
    /// about 100 ms of work for slow items, so a split or yield waits little).
    pub window: u64,
    /// What the window grows to when the task stalls holding it, having read all
    /// it was fed without acking (a task that acks in batches, with each
    /// checkpoint): the most a task may leave unacked (64 by default).
    pub window_max: u64,
    /// Whether the stage's tasks ack (`None`: not known yet). Unless they are known
    /// not to, the window holds from the first item, waiting at most
    /// `first_ack_patience` for a first ack before feeding freely.
    pub expect_acks: Option<bool>,
    /// See `expect_acks`.
    pub first_ack_patience: Duration,
    /// Bytes of stdout and of stderr kept (the tail).
    pub log_tail_bytes: usize,
    /// zstd level for checkpoint blobs.
    pub checkpoint_level: i32,
    /// Largest checkpoint file taken, bytes; a larger one fails the fragment.
    pub max_checkpoint_bytes: u64,
    /// Where output files (`output PATH`) are stored; `None` refuses them.
    pub data: Option<Arc<crate::DataStore>>,
    /// A local folder for temporary files (an output file compressed on its way
    /// to a remote store).
    pub scratch: std::path::PathBuf,
    /// Per-item mode: each stdout line of an item's process is an output of it.
    pub stdout_outputs: bool,
    /// The folder the task runs in (a relative `argv[0]` with a `/` is found
    /// there); `None`: the worker's own.
    pub cwd: Option<std::path::PathBuf>,
    /// Where the task's output also goes (`run --output`, `--results`).
    pub tee: Option<OutputTee>,
}

/// Called with a label (the fragment, or the item's value), whether the line came
/// from stderr, and one whole line of output without its newline.
pub type Echo = Arc<dyn Fn(&str, bool, &[u8]) + Send + Sync>;

/// Where a task's output goes besides the tails the store keeps.
#[derive(Clone, Default)]
pub struct OutputTee {
    /// Each line, as it comes.
    pub echo: Option<Echo>,
    /// A folder for files: `<index>.stdout` and `<index>.stderr` per item in
    /// per-item mode, `fragment-<id>.stdout` and `.stderr` in batch mode.
    pub dir: Option<std::path::PathBuf>,
}

impl std::fmt::Debug for OutputTee {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("OutputTee")
            .field("echo", &self.echo.is_some())
            .field("dir", &self.dir)
            .finish()
    }
}

impl FragmentJob {
    /// The program to exec: `argv[0]`, found in `cwd` when it is a relative path.
    pub(crate) fn program(&self) -> std::path::PathBuf {
        let program = std::path::Path::new(&self.argv[0]);
        match &self.cwd {
            Some(cwd) if program.is_relative() && self.argv[0].contains('/') => cwd.join(program),
            _ => program.to_path_buf(),
        }
    }

    /// `cmd` set to run in the job's folder, if it has one.
    pub(crate) fn in_cwd<'c>(
        &self,
        cmd: &'c mut std::process::Command,
    ) -> &'c mut std::process::Command {
        if let Some(cwd) = &self.cwd {
            cmd.current_dir(cwd);
        }
        cmd
    }
}

/// A checkpoint handed over on fd 3, already read and sealed.
#[derive(Debug)]
pub struct Checkpoint {
    /// The sealed state.
    pub blob: Blob,
    /// Acks received before it.
    pub acks: u64,
    /// The items acked before it (the ones whose state it holds, with what the
    /// fragment resumed from).
    pub acked: IntervalSet,
    /// When it arrived, ms after the start.
    pub at_ms: f64,
}

/// What a fragment reported since the last flush.
#[derive(Debug, Default)]
pub struct Unflushed {
    /// New acks.
    pub acked: IntervalSet,
    /// New checkpoints, in arrival order.
    pub checkpoints: Vec<Checkpoint>,
    /// Outputs of the newly acked items.
    pub outputs: Vec<ItemOutputs>,
}

/// Why a fragment failed.
#[derive(Clone, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum Failure {
    /// The command exited non-zero.
    Exit(i32),
    /// A signal granule did not send killed it.
    Signal(i32),
    /// It ran past the stage's `limit` (ms).
    Timeout(u64),
    /// The kernel's OOM killer ended it.
    OutOfMemory,
    /// It could not be started.
    Spawn(String),
    /// It exited 0 but left items it was fed unacked.
    Unacked(u64),
    /// It broke the fd-3 protocol (unknown command, runaway line, version-1 line).
    Protocol(String),
    /// A checkpoint it handed over could not be taken (not a regular file, too
    /// large, unreadable); the acks written with it were not counted.
    Checkpoint(String),
    /// Its items could not be read (a read error, a file that ended early).
    Items(String),
    /// An output it handed over could not be taken (not a regular file, the blob
    /// store failed), or it wrote outputs in a way granule cannot publish once.
    Output(String),
}

impl Failure {
    /// A short machine-friendly cause name.
    pub fn cause(&self) -> &'static str {
        match self {
            Failure::Exit(_) => "exit",
            Failure::Signal(_) => "signal",
            Failure::Timeout(_) => "timeout",
            Failure::OutOfMemory => "oom",
            Failure::Spawn(_) => "spawn",
            Failure::Unacked(_) => "unacked",
            Failure::Protocol(_) => "protocol",
            Failure::Checkpoint(_) => "checkpoint",
            Failure::Items(_) => "items",
            Failure::Output(_) => "output",
        }
    }
}

impl std::fmt::Display for Failure {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Failure::Exit(code) => write!(f, "exit code {code}"),
            Failure::Signal(sig) => {
                write!(f, "killed by signal {sig} ({})", sys::signal_name(*sig))
            }
            Failure::Timeout(ms) => write!(
                f,
                "timed out: ran past the limit of {:.1}s",
                *ms as f64 / 1e3
            ),
            Failure::OutOfMemory => write!(f, "killed by the kernel's OOM killer (out of memory)"),
            Failure::Spawn(e) => write!(f, "could not start: {e}"),
            Failure::Unacked(n) => write!(f, "exited 0 but never acked {n} items it was fed"),
            Failure::Protocol(e)
            | Failure::Checkpoint(e)
            | Failure::Items(e)
            | Failure::Output(e) => f.write_str(e),
        }
    }
}

/// How a fragment ended and what it used.
#[derive(Debug)]
pub struct RunReport {
    /// The failure, if it failed.
    pub failure: Option<Failure>,
    /// Whether it stopped early at a safe point (yield or split).
    pub yielded: bool,
    /// Items fed (batch) or started (per item).
    pub fed: u64,
    /// Where the fragment ended up ending, after any split.
    pub end: u64,
    /// Items acked.
    pub acks: u64,
    /// Ack lines that matched no fed, unacked item.
    pub bad_acks: u64,
    /// The task stalled holding its feed window, then acked more items at once
    /// than that window held: it acks in batches, and its stage's next fragments
    /// are better fed `window_max` from the start.
    pub acks_in_batches: bool,
    /// Per-item mode: items whose run failed.
    pub culprits: IntervalSet,
    /// Wall time, ms.
    pub duration_ms: f64,
    /// First and last ack, ms after the start.
    pub first_ack_ms: Option<f64>,
    /// See `first_ack_ms`.
    pub last_ack_ms: Option<f64>,
    /// CPU time of the child(ren), ms.
    pub cpu_ms: f64,
    /// Peak RSS of the child(ren), KiB.
    pub peak_rss_kb: u64,
    /// Block I/O of the child(ren), bytes.
    pub io_bytes: u64,
    /// Tail of stdout.
    pub stdout_tail: Vec<u8>,
    /// Tail of stderr.
    pub stderr_tail: Vec<u8>,
    /// What accounting should do with the unacked items.
    pub outcome: FinishOutcome,
    /// Bytes of the item values fed (each with its newline).
    pub fed_bytes: u64,
    /// It never started because something it needs could not be reached (the
    /// blob store): why. Its items go back uncharged.
    pub unavailable: Option<String>,
    /// What the worker should say about it (what fetching its inputs took).
    pub notes: Vec<String>,
}

#[derive(Default)]
pub(crate) struct Shared {
    pub(crate) fed: u64,
    pub(crate) fed_bytes: u64,
    /// Longest value fed, bytes (acks echo values: fd-3 lines may be that long).
    pub(crate) longest_fed: usize,
    pub(crate) feed_end: u64,
    pub(crate) stop_feeding: bool,
    pub(crate) feeder_waiting: bool,
    /// The task stalled holding a full window: it is `window_max` from now on.
    pub(crate) window_grown: bool,
    /// The most acks one read of fd 3 brought.
    pub(crate) most_acks_at_once: u64,
    pub(crate) yield_requested: bool,
    pub(crate) kill_requested: bool,
    pub(crate) acks: u64,
    pub(crate) acked: IntervalSet,
    pub(crate) unflushed: IntervalSet,
    pub(crate) bad_acks: u64,
    pub(crate) first_ack: Option<Instant>,
    pub(crate) last_ack: Option<Instant>,
    pub(crate) inflight: HashMap<Vec<u8>, VecDeque<u64>>,
    pub(crate) inflight_len: usize,
    pub(crate) untracked: bool,
    pub(crate) checkpoints: Vec<Checkpoint>,
    /// Outputs written since the last ack: they belong to the item acked next.
    pub(crate) pending_outputs: Vec<Output>,
    /// Acked items' outputs not yet flushed.
    pub(crate) outputs: Vec<ItemOutputs>,
    /// Whether the task wrote any output, and any checkpoint (not both: a
    /// stateful stage's acks can be undone, and a published output cannot).
    pub(crate) emitted: bool,
    pub(crate) checkpointed: bool,
    /// Why the fragment must fail, found by a helper thread (fd 3, the items).
    pub(crate) fault: Option<Failure>,
}

/// The handle shared by the runner and whoever supervises it: progress out,
/// yield/kill/split requests in.
pub struct Control {
    pub(crate) span: Span,
    state: Mutex<Shared>,
    pub(crate) cond: Condvar,
}

/// A snapshot of a running fragment's progress.
#[derive(Clone, Debug, PartialEq)]
pub struct Progress {
    /// Items fed so far.
    pub fed: u64,
    /// Items acked so far.
    pub acks: u64,
}

impl Control {
    /// A control for a fragment over `span`.
    pub fn new(span: Span) -> Arc<Control> {
        let shared = Shared {
            feed_end: span.end,
            ..Shared::default()
        };
        Arc::new(Control {
            span,
            state: Mutex::new(shared),
            cond: Condvar::new(),
        })
    }

    pub(crate) fn lock(&self) -> MutexGuard<'_, Shared> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Asks the fragment to stop at its next safe point.
    pub fn request_yield(&self) {
        let mut st = self.lock();
        st.yield_requested = true;
        st.stop_feeding = true;
        self.cond.notify_all();
    }

    /// Kills the fragment now (acked items stay acked).
    pub fn kill(&self) {
        let mut st = self.lock();
        st.kill_requested = true;
        st.stop_feeding = true;
        self.cond.notify_all();
    }

    /// Fails the fragment for `failure` found by a helper: feeding stops and the
    /// task is killed.
    pub(crate) fn fault(&self, failure: Failure) {
        let mut st = self.lock();
        st.fault.get_or_insert(failure);
        st.kill_requested = true;
        st.stop_feeding = true;
        self.cond.notify_all();
    }

    /// Stops feeding at `at` (or at the first unfed item, if later); returns the
    /// index where the fragment now ends, or `None` if nothing is left to split.
    pub fn split_at(&self, at: u64) -> Option<u64> {
        let mut st = self.lock();
        let at = at.max(self.span.start + st.fed + 1);
        if at >= st.feed_end || st.stop_feeding {
            return None;
        }
        st.feed_end = at;
        Some(at)
    }

    /// Items fed and acked so far.
    pub fn progress(&self) -> Progress {
        let st = self.lock();
        Progress {
            fed: st.fed,
            acks: st.acks,
        }
    }

    /// Takes the acks, checkpoints and outputs received since the last call (an
    /// ack and the outputs of its item are always taken together).
    pub fn take_unflushed(&self) -> Unflushed {
        let mut st = self.lock();
        Unflushed {
            acked: std::mem::take(&mut st.unflushed),
            checkpoints: std::mem::take(&mut st.checkpoints),
            outputs: std::mem::take(&mut st.outputs),
        }
    }

    pub(crate) fn request_stop_feeding(&self) {
        let mut st = self.lock();
        st.stop_feeding = true;
        self.cond.notify_all();
    }

    /// Records one ack of item `index`; false if it was acked already.
    pub(crate) fn ack(st: &mut Shared, index: u64, now: Instant) -> bool {
        if st.acked.contains(index) {
            return false;
        }
        st.acked.insert_one(index);
        st.unflushed.insert_one(index);
        if !st.pending_outputs.is_empty() {
            let outputs = std::mem::take(&mut st.pending_outputs);
            st.outputs.push(ItemOutputs {
                item: index,
                outputs,
            });
        }
        st.acks += 1;
        st.first_ack.get_or_insert(now);
        st.last_ack = Some(now);
        true
    }
}

/// Runs the fragment to its end and reports. Acks and checkpoints stream into
/// `control` meanwhile; what is left unflushed at the end stays there.
pub fn run_fragment(job: &FragmentJob, control: &Arc<Control>) -> RunReport {
    let start = Instant::now();
    let oom_before = sys::oom_kills();
    let mut report = if job.per_item {
        crate::per_item::run(job, control, start)
    } else {
        crate::batch::run(job, control, start)
    };
    if matches!(report.failure, Some(Failure::Signal(libc::SIGKILL)))
        && sys::oom_kills() > oom_before
    {
        report.failure = Some(Failure::OutOfMemory);
    }
    report.duration_ms = start.elapsed().as_secs_f64() * 1e3;
    let st = control.lock();
    let ms = |t: Option<Instant>| t.map(|t| t.duration_since(start).as_secs_f64() * 1e3);
    report.first_ack_ms = ms(st.first_ack);
    report.last_ack_ms = ms(st.last_ack);
    report.fed = st.fed;
    report.fed_bytes = st.fed_bytes;
    report.end = st.feed_end;
    report.acks = st.acks;
    report.bad_acks = st.bad_acks;
    report.acks_in_batches = st.window_grown && st.most_acks_at_once > job.window;
    if st.acks == 0 && !st.pending_outputs.is_empty() && report.failure.is_none() {
        // Outputs belong to the item acked after them: with no ack at all they
        // belong to nothing (an all-or-nothing exit cannot say which item made them).
        report.failure = Some(Failure::Output(
            "it wrote outputs but acked no item: write an item's outputs, then its value, on fd 3"
                .into(),
        ));
    }
    report.outcome = outcome(job, &report);
    report
}

/// The report of a fragment that could not start because of `failure` (its items
/// could not be fetched): nothing fed, the first item charged, as for a task that
/// could not be spawned.
pub fn failed_before_start(job: &FragmentJob, failure: Failure) -> RunReport {
    let mut report = empty_report();
    report.failure = Some(failure);
    report.end = job.span.end;
    report.outcome = outcome(job, &report);
    report
}

/// The report of a fragment that did not start because something it needs could
/// not be reached (`why`): nothing fed, nothing charged, its items back to pending.
pub fn unavailable_before_start(job: &FragmentJob, why: String) -> RunReport {
    let mut report = empty_report();
    report.yielded = true;
    report.end = job.span.end;
    report.unavailable = Some(why);
    report.outcome = FinishOutcome::Yielded;
    report
}

/// What accounting does with a fragment that ended as `report` says.
fn outcome(job: &FragmentJob, report: &RunReport) -> FinishOutcome {
    let fed_end = job.span.start + report.fed;
    if !report.culprits.is_empty() {
        return FinishOutcome::Failed {
            culprits: report.culprits.clone(),
            rest_failed: false,
            fed_end,
        };
    }
    if report.failure.is_some() {
        return FinishOutcome::Failed {
            culprits: IntervalSet::new(),
            rest_failed: true,
            fed_end,
        };
    }
    let complete = report.fed == report.end - job.span.start;
    if complete && report.acks == report.fed {
        FinishOutcome::Success
    } else if report.yielded {
        FinishOutcome::Yielded
    } else if report.acks == 0 && !job.per_item {
        // A task that never acks is all-or-nothing (it may read its range from
        // GRANULE_FIRST/GRANULE_COUNT, not stdin); the ledger decides, knowing
        // whether the stage's tasks ack.
        FinishOutcome::AllOrNothing { fed_end }
    } else {
        // It acked everything it read and left the rest unread: progress, not a failure.
        FinishOutcome::Yielded
    }
}

pub(crate) fn empty_report() -> RunReport {
    RunReport {
        failure: None,
        yielded: false,
        fed: 0,
        end: 0,
        acks: 0,
        bad_acks: 0,
        acks_in_batches: false,
        culprits: IntervalSet::new(),
        duration_ms: 0.0,
        first_ack_ms: None,
        last_ack_ms: None,
        cpu_ms: 0.0,
        peak_rss_kb: 0,
        io_bytes: 0,
        stdout_tail: Vec::new(),
        stderr_tail: Vec::new(),
        outcome: FinishOutcome::Yielded,
        fed_bytes: 0,
        unavailable: None,
        notes: Vec::new(),
    }
}

/// How a supervised child ended.
pub(crate) struct Supervision {
    pub(crate) exit: Exit,
    pub(crate) killed_by_us: bool,
    pub(crate) timed_out: bool,
}

/// Waits for one child while enforcing yield grace, kill requests and the limit.
/// When it exits, whatever is left of its process group is killed before it is
/// reaped: a grandchild holding its pipes cannot hold the fragment, or outlive it.
pub(crate) fn supervise(
    job: &FragmentJob,
    control: &Control,
    waiter: &Waiter,
    start: Instant,
) -> Supervision {
    let mut yield_at: Option<Instant> = None;
    let (mut termed, mut killed, mut timed_out) = (false, false, false);
    loop {
        if waiter.exited(TICK) {
            waiter.signal_group(libc::SIGKILL);
            return Supervision {
                exit: waiter.reap(),
                killed_by_us: killed || termed,
                timed_out,
            };
        }
        let now = Instant::now();
        let (kill, yielding) = {
            let mut st = control.lock();
            trim_to_life(job, &mut st, now);
            end_at_target(job, &mut st, now, start);
            if !st.yield_requested && deadline_passes(job, &st, now, start) {
                st.yield_requested = true;
                st.stop_feeding = true;
                control.cond.notify_all();
            }
            (st.kill_requested, st.yield_requested)
        };
        if yielding && yield_at.is_none() {
            yield_at = Some(now);
        }
        if let Some(limit) = job.limit {
            if now.duration_since(start) >= limit && !killed {
                timed_out = true;
                killed = true;
                waiter.signal_group(libc::SIGKILL);
            }
        }
        if kill && !killed {
            killed = true;
            waiter.signal_group(libc::SIGKILL);
        }
        if let Some(at) = yield_at {
            let waited = now.duration_since(at);
            if waited >= job.grace && !termed {
                termed = true;
                waiter.signal_group(libc::SIGTERM);
            }
            if waited >= job.grace * 2 && !killed {
                killed = true;
                waiter.signal_group(libc::SIGKILL);
            }
        }
    }
}

/// Elastic end of a fragment whose task acks, on a worker whose life ends: feeding
/// stops where the items fed are predicted to finish by `yield_by`, and the rest is
/// handed back when the fragment ends (as a split does). Without it, a fragment
/// claimed near the end of a life yielded as soon as its whole span no longer
/// fitted, and the worker paid a task start for each of a string of claims.
fn trim_to_life(job: &FragmentJob, st: &mut Shared, now: Instant) {
    let (Some(by), Some(true)) = (job.yield_by, job.expect_acks) else {
        return;
    };
    if st.acks == 0 || job.item_cost_ms <= 0.0 || st.stop_feeding {
        return; // no pace to predict from yet
    }
    let left_ms = by.saturating_duration_since(now).as_secs_f64() * 1e3;
    let fits = (left_ms / job.item_cost_ms) as u64;
    let end = (job.span.start + st.acks + fits).max(job.span.start + st.fed);
    if end < st.feed_end {
        st.feed_end = end;
    }
}

/// Work a slow item's feed window holds, ms: what a split or a yield waits for
/// once feeding stops (64 items of 20 ms held 1.3 s of a fragment out of reach).
const WINDOW_WORK_MS: f64 = 100.0;

/// Items in flight beyond the last ack: about 20 ms of work at `item_cost_ms`, so
/// that reading acks in batches never starves a fast task, and `max` items where
/// that is at most [`WINDOW_WORK_MS`] of work, else that much work (at least 2).
/// A fed item can no longer be split off or handed back at a yield. A task that
/// acks in batches larger than this is given `max` once it stalls
/// ([`window_stalled`]).
pub fn feed_window(max: u64, item_cost_ms: f64) -> u64 {
    if item_cost_ms <= 0.0 {
        return max;
    }
    let by_time = (20.0 / item_cost_ms) as u64;
    let floor = max
        .min((WINDOW_WORK_MS / item_cost_ms).ceil() as u64)
        .max(2);
    by_time.clamp(floor, 1 << 20)
}

/// The fragment's feed window now: `job.window`, or where the claim knew no
/// per-item cost (a first elastic fragment), 20 ms of work at the pace its acks
/// show (a 64-item window of 0.1 ms items woke the feeder and the ack reader
/// every few ms, CPU taken from the tasks on a busy machine); `job.window_max`
/// once the task stalled holding it.
pub(crate) fn window_now(job: &FragmentJob, st: &Shared) -> u64 {
    let base = match (job.item_cost_ms > 0.0, live_pace_ms(st)) {
        (false, Some(pace)) => feed_window(job.window_max.max(job.window), pace),
        _ => job.window,
    };
    if st.window_grown {
        base.max(job.window_max)
    } else {
        base
    }
}

/// Whether a task holding a full window has stalled: it has read every byte it
/// was fed (`unread` is 0) and acked nothing for `since`, four times the window's
/// predicted work and at least 250 ms. Such a task waits for more input before it
/// acks (it acks in batches), and would wait for ever. A task still starting up
/// has not read its input, so it never counts as stalled.
pub(crate) fn window_stalled(
    job: &FragmentJob,
    st: &Shared,
    unread: usize,
    since: Duration,
) -> bool {
    let window = window_now(job, st);
    if st.window_grown || unread > 0 || window >= job.window_max {
        return false;
    }
    let cost = if job.item_cost_ms > 0.0 {
        job.item_cost_ms
    } else {
        live_pace_ms(st).unwrap_or(0.0)
    };
    let work_ms = window as f64 * cost;
    since >= Duration::from_secs_f64((4.0 * work_ms).max(250.0) / 1e3)
}

/// The per-item pace the fragment's acks show so far, ms (`None` before two).
fn live_pace_ms(st: &Shared) -> Option<f64> {
    match (st.first_ack, st.last_ack) {
        (Some(first), Some(last)) if st.acks >= 2 => {
            Some(last.duration_since(first).as_secs_f64() * 1e3 / (st.acks - 1) as f64)
        }
        _ => None,
    }
}

/// Elastic end at the fragment's target (`feed_for`): once the items fed so far
/// would, at the pace the acks show, take it to the target, feeding stops there and
/// the unfed rest is handed back when the fragment ends. Decided at that moment,
/// not ahead, so a slow first item (a warm-up) does not cut a fragment short.
fn end_at_target(job: &FragmentJob, st: &mut Shared, now: Instant, start: Instant) {
    let (Some(feed_for), Some(true)) = (job.feed_for, job.expect_acks) else {
        return;
    };
    if st.stop_feeding || st.acks == 0 {
        return;
    }
    let pace_ms = live_pace_ms(st).unwrap_or(job.item_cost_ms);
    let unacked = st.fed.saturating_sub(st.acks);
    let drains_by = now + Duration::from_secs_f64(unacked as f64 * pace_ms.max(0.0) / 1e3);
    if drains_by >= start + feed_for {
        st.feed_end = st.feed_end.min(job.span.start + st.fed.max(1));
    }
}

/// Whether the fragment must yield now: its soft deadline (`deadline_share` of the
/// limit, or `yield_by` from the worker's lifespan) has come, or the unacked items
/// are predicted to run past it.
fn deadline_passes(job: &FragmentJob, st: &Shared, now: Instant, start: Instant) -> bool {
    // The lifespan's deadline is firm: past it the worker is gone anyway. The
    // limit's share is only a forecast; the limit itself is enforced by a kill.
    if job.yield_by.is_some_and(|by| now >= by) {
        return true;
    }
    let by_limit = job.limit.map(|l| start + l.mul_f64(job.deadline_share));
    let soft = match (by_limit, job.yield_by) {
        (Some(a), Some(b)) => a.min(b),
        (a, b) => match a.or(b) {
            Some(d) => d,
            None => return false,
        },
    };
    if st.acks == 0 {
        return false; // no pace to predict from yet
    }
    let unacked = (st.feed_end - job.span.start).saturating_sub(st.acks);
    now + Duration::from_secs_f64(unacked as f64 * job.item_cost_ms / 1e3) > soft
}

/// The failure a supervised exit stands for, if any.
pub(crate) fn classify(s: &Supervision, limit: Option<Duration>) -> Option<Failure> {
    if s.timed_out {
        return Some(Failure::Timeout(limit.map_or(0, |l| l.as_millis() as u64)));
    }
    match (s.exit.code, s.exit.signal) {
        (Some(0), _) => None,
        (Some(code), _) => Some(Failure::Exit(code)),
        (_, Some(sig)) => Some(Failure::Signal(sig)),
        _ => Some(Failure::Exit(-1)),
    }
}

#[cfg(test)]
mod window_tests {
    use super::feed_window;

    #[test]
    fn the_window_holds_about_20ms_and_never_seconds_of_work() {
        assert_eq!(feed_window(64, 0.1), 200, "fast items: 20 ms of them");
        assert_eq!(feed_window(64, 1.0), 64, "the most, 64 ms of work");
        assert_eq!(feed_window(64, 20.0), 5, "100 ms of 20 ms items");
        assert_eq!(
            feed_window(64, 150.0),
            2,
            "slow items: two, not 10 s of them"
        );
        assert_eq!(feed_window(64, 0.0), 64, "unknown cost: the most");
    }
}

//! The fragment runner: one child (batch) or one child per item, supervised.

use crate::blob::Blob;
use crate::items::ItemSource;
use crate::sys::{self, Exit, Waiter};
use granule_core::{FinishOutcome, FragmentId, IntervalSet, Span};
use std::collections::{HashMap, VecDeque};
use std::fs::File;
use std::io::{BufWriter, Read, Write};
use std::os::fd::AsRawFd;
use std::os::unix::process::CommandExt;
use std::process::{ChildStdin, Command, Stdio};
use std::sync::{mpsc, Arc, Condvar, Mutex, MutexGuard};
use std::thread;
use std::time::{Duration, Instant};

/// Unacked items a source without computable indices may have in flight before
/// the first ack; past it the fragment is treated as all-or-nothing.
const UNTRACKED_AFTER: usize = 65_536;
/// How often the supervisor wakes to check yields, kills and deadlines.
const TICK: Duration = Duration::from_millis(20);
/// Pause after a short read of fd 3, so acks are read in batches.
const ACK_BATCH: Duration = Duration::from_millis(1);

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
    /// Time between closing stdin and SIGTERM, and between SIGTERM and SIGKILL.
    pub grace: Duration,
    /// Items fed beyond the last ack, once the task has acked.
    pub window: u64,
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
}

/// A checkpoint handed over on fd 3, already read and sealed.
#[derive(Debug)]
pub struct Checkpoint {
    /// The sealed state, or why it could not be read.
    pub blob: Result<Blob, String>,
    /// Acks received before it.
    pub acks: u64,
    /// When it arrived, ms after the start.
    pub at_ms: f64,
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
    /// It exited 0, acking nothing, before it was given all its items.
    Early(u64),
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
            Failure::Early(_) => "early-exit",
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
            Failure::Early(n) => write!(
                f,
                "exited 0 without acking anything while {n} of its items were still unread"
            ),
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
}

#[derive(Default)]
struct Shared {
    fed: u64,
    fed_bytes: u64,
    feed_end: u64,
    stop_feeding: bool,
    feeder_waiting: bool,
    yield_requested: bool,
    kill_requested: bool,
    acks: u64,
    acked: IntervalSet,
    unflushed: IntervalSet,
    bad_acks: u64,
    first_ack: Option<Instant>,
    last_ack: Option<Instant>,
    inflight: HashMap<String, VecDeque<u64>>,
    inflight_len: usize,
    untracked: bool,
    checkpoints: Vec<Checkpoint>,
}

/// The handle shared by the runner and whoever supervises it: progress out,
/// yield/kill/split requests in.
pub struct Control {
    span: Span,
    state: Mutex<Shared>,
    cond: Condvar,
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

    fn lock(&self) -> MutexGuard<'_, Shared> {
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

    /// Takes the acks and checkpoints received since the last call.
    pub fn take_unflushed(&self) -> (IntervalSet, Vec<Checkpoint>) {
        let mut st = self.lock();
        (
            std::mem::take(&mut st.unflushed),
            std::mem::take(&mut st.checkpoints),
        )
    }

    /// Records one ack of item `index`; false if it was not fed or already acked.
    fn ack(st: &mut Shared, index: u64, now: Instant) -> bool {
        if st.acked.contains(index) {
            return false;
        }
        st.acked.insert_one(index);
        st.unflushed.insert_one(index);
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
        run_per_item(job, control, start)
    } else {
        run_batch(job, control, start)
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
    report.outcome = outcome(job, &report);
    report
}

fn outcome(job: &FragmentJob, report: &RunReport) -> FinishOutcome {
    if !report.culprits.is_empty() {
        return FinishOutcome::Failed {
            culprits: report.culprits.clone(),
            rest_failed: false,
        };
    }
    let complete = report.fed == report.end - job.span.start;
    match &report.failure {
        Some(_) => FinishOutcome::Failed {
            culprits: IntervalSet::new(),
            rest_failed: true,
        },
        None if complete && report.acks == report.fed => FinishOutcome::Success,
        None if report.yielded => FinishOutcome::Yielded,
        // A task that never acks is all-or-nothing: exit 0 means its whole range
        // (it may have read it from GRANULE_FIRST/GRANULE_COUNT, not stdin).
        None if report.acks == 0 && !job.per_item => FinishOutcome::Success,
        None => FinishOutcome::Yielded,
    }
}

fn empty_report() -> RunReport {
    RunReport {
        failure: None,
        yielded: false,
        fed: 0,
        end: 0,
        acks: 0,
        bad_acks: 0,
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
    }
}

/// Keeps the last `cap` bytes read from a pipe, on its own thread.
fn tail_reader(pipe: impl Read + Send + 'static, cap: usize) -> mpsc::Receiver<Vec<u8>> {
    let (tx, rx) = mpsc::channel();
    thread::spawn(move || {
        let mut pipe = pipe;
        let mut kept: Vec<u8> = Vec::new();
        let mut buf = [0u8; 8192];
        while let Ok(n) = pipe.read(&mut buf) {
            if n == 0 {
                break;
            }
            kept.extend_from_slice(&buf[..n]);
            if kept.len() > 2 * cap.max(1) {
                kept.drain(..kept.len() - cap);
            }
        }
        if kept.len() > cap {
            kept.drain(..kept.len() - cap);
        }
        let _ = tx.send(kept);
    });
    rx
}

/// Waits for a helper thread's result, but not forever: a grandchild may hold a
/// pipe open after the command itself exited.
fn collect<T: Default>(rx: mpsc::Receiver<T>) -> T {
    rx.recv_timeout(Duration::from_secs(2)).unwrap_or_default()
}

struct Supervision {
    exit: Exit,
    killed_by_us: bool,
    timed_out: bool,
}

/// Waits for one child while enforcing yield grace, kill requests and the limit.
fn supervise(job: &FragmentJob, control: &Control, waiter: &Waiter, start: Instant) -> Supervision {
    let mut yield_at: Option<Instant> = None;
    let (mut termed, mut killed, mut timed_out) = (false, false, false);
    loop {
        if let Some(exit) = waiter.wait(TICK) {
            return Supervision {
                exit,
                killed_by_us: killed || termed,
                timed_out,
            };
        }
        let now = Instant::now();
        let (kill, yielding) = {
            let mut st = control.lock();
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

fn classify(s: &Supervision, limit: Option<Duration>) -> Option<Failure> {
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

fn run_batch(job: &FragmentJob, control: &Arc<Control>, start: Instant) -> RunReport {
    let mut report = empty_report();
    let (ack_read, ack_write) = match sys::pipe() {
        Ok(p) => p,
        Err(e) => {
            report.failure = Some(Failure::Spawn(format!("pipe for fd 3: {e}")));
            return report;
        }
    };
    let mut cmd = Command::new(&job.argv[0]);
    cmd.args(&job.argv[1..])
        .envs(job.env.iter().map(|(k, v)| (k, v)))
        .env("GRANULE_ACK_FD", "3")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .process_group(0);
    let fd3 = ack_write.as_raw_fd();
    // SAFETY: child_setup only makes async-signal-safe calls.
    unsafe { cmd.pre_exec(move || sys::child_setup(fd3)) };
    let mut child = match cmd.spawn() {
        Ok(c) => c,
        Err(e) => {
            report.failure = Some(Failure::Spawn(format!("{}: {e}", job.argv[0])));
            return report;
        }
    };
    drop(ack_write);
    let waiter = Waiter::new(child.id());
    let stdout = tail_reader(
        child.stdout.take().expect("piped stdout"),
        job.log_tail_bytes,
    );
    let stderr = tail_reader(
        child.stderr.take().expect("piped stderr"),
        job.log_tail_bytes,
    );
    let feeder = {
        let (job, control, stdin) = (
            job.clone(),
            control.clone(),
            child.stdin.take().expect("piped stdin"),
        );
        let (tx, rx) = mpsc::channel();
        thread::spawn(move || {
            feed(&job, &control, stdin);
            let _ = tx.send(());
        });
        rx
    };
    let acker = {
        let (job, control) = (job.clone(), control.clone());
        let (tx, rx) = mpsc::channel();
        thread::spawn(move || {
            read_acks(&job, &control, File::from(ack_read), start);
            let _ = tx.send(());
        });
        rx
    };
    let sup = supervise(job, control, &waiter, start);
    control.request_stop_feeding();
    // A grandchild that inherited stdin and reads nothing could block the feeder in
    // a write forever: `collect` gives it a moment, then leaves it behind.
    collect(feeder);
    collect(acker);
    report.stdout_tail = collect(stdout);
    report.stderr_tail = collect(stderr);
    report.cpu_ms = sup.exit.cpu_ms;
    report.peak_rss_kb = sup.exit.max_rss_kb;
    report.io_bytes = sup.exit.io_bytes;
    let st = control.lock();
    report.yielded = st.yield_requested;
    report.failure = classify(&sup, job.limit);
    if sup.killed_by_us && !sup.timed_out {
        // Ended by our own SIGTERM/SIGKILL on request: a yield, not a failure.
        report.failure = None;
        report.yielded = true;
    }
    if report.failure.is_none() && !report.yielded && st.acks > 0 && st.acks < st.fed {
        report.failure = Some(Failure::Unacked(st.fed - st.acks));
    }
    // In a stage known to ack, exit 0 with no ack and input left unfed is no
    // progress at all: calling it a yield would hand the same items out forever.
    // (Elsewhere it is all-or-nothing: a task may read its range from the
    // environment and never touch stdin.)
    let unfed = (st.feed_end - job.span.start).saturating_sub(st.fed);
    let acking = job.expect_acks == Some(true);
    if report.failure.is_none() && !report.yielded && acking && st.acks == 0 && unfed > 0 {
        report.failure = Some(Failure::Early(unfed));
    }
    drop(st);
    report
}

impl Control {
    fn request_stop_feeding(&self) {
        let mut st = self.lock();
        st.stop_feeding = true;
        self.cond.notify_all();
    }
}

/// Writes item values to the child's stdin: freely until the first ack, then
/// at most `window` beyond the last ack. Stops at `feed_end` or a yield.
fn feed(job: &FragmentJob, control: &Control, stdin: ChildStdin) {
    let Ok(values) = job.source.iter(job.span) else {
        return;
    };
    let direct = job.source.direct_index("", job.span).is_some();
    let mut out = BufWriter::with_capacity(1 << 16, stdin);
    let fed_since = Instant::now();
    for (offset, value) in values.enumerate() {
        let index = job.span.start + offset as u64;
        {
            let mut st = control.lock();
            loop {
                if st.stop_feeding || index >= st.feed_end {
                    drop(st);
                    let _ = out.flush();
                    return;
                }
                let windowed = st.acks > 0
                    || (job.expect_acks != Some(false)
                        && fed_since.elapsed() < job.first_ack_patience);
                if !windowed || st.fed - st.acks.min(st.fed) < job.window {
                    break;
                }
                // Window full: make sure the child has what we wrote, then wait.
                drop(st);
                if out.flush().is_err() {
                    return;
                }
                st = control.lock();
                if st.fed - st.acks.min(st.fed) >= job.window && !st.stop_feeding {
                    st.feeder_waiting = true;
                    st = control
                        .cond
                        .wait_timeout(st, Duration::from_millis(50))
                        .map_or_else(|e| e.into_inner().0, |r| r.0);
                    st.feeder_waiting = false;
                }
            }
            if !direct && !st.untracked {
                st.inflight
                    .entry(value.clone())
                    .or_default()
                    .push_back(index);
                st.inflight_len += 1;
                if st.acks == 0 && st.inflight_len > UNTRACKED_AFTER {
                    st.untracked = true;
                    st.inflight = HashMap::new();
                }
            }
            st.fed += 1;
            st.fed_bytes += value.len() as u64 + 1;
        }
        if out
            .write_all(value.as_bytes())
            .and_then(|_| out.write_all(b"\n"))
            .is_err()
        {
            return;
        }
        let st = control.lock();
        let window_full = (st.acks > 0 || job.expect_acks != Some(false))
            && st.fed - st.acks.min(st.fed) >= job.window;
        drop(st);
        if window_full && out.flush().is_err() {
            return;
        }
    }
    let _ = out.flush();
}

/// Reads fd 3: ack lines (an item's value) and `checkpoint PATH` lines.
///
/// Reads in batches: after a short read it waits `ACK_BATCH` so that the next
/// read returns many acks at once. One wake-up per ack would cost the spinning
/// tasks a context switch each on a busy machine.
fn read_acks(job: &FragmentJob, control: &Control, mut pipe: File, start: Instant) {
    let mut buf = vec![0u8; 1 << 16];
    let mut filled = 0;
    loop {
        if filled == buf.len() {
            buf.resize(buf.len() * 2, 0);
        }
        let n = match pipe.read(&mut buf[filled..]) {
            Ok(0) | Err(_) => break,
            Ok(n) => n,
        };
        filled += n;
        let complete = buf[..filled]
            .iter()
            .rposition(|&b| b == b'\n')
            .map_or(0, |i| i + 1);
        handle_ack_lines(job, control, &buf[..complete], start);
        buf.copy_within(complete..filled, 0);
        filled -= complete;
        if n < 4096 {
            thread::sleep(ACK_BATCH);
        }
    }
    if filled > 0 {
        handle_ack_lines(job, control, &buf[..filled], start);
    }
}

/// Applies one batch of fd-3 lines. Checkpoint files are read first, then the
/// batch's acks and checkpoints are published under one lock: a task that writes
/// acks and the checkpoint covering them in one write is flushed all-or-nothing.
fn handle_ack_lines(job: &FragmentJob, control: &Control, lines: &[u8], start: Instant) {
    let now = Instant::now();
    let at_ms = now.duration_since(start).as_secs_f64() * 1e3;
    let lines: Vec<String> = lines
        .split(|&b| b == b'\n')
        .map(|l| l.strip_suffix(b"\r").unwrap_or(l))
        .filter(|l| !l.is_empty())
        .map(|l| String::from_utf8_lossy(l).into_owned())
        .collect();
    let mut sealed: VecDeque<Result<Blob, String>> = lines
        .iter()
        .filter_map(|l| l.strip_prefix("checkpoint "))
        .map(|path| {
            std::fs::read(path)
                .map(|raw| Blob::seal(&raw, job.checkpoint_level))
                .map_err(|e| format!("checkpoint {path}: {e}"))
        })
        .collect();
    let mut st = control.lock();
    for line in &lines {
        if line.starts_with("checkpoint ") {
            let blob = sealed
                .pop_front()
                .expect("one sealed blob per checkpoint line");
            let acks = st.acks;
            st.checkpoints.push(Checkpoint { blob, acks, at_ms });
            continue;
        }
        let fed_end = job.span.start + st.fed;
        let index = match job.source.direct_index(line, job.span) {
            Some(found) => found.filter(|&i| i < fed_end),
            None => st
                .inflight
                .get_mut(line.as_str())
                .and_then(|q| q.pop_front()),
        };
        if !index.is_some_and(|i| Control::ack(&mut st, i, now)) {
            st.bad_acks += 1;
        }
    }
    if st.feeder_waiting && st.fed - st.acks.min(st.fed) <= job.window / 2 {
        control.cond.notify_all();
    }
}

/// Per-item mode: one process per item, `{}` replaced by the value.
fn run_per_item(job: &FragmentJob, control: &Arc<Control>, start: Instant) -> RunReport {
    let mut report = empty_report();
    let pipes = sys::pipe().and_then(|out| sys::pipe().map(|err| (out, err)));
    let Ok(((out_read, out_write), (err_read, err_write))) = pipes else {
        report.failure = Some(Failure::Spawn("pipes for output".into()));
        return report;
    };
    let stdout = tail_reader(File::from(out_read), job.log_tail_bytes);
    let stderr = tail_reader(File::from(err_read), job.log_tail_bytes);
    let has_slot = job.argv[1..].iter().any(|a| a.contains("{}"));
    let values = match job.source.iter(job.span) {
        Ok(v) => v,
        Err(e) => {
            report.failure = Some(Failure::Spawn(format!("items: {e}")));
            return report;
        }
    };
    for (offset, value) in values.enumerate() {
        let index = job.span.start + offset as u64;
        {
            let mut st = control.lock();
            if st.stop_feeding || index >= st.feed_end {
                report.yielded = true;
                break;
            }
            st.fed += 1;
            st.fed_bytes += value.len() as u64 + 1;
        }
        let mut cmd = Command::new(&job.argv[0]);
        for arg in &job.argv[1..] {
            cmd.arg(arg.replace("{}", &value));
        }
        if !has_slot {
            cmd.arg(&value);
        }
        let (Ok(out), Ok(err)) = (out_write.try_clone(), err_write.try_clone()) else {
            break;
        };
        cmd.envs(job.env.iter().map(|(k, v)| (k, v)))
            .env("GRANULE_INDEX", index.to_string())
            .stdin(Stdio::null())
            .stdout(out)
            .stderr(err)
            .process_group(0);
        let child = match cmd.spawn() {
            Ok(c) => c,
            Err(e) => {
                report.failure = Some(Failure::Spawn(format!("{}: {e}", job.argv[0])));
                report.culprits.insert_one(index);
                break;
            }
        };
        let waiter = Waiter::new(child.id());
        let sup = supervise(job, control, &waiter, start);
        report.cpu_ms += sup.exit.cpu_ms;
        report.peak_rss_kb = report.peak_rss_kb.max(sup.exit.max_rss_kb);
        report.io_bytes += sup.exit.io_bytes;
        match classify(&sup, job.limit) {
            None => {
                Control::ack(&mut control.lock(), index, Instant::now());
            }
            Some(_) if sup.killed_by_us && !sup.timed_out => {
                // Killed on request: a yield, not the item's fault.
                report.yielded = true;
                break;
            }
            Some(failure) => {
                report.culprits.insert_one(index);
                let stop = sup.timed_out;
                report.failure = Some(failure);
                if stop {
                    break;
                }
            }
        }
    }
    drop((out_write, err_write));
    report.stdout_tail = collect(stdout);
    report.stderr_tail = collect(stderr);
    if control.lock().yield_requested {
        report.yielded = true;
    }
    report
}

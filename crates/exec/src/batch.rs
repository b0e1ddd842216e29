//! Batch mode: one child per fragment, items on stdin, acks and commands on fd 3.
//!
//! Three helper threads serve the child: the feeder writes values to stdin (lazily:
//! a window beyond the last ack), the fd-3 reader applies acks and takes
//! checkpoints, and two tail readers keep the end of stdout and stderr. When the
//! child exits, its process group is killed and the readers take what is in their
//! pipes and finish: the fragment is collected at once, and only after every fd-3
//! line the task wrote before exiting has been applied.

use crate::blob::Blob;
use crate::drain::{read_until_stop, tail_reader, Sink, Stop};
use crate::items::ItemsError;
use crate::protocol::{self, Line, Parser, PROTOCOL_VERSION};
use crate::run::{
    classify, empty_report, supervise, window_now, window_stalled, Checkpoint, Control, Failure,
    FragmentJob, RunReport, PRIVATE_ENV,
};
use crate::sys::{self, Ready, Waiter};
use granule_core::Output;
use std::ffi::OsStr;
use std::fs::File;
use std::io::{Read, Write};
use std::os::fd::{AsRawFd, OwnedFd, RawFd};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::OpenOptionsExt;
use std::os::unix::process::CommandExt;
use std::path::Path;
use std::process::{Command, Stdio};
use std::sync::{mpsc, Arc};
use std::thread;
use std::time::{Duration, Instant};

/// Unacked items a source without computable indices may have in flight before
/// the first ack; past it the fragment is treated as all-or-nothing. Never in a
/// stage known to ack: there every ack must find its item, however late it comes.
const UNTRACKED_AFTER: usize = 65_536;
/// Shortest pause after a short read of fd 3, so acks are read in batches.
const ACK_BATCH: Duration = Duration::from_millis(1);
/// Longest such pause: acks are read at least this often.
const ACK_BATCH_MAX: Duration = Duration::from_millis(20);
/// Longest fd-3 line taken when items are short (longer items raise it).
const MAX_LINE: usize = 1 << 20;
/// Bytes of stdin buffered before a write.
const FEED_BUFFER: usize = 1 << 16;
/// How long the fd-3 reader may still be busy (taking a checkpoint) after the task
/// exited before the fragment fails instead of waiting.
/// (A safety net for a read that hangs, such as a dead network filesystem: sealing a
/// large checkpoint at a high zstd level can take a minute.)
const FD3_GRACE: Duration = Duration::from_secs(600);

pub(crate) fn run(job: &FragmentJob, control: &Arc<Control>, start: Instant) -> RunReport {
    let mut report = empty_report();
    let pipes = sys::pipe().and_then(|fd3| Stop::new().map(|stop| (fd3, stop)));
    let ((ack_read, ack_write), mut stop) = match pipes {
        Ok(p) => p,
        Err(e) => {
            report.failure = Some(Failure::Spawn(format!("pipes: {e}")));
            return report;
        }
    };
    let tag = protocol::new_tag();
    let mut child = match spawn_task(job, &tag, &ack_write) {
        Ok(c) => c,
        Err(e) => {
            report.failure = Some(Failure::Spawn(format!("{}: {e}", job.argv[0])));
            return report;
        }
    };
    drop(ack_write);
    let waiter = Waiter::new(child.id());
    let helpers = start_helpers(job, control, &mut child, &stop, &tag, ack_read, start);
    let (stdout, stderr, feeder, acker) = match helpers {
        Ok(h) => h,
        Err(e) => {
            control.fault(Failure::Spawn(format!("pipes: {e}")));
            waiter.signal_group(libc::SIGKILL);
            let _ = supervise(job, control, &waiter, start);
            report.failure = Some(Failure::Spawn(format!("pipes: {e}")));
            return report;
        }
    };
    let sup = supervise(job, control, &waiter, start);
    control.request_stop_feeding();
    stop.stop();
    let _ = feeder.recv();
    report.stdout_tail = stdout.recv().unwrap_or_default();
    report.stderr_tail = stderr.recv().unwrap_or_default();
    match acker.recv_timeout(FD3_GRACE) {
        // A last line without a newline counts only from a task that exited 0: from
        // one that was killed it may be cut short (`12` of `123`).
        Ok(Some(mut parser)) if sup.exit.code == Some(0) => {
            let mut lines = Vec::new();
            let parsed = parser.finish(|line| lines.push(resolve(job, line)));
            apply(job, control, parsed, lines, start);
        }
        Ok(_) => {}
        Err(_) => control.fault(Failure::Checkpoint(format!(
            "fd 3 was still being read {}s after the task exited (a checkpoint that cannot be read?)",
            FD3_GRACE.as_secs()
        ))),
    }
    judge(&mut report, &sup, job, control);
    report
}

/// Starts the task: its argv, the job's environment and the protocol's, stdin,
/// stdout and stderr piped, fd 3 for acks, in a process group of its own.
fn spawn_task(
    job: &FragmentJob,
    tag: &str,
    ack_write: &OwnedFd,
) -> std::io::Result<std::process::Child> {
    let mut cmd = Command::new(job.program());
    job.in_cwd(&mut cmd)
        .args(&job.argv[1..])
        .envs(job.env.iter().map(|(k, v)| (k, v)))
        .env("GRANULE_ACK_FD", "3")
        .env("GRANULE_PROTOCOL", PROTOCOL_VERSION.to_string())
        .env("GRANULE_CMD", tag)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .process_group(0);
    for name in PRIVATE_ENV {
        cmd.env_remove(name);
    }
    let fd3 = ack_write.as_raw_fd();
    // SAFETY: child_setup only makes async-signal-safe calls.
    unsafe { cmd.pre_exec(move || sys::child_setup(fd3)) };
    cmd.spawn()
}

type Helpers = (
    mpsc::Receiver<Vec<u8>>,
    mpsc::Receiver<Vec<u8>>,
    mpsc::Receiver<()>,
    mpsc::Receiver<Option<Parser>>,
);

/// The threads that serve the child: tails of stdout and stderr, the feeder, and
/// the fd-3 reader.
fn start_helpers(
    job: &FragmentJob,
    control: &Arc<Control>,
    child: &mut std::process::Child,
    stop: &Stop,
    tag: &str,
    ack_read: OwnedFd,
    start: Instant,
) -> std::io::Result<Helpers> {
    let label = format!("fragment {}", job.fragment);
    let name = format!("fragment-{}", job.fragment);
    let stdout = tail_reader(
        child.stdout.take().expect("piped stdout").into(),
        stop.watch()?,
        job.log_tail_bytes,
        Sink::open(job.tee.as_ref(), &label, false, &format!("{name}.stdout")),
    );
    let stderr = tail_reader(
        child.stderr.take().expect("piped stderr").into(),
        stop.watch()?,
        job.log_tail_bytes,
        Sink::open(job.tee.as_ref(), &label, true, &format!("{name}.stderr")),
    );
    let stdin: OwnedFd = child.stdin.take().expect("piped stdin").into();
    sys::set_nonblocking(stdin.as_raw_fd())?;
    let feeder = spawn_helper({
        let (job, control, watch) = (job.clone(), control.clone(), stop.watch()?);
        move || feed(&job, &control, stdin, watch.as_raw_fd())
    });
    let acker = spawn_helper({
        let (job, control, watch) = (job.clone(), control.clone(), stop.watch()?);
        let tag = tag.to_string();
        move || read_fd3(&job, &control, &tag, File::from(ack_read), &watch, start)
    });
    Ok((stdout, stderr, feeder, acker))
}

/// The report's resources and verdict: the task's own failure, a fault a helper
/// found, a yield (stopped by us on request), or unacked items.
fn judge(
    report: &mut RunReport,
    sup: &crate::run::Supervision,
    job: &FragmentJob,
    control: &Control,
) {
    report.cpu_ms = sup.exit.cpu_ms;
    report.peak_rss_kb = sup.exit.max_rss_kb;
    report.io_bytes = sup.exit.io_bytes;
    let mut st = control.lock();
    report.yielded = st.yield_requested;
    report.failure = classify(sup, job.limit);
    if let Some(fault) = st.fault.take() {
        // Found by a helper (fd 3, the items): the kill was ours, the failure the task's.
        report.failure = Some(fault);
        report.yielded = false;
    } else if sup.killed_by_us && !sup.timed_out {
        // Ended by our own SIGTERM/SIGKILL on request: a yield, not a failure.
        report.failure = None;
        report.yielded = true;
    }
    if report.failure.is_none() && !report.yielded && st.acks > 0 && st.acks < st.fed {
        report.failure = Some(Failure::Unacked(st.fed - st.acks));
    }
}

fn spawn_helper<T: Send + 'static>(f: impl FnOnce() -> T + Send + 'static) -> mpsc::Receiver<T> {
    let (tx, rx) = mpsc::channel();
    thread::spawn(move || {
        let _ = tx.send(f());
    });
    rx
}

/// The child's stdin, written without blocking: a child (or a grandchild holding
/// its stdin) that stops reading cannot hold the feeder past the fragment's end.
struct Stdin {
    file: File,
    stop: RawFd,
    buf: Vec<u8>,
}

impl Stdin {
    fn push(&mut self, value: &[u8]) -> bool {
        self.buf.extend_from_slice(value);
        self.buf.push(b'\n');
        self.buf.len() < FEED_BUFFER || self.flush()
    }

    /// Writes what is buffered; false once stdin is closed or the fragment ended.
    fn flush(&mut self) -> bool {
        let mut written = 0;
        while written < self.buf.len() {
            match self.file.write(&self.buf[written..]) {
                Ok(n) => written += n,
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                    let fd = self.file.as_raw_fd();
                    if sys::wait_ready(fd, libc::POLLOUT, self.stop) == Ready::Stop {
                        return false;
                    }
                }
                Err(_) => return false,
            }
        }
        self.buf.clear();
        true
    }
}

/// Writes item values to the child's stdin: freely until the first ack, then
/// at most `window` beyond the last ack. Stops at `feed_end`, a yield, or the end
/// of the fragment. A value that cannot be read fails the fragment.
fn feed(job: &FragmentJob, control: &Control, stdin: OwnedFd, stop: RawFd) {
    let mut out = Stdin {
        file: File::from(stdin),
        stop,
        buf: Vec::with_capacity(FEED_BUFFER),
    };
    let mut values = match job.source.iter(job.span) {
        Ok(v) => v,
        Err(e) => return items_failed(control, &e),
    };
    let direct = job.source.direct_index(b"", job.span).is_some();
    let fed_since = Instant::now();
    let mut value = Vec::new();
    for index in job.span.start..job.span.end {
        if !wait_for_room(job, control, &mut out, index, fed_since) {
            return;
        }
        match values.next_value(&mut value) {
            Ok(true) => {}
            Ok(false) => break,
            Err(e) => {
                out.flush();
                return items_failed(control, &e);
            }
        }
        record_fed(job, control, direct, index, &value);
        if !out.push(&value) {
            return;
        }
        let st = control.lock();
        let window_full = (st.acks > 0 || job.expect_acks != Some(false))
            && st.fed - st.acks.min(st.fed) >= window_now(job, &st);
        drop(st);
        if window_full && !out.flush() {
            return;
        }
    }
    out.flush();
}

/// Waits until item `index` may be fed: freely until the first ack (or while the
/// task may be slow to start acking), then within `window` of the last ack. False
/// when feeding must stop (the fragment ends, yields, or stdin closed).
fn wait_for_room(
    job: &FragmentJob,
    control: &Control,
    out: &mut Stdin,
    index: u64,
    fed_since: Instant,
) -> bool {
    let mut st = control.lock();
    let mut full_since: Option<(Instant, u64)> = None;
    loop {
        if st.stop_feeding || index >= st.feed_end {
            drop(st);
            out.flush();
            return false;
        }
        let windowed = st.acks > 0
            || (job.expect_acks != Some(false) && fed_since.elapsed() < job.first_ack_patience);
        if !windowed || st.fed - st.acks.min(st.fed) < window_now(job, &st) {
            return true;
        }
        // Window full: make sure the child has what we wrote, then wait.
        drop(st);
        if !out.flush() {
            return false;
        }
        st = control.lock();
        if st.fed - st.acks.min(st.fed) >= window_now(job, &st) && !st.stop_feeding {
            // Full since when, with how many acks: an ack restarts the clock.
            let now = Instant::now();
            let since = match full_since {
                Some((at, acks)) if acks == st.acks => now.duration_since(at),
                _ => {
                    full_since = Some((now, st.acks));
                    Duration::ZERO
                }
            };
            if window_stalled(job, &st, sys::available(out.file.as_raw_fd()), since) {
                st.window_grown = true;
                continue;
            }
            st.feeder_waiting = true;
            st = control
                .cond
                .wait_timeout(st, Duration::from_millis(50))
                .map_or_else(|e| e.into_inner().0, |r| r.0);
            st.feeder_waiting = false;
        }
    }
}

/// Counts a value as fed, and remembers its index by value where acks name values
/// (up to a bound, past which a task that never acked is all-or-nothing).
fn record_fed(job: &FragmentJob, control: &Control, direct: bool, index: u64, value: &[u8]) {
    let mut st = control.lock();
    if !direct && !st.untracked {
        st.inflight
            .entry(value.to_vec())
            .or_default()
            .push_back(index);
        st.inflight_len += 1;
        if st.acks == 0 && st.inflight_len > UNTRACKED_AFTER && job.expect_acks != Some(true) {
            st.untracked = true;
            st.inflight = Default::default();
        }
    }
    st.fed += 1;
    st.fed_bytes += value.len() as u64 + 1;
    st.longest_fed = st.longest_fed.max(value.len());
}

fn items_failed(control: &Control, e: &ItemsError) {
    let mut st = control.lock();
    st.fault.get_or_insert(Failure::Items(e.to_string()));
    st.stop_feeding = true;
    control.cond.notify_all();
}

/// What one fd-3 line asks for, resolved as far as it can be without the lock.
enum Action {
    /// An ack of the item with this index (ranges compute it), or of no item.
    Index(Option<u64>),
    /// An ack by value, to match against the values in flight.
    Value(Vec<u8>),
    /// A checkpoint, read and sealed.
    Checkpoint(Blob),
    /// An output of the item acked next (a file already in the blob store).
    Output(Output),
}

/// Reads fd 3 until the task is done with it: acks and `checkpoint` commands.
/// Returns the parser, holding any last line without a newline, unless the stream
/// broke the protocol.
///
/// Reads in batches: after a short read it waits ([`ack_pause`]) so that the next
/// read returns several acks at once. A reader woken by every ack preempts the
/// task that wrote it, which then waits for a turn on a busy machine: 12 busy
/// loops on 2 cores made 5 ms items cost 10 ms each (6 ms with a paced reader).
fn read_fd3(
    job: &FragmentJob,
    control: &Control,
    tag: &str,
    mut pipe: File,
    stop: &OwnedFd,
    start: Instant,
) -> Option<Parser> {
    let mut parser = Parser::new(tag, MAX_LINE);
    let mut buf = vec![0u8; 1 << 16];
    let mut healthy = true;
    read_until_stop(&mut pipe, stop.as_raw_fd(), &mut buf, |bytes| {
        let longest = control.lock().longest_fed;
        parser.allow_lines_of(longest + tag.len() + 64);
        let mut lines = Vec::new();
        let parsed = parser.feed(bytes, |line| lines.push(resolve(job, line)));
        healthy = apply(job, control, parsed, lines, start);
        if healthy && bytes.len() < 4096 {
            let (acks, first_ack, window) = {
                let st = control.lock();
                (st.acks, st.first_ack, window_now(job, &st))
            };
            let now = Instant::now();
            thread::sleep(ack_pause(
                job.item_cost_ms,
                window,
                acks,
                first_ack.map(|t| now - t),
                now - start,
            ));
        }
        healthy
    });
    healthy.then_some(parser)
}

/// How long the fd-3 reader waits after a short read: a quarter of the feed
/// window's time, so a read finds a batch of acks and the feeder, topped up from
/// them, never lets the task run dry (reads every 4 items' time woke the reader
/// every millisecond for fast items, CPU taken from the tasks); at most an eighth of the time
/// since the start (early acks keep their timing: they teach the model); between
/// [`ACK_BATCH`] and [`ACK_BATCH_MAX`]. The item time is the prediction
/// (`item_cost_ms`, 0 if none), else the spacing of this fragment's `acks`.
fn ack_pause(
    item_cost_ms: f64,
    window: u64,
    acks: u64,
    since_first_ack: Option<Duration>,
    since_start: Duration,
) -> Duration {
    let per_item_ms = match since_first_ack {
        _ if item_cost_ms > 0.0 => item_cost_ms,
        Some(spell) if acks >= 2 => spell.as_secs_f64() * 1e3 / (acks - 1) as f64,
        _ => 0.0,
    };
    let ms = (window as f64 * per_item_ms / 4.0).min(since_start.as_secs_f64() * 1e3 / 8.0);
    Duration::from_secs_f64(ms.max(0.0) / 1e3).clamp(ACK_BATCH, ACK_BATCH_MAX)
}

/// One line as an [`Action`]: checkpoint files are read here, outside the lock.
fn resolve(job: &FragmentJob, line: Line<'_>) -> Result<Action, Failure> {
    Ok(match line {
        // A version-1 command goes through the values in flight (and fails there
        // unless it is one).
        Line::Ack(value) if value.starts_with(b"checkpoint ") => Action::Value(value.to_vec()),
        Line::Ack(value) => match job.source.direct_index(value, job.span) {
            Some(index) => Action::Index(index),
            None => Action::Value(value.to_vec()),
        },
        Line::Checkpoint(path) => Action::Checkpoint(
            take_checkpoint(Path::new(OsStr::from_bytes(path)), job)
                .map_err(Failure::Checkpoint)?,
        ),
        Line::Emit(value) => Action::Output(Output::Record(value.to_vec())),
        Line::Output(path) => Action::Output(take_output(Path::new(OsStr::from_bytes(path)), job)?),
    })
}

/// Stores an output file in the blob store (content-addressed: a rerun stores
/// nothing new); it is published when the item acked next commits.
fn take_output(path: &Path, job: &FragmentJob) -> Result<Output, Failure> {
    let Some(data) = &job.data else {
        return Err(Failure::Output(format!(
            "output {}: this worker has no blob store",
            path.display()
        )));
    };
    // A remote store out of reach for a moment is waited out (about 30 s in all)
    // before the fragment fails.
    let mut wait = Duration::from_secs(1);
    let stored = loop {
        match data.put_file(path, &job.scratch) {
            Err(crate::DataError::Remote { .. }) if wait <= Duration::from_secs(16) => {
                thread::sleep(wait);
                wait *= 2;
            }
            done => break done,
        }
    }
    .map_err(|e| Failure::Output(format!("output {}: {e}", path.display())))?;
    Ok(Output::File {
        key: stored.key,
        name: path
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_else(|| "file".into()),
        bytes: stored.bytes,
    })
}

/// Applies one batch of fd-3 lines under one lock: a task that writes acks and the
/// checkpoint covering them in one write is flushed all-or-nothing. A batch with a
/// broken line or a checkpoint that could not be taken counts none of its acks and
/// fails the fragment; returns false then.
fn apply(
    job: &FragmentJob,
    control: &Control,
    parsed: Result<(), protocol::ProtocolError>,
    lines: Vec<Result<Action, Failure>>,
    start: Instant,
) -> bool {
    let failure = match parsed {
        Err(e) => Some(Failure::Protocol(e.to_string())),
        Ok(()) => lines.iter().find_map(|l| l.as_ref().err().cloned()),
    };
    if let Some(failure) = failure {
        control.fault(failure);
        return false;
    }
    let now = Instant::now();
    let at_ms = now.duration_since(start).as_secs_f64() * 1e3;
    let mut st = control.lock();
    // Outputs and checkpoints never mix (checked before either is taken: a
    // stateful stage's acks can be undone, and a published output cannot).
    let emits = st.emitted || lines.iter().any(|l| matches!(l, Ok(Action::Output(_))));
    let keeps = st.checkpointed || lines.iter().any(|l| matches!(l, Ok(Action::Checkpoint(_))));
    if emits && keeps {
        drop(st);
        control.fault(Failure::Output(
            "it wrote outputs and checkpoints: a stage's tasks do one or the other (a stage can take another's results with items = { results_of = \"...\" })".into(),
        ));
        return false;
    }
    let fed_end = job.span.start + st.fed;
    let acks_before = st.acks;
    let mut version_one = None;
    for action in lines.into_iter().flatten() {
        let index = match action {
            Action::Output(output) => {
                st.emitted = true;
                st.pending_outputs.push(output);
                continue;
            }
            Action::Checkpoint(blob) => {
                st.checkpointed = true;
                let (acks, acked) = (st.acks, st.acked.clone());
                st.checkpoints.push(Checkpoint {
                    blob,
                    acks,
                    acked,
                    at_ms,
                });
                continue;
            }
            Action::Index(index) => index.filter(|&i| i < fed_end),
            Action::Value(value) => {
                let found = st.inflight.get_mut(&value).and_then(|q| q.pop_front());
                if found.is_none() && value.starts_with(b"checkpoint ") {
                    version_one = Some(value);
                }
                found
            }
        };
        if !index.is_some_and(|i| Control::ack(&mut st, i, now)) {
            st.bad_acks += 1;
            // Outputs belong to the item acked next: not to whichever comes after
            // an ack that named none.
            st.pending_outputs.clear();
        }
    }
    st.most_acks_at_once = st.most_acks_at_once.max(st.acks - acks_before);
    if st.feeder_waiting && st.fed - st.acks.min(st.fed) <= window_now(job, &st) / 2 {
        control.cond.notify_all();
    }
    drop(st);
    if let Some(line) = version_one {
        control.fault(Failure::Protocol(format!(
            "fd 3: {:?} is no item's value; since protocol {PROTOCOL_VERSION} a checkpoint is written as \"$GRANULE_CMD checkpoint PATH\"",
            String::from_utf8_lossy(&line)
        )));
        return false;
    }
    true
}

/// Reads and seals a checkpoint file: a regular file no larger than the stage's
/// limit (a FIFO, a device or `/dev/zero` is refused, never read).
fn take_checkpoint(path: &Path, job: &FragmentJob) -> Result<Blob, String> {
    let shown = path.display();
    let file = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NONBLOCK)
        .open(path)
        .map_err(|e| format!("checkpoint {shown}: {e}"))?;
    let meta = file
        .metadata()
        .map_err(|e| format!("checkpoint {shown}: {e}"))?;
    if !meta.is_file() {
        return Err(format!("checkpoint {shown} is not a regular file"));
    }
    let limit = job.max_checkpoint_bytes;
    let too_large = |len: u64| {
        format!(
            "checkpoint {shown} is {len} bytes, over the stage's max_checkpoint of {limit} bytes"
        )
    };
    if meta.len() > limit {
        return Err(too_large(meta.len()));
    }
    let mut raw = Vec::with_capacity(meta.len() as usize);
    file.take(limit + 1)
        .read_to_end(&mut raw)
        .map_err(|e| format!("checkpoint {shown}: {e}"))?;
    if raw.len() as u64 > limit {
        return Err(too_large(raw.len() as u64));
    }
    Ok(Blob::seal(&raw, job.checkpoint_level))
}

#[cfg(test)]
mod tests {
    use super::*;

    const MS: Duration = Duration::from_millis(1);

    #[test]
    fn acks_of_slow_items_are_read_in_batches_of_several() {
        // 5 ms items, 64 fed ahead, 2 s into the fragment: a read every 20 ms
        // (four items), not one wake-up per ack.
        assert_eq!(ack_pause(5.0, 64, 100, Some(1000 * MS), 2000 * MS), 20 * MS);
        // The same learned from the ack spacing alone (no prediction yet).
        assert_eq!(ack_pause(0.0, 64, 101, Some(500 * MS), 2000 * MS), 20 * MS);
    }

    #[test]
    fn the_pause_leaves_the_feeder_time_and_early_acks_their_timing() {
        // 1 ms items with 16 fed ahead: the window holds 16 ms, read every 4 ms.
        assert_eq!(ack_pause(1.0, 16, 100, Some(1000 * MS), 2000 * MS), 4 * MS);
        // 40 ms into a fragment of 5 ms items: at most 5 ms.
        assert_eq!(ack_pause(5.0, 64, 3, Some(10 * MS), 40 * MS), 5 * MS);
        // Fast items: a quarter of the window's 20 ms, not a wake-up per millisecond.
        assert_eq!(ack_pause(0.04, 500, 100, Some(4 * MS), 2000 * MS), 5 * MS);
        // Nothing known yet: the shortest pause.
        assert_eq!(ack_pause(0.0, 64, 1, Some(MS), 2000 * MS), ACK_BATCH);
    }
}

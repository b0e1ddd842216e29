//! Per-item mode: one process per item, `{}` in the argv replaced by the value
//! (as bytes, inside one argv element: never through a shell). Exit 0 acks the
//! item; a failing item is a culprit and the fragment goes on with the next.

use crate::drain::{tail_reader, tee_reader, Sink, Stop};
use crate::run::PRIVATE_ENV;
use crate::run::{classify, empty_report, supervise, Control, Failure, FragmentJob, RunReport};
use crate::sys::{self, Waiter};
use granule_core::Output;
use std::ffi::{OsStr, OsString};
use std::io::Read;
use std::os::fd::OwnedFd;
use std::os::unix::ffi::{OsStrExt, OsStringExt};
use std::os::unix::process::CommandExt;
use std::process::{Command, Stdio};
use std::sync::{mpsc, Arc};
use std::time::Instant;

pub(crate) fn run(job: &FragmentJob, control: &Arc<Control>, start: Instant) -> RunReport {
    let mut report = empty_report();
    let pipes = (|| -> std::io::Result<_> {
        let stop = Stop::new()?;
        let (out_read, out_write) = sys::pipe()?;
        let (err_read, err_write) = sys::pipe()?;
        let stdout = tail_reader(out_read, stop.watch()?, job.log_tail_bytes, None);
        let stderr = tail_reader(err_read, stop.watch()?, job.log_tail_bytes, None);
        Ok((stop, out_write, err_write, stdout, stderr))
    })();
    let Ok((mut stop, out_write, err_write, stdout, stderr)) = pipes else {
        report.failure = Some(Failure::Spawn("pipes for output".into()));
        return report;
    };
    let has_slot = job.argv[1..].iter().any(|a| a.contains("{}"));
    let mut values = match job.source.iter(job.span) {
        Ok(v) => v,
        Err(e) => {
            report.failure = Some(Failure::Items(e.to_string()));
            stop.stop();
            return report;
        }
    };
    let mut value = Vec::new();
    for index in job.span.start..job.span.end {
        {
            let st = control.lock();
            if st.stop_feeding || index >= st.feed_end {
                report.yielded = true;
                break;
            }
        }
        match values.next_value(&mut value) {
            Ok(true) => {}
            Ok(false) => break,
            Err(e) => {
                report.failure = Some(Failure::Items(e.to_string()));
                break;
            }
        }
        {
            let mut st = control.lock();
            st.fed += 1;
            st.fed_bytes += value.len() as u64 + 1;
        }
        let (out, captured) = if job.stdout_outputs {
            match capture() {
                Ok((w, r)) => (Ok(w), Some(r)),
                Err(e) => (Err(e), None),
            }
        } else {
            (out_write.try_clone(), None)
        };
        let (Ok(out), Ok(err)) = (out, err_write.try_clone()) else {
            break;
        };
        // With a tee, the item gets pipes of its own, copied to the fragment's and
        // to the tee under the item's name, and read to their end before the next.
        let (out, err, readers, mut item_stop) = match &job.tee {
            Some(tee) => match item_tee(tee, index, &value, out, err, captured.is_some()) {
                Ok((out, err, readers, stop)) => (out, err, readers, Some(stop)),
                Err(_) => break,
            },
            None => (out, err, Vec::new(), None),
        };
        let cmd = item_command(job, index, &value, has_slot, out, err);
        let going = run_item(job, control, &mut report, index, cmd, start, captured);
        // The item's process group is gone: what it wrote is in the pipes.
        if let Some(stop) = &mut item_stop {
            stop.stop();
        }
        for reader in readers {
            let _ = reader.recv();
        }
        if !going {
            break;
        }
    }
    drop((out_write, err_write));
    stop.stop();
    report.stdout_tail = stdout.recv().unwrap_or_default();
    report.stderr_tail = stderr.recv().unwrap_or_default();
    if control.lock().yield_requested {
        report.yielded = true;
    }
    report
}

/// Pipes of one item's own for its stderr (and its stdout unless that is
/// captured as outputs), each read by a thread that copies to the fragment's pipe
/// (`out`, `err`) and to the tee, labelled with the item's value.
type Teed = (OwnedFd, OwnedFd, Vec<mpsc::Receiver<()>>, Stop);

fn item_tee(
    tee: &crate::run::OutputTee,
    index: u64,
    value: &[u8],
    out: OwnedFd,
    err: OwnedFd,
    captured: bool,
) -> std::io::Result<Teed> {
    // Printable: a value's line breaks and escapes do not reach the terminal.
    let label: String = String::from_utf8_lossy(value)
        .chars()
        .take(80)
        .map(|c| if c.is_control() { '?' } else { c })
        .collect();
    let stop = Stop::new()?;
    let (err_read, err_write) = sys::pipe()?;
    let sink = Sink::open(Some(tee), &label, true, &format!("{index}.stderr"));
    let mut readers = vec![tee_reader(err_read, stop.watch()?, Some(err), sink)];
    let out = if captured {
        out
    } else {
        let (out_read, out_write) = sys::pipe()?;
        let sink = Sink::open(Some(tee), &label, false, &format!("{index}.stdout"));
        readers.push(tee_reader(out_read, stop.watch()?, Some(out), sink));
        out_write
    };
    Ok((out, err_write, readers, stop))
}

/// The command for one item: the value in the argv (at each `{}`, else last), the
/// job's environment and the item's index, output to the fragment's tails.
fn item_command(
    job: &FragmentJob,
    index: u64,
    value: &[u8],
    has_slot: bool,
    out: OwnedFd,
    err: OwnedFd,
) -> Command {
    let mut cmd = Command::new(job.program());
    job.in_cwd(&mut cmd);
    for arg in &job.argv[1..] {
        cmd.arg(replace_slot(arg, value));
    }
    if !has_slot {
        cmd.arg(OsStr::from_bytes(value));
    }
    cmd.envs(job.env.iter().map(|(k, v)| (k, v)))
        .env("GRANULE_INDEX", index.to_string())
        .stdin(Stdio::null())
        .stdout(out)
        .stderr(err)
        .process_group(0);
    for name in PRIVATE_ENV {
        cmd.env_remove(name);
    }
    cmd
}

/// Largest stdout of one item taken as its outputs, bytes.
const MAX_ITEM_STDOUT: u64 = 256 << 20;

/// A pipe for one item's stdout, read whole by a thread: the write end for the
/// process and where the bytes arrive when it closes.
fn capture() -> std::io::Result<(OwnedFd, mpsc::Receiver<std::io::Result<Vec<u8>>>)> {
    let (read, write) = sys::pipe()?;
    let (tx, rx) = mpsc::channel();
    std::thread::Builder::new()
        .name("item-stdout".into())
        .spawn(move || {
            let mut bytes = Vec::new();
            let read = std::fs::File::from(read)
                .take(MAX_ITEM_STDOUT + 1)
                .read_to_end(&mut bytes);
            let result = match read {
                Ok(_) if bytes.len() as u64 > MAX_ITEM_STDOUT => Err(std::io::Error::other(
                    format!("more than {} MiB of outputs", MAX_ITEM_STDOUT >> 20),
                )),
                Ok(_) => Ok(bytes),
                Err(e) => Err(e),
            };
            let _ = tx.send(result);
        })?;
    Ok((write, rx))
}

/// Each line of an item's stdout is one output record (a last line without a
/// newline too; a `\r` before a newline is dropped).
fn stdout_lines(bytes: &[u8]) -> Vec<Output> {
    let body = bytes.strip_suffix(b"\n").unwrap_or(bytes);
    if bytes.is_empty() {
        return Vec::new();
    }
    body.split(|&b| b == b'\n')
        .map(|l| Output::Record(l.strip_suffix(b"\r").unwrap_or(l).to_vec()))
        .collect()
}

/// Runs one item's process to its end: exit 0 acks the item, a failure makes it a
/// culprit. False when the fragment must stop (a yield, a timeout, no spawn).
fn run_item(
    job: &FragmentJob,
    control: &Arc<Control>,
    report: &mut RunReport,
    index: u64,
    mut cmd: Command,
    start: Instant,
    captured: Option<mpsc::Receiver<std::io::Result<Vec<u8>>>>,
) -> bool {
    let child = match cmd.spawn() {
        Ok(c) => c,
        Err(e) => {
            report.failure = Some(Failure::Spawn(format!("{}: {e}", job.argv[0])));
            report.culprits.insert_one(index);
            // A value that cannot be an argument (a NUL byte) fails alone.
            return e.kind() == std::io::ErrorKind::InvalidInput;
        }
    };
    // The parent's copies of the child's pipe ends go now: a captured stdout
    // ends when the child's group is gone.
    drop(cmd);
    let waiter = Waiter::new(child.id());
    let sup = supervise(job, control, &waiter, start);
    report.cpu_ms += sup.exit.cpu_ms;
    report.peak_rss_kb = report.peak_rss_kb.max(sup.exit.max_rss_kb);
    report.io_bytes += sup.exit.io_bytes;
    match classify(&sup, job.limit) {
        None => {
            // The process exited and its group was killed: the pipe ends.
            let outputs = match captured.map(|r| r.recv()) {
                None => Vec::new(),
                Some(Ok(Ok(bytes))) => stdout_lines(&bytes),
                Some(Ok(Err(e))) => {
                    report.culprits.insert_one(index);
                    report.failure = Some(Failure::Output(format!("stdout of item {index}: {e}")));
                    return true;
                }
                Some(Err(_)) => {
                    report.culprits.insert_one(index);
                    report.failure = Some(Failure::Output(format!(
                        "stdout of item {index}: its reader stopped"
                    )));
                    return true;
                }
            };
            let mut st = control.lock();
            st.emitted |= !outputs.is_empty();
            st.pending_outputs = outputs;
            Control::ack(&mut st, index, Instant::now());
            st.pending_outputs.clear();
            true
        }
        Some(_) if sup.killed_by_us && !sup.timed_out => {
            // Killed on request: a yield, not the item's fault.
            report.yielded = true;
            false
        }
        Some(failure) => {
            report.culprits.insert_one(index);
            report.failure = Some(failure);
            !sup.timed_out
        }
    }
}

/// `arg` with every `{}` replaced by the value's bytes.
fn replace_slot(arg: &str, value: &[u8]) -> OsString {
    let mut out = Vec::with_capacity(arg.len() + value.len());
    let mut rest = arg.as_bytes();
    while let Some(at) = rest.windows(2).position(|w| w == b"{}") {
        out.extend_from_slice(&rest[..at]);
        out.extend_from_slice(value);
        rest = &rest[at + 2..];
    }
    out.extend_from_slice(rest);
    OsString::from_vec(out)
}

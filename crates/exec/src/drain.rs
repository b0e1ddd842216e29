//! Reading a child's pipes to their end without trusting the end to come.
//!
//! A task's grandchild may keep stdout or fd 3 open long after the task exited.
//! Readers therefore wait on their pipe *and* a stop pipe: when the fragment ends,
//! the stop pipe's write end is closed, and each reader takes exactly the bytes
//! that are in its pipe at that moment (everything the task wrote before it
//! exited) and finishes.

use crate::sys::{self, Ready};
use std::fs::File;
use std::io::Read;
use std::os::fd::{AsRawFd, OwnedFd, RawFd};
use std::sync::mpsc;
use std::thread;

/// The signal that a fragment ended: dropping it wakes every reader.
pub(crate) struct Stop {
    read: OwnedFd,
    write: Option<OwnedFd>,
}

impl Stop {
    pub(crate) fn new() -> std::io::Result<Stop> {
        let (read, write) = sys::pipe()?;
        Ok(Stop {
            read,
            write: Some(write),
        })
    }

    /// A handle readers own, so the stop end outlives them.
    pub(crate) fn watch(&self) -> std::io::Result<OwnedFd> {
        self.read.try_clone()
    }

    /// Tells every reader to take what is in its pipe now and finish.
    pub(crate) fn stop(&mut self) {
        self.write = None;
    }
}

/// Calls `each` with what arrives on `pipe` until its end or a stop; after a stop,
/// only the bytes already in the pipe. `each` returns false to stop reading early.
pub(crate) fn read_until_stop(
    pipe: &mut File,
    stop: RawFd,
    buf: &mut [u8],
    mut each: impl FnMut(&[u8]) -> bool,
) {
    let fd = pipe.as_raw_fd();
    loop {
        match sys::wait_ready(fd, libc::POLLIN, stop) {
            Ready::Pipe => match pipe.read(buf) {
                Ok(0) => return,
                Ok(n) => {
                    if !each(&buf[..n]) {
                        return;
                    }
                }
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                Err(_) => return,
            },
            Ready::Stop => {
                let mut left = sys::available(fd);
                while left > 0 {
                    let want = left.min(buf.len());
                    match pipe.read(&mut buf[..want]) {
                        Ok(0) | Err(_) => return,
                        Ok(n) => {
                            left -= n;
                            if !each(&buf[..n]) {
                                return;
                            }
                        }
                    }
                }
                return;
            }
        }
    }
}

/// Longest line passed to an echo in one piece, bytes.
const LONGEST_LINE: usize = 64 << 10;

/// Where a stream of a task's output also goes: whole lines to the echo (with
/// a label and whether it is stderr), every byte to a file.
pub(crate) struct Sink {
    echo: Option<(crate::run::Echo, String, bool)>,
    file: Option<File>,
    partial: Vec<u8>,
}

impl Sink {
    /// A sink for one stream of `tee` labelled `label`, its file (if `tee` has a
    /// folder) named `name` there; `None` when `tee` wants neither.
    pub(crate) fn open(
        tee: Option<&crate::run::OutputTee>,
        label: &str,
        stderr: bool,
        name: &str,
    ) -> Option<Sink> {
        let tee = tee?;
        let file = tee.dir.as_ref().and_then(|dir| {
            let _ = std::fs::create_dir_all(dir);
            File::create(dir.join(name)).ok()
        });
        let echo = tee.echo.clone().map(|e| (e, label.to_string(), stderr));
        (echo.is_some() || file.is_some()).then_some(Sink {
            echo,
            file,
            partial: Vec::new(),
        })
    }

    /// Takes bytes as they arrive.
    pub(crate) fn write(&mut self, bytes: &[u8]) {
        use std::io::Write;
        if let Some(f) = &mut self.file {
            let _ = f.write_all(bytes);
        }
        let Some((echo, label, stderr)) = &self.echo else {
            return;
        };
        self.partial.extend_from_slice(bytes);
        while let Some(end) = self.partial.iter().position(|&b| b == b'\n') {
            echo(label, *stderr, &self.partial[..end]);
            self.partial.drain(..=end);
        }
        // A task that never ends a line is shown in pieces, not held in memory.
        if self.partial.len() >= LONGEST_LINE {
            echo(label, *stderr, &self.partial);
            self.partial.clear();
        }
    }

    /// Passes on a last line without its newline.
    pub(crate) fn finish(&mut self) {
        if let (Some((echo, label, stderr)), false) = (&self.echo, self.partial.is_empty()) {
            echo(label, *stderr, &self.partial);
            self.partial.clear();
        }
    }
}

/// Reads a pipe to its end (or its stop) on its own thread, copying what arrives to `forward`
/// (the fragment's own output pipe, whose tail is kept) and to `sink`.
pub(crate) fn tee_reader(
    pipe: OwnedFd,
    stop: OwnedFd,
    forward: Option<OwnedFd>,
    mut sink: Option<Sink>,
) -> mpsc::Receiver<()> {
    let (tx, rx) = mpsc::channel();
    thread::spawn(move || {
        use std::io::Write;
        let mut pipe = File::from(pipe);
        let mut forward = forward.map(File::from);
        let mut buf = vec![0u8; 8192];
        // To its end, or at a stop what is in it then (a grandchild that kept the
        // pipe open cannot hold the fragment).
        read_until_stop(&mut pipe, stop.as_raw_fd(), &mut buf, |bytes| {
            if let Some(f) = &mut forward {
                let _ = f.write_all(bytes);
            }
            if let Some(s) = &mut sink {
                s.write(bytes);
            }
            true
        });
        if let Some(s) = &mut sink {
            s.finish();
        }
        let _ = tx.send(());
    });
    rx
}

/// Keeps the last `cap` bytes read from a pipe, on its own thread; `sink` gets
/// everything.
pub(crate) fn tail_reader(
    pipe: OwnedFd,
    stop: OwnedFd,
    cap: usize,
    mut sink: Option<Sink>,
) -> mpsc::Receiver<Vec<u8>> {
    let (tx, rx) = mpsc::channel();
    thread::spawn(move || {
        let mut pipe = File::from(pipe);
        let mut kept: Vec<u8> = Vec::new();
        let mut buf = vec![0u8; 8192];
        read_until_stop(&mut pipe, stop.as_raw_fd(), &mut buf, |bytes| {
            if let Some(s) = &mut sink {
                s.write(bytes);
            }
            kept.extend_from_slice(bytes);
            if kept.len() > 2 * cap.max(1) {
                kept.drain(..kept.len() - cap);
            }
            true
        });
        if let Some(s) = &mut sink {
            s.finish();
        }
        if kept.len() > cap {
            kept.drain(..kept.len() - cap);
        }
        let _ = tx.send(kept);
    });
    rx
}

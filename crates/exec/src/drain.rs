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

/// Keeps the last `cap` bytes read from a pipe, on its own thread.
pub(crate) fn tail_reader(pipe: OwnedFd, stop: OwnedFd, cap: usize) -> mpsc::Receiver<Vec<u8>> {
    let (tx, rx) = mpsc::channel();
    thread::spawn(move || {
        let mut pipe = File::from(pipe);
        let mut kept: Vec<u8> = Vec::new();
        let mut buf = vec![0u8; 8192];
        read_until_stop(&mut pipe, stop.as_raw_fd(), &mut buf, |bytes| {
            kept.extend_from_slice(bytes);
            if kept.len() > 2 * cap.max(1) {
                kept.drain(..kept.len() - cap);
            }
            true
        });
        if kept.len() > cap {
            kept.drain(..kept.len() - cap);
        }
        let _ = tx.send(kept);
    });
    rx
}

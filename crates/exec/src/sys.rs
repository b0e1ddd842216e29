//! Thin wrappers over the few Linux calls std does not offer: pipes for fd 3,
//! pidfds to wait with a timeout, wait4 for rusage, process-group signals, and
//! the cgroup's OOM-kill counter.

use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::time::Duration;

/// A close-on-exec pipe: (read end, write end).
pub(crate) fn pipe() -> io::Result<(OwnedFd, OwnedFd)> {
    let mut fds = [0 as RawFd; 2];
    // SAFETY: fds is a valid array of two ints for pipe2 to fill.
    if unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) } != 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: pipe2 succeeded, so both fds are open and owned by nobody else.
    Ok(unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) })
}

/// In a forked child before exec: makes `fd` the child's fd 3, kept across exec,
/// and asks the kernel to SIGKILL the child if granule dies.
/// Only async-signal-safe calls.
pub(crate) fn child_setup(fd: RawFd) -> io::Result<()> {
    // SAFETY: plain syscalls on integers, async-signal-safe.
    unsafe {
        if fd == 3 {
            let flags = libc::fcntl(3, libc::F_GETFD);
            if flags < 0 || libc::fcntl(3, libc::F_SETFD, flags & !libc::FD_CLOEXEC) < 0 {
                return Err(io::Error::last_os_error());
            }
        } else if libc::dup2(fd, 3) < 0 {
            return Err(io::Error::last_os_error());
        }
        libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL);
    }
    Ok(())
}

/// How a reaped child ended, with its resource usage.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Exit {
    /// Exit code, if it exited.
    pub(crate) code: Option<i32>,
    /// Signal, if one killed it.
    pub(crate) signal: Option<i32>,
    /// User + system CPU time, ms.
    pub(crate) cpu_ms: f64,
    /// Peak resident set, KiB.
    pub(crate) max_rss_kb: u64,
    /// Bytes read from and written to storage (block I/O, not the page cache).
    pub(crate) io_bytes: u64,
}

/// A child being waited for, by pidfd where the kernel has them.
pub(crate) struct Waiter {
    pid: libc::pid_t,
    pidfd: Option<OwnedFd>,
}

impl Waiter {
    pub(crate) fn new(pid: u32) -> Waiter {
        let pid = pid as libc::pid_t;
        // SAFETY: pidfd_open takes a pid and flags and returns a new fd or -1.
        let fd = unsafe { libc::syscall(libc::SYS_pidfd_open, pid, 0) };
        // SAFETY: a non-negative return is a fresh fd we own.
        let pidfd = (fd >= 0).then(|| unsafe { OwnedFd::from_raw_fd(fd as RawFd) });
        Waiter { pid, pidfd }
    }

    /// Waits up to `timeout` for the child to exit and reaps it.
    pub(crate) fn wait(&self, timeout: Duration) -> Option<Exit> {
        match &self.pidfd {
            Some(fd) => {
                let mut pfd = libc::pollfd {
                    fd: fd.as_raw_fd(),
                    events: libc::POLLIN,
                    revents: 0,
                };
                // SAFETY: one valid pollfd.
                unsafe { libc::poll(&mut pfd, 1, timeout.as_millis() as i32) };
                self.reap(libc::WNOHANG)
            }
            None => {
                if let Some(exit) = self.reap(libc::WNOHANG) {
                    return Some(exit);
                }
                std::thread::sleep(timeout.min(Duration::from_millis(5)));
                self.reap(libc::WNOHANG)
            }
        }
    }

    fn reap(&self, flags: i32) -> Option<Exit> {
        let mut status = 0;
        // SAFETY: rusage is plain data; wait4 fills it.
        let mut usage: libc::rusage = unsafe { std::mem::zeroed() };
        // SAFETY: waiting on our own child with valid out-pointers.
        let r = unsafe { libc::wait4(self.pid, &mut status, flags, &mut usage) };
        if r != self.pid {
            return None;
        }
        let ms = |t: libc::timeval| t.tv_sec as f64 * 1e3 + t.tv_usec as f64 / 1e3;
        Some(Exit {
            code: libc::WIFEXITED(status).then(|| libc::WEXITSTATUS(status)),
            signal: libc::WIFSIGNALED(status).then(|| libc::WTERMSIG(status)),
            cpu_ms: ms(usage.ru_utime) + ms(usage.ru_stime),
            max_rss_kb: usage.ru_maxrss.max(0) as u64,
            // rusage counts 512-byte blocks.
            io_bytes: (usage.ru_inblock.max(0) + usage.ru_oublock.max(0)) as u64 * 512,
        })
    }

    /// Sends `signal` to the child's process group (it leads its own).
    pub(crate) fn signal_group(&self, signal: i32) {
        // SAFETY: kill with a negative pid signals that process group.
        unsafe { libc::kill(-self.pid, signal) };
    }
}

/// OOM kills counted in this process's cgroup, if the cgroup v2 file is readable.
pub(crate) fn oom_kills() -> Option<u64> {
    let cgroup = std::fs::read_to_string("/proc/self/cgroup").ok()?;
    let path = cgroup.lines().find_map(|l| l.strip_prefix("0::"))?;
    let events = std::fs::read_to_string(format!("/sys/fs/cgroup{path}/memory.events")).ok()?;
    events
        .lines()
        .find_map(|l| l.strip_prefix("oom_kill "))
        .and_then(|v| v.trim().parse().ok())
}

/// The conventional name of a signal number.
pub(crate) fn signal_name(signal: i32) -> &'static str {
    match signal {
        libc::SIGHUP => "SIGHUP",
        libc::SIGINT => "SIGINT",
        libc::SIGQUIT => "SIGQUIT",
        libc::SIGILL => "SIGILL",
        libc::SIGABRT => "SIGABRT",
        libc::SIGBUS => "SIGBUS",
        libc::SIGFPE => "SIGFPE",
        libc::SIGKILL => "SIGKILL",
        libc::SIGSEGV => "SIGSEGV",
        libc::SIGPIPE => "SIGPIPE",
        libc::SIGALRM => "SIGALRM",
        libc::SIGTERM => "SIGTERM",
        libc::SIGXCPU => "SIGXCPU",
        libc::SIGXFSZ => "SIGXFSZ",
        _ => "signal",
    }
}

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

    /// Waits up to `timeout` for the child to exit; true once it has. The child is
    /// left unreaped (a zombie), so its process group id stays its own until
    /// [`Waiter::reap`]: the group can be signalled without hitting a reused id.
    pub(crate) fn exited(&self, timeout: Duration) -> bool {
        match &self.pidfd {
            Some(fd) => {
                let mut pfd = libc::pollfd {
                    fd: fd.as_raw_fd(),
                    events: libc::POLLIN,
                    revents: 0,
                };
                // SAFETY: one valid pollfd.
                unsafe { libc::poll(&mut pfd, 1, timeout.as_millis() as i32) };
            }
            None => std::thread::sleep(timeout.min(Duration::from_millis(5))),
        }
        // SAFETY: siginfo_t is plain data that waitid fills.
        let mut info: libc::siginfo_t = unsafe { std::mem::zeroed() };
        // SAFETY: waiting on our own child with a valid out-pointer; WNOWAIT leaves it.
        let r = unsafe {
            libc::waitid(
                libc::P_PID,
                self.pid as libc::id_t,
                &mut info,
                libc::WEXITED | libc::WNOHANG | libc::WNOWAIT,
            )
        };
        // SAFETY: si_pid is valid for the SIGCHLD-style info waitid returns.
        r == 0 && unsafe { info.si_pid() } == self.pid
    }

    /// Reaps the child (which must have exited) and reads its resource usage.
    pub(crate) fn reap(&self) -> Exit {
        let mut status = 0;
        // SAFETY: rusage is plain data; wait4 fills it.
        let mut usage: libc::rusage = unsafe { std::mem::zeroed() };
        loop {
            // SAFETY: waiting on our own child with valid out-pointers.
            let r = unsafe { libc::wait4(self.pid, &mut status, 0, &mut usage) };
            if r == self.pid {
                break;
            }
            if r < 0 && io::Error::last_os_error().kind() != io::ErrorKind::Interrupted {
                // Reaped elsewhere (cannot happen: only we wait for it).
                return Exit {
                    code: None,
                    signal: None,
                    cpu_ms: 0.0,
                    max_rss_kb: 0,
                    io_bytes: 0,
                };
            }
        }
        let ms = |t: libc::timeval| t.tv_sec as f64 * 1e3 + t.tv_usec as f64 / 1e3;
        Exit {
            code: libc::WIFEXITED(status).then(|| libc::WEXITSTATUS(status)),
            signal: libc::WIFSIGNALED(status).then(|| libc::WTERMSIG(status)),
            cpu_ms: ms(usage.ru_utime) + ms(usage.ru_stime),
            max_rss_kb: usage.ru_maxrss.max(0) as u64,
            // rusage counts 512-byte blocks.
            io_bytes: (usage.ru_inblock.max(0) + usage.ru_oublock.max(0)) as u64 * 512,
        }
    }

    /// Sends `signal` to the child's process group (it leads its own).
    pub(crate) fn signal_group(&self, signal: i32) {
        // SAFETY: kill with a negative pid signals that process group.
        unsafe { libc::kill(-self.pid, signal) };
    }
}

/// What waiting on a pipe found.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Ready {
    /// The pipe can be read (or written) now, or was closed at the other end.
    Pipe,
    /// The stop pipe was closed: finish up.
    Stop,
}

/// Waits until `fd` is ready for `events` (`POLLIN` or `POLLOUT`) or the stop
/// pipe's write end is closed.
pub(crate) fn wait_ready(fd: RawFd, events: i16, stop: RawFd) -> Ready {
    loop {
        let mut fds = [
            libc::pollfd {
                fd,
                events,
                revents: 0,
            },
            libc::pollfd {
                fd: stop,
                events: libc::POLLIN,
                revents: 0,
            },
        ];
        // SAFETY: two valid pollfds.
        let n = unsafe { libc::poll(fds.as_mut_ptr(), 2, -1) };
        if n < 0 {
            if io::Error::last_os_error().kind() == io::ErrorKind::Interrupted {
                continue;
            }
            return Ready::Stop;
        }
        if fds[1].revents != 0 {
            return Ready::Stop;
        }
        if fds[0].revents != 0 {
            return Ready::Pipe;
        }
    }
}

/// Bytes waiting in a pipe (`FIONREAD`).
pub(crate) fn available(fd: RawFd) -> usize {
    let mut n: libc::c_int = 0;
    // SAFETY: FIONREAD writes one int.
    if unsafe { libc::ioctl(fd, libc::FIONREAD, &mut n) } < 0 {
        return 0;
    }
    n.max(0) as usize
}

/// Makes writes to `fd` return `WouldBlock` instead of waiting.
pub(crate) fn set_nonblocking(fd: RawFd) -> io::Result<()> {
    // SAFETY: plain fcntl calls on an fd we hold.
    unsafe {
        let flags = libc::fcntl(fd, libc::F_GETFL);
        if flags < 0 || libc::fcntl(fd, libc::F_SETFL, flags | libc::O_NONBLOCK) < 0 {
            return Err(io::Error::last_os_error());
        }
    }
    Ok(())
}

/// Eight random bytes from the kernel, as hex (a fragment's command tag, a worker's id).
pub fn random_hex() -> String {
    let mut bytes = [0u8; 8];
    // SAFETY: getrandom fills the buffer it is given.
    let n = unsafe { libc::getrandom(bytes.as_mut_ptr().cast(), bytes.len(), 0) };
    if n != bytes.len() as isize {
        // No entropy call: the time and pid still make a tag no item predicts.
        let t = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos() as u64);
        bytes = (t ^ (u64::from(std::process::id()) << 32)).to_le_bytes();
    }
    bytes.iter().map(|b| format!("{b:02x}")).collect()
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

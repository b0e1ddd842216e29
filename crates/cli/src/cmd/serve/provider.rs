//! Providers: how `granule serve` starts, lists and drains the workers of a pool.
//! Every allocation carries an id that names its serve (a tag of the store) and
//! its pool, and the provider's own list is the truth: a restarted `serve` adopts
//! what it finds, and never starts what is already there.

use super::pools::{Kind, PoolSpec};
use anyhow::{bail, Context, Result};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

/// An allocation a provider lists: its id, and whether it waits to start.
#[derive(Clone, Debug, PartialEq)]
pub(crate) struct Alloc {
    /// What the worker inside it gets as `GRANULE_ALLOCATION`.
    pub(crate) id: String,
    /// Asked for, not started yet (a queued Slurm job).
    pub(crate) pending: bool,
}

/// How to start one worker: the `granule worker` argv (without the lifespan) and
/// where its files go.
pub(crate) struct Launch {
    /// `granule worker ...`, the program first.
    pub(crate) argv: Vec<String>,
    /// Where scripts and worker logs go.
    pub(crate) dir: PathBuf,
}

/// One pool's provider.
pub(crate) struct Provider {
    pool: PoolSpec,
    /// `g<tag>-<pool>`: the prefix of this pool's allocation ids (and Slurm job name).
    prefix: String,
    /// Local workers this process started and has not reaped.
    children: Vec<Child>,
    /// Allocations started, for fresh ids.
    seq: u64,
    /// Where its commands' output files and workers' logs go.
    dir: PathBuf,
}

impl Provider {
    /// The provider of `pool` for the serve whose store has tag `tag`; its files go
    /// in `dir`.
    pub(crate) fn new(pool: PoolSpec, tag: &str, dir: PathBuf) -> Provider {
        let prefix = format!("g{tag}-{}", pool.name);
        Provider {
            pool,
            prefix,
            children: Vec::new(),
            seq: 0,
            dir,
        }
    }

    fn run(&self, cmd: &mut Command) -> Result<String> {
        run_in(cmd, &self.dir)
    }

    /// The pool.
    pub(crate) fn pool(&self) -> &PoolSpec {
        &self.pool
    }

    /// Whether a worker's `GRANULE_ALLOCATION` is one of this pool's.
    pub(crate) fn owns(&self, allocation: &str) -> bool {
        self.native(allocation).is_some()
    }

    /// The provider's own id of one of this pool's allocations (a Slurm job id).
    fn native<'a>(&self, allocation: &'a str) -> Option<&'a str> {
        allocation.strip_prefix(&self.prefix)?.strip_prefix('.')
    }

    /// The pool's live allocations, as the provider sees them.
    pub(crate) fn list(&mut self) -> Result<Vec<Alloc>> {
        self.children
            .retain_mut(|c| matches!(c.try_wait(), Ok(None)));
        Ok(match self.pool.provider {
            Kind::Local => self.list_local(),
            Kind::Slurm => self.list_slurm()?,
            Kind::Command => self.list_command()?,
        })
    }

    /// Starts `n` workers, each with `walltime` of life.
    pub(crate) fn start(&mut self, n: u32, walltime: Duration, launch: &Launch) -> Result<()> {
        if n == 0 {
            return Ok(());
        }
        let mut argv = launch.argv.clone();
        argv.push("--lifespan".into());
        argv.push(format!("{}s", walltime.as_secs().max(1)));
        match self.pool.provider {
            Kind::Local => (0..n).try_for_each(|_| self.start_local(&argv, launch)),
            Kind::Slurm => self.start_slurm(n, walltime, argv, launch),
            Kind::Command => (0..n).try_for_each(|_| self.start_command(&argv, walltime)),
        }
    }

    /// Asks an allocation's worker to leave (a preemption notice: it yields its
    /// fragments and exits); a pending one is cancelled.
    pub(crate) fn drain(&mut self, alloc: &Alloc) -> Result<()> {
        match self.pool.provider {
            Kind::Local => {
                for pid in local_pids(&alloc.id) {
                    // SAFETY: sending a signal to a process we identified by its environment.
                    unsafe { libc::kill(pid, libc::SIGTERM) };
                }
                Ok(())
            }
            Kind::Slurm => {
                let mut cmd = Command::new("scancel");
                if !alloc.pending {
                    cmd.args(["-b", "-s", "TERM"]);
                }
                self.run(cmd.arg(self.native(&alloc.id).unwrap_or_default()))
                    .map(drop)
            }
            Kind::Command => self
                .run(
                    Command::new(&self.pool.stop[0])
                        .args(&self.pool.stop[1..])
                        .env("GRANULE_ALLOCATION", &alloc.id),
                )
                .map(drop),
        }
    }

    fn fresh_id(&mut self) -> String {
        self.seq += 1;
        format!("{}.{}-{}", self.prefix, crate::host::now_ms(), self.seq)
    }

    fn start_local(&mut self, argv: &[String], launch: &Launch) -> Result<()> {
        let id = self.fresh_id();
        let log = std::fs::File::create(launch.dir.join(format!("{id}.log")))
            .with_context(|| format!("creating the worker log in {}", launch.dir.display()))?;
        let mut cmd = Command::new(&argv[0]);
        cmd.args(&argv[1..])
            .envs(&self.pool.env)
            .env("GRANULE_ALLOCATION", &id)
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log);
        // Its own session: the worker outlives a `serve` that is killed, and is
        // adopted by the next one.
        // SAFETY: setsid is async-signal-safe.
        unsafe {
            cmd.pre_exec(|| {
                libc::setsid();
                Ok(())
            })
        };
        let child = cmd
            .spawn()
            .with_context(|| format!("starting {}", argv[0]))?;
        self.children.push(child);
        Ok(())
    }

    /// This pool's workers running on this host: processes whose environment names
    /// one of its allocations.
    fn list_local(&self) -> Vec<Alloc> {
        let mut ids: Vec<String> = all_local_allocations()
            .into_iter()
            .filter(|(_, id)| id.starts_with(&format!("{}.", self.prefix)))
            .map(|(_, id)| id)
            .collect();
        ids.sort();
        ids.dedup();
        ids.into_iter()
            .map(|id| Alloc { id, pending: false })
            .collect()
    }

    fn start_slurm(
        &mut self,
        n: u32,
        walltime: Duration,
        mut argv: Vec<String>,
        launch: &Launch,
    ) -> Result<()> {
        argv.push("--deadline".into());
        argv.push("slurm".into());
        let script = launch
            .dir
            .join(format!("{}-{}.sh", self.prefix, crate::host::now_ms()));
        let quoted: Vec<String> = argv.iter().map(|a| quote(a)).collect();
        // The allocation's id ends in the Slurm job's (an array task's `JOB_TASK`).
        let body = format!(
            "#!/bin/sh\n\
             if [ -n \"$SLURM_ARRAY_TASK_ID\" ]; then id=\"${{SLURM_ARRAY_JOB_ID}}_${{SLURM_ARRAY_TASK_ID}}\"; else id=\"$SLURM_JOB_ID\"; fi\n\
             GRANULE_ALLOCATION={}.$id\n\
             export GRANULE_ALLOCATION\n\
             exec {}\n",
            quote(&self.prefix),
            quoted.join(" ")
        );
        std::fs::write(&script, body).with_context(|| format!("writing {}", script.display()))?;
        // Slurm's limit: the life plus the notice and a Slurm enforcement cycle, in
        // whole minutes; the worker ends itself at its lifespan, before.
        let notice = (walltime / 10).clamp(Duration::from_secs(5), Duration::from_secs(60));
        let minutes = (walltime + notice + Duration::from_secs(30))
            .as_secs()
            .div_ceil(60);
        let mut cmd = Command::new("sbatch");
        // sbatch hands its environment to the job (`--export=ALL`, Slurm's default).
        cmd.envs(&self.pool.env)
            .arg("--parsable")
            .arg(format!("--job-name={}", self.prefix))
            .arg(format!("--time={minutes}"))
            .arg(format!("--signal=B:TERM@{}", notice.as_secs()))
            .arg(format!("--cpus-per-task={}", self.pool.slots))
            .args(self.pool.memory_mb.map(|mb| format!("--mem={mb}M")))
            .args((self.pool.gpus > 0).then(|| format!("--gres=gpu:{}", self.pool.gpus)))
            .arg(format!(
                "--output={}",
                launch
                    .dir
                    .join(if n > 1 { "%A_%a.out" } else { "%j.out" })
                    .display()
            ));
        if n > 1 {
            cmd.arg(format!("--array=0-{}", n - 1));
        }
        cmd.args(&self.pool.sbatch_args).arg(&script);
        self.run(&mut cmd).map(drop)
    }

    fn list_slurm(&self) -> Result<Vec<Alloc>> {
        let out = self.run(Command::new("squeue").args([
            "--me",
            "-h",
            "-r",
            "-n",
            &self.prefix,
            "-o",
            "%i|%T",
        ]))?;
        Ok(out
            .lines()
            .filter_map(|l| l.split_once('|'))
            .map(|(id, state)| Alloc {
                id: format!("{}.{}", self.prefix, id.trim()),
                pending: state.trim() == "PENDING",
            })
            .collect())
    }

    fn start_command(&mut self, argv: &[String], walltime: Duration) -> Result<()> {
        let id = self.fresh_id();
        let line: Vec<String> = argv.iter().map(|a| quote(a)).collect();
        self.run(
            Command::new(&self.pool.start[0])
                .args(&self.pool.start[1..])
                .envs(&self.pool.env)
                .env("GRANULE_ALLOCATION", &id)
                .env("GRANULE_WORKER_COMMAND", line.join(" "))
                .env("GRANULE_WALLTIME_S", walltime.as_secs().to_string()),
        )
        .map(drop)
    }

    fn list_command(&self) -> Result<Vec<Alloc>> {
        let out = self.run(Command::new(&self.pool.list[0]).args(&self.pool.list[1..]))?;
        Ok(out
            .lines()
            .filter_map(|l| {
                let mut words = l.split_whitespace();
                let id = words.next()?;
                id.starts_with(&format!("{}.", self.prefix)).then(|| Alloc {
                    id: id.to_string(),
                    pending: words.next() == Some("pending"),
                })
            })
            .collect())
    }
}

/// How long a provider command may take before it is killed and counted failed.
const COMMAND_TIMEOUT: Duration = Duration::from_secs(60);

/// Runs a provider command to its end (killed after `COMMAND_TIMEOUT`) and returns
/// its stdout; its stderr is the error when it fails. Output goes through files, not
/// pipes: a start script whose worker keeps the pipes open must not hold serve.
fn run_in(cmd: &mut Command, dir: &Path) -> Result<String> {
    let program = cmd.get_program().to_string_lossy().into_owned();
    let out_path = dir.join(format!(".cmd-{}.out", std::process::id()));
    let err_path = dir.join(format!(".cmd-{}.err", std::process::id()));
    let mut child = cmd
        .stdin(Stdio::null())
        .stdout(std::fs::File::create(&out_path)?)
        .stderr(std::fs::File::create(&err_path)?)
        .spawn()
        .with_context(|| format!("running {program}"))?;
    let deadline = std::time::Instant::now() + COMMAND_TIMEOUT;
    let status = loop {
        if let Some(status) = child.try_wait()? {
            break status;
        }
        if std::time::Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            bail!("{program} ran past {}s: killed", COMMAND_TIMEOUT.as_secs());
        }
        std::thread::sleep(Duration::from_millis(10));
    };
    let stdout = std::fs::read_to_string(&out_path).unwrap_or_default();
    let stderr = std::fs::read_to_string(&err_path).unwrap_or_default();
    if !status.success() {
        bail!("{program} exited with {status}: {}", stderr.trim());
    }
    Ok(stdout)
}

/// `'text'` for a POSIX shell: the worker line of a batch script or of
/// `GRANULE_WORKER_COMMAND` (our own arguments, never item values).
fn quote(text: &str) -> String {
    format!("'{}'", text.replace('\'', r"'\''"))
}

/// `(pid, GRANULE_ALLOCATION)` of every live process on this host that has one.
fn all_local_allocations() -> Vec<(i32, String)> {
    let Ok(dir) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    dir.filter_map(|e| e.ok()?.file_name().to_str()?.parse::<i32>().ok())
        .filter_map(|pid| {
            let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
            // Fields after the command name: state, ppid, pgrp, session. A zombie
            // has exited; a worker leads its own session (its tasks, which inherit
            // its environment, do not).
            let fields: Vec<&str> = stat
                .get(stat.rfind(')')? + 2..)?
                .split_whitespace()
                .collect();
            if fields.first() == Some(&"Z") || fields.get(3) != Some(&pid.to_string().as_str()) {
                return None;
            }
            let env = std::fs::read(format!("/proc/{pid}/environ")).ok()?;
            env.split(|&b| b == 0)
                .find_map(|kv| kv.strip_prefix(b"GRANULE_ALLOCATION="))
                .map(|id| (pid, String::from_utf8_lossy(id).into_owned()))
        })
        .collect()
}

/// The pids of the processes of local allocation `id`.
fn local_pids(id: &str) -> Vec<i32> {
    all_local_allocations()
        .into_iter()
        .filter(|(_, a)| a == id)
        .map(|(pid, _)| pid)
        .collect()
}

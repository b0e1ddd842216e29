//! `granule serve`: the planner starts workers through a pool's provider (local
//! processes, a real Slurm), asks for successive allocations when lives are shorter
//! than the work, loses nothing, and leaves nothing behind; a restarted serve adopts
//! the workers it started before.

mod common;

use common::*;
use std::process::Stdio;
use std::time::Duration;

/// The spin task's environment: 20 ms items, every run recorded in `out`.
fn spin_env(job: &Job) -> Vec<(String, String)> {
    std::fs::create_dir_all(job.path("out")).unwrap();
    vec![
        ("MED_US".into(), "20000".into()),
        ("SIGMA".into(), "0".into()),
        ("OUT_DIR".into(), job.path("out").display().to_string()),
    ]
}

/// Kills, when dropped, every process whose command line names the test's folder
/// (workers serve started in sessions of their own outlive it by design).
struct Leftovers(std::path::PathBuf);

impl Leftovers {
    fn pids(&self) -> Vec<i32> {
        let needle = self.0.display().to_string();
        std::fs::read_dir("/proc")
            .unwrap()
            .filter_map(|e| e.ok()?.file_name().to_str()?.parse::<i32>().ok())
            .filter(|&pid| pid != std::process::id() as i32)
            .filter(|pid| {
                let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
                let zombie = stat
                    .rsplit_once(')')
                    .is_some_and(|(_, rest)| rest.trim_start().starts_with('Z'));
                let cmd = std::fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default();
                !zombie && String::from_utf8_lossy(&cmd).contains(&needle)
            })
            .collect()
    }

    /// Live `granule worker` processes of this test: each leads its own session
    /// (a worker's child between its fork and the task's exec has the same command
    /// line, and is not one).
    fn workers(&self) -> usize {
        self.pids()
            .iter()
            .filter(|pid| {
                let cmd = std::fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default();
                let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
                let session = stat
                    .rsplit_once(')')
                    .and_then(|(_, rest)| rest.split_whitespace().nth(3).map(str::to_string));
                cmd.split(|&b| b == 0).any(|w| w == b"worker") && session == Some(pid.to_string())
            })
            .count()
    }
}

impl Drop for Leftovers {
    fn drop(&mut self) {
        for pid in self.pids() {
            // SAFETY: killing processes this test started (they name its folder).
            unsafe { libc::kill(pid, libc::SIGKILL) };
        }
    }
}

fn pools_file(job: &Job, text: &str) {
    std::fs::write(job.path("pools.toml"), text).unwrap();
}

fn serve(job: &Job, env: &[(String, String)], extra: &[&str]) -> std::process::Command {
    let mut cmd = job.cmd(&["serve", "--pools", "pools.toml", "--interval", "500ms"]);
    cmd.args(extra)
        .envs(env.iter().map(|(k, v)| (k, v)))
        .stdout(Stdio::null())
        .stderr(Stdio::piped());
    cmd
}

/// Checks a finished job: every item done, none run twice.
fn check_exact(job: &Job, items: u64) {
    let status = job.status();
    assert_eq!(status["jobs"][0]["state"], "done", "{status}");
    let seen = job.recorded();
    assert_eq!(seen.len() as u64, items, "items run");
    let twice: Vec<_> = seen.iter().filter(|(_, &n)| n > 1).collect();
    // Items a worker ran but could not ack before its life ended may run again; a
    // worker that yields at its lifespan leaves none here.
    assert!(twice.len() as u64 <= items / 50, "run twice: {twice:?}");
}

#[test]
fn a_local_pool_takes_successive_lives_and_leaves_nothing() {
    for backend in backends("serve_local") {
        let job = Job::on(&spin_spec(750), &backend);
        let guard = Leftovers(job.dir.path().canonicalize().unwrap());
        let env = spin_env(&job);
        let out = job.output(&["submit", "job.toml"]);
        assert!(out.status.success(), "{}", stderr(&out));
        pools_file(
            &job,
            "[[pool]]\nname = \"here\"\nprovider = \"local\"\nmax_workers = 2\nwalltime = \"5s\"\nmin_walltime = \"5s\"\n",
        );
        // 15 s of work on 2 one-slot workers that live 5 s each: several lives.
        let out = output_of(&mut serve(&job, &env, &["--until-done"]));
        assert!(out.status.success(), "{}: {}", backend.name, stderr(&out));
        check_exact(&job, 750);
        let status = job.status();
        let pool = &status["pools"][0];
        assert!(
            pool["launched"].as_u64().unwrap() >= 3,
            "{}: {pool}",
            backend.name
        );
        assert!(pool["last_error"].is_null(), "{pool}");
        wait_until("the workers to leave", PATIENCE, || guard.workers() == 0);
    }
}

/// A submitted spin job of `items` and a local pool of 2 long-lived workers.
fn two_local_workers(items: u64) -> (Job, Leftovers, Vec<(String, String)>) {
    let job = Job::new(&spin_spec(items));
    let guard = Leftovers(job.dir.path().canonicalize().unwrap());
    let env = spin_env(&job);
    assert!(job.output(&["submit", "job.toml"]).status.success());
    pools_file(
        &job,
        "[[pool]]\nname = \"here\"\nprovider = \"local\"\nmax_workers = 2\nwalltime = \"10m\"\n",
    );
    (job, guard, env)
}

#[test]
fn a_restarted_serve_adopts_its_workers() {
    let (job, guard, env) = two_local_workers(1500);
    let mut first = Spawned::start(&mut serve(&job, &env, &[]));
    wait_until("two workers", PATIENCE, || guard.workers() == 2);
    // SAFETY: our own child.
    unsafe { libc::kill(first.id() as i32, libc::SIGKILL) };
    first.wait().unwrap();
    assert_eq!(guard.workers(), 2, "the workers outlive serve");
    let restarted = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_millis() as i64;
    let second = Spawned::start(&mut serve(&job, &env, &["--until-done"]));
    // Several rounds: the new serve finds both workers and starts no third.
    wait_until("a round of the new serve", PATIENCE, || {
        let s = job.status();
        s["pools"][0]["updated_ms"].as_i64().unwrap_or(0) > restarted
    });
    assert_eq!(job.status()["pools"][0]["running"], 2);
    for _ in 0..10 {
        assert!(guard.workers() <= 2, "a duplicate worker started");
        let s = job.status();
        assert_eq!(s["pools"][0]["launched"], 0, "{}", s["pools"][0]);
        std::thread::sleep(Duration::from_millis(300));
    }
    let mut second = second;
    wait_until("serve to finish", PATIENCE, || {
        second.try_wait().unwrap().is_some()
    });
    assert!(second.wait().unwrap().success());
    check_exact(&job, 1500);
    wait_until("the workers to leave", PATIENCE, || guard.workers() == 0);
}

#[test]
fn a_bad_pools_file_is_refused_with_where() {
    let job = Job::new(&spin_spec(10));
    pools_file(
        &job,
        "[[pool]]\nname = \"here\"\nprovider = \"local\"\nmax_workers = 2\nwalltme = \"5s\"\n",
    );
    let out = job.output(&["serve", "--pools", "pools.toml", "--until-done"]);
    assert_eq!(out.status.code(), Some(2), "{}", stderr(&out));
    let err = stderr(&out);
    assert!(
        err.contains("pools.toml") && err.contains("walltme"),
        "{err}"
    );
    pools_file(
        &job,
        "[[pool]]\nname = \"x\"\nprovider = \"command\"\nmax_workers = 1\n",
    );
    let out = job.output(&["serve", "--pools", "pools.toml"]);
    assert_eq!(out.status.code(), Some(2), "{}", stderr(&out));
    assert!(stderr(&out).contains("needs `start`"), "{}", stderr(&out));
}

/// The Slurm cluster `scripts/test.sh` starts, if any (under CI it must be there).
fn slurm() -> bool {
    if std::env::var_os("GRANULE_TEST_SLURM").is_some() {
        return true;
    }
    assert!(
        std::env::var("CI").as_deref() != Ok("true"),
        "GRANULE_TEST_SLURM is not set: the Slurm tests must run in CI (scripts/test.sh starts a cluster)"
    );
    eprintln!("!!! skipped: no Slurm cluster (scripts/test.sh starts one)");
    false
}

/// Slurm jobs whose name ends in `-POOL`: `(id, name)`.
fn slurm_jobs(pool: &str) -> Vec<(String, String)> {
    let out = std::process::Command::new("squeue")
        .args(["-h", "-r", "-o", "%i|%j"])
        .output()
        .unwrap();
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|l| l.split_once('|'))
        .filter(|(_, name)| name.ends_with(&format!("-{pool}")))
        .map(|(i, n)| (i.to_string(), n.to_string()))
        .collect()
}

#[test]
fn a_slurm_pool_asks_for_successive_allocations() {
    if !slurm() {
        return;
    }
    let pool = format!("slurm{}", std::process::id());
    struct Cancel(String);
    impl Drop for Cancel {
        fn drop(&mut self) {
            for (id, _) in slurm_jobs(&self.0) {
                let _ = std::process::Command::new("scancel").arg(id).status();
            }
        }
    }
    let _cancel = Cancel(pool.clone());
    let job = Job::new(&spin_spec(750));
    let _guard = Leftovers(job.dir.path().canonicalize().unwrap());
    let env = spin_env(&job);
    assert!(job.output(&["submit", "job.toml"]).status.success());
    pools_file(
        &job,
        &format!("[[pool]]\nname = \"{pool}\"\nprovider = \"slurm\"\nmax_workers = 2\nwalltime = \"5s\"\nmin_walltime = \"5s\"\n"),
    );
    let mut serve = Spawned::start(&mut serve(&job, &env, &["--until-done"]));
    wait_until("workers as Slurm jobs", PATIENCE, || {
        !slurm_jobs(&pool).is_empty()
    });
    wait_until("serve to finish", PATIENCE, || {
        serve.try_wait().unwrap().is_some()
    });
    assert!(serve.wait().unwrap().success());
    check_exact(&job, 750);
    let status = job.status();
    assert!(
        status["pools"][0]["launched"].as_u64().unwrap() >= 3,
        "{}",
        status["pools"][0]
    );
    assert!(
        slurm_jobs(&pool).is_empty(),
        "allocations left: {:?}",
        slurm_jobs(&pool)
    );
}

#[test]
fn a_command_pool_starts_lists_and_stops_through_user_scripts() {
    let job = Job::new(&spin_spec(750));
    let guard = Leftovers(job.dir.path().canonicalize().unwrap());
    let env = spin_env(&job);
    assert!(job.output(&["submit", "job.toml"]).status.success());
    std::fs::create_dir_all(job.path("pids")).unwrap();
    // What a cloud CLI wrapper would do: start the worker line detached, keep its
    // pid under the allocation's name, list the live ones, signal one to stop.
    std::fs::write(
        job.path("start.sh"),
        "setsid sh -c \"exec $GRANULE_WORKER_COMMAND\" >/dev/null 2>&1 </dev/null &\necho $! > \"pids/$GRANULE_ALLOCATION\"\n",
    )
    .unwrap();
    std::fs::write(
        job.path("list.sh"),
        "for f in pids/*; do [ -e \"$f\" ] || continue; kill -0 \"$(cat \"$f\")\" 2>/dev/null && echo \"${f#pids/} running\"; done; true\n",
    )
    .unwrap();
    std::fs::write(
        job.path("stop.sh"),
        "kill -TERM \"$(cat \"pids/$GRANULE_ALLOCATION\")\"\n",
    )
    .unwrap();
    pools_file(
        &job,
        "[[pool]]\nname = \"vm\"\nprovider = \"command\"\nmax_workers = 2\nwalltime = \"5s\"\nmin_walltime = \"5s\"\nstart = [\"sh\", \"start.sh\"]\nlist = [\"sh\", \"list.sh\"]\nstop = [\"sh\", \"stop.sh\"]\n",
    );
    let out = output_of(&mut serve(&job, &env, &["--until-done"]));
    assert!(out.status.success(), "{}", stderr(&out));
    check_exact(&job, 750);
    let pool = &job.status()["pools"][0];
    assert!(pool["launched"].as_u64().unwrap() >= 3, "{pool}");
    assert!(pool["last_error"].is_null(), "{pool}");
    wait_until("the workers to leave", PATIENCE, || guard.workers() == 0);
}

#[test]
fn a_failing_launch_is_backed_off_and_shown() {
    let job = Job::new(&spin_spec(10));
    assert!(job.output(&["submit", "job.toml"]).status.success());
    pools_file(
        &job,
        "[[pool]]\nname = \"broken\"\nprovider = \"command\"\nmax_workers = 2\nstart = [\"sh\", \"-c\", \"echo no quota >&2; exit 3\"]\nlist = [\"true\"]\nstop = [\"true\"]\n",
    );
    let _serve = Spawned::start(&mut serve(&job, &[], &[]));
    wait_until("the launch error in status", PATIENCE, || {
        job.status()["pools"][0]["last_error"][0]
            .as_str()
            .is_some_and(|e| e.contains("no quota") && e.contains("next try in"))
    });
    let out = job.output(&["status"]);
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        text.contains("broken (command, class broken)") && text.contains("no quota"),
        "{text}"
    );
    assert_eq!(job.status()["pools"][0]["launched"], 0);
}

#[test]
fn a_lost_worker_is_replaced_and_nothing_acked_runs_again() {
    let (job, guard, env) = two_local_workers(1500);
    let mut serve = Spawned::start(&mut serve(&job, &env, &["--until-done"]));
    wait_until("some work done", PATIENCE, || done(&job) > 100);
    // A lost allocation: its worker dies without a word.
    let victim = guard
        .pids()
        .into_iter()
        .find(|pid| {
            let cmd = std::fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default();
            cmd.split(|&b| b == 0).any(|w| w == b"worker")
        })
        .expect("a worker");
    // SAFETY: a worker this test's serve started.
    unsafe { libc::kill(victim, libc::SIGKILL) };
    wait_until("serve to finish", PATIENCE, || {
        serve.try_wait().unwrap().is_some()
    });
    assert!(serve.wait().unwrap().success());
    let status = job.status();
    assert_eq!(status["jobs"][0]["state"], "done", "{status}");
    assert!(
        status["pools"][0]["launched"].as_u64().unwrap() >= 3,
        "{}",
        status["pools"][0]
    );
    // Every item ran; only those in flight at the kill may have run twice.
    let seen = job.recorded();
    assert_eq!(seen.len(), 1500);
    let twice = seen.values().filter(|&&n| n > 1).count();
    assert!(twice <= 70, "{twice} items ran twice");
    wait_until("the workers to leave", PATIENCE, || guard.workers() == 0);
}

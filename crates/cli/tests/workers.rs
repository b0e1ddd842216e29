//! Separate workers sharing one state dir: lifespans, preemption notices, kills,
//! checkpoint resume and splitting. Every test checks that no item is missing and
//! none is counted twice.

mod common;

use common::*;
use std::process::{Child, Stdio};
use std::time::{Duration, Instant};

fn spawn_worker(job: &Job, args: &[&str], env: &[(&str, &str)]) -> Spawned {
    Spawned::start(
        job.cmd(&["worker", "-q"])
            .args(args)
            .envs(env.iter().copied())
            .stdout(Stdio::null())
            .stderr(Stdio::null()),
    )
}

fn job_state(job: &Job) -> String {
    job.status()["jobs"][0]["state"]
        .as_str()
        .unwrap_or("")
        .to_string()
}

fn signal(child: &Child, sig: i32) {
    // SAFETY: signalling our own child.
    unsafe { libc::kill(child.id() as i32, sig) };
}

/// A small deterministic generator for the kill schedule (seeded, printed on failure).
struct Lcg(u64);

impl Lcg {
    fn next(&mut self, n: u64) -> u64 {
        self.0 = self
            .0
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        (self.0 >> 33) % n
    }
}

/// Keeps `slots` worker processes alive (starting replacements) until the job is
/// finished; `chaos` may signal one of them now and then.
fn keep_workers(
    job: &Job,
    slots: usize,
    args: &[&str],
    env: &[(&str, &str)],
    mut chaos: impl FnMut(&mut [Spawned]),
) {
    keep_workers_calming(job, slots, args, args, env, |w| {
        chaos(w);
        true
    });
}

/// [`keep_workers`], where `chaos` says whether it goes on: once it says no,
/// replacements start with `calm_args` and nothing is signalled, so a job that
/// crawled under chaos on a loaded machine still finishes (correctness is what is
/// checked, not speed).
fn keep_workers_calming(
    job: &Job,
    slots: usize,
    args: &[&str],
    calm_args: &[&str],
    env: &[(&str, &str)],
    mut chaos: impl FnMut(&mut [Spawned]) -> bool,
) {
    let mut workers: Vec<Spawned> = (0..slots).map(|_| spawn_worker(job, args, env)).collect();
    let deadline = Instant::now() + PATIENCE;
    let mut calm = false;
    while job_state(job) == "running" {
        assert!(
            Instant::now() < deadline,
            "the job did not finish: {}",
            job.status()
        );
        for w in workers.iter_mut() {
            if w.try_wait().unwrap().is_some() {
                *w = spawn_worker(job, if calm { calm_args } else { args }, env);
            }
        }
        calm = calm || !chaos(&mut workers);
        std::thread::sleep(Duration::from_millis(20));
    }
    for mut w in workers {
        let _ = w.wait();
    }
}

fn assert_all_done_once(job: &Job, items: u64) -> std::collections::BTreeMap<u64, u32> {
    let status = job.status();
    assert_eq!(status["jobs"][0]["state"], "done", "{status}");
    let s = stage(&status, 0);
    assert_eq!(s["done"], items, "exactly-once accounting: {s}");
    assert_eq!(s["pending"], 0);
    assert_eq!(s["running"], 0);
    let recorded = job.recorded();
    let missing: Vec<u64> = (0..items)
        .filter(|i| !recorded.contains_key(i))
        .take(5)
        .collect();
    assert!(missing.is_empty(), "items never run: {missing:?}");
    recorded
}

fn spin_job(items: u64, backend: &Backend) -> (Job, String) {
    let job = Job::on(&spin_spec(items), backend);
    std::fs::create_dir(job.path("out")).unwrap();
    let out = job.path("out").to_str().unwrap().to_string();
    let submitted = job.output(&["submit", "job.toml"]);
    assert!(submitted.status.success(), "{}", stderr(&submitted));
    (job, out)
}

#[test]
fn short_lived_workers_drain_a_job_many_lifespans_long() {
    // 2 s lives: on a loaded machine the task's interpreter (a version manager's
    // shim) took 0.9 s to start, and 1 s lives did almost nothing.
    let items = 80_000;
    let (job, out) = spin_job(items, &Backend::sqlite());
    let env = [
        ("MED_US", "100"),
        ("SIGMA", "0.5"),
        ("OUT_DIR", out.as_str()),
    ];
    keep_workers(&job, 2, &["--slots", "1", "--lifespan", "2s"], &env, |_| {});
    let recorded = assert_all_done_once(&job, items);
    let twice: u32 = recorded.values().map(|n| n - 1).sum();
    assert!(u64::from(twice) < items / 20, "{twice} items ran twice");
    let workers = job.status()["workers"].as_array().unwrap().len();
    assert!(
        workers > 2,
        "the job outlived its first workers ({workers} seen)"
    );
}

#[test]
fn workers_killed_at_random_lose_nothing() {
    for backend in backends("workers_killed_at_random_lose_nothing") {
        let (job, out) = spin_job(30_000, &backend);
        let env = [
            ("MED_US", "100"),
            ("SIGMA", "0.5"),
            ("OUT_DIR", out.as_str()),
        ];
        let mut rng = Lcg(0x5eed);
        let mut next_kill = Instant::now() + Duration::from_millis(300);
        let mut kills = 0;
        keep_workers(
            &job,
            2,
            &["--slots", "1", "--grace", "1s", "--lease", "3s"],
            &env,
            |workers| {
                if Instant::now() >= next_kill {
                    let victim = &workers[rng.next(workers.len() as u64) as usize];
                    signal(
                        victim,
                        if kills % 2 == 0 {
                            libc::SIGTERM
                        } else {
                            libc::SIGKILL
                        },
                    );
                    kills += 1;
                    next_kill = Instant::now() + Duration::from_millis(200 + rng.next(500));
                }
            },
        );
        assert!(kills >= 2, "the chaos did not happen");
        assert_all_done_once(&job, 30_000);
    }
}

fn sum_spec(items: u64) -> String {
    let script =
        std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../../examples/running_sum.py");
    format!(
        "name = \"sum\"\n[[stage]]\nname = \"sum\"\ncommand = [\"python3\", \"{}\"]\nitems = {{ range = [0, {items}] }}\n",
        script.canonicalize().unwrap().display()
    )
}

fn results_sum(job: &Job) -> (u64, u64) {
    let out = job.output(&["results", "sum"]);
    assert!(out.status.success(), "{}", stderr(&out));
    String::from_utf8(out.stdout)
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str::<(u64, u64)>(l).unwrap())
        .fold((0, 0), |(t, c), (dt, dc)| (t + dt, c + dc))
}

#[test]
fn a_stateful_task_gives_the_right_answer_across_preemptions() {
    for backend in backends("a_stateful_task_gives_the_right_answer_across_preemptions") {
        let items = 3_000u64;
        let job = Job::on(&sum_spec(items), &backend);
        assert!(job.output(&["submit", "job.toml"]).status.success());
        let state_dir = job.path("states");
        std::fs::create_dir(&state_dir).unwrap();
        let env = [
            ("ITEM_SECONDS", "0.001"),
            ("STATE_DIR", state_dir.to_str().unwrap()),
        ];
        let mut rng = Lcg(42);
        let mut next_term = Instant::now() + Duration::from_millis(400);
        let mut terms = 0;
        // 30 SIGTERMs (~15 s) among 1.5 s lives, then workers that live: under
        // heavy load a 1.5 s life spent most of itself starting the interpreter,
        // and the job crawled past any deadline.
        keep_workers_calming(
            &job,
            2,
            &["--slots", "1", "--lifespan", "1500ms", "--grace", "2s"],
            &["--slots", "1", "--grace", "2s"],
            &env,
            |workers| {
                if terms >= 30 {
                    return false;
                }
                if Instant::now() >= next_term {
                    signal(&workers[rng.next(2) as usize], libc::SIGTERM);
                    terms += 1;
                    next_term = Instant::now() + Duration::from_millis(300 + rng.next(400));
                }
                true
            },
        );
        assert!(terms >= 2);
        let status = job.status();
        let s = stage(&status, 0);
        assert_eq!(s["done"], items);
        assert!(
            s["yields"].as_u64().unwrap() >= 1,
            "no fragment was ever preempted: {s}"
        );
        let (total, count) = results_sum(&job);
        assert_eq!(count, items, "every item is in exactly one result");
        assert_eq!(total, items * (items - 1) / 2);
    }
}

#[test]
fn a_corrupt_checkpoint_falls_back_and_is_reported() {
    let items = 1_500u64;
    // One big first fragment that checkpoints every 50 items.
    let job = Job::new(&format!("{}initial = 1000\n", sum_spec(items)));
    let state_dir = job.path("states");
    std::fs::create_dir(&state_dir).unwrap();
    let env = [
        ("ITEM_SECONDS", "0.002"),
        ("CHECKPOINT_EVERY", "50"),
        ("STATE_DIR", state_dir.to_str().unwrap()),
    ];
    let mut run = Spawned::start(
        job.cmd(&["run", "job.toml", "--slots", "1", "-q"])
            .envs(env),
    );
    wait_until("three checkpoints", PATIENCE, || {
        stage(&job.status(), 0)["checkpoints"].as_u64() >= Some(3)
    });
    run.kill().unwrap();
    run.wait().unwrap();
    // Flip bytes of the newest checkpoint, as a bad disk would.
    let db = job.path(".granule/granule.db");
    let corrupt = std::process::Command::new("python3")
        .args(["-c", "import sqlite3,sys; c=sqlite3.connect(sys.argv[1]); c.execute(\"UPDATE blobs SET data = zeroblob(length(data)) WHERE id = (SELECT max(id) FROM blobs)\"); c.commit()"])
        .arg(&db)
        .status()
        .unwrap();
    assert!(corrupt.success());
    let out = job.run(&[], &env);
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(
        stderr(&out).contains("unusable"),
        "the fallback is shown: {}",
        stderr(&out)
    );
    let s = stage(&job.status(), 0).clone();
    assert_eq!(
        s["done"], items,
        "accounting is untouched by the bad blob: {s}"
    );
    assert!(s["checkpoint_fallbacks"].as_u64().unwrap() >= 1, "{s}");
    let (_, count) = results_sum(&job);
    // The state of up to one checkpoint interval was lost with the bad blob.
    assert!(count <= items && count >= items - 2 * 50, "{count}");
}

#[test]
fn an_idle_worker_splits_a_running_fragment_and_no_item_runs_twice() {
    for backend in backends("an_idle_worker_splits_a_running_fragment_and_no_item_runs_twice") {
        let items = 2_000u64;
        let spec = format!(
            "{}initial = {items}\n[stage.sizer]\ntail_factor = 1.0\n",
            spin_spec(items)
        );
        let job = Job::on(&spec, &backend);
        std::fs::create_dir(job.path("out")).unwrap();
        let out = job.path("out").to_str().unwrap().to_string();
        assert!(job.output(&["submit", "job.toml"]).status.success());
        // 10 s of work: long enough that a second worker started on a loaded
        // machine (a second or more to start) still finds the first one's
        // fragment with unfed items to split off.
        let env = [
            ("MED_US", "5000"),
            ("SIGMA", "0"),
            ("OUT_DIR", out.as_str()),
        ];
        let mut first = spawn_worker(&job, &["--slots", "1"], &env);
        // The first worker, alone, takes every item in one fragment.
        wait_until("one fragment holding everything", PATIENCE, || {
            let s = stage(&job.status(), 0).clone();
            s["running_fragments"] == 1 && s["pending"] == 0 && s["done"].as_u64() > Some(10)
        });
        let mut second = spawn_worker(&job, &["--slots", "1"], &env);
        first.wait().unwrap();
        second.wait().unwrap();
        let recorded = assert_all_done_once(&job, items);
        let twice: Vec<_> = recorded.iter().filter(|(_, n)| **n > 1).take(5).collect();
        assert!(twice.is_empty(), "items run twice after a split: {twice:?}");
        let status = job.status();
        assert!(
            stage(&status, 0)["splits"].as_u64().unwrap() >= 1,
            "{status}"
        );
        let done_by: Vec<u64> = status["workers"]
            .as_array()
            .unwrap()
            .iter()
            .map(|w| w["fragments_done"].as_u64().unwrap())
            .collect();
        assert!(
            done_by.iter().all(|&n| n > 0),
            "both workers did work: {done_by:?}"
        );
    }
}

#[test]
fn workers_describe_detected_and_declared_resources() {
    for backend in backends("workers_describe") {
        let job = Job::on("name = \"d\"\n[[stage]]\nname = \"s\"\ncommand = [\"true\"]\nitems = { range = [0, 3] }\n", &backend);
        // A stand-in for the NVIDIA tool, answering the query granule makes.
        let bin = job.path("bin");
        std::fs::create_dir(&bin).unwrap();
        let smi = bin.join("nvidia-smi");
        std::fs::write(
            &smi,
            "#!/bin/sh\necho 'NVIDIA H100 80GB HBM3, 81559'\necho 'NVIDIA H100 80GB HBM3, 81559'\n",
        )
        .unwrap();
        std::fs::set_permissions(&smi, std::os::unix::fs::PermissionsExt::from_mode(0o755))
            .unwrap();
        let path = format!("{}:{}", bin.display(), std::env::var("PATH").unwrap());
        assert!(job.output(&["submit", "job.toml"]).status.success());
        let out = output_of(
            job.cmd(&[
                "worker",
                "-q",
                "--class",
                "gpu",
                "--cost",
                "2.5",
                "--spot",
                "--resource",
                "licenses=4",
            ])
            .env("PATH", &path),
        );
        assert!(out.status.success(), "{}: {}", backend.name, stderr(&out));
        let status = job.status();
        let w = &status["workers"][0];
        assert_eq!(w["class"], "gpu", "{}: {w}", backend.name);
        assert_eq!(w["cost_per_hour"], 2.5);
        assert_eq!(w["spot"], true);
        assert_eq!(w["resources"]["custom"]["licenses"], 4.0);
        assert_eq!(w["resources"]["gpus"].as_array().unwrap().len(), 2, "{w}");
        assert_eq!(w["resources"]["gpus"][0]["memory_mb"], 81559);
        assert!(
            w["resources"]["cpus"].as_u64().unwrap() >= 1
                && w["resources"]["memory_mb"].as_u64().unwrap() > 0
        );
        let bad = job.output(&["worker", "--resource", "licenses"]);
        assert_eq!(
            bad.status.code(),
            Some(2),
            "a malformed resource is bad input"
        );
    }
}

#[test]
fn stages_run_only_where_their_class_and_resources_fit() {
    for backend in backends("placement") {
        let spec = "name = \"place\"\n[[stage]]\nname = \"render\"\ncommand = [\"true\"]\nitems = { range = [0, 5] }\ngpus = 1\n[[stage]]\nname = \"index\"\ncommand = [\"true\"]\nitems = { range = [0, 5] }\nclass = \"cpu\"\nresources = { licenses = 1 }\n";
        let job = Job::on(spec, &backend);
        assert!(job.output(&["submit", "job.toml"]).status.success());
        // A CPU worker without GPUs runs the index stage only.
        let cpu = job.output(&[
            "worker",
            "-q",
            "--class",
            "cpu",
            "--resource",
            "licenses=1",
            "--idle-exit",
            "1s",
        ]);
        assert!(cpu.status.success(), "{}: {}", backend.name, stderr(&cpu));
        let status = job.status();
        assert_eq!(stage(&status, 1)["done"], 5, "{}: {status}", backend.name);
        assert_eq!(
            stage(&status, 0)["pending"],
            5,
            "{}: the GPU stage waits for a GPU",
            backend.name
        );
        let explain = job.output(&["status", "--explain", "render"]);
        let text = String::from_utf8_lossy(&explain.stdout).into_owned();
        assert!(
            text.contains("does not fit: needs 1 gpus"),
            "{}: {text}",
            backend.name
        );
        // A GPU worker (two GPUs, as nvidia-smi reports them) takes the rest.
        let bin = job.path("bin");
        std::fs::create_dir(&bin).unwrap();
        let smi = bin.join("nvidia-smi");
        std::fs::write(
            &smi,
            "#!/bin/sh\necho 'NVIDIA H100 80GB HBM3, 81559'\necho 'NVIDIA H100 80GB HBM3, 81559'\n",
        )
        .unwrap();
        std::fs::set_permissions(&smi, std::os::unix::fs::PermissionsExt::from_mode(0o755))
            .unwrap();
        let path = format!("{}:{}", bin.display(), std::env::var("PATH").unwrap());
        let gpu = output_of(
            job.cmd(&["worker", "-q", "--class", "gpu", "--slots", "2"])
                .env("PATH", &path),
        );
        assert!(gpu.status.success(), "{}", stderr(&gpu));
        let status = job.status();
        assert_eq!(
            status["jobs"][0]["state"], "done",
            "{}: {status}",
            backend.name
        );
        assert_eq!(stage(&status, 0)["done"], 5);
    }
}

/// Takes 20 ms per item, three times that on a worker of class `slow`; acks each.
/// It waits rather than spins: on a machine loaded by other programs a spin's wall
/// time stretches by however much CPU it gets, and the classes' ratio with it.
const CLASSED_TASK: &str = r#"
import os, sys, time
cost = 0.02 * (3 if os.environ.get("GRANULE_CLASS") == "slow" else 1)
ack = os.fdopen(3, "w", buffering=1)
for line in sys.stdin:
    time.sleep(cost)
    ack.write(line)
"#;

#[test]
fn two_classes_share_a_stage_each_sized_by_what_it_learned() {
    // A 3 s target: on a loaded machine the interpreter takes a second or more to
    // start, and with a target near that start-up both classes' sizes meet the
    // same floor instead of following their costs.
    let spec = "name = \"shard\"\n[[stage]]\nname = \"work\"\ncommand = [\"python3\", \"task.py\"]\nitems = { range = [0, 900] }\ntarget = \"3s\"\n";
    let job = Job::new(spec);
    std::fs::write(job.path("task.py"), CLASSED_TASK).unwrap();
    assert!(job.output(&["submit", "job.toml"]).status.success());
    let fast = spawn_worker(&job, &["--class", "fast", "--slots", "1"], &[]);
    let slow = spawn_worker(&job, &["--class", "slow", "--slots", "1"], &[]);
    for mut w in [fast, slow] {
        let deadline = Instant::now() + PATIENCE;
        while w.try_wait().unwrap().is_none() {
            assert!(
                Instant::now() < deadline,
                "worker did not exit: {}",
                job.status()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }
    let status = job.status();
    assert_eq!(status["jobs"][0]["state"], "done", "{status}");
    assert_eq!(stage(&status, 0)["done"], 900);
    let classes = stage(&status, 0)["classes"].as_array().unwrap().clone();
    let find = |name: &str| classes.iter().find(|c| c["class"] == name).unwrap().clone();
    let (f, s) = (find("fast"), find("slow"));
    // Both classes took part in the stage (it was sharded across them)...
    assert!(
        f["items"].as_u64().unwrap() > 0 && s["items"].as_u64().unwrap() > 0,
        "{status}"
    );
    // ... each learned its own per-item cost (about 3x apart) ...
    let ratio = s["item_cost_us"].as_f64().unwrap() / f["item_cost_us"].as_f64().unwrap();
    assert!((2.0..4.5).contains(&ratio), "cost ratio {ratio}: {status}");
    // ... and sized its fragments by it: the slow class takes fewer items each.
    let per_fragment =
        |c: &serde_json::Value| c["items"].as_f64().unwrap() / c["fragments"].as_f64().unwrap();
    assert!(per_fragment(&s) < per_fragment(&f), "{status}");
    assert!(
        f["items"].as_u64().unwrap() > s["items"].as_u64().unwrap(),
        "{status}"
    );
}

/// A worker row as another process would leave it: `host` and `locality` say where
/// its pid means something; the pid is one no process has.
fn ghost(store: &mut dyn granule_store::Store, id: &str, host: &str, locality: &str) -> u64 {
    use granule_store::{ClaimRequest, WorkerInfo};
    let info = WorkerInfo {
        id: id.into(),
        host: host.into(),
        pid: 1 << 30,
        proc_start: 1,
        slots: 1,
        class: "default".into(),
        lifespan_end_ms: None,
        cost_per_hour: 0.0,
        spot: false,
        resources: "{}".into(),
        locality: locality.into(),
        allocation: None,
    };
    let now_ms = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_millis() as i64;
    store.register_worker(&info, now_ms).unwrap();
    let job = store.job("ghosts").unwrap().expect("submitted").id;
    let req = ClaimRequest {
        job: Some(job),
        worker: id.into(),
        class: "default".into(),
        now_ms,
        lease_ms: 3_600_000,
        slots: 1,
        max_items: Some(5),
        offer: Default::default(),
        context: granule_core::ClaimContext {
            remaining: 0,
            slots: 1,
            free_memory: 1.0,
            load_per_cpu: 0.0,
            splits: false,
            all_or_nothing_margin_ms: 0.0,
            acking: false,
            lifespan_ms: None,
        },
        expected_life_ms: None,
    };
    store.claim(&req).unwrap().expect("the ghost claims").n
}

#[test]
fn a_worker_takes_back_work_of_dead_workers_only_where_their_pids_mean_something() {
    let job = Job::new(
        "name = \"ghosts\"\n[[stage]]\nname = \"s\"\ncommand = [\"true\"]\n\
         items = { range = [0, 20] }\n",
    );
    let out = job.output(&["submit", "job.toml"]);
    assert!(out.status.success(), "{}", stderr(&out));
    let host = std::fs::read_to_string("/proc/sys/kernel/hostname")
        .unwrap()
        .trim()
        .to_string();
    let here = format!(
        "{}/{}",
        std::fs::read_to_string("/proc/sys/kernel/random/boot_id")
            .unwrap()
            .trim(),
        std::fs::read_link("/proc/self/ns/pid").unwrap().display()
    );
    let twin;
    {
        let path = job.path(".granule/granule.db");
        let mut store = granule_store::SqliteStore::open(&path).unwrap();
        // Same hostname, another machine (or container): its pid says nothing here.
        twin = ghost(&mut store, "twin", &host, "another-boot/pid:[1]");
        // This machine, a pid that is gone: its work comes back at once.
        ghost(&mut store, "gone", &host, &here);
    }
    let out = job.output(&["worker", "-q", "--idle-exit", "1s"]);
    assert!(out.status.success(), "{}", stderr(&out));
    let s = stage(&job.status(), 0).clone();
    assert_eq!(
        s["done"],
        20 - twin,
        "the dead local worker's items ran: {s}"
    );
    assert_eq!(
        s["running_fragments"], 1,
        "the twin's fragment waits for its lease: {s}"
    );
}

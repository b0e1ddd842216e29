//! Exactly once at the edges (issue 9), end to end: each numbered case of the issue
//! tried as a new user and as an adversary would, on both backends where the store
//! is involved. Each ends in the right result or a clear refusal, never a silent
//! "done".

mod common;

use common::*;
use std::process::Stdio;
use std::time::{Duration, Instant};

/// A one-stage job of `command` (a TOML array) over `items` (a TOML inline table).
fn one_stage(name: &str, command: &str, items: &str, extra: &str) -> String {
    format!(
        "name = \"{name}\"\n[[stage]]\nname = \"s\"\ncommand = {command}\nitems = {items}\n{extra}\n"
    )
}

/// `granule run job.toml` with one slot (fragments run one after another).
fn run_one_slot(job: &Job, extra: &[&str], env: &[(&str, &str)]) -> std::process::Output {
    let mut cmd = job.cmd(&["run", "job.toml", "--slots", "1"]);
    cmd.args(extra).envs(env.iter().copied());
    output_of(&mut cmd)
}

fn state_of(job: &Job) -> String {
    job.status()["jobs"][0]["state"]
        .as_str()
        .unwrap_or("")
        .to_string()
}

#[test]
fn case1_a_task_that_acks_only_some_items_has_the_others_quarantined() {
    for backend in backends("case1") {
        let script = "while read -r x; do if [ $((x % 2)) -eq 0 ]; then echo $x >&3; fi; done";
        let job = Job::on(
            &one_stage(
                "evens",
                &format!("[\"sh\", \"-c\", \"{script}\"]"),
                "{ range = [0, 100] }",
                "",
            ),
            &backend,
        );
        let out = job.run(&[], &[]);
        assert_eq!(
            out.status.code(),
            Some(1),
            "{}: {}",
            backend.name,
            stderr(&out)
        );
        let s = stage(&job.status(), 0).clone();
        assert_eq!(
            (s["done"].as_u64(), s["quarantined"].as_u64()),
            (Some(50), Some(50)),
            "{}: {s}",
            backend.name
        );
        let odd: Vec<[u64; 2]> = (0..50).map(|i| [2 * i + 1, 2 * i + 2]).collect();
        let quarantined: Vec<[u64; 2]> =
            serde_json::from_value(s["quarantined_items"].clone()).unwrap();
        assert_eq!(quarantined, odd, "{}", backend.name);
    }
}

#[test]
fn case2_lines_that_are_not_utf8_are_items_like_any_other() {
    let input = b"a\nb\n\xff\xfe bad\nc\nd\n";
    for backend in backends("case2") {
        let spec = "name = \"bytes\"
[[stage]]
name = \"batch\"
command = [\"sh\", \"-c\", \"cat >> batch.out\"]
items = { lines = \"items.txt\" }
[[stage]]
name = \"each\"
command = [\"sh\", \"-c\", \"printf '%s\\\\n' \\\"$1\\\" >> each.out\", \"sh\", \"{}\"]
per_item = true
items = { lines = \"items.txt\" }
[[stage]]
name = \"picky\"
command = [\"sh\", \"-c\", \"case \\\"$1\\\" in *bad*) exit 3;; esac\", \"sh\", \"{}\"]
per_item = true
items = { lines = \"items.txt\" }
";
        let job = Job::on(spec, &backend);
        std::fs::write(job.path("items.txt"), input).unwrap();
        let out = run_one_slot(&job, &[], &[]);
        // Every line reached both commands, bytes intact; the one command that
        // refuses the odd line has that line (and only it) quarantined.
        assert_eq!(
            out.status.code(),
            Some(1),
            "{}: {}",
            backend.name,
            stderr(&out)
        );
        assert_eq!(
            std::fs::read(job.path("batch.out")).unwrap(),
            input,
            "{}",
            backend.name
        );
        assert_eq!(
            std::fs::read(job.path("each.out")).unwrap(),
            input,
            "{}",
            backend.name
        );
        let status = job.status();
        assert_eq!(stage(&status, 0)["done"], 5, "{}", backend.name);
        assert_eq!(stage(&status, 1)["done"], 5, "{}", backend.name);
        assert_eq!(stage(&status, 2)["done"], 4, "{}", backend.name);
        assert_eq!(
            stage(&status, 2)["quarantined_items"],
            serde_json::json!([[2, 3]])
        );
    }
}

#[test]
fn case3_every_fd3_line_written_before_exit_is_applied_or_the_fragment_fails() {
    // A checkpoint that is a FIFO (never read) or too big fails its fragment, and the
    // acks written with it do not count: nothing is done without its state.
    for (what, setup, expect) in [
        ("fifo", "mkfifo $state", "not a regular file"),
        (
            "big",
            "head -c 3000000 /dev/zero > $state",
            "max_checkpoint",
        ),
    ] {
        let script = format!(
            "state=state.$GRANULE_FRAGMENT; {setup}; while read -r x; do printf '%s\\\\n%s checkpoint %s\\\\n' $x \\\"$GRANULE_CMD\\\" $state >&3; done"
        );
        let job = Job::new(&one_stage(
            what,
            &format!("[\"sh\", \"-c\", \"{script}\"]"),
            "{ range = [0, 2] }",
            "max_checkpoint = \"1MiB\"",
        ));
        let out = job.run(&[], &[]);
        assert_eq!(out.status.code(), Some(1), "{what}: {}", stderr(&out));
        let s = stage(&job.status(), 0).clone();
        assert_eq!(
            (s["done"].as_u64(), s["quarantined"].as_u64()),
            (Some(0), Some(2)),
            "{what}: {s}"
        );
        let logs = String::from_utf8_lossy(&job.output(&["logs", "s"]).stdout).into_owned();
        assert!(logs.contains(expect), "{what}: {logs}");
    }
    // A checkpoint that takes seconds to seal is waited for, not dropped.
    let job = Job::new(&one_stage(
        "slow",
        "[\"sh\", \"-c\", \"read -r x; printf '%s\\\\n%s checkpoint state\\\\n' $x \\\"$GRANULE_CMD\\\" >&3\"]",
        "{ range = [0, 1] }",
        "",
    ));
    let text: Vec<u8> = (0..500_000u64)
        .flat_map(|i| format!("{:07}\n", (i * 7919) % 9_999_991).into_bytes())
        .collect();
    std::fs::write(job.path("state"), &text).unwrap();
    let out = job.run(&["--zstd-level", "19"], &[]);
    assert!(out.status.success(), "{}", stderr(&out));
    let results = job.output(&["results", "s"]);
    assert!(results.status.success(), "{}", stderr(&results));
    assert_eq!(results.stdout, text, "the result is the whole checkpoint");
}

#[test]
fn case4_an_items_file_changed_after_submit_is_refused_naming_it() {
    for backend in backends("case4") {
        for change in ["prepend", "truncate"] {
            let job = Job::on(
                &one_stage(
                    &format!("lines-{change}"),
                    "[\"sh\", \"-c\", \"cat >> out\"]",
                    "{ lines = \"items.txt\" }",
                    "",
                ),
                &backend,
            );
            let lines: String = (0..100).map(|i| format!("line {i}\n")).collect();
            std::fs::write(job.path("items.txt"), &lines).unwrap();
            assert!(job.output(&["submit", "job.toml"]).status.success());
            let changed = match change {
                "prepend" => format!("new 1\nnew 2\n{lines}"),
                _ => "line 0\nline 1\n".to_string(),
            };
            std::fs::write(job.path("items.txt"), changed).unwrap();
            let worker = job.output(&["worker", "--slots", "1"]);
            assert!(
                worker.status.success(),
                "{}: {}",
                backend.name,
                stderr(&worker)
            );
            let all = job.status();
            let status = all["jobs"]
                .as_array()
                .unwrap()
                .iter()
                .find(|j| j["name"] == format!("lines-{change}"))
                .unwrap_or_else(|| panic!("{all}"));
            assert_eq!(
                status["state"], "refused",
                "{}/{change}: {status}",
                backend.name
            );
            let error = status["error"].as_str().unwrap_or("").to_string();
            assert!(
                error.contains("items.txt") && error.contains("changed"),
                "{error}"
            );
            assert_eq!(status["stages"][0]["done"], 0, "{}/{change}", backend.name);
            assert!(!job.path("out").exists(), "nothing ran the wrong lines");
            // Running it again names the file too, and runs nothing.
            let out = job.run(&[], &[]);
            assert_eq!(out.status.code(), Some(2), "{}", stderr(&out));
            assert!(stderr(&out).contains("items.txt"), "{}", stderr(&out));
            // Restored as submitted, the job runs again where it stopped.
            std::fs::write(job.path("items.txt"), &lines).unwrap();
            let out = job.run(&[], &[]);
            assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
            let mut ran: Vec<String> = std::fs::read_to_string(job.path("out"))
                .unwrap()
                .lines()
                .map(String::from)
                .collect();
            ran.sort_by_key(|l| l[5..].parse::<u32>().unwrap());
            assert_eq!(ran.join("\n") + "\n", lines, "{}/{change}", backend.name);
        }
    }
}

/// A stateful task (a running sum, checkpointed every 10 items with its acks) that
/// also fails on its first attempt at some items and acks some items alone, with
/// no checkpoint after them.
const FLAKY_SUM: &str = r#"
import json, os, sys, time
ack = os.fdopen(3, "w")
cmd, fragment = os.environ["GRANULE_CMD"], os.environ["GRANULE_FRAGMENT"]
state_dir, attempt = os.environ["STATE_DIR"], int(os.environ["GRANULE_ATTEMPT"])
total, count = 0, 0
if os.environ.get("GRANULE_CHECKPOINT"):
    total, count = json.load(open(os.environ["GRANULE_CHECKPOINT"]))
def checkpoint(pending):
    path = os.path.join(state_dir, f"sum-{fragment}-{count}.json")
    with open(path + ".tmp", "w") as f:
        json.dump([total, count], f)
    os.rename(path + ".tmp", path)
    ack.write("".join(pending) + f"{cmd} checkpoint {path}\n")
    ack.flush()
pending = []
for line in sys.stdin:
    time.sleep(0.01)
    v = int(line)
    total += v
    count += 1
    if v % 13 == 0:
        ack.write(line)  # acked alone: its state is only in memory until the next checkpoint
        ack.flush()
    else:
        pending.append(line)
    if len(pending) >= 10:
        checkpoint(pending)
        pending = []
    if attempt == 1 and v % 97 == 96:
        sys.exit(3)
checkpoint(pending)
"#;

/// Runs SQL against the job's store (the embedded file, or PostgreSQL).
fn sql(job: &Job, backend: &Backend, statement: &str) {
    let status = match &backend.url {
        Some(url) => std::process::Command::new("psql")
            .args([url.as_str(), "-q", "-c", statement])
            .status()
            .unwrap(),
        None => std::process::Command::new("python3")
            .args([
                "-c",
                "import sqlite3,sys; c=sqlite3.connect(sys.argv[1]); c.execute(sys.argv[2]); c.commit()",
            ])
            .arg(job.path(".granule/granule.db"))
            .arg(statement)
            .status()
            .unwrap(),
    };
    assert!(status.success(), "{statement}");
}

/// One round of case 5: a worker runs until it checkpoints mid-fragment, is
/// preempted (a notice on odd rounds, a kill on even ones), then checkpoints are
/// lost: every one a remainder could resume from is corrupted, or the newest is
/// deleted (a result, a chain's final state, is never touched: losing it would lose
/// the answer).
fn preempt_and_lose_checkpoints(job: &Job, backend: &Backend, env: &[(&str, &str)], round: u32) {
    let mut worker = Spawned::start(
        job.cmd(&["worker", "-q", "--slots", "2", "--grace", "3s"])
            .envs(env.iter().copied())
            .stdout(Stdio::null())
            .stderr(Stdio::null()),
    );
    // Let it checkpoint mid-fragment, then preempt it (a notice, or a kill).
    let checkpoints = |job: &Job| stage(&job.status(), 0)["checkpoints"].as_u64().unwrap_or(0);
    let before = checkpoints(job);
    let progressed = Instant::now() + PATIENCE;
    while worker.try_wait().unwrap().is_none()
        && checkpoints(job) <= before
        && Instant::now() < progressed
    {
        std::thread::sleep(Duration::from_millis(20));
    }
    let signal = if round % 2 == 1 {
        libc::SIGTERM
    } else {
        libc::SIGKILL
    };
    // SAFETY: signalling our own child.
    unsafe { libc::kill(worker.id() as i32, signal) };
    assert!(worker.wait().is_ok());
    // Then lose checkpoints: every one a remainder could resume from is
    // corrupted, or the newest is deleted (a result, a chain's final state,
    // is never touched: losing it would lose the answer).
    let resumable = "(SELECT id FROM blobs WHERE id NOT IN
         (SELECT result FROM fragments WHERE result IS NOT NULL))";
    sql(
        job,
        backend,
        &if round.is_multiple_of(2) {
            format!("DELETE FROM blobs WHERE id = (SELECT max(id) FROM {resumable} r)")
        } else if backend.url.is_some() {
            format!("UPDATE blobs SET data = '\\x00' WHERE id IN {resumable}")
        } else {
            format!("UPDATE blobs SET data = zeroblob(length(data)) WHERE id IN {resumable}")
        },
    );
}

/// The stage's results are one (sum, count) per chain that add up to the sum and
/// count of `0..items`: every item's state counted exactly once.
fn assert_sums_to(job: &Job, backend: &Backend, items: u64, s: &serde_json::Value) {
    let out = job.output(&["results", "s"]);
    assert!(out.status.success(), "{}: {}", backend.name, stderr(&out));
    let (total, count) = String::from_utf8(out.stdout)
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str::<(u64, u64)>(l).unwrap())
        .fold((0, 0), |(t, c), (dt, dc)| (t + dt, c + dc));
    assert_eq!(
        (total, count),
        (items * (items - 1) / 2, items),
        "{}: {s}",
        backend.name
    );
}

#[test]
fn case5_stateful_results_are_exact_after_failures_preemptions_and_lost_checkpoints() {
    for backend in backends("case5") {
        let items = 400u64;
        let job = Job::on(
            &one_stage(
                "flaky",
                "[\"python3\", \"flaky_sum.py\"]",
                &format!("{{ range = [0, {items}] }}"),
                "initial = 40",
            ),
            &backend,
        );
        std::fs::write(job.path("flaky_sum.py"), FLAKY_SUM).unwrap();
        let states = job.path("states");
        std::fs::create_dir(&states).unwrap();
        let env = [("STATE_DIR", states.to_str().unwrap())];
        assert!(job.output(&["submit", "job.toml"]).status.success());
        let deadline = Instant::now() + 2 * PATIENCE;
        let mut round = 0;
        while state_of(&job) == "running" {
            assert!(
                Instant::now() < deadline,
                "{}: {}",
                backend.name,
                job.status()
            );
            round += 1;
            preempt_and_lose_checkpoints(&job, &backend, &env, round);
            if round >= 8 {
                // Enough faults: let it finish.
                let out = output_of(job.cmd(&["worker", "-q", "--slots", "2"]).envs(env));
                assert!(out.status.success(), "{}", stderr(&out));
            }
        }
        let status = job.status();
        assert_eq!(
            status["jobs"][0]["state"], "done",
            "{}: {status}",
            backend.name
        );
        let s = stage(&status, 0);
        assert_eq!(s["done"], items, "{}: {s}", backend.name);
        assert!(
            s["checkpoint_fallbacks"].as_u64() > Some(0),
            "{}: no fallback happened: {s}",
            backend.name
        );
        assert_sums_to(&job, &backend, items, s);
    }
}

#[test]
fn case6_an_item_that_reads_like_a_command_is_just_an_item() {
    for backend in backends("case6") {
        let job = Job::on(
            &one_stage(
                "sneaky",
                "[\"sh\", \"-c\", \"while IFS= read -r x; do printf '%s\\\\n' \\\"$x\\\" >&3; done\"]",
                "{ list = [\"checkpoint /etc/passwd\", \"x\"] }",
                "",
            ),
            &backend,
        );
        let out = job.run(&[], &[]);
        assert!(out.status.success(), "{}: {}", backend.name, stderr(&out));
        let s = stage(&job.status(), 0).clone();
        assert_eq!(
            (s["done"].as_u64(), s["checkpoints"].as_u64()),
            (Some(2), Some(0)),
            "{s}"
        );
        let results = job.output(&["results", "s"]);
        assert!(
            results.stdout.is_empty(),
            "nothing was read as a checkpoint"
        );
    }
}

#[test]
fn case7_a_runaway_fd3_line_and_a_device_checkpoint_fail_with_a_clear_cause() {
    for (what, script, expect) in [
        (
            "runaway",
            "head -c 40000000 /dev/zero | tr '\\\\0' x >&3",
            "longer than",
        ),
        (
            "zero",
            "read -r x; echo \\\"$GRANULE_CMD checkpoint /dev/zero\\\" >&3",
            "not a regular file",
        ),
    ] {
        let job = Job::new(&one_stage(
            what,
            &format!("[\"sh\", \"-c\", \"{script}\"]"),
            "{ range = [0, 1] }",
            "",
        ));
        let out = job.run(&[], &[]);
        assert_eq!(out.status.code(), Some(1), "{what}: {}", stderr(&out));
        let logs = String::from_utf8_lossy(&job.output(&["logs", "s"]).stdout).into_owned();
        assert!(logs.contains(expect), "{what}: {logs}");
    }
}

#[test]
fn case8_a_poison_item_costs_three_failed_fragments_and_unfed_items_no_failure() {
    // The first fragment holds 500 items; the task dies at item 137 with a window of
    // items fed after it. Only those are charged: a retry of them, then the first
    // unacked item alone, which is quarantined. The 300 items never fed are not.
    let mut spec = spin_spec(1000);
    spec.push_str("initial = 500\n");
    let job = Job::new(&spec);
    let out = run_one_slot(&job, &[], &[("POISON", "137"), ("MED_US", "20")]);
    assert_eq!(out.status.code(), Some(1), "{}", stderr(&out));
    let s = stage(&job.status(), 0).clone();
    assert_eq!(
        s["quarantined_items"],
        serde_json::json!([[137, 138]]),
        "{s}"
    );
    assert_eq!(s["done"], 999, "{s}");
    assert_eq!(s["failed_fragments"], 3, "{s}");
}

#[test]
fn case9_bad_numbers_are_refused_and_a_job_whose_state_cannot_be_read_breaks_alone() {
    for (key, value) in [
        ("kp", "nan"),
        ("ki", "inf"),
        ("kd", "-1.0"),
        ("forget", "1.5"),
        ("overhead_share", "0.0"),
        ("max_items", "0"),
        ("target_min_ms", "5000.0\ntarget_max_ms = 100.0"),
    ] {
        let job = Job::new(&format!(
            "{}[stage.sizer]\n{key} = {value}\n",
            one_stage("bad", "[\"true\"]", "{ range = [0, 3] }", "")
        ));
        let out = job.run(&[], &[]);
        assert_eq!(out.status.code(), Some(2), "{key}: {}", stderr(&out));
        let expect_key = if key == "target_min_ms" {
            "target_max_ms"
        } else {
            key
        };
        assert!(
            stderr(&out).contains(&format!("stage \"s\".sizer.{expect_key}")),
            "{key}: {}",
            stderr(&out)
        );
    }
    for backend in backends("case9") {
        let job = Job::on(
            &one_stage("bad", "[\"cat\"]", "{ range = [0, 10] }", ""),
            &backend,
        );
        assert!(job.output(&["submit", "job.toml"]).status.success());
        std::fs::write(
            job.path("good.toml"),
            one_stage("good", "[\"cat\"]", "{ range = [0, 10] }", ""),
        )
        .unwrap();
        assert!(job.output(&["submit", "good.toml"]).status.success());
        sql(
            &job,
            &backend,
            "UPDATE stages SET sizer_config = '{\"tunables\":{\"kp\":null}}' WHERE job_id = (SELECT id FROM jobs WHERE name = 'bad')",
        );
        let status = job.output(&["status"]);
        assert!(
            status.status.success(),
            "{}: {}",
            backend.name,
            stderr(&status)
        );
        let worker = job.output(&["worker", "--slots", "1"]);
        assert!(
            worker.status.success(),
            "{}: {}",
            backend.name,
            stderr(&worker)
        );
        let jobs = job.status()["jobs"].clone();
        assert_eq!(jobs[0]["state"], "broken", "{}: {jobs}", backend.name);
        assert_eq!(jobs[1]["state"], "done", "{}: {jobs}", backend.name);
    }
}

#[test]
fn case10_run_refuses_a_stage_no_slot_here_can_ever_run() {
    for (need, expect) in [
        ("gpus = 1", "gpus"),
        ("class = \"gpu\"", "class gpu"),
        ("memory = \"100TiB\"", "MiB of memory"),
    ] {
        let job = Job::new(&one_stage("far", "[\"cat\"]", "{ range = [0, 3] }", need));
        let out = job.run(&[], &[]);
        assert_eq!(out.status.code(), Some(2), "{need}: {}", stderr(&out));
        assert!(stderr(&out).contains(expect), "{need}: {}", stderr(&out));
        assert!(
            !job.path(".granule").exists(),
            "{need}: nothing was recorded"
        );
    }
}

/// A small tmpfs mounted for a test, unmounted when dropped.
struct Tmpfs(std::path::PathBuf);

impl Tmpfs {
    /// Mounts one of `size` at `at` (created); `None` where this host cannot (not
    /// root), which CI, running as root, must be able to.
    fn mount(at: &std::path::Path, size: &str) -> Option<Tmpfs> {
        std::fs::create_dir(at).unwrap();
        let mounted = std::process::Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={size}"), "tmpfs"])
            .arg(at)
            .stderr(Stdio::null())
            .status()
            .is_ok_and(|s| s.success());
        assert!(
            mounted || std::env::var("CI").as_deref() != Ok("true"),
            "CI runs as root and must be able to mount a small tmpfs for this test"
        );
        mounted.then(|| Tmpfs(at.to_path_buf()))
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let _ = std::process::Command::new("umount").arg(&self.0).status();
    }
}

/// The lines a child writes to a pipe, collected as they come.
struct Lines {
    lines: std::sync::Arc<std::sync::Mutex<Vec<String>>>,
    reader: std::sync::Mutex<Option<std::thread::JoinHandle<()>>>,
}

impl Lines {
    fn collect(pipe: impl std::io::Read + Send + 'static) -> Lines {
        let lines = std::sync::Arc::new(std::sync::Mutex::new(Vec::<String>::new()));
        let reader = {
            let lines = lines.clone();
            std::thread::spawn(move || {
                use std::io::BufRead;
                for line in std::io::BufReader::new(pipe).lines() {
                    lines.lock().unwrap().push(line.unwrap_or_default());
                }
            })
        };
        Lines {
            lines,
            reader: std::sync::Mutex::new(Some(reader)),
        }
    }

    /// How many lines so far contain `what`.
    fn count(&self, what: &str) -> usize {
        self.lines
            .lock()
            .unwrap()
            .iter()
            .filter(|l| l.contains(what))
            .count()
    }

    /// Every line, once the pipe is closed.
    fn all(&self) -> String {
        if let Some(reader) = self.reader.lock().unwrap().take() {
            reader.join().unwrap();
        }
        self.lines.lock().unwrap().join("\n")
    }
}

/// Waits (up to the command deadline) for a child to exit; its exit code.
fn exit_code(child: &mut std::process::Child) -> Option<i32> {
    let deadline = Instant::now() + COMMAND_DEADLINE;
    loop {
        if let Some(status) = child.try_wait().unwrap() {
            return status.code();
        }
        assert!(Instant::now() < deadline, "the run did not end");
        std::thread::sleep(Duration::from_millis(50));
    }
}

#[test]
fn case11_a_full_disk_is_waited_out_and_nothing_acked_is_lost() {
    let dir = tempfile::tempdir().unwrap();
    let mount = dir.path().join("disk");
    let Some(_tmpfs) = Tmpfs::mount(&mount, "3m") else {
        eprintln!("!!! SKIPPING case11: cannot mount a tmpfs here (not root?)");
        return;
    };
    let items = 400_000u64;
    let job = Job::new(&one_stage(
        "full",
        "[\"sh\", \"-c\", \"while read -r x; do echo $x >&3; done\"]",
        &format!("{{ range = [0, {items}] }}"),
        "",
    ));
    let state = mount.join("state");
    let mut run = Spawned::start(
        job.cmd(&["run", "job.toml", "--slots", "1"])
            .arg("--state")
            .arg(&state)
            .stderr(Stdio::piped())
            .stdout(Stdio::null()),
    );
    let lines = Lines::collect(run.stderr.take().unwrap());
    // Once it runs, the disk fills up (to the last byte).
    let done_here = || {
        let out = job.output(&["status", "--json", "--state", state.to_str().unwrap()]);
        serde_json::from_slice::<serde_json::Value>(&out.stdout)
            .ok()
            .and_then(|s| stage(&s, 0)["done"].as_u64())
            .unwrap_or(0)
    };
    wait_until("progress", PATIENCE, || done_here() > 1000);
    let filler = mount.join("filler");
    let _ = std::process::Command::new("dd")
        .args(["if=/dev/zero", "bs=4k"])
        .arg(format!("of={}", filler.display()))
        .stderr(Stdio::null())
        .status();
    let said = |what: &str| lines.count(what);
    wait_until("the full disk to be said", PATIENCE, || {
        said("no space left") > 0
    });
    let full_since = Instant::now();
    std::thread::sleep(Duration::from_secs(6));
    std::fs::remove_file(&filler).unwrap();
    let code = exit_code(&mut run);
    let text = lines.all();
    assert_eq!(code, Some(0), "{text}");
    // Said with the path and the space left, then again only every few seconds.
    assert!(
        text.contains(&state.display().to_string()) && text.contains("MiB free"),
        "{text}"
    );
    let limit = full_since.elapsed().as_secs() / 5 + 3;
    assert!(
        said("no space left") as u64 <= limit,
        "said too often: {text}"
    );
    assert!(text.contains("writable again"), "{text}");
    let status = job.output(&["status", "--json", "--state", state.to_str().unwrap()]);
    let status: serde_json::Value = serde_json::from_slice(&status.stdout).unwrap();
    assert_eq!(stage(&status, 0)["done"], items, "{status}");
}

#[test]
fn case12_two_runs_of_one_spec_at_once_both_end_done_and_run_it_once() {
    for backend in backends("case12") {
        let items = 2000u64;
        let job = Job::on(&spin_spec(items), &backend);
        std::fs::create_dir(job.path("out")).unwrap();
        let out_dir = job.path("out");
        let env = [("OUT_DIR", out_dir.to_str().unwrap()), ("MED_US", "200")];
        let runs: Vec<Spawned> = (0..2)
            .map(|_| {
                Spawned::start(
                    job.cmd(&["run", "job.toml", "--slots", "1", "-q"])
                        .envs(env)
                        .stderr(Stdio::piped()),
                )
            })
            .collect();
        for mut run in runs {
            let status = run.wait().unwrap();
            let mut err = String::new();
            use std::io::Read;
            run.stderr.take().unwrap().read_to_string(&mut err).unwrap();
            assert!(status.success(), "{}: {err}", backend.name);
        }
        let s = stage(&job.status(), 0).clone();
        assert_eq!(s["done"], items, "{}: {s}", backend.name);
        let recorded = job.recorded();
        assert_eq!(recorded.len() as u64, items, "{}", backend.name);
        // Two different specs under one name at once: one runs, the other is refused.
        let clash = |n| spin_spec(n).replacen("name = \"spin\"", "name = \"clash\"", 1);
        let other = Job::on(&clash(10), &backend);
        std::fs::write(other.path("b.toml"), clash(11)).unwrap();
        let (a, b) = (
            Spawned::start(other.cmd(&["submit", "job.toml"]).stderr(Stdio::null())),
            Spawned::start(other.cmd(&["submit", "b.toml"]).stderr(Stdio::null())),
        );
        let mut codes: Vec<Option<i32>> = [a, b]
            .into_iter()
            .map(|mut p| p.wait().unwrap().code())
            .collect();
        codes.sort();
        assert_eq!(codes, [Some(0), Some(2)], "{}", backend.name);
    }
}

fn alive(pid: i32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat")).is_ok_and(|s| {
        !s.rsplit(')')
            .next()
            .unwrap_or("")
            .trim_start()
            .starts_with('Z')
    })
}

#[test]
fn case13_a_grandchild_holding_the_pipes_ends_with_its_fragment() {
    let job = Job::new(&one_stage(
        "leaky",
        "[\"sh\", \"-c\", \"sleep 300 & echo $! >> pids; while read -r x; do echo $x >&3; done\"]",
        "{ range = [0, 40] }",
        "initial = 10",
    ));
    let out = run_one_slot(&job, &[], &[]);
    assert!(out.status.success(), "{}", stderr(&out));
    let pids: Vec<i32> = std::fs::read_to_string(job.path("pids"))
        .unwrap()
        .lines()
        .map(|l| l.trim().parse().unwrap())
        .collect();
    assert!(!pids.is_empty());
    wait_until("every grandchild to be gone", PATIENCE, || {
        pids.iter().all(|&p| !alive(p))
    });
}

#[test]
fn case14_names_are_bounded_and_printable() {
    let long = "x".repeat(1 << 20);
    for (name, expect) in [
        (long.as_str(), "at most 128"),
        ("two\\nlines", "control character"),
        ("esc\\u001b[31mred", "control character"),
    ] {
        let job = Job::new(&one_stage(name, "[\"true\"]", "{ range = [0, 1] }", ""));
        let out = job.run(&[], &[]);
        assert_eq!(out.status.code(), Some(2), "{}", stderr(&out));
        assert!(stderr(&out).contains(expect), "{}", stderr(&out));
        assert!(
            !stderr(&out).contains('\u{1b}'),
            "the name is not echoed raw"
        );
    }
    // The same holds for names given to a worker.
    let job = Job::new(&one_stage("x", "[\"true\"]", "{ range = [0, 1] }", ""));
    for args in [
        ["worker", "--class", "red\u{1b}[31m"],
        ["worker", "--resource", "gp\nu=1"],
    ] {
        let out = job.output(&args);
        assert_eq!(out.status.code(), Some(2), "{args:?}: {}", stderr(&out));
        assert!(
            stderr(&out).contains("control character"),
            "{}",
            stderr(&out)
        );
        assert!(!stderr(&out).contains('\u{1b}') && !stderr(&out).contains("gp\nu"));
    }
}

#[test]
fn case15_results_out_never_follows_a_link_already_there() {
    let job = Job::new(&one_stage(
        "sums",
        "[\"sh\", \"-c\", \"while read -r x; do echo $x >&3; done; echo state > s.$GRANULE_FRAGMENT; echo \\\"$GRANULE_CMD checkpoint s.$GRANULE_FRAGMENT\\\" >&3\"]",
        "{ range = [0, 20] }",
        "",
    ));
    assert!(job.run(&[], &[]).status.success());
    let out = job.path("results");
    std::fs::create_dir(&out).unwrap();
    let victim = job.path("victim");
    std::fs::write(&victim, "precious").unwrap();
    for id in 1..200 {
        std::os::unix::fs::symlink(&victim, out.join(format!("fragment-{id}"))).unwrap();
    }
    let res = job.output(&["results", "s", "--out", out.to_str().unwrap()]);
    assert!(res.status.success(), "{}", stderr(&res));
    assert_eq!(std::fs::read_to_string(&victim).unwrap(), "precious");
    let written: Vec<_> = std::fs::read_dir(&out)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| !p.is_symlink())
        .collect();
    assert!(!written.is_empty());
    for p in written {
        assert_eq!(std::fs::read_to_string(&p).unwrap(), "state\n");
    }
}

#[test]
fn case16_tasks_get_no_credentials_and_errors_redact_them() {
    for backend in backends("case16") {
        let Some(url) = &backend.url else { continue };
        // The same database, with a password in the URL (trust auth ignores it).
        let with_password = url.replacen("postgres@", "postgres:s3cret@", 1);
        let mut job = Job::new(&one_stage(
            "env",
            "[\"sh\", \"-c\", \"env > env.$GRANULE_FRAGMENT; cat > /dev/null\"]",
            "{ range = [0, 3] }",
            "",
        ));
        job.set_store(Some(with_password));
        let out = job.run(&[], &[]);
        assert!(out.status.success(), "{}", stderr(&out));
        for entry in std::fs::read_dir(job.dir.path()).unwrap() {
            let path = entry.unwrap().path();
            if path
                .file_name()
                .unwrap()
                .to_string_lossy()
                .starts_with("env.")
            {
                let env = std::fs::read_to_string(&path).unwrap();
                assert!(!env.contains("s3cret"), "{env}");
            }
        }
    }
    let job = Job::new(&one_stage("x", "[\"true\"]", "{ range = [0, 1] }", ""));
    for bad in [
        "postgres://u:s3cret@127.0.0.1:notaport/db",
        "mysql://u:s3cret@host/db",
        "postgres://u:s3cret@127.0.0.1:1/db?password=s3cret",
    ] {
        let out = job.output(&["status", "--store", bad]);
        assert!(!out.status.success(), "{bad}");
        assert!(!stderr(&out).contains("s3cret"), "{bad}: {}", stderr(&out));
    }
}

#[test]
fn case17_cancel_keeps_the_accounting_and_run_says_cancelled() {
    for backend in backends("case17") {
        let items = 4000u64;
        let job = Job::on(&spin_spec(items), &backend);
        let mut run = Spawned::start(
            job.cmd(&["run", "job.toml", "--slots", "2", "-q"])
                .env("MED_US", "2000")
                .stderr(Stdio::piped()),
        );
        wait_until("some progress", PATIENCE, || done(&job) > 50);
        let cancel = job.output(&["cancel", "spin"]);
        assert!(cancel.status.success(), "{}", stderr(&cancel));
        let status = run.wait().unwrap();
        let mut err = String::new();
        use std::io::Read;
        run.stderr.take().unwrap().read_to_string(&mut err).unwrap();
        assert_eq!(status.code(), Some(4), "{}: {err}", backend.name);
        assert!(
            err.contains("cancelled") && !err.contains("lease lost"),
            "{}: {err}",
            backend.name
        );
        let s = stage(&job.status(), 0).clone();
        let total: u64 = ["done", "pending", "running", "quarantined"]
            .iter()
            .map(|k| s[*k].as_u64().unwrap())
            .sum();
        assert_eq!(total, items, "{}: nothing vanished: {s}", backend.name);
        assert_eq!(s["running"], 0, "{}", backend.name);
        assert!(s["done"].as_u64() > Some(50), "{}", backend.name);
    }
}

#[test]
fn a_worker_reads_limit_target_and_initial_from_the_stored_spec() {
    // Found by the spec fuzzer: `limit`, `target` and `initial` were dropped on the
    // way through the store, so `granule worker` never enforced a limit.
    for backend in backends("stored_limit") {
        let job = Job::on(
            &one_stage(
                "limited",
                "[\"sleep\", \"60\"]",
                "{ range = [0, 1] }",
                "limit = \"1s\"\nretries = 0",
            ),
            &backend,
        );
        assert!(job.output(&["submit", "job.toml"]).status.success());
        let worker = job.output(&["worker", "--slots", "1", "-q"]);
        assert!(worker.status.success(), "{}", stderr(&worker));
        let s = stage(&job.status(), 0).clone();
        assert_eq!(
            s["quarantined_items"],
            serde_json::json!([[0, 1]]),
            "{}: {s}",
            backend.name
        );
        let logs = String::from_utf8_lossy(&job.output(&["logs", "s"]).stdout).into_owned();
        assert!(logs.contains("timed out"), "{}: {logs}", backend.name);
    }
}

//! The `granule` binary end to end, with real child processes and a real SQLite file.

mod common;

use common::*;

#[test]
fn runs_a_dag_to_the_end_and_reports_status() {
    for backend in backends("runs_a_dag_to_the_end_and_reports_status") {
        let job = Job::on(
            r#"
    name = "dag"
    [[stage]]
    name = "first"
    command = ["sh", "-c", "while read -r x; do echo \"$x\" >&3; done"]
    items = { range = [0, 500] }
    [[stage]]
    name = "second"
    command = ["sh", "-c", "test -n \"$GRANULE_JOB\" && echo \"$GRANULE_STAGE:$1\"", "sh", "{}"]
    per_item = true
    items = { list = ["a", "b", "c"] }
    after = ["first"]
    "#,
            &backend,
        );
        let out = job.run(&[], &[]);
        assert!(out.status.success(), "{}: {}", backend.name, stderr(&out));
        let status = job.status();
        assert_eq!(status["jobs"][0]["name"], "dag");
        assert_eq!(status["jobs"][0]["state"], "done");
        for (i, items) in [(0, 500), (1, 3)] {
            let s = stage(&status, i);
            for key in [
                "name",
                "items",
                "done",
                "running",
                "pending",
                "quarantined",
                "fragments",
                "fragment_size",
                "item_cost_us",
            ] {
                assert!(!s[key].is_null(), "status lacks {key}: {s}");
            }
            assert_eq!(s["done"], items);
            assert_eq!(s["pending"], 0);
            assert_eq!(s["running"], 0);
        }
        let logs = job.output(&["logs", "second"]);
        let text = String::from_utf8_lossy(&logs.stdout);
        assert!(text.contains("second:b"), "per-item output is kept: {text}");
        // A finished job is not run again.
        let again = job.run(&[], &[]);
        assert!(again.status.success());
        assert!(
            stderr(&again).contains("already finished"),
            "{}",
            stderr(&again)
        );
    }
}

#[test]
fn status_says_which_rule_sized_the_last_fragment_and_why() {
    // Tried as a new user would: fragments stayed small and nothing said why.
    let job = Job::new(
        "name = \"j\"\n[[stage]]\nname = \"s\"\ncommand = [\"true\"]\nitems = { range = [0, 1] }\n",
    );
    assert!(job.run(&[], &[]).status.success());
    let status = job.status();
    let s = stage(&status, 0);
    // The first fragment of a task never seen before: slow start sized it.
    assert_eq!(s["size_cap"], "slow_start", "{s}");
    assert!(
        s["size_cap_why"].as_str().unwrap().contains("history"),
        "{s}"
    );
    let out = job.output(&["status"]);
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        text.contains("last fragment sized by slow_start: slow start"),
        "{text}"
    );
}

/// The first fragment's span `(start, end)` in `granule logs` of `job`'s stage `s`.
fn first_fragment(job: &Job, name: &str) -> (u64, u64) {
    let out = job.output(&["logs", "s", "--job", name]);
    assert!(out.status.success(), "{}", stderr(&out));
    let text = String::from_utf8_lossy(&out.stdout).to_string();
    let header = text.lines().find(|l| l.starts_with("== fragment")).unwrap();
    let span = header.split(['[', ')']).nth(1).unwrap();
    let (start, end) = span.split_once(", ").unwrap();
    (start.parse().unwrap(), end.parse().unwrap())
}

#[test]
fn a_new_job_of_a_command_already_run_starts_from_what_it_learned() {
    // Tried as a new user would: every run of the same task slow-started again,
    // from one item, paying a task start per round.
    for backend in backends("a_new_job_of_a_command_already_run_starts_from_what_it_learned") {
        let spec = |name: &str| {
            format!(
                "name = \"{name}\"\n[[stage]]\nname = \"s\"\ncommand = [\"sh\", \"-c\", \"while read -r x; do echo \\\"$x\\\" >&3; done\"]\nitems = {{ range = [0, 3000] }}\n"
            )
        };
        let job = Job::on(&spec("first"), &backend);
        for name in ["first", "second"] {
            std::fs::write(job.path("job.toml"), spec(name)).unwrap();
            let out = output_of(&mut job.cmd(&["run", "job.toml", "--slots", "1"]));
            assert!(out.status.success(), "{}: {}", backend.name, stderr(&out));
        }
        // A task never seen starts at one item; the second job of the same command
        // starts from the model the first one left.
        assert_eq!(first_fragment(&job, "first"), (0, 1), "{}", backend.name);
        let (start, end) = first_fragment(&job, "second");
        assert!(end - start >= 100, "{}: [{start}, {end})", backend.name);
        let status = job.status();
        let second = status["jobs"]
            .as_array()
            .unwrap()
            .iter()
            .find(|j| j["name"] == "second")
            .unwrap();
        assert_eq!(second["stages"][0]["done"], 3000, "{second}");
    }
}

#[test]
fn a_changed_spec_is_refused_unless_fresh() {
    let job = Job::new(
        "name = \"j\"\n[[stage]]\nname = \"s\"\ncommand = [\"true\"]\nitems = { range = [0, 3] }\n",
    );
    assert!(job.run(&[], &[]).status.success());
    std::fs::write(
        job.path("job.toml"),
        "name = \"j\"\n[[stage]]\nname = \"s\"\ncommand = [\"true\"]\nitems = { range = [0, 4] }\n",
    )
    .unwrap();
    let out = job.run(&[], &[]);
    assert_eq!(out.status.code(), Some(2));
    assert!(stderr(&out).contains("different spec"), "{}", stderr(&out));
    let out = job.run(&["--fresh"], &[]);
    assert!(out.status.success(), "{}", stderr(&out));
    assert_eq!(stage(&job.status(), 0)["done"], 4);
}

#[test]
fn a_poison_item_is_quarantined_alone() {
    for backend in backends("a_poison_item_is_quarantined_alone") {
        let job = Job::on(&spin_spec(3000), &backend);
        std::fs::create_dir(job.path("out")).unwrap();
        let out_dir = job.path("out");
        let out = job.run(
            &[],
            &[
                ("POISON", "1234"),
                ("MED_US", "20"),
                ("OUT_DIR", out_dir.to_str().unwrap()),
            ],
        );
        assert_eq!(out.status.code(), Some(1), "{}", stderr(&out));
        let status = job.status();
        assert_eq!(status["jobs"][0]["state"], "failed");
        let s = stage(&status, 0);
        assert_eq!(s["quarantined"], 1);
        assert_eq!(s["quarantined_items"], serde_json::json!([[1234, 1235]]));
        assert_eq!(s["done"], 2999);
        let recorded = job.recorded();
        assert_eq!(recorded.len(), 2999);
        assert!(!recorded.contains_key(&1234));
        let text = String::from_utf8_lossy(&job.output(&["status"]).stdout).into_owned();
        assert!(text.contains("quarantined items: \"1234\""), "{text}");
        let logs = job.output(&["logs", "work"]);
        assert!(String::from_utf8_lossy(&logs.stdout).contains("exit code 3"));
    }
}

#[test]
fn per_item_failures_are_isolated_without_bisecting_neighbours() {
    let job = Job::new(
        r#"
name = "pi"
[[stage]]
name = "check"
command = ["sh", "-c", "test \"$1\" != 7", "sh", "{}"]
per_item = true
retries = 1
items = { range = [0, 20] }
"#,
    );
    let out = job.run(&[], &[]);
    assert_eq!(out.status.code(), Some(1), "{}", stderr(&out));
    let s = stage(&job.status(), 0).clone();
    assert_eq!(s["quarantined_items"], serde_json::json!([[7, 8]]));
    assert_eq!(s["done"], 19);
}

#[test]
fn kill_9_then_rerun_loses_nothing_and_counts_once() {
    for backend in backends("kill_9_then_rerun_loses_nothing_and_counts_once") {
        let job = Job::on(&spin_spec(20_000), &backend);
        std::fs::create_dir(job.path("out")).unwrap();
        let out_dir = job.path("out").to_str().unwrap().to_string();
        let env = [
            ("MED_US", "100"),
            ("SIGMA", "0.5"),
            ("OUT_DIR", out_dir.as_str()),
        ];
        let mut child = start_run(&job, &env);
        wait_until("some items done", PATIENCE, || done(&job) > 3000);
        child.kill().unwrap(); // SIGKILL
        child.wait().unwrap();
        let before = done(&job);
        assert!(before < 20_000, "the job finished before the kill");
        let out = job.run(&[], &env);
        assert!(out.status.success(), "{}", stderr(&out));
        let status = job.status();
        assert_eq!(stage(&status, 0)["done"], 20_000);
        let recorded = job.recorded();
        assert_eq!(recorded.len(), 20_000, "an item was never run");
        let twice: u32 = recorded.values().map(|n| n - 1).sum();
        // Only work after the last flush and the in-flight window may run again.
        assert!(twice < 2_000, "{twice} items ran twice");
    }
}

#[test]
fn ctrl_c_yields_and_the_rerun_finishes() {
    let job = Job::new(&spin_spec(20_000));
    std::fs::create_dir(job.path("out")).unwrap();
    let out_dir = job.path("out").to_str().unwrap().to_string();
    let env = [
        ("MED_US", "100"),
        ("SIGMA", "0.5"),
        ("OUT_DIR", out_dir.as_str()),
    ];
    let mut child = start_run(&job, &env);
    wait_until("some items done", PATIENCE, || done(&job) > 2000);
    // SAFETY: signalling our own child.
    unsafe { libc::kill(child.id() as i32, libc::SIGINT) };
    let status = child.wait().unwrap();
    assert_eq!(status.code(), Some(130));
    let s = stage(&job.status(), 0).clone();
    assert_eq!(s["running"], 0, "every fragment yielded: {s}");
    assert!(s["done"].as_u64().unwrap() < 20_000);
    let out = job.run(&[], &env);
    assert!(out.status.success(), "{}", stderr(&out));
    let recorded = job.recorded();
    assert_eq!(recorded.len(), 20_000);
    let twice: u32 = recorded.values().map(|n| n - 1).sum();
    assert!(
        twice <= 2 * 64,
        "a yield reruns at most the in-flight window: {twice}"
    );
}

#[test]
fn bad_specs_exit_2_naming_file_line_and_key_before_running_anything() {
    let cases = [
        ("name = \"x\"\nbogus = 1\n", "bogus"),
        ("name = \"x\"\n[[stage]]\nname = \"a\"\ncommand = [\"true\"]\nitems = { range = [5, 5] }\n", "stage \"a\".items"),
        ("name = \"x\"\n[[stage]]\nname = \"a\"\ncommand = [\"true\"]\nitems = { range = [9, 2] }\n", "stage \"a\".items"),
        ("name = \"x\"\n[[stage]]\nname = \"a\"\ncommand = [\"no-such-program-here\"]\nitems = { range = [0, 2] }\n", "stage \"a\".command"),
        ("name = \"x\"\n[[stage]]\nname = \"a\"\ncommand = [\"true\"]\nitems = { lines = \"missing.txt\" }\n", "stage \"a\".items"),
        (
            "name = \"x\"\n[[stage]]\nname = \"a\"\ncommand = [\"true\"]\nitems = { range = [0, 2] }\n[[stage]]\nname = \"a\"\ncommand = [\"true\"]\nitems = { range = [0, 2] }\n",
            "stage \"a\".name",
        ),
        (
            "name = \"x\"\n[[stage]]\nname = \"a\"\ncommand = [\"true\"]\nitems = { range = [0, 2] }\nafter = [\"b\"]\n[[stage]]\nname = \"b\"\ncommand = [\"true\"]\nitems = { range = [0, 2] }\nafter = [\"a\"]\n",
            "after",
        ),
    ];
    for (spec, key) in cases {
        let job = Job::new(spec);
        let out = job.run(&[], &[]);
        assert_eq!(
            out.status.code(),
            Some(2),
            "spec {spec:?}: {}",
            stderr(&out)
        );
        let err = stderr(&out);
        assert!(err.contains("job.toml:"), "error names the file: {err}");
        assert!(err.contains(key), "error names the key {key}: {err}");
        assert!(
            !job.path(".granule").exists(),
            "nothing may run or be stored for a bad spec"
        );
    }
}

#[test]
fn a_hundred_million_items_are_a_few_rows() {
    let job = Job::new("name = \"big\"\n[[stage]]\nname = \"s\"\ncommand = [\"true\"]\nitems = { range = [0, 100000000] }\n");
    let out = job.output(&["submit", "job.toml"]);
    assert!(out.status.success(), "{}", stderr(&out));
    let s = stage(&job.status(), 0).clone();
    assert_eq!(s["items"], 100_000_000u64);
    assert_eq!(s["pending"], 100_000_000u64);
    let size = std::fs::metadata(job.path(".granule/granule.db"))
        .unwrap()
        .len();
    assert!(size < 1 << 20, "store is {size} bytes");
}

#[test]
fn a_stage_is_profiled_from_its_history_and_guessed_before() {
    // Writes 30 MB per fragment: block I/O makes it IO-bound. Its name suggests
    // nothing; a second stage, never run, is guessed from its name.
    let job = Job::new(
        "name = \"p\"\n[[stage]]\nname = \"step\"\ncommand = [\"sh\", \"-c\", \"head -c 30000000 /dev/zero > blob.$GRANULE_FRAGMENT; cat >/dev/null\"]\nitems = { range = [0, 4] }\n[[stage]]\nname = \"thumbnails\"\ncommand = [\"true\"]\nitems = { range = [0, 1] }\n",
    );
    assert!(job.output(&["submit", "job.toml"]).status.success());
    let before = job.status();
    assert_eq!(stage(&before, 0)["profile"], serde_json::Value::Null);
    assert_eq!(stage(&before, 1)["profile"], "cpu", "{before}");
    assert_eq!(stage(&before, 1)["profile_source"], "guess");
    let out = job.run(&[], &[]);
    assert!(out.status.success(), "{}", stderr(&out));
    let status = job.status();
    let s = stage(&status, 0);
    assert_eq!(s["profile"], "io", "{s}");
    assert_eq!(s["profile_source"], "history", "{s}");
}

/// Spins 1 µs per byte of each line, acks it.
const BYTES_TASK: &str = r#"
import os, sys, time
ack = os.fdopen(3, "w", buffering=1)
for line in sys.stdin:
    end = time.perf_counter() + len(line) * 1e-6
    while time.perf_counter() < end:
        pass
    ack.write(line)
"#;

#[test]
fn a_fragment_reaching_into_heavier_items_is_cut_before_it_runs() {
    // Blocks of 10,000 light lines (11 bytes) and 250 heavy ones (1,001 bytes):
    // 1.4 s of work, which 8 busy loops on 2 cores stretch twentyfold.
    let job = Job::new(
        "name = \"sizes\"\n[[stage]]\nname = \"s\"\ncommand = [\"python3\", \"task.py\"]\nitems = { lines = \"items.txt\" }\ntarget = \"300ms\"\n",
    );
    std::fs::write(job.path("task.py"), BYTES_TASK).unwrap();
    let mut lines = String::new();
    let mut total = 0u64;
    for block in 0..8 {
        let (count, width) = if block % 2 == 0 {
            (10_000, 10)
        } else {
            (250, 1_000)
        };
        for i in 0..count {
            lines.push_str(&format!("{:0width$}\n", (total + i) % 10, width = width));
        }
        total += count;
    }
    std::fs::write(job.path("items.txt"), lines).unwrap();
    // One slot: no idle slot ever asks for a split, so every split is a fragment
    // cut by the size of its own items.
    let out = job.output(&["run", "job.toml", "--slots", "1", "-q"]);
    assert!(out.status.success(), "{}", stderr(&out));
    let status = job.status();
    let s = stage(&status, 0);
    assert_eq!(s["done"], total, "{s}");
    assert!(
        s["splits"].as_u64().unwrap() >= 1,
        "no fragment was cut: {s}"
    );
}

#[test]
fn explain_says_what_the_deadline_plan_makes_of_a_stage() {
    // Slow enough to be still running when the plan is read (~10 ms an item).
    let job = Job::new(
        "name = \"d\"\n[[stage]]\nname = \"s\"\ncommand = [\"sh\", \"-c\", \"while read -r x; do sleep 0.01; echo $x >&3; done\"]\nitems = { range = [0, 100000] }\ndeadline = \"1h\"\n",
    );
    assert!(job.output(&["submit", "job.toml"]).status.success());
    let text = |job: &Job| {
        let out = job.output(&["status", "--explain", "s"]);
        assert!(out.status.success(), "{}", stderr(&out));
        String::from_utf8_lossy(&out.stdout).into_owned()
    };
    let before = text(&job);
    assert!(before.contains("deadline 1h after submission"), "{before}");
    assert!(before.contains("no cost learned yet"), "{before}");
    // A worker that learns the stage's cost and stays around (idle) for the plan.
    let mut worker = Spawned::start(
        job.cmd(&[
            "worker",
            "-q",
            "--class",
            "cheap",
            "--cost",
            "0.1",
            "--idle-exit",
            "30s",
        ])
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null()),
    );
    wait_until(
        "the stage's cost to be learned on class cheap",
        PATIENCE,
        || {
            stage(&job.status(), 0)["classes"]
                .as_array()
                .is_some_and(|c| c.iter().any(|c| c["item_cost_us"].as_f64() > Some(0.0)))
        },
    );
    let after = text(&job);
    let _ = worker.kill();
    let _ = worker.wait();
    assert!(
        after.contains("lets class cheap take this stage's work"),
        "{after}"
    );
}

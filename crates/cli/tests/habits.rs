//! What users of GNU parallel, Slurm arrays and HyperQueue expect of a batch tool,
//! each case tried as a new user would (issue 14): items named by value, retrying
//! what failed, halting a broken task, tasks run beside their spec, their output
//! shown and kept, a job list, `wait`, `rm`, and status and progress that say what
//! is true.

mod common;

use common::*;
use std::os::unix::fs::PermissionsExt;
use std::path::Path;

/// Writes an executable shell script.
fn script(path: &Path, body: &str) {
    std::fs::write(path, format!("#!/bin/sh\n{body}")).unwrap();
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o755)).unwrap();
}

/// A batch task that acks each value and fails on `1005` while `poison` exists
/// beside it; it records each value it ran in `out/` (as `spin.py` does).
const POISONED: &str = r#"mkdir -p out
while read -r x; do
  if [ "$x" = 1005 ] && [ -e poison ]; then echo "cannot take $x" >&2; exit 3; fi
  echo "$x" >> "out/$$"
  echo "$x" >&3
done
"#;

fn poisoned_job() -> Job {
    let job = Job::new(
        "name = \"q\"\n[[stage]]\nname = \"work\"\ncommand = [\"./task.sh\"]\nitems = { range = [1000, 1020] }\nretries = 1\n",
    );
    script(&job.path("task.sh"), POISONED);
    std::fs::write(job.path("poison"), "").unwrap();
    job
}

#[test]
fn quarantined_items_are_named_by_value_and_retry_runs_only_them() {
    let job = poisoned_job();
    let out = job.run(&[], &[]);
    assert_eq!(out.status.code(), Some(1), "{}", stderr(&out));
    assert!(
        stderr(&out).contains("quarantined item \"1005\" (index 5)"),
        "the run names the item by value: {}",
        stderr(&out)
    );
    let text = job.output(&["status"]);
    let text = String::from_utf8_lossy(&text.stdout).into_owned();
    assert!(text.contains("quarantined items: \"1005\""), "{text}");
    let status = job.status();
    assert_eq!(stage(&status, 0)["quarantined_values"][0], "1005");
    assert_eq!(stage(&status, 0)["state"], "failed");

    // The task is fixed; `retry` puts the one item back and the rerun runs only it.
    std::fs::remove_file(job.path("poison")).unwrap();
    let before = job.recorded();
    let out = job.output(&["retry", "q"]);
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(
        stderr(&out).contains("1 quarantined item"),
        "{}",
        stderr(&out)
    );
    let out = job.run(&[], &[]);
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    let after = job.recorded();
    for (value, n) in &after {
        let was = before.get(value).copied().unwrap_or(0);
        let expected = was + u32::from(*value == 1005);
        assert_eq!(
            *n, expected,
            "value {value} ran {n} times (before retry: {was})"
        );
    }
    let status = job.status();
    assert_eq!(stage(&status, 0)["done"], 20);
    assert_eq!(status["jobs"][0]["state"], "done");
}

#[test]
fn a_lines_file_of_names_shows_the_names_of_quarantined_items() {
    let job = Job::new(
        "name = \"files\"\n[[stage]]\nname = \"open\"\ncommand = [\"cat\", \"{}\"]\nper_item = true\nretries = 0\nitems = { lines = \"files.txt\" }\n",
    );
    std::fs::write(job.path("here.txt"), "x").unwrap();
    std::fs::write(
        job.path("files.txt"),
        "here.txt\nmissing-one.txt\nhere.txt\n",
    )
    .unwrap();
    let out = job.run(&[], &[]);
    assert_eq!(out.status.code(), Some(1), "{}", stderr(&out));
    let text = job.output(&["status"]);
    let text = String::from_utf8_lossy(&text.stdout).into_owned();
    assert!(text.contains("\"missing-one.txt\""), "{text}");
}

#[test]
fn a_task_that_fails_on_every_item_halts_the_job_quickly_and_quietly() {
    let job = Job::new(
        "name = \"broken\"\n[[stage]]\nname = \"work\"\ncommand = [\"./task.sh\"]\nitems = { range = [0, 600] }\nhalt = { fail_ratio = 0.5, after = 20 }\n",
    );
    script(
        &job.path("task.sh"),
        "echo started >> starts\nread -r x; echo \"no such thing: $x\" >&2; exit 1\n",
    );
    let out = job.run(&[], &[]);
    assert_eq!(out.status.code(), Some(5), "{}", stderr(&out));
    let err = stderr(&out);
    assert!(err.contains("halted"), "{err}");
    assert!(err.contains("granule retry"), "says how to go on: {err}");
    let starts = std::fs::read_to_string(job.path("starts"))
        .unwrap()
        .lines()
        .count();
    assert!(
        starts < 100,
        "a halt stops a broken task long before its 600 items: {starts} processes"
    );
    assert!(
        err.lines().count() < 40,
        "few lines, not one per fragment: {err}"
    );
    let status = job.status();
    assert_eq!(status["jobs"][0]["state"], "halted");
    // A class that learned nothing (every fragment failed) shows no negative zero.
    let text = serde_json::to_string(&status).unwrap();
    assert!(!text.contains("-0.0"), "{text}");
    // Done work is kept and `retry` reopens a halted job.
    let out = job.output(&["retry", "broken"]);
    assert!(out.status.success(), "{}", stderr(&out));
    assert_eq!(job.status()["jobs"][0]["state"], "running");
}

#[test]
fn failures_without_halt_are_counted_not_printed_one_by_one() {
    let job = Job::new(
        "name = \"noisy\"\n[[stage]]\nname = \"work\"\ncommand = [\"sh\", \"-c\", \"read -r x; exit 1\"]\nitems = { range = [0, 200] }\nretries = 0\n",
    );
    let out = job.run(&[], &[]);
    assert_eq!(out.status.code(), Some(1), "{}", stderr(&out));
    let err = stderr(&out);
    let failed_lines = err.lines().filter(|l| l.contains("failed:")).count();
    assert!(failed_lines <= 3, "{failed_lines} failure lines: {err}");
    assert!(err.contains("fragments failed so far"), "{err}");
}

#[test]
fn a_spec_run_from_another_folder_finds_its_script_and_gets_its_env() {
    let dir = tempfile::tempdir().unwrap();
    let jobs = dir.path().join("jobs");
    std::fs::create_dir_all(jobs.join("data")).unwrap();
    std::fs::write(jobs.join("data/names.txt"), "a\nb\nc\n").unwrap();
    script(
        &jobs.join("gzip_task.sh"),
        "while read -r x; do echo \"$x $GREETING $(pwd)\" >> seen.txt; echo \"$x\" >&3; done\n",
    );
    std::fs::write(
        jobs.join("gz.toml"),
        "name = \"gz\"\n[[stage]]\nname = \"zip\"\ncommand = [\"./gzip_task.sh\"]\nitems = { lines = \"data/names.txt\" }\nenv = { GREETING = \"hi\" }\n",
    )
    .unwrap();
    let mut cmd = granule();
    cmd.current_dir(dir.path())
        .args(["run", "jobs/gz.toml", "--slots", "1"])
        .env_remove("GRANULE_STORE")
        .env_remove("GRANULE_STATE");
    let out = output_of(&mut cmd);
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    let seen = std::fs::read_to_string(jobs.join("seen.txt")).unwrap();
    assert_eq!(seen.lines().count(), 3, "{seen}");
    let folder = jobs.canonicalize().unwrap();
    assert!(
        seen.lines()
            .all(|l| l.contains(" hi ") && l.ends_with(&*folder.to_string_lossy())),
        "tasks run in the spec's folder with the stage's env: {seen}"
    );
}

#[test]
fn output_is_shown_labelled_kept_per_item_and_logged() {
    let job = Job::new(
        "name = \"o\"\n[[stage]]\nname = \"hello\"\ncommand = [\"sh\", \"-c\", \"echo out-$1; echo err-$1 >&2\", \"sh\", \"{}\"]\nper_item = true\nitems = { list = [\"ada\", \"grace\"] }\n\
         [[stage]]\nname = \"count\"\ncommand = [\"sh\", \"-c\", \"while read -r x; do echo n$x; echo $x >&3; done\"]\nitems = { range = [0, 3] }\n",
    );
    let out = job.run(
        &["--output", "--results", "res", "--joblog", "log.tsv"],
        &[],
    );
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(stdout.contains("[hello ada] out-ada"), "{stdout}");
    assert!(
        stderr(&out).contains("[hello grace] err-grace"),
        "{}",
        stderr(&out)
    );
    assert!(stdout.contains("[count fragment "), "{stdout}");
    assert!(stdout.contains("] n2"), "{stdout}");
    assert_eq!(
        std::fs::read_to_string(job.path("res/hello/1.stdout")).unwrap(),
        "out-grace\n"
    );
    assert_eq!(
        std::fs::read_to_string(job.path("res/hello/0.stderr")).unwrap(),
        "err-ada\n"
    );
    let count_files: Vec<_> = std::fs::read_dir(job.path("res/count")).unwrap().collect();
    assert!(!count_files.is_empty());
    let log = std::fs::read_to_string(job.path("log.tsv")).unwrap();
    let mut lines = log.lines();
    assert!(
        lines.next().unwrap().starts_with("fragment\tstage\t"),
        "{log}"
    );
    let acked: u64 = lines
        .map(|l| l.split('\t').nth(7).unwrap().parse::<u64>().unwrap())
        .sum();
    assert_eq!(acked, 5, "every item acked once in the log: {log}");
}

#[test]
fn jobs_wait_and_rm_with_its_files() {
    let job = Job::new(
        "name = \"files\"\n[[stage]]\nname = \"make\"\ncommand = [\"sh\", \"-c\", \"while read -r x; do echo data-$x > f$x; echo \\\"$GRANULE_CMD output f$x\\\" >&3; echo $x >&3; done\"]\nitems = { range = [0, 3] }\n",
    );
    let out = job.run(&[], &[]);
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    let out = job.output(&["jobs"]);
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        text.contains("files") && text.contains("done") && text.contains("3/3"),
        "{text}"
    );
    let out = job.output(&["wait", "files"]);
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    let out = job.output(&["wait", "nosuchjob"]);
    assert_eq!(out.status.code(), Some(2), "{}", stderr(&out));
    let blobs = |job: &Job| walk(&job.path(".granule/blobs"));
    assert!(blobs(&job) >= 3, "the outputs were stored as blobs");
    let out = job.output(&["rm", "files"]);
    assert!(out.status.success(), "{}", stderr(&out));
    assert_eq!(
        blobs(&job),
        0,
        "rm deletes the files only the job referred to"
    );
    let out = job.output(&["jobs"]);
    assert!(!String::from_utf8_lossy(&out.stdout).contains("files "));
}

/// Files under `dir`, recursively (0 if it does not exist).
fn walk(dir: &Path) -> usize {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return 0;
    };
    entries
        .map(|e| {
            let p = e.unwrap().path();
            if p.is_dir() {
                walk(&p)
            } else {
                1
            }
        })
        .sum()
}

#[test]
fn wait_exits_with_the_code_of_the_job() {
    let job = poisoned_job();
    job.run(&[], &[]);
    let out = job.output(&["wait", "q"]);
    assert_eq!(out.status.code(), Some(1), "{}", stderr(&out));
    assert!(stderr(&out).contains("failed"), "{}", stderr(&out));
}

#[test]
fn status_in_an_empty_folder_creates_nothing_and_cancel_names_a_missing_job() {
    let job = Job::new("name = \"x\"\n");
    let out = job.output(&["status"]);
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    assert!(String::from_utf8_lossy(&out.stdout).contains("no granule store"));
    for args in [
        &["cancel", "nosuchjob"][..],
        &["wait", "x"],
        &["retry", "x"],
    ] {
        let out = job.output(args);
        assert_eq!(out.status.code(), Some(2), "{args:?}: {}", stderr(&out));
        assert!(
            stderr(&out).contains("no granule store"),
            "{}",
            stderr(&out)
        );
    }
    assert!(!job.path(".granule").exists(), "a read created a store");
    let job = poisoned_job();
    job.run(&[], &[]);
    let out = job.output(&["cancel", "nosuchjob"]);
    assert_eq!(out.status.code(), Some(2));
    assert!(
        stderr(&out).contains("no job named \"nosuchjob\""),
        "{}",
        stderr(&out)
    );
    let out = job.output(&["cancel", "q"]);
    assert!(
        stderr(&out).contains("is not running: it is failed"),
        "{}",
        stderr(&out)
    );
}

#[test]
fn status_costs_and_waste_are_not_zero_when_work_was_done_or_lost() {
    // One-item fragments (per item): the model's slope is 0, the cost is not.
    let job = Job::new(
        "name = \"p\"\n[[stage]]\nname = \"each\"\ncommand = [\"sh\", \"-c\", \"sleep 0.05\"]\nper_item = true\nitems = { range = [0, 6] }\nsizer = { max_items = 1 }\n",
    );
    let out = job.run(&[], &[]);
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    let status = job.status();
    let cost = stage(&status, 0)["item_cost_us"].as_f64().unwrap();
    assert!(
        cost >= 10_000.0,
        "a 50 ms item costs at least 10 ms: {cost} µs"
    );
    let text = serde_json::to_string(&status).unwrap();
    assert!(!text.contains("-0.0"), "no negative zeros: {text}");

    // An all-or-nothing task stopped by Ctrl-C: the time it ran is wasted.
    let job = Job::new(
        "name = \"aon\"\n[[stage]]\nname = \"slow\"\ncommand = [\"sh\", \"-c\", \"cat > /dev/null; sleep 30\"]\nitems = { range = [0, 4] }\n",
    );
    let mut run = Spawned::start(
        job.cmd(&["run", "job.toml", "--slots", "1", "--grace", "1s"])
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null()),
    );
    wait_until("a fragment running", PATIENCE, || {
        job.path(".granule/granule.db").exists()
            && stage(&job.status(), 0)["running_fragments"].as_u64() == Some(1)
    });
    std::thread::sleep(std::time::Duration::from_millis(500));
    // SAFETY: signalling our own child.
    unsafe { libc::kill(run.id() as i32, libc::SIGINT) };
    run.wait().unwrap();
    let wasted = stage(&job.status(), 0)["wasted_s"].as_f64().unwrap();
    assert!(
        wasted > 0.2,
        "the yielded all-or-nothing run is waste: {wasted}s"
    );
}

#[test]
fn a_run_killed_9_shows_its_worker_gone_and_the_work_lost() {
    let job = Job::new(
        "name = \"k\"\n[[stage]]\nname = \"slow\"\ncommand = [\"sh\", \"-c\", \"while read -r x; do sleep 0.2; echo $x >&3; done\"]\nitems = { range = [0, 400] }\n",
    );
    let mut run = start_run(&job, &[]);
    wait_until("some items done", PATIENCE, || {
        job.path(".granule/granule.db").exists() && done(&job) >= 4
    });
    // SAFETY: killing our own child's process group.
    unsafe { libc::kill(-(run.id() as i32), libc::SIGKILL) };
    run.wait().unwrap();
    let status = job.status();
    let workers = status["workers"].as_array().unwrap();
    assert!(!workers.is_empty());
    for w in workers {
        assert_eq!(
            w["state"], "exited",
            "a killed worker shows gone at once: {w}"
        );
        assert_eq!(w["busy"], 0);
    }
    // A rerun releases its fragments; the time they ran unacked counts as waste.
    let out = job.run(&[], &[]);
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    let wasted = stage(&job.status(), 0)["wasted_s"].as_f64().unwrap();
    assert!(
        wasted > 0.0,
        "the lost fragments' unacked time is waste: {wasted}"
    );
}

#[test]
fn explain_counts_match_status_and_exited_workers_do_not_fit() {
    let job = poisoned_job();
    job.run(&[], &[]);
    let out = job.output(&["status", "--explain", "work"]);
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    let s = stage(&job.status(), 0).clone();
    assert!(
        text.contains(&format!(
            "{} items pending, {} running",
            s["pending"], s["running"]
        )),
        "{text}"
    );
    assert!(text.contains("exited: takes no work"), "{text}");
    assert!(!text.contains(": fits"), "{text}");
}

#[test]
fn progress_names_fragment_sizes_waits_for_upstream_and_ends_with_a_summary() {
    let job = Job::new(
        "name = \"pr\"\n[[stage]]\nname = \"first\"\ncommand = [\"sh\", \"-c\", \"while read -r x; do echo $x >&3; done\"]\nitems = { range = [0, 50] }\n\
         [[stage]]\nname = \"second\"\ncommand = [\"sh\", \"-c\", \"while read -r x; do echo $x >&3; done\"]\nitems = { range = [0, 10] }\nafter = [\"first\"]\n",
    );
    let out = job.run(&[], &[]);
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    let err = stderr(&out);
    assert!(!err.contains(", fragment "), "a size reads as an id: {err}");
    assert!(err.contains("last fragment "), "{err}");
    assert!(err.contains("waiting for the stages before it"), "{err}");
    let last = err.lines().last().unwrap();
    assert!(
        last.contains("first 50/50 done, second 10/10 done in "),
        "a final summary line: {last}"
    );
}

#[test]
fn messages_name_what_the_user_wrote() {
    let job = Job::new("name = \"x\"\n[[stage]]\nname = \"resize\"\ncommand = [\"true\"]\nitems = { range = [0, 2] }\nretries = -1\n");
    let out = job.run(&[], &[]);
    assert_eq!(out.status.code(), Some(2));
    assert!(
        stderr(&out).contains("stage \"resize\".retries"),
        "{}",
        stderr(&out)
    );

    let out = job.output(&["run", "nonexistent.toml"]);
    assert_eq!(out.status.code(), Some(2));
    assert!(
        stderr(&out).contains("nonexistent.toml: cannot read the spec")
            && !stderr(&out).contains(":0:0"),
        "{}",
        stderr(&out)
    );

    let out = job.output(&["worker", "--lifespan", "banana"]);
    assert_eq!(out.status.code(), Some(2));
    assert!(
        stderr(&out).contains("\"banana\" is not a duration"),
        "{}",
        stderr(&out)
    );

    let job = Job::new("name = \"one\"\n[[stage]]\nname = \"s\"\ncommand = [\"true\"]\nitems = { range = [0, 1] }\n");
    let out = job.output(&["submit", "job.toml"]);
    assert!(stderr(&out).contains("1 stage, 1 item"), "{}", stderr(&out));
}

#[test]
fn the_readme_says_how_to_install_and_has_no_empty_section() {
    let readme =
        std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join("../../README.md"))
            .unwrap();
    assert!(readme.contains("cargo install --path crates/cli"));
    let (mut heading, mut body, mut fenced) = (None::<String>, 0, false);
    for line in readme.lines() {
        if line.starts_with("```") {
            fenced = !fenced;
        }
        if !fenced && line.starts_with('#') {
            if let Some(h) = heading.take() {
                assert!(body > 0, "README section {h:?} is empty");
            }
            heading = Some(line.to_string());
            body = 0;
        } else if !line.trim().is_empty() {
            body += 1;
        }
    }
}

#[test]
fn the_simulator_plot_shares_lanes_among_classes_and_labels_them() {
    let dir = tempfile::tempdir().unwrap();
    let scenario = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../examples/sim/mixed.toml");
    let svg = dir.path().join("mixed.svg");
    let out = output_of(granule().arg("sim").arg(&scenario).arg("--svg").arg(&svg));
    assert!(out.status.success(), "{}", stderr(&out));
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(text.contains("items by class: cpu "), "{text}");
    assert!(
        !text.contains(" h "),
        "short makespans are not hours: {text}"
    );
    let plot = std::fs::read_to_string(&svg).unwrap();
    for class in ["cpu", "memory", "io", "gpu"] {
        assert!(
            plot.contains(&format!("class {class} (")),
            "lane label of {class}"
        );
    }
    assert!(
        plot.contains("lost (worker killed)") && plot.contains("yielded"),
        "legend"
    );
}

#[test]
fn stopping_clears_the_bars_instead_of_leaving_a_stale_one_above() {
    // Bars need a terminal: `script` gives the run one and records what it drew.
    let job = Job::new(
        "name = \"tty\"\n[[stage]]\nname = \"slow\"\ncommand = [\"sh\", \"-c\", \"while read -r x; do sleep 0.02; echo $x >&3; done\"]\nitems = { range = [0, 400] }\n",
    );
    let exe = env!("CARGO_BIN_EXE_granule");
    let mut run = Spawned::start(
        std::process::Command::new("script")
            .args([
                "-qfec",
                &format!("{exe} run job.toml --slots 1 --grace 1s"),
                "typescript",
            ])
            .current_dir(job.dir.path())
            .env_remove("GRANULE_STORE")
            .env_remove("GRANULE_STATE")
            .stdin(std::process::Stdio::null())
            .stdout(std::process::Stdio::null()),
    );
    wait_until("items done", PATIENCE, || {
        job.path(".granule/granule.db").exists() && done(&job) >= 60
    });
    // The run itself (under `script` and maybe a shell): granule, in this job's folder.
    let folder = job.dir.path().canonicalize().unwrap();
    let pid: i32 = std::fs::read_dir("/proc")
        .unwrap()
        .filter_map(|e| e.ok()?.file_name().to_str()?.parse::<i32>().ok())
        .find(|pid| {
            let cmd = std::fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default();
            let cwd = std::fs::read_link(format!("/proc/{pid}/cwd")).ok();
            cmd.starts_with(exe.as_bytes()) && cwd.as_deref() == Some(folder.as_path())
        })
        .expect("the run under script");
    // SAFETY: signalling the run our own child started.
    unsafe { libc::kill(pid, libc::SIGINT) };
    run.wait().unwrap();
    let drawn =
        String::from_utf8_lossy(&std::fs::read(job.path("typescript")).unwrap()).into_owned();
    let (before, after) = drawn
        .split_once("stop requested")
        .unwrap_or_else(|| panic!("no stop message: {drawn}"));
    assert!(
        before.contains("[="),
        "bars were drawn before the stop: {before}"
    );
    assert!(
        !after.contains("[=") && !after.contains("[>"),
        "no bar is drawn after the stop message: {after}"
    );
}

/// A per-item command that fails on `bad` while `poison` exists, else prints `out-VALUE`.
fn fails_on(bad: u32) -> String {
    format!(
        "[\"sh\", \"-c\", \"if [ -e poison ] && [ \\\"$1\\\" = {bad} ]; then exit 1; fi; echo out-$1\", \"sh\", \"{{}}\"]"
    )
}

#[test]
fn retry_reopens_a_skipped_stage_only_when_its_upstream_is_clean() {
    let job = Job::new(&format!(
        "name = \"r\"\n[[stage]]\nname = \"x\"\ncommand = {}\nper_item = true\nretries = 0\nitems = {{ range = [0, 3] }}\n\
         [[stage]]\nname = \"y\"\ncommand = [\"true\", \"{{}}\"]\nper_item = true\nitems = {{ range = [0, 3] }}\nafter = [\"x\"]\n\
         [[stage]]\nname = \"a\"\ncommand = {}\nper_item = true\nretries = 0\nitems = {{ range = [0, 3] }}\n",
        fails_on(2),
        fails_on(1)
    ));
    std::fs::write(job.path("poison"), "").unwrap();
    assert_eq!(job.run(&[], &[]).status.code(), Some(1));
    let status = job.status();
    assert_eq!(stage(&status, 1)["state"], "skipped");
    // Retrying `a` alone leaves `y` skipped: `x` still has its quarantined item.
    assert!(job.output(&["retry", "r", "a"]).status.success());
    let status = job.status();
    assert_eq!(stage(&status, 1)["state"], "skipped", "{status}");
    assert_eq!(stage(&status, 0)["quarantined"], 1);
    // Fixed, everything retried: `y` runs after `x` is clean.
    std::fs::remove_file(job.path("poison")).unwrap();
    assert!(job.output(&["retry", "r"]).status.success());
    let out = job.run(&[], &[]);
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    let status = job.status();
    for i in 0..3 {
        assert_eq!(stage(&status, i)["done"], 3, "{status}");
    }
}

#[test]
fn retry_feeds_a_stage_that_streams_from_the_retried_one() {
    let job = Job::new(&format!(
        "name = \"s\"\n[[stage]]\nname = \"emit\"\ncommand = {}\nper_item = true\noutputs = \"stdout\"\nretries = 0\nitems = {{ range = [0, 3] }}\n\
         [[stage]]\nname = \"take\"\ncommand = [\"true\", \"{{}}\"]\nper_item = true\nitems = {{ from = \"emit\" }}\n",
        fails_on(2)
    ));
    std::fs::write(job.path("poison"), "").unwrap();
    assert_eq!(job.run(&[], &[]).status.code(), Some(1));
    assert_eq!(stage(&job.status(), 1)["done"], 2);
    std::fs::remove_file(job.path("poison")).unwrap();
    assert!(job.output(&["retry", "s"]).status.success());
    let out = job.run(&[], &[]);
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    let status = job.status();
    assert_eq!(
        stage(&status, 1)["done"],
        3,
        "the retried item's output ran too: {status}"
    );
}

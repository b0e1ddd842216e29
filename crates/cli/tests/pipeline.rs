//! Stages that feed stages: outputs published once whatever happens to workers,
//! streaming (a downstream stage works while its upstream runs), afterok and
//! after_any, output files through the blob store, and the example pipeline.

mod common;

use common::*;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

fn signal(pid: u32, sig: i32) {
    // SAFETY: signalling our own child.
    unsafe { libc::kill(pid as i32, sig) };
}

#[test]
fn outputs_reach_the_next_stage_exactly_once_while_workers_are_killed() {
    let items = 3000;
    for backend in backends("outputs_exactly_once_under_kills") {
        let job = Job::on(&two_stage_spec(items), &backend);
        std::fs::create_dir(job.path("out")).unwrap();
        let out = job.path("out").display().to_string();
        assert!(job.output(&["submit", "job.toml"]).status.success());
        let args = [
            "worker", "-q", "--slots", "1", "--grace", "1s", "--lease", "3s",
        ];
        let spawn = || {
            Spawned::start(
                job.cmd(&args)
                    .env("OUT_DIR", &out)
                    .stdout(Stdio::null())
                    .stderr(Stdio::null()),
            )
        };
        let mut workers = [spawn(), spawn()];
        let (mut kills, mut next) = (0u32, Instant::now() + Duration::from_millis(400));
        let deadline = Instant::now() + PATIENCE;
        while job.status()["jobs"][0]["state"] == "running" {
            assert!(Instant::now() < deadline, "not finished: {}", job.status());
            for w in workers.iter_mut() {
                if w.try_wait().unwrap().is_some() {
                    *w = spawn();
                }
            }
            if Instant::now() >= next {
                // Alternately a drain (SIGTERM) and a kill -9 (its fragments come
                // back when their lease expires).
                let victim = &workers[kills as usize % 2];
                let sig = [libc::SIGTERM, libc::SIGKILL][kills as usize % 2];
                signal(victim.id(), sig);
                kills += 1;
                next = Instant::now() + Duration::from_millis(500);
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        eprintln!("{}: {kills} kills", backend.name);
        assert!(kills >= 2, "{}: the chaos did not happen", backend.name);
        assert_exactly_once(&job, items);
    }
}

#[test]
fn a_worker_stopped_past_its_lease_publishes_nothing_twice() {
    let items = 2000;
    for backend in backends("outputs_after_a_lost_lease") {
        let job = Job::on(&two_stage_spec(items), &backend);
        std::fs::create_dir(job.path("out")).unwrap();
        let out = job.path("out").display().to_string();
        assert!(job.output(&["submit", "job.toml"]).status.success());
        let args = ["worker", "-q", "--slots", "1", "--lease", "2s"];
        let spawn = || {
            Spawned::start(
                job.cmd(&args)
                    .env("OUT_DIR", &out)
                    .stdout(Stdio::null())
                    .stderr(Stdio::null()),
            )
        };
        let (mut victim, mut other) = (spawn(), spawn());
        wait_until("both workers busy", PATIENCE, || {
            let s = job.status();
            let busy = busy_workers(&s);
            busy >= 2 && stage(&s, 0)["done"].as_u64() > Some(100)
        });
        // Stopped longer than its lease: its fragment goes to the other worker, and
        // what it flushes when it wakes (acks with outputs) must count nothing.
        signal(victim.id(), libc::SIGSTOP);
        let stopped = Instant::now();
        wait_until("the stopped worker's lease to lapse", PATIENCE, || {
            let s = job.status();
            stage(&s, 0)["lost"].as_u64() > Some(0) || stage(&s, 1)["lost"].as_u64() > Some(0)
        });
        while stopped.elapsed() < Duration::from_secs(4) {
            std::thread::sleep(Duration::from_millis(50));
        }
        signal(victim.id(), libc::SIGCONT);
        let deadline = Instant::now() + PATIENCE;
        while victim.try_wait().unwrap().is_none() || other.try_wait().unwrap().is_none() {
            assert!(Instant::now() < deadline, "not finished: {}", job.status());
            std::thread::sleep(Duration::from_millis(50));
        }
        assert_exactly_once(&job, items);
    }
}

#[test]
fn a_downstream_stage_works_while_its_upstream_still_runs() {
    let spec = r#"name = "stream"
[[stage]]
name = "slow"
command = ["sh", "-c", 'while read -r x; do sleep 0.05; echo "$GRANULE_CMD emit $x" >&3; echo "$x" >&3; done']
items = { range = [0, 200] }
# One token per fragment, and the worker has one: the upstream never takes both
# slots, whatever the sizer or the machine's load, so one is there for "fast".
resources = { token = 1 }

[[stage]]
name = "fast"
command = ["sh", "-c", 'while read -r v; do echo "$v" >&3; done']
items = { from = "slow" }
"#;
    let job = Job::new(spec);
    assert!(job.output(&["submit", "job.toml"]).status.success());
    let _worker = Spawned::start(
        job.cmd(&["worker", "-q", "--slots", "2", "--resource", "token=1"])
            .stdout(Stdio::null())
            .stderr(Stdio::null()),
    );
    let mut overlap = None;
    wait_until("the downstream stage's first item", PATIENCE, || {
        let status = job.status();
        let (up, down) = (stage(&status, 0), stage(&status, 1));
        if down["done"].as_u64() > Some(0) {
            overlap = Some((up["state"].clone(), up["done"].as_u64().unwrap()));
            // Its item count is what is known so far, and status says more come.
            assert_eq!(down["streams_from"][0], "slow", "{down}");
            if down["producing"] == true {
                // One output per upstream item so far: all 200 expected.
                assert_eq!(down["expected_items"], 200, "{down}");
            } else {
                assert_eq!(up["state"], "done", "{up}");
            }
            return true;
        }
        false
    });
    let (state, done) = overlap.unwrap();
    assert!(
        state != "done" && done < 200,
        "the downstream stage started only after its upstream ended ({state}, {done} done)"
    );
    wait_until("the job's end", PATIENCE, || {
        job.status()["jobs"][0]["state"] == "done"
    });
    let status = job.status();
    assert_eq!(stage(&status, 1)["done"], 200, "{status}");
}

#[test]
fn afterok_skips_a_stage_after_quarantined_items_and_after_any_runs_it() {
    // Item 3 of "bad" always fails: it is quarantined, and what would have come of
    // it never appears downstream.
    let spec = r#"name = "dag"
[[stage]]
name = "bad"
command = ["sh", "-c", 'test "$1" != 3 && echo "out-$1"', "bad", "{}"]
per_item = true
outputs = "stdout"
retries = 0
items = { range = [0, 6] }

[[stage]]
name = "strict"
command = ["true"]
items = { range = [0, 2] }
after = ["bad"]

[[stage]]
name = "anyway"
command = ["true"]
items = { range = [0, 2] }
after_any = ["bad"]

[[stage]]
name = "down"
command = ["sh", "-c", 'while read -r v; do echo "$v" >&3; done']
items = { from = "bad" }
"#;
    for backend in backends("afterok_and_after_any") {
        let job = Job::on(spec, &backend);
        let out = job.run(&[], &[]);
        assert_eq!(out.status.code(), Some(1), "{}", stderr(&out));
        let status = job.status();
        assert_eq!(status["jobs"][0]["state"], "failed", "{status}");
        assert_eq!(stage(&status, 0)["quarantined"], 1);
        assert_eq!(stage(&status, 1)["state"], "skipped", "{status}");
        assert_eq!(stage(&status, 1)["done"], 0);
        assert_eq!(stage(&status, 2)["state"], "done", "{status}");
        assert_eq!(stage(&status, 2)["done"], 2);
        assert_eq!(stage(&status, 3)["state"], "done");
        assert_eq!(stage(&status, 3)["done"], 5, "{status}");
        let values: Vec<String> = published(&job, "bad")
            .iter()
            .map(|r| r["value"].as_str().unwrap().to_string())
            .collect();
        let mut sorted = values.clone();
        sorted.sort();
        assert_eq!(sorted, ["out-0", "out-1", "out-2", "out-4", "out-5"]);
        let text = job.output(&["status", "dag"]);
        let text = String::from_utf8_lossy(&text.stdout);
        assert!(
            text.contains("quarantined items: \"3\"")
                && text.contains("missing downstream, in: down")
                && text.contains("skipped: it comes after bad"),
            "{text}"
        );
    }
}

#[test]
fn output_files_travel_through_the_blob_store_and_a_bad_blob_fails_the_reader() {
    // "make" writes a file per item and hands it over (`output PATH`); "read"
    // gets each as a local path and prints it. Items 0 and 1 write the same
    // content: one blob, fetched once into the host's cache.
    let spec = r#"name = "files"
[[stage]]
name = "make"
command = ["sh", "-c", 'while read -r x; do f=$(mktemp); if [ "$x" -lt 2 ]; then echo same > "$f"; else echo "content of $x" > "$f"; fi; echo "$GRANULE_CMD output $f" >&3; echo "$x" >&3; done']
items = { range = [0, 4] }

[[stage]]
name = "read"
command = ["sh", "-c", 'echo "$(cat "$1") at $1"', "read", "{}"]
per_item = true
outputs = "stdout"
items = { from = "make" }
"#;
    let job = Job::new(spec);
    let out = job.run(&[], &[]);
    assert!(out.status.success(), "{}", stderr(&out));
    let rows = published(&job, "read");
    let mut seen: Vec<String> = rows
        .iter()
        .map(|r| {
            r["value"]
                .as_str()
                .unwrap()
                .split(" at ")
                .next()
                .unwrap()
                .to_string()
        })
        .collect();
    seen.sort();
    assert_eq!(seen, ["content of 2", "content of 3", "same", "same"]);
    // The downstream task saw a path in the host's cache.
    let cache = job.path(".granule/cache").canonicalize().unwrap();
    for r in &rows {
        let path = r["value"].as_str().unwrap().split(" at ").nth(1).unwrap();
        assert!(path.starts_with(cache.to_str().unwrap()), "{path}");
    }
    let keys: Vec<_> = std::fs::read_dir(&cache)
        .unwrap()
        .filter_map(|e| e.ok())
        .filter(|e| e.file_name().len() == 64)
        .collect();
    assert_eq!(keys.len(), 3, "one cache entry per distinct content");
    let listed = job.output(&["outputs", "make", "--out", "copy"]);
    assert!(listed.status.success(), "{}", stderr(&listed));
    assert_eq!(
        std::fs::read_to_string(
            job.path("copy/2.0.").with_file_name(
                std::fs::read_dir(job.path("copy"))
                    .unwrap()
                    .filter_map(|e| e.ok())
                    .map(|e| e.file_name().into_string().unwrap())
                    .find(|n| n.starts_with("2.0."))
                    .unwrap()
            )
        )
        .unwrap(),
        "content of 2\n"
    );

    // The same job again, with every stored blob corrupted once "make" is done:
    // "read" fails on each (never reads wrong data) and quarantines its items.
    let spec = spec
        .replace("name = \"files\"", "name = \"files2\"")
        .replace(
            "items = { from = \"make\" }",
            "items = { from = \"make\" }\nafter = [\"corrupt\"]",
        )
        + r#"
[[stage]]
name = "corrupt"
command = ["sh", "-c", 'for f in .granule/blobs/*/*.zst; do printf garbage > "$f"; done']
items = { range = [0, 1] }
after = ["make"]
"#;
    std::fs::write(job.path("job.toml"), spec).unwrap();
    let out = job.run(&["--fresh"], &[]);
    assert_eq!(out.status.code(), Some(1), "{}", stderr(&out));
    let status = job.status();
    let read = status["jobs"]
        .as_array()
        .unwrap()
        .iter()
        .find(|j| j["name"] == "files2")
        .map(|j| j["stages"][1].clone())
        .unwrap();
    assert_eq!(read["done"], 0, "{read}");
    assert_eq!(read["quarantined"], 4, "{read}");
    let logs = job.output(&["logs", "read", "--job", "files2"]);
    let logs = String::from_utf8_lossy(&logs.stdout).into_owned() + &stderr(&logs);
    assert!(logs.contains("corrupt"), "{logs}");

    // rm: a running job is refused, an unknown one too (exit 2); gc then frees
    // the blobs of the removed jobs that rm left, and only those.
    std::fs::write(job.path("other.toml"), "name = \"other\"\n[[stage]]\nname = \"s\"\ncommand = [\"true\"]\nitems = { range = [0, 1] }\n").unwrap();
    assert!(job.output(&["submit", "other.toml"]).status.success());
    let refused = job.output(&["rm", "other"]);
    assert_eq!(refused.status.code(), Some(2), "{}", stderr(&refused));
    assert!(
        stderr(&refused).contains("still running"),
        "{}",
        stderr(&refused)
    );
    assert_eq!(job.output(&["rm", "nope"]).status.code(), Some(2));
    let gc_removes = |n: u32| {
        let out = job.output(&["gc", "--min-age", "0s"]);
        let said = stderr(&out);
        assert!(said.contains(&format!("removed {n} blobs")), "{said}");
    };
    gc_removes(0);
    assert!(job.output(&["rm", "files2"]).status.success());
    // "files" made the same contents: its blobs are its own too, and stay.
    gc_removes(0);
    // The last job that referred to them, but "files2" stored the same contents
    // after it ended: `rm` leaves what was touched since the job's end to gc.
    let removed = job.output(&["rm", "files"]);
    assert!(removed.status.success());
    assert!(
        stderr(&removed).contains("3 touched since it ended"),
        "{}",
        stderr(&removed)
    );
    gc_removes(3);
    assert_eq!(job.output(&["status", "files2"]).status.code(), Some(2));
}

#[test]
fn the_example_pipeline_totals_compressed_sizes_per_directory() {
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../..");
    let state = tempfile::tempdir().unwrap();
    let run = output_of(
        granule()
            .current_dir(&root)
            .args(["run", "-q", "examples/pipeline.toml", "--state"])
            .arg(state.path())
            .env_remove("GRANULE_STORE"),
    );
    assert!(run.status.success(), "{}", stderr(&run));
    let results = output_of(
        granule()
            .current_dir(&root)
            .args(["results", "total", "--state"])
            .arg(state.path())
            .env_remove("GRANULE_STORE"),
    );
    assert!(results.status.success(), "{}", stderr(&results));
    let mut got: Vec<String> = String::from_utf8(results.stdout)
        .unwrap()
        .lines()
        .map(String::from)
        .collect();
    got.sort();
    // What the pipeline computes, computed here apart from it.
    let mut expected = Vec::new();
    for dir in [
        "/usr/share/common-licenses",
        "/usr/share/base-files",
        "/etc/skel",
    ] {
        let mut total = 0;
        for entry in std::fs::read_dir(dir).unwrap() {
            let entry = entry.unwrap();
            let path = entry.path();
            // As `find -type f`: regular files, not symbolic links to them.
            if !entry.file_type().unwrap().is_file() || std::fs::File::open(&path).is_err() {
                continue;
            }
            let gz = Command::new("gzip")
                .arg("-9c")
                .stdin(std::fs::File::open(&path).unwrap())
                .output()
                .unwrap();
            total += gz.stdout.len();
        }
        if total > 0 {
            expected.push(format!("{dir}\t{total}"));
        }
    }
    expected.sort();
    assert_eq!(got, expected);
}

#[path = "../../exec/tests/moto/mod.rs"]
mod moto;

#[test]
fn output_files_travel_through_an_s3_blob_store() {
    let Some(server) = moto::moto() else { return };
    let env = server.env_with_bucket("granule-pipe");
    let env: Vec<(&str, &str)> = env.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
    let spec = r#"name = "s3"
[[stage]]
name = "make"
command = ["sh", "-c", 'while read -r x; do f=$(mktemp); seq "$x" > "$f"; echo "$GRANULE_CMD output $f" >&3; echo "$x" >&3; done']
items = { range = [1, 30] }

[[stage]]
name = "count"
command = ["wc", "-l", "{}"]
per_item = true
outputs = "stdout"
items = { from = "make" }
"#;
    let job = Job::new(spec);
    let out = job.run(&["--blobs", "s3://granule-pipe/runs"], &env);
    assert!(out.status.success(), "{}", stderr(&out));
    let mut counts: Vec<u64> = published(&job, "count")
        .iter()
        .map(|r| {
            let v = r["value"].as_str().unwrap();
            v.split_whitespace().next().unwrap().parse().unwrap()
        })
        .collect();
    counts.sort();
    assert_eq!(counts, (1..30).collect::<Vec<u64>>());
    // Nothing was written to the default folder store: the files went to S3.
    assert!(!job
        .path(".granule/blobs")
        .join("tmp")
        .read_dir()
        .is_ok_and(|mut d| d.next().is_some()));
    let local: usize = std::fs::read_dir(job.path(".granule/blobs"))
        .map(|d| {
            d.filter_map(|e| e.ok())
                .filter(|e| e.file_name().len() == 2)
                .count()
        })
        .unwrap_or(0);
    assert_eq!(local, 0, "blobs went to the local folder");
    // gc keeps what the job refers to, and after `rm` deletes it (no minimum age).
    let mut gc = job.cmd(&["gc", "--min-age", "0s", "--blobs", "s3://granule-pipe/runs"]);
    gc.envs(env.iter().copied());
    let kept = output_of(&mut gc);
    assert!(
        stderr(&kept).contains("removed 0 blobs"),
        "{}",
        stderr(&kept)
    );
    assert!(job.output(&["rm", "s3"]).status.success());
    let mut gc = job.cmd(&["gc", "--min-age", "0s", "--blobs", "s3://granule-pipe/runs"]);
    gc.envs(env.iter().copied());
    let freed = output_of(&mut gc);
    assert!(
        stderr(&freed).contains("removed 29 blobs"),
        "{}",
        stderr(&freed)
    );
}

#[test]
fn a_stage_whose_tasks_both_emit_and_checkpoint_is_refused_before_publishing() {
    // The first fragment (one item) keeps state, the later ones emit: a stateful
    // stage's acks can be undone, so its outputs could publish twice. Refused.
    let spec = r#"name = "mixed"
[[stage]]
name = "m"
command = ["sh", "-c", 'while read -r x; do if [ "$x" = 0 ]; then f=$(mktemp); echo s > "$f"; echo "$GRANULE_CMD checkpoint $f" >&3; else echo "$GRANULE_CMD emit $x" >&3; fi; echo "$x" >&3; done']
items = { range = [0, 50] }
initial = 1
"#;
    for backend in backends("emit_and_checkpoint_refused") {
        let job = Job::on(spec, &backend);
        let out = output_of(&mut job.cmd(&["run", "job.toml", "--slots", "1"]));
        assert_eq!(out.status.code(), Some(2), "{}", stderr(&out));
        assert!(
            stderr(&out).contains("both outputs and checkpoints"),
            "{}",
            stderr(&out)
        );
        assert!(published(&job, "m").is_empty(), "nothing was published");
    }
}

#[test]
fn a_removed_or_fresh_jobs_id_is_never_given_to_another_job() {
    // A long-lived worker keeps specs by job id: an id given again would run the
    // old job's command on the new job's items.
    let spec = |name: &str| {
        format!("name = \"{name}\"\n[[stage]]\nname = \"s\"\ncommand = [\"true\"]\nitems = {{ range = [0, 1] }}\n")
    };
    let job = Job::new(&spec("a"));
    assert!(job.run(&[], &[]).status.success());
    let id_of = |name: &str| {
        let mut store = granule_store::SqliteStore::open(&job.path(".granule/granule.db")).unwrap();
        granule_store::Store::job(&mut store, name)
            .unwrap()
            .map(|r| r.id)
    };
    let a = id_of("a").unwrap();
    assert!(job.output(&["rm", "a"]).status.success());
    assert_eq!(id_of("a"), None);
    std::fs::write(job.path("job.toml"), spec("b")).unwrap();
    assert!(job.run(&[], &[]).status.success());
    let b = id_of("b").unwrap();
    assert_ne!(a, b, "the removed job's id went to the next one");
    assert!(job.run(&["--fresh"], &[]).status.success());
    let fresh = id_of("b").unwrap();
    assert!(fresh != b && fresh != a, "--fresh gave an old id again");
    let listed = job.status();
    let names: Vec<_> = listed["jobs"]
        .as_array()
        .unwrap()
        .iter()
        .map(|j| j["name"].clone())
        .collect();
    assert_eq!(names, ["b"], "removed jobs are not listed");
}

#[test]
fn a_combining_stage_takes_each_partial_result_once() {
    // "sum" keeps a running sum (its fragments' results are partial sums);
    // "combine" takes those results as files and emits their total with its
    // last item's ack.
    let spec = r#"name = "reduce"
[[stage]]
name = "sum"
command = ["sh", "-c", '''f=$(mktemp); awk -v cmd="$GRANULE_CMD" -v prev="${GRANULE_CHECKPOINT:-}" -v out="$f" 'BEGIN { if (prev != "") { getline s < prev } } { s += $1; print $0 > "/dev/fd/3"; fflush("/dev/fd/3") } END { print s + 0 > out; close(out); print cmd " checkpoint " out > "/dev/fd/3" }'''']
items = { range = [0, 2000] }
initial = 1

[[stage]]
name = "combine"
command = ["sh", "-c", 'prev=""; total=0; while read -r p; do if [ -n "$prev" ]; then echo "$prev" >&3; fi; total=$((total + $(cat "$p"))); prev="$p"; done; echo "$GRANULE_CMD emit $total" >&3; echo "$prev" >&3']
items = { results_of = "sum" }
after = ["sum"]
sizer = { min_items = 1000000 }
"#;
    for backend in backends("results_of_combines") {
        let job = Job::on(spec, &backend);
        let out = job.run(&[], &[]);
        assert!(out.status.success(), "{}", stderr(&out));
        let totals: Vec<String> = published(&job, "combine")
            .iter()
            .map(|r| r["value"].as_str().unwrap().to_string())
            .collect();
        assert_eq!(totals, [(0..2000u64).sum::<u64>().to_string()]);
        let status = job.status();
        let (sum, combine) = (stage(&status, 0), stage(&status, 1));
        assert!(sum["fragments"].as_u64() > Some(2), "{sum}");
        assert_eq!(
            combine["items"], sum["results"],
            "one item per result: {status}"
        );
    }
}

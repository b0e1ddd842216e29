//! The task protocol against real child processes.

use granule_core::{FinishOutcome, FragmentId, IntervalSet, Span};
use granule_exec::{run_fragment, Control, Failure, FragmentJob, ItemSource, RunReport};
use granule_spec::ItemsSpec;
use std::time::{Duration, Instant};

fn job(argv: &[&str], span: Span, per_item: bool) -> FragmentJob {
    FragmentJob {
        fragment: FragmentId(1),
        span,
        argv: argv.iter().map(|s| s.to_string()).collect(),
        per_item,
        env: vec![("GRANULE_FIRST".into(), span.start.to_string())],
        source: ItemSource::open(&ItemsSpec::Range {
            start: 100,
            end: 10_100,
        })
        .unwrap(),
        limit: None,
        item_cost_ms: 1.0,
        deadline_share: 0.8,
        yield_by: None,
        feed_for: None,
        grace: Duration::from_secs(5),
        window: 8,
        window_max: 64,
        expect_acks: Some(true),
        first_ack_patience: Duration::from_secs(10),
        log_tail_bytes: 1024,
        checkpoint_level: 3,
        max_checkpoint_bytes: 1 << 20,
        data: None,
        scratch: std::env::temp_dir(),
        stdout_outputs: false,
        cwd: None,
        tee: None,
    }
}

/// The fragment ran without failing; its stderr tail otherwise.
fn assert_no_failure(report: &RunReport) {
    assert_eq!(
        report.failure,
        None,
        "{:?}",
        String::from_utf8_lossy(&report.stderr_tail)
    );
}

const ACKER: &str = r#"
import os, sys
ack = os.fdopen(3, "w", buffering=1)
for line in sys.stdin:
    v = line.strip()
    if v == os.environ.get("FAIL_AT"):
        sys.exit(3)
    ack.write(v + "\n")
"#;

#[test]
fn batch_acks_every_item_with_values_as_received() {
    let j = job(&["python3", "-c", ACKER], Span::new(10, 60), false);
    let ctl = Control::new(j.span);
    let report = run_fragment(&j, &ctl);
    assert_no_failure(&report);
    assert_eq!(report.acks, 50);
    assert_eq!(report.outcome, FinishOutcome::Success);
    let acked = ctl.take_unflushed().acked;
    assert_eq!(acked, IntervalSet::from_span(Span::new(10, 60)));
    assert!(report.first_ack_ms.is_some() && report.last_ack_ms >= report.first_ack_ms);
}

#[test]
fn a_command_that_never_acks_is_all_or_nothing() {
    let mut j = job(&["cat"], Span::new(0, 5000), false);
    j.expect_acks = Some(false);
    let ctl = Control::new(j.span);
    let report = run_fragment(&j, &ctl);
    assert_eq!(report.failure, None);
    assert_eq!(report.acks, 0);
    assert_eq!(report.fed, 5000);
    assert_eq!(
        report.outcome,
        FinishOutcome::AllOrNothing { fed_end: 5000 }
    );
    assert!(
        String::from_utf8_lossy(&report.stdout_tail).ends_with("5099\n"),
        "stdout tail is kept"
    );
    assert!(report.stdout_tail.len() <= 1024);
}

#[test]
fn a_failing_batch_keeps_its_acks_and_fails_the_rest() {
    let mut j = job(&["python3", "-c", ACKER], Span::new(0, 20), false);
    j.env.push(("FAIL_AT".into(), "107".into()));
    let ctl = Control::new(j.span);
    let report = run_fragment(&j, &ctl);
    assert_eq!(report.failure, Some(Failure::Exit(3)));
    assert_eq!(
        ctl.take_unflushed().acked,
        IntervalSet::from_span(Span::new(0, 7))
    );
    // Charged: the items fed and not acked (7 and the window after it), not the rest.
    let FinishOutcome::Failed {
        rest_failed: true,
        fed_end,
        ..
    } = report.outcome
    else {
        panic!("{:?}", report.outcome)
    };
    assert!((8..=20).contains(&fed_end), "fed_end {fed_end}");
}

#[test]
fn per_item_mode_acks_by_exit_status_and_names_culprits() {
    let j = job(
        &["sh", "-c", "test \"$1\" != 103", "sh", "{}"],
        Span::new(0, 6),
        true,
    );
    let ctl = Control::new(j.span);
    let report = run_fragment(&j, &ctl);
    assert_eq!(report.culprits, IntervalSet::from_span(Span::new(3, 4)));
    assert_eq!(report.acks, 5);
    assert!(matches!(
        report.outcome,
        FinishOutcome::Failed {
            rest_failed: false,
            ..
        }
    ));
}

#[test]
fn yield_closes_stdin_and_keeps_acked_work() {
    // Acks slowly; a yield after the first acks must end it quickly and cleanly.
    let slow = r#"
import os, sys, time
ack = os.fdopen(3, "w", buffering=1)
for line in sys.stdin:
    time.sleep(0.02)
    ack.write(line)
"#;
    let j = job(&["python3", "-c", slow], Span::new(0, 10_000), false);
    let ctl = Control::new(j.span);
    let runner = {
        let (j, ctl) = (j.clone(), ctl.clone());
        std::thread::spawn(move || run_fragment(&j, &ctl))
    };
    let deadline = Instant::now() + Duration::from_secs(20);
    while ctl.progress().acks < 3 {
        assert!(Instant::now() < deadline, "no acks");
        std::thread::sleep(Duration::from_millis(5));
    }
    ctl.request_yield();
    let report = runner.join().unwrap();
    assert!(report.yielded);
    assert_eq!(report.failure, None);
    assert_eq!(report.outcome, FinishOutcome::Yielded);
    assert!(
        report.fed <= report.acks + j.window,
        "fed {} acked {}",
        report.fed,
        report.acks
    );
}

#[test]
fn split_stops_feeding_the_tail() {
    let slow = r#"
import os, sys, time
ack = os.fdopen(3, "w", buffering=1)
for line in sys.stdin:
    time.sleep(0.01)
    ack.write(line)
"#;
    let j = job(&["python3", "-c", slow], Span::new(0, 1000), false);
    let ctl = Control::new(j.span);
    let runner = {
        let (j, ctl) = (j.clone(), ctl.clone());
        std::thread::spawn(move || run_fragment(&j, &ctl))
    };
    while ctl.progress().acks < 2 {
        std::thread::sleep(Duration::from_millis(5));
    }
    let at = ctl.split_at(20).expect("split");
    assert!((20..1000).contains(&at));
    let report = runner.join().unwrap();
    assert_eq!(report.fed, at);
    assert_eq!(report.acks, at);
    assert_eq!(
        ctl.take_unflushed().acked,
        IntervalSet::from_span(Span::new(0, at))
    );
}

#[test]
fn a_task_that_acks_in_batches_larger_than_the_window_is_fed_enough() {
    // Acks every 20 items, all at once; the window starts at 8. The task reads
    // all it was fed and waits for more before it acks: without the window
    // growing to `window_max` it would wait for ever.
    let batches = r#"
import os, sys
ack = os.fdopen(3, "w")
pending = []
for line in sys.stdin:
    pending.append(line)
    if len(pending) == 20:
        ack.write("".join(pending))
        ack.flush()
        pending = []
ack.write("".join(pending))
"#;
    let mut j = job(&["python3", "-c", batches], Span::new(0, 200), false);
    j.first_ack_patience = Duration::from_secs(600);
    let ctl = Control::new(j.span);
    let runner = {
        let (j, ctl) = (j.clone(), ctl.clone());
        std::thread::spawn(move || run_fragment(&j, &ctl))
    };
    let deadline = std::time::Instant::now() + Duration::from_secs(120);
    while !runner.is_finished() && std::time::Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(20));
    }
    if !runner.is_finished() {
        ctl.kill(); // ends the task, so no process outlives the test
        let _ = runner.join();
        panic!("a task acking in batches of 20 was held at a window of 8");
    }
    let report = runner.join().unwrap();
    assert_no_failure(&report);
    assert_eq!(report.acks, 200);
    assert!(
        report.acks_in_batches,
        "the worker is told to feed more next time"
    );
}

#[test]
fn checkpoint_lines_are_read_and_sealed() {
    let dir = tempfile::tempdir().unwrap();
    let state = dir.path().join("state");
    let script = format!(
        r#"
import os, sys
ack = os.fdopen(3, "w", buffering=1)
total = 0
for line in sys.stdin:
    total += int(line)
    ack.write(line)
open("{0}", "w").write(str(total))
ack.write(os.environ["GRANULE_CMD"] + " checkpoint {0}\n")
"#,
        state.display()
    );
    let j = job(&["python3", "-c", &script], Span::new(0, 10), false);
    let ctl = Control::new(j.span);
    let report = run_fragment(&j, &ctl);
    assert_eq!(report.outcome, FinishOutcome::Success);
    let checkpoints = ctl.take_unflushed().checkpoints;
    assert_eq!(checkpoints.len(), 1);
    assert_eq!(checkpoints[0].acks, 10);
    assert_eq!(
        checkpoints[0].acked,
        IntervalSet::from_span(Span::new(0, 10))
    );
    let raw = checkpoints[0].blob.open(1 << 20).unwrap();
    assert_eq!(
        String::from_utf8(raw).unwrap(),
        (100..110).sum::<u64>().to_string()
    );
}

#[test]
fn limit_kills_and_classifies_a_timeout() {
    let mut j = job(&["sleep", "30"], Span::new(0, 1), true);
    j.limit = Some(Duration::from_millis(300));
    let ctl = Control::new(j.span);
    let report = run_fragment(&j, &ctl);
    assert_eq!(report.failure, Some(Failure::Timeout(300)));
    assert!(report.duration_ms < 10_000.0);
}

#[test]
fn signals_are_classified() {
    let j = job(&["sh", "-c", "kill -SEGV $$"], Span::new(0, 3), false);
    let report = run_fragment(&j, &Control::new(j.span));
    assert_eq!(report.failure, Some(Failure::Signal(libc_sigsegv())));
}

fn libc_sigsegv() -> i32 {
    11
}

#[test]
fn a_task_that_ignores_stdin_and_never_acks_is_all_or_nothing() {
    // It may read its range from GRANULE_FIRST / GRANULE_COUNT instead.
    let mut j = job(&["true"], Span::new(0, 100), false);
    j.expect_acks = None;
    let ctl = Control::new(j.span);
    let report = run_fragment(&j, &ctl);
    assert_eq!(report.failure, None);
    assert!(matches!(report.outcome, FinishOutcome::AllOrNothing { .. }));
}

#[test]
fn exiting_zero_early_without_an_ack_reports_what_it_was_fed() {
    // Reads one line and leaves: the window (8) holds the rest back, so most of its
    // items were never given to it. The ledger judges: all-or-nothing while the
    // stage never acked, else a failure of the fed items only.
    let j = job(
        &["python3", "-c", "import sys; sys.stdin.readline()"],
        Span::new(0, 100),
        false,
    );
    let ctl = Control::new(j.span);
    let report = run_fragment(&j, &ctl);
    assert_eq!(report.failure, None);
    assert!(
        matches!(report.outcome, FinishOutcome::AllOrNothing { fed_end } if fed_end <= 8),
        "{:?}",
        report.outcome
    );
}

const SLOW_ACKER: &str = r#"
import os, sys, time
ack = os.fdopen(3, "w", buffering=1)
for line in sys.stdin:
    time.sleep(0.01)
    ack.write(line)
"#;

#[test]
fn a_fragment_that_acks_runs_what_fits_its_life_and_hands_back_the_rest() {
    // 10,000 items of 10 ms on a worker whose life ends in 3 s: the old fragment
    // yielded at its first ack (its whole span did not fit) and the worker paid a
    // task start for each of a string of claims. Now feeding stops where the items
    // fed are predicted to finish in time, and the unfed tail is handed back.
    let mut j = job(
        &["python3", "-c", SLOW_ACKER],
        Span::new(100, 10_100),
        false,
    );
    j.item_cost_ms = 10.0;
    j.yield_by = Some(Instant::now() + Duration::from_secs(3));
    let ctl = Control::new(j.span);
    let report = run_fragment(&j, &ctl);
    assert_no_failure(&report);
    assert!(report.acks >= 30, "ran only {} items", report.acks);
    assert!(report.end < j.span.end, "{report:?}");
    // Everything fed was run and acked: the fragment ends where feeding stopped.
    assert_eq!(report.acks, report.end - j.span.start, "{report:?}");
}

#[test]
fn an_elastic_fragment_is_fed_until_its_target_at_the_pace_its_acks_show() {
    // A generous claim (10,000 items of 10 ms) whose target is 1 s, with no per-item
    // cost known at the claim: feeding stops once what was fed reaches the target at
    // the pace of the acks, everything fed runs, and the unfed tail is handed back.
    let mut j = job(
        &["python3", "-c", SLOW_ACKER],
        Span::new(100, 10_100),
        false,
    );
    j.item_cost_ms = 0.0;
    j.feed_for = Some(Duration::from_secs(1));
    let ctl = Control::new(j.span);
    let report = run_fragment(&j, &ctl);
    assert_no_failure(&report);
    // Items take 10 ms or more (a loaded machine only slows them): at most about
    // 100 fit the target, and at least a few ran before the cut.
    assert!(report.acks >= 5, "ran only {} items", report.acks);
    assert!(report.end - j.span.start <= 200, "{report:?}");
    assert_eq!(report.acks, report.end - j.span.start, "{report:?}");
}

#[test]
fn outputs_belong_to_the_item_acked_after_them() {
    // Item 100 gets two records and item 101 none; a record written after the
    // last ack belongs to no item and is dropped with it.
    let script = r#"read -r a; echo "$GRANULE_CMD emit x $a" >&3; echo "$GRANULE_CMD emit" >&3; echo "$a" >&3;
        read -r b; echo "$b" >&3; echo "$GRANULE_CMD emit late" >&3"#;
    let job = job(&["sh", "-c", script], Span::new(0, 2), false);
    let ctl = Control::new(job.span);
    let report = run_fragment(&job, &ctl);
    assert_no_failure(&report);
    let unflushed = ctl.take_unflushed();
    assert_eq!(unflushed.acked.len(), 2);
    assert_eq!(
        unflushed.outputs,
        [granule_core::ItemOutputs {
            item: 0,
            outputs: vec![
                granule_core::Output::Record(b"x 100".to_vec()),
                granule_core::Output::Record(Vec::new()),
            ],
        }]
    );
}

#[test]
fn outputs_without_any_ack_or_beside_checkpoints_fail_the_fragment() {
    let job1 = job(
        &[
            "sh",
            "-c",
            r#"while read -r x; do echo "$GRANULE_CMD emit $x" >&3; done"#,
        ],
        Span::new(0, 3),
        false,
    );
    let report = run_fragment(&job1, &Control::new(job1.span));
    assert!(
        matches!(&report.failure, Some(Failure::Output(m)) if m.contains("acked no item")),
        "{:?}",
        report.failure
    );
    let script = r#"read -r x; f=$(mktemp); echo s > "$f"; echo "$GRANULE_CMD emit $x" >&3; echo "$GRANULE_CMD checkpoint $f" >&3; echo "$x" >&3"#;
    let job2 = job(&["sh", "-c", script], Span::new(0, 1), false);
    let report = run_fragment(&job2, &Control::new(job2.span));
    assert!(
        matches!(&report.failure, Some(Failure::Output(m)) if m.contains("outputs and checkpoints")),
        "{:?}",
        report.failure
    );
}

#[test]
fn each_stdout_line_of_a_per_item_task_is_an_output_of_its_item() {
    let mut job = job(
        &["sh", "-c", "echo a$1; printf 'b%s' $1", "t", "{}"],
        Span::new(0, 2),
        true,
    );
    job.stdout_outputs = true;
    let ctl = Control::new(job.span);
    let report = run_fragment(&job, &ctl);
    assert_no_failure(&report);
    let rec = |s: &str| granule_core::Output::Record(s.as_bytes().to_vec());
    assert_eq!(
        ctl.take_unflushed().outputs,
        [
            granule_core::ItemOutputs {
                item: 0,
                outputs: vec![rec("a100"), rec("b100")],
            },
            granule_core::ItemOutputs {
                item: 1,
                outputs: vec![rec("a101"), rec("b101")],
            },
        ]
    );
}

#[test]
fn an_output_file_is_stored_by_content_before_its_ack_counts() {
    let dir = tempfile::tempdir().unwrap();
    let store = granule_exec::DataStore::open(dir.path().join("b").to_str().unwrap(), 3).unwrap();
    let mut job = job(
        &[
            "sh",
            "-c",
            r#"read -r x; f=$(mktemp); echo "file $x" > "$f"; echo "$GRANULE_CMD output $f" >&3; echo "$x" >&3; rm "$f""#,
        ],
        Span::new(0, 1),
        false,
    );
    job.data = Some(std::sync::Arc::new(store));
    let ctl = Control::new(job.span);
    assert_no_failure(&run_fragment(&job, &ctl));
    let outputs = ctl.take_unflushed().outputs;
    let granule_core::Output::File { key, bytes, .. } = &outputs[0].outputs[0] else {
        panic!("{outputs:?}");
    };
    assert_eq!(*bytes, 9);
    let back = dir.path().join("back");
    job.data.as_ref().unwrap().fetch(key, &back).unwrap();
    assert_eq!(std::fs::read_to_string(back).unwrap(), "file 100\n");
}

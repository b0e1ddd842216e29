//! The task boundary, tried as an adversary would (issue 9): partial acks, byte
//! items, checkpoints that cannot be read, commands hidden in item values,
//! runaway lines, grandchildren that hold the pipes, items that change.

use granule_core::{FinishOutcome, FragmentId, IntervalSet, Span};
use granule_exec::{run_fragment, Control, Failure, FragmentJob, ItemSource};
use granule_spec::ItemsSpec;
use std::path::Path;
use std::time::{Duration, Instant};

fn job(argv: &[&str], source: ItemSource, span: Span) -> FragmentJob {
    FragmentJob {
        fragment: FragmentId(1),
        span,
        argv: argv.iter().map(|s| s.to_string()).collect(),
        per_item: false,
        env: Vec::new(),
        source,
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
        log_tail_bytes: 4096,
        checkpoint_level: 3,
        max_checkpoint_bytes: 1 << 20,
        data: None,
        scratch: std::env::temp_dir(),
        stdout_outputs: false,
        cwd: None,
        tee: None,
    }
}

fn range(start: i64, end: i64) -> ItemSource {
    ItemSource::open(&ItemsSpec::Range { start, end }).unwrap()
}

fn lines(path: &Path) -> ItemSource {
    let scan = granule_spec::scan_lines(path).unwrap();
    ItemSource::open(&ItemsSpec::Lines {
        path: path.to_path_buf(),
        count: scan.count,
        bytes: scan.bytes,
        hash: Some(scan.hash),
    })
    .unwrap()
}

fn list(values: &[&str]) -> ItemSource {
    ItemSource::open(&ItemsSpec::List {
        values: values.iter().map(|v| v.to_string()).collect(),
    })
    .unwrap()
}

fn sh(script: &str) -> Vec<&str> {
    vec!["sh", "-c", script]
}

#[test]
fn a_task_that_acks_only_some_items_fails_the_others() {
    let script = "while read -r x; do if [ $((x % 2)) -eq 0 ]; then echo $x >&3; fi; done";
    let j = job(&sh(script), range(0, 10), Span::new(0, 10));
    let ctl = Control::new(j.span);
    let report = run_fragment(&j, &ctl);
    assert_eq!(report.failure, Some(Failure::Unacked(5)));
    assert_eq!(report.acks, 5);
    assert!(matches!(
        report.outcome,
        FinishOutcome::Failed {
            rest_failed: true,
            ..
        }
    ));
}

#[test]
fn lines_that_are_not_utf8_are_fed_as_the_bytes_they_are() {
    let dir = tempfile::tempdir().unwrap();
    let items = dir.path().join("items.txt");
    let input = b"a\nb\n\xff\xfe bad\nc\nd\n";
    std::fs::write(&items, input).unwrap();
    // Batch, a task that never acks: every line reaches it.
    let out = dir.path().join("out");
    let script = format!("cat > '{}'", out.display());
    let mut j = job(&sh(&script), lines(&items), Span::new(0, 5));
    j.expect_acks = None;
    let report = run_fragment(&j, &Control::new(j.span));
    assert_eq!(report.failure, None);
    assert_eq!(report.outcome, FinishOutcome::AllOrNothing { fed_end: 5 });
    assert_eq!(std::fs::read(&out).unwrap(), input);
    // Per item: each line is one argv element, bytes intact; every item acked.
    let out = dir.path().join("per-item");
    let script = format!("printf '%s\\n' \"$1\" >> '{}'", out.display());
    let mut j = job(
        &["sh", "-c", &script, "sh", "{}"],
        lines(&items),
        Span::new(0, 5),
    );
    j.per_item = true;
    let ctl = Control::new(j.span);
    let report = run_fragment(&j, &ctl);
    assert_eq!(
        report.outcome,
        FinishOutcome::Success,
        "{:?}",
        report.failure
    );
    assert_eq!(ctl.take_unflushed().acked, IntervalSet::from_span(j.span));
    assert_eq!(std::fs::read(&out).unwrap(), input);
}

#[test]
fn an_ack_is_the_value_as_read_whatever_its_bytes() {
    let dir = tempfile::tempdir().unwrap();
    let items = dir.path().join("items.txt");
    std::fs::write(&items, b"\xff\xfe bad\n\n  x y  \n").unwrap();
    let echo = "while IFS= read -r x; do printf '%s\\n' \"$x\" >&3; done";
    let j = job(&sh(echo), lines(&items), Span::new(0, 3));
    let ctl = Control::new(j.span);
    let report = run_fragment(&j, &ctl);
    assert_eq!(
        report.outcome,
        FinishOutcome::Success,
        "{:?}",
        report.failure
    );
    assert_eq!(report.bad_acks, 0);
    assert_eq!(ctl.take_unflushed().acked, IntervalSet::from_span(j.span));
}

#[test]
fn an_item_that_reads_like_a_command_is_only_ever_an_ack() {
    let echo = "while IFS= read -r x; do printf '%s\\n' \"$x\" >&3; done";
    let source = list(&["checkpoint /etc/passwd", "x"]);
    let j = job(&sh(echo), source, Span::new(0, 2));
    let ctl = Control::new(j.span);
    let report = run_fragment(&j, &ctl);
    assert_eq!(
        report.outcome,
        FinishOutcome::Success,
        "{:?}",
        report.failure
    );
    let granule_exec::Unflushed {
        acked, checkpoints, ..
    } = ctl.take_unflushed();
    assert_eq!(acked, IntervalSet::from_span(j.span));
    assert!(checkpoints.is_empty(), "nothing was read as a checkpoint");
}

#[test]
fn a_version_one_checkpoint_line_fails_and_says_how_to_write_it_now() {
    let dir = tempfile::tempdir().unwrap();
    let state = dir.path().join("state");
    std::fs::write(&state, "42").unwrap();
    let script = format!(
        "while read -r x; do echo $x >&3; done; echo 'checkpoint {}' >&3",
        state.display()
    );
    let j = job(&sh(&script), range(0, 3), Span::new(0, 3));
    let ctl = Control::new(j.span);
    let report = run_fragment(&j, &ctl);
    let Some(Failure::Protocol(msg)) = &report.failure else {
        panic!("{:?}", report.failure)
    };
    assert!(msg.contains("GRANULE_CMD checkpoint"), "{msg}");
    assert!(ctl.take_unflushed().checkpoints.is_empty());
}

#[test]
fn a_checkpoint_that_is_a_fifo_fails_the_fragment_and_counts_none_of_its_acks() {
    let dir = tempfile::tempdir().unwrap();
    let fifo = dir.path().join("fifo");
    let script = format!(
        "mkfifo '{0}'; read -r a; read -r b; printf '%s\\n%s\\n%s checkpoint {0}\\n' $a $b \"$GRANULE_CMD\" >&3; sleep 0.2",
        fifo.display()
    );
    let j = job(&sh(&script), range(0, 2), Span::new(0, 2));
    let ctl = Control::new(j.span);
    let started = Instant::now();
    let report = run_fragment(&j, &ctl);
    let Some(Failure::Checkpoint(msg)) = &report.failure else {
        panic!("{:?}", report.failure)
    };
    assert!(msg.contains("not a regular file"), "{msg}");
    assert_eq!(report.acks, 0, "the acks written with it are not counted");
    assert!(
        started.elapsed() < Duration::from_secs(50),
        "never waited for the FIFO"
    );
}

#[test]
fn a_checkpoint_over_the_limit_or_a_device_is_refused_unread() {
    let dir = tempfile::tempdir().unwrap();
    let big = dir.path().join("big");
    std::fs::write(&big, vec![7u8; 2 << 20]).unwrap();
    for (path, expect) in [
        (big.display().to_string(), "over the stage's max_checkpoint"),
        ("/dev/zero".to_string(), "not a regular file"),
    ] {
        let script =
            format!("read -r a; printf '%s\\n%s checkpoint {path}\\n' $a \"$GRANULE_CMD\" >&3");
        let j = job(&sh(&script), range(0, 1), Span::new(0, 1));
        let report = run_fragment(&j, &Control::new(j.span));
        let Some(Failure::Checkpoint(msg)) = &report.failure else {
            panic!("{path}: {:?}", report.failure)
        };
        assert!(msg.contains(expect), "{msg}");
    }
}

#[test]
fn a_checkpoint_that_takes_long_to_seal_is_waited_for_not_dropped() {
    // 4 MB of text at zstd level 19 takes seconds to seal (granule once stopped
    // waiting for fd 3 after 2 s and counted the fragment done without it).
    let dir = tempfile::tempdir().unwrap();
    let state = dir.path().join("state");
    let text: Vec<u8> = (0..500_000u64)
        .flat_map(|i| format!("{:07}\n", (i * 7919) % 9_999_991).into_bytes())
        .collect();
    std::fs::write(&state, &text).unwrap();
    let script = format!(
        "read -r a; printf '%s\\n%s checkpoint {}\\n' $a \"$GRANULE_CMD\" >&3",
        state.display()
    );
    let mut j = job(&sh(&script), range(0, 1), Span::new(0, 1));
    j.checkpoint_level = 19;
    j.max_checkpoint_bytes = 64 << 20;
    let ctl = Control::new(j.span);
    let report = run_fragment(&j, &ctl);
    assert_eq!(
        report.outcome,
        FinishOutcome::Success,
        "{:?}",
        report.failure
    );
    let granule_exec::Unflushed {
        acked, checkpoints, ..
    } = ctl.take_unflushed();
    assert_eq!(acked.len(), 1);
    assert_eq!(checkpoints.len(), 1);
    assert_eq!(
        checkpoints[0].blob.open(64 << 20).unwrap().len(),
        text.len()
    );
}

#[test]
fn a_runaway_line_on_fd3_fails_fast_with_bounded_memory() {
    let script = "head -c 40000000 /dev/zero | tr '\\0' x >&3";
    let j = job(&sh(script), range(0, 1), Span::new(0, 1));
    let report = run_fragment(&j, &Control::new(j.span));
    let Some(Failure::Protocol(msg)) = &report.failure else {
        panic!("{:?}", report.failure)
    };
    assert!(msg.contains("longer than"), "{msg}");
}

#[test]
fn every_ack_written_before_the_task_exits_is_counted() {
    let mut j = job(
        &["sh", "-c", "cat >&3"],
        range(0, 200_000),
        Span::new(0, 200_000),
    );
    j.window = 1 << 20;
    let ctl = Control::new(j.span);
    let report = run_fragment(&j, &ctl);
    assert_eq!(
        report.outcome,
        FinishOutcome::Success,
        "{:?}",
        report.failure
    );
    assert_eq!(ctl.take_unflushed().acked, IntervalSet::from_span(j.span));
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
fn a_grandchild_holding_the_pipes_neither_holds_the_fragment_nor_outlives_it() {
    let dir = tempfile::tempdir().unwrap();
    let pidfile = dir.path().join("pid");
    let script = format!(
        "sleep 120 & echo $! > '{}'; while read -r x; do echo $x >&3; done",
        pidfile.display()
    );
    let j = job(&sh(&script), range(0, 5), Span::new(0, 5));
    let ctl = Control::new(j.span);
    let report = run_fragment(&j, &ctl);
    assert_eq!(
        report.outcome,
        FinishOutcome::Success,
        "{:?}",
        report.failure
    );
    let pid: i32 = std::fs::read_to_string(&pidfile)
        .unwrap()
        .trim()
        .parse()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(30);
    while alive(pid) {
        assert!(
            Instant::now() < deadline,
            "the grandchild {pid} outlived its fragment"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[test]
fn a_file_that_ends_early_while_feeding_fails_the_fragment() {
    let dir = tempfile::tempdir().unwrap();
    let items = dir.path().join("items.txt");
    let text: String = (0..50_000).map(|i| format!("{i}\n")).collect();
    std::fs::write(&items, &text).unwrap();
    let source = lines(&items);
    std::fs::write(&items, "0\n1\n").unwrap();
    let mut j = job(
        &["sh", "-c", "cat > /dev/null"],
        source,
        Span::new(0, 50_000),
    );
    j.expect_acks = None;
    let report = run_fragment(&j, &Control::new(j.span));
    let Some(Failure::Items(msg)) = &report.failure else {
        panic!("{:?}", report.failure)
    };
    assert!(msg.contains("changed since the job was submitted"), "{msg}");
}

#[test]
fn tasks_never_see_the_store_credentials() {
    std::env::set_var("GRANULE_STORE", "postgres://granule:secret@db/granule");
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("env");
    let script = format!("env > '{}'; cat > /dev/null", out.display());
    let mut j = job(&sh(&script), range(0, 1), Span::new(0, 1));
    j.expect_acks = None;
    run_fragment(&j, &Control::new(j.span));
    let env = std::fs::read_to_string(&out).unwrap();
    assert!(!env.contains("secret"), "{env}");
    assert!(env.contains("GRANULE_PROTOCOL=2"));
    assert!(env.contains("GRANULE_CMD=granule2:"));
}

#[test]
fn the_fd3_corpus_parses_or_fails_cleanly_in_any_chunks() {
    use granule_exec::protocol::Parser;
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/corpus");
    let mut seen = 0;
    for entry in std::fs::read_dir(dir).unwrap() {
        let bytes = std::fs::read(entry.unwrap().path()).unwrap();
        for chunk in [1, 7, 4096, usize::MAX] {
            let mut parser = Parser::new("granule2:00112233aabbccdd", 65_536);
            let mut lines = 0;
            let fed = bytes
                .chunks(chunk.min(bytes.len().max(1)))
                .try_for_each(|c| parser.feed(c, |_| lines += 1));
            if fed.is_ok() {
                let _ = parser.finish(|_| lines += 1);
            }
        }
        seen += 1;
    }
    assert!(seen >= 5);
}

#[test]
fn a_task_that_reads_everything_before_its_first_ack_has_every_ack_counted() {
    // More values in flight than granule tracks for a task that may never ack: in a
    // stage known to ack, each late ack must still find its item.
    let dir = tempfile::tempdir().unwrap();
    let items = dir.path().join("items");
    let n = 70_000;
    let text: String = (0..n).map(|i| format!("v{i}\n")).collect();
    std::fs::write(&items, text).unwrap();
    let held = dir.path().join("held");
    let script = format!("cat > '{0}'; cat '{0}' >&3", held.display());
    let mut j = job(&sh(&script), lines(&items), Span::new(0, n));
    j.first_ack_patience = Duration::ZERO;
    let ctl = Control::new(j.span);
    let report = run_fragment(&j, &ctl);
    assert_eq!(report.failure, None);
    assert_eq!(report.acks, n);
    assert!(
        matches!(report.outcome, FinishOutcome::Success),
        "{:?}",
        report.outcome
    );
}

#[test]
fn a_last_ack_without_a_newline_counts_only_from_a_task_that_exited_0() {
    // Killed mid-write, `12` may be the start of `123`: it is not an ack. Written by
    // a task that exited on its own, it is.
    let killed = "read -r a; read -r b; read -r c; printf '%s\\n%s\\n%s' $a $b $c >&3; kill -9 $$";
    let j = job(&sh(killed), range(0, 3), Span::new(0, 3));
    let ctl = Control::new(j.span);
    let report = run_fragment(&j, &ctl);
    assert_eq!(report.acks, 2);
    assert_eq!(report.failure, Some(Failure::Signal(9)));

    let clean = "read -r a; read -r b; read -r c; printf '%s\\n%s\\n%s' $a $b $c >&3";
    let j = job(&sh(clean), range(0, 3), Span::new(0, 3));
    let ctl = Control::new(j.span);
    let report = run_fragment(&j, &ctl);
    assert_eq!(report.acks, 3);
    assert_eq!(report.failure, None);
}

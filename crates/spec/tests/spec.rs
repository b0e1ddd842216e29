//! Job spec parsing: a full valid spec, and one test per kind of bad spec,
//! each checking the line and key the error points at.

use granule_core::SizerConfig;
use granule_spec::{job_hash, load, parse, ItemsSpec, JobSpec, SpecError};
use std::path::Path;
use tempfile::TempDir;

/// Writes `text` as `job.toml` in a fresh folder and loads it.
fn load_text(text: &str) -> (TempDir, Result<JobSpec, SpecError>) {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("job.toml");
    std::fs::write(&path, text).expect("write spec");
    let result = load(&path);
    (dir, result)
}

/// Loads `text`, expecting an error; returns it.
fn error(text: &str) -> SpecError {
    match load_text(text).1 {
        Ok(spec) => panic!("expected an error, got {spec:?}"),
        Err(e) => e,
    }
}

/// Asserts the error's line, key and that its message contains `needle`.
fn assert_err(text: &str, line: usize, key: &str, needle: &str) -> SpecError {
    let e = error(text);
    assert_eq!((e.line, e.key.as_str()), (line, key), "error: {e}");
    assert!(
        e.message.contains(needle),
        "message {:?} lacks {needle:?}",
        e.message
    );
    e
}

/// A valid one-stage spec with `extra` appended to the stage.
fn one_stage(extra: &str) -> String {
    format!("name = \"j\"\n[[stage]]\nname = \"a\"\ncommand = [\"sh\"]\nitems = {{ range = [0, 10] }}\n{extra}")
}

const FULL: &str = r#"name = "thumbs"

[[stage]]
name = "resize"
command = ["sh", "-c", "cat"]
items = { range = [0, 1000] }
target = "2s"
limit = "10m"
retries = 5
initial = 100
per_item = true

[stage.sizer]
kp = 0.3
max_items = 500

[[stage]]
name = "index"
command = ["sh"]
items = { lines = "inputs.txt" }
after = ["resize"]
target = 1.5
limit = 60

[[stage]]
name = "report"
command = ["sh"]
items.list = ["x", 42, "y z"]
after = ["resize", "index"]
"#;

#[test]
fn full_spec_parses_with_values_and_defaults() {
    let dir = tempfile::tempdir().expect("tempdir");
    std::fs::write(dir.path().join("inputs.txt"), "a\nb\nc").expect("write lines");
    let path = dir.path().join("job.toml");
    std::fs::write(&path, FULL).expect("write spec");
    let spec = load(&path).expect("valid spec");

    assert_eq!(spec.name, "thumbs");
    assert_eq!(spec.stages.len(), 3);
    let [resize, index, report] = &spec.stages[..] else {
        unreachable!()
    };

    assert_eq!(resize.name, "resize");
    assert_eq!(resize.command, ["sh", "-c", "cat"]);
    assert!(resize.per_item);
    assert_eq!(
        resize.items,
        ItemsSpec::Range {
            start: 0,
            end: 1000
        }
    );
    assert_eq!(resize.items.count(), 1000);
    assert!(resize.after.is_empty());
    assert_eq!(resize.retries, 5);
    let expected = SizerConfig {
        target_ms: Some(2_000.0),
        limit_ms: Some(600_000.0),
        initial: Some(100),
        kp: 0.3,
        max_items: 500,
        ..SizerConfig::default()
    };
    assert_eq!(resize.sizer, expected);

    let lines = dir
        .path()
        .join("inputs.txt")
        .canonicalize()
        .expect("canonical");
    let scan = granule_spec::scan_lines(&lines).expect("scan");
    assert_eq!(
        index.items,
        ItemsSpec::Lines {
            path: lines,
            count: 3,
            bytes: scan.bytes,
            hash: Some(scan.hash),
        }
    );
    assert_eq!(index.after, ["resize"]);
    assert!(!index.per_item, "per_item defaults to false");
    assert_eq!(index.retries, 3, "retries defaults to 3");
    assert_eq!(index.sizer.target_ms, Some(1_500.0));
    assert_eq!(index.sizer.limit_ms, Some(60_000.0));
    assert_eq!(index.sizer.initial, None);
    assert_eq!(index.sizer.kp, SizerConfig::default().kp);

    let values = ["x", "42", "y z"].map(String::from).to_vec();
    assert_eq!(report.items, ItemsSpec::List { values });
    assert_eq!(report.after, ["resize", "index"]);
    assert_eq!(report.sizer, SizerConfig::default());
}

#[test]
fn humantime_durations_convert_to_ms() {
    let (_d, spec) = load_text(&one_stage("target = \"500ms\"\nlimit = \"1m 30s\""));
    let sizer = &spec.expect("valid").stages[0].sizer;
    assert_eq!(
        (sizer.target_ms, sizer.limit_ms),
        (Some(500.0), Some(90_000.0))
    );
}

#[test]
fn lines_file_with_trailing_newline_counts_each_line_once() {
    let dir = tempfile::tempdir().expect("tempdir");
    std::fs::write(dir.path().join("in.txt"), "a\nb\n").expect("write lines");
    let text = "name = \"j\"\n[[stage]]\nname = \"a\"\ncommand = [\"sh\"]\nitems = { lines = \"in.txt\" }\n";
    let spec = parse(text, &dir.path().join("job.toml")).expect("valid");
    assert_eq!(spec.stages[0].items.count(), 2);
}

#[test]
fn job_hash_is_stable_and_tracks_changes() {
    let (_d, a) = load_text(&one_stage(""));
    let (_e, b) = load_text(&one_stage("retries = 4"));
    let (a, b) = (a.expect("valid"), b.expect("valid"));
    assert_eq!(job_hash(&a), job_hash(&a.clone()));
    assert_eq!(job_hash(&a).len(), 16);
    assert_ne!(job_hash(&a), job_hash(&b));
}

#[test]
fn display_is_file_line_col_key_message() {
    let e = parse("name = \"j\"\nbogus = 1\n", Path::new("/x/job.toml")).expect_err("unknown key");
    assert_eq!(
        e.to_string(),
        format!("/x/job.toml:2:1: bogus: {}", e.message)
    );
    assert_eq!(e.column, 1);
}

#[test]
fn unknown_top_level_key() {
    assert_err("name = \"j\"\nfoo = 1\n", 2, "foo", "unknown key \"foo\"");
}

#[test]
fn unknown_stage_key() {
    let e = assert_err(
        &one_stage("colour = \"red\""),
        6,
        "stage[0].colour",
        "unknown key \"colour\"",
    );
    assert_eq!(e.column, 1);
}

#[test]
fn unknown_sizer_key() {
    let text = one_stage("[stage.sizer]\nkp = 0.3\nturbo = true");
    assert_err(&text, 8, "stage \"a\".sizer.turbo", "unknown key \"turbo\"");
}

#[test]
fn sizer_keys_filled_from_the_stage_are_not_sizer_keys() {
    assert_err(
        &one_stage("[stage.sizer]\ntarget_ms = 5"),
        7,
        "stage \"a\".sizer.target_ms",
        "unknown key",
    );
}

#[test]
fn missing_command() {
    let text = "name = \"j\"\n[[stage]]\nname = \"a\"\nitems = { range = [0, 1] }\n";
    assert_err(text, 2, "stage \"a\".command", "missing key \"command\"");
}

#[test]
fn empty_command() {
    let text = "name = \"j\"\n[[stage]]\nname = \"a\"\ncommand = []\nitems = { range = [0, 1] }\n";
    assert_err(text, 4, "stage \"a\".command", "command is empty");
}

#[test]
fn command_as_shell_string_is_rejected() {
    let text = "name = \"j\"\n[[stage]]\nname = \"a\"\ncommand = \"sh -c x\"\nitems = { range = [0, 1] }\n";
    assert_err(text, 4, "stage \"a\".command", "expected an array");
}

#[test]
fn command_not_found() {
    let text = "name = \"j\"\n[[stage]]\nname = \"a\"\ncommand = [\"nosuchprog-granule\"]\nitems = { range = [0, 1] }\n";
    assert_err(
        text,
        4,
        "stage \"a\".command",
        "command not found: \"nosuchprog-granule\" (not on PATH)",
    );
}

#[test]
fn command_path_is_relative_to_the_stage_folder_and_must_exist() {
    let text = "name = \"j\"\n[[stage]]\nname = \"a\"\ncommand = [\"./no/such/tool\"]\nitems = { range = [0, 1] }\n";
    assert_err(text, 4, "stage \"a\".command", "where the tasks run");
}

#[test]
fn tasks_run_in_the_spec_folder_unless_cwd_says_otherwise() {
    // A script beside the spec is found whatever folder granule is started from.
    let dir = tempfile::tempdir().expect("tempdir");
    let jobs = dir.path().join("jobs");
    std::fs::create_dir_all(jobs.join("sub")).unwrap();
    let script = jobs.join("task.sh");
    std::fs::write(&script, "#!/bin/sh\n").unwrap();
    std::fs::write(jobs.join("sub/other.sh"), "#!/bin/sh\n").unwrap();
    use std::os::unix::fs::PermissionsExt;
    for s in [script.clone(), jobs.join("sub/other.sh")] {
        std::fs::set_permissions(&s, std::fs::Permissions::from_mode(0o755)).unwrap();
    }
    let text = "name = \"j\"\n[[stage]]\nname = \"a\"\ncommand = [\"./task.sh\"]\nitems = { range = [0, 1] }\nenv = { FOO = \"bar\" }\n\
                [[stage]]\nname = \"b\"\ncommand = [\"./other.sh\"]\ncwd = \"sub\"\nitems = { range = [0, 1] }\nhalt = { fail_ratio = 0.5, after = 40 }\n";
    std::fs::write(jobs.join("job.toml"), text).unwrap();
    let spec = load(&jobs.join("job.toml")).expect("valid");
    let jobs = jobs.canonicalize().unwrap();
    let dir = |p: Option<std::path::PathBuf>| p.map(|p| p.canonicalize().unwrap());
    assert_eq!(spec.stages[0].cwd, None, "no cwd key: the job's folder");
    assert_eq!(dir(spec.task_dir(&spec.stages[0])), Some(jobs.clone()));
    assert_eq!(dir(spec.dir.clone()), Some(jobs.clone()));
    // The folder is not the job's identity: the same spec elsewhere is the same job.
    let moved = granule_spec::JobSpec {
        dir: Some("/elsewhere".into()),
        ..spec.clone()
    };
    assert_eq!(job_hash(&moved), job_hash(&spec));
    assert_eq!(
        spec.stages[0].env.get("FOO").map(String::as_str),
        Some("bar")
    );
    assert_eq!(dir(spec.task_dir(&spec.stages[1])), Some(jobs.join("sub")));
    let halt = spec.stages[1].halt.expect("halt parsed");
    assert_eq!((halt.fail_ratio, halt.after), (0.5, 40));
    assert!(!halt.trips(19, 20), "39 attempts are fewer than after = 40");
    assert!(halt.trips(20, 20) && !halt.trips(19, 21));
}

#[test]
fn bad_cwd_env_and_halt_are_named() {
    assert_err(
        &one_stage("cwd = \"nowhere\""),
        6,
        "stage \"a\".cwd",
        "is not a folder",
    );
    assert_err(
        &one_stage("env = { GRANULE_X = \"1\" }"),
        6,
        "stage \"a\".env.GRANULE_X",
        "GRANULE_",
    );
    assert_err(&one_stage("env = { A = 1 }"), 6, "stage \"a\".env.A", "");
    assert_err(
        &one_stage("halt = { fail_ratio = 2 }"),
        6,
        "stage \"a\".halt.fail_ratio",
        "in (0, 1]",
    );
    assert_err(
        &one_stage("halt = { fail_ratio = 0.5, after = 0 }"),
        6,
        "stage \"a\".halt.after",
        "at least 1",
    );
    assert_err(
        &one_stage("halt = { ratio = 0.5 }"),
        6,
        "stage \"a\".halt.ratio",
        "",
    );
}

#[test]
fn an_unreadable_spec_says_so_without_a_made_up_place() {
    let e = load(Path::new("/nonexistent/nothing.toml")).unwrap_err();
    let text = e.to_string();
    assert!(
        text.starts_with("/nonexistent/nothing.toml: cannot read the spec"),
        "{text}"
    );
    assert!(!text.contains(":0:0"), "{text}");
}

#[test]
fn duplicate_stage_names() {
    let text =
        "name = \"j\"\n[[stage]]\nname = \"b\"\ncommand = [\"sh\"]\nitems = { range = [0, 1] }\n\
                [[stage]]\nname = \"b\"\ncommand = [\"sh\"]\nitems = { range = [0, 1] }\n";
    assert_err(
        text,
        7,
        "stage \"b\".name",
        "stage \"b\" is listed twice (first at line 3)",
    );
}

/// Two stages `a` and `b` with the given `after` lines.
fn two_stages(after_a: &str, after_b: &str) -> String {
    format!(
        "name = \"j\"\n[[stage]]\nname = \"a\"\ncommand = [\"sh\"]\nitems = {{ range = [0, 1] }}\n{after_a}\n\
         [[stage]]\nname = \"b\"\ncommand = [\"sh\"]\nitems = {{ range = [0, 1] }}\n{after_b}\n"
    )
}

#[test]
fn after_names_missing_stage() {
    assert_err(
        &two_stages("", "after = [\"a\", \"x\"]"),
        11,
        "stage \"b\".after",
        "unknown stage \"x\"",
    );
}

#[test]
fn after_cycle() {
    let text = two_stages("after = [\"b\"]", "after = [\"a\"]");
    assert_err(&text, 6, "stage \"a\".after", "cycle in after: a -> b -> a");
}

#[test]
fn after_self_reference() {
    assert_err(
        &two_stages("", "after = [\"b\"]"),
        11,
        "stage \"b\".after",
        "stage \"b\" cannot come after itself",
    );
}

#[test]
fn empty_range() {
    let text =
        "name = \"j\"\n[[stage]]\nname = \"a\"\ncommand = [\"sh\"]\nitems = { range = [5, 5] }\n";
    assert_err(text, 5, "stage \"a\".items.range", "range [5, 5] is empty");
}

#[test]
fn reversed_range() {
    let text =
        "name = \"j\"\n[[stage]]\nname = \"a\"\ncommand = [\"sh\"]\nitems = { range = [9, 2] }\n";
    assert_err(
        text,
        5,
        "stage \"a\".items.range",
        "range [9, 2] is reversed",
    );
}

#[test]
fn missing_lines_file() {
    let text = "name = \"j\"\n[[stage]]\nname = \"a\"\ncommand = [\"sh\"]\nitems = { lines = \"nope.txt\" }\n";
    let e = assert_err(text, 5, "stage \"a\".items.lines", "file not found: ");
    assert!(
        e.message
            .contains("nope.txt (relative to the spec's folder)"),
        "{e}"
    );
}

#[test]
fn empty_lines_file() {
    let dir = tempfile::tempdir().expect("tempdir");
    std::fs::write(dir.path().join("empty.txt"), "").expect("write lines");
    let text = "name = \"j\"\n[[stage]]\nname = \"a\"\ncommand = [\"sh\"]\nitems = { lines = \"empty.txt\" }\n";
    let e = parse(text, &dir.path().join("job.toml")).expect_err("empty file");
    assert_eq!(
        (e.line, e.key.as_str()),
        (5, "stage \"a\".items.lines"),
        "{e}"
    );
    assert!(e.message.contains("no items"), "{e}");
}

#[test]
fn bad_duration_string() {
    let e = assert_err(
        &one_stage("target = \"2 parsecs\""),
        6,
        "stage \"a\".target",
        "bad duration \"2 parsecs\"",
    );
    assert_eq!(e.column, 10);
}

#[test]
fn zero_duration() {
    assert_err(
        &one_stage("limit = 0"),
        6,
        "stage \"a\".limit",
        "greater than zero",
    );
}

#[test]
fn absurd_duration() {
    assert_err(
        &one_stage("limit = 1e300"),
        6,
        "stage \"a\".limit",
        "at most 10 years",
    );
    assert_err(
        &one_stage("limit = \"400000000years\""),
        6,
        "stage \"a\".limit",
        "at most 10 years",
    );
}

#[test]
fn target_not_below_limit() {
    assert_err(
        &one_stage("limit = \"1s\"\ntarget = \"2s\""),
        7,
        "stage \"a\".target",
        "must be below limit",
    );
}

#[test]
fn list_value_with_newline() {
    let text = "name = \"j\"\n[[stage]]\nname = \"a\"\ncommand = [\"sh\"]\nitems.list = [\n  \"ok\",\n  \"a\\nb\",\n]\n";
    assert_err(
        text,
        7,
        "stage \"a\".items.list",
        "item 1 (\"a\\nb\") contains a line break",
    );
}

#[test]
fn empty_list() {
    let text = "name = \"j\"\n[[stage]]\nname = \"a\"\ncommand = [\"sh\"]\nitems = { list = [] }\n";
    assert_err(text, 5, "stage \"a\".items.list", "list is empty");
}

#[test]
fn items_with_two_sources() {
    let text = "name = \"j\"\n[[stage]]\nname = \"a\"\ncommand = [\"sh\"]\n[stage.items]\nrange = [0, 2]\nlist = [\"x\"]\n";
    assert_err(text, 7, "stage \"a\".items", "has both range and list");
}

#[test]
fn items_with_no_source() {
    let text = "name = \"j\"\n[[stage]]\nname = \"a\"\ncommand = [\"sh\"]\nitems = {}\n";
    assert_err(
        text,
        5,
        "stage \"a\".items",
        "needs one of range, lines, list, from or results_of",
    );
}

#[test]
fn wrong_type_names_key() {
    assert_err(
        &one_stage("retries = \"many\""),
        6,
        "stage \"a\".retries",
        "expected an integer, found string",
    );
    assert_err(
        &one_stage("initial = 0"),
        6,
        "stage \"a\".initial",
        "at least 1",
    );
    assert_err(
        &one_stage("[stage.sizer]\nkp = \"high\""),
        7,
        "stage \"a\".sizer.kp",
        "invalid type",
    );
}

#[test]
fn missing_name_and_stages() {
    assert_err(
        "[[stage]]\nname = \"a\"\n",
        1,
        "name",
        "missing key \"name\"",
    );
    assert_err("name = \"j\"\n", 1, "stage", "at least one [[stage]]");
    assert_err("name = \"\"\n", 1, "name", "must not be empty");
}

#[test]
fn toml_syntax_error() {
    let text = "name = \"j\"\n[[stage]]\nname = \"a\"\nretries = = 3\n";
    let e = assert_err(text, 4, "stage[0].retries", "");
    assert!(!e.message.is_empty());
}

#[test]
fn toml_duplicate_key() {
    let text = "name = \"j\"\n[[stage]]\nname = \"a\"\nname = \"b\"\n";
    assert_err(text, 4, "stage[0].name", "duplicate key \"name\"");
}

#[test]
fn placement_keys_parse_into_stage_needs() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("job.toml");
    let text = "name = \"p\"\n[[stage]]\nname = \"a\"\ncommand = [\"true\"]\nitems = { range = [0, 2] }\ncpus = 2\nmemory = \"1.5GiB\"\ngpus = 1\nresources = { licenses = 0.5 }\nclass = \"gpu\"\npriority = 7\nowner = \"ada\"\n[[stage]]\nname = \"b\"\ncommand = [\"true\"]\nitems = { range = [0, 2] }\nprefer = \"memory\"\n";
    std::fs::write(&path, text).unwrap();
    let spec = granule_spec::load(&path).unwrap();
    let a = &spec.stages[0].needs;
    assert_eq!((a.cpus, a.memory_mb, a.gpus), (2.0, 1536, 1));
    assert_eq!(a.resources["licenses"], 0.5);
    assert_eq!(
        (
            a.class.as_deref(),
            a.class_required,
            a.priority,
            a.owner.as_deref()
        ),
        (Some("gpu"), true, 7, Some("ada"))
    );
    let b = &spec.stages[1].needs;
    assert_eq!(
        (b.class.as_deref(), b.class_required, b.cpus),
        (Some("memory"), false, 0.0)
    );
    std::fs::write(
        &path,
        text.replace(
            "prefer = \"memory\"",
            "prefer = \"memory\"\nclass = \"cpu\"",
        ),
    )
    .unwrap();
    let err = granule_spec::load(&path).unwrap_err();
    assert!(err.message.contains("not both"), "{err}");
    std::fs::write(&path, text.replace("\"1.5GiB\"", "\"lots\"")).unwrap();
    let err = granule_spec::load(&path).unwrap_err();
    assert_eq!(
        (err.key.as_str(), err.line),
        ("stage \"a\".memory", 7),
        "{err}"
    );
}

/// Two stages: "a" over a range, "b" with `b_items` and `b_extra`.
fn streamed_pair(b_items: &str, b_extra: &str) -> String {
    format!(
        "name = \"j\"\n[[stage]]\nname = \"a\"\ncommand = [\"sh\"]\nitems = {{ range = [0, 10] }}\n\n[[stage]]\nname = \"b\"\ncommand = [\"sh\"]\nitems = {b_items}\n{b_extra}"
    )
}

#[test]
fn streamed_items_name_stages_of_the_job() {
    let (_dir, spec) = load_text(&streamed_pair("{ from = \"a\" }", "after_any = [\"a\"]"));
    let spec = spec.unwrap();
    let b = &spec.stages[1];
    assert_eq!(
        b.items,
        ItemsSpec::Stream {
            from: vec!["a".into()],
            results: false
        }
    );
    assert!(b.items.streamed() && b.items.count() == 0);
    assert_eq!(b.after_any, ["a"]);
    let (_dir, spec) = load_text(&streamed_pair("{ results_of = [\"a\"] }", ""));
    assert!(matches!(
        spec.unwrap().stages[1].items,
        ItemsSpec::Stream { results: true, .. }
    ));
}

#[test]
fn a_stream_from_an_unknown_stage_or_itself_is_refused_where_it_is_named() {
    assert_err(
        &streamed_pair("{ from = \"nope\" }", ""),
        10,
        "stage \"b\".items",
        "unknown stage \"nope\"",
    );
    assert_err(
        &streamed_pair("{ from = [\"a\", \"b\"] }", ""),
        10,
        "stage \"b\".items",
        "cannot come after itself",
    );
    assert_err(
        &streamed_pair("{ from = \"a\", range = [0, 2] }", ""),
        10,
        "stage \"b\".items",
        "give exactly one of",
    );
}

#[test]
fn a_cycle_through_streamed_items_is_refused() {
    let text = "name = \"j\"\n[[stage]]\nname = \"a\"\ncommand = [\"sh\"]\nitems = { from = \"b\" }\n\n[[stage]]\nname = \"b\"\ncommand = [\"sh\"]\nitems = { from = \"a\" }\n";
    assert_err(text, 5, "stage \"a\".items", "cycle in after: a -> b -> a");
}

#[test]
fn after_and_after_any_may_not_both_name_a_stage() {
    assert_err(
        &streamed_pair("{ range = [0, 1] }", "after = [\"a\"]\nafter_any = [\"a\"]"),
        12,
        "stage \"b\".after_any",
        "in both after and after_any",
    );
}

#[test]
fn stdout_outputs_need_per_item_mode() {
    assert_err(
        &one_stage("outputs = \"stdout\""),
        6,
        "stage \"a\".outputs",
        "needs per_item = true",
    );
    assert_err(
        &one_stage("per_item = true\noutputs = \"stderr\""),
        7,
        "stage \"a\".outputs",
        "the only mode is \"stdout\"",
    );
    let (_dir, spec) = load_text(&one_stage("per_item = true\noutputs = \"stdout\""));
    assert!(spec.unwrap().stages[0].stdout_outputs);
}

#[test]
fn job_level_owner_account_and_priority_are_defaults_for_its_stages() {
    let text = "name = \"j\"\nowner = \"ada\"\naccount = \"physics\"\npriority = 3\n\
                [[stage]]\nname = \"a\"\ncommand = [\"true\"]\nitems = { range = [0, 2] }\n\
                [[stage]]\nname = \"b\"\ncommand = [\"true\"]\nitems = { range = [0, 2] }\nowner = \"bob\"\npriority = 0\n";
    let (_dir, spec) = load_text(text);
    let spec = spec.unwrap();
    let (a, b) = (&spec.stages[0].needs, &spec.stages[1].needs);
    assert_eq!(
        (a.owner.as_deref(), a.account.as_deref(), a.priority),
        (Some("ada"), Some("physics"), 3)
    );
    // A stage's own keys win, even a priority of 0.
    assert_eq!(
        (b.owner.as_deref(), b.account.as_deref(), b.priority),
        (Some("bob"), Some("physics"), 0)
    );
    assert_err(
        "name = \"j\"\naccount = \"\"\n[[stage]]\nname = \"a\"\ncommand = [\"true\"]\nitems = { range = [0, 2] }\n",
        2,
        "account",
        "",
    );
}

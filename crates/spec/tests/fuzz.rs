//! The spec parser against anything: the corpus in `tests/corpus/` and specs
//! mutated from it at random (bytes cut, inserted, swapped; numbers replaced by
//! NaN, infinities, huge and negative values; keys and tables duplicated). No input
//! may panic, and every spec that is accepted satisfies the rules the rest of
//! granule relies on.
//!
//! `GRANULE_FUZZ_CASES` sets how many mutated specs (default 3000; the soak runs
//! 100,000).

use granule_spec::{parse, JobSpec, SpecError};
use proptest::prelude::*;
use std::path::{Path, PathBuf};

fn corpus() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/corpus")
}

fn seeds() -> Vec<String> {
    let mut seeds: Vec<String> = std::fs::read_dir(corpus())
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|x| x == "toml"))
        .map(|p| std::fs::read_to_string(p).unwrap())
        .collect();
    seeds.sort();
    seeds
}

/// What every accepted spec promises (the store and the workers rely on it).
fn check_accepted(spec: &JobSpec) {
    granule_spec::check_name(&spec.name).unwrap();
    assert!(!spec.stages.is_empty());
    for s in &spec.stages {
        granule_spec::check_name(&s.name).unwrap();
        assert!(!s.command.is_empty() && !s.command[0].is_empty());
        assert!(s.items.count() > 0);
        let c = &s.sizer;
        for x in [
            c.kp,
            c.ki,
            c.kd,
            c.forget,
            c.overhead_share,
            c.target_min_ms,
            c.target_max_ms,
            c.tail_factor,
            c.tail_overhead_share,
            c.min_free_memory,
            c.max_load,
            c.deadline_share,
        ] {
            assert!(x.is_finite() && x >= 0.0, "{c:?}");
        }
        assert!(c.forget > 0.0 && c.forget <= 1.0);
        assert!(c.min_items >= 1 && c.min_items <= c.max_items);
        assert!(c.target_min_ms <= c.target_max_ms);
        for ms in [c.target_ms, c.limit_ms].into_iter().flatten() {
            assert!(ms.is_finite() && ms > 0.0);
        }
        assert!(s.max_checkpoint_bytes > 0);
        for (name, amount) in &s.needs.resources {
            granule_spec::check_name(name).unwrap();
            assert!(amount.is_finite() && *amount >= 0.0);
        }
        for name in s.needs.owner.iter().chain(&s.needs.class) {
            granule_spec::check_name(name).unwrap();
        }
        // It survives the store's round trip.
        let back: JobSpec = serde_json::from_str(&serde_json::to_string(spec).unwrap()).unwrap();
        assert_eq!(&back, spec);
    }
}

fn parse_any(text: &str) -> Result<JobSpec, SpecError> {
    let spec = parse(text, &corpus().join("fuzz.toml"));
    match &spec {
        Ok(spec) => check_accepted(spec),
        Err(e) => assert!(!e.message.is_empty()),
    }
    spec
}

#[test]
fn the_corpus_parses_or_is_refused_as_expected() {
    for (name, ok) in [
        ("full.toml", true),
        ("range.toml", true),
        ("nan.toml", false),
        ("cycle.toml", false),
        ("escapes.toml", false),
        ("broken.toml", false),
    ] {
        let text = std::fs::read_to_string(corpus().join(name)).unwrap();
        let got = parse_any(&text);
        assert_eq!(got.is_ok(), ok, "{name}: {got:?}");
        if let Err(e) = got {
            assert!(e.line > 0, "{name}: errors point at a line: {e}");
        }
    }
}

/// One edit of a spec's text.
#[derive(Clone, Debug)]
enum Edit {
    Insert(usize, String),
    Delete(usize, usize),
    Number(usize, &'static str),
    DuplicateLine(usize),
}

fn edit() -> impl Strategy<Value = Edit> {
    let words = prop::sample::select(vec![
        "\n",
        "=",
        "[",
        "]",
        "[[stage]]",
        "[stage.sizer]",
        "\"",
        "{",
        "}",
        ",",
        "nan",
        "-inf",
        "1e309",
        "-1",
        "0",
        "name",
        "items",
        "range",
        "lines",
        "list",
        "after",
        "command",
        "\\u0000",
        "\\n",
        "kp",
        "forget",
        "min_items",
        "max_items",
        "memory",
        "\"100TiB\"",
        "\"-5s\"",
        "'",
        "#",
        "é",
        "\u{1b}",
        "9223372036854775807",
        "-9223372036854775808",
        "0.0",
        "true",
    ]);
    prop_oneof![
        (any::<usize>(), words.clone()).prop_map(|(at, w)| Edit::Insert(at, w.to_string())),
        (any::<usize>(), "[ -~]{0,8}").prop_map(|(at, s)| Edit::Insert(at, s)),
        (any::<usize>(), 0usize..20).prop_map(|(at, n)| Edit::Delete(at, n)),
        (
            any::<usize>(),
            prop::sample::select(vec![
                "nan",
                "inf",
                "-inf",
                "-1",
                "0",
                "1e308",
                "99999999999999999999"
            ])
        )
            .prop_map(|(at, n)| Edit::Number(at, n)),
        any::<usize>().prop_map(Edit::DuplicateLine),
    ]
}

fn apply(text: &str, e: &Edit) -> String {
    let mut s = text.to_string();
    let floor = |s: &String, at: usize| {
        let mut at = at % (s.len() + 1);
        while !s.is_char_boundary(at) {
            at -= 1;
        }
        at
    };
    match e {
        Edit::Insert(at, w) => {
            let at = floor(&s, *at);
            s.insert_str(at, w);
        }
        Edit::Delete(at, n) => {
            let at = floor(&s, *at);
            let end = floor(&s, at + n);
            s.replace_range(at..end.max(at), "");
        }
        Edit::Number(at, n) => {
            // Replace the next number after `at`, if any.
            let at = floor(&s, *at);
            if let Some(start) = s[at..].find(|c: char| c.is_ascii_digit()) {
                let start = at + start;
                let end = s[start..]
                    .find(|c: char| !(c.is_ascii_digit() || c == '.'))
                    .map_or(s.len(), |e| start + e);
                s.replace_range(start..end, n);
            }
        }
        Edit::DuplicateLine(at) => {
            let lines: Vec<&str> = s.lines().collect();
            if !lines.is_empty() {
                let i = at % lines.len();
                let mut out: Vec<&str> = lines.clone();
                out.insert(i, lines[i]);
                s = out.join("\n");
            }
        }
    }
    s
}

fn cases() -> u32 {
    std::env::var("GRANULE_FUZZ_CASES")
        .ok()
        .and_then(|n| n.parse().ok())
        .unwrap_or(3000)
}

proptest! {
    #![proptest_config(ProptestConfig { cases: cases(), failure_persistence: None, ..ProptestConfig::default() })]
    #[test]
    fn any_mutated_spec_parses_or_is_refused_without_panicking(seed in 0usize..64, edits in prop::collection::vec(edit(), 1..8)) {
        let seeds = seeds();
        let mut text = seeds[seed % seeds.len()].clone();
        for e in &edits {
            text = apply(&text, e);
        }
        let _ = parse_any(&text);
    }

    #[test]
    fn any_bytes_parse_or_are_refused_without_panicking(text in "\\PC{0,300}") {
        let _ = parse_any(&text);
    }
}

#[test]
fn a_float_survives_the_stores_json_round_trip_exactly() {
    // Found by the fuzzer: without serde_json's exact float parsing,
    // 0.19223372036854777 came back as 0.19223372036854774 and a stored spec
    // differed from the one submitted.
    let x = 0.192_233_720_368_547_77_f64;
    let back: f64 = serde_json::from_str(&serde_json::to_string(&x).unwrap()).unwrap();
    assert_eq!(back.to_bits(), x.to_bits());
}

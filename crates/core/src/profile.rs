//! What kind of work a stage is: from its history (CPU time over wall time, peak
//! memory), and before any history from a small keyword classifier over its name
//! and command, so that a cold stage can still prefer a sensible executor class.

/// Words that mark a stage's class, checked in this order (first match wins).
const KEYWORDS: &[(&str, &[&str])] = &[
    (
        "gpu",
        &[
            "cuda",
            "gpu",
            "torch",
            "pytorch",
            "tensorflow",
            "jax",
            "nvidia",
            "infer",
            "inference",
            "train",
            "llm",
            "embed",
            "onnx",
            "triton",
        ],
    ),
    (
        "memory",
        &[
            "join",
            "pandas",
            "polars",
            "duckdb",
            "spark",
            "dask",
            "sort",
            "dedup",
            "aggregate",
            "groupby",
            "index",
            "graph",
            "assemble",
        ],
    ),
    (
        "io",
        &[
            "curl", "wget", "rsync", "scp", "s3", "gsutil", "aws", "download", "upload", "fetch",
            "crawl", "scrape", "copy", "cp", "tar", "sync", "http",
        ],
    ),
    (
        "cpu",
        &[
            "ffmpeg",
            "convert",
            "magick",
            "thumbnail",
            "resize",
            "encode",
            "transcode",
            "compress",
            "gzip",
            "zstd",
            "xz",
            "hash",
            "simulate",
            "simulation",
            "render",
            "compile",
            "solve",
            "blast",
            "align",
            "parse",
        ],
    ),
];

/// The executor class a stage's name and command suggest, before any history:
/// `gpu`, `memory`, `io`, `cpu`, or `None` when no word gives it away. Words are
/// split on anything not alphanumeric, and paths count by their file name.
pub fn guess_class(name: &str, argv: &[String]) -> Option<&'static str> {
    let words: Vec<String> = std::iter::once(name)
        .chain(argv.iter().map(|a| a.rsplit('/').next().unwrap_or(a)))
        .flat_map(|text| text.split(|c: char| !c.is_ascii_alphanumeric()))
        .filter(|w| !w.is_empty())
        .map(str::to_ascii_lowercase)
        .collect();
    KEYWORDS
        .iter()
        .find(|(_, marks)| {
            words.iter().any(|w| {
                // A plural counts as its word: "thumbnails", "joins".
                marks.contains(&w.as_str())
                    || w.strip_suffix('s').is_some_and(|s| marks.contains(&s))
            })
        })
        .map(|(class, _)| *class)
}

/// Peak memory per fragment above which a stage counts as memory-bound, KiB.
const MEMORY_BOUND_KB: u64 = 2 * 1024 * 1024;

/// Block I/O per second of wall time above which a stage counts as IO-bound.
const IO_BOUND_BYTES_PER_S: f64 = 20e6;

/// What a stage's history says it is bound by: `memory` (a fragment's peak RSS
/// reached 2 GiB), `io` (20 MB/s or more of block I/O), `cpu` (CPU time is at least
/// 60% of wall time), `io` again under 30% (it mostly waits: disk or network), else
/// `mixed`; `None` without history.
pub fn profile(cpu_ms: f64, wall_ms: f64, peak_rss_kb: u64, io_bytes: u64) -> Option<&'static str> {
    if wall_ms <= 0.0 {
        return None;
    }
    let share = cpu_ms / wall_ms;
    let io_rate = io_bytes as f64 / (wall_ms / 1e3);
    Some(if peak_rss_kb >= MEMORY_BOUND_KB {
        "memory"
    } else if io_rate >= IO_BOUND_BYTES_PER_S {
        "io"
    } else if share >= 0.6 {
        "cpu"
    } else if share < 0.3 {
        "io"
    } else {
        "mixed"
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn argv(words: &[&str]) -> Vec<String> {
        words.iter().map(|w| w.to_string()).collect()
    }

    #[test]
    fn names_and_commands_suggest_a_class() {
        assert_eq!(
            guess_class("thumbnails", &argv(&["/usr/bin/convert", "-resize"])),
            Some("cpu")
        );
        assert_eq!(
            guess_class("s", &argv(&["python3", "infer.py", "--model", "x"])),
            Some("gpu")
        );
        assert_eq!(
            guess_class("fetch-pages", &argv(&["python3", "get.py"])),
            Some("io")
        );
        assert_eq!(
            guess_class("join", &argv(&["duckdb", "-c", "q"])),
            Some("memory")
        );
        assert_eq!(guess_class("thumbnails", &argv(&["true"])), Some("cpu"));
        assert_eq!(guess_class("step2", &argv(&["./run.sh"])), None);
    }

    #[test]
    fn history_says_what_bounds_a_stage() {
        assert_eq!(profile(950.0, 1000.0, 50_000, 0), Some("cpu"));
        assert_eq!(profile(100.0, 1000.0, 50_000, 0), Some("io"));
        assert_eq!(profile(500.0, 1000.0, 50_000, 0), Some("mixed"));
        assert_eq!(profile(900.0, 1000.0, 3 * 1024 * 1024, 0), Some("memory"));
        assert_eq!(profile(900.0, 1000.0, 50_000, 100_000_000), Some("io"));
        assert_eq!(profile(0.0, 0.0, 0, 0), None);
    }
}

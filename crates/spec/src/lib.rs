//! Job specs: the TOML a user writes, parsed and validated before anything runs.
//!
//! Every error names the file, the line and the key, so a user can fix a spec
//! without guessing; the CLI maps [`SpecError`] to exit code 2.

use granule_core::{SizerConfig, StageNeeds};
use serde::{Deserialize, Serialize};
use std::path::{Path, PathBuf};

mod command;
mod duration;
mod graph;
mod items;
mod locate;
mod needs;
mod stage;
mod tree;

pub use items::{scan_lines, LinesScan};

/// A validated job: a name and a DAG of stages, in file order.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct JobSpec {
    /// The job's name (unique within a store).
    pub name: String,
    /// The stages, in the order the file lists them.
    pub stages: Vec<StageSpec>,
    /// The spec's folder, absolute: where tasks run unless their stage sets `cwd`
    /// (a host without it runs them in the worker's own folder). Not part of the
    /// job's identity (`job_hash`): its relative paths are resolved already.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub dir: Option<PathBuf>,
}

/// One stage: a command mapped over an item source.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct StageSpec {
    /// Stage name, unique within the job.
    pub name: String,
    /// argv; `command[0]` was found on PATH (or as a path) at validation.
    pub command: Vec<String>,
    /// Run once per item with `{}` replaced by the value, instead of batch mode.
    pub per_item: bool,
    /// Where the items come from.
    pub items: ItemsSpec,
    /// Names of stages that must finish first, without quarantined items (afterok).
    pub after: Vec<String>,
    /// Names of stages that must finish first, however they ended (afterany).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub after_any: Vec<String>,
    /// Per-item mode: each line the task writes on stdout is an output of its item.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub stdout_outputs: bool,
    /// Retries before bisection (default 3).
    pub retries: u32,
    /// Sizer tunables plus `target`, `limit` and `initial` (ms / items).
    #[serde(with = "sizer_json")]
    pub sizer: SizerConfig,
    /// What one slot needs, its class, priority and owner (placement).
    #[serde(default)]
    pub needs: StageNeeds,
    /// Largest checkpoint a task may hand over, bytes (`max_checkpoint`).
    #[serde(default = "default_max_checkpoint_bytes")]
    pub max_checkpoint_bytes: u64,
    /// Folder the tasks run in, absolute, when the stage sets `cwd` (relative to
    /// the spec's folder); otherwise the job's `dir`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cwd: Option<PathBuf>,
    /// Variables added to the tasks' environment (`env`).
    #[serde(default, skip_serializing_if = "std::collections::BTreeMap::is_empty")]
    pub env: std::collections::BTreeMap<String, String>,
    /// When to stop the job because the task itself looks broken (`halt`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub halt: Option<Halt>,
}

/// `halt = { fail_ratio = 0.5, after = 100 }`: once `after` item attempts of the
/// stage have ended, a share of failed ones at or above `fail_ratio` stops the job.
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
pub struct Halt {
    /// Share of failed item attempts, in (0, 1], that stops the job.
    pub fail_ratio: f64,
    /// Item attempts (done plus failed) to see before judging.
    pub after: u64,
}

impl Halt {
    /// Whether `failed` failed and `done` done item attempts say the task is broken.
    pub fn trips(&self, failed: u64, done: u64) -> bool {
        let seen = failed + done;
        seen >= self.after.max(1) && failed as f64 >= self.fail_ratio * seen as f64
    }
}

/// `max_checkpoint` when a stage does not set it: 256 MiB.
pub const DEFAULT_MAX_CHECKPOINT_BYTES: u64 = 256 << 20;

fn default_max_checkpoint_bytes() -> u64 {
    DEFAULT_MAX_CHECKPOINT_BYTES
}

/// Longest name (job, stage, owner, class, resource), bytes.
pub const NAME_MAX_BYTES: usize = 128;

/// Checks a name given outside a spec (a worker's `--class`): 1 to 128 bytes, no
/// control characters (line breaks, terminal escapes), no blanks at either end.
pub fn check_name(name: &str) -> Result<(), String> {
    if name.trim().is_empty() {
        return Err("must not be empty".into());
    }
    if name.len() > NAME_MAX_BYTES {
        return Err(format!(
            "is {} bytes long; names are at most {NAME_MAX_BYTES}",
            name.len()
        ));
    }
    if let Some(c) = name.chars().find(|c| c.is_control()) {
        return Err(format!(
            "holds the control character {:?}; names are printable text",
            c
        ));
    }
    if name.trim() != name {
        return Err("starts or ends with blanks".into());
    }
    Ok(())
}

/// An item source. Item `i` (0-based index) has a value the command sees.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ItemsSpec {
    /// Integers `start..end` (half-open); item `i` has value `start + i`.
    Range {
        /// First value.
        start: i64,
        /// One past the last value.
        end: i64,
    },
    /// One item per line of a file (absolute path after validation); `count` lines.
    /// Its length and content hash at submit pin the items: a worker that finds the
    /// file changed refuses to run them.
    Lines {
        /// The file, absolute.
        path: PathBuf,
        /// Number of lines (items).
        count: u64,
        /// Length of the file at submit, bytes.
        #[serde(default)]
        bytes: u64,
        /// blake3 of the file at submit, hex (absent in specs stored before it was kept).
        #[serde(default, skip_serializing_if = "Option::is_none")]
        hash: Option<String>,
    },
    /// Literal values.
    List {
        /// The values, as strings.
        values: Vec<String>,
    },
    /// The committed outputs (or, with `results`, the results) of other stages of
    /// the job, in the order they were published; the count grows while they run.
    Stream {
        /// Names of the stages whose outputs are the items (concatenated as they
        /// commit).
        from: Vec<String>,
        /// Each upstream fragment's result (its final checkpoint) is one item, a
        /// file, instead of the outputs of its items.
        results: bool,
    },
}

impl ItemsSpec {
    /// Number of items.
    pub fn count(&self) -> u64 {
        match self {
            ItemsSpec::Range { start, end } => (end - start) as u64,
            ItemsSpec::Lines { count, .. } => *count,
            ItemsSpec::List { values } => values.len() as u64,
            ItemsSpec::Stream { .. } => 0,
        }
    }

    /// The values of the items at `indices` (ascending), as text: `None` for
    /// streamed items (they live in the store) or a `lines` file that cannot be
    /// read now.
    pub fn values_at(&self, indices: &[u64]) -> Option<Vec<String>> {
        match self {
            ItemsSpec::Range { start, .. } => Some(
                indices
                    .iter()
                    .map(|&i| (start + i as i64).to_string())
                    .collect(),
            ),
            ItemsSpec::List { values } => indices
                .iter()
                .map(|&i| values.get(i as usize).cloned())
                .collect(),
            ItemsSpec::Lines { path, .. } => {
                use std::io::BufRead;
                let file = std::io::BufReader::new(std::fs::File::open(path).ok()?);
                let mut wanted = indices.iter().peekable();
                let mut out = Vec::new();
                for (i, line) in file.split(b'\n').enumerate() {
                    let Some(&&next) = wanted.peek() else {
                        break;
                    };
                    if i as u64 == next {
                        let line = line.ok()?;
                        let line = line.strip_suffix(b"\r").unwrap_or(&line);
                        out.push(String::from_utf8_lossy(line).into_owned());
                        wanted.next();
                    }
                }
                (out.len() == indices.len()).then_some(out)
            }
            ItemsSpec::Stream { .. } => None,
        }
    }

    /// Whether the items arrive while the job runs (`from`, `results_of`).
    pub fn streamed(&self) -> bool {
        matches!(self, ItemsSpec::Stream { .. })
    }
}

/// A spec that cannot run, and where the problem is.
#[derive(Clone, Debug, PartialEq, thiserror::Error)]
#[error("{}", self.describe())]
pub struct SpecError {
    /// The spec file.
    pub file: PathBuf,
    /// 1-based line (0 when the problem has no place in the file, e.g. unreadable).
    pub line: usize,
    /// 1-based column.
    pub column: usize,
    /// Dotted key path, e.g. `stage[1].items` or `stage.retries`.
    pub key: String,
    /// What is wrong, in words.
    pub message: String,
}

impl SpecError {
    /// `file:line:column: key: message`, leaving out the place when the problem has
    /// none (an unreadable file) and the key when there is none.
    fn describe(&self) -> String {
        let mut out = self.file.display().to_string();
        if self.line > 0 {
            out.push_str(&format!(":{}:{}", self.line, self.column));
        }
        if !self.key.is_empty() {
            out.push_str(&format!(": {}", self.key));
        }
        format!("{out}: {}", self.message)
    }
}

/// Reads and validates the spec at `path`.
pub fn load(path: &Path) -> Result<JobSpec, SpecError> {
    let text = std::fs::read_to_string(path).map_err(|e| SpecError {
        file: path.to_path_buf(),
        line: 0,
        column: 0,
        key: String::new(),
        message: format!("cannot read the spec: {e}"),
    })?;
    parse(&text, path)
}

/// Parses and validates spec text; `path` names it in errors and anchors
/// relative `lines` paths (relative to the spec file's folder).
///
/// Tasks run in the stage's `cwd` (by default the spec's folder), and a
/// `command[0]` containing `/` is resolved there; other names must be
/// executables on `$PATH`.
pub fn parse(text: &str, path: &Path) -> Result<JobSpec, SpecError> {
    stage::parse_job(&locate::Ctx::new(text, path))
}

/// A stable hex digest (FNV-1a 64 of the JSON form) that identifies a spec, so
/// a changed spec under an existing job name can be refused.
pub fn job_hash(spec: &JobSpec) -> String {
    // The folder is where the file was, not what the job is (and specs stored
    // before it was kept resume under the same hash).
    let spec = &JobSpec {
        dir: None,
        ..spec.clone()
    };
    fnv_hex(&serde_json::to_vec(spec).unwrap_or_else(|_| format!("{spec:?}").into_bytes()))
}

impl JobSpec {
    /// Where a stage's tasks run on this host: its `cwd`, else the spec's folder
    /// if this host has it, else `None` (the worker's own folder).
    pub fn task_dir(&self, stage: &StageSpec) -> Option<PathBuf> {
        stage
            .cwd
            .clone()
            .or_else(|| self.dir.clone().filter(|d| d.is_dir()))
    }
}

/// A stable hex digest of what a stage's task costs to run: its argv and whether
/// it runs per item. Stages (of any job) with the same key share learned costs, so
/// a rerun or a new job of the same command starts from what earlier runs measured.
pub fn cost_key(stage: &StageSpec) -> String {
    let mut bytes = Vec::new();
    for arg in &stage.command {
        bytes.extend_from_slice(arg.as_bytes());
        bytes.push(0);
    }
    bytes.push(u8::from(stage.per_item));
    fnv_hex(&bytes)
}

/// FNV-1a 64 of `bytes`, as 16 hex digits.
fn fnv_hex(bytes: &[u8]) -> String {
    let hash = bytes.iter().fold(0xcbf2_9ce4_8422_2325_u64, |h, &b| {
        (h ^ u64::from(b)).wrapping_mul(0x0000_0100_0000_01b3)
    });
    format!("{hash:016x}")
}

/// A stage's sizer in the stored spec: the tunables and the stage keys (`target`,
/// `limit`, `initial`) that `SizerConfig` leaves out of its own serde form (they
/// are not `[stage.sizer]` keys), so a worker reading the stored spec gets them.
mod sizer_json {
    use granule_core::SizerConfig;
    use serde::{Deserialize, Deserializer, Serialize, Serializer};

    #[derive(Serialize, Deserialize)]
    struct Stored {
        #[serde(flatten)]
        tunables: SizerConfig,
        #[serde(default)]
        target_ms: Option<f64>,
        #[serde(default)]
        limit_ms: Option<f64>,
        #[serde(default)]
        initial: Option<u64>,
    }

    pub(crate) fn serialize<S: Serializer>(c: &SizerConfig, s: S) -> Result<S::Ok, S::Error> {
        Stored {
            tunables: c.clone(),
            target_ms: c.target_ms,
            limit_ms: c.limit_ms,
            initial: c.initial,
        }
        .serialize(s)
    }

    pub(crate) fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<SizerConfig, D::Error> {
        let stored = Stored::deserialize(d)?;
        Ok(SizerConfig {
            target_ms: stored.target_ms,
            limit_ms: stored.limit_ms,
            initial: stored.initial,
            ..stored.tunables
        })
    }
}

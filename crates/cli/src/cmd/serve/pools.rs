//! The pools file of `granule serve --pools`: each pool is a class of workers, its
//! price and limits, and how a provider starts one.

use crate::BadInput;
use anyhow::Result;
use granule_core::WorkerOffer;
use serde::{Deserialize, Deserializer};
use std::collections::BTreeMap;
use std::path::Path;
use std::time::Duration;

/// How a pool's workers are started.
#[derive(Clone, Copy, Debug, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub(crate) enum Kind {
    /// Worker processes on this host.
    Local,
    /// `sbatch` jobs (one worker each, arrays for several).
    Slurm,
    /// User commands to start, stop and list workers.
    Command,
}

/// One pool, as written in the file.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct PoolSpec {
    /// The pool's name (letters, digits, `-`, `_`): part of every allocation's id.
    pub(crate) name: String,
    /// The workers' class; default: the pool's name.
    #[serde(default)]
    pub(crate) class: Option<String>,
    /// How its workers start.
    pub(crate) provider: Kind,
    /// Slots of each worker.
    #[serde(default = "one")]
    pub(crate) slots: u32,
    /// Workers at once, at most (pending ones count).
    pub(crate) max_workers: u32,
    /// Allocations asked for and not started yet, at most; default `max_workers`.
    #[serde(default)]
    pub(crate) max_pending: Option<u32>,
    /// What one worker costs per hour.
    #[serde(default)]
    pub(crate) cost_per_hour: f64,
    /// Spot (preemptible) capacity: only work that acks or checkpoints is planned on it.
    #[serde(default)]
    pub(crate) spot: bool,
    /// What the pool may cost per hour, at most (`max_workers` shrinks to fit).
    #[serde(default)]
    pub(crate) budget_per_hour: Option<f64>,
    /// The longest life one worker may be given (a walltime, a serverless limit);
    /// each allocation gets what the work needs, up to this. Default 1 hour.
    #[serde(default = "hour", deserialize_with = "duration")]
    pub(crate) walltime: Duration,
    /// The shortest life asked for (`walltime` if that is shorter); default 1 minute.
    #[serde(default = "minute", deserialize_with = "duration")]
    pub(crate) min_walltime: Duration,
    /// A worker with nothing to do waits this long for new jobs before it leaves;
    /// default: it leaves as soon as no unfinished job is left (a later job gets new
    /// workers from `serve`).
    #[serde(default, deserialize_with = "opt_duration")]
    pub(crate) idle_exit: Option<Duration>,
    /// Memory of one worker, MiB (for stages that declare memory); default: unknown
    /// (every stage fits).
    #[serde(default)]
    pub(crate) memory_mb: Option<u64>,
    /// GPUs of one worker.
    #[serde(default)]
    pub(crate) gpus: u32,
    /// Custom resources of one worker (`licenses = 4`).
    #[serde(default)]
    pub(crate) resources: BTreeMap<String, f64>,
    /// Environment of its workers and their tasks (`MODULEPATH`, a model's path).
    #[serde(default)]
    pub(crate) env: BTreeMap<String, String>,
    /// More arguments for `granule worker`.
    #[serde(default)]
    pub(crate) worker_args: Vec<String>,
    /// More arguments for `sbatch` (`slurm`), e.g. `["--partition=debug"]`.
    #[serde(default)]
    pub(crate) sbatch_args: Vec<String>,
    /// `command`: starts one worker (argv; `GRANULE_ALLOCATION`, `GRANULE_WORKER_COMMAND`,
    /// `GRANULE_WALLTIME_S` in its environment).
    #[serde(default)]
    pub(crate) start: Vec<String>,
    /// `command`: asks the worker `GRANULE_ALLOCATION` names to leave.
    #[serde(default)]
    pub(crate) stop: Vec<String>,
    /// `command`: prints one line per live allocation: its id, then optionally
    /// `pending` or `running`.
    #[serde(default)]
    pub(crate) list: Vec<String>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct PoolsFile {
    #[serde(rename = "pool", default)]
    pools: Vec<PoolSpec>,
}

impl PoolSpec {
    /// The workers' class.
    pub(crate) fn class(&self) -> &str {
        self.class.as_deref().unwrap_or(&self.name)
    }

    /// Workers the pool may have at once: `max_workers`, less where the budget
    /// allows fewer.
    pub(crate) fn limit(&self) -> u32 {
        match self.budget_per_hour {
            Some(b) if self.cost_per_hour > 0.0 => self
                .max_workers
                .min((b / self.cost_per_hour).floor() as u32),
            _ => self.max_workers,
        }
    }

    /// What one of its workers offers to stages, as placement judges fit.
    pub(crate) fn offer(&self) -> WorkerOffer {
        WorkerOffer {
            class: self.class().to_string(),
            slots: self.slots,
            cpus: f64::from(self.slots),
            memory_mb: self.memory_mb.unwrap_or(u64::MAX / 4),
            gpus: self.gpus,
            resources: self.resources.clone(),
            spot: self.spot,
        }
    }
}

/// Reads and checks a pools file; every mistake names the file, where and what.
pub(crate) fn load(path: &Path) -> Result<Vec<PoolSpec>> {
    let text = std::fs::read_to_string(path)
        .map_err(|e| BadInput(format!("{}: cannot read pools file: {e}", path.display())))?;
    let file: PoolsFile = toml::from_str(&text)
        .map_err(|e| BadInput(format!("{}: {}", path.display(), e.to_string().trim_end())))?;
    let bad = |i: usize, what: String| BadInput(format!("{}: pool[{i}]: {what}", path.display()));
    if file.pools.is_empty() {
        return Err(BadInput(format!("{}: no [[pool]] defined", path.display())).into());
    }
    for (i, p) in file.pools.iter().enumerate() {
        let ok = |s: &str| {
            !s.is_empty()
                && s.len() <= 40
                && s.chars()
                    .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_')
        };
        if !ok(&p.name) {
            return Err(bad(
                i,
                format!("name {:?}: use 1-40 letters, digits, - or _", p.name),
            )
            .into());
        }
        if file.pools[..i].iter().any(|q| q.name == p.name) {
            return Err(bad(i, format!("name {:?} is used twice", p.name)).into());
        }
        granule_spec::check_name(p.class())
            .map_err(|why| bad(i, format!("class {:?}: the name {why}", p.class())))?;
        if p.slots == 0 || p.max_workers == 0 {
            return Err(bad(i, "slots and max_workers must be at least 1".into()).into());
        }
        if !p.cost_per_hour.is_finite() || p.cost_per_hour < 0.0 {
            return Err(bad(i, "cost_per_hour must be a number, 0 or more".into()).into());
        }
        if p.walltime < Duration::from_secs(5) {
            return Err(bad(i, "walltime must be at least 5s".into()).into());
        }
        let needs = |key: &str, argv: &[String]| {
            if argv.is_empty() {
                Err(bad(
                    i,
                    format!("provider \"command\" needs `{key}` (an argv list)"),
                ))
            } else {
                Ok(())
            }
        };
        if p.provider == Kind::Command {
            needs("start", &p.start)?;
            needs("stop", &p.stop)?;
            needs("list", &p.list)?;
        } else if !(p.start.is_empty() && p.stop.is_empty() && p.list.is_empty()) {
            return Err(bad(
                i,
                "start, stop and list are for provider \"command\"".into(),
            )
            .into());
        }
        if p.provider != Kind::Slurm && !p.sbatch_args.is_empty() {
            return Err(bad(i, "sbatch_args are for provider \"slurm\"".into()).into());
        }
    }
    Ok(file.pools)
}

fn one() -> u32 {
    1
}
fn hour() -> Duration {
    Duration::from_secs(3600)
}
fn minute() -> Duration {
    Duration::from_secs(60)
}

/// An optional duration written as humantime text.
fn opt_duration<'de, D: Deserializer<'de>>(d: D) -> Result<Option<Duration>, D::Error> {
    duration(d).map(Some)
}

/// A duration written as humantime text (`"30s"`, `"2h"`).
fn duration<'de, D: Deserializer<'de>>(d: D) -> Result<Duration, D::Error> {
    let text = String::deserialize(d)?;
    humantime::parse_duration(text.trim())
        .map_err(|e| serde::de::Error::custom(format!("bad duration {text:?}: {e}")))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(text: &str) -> Result<Vec<PoolSpec>> {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("pools.toml");
        std::fs::write(&path, text).unwrap();
        load(&path)
    }

    #[test]
    fn the_budget_lowers_the_limit() {
        let pools = parse(
            "[[pool]]\nname = \"a\"\nprovider = \"local\"\nmax_workers = 10\ncost_per_hour = 0.5\nbudget_per_hour = 2.2\n",
        )
        .unwrap();
        assert_eq!(pools[0].limit(), 4);
        assert_eq!(pools[0].class(), "a");
        let free = parse(
            "[[pool]]\nname = \"b\"\nprovider = \"local\"\nmax_workers = 3\nbudget_per_hour = 1\n",
        )
        .unwrap();
        assert_eq!(free[0].limit(), 3, "a free pool is bounded by max_workers");
    }

    #[test]
    fn mistakes_name_the_pool_and_what() {
        let err =
            parse("[[pool]]\nname = \"a b\"\nprovider = \"local\"\nmax_workers = 1\n").unwrap_err();
        assert!(format!("{err}").contains("pool[0]: name \"a b\""), "{err}");
        let err =
            parse("[[pool]]\nname = \"a\"\nprovider = \"cloud\"\nmax_workers = 1\n").unwrap_err();
        assert!(format!("{err}").contains("cloud"), "{err}");
        let err = parse("").unwrap_err();
        assert!(format!("{err}").contains("no [[pool]]"), "{err}");
    }
}

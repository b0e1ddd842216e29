//! The document and its `[[stage]]` tables, turned into a [`JobSpec`].

use crate::graph::{self, Located};
use crate::locate::Ctx;
use crate::tree::{Field, Table};
use crate::{command, duration, items, needs, JobSpec, SpecError, StageSpec};
use granule_core::SizerConfig;
use serde::Deserialize;
use std::path::Path;
use toml::de::{DeTable, DeValue, ValueDeserializer};
use toml::Spanned;

/// Top-level keys: `owner`, `account` and `priority` are defaults for every stage.
const TOP_KEYS: [&str; 5] = ["name", "stage", "owner", "account", "priority"];
const STAGE_KEYS: [&str; 26] = [
    "name",
    "cwd",
    "env",
    "halt",
    "after_any",
    "outputs",
    "command",
    "per_item",
    "items",
    "after",
    "target",
    "limit",
    "retries",
    "initial",
    "sizer",
    "cpus",
    "memory",
    "gpus",
    "resources",
    "class",
    "prefer",
    "priority",
    "owner",
    "account",
    "deadline",
    "max_checkpoint",
];

/// Parses the whole document and runs every check.
pub(crate) fn parse_job(cx: &Ctx<'_>) -> Result<JobSpec, SpecError> {
    let doc = DeTable::parse(cx.text).map_err(|e| cx.syntax(&e))?;
    let root = Table::root(&doc);
    root.check_keys(cx, &TOP_KEYS)?;
    let name = root.require(cx, "name")?.name(cx)?.to_string();
    let folder = match cx.path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p,
        _ => Path::new("."),
    };
    // Absolute, so a worker started elsewhere runs the tasks in the same folder.
    let folder = &std::path::absolute(folder).unwrap_or_else(|_| folder.to_path_buf());
    let defaults = needs::parse(cx, &root)?;
    let stages = stage_tables(cx, &root)?
        .iter()
        .map(|t| parse_stage(cx, t, folder, &defaults))
        .collect::<Result<Vec<_>, _>>()?;
    graph::check(cx, &stages)?;
    Ok(JobSpec {
        name,
        stages: stages.into_iter().map(|s| s.spec).collect(),
        dir: Some(folder.to_path_buf()),
    })
}

/// The `[[stage]]` tables, keyed `stage[i]`; at least one.
fn stage_tables<'a>(cx: &Ctx<'_>, root: &Table<'a>) -> Result<Vec<Table<'a>>, SpecError> {
    let Some(field) = root.get("stage") else {
        return Err(cx.err(
            root.span.clone(),
            "stage",
            "a job needs at least one [[stage]]",
        ));
    };
    let elements = match field.value.get_ref() {
        DeValue::Array(_) => field.array(cx)?,
        _ => return Err(field.wrong_type(cx, "an array of tables ([[stage]])")),
    };
    if elements.is_empty() {
        return Err(field.err(cx, "a job needs at least one [[stage]]"));
    }
    let tables = elements.into_iter().enumerate().map(|(i, f)| {
        Field {
            key: format!("stage[{i}]"),
            ..f
        }
        .table(cx)
    });
    tables.collect()
}

/// One stage: its own keys checked, cross-stage checks left to [`graph`].
/// `defaults`: the job's own `owner`, `account` and `priority`, for stages without.
fn parse_stage(
    cx: &Ctx<'_>,
    t: &Table<'_>,
    folder: &Path,
    defaults: &granule_core::StageNeeds,
) -> Result<Located, SpecError> {
    t.check_keys(cx, &STAGE_KEYS)?;
    let name_field = t.require(cx, "name")?;
    let name = name_field.name(cx)?.to_string();
    // Errors name the stage as the user does, not by its position.
    let t = &t.renamed(format!("stage \"{name}\""));
    let cwd = match t.get("cwd") {
        Some(f) => {
            let dir = folder.join(f.non_empty_str(cx)?);
            if !dir.is_dir() {
                return Err(f.err(
                    cx,
                    format!(
                        "cwd {} is not a folder (relative paths start at the spec's folder)",
                        dir.display()
                    ),
                ));
            }
            Some(dir)
        }
        None => None,
    };
    let env = parse_env(cx, t)?;
    let halt = t.get("halt").map(|f| parse_halt(cx, &f)).transpose()?;
    let command = parse_command(
        cx,
        &t.require(cx, "command")?,
        cwd.as_deref().unwrap_or(folder),
    )?;
    let per_item = t
        .get("per_item")
        .map(|f| f.bool(cx))
        .transpose()?
        .unwrap_or(false);
    let mut refs = Vec::new();
    let items = items::parse(cx, &t.require(cx, "items")?, folder, &mut refs)?;
    let from_spans = refs.iter().map(|(_, s)| s.clone()).collect();
    let names = |key: &str| {
        t.get(key)
            .map(|f| f.strings(cx))
            .transpose()
            .map(Option::unwrap_or_default)
    };
    let after = names("after")?;
    let after_any = names("after_any")?;
    let stdout_outputs = match t.get("outputs") {
        None => false,
        Some(f) => match f.str(cx)? {
            "stdout" if per_item => true,
            "stdout" => {
                return Err(f.err(
                    cx,
                    "outputs = \"stdout\" needs per_item = true (a batch task writes \"$GRANULE_CMD emit VALUE\" on fd 3 before the item's ack)",
                ))
            }
            other => {
                return Err(f.err(
                    cx,
                    format!("outputs = {other:?}: the only mode is \"stdout\" (each stdout line of a per-item task is an output of its item)"),
                ))
            }
        },
    };
    let retries = t
        .get("retries")
        .map(|f| retries(cx, &f))
        .transpose()?
        .unwrap_or(3);
    let sizer = parse_sizer(cx, t)?;
    let mut needs = needs::parse(cx, t)?;
    if t.get("owner").is_none() {
        needs.owner.clone_from(&defaults.owner);
    }
    if t.get("account").is_none() {
        needs.account.clone_from(&defaults.account);
    }
    if t.get("priority").is_none() {
        needs.priority = defaults.priority;
    }
    let max_checkpoint_bytes = match t.get("max_checkpoint") {
        Some(f) => {
            let mib = needs::memory_mb(cx, &f)?;
            if mib == 0 {
                return Err(f.err(cx, "max_checkpoint must be more than 0"));
            }
            mib.saturating_mul(1 << 20)
        }
        None => crate::DEFAULT_MAX_CHECKPOINT_BYTES,
    };
    let (after, after_spans) = after.into_iter().unzip();
    let (after_any, any_spans) = after_any.into_iter().unzip();
    let spec = StageSpec {
        name,
        command,
        per_item,
        items,
        after,
        after_any,
        stdout_outputs,
        retries,
        sizer,
        needs,
        max_checkpoint_bytes,
        cwd,
        env,
        halt,
    };
    Ok(Located {
        spec,
        name_span: name_field.span(),
        after_spans,
        any_spans,
        from_spans,
    })
}

/// `env = { NAME = "value" }`: strings only, names without `=` or NUL.
fn parse_env(
    cx: &Ctx<'_>,
    t: &Table<'_>,
) -> Result<std::collections::BTreeMap<String, String>, SpecError> {
    let mut env = std::collections::BTreeMap::new();
    let Some(f) = t.get("env") else {
        return Ok(env);
    };
    for var in f.table(cx)?.fields() {
        let name = var.key.rsplit('.').next().unwrap_or_default().to_string();
        if name.is_empty() || name.contains(['=', '\0']) || name.starts_with("GRANULE_") {
            return Err(var.err(
                cx,
                "an environment variable's name must be non-empty, without '=', and not start with GRANULE_ (granule's own)",
            ));
        }
        env.insert(name, var.str(cx)?.to_string());
    }
    Ok(env)
}

/// `halt = { fail_ratio = 0.5, after = 100 }`.
fn parse_halt(cx: &Ctx<'_>, f: &Field<'_>) -> Result<crate::Halt, SpecError> {
    let table = f.table(cx)?;
    table.check_keys(cx, &["fail_ratio", "after"])?;
    let ratio = table.require(cx, "fail_ratio")?;
    let fail_ratio = needs::amount(cx, &ratio)?;
    if !(fail_ratio > 0.0 && fail_ratio <= 1.0) {
        return Err(ratio.err(
            cx,
            format!("fail_ratio must be in (0, 1] (found {fail_ratio})"),
        ));
    }
    let after = match table.get("after") {
        Some(a) => u64::try_from(a.int(cx)?)
            .ok()
            .filter(|&n| n >= 1)
            .ok_or_else(|| a.err(cx, "after must be at least 1"))?,
        None => 20,
    };
    Ok(crate::Halt { fail_ratio, after })
}

/// `command`: a non-empty argv whose program can be found now (a path, in `cwd`).
fn parse_command(cx: &Ctx<'_>, field: &Field<'_>, cwd: &Path) -> Result<Vec<String>, SpecError> {
    let argv = field.strings(cx)?;
    let Some((program, span)) = argv.first() else {
        return Err(field.err(
            cx,
            "command is empty (give an argv such as [\"python3\", \"run.py\"])",
        ));
    };
    if program.is_empty() {
        return Err(cx.err(span.clone(), &field.key, "command[0] is empty"));
    }
    command::check(program, cwd).map_err(|msg| cx.err(span.clone(), &field.key, msg))?;
    Ok(argv.into_iter().map(|(arg, _)| arg).collect())
}

fn retries(cx: &Ctx<'_>, field: &Field<'_>) -> Result<u32, SpecError> {
    let n = field.int(cx)?;
    u32::try_from(n)
        .map_err(|_| field.err(cx, format!("retries must be between 0 and {}", u32::MAX)))
}

fn initial(cx: &Ctx<'_>, field: &Field<'_>) -> Result<u64, SpecError> {
    let n = field.int(cx)?;
    u64::try_from(n)
        .ok()
        .filter(|&n| n >= 1)
        .ok_or_else(|| field.err(cx, "initial must be at least 1"))
}

/// `[stage.sizer]` plus the stage's `target`, `limit` and `initial`.
fn parse_sizer(cx: &Ctx<'_>, t: &Table<'_>) -> Result<SizerConfig, SpecError> {
    let mut sizer = match t.get("sizer") {
        Some(field) => {
            let sizer = sizer_table(cx, &field)?;
            check_sizer(cx, &field.table(cx)?, &sizer)?;
            sizer
        }
        None => SizerConfig::default(),
    };
    let target = t.get("target");
    let limit = t.get("limit");
    sizer.target_ms = target
        .as_ref()
        .map(|f| duration::millis(cx, f))
        .transpose()?;
    sizer.limit_ms = limit
        .as_ref()
        .map(|f| duration::millis(cx, f))
        .transpose()?;
    sizer.initial = t.get("initial").map(|f| initial(cx, &f)).transpose()?;
    if let (Some(tf), Some(lf), Some(tm), Some(lm)) =
        (&target, &limit, sizer.target_ms, sizer.limit_ms)
    {
        if tm >= lm {
            let (ts, ls) = (&cx.text[tf.span()], &cx.text[lf.span()]);
            return Err(tf.err(cx, format!("target {ts} must be below limit {ls}")));
        }
    }
    Ok(sizer)
}

/// Deserializes `[stage.sizer]`, naming the offending key on error.
fn sizer_table(cx: &Ctx<'_>, field: &Field<'_>) -> Result<SizerConfig, SpecError> {
    let table = field.table(cx)?;
    let value: Spanned<DeValue<'_>> = field.value.clone();
    SizerConfig::deserialize(ValueDeserializer::from(value)).map_err(|e| {
        let span = e.span().unwrap_or_else(|| field.span());
        let key = table
            .key_at(span.start)
            .unwrap_or_else(|| field.key.clone());
        cx.err(span, &key, sizer_message(e.message()))
    })
}

/// serde's "unknown field `x`, expected one of `a`, `b`" in this crate's words.
fn sizer_message(message: &str) -> String {
    let Some(rest) = message.strip_prefix("unknown field `") else {
        return message.to_string();
    };
    let (name, expected) = rest.split_once('`').unwrap_or((rest, ""));
    let expected = expected
        .trim_start_matches(", expected one of ")
        .replace('`', "");
    format!("unknown key \"{name}\" (expected one of: {expected})")
}

/// Every sizer number is finite and in its range (a NaN stored in the store once
/// broke every job): the first one that is not is named, where it is.
fn check_sizer(cx: &Ctx<'_>, table: &Table<'_>, c: &SizerConfig) -> Result<(), SpecError> {
    let share = |x: f64| x > 0.0 && x < 1.0;
    let checks: [(&str, f64, bool, &str); 12] = [
        ("kp", c.kp, c.kp >= 0.0, "a number, 0 or more"),
        ("ki", c.ki, c.ki >= 0.0, "a number, 0 or more"),
        ("kd", c.kd, c.kd >= 0.0, "a number, 0 or more"),
        (
            "forget",
            c.forget,
            c.forget > 0.0 && c.forget <= 1.0,
            "in (0, 1]",
        ),
        (
            "overhead_share",
            c.overhead_share,
            share(c.overhead_share),
            "in (0, 1)",
        ),
        (
            "target_min_ms",
            c.target_min_ms,
            c.target_min_ms > 0.0,
            "more than 0",
        ),
        (
            "target_max_ms",
            c.target_max_ms,
            c.target_max_ms >= c.target_min_ms,
            "at least target_min_ms",
        ),
        (
            "tail_factor",
            c.tail_factor,
            c.tail_factor > 0.0,
            "more than 0",
        ),
        (
            "tail_overhead_share",
            c.tail_overhead_share,
            share(c.tail_overhead_share),
            "in (0, 1)",
        ),
        (
            "min_free_memory",
            c.min_free_memory,
            (0.0..1.0).contains(&c.min_free_memory),
            "in [0, 1)",
        ),
        ("max_load", c.max_load, c.max_load > 0.0, "more than 0"),
        (
            "deadline_share",
            c.deadline_share,
            c.deadline_share > 0.0 && c.deadline_share <= 1.0,
            "in (0, 1]",
        ),
    ];
    let at = |key: &str, msg: String| match table.get(key) {
        Some(f) => f.err(cx, msg),
        None => cx.err(table.span.clone(), &format!("{}.{key}", table.key), msg),
    };
    for (key, value, ok, range) in checks {
        if !value.is_finite() || !ok {
            return Err(at(key, format!("{key} must be {range} (found {value})")));
        }
    }
    if c.min_items == 0 {
        return Err(at("min_items", "min_items must be at least 1".into()));
    }
    if c.max_items < c.min_items {
        let msg = format!(
            "max_items ({}) must be at least min_items ({})",
            c.max_items, c.min_items
        );
        return Err(at("max_items", msg));
    }
    Ok(())
}

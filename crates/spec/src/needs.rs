//! What one slot of a stage needs and how it is placed: `cpus`, `memory`, `gpus`,
//! `resources`, `class` (required) or `prefer` (preferred class), `priority`, `owner`,
//! `account`, `deadline` (how long after submission the stage should be done).

use crate::locate::Ctx;
use crate::tree::{Field, Table};
use crate::SpecError;
use granule_core::StageNeeds;
use toml::de::DeValue;

/// Reads the placement keys of a stage (all optional; no key means no constraint).
pub(crate) fn parse(cx: &Ctx<'_>, t: &Table<'_>) -> Result<StageNeeds, SpecError> {
    let mut needs = StageNeeds::default();
    if let Some(f) = t.get("cpus") {
        needs.cpus = amount(cx, &f)?;
    }
    if let Some(f) = t.get("memory") {
        needs.memory_mb = memory_mb(cx, &f)?;
    }
    if let Some(f) = t.get("gpus") {
        needs.gpus = u32::try_from(f.int(cx)?)
            .map_err(|_| f.err(cx, "gpus must be a whole number, 0 or more"))?;
    }
    if let Some(f) = t.get("resources") {
        for r in f.table(cx)?.fields() {
            let name = r.key.rsplit('.').next().unwrap_or_default().to_string();
            crate::check_name(&name).map_err(|why| {
                cx.err(r.key_span.clone(), &r.key, format!("resource name {why}"))
            })?;
            needs.resources.insert(name, amount(cx, &r)?);
        }
    }
    match (t.get("class"), t.get("prefer")) {
        (Some(c), Some(_)) => {
            return Err(c.err(cx, "give class (required) or prefer (preferred), not both"))
        }
        (Some(c), None) => {
            needs.class = Some(c.name(cx)?.to_string());
            needs.class_required = true;
        }
        (None, Some(p)) => needs.class = Some(p.name(cx)?.to_string()),
        (None, None) => {}
    }
    if let Some(f) = t.get("priority") {
        needs.priority = f.int(cx)?;
    }
    if let Some(f) = t.get("owner") {
        needs.owner = Some(f.name(cx)?.to_string());
    }
    if let Some(f) = t.get("account") {
        needs.account = Some(f.name(cx)?.to_string());
    }
    if let Some(f) = t.get("deadline") {
        needs.deadline_ms = Some(crate::duration::millis(cx, &f)?);
    }
    Ok(needs)
}

/// A non-negative number (integer or float).
pub(crate) fn amount(cx: &Ctx<'_>, f: &Field<'_>) -> Result<f64, SpecError> {
    let value = match f.value.get_ref() {
        DeValue::Integer(_) => f.int(cx)? as f64,
        DeValue::Float(x) => x
            .as_str()
            .parse::<f64>()
            .map_err(|_| f.err(cx, "not a number"))?,
        _ => return Err(f.wrong_type(cx, "a number")),
    };
    if !value.is_finite() || value < 0.0 {
        return Err(f.err(cx, "must be a number, 0 or more"));
    }
    Ok(value)
}

/// Memory: MiB as a number, or a string with a unit (`"512MiB"`, `"4GiB"`, `"2G"`).
pub(crate) fn memory_mb(cx: &Ctx<'_>, f: &Field<'_>) -> Result<u64, SpecError> {
    let DeValue::String(text) = f.value.get_ref() else {
        return Ok(amount(cx, f)?.ceil() as u64);
    };
    let text = text.trim();
    let split = text
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(text.len());
    let (number, unit) = text.split_at(split);
    let scale = match unit.trim().to_ascii_lowercase().as_str() {
        "" | "m" | "mb" | "mib" => 1.0,
        "g" | "gb" | "gib" => 1024.0,
        "t" | "tb" | "tib" => 1024.0 * 1024.0,
        "k" | "kb" | "kib" => 1.0 / 1024.0,
        _ => {
            return Err(f.err(
                cx,
                format!("bad memory \"{text}\" (use e.g. \"512MiB\", \"4GiB\" or a number of MiB)"),
            ))
        }
    };
    let number: f64 = number
        .parse()
        .map_err(|_| f.err(cx, format!("bad memory \"{text}\"")))?;
    Ok((number * scale).ceil() as u64)
}

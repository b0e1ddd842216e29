//! Durations in a spec: a number of seconds or a humantime string.

use crate::locate::Ctx;
use crate::tree::Field;
use crate::SpecError;
use toml::de::DeValue;

/// The longest duration a spec may give (10 years): anything longer is a typo, and
/// would overflow the clocks a worker adds it to.
const MAX_MS: f64 = 10.0 * 365.25 * 86_400_000.0;

/// The duration in `field` as milliseconds: seconds as an integer or float
/// (`2`, `0.5`) or a humantime string (`"500ms"`, `"1m 30s"`); must be > 0.
pub(crate) fn millis(cx: &Ctx<'_>, field: &Field<'_>) -> Result<f64, SpecError> {
    let ms = match field.value.get_ref() {
        DeValue::Integer(_) => field.int(cx)? as f64 * 1000.0,
        DeValue::Float(f) => seconds(f.as_str()).ok_or_else(|| bad_number(cx, field))? * 1000.0,
        DeValue::String(s) => from_text(s).map_err(|m| field.err(cx, m))?,
        _ => return Err(field.wrong_type(cx, "a duration (seconds, or a string like \"2s\")")),
    };
    if !ms.is_finite() || ms <= 0.0 {
        return Err(field.err(cx, "duration must be greater than zero"));
    }
    if ms > MAX_MS {
        return Err(field.err(cx, "duration must be at most 10 years"));
    }
    Ok(ms)
}

/// A TOML float's text as seconds, if finite.
fn seconds(text: &str) -> Option<f64> {
    text.parse::<f64>().ok().filter(|s| s.is_finite())
}

fn bad_number(cx: &Ctx<'_>, field: &Field<'_>) -> SpecError {
    field.err(cx, "duration must be a finite number of seconds")
}

/// A humantime string as milliseconds.
fn from_text(text: &str) -> Result<f64, String> {
    let d = humantime::parse_duration(text.trim()).map_err(|e| {
        format!("bad duration \"{text}\": {e} (use e.g. \"500ms\", \"2s\", \"1m 30s\" or a number of seconds)")
    })?;
    Ok(d.as_nanos() as f64 / 1e6)
}

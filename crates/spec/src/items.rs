//! A stage's `items`: exactly one of `range`, `lines`, `list`, `from` or
//! `results_of`.

use crate::locate::Ctx;
use crate::tree::Field;
use crate::{ItemsSpec, SpecError};
use std::io::Read;
use std::path::Path;
use toml::de::DeValue;

const SOURCES: [&str; 5] = ["range", "lines", "list", "from", "results_of"];

/// Parses and checks `items`; `lines` paths are relative to `folder`. Stage names
/// that `from` and `results_of` give go to `refs` (with their spans), for the
/// cross-stage checks.
pub(crate) fn parse(
    cx: &Ctx<'_>,
    field: &Field<'_>,
    folder: &Path,
    refs: &mut Vec<(String, std::ops::Range<usize>)>,
) -> Result<ItemsSpec, SpecError> {
    let table = field.table(cx)?;
    table.check_keys(cx, &SOURCES)?;
    let sources = table.present(&SOURCES);
    let source = match sources.as_slice() {
        [] => return Err(field.err(cx, "needs one of range, lines, list, from or results_of")),
        [one] => one,
        [first, second, ..] => {
            let (a, b) = (last_segment(&first.key), last_segment(&second.key));
            let msg = format!(
                "has both {a} and {b}; give exactly one of range, lines, list, from, results_of"
            );
            return Err(cx.err(second.key_span.clone(), &field.key, msg));
        }
    };
    match last_segment(&source.key) {
        "range" => range(cx, source),
        "lines" => lines(cx, source, folder),
        "list" => list(cx, source),
        which => {
            // One name or a list of names of stages of this job.
            let names = match source.value.get_ref() {
                DeValue::String(_) => vec![(source.name(cx)?.to_string(), source.span())],
                _ => source.strings(cx)?,
            };
            if names.is_empty() {
                return Err(source.err(cx, format!("{which} names no stage")));
            }
            let from = names.iter().map(|(n, _)| n.clone()).collect();
            refs.extend(names);
            Ok(ItemsSpec::Stream {
                from,
                results: which == "results_of",
            })
        }
    }
}

fn last_segment(key: &str) -> &str {
    key.rsplit('.').next().unwrap_or(key)
}

/// `range = [start, end]`, half-open, non-empty.
fn range(cx: &Ctx<'_>, field: &Field<'_>) -> Result<ItemsSpec, SpecError> {
    let bounds = field.array(cx)?;
    let [start, end] = bounds.as_slice() else {
        return Err(field.err(cx, "range needs two integers [start, end]"));
    };
    let (start, end) = (start.int(cx)?, end.int(cx)?);
    if start == end {
        return Err(field.err(cx, format!("range [{start}, {end}] is empty")));
    }
    if start > end {
        return Err(field.err(cx, format!("range [{start}, {end}] is reversed")));
    }
    if end.checked_sub(start).is_none() {
        return Err(field.err(cx, format!("range [{start}, {end}] is too large")));
    }
    Ok(ItemsSpec::Range { start, end })
}

/// `list = [...]`: strings or integers, non-empty, no line breaks.
fn list(cx: &Ctx<'_>, field: &Field<'_>) -> Result<ItemsSpec, SpecError> {
    let elements = field.array(cx)?;
    if elements.is_empty() {
        return Err(field.err(cx, "list is empty (no items)"));
    }
    let values = elements.iter().enumerate().map(|(i, f)| {
        let value = match f.value.get_ref() {
            DeValue::String(s) => s.to_string(),
            DeValue::Integer(_) => f.int(cx)?.to_string(),
            other => {
                let found = other.type_str();
                return Err(f.err(
                    cx,
                    format!("item {i}: expected a string or integer, found {found}"),
                ));
            }
        };
        if value.contains(['\n', '\r']) {
            let msg =
                format!("item {i} ({value:?}) contains a line break (items are fed one per line)");
            return Err(f.err(cx, msg));
        }
        Ok(value)
    });
    Ok(ItemsSpec::List {
        values: values.collect::<Result<_, _>>()?,
    })
}

/// `lines = "path"`: an existing, readable, non-empty file, relative to `folder`.
fn lines(cx: &Ctx<'_>, field: &Field<'_>, folder: &Path) -> Result<ItemsSpec, SpecError> {
    let given = Path::new(field.non_empty_str(cx)?);
    let joined = folder.join(given);
    let shown = std::path::absolute(&joined).unwrap_or(joined);
    let path = std::fs::canonicalize(&shown).map_err(|_| {
        let hint = if given.is_relative() {
            " (relative to the spec's folder)"
        } else {
            ""
        };
        field.err(cx, format!("file not found: {}{hint}", shown.display()))
    })?;
    if !path.is_file() {
        return Err(field.err(cx, format!("not a regular file: {}", path.display())));
    }
    let scan = scan_lines(&path)
        .map_err(|e| field.err(cx, format!("cannot read {}: {e}", path.display())))?;
    if scan.count == 0 {
        return Err(field.err(cx, format!("no items: {} is empty", path.display())));
    }
    Ok(ItemsSpec::Lines {
        path,
        count: scan.count,
        bytes: scan.bytes,
        hash: Some(scan.hash),
    })
}

/// What reading a lines file once tells: its lines, length and content hash.
pub struct LinesScan {
    /// Lines; a last line without a trailing newline counts too.
    pub count: u64,
    /// Length, bytes.
    pub bytes: u64,
    /// blake3 of the content, hex.
    pub hash: String,
}

/// Reads a lines file once: counts its lines and hashes its content.
pub fn scan_lines(path: &Path) -> std::io::Result<LinesScan> {
    let mut file = std::fs::File::open(path)?;
    let mut buf = vec![0u8; 1 << 16];
    let mut hasher = blake3::Hasher::new();
    let (mut newlines, mut bytes, mut last) = (0u64, 0u64, b'\n');
    loop {
        let n = match file.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(e),
        };
        hasher.update(&buf[..n]);
        newlines += buf[..n].iter().filter(|&&b| b == b'\n').count() as u64;
        bytes += n as u64;
        last = buf[n - 1];
    }
    Ok(LinesScan {
        count: newlines + u64::from(last != b'\n'),
        bytes,
        hash: hasher.finalize().to_hex().to_string(),
    })
}

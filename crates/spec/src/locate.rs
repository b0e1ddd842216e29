//! Turning byte spans into `FILE:LINE:COL` errors, and naming the key of a TOML
//! syntax error as best the text allows.

use crate::SpecError;
use std::collections::HashMap;
use std::ops::Range;
use std::path::Path;

/// The spec being parsed: its text (for positions) and its path (for errors).
pub(crate) struct Ctx<'a> {
    pub(crate) text: &'a str,
    pub(crate) path: &'a Path,
}

impl<'a> Ctx<'a> {
    pub(crate) fn new(text: &'a str, path: &'a Path) -> Self {
        Ctx { text, path }
    }

    /// An error at `span` (only its start matters) under the dotted `key`.
    pub(crate) fn err(
        &self,
        span: Range<usize>,
        key: &str,
        message: impl Into<String>,
    ) -> SpecError {
        let (line, column) = line_col(self.text, span.start);
        SpecError {
            file: self.path.to_path_buf(),
            line,
            column,
            key: key.to_string(),
            message: message.into(),
        }
    }

    /// The 1-based line of a byte offset (for messages such as "first at line 3").
    pub(crate) fn line_of(&self, offset: usize) -> usize {
        line_col(self.text, offset).0
    }

    /// A TOML syntax error, with the key guessed from the text around it.
    pub(crate) fn syntax(&self, e: &toml::de::Error) -> SpecError {
        let span = e.span().unwrap_or(0..0);
        let mut message = e.message().trim().to_string();
        let snippet = self.text.get(span.clone()).unwrap_or("").trim();
        if message == "duplicate key" && is_plain_key(snippet) {
            message = format!("duplicate key \"{snippet}\"");
        }
        self.err(span.clone(), &guess_key(self.text, span.start), message)
    }
}

/// 1-based line and column (in characters) of byte `offset` in `text`.
pub(crate) fn line_col(text: &str, offset: usize) -> (usize, usize) {
    let offset = char_floor(text, offset);
    let before = &text[..offset];
    let line_start = line_start(text, offset);
    let line = before.matches('\n').count() + 1;
    (line, before[line_start..].chars().count() + 1)
}

/// `offset` clamped to the text and moved back to a character boundary.
fn char_floor(text: &str, offset: usize) -> usize {
    let mut offset = offset.min(text.len());
    while !text.is_char_boundary(offset) {
        offset -= 1;
    }
    offset
}

/// The dotted key of the line holding `offset`: the table header above it plus
/// the `key =` on that line, e.g. `stage[1].retries`; "" when nothing fits.
fn guess_key(text: &str, offset: usize) -> String {
    let offset = line_start(text, offset);
    let mut table = String::new();
    let mut counts: HashMap<String, usize> = HashMap::new();
    for line in text[..offset].lines() {
        if let Some(header) = header_of(line, &mut counts) {
            table = header;
        }
    }
    let current = text[offset..].lines().next().unwrap_or("");
    if let Some(header) = header_of(current, &mut counts) {
        return header;
    }
    let key = current.split_once('=').map(|(k, _)| k.trim());
    match key.filter(|k| is_plain_key(k)) {
        Some(k) if table.is_empty() => k.to_string(),
        Some(k) => format!("{table}.{k}"),
        None => table,
    }
}

/// Byte offset of the start of the line holding `offset`.
fn line_start(text: &str, offset: usize) -> usize {
    text[..char_floor(text, offset)]
        .rfind('\n')
        .map_or(0, |i| i + 1)
}

/// The qualified name of a `[table]` or `[[array]]` header line, counting arrays.
fn header_of(line: &str, counts: &mut HashMap<String, usize>) -> Option<String> {
    let t = line.trim();
    if let Some(rest) = t.strip_prefix("[[") {
        let name = rest.split("]]").next()?.trim().to_string();
        let n = counts.entry(name.clone()).or_insert(0);
        *n += 1;
        return Some(format!("{name}[{}]", *n - 1));
    }
    let name = t.strip_prefix('[')?.split(']').next()?.trim();
    Some(qualify(name, counts))
}

/// Rewrites `stage.sizer` as `stage[N].sizer` when `stage` is an array of tables.
fn qualify(name: &str, counts: &HashMap<String, usize>) -> String {
    match name.split_once('.') {
        Some((head, tail)) => match counts.get(head.trim()) {
            Some(n) => format!("{}[{}].{}", head.trim(), n - 1, tail.trim()),
            None => name.to_string(),
        },
        None => name.to_string(),
    }
}

/// Whether `k` looks like a TOML key (bare or dotted, maybe quoted).
fn is_plain_key(k: &str) -> bool {
    !k.is_empty()
        && k.chars()
            .all(|c| c.is_ascii_alphanumeric() || "_-. \"'".contains(c))
}

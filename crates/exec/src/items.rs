//! Item values: what the command sees for each index of a stage.
//!
//! Items are byte strings: a range computes its values, a list holds them, a lines
//! file is read in sequence from a sparse offset index (one offset per 4096 lines),
//! so a fragment starts near its first line without holding the file in memory.
//! A line is its bytes up to `\n` (a `\r` before it is dropped), whatever they are:
//! not UTF-8, empty, spaces. The file is pinned by its length, line count and
//! content hash at submit; a file that changed since is refused, and one that ends
//! early while a fragment reads it is an error, never a run of empty values.

use granule_core::Span;
use granule_spec::ItemsSpec;
use std::fs::File;
use std::io::{self, BufRead, BufReader, Read, Seek, SeekFrom};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::SystemTime;

/// Lines between two entries of the sparse offset index.
const LINE_STRIDE: u64 = 4096;

/// Why items could not be read.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ItemsError {
    /// The lines file is not what was submitted.
    #[error("items file {} changed since the job was submitted ({what}); restore it and run or submit the job again, or start over with --fresh", path.display())]
    Changed {
        /// The file.
        path: PathBuf,
        /// What differs.
        what: String,
    },
    /// Reading the file failed.
    #[error("items file {}: {source}", path.display())]
    Io {
        /// The file.
        path: PathBuf,
        /// The error.
        source: io::Error,
    },
}

/// Where a stage's item values come from, ready to iterate any span.
#[derive(Clone, Debug)]
pub enum ItemSource {
    /// Integers: item `i` has value `start + i`.
    Range {
        /// Value of item 0.
        start: i64,
        /// Number of items.
        count: u64,
    },
    /// Literal values.
    List(Arc<Vec<String>>),
    /// Lines of a file.
    Lines(Arc<LinesFile>),
    /// Values fetched for one span of a streamed stage: item `first + k` is
    /// `values[k]` (a record's bytes, or the local path of a file).
    Values {
        /// Index of the first value.
        first: u64,
        /// The values.
        values: Arc<Vec<Vec<u8>>>,
    },
}

/// A lines file, indexed.
#[derive(Debug)]
pub struct LinesFile {
    path: PathBuf,
    count: u64,
    /// Byte offset of line `k * LINE_STRIDE`, and the file's length last.
    offsets: Vec<u64>,
    /// Length and modification time when indexed, to notice a change cheaply.
    len: u64,
    modified: Option<SystemTime>,
}

impl ItemSource {
    /// Prepares a source; a lines file is read once (indexed and hashed) and must
    /// be the file that was submitted.
    pub fn open(spec: &ItemsSpec) -> Result<ItemSource, ItemsError> {
        Ok(match spec {
            ItemsSpec::Range { start, end } => ItemSource::Range {
                start: *start,
                count: (end - start) as u64,
            },
            ItemsSpec::List { values } => ItemSource::List(Arc::new(values.clone())),
            // The worker fetches a streamed stage's values for each fragment.
            ItemsSpec::Stream { .. } => ItemSource::Values {
                first: 0,
                values: Arc::default(),
            },
            ItemsSpec::Lines {
                path,
                count,
                bytes,
                hash,
            } => {
                let io = |source| ItemsError::Io {
                    path: path.clone(),
                    source,
                };
                let (file, found_hash) = index_lines(path).map_err(io)?;
                let changed = |what: String| ItemsError::Changed {
                    path: path.clone(),
                    what,
                };
                if file.count != *count {
                    return Err(changed(format!(
                        "{} lines, submitted with {count}",
                        file.count
                    )));
                }
                if let Some(hash) = hash {
                    if file.len != *bytes {
                        return Err(changed(format!(
                            "{} bytes, submitted with {bytes}",
                            file.len
                        )));
                    }
                    if found_hash != *hash {
                        return Err(changed("same length, other content".into()));
                    }
                }
                ItemSource::Lines(Arc::new(file))
            }
        })
    }

    /// Whether the source is still as it was opened. A lines file whose length or
    /// modification time moved must be opened again (and verified) before use.
    pub fn unchanged(&self) -> bool {
        match self {
            ItemSource::Lines(file) => std::fs::metadata(&file.path)
                .is_ok_and(|m| m.len() == file.len && m.modified().ok() == file.modified),
            _ => true,
        }
    }

    /// Number of items.
    pub fn count(&self) -> u64 {
        match self {
            ItemSource::Range { count, .. } => *count,
            ItemSource::Lines(file) => file.count,
            ItemSource::List(values) => values.len() as u64,
            ItemSource::Values { first, values } => first + values.len() as u64,
        }
    }

    /// The index of `value` within `span` when it can be computed without
    /// remembering what was fed (ranges); `None` means "ask the feeder".
    pub fn direct_index(&self, value: &[u8], span: Span) -> Option<Option<u64>> {
        match self {
            ItemSource::Range { start, .. } => {
                let index = std::str::from_utf8(value)
                    .ok()
                    .and_then(|v| v.trim().parse::<i64>().ok())
                    .and_then(|v| v.checked_sub(*start))
                    .and_then(|i| u64::try_from(i).ok());
                Some(index.filter(|i| (span.start..span.end).contains(i)))
            }
            _ => None,
        }
    }

    /// Whether items have sizes that may matter (lines and list values); a range's
    /// values are numbers of a few bytes each.
    pub fn sized(&self) -> bool {
        !matches!(self, ItemSource::Range { .. })
    }

    /// Bytes of the values in `span` with their newlines: exact for lists, for a
    /// lines file exact every 4096th line and interpolated in between.
    pub fn bytes(&self, span: Span) -> u64 {
        match self {
            // About: every value as long as the first.
            ItemSource::Range { start, .. } => {
                let first = (start + span.start as i64).to_string().len() as u64 + 1;
                first * span.len()
            }
            ItemSource::List(values) => values
                [span.start as usize..(span.end as usize).min(values.len())]
                .iter()
                .map(|v| v.len() as u64 + 1)
                .sum(),
            ItemSource::Values { first, values } => {
                let at = |i: u64| (i.saturating_sub(*first) as usize).min(values.len());
                values[at(span.start)..at(span.end)]
                    .iter()
                    .map(|v| v.len() as u64 + 1)
                    .sum()
            }
            ItemSource::Lines(file) => {
                let (count, offsets) = (file.count, &file.offsets);
                let at = |line: u64| -> f64 {
                    let line = line.min(count);
                    let k = (line / LINE_STRIDE) as usize;
                    let base = offsets[k.min(offsets.len() - 1)] as f64;
                    let next = offsets
                        .get(k + 1)
                        .copied()
                        .unwrap_or(*offsets.last().unwrap_or(&0));
                    let stride = LINE_STRIDE.min(count - k as u64 * LINE_STRIDE).max(1) as f64;
                    base + (next as f64 - base) * (line - k as u64 * LINE_STRIDE) as f64 / stride
                };
                (at(span.end) - at(span.start)).max(0.0).round() as u64
            }
        }
    }

    /// The values of `span`, in order.
    pub fn iter(&self, span: Span) -> Result<ItemIter, ItemsError> {
        let span = Span::new(span.start.min(self.count()), span.end.min(self.count()));
        Ok(match self {
            ItemSource::Range { start, .. } => ItemIter::Range {
                next: *start + span.start as i64,
                left: span.len(),
            },
            ItemSource::List(values) => ItemIter::List {
                values: values.clone(),
                next: span.start as usize,
                end: span.end as usize,
            },
            ItemSource::Values { first, values } => ItemIter::Values {
                values: values.clone(),
                next: span.start.saturating_sub(*first) as usize,
                end: span.end.saturating_sub(*first) as usize,
            },
            ItemSource::Lines(file) => {
                let io = |source| ItemsError::Io {
                    path: file.path.clone(),
                    source,
                };
                let mark = (span.start / LINE_STRIDE) as usize;
                let mut reader = BufReader::new(File::open(&file.path).map_err(io)?);
                reader
                    .seek(SeekFrom::Start(file.offsets[mark]))
                    .map_err(io)?;
                let mut iter = ItemIter::Lines {
                    file: file.clone(),
                    reader,
                    line: mark as u64 * LINE_STRIDE,
                    end: span.end,
                };
                let mut skip = Vec::new();
                for _ in (mark as u64 * LINE_STRIDE)..span.start {
                    iter.next_value(&mut skip)?;
                }
                iter
            }
        })
    }
}

/// Indexes a lines file: offsets every `LINE_STRIDE` lines, line count, length
/// and content hash, in one pass.
fn index_lines(path: &Path) -> io::Result<(LinesFile, String)> {
    let mut file = File::open(path)?;
    let meta = file.metadata()?;
    let mut buf = vec![0u8; 1 << 16];
    let mut hasher = blake3::Hasher::new();
    let mut offsets = vec![0];
    let (mut offset, mut lines, mut last) = (0u64, 0u64, b'\n');
    loop {
        let n = match file.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(e),
        };
        hasher.update(&buf[..n]);
        for (i, _) in buf[..n].iter().enumerate().filter(|(_, &b)| b == b'\n') {
            lines += 1;
            if lines % LINE_STRIDE == 0 {
                offsets.push(offset + i as u64 + 1);
            }
        }
        offset += n as u64;
        last = buf[n - 1];
    }
    if last != b'\n' {
        lines += 1; // a last line without a newline
    }
    if lines % LINE_STRIDE != 0 {
        offsets.push(offset);
    }
    let indexed = LinesFile {
        path: path.to_path_buf(),
        count: lines,
        offsets,
        len: offset,
        modified: meta.modified().ok(),
    };
    Ok((indexed, hasher.finalize().to_hex().to_string()))
}

/// An owned iterator over the values of a span.
#[derive(Debug)]
pub enum ItemIter {
    /// Computed integers.
    Range {
        /// Next value.
        next: i64,
        /// Values left.
        left: u64,
    },
    /// A slice of a list.
    List {
        /// The list.
        values: Arc<Vec<String>>,
        /// Next position.
        next: usize,
        /// End position.
        end: usize,
    },
    /// A slice of fetched values.
    Values {
        /// The values.
        values: Arc<Vec<Vec<u8>>>,
        /// Next position.
        next: usize,
        /// End position.
        end: usize,
    },
    /// Lines read in sequence.
    Lines {
        /// The file.
        file: Arc<LinesFile>,
        /// The open file, at line `line`.
        reader: BufReader<File>,
        /// Index of the next line.
        line: u64,
        /// One past the last line to read.
        end: u64,
    },
}

impl ItemIter {
    /// Puts the next value in `value` (replacing what it held); false at the end.
    pub fn next_value(&mut self, value: &mut Vec<u8>) -> Result<bool, ItemsError> {
        value.clear();
        match self {
            ItemIter::Range { next, left } => {
                if *left == 0 {
                    return Ok(false);
                }
                *left -= 1;
                *next += 1;
                use std::io::Write;
                let _ = write!(value, "{}", *next - 1);
                Ok(true)
            }
            ItemIter::List { values, next, end } => {
                if *next >= *end {
                    return Ok(false);
                }
                value.extend_from_slice(values[*next].as_bytes());
                *next += 1;
                Ok(true)
            }
            ItemIter::Values { values, next, end } => {
                if *next >= *end {
                    return Ok(false);
                }
                value.extend_from_slice(&values[*next]);
                *next += 1;
                Ok(true)
            }
            ItemIter::Lines {
                file,
                reader,
                line,
                end,
            } => {
                if *line >= *end {
                    return Ok(false);
                }
                let n = reader
                    .read_until(b'\n', value)
                    .map_err(|source| ItemsError::Io {
                        path: file.path.clone(),
                        source,
                    })?;
                let complete = value.last() == Some(&b'\n');
                if n == 0 || (!complete && *line + 1 < file.count) {
                    return Err(ItemsError::Changed {
                        path: file.path.clone(),
                        what: format!("it ends at line {}, submitted with {}", *line, file.count),
                    });
                }
                if complete {
                    value.pop();
                    if value.last() == Some(&b'\r') {
                        value.pop();
                    }
                }
                *line += 1;
                Ok(true)
            }
        }
    }
}

impl Iterator for ItemIter {
    type Item = Result<Vec<u8>, ItemsError>;

    fn next(&mut self) -> Option<Self::Item> {
        let mut value = Vec::new();
        match self.next_value(&mut value) {
            Ok(true) => Some(Ok(value)),
            Ok(false) => None,
            Err(e) => Some(Err(e)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    fn lines_spec(path: &Path) -> ItemsSpec {
        let scan = granule_spec::scan_lines(path).unwrap();
        ItemsSpec::Lines {
            path: path.to_path_buf(),
            count: scan.count,
            bytes: scan.bytes,
            hash: Some(scan.hash),
        }
    }

    fn values(source: &ItemSource, span: Span) -> Vec<Vec<u8>> {
        source.iter(span).unwrap().map(|v| v.unwrap()).collect()
    }

    #[test]
    fn lines_iterate_from_any_start() {
        let mut file = tempfile::NamedTempFile::new().unwrap();
        for i in 0..10_000 {
            writeln!(file, "line {i}").unwrap();
        }
        let source = ItemSource::open(&lines_spec(file.path())).unwrap();
        let got = values(&source, Span::new(4095, 4099));
        assert_eq!(
            got,
            [&b"line 4095"[..], b"line 4096", b"line 4097", b"line 4098"]
        );
        assert_eq!(source.iter(Span::new(9_998, 20_000)).unwrap().count(), 2);
    }

    #[test]
    fn lines_are_bytes_whatever_they_hold() {
        let mut file = tempfile::NamedTempFile::new().unwrap();
        file.write_all(b"a\n\n\xff\xfe bad\n  spaced  \r\nlast")
            .unwrap();
        let source = ItemSource::open(&lines_spec(file.path())).unwrap();
        assert_eq!(source.count(), 5);
        let got = values(&source, Span::new(0, 5));
        assert_eq!(
            got,
            [&b"a"[..], b"", b"\xff\xfe bad", b"  spaced  ", b"last"]
        );
    }

    #[test]
    fn a_changed_or_truncated_file_is_refused_not_read_as_empty_lines() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("items.txt");
        std::fs::write(&path, "a\nb\nc\nd\n").unwrap();
        let spec = lines_spec(&path);
        let source = ItemSource::open(&spec).unwrap();
        // Prepended lines: same kind of file, other items.
        std::fs::write(&path, "x\ny\na\nb\nc\nd\n").unwrap();
        assert!(matches!(
            ItemSource::open(&spec),
            Err(ItemsError::Changed { .. })
        ));
        // Same length, other bytes.
        std::fs::write(&path, "a\nb\nc\ne\n").unwrap();
        assert!(matches!(
            ItemSource::open(&spec),
            Err(ItemsError::Changed { .. })
        ));
        // Truncated under an open source: reading past the end is an error.
        std::fs::write(&path, "a\nb\n").unwrap();
        assert!(!source.unchanged());
        let mut iter = source.iter(Span::new(0, 4)).unwrap();
        let mut v = Vec::new();
        assert!(iter.next_value(&mut v).unwrap());
        assert!(iter.next_value(&mut v).unwrap());
        assert!(matches!(
            iter.next_value(&mut v),
            Err(ItemsError::Changed { .. })
        ));
    }

    #[test]
    fn the_bytes_of_a_span_come_from_the_sparse_index() {
        // 8192 short lines, then 8192 lines ten times longer.
        let mut file = tempfile::NamedTempFile::new().unwrap();
        for i in 0..16_384 {
            let width = if i < 8192 { 9 } else { 99 };
            writeln!(file, "{:0width$}", i % 10, width = width).unwrap();
        }
        let source = ItemSource::open(&lines_spec(file.path())).unwrap();
        assert!(source.sized());
        assert_eq!(source.bytes(Span::new(0, 8192)), 8192 * 10);
        assert_eq!(source.bytes(Span::new(8192, 16_384)), 8192 * 100);
        // Inside a stride: interpolated, exact here since lines are even.
        assert_eq!(source.bytes(Span::new(100, 200)), 100 * 10);
        assert_eq!(source.bytes(Span::new(16_000, 16_384)), 384 * 100);
        let list = ItemSource::open(&ItemsSpec::List {
            values: vec!["a".into(), "bbb".into()],
        })
        .unwrap();
        assert_eq!(list.bytes(Span::new(0, 2)), 6);
    }

    #[test]
    fn ranges_compute_values_and_indices() {
        let source = ItemSource::open(&ItemsSpec::Range { start: -5, end: 5 }).unwrap();
        let got = values(&source, Span::new(3, 6));
        assert_eq!(got, [&b"-2"[..], b"-1", b"0"]);
        assert_eq!(source.direct_index(b"0", Span::new(3, 6)), Some(Some(5)));
        assert_eq!(source.direct_index(b"4", Span::new(3, 6)), Some(None));
        assert_eq!(source.direct_index(b"\xff", Span::new(3, 6)), Some(None));
    }
}

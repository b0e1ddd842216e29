//! Item values: what the command sees for each index of a stage.
//!
//! A range computes its values, a list holds them, a lines file is read in
//! sequence from a sparse offset index (one offset per 4096 lines), so a fragment
//! starts near its first line without holding the file in memory.

use granule_core::Span;
use granule_spec::ItemsSpec;
use std::fs::File;
use std::io::{self, BufRead, BufReader, Seek, SeekFrom};
use std::path::PathBuf;
use std::sync::Arc;

/// Lines between two entries of the sparse offset index.
const LINE_STRIDE: u64 = 4096;

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
    Lines {
        /// The file.
        path: PathBuf,
        /// Number of lines.
        count: u64,
        /// Byte offset of line `k * LINE_STRIDE`, and the file's length last.
        offsets: Arc<Vec<u64>>,
    },
}

impl ItemSource {
    /// Prepares a source; for a lines file this reads the file once.
    pub fn open(spec: &ItemsSpec) -> io::Result<ItemSource> {
        Ok(match spec {
            ItemsSpec::Range { start, end } => ItemSource::Range {
                start: *start,
                count: (end - start) as u64,
            },
            ItemsSpec::List { values } => ItemSource::List(Arc::new(values.clone())),
            ItemsSpec::Lines { path, count } => {
                let offsets = index_lines(path)?;
                ItemSource::Lines {
                    path: path.clone(),
                    count: *count,
                    offsets: Arc::new(offsets),
                }
            }
        })
    }

    /// Number of items.
    pub fn count(&self) -> u64 {
        match self {
            ItemSource::Range { count, .. } | ItemSource::Lines { count, .. } => *count,
            ItemSource::List(values) => values.len() as u64,
        }
    }

    /// The index of `value` within `span` when it can be computed without
    /// remembering what was fed (ranges); `None` means "ask the feeder".
    pub fn direct_index(&self, value: &str, span: Span) -> Option<Option<u64>> {
        match self {
            ItemSource::Range { start, .. } => {
                let index = value
                    .trim()
                    .parse::<i64>()
                    .ok()
                    .and_then(|v| u64::try_from(v - start).ok());
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
            ItemSource::Lines { count, offsets, .. } => {
                let at = |line: u64| -> f64 {
                    let line = line.min(*count);
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
    pub fn iter(&self, span: Span) -> io::Result<ItemIter> {
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
            ItemSource::Lines { path, offsets, .. } => {
                let mark = (span.start / LINE_STRIDE) as usize;
                let mut reader = BufReader::new(File::open(path)?);
                reader.seek(SeekFrom::Start(offsets[mark]))?;
                let mut line = String::new();
                for _ in (mark as u64 * LINE_STRIDE)..span.start {
                    line.clear();
                    reader.read_line(&mut line)?;
                }
                ItemIter::Lines {
                    reader,
                    left: span.len(),
                }
            }
        })
    }
}

fn index_lines(path: &PathBuf) -> io::Result<Vec<u64>> {
    let mut reader = BufReader::with_capacity(1 << 16, File::open(path)?);
    let mut offsets = vec![0];
    let (mut offset, mut lines) = (0u64, 0u64);
    let mut buf = Vec::new();
    loop {
        buf.clear();
        let n = reader.read_until(b'\n', &mut buf)?;
        if n == 0 {
            if lines % LINE_STRIDE != 0 {
                offsets.push(offset);
            }
            return Ok(offsets);
        }
        offset += n as u64;
        lines += 1;
        if lines % LINE_STRIDE == 0 {
            offsets.push(offset);
        }
    }
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
    /// Lines read in sequence.
    Lines {
        /// The open file, at the next line.
        reader: BufReader<File>,
        /// Lines left.
        left: u64,
    },
}

impl Iterator for ItemIter {
    type Item = String;

    fn next(&mut self) -> Option<String> {
        match self {
            ItemIter::Range { next, left } => {
                if *left == 0 {
                    return None;
                }
                *left -= 1;
                *next += 1;
                Some((*next - 1).to_string())
            }
            ItemIter::List { values, next, end } => {
                let value = (*next < *end).then(|| values[*next].clone())?;
                *next += 1;
                Some(value)
            }
            ItemIter::Lines { reader, left } => {
                if *left == 0 {
                    return None;
                }
                *left -= 1;
                let mut line = String::new();
                reader.read_line(&mut line).ok()?;
                while line.ends_with('\n') || line.ends_with('\r') {
                    line.pop();
                }
                Some(line)
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    #[test]
    fn lines_iterate_from_any_start() {
        let mut file = tempfile::NamedTempFile::new().unwrap();
        for i in 0..10_000 {
            writeln!(file, "line {i}").unwrap();
        }
        let spec = ItemsSpec::Lines {
            path: file.path().to_path_buf(),
            count: 10_000,
        };
        let source = ItemSource::open(&spec).unwrap();
        let got: Vec<String> = source.iter(Span::new(4095, 4099)).unwrap().collect();
        assert_eq!(got, ["line 4095", "line 4096", "line 4097", "line 4098"]);
        assert_eq!(source.iter(Span::new(9_998, 20_000)).unwrap().count(), 2);
    }

    #[test]
    fn the_bytes_of_a_span_come_from_the_sparse_index() {
        // 8192 short lines, then 8192 lines ten times longer.
        let mut file = tempfile::NamedTempFile::new().unwrap();
        for i in 0..16_384 {
            let width = if i < 8192 { 9 } else { 99 };
            writeln!(file, "{:0width$}", i % 10, width = width).unwrap();
        }
        let spec = ItemsSpec::Lines {
            path: file.path().to_path_buf(),
            count: 16_384,
        };
        let source = ItemSource::open(&spec).unwrap();
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
        let got: Vec<String> = source.iter(Span::new(3, 6)).unwrap().collect();
        assert_eq!(got, ["-2", "-1", "0"]);
        assert_eq!(source.direct_index("0", Span::new(3, 6)), Some(Some(5)));
        assert_eq!(source.direct_index("4", Span::new(3, 6)), Some(None));
    }
}

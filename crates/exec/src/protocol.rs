//! The fd-3 protocol, version 2: what a task writes back to granule.
//!
//! Every line (bytes up to `\n`; a `\r` before it is dropped) is one of:
//!
//! - an **ack**: the value of an item exactly as the task read it from stdin, so the
//!   shell case stays `echo "$x" >&3`;
//! - a **command**: `$GRANULE_CMD VERB ARGS`, where `GRANULE_CMD` is a random tag
//!   granule makes for each fragment (`granule2:` and 16 hex digits). Items were
//!   fixed before the tag existed, so no item value, whatever its bytes, can be
//!   read as a command, and no command as an ack. Verbs: `checkpoint PATH`,
//!   `emit VALUE` (an output record: the rest of the line, bytes as they are) and
//!   `output PATH` (an output file). Outputs belong to the item whose ack comes
//!   next on fd 3, and are published only when that ack commits.
//!
//! Version 1 had no tag (`checkpoint PATH`), which let an item whose value was
//! `checkpoint /etc/passwd` make granule read that file. Lines are bounded: one
//! longer than the parser's limit without a newline is an error, and the buffer is
//! scanned once, however the bytes arrive.

/// The version of the fd-3 protocol granule speaks (`GRANULE_PROTOCOL`).
pub const PROTOCOL_VERSION: u32 = 2;

/// A fresh command tag for one fragment (the value of `GRANULE_CMD`).
pub fn new_tag() -> String {
    format!("granule{PROTOCOL_VERSION}:{}", crate::sys::random_hex())
}

/// One line the task wrote on fd 3.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Line<'a> {
    /// The value of an item it finished.
    Ack(&'a [u8]),
    /// `checkpoint PATH`: a state file to take over.
    Checkpoint(&'a [u8]),
    /// `emit VALUE`: an output record of the item acked next.
    Emit(&'a [u8]),
    /// `output PATH`: an output file of the item acked next.
    Output(&'a [u8]),
}

/// A line that breaks the protocol.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum ProtocolError {
    /// A line grew past the limit without a newline.
    #[error("fd 3: a line longer than {limit} bytes (acks are item values; a runaway write?)")]
    LineTooLong {
        /// The limit, bytes.
        limit: usize,
    },
    /// A tagged line with a verb granule does not know.
    #[error("fd 3: unknown command {verb:?} (protocol {PROTOCOL_VERSION} knows: checkpoint PATH, emit VALUE, output PATH)")]
    UnknownCommand {
        /// The verb, lossily decoded.
        verb: String,
    },
    /// `checkpoint` or `output` without a path.
    #[error("fd 3: `{0}` needs a path")]
    MissingPath(&'static str),
}

/// Splits the fd-3 byte stream into lines and classifies them.
#[derive(Debug)]
pub struct Parser {
    tag: Vec<u8>,
    max_line: usize,
    buf: Vec<u8>,
    /// Bytes of `buf` already searched for a newline.
    scanned: usize,
}

impl Parser {
    /// A parser for a fragment whose command tag is `tag`; lines may be at most
    /// `max_line` bytes.
    pub fn new(tag: &str, max_line: usize) -> Parser {
        Parser {
            tag: tag.as_bytes().to_vec(),
            max_line: max_line.max(tag.len() + 64),
            buf: Vec::new(),
            scanned: 0,
        }
    }

    /// Raises the line limit (items longer than it were fed).
    pub fn allow_lines_of(&mut self, bytes: usize) {
        self.max_line = self.max_line.max(bytes);
    }

    /// Feeds bytes read from fd 3; calls `each` for every complete line, in order.
    /// Stops at the first line that breaks the protocol.
    pub fn feed(
        &mut self,
        bytes: &[u8],
        mut each: impl FnMut(Line<'_>),
    ) -> Result<(), ProtocolError> {
        self.buf.extend_from_slice(bytes);
        let mut start = 0;
        while let Some(nl) = self.buf[self.scanned..].iter().position(|&b| b == b'\n') {
            let end = self.scanned + nl;
            if end - start > self.max_line {
                return Err(ProtocolError::LineTooLong {
                    limit: self.max_line,
                });
            }
            each(classify(&self.tag, &self.buf[start..end])?);
            self.scanned = end + 1;
            start = end + 1;
        }
        self.buf.drain(..start);
        self.scanned = self.buf.len();
        if self.buf.len() > self.max_line {
            return Err(ProtocolError::LineTooLong {
                limit: self.max_line,
            });
        }
        Ok(())
    }

    /// The stream ended: a last line without a newline counts too.
    pub fn finish(&mut self, mut each: impl FnMut(Line<'_>)) -> Result<(), ProtocolError> {
        if self.buf.is_empty() {
            return Ok(());
        }
        let rest = std::mem::take(&mut self.buf);
        self.scanned = 0;
        each(classify(&self.tag, &rest)?);
        Ok(())
    }
}

/// One line without its newline.
fn classify<'a>(tag: &[u8], line: &'a [u8]) -> Result<Line<'a>, ProtocolError> {
    let line = line.strip_suffix(b"\r").unwrap_or(line);
    let Some(command) = line
        .strip_prefix(tag)
        .and_then(|rest| rest.strip_prefix(b" "))
    else {
        return Ok(Line::Ack(line));
    };
    let (verb, args) = match command.iter().position(|&b| b == b' ') {
        Some(at) => (&command[..at], &command[at + 1..]),
        None => (command, &b""[..]),
    };
    match verb {
        b"checkpoint" if args.is_empty() => Err(ProtocolError::MissingPath("checkpoint")),
        b"checkpoint" => Ok(Line::Checkpoint(args)),
        b"output" if args.is_empty() => Err(ProtocolError::MissingPath("output")),
        b"output" => Ok(Line::Output(args)),
        b"emit" => Ok(Line::Emit(args)),
        _ => Err(ProtocolError::UnknownCommand {
            verb: String::from_utf8_lossy(verb).into_owned(),
        }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    const TAG: &str = "granule2:00112233aabbccdd";

    #[derive(Debug, PartialEq, Eq)]
    enum Owned {
        Ack(Vec<u8>),
        Checkpoint(Vec<u8>),
        Emit(Vec<u8>),
        Output(Vec<u8>),
    }

    fn parse_in_chunks(
        bytes: &[u8],
        cuts: &[usize],
        max_line: usize,
    ) -> (Vec<Owned>, Result<(), ProtocolError>) {
        let mut parser = Parser::new(TAG, max_line);
        let mut out = Vec::new();
        let mut push = |l: Line<'_>| {
            out.push(match l {
                Line::Ack(v) => Owned::Ack(v.to_vec()),
                Line::Checkpoint(p) => Owned::Checkpoint(p.to_vec()),
                Line::Emit(v) => Owned::Emit(v.to_vec()),
                Line::Output(p) => Owned::Output(p.to_vec()),
            })
        };
        let mut at = 0;
        for &cut in cuts.iter().chain([&bytes.len()]) {
            let cut = cut.clamp(at, bytes.len());
            if let Err(e) = parser.feed(&bytes[at..cut], &mut push) {
                return (out, Err(e));
            }
            at = cut;
        }
        let end = parser.finish(&mut push);
        (out, end)
    }

    #[test]
    fn values_are_acks_and_only_tagged_lines_are_commands() {
        let stream = format!(
            "a\n\ncheckpoint /etc/passwd\n{TAG} checkpoint /tmp/state 1\n{TAG} emit x y\n{TAG} emit\n{TAG} output /tmp/o\nemit z\nlast\r\nno newline"
        );
        let (lines, end) = parse_in_chunks(stream.as_bytes(), &[], 1 << 20);
        end.unwrap();
        assert_eq!(
            lines,
            [
                Owned::Ack(b"a".to_vec()),
                Owned::Ack(b"".to_vec()),
                Owned::Ack(b"checkpoint /etc/passwd".to_vec()),
                Owned::Checkpoint(b"/tmp/state 1".to_vec()),
                Owned::Emit(b"x y".to_vec()),
                Owned::Emit(b"".to_vec()),
                Owned::Output(b"/tmp/o".to_vec()),
                Owned::Ack(b"emit z".to_vec()),
                Owned::Ack(b"last".to_vec()),
                Owned::Ack(b"no newline".to_vec()),
            ]
        );
    }

    #[test]
    fn bad_commands_and_runaway_lines_are_errors() {
        let (_, end) = parse_in_chunks(format!("{TAG} frobnicate x\n").as_bytes(), &[], 1 << 20);
        assert!(matches!(end, Err(ProtocolError::UnknownCommand { .. })));
        let (_, end) = parse_in_chunks(format!("{TAG} checkpoint\n").as_bytes(), &[], 1 << 20);
        assert_eq!(end, Err(ProtocolError::MissingPath("checkpoint")));
        // A 4 MB line without a newline stops at the limit, whatever the chunking.
        let big = vec![b'x'; 4 << 20];
        let cuts: Vec<usize> = (1..64).map(|i| i * 65_536).collect();
        let (_, end) = parse_in_chunks(&big, &cuts, 1 << 20);
        assert_eq!(end, Err(ProtocolError::LineTooLong { limit: 1 << 20 }));
    }

    #[test]
    fn a_long_stream_in_small_pieces_is_read_in_linear_time() {
        // 20 MB of acks fed 4 KiB at a time: each byte is scanned once.
        let line = b"123456789\n";
        let stream: Vec<u8> = line.iter().copied().cycle().take(20 << 20).collect();
        let mut parser = Parser::new(TAG, 1 << 20);
        let mut n = 0u64;
        for chunk in stream.chunks(4096) {
            parser.feed(chunk, |_| n += 1).unwrap();
        }
        assert_eq!(n, (20 << 20) / 10);
    }

    fn stream() -> impl Strategy<Value = Vec<u8>> {
        let piece = prop_oneof![
            prop::collection::vec(any::<u8>(), 0..40),
            Just(b"\n".to_vec()),
            Just(format!("{TAG} checkpoint ").into_bytes()),
            Just(format!("{TAG} emit ").into_bytes()),
            Just(format!("{TAG} output ").into_bytes()),
            Just(format!("{TAG} ").into_bytes()),
            Just(b"granule2:".to_vec()),
            Just(b"\r\n".to_vec()),
        ];
        prop::collection::vec(piece, 0..60).prop_map(|p| p.concat())
    }

    proptest! {
        #![proptest_config(ProptestConfig {
            cases: std::env::var("GRANULE_FUZZ_CASES").ok().and_then(|n| n.parse().ok()).unwrap_or(2000),
            ..ProptestConfig::default()
        })]
        /// Any bytes, cut anywhere: no panic, the same lines as in one piece, and
        /// every ack is a line of the input.
        #[test]
        fn any_stream_parses_the_same_in_any_chunks(bytes in stream(), cuts in prop::collection::vec(0usize..2500, 0..20), max_line in 64usize..300) {
            let mut cuts = cuts;
            cuts.sort_unstable();
            let whole = parse_in_chunks(&bytes, &[], max_line);
            let chunked = parse_in_chunks(&bytes, &cuts, max_line);
            prop_assert_eq!(&whole.1, &chunked.1);
            if whole.1.is_ok() {
                prop_assert_eq!(&whole.0, &chunked.0);
            }
            for line in &whole.0 {
                if let Owned::Ack(v) = line {
                    prop_assert!(v.len() <= max_line.max(TAG.len() + 64));
                    prop_assert!(!v.contains(&b'\n'));
                }
            }
        }
    }
}

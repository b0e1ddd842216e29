//! Checkpoint and output blobs: zstd-compressed, blake3-checksummed, verified on read.

/// A sealed blob as stored.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Blob {
    /// Compressed bytes.
    pub data: Vec<u8>,
    /// Length before compression.
    pub raw_len: u64,
    /// blake3 of the uncompressed bytes, hex.
    pub hash: String,
}

/// Why a blob could not be opened.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum BlobError {
    /// The data does not decompress.
    #[error("blob does not decompress: {0}")]
    Corrupt(std::io::Error),
    /// The data decompresses to other bytes than were sealed.
    #[error("blob checksum mismatch: expected {expected}, found {found}")]
    Checksum {
        /// The recorded hash.
        expected: String,
        /// The hash of what was read.
        found: String,
    },
    /// Its recorded length is more than the reader takes.
    #[error("blob claims {len} bytes, more than the {limit} allowed")]
    TooLarge {
        /// The recorded length.
        len: u64,
        /// The most taken.
        limit: u64,
    },
}

impl Blob {
    /// Compresses `raw` at zstd `level` and records its checksum.
    pub fn seal(raw: &[u8], level: i32) -> Blob {
        let data =
            zstd::bulk::compress(raw, level).expect("zstd compression of an in-memory buffer");
        Blob {
            data,
            raw_len: raw.len() as u64,
            hash: blake3::hash(raw).to_hex().to_string(),
        }
    }

    /// Decompresses and verifies the checksum; a blob that claims (or turns out)
    /// to be longer than `limit` bytes is refused without allocating for it.
    pub fn open(&self, limit: u64) -> Result<Vec<u8>, BlobError> {
        use std::io::Read;
        if self.raw_len > limit {
            return Err(BlobError::TooLarge {
                len: self.raw_len,
                limit,
            });
        }
        // Streamed, so memory follows what the data really holds, not what its
        // record claims.
        let mut raw = Vec::new();
        zstd::stream::read::Decoder::new(&self.data[..])
            .and_then(|d| d.take(self.raw_len + 1).read_to_end(&mut raw))
            .map_err(BlobError::Corrupt)?;
        let found = blake3::hash(&raw).to_hex().to_string();
        if found != self.hash || raw.len() as u64 != self.raw_len {
            return Err(BlobError::Checksum {
                expected: self.hash.clone(),
                found,
            });
        }
        Ok(raw)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trips_and_detects_corruption() {
        let raw = b"running sum 12345\n".repeat(100);
        let blob = Blob::seal(&raw, 3);
        assert!(blob.data.len() < raw.len());
        assert_eq!(blob.open(1 << 20).unwrap(), raw);
        assert!(matches!(blob.open(10), Err(BlobError::TooLarge { .. })));
        let mut bad = blob.clone();
        let last = bad.data.len() - 1;
        bad.data[last] ^= 0xff;
        assert!(bad.open(1 << 20).is_err());
        let mut forged = blob;
        forged.hash = blake3::hash(b"other").to_hex().to_string();
        assert!(matches!(
            forged.open(1 << 20),
            Err(BlobError::Checksum { .. })
        ));
    }

    proptest::proptest! {
        #![proptest_config(proptest::prelude::ProptestConfig {
            cases: std::env::var("GRANULE_FUZZ_CASES").ok().and_then(|n| n.parse().ok()).unwrap_or(2000),
            ..proptest::prelude::ProptestConfig::default()
        })]
        /// Whatever a store hands back (bit flips, cut data, lies about the length,
        /// other hashes): no panic, no allocation beyond the limit, never the wrong
        /// bytes accepted.
        #[test]
        fn any_stored_blob_opens_or_is_refused(
            raw in proptest::collection::vec(proptest::prelude::any::<u8>(), 0..2000),
            flips in proptest::collection::vec((0usize..4000, proptest::prelude::any::<u8>()), 0..4),
            cut in proptest::option::of(0usize..4000),
            len in proptest::option::of(proptest::prelude::any::<u64>()),
        ) {
            let mut blob = Blob::seal(&raw, 3);
            for (at, x) in flips {
                if !blob.data.is_empty() {
                    let at = at % blob.data.len();
                    blob.data[at] ^= x;
                }
            }
            if let Some(cut) = cut {
                blob.data.truncate(cut);
            }
            if let Some(len) = len {
                blob.raw_len = len;
            }
            if let Ok(opened) = blob.open(1 << 20) {
                proptest::prop_assert_eq!(opened, raw);
            }
        }
    }
}

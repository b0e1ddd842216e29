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

    /// Decompresses and verifies the checksum.
    pub fn open(&self) -> Result<Vec<u8>, BlobError> {
        let raw = zstd::bulk::decompress(&self.data, self.raw_len as usize)
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
        assert_eq!(blob.open().unwrap(), raw);
        let mut bad = blob.clone();
        let last = bad.data.len() - 1;
        bad.data[last] ^= 0xff;
        assert!(bad.open().is_err());
        let mut forged = blob;
        forged.hash = blake3::hash(b"other").to_hex().to_string();
        assert!(matches!(forged.open(), Err(BlobError::Checksum { .. })));
    }
}

//! The inputs of a streamed stage's fragment: what the store published for its
//! items, made into values on the fragment's own thread (files fetched into the
//! host cache and pinned there while the fragment runs), so a long fetch never
//! holds the worker's loop (its flushes and heartbeats).

use granule_exec::{Cache, DataError, DataStore, Fetched, Pin};
use std::time::Instant;

/// One item's value as the store has it.
pub(crate) enum Wanted {
    /// A record: the value as it is.
    Value(Vec<u8>),
    /// A file in the blob store.
    File {
        /// Its blake3 key.
        key: String,
        /// The name the upstream task gave it.
        name: String,
        /// Its length.
        bytes: u64,
    },
    /// A fragment's result, read and verified from the store.
    Result {
        /// blake3 of `raw`.
        key: String,
        /// The state.
        raw: Vec<u8>,
    },
}

/// Why the inputs cannot be had.
pub(crate) enum Unusable {
    /// A blob is missing or corrupt: the fragment fails (retried, then its
    /// item quarantined), never runs on wrong data.
    Bad(String),
    /// The blob store cannot be reached now: the fragment goes back uncharged.
    Unavailable(String),
}

impl From<DataError> for Unusable {
    fn from(e: DataError) -> Unusable {
        match e {
            DataError::Remote { .. } | DataError::Io { .. } => Unusable::Unavailable(e.to_string()),
            _ => Unusable::Bad(e.to_string()),
        }
    }
}

/// A fragment's inputs made into values: the values in order (files as absolute
/// paths in the cache), the pins that keep those files while the fragment runs,
/// and a note of what was fetched.
pub(crate) struct Inputs {
    pub(crate) values: Vec<Vec<u8>>,
    pub(crate) pins: Vec<Pin>,
    pub(crate) note: Option<String>,
}

/// The values of `wanted` (see [`Inputs`]).
pub(crate) fn resolve(
    wanted: Vec<Wanted>,
    store: &DataStore,
    cache: &Cache,
) -> Result<Inputs, Unusable> {
    let (started, mut fetched, mut hits, mut bytes) = (Instant::now(), 0u64, 0u64, 0u64);
    let mut values = Vec::with_capacity(wanted.len());
    let mut pins = Vec::new();
    for w in wanted {
        let value = match w {
            Wanted::Value(v) => v,
            Wanted::File {
                key,
                name,
                bytes: n,
            } => {
                let (path, how, pin) = cache.get(store, &key, &name)?;
                match how {
                    Fetched::Hit => hits += 1,
                    Fetched::Miss => (fetched, bytes) = (fetched + 1, bytes + n),
                }
                pins.push(pin);
                path.into_os_string().into_encoded_bytes()
            }
            Wanted::Result { key, raw } => {
                let (path, _, pin) = cache.put(&key, "result", &raw)?;
                pins.push(pin);
                path.into_os_string().into_encoded_bytes()
            }
        };
        values.push(value);
    }
    let note = (fetched + hits > 0).then(|| {
        format!(
            "fetched {fetched} files ({:.1} MiB) in {:.2} s; {hits} from the host cache",
            bytes as f64 / (1 << 20) as f64,
            started.elapsed().as_secs_f64()
        )
    });
    Ok(Inputs { values, pins, note })
}

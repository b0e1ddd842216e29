//! The data plane: files that stages hand to the stages after them.
//!
//! A [`DataStore`] keeps blobs content-addressed (the key is the blake3 of the
//! content), zstd-compressed, in a directory (the default, under the state dir, or a
//! shared filesystem) or an S3-compatible object store. Every read is checked
//! against its key: a corrupt or missing blob is an error of the reader, never
//! wrong data. A [`Cache`] keeps what a host fetched, bounded in size, so a file
//! many downstream fragments use is fetched once per host.

use std::fs::File;
use std::io::{self, BufReader, Read, Write};
use std::path::{Path, PathBuf};
use std::time::SystemTime;

/// Bytes read and compressed at a time.
const CHUNK: usize = 1 << 20;

/// Why a blob could not be stored or read.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum DataError {
    /// No blob has this key.
    #[error("blob {key} is missing from {store}")]
    Missing {
        /// The key.
        key: String,
        /// The store, as the user gave it.
        store: String,
    },
    /// The blob does not decompress, or decompresses to other bytes than its key.
    #[error("blob {key} in {store} is corrupt: {why}")]
    Corrupt {
        /// The key.
        key: String,
        /// The store, as the user gave it.
        store: String,
        /// What was wrong.
        why: String,
    },
    /// A local file could not be read or written.
    #[error("{path}: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// The error.
        source: io::Error,
    },
    /// The object store failed (network, credentials, bucket).
    #[error("object store {store}: {why}")]
    Remote {
        /// The store, as the user gave it.
        store: String,
        /// What failed.
        why: String,
    },
    /// The location given is not one granule can use.
    #[error("blob store {0:?}: not a directory path or an s3:// URL")]
    BadLocation(String),
}

/// A read from a remote store that failed on the way (not a bad blob).
#[derive(Debug)]
pub(crate) struct RemoteRead(pub(crate) String);

impl std::fmt::Display for RemoteRead {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for RemoteRead {}

fn io_at(path: &Path) -> impl FnOnce(io::Error) -> DataError + '_ {
    move |source| DataError::Io {
        path: path.to_path_buf(),
        source,
    }
}

/// A file stored in a [`DataStore`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct StoredFile {
    /// blake3 of the content, hex: the key.
    pub key: String,
    /// Length of the content, bytes.
    pub bytes: u64,
}

/// Where blobs live.
pub struct DataStore {
    location: String,
    level: i32,
    backend: Backend,
    /// Files stored lately, by identity (device, inode, length, modification
    /// time), in a folder store: one handed over again unchanged is not read and
    /// compressed again. Only files unchanged for 2 s before they were read are
    /// remembered (a rewrite within one clock tick keeps the modification time).
    recent: std::sync::Mutex<std::collections::HashMap<FileId, StoredFile>>,
}

type FileId = (u64, u64, u64, i64, i64);

fn file_id(meta: &std::fs::Metadata) -> FileId {
    use std::os::unix::fs::MetadataExt;
    (
        meta.dev(),
        meta.ino(),
        meta.len(),
        meta.mtime(),
        meta.mtime_nsec(),
    )
}

enum Backend {
    Dir(PathBuf),
    #[cfg(feature = "s3")]
    Object(crate::object::Object),
}

impl std::fmt::Debug for DataStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "DataStore({})", self.location)
    }
}

impl DataStore {
    /// Opens the store at `location`: a directory path (made if missing), or
    /// `s3://bucket/prefix` (credentials and endpoint from the `AWS_*`
    /// environment). `level` is the zstd level blobs are written at.
    pub fn open(location: &str, level: i32) -> Result<DataStore, DataError> {
        let backend = if location.starts_with("s3://") {
            #[cfg(feature = "s3")]
            {
                Backend::Object(crate::object::Object::open(location)?)
            }
            #[cfg(not(feature = "s3"))]
            return Err(DataError::BadLocation(format!(
                "{location} (this build has no S3 support)"
            )));
        } else if location.contains("://") {
            return Err(DataError::BadLocation(location.into()));
        } else {
            let root = PathBuf::from(location);
            std::fs::create_dir_all(root.join("tmp")).map_err(io_at(&root))?;
            sweep(&root.join("tmp"), "put-");
            Backend::Dir(root)
        };
        Ok(DataStore {
            location: location.to_string(),
            level,
            backend,
            recent: Default::default(),
        })
    }

    /// The location it was opened at.
    pub fn location(&self) -> &str {
        &self.location
    }

    /// Stores the regular file at `path`; a file already stored (same content) is
    /// not written again. `scratch` is a local directory for temporary files.
    pub fn put_file(&self, path: &Path, scratch: &Path) -> Result<StoredFile, DataError> {
        let meta = std::fs::metadata(path).map_err(io_at(path))?;
        if !meta.is_file() {
            return Err(DataError::Io {
                path: path.into(),
                source: io::Error::new(io::ErrorKind::InvalidInput, "not a regular file"),
            });
        }
        let started = SystemTime::now();
        let id = file_id(&meta);
        let known = self.recent.lock().ok().and_then(|r| r.get(&id).cloned());
        if let (Some(stored), Backend::Dir(root)) = (known, &self.backend) {
            // Touched: `gc` judges a blob's age by when it was last handed over.
            let blob = dir_path(root, &stored.key);
            if File::options()
                .append(true)
                .open(&blob)
                .and_then(|f| f.set_modified(started))
                .is_ok()
            {
                return Ok(stored);
            }
        }
        let temp_dir = match &self.backend {
            Backend::Dir(root) => root.join("tmp"),
            #[cfg(feature = "s3")]
            Backend::Object(_) => scratch.to_path_buf(),
        };
        let _ = scratch;
        std::fs::create_dir_all(&temp_dir).map_err(io_at(&temp_dir))?;
        let temp = temp_dir.join(format!("put-{}", crate::sys::random_hex()));
        let sealed = compress(path, &temp, self.level);
        let (key, bytes) = match sealed {
            Ok(k) => k,
            Err(e) => {
                let _ = std::fs::remove_file(&temp);
                return Err(e);
            }
        };
        let placed = match &self.backend {
            Backend::Dir(root) => {
                let target = dir_path(root, &key);
                let parent = target.parent().expect("a blob path has a folder");
                std::fs::create_dir_all(parent)
                    .and_then(|()| std::fs::rename(&temp, &target))
                    .map_err(io_at(&target))
            }
            #[cfg(feature = "s3")]
            Backend::Object(o) => o.put(&key, &temp),
        };
        let _ = std::fs::remove_file(&temp);
        placed?;
        let stored = StoredFile { key, bytes };
        // Remembered only if it had not changed for a while when it was read: a
        // file rewritten within one tick of the clock keeps its modification time.
        let settled = meta
            .modified()
            .is_ok_and(|m| m + std::time::Duration::from_secs(2) < started);
        if let (true, Ok(mut recent)) = (settled, self.recent.lock()) {
            if recent.len() >= 4096 {
                recent.clear();
            }
            recent.insert(id, stored.clone());
        }
        Ok(stored)
    }

    /// Writes the content of blob `key` to `dest` (a new file), checking it against
    /// the key as it goes; on any error `dest` is removed.
    pub fn fetch(&self, key: &str, dest: &Path) -> Result<(), DataError> {
        let result = self.fetch_inner(key, dest);
        if result.is_err() {
            let _ = std::fs::remove_file(dest);
        }
        result
    }

    fn fetch_inner(&self, key: &str, dest: &Path) -> Result<(), DataError> {
        check_key(key).map_err(|why| self.corrupt(key, why))?;
        let reader: Box<dyn Read> = match &self.backend {
            Backend::Dir(root) => {
                let path = dir_path(root, key);
                match File::open(&path) {
                    Ok(f) => Box::new(f),
                    Err(e) if e.kind() == io::ErrorKind::NotFound => {
                        return Err(DataError::Missing {
                            key: key.into(),
                            store: self.location.clone(),
                        })
                    }
                    Err(e) => return Err(io_at(&path)(e)),
                }
            }
            #[cfg(feature = "s3")]
            Backend::Object(o) => o.get(key, &self.location)?,
        };
        let mut decoder = zstd::stream::read::Decoder::new(BufReader::with_capacity(CHUNK, reader))
            .map_err(|e| self.corrupt(key, e.to_string()))?;
        let mut out = File::create_new(dest).map_err(io_at(dest))?;
        let (tx, hasher) = hash_thread();
        let written = (|| loop {
            let mut buf = vec![0u8; CHUNK];
            let n = match read_full(&mut decoder, &mut buf) {
                Ok(0) => return Ok(()),
                Ok(n) => n,
                // The connection failed mid-way: the store is out of reach, the
                // blob is not known to be bad.
                Err(e) if e.get_ref().is_some_and(|i| i.is::<RemoteRead>()) => {
                    return Err(DataError::Remote {
                        store: self.location.clone(),
                        why: e.to_string(),
                    })
                }
                Err(e) => return Err(self.corrupt(key, e.to_string())),
            };
            buf.truncate(n);
            let chunk = std::sync::Arc::new(buf);
            let _ = tx.send(chunk.clone());
            out.write_all(&chunk).map_err(io_at(dest))?;
        })();
        drop(tx);
        let found = hasher.join().expect("the hashing thread does not panic");
        written?;
        if found != key {
            return Err(self.corrupt(key, format!("content hashes to {found}")));
        }
        Ok(())
    }

    /// Removes blob `key` (gone already is not an error).
    pub fn delete(&self, key: &str) -> Result<(), DataError> {
        check_key(key).map_err(|why| self.corrupt(key, why))?;
        match &self.backend {
            Backend::Dir(root) => {
                let path = dir_path(root, key);
                match std::fs::remove_file(&path) {
                    Err(e) if e.kind() != io::ErrorKind::NotFound => Err(io_at(&path)(e)),
                    _ => Ok(()),
                }
            }
            #[cfg(feature = "s3")]
            Backend::Object(o) => o.delete(key),
        }
    }

    /// Every key stored.
    pub fn keys(&self) -> Result<Vec<String>, DataError> {
        Ok(self
            .aged(std::time::Duration::ZERO)?
            .into_iter()
            .map(|(k, _)| k)
            .collect())
    }

    /// The keys stored at least `min_age` ago, with their stored (compressed) size.
    pub fn aged(&self, min_age: std::time::Duration) -> Result<Vec<(String, u64)>, DataError> {
        let cutoff = SystemTime::now()
            .checked_sub(min_age)
            .unwrap_or(SystemTime::UNIX_EPOCH);
        match &self.backend {
            Backend::Dir(root) => {
                let mut keys = Vec::new();
                let dirs = std::fs::read_dir(root).map_err(io_at(root))?;
                for dir in dirs.flatten() {
                    let name = dir.file_name();
                    if name.len() != 2 || !dir.path().is_dir() {
                        continue;
                    }
                    for f in std::fs::read_dir(dir.path()).map_err(io_at(&dir.path()))? {
                        let f = f.map_err(io_at(&dir.path()))?;
                        let Some(key) = f
                            .file_name()
                            .to_str()
                            .and_then(|n| n.strip_suffix(".zst").map(str::to_string))
                        else {
                            continue;
                        };
                        if check_key(&key).is_err() {
                            continue;
                        }
                        let Ok(meta) = f.metadata() else { continue };
                        if meta.modified().is_ok_and(|m| m <= cutoff) {
                            keys.push((key, meta.len()));
                        }
                    }
                }
                Ok(keys)
            }
            #[cfg(feature = "s3")]
            Backend::Object(o) => o.aged(cutoff),
        }
    }

    fn corrupt(&self, key: &str, why: String) -> DataError {
        DataError::Corrupt {
            key: key.into(),
            store: self.location.clone(),
            why,
        }
    }
}

/// A key is 64 lowercase hex digits (it becomes a path: nothing else may pass).
pub(crate) fn check_key(key: &str) -> Result<(), String> {
    if key.len() == 64 && key.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f')) {
        Ok(())
    } else {
        Err(format!("{key:?} is not a blake3 key"))
    }
}

/// Where blob `key` lives in a directory store.
fn dir_path(root: &Path, key: &str) -> PathBuf {
    root.join(&key[..2]).join(format!("{key}.zst"))
}

/// Compresses `path` into `temp` at `level` and hashes it on the way, the hash on
/// a second thread; returns the key and the length.
pub(crate) fn compress(path: &Path, temp: &Path, level: i32) -> Result<(String, u64), DataError> {
    let mut input = File::open(path).map_err(io_at(path))?;
    let out = File::create_new(temp).map_err(io_at(temp))?;
    let mut encoder =
        zstd::stream::write::Encoder::new(io::BufWriter::with_capacity(CHUNK, out), level)
            .map_err(io_at(temp))?;
    let (tx, hasher) = hash_thread();
    let mut bytes = 0u64;
    let result = (|| {
        loop {
            let mut buf = vec![0u8; CHUNK];
            let n = read_full(&mut input, &mut buf).map_err(io_at(path))?;
            if n == 0 {
                break;
            }
            buf.truncate(n);
            let chunk = std::sync::Arc::new(buf);
            let _ = tx.send(chunk.clone());
            encoder.write_all(&chunk).map_err(io_at(temp))?;
            bytes += n as u64;
        }
        encoder
            .finish()
            .and_then(|w| w.into_inner().map_err(|e| e.into_error()))
            .and_then(|f| f.sync_all())
            .map_err(io_at(temp))
    })();
    drop(tx);
    let key = hasher.join().expect("the hashing thread does not panic");
    result?;
    Ok((key, bytes))
}

/// A thread that hashes the chunks sent to it (blake3, hex) while the sender
/// compresses or writes them: on two cores, hashing costs no wall time.
type Chunks = std::sync::mpsc::SyncSender<std::sync::Arc<Vec<u8>>>;

fn hash_thread() -> (Chunks, std::thread::JoinHandle<String>) {
    let (tx, rx) = std::sync::mpsc::sync_channel::<std::sync::Arc<Vec<u8>>>(4);
    let hasher = std::thread::spawn(move || {
        let mut h = blake3::Hasher::new();
        for chunk in rx {
            h.update(&chunk);
        }
        h.finalize().to_hex().to_string()
    });
    (tx, hasher)
}

/// Reads until `buf` is full or the end.
fn read_full(r: &mut impl Read, buf: &mut [u8]) -> io::Result<usize> {
    let mut n = 0;
    while n < buf.len() {
        match r.read(&mut buf[n..]) {
            Ok(0) => break,
            Ok(k) => n += k,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(n)
}

/// A host's cache of fetched blobs: `DIR/KEY/NAME`, the least recently used
/// removed once the whole passes `max_bytes`.
#[derive(Debug)]
pub struct Cache {
    dir: PathBuf,
    max_bytes: u64,
}

/// What a cache lookup did.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Fetched {
    /// Served from the cache.
    Hit,
    /// Fetched from the store.
    Miss,
}

impl Cache {
    /// A cache in `dir` (made if missing; kept as an absolute path) of at most
    /// `max_bytes`.
    pub fn new(dir: &Path, max_bytes: u64) -> Result<Cache, DataError> {
        std::fs::create_dir_all(dir).map_err(io_at(dir))?;
        // Absolute: its paths are handed to tasks, which may run elsewhere.
        let dir = dir.canonicalize().map_err(io_at(dir))?;
        sweep(&dir, "tmp-");
        Ok(Cache { dir, max_bytes })
    }

    /// The cache's folder.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// A local path holding blob `key` under the file name `name`, fetched from
    /// `store` unless the cache has it, pinned (not evicted, by this process or any
    /// other of the host) while the [`Pin`] lives.
    pub fn get(
        &self,
        store: &DataStore,
        key: &str,
        name: &str,
    ) -> Result<(PathBuf, Fetched, Pin), DataError> {
        check_key(key).map_err(|why| store.corrupt(key, why))?;
        self.entry(key, name, |dest| store.fetch(key, dest))
    }

    /// As [`Cache::get`], for content the caller has in memory (a fragment's
    /// result from the store), kept under its blake3 `key`.
    pub fn put(
        &self,
        key: &str,
        name: &str,
        bytes: &[u8],
    ) -> Result<(PathBuf, Fetched, Pin), DataError> {
        if check_key(key).is_err() || blake3::hash(bytes).to_hex().as_str() != key {
            return Err(DataError::Corrupt {
                key: key.into(),
                store: "the store's checkpoints".into(),
                why: "its content does not hash to its key".into(),
            });
        }
        self.entry(key, name, |dest| {
            std::fs::write(dest, bytes).map_err(io_at(dest))
        })
    }

    /// The entry `key/name`, made by `make` (into a new file) unless it is there.
    fn entry(
        &self,
        key: &str,
        name: &str,
        make: impl Fn(&Path) -> Result<(), DataError>,
    ) -> Result<(PathBuf, Fetched, Pin), DataError> {
        let name = safe_name(name);
        let folder = self.dir.join(key);
        let path = folder.join(&name);
        let mut how = Fetched::Hit;
        // An entry evicted between its making and its pin is made again.
        for _ in 0..3 {
            if let Some(pin) = Pin::shared(&folder) {
                if path.is_file() {
                    // Touched: the least recently used go first.
                    let _ = pin.0.set_modified(SystemTime::now());
                    if how == Fetched::Miss {
                        self.evict(&folder);
                    }
                    return Ok((path, how, pin));
                }
            }
            how = Fetched::Miss;
            let temp = self.dir.join(format!("tmp-{}", crate::sys::random_hex()));
            std::fs::create_dir_all(&temp).map_err(io_at(&temp))?;
            let made = make(&temp.join(&name));
            let placed = made.and_then(|()| match std::fs::rename(&temp, &folder) {
                Ok(()) => Ok(()),
                // Another process of this host made it first, or the same content
                // under another name: keep both names.
                Err(_) if folder.is_dir() => std::fs::rename(temp.join(&name), &path)
                    .or_else(|e| if path.is_file() { Ok(()) } else { Err(e) })
                    .map_err(io_at(&path)),
                Err(e) => Err(io_at(&folder)(e)),
            });
            let _ = std::fs::remove_dir_all(&temp);
            placed?;
        }
        Err(io_at(&path)(io::Error::other(
            "evicted as soon as it was fetched, three times: is the cache bound (--cache-mb) too small?",
        )))
    }

    /// Removes the least recently used entries nobody has pinned (never `keep`)
    /// while the cache is over its bound.
    fn evict(&self, keep: &Path) {
        let Ok(dirs) = std::fs::read_dir(&self.dir) else {
            return;
        };
        let mut entries: Vec<(SystemTime, u64, PathBuf)> = dirs
            .flatten()
            .filter(|d| d.file_name().len() == 64)
            .map(|d| {
                let path = d.path();
                let size = du(&path);
                let used = d
                    .metadata()
                    .and_then(|m| m.modified())
                    .unwrap_or(SystemTime::UNIX_EPOCH);
                (used, size, path)
            })
            .collect();
        let mut total: u64 = entries.iter().map(|e| e.1).sum();
        entries.sort();
        for (_, size, path) in entries {
            if total <= self.max_bytes {
                break;
            }
            if path == keep {
                continue;
            }
            // Only an entry no fragment of this host uses: its lock is free.
            let Ok(folder) = File::open(&path) else {
                continue;
            };
            if flock(&folder, libc::LOCK_EX | libc::LOCK_NB)
                && std::fs::remove_dir_all(&path).is_ok()
            {
                total -= size;
            }
        }
    }
}

/// A cache entry in use: a shared lock on its folder, which eviction (any process
/// of the host) must take exclusively first.
#[derive(Debug)]
pub struct Pin(File);

impl Pin {
    /// A shared lock on the entry `folder`, if it exists.
    fn shared(folder: &Path) -> Option<Pin> {
        let f = File::open(folder).ok()?;
        flock(&f, libc::LOCK_SH).then_some(Pin(f))
    }
}

/// `flock(2)` on `f`; true if taken.
fn flock(f: &File, how: i32) -> bool {
    use std::os::fd::AsRawFd;
    loop {
        // SAFETY: flock on a descriptor this File owns.
        if unsafe { libc::flock(f.as_raw_fd(), how) } == 0 {
            return true;
        }
        if io::Error::last_os_error().kind() != io::ErrorKind::Interrupted {
            return false;
        }
    }
}

/// Removes what killed processes left in `dir`: entries named `prefix...` not
/// touched for an hour (a live put or fetch writes to its file all along).
pub fn sweep(dir: &Path, prefix: &str) {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return;
    };
    let hour_ago = SystemTime::now() - std::time::Duration::from_secs(3600);
    for e in entries.flatten() {
        let old = e
            .metadata()
            .and_then(|m| m.modified())
            .is_ok_and(|m| m < hour_ago);
        if old && e.file_name().to_string_lossy().starts_with(prefix) {
            let path = e.path();
            let _ = std::fs::remove_dir_all(&path).or_else(|_| std::fs::remove_file(&path));
        }
    }
}

/// Bytes of the files directly in `dir`.
fn du(dir: &Path) -> u64 {
    std::fs::read_dir(dir)
        .map(|d| {
            d.flatten()
                .filter_map(|f| f.metadata().ok())
                .map(|m| m.len())
                .sum()
        })
        .unwrap_or(0)
}

/// A file name a task can be handed: the last component, no `/`, not `.`/`..`.
fn safe_name(name: &str) -> String {
    let last = name.rsplit('/').next().unwrap_or("");
    match last {
        "" | "." | ".." => "file".into(),
        n => n.chars().filter(|c| !c.is_control()).collect(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_file_round_trips_through_a_directory_store_and_the_cache() {
        let dir = tempfile::tempdir().unwrap();
        let store = DataStore::open(dir.path().join("blobs").to_str().unwrap(), 3).unwrap();
        let src = dir.path().join("in.txt");
        std::fs::write(&src, b"hello granule\n".repeat(1000)).unwrap();
        let stored = store.put_file(&src, dir.path()).unwrap();
        assert_eq!(stored.bytes, 14_000);
        assert_eq!(
            stored.key,
            blake3::hash(&std::fs::read(&src).unwrap())
                .to_hex()
                .to_string()
        );
        // The same content again: the same key.
        assert_eq!(store.put_file(&src, dir.path()).unwrap(), stored);
        assert_eq!(store.keys().unwrap(), std::slice::from_ref(&stored.key));
        let cache = Cache::new(&dir.path().join("cache"), 1 << 30).unwrap();
        let (path, how, _pin) = cache.get(&store, &stored.key, "in.txt").unwrap();
        assert_eq!(how, Fetched::Miss);
        assert_eq!(std::fs::read(&path).unwrap(), std::fs::read(&src).unwrap());
        assert_eq!(path.file_name().unwrap(), "in.txt");
        let (again, how, _pin) = cache.get(&store, &stored.key, "in.txt").unwrap();
        assert_eq!((again, how), (path, Fetched::Hit));
    }

    #[test]
    fn a_corrupt_or_missing_blob_is_an_error_never_data() {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path().join("blobs");
        let store = DataStore::open(root.to_str().unwrap(), 3).unwrap();
        let src = dir.path().join("in.bin");
        std::fs::write(
            &src,
            (0..200_000u32)
                .flat_map(|i| i.to_le_bytes())
                .collect::<Vec<u8>>(),
        )
        .unwrap();
        let stored = store.put_file(&src, dir.path()).unwrap();
        // Another valid zstd frame under this key: decompresses, but to other bytes.
        let blob = dir_path(&root, &stored.key);
        std::fs::write(&blob, zstd::bulk::compress(b"other bytes", 3).unwrap()).unwrap();
        let out = dir.path().join("out");
        let err = store.fetch(&stored.key, &out).unwrap_err();
        assert!(matches!(err, DataError::Corrupt { .. }), "{err}");
        assert!(!out.exists(), "a corrupt blob leaves no file behind");
        // Garbage that is not zstd at all.
        std::fs::write(&blob, b"garbage").unwrap();
        assert!(matches!(
            store.fetch(&stored.key, &out),
            Err(DataError::Corrupt { .. })
        ));
        std::fs::remove_file(&blob).unwrap();
        assert!(matches!(
            store.fetch(&stored.key, &out),
            Err(DataError::Missing { .. })
        ));
        // A key that is not one never becomes a path.
        assert!(store.fetch("../../etc/passwd", &out).is_err());
    }

    #[test]
    fn the_cache_keeps_to_its_bound_least_recently_used_first() {
        let dir = tempfile::tempdir().unwrap();
        let store = DataStore::open(dir.path().join("blobs").to_str().unwrap(), 1).unwrap();
        let cache = Cache::new(&dir.path().join("cache"), 25_000).unwrap();
        let mut keys = Vec::new();
        for i in 0..3u8 {
            let src = dir.path().join(format!("f{i}"));
            std::fs::write(&src, vec![i; 10_000]).unwrap();
            keys.push(store.put_file(&src, dir.path()).unwrap().key);
        }
        for k in &keys {
            cache.get(&store, k, "f").unwrap();
        }
        let present = |keys: &[String]| -> Vec<bool> {
            keys.iter()
                .map(|k| dir.path().join("cache").join(k).is_dir())
                .collect()
        };
        assert_eq!(present(&keys), [false, true, true]);
        // A pinned entry is never evicted, even past the bound.
        let (_, _, pin) = cache.get(&store, &keys[1], "f").unwrap();
        cache.get(&store, &keys[0], "f").unwrap();
        assert_eq!(present(&keys), [true, true, false]);
        drop(pin);
        cache.get(&store, &keys[2], "f").unwrap();
        assert_eq!(present(&keys), [true, false, true]);
    }
}

//! The S3-compatible backend of the blob store, through the `object_store` crate:
//! `s3://bucket/prefix`, with credentials, region and endpoint from the `AWS_*`
//! environment (`AWS_ENDPOINT` and `AWS_ALLOW_HTTP=true` for a local server).
//! Credentials are never printed: errors name the store by its URL only.

use crate::data::{DataError, RemoteRead};
use futures_util::StreamExt;
use object_store::aws::AmazonS3Builder;
use object_store::path::Path as ObjectPath;
use object_store::{ObjectStore, ObjectStoreExt, WriteMultipart};
use std::io::{self, Read};
use std::path::Path;
use std::sync::Arc;
use std::time::SystemTime;

/// Part size of multipart uploads (S3 wants at least 5 MiB but for the last).
const PART: usize = 8 << 20;

/// An S3 bucket and key prefix, and the runtime its calls run on.
pub(crate) struct Object {
    url: String,
    store: Arc<dyn ObjectStore>,
    prefix: ObjectPath,
    runtime: Arc<tokio::runtime::Runtime>,
}

impl Object {
    /// Opens `s3://bucket/prefix`; nothing is sent until the first call.
    pub(crate) fn open(url: &str) -> Result<Object, DataError> {
        let rest = url.strip_prefix("s3://").unwrap_or(url);
        let (bucket, prefix) = rest.split_once('/').unwrap_or((rest, ""));
        if bucket.is_empty() {
            return Err(DataError::BadLocation(format!("{url} (no bucket)")));
        }
        let remote = |why: String| DataError::Remote {
            store: url.to_string(),
            why,
        };
        let store = AmazonS3Builder::from_env()
            .with_bucket_name(bucket)
            .build()
            .map_err(|e| remote(e.to_string()))?;
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .map_err(|e| remote(e.to_string()))?;
        Ok(Object {
            url: url.to_string(),
            store: Arc::new(store),
            prefix: ObjectPath::from(prefix.trim_matches('/')),
            runtime: Arc::new(runtime),
        })
    }

    fn path(&self, key: &str) -> ObjectPath {
        self.prefix
            .clone()
            .join(&key[..2])
            .join(format!("{key}.zst"))
    }

    fn remote(&self, e: impl std::fmt::Display) -> DataError {
        DataError::Remote {
            store: self.url.clone(),
            why: e.to_string(),
        }
    }

    /// Uploads the compressed file `temp` as blob `key`, even when it is there:
    /// the upload is what tells `gc` the blob is in use again.
    pub(crate) fn put(&self, key: &str, temp: &Path) -> Result<(), DataError> {
        let path = self.path(key);
        self.runtime.block_on(async {
            let mut file = std::fs::File::open(temp).map_err(|e| DataError::Io {
                path: temp.to_path_buf(),
                source: e,
            })?;
            let upload = self
                .store
                .put_multipart(&path)
                .await
                .map_err(|e| self.remote(e))?;
            let mut writer = WriteMultipart::new_with_chunk_size(upload, PART);
            let mut buf = vec![0u8; 1 << 20];
            loop {
                let n = match file.read(&mut buf) {
                    Ok(0) => break,
                    Ok(n) => n,
                    Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                    Err(e) => {
                        let _ = writer.abort().await;
                        return Err(DataError::Io {
                            path: temp.to_path_buf(),
                            source: e,
                        });
                    }
                };
                if let Err(e) = writer.wait_for_capacity(4).await {
                    return Err(self.remote(e));
                }
                writer.write(&buf[..n]);
            }
            writer.finish().await.map_err(|e| self.remote(e))?;
            Ok(())
        })
    }

    /// A reader of blob `key`'s stored (compressed) bytes.
    pub(crate) fn get(&self, key: &str, shown: &str) -> Result<Box<dyn Read>, DataError> {
        let path = self.path(key);
        let got = self.runtime.block_on(self.store.get(&path));
        match got {
            Ok(result) => Ok(Box::new(StreamRead {
                runtime: self.runtime.clone(),
                stream: result.into_stream(),
                chunk: bytes_empty(),
            })),
            Err(object_store::Error::NotFound { .. }) => Err(DataError::Missing {
                key: key.to_string(),
                store: shown.to_string(),
            }),
            Err(e) => Err(self.remote(e)),
        }
    }

    /// Removes blob `key`.
    pub(crate) fn delete(&self, key: &str) -> Result<(), DataError> {
        let path = self.path(key);
        match self.runtime.block_on(self.store.delete(&path)) {
            Ok(()) | Err(object_store::Error::NotFound { .. }) => Ok(()),
            Err(e) => Err(self.remote(e)),
        }
    }

    /// The keys stored at or before `cutoff`, with their stored sizes.
    pub(crate) fn aged(&self, cutoff: SystemTime) -> Result<Vec<(String, u64)>, DataError> {
        let metas: Vec<_> = self.runtime.block_on(async {
            let mut out = Vec::new();
            let mut list = self.store.list(Some(&self.prefix));
            while let Some(meta) = list.next().await {
                out.push(meta.map_err(|e| self.remote(e))?);
            }
            Ok::<_, DataError>(out)
        })?;
        Ok(metas
            .into_iter()
            .filter(|m| SystemTime::from(m.last_modified) <= cutoff)
            .filter_map(|m| {
                let name = m.location.filename()?.strip_suffix(".zst")?.to_string();
                crate::data::check_key(&name)
                    .is_ok()
                    .then_some((name, m.size))
            })
            .collect())
    }
}

fn bytes_empty() -> bytes::Bytes {
    bytes::Bytes::new()
}

/// A blocking reader over an object's byte stream.
struct StreamRead {
    runtime: Arc<tokio::runtime::Runtime>,
    stream: futures_util::stream::BoxStream<'static, object_store::Result<bytes::Bytes>>,
    chunk: bytes::Bytes,
}

impl Read for StreamRead {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        while self.chunk.is_empty() {
            match self.runtime.block_on(self.stream.next()) {
                None => return Ok(0),
                Some(Ok(chunk)) => self.chunk = chunk,
                Some(Err(e)) => return Err(io::Error::other(RemoteRead(e.to_string()))),
            }
        }
        let n = buf.len().min(self.chunk.len());
        buf[..n].copy_from_slice(&self.chunk[..n]);
        let _ = self.chunk.split_to(n);
        Ok(n)
    }
}

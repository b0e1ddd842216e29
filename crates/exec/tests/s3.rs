//! The blob store on an S3-compatible server: moto (`pip install 'moto[server]'`),
//! started here on a free port. Outside CI a machine without it skips, loudly; under
//! `CI=true` that is a failure.

mod moto;

use granule_exec::{Cache, DataError, DataStore, Fetched};
use moto::{http, moto};

#[test]
fn blobs_round_trip_through_an_s3_server_and_a_bad_one_is_an_error() {
    let Some(moto) = moto() else { return };
    // The only test in this binary: nothing else reads the environment meanwhile.
    for (k, v) in moto.env_with_bucket("granule-test") {
        std::env::set_var(k, v);
    }
    let dir = tempfile::tempdir().unwrap();
    let store = DataStore::open("s3://granule-test/some/prefix", 3).unwrap();
    // 12 MiB that do not compress: more than one part of a multipart upload.
    let mut x = 0x9e37_79b9_7f4a_7c15u64;
    let data: Vec<u8> = (0..12 << 20)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect();
    let src = dir.path().join("big.bin");
    std::fs::write(&src, &data).unwrap();
    let stored = store.put_file(&src, dir.path()).unwrap();
    assert_eq!(stored.bytes, data.len() as u64);
    assert_eq!(store.keys().unwrap(), std::slice::from_ref(&stored.key));
    let cache = Cache::new(&dir.path().join("cache"), 1 << 30).unwrap();
    let (path, how, _pin) = cache.get(&store, &stored.key, "big.bin").unwrap();
    assert_eq!(how, Fetched::Miss);
    assert!(
        std::fs::read(&path).unwrap() == data,
        "the fetched file differs"
    );
    assert_eq!(
        cache.get(&store, &stored.key, "big.bin").unwrap().1,
        Fetched::Hit
    );

    // Overwritten with other bytes on the server: an error, never those bytes.
    let object = format!(
        "/granule-test/some/prefix/{}/{}.zst",
        &stored.key[..2],
        stored.key
    );
    let reply = http(
        moto.port,
        "PUT",
        &object,
        &zstd::bulk::compress(b"not it", 3).unwrap(),
    );
    assert!(reply.starts_with("HTTP/1.1 200"), "{reply}");
    let out = dir.path().join("out");
    let err = store.fetch(&stored.key, &out).unwrap_err();
    assert!(matches!(err, DataError::Corrupt { .. }), "{err}");
    assert!(!out.exists());
    store.delete(&stored.key).unwrap();
    let err = store.fetch(&stored.key, &out).unwrap_err();
    assert!(matches!(err, DataError::Missing { .. }), "{err}");
    assert!(store.keys().unwrap().is_empty());
    // Credentials never appear in what an error says.
    assert!(!err.to_string().contains("test:test"));
}

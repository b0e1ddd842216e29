//! Test support: a fresh PostgreSQL database per test, found through
//! `GRANULE_TEST_POSTGRES`. Outside CI a missing server skips with one loud line;
//! under `CI=true` it is a failure, never a skip.

use postgres::{Client, NoTls};
use std::sync::atomic::{AtomicU32, Ordering};

/// A database created for one test and dropped when this value is dropped.
pub struct TestDatabase {
    admin_url: String,
    name: String,
    /// URL of the fresh database.
    pub url: String,
}

static NEXT: AtomicU32 = AtomicU32::new(0);

impl TestDatabase {
    /// Creates a fresh database on the server named by `GRANULE_TEST_POSTGRES`;
    /// `None` (after saying so) when the variable is unset outside CI.
    pub fn create(test: &str) -> Option<TestDatabase> {
        let Ok(admin_url) = std::env::var("GRANULE_TEST_POSTGRES") else {
            if std::env::var("CI").is_ok_and(|v| v == "true") {
                panic!("GRANULE_TEST_POSTGRES is not set: CI must test the PostgreSQL backend");
            }
            eprintln!("!!! SKIPPING the PostgreSQL half of {test}: set GRANULE_TEST_POSTGRES=postgres://... to run it");
            return None;
        };
        let name = format!(
            "granule_t{}_{}",
            std::process::id(),
            NEXT.fetch_add(1, Ordering::SeqCst)
        );
        let mut admin = Client::connect(&admin_url, NoTls)
            .unwrap_or_else(|e| panic!("GRANULE_TEST_POSTGRES={admin_url} is not reachable: {e}"));
        admin
            .batch_execute(&format!("CREATE DATABASE {name}"))
            .expect("creating a test database");
        let url = match admin_url.rfind('/') {
            Some(slash) if slash > "postgres://".len() => format!("{}/{name}", &admin_url[..slash]),
            _ => format!("{admin_url}/{name}"),
        };
        Some(TestDatabase {
            admin_url,
            name,
            url,
        })
    }
}

impl Drop for TestDatabase {
    fn drop(&mut self) {
        if let Ok(mut admin) = Client::connect(&self.admin_url, NoTls) {
            let _ = admin.batch_execute(&format!(
                "DROP DATABASE IF EXISTS {} WITH (FORCE)",
                self.name
            ));
        }
    }
}

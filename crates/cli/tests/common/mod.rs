//! Helpers shared by the integration tests: a job in a temporary folder, the
//! `granule` binary, and waiting on conditions with deadlines.
#![allow(dead_code, unreachable_pub)]

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

pub fn granule() -> Command {
    Command::new(env!("CARGO_BIN_EXE_granule"))
}

pub fn spin() -> PathBuf {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../../shared/bench/spin.py");
    assert!(
        path.exists(),
        "the shared benchmark task is missing: {}",
        path.display()
    );
    path.canonicalize().unwrap()
}

pub struct Job {
    pub dir: tempfile::TempDir,
    store_url: Option<String>,
}

/// A backend a test runs against: the embedded SQLite store, or a fresh
/// PostgreSQL database (when `GRANULE_TEST_POSTGRES` names a server).
pub struct Backend {
    pub name: &'static str,
    pub url: Option<String>,
    _db: Option<granule_store::testing::TestDatabase>,
}

impl Backend {
    /// The embedded store only.
    pub fn sqlite() -> Backend {
        Backend {
            name: "sqlite",
            url: None,
            _db: None,
        }
    }
}

/// Every backend available to `test`.
pub fn backends(test: &str) -> Vec<Backend> {
    let mut all = vec![Backend {
        name: "sqlite",
        url: None,
        _db: None,
    }];
    if let Some(db) = granule_store::testing::TestDatabase::create(test) {
        all.push(Backend {
            name: "postgres",
            url: Some(db.url.clone()),
            _db: Some(db),
        });
    }
    all
}

impl Job {
    pub fn new(spec: &str) -> Job {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("job.toml"), spec).unwrap();
        Job {
            dir,
            store_url: None,
        }
    }

    /// Points the job's commands at the store at `url` (`None`: the embedded one).
    pub fn set_store(&mut self, url: Option<String>) {
        self.store_url = url;
    }

    /// A job whose commands use `backend`'s store.
    pub fn on(spec: &str, backend: &Backend) -> Job {
        Job {
            store_url: backend.url.clone(),
            ..Job::new(spec)
        }
    }

    pub fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    pub fn cmd(&self, args: &[&str]) -> Command {
        let mut cmd = granule();
        cmd.current_dir(self.dir.path())
            .args(args)
            .env_remove("GRANULE_STATE");
        match &self.store_url {
            Some(url) => cmd.env("GRANULE_STORE", url),
            None => cmd.env_remove("GRANULE_STORE"),
        };
        cmd
    }

    pub fn run(&self, extra: &[&str], env: &[(&str, &str)]) -> Output {
        let mut cmd = self.cmd(&["run", "job.toml", "--slots", "2"]);
        cmd.args(extra).envs(env.iter().copied());
        cmd.output().unwrap()
    }

    pub fn status(&self) -> serde_json::Value {
        let out = self.cmd(&["status", "--json"]).output().unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        serde_json::from_slice(&out.stdout).unwrap()
    }

    /// Every item recorded by spin.py under OUT_DIR, with how often it ran.
    pub fn recorded(&self) -> std::collections::BTreeMap<u64, u32> {
        let mut seen = std::collections::BTreeMap::new();
        for entry in std::fs::read_dir(self.path("out")).unwrap() {
            for line in std::fs::read_to_string(entry.unwrap().path())
                .unwrap()
                .lines()
            {
                *seen.entry(line.parse::<u64>().unwrap()).or_insert(0) += 1;
            }
        }
        seen
    }
}

pub fn stderr(out: &Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

pub fn wait_until(what: &str, timeout: Duration, mut cond: impl FnMut() -> bool) {
    let deadline = Instant::now() + timeout;
    while !cond() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

pub fn spin_spec(items: u64) -> String {
    format!(
        "name = \"spin\"\n[[stage]]\nname = \"work\"\ncommand = [\"python3\", \"{}\"]\nitems = {{ range = [0, {items}] }}\n",
        spin().display()
    )
}

pub fn stage(status: &serde_json::Value, i: usize) -> &serde_json::Value {
    &status["jobs"][0]["stages"][i]
}

pub fn start_run(job: &Job, env: &[(&str, &str)]) -> Child {
    job.cmd(&["run", "job.toml", "--slots", "2"])
        .envs(env.iter().copied())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap()
}

pub fn done(job: &Job) -> u64 {
    stage(&job.status(), 0)["done"].as_u64().unwrap_or(0)
}

//! Helpers shared by the integration tests: a job in a temporary folder, the
//! `granule` binary, and waiting on conditions with deadlines.
#![allow(dead_code, unreachable_pub)]

use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

/// How long one `granule` command of a test may take before it is killed and the
/// test fails (generous: tests must pass on a loaded machine).
pub const COMMAND_DEADLINE: Duration = Duration::from_secs(300);

/// How long a test waits for a condition before it fails: generous, because a test
/// must pass on a loaded machine (nothing here assumes a speed).
pub const PATIENCE: Duration = Duration::from_secs(300);

/// A process a test started, in its own process group: killed with everything it
/// started when the test ends, even by a panic, so a failing test leaves nothing
/// running.
pub struct Spawned(pub Child);

impl Spawned {
    /// Starts `cmd` in a process group of its own.
    pub fn start(cmd: &mut Command) -> Spawned {
        Spawned(cmd.process_group(0).spawn().unwrap())
    }
}

impl std::ops::Deref for Spawned {
    type Target = Child;
    fn deref(&self) -> &Child {
        &self.0
    }
}

impl std::ops::DerefMut for Spawned {
    fn deref_mut(&mut self) -> &mut Child {
        &mut self.0
    }
}

impl Drop for Spawned {
    fn drop(&mut self) {
        // SAFETY: signalling the process group our own child leads.
        unsafe { libc::kill(-(self.0.id() as i32), libc::SIGKILL) };
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Runs `cmd` to its end and collects its output, killing it (and what it started)
/// and failing the test if it runs past `COMMAND_DEADLINE`.
pub fn output_of(cmd: &mut Command) -> Output {
    use std::io::Read;
    cmd.stdout(Stdio::piped()).stderr(Stdio::piped());
    let mut child = Spawned::start(cmd);
    let mut pipes = [
        child
            .stdout
            .take()
            .map(|p| Box::new(p) as Box<dyn Read + Send>),
        child
            .stderr
            .take()
            .map(|p| Box::new(p) as Box<dyn Read + Send>),
    ];
    let readers: Vec<_> = pipes
        .iter_mut()
        .map(|p| {
            let mut pipe = p.take().unwrap();
            std::thread::spawn(move || {
                let mut buf = Vec::new();
                let _ = pipe.read_to_end(&mut buf);
                buf
            })
        })
        .collect();
    let deadline = Instant::now() + COMMAND_DEADLINE;
    let status = loop {
        if let Some(status) = child.try_wait().unwrap() {
            break status;
        }
        assert!(
            Instant::now() < deadline,
            "{cmd:?} ran past {COMMAND_DEADLINE:?}: killed"
        );
        std::thread::sleep(Duration::from_millis(20));
    };
    // SAFETY: killing what it left behind in its own process group.
    unsafe { libc::kill(-(child.id() as i32), libc::SIGKILL) };
    let mut outs = readers.into_iter().map(|r| r.join().unwrap());
    Output {
        status,
        stdout: outs.next().unwrap(),
        stderr: outs.next().unwrap(),
    }
}

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
        output_of(&mut cmd)
    }

    /// Runs `granule ARGS` here to its end (see `output_of`).
    pub fn output(&self, args: &[&str]) -> Output {
        output_of(&mut self.cmd(args))
    }

    pub fn status(&self) -> serde_json::Value {
        let out = self.output(&["status", "--json"]);
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

pub fn start_run(job: &Job, env: &[(&str, &str)]) -> Spawned {
    Spawned::start(
        job.cmd(&["run", "job.toml", "--slots", "2"])
            .envs(env.iter().copied())
            .stdout(Stdio::null())
            .stderr(Stdio::null()),
    )
}

pub fn done(job: &Job) -> u64 {
    stage(&job.status(), 0)["done"].as_u64().unwrap_or(0)
}

/// Stage `make` emits two records per item (`X-a`, `X-b`) and acks it, a little
/// slowly; stage `use` streams them and writes each value it is fed to a file
/// under `$OUT_DIR` before acking it.
pub fn two_stage_spec(items: u64) -> String {
    format!(
        r#"name = "pipe"
[[stage]]
name = "make"
command = ["sh", "-c", 'while read -r x; do sleep 0.002; echo "$GRANULE_CMD emit $x-a" >&3; echo "$GRANULE_CMD emit $x-b" >&3; echo "$x" >&3; done']
items = {{ range = [0, {items}] }}

[[stage]]
name = "use"
command = ["sh", "-c", 'f="$OUT_DIR/$$"; while read -r v; do echo "$v" >> "$f"; echo "$v" >&3; done']
items = {{ from = "make" }}
"#
    )
}

/// Every record `make` published, as `granule outputs --json` lists it.
pub fn published(job: &Job, stage: &str) -> Vec<serde_json::Value> {
    let out = job.output(&["outputs", stage, "--json"]);
    assert!(out.status.success(), "{}", stderr(&out));
    String::from_utf8(out.stdout)
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect()
}

/// The job's outputs and its downstream accounting are exact: each expected
/// record published once, tied to its item, and counted done once downstream.
pub fn assert_exactly_once(job: &Job, items: u64) {
    let status = job.status();
    assert_eq!(status["jobs"][0]["state"], "done", "{status}");
    let mut seen: std::collections::BTreeMap<String, u64> = std::collections::BTreeMap::new();
    for row in published(job, "make") {
        let value = row["value"].as_str().unwrap().to_string();
        let item = row["item"].as_u64().unwrap();
        assert!(value.starts_with(&format!("{item}-")), "{row}");
        *seen.entry(value).or_default() += 1;
    }
    let expected: std::collections::BTreeMap<String, u64> = (0..items)
        .flat_map(|x| [format!("{x}-a"), format!("{x}-b")])
        .map(|v| (v, 1))
        .collect();
    let dupes: Vec<_> = seen.iter().filter(|(_, n)| **n > 1).take(5).collect();
    assert!(dupes.is_empty(), "published twice: {dupes:?}");
    assert_eq!(seen, expected, "the published outputs are the expected set");
    let down = stage(&status, 1);
    assert_eq!(down["items"], 2 * items, "{down}");
    assert_eq!(down["done"], 2 * items, "exactly-once downstream: {down}");
    // At least once executed: every record reached the downstream task.
    let mut ran = std::collections::BTreeSet::new();
    for entry in std::fs::read_dir(job.path("out")).unwrap() {
        for line in std::fs::read_to_string(entry.unwrap().path())
            .unwrap()
            .lines()
        {
            ran.insert(line.to_string());
        }
    }
    assert_eq!(ran.len() as u64, 2 * items, "every record ran downstream");
}

/// Workers in a `status --json` that run a fragment now.
pub fn busy_workers(status: &serde_json::Value) -> usize {
    status["workers"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|w| w["busy"].as_u64() > Some(0))
        .count()
}

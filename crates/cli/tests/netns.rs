//! Many hosts on one machine: a worker in its own network namespace (a veth link to
//! a private PostgreSQL) loses its link for longer than its lease mid-job. The job
//! must finish on the other worker, and the cut worker, once reconnected, must count
//! none of its stale acks. Where namespaces cannot be made (not root, no `ip`, no
//! PostgreSQL binaries), the same test cuts a worker off by stopping its process.

mod common;

use common::*;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

fn run(cmd: &mut Command) -> bool {
    cmd.stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}

fn have(tool: &str) -> bool {
    run(Command::new("sh").args(["-c", &format!("command -v {tool}")]))
}

/// A network namespace joined to the host by a veth pair, removed on drop.
struct Namespace {
    name: String,
    host_if: String,
    host_ip: String,
}

impl Namespace {
    fn create(tag: u32) -> Option<Namespace> {
        let ns = Namespace {
            name: format!("gr{tag}"),
            host_if: format!("grh{tag}"),
            host_ip: format!("10.213.{}.1", tag % 250),
        };
        let peer = format!("grn{tag}");
        let inner_ip = format!("10.213.{}.2/24", tag % 250);
        let ok = run(Command::new("ip").args(["netns", "add", &ns.name]))
            && run(Command::new("ip").args([
                "link",
                "add",
                &ns.host_if,
                "type",
                "veth",
                "peer",
                "name",
                &peer,
            ]))
            && run(Command::new("ip").args(["link", "set", &peer, "netns", &ns.name]))
            && run(Command::new("ip").args([
                "addr",
                "add",
                &format!("{}/24", ns.host_ip),
                "dev",
                &ns.host_if,
            ]))
            && run(Command::new("ip").args(["link", "set", &ns.host_if, "up"]))
            && run(Command::new("ip").args([
                "netns", "exec", &ns.name, "ip", "addr", "add", &inner_ip, "dev", &peer,
            ]))
            && run(Command::new("ip")
                .args(["netns", "exec", &ns.name, "ip", "link", "set", &peer, "up"]))
            && run(Command::new("ip")
                .args(["netns", "exec", &ns.name, "ip", "link", "set", "lo", "up"]));
        ok.then_some(ns)
    }

    fn link(&self, up: bool) {
        assert!(run(Command::new("ip").args([
            "link",
            "set",
            &self.host_if,
            if up { "up" } else { "down" }
        ])));
    }
}

impl Drop for Namespace {
    fn drop(&mut self) {
        run(Command::new("ip").args(["link", "del", &self.host_if]));
        run(Command::new("ip").args(["netns", "del", &self.name]));
    }
}

/// A private PostgreSQL cluster listening on loopback and the namespace link.
struct Cluster {
    dir: tempfile::TempDir,
    port: u16,
}

/// A TCP port free on this host now, from the kernel. A port derived from the pid
/// (30,000 + pid % 10,000) fell inside the ephemeral range (32,768 and up), where a
/// client connection of another test already held it: the cluster failed to start.
fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("a free port")
        .port()
}

impl Cluster {
    fn start(listen: &str, port: u16) -> Option<Cluster> {
        let dir = tempfile::tempdir().ok()?;
        let data = dir.path().join("data");
        let as_pg = |args: &[&str]| {
            run(Command::new("runuser")
                .args(["-u", "postgres", "--"])
                .args(args))
        };
        let ok = run(Command::new("chown").args(["-R", "postgres", dir.path().to_str()?]))
            && as_pg(&["initdb", "-A", "trust", "-D", data.to_str()?]);
        if !ok {
            return None;
        }
        let hba = data.join("pg_hba.conf");
        let mut text = std::fs::read_to_string(&hba).ok()?;
        text.push_str("host all all 10.213.0.0/16 trust\n");
        std::fs::write(&hba, text).ok()?;
        let opts = format!(
            "-p {port} -c listen_addresses='127.0.0.1,{listen}' -k {}",
            dir.path().display()
        );
        as_pg(&[
            "pg_ctl",
            "-D",
            data.to_str()?,
            "-o",
            &opts,
            "-w",
            "-l",
            dir.path().join("log").to_str()?,
            "start",
        ])
        .then_some(Cluster { dir, port })
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        let data = self.dir.path().join("data");
        run(Command::new("runuser").args([
            "-u",
            "postgres",
            "--",
            "pg_ctl",
            "-D",
            data.to_str().unwrap(),
            "-m",
            "immediate",
            "stop",
        ]));
    }
}

fn is_root() -> bool {
    // SAFETY: geteuid has no preconditions.
    unsafe { libc::geteuid() == 0 }
}

fn worker_cmd(job: &Job, store: &str, out: &Path) -> Command {
    let mut cmd = job.cmd(&[
        "worker", "-q", "--slots", "1", "--lease", "2s", "--flush", "100ms",
    ]);
    cmd.env("GRANULE_STORE", store)
        .env("MED_US", "1000")
        .env("SIGMA", "0")
        .env("OUT_DIR", out)
        .stdout(Stdio::null())
        .stderr(Stdio::null());
    cmd
}

fn cut_and_check(
    job: &Job,
    items: u64,
    mut victim: Spawned,
    other: Spawned,
    mut cut: impl FnMut(bool),
) {
    wait_until("the victim holds work", PATIENCE, || {
        let s = job.status();
        let busy = busy_workers(&s);
        busy >= 2 && stage(&s, 0)["done"].as_u64() > Some(500)
    });
    cut(false);
    // Longer than the lease: the other worker takes the victim's fragment over.
    let cut_at = Instant::now();
    wait_until("the lost lease to be released", PATIENCE, || {
        stage(&job.status(), 0)["lost"].as_u64() > Some(0)
    });
    while cut_at.elapsed() < Duration::from_secs(5) {
        std::thread::sleep(Duration::from_millis(50));
    }
    cut(true);
    let mut other = other;
    let deadline = Instant::now() + PATIENCE;
    while victim.try_wait().unwrap().is_none() || other.try_wait().unwrap().is_none() {
        assert!(
            Instant::now() < deadline,
            "workers did not finish: {}",
            job.status()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    let status = job.status();
    let s = stage(&status, 0);
    assert_eq!(status["jobs"][0]["state"], "done", "{status}");
    assert_eq!(s["done"], items, "every item counted exactly once: {s}");
    let recorded = job.recorded();
    assert_eq!(recorded.len() as u64, items, "an item was never run");
    let twice: u32 = recorded.values().map(|n| n - 1).sum();
    eprintln!(
        "cut worker: {} lost fragment(s), {twice} items ran twice, all {items} counted once",
        s["lost"]
    );
}

#[test]
fn a_cut_off_worker_loses_its_lease_and_counts_nothing_twice() {
    let items = 8_000u64;
    let tag = std::process::id() % 10_000;
    let mut job = Job::new(&spin_spec(items));
    let out = job.path("out");
    std::fs::create_dir(&out).unwrap();
    let netns = is_root() && have("ip") && have("initdb") && have("pg_ctl") && have("runuser");
    let namespace = if netns { Namespace::create(tag) } else { None };
    let cluster = namespace
        .as_ref()
        .and_then(|ns| Cluster::start(&ns.host_ip, free_port()));
    match (namespace, cluster) {
        (Some(ns), Some(pg)) => {
            let local = format!("postgres://postgres@127.0.0.1:{}/postgres", pg.port);
            let remote = format!("postgres://postgres@{}:{}/postgres", ns.host_ip, pg.port);
            job.set_store(Some(local.clone()));
            let submitted = job.output(&["submit", "job.toml"]);
            assert!(submitted.status.success(), "{}", stderr(&submitted));
            // The victim runs in the namespace; `granule status` below reads through loopback.
            let mut in_ns = Command::new("ip");
            in_ns
                .args(["netns", "exec", &ns.name])
                .arg(worker_cmd(&job, &remote, &out).get_program());
            let victim_cmd = worker_cmd(&job, &remote, &out);
            in_ns
                .args(victim_cmd.get_args())
                .current_dir(job.dir.path());
            for (k, v) in victim_cmd.get_envs() {
                match v {
                    Some(v) => in_ns.env(k, v),
                    None => in_ns.env_remove(k),
                };
            }
            let victim = Spawned::start(in_ns.stdout(Stdio::null()).stderr(Stdio::null()));
            let other = Spawned::start(&mut worker_cmd(&job, &local, &out));
            cut_and_check(&job, items, victim, other, |up| ns.link(up));
            drop(pg);
        }
        _ => {
            eprintln!("!!! network namespaces unavailable: cutting a worker off by stopping its process instead");
            let backend = backends("cut_off_worker").pop().unwrap();
            let job = Job::on(&spin_spec(items), &backend);
            std::fs::create_dir(job.path("out")).unwrap();
            let store = backend.url.clone().unwrap_or_default();
            assert!(job.output(&["submit", "job.toml"]).status.success());
            let mut victim_cmd = worker_cmd(&job, &store, &job.path("out"));
            let mut other_cmd = worker_cmd(&job, &store, &job.path("out"));
            if backend.url.is_none() {
                victim_cmd.env_remove("GRANULE_STORE");
                other_cmd.env_remove("GRANULE_STORE");
            }

            let victim = Spawned::start(&mut victim_cmd);
            let pid = victim.id() as i32;
            let other = Spawned::start(&mut other_cmd);
            // SAFETY: signalling our own child.
            cut_and_check(&job, items, victim, other, |up| unsafe {
                libc::kill(pid, if up { libc::SIGCONT } else { libc::SIGSTOP });
            });
        }
    }
}

/// Whether this machine can run private PostgreSQL clusters (root and the server
/// binaries); a test that needs them skips loudly without, and fails in CI.
fn private_clusters(test: &str) -> bool {
    let can = is_root() && have("initdb") && have("pg_ctl") && have("runuser");
    if !can {
        assert_ne!(
            std::env::var("CI").as_deref(),
            Ok("true"),
            "CI must run this test"
        );
        eprintln!("!!! SKIPPING {test}: needs root and PostgreSQL's initdb");
    }
    can
}

/// Waits (with a deadline) until every worker has exited.
fn wait_for_exit(job: &Job, workers: &mut [Spawned]) {
    let deadline = Instant::now() + PATIENCE;
    while workers.iter_mut().any(|w| w.try_wait().unwrap().is_none()) {
        assert!(
            Instant::now() < deadline,
            "workers did not finish: {}",
            job.status()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

impl Cluster {
    fn restart(&self) {
        let data = self.dir.path().join("data");
        let opts = format!(
            "-p {} -c listen_addresses='127.0.0.1' -k {}",
            self.port,
            self.dir.path().display()
        );
        assert!(run(Command::new("runuser")
            .args([
                "-u",
                "postgres",
                "--",
                "pg_ctl",
                "-D",
                data.to_str().unwrap()
            ])
            .args(["-o", &opts, "-m", "fast", "-w", "restart"])));
    }
}

#[test]
fn postgres_restarted_twice_mid_job_loses_nothing() {
    if !private_clusters("postgres_restarted_twice_mid_job_loses_nothing") {
        return;
    }
    let items = 12_000u64;
    let port = free_port();
    let pg = Cluster::start("127.0.0.1", port).expect("a private PostgreSQL cluster");
    let mut job = Job::new(&spin_spec(items));
    job.set_store(Some(format!(
        "postgres://postgres@127.0.0.1:{port}/postgres"
    )));
    let out = job.path("out");
    std::fs::create_dir(&out).unwrap();
    assert!(job.output(&["submit", "job.toml"]).status.success());
    let url = format!("postgres://postgres@127.0.0.1:{port}/postgres");
    let mut workers: Vec<Spawned> = (0..2)
        .map(|_| Spawned::start(&mut worker_cmd(&job, &url, &out)))
        .collect();
    for threshold in [2_000u64, 6_000] {
        wait_until("progress before a restart", PATIENCE, || {
            stage(&job.status(), 0)["done"].as_u64() > Some(threshold)
        });
        pg.restart();
    }
    wait_for_exit(&job, &mut workers);
    let status = job.status();
    assert_eq!(status["jobs"][0]["state"], "done", "{status}");
    assert_eq!(
        stage(&status, 0)["done"],
        items,
        "every item counted exactly once"
    );
    assert_eq!(job.recorded().len() as u64, items, "an item was never run");
}

#[test]
fn outputs_reach_the_next_stage_once_across_postgres_restarts() {
    if !private_clusters("outputs_reach_the_next_stage_once_across_postgres_restarts") {
        return;
    }
    let items = 3000u64;
    let port = free_port();
    let pg = Cluster::start("127.0.0.1", port).expect("a private PostgreSQL cluster");
    let url = format!("postgres://postgres@127.0.0.1:{port}/postgres");
    let mut job = Job::new(&two_stage_spec(items));
    job.set_store(Some(url.clone()));
    let out = job.path("out");
    std::fs::create_dir(&out).unwrap();
    assert!(job.output(&["submit", "job.toml"]).status.success());
    let mut workers: Vec<Spawned> = (0..2)
        .map(|_| Spawned::start(&mut worker_cmd(&job, &url, &out)))
        .collect();
    // Restarts while both stages hold work: the first once "use" has started, the
    // second later on.
    for threshold in [200u64, 2_000] {
        wait_until("downstream progress before a restart", PATIENCE, || {
            stage(&job.status(), 1)["done"].as_u64() > Some(threshold)
        });
        pg.restart();
    }
    wait_for_exit(&job, &mut workers);
    assert_exactly_once(&job, items);
}

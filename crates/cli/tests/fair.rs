//! Fair share across jobs and owners, with real workers on each backend: a second
//! owner's job is served from its submission on, not after the first owner's whole
//! job; shares and the half-life are set and shown.

mod common;

use common::*;
use std::process::Stdio;
use std::time::Duration;

/// A job of `items` items owned by `owner` (the job-level key), each item a
/// little sleep.
fn owned_spec(name: &str, owner: &str, items: u64) -> String {
    format!(
        "name = \"{name}\"\nowner = \"{owner}\"\n[[stage]]\nname = \"work\"\n\
         command = [\"sh\", \"-c\", \"while read -r x; do sleep 0.01; echo $x >&3; done\"]\n\
         items = {{ range = [0, {items}] }}\n"
    )
}

/// A `granule worker --slots 2` on the job's store (killed when dropped).
fn worker(jobs: &Job) -> Spawned {
    Spawned::start(
        jobs.cmd(&["worker", "--slots", "2"])
            .stdout(Stdio::null())
            .stderr(Stdio::null()),
    )
}

/// The job named in a `status --json`.
fn job<'a>(status: &'a serde_json::Value, name: &str) -> &'a serde_json::Value {
    status["jobs"]
        .as_array()
        .unwrap()
        .iter()
        .find(|j| j["name"] == name)
        .unwrap_or_else(|| panic!("no job {name} in {status}"))
}

#[test]
fn a_second_owner_is_served_while_the_first_owners_job_runs() {
    for backend in backends("fair_second_owner") {
        let jobs = Job::on(&owned_spec("ada-job", "ada", 3000), &backend);
        std::fs::write(jobs.path("bob.toml"), owned_spec("bob-job", "bob", 100)).unwrap();
        for spec in ["job.toml", "bob.toml"] {
            let out = jobs.output(&["submit", spec]);
            assert!(out.status.success(), "{}: {}", backend.name, stderr(&out));
        }
        let _worker = worker(&jobs);
        // Before: bob's job waited for the whole of ada's (oldest first).
        wait_until(
            &format!("{}: bob's job done", backend.name),
            Duration::from_secs(300),
            || job(&jobs.status(), "bob-job")["state"] == "done",
        );
        let status = jobs.status();
        let ada = job(&status, "ada-job");
        assert_eq!(
            ada["state"], "running",
            "{}: bob finished only after ada's whole job: {status}",
            backend.name
        );
        // Not merely its tail: bob ran beside ada from the start.
        assert!(
            ada["stages"][0]["done"].as_u64().unwrap() < 1500,
            "{status}"
        );
        // Both owners are shown with their usage.
        let owners = status["fair_share"]["owners"].as_array().unwrap();
        for name in ["ada", "bob"] {
            let o = owners
                .iter()
                .find(|o| o["owner"] == name)
                .unwrap_or_else(|| panic!("{}: no owner {name}: {status}", backend.name));
            assert!(o["usage_s"].as_f64().unwrap() > 0.0, "{status}");
        }
        let out = jobs.output(&["cancel", "ada-job"]);
        assert!(out.status.success(), "{}", stderr(&out));
    }
}

#[test]
fn shares_and_the_half_life_are_set_checked_and_shown() {
    for backend in backends("fair_shares_set") {
        let job = Job::on(&owned_spec("j", "ada", 10), &backend);
        let out = job.output(&["shares", "ada=3", "bob=1", "--half-life", "5m", "--json"]);
        assert!(out.status.success(), "{}: {}", backend.name, stderr(&out));
        let fair: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
        assert_eq!(fair["half_life_s"], 300.0, "{fair}");
        let shares = |name: &str| {
            fair["owners"]
                .as_array()
                .unwrap()
                .iter()
                .find(|o| o["owner"] == name)
                .map(|o| o["shares"].as_f64().unwrap())
        };
        assert_eq!((shares("ada"), shares("bob")), (Some(3.0), Some(1.0)));
        let out = job.output(&["shares", "--account", "physics=2"]);
        assert!(out.status.success(), "{}", stderr(&out));
        // Bad input names the argument and changes nothing.
        for bad in [
            &["shares", "ada=-1"][..],
            &["shares", "ada"],
            &["shares", "=1"],
        ] {
            let out = job.output(bad);
            assert_eq!(out.status.code(), Some(2), "{bad:?}: {}", stderr(&out));
            assert!(stderr(&out).contains(bad[1]), "{bad:?}: {}", stderr(&out));
        }
        let out = job.output(&["shares"]);
        let text = String::from_utf8_lossy(&out.stdout);
        assert!(
            text.contains("owner ada") && text.contains("3 shares") && text.contains("5m"),
            "{text}"
        );
        // A run's slot time shows as the owner's usage.
        let out = job.run(&[], &[]);
        assert!(out.status.success(), "{}", stderr(&out));
        let status = job.status();
        let ada = status["fair_share"]["owners"]
            .as_array()
            .unwrap()
            .iter()
            .find(|o| o["owner"] == "ada")
            .cloned()
            .unwrap();
        assert!(ada["usage_s"].as_f64().unwrap() > 0.0, "{status}");
        assert_eq!(ada["shares"], 3.0);
    }
}

#[test]
fn a_long_fragment_is_split_for_an_owner_below_its_share_not_waited_for() {
    for backend in backends("fair_split") {
        // ada's two fragments would take ~250 s each: bob cannot wait for them.
        let spec = owned_spec("ada-job", "ada", 50_000).replace(
            "items = { range = [0, 50000] }",
            "items = { range = [0, 50000] }\ninitial = 25000\ntarget = \"10m\"",
        );
        let jobs = Job::on(&spec, &backend);
        std::fs::write(jobs.path("bob.toml"), owned_spec("bob-job", "bob", 50)).unwrap();
        let out = jobs.output(&["submit", "job.toml"]);
        assert!(out.status.success(), "{}: {}", backend.name, stderr(&out));
        let _worker = worker(&jobs);
        wait_until(
            &format!("{}: ada's job in both slots", backend.name),
            Duration::from_secs(120),
            || job(&jobs.status(), "ada-job")["stages"][0]["running_fragments"] == 2,
        );
        let out = jobs.output(&["submit", "bob.toml"]);
        assert!(out.status.success(), "{}", stderr(&out));
        wait_until(
            &format!("{}: bob's job done while ada's fragments run", backend.name),
            Duration::from_secs(120),
            || job(&jobs.status(), "bob-job")["state"] == "done",
        );
        // Nothing of ada's was lost or run twice by the split: every item acked
        // once, the rest pending again.
        let status = jobs.status();
        let ada = &job(&status, "ada-job")["stages"][0];
        assert_eq!(ada["quarantined"], 0, "{status}");
        let out = jobs.output(&["cancel", "ada-job"]);
        assert!(out.status.success(), "{}", stderr(&out));
    }
}

//! `granule serve`'s HTTP side: a JSON API (the fields of `status --json`), live
//! progress as Server-Sent Events, the dashboard, and Prometheus `/metrics`.
//!
//! One thread reads the store every second into a snapshot (status, workers,
//! pools, the deadline plan's verdicts) and updates the metrics from the fragments
//! claimed and ended since its last look; reads of the API and scrapes answer from
//! that snapshot, so their cost does not depend on the store. The snapshot re-reads
//! only jobs that run or changed (a finished job's status is kept), so its own cost
//! grows with the work running, not with history. Writes (submit, cancel, retry)
//! need the token and go to the store at once.

use super::super::{open_store, StateArg};
use crate::host;
use anyhow::{Context, Result};
use axum::extract::{Path, Query, State};
use axum::http::{header, HeaderMap, StatusCode};
use axum::response::sse::{Event, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::Router;
use granule_store::{FragmentRow, JobState, Store};
use metrics_exporter_prometheus::{Matcher, PrometheusBuilder, PrometheusHandle};
use std::net::SocketAddr;
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant};

const INDEX_HTML: &str = include_str!("web/index.html");
const APP_JS: &str = include_str!("web/app.js");
const STYLE_CSS: &str = include_str!("web/style.css");
/// The API's description, checked in and tested against the server.
pub(crate) const OPENAPI: &str = include_str!("openapi.json");

/// How often the snapshot is refreshed (longer when reading it takes longer).
const REFRESH: Duration = Duration::from_secs(1);
/// Fragments counted into the metrics per refresh, at most (a long history is
/// caught up over several).
const EVENTS_PER_REFRESH: u32 = 20_000;

/// What the HTTP side needs.
pub(crate) struct WebConfig {
    /// The store, as the rest of serve opens it.
    pub(crate) state: StateArg,
    /// Where to listen.
    pub(crate) listen: SocketAddr,
    /// The token writes need; without one, the API is read-only.
    pub(crate) token: Option<String>,
}

/// The latest look at the store, shared by the handlers.
struct Shared {
    /// `/api/status` as JSON text, and parsed for the narrower routes.
    status: RwLock<(Arc<String>, serde_json::Value)>,
    /// `/metrics` as last rendered.
    metrics: RwLock<Arc<String>>,
    /// A connection for reads that are not in the snapshot, and for writes.
    store: Mutex<Box<dyn Store + Send>>,
    /// New snapshots, for the event streams.
    events: tokio::sync::watch::Sender<Arc<String>>,
    token: Option<String>,
}

/// Starts the HTTP side on its own threads; returns the address it listens on.
pub(crate) fn start(config: WebConfig) -> Result<SocketAddr> {
    let listener = std::net::TcpListener::bind(config.listen)
        .with_context(|| format!("listening on {}", config.listen))?;
    listener.set_nonblocking(true)?;
    let addr = listener.local_addr()?;
    let handle = recorder()?;
    let (events, _) = tokio::sync::watch::channel(Arc::new(String::from("{}")));
    let shared = Arc::new(Shared {
        status: RwLock::new((Arc::new(String::from("{}")), serde_json::json!({}))),
        metrics: RwLock::new(Arc::new(String::new())),
        store: Mutex::new(open_store(&config.state)?),
        events,
        token: config.token,
    });
    let mut reader = Snapshots {
        store: open_store(&config.state)?,
        shared: shared.clone(),
        handle,
        claimed: (0, 0),
        finished: (0, 0),
        recent: std::collections::VecDeque::new(),
        finished_jobs: std::collections::HashMap::new(),
        counted: std::collections::HashMap::new(),
    };
    // The first snapshot before the first request.
    reader.refresh();
    std::thread::Builder::new()
        .name("serve-snapshots".into())
        .spawn(move || reader.run())?;
    let app = router(shared, addr.ip().is_loopback());
    std::thread::Builder::new()
        .name("serve-http".into())
        .spawn(move || {
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .expect("a tokio runtime");
            runtime.block_on(async move {
                let listener =
                    tokio::net::TcpListener::from_std(listener).expect("a tokio listener");
                if let Err(e) = axum::serve(listener, app).await {
                    eprintln!("granule serve: the HTTP server stopped: {e}");
                }
            });
        })?;
    Ok(addr)
}

/// The Prometheus recorder, installed once for the process, with histogram
/// buckets for durations.
fn recorder() -> Result<PrometheusHandle> {
    let fragment = [
        0.01, 0.1, 0.5, 1.0, 2.0, 5.0, 10.0, 30.0, 60.0, 300.0, 1800.0,
    ];
    let claim = [0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.5, 1.0];
    let error = [0.01, 0.05, 0.1, 0.2, 0.5, 1.0, 2.0];
    let handle = PrometheusBuilder::new()
        .set_buckets_for_metric(
            Matcher::Full("granule_fragment_duration_seconds".into()),
            &fragment,
        )?
        .set_buckets_for_metric(
            Matcher::Full("granule_claim_latency_seconds".into()),
            &claim,
        )?
        .set_buckets_for_metric(
            Matcher::Full("granule_fragment_prediction_error_ratio".into()),
            &error,
        )?
        // Gauges no snapshot sets any more (jobs removed or long finished) go.
        .idle_timeout(
            metrics_util::MetricKindMask::GAUGE,
            Some(Duration::from_secs(120)),
        )
        .install_recorder()
        .context("installing the metrics recorder")?;
    describe();
    Ok(handle)
}

/// Help texts: what each metric counts.
fn describe() {
    use metrics::{describe_counter, describe_gauge, describe_histogram, Unit};
    describe_gauge!(
        "granule_stage_items",
        "Items of a stage by state (done, running, pending, quarantined)."
    );
    describe_gauge!(
        "granule_stage_work_wasted_seconds",
        Unit::Seconds,
        "Work of a stage that must run again (yields, failures, lost workers)."
    );
    describe_gauge!(
        "granule_stage_prediction_error_ratio",
        "Relative error of the predicted fragment durations of a stage, by quantile."
    );
    describe_gauge!("granule_jobs", "Jobs in the store by state.");
    describe_gauge!(
        "granule_workers",
        "Workers seen in the last minute by class and state."
    );
    describe_counter!(
        "granule_fragments_total",
        "Fragments ended, by job, stage, outcome and what capped their size."
    );
    describe_counter!(
        "granule_items_failed_total",
        "Items of failed fragments that were not acked (failed attempts)."
    );
    describe_counter!("granule_claims_total", "Fragments claimed.");
    describe_counter!(
        "granule_store_errors_total",
        "Reads of the store by serve that failed."
    );
    describe_histogram!(
        "granule_fragment_duration_seconds",
        Unit::Seconds,
        "How long fragments ran, by worker class."
    );
    describe_histogram!(
        "granule_fragment_prediction_error_ratio",
        "Relative error |predicted - observed| / observed of each ended fragment's duration."
    );
    describe_histogram!(
        "granule_claim_latency_seconds",
        Unit::Seconds,
        "How long claims took in the store."
    );
}

/// The thread that keeps the snapshot and the metrics current.
struct Snapshots {
    store: Box<dyn Store + Send>,
    shared: Arc<Shared>,
    handle: PrometheusHandle,
    /// How far the metrics have counted claims and ends: (unix ms, fragment id).
    claimed: (i64, i64),
    finished: (i64, i64),
    /// Items done per running stage (`job/stage`) at recent snapshots, for rates.
    recent: std::collections::VecDeque<(i64, std::collections::HashMap<String, u64>)>,
    /// The status of each finished job as last read, by id, with the state and
    /// finish time it was read at (re-read when they change: a retry, a resubmit).
    finished_jobs: std::collections::HashMap<i64, FinishedJob>,
    /// Fragments counted lately, by (ended?, id), with the time they were counted
    /// at: the cursors look a minute back again and skip these.
    counted: std::collections::HashMap<(bool, i64), i64>,
}

/// A finished job's status, and the state and finish time it was read at.
type FinishedJob = (JobState, Option<i64>, granule_store::JobStatus);

/// How far back each refresh looks again for fragments whose rows committed after
/// later-stamped ones (clocks of other hosts, transactions that took long).
const RECOUNT_MS: i64 = 60_000;
/// Finished jobs whose gauges are kept: those finished in the last hour.
const GAUGES_AFTER_MS: i64 = 3_600_000;

/// The span of snapshots a stage's rate is measured over.
const RATE_WINDOW_MS: i64 = 30_000;

impl Snapshots {
    fn run(mut self) {
        loop {
            let started = Instant::now();
            self.refresh();
            std::thread::sleep(REFRESH.max(started.elapsed()));
        }
    }

    /// Reads the store once: a new snapshot, the metrics, rendered.
    fn refresh(&mut self) {
        match self.snapshot() {
            Ok(value) => {
                let text = Arc::new(value.to_string());
                *self.shared.status.write().expect("not poisoned") = (text.clone(), value);
                self.shared.events.send_replace(text);
            }
            Err(e) => {
                metrics::counter!("granule_store_errors_total").increment(1);
                eprintln!("granule serve: reading the store for the dashboard: {e:#}");
            }
        }
        if let Err(e) = self.count_fragments() {
            metrics::counter!("granule_store_errors_total").increment(1);
            eprintln!("granule serve: reading fragments for /metrics: {e:#}");
        }
        *self.shared.metrics.write().expect("not poisoned") = Arc::new(self.handle.render());
    }

    /// What `status --json` shows, with the time and the deadline plan's verdicts;
    /// sets the gauges from it.
    fn snapshot(&mut self) -> Result<serde_json::Value> {
        let jobs = self.jobs()?;
        let store = self.store.as_mut();
        let now = host::now_ms();
        let mut workers = store.workers(now, 60_000)?;
        super::super::status::mark_gone(&mut workers);
        let history = store.worker_history(now, now - granule_core::FORECAST_WINDOW_MS)?;
        let pool = granule_core::forecast_recent(&history, now);
        let pools = store.pools()?;
        let fair = store.fair_share(now)?;
        let mut verdicts = serde_json::Map::new();
        for job in &jobs {
            for stage in &job.stages {
                if let Some(ms) = stage.needs.deadline_ms {
                    let verdict =
                        super::super::status::deadline_verdict(job, stage, &workers, &history, ms);
                    verdicts.insert(format!("{}/{}", job.name, stage.name), verdict.into());
                }
            }
        }
        // Gauges for what runs and what ended in the last hour; older ones go idle
        // and the recorder drops them.
        let fresh: Vec<&granule_store::JobStatus> = jobs
            .iter()
            .filter(|j| {
                j.state == JobState::Running
                    || self.finished_jobs.values().any(|(_, at, f)| {
                        f.name == j.name && at.is_some_and(|t| now - t < GAUGES_AFTER_MS)
                    })
            })
            .collect();
        gauges(&fresh, &jobs, &workers);
        let mut value = serde_json::json!({
            "now_ms": now, "jobs": jobs, "workers": workers, "pool": pool, "pools": pools,
            "verdicts": verdicts, "fair_share": fair,
        });
        self.rates(now, &mut value);
        Ok(value)
    }

    /// Every job's status: running ones read afresh, finished ones from the cache
    /// unless their state or finish time changed; quarantined items named.
    fn jobs(&mut self) -> Result<Vec<granule_store::JobStatus>> {
        let store = self.store.as_mut();
        let list = store.job_list()?;
        let ids: std::collections::HashSet<i64> = list.iter().map(|j| j.id.0).collect();
        self.finished_jobs.retain(|id, _| ids.contains(id));
        let mut jobs = Vec::with_capacity(list.len());
        for summary in list {
            if let Some((state, at, status)) = self.finished_jobs.get(&summary.id.0) {
                if *state == summary.state && *at == summary.finished_ms {
                    jobs.push(status.clone());
                    continue;
                }
            }
            let mut read = match store.status(Some(&summary.name)) {
                Ok(read) => read,
                // Removed since the list was read.
                Err(granule_store::StoreError::NoSuchJob(_)) => continue,
                Err(e) => return Err(e.into()),
            };
            super::super::status::name_quarantined(store, &mut read)?;
            for status in read {
                if summary.state != JobState::Running {
                    let kept = (summary.state, summary.finished_ms, status.clone());
                    self.finished_jobs.insert(summary.id.0, kept);
                }
                jobs.push(status);
            }
        }
        Ok(jobs)
    }

    /// Adds each running stage's `rate_per_s` (items done per second over the
    /// snapshots of the last 30 s) and `eta_s` (the items left at that rate).
    fn rates(&mut self, now: i64, value: &mut serde_json::Value) {
        let mut done = std::collections::HashMap::new();
        let jobs = value["jobs"].as_array_mut().expect("jobs is an array");
        for job in jobs.iter() {
            for s in job["stages"].as_array().into_iter().flatten() {
                if s["state"] != "running" {
                    continue;
                }
                let key = format!(
                    "{}/{}",
                    job["name"].as_str().unwrap_or(""),
                    s["name"].as_str().unwrap_or("")
                );
                done.insert(key, s["done"].as_u64().unwrap_or(0));
            }
        }
        self.recent.push_back((now, done));
        while self.recent.len() > 2 && now - self.recent[1].0 >= RATE_WINDOW_MS {
            self.recent.pop_front();
        }
        let (t0, first) = self.recent.front().expect("just pushed");
        let seconds = (now - t0) as f64 / 1e3;
        if seconds < 1.0 {
            return;
        }
        for job in jobs.iter_mut() {
            let name = job["name"].as_str().unwrap_or("").to_string();
            for s in job["stages"].as_array_mut().into_iter().flatten() {
                if s["state"] != "running" {
                    continue;
                }
                let key = format!("{name}/{}", s["name"].as_str().unwrap_or(""));
                let now_done = s["done"].as_u64().unwrap_or(0);
                let Some(before) = first.get(&key) else {
                    continue;
                };
                let rate = now_done.saturating_sub(*before) as f64 / seconds;
                let left = s["items"]
                    .as_u64()
                    .unwrap_or(0)
                    .saturating_sub(now_done + s["quarantined"].as_u64().unwrap_or(0));
                s["rate_per_s"] = rate.into();
                if rate > 0.0 {
                    s["eta_s"] = (left as f64 / rate).into();
                }
            }
        }
    }

    /// Counts the fragments claimed and ended since the last look. Each look
    /// first reads the minute before its cursor again and counts what it had not
    /// (a row stamped earlier than one counted may commit after it), then what
    /// lies past the cursor, which it moves.
    fn count_fragments(&mut self) -> Result<()> {
        let store = self.store.as_mut();
        for ended_too in [false, true] {
            let cursor = if ended_too {
                self.finished
            } else {
                self.claimed
            };
            let window =
                store.fragments_after(ended_too, (cursor.0 - RECOUNT_MS, 0), EVENTS_PER_REFRESH)?;
            let late = window
                .into_iter()
                .filter(|f| (stamp(f, ended_too), f.id) <= cursor);
            let new = store.fragments_after(ended_too, cursor, EVENTS_PER_REFRESH)?;
            let mut last = cursor;
            for f in late.chain(new) {
                let at = stamp(&f, ended_too);
                last = last.max((at, f.id));
                if self.counted.insert((ended_too, f.id), at).is_some() {
                    continue;
                }
                if ended_too {
                    ended(&f);
                } else {
                    metrics::counter!("granule_claims_total").increment(1);
                    if let Some(us) = f.claim_us {
                        metrics::histogram!("granule_claim_latency_seconds")
                            .record(us as f64 / 1e6);
                    }
                }
            }
            if ended_too {
                self.finished = last;
            } else {
                self.claimed = last;
            }
        }
        let horizon = self.claimed.0.min(self.finished.0) - 2 * RECOUNT_MS;
        self.counted.retain(|_, at| *at >= horizon);
        Ok(())
    }
}

/// When a fragment was claimed, or (`ended`) when it ended.
fn stamp(f: &FragmentRow, ended: bool) -> i64 {
    if ended {
        f.finished_ms.unwrap_or(0)
    } else {
        f.claimed_ms
    }
}

/// The metrics of one ended fragment.
fn ended(f: &FragmentRow) {
    let (job, stage) = (f.job.clone(), f.stage.clone());
    metrics::counter!("granule_fragments_total", "job" => job.clone(), "stage" => stage.clone(),
        "outcome" => f.state.clone(), "cap" => f.size_cap.clone())
    .increment(1);
    if f.state == "failed" {
        // Its span as it ended (a split gave its tail away).
        let span = f.end_idx.saturating_sub(f.start_idx);
        metrics::counter!("granule_items_failed_total", "job" => job, "stage" => stage)
            .increment(span.saturating_sub(f.acked));
    }
    if let Some(ms) = f.observed_ms.filter(|ms| *ms > 0.0) {
        metrics::histogram!("granule_fragment_duration_seconds", "class" => f.class.clone())
            .record(ms / 1e3);
        if f.state == "done" && f.predicted_ms > 0.0 {
            metrics::histogram!("granule_fragment_prediction_error_ratio")
                .record((f.predicted_ms - ms).abs() / ms);
        }
    }
}

/// Gauges of the stages of `fresh` jobs, of every job by state, and of workers.
fn gauges(
    fresh: &[&granule_store::JobStatus],
    jobs: &[granule_store::JobStatus],
    workers: &[granule_store::WorkerStatus],
) {
    let mut by_state: std::collections::BTreeMap<&str, f64> = std::collections::BTreeMap::new();
    for job in jobs {
        *by_state.entry(job.state.as_str()).or_default() += 1.0;
    }
    for job in fresh {
        for s in &job.stages {
            for (state, n) in [
                ("done", s.done),
                ("running", s.running),
                ("pending", s.pending),
                ("quarantined", s.quarantined),
            ] {
                metrics::gauge!("granule_stage_items", "job" => job.name.clone(),
                    "stage" => s.name.clone(), "state" => state)
                .set(n as f64);
            }
            metrics::gauge!("granule_stage_work_wasted_seconds", "job" => job.name.clone(),
                "stage" => s.name.clone())
            .set(s.wasted_s);
            for (q, v) in [
                ("0.5", s.prediction_error_median),
                ("0.9", s.prediction_error_p90),
            ] {
                if let Some(v) = v {
                    metrics::gauge!("granule_stage_prediction_error_ratio",
                        "job" => job.name.clone(), "stage" => s.name.clone(), "quantile" => q)
                    .set(v / 100.0);
                }
            }
        }
    }
    for state in [
        "running",
        "done",
        "failed",
        "cancelled",
        "refused",
        "broken",
        "halted",
    ] {
        metrics::gauge!("granule_jobs", "state" => state)
            .set(by_state.get(state).copied().unwrap_or(0.0));
    }
    let mut counts: std::collections::BTreeMap<(String, &str), f64> =
        std::collections::BTreeMap::new();
    for w in workers {
        *counts
            .entry((w.class.clone(), w.state.as_str()))
            .or_default() += 1.0;
    }
    let classes: std::collections::BTreeSet<String> =
        workers.iter().map(|w| w.class.clone()).collect();
    for class in classes {
        for state in ["running", "draining", "exited"] {
            let n = counts.get(&(class.clone(), state)).copied().unwrap_or(0.0);
            metrics::gauge!("granule_workers", "class" => class.clone(), "state" => state).set(n);
        }
    }
}

fn router(shared: Arc<Shared>, loopback: bool) -> Router {
    let app = Router::new()
        .route("/", get(index))
        .route(
            "/app.js",
            get(|| async { page("text/javascript; charset=utf-8", APP_JS) }),
        )
        .route(
            "/style.css",
            get(|| async { page("text/css; charset=utf-8", STYLE_CSS) }),
        )
        .route(
            "/api/openapi.json",
            get(|| async { page("application/json", OPENAPI) }),
        )
        .route("/api/status", get(status))
        .route("/api/jobs", get(jobs).post(submit))
        .route("/api/jobs/{job}", get(job))
        .route("/api/jobs/{job}/stages", get(stages))
        .route("/api/jobs/{job}/cancel", post(cancel))
        .route("/api/jobs/{job}/retry", post(retry))
        .route("/api/workers", get(workers))
        .route("/api/pools", get(pools))
        .route("/api/fragments", get(fragments))
        .route("/api/events", get(events))
        .route("/metrics", get(scrape))
        .with_state(shared);
    if loopback {
        app.layer(axum::middleware::from_fn(local_hosts_only))
    } else {
        app
    }
}

/// On a loopback address, requests must name a local host: a web page elsewhere
/// cannot read the API through a name it points at 127.0.0.1 (DNS rebinding).
async fn local_hosts_only(
    request: axum::extract::Request,
    next: axum::middleware::Next,
) -> Response {
    let host = request
        .headers()
        .get(header::HOST)
        .and_then(|h| h.to_str().ok())
        .unwrap_or("");
    let name = match host.strip_prefix('[') {
        Some(v6) => v6.split(']').next().unwrap_or(""),
        None => host.split(':').next().unwrap_or(""),
    };
    if matches!(name, "localhost" | "127.0.0.1" | "::1") || name.starts_with("127.") {
        next.run(request).await
    } else {
        error(
            StatusCode::FORBIDDEN,
            format!(
                "Host {host:?} is not this machine: a loopback server answers local names only"
            ),
        )
    }
}

/// Fragments the dashboard's timeline asks for at most (`FRAG_LIMIT` in app.js).
const FRAG_LIMIT: u32 = 5000;
/// The timeline of a running job: the last 5 minutes at most (`WINDOW_MS`).
const WINDOW_MS: i64 = 5 * 60_000;

/// The dashboard with its first data inside: the style, the script, the snapshot
/// and the default job's fragments, so the first render needs one round trip.
async fn index(State(s): State<Arc<Shared>>) -> Response {
    let (status, timeline) = {
        let snapshot = s.status.read().expect("not poisoned");
        (snapshot.0.clone(), default_timeline(&snapshot.1))
    };
    let fragments = match timeline {
        Some((job, since_ms, running)) => {
            let name = job.clone();
            // Without its fragments the page asks for them itself.
            with_store(s, move |store| {
                Ok(store.fragments(&name, since_ms, FRAG_LIMIT)?)
            })
            .await
            .ok()
            .map(|rows| {
                serde_json::json!({
                    "job": job, "since_ms": since_ms, "running": running, "rows": rows,
                })
            })
        }
        None => None,
    };
    let fragments = fragments.map_or_else(|| "null".to_owned(), |f| f.to_string());
    // `<` escaped: nothing in the data can close the script element it sits in.
    let boot = format!("{{\"status\":{status},\"fragments\":{fragments}}}").replace('<', "\\u003c");
    let html = INDEX_HTML
        .replacen(
            r#"<link rel="stylesheet" href="style.css">"#,
            &format!("<style>\n{STYLE_CSS}</style>"),
            1,
        )
        .replacen(
            r#"<script src="app.js"></script>"#,
            &format!(
                "<script type=\"application/json\" id=\"boot\">{boot}</script>\n<script>\n{APP_JS}</script>"
            ),
            1,
        );
    ([(header::CONTENT_TYPE, "text/html; charset=utf-8")], html).into_response()
}

/// The job the dashboard shows first (running ones first, then the newest) and the
/// window of its timeline: (name, since when in unix ms, running?). As app.js picks.
fn default_timeline(snapshot: &serde_json::Value) -> Option<(String, i64, bool)> {
    let now = snapshot["now_ms"].as_i64()?;
    let job = snapshot["jobs"].as_array()?.iter().min_by_key(|j| {
        (
            j["state"] != "running",
            std::cmp::Reverse(j["created_ms"].as_i64().unwrap_or(0)),
        )
    })?;
    let running = job["state"] == "running";
    let created = job["created_ms"].as_i64().unwrap_or(0);
    let since = if running {
        (now - WINDOW_MS).max(created).min(now - 10_000)
    } else {
        created
    };
    Some((job["name"].as_str()?.to_owned(), since, running))
}

fn page(kind: &'static str, body: &'static str) -> Response {
    ([(header::CONTENT_TYPE, kind)], body).into_response()
}

fn json_text(body: String) -> Response {
    ([(header::CONTENT_TYPE, "application/json")], body).into_response()
}

/// An error as JSON: `{"error": "..."}`.
fn error(status: StatusCode, message: impl Into<String>) -> Response {
    let body = serde_json::json!({ "error": message.into() }).to_string();
    (status, [(header::CONTENT_TYPE, "application/json")], body).into_response()
}

async fn status(State(s): State<Arc<Shared>>) -> Response {
    let text = s.status.read().expect("not poisoned").0.clone();
    json_text(text.as_str().to_owned())
}

/// One field of the snapshot, as `{"field": ...}`.
fn part(s: &Shared, field: &str) -> Response {
    let value = &s.status.read().expect("not poisoned").1;
    json_text(serde_json::json!({ field: value[field] }).to_string())
}

async fn jobs(State(s): State<Arc<Shared>>) -> Response {
    part(&s, "jobs")
}

async fn workers(State(s): State<Arc<Shared>>) -> Response {
    part(&s, "workers")
}

async fn pools(State(s): State<Arc<Shared>>) -> Response {
    part(&s, "pools")
}

/// The job named, from the snapshot.
fn find_job(s: &Shared, name: &str) -> Option<serde_json::Value> {
    let snapshot = &s.status.read().expect("not poisoned").1;
    snapshot["jobs"]
        .as_array()?
        .iter()
        .find(|j| j["name"] == name)
        .cloned()
}

async fn job(State(s): State<Arc<Shared>>, Path(name): Path<String>) -> Response {
    match find_job(&s, &name) {
        Some(job) => json_text(job.to_string()),
        None => error(StatusCode::NOT_FOUND, format!("no job named \"{name}\"")),
    }
}

async fn stages(State(s): State<Arc<Shared>>, Path(name): Path<String>) -> Response {
    match find_job(&s, &name) {
        Some(job) => json_text(serde_json::json!({ "stages": job["stages"] }).to_string()),
        None => error(StatusCode::NOT_FOUND, format!("no job named \"{name}\"")),
    }
}

#[derive(serde::Deserialize)]
struct FragmentQuery {
    job: String,
    #[serde(default)]
    since_ms: i64,
    #[serde(default = "default_limit")]
    limit: u32,
}

fn default_limit() -> u32 {
    2000
}

/// Runs `f` on the request store off the async thread.
async fn with_store<T: Send + 'static>(
    s: Arc<Shared>,
    f: impl FnOnce(&mut dyn Store) -> Result<T> + Send + 'static,
) -> Result<T> {
    tokio::task::spawn_blocking(move || {
        let mut store = s.store.lock().expect("not poisoned");
        f(store.as_mut())
    })
    .await
    .context("the store task stopped")?
}

async fn fragments(State(s): State<Arc<Shared>>, Query(q): Query<FragmentQuery>) -> Response {
    let limit = q.limit.clamp(1, 20_000);
    match with_store(s, move |store| {
        Ok(store.fragments(&q.job, q.since_ms, limit)?)
    })
    .await
    {
        Ok(rows) => json_text(serde_json::json!({ "fragments": rows }).to_string()),
        Err(e) => error(StatusCode::SERVICE_UNAVAILABLE, format!("{e:#}")),
    }
}

async fn events(
    State(s): State<Arc<Shared>>,
) -> Sse<impl futures_util::Stream<Item = Result<Event, std::convert::Infallible>>> {
    let mut rx = s.events.subscribe();
    rx.mark_changed();
    let stream = futures_util::stream::unfold(rx, |mut rx| async move {
        rx.changed().await.ok()?;
        let data = rx.borrow_and_update().clone();
        Some((Ok(Event::default().event("status").data(data.as_str())), rx))
    });
    Sse::new(stream).keep_alive(KeepAlive::default())
}

async fn scrape(State(s): State<Arc<Shared>>) -> Response {
    let text = s.metrics.read().expect("not poisoned").clone();
    (
        [(
            header::CONTENT_TYPE,
            "text/plain; version=0.0.4; charset=utf-8",
        )],
        text.as_str().to_owned(),
    )
        .into_response()
}

/// Whether a write may go ahead: the server has a token and the request carries it
/// (`Authorization: Bearer TOKEN`); otherwise the response that refuses it.
fn authorized(s: &Shared, headers: &HeaderMap) -> Option<Response> {
    let Some(token) = &s.token else {
        return Some(error(
            StatusCode::FORBIDDEN,
            "this server is read-only: start granule serve with --token to allow writes",
        ));
    };
    let given = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "));
    // Compared in constant time: the token is a password.
    let same = given.is_some_and(|g| {
        g.len() == token.len()
            && g.bytes()
                .zip(token.bytes())
                .fold(0u8, |acc, (a, b)| acc | (a ^ b))
                == 0
    });
    (!same).then(|| {
        error(
            StatusCode::UNAUTHORIZED,
            "a write needs the header Authorization: Bearer <token>",
        )
    })
}

#[derive(serde::Deserialize)]
struct SubmitQuery {
    /// The folder relative paths of the spec (`lines`, `cwd`) start from.
    dir: Option<std::path::PathBuf>,
    #[serde(default)]
    fresh: bool,
}

/// `POST /api/jobs`: the body is a job spec (TOML), submitted as `granule submit`.
async fn submit(
    State(s): State<Arc<Shared>>,
    headers: HeaderMap,
    Query(q): Query<SubmitQuery>,
    body: String,
) -> Response {
    if let Some(refused) = authorized(&s, &headers) {
        return refused;
    }
    let dir = match q.dir {
        Some(d) => d,
        None => std::env::current_dir().unwrap_or_default(),
    };
    // Parsing reads and hashes `lines` files: off the async thread.
    let parsed = tokio::task::spawn_blocking(move || {
        granule_spec::parse(&body, &dir.join("submitted.toml"))
    })
    .await;
    let spec = match parsed {
        Ok(Ok(spec)) => spec,
        Ok(Err(e)) => return error(StatusCode::BAD_REQUEST, e.to_string()),
        Err(e) => return error(StatusCode::INTERNAL_SERVER_ERROR, e.to_string()),
    };
    let name = spec.name.clone();
    let result = with_store(s, move |store| {
        super::super::submit::submit_job(store, &spec, q.fresh)
    })
    .await;
    match result {
        Ok(submitted) => {
            let how = match submitted {
                granule_store::Submitted::Created(_) => "created",
                granule_store::Submitted::Resumed(_) => "resumed",
                granule_store::Submitted::AlreadyFinished(_) => "finished",
            };
            let body = serde_json::json!({ "name": name, "submitted": how }).to_string();
            (
                StatusCode::CREATED,
                [(header::CONTENT_TYPE, "application/json")],
                body,
            )
                .into_response()
        }
        Err(e) => match e.downcast_ref::<granule_store::StoreError>() {
            Some(granule_store::StoreError::SpecChanged(_)) => {
                error(StatusCode::CONFLICT, format!("{e:#}"))
            }
            Some(err) if err.is_transient() => {
                error(StatusCode::SERVICE_UNAVAILABLE, format!("{e:#}"))
            }
            _ => error(StatusCode::BAD_REQUEST, format!("{e:#}")),
        },
    }
}

/// `POST /api/jobs/{job}/cancel`.
async fn cancel(
    State(s): State<Arc<Shared>>,
    headers: HeaderMap,
    Path(name): Path<String>,
) -> Response {
    if let Some(refused) = authorized(&s, &headers) {
        return refused;
    }
    let job = name.clone();
    let result = with_store(s, move |store| {
        Ok((
            store.cancel(&job, host::now_ms())?,
            store.job(&job)?.map(|j| j.state),
        ))
    })
    .await;
    match result {
        Ok((true, _)) => {
            json_text(serde_json::json!({ "name": name, "state": "cancelled" }).to_string())
        }
        Ok((false, None)) => error(StatusCode::NOT_FOUND, format!("no job named \"{name}\"")),
        Ok((false, Some(state))) => error(
            StatusCode::CONFLICT,
            format!("job \"{name}\" is not running: it is {state}"),
        ),
        Err(e) => error(StatusCode::SERVICE_UNAVAILABLE, format!("{e:#}")),
    }
}

#[derive(serde::Deserialize)]
struct RetryQuery {
    stage: Option<String>,
}

/// `POST /api/jobs/{job}/retry[?stage=S]`.
async fn retry(
    State(s): State<Arc<Shared>>,
    headers: HeaderMap,
    Path(name): Path<String>,
    Query(q): Query<RetryQuery>,
) -> Response {
    if let Some(refused) = authorized(&s, &headers) {
        return refused;
    }
    let job = name.clone();
    let result = with_store(s, move |store| {
        Ok(store.retry(&job, q.stage.as_deref(), host::now_ms())?)
    })
    .await;
    match result {
        Ok(items) => json_text(serde_json::json!({ "name": name, "items": items }).to_string()),
        Err(e) => match e.downcast_ref::<granule_store::StoreError>() {
            Some(granule_store::StoreError::NoSuchJob(_)) => {
                error(StatusCode::NOT_FOUND, format!("{e:#}"))
            }
            Some(
                granule_store::StoreError::NoSuchStage(..)
                | granule_store::StoreError::NotRetryable(..),
            ) => error(StatusCode::CONFLICT, format!("{e:#}")),
            _ => error(StatusCode::SERVICE_UNAVAILABLE, format!("{e:#}")),
        },
    }
}

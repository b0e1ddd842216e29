//! `granule serve`: beside the store, plans every few seconds how many workers of
//! each pool the ready work wants (the core's `scale`, the simulator's policy) and
//! starts or drains them through the pools' providers.

mod pools;
mod provider;
mod web;

use super::{count_signals, open_store, StateArg};
use crate::{host, EXIT_DONE};
use anyhow::{Context, Result};
use granule_core::{fits, scale, spare, to_start, walltime_ms, PoolView, StageDemand};
use granule_store::{
    JobState, JobStatus, PoolStatus, Store, StoreError, WorkerState, WorkerStatus,
};
use provider::{Alloc, Launch, Provider};
use std::collections::{HashMap, HashSet};
use std::path::PathBuf;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

#[derive(clap::Args)]
pub(crate) struct ServeArgs {
    #[command(flatten)]
    state: StateArg,
    /// The pools file (TOML): each `[[pool]]` a class of workers, its price and
    /// limits, and how its provider (`local`, `slurm`, `command`) starts one.
    /// Without it, serve only serves the dashboard, the API and /metrics.
    #[arg(long)]
    pools: Option<PathBuf>,
    /// Where the dashboard, the HTTP API and /metrics listen [default:
    /// 127.0.0.1:8470]. An address other than loopback needs --token.
    #[arg(long)]
    listen: Option<std::net::SocketAddr>,
    /// The token API writes (submit, cancel, retry) need, as `Authorization:
    /// Bearer TOKEN`; without it the API is read-only.
    #[arg(long, env = "GRANULE_TOKEN", hide_env_values = true)]
    token: Option<String>,
    /// Serve no HTTP at all.
    #[arg(long)]
    no_http: bool,
    /// How often the planner runs.
    #[arg(long, default_value = "2s", value_parser = crate::cmd::duration)]
    interval: Duration,
    /// An idle worker the plan does not need is asked to leave after this long.
    #[arg(long, default_value = "3s", value_parser = crate::cmd::duration)]
    retire_after: Duration,
    /// Exit once no unfinished job is left and every allocation is gone.
    #[arg(long)]
    until_done: bool,
}

/// Where the HTTP side listens unless `--listen` says otherwise.
const DEFAULT_LISTEN: std::net::SocketAddr =
    std::net::SocketAddr::new(std::net::IpAddr::V4(std::net::Ipv4Addr::LOCALHOST), 8470);

/// What a worker takes to start (a launch to its first claim), for walltimes.
const START_MS: f64 = 5_000.0;
/// Backoff after a failed launch: doubles from the first to the last.
const BACKOFF: (Duration, Duration) = (Duration::from_secs(2), Duration::from_secs(60));

/// Runs the planner until interrupted (or, with `--until-done`, until the work is done).
pub(crate) fn serve(args: ServeArgs) -> Result<u8> {
    let listen = args.listen.unwrap_or(DEFAULT_LISTEN);
    if !listen.ip().is_loopback() && args.token.is_none() && !args.no_http {
        return Err(crate::BadInput(format!(
            "--listen {listen}: serving beyond this machine needs --token (or GRANULE_TOKEN), so that only its holders can submit, cancel and retry"
        ))
        .into());
    }
    if args.token.as_deref().is_some_and(|t| t.len() < 8) {
        return Err(crate::BadInput("--token must be at least 8 characters".into()).into());
    }
    if args.pools.is_none() && args.no_http {
        return Err(crate::BadInput(
            "nothing to serve: give --pools, or leave out --no-http".into(),
        )
        .into());
    }
    let specs = match &args.pools {
        Some(path) => pools::load(path)?,
        None => Vec::new(),
    };
    let mut store = open_store(&args.state)?;
    let state_dir = std::fs::canonicalize(&args.state.state)
        .with_context(|| format!("{}", args.state.state.display()))?;
    let identity = args
        .state
        .store
        .clone()
        .unwrap_or_else(|| state_dir.display().to_string());
    let tag = &blake3::hash(identity.as_bytes()).to_hex()[..8];
    let exe = std::env::current_exe().context("finding the granule binary")?;
    let mut serve = Serve {
        providers: Vec::new(),
        status: Vec::new(),
        backoff: Vec::new(),
        idle_since: HashMap::new(),
        asked_to_leave: HashSet::new(),
        launches: Vec::new(),
        retire_after_ms: args.retire_after.as_millis() as i64,
    };
    for spec in specs {
        let dir = state_dir.join("serve").join(&spec.name);
        std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
        let mut argv = vec![
            exe.display().to_string(),
            "worker".into(),
            "--state".into(),
            state_dir.display().to_string(),
            "--class".into(),
            spec.class().to_string(),
            "--slots".into(),
            spec.slots.to_string(),
            "--cost".into(),
            spec.cost_per_hour.to_string(),
        ];
        if let Some(idle) = spec.idle_exit {
            argv.extend(["--idle-exit".into(), format!("{}ms", idle.as_millis())]);
        }
        if let Some(url) = &args.state.store {
            argv.extend(["--store".into(), url.clone()]);
        }
        if spec.spot {
            argv.push("--spot".into());
        }
        for (name, amount) in &spec.resources {
            argv.extend(["--resource".into(), format!("{name}={amount}")]);
        }
        argv.extend(spec.worker_args.iter().cloned());
        serve.launches.push(Launch {
            argv,
            dir: dir.clone(),
        });
        serve.status.push(PoolStatus {
            name: spec.name.clone(),
            class: spec.class().to_string(),
            provider: format!("{:?}", spec.provider).to_lowercase(),
            ..PoolStatus::default()
        });
        serve.backoff.push((Instant::now(), Duration::ZERO));
        serve.providers.push(Provider::new(spec, tag, dir));
    }
    let interrupts = count_signals()?;
    let started = (!args.no_http).then(|| {
        web::start(web::WebConfig {
            state: args.state.clone(),
            listen,
            token: args.token.clone(),
        })
    });
    let started = match started {
        // The default port taken (another serve?): a planner goes on without it.
        Some(Err(e)) if args.listen.is_none() && args.pools.is_some() => {
            eprintln!("granule serve: no dashboard: {e:#} (give --listen another address)");
            None
        }
        other => other.transpose()?,
    };
    if let Some(addr) = started {
        let writes = if args.token.is_some() {
            "writes with the token"
        } else {
            "read-only: --token allows writes"
        };
        eprintln!("granule serve: dashboard at http://{addr}/ (API under /api, {writes}; metrics at /metrics)");
    }
    if args.pools.is_some() {
        eprintln!(
            "granule serve: {} pool(s), planning every {}",
            serve.providers.len(),
            humantime::format_duration(args.interval)
        );
    }
    loop {
        let round = if args.pools.is_some() {
            serve.tick(store.as_mut())
        } else {
            // No pools: nothing to plan; `--until-done` still waits for the work.
            store
                .open_jobs()
                .map(|open| open.is_empty())
                .map_err(Into::into)
        };
        match round {
            Ok(true) if args.until_done => return Ok(EXIT_DONE),
            Ok(_) => {}
            // The store out of reach (a restart, a busy file): the workers go on;
            // plan again next round.
            Err(e) => eprintln!("granule serve: this round failed: {e:#}"),
        }
        let until = Instant::now() + args.interval;
        while Instant::now() < until {
            if interrupts.load(Ordering::SeqCst) > 0 {
                // Workers stay: they leave when idle, or a later serve adopts them.
                return Ok(EXIT_DONE);
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

struct Serve {
    providers: Vec<Provider>,
    status: Vec<PoolStatus>,
    /// Per pool: no launch before this, and the backoff that set it.
    backoff: Vec<(Instant, Duration)>,
    /// Workers with nothing running, since when (unix ms).
    idle_since: HashMap<String, i64>,
    /// Allocations asked to leave (not asked twice).
    asked_to_leave: HashSet<String>,
    launches: Vec<Launch>,
    retire_after_ms: i64,
}

/// One allocation and the worker in it, if it registered.
struct Seen<'a> {
    alloc: Alloc,
    worker: Option<&'a WorkerStatus>,
}

impl Serve {
    /// One planning round; `true` when no job is unfinished and no allocation is left.
    fn tick(&mut self, store: &mut dyn Store) -> Result<bool> {
        let now = host::now_ms();
        // Only unfinished jobs: a store keeps every finished job's history, and
        // reading it all every round would grow with the store's age.
        let mut jobs: Vec<JobStatus> = Vec::new();
        for id in store.open_jobs()? {
            let Some(record) = store.job_by_id(id)? else {
                continue;
            };
            let status = match store.status(Some(&record.name)) {
                // Removed since it was listed.
                Err(StoreError::NoSuchJob(_)) => continue,
                status => status?,
            };
            jobs.extend(status.into_iter().filter(|j| j.state == JobState::Running));
        }
        let workers = store.workers(now, 600_000)?;
        for w in &workers {
            if w.state == WorkerState::Running && w.busy == 0 {
                self.idle_since.entry(w.id.clone()).or_insert(now);
            } else {
                self.idle_since.remove(&w.id);
            }
        }
        let mut listed: Vec<Option<Vec<Seen>>> = Vec::new();
        for (i, p) in self.providers.iter_mut().enumerate() {
            match p.list() {
                Ok(allocs) => listed.push(Some(
                    allocs
                        .into_iter()
                        .map(|alloc| {
                            let worker = workers
                                .iter()
                                .find(|w| w.allocation.as_deref() == Some(alloc.id.as_str()));
                            Seen { alloc, worker }
                        })
                        // A worker that said it exited is gone, whatever the
                        // provider still shows (a Slurm job completing).
                        .filter(|s| s.worker.is_none_or(|w| w.state != WorkerState::Exited))
                        .collect(),
                )),
                Err(e) => {
                    self.status[i].last_error = Some((format!("{e:#}"), now));
                    listed.push(None);
                }
            }
        }
        self.release_lost(store, &workers, &listed, now)?;
        // Forget what is gone: allocations no pool lists, workers no longer seen.
        let alive: HashSet<&str> = listed
            .iter()
            .flatten()
            .flatten()
            .map(|s| s.alloc.id.as_str())
            .collect();
        let unlisted = listed.iter().any(Option::is_none);
        self.asked_to_leave
            .retain(|id| unlisted || alive.contains(id.as_str()));
        self.idle_since
            .retain(|id, _| workers.iter().any(|w| w.id == *id));
        let views: Vec<PoolView> = (0..self.providers.len())
            .map(|i| self.view(i, listed[i].as_deref()))
            .collect();
        let demand = demand(&jobs, &self.providers, now);
        let time_left = jobs
            .iter()
            .flat_map(|j| {
                j.stages
                    .iter()
                    .filter(|s| s.ready)
                    .filter_map(move |s| s.needs.deadline_ms.map(|d| j.created_ms as f64 + d))
            })
            .map(|at| at - now as f64)
            .min_by(f64::total_cmp);
        let scaling = scale(&demand, &views, time_left);
        for i in 0..self.providers.len() {
            let Some(seen) = &listed[i] else { continue };
            let wanted = scaling.wanted[i];
            self.status[i].wanted =
                (wanted / f64::from(self.providers[i].pool().slots)).ceil() as u32;
            self.retire(i, seen, wanted, now);
            self.launch(i, seen, wanted, &views[i], &scaling, now);
        }
        for s in &mut self.status {
            s.updated_ms = now;
        }
        store.set_pools(&self.status)?;
        Ok(jobs.is_empty() && listed.iter().all(|l| l.as_ref().is_some_and(Vec::is_empty)))
    }

    /// Pool `i` as the planner sees it: slots here or on their way (not those
    /// leaving), and how many more its limits and budget allow.
    fn view(&self, i: usize, seen: Option<&[Seen]>) -> PoolView {
        let pool = self.providers[i].pool();
        let slots = f64::from(pool.slots);
        let (mut here, mut all) = (0.0, 0.0);
        for s in seen.unwrap_or_default() {
            all += 1.0;
            if !self.leaving(s) {
                here += slots;
            }
        }
        PoolView {
            slots_per_worker: slots,
            cost_per_slot_hour: pool.cost_per_hour / slots,
            spot: pool.spot,
            here,
            // A pool whose provider could not be listed starts nothing.
            startable: match seen {
                Some(_) => (f64::from(pool.limit()) - all).max(0.0) * slots,
                None => 0.0,
            },
        }
    }

    /// Whether an allocation's worker is on its way out.
    fn leaving(&self, s: &Seen) -> bool {
        self.asked_to_leave.contains(&s.alloc.id)
            || s.worker.is_some_and(|w| w.state == WorkerState::Draining)
    }

    /// Asks idle workers the plan does not need to leave, and cancels allocations
    /// still queued beyond what it wants.
    fn retire(&mut self, i: usize, seen: &[Seen], wanted: f64, now: i64) {
        let slots = f64::from(self.providers[i].pool().slots);
        // Workers on their way out do not count: their slots are going.
        let busy: f64 = seen
            .iter()
            .filter(|s| !self.leaving(s))
            .filter_map(|s| s.worker)
            .map(|w| f64::from(w.busy))
            .sum();
        let mut here: f64 = seen.iter().filter(|s| !self.leaving(s)).count() as f64 * slots;
        let mut leave = Vec::new();
        for s in seen.iter().filter(|s| !self.leaving(s)) {
            let idle = s.worker.and_then(|w| self.idle_since.get(&w.id));
            let idle_long = idle.is_some_and(|&since| now - since >= self.retire_after_ms);
            let queued_spare = s.alloc.pending && here - slots >= wanted;
            if (idle_long && spare(wanted, busy)) || queued_spare {
                here -= slots;
                leave.push(s.alloc.clone());
            }
        }
        for alloc in leave {
            match self.providers[i].drain(&alloc) {
                Ok(()) => {
                    self.asked_to_leave.insert(alloc.id);
                }
                Err(e) => self.status[i].last_error = Some((format!("{e:#}"), now)),
            }
        }
        let pending = seen.iter().filter(|s| s.alloc.pending).count() as u32;
        let draining = seen.iter().filter(|s| self.leaving(s)).count() as u32;
        let status = &mut self.status[i];
        status.pending = pending;
        status.draining = draining;
        status.running = (seen.len() as u32).saturating_sub(pending + draining);
    }

    /// Starts the workers pool `i` lacks, within its limits, unless a failed launch
    /// is being backed off.
    fn launch(
        &mut self,
        i: usize,
        seen: &[Seen],
        wanted: f64,
        view: &PoolView,
        scaling: &granule_core::Scaling,
        now: i64,
    ) {
        let pool = self.providers[i].pool();
        let pending = seen.iter().filter(|s| s.alloc.pending).count() as u32;
        let room = pool
            .max_pending
            .unwrap_or(pool.max_workers)
            .saturating_sub(pending);
        let n = to_start(wanted, view).min(room);
        if n == 0 || Instant::now() < self.backoff[i].0 {
            return;
        }
        let wall = walltime_ms(
            scaling,
            START_MS,
            pool.min_walltime.as_millis() as f64,
            pool.walltime.as_millis() as f64,
        );
        let walltime = Duration::from_millis(wall as u64);
        match self.providers[i].start(n, walltime, &self.launches[i]) {
            Ok(()) => {
                self.status[i].launched += u64::from(n);
                self.backoff[i] = (Instant::now(), Duration::ZERO);
            }
            Err(e) => {
                let next = (self.backoff[i].1 * 2).clamp(BACKOFF.0, BACKOFF.1);
                self.backoff[i] = (Instant::now() + next, next);
                let why = format!("{e:#} (next try in {})", humantime::format_duration(next));
                eprintln!("granule serve: pool {}: {why}", self.status[i].name);
                self.status[i].last_error = Some((why, now));
            }
        }
    }

    /// Hands back at once the fragments of workers whose allocation the provider no
    /// longer lists (a lost node, a job killed at its limit), instead of waiting for
    /// their leases.
    fn release_lost(
        &self,
        store: &mut dyn Store,
        workers: &[WorkerStatus],
        listed: &[Option<Vec<Seen>>],
        now: i64,
    ) -> Result<()> {
        let lost: Vec<String> = workers
            .iter()
            .filter(|w| w.state != WorkerState::Exited)
            .filter(|w| {
                let Some(a) = &w.allocation else { return false };
                self.providers.iter().zip(listed).any(|(p, l)| {
                    p.owns(a)
                        && l.as_ref()
                            .is_some_and(|l| !l.iter().any(|s| s.alloc.id == *a))
                })
            })
            .map(|w| w.id.clone())
            .collect();
        if !lost.is_empty() {
            store.release(now, &lost)?;
        }
        Ok(())
    }
}

/// The ready work of every running job, as the planner sees it on each pool: a
/// class's per-item cost is what its model learned, or while none is ready the
/// slot-time per ack of its running fragments (long elastic fragments teach the
/// model only when they end; the simulator reads its running fragments the same way).
fn demand(jobs: &[JobStatus], providers: &[Provider], now: i64) -> Vec<StageDemand> {
    let offers: Vec<_> = providers.iter().map(|p| p.pool().offer()).collect();
    jobs.iter()
        .flat_map(|j| &j.stages)
        .map(|s| StageDemand {
            items: if s.ready {
                (s.pending + s.running) as f64
            } else {
                0.0
            },
            fits: offers.iter().map(|o| fits(&s.needs, o).is_ok()).collect(),
            learned: offers
                .iter()
                .map(|o| {
                    let learned = s.classes.iter().find(|c| c.class == o.class);
                    learned
                        .filter(|c| c.learned)
                        .map(|c| c.item_cost_us / 1e3)
                        .or_else(|| {
                            let running = s.running_by_class.iter().find(|r| r.class == o.class);
                            running.and_then(|r| r.pace_ms(now))
                        })
                })
                .collect(),
            resumable: s.acks == Some(true) || s.checkpoints > 0,
        })
        .collect()
}

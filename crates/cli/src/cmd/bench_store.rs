//! `granule bench-store` (hidden): the store's own claim -> finish path under
//! concurrent clients, for `bench/store.py`.

use super::{open_store, StateArg};
use crate::{host, EXIT_BROKEN, EXIT_DONE};
use anyhow::Result;
use granule_core::JobId;
use granule_store::{NewJob, NewStage};
use std::time::{Duration, Instant};

#[derive(clap::Args)]
pub(crate) struct BenchStoreArgs {
    #[command(flatten)]
    state: StateArg,
    /// Concurrent clients (each with its own connection).
    #[arg(long, default_value_t = 32)]
    clients: u32,
    /// How long to run.
    #[arg(long, default_value = "10s", value_parser = crate::cmd::duration)]
    duration: Duration,
}

/// Clients loop claim (one item) -> finish on a fresh job for `duration`; prints
/// cycles per second as JSON and fails if any item was claimed twice.
pub(crate) fn bench_store(args: BenchStoreArgs) -> Result<u8> {
    use granule_core::SizerConfig;
    let name = format!("bench-store-{}", host::now_ms());
    let job = NewJob {
        name: name.clone(),
        spec_hash: String::new(),
        spec_json: "{}".into(),
        stages: vec![NewStage {
            name: "s".into(),
            items: 1 << 40,
            after: vec![],
            retries: 0,
            sizer: SizerConfig::default(),
            needs: Default::default(),
            cost_key: String::new(),
            ..Default::default()
        }],
    };
    let id = open_store(&args.state)?
        .submit(&job, host::now_ms(), true)?
        .id();
    let deadline = Instant::now() + args.duration;
    let started = Instant::now();
    let claimed: Vec<Vec<(u64, u64)>> = std::thread::scope(|scope| {
        let handles: Vec<_> = (0..args.clients)
            .map(|c| {
                let state = &args.state;
                scope.spawn(move || client(state, c, id, deadline))
            })
            .collect();
        handles
            .into_iter()
            .map(|h| h.join().expect("client thread"))
            .collect::<Result<Vec<_>>>()
    })?;
    let seconds = started.elapsed().as_secs_f64();
    let mut all: Vec<(u64, u64)> = claimed.into_iter().flatten().collect();
    all.sort_unstable();
    let twice = all.windows(2).filter(|w| w[1].0 < w[0].1).count();
    let cycles = all.len() as f64 / seconds;
    println!(
        "{}",
        serde_json::json!({ "clients": args.clients, "cycles": all.len(), "seconds": seconds, "cycles_per_s": cycles, "claimed_twice": twice })
    );
    open_store(&args.state)?.cancel(&name, host::now_ms())?;
    Ok(if twice == 0 { EXIT_DONE } else { EXIT_BROKEN })
}

/// One client: its own connection and worker, looping claim -> finish until
/// `deadline`; returns the spans it claimed.
fn client(state: &StateArg, c: u32, id: JobId, deadline: Instant) -> Result<Vec<(u64, u64)>> {
    use granule_core::ClaimContext;
    use granule_store::{ClaimRequest, FragmentEnd, WorkerInfo};
    let mut store = open_store(state)?;
    let worker = format!("bench-{c}");
    let info = WorkerInfo {
        id: worker.clone(),
        host: "bench".into(),
        pid: 0,
        proc_start: 0,
        slots: 1,
        class: "default".into(),
        lifespan_end_ms: None,
        cost_per_hour: 0.0,
        spot: false,
        resources: "{}".into(),
        locality: String::new(),
        allocation: None,
    };
    store.register_worker(&info, host::now_ms())?;
    let request = || ClaimRequest {
        expected_life_ms: None,
        job: Some(id),
        worker: worker.clone(),
        class: "default".into(),
        now_ms: host::now_ms(),
        lease_ms: 60_000,
        slots: 1,
        max_items: Some(1),
        offer: Default::default(),
        context: ClaimContext {
            remaining: 0,
            slots: 1,
            free_memory: 1.0,
            load_per_cpu: 0.0,
            splits: false,
            all_or_nothing_margin_ms: 0.0,
            acking: false,
            lifespan_ms: None,
        },
    };
    // As a worker does: the finish that frees the slot claims its next fragment.
    let mut mine = Vec::new();
    let mut next = None;
    while Instant::now() < deadline {
        let a = match next.take() {
            Some(a) => a,
            None => match store.claim(&request())? {
                Some(a) => a,
                None => continue,
            },
        };
        mine.push((a.span.start, a.span.end));
        let end = FragmentEnd::success(a.fragment, a.span.end);
        let req = request();
        let (_, claimed) =
            store.finish_and_claim(&worker, host::now_ms(), &end, Some((&req, 1)))?;
        next = claimed.into_iter().next();
    }
    if let Some(a) = next {
        // Claimed past the deadline: not a cycle; end it so the job can be cancelled clean.
        store.finish(
            &worker,
            host::now_ms(),
            &FragmentEnd::success(a.fragment, a.span.end),
        )?;
    }
    Ok(mine)
}

//! The worker loop: claim fragments for free slots, run them on threads, flush
//! acks and checkpoints in batches, finish each fragment in one transaction.
//!
//! One loop serves `granule run`; it owns the store connection, so every store
//! write happens here and the runner threads only touch their [`Control`].

use crate::host;
use crate::progress::Progress;
use anyhow::{Context, Result};
use granule_core::{ClaimContext, FinishOutcome, FragmentId, JobId};
use granule_exec::{run_fragment, Blob, Control, FragmentJob, ItemSource, RunReport, Sampler};
use granule_spec::JobSpec;
use granule_store::{
    Assignment, BlobRow, ClaimRequest, FragmentEnd, FragmentFlush, Store, WorkerInfo,
};
use std::collections::hash_map::Entry;
use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{mpsc, Arc};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

/// How a worker runs.
#[derive(Clone, Debug)]
pub(crate) struct EngineConfig {
    /// Concurrent fragments.
    pub(crate) slots: u32,
    /// Ack flush (and lease renewal) period.
    pub(crate) flush: Duration,
    /// Lease length.
    pub(crate) lease: Duration,
    /// Yield grace before SIGTERM, and before SIGKILL.
    pub(crate) grace: Duration,
    /// Items in flight beyond the last ack.
    pub(crate) window: u64,
    /// Bytes of stdout/stderr kept per fragment.
    pub(crate) log_tail_bytes: usize,
    /// zstd level of checkpoint blobs.
    pub(crate) checkpoint_level: i32,
    /// Executor class (selects the sizer's history).
    pub(crate) class: String,
    /// State directory (restored checkpoints are written under it).
    pub(crate) state_dir: PathBuf,
    /// No progress output.
    pub(crate) quiet: bool,
}

impl Default for EngineConfig {
    fn default() -> Self {
        EngineConfig {
            slots: 1,
            flush: Duration::from_millis(100),
            lease: Duration::from_secs(30),
            grace: Duration::from_secs(10),
            window: 64,
            log_tail_bytes: 64 * 1024,
            checkpoint_level: 3,
            class: "default".into(),
            state_dir: PathBuf::from(".granule"),
            quiet: false,
        }
    }
}

/// Items in flight beyond the last ack: at least `min`, and about 20 ms of work,
/// so that reading acks in batches never starves a fast task.
fn window(min: u64, item_cost_ms: f64) -> u64 {
    let by_time = if item_cost_ms > 0.0 {
        (20.0 / item_cost_ms) as u64
    } else {
        min
    };
    by_time.clamp(min, 1 << 20)
}

/// How a run ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Outcome {
    /// Every item done.
    Done,
    /// Finished, with quarantined items.
    Quarantined,
    /// Stopped by a signal; the job resumes on the next run.
    Interrupted,
}

struct Slot {
    assignment: Assignment,
    control: Arc<Control>,
    handle: JoinHandle<RunReport>,
}

struct Worker<'a> {
    store: &'a mut dyn Store,
    spec: &'a JobSpec,
    job: JobId,
    cfg: &'a EngineConfig,
    info: WorkerInfo,
    sources: HashMap<usize, ItemSource>,
    running: HashMap<FragmentId, Slot>,
    unflushed: HashMap<FragmentId, FragmentFlush>,
    finished_tx: mpsc::Sender<FragmentId>,
    sampler: Sampler,
    progress: Progress,
}

/// Runs `job` with `cfg.slots` local slots until it is finished or interrupted.
pub(crate) fn run_job(
    store: &mut dyn Store,
    spec: &JobSpec,
    job: JobId,
    cfg: &EngineConfig,
    interrupts: &AtomicUsize,
) -> Result<Outcome> {
    let pid = i64::from(std::process::id());
    let proc_start = host::proc_start(pid).unwrap_or(0);
    let host_name = host::hostname();
    let info = WorkerInfo {
        id: format!("{host_name}:{pid}:{proc_start}"),
        host: host_name,
        pid,
        proc_start,
        slots: cfg.slots,
        class: cfg.class.clone(),
    };
    store.register_worker(&info, host::now_ms())?;
    release_dead_workers(store, &info.host)?;
    let (finished_tx, finished_rx) = mpsc::channel();
    let progress = Progress::new(spec, cfg.quiet);
    let mut worker = Worker {
        store,
        spec,
        job,
        cfg,
        info,
        sources: HashMap::new(),
        running: HashMap::new(),
        unflushed: HashMap::new(),
        finished_tx,
        sampler: Sampler::new(),
        progress,
    };
    worker.run(&finished_rx, interrupts)
}

/// Fragments held by workers of this host that are gone go back to pending at once
/// (other hosts' workers are left to their leases).
fn release_dead_workers(store: &mut dyn Store, host_name: &str) -> Result<()> {
    let dead: Vec<String> = store
        .workers_holding_work()?
        .into_iter()
        .filter(|w| w.host == host_name && !host::alive(w.pid, w.proc_start))
        .map(|w| w.id)
        .collect();
    store.release(host::now_ms(), &dead)?;
    Ok(())
}

impl Worker<'_> {
    fn run(
        &mut self,
        finished: &mpsc::Receiver<FragmentId>,
        interrupts: &AtomicUsize,
    ) -> Result<Outcome> {
        let mut last_flush = Instant::now();
        let (mut stopping, mut killing) = (false, false);
        self.refresh_progress()?;
        loop {
            let signals = interrupts.load(Ordering::SeqCst);
            if signals >= 1 && !stopping {
                stopping = true;
                self.progress.note("interrupted: yielding every fragment at its next safe point (again to kill now)");
                self.running
                    .values()
                    .for_each(|s| s.control.request_yield());
            }
            if signals >= 2 && !killing {
                killing = true;
                self.running.values().for_each(|s| s.control.kill());
            }
            if !stopping {
                self.fill_slots()?;
            }
            if self.running.is_empty() {
                self.refresh_progress()?;
                self.progress.finish();
                if stopping {
                    return Ok(Outcome::Interrupted);
                }
                let record = self
                    .store
                    .job(&self.spec.name)?
                    .context("job vanished from the store")?;
                return match record.state.as_str() {
                    "done" => Ok(Outcome::Done),
                    "failed" => Ok(Outcome::Quarantined),
                    _ => anyhow::bail!(
                        "job \"{}\" has no claimable work and nothing running",
                        self.spec.name
                    ),
                };
            }
            let wait = self.cfg.flush.saturating_sub(last_flush.elapsed());
            match finished.recv_timeout(wait) {
                Ok(id) => self.finish(id)?,
                Err(mpsc::RecvTimeoutError::Timeout) => {}
                Err(mpsc::RecvTimeoutError::Disconnected) => {
                    unreachable!("the worker holds a sender")
                }
            }
            if last_flush.elapsed() >= self.cfg.flush {
                self.flush()?;
                last_flush = Instant::now();
                self.refresh_progress()?;
            }
        }
    }

    fn fill_slots(&mut self) -> Result<()> {
        while self.running.len() < self.cfg.slots as usize {
            let sample = self.sampler.sample();
            // The load average counts our own busy slots; only others' load is pressure.
            let cpus = std::thread::available_parallelism().map_or(1.0, |n| n.get() as f64);
            let others_load =
                (sample.load_per_cpu * cpus - f64::from(self.cfg.slots)).max(0.0) / cpus;
            let req = ClaimRequest {
                job: self.job,
                worker: self.info.id.clone(),
                class: self.cfg.class.clone(),
                now_ms: host::now_ms(),
                lease_ms: self.cfg.lease.as_millis() as i64,
                slots: self.cfg.slots,
                context: ClaimContext {
                    remaining: 0,
                    slots: self.cfg.slots,
                    free_memory: sample.free_memory,
                    load_per_cpu: others_load,
                    lifespan_ms: None,
                },
            };
            let Some(assignment) = self.store.claim(&req)? else {
                return Ok(());
            };
            self.start(assignment)?;
        }
        Ok(())
    }

    fn start(&mut self, a: Assignment) -> Result<()> {
        let stage = &self.spec.stages[a.stage_index];
        let source = match self.sources.entry(a.stage_index) {
            Entry::Occupied(e) => e.get().clone(),
            Entry::Vacant(e) => e
                .insert(
                    ItemSource::open(&stage.items)
                        .with_context(|| format!("opening items of stage {}", stage.name))?,
                )
                .clone(),
        };
        let mut env = vec![
            ("GRANULE_JOB".to_string(), self.spec.name.clone()),
            ("GRANULE_STAGE".to_string(), stage.name.clone()),
            ("GRANULE_FRAGMENT".to_string(), a.fragment.to_string()),
            ("GRANULE_FIRST".to_string(), a.span.start.to_string()),
            ("GRANULE_COUNT".to_string(), a.span.len().to_string()),
            ("GRANULE_ATTEMPT".to_string(), (a.failures + 1).to_string()),
        ];
        if let Some(limit) = stage.sizer.limit_ms {
            let deadline = host::now_ms() + (limit * stage.sizer.deadline_share) as i64;
            env.push(("GRANULE_DEADLINE".to_string(), deadline.to_string()));
        }
        if let Some(path) = self.restore_checkpoint(&a)? {
            env.push(("GRANULE_CHECKPOINT".to_string(), path.display().to_string()));
        }
        let job = FragmentJob {
            fragment: a.fragment,
            span: a.span,
            argv: stage.command.clone(),
            per_item: stage.per_item,
            env,
            source,
            limit: stage
                .sizer
                .limit_ms
                .map(|ms| Duration::from_secs_f64(ms / 1e3)),
            item_cost_ms: a.item_cost_ms,
            deadline_share: stage.sizer.deadline_share,
            grace: self.cfg.grace,
            window: window(self.cfg.window, a.item_cost_ms),
            expect_acks: a.expect_acks,
            first_ack_patience: Duration::from_secs_f64(
                (a.predicted_ms * 4.0 / 1e3).clamp(1.0, 60.0),
            ),
            log_tail_bytes: self.cfg.log_tail_bytes,
            checkpoint_level: self.cfg.checkpoint_level,
        };
        let control = Control::new(a.span);
        let handle = {
            let (control, tx, id) = (control.clone(), self.finished_tx.clone(), a.fragment);
            std::thread::Builder::new()
                .name(format!("fragment-{id}"))
                .spawn(move || {
                    let report = run_fragment(&job, &control);
                    let _ = tx.send(id);
                    report
                })?
        };
        self.running.insert(
            a.fragment,
            Slot {
                assignment: a,
                control,
                handle,
            },
        );
        Ok(())
    }

    /// Writes the checkpoint a resumed fragment starts from; `None` if it has none
    /// or it no longer verifies (then the fragment starts from its first item).
    fn restore_checkpoint(&mut self, a: &Assignment) -> Result<Option<PathBuf>> {
        let Some(id) = a.checkpoint else {
            return Ok(None);
        };
        let Some(row) = self.store.blob(id)? else {
            return Ok(None);
        };
        let blob = Blob {
            data: row.data,
            raw_len: row.raw_len,
            hash: row.hash,
        };
        match blob.open() {
            Ok(raw) => {
                let dir = self.cfg.state_dir.join("checkpoints");
                std::fs::create_dir_all(&dir)?;
                let path = dir.join(format!("fragment-{}.state", a.fragment));
                std::fs::write(&path, raw)?;
                Ok(Some(std::path::absolute(path)?))
            }
            Err(e) => {
                self.progress.note(&format!(
                    "checkpoint {id} of fragment {} is unusable ({e}); starting without it",
                    a.fragment
                ));
                Ok(None)
            }
        }
    }

    /// Moves what the runners acked since the last call into `unflushed`.
    fn collect(&mut self, id: FragmentId) {
        let Some(slot) = self.running.get(&id) else {
            return;
        };
        let (acked, checkpoints) = slot.control.take_unflushed();
        let n = slot.assignment.n;
        let b = slot.assignment.item_cost_ms;
        let entry = self.unflushed.entry(id).or_insert_with(|| FragmentFlush {
            fragment: id,
            ..FragmentFlush::default()
        });
        entry.acked.union_with(&acked);
        let sample = (!checkpoints.is_empty()).then(|| self.sampler.sample());
        for cp in checkpoints {
            match cp.blob {
                Ok(blob) => entry.checkpoints.push(BlobRow {
                    data: blob.data,
                    raw_len: blob.raw_len,
                    hash: blob.hash,
                    meta: serde_json::json!({
                        "fragment_size": n,
                        "acks": cp.acks,
                        "at_ms": cp.at_ms,
                        "predicted_remaining_ms": (n.saturating_sub(cp.acks)) as f64 * b,
                        "free_memory": sample.map(|s| s.free_memory),
                        "load_per_cpu": sample.map(|s| s.load_per_cpu),
                    })
                    .to_string(),
                }),
                Err(e) => self.progress.note(&format!("fragment {id}: {e}")),
            }
        }
    }

    fn flush(&mut self) -> Result<()> {
        let ids: Vec<FragmentId> = self.running.keys().copied().collect();
        for id in ids {
            self.collect(id);
        }
        let batch: Vec<FragmentFlush> = self.unflushed.values().cloned().collect();
        match self.store.flush(
            &self.info.id,
            host::now_ms(),
            self.cfg.lease.as_millis() as i64,
            &batch,
        ) {
            Ok(_) => self.unflushed.clear(),
            // Keep the acks and try again next time: nothing acked is dropped.
            Err(e) => self
                .progress
                .note(&format!("flush failed, will retry: {e}")),
        }
        Ok(())
    }

    fn finish(&mut self, id: FragmentId) -> Result<()> {
        self.collect(id);
        let slot = self
            .running
            .remove(&id)
            .expect("a finished fragment is running");
        let report = slot
            .handle
            .join()
            .map_err(|_| anyhow::anyhow!("runner of fragment {id} panicked"))?;
        let flush = self.unflushed.remove(&id).unwrap_or_else(|| FragmentFlush {
            fragment: id,
            ..FragmentFlush::default()
        });
        let state = match report.outcome {
            FinishOutcome::Success => "done",
            FinishOutcome::Yielded | FinishOutcome::Lost => "yielded",
            FinishOutcome::Failed { .. } => "failed",
        };
        let end = FragmentEnd {
            flush,
            end: report.end,
            outcome: report.outcome.clone(),
            state,
            cause: report.failure.as_ref().map(|f| f.cause().to_string()),
            detail: report.failure.as_ref().map(|f| f.to_string()),
            observed_ms: report.duration_ms,
            cpu_ms: report.cpu_ms,
            peak_rss_kb: report.peak_rss_kb,
            load: self.sampler.sample().load_per_cpu,
            fed: report.fed,
            acks: report.acks,
            first_ack_ms: report.first_ack_ms,
            last_ack_ms: report.last_ack_ms,
            stdout: report.stdout_tail,
            stderr: report.stderr_tail,
        };
        let finished = self.store.finish(&self.info.id, host::now_ms(), &end)?;
        let stage = &self.spec.stages[slot.assignment.stage_index].name;
        if let Some(failure) = &report.failure {
            self.progress.note(&format!(
                "stage {stage}: fragment {id} [{}, {}) failed: {failure} (see: granule logs {stage} --fragment {id})",
                slot.assignment.span.start, slot.assignment.span.end
            ));
        }
        for span in finished.quarantined.spans() {
            self.progress.note(&format!(
                "stage {stage}: quarantined item(s) {}..{}",
                span.start, span.end
            ));
        }
        self.progress
            .fragment_size(slot.assignment.stage_index, slot.assignment.n);
        Ok(())
    }

    fn refresh_progress(&mut self) -> Result<()> {
        if let Some(job) = self.store.status(Some(&self.spec.name))?.into_iter().next() {
            self.progress.update(&job);
        }
        Ok(())
    }
}

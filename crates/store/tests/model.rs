//! Model-based test of the accounting: random sequences of claim, ack (with or
//! without a checkpoint), split, success, yield, failure, all-or-nothing exit, lease
//! expiry, stale late acks and cancel, applied to both backends and to a reference
//! model that follows each item on its own. After every step the store's pending,
//! running, done and quarantined sets must be the model's; at the end every result
//! holds exactly the state it says it covers, results never overlap, and together
//! they hold every item done with state.
//!
//! `GRANULE_MODEL_CASES` sets the number of sequences per backend (default 1500
//! on SQLite, 500 on PostgreSQL); `scripts/soak.sh` runs many more.

use granule_core::{
    retry_budget, ClaimContext, FinishOutcome, FragmentId, IntervalSet, JobId, SizerConfig, Span,
};
use granule_store::testing::TestDatabase;
use granule_store::*;
use proptest::prelude::*;
use proptest::test_runner::{Config, TestRunner};
use std::collections::{BTreeMap, BTreeSet};

#[derive(Clone, Debug)]
enum Op {
    Claim(u64),
    Ack(usize, u64),
    Split(usize, u64),
    Finish(usize, u8, u64),
    Expire(usize),
    StaleAck(usize),
    Cancel,
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        4 => (1u64..25).prop_map(Op::Claim),
        4 => (0usize..4, 1u64..6).prop_map(|(f, k)| Op::Ack(f, k)),
        1 => (0usize..4, 1u64..20).prop_map(|(f, o)| Op::Split(f, o)),
        4 => (0usize..4, 0u8..6, 0u64..25).prop_map(|(f, k, fed)| Op::Finish(f, k, fed)),
        1 => (0usize..4).prop_map(Op::Expire),
        1 => (0usize..4).prop_map(Op::StaleAck),
        1 => Just(Op::Cancel),
    ]
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Item {
    Pending(u32),
    Running(FragmentId),
    Done,
    Quarantined,
}

/// A running fragment as the model and the simulated task see it.
#[derive(Clone, Debug)]
struct Frag {
    worker: String,
    span: Span,
    failures: u32,
    acked: BTreeSet<u64>,
    /// The task's state: what it resumed with and the items it acked since.
    state: BTreeSet<u64>,
}

/// The reference: one state per item, rules stated per item.
struct Model {
    items: Vec<Item>,
    retries: u32,
    stateful_task: bool,
    acking: bool,
    unconfirmed: BTreeSet<u64>,
    frags: BTreeMap<FragmentId, Frag>,
    /// Fragments whose lease expired: their old worker may still write.
    ghosts: Vec<(String, FragmentId, Span)>,
    cancelled: bool,
}

impl Model {
    fn set(&self, want: impl Fn(Item) -> bool) -> IntervalSet {
        let mut s = IntervalSet::new();
        for (i, &item) in self.items.iter().enumerate() {
            if want(item) {
                s.insert_one(i as u64);
            }
        }
        s
    }

    fn accounting(&self) -> Accounting {
        Accounting {
            pending: self.set(|i| matches!(i, Item::Pending(_))),
            running: self.set(|i| matches!(i, Item::Running(_))),
            done: self.set(|i| i == Item::Done),
            quarantined: self.set(|i| i == Item::Quarantined),
        }
    }

    /// Items of a fragment that were never acked, in order.
    fn unacked(&self, id: FragmentId) -> Vec<u64> {
        let f = &self.frags[&id];
        (f.span.start..f.span.end)
            .filter(|i| !f.acked.contains(i))
            .collect()
    }

    /// A fragment's unacked items go back uncharged (yield, loss, cancel).
    fn release(&mut self, id: FragmentId) {
        let f = self.frags.remove(&id).unwrap();
        for i in f.span.start..f.span.end {
            if self.items[i as usize] == Item::Running(id) {
                self.items[i as usize] = Item::Pending(f.failures);
            }
        }
    }

    /// The task failed after being fed up to `fed_end`: fed, unacked items count a
    /// failure (at least the first, if nothing could be fed); each run of them that
    /// is alone and over budget is quarantined.
    fn fail(&mut self, id: FragmentId, fed_end: u64, budget: u32) {
        let f = self.frags.remove(&id).unwrap();
        let fed_end = fed_end.max(f.span.start + 1).min(f.span.end);
        let mut charged = Vec::new();
        for i in f.span.start..f.span.end {
            if self.items[i as usize] != Item::Running(id) {
                continue;
            }
            if i < fed_end {
                charged.push(i);
            } else {
                self.items[i as usize] = Item::Pending(f.failures);
            }
        }
        let failures = f.failures + 1;
        let mut k = 0;
        while k < charged.len() {
            let mut run = vec![charged[k]];
            while k + run.len() < charged.len() && charged[k + run.len()] == run[run.len() - 1] + 1
            {
                run.push(charged[k + run.len()]);
            }
            k += run.len();
            let quarantine = failures > budget && run.len() == 1;
            for i in run {
                self.items[i as usize] = if quarantine {
                    Item::Quarantined
                } else {
                    Item::Pending(failures)
                };
            }
        }
    }
}

struct Run<'a> {
    store: &'a mut dyn Store,
    job: JobId,
    model: Model,
    now: i64,
    next_worker: u32,
}

/// A state as the simulated task writes it: the items it holds, as JSON.
fn encode(items: &BTreeSet<u64>) -> Vec<u8> {
    serde_json::to_vec(items).unwrap()
}

fn decode(data: &[u8]) -> BTreeSet<u64> {
    serde_json::from_slice(data).unwrap()
}

fn to_set(items: &BTreeSet<u64>) -> IntervalSet {
    let mut s = IntervalSet::new();
    for &i in items {
        s.insert_one(i);
    }
    s
}

impl Run<'_> {
    fn tick(&mut self) -> i64 {
        self.now += 1;
        self.now
    }

    fn nth(&self, i: usize) -> Option<FragmentId> {
        self.model
            .frags
            .keys()
            .nth(i % self.model.frags.len().max(1))
            .copied()
    }

    /// A new worker, registered now; its id and the time.
    fn new_worker(&mut self) -> (String, i64) {
        self.next_worker += 1;
        let worker = format!("w{}", self.next_worker);
        let now = self.tick();
        let info = WorkerInfo {
            id: worker.clone(),
            host: "model".into(),
            pid: 1,
            proc_start: 1,
            slots: 1,
            class: "default".into(),
            lifespan_end_ms: None,
            cost_per_hour: 0.0,
            spot: false,
            resources: "{}".into(),
            locality: String::new(),
            allocation: None,
        };
        self.store.register_worker(&info, now).unwrap();
        (worker, now)
    }

    fn claim(&mut self, n: u64) {
        let (worker, now) = self.new_worker();
        let req = ClaimRequest {
            job: Some(self.job),
            worker: worker.clone(),
            class: "default".into(),
            now_ms: now,
            lease_ms: 1 << 40,
            slots: 1,
            max_items: Some(n),
            offer: Default::default(),
            expected_life_ms: None,
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
        let claimed = self.store.claim(&req).unwrap();
        let m = &mut self.model;
        let pending = m.set(|i| matches!(i, Item::Pending(_)));
        let Some(a) = claimed else {
            assert!(
                m.cancelled || pending.is_empty(),
                "nothing claimed with {pending:?} pending"
            );
            return;
        };
        assert!(!m.cancelled, "a cancelled job was claimed");
        assert!(a.span.len() <= n && !a.span.is_empty());
        let Item::Pending(failures) = m.items[a.span.start as usize] else {
            panic!("claimed {:?}, not pending: {:?}", a.span, m.items);
        };
        for i in a.span.start..a.span.end {
            assert_eq!(
                m.items[i as usize],
                Item::Pending(failures),
                "one history per claim"
            );
            m.items[i as usize] = Item::Running(a.fragment);
        }
        // The task resumes from the state its claim hands it, which holds exactly
        // what the store says it covers.
        let state = match a.checkpoint {
            Some(b) => {
                let stored = self
                    .store
                    .blob(b)
                    .unwrap()
                    .expect("a handed checkpoint exists");
                let state = decode(&stored.row.data);
                assert_eq!(
                    to_set(&state),
                    stored.covers,
                    "a checkpoint holds what it covers"
                );
                state
            }
            None => BTreeSet::new(),
        };
        m.frags.insert(
            a.fragment,
            Frag {
                worker,
                span: a.span,
                failures,
                acked: BTreeSet::new(),
                state,
            },
        );
    }

    /// The task acks its next `k` items (and, if it keeps state, hands it over in
    /// the same write).
    fn ack(&mut self, id: FragmentId, k: u64) {
        let next: Vec<u64> = self
            .model
            .unacked(id)
            .into_iter()
            .take(k as usize)
            .collect();
        let mut flush = FragmentFlush {
            fragment: id,
            ..FragmentFlush::default()
        };
        for &i in &next {
            flush.acked.insert_one(i);
        }
        let f = self.model.frags.get_mut(&id).unwrap();
        f.acked.extend(next.iter().copied());
        f.state.extend(next.iter().copied());
        if self.model.stateful_task {
            let acked = to_set(&f.acked);
            let data = encode(&f.state);
            flush.checkpoints.push(NewCheckpoint {
                blob: BlobRow {
                    raw_len: data.len() as u64,
                    data,
                    hash: String::new(),
                    meta: "{}".into(),
                },
                acked,
            });
        }
        let worker = f.worker.clone();
        let now = self.tick();
        let hb = Heartbeat {
            held: vec![id],
            ..Heartbeat::default()
        };
        let reply = self
            .store
            .flush(&worker, now, 1 << 40, &hb, &[flush])
            .unwrap();
        if !next.is_empty() && !self.model.acking {
            // The stage's first ack: what all-or-nothing fragments counted goes back.
            self.model.acking = true;
            for i in std::mem::take(&mut self.model.unconfirmed) {
                self.model.items[i as usize] = Item::Pending(0);
            }
        }
        for i in next {
            self.model.items[i as usize] = Item::Done;
        }
        if self.model.cancelled {
            // Stopped: its acks stand, the rest is pending again.
            assert_eq!(reply.stopped, vec![id]);
            self.model.release(id);
            return;
        }
        assert!(
            reply.lost.is_empty() && reply.stopped.is_empty(),
            "{reply:?}"
        );
    }

    fn split(&mut self, id: FragmentId, offset: u64) {
        let f = self.model.frags[&id].clone();
        let at = f.span.start + offset;
        let flush = FragmentFlush {
            fragment: id,
            split: Some(SplitAnswer::At(at)),
            ..FragmentFlush::default()
        };
        let now = self.tick();
        let hb = Heartbeat {
            held: vec![id],
            ..Heartbeat::default()
        };
        self.store
            .flush(&f.worker, now, 1 << 40, &hb, &[flush])
            .unwrap();
        if self.model.cancelled {
            self.model.release(id);
            return;
        }
        let tail_acked = f.acked.iter().any(|&i| i >= at);
        if at > f.span.start && at < f.span.end && !tail_acked {
            for i in at..f.span.end {
                self.model.items[i as usize] = Item::Pending(f.failures);
            }
            self.model.frags.get_mut(&id).unwrap().span.end = at;
        }
    }

    fn finish(&mut self, id: FragmentId, kind: u8, fed: u64) {
        if kind == 0 && self.model.stateful_task {
            // A stateful task acks what is left and hands over its final state.
            self.ack(id, u64::MAX >> 1);
            if self.model.cancelled {
                return;
            }
        }
        let f = self.model.frags[&id].clone();
        let fed_end = f.span.start + fed;
        let (outcome, cause) = match kind {
            0 => (FinishOutcome::Success, None),
            1 => (FinishOutcome::Yielded, None),
            2 => (
                FinishOutcome::Failed {
                    culprits: IntervalSet::new(),
                    rest_failed: true,
                    fed_end,
                },
                Some("signal"),
            ),
            3 => (
                FinishOutcome::Failed {
                    culprits: IntervalSet::new(),
                    rest_failed: true,
                    fed_end,
                },
                Some("exit"),
            ),
            // A task that keeps state acks what it hands over: no all-or-nothing exits.
            _ if self.model.stateful_task => (FinishOutcome::Yielded, None),
            _ => (FinishOutcome::AllOrNothing { fed_end }, None),
        };
        let end = FragmentEnd {
            outcome: outcome.clone(),
            state: FragmentState::Done,
            cause: cause.map(String::from),
            fed: fed.max(1),
            ..FragmentEnd::success(id, f.span.end)
        };
        let now = self.tick();
        let finished = self.store.finish(&f.worker, now, &end).unwrap();
        assert!(finished.accepted);
        let m = &mut self.model;
        match outcome {
            FinishOutcome::Success => {
                m.frags.remove(&id);
                for i in f.span.start..f.span.end {
                    m.items[i as usize] = Item::Done;
                }
            }
            FinishOutcome::AllOrNothing { fed_end } => {
                if m.acking {
                    m.fail(id, fed_end, retry_budget(Some("unacked"), m.retries));
                } else {
                    m.frags.remove(&id);
                    for i in f.span.start..f.span.end {
                        if m.items[i as usize] == Item::Running(id) {
                            m.items[i as usize] = Item::Done;
                            m.unconfirmed.insert(i);
                        }
                    }
                }
            }
            FinishOutcome::Failed { fed_end, .. } => {
                m.fail(id, fed_end, retry_budget(cause, m.retries))
            }
            _ => m.release(id),
        }
    }

    fn expire(&mut self, id: FragmentId) {
        let f = self.model.frags[&id].clone();
        let now = self.tick();
        assert_eq!(
            self.store
                .release(now, std::slice::from_ref(&f.worker))
                .unwrap(),
            1
        );
        self.model.release(id);
        self.model.ghosts.push((f.worker, id, f.span));
    }

    /// The worker of an expired fragment wakes up and flushes acks: nothing counts.
    fn stale_ack(&mut self, g: usize) {
        if self.model.ghosts.is_empty() {
            return;
        }
        let (worker, id, span) = self.model.ghosts[g % self.model.ghosts.len()].clone();
        let flush = FragmentFlush {
            fragment: id,
            acked: IntervalSet::from_span(span),
            ..FragmentFlush::default()
        };
        let now = self.tick();
        let reply = self
            .store
            .flush(&worker, now, 1 << 40, &Heartbeat::default(), &[flush])
            .unwrap();
        assert_eq!(reply.lost, vec![id], "a late ack is refused");
        let end = FragmentEnd::success(id, span.end);
        assert!(!self.store.finish(&worker, now, &end).unwrap().accepted);
    }

    fn check(&mut self, step: &str) {
        let got = self.store.accounting("m", "s").unwrap();
        assert_eq!(got, self.model.accounting(), "after {step}");
    }
}

fn run_sequence(store: &mut dyn Store, items: u64, stateful: bool, ops: &[Op], seq: usize) {
    let job = NewJob {
        name: "m".into(),
        spec_hash: format!("{seq}"),
        spec_json: "{}".into(),
        stages: vec![NewStage {
            name: "s".into(),
            items,
            after: vec![],
            retries: 2,
            sizer: SizerConfig {
                initial: Some(1 << 40),
                tail_factor: 1.0,
                ..SizerConfig::default()
            },
            needs: Default::default(),
            cost_key: String::new(),
            ..Default::default()
        }],
    };
    let id = store.submit(&job, 0, true).unwrap().id();
    let mut run = Run {
        store,
        job: id,
        model: Model {
            items: vec![Item::Pending(0); items as usize],
            retries: 2,
            stateful_task: stateful,
            acking: false,
            unconfirmed: BTreeSet::new(),
            frags: BTreeMap::new(),
            ghosts: Vec::new(),
            cancelled: false,
        },
        now: 0,
        next_worker: 0,
    };
    for op in ops {
        run.apply(op);
        run.check(&format!("{op:?}"));
    }
    if run.model.cancelled {
        // Told at their next flush: stopped, their rest pending again.
        while let Some(&id) = run.model.frags.keys().next() {
            run.ack(id, 0);
            run.check("a stopped fragment's flush");
        }
        return;
    }
    run.drive_to_end();
    run.check_results(stateful);
}

impl Run<'_> {
    /// One step of a sequence.
    fn apply(&mut self, op: &Op) {
        let pick = |run: &Run<'_>, i: usize| run.nth(i).filter(|_| !run.model.frags.is_empty());
        match *op {
            Op::Claim(n) => self.claim(n),
            Op::Ack(i, k) => {
                if let Some(id) = pick(self, i) {
                    self.ack(id, k)
                }
            }
            Op::Split(i, o) => {
                if let Some(id) = pick(self, i) {
                    self.split(id, o)
                }
            }
            Op::Finish(i, kind, fed) => {
                if let Some(id) = pick(self, i) {
                    if self.model.cancelled {
                        self.ack(id, 0);
                    } else {
                        self.finish(id, kind, fed)
                    }
                }
            }
            Op::Expire(i) => {
                if let Some(id) = pick(self, i) {
                    self.expire(id)
                }
            }
            Op::StaleAck(g) => self.stale_ack(g),
            Op::Cancel => {
                if !self.model.cancelled {
                    let open = !self.model.frags.is_empty()
                        || self
                            .model
                            .items
                            .iter()
                            .any(|i| matches!(i, Item::Pending(_)));
                    // A finished job cannot be cancelled.
                    assert_eq!(self.store.cancel("m", self.now).unwrap(), open);
                    self.model.cancelled = open;
                }
            }
        }
    }

    /// Drives the job to its end with clean attempts.
    fn drive_to_end(&mut self) {
        for _ in 0..10_000 {
            if let Some(&id) = self.model.frags.keys().next() {
                self.finish(id, 0, 0);
            } else if self
                .model
                .items
                .iter()
                .any(|i| matches!(i, Item::Pending(_)))
            {
                self.claim(1 << 20);
            } else {
                break;
            }
            self.check("the clean end");
        }
    }

    /// The results: each holds what it says it covers, none overlap, and (for a
    /// task that keeps state) together they hold every item done.
    fn check_results(&mut self, stateful: bool) {
        let results = self.store.results("m", "s").unwrap();
        let mut all = IntervalSet::new();
        for r in &results {
            let held = to_set(&decode(&r.blob.data));
            assert_eq!(held, r.covers, "a result holds what it says it covers");
            assert!(!all.intersects(&held), "results overlap");
            all.union_with(&held);
        }
        if stateful && !results.is_empty() {
            assert_eq!(
                all,
                self.model.accounting().done,
                "results hold every item done"
            );
        }
    }
}

/// Sequences per backend: `GRANULE_MODEL_CASES`, else 1500 on SQLite and 500 on
/// PostgreSQL (each of its steps is a round trip).
fn cases(default: u32) -> u32 {
    std::env::var("GRANULE_MODEL_CASES")
        .ok()
        .and_then(|n| n.parse().ok())
        .unwrap_or(default)
}

fn model_check(store: &mut dyn Store, backend: &str, cases: u32) {
    let mut runner = TestRunner::new(Config {
        cases,
        failure_persistence: None,
        ..Config::default()
    });
    let (store, seq) = (std::cell::RefCell::new(store), std::cell::Cell::new(0));
    let strategy = (1u64..60, any::<bool>(), prop::collection::vec(op(), 1..50));
    let result = runner.run(&strategy, |(items, stateful, ops)| {
        seq.set(seq.get() + 1);
        run_sequence(*store.borrow_mut(), items, stateful, &ops, seq.get());
        Ok(())
    });
    if let Err(e) = result {
        panic!("{backend}: {e}");
    }
}

#[test]
fn the_store_keeps_the_models_accounting_under_random_sequences() {
    let dir = tempfile::tempdir().unwrap();
    let mut sqlite = SqliteStore::open(&dir.path().join("granule.db")).unwrap();
    model_check(&mut sqlite, "sqlite", cases(1500));
    if let Some(db) = TestDatabase::create("model") {
        let mut pg = PgStore::open(&db.url).unwrap();
        model_check(&mut pg, "postgres", cases(500));
    }
}

//! One conformance suite, run against both backends: SQLite in a temporary file and
//! PostgreSQL in a fresh database (`GRANULE_TEST_POSTGRES`).

use granule_core::{
    ClaimContext, FinishOutcome, FragmentId, IntervalSet, JobId, SizerConfig, Span, WorkerOffer,
};
use granule_store::testing::TestDatabase;
use granule_store::*;
use std::collections::BTreeSet;

type Opener = Box<dyn Fn() -> Box<dyn Store> + Send + Sync>;
type Sql = Box<dyn Fn(&str) + Send + Sync>;

/// Opens connections to one store under test.
struct Backend {
    name: &'static str,
    open: Opener,
    /// Runs raw SQL on it, as an operator (or a fault) would.
    sql: Sql,
    _dir: tempfile::TempDir,
    _db: Option<TestDatabase>,
}

fn backends(test: &str) -> Vec<Backend> {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("granule.db");
    let raw = path.clone();
    let mut all = vec![Backend {
        name: "sqlite",
        open: Box::new(move || Box::new(SqliteStore::open(&path).unwrap())),
        sql: Box::new(move |sql| {
            rusqlite::Connection::open(&raw)
                .unwrap()
                .execute_batch(sql)
                .unwrap()
        }),
        _dir: dir,
        _db: None,
    }];
    if let Some(db) = TestDatabase::create(test) {
        let (url, raw) = (db.url.clone(), db.url.clone());
        all.push(Backend {
            name: "postgres",
            open: Box::new(move || Box::new(PgStore::open(&url).unwrap())),
            sql: Box::new(move |sql| {
                postgres::Client::connect(&raw, postgres::NoTls)
                    .unwrap()
                    .batch_execute(sql)
                    .unwrap()
            }),
            _dir: tempfile::tempdir().unwrap(),
            _db: Some(db),
        });
    }
    all
}

fn job(name: &str, items: u64, hash: &str) -> NewJob {
    NewJob {
        name: name.into(),
        spec_hash: hash.into(),
        spec_json: "{}".into(),
        // No slow start: claims take what `max_items` allows (tail factoring still applies).
        stages: vec![NewStage {
            name: "s".into(),
            items,
            after: vec![],
            retries: 1,
            sizer: SizerConfig {
                initial: Some(1 << 40),
                tail_factor: 1.0,
                ..SizerConfig::default()
            },
            needs: Default::default(),
            cost_key: String::new(),
            ..Default::default()
        }],
    }
}

fn worker(store: &mut dyn Store, id: &str) -> String {
    let info = WorkerInfo {
        id: id.into(),
        host: "test".into(),
        pid: 1,
        proc_start: 1,
        slots: 1,
        class: "default".into(),
        lifespan_end_ms: None,
        cost_per_hour: 1.5,
        spot: true,
        resources: r#"{"cpus":2,"custom":{"licenses":4.0}}"#.into(),
        locality: String::new(),
        allocation: None,
    };
    store.register_worker(&info, 0).unwrap();
    id.into()
}

fn claim(
    store: &mut dyn Store,
    job: JobId,
    worker: &str,
    now_ms: i64,
    max: Option<u64>,
) -> Option<Assignment> {
    let req = ClaimRequest {
        job: Some(job),
        worker: worker.into(),
        class: "default".into(),
        now_ms,
        lease_ms: 10_000,
        slots: 1,
        max_items: max,
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
    store.claim(&req).unwrap()
}

fn end(fragment: FragmentId, outcome: FinishOutcome, to: u64) -> FragmentEnd {
    let state = match outcome {
        FinishOutcome::Success => FragmentState::Done,
        FinishOutcome::Failed { .. } => FragmentState::Failed,
        _ => FragmentState::Yielded,
    };
    FragmentEnd {
        outcome,
        state,
        ..FragmentEnd::success(fragment, to)
    }
}

fn acks(fragment: FragmentId, span: Span) -> FragmentFlush {
    FragmentFlush {
        fragment,
        acked: IntervalSet::from_span(span),
        ..FragmentFlush::default()
    }
}

fn stage(store: &mut dyn Store, name: &str) -> StageStatus {
    store.status(Some(name)).unwrap().remove(0).stages.remove(0)
}

#[test]
fn submit_resumes_refuses_a_changed_spec_and_starts_fresh() {
    for b in backends("submit_resumes") {
        let mut s = (b.open)();
        let id = s.submit(&job("j", 10, "h1"), 0, false).unwrap();
        assert!(matches!(id, Submitted::Created(_)), "{}", b.name);
        assert_eq!(
            s.submit(&job("j", 10, "h1"), 0, false).unwrap(),
            Submitted::Resumed(id.id())
        );
        assert!(
            matches!(
                s.submit(&job("j", 11, "h2"), 0, false),
                Err(StoreError::SpecChanged(_))
            ),
            "{}",
            b.name
        );
        assert!(matches!(
            s.submit(&job("j", 11, "h2"), 0, true).unwrap(),
            Submitted::Created(_)
        ));
        assert_eq!(stage(s.as_mut(), "j").items, 11, "{}", b.name);
        s.submit(&job("big", 100_000_000, "h"), 0, false).unwrap();
        assert_eq!(stage(s.as_mut(), "big").pending, 100_000_000, "{}", b.name);
    }
}

#[test]
fn acks_count_once_and_a_released_fragment_counts_nothing_late() {
    for b in backends("acks_count_once") {
        let mut s = (b.open)();
        let id = s.submit(&job("j", 100, "h"), 0, false).unwrap().id();
        let w1 = worker(s.as_mut(), "w1");
        let w2 = worker(s.as_mut(), "w2");
        let a = claim(s.as_mut(), id, &w1, 0, Some(40)).unwrap();
        assert_eq!(a.span, Span::new(0, 40), "{}", b.name);
        let hb = Heartbeat::default();
        let first = acks(a.fragment, Span::new(0, 10));
        s.flush(&w1, 1, 10_000, &hb, std::slice::from_ref(&first))
            .unwrap();
        s.flush(&w1, 2, 10_000, &hb, std::slice::from_ref(&first))
            .unwrap(); // repeated: counts nothing
        assert_eq!(stage(s.as_mut(), "j").done, 10, "{}", b.name);
        // The lease expires; the rest goes back to pending for another worker.
        assert_eq!(s.release(20_000, &[]).unwrap(), 1, "{}", b.name);
        let reply = s
            .flush(
                &w1,
                20_001,
                10_000,
                &hb,
                &[acks(a.fragment, Span::new(10, 20))],
            )
            .unwrap();
        assert_eq!(
            reply.lost,
            vec![a.fragment],
            "{}: the late worker is told",
            b.name
        );
        let finished = s
            .finish(&w1, 20_002, &end(a.fragment, FinishOutcome::Success, 40))
            .unwrap();
        assert!(!finished.accepted, "{}", b.name);
        assert_eq!(
            stage(s.as_mut(), "j").done,
            10,
            "{}: late acks are not counted",
            b.name
        );
        let mut claimed = Vec::new();
        while let Some(a) = claim(s.as_mut(), id, &w2, 30_000, None) {
            claimed.push(a.span);
            s.finish(
                &w2,
                30_001,
                &end(a.fragment, FinishOutcome::Success, a.span.end),
            )
            .unwrap();
        }
        let st = stage(s.as_mut(), "j");
        assert_eq!(
            (st.done, st.pending, st.running),
            (100, 0, 0),
            "{}: {st:?}",
            b.name
        );
        assert_eq!(s.job("j").unwrap().unwrap().state, "done", "{}", b.name);
        assert!(
            claimed.iter().all(|sp| sp.start >= 10),
            "{}: acked items claimed again: {claimed:?}",
            b.name
        );
    }
}

#[test]
fn a_failing_item_is_bisected_and_quarantined_alone() {
    for b in backends("bisect") {
        let mut s = (b.open)();
        let id = s.submit(&job("j", 64, "h"), 0, false).unwrap().id();
        let w = worker(s.as_mut(), "w");
        let poison = 37;
        for _ in 0..500 {
            let Some(a) = claim(s.as_mut(), id, &w, 0, Some(16)) else {
                break;
            };
            let outcome = if (a.span.start..a.span.end).contains(&poison) {
                FinishOutcome::failed()
            } else {
                FinishOutcome::Success
            };
            s.finish(&w, 1, &end(a.fragment, outcome, a.span.end))
                .unwrap();
        }
        let st = stage(s.as_mut(), "j");
        assert_eq!(
            st.quarantined_items,
            vec![[poison, poison + 1]],
            "{}",
            b.name
        );
        assert_eq!(st.done, 63, "{}", b.name);
        assert_eq!(s.job("j").unwrap().unwrap().state, "failed", "{}", b.name);
    }
}

#[test]
fn a_split_moves_only_the_unfed_tail() {
    for b in backends("split") {
        let mut s = (b.open)();
        let id = s.submit(&job("j", 1000, "h"), 0, false).unwrap().id();
        let owner = worker(s.as_mut(), "owner");
        let thief = worker(s.as_mut(), "thief");
        let a = claim(s.as_mut(), id, &owner, 0, Some(1000)).unwrap();
        let hb = Heartbeat::default();
        s.flush(
            &owner,
            10,
            10_000,
            &hb,
            &[acks(
                a.fragment,
                Span::new(a.span.start, a.span.start + 100),
            )],
        )
        .unwrap();
        // Long overdue: judged by its own pace, its tail is worth stealing.
        assert_eq!(
            s.request_split(Some(id), 100_000, 10.0, "default").unwrap(),
            Some(a.fragment),
            "{}",
            b.name
        );
        let nothing = FragmentFlush {
            fragment: a.fragment,
            ..FragmentFlush::default()
        };
        let reply = s.flush(&owner, 100_001, 10_000, &hb, &[nothing]).unwrap();
        let (fragment, at) = reply.split_requests[0];
        assert_eq!(fragment, a.fragment);
        assert!(
            at > a.span.start + 100 && at < a.span.end,
            "{}: {at}",
            b.name
        );
        let early = claim(s.as_mut(), id, &thief, 100_002, None);
        assert!(
            early.is_none_or(|t| t.span.start >= a.span.end),
            "{}: tail free before the owner answered",
            b.name
        );
        let answer = FragmentFlush {
            fragment: a.fragment,
            split: Some(SplitAnswer::At(at)),
            ..FragmentFlush::default()
        };
        s.flush(&owner, 100_003, 10_000, &hb, &[answer]).unwrap();
        let t = claim(s.as_mut(), id, &thief, 100_004, Some(10_000)).unwrap();
        assert_eq!(t.span.start, at, "{}", b.name);
        assert_eq!(stage(s.as_mut(), "j").splits, 1, "{}", b.name);
    }
}

#[test]
fn concurrent_claimers_never_share_an_item() {
    for b in backends("concurrent") {
        let items = 3_000u64;
        let id = (b.open)()
            .submit(&job("j", items, "h"), 0, false)
            .unwrap()
            .id();
        let open = &b.open;
        let spans: Vec<Span> = std::thread::scope(|scope| {
            let handles: Vec<_> = (0..6u64)
                .map(|t| {
                    scope.spawn(move || {
                        let mut s = open();
                        let w = worker(s.as_mut(), &format!("w{t}"));
                        let mut mine = Vec::new();
                        while let Some(a) = claim(s.as_mut(), id, &w, 0, Some(1 + t * 7)) {
                            mine.push(a.span);
                            s.finish(&w, 1, &end(a.fragment, FinishOutcome::Success, a.span.end))
                                .unwrap();
                        }
                        mine
                    })
                })
                .collect();
            handles
                .into_iter()
                .flat_map(|h| h.join().unwrap())
                .collect()
        });
        let mut seen = BTreeSet::new();
        for span in &spans {
            for i in span.start..span.end {
                assert!(seen.insert(i), "{}: item {i} claimed twice", b.name);
            }
        }
        assert_eq!(seen.len() as u64, items, "{}", b.name);
        assert_eq!(stage((b.open)().as_mut(), "j").done, items, "{}", b.name);
    }
}

#[test]
fn a_cancelled_job_is_not_claimed_and_its_fragments_are_told() {
    for b in backends("cancel") {
        let mut s = (b.open)();
        let id = s.submit(&job("j", 100, "h"), 0, false).unwrap().id();
        let w = worker(s.as_mut(), "w");
        let a = claim(s.as_mut(), id, &w, 0, Some(10)).unwrap();
        assert!(s.cancel("j", 1).unwrap(), "{}", b.name);
        assert!(!s.cancel("j", 1).unwrap(), "{}", b.name);
        assert!(claim(s.as_mut(), id, &w, 2, None).is_none(), "{}", b.name);
        let nothing = FragmentFlush {
            fragment: a.fragment,
            ..FragmentFlush::default()
        };
        let reply = s
            .flush(&w, 3, 10_000, &Heartbeat::default(), &[nothing])
            .unwrap();
        assert_eq!(reply.stopped, vec![a.fragment], "{}", b.name);
        assert!(reply.lost.is_empty(), "{}: not a lost lease", b.name);
        assert_eq!(
            s.job("j").unwrap().unwrap().state,
            "cancelled",
            "{}",
            b.name
        );
        // A cancelled job keeps its accounting: the stopped fragment's items are
        // pending again, nothing vanished.
        let st = stage(s.as_mut(), "j");
        assert_eq!((st.done, st.pending, st.running), (0, 100, 0), "{}", b.name);
    }
}

#[test]
fn heartbeats_renew_only_held_fragments_and_a_fully_acked_release_settles_the_job() {
    for b in backends("renew_settle") {
        let mut s = (b.open)();
        let id = s.submit(&job("j", 20, "h"), 0, false).unwrap().id();
        let w = worker(s.as_mut(), "w");
        let known = claim(s.as_mut(), id, &w, 0, Some(10)).unwrap();
        // A claim whose reply never reached the worker: it does not hold it.
        let orphan = claim(s.as_mut(), id, &w, 0, Some(10)).unwrap();
        let hb = Heartbeat {
            held: vec![known.fragment],
            ..Heartbeat::default()
        };
        // Every item of the known fragment is acked, but it never finishes.
        s.flush(&w, 9_000, 10_000, &hb, &[acks(known.fragment, known.span)])
            .unwrap();
        assert_eq!(
            s.release(12_000, &[]).unwrap(),
            1,
            "{}: only the orphan's lease ran out",
            b.name
        );
        assert_eq!(stage(s.as_mut(), "j").pending, 10, "{}", b.name);
        let again = claim(s.as_mut(), id, &w, 12_001, None).unwrap();
        assert_eq!(again.span, orphan.span, "{}", b.name);
        s.finish(
            &w,
            12_002,
            &end(again.fragment, FinishOutcome::Success, again.span.end),
        )
        .unwrap();
        assert_eq!(s.job("j").unwrap().unwrap().state, "running", "{}", b.name);
        // The worker vanishes holding a fragment whose every item is acked: releasing
        // it must end the job, not leave it running with nothing left to do.
        assert_eq!(s.release(30_000, &[]).unwrap(), 1, "{}", b.name);
        assert_eq!(stage(s.as_mut(), "j").done, 20, "{}", b.name);
        assert_eq!(s.job("j").unwrap().unwrap().state, "done", "{}", b.name);
    }
}

#[test]
fn each_class_is_sent_where_it_is_relatively_fastest() {
    for b in backends("advantage") {
        let mut s = (b.open)();
        let mut two = job("j", 100_000, "h");
        let mut second = two.stages[0].clone();
        second.name = "t".into();
        two.stages.push(second);
        let id = s.submit(&two, 0, false).unwrap().id();
        // Per-item cost, ms: stage 0 is ten times slower on class "slow"; stage 1
        // costs the same on both.
        let cost = |stage: usize, class: &str| {
            if stage == 0 && class == "slow" {
                10.0
            } else {
                1.0
            }
        };
        let req = |class: &str, n: u64| ClaimRequest {
            job: Some(id),
            worker: class.into(),
            class: class.into(),
            now_ms: 0,
            lease_ms: 10_000,
            slots: 1,
            max_items: Some(n),
            offer: WorkerOffer {
                class: class.into(),
                ..WorkerOffer::default()
            },
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
        for class in ["fast", "slow"] {
            worker(s.as_mut(), class);
            // Before a class's costs are learned (two fragments), its claims
            // alternate between the stages (the least-served first): it learns both.
            for n in [10u64, 40] {
                let first = s.claim(&req(class, n)).unwrap().unwrap();
                let second = s.claim(&req(class, n)).unwrap().unwrap();
                assert_ne!(first.stage_index, second.stage_index, "{}", b.name);
                for a in [first, second] {
                    let end = FragmentEnd {
                        observed_ms: 10.0 + n as f64 * cost(a.stage_index, class),
                        fed: n,
                        ..end(a.fragment, FinishOutcome::Success, a.span.end)
                    };
                    s.finish(class, 1, &end).unwrap();
                }
            }
        }
        for _ in 0..3 {
            let a = s.claim(&req("slow", 10)).unwrap().unwrap();
            assert_eq!(
                a.stage_index, 1,
                "{}: the slow class takes the stage it is not slow at",
                b.name
            );
            s.finish(
                "slow",
                2,
                &end(a.fragment, FinishOutcome::Success, a.span.end),
            )
            .unwrap();
        }
    }
}

/// Registers a worker with a class, spot flag and memory (MiB), seen at `now_ms`.
fn described(store: &mut dyn Store, id: &str, spot: bool, memory_mb: u64, now_ms: i64) {
    let info = WorkerInfo {
        id: id.into(),
        host: "test".into(),
        pid: 1,
        proc_start: 1,
        slots: 1,
        class: "default".into(),
        lifespan_end_ms: None,
        cost_per_hour: 1.0,
        spot,
        resources: format!(r#"{{"cpus":2,"memory_mb":{memory_mb}}}"#),
        locality: String::new(),
        allocation: None,
    };
    store.register_worker(&info, now_ms).unwrap();
}

fn offered(job: JobId, id: &str, spot: bool, memory_mb: u64, now_ms: i64) -> ClaimRequest {
    ClaimRequest {
        job: Some(job),
        worker: id.into(),
        class: "default".into(),
        now_ms,
        lease_ms: 10_000,
        slots: 1,
        max_items: Some(10),
        offer: WorkerOffer {
            class: "default".into(),
            memory_mb,
            spot,
            ..WorkerOffer::default()
        },
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
    }
}

/// A claim of `job` by worker `id` of class `class` for at most `n` items.
fn classed(
    job: JobId,
    id: &str,
    class: &str,
    spot: bool,
    now_ms: i64,
    n: Option<u64>,
) -> ClaimRequest {
    let mut r = offered(job, id, spot, 4096, now_ms);
    r.class = class.into();
    r.offer.class = class.into();
    r.max_items = n;
    r
}

/// Teaches `class` its cost on the job's stage: fragments of 10 and 40 items
/// taking 10 ms plus `per_item` ms each, acked if `acks`, run by worker `id`.
fn learn(s: &mut dyn Store, job: JobId, id: &str, class: &str, per_item: f64, acks: bool) {
    let spot = id == "w";
    for n in [10u64, 40] {
        let a = s
            .claim(&classed(job, id, class, spot, 1, Some(n)))
            .unwrap()
            .unwrap();
        let mut end = FragmentEnd {
            observed_ms: 10.0 + n as f64 * per_item,
            fed: n,
            acks: if acks { n } else { 0 },
            ..end(a.fragment, FinishOutcome::Success, a.span.end)
        };
        if acks {
            end.flush = self::acks(a.fragment, a.span);
        }
        s.finish(id, 2, &end).unwrap();
    }
}

#[test]
fn a_claim_counts_what_running_fragments_have_not_run_yet() {
    // A task that does not ack, two workers: a claim's share is of the work
    // outstanding, the running fragment's unrun items (judged by time) included.
    // Counting pending items only, the second claim took a quarter of the stage.
    for b in backends("unrun") {
        let mut s = (b.open)();
        let id = s.submit(&job("j", 10_050, "h"), 0, false).unwrap().id();
        described(s.as_mut(), "a", false, 4096, 1);
        described(s.as_mut(), "b", false, 4096, 1);
        // 10 ms start, 1 ms items, no acks: 50 items learn it.
        learn(s.as_mut(), id, "a", "default", 1.0, false);
        let first = s
            .claim(&classed(id, "a", "default", false, 2, None))
            .unwrap()
            .unwrap();
        assert_eq!(first.n, 5_000, "{}: half of 10,000 on 2 slots", b.name);
        // Halfway through its predicted time the first fragment has ~2,500 items to
        // go: the second claim is half of the 7,500 outstanding.
        let half = (first.predicted_ms / 2.0).round() as i64;
        described(s.as_mut(), "a", false, 4096, 2 + half);
        described(s.as_mut(), "b", false, 4096, 2 + half);
        let second = s
            .claim(&classed(id, "b", "default", false, 2 + half, None))
            .unwrap()
            .unwrap();
        assert!(
            (3_748..=3_752).contains(&second.n),
            "{}: {} items, not 2,500",
            b.name,
            second.n
        );
    }
}

#[test]
fn items_lost_twice_go_to_on_demand_workers_while_one_is_alive() {
    for b in backends("escalate") {
        let mut s = (b.open)();
        let id = s.submit(&job("j", 20, "h"), 0, false).unwrap().id();
        described(s.as_mut(), "spot", true, 4096, 0);
        // The first items are lost with their spot worker twice: lost work never
        // uses retries (retries = 1 here), but it escalates.
        let mut now = 0;
        let mut lost = None;
        for _ in 0..2 {
            let a = s
                .claim(&offered(id, "spot", true, 4096, now))
                .unwrap()
                .unwrap();
            assert_eq!(a.span.start, 0, "{}", b.name);
            lost = Some(a.span);
            now += 20_000;
            described(s.as_mut(), "spot", true, 4096, now);
            assert_eq!(s.release(now, &[]).unwrap(), 1, "{}", b.name);
        }
        let lost = lost.unwrap();
        described(s.as_mut(), "ondemand", false, 4096, now);
        let a = s
            .claim(&offered(id, "spot", true, 4096, now))
            .unwrap()
            .unwrap();
        assert!(
            a.span.start >= lost.end,
            "{}: the spot worker leaves them",
            b.name
        );
        let o = s
            .claim(&offered(id, "ondemand", false, 4096, now))
            .unwrap()
            .unwrap();
        assert!(
            o.span.start == lost.start && o.span.end <= lost.end,
            "{}: the on-demand worker takes them",
            b.name
        );
        // Lost again, and no on-demand worker alive: the spot worker takes them.
        now += 20_000;
        described(s.as_mut(), "spot", true, 4096, now);
        s.set_worker_state("ondemand", "exited", now).unwrap();
        s.finish(
            "spot",
            now,
            &end(a.fragment, FinishOutcome::Success, a.span.end),
        )
        .unwrap();
        let released = s.release(now + 1, &["ondemand".to_string()]).unwrap();
        assert_eq!(released, 1, "{}", b.name);
        let again = s
            .claim(&offered(id, "spot", true, 4096, now + 2))
            .unwrap()
            .unwrap();
        assert_eq!(again.span.start, 0, "{}", b.name);
    }
}

#[test]
fn out_of_memory_retries_on_a_bigger_worker_and_code_errors_fail_fast() {
    let failed = |fragment, cause: &str, to| FragmentEnd {
        cause: Some(cause.into()),
        ..end(fragment, FinishOutcome::failed(), to)
    };
    for b in backends("per_cause") {
        let mut s = (b.open)();
        let mut spec = job("j", 1000, "h");
        spec.stages[0].retries = 3;
        let id = s.submit(&spec, 0, false).unwrap().id();
        described(s.as_mut(), "big", false, 8192, 0);
        let big = |now| offered(id, "big", false, 8192, now);
        // An exit code is the task's own doing: one retry, then bisection (the
        // stage allows 3 retries for other causes).
        let a = s.claim(&big(1)).unwrap().unwrap();
        assert_eq!(a.span, Span::new(0, 10), "{}", b.name);
        s.finish("big", 2, &failed(a.fragment, "exit", 10)).unwrap();
        let again = s.claim(&big(3)).unwrap().unwrap();
        assert_eq!(again.span, a.span, "{}: retried once", b.name);
        s.finish("big", 4, &failed(again.fragment, "exit", 10))
            .unwrap();
        let half = s.claim(&big(5)).unwrap().unwrap();
        assert_eq!(
            half.span,
            Span::new(0, 1),
            "{}: then the first item is probed alone",
            b.name
        );
        s.finish("big", 6, &end(half.fragment, FinishOutcome::Success, 1))
            .unwrap();
        let other = s.claim(&big(7)).unwrap().unwrap();
        assert_eq!(other.span, Span::new(1, 10), "{}", b.name);
        s.finish("big", 8, &end(other.fragment, FinishOutcome::Success, 10))
            .unwrap();
        // A signal keeps the stage's budget: the range is retried whole 3 times.
        let sig = s.claim(&big(9)).unwrap().unwrap();
        assert_eq!(sig.span, Span::new(10, 20), "{}", b.name);
        s.finish("big", 10, &failed(sig.fragment, "signal", 20))
            .unwrap();
        for attempt in 0..3 {
            let r = s.claim(&big(11)).unwrap().unwrap();
            assert_eq!(r.span, sig.span, "{}: attempt {attempt}", b.name);
            s.finish("big", 12, &failed(r.fragment, "signal", 20))
                .unwrap();
        }
        let probe = s.claim(&big(13)).unwrap().unwrap();
        assert_eq!(
            probe.span,
            Span::new(10, 11),
            "{}: bisected at last",
            b.name
        );
        s.finish("big", 14, &end(probe.fragment, FinishOutcome::Success, 11))
            .unwrap();

        // Out of memory on a small worker: the items wait for a bigger one while
        // one is alive.
        described(s.as_mut(), "small", false, 1024, 20);
        let small = |now| offered(id, "small", false, 1024, now);
        let rest = s.claim(&small(21)).unwrap().unwrap();
        assert_eq!(rest.span.start, 11, "{}", b.name);
        s.finish("small", 22, &failed(rest.fragment, "oom", rest.span.end))
            .unwrap();
        let next = s.claim(&small(23)).unwrap().unwrap();
        assert!(
            next.span.start >= rest.span.end,
            "{}: left for the big worker",
            b.name
        );
        let taken = s.claim(&big(24)).unwrap().unwrap();
        assert_eq!(taken.span.start, rest.span.start, "{}", b.name);
    }
}

#[test]
fn lost_workers_make_the_pool_history_and_cap_fragments_that_cannot_keep_partial_work() {
    for b in backends("forecast") {
        let mut s = (b.open)();
        let id = s
            .submit(&job("quiet", 1_000_000, "h"), 0, false)
            .unwrap()
            .id();
        let talks = s
            .submit(&job("talks", 1_000_000, "h"), 0, false)
            .unwrap()
            .id();
        described(s.as_mut(), "w", true, 4096, 0);
        // Teach both stages a model (1 ms per item, 10 ms overhead); "quiet" never
        // acks (a preemption loses its fragments whole), "talks" does.
        learn(s.as_mut(), id, "w", "default", 1.0, false);
        learn(s.as_mut(), talks, "w", "default", 1.0, true);
        let sized = |s: &mut Box<dyn Store>, job, life: Option<f64>| {
            let mut req = offered(job, "w", true, 4096, 3);
            req.max_items = None;
            req.expected_life_ms = life;
            let a = s.claim(&req).unwrap().unwrap();
            s.finish("w", 4, &end(a.fragment, FinishOutcome::Success, a.span.end))
                .unwrap();
            a.n
        };
        let free = sized(&mut s, id, None);
        let capped = sized(&mut s, id, Some(2_000.0));
        assert!(capped * 4 < free, "{}: {capped} vs {free}", b.name);
        assert!(
            capped <= 200,
            "{}: Young's sqrt(2 x 10 ms x 2 s) = 200 ms at 1 ms per item: {capped}",
            b.name
        );
        // A stage whose tasks ack keeps its work across a preemption: no cap.
        let acking = sized(&mut s, talks, Some(2_000.0));
        assert!(acking > 2 * capped, "{}: {acking} vs {capped}", b.name);

        // The worker is lost holding a fragment: the history records it.
        let a = s.claim(&offered(id, "w", true, 4096, 10)).unwrap().unwrap();
        assert!(a.n > 0);
        described(s.as_mut(), "w", true, 4096, 50_000); // its last heartbeat
        assert_eq!(
            s.release(100_000, &["w".to_string()]).unwrap(),
            1,
            "{}",
            b.name
        );
        let history = s.worker_history(100_000, 0).unwrap();
        assert_eq!(history.len(), 1, "{}", b.name);
        assert!(
            history[0].lost && history[0].spot,
            "{}: {history:?}",
            b.name
        );
        let pool = granule_core::forecast_pool(&history, 100_000, 100_000, 10_000, 60_000);
        assert!(pool[0].losses_per_hour > 0.0, "{}: {pool:?}", b.name);
    }
}

#[test]
fn with_a_deadline_the_dear_class_waits_until_the_cheap_one_cannot_make_it() {
    for b in backends("deadline_plan") {
        let mut s = (b.open)();
        let mut spec = job("j", 10_000, "h");
        let hour = 3_600_000i64;
        spec.stages[0].needs.deadline_ms = Some(hour as f64);
        let id = s.submit(&spec, 0, false).unwrap().id();
        let register = |s: &mut Box<dyn Store>, class: &str, cost: f64, now: i64| {
            let info = WorkerInfo {
                id: class.into(),
                host: "test".into(),
                pid: 1,
                proc_start: 1,
                slots: 1,
                class: class.into(),
                lifespan_end_ms: None,
                cost_per_hour: cost,
                spot: false,
                resources: "{}".into(),
                locality: String::new(),
                allocation: None,
            };
            s.register_worker(&info, now).unwrap();
        };
        let req = |class: &str, now: i64, n| classed(id, class, class, false, now, n);
        register(&mut s, "cheap", 0.1, 0);
        register(&mut s, "dear", 10.0, 0);
        // Each class learns its cost first (cheap: 10 ms per item, dear: 1 ms).
        learn(s.as_mut(), id, "cheap", "cheap", 10.0, false);
        learn(s.as_mut(), id, "dear", "dear", 1.0, false);
        // An hour to go: the cheap class alone makes it, the dear one is not used.
        assert!(
            s.claim(&req("dear", 3, Some(100))).unwrap().is_none(),
            "{}",
            b.name
        );
        let cheap = s.claim(&req("cheap", 3, Some(100))).unwrap().unwrap();
        s.finish(
            "cheap",
            4,
            &end(cheap.fragment, FinishOutcome::Success, cheap.span.end),
        )
        .unwrap();
        // A minute before the deadline ~9,800 items are left: ~98 s for the cheap
        // class alone. Now the dear class is planned too.
        let late = hour - 60_000;
        register(&mut s, "cheap", 0.1, late);
        register(&mut s, "dear", 10.0, late);
        let dear = s.claim(&req("dear", late, Some(100))).unwrap();
        assert!(
            dear.is_some(),
            "{}: the dear class helps to make the deadline",
            b.name
        );
    }
}

#[test]
fn an_idle_fast_worker_splits_work_stuck_on_a_slow_class_first() {
    for b in backends("split_gain") {
        let mut s = (b.open)();
        let id = s.submit(&job("j", 100_000, "h"), 0, false).unwrap().id();
        let req = |class: &str, n: u64| classed(id, class, class, false, 1, Some(n));
        for (class, per_item) in [("slow", 10.0), ("fast", 1.0)] {
            worker(s.as_mut(), class);
            learn(s.as_mut(), id, class, class, per_item, false);
        }
        // 100 items on the slow class (~1 s left), 5,000 on the fast one (~5 s).
        let stuck = s.claim(&req("slow", 100)).unwrap().unwrap();
        let long = s.claim(&req("fast", 5_000)).unwrap().unwrap();
        // An idle fast worker first frees the work that runs ten times slower
        // where it is, though the other fragment has more work left...
        assert_eq!(
            s.request_split(Some(id), 2, 10.0, "fast").unwrap(),
            Some(stuck.fragment),
            "{}",
            b.name
        );
        // ... which is what a slow worker would have taken (the one left now).
        assert_eq!(
            s.request_split(Some(id), 2, 10.0, "slow").unwrap(),
            Some(long.fragment),
            "{}",
            b.name
        );
    }
}

/// A task that exited 0 without an ack, fed up to `fed_end`.
fn silent(fragment: FragmentId, fed_end: u64, to: u64) -> FragmentEnd {
    FragmentEnd {
        outcome: FinishOutcome::AllOrNothing { fed_end },
        fed: fed_end,
        ..end(fragment, FinishOutcome::Success, to)
    }
}

/// A flush of acks of `span` with a checkpoint after them (its state: `state`).
fn checkpointed(
    fragment: FragmentId,
    span: Span,
    acked_before: Span,
    state: &str,
) -> FragmentFlush {
    // The store keeps blobs as given (sealing them is the worker's part).
    FragmentFlush {
        checkpoints: vec![NewCheckpoint {
            blob: BlobRow {
                data: state.as_bytes().to_vec(),
                raw_len: state.len() as u64,
                hash: String::new(),
                meta: "{}".into(),
            },
            acked: IntervalSet::from_span(acked_before),
        }],
        ..acks(fragment, span)
    }
}

fn heartbeat(held: &[FragmentId]) -> Heartbeat {
    Heartbeat {
        held: held.to_vec(),
        ..Heartbeat::default()
    }
}

fn set(start: u64, end: u64) -> IntervalSet {
    IntervalSet::from_span(Span::new(start, end))
}

#[test]
fn a_first_ack_reverts_what_all_or_nothing_fragments_counted_and_no_ack_fails_after() {
    for b in backends("first_ack") {
        let mut s = (b.open)();
        let id = s.submit(&job("j", 10, "h"), 0, false).unwrap().id();
        let w = worker(s.as_mut(), "w");
        let acker = claim(s.as_mut(), id, &w, 0, Some(1)).unwrap();
        let quiet = claim(s.as_mut(), id, &w, 0, Some(1)).unwrap();
        assert_eq!(quiet.span, Span::new(1, 2));
        // The quiet one exits 0 without an ack first: all or nothing, for now.
        s.finish(&w, 1, &silent(quiet.fragment, 2, 2)).unwrap();
        assert_eq!(stage(s.as_mut(), "j").done, 1, "{}", b.name);
        // Then the stage's first ack: what the quiet one counted goes back.
        let flush = acks(acker.fragment, acker.span);
        s.flush(&w, 2, 10_000, &heartbeat(&[acker.fragment]), &[flush])
            .unwrap();
        let st = stage(s.as_mut(), "j");
        assert_eq!((st.done, st.pending), (1, 9), "{}: {st:?}", b.name);
        s.finish(&w, 3, &end(acker.fragment, FinishOutcome::Success, 1))
            .unwrap();
        // From now on, exiting 0 without an ack fails the items the task was fed:
        // one retry (the task's own doing), then quarantine.
        for attempt in 0..2 {
            let a = claim(s.as_mut(), id, &w, 4, Some(1)).unwrap();
            assert_eq!(a.span, Span::new(1, 2), "{}: attempt {attempt}", b.name);
            s.finish(&w, 5, &silent(a.fragment, 2, 2)).unwrap();
        }
        let st = stage(s.as_mut(), "j");
        assert_eq!(st.quarantined_items, vec![[1, 2]], "{}: {st:?}", b.name);
        let logs = s.logs("j", "s", None).unwrap();
        assert!(
            logs.iter().any(|l| l.cause.as_deref() == Some("unacked")),
            "{}",
            b.name
        );
    }
}

#[test]
fn a_resumed_stateful_fragment_that_fails_hands_its_state_on_and_results_are_exact() {
    for b in backends("stateful_chain") {
        let mut s = (b.open)();
        let id = s.submit(&job("j", 100, "h"), 0, false).unwrap().id();
        let w = worker(s.as_mut(), "w");
        let a = claim(s.as_mut(), id, &w, 0, None).unwrap();
        assert_eq!(a.span, Span::new(0, 100));
        let first = checkpointed(a.fragment, Span::new(0, 30), Span::new(0, 30), "0..30");
        // Ten more acks after it, with no checkpoint: their state dies with the task.
        let more = acks(a.fragment, Span::new(30, 40));
        s.flush(&w, 1, 10_000, &heartbeat(&[a.fragment]), &[first, more])
            .unwrap();
        s.finish(&w, 2, &end(a.fragment, FinishOutcome::Yielded, 100))
            .unwrap();
        let st = stage(s.as_mut(), "j");
        assert_eq!((st.done, st.state_reruns), (30, 10), "{}: {st:?}", b.name);
        // The next attempt resumes from the checkpoint, then fails after acking more.
        let b2 = claim(s.as_mut(), id, &w, 3, None).unwrap();
        assert_eq!(b2.span.start, 30, "{}", b.name);
        assert!(b2.checkpoint.is_some(), "{}", b.name);
        let second = checkpointed(b2.fragment, Span::new(30, 60), Span::new(30, 60), "0..60");
        let failed = FragmentEnd {
            flush: second,
            cause: Some("exit".into()),
            ..end(
                b2.fragment,
                FinishOutcome::Failed {
                    culprits: IntervalSet::new(),
                    rest_failed: true,
                    fed_end: 70,
                },
                100,
            )
        };
        s.finish(&w, 4, &failed).unwrap();
        // The failed rest keeps the state it inherited and its own.
        let c = claim(s.as_mut(), id, &w, 5, None).unwrap();
        assert_eq!(c.span, Span::new(60, 70), "{}: the charged part", b.name);
        assert!(c.checkpoint.is_some(), "{}: the state goes on", b.name);
        let mut done = end(c.fragment, FinishOutcome::Success, c.span.end);
        done.flush = checkpointed(c.fragment, c.span, c.span, "0..70");
        s.finish(&w, 6, &done).unwrap();
        let d = claim(s.as_mut(), id, &w, 7, None).unwrap();
        assert_eq!(
            (d.span, d.checkpoint),
            (Span::new(70, 100), None),
            "{}",
            b.name
        );
        let mut done = end(d.fragment, FinishOutcome::Success, 100);
        done.flush = checkpointed(d.fragment, d.span, d.span, "70..100");
        s.finish(&w, 8, &done).unwrap();
        let results = s.results("j", "s").unwrap();
        let states: Vec<String> = results
            .iter()
            .map(|r| String::from_utf8(r.blob.data.clone()).unwrap())
            .collect();
        assert_eq!(states, ["0..70", "70..100"], "{}", b.name);
        assert_eq!(results[0].covers, set(0, 70), "{}", b.name);
        assert_eq!(results[1].covers, set(70, 100), "{}", b.name);
        let st = stage(s.as_mut(), "j");
        assert_eq!(
            (st.done, st.results_missing),
            (100, 0),
            "{}: {st:?}",
            b.name
        );
    }
}

#[test]
fn a_deleted_checkpoint_falls_back_to_the_one_before_and_reruns_what_only_it_held() {
    for b in backends("deleted_checkpoint") {
        let mut s = (b.open)();
        let id = s.submit(&job("j", 100, "h"), 0, false).unwrap().id();
        let w = worker(s.as_mut(), "w");
        let a = claim(s.as_mut(), id, &w, 0, None).unwrap();
        let one = checkpointed(a.fragment, Span::new(0, 20), Span::new(0, 20), "0..20");
        s.flush(&w, 1, 10_000, &heartbeat(&[a.fragment]), &[one])
            .unwrap();
        let two = checkpointed(a.fragment, Span::new(20, 40), Span::new(0, 40), "0..40");
        s.flush(&w, 2, 10_000, &heartbeat(&[a.fragment]), &[two])
            .unwrap();
        s.finish(&w, 3, &end(a.fragment, FinishOutcome::Yielded, 100))
            .unwrap();
        let resumed = claim(s.as_mut(), id, &w, 4, None).unwrap();
        let newest = resumed.checkpoint.expect("handed the newest state");
        (b.sql)(&format!("DELETE FROM blobs WHERE id = {newest}"));
        assert!(s.blob(newest).unwrap().is_none(), "{}", b.name);
        let older = s
            .checkpoint_before(newest)
            .unwrap()
            .expect("the one before");
        let stored = s.blob(older).unwrap().expect("it is there");
        assert_eq!(stored.covers, set(0, 20), "{}", b.name);
        // The worker restores the older one and says so: items 20..40 run again.
        let fallback = FragmentFlush {
            fragment: resumed.fragment,
            restored: Some(Some(older)),
            ..FragmentFlush::default()
        };
        s.flush(&w, 5, 10_000, &heartbeat(&[resumed.fragment]), &[fallback])
            .unwrap();
        let st = stage(s.as_mut(), "j");
        assert_eq!((st.done, st.state_reruns), (20, 20), "{}: {st:?}", b.name);
        let mut done = end(resumed.fragment, FinishOutcome::Success, 100);
        done.flush = checkpointed(
            resumed.fragment,
            resumed.span,
            resumed.span,
            "0..20+40..100",
        );
        s.finish(&w, 6, &done).unwrap();
        let rerun = claim(s.as_mut(), id, &w, 7, None).unwrap();
        assert_eq!(
            (rerun.span, rerun.checkpoint),
            (Span::new(20, 40), None),
            "{}",
            b.name
        );
        let mut done = end(rerun.fragment, FinishOutcome::Success, 40);
        done.flush = checkpointed(rerun.fragment, rerun.span, rerun.span, "20..40");
        s.finish(&w, 8, &done).unwrap();
        let mut covered = IntervalSet::new();
        for r in s.results("j", "s").unwrap() {
            assert!(
                !covered.intersects(&r.covers),
                "{}: results overlap",
                b.name
            );
            covered.union_with(&r.covers);
        }
        assert_eq!(covered, set(0, 100), "{}", b.name);
    }
}

#[test]
fn a_job_whose_stored_state_cannot_be_read_breaks_alone() {
    for b in backends("broken_job") {
        let mut s = (b.open)();
        s.submit(&job("bad", 10, "a"), 0, false).unwrap();
        let good = s.submit(&job("good", 10, "b"), 0, false).unwrap().id();
        // A number stored as null (a NaN that slipped in once) in the older job.
        (b.sql)(
            "UPDATE stages SET sizer_config = '{\"tunables\":{\"kp\":null}}'
             WHERE job_id = (SELECT id FROM jobs WHERE name = 'bad')",
        );
        let w = worker(s.as_mut(), "w");
        let mut req = offered(good, &w, false, 4096, 1);
        req.job = None;
        let a = s.claim(&req).unwrap().expect("the other job is claimed");
        assert_eq!(a.job, good, "{}", b.name);
        let jobs = s.status(None).unwrap();
        let bad = jobs.iter().find(|j| j.name == "bad").unwrap();
        assert_eq!(bad.state, "broken", "{}", b.name);
        assert!(
            bad.error.as_deref().unwrap_or("").contains("sizer config"),
            "{}: {:?}",
            b.name,
            bad.error
        );
        assert_eq!(
            jobs.iter().find(|j| j.name == "good").unwrap().stages.len(),
            1
        );
    }
}

#[test]
fn a_halted_fragment_charges_nothing_and_stops_its_job() {
    for b in backends("halt") {
        let mut s = (b.open)();
        let id = s.submit(&job("j", 100, "h"), 0, false).unwrap().id();
        let w = worker(s.as_mut(), "w");
        let a = claim(s.as_mut(), id, &w, 0, Some(10)).unwrap();
        let other = claim(s.as_mut(), id, &w, 0, Some(10)).unwrap();
        let halted = FragmentEnd {
            halt: Some(JobHalt::Refused("items file x changed".into())),
            ..end(a.fragment, FinishOutcome::Yielded, 10)
        };
        s.finish(&w, 1, &halted).unwrap();
        let record = s.job("j").unwrap().unwrap();
        assert_eq!(record.state, "refused", "{}", b.name);
        assert_eq!(record.error.as_deref(), Some("items file x changed"));
        let reply = s
            .flush(
                &w,
                2,
                10_000,
                &heartbeat(&[other.fragment]),
                &[acks(other.fragment, Span::new(10, 12))],
            )
            .unwrap();
        assert_eq!(reply.stopped, vec![other.fragment], "{}", b.name);
        let st = stage(s.as_mut(), "j");
        assert_eq!(
            (st.done, st.pending, st.running),
            (2, 98, 0),
            "{}: {st:?}",
            b.name
        );
        assert_eq!(st.failed_fragments, 0, "{}", b.name);
    }
}

#[test]
fn concurrent_submits_of_one_new_job_both_succeed_once() {
    for b in backends("submit_race") {
        let open = std::sync::Arc::new(b.open);
        for round in 0..10 {
            let name = format!("race{round}");
            let results: Vec<_> = (0..2)
                .map(|_| {
                    let (open, name) = (open.clone(), name.clone());
                    std::thread::spawn(move || open().submit(&job(&name, 10, "h"), 0, false))
                })
                .collect::<Vec<_>>()
                .into_iter()
                .map(|h| h.join().unwrap().unwrap())
                .collect();
            let created = results
                .iter()
                .filter(|r| matches!(r, Submitted::Created(_)))
                .count();
            assert_eq!(created, 1, "{}: {results:?}", b.name);
            assert_eq!(results[0].id(), results[1].id(), "{}", b.name);
            // Different specs under one name: one wins, the other is told.
            let name = format!("clash{round}");
            let outcomes: Vec<_> = ["a", "b"]
                .map(|hash| {
                    let (open, name) = (open.clone(), name.clone());
                    std::thread::spawn(move || open().submit(&job(&name, 10, hash), 0, false))
                })
                .into_iter()
                .map(|h| h.join().unwrap())
                .collect();
            let refused = outcomes
                .iter()
                .filter(|r| matches!(r, Err(StoreError::SpecChanged(_))))
                .count();
            assert_eq!(refused, 1, "{}: {outcomes:?}", b.name);
        }
    }
}

#[test]
fn the_last_fragments_of_a_stage_finish_together_without_deadlock() {
    // Each finish with acks reads the stage's flags under its row lock and the last
    // ones go on to settle the stage: two holding a shared lock that both upgrade
    // would deadlock, and PostgreSQL would abort one of them.
    for b in backends("finish_race") {
        let open = &b.open;
        for round in 0..20 {
            let name = format!("race{round}");
            let id = open().submit(&job(&name, 3, "h"), 0, false).unwrap().id();
            // A first fragment teaches the stage that its tasks ack.
            let mut s = open();
            let w = worker(s.as_mut(), &format!("w{round}"));
            let a = claim(s.as_mut(), id, &w, 0, Some(1)).unwrap();
            let first = FragmentEnd {
                flush: acks(a.fragment, a.span),
                ..FragmentEnd::success(a.fragment, a.span.end)
            };
            s.finish(&w, 1, &first).unwrap();
            let gate = std::sync::Barrier::new(2);
            let results: Vec<Result<Finished>> = std::thread::scope(|scope| {
                let handles: Vec<_> = (0..2)
                    .map(|t| {
                        let gate = &gate;
                        scope.spawn(move || {
                            let mut s = open();
                            let w = worker(s.as_mut(), &format!("w{round}-{t}"));
                            let a = claim(s.as_mut(), id, &w, 0, Some(1)).expect("an item each");
                            gate.wait();
                            let done = FragmentEnd {
                                flush: acks(a.fragment, a.span),
                                ..FragmentEnd::success(a.fragment, a.span.end)
                            };
                            s.finish(&w, 1, &done)
                        })
                    })
                    .collect();
                handles.into_iter().map(|h| h.join().unwrap()).collect()
            });
            for r in &results {
                assert!(r.is_ok(), "{} round {round}: {r:?}", b.name);
            }
            let status = open().status(Some(&name)).unwrap().remove(0);
            assert_eq!(status.state, "done", "{} round {round}", b.name);
            assert_eq!(status.stages[0].done, 3, "{} round {round}", b.name);
        }
    }
}

#[test]
fn a_confirmed_fragment_follows_its_workers_lease_and_an_exited_worker_loses_it_at_once() {
    for b in backends("worker_lease") {
        let mut s = (b.open)();
        let id = s.submit(&job("j", 20, "h"), 0, false).unwrap().id();
        let w = worker(s.as_mut(), "w");
        let a = claim(s.as_mut(), id, &w, 0, Some(10)).unwrap();
        let held = Heartbeat {
            held: vec![a.fragment],
            ..Heartbeat::default()
        };
        // Listed once half its claim lease is spent, it is confirmed: it lives as long as
        // its worker heartbeats (now until 24 s), listed or not.
        s.flush(&w, 6_000, 10_000, &held, &[]).unwrap();
        s.flush(&w, 14_000, 10_000, &Heartbeat::default(), &[])
            .unwrap();
        assert_eq!(s.release(20_000, &[]).unwrap(), 0, "{}", b.name);
        assert_eq!(
            s.release(24_001, &[]).unwrap(),
            1,
            "{}: the worker went silent",
            b.name
        );
        // A worker that says it has exited loses what it still held at once.
        let c = claim(s.as_mut(), id, &w, 24_002, Some(10)).unwrap();
        let held = Heartbeat {
            held: vec![c.fragment],
            ..Heartbeat::default()
        };
        s.flush(&w, 29_100, 10_000, &held, &[]).unwrap();
        s.set_worker_state(&w, "exited", 29_101).unwrap();
        assert_eq!(s.release(29_102, &[]).unwrap(), 1, "{}", b.name);
    }
}

#[test]
fn a_heartbeat_and_a_finish_write_as_many_rows_with_2_or_32_fragments_running() {
    let dir = tempfile::tempdir().unwrap();
    let mut s = SqliteStore::open(&dir.path().join("granule.db")).unwrap();
    let id = s.submit(&job("j", 1000, "h"), 0, false).unwrap().id();
    let w = worker(&mut s, "w");
    let mut rows = Vec::new();
    for running in [2, 32] {
        let held: Vec<Assignment> = (0..running)
            .map(|_| claim(&mut s, id, &w, 0, Some(1)).unwrap())
            .collect();
        let hb = Heartbeat {
            held: held.iter().map(|a| a.fragment).collect(),
            ..Heartbeat::default()
        };
        // Half their claim lease spent, each is confirmed (once); from then on a
        // heartbeat writes its worker's row only.
        s.flush(&w, 6_000, 10_000, &hb, &[]).unwrap();
        let before = s.write_counts().unwrap();
        for now in 6_001..6_011 {
            s.flush(&w, now, 10_000, &hb, &[]).unwrap();
        }
        let first = &held[0];
        s.finish(
            &w,
            6_011,
            &end(first.fragment, FinishOutcome::Success, first.span.end),
        )
        .unwrap();
        let after = s.write_counts().unwrap();
        rows.push((
            (after.flush_rows - before.flush_rows) as f64 / 10.0,
            after.finish_rows - before.finish_rows,
        ));
        for a in &held[1..] {
            s.finish(
                &w,
                6_012,
                &end(a.fragment, FinishOutcome::Success, a.span.end),
            )
            .unwrap();
        }
    }
    assert_eq!(
        rows[0].0, 1.0,
        "a heartbeat writes its worker's row: {rows:?}"
    );
    assert_eq!(
        rows[0], rows[1],
        "rows per flush and per finish at 2 and 32 running"
    );
}

#[test]
fn free_slots_are_claimed_in_one_transaction_each_offered_what_the_others_left() {
    for b in backends("claim_many") {
        let mut s = (b.open)();
        let mut spec = job("j", 100, "h");
        spec.stages[0].needs.cpus = 1.0;
        let id = s.submit(&spec, 0, false).unwrap().id();
        described(s.as_mut(), "w", false, 4096, 0);
        let mut req = offered(id, "w", false, 4096, 0);
        req.offer.cpus = 3.0;
        // Four slots free, but CPUs for three fragments: three claims, disjoint.
        let batch = s.claim_many(&req, 4).unwrap();
        assert_eq!(batch.len(), 3, "{}: {batch:?}", b.name);
        let mut spans: Vec<Span> = batch.iter().map(|a| a.span).collect();
        spans.sort_by_key(|sp| sp.start);
        assert!(
            spans.windows(2).all(|w| w[0].end <= w[1].start),
            "{}: {spans:?}",
            b.name
        );
        assert_eq!(stage(s.as_mut(), "j").running_fragments, 3, "{}", b.name);
    }
    // On SQLite the batch was one claim transaction.
    let dir = tempfile::tempdir().unwrap();
    let mut s = SqliteStore::open(&dir.path().join("granule.db")).unwrap();
    let id = s.submit(&job("j", 100, "h"), 0, false).unwrap().id();
    described(&mut s, "w", false, 4096, 0);
    assert_eq!(
        s.claim_many(&offered(id, "w", false, 4096, 0), 8)
            .unwrap()
            .len(),
        8
    );
    assert_eq!(s.write_counts().unwrap().claims, 1);
}

/// The finish that frees a slot claims its next fragment in the same transaction:
/// the finished items count, the new fragment is disjoint, and once nothing is left
/// the finish claims nothing and ends the job.
#[test]
fn a_finish_claims_the_next_fragment_in_the_same_transaction() {
    for b in backends("finish_and_claim") {
        let mut s = (b.open)();
        let id = s.submit(&job("j", 20, "h"), 0, false).unwrap().id();
        described(s.as_mut(), "w", false, 4096, 0);
        let req = offered(id, "w", false, 4096, 0);
        let mut a = s.claim(&req).unwrap().expect("work");
        let mut seen = vec![a.span];
        loop {
            let end = FragmentEnd::success(a.fragment, a.span.end);
            let (finished, next) = s.finish_and_claim("w", 1, &end, Some((&req, 1))).unwrap();
            assert!(finished.accepted, "{}", b.name);
            let Some(n) = next.into_iter().next() else {
                assert!(
                    finished.job_finished,
                    "{}: the last finish ends the job",
                    b.name
                );
                break;
            };
            seen.push(n.span);
            a = n;
        }
        seen.sort_by_key(|sp| sp.start);
        let covered: u64 = seen.iter().map(|sp| sp.len()).sum();
        assert_eq!(covered, 20, "{}: {seen:?}", b.name);
        assert!(
            seen.windows(2).all(|w| w[0].end <= w[1].start),
            "{}: {seen:?}",
            b.name
        );
        assert_eq!(stage(s.as_mut(), "j").done, 20, "{}", b.name);
    }
    // On SQLite the finish and the claim were one transaction: no claim counted apart.
    let dir = tempfile::tempdir().unwrap();
    let mut s = SqliteStore::open(&dir.path().join("granule.db")).unwrap();
    let id = s.submit(&job("j", 100, "h"), 0, false).unwrap().id();
    described(&mut s, "w", false, 4096, 0);
    let req = offered(id, "w", false, 4096, 0);
    let a = s.claim(&req).unwrap().expect("work");
    let end = FragmentEnd::success(a.fragment, a.span.end);
    let (_, next) = s.finish_and_claim("w", 1, &end, Some((&req, 1))).unwrap();
    assert_eq!(next.len(), 1);
    let w = s.write_counts().unwrap();
    assert_eq!((w.claims, w.finishes), (1, 1));
}

/// A worker's flush lists every fragment it runs, most with nothing new: those
/// write nothing, so the flush writes its worker's row alone with 2 or 32 running.
#[test]
fn a_flush_of_fragments_with_nothing_new_writes_only_the_worker_row() {
    let dir = tempfile::tempdir().unwrap();
    let mut s = SqliteStore::open(&dir.path().join("granule.db")).unwrap();
    let id = s.submit(&job("j", 1000, "h"), 0, false).unwrap().id();
    let w = worker(&mut s, "w");
    for running in [2, 32] {
        let held: Vec<Assignment> = (0..running)
            .map(|_| claim(&mut s, id, &w, 0, Some(1)).unwrap())
            .collect();
        let batch: Vec<FragmentFlush> = held
            .iter()
            .map(|a| FragmentFlush {
                fragment: a.fragment,
                ..FragmentFlush::default()
            })
            .collect();
        let before = s.write_counts().unwrap();
        s.flush(&w, 1_000, 10_000, &Heartbeat::default(), &batch)
            .unwrap();
        let after = s.write_counts().unwrap();
        assert_eq!(after.flush_rows - before.flush_rows, 1, "{running} running");
        for a in &held {
            s.finish(
                &w,
                1_001,
                &end(a.fragment, FinishOutcome::Success, a.span.end),
            )
            .unwrap();
        }
    }
}

/// Two last finishers of a stage can each see the other still running (each counts
/// before the other commits); the stage is then left running with nothing pending
/// or running. The next release (every worker runs one periodically) settles it.
#[test]
fn a_stage_left_running_with_nothing_to_do_is_settled_by_the_next_release() {
    for b in backends("stranded_stage") {
        let mut s = (b.open)();
        let id = s.submit(&job("j", 10, "h"), 0, false).unwrap().id();
        let w = worker(s.as_mut(), "w");
        let a = claim(s.as_mut(), id, &w, 0, None).unwrap();
        let done = s
            .finish(&w, 1, &end(a.fragment, FinishOutcome::Success, a.span.end))
            .unwrap();
        assert!(done.job_finished, "{}", b.name);
        // What the race leaves: every item done, the stage and its job still running.
        (b.sql)("UPDATE stages SET state = 'running'; UPDATE jobs SET state = 'running'");
        assert_eq!(s.job("j").unwrap().unwrap().state, "running", "{}", b.name);
        assert_eq!(s.release(2, &[]).unwrap(), 0, "{}", b.name);
        assert_eq!(s.job("j").unwrap().unwrap().state, "done", "{}", b.name);
        assert_eq!(stage(s.as_mut(), "j").done, 10, "{}", b.name);
    }
}

/// A link to PostgreSQL cut while a statement waits (a restart, a failover, a dead
/// router) fails that call at once, and a later call reconnects: a worker never hangs
/// on a connection that is gone. The store reaches the server through a relay that
/// the test cuts.
#[test]
fn a_connection_cut_mid_statement_fails_the_call_and_a_later_one_reconnects() {
    use std::net::{Shutdown, TcpListener, TcpStream};
    use std::sync::{Arc, Mutex};
    use std::time::{Duration, Instant};
    let Some(db) = TestDatabase::create("cut_mid_statement") else {
        return;
    };
    // A relay from a local port to the server; it keeps its sockets so it can cut them.
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    let server = db
        .url
        .split('@')
        .nth(1)
        .unwrap()
        .split('/')
        .next()
        .unwrap()
        .to_string();
    let links: Arc<Mutex<Vec<TcpStream>>> = Arc::default();
    let (kept, upstream_at) = (links.clone(), server.clone());
    std::thread::spawn(move || {
        for client in listener.incoming() {
            let client = client.unwrap();
            let upstream = TcpStream::connect(&upstream_at).unwrap();
            for (mut from, mut to) in [
                (client.try_clone().unwrap(), upstream.try_clone().unwrap()),
                (upstream.try_clone().unwrap(), client.try_clone().unwrap()),
            ] {
                std::thread::spawn(move || std::io::copy(&mut from, &mut to));
            }
            kept.lock().unwrap().extend([client, upstream]);
        }
    });
    let relayed = db.url.replacen(&server, &format!("127.0.0.1:{port}"), 1);
    let mut s = PgStore::open(&relayed).unwrap();
    s.submit(&job("j", 10, "h"), 0, false).unwrap();
    let connect = || postgres::Client::connect(&db.url, postgres::NoTls).unwrap();
    let (mut holder, mut watcher) = (connect(), connect());
    let mut lock = holder.transaction().unwrap();
    lock.batch_execute("LOCK TABLE jobs IN ACCESS EXCLUSIVE MODE")
        .unwrap();
    let (done, ended) = std::sync::mpsc::channel();
    let call = std::thread::spawn(move || {
        let failed = s.status(None).is_err();
        done.send(failed).unwrap();
        s
    });
    let waiting = "SELECT 1 FROM pg_stat_activity WHERE application_name = 'granule'
                   AND datname = current_database() AND wait_event_type = 'Lock'";
    let deadline = Instant::now() + Duration::from_secs(60);
    while watcher.query(waiting, &[]).unwrap().is_empty() {
        assert!(
            Instant::now() < deadline,
            "the store's call never waited on the lock"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    for link in links.lock().unwrap().drain(..) {
        let _ = link.shutdown(Shutdown::Both);
    }
    let failed = ended
        .recv_timeout(Duration::from_secs(60))
        .expect("the call hangs on a connection that is gone");
    assert!(failed, "a call whose connection was cut must fail");
    lock.rollback().unwrap();
    let mut s = call.join().unwrap();
    let deadline = Instant::now() + Duration::from_secs(60);
    while s.status(None).is_err() {
        assert!(Instant::now() < deadline, "the store never reconnected");
        std::thread::sleep(Duration::from_millis(50));
    }
}

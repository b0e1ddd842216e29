//! The event loop: workers arrive, claim fragments sized by the core's sizer for
//! the stage the core's planner picks, run them in virtual time, and end by
//! finishing, being preempted (with or without notice) or running out of life.

use crate::pool::{Ending, Life, Lives};
use crate::scenario::Scenario;
use granule_core::fair::{self, OwnerKey, Standing, UsageLedger, DEFAULT_SHARES};
use granule_core::{
    absolute_errors, claim_context, fits, median_p90, placement_order, size_with_unrun,
    split_share, unrun_estimate, Admission, ClaimContext, FinishOutcome, FragmentId, Holt,
    IntervalSet, Observation, SizeCap, Sizer, SizerConfig, Span, StageLedger, StageNeeds,
    StageView, WorkerOffer,
};
use granule_core::{scale, spare, to_start, PoolView, StageDemand};
use rand::rngs::SmallRng;
use rand::SeedableRng;
use rand_distr::{Distribution, LogNormal, StandardNormal};
use serde::Serialize;
use std::cmp::Reverse;
use std::collections::{BTreeMap, BTreeSet, BinaryHeap};

/// Which placement to simulate.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Policy {
    /// granule's planner: cost plan, priority, fairness, comparative advantage,
    /// critical path; idle workers leave after `idle_exit`.
    Granule,
    /// Class-blind first-in-first-out: the first ready stage that fits (required
    /// classes and resources are still honoured). Same sizer, same parking.
    Fifo,
    /// FIFO placement, and each slot takes `items / slots` at once (static chunking;
    /// with items of equal expected cost, the oracle's equal share).
    Static,
    /// FIFO placement, one item per fragment (self-scheduling).
    SelfScheduling,
    /// FIFO placement, `ceil(remaining / slots)` per fragment (guided self-scheduling,
    /// Polychronopoulos & Kuck 1987).
    Guided,
    /// FIFO placement, batches of `slots` fragments that each take
    /// `ceil(remaining / (2 · slots))` (factoring, Hummel, Schonberg & Flynn 1992).
    Factoring,
}

impl Policy {
    /// Every policy, granule first.
    pub const ALL: [Policy; 6] = [
        Policy::Granule,
        Policy::Fifo,
        Policy::Static,
        Policy::SelfScheduling,
        Policy::Guided,
        Policy::Factoring,
    ];

    /// Whether placement is granule's (else class-blind FIFO).
    fn plans(self) -> bool {
        self == Policy::Granule
    }

    /// A loop-scheduling baseline's fragment size, or `None` where the sizer decides.
    /// `total` and `remaining` are the stage's items and its unclaimed ones, `slots`
    /// the slots alive, `batch` the stage's factoring batch (chunk size, chunks left).
    fn chunk(self, total: u64, remaining: u64, slots: u64, batch: &mut (u64, u64)) -> Option<u64> {
        let slots = slots.max(1);
        match self {
            Policy::Granule | Policy::Fifo => None,
            Policy::Static => Some(total.div_ceil(slots)),
            Policy::SelfScheduling => Some(1),
            Policy::Guided => Some(remaining.div_ceil(slots)),
            Policy::Factoring => {
                if batch.1 == 0 {
                    *batch = (remaining.div_ceil(2 * slots), slots);
                }
                batch.1 -= 1;
                Some(batch.0)
            }
        }
        .map(|n| n.max(1))
    }
}

/// One fragment as the trace records it.
#[derive(Clone, Debug, Serialize)]
pub struct TraceRow {
    /// Stage name.
    pub stage: String,
    /// Class of the worker that ran it.
    pub class: String,
    /// Worker number.
    pub worker: usize,
    /// Claimed at, virtual ms.
    pub start_ms: f64,
    /// Ended at, virtual ms.
    pub end_ms: f64,
    /// Items claimed.
    pub items: u64,
    /// Items that ended done.
    pub done: u64,
    /// Predicted duration, ms.
    pub predicted_ms: f64,
    /// `done`, `yielded` (notice or lifespan) or `lost` (killed).
    pub outcome: &'static str,
}

/// Per-class figures of a run.
#[derive(Clone, Debug, Default, Serialize)]
pub struct ClassReport {
    /// Class name.
    pub name: String,
    /// Slot-time paid for, ms.
    pub alive_slot_ms: f64,
    /// Slot-time spent running fragments, ms.
    pub busy_slot_ms: f64,
    /// `busy / alive`.
    pub utilization: f64,
    /// What the class cost.
    pub cost: f64,
    /// Items it finished.
    pub items: u64,
    /// Preemptions suffered.
    pub preemptions: u64,
}

/// Per-stage figures of a run.
#[derive(Clone, Debug, Default, Serialize)]
pub struct StageReport {
    /// Stage name.
    pub name: String,
    /// When its last item was done, virtual ms.
    pub done_ms: Option<f64>,
    /// Fragments run.
    pub fragments: u64,
    /// Items done, as the stage's ledger counts them (each exactly once).
    pub done: u64,
    /// Items done per class (in class order).
    pub items_by_class: Vec<u64>,
    /// Median absolute percentage error of fragment durations after the first 20.
    pub error_median: Option<f64>,
    /// 90th percentile of the same.
    pub error_p90: Option<f64>,
}

/// What a simulation run measured.
#[derive(Clone, Debug, Serialize)]
pub struct Report {
    /// Scenario name.
    pub scenario: String,
    /// Placement simulated.
    pub policy: Policy,
    /// Seed used.
    pub seed: u64,
    /// Whether every item was done before the horizon.
    pub finished: bool,
    /// When the last item was done, virtual ms.
    pub makespan_ms: f64,
    /// No placement can finish sooner (see `bound`); filled by `lib::run`.
    pub lower_bound_ms: f64,
    /// Total paid for workers.
    pub cost: f64,
    /// Item-time run and then lost (preemptions, lifespans), ms.
    pub wasted_ms: f64,
    /// Item-time of items done, ms.
    pub useful_ms: f64,
    /// Fragments run.
    pub fragments: u64,
    /// Median absolute percentage error of all fragment durations past warm-up.
    pub error_median: Option<f64>,
    /// 90th percentile of the same.
    pub error_p90: Option<f64>,
    /// Per class.
    pub classes: Vec<ClassReport>,
    /// Per stage.
    pub stages: Vec<StageReport>,
    /// Per owner: fair share across jobs.
    pub owners: Vec<OwnerReport>,
    /// Median duration of a fragment, ms (what starvation is judged against).
    pub fragment_median_ms: f64,
}

/// One owner's fair share in a simulation.
#[derive(Clone, Debug, Serialize)]
pub struct OwnerReport {
    /// The owner (`None`: stages without one).
    pub owner: Option<String>,
    /// Its account.
    pub account: Option<String>,
    /// Its shares.
    pub shares: f64,
    /// Its entitlement while every owner has work: its shares over all owners'
    /// (accounts first), computed from the scenario alone.
    pub entitlement: f64,
    /// Its share of busy slot-time while every owner had work (from the last
    /// submission to the first owner's end); `None` if there was no such time.
    pub share_all_active: Option<f64>,
    /// Slot-time it used, ms.
    pub busy_ms: f64,
    /// The longest time it had ready work waiting and nothing running, ms.
    pub longest_starved_ms: f64,
    /// Its share of busy slot-time per `OWNER_BUCKET_MS` of virtual time.
    pub over_time: Vec<f64>,
}

/// Width of the time buckets of `OwnerReport::over_time`, ms.
pub const OWNER_BUCKET_MS: f64 = 60_000.0;

/// Fragments of at most this many items have their items' costs drawn one by one.
const EXACT_SUM: u64 = 256;

#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
enum Event {
    /// The planner's periodic look.
    Tick,
    /// A worker's life begins.
    Arrive(usize),
    /// A fragment ends on its own.
    Done(usize, usize, FragmentId),
    /// A worker is told its life ends soon: it yields and stops claiming.
    Notice(usize),
    /// A worker's life ends.
    End(usize),
    /// A worker idle since the given µs may leave.
    IdleCheck(usize, u64),
    /// The lease of a fragment whose worker was killed (by index in `lapsed`)
    /// expires: its work goes back.
    Expire(usize),
    /// A stage's job is submitted (its `submit_at`).
    Submit(usize),
}

struct Running {
    id: FragmentId,
    stage: usize,
    span: Span,
    start: f64,
    /// Mean cost of its items as drawn, ms.
    item_ms: f64,
    overhead_ms: f64,
    duration: f64,
    predicted: f64,
    sized_by_model: bool,
    /// Items it runs before it ends: fewer than its span where an elastic end
    /// (`Sizing::feed_for_ms`) or a split cuts it; the rest is handed back.
    runs: u64,
}

struct Worker {
    class: usize,
    /// Position in its class (which stream of lives it follows).
    position: u32,
    life: Life,
    slots: Vec<Option<Running>>,
    draining: bool,
    gone: bool,
    idle_since: Option<f64>,
}

struct Stage {
    needs: StageNeeds,
    config: SizerConfig,
    after: Vec<usize>,
    ledger: StageLedger,
    /// Sizer per class.
    sizers: Vec<Sizer>,
    running: u64,
    /// Items inside running fragments.
    running_items: u64,
    /// When each running fragment started and its predicted duration, ms: what
    /// a claim judges its unrun items by (`unrun_estimate`), as the stores do.
    clocks: std::collections::HashMap<FragmentId, (f64, f64)>,
    done_ms: Option<f64>,
    fragments: u64,
    items_by_class: Vec<u64>,
    /// Predicted and observed durations of its finished fragments, in order.
    durations: Vec<(f64, f64)>,
    /// The factoring baseline's batch: chunk size and chunks left in it.
    batch: (u64, u64),
    /// When its job is submitted, virtual ms.
    submit_at: f64,
}

struct Sim<'a> {
    sc: &'a Scenario,
    policy: Policy,
    now: f64,
    seq: u64,
    events: BinaryHeap<Reverse<(u64, u64, Event)>>,
    workers: Vec<Worker>,
    lives: Vec<Vec<Lives>>,
    stages: Vec<Stage>,
    idle: BTreeSet<usize>,
    rng: SmallRng,
    next_fragment: i64,
    /// Alive slots per class now, and their forecasts.
    alive_slots: Vec<f64>,
    forecast: Vec<Holt>,
    /// Preemptions per class since the last tick, and the forecast of each class's
    /// preemption rate per worker-ms.
    preempted: Vec<f64>,
    preempt_rate: Vec<Holt>,
    classes: Vec<ClassReport>,
    wasted_ms: f64,
    useful_ms: f64,
    fragments: u64,
    stages_left: usize,
    trace: Option<&'a mut dyn FnMut(&TraceRow)>,
    /// Fragments of killed workers waiting for their lease to expire: worker,
    /// fragment, items kept, when it was killed.
    lapsed: Vec<Option<(usize, Running, u64, f64)>>,
    offers: Vec<WorkerOffer>,
    /// The class plan: `plan[stage][class]`.
    plan: Vec<Vec<bool>>,
    /// Slots of each class the plan wants busy (the others idle, then leave).
    wanted: Vec<f64>,
    /// Slots of each class running a fragment now.
    busy: Vec<u32>,
    /// Workers that left because the plan did not need them, by class: the plan
    /// may call them back (a new worker starts `replace_after` later).
    parked: Vec<Vec<(u32, Life)>>,
    /// Slots of each class on their way (arrival scheduled).
    arriving: Vec<f64>,
    /// Recent usage per owner and account, for fair share.
    usage: UsageLedger,
    /// Per owner: busy slot-ms per `OWNER_BUCKET_MS`, when it began to wait with
    /// nothing running, and the longest such wait.
    owners: BTreeMap<OwnerKey, OwnerTrack>,
}

/// What the simulation tracks of one owner.
#[derive(Default)]
struct OwnerTrack {
    buckets: Vec<f64>,
    starving_since: Option<f64>,
    longest_starved: f64,
}

/// The scenario's stages, each with a fresh ledger and a sizer per class.
fn stages_of(sc: &Scenario) -> Vec<Stage> {
    let index = |name: &str| {
        sc.stages
            .iter()
            .position(|s| s.name == name)
            .expect("checked")
    };
    sc.stages
        .iter()
        .map(|st| Stage {
            needs: StageNeeds {
                class: st.class.clone(),
                class_required: st.class_required,
                priority: st.priority,
                owner: st.owner.clone(),
                account: st.account.clone(),
                ..StageNeeds::default()
            },
            config: SizerConfig {
                target_ms: st.target,
                ..SizerConfig::default()
            },
            after: st.after.iter().map(|a| index(a)).collect(),
            ledger: StageLedger::new(st.items),
            sizers: vec![Sizer::default(); sc.classes.len()],
            running: 0,
            running_items: 0,
            clocks: Default::default(),
            done_ms: None,
            fragments: 0,
            items_by_class: vec![0; sc.classes.len()],
            durations: Vec::new(),
            batch: (0, 0),
            submit_at: st.submit_at,
        })
        .collect()
}

/// Runs `sc` under `policy`; every fragment goes to `trace` if given.
pub fn simulate<'a>(
    sc: &'a Scenario,
    policy: Policy,
    trace: Option<&'a mut dyn FnMut(&TraceRow)>,
) -> Report {
    let stages = stages_of(sc);
    let mut sim = Sim {
        sc,
        policy,
        now: 0.0,
        seq: 0,
        events: BinaryHeap::new(),
        workers: Vec::new(),
        lives: sc
            .classes
            .iter()
            .enumerate()
            .map(|(c, class)| {
                (0..class.count)
                    .map(|i| Lives::new(sc, c, class, i))
                    .collect()
            })
            .collect(),
        stages,
        idle: BTreeSet::new(),
        rng: SmallRng::seed_from_u64(sc.seed.wrapping_add(0x5EED)),
        next_fragment: 1,
        alive_slots: vec![0.0; sc.classes.len()],
        forecast: vec![Holt::default(); sc.classes.len()],
        preempted: vec![0.0; sc.classes.len()],
        preempt_rate: vec![Holt::default(); sc.classes.len()],
        classes: class_reports(sc),
        wasted_ms: 0.0,
        useful_ms: 0.0,
        fragments: 0,
        stages_left: sc.stages.len(),
        trace,
        lapsed: Vec::new(),
        offers: offers(sc),
        plan: vec![vec![true; sc.classes.len()]; sc.stages.len()],
        wanted: vec![f64::INFINITY; sc.classes.len()],
        busy: vec![0; sc.classes.len()],
        parked: vec![Vec::new(); sc.classes.len()],
        arriving: vec![0.0; sc.classes.len()],
        usage: UsageLedger::default(),
        owners: sc
            .stages
            .iter()
            .map(|st| {
                (
                    (st.account.clone(), st.owner.clone()),
                    OwnerTrack::default(),
                )
            })
            .collect(),
    };
    for (s, st) in sc.stages.iter().enumerate() {
        if st.submit_at > 0.0 {
            sim.at(st.submit_at, Event::Submit(s));
        }
    }
    for (c, class) in sc.classes.iter().enumerate() {
        for i in 0..class.count {
            if class.autoscale {
                sim.park(c, i);
            } else {
                sim.next_life(c, i);
            }
        }
    }
    sim.at(0.0, Event::Tick);
    sim.run();
    sim.report()
}

/// An empty report per class.
fn class_reports(sc: &Scenario) -> Vec<ClassReport> {
    sc.classes
        .iter()
        .map(|c| ClassReport {
            name: c.name.clone(),
            ..ClassReport::default()
        })
        .collect()
}

/// What a worker of each class offers to stages.
fn offers(sc: &Scenario) -> Vec<WorkerOffer> {
    sc.classes
        .iter()
        .map(|c| WorkerOffer {
            class: c.name.clone(),
            slots: c.slots,
            cpus: f64::from(c.slots),
            ..WorkerOffer::default()
        })
        .collect()
}

fn micros(ms: f64) -> u64 {
    (ms * 1000.0).round().max(0.0) as u64
}

impl Sim<'_> {
    fn at(&mut self, ms: f64, event: Event) {
        self.seq += 1;
        self.events.push(Reverse((micros(ms), self.seq, event)));
    }

    /// Schedules the next life of a worker position, if it has one.
    fn next_life(&mut self, class: usize, position: u32) {
        let Some(life) = self.lives[class][position as usize].next() else {
            return;
        };
        self.start_life(class, position, life);
    }

    fn start_life(&mut self, class: usize, position: u32, life: Life) {
        self.arriving[class] += f64::from(self.sc.classes[class].slots);
        let w = self.workers.len();
        self.workers.push(Worker {
            class,
            position,
            life,
            slots: (0..self.sc.classes[class].slots).map(|_| None).collect(),
            draining: false,
            gone: true,
            idle_since: None,
        });
        self.at(life.start, Event::Arrive(w));
    }

    fn run(&mut self) {
        while self.stages_left > 0 {
            let Some(Reverse((t, _, event))) = self.events.pop() else {
                break;
            };
            if t as f64 / 1000.0 > self.sc.horizon {
                break;
            }
            self.now = t as f64 / 1000.0;
            match event {
                Event::Tick => self.tick(),
                Event::Arrive(w) => self.arrive(w),
                Event::Done(w, slot, id) => self.done(w, slot, id),
                Event::Notice(w) => self.notice(w),
                Event::End(w) => self.end(w),
                Event::IdleCheck(w, since) => self.idle_check(w, since),
                Event::Expire(i) => self.expire(i),
                Event::Submit(_) => {
                    self.replan();
                    self.watch_owners();
                    self.wake_idle();
                }
            }
        }
        // Whoever is still here stops being paid for now.
        for w in 0..self.workers.len() {
            if !self.workers[w].gone {
                self.leave(w);
            }
        }
    }

    fn tick(&mut self) {
        for c in 0..self.alive_slots.len() {
            self.forecast[c].observe(self.alive_slots[c]);
            let workers = self.alive_slots[c] / f64::from(self.sc.classes[c].slots);
            let rate = self.preempted[c] / (workers.max(1.0) * self.sc.plan_every);
            self.preempt_rate[c].observe(rate);
            self.preempted[c] = 0.0;
        }
        // Every policy gets the same parking: workers the plan does not need leave
        // and are called back (only granule's placement also follows the plan).
        self.replan();
        self.unpark();
        // Shadow re-evaluation: plans change as deadlines near and capacity moves.
        self.wake_idle();
        self.at(self.now + self.sc.plan_every, Event::Tick);
    }

    fn arrive(&mut self, w: usize) {
        let (class, life) = (self.workers[w].class, self.workers[w].life);
        self.workers[w].gone = false;
        self.arriving[class] -= f64::from(self.sc.classes[class].slots);
        self.alive_slots[class] += f64::from(self.sc.classes[class].slots);
        self.classes[class].alive_slot_ms -= self.now * f64::from(self.sc.classes[class].slots);
        let spec = &self.sc.classes[class];
        match life.ending {
            Ending::Never => {}
            Ending::Preempted => {
                if spec.notice > 0.0 {
                    self.at((life.end - spec.notice).max(life.start), Event::Notice(w));
                }
                self.at(life.end, Event::End(w));
            }
            Ending::Lifespan => {
                // The worker drains a little before its end, as `--lifespan` does.
                self.at(life.end - drain_margin(&life), Event::Notice(w));
                self.at(life.end, Event::End(w));
            }
        }
        self.fill(w);
    }

    /// Stops paying for a worker.
    fn leave(&mut self, w: usize) {
        let class = self.workers[w].class;
        let slots = f64::from(self.sc.classes[class].slots);
        self.workers[w].gone = true;
        self.idle.remove(&w);
        self.alive_slots[class] -= slots;
        self.classes[class].alive_slot_ms += self.now * slots;
    }

    fn done(&mut self, w: usize, slot: usize, id: FragmentId) {
        let matches = self.workers[w].slots[slot]
            .as_ref()
            .is_some_and(|r| r.id == id);
        if !matches || self.workers[w].gone {
            return;
        }
        let mut r = self.workers[w].slots[slot].take().expect("running");
        if r.runs < r.span.len() {
            // Fed up to `runs` (an elastic end): the unfed tail goes back to pending.
            let at = r.span.start + r.runs;
            Self::hand_back(&mut self.stages[r.stage], &mut r, at);
            self.wake_idle();
        }
        self.close(w, &r, r.span.len(), FinishOutcome::Success);
        self.fill(w);
    }

    /// Whether granule's idle slots split running fragments here, and so whether
    /// fragments of acking tasks are elastic: in pools of one class, or where classes
    /// differ only in speed (no stage favours a class: a split moves work to whoever
    /// is idle, as `granule worker` does). Where a stage favours a class, elastic
    /// fragments and splits had CPUs run a quarter of the mixed test pool's inference
    /// (under a tenth without), which GPUs run 20x faster: a placement problem not yet
    /// solved, so the simulator sizes at the claim there.
    fn splits(&self) -> bool {
        self.policy == Policy::Granule
            && (self.sc.classes.len() == 1 || self.sc.stages.iter().all(|s| s.speed.is_empty()))
    }

    /// An idle slot of worker `w` splits the running fragment of granule's with the
    /// most work left, as `granule worker` does (steal): the owner keeps its
    /// `split_share` of what it has not run, the tail goes back to pending. Only for
    /// stages whose tasks ack, and only where 4 overheads of work or more are left.
    fn steal(&mut self, w: usize) -> bool {
        let mut best: Option<(f64, usize, usize)> = None;
        let stages = self.candidates_for(w, false);
        let allowed = |s: usize| self.sc.stages[s].acks && stages.contains(&s);
        for (ow, worker) in self.workers.iter().enumerate() {
            if worker.gone || worker.draining {
                continue;
            }
            for (slot, r) in worker.slots.iter().enumerate() {
                let Some(r) = r else { continue };
                if !allowed(r.stage) {
                    continue;
                }
                let left_ms = r.start + r.duration - self.now;
                if left_ms >= 4.0 * r.overhead_ms && best.is_none_or(|(b, _, _)| left_ms > b) {
                    best = Some((left_ms, ow, slot));
                }
            }
        }
        let Some((_, ow, slot)) = best else {
            return false;
        };
        // The owner keeps what `split_share` says (half, or where the classes
        // differ, what makes both halves end together), as the stores split.
        let (owner, asker) = (self.workers[ow].class, self.workers[w].class);
        let stage = self.workers[ow].slots[slot]
            .as_ref()
            .expect("running")
            .stage;
        let sizers = &self.stages[stage].sizers;
        let share = split_share(&sizers[owner].model, &sizers[asker].model);
        let r = self.workers[ow].slots[slot].as_mut().expect("running");
        let ran = Self::progress(r, self.now).min(r.runs);
        let keep = ran + ((r.runs - ran) as f64 * share).ceil() as u64;
        if keep >= r.runs {
            return false;
        }
        let at = r.span.start + keep;
        if Self::hand_back(&mut self.stages[r.stage], r, at) == 0 {
            return false;
        }
        r.runs = keep;
        r.duration = r.overhead_ms + keep as f64 * r.item_ms;
        let (end, id) = (r.start + r.duration, r.id);
        self.at(end.max(self.now), Event::Done(ow, slot, id));
        true
    }

    /// Hands the items of running fragment `r` from `at` on back to its stage's
    /// pending set (an elastic end or a split), returning how many went back.
    fn hand_back(st: &mut Stage, r: &mut Running, at: u64) -> u64 {
        let tail = st.ledger.split(r.id, at);
        st.running_items -= tail;
        r.span.end -= tail;
        tail
    }

    /// Ends a running fragment with `done` of its items (a prefix) done.
    fn close(&mut self, w: usize, r: &Running, done: u64, outcome: FinishOutcome) {
        self.busy[self.workers[w].class] -= 1;
        self.settle(w, r, done, outcome, self.now);
    }

    /// The lease of a killed worker's fragment expires: the store's `release`
    /// hands its work back now, as lost at the worker's death.
    fn expire(&mut self, i: usize) {
        let (w, r, done, ended) = self.lapsed[i].take().expect("expires once");
        self.settle(w, &r, done, FinishOutcome::Lost, ended);
    }

    /// Accounts a fragment that ended at `ended` (its slot already freed) and
    /// hands what it did not do back to the ledger.
    fn settle(&mut self, w: usize, r: &Running, done: u64, outcome: FinishOutcome, ended: f64) {
        let class = self.workers[w].class;
        let elapsed = ended - r.start;
        let st = &mut self.stages[r.stage];
        st.running -= 1;
        st.running_items -= r.span.len();
        st.clocks.remove(&r.id);
        st.fragments += 1;
        self.fragments += 1;
        if done > 0 && done < r.span.len() {
            let acked = IntervalSet::from_span(Span::new(r.span.start, r.span.start + done));
            st.ledger.ack(r.id, &acked);
        }
        st.ledger.finish(r.id, &outcome, u32::MAX);
        st.items_by_class[class] += done;
        self.classes[class].items += done;
        self.classes[class].busy_slot_ms += elapsed;
        let owner = st.needs.owner_key();
        self.usage
            .add(&owner, elapsed, ended as i64, self.sc.fair_half_life);
        let track = self.owners.entry(owner).or_default();
        let (mut t, mut b) = (r.start, (r.start / OWNER_BUCKET_MS) as usize);
        while t < ended {
            let edge = ((b + 1) as f64 * OWNER_BUCKET_MS).min(ended);
            if track.buckets.len() <= b {
                track.buckets.resize(b + 1, 0.0);
            }
            track.buckets[b] += edge - t;
            (t, b) = (edge, b + 1);
        }
        let useful = done as f64 * r.item_ms;
        self.useful_ms += useful;
        self.wasted_ms += (elapsed - r.overhead_ms - useful).max(0.0);
        let name = match outcome {
            FinishOutcome::Success => {
                // A task that does not ack shows no ack times: the model learns from
                // whole fragments only, as the engine's does.
                let acks = self.sc.stages[r.stage].acks;
                st.sizers[class].observe(
                    &st.config,
                    &Observation {
                        n: done,
                        duration_ms: elapsed,
                        acks: if acks { done } else { 0 },
                        first_ack_ms: acks.then_some(r.overhead_ms + r.item_ms),
                        last_ack_ms: acks.then_some(elapsed),
                        sized_by_model: r.sized_by_model,
                        bytes: None,
                        load: None,
                    },
                );
                st.durations.push((r.predicted, elapsed));
                "done"
            }
            FinishOutcome::Lost => "lost",
            _ => "yielded",
        };
        if let Some(trace) = self.trace.as_mut() {
            trace(&TraceRow {
                stage: self.sc.stages[r.stage].name.clone(),
                class: self.sc.classes[class].name.clone(),
                worker: w,
                start_ms: r.start,
                end_ms: ended,
                items: r.span.len(),
                done,
                predicted_ms: r.predicted,
                outcome: name,
            });
        }
        let requeued = outcome != FinishOutcome::Success;
        self.watch_owners();
        let st = &mut self.stages[r.stage];
        if st.done_ms.is_none() && st.ledger.is_finished() {
            st.done_ms = Some(self.now);
            self.stages_left -= 1;
            // Stages that waited for this one may be ready: plan again, and idle
            // workers look again.
            self.replan();
            self.wake_idle();
        } else if requeued {
            self.wake_idle();
        }
    }

    /// Items of a running fragment finished by `at`: progress is even over the
    /// items it runs.
    fn progress(r: &Running, at: f64) -> u64 {
        let work = r.duration - r.overhead_ms;
        if work <= 0.0 {
            return r.runs;
        }
        let share = ((at - r.start - r.overhead_ms) / work).clamp(0.0, 1.0);
        (share * r.runs as f64).floor() as u64
    }

    /// Items of a fragment that stay done if it is cut off at `at`: its progress,
    /// or none for an all-or-nothing task.
    fn progress_kept(&self, r: &Running, at: f64) -> u64 {
        if self.sc.stages[r.stage].acks {
            Self::progress(r, at)
        } else {
            0
        }
    }

    fn notice(&mut self, w: usize) {
        if self.workers[w].gone {
            return;
        }
        self.workers[w].draining = true;
        self.idle.remove(&w);
        // Every fragment yields at its next safe point: the items done so far are acked.
        for slot in 0..self.workers[w].slots.len() {
            if let Some(r) = self.workers[w].slots[slot].take() {
                let done = self.progress_kept(&r, self.now);
                self.close(w, &r, done, FinishOutcome::Yielded);
            }
        }
    }

    fn end(&mut self, w: usize) {
        if self.workers[w].gone {
            return;
        }
        let class = self.workers[w].class;
        if self.workers[w].life.ending == Ending::Preempted {
            self.classes[class].preemptions += 1;
            self.preempted[class] += 1.0;
        }
        // Killed: acks since the last heartbeat (half of one, on average) are lost,
        // and its fragments stay held until their lease, renewed by that heartbeat,
        // expires (the stores' `release`).
        let flushed = self.now - self.sc.heartbeat / 2.0;
        for slot in 0..self.workers[w].slots.len() {
            if let Some(r) = self.workers[w].slots[slot].take() {
                let done = self.progress_kept(&r, flushed);
                self.busy[class] -= 1;
                self.lapsed.push(Some((w, r, done, self.now)));
                let expires = (flushed + self.sc.lease).max(self.now);
                self.at(expires, Event::Expire(self.lapsed.len() - 1));
            }
        }
        self.leave(w);
        let position = self.workers[w].position;
        if self.sc.classes[class].autoscale {
            self.park(class, position);
        } else {
            self.next_life(class, position);
        }
    }

    /// Parks a position of an autoscaled class until the plan calls it (its life
    /// starts then).
    fn park(&mut self, class: usize, position: u32) {
        let life = Life {
            start: self.now,
            end: self.now,
            ending: Ending::Never,
        };
        self.parked[class].push((position, life));
    }

    fn idle_check(&mut self, w: usize, since: u64) {
        let worker = &self.workers[w];
        if worker.gone || worker.idle_since.map(micros) != Some(since) {
            return;
        }
        // Only a worker no unfinished stage can ever use leaves: the pool does not
        // bring back a worker that left, and a stage waiting in the DAG may need it.
        let class = &self.offers[worker.class];
        let useful = self
            .stages
            .iter()
            .any(|st| st.done_ms.is_none() && fits(&st.needs, class).is_ok());
        // Or one the plan does not want: its class has enough slots busy.
        let spare = spare(
            self.wanted[worker.class],
            f64::from(self.busy[worker.class]),
        );
        let useful = useful && !spare;
        if worker.slots.iter().all(Option::is_none) && !useful {
            let (class, position, life) = (worker.class, worker.position, worker.life);
            self.leave(w);
            self.parked[class].push((position, life));
        }
    }

    /// Calls parked workers back as the scaling policy's `to_start` says.
    fn unpark(&mut self) {
        for c in 0..self.parked.len() {
            let pool = PoolView {
                here: self.alive_slots[c] + self.arriving[c],
                ..self.pool_view(c)
            };
            for _ in 0..to_start(self.wanted[c], &pool) {
                let Some((position, mut life)) = self.parked[c].pop() else {
                    break;
                };
                let start = self.now + self.sc.classes[c].replace_after;
                if self.sc.classes[c].autoscale {
                    // Launched now: a fresh life from its start.
                    let lives = &mut self.lives[c][position as usize];
                    if let Some(life) = lives.starting_at(start) {
                        self.start_life(c, position, life);
                    }
                    continue;
                }
                // The position's own history goes on: its current life if that has
                // not ended by then, else its next one.
                while life.end <= start {
                    match self.lives[c][position as usize].next() {
                        Some(next) => life = next,
                        None => break,
                    }
                }
                if life.end > start {
                    life.start = life.start.max(start);
                    self.start_life(c, position, life);
                }
            }
        }
    }

    fn wake_idle(&mut self) {
        let idle: Vec<usize> = self.idle.iter().copied().collect();
        for w in idle {
            self.fill(w);
        }
    }

    /// Claims fragments for the free slots of worker `w`.
    fn fill(&mut self, w: usize) {
        if self.workers[w].gone || self.workers[w].draining {
            return;
        }
        for slot in 0..self.workers[w].slots.len() {
            if self.workers[w].slots[slot].is_some() {
                continue;
            }
            let class = self.workers[w].class;
            if f64::from(self.busy[class]) >= self.wanted[class] {
                break; // the plan does not need more of this class now
            }
            let claimed = match self.claim(w) {
                None if self.splits() && self.steal(w) => self.claim(w),
                claimed => claimed,
            };
            match claimed {
                Some(r) => {
                    self.busy[class] += 1;
                    let end = r.start + r.duration;
                    let id = r.id;
                    self.workers[w].slots[slot] = Some(r);
                    self.at(end, Event::Done(w, slot, id));
                }
                None => break,
            }
        }
        self.watch_owners();
        let worker = &mut self.workers[w];
        if worker.slots.iter().any(Option::is_none) {
            self.idle.insert(w);
        } else {
            self.idle.remove(&w);
        }
        if worker.slots.iter().all(Option::is_none) {
            if worker.idle_since.is_none() {
                worker.idle_since = Some(self.now);
                let since = micros(self.now);
                self.at(self.now + self.sc.idle_exit, Event::IdleCheck(w, since));
            }
        } else {
            worker.idle_since = None;
        }
    }

    /// Mean per-item cost of stage `s` on class `c` as learned so far.
    fn learned(&self, s: usize, c: usize) -> Option<f64> {
        let m = &self.stages[s].sizers[c].model;
        m.ready().then_some(m.b_ms)
    }

    /// Slot-ms per item done of stage `s`'s fragments running on class `c` (what
    /// `granule serve` reads from progress while no model is ready: long elastic
    /// fragments teach the model only when they end); `None` before 8 items.
    fn pace(&self, s: usize, c: usize) -> Option<f64> {
        let (mut ms, mut done) = (0.0, 0);
        for w in self.workers.iter().filter(|w| !w.gone && w.class == c) {
            for r in w.slots.iter().flatten().filter(|r| r.stage == s) {
                ms += self.now - r.start;
                done += Self::progress(r, self.now);
            }
        }
        (done >= 8).then(|| ms / done as f64)
    }

    /// The stages worker `w` should try, best first: for granule, the order the
    /// stores use (`placement_order` over the same views, with the class plan).
    fn candidates(&self, w: usize) -> Vec<usize> {
        self.candidates_for(w, true)
    }

    /// The stages worker `w` may take from, in placement order; with `pending`
    /// only those with pending items (a claim), else those with running ones too
    /// (a split: the placement that admits a claim admits a steal).
    fn candidates_for(&self, w: usize, pending: bool) -> Vec<usize> {
        let class = self.workers[w].class;
        let offer = &self.offers[class];
        let ready = |s: usize| {
            let st = &self.stages[s];
            st.done_ms.is_none()
                && self.now >= st.submit_at
                && (!st.ledger.pending.is_empty() || (!pending && st.running > 0))
                && st.after.iter().all(|&a| self.stages[a].done_ms.is_some())
                && fits(&st.needs, offer).is_ok()
        };
        if !self.policy.plans() {
            return (0..self.stages.len()).filter(|&s| ready(s)).collect();
        }
        let turns = self.owner_turns(ready);
        let views: Vec<StageView> = (0..self.stages.len())
            .map(|s| {
                let st = &self.stages[s];
                StageView {
                    idx: s,
                    needs: st.needs.clone(),
                    after: st.after.clone(),
                    ready: ready(s),
                    running: st.running,
                    left: st.ledger.pending.len() + st.running_items,
                    learned: (0..self.sc.classes.len())
                        .filter_map(|c| {
                            Some((self.sc.classes[c].name.clone(), self.learned(s, c)?))
                        })
                        .collect(),
                    checkpoints: false,
                    deadline_at_ms: None,
                    owner_turn: turns.get(&st.needs.owner_key()).copied().unwrap_or(0),
                }
            })
            .collect();
        let planned: Vec<bool> = (0..self.stages.len())
            .map(|s| self.planned(s, class))
            .collect();
        placement_order(&views, offer, Some(&planned))
    }

    /// Each owner's and account's standing now: shares, slots running, usage.
    fn standings(&self) -> (BTreeMap<String, Standing>, BTreeMap<OwnerKey, Standing>) {
        let now = self.now as i64;
        let half_life = self.sc.fair_half_life;
        let (mut accounts, mut owners) = (BTreeMap::new(), BTreeMap::<OwnerKey, Standing>::new());
        let fresh = |shares: Option<&f64>, usage: Option<&fair::Usage>| Standing {
            shares: shares.copied().unwrap_or(DEFAULT_SHARES),
            running: 0,
            usage_ms: usage.map_or(0.0, |u| u.at(now, half_life)),
        };
        for st in &self.stages {
            let key = st.needs.owner_key();
            let shares = key.1.as_ref().and_then(|o| self.sc.shares.get(o));
            owners
                .entry(key.clone())
                .or_insert_with(|| fresh(shares, self.usage.owners.get(&key)))
                .running += st.running;
            let account = key.0.clone().unwrap_or_default();
            let shares = self.sc.account_shares.get(&account);
            accounts
                .entry(account.clone())
                .or_insert_with(|| fresh(shares, self.usage.accounts.get(&account)))
                .running += st.running;
        }
        (accounts, owners)
    }

    /// The owners' turns in the fair share among the owners of the stages that
    /// `ready` admits (core's `fair::turns`, as the stores rank them).
    fn owner_turns(&self, ready: impl Fn(usize) -> bool) -> BTreeMap<OwnerKey, u64> {
        let keys: BTreeSet<OwnerKey> = (0..self.stages.len())
            .filter(|&s| ready(s))
            .map(|s| self.stages[s].needs.owner_key())
            .collect();
        if keys.len() <= 1 {
            return BTreeMap::new();
        }
        let (accounts, owners) = self.standings();
        let keys: Vec<OwnerKey> = keys.into_iter().collect();
        fair::turns(&keys, &accounts, &owners)
    }

    /// Notes, per owner, when it starts and stops waiting with ready work and
    /// nothing running.
    fn watch_owners(&mut self) {
        let mut state: BTreeMap<OwnerKey, (bool, u64)> = BTreeMap::new();
        for s in 0..self.stages.len() {
            let st = &self.stages[s];
            let e = state.entry(st.needs.owner_key()).or_default();
            e.0 |= self.ready(s) && !st.ledger.pending.is_empty();
            e.1 += st.running;
        }
        for (key, (waiting, running)) in state {
            let track = self.owners.entry(key).or_default();
            if waiting && running == 0 {
                track.starving_since.get_or_insert(self.now);
            } else if let Some(since) = track.starving_since.take() {
                track.longest_starved = track.longest_starved.max(self.now - since);
            }
        }
    }

    /// Whether stage `s` is unfinished and every stage it waits for is done.
    fn ready(&self, s: usize) -> bool {
        self.stages[s].done_ms.is_none()
            && self.now >= self.stages[s].submit_at
            && self.stages[s]
                .after
                .iter()
                .all(|&a| self.stages[a].done_ms.is_some())
    }

    /// Whether an unfinished stage waits for stage `s`.
    fn awaited(&self, s: usize) -> bool {
        self.stages
            .iter()
            .any(|st| st.done_ms.is_none() && st.after.contains(&s))
    }

    /// Price of a slot-ms of class `c`.
    fn price(&self, c: usize) -> f64 {
        let class = &self.sc.classes[c];
        class.cost / f64::from(class.slots) / 3_600_000.0
    }

    /// Recomputes the plan with the core's scaling policy (`granule serve` calls the
    /// same function): from what is learned, the pool's forecast and parked
    /// workers, and the deadlines, which classes take which stage and how many slots
    /// of each class are wanted.
    fn replan(&mut self) {
        let classes = self.sc.classes.len();
        let demand: Vec<StageDemand> = (0..self.stages.len())
            .map(|s| {
                let st = &self.stages[s];
                StageDemand {
                    items: if self.ready(s) {
                        (st.ledger.pending.len() + st.running_items) as f64
                    } else {
                        0.0
                    },
                    fits: (0..classes)
                        .map(|c| fits(&st.needs, &self.offers[c]).is_ok())
                        .collect(),
                    learned: (0..classes)
                        .map(|c| self.learned(s, c).or_else(|| self.pace(s, c)))
                        .collect(),
                    resumable: self.sc.stages[s].acks,
                }
            })
            .collect();
        let pools: Vec<PoolView> = (0..classes).map(|c| self.pool_view(c)).collect();
        // Without a deadline: the cheapest plan within a little of the soonest finish.
        let time_left = self
            .sc
            .stages
            .iter()
            .zip(&self.stages)
            .filter(|(_, st)| st.done_ms.is_none())
            .filter_map(|(spec, _)| spec.deadline)
            .map(|d| d - self.now)
            .min_by(f64::total_cmp);
        let scaling = scale(&demand, &pools, time_left);
        self.plan = scaling.planned;
        self.wanted = scaling.wanted;
    }

    /// Class `c` as the scaling policy sees it: slots here or on their way (as many
    /// as the forecast expects, when fewer), and parked ones the plan may call back.
    fn pool_view(&self, c: usize) -> PoolView {
        let class = &self.sc.classes[c];
        let here = self.alive_slots[c] + self.arriving[c];
        let ahead = self.forecast[c].forecast(5.0).unwrap_or(here);
        PoolView {
            slots_per_worker: f64::from(class.slots),
            cost_per_slot_hour: class.cost / f64::from(class.slots),
            spot: class.spot,
            here: here.min(ahead.max(0.0)),
            startable: self.parked[c].len() as f64 * f64::from(class.slots),
        }
    }

    /// Whether the plan lets class `c` take stage `s`: planned for it, its cost
    /// there is not yet known (it must be learned), or it is no dearer per item
    /// than a class the plan does use (backfill).
    fn planned(&self, s: usize, c: usize) -> bool {
        // The fluid plan does not see the DAG's order: a stage others wait for is
        // on the way to the end and takes any class that fits.
        if self.plan[s][c] || self.awaited(s) {
            return true;
        }
        let Some(here) = self.learned(s, c) else {
            return true;
        };
        let per_item = |k: usize| self.learned(s, k).map(|ms| ms * self.price(k));
        let dearest = (0..self.sc.classes.len())
            .filter(|&k| self.plan[s][k])
            .filter_map(per_item)
            .fold(0.0, f64::max);
        here * self.price(c) <= dearest
    }

    fn claim(&mut self, w: usize) -> Option<Running> {
        let class = self.workers[w].class;
        // The life a fragment may use ends where the drain begins.
        let life = self.workers[w].life;
        let life_left = match life.ending {
            Ending::Lifespan => Some((life.end - drain_margin(&life) - self.now).max(0.0)),
            _ => None,
        };
        // How long a spot worker of this class is expected to live: a fragment that
        // cannot keep partial work is capped at Young's interval from it and the
        // start cost (`claim_context`, as the stores do).
        let expected_life =
            self.sc.classes[class].spot && self.sc.forecast && self.policy == Policy::Granule;
        let expected_life = expected_life
            .then(|| self.preempt_rate[class].forecast(1.0))
            .flatten()
            .filter(|rate| *rate > 0.0)
            .map(|rate| 1.0 / rate);
        let active: u32 = self.alive_slots.iter().sum::<f64>().max(1.0) as u32;
        let splits = self.splits();
        // Which pending ranges this worker may take, as the stores decide: items lost
        // with spot workers twice wait for an on-demand one while one is alive.
        let alive = |c: &usize| self.alive_slots[*c] > 0.0;
        let classes = 0..self.offers.len();
        let admission = Admission::strict(&self.offers[class]).relaxed(
            classes
                .clone()
                .filter(alive)
                .map(|c| self.offers[c].memory_mb)
                .max()
                .unwrap_or(0),
            classes.filter(alive).any(|c| !self.offers[c].spot),
        );
        for s in self.candidates(w) {
            let spec = &self.sc.stages[s];
            let st = &mut self.stages[s];
            let base = ClaimContext {
                remaining: 0,
                slots: 0,
                free_memory: 1.0,
                load_per_cpu: 0.0,
                // Idle slots split running fragments (`steal`), as `granule worker`'s do;
                // modelled for one-class pools only (see `splits`).
                splits,
                all_or_nothing_margin_ms: 0.0,
                acking: false,
                lifespan_ms: life_left,
            };
            // Where running fragments are split, the equal share at the end is of
            // what is pending and what running fragments have not run (the stores
            // count the unacked items of running fragments the same way).
            let running_left = match spec.acks && base.splits {
                true => st.ledger.running_unacked(),
                false => 0,
            };
            let ctx = claim_context(
                &base,
                expected_life,
                &st.sizers[class].model,
                spec.acks,
                st.ledger.pending.len() + running_left,
                active,
            );
            // Elsewhere running fragments' unrun items count where the size depends
            // on the work left, as the stores count them.
            let now = self.now;
            let (ledger, clocks) = (&st.ledger, &st.clocks);
            let unrun = || {
                let unrun = ledger.running.iter().map(|f| {
                    let (start, predicted) = clocks[&f.id];
                    unrun_estimate(f.span.len() - f.acked.len(), now - start, predicted)
                });
                Ok::<u64, std::convert::Infallible>(unrun.sum::<f64>().floor() as u64)
            };
            let Ok(mut sizing) = size_with_unrun(&mut st.sizers[class], &st.config, &ctx, unrun);
            let total = self.sc.stages[s].items;
            let pending = st.ledger.pending.len();
            // The baselines know the pool's size up front, as loop schedulers do.
            let pool: u64 = self
                .sc
                .classes
                .iter()
                .map(|c| u64::from(c.count * c.slots))
                .sum();
            if let Some(n) = self.policy.chunk(total, pending, pool, &mut st.batch) {
                sizing.n = n;
                sizing.cap = SizeCap::Bounds;
                sizing.predicted_ms = st.sizers[class].model.predict_ms(n);
                sizing.feed_for_ms = None;
            }
            if sizing.n == 0 {
                continue; // does not fit the worker's remaining life
            }
            let id = FragmentId(self.next_fragment);
            self.next_fragment += 1;
            let Some(claim) = st.ledger.claim_where(id, sizing.n, |r| admission.admits(r)) else {
                continue;
            };
            st.running += 1;
            st.running_items += claim.span.len();
            let n = claim.span.len();
            let drift = match spec.drift_at {
                Some(at) if self.now >= at => spec.drift_factor,
                _ => 1.0,
            };
            // The first `k` items counted in plain items: those of a band of costly
            // items (by index) count `drift_factor` each.
            let weight = |k: u64| {
                let end = claim.span.start + k;
                let band = spec.drift_items.map_or(0, |[from, to]| {
                    end.min(to).saturating_sub(claim.span.start.max(from))
                });
                k as f64 + (spec.drift_factor - 1.0) * band as f64
            };
            let mean = spec.item_ms_on(&self.sc.classes[class]) * drift * weight(n) / n as f64;
            // The sum of n log-normal item costs (drawn one by one for small
            // fragments, by its normal approximation for large ones, where it is
            // close), on a machine a little faster or slower than its class's
            // nominal speed.
            let sum = if n <= EXACT_SUM {
                let mu = mean.max(1e-12).ln() - spec.spread * spec.spread / 2.0;
                let item = LogNormal::new(mu, spec.spread).expect("valid");
                (0..n).map(|_| item.sample(&mut self.rng)).sum::<f64>()
            } else {
                let sd = mean * (spec.spread * spec.spread).exp_m1().sqrt() * (n as f64).sqrt();
                let z: f64 = StandardNormal.sample(&mut self.rng);
                (n as f64 * mean + z * sd).max(0.1 * n as f64 * mean)
            };
            let machine = LogNormal::new(0.0, self.sc.jitter.max(0.0))
                .expect("valid")
                .sample(&mut self.rng);
            let work = sum * machine;
            // The work of the first `k` items: the draw spread by weight.
            let cost = |k: u64| work * weight(k) / weight(n).max(1e-12);
            // An elastic end: fed while what was fed ends by the target (the first
            // `k` whose work reaches it).
            let runs = match sizing.feed_for_ms {
                Some(t) if spec.overhead_ms + work > t => {
                    let (mut lo, mut hi) = (1, n);
                    while lo < hi {
                        let mid = lo + (hi - lo) / 2;
                        if spec.overhead_ms + cost(mid) >= t {
                            hi = mid;
                        } else {
                            lo = mid + 1;
                        }
                    }
                    lo
                }
                _ => n,
            };
            let item_ms = cost(runs) / runs as f64;
            // Predicted for the items taken (a short pending range gives fewer), as
            // the stores record it.
            if n < sizing.n {
                sizing.predicted_ms = st.sizers[class].claim_ms(n, 0.0, sizing.feed_for_ms);
            }
            st.clocks.insert(id, (self.now, sizing.predicted_ms));
            return Some(Running {
                id,
                stage: s,
                span: claim.span,
                start: self.now,
                item_ms,
                overhead_ms: spec.overhead_ms,
                duration: spec.overhead_ms + runs as f64 * item_ms,
                predicted: sizing.predicted_ms,
                sized_by_model: sizing.cap == SizeCap::Model,
                runs,
            });
        }
        None
    }

    fn report(self) -> Report {
        let finished = self.stages.iter().all(|s| s.done_ms.is_some());
        let makespan = self
            .stages
            .iter()
            .filter_map(|s| s.done_ms)
            .fold(0.0, f64::max);
        let mut all_errors = Vec::new();
        let stages = self
            .stages
            .iter()
            .zip(&self.sc.stages)
            .map(|(st, spec)| {
                // As `status` judges: past the warm-up, fragments that had a prediction.
                let errors = absolute_errors(&st.durations);
                all_errors.extend_from_slice(&errors);
                // The same exactly-once accounting as the store's: checked, not assumed.
                st.ledger.assert_consistent();
                let (error_median, error_p90) = median_p90(&errors);
                StageReport {
                    name: spec.name.clone(),
                    done_ms: st.done_ms,
                    fragments: st.fragments,
                    done: st.ledger.done.len(),
                    items_by_class: st.items_by_class.clone(),
                    error_median,
                    error_p90,
                }
            })
            .collect();
        let (error_median, error_p90) = median_p90(&all_errors);
        let owners = self.owner_reports();
        let mut observed: Vec<f64> = self
            .stages
            .iter()
            .flat_map(|st| st.durations.iter().map(|d| d.1))
            .collect();
        observed.sort_by(f64::total_cmp);
        let fragment_median_ms = observed.get(observed.len() / 2).copied().unwrap_or(0.0);
        let mut classes = self.classes;
        let mut cost = 0.0;
        for (c, report) in classes.iter_mut().enumerate() {
            let spec = &self.sc.classes[c];
            report.utilization = report.busy_slot_ms / report.alive_slot_ms.max(1e-9);
            report.cost = report.alive_slot_ms / f64::from(spec.slots) / 3_600_000.0 * spec.cost;
            cost += report.cost;
        }
        Report {
            scenario: self.sc.name.clone(),
            policy: self.policy,
            seed: self.sc.seed,
            finished,
            makespan_ms: makespan,
            lower_bound_ms: 0.0,
            cost,
            wasted_ms: self.wasted_ms,
            useful_ms: self.useful_ms,
            fragments: self.fragments,
            error_median,
            error_p90,
            classes,
            stages,
            owners,
            fragment_median_ms,
        }
    }

    /// Per owner: entitlement, share while all had work, starvation, share over time.
    fn owner_reports(&self) -> Vec<OwnerReport> {
        let sc = self.sc;
        let shares = |o: &Option<String>| {
            o.as_ref()
                .and_then(|o| sc.shares.get(o))
                .copied()
                .unwrap_or(DEFAULT_SHARES)
        };
        let account_shares = |a: &str| sc.account_shares.get(a).copied().unwrap_or(DEFAULT_SHARES);
        let keys: Vec<&OwnerKey> = self.owners.keys().collect();
        let accounts: BTreeSet<String> = keys
            .iter()
            .map(|k| k.0.clone().unwrap_or_default())
            .collect();
        let all_accounts: f64 = accounts.iter().map(|a| account_shares(a)).sum();
        // Every owner has work from the last submission to the first owner's end.
        let from = sc.stages.iter().map(|s| s.submit_at).fold(0.0, f64::max);
        let until = keys
            .iter()
            .map(|k| {
                self.stages
                    .iter()
                    .filter(|st| st.needs.owner_key() == **k)
                    .map(|st| st.done_ms.unwrap_or(self.now))
                    .fold(0.0, f64::max)
            })
            .fold(f64::INFINITY, f64::min);
        let within = |buckets: &[f64]| -> f64 {
            buckets
                .iter()
                .enumerate()
                .map(|(b, ms)| {
                    let (lo, hi) = (b as f64 * OWNER_BUCKET_MS, (b + 1) as f64 * OWNER_BUCKET_MS);
                    let overlap = (hi.min(until) - lo.max(from)).max(0.0);
                    ms * overlap / OWNER_BUCKET_MS
                })
                .sum()
        };
        let active_total: f64 = self.owners.values().map(|t| within(&t.buckets)).sum();
        let buckets = self
            .owners
            .values()
            .map(|t| t.buckets.len())
            .max()
            .unwrap_or(0);
        let per_bucket: Vec<f64> = (0..buckets)
            .map(|b| {
                self.owners
                    .values()
                    .map(|t| t.buckets.get(b).copied().unwrap_or(0.0))
                    .sum()
            })
            .collect();
        self.owners
            .iter()
            .map(|(key, track)| {
                let account = key.0.clone().unwrap_or_default();
                let in_account: f64 = keys
                    .iter()
                    .filter(|k| k.0.clone().unwrap_or_default() == account)
                    .map(|k| shares(&k.1))
                    .sum();
                let starved = track
                    .starving_since
                    .map_or(0.0, |since| self.now - since)
                    .max(track.longest_starved);
                OwnerReport {
                    owner: key.1.clone(),
                    account: key.0.clone(),
                    shares: shares(&key.1),
                    entitlement: account_shares(&account) / all_accounts * shares(&key.1)
                        / in_account,
                    share_all_active: (until > from && active_total > 0.0)
                        .then(|| within(&track.buckets) / active_total),
                    busy_ms: track.buckets.iter().sum(),
                    longest_starved_ms: starved,
                    over_time: per_bucket
                        .iter()
                        .enumerate()
                        .map(|(b, total)| {
                            let mine = track.buckets.get(b).copied().unwrap_or(0.0);
                            if *total > 0.0 {
                                mine / total
                            } else {
                                0.0
                            }
                        })
                        .collect(),
                }
            })
            .collect()
    }
}

/// How long before the end of a fixed lifespan a worker drains, as `--lifespan` does.
fn drain_margin(life: &Life) -> f64 {
    (0.1 * (life.end - life.start)).min(30_000.0)
}

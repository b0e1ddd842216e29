//! Exactly-once accounting of one stage's items.
//!
//! Every item of a stage is in exactly one place: pending, running (inside a
//! fragment, not yet acked), done or quarantined. The transitions below (claim,
//! ack, checkpoint, fallback, split, finish) are the only ways items move, and each
//! one is applied in a single store transaction. `assert_consistent` checks the
//! partition; property tests drive random transitions through it.
//!
//! Two rules make the accounting exact at the task boundary:
//!
//! - **Acks decide, once a stage is known to ack.** A task that exits 0 without
//!   acking anything is all-or-nothing only while no task of its stage has ever
//!   acked; its items are then done but *unconfirmed*. The first ack of the stage
//!   sends every unconfirmed item back to pending (no ack vouches for them), and from
//!   then on a task that exits 0 without acking failed the items it was fed.
//! - **State travels with its items.** A checkpoint *covers* the items whose state it
//!   holds: those its chain of attempts did before, plus the ones this attempt acked
//!   before writing it. A remainder resumes from its chain's latest checkpoint, and
//!   acked items that checkpoint does not cover (their state died with the task) run
//!   again. A chain ends in a *result*: the checkpoint of the attempt that finished
//!   it (or of the item that was quarantined at its head), so results partition the
//!   items done with state.

use crate::ids::FragmentId;
use crate::intervals::{IntervalSet, Span};
use serde::{Deserialize, Serialize};

/// The retry budget of a failure by its cause: an exit code, a refused start, a
/// protocol error or unacked items are the task's own doing and likely to repeat,
/// so they get one retry before bisection; signals, timeouts and running out of
/// memory get the stage's `retries`. (Lost workers and yields never count.)
pub fn retry_budget(cause: Option<&str>, retries: u32) -> u32 {
    match cause {
        Some("exit" | "spawn" | "unacked" | "early-exit" | "protocol" | "checkpoint") => {
            retries.min(1)
        }
        _ => retries,
    }
}

/// A pending span with what is known of its history.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct PendingRange {
    /// The items.
    pub span: Span,
    /// How many times these items failed. Above the stage's `retries` the span is
    /// split (first its first item alone, then in halves) until a failing item is
    /// alone (bisection).
    pub failures: u32,
    /// Checkpoint blob to resume from (only on the span that follows the state).
    pub checkpoint: Option<i64>,
    /// How often these items were lost with their worker (preempted, killed,
    /// lease expired). Never counts against `retries`; placement escalates such
    /// work away from spot workers.
    #[serde(default, skip_serializing_if = "is_zero")]
    pub lost: u32,
    /// These items ran out of memory on a worker with this much (MiB): they go to
    /// a worker with more, while one is around.
    #[serde(default, skip_serializing_if = "is_zero")]
    pub floor_memory_mb: u64,
    /// Items whose state `checkpoint` holds (done earlier in its chain).
    #[serde(default, skip_serializing_if = "IntervalSet::is_empty")]
    pub covers: IntervalSet,
}

impl PendingRange {
    /// A range with no history.
    pub fn fresh(span: Span) -> PendingRange {
        PendingRange {
            span,
            failures: 0,
            checkpoint: None,
            lost: 0,
            floor_memory_mb: 0,
            covers: IntervalSet::new(),
        }
    }
}

fn is_zero<T: Default + PartialEq>(v: &T) -> bool {
    *v == T::default()
}

/// The pending spans of a stage, sorted by start, disjoint.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(transparent)]
pub struct Pending {
    ranges: Vec<PendingRange>,
}

impl Pending {
    /// Number of pending items.
    pub fn len(&self) -> u64 {
        self.ranges.iter().map(|r| r.span.len()).sum()
    }

    /// Whether nothing is pending.
    pub fn is_empty(&self) -> bool {
        self.ranges.is_empty()
    }

    /// The pending ranges in index order.
    pub fn ranges(&self) -> &[PendingRange] {
        &self.ranges
    }

    /// The pending items as a set.
    pub fn to_set(&self) -> IntervalSet {
        let mut set = IntervalSet::new();
        for r in &self.ranges {
            set.insert(r.span);
        }
        set
    }

    /// Adds a range, merging it with a touching neighbour of the same history.
    fn push(&mut self, range: PendingRange) {
        if range.span.is_empty() {
            return;
        }
        let at = self
            .ranges
            .partition_point(|r| r.span.start < range.span.start);
        self.ranges.insert(at, range);
        // Merge with the right neighbour, then the left one.
        if at + 1 < self.ranges.len() && mergeable(&self.ranges[at], &self.ranges[at + 1]) {
            let right = self.ranges.remove(at + 1);
            self.ranges[at].span.end = right.span.end;
        }
        if at > 0 && mergeable(&self.ranges[at - 1], &self.ranges[at]) {
            let right = self.ranges.remove(at);
            self.ranges[at - 1].span.end = right.span.end;
        }
    }

    /// Takes up to `n` items from the front of the first pending range `ok` admits.
    fn take_where(&mut self, n: u64, ok: impl Fn(&PendingRange) -> bool) -> Option<PendingRange> {
        let at = self.ranges.iter().position(ok)?;
        let first = &mut self.ranges[at];
        let n = n.max(1).min(first.span.len());
        if n == first.span.len() {
            return Some(self.ranges.remove(at));
        }
        let head = PendingRange {
            span: Span::new(first.span.start, first.span.start + n),
            checkpoint: first.checkpoint.take(),
            covers: std::mem::take(&mut first.covers),
            ..first.clone()
        };
        first.span.start += n;
        Some(head)
    }
}

/// Which items of an unfinished fragment `f` (not acked, or acked but `undone`)
/// are charged with a failure and which go back to pending free, and how often its
/// items have now been lost with their worker.
fn charge(
    f: &RunningFragment,
    outcome: &FinishOutcome,
    undone: IntervalSet,
) -> (IntervalSet, IntervalSet, u32) {
    let mut rest = f.acked.complement_within(f.span);
    let (mut charged, mut uncharged) = (IntervalSet::new(), undone);
    let mut lost = f.lost;
    match outcome {
        FinishOutcome::Lost => {
            lost += 1;
            uncharged.union_with(&rest);
        }
        FinishOutcome::Failed {
            culprits,
            rest_failed,
            fed_end,
        } => {
            let culprits = culprits.intersection(&rest);
            rest.subtract(&culprits);
            if *rest_failed {
                // Never charge nothing: a task that failed before anything could
                // be fed charges its first item.
                let fed_end = (*fed_end).max(f.span.start + 1).min(f.span.end);
                charged = rest.within(Span::new(f.span.start, fed_end));
                rest.subtract(&charged);
            }
            charged.union_with(&culprits);
            uncharged.union_with(&rest);
        }
        _ => uncharged.union_with(&rest),
    }
    (charged, uncharged, lost)
}

/// Only never-failed ranges merge: a failed range keeps its bounds so that
/// bisection's halves stay apart. A range carrying state never merges into the one
/// before it (the state belongs to its first item).
fn mergeable(left: &PendingRange, right: &PendingRange) -> bool {
    let fresh = |r: &PendingRange| r.failures == 0 && r.lost == 0 && r.floor_memory_mb == 0;
    left.span.end == right.span.start && fresh(left) && fresh(right) && right.checkpoint.is_none()
}

/// A fragment that is running: its span and what it has acked so far.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct RunningFragment {
    /// The fragment.
    pub id: FragmentId,
    /// Its items; shrinks when its tail is split off.
    pub span: Span,
    /// Items acked so far (all inside `span`, all counted in `done`).
    pub acked: IntervalSet,
    /// Failures its items had before this attempt.
    pub failures: u32,
    /// Latest checkpoint blob written by this fragment or handed to it.
    pub checkpoint: Option<i64>,
    /// Times its items were lost before (see `PendingRange::lost`).
    #[serde(default)]
    pub lost: u32,
    /// Memory floor its items carry (see `PendingRange::floor_memory_mb`).
    #[serde(default)]
    pub floor_memory_mb: u64,
    /// Items whose state `checkpoint` holds.
    #[serde(default, skip_serializing_if = "IntervalSet::is_empty")]
    pub covers: IntervalSet,
    /// The checkpoint it was handed when it started (or fell back to).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub resumed_from: Option<i64>,
    /// Items whose state `resumed_from` holds.
    #[serde(default, skip_serializing_if = "IntervalSet::is_empty")]
    pub inherited: IntervalSet,
}

/// What a claim hands to a worker.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Claim {
    /// The fragment's items.
    pub span: Span,
    /// Failures these items had before (0 on a first attempt).
    pub failures: u32,
    /// Checkpoint to resume from.
    pub checkpoint: Option<i64>,
    /// Times these items were lost with their worker before.
    pub lost: u32,
    /// Memory floor the items carry (0: none).
    pub floor_memory_mb: u64,
    /// Items whose state `checkpoint` holds.
    pub covers: IntervalSet,
}

/// How a fragment ended, as far as accounting is concerned.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum FinishOutcome {
    /// The task finished every item it was given: the unacked rest is done too.
    Success,
    /// The task exited 0 without acking anything. While the stage has never acked
    /// this is all-or-nothing success (the rest is done, unconfirmed); once the stage
    /// is known to ack, the items fed before `fed_end` failed (`unacked`).
    AllOrNothing {
        /// Items at or past this index were never fed.
        fed_end: u64,
    },
    /// Stopped early at a safe point; the unacked rest is pending again, no failure counted.
    Yielded,
    /// Its worker vanished or its lease expired; like a yield.
    Lost,
    /// It failed. `culprits` are items known to have failed (per-item mode); the
    /// other unacked items fed before `fed_end` count a failure too only if
    /// `rest_failed`. Items never fed go back uncharged.
    Failed {
        /// Items that certainly failed.
        culprits: IntervalSet,
        /// Whether the other fed, unacked items share the failure.
        rest_failed: bool,
        /// Items at or past this index were never fed to the task (`u64::MAX`: all were).
        fed_end: u64,
    },
}

impl FinishOutcome {
    /// A failure of every unacked item (all of them fed).
    pub fn failed() -> FinishOutcome {
        FinishOutcome::Failed {
            culprits: IntervalSet::new(),
            rest_failed: true,
            fed_end: u64::MAX,
        }
    }
}

/// What a finish changed.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct FinishReport {
    /// Items newly counted done.
    pub done: u64,
    /// Items returned to pending.
    pub requeued: u64,
    /// Items newly quarantined.
    pub quarantined: IntervalSet,
    /// A chain that ended here: its last checkpoint and the items whose state it holds.
    pub result: Option<(i64, IntervalSet)>,
    /// Acked items sent back to pending because the checkpoint the rest resumes from
    /// does not hold their state.
    pub undone: u64,
    /// Items counted done whose state is in no result (the task acked them after its
    /// last checkpoint, or never handed over the state it resumed with).
    pub uncovered: u64,
    /// Whether a task that exited 0 without an ack failed its items because the
    /// stage is known to ack (cause `unacked`).
    pub unacked: bool,
}

/// What an ack changed.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Acked {
    /// Items newly counted done.
    pub done: u64,
    /// Items that all-or-nothing fragments had counted done, sent back to pending
    /// because this was the stage's first ack.
    pub reverted: IntervalSet,
}

/// The whole accounting of one stage.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct StageLedger {
    /// Number of items; indices are `0..items`.
    pub items: u64,
    /// Items waiting for a claim.
    pub pending: Pending,
    /// Items done (acked, or finished by a fragment that succeeded).
    pub done: IntervalSet,
    /// Items that failed alone after every retry.
    pub quarantined: IntervalSet,
    /// Fragments holding items now.
    pub running: Vec<RunningFragment>,
    /// Whether any task of the stage has acked.
    #[serde(default)]
    pub acking: bool,
    /// Items counted done by tasks that exited 0 without acking, while the stage had
    /// never acked (all or nothing); they go back to pending at its first ack.
    #[serde(default, skip_serializing_if = "IntervalSet::is_empty")]
    pub unconfirmed: IntervalSet,
    /// Whether any task of the stage has handed over a checkpoint: from then on an
    /// acked item counts only once a checkpoint holds its state.
    #[serde(default)]
    pub stateful: bool,
    /// Items finished fragments counted done with no state while the stage had never
    /// checkpointed; they go back to pending at its first checkpoint (their state, if
    /// its tasks keep one, is nowhere).
    #[serde(default, skip_serializing_if = "IntervalSet::is_empty")]
    pub stateless_done: IntervalSet,
}

impl StageLedger {
    /// A stage with every item pending.
    pub fn new(items: u64) -> StageLedger {
        let mut pending = Pending::default();
        pending.push(PendingRange::fresh(Span::new(0, items)));
        StageLedger {
            items,
            pending,
            done: IntervalSet::new(),
            quarantined: IntervalSet::new(),
            running: Vec::new(),
            acking: false,
            unconfirmed: IntervalSet::new(),
            stateful: false,
            stateless_done: IntervalSet::new(),
        }
    }

    /// A ledger over the part of a stage one transaction holds: the pending ranges
    /// it locked (a claim carves from them) and the running fragment it holds (a
    /// flush, finish or release), with the stage's flags as read. Its `done` is that
    /// fragment's acks; what the transition leaves in `pending` goes back to rows.
    pub fn window(
        pending: Vec<PendingRange>,
        fragment: Option<RunningFragment>,
        acking: bool,
        stateful: bool,
    ) -> StageLedger {
        let mut ledger = StageLedger::new(0);
        for range in pending {
            ledger.items = ledger.items.max(range.span.end);
            ledger.pending.push(range);
        }
        if let Some(f) = fragment {
            ledger.items = ledger.items.max(f.span.end);
            ledger.done = f.acked.clone();
            ledger.running.push(f);
        }
        ledger.acking = acking;
        ledger.stateful = stateful;
        ledger
    }

    /// Whether every item is done or quarantined.
    pub fn is_finished(&self) -> bool {
        self.pending.is_empty() && self.running.is_empty()
    }

    /// Items held by running fragments and not yet acked.
    pub fn running_unacked(&self) -> u64 {
        self.running
            .iter()
            .map(|f| f.span.len() - f.acked.len())
            .sum()
    }

    /// Carves a fragment of up to `n` items (at least one) from the pending set.
    pub fn claim(&mut self, id: FragmentId, n: u64) -> Option<Claim> {
        self.claim_where(id, n, |_| true)
    }

    /// Carves a fragment from the first pending range `ok` admits (placement may
    /// keep some ranges for other workers: more memory, not spot).
    pub fn claim_where(
        &mut self,
        id: FragmentId,
        n: u64,
        ok: impl Fn(&PendingRange) -> bool,
    ) -> Option<Claim> {
        let range = self.pending.take_where(n, ok)?;
        self.running.push(RunningFragment {
            id,
            span: range.span,
            acked: IntervalSet::new(),
            failures: range.failures,
            checkpoint: range.checkpoint,
            lost: range.lost,
            floor_memory_mb: range.floor_memory_mb,
            covers: range.covers.clone(),
            resumed_from: range.checkpoint,
            inherited: range.covers.clone(),
        });
        Some(Claim {
            span: range.span,
            failures: range.failures,
            checkpoint: range.checkpoint,
            lost: range.lost,
            floor_memory_mb: range.floor_memory_mb,
            covers: range.covers,
        })
    }

    /// Marks the pending items inside `span` as needing a worker with more than
    /// `mb` MiB of memory (they ran out of memory on one with that much).
    pub fn raise_floor(&mut self, span: Span, mb: u64) {
        for r in &mut self.pending.ranges {
            if r.span.start >= span.start && r.span.end <= span.end {
                r.floor_memory_mb = r.floor_memory_mb.max(mb);
            }
        }
    }

    /// Looks up a running fragment.
    pub fn fragment(&self, id: FragmentId) -> Option<&RunningFragment> {
        self.running.iter().find(|f| f.id == id)
    }

    /// Records acks of a running fragment. Indices outside the fragment, or acked
    /// before, are ignored, so a repeated flush never counts an item twice. A
    /// fragment that is not running gets nothing. The stage's first ack sends the
    /// items all-or-nothing fragments counted done back to pending.
    pub fn ack(&mut self, id: FragmentId, acked: &IntervalSet) -> Acked {
        let Some(f) = self.running.iter_mut().find(|f| f.id == id) else {
            return Acked::default();
        };
        let mut new = acked.within(f.span);
        new.subtract(&f.acked);
        f.acked.union_with(&new);
        self.done.union_with(&new);
        let mut report = Acked {
            done: new.len(),
            reverted: IntervalSet::new(),
        };
        if !new.is_empty() && !self.acking {
            report.reverted = self.learn_acking();
        }
        report
    }

    /// Records that the stage's tasks ack: items all-or-nothing fragments counted
    /// done go back to pending; returns them.
    pub fn learn_acking(&mut self) -> IntervalSet {
        self.acking = true;
        let reverted = std::mem::take(&mut self.unconfirmed);
        self.forget(&reverted);
        reverted
    }

    /// Records a checkpoint written by a running fragment after it had acked
    /// `acked_before` (its own acks); returns the items whose state it holds, or
    /// `None` if the fragment is not running.
    pub fn checkpoint(
        &mut self,
        id: FragmentId,
        blob: i64,
        acked_before: &IntervalSet,
    ) -> Option<IntervalSet> {
        let covers = self.checkpoint_covers(id, acked_before)?;
        let f = self.running.iter_mut().find(|f| f.id == id)?;
        f.checkpoint = Some(blob);
        f.covers = covers.clone();
        if !self.stateful {
            self.learn_stateful();
        }
        Some(covers)
    }

    /// Records that the stage's tasks keep state: items finished fragments counted
    /// done without any go back to pending (returns them); running fragments' acks
    /// are judged when they end.
    pub fn learn_stateful(&mut self) -> IntervalSet {
        self.stateful = true;
        let mut reverted = std::mem::take(&mut self.stateless_done);
        for f in &self.running {
            reverted.subtract(&f.acked);
        }
        self.forget(&reverted);
        reverted
    }

    /// The items a checkpoint of a running fragment holds the state of, written
    /// after it had acked `acked_before`: what it inherited and those acks.
    pub fn checkpoint_covers(
        &self,
        id: FragmentId,
        acked_before: &IntervalSet,
    ) -> Option<IntervalSet> {
        let f = self.fragment(id)?;
        let mut covers = f.inherited.clone();
        covers.union_with(&acked_before.intersection(&f.acked));
        Some(covers)
    }

    /// The worker could not restore the checkpoint a fragment was handed and fell
    /// back to an older one of its chain (`restored`, holding the state of
    /// `restored_covers`) or to none. Items whose state only the lost checkpoints
    /// held go back to pending (their state is gone: they run again, as a chain of
    /// their own); returns how many.
    pub fn fallback(
        &mut self,
        id: FragmentId,
        restored: Option<i64>,
        restored_covers: &IntervalSet,
    ) -> u64 {
        let Some(f) = self.running.iter_mut().find(|f| f.id == id) else {
            return 0;
        };
        let kept = f.inherited.intersection(restored_covers);
        let lost = f.inherited.difference(&kept);
        let own = f.checkpoint != f.resumed_from;
        f.resumed_from = restored;
        f.inherited = kept.clone();
        if own {
            f.covers.subtract(&lost);
        } else {
            f.checkpoint = restored;
            f.covers = kept;
        }
        self.forget(&lost)
    }

    /// Items whose state was lost (a chain's result that cannot be found, a
    /// checkpoint that failed) go back to pending, as a chain of their own; returns
    /// how many were done.
    pub fn forget(&mut self, items: &IntervalSet) -> u64 {
        let lost = items.intersection(&self.done);
        self.undo(&lost);
        for span in lost.spans() {
            self.pending.push(PendingRange::fresh(span));
        }
        lost.len()
    }

    /// Items no longer counted done (the caller puts them back where they belong).
    fn undo(&mut self, items: &IntervalSet) {
        self.done.subtract(items);
        self.unconfirmed.subtract(items);
        self.stateless_done.subtract(items);
    }

    /// Splits the tail `[at, end)` off a running fragment back into pending.
    /// Refused (returns 0) if any item of the tail was already acked.
    pub fn split(&mut self, id: FragmentId, at: u64) -> u64 {
        let Some(f) = self.running.iter_mut().find(|f| f.id == id) else {
            return 0;
        };
        if at <= f.span.start
            || at >= f.span.end
            || !f.acked.within(Span::new(at, f.span.end)).is_empty()
        {
            return 0;
        }
        let tail = Span::new(at, f.span.end);
        f.span.end = at;
        self.pending.push(PendingRange {
            failures: f.failures,
            lost: f.lost,
            floor_memory_mb: f.floor_memory_mb,
            ..PendingRange::fresh(tail)
        });
        tail.len()
    }

    /// Ends a running fragment: acked items stay done (unless the state they were
    /// acked into is lost), the rest moves by `outcome`. `retries` is the retry
    /// budget of the failure's cause (see [`retry_budget`]).
    pub fn finish(
        &mut self,
        id: FragmentId,
        outcome: &FinishOutcome,
        retries: u32,
    ) -> FinishReport {
        let mut report = FinishReport::default();
        let Some(pos) = self.running.iter().position(|f| f.id == id) else {
            return report;
        };
        let f = self.running.swap_remove(pos);
        let rest = f.acked.complement_within(f.span);
        match outcome {
            FinishOutcome::AllOrNothing { fed_end } if self.acking => {
                report.unacked = true;
                let failed = FinishOutcome::Failed {
                    culprits: IntervalSet::new(),
                    rest_failed: true,
                    fed_end: *fed_end,
                };
                self.end_unfinished(
                    &f,
                    &failed,
                    retry_budget(Some("unacked"), retries),
                    &mut report,
                );
            }
            FinishOutcome::Success | FinishOutcome::AllOrNothing { .. } => {
                report.done = rest.len();
                self.done.union_with(&rest);
                if matches!(outcome, FinishOutcome::AllOrNothing { .. }) {
                    self.unconfirmed.union_with(&rest);
                }
                self.end_chain(&f, &rest, &mut report);
                if !self.stateful {
                    self.stateless_done.union_with(&f.acked);
                    self.stateless_done.union_with(&rest);
                }
            }
            _ => self.end_unfinished(&f, outcome, retries, &mut report),
        }
        report
    }

    /// A fragment that finished its items: its chain ends in a result.
    fn end_chain(&self, f: &RunningFragment, rest: &IntervalSet, report: &mut FinishReport) {
        let mut all = f.acked.clone();
        all.union_with(rest);
        let Some(checkpoint) = f.checkpoint else {
            if self.stateful {
                // Its stage keeps state, but it never handed any over.
                report.uncovered = all.len();
            }
            return; // else a stateless task
        };
        let covers = if f.checkpoint != f.resumed_from {
            // Its own last checkpoint, written at the end of input, holds the
            // items it acked before it and those done by its exit.
            let mut c = f.covers.clone();
            c.union_with(rest);
            c
        } else {
            // It never handed over the state it resumed with.
            f.inherited.clone()
        };
        report.uncovered = all.difference(&covers).len();
        report.result = Some((checkpoint, covers));
    }

    /// A fragment that stopped before finishing (yield, loss, failure): its acked
    /// items outside the state it resumes from go back, the rest moves by `outcome`.
    fn end_unfinished(
        &mut self,
        f: &RunningFragment,
        outcome: &FinishOutcome,
        retries: u32,
        report: &mut FinishReport,
    ) {
        // The state a remainder resumes from. A task that acks covers the acks before
        // each checkpoint; one that never acks may have put any fed item in its
        // state, so its remainder resumes from what it inherited.
        let (checkpoint, covers) = if self.acking {
            (f.checkpoint, f.covers.clone())
        } else {
            (f.resumed_from, f.inherited.clone())
        };
        let undone = if self.stateful || checkpoint.is_some() || f.checkpoint.is_some() {
            f.acked.difference(&covers)
        } else {
            IntervalSet::new() // a stateless task: its acks stand
        };
        if !self.stateful {
            self.stateless_done.union_with(&f.acked.difference(&undone));
        }
        self.undo(&undone);
        report.undone = undone.len();
        let (charged, uncharged, lost) = charge(f, outcome, undone);
        // The state goes to the first item left of the chain.
        let first = [&uncharged, &charged]
            .iter()
            .filter_map(|s| s.first())
            .min();
        if first.is_none() {
            // Every item is done and held by the state: the chain ends here.
            if let Some(checkpoint) = checkpoint {
                report.result = Some((checkpoint, covers));
            }
            return;
        }
        let state = |span: Span| -> (Option<i64>, IntervalSet) {
            if Some(span.start) == first {
                (checkpoint, covers.clone())
            } else {
                (None, IntervalSet::new())
            }
        };
        for span in uncharged.spans() {
            report.requeued += span.len();
            let (checkpoint, covers) = state(span);
            self.pending.push(PendingRange {
                span,
                failures: f.failures,
                checkpoint,
                lost,
                floor_memory_mb: f.floor_memory_mb,
                covers,
            });
        }
        for span in charged.spans() {
            let (checkpoint, covers) = state(span);
            self.fail(span, f, checkpoint, covers, retries, report);
        }
    }

    /// Items of fragment `f` that failed (once more): retried while within
    /// `retries`, then split until a failing item is alone and quarantined. The
    /// first split probes the first item alone (a task that dies on an item dies on
    /// the first one it did not ack), later ones halve. A quarantined item that
    /// carried its chain's state ends the chain: that state is a result.
    fn fail(
        &mut self,
        span: Span,
        f: &RunningFragment,
        checkpoint: Option<i64>,
        covers: IntervalSet,
        retries: u32,
        report: &mut FinishReport,
    ) {
        let failures = f.failures + 1;
        let range = |span, checkpoint, covers| PendingRange {
            span,
            failures,
            checkpoint,
            lost: f.lost,
            floor_memory_mb: f.floor_memory_mb,
            covers,
        };
        if failures <= retries {
            report.requeued += span.len();
            self.pending.push(range(span, checkpoint, covers));
        } else if span.len() == 1 {
            self.quarantined.insert(span);
            report.quarantined.insert(span);
            if let Some(checkpoint) = checkpoint {
                report.result = Some((checkpoint, covers));
            }
        } else {
            report.requeued += span.len();
            let cut = if failures == retries.saturating_add(1) {
                span.start + 1
            } else {
                span.start + span.len() / 2
            };
            self.pending
                .push(range(Span::new(span.start, cut), checkpoint, covers));
            self.pending
                .push(range(Span::new(cut, span.end), None, IntervalSet::new()));
        }
    }

    /// Panics unless pending, running-unacked, done and quarantined partition
    /// `0..items`, every fragment's acks are inside it and counted done, and the
    /// state every checkpoint carries is of items done.
    pub fn assert_consistent(&self) {
        let mut seen = IntervalSet::new();
        let mut total = 0u64;
        let mut add = |set: &IntervalSet, what: &str| {
            assert!(
                !seen.intersects(set),
                "{what} overlaps another part: {set:?}"
            );
            seen.union_with(set);
            total += set.len();
        };
        add(&self.pending.to_set(), "pending");
        add(&self.done, "done");
        add(&self.quarantined, "quarantined");
        for f in &self.running {
            assert_eq!(
                f.acked.within(f.span),
                f.acked,
                "fragment {} acked outside its span",
                f.id
            );
            assert!(
                f.acked.is_subset(&self.done),
                "fragment {} acked items not counted done",
                f.id
            );
            assert!(
                f.covers.is_subset(&self.done) && f.inherited.is_subset(&self.done),
                "fragment {} carries state of items not done",
                f.id
            );
            add(&f.acked.complement_within(f.span), "running");
        }
        assert_eq!(total, self.items, "items lost or invented");
        assert_eq!(
            seen,
            IntervalSet::from_span(Span::new(0, self.items)),
            "partition is not 0..items"
        );
        for w in self.pending.ranges.windows(2) {
            assert!(w[0].span.end <= w[1].span.start, "pending not sorted");
        }
        for r in &self.pending.ranges {
            assert!(
                r.covers.is_subset(&self.done),
                "pending {:?} carries state of items not done",
                r.span
            );
            assert!(
                r.checkpoint.is_some() || r.covers.is_empty(),
                "pending {:?} covers items without a checkpoint",
                r.span
            );
        }
        assert!(
            self.unconfirmed.is_subset(&self.done),
            "unconfirmed items not done"
        );
        assert!(
            !self.acking || self.unconfirmed.is_empty(),
            "unconfirmed items in a stage known to ack"
        );
        assert!(
            self.stateless_done.is_subset(&self.done),
            "stateless items not done"
        );
        assert!(
            !self.stateful || self.stateless_done.is_empty(),
            "stateless items in a stage known to keep state"
        );
    }
}

#[cfg(test)]
mod tests;

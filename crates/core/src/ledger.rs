//! Exactly-once accounting of one stage's items.
//!
//! Every item of a stage is in exactly one place: pending, running (inside a
//! fragment, not yet acked), done or quarantined. The transitions below (claim,
//! ack, split, finish) are the only ways items move, and each one is applied in a
//! single store transaction. `assert_consistent` checks the partition; property
//! tests drive random transitions through it.

use crate::ids::FragmentId;
use crate::intervals::{IntervalSet, Span};
use serde::{Deserialize, Serialize};

/// A pending span with what is known of its history.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct PendingRange {
    /// The items.
    pub span: Span,
    /// How many times these items failed. Above the stage's `retries` the span is
    /// run whole once more as a probe, then halved on failure (bisection).
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
            ..first.clone()
        };
        first.span.start += n;
        Some(head)
    }
}

/// Only never-failed ranges merge: a failed range keeps its bounds so that
/// bisection's halves stay apart.
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
}

/// How a fragment ended, as far as accounting is concerned.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum FinishOutcome {
    /// Every item not yet acked is done too.
    Success,
    /// Stopped early at a safe point; the unacked rest is pending again, no failure counted.
    Yielded,
    /// Its worker vanished or its lease expired; like a yield.
    Lost,
    /// It failed. `culprits` are items known to have failed (per-item mode); the
    /// rest of the unacked items count a failure too only if `rest_failed`.
    Failed {
        /// Items that certainly failed.
        culprits: IntervalSet,
        /// Whether the other unacked items share the failure.
        rest_failed: bool,
    },
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
}

impl StageLedger {
    /// A stage with every item pending.
    pub fn new(items: u64) -> StageLedger {
        let mut pending = Pending::default();
        pending.push(PendingRange {
            span: Span::new(0, items),
            failures: 0,
            checkpoint: None,
            lost: 0,
            floor_memory_mb: 0,
        });
        StageLedger {
            items,
            pending,
            done: IntervalSet::new(),
            quarantined: IntervalSet::new(),
            running: Vec::new(),
        }
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
        });
        Some(Claim {
            span: range.span,
            failures: range.failures,
            checkpoint: range.checkpoint,
            lost: range.lost,
            floor_memory_mb: range.floor_memory_mb,
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

    /// Records acks of a running fragment; returns how many items became done.
    /// Indices outside the fragment, or acked before, are ignored, so a repeated
    /// flush never counts an item twice. A fragment that is not running gets nothing.
    pub fn ack(&mut self, id: FragmentId, acked: &IntervalSet) -> u64 {
        let Some(f) = self.running.iter_mut().find(|f| f.id == id) else {
            return 0;
        };
        let mut new = acked.within(f.span);
        new.subtract(&f.acked);
        f.acked.union_with(&new);
        self.done.union_with(&new);
        new.len()
    }

    /// Records a checkpoint written by a running fragment.
    pub fn checkpoint(&mut self, id: FragmentId, blob: i64) -> bool {
        match self.running.iter_mut().find(|f| f.id == id) {
            Some(f) => {
                f.checkpoint = Some(blob);
                true
            }
            None => false,
        }
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
            span: tail,
            failures: f.failures,
            checkpoint: None,
            lost: f.lost,
            floor_memory_mb: f.floor_memory_mb,
        });
        tail.len()
    }

    /// Ends a running fragment: acked items stay done, the rest moves by `outcome`.
    /// `retries` is the stage's retry budget.
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
            FinishOutcome::Success => {
                report.done = rest.len();
                self.done.union_with(&rest);
            }
            FinishOutcome::Yielded => {
                report.requeued = rest.len();
                self.requeue(&rest, &f, f.lost, f.checkpoint);
            }
            FinishOutcome::Lost => {
                report.requeued = rest.len();
                self.requeue(&rest, &f, f.lost + 1, f.checkpoint);
            }
            FinishOutcome::Failed {
                culprits,
                rest_failed,
            } => {
                let culprits = {
                    let mut c = culprits.clone();
                    c.subtract(&f.acked);
                    c.within(f.span)
                };
                let mut others = rest.clone();
                others.subtract(&culprits);
                if *rest_failed {
                    self.fail(&others, &f, retries, &mut report);
                } else {
                    report.requeued += others.len();
                    // Untouched items resume without the failed attempt's state.
                    self.requeue(&others, &f, f.lost, None);
                }
                self.fail(&culprits, &f, retries, &mut report);
            }
        }
        report
    }

    fn requeue(
        &mut self,
        rest: &IntervalSet,
        f: &RunningFragment,
        lost: u32,
        checkpoint: Option<i64>,
    ) {
        for (i, span) in rest.spans().enumerate() {
            let checkpoint = if i == 0 { checkpoint } else { None };
            self.pending.push(PendingRange {
                span,
                failures: f.failures,
                checkpoint,
                lost,
                floor_memory_mb: f.floor_memory_mb,
            });
        }
    }

    /// Items of fragment `f` that failed (once more): retried while within
    /// `retries`, then bisected: a single item is quarantined, a longer span is
    /// halved and each half is probed once more.
    fn fail(
        &mut self,
        items: &IntervalSet,
        f: &RunningFragment,
        retries: u32,
        report: &mut FinishReport,
    ) {
        let failures = f.failures + 1;
        let range = |span| PendingRange {
            span,
            failures,
            checkpoint: None,
            lost: f.lost,
            floor_memory_mb: f.floor_memory_mb,
        };
        for span in items.spans() {
            if failures <= retries {
                report.requeued += span.len();
                self.pending.push(range(span));
            } else if span.len() == 1 {
                self.quarantined.insert(span);
                report.quarantined.insert(span);
            } else {
                report.requeued += span.len();
                let mid = span.start + span.len() / 2;
                for half in [Span::new(span.start, mid), Span::new(mid, span.end)] {
                    self.pending.push(range(half));
                }
            }
        }
    }

    /// Panics unless pending, running-unacked, done and quarantined partition
    /// `0..items` and every fragment's acks are inside it and counted done.
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
            let mut acked_done = f.acked.clone();
            acked_done.subtract(&self.done);
            assert!(
                acked_done.is_empty(),
                "fragment {} acked items not counted done",
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
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[derive(Clone, Debug)]
    enum Op {
        Claim(u64),
        Ack(usize, u64, u64),
        Split(usize, u64),
        Finish(usize, u8),
    }

    fn op() -> impl Strategy<Value = Op> {
        prop_oneof![
            (1u64..40).prop_map(Op::Claim),
            (0usize..4, 0u64..40, 1u64..10).prop_map(|(f, o, l)| Op::Ack(f, o, l)),
            (0usize..4, 1u64..40).prop_map(|(f, o)| Op::Split(f, o)),
            (0usize..4, 0u8..5).prop_map(|(f, k)| Op::Finish(f, k)),
        ]
    }

    proptest! {
        /// No item lost, none counted done twice, under any interleaving.
        #[test]
        fn accounting_holds_under_random_transitions(items in 1u64..300, ops in prop::collection::vec(op(), 1..200)) {
            let mut ledger = StageLedger::new(items);
            let mut next_id = 0;
            let mut counted_done = 0u64;
            for op in ops {
                match op {
                    Op::Claim(n) => {
                        next_id += 1;
                        ledger.claim(FragmentId(next_id), n);
                    }
                    Op::Ack(i, offset, len) => if let Some(f) = ledger.running.get(i).cloned() {
                        let start = f.span.start + offset;
                        counted_done += ledger.ack(f.id, &IntervalSet::from_span(Span::new(start, start + len)));
                        // A repeated flush of the same acks counts nothing.
                        prop_assert_eq!(ledger.ack(f.id, &IntervalSet::from_span(Span::new(start, start + len))), 0);
                    },
                    Op::Split(i, offset) => if let Some(f) = ledger.running.get(i).cloned() {
                        ledger.split(f.id, f.span.start + offset);
                    },
                    Op::Finish(i, kind) => if let Some(f) = ledger.running.get(i).cloned() {
                        let outcome = match kind {
                            0 => FinishOutcome::Success,
                            1 => FinishOutcome::Yielded,
                            2 => FinishOutcome::Lost,
                            3 => FinishOutcome::Failed { culprits: IntervalSet::new(), rest_failed: true },
                            _ => FinishOutcome::Failed {
                                culprits: IntervalSet::from_span(Span::new(f.span.start, f.span.start + 1)),
                                rest_failed: false,
                            },
                        };
                        let report = ledger.finish(f.id, &outcome, 2);
                        counted_done += report.done;
                    },
                }
                ledger.assert_consistent();
                prop_assert_eq!(counted_done, ledger.done.len());
            }
        }

        /// Claim everything, fail what contains the poison item: it ends quarantined alone.
        #[test]
        fn bisection_isolates_a_poison_item(items in 1u64..500, poison_at in 0u64..500, n in 1u64..100) {
            let poison = poison_at % items;
            let mut ledger = StageLedger::new(items);
            let mut id = 0;
            for _ in 0..10_000 {
                id += 1;
                let Some(claim) = ledger.claim(FragmentId(id), n) else { break };
                let outcome = if (claim.span.start..claim.span.end).contains(&poison) {
                    // Batch semantics: items before the poison are acked, then the task dies.
                    ledger.ack(FragmentId(id), &IntervalSet::from_span(Span::new(claim.span.start, poison)));
                    FinishOutcome::Failed { culprits: IntervalSet::new(), rest_failed: true }
                } else {
                    FinishOutcome::Success
                };
                ledger.finish(FragmentId(id), &outcome, 3);
                ledger.assert_consistent();
            }
            prop_assert!(ledger.is_finished());
            prop_assert_eq!(ledger.quarantined, IntervalSet::from_span(Span::new(poison, poison + 1)));
            prop_assert_eq!(ledger.done.len(), items - 1);
        }
    }
}

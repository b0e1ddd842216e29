use super::*;
use proptest::prelude::*;
use std::collections::{BTreeMap, BTreeSet};

fn set(start: u64, end: u64) -> IntervalSet {
    IntervalSet::from_span(Span::new(start, end))
}

#[derive(Clone, Debug)]
enum Op {
    Claim(u64),
    Ack(usize, u64, u64),
    Split(usize, u64),
    Finish(usize, u8, u64),
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        (1u64..40).prop_map(Op::Claim),
        (0usize..4, 0u64..40, 1u64..10).prop_map(|(f, o, l)| Op::Ack(f, o, l)),
        (0usize..4, 1u64..40).prop_map(|(f, o)| Op::Split(f, o)),
        (0usize..4, 0u8..6, 0u64..40).prop_map(|(f, k, fed)| Op::Finish(f, k, fed)),
    ]
}

proptest! {
    /// No item lost, none counted done twice, under any interleaving.
    #[test]
    fn accounting_holds_under_random_transitions(items in 1u64..300, ops in prop::collection::vec(op(), 1..200)) {
        let mut ledger = StageLedger::new(items);
        let mut next_id = 0;
        for op in ops {
            match op {
                Op::Claim(n) => {
                    next_id += 1;
                    ledger.claim(FragmentId(next_id), n);
                }
                Op::Ack(i, offset, len) => if let Some(f) = ledger.running.get(i).cloned() {
                    let start = f.span.start + offset;
                    ledger.ack(f.id, &set(start, start + len));
                    // A repeated flush of the same acks counts nothing.
                    prop_assert_eq!(ledger.ack(f.id, &set(start, start + len)).done, 0);
                },
                Op::Split(i, offset) => if let Some(f) = ledger.running.get(i).cloned() {
                    ledger.split(f.id, f.span.start + offset);
                },
                Op::Finish(i, kind, fed) => if let Some(f) = ledger.running.get(i).cloned() {
                    let fed_end = f.span.start + fed;
                    let outcome = match kind {
                        0 => FinishOutcome::Success,
                        1 => FinishOutcome::Yielded,
                        2 => FinishOutcome::Lost,
                        3 => FinishOutcome::Failed { culprits: IntervalSet::new(), rest_failed: true, fed_end },
                        4 => FinishOutcome::AllOrNothing { fed_end },
                        _ => FinishOutcome::Failed {
                            culprits: set(f.span.start, f.span.start + 1),
                            rest_failed: false,
                            fed_end,
                        },
                    };
                    ledger.finish(f.id, &outcome, 2);
                },
            }
            ledger.assert_consistent();
        }
    }

    /// Claim everything, fail what contains the poison item: it ends quarantined alone.
    #[test]
    fn bisection_isolates_a_poison_item(items in 1u64..500, poison_at in 0u64..500, n in 1u64..100, fed_extra in 0u64..100) {
        let poison = poison_at % items;
        let mut ledger = StageLedger::new(items);
        let mut id = 0;
        for _ in 0..10_000 {
            id += 1;
            let Some(claim) = ledger.claim(FragmentId(id), n) else { break };
            let outcome = if (claim.span.start..claim.span.end).contains(&poison) {
                // Batch semantics: items before the poison are acked, then the task
                // dies; it was fed a window beyond the poison.
                ledger.ack(FragmentId(id), &set(claim.span.start, poison));
                FinishOutcome::Failed { culprits: IntervalSet::new(), rest_failed: true, fed_end: poison + 1 + fed_extra }
            } else {
                FinishOutcome::Success
            };
            ledger.finish(FragmentId(id), &outcome, 3);
            ledger.assert_consistent();
        }
        prop_assert!(ledger.is_finished());
        prop_assert_eq!(ledger.quarantined, set(poison, poison + 1));
        prop_assert_eq!(ledger.done.len(), items - 1);
    }
}

#[test]
fn a_failure_charges_only_the_items_fed_and_not_acked() {
    let mut ledger = StageLedger::new(100);
    ledger.claim(FragmentId(1), 100);
    ledger.ack(FragmentId(1), &set(0, 10));
    let outcome = FinishOutcome::Failed {
        culprits: IntervalSet::new(),
        rest_failed: true,
        fed_end: 20,
    };
    ledger.finish(FragmentId(1), &outcome, 3);
    let ranges = ledger.pending.ranges();
    assert_eq!(ranges.len(), 2, "{ranges:?}");
    assert_eq!((ranges[0].span, ranges[0].failures), (Span::new(10, 20), 1));
    assert_eq!(
        (ranges[1].span, ranges[1].failures),
        (Span::new(20, 100), 0)
    );
}

#[test]
fn over_budget_the_first_unacked_item_is_probed_alone_first() {
    let mut ledger = StageLedger::new(64);
    for id in 1..=2 {
        let claim = ledger.claim(FragmentId(id), 64).unwrap();
        assert_eq!(claim.span, Span::new(0, 64));
        ledger.finish(FragmentId(id), &FinishOutcome::failed(), 1);
    }
    let spans: Vec<Span> = ledger.pending.ranges().iter().map(|r| r.span).collect();
    assert_eq!(spans, [Span::new(0, 1), Span::new(1, 64)]);
    // The probe fails: quarantined at once.
    ledger.claim(FragmentId(3), 64);
    let report = ledger.finish(FragmentId(3), &FinishOutcome::failed(), 1);
    assert_eq!(report.quarantined, set(0, 1));
    // The rest fails again (another poison inside): now it is halved.
    ledger.claim(FragmentId(4), 64);
    ledger.finish(FragmentId(4), &FinishOutcome::failed(), 1);
    let spans: Vec<Span> = ledger.pending.ranges().iter().map(|r| r.span).collect();
    assert_eq!(spans, [Span::new(1, 32), Span::new(32, 64)]);
    ledger.assert_consistent();
}

#[test]
fn the_first_ack_of_a_stage_reverts_what_all_or_nothing_fragments_counted() {
    let mut ledger = StageLedger::new(10);
    ledger.claim(FragmentId(1), 1); // item 0: its task acks
    ledger.claim(FragmentId(2), 1); // item 1: its task exits 0 without an ack
    let report = ledger.finish(
        FragmentId(2),
        &FinishOutcome::AllOrNothing { fed_end: 2 },
        3,
    );
    assert_eq!(report.done, 1);
    assert_eq!(ledger.unconfirmed, set(1, 2));
    let acked = ledger.ack(FragmentId(1), &set(0, 1));
    assert_eq!(acked.reverted, set(1, 2));
    assert!(ledger.acking);
    assert_eq!(ledger.done, set(0, 1));
    ledger.assert_consistent();
    // From now on, no ack means the fed items failed; unfed ones go back uncharged.
    ledger.finish(FragmentId(1), &FinishOutcome::Success, 3);
    ledger.claim(FragmentId(3), 9);
    let report = ledger.finish(
        FragmentId(3),
        &FinishOutcome::AllOrNothing { fed_end: 4 },
        3,
    );
    assert!(report.unacked);
    assert!(ledger.done.is_subset(&set(0, 1)));
    let charged: Vec<(Span, u32)> = ledger
        .pending
        .ranges()
        .iter()
        .map(|r| (r.span, r.failures))
        .collect();
    assert_eq!(charged, [(Span::new(1, 4), 1), (Span::new(4, 10), 0)]);
    ledger.assert_consistent();
}

#[test]
fn a_resumed_fragment_that_fails_hands_its_state_on_and_reruns_what_it_does_not_cover() {
    let mut ledger = StageLedger::new(100);
    ledger.acking = true;
    ledger.claim(FragmentId(1), 100);
    ledger.ack(FragmentId(1), &set(0, 30));
    let covers = ledger.checkpoint(FragmentId(1), 7, &set(0, 30)).unwrap();
    assert_eq!(covers, set(0, 30));
    ledger.ack(FragmentId(1), &set(30, 40)); // acked, but no checkpoint holds it
    let report = ledger.finish(FragmentId(1), &FinishOutcome::failed(), 3);
    assert_eq!(report.undone, 10);
    assert_eq!(ledger.done, set(0, 30));
    let first = &ledger.pending.ranges()[0];
    assert_eq!((first.span.start, first.checkpoint), (30, Some(7)));
    assert_eq!(first.covers, set(0, 30));
    // The acked-but-uncovered items are not charged; only the fed rest is.
    assert_eq!(first.failures, 0);
    ledger.assert_consistent();
    // The next attempt resumes from it and finishes: its result holds every item.
    let claim = ledger.claim(FragmentId(2), 100).unwrap();
    assert_eq!(claim.checkpoint, Some(7));
    while let Some(f) = ledger.running.first().cloned() {
        ledger.ack(f.id, &IntervalSet::from_span(f.span));
        let mut acked = ledger.fragment(f.id).unwrap().acked.clone();
        acked.union_with(&IntervalSet::from_span(f.span));
        ledger.checkpoint(f.id, 8 + f.id.0, &acked);
        let report = ledger.finish(f.id, &FinishOutcome::Success, 3);
        if f.id == FragmentId(2) {
            let (blob, covers) = report.result.expect("a result");
            assert_eq!(blob, 10);
            assert_eq!(covers, IntervalSet::from_span(Span::new(0, f.span.end)));
            assert_eq!(report.uncovered, 0);
        }
        ledger.claim(FragmentId(f.id.0 + 1), 100);
    }
    assert!(ledger.is_finished());
}

#[test]
fn a_fallback_reruns_the_items_only_the_lost_checkpoint_held() {
    let mut ledger = StageLedger::new(10);
    ledger.acking = true;
    ledger.claim(FragmentId(1), 10);
    ledger.ack(FragmentId(1), &set(0, 3));
    ledger.checkpoint(FragmentId(1), 1, &set(0, 3));
    ledger.ack(FragmentId(1), &set(3, 6));
    ledger.checkpoint(FragmentId(1), 2, &set(0, 6));
    ledger.finish(FragmentId(1), &FinishOutcome::Yielded, 3);
    let claim = ledger.claim(FragmentId(2), 10).unwrap();
    assert_eq!((claim.span, claim.checkpoint), (Span::new(6, 10), Some(2)));
    // Checkpoint 2 is corrupt: the worker restored checkpoint 1 (items 0..3).
    assert_eq!(ledger.fallback(FragmentId(2), Some(1), &set(0, 3)), 3);
    assert_eq!(ledger.done, set(0, 3));
    assert_eq!(ledger.pending.to_set(), set(3, 6));
    let f = ledger.fragment(FragmentId(2)).unwrap();
    assert_eq!((f.checkpoint, f.covers.clone()), (Some(1), set(0, 3)));
    ledger.assert_consistent();
}

#[test]
fn a_quarantined_item_at_the_head_of_a_chain_makes_its_state_a_result() {
    let mut ledger = StageLedger::new(4);
    ledger.acking = true;
    ledger.claim(FragmentId(1), 4);
    ledger.ack(FragmentId(1), &set(0, 2));
    ledger.checkpoint(FragmentId(1), 5, &set(0, 2));
    ledger.finish(FragmentId(1), &FinishOutcome::failed(), 0);
    // Over budget at once: the first unacked item alone carries the state.
    let head = &ledger.pending.ranges()[0];
    assert_eq!((head.span, head.checkpoint), (Span::new(2, 3), Some(5)));
    ledger.claim(FragmentId(2), 1);
    let report = ledger.finish(FragmentId(2), &FinishOutcome::failed(), 0);
    assert_eq!(report.quarantined, set(2, 3));
    assert_eq!(report.result, Some((5, set(0, 2))));
}

/// A well-behaved stateful task (its state is the set of items it acked, handed
/// over in one write with the acks), driven through random yields, losses,
/// failures, splits and lost checkpoints: every result holds exactly the state
/// the ledger says it covers, results never overlap, and when the stage is done
/// they hold every item done.
#[derive(Clone, Debug)]
enum StateOp {
    Claim(u64, bool),
    Step(usize, u64),
    /// The task acks its next item alone: its state is in memory only.
    AckAlone(usize),
    Split(usize, u64),
    End(usize, u8),
}

fn state_op() -> impl Strategy<Value = StateOp> {
    prop_oneof![
        (1u64..30, any::<bool>()).prop_map(|(n, corrupt)| StateOp::Claim(n, corrupt)),
        (0usize..3, 1u64..8).prop_map(|(f, n)| StateOp::Step(f, n)),
        (0usize..3).prop_map(StateOp::AckAlone),
        (0usize..3, 1u64..20).prop_map(|(f, o)| StateOp::Split(f, o)),
        (0usize..3, 0u8..4).prop_map(|(f, k)| StateOp::End(f, k)),
    ]
}

struct StatefulRun {
    ledger: StageLedger,
    blobs: BTreeMap<i64, (BTreeSet<u64>, Option<i64>)>,
    /// Per running fragment: the task's state and the checkpoint it last wrote.
    tasks: BTreeMap<FragmentId, (BTreeSet<u64>, Option<i64>)>,
    results: Vec<BTreeSet<u64>>,
    next: i64,
}

impl StatefulRun {
    fn claim(&mut self, n: u64, corrupt: bool) {
        self.next += 1;
        let id = FragmentId(self.next);
        let Some(claim) = self.ledger.claim(id, n) else {
            return;
        };
        let mut restored = claim.checkpoint;
        if corrupt {
            // The handed checkpoint is unreadable: fall back along its chain.
            restored = restored.and_then(|b| self.blobs[&b].1);
            let covers = restored.map_or_else(IntervalSet::new, |b| to_set(&self.blobs[&b].0));
            self.ledger.fallback(id, restored, &covers);
        }
        let state = restored.map_or_else(BTreeSet::new, |b| self.blobs[&b].0.clone());
        self.tasks.insert(id, (state, restored));
    }

    /// The task acks its next `n` items and hands over its state with them.
    fn step(&mut self, id: FragmentId, n: u64) {
        let f = self.ledger.fragment(id).unwrap().clone();
        let next = f.acked.complement_within(f.span);
        // (With nothing left to ack it still hands over its state.)
        let first = next.first().unwrap_or(f.span.end);
        let acks = set(first, (first + n).min(f.span.end)).intersection(&next);
        self.ledger.ack(id, &acks);
        let task = self.tasks.get_mut(&id).unwrap();
        task.0.extend(acks.spans().flat_map(|s| s.start..s.end));
        self.next += 1;
        let blob = self.next;
        self.blobs.insert(blob, (task.0.clone(), task.1));
        task.1 = Some(blob);
        let acked = self.ledger.fragment(id).unwrap().acked.clone();
        let covers = self.ledger.checkpoint(id, blob, &acked).unwrap();
        assert_eq!(
            to_set(&self.blobs[&blob].0),
            covers,
            "a checkpoint holds what it covers"
        );
    }

    fn ack_alone(&mut self, id: FragmentId) {
        let f = self.ledger.fragment(id).unwrap().clone();
        let Some(next) = f.acked.complement_within(f.span).first() else {
            return;
        };
        self.ledger.ack(id, &set(next, next + 1));
        self.tasks.get_mut(&id).unwrap().0.insert(next);
    }

    fn end(&mut self, id: FragmentId, outcome: FinishOutcome) {
        if outcome == FinishOutcome::Success {
            let f = self.ledger.fragment(id).unwrap().clone();
            self.step(id, f.span.len());
        }
        self.tasks.remove(&id);
        let report = self.ledger.finish(id, &outcome, 2);
        assert_eq!(report.uncovered, 0);
        if let Some((blob, covers)) = report.result {
            assert_eq!(
                to_set(&self.blobs[&blob].0),
                covers,
                "a result holds what it covers"
            );
            self.results.push(self.blobs[&blob].0.clone());
        }
    }
}

fn to_set(items: &BTreeSet<u64>) -> IntervalSet {
    let mut s = IntervalSet::new();
    for &i in items {
        s.insert_one(i);
    }
    s
}

proptest! {
    #[test]
    fn stateful_results_are_exact_under_any_mix_of_faults(items in 1u64..120, ops in prop::collection::vec(state_op(), 1..150)) {
        let mut run = StatefulRun {
            ledger: StageLedger::new(items),
            blobs: BTreeMap::new(),
            tasks: BTreeMap::new(),
            results: Vec::new(),
            next: 0,
        };
        run.ledger.acking = true;
        let pick = |run: &StatefulRun, i: usize| run.ledger.running.get(i).map(|f| f.id);
        for op in ops {
            match op {
                StateOp::Claim(n, corrupt) => run.claim(n, corrupt),
                StateOp::Step(i, n) => if let Some(id) = pick(&run, i) { run.step(id, n) },
                StateOp::AckAlone(i) => if let Some(id) = pick(&run, i) { run.ack_alone(id) },
                StateOp::Split(i, o) => if let Some(id) = pick(&run, i) {
                    let f = run.ledger.fragment(id).unwrap().clone();
                    run.ledger.split(id, f.span.start + o);
                },
                StateOp::End(i, k) => if let Some(id) = pick(&run, i) {
                    let outcome = match k {
                        0 => FinishOutcome::Success,
                        1 => FinishOutcome::Yielded,
                        2 => FinishOutcome::Lost,
                        _ => FinishOutcome::failed(),
                    };
                    run.end(id, outcome);
                },
            }
            run.ledger.assert_consistent();
        }
        // Drive it to the end with clean attempts.
        for _ in 0..10_000 {
            if let Some(f) = run.ledger.running.first().cloned() {
                run.end(f.id, FinishOutcome::Success);
            } else if run.ledger.pending.is_empty() {
                break;
            } else {
                run.claim(1 << 20, false);
            }
        }
        prop_assert!(run.ledger.is_finished());
        let mut all = BTreeSet::new();
        for r in &run.results {
            prop_assert!(all.is_disjoint(r), "results overlap");
            all.extend(r.iter().copied());
        }
        if run.ledger.stateful {
            prop_assert_eq!(to_set(&all), run.ledger.done.clone());
        } else {
            // No task of the stage ever handed over state: it has no results.
            prop_assert!(run.results.is_empty());
        }
        prop_assert_eq!(run.ledger.done.len() + run.ledger.quarantined.len(), items);
    }
}

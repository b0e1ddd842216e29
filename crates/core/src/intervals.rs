//! Interval sets over item indices.
//!
//! granule never stores a row or a bit per item: every set of items (pending, acked,
//! done, quarantined) is a sorted list of disjoint half-open spans, so a hundred
//! million items in one piece cost sixteen bytes.

use serde::{Deserialize, Serialize};

/// A half-open range of item indices `[start, end)`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub struct Span {
    /// First index in the span.
    pub start: u64,
    /// One past the last index.
    pub end: u64,
}

impl Span {
    /// The span `[start, end)`; `end < start` is clamped to empty.
    pub fn new(start: u64, end: u64) -> Span {
        Span {
            start,
            end: end.max(start),
        }
    }

    /// Number of indices in the span.
    pub fn len(&self) -> u64 {
        self.end - self.start
    }

    /// Whether the span holds no index.
    pub fn is_empty(&self) -> bool {
        self.end <= self.start
    }
}

/// A set of item indices kept as sorted, disjoint, non-touching spans.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(transparent)]
pub struct IntervalSet {
    spans: Vec<(u64, u64)>,
}

impl IntervalSet {
    /// The empty set.
    pub fn new() -> IntervalSet {
        IntervalSet::default()
    }

    /// The set holding exactly `span`.
    pub fn from_span(span: Span) -> IntervalSet {
        let mut set = IntervalSet::new();
        set.insert(span);
        set
    }

    /// Number of indices in the set.
    pub fn len(&self) -> u64 {
        self.spans.iter().map(|(s, e)| e - s).sum()
    }

    /// Whether the set is empty.
    pub fn is_empty(&self) -> bool {
        self.spans.is_empty()
    }

    /// Number of spans the set is made of (its storage cost).
    pub fn span_count(&self) -> usize {
        self.spans.len()
    }

    /// The spans in increasing order.
    pub fn spans(&self) -> impl Iterator<Item = Span> + '_ {
        self.spans.iter().map(|&(start, end)| Span { start, end })
    }

    /// The smallest index in the set.
    pub fn first(&self) -> Option<u64> {
        self.spans.first().map(|s| s.0)
    }

    /// Whether `index` is in the set.
    pub fn contains(&self, index: u64) -> bool {
        let i = self.spans.partition_point(|&(_, e)| e <= index);
        i < self.spans.len() && self.spans[i].0 <= index
    }

    /// Adds every index of `span`, merging with touching spans.
    pub fn insert(&mut self, span: Span) {
        if span.is_empty() {
            return;
        }
        // First span whose end reaches span.start (touching counts), and first span
        // that starts after span.end (touching counts as overlap).
        let lo = self.spans.partition_point(|&(_, e)| e < span.start);
        let hi = self.spans.partition_point(|&(s, _)| s <= span.end);
        let mut start = span.start;
        let mut end = span.end;
        if lo < hi {
            start = start.min(self.spans[lo].0);
            end = end.max(self.spans[hi - 1].1);
        }
        self.spans.splice(lo..hi, [(start, end)]);
    }

    /// Adds one index.
    pub fn insert_one(&mut self, index: u64) {
        self.insert(Span::new(index, index + 1));
    }

    /// Adds every index of `other`.
    pub fn union_with(&mut self, other: &IntervalSet) {
        for span in other.spans() {
            self.insert(span);
        }
    }

    /// Removes every index of `span`.
    pub fn remove(&mut self, span: Span) {
        if span.is_empty() {
            return;
        }
        let lo = self.spans.partition_point(|&(_, e)| e <= span.start);
        let hi = self.spans.partition_point(|&(s, _)| s < span.end);
        if lo >= hi {
            return;
        }
        let mut keep = Vec::with_capacity(2);
        let (first_start, _) = self.spans[lo];
        let (_, last_end) = self.spans[hi - 1];
        if first_start < span.start {
            keep.push((first_start, span.start));
        }
        if last_end > span.end {
            keep.push((span.end, last_end));
        }
        self.spans.splice(lo..hi, keep);
    }

    /// Removes every index of `other`.
    pub fn subtract(&mut self, other: &IntervalSet) {
        for span in other.spans() {
            self.remove(span);
        }
    }

    /// The indices of `self` that lie inside `span`.
    pub fn within(&self, span: Span) -> IntervalSet {
        let lo = self.spans.partition_point(|&(_, e)| e <= span.start);
        let spans = self.spans[lo..]
            .iter()
            .take_while(|&&(s, _)| s < span.end)
            .map(|&(s, e)| (s.max(span.start), e.min(span.end)))
            .filter(|(s, e)| s < e)
            .collect();
        IntervalSet { spans }
    }

    /// Whether the two sets share an index.
    pub fn intersects(&self, other: &IntervalSet) -> bool {
        other.spans().any(|span| !self.within(span).is_empty())
    }

    /// The indices in both sets.
    pub fn intersection(&self, other: &IntervalSet) -> IntervalSet {
        let mut out = IntervalSet::new();
        for span in other.spans() {
            for part in self.within(span).spans() {
                out.insert(part);
            }
        }
        out
    }

    /// The indices of `self` that are not in `other`.
    pub fn difference(&self, other: &IntervalSet) -> IntervalSet {
        let mut out = self.clone();
        out.subtract(other);
        out
    }

    /// Whether every index of `self` is in `other`.
    pub fn is_subset(&self, other: &IntervalSet) -> bool {
        self.difference(other).is_empty()
    }

    /// The indices of `span` that are not in `self`.
    pub fn complement_within(&self, span: Span) -> IntervalSet {
        let mut rest = IntervalSet::from_span(span);
        rest.subtract(&self.within(span));
        rest
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use std::collections::BTreeSet;

    fn model(set: &IntervalSet) -> BTreeSet<u64> {
        set.spans().flat_map(|s| s.start..s.end).collect()
    }

    proptest! {
        #[test]
        fn matches_a_set_of_indices(ops in prop::collection::vec((any::<bool>(), 0u64..200, 0u64..20), 0..60)) {
            let mut set = IntervalSet::new();
            let mut reference = BTreeSet::new();
            for (add, start, len) in ops {
                let span = Span::new(start, start + len);
                if add {
                    set.insert(span);
                    reference.extend(span.start..span.end);
                } else {
                    set.remove(span);
                    for i in span.start..span.end { reference.remove(&i); }
                }
                prop_assert_eq!(model(&set), reference.clone());
                prop_assert_eq!(set.len(), reference.len() as u64);
                // Canonical form: sorted, non-empty, non-touching spans.
                let spans: Vec<Span> = set.spans().collect();
                for w in spans.windows(2) { prop_assert!(w[0].end < w[1].start); }
                for s in &spans { prop_assert!(!s.is_empty()); }
            }
            for i in 0..220 { prop_assert_eq!(set.contains(i), reference.contains(&i)); }
            let probe = Span::new(50, 120);
            let inside: BTreeSet<u64> = reference.iter().copied().filter(|i| (50..120).contains(i)).collect();
            prop_assert_eq!(model(&set.within(probe)), inside.clone());
            let outside: BTreeSet<u64> = (50..120).filter(|i| !reference.contains(i)).collect();
            prop_assert_eq!(model(&set.complement_within(probe)), outside);
        }
    }

    #[test]
    fn a_hundred_million_items_is_one_span() {
        let set = IntervalSet::from_span(Span::new(0, 100_000_000));
        assert_eq!(set.span_count(), 1);
        assert_eq!(set.len(), 100_000_000);
    }
}

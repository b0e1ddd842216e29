//! The pool's own history: when each worker of each class arrives and ends. It
//! depends on the scenario and seed only, never on placement, so every policy run
//! on a scenario meets the same pool, and the lower bound can be computed from it.

use crate::scenario::{ClassSpec, Scenario};
use rand::rngs::SmallRng;
use rand::SeedableRng;
use rand_distr::{Distribution, Exp};

/// Why a worker's life ends.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub(crate) enum Ending {
    /// Spot preemption (after `notice`, if any).
    Preempted,
    /// Its fixed lifespan ran out (known in advance).
    Lifespan,
    /// It would live past the horizon.
    Never,
}

/// One life of one worker position: from `start` to `end`, virtual ms.
#[derive(Clone, Copy, Debug, PartialEq)]
pub(crate) struct Life {
    /// Arrival.
    pub(crate) start: f64,
    /// End (the horizon if it never ends).
    pub(crate) end: f64,
    /// Why it ends.
    pub(crate) ending: Ending,
}

/// The successive lives of one worker position of a class: each life ends by
/// preemption or lifespan and is replaced `replace_after` later.
pub(crate) struct Lives {
    rng: SmallRng,
    next_start: f64,
    preempt: Option<Exp<f64>>,
    lifespan: Option<f64>,
    replace_after: f64,
    horizon: f64,
}

impl Lives {
    /// The lives of position `index` of class `class` (number `class_no`).
    pub(crate) fn new(s: &Scenario, class_no: usize, class: &ClassSpec, index: u32) -> Lives {
        let seed =
            s.seed ^ (class_no as u64).wrapping_mul(0x9E37_79B9_7F4A_7C15) ^ u64::from(index) << 20;
        let rate_per_ms = class.preempt_per_hour / 3_600_000.0;
        Lives {
            rng: SmallRng::seed_from_u64(seed),
            next_start: class.arrive_over * f64::from(index) / f64::from(class.count),
            preempt: (class.spot && rate_per_ms > 0.0)
                .then(|| Exp::new(rate_per_ms).expect("rate > 0")),
            lifespan: class.lifespan,
            replace_after: class.replace_after,
            horizon: s.horizon,
        }
    }
}

impl Lives {
    /// A life that starts at `start` (a worker launched then, as `granule serve`
    /// launches one), ending as the class's lives end.
    pub(crate) fn starting_at(&mut self, start: f64) -> Option<Life> {
        self.next_start = start;
        self.next()
    }
}

impl Iterator for Lives {
    type Item = Life;

    fn next(&mut self) -> Option<Life> {
        let start = self.next_start;
        if start >= self.horizon {
            return None;
        }
        let mut end = (self.horizon, Ending::Never);
        if let Some(life) = self.lifespan {
            end = (start + life, Ending::Lifespan).min_by(end);
        }
        if let Some(exp) = &self.preempt {
            end = (start + exp.sample(&mut self.rng), Ending::Preempted).min_by(end);
        }
        self.next_start = end.0 + self.replace_after;
        Some(Life {
            start,
            end: end.0,
            ending: end.1,
        })
    }
}

trait Earliest {
    fn min_by(self, other: Self) -> Self;
}

impl Earliest for (f64, Ending) {
    fn min_by(self, other: Self) -> Self {
        if self.0 <= other.0 {
            self
        } else {
            other
        }
    }
}

/// Slot-milliseconds each class has alive within `[from, to)`.
pub(crate) fn capacity(s: &Scenario, from: f64, to: f64) -> Vec<f64> {
    s.classes
        .iter()
        .enumerate()
        .map(|(c, class)| {
            let mut total = 0.0;
            for i in 0..class.count {
                for life in Lives::new(s, c, class, i) {
                    if life.start >= to {
                        break;
                    }
                    total += (life.end.min(to) - life.start.max(from)).max(0.0);
                }
            }
            total * f64::from(class.slots)
        })
        .collect()
}

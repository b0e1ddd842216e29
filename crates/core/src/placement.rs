//! Placement: which ready stage a worker's free slot should serve.
//!
//! A stage declares what one slot of it needs (CPUs, memory, GPUs, custom
//! resources), an executor class (required or preferred) and a priority. A worker
//! offers its class and what is free now (its resources less what its running
//! fragments hold). `fits` is the hard rule (never violated); `plan::order` sorts
//! the stages that fit.

use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;

/// What one slot of a stage needs.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct StageNeeds {
    /// CPUs per slot.
    pub cpus: f64,
    /// Memory per slot, MiB.
    pub memory_mb: u64,
    /// GPUs per slot.
    pub gpus: u32,
    /// Custom resources per slot (`licenses = 1`).
    pub resources: BTreeMap<String, f64>,
    /// Executor class the stage asks for.
    pub class: Option<String>,
    /// Whether `class` is required (else only preferred).
    pub class_required: bool,
    /// Higher runs first.
    pub priority: i64,
    /// Who the work is for (for fairness between owners).
    pub owner: Option<String>,
    /// The account the owner's work is charged to (fair share between accounts
    /// comes before fair share between owners).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub account: Option<String>,
    /// The class its name and command suggest when none is declared (a soft
    /// preference until history says more).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub guess: Option<String>,
    /// Finish within this long after submission, ms (the spec's `deadline`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub deadline_ms: Option<f64>,
}

impl StageNeeds {
    /// Who the work is for, as fair share counts it: (account, owner).
    pub fn owner_key(&self) -> crate::fair::OwnerKey {
        (self.account.clone(), self.owner.clone())
    }

    /// The class the stage prefers: the declared one, else the guessed one.
    pub fn preferred_class(&self) -> Option<&str> {
        self.class.as_deref().or(self.guess.as_deref())
    }
}

/// What a worker offers a free slot: its class and its resources free now.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct WorkerOffer {
    /// Its executor class.
    pub class: String,
    /// Its slots.
    pub slots: u32,
    /// CPUs it has.
    pub cpus: f64,
    /// Memory it has, MiB.
    pub memory_mb: u64,
    /// GPUs it has.
    pub gpus: u32,
    /// Custom resources it has.
    pub resources: BTreeMap<String, f64>,
    /// Whether it is spot capacity (may be preempted).
    #[serde(default)]
    pub spot: bool,
}

/// Why a stage does not fit a worker.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Misfit {
    /// The stage requires another class.
    Class(String),
    /// A resource is short: its name, what a slot needs, what the worker has free.
    Short(String, String, String),
}

impl std::fmt::Display for Misfit {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Misfit::Class(class) => write!(f, "requires class {class}"),
            Misfit::Short(what, need, have) => {
                write!(f, "needs {need} {what}, the worker has {have} free")
            }
        }
    }
}

/// Whether one more fragment of a stage with `needs` fits what `offer` has free.
pub fn fits(needs: &StageNeeds, offer: &WorkerOffer) -> Result<(), Misfit> {
    if needs.class_required {
        if let Some(class) = &needs.class {
            if class != &offer.class {
                return Err(Misfit::Class(class.clone()));
            }
        }
    }
    let short = |what: &str, need: f64, have: f64| {
        (need > have + 1e-9)
            .then(|| Misfit::Short(what.into(), format!("{need}"), format!("{have}")))
    };
    let checks = [
        short("cpus", needs.cpus, offer.cpus),
        short(
            "MiB of memory",
            needs.memory_mb as f64,
            offer.memory_mb as f64,
        ),
        short("gpus", f64::from(needs.gpus), f64::from(offer.gpus)),
    ];
    if let Some(misfit) = checks.into_iter().flatten().next() {
        return Err(misfit);
    }
    for (name, need) in &needs.resources {
        let have = offer.resources.get(name).copied().unwrap_or(0.0);
        if let Some(misfit) = short(name, *need, have) {
            return Err(misfit);
        }
    }
    Ok(())
}

impl WorkerOffer {
    /// What is left after a fragment of a stage with `needs` takes its share.
    pub fn less(&self, needs: &StageNeeds) -> WorkerOffer {
        let mut left = self.clone();
        left.cpus = (left.cpus - needs.cpus).max(0.0);
        left.memory_mb = left.memory_mb.saturating_sub(needs.memory_mb);
        left.gpus = left.gpus.saturating_sub(needs.gpus);
        for (name, need) in &needs.resources {
            if let Some(have) = left.resources.get_mut(name) {
                *have = (*have - need).max(0.0);
            }
        }
        left
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn offer() -> impl Strategy<Value = WorkerOffer> {
        (
            0u32..3,
            1u32..5,
            0.0f64..16.0,
            0u64..65_536,
            0u32..4,
            0.0f64..8.0,
        )
            .prop_map(|(c, slots, cpus, mem, gpus, lic)| WorkerOffer {
                class: ["cpu", "gpu", "memory"][c as usize].into(),
                slots,
                cpus,
                memory_mb: mem,
                gpus,
                resources: [("licenses".to_string(), lic)].into(),
                spot: false,
            })
    }

    fn needs() -> impl Strategy<Value = StageNeeds> {
        (
            0u32..4,
            any::<bool>(),
            0.0f64..4.0,
            0u64..16_384,
            0u32..2,
            0.0f64..3.0,
            -5i64..5,
        )
            .prop_map(|(c, required, cpus, mem, gpus, lic, priority)| StageNeeds {
                cpus,
                memory_mb: mem,
                gpus,
                resources: [("licenses".to_string(), lic)].into(),
                class: (c < 3).then(|| ["cpu", "gpu", "memory"][c as usize].to_string()),
                class_required: required,
                priority,
                owner: None,
                account: None,
                guess: None,
                deadline_ms: None,
            })
    }

    proptest! {
        /// A stage that fits never asks the worker's slots for more than it has,
        /// and never runs on a class other than the one it requires.
        #[test]
        fn fitting_never_violates_resources_or_a_required_class(n in needs(), o in offer()) {
            if fits(&n, &o).is_ok() {
                prop_assert!(n.cpus <= o.cpus + 1e-9);
                prop_assert!(n.memory_mb <= o.memory_mb);
                prop_assert!(n.gpus <= o.gpus);
                prop_assert!(n.resources["licenses"] <= o.resources["licenses"] + 1e-9);
                if n.class_required {
                    prop_assert!(n.class.as_ref().is_none_or(|c| c == &o.class));
                }
            }
        }

    }

    proptest! {
        /// Taking fragments one by one while they fit never hands out more than the worker has.
        #[test]
        fn successive_claims_never_oversubscribe(n in needs(), o in offer()) {
            let mut free = o.clone();
            let mut taken = 0u32;
            while fits(&n, &free).is_ok() && taken < 64 {
                free = free.less(&n);
                taken += 1;
            }
            prop_assert!(n.cpus == 0.0 || n.cpus * f64::from(taken) <= o.cpus + 1e-6);
            prop_assert!(n.gpus == 0 || n.gpus * taken <= o.gpus);
            prop_assert!(n.memory_mb == 0 || n.memory_mb * u64::from(taken) <= o.memory_mb);
        }
    }

    #[test]
    fn a_required_class_elsewhere_does_not_fit() {
        let o = WorkerOffer {
            class: "gpu".into(),
            slots: 1,
            cpus: 4.0,
            memory_mb: 1024,
            gpus: 1,
            resources: BTreeMap::new(),
            spot: false,
        };
        let on_cpu = StageNeeds {
            class: Some("cpu".into()),
            ..StageNeeds::default()
        };
        assert_eq!(fits(&on_cpu, &o), Ok(()), "preferred only");
        let required = StageNeeds {
            class_required: true,
            ..on_cpu
        };
        assert_eq!(fits(&required, &o), Err(Misfit::Class("cpu".into())));
    }
}

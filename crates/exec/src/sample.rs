//! Resource sampling on the worker's machine, for the sizer's pressure caps and
//! each fragment's record.

use sysinfo::{MemoryRefreshKind, RefreshKind, System};

/// One reading of the machine.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Sample {
    /// Share of memory available (0..1).
    pub free_memory: f64,
    /// One-minute load average divided by the number of CPUs.
    pub load_per_cpu: f64,
}

/// Reads memory and load; cheap enough to call once a second.
pub struct Sampler {
    system: Option<System>,
    cpus: f64,
}

impl Default for Sampler {
    fn default() -> Self {
        Sampler::new()
    }
}

impl Sampler {
    /// A sampler for this machine.
    pub fn new() -> Sampler {
        let system = System::new_with_specifics(
            RefreshKind::nothing().with_memory(MemoryRefreshKind::nothing().with_ram()),
        )
        .ok();
        let cpus = std::thread::available_parallelism().map_or(1, |n| n.get()) as f64;
        Sampler { system, cpus }
    }

    /// Takes a fresh reading.
    pub fn sample(&mut self) -> Sample {
        // Unknown readings count as no pressure.
        let free_memory = self.system.as_mut().map_or(1.0, |system| {
            system.refresh_memory_specifics(MemoryRefreshKind::nothing().with_ram());
            let total = system.total_memory();
            if total == 0 {
                1.0
            } else {
                system.available_memory() as f64 / total as f64
            }
        });
        let load = System::load_average().map_or(0.0, |l| l.one);
        Sample {
            free_memory,
            load_per_cpu: load / self.cpus,
        }
    }
}

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

/// What a worker's machine has, as detected: CPUs, memory and NVIDIA GPUs.
#[derive(Clone, Debug, Default, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct Detected {
    /// CPUs available to this process.
    pub cpus: u32,
    /// Total memory, MiB.
    pub memory_mb: u64,
    /// GPUs reported by `nvidia-smi` (none when it is absent or fails).
    pub gpus: Vec<Gpu>,
}

/// One GPU.
#[derive(Clone, Debug, Default, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct Gpu {
    /// Model name.
    pub name: String,
    /// Memory, MiB.
    pub memory_mb: u64,
}

/// Detects CPUs, memory and GPUs. GPUs come from `nvidia-smi` on PATH; a machine
/// without it (or without a driver) simply has none.
pub fn detect() -> Detected {
    let cpus = std::thread::available_parallelism().map_or(1, |n| n.get() as u32);
    let memory_mb = System::new_with_specifics(
        RefreshKind::nothing().with_memory(MemoryRefreshKind::nothing().with_ram()),
    )
    .map_or(0, |s| s.total_memory() / (1024 * 1024));
    Detected {
        cpus,
        memory_mb,
        gpus: nvidia_gpus(),
    }
}

fn nvidia_gpus() -> Vec<Gpu> {
    let out = std::process::Command::new("nvidia-smi")
        .args([
            "--query-gpu=name,memory.total",
            "--format=csv,noheader,nounits",
        ])
        .stdin(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .output();
    let Some(out) = out.ok().filter(|o| o.status.success()) else {
        return Vec::new();
    };
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(parse_gpu_line)
        .collect()
}

/// One line of `nvidia-smi --query-gpu=name,memory.total --format=csv,noheader,nounits`.
fn parse_gpu_line(line: &str) -> Option<Gpu> {
    let (name, memory) = line.rsplit_once(',')?;
    Some(Gpu {
        name: name.trim().to_string(),
        memory_mb: memory.trim().parse().ok()?,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_nvidia_smi_lines() {
        assert_eq!(
            parse_gpu_line("NVIDIA H100 80GB HBM3, 81559"),
            Some(Gpu {
                name: "NVIDIA H100 80GB HBM3".into(),
                memory_mb: 81559
            })
        );
        assert_eq!(parse_gpu_line("No devices were found"), None);
        let here = detect();
        assert!(here.cpus >= 1 && here.memory_mb > 0, "{here:?}");
    }
}

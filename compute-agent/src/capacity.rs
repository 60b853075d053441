//! What this host offers instances, reported at registration so that the coordinator places an instance only
//! where it fits (Nova's CPU and RAM filters). The host's CPUs and memory are read from `/proc` unless the
//! config names them; the allocation ratios and the memory kept for the host itself are Nova's settings with
//! Nova's defaults.

use ember_proto::agent::v1::ComputeCapacity;
use serde::Deserialize;

/// `[capacity]` in the compute agent's config.
#[derive(Debug, Clone, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct CapacityConfig {
    /// Host CPUs; default: the processors `/proc/cpuinfo` lists.
    pub vcpus: Option<u32>,
    /// Host memory in MiB; default: `MemTotal` in `/proc/meminfo`.
    pub memory_mb: Option<u64>,
    /// vCPUs instances may have per host CPU (Nova's `cpu_allocation_ratio`, default 4.0).
    pub cpu_allocation_ratio: f64,
    /// MiB of guest memory per MiB of host memory left to instances (Nova's `ram_allocation_ratio`, default 1.0).
    pub ram_allocation_ratio: f64,
    /// MiB kept for the host itself (Nova's `reserved_host_memory_mb`, default 512).
    pub reserved_host_memory_mb: u64,
}

impl Default for CapacityConfig {
    fn default() -> Self {
        CapacityConfig {
            vcpus: None,
            memory_mb: None,
            cpu_allocation_ratio: 4.0,
            ram_allocation_ratio: 1.0,
            reserved_host_memory_mb: 512,
        }
    }
}

/// The number of processors in `/proc/cpuinfo` text.
pub fn processors(cpuinfo: &str) -> u32 {
    cpuinfo.lines().filter(|l| l.split(':').next().is_some_and(|k| k.trim() == "processor")).count() as u32
}

/// `MemTotal` in MiB from `/proc/meminfo` text (`MemTotal:       24576000 kB`).
pub fn mem_total_mb(meminfo: &str) -> Option<u64> {
    let line = meminfo.lines().find(|l| l.starts_with("MemTotal:"))?;
    let mut words = line.split_whitespace().skip(1);
    let kib: u64 = words.next()?.parse().ok()?;
    (words.next() == Some("kB")).then_some(kib / 1024)
}

/// What a host with `cpus` CPUs and `memory_mb` MiB offers instances under `cfg`.
pub fn offered(cfg: &CapacityConfig, cpus: u32, memory_mb: u64) -> ComputeCapacity {
    let guest_memory = memory_mb.saturating_sub(cfg.reserved_host_memory_mb) as f64 * cfg.ram_allocation_ratio;
    ComputeCapacity { vcpus: (f64::from(cpus) * cfg.cpu_allocation_ratio) as u32, memory_mb: guest_memory as u64 }
}

/// This host's offer: the configured or `/proc`'s totals under the configured ratios.
pub fn of_host(cfg: &CapacityConfig) -> Result<ComputeCapacity, String> {
    for (name, ratio) in
        [("cpu_allocation_ratio", cfg.cpu_allocation_ratio), ("ram_allocation_ratio", cfg.ram_allocation_ratio)]
    {
        if !(ratio.is_finite() && ratio > 0.0) {
            return Err(format!("capacity.{name}: must be a number above 0, not {ratio}"));
        }
    }
    let read = |path: &str| std::fs::read_to_string(path).map_err(|e| format!("reading {path}: {e}"));
    let cpus = match cfg.vcpus {
        Some(n) => n,
        None => processors(&read("/proc/cpuinfo")?),
    };
    let memory_mb = match cfg.memory_mb {
        Some(m) => m,
        None => mem_total_mb(&read("/proc/meminfo")?).ok_or("/proc/meminfo has no MemTotal in kB")?,
    };
    Ok(offered(cfg, cpus, memory_mb))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn proc_files_are_read() {
        let cpuinfo = "processor\t: 0\nvendor_id\t: AuthenticAMD\nmodel name\t: processor X\n\nprocessor\t: 1\n";
        assert_eq!(processors(cpuinfo), 2);
        let meminfo = "MemTotal:       24576000 kB\nMemFree:        1000 kB\n";
        assert_eq!(mem_total_mb(meminfo), Some(24_000));
        assert_eq!(mem_total_mb("MemFree: 1 kB\n"), None);
        assert_eq!(mem_total_mb("MemTotal: 1 MB\n"), None);
    }

    #[test]
    fn the_offer_follows_novas_arithmetic() {
        let cfg = CapacityConfig::default();
        assert_eq!(offered(&cfg, 2, 24_000), ComputeCapacity { vcpus: 8, memory_mb: 23_488 });
        let tight = CapacityConfig { cpu_allocation_ratio: 1.5, ram_allocation_ratio: 0.5, ..cfg.clone() };
        assert_eq!(offered(&tight, 3, 2_560), ComputeCapacity { vcpus: 4, memory_mb: 1_024 });
        assert_eq!(offered(&cfg, 1, 256).memory_mb, 0, "all of it reserved");
        let zero = CapacityConfig { cpu_allocation_ratio: 0.0, ..cfg };
        assert!(of_host(&zero).unwrap_err().contains("cpu_allocation_ratio"));
    }
}

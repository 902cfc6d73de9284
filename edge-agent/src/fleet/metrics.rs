//! Host metrics for heartbeats: CPU since the last sample, memory, and the space on
//! the filesystems holding the sources and the agent's state.

use std::path::{Path, PathBuf};

use sysinfo::{Disks, System};
use wire::message::{Disk, DiskRole, Heartbeat};

pub struct Sampler {
    system: Option<System>,
    sources: Vec<PathBuf>,
    state: PathBuf,
}

impl Sampler {
    /// Metrics a platform cannot give are reported as zero, never as an error.
    pub fn new(sources: Vec<PathBuf>, state: PathBuf) -> Self {
        let system = System::new().ok().map(|mut s| {
            s.refresh_cpu_usage();
            s
        });
        Sampler {
            system,
            sources,
            state,
        }
    }

    pub fn sample(&mut self, at_ms: i64, next_backup_ms: Option<i64>, outbox: u64) -> Heartbeat {
        let (cpu, used, total) = match &mut self.system {
            Some(s) => {
                s.refresh_cpu_usage();
                s.refresh_memory();
                let cpu = (s.global_cpu_usage().clamp(0.0, 100.0) * 10.0) as u16;
                (cpu, s.used_memory(), s.total_memory())
            }
            None => (0, 0, 0),
        };
        Heartbeat {
            at_ms,
            cpu_permille: cpu,
            memory_used: used,
            memory_total: total,
            disks: self.disks(),
            next_backup_ms,
            outbox: u32::try_from(outbox).unwrap_or(u32::MAX),
        }
    }

    /// One entry per distinct filesystem, state first, at most four.
    fn disks(&self) -> wire::heapless::Vec<Disk, 4> {
        let mut out = wire::heapless::Vec::new();
        let Ok(disks) = Disks::new_with_refreshed_list() else {
            return out;
        };
        let mount_of = |p: &Path| {
            disks
                .iter()
                .filter(|d| p.starts_with(d.mount_point()))
                .max_by_key(|d| d.mount_point().as_os_str().len())
        };
        let wanted = std::iter::once((DiskRole::State, self.state.as_path()))
            .chain(self.sources.iter().map(|s| (DiskRole::Source, s.as_path())));
        for (role, path) in wanted {
            let Some(d) = mount_of(path) else { continue };
            let mount = d.mount_point().to_string_lossy();
            if out.iter().any(|x: &Disk| x.mount.as_str() == mount) {
                continue;
            }
            let disk = Disk {
                role,
                mount: wire::message::truncated(&mount),
                total: d.total_space(),
                available: d.available_space(),
            };
            if out.push(disk).is_err() {
                break;
            }
        }
        out
    }
}

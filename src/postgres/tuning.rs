//! Postgres's memory settings from the memory it may use: `Tuning::for_memory`
//! is pure (the renderer writes it); `host_memory` measures what a native
//! server may use (the tightest cgroup memory limit over keepd's process,
//! which Postgres inherits as keepd's child, or the host's RAM).

use std::path::{Path, PathBuf};

const MIB: u64 = 1024 * 1024;

/// The sizes keepd writes into postgresql.conf, in MiB (`work_mem` in KiB).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Tuning {
    /// What they were sized from, in MiB.
    pub memory_mb: u64,
    pub shared_buffers_mb: u64,
    pub effective_cache_size_mb: u64,
    pub work_mem_kb: u64,
    pub maintenance_work_mem_mb: u64,
    pub max_wal_size_mb: u64,
}

impl Tuning {
    /// The usual proportions: a quarter for shared buffers (at most
    /// 16 GiB), three quarters as the cache the planner may count on, a
    /// sixteenth for maintenance (at most 2 GiB), and per sort or hash what
    /// is left spread over four per connection (1 MiB to 256 MiB).
    pub fn for_memory(bytes: u64, max_connections: u32) -> Tuning {
        let memory_mb = (bytes / MIB).max(256);
        let shared_buffers_mb = (memory_mb / 4).clamp(32, 16 * 1024);
        let left_kb = (memory_mb - shared_buffers_mb) * 1024;
        Tuning {
            memory_mb,
            shared_buffers_mb,
            effective_cache_size_mb: memory_mb * 3 / 4,
            work_mem_kb: (left_kb / (u64::from(max_connections.max(1)) * 4))
                .clamp(1024, 256 * 1024),
            maintenance_work_mem_mb: (memory_mb / 16).clamp(16, 2048),
            max_wal_size_mb: (memory_mb / 2).clamp(1024, 16 * 1024),
        }
    }

    /// (name, value) as postgresql.conf takes them.
    pub fn settings(&self) -> [(&'static str, String); 5] {
        [
            ("shared_buffers", format!("'{}MB'", self.shared_buffers_mb)),
            (
                "effective_cache_size",
                format!("'{}MB'", self.effective_cache_size_mb),
            ),
            ("work_mem", format!("'{}kB'", self.work_mem_kb)),
            (
                "maintenance_work_mem",
                format!("'{}MB'", self.maintenance_work_mem_mb),
            ),
            ("max_wal_size", format!("'{}MB'", self.max_wal_size_mb)),
        ]
    }
}

/// The memory a server started by this process may use, and where that
/// figure comes from: the tightest cgroup memory limit over this process
/// (v1 or v2, its ancestors included), or the host's RAM.
pub fn host_memory() -> Option<(u64, &'static str)> {
    let ram = procfs::Current::current()
        .ok()
        .map(|m: procfs::Meminfo| m.mem_total);
    let limit = cgroup_limit();
    match (limit, ram) {
        (Some(limit), Some(ram)) if limit < ram => Some((limit, "the cgroup memory limit")),
        (_, Some(ram)) => Some((ram, "the host's RAM")),
        (Some(limit), None) => Some((limit, "the cgroup memory limit")),
        (None, None) => None,
    }
}

fn cgroup_limit() -> Option<u64> {
    let groups = procfs::process::Process::myself().ok()?.cgroups().ok()?;
    groups
        .0
        .iter()
        .filter_map(|group| {
            let (root, file) = match group.hierarchy {
                0 => (PathBuf::from("/sys/fs/cgroup"), "memory.max"),
                _ if group.controllers.iter().any(|c| c == "memory") => (
                    PathBuf::from("/sys/fs/cgroup/memory"),
                    "memory.limit_in_bytes",
                ),
                _ => return None,
            };
            tightest(&root, &group.pathname, file)
        })
        .min()
}

/// The lowest limit in `file` from the group at `path` up to `root`.
fn tightest(root: &Path, path: &str, file: &str) -> Option<u64> {
    let mut dir = root.join(path.trim_start_matches('/'));
    let mut lowest: Option<u64> = None;
    loop {
        if let Some(limit) = std::fs::read_to_string(dir.join(file))
            .ok()
            .and_then(|text| parse_limit(&text))
        {
            lowest = Some(lowest.map_or(limit, |l| l.min(limit)));
        }
        if dir == root || !dir.pop() || !dir.starts_with(root) {
            return lowest;
        }
    }
}

/// A cgroup limit: `max` (v2) or a v1 "unlimited" near 2^63 is none.
fn parse_limit(text: &str) -> Option<u64> {
    let value: u64 = text.trim().parse().ok()?;
    (value < 1 << 62).then_some(value)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_follow_memory_and_connections() {
        let small = Tuning::for_memory(1024 * MIB, 100);
        assert_eq!(
            (
                small.shared_buffers_mb,
                small.effective_cache_size_mb,
                small.work_mem_kb,
                small.maintenance_work_mem_mb,
                small.max_wal_size_mb
            ),
            (256, 768, 1966, 64, 1024)
        );
        let big = Tuning::for_memory(128 * 1024 * MIB, 100);
        assert_eq!(big.shared_buffers_mb, 16 * 1024, "capped");
        assert_eq!(big.maintenance_work_mem_mb, 2048, "capped");
        assert_eq!(big.work_mem_kb, 256 * 1024, "capped");
        assert_eq!(big.max_wal_size_mb, 16 * 1024);
        let tiny = Tuning::for_memory(64 * MIB, 500);
        assert_eq!(
            (tiny.memory_mb, tiny.shared_buffers_mb, tiny.work_mem_kb),
            (256, 64, 1024)
        );
        assert_eq!(
            small.settings()[0],
            ("shared_buffers", "'256MB'".to_string())
        );
    }

    #[test]
    fn the_tightest_limit_up_the_tree_counts() {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path();
        std::fs::create_dir_all(root.join("a/b")).unwrap();
        std::fs::write(root.join("memory.max"), "max\n").unwrap();
        std::fs::write(root.join("a/memory.max"), "1073741824\n").unwrap();
        std::fs::write(root.join("a/b/memory.max"), "2147483648\n").unwrap();
        assert_eq!(tightest(root, "/a/b", "memory.max"), Some(1 << 30));
        assert_eq!(tightest(root, "/", "memory.max"), None);
        assert_eq!(parse_limit("9223372036854771712"), None, "v1 unlimited");
    }
}

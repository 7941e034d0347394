//! Finding restic processes by their working directory (each backup runs in its volume directory),
//! so parallel tests only see their own.

use std::path::Path;

/// Mounts of a process's namespace: (device, root within the filesystem, mount point).
fn mounts(pid: &str) -> Vec<(String, std::path::PathBuf, std::path::PathBuf)> {
    let unescape = |p: &str| std::path::PathBuf::from(p.replace("\\040", " "));
    std::fs::read_to_string(format!("/proc/{pid}/mountinfo"))
        .unwrap_or_default()
        .lines()
        .filter_map(|l| {
            let f: Vec<&str> = l.split(' ').collect();
            Some((
                f.get(2)?.to_string(),
                unescape(f.get(3)?),
                unescape(f.get(4)?),
            ))
        })
        .collect()
}

/// `dir` as (device, path within its filesystem): comparable across mount namespaces.
fn fs_location(dir: &Path) -> Option<(String, std::path::PathBuf)> {
    mounts("self")
        .into_iter()
        .filter(|(_, _, point)| dir.starts_with(point))
        .max_by_key(|(_, _, point)| point.components().count())
        .and_then(|(dev, root, point)| Some((dev, root.join(dir.strip_prefix(&point).ok()?))))
}

/// Whether the working directory of `pid` is `dir` or below it. A sandboxed restic's cwd has another
/// name in its own mount namespace (`/data`), so there the mount that holds its cwd is compared by
/// device and path within the filesystem.
fn cwd_within(pid: u32, dir: &Path) -> bool {
    let Ok(cwd) = std::fs::read_link(format!("/proc/{pid}/cwd")) else {
        return false;
    };
    if cwd.starts_with(dir) {
        return true;
    }
    let Some((dev, want)) = fs_location(dir) else {
        return false;
    };
    mounts(&pid.to_string())
        .into_iter()
        .filter(|(_, _, point)| cwd.starts_with(point))
        .max_by_key(|(_, _, point)| point.components().count())
        .is_some_and(|(d, root, point)| {
            d == dev
                && cwd
                    .strip_prefix(&point)
                    .is_ok_and(|rest| root.join(rest).starts_with(&want))
        })
}

/// PIDs of running `restic` processes whose cwd is `dir` or below it.
pub fn restic_pids_under(dir: &Path) -> Vec<u32> {
    let Ok(entries) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    entries
        .flatten()
        .filter_map(|e| e.file_name().to_str()?.parse::<u32>().ok())
        .filter(|pid| {
            let comm = std::fs::read_to_string(format!("/proc/{pid}/comm")).unwrap_or_default();
            // Zombies are gone for our purposes: they hold no files and no locks.
            let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
            let zombie = stat
                .rsplit(')')
                .next()
                .is_some_and(|rest| rest.trim_start().starts_with('Z'));
            comm.trim() == "restic" && !zombie && cwd_within(*pid, dir)
        })
        .collect()
}

/// Whether a process exists (and is not a zombie).
pub fn alive(pid: u32) -> bool {
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        Ok(stat) => !stat
            .rsplit(')')
            .next()
            .is_some_and(|rest| rest.trim_start().starts_with('Z')),
        Err(_) => false,
    }
}

/// Every live process's PID and command line (arguments joined by spaces).
pub fn cmdlines_with_pids() -> Vec<(u32, String)> {
    let Ok(entries) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    entries
        .flatten()
        .filter_map(|e| e.file_name().to_str()?.parse::<u32>().ok())
        .filter(|pid| alive(*pid))
        .filter_map(|pid| {
            let raw = std::fs::read(format!("/proc/{pid}/cmdline")).ok()?;
            Some((pid, String::from_utf8_lossy(&raw).replace('\0', " ")))
        })
        .collect()
}

/// The command lines (arguments joined by spaces) of every live process.
pub fn cmdlines() -> Vec<String> {
    cmdlines_with_pids().into_iter().map(|(_, c)| c).collect()
}

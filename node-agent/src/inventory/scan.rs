//! Reading the kubelet's pod directory: which directories hold persistent-volume data.
//!
//! Layout: `<kubelet>/pods/<pod-uid>/volumes/<plugin>/<volume-name>`, where plugin is the kubelet's
//! escaped plugin name (`kubernetes.io~csi`, `kubernetes.io~local-volume`, ...). CSI volumes keep their
//! data in a `mount/` subdirectory; in-tree plugins directly in the volume directory.

use std::collections::HashSet;
use std::path::{Path, PathBuf};

/// One discovered volume.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VolumeEntry {
    pub pod_uid: String,
    pub volume_name: String,
    pub plugin: String,
    /// The directory whose contents are the data.
    pub data_dir: PathBuf,
    pub mounted: bool,
}

/// Plugins whose volumes are ephemeral or derived from API objects: never backed up.
const EPHEMERAL_PLUGINS: &[&str] = &[
    "kubernetes.io~configmap",
    "kubernetes.io~secret",
    "kubernetes.io~projected",
    "kubernetes.io~downward-api",
    "kubernetes.io~empty-dir",
    "kubernetes.io~git-repo",
];

pub const CSI_PLUGIN: &str = "kubernetes.io~csi";

/// Whether a name can be a single path component we created nothing for: no separators, no dots-only.
pub fn is_plain_name(name: &str) -> bool {
    !name.is_empty() && name != "." && name != ".." && !name.contains('/') && !name.contains('\0')
}

/// Mount points of this process's mount namespace, from /proc/self/mountinfo.
pub fn mount_points() -> HashSet<PathBuf> {
    match procfs::process::Process::myself().and_then(|p| p.mountinfo()) {
        Ok(infos) => infos.into_iter().map(|m| m.mount_point).collect(),
        Err(e) => {
            tracing::warn!(error = %e, "reading mountinfo; treating every volume as unmounted");
            HashSet::new()
        }
    }
}

/// The volumes of one pod. A missing pod directory yields none.
pub fn scan_pod(pods_dir: &Path, pod_uid: &str, mounts: &HashSet<PathBuf>) -> Vec<VolumeEntry> {
    let mut out = Vec::new();
    let volumes_dir = pods_dir.join(pod_uid).join("volumes");
    let Ok(plugins) = std::fs::read_dir(&volumes_dir) else {
        return out;
    };
    for plugin in plugins.flatten() {
        let plugin_name = plugin.file_name().to_string_lossy().into_owned();
        if EPHEMERAL_PLUGINS.contains(&plugin_name.as_str()) || !is_dir(&plugin.path()) {
            continue;
        }
        let Ok(vols) = std::fs::read_dir(plugin.path()) else {
            continue;
        };
        for vol in vols.flatten() {
            let volume_name = vol.file_name().to_string_lossy().into_owned();
            let vol_dir = vol.path();
            if !is_dir(&vol_dir) {
                continue;
            }
            let data_dir = if plugin_name == CSI_PLUGIN {
                vol_dir.join("mount")
            } else {
                vol_dir
            };
            if !is_dir(&data_dir) {
                continue;
            }
            let mounted = mounts.contains(&data_dir);
            // An unmounted, empty directory is what the kubelet leaves behind after teardown.
            if !mounted && is_empty_dir(&data_dir) {
                continue;
            }
            out.push(VolumeEntry {
                pod_uid: pod_uid.to_string(),
                volume_name,
                plugin: plugin_name.clone(),
                data_dir,
                mounted,
            });
        }
    }
    out
}

/// Pod UIDs present under the pods directory.
pub fn pod_uids(pods_dir: &Path) -> Vec<String> {
    let Ok(entries) = std::fs::read_dir(pods_dir) else {
        return Vec::new();
    };
    entries
        .flatten()
        .filter(|e| is_dir(&e.path()))
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| is_plain_name(n))
        .collect()
}

/// A real directory (symlinks are not followed: a pod cannot redirect us elsewhere).
fn is_dir(p: &Path) -> bool {
    std::fs::symlink_metadata(p).is_ok_and(|m| m.is_dir())
}

fn is_empty_dir(p: &Path) -> bool {
    std::fs::read_dir(p).is_ok_and(|mut d| d.next().is_none())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::fs;

    #[test]
    fn finds_persistent_volumes_and_skips_ephemeral_ones() {
        let t = tempfile::tempdir().unwrap();
        let pods = t.path();
        let v = pods.join("uid1/volumes");
        fs::create_dir_all(v.join("kubernetes.io~csi/pv-a/mount")).unwrap();
        fs::write(v.join("kubernetes.io~csi/pv-a/mount/f"), b"x").unwrap();
        fs::write(v.join("kubernetes.io~csi/pv-a/vol_data.json"), b"{}").unwrap();
        fs::create_dir_all(v.join("kubernetes.io~csi/pv-left-behind/mount")).unwrap();
        fs::create_dir_all(v.join("kubernetes.io~local-volume/pv-b")).unwrap();
        fs::write(v.join("kubernetes.io~local-volume/pv-b/g"), b"y").unwrap();
        fs::create_dir_all(v.join("kubernetes.io~nfs/pv-c/d")).unwrap();
        for eph in EPHEMERAL_PLUGINS {
            fs::create_dir_all(v.join(eph).join("x/sub")).unwrap();
        }
        let mut found = scan_pod(pods, "uid1", &HashSet::new());
        found.sort_by(|a, b| a.volume_name.cmp(&b.volume_name));
        let names: Vec<_> = found.iter().map(|e| e.volume_name.as_str()).collect();
        assert_eq!(names, ["pv-a", "pv-b", "pv-c"]);
        assert_eq!(found[0].data_dir, v.join("kubernetes.io~csi/pv-a/mount"));
        assert_eq!(found[1].data_dir, v.join("kubernetes.io~local-volume/pv-b"));
        assert!(found.iter().all(|e| !e.mounted));

        // An empty directory that is a mount point is a real (empty) volume.
        let mounts: HashSet<PathBuf> = [v.join("kubernetes.io~csi/pv-left-behind/mount")].into();
        let found = scan_pod(pods, "uid1", &mounts);
        assert!(
            found
                .iter()
                .any(|e| e.volume_name == "pv-left-behind" && e.mounted)
        );

        assert!(scan_pod(pods, "missing", &HashSet::new()).is_empty());
        assert_eq!(pod_uids(pods), ["uid1"]);
    }

    #[test]
    fn plain_names() {
        assert!(is_plain_name("pvc-1234"));
        for bad in ["", ".", "..", "a/b", "../x"] {
            assert!(!is_plain_name(bad), "{bad}");
        }
    }

    #[test]
    fn mountinfo_is_readable() {
        assert!(mount_points().contains(Path::new("/")));
    }
}

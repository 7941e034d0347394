//! The node's volume inventory: an index of the persistent volumes under the kubelet's pod directory.
//!
//! Kept current by [`watch`] (inotify on the pod and plugin directories, plus a periodic resync,
//! because a mount raises no inotify event), so requests never walk the whole tree. A lookup that
//! misses rescans just that pod before answering "not found", closing the race with a pod that
//! appeared a moment ago.

pub mod scan;
pub mod watch;

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::RwLock;

use prometheus::IntGauge;

pub use scan::VolumeEntry;

type Key = (String, String);

pub struct Inventory {
    pods_dir: PathBuf,
    volumes: RwLock<HashMap<Key, VolumeEntry>>,
    gauge: IntGauge,
}

impl Inventory {
    pub fn new(kubelet_dir: &Path, gauge: IntGauge) -> Self {
        Self {
            pods_dir: kubelet_dir.join("pods"),
            volumes: RwLock::new(HashMap::new()),
            gauge,
        }
    }

    pub fn pods_dir(&self) -> &Path {
        &self.pods_dir
    }

    /// Rebuilds the whole index from disk.
    pub fn full_scan(&self) {
        let mounts = scan::mount_points();
        let mut fresh = HashMap::new();
        for uid in scan::pod_uids(&self.pods_dir) {
            for v in scan::scan_pod(&self.pods_dir, &uid, &mounts) {
                fresh.insert((v.pod_uid.clone(), v.volume_name.clone()), v);
            }
        }
        if let Ok(mut map) = self.volumes.write() {
            *map = fresh;
            self.gauge.set(i64::try_from(map.len()).unwrap_or(i64::MAX));
        }
    }

    /// Re-reads one pod's volumes (all of them gone when the pod directory is gone).
    pub fn rescan_pod(&self, pod_uid: &str) {
        if !scan::is_plain_name(pod_uid) {
            return;
        }
        let found = scan::scan_pod(&self.pods_dir, pod_uid, &scan::mount_points());
        if let Ok(mut map) = self.volumes.write() {
            map.retain(|(uid, _), _| uid != pod_uid);
            for v in found {
                map.insert((v.pod_uid.clone(), v.volume_name.clone()), v);
            }
            self.gauge.set(i64::try_from(map.len()).unwrap_or(i64::MAX));
        }
    }

    /// Every volume, sorted by pod then volume.
    pub fn list(&self) -> Vec<VolumeEntry> {
        let mut all: Vec<_> = self
            .volumes
            .read()
            .map(|m| m.values().cloned().collect())
            .unwrap_or_default();
        all.sort_by(|a, b| (&a.pod_uid, &a.volume_name).cmp(&(&b.pod_uid, &b.volume_name)));
        all
    }

    fn get(&self, pod_uid: &str, volume_name: &str) -> Option<VolumeEntry> {
        self.volumes
            .read()
            .ok()?
            .get(&(pod_uid.to_string(), volume_name.to_string()))
            .cloned()
    }

    /// The volume, if it is on this node now. Names must be plain path components.
    pub fn lookup(&self, pod_uid: &str, volume_name: &str) -> Option<VolumeEntry> {
        if !scan::is_plain_name(pod_uid) || !scan::is_plain_name(volume_name) {
            return None;
        }
        if let Some(v) = self.get(pod_uid, volume_name) {
            // The index may be a moment behind a pod's deletion: confirm before handing it out.
            if v.data_dir.is_dir() {
                return Some(v);
            }
        }
        self.rescan_pod(pod_uid);
        self.get(pod_uid, volume_name)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lookup_rescans_on_miss_and_forgets_deleted_pods() {
        let t = tempfile::tempdir().unwrap();
        let gauge = IntGauge::new("g", "g").unwrap();
        let inv = Inventory::new(t.path(), gauge.clone());
        inv.full_scan();
        assert_eq!(gauge.get(), 0);
        let data = t.path().join("pods/u1/volumes/kubernetes.io~csi/pv1/mount");
        std::fs::create_dir_all(&data).unwrap();
        std::fs::write(data.join("f"), b"1").unwrap();
        let v = inv.lookup("u1", "pv1").unwrap();
        assert_eq!(v.data_dir, data);
        assert_eq!(gauge.get(), 1);
        assert!(inv.lookup("u1", "../u1").is_none());
        std::fs::remove_dir_all(t.path().join("pods/u1")).unwrap();
        assert!(inv.lookup("u1", "pv1").is_none());
        assert_eq!(gauge.get(), 0);
    }
}

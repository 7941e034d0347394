//! Keeps the inventory current: inotify (via `notify`) on the pods directory and on each pod's volume
//! and plugin directories, never recursively into volume data; plus a periodic full resync.

use std::collections::HashSet;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use notify::{RecursiveMode, Watcher};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use super::Inventory;
use super::scan::{self, CSI_PLUGIN};

/// Changes arriving within this window are handled together.
const DEBOUNCE: Duration = Duration::from_millis(100);

/// Starts watching. The initial full scan is the caller's (it gates readiness).
pub fn spawn(
    inventory: Arc<Inventory>,
    resync_every: Duration,
    shutdown: CancellationToken,
) -> Result<tokio::task::JoinHandle<()>, notify::Error> {
    let (tx, rx) = mpsc::unbounded_channel::<PathBuf>();
    let tx_mounts = tx.clone();
    let watcher =
        notify::recommended_watcher(move |res: notify::Result<notify::Event>| match res {
            Ok(ev) => {
                for p in ev.paths {
                    let _ = tx.send(p);
                }
            }
            Err(e) => tracing::warn!(error = %e, "inotify error; the next resync catches up"),
        })?;
    spawn_mount_watch(
        inventory.pods_dir().to_path_buf(),
        tx_mounts,
        shutdown.clone(),
    );
    Ok(tokio::spawn(run(
        inventory,
        watcher,
        rx,
        resync_every,
        shutdown,
    )))
}

/// Mounts and unmounts raise no inotify event, but /proc/self/mountinfo is pollable: it signals a
/// priority event on every change to this mount namespace. Each change asks for a full rescan.
fn spawn_mount_watch(
    pods_dir: PathBuf,
    tx: mpsc::UnboundedSender<PathBuf>,
    shutdown: CancellationToken,
) {
    use tokio::io::Interest;
    use tokio::io::unix::AsyncFd;
    let file = match std::fs::File::open("/proc/self/mountinfo") {
        Ok(f) => f,
        Err(e) => {
            tracing::warn!(error = %e, "cannot watch mountinfo; mounts are seen at the next resync");
            return;
        }
    };
    // The AsyncFd owns the File, so the descriptor cannot be closed behind tokio's back (the I/O-safety
    // concern behind the deprecation); the replacement is an unsafe fn, which this crate forbids.
    #[allow(deprecated)]
    let fd = match AsyncFd::with_interest(file, Interest::PRIORITY) {
        Ok(fd) => fd,
        Err(e) => {
            tracing::warn!(error = %e, "cannot poll mountinfo; mounts are seen at the next resync");
            return;
        }
    };
    tokio::spawn(async move {
        loop {
            tokio::select! {
                _ = shutdown.cancelled() => return,
                ready = fd.ready(Interest::PRIORITY) => match ready {
                    Ok(mut guard) => {
                        guard.clear_ready();
                        // The pods directory itself stands for "rescan everything".
                        if tx.send(pods_dir.clone()).is_err() {
                            return;
                        }
                    }
                    Err(e) => {
                        tracing::warn!(error = %e, "mountinfo poll failed; relying on resync");
                        return;
                    }
                },
            }
        }
    });
}

async fn run(
    inventory: Arc<Inventory>,
    mut watcher: notify::RecommendedWatcher,
    mut rx: mpsc::UnboundedReceiver<PathBuf>,
    resync_every: Duration,
    shutdown: CancellationToken,
) {
    let pods_dir = inventory.pods_dir().to_path_buf();
    let mut watched = HashSet::new();
    refresh_watches(&mut watcher, &mut watched, &pods_dir, None);
    let mut resync = tokio::time::interval(resync_every);
    resync.tick().await; // the first tick is immediate; the caller already scanned
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = resync.tick() => {
                let inv = Arc::clone(&inventory);
                let _ = tokio::task::spawn_blocking(move || inv.full_scan()).await;
                refresh_watches(&mut watcher, &mut watched, &pods_dir, None);
            }
            Some(first) = rx.recv() => {
                let mut changed = vec![first];
                tokio::time::sleep(DEBOUNCE).await;
                while let Ok(p) = rx.try_recv() {
                    changed.push(p);
                }
                let mut pods = HashSet::new();
                let mut everything = false;
                for p in &changed {
                    match pod_of(&pods_dir, p) {
                        Some(uid) => { pods.insert(uid); }
                        // inotify sometimes names only the watched directory (e.g. a rename into
                        // it), and the mount watch always does.
                        None => everything = true,
                    }
                }
                if everything {
                    let inv = Arc::clone(&inventory);
                    let _ = tokio::task::spawn_blocking(move || inv.full_scan()).await;
                    refresh_watches(&mut watcher, &mut watched, &pods_dir, None);
                    pods.clear();
                }
                for uid in pods {
                    // Watch first, then read: whatever changes after the watch raises an event,
                    // whatever changed before is seen by the read.
                    refresh_watches(&mut watcher, &mut watched, &pods_dir, Some(&uid));
                    let inv = Arc::clone(&inventory);
                    let _ = tokio::task::spawn_blocking(move || inv.rescan_pod(&uid)).await;
                }
            }
        }
    }
}

/// The pod UID a changed path belongs to.
fn pod_of(pods_dir: &Path, path: &Path) -> Option<String> {
    let rel = path.strip_prefix(pods_dir).ok()?;
    let uid = rel
        .components()
        .next()?
        .as_os_str()
        .to_string_lossy()
        .into_owned();
    scan::is_plain_name(&uid).then_some(uid)
}

/// The directories whose entries tell us about volumes of `uid`: the pod dir, its volumes dir,
/// each plugin dir, and each CSI volume dir (where `mount/` appears).
fn dirs_to_watch(pods_dir: &Path, uid: &str) -> Vec<PathBuf> {
    let pod = pods_dir.join(uid);
    let volumes = pod.join("volumes");
    let mut dirs = vec![pod, volumes.clone()];
    if let Ok(plugins) = std::fs::read_dir(&volumes) {
        for p in plugins.flatten() {
            let path = p.path();
            if p.file_name() == CSI_PLUGIN
                && let Ok(vols) = std::fs::read_dir(&path)
            {
                dirs.extend(vols.flatten().map(|v| v.path()));
            }
            dirs.push(path);
        }
    }
    dirs.retain(|d| std::fs::symlink_metadata(d).is_ok_and(|m| m.is_dir()));
    dirs
}

/// Adds watches for one pod (or every pod), and forgets watches of directories that are gone
/// (inotify drops those by itself).
fn refresh_watches(
    watcher: &mut notify::RecommendedWatcher,
    watched: &mut HashSet<PathBuf>,
    pods_dir: &Path,
    only: Option<&str>,
) {
    watched.retain(|d| d.is_dir());
    if !watched.contains(pods_dir) && pods_dir.is_dir() {
        match watcher.watch(pods_dir, RecursiveMode::NonRecursive) {
            Ok(()) => {
                watched.insert(pods_dir.to_path_buf());
            }
            Err(e) => tracing::warn!(error = %e, dir = %pods_dir.display(), "cannot watch"),
        }
    }
    let uids = match only {
        Some(uid) => vec![uid.to_string()],
        None => scan::pod_uids(pods_dir),
    };
    for uid in uids {
        for dir in dirs_to_watch(pods_dir, &uid) {
            if watched.contains(&dir) {
                continue;
            }
            match watcher.watch(&dir, RecursiveMode::NonRecursive) {
                Ok(()) => {
                    watched.insert(dir);
                }
                Err(e) => tracing::debug!(error = %e, dir = %dir.display(), "cannot watch"),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use prometheus::IntGauge;

    async fn wait_for(what: &str, mut cond: impl FnMut() -> bool) {
        for _ in 0..100 {
            if cond() {
                return;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        panic!("timed out waiting for {what}");
    }

    #[tokio::test]
    async fn pods_appearing_and_leaving_update_the_inventory_without_resync() {
        let t = tempfile::tempdir().unwrap();
        std::fs::create_dir_all(t.path().join("pods")).unwrap();
        let gauge = IntGauge::new("g", "g").unwrap();
        let inv = Arc::new(Inventory::new(t.path(), gauge.clone()));
        inv.full_scan();
        let stop = CancellationToken::new();
        // A resync far in the future: only inotify can explain the updates below.
        let task = spawn(Arc::clone(&inv), Duration::from_secs(3600), stop.clone()).unwrap();

        // Volumes appear populated (as a mount would make them), so build them aside and move in.
        let staging = t.path().join("staging");
        let pod = t.path().join("pods/uid-a");
        std::fs::create_dir_all(staging.join("uid-a/volumes/kubernetes.io~csi/pv-1/mount"))
            .unwrap();
        std::fs::write(
            staging.join("uid-a/volumes/kubernetes.io~csi/pv-1/mount/data"),
            b"x",
        )
        .unwrap();
        std::fs::rename(staging.join("uid-a"), &pod).unwrap();
        wait_for("pv-1 to appear", || inv.list().len() == 1).await;
        assert_eq!(gauge.get(), 1);

        // A second volume appearing later in an already-known pod.
        std::fs::create_dir_all(staging.join("kubernetes.io~local-volume/pv-2")).unwrap();
        std::fs::write(staging.join("kubernetes.io~local-volume/pv-2/f"), b"y").unwrap();
        std::fs::rename(
            staging.join("kubernetes.io~local-volume"),
            pod.join("volumes/kubernetes.io~local-volume"),
        )
        .unwrap();
        wait_for("pv-2 to appear", || inv.list().len() == 2).await;

        std::fs::remove_dir_all(&pod).unwrap();
        wait_for("the pod to leave", || inv.list().is_empty()).await;
        assert_eq!(gauge.get(), 0);
        stop.cancel();
        task.await.unwrap();
    }
}

//! TLS files that change under a running process. cert-manager renews a leaf certificate well before
//! it expires (by default a third of its life before), and the kubelet then swaps the Secret
//! volume's `..data` symlink: a process that read its files once would keep presenting the old
//! certificate until it expired, and every call would then fail. [`watch`] says when the files'
//! contents have changed, so that each binary can rebuild its TLS configuration and keep serving.

use std::path::{Path, PathBuf};
use std::time::Duration;

use notify::{RecursiveMode, Watcher};
use tokio::sync::{mpsc, watch as tokio_watch};

/// How long after a file event the files are read: a writer that replaces the certificate and then
/// the key (by hand, or a tool other than the kubelet) has finished by then.
const SETTLE: Duration = Duration::from_millis(500);

/// The largest TLS file read (a PEM chain is a few KiB); a larger one is not a change worth taking.
const FILE_MAX: u64 = 1024 * 1024;

/// The files' contents, in the order given.
pub type Contents = Vec<Vec<u8>>;

/// Reads `paths` together, each at most [`FILE_MAX`] bytes; `None` if any cannot be read whole
/// (mid-swap, or gone), which the caller treats as "no change yet".
pub fn read_all(paths: &[PathBuf]) -> Option<Contents> {
    paths.iter().map(|p| read_bounded(p)).collect()
}

fn read_bounded(path: &Path) -> Option<Vec<u8>> {
    use std::io::Read;
    let file = std::fs::File::open(path).ok()?;
    let mut buf = Vec::new();
    file.take(FILE_MAX + 1).read_to_end(&mut buf).ok()?;
    (buf.len() as u64 <= FILE_MAX).then_some(buf)
}

/// Watches `paths` until the returned receiver is dropped; the receiver holds the newest complete
/// contents and is marked changed whenever they differ from the last ones seen. inotify on the
/// files' directories (non-recursive: a Secret volume's swap is a rename there) reports a change
/// at once; a poll every `poll` catches what inotify cannot see (a bind-mounted file replaced on
/// the host, an inotify queue overflow). Must be called inside a Tokio runtime.
pub fn watch(paths: Vec<PathBuf>, poll: Duration) -> tokio_watch::Receiver<Contents> {
    let (tx, rx) = tokio_watch::channel(read_all(&paths).unwrap_or_default());
    // One pending wake-up is enough: every wake-up reads all the files.
    let (wake_tx, mut wake_rx) = mpsc::channel::<()>(1);
    let watcher = notify::recommended_watcher(move |res: notify::Result<notify::Event>| {
        if res.is_ok() {
            let _ = wake_tx.try_send(());
        }
    });
    let watcher = match watcher {
        Ok(mut w) => {
            let mut dirs: Vec<&Path> = paths.iter().filter_map(|p| p.parent()).collect();
            dirs.sort();
            dirs.dedup();
            for dir in dirs {
                if let Err(e) = w.watch(dir, RecursiveMode::NonRecursive) {
                    tracing::warn!(dir = %dir.display(), error = %e,
                        "cannot watch a TLS file's directory; changes are seen by the periodic check");
                }
            }
            Some(w)
        }
        Err(e) => {
            tracing::warn!(error = %e, "no inotify; TLS file changes are seen by the periodic check");
            None
        }
    };
    tokio::spawn(async move {
        // Dropping the watcher stops its thread; it lives as long as this task.
        let _watcher = watcher;
        let mut tick = tokio::time::interval(poll);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        tick.tick().await;
        loop {
            tokio::select! {
                _ = tx.closed() => return,
                _ = tick.tick() => {}
                Some(()) = wake_rx.recv() => tokio::time::sleep(SETTLE).await,
            }
            let paths = paths.clone();
            let Ok(Some(now)) = tokio::task::spawn_blocking(move || read_all(&paths)).await else {
                continue;
            };
            tx.send_if_modified(|seen| {
                if *seen == now {
                    false
                } else {
                    *seen = now;
                    true
                }
            });
        }
    });
    rx
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_swapped_secret_volume_is_seen_and_an_unchanged_one_is_not() {
        let dir = tempfile::tempdir().expect("tmp");
        // The kubelet's layout: tls.crt -> ..data/tls.crt, ..data -> ..<timestamp>.
        let first = dir.path().join("..2026_01");
        std::fs::create_dir(&first).expect("dir");
        std::fs::write(first.join("tls.crt"), b"one").expect("write");
        std::os::unix::fs::symlink("..2026_01", dir.path().join("..data")).expect("link");
        std::os::unix::fs::symlink("..data/tls.crt", dir.path().join("tls.crt")).expect("link");

        // A long poll: only inotify can see the change within the test's wait.
        let mut rx = watch(vec![dir.path().join("tls.crt")], Duration::from_secs(3600));
        assert_eq!(*rx.borrow_and_update(), vec![b"one".to_vec()]);

        // Touching the file with the same contents is not a change.
        std::fs::write(first.join("tls.crt"), b"one").expect("write");
        let unchanged = tokio::time::timeout(Duration::from_secs(2), rx.changed()).await;
        assert!(unchanged.is_err(), "same contents reported as a change");

        let second = dir.path().join("..2026_02");
        std::fs::create_dir(&second).expect("dir");
        std::fs::write(second.join("tls.crt"), b"two").expect("write");
        std::os::unix::fs::symlink("..2026_02", dir.path().join("..data_tmp")).expect("link");
        std::fs::rename(dir.path().join("..data_tmp"), dir.path().join("..data")).expect("swap");
        tokio::time::timeout(Duration::from_secs(10), rx.changed())
            .await
            .expect("the swap is seen within 10 s")
            .expect("watcher alive");
        assert_eq!(*rx.borrow(), vec![b"two".to_vec()]);
    }

    #[test]
    fn a_missing_or_oversized_file_reads_as_none() {
        let dir = tempfile::tempdir().expect("tmp");
        let big = dir.path().join("big.pem");
        std::fs::write(&big, vec![b'x'; FILE_MAX as usize + 1]).expect("write");
        assert_eq!(read_all(&[big]), None);
        assert_eq!(read_all(&[dir.path().join("absent.pem")]), None);
    }
}

//! The sample of a drill with a byte bound: a window of the snapshot's regular files in the order
//! `restic ls` lists them (depth first, each directory's entries sorted by name), starting after the
//! previous drill's last file and wrapping around at the end, so that successive drills cover
//! different files and, in time, all of them.
//!
//! Bounded whatever the snapshot holds: at most [`MAX_FILES`] files and [`MAX_PATH_BYTES`] of their
//! paths are kept. A file larger than the whole bound is never in a sample (a drill without a bound
//! reads it), nor is a name restic's include files cannot express literally (a line break, a `$`
//! (expanded as an environment variable), or white space at its end (trimmed)).

use std::cmp::Ordering;

/// Files in one sample: restic matches every include pattern against every entry it walks.
pub const MAX_FILES: usize = 10_000;
/// Bytes of paths kept in memory for one sample (both the window and its wrap-around part).
pub const MAX_PATH_BYTES: usize = 8 << 20;

/// The chosen files, in the snapshot's order (those after the cursor first, then the wrap-around).
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Sample {
    pub files: Vec<String>,
    pub bytes: u64,
    /// Every regular file of the snapshot is in it: the drill restores the whole snapshot.
    pub complete: bool,
    pub wrapped: bool,
    /// Files that could never be in a sample (too large, or unexpressible names).
    pub skipped: u64,
    pub snapshot_files: u64,
}

pub struct Sampler {
    budget: u64,
    after: Vec<String>,
    /// Files after the cursor, taken while the budget lasts.
    window: Vec<(String, u64)>,
    window_bytes: u64,
    /// Files before (or at) the cursor, for the wrap-around, while the budget lasts.
    head: Vec<(String, u64)>,
    head_bytes: u64,
    path_bytes: usize,
    /// A file was left out for the bound (not for its size or name).
    left_out: bool,
    skipped: u64,
    snapshot_files: u64,
}

fn components(path: &str) -> Vec<String> {
    path.split('/')
        .filter(|c| !c.is_empty())
        .map(String::from)
        .collect()
}

/// Whether restic's include file can name `path` literally.
fn expressible(path: &str) -> bool {
    !path.contains(['\n', '\r', '$']) && !path.ends_with(char::is_whitespace)
}

impl Sampler {
    /// `after`: the previous drill's last file ("" to start at the beginning).
    pub fn new(budget: u64, after: &str) -> Self {
        Self {
            budget,
            after: components(after),
            window: Vec::new(),
            window_bytes: 0,
            head: Vec::new(),
            head_bytes: 0,
            path_bytes: 0,
            left_out: false,
            skipped: 0,
            snapshot_files: 0,
        }
    }

    fn room(&self, size: u64, taken: u64, path: &str) -> bool {
        taken.saturating_add(size) <= self.budget
            && self.window.len() + self.head.len() < MAX_FILES
            && self.path_bytes + path.len() <= MAX_PATH_BYTES
    }

    /// One regular file of the listing, in the listing's order.
    pub fn offer(&mut self, path: String, size: u64) {
        self.snapshot_files += 1;
        if size > self.budget || !expressible(&path) {
            self.skipped += 1;
            return;
        }
        let after_cursor =
            self.after.is_empty() || components(&path).cmp(&self.after) == Ordering::Greater;
        if after_cursor {
            if self.room(size, self.window_bytes, &path) {
                self.path_bytes += path.len();
                self.window_bytes += size;
                self.window.push((path, size));
            } else {
                self.left_out = true;
            }
        } else if self.room(size, self.head_bytes, &path) {
            // Kept in case the window ends before the budget does; trimmed in `finish`.
            self.path_bytes += path.len();
            self.head_bytes += size;
            self.head.push((path, size));
        } else {
            self.left_out = true;
        }
    }

    pub fn finish(self) -> Sample {
        let mut bytes = self.window_bytes;
        let mut files: Vec<String> = self.window.into_iter().map(|(p, _)| p).collect();
        let mut left_out = self.left_out;
        let mut wrapped = false;
        let mut head = self.head.into_iter();
        for (path, size) in head.by_ref() {
            if bytes.saturating_add(size) > self.budget || files.len() >= MAX_FILES {
                left_out = true;
                break;
            }
            wrapped = true;
            bytes += size;
            files.push(path);
        }
        if head.next().is_some() {
            left_out = true;
        }
        Sample {
            files,
            bytes,
            complete: !left_out && self.skipped == 0,
            wrapped,
            skipped: self.skipped,
            snapshot_files: self.snapshot_files,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn listing() -> Vec<(&'static str, u64)> {
        // restic's order: depth first, names sorted; "/a/z" before "/a.b" (component order).
        vec![
            ("/a/x", 10),
            ("/a/z", 10),
            ("/a.b", 10),
            ("/b/c/d", 10),
            ("/e", 10),
        ]
    }

    fn sample(budget: u64, after: &str) -> Sample {
        let mut s = Sampler::new(budget, after);
        for (p, n) in listing() {
            s.offer(p.into(), n);
        }
        s.finish()
    }

    #[test]
    fn successive_samples_cover_different_files_and_wrap_around() {
        let first = sample(20, "");
        assert_eq!(first.files, ["/a/x", "/a/z"]);
        assert!(!first.complete && !first.wrapped);
        let second = sample(20, first.files.last().unwrap());
        assert_eq!(second.files, ["/a.b", "/b/c/d"]);
        let third = sample(20, second.files.last().unwrap());
        assert_eq!(third.files, ["/e", "/a/x"]);
        assert!(third.wrapped);
        assert_eq!(third.bytes, 20);
        assert_eq!(third.snapshot_files, 5);
    }

    #[test]
    fn a_bound_above_the_snapshot_takes_everything_once() {
        let all = sample(1000, "/b/c/d");
        assert!(all.complete);
        assert_eq!(all.files, ["/e", "/a/x", "/a/z", "/a.b", "/b/c/d"]);
        assert_eq!(all.bytes, 50);
    }

    #[test]
    fn large_files_and_unexpressible_names_are_skipped_and_counted() {
        let mut s = Sampler::new(100, "");
        s.offer("/big".into(), 101);
        s.offer("/$HOME".into(), 1);
        s.offer("/line\nbreak".into(), 1);
        s.offer("/trailing ".into(), 1);
        s.offer("/ok".into(), 1);
        let s = s.finish();
        assert_eq!(s.files, ["/ok"]);
        assert_eq!(s.skipped, 4);
        assert!(
            !s.complete,
            "a skipped file means the sample is not the whole snapshot"
        );
    }

    #[test]
    fn the_file_count_is_bounded() {
        let mut s = Sampler::new(u64::MAX, "");
        for i in 0..(MAX_FILES + 5) {
            s.offer(format!("/f{i:06}"), 0);
        }
        let s = s.finish();
        assert_eq!(s.files.len(), MAX_FILES);
        assert!(!s.complete);
    }
}

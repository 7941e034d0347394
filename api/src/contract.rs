//! The contract between the coordinator, the agents, users' manifests and the snapshots they leave
//! behind: label, annotation and tag keys. Changing a key here changes it for every binary at once;
//! snapshots already written keep their tags, so keys are forever.

/// The key prefix Stowage reserves (users' extra tags must not use it).
pub const PREFIX: &str = "stowage.dev/";

// --- labels (on runs and pods; values bounded with `names::label_value`) ---------------------------
/// On runs: the Schedule that fired them.
pub const LABEL_SCHEDULE: &str = "stowage.dev/schedule";
/// On runs: `backup`, `check` or `prune`.
pub const LABEL_ACTION: &str = "stowage.dev/action";
/// On mount-holder pods: the run they serve.
pub const LABEL_RUN: &str = "stowage.dev/run";
/// On mount-holder pods: marks them (they are never backed up as workloads).
pub const LABEL_MOUNT_HOLDER: &str = "stowage.dev/mount-holder";
/// On Secrets: `"true"` lets Stowage use the Secret as repository credentials. Setting a label needs
/// the right to update the Secret, so whoever may only create runs cannot point them at any Secret.
pub const LABEL_CREDENTIALS: &str = "stowage.dev/credentials";
pub const LABEL_CREDENTIALS_SELECTOR: &str = "stowage.dev/credentials=true";

// --- annotations -----------------------------------------------------------------------------------
/// On PVCs and pods: `"false"` leaves the volume out of backups.
pub const ANNOTATION_BACKUP: &str = "stowage.dev/backup";
/// On pods: a shell command whose stdout is backed up (`pg_dump -U app shop`).
pub const ANNOTATION_BACKUP_COMMAND: &str = "stowage.dev/backup-command";
/// On pods: the container of the backup command (default: the first).
pub const ANNOTATION_BACKUP_CONTAINER: &str = "stowage.dev/backup-container";
/// On pods: the extension of the backup command's file in the snapshot (`.sql`).
pub const ANNOTATION_FILE_EXTENSION: &str = "stowage.dev/file-extension";
/// On pods: a shell command that reads a backup command's dump on its stdin and applies it
/// (`psql -U app shop`); a Restore of the command's snapshot streams into it.
pub const ANNOTATION_RESTORE_COMMAND: &str = "stowage.dev/restore-command";
/// On pods: the backup (and restore) command's time limit (`30m`; default 1h).
pub const ANNOTATION_BACKUP_TIMEOUT: &str = "stowage.dev/backup-timeout";
/// On PVCs, or pods for all their volumes: restic `--exclude` patterns, comma-separated.
pub const ANNOTATION_EXCLUDE: &str = "stowage.dev/exclude";
/// On pods: commands run before the pod's volumes are read, and after (also when that failed).
pub const ANNOTATION_PRE_BACKUP_COMMAND: &str = "stowage.dev/pre-backup-command";
pub const ANNOTATION_POST_BACKUP_COMMAND: &str = "stowage.dev/post-backup-command";
/// On pods: the hooks' container (default: the first), time limit (default 30s), and what a
/// failed pre-hook means: `Fail` (default: the pod's volumes are not backed up) or `Continue`.
pub const ANNOTATION_HOOK_CONTAINER: &str = "stowage.dev/hook-container";
pub const ANNOTATION_HOOK_TIMEOUT: &str = "stowage.dev/hook-timeout";
pub const ANNOTATION_HOOK_ON_ERROR: &str = "stowage.dev/hook-on-error";
/// The full value of a label that had to be shortened (`<label key>` + this suffix).
pub const ANNOTATION_FULL_SUFFIX: &str = "-full";

// --- snapshot tags (restic) ------------------------------------------------------------------------
pub const TAG_NAMESPACE: &str = "stowage.dev/namespace";
pub const TAG_PVC: &str = "stowage.dev/pvc";
pub const TAG_POD: &str = "stowage.dev/pod";
/// The run (`<namespace>/<name>`) that made a snapshot.
pub const TAG_RUN: &str = "stowage.dev/run";
/// What kind of item a snapshot holds (volume now; command dumps later).
pub const TAG_SOURCE_VOLUME: &str = "stowage.dev/source=volume";
/// Marks the snapshots of backup commands (a dump streamed from a pod).
pub const TAG_SOURCE_COMMAND: &str = "stowage.dev/source=command";
/// A command snapshot's owner: `<Kind>/<name>` of the pod's controller (`Pod/<name>` without one).
pub const TAG_OWNER: &str = "stowage.dev/owner";
/// A command snapshot's container.
pub const TAG_CONTAINER: &str = "stowage.dev/container";
/// On a snapshot restic finished with unreadable files (exit 3): it exists but is incomplete.
pub const TAG_PARTIAL: &str = "stowage.dev/partial=true";

//! The coordinator: turns Schedule/Backup/Check/Prune/Restore objects into work for node agents.
//!
//! Not built yet: this crate holds its place in the workspace until the coordinator issue lands.

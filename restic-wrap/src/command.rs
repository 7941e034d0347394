//! A fully rendered restic invocation: the seam between argument building (pure, unit-tested) and
//! process execution.

use std::ffi::OsString;
use std::fmt;
use std::path::PathBuf;

/// Program, argv, environment and working directory of one restic run.
#[derive(Clone, PartialEq, Eq)]
pub struct CommandSpec {
    pub program: PathBuf,
    pub args: Vec<OsString>,
    /// Secrets live here and nowhere else.
    pub env: Vec<(String, String)>,
    pub cwd: Option<PathBuf>,
    /// The subcommand's name, for errors and logs.
    pub subcommand: String,
}

impl fmt::Debug for CommandSpec {
    /// Redacts every environment value: they carry passwords and keys.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let env: Vec<String> = self
            .env
            .iter()
            .map(|(k, _)| format!("{k}=<redacted>"))
            .collect();
        f.debug_struct("CommandSpec")
            .field("program", &self.program)
            .field("args", &self.args)
            .field("env", &env)
            .field("cwd", &self.cwd)
            .finish()
    }
}

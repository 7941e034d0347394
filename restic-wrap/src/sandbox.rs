//! bubblewrap around restic: a process whose filesystem holds only what one operation needs.
//!
//! restic resolves every parent component of the paths it reads and writes, so a workload that swaps
//! a directory for a symlink while restic walks its volume can steer restic to any path on the node.
//! Inside the sandbox there is nothing to steer it to: the filesystem is a fresh tmpfs holding the
//! bound directories (the volume, restic's cache, a local repository), restic's own binary and a few
//! read-only system files (CA certificates, name resolution). Everything else on the node (the
//! kubelet directory, other pods' volumes, the agent's TLS key) does not exist there.
//!
//! The sandbox also has its own PID, IPC and UTS namespaces, dies with its parent, keeps only the
//! capabilities the caller names, and shares the network (S3 and REST repositories).

use std::ffi::OsString;
use std::path::{Path, PathBuf};

use crate::command::CommandSpec;

/// Read-only system files restic may need; each is bound only when it exists on the node.
const SYSTEM_FILES: &[&str] = &[
    "/etc/ssl/certs",
    "/etc/ssl/cert.pem",
    "/etc/pki/tls/certs",
    "/etc/ca-certificates",
    "/usr/share/ca-certificates",
    "/etc/resolv.conf",
    "/etc/hosts",
    "/etc/nsswitch.conf",
    "/etc/localtime",
];

/// One directory (or file) made visible inside the sandbox.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Bind {
    pub source: PathBuf,
    pub dest: PathBuf,
    pub writable: bool,
}

/// How to build the bubblewrap command line for one operation.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Sandbox {
    bwrap: PathBuf,
    hostname: String,
    binds: Vec<Bind>,
    capabilities: Vec<&'static str>,
    chdir: Option<PathBuf>,
    tmp: Option<PathBuf>,
}

impl Sandbox {
    /// `hostname` names the sandbox in restic's lock files. Give every sandbox its own: restic
    /// judges a lock from its own hostname by whether the PID is alive, and PIDs inside another
    /// PID namespace never are, so a shared name would make live locks look stale.
    pub fn new(bwrap: impl Into<PathBuf>, hostname: impl Into<String>) -> Self {
        Self {
            bwrap: bwrap.into(),
            hostname: hostname.into(),
            binds: Vec::new(),
            capabilities: Vec::new(),
            chdir: None,
            tmp: None,
        }
    }

    pub fn read_only(mut self, source: impl Into<PathBuf>, dest: impl Into<PathBuf>) -> Self {
        self.binds.push(Bind {
            source: source.into(),
            dest: dest.into(),
            writable: false,
        });
        self
    }

    pub fn read_write(mut self, source: impl Into<PathBuf>, dest: impl Into<PathBuf>) -> Self {
        self.binds.push(Bind {
            source: source.into(),
            dest: dest.into(),
            writable: true,
        });
        self
    }

    /// Capabilities kept inside (e.g. "CAP_DAC_READ_SEARCH"); all others are dropped.
    pub fn capabilities(mut self, caps: &[&'static str]) -> Self {
        self.capabilities = caps.to_vec();
        self
    }

    /// The working directory inside the sandbox.
    pub fn chdir(mut self, dir: impl Into<PathBuf>) -> Self {
        self.chdir = Some(dir.into());
        self
    }

    /// A host directory bound as `/tmp` (restic's temporary pack files). Without one, `/tmp` is a
    /// tmpfs, which costs memory.
    pub fn tmp(mut self, dir: impl Into<PathBuf>) -> Self {
        self.tmp = Some(dir.into());
        self
    }

    pub fn binds(&self) -> &[Bind] {
        &self.binds
    }

    /// `spec` run inside the sandbox: bwrap becomes the program; restic, its arguments and its
    /// environment (secrets included) pass through unchanged.
    pub fn wrap(&self, spec: &CommandSpec) -> CommandSpec {
        let mut a: Vec<OsString> = Vec::new();
        let mut push = |items: &[&str]| a.extend(items.iter().map(OsString::from));
        push(&[
            "--die-with-parent",
            "--unshare-pid",
            "--unshare-ipc",
            "--unshare-uts",
            "--unshare-cgroup-try",
            "--hostname",
            &self.hostname,
            "--cap-drop",
            "ALL",
        ]);
        for cap in &self.capabilities {
            push(&["--cap-add", cap]);
        }
        push(&["--dev", "/dev"]);
        match &self.tmp {
            Some(dir) => bind(&mut a, "--bind", dir, Path::new("/tmp")),
            None => push(&["--tmpfs", "/tmp"]),
        }
        for f in SYSTEM_FILES {
            bind(&mut a, "--ro-bind-try", Path::new(f), Path::new(f));
        }
        for var in ["SSL_CERT_FILE", "SSL_CERT_DIR"] {
            if let Some(p) = std::env::var_os(var).filter(|p| Path::new(p).is_absolute()) {
                bind(&mut a, "--ro-bind-try", Path::new(&p), Path::new(&p));
            }
        }
        bind(&mut a, "--ro-bind", &spec.program, &spec.program);
        for b in &self.binds {
            let flag = if b.writable { "--bind" } else { "--ro-bind" };
            bind(&mut a, flag, &b.source, &b.dest);
        }
        // Binds are read-only mounts over a tmpfs root; remounting the root read-only closes the rest.
        a.push("--remount-ro".into());
        a.push("/".into());
        if let Some(dir) = &self.chdir {
            a.push("--chdir".into());
            a.push(dir.clone().into_os_string());
        }
        a.push("--".into());
        a.push(spec.program.clone().into_os_string());
        a.extend(spec.args.iter().cloned());
        let mut env = spec.env.clone();
        env.push(("TMPDIR".into(), "/tmp".into()));
        CommandSpec {
            program: self.bwrap.clone(),
            args: a,
            env,
            cwd: None,
            subcommand: spec.subcommand.clone(),
        }
    }
}

fn bind(a: &mut Vec<OsString>, flag: &str, source: &Path, dest: &Path) {
    a.push(flag.into());
    a.push(source.as_os_str().to_owned());
    a.push(dest.as_os_str().to_owned());
}

#[cfg(test)]
mod tests {
    use super::*;

    fn strings(spec: &CommandSpec) -> Vec<String> {
        spec.args
            .iter()
            .map(|a| a.to_string_lossy().into_owned())
            .collect()
    }

    #[test]
    fn wraps_restic_with_only_the_named_binds_and_capabilities() {
        let restic = CommandSpec {
            program: "/usr/bin/restic".into(),
            args: vec!["-r".into(), "/repo".into(), "backup".into(), ".".into()],
            env: vec![("RESTIC_PASSWORD".into(), "pw".into())],
            cwd: Some("/host/volume".into()),
            subcommand: "backup".into(),
        };
        let sb = Sandbox::new("/usr/bin/bwrap", "node-1.stowage-7")
            .read_only("/proc/42/fd/9", "/data")
            .read_write("/repo", "/repo")
            .capabilities(&["CAP_DAC_READ_SEARCH"])
            .chdir("/data")
            .tmp("/cache/tmp/op-1");
        let spec = sb.wrap(&restic);
        let args = strings(&spec);
        assert_eq!(spec.program, Path::new("/usr/bin/bwrap"));
        assert_eq!(spec.cwd, None);
        let sep = args.iter().position(|a| a == "--").unwrap();
        assert_eq!(
            args[sep + 1..],
            ["/usr/bin/restic", "-r", "/repo", "backup", "."]
        );
        let flags = args[..sep].join(" ");
        for want in [
            "--unshare-pid",
            "--die-with-parent",
            "--hostname node-1.stowage-7",
            "--cap-drop ALL --cap-add CAP_DAC_READ_SEARCH --dev",
            "--ro-bind /proc/42/fd/9 /data",
            "--bind /repo /repo",
            "--bind /cache/tmp/op-1 /tmp",
            "--ro-bind /usr/bin/restic /usr/bin/restic",
            "--chdir /data",
            "--remount-ro /",
        ] {
            assert!(flags.contains(want), "missing {want:?} in {flags}");
        }
        assert!(
            !flags.contains("--unshare-net"),
            "S3 and REST need the network"
        );
        // Secrets stay in the environment.
        assert!(!args.iter().any(|a| a.contains("pw")));
        assert!(spec.env.contains(&("RESTIC_PASSWORD".into(), "pw".into())));
        assert!(spec.env.contains(&("TMPDIR".into(), "/tmp".into())));
    }
}

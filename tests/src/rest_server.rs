//! restic's rest-server (`scripts/install-rest-server`, pinned and cached), serving a repository
//! directory on loopback: an `--append-only` instance for the credentials agents hold, a full-access
//! one for maintenance, both on the same data (docs/hardening.md). Stopped on drop.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

/// The pinned rest-server (built once); panics when it cannot be had.
pub fn binary() -> PathBuf {
    let out = Command::new(crate::workspace_root().join("scripts/install-rest-server"))
        .output()
        .expect("scripts/install-rest-server");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    PathBuf::from(String::from_utf8_lossy(&out.stdout).trim())
}

/// A running rest-server.
pub struct RestServer {
    child: Child,
    /// `http://127.0.0.1:<port>/`; repositories are paths below it.
    pub url: String,
    pub user: String,
    pub password: String,
}

/// An htpasswd line rest-server accepts: `{SHA}` and the base64 of the password's SHA-1.
fn htpasswd_line(user: &str, password: &str) -> String {
    let mut child = Command::new("sh")
        .args(["-c", "openssl dgst -sha1 -binary | openssl base64 -A"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .expect("openssl");
    {
        use std::io::Write;
        child
            .stdin
            .take()
            .expect("stdin")
            .write_all(password.as_bytes())
            .expect("write");
    }
    let out = child.wait_with_output().expect("openssl");
    assert!(out.status.success());
    format!(
        "{user}:{{SHA}}{}\n",
        String::from_utf8_lossy(&out.stdout).trim()
    )
}

impl RestServer {
    /// Serves `data` (created if missing) for `user`/`password`, append-only when asked; returns
    /// once the port answers (at most 20 s).
    pub async fn start(data: &Path, append_only: bool, user: &str, password: &str) -> RestServer {
        std::fs::create_dir_all(data).expect("data dir");
        let htpasswd = data.with_extension(if append_only {
            "append-only.htpasswd"
        } else {
            "full.htpasswd"
        });
        std::fs::write(&htpasswd, htpasswd_line(user, password)).expect("htpasswd");
        let port = crate::free_port("127.0.0.1");
        let log = data.with_extension(format!("rest-server-{port}.log"));
        let out = std::fs::File::create(&log).expect("log");
        let mut cmd = Command::new(binary());
        cmd.arg("--path")
            .arg(data)
            .arg("--listen")
            .arg(format!("127.0.0.1:{port}"))
            .arg("--htpasswd-file")
            .arg(&htpasswd);
        if append_only {
            cmd.arg("--append-only");
        }
        let child = cmd
            .stdin(Stdio::null())
            .stdout(out.try_clone().expect("dup"))
            .stderr(out)
            .spawn()
            .expect("spawn rest-server");
        let server = RestServer {
            child,
            url: format!("http://127.0.0.1:{port}/"),
            user: user.into(),
            password: password.into(),
        };
        crate::wait_until("rest-server listening", Duration::from_secs(20), || {
            std::net::TcpStream::connect(("127.0.0.1", port)).is_ok()
        })
        .await;
        server
    }

    /// The repository `name` below this server, for restic (`rest:` + URL, no credentials: those
    /// go in `RESTIC_REST_USERNAME` / `RESTIC_REST_PASSWORD`).
    pub fn repository(&self, name: &str) -> String {
        format!("rest:{}{name}/", self.url)
    }

    /// The environment restic needs for this server's credentials.
    pub fn env(&self) -> [(&str, &str); 2] {
        [
            ("RESTIC_REST_USERNAME", self.user.as_str()),
            ("RESTIC_REST_PASSWORD", self.password.as_str()),
        ]
    }

    /// An HTTP request to `path` with this server's credentials; the status code.
    pub fn request(&self, method: &str, path: &str, body: Option<&[u8]>) -> u16 {
        let mut cmd = Command::new("curl");
        cmd.args([
            "-s",
            "-o",
            "/dev/null",
            "-w",
            "%{http_code}",
            "-X",
            method,
            "-u",
        ])
        .arg(format!("{}:{}", self.user, self.password))
        .arg(format!("{}{path}", self.url));
        if body.is_some() {
            cmd.args(["--data-binary", "@-"]);
        }
        let mut child = cmd
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()
            .expect("curl");
        {
            use std::io::Write;
            let mut stdin = child.stdin.take().expect("stdin");
            if let Some(b) = body {
                stdin.write_all(b).expect("write");
            }
        }
        let out = child.wait_with_output().expect("curl");
        String::from_utf8_lossy(&out.stdout)
            .trim()
            .parse()
            .expect("an HTTP status")
    }
}

impl Drop for RestServer {
    fn drop(&mut self) {
        crate::terminate(&mut self.child);
    }
}

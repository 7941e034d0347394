//! A real S3-protocol endpoint for tests: `moto_server` on 127.0.0.1, stopped on drop.

use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

pub struct Moto {
    child: Child,
    pub endpoint: String,
}

impl Moto {
    pub fn start() -> Moto {
        let port = crate::free_port("127.0.0.1");
        let log = std::env::temp_dir().join(format!("stowage-moto-{port}.log"));
        let child = Command::new(
            std::env::var("STOWAGE_MOTO_SERVER").unwrap_or_else(|_| "moto_server".into()),
        )
        .args(["-H", "127.0.0.1", "-p", &port.to_string()])
        .stdin(Stdio::null())
        .stdout(
            std::fs::File::create(&log)
                .expect("log")
                .try_clone()
                .map(Stdio::from)
                .unwrap_or(Stdio::null()),
        )
        .stderr(
            std::fs::File::create(&log)
                .map(Stdio::from)
                .unwrap_or(Stdio::null()),
        )
        .spawn()
        .expect("start moto_server (pip install 'moto[server]')");
        let m = Moto {
            child,
            endpoint: format!("http://127.0.0.1:{port}"),
        };
        let deadline = Instant::now() + Duration::from_secs(30);
        while Instant::now() < deadline {
            if std::net::TcpStream::connect(("127.0.0.1", port)).is_ok() {
                return m;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        panic!(
            "moto_server did not listen on {port} within 30s (log: {})",
            log.display()
        );
    }
}

impl Moto {
    /// Creates bucket `name` (moto needs no credentials for it). restic creates a missing bucket
    /// only in `init`; opening a repository in a missing bucket retries for minutes.
    pub fn create_bucket(&self, name: &str) {
        use std::io::{Read, Write};
        let addr = self.endpoint.trim_start_matches("http://");
        let mut s = std::net::TcpStream::connect(addr).expect("connect to moto");
        s.set_read_timeout(Some(Duration::from_secs(10)))
            .expect("timeout");
        write!(
            s,
            "PUT /{name} HTTP/1.0\r\nHost: {addr}\r\nContent-Length: 0\r\n\r\n"
        )
        .expect("PUT");
        let mut reply = String::new();
        let _ = s.read_to_string(&mut reply);
        assert!(
            reply.starts_with("HTTP/1.0 200") || reply.starts_with("HTTP/1.1 200"),
            "create bucket {name}: {reply}"
        );
    }

    /// Freezes (SIGSTOP) or thaws (SIGCONT) the server: an S3 endpoint that stops answering.
    pub fn signal(&self, sig: nix::sys::signal::Signal) {
        let pid = nix::unistd::Pid::from_raw(self.child.id() as i32);
        nix::sys::signal::kill(pid, sig).expect("signal moto_server");
    }
}

impl Drop for Moto {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

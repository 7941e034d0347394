//! Starting a real `stowage-agent` process for a test and talking to it.
//!
//! Length: the agent test harness: process, PKI, kubelet-style volumes, and one driver per streamed call.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;
use stowage_proto::v1::agent_client::AgentClient;
use stowage_proto::v1::{
    self, BackupEvent, BackupRequest, BackupResult, Progress, RestoreEvent, RestoreRequest,
    RestoreResult,
};
use tonic::transport::{Certificate, Channel, ClientTlsConfig, Identity};

use crate::tls::{Pem, Pki};

#[derive(Clone)]
pub struct AgentOptions {
    pub node: String,
    pub ip: String,
    pub kubelet_dir: PathBuf,
    pub max_concurrent: u32,
    pub restic: Option<PathBuf>,
    /// `--bwrap` (default: bwrap on PATH). Tests that watch or change how restic is started wrap
    /// bubblewrap, since the sandbox runs nothing but a static restic.
    pub bwrap: Option<PathBuf>,
    /// `--local-repository-root`s (default: the directory holding the kubelet directory).
    pub local_roots: Vec<PathBuf>,
    /// The gRPC port (default: a free one).
    pub grpc_port: Option<u16>,
    pub extra_args: Vec<String>,
    /// `--verify-keep-free-percent`: 1 here, where the test machine's disk is over 90% full (the
    /// agent's default, 10, would refuse every drill); a test of the bound sets its own.
    pub verify_keep_free_percent: u8,
    /// The agent's API access (`KUBECONFIG`): none by default, so commands cannot run.
    pub kubeconfig: Option<PathBuf>,
}

impl AgentOptions {
    pub fn new(kubelet_dir: &Path) -> Self {
        Self {
            node: "node-1".into(),
            ip: "127.0.0.1".into(),
            kubelet_dir: kubelet_dir.to_path_buf(),
            max_concurrent: 3,
            restic: None,
            bwrap: None,
            local_roots: kubelet_dir
                .parent()
                .map(Path::to_path_buf)
                .into_iter()
                .collect(),
            grpc_port: None,
            extra_args: Vec::new(),
            verify_keep_free_percent: 1,
            kubeconfig: None,
        }
    }
}

pub struct Agent {
    child: Child,
    pub grpc: SocketAddr,
    pub metrics: SocketAddr,
    pub log: PathBuf,
}

impl Agent {
    /// Starts the agent with mTLS from `pki` and waits until /healthz answers 200 (30 s at most).
    pub async fn start(opts: AgentOptions, pki: &Pki) -> Agent {
        let port = opts.grpc_port.unwrap_or_else(|| crate::free_port(&opts.ip));
        let grpc: SocketAddr = format!("{}:{}", opts.ip, port).parse().expect("addr");
        let metrics: SocketAddr = format!("{}:{}", opts.ip, crate::free_port(&opts.ip))
            .parse()
            .expect("addr");
        let log = pki
            .dir
            .join(format!("agent-{}-{}.log", opts.node, grpc.port()));
        let cache = pki.dir.join(format!("cache-{}", grpc.port()));
        let out = std::fs::File::create(&log).expect("log file");
        let child = Command::new(crate::binary("stowage-agent"))
            .arg("--node-name")
            .arg(&opts.node)
            .arg("--kubelet-dir")
            .arg(&opts.kubelet_dir)
            .arg("--grpc-listen")
            .arg(grpc.to_string())
            .arg("--metrics-listen")
            .arg(metrics.to_string())
            .arg("--tls-cert")
            .arg(pki.dir.join("server.pem"))
            .arg("--tls-key")
            .arg(pki.dir.join("server-key.pem"))
            .arg("--tls-client-ca")
            .arg(pki.dir.join("ca.pem"))
            .arg("--max-concurrent")
            .arg(opts.max_concurrent.to_string())
            .arg("--restic")
            .arg(opts.restic.unwrap_or_else(crate::restic::binary))
            .arg("--cache-dir")
            .arg(cache)
            .args(
                opts.bwrap
                    .iter()
                    .flat_map(|b| ["--bwrap".as_ref(), b.as_os_str()]),
            )
            .arg("--client-identity")
            .arg("stowage-coordinator")
            .args(
                opts.local_roots
                    .iter()
                    .flat_map(|r| ["--local-repository-root".as_ref(), r.as_os_str()]),
            )
            .arg("--verify-keep-free-percent")
            .arg(opts.verify_keep_free_percent.to_string())
            .args(&opts.extra_args)
            .envs(
                opts.kubeconfig
                    .iter()
                    .map(|k| ("KUBECONFIG", k.as_os_str())),
            )
            .env("RUST_LOG", "info,stowage_agent=debug,restic_wrap=debug")
            .stdin(Stdio::null())
            .stdout(out.try_clone().expect("dup"))
            .stderr(out)
            .spawn()
            .expect("spawn stowage-agent");
        let mut agent = Agent {
            child,
            grpc,
            metrics,
            log,
        };
        crate::wait_healthy(&mut agent.child, agent.metrics, "agent", &agent.log).await;
        agent
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// A GET against the metrics listener: (status code, body).
    pub async fn http_get(&self, path: &str) -> Option<(u16, String)> {
        crate::http_get(self.metrics, path).await
    }

    pub async fn metrics_text(&self) -> String {
        self.http_get("/metrics").await.expect("scrape /metrics").1
    }

    /// The value of a sample line `name{labels} value` (labels as printed, or "" for none).
    pub async fn metric(&self, series: &str) -> Option<f64> {
        metric_value(&self.metrics_text().await, series)
    }

    /// A client presenting `identity` (None: no client certificate) and trusting the test CA.
    pub async fn connect(
        &self,
        pki: &Pki,
        identity: Option<&Pem>,
    ) -> Result<AgentClient<Channel>, tonic::transport::Error> {
        Ok(AgentClient::new(self.channel(pki, identity).await?))
    }

    /// An mTLS channel to the agent.
    pub async fn channel(
        &self,
        pki: &Pki,
        identity: Option<&Pem>,
    ) -> Result<Channel, tonic::transport::Error> {
        let mut tls = ClientTlsConfig::new()
            .ca_certificate(Certificate::from_pem(&pki.ca_pem))
            .domain_name("localhost");
        if let Some(id) = identity {
            tls = tls.identity(Identity::from_pem(&id.cert, &id.key));
        }
        let channel = Channel::from_shared(format!("https://{}", self.grpc))
            .expect("uri")
            .tls_config(tls)?
            .connect_timeout(Duration::from_secs(5))
            .connect()
            .await?;
        Ok(channel)
    }

    pub async fn client(&self, pki: &Pki) -> AgentClient<Channel> {
        self.connect(pki, Some(&pki.client))
            .await
            .expect("connect with client certificate")
    }

    pub fn sigterm(&self) {
        let _ = kill(Pid::from_raw(self.child.id() as i32), Signal::SIGTERM);
    }

    /// Waits for the process to exit, at most `timeout`.
    pub async fn wait_exit(&mut self, timeout: Duration) -> Option<ExitStatus> {
        let deadline = Instant::now() + timeout;
        while Instant::now() < deadline {
            if let Some(s) = self.child.try_wait().expect("try_wait") {
                return Some(s);
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        None
    }

    /// Kills the agent at once (SIGKILL), as a node failure would.
    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for Agent {
    fn drop(&mut self) {
        crate::terminate(&mut self.child);
    }
}

pub fn metric_value(text: &str, series: &str) -> Option<f64> {
    text.lines().filter(|l| !l.starts_with('#')).find_map(|l| {
        l.strip_prefix(series)
            .and_then(|rest| rest.strip_prefix(' '))
            .and_then(|v| v.trim().parse().ok())
    })
}

/// What a streamed operation produced: progress messages, then a result or a status.
pub struct Outcome<R> {
    pub progress: Vec<Progress>,
    pub result: Result<R, tonic::Status>,
}

/// A streamed operation's message: progress, or the final result.
pub trait StreamEvent {
    type Result;
    fn split(self) -> Option<Result<Progress, Self::Result>>;
}

impl StreamEvent for BackupEvent {
    type Result = BackupResult;
    fn split(self) -> Option<Result<Progress, BackupResult>> {
        match self.event? {
            v1::backup_event::Event::Progress(p) => Some(Ok(p)),
            v1::backup_event::Event::Result(r) => Some(Err(r)),
        }
    }
}

impl StreamEvent for RestoreEvent {
    type Result = RestoreResult;
    fn split(self) -> Option<Result<Progress, RestoreResult>> {
        match self.event? {
            v1::restore_event::Event::Progress(p) => Some(Ok(p)),
            v1::restore_event::Event::Result(r) => Some(Err(r)),
        }
    }
}

impl StreamEvent for v1::VerifyEvent {
    type Result = v1::VerifyResult;
    fn split(self) -> Option<Result<Progress, v1::VerifyResult>> {
        match self.event? {
            v1::verify_event::Event::Progress(p) => Some(Ok(p)),
            v1::verify_event::Event::Result(r) => Some(Err(r)),
        }
    }
}

impl StreamEvent for v1::MaintenanceEvent {
    type Result = v1::MaintenanceResult;
    fn split(self) -> Option<Result<Progress, v1::MaintenanceResult>> {
        match self.event? {
            v1::maintenance_event::Event::Progress(p) => Some(Ok(p)),
            v1::maintenance_event::Event::Result(r) => Some(Err(r)),
        }
    }
}

/// Reads a streamed call to its end (the call's own error counts as the result).
pub async fn drive<E: StreamEvent>(
    call: Result<tonic::Response<tonic::Streaming<E>>, tonic::Status>,
) -> Outcome<E::Result> {
    let mut progress = Vec::new();
    let mut stream = match call {
        Ok(s) => s.into_inner(),
        Err(status) => {
            return Outcome {
                progress,
                result: Err(status),
            };
        }
    };
    loop {
        match stream.message().await {
            Ok(Some(e)) => match e.split() {
                Some(Ok(p)) => progress.push(p),
                Some(Err(r)) => {
                    return Outcome {
                        progress,
                        result: Ok(r),
                    };
                }
                None => {}
            },
            Ok(None) => {
                return Outcome {
                    progress,
                    result: Err(tonic::Status::unknown("stream ended without a result")),
                };
            }
            Err(status) => {
                return Outcome {
                    progress,
                    result: Err(status),
                };
            }
        }
    }
}

/// Runs a Backup call to its end.
pub async fn backup(
    client: &mut AgentClient<Channel>,
    req: BackupRequest,
) -> Outcome<BackupResult> {
    drive(client.backup(req).await).await
}

/// Runs a Restore call to its end.
pub async fn restore(
    client: &mut AgentClient<Channel>,
    req: RestoreRequest,
) -> Outcome<RestoreResult> {
    drive(client.restore(req).await).await
}

/// Runs a Verify call (a drill) to its end.
pub async fn verify(
    client: &mut AgentClient<Channel>,
    req: v1::VerifyRequest,
) -> Outcome<v1::VerifyResult> {
    drive(client.verify(req).await).await
}

/// Runs a Prune call to its end.
pub async fn prune(
    client: &mut AgentClient<Channel>,
    req: v1::PruneRequest,
) -> Outcome<v1::MaintenanceResult> {
    drive(client.prune(req).await).await
}

/// A REST repository description (`url` ends with `/`), its credentials in the request.
pub fn rest_repo(url: &str, user: &str, password: &str, repo_password: &str) -> v1::Repository {
    v1::Repository {
        backend: Some(v1::repository::Backend::Rest(v1::RestBackend {
            url: url.into(),
            username: user.into(),
            password: password.into(),
        })),
        password: repo_password.into(),
        ..Default::default()
    }
}

/// A local repository description.
pub fn local_repo(path: &Path, password: &str, auto_init: bool) -> v1::Repository {
    v1::Repository {
        backend: Some(v1::repository::Backend::Local(v1::LocalBackend {
            path: path.display().to_string(),
        })),
        password: password.into(),
        auto_init,
        ..Default::default()
    }
}

/// Creates a kubelet-style CSI volume `pods/<uid>/volumes/kubernetes.io~csi/<pv>/mount` and returns
/// it. Like a kubelet's, it is a mount point (a bind mount onto itself): the agent refuses a CSI
/// directory that is not. Undo with [`crate::unmount_below`].
pub fn csi_volume(kubelet_dir: &Path, pod_uid: &str, pv: &str) -> PathBuf {
    let d = kubelet_dir
        .join("pods")
        .join(pod_uid)
        .join("volumes/kubernetes.io~csi")
        .join(pv)
        .join("mount");
    std::fs::create_dir_all(&d).expect("mkdir volume");
    let status = Command::new("mount")
        .arg("--bind")
        .arg(&d)
        .arg(&d)
        .status()
        .expect("mount");
    assert!(status.success(), "bind-mounting {}", d.display());
    d
}

pub fn volume_backup(
    repo: v1::Repository,
    pod_uid: &str,
    pv: &str,
    namespace: &str,
    pvc: &str,
) -> BackupRequest {
    BackupRequest {
        run_id: format!("test/{pvc}"),
        repository: Some(repo),
        identity: Some(v1::VolumeIdentity {
            namespace: namespace.into(),
            pvc: pvc.into(),
            pod_name: format!("{pvc}-pod"),
        }),
        source: Some(v1::backup_request::Source::Volume(v1::VolumeSource {
            r#ref: Some(v1::VolumeRef {
                pod_uid: pod_uid.into(),
                volume_name: pv.into(),
            }),
        })),
        ..Default::default()
    }
}

/// Service names the agent lists through gRPC server reflection (v1).
pub async fn reflected_services(channel: Channel) -> Vec<String> {
    use tonic_reflection::pb::v1::ServerReflectionRequest;
    use tonic_reflection::pb::v1::server_reflection_client::ServerReflectionClient;
    use tonic_reflection::pb::v1::server_reflection_request::MessageRequest;
    use tonic_reflection::pb::v1::server_reflection_response::MessageResponse;
    let req = ServerReflectionRequest {
        host: String::new(),
        message_request: Some(MessageRequest::ListServices(String::new())),
    };
    let mut stream = ServerReflectionClient::new(channel)
        .server_reflection_info(tokio_stream::iter(vec![req]))
        .await
        .expect("reflection call")
        .into_inner();
    match stream
        .message()
        .await
        .expect("reflection response")
        .and_then(|r| r.message_response)
    {
        Some(MessageResponse::ListServicesResponse(list)) => {
            list.service.into_iter().map(|s| s.name).collect()
        }
        other => panic!("unexpected reflection answer: {other:?}"),
    }
}

/// A test's working directory: a PKI, a kubelet directory, room for repositories. Volumes mounted
/// below it are unmounted when it is dropped.
pub struct Setup {
    pub tmp: tempfile::TempDir,
    pub pki: Pki,
}

impl Drop for Setup {
    fn drop(&mut self) {
        crate::unmount_below(self.tmp.path());
    }
}

impl Setup {
    pub fn new() -> Self {
        let tmp = tempfile::tempdir().expect("tmp");
        let pki = Pki::create(&tmp.path().join("pki"));
        std::fs::create_dir_all(tmp.path().join("kubelet/pods")).expect("kubelet");
        Setup { tmp, pki }
    }
    pub fn path(&self, p: &str) -> PathBuf {
        self.tmp.path().join(p)
    }
    pub fn kubelet(&self) -> PathBuf {
        self.path("kubelet")
    }
    pub fn repo(&self) -> PathBuf {
        self.path("repo")
    }
    pub async fn agent(&self) -> Agent {
        Agent::start(AgentOptions::new(&self.kubelet()), &self.pki).await
    }
    pub async fn agent_with(&self, f: impl FnOnce(&mut AgentOptions)) -> Agent {
        let mut o = AgentOptions::new(&self.kubelet());
        f(&mut o);
        Agent::start(o, &self.pki).await
    }
}

impl Default for Setup {
    fn default() -> Self {
        Self::new()
    }
}

/// An S3 repository in `bucket` of a moto endpoint (moto accepts any credentials).
pub fn s3_repo(endpoint: &str, bucket: &str, password: &str) -> v1::Repository {
    v1::Repository {
        backend: Some(v1::repository::Backend::S3(v1::S3Backend {
            endpoint: endpoint.into(),
            bucket: bucket.into(),
            prefix: "shop".into(),
            region: "us-east-1".into(),
            access_key_id: "AKIATESTKEY".into(),
            secret_access_key: "test-secret-key-value".into(),
        })),
        password: password.into(),
        auto_init: true,
        ..Default::default()
    }
}

/// bubblewrap that leaves CAP_DAC_READ_SEARCH out of the sandbox, so a 0000 file is unreadable even
/// to root (as an EIO or a root-squashed NFS file would be in production). Still the real restic.
pub fn bwrap_without_dac(dir: &Path) -> PathBuf {
    use std::os::unix::fs::PermissionsExt;
    let wrapper = dir.join("bwrap-no-dac");
    std::fs::write(
        &wrapper,
        "#!/bin/bash\nargs=()\nwhile [ $# -gt 0 ]; do\n  if [ \"$1\" = --cap-add ] && [ \"$2\" = CAP_DAC_READ_SEARCH ]; then shift 2; continue; fi\n  args+=(\"$1\"); shift\ndone\nexec bwrap \"${args[@]}\"\n",
    )
    .expect("wrapper");
    std::fs::set_permissions(&wrapper, std::fs::Permissions::from_mode(0o755)).expect("chmod");
    wrapper
}

//! What the kubelet's container runtime does, for the images the harness can run: a pod on a kwok
//! node whose every container uses a *local image* (one the harness built, such as Stowage's own)
//! really runs, as local processes, from the pod spec the API server holds.
//!
//! Each container is one process tree in a bubblewrap sandbox that plays the container:
//! - a root filesystem of the host's read-only system directories plus the image's files;
//! - the pod's volumes at their `mountPath`s: `hostPath` (from the node's directory, see
//!   [`host_path`]), `secret`, `emptyDir` and `projected` (the service-account token from the
//!   TokenRequest API, a ConfigMap, the downward API), each read-only when the mount says so;
//! - its own PID, IPC and UTS namespaces (hostname: the pod name), the pod's IP (kwok hands out
//!   loopback addresses, so every pod's IP is bindable here), `env` with `fieldRef`s and `$(VAR)`
//!   expansion, `KUBERNETES_SERVICE_HOST/PORT` (the API server), `runAsUser`/`runAsGroup`,
//!   `readOnlyRootFilesystem`, and exactly the capabilities of its `securityContext`.
//!
//! The pod's `Ready` condition follows the containers' readiness probes (HTTP GET), and an exited
//! container is restarted with backoff, as `restartPolicy: Always` asks. A deleted pod's processes
//! get SIGTERM, then SIGKILL after its grace period (10 s at most here).
//!
//! Not emulated: liveness probes, exec/TCP probes, resource limits, and token rotation (tokens live
//! an hour, longer than any test).
//!
//! Length: a container runtime's whole pod lifecycle (sandbox, volumes, environment, probes, restarts) in one place.
//!
//! Length: one emulated container runtime (sandbox, volumes, environment, probes, restarts) that the harness keeps in step with the kubelet's behaviour.

use std::collections::{BTreeMap, HashMap};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::Arc;
use std::time::{Duration, Instant};

use k8s_openapi::api::authentication::v1::{BoundObjectReference, TokenRequest, TokenRequestSpec};
use k8s_openapi::api::core::v1::{ConfigMap, Container, Pod, Secret, ServiceAccount, Volume};
use kube::api::{Api, Patch, PatchParams, PostParams};
use nix::sys::signal::{Signal, killpg};
use nix::unistd::Pid;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// The annotation the emulator adds (with the volumes-mounted one) to pods it runs itself; kwok's
/// stage then leaves their readiness to the probes (tests/cluster/kwok-stages.yaml).
pub const RUNS_LOCALLY: &str = "kubelet-emu.stowage.dev/runs-locally";

/// An image the harness can run: its repository (the image reference without tag or digest) and
/// its files (path in the image, file on this machine); the first file is the entrypoint.
#[derive(Debug, Clone)]
pub struct LocalImage {
    pub repository: String,
    pub files: Vec<(PathBuf, PathBuf)>,
}

impl LocalImage {
    /// `repository=/path/in/image:/host/file[,/path/in/image:/host/file...]`.
    pub fn parse(s: &str) -> Result<Self, String> {
        let (repository, files) = s
            .split_once('=')
            .ok_or_else(|| format!("{s:?}: expected repository=/in/image:/host/file,..."))?;
        let files = files
            .split(',')
            .map(|f| {
                f.split_once(':')
                    .map(|(a, b)| (PathBuf::from(a), PathBuf::from(b)))
                    .ok_or_else(|| format!("{f:?}: expected /in/image:/host/file"))
            })
            .collect::<Result<Vec<_>, _>>()?;
        if files.is_empty() {
            return Err(format!("{s:?}: no files"));
        }
        Ok(Self {
            repository: repository.to_string(),
            files,
        })
    }
}

/// The repository of an image reference: without `@digest` and without a `:tag` after the last `/`.
fn repository_of(image: &str) -> &str {
    let image = image.split('@').next().unwrap_or(image);
    match image.rfind(':') {
        Some(i) if !image[i..].contains('/') => &image[..i],
        _ => image,
    }
}

pub struct Config {
    pub cluster: PathBuf,
    pub images: Vec<LocalImage>,
    /// Where pods reach the API server (what the `kubernetes` Service stands for).
    pub api_host: String,
    pub api_port: u16,
}

impl Config {
    fn image(&self, image: &str) -> Option<&LocalImage> {
        let repo = repository_of(image);
        self.images.iter().find(|i| i.repository == repo)
    }

    /// Whether every container of the pod uses a local image (and it has at least one).
    pub fn runs(&self, pod: &Pod) -> bool {
        pod.spec.as_ref().is_some_and(|s| {
            !s.containers.is_empty()
                && s.containers
                    .iter()
                    .all(|c| c.image.as_deref().is_some_and(|i| self.image(i).is_some()))
        })
    }
}

/// The directory on this machine that stands for `path` on node `node`: the kubelet's directory is
/// the node's `kubelet/`, anything else lives under the node's `root/`.
pub fn host_path(cluster: &Path, node: &str, path: &str) -> PathBuf {
    let node_dir = cluster.join("nodes").join(node);
    let rel = |p: &str| p.trim_start_matches('/').to_string();
    match path.strip_prefix("/var/lib/kubelet") {
        Some(rest) if rest.is_empty() || rest.starts_with('/') => {
            node_dir.join("kubelet").join(rel(rest))
        }
        _ => node_dir.join("root").join(rel(path)),
    }
}

struct ContainerProc {
    spec: Container,
    child: Option<tokio::process::Child>,
    restarts: u32,
    next_start: Instant,
    ready: bool,
    next_probe: Instant,
}

/// What a container's sandbox needs to know of its pod.
pub struct PodInfo {
    pub namespace: String,
    pub name: String,
    /// The pod's files on this machine (its volumes).
    pub dir: PathBuf,
}

struct RunningPod {
    pod: PodInfo,
    uid: String,
    ip: String,
    containers: Vec<ContainerProc>,
    ready: bool,
    grace: Duration,
}

pub struct Runner {
    cfg: Arc<Config>,
    client: kube::Client,
    pods: HashMap<String, RunningPod>,
    /// Pods that could not start yet, and when to try again.
    failed: HashMap<String, Instant>,
}

impl Runner {
    pub fn new(cfg: Config, client: kube::Client) -> Self {
        Self {
            cfg: Arc::new(cfg),
            client,
            pods: HashMap::new(),
            failed: HashMap::new(),
        }
    }

    pub fn config(&self) -> &Config {
        &self.cfg
    }

    /// Starts, restarts, probes and stops processes to match `pods`.
    pub async fn reconcile(&mut self, pods: &[Arc<Pod>]) {
        let mut live = std::collections::HashSet::new();
        for pod in pods {
            let Some(uid) = pod.metadata.uid.clone() else {
                continue;
            };
            if pod.metadata.deletion_timestamp.is_some() || !self.wanted(pod) {
                continue;
            }
            live.insert(uid.clone());
            if self.pods.contains_key(&uid) {
                continue;
            }
            if self.failed.get(&uid).is_some_and(|t| Instant::now() < *t) {
                continue;
            }
            match self.prepare(pod).await {
                Ok(running) => {
                    eprintln!(
                        "runner: starting {}/{} ({} container(s)) at {}",
                        running.pod.namespace,
                        running.pod.name,
                        running.containers.len(),
                        running.ip
                    );
                    self.failed.remove(&uid);
                    self.pods.insert(uid, running);
                }
                Err(e) => {
                    eprintln!(
                        "runner: cannot start {}/{}: {e}",
                        pod.metadata.namespace.as_deref().unwrap_or_default(),
                        pod.metadata.name.as_deref().unwrap_or_default()
                    );
                    self.failed
                        .insert(uid, Instant::now() + Duration::from_secs(3));
                }
            }
        }
        let gone: Vec<String> = self
            .pods
            .keys()
            .filter(|u| !live.contains(*u))
            .cloned()
            .collect();
        for uid in gone {
            if let Some(p) = self.pods.remove(&uid) {
                eprintln!("runner: stopping {}/{}", p.pod.namespace, p.pod.name);
                tokio::spawn(stop(p));
            }
        }
        let cfg = self.cfg.clone();
        for p in self.pods.values_mut() {
            supervise(&cfg, p);
            let ready = probe_all(p).await;
            if ready != p.ready {
                match patch_ready(&self.client, p, ready).await {
                    Ok(()) => {
                        eprintln!("runner: {}/{} ready={ready}", p.pod.namespace, p.pod.name);
                        p.ready = ready;
                    }
                    Err(e) => {
                        eprintln!("runner: status of {}/{}: {e}", p.pod.namespace, p.pod.name)
                    }
                }
            }
        }
    }

    /// A pod this runner should run now: on a node of this cluster, its volumes in place (so kwok
    /// has given it an IP), and every container from a local image.
    fn wanted(&self, pod: &Pod) -> bool {
        let ann = |k: &str| {
            pod.metadata
                .annotations
                .as_ref()
                .and_then(|a| a.get(k))
                .map(String::as_str)
        };
        let node = pod.spec.as_ref().and_then(|s| s.node_name.as_deref());
        let ip = pod.status.as_ref().and_then(|s| s.pod_ip.as_deref());
        ann(RUNS_LOCALLY) == Some("true")
            && node.is_some_and(|n| self.cfg.cluster.join("nodes").join(n).is_dir())
            && ip.is_some_and(|i| !i.is_empty())
    }

    /// Materialises the pod's volumes and env; the containers start at the next supervision.
    async fn prepare(&self, pod: &Pod) -> Result<RunningPod, String> {
        let namespace = pod.metadata.namespace.clone().unwrap_or_default();
        let name = pod.metadata.name.clone().unwrap_or_default();
        let uid = pod.metadata.uid.clone().unwrap_or_default();
        let spec = pod.spec.as_ref().ok_or("no spec")?;
        let node = spec.node_name.clone().unwrap_or_default();
        let status = pod.status.clone().unwrap_or_default();
        let ip = status.pod_ip.clone().unwrap_or_default();
        let dir = self.cfg.cluster.join("runner").join(&uid);
        std::fs::create_dir_all(dir.join("volumes")).map_err(|e| e.to_string())?;
        for v in spec.volumes.iter().flatten() {
            self.volume(pod, &node, v, &dir.join("volumes").join(&v.name))
                .await
                .map_err(|e| format!("volume {}: {e}", v.name))?;
        }
        let field = |path: &str| -> Option<String> {
            match path {
                "metadata.name" => Some(name.clone()),
                "metadata.namespace" => Some(namespace.clone()),
                "metadata.uid" => Some(uid.clone()),
                "spec.nodeName" => Some(node.clone()),
                "spec.serviceAccountName" => spec.service_account_name.clone(),
                "status.podIP" => Some(ip.clone()),
                "status.hostIP" => status.host_ip.clone(),
                _ => None,
            }
        };
        let mut env = BTreeMap::new();
        env.insert(
            "PATH".to_string(),
            "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin".to_string(),
        );
        env.insert("HOSTNAME".to_string(), name.clone());
        env.insert(
            "KUBERNETES_SERVICE_HOST".to_string(),
            self.cfg.api_host.clone(),
        );
        env.insert(
            "KUBERNETES_SERVICE_PORT".to_string(),
            self.cfg.api_port.to_string(),
        );
        let mut containers = Vec::new();
        for c in &spec.containers {
            let mut own = env.clone();
            for e in c.env.iter().flatten() {
                let value = match (&e.value, &e.value_from) {
                    (Some(v), _) => expand(v, &own),
                    (None, Some(from)) => match (&from.field_ref, &from.secret_key_ref) {
                        (Some(f), _) => field(&f.field_path).ok_or_else(|| {
                            format!("env {}: unsupported fieldRef {}", e.name, f.field_path)
                        })?,
                        (None, Some(s)) => {
                            let secret: Secret = Api::namespaced(self.client.clone(), &namespace)
                                .get(&s.name)
                                .await
                                .map_err(|err| {
                                    format!("env {}: secret {}: {err}", e.name, s.name)
                                })?;
                            let bytes = secret
                                .data
                                .as_ref()
                                .and_then(|d| d.get(&s.key))
                                .ok_or_else(|| {
                                    format!("env {}: no key {} in secret {}", e.name, s.key, s.name)
                                })?;
                            String::from_utf8_lossy(&bytes.0).into_owned()
                        }
                        _ => return Err(format!("env {}: unsupported valueFrom", e.name)),
                    },
                    (None, None) => String::new(),
                };
                own.insert(e.name.clone(), value);
            }
            // The pod's runAsUser/runAsGroup apply where the container does not set its own.
            let pod_sc = spec.security_context.clone().unwrap_or_default();
            let mut sc = c.security_context.clone().unwrap_or_default();
            sc.run_as_user = sc.run_as_user.or(pod_sc.run_as_user);
            sc.run_as_group = sc.run_as_group.or(pod_sc.run_as_group);
            containers.push(ContainerProc {
                spec: Container {
                    security_context: Some(sc),
                    // The env resolved once per pod start, kept with the container.
                    env: Some(
                        own.iter()
                            .map(|(k, v)| k8s_openapi::api::core::v1::EnvVar {
                                name: k.clone(),
                                value: Some(v.clone()),
                                value_from: None,
                            })
                            .collect(),
                    ),
                    ..c.clone()
                },
                child: None,
                restarts: 0,
                next_start: Instant::now(),
                ready: false,
                next_probe: Instant::now(),
            });
        }
        let grace = Duration::from_secs(
            spec.termination_grace_period_seconds
                .unwrap_or(30)
                .clamp(0, 10) as u64,
        );
        Ok(RunningPod {
            pod: PodInfo {
                namespace,
                name,
                dir,
            },
            uid,
            ip,
            containers,
            ready: false,
            grace,
        })
    }

    async fn volume(&self, pod: &Pod, node: &str, v: &Volume, dir: &Path) -> Result<(), String> {
        let ns = pod.metadata.namespace.clone().unwrap_or_default();
        let io = |e: std::io::Error| e.to_string();
        if let Some(h) = &v.host_path {
            let on_node = host_path(&self.cfg.cluster, node, &h.path);
            match h.type_.as_deref().unwrap_or("") {
                "Directory" if !on_node.is_dir() => {
                    return Err(format!("hostPath {} is not a directory on {node}", h.path));
                }
                "DirectoryOrCreate" | "" => std::fs::create_dir_all(&on_node).map_err(io)?,
                _ => {}
            }
            // A symlink standing for the node's directory; bubblewrap binds what it points at.
            let _ = std::fs::remove_file(dir);
            std::os::unix::fs::symlink(&on_node, dir).map_err(io)?;
            return Ok(());
        }
        std::fs::create_dir_all(dir).map_err(io)?;
        if v.empty_dir.is_some() {
            return Ok(());
        }
        if let Some(s) = &v.secret {
            let name = s.secret_name.clone().unwrap_or_default();
            let secret: Secret = Api::namespaced(self.client.clone(), &ns)
                .get(&name)
                .await
                .map_err(|e| format!("secret {name}: {e}"))?;
            let mode = s.default_mode.unwrap_or(0o644) as u32;
            let data = secret.data.unwrap_or_default();
            match &s.items {
                // Only the listed keys, at their paths, as the kubelet projects them.
                Some(items) => {
                    for item in items {
                        let val = data
                            .get(&item.key)
                            .ok_or_else(|| format!("no key {} in secret {name}", item.key))?;
                        let m = item.mode.map_or(mode, |m| m as u32);
                        write_file(&dir.join(&item.path), &val.0, m).map_err(io)?;
                    }
                }
                None => {
                    for (k, val) in &data {
                        write_file(&dir.join(k), &val.0, mode).map_err(io)?;
                    }
                }
            }
            return Ok(());
        }
        if let Some(p) = &v.projected {
            let mode = p.default_mode.unwrap_or(0o644) as u32;
            for src in p.sources.iter().flatten() {
                if let Some(t) = &src.service_account_token {
                    let token = self
                        .token(pod, t.audience.clone(), t.expiration_seconds)
                        .await?;
                    write_file(&dir.join(&t.path), token.as_bytes(), mode).map_err(io)?;
                }
                if let Some(c) = &src.config_map {
                    let cm: ConfigMap = Api::namespaced(self.client.clone(), &ns)
                        .get(&c.name)
                        .await
                        .map_err(|e| format!("configmap {}: {e}", c.name))?;
                    let data = cm.data.unwrap_or_default();
                    for item in c.items.iter().flatten() {
                        let val = data
                            .get(&item.key)
                            .ok_or(format!("no key {} in {}", item.key, c.name))?;
                        write_file(&dir.join(&item.path), val.as_bytes(), mode).map_err(io)?;
                    }
                }
                if let Some(d) = &src.downward_api {
                    for item in d.items.iter().flatten() {
                        let val = match item.field_ref.as_ref().map(|f| f.field_path.as_str()) {
                            Some("metadata.namespace") => ns.clone(),
                            Some("metadata.name") => pod.metadata.name.clone().unwrap_or_default(),
                            other => {
                                return Err(format!("unsupported downward API field {other:?}"));
                            }
                        };
                        write_file(&dir.join(&item.path), val.as_bytes(), mode).map_err(io)?;
                    }
                }
            }
            return Ok(());
        }
        Err(
            "unsupported volume type (the runner knows hostPath, secret, emptyDir, projected)"
                .into(),
        )
    }

    /// A bound service-account token for the pod, from the TokenRequest API (as the kubelet gets it).
    async fn token(
        &self,
        pod: &Pod,
        audience: Option<String>,
        expiration: Option<i64>,
    ) -> Result<String, String> {
        let ns = pod.metadata.namespace.clone().unwrap_or_default();
        let sa = pod
            .spec
            .as_ref()
            .and_then(|s| s.service_account_name.clone())
            .unwrap_or_else(|| "default".into());
        let req = TokenRequest {
            spec: TokenRequestSpec {
                audiences: audience.into_iter().collect(),
                expiration_seconds: Some(expiration.unwrap_or(3607)),
                bound_object_ref: Some(BoundObjectReference {
                    api_version: Some("v1".into()),
                    kind: Some("Pod".into()),
                    name: pod.metadata.name.clone(),
                    uid: pod.metadata.uid.clone(),
                }),
            },
            ..Default::default()
        };
        let got: TokenRequest = Api::<ServiceAccount>::namespaced(self.client.clone(), &ns)
            .create_subresource("token", &sa, &PostParams::default(), &req)
            .await
            .map_err(|e| format!("token for service account {ns}/{sa}: {e}"))?;
        Ok(got.status.map(|s| s.token).unwrap_or_default())
    }
}

fn write_file(path: &Path, data: &[u8], mode: u32) -> std::io::Result<()> {
    if let Some(parent) = path.parent() {
        std::fs::create_dir_all(parent)?;
    }
    std::fs::write(path, data)?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode & 0o7777))
}

/// `$(VAR)` references to earlier variables, as the kubelet expands them (`$$` escapes `$`).
pub fn expand(s: &str, env: &BTreeMap<String, String>) -> String {
    let mut out = String::new();
    let mut rest = s;
    while let Some(i) = rest.find('$') {
        out.push_str(&rest[..i]);
        let after = &rest[i + 1..];
        if let Some(stripped) = after.strip_prefix('$') {
            out.push('$');
            rest = stripped;
        } else if let Some(inner) = after.strip_prefix('(')
            && let Some(end) = inner.find(')')
            && let Some(v) = env.get(&inner[..end])
        {
            out.push_str(v);
            rest = &inner[end + 1..];
        } else {
            out.push('$');
            rest = after;
        }
    }
    out.push_str(rest);
    out
}

/// Starts containers that are due (first start, or a restart after backoff) and notices exits.
fn supervise(cfg: &Config, p: &mut RunningPod) {
    let RunningPod {
        containers, pod, ..
    } = p;
    let p: &PodInfo = pod;
    for c in containers {
        if let Some(child) = &mut c.child {
            match child.try_wait() {
                Ok(None) => continue,
                Ok(Some(status)) => {
                    eprintln!(
                        "runner: {}/{} container {} exited ({status}); restarting",
                        p.namespace, p.name, c.spec.name
                    );
                    c.child = None;
                    c.ready = false;
                    c.restarts += 1;
                    // The kubelet's crash-loop backoff, shortened: 1 s doubling to 10 s.
                    let backoff = Duration::from_secs((1u64 << c.restarts.min(4)).min(10));
                    c.next_start = Instant::now() + backoff;
                }
                Err(e) => eprintln!("runner: waiting on {}: {e}", c.spec.name),
            }
        }
        if c.child.is_none() && Instant::now() >= c.next_start {
            match spawn(cfg, p, &c.spec) {
                Ok(child) => {
                    c.child = Some(child);
                    c.next_probe = Instant::now();
                }
                Err(e) => {
                    eprintln!(
                        "runner: starting {}/{} {}: {e}",
                        p.namespace, p.name, c.spec.name
                    );
                    c.next_start = Instant::now() + Duration::from_secs(5);
                }
            }
        }
    }
}

/// The bubblewrap command line that plays container `c` of pod `p`.
pub fn bwrap_args(cfg: &Config, p: &PodInfo, c: &Container) -> Result<Vec<String>, String> {
    let image = c
        .image
        .as_deref()
        .and_then(|i| cfg.image(i))
        .ok_or("not a local image")?;
    let mut a: Vec<String> = Vec::new();
    let mut push = |xs: &[&str]| a.extend(xs.iter().map(|s| s.to_string()));
    push(&["--die-with-parent", "--unshare-pid", "--unshare-ipc"]);
    push(&["--unshare-uts", "--hostname", &p.name]);
    // The image's root: the host's system directories, read-only, on an otherwise empty root
    // (whose directories bubblewrap would create 0700).
    push(&["--perms", "0755", "--dir", "/etc"]);
    for d in [
        "/usr",
        "/etc/ssl",
        "/etc/ca-certificates",
        "/etc/alternatives",
    ] {
        if Path::new(d).exists() {
            push(&["--ro-bind", d, d]);
        }
    }
    for f in [
        "/etc/passwd",
        "/etc/group",
        "/etc/nsswitch.conf",
        "/etc/hosts",
        "/etc/ld.so.cache",
        "/etc/localtime",
    ] {
        if Path::new(f).exists() {
            push(&["--ro-bind", f, f]);
        }
    }
    for (link, target) in [
        ("/bin", "usr/bin"),
        ("/sbin", "usr/sbin"),
        ("/lib", "usr/lib"),
        ("/lib64", "usr/lib64"),
    ] {
        match std::fs::read_link(link) {
            Ok(_) => push(&["--symlink", target, link]),
            Err(_) if Path::new(link).is_dir() => push(&["--ro-bind", link, link]),
            Err(_) => {}
        }
    }
    // /tmp and /run are plain directories of the image's root, writable only when the root is.
    push(&[
        "--dev", "/dev", "--proc", "/proc", "--dir", "/tmp", "--dir", "/run",
    ]);
    push(&["--tmpfs", "/usr/local/bin"]);
    for (inside, host) in &image.files {
        if !host.exists() {
            return Err(format!(
                "the image file {} is not built ({})",
                inside.display(),
                host.display()
            ));
        }
        let (i, h) = (inside.display().to_string(), host.display().to_string());
        push(&["--ro-bind", &h, &i]);
    }
    // Mount points' parents as a runtime creates them (0755); bubblewrap's own would be 0700, which
    // a non-root container user could not traverse.
    let mut parents = std::collections::BTreeSet::new();
    for m in c.volume_mounts.iter().flatten() {
        let mut dir = Path::new(&m.mount_path).parent();
        while let Some(d) = dir.filter(|d| *d != Path::new("/")) {
            parents.insert(d.to_path_buf());
            dir = d.parent();
        }
    }
    for d in &parents {
        let d = d.display().to_string();
        push(&["--perms", "0755", "--dir", &d]);
    }
    for m in c.volume_mounts.iter().flatten() {
        let src = p.dir.join("volumes").join(&m.name);
        let src = std::fs::canonicalize(&src).map_err(|e| format!("volume {}: {e}", m.name))?;
        let bind = if m.read_only.unwrap_or(false) {
            "--ro-bind"
        } else {
            "--bind"
        };
        let s = src.display().to_string();
        push(&[bind, &s, &m.mount_path]);
    }
    // Capabilities: exactly the securityContext's for root (Stowage's pods always drop ALL, so the
    // runtime's default set does not apply). A non-root user gets none: setpriv (below) needs
    // SETUID/SETGID/SETPCAP to switch ids and empty the bounding set, and changing to a non-zero
    // uid clears the rest, as for a container process.
    push(&["--cap-drop", "ALL"]);
    let sc = c.security_context.as_ref();
    let user = sc.and_then(|s| s.run_as_user).filter(|u| *u != 0);
    if user.is_some() {
        push(&[
            "--cap-add",
            "CAP_SETUID",
            "--cap-add",
            "CAP_SETGID",
            "--cap-add",
            "CAP_SETPCAP",
        ]);
    } else {
        if sc.and_then(|s| s.privileged).unwrap_or(false) {
            push(&["--cap-add", "ALL"]);
        }
        for cap in sc
            .and_then(|s| s.capabilities.as_ref())
            .and_then(|c| c.add.as_ref())
            .into_iter()
            .flatten()
        {
            let cap = format!("CAP_{}", cap.trim_start_matches("CAP_"));
            push(&["--cap-add", &cap]);
        }
    }
    for (k, v) in c
        .env
        .iter()
        .flatten()
        .filter_map(|e| Some((&e.name, e.value.as_ref()?)))
    {
        push(&["--setenv", k, v]);
    }
    let env: BTreeMap<String, String> = c
        .env
        .iter()
        .flatten()
        .filter_map(|e| Some((e.name.clone(), e.value.clone()?)))
        .collect();
    if let Some(dir) = &c.working_dir {
        push(&["--chdir", dir]);
    }
    // readOnlyRootFilesystem: the root (not the volumes mounted on it) becomes read-only.
    if sc
        .and_then(|s| s.read_only_root_filesystem)
        .unwrap_or(false)
    {
        push(&["--remount-ro", "/", "--remount-ro", "/usr/local/bin"]);
    }
    push(&["--"]);
    if let Some(uid) = user {
        let gid = sc.and_then(|s| s.run_as_group).unwrap_or(uid);
        push(&[
            "setpriv",
            &format!("--reuid={uid}"),
            &format!("--regid={gid}"),
            "--clear-groups",
            "--inh-caps=-all",
            "--bounding-set=-all",
            "--",
        ]);
    }
    let entry = image.files[0].0.display().to_string();
    match &c.command {
        Some(cmd) if !cmd.is_empty() => a.extend(cmd.iter().map(|s| expand(s, &env))),
        _ => a.push(entry),
    }
    a.extend(c.args.iter().flatten().map(|s| expand(s, &env)));
    Ok(a)
}

fn spawn(cfg: &Config, p: &PodInfo, c: &Container) -> Result<tokio::process::Child, String> {
    let args = bwrap_args(cfg, p, c)?;
    let logs = cfg.cluster.join("logs").join("pods");
    std::fs::create_dir_all(&logs).map_err(|e| e.to_string())?;
    let log_path = logs.join(format!("{}_{}_{}.log", p.namespace, p.name, c.name));
    let log = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(&log_path)
        .map_err(|e| format!("{}: {e}", log_path.display()))?;
    let err = log.try_clone().map_err(|e| e.to_string())?;
    let mut cmd = tokio::process::Command::new("bwrap");
    cmd.args(&args)
        .env_clear()
        .stdin(Stdio::null())
        .stdout(log)
        .stderr(err)
        .process_group(0)
        .kill_on_drop(true);
    let child = cmd.spawn().map_err(|e| format!("bwrap: {e}"))?;
    eprintln!(
        "runner: started {}/{} {} (pid {:?}, log {})",
        p.namespace,
        p.name,
        c.name,
        child.id(),
        log_path.display()
    );
    Ok(child)
}

/// HTTP GET readiness probes, each at its period; a container without one is ready once running.
async fn probe_all(p: &mut RunningPod) -> bool {
    let mut all = true;
    for c in &mut p.containers {
        if c.child.is_none() {
            c.ready = false;
            all = false;
            continue;
        }
        let Some(probe) = c.spec.readiness_probe.clone() else {
            c.ready = true;
            continue;
        };
        if Instant::now() >= c.next_probe {
            // The probe's period, capped at 2 s so that tests do not wait out a 10 s default.
            let period = probe.period_seconds.unwrap_or(10).max(1) as u64;
            c.next_probe = Instant::now() + Duration::from_secs(period.min(2));
            c.ready = match &probe.http_get {
                Some(h) => {
                    let port = match &h.port {
                        k8s_openapi::apimachinery::pkg::util::intstr::IntOrString::Int(n) => {
                            Some(*n)
                        }
                        k8s_openapi::apimachinery::pkg::util::intstr::IntOrString::String(name) => {
                            c.spec
                                .ports
                                .iter()
                                .flatten()
                                .find(|cp| cp.name.as_deref() == Some(name.as_str()))
                                .map(|cp| cp.container_port)
                        }
                    };
                    match port {
                        Some(port) => {
                            let host = h.host.clone().unwrap_or_else(|| p.ip.clone());
                            http_ok(&host, port as u16, h.path.as_deref().unwrap_or("/")).await
                        }
                        None => false,
                    }
                }
                None => true,
            };
        }
        all &= c.ready;
    }
    all
}

async fn http_ok(host: &str, port: u16, path: &str) -> bool {
    let attempt = async {
        let mut s = tokio::net::TcpStream::connect((host, port)).await.ok()?;
        s.write_all(format!("GET {path} HTTP/1.0\r\nHost: {host}\r\n\r\n").as_bytes())
            .await
            .ok()?;
        let mut buf = [0u8; 32];
        let n = s.read(&mut buf).await.ok()?;
        let line = String::from_utf8_lossy(&buf[..n]).to_string();
        let code: u16 = line.split_whitespace().nth(1)?.parse().ok()?;
        Some((200..400).contains(&code))
    };
    tokio::time::timeout(Duration::from_secs(1), attempt)
        .await
        .ok()
        .flatten()
        .unwrap_or(false)
}

async fn patch_ready(client: &kube::Client, p: &RunningPod, ready: bool) -> kube::Result<()> {
    let now = chrono::Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Secs, true);
    let status = if ready { "True" } else { "False" };
    let statuses: Vec<serde_json::Value> = p
        .containers
        .iter()
        .map(|c| {
            serde_json::json!({
                "name": c.spec.name,
                "image": c.spec.image,
                "ready": c.ready,
                "restartCount": c.restarts,
                "started": c.child.is_some(),
                "state": if c.child.is_some() {
                    serde_json::json!({"running": {"startedAt": now}})
                } else {
                    serde_json::json!({"waiting": {"reason": "CrashLoopBackOff"}})
                },
            })
        })
        .collect();
    let patch = serde_json::json!({
        "status": {
            "conditions": [
                {"type": "Ready", "status": status, "lastTransitionTime": now},
                {"type": "ContainersReady", "status": status, "lastTransitionTime": now},
            ],
            "containerStatuses": statuses,
        }
    });
    Api::<Pod>::namespaced(client.clone(), &p.pod.namespace)
        .patch_status(
            &p.pod.name,
            &PatchParams::default(),
            &Patch::Strategic(&patch),
        )
        .await
        .map(|_| ())
}

/// SIGTERM to every container's process group, SIGKILL after the grace period; then the pod's files go.
async fn stop(mut p: RunningPod) {
    for c in &p.containers {
        if let Some(pid) = c.child.as_ref().and_then(|ch| ch.id()) {
            let _ = killpg(Pid::from_raw(pid as i32), Signal::SIGTERM);
        }
    }
    let deadline = Instant::now() + p.grace;
    for c in &mut p.containers {
        if let Some(child) = &mut c.child {
            let left = deadline.saturating_duration_since(Instant::now());
            if tokio::time::timeout(left, child.wait()).await.is_err() {
                if let Some(pid) = child.id() {
                    let _ = killpg(Pid::from_raw(pid as i32), Signal::SIGKILL);
                }
                let _ = child.wait().await;
            }
        }
    }
    let _ = std::fs::remove_dir_all(&p.pod.dir);
    eprintln!(
        "runner: stopped {}/{} ({})",
        p.pod.namespace, p.pod.name, p.uid
    );
}

/// Stops every pod (the emulator is shutting down).
pub async fn stop_all(runner: &mut Runner) {
    let pods: Vec<RunningPod> = runner.pods.drain().map(|(_, p)| p).collect();
    futures::future::join_all(pods.into_iter().map(stop)).await;
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn expands_earlier_variables_only() {
        let env: BTreeMap<String, String> =
            [("POD_IP".to_string(), "127.1.0.4".to_string())].into();
        assert_eq!(expand("$(POD_IP):9443", &env), "127.1.0.4:9443");
        assert_eq!(
            expand("$(NOPE) $$(POD_IP) $x", &env),
            "$(NOPE) $(POD_IP) $x"
        );
    }

    #[test]
    fn image_repositories_and_node_paths() {
        assert_eq!(
            repository_of("stowage.local/stowage-agent:dev"),
            "stowage.local/stowage-agent"
        );
        assert_eq!(repository_of("localhost:5000/a/b"), "localhost:5000/a/b");
        assert_eq!(repository_of("r/a@sha256:abc"), "r/a");
        let c = Path::new("/c");
        assert_eq!(
            host_path(c, "n1", "/var/lib/kubelet/pods"),
            PathBuf::from("/c/nodes/n1/kubelet/pods")
        );
        assert_eq!(
            host_path(c, "n1", "/var/cache/stowage"),
            PathBuf::from("/c/nodes/n1/root/var/cache/stowage")
        );
        assert_eq!(
            host_path(c, "n1", "/var/lib/kubeletx"),
            PathBuf::from("/c/nodes/n1/root/var/lib/kubeletx")
        );
        let img =
            LocalImage::parse("r/a=/usr/local/bin/a:/x/a,/usr/local/bin/restic:/y/restic").unwrap();
        assert_eq!(img.files.len(), 2);
    }
}

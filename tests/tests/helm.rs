//! The Helm chart, really installed and really run: `helm install` into the local control plane,
//! whose controllers and scheduler create and place the chart's pods, and whose kubelet emulator runs
//! their containers as local processes from the pod specs the chart produced
//! (`tests/src/pod_runner.rs`): the args, env (`fieldRef`s), the Secret, hostPath and projected
//! service-account volumes, the user and capabilities. A wrong flag, mount or RBAC rule in the
//! chart therefore fails here: the install (readiness), the backup, or the restore.

use std::net::SocketAddr;
use std::process::Command;
use std::time::Duration;

use k8s_openapi::api::authorization::v1::{
    ResourceAttributes, SubjectAccessReview, SubjectAccessReviewSpec,
};
use k8s_openapi::api::coordination::v1::Lease;
use k8s_openapi::api::core::v1::Pod;
use kube::Api;
use kube::api::{ListParams, PostParams};
use stowage_api::{Backup, Restore};
use stowage_tests::cluster::{Cluster, fresh_namespace};
use stowage_tests::coordinator::run_to_end;
use stowage_tests::env::TestEnv;

const RUN_TIMEOUT: Duration = Duration::from_secs(150);

/// Runs helm against the shared cluster; panics with its output when it fails.
fn run_helm(cluster: &Cluster, args: &[&str]) -> String {
    let out = Command::new(stowage_tests::helm())
        .args(args)
        .env("KUBECONFIG", cluster.kubeconfig())
        .output()
        .expect("helm");
    assert!(
        out.status.success(),
        "helm {args:?}: {}\n{}\n(pod logs: {}/logs/pods; emulator: {}/logs/kubelet-emu.log)",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr),
        cluster.dir.display(),
        cluster.dir.display()
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// Uninstalls the release when the test ends, passed or not, so that its processes stop.
struct Installed<'a> {
    cluster: &'a Cluster,
    release: String,
    namespace: String,
}

impl Drop for Installed<'_> {
    fn drop(&mut self) {
        let _ = Command::new(stowage_tests::helm())
            .args([
                "uninstall",
                &self.release,
                "--namespace",
                &self.namespace,
                "--wait",
                "--timeout",
                "1m",
            ])
            .env("KUBECONFIG", self.cluster.kubeconfig())
            .output();
    }
}

async fn pods(client: &kube::Client, ns: &str, selector: &str) -> Vec<Pod> {
    Api::<Pod>::namespaced(client.clone(), ns)
        .list(&ListParams::default().labels(selector))
        .await
        .expect("list pods")
        .items
}

fn ready(p: &Pod) -> bool {
    p.status
        .as_ref()
        .and_then(|s| s.conditions.as_ref())
        .is_some_and(|c| c.iter().any(|c| c.type_ == "Ready" && c.status == "True"))
}

fn pod_ip(p: &Pod) -> String {
    p.status
        .as_ref()
        .and_then(|s| s.pod_ip.clone())
        .expect("pod IP")
}

/// Whether the service account may do `verb` on `resource` (optionally a subresource, in `ns`).
async fn can(
    client: &kube::Client,
    sa: (&str, &str),
    verb: &str,
    group: &str,
    resource: &str,
    ns: Option<&str>,
) -> bool {
    let (resource, subresource) = match resource.split_once('/') {
        Some((r, s)) => (r, Some(s.to_string())),
        None => (resource, None),
    };
    let review = SubjectAccessReview {
        spec: SubjectAccessReviewSpec {
            user: Some(format!("system:serviceaccount:{}:{}", sa.0, sa.1)),
            groups: Some(vec![
                "system:serviceaccounts".into(),
                format!("system:serviceaccounts:{}", sa.0),
                "system:authenticated".into(),
            ]),
            resource_attributes: Some(ResourceAttributes {
                verb: Some(verb.into()),
                group: Some(group.into()),
                resource: Some(resource.into()),
                subresource,
                namespace: ns.map(String::from),
                ..Default::default()
            }),
            ..Default::default()
        },
        ..Default::default()
    };
    Api::<SubjectAccessReview>::all(client.clone())
        .create(&PostParams::default(), &review)
        .await
        .expect("SubjectAccessReview")
        .status
        .is_some_and(|s| s.allowed)
}

/// (verb, API group, resource or resource/subresource, namespace) requests.
type Access<'a> = Vec<(&'a str, &'a str, &'a str, Option<&'a str>)>;

/// Asserts that the service account may do every request of `allowed` and none of `denied`.
async fn check_access(
    client: &kube::Client,
    sa: (&str, &str),
    allowed: &Access<'_>,
    denied: &Access<'_>,
) {
    for &(verb, group, resource, ns) in allowed {
        assert!(
            can(client, sa, verb, group, resource, ns).await,
            "{}: {verb} {group}/{resource}",
            sa.1
        );
    }
    for &(verb, group, resource, ns) in denied {
        assert!(
            !can(client, sa, verb, group, resource, ns).await,
            "{} must not {verb} {group}/{resource}",
            sa.1
        );
    }
}

#[tokio::test]
async fn the_chart_installs_a_stowage_that_backs_up_and_restores_in_place() {
    let env = TestEnv::new("helm-app").await;
    let (cluster, client, app) = (env.cluster, env.client.clone(), env.ns.clone());
    // The emulator runs the chart's images from these builds (tests/cluster/up --local-image).
    stowage_tests::binary("stowage-agent");
    stowage_tests::binary("stowage-coordinator");
    let sys = fresh_namespace(&client, "helm-sys").await;
    // The release's objects are named `<sys>-stowage-*`; its coordinator watches only `app`, so it
    // leaves the other tests' namespaces alone.
    let release = sys.clone();
    let fullname = format!("{sys}-stowage");
    let values = stowage_tests::workspace_root().join("tests/cluster/helm-values.yaml");
    let chart = stowage_tests::workspace_root().join("deploy/daemonset");
    let installed = Installed {
        cluster,
        release: release.clone(),
        namespace: sys.clone(),
    };
    run_helm(
        cluster,
        &[
            "install",
            &release,
            &chart.display().to_string(),
            "--namespace",
            &sys,
            "-f",
            &values.display().to_string(),
            "--set",
            &format!("coordinator.watchNamespace={app}"),
            "--wait",
            "--timeout",
            "3m",
        ],
    );

    cluster.wait_daemonset_ready(&sys, &format!("{fullname}-agent"), "3m");
    // One ready agent per node and two ready coordinators, one of them leading.
    let agents = pods(&client, &sys, "app.kubernetes.io/name=stowage-agent").await;
    let mut nodes: Vec<String> = agents
        .iter()
        .filter_map(|p| p.spec.as_ref()?.node_name.clone())
        .collect();
    nodes.sort();
    assert_eq!(nodes, cluster.node_names(), "one agent per node");
    assert!(agents.iter().all(ready), "every agent Ready");
    let coordinators = pods(&client, &sys, "app.kubernetes.io/name=stowage-coordinator").await;
    assert_eq!(coordinators.len(), 2);
    assert!(coordinators.iter().all(ready));
    let lease = Api::<Lease>::namespaced(client.clone(), &sys)
        .get(&format!("{fullname}-coordinator"))
        .await
        .expect("the leader Lease");
    let holder = lease
        .spec
        .and_then(|s| s.holder_identity)
        .expect("a holder");
    assert!(
        coordinators
            .iter()
            .any(|p| p.metadata.name.as_deref() == Some(holder.as_str())),
        "the Lease is held by one of the chart's pods ({holder})"
    );

    // An application pod with data on node-2, backed up to S3 and restored in place.
    let moto = stowage_tests::moto::Moto::start();
    let backend = env.s3_backend(&moto, "helm").await;
    let data = cluster.volume(&app, "db-0", "data", "node-2", &[]);
    std::fs::create_dir_all(data.join("conf")).expect("dir");
    std::fs::write(data.join("conf/settings.ini"), b"answer = 42\n").expect("write");
    std::fs::write(data.join("table.dat"), vec![7u8; 300_000]).expect("write");
    cluster
        .wait_mounted(&client, &app, "db-0", "data", "node-2", "table.dat")
        .await;
    let b = run_to_end::<Backup>(
        &client,
        &app,
        serde_json::json!({"apiVersion": "stowage.dev/v1alpha1", "kind": "Backup",
            "metadata": {"name": "first"}, "spec": {"backend": backend}}),
        RUN_TIMEOUT,
    )
    .await;
    assert_eq!(b["status"]["phase"], "Succeeded", "{b:#}");
    let pod_uid = || async {
        Api::<Pod>::namespaced(client.clone(), &app)
            .get("db-0")
            .await
            .expect("pod")
            .metadata
            .uid
    };
    let uid_before = pod_uid().await;

    std::fs::remove_file(data.join("conf/settings.ini")).expect("delete");
    let r = run_to_end::<Restore>(
        &client,
        &app,
        serde_json::json!({"apiVersion": "stowage.dev/v1alpha1", "kind": "Restore",
            "metadata": {"name": "undo"}, "spec": {
                "backend": backend,
                "source": {"pvc": "data", "snapshot": "latest"},
                "target": {"mode": "Merge"}}}),
        RUN_TIMEOUT,
    )
    .await;
    assert_eq!(r["status"]["phase"], "Succeeded", "{r:#}");
    assert_eq!(r["status"]["restore"]["node"], "node-2", "{r:#}");
    assert_eq!(
        std::fs::read(data.join("conf/settings.ini")).expect("restored"),
        b"answer = 42\n"
    );
    assert_eq!(pod_uid().await, uid_before, "the pod kept running");

    // Each agent serves its own metrics at its pod IP; node-2's counted the backup and the restore.
    for agent in &agents {
        let addr: SocketAddr = format!("{}:9090", pod_ip(agent)).parse().expect("addr");
        let (code, text) = stowage_tests::http_get(addr, "/metrics")
            .await
            .expect("agent metrics");
        assert_eq!(code, 200);
        stowage_tests::promtool_check(&text);
        if agent.spec.as_ref().and_then(|s| s.node_name.as_deref()) == Some("node-2") {
            assert!(
                text.contains("stowage_agent_backups_total{result=\"succeeded\"} 1"),
                "{text}"
            );
            assert!(text.contains("stowage_agent_restores_total{result=\"succeeded\"} 1"));
        }
    }

    // Least privilege, checked by the API server's authorizer.
    let (a, s) = (Some(app.as_str()), Some(sys.as_str()));
    const RBAC: &str = "rbac.authorization.k8s.io";
    let agent_sa = format!("{fullname}-agent");
    let agent: Access = [("get", "", "pods", a), ("create", "", "pods/exec", a)].into();
    let agent_denied: Access = [
        ("get", "", "secrets", a),
        ("get", "", "secrets", s),
        ("list", "", "secrets", None),
        ("list", "", "pods", a),
        ("create", "", "pods", a),
        ("delete", "", "pods", a),
        ("get", "stowage.dev", "backups", a),
        ("patch", "", "nodes", None),
        ("create", RBAC, "clusterrolebindings", None),
        ("*", "*", "*", None),
    ]
    .into();
    check_access(&client, (&sys, &agent_sa), &agent, &agent_denied).await;
    let coord_sa = format!("{fullname}-coordinator");
    let coordinator: Access = [
        ("list", "", "secrets", a),
        ("watch", "stowage.dev", "schedules", a),
        ("create", "stowage.dev", "backups", a),
        ("patch", "stowage.dev", "backups/status", a),
        ("patch", "stowage.dev", "restores/status", a),
        ("create", "", "pods", a),
        ("delete", "", "pods", a),
        ("list", "", "persistentvolumeclaims", a),
        ("create", "events.k8s.io", "events", a),
        ("patch", "coordination.k8s.io", "leases", s),
    ]
    .into();
    let coordinator_denied: Access = [
        ("create", "", "pods/exec", a),
        ("get", "", "pods/exec", a),
        ("update", "stowage.dev", "schedules", a),
        ("delete", "stowage.dev", "schedules", a),
        ("create", "stowage.dev", "restores", a),
        ("create", "", "secrets", a),
        ("get", "", "nodes", None),
        ("create", RBAC, "clusterrolebindings", None),
        ("escalate", RBAC, "clusterroles", None),
        ("*", "*", "*", None),
    ]
    .into();
    check_access(
        &client,
        (&sys, &coord_sa),
        &coordinator,
        &coordinator_denied,
    )
    .await;

    // Uninstalling (helm uninstall --wait) stops the processes the chart's pods stood for.
    drop(installed);
    let marker = format!("--client-identity={fullname}-coordinator.{sys}.svc");
    stowage_tests::wait_until(
        "the chart's agents to exit",
        Duration::from_secs(30),
        || {
            !stowage_tests::procs::cmdlines()
                .iter()
                .any(|c| c.contains(&marker))
        },
    )
    .await;
}

/// `rbac.scope: namespaced`, rendered by Helm and applied: each ServiceAccount may do its work in
/// the two watched namespaces and nothing of it elsewhere (another tenant's namespace,
/// `kube-system`, cluster-wide), which the API server's authorizer confirms. The coordinator's
/// Deployment is rendered to watch exactly those namespaces.
#[tokio::test]
async fn the_namespaced_rbac_mode_grants_nothing_outside_the_watched_namespaces() {
    let TestEnv {
        cluster,
        client,
        ns: sys,
    } = TestEnv::bare("nsrbac-sys").await;
    let one = fresh_namespace(&client, "nsrbac-one").await;
    let two = fresh_namespace(&client, "nsrbac-two").await;
    let other = fresh_namespace(&client, "nsrbac-other").await;
    let chart = stowage_tests::workspace_root().join("deploy/daemonset");
    let render = |only: &str| {
        run_helm(
            cluster,
            &[
                "template",
                &sys,
                &chart.display().to_string(),
                "--namespace",
                &sys,
                "--set",
                "rbac.scope=namespaced",
                "--set",
                &format!("coordinator.watchNamespaces={{{one},{two}}}"),
                "--show-only",
                only,
            ],
        )
    };
    let deployment = render("templates/coordinator-deployment.yaml");
    assert!(
        deployment.contains(&format!("--namespace={one},{two}")),
        "{deployment}"
    );
    let rbac = render("templates/rbac.yaml");
    let file = tempfile::NamedTempFile::new().expect("tmp");
    std::fs::write(file.path(), &rbac).expect("write");
    let apply = |verb: &str| {
        Command::new(cluster.kubectl())
            .env("KUBECONFIG", cluster.kubeconfig())
            .args([verb, "-f"])
            .arg(file.path())
            .output()
            .expect("kubectl")
    };
    let out = apply("apply");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let fullname = format!("{sys}-stowage");
    let (o, t, x, s) = (
        Some(one.as_str()),
        Some(two.as_str()),
        Some(other.as_str()),
        Some(sys.as_str()),
    );
    let ks = Some("kube-system");
    let agent: Access = [
        ("get", "", "pods", o),
        ("create", "", "pods/exec", o),
        ("get", "", "pods/exec", t),
    ]
    .into();
    let agent_denied: Access = [
        ("create", "", "pods/exec", x),
        ("create", "", "pods/exec", ks),
        ("get", "", "pods/exec", ks),
        ("get", "", "pods", ks),
        ("create", "", "pods/exec", None),
        ("get", "", "secrets", o),
    ]
    .into();
    check_access(
        &client,
        (&sys, &format!("{fullname}-agent")),
        &agent,
        &agent_denied,
    )
    .await;
    let coordinator: Access = [
        ("get", "", "secrets", o),
        ("list", "", "secrets", t),
        ("create", "", "pods", t),
        ("watch", "stowage.dev", "backups", o),
        ("patch", "stowage.dev", "backups/status", t),
        ("create", "events.k8s.io", "events", o),
        ("list", "", "pods", s),
        ("patch", "coordination.k8s.io", "leases", s),
    ]
    .into();
    let coordinator_denied: Access = [
        ("get", "", "secrets", x),
        ("get", "", "secrets", ks),
        ("get", "", "secrets", s),
        ("list", "", "secrets", None),
        ("create", "", "pods", x),
        ("create", "", "pods", ks),
        ("create", "", "pods", s),
        ("list", "", "pods", None),
        ("watch", "stowage.dev", "backups", x),
        ("create", "", "pods/exec", o),
    ]
    .into();
    check_access(
        &client,
        (&sys, &format!("{fullname}-coordinator")),
        &coordinator,
        &coordinator_denied,
    )
    .await;
    // The ClusterRoles are cluster-scoped: they would outlive the test's namespaces.
    let _ = apply("delete");
}

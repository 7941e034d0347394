//! A hostile tenant against the real coordinator, agents and restic: runs and Schedules that name
//! Secrets and endpoints of the tenant's choosing (docs/security.md, "Repository credentials").
//!
//! Length: one suite, one file; each test is an attack through the real path.

use std::io::{Read, Write};
use std::net::TcpListener;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use stowage_api::{Check, Schedule};
use stowage_tests::cluster::fresh_namespace;
use stowage_tests::coordinator::{
    Coordinator, CoordinatorOptions, condition, create, run_to_end, secret, secret_with_labels,
    wait_event, wait_json,
};
use stowage_tests::env::TestEnv;

const RUN_TIMEOUT: Duration = Duration::from_secs(90);
/// Values of Secrets the tenant may not read; none may ever reach the listener.
const STOLEN_USER: &str = "db-admin-7f3a";
const STOLEN_PASSWORD: &str = "hunter2-never-leaves";

/// A tenant's HTTP listener on loopback: it records every byte it receives and answers 404, as an
/// empty REST server would.
struct Listener {
    url: String,
    received: Arc<Mutex<Vec<Vec<u8>>>>,
}

impl Listener {
    fn start() -> Listener {
        let l = TcpListener::bind("127.0.0.1:0").expect("bind");
        let url = format!("http://{}/", l.local_addr().expect("addr"));
        let received = Arc::new(Mutex::new(Vec::new()));
        let seen = received.clone();
        // The thread lives until the test process ends; it only ever answers on loopback.
        std::thread::spawn(move || {
            for conn in l.incoming() {
                let Ok(mut conn) = conn else { continue };
                let _ = conn.set_read_timeout(Some(Duration::from_secs(2)));
                let mut buf = vec![0u8; 64 << 10];
                let n = conn.read(&mut buf).unwrap_or(0);
                buf.truncate(n);
                seen.lock().expect("lock").push(buf);
                let _ = conn.write_all(
                    b"HTTP/1.1 404 Not Found\r\nContent-Length: 0\r\nConnection: close\r\n\r\n",
                );
            }
        });
        Listener { url, received }
    }

    fn requests(&self) -> Vec<String> {
        self.received
            .lock()
            .expect("lock")
            .iter()
            .map(|b| String::from_utf8_lossy(b).into_owned())
            .collect()
    }

    /// Whether any request carried one of `values` (in clear, or as HTTP basic auth).
    fn got_any(&self, values: &[&str]) -> bool {
        use base64::Engine;
        self.requests().iter().any(|r| {
            values.iter().any(|v| r.contains(v))
                || r.lines()
                    .filter_map(|l| l.strip_prefix("Authorization: Basic "))
                    .filter_map(|b| {
                        base64::engine::general_purpose::STANDARD
                            .decode(b.trim())
                            .ok()
                    })
                    .any(|d| {
                        let d = String::from_utf8_lossy(&d);
                        values.iter().any(|v| d.contains(v))
                    })
        })
    }
}

fn rest_backend(url: &str, secret: &str) -> serde_json::Value {
    serde_json::json!({
        "repoPasswordSecretRef": {"name": secret, "key": "password"},
        "rest": {"url": url,
                 "usernameSecretRef": {"name": secret, "key": "user"},
                 "passwordSecretRef": {"name": secret, "key": "password"}}})
}

fn check(name: &str, backend: serde_json::Value) -> serde_json::Value {
    serde_json::json!({"apiVersion": "stowage.dev/v1alpha1", "kind": "Check",
        "metadata": {"name": name}, "spec": {"backend": backend}})
}

fn assert_failed(r: &serde_json::Value, reason: &str, needles: &[&str]) {
    assert_eq!(r["status"]["phase"], "Failed", "{r:#}");
    let c = condition(r, "Succeeded").expect("condition");
    assert_eq!(c["reason"], reason, "{c}");
    let m = c["message"].as_str().unwrap_or_default();
    for n in needles {
        assert!(m.contains(n), "{n:?} not in {m:?}");
    }
}

/// A user who may create Checks and Schedules, not read Secrets, names the namespace's database
/// Secret as the credentials of a REST repository on a listener of their own. Nothing reaches the
/// listener; the Check fails and the Schedule is not Ready, each naming the field and the Secret.
/// The same listener, named with a Secret the namespace's owner did label as credentials, does get
/// them (the path is real); with an endpoint allow-list that does not list it, it gets nothing and
/// no Secret is read at all (a Secret that does not exist is not even reported missing).
#[tokio::test]
async fn runs_and_schedules_cannot_send_unlabelled_secrets_to_a_tenant_endpoint() {
    let TestEnv {
        cluster,
        client,
        ns,
    } = TestEnv::bare("tenant-secrets").await;
    let listener = Listener::start();
    // The namespace's database credentials: not labelled as repository credentials.
    secret_with_labels(
        &client,
        &ns,
        "db-credentials",
        &[("user", STOLEN_USER), ("password", STOLEN_PASSWORD)],
        &[],
    )
    .await;
    // Repository looks every second, so the inspector tries the Schedule's repository too.
    let mut opts = CoordinatorOptions::new(&ns);
    opts.extra_args = vec!["--figures-interval".into(), "1s".into()];
    let coordinator = Coordinator::start(cluster, opts).await;

    let r = run_to_end::<Check>(
        &client,
        &ns,
        check("steal", rest_backend(&listener.url, "db-credentials")),
        RUN_TIMEOUT,
    )
    .await;
    assert_failed(
        &r,
        "SecretNotLabelled",
        &[
            "spec.backend.repoPasswordSecretRef",
            &format!("Secret {ns}/db-credentials"),
            "kubectl label secret",
        ],
    );
    wait_event(
        &client,
        &ns,
        "steal",
        "SecretNotLabelled",
        "db-credentials",
        Duration::from_secs(10),
    )
    .await;

    let _: Schedule = create(
        &client,
        &ns,
        serde_json::json!({"apiVersion": "stowage.dev/v1alpha1", "kind": "Schedule",
            "metadata": {"name": "steal-nightly"},
            "spec": {"backend": rest_backend(&listener.url, "db-credentials"),
                     "check": {"schedule": "* * * * *"}}}),
    )
    .await;
    let s = wait_json::<Schedule>(
        &client,
        &ns,
        "steal-nightly",
        Duration::from_secs(30),
        "Ready=False",
        |v| condition(v, "Ready").is_some_and(|c| c["status"] == "False"),
    )
    .await;
    let ready = condition(&s, "Ready").expect("Ready");
    assert_eq!(ready["reason"], "SecretNotLabelled", "{ready}");
    assert!(
        ready["message"]
            .as_str()
            .is_some_and(|m| m.contains("db-credentials")),
        "{ready}"
    );
    wait_event(
        &client,
        &ns,
        "steal-nightly",
        "SecretNotLabelled",
        "spec.backend.repoPasswordSecretRef",
        Duration::from_secs(10),
    )
    .await;
    // The inspector's look at the Schedule's repository failed on the Secret, not at the listener.
    stowage_tests::wait_until(
        "the inspector's look at steal-nightly",
        Duration::from_secs(20),
        || {
            std::fs::read_to_string(&coordinator.log).is_ok_and(|l| {
                l.lines().any(|l| {
                    l.contains("steal-nightly")
                        && l.contains("could not read the repository's figures")
                        && l.contains("lacks the label")
                })
            })
        },
    )
    .await;
    assert!(
        listener.requests().is_empty(),
        "the tenant's listener was contacted: {:?}",
        listener.requests()
    );

    // The owner labels a Secret as repository credentials: the path to the endpoint is real, and
    // restic sends them (this is what the label must gate).
    secret(
        &client,
        &ns,
        "rest-credentials",
        &[("user", "backup-user"), ("password", "labelled-secret")],
    )
    .await;
    let r = run_to_end::<Check>(
        &client,
        &ns,
        check("labelled", rest_backend(&listener.url, "rest-credentials")),
        RUN_TIMEOUT,
    )
    .await;
    assert_eq!(
        r["status"]["phase"], "Failed",
        "an empty listener is no repository: {r:#}"
    );
    assert!(
        listener.got_any(&["backup-user"]),
        "restic did not send the labelled credentials: {:?}",
        listener.requests()
    );
    assert!(!listener.got_any(&[STOLEN_USER, STOLEN_PASSWORD]));
    drop(coordinator);

    // An administrator's allow-list that does not list the listener: nothing is sent, and no Secret
    // is read (the reference to a Secret that does not exist is not what the run reports).
    let before = listener.requests().len();
    let mut opts = CoordinatorOptions::new(&ns);
    opts.extra_args = vec![
        "--allowed-endpoint".into(),
        "rest.backup.example:8000,*.s3.example".into(),
    ];
    let _fenced = Coordinator::start(cluster, opts).await;
    for (name, secret) in [
        ("fenced", "rest-credentials"),
        ("fenced-missing", "no-such-secret"),
    ] {
        let r = run_to_end::<Check>(
            &client,
            &ns,
            check(name, rest_backend(&listener.url, secret)),
            RUN_TIMEOUT,
        )
        .await;
        assert_failed(
            &r,
            "EndpointNotAllowed",
            &[
                "spec.backend.rest.url",
                "rest.backup.example:8000",
                "no Secret was read",
            ],
        );
    }
    assert_eq!(
        listener.requests().len(),
        before,
        "{:?}",
        listener.requests()
    );
}

/// A tenant who can create pods learns a Backup's uid and creates a pod under the name its mount
/// holder will have (a pod of its own making, with whatever it likes mounted). The coordinator does
/// not adopt a pod it did not make: the item fails, saying so.
#[tokio::test]
async fn a_pod_named_like_a_mount_holder_is_not_adopted() {
    use k8s_openapi::api::core::v1::Pod;
    use stowage_api::Backup;
    let TestEnv {
        cluster,
        client,
        ns,
    } = TestEnv::bare("tenant-holder").await;
    secret(&client, &ns, "backup-repo", &[("password", "pw")]).await;
    let dir = cluster.volume(&ns, "unused", "idle", "node-1", &["--no-pod"]);
    std::fs::write(dir.join("data"), b"x").expect("write");
    let repo = cluster.dir.join("repos").join(&ns);
    let backup: Backup = create(
        &client,
        &ns,
        serde_json::json!({"apiVersion": "stowage.dev/v1alpha1", "kind": "Backup",
            "metadata": {"name": "nightly"},
            "spec": {"backend": stowage_tests::coordinator::local_backend(&repo)}}),
    )
    .await;
    let uid = backup.metadata.uid.clone().expect("uid");
    let name = stowage_coordinator::mount_holder::pod_name(&uid, "idle");
    let _: Pod = create(
        &client,
        &ns,
        serde_json::json!({"apiVersion": "v1", "kind": "Pod", "metadata": {"name": name},
            "spec": {"nodeName": "node-1", "containers": [{"name": "c", "image": "busybox"}]}}),
    )
    .await;
    let _c = Coordinator::start(cluster, CoordinatorOptions::new(&ns)).await;
    let b = wait_json::<Backup>(
        &client,
        &ns,
        "nightly",
        RUN_TIMEOUT,
        "finished",
        stowage_tests::coordinator::finished,
    )
    .await;
    assert_eq!(b["status"]["phase"], "Failed", "{b:#}");
    let error = b["status"]["items"][0]["error"]
        .as_str()
        .unwrap_or_default();
    assert!(error.contains("is not this run's mount holder"), "{error}");
}

/// A user who may create PreBackupPods, not pods, asks for a privileged pod with the node's root
/// filesystem mounted. The coordinator would create it with its own rights: it refuses, naming the
/// field, and no pod is created.
#[tokio::test]
async fn a_prebackup_pod_cannot_borrow_the_coordinators_right_to_create_privileged_pods() {
    use k8s_openapi::api::core::v1::Pod;
    use stowage_api::{Backup, PreBackupPod};
    let TestEnv {
        cluster,
        client,
        ns,
    } = TestEnv::bare("tenant-pbp").await;
    secret(&client, &ns, "backup-repo", &[("password", "pw")]).await;
    let _: PreBackupPod = create(
        &client,
        &ns,
        serde_json::json!({"apiVersion": "stowage.dev/v1alpha1", "kind": "PreBackupPod",
            "metadata": {"name": "rootfs"},
            "spec": {"backupCommand": "tar c /host/etc",
                     "pod": {"spec": {
                        "containers": [{"name": "c", "image": "busybox",
                            "securityContext": {"privileged": true},
                            "volumeMounts": [{"name": "host", "mountPath": "/host"}]}],
                        "volumes": [{"name": "host", "hostPath": {"path": "/"}}]}}}}),
    )
    .await;
    let repo = cluster.dir.join("repos").join(&ns);
    let _c = Coordinator::start(cluster, CoordinatorOptions::new(&ns)).await;
    let b = run_to_end::<Backup>(
        &client,
        &ns,
        serde_json::json!({"apiVersion": "stowage.dev/v1alpha1", "kind": "Backup",
            "metadata": {"name": "nightly"},
            "spec": {"backend": stowage_tests::coordinator::local_backend(&repo)}}),
        RUN_TIMEOUT,
    )
    .await;
    assert_eq!(b["status"]["phase"], "Failed", "{b:#}");
    let error = b["status"]["items"][0]["error"]
        .as_str()
        .unwrap_or_default();
    assert!(
        error.contains("spec.pod.spec.volumes[0].hostPath")
            && error.contains("--allow-privileged-prebackup-pods"),
        "{error}"
    );
    let pods = kube::Api::<Pod>::namespaced(client.clone(), &ns)
        .list(&kube::api::ListParams::default())
        .await
        .expect("pods");
    assert!(pods.items.is_empty(), "no pod was created");
}

/// The most items a Backup may have, each with the longest names a tenant can give and long
/// errors, written by the run's status writer to the real API server: without the status budget
/// the object would be several MiB and refused (etcd stores at most 1.5 MiB); with it, the write
/// lands and every item is there with its phase and snapshot.
#[tokio::test]
async fn a_run_of_the_most_items_with_the_longest_names_is_stored() {
    use stowage_api::{Backup, CommandItem, ItemStatus, RunPhase, RunStatus};
    use stowage_coordinator::run::backup::MAX_RUN_ITEMS;
    use stowage_coordinator::run::status::StatusWriter;
    let TestEnv {
        cluster: _,
        client,
        ns,
    } = TestEnv::bare("bigstatus").await;
    let run: Backup = create(
        &client,
        &ns,
        serde_json::json!({"apiVersion": "stowage.dev/v1alpha1", "kind": "Backup",
            "metadata": {"name": "huge"}, "spec": {}}),
    )
    .await;
    let long = |c: char, n: usize| std::iter::repeat_n(c, n).collect::<String>();
    let (handle, writer) =
        StatusWriter::<Backup>::spawn(client.clone(), &run, RunStatus::default());
    for i in 0..MAX_RUN_ITEMS {
        handle.item(ItemStatus {
            namespace: ns.clone(),
            pvc: if i % 2 == 0 {
                format!("{}{i:04}", long('p', 249))
            } else {
                String::new()
            },
            pod: Some(long('o', 253)),
            node: Some(long('d', 253)),
            phase: if i % 3 == 0 {
                RunPhase::Failed
            } else {
                RunPhase::Succeeded
            },
            snapshot_id: Some(format!("{i:08x}")),
            error: Some(long('e', 10_000)),
            message: Some(long('m', 2000)),
            command: (i % 2 == 1).then(|| CommandItem {
                owner: format!("StatefulSet/{}{i:04}", long('w', 249)),
                container: long('c', 63),
                command: long('x', 256),
                ..Default::default()
            }),
            ..Default::default()
        });
    }
    handle.flush().await.expect("the status fits and is stored");
    drop(handle);
    let _ = writer.await;
    let stored = kube::Api::<Backup>::namespaced(client.clone(), &ns)
        .get("huge")
        .await
        .expect("get");
    let status = stored.status.expect("status");
    assert_eq!(status.items.len(), MAX_RUN_ITEMS);
    assert!(status.items.iter().all(|i| i.snapshot_id.is_some()));
    assert_eq!(
        status
            .items
            .iter()
            .filter(|i| i.phase == RunPhase::Failed)
            .count(),
        MAX_RUN_ITEMS.div_ceil(3)
    );
    assert!(
        status
            .summary
            .as_deref()
            .is_some_and(|s| s.ends_with("(item details shortened to fit the status)")),
        "{:?}",
        status.summary
    );
}

/// Two namespaces' Schedules at one repository location, under one coordinator watching both:
/// each gets `SharedRepository=True` naming the other namespace, and a Warning Event. A third
/// namespace with a repository of its own gets no such condition, and once the second Schedule
/// moves to its own location, its condition goes away.
#[tokio::test]
async fn schedules_of_two_namespaces_at_one_repository_are_warned() {
    let TestEnv {
        cluster,
        client,
        ns: a,
    } = TestEnv::bare("shared-a").await;
    let b = fresh_namespace(&client, "shared-b").await;
    let c = fresh_namespace(&client, "shared-c").await;
    let shared = cluster.dir.join("repos").join(format!("{a}-shared"));
    let own = cluster.dir.join("repos").join(format!("{c}-own"));
    for ns in [&a, &b, &c] {
        secret(&client, ns, "backup-repo", &[("password", "shared-secret")]).await;
    }
    let mut opts = CoordinatorOptions::new(&a);
    opts.extra_args = vec![
        "--namespace".into(),
        b.clone(),
        "--namespace".into(),
        c.clone(),
    ];
    let _coordinator = Coordinator::start(cluster, opts).await;
    let schedule = |repo: &std::path::Path| {
        serde_json::json!({"apiVersion": "stowage.dev/v1alpha1", "kind": "Schedule",
            "metadata": {"name": "nightly"},
            "spec": {"backend": stowage_tests::coordinator::local_backend(repo),
                     "backup": {"schedule": "@daily-random"}}})
    };
    for (ns, repo) in [(&a, &shared), (&b, &shared), (&c, &own)] {
        let _: Schedule = create(&client, ns, schedule(repo)).await;
    }
    for (ns, other) in [(&a, &b), (&b, &a)] {
        let v = wait_json::<Schedule>(
            &client,
            ns,
            "nightly",
            Duration::from_secs(60),
            "SharedRepository",
            |v| condition(v, "SharedRepository").is_some_and(|c| c["status"] == "True"),
        )
        .await;
        let message = condition(&v, "SharedRepository").expect("condition")["message"]
            .as_str()
            .unwrap_or_default()
            .to_string();
        assert!(message.contains(other.as_str()), "{message}");
        wait_event(
            &client,
            ns,
            "nightly",
            "SharedRepository",
            other,
            Duration::from_secs(20),
        )
        .await;
    }
    let own_schedule = wait_json::<Schedule>(
        &client,
        &c,
        "nightly",
        Duration::from_secs(30),
        "Ready",
        |v| condition(v, "Ready").is_some(),
    )
    .await;
    assert!(condition(&own_schedule, "SharedRepository").is_none());
    // b moves to a repository of its own (a's warning goes at a's next periodic reconcile).
    let b_own = cluster.dir.join("repos").join(format!("{b}-own"));
    kube::Api::<Schedule>::namespaced(client.clone(), &b)
        .patch(
            "nightly",
            &kube::api::PatchParams::default(),
            &kube::api::Patch::Merge(serde_json::json!({"spec": {"backend":
                stowage_tests::coordinator::local_backend(&b_own)}})),
        )
        .await
        .expect("move b");
    wait_json::<Schedule>(
        &client,
        &b,
        "nightly",
        Duration::from_secs(30),
        "b's warning gone",
        |v| condition(v, "SharedRepository").is_none() && condition(v, "Ready").is_some(),
    )
    .await;
}

/// A tarpit: accepts connections and never answers, holding each open.
struct Tarpit {
    url: String,
    connections: Arc<Mutex<Vec<std::net::TcpStream>>>,
}

impl Tarpit {
    fn start() -> Tarpit {
        let l = TcpListener::bind("127.0.0.1:0").expect("bind");
        let url = format!("http://{}/", l.local_addr().expect("addr"));
        let connections = Arc::new(Mutex::new(Vec::new()));
        let held = connections.clone();
        // Lives until the test process ends; it only ever listens on loopback.
        std::thread::spawn(move || {
            for conn in l.incoming().flatten() {
                held.lock().expect("lock").push(conn);
            }
        });
        Tarpit { url, connections }
    }

    fn connected(&self) -> bool {
        !self.connections.lock().expect("lock").is_empty()
    }
}

/// A tenant's Schedule whose repository endpoint never answers holds its own look, not the
/// inspector: another Schedule's figures, due after the tarpit's look started, arrive within
/// seconds (looks run independently; each is bounded in total, not per agent).
#[tokio::test]
async fn a_tarpit_repository_does_not_hold_other_schedules_looks() {
    let TestEnv {
        cluster,
        client,
        ns,
    } = TestEnv::bare("tarpit").await;
    let tarpit = Tarpit::start();
    secret(
        &client,
        &ns,
        "tarpit",
        &[("user", "u"), ("password", "tarpit-password")],
    )
    .await;
    secret(
        &client,
        &ns,
        "backup-repo",
        &[("password", "healthy-password")],
    )
    .await;
    let repo = cluster.dir.join("repos").join(format!("{ns}-healthy"));
    stowage_tests::restic::init(&repo, "healthy-password");
    let mut opts = CoordinatorOptions::new(&ns);
    opts.extra_args = vec!["--figures-interval".into(), "1s".into()];
    let _coordinator = Coordinator::start(cluster, opts).await;
    let schedule = |name: &str, backend: serde_json::Value| {
        serde_json::json!({"apiVersion": "stowage.dev/v1alpha1", "kind": "Schedule",
            "metadata": {"name": name},
            "spec": {"backend": backend, "backup": {"schedule": "@daily-random"}}})
    };
    let _: Schedule = create(
        &client,
        &ns,
        schedule("tarpit", rest_backend(&tarpit.url, "tarpit")),
    )
    .await;
    stowage_tests::wait_until(
        "the tarpit's look to start",
        Duration::from_secs(30),
        || tarpit.connected(),
    )
    .await;
    let healthy = stowage_tests::coordinator::local_backend(&repo);
    let _: Schedule = create(&client, &ns, schedule("healthy", healthy)).await;
    let v = wait_json::<Schedule>(
        &client,
        &ns,
        "healthy",
        Duration::from_secs(30),
        "the healthy Schedule's figures",
        |v| v["status"]["repository"]["snapshots"].is_number(),
    )
    .await;
    assert_eq!(v["status"]["repository"]["snapshots"], 0, "{v:#}");
    assert!(tarpit.connected());
}

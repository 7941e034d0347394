//! Stowage's CRDs, as the chart ships them, are accepted by a real kube-apiserver, and objects shaped
//! like the documented examples validate against their schemas (and malformed ones do not).

use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use kube::api::{Api, ApiResource, DynamicObject, GroupVersionKind, PostParams};
use stowage_tests::cluster::{Cluster, apply_crds, fresh_namespace};

fn object(yaml: &str) -> DynamicObject {
    serde_yaml::from_str(yaml).expect("yaml")
}

#[tokio::test]
async fn chart_crds_are_accepted_and_validate_objects() {
    let cluster = Cluster::shared();
    let client = cluster.client().await;
    let dir = stowage_tests::workspace_root().join("deploy/daemonset/crds");
    let mut names = apply_crds(&client, &dir).await;
    names.sort();
    assert_eq!(
        names,
        [
            "backups.stowage.dev",
            "checks.stowage.dev",
            "prebackuppods.stowage.dev",
            "prunes.stowage.dev",
            "restores.stowage.dev",
            "schedules.stowage.dev",
            "verifies.stowage.dev"
        ]
    );
    let crds: Api<CustomResourceDefinition> = Api::all(client.clone());
    for name in &names {
        let crd = crds.get(name).await.expect("crd");
        let v = &crd.spec.versions[0];
        // A PreBackupPod is a template: it has nothing to report.
        assert!(
            name == "prebackuppods.stowage.dev"
                || v.subresources
                    .as_ref()
                    .and_then(|s| s.status.as_ref())
                    .is_some(),
            "{name} has a status subresource"
        );
        assert!(
            v.additional_printer_columns
                .as_ref()
                .is_some_and(|c| !c.is_empty()),
            "{name} has printer columns"
        );
    }

    let ns = fresh_namespace(&client, "crd").await;
    let gvk =
        |kind: &str| ApiResource::from_gvk(&GroupVersionKind::gvk("stowage.dev", "v1alpha1", kind));
    let schedules: Api<DynamicObject> = Api::namespaced_with(client.clone(), &ns, &gvk("Schedule"));
    let example = stowage_tests::workspace_root().join("deploy/daemonset/examples/schedule.yaml");
    let nightly = object(&std::fs::read_to_string(example).expect("example"));
    schedules
        .create(&PostParams::default(), &nightly)
        .await
        .expect("the documented Schedule is accepted");

    let backups: Api<DynamicObject> = Api::namespaced_with(client.clone(), &ns, &gvk("Backup"));
    let manual = object(
        "apiVersion: stowage.dev/v1alpha1\nkind: Backup\nmetadata: {name: manual-1}\nspec: {scheduleRef: {name: nightly}}\n",
    );
    backups
        .create(&PostParams::default(), &manual)
        .await
        .expect("a Backup run referring to the Schedule");

    // The documented PreBackupPod is accepted; one without a command is not.
    let helpers: Api<DynamicObject> =
        Api::namespaced_with(client.clone(), &ns, &gvk("PreBackupPod"));
    let helper = object(
        "apiVersion: stowage.dev/v1alpha1\nkind: PreBackupPod\nmetadata: {name: mysqldump}\nspec:\n  backupCommand: mysqldump -h mysql -u root --all-databases\n  fileExtension: .sql\n  pod:\n    spec: {containers: [{name: dump, image: mysql:8, command: [sleep, infinity]}]}\n",
    );
    helpers
        .create(&PostParams::default(), &helper)
        .await
        .expect("the documented PreBackupPod is accepted");
    let no_command = object(
        "apiVersion: stowage.dev/v1alpha1\nkind: PreBackupPod\nmetadata: {name: nocommand}\nspec:\n  pod: {spec: {containers: [{name: c, image: i}]}}\n",
    );
    let err = helpers
        .create(&PostParams::default(), &no_command)
        .await
        .expect_err("a PreBackupPod without a command");
    assert!(err.to_string().contains("backupCommand"), "{err}");

    // The schema is enforced: a wrong type is refused by the apiserver, naming the field.
    let bad = object(
        "apiVersion: stowage.dev/v1alpha1\nkind: Schedule\nmetadata: {name: bad}\nspec:\n  backend: {repoPasswordSecretRef: {name: r, key: k}}\n  paused: maybe\n",
    );
    let err = schedules
        .create(&PostParams::default(), &bad)
        .await
        .expect_err("invalid type");
    assert!(err.to_string().contains("spec.paused"), "{err}");
    let missing = object(
        "apiVersion: stowage.dev/v1alpha1\nkind: Schedule\nmetadata: {name: nobackend}\nspec: {paused: true}\n",
    );
    let err = schedules
        .create(&PostParams::default(), &missing)
        .await
        .expect_err("backend is required");
    assert!(err.to_string().contains("spec.backend"), "{err}");
}

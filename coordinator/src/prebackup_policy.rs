//! What a PreBackupPod's template may ask for. The coordinator creates its pod with the
//! coordinator's own right to create pods, so a user allowed to create PreBackupPods, but not pods,
//! would otherwise borrow that right: a privileged pod, the node's filesystem through hostPath, the
//! host's namespaces, or the token of any ServiceAccount of the namespace. Unless the administrator
//! allows it (`--allow-privileged-prebackup-pods`), a template asking for any of these is refused,
//! naming the field, and no pod is created.

use k8s_openapi::api::core::v1::{Container, PodSpec, SecurityContext};

/// Linux capabilities a PreBackupPod's container may add without the administrator's leave: those
/// Pod Security's `baseline` level allows.
const BASELINE_CAPABILITIES: &[&str] = &[
    "AUDIT_WRITE",
    "CHOWN",
    "DAC_OVERRIDE",
    "FOWNER",
    "FSETID",
    "KILL",
    "MKNOD",
    "NET_BIND_SERVICE",
    "SETFCAP",
    "SETGID",
    "SETPCAP",
    "SETUID",
    "SYS_CHROOT",
];

/// The first field of `spec` (a PreBackupPod's `spec.pod.spec`) that needs the administrator's
/// leave, as a sentence naming it; `None` when the template asks for nothing of the kind.
pub fn refusal(spec: &PodSpec) -> Option<String> {
    let at = "spec.pod.spec";
    let why = |field: String, what: &str| {
        Some(format!(
            "{field}: {what}; a PreBackupPod's pod is created with the coordinator's rights, so this needs the administrator's leave (--allow-privileged-prebackup-pods)"
        ))
    };
    for (flag, name) in [
        (spec.host_network, "hostNetwork"),
        (spec.host_pid, "hostPID"),
        (spec.host_ipc, "hostIPC"),
    ] {
        if flag == Some(true) {
            return why(format!("{at}.{name}"), "shares a namespace of the node");
        }
    }
    // `serviceAccount` is the deprecated alias the API server still honours.
    for (field, value) in [
        ("serviceAccountName", spec.service_account_name.as_deref()),
        ("serviceAccount", spec.service_account.as_deref()),
    ] {
        if let Some(sa) = value.filter(|s| !s.is_empty() && *s != "default") {
            return why(
                format!("{at}.{field}"),
                &format!("runs as ServiceAccount {sa:?} and would receive its token"),
            );
        }
    }
    for (i, v) in spec.volumes.iter().flatten().enumerate() {
        if v.host_path.is_some() {
            return why(
                format!("{at}.volumes[{i}].hostPath"),
                "mounts a directory of the node",
            );
        }
    }
    let containers = [
        ("containers", spec.containers.as_slice()),
        (
            "initContainers",
            spec.init_containers.as_deref().unwrap_or_default(),
        ),
    ];
    for (list, items) in containers {
        for (i, c) in items.iter().enumerate() {
            if let Some(r) = container(c, &format!("{at}.{list}[{i}]")) {
                return why(r.0, &r.1);
            }
        }
    }
    None
}

fn container(c: &Container, at: &str) -> Option<(String, String)> {
    let sc: &SecurityContext = c.security_context.as_ref()?;
    if sc.privileged == Some(true) {
        return Some((
            format!("{at}.securityContext.privileged"),
            "is a privileged container".into(),
        ));
    }
    let added = sc
        .capabilities
        .as_ref()
        .and_then(|caps| caps.add.as_ref())
        .into_iter()
        .flatten()
        .find(|cap| {
            let name = cap.trim_start_matches("CAP_");
            !BASELINE_CAPABILITIES.contains(&name)
        });
    if let Some(cap) = added {
        return Some((
            format!("{at}.securityContext.capabilities.add"),
            format!("adds the capability {cap}"),
        ));
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec(json: serde_json::Value) -> PodSpec {
        serde_json::from_value(json).unwrap()
    }

    #[test]
    fn a_plain_template_passes() {
        let s = spec(serde_json::json!({
            "containers": [{"name": "dump", "image": "mysql",
                "securityContext": {"capabilities": {"add": ["CHOWN"], "drop": ["ALL"]}}}]
        }));
        assert_eq!(refusal(&s), None);
        let default_sa = spec(serde_json::json!({
            "serviceAccountName": "default", "containers": [{"name": "c"}]
        }));
        assert_eq!(refusal(&default_sa), None);
    }

    #[test]
    fn each_borrowed_right_is_refused_by_its_field() {
        let cases = [
            (
                serde_json::json!({"hostPID": true, "containers": [{"name": "c"}]}),
                "spec.pod.spec.hostPID",
            ),
            (
                serde_json::json!({"serviceAccountName": "admin", "containers": [{"name": "c"}]}),
                "spec.pod.spec.serviceAccountName",
            ),
            (
                serde_json::json!({"serviceAccount": "admin", "containers": [{"name": "c"}]}),
                "spec.pod.spec.serviceAccount",
            ),
            (
                serde_json::json!({"containers": [{"name": "c"}],
                    "volumes": [{"name": "e", "emptyDir": {}}, {"name": "root", "hostPath": {"path": "/"}}]}),
                "spec.pod.spec.volumes[1].hostPath",
            ),
            (
                serde_json::json!({"containers": [{"name": "c",
                    "securityContext": {"privileged": true}}]}),
                "spec.pod.spec.containers[0].securityContext.privileged",
            ),
            (
                serde_json::json!({"containers": [{"name": "c"}], "initContainers": [{"name": "i",
                    "securityContext": {"capabilities": {"add": ["SYS_ADMIN"]}}}]}),
                "spec.pod.spec.initContainers[0].securityContext.capabilities.add",
            ),
        ];
        for (json, field) in cases {
            let r = refusal(&spec(json)).unwrap_or_default();
            assert!(r.starts_with(&format!("{field}: ")), "{r}");
            assert!(r.contains("--allow-privileged-prebackup-pods"), "{r}");
        }
    }
}

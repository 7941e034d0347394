//! The stable identity of a volume's snapshot history: restic host and tags derived from the PVC,
//! never from the pod UID, so history survives pod restarts and rescheduling.

use stowage_proto::v1::VolumeIdentity;

pub use stowage_api::contract::{
    TAG_CONTAINER, TAG_NAMESPACE, TAG_OWNER, TAG_POD, TAG_PVC, TAG_RUN, TAG_SOURCE_COMMAND,
    TAG_SOURCE_VOLUME,
};

/// A validated identity.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Identity {
    pub namespace: String,
    pub pvc: String,
    pub pod_name: String,
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error("identity.{field} {value:?} is not a valid Kubernetes name")]
pub struct InvalidIdentity {
    pub field: &'static str,
    pub value: String,
}

/// RFC 1123 subdomain, as Kubernetes requires of namespace, PVC and pod names. This also keeps
/// commas (restic's tag separator) and '=' out of tags.
pub fn is_k8s_name(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 253
        && s.bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-' || b == b'.')
        && s.as_bytes().first().is_some_and(u8::is_ascii_alphanumeric)
        && s.as_bytes().last().is_some_and(u8::is_ascii_alphanumeric)
}

impl Identity {
    pub fn from_proto(
        p: Option<&VolumeIdentity>,
        require_pod: bool,
    ) -> Result<Self, InvalidIdentity> {
        let empty = VolumeIdentity::default();
        let p = p.unwrap_or(&empty);
        let check = |field: &'static str, value: &str| {
            if is_k8s_name(value) {
                Ok(value.to_string())
            } else {
                Err(InvalidIdentity {
                    field,
                    value: value.to_string(),
                })
            }
        };
        Ok(Self {
            namespace: check("namespace", &p.namespace)?,
            pvc: check("pvc", &p.pvc)?,
            pod_name: if require_pod || !p.pod_name.is_empty() {
                check("pod_name", &p.pod_name)?
            } else {
                String::new()
            },
        })
    }

    /// restic `--host`: one per volume identity, so restic's grouping never mixes PVCs.
    pub fn host(&self) -> String {
        format!("{}/{}", self.namespace, self.pvc)
    }

    /// Tags that select exactly this identity's snapshots.
    pub fn selector_tags(&self) -> Vec<String> {
        vec![
            format!("{TAG_NAMESPACE}={}", self.namespace),
            format!("{TAG_PVC}={}", self.pvc),
        ]
    }

    /// Tags written on a backup of this identity.
    pub fn backup_tags(&self) -> Vec<String> {
        let mut tags = self.selector_tags();
        if !self.pod_name.is_empty() {
            tags.push(format!("{TAG_POD}={}", self.pod_name));
        }
        tags.push(TAG_SOURCE_VOLUME.to_string());
        tags
    }

    /// Whether a snapshot's tags say it belongs to this identity.
    pub fn owns(&self, snapshot: &restic_wrap::json::Snapshot) -> bool {
        snapshot.tag_value(TAG_NAMESPACE) == Some(self.namespace.as_str())
            && snapshot.tag_value(TAG_PVC) == Some(self.pvc.as_str())
    }
}

/// The identity of a backup command's history: the pod's owner and the container, never the pod,
/// whose name changes with every replacement.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CommandIdentity {
    pub namespace: String,
    pub owner_kind: String,
    pub owner_name: String,
    pub container: String,
    pub pod: String,
}

/// A Kubernetes kind: CamelCase ASCII letters and digits.
fn is_kind(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 63
        && s.bytes().all(|b| b.is_ascii_alphanumeric())
        && s.as_bytes().first().is_some_and(u8::is_ascii_uppercase)
}

impl CommandIdentity {
    pub fn new(
        namespace: &str,
        owner_kind: &str,
        owner_name: &str,
        container: &str,
        pod: &str,
    ) -> Result<Self, InvalidIdentity> {
        let bad = |field: &'static str, value: &str| InvalidIdentity {
            field,
            value: value.to_string(),
        };
        for (field, value) in [
            ("namespace", namespace),
            ("owner_name", owner_name),
            ("container", container),
            ("pod", pod),
        ] {
            if !is_k8s_name(value) {
                return Err(bad(field, value));
            }
        }
        if !is_kind(owner_kind) {
            return Err(bad("owner_kind", owner_kind));
        }
        Ok(Self {
            namespace: namespace.into(),
            owner_kind: owner_kind.into(),
            owner_name: owner_name.into(),
            container: container.into(),
            pod: pod.into(),
        })
    }

    /// restic `--host`: three slashes, so it never equals a volume identity's `<namespace>/<pvc>`,
    /// and retention (grouped by host) keeps each command's history apart.
    pub fn host(&self) -> String {
        format!(
            "{}/{}/{}/{}",
            self.namespace, self.owner_kind, self.owner_name, self.container
        )
    }

    /// Tags that select exactly this identity's snapshots.
    pub fn selector_tags(&self) -> Vec<String> {
        vec![
            format!("{TAG_NAMESPACE}={}", self.namespace),
            format!("{TAG_OWNER}={}/{}", self.owner_kind, self.owner_name),
            format!("{TAG_CONTAINER}={}", self.container),
            TAG_SOURCE_COMMAND.to_string(),
        ]
    }

    /// Tags written on a snapshot of this identity.
    pub fn backup_tags(&self) -> Vec<String> {
        let mut tags = self.selector_tags();
        tags.push(format!("{TAG_POD}={}", self.pod));
        tags
    }
}

/// Extra user tags must not smuggle in separators or impersonate our own keys.
pub fn validate_extra_tag(tag: &str) -> Result<(), String> {
    if tag.is_empty() || tag.contains(',') || tag.chars().any(char::is_control) {
        return Err(format!(
            "extra tag {tag:?} must be non-empty without commas or control characters"
        ));
    }
    if tag.starts_with(stowage_api::contract::PREFIX) {
        return Err(format!(
            "extra tag {tag:?} uses the reserved stowage.dev/ prefix"
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn p(ns: &str, pvc: &str, pod: &str) -> VolumeIdentity {
        VolumeIdentity {
            namespace: ns.into(),
            pvc: pvc.into(),
            pod_name: pod.into(),
        }
    }

    #[test]
    fn identity_tags_and_host_do_not_depend_on_the_pod() {
        let a = Identity::from_proto(Some(&p("shop", "data-pg-0", "pg-0")), true).unwrap();
        let b = Identity::from_proto(Some(&p("shop", "data-pg-0", "pg-0-new")), true).unwrap();
        assert_eq!(a.host(), "shop/data-pg-0");
        assert_eq!(a.host(), b.host());
        assert_eq!(a.selector_tags(), b.selector_tags());
        assert!(
            a.backup_tags()
                .contains(&"stowage.dev/pod=pg-0".to_string())
        );
    }

    #[test]
    fn rejects_names_that_could_break_tags() {
        assert_eq!(
            Identity::from_proto(Some(&p("shop", "a,b", "x")), true)
                .unwrap_err()
                .field,
            "pvc"
        );
        assert!(Identity::from_proto(Some(&p("", "a", "x")), true).is_err());
        assert!(Identity::from_proto(Some(&p("Shop", "a", "x")), true).is_err());
        assert!(Identity::from_proto(None, false).is_err());
        assert!(Identity::from_proto(Some(&p("shop", "a", "")), false).is_ok());
        assert!(Identity::from_proto(Some(&p("shop", "a", "")), true).is_err());
        assert!(validate_extra_tag("team=a").is_ok());
        assert!(validate_extra_tag("a,b").is_err());
        assert!(validate_extra_tag("stowage.dev/pvc=x").is_err());
    }

    #[test]
    fn command_identities_follow_the_owner_and_never_look_like_a_volume() {
        let a = CommandIdentity::new("shop", "StatefulSet", "pg", "db", "pg-0").unwrap();
        let b = CommandIdentity::new("shop", "StatefulSet", "pg", "db", "pg-1").unwrap();
        assert_eq!(a.host(), "shop/StatefulSet/pg/db");
        assert_eq!(a.selector_tags(), b.selector_tags());
        assert!(
            a.backup_tags()
                .contains(&"stowage.dev/pod=pg-0".to_string())
        );
        assert!(
            a.selector_tags()
                .contains(&"stowage.dev/source=command".to_string())
        );
        assert_eq!(a.host().matches('/').count(), 3);
        let e = CommandIdentity::new("shop", "statefulset", "pg", "db", "p").unwrap_err();
        assert_eq!(e.field, "owner_kind");
        let e = CommandIdentity::new("shop", "Pod", "pg", "d,b", "p").unwrap_err();
        assert_eq!(e.field, "container");
    }

    #[test]
    fn owns_checks_both_tags() {
        let id = Identity::from_proto(Some(&p("shop", "data", "")), false).unwrap();
        let mut s = restic_wrap::json::Snapshot {
            tags: vec![
                "stowage.dev/namespace=shop".into(),
                "stowage.dev/pvc=data".into(),
            ],
            ..Default::default()
        };
        assert!(id.owns(&s));
        s.tags[1] = "stowage.dev/pvc=other".into();
        assert!(!id.owns(&s));
    }
}

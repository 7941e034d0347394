//! The user reference stays true to the code: every field of every CRD's spec is named in
//! docs/crds.md, every pod/PVC annotation in docs/commands.md, every value of the chart in
//! docs/install.md, and every alert of the chart has its runbook in docs/alerts.md.

use std::collections::BTreeSet;

fn read(path: &str) -> String {
    std::fs::read_to_string(stowage_tests::workspace_root().join(path)).expect(path)
}

/// Whether `word` occurs in `text` with no identifier character on either side.
fn mentions(text: &str, word: &str) -> bool {
    let ident = |c: char| c.is_ascii_alphanumeric() || c == '_';
    text.match_indices(word).any(|(i, _)| {
        let before = text[..i].chars().next_back();
        let after = text[i + word.len()..].chars().next();
        !before.is_some_and(ident) && !after.is_some_and(ident)
    })
}

/// Property names below `schema`, as dotted paths (LabelSelector internals are Kubernetes', not ours).
fn fields(schema: &serde_json::Value, path: &str, out: &mut BTreeSet<(String, String)>) {
    let props = schema["properties"]
        .as_object()
        .or_else(|| schema["items"]["properties"].as_object());
    for (name, sub) in props.into_iter().flatten() {
        let p = format!("{path}.{name}");
        out.insert((p.clone(), name.clone()));
        if name != "selector" {
            fields(sub, &p, out);
        }
    }
}

#[test]
fn every_crd_spec_field_is_in_the_crd_reference() {
    let docs = read("docs/crds.md");
    let mut missing = Vec::new();
    let mut checked = 0;
    for (file, yaml) in stowage_api::render::rendered().expect("crds") {
        let v: serde_json::Value = serde_yaml::from_str(&yaml).expect("yaml");
        let spec = &v["spec"]["versions"][0]["schema"]["openAPIV3Schema"]["properties"]["spec"];
        let mut all = BTreeSet::new();
        fields(spec, "spec", &mut all);
        assert!(!all.is_empty(), "{file}: no spec fields found");
        for (path, name) in all {
            checked += 1;
            if !mentions(&docs, &name) {
                missing.push(format!("{file}: {path}"));
            }
        }
    }
    // Six kinds with backends, actions, sources and targets: well over 50 fields.
    assert!(checked > 50, "only {checked} fields found");
    assert!(missing.is_empty(), "not in docs/crds.md: {missing:#?}");
}

#[test]
fn every_annotation_is_in_the_commands_reference() {
    let contract = read("api/src/contract.rs");
    let docs = read("docs/commands.md") + &read("docs/crds.md");
    let annotations: Vec<&str> = contract
        .lines()
        .filter(|l| l.trim_start().starts_with("pub const ANNOTATION_"))
        .filter_map(|l| l.split('"').nth(1))
        .filter(|v| v.starts_with("stowage.dev/"))
        .collect();
    assert!(annotations.len() >= 10, "{annotations:?}");
    let missing: Vec<_> = annotations.iter().filter(|a| !docs.contains(*a)).collect();
    assert!(
        missing.is_empty(),
        "annotations not documented: {missing:?}"
    );
}

#[test]
fn every_chart_value_is_in_the_install_reference() {
    let values: serde_yaml::Value =
        serde_yaml::from_str(&read("deploy/daemonset/values.yaml")).expect("values");
    let docs = read("docs/install.md");
    let mut missing = Vec::new();
    // Top-level keys and the keys one level below them (agent.*, coordinator.*, tls.*, ...).
    for (k, v) in values.as_mapping().expect("map") {
        let k = k.as_str().expect("key");
        match v.as_mapping() {
            Some(m) if !m.is_empty() && k != "image" => {
                for (sub, _) in m {
                    let sub = sub.as_str().expect("key");
                    if !mentions(&docs, sub) {
                        missing.push(format!("{k}.{sub}"));
                    }
                }
            }
            _ if !mentions(&docs, k) => missing.push(k.to_string()),
            _ => {}
        }
    }
    assert!(
        missing.is_empty(),
        "values not in docs/install.md: {missing:?}"
    );
}

#[test]
fn every_alert_has_a_runbook() {
    let rule = read("deploy/daemonset/templates/prometheusrule.yaml");
    let docs = read("docs/alerts.md");
    let alerts: Vec<&str> = rule
        .lines()
        .filter_map(|l| l.trim().strip_prefix("- alert: "))
        .collect();
    assert!(alerts.len() >= 5, "{alerts:?}");
    for a in alerts {
        assert!(
            docs.contains(&format!("## {a}\n")),
            "no runbook section for {a}"
        );
        assert!(
            rule.contains(&format!("alerts.md#{}", a.to_lowercase())),
            "{a}'s runbook_url does not point at its section"
        );
    }
}

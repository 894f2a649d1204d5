//! `openapi/openapi.json` is a product: it must equal what the code generates, and every
//! operation must be documented for Cloud Central.

use serde_json::Value;

fn checked_in_path() -> std::path::PathBuf {
    std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../openapi/openapi.json")
}

#[test]
fn checked_in_spec_matches_the_code() {
    let generated = management::openapi::json();
    let path = checked_in_path();
    if std::env::var_os("POSTWIRE_UPDATE_OPENAPI").is_some() {
        std::fs::write(&path, &generated).unwrap();
    }
    let on_disk = std::fs::read_to_string(&path).unwrap_or_default();
    assert!(
        on_disk == generated,
        "openapi/openapi.json differs from the code; regenerate it with\n  cargo run -p management --bin management-service -- openapi > openapi/openapi.json"
    );
}

#[test]
fn every_operation_is_documented() {
    let spec: Value = serde_json::from_str(&management::openapi::json()).unwrap();
    assert_eq!(spec["openapi"], "3.1.0");
    // Authenticated by what they carry, not by a bearer token (ARCHITECTURE §3).
    let public = [
        "/healthz",
        "/readyz",
        "/api/v1/site-auth/token",
        "/api/v1/invitations/accept",
    ];
    let mut ids = std::collections::HashSet::new();
    for (path, ops) in spec["paths"].as_object().unwrap() {
        for (method, op) in ops.as_object().unwrap() {
            let what = format!("{method} {path}");
            let id = op["operationId"]
                .as_str()
                .unwrap_or_else(|| panic!("{what}: operationId"));
            assert!(
                ids.insert(id.to_owned()),
                "{what}: duplicate operationId {id}"
            );
            assert!(
                op["summary"].as_str().is_some_and(|s| !s.is_empty()),
                "{what}: summary"
            );
            assert!(
                op["tags"].as_array().is_some_and(|t| !t.is_empty()),
                "{what}: tag"
            );
            let responses = op["responses"].as_object().unwrap();
            if !public.contains(&path.as_str()) {
                assert!(
                    op["security"][0]["bearer"].is_array(),
                    "{what}: security scheme"
                );
                assert!(responses.contains_key("401"), "{what}: 401 documented");
            }
            for (code, r) in responses {
                if code.starts_with('4') || code.starts_with('5') {
                    assert!(
                        r["content"]["application/problem+json"]["schema"].is_object(),
                        "{what}: {code} has a problem+json schema"
                    );
                }
            }
        }
    }
    assert!(ids.len() >= 15, "{} operations", ids.len());
}

/// The examples of one media type: `example`, or each value of `examples`.
fn examples_of(content: &Value) -> Vec<&Value> {
    let mut out: Vec<&Value> = content.get("example").into_iter().collect();
    if let Some(named) = content["examples"].as_object() {
        out.extend(named.values().filter_map(|e| e.get("value")));
    }
    out
}

#[test]
fn every_operation_carries_request_and_response_examples() {
    let spec: Value = serde_json::from_str(&management::openapi::json()).unwrap();
    let mut missing = Vec::new();
    let mut checked = 0;
    for (path, ops) in spec["paths"].as_object().unwrap() {
        for (method, op) in ops.as_object().unwrap() {
            let what = format!("{method} {path}");
            if let Some(body) = op.get("requestBody") {
                for (media, content) in body["content"].as_object().unwrap() {
                    checked += 1;
                    if examples_of(content).is_empty() {
                        missing.push(format!("{what}: request body {media}"));
                    }
                }
            }
            for (code, r) in op["responses"].as_object().unwrap() {
                let Some(contents) = r["content"].as_object() else {
                    continue; // 202/204: no body, nothing to show
                };
                for (media, content) in contents {
                    checked += 1;
                    let examples = examples_of(content);
                    if examples.is_empty() {
                        missing.push(format!("{what}: {code} {media}"));
                    }
                    if media == "application/problem+json" {
                        for e in examples {
                            assert_eq!(
                                e["status"].as_u64().map(|s| s.to_string()).as_deref(),
                                Some(code.as_str()),
                                "{what}: the {code} example has status {}",
                                e["status"]
                            );
                            if code == "422" {
                                assert!(
                                    e["errors"].as_array().is_some_and(|v| !v.is_empty()),
                                    "{what}: the 422 example names no refused field"
                                );
                            }
                        }
                    }
                }
            }
        }
    }
    assert!(
        missing.is_empty(),
        "operations without examples:\n{}",
        missing.join("\n")
    );
    assert!(checked > 100, "only {checked} bodies checked");
}

#[test]
fn error_examples_are_what_the_server_sends() {
    // The generated 401 example equals a real 401 body of the catalogue.
    let spec: Value = serde_json::from_str(&management::openapi::json()).unwrap();
    let e = &spec["paths"]["/api/v1/tenants"]["get"]["responses"]["401"]["content"]["application/problem+json"]
        ["example"];
    assert_eq!(e["type"], "urn:postwire:problem:unauthorized");
    assert_eq!(e["title"], "Authentication required");
    assert_eq!(e["detail"], "a bearer token is required");
    let e = &spec["paths"]["/api/v1/tenants/{tenant_id}"]["put"]["responses"]["403"]["content"]["application/problem+json"]
        ["example"];
    assert_eq!(e["detail"], "this operation needs the cluster_admin role");
}

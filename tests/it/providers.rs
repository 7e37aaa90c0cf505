//! Native provider payloads through the real pipeline: every fixture of
//! `tests/fixtures/<provider>/` is produced (with its sidecar headers), applied to Postgres
//! and announced; a re-delivery changes nothing; non-logins leave no trace.

use std::collections::{BTreeMap, BTreeSet};

use serde_json::json;

use crate::helpers::*;

/// A fixture's bytes and its headers (the `<name>.headers.json` sidecar, if any).
fn fixture(name: &str) -> (Vec<u8>, Vec<(String, Vec<u8>)>) {
    let dir = format!("{}/tests/fixtures", env!("CARGO_MANIFEST_DIR"));
    let body = std::fs::read(format!("{dir}/{name}.json"))
        .unwrap_or_else(|e| panic!("fixture {name}: {e}"));
    let headers = match std::fs::read(format!("{dir}/{name}.headers.json")) {
        Ok(text) => serde_json::from_slice::<BTreeMap<String, String>>(&text)
            .expect("sidecar is a string map")
            .into_iter()
            .map(|(k, v)| (k, v.into_bytes()))
            .collect(),
        Err(_) => Vec::new(),
    };
    (body, headers)
}

/// What the identity row must say after all fixtures of a provider were applied.
struct Identity {
    subject: &'static str,
    email: Option<&'static str>,
    verified: bool,
}

struct Scenario {
    provider: &'static str,
    /// Fixture name (under `tests/fixtures/`) and the logins it holds.
    fixtures: &'static [(&'static str, i64)],
    /// Extra headers per fixture (beyond the sidecar).
    extra_headers: &'static [(&'static str, &'static str, &'static str)],
    identities: &'static [Identity],
    /// Subjects that are new, in any order: one `user.signed_up` each.
    signed_up: &'static [&'static str],
    /// The fixture produced a second time: a duplicate delivery.
    redeliver: &'static str,
}

async fn produce_fixture(h: &Harness, scenario: &Scenario, name: &str) {
    let (body, mut headers) = fixture(name);
    for (fixture_name, key, value) in scenario.extra_headers {
        if *fixture_name == name {
            headers.push((key.to_string(), value.as_bytes().to_vec()));
        }
    }
    let refs: Vec<(&str, &[u8])> = headers
        .iter()
        .map(|(k, v)| (k.as_str(), v.as_slice()))
        .collect();
    // One partition: the fixtures apply in the order given.
    h.produce_with(
        &format!("{}:{name}", scenario.provider),
        &body,
        Some(0),
        &refs,
    )
    .await;
}

async fn run(scenario: Scenario) {
    let mut h = Harness::new().await;
    h.start().await;
    for (name, _) in scenario.fixtures {
        produce_fixture(&h, &scenario, name).await;
    }
    let logins: i64 = scenario.fixtures.iter().map(|(_, n)| n).sum();
    h.wait_handled(logins).await;

    // The same delivery again, then a sentinel behind it on the partition: once the
    // sentinel is handled, the re-delivery was too.
    produce_fixture(&h, &scenario, scenario.redeliver).await;
    let sentinel = login(
        &format!("sentinel-{}", scenario.provider),
        "2026-05-01T10:00:00Z",
        json!({"provider": "sentinel", "subject": "s"}),
    );
    h.produce_with("sentinel:s", &sentinel, Some(0), &[]).await;
    h.wait_handled(logins + 1).await;
    let signups = scenario.signed_up.len();
    let out = h.outputs(logins as usize + signups + 2).await;
    h.stop().await;

    let db = &h.db;
    assert_eq!(
        db.count("SELECT count(*) FROM inbox").await,
        logins + 1,
        "{}: one inbox row per login, none for the re-delivery or non-logins",
        scenario.provider
    );
    assert_eq!(
        db.count("SELECT count(*) FROM inbox WHERE outcome = 'dead_lettered'")
            .await,
        0
    );
    assert_eq!(
        db.count(&format!(
            "SELECT count(*) FROM inbox WHERE event_id NOT LIKE '{}:%' AND event_id NOT LIKE 'sentinel-%'",
            scenario.provider
        ))
        .await,
        0,
        "event ids are prefixed with the provider"
    );
    for identity in scenario.identities {
        let (email, verified): (Option<String>, bool) = sqlx::query_as(
            "SELECT email, email_verified FROM external_identities WHERE provider = $1 AND subject = $2",
        )
        .bind(scenario.provider)
        .bind(identity.subject)
        .fetch_one(&db.pool)
        .await
        .unwrap_or_else(|e| panic!("identity {}: {e}", identity.subject));
        assert_eq!(
            email.as_deref(),
            identity.email,
            "email of {}",
            identity.subject
        );
        assert_eq!(
            verified, identity.verified,
            "verified of {}",
            identity.subject
        );
    }
    assert_eq!(
        db.count(&format!(
            "SELECT count(*) FROM external_identities WHERE provider = '{}'",
            scenario.provider
        ))
        .await,
        scenario.identities.len() as i64
    );

    let of_type = |t: &str| out.iter().filter(|o| o.event_type() == t).count();
    assert_eq!(
        of_type("user.synced"),
        logins as usize + 1,
        "one user.synced per login"
    );
    assert_eq!(of_type("user.signed_up"), signups + 1);
    assert!(
        out.iter().all(|o| !o.topic.ends_with(".dlq")),
        "no dead letters"
    );
    let signed_up: BTreeSet<String> = out
        .iter()
        .filter(|o| o.event_type() == "user.signed_up")
        .map(|o| o.json())
        .filter(|e| e["data"]["provider"] == scenario.provider)
        .map(|e| {
            e["data"]["subject"]
                .as_str()
                .unwrap_or_default()
                .to_string()
        })
        .collect();
    let expected: BTreeSet<String> = scenario.signed_up.iter().map(|s| s.to_string()).collect();
    assert_eq!(signed_up, expected);
    for event in out.iter().filter(|o| !o.topic.ends_with(".dlq")) {
        assert_matches_schema(&event.json());
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn auth0_post_login_and_log_streams() {
    run(Scenario {
        provider: "auth0",
        fixtures: &[
            ("auth0/post-login", 1),
            ("auth0/post-login-first", 1),
            ("auth0/post-login-refresh", 1),
            ("auth0/log-stream-batch", 2),
            ("auth0/log-stream-wrapped-success", 1),
            ("auth0/log-failed-login", 0),
        ],
        extra_headers: &[],
        identities: &[
            Identity {
                subject: "auth0|65f1c0a2b3d4e5f60718293a",
                email: Some("grace.hopper@example.com"),
                verified: true,
            },
            Identity {
                subject: "google-oauth2|108474839202117733905",
                email: Some("felix.wagner@gmail.example"),
                verified: true,
            },
            Identity {
                subject: "auth0|6643e1c0f1a2b3c4d5e6f708",
                email: Some("ada@example.com"),
                verified: false,
            },
            Identity {
                subject: "auth0|6643e1f6a9b8c7d6e5f40312",
                email: Some("noor.rahman@example.com"),
                verified: false,
            },
            Identity {
                subject: "samlp|acme-okta|kate@acme.example",
                email: Some("kate@acme.example"),
                verified: false,
            },
        ],
        signed_up: &[
            "auth0|65f1c0a2b3d4e5f60718293a",
            "google-oauth2|108474839202117733905",
            "auth0|6643e1c0f1a2b3c4d5e6f708",
            "auth0|6643e1f6a9b8c7d6e5f40312",
            "samlp|acme-okta|kate@acme.example",
        ],
        redeliver: "auth0/log-stream-batch",
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn clerk_webhooks_dedupe_on_the_svix_id() {
    run(Scenario {
        provider: "clerk",
        fixtures: &[
            ("clerk/user-created", 1),
            ("clerk/user-updated", 1),
            ("clerk/session-created", 1),
            ("clerk/email-created", 0),
        ],
        extra_headers: &[],
        // The update made an unverified address primary.
        identities: &[Identity {
            subject: "user_2hVq7Xo9LrT1kQ3sWbN8eYcP4aD",
            email: Some("lin@wei-family.example"),
            verified: false,
        }],
        signed_up: &["user_2hVq7Xo9LrT1kQ3sWbN8eYcP4aD"],
        redeliver: "clerk/user-created",
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn firebase_blocking_functions() {
    run(Scenario {
        provider: "firebase",
        fixtures: &[
            ("firebase/before-create", 1),
            ("firebase/before-sign-in", 1),
            ("firebase/before-send-email", 0),
        ],
        extra_headers: &[],
        identities: &[
            Identity {
                subject: "kR3nXo8YvJc2WqT5bLz1HmPa9Ue4",
                email: Some("priya.nair@example.com"),
                verified: true,
            },
            Identity {
                subject: "Hb7sLq1ZwX3kR9mT2vN5pC8yD4fG",
                email: Some("luc.moreau@example.fr"),
                verified: false,
            },
        ],
        signed_up: &[
            "kR3nXo8YvJc2WqT5bLz1HmPa9Ue4",
            "Hb7sLq1ZwX3kR9mT2vN5pC8yD4fG",
        ],
        redeliver: "firebase/before-create",
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn okta_hook_delivery_makes_one_login_per_event() {
    run(Scenario {
        provider: "okta",
        fixtures: &[
            ("okta/event-hook-logins", 2),
            ("okta/event-hook-no-login", 0),
        ],
        extra_headers: &[],
        // Okta asserts no verification: never verified.
        identities: &[
            Identity {
                subject: "00u8k2m4n6p8r0t2v4x6",
                email: Some("maria.garcia@example.com"),
                verified: false,
            },
            Identity {
                subject: "00u1a3c5e7g9i1k3m5o7",
                email: None,
                verified: false,
            },
        ],
        signed_up: &["00u8k2m4n6p8r0t2v4x6", "00u1a3c5e7g9i1k3m5o7"],
        redeliver: "okta/event-hook-logins",
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn keycloak_register_login_and_profile_update() {
    run(Scenario {
        provider: "keycloak",
        fixtures: &[
            ("keycloak/register", 1),
            ("keycloak/login", 1),
            ("keycloak/update-profile", 1),
            ("keycloak/login-error", 0),
        ],
        extra_headers: &[],
        identities: &[Identity {
            subject: "7c9e6679-7425-40de-944b-e07fc1f90ae7",
            email: Some("jonas@berg.example"),
            verified: false,
        }],
        signed_up: &["7c9e6679-7425-40de-944b-e07fc1f90ae7"],
        redeliver: "keycloak/login",
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn workos_authentication_and_user_events() {
    run(Scenario {
        provider: "workos",
        fixtures: &[
            ("workos/user-created", 1),
            ("workos/authentication-sso-succeeded", 1),
            ("workos/user-updated", 1),
            ("workos/authentication-password-failed", 0),
            ("workos/authentication-password-succeeded", 1),
        ],
        extra_headers: &[],
        identities: &[
            Identity {
                subject: "user_01HY8PZ3M5Q7S9U1W3Y5A7C9EF",
                email: Some("omar.haddad@acme.example"),
                verified: true,
            },
            Identity {
                subject: "user_01HY8R5KX7Z9B1D3F5H7K9M1P3",
                email: Some("zoe.adams@example.com"),
                verified: false,
            },
        ],
        signed_up: &[
            "user_01HY8PZ3M5Q7S9U1W3Y5A7C9EF",
            "user_01HY8R5KX7Z9B1D3F5H7K9M1P3",
        ],
        redeliver: "workos/user-updated",
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cognito_triggers_dedupe_on_the_lambda_request_id() {
    run(Scenario {
        provider: "cognito",
        fixtures: &[
            ("cognito/post-confirmation-sign-up", 1),
            ("cognito/post-authentication", 1),
            ("cognito/post-confirmation-forgot-password", 0),
        ],
        extra_headers: &[(
            "cognito/post-authentication",
            "lambda-request-id",
            "5f0c8e2a-1b3d-4c6e-9a7f-2d4b6c8e0a13",
        )],
        identities: &[
            Identity {
                subject: "3c7a9f12-4b6e-4d81-9f03-2a5b7c9d1e4f",
                email: Some("chen.li@example.com"),
                verified: true,
            },
            Identity {
                subject: "a91e4c27-0d3b-4f6a-8e25-7b1c9d3f5a60",
                email: Some("sam.okafor@example.com"),
                verified: false,
            },
        ],
        signed_up: &[
            "3c7a9f12-4b6e-4d81-9f03-2a5b7c9d1e4f",
            "a91e4c27-0d3b-4f6a-8e25-7b1c9d3f5a60",
        ],
        redeliver: "cognito/post-authentication",
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unknown_json_is_dead_lettered_as_unknown_payload() {
    let mut h = Harness::new().await;
    h.start().await;
    let unknown = br#"{"kind":"login","who":"someone","when":"yesterday"}"#;
    h.produce_with("x:unknown", unknown, Some(0), &[]).await;
    h.wait_handled(1).await;
    let out = h.outputs(1).await;
    h.stop().await;
    assert_eq!(out.len(), 1);
    let letter = &out[0];
    assert!(letter.topic.ends_with(".dlq"), "{}", letter.topic);
    assert_eq!(letter.header("authsync-error-class"), "unknown_payload");
    assert_eq!(letter.value, unknown);
}

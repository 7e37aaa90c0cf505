//! `authsync ingest`: real HTTP requests, signed as each provider signs them, against the
//! ingest server in this process, producing to librdkafka's mock broker; the worker where
//! the test is about what gets applied.

use std::time::Duration;

use authsync::config::{Config, IngestEndpointConfig, Secret, TrustedSourceConfig};
use authsync::events::providers::{decode_login_message, RawMessage};
use authsync::events::source::{SigningKey, SourceCheck, SourceKeys, SOURCE_HEADER};
use authsync::events::LoginEvent;
use authsync::ingest::{self, Ingest};
use hmac::{Hmac, Mac};
use sha2::Sha256;
use tokio_util::sync::CancellationToken;

use crate::helpers::*;

pub const SOURCE_KEY: &str = "test-source-key-0123456789abcdef0123456789";
pub const CLERK_SECRET: &str = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw";
const CLERK_OLD_SECRET: &str = "whsec_C2FVsBQIhrscChlQIMV+b5sSYspob7oD";
const WORKOS_SECRET: &str = "workos-webhook-secret";
const OKTA_SECRET: &str = "okta-hook-secret";
const AUTH0_TOKEN: &str = "auth0-log-stream-token";
const FORWARDER_TOKEN: &str = "forwarder-token";

fn endpoint(provider: &str, secrets: &[&str]) -> IngestEndpointConfig {
    IngestEndpointConfig {
        provider: provider.into(),
        secrets: secrets.iter().map(|s| Secret::new(*s)).collect(),
        ..Default::default()
    }
}

/// Every endpoint the tests use, the signing key, and a worker trust policy that believes
/// what ingest signs.
pub fn with_ingest(config: &mut Config) {
    config.ingest.listen = "127.0.0.1:0".parse().expect("addr");
    config.ingest.signing_key = Secret::new(SOURCE_KEY);
    config.ingest.ack_timeout_ms = 1_500;
    config.ingest.request_timeout_ms = 5_000;
    config.ingest.max_body_bytes = 64 * 1024;
    let e = &mut config.ingest.endpoints;
    e.insert(
        "clerk-prod".into(),
        endpoint("clerk", &[CLERK_OLD_SECRET, CLERK_SECRET]),
    );
    e.insert("workos-prod".into(), endpoint("workos", &[WORKOS_SECRET]));
    e.insert("okta-prod".into(), endpoint("okta", &[OKTA_SECRET]));
    e.insert("auth0-logs".into(), endpoint("auth0", &[AUTH0_TOKEN]));
    e.insert(
        "auth0-actions".into(),
        endpoint("auth0", &[FORWARDER_TOKEN]),
    );
    e.insert(
        "firebase-fwd".into(),
        endpoint("firebase", &[FORWARDER_TOKEN]),
    );
    e.get_mut("firebase-fwd").expect("endpoint").auth = Some("token".into());
    e.insert("keycloak-fwd".into(), endpoint("keycloak", &[CLERK_SECRET]));
    let mut ce = endpoint("cloudevents", &[FORWARDER_TOKEN]);
    ce.auth = Some("token".into());
    ce.providers = vec!["acme".into()];
    e.insert("acme-events".into(), ce);
    config.trust.unsigned = "refuse".into();
    config
        .trust
        .keys
        .insert("k1".into(), Secret::new(SOURCE_KEY));
    for (name, provider) in [
        ("clerk-prod", "clerk"),
        ("workos-prod", "workos"),
        ("okta-prod", "okta"),
        ("auth0-logs", "auth0"),
        ("auth0-actions", "auth0"),
        ("firebase-fwd", "firebase"),
        ("keycloak-fwd", "keycloak"),
        ("acme-events", "acme"),
    ] {
        config.trust.sources.insert(
            name.into(),
            TrustedSourceConfig {
                providers: vec![provider.into()],
                email_verified: true,
                groups: true,
            },
        );
    }
}

pub struct IngestServer {
    pub ingest: Option<Ingest>,
    pub shutdown: CancellationToken,
    pub base: String,
    pub http: reqwest::Client,
}

impl IngestServer {
    pub async fn start(config: &Config) -> Self {
        let shutdown = CancellationToken::new();
        let ingest = ingest::start(config, shutdown.clone())
            .await
            .expect("ingest starts");
        let base = format!("http://{}", ingest.addr);
        Self {
            ingest: Some(ingest),
            shutdown,
            base,
            http: reqwest::Client::new(),
        }
    }

    pub async fn post(
        &self,
        endpoint: &str,
        headers: &[(&str, String)],
        body: &[u8],
    ) -> (u16, String, reqwest::header::HeaderMap) {
        let mut request = self
            .http
            .post(format!("{}/hooks/{endpoint}", self.base))
            .body(body.to_vec());
        for (k, v) in headers {
            request = request.header(*k, v);
        }
        let response = request.send().await.expect("HTTP request");
        let status = response.status().as_u16();
        let headers = response.headers().clone();
        (status, response.text().await.unwrap_or_default(), headers)
    }

    pub async fn metrics(&self) -> String {
        self.http
            .get(format!("{}/metrics", self.base))
            .send()
            .await
            .expect("metrics")
            .text()
            .await
            .expect("text")
    }

    pub async fn stop(mut self) {
        self.shutdown.cancel();
        if let Some(i) = self.ingest.take() {
            tokio::time::timeout(Duration::from_secs(20), i.wait())
                .await
                .expect("ingest stops")
                .expect("cleanly");
        }
    }
}

/// Headers of a Standard Webhooks delivery, as Svix signs it for Clerk.
pub fn svix_headers(
    secret: &str,
    id: &str,
    timestamp: i64,
    body: &[u8],
) -> Vec<(&'static str, String)> {
    let hook = standardwebhooks::Webhook::new(secret).expect("secret");
    vec![
        ("svix-id", id.to_string()),
        ("svix-timestamp", timestamp.to_string()),
        (
            "svix-signature",
            hook.sign(id, timestamp, body).expect("sign"),
        ),
        ("content-type", "application/json".into()),
    ]
}

fn workos_headers(secret: &str, millis: i64, body: &[u8]) -> Vec<(&'static str, String)> {
    let mut mac = <Hmac<Sha256> as Mac>::new_from_slice(secret.as_bytes()).expect("key");
    mac.update(format!("{millis}.").as_bytes());
    mac.update(body);
    vec![(
        "workos-signature",
        format!(
            "t={millis}, v1={}",
            hex::encode(mac.finalize().into_bytes())
        ),
    )]
}

/// A change to a configuration.
type Tweak = Box<dyn Fn(&mut Config)>;

/// Request headers as the tests send them.
type Headers = Vec<(&'static str, String)>;

fn now() -> i64 {
    chrono::Utc::now().timestamp()
}

/// What ingest produced to the login topic.
async fn produced(h: &Harness, expected: usize) -> Vec<Output> {
    read_topics(
        &h.config.kafka.brokers,
        std::slice::from_ref(&h.config.topics.login),
        expected,
    )
    .await
}

fn keys() -> SourceKeys {
    SourceKeys::new([SigningKey::resolve("k1", &Secret::new(SOURCE_KEY), "test").expect("key")])
}

/// Each produced message is signed by its endpoint and decodes as one normalized login.
fn logins_of(messages: &[Output], source: &str) -> Vec<LoginEvent> {
    messages
        .iter()
        .map(|m| {
            assert_eq!(
                keys().check(&m.header_list, m.key.as_deref(), Some(&m.value)),
                SourceCheck::Verified(source.into()),
                "signed by {source}"
            );
            let events = LoginEvent::decode(Some(&m.value), 1 << 20).expect("a normalized login");
            assert_eq!(m.key.as_deref(), Some(events.partition_key().as_bytes()));
            events
        })
        .collect()
}

/// A file of `tests/fixtures/`.
pub fn fixture(path: &str) -> Vec<u8> {
    std::fs::read(format!(
        "{}/tests/fixtures/{path}",
        env!("CARGO_MANIFEST_DIR")
    ))
    .expect("fixture")
}

#[tokio::test]
async fn a_clerk_signed_delivery_becomes_one_signed_normalized_login() {
    let h = Harness::with(with_ingest).await;
    let server = IngestServer::start(&h.config).await;
    let body = fixture("clerk/user-created.json");
    let (status, reply, _) = server
        .post(
            "clerk-prod",
            &svix_headers(CLERK_SECRET, "msg_e2e_1", now(), &body),
            &body,
        )
        .await;
    assert_eq!(status, 200, "{reply}");
    assert!(reply.contains("\"accepted\":1"), "{reply}");
    let messages = produced(&h, 1).await;
    assert_eq!(messages.len(), 1);
    let logins = logins_of(&messages, "clerk-prod");
    assert_eq!(
        logins[0].event_id, "clerk:msg_e2e_1",
        "the delivery id is the de-duplication id"
    );
    assert_eq!(logins[0].provider, "clerk");
    // The same as the worker's own adapter reads from the raw delivery.
    let headers = vec![("svix-id".to_string(), b"msg_e2e_1".to_vec())];
    let direct = decode_login_message(
        RawMessage {
            value: Some(&body),
            headers: &headers,
            timestamp: None,
        },
        1 << 20,
    )
    .expect("adapter");
    assert_eq!(logins[0].subject, direct[0].subject);
    assert_eq!(logins[0].email, direct[0].email);
    assert_eq!(logins[0].email_verified, direct[0].email_verified);
    server.stop().await;
}

#[tokio::test]
async fn bad_signatures_get_401_and_produce_nothing_and_a_rotated_secret_is_accepted() {
    let h = Harness::with(with_ingest).await;
    let server = IngestServer::start(&h.config).await;
    let body = fixture("clerk/session-created.json");
    let wrong = "whsec_dGhpcyBpcyBub3QgdGhlIHNlY3JldCBhdCBhbGwh";
    let mut tampered = body.clone();
    tampered.extend_from_slice(b" ");
    let cases: Vec<(&str, Headers, Vec<u8>)> = vec![
        (
            "wrong secret",
            svix_headers(wrong, "msg_a", now(), &body),
            body.clone(),
        ),
        (
            "stale timestamp",
            svix_headers(CLERK_SECRET, "msg_b", now() - 301, &body),
            body.clone(),
        ),
        (
            "future timestamp",
            svix_headers(CLERK_SECRET, "msg_c", now() + 301, &body),
            body.clone(),
        ),
        (
            "tampered body",
            svix_headers(CLERK_SECRET, "msg_d", now(), &body),
            tampered,
        ),
        ("no signature", vec![], body.clone()),
        (
            "another endpoint's token",
            vec![("authorization", OKTA_SECRET.to_string())],
            body.clone(),
        ),
    ];
    for (what, headers, payload) in &cases {
        let (status, reply, _) = server.post("clerk-prod", headers, payload).await;
        assert_eq!(status, 401, "{what}: {reply}");
        assert!(!reply.contains(CLERK_SECRET), "{what}");
    }
    // A replay of a captured delivery six minutes later is stale too.
    let metrics = server.metrics().await;
    for reason in ["invalid", "stale", "missing"] {
        assert!(
            metrics.contains(&format!("authsync_ingest_signature_failures_total{{endpoint=\"clerk-prod\",reason=\"{reason}\"}}")),
            "{reason}: {metrics}"
        );
    }
    assert!(
        produced(&h, 0).await.is_empty(),
        "a refused request produces nothing"
    );
    // Both secrets of a rotation are accepted (the old one first in the list).
    for (secret, id) in [(CLERK_OLD_SECRET, "msg_old"), (CLERK_SECRET, "msg_new")] {
        let (status, reply, _) = server
            .post("clerk-prod", &svix_headers(secret, id, now(), &body), &body)
            .await;
        assert_eq!(status, 200, "{reply}");
    }
    assert_eq!(produced(&h, 2).await.len(), 2);
    server.stop().await;
}

#[tokio::test]
async fn workos_okta_and_auth0_schemes_split_deliveries_per_identity() {
    let h = Harness::with(with_ingest).await;
    let server = IngestServer::start(&h.config).await;
    let mut expected = 0;

    // WorkOS: `WorkOS-Signature: t=<ms>, v1=<hex>`.
    let body = fixture("workos/authentication-sso-succeeded.json");
    let millis = chrono::Utc::now().timestamp_millis();
    let (status, reply, _) = server
        .post(
            "workos-prod",
            &workos_headers(WORKOS_SECRET, millis, &body),
            &body,
        )
        .await;
    assert_eq!(status, 200, "{reply}");
    expected += 1;
    let (status, _, _) = server
        .post("workos-prod", &workos_headers("nope", millis, &body), &body)
        .await;
    assert_eq!(status, 401);

    // Okta: the one-time verification GET, authenticated like every delivery.
    let challenge = server
        .http
        .get(format!("{}/hooks/okta-prod", server.base))
        .header("authorization", OKTA_SECRET)
        .header("x-okta-verification-challenge", "chal-3b1e")
        .send()
        .await
        .expect("GET");
    assert_eq!(challenge.status().as_u16(), 200);
    assert_eq!(
        serde_json::from_str::<serde_json::Value>(&challenge.text().await.expect("text"))
            .expect("json"),
        serde_json::json!({"verification": "chal-3b1e"})
    );
    let unauthenticated = server
        .http
        .get(format!("{}/hooks/okta-prod", server.base))
        .header("x-okta-verification-challenge", "chal-3b1e")
        .send()
        .await
        .expect("GET");
    assert_eq!(
        unauthenticated.status().as_u16(),
        401,
        "the challenge is not echoed to strangers"
    );

    // Okta: one delivery, several events: one message per login, keyed per user.
    let body = fixture("okta/event-hook-logins.json");
    let (status, reply, _) = server
        .post("okta-prod", &[("authorization", OKTA_SECRET.into())], &body)
        .await;
    assert_eq!(status, 200, "{reply}");
    let okta = decode_login_message(
        RawMessage {
            value: Some(&body),
            headers: &[],
            timestamp: None,
        },
        1 << 20,
    )
    .expect("adapter");
    expected += okta.len();
    assert!(
        reply.contains(&format!("\"accepted\":{}", okta.len()))
            && reply.contains(&format!("\"dropped\":{}", 4 - okta.len())),
        "{reply}"
    );

    // Auth0 log stream: a JSON array, JSON lines (Auth0's default) and one JSON object.
    let batch = fixture("auth0/log-stream-batch.json");
    let entries: Vec<serde_json::Value> = serde_json::from_slice(&batch).expect("array");
    let auth0 = decode_login_message(
        RawMessage {
            value: Some(&batch),
            headers: &[],
            timestamp: None,
        },
        1 << 20,
    )
    .expect("adapter");
    let lines: Vec<u8> = entries
        .iter()
        .map(|e| e.to_string())
        .collect::<Vec<_>>()
        .join("\n")
        .into_bytes();
    for body in [batch.clone(), lines] {
        let (status, reply, _) = server
            .post(
                "auth0-logs",
                &[("authorization", AUTH0_TOKEN.into())],
                &body,
            )
            .await;
        assert_eq!(status, 200, "{reply}");
        assert!(
            reply.contains(&format!("\"accepted\":{}", auth0.len())),
            "{reply}"
        );
        expected += auth0.len();
    }
    let single = serde_json::to_vec(&entries[0]).expect("json");
    let (status, reply, _) = server
        .post(
            "auth0-logs",
            &[("authorization", format!("Bearer {AUTH0_TOKEN}"))],
            &single,
        )
        .await;
    assert_eq!(status, 200, "{reply}");
    expected += 1;

    let messages = produced(&h, expected).await;
    assert_eq!(messages.len(), expected);
    let mut by_source = std::collections::BTreeMap::<String, Vec<Output>>::new();
    for m in messages {
        by_source
            .entry(m.header(SOURCE_HEADER))
            .or_default()
            .push(m);
    }
    let okta_logins = logins_of(&by_source["okta-prod"], "okta-prod");
    let okta_keys: std::collections::BTreeSet<String> =
        okta_logins.iter().map(LoginEvent::partition_key).collect();
    assert_eq!(
        okta_keys.len(),
        2,
        "two Okta users, two keys: {okta_keys:?}"
    );
    let auth0_logins = logins_of(&by_source["auth0-logs"], "auth0-logs");
    let ids: std::collections::BTreeSet<&str> =
        auth0_logins.iter().map(|e| e.event_id.as_str()).collect();
    assert_eq!(
        ids.len(),
        auth0.len(),
        "the array and the lines are the same deliveries: same ids"
    );
    assert!(auth0_logins
        .iter()
        .all(|e| e.event_id.starts_with("auth0:")));
    logins_of(&by_source["workos-prod"], "workos-prod");
    let metrics = server.metrics().await;
    assert!(
        metrics.contains("outcome=\"dropped_not_login\""),
        "{metrics}"
    );
    server.stop().await;
}

#[tokio::test]
async fn secrets_in_provider_payloads_never_reach_kafka() {
    let h = Harness::with(with_ingest).await;
    let server = IngestServer::start(&h.config).await;
    // An Auth0 post-login event forwarded by an Action, with its secrets and request body.
    let mut action: serde_json::Value =
        serde_json::from_slice(&fixture("auth0/post-login.json")).expect("json");
    action["secrets"] = serde_json::json!({"STRIPE_KEY": "sk_live_SECRET_ONE"});
    action["request"]["body"] = serde_json::json!({"password": "SECRET_TWO"});
    let body = serde_json::to_vec(&action).expect("json");
    let (status, reply, _) = server
        .post(
            "auth0-actions",
            &[("authorization", format!("Bearer {FORWARDER_TOKEN}"))],
            &body,
        )
        .await;
    assert_eq!(status, 200, "{reply}");
    // A Firebase blocking event with OAuth tokens and the password hash.
    let mut firebase: serde_json::Value =
        serde_json::from_slice(&fixture("firebase/before-sign-in.json")).expect("json");
    firebase["credential"] = serde_json::json!({"idToken": "SECRET_THREE", "accessToken": "SECRET_FOUR", "refreshToken": "SECRET_FIVE", "signInMethod": "password"});
    firebase["data"]["passwordHash"] = serde_json::json!("SECRET_SIX");
    firebase["data"]["passwordSalt"] = serde_json::json!("SECRET_SEVEN");
    let body = serde_json::to_vec(&firebase).expect("json");
    let (status, reply, _) = server
        .post(
            "firebase-fwd",
            &[("authorization", FORWARDER_TOKEN.into())],
            &body,
        )
        .await;
    assert_eq!(status, 200, "{reply}");
    // A delivery the adapter cannot read goes on to be dead-lettered, without its secrets.
    let broken = serde_json::json!({"user": {"user_id": 42}, "transaction": {"id": "t"}, "secrets": {"K": "SECRET_EIGHT"}});
    let (status, reply, _) = server
        .post(
            "auth0-actions",
            &[("authorization", FORWARDER_TOKEN.into())],
            broken.to_string().as_bytes(),
        )
        .await;
    assert_eq!(status, 200, "{reply}");
    assert!(reply.contains("\"undecodable\":1"), "{reply}");

    let messages = produced(&h, 3).await;
    assert_eq!(messages.len(), 3);
    for m in &messages {
        let text = String::from_utf8_lossy(&m.value);
        let headers = format!("{:?}", m.header_list);
        for secret in ["SECRET_", "sk_live", FORWARDER_TOKEN] {
            assert!(
                !text.contains(secret) && !headers.contains(secret),
                "{secret} in {text} {headers}"
            );
        }
    }
    server.stop().await;
}

#[tokio::test]
async fn the_broker_down_means_503_then_the_retried_delivery_is_applied_once() {
    let mut h = Harness::with(with_ingest).await;
    h.start().await;
    let server = IngestServer::start(&h.config).await;
    let body = fixture("clerk/user-created.json");
    let cluster = h.cluster.as_ref().expect("mock cluster");
    cluster.broker_down(1).expect("broker down");
    let (status, reply, headers) = server
        .post(
            "clerk-prod",
            &svix_headers(CLERK_SECRET, "msg_outage", now(), &body),
            &body,
        )
        .await;
    assert_eq!(status, 503, "{reply}");
    assert_eq!(
        headers.get("retry-after").and_then(|v| v.to_str().ok()),
        Some("5")
    );
    cluster.broker_up(1).expect("broker up");
    // The provider retries (a new signature, the same delivery id) until it is accepted.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    loop {
        let (status, reply, _) = server
            .post(
                "clerk-prod",
                &svix_headers(CLERK_SECRET, "msg_outage", now(), &body),
                &body,
            )
            .await;
        if status == 200 {
            break;
        }
        assert_eq!(status, 503, "{reply}");
        assert!(
            tokio::time::Instant::now() < deadline,
            "still 503 after recovery"
        );
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    // And once more, as Svix does when it missed the answer: the inbox absorbs it.
    let (status, _, _) = server
        .post(
            "clerk-prod",
            &svix_headers(CLERK_SECRET, "msg_outage", now(), &body),
            &body,
        )
        .await;
    assert_eq!(status, 200);
    let outputs = h.outputs(2).await;
    let types: Vec<String> = outputs.iter().map(Output::event_type).collect();
    assert_eq!(
        types.iter().filter(|t| *t == "user.signed_up").count(),
        1,
        "{types:?}"
    );
    assert_eq!(
        types.iter().filter(|t| *t == "user.synced").count(),
        1,
        "{types:?}"
    );
    assert_eq!(h.db.count("SELECT count(*) FROM users").await, 1);
    server.stop().await;
    h.stop().await;
}

#[tokio::test]
async fn limits_unknown_endpoints_and_cloudevents_modes() {
    let h = Harness::with(with_ingest).await;
    let server = IngestServer::start(&h.config).await;
    let auth = [("authorization", FORWARDER_TOKEN.to_string())];
    let big = vec![b' '; 64 * 1024 + 1];
    assert_eq!(server.post("acme-events", &auth, &big).await.0, 413);
    assert_eq!(server.post("no-such-endpoint", &auth, b"{}").await.0, 404);

    let login = |id: &str, provider: &str, subject: &str| {
        serde_json::json!({"specversion": "1.0", "id": id, "source": "acme-idp", "type": "auth.login",
            "time": "2026-01-01T00:00:00Z", "data": {"provider": provider, "subject": subject, "isEmailVerified": true, "email": format!("{subject}@example.com")}})
    };
    // Structured.
    let mut headers = auth.to_vec();
    headers.push(("content-type", "application/cloudevents+json".into()));
    let (status, reply, _) = server
        .post(
            "acme-events",
            &headers,
            login("ce-1", "acme", "u1").to_string().as_bytes(),
        )
        .await;
    assert_eq!(status, 200, "{reply}");
    // Batch.
    let mut batch_headers = auth.to_vec();
    batch_headers.push(("content-type", "application/cloudevents-batch+json".into()));
    let batch = serde_json::json!([login("ce-2", "acme", "u2"), login("ce-3", "acme", "u3")]);
    let (status, reply, _) = server
        .post("acme-events", &batch_headers, batch.to_string().as_bytes())
        .await;
    assert_eq!(status, 200, "{reply}");
    assert!(reply.contains("\"accepted\":2"), "{reply}");
    // Binary: attributes in `ce-*` headers, the body is `data`.
    let mut binary = auth.to_vec();
    for (k, v) in [
        ("ce-specversion", "1.0"),
        ("ce-id", "ce-4"),
        ("ce-source", "acme-idp"),
        ("ce-type", "auth.login"),
        ("ce-time", "2026-01-01T00:00:00Z"),
        ("content-type", "application/json"),
    ] {
        binary.push((k, v.to_string()));
    }
    let (status, reply, _) = server
        .post(
            "acme-events",
            &binary,
            br#"{"provider":"acme","subject":"u4"}"#,
        )
        .await;
    assert_eq!(status, 200, "{reply}");
    // A provider this endpoint may not speak for: refused whole, nothing produced.
    let mixed = serde_json::json!([
        login("ce-5", "acme", "u5"),
        login("ce-6", "okta", "00uVICTIM")
    ]);
    let (status, reply, _) = server
        .post("acme-events", &batch_headers, mixed.to_string().as_bytes())
        .await;
    assert_eq!(status, 403, "{reply}");
    assert_eq!(
        server
            .post("acme-events", &batch_headers, b"{\"not\":\"an array\"}")
            .await
            .0,
        400
    );

    let messages = produced(&h, 4).await;
    let logins = logins_of(&messages, "acme-events");
    let mut ids: Vec<&str> = logins.iter().map(|e| e.event_id.as_str()).collect();
    ids.sort();
    assert_eq!(
        ids,
        ["ce-1", "ce-2", "ce-3", "ce-4"],
        "nothing of the refused batch"
    );
    server.stop().await;
}

#[tokio::test]
async fn ingest_refuses_to_start_without_what_it_needs() {
    let base = {
        let mut c = test_config("127.0.0.1:1", "postgres://unused@127.0.0.1/unused");
        with_ingest(&mut c);
        c
    };
    let cases: Vec<(&str, Tweak)> = vec![
        (
            "signing_key is required",
            Box::new(|c| c.ingest.signing_key = Secret::default()),
        ),
        (
            "at least 32 bytes",
            Box::new(|c| c.ingest.signing_key = Secret::new("short")),
        ),
        (
            "AUTHSYNC_TEST_UNSET_VARIABLE is not set",
            Box::new(|c| {
                c.ingest
                    .endpoints
                    .get_mut("clerk-prod")
                    .expect("endpoint")
                    .secrets = vec![Secret::new("env:AUTHSYNC_TEST_UNSET_VARIABLE")]
            }),
        ),
        (
            "whsec_",
            Box::new(|c| {
                c.ingest
                    .endpoints
                    .get_mut("clerk-prod")
                    .expect("endpoint")
                    .secrets = vec![Secret::new("not base64 !!")]
            }),
        ),
        (
            "ingest.endpoints is empty",
            Box::new(|c| c.ingest.endpoints.clear()),
        ),
    ];
    for (needle, tweak) in cases {
        let mut config = base.clone();
        tweak(&mut config);
        let err = match ingest::start(&config, CancellationToken::new()).await {
            Ok(_) => panic!("started without {needle}"),
            Err(e) => format!("{e:#}"),
        };
        assert!(err.contains(needle), "{needle}: {err}");
        assert!(
            !err.contains(SOURCE_KEY) && !err.contains(CLERK_SECRET),
            "no secret in errors: {err}"
        );
    }
    // A bad endpoint is refused with every configuration load, naming it.
    let mut config = base.clone();
    config
        .ingest
        .endpoints
        .insert("bad name/..".into(), endpoint("clerk", &[CLERK_SECRET]));
    assert!(config
        .validate()
        .unwrap_err()
        .to_string()
        .contains("bad name/.."));
    let mut config = base;
    config
        .ingest
        .endpoints
        .insert("x".into(), endpoint("myidp", &[CLERK_SECRET]));
    assert!(config.validate().unwrap_err().to_string().contains("myidp"));
}

#[tokio::test]
async fn a_standard_webhooks_forwarder_s_delivery_id_is_the_de_duplication_id() {
    let h = Harness::with(with_ingest).await;
    let server = IngestServer::start(&h.config).await;
    let body = fixture("keycloak/login.json");
    // A Keycloak event-listener forwarder signing with `webhook-*` headers, retried once
    // (a new timestamp and signature, the same id, as the specification requires).
    for delay in [0, 1] {
        let hook = standardwebhooks::Webhook::new(CLERK_SECRET).expect("secret");
        let ts = now() + delay;
        let headers = vec![
            ("webhook-id", "msg_kc_1".to_string()),
            ("webhook-timestamp", ts.to_string()),
            (
                "webhook-signature",
                hook.sign("msg_kc_1", ts, &body).expect("sign"),
            ),
        ];
        let (status, reply, _) = server.post("keycloak-fwd", &headers, &body).await;
        assert_eq!(status, 200, "{reply}");
    }
    let messages = produced(&h, 2).await;
    let logins = logins_of(&messages, "keycloak-fwd");
    assert_eq!(logins.len(), 2);
    assert!(
        logins.iter().all(|e| e.event_id == "keycloak:msg_kc_1"),
        "{logins:?}"
    );
    server.stop().await;
}

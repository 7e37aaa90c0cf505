//! The worker believes only what a trusted source signed: unsigned logins are refused by
//! default, edited or re-sourced messages are refused whatever the policy, a source speaks
//! only for its providers, `restricted` applies without linking or role power, and secrets
//! in whatever reaches the topic another way are not dead-lettered with it.

use authsync::config::{Config, Secret, TrustedSourceConfig};
use authsync::events::source::{SigningKey, SIGNATURE_HEADER, SOURCE_HEADER};
use authsync::steps::auth_sync::AuthSync;
use authsync::steps::run_batch;
use serde_json::json;

use crate::helpers::*;
use crate::identity::{role_set, rule, Direct};
use crate::ingest::{svix_headers, with_ingest, IngestServer, CLERK_SECRET, SOURCE_KEY};

fn key() -> SigningKey {
    SigningKey::resolve("k1", &Secret::new(SOURCE_KEY), "test").expect("key")
}

fn signed(source: &str, kafka_key: &str, value: &[u8]) -> Vec<(String, Vec<u8>)> {
    vec![
        (SOURCE_HEADER.into(), source.as_bytes().to_vec()),
        (
            SIGNATURE_HEADER.into(),
            key().sign(source, kafka_key.as_bytes(), value).into_bytes(),
        ),
    ]
}

const T: &str = "2026-03-01T10:00:00Z";

#[tokio::test]
async fn unsigned_logins_are_refused_by_default_and_what_ingest_signs_is_applied() {
    let mut h = Harness::with(with_ingest).await;
    assert_eq!(Config::default().trust.unsigned, "refuse");
    h.start().await;
    // Any producer of the topic, claiming a verified address and admin groups.
    let forged = login(
        "forged-1",
        T,
        json!({"provider": "clerk", "subject": "user_attacker", "email": "ceo@example.com",
               "isEmailVerified": true, "groups": ["admins"]}),
    );
    h.produce("clerk:user_attacker", &forged).await;
    let server = IngestServer::start(&h.config).await;
    let body = crate::ingest::fixture("clerk/user-created.json");
    let now = chrono::Utc::now().timestamp();
    let (status, reply, _) = server
        .post(
            "clerk-prod",
            &svix_headers(CLERK_SECRET, "msg_src_1", now, &body),
            &body,
        )
        .await;
    assert_eq!(status, 200, "{reply}");
    let outputs = h.outputs(3).await;
    let dead: Vec<&Output> = outputs
        .iter()
        .filter(|o| o.topic.ends_with(&h.config.topics.dlq_suffix))
        .collect();
    assert_eq!(dead.len(), 1, "{outputs:?}");
    assert_eq!(dead[0].header("authsync-error-class"), "untrusted_source");
    assert!(
        dead[0]
            .header("authsync-error-reason")
            .contains("no source signature"),
        "{}",
        dead[0].header("authsync-error-reason")
    );
    assert_eq!(dead[0].value, forged, "the refused message is kept whole");
    let types: Vec<String> = outputs.iter().map(Output::event_type).collect();
    assert!(types.contains(&"user.signed_up".to_string()), "{types:?}");
    assert_eq!(h.db.count("SELECT count(*) FROM users").await, 1);
    assert_eq!(
        h.db.count("SELECT count(*) FROM external_identities WHERE subject = 'user_attacker'")
            .await,
        0
    );
    server.stop().await;
    h.stop().await;
}

#[tokio::test]
async fn edited_re_sourced_or_foreign_provider_messages_are_refused_whatever_the_policy() {
    // Even `trusted` (believe unsigned producers) never believes a bad signature.
    let mut d = Direct::new(|c| {
        with_ingest(c);
        c.trust.unsigned = "trusted".into();
    })
    .await;
    let value = login(
        "sig-1",
        T,
        json!({"provider": "clerk", "subject": "user_1", "email": "a@example.com", "isEmailVerified": false}),
    );
    let mut edited: serde_json::Value = serde_json::from_slice(&value).expect("json");
    edited["data"]["isEmailVerified"] = json!(true);
    let edited = serde_json::to_vec(&edited).expect("json");
    let okta = login(
        "sig-2",
        T,
        json!({"provider": "okta", "subject": "00uVICTIM"}),
    );
    let mut other_key = signed("clerk-prod", "", &value);
    other_key[1].1 = SigningKey::resolve("k9", &Secret::new(SOURCE_KEY), "t")
        .expect("key")
        .sign("clerk-prod", b"", &value)
        .into_bytes();
    let cases = [
        (
            "edited value",
            edited.clone(),
            signed("clerk-prod", "", &value),
            "does not match",
        ),
        (
            "re-sourced",
            value.clone(),
            {
                let mut h = signed("clerk-prod", "", &value);
                h[0].1 = b"acme-events".to_vec();
                h
            },
            "does not match",
        ),
        (
            "foreign provider",
            okta.clone(),
            signed("clerk-prod", "", &okta),
            "may not speak for provider `okta`",
        ),
        ("unknown key id", value.clone(), other_key, "key id"),
    ];
    for (what, value, headers, reason) in cases {
        let message = d.message(value, headers);
        let report = run_batch(&d.db.pool, &d.ctx, &AuthSync, &[message])
            .await
            .expect("batch");
        assert_eq!(report.applied, 0, "{what}");
        assert_eq!(
            report.dead_lettered.get("untrusted_source"),
            Some(&1),
            "{what}: {report:?}"
        );
        let header_bytes: Vec<u8> = sqlx::query_scalar(
            "SELECT header_bytes FROM outbox WHERE event_type = 'dead_letter' ORDER BY id DESC LIMIT 1",
        )
        .fetch_one(&d.db.pool)
        .await
        .expect("dead letter row");
        let headers = authsync::store::outbox::unpack_headers(&header_bytes).expect("headers");
        let said = headers
            .iter()
            .find(|(k, _)| k == "authsync-error-reason")
            .map(|(_, v)| String::from_utf8_lossy(v).into_owned())
            .unwrap_or_default();
        assert!(said.contains(reason), "{what}: {said}");
    }
    assert_eq!(d.db.count("SELECT count(*) FROM users").await, 0);
    // The untouched message is applied.
    let message = d.message(value.clone(), signed("clerk-prod", "", &value));
    let report = run_batch(&d.db.pool, &d.ctx, &AuthSync, &[message])
        .await
        .expect("batch");
    assert_eq!(report.applied, 1, "{report:?}");
}

#[tokio::test]
async fn restricted_logins_apply_but_neither_link_nor_grant_roles() {
    let mut d = Direct::new(|c| {
        with_ingest(c);
        c.trust.unsigned = "restricted".into();
        c.trust.sources.insert(
            "okta-prod".into(),
            TrustedSourceConfig {
                providers: vec!["okta".into()],
                email_verified: true,
                groups: true,
            },
        );
        c.identity.role_sets = vec![role_set(
            "force",
            vec![rule("groups", "equals", "admins", "admin")],
        )];
    })
    .await;
    // The victim signed up through a trusted source, with a verified address.
    let victim = login(
        "v-1",
        T,
        json!({"provider": "okta", "subject": "00uVICTIM", "email": "ceo@example.com", "isEmailVerified": true}),
    );
    let message = d.message(victim.clone(), signed("okta-prod", "", &victim));
    let report = run_batch(&d.db.pool, &d.ctx, &AuthSync, &[message])
        .await
        .expect("batch");
    assert_eq!(report.applied, 1);
    // An unsigned producer claims the same verified address and the admins group.
    d.login(
        "a-1",
        "2026-03-01T10:01:00Z",
        json!({"provider": "clerk", "subject": "user_attacker", "email": "ceo@example.com",
               "isEmailVerified": true, "groups": ["admins"],
               "attributes": [{"key": "department", "value": "it"}]}),
    )
    .await;
    let victim_user = d.user_of("okta", "00uVICTIM").await;
    let attacker_user = d.user_of("clerk", "user_attacker").await;
    assert_ne!(
        victim_user, attacker_user,
        "not linked into the victim's account"
    );
    assert!(
        d.roles(attacker_user).await.is_empty(),
        "no role from unsigned groups"
    );
    let verified: bool = sqlx::query_scalar(
        "SELECT email_verified FROM external_identities WHERE provider = 'clerk' AND subject = 'user_attacker'",
    )
        .fetch_one(&d.db.pool)
        .await
        .expect("user");
    assert!(
        !verified,
        "an unsigned claim of verification is not believed"
    );
}

#[tokio::test]
async fn secrets_in_unsigned_payloads_are_not_dead_lettered() {
    let mut h = Harness::with(with_ingest).await;
    h.start().await;
    let mut action: serde_json::Value =
        serde_json::from_slice(&crate::ingest::fixture("auth0/post-login.json")).expect("json");
    action["secrets"] = json!({"STRIPE_KEY": "sk_live_LEAK"});
    action["request"]["body"] = json!({"password": "hunter2-LEAK"});
    let value = serde_json::to_vec(&action).expect("json");
    h.produce_with(
        "auth0:x",
        &value,
        None,
        &[
            ("authsync-provider", b"auth0"),
            ("authorization", b"Bearer LEAK-token"),
        ],
    )
    .await;
    let outputs = h.outputs(1).await;
    let dead = &outputs[0];
    assert_eq!(dead.header("authsync-error-class"), "untrusted_source");
    assert_eq!(dead.header("authsync-dlq-secrets-removed"), "true");
    assert_eq!(
        dead.header("authsync-provider"),
        "auth0",
        "other headers travel on"
    );
    let everything = format!(
        "{:?} {}",
        dead.header_list,
        String::from_utf8_lossy(&dead.value)
    );
    assert!(!everything.contains("LEAK"), "{everything}");
    let kept: serde_json::Value = dead.json();
    assert_eq!(
        kept["user"], action["user"],
        "the rest of the payload is kept"
    );
    h.stop().await;
}

/// A signed login from a source the workers did not list yet is refused and kept; once the
/// source is listed, the redriven copy still verifies (the dead letter kept its bytes and
/// headers) and is applied once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_refused_signed_login_is_applied_by_a_redrive_once_its_source_is_trusted() {
    use authsync::ops::dlq::{self, RedriveRequest};
    let mut h = Harness::with(|c| {
        with_ingest(c);
        c.trust.sources.remove("clerk-prod");
    })
    .await;
    h.start().await;
    let value = login(
        "late-source-1",
        T,
        json!({"provider": "clerk", "subject": "user_late", "email": "late@example.com", "isEmailVerified": true}),
    );
    let headers = signed("clerk-prod", "clerk:user_late", &value);
    let refs: Vec<(&str, &[u8])> = headers
        .iter()
        .map(|(k, v)| (k.as_str(), v.as_slice()))
        .collect();
    h.produce_with("clerk:user_late", &value, None, &refs).await;
    h.wait_handled(1).await;
    h.wait_published().await;
    h.stop().await;
    assert_eq!(h.db.count("SELECT count(*) FROM users").await, 0);
    let dlq_topic = h.config.topics.dlq_for(&h.config.topics.login);
    let letters = dlq::read_all(&h.config, &dlq_topic, None).expect("read");
    assert_eq!(letters.len(), 1);
    assert_eq!(letters[0].class(), "untrusted_source");

    // The fix: list the source.
    h.config.trust.sources.insert(
        "clerk-prod".into(),
        TrustedSourceConfig {
            providers: vec!["clerk".into()],
            email_verified: true,
            groups: true,
        },
    );
    h.start().await;
    let request = RedriveRequest {
        topic: dlq_topic,
        filter_class: Some("untrusted_source".into()),
        limit: None,
        dry_run: false,
    };
    let outcome = dlq::redrive(&h.config, &h.db.pool, &request, false)
        .await
        .expect("redrive");
    assert_eq!(outcome.redriven.get("untrusted_source"), Some(&1));
    wait_for("redriven login applied", || async {
        h.db.count("SELECT count(*) FROM users").await == 1
    })
    .await;
    h.stop().await;
}

//! Identity trust against real Postgres: one test per attack a hostile IdP or producer can
//! try on account linking and roles (issue #18), and same-email convergence on one replica
//! and across two worker processes.

use std::process::{Child, Command, Stdio};
use std::time::Duration;

use authsync::config::ConnectionConfig;
use authsync::steps::auth_sync::AuthSync;
use authsync::steps::merge::AccountMerge;
use authsync::steps::{run_batch, InputMessage};
use serde_json::{json, Value};
use uuid::Uuid;

use crate::helpers::*;
use crate::identity::{role_set, rule, Direct};

const VICTIM: &str = "victim@gmail.test";

/// The victim's account: signed up with Google, address verified.
async fn victim(d: &mut Direct) -> Uuid {
    d.login(
        "victim-signup",
        "2026-05-01T09:00:00Z",
        json!({"provider": "google", "subject": "g-victim", "email": VICTIM,
               "isEmailVerified": true}),
    )
    .await;
    d.user_of("google", "g-victim").await
}

/// An Auth0 post-login event (native payload) through a connection of `strategy`.
fn auth0_post_login(id: &str, user_id: &str, strategy: &str, email: &str) -> Vec<u8> {
    serde_json::to_vec(&json!({
        "specversion": "1.0", "id": id, "source": "auth0:acme",
        "type": "authsync.native.auth0", "time": "2026-05-01T10:00:00Z",
        "data": {
            "authentication": {"methods": [{"name": "federated", "timestamp": "2026-05-01T10:00:00Z"}]},
            "connection": {"id": format!("con_{strategy}"), "name": strategy, "strategy": strategy},
            "tenant": {"id": "acme"},
            "transaction": {"id": format!("tx-{id}")},
            "user": {"user_id": user_id, "email": email, "email_verified": true},
            "secrets": {"API_KEY": "never-stored"}
        }
    }))
    .expect("json")
}

async fn apply(d: &mut Direct, value: Vec<u8>) {
    let message = d.message(value, vec![]);
    let report = run_batch(&d.db.pool, &d.ctx, &AuthSync, &[message])
        .await
        .expect("batch applies");
    assert_eq!(report.applied, 1, "{report:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_enterprise_connection_asserting_a_victims_address_is_not_linked() {
    let mut d = Direct::new(|_| {}).await;
    let victim = victim(&mut d).await;
    // The default configuration, an Auth0 tenant whose SAML / ADFS / Azure AD connection a
    // customer administers: each asserts the victim's address as verified.
    for (i, strategy) in ["samlp", "adfs", "waad"].iter().enumerate() {
        let id = format!("attack-{strategy}");
        apply(
            &mut d,
            auth0_post_login(&id, &format!("{strategy}|attacker{i}"), strategy, VICTIM),
        )
        .await;
        let synced = d.synced(&format!("auth0:{id}")).await;
        assert_eq!(
            synced["data"]["linking"],
            json!({"skipped": "connection_not_trusted"}),
            "{strategy}"
        );
        assert_ne!(
            d.user_of("auth0", &format!("{strategy}|attacker{i}")).await,
            victim,
            "{strategy}: not linked into the victim's account"
        );
    }
    assert_eq!(
        d.db.count(&format!(
            "SELECT count(*) FROM external_identities WHERE user_id = '{victim}'"
        ))
        .await,
        1,
        "the victim's account gained no identity"
    );
    // A database connection of the same tenant is the provider's own check: it links.
    apply(
        &mut d,
        auth0_post_login("db-login", "auth0|kim", "auth0", VICTIM),
    )
    .await;
    assert_eq!(d.user_of("auth0", "auth0|kim").await, victim);
    // And the secrets the Action's event carried were never stored.
    assert_eq!(
        d.db.count(
            "SELECT count(*) FROM outbox WHERE convert_from(payload, 'UTF8') LIKE '%never-stored%'"
        )
        .await,
        0
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_allow_listed_enterprise_connection_links() {
    let mut d = Direct::new(|c| {
        c.identity.connections = vec![ConnectionConfig {
            provider: "auth0".into(),
            connection: "con_samlp".into(),
            link: Some(true),
            ..ConnectionConfig::default()
        }]
    })
    .await;
    let victim = victim(&mut d).await;
    apply(
        &mut d,
        auth0_post_login("corp", "samlp|kim", "samlp", VICTIM),
    )
    .await;
    assert_eq!(d.user_of("auth0", "samlp|kim").await, victim);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_untrusted_sign_up_never_captures_a_later_verified_login() {
    let mut d = Direct::new(|_| {}).await;
    // The attacker signs up first through an enterprise connection claiming the address.
    apply(
        &mut d,
        auth0_post_login("squat", "samlp|attacker", "samlp", VICTIM),
    )
    .await;
    let squatter = d.user_of("auth0", "samlp|attacker").await;
    // The real owner arrives with a verified Google login: not linked to the squatter.
    d.login(
        "owner",
        "2026-05-01T11:00:00Z",
        json!({"provider": "google", "subject": "g-owner", "email": VICTIM,
               "isEmailVerified": true}),
    )
    .await;
    let synced = d.synced("owner").await;
    assert_eq!(
        synced["data"]["linking"],
        json!({"skipped": "target_email_unverified"})
    );
    assert_ne!(d.user_of("google", "g-owner").await, squatter);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_historical_address_stops_being_a_link_target() {
    let mut d = Direct::new(|_| {}).await;
    let old = victim(&mut d).await;
    // The Google identity moves to another address: the old one is no longer asserted.
    d.login(
        "moved",
        "2026-05-02T09:00:00Z",
        json!({"provider": "google", "subject": "g-victim", "email": "new@gmail.test",
               "isEmailVerified": true}),
    )
    .await;
    d.login(
        "recycled",
        "2026-05-03T09:00:00Z",
        json!({"provider": "github", "subject": "gh-new-holder", "email": VICTIM,
               "isEmailVerified": true}),
    )
    .await;
    assert_ne!(d.user_of("github", "gh-new-holder").await, old);
    assert_eq!(d.synced("recycled").await["data"]["didSignUp"], true);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn same_email_first_logins_in_one_batch_become_one_user() {
    let mut d = Direct::new(|_| {}).await;
    let messages: Vec<InputMessage> = [("google", "g-1"), ("github", "gh-1"), ("apple", "a-1")]
        .iter()
        .map(|(provider, subject)| {
            let value = login(
                &format!("batch-{provider}"),
                "2026-05-01T10:00:00Z",
                json!({"provider": provider, "subject": subject, "email": "one@x.test",
                       "isEmailVerified": true}),
            );
            d.message(value, vec![])
        })
        .collect();
    let report = run_batch(&d.db.pool, &d.ctx, &AuthSync, &messages)
        .await
        .expect("batch applies");
    assert_eq!((report.applied, report.signed_up), (3, 1), "{report:?}");
    let user = d.user_of("google", "g-1").await;
    assert_eq!(d.user_of("github", "gh-1").await, user);
    assert_eq!(d.user_of("apple", "a-1").await, user);
    assert_eq!(
        d.synced("batch-github").await["data"]["linking"],
        json!({"linked": {"by": "verified_email"}})
    );
}

/// Applies one message on its own connection, retrying what the consumer would retry.
async fn apply_retrying(d: &Direct, message: InputMessage) {
    for _ in 0..50 {
        match run_batch(
            &d.db.pool,
            &d.ctx,
            &AuthSync,
            std::slice::from_ref(&message),
        )
        .await
        {
            Ok(_) => return,
            Err(e) if e.is_retryable() => tokio::time::sleep(Duration::from_millis(20)).await,
            Err(e) => panic!("batch failed: {e}"),
        }
    }
    panic!("batch never applied");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_same_email_first_logins_become_one_user() {
    let mut d = Direct::new(|_| {}).await;
    for i in 0..20 {
        let email = format!("pair{i}@x.test");
        let a = d.message(
            login(
                &format!("pa-{i}"),
                "2026-05-01T10:00:00Z",
                json!({"provider": "google", "subject": format!("g{i}"), "email": email,
                       "isEmailVerified": true}),
            ),
            vec![],
        );
        let b = d.message(
            login(
                &format!("pb-{i}"),
                "2026-05-01T10:00:00Z",
                json!({"provider": "github", "subject": format!("gh{i}"), "email": email,
                       "isEmailVerified": true}),
            ),
            vec![],
        );
        tokio::join!(apply_retrying(&d, a), apply_retrying(&d, b));
        assert_eq!(
            d.user_of("google", &format!("g{i}")).await,
            d.user_of("github", &format!("gh{i}")).await,
            "pair {i}"
        );
    }
    assert_eq!(d.db.count("SELECT count(*) FROM users").await, 20);
}

struct Worker(Child);

impl Drop for Worker {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// `authsync run` on its own login topic and group, sharing the database.
fn spawn_worker(brokers: &str, db: &TestDb, login_topic: &str, out_topic: &str) -> Worker {
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("free port");
    let child = Command::new(env!("CARGO_BIN_EXE_authsync"))
        .args(["run", "--create-topics"])
        .env("AUTHSYNC_KAFKA_BROKERS", brokers)
        .env("AUTHSYNC_KAFKA_GROUP_ID", random_name("trust"))
        .env("AUTHSYNC_DATABASE_URL", &db.url)
        .env("AUTHSYNC_HTTP_LISTEN", format!("127.0.0.1:{port}"))
        // This producer stands in for a cluster whose ACLs admit only trusted producers.
        .env("AUTHSYNC_TRUST_UNSIGNED", "trusted")
        .env("AUTHSYNC_TOPICS_LOGIN", login_topic)
        .env("AUTHSYNC_TOPICS_MERGE", format!("{login_topic}.merge"))
        .env("AUTHSYNC_TOPICS_USER_EVENTS", out_topic)
        .env("AUTHSYNC_TOPICS_PARTITIONS", "3")
        .env("AUTHSYNC_LOG_LEVEL", "warn")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("spawn authsync");
    Worker(child)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn same_email_first_logins_on_two_processes_become_one_user() {
    let Some(brokers) = real_brokers() else {
        return;
    };
    let db = TestDb::new().await;
    let suffix = Uuid::new_v4().simple().to_string();
    // Two worker processes, each with its own login topic (so each surely applies its
    // half, whatever the group assignment), writing one database.
    let topics = [
        format!("auth.login.a.{suffix}"),
        format!("auth.login.b.{suffix}"),
    ];
    let out = format!("auth.user-events.{suffix}");
    let _workers: Vec<Worker> = topics
        .iter()
        .map(|t| spawn_worker(&brokers, &db, t, &out))
        .collect();
    let producer = producer(&brokers);
    const PAIRS: usize = 40;
    for i in 0..PAIRS {
        for (topic, provider) in topics.iter().zip(["google", "github"]) {
            let subject = format!("{provider}-{i}");
            let value = login(
                &format!("{provider}-{i}-{suffix}"),
                "2026-05-01T10:00:00Z",
                json!({"provider": provider, "subject": subject, "email": format!("p{i}@x.test"),
                       "isEmailVerified": true}),
            );
            produce_to(
                &producer,
                topic,
                &format!("{provider}:{subject}"),
                &value,
                None,
                &[],
            )
            .await;
        }
    }
    let deadline = std::time::Instant::now() + Duration::from_secs(120);
    while db.count("SELECT count(*) FROM external_identities").await < (PAIRS * 2) as i64 {
        assert!(
            std::time::Instant::now() < deadline,
            "workers did not apply every login"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let split = db
        .count(
            "SELECT count(*) FROM (SELECT email FROM external_identities GROUP BY email
             HAVING count(DISTINCT user_id) > 1) s",
        )
        .await;
    assert_eq!(split, 0, "an address ended up on two users");
    assert_eq!(db.count("SELECT count(*) FROM users").await, PAIRS as i64);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_customer_connection_group_named_admins_grants_no_global_role() {
    let acme = Uuid::new_v4();
    let mut d = Direct::new(|c| {
        c.identity.role_sets = vec![role_set(
            "force",
            vec![rule("connection.groups", "equals", "Admins", "admin")],
        )];
        c.identity.connections = vec![ConnectionConfig {
            provider: "auth0".into(),
            connection: "con_acme".into(),
            organization: Some(acme.to_string()),
            ..ConnectionConfig::default()
        }];
    })
    .await;
    for (id, connection) in [("evil", "con_evil"), ("acme", "con_acme")] {
        d.login(
            id,
            "2026-05-01T10:00:00Z",
            json!({"provider": "auth0", "subject": format!("samlp|{id}"),
                   "connection": {"connectionId": connection, "kind": "enterprise",
                                  "groups": ["Admins"]}}),
        )
        .await;
    }
    let grants = |user: Uuid| {
        let pool = d.db.pool.clone();
        async move {
            sqlx::query_as::<_, (String, Uuid)>(
                "SELECT DISTINCT role, organization_id FROM user_roles WHERE user_id = $1",
            )
            .bind(user)
            .fetch_all(&pool)
            .await
            .expect("roles")
        }
    };
    let evil = d.user_of("auth0", "samlp|evil").await;
    assert!(grants(evil).await.is_empty(), "no organization, no role");
    let member = d.user_of("auth0", "samlp|acme").await;
    assert_eq!(
        grants(member).await,
        [("admin".to_string(), acme)],
        "admin of its own organization only, never global"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_connection_only_login_revokes_nothing_and_force_spares_other_grants() {
    let mut d = Direct::new(|c| {
        let mut set = role_set(
            "force",
            vec![rule("connection.groups", "equals", "staff", "staff")],
        );
        set.allow_global = true;
        c.identity.role_sets = vec![set];
    })
    .await;
    d.login(
        "c1",
        "2026-05-01T10:00:00Z",
        json!({"provider": "keycloak", "subject": "k1",
               "connection": {"connectionId": "corp", "groups": ["staff"]}}),
    )
    .await;
    let user = d.user_of("keycloak", "k1").await;
    sqlx::query("INSERT INTO user_roles (user_id, role) VALUES ($1, 'auditor')")
        .bind(user)
        .execute(&d.db.pool)
        .await
        .expect("hand grant");
    // A brokered login that names the connection but gives no groups.
    d.login(
        "c2",
        "2026-05-01T11:00:00Z",
        json!({"provider": "keycloak", "subject": "k1", "connection": {"connectionId": "corp"}}),
    )
    .await;
    assert_eq!(d.roles(user).await, ["auditor", "staff"]);
    // The IdP now says the groups are empty: only the set's own grant goes.
    d.login(
        "c3",
        "2026-05-01T12:00:00Z",
        json!({"provider": "keycloak", "subject": "k1",
               "connection": {"connectionId": "corp", "groups": []}}),
    )
    .await;
    assert_eq!(d.roles(user).await, ["auditor"], "the hand grant stays");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_session_before_its_user_created_keeps_the_address() {
    let mut d = Direct::new(|_| {}).await;
    let fixture = |name: &str| -> (Vec<u8>, Vec<(String, Vec<u8>)>) {
        let dir = format!("{}/tests/fixtures/clerk", env!("CARGO_MANIFEST_DIR"));
        let value = std::fs::read(format!("{dir}/{name}.json")).expect("fixture");
        let headers: Value = serde_json::from_slice(
            &std::fs::read(format!("{dir}/{name}.headers.json")).expect("headers"),
        )
        .expect("headers json");
        let headers = headers
            .as_object()
            .expect("object")
            .iter()
            .map(|(k, v)| {
                (
                    k.clone(),
                    v.as_str().unwrap_or_default().as_bytes().to_vec(),
                )
            })
            .collect();
        (value, headers)
    };
    // Clerk delivers `session.created` (later, no profile) before `user.created` (earlier).
    for name in ["session-created", "user-created"] {
        let (value, headers) = fixture(name);
        let message = d.message(value, headers);
        run_batch(&d.db.pool, &d.ctx, &AuthSync, &[message])
            .await
            .expect("applies");
    }
    let (email, verified, given): (Option<String>, bool, Option<String>) = sqlx::query_as(
        "SELECT u.email, ue.verified_at IS NOT NULL, u.given_name FROM users u
         LEFT JOIN user_emails ue ON ue.user_id = u.id AND ue.email = u.email",
    )
    .fetch_one(&d.db.pool)
    .await
    .expect("user");
    assert_eq!(email.as_deref(), Some("lin.wei@example.com"));
    assert!(verified, "the verified flag arrived with its address");
    assert_eq!(given.as_deref(), Some("Lin"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_revocation_carried_by_an_older_event_is_applied() {
    let mut d = Direct::new(|c| {
        let mut set = role_set("force", vec![rule("groups", "equals", "admins", "admin")]);
        set.providers = vec!["okta".into()];
        c.identity.role_sets = vec![set];
    })
    .await;
    d.login(
        "o1",
        "2026-05-01T08:00:00Z",
        json!({"provider": "okta", "subject": "o1", "email": "ada@x.test",
               "isEmailVerified": true, "groups": ["admins"]}),
    )
    .await;
    let user = d.user_of("okta", "o1").await;
    assert_eq!(d.roles(user).await, ["admin"]);
    // A second identity of the user logs in later with a new profile ...
    d.login(
        "g1",
        "2026-05-01T12:00:00Z",
        json!({"provider": "google", "subject": "g1", "email": "ada@x.test",
               "isEmailVerified": true, "displayName": "Ada"}),
    )
    .await;
    assert_eq!(d.user_of("google", "g1").await, user);
    // ... then Okta's 10:00 event arrives: the user left `admins`. It is older than the
    // profile, but nothing newer set this identity's groups: the revocation applies.
    d.login(
        "o2",
        "2026-05-01T10:00:00Z",
        json!({"provider": "okta", "subject": "o1", "groups": []}),
    )
    .await;
    assert!(d.roles(user).await.is_empty(), "admin revoked");
    let changed = d
        .result("o2", "user.roles_changed")
        .await
        .expect("announced");
    assert_eq!(changed["data"]["after"], json!([]));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_kelvin_sign_address_is_not_linked_to_the_ascii_one() {
    let mut d = Direct::new(|_| {}).await;
    d.login(
        "kim",
        "2026-05-01T09:00:00Z",
        json!({"provider": "google", "subject": "g-kim", "email": "kim@example.test",
               "isEmailVerified": true}),
    )
    .await;
    let kim = d.user_of("google", "g-kim").await;
    d.login(
        "kelvin",
        "2026-05-01T10:00:00Z",
        json!({"provider": "github", "subject": "gh-k", "email": "\u{212A}im@Example.TEST",
               "isEmailVerified": true}),
    )
    .await;
    // Without Unicode case folding the two addresses differ: an ordinary sign-up.
    assert_ne!(d.user_of("github", "gh-k").await, kim);
    assert!(d.synced("kelvin").await["data"].get("linking").is_none());
    // A non-ASCII local part never links, not even to the same spelling.
    d.login(
        "kelvin-2",
        "2026-05-01T11:00:00Z",
        json!({"provider": "apple", "subject": "a-k", "email": "\u{212A}im@example.test",
               "isEmailVerified": true}),
    )
    .await;
    assert_eq!(
        d.synced("kelvin-2").await["data"]["linking"],
        json!({"skipped": "address_not_linkable"})
    );
    assert_ne!(
        d.user_of("apple", "a-k").await,
        d.user_of("github", "gh-k").await
    );
    let stored: String = sqlx::query_scalar(
        "SELECT email FROM external_identities WHERE provider = 'github' AND subject = 'gh-k'",
    )
    .fetch_one(&d.db.pool)
    .await
    .expect("identity");
    assert_eq!(stored, "\u{212A}im@example.test", "no Unicode folding");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn provider_names_are_case_insensitive() {
    let mut d = Direct::new(|_| {}).await;
    for (id, provider) in [("c1", "okta"), ("c2", "Okta"), ("c3", " OKTA ")] {
        d.login(
            id,
            "2026-05-01T10:00:00Z",
            json!({"provider": provider, "subject": "00u1"}),
        )
        .await;
    }
    assert_eq!(d.db.count("SELECT count(*) FROM users").await, 1);
}

fn merge_request(id: &str, old: Uuid, new: Uuid) -> Vec<u8> {
    crate::merge::merge_event(id, old, new)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_merge_into_a_deactivated_user_is_refused() {
    let mut d = Direct::new(|_| {}).await;
    for s in ["a", "b"] {
        d.login(
            s,
            "2026-05-01T10:00:00Z",
            json!({"provider": "p", "subject": s}),
        )
        .await;
    }
    let (a, b) = (d.user_of("p", "a").await, d.user_of("p", "b").await);
    sqlx::query("UPDATE users SET lifecycle_state = 'deactivated' WHERE id = $1")
        .bind(b)
        .execute(&d.db.pool)
        .await
        .expect("deactivate");
    let mut message = d.message(merge_request("m-dead", a, b), vec![]);
    message.topic = "auth.merge.v1".into();
    let report = run_batch(&d.db.pool, &d.ctx, &AccountMerge, &[message])
        .await
        .expect("batch");
    assert_eq!(
        report.dead_lettered.get("target_not_active").copied(),
        Some(1),
        "{report:?}"
    );
    assert_eq!(
        d.db.count(&format!(
            "SELECT count(*) FROM users WHERE id = '{a}' AND lifecycle_state = 'active'"
        ))
        .await,
        1,
        "nothing moved"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_merged_identity_keeps_its_clocks_on_the_survivor() {
    let mut d = Direct::new(|_| {}).await;
    d.login(
        "a-new",
        "2026-05-01T10:00:00Z",
        json!({"provider": "p", "subject": "a", "email": "a-new@x.test", "groups": ["g2"]}),
    )
    .await;
    d.login(
        "b",
        "2026-05-01T10:00:00Z",
        json!({"provider": "p", "subject": "b"}),
    )
    .await;
    let (a, b) = (d.user_of("p", "a").await, d.user_of("p", "b").await);
    let mut message = d.message(merge_request("m-clocks", a, b), vec![]);
    message.topic = "auth.merge.v1".into();
    let report = run_batch(&d.db.pool, &d.ctx, &AccountMerge, &[message])
        .await
        .expect("merge");
    assert_eq!(report.applied, 1, "{report:?}");
    // An older event of the moved identity arrives late: still older on the survivor.
    d.login(
        "a-old",
        "2026-05-01T09:00:00Z",
        json!({"provider": "p", "subject": "a", "email": "a-old@x.test", "groups": ["g1"]}),
    )
    .await;
    assert_eq!(d.user_of("p", "a").await, b);
    let (email, groups): (Option<String>, Vec<String>) = sqlx::query_as(
        "SELECT email, groups FROM external_identities WHERE provider = 'p' AND subject = 'a'",
    )
    .fetch_one(&d.db.pool)
    .await
    .expect("identity");
    assert_eq!(email.as_deref(), Some("a-new@x.test"));
    assert_eq!(groups, ["g2"]);
}

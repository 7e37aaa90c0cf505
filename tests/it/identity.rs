//! Identity depth against real Postgres: group → role mapping, `$sync` claims (attributes,
//! connection, custom UPNs, devices), and safe account linking. Most tests drive the step
//! directly (the batch transaction the pipeline runs); one goes through the Kafka protocol.

use authsync::config::{Config, RoleRuleConfig, RoleSetConfig};
use authsync::domain::ids;
use authsync::steps::auth_sync::AuthSync;
use authsync::steps::{run_batch, InputMessage, StepContext};
use serde_json::{json, Value};
use uuid::Uuid;

use crate::helpers::*;

/// The auth-sync step on a database of its own, one message per batch.
pub struct Direct {
    pub db: TestDb,
    pub ctx: StepContext,
    offset: i64,
}

impl Direct {
    pub async fn new(tweak: impl FnOnce(&mut Config)) -> Self {
        let db = TestDb::new().await;
        let mut config = test_config("unused:9092", &db.url);
        tweak(&mut config);
        config.validate().expect("valid config");
        let ctx = StepContext::from_config(&config).expect("identity policy compiles");
        Self { db, ctx, offset: 0 }
    }

    pub async fn login(&mut self, id: &str, time: &str, data: Value) {
        let message = self.message(login(id, time, data), vec![]);
        let report = run_batch(&self.db.pool, &self.ctx, &AuthSync, &[message])
            .await
            .expect("batch applies");
        assert_eq!(report.applied, 1, "{id} applied: {report:?}");
    }

    /// The next message of the login topic (partition 0).
    pub fn message(&mut self, value: Vec<u8>, headers: Vec<(String, Vec<u8>)>) -> InputMessage {
        self.offset += 1;
        InputMessage {
            topic: "auth.login.v1".into(),
            partition: 0,
            offset: self.offset,
            key: None,
            value: Some(value),
            headers,
            timestamp: None,
        }
    }

    /// The result event of `event_type` that input `cause` produced, if any.
    pub async fn result(&self, cause: &str, event_type: &str) -> Option<Value> {
        let id = ids::result_event_id(cause, event_type);
        let payload: Option<Vec<u8>> =
            sqlx::query_scalar("SELECT payload FROM outbox WHERE event_id = $1")
                .bind(id)
                .fetch_optional(&self.db.pool)
                .await
                .expect("outbox read");
        payload.map(|p| {
            let event: Value = serde_json::from_slice(&p).expect("result is JSON");
            assert_matches_schema(&event);
            event
        })
    }

    pub async fn synced(&self, cause: &str) -> Value {
        self.result(cause, "user.synced")
            .await
            .unwrap_or_else(|| panic!("no user.synced for {cause}"))
    }

    pub async fn user_of(&self, provider: &str, subject: &str) -> Uuid {
        sqlx::query_scalar(
            "SELECT user_id FROM external_identities WHERE provider = $1 AND subject = $2",
        )
        .bind(provider)
        .bind(subject)
        .fetch_one(&self.db.pool)
        .await
        .expect("identity exists")
    }

    pub async fn roles(&self, user: Uuid) -> Vec<String> {
        sqlx::query_scalar("SELECT DISTINCT role FROM user_roles WHERE user_id = $1 ORDER BY role")
            .bind(user)
            .fetch_all(&self.db.pool)
            .await
            .expect("roles")
    }
}

pub fn rule(claim: &str, kind: &str, value: &str, role: &str) -> RoleRuleConfig {
    RoleRuleConfig {
        name: None,
        claim: claim.into(),
        match_kind: kind.into(),
        value: value.into(),
        role: role.into(),
        organization: None,
    }
}

pub fn role_set(mode: &str, rules: Vec<RoleRuleConfig>) -> RoleSetConfig {
    RoleSetConfig {
        name: format!("{mode}-set"),
        mode: mode.into(),
        providers: Vec::new(),
        connections: Vec::new(),
        allow_global: false,
        rules,
    }
}

fn names(roles: &Value) -> Vec<String> {
    roles
        .as_array()
        .expect("array")
        .iter()
        .map(|r| r["name"].as_str().expect("name").to_string())
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn force_rules_grant_and_revoke_roles_and_require_a_token_refresh() {
    let mut d = Direct::new(|c| {
        c.identity.role_sets = vec![role_set(
            "force",
            vec![
                rule("groups", "equals", "admins", "admin"),
                rule("groups", "prefix", "eng-", "engineer"),
            ],
        )];
    })
    .await;
    d.login(
        "r1",
        "2026-05-01T10:00:00Z",
        json!({"provider": "okta", "subject": "u1", "groups": ["admins"]}),
    )
    .await;
    let user = d.user_of("okta", "u1").await;
    assert_eq!(d.roles(user).await, ["admin"]);
    let first = d.synced("r1").await;
    assert_eq!(first["data"]["didSignUp"], true);
    assert_eq!(
        first["data"]["tokenRefreshRequired"], false,
        "a sign-up's first token is issued after it"
    );
    assert_eq!(names(&first["data"]["user"]["roles"]), ["admin"]);
    let granted = d
        .result("r1", "user.roles_changed")
        .await
        .expect("roles_changed");
    assert_eq!(granted["data"]["before"], json!([]));
    assert_eq!(names(&granted["data"]["added"]), ["admin"]);

    // The IdP moved the user from admins to an engineering group: force follows it.
    d.login(
        "r2",
        "2026-05-01T11:00:00Z",
        json!({"provider": "okta", "subject": "u1", "groups": ["eng-backend"]}),
    )
    .await;
    assert_eq!(d.roles(user).await, ["engineer"]);
    let changed = d
        .result("r2", "user.roles_changed")
        .await
        .expect("roles_changed");
    assert_eq!(names(&changed["data"]["before"]), ["admin"]);
    assert_eq!(names(&changed["data"]["after"]), ["engineer"]);
    assert_eq!(names(&changed["data"]["removed"]), ["admin"]);
    let refresh = d
        .result("r2", "user.token_refresh_required")
        .await
        .expect("refresh");
    assert!(refresh["data"]["reasons"]
        .as_array()
        .expect("reasons")
        .contains(&json!("roles_changed")));
    assert_eq!(
        names(&d.synced("r2").await["data"]["user"]["roles"]),
        ["engineer"]
    );

    // Same groups again: nothing changes, nothing is announced.
    d.login(
        "r3",
        "2026-05-01T12:00:00Z",
        json!({"provider": "okta", "subject": "u1", "groups": ["eng-backend"]}),
    )
    .await;
    assert!(d.result("r3", "user.roles_changed").await.is_none());
    assert!(d
        .result("r3", "user.token_refresh_required")
        .await
        .is_none());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn import_grants_at_first_login_only_and_additive_never_revokes() {
    let mut d = Direct::new(|c| {
        c.identity.role_sets = vec![
            role_set("import", vec![rule("groups", "equals", "staff", "staff")]),
            role_set(
                "additive",
                vec![rule("groups", "regex", "sales|support", "crm-user")],
            ),
        ];
    })
    .await;
    d.login(
        "i1",
        "2026-05-01T10:00:00Z",
        json!({"provider": "p", "subject": "s", "groups": ["staff", "sales"]}),
    )
    .await;
    let user = d.user_of("p", "s").await;
    assert_eq!(d.roles(user).await, ["crm-user", "staff"]);
    // Groups gone at the IdP: import and additive keep what they granted.
    d.login(
        "i2",
        "2026-05-01T11:00:00Z",
        json!({"provider": "p", "subject": "s", "groups": []}),
    )
    .await;
    assert_eq!(d.roles(user).await, ["crm-user", "staff"]);
    assert!(d.result("i2", "user.roles_changed").await.is_none());
    // A regex matches whole values only: `salesforce` is not `sales`.
    d.login(
        "i3",
        "2026-05-01T12:00:00Z",
        json!({"provider": "p", "subject": "t", "groups": ["salesforce", "staff"]}),
    )
    .await;
    assert_eq!(d.roles(d.user_of("p", "t").await).await, ["staff"]);
    // A later login of a user without roles does not import them any more.
    d.login(
        "i4",
        "2026-05-01T13:00:00Z",
        json!({"provider": "p", "subject": "t", "groups": ["support", "staff"]}),
    )
    .await;
    assert_eq!(
        d.roles(d.user_of("p", "t").await).await,
        ["crm-user", "staff"]
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn attribute_and_connection_group_rules_scope_roles_to_organizations() {
    let org = Uuid::new_v4();
    let mut d = Direct::new(|c| {
        let mut by_dept = rule("attribute:department", "equals", "finance", "approver");
        by_dept.organization = Some(org.to_string());
        let mut by_connection = rule("connection.groups", "prefix", "AAD-", "member");
        by_connection.organization = Some("personal".into());
        // The operator's own rules for a trusted connection: its claims may use the rules'
        // scopes (a customer connection would grant only inside its organization).
        let mut set = role_set("force", vec![by_dept, by_connection]);
        set.allow_global = true;
        c.identity.role_sets = vec![set];
    })
    .await;
    d.login(
        "a1",
        "2026-05-01T10:00:00Z",
        json!({"provider": "entra", "subject": "e1",
               "attributes": [{"key": "department", "value": "finance"}],
               "connection": {"connectionId": "con_1", "groups": ["AAD-Readers"]}}),
    )
    .await;
    let user = d.user_of("entra", "e1").await;
    let rows: Vec<(String, Uuid)> = sqlx::query_as(
        "SELECT role, organization_id FROM user_roles WHERE user_id = $1 ORDER BY role",
    )
    .bind(user)
    .fetch_all(&d.db.pool)
    .await
    .expect("roles");
    assert_eq!(
        rows,
        [
            ("approver".to_string(), org),
            ("member".to_string(), ids::derived(user, "organization")),
        ]
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn identity_sync_records_attributes_connection_upns_and_devices() {
    let mut d = Direct::new(|_| {}).await;
    d.login(
        "s1",
        "2026-05-01T10:00:00Z",
        json!({"provider": "nexus", "subject": "n1", "email": "nia@corp.test",
               "isEmailVerified": true, "audience": "portal",
               "attributes": [{"key": "department", "value": "finance"},
                              {"key": "costCenter", "value": "42"}],
               "connection": {"connectionId": "con_9", "groups": ["Finance", "All"]},
               "clientUpnKey": "crm", "deviceID": "d1", "userAgent": "Edge"}),
    )
    .await;
    let user = d.synced("s1").await["data"]["user"].clone();
    assert_eq!(user["customUpns"][0]["clientUpnKey"], "crm");
    assert_eq!(
        user["customUpns"][0]["customUpnValue"], "nia@corp.test",
        "the UPN defaults to the login's email"
    );
    let attrs: Vec<(String, String)> = user["attributes"]
        .as_array()
        .expect("attributes")
        .iter()
        .map(|a| {
            (
                a["name"].as_str().unwrap_or_default().into(),
                a["value"].as_str().unwrap_or_default().into(),
            )
        })
        .collect();
    assert_eq!(
        attrs,
        [
            ("costCenter".to_string(), "42".to_string()),
            ("department".into(), "finance".into())
        ]
    );
    let identity = &user["identities"][0];
    assert_eq!(identity["strategy"], "nexus");
    assert_eq!(identity["azoUserId"], "n1");
    assert_eq!(identity["azoConnectionId"], "con_9");
    assert_eq!(identity["connectionGroups"], json!(["All", "Finance"]));
    assert_eq!(identity["audience"], "portal");
    assert_eq!(user["memberOf"][0]["roles"], json!(["owner"]));

    // A later login without `costCenter` keeps it (merge mode); a new UPN value replaces it.
    d.login(
        "s2",
        "2026-05-02T10:00:00Z",
        json!({"provider": "nexus", "subject": "n1",
               "attributes": [{"key": "department", "value": "legal"}],
               "connection": {"connectionId": "con_9", "groups": ["Legal"]},
               "clientUpnKey": "crm", "customUpnValue": "nia@crm.corp",
               "deviceID": "d1", "userAgent": "Edge 2"}),
    )
    .await;
    let uid = d.user_of("nexus", "n1").await;
    assert_eq!(
        d.db.count(&format!(
            "SELECT count(*) FROM user_attributes WHERE user_id = '{uid}' AND \
             ((key = 'department' AND value = 'legal') OR (key = 'costCenter' AND value = '42'))"
        ))
        .await,
        2
    );
    assert_eq!(
        d.db.count(&format!(
            "SELECT count(*) FROM custom_upns WHERE user_id = '{uid}' AND upn = 'nia@crm.corp'"
        ))
        .await,
        1
    );
    assert_eq!(
        d.db.count("SELECT count(*) FROM external_identities WHERE connection_groups = '{Legal}'")
            .await,
        1
    );
    assert_eq!(
        d.db.count(
            "SELECT count(*) FROM devices WHERE device_id = 'd1' AND user_agent = 'Edge 2' \
             AND last_seen_at > first_seen_at"
        )
        .await,
        1
    );
    let synced = d.synced("s2").await;
    assert_eq!(
        synced["data"]["user"]["version"], 2,
        "claims changes bump the version"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn authoritative_attributes_replace_the_whole_set() {
    let mut d = Direct::new(|c| c.identity.attributes = "authoritative".into()).await;
    d.login(
        "t1",
        "2026-05-01T10:00:00Z",
        json!({"provider": "p", "subject": "s",
               "attributes": [{"key": "a", "value": "1"}, {"key": "b", "value": "2"}]}),
    )
    .await;
    d.login(
        "t2",
        "2026-05-01T11:00:00Z",
        json!({"provider": "p", "subject": "s", "attributes": [{"key": "b", "value": "3"}]}),
    )
    .await;
    // A login that says nothing about attributes leaves them alone.
    d.login(
        "t3",
        "2026-05-01T12:00:00Z",
        json!({"provider": "p", "subject": "s"}),
    )
    .await;
    let attrs: Vec<(String, String)> =
        sqlx::query_as("SELECT key, value FROM user_attributes ORDER BY key")
            .fetch_all(&d.db.pool)
            .await
            .expect("attributes");
    assert_eq!(attrs, [("b".to_string(), "3".to_string())]);
}

/// A user signed up through `provider:subject` with `email`.
async fn existing_user(
    d: &mut Direct,
    id: &str,
    provider: &str,
    subject: &str,
    verified: bool,
) -> Uuid {
    d.login(
        id,
        "2026-05-01T09:00:00Z",
        json!({"provider": provider, "subject": subject, "email": "kim@example.test",
               "isEmailVerified": verified}),
    )
    .await;
    d.user_of(provider, subject).await
}

/// A new identity's first login with the same email; returns its `linking` field.
async fn new_identity(d: &mut Direct, id: &str, provider: &str, verified: bool) -> Value {
    d.login(
        id,
        "2026-05-01T10:00:00Z",
        json!({"provider": provider, "subject": format!("{provider}-new"),
               "email": "Kim@Example.test", "isEmailVerified": verified}),
    )
    .await;
    d.synced(id).await["data"]["linking"].clone()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn verified_email_links_a_new_identity_to_the_existing_user() {
    let mut d = Direct::new(|_| {}).await;
    let kim = existing_user(&mut d, "l1", "google", "g-kim", true).await;
    let linking = new_identity(&mut d, "l2", "github", true).await;
    assert_eq!(linking, json!({"linked": {"by": "verified_email"}}));
    assert_eq!(d.user_of("github", "github-new").await, kim);
    assert_eq!(d.db.count("SELECT count(*) FROM users").await, 1);
    let synced = d.synced("l2").await;
    assert_eq!(synced["data"]["didSignUp"], false);
    assert_eq!(synced["data"]["tokenRefreshReason"], "identity_linked");
    assert_eq!(
        synced["data"]["user"]["identities"]
            .as_array()
            .map(Vec::len),
        Some(2)
    );
    let linked = d
        .result("l2", "user.identity_linked")
        .await
        .expect("identity_linked");
    assert_eq!(linked["data"]["userId"], kim.to_string());
    assert_eq!(linked["data"]["provider"], "github");
    let refresh = d
        .result("l2", "user.token_refresh_required")
        .await
        .expect("refresh");
    assert_eq!(refresh["data"]["reason"], "identity_linked");
    assert!(d.result("l2", "user.signed_up").await.is_none());
    // The linked identity's next login is an ordinary returning login.
    d.login(
        "l3",
        "2026-05-01T11:00:00Z",
        json!({"provider": "github", "subject": "github-new", "email": "kim@example.test",
               "isEmailVerified": true}),
    )
    .await;
    assert!(d.synced("l3").await["data"].get("linking").is_none());
    assert!(d.result("l3", "user.identity_linked").await.is_none());
}

/// Asserts a separate user was created for the new identity, and why it was not linked.
async fn assert_not_linked(d: &Direct, id: &str, provider: &str, existing: Uuid, reason: &str) {
    let synced = d.synced(id).await;
    assert_eq!(synced["data"]["linking"], json!({"skipped": reason}));
    assert_eq!(synced["data"]["didSignUp"], true);
    assert_ne!(
        d.user_of(provider, &format!("{provider}-new")).await,
        existing
    );
    assert!(d.result(id, "user.identity_linked").await.is_none());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unverified_login_email_is_never_linked() {
    let mut d = Direct::new(|_| {}).await;
    let kim = existing_user(&mut d, "u1", "google", "g-kim", true).await;
    new_identity(&mut d, "u2", "github", false).await;
    assert_not_linked(&d, "u2", "github", kim, "email_unverified").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pre_registered_unverified_account_cannot_capture_a_verified_login() {
    let mut d = Direct::new(|_| {}).await;
    // An attacker registers the victim's address first and never verifies it.
    let squatter = existing_user(&mut d, "p1", "password", "attacker", false).await;
    new_identity(&mut d, "p2", "google", true).await;
    assert_not_linked(&d, "p2", "google", squatter, "target_email_unverified").await;
    assert_eq!(
        d.db.count(&format!(
            "SELECT count(*) FROM external_identities WHERE user_id = '{squatter}'"
        ))
        .await,
        1,
        "the squatter's account gained nothing"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_verified_candidates_are_never_linked() {
    let mut d = Direct::new(|_| {}).await;
    let first = existing_user(&mut d, "m1", "google", "g-kim", true).await;
    // Signed up unverified (so not linked), then verified by its own provider: a second
    // trusted, verified holder of the address.
    let second = existing_user(&mut d, "m2", "apple", "a-kim", false).await;
    assert_ne!(first, second);
    d.login(
        "m2b",
        "2026-05-01T09:30:00Z",
        json!({"provider": "apple", "subject": "a-kim", "email": "kim@example.test",
               "isEmailVerified": true}),
    )
    .await;
    new_identity(&mut d, "m3", "github", true).await;
    assert_not_linked(&d, "m3", "github", first, "multiple_candidates").await;
    assert_ne!(d.user_of("github", "github-new").await, second);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn untrusted_provider_is_never_linked() {
    let mut d = Direct::new(|c| c.identity.untrusted_link_providers = vec!["samlp".into()]).await;
    let kim = existing_user(&mut d, "t1", "google", "g-kim", true).await;
    new_identity(&mut d, "t2", "samlp", true).await;
    assert_not_linked(&d, "t2", "samlp", kim, "provider_not_trusted").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn second_identity_of_the_same_provider_is_never_linked() {
    let mut d = Direct::new(|_| {}).await;
    let kim = existing_user(&mut d, "s1", "google", "g-kim", true).await;
    new_identity(&mut d, "s2", "google", true).await;
    assert_not_linked(&d, "s2", "google", kim, "provider_already_linked").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn linking_can_be_switched_off() {
    let mut d = Direct::new(|c| c.identity.link_verified_email = false).await;
    let kim = existing_user(&mut d, "o1", "google", "g-kim", true).await;
    new_identity(&mut d, "o2", "github", true).await;
    assert_not_linked(&d, "o2", "github", kim, "linking_disabled").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn linking_and_role_changes_are_announced_on_the_topic() {
    let mut h = Harness::with(|c| {
        c.identity.role_sets = vec![role_set(
            "force",
            vec![rule("groups", "equals", "admins", "admin")],
        )];
    })
    .await;
    h.start().await;
    h.produce(
        "google:kim",
        &login(
            "k1",
            "2026-05-01T10:00:00Z",
            json!({"provider": "google", "subject": "kim", "email": "kim@example.test",
                   "isEmailVerified": true, "groups": ["admins"]}),
        ),
    )
    .await;
    h.wait_handled(1).await;
    h.produce(
        "github:kim",
        &login(
            "k2",
            "2026-05-01T11:00:00Z",
            json!({"provider": "github", "subject": "kim", "email": "kim@example.test",
                   "isEmailVerified": true}),
        ),
    )
    .await;
    // k1: synced, signed_up, roles_changed; k2: synced, identity_linked, token_refresh.
    let out = h.outputs(6).await;
    h.stop().await;
    let mut types: Vec<String> = out.iter().map(Output::event_type).collect();
    types.sort();
    assert_eq!(
        types,
        [
            "user.identity_linked",
            "user.roles_changed",
            "user.signed_up",
            "user.synced",
            "user.synced",
            "user.token_refresh_required"
        ]
    );
    let kim = ids::user_id("google", "kim").to_string();
    for o in &out {
        assert_matches_schema(&o.json());
        assert_eq!(
            o.key.as_deref(),
            Some(kim.as_bytes()),
            "keyed by the one user"
        );
    }
}

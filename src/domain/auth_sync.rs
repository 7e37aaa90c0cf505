//! The auth-sync decision, pure: given the state the store loaded (and locked), a batch of
//! logins, the identity policy and the clock, [`decide`] returns the [`Plan`] the store
//! writes and the result events render. Every identity rule lives here, testable without
//! Postgres: who a first login is (link or sign-up), which claims an event may move (clocks
//! per field), which roles it grants or revokes (provenance, connection scope).

use std::collections::{BTreeMap, HashMap, HashSet};

use chrono::{DateTime, Utc};
use uuid::Uuid;

use super::identity::{
    self, Asserted, Claims, ConnectionRef, Grant, IdentityPolicy, LinkDecision, LinkTarget, Roles,
};
use super::{
    advance, identity_clocks, is_fresh, store_identity_clocks, Clocks, LoginOutcome, RefreshReason,
    SignupPlan, UserRecord,
};
use crate::config::ProvisioningConfig;
use crate::events::login::ConnectionKind;
use crate::events::results::Linking;
use crate::events::LoginEvent;

/// `(provider, subject)`.
pub type IdentityKey = (String, String);

/// How a linked identity was linked (recorded on the identity and in the events).
pub const LINKED_BY_EMAIL: &str = "verified_email";

/// What one identity asserts, each claim with its own clock (kept in the user's clocks, so
/// a login that changes no claim writes no identity row).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct IdentityClaims {
    pub email: Option<String>,
    /// The identity says `email` is verified (meaningless without `email`).
    pub email_verified: bool,
    pub groups: Vec<String>,
    pub connection_id: Option<String>,
    pub connection_kind: Option<ConnectionKind>,
    pub connection_groups: Vec<String>,
    pub audience: Option<String>,
    pub clocks: Clocks,
}

/// Whether applying an event moved an identity's claims.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ClaimsChange {
    /// A claim value changed.
    pub changed: bool,
    /// A claim's clock moved (whether or not its value changed).
    pub clocks_moved: bool,
    pub email_changed: bool,
    pub groups_changed: bool,
    /// A claim the event carries was set by a newer event: kept.
    pub stale: bool,
}

/// Applies the claims an event carries to its identity, claim by claim, where no newer
/// event set them. A verified flag without its address changes nothing.
pub fn apply_identity_claims(claims: &mut IdentityClaims, event: &LoginEvent) -> ClaimsChange {
    let at = event.occurred_at;
    let mut c = ClaimsChange::default();
    let claim = |clocks: &mut Clocks, field: &str, c: &mut ClaimsChange| -> bool {
        if !is_fresh(clocks, field, at) {
            c.stale = true;
            return false;
        }
        if clocks.get(field) != Some(&at) {
            c.clocks_moved = true;
        }
        advance(clocks, field, at);
        true
    };
    if let Some(email) = &event.email {
        if claim(&mut claims.clocks, "email", &mut c) {
            if claims.email.as_deref() != Some(email.as_str()) {
                claims.email = Some(email.clone());
                claims.email_verified = event.email_verified.unwrap_or(false);
                c.email_changed = true;
            } else if let Some(v) = event.email_verified.filter(|v| *v != claims.email_verified) {
                claims.email_verified = v;
                c.email_changed = true;
            }
        }
    }
    if let Some(groups) = &event.groups {
        let same = claims.groups == *groups;
        if claim(&mut claims.clocks, "groups", &mut c) && !same {
            claims.groups = groups.clone();
            c.groups_changed = true;
        }
    }
    if let Some(conn) = &event.connection {
        let same =
            claims.connection_id == conn.connection_id && claims.connection_kind == conn.kind;
        if (conn.connection_id.is_some() || conn.kind.is_some())
            && claim(&mut claims.clocks, "connection", &mut c)
            && !same
        {
            claims.connection_id = conn.connection_id.clone();
            claims.connection_kind = conn.kind;
            c.changed = true;
        }
        if let Some(groups) = &conn.groups {
            let same = claims.connection_groups == *groups;
            if claim(&mut claims.clocks, "connectionGroups", &mut c) && !same {
                claims.connection_groups = groups.clone();
                c.changed = true;
            }
        }
    }
    if let Some(audience) = &event.audience {
        let same = claims.audience.as_deref() == Some(audience.as_str());
        if claim(&mut claims.clocks, "audience", &mut c) && !same {
            claims.audience = Some(audience.clone());
            c.changed = true;
        }
    }
    c.changed |= c.email_changed || c.groups_changed;
    c
}

/// A known identity as loaded (its user is locked).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct KnownIdentity {
    pub key: IdentityKey,
    pub user_id: Uuid,
    pub claims: IdentityClaims,
    /// Set when a merge moved this identity here from another user.
    pub merged_from: Option<Uuid>,
    pub last_login_at: DateTime<Utc>,
}

/// A user's roles (with provenance), attributes and custom UPNs (client key → UPN).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ClaimsState {
    pub roles: Roles,
    pub attributes: BTreeMap<String, String>,
    pub upns: BTreeMap<String, String>,
}

/// Everything [`decide`] needs, as the store loaded it inside the batch's transaction.
#[derive(Clone, Debug, Default)]
pub struct Loaded {
    /// The batch's identities that exist.
    pub identities: Vec<KnownIdentity>,
    /// Their users and the link targets' users, locked.
    pub users: HashMap<Uuid, UserRecord>,
    /// Per address of the batch's first logins: the identities of active users that
    /// currently assert it (read under the address's lock).
    pub targets: HashMap<String, Vec<LinkTarget>>,
    /// Roles, attributes and UPNs of `users`, when the batch can change them.
    pub claims: Option<HashMap<Uuid, ClaimsState>>,
}

/// An identity row to insert (a first login) or update (a known identity).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct IdentityWrite {
    pub provider: String,
    pub subject: String,
    pub user_id: Uuid,
    pub claims: IdentityClaims,
    pub last_login_at: DateTime<Utc>,
    /// How a linked identity was linked; `None` for a sign-up or an update.
    pub linked_by: Option<&'static str>,
}

/// The verification state of one (user, address) as the latest applied event says.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct EmailState {
    pub user_id: Uuid,
    pub email: String,
    pub verified_at: Option<DateTime<Utc>>,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DeviceSighting {
    pub user_id: Uuid,
    pub device_id: String,
    pub user_agent: Option<String>,
    pub seen_at: DateTime<Utc>,
}

/// What happened to one login, kept until the result events are built.
#[derive(Clone, Debug)]
pub struct AppliedLogin<'e> {
    pub event: &'e LoginEvent,
    /// The user as this login left it.
    pub user: UserRecord,
    pub signed_up: bool,
    pub outcome: LoginOutcome,
    /// The identity was moved here by a merge from this user.
    pub merged_from: Option<Uuid>,
    /// The first login of an identity an existing user's address matched.
    pub linking: Option<Linking>,
    /// Roles before and after, when this login changed them.
    pub roles_change: Option<(Vec<Grant>, Vec<Grant>)>,
}

/// What the store writes, one statement per table, and what the results render.
#[derive(Clone, Debug, Default)]
pub struct Plan<'e> {
    pub signups: Vec<SignupPlan>,
    /// Identities to claim (sign-ups' and links'), with the claims the batch left them.
    pub new_identities: Vec<IdentityWrite>,
    /// Known users (and sign-ups changed again later in the batch) to write back.
    pub users: Vec<UserRecord>,
    pub emails: Vec<EmailState>,
    pub identities: Vec<IdentityWrite>,
    pub devices: Vec<DeviceSighting>,
    /// (user, before, after) where roles, attributes or UPNs changed.
    pub claims: Vec<(Uuid, ClaimsState, ClaimsState)>,
    pub applied: Vec<AppliedLogin<'e>>,
}

/// A broken invariant of the loaded state (a bug, not bad input).
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct DecideError(pub String);

struct Ident {
    user_id: Uuid,
    claims: IdentityClaims,
    merged_from: Option<Uuid>,
    last_login_at: DateTime<Utc>,
    /// `Some`: created by this batch (signed up: `None` inside, or linked).
    new: Option<Option<&'static str>>,
    dirty: bool,
}

/// Decides a batch of logins (in order) against the loaded state.
pub fn decide<'e>(
    loaded: Loaded,
    logins: &[&'e LoginEvent],
    policy: &IdentityPolicy,
    provisioning: &ProvisioningConfig,
    now: DateTime<Utc>,
) -> Result<Plan<'e>, DecideError> {
    let Loaded {
        identities,
        mut users,
        mut targets,
        claims,
    } = loaded;
    let mut idents: HashMap<IdentityKey, Ident> = HashMap::with_capacity(identities.len());
    let mut user_providers: HashMap<Uuid, HashSet<String>> = HashMap::new();
    for t in targets.values().flatten() {
        user_providers
            .entry(t.user_id)
            .or_default()
            .extend(t.user_providers.iter().cloned());
    }
    for k in identities {
        user_providers
            .entry(k.user_id)
            .or_default()
            .insert(k.key.0.clone());
        let mut claims = k.claims;
        if let Some(user) = users.get(&k.user_id) {
            claims.clocks = identity_clocks(&user.clocks, &k.key.0, &k.key.1);
        }
        idents.insert(
            k.key,
            Ident {
                user_id: k.user_id,
                claims,
                merged_from: k.merged_from,
                last_login_at: k.last_login_at,
                new: None,
                dirty: false,
            },
        );
    }
    let mut claims: Option<HashMap<Uuid, (ClaimsState, ClaimsState)>> =
        claims.map(|m| m.into_iter().map(|(u, s)| (u, (s.clone(), s))).collect());
    let mut plan = Plan::default();
    let mut dirty_users: Vec<Uuid> = Vec::new();
    let mut dirty_set: HashSet<Uuid> = HashSet::new();
    let mut emails: HashMap<(Uuid, String), EmailState> = HashMap::new();
    let mut devices: HashMap<(Uuid, String), DeviceSighting> = HashMap::new();
    for &event in logins {
        let key: IdentityKey = (event.provider.clone(), event.subject.clone());
        let mut first = None;
        if !idents.contains_key(&key) {
            // First login of this identity: link it to the one user a trusted identity
            // vouches for with this verified address, or sign it up.
            let mut found: Vec<LinkTarget> = event
                .email
                .as_ref()
                .and_then(|a| targets.get(a))
                .cloned()
                .unwrap_or_default();
            for t in &mut found {
                t.user_providers = user_providers
                    .get(&t.user_id)
                    .map(|s| s.iter().cloned().collect())
                    .unwrap_or_default();
            }
            let decision = identity::decide_link(policy, event, &found);
            let (user_id, linking, linked_by) = match decision {
                LinkDecision::Link(user_id) => {
                    tracing::debug!(provider = %event.provider, email = ?event.email, %user_id, "linking identity by verified email");
                    (
                        user_id,
                        Some(Linking::Linked {
                            by: LINKED_BY_EMAIL,
                        }),
                        Some(LINKED_BY_EMAIL),
                    )
                }
                other => {
                    let linking = match other {
                        LinkDecision::Skip(reason) => {
                            tracing::info!(provider = %event.provider, reason = reason.as_str(), "identity not linked: signing up a separate user");
                            Some(Linking::Skipped(reason.as_str()))
                        }
                        _ => None,
                    };
                    let signup = super::plan_signup(event, provisioning, now);
                    let user_id = signup.user.id;
                    users.insert(user_id, signup.user.clone());
                    plan.signups.push(signup);
                    (user_id, linking, None)
                }
            };
            user_providers
                .entry(user_id)
                .or_default()
                .insert(event.provider.clone());
            idents.insert(
                key.clone(),
                Ident {
                    user_id,
                    claims: IdentityClaims::default(),
                    merged_from: None,
                    last_login_at: event.occurred_at,
                    new: Some(linked_by),
                    dirty: true,
                },
            );
            first = Some((linked_by.is_none(), linking));
        }
        let Some(ident) = idents.get_mut(&key) else {
            return Err(DecideError(format!(
                "identity of event {} was not resolved",
                event.event_id
            )));
        };
        let user_id = ident.user_id;
        let Some(user) = users.get_mut(&user_id) else {
            return Err(DecideError(format!(
                "user {user_id} of event {} was not loaded",
                event.event_id
            )));
        };
        let signed_up = first.as_ref().is_some_and(|(signup, _)| *signup);
        let linked = first.as_ref().is_some_and(|(signup, _)| !*signup);

        // The identity's own claims, each by its clock.
        let change = apply_identity_claims(&mut ident.claims, event);
        // The row is written only when a claim changed; its clocks ride on the user row.
        ident.dirty |= change.changed;
        ident.last_login_at = ident.last_login_at.max(event.occurred_at);
        if change.clocks_moved {
            store_identity_clocks(&mut user.clocks, &key.0, &key.1, &ident.claims.clocks);
        }
        if first.is_some() {
            // A new identity asserts its address from now on: later first logins of the
            // batch with that address see it (same-batch convergence).
            add_target(&mut targets, user_id, &key.0, &ident.claims);
        } else if change.changed {
            // A known identity now asserts another address, flag or connection: keep the
            // targets the batch still decides on current.
            for list in targets.values_mut() {
                list.retain(|t| !(t.user_id == user_id && t.provider == key.0));
            }
            add_target(&mut targets, user_id, &key.0, &ident.claims);
        }

        let mut outcome = if signed_up {
            LoginOutcome::default()
        } else {
            let mut outcome = super::apply_login(user, &key, event, now);
            if change.groups_changed {
                outcome.refresh_reasons.push(RefreshReason::GroupsChanged);
                outcome.groups_changed = true;
                mark_changed(user, &mut outcome, now);
            }
            if linked {
                outcome.refresh_reasons.push(RefreshReason::IdentityLinked);
                mark_changed(user, &mut outcome, now);
            }
            outcome.stale |= change.stale;
            outcome.refresh_reasons.sort();
            outcome.refresh_reasons.dedup();
            outcome
        };
        // The address the identity asserts, in the user's address book.
        if !signed_up && change.email_changed {
            if let Some(address) = &ident.claims.email {
                emails.insert(
                    (user_id, address.clone()),
                    EmailState {
                        user_id,
                        email: address.clone(),
                        verified_at: ident.claims.email_verified.then_some(event.occurred_at),
                    },
                );
            }
        }
        if outcome.new_email {
            if let Some(address) = &user.email {
                emails.insert(
                    (user_id, address.clone()),
                    EmailState {
                        user_id,
                        email: address.clone(),
                        verified_at: user.email_verified.then_some(event.occurred_at),
                    },
                );
            }
        }

        // Attributes, custom UPN and roles, from the claims as they now stand.
        let mut roles_change = None;
        if let Some(changes) = claims.as_mut() {
            let (_, state) = changes.entry(user_id).or_default();
            let mut changed = false;
            if let Some(attributes) = &event.attributes {
                changed |= identity::apply_attributes(
                    &mut state.attributes,
                    attributes,
                    policy.attributes_authoritative,
                );
            }
            if let Some((client, upn)) = identity::custom_upn(event) {
                changed |= state.upns.get(&client) != Some(&upn);
                state.upns.insert(client, upn);
            }
            if policy.has_role_rules() {
                let c = &ident.claims;
                let roles = policy.reconcile_roles(
                    user_id,
                    &state.roles,
                    Claims {
                        provider: &key.0,
                        subject: &key.1,
                        connection: ConnectionRef::stored(
                            c.connection_id.as_deref(),
                            c.connection_kind,
                        ),
                        groups: &c.groups,
                        connection_groups: &c.connection_groups,
                        attributes: &state.attributes,
                        asserted: Asserted {
                            groups: c.clocks.contains_key("groups"),
                            connection_groups: c.clocks.contains_key("connectionGroups"),
                            attributes: event.attributes.is_some(),
                        },
                    },
                    first.is_some(),
                );
                if roles != state.roles {
                    let before = std::mem::replace(&mut state.roles, roles);
                    roles_change = Some((
                        before.into_keys().collect(),
                        state.roles.keys().cloned().collect(),
                    ));
                    // A sign-up's first token is issued after it: nothing to refresh.
                    if !signed_up {
                        outcome.refresh_reasons.push(RefreshReason::RolesChanged);
                        outcome.refresh_reasons.sort();
                    }
                    changed = true;
                }
            }
            if changed && !signed_up {
                mark_changed(user, &mut outcome, now);
            }
        }
        if !signed_up && dirty_set.insert(user_id) {
            dirty_users.push(user_id);
        }
        if let Some(device_id) = &event.device_id {
            let sighting = devices
                .entry((user_id, device_id.clone()))
                .or_insert_with(|| DeviceSighting {
                    user_id,
                    device_id: device_id.clone(),
                    user_agent: None,
                    seen_at: event.occurred_at,
                });
            if event.occurred_at >= sighting.seen_at || sighting.user_agent.is_none() {
                sighting.user_agent = event.user_agent.clone().or(sighting.user_agent.take());
            }
            sighting.seen_at = sighting.seen_at.max(event.occurred_at);
        }
        plan.applied.push(AppliedLogin {
            event,
            user: user.clone(),
            signed_up,
            outcome,
            merged_from: ident.merged_from,
            linking: first.and_then(|(_, linking)| linking),
            roles_change,
        });
    }
    plan.users = dirty_users
        .iter()
        .filter_map(|id| users.get(id).cloned())
        .collect();
    // A sign-up's row is inserted as planned, with the clocks the batch left it.
    for signup in &mut plan.signups {
        if let Some(user) = users.get(&signup.user.id) {
            signup.user.clocks = user.clocks.clone();
        }
    }
    let mut idents: Vec<(IdentityKey, Ident)> =
        idents.into_iter().filter(|(_, i)| i.dirty).collect();
    idents.sort_by(|a, b| a.0.cmp(&b.0));
    for ((provider, subject), i) in idents {
        let write = IdentityWrite {
            provider,
            subject,
            user_id: i.user_id,
            claims: i.claims,
            last_login_at: i.last_login_at,
            linked_by: i.new.flatten(),
        };
        if i.new.is_some() {
            plan.new_identities.push(write);
        } else {
            plan.identities.push(write);
        }
    }
    let mut emails: Vec<EmailState> = emails.into_values().collect();
    emails.sort_by(|a, b| (a.user_id, &a.email).cmp(&(b.user_id, &b.email)));
    plan.emails = emails;
    plan.devices = devices.into_values().collect();
    if let Some(changes) = claims {
        let mut changed: Vec<(Uuid, ClaimsState, ClaimsState)> = changes
            .into_iter()
            .filter(|(_, (before, after))| before != after)
            .map(|(u, (before, after))| (u, before, after))
            .collect();
        changed.sort_by_key(|c| c.0);
        plan.claims = changed;
    }
    Ok(plan)
}

/// Makes an identity of this batch a link target of the address it now asserts.
fn add_target(
    targets: &mut HashMap<String, Vec<LinkTarget>>,
    user_id: Uuid,
    provider: &str,
    claims: &IdentityClaims,
) {
    if let Some(address) = &claims.email {
        targets
            .entry(address.clone())
            .or_default()
            .push(LinkTarget {
                user_id,
                provider: provider.to_string(),
                connection_id: claims.connection_id.clone(),
                connection_kind: claims.connection_kind,
                email_verified: claims.email_verified,
                user_providers: Vec::new(),
            });
    }
}

/// Bumps the user's version once per event that changed anything.
fn mark_changed(user: &mut UserRecord, outcome: &mut LoginOutcome, now: DateTime<Utc>) {
    if !outcome.changed {
        outcome.changed = true;
        user.version += 1;
        user.modified_at = now;
    }
}

#[cfg(test)]
mod properties {
    //! Property tests of [`decide`]: linking never joins two users unless a trusted source
    //! verified the address, and deciding the same batch again on the state it left
    //! changes nothing.

    use super::*;
    use crate::config::{ConnectionConfig, IdentityConfig, RoleRuleConfig, RoleSetConfig};
    use crate::events::login::Connection;
    use chrono::TimeZone;
    use proptest::prelude::*;

    const PROVIDERS: [&str; 4] = ["google", "github", "auth0", "okta"];
    const ADDRESSES: [&str; 3] = ["a@x.test", "b@x.test", "\u{212a}im@x.test"];

    fn policy() -> IdentityPolicy {
        IdentityPolicy::compile(&IdentityConfig {
            untrusted_link_providers: vec!["okta".into()],
            connections: vec![ConnectionConfig {
                provider: "auth0".into(),
                connection: "con_listed".into(),
                link: Some(true),
                ..ConnectionConfig::default()
            }],
            role_sets: vec![RoleSetConfig {
                name: "idp".into(),
                mode: "force".into(),
                providers: Vec::new(),
                connections: Vec::new(),
                allow_global: false,
                rules: vec![RoleRuleConfig {
                    name: None,
                    claim: "groups".into(),
                    match_kind: "equals".into(),
                    value: "admins".into(),
                    role: "admin".into(),
                    organization: None,
                }],
            }],
            ..IdentityConfig::default()
        })
        .expect("policy compiles")
    }

    fn connection() -> impl Strategy<Value = Option<Connection>> {
        prop_oneof![
            Just(None),
            (
                prop_oneof![Just("con_db"), Just("con_saml"), Just("con_listed")],
                prop_oneof![
                    Just(None),
                    Just(Some(ConnectionKind::Database)),
                    Just(Some(ConnectionKind::Social)),
                    Just(Some(ConnectionKind::Enterprise)),
                ],
            )
                .prop_map(|(id, kind)| Some(Connection {
                    connection_id: Some(id.to_string()),
                    kind,
                    groups: None,
                })),
        ]
    }

    fn login() -> impl Strategy<Value = LoginEvent> {
        (
            0..PROVIDERS.len(),
            0..4u8,
            proptest::option::of(0..ADDRESSES.len()),
            proptest::option::of(any::<bool>()),
            connection(),
            0..48u32,
            proptest::option::of(any::<bool>()),
        )
            .prop_map(|(p, s, email, verified, connection, hour, admin)| {
                let at = Utc.with_ymd_and_hms(2026, 1, 1, 0, 0, 0).unwrap()
                    + chrono::Duration::hours(i64::from(hour));
                let mut e = LoginEvent::new("e", "t", at, PROVIDERS[p], format!("s{s}"));
                e.email = email.map(|i| ADDRESSES[i].to_string());
                e.email_verified = verified;
                e.connection = connection;
                e.groups = admin.map(|a| if a { vec!["admins".into()] } else { Vec::new() });
                e.display_name = Some(format!("n{hour}"));
                e
            })
    }

    /// Is the identity trusted through the connection it has stored (an identity's
    /// connection is its newest event's, which may be newer than its address claim)?
    fn stored_trusted(p: &IdentityPolicy, plan: &Plan<'_>, provider: &str, subject: &str) -> bool {
        plan.new_identities
            .iter()
            .chain(&plan.identities)
            .filter(|w| w.provider == provider && w.subject == subject)
            .any(|w| {
                let c = &w.claims;
                p.link_trust(
                    provider,
                    ConnectionRef::stored(c.connection_id.as_deref(), c.connection_kind),
                )
                .is_ok()
            })
    }

    type Profile = (
        Option<String>,
        bool,
        Option<(String, String)>,
        Clocks,
        Option<String>,
    );

    /// What a repeat must not change in users (bookkeeping and version may move).
    fn profile(l: &Loaded) -> BTreeMap<Uuid, Profile> {
        l.users
            .iter()
            .map(|(id, u)| {
                (
                    *id,
                    (
                        u.email.clone(),
                        u.email_verified,
                        u.email_owner.clone(),
                        u.clocks.clone(),
                        u.auth_display_name.clone(),
                    ),
                )
            })
            .collect()
    }

    /// Identity claims without their clocks (those are the users', compared in `profile`).
    fn claims_of(l: &Loaded) -> BTreeMap<IdentityKey, (Uuid, IdentityClaims)> {
        l.identities
            .iter()
            .map(|k| {
                let claims = IdentityClaims {
                    clocks: Clocks::new(),
                    ..k.claims.clone()
                };
                (k.key.clone(), (k.user_id, claims))
            })
            .collect()
    }

    /// The state a plan leaves, as the store would load it again.
    fn reload(before: &Loaded, plan: &Plan<'_>) -> Loaded {
        let mut users = before.users.clone();
        for s in &plan.signups {
            users.insert(s.user.id, s.user.clone());
        }
        for u in &plan.users {
            users.insert(u.id, u.clone());
        }
        let mut identities: HashMap<IdentityKey, KnownIdentity> = before
            .identities
            .iter()
            .map(|k| (k.key.clone(), k.clone()))
            .collect();
        for w in plan.new_identities.iter().chain(&plan.identities) {
            let key = (w.provider.clone(), w.subject.clone());
            let merged_from = identities.get(&key).and_then(|k| k.merged_from);
            identities.insert(
                key.clone(),
                KnownIdentity {
                    key,
                    user_id: w.user_id,
                    claims: w.claims.clone(),
                    merged_from,
                    last_login_at: w.last_login_at,
                },
            );
        }
        let mut claims = before.claims.clone().unwrap_or_default();
        for (user, _, after) in &plan.claims {
            claims.insert(*user, after.clone());
        }
        Loaded {
            identities: identities.into_values().collect(),
            users,
            targets: HashMap::new(),
            claims: Some(claims),
        }
    }

    proptest! {
        #[test]
        fn linking_needs_a_trusted_verified_source_and_a_repeat_changes_nothing(
            logins in proptest::collection::vec(login(), 1..12)
        ) {
            let p = policy();
            let now = Utc.with_ymd_and_hms(2026, 2, 1, 0, 0, 0).unwrap();
            let refs: Vec<&LoginEvent> = logins.iter().collect();
            let loaded = Loaded { claims: Some(HashMap::new()), ..Loaded::default() };
            let plan = decide(loaded.clone(), &refs, &p, &ProvisioningConfig::default(), now)
                .expect("decides");
            // Every identity that joined an existing user: the login itself was trusted and
            // verified, and another identity of that user vouches for the address.
            for (i, a) in plan.applied.iter().enumerate() {
                if !matches!(a.linking, Some(Linking::Linked { .. })) {
                    continue;
                }
                let e = a.event;
                prop_assert_eq!(e.email_verified, Some(true));
                prop_assert!(p.link_trust(&e.provider, ConnectionRef::of_event(e)).is_ok());
                let address = e.email.as_deref().expect("linked on an address");
                prop_assert!(address.is_ascii());
                // An earlier login of another identity of that user asserted it verified,
                // through a trusted connection (the batch starts from an empty database).
                let vouched = plan.applied[..i].iter().any(|b| {
                    let f = b.event;
                    b.user.id == a.user.id
                        && (f.provider != e.provider || f.subject != e.subject)
                        && f.email.as_deref() == Some(address)
                        && f.email_verified == Some(true)
                        && (p.link_trust(&f.provider, ConnectionRef::of_event(f)).is_ok()
                            || stored_trusted(&p, &plan, &f.provider, &f.subject))
                });
                prop_assert!(vouched, "login {} linked without a trusted verified holder", i);
            }
            // The same batch again, on the state it left: nothing new, and it leaves the
            // same state (ties within the batch go to the later event both times).
            let again = reload(&loaded, &plan);
            let second = decide(again.clone(), &refs, &p, &ProvisioningConfig::default(), now)
                .expect("decides");
            prop_assert!(second.signups.is_empty());
            prop_assert!(second.new_identities.is_empty());
            prop_assert!(second.applied.iter().all(|a| a.linking.is_none()));
            let after = reload(&again, &second);
            prop_assert_eq!(profile(&again), profile(&after));
            prop_assert_eq!(claims_of(&again), claims_of(&after));
            prop_assert_eq!(&again.claims, &after.claims);
        }
    }
}

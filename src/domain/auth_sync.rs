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
use super::{advance, is_fresh, Clocks, LoginOutcome, RefreshReason, SignupPlan, UserRecord};
use crate::config::ProvisioningConfig;
use crate::events::login::ConnectionKind;
use crate::events::results::Linking;
use crate::events::LoginEvent;

/// `(provider, subject)`.
pub type IdentityKey = (String, String);

/// How a linked identity was linked (recorded on the identity and in the events).
pub const LINKED_BY_EMAIL: &str = "verified_email";

/// What one identity asserts, each claim with its own clock.
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
    /// Only a clock moved (the value was already what the event says).
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
        if claim(&mut claims.clocks, "groups", &mut c) && claims.groups != *groups {
            claims.groups = groups.clone();
            c.groups_changed = true;
        }
    }
    if let Some(conn) = &event.connection {
        if (conn.connection_id.is_some() || conn.kind.is_some())
            && claim(&mut claims.clocks, "connection", &mut c)
            && (claims.connection_id != conn.connection_id || claims.connection_kind != conn.kind)
        {
            claims.connection_id = conn.connection_id.clone();
            claims.connection_kind = conn.kind;
            c.changed = true;
        }
        if let Some(groups) = &conn.groups {
            if claim(&mut claims.clocks, "connectionGroups", &mut c)
                && claims.connection_groups != *groups
            {
                claims.connection_groups = groups.clone();
                c.changed = true;
            }
        }
    }
    if let Some(audience) = &event.audience {
        if claim(&mut claims.clocks, "audience", &mut c)
            && claims.audience.as_deref() != Some(audience.as_str())
        {
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
        idents.insert(
            k.key,
            Ident {
                user_id: k.user_id,
                claims: k.claims,
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
        ident.dirty |= change.changed || change.clocks_moved;
        ident.last_login_at = ident.last_login_at.max(event.occurred_at);
        if event.kind.counts_as_login() {
            ident.dirty = true;
        }
        if first.is_some() {
            // A new identity asserts its address from now on: later first logins of the
            // batch with that address see it (same-batch convergence).
            if let Some(address) = &ident.claims.email {
                targets
                    .entry(address.clone())
                    .or_default()
                    .push(LinkTarget {
                        user_id,
                        provider: key.0.clone(),
                        connection_id: ident.claims.connection_id.clone(),
                        connection_kind: ident.claims.connection_kind,
                        email_verified: ident.claims.email_verified,
                        user_providers: Vec::new(),
                    });
            }
        } else if change.email_changed {
            // A known identity now asserts another address (or flag): keep the targets the
            // batch still decides on current.
            for list in targets.values_mut() {
                list.retain(|t| !(t.user_id == user_id && t.provider == key.0));
            }
            if let Some(address) = &ident.claims.email {
                targets
                    .entry(address.clone())
                    .or_default()
                    .push(LinkTarget {
                        user_id,
                        provider: key.0.clone(),
                        connection_id: ident.claims.connection_id.clone(),
                        connection_kind: ident.claims.connection_kind,
                        email_verified: ident.claims.email_verified,
                        user_providers: Vec::new(),
                    });
            }
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
                    // A stale event may take roles away, never give them.
                    !change.stale,
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

/// Bumps the user's version once per event that changed anything.
fn mark_changed(user: &mut UserRecord, outcome: &mut LoginOutcome, now: DateTime<Utc>) {
    if !outcome.changed {
        outcome.changed = true;
        user.version += 1;
        user.modified_at = now;
    }
}

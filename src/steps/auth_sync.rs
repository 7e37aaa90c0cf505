//! The auth-sync step: login events become users (first login) or sync them (returning).
//!
//! Per batch, independent of its size: one inbox statement, one locking read of the known
//! users, the sign-up statements (only when there are first logins), one write per table
//! touched, four reads for the result views and the outbox insert (a ledger statement and
//! a `COPY`). A batch with first logins adds one read of link candidates; one that can
//! change roles, attributes or UPNs adds one read of those.

use std::collections::{HashMap, HashSet};

use chrono::Utc;
use serde_json::value::RawValue;
use sqlx::PgConnection;
use uuid::Uuid;

use super::{BatchReport, InputMessage, Step, StepContext};
use crate::domain::identity::{self, Asserted, Claims, Grant, LinkDecision};
use crate::domain::{self, LoginOutcome, RefreshReason, SignupPlan, UserRecord};
use crate::events::providers::{self, RawMessage};
use crate::events::results::{self, Linking, ResultEvent};
use crate::events::{DecodeError, LoginEvent};
use crate::store::identity::{self as identity_store, ClaimsState};
use crate::store::outbox::NewMessage;
use crate::store::provisioning::{self, NewIdentity};
use crate::store::users::{self, DeviceSighting, EmailState, IdentityState};
use crate::store::{views, StoreError};

pub struct AuthSync;

type Identity = (String, String);

/// An identity's connection claims as stored: connection id, connection groups, audience.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
struct ConnectionState {
    connection_id: Option<String>,
    groups: Vec<String>,
    audience: Option<String>,
}

/// Identities resolved to (locked) users so far.
#[derive(Default)]
struct Resolved {
    user_of: HashMap<Identity, Uuid>,
    users: HashMap<Uuid, UserRecord>,
    groups: HashMap<Identity, Vec<String>>,
    connections: HashMap<Identity, ConnectionState>,
    /// Stored identity claims (email, verified), to write identities only on change.
    claims: HashMap<Identity, (Option<String>, bool)>,
    /// Identities a merge moved here: the old user they belonged to.
    merged_from: HashMap<Identity, Uuid>,
}

impl Resolved {
    fn absorb(&mut self, loaded: Vec<users::LoadedIdentity>) {
        for l in loaded {
            let key = (l.provider, l.subject);
            self.user_of.insert(key.clone(), l.user.id);
            self.claims.insert(key.clone(), (l.email, l.email_verified));
            if let Some(from) = l.merged_from {
                self.merged_from.insert(key.clone(), from);
            }
            self.connections.insert(
                key.clone(),
                ConnectionState {
                    connection_id: l.connection_id,
                    groups: l.connection_groups,
                    audience: l.audience,
                },
            );
            self.groups.insert(key, l.groups);
            self.users.entry(l.user.id).or_insert(l.user);
        }
    }
}

/// What happened to one event, kept until the result events are built.
struct Applied<'a> {
    event: &'a LoginEvent,
    user: UserRecord,
    signed_up: bool,
    outcome: LoginOutcome,
    /// The identity was moved here by a merge from this user.
    merged_from: Option<Uuid>,
    /// The first login of an identity an existing user's email matched.
    linking: Option<Linking>,
    /// Roles before and after, when this login changed them.
    roles_change: Option<(Vec<Grant>, Vec<Grant>)>,
}

/// Roles, attributes and UPNs of the batch's users: as loaded, and as the batch leaves them.
type ClaimsChanges = HashMap<Uuid, (ClaimsState, ClaimsState)>;

impl Step for AuthSync {
    /// A message holds zero (not a login), one or several (a hook delivery) logins.
    type Decoded = Result<Vec<LoginEvent>, DecodeError>;

    fn decode(&self, ctx: &StepContext, message: &InputMessage) -> Self::Decoded {
        let events = providers::decode_login_message(
            RawMessage {
                value: message.value.as_deref(),
                headers: &message.headers,
                timestamp: message.timestamp,
            },
            ctx.max_message_bytes,
        )?;
        let now = Utc::now();
        for event in &events {
            super::check_event_id(&event.event_id)?;
            super::check_event_time(event.occurred_at, now, ctx.max_clock_skew)?;
        }
        Ok(events)
    }

    /// The key under which a whole message is dead-lettered when it cannot be applied.
    fn inbox_key(&self, message: &InputMessage, decoded: &Self::Decoded) -> String {
        match decoded {
            Ok(events) if events.len() == 1 => events[0].event_id.clone(),
            _ => message.position_key(),
        }
    }

    async fn apply<'a>(
        &'a self,
        conn: &'a mut PgConnection,
        ctx: &'a StepContext,
        items: &'a [(&'a InputMessage, &'a Self::Decoded)],
    ) -> Result<BatchReport, StoreError> {
        let mut report = BatchReport::default();
        let now = Utc::now();

        // 1. Inbox: claim each event once; duplicates (in the batch or handled before) skip.
        let mut candidates: Vec<super::Candidate<'_, LoginEvent>> = Vec::new();
        for (message, decoded) in items {
            match decoded {
                Ok(events) => {
                    candidates.extend(events.iter().map(|e| (*message, Ok(e), e.event_id.clone())))
                }
                Err(e) => candidates.push((*message, Err(e), message.position_key())),
            }
        }
        let claimed = super::claim_batch(&mut *conn, ctx, &candidates, &mut report).await?;
        let mut outbox_rows = claimed.dead_letters;
        let logins: Vec<&LoginEvent> = claimed.items.into_iter().map(|(_, e)| e).collect();
        if !logins.is_empty() {
            let applied = self
                .apply_logins(conn, ctx, &logins, now, &mut report)
                .await?;
            outbox_rows.extend(self.results(conn, ctx, &applied).await?);
        }
        let dead = report.dead_lettered_total();
        report.results = super::write_outbox(&mut *conn, ctx, &outbox_rows)
            .await?
            .saturating_sub(dead);
        Ok(report)
    }
}

impl AuthSync {
    async fn apply_logins<'e>(
        &self,
        conn: &mut PgConnection,
        ctx: &StepContext,
        logins: &[&'e LoginEvent],
        now: chrono::DateTime<Utc>,
        report: &mut BatchReport,
    ) -> Result<Vec<Applied<'e>>, StoreError> {
        let policy = &ctx.identity;
        // 2. Resolve identities to users, locking the users.
        let mut identities: Vec<Identity> = Vec::new();
        let mut seen = HashSet::new();
        for event in logins {
            let id = (event.provider.clone(), event.subject.clone());
            if seen.insert(id.clone()) {
                identities.push(id);
            }
        }
        let mut resolved = Resolved::default();
        resolved.absorb(users::lock_by_identities(&mut *conn, &identities).await?);

        // 3. First logins: the first event of each unknown identity either links it to the
        //    one existing user with its verified email, or signs it up.
        let mut firsts: Vec<&LoginEvent> = Vec::new();
        let mut first_seen = HashSet::new();
        for event in logins {
            let id = (event.provider.clone(), event.subject.clone());
            if !resolved.user_of.contains_key(&id) && first_seen.insert(id) {
                firsts.push(event);
            }
        }
        let mut signup_event: HashMap<Identity, &str> = HashMap::new();
        let mut linked_event: HashMap<Identity, &str> = HashMap::new();
        let mut linking: HashMap<Identity, Linking> = HashMap::new();
        if !firsts.is_empty() {
            let lookups: Vec<(&str, &str)> = firsts
                .iter()
                .filter_map(|e| e.email.as_deref().map(|m| (m, e.provider.as_str())))
                .collect::<HashSet<_>>()
                .into_iter()
                .collect();
            let candidates = identity_store::link_candidates(&mut *conn, &lookups).await?;
            let mut plans: Vec<SignupPlan> = Vec::new();
            let mut links: Vec<(&LoginEvent, Uuid)> = Vec::new();
            for event in &firsts {
                let id = (event.provider.clone(), event.subject.clone());
                let found = event
                    .email
                    .as_ref()
                    .and_then(|m| candidates.get(&(m.clone(), event.provider.clone())))
                    .map(Vec::as_slice)
                    .unwrap_or_default();
                match identity::decide_link(policy, event, found) {
                    LinkDecision::Link(user_id) => {
                        tracing::debug!(provider = %event.provider, email = ?event.email, %user_id, "linking identity by verified email");
                        linking.insert(
                            id.clone(),
                            Linking::Linked {
                                by: LINKED_BY_EMAIL,
                            },
                        );
                        linked_event.insert(id, &event.event_id);
                        links.push((event, user_id));
                        continue;
                    }
                    LinkDecision::Skip(reason) => {
                        tracing::info!(provider = %event.provider, reason = reason.as_str(), "identity not linked: signing up a separate user");
                        linking.insert(id.clone(), Linking::Skipped(reason.as_str()));
                    }
                    LinkDecision::NoCandidate => {}
                }
                signup_event.insert(id, &event.event_id);
                plans.push(domain::plan_signup(event, &ctx.provisioning, now));
            }
            let mut claims: Vec<NewIdentity<'_>> = plans.iter().map(NewIdentity::of_plan).collect();
            for (event, user_id) in &links {
                claims.push(NewIdentity {
                    provider: &event.provider,
                    subject: &event.subject,
                    user_id: *user_id,
                    email: event.email.as_deref(),
                    email_verified: event.email_verified.unwrap_or(false),
                    groups: event.groups.as_deref().unwrap_or_default(),
                    connection_id: event
                        .connection
                        .as_ref()
                        .and_then(|c| c.connection_id.as_deref()),
                    connection_groups: event
                        .connection
                        .as_ref()
                        .map(|c| c.groups.as_slice())
                        .unwrap_or_default(),
                    audience: event.audience.as_deref(),
                    at: event.occurred_at,
                    linked_by: Some(LINKED_BY_EMAIL),
                });
            }
            let won: HashSet<Identity> = provisioning::claim_identities(&mut *conn, &claims)
                .await?
                .into_iter()
                .collect();
            let winners: Vec<&SignupPlan> = plans
                .iter()
                .filter(|p| won.contains(&(p.provider.clone(), p.subject.clone())))
                .collect();
            provisioning::create(&mut *conn, &winners).await?;
            for plan in &winners {
                let id = (plan.provider.clone(), plan.subject.clone());
                resolved.user_of.insert(id.clone(), plan.user.id);
                resolved.claims.insert(
                    id.clone(),
                    (plan.user.email.clone(), plan.user.email_verified),
                );
                resolved.connections.insert(
                    id.clone(),
                    ConnectionState {
                        connection_id: plan.connection_id.clone(),
                        groups: plan.connection_groups.clone(),
                        audience: plan.audience.clone(),
                    },
                );
                resolved.groups.insert(id, plan.groups.clone());
                resolved.users.insert(plan.user.id, plan.user.clone());
            }
            // Linked identities (their users are locked now), and lost races: another
            // transaction claimed these identities first.
            let reload: Vec<Identity> = claims
                .iter()
                .map(|c| (c.provider.to_string(), c.subject.to_string()))
                .filter(|id| !won.contains(id) || linked_event.contains_key(id))
                .collect();
            for id in &reload {
                if !won.contains(id) {
                    signup_event.remove(id);
                    linked_event.remove(id);
                    linking.remove(id);
                }
            }
            if !reload.is_empty() {
                resolved.absorb(users::lock_by_identities(&mut *conn, &reload).await?);
            }
        }

        // Roles, attributes and UPNs are loaded only when the batch can change them.
        let mut claims_changes: Option<ClaimsChanges> = None;
        if policy.has_role_rules()
            || logins
                .iter()
                .any(|e| e.attributes.is_some() || e.client_upn_key.is_some())
        {
            let mut user_ids: Vec<Uuid> = resolved.users.keys().copied().collect();
            user_ids.sort_unstable();
            let loaded = identity_store::load_claims(&mut *conn, &user_ids).await?;
            claims_changes = Some(
                user_ids
                    .into_iter()
                    .map(|u| {
                        let state = loaded.get(&u).cloned().unwrap_or_default();
                        (u, (state.clone(), state))
                    })
                    .collect(),
            );
        }

        // 4. Decide, event by event, in order.
        let Resolved {
            user_of,
            users: mut users_by_id,
            mut groups,
            mut connections,
            mut claims,
            merged_from,
        } = resolved;
        let mut applied = Vec::with_capacity(logins.len());
        let mut dirty: Vec<Uuid> = Vec::new();
        let mut dirty_set = HashSet::new();
        let mut emails: HashMap<(Uuid, String), EmailState> = HashMap::new();
        let mut identity_states: HashMap<Identity, IdentityState> = HashMap::new();
        let mut devices: HashMap<(Uuid, String), DeviceSighting> = HashMap::new();
        for event in logins {
            let id = (event.provider.clone(), event.subject.clone());
            // Every claimed identity was resolved (loaded, linked or signed up) above, under
            // its user's lock: a miss here is a bug in this step, not a reason to retry.
            let Some(&user_id) = user_of.get(&id) else {
                return Err(StoreError::Internal(format!(
                    "identity of event {} was not resolved to a user",
                    event.event_id
                )));
            };
            let Some(user) = users_by_id.get_mut(&user_id) else {
                return Err(StoreError::Internal(format!(
                    "user {user_id} of event {} was not loaded",
                    event.event_id
                )));
            };
            let signed_up = signup_event.get(&id) == Some(&event.event_id.as_str());
            let linked = linked_event.get(&id) == Some(&event.event_id.as_str());
            let identity_groups = groups.entry(id.clone()).or_default();
            let connection = connections.entry(id.clone()).or_default();
            let mut outcome = if signed_up {
                report.signed_up += 1;
                LoginOutcome::default()
            } else {
                let mut outcome = domain::apply_login(user, identity_groups, event, now);
                if linked {
                    outcome.refresh_reasons.push(RefreshReason::IdentityLinked);
                    outcome.refresh_reasons.sort();
                    mark_changed(user, &mut outcome, now);
                }
                if !outcome.stale {
                    if let Some(email) = &user.email {
                        if outcome.new_email
                            || outcome
                                .refresh_reasons
                                .contains(&RefreshReason::EmailVerifiedChanged)
                        {
                            emails.insert(
                                (user_id, email.clone()),
                                EmailState {
                                    user_id,
                                    email: email.clone(),
                                    verified_at: user.email_verified.then_some(event.occurred_at),
                                },
                            );
                        }
                    }
                }
                // The identity's claims as this provider now asserts them.
                let (stored_email, stored_verified) =
                    claims.entry(id.clone()).or_insert((None, false));
                let mut identity_changed = outcome.groups_changed;
                if !outcome.stale {
                    if let Some(email) = &event.email {
                        if stored_email.as_deref() != Some(email.as_str()) {
                            *stored_email = Some(email.clone());
                            identity_changed = true;
                        }
                    }
                    if let Some(verified) = event.email_verified {
                        if *stored_verified != verified {
                            *stored_verified = verified;
                            identity_changed = true;
                        }
                    }
                    if let Some(c) = &event.connection {
                        if connection.connection_id != c.connection_id
                            || connection.groups != c.groups
                        {
                            connection.connection_id = c.connection_id.clone();
                            connection.groups = c.groups.clone();
                            identity_changed = true;
                        }
                    }
                    if event.audience.is_some() && connection.audience != event.audience {
                        connection.audience = event.audience.clone();
                        identity_changed = true;
                    }
                }
                if identity_changed || identity_states.contains_key(&id) {
                    identity_states.insert(
                        id.clone(),
                        IdentityState {
                            provider: id.0.clone(),
                            subject: id.1.clone(),
                            groups: identity_groups.clone(),
                            connection_id: connection.connection_id.clone(),
                            connection_groups: connection.groups.clone(),
                            audience: connection.audience.clone(),
                            email: stored_email.clone(),
                            email_verified: *stored_verified,
                            last_login_at: event.occurred_at,
                        },
                    );
                }
                outcome
            };
            // Attributes, custom UPN and roles, from the claims as they now stand.
            let mut roles_change = None;
            if let (Some(changes), false) = (claims_changes.as_mut(), outcome.stale) {
                let (_, state) = changes.entry(user_id).or_default();
                let mut changed = false;
                if let Some(attributes) = &event.attributes {
                    changed |= identity::apply_attributes(
                        &mut state.attributes,
                        attributes,
                        policy.attributes_authoritative,
                    );
                }
                if let Some((key, upn)) = identity::custom_upn(event) {
                    changed |= state.upns.get(&key) != Some(&upn);
                    state.upns.insert(key, upn);
                }
                if policy.has_role_rules() {
                    let roles = policy.reconcile_roles(
                        user_id,
                        &state.roles,
                        Claims {
                            provider: &event.provider,
                            groups: identity_groups,
                            connection_groups: &connection.groups,
                            attributes: &state.attributes,
                            asserted: Asserted::of(event),
                        },
                        signed_up,
                    );
                    if roles != state.roles {
                        let before = std::mem::replace(&mut state.roles, roles);
                        roles_change = Some((
                            before.into_iter().collect(),
                            state.roles.iter().cloned().collect(),
                        ));
                        // A sign-up's first token is issued after it: nothing to refresh.
                        if !signed_up {
                            outcome.refresh_reasons.push(RefreshReason::RolesChanged);
                            outcome.refresh_reasons.sort();
                        }
                        changed = true;
                    }
                }
                // A sign-up's user row is written as planned; a known user's new version is
                // written with the batch.
                if changed && !signed_up {
                    mark_changed(user, &mut outcome, now);
                }
            }
            if !signed_up && dirty_set.insert(user_id) {
                dirty.push(user_id);
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
            report.applied += 1;
            applied.push(Applied {
                event,
                user: user.clone(),
                signed_up,
                outcome,
                merged_from: merged_from.get(&id).copied(),
                linking: (signed_up || linked)
                    .then(|| linking.get(&id).copied())
                    .flatten(),
                roles_change,
            });
        }

        // 5. Write what changed, one statement per table.
        let dirty_users: Vec<&UserRecord> =
            dirty.iter().filter_map(|id| users_by_id.get(id)).collect();
        users::write(&mut *conn, &dirty_users).await?;
        let emails: Vec<EmailState> = emails.into_values().collect();
        users::upsert_emails(&mut *conn, &emails).await?;
        let identity_states: Vec<IdentityState> = identity_states.into_values().collect();
        users::update_identities(&mut *conn, &identity_states).await?;
        let devices: Vec<DeviceSighting> = devices.into_values().collect();
        users::upsert_devices(&mut *conn, &devices).await?;
        if let Some(changes) = &claims_changes {
            let changed: Vec<(Uuid, &ClaimsState, &ClaimsState)> = changes
                .iter()
                .filter(|(_, (before, after))| before != after)
                .map(|(u, (before, after))| (*u, before, after))
                .collect();
            identity_store::write_claims(&mut *conn, &changed, now).await?;
        }
        Ok(applied)
    }

    /// `user.synced` for every login; `user.signed_up`, `user.identity_linked`,
    /// `user.roles_changed` and `user.token_refresh_required` where they apply.
    async fn results(
        &self,
        conn: &mut PgConnection,
        ctx: &StepContext,
        applied: &[Applied<'_>],
    ) -> Result<Vec<NewMessage>, StoreError> {
        let mut user_ids: Vec<Uuid> = applied.iter().map(|a| a.user.id).collect();
        user_ids.sort_unstable();
        user_ids.dedup();
        let views = views::load(&mut *conn, &user_ids).await?;
        // A user's working context is the same for all its events in the batch: build once.
        let mut contexts: HashMap<Uuid, Box<RawValue>> = HashMap::with_capacity(user_ids.len());
        let mut rows = Vec::with_capacity(applied.len() * 2);
        for a in applied {
            let uid = a.user.id;
            let user_view = results::user_view(
                &a.user,
                views
                    .emails
                    .get(&uid)
                    .map(Vec::as_slice)
                    .unwrap_or_default(),
                views
                    .identities
                    .get(&uid)
                    .map(Vec::as_slice)
                    .unwrap_or_default(),
                views.claims.get(&uid),
            );
            let wc_view = contexts.entry(uid).or_insert_with(|| {
                views
                    .working_contexts
                    .get(&uid)
                    .map(results::working_context_view)
                    .unwrap_or_else(results::null)
            });
            let reasons = &a.outcome.refresh_reasons;
            let time = a.event.occurred_at;
            let cause = a.event.event_id.as_str();
            let mut emit = |event_type: &'static str, data: Box<RawValue>| {
                rows.push(result_message(
                    ctx,
                    &ResultEvent::new(event_type, cause, uid, time, data),
                ));
            };
            emit(
                results::USER_SYNCED,
                results::synced_data(
                    a.signed_up,
                    reasons,
                    &user_view,
                    wc_view,
                    a.merged_from,
                    a.linking,
                ),
            );
            if a.signed_up {
                emit(
                    results::USER_SIGNED_UP,
                    results::signed_up_data(
                        &a.event.provider,
                        &a.event.subject,
                        &user_view,
                        wc_view,
                    ),
                );
            }
            if let Some(Linking::Linked { by }) = a.linking {
                emit(
                    results::USER_IDENTITY_LINKED,
                    results::identity_linked_data(uid, &a.event.provider, &a.event.subject, by),
                );
            }
            if let Some((before, after)) = &a.roles_change {
                emit(
                    results::USER_ROLES_CHANGED,
                    results::roles_changed_data(uid, before, after),
                );
            }
            if !reasons.is_empty() {
                emit(
                    results::USER_TOKEN_REFRESH_REQUIRED,
                    results::token_refresh_data(uid, reasons),
                );
            }
        }
        Ok(rows)
    }
}

/// How a linked identity was linked (recorded on the identity and in the events).
const LINKED_BY_EMAIL: &str = "verified_email";

/// Bumps the user's version once per event that changed anything.
fn mark_changed(user: &mut UserRecord, outcome: &mut LoginOutcome, now: chrono::DateTime<Utc>) {
    if !outcome.changed {
        outcome.changed = true;
        user.version += 1;
        user.modified_at = now;
    }
}

/// The outbox row of a result event.
pub fn result_message(ctx: &StepContext, event: &ResultEvent) -> NewMessage {
    NewMessage {
        event_id: event.id,
        topic: ctx.topics.user_events.clone(),
        key: Some(event.user_id.to_string().into_bytes()),
        event_type: event.event_type.to_string(),
        payload: Some(event.to_bytes()),
        headers: vec![
            (
                "content-type".into(),
                b"application/cloudevents+json; charset=utf-8".to_vec(),
            ),
            ("ce_type".into(), event.event_type.as_bytes().to_vec()),
        ],
    }
}

//! The auth-sync step: login events become users (first login) or sync them (returning).
//!
//! Per batch, independent of its size: one inbox statement, one locking read of the known
//! users, the sign-up statements (only when there are first logins), one write per table
//! touched, three reads for the result views and one outbox insert.

use std::collections::{HashMap, HashSet};

use chrono::Utc;
use serde_json::value::RawValue;
use sqlx::PgConnection;
use uuid::Uuid;

use super::{BatchReport, InputMessage, Step, StepContext};
use crate::domain::{self, LoginOutcome, RefreshReason, SignupPlan, UserRecord};
use crate::events::providers::{self, RawMessage};
use crate::events::results::{self, ResultEvent};
use crate::events::{DecodeError, LoginEvent};
use crate::store::outbox::{self, NewMessage};
use crate::store::users::{self, DeviceSighting, EmailState, IdentityState};
use crate::store::{provisioning, views, StoreError};

pub struct AuthSync;

type Identity = (String, String);

/// Identities resolved to (locked) users so far.
#[derive(Default)]
struct Resolved {
    user_of: HashMap<Identity, Uuid>,
    users: HashMap<Uuid, UserRecord>,
    groups: HashMap<Identity, Vec<String>>,
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
}

impl Step for AuthSync {
    /// A message holds zero (not a login), one or several (a hook delivery) logins.
    type Decoded = Result<Vec<LoginEvent>, DecodeError>;

    fn decode(&self, ctx: &StepContext, message: &InputMessage) -> Self::Decoded {
        providers::decode_login_message(
            RawMessage {
                value: message.value.as_deref(),
                headers: &message.headers,
                timestamp: message.timestamp,
            },
            ctx.max_message_bytes,
        )
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
        report.results = outbox::insert(&mut *conn, &outbox_rows)
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

        // 3. First logins: the first event of each unknown identity signs it up.
        let mut plans: Vec<SignupPlan> = Vec::new();
        let mut signup_event: HashMap<Identity, &str> = HashMap::new();
        for event in logins {
            let id = (event.provider.clone(), event.subject.clone());
            if !resolved.user_of.contains_key(&id) && !signup_event.contains_key(&id) {
                signup_event.insert(id, &event.event_id);
                plans.push(domain::plan_signup(event, &ctx.provisioning, now));
            }
        }
        if !plans.is_empty() {
            let plan_refs: Vec<&SignupPlan> = plans.iter().collect();
            let won: HashSet<Identity> = provisioning::claim_identities(&mut *conn, &plan_refs)
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
                resolved.groups.insert(id, plan.groups.clone());
                resolved.users.insert(plan.user.id, plan.user.clone());
            }
            // Lost races: another transaction signed these identities up first.
            let lost: Vec<Identity> = plans
                .iter()
                .map(|p| (p.provider.clone(), p.subject.clone()))
                .filter(|id| !won.contains(id))
                .collect();
            if !lost.is_empty() {
                for id in &lost {
                    signup_event.remove(id);
                }
                resolved.absorb(users::lock_by_identities(&mut *conn, &lost).await?);
            }
        }

        // 4. Decide, event by event, in order.
        let Resolved {
            user_of,
            users: mut users_by_id,
            mut groups,
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
            let Some(&user_id) = user_of.get(&id) else {
                // The identity vanished between claim and read: retry the batch.
                return Err(StoreError::Transient(sqlx::Error::RowNotFound));
            };
            let Some(user) = users_by_id.get_mut(&user_id) else {
                return Err(StoreError::Transient(sqlx::Error::RowNotFound));
            };
            let signed_up = signup_event.get(&id) == Some(&event.event_id.as_str());
            let outcome = if signed_up {
                report.signed_up += 1;
                LoginOutcome::default()
            } else {
                let identity_groups = groups.entry(id.clone()).or_default();
                let outcome = domain::apply_login(user, identity_groups, event, now);
                if dirty_set.insert(user_id) {
                    dirty.push(user_id);
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
                }
                if identity_changed || identity_states.contains_key(&id) {
                    identity_states.insert(
                        id.clone(),
                        IdentityState {
                            provider: id.0.clone(),
                            subject: id.1.clone(),
                            groups: identity_groups.clone(),
                            email: stored_email.clone(),
                            email_verified: *stored_verified,
                            last_login_at: event.occurred_at,
                        },
                    );
                }
                outcome
            };
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
        Ok(applied)
    }

    /// `user.synced` for every login, `user.signed_up` and `user.token_refresh_required`
    /// where they apply.
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
            rows.push(result_message(
                ctx,
                &ResultEvent::new(
                    results::USER_SYNCED,
                    cause,
                    uid,
                    time,
                    results::synced_data(a.signed_up, reasons, &user_view, wc_view, a.merged_from),
                ),
            ));
            if a.signed_up {
                rows.push(result_message(
                    ctx,
                    &ResultEvent::new(
                        results::USER_SIGNED_UP,
                        cause,
                        uid,
                        time,
                        results::signed_up_data(
                            &a.event.provider,
                            &a.event.subject,
                            &user_view,
                            wc_view,
                        ),
                    ),
                ));
            }
            if !reasons.is_empty() {
                rows.push(result_message(
                    ctx,
                    &ResultEvent::new(
                        results::USER_TOKEN_REFRESH_REQUIRED,
                        cause,
                        uid,
                        time,
                        results::token_refresh_data(uid, reasons),
                    ),
                ));
            }
        }
        Ok(rows)
    }
}

/// The outbox row of a result event.
pub fn result_message(ctx: &StepContext, event: &ResultEvent) -> NewMessage {
    NewMessage {
        event_id: event.id,
        topic: ctx.topics.user_events.clone(),
        key: Some(event.user_id.to_string().into_bytes()),
        event_type: event.event_type.to_string(),
        payload: event.to_bytes(),
        headers: vec![
            (
                "content-type".into(),
                b"application/cloudevents+json; charset=utf-8".to_vec(),
            ),
            ("ce_type".into(), event.event_type.as_bytes().to_vec()),
        ],
    }
}

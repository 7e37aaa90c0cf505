//! The auth-sync step: login events become users (first login) or sync them (returning).
//! It reads as load → decide → write → render: the store loads and locks the state,
//! [`domain::auth_sync::decide`] makes every identity decision, the store writes the plan,
//! and the result events are rendered from it.
//!
//! Per batch, independent of its size: one inbox statement, one locking read of the known
//! users, one write per table touched, four reads for the result views and the outbox
//! insert (a ledger statement and a `COPY`). A batch with first logins adds the address and
//! identity locks, a re-read of the identities it locked, one read of link targets and the
//! sign-up statements; one that can change roles, attributes or UPNs adds one read of those.

use std::collections::{HashMap, HashSet};

use chrono::Utc;
use serde_json::value::RawValue;
use sqlx::PgConnection;
use uuid::Uuid;

use super::{BatchReport, InputMessage, Step, StepContext};
use crate::domain::auth_sync::{self, AppliedLogin, IdentityKey, Loaded};
use crate::domain::trust::{self, Admission};
use crate::events::providers::{self, RawMessage};
use crate::events::results::{self, Linking, ResultEvent};
use crate::events::{DecodeError, ErrorClass, LoginEvent};
use crate::store::identity as identity_store;
use crate::store::outbox::NewMessage;
use crate::store::provisioning;
use crate::store::users;
use crate::store::{views, StoreError};

pub struct AuthSync;

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
        let mut events = events;
        let source = ctx.source_keys.check(
            &message.headers,
            message.key.as_deref(),
            message.value.as_deref(),
        );
        for event in &mut events {
            super::check_event_id(&event.event_id)?;
            super::check_event_time(event.occurred_at, now, ctx.max_clock_skew)?;
            match ctx.sources.admit(&source, &event.provider) {
                Admission::Full => {}
                Admission::Restricted {
                    email_verified,
                    groups,
                } => trust::restrict(event, email_verified, groups),
                Admission::Refused(reason) => {
                    return Err(DecodeError::new(ErrorClass::UntrustedSource, reason))
                }
            }
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
    ) -> Result<Vec<AppliedLogin<'e>>, StoreError> {
        let policy = &ctx.identity;
        // 1. Load: the known identities and their users, locked.
        let mut keys: Vec<IdentityKey> = Vec::new();
        let mut seen = HashSet::new();
        for event in logins {
            let key = (event.provider.clone(), event.subject.clone());
            if seen.insert(key.clone()) {
                keys.push(key);
            }
        }
        let (mut identities, mut users_by_id) =
            users::lock_by_identities(&mut *conn, &keys).await?;
        let mut targets = HashMap::new();
        let known: HashSet<&IdentityKey> = identities.iter().map(|i| &i.key).collect();
        let unknown: Vec<IdentityKey> = keys
            .iter()
            .filter(|k| !known.contains(k))
            .cloned()
            .collect();
        if !unknown.is_empty() {
            // First logins: lock their identities and addresses (sorted: one order for
            // every replica), then read again what a concurrent batch may have created
            // before we got the locks, and the link targets of the addresses.
            let unknown_set: HashSet<&IdentityKey> = unknown.iter().collect();
            let mut addresses: Vec<&str> = logins
                .iter()
                .filter(|e| unknown_set.contains(&(e.provider.clone(), e.subject.clone())))
                .filter_map(|e| e.email.as_deref())
                .collect();
            addresses.sort_unstable();
            addresses.dedup();
            users::lock(
                &mut *conn,
                &users::lock_keys(&unknown, addresses.iter().copied()),
            )
            .await?;
            let (raced, raced_users) = users::lock_by_identities(&mut *conn, &unknown).await?;
            identities.extend(raced);
            users_by_id.extend(raced_users);
            let (found, target_users) = users::lock_link_targets(&mut *conn, &addresses).await?;
            targets = found;
            for (id, user) in target_users {
                users_by_id.entry(id).or_insert(user);
            }
        }
        // Roles, attributes and UPNs are loaded only when the batch can change them.
        let claims = if policy.has_role_rules()
            || logins
                .iter()
                .any(|e| e.attributes.is_some() || e.client_upn_key.is_some())
        {
            let mut user_ids: Vec<Uuid> = users_by_id.keys().copied().collect();
            user_ids.sort_unstable();
            Some(identity_store::load_claims(&mut *conn, &user_ids).await?)
        } else {
            None
        };

        // 2. Decide (pure).
        let plan = auth_sync::decide(
            Loaded {
                identities,
                users: users_by_id,
                targets,
                claims,
            },
            logins,
            policy,
            &ctx.provisioning,
            now,
        )
        .map_err(|e| StoreError::Internal(e.to_string()))?;

        // 3. Write, one statement per table.
        let won = provisioning::claim_identities(&mut *conn, &plan.new_identities).await?;
        if won.len() != plan.new_identities.len() {
            // The identity locks make this impossible among authsync replicas; another
            // writer did it. Retry the batch: it will see the identity as known.
            return Err(StoreError::NotYet(format!(
                "{} of {} new identities were created concurrently",
                plan.new_identities.len() - won.len(),
                plan.new_identities.len()
            )));
        }
        let signups: Vec<&crate::domain::SignupPlan> = plan.signups.iter().collect();
        provisioning::create(&mut *conn, &signups).await?;
        let users: Vec<&crate::domain::UserRecord> = plan.users.iter().collect();
        users::write(&mut *conn, &users).await?;
        users::upsert_emails(&mut *conn, &plan.emails).await?;
        users::update_identities(&mut *conn, &plan.identities).await?;
        users::upsert_devices(&mut *conn, &plan.devices).await?;
        identity_store::write_claims(&mut *conn, &plan.claims, now).await?;
        report.signed_up += plan.signups.len() as u64;
        report.applied += plan.applied.len() as u64;
        Ok(plan.applied)
    }

    /// `user.synced` for every login; `user.signed_up`, `user.identity_linked`,
    /// `user.roles_changed` and `user.token_refresh_required` where they apply.
    async fn results(
        &self,
        conn: &mut PgConnection,
        ctx: &StepContext,
        applied: &[AppliedLogin<'_>],
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

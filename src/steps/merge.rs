//! The account-merge step: a merge request transfers everything the old user owns to the
//! new user in the batch's transaction, records the full report, and announces it.

use chrono::Utc;
use sqlx::PgConnection;
use uuid::Uuid;

use super::auth_sync::result_message;
use super::{dead_letter, BatchReport, InputMessage, Step, StepContext};
use crate::domain::merge::{self, MergeDecision};
use crate::domain::{ids, RefreshReason};
use crate::events::merge::MergeRequest;
use crate::events::results::{self, raw, ResultEvent};
use crate::events::DecodeError;
use crate::store::merge::{self as merge_store, MergeReport};
use crate::store::{inbox, LockWait, StoreError};

pub const USER_MERGED: &str = "user.merged";
pub const USER_DEACTIVATED: &str = "user.deactivated";
/// The old user's access tokens were revoked (by fingerprint; never the token itself).
pub const USER_TOKENS_REVOKED: &str = "user.tokens_revoked";

/// Weakest first: on a duplicate, the stronger permission / role survives.
pub const PERMISSION_ORDER: [&str; 4] = ["read", "write", "admin", "owner"];
pub const ROLE_ORDER: [&str; 4] = ["viewer", "member", "admin", "owner"];

/// The account-merge step. A merge whose users do not exist yet (a sign-up still on its
/// way) waits in `merge_waits` instead of in its partition: the partition moves on, and
/// [`retry_waiting`] applies it once its users exist, or dead-letters it (`unknown_user`)
/// when `merge.unknown_user_retry_secs` have passed since authsync first saw it.
pub struct AccountMerge;

/// What one merge request came to.
enum MergeOutcome {
    /// Applied, already done, or refused: its outbox rows (results or a dead letter).
    Done {
        rows: Vec<crate::store::outbox::NewMessage>,
        dead_letter: Option<&'static str>,
    },
    /// A user does not exist yet and the budget is not spent.
    NotYet,
}

/// Cuts every array in the report to `limit` entries; says whether anything was cut.
fn truncate_lists(value: &mut serde_json::Value, limit: usize) -> bool {
    match value {
        serde_json::Value::Array(items) if items.len() > limit => {
            items.truncate(limit);
            true
        }
        serde_json::Value::Object(map) => {
            let mut cut = false;
            for v in map.values_mut() {
                cut |= truncate_lists(v, limit);
            }
            cut
        }
        _ => false,
    }
}

/// Room a `user.merged` event needs beyond its `data` (the CloudEvent envelope, headers).
const ENVELOPE_BYTES: usize = 4096;

/// The `user.merged` data: the report with its lists cut to `list_limit`, and cut further
/// (halving the limit) until the event fits in `max_bytes` — the producer's limit; the
/// `merges` table keeps the full report either way.
fn fit_report(
    full: &serde_json::Value,
    list_limit: usize,
    max_bytes: usize,
    finish: impl Fn(&mut serde_json::Value, bool),
) -> serde_json::Value {
    let budget = max_bytes.saturating_sub(ENVELOPE_BYTES);
    let mut limit = list_limit;
    loop {
        let mut data = full.clone();
        let truncated = truncate_lists(&mut data, limit);
        finish(&mut data, truncated);
        let size = serde_json::to_vec(&data).map_or(usize::MAX, |b| b.len());
        if size <= budget || limit == 0 {
            return data;
        }
        limit /= 2;
    }
}

impl Step for AccountMerge {
    type Decoded = Result<MergeRequest, DecodeError>;

    fn decode(&self, ctx: &StepContext, message: &InputMessage) -> Self::Decoded {
        let request = MergeRequest::decode(message.value.as_deref(), ctx.max_message_bytes)?;
        super::check_event_id(&request.event_id)?;
        super::check_event_time(request.occurred_at, Utc::now(), ctx.max_clock_skew)?;
        Ok(request)
    }

    fn inbox_key(&self, message: &InputMessage, decoded: &Self::Decoded) -> String {
        match decoded {
            Ok(request) => request.event_id.clone(),
            Err(_) => message.position_key(),
        }
    }

    async fn apply<'a>(
        &'a self,
        conn: &'a mut PgConnection,
        ctx: &'a StepContext,
        items: &'a [(&'a InputMessage, &'a Self::Decoded)],
    ) -> Result<BatchReport, StoreError> {
        let mut report = BatchReport::default();
        let candidates: Vec<super::Candidate<'_, MergeRequest>> = items
            .iter()
            .map(|(m, d)| (*m, d.as_ref(), self.inbox_key(m, d)))
            .collect();
        let claimed = super::claim_batch(&mut *conn, ctx, &candidates, &mut report).await?;
        let mut rows = claimed.dead_letters;
        for (message, request) in claimed.items {
            // Per-key order: behind a waiting merge of the same key, a merge waits too.
            let behind =
                merge_store::key_waiting(&mut *conn, &ctx.consumer_group, message.key.as_deref())
                    .await?;
            let outcome = if behind {
                MergeOutcome::NotYet
            } else {
                // The budget counts from now, the first time authsync sees this merge.
                let budget_left = ctx.merge.unknown_user_retry_secs > 0;
                self.apply_one(&mut *conn, ctx, message, request, budget_left)
                    .await?
            };
            match outcome {
                MergeOutcome::NotYet => {
                    merge_store::wait(
                        &mut *conn,
                        &ctx.consumer_group,
                        &request.event_id,
                        message.key.as_deref(),
                        &message.topic,
                        message.partition,
                        message.offset,
                        message.value.as_deref(),
                        &crate::store::outbox::pack_headers(&message.headers),
                    )
                    .await?;
                    report.waiting += 1;
                }
                MergeOutcome::Done {
                    rows: more,
                    dead_letter,
                } => {
                    match dead_letter {
                        Some(class) => *report.dead_lettered.entry(class).or_default() += 1,
                        None => report.applied += 1,
                    }
                    rows.extend(more);
                }
            }
        }
        let dead = report.dead_lettered_total();
        report.results = super::write_outbox(&mut *conn, ctx, &rows)
            .await?
            .saturating_sub(dead);
        Ok(report)
    }
}

impl AccountMerge {
    /// Decides and applies one claimed merge request.
    async fn apply_one(
        &self,
        conn: &mut PgConnection,
        ctx: &StepContext,
        message: &InputMessage,
        request: &MergeRequest,
        budget_left: bool,
    ) -> Result<MergeOutcome, StoreError> {
        let (old, new) = (request.old_user_id, request.new_user_id);
        let mut ordered = [old, new];
        ordered.sort();
        let parties = merge_store::lock_parties(&mut *conn, &ordered).await?;
        let find = |id: Uuid| parties.iter().find(|p| p.id == id);
        let chain = match find(new) {
            Some(p) if p.merged_into.is_some() => {
                merge_store::merged_chain(&mut *conn, new).await?
            }
            _ => Vec::new(),
        };
        Ok(
            match merge::decide(old, new, find(old), find(new), &chain, budget_left) {
                MergeDecision::NotYet => MergeOutcome::NotYet,
                MergeDecision::AlreadyDone => MergeOutcome::Done {
                    rows: Vec::new(),
                    dead_letter: None,
                },
                MergeDecision::Reject(rejection) => {
                    let reason =
                        format!("{}: merge of {old} into {new} refused", rejection.as_str());
                    inbox::mark_dead_lettered(&mut *conn, &ctx.consumer_group, &request.event_id)
                        .await?;
                    MergeOutcome::Done {
                        rows: vec![dead_letter(
                            ctx,
                            message,
                            &request.event_id,
                            rejection.as_str(),
                            &reason,
                        )],
                        dead_letter: Some(rejection.as_str()),
                    }
                }
                MergeDecision::Apply => {
                    let merge_report =
                        merge_store::transfer(&mut *conn, old, new, &PERMISSION_ORDER, &ROLE_ORDER)
                            .await?;
                    MergeOutcome::Done {
                        rows: self.announce(conn, ctx, request, &merge_report).await?,
                        dead_letter: None,
                    }
                }
            },
        )
    }

    async fn announce(
        &self,
        conn: &mut PgConnection,
        ctx: &StepContext,
        request: &MergeRequest,
        merge_report: &MergeReport,
    ) -> Result<Vec<crate::store::outbox::NewMessage>, StoreError> {
        let (old, new) = (request.old_user_id, request.new_user_id);
        let full = serde_json::to_value(merge_report).unwrap_or_default();
        merge_store::record(
            &mut *conn,
            ids::derived(ids::NAMESPACE, &format!("merge:{}", request.event_id)),
            old,
            new,
            &request.reason,
            Some(request.requested_by.as_str()),
            &full,
        )
        .await?;
        let data = fit_report(
            &full,
            ctx.merge.report_list_limit,
            ctx.max_publish_bytes,
            |data, truncated| {
                if let Some(obj) = data.as_object_mut() {
                    obj.insert("oldUserId".into(), old.to_string().into());
                    obj.insert("newUserID".into(), new.to_string().into());
                    obj.insert("reason".into(), request.reason.clone().into());
                    obj.insert("requestedBy".into(), request.requested_by.clone().into());
                    obj.insert("changed".into(), merge_report.total().into());
                    obj.insert("truncated".into(), truncated.into());
                }
            },
        );
        let time = request.occurred_at;
        let cause = request.event_id.as_str();
        let revoked: Vec<Uuid> = merge_report.tokens.iter().map(|t| t.token).collect();
        let mut events = vec![
            ResultEvent::new(USER_MERGED, cause, new, time, raw(&data)),
            ResultEvent::new(
                results::USER_TOKEN_REFRESH_REQUIRED,
                cause,
                new,
                time,
                results::token_refresh_data(new, &[RefreshReason::UserMerged]),
            ),
            ResultEvent::new(
                USER_DEACTIVATED,
                cause,
                old,
                time,
                raw(&serde_json::json!({
                    "userId": old,
                    "reason": "merged",
                    "mergedInto": new,
                })),
            ),
        ];
        if !revoked.is_empty() {
            events.push(ResultEvent::new(
                USER_TOKENS_REVOKED,
                cause,
                old,
                time,
                raw(&serde_json::json!({
                    "userId": old,
                    "reason": "merged",
                    "tokenFingerprints": revoked,
                })),
            ));
        }
        Ok(events.iter().map(|e| result_message(ctx, e)).collect())
    }
}

/// Tries the oldest waiting merge of each key again (see [`AccountMerge`]), in one
/// transaction, each in a savepoint of its own; returns how many left the waiting room.
/// Replicas share the work: rows another replica holds are skipped.
pub async fn retry_waiting(
    pool: &sqlx::PgPool,
    ctx: &StepContext,
    limit: i64,
) -> Result<usize, StoreError> {
    let step = AccountMerge;
    let mut tx = crate::store::begin_step(pool, ctx.random_page_cost, LockWait::Unbounded).await?;
    let due = merge_store::due_waits(&mut tx, &ctx.consumer_group, limit).await?;
    let mut left = 0;
    let mut rows = Vec::new();
    for w in &due {
        let message = InputMessage {
            topic: w.topic.clone(),
            partition: w.kafka_partition,
            offset: w.kafka_offset,
            key: w.message_key.clone(),
            value: w.payload.clone(),
            headers: crate::store::outbox::unpack_headers(&w.header_bytes).unwrap_or_default(),
            timestamp: None,
        };
        // Decoded as when it arrived (its `time` passed the skew check then).
        let request = match MergeRequest::decode(message.value.as_deref(), ctx.max_message_bytes) {
            Ok(r) => r,
            Err(e) => {
                rows.push(dead_letter(
                    ctx,
                    &message,
                    &w.event_id,
                    e.class.as_str(),
                    &e.reason,
                ));
                inbox::mark_dead_lettered(&mut tx, &ctx.consumer_group, &w.event_id).await?;
                merge_store::done_waiting(&mut tx, w.id).await?;
                left += 1;
                continue;
            }
        };
        let waited = Utc::now() - w.first_seen_at;
        let budget_left = waited.num_seconds() < ctx.merge.unknown_user_retry_secs as i64;
        let mut savepoint = sqlx::Connection::begin(&mut *tx).await?;
        match step
            .apply_one(&mut savepoint, ctx, &message, &request, budget_left)
            .await
        {
            Ok(MergeOutcome::NotYet) => {
                savepoint.rollback().await?;
                // Back off: 0.2 s, 0.4 s, … up to 5 s between attempts.
                let delay = (200i64 << w.attempts.clamp(0, 5)).min(5_000);
                merge_store::reschedule(&mut tx, w.id, delay).await?;
            }
            Ok(MergeOutcome::Done { rows: more, .. }) => {
                savepoint.commit().await?;
                rows.extend(more);
                merge_store::done_waiting(&mut tx, w.id).await?;
                left += 1;
            }
            Err(e) if e.is_retryable() => return Err(e),
            Err(e) => {
                savepoint.rollback().await?;
                tracing::warn!(event_id = %w.event_id, error = %e, "waiting merge refused by the database; dead-lettering it");
                inbox::mark_dead_lettered(&mut tx, &ctx.consumer_group, &w.event_id).await?;
                rows.push(dead_letter(
                    ctx,
                    &message,
                    &w.event_id,
                    crate::events::ErrorClass::Unprocessable.as_str(),
                    &e.to_string(),
                ));
                merge_store::done_waiting(&mut tx, w.id).await?;
                left += 1;
            }
        }
    }
    super::write_outbox(&mut tx, ctx, &rows).await?;
    tx.commit().await?;
    Ok(left)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_huge_merge_report_is_cut_until_the_event_fits_the_producer() {
        let ids: Vec<String> = (0..20_000).map(|i| format!("{:036}", i)).collect();
        let full = serde_json::json!({"assets": ids, "threads": ids, "nested": {"devices": ids}});
        let data = fit_report(&full, 1000, 100_000, |d, truncated| {
            d.as_object_mut()
                .map(|o| o.insert("truncated".into(), truncated.into()));
        });
        let size = serde_json::to_vec(&data)
            .map(|b| b.len())
            .unwrap_or(usize::MAX);
        assert!(size <= 100_000 - ENVELOPE_BYTES, "{size}");
        assert_eq!(data["truncated"], serde_json::json!(true));
        assert!(
            !data["assets"].as_array().map(Vec::is_empty).unwrap_or(true),
            "still shows some"
        );
        // A small report is left whole.
        let small = serde_json::json!({"assets": ["a", "b"]});
        let kept = fit_report(&small, 1000, 100_000, |d, t| {
            d.as_object_mut()
                .map(|o| o.insert("truncated".into(), t.into()));
        });
        assert_eq!(kept["assets"], serde_json::json!(["a", "b"]));
        assert_eq!(kept["truncated"], serde_json::json!(false));
    }
}

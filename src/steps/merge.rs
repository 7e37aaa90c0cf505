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
use crate::store::{inbox, StoreError};

pub const USER_MERGED: &str = "user.merged";
pub const USER_DEACTIVATED: &str = "user.deactivated";

/// Weakest first: on a duplicate, the stronger permission / role survives.
pub const PERMISSION_ORDER: [&str; 4] = ["read", "write", "admin", "owner"];
pub const ROLE_ORDER: [&str; 4] = ["viewer", "member", "admin", "owner"];

/// The account-merge step. It remembers when it first saw each merge that had to wait for
/// its users: the unknown-user budget (`merge.unknown_user_retry_secs`) counts from there,
/// not from the producer's `time`, so a backlog after an outage does not use it up and a
/// future `time` cannot stretch it. (A restart or a partition moving to another replica
/// starts the budget again: a merge is never refused early.)
#[derive(Default)]
pub struct AccountMerge {
    first_seen: std::sync::Mutex<std::collections::HashMap<String, chrono::DateTime<Utc>>>,
}

/// Waiting merges remembered at most; older entries are dropped first.
const MAX_WAITING_MERGES: usize = 100_000;

impl AccountMerge {
    /// When this process first saw the merge `event_id` wait (now, the first time).
    fn first_seen(&self, event_id: &str, now: chrono::DateTime<Utc>) -> chrono::DateTime<Utc> {
        let Ok(mut seen) = self.first_seen.lock() else {
            return now;
        };
        if seen.len() >= MAX_WAITING_MERGES && !seen.contains_key(event_id) {
            let cutoff = now - chrono::Duration::days(1);
            seen.retain(|_, t| *t > cutoff);
            if seen.len() >= MAX_WAITING_MERGES {
                seen.clear();
            }
        }
        *seen.entry(event_id.to_string()).or_insert(now)
    }

    fn resolved(&self, event_id: &str) {
        if let Ok(mut seen) = self.first_seen.lock() {
            seen.remove(event_id);
        }
    }
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
            let now = Utc::now();
            let waited = now - self.first_seen(&request.event_id, now);
            let budget_left = waited.num_seconds() < ctx.merge.unknown_user_retry_secs as i64;
            let decision = merge::decide(old, new, find(old), find(new), &chain, budget_left);
            if decision != MergeDecision::NotYet {
                self.resolved(&request.event_id);
            }
            match decision {
                MergeDecision::NotYet => {
                    return Err(StoreError::NotYet(format!(
                        "merge {}: user {} or {} does not exist yet",
                        request.event_id, old, new
                    )));
                }
                MergeDecision::AlreadyDone => {
                    report.applied += 1;
                }
                MergeDecision::Reject(rejection) => {
                    let reason =
                        format!("{}: merge of {old} into {new} refused", rejection.as_str());
                    inbox::mark_dead_lettered(&mut *conn, &ctx.consumer_group, &request.event_id)
                        .await?;
                    rows.push(dead_letter(
                        ctx,
                        message,
                        &request.event_id,
                        rejection.as_str(),
                        &reason,
                    ));
                    *report.dead_lettered.entry(rejection.as_str()).or_default() += 1;
                }
                MergeDecision::Apply => {
                    let merge_report =
                        merge_store::transfer(&mut *conn, old, new, &PERMISSION_ORDER, &ROLE_ORDER)
                            .await?;
                    rows.extend(self.announce(conn, ctx, request, &merge_report).await?);
                    report.applied += 1;
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
            request.requested_by.as_deref(),
            &full,
        )
        .await?;
        let mut data = full;
        let truncated = truncate_lists(&mut data, ctx.merge.report_list_limit);
        if let Some(obj) = data.as_object_mut() {
            obj.insert("oldUserId".into(), old.to_string().into());
            obj.insert("newUserID".into(), new.to_string().into());
            obj.insert("reason".into(), request.reason.clone().into());
            obj.insert("requestedBy".into(), request.requested_by.clone().into());
            obj.insert("changed".into(), merge_report.total().into());
            obj.insert("truncated".into(), truncated.into());
        }
        let time = request.occurred_at;
        let cause = request.event_id.as_str();
        let events = [
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
        Ok(events.iter().map(|e| result_message(ctx, e)).collect())
    }
}

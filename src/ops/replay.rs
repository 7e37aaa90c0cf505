//! `authsync replay`: rewind a consumer group so its events are read again.
//!
//! Every step is idempotent, so a plain replay re-applies nothing (each event finds its
//! inbox row). `--reprocess` also deletes the inbox rows of the replayed range, so the
//! events are applied again (re-deriving state after a bug fix); their result events keep
//! their deterministic ids, and the outbox ignores ids it still holds.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use chrono::{DateTime, Utc};
use rdkafka::consumer::{BaseConsumer, CommitMode, Consumer};
use rdkafka::{Offset, TopicPartitionList};
use sqlx::PgPool;

use crate::config::Config;
use crate::kafka::client_config;

/// Where the replay starts.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ReplayFrom {
    Beginning,
    Time(DateTime<Utc>),
    /// Explicit offsets per partition (partitions not listed keep theirs).
    Offsets(BTreeMap<i32, i64>),
}

/// `p:o,p:o` → offsets.
pub fn parse_offsets(text: &str) -> anyhow::Result<BTreeMap<i32, i64>> {
    let mut out = BTreeMap::new();
    for part in text.split(',').map(str::trim).filter(|p| !p.is_empty()) {
        let (p, o) = part
            .split_once(':')
            .with_context(|| format!("`{part}` is not partition:offset"))?;
        let p: i32 = p
            .parse()
            .with_context(|| format!("partition in `{part}`"))?;
        let o: i64 = o.parse().with_context(|| format!("offset in `{part}`"))?;
        if p < 0 || o < 0 {
            bail!("`{part}`: partitions and offsets are not negative");
        }
        out.insert(p, o);
    }
    if out.is_empty() {
        bail!("--from-offset needs at least one partition:offset");
    }
    Ok(out)
}

#[derive(Clone, Debug)]
pub struct ReplayRequest {
    pub topic: String,
    pub group: String,
    pub from: ReplayFrom,
    pub reprocess: bool,
    pub dry_run: bool,
}

/// One partition's plan.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PartitionPlan {
    pub partition: i32,
    /// Committed offset now (`None`: the group has none).
    pub current: Option<i64>,
    pub new: i64,
    /// End of the partition (next offset to be written).
    pub high: i64,
}

impl PartitionPlan {
    /// Events that will be read again (or skipped forward, when negative).
    pub fn rereads(&self) -> i64 {
        self.current.unwrap_or(self.high) - self.new
    }
}

#[derive(Debug)]
pub struct ReplayOutcome {
    pub plans: Vec<PartitionPlan>,
    pub inbox_rows_deleted: u64,
    pub applied: bool,
}

const TIMEOUT: Duration = Duration::from_secs(10);
/// Live-worker checks before refusing (about 2 s in all).
const LIVE_CHECKS: u32 = 10;
const LIVE_CHECK_INTERVAL: Duration = Duration::from_millis(200);

fn consumer(config: &Config, group: &str) -> anyhow::Result<BaseConsumer> {
    client_config(&config.kafka)
        .set("group.id", group)
        .set("enable.auto.commit", "false")
        .set("session.timeout.ms", "10000")
        // The workers' strategy: a group cannot mix assignment protocols.
        .set("partition.assignment.strategy", "cooperative-sticky")
        .create()
        .context("cannot create a Kafka client")
}

/// Plans (and unless `dry_run`, applies) a replay.
pub async fn run(
    config: &Config,
    pool: &PgPool,
    request: &ReplayRequest,
) -> anyhow::Result<ReplayOutcome> {
    // Workers of the group hold database connections named after it: a check that does
    // not depend on what the broker reports about the group. The backends of workers that
    // were just stopped take a moment to exit: they get a short grace period.
    let mut checks = 0;
    let (live, hosts) = loop {
        let (live, hosts) = crate::store::live_workers(pool, &request.group).await?;
        checks += 1;
        if live == 0 || checks >= LIVE_CHECKS {
            break (live, hosts);
        }
        tokio::time::sleep(LIVE_CHECK_INTERVAL).await;
    };
    if live > 0 {
        bail!(
            "consumer group `{}` has live workers ({live} database connection(s) from {hosts}). \
             Stop the workers first (e.g. `kubectl scale deploy/authsync --replicas=0`, or \
             pause KEDA), then retry",
            request.group
        );
    }
    let (cfg, req) = (config.clone(), request.clone());
    let plans = tokio::task::spawn_blocking(move || plan(&cfg, &req, true)).await??;
    if request.dry_run {
        return Ok(ReplayOutcome {
            plans,
            inbox_rows_deleted: 0,
            applied: false,
        });
    }
    // Offsets first: taking the group over is also the last live-member check. If the
    // inbox clean-up then fails, running the command again redoes both.
    let (cfg, req, p) = (config.clone(), request.clone(), plans.clone());
    tokio::task::spawn_blocking(move || commit(&cfg, &req, &p)).await??;
    let mut deleted = 0;
    if request.reprocess {
        let partitions: Vec<i32> = plans.iter().map(|p| p.partition).collect();
        let offsets: Vec<i64> = plans.iter().map(|p| p.new).collect();
        let ends = vec![i64::MAX; partitions.len()];
        deleted = crate::store::inbox::delete_positions(
            pool,
            &request.group,
            &request.topic,
            &partitions,
            &offsets,
            &ends,
        )
        .await?;
    }
    Ok(ReplayOutcome {
        plans,
        inbox_rows_deleted: deleted,
        applied: true,
    })
}

pub(crate) fn plan(
    config: &Config,
    request: &ReplayRequest,
    refuse_members: bool,
) -> anyhow::Result<Vec<PartitionPlan>> {
    let client = consumer(config, &request.group)?;
    // Brokers that cannot describe groups (librdkafka's mock) fall through to the takeover
    // check in `commit`, which also refuses when it cannot get every partition.
    let groups =
        match refuse_members.then(|| client.fetch_group_list(Some(&request.group), TIMEOUT)) {
            Some(Ok(g)) => Some(g),
            Some(Err(e)) => {
                tracing::debug!(error = %e, "cannot describe the consumer group");
                None
            }
            None => None,
        };
    if let Some(group) = groups.as_ref().and_then(|g| g.groups().first()) {
        let members = group.members();
        let state = group.state().to_string();
        tracing::debug!(group = %request.group, %state, members = members.len(), "consumer group");
        // A group rebalancing or stable is in use even while its member list is empty.
        let busy = matches!(
            state.as_str(),
            "Stable" | "PreparingRebalance" | "CompletingRebalance"
        );
        if !members.is_empty() || busy {
            let who: Vec<String> = members
                .iter()
                .map(|m| format!("{} ({})", m.client_id(), m.client_host()))
                .collect();
            bail!(
                "consumer group `{}` has {} live member(s): {}. Stop the workers first \
                 (e.g. `kubectl scale deploy/authsync --replicas=0`, or pause KEDA), then retry",
                request.group,
                members.len(),
                who.join(", ")
            );
        }
    }
    let metadata = client
        .fetch_metadata(Some(&request.topic), TIMEOUT)
        .context("cannot read topic metadata")?;
    let Some(topic) = metadata
        .topics()
        .iter()
        .find(|t| t.name() == request.topic && t.error().is_none())
    else {
        bail!("topic `{}` does not exist", request.topic);
    };
    let partitions: Vec<i32> = topic.partitions().iter().map(|p| p.id()).collect();
    let mut tpl = TopicPartitionList::new();
    for p in &partitions {
        tpl.add_partition(&request.topic, *p);
    }
    let committed = client
        .committed_offsets(tpl, TIMEOUT)
        .context("cannot read committed offsets")?;
    let mut plans = Vec::new();
    let by_time = match &request.from {
        ReplayFrom::Time(t) => {
            let mut q = TopicPartitionList::new();
            for p in &partitions {
                q.add_partition_offset(&request.topic, *p, Offset::Offset(t.timestamp_millis()))?;
            }
            Some(client.offsets_for_times(q, TIMEOUT)?)
        }
        _ => None,
    };
    for p in partitions {
        let (low, high) = client.fetch_watermarks(&request.topic, p, TIMEOUT)?;
        let current = committed
            .find_partition(&request.topic, p)
            .and_then(|e| e.offset().to_raw())
            .filter(|o| *o >= 0);
        let new = match &request.from {
            ReplayFrom::Beginning => low,
            ReplayFrom::Offsets(map) => match map.get(&p) {
                Some(o) => (*o).clamp(low, high),
                None => current.unwrap_or(high),
            },
            ReplayFrom::Time(_) => by_time
                .as_ref()
                .and_then(|t| t.find_partition(&request.topic, p))
                .and_then(|e| e.offset().to_raw())
                .filter(|o| *o >= 0)
                .unwrap_or(high),
        };
        plans.push(PartitionPlan {
            partition: p,
            current,
            new,
            high,
        });
    }
    if let ReplayFrom::Offsets(map) = &request.from {
        if let Some(bad) = map
            .keys()
            .find(|p| !plans.iter().any(|x| x.partition == **p))
        {
            bail!("topic `{}` has no partition {bad}", request.topic);
        }
    }
    Ok(plans)
}

/// Joins the (empty) group, takes every partition, commits the new offsets, leaves. The
/// coordinator only takes commits from members, and an empty group is what we checked.
fn commit(config: &Config, request: &ReplayRequest, plans: &[PartitionPlan]) -> anyhow::Result<()> {
    let client = consumer(config, &request.group)?;
    client.subscribe(&[&request.topic])?;
    let deadline = Instant::now() + Duration::from_secs(20);
    while client.assignment().map(|a| a.count()).unwrap_or(0) < plans.len() {
        if Instant::now() > deadline {
            let got = client.assignment().map(|a| a.count()).unwrap_or(0);
            client.unsubscribe();
            bail!(
                "consumer group `{}` has live member(s): this command got only {got} of {} \
                 partitions. Stop the workers first (e.g. `kubectl scale deploy/authsync \
                 --replicas=0`, or pause KEDA), then retry",
                request.group,
                plans.len()
            );
        }
        if let Some(Err(e)) = client.poll(Duration::from_millis(100)) {
            tracing::debug!(error = %e, "replay poll");
        }
    }
    let mut tpl = TopicPartitionList::new();
    for plan in plans {
        tpl.add_partition_offset(&request.topic, plan.partition, Offset::Offset(plan.new))?;
    }
    client
        .commit(&tpl, CommitMode::Sync)
        .context("cannot commit the new offsets")?;
    client.unsubscribe();
    let _ = client.poll(Duration::from_millis(100));
    Ok(())
}

/// Human-readable plan / result.
pub fn render(request: &ReplayRequest, outcome: &ReplayOutcome) -> String {
    let mut out = format!(
        "{} replay of `{}` for group `{}`{}:\n",
        if outcome.applied {
            "Applied"
        } else {
            "Dry run:"
        },
        request.topic,
        request.group,
        if request.reprocess {
            " (reprocess: inbox rows of the range deleted)"
        } else {
            ""
        }
    );
    out.push_str("  partition   committed        new        end   re-read\n");
    let mut total = 0;
    for p in &outcome.plans {
        total += p.rereads().max(0);
        out.push_str(&format!(
            "  {:>9} {:>11} {:>10} {:>10} {:>9}\n",
            p.partition,
            p.current.map_or("-".to_string(), |c| c.to_string()),
            p.new,
            p.high,
            p.rereads()
        ));
    }
    out.push_str(&format!("  events to read again: {total}\n"));
    if request.reprocess && outcome.applied {
        out.push_str(&format!(
            "  inbox rows deleted: {}\n",
            outcome.inbox_rows_deleted
        ));
    }
    if !outcome.applied {
        out.push_str("  nothing was changed (drop --dry-run to apply)\n");
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_partition_offsets() {
        let m = parse_offsets("0:10, 2:5").unwrap();
        assert_eq!(m.get(&0), Some(&10));
        assert_eq!(m.get(&2), Some(&5));
        assert!(parse_offsets("0=1").is_err());
        assert!(parse_offsets("x:1").is_err());
        assert!(parse_offsets("").is_err());
    }
}

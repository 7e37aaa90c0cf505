//! `authsync replay --online`: re-read a range of a topic beside the running workers.
//!
//! A rewind puts every replayed event in front of the live ones: a login arriving during a
//! 200,000-event replay waits until the replay is through (seconds, at any throughput).
//! The online lane leaves the workers' group at the head and reads `from..committed` of
//! each partition itself, with a consumer in no group (it commits nothing to Kafka), one
//! batch at a time through the same step and inbox as the workers. So live logins never
//! queue behind replayed ones; they share only the database.
//!
//! Order: a replayed event is applied after newer live ones of the same user. Every claim,
//! the profile and the login time carry the time of the event that set them and an older
//! event never overwrites a newer one, so the outcome is the same as in order.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use rdkafka::consumer::{Consumer, StreamConsumer};
use rdkafka::{Offset, TopicPartitionList};
use sqlx::PgPool;
use tokio_util::sync::CancellationToken;

use super::replay::{PartitionPlan, ReplayRequest};
use crate::config::Config;
use crate::consumer::{to_input, BatchHandler, Containment, StepHandler};
use crate::steps::auth_sync::AuthSync;
use crate::steps::merge::AccountMerge;
use crate::steps::InputMessage;
use crate::steps::{BatchReport, StepContext};
use crate::store::StoreError;

/// How the lane paces itself.
#[derive(Clone, Debug, Default)]
pub struct LaneOptions {
    /// At most this many events per second (`None`: as fast as one transaction at a time goes).
    pub max_rate: Option<u32>,
}

/// What the lane did.
#[derive(Debug, Default)]
pub struct LaneOutcome {
    pub plans: Vec<PartitionPlan>,
    pub inbox_rows_deleted: u64,
    /// Events read per partition (the range of its plan, all of it unless interrupted).
    pub read: BTreeMap<i32, u64>,
    pub report: BatchReport,
    pub seconds: f64,
    /// Stopped by a signal before the end; the offsets to resume from, per partition.
    pub interrupted: Option<BTreeMap<i32, i64>>,
}

/// The range each partition re-reads: from the plan's start to where the group is now.
/// A partition the group has committed nothing on is the workers' to read: none.
fn range(plan: &PartitionPlan) -> (i64, i64) {
    (plan.new, plan.current.unwrap_or(plan.new))
}

/// Replays `request` beside the live workers (see the module docs).
pub async fn run(
    config: &Config,
    pool: &PgPool,
    request: &ReplayRequest,
    options: &LaneOptions,
    shutdown: CancellationToken,
) -> anyhow::Result<LaneOutcome> {
    let handler: Arc<dyn BatchHandler> = {
        let mut ctx = StepContext::from_config(config)?;
        // The inbox of the group replayed: what it applied is found there.
        ctx.consumer_group = request.group.clone();
        // Its ranges were read before: mostly duplicates.
        ctx.expect_duplicates = true;
        let committed = crate::relay::CommitSignal::default();
        let pool = pool.clone();
        if request.topic == config.topics.login {
            Arc::new(StepHandler {
                pool,
                ctx,
                step: AuthSync,
                committed,
            })
        } else if request.topic == config.topics.merge {
            Arc::new(StepHandler {
                pool,
                ctx,
                step: AccountMerge,
                committed,
            })
        } else {
            bail!(
                "topic `{}` is neither topics.login (`{}`) nor topics.merge (`{}`)",
                request.topic,
                config.topics.login,
                config.topics.merge
            );
        }
    };
    let (cfg, req) = (config.clone(), request.clone());
    let plans =
        tokio::task::spawn_blocking(move || super::replay::plan(&cfg, &req, false)).await??;
    let mut outcome = LaneOutcome {
        plans: plans.clone(),
        ..LaneOutcome::default()
    };
    if request.dry_run {
        return Ok(outcome);
    }
    // One lane per group and topic: two would race each other's `--reprocess`. The lock
    // lives as long as this connection, taken out of the pool: however this function
    // ends, dropping it closes the session and releases the lock.
    let mut lock = pool
        .acquire()
        .await
        .context("cannot reach Postgres")?
        .detach();
    let lock_key = format!("authsync-replay:{}:{}", request.group, request.topic);
    let locked: bool = sqlx::query_scalar("SELECT pg_try_advisory_lock(hashtextextended($1, 0))")
        .bind(&lock_key)
        .fetch_one(&mut lock)
        .await?;
    if !locked {
        bail!(
            "another online replay of `{}` for group `{}` is running",
            request.topic,
            request.group
        );
    }

    let work: Vec<(i32, i64, i64)> = plans
        .iter()
        .map(|p| {
            let (from, until) = range(p);
            (p.partition, from, until)
        })
        .filter(|(_, from, until)| from < until)
        .collect();
    if request.reprocess {
        let partitions: Vec<i32> = work.iter().map(|w| w.0).collect();
        let from: Vec<i64> = work.iter().map(|w| w.1).collect();
        let until: Vec<i64> = work.iter().map(|w| w.2).collect();
        outcome.inbox_rows_deleted = crate::store::inbox::delete_positions(
            pool,
            &request.group,
            &request.topic,
            &partitions,
            &from,
            &until,
        )
        .await?;
    }
    let started = Instant::now();
    let interrupted = read_ranges(
        config,
        request,
        &work,
        &*handler,
        options,
        &mut outcome,
        &shutdown,
    )
    .await?;
    outcome.interrupted = interrupted;
    outcome.seconds = started.elapsed().as_secs_f64();
    drop(lock);
    Ok(outcome)
}

/// Reads every partition's range and applies it, one batch at a time.
async fn read_ranges(
    config: &Config,
    request: &ReplayRequest,
    work: &[(i32, i64, i64)],
    handler: &dyn BatchHandler,
    options: &LaneOptions,
    outcome: &mut LaneOutcome,
    shutdown: &CancellationToken,
) -> anyhow::Result<Option<BTreeMap<i32, i64>>> {
    if work.is_empty() {
        return Ok(None);
    }
    // The workers' fetch settings (small per-partition buffers: the lane pulls what it
    // applies, not the whole range at once, which would load the broker the live logins
    // need), in a group of its own that never commits: the workers' group is not touched.
    let tag = uuid::Uuid::new_v4().simple().to_string();
    let mut settings = crate::consumer::consumer_client_config(config);
    settings
        .set("group.id", format!("{}.replay-{tag}", request.group))
        .set("enable.auto.commit", "false")
        .set("fetch.wait.max.ms", "100");
    if settings.get("group.instance.id").is_some() {
        settings.set("group.instance.id", format!("replay-{tag}"));
    }
    let client_id = settings.get("client.id").unwrap_or("authsync").to_owned();
    settings.set("client.id", format!("{client_id}-replay"));
    let reader: StreamConsumer = settings
        .create()
        .context("cannot create the replay's Kafka reader")?;
    let mut tpl = TopicPartitionList::new();
    for (p, from, _) in work {
        tpl.add_partition_offset(&request.topic, *p, Offset::Offset(*from))?;
    }
    reader
        .assign(&tpl)
        .context("cannot assign the replayed partitions")?;

    // Next offset to apply, per partition still in the range.
    let mut next: BTreeMap<i32, (i64, i64)> = work
        .iter()
        .map(|(p, from, until)| (*p, (*from, *until)))
        .collect();
    // Paced, a batch is at most a tenth of a second's worth, so the pace is smooth.
    let batch_size = match options.max_rate.filter(|r| *r > 0) {
        Some(rate) => config.consumer.batch_size.min((rate as usize / 10).max(1)),
        None => config.consumer.batch_size,
    }
    .max(1);
    let mut last_progress = Instant::now();
    let paced_from = Instant::now();
    let mut sent: u64 = 0;
    while !next.is_empty() {
        let mut batches: BTreeMap<i32, Vec<InputMessage>> = BTreeMap::new();
        let mut taken = 0;
        // Gather up to a batch; stop early when the reader has nothing more right now.
        while taken < batch_size {
            let wait = if taken == 0 { 1_000 } else { 5 };
            let received = tokio::select! {
                _ = shutdown.cancelled() => {
                    return Ok(Some(next.iter().map(|(p, (o, _))| (*p, *o)).collect()));
                }
                r = tokio::time::timeout(Duration::from_millis(wait), reader.recv()) => r,
            };
            let message = match received {
                Err(_) => break,
                Ok(Err(e)) => {
                    tracing::warn!(error = %e, "replay reader");
                    continue;
                }
                Ok(Ok(m)) => to_input(&m),
            };
            let Some((expected, until)) = next.get(&message.partition).copied() else {
                continue;
            };
            // Past the range (or a re-fetch of what was applied): not this lane's.
            if message.offset >= until || message.offset < expected {
                continue;
            }
            batches.entry(message.partition).or_default().push(message);
            taken += 1;
        }
        for (partition, batch) in batches {
            let Some(last) = batch.last().map(|m| m.offset) else {
                continue;
            };
            let Some(report) = apply(config, handler, &batch, shutdown).await else {
                return Ok(Some(next.iter().map(|(p, (o, _))| (*p, *o)).collect()));
            };
            outcome.report.absorb(report);
            *outcome.read.entry(partition).or_default() += batch.len() as u64;
            sent += batch.len() as u64;
            if let Some(entry) = next.get_mut(&partition) {
                entry.0 = last + 1;
            }
        }
        // A partition is done at its range's end, or at the end of the log: offsets taken
        // by transaction markers or compaction never arrive.
        let mut done = Vec::new();
        for (p, (expected, until)) in &next {
            if expected >= until {
                done.push(*p);
            } else if taken == 0 {
                let (_, high) = reader
                    .fetch_watermarks(&request.topic, *p, Duration::from_secs(5))
                    .context("cannot read the partition's end")?;
                let position = reader
                    .position()
                    .ok()
                    .and_then(|t| {
                        t.find_partition(&request.topic, *p)
                            .and_then(|e| e.offset().to_raw())
                    })
                    .unwrap_or(*expected);
                if position >= (*until).min(high) {
                    done.push(*p);
                }
            }
        }
        if !done.is_empty() {
            // Stop fetching what lies past the range: the workers read it.
            let mut finished = TopicPartitionList::new();
            for p in &done {
                next.remove(p);
                finished.add_partition(&request.topic, *p);
            }
            if let Err(e) = reader.pause(&finished) {
                tracing::debug!(error = %e, "pausing finished partitions");
            }
        }
        if last_progress.elapsed() >= Duration::from_secs(5) {
            last_progress = Instant::now();
            let left: i64 = next.values().map(|(o, u)| u - o).sum();
            tracing::info!(read = sent, left, "online replay in progress");
        }
        if let Some(rate) = options.max_rate.filter(|r| *r > 0) {
            let due = paced_from + Duration::from_secs_f64(sent as f64 / f64::from(rate));
            tokio::select! {
                _ = shutdown.cancelled() => {}
                _ = tokio::time::sleep_until(due.into()) => {}
            }
        }
    }
    Ok(None)
}

/// Applies one batch of the range under the workers' contract ([`Containment`]: retried,
/// narrowed down, dead-lettered as a last resort); `None` when the lane was stopped first.
async fn apply(
    config: &Config,
    handler: &dyn BatchHandler,
    batch: &[InputMessage],
    shutdown: &CancellationToken,
) -> Option<BatchReport> {
    let containment = Containment {
        handler,
        retry: &config.consumer,
        on_retry: Box::new(|e: &StoreError, delay: Duration| {
            tracing::warn!(error = %e, kind = e.kind(), retry_in = ?delay, "replay batch failed transiently; retrying");
        }),
        on_skipped: Box::new(|m: &InputMessage, e: &StoreError| {
            tracing::error!(partition = m.partition, offset = m.offset, error = %e, "the last-resort dead letter failed too; the message is skipped (replay it from this offset)");
        }),
    };
    tokio::select! {
        _ = shutdown.cancelled() => None,
        report = containment.apply(batch, None) => Some(report),
    }
}

/// Human-readable result.
pub fn render(request: &ReplayRequest, outcome: &LaneOutcome) -> String {
    let mut out = format!(
        "{} online replay of `{}` for group `{}`{} (the workers' group is not moved):\n",
        if request.dry_run {
            "Dry run:"
        } else {
            "Finished"
        },
        request.topic,
        request.group,
        if request.reprocess {
            " (reprocess: inbox rows of the range deleted)"
        } else {
            ""
        }
    );
    out.push_str("  partition       from      until      read\n");
    for p in &outcome.plans {
        let (from, until) = range(p);
        out.push_str(&format!(
            "  {:>9} {:>10} {:>10} {:>9}\n",
            p.partition,
            from,
            until,
            outcome.read.get(&p.partition).copied().unwrap_or(0)
        ));
    }
    if request.dry_run {
        out.push_str("  nothing was read (drop --dry-run to run it)\n");
        return out;
    }
    let r = &outcome.report;
    out.push_str(&format!(
        "  read {} in {:.1} s: applied {}, already applied {}, dead-lettered {}, results {}\n",
        outcome.read.values().sum::<u64>(),
        outcome.seconds,
        r.applied,
        r.duplicates,
        r.dead_lettered_total(),
        r.results
    ));
    if request.reprocess {
        out.push_str(&format!(
            "  inbox rows deleted: {}\n",
            outcome.inbox_rows_deleted
        ));
    }
    if let Some(resume) = &outcome.interrupted {
        let offsets: Vec<String> = resume.iter().map(|(p, o)| format!("{p}:{o}")).collect();
        out.push_str(&format!(
            "  interrupted; resume with --online --from-offset {}\n",
            offsets.join(",")
        ));
    }
    out
}

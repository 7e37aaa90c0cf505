//! `authsync outbox status`: is the relay keeping up, and who leads it?

use chrono::{DateTime, Utc};
use sqlx::PgPool;

use crate::relay::LEADER_LOCK_KEY;
use crate::store::outbox;

#[derive(Debug)]
pub struct Leader {
    pub pid: i32,
    pub application_name: String,
    pub client_addr: Option<String>,
    pub since: Option<DateTime<Utc>>,
}

#[derive(Debug)]
pub struct OutboxStatus {
    pub backlog: outbox::Backlog,
    /// Ids of emitted events remembered so a replay does not announce them again.
    pub emitted_remembered: i64,
    pub leader: Option<Leader>,
}

pub async fn status(pool: &PgPool) -> Result<OutboxStatus, sqlx::Error> {
    let backlog = outbox::backlog(pool).await?;
    let emitted_remembered = outbox::remembered(pool).await?;
    // A bigint advisory key shows in pg_locks as classid (high 32 bits) / objid (low).
    let leader = sqlx::query!(
        r#"SELECT a.pid AS "pid!", a.application_name AS "application_name!",
                  a.client_addr::text AS client_addr, a.backend_start
           FROM pg_locks l JOIN pg_stat_activity a ON a.pid = l.pid
           WHERE l.locktype = 'advisory' AND l.granted AND l.objsubid = 1
             AND l.database = (SELECT oid FROM pg_database WHERE datname = current_database())
             AND ((l.classid::int8 << 32) | l.objid::int8) = $1
           LIMIT 1"#,
        LEADER_LOCK_KEY
    )
    .fetch_optional(pool)
    .await?
    .map(|r| Leader {
        pid: r.pid,
        application_name: r.application_name,
        client_addr: r.client_addr,
        since: r.backend_start,
    });
    Ok(OutboxStatus {
        backlog,
        emitted_remembered,
        leader,
    })
}

pub fn render_parked(rows: &[outbox::Parked]) -> String {
    if rows.is_empty() {
        return "no parked rows\n".into();
    }
    let mut out = format!(
        "{} parked row(s) (authsync outbox retry [--id N]… puts them back)\n",
        rows.len()
    );
    for r in rows {
        out.push_str(&format!(
            "  id {:<10} {:<12} {:<24} {:>9} bytes  parked {}  {}\n  {:>13} event {}\n",
            r.id,
            r.event_type,
            r.topic,
            r.bytes,
            r.parked_at.to_rfc3339(),
            r.error,
            "",
            r.event_id
        ));
    }
    out
}

pub fn render(s: &OutboxStatus) -> String {
    let age = s
        .backlog
        .oldest
        .map(|t| format!("{}s", (Utc::now() - t).num_seconds().max(0)))
        .unwrap_or_else(|| "-".into());
    let leader = match &s.leader {
        Some(l) => format!(
            "pid {} ({}{}) since {}",
            l.pid,
            l.application_name,
            l.client_addr
                .as_ref()
                .map(|a| format!(" from {a}"))
                .unwrap_or_default(),
            l.since.map(|t| t.to_rfc3339()).unwrap_or_default()
        ),
        None => "NONE — no relay holds the leader lock; results are not being published".into(),
    };
    format!(
        "outbox backlog:       {} unpublished\noldest unpublished:   {age}\nemitted ids kept:     {} (de-duplication)\nrelay leader:         {leader}\n",
        s.backlog.unpublished, s.emitted_remembered
    )
}

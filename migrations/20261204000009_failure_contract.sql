-- The failure contract (issue 17).
--
-- Headers as bytes: a header value may hold any byte, NUL included, which a jsonb string
-- cannot; a dead letter carrying one could never be written. New rows carry their headers
-- here (see `store::outbox::pack_headers`); rows written before keep the jsonb column.
ALTER TABLE outbox ADD COLUMN header_bytes bytea;
-- A tombstone (null value) stays null on its dead letter.
ALTER TABLE outbox ALTER COLUMN payload DROP NOT NULL;

-- Rows the broker refused for good (too large, unknown topic, not authorized): moved out
-- of the outbox so they never hold the rows behind them; `authsync outbox parked` lists
-- them and `authsync outbox retry` puts them back at the end of the outbox.
CREATE TABLE outbox_parked (
    id           bigint PRIMARY KEY,
    event_id     uuid NOT NULL,
    topic        text NOT NULL,
    message_key  bytea,
    event_type   text NOT NULL,
    payload      bytea,
    headers      jsonb NOT NULL DEFAULT '[]',
    header_bytes bytea,
    created_at   timestamptz NOT NULL,
    parked_at    timestamptz NOT NULL DEFAULT now(),
    error        text NOT NULL
);

-- The original of a dead letter too large for the producer: the dead letter on Kafka
-- carries the headers and a reference (`authsync-dlq-body-ref`), the bytes stay here
-- (`authsync dlq show`, and `authsync dlq redrive` restores them).
CREATE TABLE dead_letter_bodies (
    event_id     uuid PRIMARY KEY,
    topic        text NOT NULL,
    message_key  bytea,
    payload      bytea,
    header_bytes bytea NOT NULL,
    created_at   timestamptz NOT NULL DEFAULT now()
);

-- The relay's fence: the oldest transaction still running that could write the outbox.
-- Rows of transactions below it are all committed and visible, so publishing them in id
-- order never lets a late commit be overtaken. Transaction ids are cluster-wide; a
-- transaction that a backend connected to *another* database is running cannot write this
-- outbox, so it does not hold publishing (before, an idle-in-transaction session in any
-- database of the cluster held every result). A running transaction whose database cannot
-- be told (it ended meanwhile, or it is a prepared transaction) still counts: the fence
-- errs on the side of waiting. `backend_xid` is visible to every role.
CREATE FUNCTION authsync_outbox_fence(snap pg_snapshot) RETURNS bigint
LANGUAGE sql STABLE AS $$
    SELECT coalesce(
        (SELECT min(x::text::int8) FROM pg_snapshot_xip(snap) AS x
         WHERE NOT EXISTS (
             SELECT 1 FROM pg_stat_activity a
             WHERE a.backend_xid IS NOT NULL
               AND a.backend_xid::text::int8 = x::text::int8 % 4294967296
               AND a.datname IS DISTINCT FROM current_database())),
        pg_snapshot_xmax(snap)::text::int8)
$$;

-- Merges that must wait for their users (a sign-up not synced yet) wait here, not in their
-- partition: the partition moves on, and `merge::retry_waiting` tries the oldest merge of
-- each key again until its users exist or its budget (counted from `first_seen_at`, when
-- authsync first saw it) runs out. A later merge with the same key waits behind it (per-key
-- order), whether or not it could be applied itself.
CREATE TABLE merge_waits (
    id              bigserial PRIMARY KEY,
    consumer_group  text NOT NULL,
    event_id        text NOT NULL,
    message_key     bytea,
    topic           text NOT NULL,
    kafka_partition integer NOT NULL,
    kafka_offset    bigint NOT NULL,
    payload         bytea,
    header_bytes    bytea NOT NULL,
    first_seen_at   timestamptz NOT NULL DEFAULT now(),
    next_attempt_at timestamptz NOT NULL DEFAULT now(),
    attempts        integer NOT NULL DEFAULT 0,
    UNIQUE (consumer_group, event_id)
);
CREATE INDEX merge_waits_key_idx ON merge_waits (consumer_group, message_key, id);

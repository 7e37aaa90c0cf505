-- The relay deletes a row once the broker has acknowledged it, instead of rewriting it
-- with published_at: that rewrite was a non-HOT update, a second copy of every payload
-- plus three index entries per event, and the largest single cost of the pipeline.
-- What the retained rows also did, ignoring a result event a replay emits again (same
-- deterministic id), moves to a narrow ledger of emitted ids kept for the retention.
CREATE TABLE outbox_emitted (
    event_id   uuid PRIMARY KEY,
    event_type text NOT NULL,
    emitted_at timestamptz NOT NULL DEFAULT now()
);
-- Rows arrive in time order: a BRIN index finds the expired ones for next to nothing.
CREATE INDEX outbox_emitted_at_idx ON outbox_emitted USING brin (emitted_at);

INSERT INTO outbox_emitted (event_id, event_type, emitted_at)
SELECT event_id, event_type, created_at FROM outbox;
DELETE FROM outbox WHERE published_at IS NOT NULL;

DROP INDEX outbox_unpublished_idx;
DROP INDEX outbox_published_at_idx;
ALTER TABLE outbox DROP CONSTRAINT outbox_event_id_key;
ALTER TABLE outbox DROP COLUMN published_at;

-- Payloads were pushed out of line (toast_tuple_target = 128) so that the published_at
-- rewrite would not copy them. Without the rewrite, out of line only costs a second heap
-- insert and an index entry per event: keep them inline, lz4-compressed (~1.5 KiB).
ALTER TABLE outbox RESET (toast_tuple_target);

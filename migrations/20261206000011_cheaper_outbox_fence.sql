-- The relay's fence (see 20261204000009), made cheap: it is read before every publish.
-- * The running transactions of other databases are listed once per call, and only when
--   the snapshot has a running transaction at all. Before, each transaction in the snapshot
--   evaluated `pg_stat_activity` again (a scan of every backend joined to pg_database and
--   pg_authid).
-- * PL/pgSQL keeps its plans for the session; a SQL function with CTEs is planned again on
--   every call (0.15 ms here).
-- At 1,000 logins/s the relay's read cost Postgres 0.62 ms before, more than any statement
-- of the step.
CREATE OR REPLACE FUNCTION authsync_outbox_fence(snap pg_snapshot) RETURNS bigint
LANGUAGE plpgsql STABLE AS $$
DECLARE
    oldest bigint;
BEGIN
    SELECT min(x::text::int8) INTO oldest FROM pg_snapshot_xip(snap) AS x;
    IF oldest IS NULL THEN
        RETURN pg_snapshot_xmax(snap)::text::int8;
    END IF;
    SELECT min(x::text::int8) INTO oldest
    FROM pg_snapshot_xip(snap) AS x
    WHERE NOT EXISTS (
        SELECT 1 FROM pg_stat_get_activity(NULL) AS s
        WHERE s.backend_xid IS NOT NULL
          AND s.backend_xid::text::int8 = x::text::int8 % 4294967296
          AND s.datid IS DISTINCT FROM (SELECT d.oid FROM pg_database d
                                        WHERE d.datname = current_database()));
    RETURN coalesce(oldest, pg_snapshot_xmax(snap)::text::int8);
END
$$;

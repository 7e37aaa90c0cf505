-- Outbox payloads (CloudEvents JSON, ~1-2 KiB) are written once and rewritten once (when
-- published_at is set). Compressing them inline (rather than only above the 2 KiB TOAST
-- threshold) cuts the WAL and heap volume of both writes several-fold. lz4 where the
-- server was built with it, else the default pglz.
DO $$
BEGIN
    BEGIN
        ALTER TABLE outbox ALTER COLUMN payload SET COMPRESSION lz4;
    EXCEPTION WHEN feature_not_supported OR invalid_parameter_value THEN
        RAISE NOTICE 'lz4 not available; outbox payloads use the default compression';
    END;
END $$;
ALTER TABLE outbox SET (toast_tuple_target = 128);

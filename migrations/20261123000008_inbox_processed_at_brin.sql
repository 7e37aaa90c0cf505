-- Rows arrive in time order, and only the retention looks them up by time: a BRIN index
-- finds the expired ones for next to nothing, where the B-tree cost an index entry (and
-- its WAL) per handled event.
DROP INDEX inbox_processed_at_idx;
CREATE INDEX inbox_processed_at_idx ON inbox USING brin (processed_at);

-- Every login rewrites its user row (login count, last login) and its device row; with
-- free space on the page the new version stays on it (a HOT update: no new index entry,
-- less WAL, pruned in place). Applies to pages written from now on.
ALTER TABLE users SET (fillfactor = 75);
ALTER TABLE devices SET (fillfactor = 75);
ALTER TABLE external_identities SET (fillfactor = 85);

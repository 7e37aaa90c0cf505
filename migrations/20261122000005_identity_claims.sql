-- Identity sync ($sync): the connection's groups and the audience the identity last logged
-- in for; role rules match connection groups separately from the identity's own groups.
ALTER TABLE external_identities
    ADD COLUMN connection_groups text[] NOT NULL DEFAULT '{}',
    ADD COLUMN audience text;
-- Account linking looks users up by email; the linked identity records how it was linked.
ALTER TABLE external_identities ADD COLUMN linked_by text;

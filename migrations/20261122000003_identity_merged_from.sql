-- A login of an identity that a merge moved resolves to the survivor "and says so".
ALTER TABLE external_identities ADD COLUMN merged_from uuid;

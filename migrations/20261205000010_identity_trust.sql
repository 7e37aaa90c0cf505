-- Identity trust (issue #18): link trust per connection, verification per identity and
-- address, clocks per field, role provenance.

-- The kind of the connection an identity signs in through (database, social, enterprise,
-- passwordless; NULL = not reported). With `connection_id` it decides whether the
-- identity's verified address may link accounts.
ALTER TABLE external_identities ADD COLUMN connection_kind text;

-- Link targets are the identities that currently assert an address (verified ones link;
-- the others explain why a login was not linked).
CREATE INDEX external_identities_email_idx ON external_identities (email);

-- The identity that owns the primary address: only it changes `users.email`.
-- Per profile field, the time of the newest event that set it; and per claim of each of
-- the user's identities (key `<provider> U+001F <subject> U+001F <claim>`), so a login
-- that changes no claim writes only the user row it writes anyway. Existing users get one
-- legacy clock (`*`) for every profile field: the old single profile clock.
ALTER TABLE users
    ADD COLUMN email_provider text,
    ADD COLUMN email_subject text,
    ADD COLUMN field_clocks jsonb NOT NULL DEFAULT '{}';
-- Clock values are microseconds since the epoch.
UPDATE users SET field_clocks =
    jsonb_build_object('*', (extract(epoch FROM profile_event_at) * 1000000)::bigint);

-- Who granted a role: `role_set:<set>:<provider>:<subject>` (a rule set, through that
-- identity's claims: a `force` set revokes only its own grants) or '' (by hand, or before
-- provenance was recorded: never revoked by a rule set). One row per grantor: a role is
-- held while any grantor holds it, so two identities of one user never take turns
-- granting and revoking it.
ALTER TABLE user_roles ADD COLUMN granted_by text NOT NULL DEFAULT '';
ALTER TABLE user_roles DROP CONSTRAINT user_roles_pkey;
ALTER TABLE user_roles ADD PRIMARY KEY (user_id, role, organization_id, granted_by);

-- Identity trust (issue #18): link trust per connection, verification per identity and
-- address, clocks per field, role provenance.

-- The kind of the connection an identity signs in through (database, social, enterprise,
-- passwordless; NULL = not reported). With `connection_id` it decides whether the
-- identity's verified address may link accounts.
ALTER TABLE external_identities
    ADD COLUMN connection_kind text,
    -- Per claim (email, groups, connection, connectionGroups, audience): the time of the
    -- newest event that set it. An event only moves the claims it carries.
    ADD COLUMN claim_clocks jsonb NOT NULL DEFAULT '{}';

-- Link targets are the identities that currently assert an address (verified ones link;
-- the others explain why a login was not linked).
CREATE INDEX external_identities_email_idx ON external_identities (email);

-- The identity that owns the primary address: only it changes `users.email`.
-- Per profile field, the time of the newest event that set it. Existing users get one
-- legacy clock (`*`) for every field: the old single profile clock.
ALTER TABLE users
    ADD COLUMN email_provider text,
    ADD COLUMN email_subject text,
    ADD COLUMN field_clocks jsonb NOT NULL DEFAULT '{}';
UPDATE users SET field_clocks = jsonb_build_object('*', profile_event_at);

-- Who granted a role: `role_set:<set>:<provider>:<subject>` (a rule set, through that
-- identity's claims: a `force` set revokes only its own grants) or '' (by hand, or before
-- provenance was recorded: never revoked by a rule set). One row per grantor: a role is
-- held while any grantor holds it, so two identities of one user never take turns
-- granting and revoking it.
ALTER TABLE user_roles ADD COLUMN granted_by text NOT NULL DEFAULT '';
ALTER TABLE user_roles DROP CONSTRAINT user_roles_pkey;
ALTER TABLE user_roles ADD PRIMARY KEY (user_id, role, organization_id, granted_by);

-- authsync schema, v1.
-- Identity, tenancy, the content a merge re-points, and the inbox / outbox machinery.
-- Foreign keys into `users` are DEFERRABLE so a signup can claim its external identity
-- first (the race-free "who signs up" decision) and insert the user later in the same
-- transaction.

-- ---------------------------------------------------------------- identity
CREATE TABLE users (
    id                   uuid PRIMARY KEY,
    email                text,
    display_name         text,
    auth_display_name    text,
    auth_picture_url     text,
    given_name           text,
    family_name          text,
    locale               text,
    workflow_variants    text[] NOT NULL DEFAULT '{}',
    lifecycle_state      text NOT NULL DEFAULT 'active'
                         CHECK (lifecycle_state IN ('active', 'merged', 'deactivated')),
    merged_into          uuid REFERENCES users (id) DEFERRABLE INITIALLY DEFERRED,
    version              bigint NOT NULL DEFAULT 1,
    -- time of the newest login event whose profile was applied: older events never overwrite
    profile_event_at     timestamptz NOT NULL,
    last_login_at        timestamptz NOT NULL,
    login_count          bigint NOT NULL DEFAULT 1,
    created_at           timestamptz NOT NULL DEFAULT now(),
    created_by           uuid,
    modified_at          timestamptz NOT NULL DEFAULT now(),
    modified_by          uuid
);

CREATE TABLE user_emails (
    user_id      uuid NOT NULL REFERENCES users (id) DEFERRABLE INITIALLY DEFERRED,
    email        text NOT NULL,
    email_type   text NOT NULL DEFAULT 'default'
                 CHECK (email_type IN ('work', 'home', 'school', 'other', 'default')),
    verified_at  timestamptz,
    created_at   timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (user_id, email)
);
CREATE INDEX user_emails_email_idx ON user_emails (email);

CREATE TABLE external_identities (
    provider     text NOT NULL,
    subject      text NOT NULL,
    user_id      uuid NOT NULL REFERENCES users (id) DEFERRABLE INITIALLY DEFERRED,
    email        text,
    email_verified boolean NOT NULL DEFAULT false,
    connection_id text,
    groups       text[] NOT NULL DEFAULT '{}',
    created_at   timestamptz NOT NULL DEFAULT now(),
    last_login_at timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (provider, subject)
);
CREATE INDEX external_identities_user_idx ON external_identities (user_id);

CREATE TABLE user_attributes (
    user_id    uuid NOT NULL REFERENCES users (id) DEFERRABLE INITIALLY DEFERRED,
    key        text NOT NULL,
    value      text NOT NULL,
    updated_at timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (user_id, key)
);

CREATE TABLE custom_upns (
    user_id    uuid NOT NULL REFERENCES users (id) DEFERRABLE INITIALLY DEFERRED,
    client_key text NOT NULL,
    upn        text NOT NULL,
    updated_at timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (user_id, client_key)
);

CREATE TABLE devices (
    user_id       uuid NOT NULL REFERENCES users (id) DEFERRABLE INITIALLY DEFERRED,
    device_id     text NOT NULL,
    user_agent    text,
    first_seen_at timestamptz NOT NULL,
    last_seen_at  timestamptz NOT NULL,
    PRIMARY KEY (user_id, device_id)
);

-- ---------------------------------------------------------------- tenancy
CREATE TABLE tenants (
    id         uuid PRIMARY KEY,
    created_by uuid NOT NULL,
    created_at timestamptz NOT NULL DEFAULT now()
);

CREATE TABLE organizations (
    id           uuid PRIMARY KEY,
    tenant_id    uuid NOT NULL REFERENCES tenants (id) DEFERRABLE INITIALLY DEFERRED,
    name         text NOT NULL,
    display_name text NOT NULL,
    slug         text NOT NULL,
    created_by   uuid NOT NULL,
    created_at   timestamptz NOT NULL DEFAULT now()
);

CREATE TABLE organization_members (
    organization_id uuid NOT NULL REFERENCES organizations (id) DEFERRABLE INITIALLY DEFERRED,
    user_id         uuid NOT NULL REFERENCES users (id) DEFERRABLE INITIALLY DEFERRED,
    role            text NOT NULL CHECK (role IN ('owner', 'admin', 'member', 'viewer')),
    created_at      timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (organization_id, user_id)
);
CREATE INDEX organization_members_user_idx ON organization_members (user_id);

CREATE TABLE user_roles (
    user_id         uuid NOT NULL REFERENCES users (id) DEFERRABLE INITIALLY DEFERRED,
    role            text NOT NULL,
    -- all-zero uuid = global (not scoped to an organization); keeps the primary key simple
    organization_id uuid NOT NULL DEFAULT '00000000-0000-0000-0000-000000000000',
    granted_at      timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (user_id, role, organization_id)
);

CREATE TABLE working_contexts (
    user_id         uuid PRIMARY KEY REFERENCES users (id) DEFERRABLE INITIALLY DEFERRED,
    tenant_id       uuid NOT NULL REFERENCES tenants (id) DEFERRABLE INITIALLY DEFERRED,
    organization_id uuid NOT NULL REFERENCES organizations (id) DEFERRABLE INITIALLY DEFERRED,
    updated_at      timestamptz NOT NULL DEFAULT now()
);

-- ---------------------------------------------------------------- content (re-pointed by merges)
CREATE TABLE projects (
    id              uuid PRIMARY KEY,
    organization_id uuid NOT NULL REFERENCES organizations (id) DEFERRABLE INITIALLY DEFERRED,
    name            text NOT NULL,
    display_name    text NOT NULL,
    slug            text NOT NULL,
    created_by      uuid NOT NULL,
    created_at      timestamptz NOT NULL DEFAULT now()
);

CREATE TABLE collections (
    id              uuid PRIMARY KEY,
    tenant_id       uuid NOT NULL,
    organization_id uuid NOT NULL,
    project_id      uuid,
    kind            text NOT NULL CHECK (kind IN ('personal', 'favorites', 'organization', 'project', 'folder')),
    label           text NOT NULL,
    -- materialized path: ids from the root down to and including this collection
    path            uuid[] NOT NULL,
    lifecycle_state text NOT NULL DEFAULT 'active',
    version         bigint NOT NULL DEFAULT 1,
    created_by      uuid,
    last_asset_by   uuid,
    last_chat_by    uuid,
    created_at      timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX collections_created_by_idx ON collections (created_by);
CREATE INDEX collections_org_idx ON collections (organization_id);

CREATE TABLE assets (
    id         uuid PRIMARY KEY,
    owner_id   uuid NOT NULL,
    name       text NOT NULL,
    created_at timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX assets_owner_idx ON assets (owner_id);

CREATE TABLE asset_references (
    id         uuid PRIMARY KEY,
    asset_id   uuid NOT NULL,
    created_by uuid NOT NULL
);
CREATE INDEX asset_references_created_by_idx ON asset_references (created_by);

CREATE TABLE threads (
    id         uuid PRIMARY KEY,
    owner_id   uuid NOT NULL,
    title      text NOT NULL DEFAULT '',
    created_at timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX threads_owner_idx ON threads (owner_id);

CREATE TABLE assets_to_collections (
    id            uuid PRIMARY KEY,
    asset_id      uuid NOT NULL,
    collection_id uuid NOT NULL,
    created_by    uuid,
    modified_by   uuid,
    deleted_by    uuid
);
CREATE INDEX atc_created_by_idx ON assets_to_collections (created_by);

CREATE TABLE threads_to_collections (
    id            uuid PRIMARY KEY,
    thread_id     uuid NOT NULL,
    collection_id uuid NOT NULL,
    created_by    uuid,
    modified_by   uuid,
    deleted_by    uuid
);
CREATE INDEX ttc_created_by_idx ON threads_to_collections (created_by);

CREATE TABLE collection_permissions (
    collection_id uuid NOT NULL,
    user_id       uuid NOT NULL,
    action        text NOT NULL CHECK (action IN ('read', 'write', 'admin', 'owner')),
    created_by    uuid,
    PRIMARY KEY (collection_id, user_id)
);
CREATE INDEX collection_permissions_user_idx ON collection_permissions (user_id);

CREATE TABLE teams (
    id          uuid PRIMARY KEY,
    name        text NOT NULL,
    created_by  uuid,
    modified_by uuid
);

CREATE TABLE access_tokens (
    token      text PRIMARY KEY,
    user_id    uuid NOT NULL,
    created_at timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX access_tokens_user_idx ON access_tokens (user_id);

CREATE TABLE recent_assets (
    user_id   uuid NOT NULL,
    asset_id  uuid NOT NULL,
    viewed_at timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (user_id, asset_id)
);

CREATE TABLE recent_threads (
    user_id   uuid NOT NULL,
    thread_id uuid NOT NULL,
    viewed_at timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (user_id, thread_id)
);

CREATE TABLE maintenance_activities (
    id         bigserial PRIMARY KEY,
    user_id    uuid NOT NULL,
    activity   text NOT NULL,
    applied_at timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX maintenance_activities_user_idx ON maintenance_activities (user_id);

-- ---------------------------------------------------------------- machinery
-- One row per input event a consumer group has handled. The primary key is the
-- de-duplication: a redelivered or replayed event finds its row and is skipped.
CREATE TABLE inbox (
    consumer_group text NOT NULL,
    event_id       text NOT NULL,
    topic          text NOT NULL,
    kafka_partition integer NOT NULL,
    kafka_offset   bigint NOT NULL,
    outcome        text NOT NULL CHECK (outcome IN ('applied', 'dead_lettered')),
    processed_at   timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (consumer_group, event_id)
);
CREATE INDEX inbox_processed_at_idx ON inbox (processed_at);

-- Messages to publish. `id` is taken when the row is inserted, which is after the step has
-- locked its users, so for one key `id` order is commit order. `txid` lets the relay wait
-- for every older transaction to finish before it reads, so a row that commits late is
-- never published out of order.
CREATE TABLE outbox (
    id           bigserial PRIMARY KEY,
    event_id     uuid NOT NULL UNIQUE,
    topic        text NOT NULL,
    message_key  bytea,
    event_type   text NOT NULL,
    payload      bytea NOT NULL,
    headers      jsonb NOT NULL DEFAULT '[]',
    txid         bigint NOT NULL DEFAULT (pg_current_xact_id()::text::bigint),
    created_at   timestamptz NOT NULL DEFAULT now(),
    published_at timestamptz
);
CREATE INDEX outbox_unpublished_idx ON outbox (id) WHERE published_at IS NULL;
CREATE INDEX outbox_published_at_idx ON outbox (published_at) WHERE published_at IS NOT NULL;

-- Wake the relay once per inserting statement (NOTIFY de-duplicates within a transaction).
CREATE FUNCTION outbox_notify() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    PERFORM pg_notify('authsync_outbox', '');
    RETURN NULL;
END $$;
CREATE TRIGGER outbox_notify AFTER INSERT ON outbox
    FOR EACH STATEMENT EXECUTE FUNCTION outbox_notify();

-- Audit of applied merges (the full report, enough to explain and reverse a merge).
CREATE TABLE merges (
    id           uuid PRIMARY KEY,
    old_user_id  uuid NOT NULL,
    new_user_id  uuid NOT NULL,
    reason       text NOT NULL,
    requested_by text,
    report       jsonb NOT NULL,
    merged_at    timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX merges_old_user_idx ON merges (old_user_id);

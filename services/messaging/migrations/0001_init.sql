-- Messaging owns relationships, invites, device public keys, messages (ciphertext
-- envelopes only) and its outbox.

CREATE TABLE messaging.relationships (
    id            uuid PRIMARY KEY,
    therapist_id  uuid NOT NULL,
    client_id     uuid NOT NULL,
    status        text NOT NULL DEFAULT 'active' CHECK (status IN ('active', 'ended')),
    created_at    timestamptz NOT NULL DEFAULT now(),
    UNIQUE (therapist_id, client_id)
);
CREATE INDEX relationships_client_idx ON messaging.relationships (client_id);

CREATE TABLE messaging.invites (
    id               uuid PRIMARY KEY,
    code_hash        bytea NOT NULL UNIQUE,
    therapist_id     uuid NOT NULL,
    -- The client's account id is fixed when the invite is made, so redeeming is
    -- idempotent: a retry after a crash finds the same relationship.
    client_id        uuid NOT NULL UNIQUE,
    created_at       timestamptz NOT NULL DEFAULT now(),
    expires_at       timestamptz NOT NULL,
    redeemed_at      timestamptz,
    relationship_id  uuid REFERENCES messaging.relationships (id)
);
CREATE INDEX invites_therapist_idx ON messaging.invites (therapist_id, created_at DESC);

CREATE TABLE messaging.devices (
    user_id             uuid NOT NULL,
    device_id           uuid NOT NULL,
    version             integer NOT NULL,
    suite               smallint NOT NULL,
    hpke_public_key     bytea NOT NULL,
    signing_public_key  bytea NOT NULL,
    signature           bytea NOT NULL,
    key_id              bytea NOT NULL,
    created_at          timestamptz NOT NULL DEFAULT now(),
    updated_at          timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (user_id, device_id)
);

-- Every key a device ever published, in order; never updated or deleted.
CREATE TABLE messaging.device_key_history (
    user_id             uuid NOT NULL,
    device_id           uuid NOT NULL,
    version             integer NOT NULL,
    suite               smallint NOT NULL,
    hpke_public_key     bytea NOT NULL,
    signing_public_key  bytea NOT NULL,
    signature           bytea NOT NULL,
    key_id              bytea NOT NULL,
    published_at        timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (user_id, device_id, version)
);

CREATE TABLE messaging.messages (
    id                uuid PRIMARY KEY,
    seq               bigint GENERATED ALWAYS AS IDENTITY UNIQUE,
    relationship_id   uuid NOT NULL REFERENCES messaging.relationships (id),
    kind              text NOT NULL CHECK (kind IN ('checkin', 'reply')),
    sender_id         uuid NOT NULL,
    sender_device_id  uuid NOT NULL,
    urgent            boolean NOT NULL DEFAULT false,
    sent_at           timestamptz NOT NULL,
    envelope          bytea NOT NULL,
    envelope_sha256   bytea NOT NULL,
    created_at        timestamptz NOT NULL DEFAULT now()
);
-- Listing a relationship's messages is a keyset scan on this index.
CREATE INDEX messages_relationship_seq_idx ON messaging.messages (relationship_id, seq);

CREATE TABLE messaging.idempotency_keys (
    user_id       uuid NOT NULL,
    key           text NOT NULL,
    request_hash  bytea NOT NULL,
    message_id    uuid NOT NULL REFERENCES messaging.messages (id),
    created_at    timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (user_id, key)
);

CREATE TABLE messaging.outbox (
    id             bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    event_id       uuid NOT NULL UNIQUE,
    routing_key    text NOT NULL,
    payload        jsonb NOT NULL,
    created_at     timestamptz NOT NULL DEFAULT now(),
    published_at   timestamptz,
    attempts       integer NOT NULL DEFAULT 0,
    -- A row the broker could not route (no queue bound yet) waits before retrying,
    -- so it never holds up the rows behind it.
    next_attempt_at timestamptz,
    last_error     text
);
CREATE INDEX outbox_pending_idx ON messaging.outbox (id) WHERE published_at IS NULL;

-- Delivery channels outside the app (email, webhook), one delivery row per
-- notification and channel, and the notifier's own outbox (notification.created
-- events for live streams). Ids, kinds, times and counts only: no content.

-- A person's email address or webhook endpoint and the kinds of alert it gets.
-- Removing one scrubs its address, URL and secret but keeps the row, so the
-- deliveries that went (or died) there keep their record.
CREATE TABLE notifier.channels (
    id              uuid PRIMARY KEY,
    user_id         uuid NOT NULL,
    type            text NOT NULL CHECK (type IN ('email', 'webhook')),
    address         text,            -- email: where alerts go
    url             text,            -- webhook: where alerts are POSTed
    host            text,            -- the endpoint's host:port (or the SMTP relay's), for fairness
    kinds           text[] NOT NULL,
    verified_at     timestamptz,     -- email: the code was confirmed; webhook: at creation
    -- Email verification: a hash of the one-time code, its expiry and the wrong guesses.
    code_hash       bytea,
    code_expires_at timestamptz,
    code_sent_at    timestamptz,
    code_attempts   integer NOT NULL DEFAULT 0,
    -- Webhook: the signing secret, sealed with AES-256-GCM (see services/notifier/secret_box.py).
    secret_sealed   bytea,
    created_at      timestamptz NOT NULL DEFAULT now(),
    updated_at      timestamptz NOT NULL DEFAULT now(),
    deleted_at      timestamptz,
    CONSTRAINT channels_kinds_check CHECK (
        kinds <@ ARRAY['checkin.received', 'reply.received', 'digest', 'reminder.reply_due']),
    CONSTRAINT channels_target_check CHECK (
        deleted_at IS NOT NULL
        OR (type = 'email' AND address IS NOT NULL AND url IS NULL AND secret_sealed IS NULL)
        OR (type = 'webhook' AND url IS NOT NULL AND secret_sealed IS NOT NULL
            AND address IS NULL AND verified_at IS NOT NULL)),
    CONSTRAINT channels_scrubbed_check CHECK (
        deleted_at IS NULL
        OR (address IS NULL AND url IS NULL AND secret_sealed IS NULL AND code_hash IS NULL))
);

CREATE INDEX channels_user_idx ON notifier.channels (user_id) WHERE deleted_at IS NULL;
-- One live channel per person and address or URL.
CREATE UNIQUE INDEX channels_address_key ON notifier.channels (user_id, lower(address))
    WHERE deleted_at IS NULL AND type = 'email';
CREATE UNIQUE INDEX channels_url_key ON notifier.channels (user_id, url)
    WHERE deleted_at IS NULL AND type = 'webhook';

-- One delivery per notification and channel: the idempotency key that makes an
-- alert go out once per channel across restarts and replicas.
--   pending: not tried yet; failed: tried, retried at next_attempt_at;
--   sent: accepted by the relay or endpoint; dead: given up (attempts used up,
--   a permanent refusal, or the channel removed). Nothing is deleted.
CREATE TABLE notifier.deliveries (
    id              uuid PRIMARY KEY,   -- also the webhook-id receivers deduplicate by
    notification_id uuid NOT NULL REFERENCES notifier.notifications (id),
    channel_id      uuid NOT NULL REFERENCES notifier.channels (id),
    user_id         uuid NOT NULL,
    state           text NOT NULL DEFAULT 'pending'
                    CHECK (state IN ('pending', 'failed', 'sent', 'dead')),
    attempts        integer NOT NULL DEFAULT 0,
    -- While pending or failed: when it may be tried next. A worker that claims it
    -- pushes this forward by its lease, so a crashed worker's claim runs out.
    next_attempt_at timestamptz,
    lease_id        uuid,               -- the claim in force; only it may settle the row
    last_error      text,
    created_at      timestamptz NOT NULL DEFAULT now(),
    updated_at      timestamptz NOT NULL DEFAULT now(),
    sent_at         timestamptz,
    CONSTRAINT deliveries_notification_channel_key UNIQUE (notification_id, channel_id),
    CONSTRAINT deliveries_schedule_check
        CHECK ((state IN ('pending', 'failed')) = (next_attempt_at IS NOT NULL))
);

CREATE INDEX deliveries_due_idx ON notifier.deliveries (next_attempt_at)
    WHERE state IN ('pending', 'failed');
CREATE INDEX deliveries_user_idx ON notifier.deliveries (user_id, created_at DESC, id DESC);
CREATE INDEX deliveries_undelivered_idx ON notifier.deliveries (updated_at DESC)
    WHERE state IN ('failed', 'dead');

-- The notifier's transactional outbox, the same shape as messaging's.
CREATE TABLE notifier.outbox (
    id              bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    event_id        uuid NOT NULL UNIQUE,
    routing_key     text NOT NULL,
    payload         jsonb NOT NULL,
    created_at      timestamptz NOT NULL DEFAULT now(),
    published_at    timestamptz,
    attempts        integer NOT NULL DEFAULT 0,
    next_attempt_at timestamptz,
    last_error      text
);
CREATE INDEX outbox_pending_idx ON notifier.outbox (id) WHERE published_at IS NULL;

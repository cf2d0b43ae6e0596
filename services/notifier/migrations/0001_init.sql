-- The notifier's inbox (event ids already handled, for deduplication) and the
-- notification feed. A notification holds ids and times only, never content.

CREATE TABLE notifier.inbox (
    event_id    uuid PRIMARY KEY,
    event_type  text NOT NULL,
    received_at timestamptz NOT NULL DEFAULT now()
);

CREATE TABLE notifier.notifications (
    id              uuid PRIMARY KEY,
    user_id         uuid NOT NULL,
    kind            text NOT NULL,
    relationship_id uuid NOT NULL,
    message_id      uuid NOT NULL,
    actor_id        uuid NOT NULL,
    event_id        uuid NOT NULL REFERENCES notifier.inbox (event_id),
    created_at      timestamptz NOT NULL,
    read_at         timestamptz,
    -- A second guard behind the inbox: one notification per event and recipient.
    CONSTRAINT notifications_event_user_key UNIQUE (event_id, user_id),
    CONSTRAINT notifications_kind_check CHECK (kind IN ('checkin.received', 'reply.received'))
);

-- The feed: one user's notifications, newest first, keyset-paginated on (created_at, id).
CREATE INDEX notifications_feed_idx
    ON notifier.notifications (user_id, created_at DESC, id DESC);

-- The unread feed and read-all touch only unread rows.
CREATE INDEX notifications_unread_idx
    ON notifier.notifications (user_id, created_at DESC, id DESC)
    WHERE read_at IS NULL;

-- Office hours and agreements: the notifier's own read model of both (fed by
-- events, never read from messaging), alerts held for a later window, reply-by
-- reminders, and the notification kinds they produce. Ids, times and counts
-- only, never content or names.

CREATE TABLE notifier.availability (
    therapist_id uuid PRIMARY KEY,
    version      bigint NOT NULL,
    schedule     jsonb,              -- WeeklySchedule.to_json(); NULL: no hours set
    updated_at   timestamptz NOT NULL DEFAULT now()
);

CREATE TABLE notifier.agreements (
    relationship_id uuid PRIMARY KEY,
    therapist_id    uuid NOT NULL,
    client_id       uuid NOT NULL,
    version         bigint NOT NULL,
    terms           jsonb NOT NULL,  -- Agreement.to_json() without the crisis text
    updated_at      timestamptz NOT NULL DEFAULT now()
);

-- An alert not given at once. The scheduler delivers it when release_at has
-- come: check-ins as one digest per therapist, replies one by one.
CREATE TABLE notifier.held_alerts (
    id              uuid PRIMARY KEY,
    recipient_id    uuid NOT NULL,
    kind            text NOT NULL CHECK (kind IN ('checkin', 'reply')),
    relationship_id uuid NOT NULL,
    message_id      uuid NOT NULL,
    actor_id        uuid NOT NULL,   -- the client (check-in) or the therapist (reply)
    event_id        uuid NOT NULL REFERENCES notifier.inbox (event_id),
    urgent          boolean NOT NULL DEFAULT false,
    beyond          boolean NOT NULL DEFAULT false,
    created_at      timestamptz NOT NULL,
    -- Replies: when the reply reaches the client (the therapist's next window);
    -- release_at may lie later, after the client's quiet hours.
    released_at     timestamptz,
    -- NULL: no office time ahead at all; waits for the therapist's hours to change.
    release_at      timestamptz,
    delivered_at    timestamptz,
    notification_id uuid,
    CONSTRAINT held_alerts_event_recipient_key UNIQUE (event_id, recipient_id),
    CONSTRAINT held_alerts_delivered_check
        CHECK ((delivered_at IS NULL) = (notification_id IS NULL))
);

CREATE INDEX held_alerts_due_idx ON notifier.held_alerts (release_at)
    WHERE delivered_at IS NULL;
CREATE INDEX held_alerts_recipient_idx ON notifier.held_alerts (recipient_id)
    WHERE delivered_at IS NULL;
-- Re-planning after an hours change finds a therapist's held replies by actor.
CREATE INDEX held_alerts_actor_idx ON notifier.held_alerts (actor_id)
    WHERE delivered_at IS NULL AND kind = 'reply';

-- One reply-by reminder per check-in that carried a reply-by time.
CREATE TABLE notifier.reminders (
    message_id      uuid PRIMARY KEY,
    therapist_id    uuid NOT NULL,
    relationship_id uuid NOT NULL,
    client_id       uuid NOT NULL,
    received_at     timestamptz NOT NULL,
    reply_by        timestamptz NOT NULL,
    remind_at       timestamptz,     -- NULL: no office time ahead; waits for new hours
    sent_at         timestamptz,
    cancelled_at    timestamptz,
    CONSTRAINT reminders_settled_check CHECK (sent_at IS NULL OR cancelled_at IS NULL)
);

CREATE INDEX reminders_due_idx ON notifier.reminders (remind_at)
    WHERE sent_at IS NULL AND cancelled_at IS NULL;
CREATE INDEX reminders_relationship_idx ON notifier.reminders (relationship_id)
    WHERE sent_at IS NULL AND cancelled_at IS NULL;
CREATE INDEX reminders_therapist_idx ON notifier.reminders (therapist_id)
    WHERE sent_at IS NULL AND cancelled_at IS NULL;

-- Digests and reminders belong to no single event, and a digest to no single
-- message, client or relationship.
ALTER TABLE notifier.notifications
    ALTER COLUMN relationship_id DROP NOT NULL,
    ALTER COLUMN message_id DROP NOT NULL,
    ALTER COLUMN actor_id DROP NOT NULL,
    ALTER COLUMN event_id DROP NOT NULL,
    ADD COLUMN details jsonb,
    DROP CONSTRAINT notifications_kind_check,
    ADD CONSTRAINT notifications_kind_check
        CHECK (kind IN ('checkin.received', 'reply.received', 'digest', 'reminder.reply_due')),
    ADD CONSTRAINT notifications_fields_check CHECK (
        CASE kind
            WHEN 'digest' THEN details IS NOT NULL
            WHEN 'reminder.reply_due' THEN details IS NOT NULL AND message_id IS NOT NULL
                AND relationship_id IS NOT NULL AND actor_id IS NOT NULL
            ELSE event_id IS NOT NULL AND message_id IS NOT NULL
                AND relationship_id IS NOT NULL AND actor_id IS NOT NULL
        END
    );

-- A second guard behind reminders.sent_at: one reminder per check-in.
CREATE UNIQUE INDEX notifications_reminder_key ON notifier.notifications (message_id)
    WHERE kind = 'reminder.reply_due';

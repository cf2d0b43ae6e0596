-- Office hours, absences and per-relationship agreements; what each check-in
-- and reply was told when it was accepted.

CREATE TABLE messaging.availability (
    therapist_id  uuid PRIMARY KEY,
    tz            text NOT NULL,
    windows       jsonb NOT NULL,
    version       integer NOT NULL,
    updated_at    timestamptz NOT NULL DEFAULT now()
);

CREATE TABLE messaging.absences (
    id            uuid PRIMARY KEY,
    therapist_id  uuid NOT NULL,
    first_day     date NOT NULL,
    last_day      date NOT NULL,
    note          text,
    created_at    timestamptz NOT NULL DEFAULT now(),
    CHECK (first_day <= last_day)
);
CREATE INDEX absences_therapist_idx ON messaging.absences (therapist_id, first_day);

CREATE TABLE messaging.agreements (
    relationship_id  uuid PRIMARY KEY REFERENCES messaging.relationships (id),
    terms            jsonb NOT NULL,
    version          integer NOT NULL,
    updated_at       timestamptz NOT NULL DEFAULT now()
);

ALTER TABLE messaging.messages
    ADD COLUMN beyond_agreement boolean NOT NULL DEFAULT false,
    ADD COLUMN reply_by timestamptz,
    ADD COLUMN deliver_now boolean NOT NULL DEFAULT false,
    -- A reply written outside office hours reaches the client only from here.
    ADD COLUMN visible_at timestamptz NOT NULL DEFAULT now(),
    -- The expectation (check-in) or release time (reply) the sender was told,
    -- so that a retry gets the same answer. Times and counts only.
    ADD COLUMN terms jsonb;

-- Counting a client's check-ins in the current period.
CREATE INDEX messages_relationship_kind_created_idx
    ON messaging.messages (relationship_id, kind, created_at);
-- Replies still held, to release them when hours change.
CREATE INDEX messages_held_idx ON messaging.messages (relationship_id, visible_at)
    WHERE kind = 'reply';
CREATE INDEX messages_held_by_sender_idx ON messaging.messages (sender_id, visible_at)
    WHERE kind = 'reply';

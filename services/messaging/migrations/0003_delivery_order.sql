-- Messages are listed in the order they became visible to the reader, so that a
-- reply held for office hours neither hides what came after it nor is skipped by
-- a cursor once it is released: it takes its place in the delivery order when it
-- becomes visible.

CREATE SEQUENCE messaging.delivery_seq;

ALTER TABLE messaging.messages ADD COLUMN delivery_seq bigint UNIQUE;

UPDATE messaging.messages SET delivery_seq = nextval('messaging.delivery_seq')
    WHERE id IN (SELECT id FROM messaging.messages WHERE visible_at <= now() ORDER BY seq);

CREATE INDEX messages_relationship_delivery_idx
    ON messaging.messages (relationship_id, delivery_seq);
CREATE INDEX messages_undelivered_idx
    ON messaging.messages (relationship_id, visible_at) WHERE delivery_seq IS NULL;

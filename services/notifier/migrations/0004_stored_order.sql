-- The order notifications were stored in. The feed is ordered by created_at, the
-- time of the event (or of a held alert's delivery), and a notification can be
-- stored after one with a later time (its event reached the notifier later), so
-- "what is newer than the last one I saw" is answered in stored order instead:
-- a stream's resume asks for the notifications stored after the last it got.
-- One therapist's notifications are stored one at a time (their events share a
-- lane and their lock), so for them stored order is also commit order.
-- (Adding the column gives existing rows numbers and rewrites the table.)
ALTER TABLE notifier.notifications ADD COLUMN seq bigint GENERATED ALWAYS AS IDENTITY;

CREATE UNIQUE INDEX notifications_stored_idx ON notifier.notifications (user_id, seq);

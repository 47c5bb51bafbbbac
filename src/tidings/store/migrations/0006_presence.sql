-- Presence: the user's privacy switch and when they were last online.
ALTER TABLE users ADD COLUMN presence_hidden INTEGER NOT NULL DEFAULT 0;
ALTER TABLE users ADD COLUMN last_seen_ms INTEGER NOT NULL DEFAULT 0;

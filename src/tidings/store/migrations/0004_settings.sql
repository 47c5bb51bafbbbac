-- Per-user conversation settings, kept on the membership row.
ALTER TABLE members ADD COLUMN muted INTEGER NOT NULL DEFAULT 0;
ALTER TABLE members ADD COLUMN pinned INTEGER NOT NULL DEFAULT 0;
ALTER TABLE members ADD COLUMN hidden_seq INTEGER NOT NULL DEFAULT 0;  -- hidden while last_seq <= this
ALTER TABLE members ADD COLUMN draft TEXT NOT NULL DEFAULT '';

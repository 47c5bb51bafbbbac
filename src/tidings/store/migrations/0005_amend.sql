-- Recall and edit rewrite the original entry (the events that did it stay in the
-- sequence); delete-for-me is per user and never touches the entry itself.
ALTER TABLE messages ADD COLUMN edit_version INTEGER NOT NULL DEFAULT 0;
ALTER TABLE messages ADD COLUMN recalled INTEGER NOT NULL DEFAULT 0;
ALTER TABLE messages ADD COLUMN target INTEGER;  -- for recall/edit entries: the seq they change
CREATE TABLE deleted_for (
    uid  TEXT NOT NULL,
    conv TEXT NOT NULL,
    seq  INTEGER NOT NULL,
    PRIMARY KEY (uid, conv, seq)
) WITHOUT ROWID;

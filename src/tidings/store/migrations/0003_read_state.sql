-- Unread counts are derived (ARCHITECTURE.md invariant 4): each conversation keeps a
-- running total of countable entries, each entry records the total up to itself, and a
-- member's unread = the conversation's total - the total at the member's read position.
ALTER TABLE conversations ADD COLUMN counted INTEGER NOT NULL DEFAULT 0;
ALTER TABLE messages ADD COLUMN ctotal INTEGER NOT NULL DEFAULT 0;
ALTER TABLE members ADD COLUMN read_seq INTEGER NOT NULL DEFAULT 0;
ALTER TABLE members ADD COLUMN read_counted INTEGER NOT NULL DEFAULT 0;
UPDATE messages SET ctotal = seq;
UPDATE conversations SET counted = last_seq;
-- What was stored before this migration counts as read: no surprise unread on upgrade.
UPDATE members SET
    read_seq = (SELECT last_seq FROM conversations WHERE id = members.conv),
    read_counted = (SELECT counted FROM conversations WHERE id = members.conv);

-- User-scoped changes (read positions now; settings later), for other devices and sync.
CREATE TABLE user_changes (
    version INTEGER PRIMARY KEY AUTOINCREMENT,
    uid     TEXT NOT NULL,
    conv    TEXT NOT NULL,
    kind    TEXT NOT NULL,
    value   INTEGER NOT NULL,
    ts      INTEGER NOT NULL
);
CREATE INDEX user_changes_by_user ON user_changes (uid, version);

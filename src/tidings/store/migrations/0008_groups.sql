-- Groups: a conversation of kind 2 with a profile, roles and mutes. Each message is
-- stored once; a member's cost is its `members` row (read position, settings, role).
CREATE TABLE groups (
    conv               TEXT PRIMARY KEY,          -- 'g:<id>', the conversation's id
    owner              TEXT NOT NULL,
    name               TEXT NOT NULL DEFAULT '',
    avatar             TEXT NOT NULL DEFAULT '',
    intro              TEXT NOT NULL DEFAULT '',
    announcement       TEXT NOT NULL DEFAULT '',
    muted_all          INTEGER NOT NULL DEFAULT 0,
    members_can_invite INTEGER NOT NULL DEFAULT 1,
    history_visible    INTEGER NOT NULL DEFAULT 0,  -- new members see entries before joining
    max_members        INTEGER NOT NULL,
    member_count       INTEGER NOT NULL DEFAULT 0,
    created_ms         INTEGER NOT NULL
) WITHOUT ROWID;
ALTER TABLE members ADD COLUMN role INTEGER NOT NULL DEFAULT 0;         -- 0 member, 1 admin, 2 owner
ALTER TABLE members ADD COLUMN muted_until INTEGER NOT NULL DEFAULT 0;  -- UTC ms; 0 not muted
ALTER TABLE members ADD COLUMN joined_ms INTEGER NOT NULL DEFAULT 0;
-- The seq before the member's add entry (0 for the first members). Unlike joined_seq,
-- the floor of what the member sees, this stays put when history is visible: entries
-- from before it are not "read by" the member.
ALTER TABLE members ADD COLUMN added_seq INTEGER NOT NULL DEFAULT 0;
-- "Read by N": members of a conversation at or past a seq, counted from the index alone.
CREATE INDEX members_by_read ON members (conv, read_seq, added_seq);

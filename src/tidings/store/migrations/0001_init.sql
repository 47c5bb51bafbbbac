-- Accounts, devices, token revocations.
CREATE TABLE users (
    uid           TEXT PRIMARY KEY,       -- canonical form (NFKC + casefold)
    display       TEXT NOT NULL,          -- as the app gave it
    name          TEXT NOT NULL DEFAULT '',
    password_hash TEXT,
    created_ms    INTEGER NOT NULL
) WITHOUT ROWID;

CREATE TABLE devices (
    uid             TEXT NOT NULL,
    device          TEXT NOT NULL,
    platform        TEXT NOT NULL,
    created_ms      INTEGER NOT NULL,
    revoked_before  INTEGER NOT NULL DEFAULT 0,
    PRIMARY KEY (uid, device)
) WITHOUT ROWID;

CREATE TABLE revoked_tokens (
    jti        TEXT PRIMARY KEY,
    uid        TEXT NOT NULL,
    device     TEXT NOT NULL,
    expires_ms INTEGER NOT NULL
) WITHOUT ROWID;

-- Conversations and their sequences.
CREATE TABLE conversations (
    id         TEXT PRIMARY KEY,
    kind       INTEGER NOT NULL,           -- 1 direct
    last_seq   INTEGER NOT NULL DEFAULT 0,
    last_mid   INTEGER NOT NULL DEFAULT 0,
    last_ts    INTEGER NOT NULL DEFAULT 0,
    created_ms INTEGER NOT NULL
) WITHOUT ROWID;

CREATE TABLE members (
    conv       TEXT NOT NULL,
    uid        TEXT NOT NULL,
    joined_seq INTEGER NOT NULL DEFAULT 0,
    PRIMARY KEY (conv, uid)
) WITHOUT ROWID;
CREATE INDEX members_by_user ON members (uid, conv);

CREATE TABLE messages (
    conv     TEXT NOT NULL,
    seq      INTEGER NOT NULL,
    mid      INTEGER NOT NULL,
    sender   TEXT NOT NULL,
    dev      TEXT NOT NULL,
    cid      TEXT NOT NULL,
    type     TEXT NOT NULL,
    body     BLOB NOT NULL,              -- MessagePack of the JSON-model content
    ts       INTEGER NOT NULL,
    flags    INTEGER NOT NULL DEFAULT 0,
    mentions BLOB,                       -- MessagePack list, NULL when empty
    reply_to INTEGER
);
-- A rowid table: new rows append at the end of the table's b-tree (few pages touched per
-- group commit); the two indexes carry the lookups.
CREATE UNIQUE INDEX messages_by_seq ON messages (conv, seq);
CREATE UNIQUE INDEX messages_by_client_id ON messages (sender, cid);

-- Worker ids for message ids, leased per process.
CREATE TABLE worker_leases (
    worker_id  INTEGER PRIMARY KEY,
    holder     TEXT NOT NULL,
    expires_ms INTEGER NOT NULL
);

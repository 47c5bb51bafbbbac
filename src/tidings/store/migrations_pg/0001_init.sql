-- The PostgreSQL schema: the same tables as SQLite's migrations 0001-0009 arrive at, in
-- one step. Every hot query is keyed by a conversation id or a user id, so the large
-- tables can be distributed by those keys (e.g. Citus: messages, members, conversations,
-- groups and deleted_for by conversation; users, devices, blocks and user_changes by
-- user) without changing a query's shape. Flags are 0/1 integers, as in SQLite.
CREATE TABLE users (
    uid             TEXT PRIMARY KEY,        -- canonical form (NFKC + casefold)
    display         TEXT NOT NULL,
    name            TEXT NOT NULL DEFAULT '',
    password_hash   TEXT,
    created_ms      BIGINT NOT NULL,
    presence_hidden INTEGER NOT NULL DEFAULT 0,
    last_seen_ms    BIGINT NOT NULL DEFAULT 0,
    -- The newest version of the user's change log. Versions are per user and handed out
    -- under this row's lock, so they are in commit order for each user (a sequence shared
    -- by concurrent writers is not).
    change_version  BIGINT NOT NULL DEFAULT 0
);

CREATE TABLE devices (
    uid            TEXT NOT NULL,
    device         TEXT NOT NULL,
    platform       TEXT NOT NULL,
    created_ms     BIGINT NOT NULL,
    revoked_before BIGINT NOT NULL DEFAULT 0,
    PRIMARY KEY (uid, device)
);

CREATE TABLE revoked_tokens (
    jti        TEXT PRIMARY KEY,
    uid        TEXT NOT NULL,
    device     TEXT NOT NULL,
    expires_ms BIGINT NOT NULL
);

CREATE TABLE conversations (
    id         TEXT PRIMARY KEY,
    kind       INTEGER NOT NULL,              -- 1 direct, 2 group
    last_seq   BIGINT NOT NULL DEFAULT 0,
    last_mid   BIGINT NOT NULL DEFAULT 0,
    last_ts    BIGINT NOT NULL DEFAULT 0,
    counted    BIGINT NOT NULL DEFAULT 0,     -- running total of entries counted as unread
    created_ms BIGINT NOT NULL
);

CREATE TABLE members (
    conv          TEXT NOT NULL,
    uid           TEXT NOT NULL,
    joined_seq    BIGINT NOT NULL DEFAULT 0,
    read_seq      BIGINT NOT NULL DEFAULT 0,
    read_counted  BIGINT NOT NULL DEFAULT 0,
    muted         INTEGER NOT NULL DEFAULT 0,
    pinned        INTEGER NOT NULL DEFAULT 0,
    hidden_seq    BIGINT NOT NULL DEFAULT 0,
    draft         TEXT NOT NULL DEFAULT '',
    role          INTEGER NOT NULL DEFAULT 0,
    muted_until   BIGINT NOT NULL DEFAULT 0,
    joined_ms     BIGINT NOT NULL DEFAULT 0,
    added_seq     BIGINT NOT NULL DEFAULT 0,
    delivered_seq BIGINT NOT NULL DEFAULT 0,
    PRIMARY KEY (conv, uid)
);
CREATE INDEX members_by_user ON members (uid, conv);
CREATE INDEX members_by_read ON members (conv, read_seq, added_seq);

CREATE TABLE messages (
    conv         TEXT NOT NULL,
    seq          BIGINT NOT NULL,
    mid          BIGINT NOT NULL,
    sender       TEXT NOT NULL,
    dev          TEXT NOT NULL,
    cid          TEXT NOT NULL,
    type         TEXT NOT NULL,
    body         BYTEA NOT NULL,              -- MessagePack of the JSON-model content
    ts           BIGINT NOT NULL,
    flags        INTEGER NOT NULL DEFAULT 0,
    mentions     BYTEA,
    reply_to     BIGINT,
    ctotal       BIGINT NOT NULL DEFAULT 0,
    edit_version INTEGER NOT NULL DEFAULT 0,
    recalled     INTEGER NOT NULL DEFAULT 0,
    target       BIGINT,
    PRIMARY KEY (conv, seq)
);
-- Idempotency across nodes and restarts. (Distributed by conversation, this index would
-- need the conversation in it too; the sender's client ids are unique per sender alone.)
CREATE UNIQUE INDEX messages_by_client_id ON messages (sender, cid);

CREATE TABLE worker_leases (
    worker_id  INTEGER PRIMARY KEY,
    holder     TEXT NOT NULL UNIQUE,
    expires_ms BIGINT NOT NULL
);

CREATE TABLE blocks (
    uid        TEXT NOT NULL,
    blocked    TEXT NOT NULL,
    created_ms BIGINT NOT NULL,
    PRIMARY KEY (uid, blocked)
);

CREATE TABLE user_changes (
    uid     TEXT NOT NULL,
    version BIGINT NOT NULL,
    conv    TEXT NOT NULL,
    kind    TEXT NOT NULL,
    value   BIGINT NOT NULL,
    ts      BIGINT NOT NULL,
    PRIMARY KEY (uid, version)
);
CREATE UNIQUE INDEX user_changes_peer_delivered ON user_changes (uid, conv)
    WHERE kind = 'peer_delivered';

CREATE TABLE deleted_for (
    uid  TEXT NOT NULL,
    conv TEXT NOT NULL,
    seq  BIGINT NOT NULL,
    PRIMARY KEY (uid, conv, seq)
);

CREATE TABLE groups (
    conv               TEXT PRIMARY KEY,
    owner              TEXT NOT NULL,
    name               TEXT NOT NULL DEFAULT '',
    avatar             TEXT NOT NULL DEFAULT '',
    intro              TEXT NOT NULL DEFAULT '',
    announcement       TEXT NOT NULL DEFAULT '',
    muted_all          INTEGER NOT NULL DEFAULT 0,
    members_can_invite INTEGER NOT NULL DEFAULT 1,
    history_visible    INTEGER NOT NULL DEFAULT 0,
    max_members        INTEGER NOT NULL,
    member_count       INTEGER NOT NULL DEFAULT 0,
    created_ms         BIGINT NOT NULL
);

-- Block list: `uid` refuses messages from `blocked`.
CREATE TABLE blocks (
    uid        TEXT NOT NULL,
    blocked    TEXT NOT NULL,
    created_ms INTEGER NOT NULL,
    PRIMARY KEY (uid, blocked)
) WITHOUT ROWID;

-- Deletions-for-me are logged one entry per seq (value = the seq), so that a device that
-- was away learns which entries to hide. Rewrite the older per-request entries.
DELETE FROM user_changes WHERE kind = 'deleted';
INSERT INTO user_changes (uid, conv, kind, value, ts)
    SELECT uid, conv, 'deleted', seq, 0 FROM deleted_for ORDER BY uid, conv, seq;

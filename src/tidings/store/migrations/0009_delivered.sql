-- "Delivered" receipts of 1:1 conversations: a member's delivered position is the highest
-- seq any of its devices acknowledged, capped at the conversation's last seq and never
-- backwards. Written coalesced (a flush every `delivered_flush_ms`); what the other member
-- sees is max(delivered_seq, read_seq), since reading implies delivery.
ALTER TABLE members ADD COLUMN delivered_seq INTEGER NOT NULL DEFAULT 0;
-- A move is logged for the other member (so a device of theirs that was away learns it on
-- sync), but only the newest one is worth keeping: at most one such row per (user,
-- conversation), replaced (under a new version) by the next move.
CREATE UNIQUE INDEX user_changes_peer_delivered ON user_changes (uid, conv)
    WHERE kind = 'peer_delivered';

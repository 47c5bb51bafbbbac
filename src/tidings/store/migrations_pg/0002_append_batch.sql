-- The common write in one statement: a batch of plain messages (no recall or edit, no
-- group entry) of many conversations, appended by one call: one round trip and one
-- commit for them all (PostgresStore._fast_batch).
--
-- Every conversation of the batch is locked first, in ascending id (C collation: the
-- order of Python's sorted()), so batches of any processes queue on their common
-- conversations in one order and never deadlock; the senders' member rows are updated
-- last, in ascending (conversation, user). Messages are taken in array order, so each
-- conversation's messages keep their submission order.
--
-- Arguments, per message i (from 0), flattened into few arrays (each array costs the
-- client more to send than its elements do):
--   p_text[5i+1 .. 5i+5]   sender, device, cid, type, blocker (NULL: none)
--   p_bytes[2i+1 .. 2i+2]  body, mentions (NULL: none)
--   p_num[5i+1 .. 5i+5]    index of its conversation in p_convs (from 1), message id,
--                          flags, reply_to (NULL: none), and bits: 1 counted toward
--                          unread, 2 moves the sender's read position, 4 privileged
--                          (the server API: group mutes do not apply)
--
-- One row out per message, in order, then a last one: ('written', rows written).
--   ok          appended as o_seq with running total o_ctotal (the message id is the
--               caller's, the time p_now)
--   dup         (sender, cid) is stored already: the caller reads the original
--   blocked     the blocker blocks the sender
--   not_member  a group post by a non-member
--   muted       a group post by a muted member (o_aux: muted until)
--   muted_all   a group post by a member while only admins may post
--   slow        not appended, nor is any later message of the same conversation in
--               this batch: no such conversation (yet) or no group row; the caller's
--               general path takes them
--   stale       not appended, nor is any later message of the same conversation in
--               this batch: the message id is not above the conversation's last one
--               (o_aux), another process's clock being ahead; the caller draws ids
--               above it and sends them again
-- A refusal burns no seq. Nothing in here raises for one message's sake; if the
-- statement fails anyway, the caller runs the batch again on its general path, where
-- each message has a savepoint of its own. (A savepoint per message in here would
-- overflow PostgreSQL's cache of subtransactions in big batches, slowing every other
-- session's snapshots.)
CREATE FUNCTION tidings_append_batch(
    p_convs  TEXT[],
    p_text   TEXT[],
    p_bytes  BYTEA[],
    p_num    BIGINT[],
    p_now    BIGINT,
    OUT o_st     TEXT,
    OUT o_seq    BIGINT,
    OUT o_ctotal BIGINT,
    OUT o_aux    BIGINT
) RETURNS SETOF record LANGUAGE plpgsql AS $$
DECLARE
    nc        INTEGER := coalesce(array_length(p_convs, 1), 0);
    c_seq     BIGINT[] := array_fill(NULL::BIGINT, ARRAY[nc]);  -- NULL: no such row
    c_cnt     BIGINT[] := array_fill(0::BIGINT, ARRAY[nc]);
    c_mid     BIGINT[] := array_fill(0::BIGINT, ARRAY[nc]);
    c_dirty   BOOLEAN[] := array_fill(false, ARRAY[nc]);
    c_defer   TEXT[] := array_fill(NULL::TEXT, ARRAY[nc]);  -- why its rest waits
    r_conv    TEXT[] := '{}';
    r_uid     TEXT[] := '{}';
    r_seq     BIGINT[] := '{}';
    r_cnt     BIGINT[] := '{}';
    written   BIGINT := 0;
    done      BIGINT;
    t         INTEGER;
    k         INTEGER;
    v_conv    TEXT;
    v_sender  TEXT;
    v_cid     TEXT;
    v_mid     BIGINT;
    v_bits    BIGINT;
    new_cnt   BIGINT;
    g_role    INTEGER;
    g_until   BIGINT;
    g_all     INTEGER;
    refusal   TEXT;
    rec       RECORD;
BEGIN
    FOR rec IN
        SELECT c.id, c.last_seq, c.counted, c.last_mid FROM conversations c
        WHERE c.id = ANY(p_convs) ORDER BY c.id COLLATE "C" FOR UPDATE
    LOOP
        k := array_position(p_convs, rec.id);
        c_seq[k] := rec.last_seq;
        c_cnt[k] := rec.counted;
        c_mid[k] := rec.last_mid;
    END LOOP;

    FOR i IN 0 .. coalesce(array_length(p_num, 1), 0) / 5 - 1 LOOP
        t := 5 * i;
        k := p_num[t + 1];
        v_mid := p_num[t + 2];
        v_bits := p_num[t + 5];
        v_conv := p_convs[k];
        v_sender := p_text[t + 1];
        v_cid := p_text[t + 3];
        o_seq := NULL;
        o_ctotal := NULL;
        o_aux := NULL;
        IF c_defer[k] IS NULL AND c_seq[k] IS NULL THEN
            c_defer[k] := 'slow';
        ELSIF c_defer[k] IS NULL AND v_mid <= c_mid[k] THEN
            c_defer[k] := 'stale';
        END IF;
        IF c_defer[k] IS NOT NULL THEN
            o_st := c_defer[k];
            o_aux := c_mid[k];
            RETURN NEXT;
            CONTINUE;
        END IF;
        refusal := NULL;
        IF p_text[t + 5] IS NOT NULL AND EXISTS (
            SELECT 1 FROM blocks b WHERE b.uid = p_text[t + 5] AND b.blocked = v_sender
        ) THEN
            refusal := 'blocked';
        ELSIF left(v_conv, 2) = 'g:' THEN
            -- tidings.domain.groups.check_post: members only; mutes (not for the
            -- privileged server API); during mute-all, admins (role >= 1) and the owner.
            SELECT m.role, m.muted_until, g.muted_all INTO g_role, g_until, g_all
            FROM groups g LEFT JOIN members m ON m.conv = g.conv AND m.uid = v_sender
            WHERE g.conv = v_conv;
            IF NOT FOUND THEN
                c_defer[k] := 'slow';
                o_st := 'slow';
                RETURN NEXT;
                CONTINUE;
            END IF;
            IF g_role IS NULL THEN
                refusal := 'not_member';
            ELSIF v_bits & 4 = 0 AND g_until > p_now THEN
                refusal := 'muted';
                o_aux := g_until;
            ELSIF v_bits & 4 = 0 AND g_all <> 0 AND g_role < 1 THEN
                refusal := 'muted_all';
            END IF;
        END IF;
        IF refusal IS NOT NULL THEN
            -- A retry of a message stored before the block or mute gets its answer.
            IF EXISTS (SELECT 1 FROM messages m WHERE m.sender = v_sender AND m.cid = v_cid)
            THEN
                refusal := 'dup';
            END IF;
            o_st := refusal;
            RETURN NEXT;
            CONTINUE;
        END IF;
        new_cnt := c_cnt[k] + (v_bits & 1);
        INSERT INTO messages (conv, seq, mid, sender, dev, cid, type, body, ts, flags,
                              mentions, reply_to, ctotal)
        VALUES (v_conv, c_seq[k] + 1, v_mid, v_sender, p_text[t + 2], v_cid, p_text[t + 4],
                p_bytes[2 * i + 1], p_now, p_num[t + 3], p_bytes[2 * i + 2], p_num[t + 4],
                new_cnt)
        ON CONFLICT (sender, cid) DO NOTHING;
        IF NOT FOUND THEN
            o_st := 'dup';
            RETURN NEXT;
            CONTINUE;
        END IF;
        written := written + 1;
        c_seq[k] := c_seq[k] + 1;
        c_cnt[k] := new_cnt;
        c_mid[k] := v_mid;
        c_dirty[k] := true;
        IF v_bits & 2 <> 0 THEN  -- sending advances the sender's read position
            r_conv := r_conv || v_conv;
            r_uid := r_uid || v_sender;
            r_seq := r_seq || c_seq[k];
            r_cnt := r_cnt || new_cnt;
        END IF;
        o_st := 'ok';
        o_seq := c_seq[k];
        o_ctotal := new_cnt;
        RETURN NEXT;
    END LOOP;

    UPDATE conversations c SET last_seq = v.s, last_mid = v.m, last_ts = p_now, counted = v.n
    FROM unnest(p_convs, c_seq, c_mid, c_cnt, c_dirty) AS v(id, s, m, n, d)
    WHERE c.id = v.id AND v.d;
    GET DIAGNOSTICS done = ROW_COUNT;
    written := written + done;
    -- Within a conversation seqs and running totals rise together: max() pairs them.
    FOR rec IN
        SELECT v.c, v.u, max(v.s) AS s, max(v.n) AS n
        FROM unnest(r_conv, r_uid, r_seq, r_cnt) AS v(c, u, s, n)
        GROUP BY v.c, v.u ORDER BY v.c COLLATE "C", v.u COLLATE "C"
    LOOP
        UPDATE members m SET read_seq = rec.s, read_counted = rec.n
        WHERE m.conv = rec.c AND m.uid = rec.u AND m.read_seq < rec.s;
        GET DIAGNOSTICS done = ROW_COUNT;
        written := written + done;
    END LOOP;

    o_st := 'written';
    o_seq := written;
    o_ctotal := NULL;
    o_aux := NULL;
    RETURN NEXT;
END;
$$;

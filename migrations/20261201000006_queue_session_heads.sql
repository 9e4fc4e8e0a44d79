-- Per-session FIFO without walking blocked rows.
--
-- Before this, a claim walked an agent's pending rows in `seq` order and probed each for an
-- earlier unfinished command of its session; with deep per-session backlogs nearly every
-- row it walked was blocked, so a claim cost O(backlog) and throughput fell as the backlog
-- grew. Now every open command carries `session_head`: true exactly when it is the oldest
-- open (pending, sent, ack) command of its session, or has no session. The claim index
-- holds only pending heads, so a claim reads O(batch) rows whatever the depth.
--
-- Who maintains the flag, and why it cannot be lost:
--   * a new command is a head when its session has no open command (BEFORE INSERT);
--   * when a head leaves the open states (completed, failed for good, cancelled, expired,
--     quarantined), the session's oldest remaining open command becomes the head
--     (AFTER UPDATE). A head that returns to pending (retry, release, rescue) stays head;
--   * both take the session's transaction-scoped advisory lock (key space
--     (21325, hashtext(session_id)), apart from the single-key locks used elsewhere) before
--     they look, and hold it to commit. So of an enqueue and a finishing head of the same
--     session, the second always sees the first's committed rows: an enqueue never misses
--     a head that is finishing, a promotion never misses a command enqueued beside it.
--   * `seq` orders a session's commands, so it must be drawn under that lock too. The
--     queue's enqueue statements lock before the row (and its `seq`) is formed; an insert
--     that did not, and lost the race to a later `seq`, is refused with a serialization
--     failure (retry it) rather than queued out of order.
--
-- The claim keeps its "no earlier unfinished command of the session" probe: for a head it
-- costs one index probe, and it keeps FIFO independent of this flag's bookkeeping.

ALTER TABLE agent_commands ADD COLUMN session_head boolean NOT NULL DEFAULT true;

UPDATE agent_commands c SET session_head = false
WHERE c.session_id IS NOT NULL
  AND c.status IN ('pending', 'sent', 'ack')
  AND EXISTS (
      SELECT 1 FROM agent_commands e
      WHERE e.session_id = c.session_id AND e.seq < c.seq
        AND e.status IN ('pending', 'sent', 'ack'));

DROP INDEX agent_commands_claim_idx;
CREATE INDEX agent_commands_claim_idx ON agent_commands (agent_id, seq)
    WHERE status = 'pending' AND session_head;

CREATE FUNCTION agent_commands_session_head_insert() RETURNS trigger
LANGUAGE plpgsql AS $$
DECLARE
    last_open bigint;
BEGIN
    IF NEW.session_id IS NULL THEN
        NEW.session_head := true;
        RETURN NEW;
    END IF;
    PERFORM pg_advisory_xact_lock(21325, hashtext(NEW.session_id));
    SELECT max(seq) INTO last_open FROM agent_commands
    WHERE session_id = NEW.session_id AND status IN ('pending', 'sent', 'ack');
    IF last_open > NEW.seq THEN
        RAISE EXCEPTION 'command % of session % was numbered before command % that is already queued; retry the insert',
            NEW.seq, NEW.session_id, last_open
            USING ERRCODE = 'serialization_failure';
    END IF;
    NEW.session_head := last_open IS NULL;
    RETURN NEW;
END
$$;

CREATE TRIGGER agent_commands_session_head_insert
    BEFORE INSERT ON agent_commands
    FOR EACH ROW
    EXECUTE FUNCTION agent_commands_session_head_insert();

CREATE FUNCTION agent_commands_session_head_advance() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    PERFORM pg_advisory_xact_lock(21325, hashtext(NEW.session_id));
    UPDATE agent_commands SET session_head = true
    WHERE command_id = (
        SELECT command_id FROM agent_commands
        WHERE session_id = NEW.session_id AND status IN ('pending', 'sent', 'ack')
        ORDER BY seq
        LIMIT 1)
      AND NOT session_head;
    RETURN NULL;
END
$$;

CREATE TRIGGER agent_commands_session_head_advance
    AFTER UPDATE OF status ON agent_commands
    FOR EACH ROW
    WHEN (NEW.session_id IS NOT NULL
          AND OLD.session_head
          AND OLD.status IN ('pending', 'sent', 'ack')
          AND NEW.status IN ('completed', 'failed', 'cancelled'))
    EXECUTE FUNCTION agent_commands_session_head_advance();

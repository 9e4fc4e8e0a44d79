-- What the public API needs beyond the queue: stored answers for `Idempotency-Key`
-- retries, and change notifications that drive WatchSession / WatchCommand.

-- The first answer to each (user, Idempotency-Key). Written in the same transaction as
-- the change it describes, so a retry either finds the answer or finds nothing happened.
CREATE TABLE api_idempotency (
    user_id         text        NOT NULL,
    idempotency_key text        NOT NULL CHECK (length(idempotency_key) BETWEEN 1 AND 255),
    -- SHA-256 of the operation and its parameters: the same key with a different
    -- request is refused instead of answered with an unrelated response.
    request_sha256  bytea       NOT NULL CHECK (octet_length(request_sha256) = 32),
    response        jsonb       NOT NULL,
    created_at      timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (user_id, idempotency_key)
);
CREATE INDEX api_idempotency_created_idx ON api_idempotency (created_at);

-- Change notifications: `<id> <state> <xid>`. The transaction id lets a watcher drop
-- notifications already contained in the snapshot it read first (pg_visible_in_snapshot
-- semantics), so a watch never reports a state older than the one it started from.
-- Only updates notify: nobody can be watching a row before it exists.
CREATE FUNCTION sessions_notify_change() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    PERFORM pg_notify('streamspace_session_changes',
                      NEW.id || ' ' || NEW.state || ' ' || pg_current_xact_id()::text);
    RETURN NULL;
END
$$;

CREATE TRIGGER sessions_notify_change
    AFTER UPDATE OF state ON sessions
    FOR EACH ROW
    WHEN (OLD.state IS DISTINCT FROM NEW.state)
    EXECUTE FUNCTION sessions_notify_change();

CREATE FUNCTION agent_commands_notify_change() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    PERFORM pg_notify('streamspace_command_changes',
                      NEW.command_id || ' ' || NEW.status || ' ' || pg_current_xact_id()::text);
    RETURN NULL;
END
$$;

CREATE TRIGGER agent_commands_notify_change
    AFTER UPDATE OF status ON agent_commands
    FOR EACH ROW
    WHEN (OLD.status IS DISTINCT FROM NEW.status)
    EXECUTE FUNCTION agent_commands_notify_change();

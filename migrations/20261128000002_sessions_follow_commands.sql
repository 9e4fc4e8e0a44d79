-- A session's state follows its commands' outcomes in the same transaction as the command
-- transition itself, whichever path made it (agent result, retry exhaustion, quarantine,
-- expiry, rescue). Only the state the command was moving the session through is left:
-- a start that completes after the user already asked to stop leaves `terminating` alone.
CREATE FUNCTION agent_commands_follow_session() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    IF NEW.status = 'ack' THEN
        UPDATE sessions SET state = 'starting', updated_at = now()
        WHERE id = NEW.session_id AND NEW.action = 'start_session' AND state = 'pending';
    ELSIF NEW.status = 'completed' THEN
        UPDATE sessions
        SET state = CASE NEW.action
                        WHEN 'stop_session' THEN 'terminated'
                        WHEN 'hibernate_session' THEN 'hibernated'
                        ELSE 'running' END,
            url = CASE
                      WHEN NEW.action IN ('start_session', 'wake_session')
                          THEN coalesce(NEW.result #>> '{session,url}', url)
                      WHEN NEW.action = 'stop_session' THEN NULL
                      ELSE url END,
            status_message = NULL,
            terminated_at = CASE WHEN NEW.action = 'stop_session' THEN now() ELSE terminated_at END,
            updated_at = now()
        WHERE id = NEW.session_id
          AND ((NEW.action = 'start_session' AND state IN ('pending', 'starting'))
            OR (NEW.action = 'wake_session' AND state = 'waking')
            OR (NEW.action = 'hibernate_session' AND state = 'hibernating')
            OR (NEW.action = 'stop_session' AND state <> 'terminated'));
    ELSIF NEW.status = 'failed' THEN
        UPDATE sessions
        SET state = CASE NEW.action
                        WHEN 'hibernate_session' THEN 'running'
                        WHEN 'wake_session' THEN 'hibernated'
                        ELSE 'failed' END,
            status_message = NEW.error_message,
            updated_at = now()
        WHERE id = NEW.session_id
          AND ((NEW.action = 'start_session' AND state IN ('pending', 'starting'))
            OR (NEW.action = 'wake_session' AND state = 'waking')
            OR (NEW.action = 'hibernate_session' AND state = 'hibernating')
            OR (NEW.action = 'stop_session' AND state = 'terminating'));
    END IF;
    RETURN NULL;
END
$$;

CREATE TRIGGER agent_commands_follow_session
    AFTER UPDATE OF status ON agent_commands
    FOR EACH ROW
    WHEN (NEW.session_id IS NOT NULL
          AND OLD.status IS DISTINCT FROM NEW.status
          AND NEW.status IN ('ack', 'completed', 'failed'))
    EXECUTE FUNCTION agent_commands_follow_session();

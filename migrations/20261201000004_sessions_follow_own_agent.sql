-- A command moves only a session of its own agent. Before this, a stop queued for a session
-- id that another agent reported (an "orphan" that was in fact someone else's session) would,
-- on completion, mark that other agent's session terminated. Reconciliation no longer queues
-- such stops; this makes the rule hold for any path that might.
CREATE OR REPLACE FUNCTION agent_commands_follow_session() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    IF NEW.status = 'ack' THEN
        UPDATE sessions SET state = 'starting', updated_at = now()
        WHERE id = NEW.session_id AND agent_id = NEW.agent_id
          AND NEW.action = 'start_session' AND state = 'pending';
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
        WHERE id = NEW.session_id AND agent_id = NEW.agent_id
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
        WHERE id = NEW.session_id AND agent_id = NEW.agent_id
          AND ((NEW.action = 'start_session' AND state IN ('pending', 'starting'))
            OR (NEW.action = 'wake_session' AND state = 'waking')
            OR (NEW.action = 'hibernate_session' AND state = 'hibernating')
            OR (NEW.action = 'stop_session' AND state = 'terminating'));
    END IF;
    RETURN NULL;
END
$$;

-- Commands are accepted against a session's intended state (the state it will be in once its
-- accepted commands have run), so a command may now complete or fail while the session
-- already shows the transition of a later command (hibernate accepted behind a pending start
-- leaves the session `hibernating` while the start runs). Two consequences:
--
-- * a start or wake that completes behind a later command still says where the session
--   lives (`url`), though the state stays the later command's;
-- * a start that fails for good fails the session even when later commands were accepted
--   behind it: there is no session for them to act on (they then fail on the agent, which
--   changes nothing here).
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
        IF NOT FOUND AND NEW.action IN ('start_session', 'wake_session') THEN
            UPDATE sessions
            SET url = coalesce(NEW.result #>> '{session,url}', url), updated_at = now()
            WHERE id = NEW.session_id AND agent_id = NEW.agent_id
              AND state IN ('hibernating', 'waking');
        END IF;
    ELSIF NEW.status = 'failed' THEN
        UPDATE sessions
        SET state = CASE NEW.action
                        WHEN 'hibernate_session' THEN 'running'
                        WHEN 'wake_session' THEN 'hibernated'
                        ELSE 'failed' END,
            status_message = NEW.error_message,
            updated_at = now()
        WHERE id = NEW.session_id AND agent_id = NEW.agent_id
          AND ((NEW.action = 'start_session' AND state IN ('pending', 'starting', 'hibernating', 'waking'))
            OR (NEW.action = 'wake_session' AND state = 'waking')
            OR (NEW.action = 'hibernate_session' AND state = 'hibernating')
            OR (NEW.action = 'stop_session' AND state = 'terminating'));
    END IF;
    RETURN NULL;
END
$$;

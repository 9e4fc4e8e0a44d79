-- Placement's choice as one SQL function, so the session create can choose an agent and
-- insert the session in a single statement (one round trip where there were three) while
-- the rules stay written once. The rules are those of `agent_choose` before this
-- migration (crates/core/src/api/placement.rs explains them):
--
--   * candidates: agents in the wanted cluster and region (NULL: any), minus `excluded`
--     (agents a create already found full);
--   * eligible: online (connected, heartbeat within `offline_after_secs`), or any agent
--     when a cluster is named (its start waits in the queue); and below `max_sessions`;
--   * chosen: online first, then the fewest active sessions, then the agent id.
--
-- A lone uncapped candidate is taken without counting its sessions. The function is a
-- single STABLE SQL query, so the planner inlines it into the statement that calls it.

CREATE FUNCTION streamspace_placement(
    want_cluster text,
    want_region text,
    offline_after_secs float8,
    excluded text[]
) RETURNS TABLE (agent_id text, max_sessions integer)
LANGUAGE sql STABLE AS $$
    WITH candidates AS (
        SELECT a.agent_id, a.max_sessions,
               (a.connected_owner IS NOT NULL
                AND a.last_heartbeat_at > now() - make_interval(secs => offline_after_secs))
                   AS online
        FROM agents a
        WHERE (want_cluster IS NULL OR a.cluster = want_cluster)
          AND (want_region IS NULL OR a.region = want_region)
          AND a.agent_id <> ALL(excluded)
    )
    SELECT c.agent_id, c.max_sessions
    FROM candidates c
    CROSS JOIN LATERAL (
        SELECT CASE
            WHEN c.max_sessions IS NULL AND (SELECT count(*) FROM candidates) = 1
                THEN 0
            ELSE (SELECT count(*) FROM sessions s
                  WHERE s.agent_id = c.agent_id
                    AND s.state NOT IN ('terminated', 'failed'))
            END AS active
    ) load
    WHERE (c.max_sessions IS NULL OR load.active < c.max_sessions)
      AND (c.online OR want_cluster IS NOT NULL)
    ORDER BY c.online DESC, load.active, c.agent_id
    LIMIT 1
$$;

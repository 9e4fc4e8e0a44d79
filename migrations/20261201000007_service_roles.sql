-- Least privilege for the services: `streamspace_grant_roles(gateway, dispatcher)` grants
-- each existing role exactly the table privileges its service uses, and nothing on the
-- schema itself (no DDL). The schema's owner — the role the migration Job connects as —
-- runs it after migrating (`streamspace-command-dispatcher --migrate --grant-roles …`),
-- so a later migration's tables are covered on the next run. Creating the roles (LOGIN,
-- password or certificate) is the database administrator's part: docs/security.md.
--
-- Triggers run with the privileges of whoever fired them, so a service also holds what
-- its statements' triggers touch (a command's status change moves its session; an
-- insert reads the session's open commands).

CREATE FUNCTION streamspace_grant_roles(gateway_role name, dispatcher_role name)
RETURNS void
LANGUAGE plpgsql
AS $$
BEGIN
    IF gateway_role = dispatcher_role THEN
        RAISE EXCEPTION 'the gateway and the dispatcher need roles of their own, got % twice',
            gateway_role USING ERRCODE = '22023';
    END IF;
    -- Start from nothing, so a privilege dropped here is dropped in the database too.
    EXECUTE format('REVOKE ALL ON agents, agent_credentials, sessions, agent_commands,
        api_idempotency FROM %I, %I', gateway_role, dispatcher_role);
    EXECUTE format('REVOKE ALL ON SEQUENCE agent_command_lease_token_seq FROM %I, %I',
        gateway_role, dispatcher_role);
    EXECUTE format('REVOKE CREATE ON SCHEMA public FROM %I, %I', gateway_role, dispatcher_role);
    EXECUTE format('GRANT USAGE ON SCHEMA public TO %I, %I', gateway_role, dispatcher_role);
    -- Both check at start-up that the schema is current.
    EXECUTE format('GRANT SELECT ON _sqlx_migrations TO %I, %I', gateway_role, dispatcher_role);

    -- The gateway: sessions and their commands (accept, cancel), placement reads, agent
    -- administration, idempotent answers (stored, replayed, pruned).
    EXECUTE format('GRANT SELECT, INSERT, UPDATE ON sessions, agent_commands TO %I', gateway_role);
    EXECUTE format('GRANT SELECT, INSERT, UPDATE ON agents, agent_credentials TO %I', gateway_role);
    EXECUTE format('GRANT SELECT, INSERT, UPDATE, DELETE ON api_idempotency TO %I', gateway_role);

    -- The dispatcher: delivery (claim, ack, complete, fail, rescue, prune), liveness and
    -- epochs, credential checks, session observations, stops for orphaned sessions,
    -- pruning ended sessions past the retention.
    EXECUTE format('GRANT SELECT, INSERT, UPDATE, DELETE ON agent_commands TO %I', dispatcher_role);
    EXECUTE format('GRANT SELECT, UPDATE ON agents TO %I', dispatcher_role);
    EXECUTE format('GRANT SELECT, UPDATE, DELETE ON sessions TO %I', dispatcher_role);
    EXECUTE format('GRANT SELECT, UPDATE (last_used_at) ON agent_credentials TO %I', dispatcher_role);
    EXECUTE format('GRANT USAGE ON SEQUENCE agent_command_lease_token_seq TO %I', dispatcher_role);
END;
$$;

REVOKE ALL ON FUNCTION streamspace_grant_roles(name, name) FROM PUBLIC;

-- The StreamSpace control-plane schema. This directory is the one and only schema path:
-- every service, test and tool applies these files through sqlx's migrator.

-- Agents: one row per cluster agent. "Online" is never stored; it is derived from the
-- live connection (connected_owner) and the last heartbeat, so it cannot disagree with
-- itself (the original kept a second flag that did).
CREATE TABLE agents (
    agent_id          text        PRIMARY KEY CHECK (agent_id ~ '^[a-z0-9][a-z0-9-]{0,62}$'),
    cluster           text        NOT NULL DEFAULT 'default',
    region            text        NOT NULL DEFAULT 'default',
    created_at        timestamptz NOT NULL DEFAULT now(),
    updated_at        timestamptz NOT NULL DEFAULT now(),
    -- Incremented by every accepted connection; a stream holding an older epoch is fenced.
    connection_epoch  bigint      NOT NULL DEFAULT 0,
    -- Identity of the dispatcher connection that currently holds the agent's stream.
    connected_owner   text,
    connected_at      timestamptz,
    disconnected_at   timestamptz,
    last_heartbeat_at timestamptz,
    agent_version     text,
    capabilities      jsonb,
    max_sessions      integer     CHECK (max_sessions IS NULL OR max_sessions >= 0)
);

-- Per-agent bearer credentials, stored as SHA-256 of the token (tokens are 256-bit random,
-- so a fast hash is the right tool; the plain token is shown once at creation).
CREATE TABLE agent_credentials (
    credential_id  text        PRIMARY KEY,
    agent_id       text        NOT NULL REFERENCES agents (agent_id) ON DELETE CASCADE,
    token_sha256   bytea       NOT NULL UNIQUE CHECK (octet_length(token_sha256) = 32),
    created_at     timestamptz NOT NULL DEFAULT now(),
    revoked_at     timestamptz,
    last_used_at   timestamptz
);
CREATE INDEX agent_credentials_agent_idx ON agent_credentials (agent_id);

-- User sessions (a browser/desktop workload on one agent's cluster).
CREATE TABLE sessions (
    id              text        PRIMARY KEY,
    user_id         text        NOT NULL,
    template        text        NOT NULL,
    agent_id        text        NOT NULL REFERENCES agents (agent_id),
    state           text        NOT NULL DEFAULT 'pending' CHECK (state IN (
                        'pending', 'starting', 'running', 'hibernating', 'hibernated',
                        'waking', 'terminating', 'terminated', 'failed')),
    resources       jsonb       NOT NULL DEFAULT '{}'::jsonb,
    url             text,
    status_message  text,
    created_at      timestamptz NOT NULL DEFAULT now(),
    updated_at      timestamptz NOT NULL DEFAULT now(),
    terminated_at   timestamptz
);
CREATE INDEX sessions_user_idx ON sessions (user_id, created_at DESC);
CREATE INDEX sessions_agent_active_idx ON sessions (agent_id)
    WHERE state NOT IN ('terminated', 'failed');

-- Fencing tokens for command leases: globally increasing, so a token can never repeat.
CREATE SEQUENCE agent_command_lease_token_seq AS bigint;

-- The durable command queue. Column names and status words are the original's, so the
-- operators' queries (and the seed report's) keep working.
CREATE TABLE agent_commands (
    command_id        text        PRIMARY KEY
                                  DEFAULT 'cmd-' || replace(gen_random_uuid()::text, '-', '')
                                  CHECK (command_id ~ '^cmd-[0-9a-z-]{1,64}$'),
    -- Monotonic acceptance order: per-session FIFO is defined on this column.
    seq               bigint      GENERATED ALWAYS AS IDENTITY UNIQUE,
    agent_id          text        NOT NULL REFERENCES agents (agent_id),
    session_id        text,
    -- Deliberately unconstrained: a word this build does not know is quarantined by the
    -- queue (moved to failed with a reason), not rejected at insert time.
    action            text        NOT NULL,
    payload           jsonb       NOT NULL DEFAULT '{}'::jsonb,
    status            text        NOT NULL DEFAULT 'pending' CHECK (status IN (
                          'pending', 'sent', 'ack', 'completed', 'failed', 'cancelled')),
    error_message     text,
    result            jsonb,
    created_at        timestamptz NOT NULL DEFAULT now(),
    sent_at           timestamptz,
    acknowledged_at   timestamptz,
    completed_at      timestamptz,
    updated_at        timestamptz NOT NULL DEFAULT now(),
    attempts          integer     NOT NULL DEFAULT 0 CHECK (attempts >= 0),
    max_attempts      integer     NOT NULL DEFAULT 5 CHECK (max_attempts >= 1),
    next_attempt_at   timestamptz NOT NULL DEFAULT now(),
    lease_owner       text,
    lease_token       bigint,
    lease_expires_at  timestamptz,
    idempotency_key   text        CHECK (idempotency_key IS NULL OR length(idempotency_key) <= 255),
    expires_at        timestamptz,
    trace_context     text,
    -- A leased command carries its whole lease; a pending one carries none, so a token
    -- handed out before a release or rescue can never match again. Terminal rows keep the
    -- lease that ended them, which tells a duplicate report from a stale one.
    CONSTRAINT agent_commands_leased_has_lease CHECK (
        status NOT IN ('sent', 'ack')
        OR (lease_token IS NOT NULL AND lease_owner IS NOT NULL AND lease_expires_at IS NOT NULL)
    ),
    CONSTRAINT agent_commands_pending_has_no_lease CHECK (
        status <> 'pending'
        OR (lease_token IS NULL AND lease_owner IS NULL AND lease_expires_at IS NULL)
    )
);

-- Claim path: an agent's pending commands in acceptance order. The state predicate is a
-- literal so prepared statements can use the partial index.
CREATE INDEX agent_commands_claim_idx ON agent_commands (agent_id, seq)
    WHERE status = 'pending';
-- Per-session FIFO check: "is there an earlier unfinished command of this session?"
CREATE INDEX agent_commands_session_open_idx ON agent_commands (session_id, seq)
    WHERE status IN ('pending', 'sent', 'ack');
-- Lease release (by owner) and rescue (by expiry).
CREATE INDEX agent_commands_lease_owner_idx ON agent_commands (lease_owner)
    WHERE status IN ('sent', 'ack');
CREATE INDEX agent_commands_lease_expiry_idx ON agent_commands (lease_expires_at)
    WHERE status IN ('sent', 'ack');
CREATE INDEX agent_commands_expiry_idx ON agent_commands (expires_at)
    WHERE status = 'pending' AND expires_at IS NOT NULL;
CREATE UNIQUE INDEX agent_commands_idempotency_key_idx ON agent_commands (idempotency_key)
    WHERE idempotency_key IS NOT NULL;
-- History lookups (the seed report's query) and pruning.
CREATE INDEX agent_commands_session_created_idx ON agent_commands (session_id, created_at DESC);
CREATE INDEX agent_commands_terminal_idx ON agent_commands (completed_at)
    WHERE status IN ('completed', 'failed', 'cancelled');

-- A hot, churning queue: vacuum it far more eagerly than the global defaults.
ALTER TABLE agent_commands SET (
    autovacuum_vacuum_scale_factor = 0.02,
    autovacuum_vacuum_threshold = 1000,
    autovacuum_analyze_scale_factor = 0.05
);

-- The audit table: one row per /v1 request that reached a model server.
-- Range-partitioned by completed_at into weekly partitions managed by pg_partman; a default
-- partition catches rows far in the past or future until maintenance moves them.

CREATE SCHEMA IF NOT EXISTS inference;
CREATE SCHEMA IF NOT EXISTS partman;
CREATE EXTENSION IF NOT EXISTS pg_partman SCHEMA partman;

CREATE TABLE inference.requests (
    id                bigserial,
    request_id        uuid        NOT NULL,
    organization_id   text        NOT NULL,
    instance_id       text        NOT NULL,
    model             text        NOT NULL,
    requested_model   text        NOT NULL,
    endpoint          text        NOT NULL,
    prompt_tokens     integer     NOT NULL DEFAULT 0 CHECK (prompt_tokens >= 0),
    completion_tokens integer     NOT NULL DEFAULT 0 CHECK (completion_tokens >= 0),
    status            smallint    NOT NULL,
    streamed          boolean     NOT NULL DEFAULT false,
    disconnected      boolean     NOT NULL DEFAULT false,
    duration_ms       integer     NOT NULL CHECK (duration_ms >= 0),
    ttfb_ms           integer,
    started_at        timestamptz NOT NULL,
    completed_at      timestamptz NOT NULL DEFAULT now(),
    ingested_at       timestamptz NOT NULL DEFAULT clock_timestamp(),
    PRIMARY KEY (request_id, completed_at)
) PARTITION BY RANGE (completed_at);

CREATE INDEX requests_org_completed_idx ON inference.requests (organization_id, completed_at);
CREATE INDEX requests_ingested_idx ON inference.requests (ingested_at);

-- pg_partman 4.x calls native partitioning 'native'; 5.x calls it 'range'.
DO $$
DECLARE
    partman_major int := split_part(
        (SELECT extversion FROM pg_extension WHERE extname = 'pg_partman'), '.', 1)::int;
BEGIN
    PERFORM partman.create_parent(
        p_parent_table => 'inference.requests',
        p_control      => 'completed_at',
        p_type         => CASE WHEN partman_major >= 5 THEN 'range' ELSE 'native' END,
        p_interval     => '1 week',
        p_premake      => 8);
END
$$;

-- Keep premaking partitions on a quiet table: billing must not depend on traffic.
UPDATE partman.part_config
   SET infinite_time_partitions = true
 WHERE parent_table = 'inference.requests';

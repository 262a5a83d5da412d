-- Usage rollups: what the usage API and the dashboard read, so that no query of theirs ever
-- scans inference.requests. Three tables of the same shape, one row per minute, hour and UTC
-- day and per organization, endpoint family, instance, model and API key, hold the sums of
-- the audit table's rows. A query takes whole days where it can, hours next to them and
-- minutes at its edges, so a 30-day query reads about 30 rows per group. Six more, by family
-- and model alone and by family and organization alone, answer an operator's views of the
-- whole fleet (by model, in total, by organization) from a few rows per bucket and model or
-- organization, however many instances and keys there are.
--
-- One process of the fleet keeps them up to date (portal/rollups.py): every few seconds it
-- adds the rows ingested since its watermark, inference.usage_rollup_state.ingested_until,
-- and moves the watermark in the same transaction. Rows are chosen by ingested_at, not by
-- completed_at, so a late row (a spool replayed after an outage) is added to its old minute,
-- hour and day when it arrives, and no row is added twice.

-- The family of an endpoint, as OpenAI's usage API splits usage: 'completions' for the
-- generation endpoints, 'embeddings' for the pooling ones, NULL for those that bill nothing
-- (counting tokens, reading or cancelling a stored response).
CREATE FUNCTION inference.usage_family(p_endpoint text) RETURNS text
LANGUAGE sql IMMUTABLE PARALLEL SAFE AS $$
    SELECT CASE
        WHEN p_endpoint IN ('/v1/chat/completions', '/v1/completions',
                            '/v1/chat/completions/batch', '/v1/responses', '/v1/messages')
            THEN 'completions'
        WHEN p_endpoint IN ('/v1/embeddings', '/v1/score', '/v1/rerank')
            THEN 'embeddings'
    END
$$;

-- api_key_id is 0 where the tenant headers named the tenant (no key): a key column of the
-- primary key cannot be NULL.
CREATE TABLE inference.usage_minute (
    organization_id     text        NOT NULL,
    family              text        NOT NULL CHECK (family IN ('completions', 'embeddings')),
    bucket_start        timestamptz NOT NULL,
    instance_id         text        NOT NULL,
    model               text        NOT NULL,
    api_key_id          bigint      NOT NULL,
    input_tokens        bigint      NOT NULL,
    output_tokens       bigint      NOT NULL,
    input_cached_tokens bigint      NOT NULL,
    num_model_requests  bigint      NOT NULL,
    PRIMARY KEY (organization_id, family, bucket_start, instance_id, model, api_key_id)
);
-- For an operator's query over every organization.
CREATE INDEX usage_minute_family_idx ON inference.usage_minute (family, bucket_start);

CREATE TABLE inference.usage_hour (LIKE inference.usage_minute INCLUDING ALL);
CREATE TABLE inference.usage_day (LIKE inference.usage_minute INCLUDING ALL);

-- The same sums over every organization, instance and key.
CREATE TABLE inference.usage_model_minute (
    family              text        NOT NULL CHECK (family IN ('completions', 'embeddings')),
    bucket_start        timestamptz NOT NULL,
    model               text        NOT NULL,
    input_tokens        bigint      NOT NULL,
    output_tokens       bigint      NOT NULL,
    input_cached_tokens bigint      NOT NULL,
    num_model_requests  bigint      NOT NULL,
    PRIMARY KEY (family, bucket_start, model)
);
CREATE TABLE inference.usage_model_hour (LIKE inference.usage_model_minute INCLUDING ALL);
CREATE TABLE inference.usage_model_day (LIKE inference.usage_model_minute INCLUDING ALL);

-- And over every instance, model and key of an organization.
CREATE TABLE inference.usage_org_minute
    (LIKE inference.usage_model_minute INCLUDING DEFAULTS INCLUDING CONSTRAINTS);
ALTER TABLE inference.usage_org_minute RENAME COLUMN model TO organization_id;
ALTER TABLE inference.usage_org_minute ADD PRIMARY KEY (family, bucket_start, organization_id);
CREATE TABLE inference.usage_org_hour (LIKE inference.usage_org_minute INCLUDING ALL);
CREATE TABLE inference.usage_org_day (LIKE inference.usage_org_minute INCLUDING ALL);

-- A single row: every row ingested before ingested_until is in the rollups. NULL before the
-- first pass, which starts from the oldest row.
CREATE TABLE inference.usage_rollup_state (
    id             boolean     PRIMARY KEY DEFAULT true CHECK (id),
    ingested_until timestamptz,
    last_run_at    timestamptz
);
INSERT INTO inference.usage_rollup_state DEFAULT VALUES;

-- Add the rows ingested in [p_from, p_until) to the nine rollups; returns how many rows that
-- was. p_from NULL: from the oldest. Call it in the transaction that moves the watermark.
-- One statement: the rows are read and summed once, by minute, then added to each rollup. A
-- pass holds at most 250,000 rows (portal/rollups.py): their sums are sorted in memory.
CREATE FUNCTION inference.roll_up_usage(p_from timestamptz, p_until timestamptz)
RETURNS bigint
LANGUAGE plpgsql
SET work_mem = '64MB'
AS $$
DECLARE
    v_sql     text := $sql$
WITH delta AS MATERIALIZED (
    SELECT r.organization_id, f.family, date_trunc('minute', r.completed_at, 'UTC') AS minute,
           r.instance_id, r.model, coalesce(r.api_key_id, 0) AS api_key_id,
           sum(r.prompt_tokens)::bigint AS input_tokens,
           sum(r.completion_tokens)::bigint AS output_tokens,
           sum(r.cached_tokens)::bigint AS input_cached_tokens,
           count(*) AS num_model_requests
      FROM inference.requests AS r,
           LATERAL (SELECT inference.usage_family(r.endpoint)) AS f (family)
     WHERE r.ingested_at >= coalesce($1, '-infinity') AND r.ingested_at < $2
       AND f.family IS NOT NULL
     GROUP BY 1, 2, 3, 4, 5, 6
)$sql$;
    v_rollup  record;
    v_unit    text;
    v_columns text[];
    v_rows    bigint;
BEGIN
    FOR v_rollup IN SELECT * FROM (VALUES
            ('usage_', ARRAY['organization_id', 'family', 'bucket_start', 'instance_id', 'model',
                             'api_key_id']),
            ('usage_model_', ARRAY['family', 'bucket_start', 'model']),
            ('usage_org_', ARRAY['family', 'bucket_start', 'organization_id'])) AS r (prefix, keys)
    LOOP
        FOREACH v_unit IN ARRAY ARRAY['minute', 'hour', 'day'] LOOP
            -- The keys as the delta has them: its minute truncated to this rollup's unit.
            v_columns := array_replace(v_rollup.keys, 'bucket_start',
                                       format('date_trunc(%L, minute, %L)', v_unit, 'UTC'));
            v_sql := v_sql || format($sql$,
%1$I AS (
    INSERT INTO inference.%1$I AS u
           (%2$s, input_tokens, output_tokens, input_cached_tokens, num_model_requests)
    SELECT %3$s, sum(input_tokens), sum(output_tokens), sum(input_cached_tokens),
           sum(num_model_requests)
      FROM delta GROUP BY %4$s
    ON CONFLICT (%2$s)
    DO UPDATE SET input_tokens = u.input_tokens + EXCLUDED.input_tokens,
                  output_tokens = u.output_tokens + EXCLUDED.output_tokens,
                  input_cached_tokens = u.input_cached_tokens + EXCLUDED.input_cached_tokens,
                  num_model_requests = u.num_model_requests + EXCLUDED.num_model_requests
)$sql$, v_rollup.prefix || v_unit, array_to_string(v_rollup.keys, ', '),
                array_to_string(v_columns, ', '),
                (SELECT string_agg(i::text, ', ')
                   FROM generate_series(1, cardinality(v_rollup.keys)) AS i));
        END LOOP;
    END LOOP;
    EXECUTE v_sql || ' SELECT coalesce(sum(num_model_requests), 0)::bigint FROM delta'
       INTO v_rows USING p_from, p_until;
    RETURN v_rows;
END
$$;

-- Rate limits and token quotas per organization, instance or API key, optionally per model,
-- and the notifications that let every gateway process see a change to keys, the org gate
-- or limits at once.
--
-- A row names one subject: an organization (instance_id and api_key_id NULL), one instance of
-- it (instance_id set), or one key (api_key_id set). model NULL covers every model; a row with
-- a model covers that model only. Any of the limits may be NULL (no such limit). Tokens are
-- counted as prompt_weight * prompt_tokens + completion_weight * completion_tokens.
CREATE TABLE inference.limits (
    id                  bigint      GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    organization_id     text        NOT NULL,
    instance_id         text,
    api_key_id          bigint      REFERENCES inference.api_keys (id) ON DELETE CASCADE,
    model               text,
    requests_per_minute integer     CHECK (requests_per_minute > 0),
    tokens_per_minute   bigint      CHECK (tokens_per_minute > 0),
    max_concurrent      integer     CHECK (max_concurrent > 0),
    tokens_per_day      bigint      CHECK (tokens_per_day > 0),
    tokens_per_month    bigint      CHECK (tokens_per_month > 0),
    prompt_weight       numeric     NOT NULL DEFAULT 1 CHECK (prompt_weight >= 0),
    completion_weight   numeric     NOT NULL DEFAULT 1 CHECK (completion_weight >= 0),
    updated_at          timestamptz NOT NULL DEFAULT now(),
    CHECK (instance_id IS NULL OR api_key_id IS NULL)
);

-- One row per subject and model (NULLs compared as values).
CREATE UNIQUE INDEX limits_subject_idx ON inference.limits (
    organization_id, coalesce(instance_id, ''), coalesce(api_key_id, 0), coalesce(model, ''));

-- Tell every listening gateway process which table changed; each reloads that cache. The
-- periodic reloads stay, as a safety net for a notification missed while reconnecting.
CREATE FUNCTION inference.notify_tenants_changed() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    PERFORM pg_notify('inference_gateway_tenants', TG_TABLE_NAME);
    RETURN NULL;
END
$$;

-- Not on last_used_at, which the gateways themselves write as keys are used.
CREATE TRIGGER api_keys_changed
    AFTER INSERT OR DELETE OR UPDATE OF key_hash, organization_id, instance_id, revoked_at
    ON inference.api_keys
    FOR EACH STATEMENT EXECUTE FUNCTION inference.notify_tenants_changed();
CREATE TRIGGER org_validation_changed AFTER INSERT OR UPDATE OR DELETE
    ON inference.org_validation
    FOR EACH STATEMENT EXECUTE FUNCTION inference.notify_tenants_changed();
CREATE TRIGGER limits_changed AFTER INSERT OR UPDATE OR DELETE ON inference.limits
    FOR EACH STATEMENT EXECUTE FUNCTION inference.notify_tenants_changed();

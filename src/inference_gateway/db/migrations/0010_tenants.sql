-- Tenants: which organizations may use the gateway (when ORG_AUTH_ENABLED), and the API keys
-- that name an organization and an instance for clients that cannot set the tenant headers.

-- The original server's table, kept as it was so existing tooling that writes it keeps working.
CREATE TABLE IF NOT EXISTS inference.org_validation (
    org_id          text        PRIMARY KEY,
    valid           boolean     NOT NULL DEFAULT false,
    last_updated_at timestamptz NOT NULL DEFAULT now()
);

-- A key is shown once when created; only its SHA-256 is stored. The prefix (the key's first
-- characters) identifies it in listings and on the command line.
CREATE TABLE inference.api_keys (
    id              bigint      GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    prefix          text        NOT NULL UNIQUE,
    key_hash        bytea       NOT NULL UNIQUE CHECK (octet_length(key_hash) = 32),
    organization_id text        NOT NULL,
    instance_id     text        NOT NULL,
    created_at      timestamptz NOT NULL DEFAULT now(),
    last_used_at    timestamptz,  -- written in batches, so up to one refresh interval behind
    revoked_at      timestamptz
);

CREATE INDEX api_keys_org_idx ON inference.api_keys (organization_id, instance_id);

-- Admin keys: credentials that read every organization's usage (the usage API and the
-- dashboard) and nothing else. They name no tenant, so /v1 requests never accept them: an
-- operator's read credential cannot spend tokens, and a tenant's key reads only its own usage.

ALTER TABLE inference.api_keys
    ADD COLUMN is_admin boolean NOT NULL DEFAULT false,
    ALTER COLUMN organization_id DROP NOT NULL,
    ALTER COLUMN instance_id DROP NOT NULL,
    ADD CONSTRAINT api_keys_tenant_or_admin CHECK (
        CASE WHEN is_admin THEN organization_id IS NULL AND instance_id IS NULL
             ELSE organization_id IS NOT NULL AND instance_id IS NOT NULL END);

-- Every endpoint family vLLM serves is metered (chat, completions, the Responses API, the
-- Anthropic Messages API, pooling). Three columns join the audit table:
--   cached_tokens  of prompt_tokens, those vLLM served from its prefix cache (priced apart);
--   upstream_id    the model server's id of its answer (resp_..., chatcmpl-..., msg_...): ties a
--                  row to vLLM's logs, and a stored response to the tenant that created it;
--   replica        the model server that answered (its base URL).
-- Adding a column with a constant default rewrites no partition.

ALTER TABLE inference.requests
    ADD COLUMN cached_tokens integer NOT NULL DEFAULT 0 CHECK (cached_tokens >= 0),
    ADD COLUMN upstream_id   text,
    ADD COLUMN replica       text;

-- Who created a stored response: looked up when a tenant retrieves, cancels or continues one.
CREATE INDEX requests_response_owner_idx ON inference.requests (upstream_id)
    WHERE endpoint = '/v1/responses' AND upstream_id IS NOT NULL;

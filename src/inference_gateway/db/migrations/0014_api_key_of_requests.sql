-- Which API key named the tenant of a request (NULL when the tenant headers did): usage can
-- then be told apart by key, as OpenAI's usage API groups it.
ALTER TABLE inference.requests ADD COLUMN api_key_id bigint;

-- keepd schema v5: an Idempotency-Key names one request. The fingerprint
-- (SHA-256 of the route and the request's content) lets a retry with the
-- same key and another request be refused (422) instead of being answered
-- with the first request's result. Rows written before v5 have none and
-- replay as they always did.
ALTER TABLE keepd.push_requests ADD COLUMN request_hash bytea;
CREATE INDEX push_requests_created_idx ON keepd.push_requests (created_at);
CREATE INDEX sessions_expires_idx ON keepd.sessions (expires_at);

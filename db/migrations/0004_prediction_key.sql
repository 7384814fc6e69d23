-- A request key per prediction (an outbox entry, a client's Idempotency-Key): a replayed or retried
-- request finds its first row by key instead of storing a second one. NULL for rows without one
-- (NULLs never conflict). Adding a nullable column without a default rewrites nothing.
ALTER TABLE predictions
    ADD COLUMN key text
        CONSTRAINT predictions_key_length CHECK (length(key) BETWEEN 1 AND 200),
    ADD CONSTRAINT predictions_key_unique UNIQUE (key);

-- Labels belong to whoever made the drawing, and "not a digit" is a choice of its own.
--
-- `label_token_hash`: the sha256 (hex) of the random label token given to the person who made the
-- prediction; a label or a deletion must bring the token (or come from the operator). NULL for
-- rows stored before: only the operator may change them. Adding nullable columns and a column
-- with a constant default rewrites nothing.
ALTER TABLE predictions
    ADD COLUMN label_token_hash text
        CONSTRAINT predictions_label_token_hash_hex CHECK (label_token_hash ~ '^[0-9a-f]{64}$'),
    ADD COLUMN not_a_digit boolean NOT NULL DEFAULT false,
    -- A drawing that is not a digit has no true label, and is never exported as one.
    ADD CONSTRAINT predictions_not_a_digit_unlabelled CHECK (NOT (not_a_digit AND true_label IS NOT NULL));

-- `labelled_at` is the time of the person's choice: a digit or "not a digit".
ALTER TABLE predictions
    DROP CONSTRAINT predictions_label_time,
    ADD CONSTRAINT predictions_label_time CHECK ((true_label IS NULL AND NOT not_a_digit) = (labelled_at IS NULL));

-- The history's filters "wrong" and "not a digit" read these (few) rows newest first, instead of
-- scanning the whole table for them.
CREATE INDEX predictions_wrong_idx ON predictions (id) WHERE true_label <> digit;
CREATE INDEX predictions_not_a_digit_idx ON predictions (id) WHERE not_a_digit;

-- The counters of migration 0003 count not-a-digit drawings apart, under the label -2 (-1 stays
-- "not labelled"). A deletion takes its row's count back, as before.
ALTER TABLE prediction_counts
    DROP CONSTRAINT prediction_counts_label_range,
    ADD CONSTRAINT prediction_counts_label_range CHECK (true_label BETWEEN -2 AND 9);

CREATE OR REPLACE FUNCTION prediction_counts_track() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    IF TG_OP IN ('UPDATE', 'DELETE') THEN
        PERFORM prediction_counts_add(
            OLD.model_version, (CASE WHEN OLD.not_a_digit THEN -2 ELSE OLD.true_label END)::smallint, OLD.digit, -1
        );
    END IF;
    IF TG_OP IN ('INSERT', 'UPDATE') THEN
        PERFORM prediction_counts_add(
            NEW.model_version, (CASE WHEN NEW.not_a_digit THEN -2 ELSE NEW.true_label END)::smallint, NEW.digit, 1
        );
    END IF;
    RETURN NULL;
END
$$;

-- The trigger also fires when only `not_a_digit` changes. Every existing row has not_a_digit
-- false, so the counters need no backfill.
DROP TRIGGER predictions_count ON predictions;
CREATE TRIGGER predictions_count
AFTER INSERT OR DELETE OR UPDATE OF model_version, true_label, digit, not_a_digit ON predictions
FOR EACH ROW EXECUTE FUNCTION prediction_counts_track();

-- A deleted prediction takes its drawing with it: `prediction_images.prediction_id` has been
-- `REFERENCES predictions (id) ON DELETE CASCADE` since migration 0002.

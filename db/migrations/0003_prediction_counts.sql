-- Counters for the statistics, kept by triggers: the statistics read a few hundred rows whatever
-- the number of predictions, instead of scanning them all.
--
-- One counter per (model version, true label, predicted digit) and "slot". The slot is the
-- writing backend's pid modulo 16, so concurrent connections bump different rows and do not wait
-- for each other's commits. The statistics add the slots up. An unlabelled row counts under -1.
CREATE TABLE prediction_counts (
    model_version text NOT NULL,
    true_label    smallint NOT NULL CONSTRAINT prediction_counts_label_range CHECK (true_label BETWEEN -1 AND 9),
    digit         smallint NOT NULL CONSTRAINT prediction_counts_digit_range CHECK (digit BETWEEN 0 AND 9),
    slot          smallint NOT NULL,
    n             bigint NOT NULL,
    PRIMARY KEY (model_version, true_label, digit, slot)
);

CREATE FUNCTION prediction_counts_add(v text, label smallint, d smallint, delta integer) RETURNS void
LANGUAGE sql AS $$
    INSERT INTO prediction_counts AS c (model_version, true_label, digit, slot, n)
    VALUES (v, coalesce(label, -1), d, pg_backend_pid() % 16, delta)
    ON CONFLICT (model_version, true_label, digit, slot) DO UPDATE SET n = c.n + excluded.n
$$;

CREATE FUNCTION prediction_counts_track() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    IF TG_OP IN ('UPDATE', 'DELETE') THEN
        PERFORM prediction_counts_add(OLD.model_version, OLD.true_label, OLD.digit, -1);
    END IF;
    IF TG_OP IN ('INSERT', 'UPDATE') THEN
        PERFORM prediction_counts_add(NEW.model_version, NEW.true_label, NEW.digit, 1);
    END IF;
    RETURN NULL;
END
$$;

CREATE FUNCTION prediction_counts_reset() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    TRUNCATE prediction_counts;
    RETURN NULL;
END
$$;

-- Creating the triggers locks out writers until this migration commits, so the backfill below
-- counts exactly the rows the triggers do not.
CREATE TRIGGER predictions_count
AFTER INSERT OR DELETE OR UPDATE OF model_version, true_label, digit ON predictions
FOR EACH ROW EXECUTE FUNCTION prediction_counts_track();

CREATE TRIGGER predictions_count_reset
AFTER TRUNCATE ON predictions
FOR EACH STATEMENT EXECUTE FUNCTION prediction_counts_reset();

INSERT INTO prediction_counts (model_version, true_label, digit, slot, n)
SELECT model_version, coalesce(true_label, -1), digit, 0, count(*)
FROM predictions
GROUP BY 1, 2, 3;

-- The statistics no longer scan predictions.
DROP INDEX predictions_stats_idx;

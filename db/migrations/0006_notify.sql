-- Every replica of the UI learns that another one changed the predictions (db/notify.py LISTENs).
--
-- One notification per statement, not per row: a batch of 100 inserts is one. PostgreSQL sends
-- it at commit (never for a rolled-back change) and folds identical notifications of one
-- transaction into one. The payload is the writer's application_name, so that a replica can
-- skip what its own connections wrote (it knows of those already); listeners treat any other
-- payload as a change. A statement that changed no row (an update of an unknown id, a replayed
-- key) still notifies: a spare refresh, cheaper than a transition table on every write.
CREATE FUNCTION predictions_notify() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    PERFORM pg_notify('predictions_changed', coalesce(current_setting('application_name', true), ''));
    RETURN NULL;
END
$$;

CREATE TRIGGER predictions_notify
AFTER INSERT OR UPDATE OR DELETE OR TRUNCATE ON predictions
FOR EACH STATEMENT EXECUTE FUNCTION predictions_notify();

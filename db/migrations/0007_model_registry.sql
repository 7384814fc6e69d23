-- The learning loop: every model version the app has served or could serve, every training run,
-- and the operator's exclusion of a drawing from training (db/registry.py reads and writes them).
--
-- The registry is the source of truth for which version is live: after a restart of TorchServe
-- the live version is registered again from here. At most one version is live (a partial unique
-- index), so a promotion is one transaction that demotes the old live version first.

CREATE TABLE training_runs (
    id          bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    status      text NOT NULL DEFAULT 'queued'
                CONSTRAINT training_runs_status_valid
                CHECK (status IN ('queued', 'running', 'succeeded', 'failed', 'cancelled')),
    progress    real NOT NULL DEFAULT 0 CONSTRAINT training_runs_progress_range CHECK (progress BETWEEN 0 AND 1),
    message     text NOT NULL DEFAULT '',
    options     jsonb NOT NULL DEFAULT '{}' CONSTRAINT training_runs_options_object CHECK (jsonb_typeof(options) = 'object'),
    -- One object per epoch or step: {"epoch": 1, "loss": 0.12, "accuracy": 0.98, ...}.
    history     jsonb NOT NULL DEFAULT '[]' CONSTRAINT training_runs_history_array CHECK (jsonb_typeof(history) = 'array'),
    created_at  timestamptz NOT NULL DEFAULT now(),
    started_at  timestamptz,
    finished_at timestamptz,
    version     text,  -- the version the run produced (model_versions.run_id points back)
    promoted    boolean NOT NULL DEFAULT false,
    job_id      bigint,  -- the queue's job (procrastinate_jobs.id; no foreign key: the queue is its own schema)
    CONSTRAINT training_runs_finished CHECK (
        (status IN ('succeeded', 'failed', 'cancelled')) = (finished_at IS NOT NULL)
    )
);

-- The runs page reads the newest runs; the worker's start-up check reads the unfinished ones.
CREATE INDEX training_runs_unfinished_idx ON training_runs (id) WHERE status IN ('queued', 'running');
CREATE INDEX training_runs_job_idx ON training_runs (job_id) WHERE job_id IS NOT NULL;

CREATE TABLE model_versions (
    -- A path segment of TorchServe's URLs and part of a file name (db/records.py VERSION).
    version         text PRIMARY KEY
                    CONSTRAINT model_versions_version_valid CHECK (version ~ '^[0-9A-Za-z][0-9A-Za-z._-]{0,99}$'),
    -- A file name in the archive folder (Settings.archive_dir), never a path.
    archive_file    text NOT NULL
                    CONSTRAINT model_versions_archive_file_valid CHECK (archive_file ~ '^[0-9A-Za-z][0-9A-Za-z._-]{0,199}$'),
    archive_sha256  text NOT NULL CONSTRAINT model_versions_archive_sha256_hex CHECK (archive_sha256 ~ '^[0-9a-f]{64}$'),
    parent_version  text REFERENCES model_versions (version),
    created_at      timestamptz NOT NULL DEFAULT now(),
    -- Which feedback trained it: how many drawings, and the highest prediction id among them.
    feedback_count  integer NOT NULL DEFAULT 0 CONSTRAINT model_versions_feedback_count_nonnegative CHECK (feedback_count >= 0),
    feedback_max_id bigint,
    evaluation      jsonb NOT NULL DEFAULT '{}'
                    CONSTRAINT model_versions_evaluation_object CHECK (jsonb_typeof(evaluation) = 'object'),
    state           text NOT NULL
                    CONSTRAINT model_versions_state_valid CHECK (state IN ('candidate', 'live', 'retired', 'failed')),
    reason          text NOT NULL DEFAULT '',
    promoted_at     timestamptz,
    run_id          bigint REFERENCES training_runs (id)
);

CREATE UNIQUE INDEX model_versions_one_live ON model_versions ((true)) WHERE state = 'live';
CREATE INDEX model_versions_created_at_idx ON model_versions (created_at DESC);

-- The operator excluded this drawing from training (a defence against poisoned labels). A
-- constant default rewrites nothing.
ALTER TABLE predictions ADD COLUMN excluded boolean NOT NULL DEFAULT false;

-- The trainer reads the drawings labelled with a digit and not excluded, by id.
CREATE INDEX predictions_feedback_idx ON predictions (id) WHERE true_label IS NOT NULL AND NOT excluded;

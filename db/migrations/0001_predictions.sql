-- Every prediction the app makes, the drawing it was made on, and the true label a person gave.
CREATE TABLE predictions (
    id            bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    created_at    timestamptz NOT NULL DEFAULT now(),
    digit         smallint NOT NULL CONSTRAINT predictions_digit_range CHECK (digit BETWEEN 0 AND 9),
    confidence    double precision NOT NULL
                  CONSTRAINT predictions_confidence_range CHECK (confidence >= 0 AND confidence <= 1),
    probabilities double precision[] NOT NULL
                  CONSTRAINT predictions_probabilities_shape CHECK (
                      array_ndims(probabilities) = 1
                      AND cardinality(probabilities) = 10
                      AND array_position(probabilities, NULL) IS NULL
                      AND 0 <= ALL (probabilities) AND 1 >= ALL (probabilities)
                  ),
    model_name    text NOT NULL CONSTRAINT predictions_model_name_length CHECK (length(model_name) BETWEEN 1 AND 200),
    model_version text NOT NULL
                  CONSTRAINT predictions_model_version_length CHECK (length(model_version) BETWEEN 1 AND 200),
    latency_ms    double precision NOT NULL CONSTRAINT predictions_latency_nonnegative CHECK (latency_ms >= 0),
    -- The drawing as the person made it: a PNG of at most 2,000,000 bytes.
    image_png     bytea NOT NULL CONSTRAINT predictions_image_png_valid CHECK (
                      octet_length(image_png) BETWEEN 8 AND 2000000
                      AND substring(image_png FROM 1 FOR 8) = '\x89504e470d0a1a0a'::bytea
                  ),
    -- What the model saw: 28x28 uint8 pixels, row-major, MNIST-style (white ink on black).
    input_pixels  bytea NOT NULL CONSTRAINT predictions_input_pixels_size CHECK (octet_length(input_pixels) = 784),
    true_label    smallint CONSTRAINT predictions_true_label_range CHECK (true_label BETWEEN 0 AND 9),
    labelled_at   timestamptz,
    CONSTRAINT predictions_label_time CHECK ((true_label IS NULL) = (labelled_at IS NULL))
);

-- The history is read newest first by id (the primary key); this one serves time ranges.
CREATE INDEX predictions_created_at_idx ON predictions (created_at DESC);

-- Statistics group by version, true label and predicted digit: an index-only scan, no blobs read.
CREATE INDEX predictions_stats_idx ON predictions (model_version, true_label, digit);

-- Move the drawings out of `predictions` into their own table, so that the history and the
-- statistics scan a narrow table (about 150 bytes a row) whatever the state of its visibility map.
CREATE TABLE prediction_images (
    prediction_id bigint PRIMARY KEY REFERENCES predictions (id) ON DELETE CASCADE,
    -- The drawing as the person made it: a PNG of at most 2,000,000 bytes.
    image_png     bytea NOT NULL CONSTRAINT prediction_images_png_valid CHECK (
                      octet_length(image_png) BETWEEN 8 AND 2000000
                      AND substring(image_png FROM 1 FOR 8) = '\x89504e470d0a1a0a'::bytea
                  ),
    -- What the model saw: 28x28 uint8 pixels, row-major, MNIST-style (white ink on black).
    input_pixels  bytea NOT NULL
                  CONSTRAINT prediction_images_input_pixels_size CHECK (octet_length(input_pixels) = 784)
);

INSERT INTO prediction_images (prediction_id, image_png, input_pixels)
SELECT id, image_png, input_pixels FROM predictions;

ALTER TABLE predictions DROP COLUMN image_png, DROP COLUMN input_pixels;

-- Vacuum soon after inserts and label updates: keeps index-only scans for the statistics.
ALTER TABLE predictions SET (autovacuum_vacuum_insert_scale_factor = 0.02, autovacuum_vacuum_scale_factor = 0.05);

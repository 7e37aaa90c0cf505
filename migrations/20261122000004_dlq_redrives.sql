-- Dead letters re-published by `authsync dlq redrive`: a second run skips them.
CREATE TABLE dlq_redrives (
    dlq_topic     text NOT NULL,
    dlq_partition integer NOT NULL,
    dlq_offset    bigint NOT NULL,
    target_topic  text NOT NULL,
    error_class   text NOT NULL,
    redriven_at   timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (dlq_topic, dlq_partition, dlq_offset)
);

-- fedrec store, schema version 2: each replica's share of a round.
--
-- A replica folds its own devices' updates for a round into one weighted
-- sum (under secure aggregation: the unmasked sum of its sub-cohort) and
-- commits it here once, when its share closes; the leader combines the
-- shares of the round into the round's mean. Keyed by the model version
-- too, so a share computed on a version the leader has since replaced is
-- never mixed into another version's round.
CREATE TABLE partial_sum (
    task          text NOT NULL REFERENCES task (name) ON DELETE CASCADE,
    round         bigint NOT NULL CHECK (round > 0),
    model_version bigint NOT NULL CHECK (model_version >= 0),
    replica       text NOT NULL,
    -- Sum of weight × update, little-endian f32 (model values, then what
    -- the server step asks for after them).
    weighted_sum  bytea NOT NULL,
    weight        double precision NOT NULL CHECK (weight >= 0),
    accepted      bigint NOT NULL CHECK (accepted >= 0),
    -- fedrec_proto::EvalCounts as JSON: the devices' summed counts.
    evaluation    jsonb NOT NULL,
    created       timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (task, round, model_version, replica)
);

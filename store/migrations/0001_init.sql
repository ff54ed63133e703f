-- fedrec store, schema version 1: tasks, model versions, round summaries,
-- privacy state, run counters and device sessions.
--
-- Applied in one transaction by fedrec_store::migrate, which records it in
-- schema_version. Never edit a migration once released: add the next one.

-- One row per federated task. `current_version` is the head: the model
-- version every replica serves, moved only by a transaction that names the
-- version it replaces (UPDATE ... WHERE current_version IS NOT DISTINCT FROM
-- the expected one), which makes each round's commit apply exactly once.
CREATE TABLE task (
    name            text PRIMARY KEY,
    -- The model's tensors in order: [{"name": "item_factors", "shape": [100, 32]}, ...]
    layout          jsonb NOT NULL,
    -- The shape check: f32 values in a model of this layout.
    num_values      bigint NOT NULL CHECK (num_values >= 0),
    -- NULL until the first model version is written.
    current_version bigint CHECK (current_version >= 0),
    created         timestamptz NOT NULL DEFAULT now()
);

-- Every model version a task has had, params as little-endian f32 (the wire
-- encoding of fedrec_proto::tensor), the server optimizer's moments beside
-- them (empty without a server optimizer).
CREATE TABLE model_version (
    task        text NOT NULL REFERENCES task (name) ON DELETE CASCADE,
    version     bigint NOT NULL CHECK (version >= 0),
    params      bytea NOT NULL,
    optimizer_m bytea NOT NULL DEFAULT '',
    optimizer_v bytea NOT NULL DEFAULT '',
    created     timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (task, version)
);

-- The history of ended rounds, in the order they ended (`seq` from 1); the
-- summary is fedrec_coordinator::history::RoundSummary as JSON.
CREATE TABLE round_summary (
    task          text NOT NULL REFERENCES task (name) ON DELETE CASCADE,
    seq           bigint NOT NULL CHECK (seq > 0),
    round         bigint NOT NULL,
    model_version bigint NOT NULL,
    summary       jsonb NOT NULL,
    created       timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (task, seq)
);
CREATE INDEX round_summary_round ON round_summary (task, round);

-- The privacy accountant's state (fedrec_coordinator::checkpoint::PrivacyState
-- as JSON: the mechanism ledger and the clipping bound), as of model_version.
CREATE TABLE privacy_state (
    task          text PRIMARY KEY REFERENCES task (name) ON DELETE CASCADE,
    model_version bigint NOT NULL,
    state         jsonb NOT NULL,
    updated       timestamptz NOT NULL DEFAULT now()
);

-- The round counters of a checkpoint (last_round, run_start, training_rounds,
-- final_evaluation_done, training_stopped) as JSON, as of model_version.
CREATE TABLE run_state (
    task          text PRIMARY KEY REFERENCES task (name) ON DELETE CASCADE,
    model_version bigint NOT NULL,
    state         jsonb NOT NULL,
    updated       timestamptz NOT NULL DEFAULT now()
);

-- Joined devices: a pseudonym (hex) is the device's session credential, so
-- any replica can serve it. `expires` NULL: no expiry recorded (imported from
-- a checkpoint, which keeps none); the serving replica sets it. `token` is
-- the SHA-256 digest (hex) of the enrollment token the device joined with
-- (NULL without [auth] or when imported), to count a token's live sessions.
CREATE TABLE session (
    task      text NOT NULL REFERENCES task (name) ON DELETE CASCADE,
    pseudonym text NOT NULL,
    token     text,
    expires   timestamptz,
    created   timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (task, pseudonym)
);
CREATE INDEX session_expires ON session (expires);
CREATE INDEX session_token ON session (task, token);

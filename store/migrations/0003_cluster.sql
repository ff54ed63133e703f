-- fedrec store, schema version 3: the replicated coordinator's round orders
-- and replica heartbeats.
--
-- Applied in one transaction by fedrec_store::migrate, which records it in
-- schema_version. Never edit a migration once released: add the next one.

-- The leader opens a round by writing its order: which replicas select how
-- many of their waiting devices, on which model version, until when. One
-- order per round: the primary key (and the leader's checks against the
-- task's head and run_state's last round) keep two leaders from opening the
-- same round twice. The order is open while its round is greater than
-- run_state's last_round; ending the round (one transaction) closes it.
CREATE TABLE round_order (
    task          text NOT NULL REFERENCES task (name) ON DELETE CASCADE,
    round         bigint NOT NULL CHECK (round > 0),
    model_version bigint NOT NULL CHECK (model_version >= 0),
    kind          text NOT NULL CHECK (kind IN ('train', 'evaluate')),
    deadline      timestamptz NOT NULL,
    -- {"replica-a": {"take": 5, "needed": 4}, ...}: per replica, devices to
    -- select and updates its share needs.
    shares        jsonb NOT NULL,
    created       timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (task, round)
);

-- Each replica's heartbeat: where it serves (url), how many devices wait
-- to be selected and how many have joined, as of `seen` (the database's
-- clock, so replicas' clocks need not agree). The leader sizes round
-- orders from the replicas seen recently.
CREATE TABLE replica (
    task    text NOT NULL REFERENCES task (name) ON DELETE CASCADE,
    name    text NOT NULL,
    url     text NOT NULL,
    waiting bigint NOT NULL CHECK (waiting >= 0),
    joined  bigint NOT NULL CHECK (joined >= 0),
    seen    timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (task, name)
);

-- The task's catalogue: SHA-256 of its item ids in model order, one a line,
-- recorded by the first replica; a replica with another is refused (the
-- same shape over other items would mix two models' rows).
ALTER TABLE task ADD COLUMN catalogue bytea;

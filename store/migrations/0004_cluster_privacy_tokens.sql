-- fedrec store, schema version 4: differential privacy across replicas, and
-- enrollment tokens' session limits across replicas.
--
-- Applied in one transaction by fedrec_store::migrate, which records it in
-- schema_version. Never edit a migration once released: add the next one.

-- A training round under differential privacy carries its privacy in its
-- order (fedrec_coordinator::privacy::RoundPrivacy as JSON: the sampling
-- rate q every replica samples its waiting devices with, the clipping bound
-- and noise the devices apply, the noise the leader adds to the combined
-- sum, and the ε the round brings the task to). NULL without it. The
-- accountant counts the round when the order is written, in the same
-- transaction (privacy_state), so a round whose leader dies stays counted.
ALTER TABLE round_order ADD COLUMN privacy jsonb;

-- Under adaptive clipping, each share's count of updates within the
-- clipping bound (noisy in distributed mode), which the leader sums to move
-- the bound.
ALTER TABLE partial_sum ADD COLUMN within_clip double precision NOT NULL DEFAULT 0;

-- The devices each share selected: under differential privacy the replica
-- draws them itself (Poisson sampling), so the order cannot say.
ALTER TABLE partial_sum ADD COLUMN selected bigint NOT NULL DEFAULT 0 CHECK (selected >= 0);

-- A session ended by a newer join with the same enrollment token
-- (auth.max_sessions_per_token, counted across every replica): when.
-- Replicas poll the recent ones to end those they hold.
ALTER TABLE session ADD COLUMN replaced timestamptz;
CREATE INDEX session_replaced ON session (task, replaced) WHERE replaced IS NOT NULL;

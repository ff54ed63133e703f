#!/usr/bin/env python3
"""Implicit-ALS peer for fedrec: a tuned `implicit` ALS model evaluated on the
exact leave-one-out split, candidates and metrics fedrec reports.

What it does
    Reads a split written by `fedrec split --data PATH --out DIR`
    (DIR/train.tsv, DIR/test.tsv, DIR/meta.json), trains implicit's CPU
    AlternatingLeastSquares on the binary user x item training matrix for every
    setting of a grid (factors x regularization x alpha, 15 iterations, then
    the best few again with 30 iterations), and evaluates each setting as
    fedrec's `eval::evaluate` does:
      * full ranking: 0-based rank of the held-out item among every item the
        user did not train on, plus the held-out item itself (which competes
        even if it is also a training item, i.e. a repeat purchase);
      * 100 candidates: the same rank among the held-out item and the sampled
        candidates listed in test.tsv;
      * rank = items with a strictly higher score + items with an equal score
        and a smaller index; HR@10 = [rank < 10]; NDCG@10 = 1/log2(rank + 2)
        if rank < 10 else 0; both averaged over the users in test.tsv;
      * coverage@10: fraction of all meta["items"] items that appear in at
        least one test user's top 10 (training items excluded, ties by the
        smaller index).
    A popularity row (items scored by training count) is printed first as a
    check: it must equal fedrec's own "popularity" row for the same split.
    The JSON rows also hold the full-ranking HR/NDCG over users whose held-out
    item is new to them (*_new) and over repeat purchases (*_repeat): a repeat
    purchase competes only with items the user never had, so a model that
    reproduces the training matrix ranks it near the top (on Online Retail,
    about 30% of held-out items are repeats).

    Confidence: implicit 0.7.3 multiplies the matrix by `alpha` inside fit()
    (skipped when alpha == 1) and its solver uses the stored value itself as
    the confidence c_ui of an observed pair (unobserved pairs: c = 1, p = 0),
    so c_ui = alpha for every training pair here, NOT 1 + alpha. alpha = 1
    therefore weighs observed and unobserved pairs equally.

    Caveat: the grid is tuned on the test split itself (there is no separate
    validation split), which favours this peer.

Install (outside the repository)
    python3 -m venv /tmp/peer-venv
    /tmp/peer-venv/bin/pip install implicit numpy scipy   # implicit 0.7.3

Run
    fedrec split --data PATH --out /tmp/split-ml100k
    OPENBLAS_NUM_THREADS=1 /tmp/peer-venv/bin/python scripts/implicit_peer.py \\
        --split /tmp/split-ml100k --out /tmp/peer-ml100k.json
    (--quick: a 3x3x3 subset; --refine-top 0: no 30-iteration reruns;
     --self-test: check the rank / tie / coverage rules on hand-computed cases.)

Output: a header, one line per setting (factors, reg, alpha, iterations,
HR@10 and NDCG@10 full, HR@10 and NDCG@10 among 100 candidates, coverage@10,
seconds), and on the last line a JSON object
{"best_by_ndcg": {...}, "best_by_hr": {...}} (best by full-ranking metric).
"""

import os

# implicit warns (and is slower) if OpenBLAS runs its own threads; must be set
# before numpy is imported.
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")

import argparse  # noqa: E402
import itertools  # noqa: E402
import json  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402

import numpy as np  # noqa: E402
import scipy.sparse as sp  # noqa: E402

K = 10

FULL_GRID = {
    "factors": [16, 32, 64, 128],
    "regularization": [0.001, 0.01, 0.1, 1.0],
    "alpha": [1.0, 5.0, 10.0, 20.0, 40.0],
}
QUICK_GRID = {
    "factors": [32, 64, 128],
    "regularization": [0.01, 0.1, 1.0],
    "alpha": [1.0, 10.0, 40.0],
}


# --------------------------------------------------------------------------
# Split loading


class Split:
    """A fedrec split: the training matrix and the evaluated users."""

    def __init__(self, n_users, n_items, train, users, targets, cands, meta):
        self.n_users = n_users
        self.n_items = n_items
        self.train = train  # csr_matrix (n_users x n_items), float32 ones
        self.users = users  # int64 array: evaluated users, in file order
        self.targets = targets  # int64 array: their held-out items
        self.cands = cands  # int64 (n_test x width), padded with -1
        self.meta = meta
        # Whether each held-out item is also a training item (a repeat purchase).
        self.repeat = np.array(
            [t in train.indices[train.indptr[u] : train.indptr[u + 1]]
             for u, t in zip(users, targets)],
            dtype=bool,
        )


def load_split(path):
    with open(os.path.join(path, "meta.json"), encoding="utf-8") as f:
        meta = json.load(f)
    n_users, n_items = int(meta["users"]), int(meta["items"])

    pairs = np.loadtxt(
        os.path.join(path, "train.tsv"), dtype=np.int64, delimiter="\t", ndmin=2
    )
    if pairs.size == 0:
        pairs = np.zeros((0, 2), dtype=np.int64)
    rows, cols = pairs[:, 0], pairs[:, 1]
    if rows.size and (rows.min() < 0 or rows.max() >= n_users):
        raise SystemExit(f"{path}/train.tsv: user index outside 0..{n_users}")
    if cols.size and (cols.min() < 0 or cols.max() >= n_items):
        raise SystemExit(f"{path}/train.tsv: item index outside 0..{n_items}")
    train = sp.csr_matrix(
        (np.ones(len(rows), dtype=np.float32), (rows, cols)),
        shape=(n_users, n_items),
        dtype=np.float32,
    )
    if train.nnz != len(rows):
        raise SystemExit(f"{path}/train.tsv: duplicate user-item pairs")
    train.sort_indices()

    users, targets, cand_lists = [], [], []
    with open(os.path.join(path, "test.tsv"), encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            line = line.rstrip("\n")
            if not line:
                continue
            fields = line.split("\t")
            if len(fields) not in (2, 3):
                raise SystemExit(f"{path}/test.tsv:{lineno}: expected 3 fields")
            users.append(int(fields[0]))
            targets.append(int(fields[1]))
            cs = fields[2] if len(fields) == 3 else ""
            cand_lists.append([int(c) for c in cs.split(",") if c != ""])
    width = max((len(c) for c in cand_lists), default=0)
    cands = np.full((len(cand_lists), width), -1, dtype=np.int64)
    for i, c in enumerate(cand_lists):
        cands[i, : len(c)] = c
    users = np.asarray(users, dtype=np.int64)
    targets = np.asarray(targets, dtype=np.int64)
    for name, arr, n in (("user", users, n_users), ("item", targets, n_items)):
        if arr.size and (arr.min() < 0 or arr.max() >= n):
            raise SystemExit(f"{path}/test.tsv: {name} index outside 0..{n}")
    if cands.size and cands.max() >= n_items:
        raise SystemExit(f"{path}/test.tsv: candidate index outside 0..{n_items}")
    return Split(n_users, n_items, train, users, targets, cands, meta)


# --------------------------------------------------------------------------
# Evaluation (mirrors fedrec_client::metrics and fedrec::eval::evaluate)


def ndcg_of_rank(rank):
    rank = np.asarray(rank)
    return np.where(rank < K, 1.0 / np.log2(rank + 2.0), 0.0)


def top_k_mask(masked, k=K):
    """Boolean mask of each row's top k finite entries; ties by smaller index.

    `masked` has -inf at excluded (training) items."""
    n = masked.shape[1]
    finite = np.isfinite(masked)
    if n <= k:
        return finite
    kth = -np.partition(-masked, k - 1, axis=1)[:, k - 1]  # k-th largest
    above = (masked > kth[:, None]) & finite
    need = k - above.sum(axis=1)
    equal = (masked == kth[:, None]) & finite
    # Among items tied with the k-th score, the smallest indices fill the list.
    take = equal & (np.cumsum(equal, axis=1) <= need[:, None])
    return above | take


def evaluate(split, score_batch, batch=512):
    """Metrics of a scorer. `score_batch(users)` returns a float array of
    scores (len(users) x n_items)."""
    n_test = len(split.users)
    full_rank = np.empty(n_test, dtype=np.int64)
    samp_rank = np.empty(n_test, dtype=np.int64)
    covered = np.zeros(split.n_items, dtype=bool)
    idx = np.arange(split.n_items)
    for lo in range(0, n_test, batch):
        hi = min(lo + batch, n_test)
        u = split.users[lo:hi]
        t = split.targets[lo:hi]
        b = np.arange(hi - lo)
        scores = np.asarray(score_batch(u), dtype=np.float64)
        ts = scores[b, t]

        # Full ranking: training items do not compete; the target always does
        # (its own entry never counts as ahead of itself).
        masked = scores.copy()
        sub = split.train[u]
        r, c = sub.nonzero()
        masked[r, c] = -np.inf
        ahead = (masked > ts[:, None]) | (
            (masked == ts[:, None]) & (idx[None, :] < t[:, None])
        )
        full_rank[lo:hi] = ahead.sum(axis=1)

        # 100 candidates: the target and the listed candidates.
        cand = split.cands[lo:hi]
        valid = cand >= 0
        cs = scores[b[:, None], np.where(valid, cand, 0)]
        ahead = valid & (
            (cs > ts[:, None]) | ((cs == ts[:, None]) & (cand < t[:, None]))
        )
        samp_rank[lo:hi] = ahead.sum(axis=1)

        covered |= top_k_mask(masked).any(axis=0)

    def mean(x):
        return float(np.mean(x)) if len(x) else 0.0

    rep = split.repeat
    return {
        "hr_full": mean(full_rank < K),
        "ndcg_full": mean(ndcg_of_rank(full_rank)),
        "hr_100": mean(samp_rank < K),
        "ndcg_100": mean(ndcg_of_rank(samp_rank)),
        "coverage": float(covered.sum()) / max(split.n_items, 1),
        "users": int(n_test),
        # The full-ranking metrics over users whose held-out item is new to
        # them, and over repeat purchases (which only compete with items the
        # user never trained on, so memorizing training favours them).
        "users_repeat": int(rep.sum()),
        "hr_full_new": mean(full_rank[~rep] < K),
        "ndcg_full_new": mean(ndcg_of_rank(full_rank[~rep])),
        "hr_full_repeat": mean(full_rank[rep] < K),
        "ndcg_full_repeat": mean(ndcg_of_rank(full_rank[rep])),
    }


def popularity_scorer(split):
    pop = np.asarray(split.train.sum(axis=0)).ravel().astype(np.float64)
    return lambda users: np.broadcast_to(pop, (len(users), split.n_items))


# --------------------------------------------------------------------------
# implicit ALS


def fit_als(split, factors, reg, alpha, iterations, seed, threads):
    from implicit.cpu.als import AlternatingLeastSquares

    model = AlternatingLeastSquares(
        factors=factors,
        regularization=reg,
        alpha=alpha,  # implicit 0.7.3: confidence of an observed pair = alpha * 1
        iterations=iterations,
        random_state=seed,
        num_threads=threads,
    )
    model.fit(split.train, show_progress=False)
    uf = np.asarray(model.user_factors, dtype=np.float64)
    itf = np.asarray(model.item_factors, dtype=np.float64)
    return lambda users: uf[users] @ itf.T


def run_setting(split, factors, reg, alpha, iterations, seed, threads):
    start = time.perf_counter()
    scorer = fit_als(split, factors, reg, alpha, iterations, seed, threads)
    metrics = evaluate(split, scorer)
    row = {
        "factors": factors,
        "regularization": reg,
        "alpha": alpha,
        "iterations": iterations,
        "random_state": seed,
    }
    row.update(metrics)
    row["seconds"] = round(time.perf_counter() - start, 3)
    return row


HEADER = (
    f"{'factors':>7} {'reg':>6} {'alpha':>6} {'iters':>5} "
    f"{'HR@10':>7} {'NDCG@10':>8} {'HR@10(100)':>10} {'NDCG@10(100)':>12} "
    f"{'cov@10':>7} {'seconds':>7}"
)


def fmt_row(row):
    return (
        f"{row['factors']:>7} {row['regularization']:>6g} {row['alpha']:>6g} "
        f"{row['iterations']:>5} {row['hr_full']:>7.4f} {row['ndcg_full']:>8.4f} "
        f"{row['hr_100']:>10.4f} {row['ndcg_100']:>12.4f} {row['coverage']:>7.3f} "
        f"{row['seconds']:>7.2f}"
    )


# --------------------------------------------------------------------------
# Self-test: hand-computed cases, the same as client/src/metrics.rs's tests.


def self_test():
    import tempfile

    def split_of(n_items, train_rows, tests):
        """tests: list of (user, target, candidates)."""
        n_users = len(train_rows)
        rows = [u for u, items in enumerate(train_rows) for _ in items]
        cols = [i for items in train_rows for i in items]
        train = sp.csr_matrix(
            (np.ones(len(rows), dtype=np.float32), (rows, cols)),
            shape=(n_users, n_items),
        )
        width = max((len(c) for _, _, c in tests), default=0)
        cands = np.full((len(tests), width), -1, dtype=np.int64)
        for i, (_, _, c) in enumerate(tests):
            cands[i, : len(c)] = c
        return Split(
            n_users,
            n_items,
            train,
            np.array([u for u, _, _ in tests], dtype=np.int64),
            np.array([t for _, t, _ in tests], dtype=np.int64),
            cands,
            {},
        )

    def ranks(split, scores):
        # Recover per-user ranks from single-user evaluations.
        out = []
        for i in range(len(split.users)):
            s = Split(
                split.n_users,
                split.n_items,
                split.train,
                split.users[i : i + 1],
                split.targets[i : i + 1],
                split.cands[i : i + 1],
                {},
            )
            m = evaluate(s, lambda u: np.asarray(scores, dtype=np.float64)[None, :])
            out.append(m)
        return out

    def rank_from(m, key):
        # hr/ndcg of a single user identify a rank < 10 exactly.
        if m["hr_" + key] == 0.0:
            return ">=10"
        return int(round(2 ** (1.0 / m["ndcg_" + key]) - 2))

    five = [5.0, 4.0, 3.0, 2.0, 1.0]
    # full_rank(scores, [], 3) == 3; with train {0, 1}: 1; repeat purchase of 1: 0
    assert rank_from(ranks(split_of(5, [[]], [(0, 3, [])]), five)[0], "full") == 3
    assert rank_from(ranks(split_of(5, [[0, 1]], [(0, 3, [])]), five)[0], "full") == 1
    assert rank_from(ranks(split_of(5, [[0, 1]], [(0, 1, [])]), five)[0], "full") == 0
    # ties broken by index: full_rank([1, 1, 1], [], 1) == 1
    assert rank_from(ranks(split_of(3, [[]], [(0, 1, [])]), [1.0] * 3)[0], "full") == 1
    # tie with a larger index does not count: target 0 of [1, 1, 1] ranks 0
    assert rank_from(ranks(split_of(3, [[]], [(0, 0, [])]), [1.0] * 3)[0], "full") == 0
    # sampled: only listed candidates compete, ties by index
    s = split_of(6, [[0]], [(0, 3, [5, 2, 4])])
    m = ranks(s, [9.0, 1.0, 2.0, 2.0, 2.0, 3.0])[0]
    assert rank_from(m, "100") == 2, m  # 5 (higher) and 2 (tie, smaller index)
    assert rank_from(m, "full") == 2, m  # item 0 is in train; 4 ties but is larger
    # a rank of 10 is a miss
    scores = [float(20 - i) for i in range(20)]
    m = ranks(split_of(20, [[]], [(0, 10, [])]), scores)[0]
    assert m["hr_full"] == 0.0 and m["ndcg_full"] == 0.0
    m = ranks(split_of(20, [[]], [(0, 9, [])]), scores)[0]
    assert abs(m["ndcg_full"] - 1.0 / np.log2(11.0)) < 1e-12
    # top_k: [0.1, .9, .5, .9, 0] -> {1, 3, 2}; exclude 1 -> {3, 2} (k = 2)
    sc = np.array([[0.1, 0.9, 0.5, 0.9, 0.0]])
    assert list(np.flatnonzero(top_k_mask(sc, 3)[0])) == [1, 2, 3]
    ex = sc.copy()
    ex[0, 1] = -np.inf
    assert list(np.flatnonzero(top_k_mask(ex, 2)[0])) == [2, 3]
    # ties at the cut-off go to the smaller indices; excluded items never enter
    sc = np.array([[1.0, 2.0, 2.0, 2.0, -np.inf, 2.0]])
    assert list(np.flatnonzero(top_k_mask(sc, 2)[0])) == [1, 2]
    assert list(np.flatnonzero(top_k_mask(sc, 10)[0])) == [0, 1, 2, 3, 5]
    # coverage over two users, 12 items, everyone scores items by index
    tr = [[0], [1, 2]]
    s = split_of(12, tr, [(0, 5, []), (1, 5, [])])
    m = evaluate(s, lambda u: np.tile(-np.arange(12.0), (len(u), 1)))
    # user 0's top 10: 1..10; user 1's: 0, 3..11  -> all 12 items
    assert m["coverage"] == 1.0, m
    # file round trip through load_split
    with tempfile.TemporaryDirectory() as d:
        with open(os.path.join(d, "train.tsv"), "w") as f:
            f.write("0\t1\n0\t2\n1\t0\n")
        with open(os.path.join(d, "test.tsv"), "w") as f:
            f.write("0\t2\t3,0\n1\t3\t1,2,4\n")
        with open(os.path.join(d, "meta.json"), "w") as f:
            f.write('{"users": 2, "items": 5, "data": "t", "seed": 1}')
        s = load_split(d)
        assert s.train.toarray().tolist() == [[0, 1, 1, 0, 0], [1, 0, 0, 0, 0]]
        assert s.users.tolist() == [0, 1] and s.targets.tolist() == [2, 3]
        assert s.cands.tolist() == [[3, 0, -1], [1, 2, 4]]
        # scores by -index: user 0 (train 1, 2; target 2, a repeat) -> full
        # competitors 0 (ahead), 3, 4: rank 1; candidates 3, 0: rank 1.
        m = ranks(s, [-float(i) for i in range(5)])
        assert rank_from(m[0], "full") == 1 and rank_from(m[0], "100") == 1
        assert rank_from(m[1], "full") == 2 and rank_from(m[1], "100") == 2
        assert s.repeat.tolist() == [True, False]
        m = evaluate(s, lambda u: np.tile(-np.arange(5.0), (len(u), 1)))
        assert m["users_repeat"] == 1
        assert abs(m["ndcg_full_repeat"] - 1 / np.log2(3)) < 1e-12
        assert abs(m["ndcg_full_new"] - 0.5) < 1e-12
        assert abs(m["ndcg_full"] - (1 / np.log2(3) + 0.5) / 2) < 1e-12
    print("self-test passed")


# --------------------------------------------------------------------------


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--split", help="directory written by `fedrec split`")
    ap.add_argument("--quick", action="store_true", help="a 3x3x3 subset of the grid")
    ap.add_argument("--out", help="write every row (and the best) as JSON here")
    ap.add_argument("--iterations", type=int, default=15)
    ap.add_argument(
        "--refine-top",
        type=int,
        default=3,
        help="rerun the N best settings (by full NDCG@10) with --refine-iterations",
    )
    ap.add_argument("--refine-iterations", type=int, default=30)
    ap.add_argument("--seed", type=int, default=0, help="implicit's random_state")
    ap.add_argument(
        "--threads", type=int, default=0, help="implicit's num_threads (0: all cores)"
    )
    ap.add_argument("--self-test", action="store_true")
    args = ap.parse_args()

    if args.self_test:
        self_test()
        if not args.split:
            return
    if not args.split:
        ap.error("--split DIR is required")

    import implicit

    wall = time.perf_counter()
    split = load_split(args.split)
    meta = split.meta
    print(
        f"split {args.split}: data {meta.get('data')!r}, seed {meta.get('seed')}, "
        f"{split.n_users} users ({len(split.users)} evaluated), {split.n_items} items, "
        f"{split.train.nnz} training pairs, {int(split.repeat.sum())} held-out "
        f"items that are repeat purchases; implicit {implicit.__version__}, "
        f"numpy {np.__version__}",
        flush=True,
    )
    pop = evaluate(split, popularity_scorer(split))
    print(
        f"popularity: HR@10 {pop['hr_full']:.4f} NDCG@10 {pop['ndcg_full']:.4f} "
        f"HR@10(100) {pop['hr_100']:.4f} NDCG@10(100) {pop['ndcg_100']:.4f} "
        f"coverage@10 {pop['coverage']:.3f}",
        flush=True,
    )

    grid = QUICK_GRID if args.quick else FULL_GRID
    print(HEADER, flush=True)
    rows = []
    for f, r, a in itertools.product(grid["factors"], grid["regularization"], grid["alpha"]):
        row = run_setting(split, f, r, a, args.iterations, args.seed, args.threads)
        rows.append(row)
        print(fmt_row(row), flush=True)
    if args.refine_top > 0 and args.refine_iterations != args.iterations:
        best = sorted(rows, key=lambda x: -x["ndcg_full"])[: args.refine_top]
        best_hr = sorted(rows, key=lambda x: -x["hr_full"])[: args.refine_top]
        seen = set()
        for b in best + best_hr:
            key = (b["factors"], b["regularization"], b["alpha"])
            if key in seen:
                continue
            seen.add(key)
            row = run_setting(split, *key, args.refine_iterations, args.seed, args.threads)
            rows.append(row)
            print(fmt_row(row), flush=True)

    wall = time.perf_counter() - wall
    # max() keeps the first of equal rows: grid order, then refinements.
    result = {
        "best_by_ndcg": max(rows, key=lambda x: x["ndcg_full"]),
        "best_by_hr": max(rows, key=lambda x: x["hr_full"]),
    }
    print(f"settings {len(rows)}, wall time {wall:.1f}s", flush=True)
    if args.out:
        with open(args.out, "w", encoding="utf-8") as fh:
            json.dump(
                {
                    "split": os.path.abspath(args.split),
                    "meta": meta,
                    "implicit": implicit.__version__,
                    "popularity": pop,
                    "rows": rows,
                    "wall_seconds": round(wall, 1),
                    **result,
                },
                fh,
                indent=1,
            )
    print(json.dumps(result), flush=True)


if __name__ == "__main__":
    sys.exit(main())

#!/usr/bin/env python3
"""Implicit-ALS peer for fedrec: implicit's ALS, at its defaults and tuned on
validation, evaluated on the tracks, candidates and metrics of a fedrec split.

Input
    A directory written by `fedrec split --data PATH --out DIR`: leave-one-out
    in time, per user, in up to three tracks (DIR/meta.json lists those with
    at least one evaluated user):
      discover       the held-out item is new to the user; the user's training
                     items do not compete (exclude_train); also ranked among
                     100 candidates (the held-out item + 99 listed items the
                     user never trained on; sampled);
      buy-again      the held-out item is a re-buy; every item competes;
      next-purchase  the held-out item is the user's latest purchase; every
                     item competes.
    Each track directory holds two cuts: train.tsv + test.tsv (the test cut)
    and valid_train.tsv + valid.tsv (the validation cut: the track's rule
    applied again to the user's events before the test event). train files:
    user<TAB>item<TAB>count[<TAB>last_time], one line per pair; test/valid files:
    user<TAB>item[<TAB>c1,...,c99]. Every setting is chosen on the validation
    cut, never on the test cut.

What it does, for each track present (or asked with --tracks)
    popularity  items scored by their number of training users (ties by the
                smaller index); a check row on the test cut.
    default     implicit.cpu.als.AlternatingLeastSquares with nothing but
                random_state and num_threads passed, i.e. implicit 0.7.3's
                defaults (implicit/cpu/als.py, __init__, lines 63-69):
                factors=100, regularization=0.01, alpha=1.0, iterations=15
                (also the defaults of the implicit.als.AlternatingLeastSquares
                factory, implicit/als.py lines 8-15); trained on train.tsv,
                evaluated on test.tsv.
    grid        every setting of factors {32, 64, 128} x regularization
                {0.01, 0.1, 1} x alpha {1, 5, 20}, 15 iterations (27 settings;
                --quick: factors {32, 64} x regularization {0.01, 1} x alpha
                {1, 20}, 8 settings), trained on valid_train.tsv and evaluated
                on valid.tsv.
    tuned       the grid setting with the best validation NDCG@10 (full
                ranking; ties by validation HR@10, then grid order), trained
                again on train.tsv and evaluated on test.tsv.
    The training matrix is binary (a pair's count is read, checked and not
    used). Every fit uses random_state=--seed (default 0) and --threads
    implicit threads (default 1; 1 and 2 gave bit-identical factors on
    ML-100K); BLAS runs single-threaded (OPENBLAS_NUM_THREADS=1).

    Confidence: implicit 0.7.3 multiplies the matrix by `alpha` inside fit()
    (skipped when alpha == 1; implicit/cpu/als.py lines 132-134) and its
    solver uses the stored value itself as the confidence c_ui of an observed
    pair (unobserved pairs: c = 1, p = 0), so c_ui = alpha for every training
    pair here, NOT 1 + alpha. The default alpha = 1 therefore weighs observed
    and unobserved pairs equally.

Metrics (the same as fedrec's, per row, over the cut's evaluated users)
    * competing items: every item except the user's training items when the
      track has exclude_train, every item otherwise; the held-out item always
      competes (even when it is a training item);
    * rank = competing items with a strictly higher score + competing items
      with an equal score and a smaller index; HR@10 = [rank < 10];
      NDCG@10 = 1/log2(rank + 2) if rank < 10 else 0; both averaged;
    * sampled tracks also: the same rank among the held-out item and its listed
      candidates (hr_100, ndcg_100);
    * coverage@10: fraction of all items in at least one evaluated user's top
      10 (the same competing items; ties by the smaller index).
    Metric dicts: hr_full, ndcg_full, [hr_100, ndcg_100], coverage, users,
    users_target_in_train (held-out items that are training items: re-buys).

Install (outside the repository)
    python3 -m venv /tmp/peer-venv
    /tmp/peer-venv/bin/pip install implicit==0.7.3 numpy scipy

Run
    fedrec split --data PATH --out DIR
    OPENBLAS_NUM_THREADS=1 /tmp/peer-venv/bin/python scripts/implicit_peer.py \\
        --split DIR [--tracks discover,next-purchase] [--quick] [--out FILE.json]
    --self-test: checks the rank / tie / exclusion / coverage rules on
    hand-computed cases, then writes a tiny split and runs the whole CLI on it.

Output: per track a table (popularity and default on test, every grid row on
valid, the tuned setting on valid and test) and, on the last line (and in
--out), one JSON object:
    {"<track>": {"default": {"params": {...}, "test": {...}},
                 "tuned": {"params": {...}, "valid": {...}, "test": {...}},
                 "grid": [{"params": {...}, "valid": {...}, "seconds": s}, ...],
                 "popularity": {...}}}
("tuned" is null and "grid" empty for a track without validation users.)
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
TRACKS = ("discover", "buy-again", "next-purchase")
ITERATIONS = 15

FULL_GRID = {
    "factors": [32, 64, 128],
    "regularization": [0.01, 0.1, 1.0],
    "alpha": [1.0, 5.0, 20.0],
}
QUICK_GRID = {
    "factors": [32, 64],
    "regularization": [0.01, 1.0],
    "alpha": [1.0, 20.0],
}


def grid_settings(grid, iterations=ITERATIONS):
    return [
        {"factors": f, "regularization": r, "alpha": a, "iterations": iterations}
        for f, r, a in itertools.product(
            grid["factors"], grid["regularization"], grid["alpha"]
        )
    ]


# --------------------------------------------------------------------------
# Split loading


class Cut:
    """One cut of a track: a binary training matrix and the evaluated users."""

    def __init__(self, n_items, train, users, targets, cands, exclude, sampled):
        self.n_items = n_items
        self.train = train  # csr_matrix (n_users x n_items), float32 ones
        self.users = users  # int64 array: evaluated users, in file order
        self.targets = targets  # int64 array: their held-out items
        self.cands = cands  # int64 (n_eval x width), padded with -1
        self.exclude = exclude  # training items do not compete
        self.sampled = sampled  # also rank among the listed candidates
        # Whether each held-out item is also one of the user's training items.
        self.target_in_train = np.array(
            [t in train.indices[train.indptr[u] : train.indptr[u + 1]]
             for u, t in zip(users, targets)],
            dtype=bool,
        )


def read_train(path, n_users, n_items):
    """user<TAB>item<TAB>count[<TAB>last_time] -> binary csr_matrix; also
    the pair count (the last purchase time is not used)."""
    if os.path.getsize(path) == 0:
        data = np.zeros((0, 3), dtype=np.int64)
    else:
        data = np.loadtxt(path, dtype=np.int64, delimiter="\t", ndmin=2)
    if data.shape[1] not in (2, 3, 4):
        raise SystemExit(f"{path}: expected user, item, count[, last_time]")
    rows, cols = data[:, 0], data[:, 1]
    if rows.size and (rows.min() < 0 or rows.max() >= n_users):
        raise SystemExit(f"{path}: user index outside 0..{n_users - 1}")
    if cols.size and (cols.min() < 0 or cols.max() >= n_items):
        raise SystemExit(f"{path}: item index outside 0..{n_items - 1}")
    if data.shape[1] >= 3 and data.size and data[:, 2].min() < 1:
        raise SystemExit(f"{path}: a count below 1")
    train = sp.csr_matrix(
        (np.ones(len(rows), dtype=np.float32), (rows, cols)),
        shape=(n_users, n_items),
        dtype=np.float32,
    )
    if train.nnz != len(rows):
        raise SystemExit(f"{path}: duplicate user-item pairs")
    train.sort_indices()
    return train


def read_eval(path, n_users, n_items, sampled):
    users, targets, cand_lists = [], [], []
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            line = line.rstrip("\n")
            if not line:
                continue
            fields = line.split("\t")
            if len(fields) not in (2, 3):
                raise SystemExit(f"{path}:{lineno}: expected 2 or 3 fields")
            users.append(int(fields[0]))
            targets.append(int(fields[1]))
            cs = fields[2] if len(fields) == 3 else ""
            cand_lists.append([int(c) for c in cs.split(",") if c != ""])
            if any(c < 0 for c in cand_lists[-1]):
                raise SystemExit(f"{path}:{lineno}: a negative candidate index")
            if sampled and not cand_lists[-1]:
                raise SystemExit(f"{path}:{lineno}: a sampled track without candidates")
    if not sampled:
        cand_lists = [[] for _ in cand_lists]
    width = max((len(c) for c in cand_lists), default=0)
    cands = np.full((len(cand_lists), width), -1, dtype=np.int64)
    for i, c in enumerate(cand_lists):
        cands[i, : len(c)] = c
    users = np.asarray(users, dtype=np.int64)
    targets = np.asarray(targets, dtype=np.int64)
    for name, arr, n in (("user", users, n_users), ("item", targets, n_items)):
        if arr.size and (arr.min() < 0 or arr.max() >= n):
            raise SystemExit(f"{path}: {name} index outside 0..{n - 1}")
    if cands.size and cands.max() >= n_items:
        raise SystemExit(f"{path}: candidate index outside 0..{n_items - 1}")
    if len(np.unique(users)) != len(users):
        raise SystemExit(f"{path}: a user evaluated twice")
    return users, targets, cands


def load_meta(split_dir):
    with open(os.path.join(split_dir, "meta.json"), encoding="utf-8") as f:
        return json.load(f)


def load_track(split_dir, track, meta):
    """The track's (track meta, validation cut, test cut)."""
    d = os.path.join(split_dir, track)
    with open(os.path.join(d, "meta.json"), encoding="utf-8") as f:
        tmeta = json.load(f)
    n_users, n_items = int(meta["users"]), int(meta["items"])
    exclude, sampled = bool(tmeta["exclude_train"]), bool(tmeta["sampled"])
    cuts = []
    for train_name, eval_name in (("valid_train", "valid"), ("train", "test")):
        train = read_train(os.path.join(d, train_name + ".tsv"), n_users, n_items)
        users, targets, cands = read_eval(
            os.path.join(d, eval_name + ".tsv"), n_users, n_items, sampled
        )
        cut = Cut(n_items, train, users, targets, cands, exclude, sampled)
        n_in = int(cut.target_in_train.sum())
        if exclude and n_in:
            print(
                f"warning: {d}/{eval_name}.tsv: {n_in} held-out items are training "
                "items of their user in a track with exclude_train",
                file=sys.stderr,
            )
        key = eval_name + "_users"
        if key in tmeta and int(tmeta[key]) != len(users):
            raise SystemExit(
                f"{d}/meta.json: {key} {tmeta[key]}, but {eval_name}.tsv has {len(users)}"
            )
        cuts.append(cut)
    return tmeta, cuts[0], cuts[1]


# --------------------------------------------------------------------------
# Evaluation (mirrors fedrec_client::metrics and fedrec::eval::evaluate)


def ndcg_of_rank(rank):
    rank = np.asarray(rank)
    return np.where(rank < K, 1.0 / np.log2(rank + 2.0), 0.0)


def top_k_mask(masked, k=K):
    """Boolean mask of each row's top k finite entries; ties by smaller index.

    `masked` has -inf at items that do not compete."""
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


def rank_batch(scores, train_rows, targets, cands, exclude):
    """Full ranks, sampled ranks and top-k masks of a batch of users.

    scores: (b x n_items) floats; train_rows: (b x n_items) sparse training
    rows; targets: (b,); cands: (b x w), -1 padded; exclude: whether training
    items are removed from the competition."""
    scores = np.asarray(scores, dtype=np.float64)
    b = np.arange(scores.shape[0])
    idx = np.arange(scores.shape[1])
    ts = scores[b, targets]
    masked = scores.copy()
    if exclude:
        r, c = train_rows.nonzero()
        masked[r, c] = -np.inf
    # The target's own entry is never ahead of itself (equal score, equal
    # index), so it competes even if it is a (masked) training item.
    ahead = (masked > ts[:, None]) | (
        (masked == ts[:, None]) & (idx[None, :] < targets[:, None])
    )
    full = ahead.sum(axis=1)
    valid = cands >= 0
    cs = scores[b[:, None], np.where(valid, cands, 0)]
    ahead = valid & (
        (cs > ts[:, None]) | ((cs == ts[:, None]) & (cands < targets[:, None]))
    )
    samp = ahead.sum(axis=1)
    return full, samp, top_k_mask(masked)


def evaluate(cut, score_batch):
    """Metrics of a scorer on a cut. `score_batch(users)` returns a float
    array of scores (len(users) x n_items)."""
    n_eval = len(cut.users)
    full_rank = np.empty(n_eval, dtype=np.int64)
    samp_rank = np.empty(n_eval, dtype=np.int64)
    covered = np.zeros(cut.n_items, dtype=bool)
    batch = max(1, min(1024, 4_000_000 // max(cut.n_items, 1)))
    for lo in range(0, n_eval, batch):
        hi = min(lo + batch, n_eval)
        u = cut.users[lo:hi]
        full, samp, top = rank_batch(
            score_batch(u), cut.train[u], cut.targets[lo:hi], cut.cands[lo:hi],
            cut.exclude,
        )
        full_rank[lo:hi] = full
        samp_rank[lo:hi] = samp
        covered |= top.any(axis=0)
    return metrics_of(cut, full_rank, samp_rank, covered)


def metrics_of(cut, full_rank, samp_rank, covered):
    def mean(x):
        return float(np.mean(x)) if len(x) else 0.0

    m = {
        "hr_full": mean(full_rank < K),
        "ndcg_full": mean(ndcg_of_rank(full_rank)),
    }
    if cut.sampled:
        m["hr_100"] = mean(samp_rank < K)
        m["ndcg_100"] = mean(ndcg_of_rank(samp_rank))
    m["coverage"] = float(covered.sum()) / max(cut.n_items, 1)
    m["users"] = int(len(full_rank))
    m["users_target_in_train"] = int(cut.target_in_train.sum())
    return m


def popularity_scorer(cut):
    # Number of training users per item (the matrix is binary).
    pop = np.asarray(cut.train.sum(axis=0)).ravel().astype(np.float64)
    return lambda users: np.broadcast_to(pop, (len(users), cut.n_items))


# --------------------------------------------------------------------------
# implicit ALS


def make_als(params, seed, threads):
    """implicit's CPU ALS; params None means the library defaults."""
    from implicit.cpu.als import AlternatingLeastSquares

    kw = {} if params is None else {
        "factors": params["factors"],
        "regularization": params["regularization"],
        # implicit 0.7.3: confidence of an observed pair = alpha * 1
        "alpha": params["alpha"],
        "iterations": params["iterations"],
    }
    return AlternatingLeastSquares(random_state=seed, num_threads=threads, **kw)


def params_of(model):
    return {
        "factors": int(model.factors),
        "regularization": float(model.regularization),
        "alpha": float(model.alpha),
        "iterations": int(model.iterations),
    }


def fit_eval(fit_cut, eval_cut, params, seed, threads):
    """Fit on fit_cut's matrix, evaluate on eval_cut: (params, metrics, s)."""
    start = time.perf_counter()
    model = make_als(params, seed, threads)
    model.fit(fit_cut.train, show_progress=False)
    uf = np.asarray(model.user_factors, dtype=np.float64)
    itf = np.asarray(model.item_factors, dtype=np.float64)
    m = evaluate(eval_cut, lambda users: uf[users] @ itf.T)
    return params_of(model), m, round(time.perf_counter() - start, 3)


HEADER = (
    f"{'row':<10} {'cut':<5} {'factors':>7} {'reg':>6} {'alpha':>5} {'iters':>5} "
    f"{'HR@10':>7} {'NDCG@10':>7} {'HR@10/100':>9} {'NDCG@10/100':>11} "
    f"{'cov@10':>6} {'seconds':>7}"
)


def fmt_row(name, cut, params, m, seconds):
    if params is None:
        p = f"{'-':>7} {'-':>6} {'-':>5} {'-':>5}"
    else:
        p = (
            f"{params['factors']:>7} {params['regularization']:>6g} "
            f"{params['alpha']:>5g} {params['iterations']:>5}"
        )
    if "hr_100" in m:
        s = f"{m['hr_100']:>9.4f} {m['ndcg_100']:>11.4f}"
    else:
        s = f"{'-':>9} {'-':>11}"
    return (
        f"{name:<10} {cut:<5} {p} {m['hr_full']:>7.4f} {m['ndcg_full']:>7.4f} "
        f"{s} {m['coverage']:>6.3f} {seconds:>7.2f}"
    )


def pick_best(grid):
    """The grid row with the best validation NDCG@10 (full ranking), ties by
    validation HR@10, then the first in grid order (max() keeps the first)."""
    return max(grid, key=lambda r: (r["valid"]["ndcg_full"], r["valid"]["hr_full"]))


def run_track(split_dir, track, meta, settings, seed, threads, log=print):
    tmeta, valid, test = load_track(split_dir, track, meta)
    log(
        f"\n== {track}: exclude_train {str(valid.exclude).lower()}, sampled "
        f"{str(valid.sampled).lower()}; test cut {len(test.users)} users, "
        f"{test.train.nnz} training pairs, {int(test.target_in_train.sum())} "
        f"held-out training items; valid cut {len(valid.users)} users, "
        f"{valid.train.nnz} training pairs"
    )
    log(HEADER)
    start = time.perf_counter()
    pop = evaluate(test, popularity_scorer(test))
    log(fmt_row("popularity", "test", None, pop, time.perf_counter() - start))

    params, m, secs = fit_eval(test, test, None, seed, threads)
    default = {"params": params, "test": m}
    log(fmt_row("default", "test", params, m, secs))

    grid, tuned = [], None
    if len(valid.users):
        for setting in settings:
            params, m, secs = fit_eval(valid, valid, setting, seed, threads)
            grid.append({"params": params, "valid": m, "seconds": secs})
            log(fmt_row("grid", "valid", params, m, secs))
        best = pick_best(grid)
        params, m, secs = fit_eval(test, test, best["params"], seed, threads)
        tuned = {"params": params, "valid": best["valid"], "test": m}
        log(fmt_row("tuned", "valid", params, best["valid"], best["seconds"]))
        log(fmt_row("tuned", "test", params, m, secs))
    else:
        log("(no validation users: nothing tuned)")
    return {"default": default, "tuned": tuned, "grid": grid, "popularity": pop}


def tracks_to_run(split_dir, meta, asked):
    """The tracks to run: those asked (in that order, once each) that the
    split has, or every track the split has."""
    present = meta.get("tracks")
    if present is None:
        present = [t for t in TRACKS if os.path.isdir(os.path.join(split_dir, t))]
    for t in present:
        if not os.path.isdir(os.path.join(split_dir, t)):
            raise SystemExit(
                f"{split_dir}/meta.json lists track {t!r}, but {t}/ is missing"
            )
    if asked is None:
        return list(present)
    run = []
    for t in asked:
        if t not in TRACKS:
            raise SystemExit(f"unknown track {t!r} (known: {', '.join(TRACKS)})")
        if t in present and t not in run:
            run.append(t)
    return run


# --------------------------------------------------------------------------
# Self-test


def _cut(n_items, train_rows, tests, exclude, sampled=False):
    """A cut from lists: train_rows[u] = items; tests = [(user, target, cands)]."""
    n_users = len(train_rows)
    rows = [u for u, items in enumerate(train_rows) for _ in items]
    cols = [i for items in train_rows for i in items]
    train = sp.csr_matrix(
        (np.ones(len(rows), dtype=np.float32), (rows, cols)),
        shape=(n_users, n_items),
    )
    train.sort_indices()
    width = max((len(c) for _, _, c in tests), default=0)
    cands = np.full((len(tests), width), -1, dtype=np.int64)
    for i, (_, _, c) in enumerate(tests):
        cands[i, : len(c)] = c
    return Cut(
        n_items,
        train,
        np.array([u for u, _, _ in tests], dtype=np.int64),
        np.array([t for _, t, _ in tests], dtype=np.int64),
        cands,
        exclude,
        sampled,
    )


def _ranks(n_items, train, target, scores, exclude, cands=()):
    """(full rank, sampled rank, top-10 items) of one user."""
    cut = _cut(n_items, [train], [(0, target, list(cands))], exclude)
    full, samp, top = rank_batch(
        np.asarray([scores], dtype=np.float64), cut.train[cut.users], cut.targets,
        cut.cands, exclude,
    )
    return int(full[0]), int(samp[0]), list(np.flatnonzero(top[0]))


# A tiny split in the layout of `fedrec split` (6 users, 8 items). Popularity
# on the test cuts (training users per item):
#   discover:            item 0: 3, 1: 3, 2: 1, 3: 1, 4..7: 0
#   buy-again/next-p.:   item 0: 3, 1: 4, 2: 1, 3: 1, 4: 1, 5..7: 0
TINY = {
    "meta.json": {"data": "self-test", "users": 6, "items": 8, "seed": 1,
                  "timed": True, "tracks": ["discover", "buy-again", "next-purchase"]},
    "discover": {
        "meta.json": {"track": "discover", "exclude_train": True, "sampled": True,
                      "test_users": 3, "valid_users": 2},
        "train.tsv": "0\t0\t1\n0\t1\t2\n1\t0\t1\n1\t2\t1\n2\t0\t3\n2\t1\t1\n2\t3\t1\n"
                     "3\t1\t1\n",
        # user 0: target 2, full competitors 2..7 -> rank 0, candidates 4, 5 -> 0
        # user 1: target 3, competitors 1, 3..7 -> 1 ahead (pop 3); cands 1, 6 -> 1
        # user 2: target 5, competitors 2, 4..7 -> 2 (pop 1) and 4 (tie, smaller)
        #         ahead: 2; cands 2, 7 -> 1 (2 ahead, 7 a tie with a larger index)
        "test.tsv": "0\t2\t4,5\n1\t3\t1,6\n2\t5\t2,7\n",
        "valid_train.tsv": "0\t0\t1\n1\t0\t1\n2\t0\t2\n2\t1\t1\n3\t1\t1\n",
        "valid.tsv": "0\t1\t3,4\n2\t3\t5,6\n",
    },
    "buy-again": {
        "meta.json": {"track": "buy-again", "exclude_train": False, "sampled": False,
                      "test_users": 3, "valid_users": 1},
        "train.tsv": "0\t0\t2\n0\t1\t1\n1\t0\t1\n1\t2\t1\n2\t0\t1\n2\t1\t1\n2\t3\t1\n"
                     "3\t1\t1\n3\t4\t1\n4\t1\t1\n",
        # popularity order 1, 0, 2, 3, 4, 5, 6, 7; nothing removed
        # user 0: target 0 -> rank 1; user 2: 1 -> 0; user 3: 4 -> 4
        "test.tsv": "0\t0\n2\t1\n3\t4\n",
        "valid_train.tsv": "0\t0\t1\n0\t1\t1\n1\t0\t1\n2\t0\t1\n2\t1\t1\n3\t1\t1\n"
                           "4\t1\t1\n",
        "valid.tsv": "0\t0\n",
    },
    "next-purchase": {
        "meta.json": {"track": "next-purchase", "exclude_train": False, "sampled": False,
                      "test_users": 4, "valid_users": 3},
        # the same training file as buy-again
        # user 0: target 0 -> 1; user 1: 5 -> 5; user 2: 1 -> 0; user 3: 4 -> 4
        "test.tsv": "0\t0\n1\t5\n2\t1\n3\t4\n",
        "valid_train.tsv": "0\t0\t1\n0\t1\t1\n1\t0\t1\n2\t0\t1\n2\t1\t1\n3\t1\t1\n"
                           "4\t1\t1\n",
        "valid.tsv": "0\t0\n1\t2\n3\t4\n",
    },
}
TINY["next-purchase"]["train.tsv"] = TINY["buy-again"]["train.tsv"]


def write_tiny_split(d):
    for name, content in TINY.items():
        if isinstance(content, dict) and name != "meta.json":
            os.makedirs(os.path.join(d, name), exist_ok=True)
            for fname, text in content.items():
                with open(os.path.join(d, name, fname), "w", encoding="utf-8") as f:
                    f.write(json.dumps(text) if fname == "meta.json" else text)
        else:
            with open(os.path.join(d, name), "w", encoding="utf-8") as f:
                json.dump(content, f)


def self_test():
    import subprocess
    import tempfile

    if not __debug__:
        raise SystemExit("the self-test uses assert: run it without -O")

    def close(a, b):
        return abs(a - b) < 1e-12

    five = [5.0, 4.0, 3.0, 2.0, 1.0]
    # Strictly higher scores count.
    for ex in (True, False):
        assert _ranks(5, [], 3, five, ex)[0] == 3
    # Exclusion: training items 0, 1 removed -> rank 1; kept -> rank 3.
    assert _ranks(5, [0, 1], 3, five, True)[0] == 1
    assert _ranks(5, [0, 1], 3, five, False)[0] == 3
    # The target is a training item (a re-buy): it still competes. Excluding
    # (never in discover, but defined): item 0 is removed -> 0. Without
    # exclusion (buy-again, next-purchase): item 0 is ahead -> 1.
    assert _ranks(5, [0, 1], 1, five, True)[0] == 0
    assert _ranks(5, [0, 1], 1, five, False)[0] == 1
    # Ties: an equal score counts only with a smaller index.
    for t in range(3):
        assert _ranks(3, [], t, [1.0] * 3, False)[0] == t
    assert _ranks(3, [0], 2, [1.0] * 3, True)[0] == 1
    # Sampled: only the listed candidates compete, ties by index, and the
    # full rank follows its own exclusion rule.
    sc = [9.0, 1.0, 2.0, 2.0, 2.0, 3.0]
    full, samp, _ = _ranks(6, [0], 3, sc, True, cands=[5, 2, 4])
    assert samp == 2 and full == 2, (full, samp)  # 5 higher, 2 a smaller tie
    full, samp, _ = _ranks(6, [0], 3, sc, False, cands=[5, 2, 4])
    assert samp == 2 and full == 3, (full, samp)  # item 0 now competes
    # HR/NDCG: rank 9 is the last hit, rank 10 a miss.
    assert ndcg_of_rank(0) == 1.0 and close(float(ndcg_of_rank(9)), 1 / np.log2(11))
    assert float(ndcg_of_rank(10)) == 0.0
    scores = [float(20 - i) for i in range(20)]
    c = _cut(20, [[], []], [(0, 9, []), (1, 10, [])], False)
    m = evaluate(c, lambda u: np.tile(scores, (len(u), 1)))
    assert m["hr_full"] == 0.5 and close(m["ndcg_full"], 0.5 / np.log2(11)), m
    assert "hr_100" not in m and m["users"] == 2
    # Top 10 with ties at the cut-off and removed items.
    sc = np.array([[0.1, 0.9, 0.5, 0.9, 0.0]])
    assert list(np.flatnonzero(top_k_mask(sc, 3)[0])) == [1, 2, 3]
    ex = sc.copy()
    ex[0, 1] = -np.inf
    assert list(np.flatnonzero(top_k_mask(ex, 2)[0])) == [2, 3]
    sc = np.array([[1.0, 2.0, 2.0, 2.0, -np.inf, 2.0]])
    assert list(np.flatnonzero(top_k_mask(sc, 2)[0])) == [1, 2]
    assert list(np.flatnonzero(top_k_mask(sc, 10)[0])) == [0, 1, 2, 3, 5]
    sc = [float(-i) for i in range(12)]
    assert _ranks(12, [0, 3], 5, sc, True)[2] == [1, 2] + list(range(4, 12))
    assert _ranks(12, [0, 3], 5, sc, False)[2] == list(range(10))
    # Coverage: 12 items scored by -index; user 0 trained on {0}, user 1 on
    # {1, 2}. Excluding: top 10s 1..10 and 0, 3..11 -> 12/12; not excluding:
    # both 0..9 -> 10/12.
    tests = [(0, 5, []), (1, 5, [])]
    by_index = lambda u: np.tile(-np.arange(12.0), (len(u), 1))  # noqa: E731
    assert evaluate(_cut(12, [[0], [1, 2]], tests, True), by_index)["coverage"] == 1.0
    m = evaluate(_cut(12, [[0], [1, 2]], tests, False), by_index)
    assert close(m["coverage"], 10 / 12), m

    # Selection: NDCG first, then HR, then grid order.
    figures = [(0.1, 0.9), (0.3, 0.4), (0.3, 0.5), (0.2, 0.9), (0.3, 0.5)]
    rows = [{"valid": {"ndcg_full": n, "hr_full": h}, "i": i}
            for i, (n, h) in enumerate(figures)]
    assert pick_best(rows)["i"] == 2

    with tempfile.TemporaryDirectory() as d:
        write_tiny_split(d)
        meta = load_meta(d)
        # Loading: binary matrix (counts ignored), candidates, re-buy flags.
        _, valid, test = load_track(d, "discover", meta)
        assert test.train.toarray()[:4, :4].tolist() == [
            [1, 1, 0, 0], [1, 0, 1, 0], [1, 1, 0, 1], [0, 1, 0, 0]]
        assert test.exclude and test.sampled and len(valid.users) == 2
        assert test.cands.tolist() == [[4, 5], [1, 6], [2, 7]]
        _, _, ba = load_track(d, "buy-again", meta)
        assert not ba.exclude and ba.target_in_train.tolist() == [True, True, True]
        # Popularity by hand (see TINY).
        pop = evaluate(test, popularity_scorer(test))
        want = {"hr_full": 1.0, "ndcg_full": (1 + 1 / np.log2(3) + 0.5) / 3,
                "hr_100": 1.0, "ndcg_100": (1 + 2 / np.log2(3)) / 3,
                # top 10s: {2..7}, {1, 3..7}, {2, 4..7} -> 7 of 8 items
                "coverage": 7 / 8, "users": 3, "users_target_in_train": 0}
        assert pop.keys() == want.keys(), pop
        assert all(close(pop[k], want[k]) for k in want), (pop, want)
        pop_np = {"hr_full": 1.0,
                  "ndcg_full": (1 / np.log2(3) + 1 / np.log2(7) + 1 + 1 / np.log2(6)) / 4,
                  "coverage": 1.0, "users": 4,
                  "users_target_in_train": 3}
        pop_ba = {"hr_full": 1.0, "ndcg_full": (1 / np.log2(3) + 1 + 1 / np.log2(6)) / 3,
                  "coverage": 1.0, "users": 3, "users_target_in_train": 3}
        # Tracks asked and present; a track asked but absent is skipped.
        assert tracks_to_run(d, meta, None) == list(TRACKS)
        only_np = dict(meta, tracks=["next-purchase"])
        assert tracks_to_run(d, only_np, ["discover", "next-purchase"]) == ["next-purchase"]

        # The whole CLI, twice (the same seed must give the same figures).
        out = os.path.join(d, "out.json")
        cmd = [sys.executable, os.path.abspath(__file__), "--split", d, "--quick",
               "--out", out]
        env = dict(os.environ, OPENBLAS_NUM_THREADS="1")
        runs = []
        for extra in ([], ["--tracks", "next-purchase,buy-again,next-purchase"]):
            p = subprocess.run(cmd + extra, capture_output=True, text=True, env=env)
            assert p.returncode == 0, p.stderr
            last = json.loads(p.stdout.strip().splitlines()[-1])
            with open(out, encoding="utf-8") as f:
                assert json.load(f) == last
            runs.append(last)
        full, part = runs
        assert list(full) == list(TRACKS) and list(part) == ["next-purchase", "buy-again"]
        n_quick = len(grid_settings(QUICK_GRID))
        metric_keys = {"hr_full", "ndcg_full", "coverage", "users", "users_target_in_train"}
        param_keys = {"factors", "regularization", "alpha", "iterations"}
        for t, r in full.items():
            sampled = TINY[t]["meta.json"]["sampled"]
            keys = metric_keys | ({"hr_100", "ndcg_100"} if sampled else set())
            assert set(r) == {"default", "tuned", "grid", "popularity"}, r.keys()
            assert set(r["default"]) == {"params", "test"}
            assert r["default"]["params"] == {
                "factors": 100, "regularization": 0.01, "alpha": 1.0, "iterations": 15}
            assert set(r["tuned"]) == {"params", "valid", "test"}
            assert len(r["grid"]) == n_quick
            for g in r["grid"]:
                assert set(g) == {"params", "valid", "seconds"}
                assert set(g["params"]) == param_keys
                assert set(g["valid"]) == keys
            rates = keys - {"users", "users_target_in_train"}
            for m in (r["popularity"], r["default"]["test"], r["tuned"]["valid"],
                      r["tuned"]["test"]):
                assert set(m) == keys, (t, m)
                assert all(0.0 <= m[k] <= 1.0 for k in rates), (t, m)
            best = pick_best(r["grid"])
            assert r["tuned"]["params"] == best["params"]
            assert r["tuned"]["valid"] == best["valid"]
            assert r["popularity"]["users"] == TINY[t]["meta.json"]["test_users"]
            assert r["tuned"]["valid"]["users"] == TINY[t]["meta.json"]["valid_users"]
        assert full["discover"]["popularity"] == pop
        for t, want in (("next-purchase", pop_np), ("buy-again", pop_ba)):
            got = full[t]["popularity"]
            assert got.keys() == want.keys(), (t, got)
            assert all(close(got[k], want[k]) for k in want), (t, got, want)

        def strip(r):  # everything but the timings
            return {k: v for k, v in r.items() if k != "grid"} | {
                "grid": [{k: v for k, v in g.items() if k != "seconds"} for g in r["grid"]]}

        for t in part:
            assert strip(part[t]) == strip(full[t]), t
    print("self-test passed")


# --------------------------------------------------------------------------


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--split", help="directory written by `fedrec split`")
    ap.add_argument(
        "--tracks",
        help="comma-separated tracks to run (default: every track in DIR/meta.json)",
    )
    ap.add_argument("--quick", action="store_true", help="the 2x2x2 grid")
    ap.add_argument("--out", help="write the JSON result here too")
    ap.add_argument("--seed", type=int, default=0, help="implicit's random_state")
    ap.add_argument(
        "--threads", type=int, default=1, help="implicit's num_threads (0: all cores)"
    )
    ap.add_argument("--self-test", action="store_true")
    args = ap.parse_args(argv)

    if args.self_test:
        self_test()
        if not args.split:
            return 0
    if not args.split:
        ap.error("--split DIR is required")

    import implicit

    if implicit.__version__ != "0.7.3":
        print(
            f"warning: implicit {implicit.__version__}, not 0.7.3: its defaults and "
            "confidence semantics may differ from those described here",
            file=sys.stderr,
        )
    wall = time.perf_counter()
    meta = load_meta(args.split)
    asked = None if args.tracks is None else [t for t in args.tracks.split(",") if t]
    tracks = tracks_to_run(args.split, meta, asked)
    for t in asked or []:
        if t not in tracks:
            print(f"track {t}: not in {args.split}, skipped", file=sys.stderr)
    settings = grid_settings(QUICK_GRID if args.quick else FULL_GRID)
    print(
        f"split {args.split}: data {meta.get('data')!r}, seed {meta.get('seed')}, "
        f"{meta['users']} users, {meta['items']} items; tracks {', '.join(tracks)}; "
        f"grid {len(settings)} settings; implicit {implicit.__version__}, "
        f"numpy {np.__version__}, random_state {args.seed}, threads {args.threads}",
        flush=True,
    )
    result = {}
    for t in tracks:
        result[t] = run_track(
            args.split, t, meta, settings, args.seed, args.threads,
            log=lambda s: print(s, flush=True),
        )
    print(f"\nwall time {time.perf_counter() - wall:.1f}s", flush=True)
    if args.out:
        with open(args.out, "w", encoding="utf-8") as fh:
            json.dump(result, fh, indent=1)
            fh.write("\n")
    print(json.dumps(result), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())

#!/usr/bin/env python3
"""Markdown tables of `fedrec simulate --report` files, one per track.

Usage:
    python3 scripts/report_tables.py NAME=report.json [NAME=report.json ...]
        [--peer NAME=peer.json ...]

For each report: the data set, the settings (the `--preset auto` choice when
it ran), and per track every method's test figures (HR@10, NDCG@10, among
100 candidates for discover, coverage@10), the tuned baselines with their
setting. `--peer` adds the rows of `scripts/implicit_peer.py --out` for the
same data set (its defaults and its setting tuned on validation). Standard
library only.
"""

import json
import sys

ORDER = [
    "federated",
    "centralized",
    "buy_again_on_device",
    "blended_on_device",
    "popularity",
    "personal_frequency",
    "recency",
    "item_knn",
    "ease",
]


def fmt(x):
    return "–" if x is None else f"{x:.4f}"


def peer_rows(peer, track):
    t = peer.get(track)
    if not t:
        return []
    rows = []
    d = t["default"]
    p = d["params"]
    rows.append(
        (
            "implicit ALS, defaults",
            f"{p['factors']} f., reg {p['regularization']}, α {p['alpha']}",
            d["test"],
        )
    )
    if t.get("tuned"):
        p = t["tuned"]["params"]
        rows.append(
            (
                "implicit ALS, tuned",
                f"{p['factors']} f., reg {p['regularization']}, α {p['alpha']}",
                t["tuned"]["test"],
            )
        )
    return rows


def main(argv):
    reports, peers = [], {}
    it = iter(argv)
    for a in it:
        if a == "--peer":
            name, path = next(it).split("=", 1)
            peers[name] = json.load(open(path))
        else:
            name, path = a.split("=", 1)
            reports.append((name, json.load(open(path))))
    for name, r in reports:
        c = r["config"]["coordinator"]
        data = r["data"]
        print(f"### {name}: {data['name']} ({data['users']} users, {data['items']} items)\n")
        s = r.get("search")
        if s:
            ch = s["chosen"]
            if ch.get("model") == "ease":
                what = f"federated EASE, λ {ch['regularization']}"
            else:
                what = (
                    f"ALS, {ch['factors']} factors, confidence {ch['confidence']}, "
                    f"regularization {ch['regularization']}, {ch['rounds']} rounds"
                )
            print(
                f"`--preset auto` chose {what} "
                f"(validation NDCG@10 {ch['validation']['full']['ndcg_at_10']:.4f}; "
                f"{len(s['trials'])} trials, {s['device_rounds']} device tasks, {s['seconds']:.0f} s)."
            )
        elif c["strategy"]["name"] == "ease":
            print(f"Settings: federated EASE, λ {c['strategy']['ease_lambda']}.")
        else:
            print(
                f"Settings: {c['training']['loss']} loss, {c['model']['factors']} factors, "
                f"confidence {c['training']['confidence']}, regularization "
                f"{c['training']['regularization']}, {c['rounds']['rounds']} rounds, "
                f"strategy {c['strategy']['name']}."
            )
        t = r["timing"]
        print(
            f"Wall time {t['total_seconds']:.0f} s (federated {t['federated_seconds']:.0f} s, "
            f"centralized {t['centralized_seconds']:.0f} s).\n"
        )
        for track, tr in r["final"].items():
            if track == "diversity":
                continue
            sampled = track == "discover"
            head = "| method | setting | HR@10 | NDCG@10 |"
            sep = "|---|---|---|---|"
            if sampled:
                head += " HR@10 (100) | NDCG@10 (100) |"
                sep += "---|---|"
            head += " coverage@10 |"
            sep += "---|"
            print(
                f"**{track}** ({tr['users']} users evaluated, {tr['validation_users']} with a "
                f"validation event, {tr['skipped_users']} skipped)\n"
            )
            print(head)
            print(sep)
            methods = tr["methods"]
            names = [m for m in ORDER if m in methods] + [
                m for m in methods if m not in ORDER
            ]
            for m in names:
                v = methods[m]
                test = v.get("test")
                if not test:
                    print(f"| {m} | {v.get('note', '')} | | |" + (" | |" if sampled else "") + " |")
                    continue
                row = f"| {m} | {v.get('setting', '')} | {fmt(test['full']['hr_at_10'])} | {fmt(test['full']['ndcg_at_10'])} |"
                if sampled:
                    s100 = test.get("sampled100") or {}
                    row += f" {fmt(s100.get('hr_at_10'))} | {fmt(s100.get('ndcg_at_10'))} |"
                row += f" {test['coverage_at_10']:.3f} |"
                print(row)
            for label, setting, m in peer_rows(peers.get(name, {}), track):
                row = f"| {label} | {setting} | {fmt(m['hr_full'])} | {fmt(m['ndcg_full'])} |"
                if sampled:
                    row += f" {fmt(m.get('hr_100'))} | {fmt(m.get('ndcg_100'))} |"
                row += f" {m['coverage']:.3f} |"
                print(row)
            print()


if __name__ == "__main__":
    main(sys.argv[1:])

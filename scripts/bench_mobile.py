#!/usr/bin/env python3
"""Time and peak memory of one training task through the Python bindings of
the mobile library, at the MovieLens (1,682 items x 32 factors) and Online
Retail (3,665 x 128) presets' model sizes and training recipe (ALS loss,
the `als` server step). A benchmark, not a test: the figures go in
docs/mobile.md.

    scripts/bench_mobile.py --fedrec target/release/fedrec \\
        --module target/bindings/python [--lib path/to/libfedrec_ffi.so]

For each size it starts `fedrec serve` on 127.0.0.1 (port 0) with a
one-device round, and runs a fresh Python process that opens a client,
connects, downloads the model, records HISTORY purchases and takes part in
ROUNDS rounds, each one task (`participate()`: check-in, model download,
local training, upload, over loopback). It reports each call's wall time
and the process's peak resident memory (ru_maxrss) after importing the
module and after the tasks: their difference bounds what the SDK added
(its runtime, the store, the model and its copies, the training buffers).
The machine's other load adds to the times; run it on an idle machine.
"""

import argparse
import os
import re
import shutil
import subprocess
import sys
import tempfile

SIZES = [("MovieLens", 1682, 32, 5.0, 0.1), ("Online Retail", 3665, 128, 2.0, 0.01)]
HISTORY = 100  # purchases on the device (MovieLens-100K: 106 ratings a user on average)
ROUNDS = 5

CONFIG = """
[server]
listen = "127.0.0.1:0"
[rounds]
rounds = {rounds}
clients_per_round = 1
min_updates = 1
over_selection = 1.0
evaluate = false
final_evaluation = false
checkin_window_secs = 1.0
[training]
loss = "als"
confidence = {confidence}
regularization = {regularization}
learning_rate = 1.0
[strategy]
name = "als"
weighting = "uniform"
schedule = "cosine"
server_lr = 1.0
[model]
items = {items}
factors = {factors}
init_std = 0.01
"""

DEVICE = r"""
import resource, sys, time
import fedrec_ffi as f
endpoint, store, history, rounds = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
kib = lambda: resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
base = kib()
app = f.FedrecClient.open(f.OpenOptions(store_path=store, store_key=bytes(32), seed=1), None)
app.connect(endpoint, None)
app.refresh_model()
app.set_consent(f.Consent.FEDERATED)
now = int(time.time())
for i in range(history):
    app.record(f.Purchase(item=(i * 7) % 1600, time=now - 3600 * i, quantity=1.0))
app.recommend(10)
before = kib()
times = []
for _ in range(rounds):
    t = time.perf_counter()
    s = app.participate()
    times.append((time.perf_counter() - t) * 1000)
    assert s.trained == 1, s
print(f"base_kib={base} before_kib={before} peak_kib={kib()} ms=" + ",".join(f"{x:.1f}" for x in times))
"""


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--fedrec", required=True, help="the fedrec binary (coordinator)")
    p.add_argument("--module", required=True, help="directory of the generated Python module")
    p.add_argument("--lib", help="library to load instead of the module directory's")
    args = p.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        module = os.path.join(tmp, "module")
        shutil.copytree(args.module, module)
        if args.lib:
            # Under the name the generated module loads.
            (name,) = [n for n in os.listdir(module) if n.startswith("libfedrec_ffi.")]
            shutil.copy(args.lib, os.path.join(module, name))
        for name, items, factors, confidence, regularization in SIZES:
            cfg = os.path.join(tmp, f"{items}.toml")
            with open(cfg, "w") as file:
                file.write(CONFIG.format(rounds=ROUNDS + 1, items=items, factors=factors,
                                         confidence=confidence, regularization=regularization))
            server = subprocess.Popen([args.fedrec, "serve", "--config", cfg],
                                      stderr=subprocess.PIPE, stdout=subprocess.DEVNULL, text=True)
            try:
                endpoint = None
                for line in server.stderr:
                    m = re.search(r"listening on (\S+)", line)
                    if m:
                        endpoint = "http://" + m.group(1).rstrip(",")
                        break
                if endpoint is None:
                    sys.exit(f"fedrec serve did not start for {name}")
                out = subprocess.run(
                    [sys.executable, "-c", DEVICE, endpoint, os.path.join(tmp, f"{items}.store"),
                     str(HISTORY), str(ROUNDS)],
                    env={**os.environ, "PYTHONPATH": module}, capture_output=True, text=True, timeout=600)
                if out.returncode != 0:
                    sys.exit(f"{name}: {out.stderr}")
                fields = dict(kv.split("=") for kv in out.stdout.split())
                ms = [float(x) for x in fields["ms"].split(",")]
                base, before, peak = (int(fields[k]) for k in ("base_kib", "before_kib", "peak_kib"))
                print(f"{name} {items} x {factors}: participate() ms {sorted(ms)} (median "
                      f"{sorted(ms)[len(ms) // 2]:.1f}); peak RSS {peak / 1024:.1f} MiB, "
                      f"{(peak - base) / 1024:.1f} MiB above the interpreter with the module "
                      f"({base / 1024:.1f} MiB), {(peak - before) / 1024:.1f} MiB above the "
                      f"peak before the tasks")
            finally:
                server.kill()
                server.wait()


if __name__ == "__main__":
    main()

"""A child process for ffi/tests/crash.rs, killed with SIGKILL while it
works: `crash.py record STORE` records purchases in a loop, `crash.py
participate STORE ENDPOINT` takes part in rounds in a loop. After each call
returns it prints what is now saved ("recorded N", "rounds N"), flushed, so
the parent knows the last state acknowledged. Never ends by itself."""

import sys
import time

import fedrec_ffi as f

KEY = bytes(range(32))
NOW = int(time.time())

mode, path = sys.argv[1], sys.argv[2]
app = f.FedrecClient.open(f.OpenOptions(store_path=path, store_key=KEY), None)
if mode == "record":
    n = app.transparency_report(False).stored.purchases
    while True:
        app.record(f.Purchase(item=n % 50, time=NOW - n, quantity=1.0))
        n += 1
        print(f"recorded {n}", flush=True)
elif mode == "participate":
    app.connect(sys.argv[3], None)
    rounds = len(app.transparency_report(False).rounds)
    while True:
        rounds += app.participate().trained
        print(f"rounds {rounds}", flush=True)
else:
    raise SystemExit(f"unknown mode {mode}")

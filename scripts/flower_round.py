#!/usr/bin/env python3
"""Flower peer for `fedrec bench round`: seconds per FedAvg round and the
server's peak memory, with local training stubbed to zero time.

What it does
    Starts Flower's legacy gRPC server (`flwr.server.start_server`, FedAvg,
    every client in every round, no evaluation) in its own process on
    127.0.0.1, then `--clients` clients as `--procs` processes of
    clients/procs threads each (`flwr.client.start_client`). Each client's
    `fit` returns its parameters unchanged with one example: no training.
    The model is one float32 vector of `--dim` zeros.

    A round is timed inside the server, from the moment the strategy has its
    cohort (after `configure_fit`, so waiting for clients to connect is not
    counted) to the end of `aggregate_fit`. The server's peak resident
    memory is its own `ru_maxrss`. The last line printed is JSON, in the
    shape of `fedrec bench round`'s:
    {"peer":"flower","clients":N,"dim":D,"rounds":R,"sec_per_round":..,
     "sec_per_round_each":[..],"server_peak_rss_mb":..}

Install (outside the repository)
    python3 -m venv /tmp/flwr-venv && /tmp/flwr-venv/bin/pip install flwr==1.42.0 numpy

Run
    /tmp/flwr-venv/bin/python scripts/flower_round.py --clients 100 --dim 118592 --rounds 5
"""

import argparse
import json
import multiprocessing as mp
import resource
import socket
import sys
import threading
import time
import warnings


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


MAX_MESSAGE = 1 << 30


def serve(port, clients, dim, rounds, out):
    import flwr as fl
    import numpy as np
    from flwr.common import ndarrays_to_parameters

    marks = []

    class Timed(fl.server.strategy.FedAvg):
        def configure_fit(self, server_round, parameters, client_manager):
            cfg = super().configure_fit(server_round, parameters, client_manager)
            marks.append([time.perf_counter(), None])
            return cfg

        def aggregate_fit(self, server_round, results, failures):
            if failures:
                raise RuntimeError(f"{len(failures)} clients failed: {failures[:1]}")
            agg = super().aggregate_fit(server_round, results, failures)
            marks[-1][1] = time.perf_counter()
            return agg

    strategy = Timed(
        fraction_fit=1.0,
        fraction_evaluate=0.0,
        min_fit_clients=clients,
        min_evaluate_clients=0,
        min_available_clients=clients,
        initial_parameters=ndarrays_to_parameters([np.zeros(dim, dtype=np.float32)]),
    )
    fl.server.start_server(
        server_address=f"127.0.0.1:{port}",
        config=fl.server.ServerConfig(num_rounds=rounds),
        strategy=strategy,
        grpc_max_message_length=MAX_MESSAGE,
    )
    each = [end - start for start, end in marks]
    peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0
    out.put({"each": each, "peak_mb": peak_mb})


def client_process(port, threads):
    import flwr as fl

    class Zero(fl.client.NumPyClient):
        def get_parameters(self, config):
            raise RuntimeError("the strategy has initial parameters")

        def fit(self, parameters, config):
            return parameters, 1, {}

        def evaluate(self, parameters, config):
            return 0.0, 1, {}

    def run():
        # The server may not listen yet: retry the connection.
        fl.client.start_client(
            server_address=f"127.0.0.1:{port}",
            client=Zero().to_client(),
            grpc_max_message_length=MAX_MESSAGE,
            max_retries=100,
            max_wait_time=60,
        )

    pool = [threading.Thread(target=run) for _ in range(threads)]
    for t in pool:
        t.start()
    for t in pool:
        t.join()


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--clients", type=int, default=100)
    p.add_argument("--dim", type=int, default=118_592)
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--procs", type=int, default=10)
    a = p.parse_args()
    if a.clients % a.procs:
        sys.exit("--clients must be a multiple of --procs")
    warnings.filterwarnings("ignore")
    port = free_port()
    ctx = mp.get_context("spawn")
    out = ctx.Queue()
    server = ctx.Process(target=serve, args=(port, a.clients, a.dim, a.rounds, out))
    server.start()
    procs = [
        ctx.Process(target=client_process, args=(port, a.clients // a.procs))
        for _ in range(a.procs)
    ]
    for c in procs:
        c.start()
    result = out.get(timeout=3600)
    server.join(timeout=60)
    for c in procs:
        c.join(timeout=60)
        if c.is_alive():
            c.terminate()
    each = result["each"]
    print(
        json.dumps(
            {
                "peer": "flower",
                "clients": a.clients,
                "dim": a.dim,
                "rounds": a.rounds,
                "sec_per_round": sum(each) / len(each),
                "sec_per_round_each": [round(s, 4) for s in each],
                "server_peak_rss_mb": round(result["peak_mb"], 1),
            }
        )
    )


if __name__ == "__main__":
    main()

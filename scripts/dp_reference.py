"""Reference (epsilon, delta) values from Google's dp-accounting RdpAccountant.

Writes the test vectors that fedrec's Rényi-DP accountant is checked against
(coordinator/src/privacy/rdp_reference.csv):

    python3 -m venv /tmp/dp-venv && /tmp/dp-venv/bin/pip install dp-accounting
    /tmp/dp-venv/bin/python scripts/dp_reference.py > coordinator/src/privacy/rdp_reference.csv

Each row: sampling rate q, noise multiplier z, rounds T, delta, epsilon, for T
compositions of the Poisson-subsampled Gaussian mechanism, with the
accountant's default orders.
"""
import itertools
from importlib.metadata import version

import dp_accounting
from dp_accounting.rdp import rdp_privacy_accountant as rdp

QS = [0.001, 0.01, 0.1, 0.5, 1.0]
ZS = [0.5, 1.0, 2.0, 5.0, 10.0]
TS = [1, 10, 100, 1000, 10000]
DELTAS = [1e-7, 1e-5, 1e-3]

print(f"# dp-accounting {version('dp-accounting')} RdpAccountant, default orders")
print("q,z,rounds,delta,epsilon")
for q, z, t, d in itertools.product(QS, ZS, TS, DELTAS):
    acc = rdp.RdpAccountant()
    event = dp_accounting.PoissonSampledDpEvent(q, dp_accounting.GaussianDpEvent(z))
    acc.compose(event, t)
    print(f"{q},{z},{t},{d},{acc.get_epsilon(d):.10g}")

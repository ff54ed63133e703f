"""The shop-app story through the generated Python bindings, against a real
coordinator. Run by ffi/tests/python.rs, which generates the module, starts
the coordinators and passes FEDREC_ENDPOINT, FEDREC_TLS_ENDPOINT (a TLS
coordinator), FEDREC_OTHER_CA (a CA that did not sign its certificate),
FEDREC_DIR and FEDREC_ITEMS (the coordinator's catalogue size, which the app
does not supply: only the bad-input checks use it). Every call blocks with a bound inside the SDK; the Rust
test bounds the whole script. Prints "story: ok" at the end."""

import json
import os
import time

import fedrec_ffi as f

ENDPOINT = os.environ["FEDREC_ENDPOINT"]
DIR = os.environ["FEDREC_DIR"]
ITEMS = int(os.environ["FEDREC_ITEMS"])
TLS_ENDPOINT = os.environ["FEDREC_TLS_ENDPOINT"]
OTHER_CA = os.environ["FEDREC_OTHER_CA"]
KEY = bytes(range(32))
NOW = int(time.time())


def expect(error, call, *args):
    """Asserts that call(*args) raises the typed error `error`."""
    try:
        call(*args)
    except error as e:
        assert str(e), "an error carries a message"
        return e
    except Exception as e:  # noqa: BLE001 - report the wrong type
        raise AssertionError(f"{call.__name__}{args}: expected {error.__name__}, got {e!r}")
    raise AssertionError(f"{call.__name__}{args}: expected {error.__name__}, got no error")


class Phone(f.DeviceConditions):
    """The app's view of the device: on battery until plugged in."""

    def __init__(self):
        self.charging = False
        self.broken = False

    def current(self):
        if self.broken:
            raise RuntimeError("the app's battery check failed")
        return f.DeviceState(idle=True, charging=self.charging, unmetered=True)


def options(path, key=KEY):
    return f.OpenOptions(store_path=path, store_key=key, seed=7)


def story():
    phone = Phone()
    path = os.path.join(DIR, "shop.store")
    app = f.FedrecClient.open(options(path), phone)
    # Before the first connection: no catalogue yet, empty rows, no error.
    assert app.recommend(5).discover == []
    app.set_consent(f.Consent.ON_DEVICE)
    expect(f.FedrecError.NoCatalogue, app.record, f.Purchase(item=1, time=NOW, quantity=1.0))
    app.set_consent(f.Consent.NONE)
    app.connect(ENDPOINT, None)
    first_version = app.refresh_model()
    assert app.model_version() == first_version

    # Before consent: popular items, nothing stored.
    assert app.consent().level == f.Consent.NONE
    rows = app.recommend(5)
    assert rows.basis == f.Basis.POPULAR_NO_CONSENT, rows
    assert len(rows.discover) == 5 and rows.buy_again == [], rows
    assert app.record(f.Purchase(item=1, time=NOW, quantity=1.0)) == f.Recorded.NOT_STORED

    # On-device consent: purchases kept for personal recommendations.
    change = app.set_consent(f.Consent.ON_DEVICE)
    assert change.previous == f.Consent.NONE and change.current == f.Consent.ON_DEVICE
    liked = [10, 12, 13, 15, 17, 18]
    for i, item in enumerate(liked):
        got = app.record(f.Purchase(item=item, time=NOW - 3600 * i, quantity=1.0))
        assert got == f.Recorded.STORED, got
    app.record(f.Purchase(item=40, time=NOW, quantity=1.0, tag="gift"))
    assert app.exclude(f.Exclusion.TAG(tag="gift")) is True
    assert app.exclusions() == [f.Exclusion.TAG(tag="gift")]
    rows = app.recommend(5)
    assert rows.basis == f.Basis.PERSONAL, rows
    assert len(rows.discover) == 5 and not set(rows.discover) & set(liked), rows
    assert set(rows.buy_again) <= set(liked), rows
    assert len(rows.blended) == 5, rows
    expect(f.FedrecError.ConsentRequired, app.participate)

    # Federated: train only when the app says the phone may.
    app.set_consent(f.Consent.FEDERATED)
    summary = app.participate()
    assert summary.trained == 0 and "not charging" in summary.finished_reason, summary
    phone.broken = True  # the app's own callback throws: a typed error, no crash
    expect(f.FedrecError.Internal, app.participate)
    phone.broken = False
    phone.charging = True
    for _ in range(2):
        summary = app.participate()
        assert summary.trained == 1, summary

    # After training: a newer model, personal rows, an explanation.
    assert app.refresh_model() > first_version
    rows = app.recommend(5)
    assert rows.basis == f.Basis.PERSONAL, rows
    why = app.explain(rows.discover[0])
    assert why.item == rows.discover[0] and why.basis == f.Basis.PERSONAL, why
    assert why.because and {c.item for c in why.because} <= set(liked), why
    assert why.text, why
    app.set_diversity(0.5)
    assert len(app.recommend(5).discover) == 5

    # The transparency report: record, text, JSON.
    report = app.transparency_report(True)
    assert report.consent.level == f.Consent.FEDERATED
    assert report.stored.purchases == 7 and report.stored.not_used == 1, report.stored
    assert report.stored.encrypted_file and len(report.stored.items) == 7
    assert report.exclusions.tags == 1
    assert len(report.rounds) == 2 and all(r.bytes > 0 for r in report.rounds), report.rounds
    assert report.total_bytes_sent >= sum(r.bytes for r in report.rounds)
    text = app.transparency_text()
    assert "7" in text and len(text.splitlines()) > 3, text
    data = json.loads(app.transparency_json())
    assert data["stored"]["purchases"] == 7 and len(data["rounds"]) == 2, data

    # Forget me: the history goes, the settings stay.
    app.forget_me()
    report = app.transparency_report(False)
    assert report.stored.purchases == 0 and report.erased_at is not None, report
    assert app.recommend(5).basis == f.Basis.POPULAR_COLD_START
    del app

    # Reopened from its file, offline: the same state, and the catalogue.
    again = f.FedrecClient.open(options(path), None)
    assert again.item_index("1") == 0 and again.item_index(str(ITEMS + 1)) is None
    again.set_consent(f.Consent.ON_DEVICE)
    assert again.record(f.Purchase(item=10, time=NOW, quantity=1.0)) == f.Recorded.STORED
    rows = again.recommend(5)
    assert rows.discover == [] and rows.buy_again == [10], rows
    again.set_consent(f.Consent.FEDERATED)
    again.forget_me()
    assert again.consent().level == f.Consent.FEDERATED
    assert again.transparency_report(False).stored.purchases == 0
    assert again.exclusions() == [f.Exclusion.TAG(tag="gift")]
    del again
    return path


def bad_input(path):
    # A key of the wrong length, a wrong key, a corrupt file, a foreign file.
    expect(f.FedrecError.InvalidArgument, f.FedrecClient.open, options(path, KEY[:31]), None)
    expect(f.FedrecError.WrongKey, f.FedrecClient.open, options(path, bytes(32)), None)
    with open(path, "rb") as file:
        data = bytearray(file.read())
    corrupt = os.path.join(DIR, "corrupt.store")
    data[len(data) // 2] ^= 0xFF
    with open(corrupt, "wb") as file:
        file.write(data)
    expect(f.FedrecError.StoreCorrupt, f.FedrecClient.open, options(corrupt), None)
    foreign = os.path.join(DIR, "foreign.store")
    with open(foreign, "wb") as file:
        file.write(b"not a fedrec store at all\n" * 10)
    expect(f.FedrecError.StoreCorrupt, f.FedrecClient.open, options(foreign), None)

    app = f.FedrecClient.open(options(os.path.join(DIR, "fresh.store")), None)
    expect(f.FedrecError.NotConnected, app.participate)
    expect(f.FedrecError.NoModel, app.explain, 1)
    # A coordinator whose certificate another CA signed: refused, typed.
    e = expect(f.FedrecError.CoordinatorUnreachable, app.connect, TLS_ENDPOINT,
               f.ConnectConfig(ca_pem=OTHER_CA))
    assert "UnknownIssuer" in str(e), e
    expect(f.FedrecError.InvalidArgument, app.connect, ENDPOINT, f.ConnectConfig(cert_pem="x"))
    app.connect(ENDPOINT, None)
    app.refresh_model()
    app.set_consent(f.Consent.ON_DEVICE)
    expect(f.FedrecError.InvalidArgument, app.recommend, -1)
    expect(f.FedrecError.InvalidArgument, app.explain, ITEMS + 1000)
    expect(f.FedrecError.InvalidArgument, app.record, f.Purchase(item=ITEMS, time=NOW, quantity=1.0))
    expect(f.FedrecError.InvalidArgument, app.record, f.Purchase(item=1, time=NOW, quantity=-1.0))
    expect(f.FedrecError.InvalidArgument, app.exclude, f.Exclusion.TAG(tag="no spaces allowed"))
    expect(f.FedrecError.InvalidArgument, app.set_diversity, 2.0)
    expect(f.FedrecError.InvalidArgument, app.exclude, f.Exclusion.PURCHASE(item=1, time=NOW))
    assert app.recommend(0).discover == []


path = story()
bad_input(path)
print("story: ok")

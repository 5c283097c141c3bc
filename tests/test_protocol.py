"""One status table for server and client: the server answers each error name with protocol's status, the
client reads that status back as the matching typed error."""

from sglang_microturn import protocol
from sglang_microturn.client import microturn_client as client


def test_every_name_has_a_client_error_with_its_status():
    by_name = {c.name: c for c in vars(client).values()
               if isinstance(c, type) and issubclass(c, client.MicroTurnHTTPError) and c is not client.MicroTurnHTTPError}
    assert set(by_name) == set(protocol.ERRORS) - {protocol.OVER_CAPACITY}  # a 429 reads back as over_budget
    for name, cls in by_name.items():
        assert cls.status == protocol.status_of(name)
        assert type(client.error_for(cls.status, "m")) is cls


def test_statuses_read_back():
    assert protocol.name_of(429) == protocol.OVER_BUDGET and protocol.status_of(protocol.OVER_CAPACITY) == 429
    assert protocol.name_of(503) == protocol.SERVER_ERROR

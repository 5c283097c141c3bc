"""One status table for server and client: the server answers each error name with protocol's status, the
client reads that status back as the matching typed error."""

from sglang_microturn import protocol
from sglang_microturn.client import microturn_client as client


def test_every_name_has_a_client_error_with_its_status():
    by_name = {c.name: c for c in vars(client).values()
               if isinstance(c, type) and issubclass(c, client.MicroTurnHTTPError) and c is not client.MicroTurnHTTPError}
    # a 429 reads back as over_budget; 413 and 503 get their typed errors in the client rewrite (issue 15, item 4)
    # and read back as ServerError until then
    later = {protocol.PAYLOAD_TOO_LARGE, protocol.TURN_ABORTED}
    assert set(by_name) == set(protocol.ERRORS) - {protocol.OVER_CAPACITY} - later
    assert all(isinstance(client.error_for(protocol.status_of(n), "m"), client.MicroTurnHTTPError) for n in later)
    for name, cls in by_name.items():
        assert cls.status == protocol.status_of(name)
        assert type(client.error_for(cls.status, "m")) is cls


def test_statuses_read_back():
    assert protocol.name_of(429) == protocol.OVER_BUDGET and protocol.status_of(protocol.OVER_CAPACITY) == 429
    assert protocol.name_of(503) == protocol.TURN_ABORTED and protocol.name_of(413) == protocol.PAYLOAD_TOO_LARGE
    assert protocol.name_of(502) == protocol.SERVER_ERROR

"""One status table for server and client: the server answers each error name with protocol's status, the
client reads that status back as the matching typed error."""

from sglang_microturn import protocol
from sglang_microturn.client import errors


def test_every_name_has_a_client_error_with_its_status():
    by_name = {c.name: c for c in vars(errors).values()
               if isinstance(c, type) and issubclass(c, errors.MicroTurnHTTPError) and c is not errors.MicroTurnHTTPError}
    assert set(by_name) == set(protocol.ERRORS) - {protocol.OVER_CAPACITY}  # a 429 reads back as over_budget
    for name, cls in by_name.items():
        assert cls.status == protocol.status_of(name)
        assert type(errors.error_for(cls.status, "m")) is cls


def test_statuses_read_back():
    assert protocol.name_of(429) == protocol.OVER_BUDGET and protocol.status_of(protocol.OVER_CAPACITY) == 429
    assert protocol.name_of(503) == protocol.TURN_ABORTED and protocol.name_of(413) == protocol.PAYLOAD_TOO_LARGE
    assert protocol.name_of(502) == protocol.SERVER_ERROR  # a status the table does not list

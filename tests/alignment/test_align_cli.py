"""`sglang-microturn align` on synthetic records: the reference path (CPU, Triton interpreter), the server path
against a fake SGLang /generate, and the record format's errors."""

import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from types import SimpleNamespace

import pytest
import torch
from sglang_aligned_rig import FAST_TINY_MOE

from microturn_kernels import moe_gemv
from sglang_microturn.cli import main as cli
from sglang_microturn.alignment.record import (
    FORMAT,
    AlignmentRecord,
    GeneratedToken,
    RecordError,
    parse_record,
    record_from_turns,
    write_record,
)
from sglang_microturn.model.checkpoints import preset, write_checkpoint
from sglang_microturn.model.reference_model import load_reference
from sglang_microturn.alignment.aligned_reference import score_aligned

SEQ, FIRST_GENERATED = 30, 12


@pytest.fixture(autouse=True)
def fast_moe(monkeypatch):
    for key, config in FAST_TINY_MOE.items():
        monkeypatch.setitem(moe_gemv._CONFIGS, key, config)


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    return str(write_checkpoint(tmp_path_factory.mktemp("align") / "tiny_shared", preset("tiny", shared_expert_width=24)))


@pytest.fixture(scope="module")
def record(ckpt):
    """A record as an aligned server would write it: its sampled logprobs are the aligned reference's."""
    for key, config in FAST_TINY_MOE.items():  # module scope: the autouse fixture is not active yet
        moe_gemv._CONFIGS[key] = config
    ids = torch.randint(0, 832, (SEQ,), generator=torch.Generator().manual_seed(3))
    lp = score_aligned(load_reference(ckpt, dtype=torch.bfloat16), ids)
    gen = [GeneratedToken(p, int(ids[p]), lp[p - 1].item()) for p in range(FIRST_GENERATED, SEQ)]
    return AlignmentRecord(ids.tolist(), gen, ckpt)


def _tampered(record, index=3, delta=2.0**-20):
    gen = list(record.generated)
    g = gen[index]
    gen[index] = GeneratedToken(g.position, g.token_id, g.logprob + delta)
    return AlignmentRecord(record.sequence, gen, record.model_path)


def test_reference_path_matches_bitwise_and_flags_a_one_ulp_change(record, tmp_path, capsys):
    path = write_record(tmp_path / "r.json", record)
    assert cli.main(["align", str(path), "--device", "cpu", "--json", str(tmp_path / "out.json")]) == 0
    out = capsys.readouterr().out
    assert f"reference: compared {SEQ - FIRST_GENERATED}, mismatched 0, max |diff| 0" in out
    assert json.loads((tmp_path / "out.json").read_text())[0]["mismatched"] == 0
    bad = write_record(tmp_path / "bad.json", _tampered(record))
    assert cli.main(["align", str(bad), "--device", "cpu"]) == 1
    out = capsys.readouterr().out
    assert "mismatched 1," in out and f"'position': {FIRST_GENERATED + 3}" in out


class _FakeSGLang(BaseHTTPRequestHandler):
    """Answers /generate like SGLang with return_logprob and logprob_start_len 0, from the record."""

    record: AlignmentRecord

    def do_POST(self):
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        assert self.path == "/generate" and body["logprob_start_len"] == 0 and body["return_logprob"]
        lps = {g.position: g.logprob for g in self.record.generated}
        entries = [[None if p == 0 else lps.get(p, -1.0), t, None] for p, t in enumerate(body["input_ids"])]
        data = json.dumps({"meta_info": {"input_token_logprobs": entries}}).encode()
        self.send_response(200)
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, *args):
        pass


@pytest.fixture
def fake_server(record):
    handler = type("Handler", (_FakeSGLang,), {"record": _tampered(record, index=0, delta=0.5)})
    server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()


def test_server_path_reports_mismatches_per_path(record, fake_server, tmp_path, capsys):
    path = write_record(tmp_path / "r.json", record)
    assert cli.main(["align", str(path), "--url", fake_server, "--no-reference"]) == 1
    out = capsys.readouterr().out
    assert f"server: compared {SEQ - FIRST_GENERATED}, mismatched 1, max |diff| 0.5" in out


def test_unreachable_server_and_nothing_to_compare(record, tmp_path, capsys):
    path = write_record(tmp_path / "r.json", AlignmentRecord(record.sequence, record.generated))
    assert cli.main(["align", str(path)]) == 2
    assert "nothing to compare" in capsys.readouterr().err
    assert cli.main(["align", str(path), "--url", "http://127.0.0.1:9"]) == 1
    assert "cannot reach http://127.0.0.1:9" in capsys.readouterr().err


def _good():
    return {"format": FORMAT, "sequence": [1, 5, 7, 9], "generated": [{"position": 2, "token_id": 7, "logprob": -0.5}]}


@pytest.mark.parametrize("change,match", [
    ({"format": "v0"}, "format = 'v0'; expected"),
    ({"sequence": [1]}, "at least 2 token ids"),
    ({"sequence": [1, -5, 7, 9]}, r"sequence\[1\] = -5"),
    ({"generated": []}, "return_logprob=true"),
    ({"generated": [{"position": 4, "token_id": 7, "logprob": -0.5}]}, r"position = 4 is outside 1 \.\. 3"),
    ({"generated": [{"position": 2, "token_id": 8, "logprob": -0.5}]}, r"token_id 8 but sequence\[2\] = 7"),
    ({"generated": [{"position": 2, "token_id": 7, "logprob": None}]}, "expected a finite number"),
    ({"generated": [{"position": 2, "token_id": 7}]}, "exactly the keys position, token_id, logprob"),
    ({"generated": [{"position": 2, "token_id": 7, "logprob": -1}] * 2}, "appears twice"),
])
def test_record_errors_name_the_field(change, match):
    parse_record(_good())
    with pytest.raises(RecordError, match=match):
        parse_record({**_good(), **change})


def test_bad_record_file_exits_2(tmp_path, capsys):
    (tmp_path / "x.json").write_text("{not json")
    assert cli.main(["align", str(tmp_path / "x.json")]) == 2
    err = capsys.readouterr().err
    assert "bad record:" in err and "is not JSON" in err


def test_record_from_client_turns():
    def turn(i, inp, out, lps, committed):
        return SimpleNamespace(index=i, input_ids=inp, output_ids=out, output_logprobs=lps, committed_length=committed)

    rec = record_from_turns([turn(0, [1, 2], [3, 4], [-0.1, -0.2], 4), turn(1, [5], [], [], 5),
                             turn(2, [6], [7], [-0.3], 7)])
    assert rec.sequence == [1, 2, 3, 4, 5, 6, 7]
    assert [(g.position, g.token_id, g.logprob) for g in rec.generated] == [(2, 3, -0.1), (3, 4, -0.2), (6, 7, -0.3)]
    with pytest.raises(RecordError, match="committed 9 tokens but the turns add up to 4"):
        record_from_turns([turn(0, [1, 2], [3, 4], [-0.1, -0.2], 9)])
    with pytest.raises(RecordError, match="append with return_logprob=True"):
        record_from_turns([turn(0, [1, 2], [3], None, 3)])

"""SGLang's MicroTurnForCausalLM in alignment mode (its own `forward`, through RadixAttention) gives bitwise
the reference's aligned-mode logprobs on the tiny preset with a shared expert, one-shot and in micro-turn
chunks, and so does its decoder stack alone (what SGLang's prefill CUDA graphs capture). CPU, Triton
interpreter; tests/rigs/sglang_aligned_rig.py."""

import json
import os
import subprocess
import sys

import pytest

from sglang_microturn.model.checkpoints import preset, write_checkpoint
from sglang_microturn.cli.server_process import free_port

RIG = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "rigs", "sglang_aligned_rig.py")


@pytest.fixture(scope="module")
def rig(tmp_path_factory):
    ckpt = write_checkpoint(tmp_path_factory.mktemp("sgl") / "tiny_shared", preset("tiny", shared_expert_width=24))
    env = {**os.environ, "MICROTURN_ALIGNMENT": "1", "TRITON_INTERPRET": "1",
           "PYTHONPATH": os.pathsep.join(sys.path)}
    proc = subprocess.run([sys.executable, RIG, str(ckpt), str(free_port())], capture_output=True, text=True,
                          timeout=600, env=env)
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("RIG ")]
    assert proc.returncode == 0 and lines, proc.stderr[-3000:]
    return json.loads(lines[-1][4:])


def test_alignment_switch_reaches_the_model(rig):
    assert rig["alignment"] and rig["logits_processor"] == "AlignedLogitsProcessor"
    assert rig["attention_calls"] == [2 * 1, 2 * 4]  # layers x forwards: attention went through RadixAttention


@pytest.mark.parametrize("path", ["one_shot", "chunked", "decoder_stack"])
def test_sglang_model_equals_reference_bitwise(rig, path):
    assert rig[path]["bitwise_equal_reference"], rig[path]

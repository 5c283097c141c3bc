"""SGLang's MicroTurnForCausalLM on CPU: registration, weight loading, MoE block math (the attention path
needs a GPU: benchmarks/model_alignment_check.py)."""

import json
import os
import subprocess
import sys

import pytest

from sglang_microturn.model.checkpoints import preset, write_checkpoint
from sglang_microturn.cli.server_process import free_port

RIG = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "rigs", "sglang_model_rig.py")



@pytest.fixture(scope="module")
def rig(tmp_path_factory):
    ckpt = write_checkpoint(tmp_path_factory.mktemp("sgl") / "tiny_shared", preset("tiny", shared_expert_width=24))
    proc = subprocess.run([sys.executable, RIG, str(ckpt), str(free_port())], capture_output=True, text=True,
                          timeout=300)
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("RIG ")]
    assert proc.returncode == 0 and lines, proc.stderr[-3000:]
    return json.loads(lines[-1][4:])


def test_install_registers_the_architecture(rig):
    assert rig["install"] == "model MicroTurnForCausalLM" and rig["resolved"] == "MicroTurnForCausalLM"


def test_load_weights_fills_every_parameter_from_the_checkpoint(rig):
    assert rig["block_class"] == "MicroTurnSparseMoeBlock"
    assert rig["param_mismatches"] == [] and rig["w13_equals_reference"]


def test_moe_block_matches_reference(rig):
    assert rig["shared_expert_share"] > 0.1  # the shared expert matters, so dropping it would show
    assert rig["moe_block_max_abs_diff"] < 1e-4


def test_checkpoint_missing_a_tensor_is_refused(rig):
    msg = rig["mismatch_error"]
    assert msg and "parameters no tensor fills ['model.layers.0.mlp.shared_expert.down_proj.weight'" in msg

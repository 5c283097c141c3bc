"""Run a test scenario against SGLang 0.5.17 as shipped, i.e. without our patches, in a subprocess.

The pristine text of every patched module is rebuilt by reverse-applying our applied patches in memory and
executed under the module's own name before anything imports it, so the scenario runs the real upstream code
paths. Used to prove that a patch's test fails without the patch.
"""

import json
import os
import subprocess
import sys
import textwrap

from sglang_microturn.patchset import patching
_RUNNER = textwrap.dedent(
    """
    import importlib, json, sys, types
    from sglang_microturn.patchset import patching
    target = patching.installed_sglang()
    patches = patching.load_patches()
    for rel in sorted({{fp.path for p in patches for fp in p.files}}):
        name = rel[: -len(".py")].replace("/", ".")
        module = types.ModuleType(name)
        module.__file__ = str(target.root / rel)
        module.__package__ = name.rpartition(".")[0]
        sys.modules[name] = module  # before exec: dataclasses look their module up in sys.modules
        exec(compile(patching.pristine_source(rel, target, patches), module.__file__, "exec"), module.__dict__)
    from sglang.srt.runtime_context import get_context, get_parallel
    get_context().override_server_args(enable_streaming_session=True).install()
    with get_parallel().override(tp_rank=0):
        scenario = getattr(importlib.import_module({module!r}), {func!r})
        print("RESULT " + json.dumps(scenario(**{kwargs!r})))
    """
)


def run_on_pristine_sglang(module: str, func: str, **kwargs) -> dict:
    """`module.func(**kwargs)` (a scenario in tests/ returning a JSON-able dict) on unpatched SGLang."""
    code = _RUNNER.format(module=module, func=func, kwargs=kwargs)
    # The scenario's test module, the rigs and the package resolve as they do in this (pytest's) process.
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([*sys.path, os.environ.get("PYTHONPATH", "")]))
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300)
    lines = [line for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
    assert proc.returncode == 0 and lines, proc.stderr[-3000:]
    return json.loads(lines[0][len("RESULT ") :])

"""The rooms' import rules, read from the source (ast, no imports run): what format/, client/, model/ and
alignment/ may reach, following the package's own imports transitively, including imports inside functions.

  format/, client/, model/, alignment/  never reach sglang_microturn.server or SGLang (trainers and clients run
                                        without SGLang)
  client/                               reaches only the stdlib, our own modules and aiohttp (a runtime
                                        dependency in pyproject.toml): no torch, no numpy
  protocol.py, config.py                stdlib only
"""

import ast
import sys
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "sglang_microturn"


def _module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {_module_name(p): p for p in PACKAGE.rglob("*.py")}


def _imports(module: str) -> set[str]:
    """Every module `module` imports anywhere in its body; `from pkg import name` counts pkg.name when that is
    a module of ours, else pkg."""
    path = MODULES[module]
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom):
            if node.level:  # relative: resolve against this module's package
                base = module.split(".")
                base = base[: len(base) - node.level + (path.name == "__init__.py")]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module
            subs = {f"{target}.{alias.name}" for alias in node.names} & MODULES.keys()
            found |= subs or {target}
    return found


def _reach(module: str) -> dict[str, str]:
    """Every module reachable from `module` through our own modules: {imported name: the module of ours
    that imports it}."""
    seen, todo, out = {module}, [module], {}
    while todo:
        current = todo.pop()
        for name in _imports(current):
            out.setdefault(name, current)
            parents = [".".join(name.split(".")[:i]) for i in range(1, name.count(".") + 2)]
            for ours in (p for p in parents if p in MODULES and p not in seen):
                seen.add(ours)
                todo.append(ours)
    return out


def _room(room: str) -> list[str]:
    return sorted(m for m in MODULES if m == f"sglang_microturn.{room}" or m.startswith(f"sglang_microturn.{room}."))


def _violations(module: str, forbidden: tuple[str, ...]) -> list[str]:
    return [f"{module} reaches {name} (imported by {by})" for name, by in sorted(_reach(module).items())
            if any(name == f or name.startswith(f + ".") for f in forbidden)]


NO_SGLANG = ("sglang", "sglang_microturn.server")


@pytest.mark.parametrize("room", ["format", "client", "model", "alignment"])
def test_rooms_without_sglang_never_reach_the_server_or_sglang(room):
    modules = _room(room)
    assert modules, f"no modules under sglang_microturn/{room}/"
    assert [v for m in modules for v in _violations(m, NO_SGLANG)] == []


def test_the_client_never_reaches_torch():
    assert [v for m in _room("client") for v in _violations(m, NO_SGLANG + ("torch", "numpy", "microturn_kernels"))] == []


def test_the_client_needs_only_aiohttp_and_websockets_outside_the_stdlib():
    """What the client reaches outside the stdlib and our package is declared in pyproject's runtime
    dependencies: `pip install sglang-microturn` is enough to use it."""
    import tomllib

    outside = {name.split(".")[0] for m in _room("client") for name in _reach(m)
               if name.split(".")[0] not in sys.stdlib_module_names and not name.startswith("sglang_microturn")}
    assert outside == {"aiohttp", "websockets"}
    declared = tomllib.loads((PACKAGE.parent / "pyproject.toml").read_text())["project"]["dependencies"]
    names = {d.split(">")[0].split("=")[0].split("<")[0].strip() for d in declared}
    assert outside <= names, declared


@pytest.mark.parametrize("module", ["sglang_microturn.protocol", "sglang_microturn.config"])
def test_protocol_and_config_are_stdlib_only(module):
    outside = {name for name in _imports(module) if name.split(".")[0] not in sys.stdlib_module_names}
    assert outside <= {"__future__"}, outside


def test_the_rule_sees_a_crossing(tmp_path, monkeypatch):
    """The checker itself: a module of a room importing the server, inside a function, is reported."""
    fake = PACKAGE / "format" / "layout.py"
    text = fake.read_text() + "\n\ndef _late():\n    from sglang_microturn.server import routes  # noqa\n"
    monkeypatch.setattr(Path, "read_text", lambda self, *a, **k: text if self == fake else Path.open(self).read())
    assert any("sglang_microturn.server.routes" in v for v in _violations("sglang_microturn.format.layout", NO_SGLANG))

"""The package's import graph: nothing imports upward, and there is no cycle.

Layers, lowest first (ARCHITECTURE.md draws them); a module may import its own layer or lower:

0. pure definitions: the config trees, the typed batches, the math, checkpoint file names
1. models, data, weight-sync planning, reward functions, tiny models
2. engine backends (DeepSpeed, vLLM)
3. roles: the PPO workers and the supervised trainer (plain classes; Ray shells in workers/actors.py)
4. runtime: what every Ray stage needs (cluster, placement, pending calls, role handles, metrics sink)
5. drivers: the PPO coordinator and the supervised run (with its Ray shells)
6. entry points (python -m ...)

Every ``import`` counts, also the ones inside functions. Read from the source with ``ast``;
nothing is imported.
"""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[2] / "rlhf_ray"

LAYERS: list[tuple[str, ...]] = [
    ("rlhf_ray.config", "rlhf_ray.batch", "rlhf_ray.algorithms", "rlhf_ray.checkpoint_files",
     "rlhf_ray.supervised.config", "rlhf_ray.supervised"),  # (the package's __init__ is a docstring)
    ("rlhf_ray.models", "rlhf_ray.data", "rlhf_ray.weight_sync", "rlhf_ray.rewards", "rlhf_ray.reward_calls",
     "rlhf_ray.reward_server",
     "rlhf_ray.tiny_models", "rlhf_ray.supervised.data", "rlhf_ray.envs"),
    ("rlhf_ray.backends",),
    ("rlhf_ray.workers", "rlhf_ray.supervised.trainer"),
    ("rlhf_ray.runtime",),
    ("rlhf_ray.coordinator", "rlhf_ray.supervised.run", "rlhf_ray.supervised.actors"),
    ("rlhf_ray.launch", "rlhf_ray.train_sft", "rlhf_ray.train_rm", "rlhf_ray.pipeline", "rlhf_ray.export"),
]


def modules() -> dict[str, Path]:
    out = {}
    for path in PACKAGE.rglob("*.py"):
        parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        out[name] = path
    return out


def layer_of(module: str) -> int | None:
    best = None
    for i, prefixes in enumerate(LAYERS):
        for prefix in prefixes:
            if module == prefix or module.startswith(prefix + "."):
                if best is None or len(prefix) > best[1]:
                    best = (i, len(prefix))
    return best[0] if best else None


def imports_of(module: str, path: Path, known: set[str]) -> set[str]:
    """The package modules ``module`` imports (``from a import b`` counts as a.b when that is a module)."""
    is_package = path.name == "__init__.py"
    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # relative: from .x import y
                anchor = module.split(".") if is_package else module.split(".")[:-1]
                anchor = anchor[: len(anchor) - (node.level - 1)]
                base = ".".join(anchor + ([base] if base else []))
            names = [f"{base}.{a.name}" if f"{base}.{a.name}" in known else base for a in node.names]
        else:
            continue
        out |= {n for n in names if n in known and n != module}
    return out


def graph() -> dict[str, set[str]]:
    mods = modules()
    known = set(mods)
    return {m: imports_of(m, p, known) for m, p in mods.items()}


def upward_edges(g: dict[str, set[str]]) -> list[str]:
    return sorted(f"{m} (layer {layer_of(m)}) imports {t} (layer {layer_of(t)})"
                  for m, targets in g.items() if m != "rlhf_ray"
                  for t in targets if t != "rlhf_ray" and layer_of(t) > layer_of(m))


def cycles(g: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan's algorithm)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(g.get(v, ())):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                found.append(sorted(comp))

    for v in sorted(g):
        if v not in index:
            visit(v)
    return found


def test_every_module_has_a_layer():
    unplaced = sorted(m for m in modules() if m != "rlhf_ray" and layer_of(m) is None)
    assert not unplaced, f"add these modules to a layer in LAYERS: {unplaced}"


def test_nothing_imports_upward():
    assert not upward_edges(graph()), "\n".join(upward_edges(graph()))


def test_no_import_cycles():
    assert not cycles(graph())


def ppo_driver_imports(g: dict[str, set[str]]) -> list[str]:
    """Edges from a supervised stage into the PPO driver: the stages share the runtime with PPO,
    not the driver (each stands beside PPO; the pipeline, an entry point, chains them)."""
    return sorted(f"{m} imports {t}" for m, targets in g.items() if m.startswith("rlhf_ray.supervised")
                  for t in targets if t == "rlhf_ray.coordinator" or t.startswith("rlhf_ray.coordinator."))


def test_the_supervised_stages_use_the_runtime_not_the_ppo_driver():
    g = graph()
    assert not ppo_driver_imports(g), "\n".join(ppo_driver_imports(g))
    assert "rlhf_ray.runtime.pending" in g["rlhf_ray.supervised.run"]  # imports are read
    bad = {**g, "rlhf_ray.supervised.run": g["rlhf_ray.supervised.run"] | {"rlhf_ray.coordinator.loop"}}
    assert ppo_driver_imports(bad) == ["rlhf_ray.supervised.run imports rlhf_ray.coordinator.loop"]


def test_the_checks_find_an_upward_edge_and_a_cycle():
    real = graph()
    assert "rlhf_ray.batch" in real["rlhf_ray.workers.learner"]  # imports are read
    bad = {**real, "rlhf_ray.workers.learner": real["rlhf_ray.workers.learner"] | {"rlhf_ray.coordinator.loop"}}
    assert upward_edges(bad) == ["rlhf_ray.workers.learner (layer 3) imports rlhf_ray.coordinator.loop (layer 5)"]
    plumbing = {**real, "rlhf_ray.runtime.groups": real["rlhf_ray.runtime.groups"] | {"rlhf_ray.coordinator.loop"}}
    assert upward_edges(plumbing) == [
        "rlhf_ray.runtime.groups (layer 4) imports rlhf_ray.coordinator.loop (layer 5)"]
    loop = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}
    assert cycles(loop) == [["a", "b", "c"]]


# --------------------------------------------------------------------------- the seams

# A framework's own API is imported in its backend's file only: the roles and drivers talk to a
# training engine through ``rlhf_ray.backends.engine.TrainEngine`` and to a rollout engine through
# ``rlhf_ray.backends.rollout.RolloutBackend``, never to DeepSpeed, FSDP or vLLM themselves.
FRAMEWORK_HOMES = {
    "deepspeed": {"rlhf_ray.backends.deepspeed"},
    "torch.distributed.fsdp": {"rlhf_ray.backends.fsdp2"},
    "torch.distributed.checkpoint": {"rlhf_ray.backends.fsdp2"},
    "vllm": {"rlhf_ray.backends.vllm"},
}


def framework_imports(path: Path) -> set[str]:
    """Every imported module name of ``path`` (absolute imports; inside functions too)."""
    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            out |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom) and not node.level and node.module:
            out |= {node.module} | {f"{node.module}.{a.name}" for a in node.names}
    return out


def framework_leaks(mods: dict[str, Path]) -> list[str]:
    leaks = []
    for module, path in mods.items():
        for name in framework_imports(path):
            for framework, homes in FRAMEWORK_HOMES.items():
                if (name == framework or name.startswith(framework + ".")) and module not in homes:
                    leaks.append(f"{module} imports {name} (only {sorted(homes)} may)")
    return sorted(set(leaks))


def test_frameworks_are_imported_only_in_their_backend():
    assert not framework_leaks(modules()), "\n".join(framework_leaks(modules()))


def test_the_framework_check_finds_a_leak(tmp_path):
    leaky = tmp_path / "leaky.py"
    leaky.write_text("def setup():\n    import deepspeed.zero\n    from torch.distributed.fsdp import fully_shard\n")
    assert framework_leaks({"rlhf_ray.workers.leaky": leaky}) == [
        "rlhf_ray.workers.leaky imports deepspeed.zero (only ['rlhf_ray.backends.deepspeed'] may)",
        "rlhf_ray.workers.leaky imports torch.distributed.fsdp (only ['rlhf_ray.backends.fsdp2'] may)",
        "rlhf_ray.workers.leaky imports torch.distributed.fsdp.fully_shard (only ['rlhf_ray.backends.fsdp2'] may)",
    ]

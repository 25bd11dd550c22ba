"""The role classes and the coordinator's loop import without Ray or vLLM installed.

A GPU machine may have torch, transformers and DeepSpeed but neither Ray nor vLLM; the
learner's logic (and the GPU tests that drive it in-process) must still import there. A
fresh interpreter refuses ``ray`` and ``vllm`` with an import hook, then imports the modules
and collects the unit and GPU test folders.
"""

import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[2]

BLOCKER = textwrap.dedent(
    """
    import sys

    class Blocker:
        def find_spec(self, name, path=None, target=None):
            if name.split(".")[0] in ("ray", "vllm"):
                raise ImportError("blocked by test_roles_without_ray: " + name)
            return None

    sys.meta_path.insert(0, Blocker())
    """
)

MODULES = ("rlhf_ray.workers.learner", "rlhf_ray.workers.frozen", "rlhf_ray.workers.rollout",
           "rlhf_ray.supervised.trainer", "rlhf_ray.coordinator.loop", "rlhf_ray.backends.deepspeed")


ROLE_MODULES = f"""
    import importlib
    for name in {MODULES!r}:
        importlib.import_module(name)
    leaked = sorted(m for m in sys.modules if m.split(".")[0] in ("ray", "vllm"))
    assert not leaked, leaked
    print("OK")
    """
RAY_SHELLS = "import rlhf_ray.workers.actors\n"
COLLECT = """
    import pytest
    code = pytest.main(["--collect-only", "-q", "-p", "no:cacheprovider", "tests/unit", "tests/gpu"])
    sys.exit(int(code))
    """


@pytest.fixture(scope="module")
def children():
    """The three fresh interpreters of this file, started together: each spends seconds importing
    torch and transformers, and none waits for another."""
    started = {name: subprocess.Popen([sys.executable, "-c", BLOCKER + textwrap.dedent(code)], cwd=REPO_ROOT,
                                      stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
               for name, code in (("roles", ROLE_MODULES), ("shells", RAY_SHELLS), ("collect", COLLECT))}
    yield started
    for proc in started.values():
        if proc.poll() is None:
            proc.kill()
            proc.communicate()


def _result(children, name: str) -> subprocess.CompletedProcess:
    proc = children[name]
    out, err = proc.communicate(timeout=300)
    return subprocess.CompletedProcess(proc.args, proc.returncode, out, err)


def test_role_modules_import_without_ray_or_vllm(children):
    result = _result(children, "roles")
    assert result.returncode == 0 and result.stdout.strip().endswith("OK"), result.stderr[-3000:]


def test_the_ray_shells_do_need_ray(children):
    # The blocker really blocks: the module that wraps the roles for Ray fails to import.
    result = _result(children, "shells")
    assert result.returncode != 0
    assert "blocked by test_roles_without_ray: ray" in result.stderr


def test_unit_and_gpu_tests_collect_without_ray_or_vllm(children):
    result = _result(children, "collect")
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert "error" not in result.stdout.lower().split("collected")[-1], result.stdout[-3000:]

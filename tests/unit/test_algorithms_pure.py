"""``rlhf_ray.algorithms`` imports only the standard library and torch.

A fresh interpreter installs an import hook that refuses the heavy runtime
packages, checks that the hook really refuses them, then imports the package.
A subprocess keeps this test free of ``sys.modules`` surgery in the test run.
"""

import subprocess
import sys
import textwrap
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[2]
BLOCKED = ("ray", "vllm", "deepspeed", "transformers")

CHILD = textwrap.dedent(
    """
    import importlib
    import sys

    BLOCKED = {blocked!r}


    class Blocker:
        def find_spec(self, name, path=None, target=None):
            if name.split(".")[0] in BLOCKED:
                raise ImportError("blocked by test_algorithms_pure: " + name)
            return None


    sys.meta_path.insert(0, Blocker())

    for name in BLOCKED:
        try:
            importlib.import_module(name)
        except ImportError as err:
            assert "blocked by test_algorithms_pure" in str(err), err
        else:
            raise SystemExit("blocker failed to block " + name)

    import rlhf_ray.algorithms as algorithms

    missing = [n for n in algorithms.__all__ if not hasattr(algorithms, n)]
    assert not missing, missing
    leaked = sorted(m for m in sys.modules if m.split(".")[0] in BLOCKED)
    assert not leaked, leaked
    print("OK", len(algorithms.__all__))
    """
).format(blocked=BLOCKED)


def test_algorithms_import_without_heavy_dependencies():
    result = subprocess.run(
        [sys.executable, "-c", CHILD],
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr + result.stdout
    assert result.stdout.startswith("OK "), result.stdout
    assert int(result.stdout.split()[1]) >= 20


def test_blocker_catches_a_violation():
    # Submodules of a blocked package are refused too, with the hook's message.
    child = CHILD.split("for name in BLOCKED:")[0] + "import ray.util\n"
    result = subprocess.run(
        [sys.executable, "-c", child], cwd=REPO_ROOT, capture_output=True, text=True, timeout=60
    )
    assert result.returncode != 0
    assert "blocked by test_algorithms_pure: ray" in result.stderr

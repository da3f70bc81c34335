"""The chain on a multi-node Ray cluster: three raylets on this machine, training workers on two nodes.

`ray.cluster_utils.Cluster` starts a head (no CPUs: it only hosts the driver, the Ray Train
controller and the dashboard) and two worker nodes of one CPU each, labelled with a custom
`worker_node` resource. The chain asks every training worker for `{CPU: 1, worker_node: 1}`
(`scaling.resources_per_worker`), so the two workers of each task's fit() must land on different
nodes and all-reduce across them; evaluation and export run as one-node Ray tasks.

Where the workers really ran is read back from Ray's state API: every `RayTrainWorker` actor with
its node and its fit's placement group.
"""

from __future__ import annotations

import json
import math
import shutil
import tempfile
from collections import defaultdict
from pathlib import Path

import pytest
from conftest import free_port
from test_chain import write_config

from pipeline.config import ConfigError, load_config

pytestmark = pytest.mark.integration

OBJECT_STORE = 100 * 1024 * 1024  # per node; the object store lives in /dev/shm



@pytest.fixture
def cluster(request, monkeypatch):
    """A head with 0 CPUs + worker nodes of 1 CPU (2 unless parametrized), all on 127.0.0.1; shut down by a finalizer."""
    import ray
    from ray._private import ray_constants
    from ray.cluster_utils import Cluster

    ray.shutdown()  # a Ray left initialized by an earlier test would make run_chain skip ray.init(address=...)
    # set before the raylets start: they, and the workers they spawn, inherit the environment
    monkeypatch.setenv("RAY_AUTH_MODE", "disabled")
    monkeypatch.setenv("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")  # every Ray service on loopback
    monkeypatch.setattr(ray_constants, "ENABLE_RAY_CLUSTER", False)  # the same for this process (read at import)
    monkeypatch.setenv("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.5")
    monkeypatch.setenv("TOKENIZERS_PARALLELISM", "false")
    temp_dir = tempfile.mkdtemp(prefix="raymn-", dir="/tmp")  # short: Ray's socket paths must stay < 108 chars

    started: list[Cluster] = []

    def shut_down() -> None:
        ray.shutdown()
        for c in started:
            c.shutdown()
        shutil.rmtree(temp_dir, ignore_errors=True)

    request.addfinalizer(shut_down)
    head = Cluster(
        initialize_head=True,
        head_node_args={
            "num_cpus": 0, "object_store_memory": OBJECT_STORE, "temp_dir": temp_dir,
            "include_dashboard": True, "dashboard_host": "127.0.0.1", "dashboard_port": free_port(),  # the state API
        },
    )
    started.append(head)
    count = getattr(request, "param", 2)  # worker nodes; parametrize the fixture indirectly for more
    workers = [head.add_node(num_cpus=1, resources={"worker_node": 1}, object_store_memory=OBJECT_STORE) for _ in range(count)]
    head.wait_for_nodes()
    return head, workers


def test_the_chain_trains_across_two_nodes(cluster, tmp_path):
    from ray.util.state import list_actors

    from pipeline.chain import run_chain

    head, worker_nodes = cluster
    worker_node_ids = [node.node_id for node in worker_nodes]
    path = write_config(tmp_path, "multinode")
    config = load_config(path, [f"ray.address={head.address}", "scaling.resources_per_worker={worker_node: 1}"])
    assert config.scaling.worker_resources() == {"CPU": 1.0, "worker_node": 1.0}

    result = run_chain(config, path)

    # the same manifest as on one node: zero-shot row, one row per task, an exported adapter
    manifest = json.loads((result.run_dir / "manifest.json").read_text())
    names = ["amazon", "bbc", "yahoo"]
    assert [t["name"] for t in manifest["tasks"]] == names
    assert set(manifest["zero_shot"]["test"]) == set(names)
    for index, record in enumerate(manifest["tasks"]):
        assert list(record["test"]) == names[: index + 1] and list(record["validation"]) == names[: index + 1]
        assert all(0.0 <= score <= 1.0 for score in record["test"].values())
        assert record["losses"]
        assert Path(record["state_dir"]).is_dir()
    # zero-shot row + one row per task; a row scores the tasks seen so far (NaN beyond)
    assert len(result.matrix) == 4 and all(len(row) == 3 for row in result.matrix)
    assert [sum(not math.isnan(x) for x in row) for row in result.matrix] == [3, 1, 2, 3]
    adapter = Path(manifest["adapter_dir"])
    assert (adapter / "adapter_config.json").is_file() and (adapter / "adapter_model.safetensors").is_file()

    # where the training workers ran: one placement group for the chain's one fit(), its two workers on the two worker nodes
    actors = list_actors(address=head.address, filters=[("class_name", "=", "RayTrainWorker")], detail=True, limit=1000)
    fits: dict[str, list[str]] = defaultdict(list)
    for actor in actors:
        fits[actor.placement_group_id].append(actor.node_id)
    assert len(fits) == 1, {pg: nodes for pg, nodes in fits.items()}  # no restarts: one worker group for every task
    for nodes in fits.values():
        assert sorted(nodes) == sorted(worker_node_ids), "the two workers of a fit() did not run on the two worker nodes"


@pytest.mark.parametrize(("value", "message"), [
    ("{worker_node: 0}", "expected an amount > 0"),
    ("{worker_node: -1}", "expected an amount > 0"),
    ("{CPU: 2}", "set CPUs with cpus_per_worker"),
    ("{GPU: 1}", "GPUs with use_gpu"),
])
def test_custom_worker_resources_are_validated(tmp_path, value, message):
    path = write_config(tmp_path, "bad-resources")
    with pytest.raises(ConfigError, match=message) as error:
        load_config(path, [f"scaling.resources_per_worker={value}"])
    assert "scaling.resources_per_worker" in str(error.value)


@pytest.mark.parametrize("cluster", [3], indirect=True)
def test_a_node_lost_mid_task_the_chain_continues_on_the_remaining_nodes(cluster, tmp_path):
    """Three one-CPU worker nodes for two training workers: removing a node that runs one of them
    mid-task makes Ray Train restart the group on the two left, from the task's last checkpoint."""
    from ray.util.state import list_actors
    from test_worker_failure import assert_resumed_and_complete, long_task_config, run_chain_with_fault

    head, worker_nodes = cluster
    cli_args, config = long_task_config(tmp_path, "node-loss", [f"ray.address={head.address}", "scaling.resources_per_worker={worker_node: 1}"])
    removed: list[str] = []

    def training_workers() -> list:
        return list_actors(address=head.address, filters=[("class_name", "=", "RayTrainWorker"), ("state", "=", "ALIVE")], detail=True, limit=1000)

    def remove_a_training_node() -> bool:
        busy = {actor.node_id for actor in training_workers()}
        victim = next((node for node in worker_nodes if node.node_id in busy), None)
        if victim is not None:
            head.remove_node(victim)
            removed.append(victim.node_id)
        return victim is not None

    run_chain_with_fault(cli_args, config, remove_a_training_node)  # the chain's driver joins this cluster
    assert_resumed_and_complete(config)
    assert all(actor.node_id != removed[0] for actor in training_workers())  # nothing runs on the lost node

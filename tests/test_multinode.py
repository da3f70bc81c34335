"""The chain on a multi-node Ray cluster: four raylets on this machine, training workers on two nodes.

`ray.cluster_utils.Cluster` starts a head (one CPU, for the chain's Ray Data ingest; it also hosts the
driver, the Ray Train controller and the dashboard) and three worker nodes of one CPU each, labelled with a custom
`worker_node` resource. The chain asks every training worker for `{CPU: 1, worker_node: 1}`
(`scaling.resources_per_worker`), so the two workers of the chain's worker group land on different
nodes and all-reduce across them, and a lost node leaves room for the restarted group.

Where the workers really ran is read back from Ray's state API: every `RayTrainWorker` actor with
its node and its worker group's placement group.
"""

from __future__ import annotations

import shutil
import tempfile
from collections import defaultdict

import pytest
from conftest import free_port
from test_chain import write_config

from pipeline.config import ConfigError, load_config

pytestmark = pytest.mark.integration

OBJECT_STORE = 100 * 1024 * 1024  # per node; the object store lives in /dev/shm



@pytest.fixture
def cluster(request, monkeypatch):
    """A head with 1 CPU (ingest) + 3 worker nodes of 1 CPU, all on 127.0.0.1; shut down by a finalizer."""
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
            # the chain's ingest CPU (scaling.ingest_cpus): on the head, which no training worker can take
            "num_cpus": 1, "object_store_memory": OBJECT_STORE, "temp_dir": temp_dir,
            "include_dashboard": True, "dashboard_host": "127.0.0.1", "dashboard_port": free_port(),  # the state API
        },
    )
    started.append(head)
    workers = [head.add_node(num_cpus=1, resources={"worker_node": 1}, object_store_memory=OBJECT_STORE) for _ in range(3)]
    head.wait_for_nodes()
    return head, workers


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


def test_the_chain_trains_across_nodes_and_continues_on_the_remaining_ones_when_a_node_is_lost_mid_task(cluster, tmp_path):
    """Three one-CPU worker nodes for two training workers: the two run on two nodes (one each, as their
    `worker_node` resource demands) and all-reduce across them; removing a node that runs one of them
    mid-task makes Ray Train restart the group on the two left, from the task's last checkpoint."""
    from ray.util.state import list_actors
    from test_worker_failure import assert_resumed_and_complete, long_task_config, run_chain_with_fault

    head, worker_nodes = cluster
    cli_args, config = long_task_config(tmp_path, "node-loss", [f"ray.address={head.address}", "scaling.resources_per_worker={worker_node: 1}"])
    assert config.scaling.worker_resources() == {"CPU": 1.0, "worker_node": 1.0}
    removed: list[str] = []

    def training_workers(alive_only: bool = False) -> list:
        filters = [("class_name", "=", "RayTrainWorker")] + ([("state", "=", "ALIVE")] if alive_only else [])
        return list_actors(address=head.address, filters=filters, detail=True, limit=1000)

    def remove_a_training_node() -> bool:
        busy = {actor.node_id for actor in training_workers(alive_only=True)}
        victim = next((node for node in worker_nodes if node.node_id in busy), None)
        if victim is not None:
            head.remove_node(victim)
            removed.append(victim.node_id)
        return victim is not None

    run_chain_with_fault(cli_args, config, remove_a_training_node)  # the chain's driver joins this cluster
    assert_resumed_and_complete(config)
    # where the training workers ran, per worker group (its placement group): the first group's two workers on two
    # worker nodes, the lost one among them; the restarted group's on the two left. Nothing on the head.
    groups: dict[str, set[str]] = defaultdict(set)
    for actor in training_workers():
        groups[actor.placement_group_id].add(actor.node_id)
    assert len(groups) == 2, groups
    [first] = [nodes for nodes in groups.values() if removed[0] in nodes]
    [restarted] = [nodes for nodes in groups.values() if removed[0] not in nodes]
    worker_node_ids = {node.node_id for node in worker_nodes}
    assert len(first) == len(restarted) == 2 and first | restarted <= worker_node_ids, groups

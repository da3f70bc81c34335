"""Set-up that every worker process of the chain's own local Ray runs (Ray's ``worker_process_setup_hook``).

A module of its own so that a worker importing it imports nothing else (no torch, no pipeline).
"""

from __future__ import annotations

import logging
import os

# set by `procl ... --verbose` and passed to the workers: Ray's own routine log lines are shown too
VERBOSE_ENV = "PROCL_VERBOSE"
PLACEMENT_GROUP_CLEANER_LOGGER = "ray.train.v2._internal.execution.controller.placement_group_cleaner"
# Ray Train V2 logs "Reporting training result N: TrainingReport(...)" for every report of every rank, at
# INFO, from a logger named after its file
TRAINING_REPORT_LOGGER_FILE = os.path.join("train", "v2", "_internal", "execution", "context.py")
NO_API_SERVER = "http://127.0.0.1:0"  # port 0 refuses every connection (see `local_worker_env`)


def verbose() -> bool:
    return os.environ.get(VERBOSE_ENV) == "1"


def local_worker_env() -> dict[str, str]:
    """Environment of the workers of a chain's own local Ray: `--verbose`, Ray Data's log level, which Ray Data
    reads when a worker first imports it (setting the level earlier, in `quiet_ray_logs`, would be reset then),
    and the State API's address.

    A local chain starts no dashboard, so nothing serves the State API, which Ray Train's placement-group
    cleaner polls. Without an address Ray looks for a cluster in /tmp/ray/ray_current_cluster, which a
    `ray start` that was killed leaves behind; each poll then hung 40 s on that dead cluster, and every
    fit's end waited 12 s for the cleaner. An address that refuses at once makes each poll fail in ~1 ms.
    """
    log = {VERBOSE_ENV: "1"} if verbose() else {VERBOSE_ENV: "", "RAY_DATA_LOG_LEVEL": "WARNING"}
    return log | {"RAY_API_SERVER_ADDRESS": NO_API_SERVER}


def quiet_ray_logs() -> None:
    """Only warnings and errors from Ray's routine loggers in this process, unless `--verbose`; one logger always.

    Ray Train's placement-group cleaner asks Ray's State API every few seconds whether the training
    controller is still alive. The State API is served by the dashboard, which a local chain does not
    start, so every check failed with a warning ("State API may be temporarily unavailable"), dozens per
    task on the console. Nothing is lost by quieting it: the cleaner cannot work without the dashboard
    anyway, and the chain's own Ray, placement groups included, ends with the driver process.
    """
    import ray

    logging.getLogger(PLACEMENT_GROUP_CLEANER_LOGGER).setLevel(logging.ERROR)
    if not verbose():
        logging.getLogger(os.path.join(os.path.dirname(ray.__file__), TRAINING_REPORT_LOGGER_FILE)).setLevel(logging.WARNING)
        logging.getLogger("ray.data").setLevel(logging.WARNING)  # "Dataset ... execution finished in 0.03 seconds"

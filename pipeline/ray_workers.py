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


def verbose() -> bool:
    return os.environ.get(VERBOSE_ENV) == "1"


def worker_log_env() -> dict[str, str]:
    """Environment of the chain's Ray workers: `--verbose`, and Ray Data's log level, which Ray Data reads when a
    worker first imports it (setting the level earlier, in `quiet_ray_logs`, would be reset then)."""
    return {VERBOSE_ENV: "1"} if verbose() else {VERBOSE_ENV: "", "RAY_DATA_LOG_LEVEL": "WARNING"}


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

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
        # "Error reading with pyarrow.json.read_json(). Falling back to native json.load()": every JSON-list file, and
        # every bad jsonl line before pipeline.sources.diagnose names its file and line
        logging.getLogger("ray.data._internal.datasource.json_datasource").setLevel(logging.ERROR)
        # "Progress bars disabled": the chain's own choice, from every process that runs a dataset (the split coordinators)
        logging.getLogger("ray.data._internal.progress").setLevel(logging.ERROR)


def quiet_ray_data() -> None:
    """This process's Ray Data without progress bars or per-dataset lines (unless `--verbose`), and `quiet_ray_logs`:
    a chain's datasets are small and many (three sampling passes and a tokenisation per task), and their lines would
    drown the chain's own."""
    import ray.data

    data_context = ray.data.DataContext.get_current()
    data_context.enable_progress_bars = False
    data_context.print_on_execution_start = verbose()
    quiet_ray_logs()
    if not verbose():
        # Ray Data's console lines go to its session log only (logs/ray-data): an error it logs with a traceback
        # before raising it (the stream's loader names file and line in one line), "Progress bars disabled"
        from ray.data._internal.logging import SessionFileHandler

        for handler in logging.getLogger("ray.data").handlers:
            if not isinstance(handler, SessionFileHandler):
                handler.setLevel(logging.CRITICAL)


def start_ray(address: str | None, num_cpus: int | None = None) -> None:
    """Join the Ray at `address`, or start a fresh local one for this process's chain (None), once.

    Local: never an unrelated cluster that happens to run on the machine, no dashboard; inside `ray job
    submit`, address "auto" joins the cluster."""
    import signal
    import threading

    import ray

    quiet_ray_data()  # also when joined already: a Tune trial's chain
    if ray.is_initialized():
        return
    # ray.init replaces the driver's SIGTERM handler with a bare sys.exit; the CLI's clean stop must stay
    sigterm = signal.getsignal(signal.SIGTERM) if threading.current_thread() is threading.main_thread() else None
    os.environ.setdefault("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.5")
    if address is None:
        if not verbose():  # "Token authentication is enabled for this Ray cluster": Ray's default for a new local one
            logging.getLogger("ray._private.authentication.authentication_token_setup").setLevel(logging.ERROR)
        # no metrics either: nothing scrapes them without a dashboard, and the metrics agent's series (a new
        # set per task's Ray Data and Ray Train run) grew its memory every task (benchmarks/chain_memory.py)
        ray.init(address="local", num_cpus=num_cpus, include_dashboard=False, log_to_driver=True,
                 logging_level=logging.INFO if verbose() else logging.WARNING,  # no "Started a local Ray instance"
                 runtime_env={"worker_process_setup_hook": "pipeline.ray_workers.quiet_ray_logs", "env_vars": local_worker_env()},
                 _system_config={"enable_metrics_collection": False})
    else:
        ray.init(address=address)
    if sigterm is not None:
        signal.signal(signal.SIGTERM, sigterm)

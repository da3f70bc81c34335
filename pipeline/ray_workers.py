"""Set-up that every worker process of the chain's own local Ray runs (Ray's ``worker_process_setup_hook``).

A module of its own so that a worker importing it imports nothing else (no torch, no pipeline).
"""

from __future__ import annotations

import logging

PLACEMENT_GROUP_CLEANER_LOGGER = "ray.train.v2._internal.execution.controller.placement_group_cleaner"


def quiet_placement_group_cleaner() -> None:
    """Only errors from Ray Train's placement-group cleaner.

    The cleaner asks Ray's State API every few seconds whether the training controller is still alive.
    The State API is served by the dashboard, which a local chain does not start, so every check failed
    with a warning ("State API may be temporarily unavailable"), dozens per task on the console. Nothing
    is lost by quieting it: the cleaner cannot work without the dashboard anyway, and the chain's own
    Ray, placement groups included, ends with the driver process.
    """
    logging.getLogger(PLACEMENT_GROUP_CLEANER_LOGGER).setLevel(logging.ERROR)

"""Memory over a long chain: peak RSS per task of the driver and of every Ray process it started.

    .venv/bin/python benchmarks/chain_memory.py                 # 12 small tasks, tiny Llama, 2 workers (~6 min)
    .venv/bin/python benchmarks/chain_memory.py --tasks 20 --set model.name=smollm2-135m
    .venv/bin/python benchmarks/chain_memory.py --trace      # + where the driver's Python allocations grow

Runs one chain through `pipeline.chain.run_chain` (local Ray, Ray Data, Ray Train + DeepSpeed, MLflow)
on a stream of small tasks from the bundled datasets, sampling the resident memory of the driver
process and of all its descendants (GCS, raylet, Ray workers: training workers, evaluation tasks,
Ray Data actors) every 0.5 s. Per task it reports the peak total, and the driver's and the total
after the task (the driver's also split into anonymous / file-backed / shared memory); the slope of
the after-task total over tasks 2..T shows growth (target: flat, beyond the checkpoint files, which are
on disk, not in memory), and the processes alive from task 2 to the end are listed by how much they
grew, so growth is attributed to a process. One JSON line last.
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import threading
import time
import tracemalloc
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np  # noqa: E402
import psutil  # noqa: E402
import yaml  # noqa: E402

from pipeline.chain import run_chain  # noqa: E402
from pipeline.config import load_config  # noqa: E402

DATASETS = ["amazon", "bbc", "yahoo", "dbpedia", "banking", "clinc", "hwu", "stackoverflow"]
MIB = 1024 * 1024
DRIVER_RSS_KINDS = {"RssAnon": "anon", "RssFile": "file", "RssShmem": "shmem"}  # /proc/self/status field -> name


def _tree_rss() -> tuple[int, int]:
    """(driver RSS, driver + all descendants RSS) in bytes."""
    me = psutil.Process()
    driver = me.memory_info().rss
    total = driver
    for child in me.children(recursive=True):
        try:
            total += child.memory_info().rss
        except psutil.Error:
            pass  # ended between listing and reading
    return driver, total


def _driver_rss_kinds() -> dict[str, float]:
    """The driver's resident memory by kind (MiB): anonymous (heaps), file-backed (mapped libraries and
    files) and shared memory (Ray's object store, which the driver maps and touches as it puts objects)."""
    kinds = {}
    for line in Path("/proc/self/status").read_text().splitlines():
        key, _, value = line.partition(":")
        if key in DRIVER_RSS_KINDS:
            kinds[f"after_driver_{DRIVER_RSS_KINDS[key]}_mib"] = int(value.split()[0]) / 1024
    return kinds


def _process_rss() -> dict[int, tuple[str, int]]:
    """{pid: (name, RSS bytes)} of the driver's descendants (Ray's GCS, raylet, workers, ...)."""
    found = {}
    for child in psutil.Process().children(recursive=True):
        try:
            found[child.pid] = (" ".join(child.cmdline()[:2])[-60:] or child.name(), child.memory_info().rss)
        except psutil.Error:
            pass
    return found


def _print_process_growth(first: dict[int, tuple[str, int]], last: dict[int, tuple[str, int]], tasks: int) -> float:
    """The processes alive after task 2 and after the last task, by how much their RSS grew; returns their
    total growth in MiB (processes that ended, e.g. idle workers Ray reaped, do not count as shrinking)."""
    grown = sorted(((last[pid][1] - rss, pid, name) for pid, (name, rss) in first.items() if pid in last), reverse=True)
    total = sum(growth for growth, _, _ in grown) / MIB
    print(f"\nprocesses alive from task 2 to task {tasks}, RSS growth ({total:+.1f} MiB in all, {total / (tasks - 2):+.2f} per task):")
    for growth, pid, name in grown[:8]:
        print(f"{growth / MIB:+8.1f} MiB  pid {pid}  {name}")
    return total


class Sampler:
    def __init__(self) -> None:
        self.peak = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, _tree_rss()[1])
            time.sleep(0.5)

    def take_peak(self) -> int:
        peak, self.peak = self.peak, 0
        return peak

    def __enter__(self) -> "Sampler":
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()


def write_stream(folder: Path, count: int) -> Path:
    tasks = []
    for index in range(count):
        dataset = DATASETS[index % len(DATASETS)]
        tasks.append({"name": f"{dataset}_{index}", "source": {"type": "bundled", "dataset": dataset}, "classes": 3,
                      "instruction": f"Classify this {dataset} text.", "max_input_chars": 160,
                      "sizes": {"train": 16, "validation": 4, "test": 8}})
    path = folder / "stream.yaml"
    path.write_text(yaml.safe_dump({"name": "long", "seed": 0, "tasks": tasks, "orders": {"main": [t["name"] for t in tasks]}}))
    return path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tasks", type=int, default=12)
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    parser.add_argument("--trace", action="store_true",
                        help="tracemalloc in the driver: print the call sites whose Python allocations grew most from task 2 to the last")
    args = parser.parse_args()
    if args.trace:
        tracemalloc.start(12)
    snapshots: dict[str, tracemalloc.Snapshot] = {}

    with tempfile.TemporaryDirectory(prefix="procl-memory-") as tmp:
        stream = write_stream(Path(tmp), args.tasks)
        config = load_config(None, [
            "run_name=memory", f"output_dir={tmp}/runs", "model.name=tiny-llama", f"stream.path={stream}",
            "strategy.lora.r=4", "strategy.procl.num_slots=2", "training.batch_size=4", "training.max_length=96",
            "ray.num_cpus=2", *args.overrides,
        ])
        rows: list[dict[str, float]] = []
        processes: dict[str, dict[int, tuple[str, int]]] = {}
        with Sampler() as sampler:
            def after_task(record, manifest) -> None:
                driver, total = _tree_rss()
                rows.append({"task": record.index + 1, "peak_total_mib": max(sampler.take_peak(), total) / MIB,
                             "after_driver_mib": driver / MIB, "after_total_mib": total / MIB, **_driver_rss_kinds()})
                print(f"task {record.index + 1}: peak {rows[-1]['peak_total_mib']:.0f} MiB, after: driver "
                      f"{rows[-1]['after_driver_mib']:.0f} MiB, all {rows[-1]['after_total_mib']:.0f} MiB", flush=True)
                which = "first" if record.index == 1 else "last"
                processes[which] = _process_rss()
                if args.trace:
                    snapshots[which] = tracemalloc.take_snapshot()

            run_chain(config, on_task_done=after_task)

    tasks = np.array([r["task"] for r in rows[1:]])
    slope_total = float(np.polyfit(tasks, [r["after_total_mib"] for r in rows[1:]], 1)[0])
    slope_driver = float(np.polyfit(tasks, [r["after_driver_mib"] for r in rows[1:]], 1)[0])
    kind_keys = [f"after_driver_{kind}_mib" for kind in DRIVER_RSS_KINDS.values()]
    kind_slopes = {f"slope_{key}_per_task": round(float(np.polyfit(tasks, [r[key] for r in rows[1:]], 1)[0]), 2) for key in kind_keys}
    print(f"{'task':>4} {'peak MiB':>9} {'driver MiB':>11} {'all MiB':>8}")
    for r in rows:
        print(f"{r['task']:>4} {r['peak_total_mib']:>9.0f} {r['after_driver_mib']:>11.0f} {r['after_total_mib']:>8.0f}")
    alive_growth = _print_process_growth(processes["first"], processes["last"], len(rows))
    growth = _traced_growth(snapshots, len(rows)) if args.trace else None
    print(json.dumps({
        "benchmark": "chain_memory", "traced_python_growth_mib": growth, "tasks": len(rows), "per_task": [{k: round(v, 1) for k, v in r.items()} for r in rows],
        "slope_after_total_mib_per_task": round(slope_total, 2), "slope_after_driver_mib_per_task": round(slope_driver, 2),
        **kind_slopes, "alive_processes_growth_mib_per_task": round(alive_growth / (len(rows) - 2), 2),
    }))


def _traced_growth(snapshots: dict[str, tracemalloc.Snapshot], tasks: int) -> float:
    """Print the 20 allocation sites (innermost frames) whose live Python memory grew most from after task
    2 to after the last task, with their full stacks; returns the total traced growth in MiB."""
    ignore = [tracemalloc.Filter(False, tracemalloc.__file__), tracemalloc.Filter(False, "<frozen importlib._bootstrap*>")]
    first, last = (snapshots[k].filter_traces(ignore) for k in ("first", "last"))
    total = sum(s.size_diff for s in last.compare_to(first, "filename")) / MIB
    print(f"\nPython allocations in the driver, after task 2 -> after task {tasks}: {total:+.1f} MiB traced")
    for stat in last.compare_to(first, "traceback")[:20]:
        print(f"{stat.size_diff / MIB:+8.2f} MiB {stat.count_diff:+7d} blocks")
        for line in stat.traceback.format(limit=8, most_recent_first=True):
            print(f"      {line}")
    return round(total, 2)


if __name__ == "__main__":
    main()

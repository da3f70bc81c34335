"""`procl` / `python -m pipeline`: run, plan, eval, export, tune and compare continual-learning chains.

    python -m pipeline run configs/demo.yaml [--set strategy.name=seq_lora ...]
    python -m pipeline plan configs/demo.yaml
    python -m pipeline eval configs/demo.yaml --checkpoint runs/demo/checkpoints/task_3
    python -m pipeline export configs/demo.yaml --checkpoint runs/demo/checkpoints/task_3 --out adapter/
    python -m pipeline tune configs/demo.yaml --space tune_spaces/procl.yaml --trials 8
    python -m pipeline report runs/ [--by training.lr] [--out report/] [--json]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import traceback
from pathlib import Path

from rich.console import Console
from rich.table import Table

from pipeline.config import ChainConfig, load_config
from pipeline.interrupts import as_stopped, stop_on_signals
from pipeline.ray_workers import VERBOSE_ENV
from pipeline.storage import RunFolder, is_uri

console = Console()

# Rough CPU seconds per training token (SmolLM2-135M, LoRA, measured on this project's 2-core
# machine: ~4.4 s per 8 x 128-token step fp32, ~3.4 s bf16) and per scored token (forward only;
# bf16 autocast 1.6x faster, benchmarks/eval_precision.py).
SECONDS_PER_TRAIN_TOKEN = {"float32": 4.4 / 1024, "bfloat16": 3.4 / 1024}
SECONDS_PER_EVAL_TOKEN = {"float32": 1.8 / 1024, "bfloat16": 1.8 / 1024 / 1.6}
# Fixed costs on the same machine: the chain's worker group starting (once), and each task's model load,
# DeepSpeed engine and scoring model (benchmarks/pipeline_overhead.py)
CHAIN_START_UP_S, TASK_START_UP_S = 20.0, 5.0


def _add_config_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("config", type=Path, help="run config YAML (see configs/)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="override a config value, e.g. --set strategy.name=seq_lora (repeatable)")
    parser.add_argument("--verbose", action="store_true", help="also show Ray's routine log lines (per report, per dataset)")
    parser.add_argument("--debug", action="store_true", help="print the full traceback of an error")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="procl", description="Continual LoRA fine-tuning chains (ProCL and baselines) on Ray.")
    commands = parser.add_subparsers(dest="command", required=True)
    _add_config_arguments(commands.add_parser("run", help="run or resume a chain (same run_name resumes)"))
    _add_config_arguments(commands.add_parser("plan", help="print what a config will do, without training"))
    evaluate = commands.add_parser("eval", help="score a checkpoint on every task of the config's stream")
    _add_config_arguments(evaluate)
    evaluate.add_argument("--checkpoint", required=True, help="a state folder, e.g. runs/NAME/checkpoints/task_3 (or its URI)")
    export = commands.add_parser("export", help="write a checkpoint as a plain peft LoRA adapter")
    _add_config_arguments(export)
    export.add_argument("--checkpoint", required=True, help="a state folder (or its URI)")
    export.add_argument("--out", required=True, help="adapter folder to write (or its URI)")
    tune = commands.add_parser("tune", help="Ray Tune sweep (Optuna + ASHA) of a chain over a search space; same name resumes")
    _add_config_arguments(tune)
    tune.add_argument("--space", type=Path, required=True, help="search space YAML (see tune_spaces/)")
    tune.add_argument("--trials", type=int, default=8, help="number of trials (default 8)")
    tune.add_argument("--name", help="sweep name (default RUN_NAME-SPACE); folder <output_dir>/sweeps/NAME")
    tune.add_argument("--max-concurrent", type=int, help="trials at once (default: as many as the cluster's CPUs/GPUs fit)")
    tune.add_argument("--seed", type=int, default=0, help="Optuna sampler seed")
    report = commands.add_parser("report", help="compare the finished chains of an MLflow store: a table per stream, a figure")
    report.add_argument("target", help="an output_dir (its chains share <dir>/mlflow.db) or an MLflow tracking URI")
    report.add_argument("--experiment", default="procl", help="MLflow experiment (default procl)")
    report.add_argument("--filter", default="", help="MLflow search filter, e.g. \"params.`training.lr` = '0.001'\"")
    report.add_argument("--by", action="append", default=[], metavar="PARAM",
                        help="also split rows by this config param, e.g. --by training.lr (repeatable)")
    report.add_argument("--out", type=Path, help="write report.md and comparison.png into this folder")
    report.add_argument("--json", action="store_true", help="print every chain's matrices and summaries as JSON instead")
    report.add_argument("--debug", action="store_true", help="print the full traceback of an error")
    report.set_defaults(verbose=False)
    return parser


def plan(config: ChainConfig) -> dict:
    """What `run` will do: tasks, sizes, steps, workers, resources, a rough time estimate."""
    from pipeline.chain import init_ray, select_tasks, steps_per_task
    from pipeline.models import load_tokenizer
    from pipeline.streams import check_answers_tokenize, stream_order

    stream_order(config.stream.path, config.stream.order)  # a bad stream file fails before Ray starts
    try:
        init_ray(config)  # the tasks are sampled on Ray Data: on the config's cluster where it can be joined
    except ConnectionError:  # a cluster config planned away from its cluster (before `ray up`): sample here
        init_ray(config.model_copy(update={"ray": config.ray.model_copy(update={"address": None})}))
    tasks = select_tasks(config)
    tokenizer = load_tokenizer(config.model, download=False)  # a dry run downloads nothing
    if tokenizer is None:
        answers = f"not checked: {config.model.name} is not in the local Hugging Face cache (`run` checks them before training)"
    else:
        check_answers_tokenize(tasks, tokenizer)  # the model spec and answer words, as `run` checks them
        answers = "checked: every answer word of every task tokenizes"
    tokens_per_step = config.training.batch_size * config.training.gradient_accumulation * config.training.max_length / 2
    settled = config.on_device("cpu")  # the estimate is for a CPU
    train_rate = SECONDS_PER_TRAIN_TOKEN["bfloat16" if settled.deepspeed.bf16 else "float32"]
    eval_rate = SECONDS_PER_EVAL_TOKEN["bfloat16" if settled.evaluation.bf16 else "float32"]
    rows = []
    for index, task in enumerate(tasks):
        sizes = {split: len(records) for split, records in task.splits.items()}
        steps = steps_per_task(config, len(task.splits["train"]))
        # evaluation after this task scores validation + test of every task seen so far
        eval_examples = sum(len(t.splits["validation"]) + len(t.splits["test"]) for t in tasks[: index + 1])
        rows.append({"task": task.name, "sizes": sizes, "answers": len(task.answers), "steps": steps,
                     "train_s": steps * tokens_per_step * train_rate,
                     "eval_s": eval_examples * config.training.max_length / 2 * eval_rate})
    zero_shot = sum(len(t.splits["validation"]) + len(t.splits["test"]) for t in tasks) * config.training.max_length / 2 * eval_rate
    return {
        # as written for object storage: opening it (pyarrow asks S3 for the bucket's region) needs the network
        "run_dir": f"{config.output_dir.rstrip('/')}/{config.run_name}" if is_uri(config.output_dir) else str(config.run_folder()),
        "strategy": config.strategy.name,
        "model": config.model.name,
        "workers": config.scaling.num_workers,
        "resources_per_worker": config.scaling.worker_resources(),
        # what `run` checks the cluster has: a plan may be made away from it (a laptop before `ray up`)
        "chain_cpus": config.scaling.chain_cpus(),
        "zero_stage": config.deepspeed.zero_stage,
        "precision": config.precision_note(),
        "answer_words": answers,
        "tasks": rows,
        "estimated_minutes_cpu": round((CHAIN_START_UP_S + zero_shot + sum(TASK_START_UP_S + r["train_s"] + r["eval_s"] for r in rows)) / 60, 1),
    }


def _print_plan(summary: dict) -> None:
    table = Table(title=f"{summary['strategy']} on {summary['model']}: {len(summary['tasks'])} tasks")
    for column in ("#", "task", "train", "validation", "test", "answers", "steps"):
        table.add_column(column, justify="right")
    for index, row in enumerate(summary["tasks"], start=1):
        sizes = row["sizes"]
        table.add_row(str(index), row["task"], str(sizes["train"]), str(sizes["validation"]), str(sizes["test"]), str(row["answers"]), str(row["steps"]))
    console.print(table)
    print(summary["precision"])
    print(f"answer words: {summary['answer_words']}")
    console.print(f"workers: {summary['workers']} x {summary['resources_per_worker']}, ZeRO stage {summary['zero_stage']}; "
                  f"run folder {summary['run_dir']}")
    console.print(f"estimated time on a 2-core CPU (rough, including ~{CHAIN_START_UP_S:.0f} s of Ray Train start-up and "
                  f"~{TASK_START_UP_S:.0f} s per task of model and engine set-up): "
                  f"{summary['estimated_minutes_cpu']} min")


def main(argv: list[str] | None = None) -> int:
    """Exit status: 0 done, 1 a runtime failure (a task that failed, a full disk), 2 a usage or input error
    (config, stream, data, model, run folder, store), 130 / 143 stopped by SIGINT / SIGTERM."""
    args = build_parser().parse_args(argv)
    if args.verbose:
        os.environ[VERBOSE_ENV] = "1"  # the chain's Ray workers read it too
    try:
        with stop_on_signals():
            _command(args)
    except KeyboardInterrupt as interrupt:
        stop = as_stopped(interrupt)
        print(f"stopped by {stop}: the chain's MLflow run is marked KILLED; run the same command to resume", file=sys.stderr)
        _end_ray()
        return stop.exit_code
    except Exception as error:
        if args.debug:
            traceback.print_exc()
        print(f"error: {error}", file=sys.stderr)  # plain and unwrapped: scripts and logs read it
        return 2 if isinstance(error, ValueError) else 1  # input problems are ValueErrors (ConfigError, StreamError, ...)
    return 0


def _end_ray() -> None:
    """End the Ray workers this driver started (a local Ray ends whole; on a cluster, this job's actors end with it)."""
    # not `import ray`: a stop that landed while ray was being imported left it half-initialised (and no Ray started)
    ray = sys.modules.get("ray")
    if getattr(ray, "is_initialized", lambda: False)():
        ray.shutdown()


def _command(args: argparse.Namespace) -> None:
    if args.command == "report":
        _report(args)
        return
    config = load_config(args.config, args.overrides)
    if args.command == "plan":
        summary = plan(config)
        _print_plan(summary)
        print(json.dumps(summary))
    elif args.command == "run":
        from pipeline.chain import run_chain

        result = run_chain(config, args.config)
        console.print(f"[bold green]chain finished[/]: final average accuracy {result.summary['average_accuracy']:.3f}, "
                      f"BWT {result.summary['backward_transfer']:+.3f}, forgetting {result.summary['forgetting']:.3f}")
        # plain prints: paths and commands must not be wrapped by the console width
        if result.adapter_dir is not None:
            print(f"adapter (plain peft LoRA): {result.adapter_dir}")
        print(f"MLflow store: {result.tracking_uri}")
        print(f"open the UI: mlflow ui --backend-store-uri {result.tracking_uri} --host 127.0.0.1")
    elif args.command == "tune":
        from pipeline.tune import run_sweep

        sweep = run_sweep(config, args.config, args.space, args.trials, args.name, args.max_concurrent, args.seed)
        console.print(f"[bold green]sweep finished[/]: {sweep.trials} trials, best {sweep.best_trial} "
                      f"(validation objective {sweep.best_objective:.3f}) with {sweep.best_values}")
        print(f"best config: {sweep.best_config}")
        print(f"run it: python -m pipeline run {sweep.best_config}")
        print(f"open the UI: mlflow ui --backend-store-uri {sweep.tracking_uri} --host 127.0.0.1")
    elif args.command == "eval":  # in this process, on its CPU
        from pipeline.chain import select_tasks
        from pipeline.scoring import model_to_score, score_tasks
        from pipeline.storage import read_state_at

        settled = config.on_device("cpu")
        model, tokenizer = model_to_score(settled, read_state_at(args.checkpoint))
        print(json.dumps(score_tasks(model, tokenizer, select_tasks(config), settled)))
    elif args.command == "export":
        from pipeline.scoring import load_trained
        from pipeline.storage import read_state_at

        model, _, strategy = load_trained(config.on_device("cpu"), read_state_at(args.checkpoint))
        out = RunFolder.at(args.out)
        with tempfile.TemporaryDirectory(prefix="procl-export-") as staging:  # published whole, locally or in object storage
            out.publish(strategy.export(model, Path(staging) / "adapter"))
        console.print(f"adapter written to {out}")

def _report(args: argparse.Namespace) -> None:
    from pipeline.report import as_json, markdown, read_chains, tracking_uri_of, write_report

    uri = tracking_uri_of(args.target)
    chains = read_chains(uri, args.experiment, args.filter, args.by)
    if not chains:
        raise ValueError(f"{args.target}: no finished chain in experiment {args.experiment!r}" + (f" matching {args.filter!r}" if args.filter else ""))
    print(json.dumps(as_json(chains)) if args.json else markdown(chains))
    if args.out is not None:
        for path in write_report(chains, args.out):
            print(f"wrote {path}", file=sys.stderr)


if __name__ == "__main__":
    sys.exit(main())

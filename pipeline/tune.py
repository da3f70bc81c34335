"""`procl tune`: Ray Tune sweeps of a chain's settings (slots, rank, temperature, ...).

Each trial runs a chain (or its first `max_tasks` tasks) through `run_chain`, the same code as
`procl run`: Ray Data, a Ray Train V2 `TorchTrainer` with DeepSpeed per task, evaluation, MLflow.
After every task the trial reports its objective to Tune, measured on the **validation** splits
only: the mean validation score over the tasks seen so far, minus `forgetting_penalty` times the
validation forgetting. Test scores are reported and logged but never optimised. Optuna proposes
trials; ASHA stops bad ones early, its time axis being the number of tasks done.

A sweep lives in `<output_dir>/sweeps/<name>/`: `sweep.json` (what the sweep is, its MLflow run),
`tune/` (Tune's experiment state, so an interrupted sweep resumes without redoing finished
trials), `trials/<trial id>/` (each trial's chain run folder and config) and `best_config.yaml`
(a ready-to-run config of the best trial). MLflow: one run per sweep, one nested chain run per
trial (with its task runs nested below it).
"""

from __future__ import annotations

import hashlib
import itertools
import json
import math
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator
from rich.console import Console

from pipeline.config import ConfigError, ChainConfig, set_path, validate_config
from pipeline.storage import is_uri
from pipeline.validation import read_yaml_mapping, validation_problems
from procl import metrics
from procl.atomic import atomic_write_text

console = Console()

OBJECTIVE = "objective"
TIME_AXIS = "tasks_done"
SWEEP_FILE = "sweep.json"
BEST_CONFIG = "best_config.yaml"
# a bound on the combinations `check_space` validates one by one (every value of every choice, both
# ends of every range); larger spaces are almost surely mistakes in a sweep of whole chains
MAX_CHECKED_COMBINATIONS = 20_000


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class Distribution(_Strict):
    """Exactly one of: `choice: [values]`, `uniform: [low, high]`, `loguniform: [low, high]`, `randint: [low, high)`."""

    choice: list[Any] | None = Field(None, min_length=1)
    uniform: tuple[float, float] | None = None
    loguniform: tuple[float, float] | None = None
    randint: tuple[int, int] | None = None

    @model_validator(mode="after")
    def _one_kind(self) -> "Distribution":
        given = [kind for kind in ("choice", "uniform", "loguniform", "randint") if getattr(self, kind) is not None]
        if len(given) != 1:
            raise ValueError(f"give exactly one of choice, uniform, loguniform, randint (got {given or 'none'})")
        for kind in ("uniform", "loguniform", "randint"):
            bounds = getattr(self, kind)
            if bounds is not None and not bounds[0] < bounds[1]:
                raise ValueError(f"{kind}: expected [low, high] with low < high, got {list(bounds)}")
        if self.loguniform is not None and self.loguniform[0] <= 0:
            raise ValueError(f"loguniform: low must be > 0, got {self.loguniform[0]}")
        return self

    def domain(self):
        """The Ray Tune search domain (OptunaSearch converts it)."""
        from ray import tune

        if self.choice is not None:
            return tune.choice(self.choice)
        if self.uniform is not None:
            return tune.uniform(*self.uniform)
        if self.loguniform is not None:
            return tune.loguniform(*self.loguniform)
        return tune.randint(*self.randint)

    def corners(self) -> list[Any]:
        """Values that must all make a valid config: every choice, both ends of a range."""
        if self.choice is not None:
            return list(self.choice)
        if self.randint is not None:
            return [self.randint[0], self.randint[1] - 1]
        return list(self.uniform or self.loguniform)


class ObjectiveSettings(_Strict):
    forgetting_penalty: float = Field(0.0, ge=0, description="objective = validation AA - penalty * validation forgetting")


class AshaSettings(_Strict):
    grace_period: int = Field(1, ge=1, description="tasks every trial finishes before it can be stopped")
    reduction_factor: float = Field(2.0, gt=1)


class SearchSpace(_Strict):
    """A `tune_spaces/*.yaml` file: what a sweep varies and how it judges trials."""

    description: str = ""
    fixed: dict[str, Any] = Field(default_factory=dict, description="config paths set in every trial, e.g. strategy.name: o_lora")
    params: dict[str, Distribution] = Field(min_length=1, description="config path -> distribution")
    max_tasks: int | None = Field(None, gt=0, description="trials run the first k tasks of the stream (default: all)")
    objective: ObjectiveSettings = Field(default_factory=ObjectiveSettings)
    asha: AshaSettings = Field(default_factory=AshaSettings)


def with_values(base: dict[str, Any], space: SearchSpace, values: dict[str, Any], where: str) -> dict[str, Any]:
    """A copy of the base config with the space's fixed settings and `values` applied."""
    data = json.loads(json.dumps(base))  # deep copy of plain JSON data
    for path, value in {**space.fixed, **values}.items():
        set_path(data, path, value, where=f"{where}: {path}")
    return data


def trial_data(base: dict[str, Any], space: SearchSpace, values: dict[str, Any], where: str) -> dict[str, Any]:
    """What one trial runs: `with_values`, on the first `max_tasks` tasks when the space says so."""
    data = with_values(base, space, values, where)
    if space.max_tasks is not None:
        data["stream"]["max_tasks"] = space.max_tasks
    return data


def load_space(path: Path, base: dict[str, Any]) -> SearchSpace:
    """Read and check a search space against the base config, before Ray starts.

    Every combination of choice values and range ends (with the fixed settings) must be a valid run
    config, so constraints of the config itself (N slots divides rank r, tau > 0, known keys, ...)
    reject the space here rather than failing trials one by one.
    """
    where = str(path)
    raw = read_yaml_mapping(path, "search space file", "a mapping with params (and optionally fixed, max_tasks, objective, asha)", ConfigError)
    try:
        space = SearchSpace.model_validate(raw)
    except ValidationError as error:
        raise ConfigError(f"{where}: {validation_problems(error)}") from error
    check_space(space, base, where)
    return space


def check_space(space: SearchSpace, base: dict[str, Any], where: str) -> None:
    """Refuse a space with a combination of values that is not a valid run config (see `load_space`)."""
    names = list(space.params)
    corners = [space.params[name].corners() for name in names]
    count = math.prod(len(values) for values in corners)
    if count > MAX_CHECKED_COMBINATIONS:
        raise ConfigError(f"{where}: {count} combinations of choices and range ends; at most {MAX_CHECKED_COMBINATIONS} can be checked")
    for combination in itertools.product(*corners):
        values = dict(zip(names, combination))
        try:
            validate_config(trial_data(base, space, values, where), "run config")
        except ConfigError as error:
            shown = ", ".join(f"{name}={value!r}" for name, value in values.items())
            raise ConfigError(f"{where}: the trial {shown} would not be a valid run config ({error})") from None


def objective(validation_matrix: list[list[float]], forgetting_penalty: float) -> float:
    """Mean validation score over the tasks seen so far, minus the penalty times validation forgetting."""
    forgetting = metrics.forgetting(validation_matrix)
    return metrics.average_accuracy(validation_matrix) - forgetting_penalty * (0.0 if math.isnan(forgetting) else forgetting)


def max_concurrent_trials(config: ChainConfig, cluster: dict[str, float]) -> int:
    """How many trials' training worker groups fit in the cluster at once (at least 1)."""
    fits = [cluster.get("CPU", 0.0) // config.scaling.chain_cpus()]  # training workers and ingest
    if config.scaling.use_gpu:
        fits.append(cluster.get("GPU", 0.0) // config.scaling.num_workers)
    for name, amount in config.scaling.resources_per_worker.items():
        fits.append(cluster.get(name, 0.0) // (config.scaling.num_workers * amount))
    return max(1, int(min(fits)))


def run_trial(values: dict[str, Any], *, base: dict[str, Any], space: SearchSpace, trials_dir: str, sweep: str,
              sweep_run_id: str) -> None:
    """The Tune function trainable: one chain with this trial's values; reports after every task."""
    from ray import tune

    from pipeline.chain import run_chain

    trial_id = tune.get_context().get_trial_id()
    data = trial_data(base, space, values, where=f"trial {trial_id}")
    data["run_name"] = trial_id
    data["output_dir"] = trials_dir
    config = validate_config(data, f"trial {trial_id}")
    config_file = Path(trials_dir) / f"{trial_id}.yaml"
    config_file.write_text(yaml.safe_dump(data, sort_keys=False))

    def report(record, manifest) -> None:
        rows = record.index + 2  # zero-shot row + tasks done
        validation, test = manifest.matrix("validation")[:rows], manifest.matrix("test")[:rows]
        tune.report({
            TIME_AXIS: record.index + 1,
            OBJECTIVE: objective(validation, space.objective.forgetting_penalty),
            "validation_average_accuracy": metrics.average_accuracy(validation),
            "validation_forgetting": metrics.forgetting(validation),
            "test_average_accuracy": metrics.average_accuracy(test),  # logged, never optimised
            "mlflow_run_id": manifest.mlflow_run_id,
        })

    # Results come from here, after each task's evaluation, not from the Ray Train workers through a
    # TuneReportCallback: their step reports carry no objective, and Tune rejects such results.
    run_chain(config, config_file, parent_run_id=sweep_run_id, tags={"tune.sweep": sweep, "tune.trial_id": trial_id},
              on_task_done=report)


class SweepResult(BaseModel):
    sweep_dir: Path
    best_config: Path
    best_trial: str
    best_objective: float
    best_values: dict[str, Any]
    trials: int
    tracking_uri: str


def run_sweep(config: ChainConfig, config_file: Path | None, space_file: Path, trials: int, name: str | None = None,
              max_concurrent: int | None = None, seed: int = 0) -> SweepResult:
    """Run (or resume) a sweep of `config` over `space_file` with `trials` Optuna trials."""
    import ray
    from ray import tune
    from ray.tune.schedulers import ASHAScheduler
    from ray.tune.search.optuna import OptunaSearch

    from pipeline.chain import provenance_tags, init_ray, select_tasks
    from pipeline.mlflow_store import default_tracking_uri
    from pipeline.tracking import KIND_TAG, ChainTracker

    if trials < 1:
        raise ConfigError(f"--trials: expected at least 1, got {trials}")
    if is_uri(config.output_dir):  # the sweep's own folder (Tune's state, sweep.json) is written with local paths
        raise ConfigError(f"output_dir: a sweep needs a local or shared path, {config.output_dir} is object storage; "
                          "single chains (`procl run`) can keep their run folders there")
    base = config.model_dump(mode="json")
    base["stream"]["path"] = str(Path(base["stream"]["path"]).resolve())  # trials run with another working dir
    space = load_space(Path(space_file), base)
    tasks = select_tasks(validate_config(trial_data(base, space, {}, str(space_file)), "config"))
    name = name or f"{config.run_name}-{Path(space_file).stem}"
    sweep_dir = Path(config.output_dir).resolve() / "sweeps" / name
    trials_dir = sweep_dir / "trials"
    fingerprint = hashlib.sha256(json.dumps([config.fingerprint(), space.model_dump(mode="json"), trials], sort_keys=True).encode()).hexdigest()[:16]
    state = _open_sweep(sweep_dir, fingerprint)
    trials_dir.mkdir(parents=True, exist_ok=True)
    tracking_uri = config.tracking.uri or default_tracking_uri(Path(config.output_dir).resolve())
    base["tracking"]["uri"] = tracking_uri  # trials log into the sweep's store, not one per trial folder
    tracker = ChainTracker(tracking_uri, config.tracking.experiment, sweep_dir)
    init_ray(config)

    with tracker:
        state["mlflow_run_id"] = tracker.start(
            name, params={"sweep.trials": trials, "sweep.space": space.model_dump(mode="json"), **base},
            tags=provenance_tags() | {KIND_TAG: "sweep"}, config_file=config_file, resume_run_id=state.get("mlflow_run_id"),
            resolved_config=base,
        )
        atomic_write_text(sweep_dir / SWEEP_FILE, json.dumps(state, indent=1))
        tracker.log_artifacts({"space": Path(space_file)})
        trainable = tune.with_resources(
            tune.with_parameters(run_trial, base=base, space=space, trials_dir=str(trials_dir), sweep=name,
                                 sweep_run_id=state["mlflow_run_id"]),
            {"CPU": 0, "memory": 64 * 1024**2},  # the trial only drives; its Ray Train workers hold the resources
        )
        experiment = sweep_dir / "tune"
        if tune.Tuner.can_restore(str(experiment)):
            console.print(f"[bold]resuming sweep[/] {name} from {experiment}")
            tuner = tune.Tuner.restore(str(experiment), trainable, resume_unfinished=True, resume_errored=True)
        else:
            concurrent = max_concurrent or max_concurrent_trials(config, ray.cluster_resources())
            console.print(f"[bold]sweep[/] {name}: {trials} trials of {len(tasks)} tasks, up to {concurrent} at a time")
            tuner = tune.Tuner(
                trainable,
                param_space={path: distribution.domain() for path, distribution in space.params.items()},
                tune_config=tune.TuneConfig(
                    metric=OBJECTIVE, mode="max", num_samples=trials, max_concurrent_trials=concurrent,
                    search_alg=OptunaSearch(seed=seed),
                    # stop_last_trials=False: a trial that reached the last task finishes its chain (export,
                    # MLflow run ended) instead of being stopped at its last report
                    scheduler=ASHAScheduler(time_attr=TIME_AXIS, max_t=len(tasks), grace_period=space.asha.grace_period,
                                            reduction_factor=space.asha.reduction_factor, stop_last_trials=False),
                ),
                run_config=tune.RunConfig(name="tune", storage_path=str(sweep_dir), failure_config=tune.FailureConfig(max_failures=0)),
            )
        grid = tuner.fit()
        # trials ASHA stopped never ended their chain runs themselves
        tracker.end_running_children("KILLED", {"tune.stopped_early": "true"})
        best = _best_result(grid, len(tasks))
        best_values = {path: best.config[path] for path in space.params}
        best_file = _write_best_config(sweep_dir / BEST_CONFIG, config, space, best_values, name, best.metrics)
        tracker.log_summary({f"sweep/best_{OBJECTIVE}": best.metrics[OBJECTIVE], "sweep/trials": len(grid)},
                            tags={"best_trial_id": best.metrics["trial_id"]} | {f"best.{k}": v for k, v in best_values.items()})
        tracker.log_artifacts({"best_config": best_file})
    return SweepResult(sweep_dir=sweep_dir, best_config=best_file, best_trial=best.metrics["trial_id"],
                       best_objective=best.metrics[OBJECTIVE], best_values=best_values, trials=len(grid), tracking_uri=tracking_uri)


def _open_sweep(sweep_dir: Path, fingerprint: str) -> dict[str, Any]:
    """The sweep's state file, or a new one; refuses a folder holding a different sweep."""
    path = sweep_dir / SWEEP_FILE
    if not path.exists():
        return {"fingerprint": fingerprint}
    try:
        state = json.loads(path.read_text())
    except json.JSONDecodeError as error:
        raise ConfigError(f"{path} is not readable ({error}); move the sweep folder aside to start over") from error
    if state.get("fingerprint") != fingerprint:
        raise ConfigError(f"{sweep_dir} holds a sweep of another config, space or --trials; pass another --name to start a new sweep")
    return state


def _best_result(grid, num_tasks: int):
    """The best trial among those that ran every task (a trial stopped after fewer tasks is not comparable)."""
    finished = [r for r in grid if r.error is None and r.metrics and r.metrics.get(TIME_AXIS) == num_tasks]
    if not finished:
        errors = [str(r.error) for r in grid if r.error is not None]
        raise RuntimeError(f"no trial finished all {num_tasks} tasks" + (f"; first error: {errors[0]}" if errors else ""))
    return max(finished, key=lambda r: r.metrics[OBJECTIVE])


def _write_best_config(path: Path, config: ChainConfig, space: SearchSpace, values: dict[str, Any], sweep: str,
                       best_metrics: dict[str, Any]) -> Path:
    """The user's config with the space's fixed settings and the best values: `procl run` it as is.

    It runs the whole stream (the config's own max_tasks, not the sweep's) under a run name of its own.
    """
    data = with_values(config.model_dump(mode="json"), space, values, str(path))
    data["run_name"] = f"{sweep}-best"
    validate_config(data, str(path))
    header = (f"# best trial {best_metrics['trial_id']} of sweep {sweep}: validation objective {best_metrics[OBJECTIVE]:.4f} "
              f"after {best_metrics[TIME_AXIS]} tasks\n")
    return atomic_write_text(path, header + yaml.safe_dump(data, sort_keys=False))

"""`procl report`: the chains of an MLflow store compared, as docs/RESULTS.md compares them.

    procl report runs/                                   # the store of every chain under output_dir runs/
    procl report sqlite:////abs/runs/mlflow.db --filter "params.\`training.lr\` = '0.001'" --by training.lr
    procl report runs/ --out report/                     # report.md, comparison.png
    procl report runs/ --json

Chains are the finished chain runs of the experiment (a Tune trial's too), found with MLflow's search and
read back through its client: the test and validation accuracy matrices from the run's two tables. A table per stream: a row per strategy (and per value of each `--by` param),
a column per order and seed with that chain's AA / BWT, then mean +- std over the chains of AA, LA, BWT,
forgetting and validation AA.
"""

from __future__ import annotations

import json
import math
import statistics
import tempfile
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from procl import metrics

SUMMARY = ("average_accuracy", "learning_accuracy", "backward_transfer", "forgetting")


@dataclass(frozen=True)
class ChainScores:
    """One chain as the report reads it: where it belongs (stream, order, seed, label) and its matrices
    (procl.metrics conventions: the zero-shot row, then a row per trained task; NaN where not scored)."""

    run_id: str
    run_name: str
    stream: str
    order: str
    seed: str
    label: str
    tasks: list[str]
    test: list[list[float]]
    validation: list[list[float]]

    def summary(self, split: str = "test") -> dict[str, float]:
        return metrics.summary(self.test if split == "test" else self.validation)


def mean_std(values: Sequence[float], signed: bool = False) -> str:
    """"mean +- std" over the chains (NaN values skipped; "n/a" when none is left)."""
    values = [v for v in values if not math.isnan(v)]
    if not values:
        return "n/a"
    mean = f"{statistics.mean(values):+.3f}" if signed else f"{statistics.mean(values):.3f}"
    return mean + (f" +- {statistics.stdev(values):.3f}" if len(values) > 1 else "")


def markdown(chains: Sequence[ChainScores], labels: dict[str, str] | None = None) -> str:
    """A table per stream (docs/RESULTS.md's format): strategy | <order> seed <s> (AA / BWT) ... | AA (chains) |
    LA | BWT | forgetting | validation AA. `labels` renames rows."""
    parts = []
    for stream in dict.fromkeys(chain.stream for chain in chains):
        mine = [chain for chain in chains if chain.stream == stream]
        columns = sorted({(chain.order, chain.seed) for chain in mine})
        lines = [f"**{stream}** (test; validation AA on the validation split)", "",
                 "| strategy | " + " | ".join(f"{order} seed {seed}" for order, seed in columns)
                 + " | AA (chains) | LA | BWT | forgetting | validation AA |",
                 "|---" * (len(columns) + 6) + "|"]
        for label in dict.fromkeys(chain.label for chain in mine):
            runs = {(c.order, c.seed): c for c in mine if c.label == label}
            tests = {key: chain.summary("test") for key, chain in runs.items()}
            cells = [f"{tests[c]['average_accuracy']:.3f} / {tests[c]['backward_transfer']:+.3f}" if c in tests else "" for c in columns]
            values = {m: [s[m] for s in tests.values()] for m in SUMMARY}
            validation = [chain.summary("validation")["average_accuracy"] for chain in runs.values()]
            lines.append(f"| {(labels or {}).get(label, label)} | " + " | ".join(cells)
                         + f" | {mean_std(values['average_accuracy'])} ({len(runs)}) | {mean_std(values['learning_accuracy'])}"
                         + f" | {mean_std(values['backward_transfer'], signed=True)} | {mean_std(values['forgetting'])}"
                         + f" | {mean_std(validation)} |")
        parts.append("\n".join(lines))
    return "\n\n".join(parts)


def as_json(chains: Sequence[ChainScores]) -> dict[str, Any]:
    """Every chain with its summaries (NaN as null)."""
    def clean(value: Any) -> Any:
        if isinstance(value, float) and math.isnan(value):
            return None
        if isinstance(value, list):
            return [clean(v) for v in value]
        if isinstance(value, dict):
            return {k: clean(v) for k, v in value.items()}
        return value

    return {"chains": [clean(asdict(chain) | {"test_summary": chain.summary("test"), "validation_summary": chain.summary("validation")})
                       for chain in chains]}


# -- from MLflow ---------------------------------------------------------------------------------------


def tracking_uri_of(target: str) -> str:
    """`target` as a tracking URI: a URI as given, or an output_dir whose chains share `<dir>/mlflow.db`."""
    from pipeline.mlflow_store import default_tracking_uri

    if "://" in target or target.startswith(("sqlite:", "databricks")):
        return target
    folder = Path(target)
    if not (folder / "mlflow.db").is_file():
        raise ValueError(f"{target}: no MLflow store here (expected {folder / 'mlflow.db'}); give a chain's output_dir or a tracking URI")
    return default_tracking_uri(folder)


def read_chains(tracking_uri: str, experiment: str = "procl", filter_string: str = "", by: Sequence[str] = ()) -> list[ChainScores]:
    """The finished chain runs of `experiment` that match `filter_string` (MLflow's search syntax), oldest first.
    A row's label is the strategy, plus `param=value` for each param in `by`."""
    from mlflow import MlflowClient

    from pipeline.mlflow_store import check_store, store_errors
    from pipeline.redaction import redact_uri

    safe_uri = redact_uri(tracking_uri)
    check_store(tracking_uri)  # an unreachable server fails in seconds, not after MLflow's retries
    with store_errors(safe_uri, f"finding experiment {experiment!r}"):
        client = MlflowClient(tracking_uri)
        found = client.get_experiment_by_name(experiment)
        names = [] if found else sorted(e.name for e in client.search_experiments())
    if found is None:
        raise ValueError(f"{safe_uri}: no MLflow experiment {experiment!r} (there are {names})")
    with store_errors(safe_uri, "reading the chains"):
        return _chains(client, found.experiment_id, filter_string, by)


def _chains(client, experiment_id: str, filter_string: str, by: Sequence[str]) -> list[ChainScores]:
    from mlflow.entities import ViewType

    from pipeline.tracking import KIND_TAG, MATRIX_TABLE, ORDER_TAG, STREAM_TAG, VALIDATION_MATRIX_TABLE

    search = " and ".join(part for part in (f"tags.`{KIND_TAG}` = 'chain'", "attributes.status = 'FINISHED'", filter_string) if part)
    runs, token = [], None
    while True:
        page = client.search_runs([experiment_id], search, ViewType.ACTIVE_ONLY, max_results=1000,
                                  order_by=["attributes.start_time ASC"], page_token=token)
        runs += list(page)
        token = page.token
        if not token:
            break
    chains = []
    with tempfile.TemporaryDirectory(prefix="procl-report-") as tmp:
        def matrix(run_id: str, table_file: str) -> tuple[list[str], list[list[float]]]:
            table = json.loads(Path(client.download_artifacts(run_id, table_file, tmp)).read_text())
            rows = [[math.nan if v is None else float(v) for v in row[1:]] for row in table["data"]]
            return table["columns"][1:], rows  # "after" (the row's name), then a column per task

        for run in runs:
            params, tags = run.data.params, run.data.tags
            tasks, test = matrix(run.info.run_id, MATRIX_TABLE)
            _, validation = matrix(run.info.run_id, VALIDATION_MATRIX_TABLE)
            label = " ".join([params.get("strategy.name", "?")] + [f"{key}={params.get(key)}" for key in by])
            chains.append(ChainScores(run.info.run_id, run.info.run_name, tags[STREAM_TAG], tags[ORDER_TAG],
                                      params.get("training.seed", "?"), label, tasks, test, validation))
    return chains


def write_report(chains: Sequence[ChainScores], out: Path) -> list[Path]:
    """`report.md` and `comparison.png` (pipeline.plots.chain_comparison_plot) in `out`."""
    from pipeline import plots

    out.mkdir(parents=True, exist_ok=True)
    table = out / "report.md"
    table.write_text(markdown(chains) + "\n")
    figure = out / "comparison.png"
    curves = {f"{c.label} · {c.stream} {c.order} seed {c.seed}": c.test for c in chains}
    plots.chain_comparison_plot(curves).savefig(figure)
    return [table, figure]

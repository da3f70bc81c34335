"""Figures of a continual-learning chain: accuracy matrix, forgetting, ProCL slot usage, train loss.

Every function draws on its own `Figure` with the Agg canvas instead of going through pyplot: no global
figure registry to leak or close, no backend switch for the importing process, and safe to call from
any thread. Each returns the figure; the tracker logs it as an MLflow image (`fig.savefig` writes a file).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import matplotlib
import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.patches import Rectangle

from procl import metrics

_DPI = 110


def _figure(width: float, height: float, ncols: int = 1) -> tuple[Figure, list]:
    fig = Figure(figsize=(width, height), dpi=_DPI, layout="constrained")
    FigureCanvasAgg(fig)
    axes = fig.subplots(1, ncols, squeeze=False)[0]
    return fig, list(axes)


def _note(ax, text: str) -> None:
    """An empty panel that says why it is empty (a figure is still drawn, so every task's images are alike)."""
    ax.text(0.5, 0.5, text, ha="center", va="center", transform=ax.transAxes, color="0.4")
    ax.set_xticks([])
    ax.set_yticks([])


def _annotate(ax, image, values: np.ndarray, fmt: str, fontsize: float) -> None:
    """Write each finite value in its cell, dark text on light cells and light text on dark ones."""
    for (i, j), value in np.ndenumerate(values):
        if math.isnan(value):
            continue  # a task not scored (yet) stays a blank cell
        r, g, b, _ = image.cmap(image.norm(value))
        colour = "black" if 0.299 * r + 0.587 * g + 0.114 * b > 0.5 else "white"
        ax.text(j, i, format(value, fmt), ha="center", va="center", color=colour, fontsize=fontsize)


def _set_xticks(ax, labels: Sequence[str], chars_per_tick: float) -> None:
    """Tick labels, slanted when they would not fit side by side."""
    slant = max((len(label) for label in labels), default=0) > chars_per_tick
    ax.set_xticks(range(len(labels)), labels, rotation=30 if slant else 0, ha="right" if slant else "center")


def _score_format(values: np.ndarray) -> str:
    finite = values[np.isfinite(values)]
    return ".1f" if finite.size and np.abs(finite).max() > 1.5 else ".2f"  # percentages vs fractions


def _cell_fontsize(cells_across: int) -> float:
    return max(5.0, min(10.0, 90.0 / max(cells_across, 1)))


def accuracy_matrix_heatmap(matrix: Sequence[Sequence[float]], task_names: Sequence[str]) -> Figure:
    """Rows "zero-shot", "after <task>", ...; one column per task; annotated, NaN cells blank.

    `matrix` is the accuracy matrix so far (procl.metrics conventions: zero-shot row first, possibly fewer
    rows than tasks + 1). The cell of each task right after training it is outlined, so the diagonal a
    reader compares later rows against stands out.
    """
    r = metrics.as_matrix(matrix)
    if len(task_names) != r.shape[1]:
        raise ValueError(f"{len(task_names)} task names for an accuracy matrix with {r.shape[1]} columns")
    rows = ["zero-shot"] + [f"after {name}" for name in task_names[: r.shape[0] - 1]]
    n_rows, n_cols = r.shape
    fig, (ax,) = _figure(max(5.0, 1.0 + 0.75 * n_cols), max(2.8, 1.2 + 0.5 * n_rows))
    finite = r[np.isfinite(r)]
    vmin, vmax = min(0.0, float(finite.min())), max(1.0, float(finite.max()))
    cmap = matplotlib.colormaps["viridis"].with_extremes(bad="white")  # cells not evaluated yet stay blank
    image = ax.imshow(np.ma.masked_invalid(r), cmap=cmap, vmin=vmin, vmax=vmax, aspect="auto")
    _annotate(ax, image, r, _score_format(r), _cell_fontsize(n_cols))
    for i in range(1, n_rows):
        ax.add_patch(Rectangle((i - 1 - 0.5, i - 0.5), 1, 1, fill=False, edgecolor="red", linewidth=1.5))
    _set_xticks(ax, task_names, chars_per_tick=8)
    ax.set_yticks(range(n_rows), rows)
    ax.set_xlabel("evaluated on")
    ax.set_title("Accuracy matrix\n(red outline: the task just trained)", fontsize=10)
    fig.colorbar(image, ax=ax, label="score")
    return fig


def forgetting_plot(matrix: Sequence[Sequence[float]], task_names: Sequence[str]) -> Figure:
    """Left: forgetting so far of each earlier task (bars); right: average accuracy after each task (line).

    Two panels rather than a twin axis: the bars are indexed by earlier task and the line by training
    time, so sharing one x axis would suggest a pairing that does not exist.
    """
    r = metrics.as_matrix(matrix)
    if len(task_names) != r.shape[1]:
        raise ValueError(f"{len(task_names)} task names for an accuracy matrix with {r.shape[1]} columns")
    trained = r.shape[0] - 1
    fig, (bars_ax, line_ax) = _figure(max(8.0, 2.0 + 0.9 * trained), 3.6, ncols=2)

    if trained < 2:
        _note(bars_ax, "no earlier task yet")
    else:
        per_task = metrics.forgetting_per_task(r)
        names = list(task_names[: trained - 1])
        colours = ["tab:red" if f > 0 else "tab:green" for f in per_task]
        drawn = bars_ax.bar(range(len(per_task)), per_task, color=colours)
        bars_ax.bar_label(drawn, fmt="%.3f", fontsize=8)
        bars_ax.axhline(0.0, color="0.3", linewidth=0.8)
        _set_xticks(bars_ax, names, chars_per_tick=40 / len(names))
        bars_ax.set_ylabel("best earlier score - current score")
        bars_ax.margins(y=0.2)
    after = f" after {task_names[trained - 1]}" if trained else ""
    bars_ax.set_title(f"Forgetting{after}\n(red: forgotten, green: improved)", fontsize=10)

    if trained < 1:
        _note(line_ax, "no task trained yet")
    else:
        aa = [metrics.average_accuracy(r[: i + 1]) for i in range(1, trained + 1)]
        line_ax.plot(range(trained), aa, marker="o", color="tab:blue")
        for i, value in enumerate(aa):
            line_ax.annotate(f"{value:.3f}", (i, value), textcoords="offset points", xytext=(0, 6), ha="center", fontsize=8)
        _set_xticks(line_ax, [f"after {n}" for n in task_names[:trained]], chars_per_tick=40 / trained)
        line_ax.set_ylabel("average accuracy")
        line_ax.margins(x=0.15, y=0.2)
    line_ax.set_title("Average accuracy over the tasks seen\nafter each task", fontsize=10)
    return fig


def _mean_usage_over_layers(usage: Mapping[str, Sequence[float]]) -> np.ndarray:
    """Mean per-slot usage over layers; layers with fewer slots count only for the slots they have."""
    if not usage:
        return np.zeros(0)
    width = max(len(u) for u in usage.values())
    stacked = np.full((len(usage), width), np.nan)
    for row, u in enumerate(usage.values()):
        stacked[row, : len(u)] = u
    with np.errstate(all="ignore"):
        return np.nanmean(stacked, axis=0)


def slot_usage_plot(
    task_slot_usage: Sequence[Mapping[str, Sequence[float]]], task_names: Sequence[str]
) -> Figure:
    """Heatmap ProCL task x slot of the per-slot usage averaged over layers.

    `task_slot_usage[k]` is ProCL's record for its (k+1)-th program-memory task, i.e. chain task k + 2
    (task 1 trains a plain LoRA), as `procl.strategies.ProCL.task_slot_usage` keeps it: layer path ->
    per-slot usage. `task_names` may be the whole chain's names (rows are then labelled with names[1:])
    or exactly one name per usage record.
    """
    if len(task_names) == len(task_slot_usage):
        labels = list(task_names)
    elif len(task_names) > len(task_slot_usage):
        labels = list(task_names[1 : 1 + len(task_slot_usage)])
    else:
        raise ValueError(f"{len(task_slot_usage)} slot-usage records but only {len(task_names)} task names")
    rows = [_mean_usage_over_layers(u) for u in task_slot_usage]
    width = max((len(r) for r in rows), default=0)
    fig, (ax,) = _figure(max(5.0, 2.0 + 0.6 * width), max(2.6, 1.3 + 0.45 * len(rows)))
    if width == 0:
        _note(ax, "no slot usage recorded (no program-memory task yet)")
        ax.set_title("ProCL slot usage")
        return fig
    usage = np.full((len(rows), width), np.nan)
    for i, row in enumerate(rows):
        usage[i, : len(row)] = row
    image = ax.imshow(np.ma.masked_invalid(usage), cmap="magma_r", vmin=0.0, aspect="auto")
    if usage.size <= 300:
        _annotate(ax, image, usage, ".2f", _cell_fontsize(width))
    ax.set_xticks(range(width), [str(n) for n in range(width)])
    ax.set_yticks(range(len(rows)), labels)
    ax.set_xlabel("program slot")
    # ProCL records each task's mean slot plasticity rho: 1 = the slot kept all the task wrote into it,
    # 0 = the slot was left as the previous task had it (see docs/METHOD.md)
    ax.set_title("ProCL slot use per task: plasticity rho, mean over layers")
    fig.colorbar(image, ax=ax, label="rho (1 = written, 0 = kept)")
    return fig


def _moving_average(values: np.ndarray, window: int) -> np.ndarray:
    if window <= 1 or values.size < window:
        return values
    kernel = np.ones(window) / window
    return np.convolve(values, kernel, mode="valid")


def loss_curve_plot(losses_by_task: Mapping[str, Sequence[float]]) -> Figure:
    """Train loss of each task in chain order on one optimizer-step axis (raw, faint; moving average, bold).

    Tasks follow one another on the x axis (each starts where the previous ended) with dashed boundaries,
    which is how the chain trained them and makes a jump in loss at a new task visible.
    """
    fig, (ax,) = _figure(8.0, 3.6)
    offset = 0
    colours = [f"C{i % 10}" for i in range(len(losses_by_task))]
    for colour, (name, losses) in zip(colours, losses_by_task.items()):
        values = np.asarray(list(losses), dtype=float)
        if values.size == 0:
            continue
        steps = np.arange(offset, offset + values.size)
        ax.plot(steps, values, color=colour, alpha=0.3, linewidth=0.8)
        window = max(1, values.size // 20)
        smooth = _moving_average(values, window)
        ax.plot(steps[window - 1 :] if smooth.size < values.size else steps, smooth, color=colour, linewidth=1.8, label=name)
        if offset:
            ax.axvline(offset - 0.5, color="0.6", linestyle="--", linewidth=0.8)
        offset += values.size
    if offset == 0:
        _note(ax, "no train loss recorded")
    else:
        ax.set_xlabel("optimizer step (chain order)")
        ax.set_ylabel("train loss")
        ax.legend(fontsize=8, ncols=min(4, len(losses_by_task)))
    ax.set_title("Train loss")
    return fig


def chain_comparison_plot(matrices: Mapping[str, Sequence[Sequence[float]]]) -> Figure:
    """One line per chain (`matrices`: label -> its accuracy matrix): left, the average accuracy over the tasks
    seen after each task; right, the accuracy on the chain's first task after each task (what it keeps)."""
    fig, (aa_ax, first_ax) = _figure(11.0, 4.2, ncols=2)
    longest = 0
    for colour, (label, matrix) in zip((f"C{i % 10}" for i in range(len(matrices))), matrices.items()):
        r = metrics.as_matrix(matrix)
        trained = r.shape[0] - 1
        if trained < 1:
            continue
        longest = max(longest, trained)
        steps = np.arange(1, trained + 1)
        aa_ax.plot(steps, [metrics.average_accuracy(r[: k + 1]) for k in steps], marker="o", color=colour, label=label)
        first_ax.plot(steps, r[1:, 0], marker="o", color=colour, label=label)
    for ax, title in ((aa_ax, "Average accuracy over the tasks seen"), (first_ax, "Accuracy on the first task")):
        if longest == 0:
            _note(ax, "no trained task")
            continue
        ax.set_xticks(range(1, longest + 1))
        ax.set_xlabel("after task")
        ax.set_title(title, fontsize=10)
        ax.margins(y=0.15)
    if longest:
        aa_ax.set_ylabel("score")
        first_ax.legend(fontsize=7, loc="best")
    return fig

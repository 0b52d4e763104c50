"""A PNG of a model's history: its test-then-train metric and samples learned, version by version.

The metric comes from each version's metadata, so the picture needs only
the store. Two views of the metric are drawn. The first is the cumulative
value that the version stores. The second is the value over the rows scored
since the previous kept version, computed from the differences of the
cumulative counts, and it shows a drift that the cumulative line averages
away. Versions whose drift detector fired are marked.

matplotlib is an optional dependency: ``pip install 'streamfit[plot]'``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

from modelstore.base import VersionInfo
from modelstore.errors import ConfigError, InvalidInputError

FIGURE_SIZE_IN = (9.0, 6.0)
DPI = 110


@dataclass
class History:
    """The series drawn for one model, one entry per version with weights.

    ``interval`` contains the metric over the rows scored since the previous
    entry, or None where no new rows were scored (a rollback, which copies
    an older version's counts). ``drift_versions`` are the versions whose
    refit detected an increase of the error rate.
    """

    model: str
    task: str
    metric: str
    versions: list[int] = field(default_factory=list)
    samples_learned: list[int] = field(default_factory=list)
    cumulative: list[float | None] = field(default_factory=list)
    baseline: list[float | None] = field(default_factory=list)
    interval: list[float | None] = field(default_factory=list)
    drift_versions: list[int] = field(default_factory=list)
    rollback_versions: list[int] = field(default_factory=list)


def model_history(model: str, versions: Sequence[VersionInfo]) -> History:
    """Collect the plotted series from a model's versions, oldest first."""
    ordered = sorted(versions, key=lambda info: info.version)
    task = next((str(v.metadata.get("task")) for v in ordered if v.metadata.get("task")), "classification")
    history = History(model=model, task=task, metric="accuracy" if task == "classification" else "mae")
    previous: dict[str, Any] = {}
    previous_drift = 0
    for info in ordered:
        metrics = info.metadata.get("metrics") or {}
        if info.version == 0 or not info.metadata.get("artifacts"):
            continue
        history.versions.append(info.version)
        history.samples_learned.append(info.samples_learned)
        history.cumulative.append(metrics.get(history.metric))
        history.baseline.append(metrics.get("baseline_accuracy"))
        history.interval.append(_interval_value(task, previous, metrics))
        if info.metadata.get("rolled_back_from") is not None:
            history.rollback_versions.append(info.version)
        drift_total = _increases(info.metadata.get("drift"))
        if drift_total > previous_drift:
            history.drift_versions.append(info.version)
        previous_drift = drift_total
        previous = metrics
    return history


def _interval_value(task: str, before: dict[str, Any], after: dict[str, Any]) -> float | None:
    scored = _number(after.get("n_scored")) - _number(before.get("n_scored"))
    if scored <= 0:
        return None
    if task == "classification":
        return (_number(after.get("correct")) - _number(before.get("correct"))) / scored
    return (_number(after.get("sum_abs_error")) - _number(before.get("sum_abs_error"))) / scored


def _number(value: Any) -> float:
    return float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else 0.0


def _increases(drift: Any) -> int:
    if not isinstance(drift, dict):
        return 0
    detections = drift.get("detections")
    if not isinstance(detections, dict):
        return 0
    count = detections.get("increase", 0)
    return count if isinstance(count, int) else 0


def plot_history(history: History, out: str | Path) -> Path:
    """Write ``history`` as a PNG to ``out`` and return its path.

    Raises InvalidInputError when the model has no version with weights
    yet, and ConfigError when matplotlib is not installed.
    """
    if not history.versions:
        raise InvalidInputError(
            f"model {history.model!r} has no published version with weights yet, so there is "
            "nothing to plot; let a worker learn some records first"
        )
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError:
        raise ConfigError(
            "plotting needs matplotlib; install it with `pip install 'streamfit[plot]'`"
        ) from None

    # A Figure with the Agg canvas, not pyplot, so plotting from a service or
    # a thread touches no global state and needs no display.
    figure = Figure(figsize=FIGURE_SIZE_IN, dpi=DPI, layout="constrained")
    FigureCanvasAgg(figure)
    metric_axes, samples_axes = figure.subplots(2, 1, sharex=True, height_ratios=(2, 1))
    _draw_metric(metric_axes, history)
    _draw_samples(samples_axes, history)
    figure.suptitle(f"model {history.model}: {len(history.versions)} versions")

    path = Path(out)
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, format="png")
    return path


def _draw_metric(axes: Any, history: History) -> None:
    label = "accuracy" if history.metric == "accuracy" else "mean absolute error"
    points = [(v, x) for v, x in zip(history.versions, history.interval) if x is not None]
    if points:
        axes.plot(*zip(*points), color="tab:blue", alpha=0.35, linewidth=0.8,
                  label=f"{label} since the previous version")
    axes.plot(history.versions, _nan(history.cumulative), color="tab:blue", linewidth=2,
              label=f"cumulative {label}")
    if history.task == "classification":
        axes.plot(history.versions, _nan(history.baseline), color="tab:gray", linestyle="--",
                  label="majority-class baseline")
    for i, version in enumerate(history.drift_versions):
        axes.axvline(version, color="tab:red", linewidth=1, linestyle=":",
                     label="drift detected (error rose)" if i == 0 else None)
    for i, version in enumerate(history.rollback_versions):
        axes.axvline(version, color="tab:purple", linewidth=1,
                     label="rollback" if i == 0 else None)
    axes.set_ylabel(f"test-then-train {label}")
    axes.grid(alpha=0.3)
    axes.legend(loc="best", fontsize="small")


def _draw_samples(axes: Any, history: History) -> None:
    axes.step(history.versions, history.samples_learned, where="post", color="tab:green")
    axes.set_ylabel("samples learned")
    axes.set_xlabel("version")
    axes.grid(alpha=0.3)


def _nan(values: list[float | None]) -> list[float]:
    return [float("nan") if v is None else v for v in values]


def plot_model(store: Any, model: str, out: str | Path) -> Path:
    """Read every kept version of ``model`` from ``store`` and write its history PNG to ``out``."""
    return plot_history(model_history(model, store.versions(model)), out)

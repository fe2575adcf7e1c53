"""PNG plots of a family: a score against a parameter count, student and teacher marked."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

FIGURE_INCHES = (8.0, 5.0)
DPI = 100  # so a plot is 800 x 500 pixels


@dataclass(frozen=True)
class Curve:
    label: str
    parameters: list[int]
    values: list[float]
    style: str = "-"  # a matplotlib line style; "none" for points alone
    marker: str = "o"
    point_labels: list[str] | None = None  # e.g. each size's layer count


def plot_family(path: Path, curves: list[Curve], student: tuple[int, float], teacher: tuple[int, float],
                ylabel: str, title: str, log_y: bool = False, xlabel: str = "parameters",
                y_range: tuple[float, float] | None = None) -> Path:
    """Write the curves, with the student and the teacher marked, as a PNG; x is `xlabel`, in millions etc."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.ticker import ScalarFormatter

    figure = Figure(figsize=FIGURE_INCHES, dpi=DPI)
    FigureCanvasAgg(figure)
    axes = figure.add_subplot()
    scale, unit = _scale(teacher[0])
    for curve in curves:
        xs = [p / scale for p in curve.parameters]
        axes.plot(xs, curve.values, linestyle=curve.style, marker=curve.marker, label=curve.label)
        for x, y, text in zip(xs, curve.values, curve.point_labels or []):
            axes.annotate(text, (x, y), textcoords="offset points", xytext=(6, -12), fontsize=8, color="dimgray")
    for (params, value), name, marker in ((student, "student", "s"), (teacher, "teacher", "*")):
        axes.plot([params / scale], [value], marker, markersize=14, color="black", fillstyle="none")
        axes.annotate(f"{name}\n{value:.4g}", (params / scale, value), textcoords="offset points",
                      xytext=(0, 14), ha="center", fontsize=9)
    if log_y:
        axes.set_yscale("log")
        axes.yaxis.set_major_formatter(ScalarFormatter())
        axes.yaxis.set_minor_formatter(ScalarFormatter())
    if y_range is not None:  # curves far outside it run off the plot, so the close ones stay apart
        axes.set_ylim(*y_range)
    axes.set_xlabel(f"{xlabel} ({unit})")
    axes.set_ylabel(ylabel)
    axes.set_title(title)
    axes.grid(True, alpha=0.3)
    axes.legend()
    axes.margins(x=0.08, y=0.15)
    figure.tight_layout()
    # No software tag or timestamp: the same results give the same bytes.
    figure.savefig(path, format="png", metadata={"Software": None})
    return path


def _scale(largest: int) -> tuple[float, str]:
    for scale, unit in ((1e9, "billions"), (1e6, "millions"), (1e3, "thousands")):
        if largest >= scale:
            return scale, unit
    return 1.0, "count"

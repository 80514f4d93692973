# SPDX-License-Identifier: LGPL-3.0-only
"""Figures of where experts changed, in the style of the paper's section 3.2.

* ``<expert>_heatmap.png``: decoder layers on the vertical axis (layer 0 at the
  bottom), one column per 2-D layer weight (named from the architecture template),
  colour = percentage of that matrix's rows whose mean absolute change exceeds the
  threshold. 640 x 800 pixels.
* ``comparison_heatmap.png`` (two or more experts): the same panels side by side on
  one colour scale. (150 + 450 x experts) x 800 pixels.
* ``profile.png``: per expert, the mean row change of each layer (top) and the same
  divided by its mean over all layers (bottom, the relative change ``suggest`` uses).
  800 x 600 pixels.

matplotlib (the ``analysis`` extra) is imported only here, and figures are drawn on
an Agg canvas without pyplot, so no global backend is switched.
"""

from __future__ import annotations

import math
import os
from typing import List, Sequence

import numpy as np

from mergekit_layerswap.core.errors import LayerSwapError
from mergekit_layerswap.core.files import atomic_file
from mergekit_layerswap.tools.analysis import AUTO, AUTO_QUANTILE, ExpertDelta, Threshold

DPI = 100
HEATMAP_SIZE = (6.4, 8.0)  # inches
PANEL_WIDTH, PANEL_MARGIN = 4.5, 1.5  # comparison: MARGIN + WIDTH per expert
PROFILE_SIZE = (8.0, 6.0)
CMAP = "viridis"
INSTALL_HINT = "pip install 'mergekit-layerswap[analysis]'"


def require_matplotlib() -> None:
    """Fail with one line (before any model is read) when matplotlib is missing."""
    try:
        import matplotlib  # noqa: F401
        from matplotlib.backends.backend_agg import FigureCanvasAgg  # noqa: F401
    except ImportError:
        raise LayerSwapError(f"the figures need matplotlib; {INSTALL_HINT}") from None


def _figure(size):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    figure = Figure(figsize=size, dpi=DPI)
    FigureCanvasAgg(figure)
    return figure


def _save(figure, path: str) -> str:
    with atomic_file(path, "wb") as handle:
        figure.savefig(handle, format="png", dpi=DPI)
    return path


def _describe(delta: ExpertDelta, threshold: Threshold) -> str:
    value = delta.resolve(threshold)
    if threshold == AUTO:
        return f"MAV > {value:.3g} (auto: its {AUTO_QUANTILE:g} quantile)"
    return f"MAV > {value:.3g}"


def _layer_ticks(num_layers: int) -> List[int]:
    step = max(1, math.ceil(num_layers / 32))
    return list(range(0, num_layers, step))


def _panel(axes, delta: ExpertDelta, threshold: Threshold, vmax: float, show_layers: bool):
    import matplotlib

    cmap = matplotlib.colormaps[CMAP].with_extremes(bad="lightgrey")  # a matrix it does not store
    grid = 100.0 * delta.share_grid(delta.resolve(threshold))
    image = axes.imshow(
        np.ma.masked_invalid(grid),
        origin="lower",
        aspect="auto",
        cmap=cmap,
        vmin=0.0,
        vmax=vmax,
        interpolation="nearest",
    )
    axes.set_xticks(range(len(delta.columns)))
    rotate = max((len(c) for c in delta.columns), default=0) > 4
    axes.set_xticklabels(delta.columns, rotation=45 if rotate else 0, ha="right" if rotate else "center")
    axes.set_yticks(_layer_ticks(delta.num_layers))
    if show_layers:
        axes.set_ylabel("decoder layer (0 = bottom)")
    else:  # a shared axis: hide only this panel's labels
        axes.tick_params(labelleft=False)
    axes.set_xlabel("layer matrix")
    axes.set_title(f"{delta.name}\nrows with {_describe(delta, threshold)}", fontsize=10)
    return image


def _vmax(deltas: Sequence[ExpertDelta], threshold: Threshold) -> float:
    peaks = [np.nanmax(100.0 * d.share_grid(d.resolve(threshold))) if d.columns else 0.0 for d in deltas]
    peak = max([p for p in peaks if np.isfinite(p)], default=0.0)
    return float(peak) if peak > 0 else 1.0


def heatmap(delta: ExpertDelta, threshold: Threshold, path: str) -> str:
    figure = _figure(HEATMAP_SIZE)
    axes = figure.add_subplot(1, 1, 1)
    image = _panel(axes, delta, threshold, _vmax([delta], threshold), show_layers=True)
    figure.colorbar(image, ax=axes, label="% of rows above threshold")
    figure.tight_layout()
    return _save(figure, path)


def comparison(deltas: Sequence[ExpertDelta], threshold: Threshold, path: str) -> str:
    figure = _figure((PANEL_MARGIN + PANEL_WIDTH * len(deltas), HEATMAP_SIZE[1]))
    grid = figure.subplots(1, len(deltas), sharey=True, squeeze=False)[0]
    vmax = _vmax(deltas, threshold)
    image = None
    for index, (axes, delta) in enumerate(zip(grid, deltas)):
        image = _panel(axes, delta, threshold, vmax, show_layers=index == 0)
    figure.tight_layout(rect=(0, 0, 0.9, 1))
    bar_axes = figure.add_axes((0.92, 0.12, 0.02, 0.76))
    figure.colorbar(image, cax=bar_axes, label="% of rows above threshold")
    return _save(figure, path)


def profile(deltas: Sequence[ExpertDelta], path: str) -> str:
    figure = _figure(PROFILE_SIZE)
    top, bottom = figure.subplots(2, 1, sharex=True)
    for delta in deltas:
        values = delta.layer_profile()
        layers = np.arange(delta.num_layers)
        top.plot(layers, values, marker="o", markersize=3, label=delta.name)
        mean = np.nanmean(values)
        bottom.plot(layers, values / mean if mean > 0 else values, marker="o", markersize=3, label=delta.name)
    top.set_ylabel("mean row MAV")
    top.set_title("Change from the base per decoder layer")
    top.legend(fontsize=8)
    bottom.axhline(1.0, color="grey", linewidth=0.8, linestyle="--")
    bottom.set_ylabel("relative to its mean")
    bottom.set_xlabel("decoder layer (0 = bottom)")
    bottom.set_xticks(_layer_ticks(deltas[0].num_layers))
    for axes in (top, bottom):
        axes.grid(alpha=0.3)
    figure.tight_layout()
    return _save(figure, path)


def write_figures(deltas: Sequence[ExpertDelta], threshold: Threshold, out_dir: str) -> List[str]:
    """Every figure of one analysis; returns the written paths."""
    os.makedirs(out_dir, exist_ok=True)
    paths = [heatmap(d, threshold, os.path.join(out_dir, f"{d.name}_heatmap.png")) for d in deltas]
    if len(deltas) >= 2:
        paths.append(comparison(deltas, threshold, os.path.join(out_dir, "comparison_heatmap.png")))
    paths.append(profile(deltas, os.path.join(out_dir, "profile.png")))
    return paths

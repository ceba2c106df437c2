"""Draw what the model saw: each processed cloud (xyz, rgb in [-1, 1]) in its own colours from a few
viewpoints, one row per cloud, titled with the model's answer; saved as a PNG of an exact pixel size.

matplotlib's object API (``Figure`` with the Agg canvas) rather than pyplot: no global figure state and
no display backend, so it works in scripts, tests and headless servers alike.
"""
import textwrap

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

# (elevation, azimuth) in degrees with z up, as the processors rotate about z.
VIEWS = ((20, -60), (0, -90), (90, -90))
DPI = 100
# Mid grey: white and black clouds (both occur) stay visible against it.
BACKGROUND = "#8c8c8c"


def parse_size(text: str):
    """'800x400' -> (800, 400) pixels."""
    try:
        width, height = (int(v) for v in text.lower().split("x"))
    except ValueError:
        raise ValueError(f"render size must look like WIDTHxHEIGHT in pixels (e.g. 900x320), got {text!r}") from None
    if width < 50 or height < 50:
        raise ValueError(f"render size {width}x{height} is too small: at least 50x50 pixels")
    return width, height


def default_size(rows: int):
    return 300 * len(VIEWS), 320 * rows


def render_clouds(clouds, titles, path, size=None, max_points=4096):
    """Save ``clouds`` (each a (N, 6) tensor or array as the processor made it) with ``titles`` to
    ``path`` (PNG), ``size`` = (width, height) pixels, default 900 x 320 per cloud."""
    if not clouds:
        raise ValueError("nothing to render: no cloud was read")
    width, height = size or default_size(len(clouds))
    fig = Figure(figsize=(width / DPI, height / DPI), dpi=DPI)
    FigureCanvasAgg(fig)
    rows = fig.subfigures(len(clouds), 1, squeeze=False)[:, 0]
    chars_per_line = max(20, int(width / 8))  # ~8 px per character at the title's font size
    for row, cloud, title in zip(rows, clouds, titles):
        xyz, rgb = _drawable(np.asarray(cloud, dtype=np.float32), max_points)
        row.suptitle("\n".join(textwrap.wrap(title, chars_per_line)) or " ", fontsize=10)
        # The processors' frame, |xyz| <= 1, kept as is: size and placement are part of what the model saw.
        radius = max(1.0, float(np.abs(xyz).max()))
        marker = max(0.5, 4.0 * min(width / len(VIEWS), height / len(clouds)) / 300)
        row.subplots_adjust(left=0, right=1, bottom=0, top=0.88, wspace=0)
        for i, (elev, azim) in enumerate(VIEWS):
            ax = row.add_subplot(1, len(VIEWS), i + 1, projection="3d")
            ax.scatter(xyz[:, 0], xyz[:, 1], xyz[:, 2], c=rgb, s=marker, linewidths=0)
            ax.view_init(elev=elev, azim=azim)
            for set_lim in (ax.set_xlim, ax.set_ylim, ax.set_zlim):
                set_lim(-radius, radius)
            ax.set_box_aspect((1, 1, 1), zoom=1.25)
            ax.set_facecolor(BACKGROUND)
            ax.set_axis_off()
    fig.savefig(path, dpi=DPI, format="png", facecolor="white")
    return path


def _drawable(cloud, max_points):
    """xyz (n, 3) and rgb in [0, 1] (n, 3), evenly thinned to at most ``max_points``."""
    if len(cloud) > max_points:
        cloud = cloud[np.linspace(0, len(cloud) - 1, max_points).round().astype(np.int64)]
    return cloud[:, :3], np.clip((cloud[:, 3:6] + 1.0) / 2.0, 0.0, 1.0)

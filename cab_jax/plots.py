"""PNG figures through matplotlib (the optional ``plot`` extra), drawn on ``Figure`` objects: no pyplot, so no
global backend or figure state."""

from __future__ import annotations

from typing import Any

from absl import logging
from etils import epath


def new_figure(what: str, **kwargs) -> Any | None:
    """A ``matplotlib.figure.Figure(**kwargs)``; without matplotlib, logs that ``what`` is not drawn and returns
    None."""
    try:
        from matplotlib.figure import Figure
    except ImportError:
        logging.warning("No %s: matplotlib is not installed (pip install 'cab-jax[plot]').", what)
        return None
    return Figure(**kwargs)


def save_png(fig: Any, path: epath.Path) -> None:
    """``fig`` as a PNG at ``path`` (its directory created if needed)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    with path.open("wb") as f:
        fig.savefig(f, format="png", dpi=120)

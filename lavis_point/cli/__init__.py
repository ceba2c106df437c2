"""The ``lavis-point`` command (``main.py``) and its picture of what the model saw (``render.py``)."""
from lavis_point.cli.main import main

__all__ = ["main"]

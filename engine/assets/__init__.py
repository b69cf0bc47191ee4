"""Files shipped inside the package: the embedded demo clip and its attribution."""

from importlib.resources import as_file, files
from pathlib import Path

DEMO_CLIP_NAME = "demo_grid_bbaf2n.mpg"


def demo_clip() -> Path:
    """Path of the embedded demo clip (GRID corpus, CC BY 4.0; see ATTRIBUTION.md beside it)."""
    resource = files(__name__) / DEMO_CLIP_NAME
    with as_file(resource) as path:  # a real file for an installed (non-zip) package
        return Path(path)

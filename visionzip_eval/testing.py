"""Real photographs for tests, demos and benchmarks, from installed packages (no download).

The tiny offline models live with their families (``visionzip_eval.backends.*``, each
declared in its backend's ``builtin``; ``visionzip_eval.loading`` builds them by name).
"""

from __future__ import annotations


def sample_images() -> dict[str, "PIL.Image.Image"]:  # noqa: F821
    """Real photographs that ship inside installed packages (no download)."""
    from PIL import Image
    from skimage import data

    return {
        "astronaut": Image.fromarray(data.astronaut()),
        "coffee": Image.fromarray(data.coffee()),
        "chelsea": Image.fromarray(data.chelsea()),
        "rocket": Image.fromarray(data.rocket()),
    }


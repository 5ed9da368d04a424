"""lmms-eval integration: the ``visionzip`` model, registered through the
``lmms_eval.models`` entry point (see ``manifest.py`` and pyproject.toml)."""

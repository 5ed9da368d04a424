"""Efficient tuning under a token reduction (the paper's VisionZip‡) and its training cost.

``tune`` (``visionzip-eval tune``) fine-tunes a llava-hf LLaVA with the reduction applied as at
evaluation (``tune.py``, data in ``data.py``); ``cost.py`` measures a training step per budget
(``visionzip-eval bench train``); ``synth_data.py`` exports synthetic training conversations for
the CPU demonstration.
"""

from visionzip_eval.tuning.tune import TUNING_JSON, TuneOptions, read_tuning, tune

__all__ = ["TUNING_JSON", "TuneOptions", "read_tuning", "tune"]

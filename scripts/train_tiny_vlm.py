#!/usr/bin/env python
"""Train the tiny reference VLM (visionzip_eval/synth/train.py) and save it.

    python scripts/train_tiny_vlm.py                       # the shipped recipe, into the package
    python scripts/train_tiny_vlm.py --out /tmp/vlm --llm-steps 200   # a quick look

Seeded and CPU-only (torch threads fixed by --threads); the shipped weights were made by the
first command on a 2-core machine. After training, `visionzip-eval sweep configs/synth.yaml`
measures the model on the visionzip_synth_* tasks.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from visionzip_eval.synth.train import TrainConfig, train  # noqa: E402
from visionzip_eval.synth.weights import SHIPPED_DIR  # noqa: E402


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=SHIPPED_DIR, help=f"output folder (default: {SHIPPED_DIR})")
    for field in dataclasses.fields(TrainConfig):
        parser.add_argument("--" + field.name.replace("_", "-"), type=type(field.default), default=field.default,
                            help=f"(default: {field.default})")
    args = parser.parse_args(argv)
    config = TrainConfig(**{f.name: getattr(args, f.name) for f in dataclasses.fields(TrainConfig)})
    train(args.out, config, log=lambda line: print(line, flush=True))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

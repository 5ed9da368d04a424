"""Export synthetic training conversations (training seeds, never the benchmark's) in LLaVA's
instruction format, with the images on disk, for ``visionzip-eval tune``.

    python scripts/export_synth_llava.py --output data/synth_llava --scenes 600
    visionzip-eval tune --model builtin:tiny-llava-synth --method visionzip --budget 64 \\
        --data data/synth_llava/synth_llava.json --image-folder data/synth_llava --train projector ...

See visionzip_eval/tuning/synth_data.py for the split and the question mix.
"""

from __future__ import annotations

import argparse
import sys

from visionzip_eval.tuning.synth_data import export_llava


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--output", required=True, help="folder for synth_llava.json and images/")
    parser.add_argument("--scenes", type=int, default=600, help="scenes (images); 17 questions each (600)")
    parser.add_argument("--seed", type=int, default=0, help="training-stream seed (0)")
    args = parser.parse_args(argv)
    try:
        path = export_llava(args.output, args.scenes, args.seed)
    except ValueError as error:
        print(f"export_synth_llava: error: {error}", file=sys.stderr)
        return 2
    print(f"{path} ({args.scenes} images) written; --image-folder {args.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""``visionzip-eval``: thin command line over the package (parse, call, print)."""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
from pathlib import Path

# Nothing heavy at module level: `visionzip-eval --help` must not import torch (each command
# imports what it needs when it runs).


def _ensure_writable(directory: str | Path, what: str, fix: str = "pass a folder you can write to") -> None:
    """ValueError (one line) unless ``directory`` is a folder this process can write into, or
    one it can create. Checked before any model loads; leaves nothing behind (the probe is a
    temporary folder, removed at once) and touches nothing that exists."""
    path = Path(directory)
    if path.exists() and not path.is_dir():
        raise ValueError(f"{what} {path}: that is a file, not a folder: {fix}")
    existing = path
    while not existing.exists():
        if existing.is_symlink():
            raise ValueError(f"{what} {path}: {existing} is a broken link: {fix}")
        if existing.parent == existing:
            break
        existing = existing.parent
    if not existing.is_dir():
        raise ValueError(f"{what} {path}: {existing} is a file, not a folder: {fix}")
    try:
        probe = tempfile.mkdtemp(prefix=".visionzip-eval-write-check-", dir=existing)
    except OSError as error:
        reason = error.strerror or type(error).__name__
        raise ValueError(f"{what} {path}: cannot create folders in {existing} ({reason}): {fix}") from None
    os.rmdir(probe)


def _shown(path: str | Path) -> str:
    """A path as printed: relative to the current directory when under it, else absolute."""
    absolute = Path(os.path.abspath(path))
    for base, target in ((Path.cwd(), absolute), (Path.cwd().resolve(), absolute.resolve())):
        try:
            return str(target.relative_to(base))
        except ValueError:
            pass
    return str(absolute)


def _cmd_tiny_model(args: argparse.Namespace) -> int:
    _ensure_writable(args.directory, "tiny-model DIRECTORY")
    from visionzip_eval.backends.llava_hf import save_tiny_llava

    path = save_tiny_llava(args.directory, seed=args.seed)
    print(f"tiny LLaVA (random weights, seed {args.seed}) saved to {path}")
    print("load it offline with LlavaForConditionalGeneration.from_pretrained / AutoProcessor.from_pretrained")
    return 0


def _cmd_bench_tower(args: argparse.Namespace) -> int:
    from visionzip_eval.bench import CLIP_L, bench_tower, format_tower_rows, noise_guarded

    sizes = CLIP_L if not args.tiny else dict(vision_hidden=64, vision_layers=4, vision_heads=4)
    progress = (lambda msg: print(msg, file=sys.stderr, flush=True)) if not args.quiet else (lambda msg: None)
    rows, guard = noise_guarded(lambda: bench_tower(
        batch_sizes=tuple(args.batch), repeats=args.repeats, sizes=sizes, progress=progress
    ))
    _print_bench(args, rows, guard, format_tower_rows)
    return 0


def _print_bench(args: argparse.Namespace, rows: list[dict], guard: dict, formatter) -> None:
    """The rows (each carrying the machine's noisy flag in JSON) or the table and the flag's line."""
    from visionzip_eval.bench import format_noise

    if args.json:
        print(json.dumps([dict(row, noisy=guard["noisy"], noise=guard["noise"]) for row in rows], indent=2))
    else:
        print(formatter(rows))
        print(format_noise(guard))


def _cmd_bench_prefill(args: argparse.Namespace) -> int:
    from visionzip_eval.bench import bench_prefill, format_prefill_rows, noise_guarded

    # --tiny: a 4-layer LLM, deep enough for the in-LLM methods' default layers (FastV's K=2)
    sizes = None if not args.tiny else dict(vision_hidden=64, vision_layers=4, vision_heads=4, text_layers=4)
    progress = (lambda msg: print(msg, file=sys.stderr, flush=True)) if not args.quiet else (lambda msg: None)
    rows, guard = noise_guarded(lambda: bench_prefill(budgets=tuple(args.budgets), repeats=args.repeats, sizes=sizes,
                                                      progress=progress, methods=tuple(args.methods)))
    _print_bench(args, rows, guard, format_prefill_rows)
    return 0


def _cmd_bench_realsize(args: argparse.Namespace) -> int:
    from visionzip_eval.bench import bench_realsize, format_realsize

    progress = (lambda msg: print(msg, file=sys.stderr, flush=True)) if not args.quiet else (lambda msg: None)
    rows, info = bench_realsize(budgets=tuple(args.budgets), repeats=args.repeats, layers=args.layers,
                                dtype=args.dtype, device=args.device, max_minutes=args.max_minutes,
                                methods=tuple(args.methods), progress=progress, batches=tuple(args.batch))
    print(json.dumps(dict(rows=rows, run=info), indent=2) if args.json else format_realsize(rows, info))
    return 0


def _cmd_bench_serve(args: argparse.Namespace) -> int:
    from visionzip_eval.serving.bench import REALSIZE, bench_serve, format_serve

    if args.tiny + args.realsize + (args.pretrained is not None) > 1:
        raise ValueError("give one of --tiny, --realsize and --pretrained")
    pretrained = REALSIZE if args.realsize else args.pretrained or "builtin:tiny-llava-synth"
    progress = (lambda msg: print(msg, file=sys.stderr, flush=True)) if not args.quiet else (lambda msg: None)
    rows, info = bench_serve(pretrained, methods=tuple(args.methods), budgets=tuple(args.budgets),
                             concurrency=tuple(args.concurrency), requests=args.requests,
                             max_new_tokens=args.max_new_tokens, memory_fraction=args.memory_fraction,
                             progress=progress)
    print(json.dumps(dict(rows=rows, run=info), indent=2) if args.json else format_serve(rows, info))
    return 0


def _cmd_methods(args: argparse.Namespace) -> int:
    from visionzip_eval.methods import list_methods

    methods = [info.as_dict() for info in list_methods(args.kind)]
    if args.json:
        print(json.dumps(methods, indent=2))
        return 0
    lines = ["| method | kind | options (default) | what it keeps | paper, code |", "|---|---|---|---|---|"]
    for m in methods:
        options = ", ".join(f"`{o['name']}`: {o['type']} ({o['default']!r})" for o in m["options"]) or "-"
        source = ", ".join(part for part in (m["paper"], m["code"]) if part) or "-"
        lines.append(f"| `{m['name']}` | {m['kind']} | {options} | {m['description']} | {source} |")
    print("\n".join(lines))
    print("\nuse: model_args method=NAME,OPTION=VALUE (lmms-eval); methods: [NAME, {name: NAME, OPTION: VALUE}] (sweep)")
    return 0


def _cmd_sweep(args: argparse.Namespace) -> int:
    from visionzip_eval.sweep import format_plan, load_config, plan, run_sweep
    from visionzip_eval.sweep.tasks import check_tasks

    config = load_config(args.config)
    output_dir = args.output_dir or config.output_dir
    if not args.dry_run:  # a dry run writes nothing
        _ensure_writable(output_dir, "--output-dir" if args.output_dir else f"{args.config}: output_dir")
    runs = plan(config)
    check_tasks(config, source=args.config)  # before any model loads; the index is built once per command
    if args.dry_run:
        if args.json:
            print(json.dumps([dict(r.identity(), id=r.id) for r in runs], indent=2))
        else:
            print(f"sweep {config.name}: {len(runs)} runs into {output_dir}/runs/")
            print(format_plan(runs))
        return 0
    summary = run_sweep(config, output_dir, progress=not args.quiet,
                        slurm_cluster="debug" if args.slurm_debug else None, rerun_noisy=args.rerun_noisy)
    print(f"sweep {config.name} in {output_dir}: {summary.describe()}")
    if summary.failed:
        print("re-run the same command to retry the failed runs; each run's log is runs/<run>/run.log",
              file=sys.stderr)
        return 1
    return 0


def _cmd_report(args: argparse.Namespace) -> int:
    from visionzip_eval.report import TableOptions, write_report
    from visionzip_eval.report.build import REPORT_DIR

    if Path(args.results).is_dir():  # a missing one gets the report's own error
        _ensure_writable(Path(args.results) / REPORT_DIR, "report folder",
                         f"the report goes to RESULTS/{REPORT_DIR}/: move that away, or make RESULTS writable")
    options = TableOptions(pope_metric=args.pope_metric, mme=args.mme, paper=not args.no_paper,
                           intervals=args.intervals)
    report = write_report(args.results, options, plots=not args.no_plots)
    print(report.main_table)
    if report.frames_table:
        print("\n" + report.frames_table)
    print(f"\nreport written to {report.directory}/ ({len(report.paths)} files)")
    return 0


def _cmd_compare(args: argparse.Namespace) -> int:
    from visionzip_eval.report import TableOptions, load_results
    from visionzip_eval.report.compare import COMPARE_NOTE, Selector, compare, compare_markdown

    a, b = Selector.parse(args.a), Selector.parse(args.b)
    options = TableOptions(pope_metric=args.pope_metric, mme=args.mme)
    frame = compare(load_results(args.results), a, b, options, model=args.model)
    print(compare_markdown(frame))
    print("\n" + COMPARE_NOTE)
    return 0


def _cmd_regress(args: argparse.Namespace) -> int:
    from visionzip_eval.report import regress, write_baseline

    if args.update_baseline:
        baseline = write_baseline(args.results, args.baseline)
        print(f"baseline {args.baseline} written: {len(baseline['runs'])} runs, "
              f"{sum(len(v) for v in baseline['runs'].values())} values; review it, then commit it")
        return 0
    outcome = regress(args.results, args.baseline, args.junit, only_failures=args.only_failures)
    print(outcome.table)
    print(f"JUnit XML: {outcome.junit}")
    return outcome.exit_code


def _cmd_demo(args: argparse.Namespace) -> int:
    from visionzip_eval.budget import Budget
    from visionzip_eval.demos.demo import run_demo

    budgets = [Budget.parse(budget) for budget in args.budgets]  # a bad one: one-line error, no banner
    _ensure_writable(args.output_dir, "--output-dir")
    print("VisionZip demo: a tiny LLaVA-1.5 (CLIP 336/14: 576 patches + CLS) trained on the synthetic "
          f"benchmark, {'/'.join(b.label for b in budgets)} tokens, VisionZip and the random baseline; CPU, "
          f"offline -> {_shown(args.output_dir)}/", flush=True)
    summary, report, pictures = run_demo(args.output_dir, progress=not args.quiet, limit=args.limit,
                                         budgets=tuple(args.budgets))
    print(f"sweep: {summary.describe()}")
    print(report.main_table)
    efficiency = report.directory / "efficiency.md"
    print(f"\nefficiency table: {_shown(efficiency)}")
    for path in sorted(p for p in report.paths if str(p).endswith(".png")) + pictures:
        print(f"figure: {_shown(path)}")
    return 1 if summary.failed else 0


def _cmd_tune(args: argparse.Namespace) -> int:
    from visionzip_eval.tuning import TuneOptions, tune

    _ensure_writable(args.output, "--output")
    options = TuneOptions(**{name: getattr(args, name) for name in TuneOptions.__dataclass_fields__})
    record = tune(options)
    print(f"tuned {record['trained']} of {record['base_model']} under {record['method']} at {record['budget']}: "
          f"{record['steps']} steps, final loss {record['final_loss']}, {record['step_seconds_median']} s/step, "
          f"peak memory {record['peak_memory_bytes'] / 2**30:.2f} GiB ({record['peak_memory_kind']}) -> "
          f"{_shown(args.output)}/ (evaluate it with pretrained={_shown(args.output)})")
    return 0


def _cmd_bench_train(args: argparse.Namespace) -> int:
    from visionzip_eval.tuning.cost import bench_train, format_train_rows

    progress = (lambda msg: print(msg, file=sys.stderr, flush=True)) if not args.quiet else (lambda msg: None)
    rows, info = bench_train(budgets=tuple(args.budgets), parts=tuple(args.train), repeats=args.repeats,
                             batch=args.batch, tiny=args.tiny, device=args.device, progress=progress,
                             realsize=args.realsize)
    print(json.dumps(dict(rows=rows, run=info), indent=2) if args.json else format_train_rows(rows, info))
    return 0


def _cmd_lmms(args: argparse.Namespace) -> int:
    from visionzip_eval.sweep.lmms_cli import RunFailed, run_lmms_eval

    try:
        return run_lmms_eval(args.lmms_args)
    except RunFailed as error:  # the run went wrong (not the command line): exit 1, as regress does
        print(f"visionzip-eval: error: {error}", file=sys.stderr)
        return 1


def _load_model(name: str):
    """(model, processor) for visualize and app: fp16 on a GPU; the builtin tiny models on the CPU."""
    from visionzip_eval.loading import BUILTIN_PREFIX, load_pretrained, resolve_device, resolve_dtype

    device = resolve_device("cpu" if name.startswith(BUILTIN_PREFIX) else "auto")
    return load_pretrained(name, resolve_dtype("auto", device), device)


def _check_port_free(host: str, port: int) -> None:
    """ValueError (one line, naming --port) unless ``host:port`` can be bound, as the server will
    (SO_REUSEADDR set, so a port in TIME_WAIT counts as free)."""
    import socket

    with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind((host, port))
        except OSError as error:
            reason = error.strerror or type(error).__name__
            raise ValueError(f"cannot serve on {host}:{port} ({reason}): pass a free port with --port, "
                             f"or another address with --host") from None


def _cmd_app(args: argparse.Namespace) -> int:
    import importlib.util

    if importlib.util.find_spec("gradio") is None:
        raise ValueError('the app needs gradio: pip install "visionzip-eval[app]"')
    _check_port_free(args.host, args.port)  # before the model loads; gradio's advice names its own API
    from visionzip_eval.demos.app import build_app
    from visionzip_eval.synth.benchmark import build_docs
    from visionzip_eval.synth.scenes import render

    model, processor = _load_model(args.model)
    _, scenes = build_docs("pope", n_scenes=4)
    page = build_app(model, processor, examples=[render(scene)[0] for scene in scenes], model_name=args.model)
    page.launch(server_name=args.host, server_port=args.port)
    return 0


def _cmd_visualize(args: argparse.Namespace) -> int:
    from PIL import Image, UnidentifiedImageError

    from visionzip_eval.demos.visualize import visualize

    try:
        image = Image.open(args.image)
        image.load()
    except (OSError, UnidentifiedImageError) as error:
        raise ValueError(f"cannot read image {args.image}: {error}") from error
    if args.out:  # before the model loads: a file where a folder should be, an unwritable folder
        _ensure_writable(Path(args.out).parent, "--out", "pass an --out path in a folder you can write to")
    if not args.redundancy:  # an unknown or in-LLM method, a bad budget: before the model loads
        from visionzip_eval.demos.visualize import drawable

        for budget in [b.strip() for b in args.budget.split(",") if b.strip()]:
            if budget != "full":  # refused by visualize itself, with its own reason
                drawable(args.method, budget)
    model, processor = _load_model(args.model)
    if args.redundancy:
        from visionzip_eval.demos.redundancy import redundancy_figure, tower_redundancy

        pixel_values = processor.image_processor([image.convert("RGB")], return_tensors="pt")["pixel_values"]
        stats = tower_redundancy(model, pixel_values)
        out = args.out or f"{Path(args.image).stem}_redundancy.png"
        Path(out).parent.mkdir(parents=True, exist_ok=True)
        redundancy_figure(stats, image.convert("RGB"), title=f"{Path(args.image).name}: {args.model}").savefig(out, dpi=100)
        print(f"redundancy view written to {out} (top-{stats.top_k} share of CLS attention by layer: "
              + ", ".join(f"{100 * share:.0f}%" for share in stats.top_share) + ")")
        return 0
    budgets = [b.strip() for b in args.budget.split(",") if b.strip()]
    sheet, _ = visualize(model, processor, image, budgets, args.method)
    out = args.out or f"{Path(args.image).stem}_{args.method.split(',')[0]}.png"
    Path(out).parent.mkdir(parents=True, exist_ok=True)
    sheet.save(out)
    print(f"selection picture ({sheet.width}x{sheet.height}) written to {out}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="visionzip-eval",
        description="VisionZip visual-token reduction for vision-language models: apply, measure, benchmark.",
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser(
        "demo",
        help="sweep + report + selection pictures on the tiny trained model (CPU, offline, a few minutes)",
        description="Runs the tiny LLaVA trained on the synthetic benchmark (weights in the package) over the "
        "synthetic tasks and the smoke VideoMME task at each budget with VisionZip and the random baseline, "
        "writes the report (tables, figures) and token-selection pictures under OUTPUT/report/, and prints "
        "the main table and the figure paths. Resumable like any sweep.",
    )
    p.add_argument("--output-dir", default="results/demo", help="where runs and report go (results/demo)")
    p.add_argument("--budgets", nargs="+", default=["full", "192", "128", "64"],
                   help="budgets: full, a total (64) or a split (54+10)")
    p.add_argument("--limit", type=int, default=48, help="samples per task (48; even, for MME's pairs)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=_cmd_demo)

    p = sub.add_parser(
        "visualize",
        help="picture of which tokens VisionZip keeps and merges for an image",
        description="Draws the image's patch grid at each budget: dominant patches framed yellow, merged patches "
        "tinted with the colour of their contextual token (targets framed white), and the CLS-attention heatmap.",
    )
    p.add_argument("image", help="an image file")
    p.add_argument("--budget", default="64", help="one budget or several, comma-separated: 192,128,64")
    p.add_argument("--method", default="visionzip",
                   help="a registered pre-LLM method whose selection to draw, options after commas "
                   "(visionzip-eval methods --kind pre-llm; default: visionzip)")
    p.add_argument("--model", default="builtin:tiny-llava-synth",
                   help="builtin:tiny-llava-synth (default: the tiny trained model), builtin:tiny-llava (random "
                   "weights), or a supported checkpoint (folder or hub id)")
    p.add_argument("--redundancy", action="store_true",
                   help="instead: the redundancy view (per tower layer, how much of the CLS attention the top 54 "
                   "patches hold, its entropy, and how alike the remaining patches are: VisionZip's motivation)")
    p.add_argument("--out", help="output PNG (default: <image>_visionzip.png, or <image>_redundancy.png)")
    p.set_defaults(func=_cmd_visualize)

    p = sub.add_parser(
        "app",
        help="Demo-Chat page: choose the visual tokens the LLM sees, chat about the image, redundancy view (needs gradio)",
        description="Serves a gradio page (pip install \"visionzip-eval[app]\") with the tiny trained model and "
        "synthetic scenes by default (CPU, offline). Choose the tokens: click patches on the image's grid, start "
        "from any method's selection, tick CLS, merge the rest into contextual tokens; ask (several turns: the "
        "visual tokens are computed once), optionally beside the answer with all tokens. Redundancy view: how "
        "the tower's CLS attention concentrates, layer by layer.",
    )
    p.add_argument("--model", default="builtin:tiny-llava-synth", help="as for visualize")
    p.add_argument("--host", default="127.0.0.1", help="address to serve on (127.0.0.1)")
    p.add_argument("--port", type=int, default=7860, help="port (7860)")
    p.set_defaults(func=_cmd_app)

    p = sub.add_parser(
        "lmms",
        help="lmms-eval's command line, exit 1 when a task failed (python -m lmms_eval exits 0 then)",
        description="visionzip-eval lmms ARGS...: runs python -m lmms_eval ARGS (unchanged; needs --output_path) "
        "and exits 1 with the failure in one line when lmms-eval failed, raised, wrote no results file, or its "
        "results lack a metric for a task asked for; 0 otherwise. lmms-eval itself exits 0 in all those cases. "
        "Python tracebacks are held back (add --verbosity DEBUG to see them).",
    )
    p.add_argument("lmms_args", nargs="*", metavar="ARGS", help="lmms-eval's arguments, e.g. --model visionzip ...")
    p.set_defaults(func=_cmd_lmms)

    p = sub.add_parser(
        "methods",
        help="list the registered token-reduction methods, their kind and options",
        description="Prints every registered method (visionzip_eval/methods/): its kind (pre-llm: before the "
        "LLM, text-agnostic; in-llm: inside the LLM), its options with types and defaults, and its paper and "
        "official code.",
    )
    p.add_argument("--kind", choices=["pre-llm", "in-llm"], help="only methods of this kind")
    p.add_argument("--json", action="store_true", help="JSON instead of a Markdown table")
    p.set_defaults(func=_cmd_methods)

    p = sub.add_parser(
        "sweep",
        help="run models x methods x budgets x tasks from a YAML config (resumable)",
        description="Expands CONFIG into runs, one folder each under OUTPUT/runs/. Complete runs "
        "(run.json with status ok) are skipped, killed ones redone, failed ones retried; exits 1 if any "
        "run failed.",
    )
    p.add_argument("config", help="sweep YAML (see configs/)")
    p.add_argument("--output-dir", help="override the config's output_dir")
    p.add_argument("--dry-run", action="store_true", help="print the plan, run nothing")
    p.add_argument("--json", action="store_true", help="with --dry-run: the plan as JSON")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.add_argument("--slurm-debug", action="store_true",
                   help="with executor kind slurm: run the jobs here through submitit's debug executor")
    p.add_argument("--rerun-noisy", action="store_true",
                   help="also run again the complete runs timed on a noisy machine (other processes busy, or "
                   "the calibration probe off the sweep's median by over 40%%: the report marks them); each "
                   "old result is replaced only once its new one has landed")
    p.set_defaults(func=_cmd_sweep)

    p = sub.add_parser(
        "report",
        help="tables (Markdown, LaTeX, CSV) and figures from a sweep's results into RESULTS/report/",
        description="Reads every run under RESULTS/runs/ (failed and incomplete ones are listed), writes "
        "table.md/.tex/.csv (scores in the paper's layout), efficiency.md/.tex/.csv, runs.csv, collected.csv "
        "and figures (PNG + PDF) into RESULTS/report/, and prints the score table. Writes nowhere else.",
    )
    p.add_argument("results", help="the sweep's output directory (holding runs/)")
    p.add_argument("--pope-metric", choices=["f1", "accuracy"], default="f1", help="POPE column (default: f1)")
    p.add_argument("--mme", choices=["perception", "total"], default="perception",
                   help="MME column: perception (0-2000, default) or perception + cognition (the paper's)")
    p.add_argument("--no-paper", action="store_true", help="leave out the paper's reference rows")
    p.add_argument("--no-plots", action="store_true", help="tables only")
    p.add_argument("--intervals", action="store_true",
                   help="score cells of table.md/.tex as 'score ± half-width' of their 95%% interval (table.csv "
                        "always has the interval columns)")
    p.set_defaults(func=_cmd_report)

    p = sub.add_parser(
        "compare",
        help="paired difference of two methods in one sweep, per benchmark and budget, with a 95%% interval "
             "and a paired test",
        description="B minus A on the questions both answered (MME: image pairs; MMBench: circular groups), per "
        "benchmark and budget, and in Avg retention: the difference, its 95%% paired-bootstrap interval, the exact "
        "McNemar test (binary correctness) or the paired bootstrap's p, and 'not distinguishable at this n' where "
        "p >= 0.05. A and B are METHOD[@BUDGET]: METHOD as the run folders name it (visionzip, random, "
        "fastv,count=average; vanilla or none: the unreduced model), BUDGET a budget label (64, 54+10, full). "
        "Without @BUDGET: every budget both ran (a side run at one budget only, like vanilla, is paired with each "
        "of the other's). Examples: compare results/methods_synth visionzip@64 random@64; "
        "compare results/synth vanilla visionzip.",
    )
    p.add_argument("results", help="the sweep's output directory (holding runs/)")
    p.add_argument("a", metavar="A", help="METHOD[@BUDGET], e.g. visionzip@64")
    p.add_argument("b", metavar="B", help="METHOD[@BUDGET], e.g. random@64")
    p.add_argument("--model", default=None, help="the model, when the results hold several")
    p.add_argument("--pope-metric", choices=["f1", "accuracy"], default="f1", help="POPE score (default: f1)")
    p.add_argument("--mme", choices=["perception", "total"], default="perception",
                   help="MME score: perception (default) or perception + cognition")
    p.set_defaults(func=_cmd_compare)

    p = sub.add_parser(
        "regress",
        help="compare a sweep's results with a stored baseline (exit 1 on any regression)",
        description="Checks every baselined value (scores, visual-token counts, sample counts, FLOPs, latency, "
        "memory) against the tolerances stored in the baseline file; prints a pass/fail table and writes JUnit "
        "XML. Exit 0 when all pass, 1 on any failure; a missing or placeholder baseline is an error.",
    )
    p.add_argument("results", help="the sweep's output directory (holding runs/)")
    p.add_argument("--baseline", required=True, help="baseline JSON (see baselines/README.md)")
    p.add_argument("--junit", help="JUnit XML path (default: RESULTS/report/regress.xml)")
    p.add_argument("--update-baseline", action="store_true",
                   help="write the baseline from these results instead (keeps the file's tolerances)")
    p.add_argument("--only-failures", action="store_true", help="print only the failed checks")
    p.set_defaults(func=_cmd_regress)

    p = sub.add_parser("tiny-model", help="save a tiny random-weight LLaVA (model, tokenizer, processor)")
    p.add_argument("directory", help="output folder; from_pretrained(directory) loads it with no network")
    p.add_argument("--seed", type=int, default=0, help="weight seed (same seed, same weights)")
    p.set_defaults(func=_cmd_tiny_model)

    p = sub.add_parser(
        "tune",
        help="fine-tune a llava-hf LLaVA under a token reduction (VisionZip‡: the projector, on LLaVA data)",
        description="Fine-tunes PRETRAINED (llava-hf LLaVA-1.5) with the reduction applied in the forward exactly "
        "as at evaluation, on LLaVA-format instruction data (a JSON list of {id, image, conversations}), loss on "
        "the assistant replies only, with transformers' Trainer (mixed precision on a GPU, checkpoints, resume; "
        "multi-GPU with torchrun / accelerate launch). OUTPUT loads with from_pretrained and as pretrained=OUTPUT; "
        "its visionzip_tuning.json (written last) records what was trained, and the report labels its runs "
        "VisionZip‡. Every input is checked before training starts.",
    )
    p.add_argument("--model", required=True, help="hub id, folder or builtin:tiny-llava-synth")
    p.add_argument("--method", default="visionzip", help="a pre-LLM method (default: visionzip)")
    p.add_argument("--budget", default="64", help="visual tokens per image: 64, 128, 192, a split 54+10, or full")
    p.add_argument("--data", required=True, help="LLaVA instruction JSON (e.g. llava_v1_5_mix665k.json)")
    p.add_argument("--image-folder", required=True, help="folder the samples' image paths are relative to")
    p.add_argument("--train", default="projector", help="projector (default, the paper's), projector+llm, or all")
    p.add_argument("--output", required=True, help="output folder (empty, or an unfinished run's with --resume)")
    p.add_argument("--max-steps", type=int, default=-1, help="optimizer steps (default: --epochs over the data)")
    p.add_argument("--epochs", type=float, default=1.0, help="passes over the data (1)")
    p.add_argument("--lr", type=float, default=2e-5, help="peak learning rate, cosine schedule (2e-5)")
    p.add_argument("--batch-size", type=int, default=16, help="samples per device per step (16)")
    p.add_argument("--grad-accum", type=int, default=1, help="gradient accumulation steps (1)")
    p.add_argument("--data-fraction", type=float, default=1.0,
                   help="seeded share of the samples to train on (the paper: 0.1 of mix665k)")
    p.add_argument("--seed", type=int, default=0, help="seed of the subset, data order and training (0)")
    p.add_argument("--resume", action="store_true", help="continue from the last checkpoint in --output")
    p.add_argument("--save-steps", type=int, default=500, help="checkpoint every this many steps (500)")
    p.add_argument("--logging-steps", type=int, default=10, help="log loss, step time, memory every N steps (10)")
    p.add_argument("--warmup", type=float, default=0.03, help="warm-up: ratio of the steps (<1) or steps (0.03)")
    p.add_argument("--weight-decay", type=float, default=0.0, help="AdamW weight decay (0)")
    p.add_argument("--max-length", type=int, default=2048, help="longest sequence in tokens, image included (2048)")
    p.add_argument("--dtype", default="auto",
                   help="auto (bfloat16 on a GPU with mixed precision, float32 on a CPU), float32, bfloat16, float16")
    p.add_argument("--image-aspect", default=None, help="LLaVA-1.5 images: pad (the original recipe) or crop")
    p.add_argument("--gradient-checkpointing", action="store_true", help="recompute activations in backward")
    p.add_argument("--deepspeed", default=None, help="a DeepSpeed config JSON (passed to the Trainer)")
    p.add_argument("--num-workers", type=int, default=0, help="data-loading worker processes (0)")
    p.set_defaults(func=_cmd_tune)

    p = sub.add_parser("bench", help="benchmarks that print figures")
    bench = p.add_subparsers(dest="bench", required=True, metavar="BENCH")
    b = bench.add_parser(
        "tower",
        help="VisionZip step vs. the vision tower, and the official eager+output_attentions tower",
        description="On a CLIP-L-sized random tower (24 layers, 1024 wide, 336 px), CPU: median times of the "
        "plain SDPA tower, our capture, the VisionZip step, and the official approach.",
    )
    b.add_argument("--batch", type=int, nargs="+", default=[1, 8], help="batch sizes (default: 1 8)")
    b.add_argument("--repeats", type=int, default=3, help="timed repeats per tower measurement")
    b.add_argument("--tiny", action="store_true", help="use the tiny tower instead (a quick check)")
    b.add_argument("--json", action="store_true", help="print JSON rows instead of a Markdown table")
    b.add_argument("--quiet", action="store_true", help="no progress lines on stderr")
    b.set_defaults(func=_cmd_bench_tower)
    b = bench.add_parser(
        "prefill",
        help="LLM prefill and time to first token per method and budget, beside the FLOPs-predicted ratio",
        description="On a CPU proxy VLM (CLIP-L tower, 8-layer 1024-wide Llama, random weights): median "
        "vision, prefill and TTFT per method and budget in one run (round-robin), and the prefill speed-up the "
        "FLOPs formula predicts. Example: visionzip-eval bench prefill --methods visionzip fastv sparsevlm --budgets full 64",
    )
    b.add_argument("--budgets", nargs="+", default=["full", "192", "128", "64"], help="budgets, full first")
    b.add_argument("--methods", nargs="+", default=["visionzip"],
                   help="registered methods to compare (visionzip-eval methods lists them; default: visionzip)")
    b.add_argument("--repeats", type=int, default=3, help="timed runs per budget (after one warm-up)")
    b.add_argument("--tiny", action="store_true", help="use the tiny model instead (a quick check)")
    b.add_argument("--json", action="store_true", help="print JSON rows instead of a Markdown table")
    b.add_argument("--quiet", action="store_true", help="no progress lines on stderr")
    b.set_defaults(func=_cmd_bench_prefill)
    b = bench.add_parser(
        "train",
        help="one training step (forward + backward) per budget and trained part, beside the FLOPs-predicted ratio",
        description="On the CPU proxy VLM of bench prefill (CLIP-L tower, 8-layer 1024-wide Llama, random weights; "
        "--tiny: a tiny one), or on a GPU when present: the time of one training step (forward + backward, no "
        "optimizer update) at each budget, training the projector alone or everything, round-robin with the "
        "min-max spread, beside the FLOPs-predicted speed-up, and the memory each step needs (CUDA peak on a GPU; "
        "on a CPU the bytes autograd saves for backward, measured).",
    )
    b.add_argument("--budgets", nargs="+", default=["full", "192", "128", "64"], help="budgets, full first")
    b.add_argument("--train", nargs="+", default=["projector", "all"], help="trained parts (projector all)")
    b.add_argument("--repeats", type=int, default=2, help="timed rounds (after one warm-up; default 2)")
    b.add_argument("--batch", type=int, default=1, help="samples per step (1)")
    b.add_argument("--device", default=None, help="cuda or cpu (default: cuda when present)")
    b.add_argument("--tiny", action="store_true", help="use the tiny model instead (a quick check)")
    b.add_argument("--realsize", action="store_true",
                   help="LLaVA-1.5-7B's exact architecture, random weights, float32 master weights (a GPU only)")
    b.add_argument("--json", action="store_true", help="print JSON instead of the table")
    b.add_argument("--quiet", action="store_true", help="no progress lines on stderr")
    b.set_defaults(func=_cmd_bench_train)
    b = bench.add_parser(
        "realsize",
        help="prefill and TTFT of LLaVA-1.5-7B's exact architecture (random weights) per budget",
        description="LLaVA-1.5-7B's exact architecture (CLIP-L/336, projector, the 7B Llama: 4096 wide, 32 layers, "
        "11008 MLP, vocab 32064) with random weights: median vision, prefill and TTFT per budget in one run "
        "(round-robin), beside the FLOPs-predicted and roofline-predicted speed-ups, measured/roofline, the KV cache "
        "and peak memory. fp16 on a GPU, float32 on a CPU (its bfloat16 matmul runs ~100x slower). Checks free "
        "memory and the expected run time first and refuses in one line, naming a --layers that fits.",
    )
    b.add_argument("--budgets", nargs="+", default=["full", "192", "128", "64"], help="budgets, full first")
    b.add_argument("--methods", nargs="+", default=["visionzip"], help="registered methods (default: visionzip)")
    b.add_argument("--repeats", type=int, default=2, help="timed runs per budget (after one warm-up; default 2)")
    b.add_argument("--layers", type=int, default=32,
                   help="decoder layers to build, each of the 7B's exact size (default: all 32)")
    b.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"],
                   help="weights' dtype (auto: float16 on a GPU, float32 on a CPU)")
    b.add_argument("--device", default=None, help="cuda or cpu (default: cuda when present)")
    b.add_argument("--max-minutes", type=float, default=30.0,
                   help="refuse when the measured matmul rate says the run takes longer (default 30)")
    b.add_argument("--batch", type=int, nargs="+", default=[1],
                   help="batch sizes (b copies of the request per generate call); rows report requests/s (default 1)")
    b.add_argument("--json", action="store_true", help="print JSON (rows and run facts) instead of the table")
    b.add_argument("--quiet", action="store_true", help="no progress lines on stderr")
    b.set_defaults(func=_cmd_bench_realsize)
    b = bench.add_parser(
        "serve",
        help="pre-LLM methods served by vLLM: requests/s, TTFT and latency per method, budget and concurrency",
        description="A real vLLM engine (run it from .venv-vllm: scripts/setup_vllm.sh) serving the tiny trained model, "
        "a pretrained= checkpoint folder, or LLaVA-1.5-7B's shape with random weights (--realsize, bfloat16): the "
        "method reduces the tower output in transformers and vLLM's LLM receives the rows as image embeddings. "
        "Per (method, budget, concurrency C), round-robin, batches of C distinct requests: requests/s, prompt "
        "tokens/s, TTFT and end-to-end p50/p90, the tower+reduction time, peak memory, beside the FLOPs- and "
        "roofline-predicted speed-ups at batch C, with the machine probe and noisy flag.",
    )
    b.add_argument("--methods", nargs="+", default=["visionzip"], help="pre-LLM methods (default: visionzip)")
    b.add_argument("--budgets", nargs="+", default=["full", "192", "128", "64"], help="budgets, full first")
    b.add_argument("--concurrency", type=int, nargs="+", default=[1, 8, 32], help="requests per batch (1 8 32)")
    b.add_argument("--requests", type=int, default=8, help="timed requests per row, at least (whole batches; 8)")
    b.add_argument("--max-new-tokens", type=int, default=8, help="tokens generated per request (EOS ignored; 8)")
    b.add_argument("--tiny", action="store_true", help="the tiny trained model (builtin:tiny-llava-synth; default)")
    b.add_argument("--realsize", action="store_true", help="LLaVA-1.5-7B's shape, random weights, bfloat16 (~17 GiB)")
    b.add_argument("--pretrained", default=None, help="a local LLaVA-1.5 checkpoint folder")
    b.add_argument("--memory-fraction", type=float, default=None,
                   help="vLLM's gpu_memory_utilization (on the CPU: weights + KV cache; 0.1 tiny, 0.72 realsize)")
    b.add_argument("--json", action="store_true", help="print JSON (rows and run facts) instead of the table")
    b.add_argument("--quiet", action="store_true", help="no progress lines on stderr")
    b.set_defaults(func=_cmd_bench_serve)
    return parser


# What Ctrl-C prints, per command (exit 130, no traceback): resumable commands say how to resume.
_INTERRUPTED = {"sweep": "re-run the same command to resume", "demo": "re-run the same command to resume",
                "tune": "re-run it with --resume to continue from the last checkpoint"}


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] == ["lmms"]:  # everything after `lmms` is lmms-eval's, --help included
        args = argparse.Namespace(command="lmms", func=_cmd_lmms, lmms_args=argv[1:])
    else:
        args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except ValueError as error:  # bad input: one line, no traceback
        print(f"visionzip-eval: error: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        hint = _INTERRUPTED.get(args.command)
        print(f"\ninterrupted{': ' + hint if hint else ''}", file=sys.stderr)
        return 130
    except BrokenPipeError:
        if not _stdout_closed():  # some other pipe broke: not ours to hide
            raise
        # `visionzip-eval methods | head`: the reader left. Silent, with the status of a process
        # ended by SIGPIPE (128 + 13), as `yes | head` gives: a sweep cut short is not a success.
        devnull = os.open(os.devnull, os.O_WRONLY)  # the interpreter's last flush must not raise
        os.dup2(devnull, sys.stdout.fileno())
        return 141


def _stdout_closed() -> bool:
    """Whether stdout is a pipe whose reader has gone (poll reports an error on it)."""
    import select

    try:
        poller = select.poll()
        poller.register(sys.stdout.fileno(), select.POLLOUT)
        return any(event & select.POLLERR for _, event in poller.poll(0))
    except (AttributeError, OSError, ValueError):  # no poll (Windows), or stdout is no file
        return False


if __name__ == "__main__":
    sys.exit(main())

"""Issue #28, items 5 and 6: `visionzip-eval lmms` judged by the files lmms-eval wrote, the adapter's
MME pair rule, and the stumbles a new user met (Ctrl-C, a closed pipe, a taken port, ...)."""

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from visionzip_eval.cli import main

REPO = Path(__file__).resolve().parents[1]
PREFIX = "visionzip-eval: error: "


def error_lines(text: str) -> list[str]:
    return [line for line in text.splitlines() if line.startswith(PREFIX)]


# -- visionzip-eval lmms ----------------------------------------------------------------------------

STUB = '''
import json, os, sys
from pathlib import Path

args = sys.argv[1:]
out = Path(args[args.index("--output_path") + 1])
mode = os.environ["STUB_MODE"]
print("stub lmms-eval running", flush=True)
if mode == "raise":  # what lmms-eval does with an exception from the model: traceback, exit 0
    try:
        raise ValueError("unknown method 'bogus': choose one of visionzip")
    except ValueError:
        import traceback
        traceback.print_exc()
    sys.exit(0)
if mode == "exit3":
    sys.exit(3)
results = {"results": {"t1": {"alias": "t1", "acc,none": 0.5}}, "configs": {"t1": {}}, "group_subtasks": {"t1": []}}
if mode == "unscored":
    results["results"]["t1"] = {"alias": "t1"}
(out / "m").mkdir(parents=True, exist_ok=True)
(out / "m" / ("%s_results.json" % os.environ.get("STUB_STAMP", "1"))).write_text(json.dumps(results))
'''


@pytest.fixture
def stub_lmms(tmp_path, monkeypatch):
    """A stand-in `lmms_eval` package (its __main__ acts out STUB_MODE) first on the child's path."""
    package = tmp_path / "stub" / "lmms_eval"
    package.mkdir(parents=True)
    (package / "__init__.py").write_text("")
    (package / "__main__.py").write_text(STUB)
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join([str(tmp_path / "stub"), str(REPO)]))

    def run(mode, capfd, tasks="t1", stamp="1"):
        monkeypatch.setenv("STUB_MODE", mode)
        monkeypatch.setenv("STUB_STAMP", stamp)
        code = main(["lmms", "--model", "visionzip", "--tasks", tasks, "--output_path", str(tmp_path / "out")])
        return code, capfd.readouterr()

    return run


def test_lmms_passes_a_clean_run(stub_lmms, capfd):
    code, out = stub_lmms("ok", capfd)
    assert code == 0, out
    assert "stub lmms-eval running" in out.out  # lmms-eval's own output passes through
    assert error_lines(out.err) == []


def test_lmms_fails_on_a_swallowed_exception_in_one_line(stub_lmms, capfd):
    code, out = stub_lmms("raise", capfd)
    assert code == 1
    assert "Traceback" not in out.err and 'File "' not in out.err
    (line,) = error_lines(out.err)
    assert "wrote no results file" in line and "ValueError: unknown method 'bogus'" in line
    assert "--verbosity DEBUG" in line


def test_lmms_fails_on_a_task_missing_or_unscored(stub_lmms, capfd):
    code, out = stub_lmms("ok", capfd, tasks="t1,t2")
    assert code == 1 and "without t2" in error_lines(out.err)[0]
    code, out = stub_lmms("unscored", capfd, stamp="2")
    assert code == 1 and "no metric for t1" in error_lines(out.err)[0]


def test_lmms_does_not_take_an_old_results_file_for_this_run(stub_lmms, capfd):
    assert stub_lmms("ok", capfd)[0] == 0
    code, out = stub_lmms("raise", capfd)  # the earlier run's file is still there
    assert code == 1 and "wrote no results file" in error_lines(out.err)[0]


def test_lmms_nonzero_exit_is_a_failure(stub_lmms, capfd):
    code, out = stub_lmms("exit3", capfd)
    assert code == 1 and "exited with status 3" in error_lines(out.err)[0]


def test_lmms_needs_output_path_before_starting_anything(capsys):
    assert main(["lmms", "--model", "visionzip", "--tasks", "pope"]) == 2
    (line,) = capsys.readouterr().err.strip().splitlines()
    assert line.startswith(PREFIX) and "add --output_path DIR" in line


def test_traceback_filter_keeps_the_rest_and_the_last_exception():
    from visionzip_eval.sweep.lmms_cli import TracebackFilter

    kept = []
    sink = TracebackFilter(kept.append)
    text = ("before\n" "Traceback (most recent call last):\n" '  File "x.py", line 1, in <module>\n'
            "    f()\n" "KeyError: 'a'\n" "\n" "During handling of the above exception, another exception occurred:\n"
            "\n" "Traceback (most recent call last):\n" '  File "y.py", line 2\n' "ValueError: bad\n"
            "progress 50%\r" "progress 100%\r\n" "after\n")
    for part in text.splitlines(keepends=True):
        sink.feed(part)
    assert kept == ["before\n", "progress 50%\r", "progress 100%\r\n", "after\n"]
    assert sink.last_exception == "ValueError: bad"


def _real_lmms(tmp_path, method, task="visionzip_synth_pope", limit="4"):
    return main(["lmms", "--model", "visionzip", "--model_args", f"pretrained=builtin:tiny-llava-synth,method={method}",
                 "--tasks", task, "--include_path", str(REPO / "tasks"), "--limit", limit,
                 "--output_path", str(tmp_path / "out")])


@pytest.mark.slow
def test_lmms_real_run_with_a_bogus_method_fails_in_one_line(tmp_path, capfd):
    assert _real_lmms(tmp_path, "bogus") == 1
    err = capfd.readouterr().err
    assert "Traceback" not in err
    (line,) = error_lines(err)
    assert "unknown method 'bogus'" in line


@pytest.mark.slow
def test_lmms_real_run_passes_and_writes_results(tmp_path, capfd):
    assert _real_lmms(tmp_path, "visionzip") == 0
    (results,) = (tmp_path / "out").rglob("*_results.json")
    assert json.loads(results.read_text())["results"]["visionzip_synth_pope"]["pope_accuracy,none"] >= 0
    assert error_lines(capfd.readouterr().err) == []


@pytest.mark.slow
def test_lmms_real_run_refuses_an_odd_mme_limit(tmp_path, capfd):
    assert _real_lmms(tmp_path, "visionzip", task="visionzip_smoke_mme", limit="3") == 1
    (line,) = error_lines(capfd.readouterr().err)
    assert "MME scores its questions in pairs" in line and "visionzip_smoke_mme: 3" in line


def test_adapter_refuses_odd_mme_before_any_request(tmp_path):
    from helpers import generate_requests

    from visionzip_eval.lmms.adapter import VisionZipLMM
    from visionzip_eval.backends.llava_hf import build_tiny_llava

    lm = VisionZipLMM(model=build_tiny_llava(seed=0), output_dir=str(tmp_path), warmup=1, budget=64)
    lm.engine.generate = lambda *a, **k: pytest.fail("a request was answered")
    requests = generate_requests([0, 1, 2], task="visionzip_smoke_mme") + generate_requests([0], task="pope")
    with pytest.raises(ValueError, match=r"MME scores its questions in pairs .*\(visionzip_smoke_mme: 3\): use an even --limit"):
        lm.generate_until(requests)


# -- stumbles -------------------------------------------------------------------------------------


@pytest.fixture
def no_model_loads(monkeypatch):
    import visionzip_eval.loading

    monkeypatch.setattr(visionzip_eval.loading, "load_pretrained",
                        lambda *a, **k: pytest.fail("a model was loaded before the error"))


@pytest.mark.parametrize("command, hint", [("sweep", "interrupted: re-run the same command to resume"),
                                           ("methods", "interrupted")])
def test_ctrl_c_is_one_line_and_exit_130(tmp_path, monkeypatch, capsys, command, hint):
    import visionzip_eval.methods
    import visionzip_eval.sweep
    import visionzip_eval.sweep.tasks

    def interrupt(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(visionzip_eval.sweep, "run_sweep", interrupt)
    monkeypatch.setattr(visionzip_eval.sweep.tasks, "check_tasks", lambda *a, **k: None)
    monkeypatch.setattr(visionzip_eval.methods, "list_methods", interrupt)
    config = tmp_path / "s.yaml"
    config.write_text(f"name: t\nmodels: [{{name: tiny, pretrained: 'builtin:tiny-llava'}}]\nbudgets: [64]\n"
                      f"tasks: [visionzip_smoke_pope]\noutput_dir: {tmp_path / 'out'}\n")
    argv = ["sweep", str(config), "--quiet"] if command == "sweep" else ["methods"]
    assert main(argv) == 130
    assert capsys.readouterr().err.strip() == hint


def test_methods_into_a_closed_pipe_is_silent():
    """`visionzip-eval methods | head`: the reader is gone before the table is written."""
    read, write = os.pipe()
    os.close(read)
    child = subprocess.run([sys.executable, "-m", "visionzip_eval.cli", "methods", "--json"], stdout=write,
                           stderr=subprocess.PIPE, text=True, cwd=REPO, env={**os.environ, "PYTHONPATH": str(REPO)})
    os.close(write)
    assert child.stderr == ""
    assert child.returncode == 141  # 128 + SIGPIPE, as a process the pipe ended


def test_app_port_taken_names_port_before_the_model_loads(capsys, no_model_loads):
    import socket

    pytest.importorskip("gradio")
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        assert main(["app", "--port", str(port)]) == 2
    (line,) = capsys.readouterr().err.strip().splitlines()
    assert line.startswith(PREFIX) and f"127.0.0.1:{port}" in line and "--port" in line
    assert "server_port" not in line


def test_visualize_out_under_a_file_is_one_line_error(tmp_path, capsys, no_model_loads):
    from PIL import Image

    image = tmp_path / "img.png"
    Image.new("RGB", (32, 32), "red").save(image)
    (tmp_path / "afile").write_text("x")
    assert main(["visualize", str(image), "--out", str(tmp_path / "afile" / "x.png")]) == 2
    (line,) = capsys.readouterr().err.strip().splitlines()
    assert line.startswith(PREFIX) and "--out" in line and "afile" in line and "is a file" in line


@pytest.mark.parametrize("key, where, guess", [("budget", "budget", "budgets"),
                                               ("models.0.pretraind", "models.0.pretraind", "pretrained"),
                                               ("lmms_eval.gen_kwarg", "lmms_eval.gen_kwarg", "gen_kwargs"),
                                               ("zzzz", "zzzz", None)])
def test_config_key_typo_suggests_the_close_key(tmp_path, capsys, key, where, guess):
    import yaml

    config = {"name": "t", "models": [{"name": "tiny", "pretrained": "builtin:tiny-llava"}], "budgets": [64],
              "tasks": ["visionzip_smoke_pope"], "output_dir": str(tmp_path / "out"), "lmms_eval": {}}
    parts = key.split(".")
    if parts[0] == "budget":
        del config["budgets"]
    if parts[0] == "models":
        config["models"][0]["pretraind"] = config["models"][0].pop("pretrained")
    elif len(parts) == 2:
        config[parts[0]][parts[1]] = "x"
    else:
        config[parts[0]] = [64]
    path = tmp_path / "s.yaml"
    path.write_text(yaml.safe_dump(config))
    assert main(["sweep", str(path), "--dry-run"]) == 2
    (line,) = capsys.readouterr().err.strip().splitlines()
    assert f"{where}: unknown key" in line
    assert (f"did you mean {guess}?" in line) if guess else ("did you mean" not in line)


def _probe(time_s, gflops, busy_s, own_s=0.0):
    return {"time": time_s, "matmul_gflops": gflops, "copy_gbs": 1.0, "cores": 2, "system_busy_s": busy_s,
            "own_cpu_s": own_s}


@pytest.mark.parametrize("probes, noisy, why", [
    ([_probe(0, 50, 0), _probe(0, 50, 0), _probe(10, 48, 2, 1)], False, ""),
    ([_probe(0, 50, 0), _probe(0, 50, 0), _probe(10, 50, 16, 1)], True, "other processes used 75% of the cores"),
    ([_probe(0, 50, 0), _probe(0, 50, 0), _probe(10, 20, 1, 1)], True, "matmul probe after at 0.40x the one before"),
])
def test_bench_prefill_flags_a_noisy_machine(monkeypatch, capsys, probes, noisy, why):
    import visionzip_eval.bench
    import visionzip_eval.profiling

    row = dict(method="none", budget="full", visual_tokens=576, visual_tokens_after_pruning=576, prompt_tokens=600,
               vision_ms=1.0, prefill_ms=1000.0, prefill_ms_min=900.0, prefill_ms_max=1100.0, ttft_ms=1001.0,
               prefill_tflops=1.0, prefill_speedup=1.0, flops_predicted_speedup=1.0, ttft_speedup=1.0)
    monkeypatch.setattr(visionzip_eval.bench, "bench_prefill", lambda **kwargs: [row])
    monkeypatch.setattr(visionzip_eval.profiling, "machine_probe", lambda device="cpu": probes.pop(0))
    snapshot = list(probes)
    assert main(["bench", "prefill", "--tiny", "--quiet", "--json"]) == 0
    (printed,) = json.loads(capsys.readouterr().out)
    assert (printed["noisy"], printed["noise"]) == (noisy, why)
    probes[:] = snapshot
    assert main(["bench", "prefill", "--tiny", "--quiet"]) == 0
    last = capsys.readouterr().out.strip().splitlines()[-1]
    assert last.startswith("NOISY machine: " + why) if noisy else last.startswith("machine quiet")


def _requests(kind="process_peak_rss"):
    import pandas as pd

    rows = []
    for method, budget, tokens, ms in [("none", "full", 576, 100.0), ("visionzip", "64", 64, 20.0),
                                       ("random", "64", 64, 20.0), ("visionzip", "128", 128, 40.0),
                                       ("random", "128", 128, 41.0)]:
        for i in range(3):
            rows.append(dict(model="tiny", method=method, budget=budget, tokens_per_image=tokens, prefill_ms=ms,
                             prefill_roofline_ms=ms / (4 if method == "random" and budget == "128" else 2),
                             ttft_ms=ms + 1, ttft_roofline_ms=(ms + 1) / 2, roofline_device="cpu",
                             roofline_tflops=0.1, peak_memory_bytes=(1 + i + tokens / 576) * 2**30,
                             peak_memory_kind=kind))
    return pd.DataFrame(rows)


@pytest.fixture
def figure_of(monkeypatch, tmp_path):
    """Draw one plot function on a hand-made request frame; return its figure (not saved)."""
    import visionzip_eval.report.plots as plots

    def draw(plot, requests):
        figures = []
        monkeypatch.setattr(plots, "_image_requests", lambda results: requests)
        monkeypatch.setattr(plots, "_noisy_runs", lambda results: set())
        monkeypatch.setattr(plots, "_save", lambda fig, directory, stem: figures.append(fig) or [])
        plot(None, tmp_path)
        return figures[0]

    return draw


def test_roofline_labels_of_coinciding_methods_do_not_overprint(figure_of):
    from visionzip_eval.report.plots import plot_roofline

    fig = figure_of(plot_roofline, _requests())
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    canvas = FigureCanvasAgg(fig)
    canvas.draw()
    renderer = canvas.get_renderer()
    for ax in fig.axes:
        labels = [(t.get_text(), t.get_window_extent(renderer)) for t in ax.texts]
        # visionzip and random at 64 share their point and ratio: one "2.0×" there, not two on top
        assert [text for text, _ in labels].count("2.0×") == 3, labels
        for i, (_, a) in enumerate(labels):
            for _, b in labels[i + 1:]:
                assert not a.overlaps(b), labels
    assert any(t.get_text() == "4.0×" for t in fig.axes[0].texts)  # random at 128: its own label, stacked


@pytest.mark.parametrize("kind, lines", [("process_peak_rss", False), ("cuda_max_allocated", True)])
def test_memory_draws_no_trend_through_peak_rss(figure_of, kind, lines):
    from visionzip_eval.report.plots import plot_memory

    fig = figure_of(plot_memory, _requests(kind))
    (ax,) = fig.axes
    drawn = [line for line in ax.get_lines() if len(line.get_xdata()) > 1 and line.get_linestyle() not in ("None", "none", "")]
    assert bool(drawn) == lines
    assert len([line for line in ax.get_lines() if line.get_marker() not in (None, "None", "")]) >= 3  # points stay


@pytest.mark.parametrize("method", ["divprune", "vispruner", "random"])
def test_visualize_draws_any_pre_llm_methods_selection(tiny, method):
    import numpy as np

    from visionzip_eval.methods.registry import MethodSpec
    from visionzip_eval.testing import sample_images
    from visionzip_eval.demos.visualize import DOMINANT_OUTLINE, selection_panel, visualize

    model, processor = tiny
    image = sample_images()["astronaut"]
    sheet, (view,) = visualize(model, processor, image, [64], method=method)
    pixel_values = processor.image_processor(image, return_tensors="pt")["pixel_values"]
    selection = MethodSpec.parse(method).build(64, seed=0).select(model, pixel_values)
    assert set(np.flatnonzero(view.dominant).tolist()) == set((selection.dominant_index[0] - 1).tolist())
    assert int(view.dominant.sum()) == 64 and not view.target.any()
    panel = selection_panel(view)
    r, c = map(int, np.argwhere(view.dominant)[0])
    assert tuple(panel[r * 14, c * 14 + 7]) == DOMINANT_OUTLINE
    assert sheet.width == 2 * 336 + 8


def test_visualize_method_in_llm_or_poolers_refused_in_one_line(tmp_path, capsys, no_model_loads, tiny):
    from PIL import Image

    from visionzip_eval.demos.visualize import selection_map

    image = tmp_path / "img.png"
    Image.new("RGB", (32, 32), "red").save(image)
    assert main(["visualize", str(image), "--method", "fastv"]) == 2
    (line,) = capsys.readouterr().err.strip().splitlines()
    assert line.startswith(PREFIX) and "fastv prunes inside the LLM" in line and "--kind pre-llm" in line
    with pytest.raises(ValueError, match="pool keeps no individual patches"):
        selection_map(*tiny, Image.new("RGB", (50, 50)), 64, method="pool")


def test_selection_tints_only_the_selected_patches(tiny):
    """The demo's selection_synth.png was a mosaic: every merged patch tinted, the scene hidden."""
    import numpy as np

    from visionzip_eval.testing import sample_images
    from visionzip_eval.demos.visualize import selection_panel, visualize

    _, (view,) = visualize(*tiny, sample_images()["astronaut"], [64])
    panel = selection_panel(view).astype(int)
    rows, cols = view.grid

    def saturation(r, c):
        block = panel[r * 14 + 3: r * 14 + 11, c * 14 + 3: c * 14 + 11]
        original = view.pixels[r * 14 + 3: r * 14 + 11, c * 14 + 3: c * 14 + 11].astype(int)
        return (block.max(-1) - block.min(-1)).mean(), (original.max(-1) - original.min(-1)).mean()

    merged = [(r, c) for r in range(rows) for c in range(cols) if not view.dominant[r, c] and not view.target[r, c]]
    assert len(merged) == rows * cols - 53 - 10
    for r, c in merged:  # dimmed toward grey: never more colourful than the image was
        shown, original = saturation(r, c)
        assert shown <= original + 1e-9
    targets = [tuple(map(int, rc)) for rc in np.argwhere(view.target)]
    assert len(targets) == 10 and any(saturation(r, c)[0] > saturation(r, c)[1] + 20 for r, c in targets)


@pytest.mark.slow
def test_sigint_in_a_real_sweep_prints_one_line_and_the_rerun_resumes(tmp_path):
    import glob
    import time

    import yaml

    config = {"name": "t", "models": [{"name": "tiny", "pretrained": "builtin:tiny-llava", "dtype": "float32"}],
              "methods": ["visionzip"], "budgets": ["full", 64], "tasks": ["visionzip_smoke_pope"],
              "include_path": str(REPO / "tasks"), "limit": 2, "output_dir": str(tmp_path / "out"),
              "lmms_eval": {"gen_kwargs": "max_new_tokens=2", "bootstrap_iters": 0, "warmup": 1}}
    (tmp_path / "s.yaml").write_text(yaml.safe_dump(config))
    command = [sys.executable, "-m", "visionzip_eval.cli", "sweep", str(tmp_path / "s.yaml"), "--quiet"]
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    child = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    # the first run in progress (its hidden partial folder): a landed run.log came too late on a fast
    # machine, where the last run could finish and the process exit before the signal arrived
    deadline = time.time() + 300
    while not glob.glob(str(tmp_path / "out" / "runs" / ".*.partial-*" / "run.log")) and time.time() < deadline:
        time.sleep(0.05)
    child.send_signal(signal.SIGINT)
    out, err = child.communicate(timeout=300)
    assert child.returncode == 130, err
    assert err.strip() == "interrupted: re-run the same command to resume"
    again = subprocess.run(command, capture_output=True, text=True, env=env, timeout=600)
    assert again.returncode == 0 and "2 planned" in again.stdout

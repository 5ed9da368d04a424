"""What a new user trips over first: slow --help, a demo that prints the wrong budgets and mixed
paths, unwritable output folders, config files that are not YAML, misspelt task names. Each
ends in one line on stderr (``visionzip-eval: error: ...``, exit 2) before any model loads."""

import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from visionzip_eval.cli import main

REPO = Path(__file__).resolve().parents[1]
SCRIPT = Path(sys.executable).parent / "visionzip-eval"
PREFIX = "visionzip-eval: error: "


def one_error_line(capsys) -> str:
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(PREFIX), err
    return err[0][len(PREFIX):]


def write_config(tmp_path, name="sweep.yaml", **overrides) -> Path:
    config = {
        "name": "t",
        "models": [{"name": "tiny", "pretrained": "builtin:tiny-llava", "dtype": "float32"}],
        "methods": ["visionzip"],
        "budgets": ["full", 64],
        "tasks": ["visionzip_smoke_pope"],
        "include_path": str(REPO / "tasks"),
        "limit": 2,
        "output_dir": str(tmp_path / "out"),
        "lmms_eval": {"gen_kwargs": "max_new_tokens=2", "bootstrap_iters": 0, "warmup": 1},
    }
    config.update(overrides)
    path = tmp_path / name
    path.write_text(yaml.safe_dump(config))
    return path


@pytest.fixture
def no_model_loads(monkeypatch):
    """Any model load (sweep runner, demo, tiny-model) fails the test."""
    import visionzip_eval.loading
    import visionzip_eval.backends.llava_hf

    def refuse(*args, **kwargs):
        raise AssertionError("a model was loaded before the error")

    monkeypatch.setattr(visionzip_eval.loading, "load_pretrained", refuse)
    monkeypatch.setattr(visionzip_eval.backends.llava_hf, "build_tiny_llava", refuse)


def snapshot(root: Path) -> dict:
    return {str(p.relative_to(root)): (p.read_bytes() if p.is_file() else None) for p in sorted(root.rglob("*"))}


# -- 1. --help is fast: importing the CLI imports no torch --------------------------------------

def test_importing_the_cli_does_not_import_torch():
    out = subprocess.run(
        [sys.executable, "-c", "import visionzip_eval.cli, sys; print('torch' in sys.modules)"],
        capture_output=True, text=True, check=True,
    ).stdout.strip()
    assert out == "False"


@pytest.mark.parametrize("argv", [["--help"], ["sweep", "--help"], ["demo", "--help"]])
def test_help_exits_0_without_heavy_imports(argv):
    start = time.perf_counter()
    done = subprocess.run([str(SCRIPT), *argv], capture_output=True, text=True, check=False)
    seconds = time.perf_counter() - start
    print(f"visionzip-eval {' '.join(argv)}: {seconds:.2f} s")  # reported, not asserted
    assert done.returncode == 0 and done.stderr == ""
    assert "usage: visionzip-eval" in done.stdout


def test_top_level_names_still_import():
    import visionzip_eval
    from visionzip_eval import Budget, MethodSpec, VisionZip, get_method, visionzip
    from visionzip_eval.budget import Budget as budget_cls
    from visionzip_eval.methods import get_method as registry_get
    from visionzip_eval.methods.visionzip import VisionZip as vz_cls
    from visionzip_eval.methods.visionzip import visionzip as vz_fn

    assert (Budget, VisionZip, visionzip, get_method) == (budget_cls, vz_cls, vz_fn, registry_get)
    assert isinstance(get_method("visionzip", 64), VisionZip) and MethodSpec.parse("random").name == "random"
    assert all(getattr(visionzip_eval, name) is not None for name in visionzip_eval.__all__)  # what `import *` does
    assert set(visionzip_eval.__all__) <= set(dir(visionzip_eval))
    with pytest.raises(AttributeError):
        visionzip_eval.no_such_name  # noqa: B018


# -- 2. demo: the budgets asked for, every path printed the same way ----------------------------

def test_demo_prints_requested_budgets_and_paths_one_way(tmp_path, monkeypatch, capsys):
    from visionzip_eval.demos import demo

    monkeypatch.setattr(demo, "DEMO_TASKS", ["visionzip_synth_pope"])  # 3 runs, not 15
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()

    def printed_paths(out: str) -> list[str]:
        lines = [line for line in out.splitlines() if line.startswith(("figure: ", "efficiency table: "))]
        assert len(lines) >= 3  # efficiency table, report figures, selection pictures
        return [line.split(": ", 1)[1] for line in lines]

    monkeypatch.chdir(tmp_path / "a")  # output under the current directory: all relative
    assert main(["demo", "--output-dir", "out", "--budgets", "full", "64", "--limit", "2", "--quiet"]) == 0
    out = capsys.readouterr().out
    banner = out.splitlines()[0]
    assert "full/64 tokens" in banner and "192" not in banner and "128" not in banner
    paths = printed_paths(out)
    assert all(not Path(p).is_absolute() and p.startswith("out/report/") and Path(p).is_file() for p in paths), paths

    monkeypatch.chdir(tmp_path / "b")  # output elsewhere: all absolute (the sweep is complete: only the report)
    assert main(["demo", "--output-dir", str(tmp_path / "a" / "out"), "--budgets", "full", "64", "--limit", "2",
                 "--quiet"]) == 0
    paths = printed_paths(capsys.readouterr().out)
    assert all(Path(p).is_absolute() and Path(p).is_file() for p in paths), paths


def test_smoke_config_no_longer_claims_to_be_the_readme_main_job():
    header = [line for line in (REPO / "configs" / "smoke.yaml").read_text().splitlines() if line.startswith("#")]
    assert header and "The README's main job." not in " ".join(header)
    assert "visionzip-eval demo" in " ".join(header)


# -- 3. unwritable output folders: one line, before any model, nothing touched ------------------

@pytest.mark.parametrize("where", ["under-file", "proc"])
@pytest.mark.parametrize("command", ["sweep", "demo"])
def test_unwritable_output_dir_is_one_line_error(tmp_path, capsys, no_model_loads, command, where):
    blocker = tmp_path / "a-file"
    blocker.write_text("precious\n")
    target = blocker / "out" if where == "under-file" else Path("/proc/visionzip-eval-test/out")
    argv = ["sweep", str(write_config(tmp_path))] if command == "sweep" else ["demo", "--quiet"]
    before = snapshot(tmp_path)
    assert main([*argv, "--output-dir", str(target)]) == 2
    message = one_error_line(capsys)
    assert message.startswith(f"--output-dir {target}: ") and message.endswith("pass a folder you can write to")
    assert ("a-file is a file, not a folder" if where == "under-file" else "cannot create folders in /proc") in message
    assert snapshot(tmp_path) == before


def test_output_dir_that_is_a_file_is_one_line_error(tmp_path, capsys, no_model_loads):
    blocker = tmp_path / "results"
    blocker.write_text("precious\n")
    assert main(["demo", "--quiet", "--output-dir", str(blocker)]) == 2
    assert one_error_line(capsys) == f"--output-dir {blocker}: that is a file, not a folder: pass a folder you can write to"
    assert blocker.read_text() == "precious\n"


def test_report_folder_that_cannot_be_written_is_one_line_error(tmp_path, capsys):
    (tmp_path / "runs").mkdir()
    (tmp_path / "report").write_text("precious\n")
    before = snapshot(tmp_path)
    assert main(["report", str(tmp_path), "--no-plots"]) == 2
    message = one_error_line(capsys)
    assert message.startswith(f"report folder {tmp_path / 'report'}: that is a file, not a folder: ")
    assert "RESULTS/report/" in message
    assert snapshot(tmp_path) == before


@pytest.mark.parametrize("where", ["file", "under-file", "proc"])
def test_tiny_model_into_a_file_is_one_line_error(tmp_path, capsys, no_model_loads, where):
    blocker = tmp_path / "tiny"
    blocker.write_text("precious\n")
    target = {"file": blocker, "under-file": blocker / "sub", "proc": Path("/proc/visionzip-eval-test")}[where]
    assert main(["tiny-model", str(target)]) == 2
    message = one_error_line(capsys)
    assert message.startswith(f"tiny-model DIRECTORY {target}: ") and "pass a folder you can write to" in message
    assert blocker.read_text() == "precious\n" and sorted(tmp_path.iterdir()) == [blocker]


# -- 4. config files that are not text, or not YAML ---------------------------------------------

@pytest.mark.parametrize(
    "content, message",
    [
        (bytes(range(128, 256)) * 4, "not a text file (not UTF-8: byte 0x80 at offset 0)"),
        (b"name: t\x00\x01\x02garbage", "not a text file (NUL character at offset 7)"),
        (b"name: t\nmodels: a: b\n", "not valid YAML (mapping values are not allowed here, line 2 column 10)"),
    ],
)
def test_config_that_is_not_text_or_not_yaml_is_one_line_error(tmp_path, capsys, content, message):
    path = tmp_path / "sweep.yaml"
    path.write_bytes(content)
    assert main(["sweep", str(path), "--dry-run"]) == 2
    assert one_error_line(capsys).startswith(f"{path}: {message}")


# -- 5. unknown task names: caught when the plan is made ----------------------------------------

def test_unknown_task_dry_run_suggests_the_close_match(tmp_path, capsys):
    path = write_config(tmp_path, tasks=["visionzip_smoke_pop"])
    assert main(["sweep", str(path), "--dry-run"]) == 2
    assert one_error_line(capsys) == (
        f"{path}: unknown task 'visionzip_smoke_pop': did you mean visionzip_smoke_pope? (tasks come from "
        f"lmms-eval and include_path {REPO / 'tasks'}; fix the name or add its YAML under include_path)"
    )


def test_unknown_task_real_sweep_fails_before_the_model_and_touches_nothing(tmp_path, capsys, no_model_loads):
    out = tmp_path / "out"
    (out / "runs").mkdir(parents=True)
    (out / "notes.txt").write_text("precious\n")
    path = write_config(tmp_path, tasks=["visionzip_smoke_pope", "no_such_task_xyz", "visionzip_synth_mmee"])
    before = snapshot(tmp_path)
    assert main(["sweep", str(path), "--output-dir", str(out), "--quiet"]) == 2
    message = one_error_line(capsys)
    assert message.startswith(
        f"{path}: unknown tasks 'no_such_task_xyz', 'visionzip_synth_mmee' (did you mean visionzip_synth_mme?) "
    )
    assert snapshot(tmp_path) == before  # the write check left no probe behind


def test_run_sweep_checks_tasks_before_the_model(tmp_path, no_model_loads):
    from visionzip_eval.sweep import ConfigError, load_config, run_sweep

    config = load_config(write_config(tmp_path, tasks=["no_such_task_xyz"]))
    with pytest.raises(ConfigError, match="sweep t: unknown task 'no_such_task_xyz' "):
        run_sweep(config, progress=False)
    assert not (tmp_path / "out").exists()


def test_groups_and_lmms_eval_builtin_tasks_are_known(tmp_path, capsys):
    path = write_config(tmp_path, tasks=["visionzip_synth", "visionzip_smoke_pope", "pope"])
    assert main(["sweep", str(path), "--dry-run"]) == 0
    assert "6 runs" in capsys.readouterr().out
    assert not (tmp_path / "out").exists()

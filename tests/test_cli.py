"""The ``lionkit`` command line: help, errors, routing to command modules."""

from __future__ import annotations

import importlib.metadata
import subprocess
import sys
import types

import pytest

from lionkit import __version__, cli


def test_help_lists_every_command(capsys):
    assert cli.main(["--help"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("usage: lionkit")
    for name in ("demo", "bench", "compare"):
        assert f"    {name}" in out


def test_version(capsys):
    assert cli.main(["--version"]) == 0
    assert capsys.readouterr().out.strip() == f"lionkit {__version__}"


def test_demo_help_shows_its_options(capsys):
    assert cli.main(["demo", "--help"]) == 0
    out = capsys.readouterr().out
    for option in ("--epochs", "--seed", "--out", "--json"):
        assert option in out


def test_unknown_command_is_a_usage_error(capsys):
    assert cli.main(["frobnicate"]) == 2
    err = capsys.readouterr().err
    assert "invalid choice: 'frobnicate'" in err


def test_no_command_prints_help_and_fails(capsys):
    assert cli.main([]) == 2
    assert "usage: lionkit" in capsys.readouterr().err


def test_demo_rejects_bad_epochs(capsys):
    assert cli.main(["demo", "--epochs", "0"]) == 2
    assert "--epochs must be >= 1, got 0" in capsys.readouterr().err


def test_demo_refuses_unwritable_outputs_before_training(tmp_path, capsys, monkeypatch):
    from lionkit import demo

    monkeypatch.setattr(demo, "run", lambda **kw: pytest.fail("trained despite an unwritable output"))
    blocker = tmp_path / "file"
    blocker.write_text("x")
    assert cli.main(["demo", "--out", str(blocker / "curves.png")]) == 2
    assert "--out" in capsys.readouterr().err
    assert cli.main(["demo", "--json", str(tmp_path)]) == 2
    assert "is a directory" in capsys.readouterr().err


@pytest.mark.parametrize("command", sorted(cli.DELEGATED))
def test_delegated_commands_get_their_arguments_untouched(monkeypatch, command):
    calls = []
    fake = types.ModuleType(f"lionkit.{command}")
    fake.main = lambda argv: calls.append(argv) or 7
    monkeypatch.setitem(sys.modules, f"lionkit.{command}", fake)
    assert cli.main([command, "--help", "-x", "pos"]) == 7
    assert calls == [["--help", "-x", "pos"]]


@pytest.mark.parametrize("command", sorted(cli.DELEGATED))
def test_missing_command_module_is_a_clear_error(monkeypatch, capsys, command):
    monkeypatch.setitem(sys.modules, f"lionkit.{command}", None)  # makes the import fail
    assert cli.main([command]) == 2
    err = capsys.readouterr().err
    assert f"lionkit {command}: this command is not available" in err
    assert f"lionkit.{command} is missing" in err


def test_missing_optional_dependency_names_the_install(monkeypatch, capsys):
    fake = types.ModuleType("lionkit.bench")

    def main(argv):
        raise ImportError("lionkit bench needs triton: pip install 'lionkit[triton]'")

    fake.main = main
    monkeypatch.setitem(sys.modules, "lionkit.bench", fake)
    assert cli.main(["bench"]) == 1
    assert "pip install 'lionkit[triton]'" in capsys.readouterr().err


def test_other_import_errors_are_not_swallowed(monkeypatch):
    fake = types.ModuleType("lionkit.compare")

    def main(argv):
        raise ImportError("something else is broken")

    fake.main = main
    monkeypatch.setitem(sys.modules, "lionkit.compare", fake)
    with pytest.raises(ImportError, match="something else is broken"):
        cli.main(["compare"])


def test_python_dash_m_lionkit():
    proc = subprocess.run(
        [sys.executable, "-m", "lionkit", "--help"], capture_output=True, text=True, timeout=120
    )
    assert proc.returncode == 0, proc.stderr
    assert "usage: lionkit" in proc.stdout
    proc = subprocess.run([sys.executable, "-m", "lionkit", "nope"], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert "invalid choice" in proc.stderr


def test_console_script_points_at_main():
    try:
        dist = importlib.metadata.distribution("lionkit")
    except importlib.metadata.PackageNotFoundError:
        pytest.skip("lionkit is not installed as a distribution (run from a source tree), no entry points to check")
    scripts = [ep for ep in dist.entry_points if ep.group == "console_scripts" and ep.name == "lionkit"]
    assert [ep.value for ep in scripts] == ["lionkit.cli:main"]
    assert scripts[0].load() is cli.main

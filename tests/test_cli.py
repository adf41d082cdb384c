import subprocess
import sys

from jaxdistill.main import main


def run(*args):
    return subprocess.run([sys.executable, "-m", "jaxdistill", *args], capture_output=True, text=True, timeout=600)


def test_help_lists_commands(capsys):
    assert main(["jaxdistill", "--help"]) == 0
    out = capsys.readouterr().out
    assert "sample" in out and "--config=" in out


def test_unknown_command_and_missing_config_are_errors(capsys):
    assert main(["jaxdistill", "trian"]) == 2
    assert "unknown command 'trian'" in capsys.readouterr().err


def test_sample_command_runs_the_default_config_with_overrides():
    result = run("sample", "--config=experiments/sample/default.py", "--config.sample.max_new_tokens=8",
                 "--config.prompt=What colour is the sky?")
    assert result.returncode == 0, result.stderr[-2000:]
    assert ">>> What colour is the sky?" in result.stdout
    assert "tokens in" in result.stdout


def test_config_typo_is_a_clear_error():
    result = run("sample", "--config=experiments/sample/default.py", "--config.sampel.temperature=1")
    assert result.returncode == 2
    assert 'Did you mean "sample.temperature"' in result.stderr

"""The `zayaserve` command line: init-checkpoint and generate, in-process and as the installed
console script."""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

import pytest

from zayaserve import LLM, SamplingParams
from zayaserve.cluster.cli import main


@pytest.fixture(scope="module")
def cli_checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("cli") / "tiny-seed1"
    assert main(["init-checkpoint", str(out), "--preset", "tiny", "--seed", "1"]) == 0
    return out


def _console_script() -> str:
    exe = shutil.which("zayaserve")
    assert exe is not None, "the zayaserve console script is not installed"
    return exe


def test_init_checkpoint_writes_a_loadable_checkpoint(
    cli_checkpoint: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    for name in ("config.json", "model.safetensors", "tokenizer.json"):
        assert (cli_checkpoint / name).is_file(), name
    cfg = json.loads((cli_checkpoint / "config.json").read_text())
    assert cfg["model_type"] == "zaya" and cfg["vocab_size"] == 512
    llm = LLM(model=str(cli_checkpoint), num_kv_blocks=16)
    (out,) = llm.generate("hi", SamplingParams(temperature=0.0, max_tokens=3, ignore_eos=True))
    assert len(out.outputs[0].token_ids) == 3


def test_init_checkpoint_is_deterministic_in_process_and_as_console_script(
    cli_checkpoint: Path, tmp_path: Path
) -> None:
    again = tmp_path / "again"
    proc = subprocess.run(
        [_console_script(), "init-checkpoint", str(again), "--preset", "tiny", "--seed", "1"],
        capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert str(again) in proc.stdout
    weights = (cli_checkpoint / "model.safetensors").read_bytes()
    assert (again / "model.safetensors").read_bytes() == weights
    for name in ("config.json", "tokenizer.json"):
        assert (again / name).read_bytes() == (cli_checkpoint / name).read_bytes(), name

    other = tmp_path / "seed2"
    assert main(["init-checkpoint", str(other), "--preset", "tiny", "--seed", "2"]) == 0
    assert (other / "model.safetensors").read_bytes() != weights


def test_generate_prints_json(cli_checkpoint: Path, capsys: pytest.CaptureFixture[str]) -> None:
    capsys.readouterr()
    code = main(["generate", "--model", str(cli_checkpoint), "--max-tokens", "8", "--json", "hi"])
    assert code == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert len(lines) == 1
    record = json.loads(lines[0])
    assert record["index"] == 0 and isinstance(record["text"], str)
    assert len(record["token_ids"]) == 8 and record["finish_reason"] == "length"
    # The CLI's default is greedy: the same tokens as the offline API.
    llm = LLM(model=str(cli_checkpoint), num_kv_blocks=16)
    (out,) = llm.generate("hi", SamplingParams(temperature=0.0, max_tokens=8))
    assert record["token_ids"] == out.outputs[0].token_ids


def test_generate_n_and_chat(cli_checkpoint: Path, capsys: pytest.CaptureFixture[str]) -> None:
    capsys.readouterr()
    code = main(["generate", "--model", str(cli_checkpoint), "--max-tokens", "3", "--json",
                 "--n", "2", "--temperature", "1.0", "--seed", "4", "--chat", "hi"])
    assert code == 0
    records = [json.loads(line) for line in capsys.readouterr().out.strip().splitlines()]
    assert [r["index"] for r in records] == [0, 1]
    assert all(1 <= len(r["token_ids"]) <= 3 for r in records)


@pytest.mark.parametrize(("args", "field"), [
    (["--max-tokens", "0"], "max_tokens"),
    (["--temperature", "-1"], "temperature"),
    (["--n", "0"], "n must"),
    (["--logprobs", "-2"], "logprobs"),
])
def test_generate_bad_input_exits_2_naming_the_field(
    cli_checkpoint: Path, capsys: pytest.CaptureFixture[str], args: list[str], field: str
) -> None:
    capsys.readouterr()
    code = main(["generate", "--model", str(cli_checkpoint), *args, "hi"])
    assert code == 2
    captured = capsys.readouterr()
    assert field in captured.err and captured.out == ""


def test_generate_unknown_model_exits_2(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    capsys.readouterr()
    assert main(["generate", "--model", str(tmp_path / "missing"), "hi"]) == 2
    assert "missing" in capsys.readouterr().err


def test_unparsable_arguments_exit_2(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as info:
        main(["generate", "--model", "tiny", "--max-tokens", "many", "hi"])
    assert info.value.code == 2
    assert "max-tokens" in capsys.readouterr().err


def test_console_script_bad_input_exit_code(cli_checkpoint: Path) -> None:
    proc = subprocess.run(
        [_console_script(), "generate", "--model", str(cli_checkpoint), "--max-tokens", "0",
         "hi"], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2
    assert "max_tokens" in proc.stderr and proc.stdout == ""

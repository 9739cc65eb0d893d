"""The suite's warm CLI processes (tests/warm_cli.py) behave as cold `python -m align` processes do."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from conftest import align_process, warm_cli
from warm_cli import import_time_differences


def test_a_warm_process_answers_as_a_cold_one(tmp_path: Path) -> None:
    """Exit code, stdout and stderr of a success, a user error and a usage error, warm and cold; and the warm
    child runs in the caller's directory and environment (a relative registry path, ALIGN_REGISTRY)."""
    # The server's own environment: variables an earlier test in this process set since would send calls cold
    env = {**warm_cli().env, "ALIGN_CACHE": str(tmp_path / "cache"), "ALIGN_REGISTRY": str(tmp_path / "from-env")}
    (tmp_path / "bad.yaml").write_text("stage: sft\nname: x\nmodel: {base: m}\ndata: {card: c.yaml}\nlora: 3\n")
    commands = [["artifacts", "list"], ["recipe", "validate", "bad.yaml"], ["no-such-command"],
                ["artifacts", "show", "missing@v1", "--registry", "reg"]]
    codes = []
    for args in commands:
        warm = align_process(args, env, cwd=tmp_path, timeout=120)
        cold = subprocess.run([sys.executable, "-m", "align", *args], cwd=tmp_path, env=env, capture_output=True,
                              text=True, timeout=120)
        assert warm.forked, f"ran cold: {import_time_differences(warm_cli().env, env)} differ"
        assert (warm.returncode, warm.stdout, warm.stderr) == (cold.returncode, cold.stdout, cold.stderr), args
        codes.append(warm.returncode)
    assert codes == [0, 2, 2, 2]
    assert str(tmp_path / "from-env") in align_process(["artifacts", "list"], env, cwd=tmp_path).stdout


def test_a_variable_read_at_import_sends_the_call_cold() -> None:
    base = {"HOME": "/root", "ALIGN_CACHE": "/a", "PATH": "/bin"}
    assert import_time_differences(base, {**base, "ALIGN_CACHE": "/b", "ALIGN_FORBID_WEIGHTS": "1"}) == []
    assert import_time_differences(base, {**base, "HF_TOKEN": "t", "OMP_NUM_THREADS": "2"}) == ["HF_TOKEN",
                                                                                              "OMP_NUM_THREADS"]
    assert import_time_differences(base, {"ALIGN_CACHE": "/a", "PATH": "/bin"}) == ["HOME"]
    assert import_time_differences(base, {**base, "TORCHINDUCTOR_CACHE_DIR": "/tmp/torchinductor_root"}) == []

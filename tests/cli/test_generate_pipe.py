"""`trcli generate -o - | head -1`: a reader that goes away ends generate quietly with exit 0."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path


def test_closed_stdout_ends_quietly(tmp_path, tiny_model):
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": f"Hello number {i}"}) + "\n" for i in range(6)))
    trcli = Path(sys.executable).with_name("trcli")
    cmd = [str(trcli), "generate", "--model", str(tiny_model), "--prompts", str(prompts), "--batch-size", "1",
           "--max-new-tokens", "4", "-o", "-"]
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    with subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env) as proc:
        first = proc.stdout.readline()  # what `head -1` reads, then it exits
        proc.stdout.close()
        stderr = proc.stderr.read().decode()
        code = proc.wait(timeout=300)
    assert json.loads(first)["completion"] is not None
    assert code == 0, stderr
    for noise in ("Traceback", "BrokenPipe", "Broken pipe", "Exception ignored", "Error"):
        assert noise not in stderr, stderr

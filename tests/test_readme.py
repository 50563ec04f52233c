"""The README's quick start, followed in a temporary clone: `make run` brings torpord up with
the demo models, and the CLI of the tour answers.

The clone reuses this checkout's virtual environment (`make -o install`: the install step is
what `make test` itself just ran), so the test takes seconds, not the minutes of a fresh
install; everything after that is the clone's Makefile and the README's commands.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from tests.helpers import assert_eventually

ROOT = Path(__file__).parents[1]
VENV = Path(sys.executable).parent.parent


@pytest.mark.slow
def test_make_run_then_torpor_ps(tmp_path: Path) -> None:
    if not (ROOT / ".git").exists():
        pytest.skip("not a git checkout")
    clone = tmp_path / "clone"
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        http_port = probe.getsockname()[1]
    subprocess.run(["git", "clone", "-q", str(ROOT), str(clone)], check=True)
    assert "make run" in (clone / "README.md").read_text()
    env = {
        **os.environ,
        # make run's own runtime directory wins over this one (and over /run/torpor).
        "TORPOR_DAEMON_RUNTIME_DIR": str(tmp_path / "elsewhere"),
        "TORPOR_DAEMON_METRICS_PORT": "0",
        # The tour's HTTP API, on a port of its own (8080 may be another torpord's).
        "TORPOR_DAEMON_HTTP_LISTEN": f"127.0.0.1:{http_port}",
    }
    daemon = subprocess.Popen(
        ["make", "-o", "install", "run", f"VENV={VENV}", f"STATE_DIR={tmp_path / 'state'}"],
        cwd=clone,
        env=env,
        start_new_session=True,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    # make run keeps its runtime directory in the state directory (issue 12).
    cli_env = {**env, "TORPOR_SOCKET": str(tmp_path / "state" / "run" / "torpord.sock")}

    def torpor(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [str(VENV / "bin" / "torpor"), *args],
            env=cli_env,
            capture_output=True,
            text=True,
            timeout=120,
        )

    try:
        ps = assert_eventually(
            lambda: torpor("ps", "--json"),
            lambda p: p.returncode == 0 or daemon.poll() is not None,
            timeout=240,
            interval=0.5,
        )
        assert daemon.poll() is None, daemon.stderr.read().decode()[-2000:] if daemon.stderr else ""
        shown = json.loads(ps.stdout)
        assert set(shown) == {"gpus", "runtimes"} and len(shown["gpus"]) == 1
        models = json.loads(torpor("models", "--json").stdout)["models"]
        assert sorted(m["name"] for m in models) == ["demo-a", "demo-b", "demo-c"]
        generated = torpor("generate", "demo-a", "Once upon a time", "--max-tokens", "8", "--json")
        assert generated.returncode == 0, generated.stderr
        assert len(json.loads(generated.stdout)["token_ids"]) == 8
        runtimes = json.loads(torpor("ps", "--json").stdout)["runtimes"]
        assert [(r["model"], r["state"]) for r in runtimes] == [("demo-a", "resident")]
        # The tour's OpenAI client: a chat on demo-b, loaded for it.
        import openai

        client = openai.OpenAI(
            base_url=f"http://127.0.0.1:{http_port}/v1", api_key="unused", max_retries=0
        )
        assert [m.id for m in client.models.list().data] == ["demo-a", "demo-b", "demo-c"]
        chat = client.chat.completions.create(
            model="demo-b", messages=[{"role": "user", "content": "Hi"}], max_tokens=4
        )
        assert chat.usage is not None and chat.usage.completion_tokens >= 1
        assert chat.model_extra["torpor"]["restored_from"] == "source"  # type: ignore[index]
        assert not (tmp_path / "elsewhere").exists()
    finally:
        os.killpg(daemon.pid, signal.SIGTERM)
        daemon.wait(timeout=120)

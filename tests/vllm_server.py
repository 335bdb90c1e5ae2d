"""Start and stop a real vLLM OpenAI-compatible server (CPU) for the API tests and the benchmark.

vLLM lives in its own virtual environment (it pins torch and transformers); point
``PROMPTSCOPE_VLLM_PYTHON`` at that environment's python (``.ci/run`` sets it up and sets it).

Example:
    >>> with vllm_server("/tmp/tiny", served_name="tiny") as base_url:    # doctest: +SKIP
    ...     model = promptscope.load_model("openai:tiny", base_url=base_url)
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

#: The environment variable naming the vLLM environment's python.
ENV_PYTHON = "PROMPTSCOPE_VLLM_PYTHON"


def vllm_python() -> str | None:
    """The vLLM environment's python, if configured and present."""
    path = os.environ.get(ENV_PYTHON)
    return path if path and Path(path).exists() else None


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def server_model_dir(root: Path) -> tuple[Path, str]:
    """The model to serve: the bundled organism when trained (head_dim 64) and
    ``PROMPTSCOPE_API_TEST_MODEL=organism``, else a tiny random llama with head_dim 64 (vLLM's CPU
    attention rejects head size 16)."""
    if os.environ.get("PROMPTSCOPE_API_TEST_MODEL") == "organism":
        from promptscope.models import organism_path

        if (organism_path() / "config.json").exists():
            return organism_path(), "organism"
    from promptscope.testing import make_tiny_model

    folder = root / "tiny-llama-hd64"
    if not (folder / "config.json").exists():
        make_tiny_model(folder, arch="llama", hidden_size=128, num_heads=2, num_kv_heads=1,
                        head_dim=64)
    return folder, "tiny"


@contextlib.contextmanager
def vllm_server(model_dir: str | os.PathLike, *, served_name: str, python: str | None = None,
                port: int | None = None, log_path: str | os.PathLike | None = None,
                startup_timeout: float = 600.0, max_logprobs: int = 1000) -> Iterator[str]:
    """Run ``python -m vllm.entrypoints.openai.api_server`` on 127.0.0.1; yield its ``/v1`` URL.

    The server is stopped (its whole process group) on exit.
    """
    python = python or vllm_python()
    if not python:
        raise RuntimeError(f"{ENV_PYTHON} is not set to the vLLM environment's python.")
    port = port or free_port()
    log_path = Path(log_path or Path(model_dir).parent / f"vllm-{port}.log")
    env = {**os.environ, "VLLM_CPU_KVCACHE_SPACE": "1", "TOKENIZERS_PARALLELISM": "false",
           "VLLM_LOGGING_LEVEL": "WARNING", "VLLM_NO_USAGE_STATS": "1", "DO_NOT_TRACK": "1",
           "HF_HUB_OFFLINE": "1"}
    cmd = [python, "-m", "vllm.entrypoints.openai.api_server", "--model", str(model_dir),
           "--served-model-name", served_name, "--host", "127.0.0.1", "--port", str(port),
           "--max-model-len", "256", "--dtype", "float32", "--max-logprobs", str(max_logprobs),
           "--disable-log-stats"]
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env,
                                stdin=subprocess.DEVNULL, start_new_session=True)
    url = f"http://127.0.0.1:{port}/v1"
    try:
        deadline = time.monotonic() + startup_timeout
        while True:
            if proc.poll() is not None:
                raise RuntimeError(f"vLLM exited with code {proc.returncode} while starting:\n"
                                   + _tail(log_path))
            try:
                with urllib.request.urlopen(url + "/models", timeout=2) as resp:
                    if resp.status == 200:
                        break
            except OSError:
                pass
            if time.monotonic() > deadline:
                raise RuntimeError(f"vLLM not ready after {startup_timeout:.0f} s:\n"
                                   + _tail(log_path))
            time.sleep(1.0)
        yield url
    finally:
        _stop(proc)


def _stop(proc: subprocess.Popen) -> None:
    """Stop the server's own process group (it was started in a new session)."""
    if proc.poll() is not None:
        return
    try:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(timeout=30)
    except (ProcessLookupError, subprocess.TimeoutExpired):
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=10)


def _tail(path: Path, lines: int = 40) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return "(no log)"

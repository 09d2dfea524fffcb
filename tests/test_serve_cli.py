"""``quari serve`` as a real process: it binds loopback, answers, cuts off a slow client, and
shuts down cleanly on SIGTERM."""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time

import httpx
import numpy as np
import pytest
from typer.testing import CliRunner

from quari.cli import app

from helpers import REPO
from serve_helpers import make_served

pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")


class Server:
    """``python -m quari serve ...`` in a child process, its stderr collected."""

    def __init__(self, args: list[str]) -> None:
        env = {
            **os.environ,
            "PYTHONPATH": f"{REPO / 'src'}{os.pathsep}{os.environ.get('PYTHONPATH', '')}",
        }
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "quari", "serve", *args, "--port", "0"],
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            env=env,
        )
        self.lines: list[str] = []
        self.url: str | None = None
        self.ready = threading.Event()
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self.lines.append(line)
            found = re.search(r"Uvicorn running on (http://[\d.]+:\d+)", line)
            if found:
                self.url = found.group(1)
                self.ready.set()
        self.ready.set()

    @property
    def output(self) -> str:
        return "".join(self.lines)

    def wait_ready(self, timeout: float = 120) -> str:
        self.ready.wait(timeout)
        assert self.url, f"the server did not start:\n{self.output}"
        return self.url


def test_serve_answers_then_stops_cleanly_on_sigterm(tmp_path, monkeypatch):
    pytest.importorskip("onnxruntime")
    monkeypatch.setenv("QUARI_CACHE_DIR", str(tmp_path / "cache"))  # the ONNX export's home
    served = make_served(tmp_path)
    # The default runtime, fp32: eager or ONNX Runtime, whichever measures faster here (the
    # same ranking), chosen once and kept for the next start.
    model = ["--model", str(served.model_dir)]
    server = Server([str(served.root), *model, "--request-timeout", "1"])
    try:
        url = server.wait_ready()
        assert url.startswith("http://127.0.0.1:")  # loopback by default
        with httpx.Client(base_url=url, timeout=10) as c:
            assert c.get("/healthz").json() == {"status": "ok"}
            assert c.get("/readyz").status_code == 200
            runtime = c.get("/info").json()["runtime"]
            # one name, or "small+large" when the winners differ by batch size
            assert set(runtime.split("+")) <= {"eager", "onnx"}, runtime
            assert f"runtime {runtime}" in " ".join(server.output.split())  # and says so
            vector = served.eset.gather([5]).astype(np.float32)[0].tolist()
            r = c.post("/search", json={"embedding": vector, "k": 3})
            assert r.status_code == 200 and r.json()["mode"] == "adaptive"
            want = served.retriever().search(np.asarray([vector]), k=3, mode="adaptive")
            assert [h["id"] for h in r.json()["results"]] == want.ids[0].tolist()
            r = c.post("/search", json={"text": "no encoder here"})
            assert r.status_code == 422

            # A client that sends half a body and stalls is answered 408 and cut off.
            host, port = url.removeprefix("http://").split(":")
            with socket.create_connection((host, int(port)), timeout=10) as sock:
                sock.sendall(
                    b"POST /search HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                    b"Content-Length: 100\r\n\r\n{"
                )
                t0 = time.monotonic()
                reply = b""
                while chunk := sock.recv(4096):
                    reply += chunk
                waited = time.monotonic() - t0
            assert reply.startswith(b"HTTP/1.1 408"), reply[:200]
            assert b"did not arrive within 1 s" in reply
            assert 0.5 < waited < 8
            assert c.get("/healthz").status_code == 200  # still answering

        server.proc.send_signal(signal.SIGTERM)
        assert server.proc.wait(timeout=30) == 0, server.output
    finally:
        if server.proc.poll() is None:
            server.proc.kill()
            server.proc.wait()
    out = server.output
    assert "Shutting down" in out and "Application shutdown complete" in out
    assert "Traceback" not in out
    (kept,) = (tmp_path / "cache" / "runtime").glob("*.json")  # the next start reads it
    assert json.loads(kept.read_text())["chosen"] == runtime


def test_serve_reports_bad_arguments_before_binding(tmp_path):
    runner = CliRunner()
    out = runner.invoke(app, ["serve", str(tmp_path / "missing")])
    assert out.exit_code == 2 and "no such folder" in out.output
    served = make_served(tmp_path)
    out = runner.invoke(app, ["serve", str(served.root), "--max-k", "0"])
    assert out.exit_code == 2 and "max_k must be a positive integer" in out.output
    out = runner.invoke(app, ["serve", str(served.root), "--runtime", "int8"])
    assert out.exit_code == 2 and "--runtime int8 needs a QuARI model" in out.output
    out = runner.invoke(
        app, ["serve", str(served.root), "--model", str(served.model_dir), "--runtime", "fast"]
    )
    assert out.exit_code == 2 and "runtime must be one of" in out.output
    out = runner.invoke(app, ["serve", str(served.root), "--blend-weight", "0"])
    assert out.exit_code == 2 and "--blend-weight needs a QuARI model; got none" in out.output
    out = runner.invoke(
        app, ["serve", str(served.root), "--model", str(served.model_dir), "--blend-weight", "2"]
    )
    assert out.exit_code == 2 and "blend weight must lie in [0, 1], got 2.0" in out.output

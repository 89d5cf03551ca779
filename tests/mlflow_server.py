"""A real MLflow tracking server on 127.0.0.1 for the tests: `mlflow server` with a sqlite store and a local artifact
root, in a process group of its own on a free port, stopped by its pid (the group: the server forks workers)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

from s3_server import free_port


class MlflowServer:
    def __init__(self, root: Path, port: int | None = None):
        root.mkdir(parents=True, exist_ok=True)
        self.root, self.port = root, port or free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        log = root / "server.log"
        self.process = subprocess.Popen(
            [str(Path(sys.executable).with_name("mlflow")), "server", "--host", "127.0.0.1", "--port", str(self.port),
             "--workers", "1", "--backend-store-uri", f"sqlite:///{root / 'mlflow.db'}",
             "--artifacts-destination", str(root / "artifacts")],
            stdout=log.open("ab"), stderr=subprocess.STDOUT, start_new_session=True)
        deadline = time.monotonic() + 120  # the first start creates the sqlite schema (about 10 s on 2 cores)
        while True:
            try:
                urllib.request.urlopen(f"{self.url}/health", timeout=1).read()
                break
            except OSError:
                assert self.process.poll() is None and time.monotonic() < deadline, \
                    f"mlflow server did not start: {log.read_text()[-2000:]}"
                time.sleep(0.3)

    def client(self):
        from mlflow.tracking import MlflowClient

        return MlflowClient(tracking_uri=self.url)

    def stop(self) -> None:
        try:
            os.killpg(self.process.pid, signal.SIGTERM)
        except ProcessLookupError:
            return
        try:
            self.process.wait(15)
        except subprocess.TimeoutExpired:
            os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait()

"""A real S3 endpoint on 127.0.0.1 for the tests: moto's standalone server (what Ray's own storage tests use) in a
process of its own, on a free port, stopped by its pid."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

BUCKET = "ray-resnet"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class S3Server:
    """`env` is what a client needs: the endpoint, dummy keys (pyarrow would otherwise sign nothing, and moto store
    the unsigned framing), and no instance-metadata lookup (it can stall a process for 20 s)."""

    def __init__(self, log: Path, auth: bool = False):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        # auth: after its first request (making the bucket), the server checks every request's keys
        server_env = {**os.environ, **({"INITIAL_NO_AUTH_ACTION_COUNT": "1"} if auth else {})}
        self.process = subprocess.Popen(
            [str(Path(sys.executable).with_name("moto_server")), "-H", "127.0.0.1", "-p", str(self.port)],
            stdout=log.open("ab"), stderr=subprocess.STDOUT, env=server_env)
        deadline = time.monotonic() + 60
        while True:
            try:
                urllib.request.urlopen(f"{self.url}/moto-api/", timeout=1).read()
                break
            except OSError:
                assert self.process.poll() is None and time.monotonic() < deadline, f"moto did not start: {log}"
                time.sleep(0.1)
        self.env = {"AWS_ENDPOINT_URL": self.url, "AWS_ACCESS_KEY_ID": "testing",
                    "AWS_SECRET_ACCESS_KEY": "not-a-real-secret-5Xq", "AWS_DEFAULT_REGION": "us-east-1",
                    "AWS_EC2_METADATA_DISABLED": "true"}

    def client(self):
        import boto3

        return boto3.client("s3", endpoint_url=self.url, aws_access_key_id=self.env["AWS_ACCESS_KEY_ID"],
                            aws_secret_access_key=self.env["AWS_SECRET_ACCESS_KEY"], region_name="us-east-1")

    def keys(self, prefix: str = "", bucket: str = BUCKET) -> list[str]:
        """Every object under `prefix`, as the S3 API lists them."""
        pages = self.client().get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix)
        return sorted(obj["Key"] for page in pages for obj in page.get("Contents", []))

    def stop(self) -> None:
        self.process.terminate()
        try:
            self.process.wait(10)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()

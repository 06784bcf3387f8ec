"""Real servers on loopback for the remote-data tests, started and stopped by the tests.

* ``S3Server``: moto's standalone server (``python -m moto.server``, the ``moto[server]`` extra),
  a real S3 HTTP API on 127.0.0.1; boto/s3fs talk to it as to AWS.
* ``HttpServer``: ``python -m http.server`` serving a folder on 127.0.0.1.

Nothing leaves the machine: every endpoint is 127.0.0.1, the AWS variables point there, fake
credentials are set explicitly and the EC2 metadata lookup is disabled. Each server is one
process we started; ``stop()``/``kill()``/``pause()`` signal that process by its id only.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class _Server:
    def __init__(self, cmd: list[str], port: int, log: Path, cwd: Path | None = None):
        self.port, self.log = port, log
        self._fh = open(log, "w")
        self.proc = subprocess.Popen(cmd, stdout=self._fh, stderr=subprocess.STDOUT, cwd=cwd)
        deadline = time.time() + 60
        while True:  # wait until it accepts connections
            if self.proc.poll() is not None:
                raise RuntimeError(
                    f"{cmd[:4]} exited {self.proc.returncode}: {log.read_text()[-2000:]}"
                )
            try:
                socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
                break
            except OSError:
                if time.time() > deadline:
                    self.kill()
                    raise RuntimeError(f"{cmd[:4]} did not listen on {port} within 60 s") from None
                time.sleep(0.1)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def pause(self) -> None:
        os.kill(self.proc.pid, signal.SIGSTOP)

    def resume(self) -> None:
        os.kill(self.proc.pid, signal.SIGCONT)

    def kill(self) -> None:
        if self.proc.poll() is None:
            os.kill(self.proc.pid, signal.SIGCONT)
            self.proc.kill()
        self.proc.wait(timeout=30)
        self._fh.close()

    stop = kill


class S3Server(_Server):
    def __init__(self, log: Path):
        port = free_port()
        super().__init__(
            [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)], port, log
        )

    def env(self, home: Path) -> dict:
        """AWS variables for a process that must talk to this server and nothing else."""
        return {
            "AWS_ACCESS_KEY_ID": "test",
            "AWS_SECRET_ACCESS_KEY": "test",
            "AWS_DEFAULT_REGION": "us-east-1",
            "AWS_ENDPOINT_URL": self.url,
            "AWS_EC2_METADATA_DISABLED": "true",
            "AWS_CONFIG_FILE": str(home / "aws-config-none"),
            "AWS_SHARED_CREDENTIALS_FILE": str(home / "aws-credentials-none"),
        }

    def make_bucket(self, name: str) -> None:
        import boto3

        boto3.client(
            "s3",
            endpoint_url=self.url,
            aws_access_key_id="test",
            aws_secret_access_key="test",
            region_name="us-east-1",
        ).create_bucket(Bucket=name)

    def upload_dir(self, local: Path, bucket: str, prefix: str) -> None:
        import boto3

        c = boto3.client(
            "s3",
            endpoint_url=self.url,
            aws_access_key_id="test",
            aws_secret_access_key="test",
            region_name="us-east-1",
        )
        for p in sorted(local.iterdir()):
            if p.is_file():
                c.upload_file(str(p), bucket, f"{prefix}/{p.name}")

    def delete(self, bucket: str, key: str) -> None:
        import boto3

        boto3.client(
            "s3",
            endpoint_url=self.url,
            aws_access_key_id="test",
            aws_secret_access_key="test",
            region_name="us-east-1",
        ).delete_object(Bucket=bucket, Key=key)


class HttpServer(_Server):
    def __init__(self, root: Path, log: Path):
        port = free_port()
        super().__init__(
            [
                sys.executable,
                "-m",
                "http.server",
                str(port),
                "--bind",
                "127.0.0.1",
                "--directory",
                str(root),
            ],
            port,
            log,
        )

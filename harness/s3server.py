"""An S3-compatible server for tests and benchmarks: moto's server mode as its own process.

`S3Server()` starts `moto_server` on a free loopback port (it says which on stderr), makes a
bucket, and gives a boto3 client to upload, delete and list with. moto keeps everything in
memory and normalises paths as real stores do (`a/../b` reads `b`), which is what the sandbox
must hold against. Stopped by `stop()` (or as a context manager); nothing is left on disk.
"""

from __future__ import annotations

import os
import re
import subprocess
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import boto3

KEY_ID, SECRET = "duckfleet-test-key", "duckfleet-test-secret-never-shown"


class S3Server:
    def __init__(self, bucket: str = "arc", start_timeout: float = 30):
        self.bucket = bucket
        # Its request log goes to a file: a pipe nobody drains would stop it when full.
        self._log = tempfile.TemporaryFile(mode="w+")
        self.process = subprocess.Popen(["moto_server", "-H", "127.0.0.1", "-p", "0"],
                                        stdout=subprocess.DEVNULL, stderr=self._log,
                                        stdin=subprocess.DEVNULL)
        self.port = self._port(start_timeout)
        self.endpoint = f"127.0.0.1:{self.port}"
        self.client = boto3.client("s3", endpoint_url=f"http://{self.endpoint}",
                                   aws_access_key_id=KEY_ID, aws_secret_access_key=SECRET,
                                   region_name="us-east-1")
        self.client.create_bucket(Bucket=bucket)

    def _port(self, timeout: float) -> int:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            self._log.seek(0)
            found = re.search(r"Running on http://127\.0\.0\.1:(\d+)", self._log.read())
            if found:
                return int(found.group(1))
            if self.process.poll() is not None:
                raise RuntimeError(f"moto_server exited with {self.process.returncode}")
            time.sleep(0.05)
        self.stop()
        raise RuntimeError("moto_server did not say its port in time")

    def config(self, prefix: str, extra: str = "") -> str:
        """engine.toml text for a server reading s3://bucket/prefix here."""
        return (f'[catalog]\ndata_dir = "s3://{self.bucket}/{prefix}"\n{extra}\n'
                f'[s3]\nendpoint = "http://{self.endpoint}"\nregion = "us-east-1"\n'
                f'key_id = "{KEY_ID}"\nsecret = "{SECRET}"\n')

    def upload_tree(self, local: Path, prefix: str) -> int:
        """Every file under `local` to <prefix>/<its relative path>; returns how many."""
        paths = [Path(root, name) for root, _, files in os.walk(local) for name in files
                 if not name.startswith(".")]
        with ThreadPoolExecutor(8) as pool:  # one request each: latency-bound
            list(pool.map(lambda path: self.client.upload_file(
                str(path), self.bucket, f"{prefix}/{path.relative_to(local).as_posix()}"), paths))
        return len(paths)

    def put(self, key: str, body: bytes) -> None:
        self.client.put_object(Bucket=self.bucket, Key=key, Body=body)

    def delete(self, key: str) -> None:
        self.client.delete_object(Bucket=self.bucket, Key=key)

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        self._log.close()

    def __enter__(self) -> "S3Server":
        return self

    def __exit__(self, *exc) -> None:
        self.stop()

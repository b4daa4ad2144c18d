"""Starts the real MONAI Label server (`python -m monailabel.main start_server`) on a free loopback port."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import requests

ROOT = Path(__file__).resolve().parents[1]
APP_DIR = ROOT / "apps" / "progidiff"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    """A running server over a studies folder; `url` is its base address. Use as a context manager."""

    def __init__(self, studies: Path, conf: dict[str, str], workdir: Path, startup_timeout: float = 240,
                 env: dict[str, str] | None = None):
        self.studies = studies
        self.extra_env = env or {}
        self.conf = conf
        self.workdir = workdir
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.startup_timeout = startup_timeout
        self.log_path = workdir / "server.log"
        self.process: subprocess.Popen | None = None

    def __enter__(self) -> "Server":
        args = [sys.executable, "-m", "monailabel.main", "start_server", "--app", str(APP_DIR),
                "--studies", str(self.studies), "--host", "127.0.0.1", "--port", str(self.port)]
        for key, value in self.conf.items():
            args += ["--conf", key, value]
        env = {**os.environ, "MONAI_LABEL_SESSION_PATH": str(self.workdir / "sessions"),
               "MONAI_LABEL_TRACKING_ENABLED": "false", "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
               "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}", **self.extra_env}
        self.log = open(self.log_path, "w")
        self.process = subprocess.Popen(args, stdout=self.log, stderr=subprocess.STDOUT, env=env, cwd=self.workdir,
                                        start_new_session=True)  # its own process group: `kill` reaches its children
        deadline = time.time() + self.startup_timeout
        while time.time() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"server exited with {self.process.returncode}:\n{self.log_tail()}")
            try:
                if requests.get(f"{self.url}/info/", timeout=5).status_code in (200, 401):  # 401: auth is on
                    return self
            except requests.ConnectionError:
                pass
            time.sleep(1)
        self.__exit__(None, None, None)
        raise TimeoutError(f"server did not answer /info/ within {self.startup_timeout} s:\n{self.log_tail()}")

    def __exit__(self, *exc) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.process.kill()
        self.log.close()

    def kill(self) -> None:
        """SIGKILL the server and every process it started (training runs in a child process), as a crash would."""
        os.killpg(self.process.pid, signal.SIGKILL)
        self.process.wait()

    def wait_for_task(self, kind: str, timeout: float = 600) -> dict:
        """Poll MONAI Label's status of the latest background `kind` task ("train", "scoring") until it ends."""
        deadline = time.time() + timeout
        while time.time() < deadline:
            status = requests.get(f"{self.url}/{kind}/", timeout=30).json()
            if status.get("status") not in ("SUBMITTED", "RUNNING", None):
                return status
            time.sleep(2)
        raise TimeoutError(f"{kind} task still running after {timeout} s:\n{self.log_tail()}")

    def log_tail(self, chars: int = 4000) -> str:
        return self.log_path.read_text()[-chars:] if self.log_path.exists() else ""


def copy_studies(source: Path, target: Path) -> Path:
    shutil.copytree(source, target, ignore=shutil.ignore_patterns("datastore_v2.json", ".lock"))
    return target

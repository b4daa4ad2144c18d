"""Starts the real MONAI Label server (`python -m monailabel.main start_server`) on a free loopback port."""

from __future__ import annotations

import hashlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
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


class WritesUntilKilled:
    """Label saves and image removals sent from `threads` clients until the server is SIGKILLed, as a crash
    would stop them; remembers which were acknowledged, so a restarted server can be held to them."""

    def __init__(self, server: Server, image_id: str, labels: list[bytes], removable: list[str], threads: int = 2):
        self.server, self.image_id, self.labels, self.removable = server, image_id, labels, list(removable)
        self.threads = threads
        self.saved: dict[str, str] = {}  # tag → SHA-256 of the label whose save was acknowledged (200)
        self.removed: list[str] = []  # ids whose removal was acknowledged
        self._count = 0
        self._lock = threading.Lock()

    def run(self, kill_after: float) -> None:
        workers = [threading.Thread(target=self._write, daemon=True) for _ in range(self.threads)]
        for worker in workers:
            worker.start()
        time.sleep(kill_after)
        self.server.kill()
        for worker in workers:
            worker.join(timeout=60)

    def _write(self) -> None:
        while True:
            with self._lock:
                i, self._count = self._count, self._count + 1
                remove = self.removable.pop() if self.removable and i % 5 == 4 else None
            try:
                if remove:
                    response = requests.delete(f"{self.server.url}/datastore/", params={"id": remove}, timeout=60)
                else:
                    content = self.labels[i % len(self.labels)]
                    tag = f"kill_{self.server.port}_{i}"
                    response = requests.put(f"{self.server.url}/datastore/label", timeout=60,
                                            params={"image": self.image_id, "tag": tag},
                                            files={"label": (f"{self.image_id}.nii.gz", content)})
            except requests.RequestException:
                return  # the server is gone
            if response.status_code == 200:
                with self._lock:
                    if remove:
                        self.removed.append(remove)
                    else:
                        self.saved[tag] = hashlib.sha256(content).hexdigest()

    def lost_after_restart(self, restarted: Server) -> list[str]:
        """What a restarted server no longer has of what was acknowledged: a label missing or not the bytes sent,
        a removed image back."""
        listing = requests.get(f"{restarted.url}/datastore/", params={"output": "all"}, timeout=60).json()
        objects = listing.get("objects", listing)
        lost = [f"image {i} is back after its removal" for i in self.removed if i in objects]
        for tag, digest in self.saved.items():
            response = requests.get(f"{restarted.url}/datastore/label", params={"label": self.image_id, "tag": tag},
                                    timeout=60)
            if response.status_code != 200 or hashlib.sha256(response.content).hexdigest() != digest:
                lost.append(f"label {tag} ({response.status_code})")
        return lost

"""Headless Chromium driven over the DevTools protocol (JSON over a websocket), for the OHIF end-to-end check.

Only what the check needs: start/stop Chromium on loopback, open a page, evaluate JavaScript, wait for a
condition, take a screenshot. No browser download: Debian's `chromium` package.
"""

from __future__ import annotations

import base64
import itertools
import json
import os
import signal
import subprocess
import tempfile
import time
from pathlib import Path

import requests
import websocket

CHROMIUM_FLAGS = [
    "--headless", "--no-sandbox", "--use-angle=swiftshader", "--enable-unsafe-swiftshader",
    "--window-size=1600,1000", "--disable-background-networking", "--disable-component-update", "--disable-sync",
    "--no-first-run", "--disable-quic", "--remote-debugging-address=127.0.0.1",
]


class Browser:
    """`with Browser(port) as b: b.open(url); b.evaluate("document.title")` — stops Chromium by its PID."""

    def __init__(self, port: int, log: Path):
        self.port = port
        self.log = log
        self.profile = tempfile.TemporaryDirectory(prefix="chromium-")
        self.process: subprocess.Popen | None = None
        self.socket: websocket.WebSocket | None = None
        self.ids = itertools.count(1)
        self.console: list[str] = []

    def __enter__(self) -> "Browser":
        self.process = subprocess.Popen(
            ["chromium", *CHROMIUM_FLAGS, f"--remote-debugging-port={self.port}", f"--user-data-dir={self.profile.name}",
             "about:blank"],
            stdout=open(self.log, "w"), stderr=subprocess.STDOUT, start_new_session=True)
        deadline = time.time() + 60
        while time.time() < deadline:
            try:
                pages = requests.get(f"http://127.0.0.1:{self.port}/json", timeout=2).json()
                page = next(p for p in pages if p.get("type") == "page")
                self.socket = websocket.create_connection(page["webSocketDebuggerUrl"], timeout=120,
                                                          suppress_origin=True)
                break
            except (requests.RequestException, StopIteration, OSError):
                time.sleep(0.5)
        else:
            raise RuntimeError(f"Chromium did not open its DevTools port; see {self.log}")
        self.call("Page.enable")
        self.call("Runtime.enable")
        return self

    def __exit__(self, *exc) -> None:
        if self.socket is not None:
            self.socket.close()
        if self.process is not None and self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGTERM)
            try:
                self.process.wait(timeout=20)
            except subprocess.TimeoutExpired:
                os.killpg(self.process.pid, signal.SIGKILL)
        self.profile.cleanup()

    def call(self, method: str, **params) -> dict:
        """Send one DevTools command and return its result (console messages on the way are kept)."""
        message_id = next(self.ids)
        self.socket.send(json.dumps({"id": message_id, "method": method, "params": params}))
        while True:
            message = json.loads(self.socket.recv())
            if message.get("method") == "Runtime.consoleAPICalled":
                args = message["params"].get("args", [])
                self.console.append(" ".join(str(a.get("value", a.get("description", ""))) for a in args)[:500])
            if message.get("id") == message_id:
                if "error" in message:
                    raise RuntimeError(f"{method}: {message['error']}")
                return message.get("result", {})

    def open(self, url: str) -> None:
        self.call("Page.navigate", url=url)

    def evaluate(self, expression: str):
        """The value of a JavaScript expression in the page (promises awaited)."""
        result = self.call("Runtime.evaluate", expression=expression, returnByValue=True, awaitPromise=True)
        if "exceptionDetails" in result:
            raise RuntimeError(f"JavaScript failed: {result['exceptionDetails'].get('text')} in {expression[:200]}")
        return result.get("result", {}).get("value")

    def wait_for(self, expression: str, timeout: float, what: str) -> object:
        """Evaluate `expression` until it is truthy; fail saying `what` did not happen."""
        deadline = time.time() + timeout
        while time.time() < deadline:
            try:
                value = self.evaluate(expression)
            except RuntimeError:  # the page is still loading (no body yet, a component not mounted)
                value = None
            if value:
                return value
            time.sleep(1)
        raise TimeoutError(f"{what} (waited {timeout:.0f} s); last console lines:\n" + "\n".join(self.console[-15:]))

    def screenshot(self, path: Path) -> Path:
        data = self.call("Page.captureScreenshot", format="png")["data"]
        path.write_bytes(base64.b64decode(data))
        return path

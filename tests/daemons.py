"""Helpers for tests that run the party daemons as real processes on loopback.

A :class:`Proc` is one ``permllm serve`` process whose log (stderr) goes to a
file; :func:`deployment_keys` makes a CA and the three party certificates;
:func:`user_settings` is the user party's configuration for :func:`permllm.connect`.
"""
from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

from permllm.runtime.config import PartyConfig, load_config
from permllm.runtime.keys import make_keys

ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONUNBUFFERED": "1"}


class Proc:
    """A daemon process: ``addr`` is where it listens, ``log`` its stderr file."""

    def __init__(self, args: list[str], log: Path, *, wait_ready: bool = True, timeout: float = 60.0) -> None:
        self.args = args
        self.log = log
        self._err = open(log, "ab")
        self.p = subprocess.Popen([sys.executable, "-m", "permllm.cli", *args], stdout=subprocess.PIPE,
                                  stderr=self._err, text=True, env=ENV)
        self.addr = ""
        if wait_ready:
            self.wait_ready(timeout)

    def wait_ready(self, timeout: float = 60.0) -> str:
        """Read the first stdout line, "permllm <role> listening on HOST:PORT"."""
        line = self.p.stdout.readline()  # returns "" if the process exits first
        m = re.search(r"listening on (\S+:\d+)", line)
        if not m:
            self.kill()
            raise AssertionError(f"daemon {self.args[:2]} did not start: {line!r}\n{self.text()[-3000:]}")
        self.addr = m.group(1)
        return self.addr

    @property
    def port(self) -> int:
        return int(self.addr.rpartition(":")[2])

    def text(self) -> str:
        return self.log.read_text(errors="replace")

    def wait_log(self, pattern: str, timeout: float = 30.0, start: int = 0) -> re.Match:
        """Wait until the log (from character ``start``) matches ``pattern``."""
        deadline = time.monotonic() + timeout
        while True:
            m = re.search(pattern, self.text()[start:])
            if m:
                return m
            if time.monotonic() > deadline:
                raise AssertionError(f"{pattern!r} not in the log of {self.args[:2]}:\n{self.text()[-3000:]}")
            time.sleep(0.05)

    def alive(self) -> bool:
        return self.p.poll() is None

    def terminate(self, timeout: float = 30.0) -> int:
        """SIGTERM and wait; returns the exit code."""
        if self.alive():
            self.p.send_signal(signal.SIGTERM)
        try:
            return self.p.wait(timeout)
        finally:
            self._close()

    def kill(self) -> None:
        if self.alive():
            self.p.kill()
            self.p.wait(10)
        self._close()

    def _close(self) -> None:
        if self.p.stdout:
            self.p.stdout.close()
        self._err.close()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def deployment_keys(out: Path) -> dict[str, Path]:
    """A CA and model/helper/user certificates in ``out``; returns {"ca": ..., "<role>.cert"/"<role>.key": ...}."""
    files: dict[str, Path] = {"ca": out / "ca.pem"}
    for i in make_keys(out):
        files[f"{i.role}.cert"], files[f"{i.role}.key"] = i.cert, i.key
    return files


def tls_flags(keys: dict[str, Path], role: str) -> list[str]:
    return ["--ca", str(keys["ca"]), "--cert", str(keys[f"{role}.cert"]), "--key", str(keys[f"{role}.key"])]


def user_settings(keys: dict[str, Path] | None, model: str, helper: str, **over: object) -> PartyConfig:
    """The user's configuration: TLS with the user certificate (or insecure without ``keys``)."""
    values: dict[str, object] = {"model_party": model, "helper": helper, "limits.connect_retries": 2,
                                 "limits.connect_backoff": 0.05}
    if keys is None:
        values["insecure"] = True
    else:
        values.update({"tls.ca": str(keys["ca"]), "tls.cert": str(keys["user.cert"]), "tls.key": str(keys["user.key"])})
    values.update({k.replace("__", "."): v for k, v in over.items()})
    return load_config("user", overrides=values)

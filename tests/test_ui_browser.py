"""`xrdmatch ui`: the MLflow UI on the run directory's store, loopback only, opened in headless
Chromium on the registered model's page (model, versions, champion alias shown)."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

CHROMIUM, CHROMEDRIVER = "/usr/bin/chromium", "/usr/bin/chromedriver"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait_http(url: str, proc: subprocess.Popen, log: Path, timeout: float = 120) -> None:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if proc.poll() is not None:
            raise AssertionError(f"xrdmatch ui exited ({proc.returncode}):\n{log.read_text()[-3000:]}")
        try:
            with urllib.request.urlopen(url, timeout=2) as r:
                if r.status == 200:
                    return
        except OSError:
            pass
        time.sleep(0.5)
    raise AssertionError(f"{url} did not answer:\n{log.read_text()[-3000:]}")


def _listening_addresses(port: int) -> set[str]:
    """Local addresses with a listening TCP socket on ``port`` (from /proc/net/tcp{,6})."""
    found = set()
    for name in ("tcp", "tcp6"):
        path = Path(f"/proc/net/{name}")
        if not path.exists():
            continue
        for line in path.read_text().splitlines()[1:]:
            local, state = line.split()[1], line.split()[3]
            addr, p = local.split(":")
            if state == "0A" and int(p, 16) == port:
                found.add(addr)
    return found


def test_ui_shows_the_registered_model_with_its_champion(mlflow_registry, tmp_path):
    if not (Path(CHROMIUM).exists() and Path(CHROMEDRIVER).exists()):
        pytest.skip("Debian chromium/chromedriver not installed")
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    port = _free_port()
    log = tmp_path / "ui.log"
    env = {k: v for k, v in os.environ.items() if k != "MLFLOW_TRACKING_URI"}
    exe = Path(sys.executable).with_name("xrdmatch")
    with open(log, "w") as fh:
        proc = subprocess.Popen([str(exe), "ui", "--dir", str(mlflow_registry.run_dir), "--port", str(port)],
                                stdout=fh, stderr=subprocess.STDOUT, env=env, start_new_session=True)
    try:
        _wait_http(f"http://127.0.0.1:{port}/health", proc, log)
        assert f"http://127.0.0.1:{port}" in log.read_text()  # the URL is printed
        assert _listening_addresses(port) == {"0100007F"}, "the UI must listen on 127.0.0.1 only"

        opts = webdriver.ChromeOptions()
        opts.binary_location = CHROMIUM
        for flag in ("--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                     "--disable-quic", "--no-first-run", "--disable-component-update", "--disable-sync",
                     f"--user-data-dir={tmp_path / 'chrome-profile'}", "--window-size=1400,1000"):
            opts.add_argument(flag)
        driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=opts)
        try:
            name = mlflow_registry.cfg.tracking.registry_name
            driver.get(f"http://127.0.0.1:{port}/#/models/{name}")

            def shown(d):
                text = d.find_element(By.TAG_NAME, "body").text
                return text if all(w in text for w in (name, "Version 1", "Version 3", "champion")) else False

            try:
                text = WebDriverWait(driver, 90, poll_frequency=1).until(shown)
            except Exception:
                driver.save_screenshot(str(tmp_path / "ui-failed.png"))
                raise AssertionError("model page lacks the model, its versions or the champion alias:\n"
                                     + driver.find_element(By.TAG_NAME, "body").text[:3000]) from None
            assert "Version 2" in text and "challenger" in text
            shot = tmp_path / "registered-model.png"
            driver.save_screenshot(str(shot))
            assert shot.stat().st_size > 10_000
            shutil.copy(shot, "/tmp/xrdmatch-ui-screenshot.png")  # for a person to look at
        finally:
            driver.quit()
    finally:
        os.killpg(proc.pid, 9)
        proc.wait()


def test_ui_on_a_busy_port_or_unknown_host_fails_naming_it(tmp_path, monkeypatch):
    """The server's own failure would come after the exec, behind a printed URL and exit 0: the
    address is tried first, and an unusable one is a one-line error, exit 2."""
    from typer.testing import CliRunner

    from xrdmatch.cli import app

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.setattr(os, "execve", lambda *a: pytest.fail(f"the server was started: {a}"))
    port = _free_port()
    with socket.create_server(("127.0.0.1", port)):  # listening: the port is taken
        res = CliRunner().invoke(app, ["ui", "--dir", str(tmp_path / "run"), "--port", str(port)])
    assert res.exit_code == 2, res.output
    assert f"error: cannot listen on 127.0.0.1:{port}: " in res.output and "MLflow UI:" not in res.output
    res = CliRunner().invoke(app, ["ui", "--dir", str(tmp_path / "run"), "--host", "no-such-host.invalid",
                                   "--port", str(port)])
    assert res.exit_code == 2, res.output
    assert f"error: cannot listen on no-such-host.invalid:{port}: " in res.output and "MLflow UI:" not in res.output


def test_ui_gives_the_server_its_store_in_the_environment_not_argv(tmp_path, monkeypatch):
    """argv of a process is readable by every local user (ps): the store URI, with any password,
    reaches `mlflow server` as MLFLOW_BACKEND_STORE_URI."""
    from typer.testing import CliRunner

    from xrdmatch.cli import app

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    started = []
    for name in ("execv", "execve"):  # captured, never run
        monkeypatch.setattr(os, name, lambda *a: started.append(a))
    res = CliRunner().invoke(app, ["ui", "--dir", str(tmp_path / "run"), "--port", str(_free_port())])
    assert res.exit_code == 0 and len(started) == 1, res.output
    exe, argv, env = started[0] if len(started[0]) == 3 else (*started[0], dict(os.environ))
    uri = f"sqlite:///{tmp_path / 'run' / 'mlflow' / 'mlflow.db'}"
    assert "server" in argv and not any(uri in a for a in argv) and "--backend-store-uri" not in argv, argv
    assert env["MLFLOW_BACKEND_STORE_URI"] == uri
    from xrdmatch.platform.cli_models import _server_command

    cmd, env = _server_command("postgresql://u:s3cret@db:5432/mlflow", "file:///tmp/a", "127.0.0.1", 5000)
    assert "s3cret" not in " ".join(cmd) and env["MLFLOW_BACKEND_STORE_URI"] == "postgresql://u:s3cret@db:5432/mlflow"

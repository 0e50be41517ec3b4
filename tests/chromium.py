"""Headless Chromium driven through the DevTools protocol, for the browser tests (HTML report, serve page)."""

from __future__ import annotations

import json
import shutil
import subprocess
import time
import urllib.request
from pathlib import Path

import pytest

CHROMIUM = next((p for p in map(shutil.which, ("chromium", "chromium-browser", "google-chrome")) if p), None)
FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync",
         "--remote-debugging-port=0", "--window-size=1280,1600"]


class DevTools:
    """A minimal CDP client for one page: commands in order, events kept."""

    def __init__(self, url: str) -> None:
        websocket = pytest.importorskip("websocket", reason="pip install websocket-client")
        self.ws = websocket.create_connection(url, timeout=30, suppress_origin=True)
        self.events: list[dict] = []
        self._id = 0

    def send(self, method: str, **params):
        self._id += 1
        self.ws.send(json.dumps({"id": self._id, "method": method, "params": params}))
        while True:
            message = json.loads(self.ws.recv())
            if message.get("id") == self._id:
                if "error" in message:
                    raise RuntimeError(f"{method}: {message['error']}")
                return message.get("result", {})
            self.events.append(message)

    def wait_for(self, method: str, timeout: float = 30.0) -> dict:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for event in self.events:
                if event.get("method") == method:
                    self.events.remove(event)
                    return event
            self.events.append(json.loads(self.ws.recv()))
        raise TimeoutError(method)

    def js(self, expression: str):
        result = self.send("Runtime.evaluate", expression=expression, returnByValue=True, awaitPromise=True)
        if "exceptionDetails" in result:
            raise AssertionError(result["exceptionDetails"])
        return result["result"].get("value")

    def errors(self) -> list[dict]:
        bad = []
        for event in self.events:
            method, params = event.get("method"), event.get("params", {})
            if method == "Runtime.exceptionThrown" or method == "Page.javascriptDialogOpening":
                bad.append(event)
            elif method == "Runtime.consoleAPICalled" and params.get("type") in ("error", "assert"):
                bad.append(event)
            elif method == "Log.entryAdded" and params["entry"].get("level") == "error":
                bad.append(event)
            elif method == "Network.requestWillBeSent" and not params["request"]["url"].startswith(("file:", "data:")):
                bad.append(event)
        return bad


def open_chromium(url: str, profile: Path, width: int, height: int):
    """Chromium showing ``url`` at ``width`` x ``height``; yields its DevTools client, closes the browser after."""
    proc = subprocess.Popen([CHROMIUM, *FLAGS, f"--user-data-dir={profile}", "about:blank"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        port_file = profile / "DevToolsActivePort"
        deadline = time.monotonic() + 60
        while not (port_file.exists() and port_file.read_text().count("\n") >= 1):
            assert proc.poll() is None, "chromium exited at start"
            assert time.monotonic() < deadline, "chromium did not open its DevTools port"
            time.sleep(0.1)
        port = port_file.read_text().split()[0]
        targets = json.load(urllib.request.urlopen(f"http://127.0.0.1:{port}/json/list", timeout=10))
        tools = DevTools(next(t["webSocketDebuggerUrl"] for t in targets if t["type"] == "page"))
        for domain in ("Runtime", "Log", "Page", "Network"):
            tools.send(f"{domain}.enable")
        tools.send("Emulation.setDeviceMetricsOverride", width=width, height=height, deviceScaleFactor=1, mobile=False)
        tools.send("Page.navigate", url=url)
        tools.wait_for("Page.loadEventFired")
        yield tools
        tools.ws.close()
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()


#: What DevTools answers an evaluation that a navigation of the page cut short (a wait after a click may meet it).
NAVIGATING = ("navigated or closed", "Execution context was destroyed", "Cannot find default execution context")


def wait_js(tools, expression: str, timeout: float = 20.0):
    deadline = time.monotonic() + timeout
    while True:
        try:
            value = tools.js(expression)
        except RuntimeError as error:
            if not any(text in str(error) for text in NAVIGATING):
                raise
            value = None
        if value:
            return value
        assert time.monotonic() < deadline, f"timed out waiting for {expression}"
        time.sleep(0.1)


def errors(tools, origin: str) -> list:
    """Console errors, exceptions, and any request that leaves this server."""
    return [e for e in tools.errors() if not (e.get("method") == "Network.requestWillBeSent"
                                              and e["params"]["request"]["url"].startswith(origin))]


def api(server, path):
    return json.load(urllib.request.urlopen(server.url + "api/" + path, timeout=10))


def choose(tools, select: str, value: str) -> None:
    tools.js(f"""(() => {{ const s = document.getElementById({json.dumps(select)}); s.value = {json.dumps(value)};
                 s.dispatchEvent(new Event('change', {{bubbles: true}})); }})()""")

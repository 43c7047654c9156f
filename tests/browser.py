"""Headless Chromium driven over the DevTools protocol, for the tests of
the service's page (tests/predict/test_serve.py, and the detection page in
tests/tasks/detection/test_detection_export.py)."""

import json
import subprocess
import time

import httpx


class DevTools:
    """The Chrome DevTools protocol over one page's websocket: call(method,
    **params) -> result; events that arrive meanwhile are dropped."""

    def __init__(self, url):
        import websocket
        self.socket = websocket.create_connection(url, timeout=60, suppress_origin=True)
        self.last_id = 0

    def call(self, method, **params):
        self.last_id += 1
        self.socket.send(json.dumps({"id": self.last_id, "method": method, "params": params}))
        while True:
            message = json.loads(self.socket.recv())
            if message.get("id") == self.last_id:
                if "error" in message:
                    raise RuntimeError(f"{method}: {message['error']}")
                return message["result"]

    def evaluate(self, expression):
        result = self.call("Runtime.evaluate", expression=expression, returnByValue=True)
        if "exceptionDetails" in result:
            raise RuntimeError(f"{expression}: {result['exceptionDetails']}")
        return result["result"].get("value")

    def wait_for(self, expression, timeout=60):
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.evaluate(expression):
                return
            time.sleep(0.2)
        raise AssertionError(f"still false after {timeout} s: {expression}")

    def navigate(self, url, width, height, ready):
        """Open url in a width x height viewport and wait until `ready` (JavaScript) holds."""
        self.call("Emulation.setDeviceMetricsOverride", width=width, height=height, deviceScaleFactor=1, mobile=False)
        self.call("Page.navigate", url=url)
        self.wait_for(f"document.readyState === 'complete' && {ready}")

    def pick_file(self, path, selector="#file"):
        """Choose `path` in the page's file input, as a user picking it would."""
        root = self.call("DOM.getDocument")["root"]["nodeId"]
        file_input = self.call("DOM.querySelector", nodeId=root, selector=selector)["nodeId"]
        self.call("DOM.setFileInputFiles", files=[str(path)], nodeId=file_input)


def open_browser(binary, profile):
    """Headless Chromium with DevTools on a free port (it writes the port into
    the profile's DevToolsActivePort) -> (process, websocket URL of its page)."""
    process = subprocess.Popen([binary, "--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                                "--remote-debugging-address=127.0.0.1", "--remote-debugging-port=0",
                                "--remote-allow-origins=*", f"--user-data-dir={profile}", "--window-size=1000,760",
                                "--no-first-run", "about:blank"],
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    active = profile / "DevToolsActivePort"
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        if active.is_file() and active.read_text().strip():
            port = active.read_text().split()[0]
            pages = [target for target in httpx.get(f"http://127.0.0.1:{port}/json/list", timeout=10).json()
                     if target["type"] == "page"]
            if pages:
                return process, pages[0]["webSocketDebuggerUrl"]
        time.sleep(0.2)
    process.kill()
    raise AssertionError("Chromium did not open its DevTools port within 60 s")

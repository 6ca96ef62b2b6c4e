"""The wavllm-serve page in a real browser: Debian's chromium, headless, driven over the DevTools protocol.

Loads the page, uploads a clip, picks a preset instruction, submits, waits for the streamed answer
(it must equal the API's answer to the same request), records a clip from chromium's fake microphone
and asks about it, types an instruction for a third exchange, saves a screenshot under the test's
temp dir (and, with WAVLLM_SCREENSHOT=path, a copy there: the README's picture), and fails on any
console error or uncaught exception. examples/wavllm/scripts/install.sh installs chromium; without
it the test is skipped outside CI and fails in CI.
"""
import base64
import itertools
import json
import os
import shutil
import subprocess
import tempfile
import time
import urllib.request

import pytest

from helpers import not_installed
from wavllm_fairseq.bench.serve_load import chat_body, post_json
from wavllm_fairseq.bench.serve_process import ServerProcess, tiny_checkpoint, tone_clips

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")


class DevTools:
    """A minimal Chrome DevTools protocol client: commands by id, events kept for inspection."""

    def __init__(self, ws_url: str):
        from websockets.sync.client import connect

        self.ws = connect(ws_url, max_size=None, open_timeout=30)
        self.ids = itertools.count(1)
        self.events = []

    def __call__(self, method: str, timeout: float = 30, **params):
        i = next(self.ids)
        self.ws.send(json.dumps({"id": i, "method": method, "params": params}))
        deadline = time.time() + timeout
        while True:
            msg = json.loads(self.ws.recv(timeout=max(0.1, deadline - time.time())))
            if msg.get("id") == i:
                if "error" in msg:
                    raise RuntimeError(f"{method}: {msg['error']}")
                return msg.get("result", {})
            self.events.append(msg)

    def eval(self, expression: str):
        r = self("Runtime.evaluate", expression=expression, returnByValue=True, awaitPromise=True)
        if "exceptionDetails" in r:
            raise RuntimeError(f"{expression}: {r['exceptionDetails']}")
        return r["result"].get("value")

    def wait_for(self, expression: str, timeout: float = 60):
        """Evaluate ``expression`` until it is truthy; an exception counts as not yet (right after
        Page.navigate the old or an empty document may still be there), the last one is raised at the end."""
        deadline, error = time.time() + timeout, None
        while time.time() < deadline:
            try:
                value = self.eval(expression)
            except RuntimeError as e:
                value, error = None, e
            if value:
                return value
            time.sleep(0.1)
        raise AssertionError(f"timed out waiting for {expression}" + (f" (last error: {error})" if error else ""))

    def errors(self):
        out = []
        for e in self.events:
            m, p = e.get("method"), e.get("params", {})
            if m == "Runtime.consoleAPICalled" and p.get("type") in ("error", "assert"):
                out.append("console." + p["type"] + ": " + " ".join(str(a.get("value", a.get("description")))
                                                                    for a in p.get("args", [])))
            elif m == "Runtime.exceptionThrown":
                out.append("exception: " + json.dumps(p["exceptionDetails"])[:500])
            elif m == "Log.entryAdded" and p["entry"]["level"] == "error":
                out.append("log: " + p["entry"].get("text", "") + " " + p["entry"].get("url", ""))
        return out

    def close(self):
        self.ws.close()


@pytest.fixture
def chromium(tmp_path):
    if CHROMIUM is None:
        not_installed("chromium")
    profile = tempfile.mkdtemp(prefix="wavllm-chromium-")
    cmd = [CHROMIUM, "--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
           "--remote-debugging-address=127.0.0.1", "--remote-debugging-port=0", f"--user-data-dir={profile}",
           "--no-first-run", "--no-default-browser-check", "--disable-extensions", "--disable-background-networking",
           "--disable-component-update", "--disable-sync", "--use-fake-ui-for-media-stream",
           "--use-fake-device-for-media-stream", "--autoplay-policy=no-user-gesture-required", "about:blank"]
    log = open(tmp_path / "chromium.log", "w")
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT)
    try:
        port_file = os.path.join(profile, "DevToolsActivePort")
        deadline = time.time() + 60
        while not (os.path.exists(port_file) and open(port_file).read().count("\n") >= 1):
            assert proc.poll() is None, open(tmp_path / "chromium.log").read()[-2000:]
            assert time.time() < deadline, "chromium did not open its DevTools port"
            time.sleep(0.1)
        port = int(open(port_file).read().split()[0])
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/json/list") as r:
            page = next(t for t in json.loads(r.read()) if t["type"] == "page")
        cdp = DevTools(page["webSocketDebuggerUrl"])
        yield cdp
        cdp.close()
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        log.close()
        shutil.rmtree(profile, ignore_errors=True)


@pytest.mark.slow
def test_page_upload_preset_record_and_streamed_answers(tmp_path, chromium):
    cdp = chromium
    ckpt = tiny_checkpoint(str(tmp_path))
    clip = str(tmp_path / "hello.wav")
    with open(clip, "wb") as f:
        f.write(tone_clips(1, seed=7)[0])
    with ServerProcess(ckpt, "--threads", "1", "--default-max-tokens", "24",
                       log_path=str(tmp_path / "server.log")) as srv:
        for domain in ("Runtime", "Log", "Page", "DOM"):
            cdp(domain + ".enable")
        cdp("Emulation.setDeviceMetricsOverride", width=820, height=720, deviceScaleFactor=1, mobile=False)
        cdp("Page.navigate", url=srv.url + "/")
        cdp.wait_for("document.readyState === 'complete'")
        cdp.wait_for("document.querySelectorAll('button.preset').length === 5")
        cdp.wait_for("document.getElementById('model').textContent === 'model: wavllm'")

        # 1. upload a clip, pick the Emotion preset, ask
        root = cdp("DOM.getDocument")["root"]["nodeId"]
        node = cdp("DOM.querySelector", nodeId=root, selector="#file")["nodeId"]
        cdp("DOM.setFileInputFiles", nodeId=node, files=[clip])
        cdp.wait_for("document.getElementById('clip').textContent.startsWith('hello.wav')")
        cdp.eval("[...document.querySelectorAll('button.preset')].find(b => b.textContent === 'Emotion').click()")
        instruction = cdp.eval("document.getElementById('instruction').value")
        assert instruction == "What emotion does the speaker express?"
        cdp.wait_for("!document.getElementById('ask').disabled")
        cdp.eval("document.getElementById('ask').click()")
        cdp.wait_for("document.querySelector('#history .exchange')?.dataset.state === 'done'")
        shown = cdp.eval("document.querySelector('#history .exchange .answer').textContent")
        with open(clip, "rb") as f:
            status, body = post_json(srv.url + "/v1/chat/completions", chat_body(f.read(), instruction, 24))
        assert status == 200 and shown == body["choices"][0]["message"]["content"] and shown
        meta = cdp.eval("document.querySelector('#history .exchange .meta').textContent")
        assert "answer tokens" in meta and "speech" in meta

        # 2. record from the (fake) microphone, ask with the Transcribe preset
        cdp.eval("document.getElementById('record').click()")
        cdp.wait_for("document.getElementById('record').textContent === 'Stop'")
        time.sleep(1.0)
        cdp.eval("document.getElementById('record').click()")
        cdp.wait_for("document.getElementById('clip').textContent.startsWith('recording')")
        cdp.eval("[...document.querySelectorAll('button.preset')].find(b => b.textContent === 'Transcribe').click()")
        cdp.wait_for("!document.getElementById('ask').disabled")
        cdp.eval("document.getElementById('ask').click()")
        cdp.wait_for("document.querySelectorAll('#history .exchange[data-state=done]').length === 2")

        # 3. a typed instruction about the recorded clip; the earlier exchanges stay on the page
        cdp.eval("document.getElementById('instruction').value = 'Is there only one speaker in the audio clip?'")
        cdp.wait_for("!document.getElementById('ask').disabled")
        cdp.eval("document.getElementById('ask').click()")
        cdp.wait_for("document.querySelectorAll('#history .exchange[data-state=done]').length === 3")
        questions = cdp.eval("[...document.querySelectorAll('#history .instruction')].map(e => e.textContent)")
        assert questions == ["Is there only one speaker in the audio clip?", "Transcribe the audio.",
                             "What emotion does the speaker express?"]
        stats = json.loads(urllib.request.urlopen(srv.url + "/health").read())["stats"]
        assert stats["requests"] == 4 and stats["failed_batches"] == 0  # 3 from the page, 1 from this test

        png = base64.b64decode(cdp("Page.captureScreenshot", format="png")["data"])
        assert png[:8] == b"\x89PNG\r\n\x1a\n"
        (tmp_path / "page.png").write_bytes(png)
        if os.environ.get("WAVLLM_SCREENSHOT"):
            with open(os.environ["WAVLLM_SCREENSHOT"], "wb") as f:
                f.write(png)
        errors = cdp.errors()
        assert not errors, errors


@pytest.mark.slow
def test_page_asks_for_the_api_key_and_answers_with_it(tmp_path, chromium):
    """A server started with an API key: the page says it needs one, refuses a wrong one, and with the right
    one streams the answer the API gives to a request with the key."""
    cdp = chromium
    ckpt = tiny_checkpoint(str(tmp_path))
    with ServerProcess(ckpt, "--threads", "1", "--default-max-tokens", "12", env={"WAVLLM_API_KEY": "s3cret"},
                       log_path=str(tmp_path / "server.log")) as srv:
        for domain in ("Runtime", "Log", "Page"):
            cdp(domain + ".enable")
        cdp("Page.navigate", url=srv.url + "/")
        cdp.wait_for("document.getElementById('model').textContent === 'this server needs an API key'")
        assert cdp.eval("document.getElementById('key-form').hidden") is False
        cdp.eval("document.getElementById('api-key').value = 'wrong'")
        cdp.eval("document.getElementById('use-key').click()")
        cdp.wait_for("document.getElementById('model').textContent === 'wrong API key'")
        cdp.eval("document.getElementById('api-key').value = 's3cret'")
        cdp.eval("document.getElementById('use-key').click()")
        cdp.wait_for("document.getElementById('model').textContent === 'model: wavllm'")
        assert cdp.eval("document.getElementById('key-form').hidden") is True
        cdp.eval("document.getElementById('instruction').value = 'Is there only one speaker in the audio clip?'")
        cdp.eval("document.getElementById('ask').click()")
        cdp.wait_for("document.querySelector('#history .exchange')?.dataset.state === 'done'")
        shown = cdp.eval("document.querySelector('#history .exchange .answer').textContent")
        status, body = post_json(srv.url + "/v1/chat/completions",
                                 chat_body(None, "Is there only one speaker in the audio clip?", 12),
                                 headers={"Authorization": "Bearer s3cret"})
        assert status == 200 and shown == body["choices"][0]["message"]["content"] and shown
        errors = [e for e in cdp.errors() if "401" not in e]  # the refused fetches are logged by chromium
        assert not errors, errors

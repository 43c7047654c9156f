"""`paddle-tl serve`: answers equal to infer.py's, every bad input refused
with a 4xx that names it while the service keeps serving, the metadata and
the page; then the real server over HTTP (uvicorn in a subprocess) and the
page driven in headless Chromium over the DevTools protocol.

The model is the session's tiny trained run (tests/conftest.py), exported
once for this module."""

import base64
import io
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import zlib
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from types import SimpleNamespace

import pytest
import yaml
from PIL import Image

pytest.importorskip("fastapi", reason="fastapi is not installed (the serve extra)")
pytest.importorskip("multipart", reason="python-multipart is not installed (the serve extra)")
pytest.importorskip("httpx", reason="httpx is not installed (the dev extra): FastAPI's TestClient needs it")

import httpx  # noqa: E402
from fastapi.testclient import TestClient  # noqa: E402

from paddle_tl import cli  # noqa: E402
from paddle_tl.config import load_config  # noqa: E402
from paddle_tl.deploy.export import export  # noqa: E402
from paddle_tl.predict.predictor import main as infer_main  # noqa: E402
from paddle_tl.predict.serve import DECODE_SLOTS, MAX_FILES, create_app  # noqa: E402
from browser import DevTools, open_browser  # noqa: E402

REPO = Path(__file__).resolve().parents[2]
MAX_MB = 1  # small, so that an over-limit upload stays small too


@pytest.fixture(scope="module")
def model(trained_run, tmp_path_factory):
    """The trained run exported to an inference folder, and its Eval images."""
    out = tmp_path_factory.mktemp("serve") / "inference"
    with pytest.MonkeyPatch.context() as patch:  # module fixtures run before the per-test private HOME
        patch.setenv("HOME", str(tmp_path_factory.mktemp("home")))
        export(load_config(trained_run.config, [f"Global.pretrained_model={trained_run.best}",
                                                f"Global.save_inference_dir={out}"]))
    images = sorted(trained_run.val.rglob("*.png"))
    return SimpleNamespace(dir=out, images=images, names=[f"{p.parent.name}_{p.name}" for p in images])


@pytest.fixture(scope="module")
def client(model):
    with TestClient(create_app(model.dir, max_mb=MAX_MB)) as test_client:
        yield test_client


@pytest.fixture(scope="module")
def infer_rows(model, tmp_path_factory):
    """What `paddle-tl infer --output` writes for the Eval images, in their order."""
    output = tmp_path_factory.mktemp("infer") / "rows.jsonl"
    infer_main(["--model_dir", str(model.dir), "--input", str(model.images[0].parents[1]), "--top_k", "3",
                "--output", str(output)])
    rows = [json.loads(line) for line in output.read_text().splitlines()]
    assert [row["file"] for row in rows] == [str(path) for path in model.images]
    return rows


def _files(model, indices):
    return [("file", (model.names[i], model.images[i].read_bytes(), "image/png")) for i in indices]


def _same_as_infer(answer, infer_row, name):
    assert answer == {**infer_row, "file": name}


# ---------------------------------------------------------------- answers

def test_predict_equals_infer_for_many_images_at_once(client, model, infer_rows):
    response = client.post("/predict", files=_files(model, range(len(model.images))), params={"top_k": 3})
    assert response.status_code == 200, response.text
    predictions = response.json()["predictions"]
    assert len(predictions) == len(infer_rows) == 12
    for answer, row, name in zip(predictions, infer_rows, model.names):
        _same_as_infer(answer, row, name)


def test_predict_equals_infer_one_image_at_a_time(client, model, infer_rows):
    """One image per request: batches of one rather than infer.py's eight.
    The classes agree exactly, the probabilities to float precision."""
    for index in (0, 5, 11):
        response = client.post("/predict", files=_files(model, [index]), data={"top_k": "3"})
        assert response.status_code == 200, response.text
        [answer] = response.json()["predictions"]
        row = infer_rows[index]
        assert answer["file"] == model.names[index]
        assert (answer["class_ids"], answer["label_names"]) == (row["class_ids"], row["label_names"])
        assert answer["scores"] == pytest.approx(row["scores"], abs=1e-6)


def test_top_k_from_the_query_or_the_form(client, model):
    ranked = lambda response: response.json()["predictions"][0]["label_names"]  # noqa: E731
    assert len(ranked(client.post("/predict", files=_files(model, [0])))) == 3  # default 5, 3 classes
    assert len(ranked(client.post("/predict", files=_files(model, [0]), data={"top_k": "1"}))) == 1
    assert len(ranked(client.post("/predict?top_k=2", files=_files(model, [0]), data={"top_k": "1"}))) == 2


# ---------------------------------------------------------------- bad input

def _truncated_jpeg():
    buffer = io.BytesIO()
    Image.effect_noise((256, 256), 60).convert("RGB").save(buffer, "JPEG", quality=90)
    return buffer.getvalue()[:len(buffer.getvalue()) // 2]


def _blank_png(side, depth=1):
    """A side x side greyscale PNG of zeros, `depth` bits a pixel, written
    chunk by chunk: a few hundred kB however large it decodes."""
    def chunk(kind, data):
        return (len(data).to_bytes(4, "big") + kind + data
                + zlib.crc32(kind + data).to_bytes(4, "big"))
    compressor = zlib.compressobj(9)
    row = b"\0" * (1 + (side * depth + 7) // 8)  # filter byte + packed pixels
    idat = b"".join(compressor.compress(row * min(1000, side - top)) for top in range(0, side, 1000))
    header = side.to_bytes(4, "big") * 2 + bytes([depth, 0, 0, 0, 0])  # greyscale
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", idat + compressor.flush())
            + chunk(b"IEND", b""))


def _png_bomb():
    """A real decompression bomb: a 1-bit PNG of 20000 x 20000 black pixels
    (400 Mpx, beyond twice Pillow's MAX_IMAGE_PIXELS), about 50 kB deflated."""
    return _blank_png(20000)


def _bad_requests(model):
    """(what, request keyword arguments, status, words the error must hold)."""
    good = model.images[0].read_bytes()
    too_big = os.urandom(int(1.5 * MAX_MB * 2**20))
    return [
        ("not an image", {"files": [("file", ("notes.txt", b"just some text", "text/plain"))]},
         415, ["notes.txt", "cannot identify image file"]),
        ("truncated JPEG", {"files": [("file", ("half.jpg", _truncated_jpeg(), "image/jpeg"))]},
         422, ["half.jpg", "truncated"]),
        ("decompression bomb", {"files": [("file", ("bomb.png", _png_bomb(), "image/png"))]},
         413, ["bomb.png", "decompression bomb"]),
        ("empty body", {}, 400, ["empty request body", "multipart/form-data", "'file'"]),
        ("empty file", {"files": [("file", ("nothing.png", b"", "image/png"))]}, 400, ["nothing.png", "empty"]),
        ("wrong field name", {"files": [("image", ("a.png", good, "image/png"))]}, 400, ["no field 'file'", "'image'"]),
        ("text in the file field", {"data": {"file": "a.png"}, "files": [("other", ("b.txt", b"b", "text/plain"))]},
         400, ["holds text, not a file"]),
        ("url-encoded form", {"data": {"file": "a.png"}}, 415, ["application/x-www-form-urlencoded"]),
        ("raw image body", {"content": good, "headers": {"content-type": "image/png"}},
         415, ["image/png", "multipart/form-data"]),
        ("over --max_mb", {"files": [("file", ("big.jpg", too_big, "image/jpeg"))]}, 413, ["--max_mb 1 MB"]),
        ("over --max_mb, chunked", {"content": (too_big[i:i + 65536] for i in range(0, len(too_big), 65536)),
                                    "headers": {"content-type": "multipart/form-data; boundary=x"}},
         413, ["--max_mb 1 MB"]),
        ("one bad image among good ones",
         {"files": [("file", ("good.png", good, "image/png")), ("file", ("bad.jpg", _truncated_jpeg(), "image/jpeg"))]},
         422, ["bad.jpg"]),
        ("top_k zero", {"files": [("file", ("a.png", good, "image/png"))], "params": {"top_k": 0}}, 400, ["top_k"]),
        ("top_k not a number", {"files": [("file", ("a.png", good, "image/png"))], "data": {"top_k": "all"}},
         400, ["top_k", "'all'"]),
        ("too many files", {"files": [("file", (f"{i}.png", good, "image/png")) for i in range(MAX_FILES + 1)]},
         400, ["multipart/form-data body refused", "files"]),
        ("malformed multipart", {"content": b"--x\r\nno headers here",
                                 "headers": {"content-type": "multipart/form-data; boundary=x"}},
         400, ["multipart/form-data body refused"]),
    ]


def test_bad_inputs_get_a_4xx_naming_the_problem_and_the_service_goes_on(client, model):
    for what, request, status, words in _bad_requests(model):
        response = client.post("/predict", **request)
        assert response.status_code == status, (what, response.text)
        error = response.json()["error"]
        for word in words:
            assert word in error, (what, error)
        after = client.post("/predict", files=_files(model, [1]))
        assert after.status_code == 200, (what, after.text)
        assert after.json()["predictions"][0]["file"] == model.names[1]


def test_images_pillow_only_warns_about_are_refused(client, model, monkeypatch):
    """Between Pillow's MAX_IMAGE_PIXELS and twice that, Pillow decodes with a
    warning; the service refuses them (limit lowered to below a 72x72 image)."""
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 72 * 72 - 1)
    response = client.post("/predict", files=_files(model, [0]))
    assert response.status_code == 413 and "decompression bomb" in response.json()["error"]
    monkeypatch.undo()
    assert client.post("/predict", files=_files(model, [0])).status_code == 200


# ---------------------------------------------------------------- bounds on the work of a request

def _count_decodes(service, monkeypatch):
    """The uploads the service decodes from now on, in a list."""
    decoded, decode = [], service.predictor.preprocess
    monkeypatch.setattr(service.predictor, "preprocess", lambda upload, **kw: decoded.append(str(upload))
                        or decode(upload, **kw))
    return decoded


def test_a_request_over_the_pixel_budget_is_refused_before_any_decoding(model, monkeypatch):
    """The tester's case: 9400 x 9400 16-bit PNGs of 170 kB (each under
    Pillow's pixel limit, 4.7 s and 1.6 GB to decode); two in one request are
    refused from their headers, naming the limit and the file that crosses it."""
    deep = _blank_png(9400, depth=16)
    assert Image.open(io.BytesIO(deep)).size == (9400, 9400) and len(deep) < 400_000
    with TestClient(create_app(model.dir, max_mb=2)) as client:
        decoded = _count_decodes(client.app.state.service, monkeypatch)
        response = client.post("/predict", files=[("file", (f"deep{i}.png", deep, "image/png")) for i in (1, 2)])
        assert response.status_code == 413, response.text
        assert "over --max_mpx 90 million (reached at deep2.png)" in response.json()["error"]
        assert decoded == []
        assert client.app.state.service.metadata()["limits"]["max_request_pixels"] == 90_000_000


def test_the_pixel_budget_counts_every_image_of_the_request(model, monkeypatch):
    """--max_mpx 0.012: two 72 x 72 Eval images (10368 pixels) fit, three do not."""
    with TestClient(create_app(model.dir, max_mb=MAX_MB, max_mpx=0.012)) as client:
        decoded = _count_decodes(client.app.state.service, monkeypatch)
        refused = client.post("/predict", files=_files(model, [0, 1, 2]))
        assert refused.status_code == 413 and f"reached at {model.names[2]}" in refused.json()["error"]
        assert decoded == []
        assert client.post("/predict", files=_files(model, [0, 1])).status_code == 200
        assert decoded == model.names[:2]


def test_a_large_jpeg_is_decoded_reduced_and_answered_as_infer_does(client, model, monkeypatch, tmp_path):
    """The model needs resize_short (73) pixels a side: a 2048 px JPEG decodes
    at 1/8 (256 px, still twice that), and its answer stays infer.py's to
    within 0.01 in each probability."""
    small = Image.open(model.images[model.names.index("red_0.png")])
    photo = tmp_path / "red_0.jpg"
    small.resize((2048, 2048), Image.BILINEAR).save(photo, quality=95)
    output = tmp_path / "rows.jsonl"
    infer_main(["--model_dir", str(model.dir), "--input", str(photo), "--top_k", "3", "--output", str(output)])
    expected = json.loads(output.read_text())
    from paddle_tl.predict import predictor as predictor_module
    sizes, load = [], predictor_module.load_rgb
    monkeypatch.setattr(predictor_module, "load_rgb", lambda *args: sizes.append(load(*args).size) or load(*args))
    answer = client.post("/predict", params={"top_k": 3}, files=[("file", ("red_0.jpg", photo.read_bytes()))])
    assert sizes == [(256, 256)]
    [row] = answer.json()["predictions"]
    assert row["class_ids"] == expected["class_ids"]
    assert row["scores"] == pytest.approx(expected["scores"], abs=0.01)


def test_a_small_request_is_answered_while_a_heavy_one_decodes(client, model, monkeypatch):
    """A request of several images whose decoding is held up (until the test
    lets it go) does not hold up a one-image request sent meanwhile: that one
    is answered while the heavy one is still decoding."""
    service = client.app.state.service
    decode, heavy_decoding, release = service.predictor.preprocess, threading.Event(), threading.Event()

    def slow(upload, **kw):
        if str(upload).startswith("heavy"):
            heavy_decoding.set()
            release.wait(120)
        return decode(upload, **kw)

    monkeypatch.setattr(service.predictor, "preprocess", slow)
    data = model.images[0].read_bytes()
    with ThreadPoolExecutor(2) as pool:
        try:
            heavy = pool.submit(client.post, "/predict", files=[("file", (f"heavy{i}.png", data)) for i in range(4)])
            assert heavy_decoding.wait(60)
            small = pool.submit(client.post, "/predict", files=_files(model, [1])).result(timeout=60)
            assert small.status_code == 200 and small.json()["predictions"][0]["file"] == model.names[1]
            assert not heavy.done()  # answered first, though sent second
        finally:
            release.set()
        assert heavy.result(timeout=60).status_code == 200 and len(heavy.result().json()["predictions"]) == 4


def test_at_most_decode_slots_images_decode_at_once(client, model, monkeypatch):
    """DECODE_SLOTS + 1 requests at once: DECODE_SLOTS of them decode, the
    last waits for a slot (it bounds the memory decoding takes)."""
    service = client.app.state.service
    decode, lock, release = service.predictor.preprocess, threading.Lock(), threading.Event()
    active, started = [0, 0], threading.Semaphore(0)  # decoding now, most at once

    def held(upload, **kw):
        with lock:
            active[0] += 1
            active[1] = max(active)
        started.release()
        release.wait(120)
        with lock:
            active[0] -= 1
        return decode(upload, **kw)

    monkeypatch.setattr(service.predictor, "preprocess", held)
    with ThreadPoolExecutor(DECODE_SLOTS + 1) as pool:
        try:
            answers = [pool.submit(client.post, "/predict", files=_files(model, [i])) for i in range(DECODE_SLOTS + 1)]
            for _ in range(DECODE_SLOTS):
                assert started.acquire(timeout=60)
            assert not started.acquire(timeout=1)  # the last request waits for a slot
        finally:
            release.set()
        assert [answer.result(timeout=60).status_code for answer in answers] == [200] * (DECODE_SLOTS + 1)
    assert active[1] == DECODE_SLOTS


# ---------------------------------------------------------------- other origins

def test_posts_from_other_origins_are_refused(client, model):
    """A web page of another site cannot make a browser post to the service;
    the service's own page (Origin = its host) and programs (no Origin) can."""
    refused = client.post("/predict", files=_files(model, [0]), headers={"origin": "https://evil.example"})
    assert refused.status_code == 403
    assert refused.json() == {"error": "cross-origin POST from https://evil.example refused (this is "
                                       "http://testserver); start the service with --allow_origin "
                                       "https://evil.example to allow that site"}
    assert client.post("/predict", files=_files(model, [0]), headers={"origin": "null"}).status_code == 403
    assert client.post("/predict", files=_files(model, [0]), headers={"origin": "http://testserver"}).status_code == 200
    assert client.post("/predict", files=_files(model, [0])).status_code == 200
    assert client.get("/metadata", headers={"origin": "https://evil.example"}).status_code == 200  # reads stay open


def test_allow_origin_admits_the_named_sites(model):
    with TestClient(create_app(model.dir, allow_origin=["http://localhost:3000"])) as client:
        assert client.post("/predict", files=_files(model, [0]),
                           headers={"origin": "http://localhost:3000"}).status_code == 200
        assert client.post("/predict", files=_files(model, [0]),
                           headers={"origin": "http://localhost:3001"}).status_code == 403


@pytest.mark.parametrize("flag, value", [("--max_mb", "inf"), ("--max_mb", "nan"), ("--max_mb", "-1"),
                                         ("--max_mb", "0"), ("--max_mb", "ten"), ("--max_mpx", "inf"),
                                         ("--request_timeout", "0"), ("--allow_origin", "evil.example"),
                                         ("--allow_origin", "http://localhost:3000/page")])
def test_command_line_refuses_bad_limits_in_one_line(model, flag, value, capsys):
    with pytest.raises(SystemExit) as exit:
        cli.main(["serve", "--model_dir", str(model.dir), flag, value])
    assert exit.value.code == 2
    last = capsys.readouterr().err.strip().splitlines()[-1]
    assert last.startswith(f"paddle-tl serve: error: argument {flag}: must be ") and repr(value) in last


def test_unknown_routes_and_methods_answer_json(client):
    assert client.get("/predict").status_code == 405
    missing = client.get("/nothing")
    assert missing.status_code == 404 and missing.json() == {"error": "Not Found"}


# ---------------------------------------------------------------- metadata and page

def test_healthz_and_metadata(client, model):
    assert client.get("/healthz").json() == {"status": "ok", "pid": os.getpid()}
    meta = client.get("/metadata").json()
    written = yaml.safe_load((model.dir / "inference.yml").read_text())
    assert meta["class_names"] == written["class_names"] == ["blue", "green", "red"]
    assert meta["num_classes"] == 3 and meta["arch"] == "mobilenet_v1"
    assert meta["preprocess"] == written["preprocess"] and meta["preprocess"]["input_size"] == 64
    assert meta["files"] == {"model_file": written["model_file"], "params_file": "inference.pdiparams",
                             "meta_file": "inference.yml"}
    assert meta["backend"] == "paddle" and meta["backend_file"] == written["model_file"]
    assert meta["limits"]["max_mb"] == MAX_MB and meta["limits"]["field"] == "file"
    assert "precision" not in meta


def test_metadata_reports_the_precision_inference_yml_records(model, tmp_path):
    folder = tmp_path / "inference"
    shutil.copytree(model.dir, folder)
    meta = yaml.safe_load((folder / "inference.yml").read_text())
    (folder / "inference.yml").write_text(yaml.safe_dump({**meta, "precision": "int8"}))
    with TestClient(create_app(folder)) as other:
        assert other.get("/metadata").json()["precision"] == "int8"


def test_page_is_self_contained_with_an_upload_form(client):
    response = client.get("/")
    assert response.status_code == 200 and response.headers["content-type"].startswith("text/html")
    page = response.text
    for part in ('<form id="upload"', 'enctype="multipart/form-data"', 'type="file"', 'name="file"',
                 'fetch("metadata")', "predict?top_k="):
        assert part in page
    assert "http://" not in page and "https://" not in page and "<link" not in page  # no external assets


def test_command_line_refuses_a_missing_folder_in_one_line(tmp_path, capsys):
    assert cli.main(["serve", "--model_dir", str(tmp_path / "gone")]) == 2
    assert capsys.readouterr().err.strip().splitlines()[-1] == (
        f"error: inference folder {tmp_path / 'gone'} does not exist; write one with tools/export_model.py")


# ---------------------------------------------------------------- the real server

def _free_port():
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


class Server:
    """`python tools/serve.py` in a subprocess on 127.0.0.1 and a free port,
    until the `with` block ends."""

    def __init__(self, model_dir, log, *args):
        self.url = f"http://127.0.0.1:{_free_port()}"
        self.command = [sys.executable, str(REPO / "tools" / "serve.py"), "--model_dir", str(model_dir),
                        "--port", self.url.rsplit(":", 1)[1], *args]
        self.log = log

    def __enter__(self):
        env = dict(os.environ, HOME=str(self.log.parent / "home"))
        with open(self.log, "w") as log:
            self.process = subprocess.Popen(self.command, stdout=log, stderr=subprocess.STDOUT, env=env)
        deadline = time.monotonic() + 240
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                pytest.fail(f"the server exited with {self.process.returncode}:\n{self.log.read_text()}")
            try:
                if httpx.get(f"{self.url}/healthz", timeout=2).status_code == 200:
                    return self
            except httpx.TransportError:
                pass
            time.sleep(0.5)
        self.__exit__()
        pytest.fail(f"the server did not answer /healthz within 240 s:\n{self.log.read_text()}")

    def __exit__(self, *exc):
        self.process.send_signal(signal.SIGINT)  # uvicorn's graceful shutdown
        try:
            self.process.wait(timeout=60)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()


@pytest.mark.slow
def test_real_server_over_http(model, infer_rows, tmp_path):
    """uvicorn with two worker processes (each its own predictor): answers
    equal to infer.py's, a refusal, and the service still answering."""
    with Server(model.dir, tmp_path / "server.log", "--workers", "2") as server:
        response = httpx.post(f"{server.url}/predict?top_k=3", files=_files(model, range(len(model.images))),
                              timeout=60)
        assert response.status_code == 200, response.text
        for answer, row, name in zip(response.json()["predictions"], infer_rows, model.names):
            _same_as_infer(answer, row, name)
        refused = httpx.post(f"{server.url}/predict", files=[("file", ("x.txt", b"text", "text/plain"))], timeout=60)
        assert refused.status_code == 415 and "x.txt" in refused.json()["error"]
        assert httpx.get(f"{server.url}/metadata", timeout=10).json()["class_names"] == ["blue", "green", "red"]
        again = httpx.post(f"{server.url}/predict", files=_files(model, [3]), timeout=60)
        assert again.status_code == 200 and again.json()["predictions"][0]["file"] == model.names[3]
    assert "2 worker(s)" in (tmp_path / "server.log").read_text()


def _closed_by_the_server(connection, within):
    """Whether the server closes `connection` within `within` seconds
    (False: it still holds it open)."""
    connection.settimeout(within)
    try:
        return connection.recv(1) == b""
    except ConnectionResetError:
        return True
    except socket.timeout:
        return False


@pytest.mark.slow
def test_real_server_drops_stalled_clients_and_logs_hang_ups_in_one_line(model, tmp_path):
    """Clients that hang up mid-upload are one line each in the log (were a
    traceback each); a connection that sends nothing, one stuck in its headers
    and one stuck in its body are closed (were held forever); meanwhile the
    service answers."""
    address = ("127.0.0.1", None)
    head = (b"POST /predict HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: multipart/form-data; boundary=x\r\n"
            b"Content-Length: 100000\r\n\r\n--x\r\nContent-Disposition: form-data; name=\"file\"; "
            b"filename=\"a.png\"\r\n\r\n" + b"\0" * 1000)
    with Server(model.dir, tmp_path / "server.log", "--request_timeout", "2") as server:
        address = ("127.0.0.1", int(server.url.rsplit(":", 1)[1]))
        for _ in range(2):
            with socket.create_connection(address, timeout=10) as hang_up:
                hang_up.sendall(head)
                time.sleep(0.5)  # let the service start reading the body
        silent, in_headers, in_body = (socket.create_connection(address, timeout=10) for _ in range(3))
        in_headers.sendall(head[:40])
        in_body.sendall(head)
        started = time.monotonic()
        try:
            assert [_closed_by_the_server(c, 30) for c in (in_headers, in_body, silent)] == [True] * 3
        finally:
            for connection in (silent, in_headers, in_body):
                connection.close()
        assert time.monotonic() - started < 20  # 2 s request timeout, 5 s keep-alive
        assert httpx.post(f"{server.url}/predict", files=_files(model, [0]), timeout=60).status_code == 200
    text = (tmp_path / "server.log").read_text()
    assert "Traceback" not in text and "Exception in ASGI application" not in text, text
    assert text.count("the client disconnected before sending the whole request") >= 2, text
    assert text.count("its request did not arrive whole within --request_timeout 2 s") == 2, text


# ---------------------------------------------------------------- the page in a browser

@pytest.mark.slow
def test_page_in_headless_chromium(model, infer_rows, tmp_path, chromium):
    """A person's path: open the page, pick a file that is no image and read
    the refusal, then drop an image on it and see the top classes as bars with
    their percentages (the service's answer for that image); the screenshot is
    kept in the test's folder and as /tmp/serve_page.png."""
    pytest.importorskip("websocket", reason="websocket-client is not installed (the dev extra)")
    # A bigger picture than the 72 px Eval images, of the same kind: their first red image, enlarged.
    index = model.names.index("red_0.png")
    image = tmp_path / "red_0.png"
    Image.open(model.images[index]).resize((288, 288), Image.NEAREST).save(image)
    not_an_image = tmp_path / "notes.txt"
    not_an_image.write_text("not an image")
    with Server(model.dir, tmp_path / "server.log") as server:
        expected = httpx.post(f"{server.url}/predict", files=[("file", ("red_0.png", image.read_bytes()))],
                              timeout=60).json()["predictions"][0]
        process, page_url = open_browser(chromium, tmp_path / "profile")
        try:
            page = DevTools(page_url)
            page.navigate(f"{server.url}/", 1000, 760,
                          "document.getElementById('model').textContent.includes('3 classes')")
            # Picked in the file input: a file that is no image, answered with the service's error.
            page.pick_file(not_an_image)
            page.wait_for("document.getElementById('error').textContent !== ''")
            refusal = page.evaluate("document.getElementById('error').textContent")
            # Dropped on the drop zone: the image, answered with bars.
            box = page.evaluate("JSON.stringify(document.getElementById('drop').getBoundingClientRect())")
            box = json.loads(box)
            x, y = box["x"] + box["width"] / 2, box["y"] + box["height"] / 2
            data = {"items": [], "files": [str(image)], "dragOperationsMask": 1}
            for kind in ("dragEnter", "dragOver", "drop"):
                page.call("Input.dispatchDragEvent", type=kind, x=x, y=y, data=data)
            page.wait_for("document.querySelectorAll('#results .result').length === 3 && "
                          "document.getElementById('preview').complete")
            shown = page.evaluate("[...document.querySelectorAll('#results .result')].map(row => "
                                  "[row.querySelector('.name').textContent, row.querySelector('.pct').textContent, "
                                  "row.querySelector('.bar').getBoundingClientRect().width / "
                                  "row.querySelector('.track').getBoundingClientRect().width])")
            heading = page.evaluate("document.querySelector('#results h2').textContent")
            error = page.evaluate("document.getElementById('error').textContent")
            screenshot = base64.b64decode(page.call("Page.captureScreenshot", format="png")["data"])
        finally:
            process.kill()
            process.wait()
    (tmp_path / "serve_page.png").write_bytes(screenshot)
    Path("/tmp/serve_page.png").write_bytes(screenshot)
    assert refusal.startswith("415: cannot read image notes.txt: cannot identify image file")
    assert error == "" and heading == "red_0.png"
    assert [name for name, _, _ in shown] == expected["label_names"]
    assert [percent for _, percent, _ in shown] == [f"{100 * s:.1f}%" for s in expected["scores"]]
    for (_, _, fraction), score in zip(shown, expected["scores"]):
        assert fraction == pytest.approx(score, abs=0.01)  # each bar as long as its probability
    assert Image.open(io.BytesIO(screenshot)).size == (1000, 760)


@pytest.mark.slow
def test_load_bench_runs_and_stops_by_itself(model, tmp_path):
    done = subprocess.run([sys.executable, str(REPO / "bench" / "serve_load.py"), "--model_dir", str(model.dir),
                           "--image", str(model.images[0]), "--clients", "2", "--requests", "3", "--workers", "1"],
                          capture_output=True, text=True, timeout=300, env=dict(os.environ, HOME=str(tmp_path)))
    assert done.returncode == 0, done.stderr
    table = done.stdout.strip().splitlines()[-3:]
    assert table[0] == "| workers | threads each | clients x requests | requests/s | p50 ms | p95 ms | errors |"
    assert table[2].startswith(f"| 1 | {os.cpu_count()} | 2 x 3 | ") and table[2].endswith(" | 0 |")


def test_the_service_scores_with_the_folders_temperature(model, tmp_path):
    """A calibrated folder (temperature in inference.yml): the service's
    scores are infer.py's calibrated ones, not the raw softmax."""
    calibrated = tmp_path / "calibrated"
    shutil.copytree(model.dir, calibrated)
    meta_file = calibrated / "inference.yml"
    meta_file.write_text(meta_file.read_text().replace("temperature: 1.0", "temperature: 3.0"))
    assert yaml.safe_load(meta_file.read_text())["temperature"] == 3.0
    output = tmp_path / "rows.jsonl"
    infer_main(["--model_dir", str(calibrated), "--input", str(model.images[0]), "--top_k", "3",
                "--output", str(output)])
    expected = json.loads(output.read_text())
    with TestClient(create_app(calibrated, max_mb=MAX_MB)) as client:
        answer = client.post("/predict", params={"top_k": 3}, files=_files(model, [0])).json()["predictions"][0]
    _same_as_infer(answer, expected, model.names[0])
    with TestClient(create_app(model.dir, max_mb=MAX_MB)) as client:
        raw = client.post("/predict", params={"top_k": 3}, files=_files(model, [0])).json()["predictions"][0]
    assert raw["scores"][0] > answer["scores"][0]  # a temperature above 1 softens the scores


def test_reject_below_answers_unknown_as_infer_does(client, model, tmp_path):
    everything = client.post("/predict", params={"reject_below": 1.01}, files=_files(model, [0, 1])).json()
    assert [row["label_names"][0] for row in everything["predictions"]] == ["unknown", "unknown"]
    nothing = client.post("/predict", data={"reject_below": "0"}, files=_files(model, [0, 1])).json()
    assert "unknown" not in [row["label_names"][0] for row in nothing["predictions"]]
    output = tmp_path / "rows.jsonl"
    infer_main(["--model_dir", str(model.dir), "--input", str(model.images[0]), "--top_k", "3",
                "--reject_below", "1.01", "--output", str(output)])
    answer = client.post("/predict", params={"top_k": 3, "reject_below": 1.01}, files=_files(model, [0])).json()
    _same_as_infer(answer["predictions"][0], json.loads(output.read_text()), model.names[0])
    bad = client.post("/predict", params={"reject_below": "often"}, files=_files(model, [0]))
    assert bad.status_code == 400 and "reject_below must be a probability" in bad.json()["error"]

"""`paddle-tl serve`: an exported inference folder behind HTTP (FastAPI on
uvicorn), for people (`GET /`, a page to drop an image on) and for programs
(`POST /predict`, `GET /metadata`, `GET /healthz`).

The answers are infer.py's: the same Predictor decodes each upload (load_rgb),
preprocesses it (the eval transform inference.yml describes), runs and ranks
it, so the service returns what `paddle-tl infer --output` writes for the same
file, with the uploaded filename as `file`. A detection folder answers
detection rows (boxes in the upload's pixels, scores, label_ids,
label_names: tasks/detection/predictor.py), decoded in full, and the page
draws the boxes.

Concurrency: a Paddle Inference predictor has one input and one output handle
and must not run from two threads at once, and on CPU one run already uses the
cores it is given. So each worker process owns one Predictor and runs it for
one request at a time behind a lock; `--workers N` starts N processes, each
with its own Predictor and 1/N of the cores, to answer requests in parallel.
Decoding happens before that lock, one image at a time per request and at most
DECODE_SLOTS images at once per process: a request with 32 large images holds
one slot at a time, so a small request sent meanwhile decodes in another and
waits for the predictor only as long as one run takes.

What one request may cost is bounded before any pixel is decoded: its body
(--max_mb), its images (MAX_FILES), each image's pixels (Pillow's
MAX_IMAGE_PIXELS) and the pixels of all of them together, as decoded
(--max_mpx; a JPEG decodes at a reduced size, Predictor.draft_size). The
connection is bounded too (BoundedH11): a request must arrive whole within
--request_timeout seconds, an idle connection closes after KEEP_ALIVE_S.
"""

import argparse
import functools
import io
import json
import logging
import math
import os
import threading
from pathlib import Path
from urllib.parse import urlsplit

import numpy as np
from PIL import Image, UnidentifiedImageError

from paddle_tl.data.datasets import header_sizes
from paddle_tl.errors import DataError, UserError
from paddle_tl.predict.predictor import (BACKENDS, CLASSIFICATION, META_FILE, open_predictor, positive_int, read_meta,
                                         reject_threshold, task_of)

try:
    import h11
    import uvicorn
    from fastapi import FastAPI, Request
    from fastapi.concurrency import run_in_threadpool
    from fastapi.responses import HTMLResponse, JSONResponse
    from starlette.datastructures import UploadFile
    from starlette.exceptions import HTTPException
    from starlette.requests import ClientDisconnect
    from uvicorn.protocols.http.h11_impl import H11Protocol
except ImportError as exc:
    raise UserError(f"paddle-tl serve needs the `serve` extra ({exc}): pip install -e \".[serve]\"") from None

log = logging.getLogger("paddle_tl")
# Configured by uvicorn in every worker process, unlike paddle_tl's (set up by the command line in the parent only).
server_log = logging.getLogger("uvicorn.error")

FIELD = "file"  # the multipart field holding the image(s)
DEFAULT_MAX_MB = 10
DEFAULT_TOP_K = 5
MAX_FILES = 32  # images in one request
# Pixels one request may decode, all its images together, in millions: one image at Pillow's MAX_IMAGE_PIXELS
# (89.5 Mpx) fits; 32 of them (18 s of decoding) do not.
DEFAULT_MAX_MPX = 90
DECODE_SLOTS = 2  # images one worker process decodes at once
DEFAULT_REQUEST_TIMEOUT = 60  # seconds from a request's first byte to its last
KEEP_ALIVE_S = 5  # an idle connection closes after this (uvicorn's default, also applied before a first request)
MAX_HEADER_BYTES = 16 * 1024  # request line and headers (h11's default, made explicit)
LIMIT_CONCURRENCY = 64  # connections and requests a worker process holds at once; beyond, 503
# How --workers N hands the options to its worker processes (uvicorn imports worker_app there).
WORKER_ENV = "PADDLE_TL_SERVE"
PAGE = Path(__file__).with_name("serve_page.html")


class RequestError(Exception):
    """A request the service refuses: an HTTP status and a message naming the problem."""

    def __init__(self, status, message):
        super().__init__(message)
        self.status = status


class Upload(io.BytesIO):
    """An uploaded image standing where infer.py has a path: Pillow reads it
    like a file, and str() is the uploaded filename (the rows' `file`, and the
    name in load_rgb's error messages)."""

    def __init__(self, data, filename):
        super().__init__(data)
        self.filename = filename

    def __str__(self):
        return self.filename

    def __repr__(self):
        return repr(self.filename)


def _decode_status(exc):
    """The HTTP status of an upload load_rgb could not decode: 413 for too many
    pixels, 415 for what is no image at all, 422 for a damaged one."""
    if isinstance(exc.__cause__, (Image.DecompressionBombError, Image.DecompressionBombWarning)):
        return 413
    if isinstance(exc.__cause__, UnidentifiedImageError):
        return 415
    return 422


class Service:
    """One process's Predictor: uploads decoded a few at a time (DECODE_SLOTS),
    the model run for one request at a time."""

    def __init__(self, predictor, max_mb=DEFAULT_MAX_MB, max_mpx=DEFAULT_MAX_MPX, decode_slots=DECODE_SLOTS):
        self.predictor = predictor
        self.max_mb = max_mb
        self.max_bytes = int(max_mb * 2**20)
        self.max_mpx = max_mpx
        self.max_pixels = int(max_mpx * 1e6)
        self._lock = threading.Lock()  # the predictor's handles: one run at a time
        self._decode_slots = threading.BoundedSemaphore(decode_slots)

    def predict(self, uploads, top_k, reject_below=None):
        """infer.py's rows for the uploads, in order: preprocess, run, rank, as
        Predictor.predict_paths does. A request holding an upload that is not
        a readable image, or more pixels than allowed, is refused whole
        (RequestError naming each culprit), the latter before any decoding."""
        self.check_sizes(uploads)
        arrays, failures = [], []
        for upload in uploads:
            with self._decode_slots:  # per image: another request's images get the next free slot
                try:
                    arrays.append(self.predictor.preprocess(upload, reduced=True))
                except DataError as exc:
                    failures.append((_decode_status(exc), str(exc)))
        _refuse(failures)
        if task_of(self.predictor.meta) != CLASSIFICATION:
            if top_k != DEFAULT_TOP_K or reject_below is not None:
                raise RequestError(400, "top_k and reject_below rank a classifier's classes; this service detects "
                                        "objects (boxes, scores, label_ids, label_names per image)")
            with self._lock:
                rows = [self.predictor.row(self.predictor.run(inputs)) for inputs in arrays]
        else:
            with self._lock:
                rows = self.predictor.rank(np.stack(arrays), top_k, reject_below)  # predict_paths' ranking
        return [{"file": str(upload), **row} for upload, row in zip(uploads, rows)]

    def check_sizes(self, uploads):
        """Refuse (RequestError 413/415/422) from the headers alone: what
        Pillow cannot open, an image over MAX_IMAGE_PIXELS (where Pillow only
        warns up to twice that, a server refuses), and a request whose images
        would decode to more than --max_mpx pixels together."""
        failures, total, over = [], 0, None
        for upload in uploads:
            try:
                (width, height), decoded = header_sizes(upload, self.predictor.draft_size)
            except DataError as exc:
                failures.append((_decode_status(exc), str(exc)))
                continue
            if width * height > Image.MAX_IMAGE_PIXELS:
                failures.append((413, f"cannot read image {upload}: {width}x{height} is {width * height} pixels, "
                                      f"over the {Image.MAX_IMAGE_PIXELS} one image may have (a possible "
                                      "decompression bomb)"))
                continue
            total += decoded[0] * decoded[1]
            if total > self.max_pixels and over is None:
                over = upload
        _refuse(failures)
        if over is not None:
            raise RequestError(413, f"the request's images decode to {total} pixels together, over --max_mpx "
                                    f"{self.max_mpx} million (reached at {over}): send fewer or smaller images")

    def metadata(self):
        meta = self.predictor.meta
        files = {key: meta[key] for key in ("model_file", "params_file", "onnx_file") if key in meta}
        data = {"task": task_of(meta), "class_names": self.predictor.class_names,
                "num_classes": len(self.predictor.class_names), "preprocess": meta["preprocess"],
                "backend": self.predictor.backend,
                "backend_file": Path(self.predictor.model_file).name, "files": {**files, "meta_file": META_FILE},
                "limits": {"max_mb": self.max_mb, "max_files": MAX_FILES, "field": FIELD,
                           "max_pixels": Image.MAX_IMAGE_PIXELS, "max_request_pixels": self.max_pixels}}
        for key in ("arch", "precision", "temperature", "tta", "paddle_version", "detector"):
            if key in meta:
                data[key] = meta[key]
        return data


def _refuse(failures):
    """RequestError with the first failure's status, naming every failed upload."""
    if failures:
        raise RequestError(failures[0][0], "; ".join(message for _, message in failures))


class BodyLimit:
    """ASGI middleware: a request body over max_bytes is refused with 413, by
    its Content-Length before anything is read, or once more than that has
    arrived (a chunked upload)."""

    def __init__(self, app, max_bytes, max_mb):
        self.app = app
        self.max_bytes = max_bytes
        self.message = f"request body over --max_mb {max_mb} MB"

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        declared = dict(scope["headers"]).get(b"content-length", b"")
        if declared.isdigit() and int(declared) > self.max_bytes:
            response = JSONResponse({"error": f"{self.message} ({int(declared)} bytes)"}, status_code=413)
            return await response(scope, receive, send)
        received = 0

        async def counted():
            nonlocal received
            message = await receive()
            received += len(message.get("body", b""))
            if received > self.max_bytes:
                raise RequestError(413, f"{self.message} (more than {self.max_bytes} bytes sent)")
            return message

        await self.app(scope, counted, send)


class OriginCheck:
    """ASGI middleware: a POST (any method but GET, HEAD, OPTIONS) whose
    Origin header names another site than the one serving it is refused with
    403 before its body is read, unless --allow_origin allows that origin.
    Browsers send Origin with every cross-site POST, so a web page cannot make
    a visitor's browser use a service on their machine or network; requests
    without an Origin (curl, programs) pass."""

    def __init__(self, app, allowed=()):
        self.app = app
        self.allowed = frozenset(allowed)

    async def __call__(self, scope, receive, send):
        if scope["type"] == "http" and scope["method"] not in ("GET", "HEAD", "OPTIONS"):
            headers = dict(scope["headers"])
            origin = headers.get(b"origin")
            if origin is not None:
                origin = origin.decode("latin-1").strip().lower()
                own = f"{scope.get('scheme', 'http')}://{headers.get(b'host', b'').decode('latin-1')}".lower()
                if origin != own and origin not in self.allowed and "*" not in self.allowed:
                    response = JSONResponse({"error": f"cross-origin {scope['method']} from {origin} refused (this is "
                                                      f"{own}); start the service with --allow_origin {origin} to "
                                                      "allow that site"}, status_code=403)
                    return await response(scope, receive, send)
        return await self.app(scope, receive, send)


class BoundedH11(H11Protocol):
    """uvicorn's h11 protocol with the bounds it lacks on slow clients: a
    connection that sends nothing closes after the keep-alive timeout (uvicorn
    arms that only after a response), and one whose request (line, headers,
    body) is not all in within request_timeout seconds of its first byte is
    closed. Without them each stalled connection is held forever."""

    def __init__(self, *args, request_timeout=DEFAULT_REQUEST_TIMEOUT, **kwargs):
        super().__init__(*args, **kwargs)
        self.request_timeout = request_timeout
        self._deadline = None

    def connection_made(self, transport):
        super().connection_made(transport)
        self.timeout_keep_alive_task = self.loop.call_later(self.timeout_keep_alive, self.timeout_keep_alive_handler)

    def data_received(self, data):
        super().data_received(data)
        if self.conn.their_state in (h11.IDLE, h11.SEND_BODY):  # a request begun, not yet whole
            if self._deadline is None and not self.transport.is_closing():
                self._deadline = self.loop.call_later(self.request_timeout, self._request_timed_out)
        else:
            self._cancel_deadline()

    def connection_lost(self, exc):
        self._cancel_deadline()
        super().connection_lost(exc)

    def _cancel_deadline(self):
        if self._deadline is not None:
            self._deadline.cancel()
            self._deadline = None

    def _request_timed_out(self):
        self._deadline = None
        if self.conn.their_state in (h11.IDLE, h11.SEND_BODY) and not self.transport.is_closing():
            client = "%s:%d " % self.client if self.client else ""
            server_log.info("%sclosed: its request did not arrive whole within --request_timeout %g s", client,
                            self.request_timeout)
            self.transport.close()


async def _read_request(request):
    """(uploads, top_k, reject_below) of a POST /predict, or RequestError
    saying what is wrong."""
    content_type = request.headers.get("content-type", "")
    how = f"POST the image(s) as multipart/form-data in the field '{FIELD}'"
    if not content_type.startswith("multipart/form-data"):
        if not await request.body():
            raise RequestError(400, f"empty request body: {how}")
        raise RequestError(415, f"content type {content_type or '(none)'}: {how}")
    try:
        form = await request.form(max_files=MAX_FILES, max_fields=MAX_FILES)
    except HTTPException as exc:  # Starlette's word on a malformed body or too many files
        raise RequestError(exc.status_code, f"multipart/form-data body refused: {exc.detail}") from None
    try:
        items = form.getlist(FIELD)
        if not items:
            got = ", ".join(repr(key) for key in dict.fromkeys(form.keys()))
            raise RequestError(400, f"no field '{FIELD}' in the form{f' (it has {got})' if got else ''}: {how}")
        uploads = []
        for number, item in enumerate(items, 1):
            if not isinstance(item, UploadFile):
                raise RequestError(400, f"field '{FIELD}' holds text, not a file: {how}")
            name = item.filename or f"upload {number}"
            data = await item.read()
            if not data:
                raise RequestError(400, f"{name} is empty (0 bytes)")
            uploads.append(Upload(data, name))
        given = request.query_params.get("top_k", form.get("top_k"))
        reject = request.query_params.get("reject_below", form.get("reject_below"))
    finally:
        await form.close()
    return uploads, _top_k(given), _reject_below(reject)


def _top_k(text):
    if text is None or text == "":
        return DEFAULT_TOP_K
    if not str(text).isdigit() or int(text) < 1:
        raise RequestError(400, f"top_k must be a whole number >= 1, got {str(text)!r}")
    return int(text)


def _reject_below(text):
    """infer.py's --reject_below: below this calibrated top probability the
    first label name is "unknown"; None when not given."""
    if text is None or text == "":
        return None
    try:
        return reject_threshold(text)
    except ValueError as exc:
        raise RequestError(400, f"reject_below {exc}") from None


def create_app(model_dir, *, backend=None, cpu_threads=None, max_mb=DEFAULT_MAX_MB, max_mpx=DEFAULT_MAX_MPX,
               allow_origin=()):
    """The FastAPI app serving the inference folder model_dir (loaded now)."""
    service = Service(open_predictor(model_dir, backend=backend, cpu_threads=cpu_threads), max_mb, max_mpx)
    page = PAGE.read_text(encoding="utf-8")
    app = FastAPI(title="paddle_tl", docs_url=None, redoc_url=None, openapi_url=None)  # docs would need a CDN
    app.state.service = service
    app.add_middleware(BodyLimit, max_bytes=service.max_bytes, max_mb=max_mb)
    app.add_middleware(OriginCheck, allowed=allow_origin)  # added last: runs first, before the body is read

    @app.exception_handler(RequestError)
    async def refused(request, exc):
        return JSONResponse({"error": str(exc)}, status_code=exc.status)

    @app.exception_handler(ClientDisconnect)
    async def hung_up(request, exc):  # nobody to answer; one line, not the traceback of a bug
        client = "%s:%d " % tuple(request.client) if request.client else ""
        server_log.info("%s%s %s: the client disconnected before sending the whole request", client,
                        request.method, request.url.path)
        return JSONResponse({"error": "client disconnected"}, status_code=400)

    @app.exception_handler(HTTPException)
    async def http_error(request, exc):  # Starlette's own 400/404/405, in the same shape
        return JSONResponse({"error": str(exc.detail)}, status_code=exc.status_code, headers=exc.headers)

    @app.exception_handler(Exception)
    async def failed(request, exc):  # a bug: logged with its traceback by uvicorn; the service goes on
        return JSONResponse({"error": f"internal error: {type(exc).__name__}: {exc}"}, status_code=500)

    @app.get("/", response_class=HTMLResponse)
    async def index():
        return page

    @app.get("/healthz")
    async def healthz():
        return {"status": "ok", "pid": os.getpid()}

    @app.get("/metadata")
    async def metadata():
        return service.metadata()

    @app.post("/predict")
    async def predict(request: Request):
        uploads, top_k, reject_below = await _read_request(request)
        return {"predictions": await run_in_threadpool(service.predict, uploads, top_k, reject_below)}

    return app


def worker_app():
    """The app of one uvicorn worker process under --workers N: its own
    Predictor, from the options the parent process left in WORKER_ENV."""
    return create_app(**json.loads(os.environ[WORKER_ENV]))


def _parser():
    parser = argparse.ArgumentParser(prog="paddle-tl serve",
                                     description="Serve an exported inference model over HTTP: POST /predict, "
                                                 "GET /metadata, GET /healthz, and a page at GET /.")
    parser.add_argument("--model_dir", required=True, help="inference folder written by export")
    parser.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1: this machine "
                                                            "only; 0.0.0.0 for every interface)")
    parser.add_argument("--port", type=int, default=8080)
    parser.add_argument("--workers", type=positive_int, default=1,
                        help="worker processes, each with its own predictor and 1/N of the cores (default 1)")
    parser.add_argument("--max_mb", type=_positive_number, default=DEFAULT_MAX_MB,
                        help=f"largest request body in MB, all its images together (default {DEFAULT_MAX_MB})")
    parser.add_argument("--max_mpx", type=_positive_number, default=DEFAULT_MAX_MPX,
                        help="most pixels one request may decode, all its images together, in millions; a large "
                             f"JPEG counts at the reduced size it decodes at (default {DEFAULT_MAX_MPX})")
    parser.add_argument("--allow_origin", action="append", type=_origin, default=[], metavar="URL",
                        help="also accept POSTs that browsers send from pages of this origin (scheme://host[:port]; "
                             "repeatable; * for any); by default only from the service's own page")
    parser.add_argument("--request_timeout", type=_positive_number,
                        default=DEFAULT_REQUEST_TIMEOUT,
                        help="seconds a client has to send a whole request, from its first byte; slower ones are "
                             f"disconnected (default {DEFAULT_REQUEST_TIMEOUT})")
    parser.add_argument("--backend", choices=tuple(BACKENDS), default=None,
                        help="paddle: Paddle Inference; onnx: onnxruntime on CPU (needs export --onnx); "
                             "default: the folder's own (paddle, or what an INT8 folder's inference.yml names)")
    parser.add_argument("--cpu_threads", type=positive_int, default=None,
                        help="threads per worker (default: the cores divided among the workers)")
    return parser


def _positive_number(text):
    """argparse type of --max_mb, --max_mpx, --request_timeout: a finite
    number > 0 (inf overflowed, and no limit is not a limit)."""
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not 0 < value < math.inf:
        raise argparse.ArgumentTypeError(f"must be a finite number > 0, got {text!r}")
    return value


def _origin(text):
    """--allow_origin: * or an origin as browsers send it (scheme://host[:port], lower case, no path)."""
    if text == "*":
        return text
    parts = urlsplit(text.strip())
    if parts.scheme not in ("http", "https") or not parts.netloc or parts.path not in ("", "/") or parts.query:
        raise argparse.ArgumentTypeError(f"must be * or scheme://host[:port] (e.g. http://localhost:3000), "
                                         f"got {text!r}")
    return f"{parts.scheme}://{parts.netloc}".lower()


def main(argv=None):
    args = _parser().parse_args(argv)
    read_meta(args.model_dir)  # a wrong folder is one line before any worker starts
    options = {"model_dir": str(Path(args.model_dir).resolve()), "backend": args.backend, "max_mb": args.max_mb,
               "max_mpx": args.max_mpx, "allow_origin": args.allow_origin,
               "cpu_threads": args.cpu_threads or max(1, (os.cpu_count() or 1) // args.workers)}
    log.info("serving %s on http://%s:%d with %d worker(s), %d thread(s) each", options["model_dir"], args.host,
             args.port, args.workers, options["cpu_threads"])
    bounds = {"http": functools.partial(BoundedH11, request_timeout=args.request_timeout),
              "timeout_keep_alive": KEEP_ALIVE_S, "h11_max_incomplete_event_size": MAX_HEADER_BYTES,
              "limit_concurrency": LIMIT_CONCURRENCY}
    if args.workers == 1:
        uvicorn.run(create_app(**options), host=args.host, port=args.port, **bounds)
    else:
        os.environ[WORKER_ENV] = json.dumps(options)
        uvicorn.run(f"{__name__}:worker_app", factory=True, host=args.host, port=args.port, workers=args.workers,
                    **bounds)

"""`paddle-tl serve`: an exported inference folder behind HTTP (FastAPI on
uvicorn), for people (`GET /`, a page to drop an image on) and for programs
(`POST /predict`, `GET /metadata`, `GET /healthz`).

The answers are infer.py's: the same Predictor decodes each upload (load_rgb),
preprocesses it (the eval transform inference.yml describes), runs and ranks
it, so the service returns what `paddle-tl infer --output` writes for the same
file, with the uploaded filename as `file`.

Concurrency: a Paddle Inference predictor has one input and one output handle
and must not run from two threads at once, and on CPU one run already uses the
cores it is given. So each worker process owns one Predictor and runs one
request at a time behind a lock (decoding included, which also bounds the
memory a large image takes); `--workers N` starts N processes, each with its
own Predictor and 1/N of the cores, to answer requests in parallel.
"""

import argparse
import io
import json
import logging
import os
import threading
import warnings
from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError

from paddle_tl.errors import DataError, UserError
from paddle_tl.predict.predictor import BACKENDS, META_FILE, Predictor, positive_int, read_meta, reject_threshold

try:
    import uvicorn
    from fastapi import FastAPI, Request
    from fastapi.concurrency import run_in_threadpool
    from fastapi.responses import HTMLResponse, JSONResponse
    from starlette.datastructures import UploadFile
    from starlette.exceptions import HTTPException
except ImportError as exc:
    raise UserError(f"paddle-tl serve needs the `serve` extra ({exc}): pip install -e \".[serve]\"") from None

log = logging.getLogger("paddle_tl")

FIELD = "file"  # the multipart field holding the image(s)
DEFAULT_MAX_MB = 10
DEFAULT_TOP_K = 5
MAX_FILES = 32  # images in one request
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
    """One process's Predictor, run for one request at a time."""

    def __init__(self, predictor, max_mb=DEFAULT_MAX_MB):
        self.predictor = predictor
        self.max_mb = max_mb
        self.max_bytes = int(max_mb * 2**20)
        self._lock = threading.Lock()

    def predict(self, uploads, top_k, reject_below=None):
        """infer.py's rows for the uploads, in order: preprocess, run, rank, as
        Predictor.predict_paths does. A request holding an upload that is not
        a readable image is refused whole (RequestError naming each one)."""
        predictor = self.predictor
        arrays, failures = [], []
        with self._lock:
            # A server refuses images above Pillow's MAX_IMAGE_PIXELS, where Pillow only warns up to twice that.
            with warnings.catch_warnings():
                warnings.simplefilter("error", Image.DecompressionBombWarning)
                for upload in uploads:
                    try:
                        arrays.append(predictor.preprocess(upload))
                    except DataError as exc:
                        failures.append((_decode_status(exc), str(exc)))
            if failures:
                raise RequestError(failures[0][0], "; ".join(message for _, message in failures))
            rows = predictor.rank(np.stack(arrays), top_k, reject_below)  # predict_paths' ranking: infer.py's rows
        return [{"file": str(upload), **row} for upload, row in zip(uploads, rows)]

    def metadata(self):
        meta = self.predictor.meta
        files = {key: meta[key] for key in ("model_file", "params_file", "onnx_file") if key in meta}
        data = {"class_names": self.predictor.class_names, "num_classes": len(self.predictor.class_names),
                "preprocess": meta["preprocess"], "backend": self.predictor.backend,
                "backend_file": Path(self.predictor.model_file).name, "files": {**files, "meta_file": META_FILE},
                "limits": {"max_mb": self.max_mb, "max_files": MAX_FILES, "field": FIELD,
                           "max_pixels": Image.MAX_IMAGE_PIXELS}}
        for key in ("arch", "precision", "temperature", "tta", "paddle_version"):
            if key in meta:
                data[key] = meta[key]
        return data


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


def create_app(model_dir, *, backend=None, cpu_threads=None, max_mb=DEFAULT_MAX_MB):
    """The FastAPI app serving the inference folder model_dir (loaded now)."""
    service = Service(Predictor(model_dir, backend=backend, cpu_threads=cpu_threads), max_mb)
    page = PAGE.read_text(encoding="utf-8")
    app = FastAPI(title="paddle_tl", docs_url=None, redoc_url=None, openapi_url=None)  # docs would need a CDN
    app.state.service = service
    app.add_middleware(BodyLimit, max_bytes=service.max_bytes, max_mb=max_mb)

    @app.exception_handler(RequestError)
    async def refused(request, exc):
        return JSONResponse({"error": str(exc)}, status_code=exc.status)

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
    parser.add_argument("--max_mb", type=_positive_float, default=DEFAULT_MAX_MB,
                        help=f"largest request body in MB, all its images together (default {DEFAULT_MAX_MB})")
    parser.add_argument("--backend", choices=tuple(BACKENDS), default=None,
                        help="paddle: Paddle Inference; onnx: onnxruntime on CPU (needs export --onnx); "
                             "default: the folder's own (paddle, or what an INT8 folder's inference.yml names)")
    parser.add_argument("--cpu_threads", type=positive_int, default=None,
                        help="threads per worker (default: the cores divided among the workers)")
    return parser




def _positive_float(text):
    value = float(text)
    if not value > 0:
        raise argparse.ArgumentTypeError(f"must be > 0, got {text}")
    return value


def main(argv=None):
    args = _parser().parse_args(argv)
    read_meta(args.model_dir)  # a wrong folder is one line before any worker starts
    options = {"model_dir": str(Path(args.model_dir).resolve()), "backend": args.backend, "max_mb": args.max_mb,
               "cpu_threads": args.cpu_threads or max(1, (os.cpu_count() or 1) // args.workers)}
    log.info("serving %s on http://%s:%d with %d worker(s), %d thread(s) each", options["model_dir"], args.host,
             args.port, args.workers, options["cpu_threads"])
    if args.workers == 1:
        uvicorn.run(create_app(**options), host=args.host, port=args.port)
    else:
        os.environ[WORKER_ENV] = json.dumps(options)
        uvicorn.run(f"{__name__}:worker_app", factory=True, host=args.host, port=args.port, workers=args.workers)

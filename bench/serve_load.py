"""Load on `paddle-tl serve`: C concurrent clients, each sending R requests
that post one real image to /predict, against a server this script starts on
127.0.0.1 (loopback only) and stops when done. Prints requests/s, p50/p95
latency, errors and the worker count as a Markdown table.

    python bench/serve_load.py [--model_dir DIR] [--image IMG] [--clients 8] [--requests 50]
                               [--workers 1] [--cpu_threads T]

Without --model_dir it exports mobilenet_v2 (224 px, classes ants and bees)
with random weights to a temporary folder: serving costs the same whatever
the weights. The image is the first ants/bees val photo from ../shared when
there is one, else a generated 500x375 JPEG. Bounded: at most C x R requests,
and --max_seconds of load at most.
"""

import argparse
import http.client
import io
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import numpy as np  # noqa: E402
from PIL import Image  # noqa: E402

SHARED_VAL = REPO.parent / "shared" / "datasets" / "hymenoptera" / "val"
HOST = "127.0.0.1"  # loopback only


def random_model(folder):
    """An inference folder of mobilenet_v2 with random weights and two classes."""
    from paddle_tl.config import load_config
    from paddle_tl.deploy.export import export
    from paddle_tl.models.zoo import build_model
    from paddle_tl.runs.checkpoint import save_checkpoint
    from paddle_tl.runtime import import_paddle

    paddle = import_paddle()
    paddle.seed(0)
    network = build_model("mobilenet_v2", 2)
    network.eval()
    prefix = folder / "run" / "best_model"
    prefix.parent.mkdir(parents=True)
    save_checkpoint(prefix, network, state={"class_names": ["ants", "bees"]})
    return export(load_config(None, ["Arch.name=mobilenet_v2", f"Global.pretrained_model={prefix}",
                                     f"Global.save_inference_dir={folder / 'inference'}",
                                     f"DataLoader.Eval.dataset.root={SHARED_VAL}"]), parity_images=2)


def test_image(path):
    """(filename, bytes) of the image every request posts."""
    if path is None and SHARED_VAL.is_dir():
        path = sorted((SHARED_VAL / "ants").glob("*.jpg"))[0]
    if path is not None:
        return Path(path).name, Path(path).read_bytes()
    pixels = np.random.RandomState(0).randint(0, 256, (375, 500, 3), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, "JPEG", quality=90)
    return "generated.jpg", buffer.getvalue()


def multipart(filename, data):
    """(content type, body) of a form with the image in the field `file`."""
    boundary = uuid.uuid4().hex
    body = (f"--{boundary}\r\nContent-Disposition: form-data; name=\"file\"; filename=\"{filename}\"\r\n"
            "Content-Type: application/octet-stream\r\n\r\n").encode() + data + f"\r\n--{boundary}--\r\n".encode()
    return f"multipart/form-data; boundary={boundary}", body


def free_port():
    with socket.socket() as probe:
        probe.bind((HOST, 0))
        return probe.getsockname()[1]


def start_server(model_dir, port, workers, cpu_threads, log):
    threads = ["--cpu_threads", str(cpu_threads)] if cpu_threads else []
    process = subprocess.Popen([sys.executable, str(REPO / "tools" / "serve.py"), "--model_dir", str(model_dir),
                                "--host", HOST, "--port", str(port), "--workers", str(workers), *threads],
                               stdout=log, stderr=subprocess.STDOUT)
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise SystemExit(f"serve_load: the server exited with {process.returncode}; see {log.name}")
        try:
            connection = http.client.HTTPConnection(HOST, port, timeout=2)
            connection.request("GET", "/healthz")
            if connection.getresponse().status == 200:
                return process
        except OSError:
            time.sleep(0.5)
    process.kill()
    raise SystemExit("serve_load: the server did not answer /healthz within 300 s")


def client(port, content_type, body, requests, stop_at, latencies, errors):
    """One keep-alive connection sending `requests` POST /predict in a row."""
    connection = http.client.HTTPConnection(HOST, port, timeout=120)
    for _ in range(requests):
        if time.monotonic() > stop_at:
            errors.append("not sent: --max_seconds reached")
            continue
        started = time.perf_counter()
        try:
            connection.request("POST", "/predict", body=body, headers={"Content-Type": content_type})
            response = connection.getresponse()
            answer = response.read()
            if response.status != 200 or not json.loads(answer)["predictions"][0]["label_names"]:
                errors.append(f"{response.status}: {answer[:200]!r}")
        except (OSError, http.client.HTTPException, ValueError, KeyError) as exc:
            errors.append(f"{type(exc).__name__}: {exc}")
            connection.close()
            connection = http.client.HTTPConnection(HOST, port, timeout=120)
        latencies.append(time.perf_counter() - started)
    connection.close()


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model_dir", help="inference folder (default: random-weight mobilenet_v2, exported here)")
    parser.add_argument("--image", help="the image to post (default: an ants/bees photo, else a generated JPEG)")
    parser.add_argument("--clients", type=int, default=8)
    parser.add_argument("--requests", type=int, default=50, help="requests per client")
    parser.add_argument("--workers", type=int, default=1, help="server worker processes")
    parser.add_argument("--cpu_threads", type=int, help="threads per worker (default: the server's)")
    parser.add_argument("--max_seconds", type=float, default=600, help="stop sending after this long")
    args = parser.parse_args()
    filename, data = test_image(args.image)
    content_type, body = multipart(filename, data)
    with tempfile.TemporaryDirectory() as tmp:
        model_dir = Path(args.model_dir) if args.model_dir else random_model(Path(tmp))
        port = free_port()
        with open(Path(tmp) / "server.log", "w") as log:
            server = start_server(model_dir, port, args.workers, args.cpu_threads, log)
            try:
                # One request first: the slowest path (first batch shape) is not what load measures.
                client(port, content_type, body, 1, time.monotonic() + 60, [], [])
                latencies, errors = [], []
                load_before, stop_at = os.getloadavg()[0], time.monotonic() + args.max_seconds
                threads = [threading.Thread(target=client, args=(port, content_type, body, args.requests, stop_at,
                                                                 latencies, errors))
                           for _ in range(args.clients)]
                started = time.perf_counter()
                for thread in threads:
                    thread.start()
                for thread in threads:
                    thread.join()
                seconds = time.perf_counter() - started
                load_after = os.getloadavg()[0]
            finally:
                server.send_signal(signal.SIGINT)
                try:
                    server.wait(timeout=60)
                except subprocess.TimeoutExpired:
                    server.kill()
    milliseconds = 1000 * np.array(latencies or [float("nan")])
    done = len(latencies) - sum(not e.startswith("not sent") for e in errors)
    print(f"model {model_dir.name if args.model_dir else 'mobilenet_v2 (random weights, 224 px)'}, "
          f"image {filename} ({len(data) // 1024} kB), {os.cpu_count()} CPUs, "
          f"load average {load_before:.1f} before, {load_after:.1f} after")
    threads = args.cpu_threads or max(1, (os.cpu_count() or 1) // args.workers)
    print("| workers | threads each | clients x requests | requests/s | p50 ms | p95 ms | errors |")
    print("| --- | --- | --- | --- | --- | --- | --- |")
    print(f"| {args.workers} | {threads} | {args.clients} x {args.requests} | {done / seconds:.1f} | "
          f"{np.percentile(milliseconds, 50):.0f} | {np.percentile(milliseconds, 95):.0f} | {len(errors)} |")
    for error in sorted(set(errors))[:5]:
        print(f"error: {error}", file=sys.stderr)
    return 1 if errors else 0


if __name__ == "__main__":
    sys.exit(main())

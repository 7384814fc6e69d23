"""Serving speed and accuracy through a real TorchServe, beside the same work done in-process.

`python bench/serve.py [--requests 400] [--seconds 5] [--matrix]`
`                       [--accuracy-digits 10000] [--rendition-digits 1000]`

Starts its own TorchServe (config.properties, model_store/mnist.mar, free ports, a temp run
folder) and measures, with a 280x280 canvas PNG (what the page sends):

- sequential latency p50/p95 (one client, keep-alive; a TorchServe request and an in-process
  one in turn, so their ratio is measured under the same load), and the handler's own time split per
  request (decode, preprocess, model: its `Server-Timing` header) beside the same split in-process;
- the model's forward time per image on one thread: eager torch, the fused torch model and the
  runtime the handler serves with (ONNX Runtime when installed);
- throughput with 1, 8 and 32 concurrent clients;
- the floor: the archive's own preprocessing and model in this process (single requests for
  latency and 1 client, batches of 8 and 32 for 8 and 32 clients), and TorchServe / floor;
- resident memory of the TorchServe processes (launcher, Java frontend, Python workers);
- `--matrix`: throughput of other worker / batch settings, registered beside the default
  through the management API, to choose config.properties;
- accuracy through the inference API on official test images and on canvas renditions.

The machine's 2 cores are shared with the client threads, so the figures are a lower bound.
"""

from __future__ import annotations

import argparse
import copy
import http.client
import importlib
import json
import os
import statistics
import sys
import tempfile
import threading
import time
import zipfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from urllib.parse import urlsplit

import httpx
import numpy as np
import psutil
import torch
from PIL import Image

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from serving.keys import headers as key_headers  # noqa: E402
from serving.torchserve import ServeConfig, read_pid, start, stop  # noqa: E402
from settings import Settings  # noqa: E402
from tests.fixtures.torchserve import free_ports  # noqa: E402
from tests.handlers.renditions import RENDITIONS, png, read_mnist_test, render  # noqa: E402

MNIST = ROOT.parent / "shared" / "data" / "mnist"
CLIENTS = (1, 8, 32)
WARM_UP = 300  # sequential requests before timing
SETTINGS = ((1, 1, 0), (2, 1, 1), (2, 2, 0), (2, 4, 0), (2, 8, 0), (2, 8, 1))  # workers, batch, delay ms


def percentile(values: list[float], q: float) -> float:
    return float(np.percentile(values, q))


# TorchServe's inference and management keys (token authorization is on): set once it started.
KEYS: dict[str, dict[str, str]] = {"inference": {}, "management": {}}


class Client:
    """A keep-alive HTTP/1.1 client (http.client: the least client CPU per request)."""

    def __init__(self, url: str) -> None:
        parts = urlsplit(url)
        self.path = parts.path
        self.conn = http.client.HTTPConnection(parts.hostname or "127.0.0.1", parts.port, timeout=60)

    def post(self, body: bytes) -> tuple[int, bytes]:
        status, data, _ = self.post_timed(body)
        return status, data

    def post_timed(self, body: bytes) -> tuple[int, bytes, str]:
        """Status, body and the handler's Server-Timing header."""
        self.conn.request(
            "POST", self.path, body=body, headers={"Content-Type": "image/png", **KEYS["inference"]}
        )
        response = self.conn.getresponse()
        return response.status, response.read(), response.getheader("Server-Timing") or ""

    def close(self) -> None:
        self.conn.close()


def timing_parts(header: str) -> dict[str, float]:
    """`decode;dur=0.3, preprocess;dur=0.9, model;dur=0.5;desc=...` -> {"decode": 0.3, ...}."""
    parts = {}
    for item in filter(None, header.split(",")):
        name, *params = (p.strip() for p in item.split(";"))
        parts[name] = next((float(p[4:]) for p in params if p.startswith("dur=")), float("nan"))
    return parts


SPLIT = ("decode", "preprocess", "model")


def sequential_latency(
    url: str, floor: Floor, body: bytes, count: int
) -> tuple[list[float], list[float], dict[str, list[float]]]:
    """Milliseconds per request through TorchServe and in-process, one of each in turn.

    Interleaved, both see the same state of the machine (its other load, its clock), so their
    ratio does not move with whatever ran during one block and not the other. Returns both
    latencies and the handler's split of each TorchServe request.
    """
    client = Client(url)
    for _ in range(WARM_UP):
        client.post(body)
        floor.predict([body])
    served, local = [], []
    split: dict[str, list[float]] = {name: [] for name in SPLIT}
    for _ in range(count):
        t0 = time.perf_counter()
        status, _, timing = client.post_timed(body)
        t1 = time.perf_counter()
        floor.predict([body])
        local.append((time.perf_counter() - t1) * 1000)
        served.append((t1 - t0) * 1000)
        assert status == 200, status
        for name, value in timing_parts(timing).items():
            split.setdefault(name, []).append(value)
    client.close()
    return served, local, split


def throughput(url: str, body: bytes, clients: int, seconds: float) -> tuple[float, int]:
    """Successful predictions per second with `clients` concurrent keep-alive clients, and 5xx count."""
    stop_at = time.perf_counter() + seconds
    counts = [0] * clients
    errors = [0] * clients
    start_gate = threading.Barrier(clients + 1)

    def run(i: int) -> None:
        client = Client(url)
        client.post(body)
        start_gate.wait()
        while time.perf_counter() < stop_at:
            status, _ = client.post(body)
            if status == 200:
                counts[i] += 1
            else:
                errors[i] += 1
        client.close()

    threads = [threading.Thread(target=run, args=(i,)) for i in range(clients)]
    for t in threads:
        t.start()
    start_gate.wait()
    t0 = time.perf_counter()
    stop_at = t0 + seconds
    for t in threads:
        t.join()
    return sum(counts) / (time.perf_counter() - t0), sum(errors)


class Floor:
    """The archive's preprocessing and model, in this process (no HTTP, no TorchServe)."""

    def __init__(self, mar: Path, workdir: Path) -> None:
        with zipfile.ZipFile(mar) as z:
            z.extractall(workdir)
        manifest = json.loads((workdir / "MAR-INF" / "MANIFEST.json").read_text())
        sys.path.insert(0, str(workdir))
        self.pp = importlib.import_module("preprocess")
        net_module = importlib.import_module(Path(manifest["model"]["modelFile"]).stem)
        importlib.import_module(Path(manifest["model"]["handler"]).stem)  # loads, as TorchServe does
        self.handler = handler = importlib.import_module("model_runtime")
        self.eager = net_module.Net()
        self.eager.load_state_dict(
            torch.load(workdir / manifest["model"]["serializedFile"], map_location="cpu")
        )
        self.eager.eval()
        self.fused = handler.for_inference(handler.LogitsAndFeatures(copy.deepcopy(self.eager)))
        # exactly what the handler runs: its fast runtime when there is one, else the fused torch model
        fast = handler.onnx_forward(workdir / handler.ONNX_FILE, torch.get_num_threads())
        self.runtime = "onnxruntime" if fast else "torch"
        self.forward_fn = fast or handler.torch_forward(self.fused, torch.device("cpu"))
        self.temperature = handler.read_temperature(workdir)
        self.head = handler.read_digit_head(workdir)

    def model(self, batch: np.ndarray) -> np.ndarray:
        """What the handler does after preprocessing: forward, calibrated softmax, the digit head."""
        logits, features = self.forward_fn(batch)
        if self.head is not None:
            self.head.is_digit(features)
        probs: np.ndarray = self.handler.calibrated(logits, self.temperature)
        return probs

    def predict(self, bodies: list[bytes]) -> list[int]:
        digits = np.stack([self.pp.preprocess(b) for b in bodies])
        return [int(i) for i in self.model(self.pp.normalize(digits)[:, None]).argmax(1)]

    def split(self, body: bytes, count: int) -> dict[str, list[float]]:
        """The handler's three steps timed one by one, in this process (batch of 1)."""
        out: dict[str, list[float]] = {name: [] for name in SPLIT}
        for i in range(count + 20):
            t0 = time.perf_counter()
            image = self.pp.load_image(self.pp.decode_payload(body, "image/png"))
            t1 = time.perf_counter()
            digit = self.pp.preprocess(image)
            t2 = time.perf_counter()
            self.model(self.pp.normalize(digit[None])[:, None])
            t3 = time.perf_counter()
            if i >= 20:  # warmed up
                for name, a, b in (("decode", t0, t1), ("preprocess", t1, t2), ("model", t2, t3)):
                    out[name].append((b - a) * 1000)
        return out

    def forward(self, body: bytes, count: int) -> dict[str, list[float]]:
        """Forward time per image at batch 1: eager torch, fused torch, and the served runtime."""
        x = self.pp.normalize(self.pp.preprocess(body)[None])[:, None]
        runs = {
            "eager torch": self.handler.torch_forward(
                self.handler.LogitsAndFeatures(self.eager), torch.device("cpu")
            ),
            "fused torch (channels-last)": self.handler.torch_forward(self.fused, torch.device("cpu")),
            f"served ({self.runtime})": self.forward_fn,
        }
        out: dict[str, list[float]] = {}
        for name, run in runs.items():
            for _ in range(50):
                run(x)
            times = []
            for _ in range(count):
                t0 = time.perf_counter()
                run(x)
                times.append((time.perf_counter() - t0) * 1000)
            out[name] = times
        return out

    def latency(self, body: bytes, count: int) -> list[float]:
        """Milliseconds per request in this process alone (warm caches: nothing runs in between)."""
        for _ in range(20):
            self.predict([body])
        times = []
        for _ in range(count):
            t0 = time.perf_counter()
            self.predict([body])
            times.append((time.perf_counter() - t0) * 1000)
        return times

    def throughput(self, body: bytes, batch: int, seconds: float) -> float:
        done, t0 = 0, time.perf_counter()
        while time.perf_counter() - t0 < seconds:
            self.predict([body] * batch)
            done += batch
        return done / (time.perf_counter() - t0)


def rss_mb(config: ServeConfig) -> dict[str, float]:
    pid = read_pid(config)
    leader = psutil.Process(pid)
    out: dict[str, float] = {}
    for proc in [leader, *leader.children(recursive=True)]:
        cmd = " ".join(proc.cmdline())
        kind = "java" if "java" in cmd else "worker" if "model_service_worker" in cmd else "launcher"
        out[kind] = out.get(kind, 0.0) + proc.memory_info().rss / 2**20
    out["total"] = sum(out.values())
    return out


def register_variant(config: ServeConfig, name: str, workers: int, batch: int, delay: int) -> str:
    response = httpx.post(
        f"{config.management_url}/models",
        params={
            "url": "mnist.mar",
            "model_name": name,
            "initial_workers": workers,
            "batch_size": batch,
            "max_batch_delay": delay,
            "synchronous": "true",
        },
        headers=KEYS["management"],
        timeout=300,
    )
    response.raise_for_status()
    return f"{config.inference_url}/predictions/{name}"


def accuracy(url: str, bodies: list[bytes], labels: np.ndarray) -> tuple[float, int]:
    """Share of right answers through the API (8 clients), and the number of non-200 answers."""
    with httpx.Client(timeout=60, headers=KEYS["inference"]) as client, ThreadPoolExecutor(8) as pool:
        responses = list(pool.map(lambda b: client.post(url, content=b), bodies))
    failed = sum(r.status_code != 200 for r in responses)
    predicted = np.array([r.json()["digit"] if r.status_code == 200 else -1 for r in responses])
    return float((predicted == labels).mean()), failed


def report_latency_and_throughput(url: str, floor: Floor, body: bytes, requests: int, seconds: float) -> None:
    throughput(url, body, 8, seconds)  # warm-up: the Java frontend's JIT, every netty and worker thread
    ts_lat, fl_lat, ts_split = sequential_latency(url, floor, body, requests)
    print("\nsequential latency (ms)      p50     p95   (one request of each in turn)")
    print(f"  TorchServe             {percentile(ts_lat, 50):7.2f} {percentile(ts_lat, 95):7.2f}")
    print(f"  in-process floor       {percentile(fl_lat, 50):7.2f} {percentile(fl_lat, 95):7.2f}")
    print(f"  ratio                  {percentile(ts_lat, 50) / percentile(fl_lat, 50):7.2f}")
    alone = floor.latency(body, requests)
    alone_p50, alone_p95 = percentile(alone, 50), percentile(alone, 95)
    print(f"  in-process, alone      {alone_p50:7.2f} {alone_p95:7.2f}   (a block of its own)")
    print(f"  ratio to that          {percentile(ts_lat, 50) / alone_p50:7.2f}")
    fl_split = floor.split(body, requests)
    print(f"\nhandler time split per request (ms, p50; model = {floor.runtime}, T={floor.temperature:g})")
    print("                              " + "".join(f"{name:>12s}" for name in SPLIT) + "   handler total")
    for label, split in (("inside TorchServe (header)", ts_split), ("in-process", fl_split)):
        if not all(split.get(name) for name in SPLIT):
            print(f"  {label:28s} (no Server-Timing header: an archive from before it)")
            continue
        medians = [percentile(split[name], 50) for name in SPLIT]
        total = percentile([sum(v) for v in zip(*(split[n] for n in SPLIT), strict=True)], 50)
        print(f"  {label:28s}" + "".join(f"{m:12.3f}" for m in medians) + f"   {total:8.3f}")
    if all(ts_split.get(name) for name in SPLIT):
        inside = [sum(v) for v in zip(*(ts_split[n] for n in SPLIT), strict=True)]
        overhead = percentile(ts_lat, 50) - percentile(inside, 50)
        print(f"  TorchServe's own overhead (latency - handler, p50): {overhead:.3f}")
    print("\nmodel forward per image, batch 1, one thread (ms)     p50     p95")
    for name, times in floor.forward(body, requests).items():
        print(f"  {name:48s} {percentile(times, 50):7.3f} {percentile(times, 95):7.3f}")
    print("\nthroughput (predictions/s)   TorchServe   floor   ratio   5xx")
    for clients in CLIENTS:
        rate, errors = throughput(url, body, clients, seconds)
        floor_rate = floor.throughput(body, clients, seconds)
        ratio = rate / floor_rate
        print(f"  {clients:2d} clients          {rate:12.0f} {floor_rate:7.0f} {ratio:7.2f} {errors:5d}")


def report_matrix(config: ServeConfig, body: bytes, seconds: float) -> None:
    """Throughput of other worker / batch settings (the default model is scaled to 0 meanwhile)."""
    management = config.management_url
    print("\nsettings matrix (predictions/s)      8 clients   32 clients")
    for workers, batch, delay in SETTINGS:
        name = f"mnist_w{workers}_b{batch}_d{delay}"
        variant = register_variant(config, name, workers, batch, delay)
        scale: dict[str, str | int] = {"min_worker": 0, "max_worker": 0, "synchronous": "true"}
        httpx.put(f"{management}/models/mnist", params=scale, headers=KEYS["management"], timeout=120)
        rates = [throughput(variant, body, c, seconds)[0] for c in (8, 32)]
        label = f"{workers} worker(s), batch {batch:2d}, {delay} ms"
        print(f"  {label:32s} {rates[0]:10.0f} {rates[1]:12.0f}")
        httpx.delete(f"{management}/models/{name}", headers=KEYS["management"], timeout=120)
        scale = {"min_worker": 1, "max_worker": 1, "synchronous": "true"}
        httpx.put(f"{management}/models/mnist", params=scale, headers=KEYS["management"], timeout=120)


def report_accuracy(url: str, images: np.ndarray, labels: np.ndarray, official: int, renditions: int) -> None:
    if official:
        bodies = [png(Image.fromarray(i)) for i in images[:official]]
        acc, failed = accuracy(url, bodies, labels[:official])
        print(f"\naccuracy, {official} official test images through the API: {acc:.4f} ({failed} non-200)")
    if renditions:
        pick = np.linspace(0, len(images) - 1, renditions).astype(int)  # spread over the whole test set
        print(f"accuracy, canvas renditions of {renditions} test digits (evenly spread) through the API:")
        total = []
        for name in RENDITIONS:
            bodies = [render(i, name) for i in images[pick]]
            acc, failed = accuracy(url, bodies, labels[pick])
            total.append(acc)
            print(f"  {name:20s} {acc:.4f} ({failed} non-200)")
        print(f"  {'all':20s} {statistics.mean(total):.4f}")


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--requests", type=int, default=400, help="sequential requests for latency")
    parser.add_argument("--seconds", type=float, default=5.0, help="duration of each throughput run")
    parser.add_argument("--matrix", action="store_true", help="also compare worker / batch settings")
    parser.add_argument("--accuracy-digits", type=int, default=10000, help="official test images (0: skip)")
    parser.add_argument("--rendition-digits", type=int, default=1000, help="digits x 11 renditions (0: skip)")
    args = parser.parse_args()

    images, labels = read_mnist_test(MNIST)
    body = render(images[0], "canvas")
    print(f"torch {torch.__version__}; payload: a 280x280 canvas PNG ({len(body)} bytes)")
    print(f"{psutil.cpu_count()} cores, shared with the client threads (and anything else running)")
    print("load average (1, 5, 15 min): " + ", ".join(f"{v:.2f}" for v in os.getloadavg()))

    with tempfile.TemporaryDirectory(prefix="bench-serve-") as tmp:
        *urls, grpc_inference, grpc_management = free_ports(5)
        inference, management, metrics = (f"http://127.0.0.1:{p}" for p in urls)
        config = ServeConfig(
            model_store=Path(Settings().model_store),
            run_dir=Path(tmp) / "run",
            inference_url=inference,
            management_url=management,
            metrics_url=metrics,
            grpc_inference_port=grpc_inference,
            grpc_management_port=grpc_management,
        )
        torch.set_num_threads(1)  # like a TorchServe worker (OMP_NUM_THREADS=1)
        floor = Floor(config.mar_file, Path(tmp) / "mar")
        t0 = time.perf_counter()
        start(config)
        print(f"TorchServe ready in {time.perf_counter() - t0:.1f} s")
        KEYS.update({api: key_headers(config.key_file, api) for api in ("inference", "management")})
        try:
            url = f"{inference}/predictions/mnist"
            described = httpx.get(f"{management}/models/mnist", headers=KEYS["management"]).json()[0]
            print(
                f"registered by serving: {len(described['workers'])} worker(s), batch size "
                f"{described['batchSize']}, max batch delay {described['maxBatchDelay']} ms"
            )
            report_latency_and_throughput(url, floor, body, args.requests, args.seconds)
            print("\nresident memory (MB): " + ", ".join(f"{k} {v:.0f}" for k, v in rss_mb(config).items()))
            if args.matrix:
                report_matrix(config, body, args.seconds)
            report_accuracy(url, images, labels, args.accuracy_digits, args.rendition_digits)
        finally:
            stop(config)


if __name__ == "__main__":
    main()

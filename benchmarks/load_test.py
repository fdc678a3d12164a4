"""Load test of `hiad-pl serve`: N concurrent clients x M requests on the loopback interface.

Starts the server on a free 127.0.0.1 port, waits for ``/health``, sends one
warm-up request, then lets ``--clients`` threads send ``--requests`` images
each (cycling through ``--images``). Every request has a timeout and the whole
test a deadline (``--deadline_s``), after which clients stop and the server is
shut down, so the test always ends by itself. Reports throughput, p50/p95
latency, errors, the batch sizes the server formed and its resident memory
before and after.

    python benchmarks/load_test.py --run_dir runs/quickstart --category texture \\
        --images demo_data/texture/test --clients 4 --requests 8
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import numpy as np

from hiad_pl.deploy.files import input_images
from hiad_pl.serve import free_port


def rss_mb(pid: int) -> float:
    """Resident memory of a process in MiB (Linux /proc)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError(f"no VmRSS for process {pid}")


def start_server(args: argparse.Namespace, port: int) -> subprocess.Popen:
    """`hiad-pl serve` on 127.0.0.1:port, once /health answers."""
    command = [sys.executable, "-m", "hiad_pl.cli", "serve", "--run_dir", args.run_dir, "--port", str(port),
               "--max_batch_size", str(args.max_batch_size), "--max_wait_ms", str(args.max_wait_ms)]
    if args.category:
        command += ["--category", args.category]
    server = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + args.startup_s
    while time.monotonic() < deadline:
        if server.poll() is not None:
            raise RuntimeError(f"hiad-pl serve exited with code {server.returncode}")
        try:
            if httpx.get(f"http://127.0.0.1:{port}/health", timeout=5).status_code == 200:
                return server
        except httpx.TransportError:
            time.sleep(0.5)
    server.kill()
    raise RuntimeError(f"hiad-pl serve did not answer /health within {args.startup_s} s")


def run_clients(url: str, images: list[tuple[str, bytes]], args: argparse.Namespace) -> list[dict]:
    """Each client sends its requests in turn; returns one record per request sent."""
    records: list[dict] = []
    lock = threading.Lock()
    deadline = time.monotonic() + args.deadline_s

    def client(number: int) -> None:
        with httpx.Client(timeout=args.request_timeout_s) as session:
            for k in range(args.requests):
                if time.monotonic() > deadline:
                    return
                name, data = images[(number * args.requests + k) % len(images)]
                start = time.perf_counter()
                try:
                    response = session.post(f"{url}/predict", files={"image": (name, data, "image/png")},
                                            params={"map": "true"} if args.map else None)
                    status, batch = response.status_code, response.json().get("batch_size")
                except httpx.HTTPError as error:
                    status, batch = type(error).__name__, None
                with lock:
                    records.append({"status": status, "latency_s": time.perf_counter() - start, "batch": batch})

    threads = [threading.Thread(target=client, args=(n,), daemon=True) for n in range(args.clients)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(max(0.0, deadline - time.monotonic()) + args.request_timeout_s)
    return records


def main() -> None:
    """Run the load test and print (and optionally save) its figures."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--run_dir", required=True)
    parser.add_argument("--category", default=None)
    parser.add_argument("--images", nargs="+", required=True, help="Image files or folders to send")
    parser.add_argument("--clients", type=int, default=4)
    parser.add_argument("--requests", type=int, default=8, help="Requests per client")
    parser.add_argument("--max_batch_size", type=int, default=4)
    parser.add_argument("--max_wait_ms", type=float, default=10.0)
    parser.add_argument("--map", action="store_true", help="Ask for the map PNG too")
    parser.add_argument("--deadline_s", type=float, default=300.0, help="Clients stop sending after this")
    parser.add_argument("--request_timeout_s", type=float, default=120.0)
    parser.add_argument("--startup_s", type=float, default=300.0)
    parser.add_argument("--name", default=None, help="Name of this measurement (default: from clients, requests, batch)")
    parser.add_argument("--output", type=Path, default=Path("docs/serving.json"), help="JSON file the results are kept in, by name")
    parser.add_argument("--results_md", type=Path, default=None, help="Rebuild the Serving section of this Markdown file")
    parser.add_argument("--note", default="", help="A line about the machine, printed above the table")
    args = parser.parse_args()

    images = [(p.name, p.read_bytes()) for p in input_images(args.images)]
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    server = start_server(args, port)
    try:
        warm = httpx.post(f"{url}/predict", files={"image": images[0]}, timeout=args.request_timeout_s)
        warm.raise_for_status()
        rss_before = rss_mb(server.pid)
        start = time.perf_counter()
        records = run_clients(url, images, args)
        wall = time.perf_counter() - start
        rss_after = rss_mb(server.pid)
    finally:
        server.terminate()
        try:
            server.wait(timeout=30)
        except subprocess.TimeoutExpired:
            server.kill()
    ok = [r for r in records if r["status"] == 200]
    latencies = np.array([r["latency_s"] for r in ok]) * 1000
    name = args.name or f"{args.clients}x{args.requests}, batch {args.max_batch_size}" + (", map" if args.map else "")
    results = {
        "run": args.run_dir,
        "clients": args.clients,
        "requests_per_client": args.requests,
        "sent": len(records),
        "ok": len(ok),
        "errors": len(records) - len(ok),
        "wall_s": round(wall, 2),
        "throughput_rps": round(len(ok) / wall, 3) if wall > 0 else None,
        "latency_p50_ms": round(float(np.percentile(latencies, 50)), 1) if len(ok) else None,
        "latency_p95_ms": round(float(np.percentile(latencies, 95)), 1) if len(ok) else None,
        "mean_batch": round(float(np.mean([r["batch"] for r in ok])), 2) if ok else None,
        "max_batch_size": args.max_batch_size,
        "server_rss_before_mb": round(rss_before, 1),
        "server_rss_after_mb": round(rss_after, 1),
    }
    print(json.dumps(results, indent=1))
    kept = json.loads(args.output.read_text()) if args.output.is_file() else {}
    kept[name] = results
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps(kept, indent=1) + "\n")
    if args.results_md:
        write_section(args.results_md, kept, args.note)


SECTION = "## Serving"
COLUMNS = ("clients", "requests_per_client", "max_batch_size", "ok", "errors", "throughput_rps", "latency_p50_ms",
           "latency_p95_ms", "mean_batch", "server_rss_before_mb", "server_rss_after_mb")


def write_section(path: Path, kept: dict[str, dict], note: str) -> None:
    """Replace (or append) the Serving section of a Markdown file with a table of every kept measurement."""
    lines = [SECTION, "", "`benchmarks/load_test.py`: `hiad-pl serve` on 127.0.0.1, concurrent clients posting images.", ""]
    if note:
        lines += [note, ""]
    lines += ["| measurement | run | " + " | ".join(COLUMNS) + " |", "|:--|:--|" + "--:|" * len(COLUMNS)]
    lines += [f"| {name} | {r['run']} | " + " | ".join(str(r[c]) for c in COLUMNS) + " |" for name, r in kept.items()]
    text = path.read_text() if path.is_file() else ""
    before = text.split(SECTION)[0].rstrip("\n")
    path.write_text((before + "\n\n" if before else "") + "\n".join(lines) + "\n")


if __name__ == "__main__":
    main()

"""Serving throughput side by side: in-process encoding, Tailor over HTTP, and Infinity.

`python -m bench.serve` encodes the same inputs with the same model folder in one run:
(a) in process with Tailor's own code (Student.encode, batches of 32), (b) Tailor's /v1/embed and
/v1/embeddings over real HTTP (a uvicorn subprocess, SQLite, one API key), optionally (b') the
same from another checkout (`--baseline-repo`: before and after in one run), (c) Infinity
(`infinity-emb[server,torch]`, installed with torch==2.13.0 into its own virtualenv, by default
var/bench-infinity-venv: created on first use; Tailor does not depend on it), and (d) a trivial
endpoint that measures what the clients cost alone. Patterns: single queries from 32 concurrent
clients, 32 queries per request from 4 clients, 16 passages per request from 8 clients. Every
system runs each pattern `--repeats` times, the order rotated between repetitions, each measured
run after an unmeasured burst of the same pattern. Prints throughput (inputs/s), p50 and p99
latency, errors, the clients' CPU per request and the ratios to in-process encoding, checks
every server returns the in-process vectors, measures what a sequential request costs, and
writes JSON.

The model folder is a copy of the store's, completed as a sentence-transformers folder, so
every server cuts at the same 256 tokens. Clients run in this process (bench.loadgen: the same
light keep-alive client for every server): the numbers include their cost, as a search
application's would.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import numpy as np

from bench import loadgen
from bench.quality import DATASETS_ROOT

REPO = Path(__file__).resolve().parents[1]
INFINITY_REQUIREMENTS = ["torch==2.13.0", "infinity-emb[server,torch]==0.0.78"]


@dataclass(frozen=True)
class Pattern:
    name: str
    kind: str  # "query" or "passage"
    per_request: int
    clients: int


PATTERNS = (
    Pattern("1 query per request, 32 clients", "query", 1, 32),
    Pattern("32 queries per request, 4 clients", "query", 32, 4),
    Pattern("16 passages per request, 8 clients", "passage", 16, 8),
)


# --------------------------------------------------------------------------------------------
# Inputs and the model folder


def load_inputs(dataset: str, queries: int, passages: int) -> dict[str, list[str]]:
    """The dataset's first `queries` queries and `passages` passages ("title text")."""
    folder = DATASETS_ROOT / dataset
    with (folder / "queries.jsonl").open(encoding="utf-8") as handle:
        qs = [json.loads(line)["text"] for line in handle if line.strip()]
    ps = []
    with (folder / "corpus.jsonl").open(encoding="utf-8") as handle:
        for line in handle:
            if line.strip() and len(ps) < passages:
                doc = json.loads(line)
                ps.append(f"{doc.get('title', '')} {doc['text']}".strip())
    qs = (qs * (queries // max(len(qs), 1) + 1))[:queries]  # repeat a short query file
    return {"query": qs, "passage": ps}


def prepare_store(source: Path, work: Path, model: str) -> Path:
    """A model store in `work` holding a complete sentence-transformers copy of `model`."""
    from ml_core.export import complete_student_folder

    store = work / "store"
    target = store / model
    if not target.exists():
        store.mkdir(parents=True, exist_ok=True)
        shutil.copytree(source / model, target)
        for path in target.rglob("*"):
            path.chmod(0o755 if path.is_dir() else 0o644)
    complete_student_folder(target)
    return store


def _rows(body: dict[str, Any]) -> list[np.ndarray]:
    data = sorted(body["data"], key=lambda d: d["index"])
    return [np.asarray(d["embedding"], dtype=np.float32) for d in data]


# --------------------------------------------------------------------------------------------
# Servers


def _free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _wait(url: str, process: subprocess.Popen[bytes], timeout: float, log: Path) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise SystemExit(f"server exited ({process.returncode}); see {log}")
        try:
            if httpx.get(url, timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    raise SystemExit(f"server not ready after {timeout:.0f} s; see {log}")


def start_tailor(work: Path, store: Path, repo: Path = REPO,
                 extra_env: dict[str, str] | None = None
                 ) -> tuple[subprocess.Popen[bytes], str, str]:
    """Tailor's API (uvicorn, SQLite) from the checkout `repo` on a free port; returns
    (process, url, api key)."""
    work.mkdir(parents=True, exist_ok=True)
    db = work / "tailor.db"
    db.unlink(missing_ok=True)
    env = {**os.environ, "TAILOR_DATABASE_URL": f"sqlite:///{db}",
           "TAILOR_MODEL_STORE": str(store), "TAILOR_OBJECT_STORE_URL": f"file://{work / 'obj'}",
           "TAILOR_EMBED_CACHE_DIR": str(work / "cache"), "HF_HUB_OFFLINE": "1",
           "TOKENIZERS_PARALLELISM": "false",
           "PYTHONPATH": f"{repo}{os.pathsep}{repo / 'clients' / 'python' / 'src'}",
           # The benchmark measures serving, not the per-key limit (429s past 50/s by default)
           # or one JSON log line per request.
           "TAILOR_RATE_LIMIT_PER_SECOND": "0", "TAILOR_LOG_LEVEL": "WARNING",
           **(extra_env or {})}
    python = sys.executable
    subprocess.run([python, "-m", "app.cli", "migrate"], env=env, check=True, cwd=repo,
                   capture_output=True)
    out = subprocess.run([python, "-m", "app.cli", "create-tenant", "bench"], env=env,
                         check=True, cwd=repo, capture_output=True, text=True).stdout
    key = next(line.split()[-1] for line in out.splitlines() if line.startswith("api_key"))
    port = _free_port()
    log = work / "tailor.log"
    process = subprocess.Popen(
        [python, "-m", "uvicorn", "app.main:app", "--host", "127.0.0.1", "--port", str(port),
         "--log-level", "warning", "--no-access-log"],
        env=env, cwd=repo, stdout=log.open("wb"), stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    _wait(url + "/healthz", process, 120, log)
    return process, url, key


def start_trivial(work: Path) -> tuple[subprocess.Popen[bytes], str]:
    """bench.loadgen's trivial endpoint: what the clients cost with (almost) no server."""
    port = _free_port()
    log = work / "trivial.log"
    process = subprocess.Popen([sys.executable, "-m", "bench.loadgen", str(port)], cwd=REPO,
                               stdout=log.open("wb"), stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    _wait(url + "/", process, 30, log)
    return process, url


def ensure_infinity(venv: Path) -> Path:
    """The infinity_emb command of `venv`, creating the virtualenv when absent."""
    command = venv / "bin" / "infinity_emb"
    if not command.exists():
        print(f"installing {' '.join(INFINITY_REQUIREMENTS)} into {venv} (once)", flush=True)
        subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
        subprocess.run([str(venv / "bin" / "pip"), "install", "-q", "--disable-pip-version-check",
                        *INFINITY_REQUIREMENTS], check=True)
    return command


def start_infinity(command: Path, folder: Path, work: Path,
                   batch_size: int) -> tuple[subprocess.Popen[bytes], str]:
    port = _free_port()
    log = work / "infinity.log"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "INFINITY_ANONYMOUS_USAGE_STATS": "0",
           "DO_NOT_TRACK": "1"}
    process = subprocess.Popen(
        [str(command), "v2", "--model-id", str(folder), "--served-model-name", "bench",
         "--engine", "torch", "--device", "cpu", "--batch-size", str(batch_size),
         "--no-bettertransformer", "--dtype", "float32", "--port", str(port),
         "--log-level", "warning"],
        env=env, stdout=log.open("wb"), stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    _wait(url + "/health", process, 300, log)
    return process, url


def _stop(process: subprocess.Popen[bytes]) -> None:
    process.terminate()
    try:
        process.wait(20)
    except subprocess.TimeoutExpired:
        process.kill()


# --------------------------------------------------------------------------------------------
# Measurements


def in_process(folder: Path, inputs: dict[str, list[str]]) -> tuple[dict[str, Any], Any]:
    """Vectors and inputs/s of Student.encode (batches of 32) for each kind."""
    from ml_core.student import Student

    student = Student.load(folder)
    student.encode_queries(inputs["query"][:64])  # warm up
    result: dict[str, Any] = {}
    for kind, texts in inputs.items():
        began = time.perf_counter()
        vectors = student.encode(texts, kind, batch_size=32)
        result[kind] = {"vectors": vectors, "inputs_per_s": len(texts) / (time.perf_counter()
                                                                          - began)}
    return result, student


def request_cost(url: str, key: str, work: Path, student: Any, query: str,
                 repeats: int = 30) -> dict[str, float]:
    """Milliseconds per sequential single-query request over HTTP, one in-process encode of the
    same query, and one authentication (a session and the key lookup, as a request makes)."""
    from app.db.session import make_engine, make_session_factory, transaction
    from app.tenants.service import authenticate

    headers = {"Authorization": f"Bearer {key}"}
    body = {"model": "bench", "inputs": [query], "input_type": "query"}
    with httpx.Client(headers=headers, timeout=60) as client:
        for _ in range(5):
            client.post(url + "/v1/embed", json=body)
        began = time.perf_counter()
        for _ in range(repeats):
            client.post(url + "/v1/embed", json=body)
        http_ms = 1000 * (time.perf_counter() - began) / repeats
    began = time.perf_counter()
    for _ in range(repeats):
        student.encode_queries([query])
    encode_ms = 1000 * (time.perf_counter() - began) / repeats
    factory = make_session_factory(make_engine(f"sqlite:///{work / 'tailor.db'}"))
    began = time.perf_counter()
    for _ in range(repeats):
        with transaction(factory) as session:
            assert authenticate(session, key) is not None
    auth_ms = 1000 * (time.perf_counter() - began) / repeats
    path_ms = http_ms - encode_ms
    return {"http_single_query_ms": http_ms, "encode_single_query_ms": encode_ms,
            "request_path_ms": path_ms, "auth_ms": auth_ms,
            "auth_share_of_request_path": auth_ms / path_ms if path_ms > 0 else None}


@dataclass(frozen=True)
class System:
    """A server under test: its URL, request body, response decoder and headers."""

    url: str
    body: Any  # kind -> (chunk -> JSON body)
    headers: dict[str, str]
    check: bool = True  # compare its vectors with the in-process ones


def tailor_systems(prefix: str, url: str, key: str) -> dict[str, System]:
    auth = {"Authorization": f"Bearer {key}"}
    return {
        f"{prefix} /v1/embed": System(url + "/v1/embed", lambda kind: lambda chunk: {
            "model": "bench", "inputs": chunk, "input_type": kind}, auth),
        f"{prefix} /v1/embeddings": System(url + "/v1/embeddings", lambda kind: lambda chunk: {
            "model": f"bench:{kind}", "input": chunk, "encoding_format": "float"}, auth),
    }


def measure(args: argparse.Namespace) -> dict[str, Any]:
    work: Path = args.work.resolve()  # the servers run in their checkouts
    work.mkdir(parents=True, exist_ok=True)
    inputs = load_inputs(args.dataset, args.queries, args.passages)
    store = prepare_store(args.store, work, args.model)
    # The served name "bench" in every server: the same folder under one name.
    bench_store = work / "bench-store"
    if not (bench_store / "bench").exists():
        bench_store.mkdir(parents=True, exist_ok=True)
        (bench_store / "bench").symlink_to((store / args.model).resolve())
    folder = store / args.model
    print(f"model {args.model} ({folder}), {len(inputs['query'])} queries, "
          f"{len(inputs['passage'])} passages from {args.dataset}", flush=True)
    local, student = in_process(folder, inputs)
    processes: list[subprocess.Popen[bytes]] = []
    systems: dict[str, System] = {}
    results: dict[str, Any] = {}
    try:
        trivial, turl = start_trivial(work)
        processes.append(trivial)
        systems["client alone"] = System(turl + "/", lambda kind: lambda chunk: {
            "inputs": chunk}, {}, check=False)
        if args.baseline_repo:
            base, burl, bkey = start_tailor(work / "baseline", bench_store, args.baseline_repo)
            processes.append(base)
            systems.update(tailor_systems("baseline", burl, bkey))
        tailor, url, key = start_tailor(work, bench_store)
        processes.append(tailor)
        systems.update(tailor_systems("tailor", url, key))
        if not args.skip_infinity:
            command = ensure_infinity(args.infinity_venv)
            infinity, iurl = start_infinity(command, folder.resolve(), work, 32)
            processes.append(infinity)
            # Infinity has no query/passage prompts; MiniLM has none either, so vectors compare.
            systems["infinity"] = System(iurl + "/embeddings", lambda kind: lambda chunk: {
                "model": "bench", "input": chunk}, {})
        for system in systems.values():  # load the models, fill caches
            loadgen.run(loadgen.drive(system.url, system.body("query"), _rows,
                                      inputs["query"][:64], 1, 8, system.headers))
        results = run_rotated(systems, inputs, local, student, args.repeats)
        results["request_cost"] = request_cost(url, key, work, student, inputs["query"][0])
        if args.baseline_repo:
            results["request_cost_baseline"] = request_cost(
                burl, bkey, work / "baseline", student, inputs["query"][0])
    finally:
        for process in processes:
            _stop(process)
    return results


def run_rotated(systems: dict[str, System], inputs: dict[str, list[str]],
                local: dict[str, Any], student: Any, repeats: int) -> dict[str, Any]:
    """Each pattern `repeats` times on every system, in-process encoding included, the order
    rotated from one repetition to the next; before each measured run the system gets an
    unmeasured burst of the same pattern, so none pays another's warm-up or cool-down."""
    names = ["in-process", *systems]
    runs: dict[str, dict[str, list[Any]]] = {n: {p.name: [] for p in PATTERNS} for n in names}
    local_rates: dict[str, list[float]] = {p.name: [] for p in PATTERNS}
    step = 0
    for p in PATTERNS:
        texts = inputs[p.kind]
        warm = texts[:max(p.clients * p.per_request * 4, len(texts) // 8)]
        for _ in range(repeats):
            order = names[step % len(names):] + names[:step % len(names)]
            step += 1
            for name in order:
                if name == "in-process":
                    student.encode(warm, p.kind, batch_size=32)
                    began = time.perf_counter()
                    student.encode(texts, p.kind, batch_size=32)
                    local_rates[p.name].append(len(texts) / (time.perf_counter() - began))
                    print(f"  {name:<26} {p.name:<36} {local_rates[p.name][-1]:8.1f}/s",
                          flush=True)
                    continue
                system = systems[name]
                loadgen.run(loadgen.drive(system.url, system.body(p.kind), _rows, warm,
                                          p.per_request, p.clients, system.headers))
                run = loadgen.run(loadgen.drive(system.url, system.body(p.kind), _rows, texts,
                                                p.per_request, p.clients, system.headers))
                runs[name][p.name].append(run)
                lat = sorted(run.latencies)
                print(f"  {name:<26} {p.name:<36} {run.inputs / run.seconds:8.1f}/s "
                      f"p99 {1000 * lat[int(0.99 * (len(lat) - 1))]:7.1f} ms "
                      f"errors {run.errors} client {1000 * run.client_cpu_s / len(lat):.2f} "
                      f"ms CPU/request", flush=True)
    results: dict[str, Any] = {"order": names, "repeats": repeats, "in-process": {}}
    for p in PATTERNS:
        rates = local_rates[p.name]
        results["in-process"][p.name] = {"inputs_per_s": statistics.fmean(rates),
                                         "runs_inputs_per_s": rates, "errors": 0}
    for name, system in systems.items():
        results[name] = {
            p.name: loadgen.summary(runs[name][p.name],
                                    local[p.kind]["vectors"] if system.check else None)
            for p in PATTERNS}
    return results


def print_table(results: dict[str, Any]) -> None:
    systems = [s for s in results if isinstance(results[s], dict)
               and PATTERNS[0].name in results[s]]
    print()
    print("| pattern | " + " | ".join(systems) + " |")
    print("|---" * (len(systems) + 1) + "|")
    for p in PATTERNS:
        base = results["in-process"][p.name]["inputs_per_s"]
        cells = []
        for system in systems:
            row = results[system][p.name]
            cell = f"{row['inputs_per_s']:.0f}/s"
            if system != "in-process":
                cell += (f" ({row['inputs_per_s'] / base:.2f}x; p50 {row['p50_ms']:.0f} ms, "
                         f"p99 {row['p99_ms']:.0f} ms; {row['errors']} errors; client "
                         f"{row['client_cpu_ms_per_request']:.2f} ms CPU/req)")
            cells.append(cell)
        print(f"| {p.name} | " + " | ".join(cells) + " |")
    if "infinity" in results:
        first = PATTERNS[0].name
        for system in systems:
            if system.startswith(("tailor", "baseline")):
                ratio = (results[system][first]["inputs_per_s"]
                         / results["infinity"][first]["inputs_per_s"])
                print(f"{system} / infinity at {first}: {ratio:.2f}x")
    for label in ("request_cost", "request_cost_baseline"):
        cost = results.get(label)
        if cost:
            print(f"{label}: one request, sequential: {cost['http_single_query_ms']:.1f} ms "
                  f"over HTTP, {cost['encode_single_query_ms']:.1f} ms of it encoding; the "
                  f"request path {cost['request_path_ms']:.1f} ms, authentication "
                  f"{cost['auth_ms']:.2f} ms of it "
                  f"({100 * (cost['auth_share_of_request_path'] or 0):.0f}%)")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dataset", default="scifact-dev")
    parser.add_argument("--model", default="minilm-l6")
    parser.add_argument("--store", type=Path, default=REPO / "var" / "models")
    parser.add_argument("--queries", type=int, default=2048)
    parser.add_argument("--passages", type=int, default=512)
    parser.add_argument("--work", type=Path, default=REPO / "var" / "bench-serve")
    parser.add_argument("--infinity-venv", type=Path,
                        default=REPO / "var" / "bench-infinity-venv")
    parser.add_argument("--skip-infinity", action="store_true")
    parser.add_argument("--repeats", type=int, default=2,
                        help="measured runs of each pattern on each system (rotated order)")
    parser.add_argument("--baseline-repo", type=Path, default=None,
                        help="another checkout of Tailor served beside this one (before/after)")
    parser.add_argument("--out", type=Path, default=Path("bench/results/serve.json"))
    args = parser.parse_args(argv)
    results = measure(args)
    print_table(results)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({
        "machine": platform.platform(), "cpus": os.cpu_count(),
        "torch_threads": os.environ.get("TAILOR_TORCH_THREADS", "all"),
        "model": args.model, "dataset": args.dataset, "results": results}, indent=2))
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

"""The embedded demo: the whole customer loop on one machine, nothing to start by hand.

    python -m app.demo [--preset quick] [--keep] [--base-model minilm-l6]

Starts the API (uvicorn) and one Celery worker on the embedded default (SQLite, a local folder
object store, kombu's filesystem broker), then acts as a customer over HTTP: uploads the
Cranfield demo corpus and its judgements, starts a job, shows its progress, prints base vs tuned
nDCG@10 and calls /v1/embed with the tuned model.
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx

from ml_core.report import report_lines
from worker.celery_app import WORKER_ARGS

REPO = Path(__file__).resolve().parents[1]
DEMO_DATA = REPO / "demo" / "cranfield"
VAR = REPO / "var" / "demo"


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _environment(port: int) -> dict[str, str]:
    env = dict(os.environ)
    env.update(
        {
            "TAILOR_DATABASE_URL": f"sqlite:///{VAR / 'tailor.db'}",
            "TAILOR_BROKER_URL": "filesystem://",
            "TAILOR_BROKER_DIR": str(VAR / "broker"),
            "TAILOR_OBJECT_STORE_URL": f"file://{VAR / 'objects'}",
            "TAILOR_WORK_DIR": str(VAR / "work"),
            "TAILOR_EMBED_CACHE_DIR": str(VAR / "cache"),
            "TAILOR_API_PORT": str(port),
            "HF_HUB_OFFLINE": "1",
            "TOKENIZERS_PARALLELISM": "false",
        }
    )
    env.setdefault("TAILOR_MODEL_STORE", str(REPO / "var" / "models"))
    return env


def _start(args: list[str], env: dict[str, str], log: Path) -> subprocess.Popen[bytes]:
    handle = log.open("wb")
    return subprocess.Popen(
        args, env=env, cwd=REPO, stdout=handle, stderr=subprocess.STDOUT, start_new_session=True
    )


def _stop(process: subprocess.Popen[bytes]) -> None:
    if process.poll() is None:
        os.killpg(process.pid, signal.SIGTERM)
        try:
            process.wait(timeout=20)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)


def _wait_ready(client: httpx.Client, api: subprocess.Popen[bytes], log: Path) -> None:
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        if api.poll() is not None:
            raise SystemExit(f"the API exited; see {log}")
        try:
            if client.get("/readyz").status_code == 200:
                return
        except httpx.TransportError:
            pass
        time.sleep(0.5)
    raise SystemExit(f"the API did not become ready; see {log}")


def _check(response: httpx.Response) -> dict:
    if response.is_error:
        raise SystemExit(
            f"{response.request.method} {response.request.url} -> "
            f"{response.status_code}: {response.text}"
        )
    return response.json()


def _bar(progress: float, width: int = 30) -> str:
    filled = int(progress * width)
    return "#" * filled + "-" * (width - filled)


def run(preset: str, keep: bool, base_model: str = "minilm-l6") -> int:
    if not keep and VAR.exists():
        shutil.rmtree(VAR)
    VAR.mkdir(parents=True, exist_ok=True)
    port = _free_port()
    env = _environment(port)
    python = sys.executable

    print("1. database schema (alembic upgrade head)")
    subprocess.run([python, "-m", "app.cli", "migrate"], env=env, cwd=REPO, check=True)
    created = subprocess.run(
        [python, "-m", "app.cli", "create-tenant", "demo"],
        env=env,
        cwd=REPO,
        check=True,
        capture_output=True,
        text=True,
    ).stdout
    api_key = re.search(r"tlr_[A-Za-z0-9_\-]+", created)
    if api_key is None:
        raise SystemExit(f"could not read the API key from: {created}")
    print("2. tenant 'demo' created with a new API key")

    print(f"3. starting the API on 127.0.0.1:{port} and one worker (logs in {VAR})")
    api = _start(
        [python, "-m", "uvicorn", "app.main:app", "--host", "127.0.0.1", "--port", str(port)],
        env,
        VAR / "api.log",
    )
    worker = _start([python, "-m", "celery", *WORKER_ARGS], env, VAR / "worker.log")
    started = time.monotonic()
    try:
        headers = {"Authorization": f"Bearer {api_key.group(0)}"}
        with httpx.Client(
            base_url=f"http://127.0.0.1:{port}", headers=headers, timeout=120
        ) as client:
            _wait_ready(client, api, VAR / "api.log")
            with (DEMO_DATA / "corpus.jsonl").open("rb") as corpus_file:
                corpus = _check(
                    client.post(
                        "/v1/corpora",
                        data={"name": "cranfield"},
                        files={"file": ("corpus.jsonl", corpus_file)},
                    )
                )
            print(f"4. uploaded corpus {corpus['id']}: {corpus['documents']} documents")
            with (
                (DEMO_DATA / "queries.jsonl").open("rb") as q,
                (DEMO_DATA / "qrels" / "test.tsv").open("rb") as r,
            ):
                eval_set = _check(
                    client.post(
                        "/v1/eval-sets",
                        data={"corpus_id": corpus["id"], "name": "cranfield-test"},
                        files={"queries": ("queries.jsonl", q), "qrels": ("qrels.tsv", r)},
                    )
                )
            print(
                f"5. uploaded judgements {eval_set['id']}: {eval_set['queries']} queries "
                "(used only to report, never to train or select)"
            )
            job = _check(
                client.post(
                    "/v1/jobs",
                    json={
                        "corpus_id": corpus["id"],
                        "eval_set_id": eval_set["id"],
                        "base_model": base_model,
                        "preset": preset,
                    },
                )
            )
            print(f"6. job {job['id']} ({preset} preset: a small demo run, not the full recipe)")
            job = _follow(client, job["id"])
            if job["status"] != "succeeded":
                print(f"job ended {job['status']}: {job.get('error')}")
                print(f"worker log: {VAR / 'worker.log'}")
                return 1
            report = _check(client.get(f"/v1/jobs/{job['id']}/report"))
            _print_report(report)
            model_id = job["model_id"]
            vectors = _check(
                client.post(
                    "/v1/embed",
                    json={
                        "model": model_id,
                        "input_type": "query",
                        "inputs": ["pressure distribution on a swept wing at supersonic speed"],
                    },
                )
            )
            vector = vectors["data"][0]["embedding"]
            which = ("the tuned model" if report.get("recommended") == "tuned" else
                     f"the job's model (the report recommends the base model, {base_model})")
            print(
                f"8. /v1/embed with {which} {model_id}: {len(vector)}-d vector, "
                f"first values {[round(v, 4) for v in vector[:4]]}"
            )
            print(
                f"   download it: GET /v1/models/{model_id}/download (a sentence-transformers "
                "folder as .tar.gz)"
            )
    finally:
        _stop(worker)
        _stop(api)
    print(f"done in {time.monotonic() - started:.0f} s")
    return 0


def _follow(client: httpx.Client, job_id: str) -> dict:
    """Poll the job until it ends: a redrawn bar on a terminal, a line per change in a log."""
    tty = sys.stdout.isatty()
    stage, shown, started = None, None, time.monotonic()
    while True:
        job = _check(client.get(f"/v1/jobs/{job_id}"))
        if tty and stage is not None and job["stage"] != stage:
            print()
        stage = job["stage"]
        line = (
            f"   [{_bar(job['progress'])}] {job['progress'] * 100:5.1f}%  "
            f"{job['status']:<10} {stage or '':<9}"
        )
        if tty:
            print(f"\r{line} {time.monotonic() - started:5.0f} s", end="", flush=True)
        elif line != shown:
            print(f"{line} {time.monotonic() - started:5.0f} s", flush=True)
        shown = line
        if job["status"] in ("succeeded", "failed", "cancelled"):
            if tty:
                print()
            return job
        time.sleep(2)


def _print_report(report: dict) -> None:
    print("7. " + "\n   ".join(report_lines(report)))
    print("   in short: " + verdict(report))


def verdict(report: dict) -> str:
    """One plain sentence: base and tuned nDCG@10, the gain, its 95% interval, and what the
    interval says about it."""
    base, tuned = report["base"]["ndcg@10"], report["tuned"]["ndcg@10"]
    text = f"nDCG@10 base {base:.4f} -> tuned {tuned:.4f}, gain {tuned - base:+.4f}"
    if report.get("base_kept"):
        return text + ": training never beat the base on the dev split, so the base is kept"
    sig = report.get("significance")
    if sig:
        low, high = sig["ci95"]
        reading = ("above 0: the tuned model is better" if low > 0 else
                   "below 0: the tuned model is worse" if high < 0 else
                   "includes 0: not distinguishable from the base on these queries")
        text += f", 95% interval [{low:+.4f}, {high:+.4f}] {reading}"
    return text + f"; recommended: {report['recommended']}"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m app.demo",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--preset", default="quick")
    parser.add_argument("--keep", action="store_true", help="keep var/demo from a previous run")
    parser.add_argument("--base-model", default="minilm-l6",
                        help="the student to tune (a model of the catalogue, e.g. bge-small)")
    args = parser.parse_args(argv)
    return run(args.preset, args.keep, args.base_model)


if __name__ == "__main__":
    raise SystemExit(main())

"""A person using the console, played by headless Chromium (Playwright for Python driving the
system's Chromium; the project never downloads a browser).

`use_the_console(stack, folder)` signs in, uploads a corpus, starts a tiny job, watches it
finish on the live job page, opens the report, downloads the model, tries /embed and signs
out, saving screenshots in `folder`. The end-to-end modules call it on their running stacks
(the embedded default and the production configuration), so it adds no server start-up.
"""

from __future__ import annotations

import json
import shutil
import tarfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import httpx
import pytest

from tests.service_stack import ServiceStack, synthetic_corpus
from tests.tiny_models import TINY_HYPERPARAMETERS

# Known to work in containers without a display, a GPU or a user namespace sandbox, and to keep
# the browser from calling home (component updates, sync, QUIC probes).
CHROMIUM_ARGS = [
    "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
    "--disable-background-networking", "--disable-component-update", "--disable-sync",
]
JOB_TIMEOUT_MS = 240_000
# The first embedding in a fresh API process imports torch and loads the model (measured 27 s
# on a loaded 2-core machine).
FIRST_EMBED_TIMEOUT_MS = 180_000


def chromium_path() -> str | None:
    """The system's Chromium (Debian's `chromium` package), if installed."""
    for name in ("chromium", "chromium-browser", "google-chrome"):
        found = shutil.which(name)
        if found:
            return found
    return None


@contextmanager
def chromium() -> Iterator[Any]:
    """A headless Chromium browser, or a skip naming what is missing."""
    path = chromium_path()
    if path is None:
        pytest.skip("no Chromium on this machine (make test installs Debian's chromium where "
                    "apt-get can)")
    sync_api = pytest.importorskip("playwright.sync_api", reason="playwright is not installed")
    with sync_api.sync_playwright() as playwright:
        # Playwright gives every launch a fresh temporary profile (its --user-data-dir).
        browser = playwright.chromium.launch(executable_path=path, args=CHROMIUM_ARGS)
        try:
            yield browser
        finally:
            browser.close()


def _same_origin(url: str, origins: set[str]) -> bool:
    parsed = urlparse(url)
    return f"{parsed.scheme}://{parsed.netloc}" in origins or parsed.scheme in ("data", "about")


def use_the_console(stack: ServiceStack, folder: Path) -> dict[str, Any]:
    """Drive the console end to end as a customer; returns what it saw (job id, model id)."""
    corpus = synthetic_corpus(folder / "corpus.jsonl", seed=23)
    origins = {stack.api_url}
    if stack.settings().s3_endpoint_url:  # a presigned model download goes to S3 itself
        origins.add(stack.settings().s3_endpoint_url.rstrip("/"))
    requests: list[str] = []
    complaints: list[str] = []
    with chromium() as browser:
        context = browser.new_context(viewport={"width": 1280, "height": 900},
                                      accept_downloads=True)
        page = context.new_page()
        page.set_default_timeout(30_000)
        page.on("request", lambda r: requests.append(r.url))
        page.on("console", lambda m: complaints.append(m.text) if m.type == "error" else None)

        # Sign in: a wrong key is refused, the right one opens the page first asked for.
        page.goto(stack.api_url + "/console/corpora")
        assert "/console/sign-in" in page.url
        page.fill("#api_key", "tlr_not-a-real-key-000000000000")
        page.click("button:has-text('Sign in')")
        assert "not valid" in page.inner_text(".alert")
        page.fill("#api_key", stack.api_key)
        page.click("button:has-text('Sign in')")
        assert page.url.endswith("/console/corpora"), page.url
        cookie = next(c for c in context.cookies() if c["name"] == "tailor_console")
        assert cookie["httpOnly"] and cookie["sameSite"] == "Strict"
        assert stack.api_key not in json.dumps(context.cookies())

        # Upload a corpus.
        page.set_input_files("#file", str(corpus))
        page.fill("#name", "browser corpus")
        page.click("button:has-text('Upload corpus')")
        row = page.locator("tr.added")
        assert "browser corpus" in row.inner_text() and "60" in row.inner_text()

        # Start a quick job on it (tiny models) from the corpus row.
        row.locator("text=Start a job").click()
        page.select_option("#base_model", "tiny-student")
        page.click("summary:has-text('Advanced')")
        page.select_option("#teacher", "tiny-teacher")
        page.select_option("#generator", "tiny-generator")
        for query_type in ("questions", "keywords"):
            page.check(f"input[name=query_types][value={query_type}]")
        page.fill("#passages", "30")
        page.fill("#hyperparameters", json.dumps(TINY_HYPERPARAMETERS))
        page.click("button:has-text('Start job')")
        assert "/console/jobs/job_" in page.url, page.inner_text("main")
        job_id = page.url.rstrip("/").rsplit("/", 1)[1]
        assert page.inner_text("[data-live] .badge") in ("queued", "running")

        # Watch it finish without reloading: the live fragment updates the page.
        page.wait_for_selector(".badge.succeeded", timeout=JOB_TIMEOUT_MS)
        page.wait_for_selector("a:has-text('Open the report')")
        assert "evaluate" in page.inner_text(".events")
        download_href = page.get_attribute("a:has-text('Download the model')", "href") or ""
        model_id = download_href.split("/")[-2]
        assert model_id.startswith("mdl_"), download_href
        page.screenshot(path=str(folder / "console-job.png"), full_page=True)

        # The report, inside the console.
        page.click("a:has-text('Open the report')")
        verdict = page.inner_text(".verdict .headline")
        assert verdict in ("Use the tuned model", "Keep the base model")
        assert page.locator("svg.chart").count() >= 4
        assert "Per query type" in page.inner_text("main")
        page.screenshot(path=str(folder / "report.png"), full_page=True)

        # Models: download the archive through the console.
        page.click("nav >> text=Models")
        assert model_id in page.inner_text("main")
        with page.expect_download() as download:
            page.click(f"a[href='/console/models/{model_id}/download']")
        archive = folder / "model.tar.gz"
        download.value.save_as(archive)
        with tarfile.open(archive) as tar:
            assert {f"{model_id}/modules.json", f"{model_id}/report.html"} <= set(tar.getnames())

        # Try the tuned model on a query and two passages.
        page.click("nav >> text=Try embeddings")
        page.select_option("#model", model_id)
        page.fill("#query", "pressure on a swept wing")
        page.fill("#passages", "the pressure distribution on a thin wing.\nshock waves.")
        page.click("button:has-text('Embed')", timeout=FIRST_EMBED_TIMEOUT_MS)
        result = page.inner_text("#embed-result")
        assert "-dimensional query vector" in result and "thin wing" in result

        # Sign out: the session is gone server-side, not just in this browser.
        page.click("button:has-text('Sign out')")
        assert "/console/sign-in" in page.url
        page.goto(stack.api_url + "/console/jobs")
        assert "/console/sign-in" in page.url
        stale = httpx.get(stack.api_url + "/console/jobs",
                          cookies={"tailor_console": cookie["value"]})
        assert stale.status_code == 303 and "/console/sign-in" in stale.headers["location"]
        context.close()

        # The API's report page in the same browser: its hash-pinned stylesheet applies.
        api_context = browser.new_context(
            extra_http_headers={"Authorization": f"Bearer {stack.api_key}"}
        )
        report_page = api_context.new_page()
        report_page.on("console", lambda m: complaints.append(m.text))
        report_page.on("request", lambda r: requests.append(r.url))
        response = report_page.goto(f"{stack.api_url}/v1/jobs/{job_id}/report.html")
        assert response is not None and response.status == 200
        background = report_page.eval_on_selector(
            ".verdict", "e => getComputedStyle(e).backgroundColor"
        )
        assert background not in ("rgba(0, 0, 0, 0)", "transparent"), background
        api_context.close()

    # Nothing came from anywhere else, and no policy had to block anything.
    assert all(_same_origin(url, origins) for url in requests), sorted(set(requests))
    assert not [c for c in complaints if "Content Security Policy" in c or "Refused" in c], \
        complaints
    for shot in ("console-job.png", "report.png"):
        assert (folder / shot).stat().st_size > 10_000, shot
    with stack.client() as client:
        assert client.get(f"/v1/models/{model_id}").json()["job_id"] == job_id
    return {"job_id": job_id, "model_id": model_id}

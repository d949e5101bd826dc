"""The search page (`GET /`) driven in headless Chromium against the served toy model: a typed
query with a picked task instruction shows the library's top-k as a grid of images and texts,
rerank shows both scores, a dropped image searches by image; screenshots go to the test's tmp dir.

Needs Debian's `chromium` (apt-get install -y chromium) and Playwright from PyPI (the dev extra);
Playwright drives the system browser through `executable_path`, no `playwright install`.
"""

from __future__ import annotations

import base64
import json
import os
import shutil
from pathlib import Path

import pytest
from serve_fixtures import build_pool, serve_app, small_args

pytestmark = [pytest.mark.ray, pytest.mark.slow]
import requests  # noqa: E402  (dev extra)
from playwright import sync_api  # noqa: E402  (dev extra; drives the system Chromium, no download)

CHROMIUM = os.environ.get("UMARVEL_CHROMIUM") or shutil.which("chromium") or shutil.which("chromium-browser")
if CHROMIUM is None:
    if os.environ.get("CI"):  # .ci/run installs it: a missing browser there is a failure, not a skip
        raise RuntimeError("the search page test needs Debian's chromium (.ci/run installs it)")
    pytest.skip("needs a system Chromium: apt-get install -y chromium (or set UMARVEL_CHROMIUM)",
                allow_module_level=True)  # fmt: skip

INSTRUCTION = "Retrieve an image that matches the given caption."  # one of the page's options
K = 8  # the page's default k
PREFIX = "/umarvel"


@pytest.fixture(scope="module")
def setup(tmp_path_factory, tiny_model_dir, toy_mbeir_dir):
    return build_pool(tmp_path_factory.mktemp("page_pool"), tiny_model_dir, toy_mbeir_dir)


@pytest.fixture(scope="module")
def base(ray_cluster, setup, tiny_model_dir):
    # Under a route prefix, as behind a shared gateway: the page, its API calls and its images
    # must all stay under it (opened without the trailing slash, the harder case for relative URLs).
    with serve_app(small_args(tiny_model_dir, setup), name="umarvel_page", route_prefix=PREFIX) as url:
        yield url


@pytest.fixture(scope="module")
def browser():
    with sync_api.sync_playwright() as p:
        b = p.chromium.launch(
            executable_path=CHROMIUM,
            headless=True,
            # root in containers needs --no-sandbox; no proxy and no background fetches: loopback only
            args=["--no-sandbox", "--no-proxy-server", "--disable-background-networking", "--no-first-run"],
        )
        try:
            yield b
        finally:
            b.close()


@pytest.fixture
def page(browser, base):
    """A page that may only talk to the app: any other request (an external asset, a CDN) is
    aborted and recorded, and so are console errors and uncaught exceptions."""
    ctx = browser.new_context(viewport={"width": 1200, "height": 900})
    pg = ctx.new_page()
    pg.outside, pg.errors = [], []

    def guard(route):
        if route.request.url == base or route.request.url.startswith(base + "/"):
            route.continue_()
        else:
            pg.outside.append(route.request.url)
            route.abort()

    pg.route("**/*", guard)
    pg.on("console", lambda m: m.type == "error" and pg.errors.append(m.text))
    pg.on("pageerror", lambda e: pg.errors.append(str(e)))
    pg.goto(base)
    yield pg
    ctx.close()


def _library_top_k(setup, item, k=K):
    """What the served model should answer: the library's embedder + the saved index."""
    from umarvel_ray.index import load_index

    qv = setup["embedder"].encode_queries([item])
    scores, ids = load_index(setup["index_dir"] / "pool").search(qv, k)
    return list(ids[0]), [float(s) for s in scores[0]]


def _cards(pg):
    return pg.eval_on_selector_all(
        "#results .card",
        """cards => cards.map(c => ({
            id: c.dataset.id,
            text: (c.querySelector('.text') || {}).textContent || null,
            score: c.querySelector('.score').textContent,
            img: c.querySelector('img') ? c.querySelector('img').complete && c.querySelector('img').naturalWidth : null,
            src: c.querySelector('img') ? c.querySelector('img').getAttribute('src') : null,
        }))""",
    )


def _search(pg):
    pg.click("#go")
    pg.wait_for_function("document.querySelectorAll('#results .card').length > 0 || document.getElementById('status').textContent")
    pg.wait_for_function(
        "[...document.querySelectorAll('#results .card img')].every(i => i.complete)", timeout=10_000
    )
    assert pg.text_content("#status") == "", pg.text_content("#status")
    return _cards(pg)


def test_typed_query_shows_its_known_results(page, setup, tmp_path):
    from umarvel_ray.data.model_items import apply_text_rule

    row = next(r for r in setup["rows"] if r.get("txt") and r.get("img_path"))
    text = row["txt"]
    want_ids, want_scores = _library_top_k(
        setup, {"text": apply_text_rule(text, "uniir"), "image": None, "instruction": INSTRUCTION}
    )
    page.type("#text", text)
    page.select_option("#instruction", INSTRUCTION)
    cards = _search(page)
    page.screenshot(path=str(tmp_path / "search_page.png"), full_page=True)
    print("screenshot:", tmp_path / "search_page.png")

    assert [c["id"] for c in cards] == want_ids
    for c, s in zip(cards, want_scores, strict=True):
        assert c["score"] == f"cos {s:.4f}"
        rec = next(r for r in setup["rows"] if r["did"] == c["id"])
        if rec.get("img_path"):
            assert c["img"] and c["img"] > 0, f"{c['id']}: image did not load"
            assert c["src"] == f"{PREFIX}/v1/records/{c['id']}/image"
        if rec.get("txt"):
            assert c["text"] == rec["txt"]
    assert page.text_content("#timings").startswith("timings (ms): ")
    assert not page.outside and not page.errors, (page.outside, page.errors)


def test_rerank_toggle_shows_both_scores(page, base, setup, tmp_path):
    text = "A purple triangle on the left."
    page.fill("#text", text)
    page.select_option("#instruction", INSTRUCTION)
    page.check("#rerank")
    cards = _search(page)
    page.screenshot(path=str(tmp_path / "search_page_rerank.png"), full_page=True)
    print("screenshot:", tmp_path / "search_page_rerank.png")

    api = requests.post(f"{base}/v1/search", json={"query": {"text": text, "instruction": INSTRUCTION}, "k": K,
                                                  "rerank": True}, timeout=60).json()["results"]  # fmt: skip
    assert [c["id"] for c in cards] == [r["id"] for r in api]
    for c, r in zip(cards, api, strict=True):
        assert c["score"] == (
            f"cos {r['retrieval_score']:.4f}  P(yes) {r['rerank_score']:.4f}  fused {r['score']:.4f}"
        )
    assert not page.outside and not page.errors, (page.outside, page.errors)


def test_dropped_image_searches_by_image(page, setup, tmp_path):
    from umarvel_ray.data.images import load_image

    row = next(r for r in setup["rows"] if r.get("img_path"))
    manifest = json.loads((setup["embeddings_dir"] / "manifest.json").read_text())
    data_root = Path(manifest["settings"]["data_root"])
    b64 = base64.b64encode((data_root / row["img_path"]).read_bytes()).decode()
    page.evaluate(
        """b64 => {
            const bytes = Uint8Array.from(atob(b64), ch => ch.charCodeAt(0));
            const dt = new DataTransfer();
            dt.items.add(new File([bytes], 'query.png', {type: 'image/png'}));
            const drop = document.getElementById('drop');
            drop.dispatchEvent(new DragEvent('dragover', {dataTransfer: dt, bubbles: true, cancelable: true}));
            drop.dispatchEvent(new DragEvent('drop', {dataTransfer: dt, bubbles: true, cancelable: true}));
        }""",
        b64,
    )
    page.wait_for_function("document.getElementById('preview').naturalWidth > 0")
    emb = setup["embedder"]
    px = (emb.cfg.inputs.min_pixels, emb.cfg.inputs.max_pixels)
    image = load_image(data_root, row["img_path"], min_pixels=px[0], max_pixels=px[1])
    want_ids, _ = _library_top_k(setup, {"text": None, "image": image, "instruction": None})
    cards = _search(page)
    page.screenshot(path=str(tmp_path / "search_page_image.png"), full_page=True)
    print("screenshot:", tmp_path / "search_page_image.png")
    assert [c["id"] for c in cards] == want_ids
    assert not page.outside and not page.errors, (page.outside, page.errors)

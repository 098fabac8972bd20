"""The documentation: the README stays short and true to the code, the site covers the public API, and (with
``make test-browser``) the built site opens in Chromium.

The site test builds it with ``mkdocs build --strict`` into a temporary folder, serves it from 127.0.0.1 and
opens the home page and an API page in headless Chromium; screenshots go to tests/artifacts/docs_*.png.
"""

from __future__ import annotations

import functools
import http.server
import re
import subprocess
import sys
import threading

import pytest
import yaml
from support import REPOSITORY
from test_browser import SCREENSHOTS, page, unavailable  # noqa: F401  (page: the headless Chromium fixture)

import lightning_optloss
from lightning_optloss import adaptive_clipping_fn, agc_clipping_fn, autoclip_fn
from lightning_optloss.mlflow import run_info

README = REPOSITORY / "README.md"
DOCS = REPOSITORY / "docs"
README_MAX_LINES = 250


def nav_pages() -> set[str]:
    """The pages mkdocs.yml's nav lists (its commented lines are pages not written yet)."""
    config = yaml.safe_load((REPOSITORY / "mkdocs.yml").read_text())
    pages: set[str] = set()

    def walk(entry: object) -> None:
        if isinstance(entry, str):
            pages.add(entry)
        elif isinstance(entry, dict):
            for value in entry.values():
                walk(value)
        elif isinstance(entry, list):
            for value in entry:
                walk(value)

    walk(config["nav"])
    return pages


def test_the_readme_is_short_and_opens_with_the_two_commands() -> None:
    text = README.read_text()
    assert len(text.splitlines()) <= README_MAX_LINES
    first_block = text.split("```")[1]
    assert "make demo" in first_block and "make test" in first_block
    for target in re.findall(r"\]\(((?:docs|recipes)/[^)#]+)", text):
        assert (REPOSITORY / target).is_file(), f"README links to {target}, which does not exist"


def test_every_docs_page_is_in_the_site_navigation() -> None:
    pages = {str(path.relative_to(DOCS)) for path in DOCS.rglob("*.md")}
    missing = sorted(pages - nav_pages())
    assert not missing, f"docs pages not in mkdocs.yml's nav (uncomment or add their lines): {missing}"
    assert not nav_pages() - pages


def test_every_public_name_has_a_place_in_the_api_reference() -> None:
    api = "".join(path.read_text() for path in (DOCS / "api").glob("*.md"))
    rendered = set(re.findall(r"^::: ([\w.]+)", api, flags=re.MULTILINE))
    for name in set(lightning_optloss.__all__) - {"__version__"}:
        value = getattr(lightning_optloss, name)
        module = getattr(value, "__module__", None) or getattr(value, "__name__", None)
        if f"lightning_optloss.{name}" in rendered or (callable(value) and module in rendered):
            continue
        if isinstance(value, type(lightning_optloss)):  # a module: rendered under its own name
            assert value.__name__ in rendered, f"{name}: no `::: {value.__name__}` in docs/api"
            continue
        assert f"`{name}`" in api, f"{name}: neither rendered nor named in docs/api"


def test_the_documented_clip_modes_are_those_the_run_records() -> None:
    modes = {
        run_info.clip_mode(clip)
        for clip in (None, 1.0, {"head.*": 1.0}, adaptive_clipping_fn(), agc_clipping_fn(), autoclip_fn())
    }
    for path in (README, DOCS / "mlflow.md"):
        statement = path.read_text().split("`optimize_loss.clip_mode`", 1)[1].split("\n", 1)[0]
        documented = set(re.findall(r"`(\w+)`", statement)) - {"adaptive_clipping_fn"}
        assert documented == modes, f"{path.name} documents clip_mode values {documented}; run_info gives {modes}"


@pytest.fixture(scope="module")
def site(tmp_path_factory: pytest.TempPathFactory) -> str:
    """The site built with --strict into a temporary folder, served on 127.0.0.1; yields its URL."""
    try:
        import mkdocs  # noqa: F401
    except ImportError:
        unavailable("MkDocs is not installed (make docs and make test-browser install the docs extra)")
    folder = tmp_path_factory.mktemp("site")
    build = [sys.executable, "-m", "mkdocs", "build", "--strict", "--config-file", str(REPOSITORY / "mkdocs.yml")]
    subprocess.run([*build, "--site-dir", str(folder)], check=True, capture_output=True, timeout=600)
    handler = functools.partial(QuietHandler, directory=str(folder))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()


class QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, format: str, *args: object) -> None:
        pass


def screenshot(browser_page, name: str) -> None:
    browser_page.screenshot(path=str(SCREENSHOTS / f"docs_{name}.png"), full_page=False)


@pytest.mark.slow
@pytest.mark.browser
def test_the_site_home_page_shows_the_commands_and_the_guides(page, site) -> None:  # noqa: F811
    from playwright.sync_api import expect

    page.goto(f"{site}/")
    expect(page).to_have_title(re.compile("lightning_optloss"))
    expect(page.get_by_role("heading", name="Two commands")).to_be_visible()
    expect(page.locator("code").filter(has_text="make demo").first).to_be_visible()
    for guide in ("Migrating from TF", "Strategies and precision", "Beyond TF"):
        expect(page.get_by_role("link", name=guide).first).to_be_visible()
    screenshot(page, "home")
    page.get_by_role("link", name="Migrating from TF").first.click()
    expect(page.get_by_role("heading", name="Known differences from TF")).to_be_visible()


@pytest.mark.slow
@pytest.mark.browser
def test_an_api_page_shows_the_docstrings_signatures_and_examples(page, site) -> None:  # noqa: F811
    from playwright.sync_api import expect

    page.goto(f"{site}/api/gradients/")
    expect(page.get_by_role("heading", name="autoclip_fn", exact=False).first).to_be_visible()
    # The docstring's prose, its Args table and its doctest, as mkdocstrings renders them.
    expect(page.get_by_text("AutoClip: a clip callable").first).to_be_visible()
    expect(page.locator("code").filter(has_text="autoclip_fn(percentile=50, history=10)").first).to_be_attached()
    expect(page.get_by_text("arxiv.org/abs/2007.14469").first).to_be_attached()
    page.get_by_role("heading", name="autoclip_fn", exact=False).first.scroll_into_view_if_needed()
    screenshot(page, "api_gradients")
    page.goto(f"{site}/api/optimize-loss/")
    expect(page.get_by_role("heading", name="OptimizeLoss").first).to_be_visible()
    expect(page.get_by_text("on_nonfinite").first).to_be_attached()
    screenshot(page, "api_optimize_loss")

"""The example store in a real browser: the README's `mlflow ui` command and headless Chromium (Playwright).

A person's path through the MLflow UI: the home page, the experiment's runs, one run's params, its Model metrics
charts, and a PNG in its Artifacts view. The store is a copy in a temporary folder, served by the exact
command of the README from the folder above it, so the test also shows that a clone elsewhere works.
Screenshots go to tests/artifacts/mlflow_ui_*.png (git-ignored). ``make test-browser`` installs Chromium and
runs this module; elsewhere it is skipped when Chromium or Playwright is missing (set
``LIGHTNING_OPTLOSS_BROWSER=required`` to make that a failure).
"""

from __future__ import annotations

import os
import shlex
import shutil
import sys
from pathlib import Path

import pytest
from support import REPOSITORY

from lightning_optloss.demos import example

pytestmark = [pytest.mark.slow, pytest.mark.browser]

SCREENSHOTS = REPOSITORY / "tests" / "artifacts"
RUN = "clip-1.0"
# The machine's closed network refuses Chromium's background connections: every one of them is switched off.
CHROMIUM_FLAGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
TIMEOUT_MS = 120_000  # two shared CPU cores: the first render of the UI takes a while
VIEWPORT = {"width": 1600, "height": 1000}
# A short window for the image grid: its full-screen card then holds the pictures and the slider without a
# blank half (the screenshot of docs/images/mlflow-image-grid.png).
SHORT_VIEWPORT = {"width": 1600, "height": 560}


def unavailable(reason: str) -> None:
    if os.environ.get("LIGHTNING_OPTLOSS_BROWSER") == "required":
        pytest.fail(reason)
    pytest.skip(reason)


def chromium_path() -> str:
    found = os.environ.get("CHROMIUM") or shutil.which("chromium") or shutil.which("chromium-browser")
    if not found or not Path(found).exists():
        unavailable("Chromium is not installed (make test-browser installs Debian's chromium)")
    return str(found)


# Another store made by `python -m lightning_optloss.example --output FOLDER` instead of the committed one.
STORE = Path(os.environ.get("LIGHTNING_OPTLOSS_EXAMPLE_STORE", REPOSITORY / "mlruns_example"))


@pytest.fixture(scope="module")
def mlflow_ui(tmp_path_factory):
    """The README's `mlflow ui` command on a copy of mlruns_example, started from the folder above the copy."""
    clone = tmp_path_factory.mktemp("clone")
    shutil.copytree(STORE, clone / "mlruns_example")
    port = example.free_port()
    words = shlex.split(example.ui_command("mlruns_example", port))
    assert words[:2] == ["mlflow", "ui"]
    command = [sys.executable, "-m", *words, "--host", "127.0.0.1"]
    with example.serve(command, port, cwd=clone, log=clone / "mlflow-ui.log") as url:
        yield url


@pytest.fixture(scope="module")
def page(tmp_path_factory):
    executable = chromium_path()
    try:
        from playwright.sync_api import expect, sync_playwright
    except ImportError:
        unavailable("Playwright for Python is not installed (it is in the dev extra)")
    SCREENSHOTS.mkdir(parents=True, exist_ok=True)
    with sync_playwright() as playwright:
        context = playwright.chromium.launch_persistent_context(
            str(tmp_path_factory.mktemp("chromium-profile")),  # a fresh --user-data-dir
            executable_path=executable,
            headless=True,
            args=CHROMIUM_FLAGS,
            viewport=VIEWPORT,
        )
        context.set_default_timeout(TIMEOUT_MS)
        expect.set_options(timeout=TIMEOUT_MS)
        try:
            yield context.new_page()
        finally:
            context.close()


def screenshot(target, name: str) -> Path:
    """A screenshot of ``target`` (the page, or one element of it: a Playwright ``Locator``)."""
    path = SCREENSHOTS / f"mlflow_ui_{name}.png"
    target.screenshot(path=str(path))
    return path


def open_experiment(page, url: str) -> None:
    """Home page → "Model training" → the example experiment's runs, as a person clicks."""
    from playwright.sync_api import expect

    page.goto(url)
    page.get_by_role("link", name=example.EXPERIMENT).first.wait_for()
    page.get_by_text("Model training", exact=True).first.click()
    page.get_by_role("link", name=example.EXPERIMENT).first.click()
    for run_name in example.RUN_NAMES:
        expect(page.get_by_role("link", name=run_name, exact=True)).to_be_visible()
    close_the_assistant(page)


def close_the_assistant(page) -> None:
    """The assistant panel (it opens a moment after the page, on the right) takes a third of the window; a person
    closes it with its X."""
    close = page.get_by_role("button", name="Close", exact=True)
    for _ in range(20):  # at most ten seconds
        buttons = [button for button in close.all() if button.is_visible()]
        on_the_right = [b for b in buttons if (b.bounding_box() or {"x": 0})["x"] > 0.75 * page.viewport_size["width"]]
        if on_the_right:
            on_the_right[0].click()
            return
        page.wait_for_timeout(500)


def open_run(page, url: str) -> None:
    from playwright.sync_api import expect

    open_experiment(page, url)
    page.get_by_role("link", name=RUN, exact=True).click()
    expect(page.get_by_role("heading", name=RUN)).to_be_visible()


def test_the_experiment_page_lists_the_four_runs(page, mlflow_ui):
    from playwright.sync_api import expect

    open_experiment(page, mlflow_ui)
    expect(page.get_by_text("4 matching runs")).to_be_visible()
    screenshot(page, "experiment_runs")


def test_a_run_shows_the_optimize_loss_params_tags_and_metric_charts(page, mlflow_ui):
    from playwright.sync_api import expect

    open_run(page, mlflow_ui)
    expect(page.get_by_text("optimize_loss.strategy", exact=True)).to_be_visible()
    parameters = page.get_by_placeholder("Search parameters")
    parameters.fill("optimize_loss.")
    parameters.evaluate("box => box.scrollIntoView({block: 'start'})")
    for name, value in (("optimize_loss.clip_mode", "global_norm"), ("optimize_loss.optimizer", "TFAdam")):
        row = page.get_by_role("row").filter(has=page.get_by_text(name, exact=True))
        expect(row.first).to_be_visible()
        expect(row.first).to_contain_text(value)
    screenshot(page, "run_overview_params")
    page.get_by_role("tab", name="Model metrics").click()
    for section in ("OptimizeLoss", "OptimizeLoss/global_norm"):
        expect(page.get_by_text(section, exact=False).first).to_be_visible()
    for chart in ("loss", "learning_rate"):
        expect(page.get_by_text(chart, exact=True).first).to_be_visible()
    expect(page.get_by_text(f"{RUN} (OptimizeLoss/loss)").first).to_be_visible()  # a chart's legend
    page.wait_for_timeout(1500)  # let the charts finish drawing before the picture
    screenshot(page, "run_model_metrics")
    # The per-step pictures fill the first section, so the norm charts are below the fold (and not drawn
    # until scrolled to): a person searches for them.
    page.get_by_role("searchbox", name="Search metric charts").fill("global_norm/")
    for chart in ("gradient_norm", "clipped_gradient_norm"):
        expect(page.get_by_text(chart, exact=True).first).to_be_visible()


def test_the_artifact_view_shows_a_plot_as_an_image(page, mlflow_ui):
    from playwright.sync_api import expect

    open_run(page, mlflow_ui)
    page.get_by_role("tab", name="Artifacts").click()
    page.get_by_text("optimize_loss", exact=True).first.click()
    page.get_by_text("plots", exact=True).first.click()
    page.get_by_text("training_curves.png", exact=True).first.click()
    image = page.locator("img[src^='blob:']").first
    expect(image).to_be_visible()
    page.wait_for_function("img => img.complete && img.naturalWidth > 0", arg=image.element_handle())
    assert image.evaluate("img => [img.naturalWidth, img.naturalHeight]") == [900, 850]  # the PNG itself
    expect(page.get_by_text("optimize_loss/plots/training_curves.png").first).to_be_visible()
    screenshot(page, "artifact_training_curves")
    page.get_by_text("gradient_histograms.png", exact=True).first.click()
    expect(page.get_by_text("optimize_loss/plots/gradient_histograms.png").first).to_be_visible()
    page.wait_for_timeout(1500)
    screenshot(page, "artifact_gradient_histograms")


def test_the_experiments_chart_view_compares_the_runs_metrics(page, mlflow_ui):
    from playwright.sync_api import expect

    open_experiment(page, mlflow_ui)
    page.locator("label:has(input[value='CHART'])").click()
    search = page.get_by_placeholder("Search metric charts")
    search.fill("global_norm/")
    for run_name in example.RUN_NAMES:  # the legend of the global-norm chart: one line per run
        legend = f"{run_name} (OptimizeLoss/global_norm/gradient_norm)"
        expect(page.get_by_text(legend, exact=True).first).to_be_visible()
    expect(
        page.get_by_text("adaptive-clipping (OptimizeLoss/global_norm/adaptive_max_gradient_norm)").first
    ).to_be_visible()
    page.wait_for_timeout(1500)
    screenshot(page, "experiment_charts")


def chart_view(page, url: str, search: str) -> None:
    """The experiment's chart view in the model-training workflow, the charts filtered by ``search``."""
    page.goto(f"{url}/#/experiments/1/runs?workflowType=machine_learning&compareRunsMode=CHART")
    close_the_assistant(page)
    page.get_by_placeholder("Search metric charts").fill(search)


def test_the_experiment_is_tagged_for_and_shown_in_the_model_training_view(page, mlflow_ui):
    from playwright.sync_api import expect

    experiment = page.request.get(f"{mlflow_ui}/ajax-api/2.0/mlflow/experiments/get?experiment_id=1").json()
    tags = {tag["key"]: tag["value"] for tag in experiment["experiment"]["tags"]}
    assert tags["mlflow.experimentKind"] == "custom_model_development"
    page.goto(f"{mlflow_ui}/#/experiments/1/runs?workflowType=machine_learning")
    for run_name in example.RUN_NAMES:
        expect(page.get_by_role("link", name=run_name, exact=True).first).to_be_visible()
    expect(page.get_by_text("Evaluation runs", exact=True)).to_have_count(0)  # GenAI's side navigation
    screenshot(page, "model_training_view")


# What makes a picture of the grid seen, checked in the page itself: the frame loaded, is drawn at a useful size,
# and nothing covers or clips it at its centre (the topmost element there is the <img>).
PICTURE_SEEN = """image => {
    const box = image.getBoundingClientRect();
    const top = document.elementFromPoint(box.x + box.width / 2, box.y + box.height / 2);
    return image.complete && image.naturalWidth > 0 && box.height >= 100 && top === image;
}"""


def open_the_image_card(page, url: str, key: str):
    """The image-grid card of ``key``, as a person makes it readable, opened full screen; returns the dialog.

    MLflow 3.17.2's image cards list each run's params as ``key=value, ...`` under the run name, on by default
    (the card's Configure → Run details → "Show run parameters"). A run of the example has 24 params, so the
    list fills the card and the picture sits below its visible part. A person switches the list off, then
    opens the card full screen: the four runs' pictures side by side, over a slider the width of the window.
    """
    from playwright.sync_api import expect

    chart_view(page, url, key)
    heading = page.get_by_role("heading", name=key, exact=True)
    card = page.get_by_test_id("experiment-view-compare-runs-card").filter(has=heading)
    card.get_by_test_id("experiment-view-compare-runs-card-menu").click()
    page.get_by_role("menuitem", name="Configure").click()
    switch = page.get_by_role("switch", name="Show run parameters")
    expect(switch).to_be_checked()  # MLflow's default
    switch.click()
    page.get_by_role("button", name="Save changes").click()
    expect(switch).to_have_count(0)
    card.locator("[data-component-id='fullscreen_button_chartcard']").click()
    dialog = page.get_by_role("dialog").get_by_role("document")  # the modal's panel, without the dimmed page
    expect(dialog.get_by_role("heading", name=key, exact=True)).to_be_visible()
    return dialog


@pytest.fixture
def short_window(page):
    page.set_viewport_size(SHORT_VIEWPORT)
    yield page
    page.set_viewport_size(VIEWPORT)


def test_the_image_grid_shows_the_pictures_and_follows_its_step_slider(short_window, mlflow_ui):
    """The ``gradient_histograms`` card: each run's picture in sight; the slider moves to the last step, the
    pictures change."""
    from playwright.sync_api import expect

    page = short_window
    dialog = open_the_image_card(page, mlflow_ui, "OptimizeLoss/gradient_histograms")
    slider = dialog.get_by_role("slider")
    assert slider.get_attribute("aria-valuenow") == "0"
    last = int(slider.get_attribute("aria-valuemax"))
    assert last > 0
    pictures = dialog.locator("img[src*='gradient_histograms']")
    expect(pictures).to_have_count(len(example.RUN_NAMES))
    for run_name in example.RUN_NAMES:
        expect(dialog.get_by_text(run_name)).to_be_visible()  # beside its colour, "#be501e no-clipping"
    expect(dialog.get_by_text("optimize_loss.name=")).to_have_count(0)
    for picture in pictures.all():
        page.wait_for_function(PICTURE_SEEN, arg=picture.element_handle())
    before = sorted(pictures.evaluate_all("images => images.map(image => image.src)"))
    assert all("step%2B0%2B" in src for src in before), before
    screenshot(dialog, "image_grid_step_0")
    thumb = slider.bounding_box()  # a person drags the thumb past the right end of its track
    page.mouse.move(thumb["x"] + thumb["width"] / 2, thumb["y"] + thumb["height"] / 2)
    page.mouse.down()
    page.mouse.move(page.viewport_size["width"] - 1, thumb["y"] + thumb["height"] / 2, steps=10)
    page.mouse.up()
    expect(slider).to_have_attribute("aria-valuenow", str(last))
    page.wait_for_function(
        "() => [...document.querySelectorAll(\"[role=dialog] img[src*='gradient_histograms']\")]"
        ".every(image => !image.src.includes('step%2B0%2B'))"
    )
    after = sorted(pictures.evaluate_all("images => images.map(image => image.src)"))
    # Each run shows its frame nearest the slider's step (a run that stopped early keeps its last one).
    assert any(f"step%2B{last}%2B" in src for src in after), after
    for picture in pictures.all():
        page.wait_for_function(PICTURE_SEEN, arg=picture.element_handle())
    screenshot(dialog, "image_grid_last_step")

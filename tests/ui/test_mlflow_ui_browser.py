"""The review a user does, in a real browser: search -> promote -> `make ui`, then look.

Headless Debian Chromium driven by Selenium opens the MLflow UI that ``mlflow/ui.sh`` serves over the store a
real search wrote, and checks what an ML engineer looks at: the experiment's runs table lists the trials (and
opens as a classic runs table, not the GenAI traces view), the study's front image loads and decodes, and the
model registry page shows the promoted version with its alias. Screenshots are kept as test artifacts
(``PRECISION_SEARCH_TEST_ARTIFACTS``, default ``<tmp>/screenshots``).

``.ci/run`` installs ``chromium`` and ``chromium-driver`` (Debian); elsewhere the test is skipped with the
command that installs them.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
import yaml

from pipeline.tracking.schema import review_url
from tests.servers import free_port, stop, wait_healthy

ROOT = Path(__file__).resolve().parents[2]
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
CHROMEDRIVER = shutil.which("chromedriver")

# localStorage keys MLflow 3.17's UI reads (useLocalStorage: `<key>_v<version>`, JSON values).
ASSISTANT_CLOSED = ("localStorage.setItem('mlflow.assistant.fab.autoOpenedOnFirstLoad_v1', 'true');"
                    "localStorage.setItem('mlflow.assistant.panelOpen_v1', 'false');")

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(not (CHROMIUM and CHROMEDRIVER),
                       reason="no Chromium/ChromeDriver: apt-get install -y chromium chromium-driver (.ci/run does)"),
]


def _cli(*args: str, cwd: Path, env: dict) -> str:
    done = subprocess.run([sys.executable, "-m", "pipeline.cli", *args], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=900)
    assert done.returncode == 0, f"{args[0]} failed:\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}"
    return done.stdout


@pytest.fixture(scope="module")
def reviewed(tmp_path_factory):
    """A finished tiny search with a promoted model, and the UI serving its store."""
    tmp = tmp_path_factory.mktemp("ui")
    work = tmp / "work"
    cfg = yaml.safe_load((ROOT / "search_spaces" / "digits_mlp.yaml").read_text())
    cfg["workdir"] = str(work)
    cfg["search"].update(formats=["fp32", "int8", "int4"], int8_activations=["dynamic"], calibrations=["minmax"],
                         int4_block_sizes=[32], trials=5, max_accuracy_drop=0.02)
    cfg["tracking"] = {"registry_name": "digits-ui", "alias": "champion"}
    cfg_file = tmp / "digits_ui.yaml"
    cfg_file.write_text(yaml.safe_dump(cfg, sort_keys=False))
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    for var in ("MLFLOW_TRACKING_URI", "PRECISION_SEARCH_STORAGE", "RAY_ADDRESS"):
        env.pop(var, None)
    summary = json.loads(_cli("search", "--config", str(cfg_file), "--study", "ui", "--json", "--no-progress",
                              cwd=tmp, env=env))
    promoted = json.loads(_cli("promote", "--config", str(cfg_file), "--study", "ui", "--policy", "knee", "--json",
                               cwd=tmp, env=env))

    port = free_port()
    ui_env = dict(env, MLFLOW_PORT=str(port), PRECISION_SEARCH_WORKDIR=str(work),
                  MLFLOW_BIN=str(Path(sys.executable).with_name("mlflow")))
    log = (tmp / "ui.log").open("w")
    proc = subprocess.Popen(["bash", str(ROOT / "mlflow" / "ui.sh")], env=ui_env, stdout=log,
                            stderr=subprocess.STDOUT, start_new_session=True)
    base = f"http://127.0.0.1:{port}"
    try:
        wait_healthy(proc, base, tmp / "ui.log", timeout=120)
        yield {"base": base, "summary": summary, "promoted": promoted, "tmp": tmp}
    finally:
        stop(proc, log)


@pytest.fixture(scope="module")
def browser(reviewed):
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    opts = webdriver.ChromeOptions()
    opts.binary_location = CHROMIUM
    for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--window-size=1600,1000",
                "--disable-gpu"):
        opts.add_argument(arg)
    driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=opts)
    driver.set_page_load_timeout(60)
    driver.get(reviewed["base"])
    # MLflow 3.17 opens its Assistant side panel once per browser on a local server, over the runs table. The
    # UI's own record that it did so (and that the panel is closed) keeps it shut, as after a user closed it.
    driver.execute_script(ASSISTANT_CLOSED)
    yield driver
    driver.quit()


def _shots(reviewed) -> Path:
    out = Path(os.environ.get("PRECISION_SEARCH_TEST_ARTIFACTS", reviewed["tmp"] / "screenshots"))
    out.mkdir(parents=True, exist_ok=True)
    return out


def _wait_for_text(driver, needles: list[str], timeout: float = 60) -> str:
    deadline = time.monotonic() + timeout
    text = ""
    while time.monotonic() < deadline:
        text = driver.find_element("tag name", "body").text
        if all(n in text for n in needles):
            return text
        time.sleep(0.5)
    raise AssertionError(f"page never showed {needles}; it shows:\n{text[:2000]}")


def _experiment_id(base: str, name: str) -> str:
    url = f"{base}/api/2.0/mlflow/experiments/get-by-name?experiment_name={urllib.request.quote(name)}"
    with urllib.request.urlopen(url, timeout=30) as r:
        return json.loads(r.read())["experiment"]["experiment_id"]


def test_runs_table_lists_the_trials(reviewed, browser):
    base, summary = reviewed["base"], reviewed["summary"]
    exp_id = _experiment_id(base, summary["experiment"])
    # The link the product prints (MLflow 3.17 picks GenAI or model-training views from this query parameter,
    # then from the browser's last choice; older 3.x from the experiment's mlflow.experimentKind tag, also set).
    browser.get(review_url(base, exp_id))
    # The baselines' child runs are named uniform-<format>-<number>; the study's parent run by the study.
    text = _wait_for_text(browser, ["uniform-fp32", "uniform-int8"])
    browser.save_screenshot(str(_shots(reviewed) / "runs_table.png"))
    # The runs table itself (not the GenAI overview), flat: one row per trial of the study.
    assert "Run Name" in text, text[:2000]
    assert f"{summary['trials_complete'] + summary['trials_failed']} matching runs" in text, text[-1500:]


def test_front_image_loads_and_decodes(reviewed, browser):
    base, summary = reviewed["base"], reviewed["summary"]
    browser.get(base)
    size = browser.execute_async_script(
        """
        const [url, done] = arguments;
        fetch(url).then(r => r.ok ? r.blob() : Promise.reject(r.status))
          .then(b => createImageBitmap(b)).then(img => done([img.width, img.height]))
          .catch(e => done(String(e)));
        """,
        f"{base}/get-artifact?path=pareto/front.png&run_uuid={summary['parent_run_id']}",
    )
    assert isinstance(size, list) and size[0] > 100 and size[1] > 100, f"front.png did not decode: {size}"
    browser.get(f"{base}/#/experiments/{_experiment_id(base, summary['experiment'])}/runs/{summary['parent_run_id']}")
    _wait_for_text(browser, [summary["study"]])
    browser.save_screenshot(str(_shots(reviewed) / "parent_run.png"))


def test_registry_page_shows_the_promoted_version_and_alias(reviewed, browser):
    base, promoted = reviewed["base"], reviewed["promoted"]
    browser.get(f"{base}/#/models/digits-ui")
    text = _wait_for_text(browser, ["digits-ui", "champion"])
    assert f"Version {promoted['version']}" in text or f"v{promoted['version']}" in text, text[:2000]
    browser.save_screenshot(str(_shots(reviewed) / "registry.png"))


def _run(base: str, run_id: str) -> dict:
    with urllib.request.urlopen(f"{base}/api/2.0/mlflow/runs/get?run_id={run_id}", timeout=30) as r:
        return json.loads(r.read())["run"]


def test_compare_view_shows_two_front_runs_side_by_side(reviewed, browser):
    """MLflow's "Compare" page (what selecting runs and pressing Compare opens) lists both runs' plans and metrics."""
    base, summary = reviewed["base"], reviewed["summary"]
    exp_id = _experiment_id(base, summary["experiment"])
    rows = [r for r in summary["front"] if r.get("run_id")]
    assert len(rows) >= 2, f"the tiny search's front has {len(rows)} run(s): nothing to compare"
    runs = [_run(base, r["run_id"]) for r in rows[:2]]
    names = [r["info"]["run_name"] for r in runs]
    params = [{p["key"]: p["value"] for p in r["data"]["params"]} for r in runs]
    assert all("plan_brief" in p and "plan" in p for p in params), params
    # MLflow 3.17's route (ExperimentRoutes.getCompareRunPageRoute): JSON lists of run ids and experiment ids.
    ids = json.dumps([r["info"]["run_id"] for r in runs], separators=(",", ":"))
    browser.get(f"{base}/#/compare-runs?runs={ids}&experiments={json.dumps([exp_id])}&workflowType=machine_learning")
    text = _wait_for_text(browser, [*names, "plan_brief", "accuracy"])
    # the side-by-side tables, not the parallel-coordinates plot above them
    browser.set_window_size(1600, 1400)
    details = browser.find_element("xpath", "//*[normalize-space(text())='Run details']")
    browser.execute_script("arguments[0].scrollIntoView({block: 'start'});", details)
    time.sleep(0.5)
    browser.save_screenshot(str(_shots(reviewed) / "compare.png"))
    browser.set_window_size(1600, 1000)
    # both plans side by side (the brief, the short form the front table shows too)
    assert all(p["plan_brief"] in text for p in params), text[:3000]
    # and a metric value of each run, as MLflow shows it (rounded)
    for r in runs:
        acc = next(m["value"] for m in r["data"]["metrics"] if m["key"] == "accuracy")
        assert any(f"{acc:.{d}f}".rstrip("0").rstrip(".") in text for d in (3, 4, 5, 6)), (acc, text[:3000])

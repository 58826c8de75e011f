"""The interactive page in a real browser: headless Chromium (Debian's ``chromium`` and
``chromium-driver``) driven by Selenium. ``.ci/system.sh`` installs them; without them these
tests skip, saying what is missing.

A head is clicked and the matrix cells change to that head's weights; a token is hovered and the
keys light up with its row; rollout, flow and the other groups show their numbers; tokens that
look like markup or handlers stay text, no script of theirs runs, nothing is fetched, and the
console stays free of errors.
"""

import json
import re
import shutil

import pytest

pytest.importorskip("selenium", reason="selenium is not installed (bash .ci/system.sh installs it)")
from selenium import webdriver  # noqa: E402
from selenium.common.exceptions import NoAlertPresentException  # noqa: E402
from selenium.webdriver.chrome.options import Options  # noqa: E402
from selenium.webdriver.chrome.service import Service  # noqa: E402
from selenium.webdriver.common.action_chains import ActionChains  # noqa: E402
from selenium.webdriver.common.by import By  # noqa: E402
from selenium.webdriver.support.ui import Select, WebDriverWait  # noqa: E402

from attnkit.viz.view import attention_page  # noqa: E402

from .test_view import transformer_groups  # noqa: E402

CHROMIUM = next((p for p in map(shutil.which, ("chromium", "chromium-browser", "google-chrome")) if p), None)
CHROMEDRIVER = shutil.which("chromedriver")
pytestmark = [
    pytest.mark.skipif(CHROMIUM is None, reason="no chromium binary on PATH (bash .ci/system.sh installs Debian's "
                                                "chromium)"),
    pytest.mark.skipif(CHROMEDRIVER is None, reason="no chromedriver on PATH (bash .ci/system.sh installs Debian's "
                                                    "chromium-driver)"),
]

TITLE = "attention of <i>x</i> & \"y\""
SRC = ["<script>document.title='pwned'</script>", "\"onmouseover=\"document.title='pwned'", "<b>bold</b>",
       "<img src=x onerror=\"document.title='pwned'\">", "</script><script>document.title='pwned'</script>", "</s>"]
TGT = ["<s>", "x", "y", "</s>"]


@pytest.fixture(scope="module")
def page(tmp_path_factory):
    path = tmp_path_factory.mktemp("page") / "attention.html"
    text = attention_page(transformer_groups(SRC, TGT), path, title=TITLE, info=[("input", " ".join(SRC))], flow=True)
    data = json.loads(re.search(r'id="attnkit-data">(.*?)</script>', text, re.S).group(1))
    return path, data


@pytest.fixture(scope="module")
def driver(page):
    opts = Options()
    for a in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--window-size=1400,1000"):
        opts.add_argument(a)
    opts.binary_location = CHROMIUM
    opts.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    d = webdriver.Chrome(service=Service(CHROMEDRIVER), options=opts)
    d.get(page[0].as_uri())
    WebDriverWait(d, 10).until(lambda dr: dr.find_element(By.TAG_NAME, "body").get_attribute("data-ready") == "1")
    yield d
    d.quit()


def cells(d):
    return [float(td.get_attribute("data-v")) for td in d.find_elements(By.CSS_SELECTOR, "#matrix td")]


def flat(m):
    return [x for row in m for x in row]


def mean_heads(w):
    H = len(w)
    return [[sum(w[h][i][j] for h in range(H)) / H for j in range(len(w[0][0]))] for i in range(len(w[0]))]


def close(a, b, tol=1.1e-4):
    return len(a) == len(b) and all(abs(x - y) <= tol for x, y in zip(a, b))


def click(d, css):
    d.find_element(By.CSS_SELECTOR, css).click()


def errors(d):
    return [e for e in d.get_log("browser") if e["level"] in ("SEVERE", "ERROR")]


def no_alert(d):
    try:
        d.switch_to.alert
    except NoAlertPresentException:
        return True
    return False


def test_user_text_renders_as_text_and_no_script_of_its_runs(driver):
    d = driver
    assert d.title == TITLE and no_alert(d)
    tokens = [e.get_attribute("textContent") for e in d.find_elements(By.CSS_SELECTOR, "#qcol .tok")]
    assert tokens == SRC  # the encoder's queries, character for character
    assert [e.get_attribute("textContent") for e in d.find_elements(By.CSS_SELECTOR, "#matrix th.col")] == SRC
    assert d.find_element(By.CSS_SELECTOR, "dl.info dd:nth-of-type(1)").get_attribute("textContent") == " ".join(SRC)
    assert d.find_elements(By.TAG_NAME, "img") == [] and d.find_elements(By.TAG_NAME, "b") == []
    assert len(d.find_elements(By.TAG_NAME, "script")) == 2
    ActionChains(d).move_to_element(d.find_elements(By.CSS_SELECTOR, "#qcol .tok")[1]).perform()  # "onmouseover=
    assert d.title == TITLE and no_alert(d)
    assert d.execute_script("return performance.getEntriesByType('resource').length") == 0  # nothing fetched
    assert errors(d) == []


def test_clicking_a_head_changes_the_highlighted_cells(driver, page):
    d, data = driver, page[1]
    enc = data["groups"][0]
    before = cells(d)
    assert close(before, flat(mean_heads(enc["layers"][0]["w"])))  # layer 0, mean of the heads
    click(d, '#heads button[data-head="1"]')
    after = cells(d)
    assert after != before and close(after, flat(enc["layers"][0]["w"][1]))
    assert d.find_element(By.CSS_SELECTOR, '#heads button[data-head="1"]').get_attribute("aria-pressed") == "true"
    assert d.find_element(By.CSS_SELECTOR, '#heads button[data-head="mean"]').get_attribute("aria-pressed") == "false"
    click(d, '#heads button[data-head="0"]')
    assert close(cells(d), flat(enc["layers"][0]["w"][0]))
    click(d, '#layers button[data-layer="1"]')
    assert close(cells(d), flat(enc["layers"][1]["w"][0]))
    click(d, '#heads button[data-head="mean"]')
    click(d, '#layers button[data-layer="0"]')
    assert close(cells(d), before)
    assert errors(d) == []


def test_hovering_a_token_shows_where_it_attends(driver, page):
    d, data = driver, page[1]
    M = mean_heads(data["groups"][0]["layers"][0]["w"])
    q = d.find_elements(By.CSS_SELECTOR, "#qcol .tok")[2]
    ActionChains(d).move_to_element(q).perform()
    keys = d.find_elements(By.CSS_SELECTOR, "#kcol .tok")
    assert close([float(k.get_attribute("data-w")) for k in keys], M[2])
    assert "hover" in q.get_attribute("class").split()
    assert "hl" in d.find_element(By.CSS_SELECTOR, '#matrix tr[data-i="2"]').get_attribute("class").split()
    mx = max(M[2])
    assert len(d.find_elements(By.CSS_SELECTOR, "#lines line")) == sum(w / mx >= 0.02 for w in M[2])
    ActionChains(d).move_to_element(d.find_element(By.TAG_NAME, "h1")).perform()  # leave: the highlight goes
    assert all(k.get_attribute("data-w") is None for k in d.find_elements(By.CSS_SELECTOR, "#kcol .tok"))
    assert errors(d) == []


def test_rollout_flow_other_groups_and_the_model_view(driver, page):
    d, data = driver, page[1]
    enc, cross = data["groups"][0], data["groups"][2]
    click(d, '#modes button[data-mode="rollout"]')
    assert close(cells(d), flat(enc["derived"]["rollout"]["layers"][0]))
    click(d, '#layers button[data-layer="1"]')
    assert close(cells(d), flat(enc["derived"]["rollout"]["layers"][1]))
    assert "Rollout" in d.find_element(By.ID, "note").text
    click(d, '#modes button[data-mode="flow"]')
    assert close(cells(d), flat(enc["derived"]["flow"]["layers"][0]))
    Select(d.find_element(By.ID, "group")).select_by_index(2)  # cross-attention
    assert [e.get_attribute("textContent") for e in d.find_elements(By.CSS_SELECTOR, "#kcol .tok")] == SRC
    assert [e.get_attribute("textContent") for e in d.find_elements(By.CSS_SELECTOR, "#qcol .tok")] == TGT
    assert d.find_element(By.CSS_SELECTOR, '#modes button[data-mode="flow"]').get_attribute("disabled") == "true"
    click(d, '#modes button[data-mode="rollout"]')
    assert close(cells(d), flat(cross["derived"]["rollout"]["layers"][0]))
    click(d, '#model canvas[data-layer="1"][data-head="1"]')  # a thumbnail of the model view
    assert close(cells(d), flat(cross["layers"][1]["w"][1]))
    assert d.find_element(By.CSS_SELECTOR, '#layers button[data-layer="1"]').get_attribute("aria-pressed") == "true"
    assert d.find_element(By.CSS_SELECTOR, '#heads button[data-head="1"]').get_attribute("aria-pressed") == "true"
    thumb = d.find_element(By.CSS_SELECTOR, '#model canvas[data-layer="1"][data-head="1"]')
    assert "on" in thumb.get_attribute("class").split()
    assert d.title == TITLE and no_alert(d) and errors(d) == []

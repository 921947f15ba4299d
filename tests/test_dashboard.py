"""The dashboard in a real browser: headless Chromium (Debian's ``chromium`` and
``chromium-driver``, driven by Selenium; nothing downloaded) against ``llmprune serve`` on a
loopback port with a real worker. A failing test leaves a screenshot in ``test-screenshots/``
(or ``$LLMPRUNE_SCREENSHOTS``)."""

from __future__ import annotations

import json
import os
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from test_service import TOKEN, Server, start, stop

CHROMIUM, DRIVER = "/usr/bin/chromium", "/usr/bin/chromedriver"
WAIT_S = 120
SLOW_RECIPE = """\
model: llama
prune: {{method: sparsegpt, sparsity: 0.5}}
calibration: {{source: {text}, samples: 4, seqlen: 32}}
evaluation: {{source: {text}, seqlen: 64, windows: 60}}
"""

pytestmark = pytest.mark.slow  # a browser and a server: CI runs them, the quick loop may skip them


@pytest.fixture(scope="module")
def dashboard(tmp_path_factory, llama_dir, text_file) -> Iterator[Server]:
    live = start(tmp_path_factory.mktemp("dashboard") / "work", llama_dir.parent, text_file.parent,
                 "--cancel-grace", "5")
    yield live
    stop(live)


@pytest.fixture
def browser(request, tmp_path) -> Iterator[Any]:
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    for path in (CHROMIUM, DRIVER):
        assert Path(path).is_file(), f"{path} is missing: apt-get install chromium chromium-driver"
    os.environ["SE_OFFLINE"] = "true"  # Selenium Manager must not look for a browser online
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for argument in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--window-size=1400,1000",
                     "--disable-gpu"):
        options.add_argument(argument)
    downloads = tmp_path / "downloads"
    downloads.mkdir()
    options.add_experimental_option("prefs", {"download.default_directory": str(downloads),
                                              "download.prompt_for_download": False})
    driver = webdriver.Chrome(service=Service(DRIVER), options=options)
    driver.downloads = downloads
    try:
        yield driver
    finally:
        report = getattr(request.node, "report_call", None)
        if report is not None and report.failed:
            folder = Path(os.environ.get("LLMPRUNE_SCREENSHOTS", Path(__file__).parent.parent / "test-screenshots"))
            folder.mkdir(parents=True, exist_ok=True)
            driver.save_screenshot(str(folder / f"{request.node.name}.png"))
            (folder / f"{request.node.name}.html").write_text(driver.page_source)
        driver.quit()


def until(condition: Callable[[], Any], what: str, timeout: float = WAIT_S) -> Any:
    from selenium.common.exceptions import (
        NoSuchElementException,
        StaleElementReferenceException,
        WebDriverException,
    )

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            value = condition()
        except StaleElementReferenceException:  # the live update replaced the element just read: look again
            value = None
        except NoSuchElementException:  # the page is reloading (a finished job's page reloads itself)
            value = None
        except WebDriverException as error:  # Chromium's wording of the same race, when the node went mid-read
            if "does not belong to the document" not in str(error):
                raise
            value = None
        if value:
            return value
        time.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what}")


def sign_in(browser, server: Server, token: str = TOKEN) -> None:
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys

    browser.get(server.url + "/")
    assert "/signin" in browser.current_url  # every page sends a stranger to sign in first
    browser.find_element(By.ID, "token").send_keys(token + Keys.ENTER)  # the keyboard alone signs in


def fill(browser, **fields: str) -> None:
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import Select

    for name, value in fields.items():
        element = browser.find_element(By.ID, name)
        if element.tag_name == "select":
            Select(element).select_by_visible_text(value)
        else:
            element.clear()
            element.send_keys(value)


def row(browser, job_id: str) -> dict[str, Any] | None:
    """The job's row as the page shows it now: status and progress bar (None: no row)."""
    return browser.execute_script(
        "const r = document.querySelector(`tr[data-job-id='${arguments[0]}']`);"
        "if (!r) return null; const p = r.querySelector('progress');"
        "return {status: r.dataset.status, value: p.value, max: p.max,"
        "        stage: r.querySelector('.stage').textContent};", job_id)


def job_id_of(browser) -> str:
    return str(browser.current_url.rstrip("/").rsplit("/", 1)[1])


def test_a_wrong_token_is_refused(browser, dashboard):
    from selenium.webdriver.common.by import By

    sign_in(browser, dashboard, token="not-" + TOKEN)
    error = until(lambda: browser.find_elements(By.ID, "signin-error"), "the sign-in error")[0]
    assert error.text == "wrong token"
    assert browser.get_cookies() == []
    browser.get(dashboard.url + "/submit")
    assert "/signin" in browser.current_url


def test_sign_in_submit_watch_download_and_cancel(browser, dashboard, text_file):
    from selenium.webdriver.common.by import By

    sign_in(browser, dashboard)
    until(lambda: browser.current_url == dashboard.url + "/", "the jobs page after signing in")
    (cookie,) = browser.get_cookies()
    assert cookie["httpOnly"] and cookie["sameSite"] == "Strict" and cookie["value"] != TOKEN
    assert TOKEN not in browser.page_source and TOKEN not in browser.current_url
    assert browser.execute_script("return localStorage.length + sessionStorage.length") == 0

    # A slow job from the YAML box: it holds the only worker while the second one waits.
    browser.find_element(By.LINK_TEXT, "Submit").click()
    assert browser.execute_script(  # every control has its label
        "return [...document.querySelectorAll('input:not([type=hidden]), select, textarea')]"
        ".every(e => e.labels.length > 0)")
    fill(browser, recipe=SLOW_RECIPE.format(text=text_file.name))
    browser.find_element(By.ID, "submit").click()
    until(lambda: "/jobs/" in browser.current_url, "the slow job's page")
    slow = job_id_of(browser)

    # A form the recipe checks refuse: the message stands next to the field it names; no job.
    browser.get(dashboard.url + "/submit")
    fill(browser, model="llama", method="sparsegpt", sparsity="1.5", calibration=text_file.name, samples="4",
         seqlen="32", evaluation=text_file.name, windows="2")
    browser.find_element(By.ID, "submit").click()
    error = until(lambda: browser.find_elements(By.ID, "error-sparsity"), "the error next to the field")[0]
    assert "sparsity must be in [0, 1)" in error.text
    assert browser.find_element(By.ID, "sparsity").get_attribute("value") == "1.5"  # what was typed stays

    # The tiny job, through the form.
    fill(browser, sparsity="0.5")
    browser.find_element(By.ID, "submit").click()
    until(lambda: "/jobs/" in browser.current_url, "the tiny job's page")
    tiny_job = job_id_of(browser)
    assert tiny_job != slow

    browser.find_element(By.LINK_TEXT, "Jobs").click()
    browser.execute_script("window.stillThisPage = true")  # a reload would drop it
    until(lambda: (row(browser, slow) or {}).get("status") == "running", "the slow job running")
    assert row(browser, tiny_job)["status"] == "queued"
    assert len(browser.find_elements(By.CSS_SELECTOR, "tr[data-job-id]")) == 2

    # Cancel the slow job from its page; the tiny one then gets the worker.
    browser.get(f"{dashboard.url}/jobs/{slow}")
    browser.find_element(By.ID, "cancel").click()
    until(lambda: browser.find_element(By.ID, "job-status").text == "cancelled", "the cancelled status", 60)

    browser.find_element(By.LINK_TEXT, "Jobs").click()
    browser.execute_script("window.stillThisPage = true")
    seen: list[dict[str, Any]] = []

    def finished() -> bool:
        now = row(browser, tiny_job)
        if now is not None and (not seen or now != seen[-1]):
            seen.append(now)
        return now is not None and now["status"] in ("succeeded", "failed", "cancelled")

    until(finished, "the tiny job to finish")
    assert seen[-1]["status"] == "succeeded", seen
    assert browser.execute_script("return window.stillThisPage === true")  # updated live, not reloaded
    statuses = [s["status"] for s in seen]
    assert statuses.index("running") < statuses.index("succeeded")
    running = [(s["stage"], s["value"]) for s in seen if s["status"] == "running"]
    assert len(set(running)) >= 2, seen  # the bar moved while it ran
    assert row(browser, slow)["status"] == "cancelled"

    # The job page: result, chart, card, files; llmprune.json downloads.
    browser.get(f"{dashboard.url}/jobs/{tiny_job}")
    assert "→" in until(lambda: "".join(e.text for e in browser.find_elements(By.ID, "ppl")), "the result")
    assert browser.find_elements(By.CSS_SELECTOR, "#layer-chart svg circle")
    assert "sparsegpt" in browser.find_element(By.ID, "card").text
    assert "INFO" in browser.find_element(By.ID, "log").text
    browser.find_element(By.CSS_SELECTOR, "#files a[data-name='llmprune.json']").click()
    saved = browser.downloads / "llmprune.json"
    until(lambda: saved.is_file() and not list(browser.downloads.glob("*.crdownload")), "the download")
    with httpx.Client(base_url=dashboard.url, headers={"Authorization": f"Bearer {TOKEN}"}) as api:
        served = api.get(f"/v1/jobs/{tiny_job}/artifacts/llmprune.json")
        assert served.status_code == 200 and saved.read_bytes() == served.content
        assert json.loads(saved.read_text())["sparsity_achieved"] == pytest.approx(0.5, abs=0.01)

        # Compare: the finished job is a point of the sweep plot.
        browser.find_element(By.LINK_TEXT, "Compare").click()
        until(lambda: browser.find_elements(By.CSS_SELECTOR, "#compare svg circle"), "the sweep plot's point")

        # Sign out: the page's cookie no longer opens anything.
        cookie = browser.get_cookie("llmprune_session")["value"]
        browser.find_element(By.ID, "signout").click()
        until(lambda: "/signin" in browser.current_url, "the sign-in page after signing out")
        assert httpx.get(f"{dashboard.url}/v1/jobs", cookies={"llmprune_session": cookie}).status_code == 401


def test_a_signed_in_session_still_needs_its_csrf_token(dashboard):
    """What a cross-site form or script could send with the browser's cookie is refused."""
    with httpx.Client(base_url=dashboard.url, follow_redirects=False) as web:
        signed = web.post("/signin", data={"token": TOKEN, "next": "//evil.example/"})
        assert signed.status_code == 303 and signed.headers["location"] == "/"  # never off-site
        page = web.get("/submit").text
        csrf = page.split('name="csrf" value="', 1)[1].split('"', 1)[0]
        before = len(web.get("/v1/jobs").json()["jobs"])
        form = {"model": "llama", "method": "sparsegpt", "pattern": "unstructured", "sparsity": "0.5",
                "calibration": "wikipedia", "samples": "4", "seqlen": "32", "evaluation": "none", "windows": "1"}
        assert web.post("/submit", data=form).status_code == 403  # no token in the form
        assert web.post("/submit", data={**form, "csrf": csrf[::-1]}).status_code == 403
        assert web.post("/submit", data={**form, "csrf": csrf},
                        headers={"Origin": "http://evil.example"}).status_code == 403
        assert web.post("/v1/jobs", json={"model": "llama"}).status_code == 403  # the API: X-CSRF-Token
        assert len(web.get("/v1/jobs").json()["jobs"]) == before
        made = web.post("/submit", data={**form, "csrf": csrf})
        assert made.status_code == 303
        # Without JavaScript the list is all there, rows marked for scripts.
        job_id = made.headers["location"].rsplit("/", 1)[1]
        assert f'<tr data-job-id="{job_id}" data-status="' in web.get("/").text



def test_behind_a_local_tls_proxy_the_cookie_is_secure_and_clients_are_told_apart(dashboard):
    """A reverse proxy on this machine (trusted by default) that terminates TLS says so in
    X-Forwarded-Proto and names the client in X-Forwarded-For."""
    proxied = {"X-Forwarded-Proto": "https", "X-Forwarded-For": "192.0.2.10"}
    https = "https://" + dashboard.url.split("://", 1)[1]
    with httpx.Client(base_url=dashboard.url, follow_redirects=False, timeout=30) as web:
        signed = web.post("/signin", data={"token": TOKEN}, headers=proxied)
        cookie = signed.headers["set-cookie"]
        assert signed.status_code == 303 and "secure" in [part.strip().lower() for part in cookie.split(";")]
        session = {"Cookie": cookie.split(";", 1)[0], **proxied}  # sent by hand: the jar keeps Secure for https
        page = web.get("/submit", headers=session).text
        csrf = page.split('name="csrf" value="', 1)[1].split('"', 1)[0]
        # The browser's Origin is the proxy's https one: this site; plain http is another.
        for origin, status in ((dashboard.url, 403), (https, 303)):
            answer = web.post("/signout", data={"csrf": csrf}, headers={**session, "Origin": origin})
            assert answer.status_code == status, origin
        # Wrong tokens are counted per forwarded client: one guesser does not lock out the rest.
        guesser = {"X-Forwarded-For": "192.0.2.99"}
        answers = [web.post("/signin", data={"token": "guess"}, headers=guesser).status_code for _ in range(21)]
        assert answers == [401] * 20 + [429]
        assert web.post("/signin", data={"token": TOKEN}, headers=proxied).status_code == 303
        assert web.get("/v1/jobs", headers={"Authorization": f"Bearer {TOKEN}"}).status_code == 200


def signed_in_client(server: Server) -> tuple[httpx.Client, str]:
    """A cookie session as a browser holds one, and the CSRF token of its pages."""
    web = httpx.Client(base_url=server.url, follow_redirects=False, timeout=30)
    assert web.post("/signin", data={"token": TOKEN}).status_code == 303
    page = web.get("/submit").text
    return web, page.split('name="csrf" value="', 1)[1].split('"', 1)[0]


def test_refused_forms_are_pages_with_the_reason_and_create_nothing(dashboard):
    web, csrf = signed_in_client(dashboard)
    try:
        before = len(web.get("/v1/jobs").json()["jobs"])
        bomb = "a: &a [x, x, x, x, x, x, x, x, x]\nb: &b [*a, *a, *a, *a, *a, *a, *a, *a]\nmodel: *b\n"
        cases = {"aliases (*name) are not accepted": {"recipe": bomb},
                 "nests too deeply": {"recipe": "[" * 5000 + "]" * 5000},
                 "is not a model folder": {"recipe": "model: \"a\\0b\"\nprune: {method: wanda}\n"}}
        for expected, form in cases.items():
            answer = web.post("/submit", data={**form, "csrf": csrf})
            assert answer.status_code == 422, (expected, answer.text[:300])
            assert 'id="error-recipe"' in answer.text and expected in answer.text, expected
        gone = web.post("/submit", data={"recipe": "model: llama", "csrf": "stale"})
        assert gone.status_code == 403 and "text/html" in gone.headers["content-type"]
        assert "CSRF token is missing or stale" in gone.text
        assert len(web.get("/v1/jobs").json()["jobs"]) == before
    finally:
        web.close()
    # A session that ended: a page saying so, not JSON.
    ended = httpx.post(f"{dashboard.url}/submit", data={"csrf": csrf, "recipe": "model: llama"})
    assert ended.status_code == 401 and "sign in again" in ended.text


def test_a_structured_job_has_a_page_too(dashboard, llama_dir, text_file):
    """Structured records hold no sparsity; their page still renders (with parameters)."""
    from test_service import wait

    client = dashboard.client()
    job = client.submit({"model": str(llama_dir), "prune": {"pattern": "heads", "sparsity": 0.25},
                         "calibration": {"source": str(text_file), "samples": 4, "seqlen": 32},
                         "evaluation": {"source": str(text_file), "seqlen": 32, "windows": 2}})
    assert wait(client, job["id"])["status"] == "succeeded"
    web, _ = signed_in_client(dashboard)
    try:
        page = web.get(f"/jobs/{job['id']}")
        assert page.status_code == 200 and "structured" in page.text and "parameters" in page.text
        assert web.get("/compare").status_code == 200
    finally:
        web.close()

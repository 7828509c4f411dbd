"""The playground at `/`, end to end in real headless Chromium (Playwright for Python, Debian's chromium).

Skipped when the playwright package or /usr/bin/chromium (or $DANLU_CHROMIUM) is absent. Pages only talk to
the loopback server that serves them (the page's CSP allows `connect-src 'self'` and nothing else).
"""
import os
import shutil

import pytest
import torch

pytest.importorskip("fastapi")
sync_api = pytest.importorskip("playwright.sync_api")
httpx = pytest.importorskip("httpx")

from danlu.serve.app import ServeOptions, create_app
from danlu.serve.predictor import Predictor
from danlu.serve.server import ServerThread
from danlu.testing import DECISIVE, classifier_run, decisive_reviews, language_model_run

CHROMIUM = os.environ.get("DANLU_CHROMIUM") or shutil.which("chromium") or "/usr/bin/chromium"
if not os.path.exists(CHROMIUM):
    pytest.skip("chromium is not installed (apt-get install chromium)", allow_module_level=True)

torch.set_num_threads(1)
KEY = "browser-key"
ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
        "--disable-background-networking", "--disable-component-update", "--disable-sync"]


@pytest.fixture(scope="module")
def browser():
    with sync_api.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=ARGS, headless=True)
        yield browser
        browser.close()


@pytest.fixture
def page(browser):
    context = browser.new_context()
    page = context.new_page()
    errors = []
    page.on("pageerror", lambda e: errors.append(str(e)))
    # the deliberate refusals: the classifier test's call without a key, the failed chat turn's too-long message
    expected = ("the server responded with a status of 401", "the server responded with a status of 400")
    page.on("console", lambda m: errors.append(m.text) if m.type == "error" and not any(x in m.text for x in expected)
            else None)
    outside = []
    page.on("request", lambda r: outside.append(r.url) if not r.url.startswith("http://127.0.0.1:") else None)
    yield page
    context.close()
    assert not errors, errors  # no script errors, no CSP violations
    assert not outside, outside  # nothing fetched from anywhere but the server (no CDN)


def test_classifier_page_shows_probability_bars(tmp_path, page):
    run = classifier_run(str(tmp_path / "cls"), kind="mlp")
    with ServerThread(create_app(Predictor(run), ServeOptions(api_key=KEY))) as url:
        page.goto(url + "/")
        assert page.locator("#model-name").text_content() == "cls"
        assert page.locator("#key-row").is_visible() and not page.locator("#chat").is_visible()
        page.fill("#texts", "质量很好，推荐\n太差了，退货")
        page.click("#classify")  # no key yet: the API's 401 message is shown
        page.wait_for_selector("#classify-error:not(:empty)")
        assert "API key" in page.locator("#classify-error").text_content()
        page.fill("#api-key", KEY)
        page.click("#classify")
        page.wait_for_selector("[data-testid=prediction] .bar")
        cards = page.locator("[data-testid=prediction]")
        assert cards.count() == 2
        expected = run.predict(["质量很好，推荐", "太差了，退货"])
        for i, want in enumerate(expected):
            bars = cards.nth(i).locator(".bar")
            assert bars.count() == len(run.labels)
            shown = {bars.nth(j).get_attribute("data-label"): float(bars.nth(j).get_attribute("data-probability"))
                     for j in range(bars.count())}
            assert shown == pytest.approx(want["probabilities"], abs=1e-6)
            top = cards.nth(i).locator(".bar.top")
            assert top.get_attribute("data-label") == want["label"]
            width = top.locator(".fill").evaluate("e => e.style.width")
            assert width == f"{100 * want['score']:.1f}%"


def test_classifier_page_colours_the_explained_tokens(tmp_path, page):
    from danlu.evaluate.explain import explain

    run = classifier_run(str(tmp_path / "cls"), kind="mlp", rows=decisive_reviews(300), epochs=6)
    texts = ["🙂质量好物流", "客服差这个"]  # spans count code points: the emoji is two UTF-16 units in JavaScript
    with ServerThread(create_app(Predictor(run), ServeOptions())) as url:
        page.goto(url + "/")
        page.fill("#texts", "\n".join(texts))
        page.check("#explain")
        page.click("#classify")
        page.wait_for_selector("[data-testid=prediction] .explained .tok")
        cards = page.locator("[data-testid=prediction]")
        for i, (text, want) in enumerate(zip(texts, explain(run, texts))):
            box = cards.nth(i).locator(".explained")
            assert box.text_content() == text  # the tokens and the text between them, nothing lost or doubled
            tokens = box.locator(".tok")
            assert tokens.count() == len(want["tokens"])
            scores = [float(tokens.nth(j).get_attribute("data-score")) for j in range(tokens.count())]
            top = max(range(len(scores)), key=scores.__getitem__)
            assert tokens.nth(top).text_content() in DECISIVE
            colour = tokens.nth(top).evaluate("e => getComputedStyle(e).backgroundColor")
            assert colour == "rgba(22, 163, 74, 0.75)"  # the strongest push towards the label: full green
            assert cards.nth(i).locator(".bar.top").get_attribute("data-label") == want["label"]


def test_chat_page_streams_the_reply(tmp_path, page):
    run = language_model_run(str(tmp_path / "lm"))
    with ServerThread(create_app(Predictor(run), ServeOptions(max_tokens=24))) as url:
        page.goto(url + "/")
        assert page.locator("#chat").is_visible() and not page.locator("#key-row").is_visible()
        page.fill("#temperature", "0")
        page.fill("#max-tokens", "16")
        page.fill("#prompt", "你好")
        page.keyboard.press("Enter")
        done = page.wait_for_selector(".msg.assistant[data-done=true]", timeout=30000)
        chunks = int(done.get_attribute("data-chunks"))
        reply = shown = page.locator(".msg.assistant .content").last.text_content()
        from danlu.sampling import CHAT_SAMPLING  # the playground samples as `danlu chat` does

        body = {"model": "lm", "messages": [{"role": "user", "content": "你好"}], "temperature": 0, "max_tokens": 16,
                "repetition_penalty": CHAT_SAMPLING.repetition_penalty, "top_k": CHAT_SAMPLING.top_k,
                "top_p": CHAT_SAMPLING.top_p}
        expected = httpx.post(url + "/v1/chat/completions", json=body).json()["choices"][0]["message"]["content"]
        assert reply == shown == expected
        assert chunks > 1  # it arrived in pieces, as a stream
        assert page.locator(".msg.user .content").first.text_content() == "你好"
        assert page.locator("#chat-error").text_content() == ""


def test_a_failed_chat_turn_leaves_the_history_as_it_was(tmp_path, page):
    from danlu.sampling import CHAT_SAMPLING

    run = language_model_run(str(tmp_path / "lm"), steps=20)
    sent = []
    page.on("request", lambda r: sent.append(r.post_data_json) if r.url.endswith("/v1/chat/completions") else None)
    with ServerThread(create_app(Predictor(run), ServeOptions(max_tokens=24))) as url:
        page.goto(url + "/")
        page.fill("#temperature", "0")
        page.fill("#max-tokens", "8")
        too_long = "好" * (Predictor(run).max_prompt_chars + 1)  # refused with 400 (context_length_exceeded)
        page.fill("#prompt", too_long)
        page.keyboard.press("Enter")
        page.wait_for_selector("#chat-error:not(:empty)")
        assert "context" in page.locator("#chat-error").text_content()
        assert page.locator(".msg").count() == 0  # the failed turn is not in the conversation
        assert page.locator("#prompt").input_value() == too_long  # it is back in the box, to edit
        page.fill("#prompt", "你好")
        page.keyboard.press("Enter")
        page.wait_for_selector(".msg.assistant[data-done=true]", timeout=30000)
        assert page.locator("#chat-error").text_content() == ""
        body = {"model": "lm", "messages": [{"role": "user", "content": "你好"}], "temperature": 0, "max_tokens": 8,
                "repetition_penalty": CHAT_SAMPLING.repetition_penalty, "top_k": CHAT_SAMPLING.top_k,
                "top_p": CHAT_SAMPLING.top_p}  # what the playground sends besides the fields on the page
        expected = httpx.post(url + "/v1/chat/completions", json=body).json()["choices"][0]["message"]["content"]
        assert page.locator(".msg.assistant .content").last.text_content() == expected
    assert sent[-1]["messages"] == [{"role": "user", "content": "你好"}]


@pytest.mark.parametrize("kind", ["classifier", "language_model"])
def test_no_sideways_scroll_at_phone_width(tmp_path, browser, kind):
    run = classifier_run(str(tmp_path / "cls"), kind="mlp") if kind == "classifier" else \
        language_model_run(str(tmp_path / "lm"), steps=0)
    context = browser.new_context(viewport={"width": 360, "height": 740}, device_scale_factor=2, is_mobile=True,
                                  has_touch=True)
    page = context.new_page()
    try:
        with ServerThread(create_app(Predictor(run), ServeOptions(api_key=KEY))) as url:
            page.goto(url + "/")
            page.fill("#api-key", KEY)
            long_word = "https://example.com/" + "x" * 120  # one unbroken word, wider than the screen
            if kind == "classifier":
                page.fill("#texts", long_word)
                page.click("#classify")
                page.wait_for_selector("[data-testid=prediction] .bar")
            else:
                page.fill("#max-tokens", "2")
                page.fill("#prompt", long_word)
                page.keyboard.press("Enter")
                page.wait_for_selector(".msg.assistant[data-done=true], #chat-error:not(:empty)", timeout=30000)
                assert page.locator("#chat-error").text_content() == ""
            widths = page.evaluate("() => [document.documentElement.scrollWidth, screen.width]")
    finally:
        context.close()
    assert widths[0] <= widths[1], f"the page is {widths[0]} px wide on a {widths[1]} px screen"

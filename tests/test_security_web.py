"""The studio's web surface against a hostile web: requests that name another host (DNS rebinding) or come from
another site's page are refused on every route, and values from files, adapters, datasets and clients are shown as
text wherever the studio renders HTML, both in the renderers and in Chromium with a hostile imported adapter."""
from __future__ import annotations

import http.client
import json
import shutil
import urllib.request
import zipfile
from html.parser import HTMLParser

import pytest

from app import adapters_tab, playground_tab, render, train_tab
from app.http_guard import HostPolicy
from tests.studio_server import running_studio

PWN = "window.__pwned=(window.__pwned||0)+1;document.title='pwned'"
HOSTILE = [
    "<script>" + PWN + "</script>",
    f'"><img src=x onerror="{PWN}">',
    f"'><svg onload={PWN}>",
    f'<a href="javascript:{PWN}">click</a>',
    f"javascript:{PWN}",
    "${" + PWN + "}",
    "{{constructor.constructor(\"" + PWN + "\")()}}",
    f"<iframe srcdoc='<script>parent.{PWN}</script>'></iframe>",
]
SAFE_TAGS = {"div", "span", "b", "code", "table", "thead", "tbody", "tr", "td", "th", "br", "pre", "ul", "li", "svg",
             "line", "circle", "polyline", "rect", "text", "title"}


URL_ATTRS = {"href", "src", "xlink:href", "action", "formaction", "srcdoc", "srcset"}


class Tags(HTMLParser):
    """Every element and attribute a browser would build from the HTML."""

    def __init__(self):
        super().__init__(convert_charrefs=True)
        self.tags: list[tuple[str, dict]] = []

    def handle_starttag(self, tag, attrs):
        self.tags.append((tag, dict(attrs)))


def assert_inert(out: str, where: str) -> None:
    parser = Tags()
    parser.feed(out)
    for tag, attrs in parser.tags:
        assert tag in SAFE_TAGS, f"{where}: a <{tag}> element came out of the data: {out[:400]}"
        for k, v in attrs.items():
            assert not k.startswith("on"), f"{where}: <{tag} {k}=...> came out of the data"
            assert k not in URL_ATTRS, f"{where}: <{tag} {k}={v!r}> came out of the data"
            assert k != "style" or "url(" not in (v or ""), f"{where}: <{tag} style={v!r}>"


def hostile_views(payload: str) -> dict[str, str]:
    """Each renderer fed the payload in every text field and in place of numbers."""
    p = payload
    pair = {"mean_diff": p, "ci_low": p, "ci_high": p, "wins": p, "ties": p, "losses": p}
    result = {"adapter": p, "base_model": p, "quantization": p, "duration_s": p, "settings": {"max_new_tokens": p},
              "data": {"n": p, "path": p, "split": p, "fingerprint": p},
              "metrics": {"base": {"rouge_l": p, "tokens_per_second": p}, "adapter": {"rouge_l": 0.5, "latency_s": p}},
              "paired": {"rouge_l": pair, "token_f1": {**pair, "mean_diff": 0.1, "ci_low": 0.0, "ci_high": 0.2}},
              "examples": [{"prompt": p, "scores": {"base": {"rouge_l": p}}}]}
    other = {**result, "data": {**result["data"], "fingerprint": "other"}}
    live = {"id": p, "name": p, "state": p, "phase": p, "step": p, "total_steps": p, "progress": p, "loss": p,
            "eval_loss": p, "tokens_per_second": p, "peak_memory_mb": p, "adapter_name": p, "attempts": p,
            "error": p, "elapsed_seconds": p, "eta_seconds": p, "loss_history": [[1, 0.5], [2, p]], "eval_history": []}
    meta = {"base_model": p, "quantization": p, "dataset": {"path": p, "format": p, "num_train": p},
            "config": {"lora": {"r": p, "target_modules": [p]}, "training": {"learning_rate": p}},
            "metrics": {"steps": p, "first_loss": p, "final_loss": p, "runtime_s": p},
            "eval": {"paired": {"rouge_l": pair}}, "created_at": p, "job_id": p}
    preview = {"format": p, "num_rows": p, "sampled_rows": p, "truncated": p, "source": p, "max_seq_length": p,
               "token_lengths": {"p50": p}, "rows": [{"segments": [{"text": p, "trained": True}], "num_tokens": p}]}
    return {
        "eval_chart_html": render.eval_chart_html(result),
        "compare_html": render.compare_html(result, other),
        "progress_html": render.progress_html(live),
        "stats_html": render.stats_html(live),
        "loss_chart": render.loss_chart(live),
        "overlay_chart": render.overlay_chart([{**live, "id": "job-" + p}]),
        "line_chart_svg": render.line_chart_svg({p: [(1, 1.0)]}, title=p, x_label=p, y_label=p, empty=p),
        "empty_chart": render.line_chart_svg({}, title=p, empty=p),
        "preview_html": render.preview_html(preview),
        "state_badge": render.state_badge(p),
        "provenance_html": adapters_tab.provenance_html(meta),
        "preview_summary_html": train_tab.preview_summary_html(preview),
        "errors_html": train_tab.errors_html("form: " + p + "; " + p),
        "playground stats_html": playground_tab.stats_html({"new_tokens": p, "tokens_per_second": p,
                                                             "latency_s": p, "quantization": p}, label=p),
    }


@pytest.mark.parametrize("payload", HOSTILE)
def test_renderers_show_hostile_values_as_text(payload):
    views = hostile_views(payload)
    for where, out in views.items():
        assert_inert(out, where)
    # the text fields really went through (as text): the page shows the payload, it does not run it
    for where in ("eval_chart_html", "progress_html", "provenance_html", "preview_html", "errors_html"):
        assert render.esc(payload) in views[where], f"{where} dropped the value instead of escaping it"


def test_dataframes_hold_hostile_values_as_plain_cells():
    p = HOSTILE[1]
    frame = render.adapters_frame([{"name": "a", "base_model": p, "quantization": p, "dataset": p,
                                    "metrics": {"steps": p, "final_loss": p}, "eval": {"paired": p},
                                    "created_at": p, "size_mb": 1.0}])
    assert frame.iloc[0]["base model"] == p and frame.iloc[0]["steps"] == "–" and frame.iloc[0]["created"] == "–"
    examples = render.examples_frame({"examples": [{"prompt": p, "reference": {"x": p}, "scores": {"diff": p}}]})
    assert examples.iloc[0]["prompt"] == p and examples.iloc[0]["gain"] is None


def test_host_policy_for_each_kind_of_bind():
    loop = HostPolicy("127.0.0.1")
    assert loop.refusal("localhost:7860", "http://localhost:7860") is None
    assert loop.refusal("10.0.0.5:7860", None) and loop.refusal("studio.example:7860", None)
    assert loop.refusal("127.0.0.1:7860", "http://127.0.0.1:7861")  # another local server's page
    lan = HostPolicy("192.168.1.20")
    assert lan.refusal("192.168.1.20:7860", None) is None and lan.refusal("localhost:7860", None)
    anywhere = HostPolicy("0.0.0.0", ["studio.example.org"])
    assert anywhere.refusal("10.0.0.5:7860", "http://10.0.0.5:7860") is None  # an IP address cannot be rebound
    assert anywhere.refusal("evil.example:7860", None)
    # behind a proxy that rewrites Host, the page's Origin is the public name the operator listed
    assert anywhere.refusal("127.0.0.1:7860", "https://studio.example.org") is None
    assert anywhere.refusal("studio.example.org.", None) is None
    assert anywhere.refusal(None, None) == "the request has no Host header"


# --- a real studio -------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def studio(tmp_path_factory):
    home = tmp_path_factory.mktemp("web-studio")
    with running_studio(home, "--no-scheduler") as (url, proc, log):
        yield url, home, log


def request(url: str, method: str, path: str, headers: dict, body: bytes | None = None):
    port = int(url.rstrip("/").rsplit(":", 1)[1])
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    try:
        conn.putrequest(method, path, skip_host=True, skip_accept_encoding=True)
        for k, v in headers.items():
            conn.putheader(k, v)
        if body is not None:
            conn.putheader("Content-Length", str(len(body)))
        conn.endheaders(body)
        r = conn.getresponse()
        return r.status, r.read().decode("utf-8", "replace")
    finally:
        conn.close()


def upload_body(name: str = "x.jsonl", data: bytes = b'{"text": "hi"}\n') -> tuple[dict, bytes]:
    boundary = "studioboundary"
    body = (f'--{boundary}\r\nContent-Disposition: form-data; name="files"; filename="{name}"\r\n'
            f"Content-Type: application/octet-stream\r\n\r\n").encode() + data + f"\r\n--{boundary}--\r\n".encode()
    return {"Content-Type": f"multipart/form-data; boundary={boundary}"}, body


def routes(url: str) -> list[tuple[str, str, dict, bytes | None]]:
    """One request of each kind the studio serves: page, config, API info, an API call, an upload, a file, the
    queue's event stream, and a websocket handshake."""
    up_headers, up_body = upload_body()
    call = json.dumps({"data": []}).encode()
    return [("GET", "/", {}, None), ("GET", "/config", {}, None), ("GET", "/gradio_api/info", {}, None),
            ("POST", "/gradio_api/call/list_jobs", {"Content-Type": "application/json"}, call),
            ("POST", "/gradio_api/upload", up_headers, up_body),
            ("GET", "/gradio_api/file=README.md", {}, None),
            ("GET", "/gradio_api/queue/data?session_hash=abc", {"Accept": "text/event-stream"}, None),
            ("GET", "/gradio_api/queue/join", {"Connection": "Upgrade", "Upgrade": "websocket",
                                                "Sec-WebSocket-Version": "13",
                                                "Sec-WebSocket-Key": "dGhlIHNhbXBsZSBub25jZQ=="}, None),
            ("OPTIONS", "/gradio_api/upload", {"Origin": "http://evil.example",
                                               "Access-Control-Request-Method": "POST"}, None)]


def test_requests_naming_another_host_are_refused_on_every_route(studio):
    url, home, log = studio
    port = url.rstrip("/").rsplit(":", 1)[1]
    for host in (f"evil.example:{port}", "evil.example", f"127.0.0.1.evil.example:{port}", f"localhost.:{port}x"):
        for method, path, headers, body in routes(url):
            status, text = request(url, method, path, {"Host": host, **headers}, body)
            assert status == 403, f"{method} {path} with Host {host}: {status} {text[:200]}"
            assert "does not answer to the host name" in text or "Upgrade" in headers
    assert "refused http /gradio_api/upload" in log.read_text()


def test_loopback_names_are_answered(studio):
    url, _, _ = studio
    port = url.rstrip("/").rsplit(":", 1)[1]
    for host in (f"127.0.0.1:{port}", f"localhost:{port}", f"[::1]:{port}", f"LocalHost:{port}"):
        assert request(url, "GET", "/gradio_api/info", {"Host": host})[0] == 200, host
    with urllib.request.urlopen(url, timeout=30) as page:  # another site may not frame the page
        assert page.headers["X-Frame-Options"] == "SAMEORIGIN"
        assert "frame-ancestors 'self'" in page.headers["Content-Security-Policy"]
    headers, body = upload_body()
    status, text = request(url, "POST", "/gradio_api/upload",
                           {"Host": f"127.0.0.1:{port}", "Origin": f"http://127.0.0.1:{port}", **headers}, body)
    assert status == 200 and "x.jsonl" in text


def test_requests_from_other_sites_pages_are_refused(studio):
    url, _, _ = studio
    port = url.rstrip("/").rsplit(":", 1)[1]
    for origin in ("http://evil.example", f"http://evil.example:{port}", "null", f"http://localhost:{int(port) + 1}",
                   f"file://127.0.0.1:{port}"):
        for method, path, headers, body in routes(url):
            if method == "OPTIONS":
                headers = {**headers, "Origin": origin}
            status, text = request(url, method, path, {"Host": f"127.0.0.1:{port}", "Origin": origin, **headers}, body)
            assert status == 403, f"{method} {path} from {origin}: {status} {text[:200]}"
            assert "other sites" in text or "Upgrade" in headers


# --- Chromium: a hostile imported adapter ----------------------------------------------------------------------
def hostile_zip(path, name: str):
    p = HOSTILE[1]  # markup in every text field; numbers stay numbers (hostile types: the renderer tests above)
    meta = {"base_model": p, "quantization": HOSTILE[0], "created_at": 1.7e9, "job_id": HOSTILE[3],
            "dataset": {"path": HOSTILE[2], "format": p, "num_train": p},
            "config": {"model": {"name_or_path": p}, "lora": {"r": p, "target_modules": [HOSTILE[5]]},
                       "training": {"learning_rate": HOSTILE[6]}},
            "metrics": {"steps": 3, "first_loss": 2.0, "final_loss": 1.0},
            "eval": {"paired": {"rouge_l": {"mean_diff": 0.1, "ci_low": 0, "ci_high": 0.2, "wins": p}}}}
    with zipfile.ZipFile(path, "w") as z:
        z.writestr(f"{name}/adapter_config.json", json.dumps({"peft_type": "LORA", "base_model_name_or_path": p,
                                                              "r": 8, "lora_alpha": 16, "target_modules": ["q_proj"]}))
        z.writestr(f"{name}/adapter_model.safetensors", b"\x08\x00\x00\x00\x00\x00\x00\x00{}      ")
        z.writestr(f"{name}/studio.json", json.dumps(meta))
        z.writestr(f"{name}/eval/abc.json", json.dumps(hostile_eval(name)))
    return path


def hostile_eval(name: str) -> dict:
    p = HOSTILE[1]
    pair = {"mean_diff": 0.1, "ci_low": 0.0, "ci_high": 0.2, "wins": p, "ties": HOSTILE[0], "losses": HOSTILE[2]}
    return {"key": "abc", "adapter": name, "base_model": p, "quantization": HOSTILE[0], "created_at": 1.7e9,
            "data": {"n": p, "path": HOSTILE[3], "split": HOSTILE[5], "fingerprint": "f"},
            "metrics": {"base": {"rouge_l": 0.2}, "adapter": {"rouge_l": 0.3}}, "paired": {"rouge_l": pair},
            "settings": {"max_new_tokens": HOSTILE[6]},
            "examples": [{"prompt": p, "reference": HOSTILE[0], "base": HOSTILE[3], "adapter": HOSTILE[2],
                          "scores": {"base": {"rouge_l": 0.2}, "adapter": {"rouge_l": 0.3}, "diff": {"rouge_l": 0.1}}}]}


def assert_nothing_ran(page, title: str, where: str) -> None:
    assert page.evaluate("window.__pwned") is None, f"a script from the data ran in {where}"
    assert page.title() == title, where
    assert page.locator("img[src='x'], svg[onload], iframe, a[href^='javascript']").count() == 0, where


def test_imported_adapter_markup_does_not_run_in_the_page(studio, tmp_path):
    sync_api = pytest.importorskip("playwright.sync_api", reason="playwright is not installed")
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    if not chromium:
        pytest.skip("Debian's chromium is not installed")
    from gradio_client import Client, handle_file

    url, home, _ = studio
    name = "hostile-card"
    Client(url, verbose=False).predict(handle_file(str(hostile_zip(tmp_path / "h.zip", name))), "",
                                       api_name="/import_adapter")
    # Whether or not the import kept them, evaluation files in the store are rendered: put one there.
    cached = home / "adapters" / name / "eval" / "abc.json"
    cached.parent.mkdir(exist_ok=True)
    cached.write_text(json.dumps(hostile_eval(name)))
    with sync_api.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=chromium, args=["--no-sandbox", "--disable-gpu"])
        try:
            page = browser.new_page(viewport={"width": 1400, "height": 1000})
            page.set_default_timeout(60_000)
            dialogs = []
            page.on("dialog", lambda d: (dialogs.append(d.message), d.dismiss()))
            page.goto(url)
            page.wait_for_selector("#main-tabs")
            title = page.title()
            page.get_by_role("tab", name="Adapters", exact=True).click()
            page.locator("#adapter-provenance").get_by_text("onerror", exact=False).first.wait_for()
            assert_nothing_ran(page, title, "the adapter table and details")
            page.get_by_role("tab", name="Evaluate", exact=True).click()
            page.locator("#eval-chart").get_by_text("<script>", exact=False).first.wait_for()
            page.locator("#eval-examples").get_by_text("onerror", exact=False).first.wait_for(state="attached")
            assert_nothing_ran(page, title, "the evaluation chart and examples")
            page.get_by_role("tab", name="Compare two adapters", exact=True).click()
            for box in ("compare-a", "compare-b"):
                page.locator(f"#{box}").locator("input").first.click()
                page.get_by_role("option", name=name).first.click()
            page.locator("#compare-out").get_by_text("<script>", exact=False).first.wait_for()
            assert_nothing_ran(page, title, "the comparison")
            # an error message that carries the markup (a refused adapter name) pops up as a toast
            page.get_by_text("Import an adapter (zip)").click()
            page.locator("#import-file input[type=file]").set_input_files(str(tmp_path / "h.zip"))
            page.locator("#import-name input, #import-name textarea").first.fill(HOSTILE[1])
            page.locator("#import-btn").click()
            page.locator("[data-testid=toast-body]").get_by_text("onerror", exact=False).first.wait_for()
            page.screenshot(path=str(tmp_path.parent / "hostile-adapter.png"), full_page=True)
            assert_nothing_ran(page, title, "an error message")
            assert not dialogs
        finally:
            browser.close()

"""The Patchscopes tutorial web app: its sections' computing on a tiny model, the page through
Streamlit's AppTest (every section, bad input as a message in the page), and the real app in
headless Chromium, driven by Selenium, with a screenshot of every section."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from lenscope.errors import ConfigError
from lenscope.lenses.artifact import save_lens
from lenscope.lenses.lens import TunedLens
from lenscope.model.frozen import FrozenModel
from lenscope.model.loading import LoadedModel
from lenscope.patchscopes.facts import load_facts
from lenscope.tutorial import sections
from tests.conftest import make_tokenizer, tiny_llama

APP = Path(__file__).resolve().parents[1] / "lenscope" / "tutorial" / "app.py"
SECTION_NAMES = ["1 · Decoding", "2 · Attribute extraction", "3 · Entity resolution", "4 · Cross-model patching",
                 "5 · Multi-hop reasoning"]


@pytest.fixture(scope="module")
def model():
    return FrozenModel(LoadedModel(tiny_llama(), make_tokenizer(), "tiny", "local"))


# --- the sections' computing ------------------------------------------------------------------------------
def test_decoding_puts_each_lens_beside_its_patchscope_and_the_token_identity_patchscope(model):
    torch.manual_seed(0)
    lens = TunedLens(model.layers, model.d_model)
    with torch.no_grad():
        lens.weight.normal_(0, 0.05)
        lens.bias.normal_(0, 0.1)
    for run_passes in (False, True):
        view = sections.decoding(model, "w5 w6 w7", [lens], run_passes=run_passes)
        assert view.originals == ["logit", "tuned"]
        assert view.patchscopes == ["logit via patchscope", "tuned via patchscope", "token_identity"]
        assert view.trajectory.tokens == ["w5", "w6", "w7"]
        assert len(view.trajectory.select(view.originals).figure("entropy").data) == 2
        assert len(view.trajectory.select(view.patchscopes).figure("entropy").data) == 3
        # Each lens and its patchscope version read the same distributions (run or decoded).
        assert set(view.max_difference) == {"logit", "tuned"}
        assert all(gap < 1e-4 for gap in view.max_difference.values())
    with pytest.raises(ConfigError, match="no panel named"):
        view.trajectory.select(["future"])
    # Not asked as patchscopes: the originals and token identity only.
    view = sections.decoding(model, "w5 w6 w7", [lens], as_patchscopes=False)
    assert view.patchscopes == ["token_identity"] and view.max_difference == {}
    assert [panel.name for panel in view.trajectory.panels] == ["logit", "tuned", "token_identity"]


def test_attribute_entity_and_multi_hop_sections_give_a_row_per_layer(model):
    facts = load_facts()
    fact = facts.of("country_capital")[0]
    view = sections.attribute(model, facts, "country_capital", fact.source, fact.subject, layer_step=1, max_new_tokens=3)
    assert view.layers == [0, 1, 2] and len(view.patchscope) == len(view.probe) == 3
    assert set(view.probe) <= {f.object for f in facts.of("country_capital")} and view.answer == fact.object
    layers, descriptions = sections.entity_description(model, "w5 w6", layer_step=2, max_new_tokens=3)
    assert layers == [0, 2] and len(descriptions) == 2
    hop = sections.multi_hop(model, "w10 w11", "w12 w13 w14", layer_step=1, max_new_tokens=3)
    assert hop.query == "w10 w11 w12 w13 w14" and len(hop.patched) == 3 and isinstance(hop.vanilla, str)


def test_cross_model_section_fits_layer_to_layer_maps_of_one_model_when_no_map_is_given(model):
    generator = torch.Generator().manual_seed(0)
    texts = [" ".join(f"w{int(i)}" for i in torch.randint(3, 60, (40,), generator=generator)) for _ in range(8)]
    fitted = sections.self_map(model, layer_step=1, texts=texts)
    assert fitted.source_layers == fitted.target_layers == [0, 1, 2] and fitted.meta["fit_positions"] > 100
    # From a layer into itself the least-squares map is the identity (up to the ridge term).
    for i in range(3):
        torch.testing.assert_close(fitted.weight[i, i], torch.eye(model.d_model), atol=1e-3, rtol=0)
    pairs, texts = sections.cross_model(model, model, fitted, "w5 w6", max_new_tokens=3)
    assert pairs == [(0, 0), (1, 1), (2, 2)] and len(texts) == 3
    pairs, texts = sections.cross_model(model, model, fitted, "w5 w6", target_layer=1, max_new_tokens=3)
    assert pairs == [(0, 1), (1, 1), (2, 1)] and len(texts) == 3
    # At ℓ* = ℓ the description is section 3's entity-description patchscope of the same subject.
    _, own = sections.entity_description(model, "w5 w6", layer_step=1, max_new_tokens=3)
    assert sections.cross_model(model, model, fitted, "w5 w6", max_new_tokens=3)[1] == own


@pytest.mark.parametrize(("call", "message"), [
    (lambda m: sections.decoding(m, "   ", []), "the prompt is empty"),
    (lambda m: sections.decoding(m, " ".join(["w5"] * 300), []), "the prompt has 300 tokens, more than the model's context of 256"),
    (lambda m: sections.attribute(m, load_facts(), "nope", "w5 w6", "w5"), "relation 'nope' is unknown"),
    (lambda m: sections.attribute(m, load_facts(), "country_capital", "w5 w6", "Atlantis"),
     "the subject 'Atlantis' is not in the sentence"),
    (lambda m: sections.knockout(m, "w5 w6 w7", "w9"), "subject 'w9' is not in the prompt"),
    (lambda m: sections.load_cross_model_map("missing/map.safetensors"), "no cross-model map at"),
    (lambda m: sections.cross_model(m, m, sections.self_map(m, layer_step=2, documents=2), "w5", target_layer=1),
     r"the map writes into target layers \[0, 2\], not 1"),
])
def test_bad_input_is_one_line(model, call, message):
    with pytest.raises(ConfigError, match=message) as err:
        call(model)
    assert "\n" not in str(err.value)


# --- the page, in process --------------------------------------------------------------------------------
@pytest.fixture
def app(tiny_model_dir, monkeypatch):
    from streamlit.testing.v1 import AppTest

    monkeypatch.setenv("LENSCOPE_TUTORIAL_MODEL", str(tiny_model_dir))
    monkeypatch.setenv("LENSCOPE_TUTORIAL_LENS", "")
    at = AppTest.from_file(str(APP), default_timeout=120)
    at.run()
    assert not at.exception and not at.error
    return at


def test_every_section_renders_without_an_error(app):
    assert "A **lens** reads" in app.markdown[0].value
    for name in SECTION_NAMES:
        app.sidebar.radio(key="section").set_value(name).run()
        assert not app.exception, (name, [e.value for e in app.exception])
        assert not app.error, (name, [e.value for e in app.error])
        assert app.header[0].value.startswith(name)
    app.sidebar.radio(key="section").set_value(SECTION_NAMES[0]).run()
    # The lenses asked as patchscopes are computed and drawn only once asked for.
    assert len(app.get("plotly_chart")) == 1
    app.toggle(key="decoding_as_patchscopes").set_value(True).run()
    assert len(app.get("plotly_chart")) == 2 and not app.exception
    assert any("Against the lens itself: logit: the same top tokens" in md.value for md in app.markdown)


def test_bad_input_in_the_page_is_a_message_not_a_stack_trace(app, tmp_path):
    app.sidebar.radio(key="section").set_value(SECTION_NAMES[0]).run()
    app.text_input(key="decoding_prompt").input("").run()
    assert "the prompt is empty" in app.error[0].value and not app.exception
    app.text_input(key="decoding_prompt").input(" ".join(["w5"] * 300)).run()
    assert "more than the model's context of 256" in app.error[0].value
    app.sidebar.radio(key="section").set_value(SECTION_NAMES[1]).run()
    app.text_input(key="attribute_subject").input("Atlantis").run()
    assert "the subject 'Atlantis' is not in the sentence" in app.error[0].value
    app.sidebar.radio(key="section").set_value(SECTION_NAMES[3]).run()
    app.text_input(key="cross_mapping").input("missing/map.safetensors").run()
    assert "no cross-model map at 'missing/map.safetensors'" in app.error[0].value
    app.text_input(key="cross_mapping").input("").run()
    app.text_input(key="cross_target").input("some/other-model").run()
    assert "must be fitted first" in app.error[0].value
    app.sidebar.radio(key="section").set_value(SECTION_NAMES[2]).run()
    app.text_input(key="entity_subject").input("Atlantis").run()
    assert "subject 'Atlantis' is not in the prompt" in app.error[0].value
    # A lens made for another model, and a model that cannot be loaded offline.
    other = FrozenModel(LoadedModel(tiny_llama(seed=1), make_tokenizer(), "other", "local"))
    folder = save_lens(TunedLens(other.layers, other.d_model), tmp_path / "other", base_model="other", revision="local",
                       unembed_hash=other.unembed_hash, num_hidden_layers=other.num_layers)
    app.sidebar.text_area(key="lens_paths").input(str(folder)).run()
    assert any("unembedding" in e.value or "another model" in e.value for e in app.error), [e.value for e in app.error]
    app.sidebar.text_area(key="lens_paths").input("").run()
    app.sidebar.text_input(key="model_name").input("no-such-org/no-such-model").run()
    assert app.error and not app.exception and "\n" not in app.error[0].value


# --- the real app in a real browser ----------------------------------------------------------------------
def _browser() -> tuple[str, str] | None:
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    driver = shutil.which("chromedriver")
    return (chromium, driver) if chromium and driver else None


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.subprocess
@pytest.mark.skipif(_browser() is None, reason="no chromium and chromedriver here (Debian: apt-get install chromium "
                                               "chromium-driver; .ci/run installs them)")
def test_the_app_in_headless_chromium(tiny_model_dir, tmp_path):
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys
    from selenium.webdriver.support import expected_conditions as ec
    from selenium.webdriver.support.ui import WebDriverWait

    chromium, driver_path = _browser()
    port = _free_port()
    log = (tmp_path / "server.log").open("wb")  # a file, not a pipe: an unread pipe fills and stalls the server
    server = subprocess.Popen([sys.executable, "-m", "lenscope", "tutorial", "--model", str(tiny_model_dir),
                               "--port", str(port), "--address", "127.0.0.1", "--headless"],
                              stdout=log, stderr=subprocess.STDOUT,
                              # No lens from the working folder (a quickstart run leaves one there).
                              env={**os.environ, "WANDB_MODE": "disabled", "LENSCOPE_TUTORIAL_LENS": ""})
    options = webdriver.ChromeOptions()
    options.binary_location = chromium
    for flag in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--window-size=1500,1100"):
        options.add_argument(flag)
    browser = None
    shots = Path(os.environ.get("LENSCOPE_SCREENSHOTS", tmp_path / "screenshots"))
    shots.mkdir(parents=True, exist_ok=True)
    try:
        # The server is up when its port answers (no sleeping on a guess: poll, with a generous limit).
        deadline = time.monotonic() + 180
        while True:
            assert server.poll() is None, (tmp_path / "server.log").read_text()[-3000:]
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                break
            except OSError:
                assert time.monotonic() < deadline, "the tutorial did not start in 180 s"
                time.sleep(0.5)
        browser = webdriver.Chrome(service=Service(driver_path), options=options)
        browser.get(f"http://127.0.0.1:{port}")
        wait = WebDriverWait(browser, 180)

        def section(name: str) -> None:
            label = wait.until(ec.element_to_be_clickable((By.XPATH, f"//label[.//p[text()='{name}']]")))
            label.click()
            wait.until(ec.text_to_be_present_in_element((By.TAG_NAME, "h2"), name))

        def settled() -> None:
            # While the script reruns, Streamlit keeps the last run's elements, marked stale; the page
            # is the new section's once none is (and a moment after the run started there may be none
            # yet: the section's own element is waited for as well).
            wait.until(lambda b: not b.find_elements(By.CSS_SELECTOR, '[data-stale="true"]'))

        wait.until(ec.text_to_be_present_in_element((By.TAG_NAME, "h2"), "Lenses and patchscopes"))
        browser.save_screenshot(str(shots / "0_intro.png"))
        section(SECTION_NAMES[0])
        box = wait.until(ec.presence_of_element_located((By.CSS_SELECTOR, 'input[aria-label="Prompt"]')))
        box.send_keys(Keys.CONTROL, "a")
        box.send_keys("w5 w6 w7 w8", Keys.ENTER)
        wait.until(ec.presence_of_element_located((By.CSS_SELECTOR, ".js-plotly-plot")))
        settled()
        assert "w8" in browser.find_element(By.CSS_SELECTOR, ".js-plotly-plot").text
        # The lenses asked as patchscopes are computed and drawn when their toggle is switched on.
        browser.find_element(By.XPATH, "//label[.//p[starts-with(text(), 'Also ask each lens as a patchscope')]]").click()
        wait.until(lambda b: len(b.find_elements(By.CSS_SELECTOR, ".js-plotly-plot")) == 2
                   and "w8" in b.find_elements(By.CSS_SELECTOR, ".js-plotly-plot")[1].text)
        browser.save_screenshot(str(shots / "1_decoding.png"))
        for i, name in enumerate(SECTION_NAMES[1:], start=2):
            section(name)
            own = {"2": "Originals: LRE attribute lens", "3": "Originals: attention knockout", "4": "The map: ",
                   "5": "Original: the query as it is"}[name[0]]
            wait.until(ec.text_to_be_present_in_element((By.CSS_SELECTOR, '[data-testid="stMain"]'), own))
            settled()
            if name.startswith("3"):
                wait.until(ec.presence_of_element_located((By.CSS_SELECTOR, '[data-testid="stImage"]')))
            assert not browser.find_elements(By.CSS_SELECTOR, '[data-testid="stException"]'), name
            browser.save_screenshot(str(shots / f"{i}_{name.split(' · ')[1].lower().replace(' ', '_')}.png"))
        assert len(list(shots.glob("*.png"))) == 6
    except Exception:
        if browser is not None:  # what the page showed when it failed, for whoever reads the failure
            browser.save_screenshot(str(shots / "failure.png"))
        raise
    finally:
        if browser is not None:
            browser.quit()
        server.terminate()
        try:
            server.wait(timeout=30)
        except subprocess.TimeoutExpired:
            server.kill()
            server.wait(timeout=30)
        log.close()
    # `lenscope tutorial` is the server itself: stopping it leaves nothing listening behind.
    with pytest.raises(OSError):
        socket.create_connection(("127.0.0.1", port), timeout=2).close()

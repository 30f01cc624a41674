"""The Patchscopes tutorial as a web app: ``lenscope tutorial`` (``streamlit run`` on this file).

One prompt at a time, each section shows a classic method beside the same question asked through
a patchscope. The computing is in ``lenscope.tutorial.sections``; this page only lays it out.
"""

from __future__ import annotations

import os
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pandas as pd
import streamlit as st

from lenscope.errors import ConfigError, UserError, one_line
from lenscope.model.loading import EMBEDDED_MODEL
from lenscope.tutorial import sections

SECTIONS = ["Lenses and patchscopes", "1 · Decoding", "2 · Attribute extraction", "3 · Entity resolution",
            "4 · Cross-model patching", "5 · Multi-hop reasoning"]
QUICKSTART_LENS = Path("artifacts/quickstart/tuned")


def _argument(name: str, default: str) -> str:
    """``lenscope tutorial --model X`` (``streamlit run app.py -- --model X``) or ``LENSCOPE_TUTORIAL_MODEL``
    / ``_LENS``: the sidebar's defaults."""
    args = sys.argv[1:]
    if name in args and args.index(name) + 1 < len(args):
        return args[args.index(name) + 1]
    return os.environ.get(f"LENSCOPE_TUTORIAL_{name.strip('-').upper()}", default)


@st.cache_resource
def worker() -> ThreadPoolExecutor:
    """The one thread every model computation runs on. Streamlit runs each rerun on a new thread,
    and nnsight's traces keep greenlets bound to the thread that made them: a model shared between
    reruns must always be traced from the same thread."""
    return ThreadPoolExecutor(max_workers=1, thread_name_prefix="lenscope-model")


def on_worker(fn, *args, **kwargs):
    return worker().submit(fn, *args, **kwargs).result()


@st.cache_resource(show_spinner="Loading the model (once per process)…")
def load_model(name: str):
    from lenscope.model.frozen import FrozenModel

    return on_worker(FrozenModel.load, name)


@st.cache_resource(show_spinner="Loading the lens…")
def load_lens(path: str, model_name: str):
    from lenscope.lenses.artifact import load_lens as load

    return on_worker(load, path, load_model(model_name))


@st.cache_resource
def identity_lens(model_name: str):
    """The token-identity lens of the model, kept with its prompt prefix's cache between prompts."""
    from lenscope.lenses.token_identity import TokenIdentityLens

    return TokenIdentityLens.for_model(load_model(model_name))


@st.cache_resource(show_spinner="Fitting the relation's LRE operator (mean Jacobian over 3 facts)…")
def lre_operator(model_name: str, relation: str, layer: int):
    from lenscope.patchscopes.facts import load_facts
    from lenscope.patchscopes.lre import fit_relation

    operator, _ = on_worker(fit_relation, load_model(model_name), load_facts(), relation, layer, n_train=3)
    return operator


def show_error(err: BaseException) -> None:
    st.error(one_line(err), icon="⚠️")


def explain(text: str) -> None:
    st.caption(text)


def page_intro() -> None:
    st.header("Lenses and patchscopes")
    st.markdown(
        "A transformer keeps one vector per token, the *residual stream*, and every layer adds to it. "
        "A **lens** reads that vector at an intermediate layer as if it were the last one: it maps "
        "it to the vocabulary and shows what the model would predict if it stopped there. The logit "
        "lens uses the model's own final norm and unembedding; a tuned lens first applies a small "
        "learned affine map per layer.\n\n"
        "A **patchscope** asks the model itself: it takes the hidden state of one prompt at a layer, "
        "writes it into another prompt (\"cat → cat; x\", \"The capital of x\"), and lets the model "
        "continue. Lenses are patchscopes too: writing a state into the last layer of the same "
        "prompt is the logit lens.\n\n"
        "Each section below puts a classic method beside its patchscope version, on one prompt at a "
        "time. Pick a section in the sidebar.")


def page_decoding(model, model_name: str, lenses) -> None:
    st.header("1 · Decoding next-token predictions")
    prompt = st.text_input("Prompt", sections.DEFAULT_PROMPT, key="decoding_prompt")
    stat = st.selectbox("Colour", ["entropy", "top_prob", "kl", "target_prob"], key="decoding_stat")
    # Off by default: the lenses asked as patchscopes cost a head product and the statistics per
    # lens (about 1 s here), and the first figure is what a new prompt is typed for.
    as_patchscopes = st.toggle("Also ask each lens as a patchscope: its mapped state written into the last layer of "
                               "the same prompt", key="decoding_as_patchscopes")
    run_passes = as_patchscopes and st.checkbox(
        "Run them as patched forward passes (one per position, seconds per lens) instead of decoding the written "
        "state directly", key="decoding_passes")
    try:
        view = on_worker(sections.decoding, model, prompt, lenses, identity=identity_lens(model_name),
                         as_patchscopes=as_patchscopes, run_passes=run_passes)
    except UserError as err:
        show_error(err)
        return
    identity = view.patchscopes[-1]
    st.subheader("The logit lens and the lenses loaded (originals), and the token-identity patchscope")
    st.plotly_chart(view.trajectory.select([*view.originals, identity]).figure(stat), key="decoding_figure")
    if as_patchscopes:
        agreement = ", ".join(f"{name}: {'the same top tokens, probabilities within ' + format(gap, '.1e') if gap != float('inf') else 'different top tokens'}"
                              for name, gap in view.max_difference.items())
        st.subheader("Each lens asked as a patchscope")
        st.write(f"Against the lens itself: {agreement}.")
        st.plotly_chart(view.trajectory.select(view.patchscopes[:-1]).figure(stat), key="decoding_patchscopes")
    explain("A lens is a patchscope whose target is the last layer of the same prompt: the state, mapped by the lens, "
            "is written where the model's own last state was, and only the final norm and the head act on it, so "
            "each lens asked as a patchscope (the toggle) reads what the lens reads. The token-identity patchscope "
            "instead writes each state into \"cat → cat; … x\" at its own layer and lets the rest of the model decode "
            "it. Look for the layer where each row settles on the model's own answer: token identity usually settles "
            "earlier than the logit lens.")


def page_attribute(model, model_name: str, layer_step: int) -> None:
    from lenscope.patchscopes.facts import load_facts

    st.header("2 · Attribute extraction")
    facts = load_facts()
    relation = st.selectbox("Relation", sorted(facts.relations), index=sorted(facts.relations).index("country_capital"),
                            key="attribute_relation")
    example = facts.of(relation)[0]
    sentence = st.text_input("A sentence that mentions the subject", example.source, key="attribute_sentence")
    subject = st.text_input("Subject", example.subject, key="attribute_subject")
    layer = st.slider("LRE layer (residual index)", 0, model.num_layers - 1, min(8, model.num_layers - 1),
                      key="attribute_layer")
    run_lre = st.checkbox("Fit the LRE operator (about a minute on a CPU, then cached)", key="attribute_lre")
    try:
        operator = lre_operator(model_name, relation, layer) if run_lre else None
        view = on_worker(sections.attribute, model, facts, relation, sentence, subject, operator, layer_step)
    except UserError as err:
        show_error(err)
        return
    left, right = st.columns(2)
    with left:
        st.subheader("Originals: LRE attribute lens, linear probe")
        table = {"layer": view.layers, "probe": view.probe}
        if view.lre:
            table["LRE top token"] = view.lre
        st.dataframe(pd.DataFrame(table), hide_index=True, key="attribute_originals")
    with right:
        st.subheader("Patchscope: the template continued from the subject's state")
        st.dataframe(pd.DataFrame({"layer": view.layers, "continuation": view.patchscope}), hide_index=True,
                     key="attribute_patchscope")
    if view.answer:
        st.write(f"The fact set's answer: **{view.answer}**")
    explain(f"The subject's state is read at its last token in the sentence. The patchscope writes it over the x of "
            f"\"{facts.relations[relation].template}\" and lets the model continue; the probe is trained on the "
            f"relation's other facts ({view.probe_facts} whose subject is whole tokens of its sentence); the LRE operator is the relation's mean Jacobian at its layer. Look for the "
            "layers where the attribute first appears: the paper finds the patchscope reads it where a probe cannot.")


def page_entity(model, layer_step: int) -> None:
    st.header("3 · Entity resolution")
    prompt = st.text_input("Prompt", sections.DEFAULT_PROMPT, key="entity_prompt")
    subject = st.text_input("Subject (a span of the prompt)", sections.DEFAULT_SUBJECT, key="entity_subject")
    run_trace = st.checkbox("Run causal tracing (3 noise samples, every 3rd block: tens of seconds on a CPU)",
                            key="entity_trace")
    try:
        knocked = on_worker(sections.knockout, model, prompt, subject)
        layers, descriptions = on_worker(sections.entity_description, model, subject, layer_step)
        trace = on_worker(sections.causal_trace, model, prompt, subject, layer_step=layer_step) if run_trace else None
    except UserError as err:
        show_error(err)
        return
    from lenscope.patchscopes.report import knockout_png, trace_png

    left, right = st.columns(2)
    with left:
        st.subheader("Originals: attention knockout, causal tracing")
        st.image(knockout_png(knocked), caption=f"Blocking the last position's edges; answer {knocked.answer!r}")
        if trace is not None:
            st.image(trace_png(trace), caption="Restoring clean states into a corrupted run")
    with right:
        st.subheader("Patchscope: the subject described from its own state")
        st.dataframe(pd.DataFrame({"layer": layers, "description": descriptions}), hide_index=True,
                     key="entity_descriptions")
    explain("Knockout: where the curve for the subject drops, the last position reads the answer from the subject. "
            "Causal tracing: which states carry the fact. The patchscope shows what the model has resolved about "
            "the subject at each layer: generic words early, the entity itself from the middle layers on.")


@st.cache_resource(show_spinner="Fitting the model's layer-to-layer maps on the embedded demo text (once per process)…")
def self_map(model_name: str, layer_step: int):
    return on_worker(sections.self_map, load_model(model_name), layer_step)


@st.cache_resource(show_spinner="Loading the cross-model map…")
def cross_map(path: str):
    return sections.load_cross_model_map(path)


def page_cross_model(model, model_name: str, layer_step: int) -> None:
    st.header("4 · Cross-model patching")
    mapping = st.text_input("A cross-model map (map.safetensors from `lenscope patchscope crossmodel`); empty: fit "
                            "maps from this model's layers to its own", "", key="cross_mapping").strip()
    target_name = st.text_input("Target model (the map's M*)", model_name, key="cross_target").strip()
    subject = st.text_input("Subject", "Marie Curie", key="cross_subject")
    try:
        if mapping:
            fitted = cross_map(mapping)
        elif target_name != model_name:
            raise ConfigError(f"a map from {model_name} into {target_name} must be fitted first: `lenscope patchscope "
                              f"crossmodel --config configs/patchscopes/cross_model.yaml --target_model {target_name}`, "
                              "then give its map.safetensors")
        else:
            fitted = self_map(model_name, layer_step)
        choices = ["ℓ* = ℓ (the same layer)", *(f"ℓ* = {layer}" for layer in fitted.target_layers)]
        chosen = st.selectbox("Write into the target's layer", choices, key="cross_target_layer")
        target_layer = None if chosen == choices[0] else fitted.target_layers[choices.index(chosen) - 1]
        target = load_model(target_name) if target_name != model_name else model
        pairs, texts = on_worker(sections.cross_model, model, target, fitted, subject, target_layer)
    except Exception as err:  # noqa: BLE001 (bad input, or a model that cannot load offline: one line in the page)
        show_error(err)
        return
    st.dataframe(pd.DataFrame({"source layer ℓ": [s for s, _ in pairs], "target layer ℓ*": [t for _, t in pairs],
                               "description in the target model": texts}), hide_index=True, key="cross_table")
    fitted_on = fitted.meta.get("fit_positions")
    st.caption(f"The map: {fitted.meta.get('source_model', '?')} → {fitted.meta.get('target_model', '?')}, least squares"
               + (f" on {fitted_on:,} positions" if fitted_on else "") + ".")
    explain("The source model's state of the subject is mapped by the fitted affine map and written into the target "
            "model's description prompt at ℓ*. Between two models (the paper: Vicuna 7B → 13B), look for the layers "
            "where the target still recognises the entity. With one model, the map goes from layer ℓ to layer ℓ*: "
            "at ℓ* = ℓ it is nearly the identity (section 3's patchscope); a state mapped into an earlier layer shows "
            "whether the rest of the network can still use what a later layer knows.")


def page_multi_hop(model, layer_step: int) -> None:
    st.header("5 · Multi-hop reasoning")
    question = st.text_input("Second hop (π2)", "The capital city of", key="hop_question")
    phrase = st.text_input("First hop (π1)", "the country of the city of Toronto", key="hop_phrase")
    try:
        view = on_worker(sections.multi_hop, model, question, phrase, layer_step)
    except UserError as err:
        show_error(err)
        return
    left, right = st.columns(2)
    with left:
        st.subheader("Original: the query as it is")
        st.write(f"**{view.query}** → {view.vanilla!r}")
    with right:
        st.subheader("CoT patchscope: π1's answer written into π2")
        st.dataframe(pd.DataFrame({"layer": view.layers, "continuation": view.patched}), hide_index=True,
                     key="hop_table")
    explain("The patchscope takes the state at the end of π1 (where the model has resolved the bridge entity) and "
            "writes it over π2's last token, so the second hop starts from the first one's answer. Look for layers "
            "where the patched continuation names the right answer while the plain query does not.")


def main() -> None:
    st.set_page_config(page_title="Patchscopes tutorial · lenscope", layout="wide")
    st.sidebar.title("Patchscopes tutorial")
    section = st.sidebar.radio("Section", SECTIONS, key="section")
    model_name = st.sidebar.text_input("Model", _argument("--model", EMBEDDED_MODEL), key="model_name")
    default_lens = _argument("--lens", str(QUICKSTART_LENS) if QUICKSTART_LENS.is_dir() else "")
    lens_paths = st.sidebar.text_area("Lenses (folders or Hub lenses, one per line)", default_lens, key="lens_paths")
    layer_step = st.sidebar.slider("Every n-th layer in the patchscope tables", 1, 6, 3, key="layer_step")
    try:
        model = load_model(model_name.strip())
    except Exception as err:  # noqa: BLE001 (any load failure, e.g. a hub id offline: one line in the page)
        show_error(err)
        return
    lenses = []
    for path in filter(None, (line.strip() for line in lens_paths.splitlines())):
        try:
            lenses.append(load_lens(path, model_name.strip()))
        except Exception as err:  # noqa: BLE001 (a lens for another model, a missing folder)
            show_error(err)
    if section == SECTIONS[0]:
        page_intro()
    elif section == SECTIONS[1]:
        page_decoding(model, model_name.strip(), lenses)
    elif section == SECTIONS[2]:
        page_attribute(model, model_name.strip(), layer_step)
    elif section == SECTIONS[3]:
        page_entity(model, layer_step)
    elif section == SECTIONS[4]:
        page_cross_model(model, model_name.strip(), layer_step)
    else:
        page_multi_hop(model, layer_step)


if __name__ == "__main__":  # run by Streamlit (as the main script), not when imported
    main()

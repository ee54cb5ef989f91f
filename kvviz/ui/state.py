"""Every `st.session_state` key kvviz uses, with its initial value: one place, so pages agree.

Everything per browser session lives here (never in module globals): the shared model is read
only, and what one visitor records must never reach another. Widget keys (sliders, inputs) are
owned by their widgets and not listed; these are the keys pages read and write themselves.
"""

from __future__ import annotations

from typing import Any

import streamlit as st

from kvviz.validate import settings


def _defaults() -> dict[str, Any]:
    return {
        # -- shared: the sidebar's model ---------------------------------------------------------
        # the last model that loaded; KVVIZ_DEFAULT_MODEL picks the first (the first allowed one if
        # KVVIZ_ALLOWED_MODELS does not list it); checked by kit.page before this runs
        "model_name": settings().start_model,
        "model_error": None,  # message of the last failed load, shown once
        # -- Step through --------------------------------------------------------------------------
        "step_session": None,  # this browser session's kvviz.Session: its own cache, RNG and records
        "step_settings": None,  # the RunSettings that session started from; a change restarts the run
        "step_run_id": 0,  # counts the runs started in this session: the browser drops a run's frames when it changes
        "step_view": 0,  # the recorded step on screen as the server knows it (0 = prefill)
        "step_nonce": 0,  # bumps when the server moves the shown step (a step, Reset, a link); scrubbing never does
        "step_autoplay": None,  # bumps when Play computed the rest of the run: the browser animates from the shown step
        "step_ack": 0,  # id of the last browser action applied (the browser waits for it before sending queued clicks)
        "step_pending": [],  # actions from the browser (or a test) to apply before drawing: {"do": "next", ...}
        "step_tab": "main",  # the view's open tab; the arithmetic is computed and shipped only while "arith" is open
        "step_arith": {},  # {(run id, layer, head): [HeadArithmetic per step]} for the arithmetic tab
        "step_runs": 0,  # how often the views ran on the server (a browser test checks Play causes none)
        "step_link_read": False,  # this session read its URL's parameters (once, on its first run)
        "step_link_step": None,  # the step a link asked to show, until the run has reached it
        "step_notices": [],  # [(kind, text)] shown in the view's status line until the next action
        "step_error": None,  # the last InputError of a step, shown until the next successful one
        # -- Bug lab -------------------------------------------------------------------------------
        "lab_settings": None,  # the LabSettings the shown diagnosis was made from
        "lab_diag": None,  # the kvviz.variants.diagnose.Diagnosis on screen
        "lab_clean": None,  # (key, Run): the exact run, reused while only the variant or its scope changes
        "lab_view": 0,  # the shown step (0 = prefill)
        "lab_playing": False,
        "lab_last_tick": 0.0,
        "lab_error": None,  # the last input error, shown until the next good run
        "lab_mystery": None,  # the hidden bug's name in Mystery mode
        "lab_guess_result": None,  # (guess, correct) after a guess, until the next mystery
        "lab_score": {"right": 0, "played": 0},
        "lab_rng": None,  # this session's random.Random for picking mysteries
        # -- Cache vs recompute ----------------------------------------------------------------------
        "cost_sweep": None,  # the last CostSweep measured in this session
        "cost_throughput": None,  # the last Throughput measured
        "cost_error": None,
        # -- Paged & shared prefix ---------------------------------------------------------------------
        "paged_results": None,  # {"before" | "after": SimResult} of the last simulation
        "paged_figures": None,  # the figures built from them (built once per simulation, not per rerun)
        "paged_key": None,  # the settings those results came from
        "paged_linked": None,  # the ?scenario= a link opened once (the picker is free afterwards)
        # -- Serving: reuse, speculate, beam -----------------------------------------------------------
        "serve_store": None,  # this visitor's kvviz.serving.reuse.PrefixStore: rows of its own requests only
        "serve_store_key": None,  # (model name, block size) the store's rows belong to; a change starts a new store
        "serve_chat": None,  # this visitor's Conversation: the cache its chat turns continue from
        "serve_chat_model": None,  # the model that conversation's cache belongs to
        "serve_spec": None,  # the last SpecRun (speculative decoding) on screen
        "serve_spec_key": None,  # (model, prompt, steps, k, n-gram) it ran with
        "serve_beam": None,  # the last BeamRun on screen
        "serve_beam_key": None,  # (model, prompt, beams, steps) it ran with
        # -- Check yourself ----------------------------------------------------------------------------
        "quiz_seed": None,  # this session's shuffle seed, drawn on the first visit (questions and options)
        "quiz_pos": 0,  # the question on screen: an index into this session's shuffled order
        "quiz_answers": {},  # question id -> kvviz.quiz.questions.Answer: the score is counted from these
        "quiz_model": None,  # the model the answers were given on; another model starts the quiz over
        "quiz_error": None,  # (question id, why the last response could not be graded)
        "quiz_note": None,  # why the quiz started over, shown once
    }


def init() -> None:
    """Give every missing key its initial value (each page does it through `kit.page`)."""
    for key, value in _defaults().items():
        if key not in st.session_state:
            st.session_state[key] = value

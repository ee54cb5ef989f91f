"""Every `st.session_state` key kvviz uses, with its initial value: one place, so pages agree.

Everything per browser session lives here (never in module globals): the shared model is read
only, and what one visitor records must never reach another. Widget keys (sliders, inputs) are
owned by their widgets and not listed; these are the keys pages read and write themselves.
"""

from __future__ import annotations

import os
from typing import Any

import streamlit as st

from kvviz.engine.models import BUNDLED


def _defaults() -> dict[str, Any]:
    return {
        # -- shared: the sidebar's model ---------------------------------------------------------
        # the last model that loaded; KVVIZ_DEFAULT_MODEL picks the first (deployments, tests)
        "model_name": os.environ.get("KVVIZ_DEFAULT_MODEL", "").strip() or BUNDLED,
        "model_error": None,  # message of the last failed load, shown once
        # -- Step through --------------------------------------------------------------------------
        "step_session": None,  # this browser session's kvviz.Session: its own cache, RNG and records
        "step_settings": None,  # the RunSettings that session started from; a change restarts the run
        "step_view": 0,  # the recorded step on screen (0 = prefill); scrubbing never recomputes
        "step_playing": False,
        "step_seconds": 0.5,  # Play speed; a plain key, as the timer is set before the speed widget exists
        "step_last_tick": 0.0,  # when Play last advanced (monotonic seconds)
        "step_note": None,  # why the run restarted, shown once
        "step_error": None,  # the last InputError of a step, shown until the next successful one
        # -- Bug lab -------------------------------------------------------------------------------
        "lab_settings": None,  # the LabSettings the shown diagnosis was made from
        "lab_diag": None,  # the kvviz.variants.diagnose.Diagnosis on screen
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
        "paged_results": None,  # {strategy: SimResult} of the last run
        "paged_key": None,  # the settings those results came from
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

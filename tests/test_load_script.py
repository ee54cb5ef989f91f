"""scripts/load_test.py (issue 17's classroom measurement) still runs: two sessions, one click each.

The numbers it prints are a measurement for the README, not asserted here; what is asserted is
what must hold on any machine: every click lands and no session's tokens differ from a solo run.
"""

from __future__ import annotations

import json


def test_two_sessions_step_together_and_match_their_solo_runs(chromium, capsys):
    from scripts import load_test

    assert load_test.main(["--sessions", "2", "--clicks", "1"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["sessions_differing_from_solo"] == [] and out["click_to_K_ms"]["max"] > 0
    assert out["server_rss_mib"]["after"] > 0

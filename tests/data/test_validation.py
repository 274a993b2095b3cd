"""The datalist check's memo: a case that passed is remembered by content; a damaged entry is reported
and the case checked again."""

from __future__ import annotations

import logging

from pipeline.data.datalist import load_datalist
from pipeline.data.phantom.build import make_cohort
from pipeline.data.validation import content_errors


def test_damaged_memo_entries_are_reported_and_the_cases_checked_again(tmp_path, caplog, monkeypatch) -> None:
    import pipeline.data.validation as validation

    cases = load_datalist(make_cohort(tmp_path / "cohort", cases=3, seed=0, spacing=6.0, space="atlas").datalist).cases
    memo = tmp_path / "checked"
    assert content_errors(cases, memo) == []
    entries = sorted(memo.iterdir())
    assert len(entries) == 3 and all(p.read_text(encoding="utf-8") == f"passed {p.name}\n" for p in entries)
    entries[0].write_text(entries[0].read_text(encoding="utf-8")[:5])  # cut short
    entries[1].write_text("passed 0000\n", encoding="utf-8")  # changed
    checked: list[str] = []
    real = validation.case_errors
    monkeypatch.setattr(validation, "case_errors", lambda case, seq=None: checked.append(case.id) or real(case, seq))
    with caplog.at_level(logging.WARNING, logger="pipeline.data.validation"):
        assert content_errors(cases, memo) == []
    assert len(checked) == 2  # the damaged two, not the whole one
    warned = [r.getMessage() for r in caplog.records if "is corrupt" in r.getMessage()]
    assert len(warned) == 2 and all("checked again" in w for w in warned)
    assert all(p.read_text(encoding="utf-8") == f"passed {p.name}\n" for p in entries)  # rewritten

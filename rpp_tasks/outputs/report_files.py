"""The report's table of every input file of the session and what became of it.

One row per file of ``session_summary.json``'s ``files``
(`~rpp_tasks.session.summary.FileOutcome`): the file name, its kind, its outcome (reduced,
calibration used, calibration rejected, not used, rejected, failed, ignored) and the reason with
the stage that decided it. Problems first, then the rest by name; more than `OPEN_ROWS` rows are
folded in a ``<details>`` element (the counts stay visible).
"""

from __future__ import annotations

import html
from collections import Counter

__all__ = ["files_table_html", "OUTCOME_ORDER"]

#: Outcomes in the order the table lists them (problems first).
OUTCOME_ORDER = (
    "failed",
    "rejected",
    "calibration rejected",
    "pending",
    "not used",
    "ignored",
    "reduced",
    "calibration used",
)
_GOOD = {"reduced": "ok", "calibration used": "ok", "not used": "na", "ignored": "na"}
OPEN_ROWS = 60


def _esc(value) -> str:
    return html.escape("" if value is None else str(value), quote=True)


def _name(path: str, raw_dir: str | None) -> str:
    p = str(path)
    if raw_dir and p.startswith(raw_dir.rstrip("/") + "/"):
        return p[len(raw_dir.rstrip("/")) + 1 :]
    return p.replace("\\", "/").rsplit("/", 1)[-1]


def files_table_html(summary) -> str:
    """HTML (a count line and a table) of every file of ``summary`` (a `SessionSummary`)."""
    files = list(summary.files or ())
    if not files:
        return "<p class='na'>No input file recorded for this session.</p>"
    rank = {o: i for i, o in enumerate(OUTCOME_ORDER)}
    files.sort(key=lambda f: (rank.get(f.outcome, 0), _name(f.path, summary.raw_dir)))
    counts = Counter(f.outcome for f in files)
    count_txt = ", ".join(
        f"{counts[o]} {o}"
        for o in (*OUTCOME_ORDER, *sorted(set(counts) - set(OUTCOME_ORDER)))
        if counts.get(o)
    )
    rows = []
    for f in files:
        cls = _GOOD.get(f.outcome, "bad")
        why = f.reason or ""
        if why and f.stage:
            why = f"{f.stage}: {why}"
        rows.append(
            f"<tr class='{'' if cls != 'bad' else 'rejected'}'>"
            f"<td><code>{_esc(_name(f.path, summary.raw_dir))}</code></td>"
            f"<td>{_esc(f.kind)}</td><td><span class='pill {cls}'>{_esc(f.outcome)}</span></td>"
            f"<td>{_esc(why)}</td></tr>"
        )
    table = (
        "<table class='files'><tr><th>file</th><th>kind</th><th>outcome</th><th>reason</th></tr>"
        + "".join(rows)
        + "</table>"
    )
    head = f"<p><b>{len(files)} files</b>: {_esc(count_txt)}.</p>"
    if len(files) > OPEN_ROWS:
        table = f"<details><summary>Show every file</summary>{table}</details>"
    return head + table

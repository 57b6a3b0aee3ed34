"""Statistics of a reopened log: a session that appends rows to an earlier session's log must
collect the same covariance kinds, and its statistics are merged with the saved ones at finalize,
so that the statistics describe every row of the log (docs/concepts.md, "Statistics and the
log")."""

from __future__ import annotations

import os

from logix.errors import UsageError
from logix.statistics.covariance import GRAD_PEAK, KINDS, CovarianceState
from logix.storage.format import KEY_SEP, STATE_DIR, STATISTICS_FILE
from logix.storage.session import LogSession


def check_same_kinds(session: LogSession, kinds: frozenset, statistics: CovarianceState,
                     statistics_loaded: bool) -> None:
    """Before the first step that adds rows to an earlier session's log: the statistics saved
    with those rows (loaded into `statistics` by initialize_from_log, else read at reopening)
    and the `kinds` collected now must be the same."""
    if not session.resumed_rows:
        return
    saved = statistics.state_dict() if statistics_loaded else session.resumed_state or {}
    saved_kinds = {k.split(KEY_SEP)[1] for k in saved if k.count(KEY_SEP) == 1} & set(KINDS)
    if set(kinds) != saved_kinds and not saved and not statistics_loaded and \
            not os.path.isfile(os.path.join(session.project_dir, STATE_DIR, STATISTICS_FILE)):
        raise UsageError(
            f"Project folder {session.project_dir!r} holds {session.resumed_rows} rows but no "
            f"saved statistics: the session that logged them ended before run.finalize() (a "
            f"crash?), so their covariances were never saved, and this run collects "
            f"{sorted(kinds)}. Log into a new project to have them (or re-log these examples "
            "there); to keep this log, collect no covariances (run.setup({'grad': ['log']})) "
            "and score with hessian='none' or 'lissa'.")
    if set(kinds) != saved_kinds:
        raise UsageError(
            f"Project folder {session.project_dir!r} already holds {session.resumed_rows} rows "
            f"whose saved statistics are {sorted(saved_kinds) or 'none'}, and this run collects "
            f"{sorted(kinds) or 'none'}: the statistics would no longer describe every row of "
            "the log. Collect the same covariances as the earlier session (run.setup), or log "
            "into a new project.")
    session.resumed_rows = 0


def merge_saved(session: LogSession, statistics: CovarianceState) -> None:
    """Add the earlier session's saved statistics to `statistics` (after the all-reduce, so
    every rank holds them once). What was fitted from the rows after logging (EK-FAC's
    eigenvalues: any kind but the collected covariances and their peak) is dropped, to be
    refitted over all rows."""
    if not session.resumed_state:
        return
    saved = CovarianceState()
    saved.load_state_dict(session.resumed_state)
    for state in (saved, statistics):
        for kind in {kind for _, kind in state.sums} - {*KINDS, GRAD_PEAK}:
            state.drop(kind)
    statistics.merge(saved)
    session.resumed_state = None

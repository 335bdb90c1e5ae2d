from __future__ import annotations

import multiprocessing
import os
import sqlite3
import time

import numpy as np
import pandas as pd
import pytest
from ctrl_c import CtrlCAt

from promptscope.errors import PromptscopeError
from promptscope.store import SCHEMA_VERSION, Store, workspace_dir


def test_roundtrip_chunks_figures_and_status(tmp_path):
    store = Store(tmp_path / "s.sqlite")
    sid = store.create("prompt", name="run 1", model="tiny", params={"choices": ["a", "b"]},
                       source="Is {x}?")
    store.append(sid, "rows", pd.DataFrame({"x": [1, 2], "tokens": [["a"], ["b", "c"]]}))
    store.append(sid, "rows", pd.DataFrame({"x": [3], "tokens": [["d"]]}))
    store.save_figure(sid, "main", '{"data": []}')
    store.finish(sid, "done", summary={"rows": 3})
    rec = store.get(sid)
    assert (rec.name, rec.kind, rec.model, rec.status, rec.n_rows) == ("run 1", "prompt", "tiny",
                                                                      "done", 3)
    assert rec.params == {"choices": ["a", "b"]} and rec.source == "Is {x}?"
    df = store.table(sid)
    assert df["x"].tolist() == [1, 2, 3]
    assert df["tokens"].tolist() == [["a"], ["b", "c"], ["d"]]
    assert store.figures(sid) == {"main": '{"data": []}'}


def test_wal_mode_and_schema_version(tmp_path):
    store = Store(tmp_path / "s.sqlite")
    store.create("prompt")
    conn = sqlite3.connect(tmp_path / "s.sqlite")
    assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    assert conn.execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION


def test_newer_schema_is_refused_with_a_clear_message(tmp_path):
    path = tmp_path / "s.sqlite"
    conn = sqlite3.connect(path)
    conn.execute(f"PRAGMA user_version = {SCHEMA_VERSION + 1}")
    conn.close()
    with pytest.raises(PromptscopeError, match="newer promptscope"):
        Store(path).create("prompt")


def test_list_filters_search_rename_delete(tmp_path):
    store = Store(tmp_path / "s.sqlite")
    a = store.create("prompt", name="capitals", model="m1", source="Is Paris big?")
    b = store.create("sensitivity", name="formats", model="m2")
    assert [r.id for r in store.list()] == [b, a]  # newest first
    assert [r.id for r in store.list(kind="prompt")] == [a]
    assert [r.id for r in store.list(model="m2")] == [b]
    assert [r.id for r in store.list(search="Paris")] == [a]
    assert [r.id for r in store.list(limit=1)] == [b]
    store.rename(a, "capital cities")
    assert store.get(a).name == "capital cities"
    c = store.create("prompt", name="Ärger über Café")
    assert [r.id for r in store.list(search="ärger CAFÉ")] == [c]  # case in any script
    assert store.list(search="%") == [] and store.list(search="Ärger_") == []  # no wildcards
    # A run still going in a live kernel (this one) is not deleted under it
    with pytest.raises(PromptscopeError, match="still running"):
        store.delete(b)
    store.finish(b, "done")
    store.delete(b)
    store.delete(c, force=True)
    assert [r.id for r in store.list()] == [a]
    with pytest.raises(PromptscopeError, match="No session"):
        store.get(b)


def test_mixed_type_columns_and_dicts_come_back_exactly(tmp_path):
    """Parquet has one type per column and gives dict cells every key of the column: such
    columns travel as JSON, so 1 stays 1 beside "two", and no row gains another row's keys."""
    store = Store(tmp_path / "s.sqlite")
    sid = store.create("prompt")
    store.append(sid, "rows", pd.DataFrame({"v": [1, "two", 3.5], "n": [1, 2, 3],
                                            "d": [{"a": 1}, {"b": "x"}, None],
                                            "l": [[{"a": 1}], [], [{"b": 2.5}]]}))
    store.append(sid, "rows", pd.DataFrame({"v": ["four"], "n": [4], "d": [{"a": [1, 2]}],
                                            "l": [[]]}))
    df = store.table(sid)
    assert df["v"].tolist() == [1, "two", 3.5, "four"] and df["n"].tolist() == [1, 2, 3, 4]
    assert df["d"].tolist() == [{"a": 1}, {"b": "x"}, None, {"a": [1, 2]}]
    assert df["l"].tolist() == [[{"a": 1}], [], [{"b": 2.5}], []]


def test_a_run_without_rows_keeps_its_columns(tmp_path):
    from promptscope.analyses._recorder import Recorder

    store = Store(tmp_path / "s.sqlite")
    with Recorder("prompt", store=store) as rec:
        rec.add(pd.DataFrame({"prompt": pd.Series([], dtype=object),
                              "prob": pd.Series([], dtype=float)}))
        rec.add(pd.DataFrame({"prompt": pd.Series([], dtype=object),
                              "prob": pd.Series([], dtype=float)}))
    back = store.table(rec.session_id)
    assert list(back.columns) == ["prompt", "prob"] and len(back) == 0
    assert str(back["prob"].dtype) == "float64"
    store.append(rec.session_id, "rows", pd.DataFrame({"prompt": ["a"], "prob": [0.5]}))
    assert store.table(rec.session_id).to_dict("records") == [{"prompt": "a", "prob": 0.5}]
    assert store.get(rec.session_id).n_rows == 1


def test_cells_and_params_come_back_as_they_were_saved(tmp_path):
    """Lists at any depth come back as lists (not numpy arrays), a column of empty dicts is
    saved instead of failing the run, numpy numbers in params stay numbers."""
    store = Store(tmp_path / "s.sqlite")
    sid = store.create("prompt", params={"x": np.float32(0.5), "n": np.int64(3),
                                         "v": np.arange(2)})
    df = pd.DataFrame({"nested": [[[1, 2], [3]], [[4]]], "late": [None, [1.5, 2.0]],
                       "in_dict": [{"k": [1, 2]}, {"k": [3]}], "empty": [{}, {}]})
    store.append(sid, "rows", df)
    back = store.table(sid)
    assert back["nested"].tolist() == [[[1, 2], [3]], [[4]]]
    assert back["late"].tolist() == [None, [1.5, 2.0]]
    assert back["in_dict"].tolist() == [{"k": [1, 2]}, {"k": [3]}]
    assert back["empty"].tolist() == [{}, {}]
    assert store.get(sid).params == {"x": 0.5, "n": 3, "v": [0, 1]}
    with pytest.raises(ValueError, match="duplicate column names \\['a'\\]"):
        store.append(sid, "rows", pd.DataFrame([[1, 2]], columns=["a", "a"]))


def test_a_figure_that_fails_does_not_cost_the_finished_run(tmp_path, monkeypatch, capsys):
    from promptscope.analyses._recorder import Recorder
    from promptscope.result import Result

    def broken(self):
        raise ValueError("no figure today")

    monkeypatch.setattr(Result, "figure", broken)
    store = Store(tmp_path / "s.sqlite")
    with Recorder("prompt", store=store) as rec:
        rec.add(pd.DataFrame({"x": [1]}))
    assert store.get(rec.session_id).status == "done"
    assert "figure could not be" in capsys.readouterr().err


class _FillingStore(Store):
    """A store whose disk fills up after its first chunk: SQLite's own "database or disk is
    full", from a page limit set on every connection once ``full``."""

    full = False

    def _run(self, work):
        def limited(conn):
            if self.full:
                conn.execute("PRAGMA max_page_count = 1")  # (no lower than the file's size)
            return work(conn)

        return super()._run(limited)

    def append(self, *args, **kwargs):
        super().append(*args, **kwargs)
        self.full = True


def test_a_store_that_cannot_be_written_loses_no_computed_row(tmp_path, capsys):
    """The disk fills mid-run: the error says what to do, every row computed so far is in
    ``exc.partial_result``, and the session does not stay "running"."""
    from promptscope.analyses._recorder import Recorder

    store = _FillingStore(tmp_path / "s.sqlite")
    chunk = pd.DataFrame({"text": ["x" * 20000]})  # needs pages the full disk lacks
    with pytest.raises(PromptscopeError, match="cannot be written.*PROMPTSCOPE_HOME") as info:
        with Recorder("prompt", store=store) as rec:
            rec.add(chunk)
            rec.add(chunk.assign(text="y" * 20000))
    assert len(info.value.partial_result.df) == 2
    assert store.get(rec.session_id).status == "failed" and len(store.table(rec.session_id)) == 1
    assert "could not record" in capsys.readouterr().err
    # A run that ends well but cannot be saved does not pass for saved either (here its rows
    # are, and the error says so).
    store = _FillingStore(tmp_path / "t.sqlite")
    with pytest.raises(PromptscopeError, match="all its rows are in session .* could not "
                                               "record the rest") as info:
        with Recorder("prompt", store=store) as rec:
            rec.add(chunk)
            rec.params["big"] = "z" * 20000
    assert info.value.partial_result.params["big"] and len(info.value.partial_result.df) == 1


def test_a_chunk_whose_write_was_interrupted_is_written_when_the_run_ends(tmp_path):
    from promptscope.analyses._recorder import Recorder

    class InterruptedWrite(Store):
        calls = 0

        def append(self, *args, **kwargs):
            InterruptedWrite.calls += 1
            if InterruptedWrite.calls == 2:
                raise KeyboardInterrupt  # Ctrl-C while the chunk was being written
            super().append(*args, **kwargs)

    store = InterruptedWrite(tmp_path / "s.sqlite")
    with pytest.raises(KeyboardInterrupt) as info:
        with Recorder("prompt", store=store) as rec:
            rec.add(pd.DataFrame({"i": [1]}))
            rec.add(pd.DataFrame({"i": [2]}))
    partial = info.value.partial_result
    assert partial.df["i"].tolist() == [1, 2]
    assert store.table(rec.session_id)["i"].tolist() == [1, 2]
    assert store.get(rec.session_id).n_rows == 2


def test_a_chunk_written_just_before_an_interrupt_is_not_written_twice(tmp_path):
    from promptscope.analyses._recorder import Recorder

    class CommittedThenInterrupted(Store):
        calls = 0

        def append(self, *args, **kwargs):
            super().append(*args, **kwargs)
            CommittedThenInterrupted.calls += 1
            if CommittedThenInterrupted.calls == 2:
                raise KeyboardInterrupt  # after the commit, before the recorder knew

    store = CommittedThenInterrupted(tmp_path / "s.sqlite")
    with pytest.raises(KeyboardInterrupt):
        with Recorder("prompt", store=store) as rec:
            rec.add(pd.DataFrame({"i": [1]}))
            rec.add(pd.DataFrame({"i": [2]}))
    assert store.table(rec.session_id)["i"].tolist() == [1, 2]
    assert store.get(rec.session_id).n_rows == 2


def test_an_interrupt_while_the_run_is_being_finished_does_not_leave_it_running(
        tmp_path, monkeypatch):
    from promptscope.analyses._recorder import Recorder
    from promptscope.result import Result

    def interrupted(self):
        raise KeyboardInterrupt

    monkeypatch.setattr(Result, "figure", interrupted)  # Ctrl-C while the figure is drawn
    store = Store(tmp_path / "s.sqlite")
    with pytest.raises(KeyboardInterrupt) as info:
        with Recorder("prompt", store=store) as rec:
            rec.add(pd.DataFrame({"i": [1, 2]}))
    assert store.get(rec.session_id).status == "interrupted"
    assert info.value.partial_result.df["i"].tolist() == [1, 2]
    store.delete(rec.session_id)  # not "still running"


def test_a_read_only_store_can_be_read_and_a_run_says_what_to_do(tmp_path):
    import os

    folder = tmp_path / "ws"
    store = Store(folder / "s.sqlite")
    sid = store.create("prompt", name="kept")
    store.append(sid, "rows", pd.DataFrame({"i": [1]}))
    store.finish(sid, "done")
    (folder / "s.sqlite").chmod(0o444)
    try:
        if os.access(folder / "s.sqlite", os.W_OK):
            pytest.skip("running as a user that writes read-only files (root)")
        again = Store(folder / "s.sqlite")  # a new kernel: reading needs no write
        assert [r.name for r in again.list()] == ["kept"]
        assert again.table(sid)["i"].tolist() == [1]
        with pytest.raises(PromptscopeError, match="cannot be written.*save=False"):
            again.create("prompt")
    finally:
        (folder / "s.sqlite").chmod(0o644)


def test_cells_json_cannot_write_as_they_are_are_saved(tmp_path):
    store = Store(tmp_path / "s.sqlite")
    sid = store.create("prompt", params={"by_id": {np.int64(3): 0.5}})
    df = pd.DataFrame({"d": [{np.int64(1): 0.5, (1, 2): "pair"}, {"a": pd.NA}],
                       "s": [{"x", "y"}, None]})
    store.append(sid, "rows", df)
    back = store.table(sid)
    assert back["d"].tolist() == [{"1": 0.5, "(1, 2)": "pair"}, {"a": None}]
    assert sorted(back["s"].tolist()[0]) == ["x", "y"]
    assert store.get(sid).params == {"by_id": {"3": 0.5}}


def _writer(path: str, tag: str, n: int) -> None:
    store = Store(path)
    for i in range(n):
        sid = store.create("prompt", name=f"{tag}-{i}")
        store.append(sid, "rows", pd.DataFrame({"i": [i]}))
        store.finish(sid, "done")


def test_several_processes_write_at_once(tmp_path):
    path = str(tmp_path / "s.sqlite")
    ctx = multiprocessing.get_context("spawn")
    procs = [ctx.Process(target=_writer, args=(path, tag, 25)) for tag in ("a", "b", "c")]
    for p in procs:
        p.start()
    for p in procs:
        p.join(60)
        assert p.exitcode == 0
    records = Store(path).list()
    assert len(records) == 75 and all(r.status == "done" and r.n_rows == 1 for r in records)


def test_workspace_dir_walks_up_like_git(tmp_path, monkeypatch):
    monkeypatch.delenv("PROMPTSCOPE_HOME")
    (tmp_path / ".promptscope").mkdir()
    deep = tmp_path / "a" / "b"
    deep.mkdir(parents=True)
    assert workspace_dir(deep) == tmp_path / ".promptscope"
    other = tmp_path.parent / (tmp_path.name + "-other")
    other.mkdir()
    assert workspace_dir(other) == other / ".promptscope"
    monkeypatch.setenv("PROMPTSCOPE_HOME", str(tmp_path / "home"))
    assert workspace_dir(deep) == tmp_path / "home"


def test_workspace_dir_stops_at_ceiling_folders(tmp_path, monkeypatch):
    import tempfile

    monkeypatch.delenv("PROMPTSCOPE_HOME")
    (tmp_path / ".promptscope").mkdir()
    deep = tmp_path / "a" / "b"
    deep.mkdir(parents=True)
    monkeypatch.setenv("PROMPTSCOPE_CEILING_DIRS", str(tmp_path / "a"))
    assert workspace_dir(deep) == deep / ".promptscope"  # the ceiling is not looked into
    assert workspace_dir(tmp_path / "a") == tmp_path / "a" / ".promptscope"  # nor above it
    monkeypatch.delenv("PROMPTSCOPE_CEILING_DIRS")
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))  # tmp_path is now "the temp folder"
    assert workspace_dir(deep) == deep / ".promptscope"
    assert workspace_dir(tmp_path) == tmp_path / ".promptscope"  # started there: still found


def _run_and_die(path: str) -> None:
    """A 'kernel' that starts a run, saves a chunk and dies without finishing it."""
    store = Store(path)
    sid = store.create("prompt", name="dies")
    store.append(sid, "rows", pd.DataFrame({"x": [1, 2]}))
    import os

    os._exit(0)


def test_a_run_whose_process_died_shows_as_interrupted_and_keeps_rows(tmp_path):
    path = str(tmp_path / "s.sqlite")
    proc = multiprocessing.get_context("spawn").Process(target=_run_and_die, args=(path,))
    proc.start()
    proc.join(60)
    store = Store(path)
    live = store.create("prompt", name="alive")  # this process is still running it
    by_name = {r.name: r for r in store.list()}
    assert by_name["dies"].status == "interrupted" and "kernel" in by_name["dies"].error
    assert by_name["alive"].status == "running"
    assert store.table(by_name["dies"].id)["x"].tolist() == [1, 2]
    # create() wrote the verdict, so every reader (the panel's too) sees it
    raw = sqlite3.connect(path).execute("SELECT name, status FROM sessions").fetchall()
    assert dict(raw) == {"dies": "interrupted", "alive": "running"}
    store.finish(live, "done")


def test_a_process_id_given_to_a_later_process_does_not_keep_a_dead_run_running(tmp_path):
    """A container restart hands low process ids out again: a dead kernel's session whose id
    now belongs to another process stayed "running" for good, and could not be deleted."""
    import socket

    from promptscope.store import orphaned, process_start

    me, host = os.getpid(), socket.gethostname()
    start = process_start(me)
    if not start:
        pytest.skip("this OS does not tell when a process started")
    store = Store(tmp_path / "s.sqlite")
    live = store.create("prompt", name="live")
    assert store.get(live).owner == f"{host}:{me}/{start}"
    assert not orphaned("running", f"{host}:{me}/{start}")  # this very process
    assert orphaned("running", f"{host}:{me}/{int(start) - 1}")  # an earlier one with our id
    assert not orphaned("running", f"{host}:{me}")  # an owner written before start times
    with sqlite3.connect(store.path) as conn:
        conn.execute("UPDATE sessions SET owner=?", (f"{host}:{me}/{int(start) - 1}",))
    assert store.get(live).status == "interrupted"
    store.delete(live)


def test_a_schema_1_file_is_upgraded_and_its_sessions_kept(tmp_path):
    from promptscope.store import _MIGRATIONS

    path = tmp_path / "s.sqlite"
    conn = sqlite3.connect(path)
    conn.executescript(_MIGRATIONS[0])
    conn.execute("INSERT INTO sessions (id, name, kind, status, created, updated) "
                 "VALUES ('20260101-000000-abcdef', 'old', 'prompt', 'running', 0, 0)")
    conn.execute("PRAGMA user_version = 1")
    conn.commit()
    conn.close()
    store = Store(path)
    (old,) = store.list()
    # no owner recorded, and silent since 1970: not running any more (it could not be deleted)
    assert (old.name, old.status, old.owner) == ("old", "interrupted", "")
    assert sqlite3.connect(path).execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION
    with sqlite3.connect(path) as conn:  # written a minute ago: an older kernel may run it
        conn.execute("UPDATE sessions SET updated=?", (time.time() - 60,))
    assert store.list()[0].status == "running"


def test_the_panel_reader_shows_a_dead_run_as_interrupted_without_writing(tmp_path):
    from promptscope.server.reader import StoreReader

    path = str(tmp_path / "s.sqlite")
    proc = multiprocessing.get_context("spawn").Process(target=_run_and_die, args=(path,))
    proc.start()
    proc.join(60)
    page = StoreReader(path).page()
    assert [s["status"] for s in page["sessions"]] == ["interrupted"]
    # filtered as what it is shown as
    assert StoreReader(path).page(status="interrupted")["total"] == 1
    assert StoreReader(path).page(status="running")["total"] == 0
    sid = page["sessions"][0]["id"]
    assert StoreReader(path).detail(sid)["status"] == "interrupted"
    raw = sqlite3.connect(path).execute("SELECT status FROM sessions").fetchone()[0]
    assert raw == "running"  # the reader never writes


def test_a_ctrl_c_anywhere_in_a_store_write_leaves_no_lock(tmp_path):
    """Wherever a Ctrl-C lands in an append, its transaction does not hold the store's write
    lock afterwards, even while the traceback is kept (IPython keeps the last one)."""
    path = tmp_path / "s.sqlite"
    store = Store(path)
    sid = store.create("prompt")
    df = pd.DataFrame({"x": [1, 2]})
    kept, k = [], 1
    while True:
        with CtrlCAt(k, ("promptscope/store/__init__.py", "contextlib.py"),
                     ("line", "call")) as ctrl_c:
            try:
                store.append(sid, "rows", df)
            except KeyboardInterrupt as exc:
                kept.append(exc)  # its traceback (and every frame in it) stays alive
        if not ctrl_c.fired:
            break
        other = sqlite3.connect(path, timeout=0.2)
        try:  # another kernel's write goes through at once
            other.execute("UPDATE sessions SET name=? WHERE id=?", (f"after {k}", sid))
            other.commit()
        finally:
            other.close()
        k += 1
    assert k > 20 and len(kept) == k - 1  # every point of the write was tried
    assert store.get(sid).name == f"after {k - 1}"


def test_compact_gives_the_space_of_deleted_sessions_back(tmp_path):
    """Deleting 850 k rows left a 140 MB file with 72 MB free inside it."""
    import numpy as np

    store = Store(tmp_path / "s.db")
    keep = store.create("prompt", name="keep")
    store.append(keep, "rows", pd.DataFrame({"x": [1, 2]}))
    big = store.create("prompt", name="big")
    for _ in range(4):
        store.append(big, "rows", pd.DataFrame({"x": np.random.default_rng(0).random(100_000)}))
    store.finish(big, "done")
    def size():
        return sum(os.path.getsize(p) for p in (store.path, f"{store.path}-wal")
                   if os.path.exists(p))

    full = size()
    store.delete(big)
    assert size() >= full  # SQLite keeps the pages
    freed = store.compact()
    assert freed > 2_500_000 and size() <= full - freed + 100_000
    assert store.table(keep)["x"].tolist() == [1, 2]
    assert store.compact() == 0  # nothing left to give back
    big = store.create("prompt", name="big again")
    store.append(big, "rows", pd.DataFrame({"x": np.random.default_rng(1).random(100_000)}))
    store.finish(big, "done")
    store.delete(big)
    reader = sqlite3.connect(store.path)  # another kernel in the middle of a read
    reader.execute("BEGIN")
    reader.execute("SELECT count(*) FROM sessions").fetchone()
    start = time.monotonic()
    before = size()
    with pytest.warns(UserWarning, match="reading the store: the file shrinks when the last"):
        assert store.compact() == 0
    assert time.monotonic() - start < 10  # (it waited 30 s)
    reader.close()
    assert size() < before - 500_000

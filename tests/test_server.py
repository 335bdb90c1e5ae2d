"""The jupyter_server extension behind the sessions panel, through real HTTP (pytest-jupyter).

pytest-jupyter's fixtures are imported into this module only (not registered as a plugin), so
its autouse fixtures do not touch the rest of the suite; tests here are plain functions that run
the server's coroutines on its loop.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pandas as pd
import pytest

pytest.importorskip("pytest_jupyter")
pytest.importorskip("jupyter_server")

from pytest_jupyter.jupyter_server import *  # noqa: E402,F403
from tornado.httpclient import HTTPClientError  # noqa: E402

import promptscope  # noqa: E402
from promptscope.server import PromptscopeServer, resolve_store_path  # noqa: E402
from promptscope.server.reader import StoreReader, valid_name  # noqa: E402
from promptscope.store import Store, workspace_dir  # noqa: E402

XSS = "<img src=x onerror=alert(1)>"


@pytest.fixture
def jp_server_config() -> dict[str, Any]:
    return {"ServerApp": {"jpserver_extensions": {"promptscope.server": True}}}


@pytest.fixture
def api(jp_fetch, jp_asyncio_loop):
    """``api(method, *path, **kw) -> (status, body)``; JSON bodies decoded."""

    def call(method: str, *path: str, body: Any = None, raw: bool = False, **kw: Any):
        if body is not None:
            kw["body"] = json.dumps(body)
        try:
            resp = jp_asyncio_loop.run_until_complete(
                jp_fetch("promptscope", "api", *path, method=method,
                         allow_nonstandard_methods=True, **kw))
        except HTTPClientError as err:
            resp = err.response
            return err.code, _decode(resp.body if resp is not None else b"", raw)
        return resp.code, (resp if raw else _decode(resp.body, raw))

    return call


def _decode(data: bytes, raw: bool) -> Any:
    if raw or not data:
        return data
    try:
        return json.loads(data)
    except ValueError:
        return data


def _session(store: Store, name: str, *, kind: str = "prompt", model: str = "tiny",
             source: str = "", status: str = "done", figure: bool = False,
             created: float | None = None) -> str:
    sid = store.create(kind, name=name, model=model, source=source, params={"mode": "x"})
    store.append(sid, "rows", pd.DataFrame({"prompt": [source or name], "p": [0.5]}))
    if figure:
        import plotly.graph_objects as go

        store.save_figure(sid, "main", go.Figure(go.Bar(x=["a", "b"], y=[1, 2])))
    if status != "running":
        store.finish(sid, status)
    if created is not None:  # ids sort by second; pin the order the test expects
        store._run(lambda conn: conn.execute("UPDATE sessions SET created=? WHERE id=?",
                                             (created, sid)))
    return sid


@pytest.fixture
def three(_isolated_store) -> dict[str, str]:
    store = Store.default()
    now = time.time()
    return {
        "old": _session(store, "capitals sweep", source="Is {city} in Europe?", created=now - 300),
        "mid": _session(store, "tone test", model="gpt2-tiny", kind="generate",
                        status="failed", created=now - 200),
        "new": _session(store, XSS, source=f"say {XSS}", figure=True, status="running",
                        created=now - 100),
    }


# ---------------------------------------------------------------------- list


def test_list_is_newest_first_with_filters_search_and_paging(api, three):
    code, body = api("GET", "sessions")
    assert code == 200 and body["error"] == ""
    assert [s["id"] for s in body["sessions"]] == [three["new"], three["mid"], three["old"]]
    assert body["total"] == 3
    assert body["kinds"] == ["generate", "prompt"] and body["models"] == ["gpt2-tiny", "tiny"]
    first = body["sessions"][0]
    assert first["name"] == XSS and first["status"] == "running" and first["n_rows"] == 1

    def ids(**params: str) -> list[str]:
        code, body = api("GET", "sessions", params=params)
        assert code == 200
        return [s["id"] for s in body["sessions"]]

    assert ids(kind="generate") == [three["mid"]]
    assert ids(model="tiny") == [three["new"], three["old"]]
    assert ids(status="failed") == [three["mid"]]
    assert ids(search="europe") == [three["old"]]  # prompt text, any case
    assert ids(search="GPT2") == [three["mid"]]  # model
    assert ids(search="tone test") == [three["mid"]]  # every word of a name
    assert ids(search="100%") == []  # LIKE wildcards are literal
    code, page = api("GET", "sessions", params={"limit": "2", "offset": "1"})
    assert [s["id"] for s in page["sessions"]] == [three["mid"], three["old"]]
    assert page["total"] == 3 and page["offset"] == 1 and page["max_limit"] == 500
    code, page = api("GET", "sessions", params={"offset": str(2**70)})  # past the end: empty
    assert code == 200 and page["sessions"] == [] and page["total"] == 3
    assert api("GET", "sessions", params={"limit": "x"})[0] == 400
    assert api("GET", "sessions", params={"status": "weird"})[0] == 400


def test_missing_and_corrupt_store_give_an_empty_list_with_a_message(api, _isolated_store):
    code, body = api("GET", "sessions")
    assert code == 200 and body["sessions"] == [] and body["error"] == ""
    assert not (_isolated_store / "sessions.sqlite").exists()  # listing creates nothing
    code, body = api("GET", "sessions", "20260101-000000-abcdef")  # no store: an unknown id
    assert code == 404 and "No sessions yet" in body["message"]
    _isolated_store.mkdir(parents=True, exist_ok=True)
    (_isolated_store / "sessions.sqlite").write_bytes(b"this is not sqlite" * 100)
    code, body = api("GET", "sessions")
    assert code == 200 and body["sessions"] == [] and body["total"] == 0
    assert "damaged" in body["error"] and "sessions.sqlite" in body["error"]
    code, body = api("GET", "sessions", "20260101-000000-abcdef")
    assert code == 503 and "damaged" in body["message"]


def test_store_from_a_newer_promptscope_is_refused_with_a_message(api, three):
    import sqlite3

    conn = sqlite3.connect(Store.default().path)
    conn.execute("PRAGMA user_version = 99")
    conn.close()
    code, body = api("GET", "sessions")
    assert code == 200 and body["sessions"] == [] and "newer promptscope" in body["error"]


# ---------------------------------------------------------------------- one session


def test_get_one_with_figure_and_html_kept_as_data(api, three):
    code, body = api("GET", "sessions", three["new"])
    assert code == 200
    assert body["name"] == XSS and body["source"] == f"say {XSS}"
    assert body["figures"] == ["main"] and body["tables"] == ["rows"]
    code, fig = api("GET", "sessions", three["new"], "figures", "main")
    assert code == 200 and fig["data"][0]["type"] == "bar"
    assert api("GET", "sessions", three["new"], "figures", "other")[0] == 404
    assert api("GET", "sessions", "20000101-000000-000000")[0] == 404


def test_detail_with_nan_params_is_strict_json(api, three):
    Store.default().update_params(three["old"], {"posix": float("nan"), "ok": [1.0, float("inf")]})
    code, raw = api("GET", "sessions", three["old"], raw=True)
    body = json.loads(raw.body, parse_constant=lambda c: pytest.fail(f"bare {c} in JSON"))
    assert code == 200 and body["params"] == {"posix": None, "ok": [1.0, None]}


def test_detail_of_a_real_run_has_its_summary_table(api, tiny_llama):
    run = promptscope.run_prompt("Is {city} in {{Europe|Asia}}? Answer:", tiny_llama,
                                 vars=[{"city": "Paris"}], choices=" yes| no", name="cap",
                                 progress=False)
    code, body = api("GET", "sessions", run.session_id)
    assert code == 200 and body["status"] == "done" and body["kind"] == "prompt"
    table = body["summary_table"]
    assert table["total"] == 2 and "top_choice" in table["columns"]
    assert body["params"]["choices"] == [" yes", " no"] and body["figures"] == ["main"]


@pytest.mark.parametrize("bad", ["1' OR '1'='1", "..", "a/../../etc", "<script>", "x" * 200,
                                 "a b", "%2e%2e"])
def test_bad_ids_are_refused(api, three, bad):
    for method, extra in (("GET", ()), ("DELETE", ()), ("GET", ("figures", "main")),
                          ("GET", ("export", "csv"))):
        code, _ = api(method, "sessions", bad, *extra)
        assert code in (400, 404), (method, bad, code)
    code, _ = api("PATCH", "sessions", bad, body={"name": "x"})
    assert code in (400, 404)
    code, _ = api("GET", "sessions", three["old"], "export", "csv", params={"table": "../x"})
    assert code == 400
    assert len(Store.default().list()) == 3  # nothing happened
    assert not valid_name("..") and valid_name(three["old"])


def test_rename_and_delete(api, three):
    code, body = api("PATCH", "sessions", three["old"], body={"name": "  capitals v2 "})
    assert code == 200 and body["name"] == "capitals v2"
    assert Store.default().get(three["old"]).name == "capitals v2"
    assert api("PATCH", "sessions", three["old"], body={"name": "   "})[0] == 400
    assert api("PATCH", "sessions", three["old"], body={"name": 3})[0] == 400
    assert api("PATCH", "sessions", three["old"], body={"name": "x" * 201})[0] == 400
    assert api("PATCH", "sessions", "20000101-000000-000000", body={"name": "x"})[0] == 404
    code, body = api("DELETE", "sessions", three["new"])  # its kernel (this test) is alive
    assert code == 409 and "still running" in body["message"]
    code, _ = api("DELETE", "sessions", three["mid"])
    assert code == 204
    assert [r.id for r in Store.default().list()] == [three["new"], three["old"]]
    assert api("DELETE", "sessions", three["mid"])[0] == 404


def test_exports_csv_and_standalone_html(api, three):
    code, resp = api("GET", "sessions", three["new"], "export", "csv", raw=True)
    assert code == 200 and resp.headers["Content-Type"].startswith("text/csv")
    assert f'filename="{three["new"]}-rows.csv"' in resp.headers["Content-Disposition"]
    assert resp.body.decode().splitlines()[0] == "prompt,p"
    assert api("GET", "sessions", three["new"], "export", "csv",
               params={"table": "nope"})[0] == 404
    code, resp = api("GET", "sessions", three["new"], "export", "html", raw=True)
    html = resp.body.decode()
    assert code == 200 and resp.headers["Content-Type"].startswith("text/html")
    assert XSS not in html and "&lt;img src=x onerror=alert(1)&gt;" in html
    # plotly.js inline: no script is fetched from anywhere
    assert "Plotly.newPlot" in html and 'src="http' not in html and "src='http" not in html
    assert len(html) > 1_000_000
    assert api("GET", "sessions", three["new"], "export", "pdf")[0] == 404


# ---------------------------------------------------------------------- auth


def test_requests_without_the_token_are_refused(api, three):
    for method, path in (("GET", ("sessions",)), ("GET", ("sessions", three["old"])),
                         ("DELETE", ("sessions", three["old"])),
                         ("GET", ("sessions", three["old"], "export", "html"))):
        for auth in ("", "token wrong-token"):
            code, _ = api(method, *path, headers={"Authorization": auth})
            assert code in (401, 403), (method, path, auth, code)
    code, _ = api("PATCH", "sessions", three["old"], body={"name": "pwned"},
                  headers={"Authorization": ""})
    assert code in (401, 403)
    assert len(Store.default().list()) == 3
    assert Store.default().get(three["old"]).name == "capitals sweep"


# ---------------------------------------------------------------------- concurrency

WRITER = r"""
import sqlite3, sys
import pandas as pd
from promptscope.store import Store

store = Store(sys.argv[1])
sid = store.create("prompt", name="streaming", model="tiny")
store.append(sid, "rows", pd.DataFrame({"x": [1, 2]}))
print(sid, flush=True)
# Hold a write transaction open, as a kernel does while it appends a large chunk.
conn = sqlite3.connect(sys.argv[1], timeout=30)
conn.execute("BEGIN IMMEDIATE")
conn.execute("UPDATE sessions SET n_rows = 999, status = 'done' WHERE id = ?", (sid,))
print("locked", flush=True)
sys.stdin.readline()
conn.rollback()
store.append(sid, "rows", pd.DataFrame({"x": [3]}))
store.finish(sid, "done")
print("finished", flush=True)
"""


def test_listing_while_another_process_writes(api, _isolated_store):
    path = Store.default().path
    Store.default().list()  # make the file, so the writer and server share it from the start
    _session(Store.default(), "earlier")
    proc = subprocess.Popen([sys.executable, "-c", WRITER, str(path)], stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, text=True)
    try:
        sid = proc.stdout.readline().strip()
        assert proc.stdout.readline().strip() == "locked"
        start = time.perf_counter()
        code, body = api("GET", "sessions")
        detail_code, detail = api("GET", "sessions", sid)
        elapsed = time.perf_counter() - start
        # The writer's open transaction neither blocks the server nor leaks into what it sees.
        assert elapsed < 5
        assert code == 200 and detail_code == 200
        row = next(s for s in body["sessions"] if s["id"] == sid)
        assert row["status"] == "running" and row["n_rows"] == 2
        assert detail["status"] == "running"
        proc.stdin.write("go\n")
        proc.stdin.flush()
        assert proc.stdout.readline().strip() == "finished"
    finally:
        proc.kill() if proc.poll() is None else None
        proc.wait(timeout=30)
    code, body = api("GET", "sessions", sid)
    assert body["status"] == "done" and body["n_rows"] == 3


# ---------------------------------------------------------------------- where the store is


def test_kernels_in_sub_folders_find_the_servers_store(tmp_path, monkeypatch):
    monkeypatch.delenv("PROMPTSCOPE_HOME", raising=False)
    root = tmp_path / "root"
    deep = root / "projects" / "week1"
    deep.mkdir(parents=True)
    path = resolve_store_path(root, PromptscopeServer())
    assert path == root / ".promptscope" / "sessions.sqlite" and path.parent.is_dir()
    # A "kernel" started in a sub-folder: its default store is the server's.
    code = ("from promptscope.store import Store; s = Store.default(); "
            "print(s.create('prompt', name='from deep')); print(s.path)")
    env = {k: v for k, v in os.environ.items() if k != "PROMPTSCOPE_HOME"}
    out = subprocess.run([sys.executable, "-c", code], cwd=deep, env=env, check=True,
                         capture_output=True, text=True).stdout.split()
    assert Path(out[1]).resolve() == path.resolve()
    assert [s["id"] for s in StoreReader(path).page()["sessions"]] == [out[0]]
    # An existing workspace above the root is used as it is; PROMPTSCOPE_HOME wins over both.
    assert resolve_store_path(deep, PromptscopeServer()) == path
    monkeypatch.setenv("PROMPTSCOPE_HOME", str(tmp_path / "home"))
    assert resolve_store_path(root, PromptscopeServer()) == tmp_path / "home" / "sessions.sqlite"
    assert workspace_dir(deep) == tmp_path / "home"
    custom = PromptscopeServer(store_path=str(tmp_path / "x.sqlite"))
    assert resolve_store_path(root, custom) == tmp_path / "x.sqlite"


def test_server_extension_is_enabled_by_the_installed_config():
    out = subprocess.run([sys.executable, "-m", "jupyter_server.extension.serverextension",
                          "list"], capture_output=True, text=True, timeout=120)
    text = out.stdout + out.stderr
    assert "promptscope.server" in text and "enabled" in text, text


# ---------------------------------------------------------------------- odd stores and cells


def test_odd_cells_export_as_json_and_a_bad_summary_is_a_message(api, _isolated_store):
    store = Store.default()
    sid = store.create("prompt", name="odd cells", params={"mode": "x"})
    store.append(sid, "rows", pd.DataFrame({"meta": [{"a": "é"}, {"b": 1}],
                                            "toks": [["a", "b"], []], "raw": [b"\xff\xfe", b"ok"]}))
    store.finish(sid, "done")
    code, resp = api("GET", "sessions", sid, "export", "csv", raw=True)
    lines = resp.body.decode().splitlines()
    assert code == 200 and lines[1] == '"{""a"": ""é""}","[""a"", ""b""]",\ufffd\ufffd'
    code, body = api("GET", "sessions", sid)  # bytes no JSON can hold: said, not a 500
    assert code == 200 and body["summary_error"].startswith("UnicodeDecodeError")
    assert api("PATCH", "sessions", sid, body={"name": "\ud800"})[0] == 400


def test_a_foreign_or_old_store_is_a_message_and_old_runs_are_not_running(api, _isolated_store):
    import sqlite3

    _isolated_store.mkdir(parents=True, exist_ok=True)
    path = _isolated_store / "sessions.sqlite"
    with sqlite3.connect(path) as conn:  # another program's database, schema-1 numbered
        conn.executescript("CREATE TABLE t(x); PRAGMA user_version=1;")
    code, body = api("GET", "sessions")
    assert code == 200 and body["sessions"] == [] and "could not be upgraded" in body["error"]
    path.unlink()
    from promptscope.store import _MIGRATIONS

    with sqlite3.connect(path) as conn:  # a schema-1 store whose run never finished
        conn.executescript(_MIGRATIONS[0] + "PRAGMA user_version=1;")
        conn.execute("INSERT INTO sessions (id, name, kind, created, updated) VALUES "
                     "('20250101-000000-aaaaaa', 'old run', 'prompt', 1, 1)")
    code, body = api("GET", "sessions")
    assert [s["status"] for s in body["sessions"]] == ["interrupted"]
    assert api("DELETE", "sessions", "20250101-000000-aaaaaa")[0] == 204


def test_search_matches_wildcards_literally(_isolated_store):
    store = Store.default()
    for name in ("dead_one", "deadXone", "100% done"):
        store.finish(store.create("prompt", name=name), "done")
    assert [r.name for r in store.list(search="d_ad")] == []
    assert [r.name for r in store.list(search="dead_")] == ["dead_one"]
    assert [r.name for r in store.list(search="100%")] == ["100% done"]


def test_summaries_are_computed_once_per_change_and_reports_capped(_isolated_store,
                                                                   monkeypatch):
    """A 500 k-row session took 6 s to summarise on every request, and the panel asks again
    after each chunk a running session writes; its HTML report held every summary row (97 MB)."""
    from promptscope.server import reader as reader_module
    from promptscope.server.reader import session_html

    store = Store.default()
    done, running = _session(store, "done"), _session(store, "running", status="running")
    calls: list[str] = []

    def summary_frame(self, session_id):
        calls.append(session_id)
        return pd.DataFrame({"row": range(1500)})

    monkeypatch.setattr(StoreReader, "summary_frame", summary_frame)
    reader = StoreReader(store.path)
    first = reader.detail(done)["summary_table"]
    assert first["total"] == 1500 and len(first["rows"]) == 200
    assert reader.detail(done)["summary_table"] == first and calls == [done]  # kept
    store.rename(done, "renamed")  # the session changed: summarised again
    reader.detail(done)
    assert calls == [done, done]
    reader.detail(running)
    kept = reader_module._SUMMARIES[(str(store.path), running)]
    store.append(running, "rows", pd.DataFrame({"prompt": ["more"], "p": [0.1]}))
    kept.cost = 60.0  # a running session is summarised again only every 5 x its cost
    reader.detail(running)
    assert calls == [done, done, running]
    kept.cost = 0.0
    reader.detail(running)
    assert calls == [done, done, running, running]
    html = session_html(reader, done)
    assert "The first 1,000 of 1,500 rows; the CSV export has every row." in html
    assert html.count("<td>") == 1000  # one cell in each of the first 1,000 rows


def test_the_panel_is_found_where_a_wheel_or_an_editable_install_puts_it(tmp_path, monkeypatch):
    """A wheel installs the panel under share/jupyter/labextensions only: the server logged
    "not built, install Node.js" for every wheel install."""
    import jupyter_core.paths

    import promptscope.server as server

    shared, package = tmp_path / "share", tmp_path / "pkg" / "promptscope" / "server"
    package.mkdir(parents=True)
    monkeypatch.setattr(server, "__file__", str(package / "__init__.py"))
    monkeypatch.setattr(jupyter_core.paths, "jupyter_path", lambda *parts: [str(shared)])
    assert not server._panel_installed()  # a clone installed without Node.js
    (shared / "promptscope").mkdir(parents=True)
    (shared / "promptscope" / "package.json").write_text("{}")
    assert server._panel_installed()  # a wheel
    (shared / "promptscope" / "package.json").unlink()
    (tmp_path / "pkg" / "promptscope" / "labextension").mkdir()
    (tmp_path / "pkg" / "promptscope" / "labextension" / "package.json").write_text("{}")
    assert server._panel_installed()  # an editable install with Node.js

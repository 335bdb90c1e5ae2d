"""The Jupyter server extension behind promptscope's JupyterLab sessions panel.

Installing promptscope enables it (``jupyter-config/server-config/promptscope.json`` goes to
``etc/jupyter/jupyter_server_config.d``); ``jupyter server extension list`` shows it. It serves
``/promptscope/api/...`` (see :mod:`promptscope.server.handlers`).

Which store the panel shows (the server and the kernels must agree):

1. ``c.PromptscopeServer.store_path`` (a ``sessions.sqlite`` file), when configured;
2. ``$PROMPTSCOPE_HOME/sessions.sqlite`` when the server's environment sets it (local kernels
   inherit the server's environment, so they write there too);
3. otherwise the workspace of the server's ``root_dir``: the nearest ``.promptscope/`` from the
   root upwards. When there is none, the extension creates ``<root_dir>/.promptscope/`` at start,
   so that a kernel started in any sub-folder finds it by walking up (the store's lookup rule)
   instead of starting a private store in its own folder.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from traitlets import Bool, Unicode
from traitlets.config import Configurable

from promptscope.store import workspace_dir


class PromptscopeServer(Configurable):
    """Settings of the promptscope server extension (``c.PromptscopeServer.*``)."""

    store_path = Unicode(
        "", config=True,
        help="The sessions.sqlite file the panel shows. Default: the workspace of root_dir "
             "($PROMPTSCOPE_HOME, else the nearest .promptscope/ from root_dir up).")
    create_workspace = Bool(
        True, config=True,
        help="Create <root_dir>/.promptscope/ at start when no workspace exists, so kernels "
             "started in sub-folders save into the store the panel shows.")


def _jupyter_server_extension_points() -> list[dict[str, str]]:
    return [{"module": "promptscope.server"}]


def resolve_store_path(root_dir: str | os.PathLike, settings: PromptscopeServer) -> Path:
    """The store file for a server rooted at ``root_dir`` (see the module docstring)."""
    if settings.store_path:
        return Path(settings.store_path).expanduser()
    folder = workspace_dir(root_dir)
    if settings.create_workspace and not os.environ.get("PROMPTSCOPE_HOME"):
        try:
            folder.mkdir(parents=True, exist_ok=True)
        except OSError:  # a read-only root: the panel shows an empty store, which is right
            pass
    return folder / "sessions.sqlite"


def _load_jupyter_server_extension(serverapp: Any) -> None:
    """Register the handlers and tell the log where the store is."""
    from promptscope.server.handlers import handlers

    settings = PromptscopeServer(parent=serverapp)
    path = resolve_store_path(serverapp.root_dir, settings)
    web_app = serverapp.web_app
    web_app.settings["promptscope_store_path"] = path
    web_app.add_handlers(".*$", handlers(web_app.settings["base_url"]))
    serverapp.log.info("promptscope: sessions panel serving %s", path)
    if not _panel_installed():
        # An editable install from a clone without Node.js: pip shows the build's warning
        # only with -v, so say it where the missing panel would be looked for.
        serverapp.log.warning(
            "promptscope: the JupyterLab sessions panel is not built, so the sidebar has no "
            "promptscope icon: install Node.js (>= 20) and run pip install -e . again (a wheel "
            "needs no Node.js).")


def _panel_installed() -> bool:
    """Whether JupyterLab finds the built panel: in one of its labextension folders (a wheel
    puts it there), or in the package (an editable install links it from there)."""
    from jupyter_core.paths import jupyter_path

    places = [Path(p) / "promptscope" for p in jupyter_path("labextensions")]
    places.append(Path(__file__).parent.parent / "labextension")
    return any((place / "package.json").exists() for place in places)


# jupyter_server < 2 looked for the unprefixed name.
load_jupyter_server_extension = _load_jupyter_server_extension

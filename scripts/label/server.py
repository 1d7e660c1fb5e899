# Copyright (c) MambaClinix bundle contributors. Licensed under the Apache License, Version 2.0.
"""Start MONAI Label 0.8.5 with the request guard and a closed CORS policy, offline, on loopback by default::

    python -m scripts.label.server --app .monailabel/app --studies ~/mambaclinix-studies --port 8000 \
        --conf models mambaclinix
    python -m scripts.label.server ... --cors_origins http://localhost:3000   # a viewer served elsewhere

It takes ``monailabel start_server``'s arguments (``--app``, ``--studies``, ``--host``, ``--port``,
``--conf KEY VALUE``; the offline ``--conf zoo_source github --conf sam2 false`` are always added, the host
defaults to loopback) plus ``--cors_origins``, ``--allowed_hosts`` and ``--bundle``. Run it from the bundle root
(``scripts`` must be importable) with the MONAI Label environment's Python.

Why this launcher: ``monailabel start_server`` ends with ``uvicorn.run(args.uvicorn_app, ...)`` on
``monailabel.app:app``, whose CORS policy allows every origin (with credentials) unless
``MONAI_LABEL_CORS_ORIGINS`` is set, and whose routes turn ids into paths unchecked (see
:mod:`scripts.label.guard`). Here MONAI Label's own ``monailabel.main.Main`` parses the same ``start_server``
arguments and runs its own ``action_start_server`` (settings, environment, app folders, logging, uvicorn), so
nothing of it is re-implemented; the one change is that ``uvicorn_app`` is MONAI Label's app *object* after
:func:`scripts.label.guard.install_guard` has put the guard in front of it and replaced its CORS middleware.
The guard is therefore in place before uvicorn accepts the first connection, whatever ``.env`` or environment
the server sees. (Passing ``--uvicorn_app module:attr`` instead would need the options in environment
variables and a second import of ``scripts`` inside uvicorn, which MONAI Label unloads when it loads a bundle.)

Before starting it refuses a layout in which the datastore could reach what the server runs: the studies
folder inside the app folder, the bundle or a folder the served model links to, or the other way round.
"""

from __future__ import annotations

import argparse
import ipaddress
import logging
import os
import sys
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

from scripts.label.app import DEFAULT_NAME, OFFLINE_CONF, check_name
from scripts.label.guard import LOOPBACK_HOSTS, install_guard

__all__ = ["protected_folders", "check_layout", "default_allowed_hosts", "guarded_app", "serve", "main"]

logger = logging.getLogger(__name__)

#: folders of the served model that link to the bundle's (see :func:`scripts.label.app.prepare_app`); its
#: ``scripts/`` is a folder of links into the bundle's ``scripts/``, which lies inside the bundle root.
LINKED = ("models", "data")


def protected_folders(app_dir: str | os.PathLike, name: str = DEFAULT_NAME,
                      bundle: str | os.PathLike | None = None) -> list[Path]:
    """The folders a datastore must stay out of: the app, the served models and, resolved, what they link to.

    Args:
        app_dir: the MONAI Label app folder.
        name: the served model's name (``<app_dir>/model/<name>``); several separated by commas, as MONAI Label's
            ``--conf models`` takes them.
        bundle: the bundle root; by default the folder holding a served model's ``models`` link target.
    """
    app_dir = Path(app_dir).resolve()
    folders = [app_dir]
    for one in filter(None, (n.strip() for n in name.split(","))):
        served = app_dir / "model" / one
        folders.append(served.resolve())
        for sub in LINKED:
            if (served / sub).exists():
                folders.append((served / sub).resolve())
        if bundle is None and (served / "models").is_symlink():
            folders.append((served / "models").resolve().parent)
    if bundle is not None:
        folders.append(Path(bundle).resolve())
    return list(dict.fromkeys(folders))


def _nested(a: Path, b: Path) -> bool:
    return a == b or a.is_relative_to(b) or b.is_relative_to(a)


def check_layout(app_dir: str | os.PathLike, studies: str | os.PathLike, name: str = DEFAULT_NAME,
                 bundle: str | os.PathLike | None = None) -> None:
    """Refuse a studies folder nested with the app, the served model, the bundle or their linked folders.

    Raises:
        ValueError: the folders are nested (either way), with the folder to move.
    """
    if str(studies).startswith(("http://", "https://")):
        return  # a DICOMweb datastore keeps no files of its own here
    studies = Path(studies).expanduser().resolve()
    for folder in protected_folders(app_dir, name, bundle):
        if _nested(studies, folder):
            raise ValueError(f"the studies folder {studies} and {folder} are nested: MONAI Label writes uploads "
                             "into the studies folder, so keep it apart from the app and the bundle (e.g. "
                             "STUDIES=$HOME/mambaclinix-studies).")


def default_allowed_hosts(host: str, extra: Iterable[str] = ()) -> list[str] | None:
    """``Host`` names to accept: loopback names for a loopback bind, the bind address otherwise, plus ``extra``.

    ``None`` (any host) for a wildcard bind (``0.0.0.0``, ``::``) without ``extra``.
    """
    extra = list(extra)
    try:
        address = ipaddress.ip_address(host)
    except ValueError:
        address = None
    if host == "localhost" or (address is not None and address.is_loopback):
        return list(LOOPBACK_HOSTS) + extra
    if address is not None and address.is_unspecified:
        return extra or None
    return [host] + extra


def guarded_app(cors_origins: Sequence[str] = (), allowed_hosts: Iterable[str] | None = LOOPBACK_HOSTS) -> Any:
    """MONAI Label's ``monailabel.app.app`` with :func:`~scripts.label.guard.install_guard` applied."""
    import monailabel.app

    return install_guard(monailabel.app.app, cors_origins=cors_origins, allowed_hosts=allowed_hosts)


def serve(app_dir: str | os.PathLike, studies: str | os.PathLike, name: str = DEFAULT_NAME,
          host: str = "127.0.0.1", port: int = 8000, conf: Sequence[tuple[str, str]] = (),
          cors_origins: Sequence[str] = (), allowed_hosts: Sequence[str] | None = None,
          bundle: str | os.PathLike | None = None) -> None:
    """Check the layout, guard MONAI Label's app and run MONAI Label's ``start_server`` with it (blocks).

    Args:
        app_dir: the app folder made by ``python -m scripts.label.app prepare``.
        studies: the datastore folder (created when missing).
        name: the served model.
        host: bind address; loopback by default.
        port: TCP port.
        conf: extra ``--conf`` pairs after ``models`` and the offline ones.
        cors_origins: browser origins allowed to call the API (none by default).
        allowed_hosts: extra ``Host`` names to accept (see :func:`default_allowed_hosts`).
        bundle: the bundle root, when the served model does not link to it.

    Raises:
        ValueError: a nested layout, a bad model name or a bad origin.
    """
    for one in name.split(","):
        check_name(one.strip())
    check_layout(app_dir, studies, name, bundle)
    from monailabel.config import settings
    from monailabel.main import Main

    hosts = default_allowed_hosts(host, allowed_hosts or ())
    if host not in ("127.0.0.1", "localhost", "::1") and not settings.MONAI_LABEL_AUTH_ENABLE:
        logger.warning("serving on %s without authentication: anyone who reaches it can upload, label and train; "
                       "see docs/monailabel.md (MONAI_LABEL_AUTH_ENABLE)", host)
    app = guarded_app(cors_origins, hosts)
    argv = ["start_server", "--app", str(Path(app_dir).absolute()), "--studies", str(studies), "--host", host,
            "--port", str(int(port)), "--conf", "models", name]
    for k, v in tuple(OFFLINE_CONF) + tuple(conf):
        argv += ["--conf", k, v]
    ml = Main(actions="start_server")
    args = ml.args_parser().parse_args(argv)
    args.uvicorn_app = app
    logger.info("starting MONAI Label (guarded): %s", " ".join(argv))
    ml.action_start_server(args)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m scripts.label.server", description=__doc__.split("\n\n")[0])
    parser.add_argument("--app", required=True, help="app folder (python -m scripts.label.app prepare)")
    parser.add_argument("--studies", required=True, help="datastore folder, apart from the app and the bundle")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8000)
    parser.add_argument("--conf", nargs=2, action="append", default=[], metavar=("KEY", "VALUE"),
                        help=f"MONAI Label app config, as start_server takes it (models: default {DEFAULT_NAME!r})")
    parser.add_argument("--bundle", default=None, help="bundle root (default: where the served model links)")
    parser.add_argument("--cors_origins", nargs="*", default=[],
                        help="browser origins allowed to call the API, e.g. http://localhost:3000 (default none)")
    parser.add_argument("--allowed_hosts", nargs="*", default=[],
                        help="extra Host header names to accept (default: loopback names, or the bind address)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    conf = dict(tuple(c) for c in args.conf)
    name = conf.pop("models", DEFAULT_NAME)
    try:
        serve(args.app, args.studies, name, args.host, args.port, list(conf.items()), args.cors_origins,
              args.allowed_hosts, args.bundle)
    except ValueError as e:
        logger.error("%s", e)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())

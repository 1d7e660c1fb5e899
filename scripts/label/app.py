# Copyright (c) MambaClinix bundle contributors. Licensed under the Apache License, Version 2.0.
"""Serve this bundle from MONAI Label 0.8.5's ``monaibundle`` sample app, offline, on the loopback interface.

The app is copied from the monailabel wheel (``monailabel apps --download``), the bundle is served from
``<app>/model/<name>`` (its configs with ``configs/plan.yaml`` merged in; its ``scripts/`` code without the
tooling subpackages of :data:`TOOLING`, its models and its data linked), and the server is started with the flags
that keep it offline (no model-zoo index, no SAM2 weights), behind the request guard of
:mod:`scripts.label.server` (ids that would leave the datastore are refused, no cross-origin access by default).
Every step is a function so the integration test and ``scripts/label/run_server.sh`` share them (run from the
bundle root)::

    python -m scripts.label.app prepare --app .monailabel/app --bundle . --name mambaclinix
    python -m scripts.label.app init-model --bundle .            # only when models/model.pt is missing
    python -m scripts.label.app serve --app .monailabel/app --studies ~/mambaclinix-studies --port 8000

``prepare`` and ``serve`` need the MONAI Label environment (``.venv-label``, see scripts/label/setup_env.sh);
``copy-bundle``, ``set-plan`` and ``init-model`` need only torch, monai and pyyaml.
"""

from __future__ import annotations

import argparse
import logging
import os
import shutil
import subprocess
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path

__all__ = [
    "DEFAULT_NAME",
    "OFFLINE_CONF",
    "TOOLING",
    "check_name",
    "served_scripts",
    "prepare_app",
    "resolve_plan",
    "load_plan",
    "copy_bundle",
    "set_plan",
    "init_model",
    "server_command",
    "seed_studies",
]

logger = logging.getLogger(__name__)

DEFAULT_NAME = "mambaclinix"
#: ``--conf`` pairs that keep the monaibundle app offline: without ``zoo_source`` other than monaihosting it
#: downloads the model-zoo index at start, without ``sam2 false`` it downloads SAM2 weights.
OFFLINE_CONF: tuple[tuple[str, str], ...] = (("zoo_source", "github"), ("sam2", "false"))
#: the configuration files MONAI Label reads (it does not read ``.yml``).
LABEL_CONFIGS = ("inference.yaml", "train.yaml")
#: subpackages of ``scripts/`` that are tooling, never imported by the configs: benchmarks, experiments (the loss
#: ablation), demo data, the synthetic lesion generator, hostile-input checks and the GPU check. The model MONAI Label
#: serves (:func:`prepare_app`) and a copy of the bundle (:func:`copy_bundle`) leave them out; a module ``<name>.py`` of
#: the same name is left out too.
TOOLING: tuple[str, ...] = ("benchmark", "experiments", "demo", "lesions", "checks", "gpu_check")
#: names never served nor copied: Python's byte-code caches.
_CACHES = ("__pycache__",)


def check_name(name: str) -> None:
    """Raise ``ValueError`` unless ``name`` is a plain folder name (the served model's)."""
    if not name or "/" in name or name.startswith("."):
        raise ValueError(f"model name {name!r} must be a plain folder name, e.g. {DEFAULT_NAME!r}.")


def resolve_plan(bundle_root: str | os.PathLike, plan: str | os.PathLike | None = "auto") -> Path | None:
    """The plan file to merge: ``"auto"`` is ``<bundle>/configs/plan.yaml`` when it exists, ``None`` none."""
    if plan is None:
        return None
    if str(plan) == "auto":
        path = Path(bundle_root) / "configs" / "plan.yaml"
        return path if path.is_file() else None
    path = Path(plan)
    if not path.is_file():
        raise ValueError(f"plan file {path} does not exist; write it with `python -m scripts.plan` or pass no plan.")
    return path


def load_plan(plan: str | os.PathLike | None) -> dict:
    """Top-level values of a plan YAML (``{}`` for ``None``)."""
    if plan is None:
        return {}
    import yaml

    with open(plan) as f:
        values = yaml.safe_load(f) or {}
    if not isinstance(values, dict):
        raise ValueError(f"plan file {plan} must hold a mapping of top-level config keys.")
    return values


def _is_served(entry: Path) -> bool:
    """Whether an entry of a bundle's ``scripts/`` folder is code the configs may import."""
    stem = entry.name if entry.is_dir() else entry.name.split(".", 1)[0]
    return stem not in TOOLING and entry.name not in _CACHES and not entry.name.endswith(".pyc")


def served_scripts(scripts_dir: str | os.PathLike) -> list[Path]:
    """The entries of a bundle's ``scripts/`` folder that inference and training may import: all but the tooling
    subpackages of :data:`TOOLING` (and byte-code caches), sorted by name.

    Raises:
        ValueError: ``scripts_dir`` is not a folder.
    """
    scripts_dir = Path(scripts_dir)
    if not scripts_dir.is_dir():
        raise ValueError(f"{scripts_dir} is not a folder; pass the bundle's scripts/ folder.")
    return sorted((e for e in scripts_dir.iterdir() if _is_served(e)), key=lambda e: e.name)


def _remove(path: Path) -> None:
    """Remove a link or file, or a folder (links inside it are removed, not followed)."""
    if path.is_symlink() or path.is_file():
        path.unlink()
    elif path.is_dir():
        shutil.rmtree(path)


def _replace_link(link: Path, target: Path) -> None:
    _remove(link)
    link.symlink_to(target, target_is_directory=True)


def _link_served_scripts(scripts_dir: Path, served: Path) -> None:
    """Make ``served`` a folder of links to the :func:`served_scripts` entries of ``scripts_dir``."""
    _remove(served)
    served.mkdir(parents=True)
    for entry in served_scripts(scripts_dir):
        (served / entry.name).symlink_to(entry, target_is_directory=entry.is_dir())


def prepare_app(app_dir: str | os.PathLike, bundle_root: str | os.PathLike, name: str = DEFAULT_NAME,
                plan: str | os.PathLike | None = "auto", python: str | None = None) -> Path:
    """Copy the ``monaibundle`` sample app out of the installed monailabel wheel (once) and serve the bundle in it.

    MONAI Label reads only ``configs/inference.yaml`` and ``configs/train.yaml`` and takes no overrides, so a plan
    (``configs/plan.yaml`` by default, written by ``python -m scripts.plan``) must be inside them: the served
    folder ``<app_dir>/model/<name>`` gets its own ``configs/`` (the bundle's, with the plan's top-level values
    set) and its own ``scripts/`` folder whose entries link to the bundle's ``scripts/`` entries except the
    tooling of :data:`TOOLING` (:func:`served_scripts`), while ``models/`` and ``data/`` link to the bundle's, so
    training there rewrites the bundle's own ``models/model.pt``. Call it again after re-planning or after adding
    a module to ``scripts/``.

    Args:
        app_dir: the app folder to create (``<app_dir>/main.py`` after this call).
        bundle_root: the bundle (a folder with ``configs/`` and ``scripts/``).
        name: model name under which MONAI Label serves the bundle.
        plan: plan YAML to merge; ``"auto"``: ``<bundle_root>/configs/plan.yaml`` if it exists; ``None``: none.
        python: interpreter with monailabel installed; default the current one.

    Returns:
        the served bundle folder inside the app.

    Raises:
        ValueError: the bundle lacks a configuration MONAI Label reads, the name is not a folder name, or the
            plan file is missing.
    """
    check_name(name)
    app_dir, bundle_root = Path(app_dir).absolute(), Path(bundle_root).absolute()
    missing = [c for c in LABEL_CONFIGS + ("metadata.json",) if not (bundle_root / "configs" / c).is_file()]
    if missing:
        raise ValueError(f"{bundle_root} is not a bundle MONAI Label can serve: configs/{missing} missing.")
    plan_path = resolve_plan(bundle_root, plan)
    if not (app_dir / "main.py").is_file():
        tmp = app_dir.parent / f".{app_dir.name}.download"
        shutil.rmtree(tmp, ignore_errors=True)
        cmd = [python or sys.executable, "-m", "monailabel.main", "apps", "--download", "--name", "monaibundle",
               "--output", str(tmp)]
        subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL)
        app_dir.parent.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(app_dir, ignore_errors=True)
        os.replace(tmp / "monaibundle", app_dir)
        shutil.rmtree(tmp, ignore_errors=True)
        logger.info("copied the monaibundle sample app to %s", app_dir)
    target = app_dir / "model" / name
    if target.is_symlink() or target.is_file():
        target.unlink()
    target.mkdir(parents=True, exist_ok=True)
    shutil.rmtree(target / "configs", ignore_errors=True)
    shutil.copytree(bundle_root / "configs", target / "configs", ignore=shutil.ignore_patterns("plan.yaml"))
    if plan_path is not None:
        set_plan(target, load_plan(plan_path))
    (bundle_root / "models").mkdir(exist_ok=True)
    _link_served_scripts(bundle_root / "scripts", target / "scripts")
    for sub in ("models", "data"):
        if (bundle_root / sub).is_dir():
            _replace_link(target / sub, bundle_root / sub)
    logger.info("bundle %s served as %r from %s (plan: %s)", bundle_root, name, target, plan_path or "none")
    return target


def copy_bundle(src: str | os.PathLike, dst: str | os.PathLike, with_models: bool = False) -> Path:
    """Copy a bundle's ``configs/`` and the code of its ``scripts/`` (and ``models/`` when asked) to ``dst``.

    ``scripts/`` is copied as MONAI Label serves it (:func:`served_scripts`: without the tooling of
    :data:`TOOLING`); caches, data, runs and evaluation outputs are left out; ``dst/models`` is always created.

    Returns:
        ``dst``.
    """
    src, dst = Path(src), Path(dst)
    ignore = shutil.ignore_patterns(*_CACHES, "*.pyc")
    dst.mkdir(parents=True, exist_ok=True)
    for sub in ("configs",) + (("models",) if with_models else ()):
        if (src / sub).is_dir():
            shutil.copytree(src / sub, dst / sub, ignore=ignore, dirs_exist_ok=True, symlinks=False)
    if (src / "scripts").is_dir():
        (dst / "scripts").mkdir(exist_ok=True)
        for entry in served_scripts(src / "scripts"):
            if entry.is_dir():
                shutil.copytree(entry, dst / "scripts" / entry.name, ignore=ignore, dirs_exist_ok=True,
                                symlinks=False)
            else:
                shutil.copy2(entry, dst / "scripts" / entry.name)
    (dst / "models").mkdir(exist_ok=True)
    return dst


def _no_alias_dumper():
    import yaml

    class NoAliasDumper(yaml.SafeDumper):
        def ignore_aliases(self, data):  # repeated lists are written out, not as YAML anchors
            return True

    return NoAliasDumper


def set_plan(bundle_root: str | os.PathLike, values: Mapping[str, object],
             config_files: Sequence[str] = LABEL_CONFIGS) -> None:
    """Write top-level values (plan keys such as ``patch_size``, ``features``, ``pixdim``) into the configs that
    MONAI Label reads, since it takes no command-line overrides. Only keys a file already has are set.

    Meant for a copy of the bundle (the YAML is rewritten without its comments).
    """
    import yaml

    for name in config_files:
        path = Path(bundle_root) / "configs" / name
        with open(path) as f:
            config = yaml.safe_load(f)
        changed = [k for k in values if k in config]
        for k in changed:
            config[k] = values[k]
        from scripts.io_utils import atomic_write_text

        atomic_write_text(
            yaml.dump(config, Dumper=_no_alias_dumper(), sort_keys=False, default_flow_style=None, width=120), path
        )
        logger.info("%s: set %s", path, changed)


def init_model(bundle_root: str | os.PathLike, config_file: str = "configs/train.yaml", seed: int = 0,
               overwrite: bool = False, plan: str | os.PathLike | None = "auto") -> Path:
    """Save the weights of a freshly initialised network as ``models/model.pt`` (a plain ``state_dict``, loadable
    with ``weights_only=True``), so MONAI Label lists the model before any training.

    The network is the training config's ``network_def`` (with its deep-supervision heads, as a trained
    ``model.pt`` has them), with the plan merged (see :func:`prepare_app`); MONAI Label loads it non-strictly for
    inference.
    """
    import torch
    from monai.bundle import ConfigParser

    from scripts.io_utils import atomic_torch_save

    bundle_root = Path(bundle_root).absolute()
    path = bundle_root / "models" / "model.pt"
    if path.exists() and not overwrite:
        logger.info("%s exists; kept", path)
        return path
    parser = ConfigParser()
    parser.read_config(str(bundle_root / config_file))
    parser.update(load_plan(resolve_plan(bundle_root, plan)))
    parser["bundle_root"] = str(bundle_root)
    torch.manual_seed(seed)
    net = parser.get_parsed_content("network_def", instantiate=True)
    atomic_torch_save(net.state_dict(), path)
    logger.info("saved freshly initialised weights to %s (train the model before trusting its output)", path)
    return path


def seed_studies(studies: str | os.PathLike, images: Sequence[str | os.PathLike]) -> Path:
    """Create the datastore folder and copy images into it when it holds none (so "Next Sample" has work)."""
    studies = Path(studies)
    studies.mkdir(parents=True, exist_ok=True)
    exts = (".nii.gz", ".nii", ".nrrd", ".mha", ".mhd", ".dcm")
    if not any(p.name.endswith(exts) for p in studies.iterdir()):
        for img in images:
            shutil.copy2(img, studies / Path(img).name)
    return studies


def server_command(app_dir: str | os.PathLike, studies: str | os.PathLike, name: str = DEFAULT_NAME,
                   host: str = "127.0.0.1", port: int = 8000, python: str | None = None,
                   extra_conf: Sequence[tuple[str, str]] = (), cors_origins: Sequence[str] = (),
                   allowed_hosts: Sequence[str] = ()) -> list[str]:
    """The command line that starts MONAI Label with the app, offline, behind the request guard.

    It is ``python -m scripts.label.server`` (MONAI Label's own ``start_server`` with the guard in front, see
    :mod:`scripts.label.server`) with ``start_server``'s arguments; run it with the bundle root as working
    directory (``scripts`` is imported from there). ``python -m`` is used rather than the ``monailabel``
    launcher, which puts the folder above its virtual environment on ``PYTHONPATH``.
    """
    check_name(name)
    cmd = [python or sys.executable, "-m", "scripts.label.server", "--app", str(Path(app_dir).absolute()),
           "--studies", str(Path(studies).absolute()), "--host", host, "--port", str(int(port)),
           "--conf", "models", name]
    for k, v in tuple(OFFLINE_CONF) + tuple(extra_conf):
        cmd += ["--conf", k, v]
    if cors_origins:
        cmd += ["--cors_origins", *cors_origins]
    if allowed_hosts:
        cmd += ["--allowed_hosts", *allowed_hosts]
    return cmd


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m scripts.label.app", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="cmd", required=True)
    p = sub.add_parser("prepare", help="copy the monaibundle app (once) and serve the bundle (with its plan) in it")
    p.add_argument("--app", required=True)
    p.add_argument("--bundle", default=".")
    p.add_argument("--name", default=DEFAULT_NAME)
    p.add_argument("--plan", default="auto", help="plan YAML merged into the served configs (default: configs/plan.yaml if any)")
    p.add_argument("--no-plan", action="store_true", help="serve the configs without a plan")
    p = sub.add_parser("copy-bundle", help="copy configs/ and scripts/ (without the tooling) of a bundle")
    p.add_argument("src")
    p.add_argument("dst")
    p = sub.add_parser("init-model", help="write models/model.pt of a freshly initialised network if missing")
    p.add_argument("--bundle", default=".")
    p.add_argument("--overwrite", action="store_true")
    p.add_argument("--plan", default="auto", help="plan YAML merged into train.yaml (default: configs/plan.yaml if any)")
    p = sub.add_parser("serve", help="start the guarded MONAI Label server (see python -m scripts.label.server)")
    p.add_argument("--app", required=True)
    p.add_argument("--studies", required=True)
    p.add_argument("--name", default=DEFAULT_NAME)
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--seed-images", nargs="*", default=[], help="images copied into an empty studies folder")
    p.add_argument("--cors_origins", nargs="*", default=[], help="browser origins allowed to call the API (default none)")
    p.add_argument("--allowed_hosts", nargs="*", default=[], help="extra Host header names to accept")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    if args.cmd == "prepare":
        prepare_app(args.app, args.bundle, args.name, plan=None if args.no_plan else args.plan)
    elif args.cmd == "copy-bundle":
        copy_bundle(args.src, args.dst)
    elif args.cmd == "init-model":
        init_model(args.bundle, overwrite=args.overwrite, plan=args.plan)
    elif args.cmd == "serve":
        from scripts.label import server

        cmd = server_command(args.app, args.studies, args.name, args.host, args.port,
                             cors_origins=args.cors_origins, allowed_hosts=args.allowed_hosts)
        try:
            server.check_layout(args.app, args.studies, args.name)  # before seeding: never copy into a nested folder
        except ValueError as e:
            logger.error("%s", e)
            return 2
        seed_studies(args.studies, args.seed_images)
        return server.main(cmd[3:])  # in this process: the arguments after `python -m scripts.label.server`
    return 0


if __name__ == "__main__":
    sys.exit(main())

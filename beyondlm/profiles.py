"""Profiles: named sets of params (``profiles/<name>.yaml``) that run the pipeline on other data.

``python -m beyondlm.profiles imdb`` (``make repro PROFILE=imdb`` runs it before the flow):

1. links each data file the profile names under its stage's declared ``inputs/<stage>/`` dir
   (relative links into ``../shared/data``, gitignored; DVC hashes through them);
2. writes the profile's ``params:`` over ``params.yaml`` (comments and the other keys kept; a
   profile key that params.yaml lacks is an error, so a typo cannot pass unnoticed) and says so:
   ``git diff params.yaml`` shows what changed, ``git checkout params.yaml`` restores the default.

DVC reads params.yaml, so a profile has to be in it while the stages run; writing it, loudly, keeps
``dvc repro``, ``dvc params diff`` and the Prefect/MLflow flow working on the profile unchanged.
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path
from typing import Any

from beyondlm.config import ConfigError, load_yaml

PROFILES = Path("profiles")


def profile_path(name: str, root: Path) -> Path:
    path = root / PROFILES / f"{name}.yaml"
    if not path.exists():
        known = sorted(p.stem for p in (root / PROFILES).glob("*.yaml"))
        raise ConfigError(f"PROFILE={name!r}: no {PROFILES}/{name}.yaml; use one of {', '.join(known) or 'none'}")
    return path


def link_inputs(links: dict[str, str], root: Path, where: str) -> list[str]:
    """Create ``target -> source`` links (paths relative to ``root``); the targets made or kept."""
    done = []
    for target, source in (links or {}).items():
        src, dst = Path(os.path.abspath(root / source)), root / target  # abspath: the link stays ../shared/...
        if not src.exists():
            raise ConfigError(f"{where}: links.{target} -> {source}: {src} does not exist; fix: put the "
                              "data there (../shared/data/README.md) or edit the profile's links")
        if dst.is_symlink() or dst.exists():
            if dst.resolve() == src.resolve():
                done.append(target)
                continue
            if not dst.is_symlink():
                raise ConfigError(f"{where}: links.{target}: {dst} exists and is not a link; move it away")
            dst.unlink()
        dst.parent.mkdir(parents=True, exist_ok=True)
        os.symlink(os.path.relpath(src, dst.parent), dst)
        done.append(target)
    return done


def merge(doc: Any, overrides: dict, prefix: str = "") -> list[str]:
    """Write ``overrides`` into ``doc`` in place, mapping by mapping; the dotted keys set."""
    changed = []
    for key, value in overrides.items():
        dotted = f"{prefix}{key}"
        if key not in doc:
            raise ConfigError(f"profile key {dotted!r} is not in params.yaml: fix the profile (a typo?) "
                              "or add the key to params.yaml first")
        if isinstance(value, dict) and isinstance(doc[key], dict):
            changed += merge(doc[key], value, f"{dotted}.")
        elif doc[key] != value:
            doc[key] = value
            changed.append(dotted)
    return changed


def apply_profile(name: str, root: str | Path = ".") -> tuple[list[str], list[str]]:
    """Link the profile's inputs and write its params into params.yaml: (links, keys changed)."""
    from ruamel.yaml import YAML

    from beyondlm.io import atomic_path

    root = Path(root).resolve()
    path = profile_path(name, root)
    profile = load_yaml(path)
    unknown = set(profile) - {"links", "params"}
    if unknown:
        raise ConfigError(f"{path}: unknown top-level keys {sorted(unknown)}; a profile has links: and params:")
    links = link_inputs(profile.get("links") or {}, root, str(path.relative_to(root)))
    yml = YAML()  # round trip: comments, quotes and layout of params.yaml kept, nulls written as null
    yml.width, yml.preserve_quotes = 4096, True
    yml.representer.add_representer(type(None), lambda r, _: r.represent_scalar("tag:yaml.org,2002:null", "null"))
    doc = yml.load((root / "params.yaml").read_text())
    changed = merge(doc, profile.get("params") or {})
    if changed:
        with atomic_path(root / "params.yaml") as tmp, tmp.open("w") as f:
            yml.dump(doc, f)
    return links, changed


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("name", help="profiles/<name>.yaml")
    name = p.parse_args().name
    try:
        links, changed = apply_profile(name)
    except ConfigError as err:
        raise SystemExit(f"error: {err}") from None
    print(f"profile {name}: linked {', '.join(links) or 'nothing'}")
    if changed:
        print(f"profile {name}: params.yaml now holds profiles/{name}.yaml ({len(changed)} keys: {', '.join(changed)}).\n"
              "  `git diff params.yaml` shows them; `git checkout params.yaml` restores the default pipeline.")
    else:
        print(f"profile {name}: params.yaml already holds it")


if __name__ == "__main__":
    main()

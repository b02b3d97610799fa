"""Compares the SASS of two builds of imbsam._C kernel by kernel, for refactors that
must not change the device code (moving code between files, renaming namespaces).

    python scripts/sass_diff.py OLD.so NEW.so [--rename OLD_NAME=NEW_NAME ...]

Kernels are matched by demangled name with anonymous namespaces removed (their
mangled form names the source file), after each ``--rename`` (a moved type, say
``imbsam::cuda::SgdArgs=imbsam::SgdArgs``) is applied to the old build's names; each
body is compared with the lines that name the function itself dropped. Exits 1 and
prints the first differing lines otherwise.
"""
from __future__ import annotations

import argparse
import difflib
import re
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
from test_cuda_sass import cuobjdump  # noqa: E402  (one place that finds the tool)


def _body(chunk: str) -> list[str]:
    lines = []
    for line in chunk.split("\n")[1:]:
        if line.strip().startswith(".........."):  # the end of this function's code
            break
        lines.append(line)
    return lines


def kernels(library: str, renames: tuple[tuple[str, str], ...] = ()) -> dict[str, str]:
    sass = subprocess.run([cuobjdump(), "-sass", library], capture_output=True, text=True, check=True).stdout
    chunks = re.split(r"\n\s*Function : ", sass)[1:]
    mangled = [c.split("\n", 1)[0].strip() for c in chunks]
    names = subprocess.run(["c++filt"], input="\n".join(mangled), capture_output=True, text=True,
                           check=True).stdout.splitlines()
    out = {}
    for name, chunk in zip(names, chunks):
        key = re.sub(r"\(anonymous namespace\)::", "", name)
        for old_name, new_name in renames:
            key = key.replace(old_name, new_name)
        body = _body(chunk)
        if key in out:
            sys.exit(f"{library}: two kernels normalise to {key}")
        out[key] = "\n".join(body)
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("old")
    parser.add_argument("new")
    parser.add_argument("--rename", action="append", default=[], metavar="OLD_NAME=NEW_NAME",
                        help="a name the refactor changed, replaced in the old build's kernel names")
    args = parser.parse_args()
    renames = tuple(tuple(r.split("=", 1)) for r in args.rename)
    if any(len(r) != 2 for r in renames):
        parser.error("--rename takes OLD_NAME=NEW_NAME")
    old, new = kernels(args.old, renames), kernels(args.new)
    if old.keys() != new.keys():
        print("kernels only in OLD:", sorted(old.keys() - new.keys()))
        print("kernels only in NEW:", sorted(new.keys() - old.keys()))
        return 1
    differing = [k for k in old if old[k] != new[k]]
    for k in differing[:3]:
        print(f"== {k}")
        print("\n".join(list(difflib.unified_diff(old[k].split("\n"), new[k].split("\n"), lineterm=""))[:20]))
    print(f"{len(old)} kernels, {len(old) - len(differing)} identical, {len(differing)} differ")
    return 1 if differing else 0


if __name__ == "__main__":
    sys.exit(main())

"""Count the distinct Triton compiles recorded by a census run (tests/compile_census.py).

    FASTLM_COMPILE_CENSUS=/tmp/c-tests TRITON_INTERPRET=1 pytest tests -m 'not configs'
    python scripts/compile_census.py /tmp/c-tests [/tmp/c-configs ...]

Prints, per folder, the distinct keys per kernel and in all, and the keys a folder adds to the ones before it (the
later steps of scripts/gpu_check.sh reuse the Triton cache the earlier ones filled).
"""

import collections
import glob
import os
import sys


def keys(folder: str) -> set[str]:
    out = set()
    for path in glob.glob(os.path.join(folder, "census-*.txt")):
        with open(path) as f:
            out |= {line.strip() for line in f if line.strip()}
    return out


def main(folders: list[str]) -> None:
    seen: set[str] = set()
    for folder in folders:
        ks = keys(folder)
        per_kernel = collections.Counter(k.split(" ", 1)[0] for k in ks)
        print(f"{folder}: {len(ks)} distinct compiles, {len(ks - seen)} not in the folders before it")
        for kernel, n in per_kernel.most_common():
            print(f"  {n:5d}  {kernel}")
        seen |= ks


if __name__ == "__main__":
    main(sys.argv[1:])

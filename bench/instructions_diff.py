"""Per C function, the instructions the extra requests of `bench.instructions --keep FILE`
cost: `python -m bench.instructions_diff FILE [--requests N] [--top K]`.

callgrind_annotate of one run mixes boot with requests; the difference of the two runs
leaves only the requests.  Python functions do not appear (they all run inside
_PyEval_EvalFrameDefault); what this shows is the C side: the interpreter loop, dict
lookups, allocation, OpenSSL, llhttp, libev."""

from __future__ import annotations

import argparse
import re
import subprocess
import sys
from collections import Counter
from pathlib import Path

_ROW = re.compile(r"^\s*([\d,]+)\s+\([^)]*\)\s+(.*)$")


def _functions(path: Path) -> Counter[str]:
    out = subprocess.run(["callgrind_annotate", "--threshold=100", "--inclusive=no", "--auto=no",
                          str(path)], capture_output=True, text=True, check=True).stdout
    counts: Counter[str] = Counter()
    for line in out.splitlines():
        match = _ROW.match(line)
        if match and "PROGRAM TOTALS" not in line:
            name = match.group(2).split(" [")[0]
            name = name.rsplit("/", 1)[-1]  # file:function, without the build path
            counts[name] += int(match.group(1).replace(",", ""))
    return counts


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("file", type=Path)
    parser.add_argument("--requests", type=int, default=2000,
                        help="how many more requests the longer run served")
    parser.add_argument("--top", type=int, default=40)
    args = parser.parse_args()
    more = _functions(args.file)
    base = _functions(args.file.with_suffix(".base"))
    diff = Counter({name: more[name] - base.get(name, 0) for name in more})
    total = sum(diff.values())
    print(f"{total / args.requests:,.0f} instructions per request in all")
    for name, count in diff.most_common(args.top):
        print(f"{count / args.requests:9,.0f} {100 * count / total:5.1f} %  {name}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

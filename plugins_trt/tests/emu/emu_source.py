"""Mechanical rewrite of rocketSparseVKernel.cu into host C++ for the CPU emulation (see emu_cuda.h).

Only three constructs change; every kernel body, helper and host launcher is compiled as written:

* ``extern __shared__ T name[];``  ->  ``T* name = ::rocket_emu::dynamicShared<T>();``
* ``__shared__ [__align__(A)] T name[D1]...;``  ->  ``auto& name = ::rocket_emu::staticShared<T[D1]..., A>(__LINE__);``
  (a fresh, 0xFF-filled, exact-size buffer per block)
* ``kernel<targs><<<grid, block, smem, stream>>>(args);``  ->
  ``::rocket_emu::launch("kernel", grid, block, smem, stream, [&] { kernel<targs>(args); }, BOUND);`` where BOUND is
  the first argument of the kernel's ``__launch_bounds__`` (so a launch with more threads fails).

The rewrite refuses (raises) when a construct it does not know appears, so a kernel change that needs emulator support
fails loudly instead of compiling into something untested.

    python emu_source.py rocketSparseVKernel.cu out.inc
"""
from __future__ import annotations

import re
import sys
from pathlib import Path

_DYN = re.compile(r"extern\s+__shared__\s+(?:__align__\(\s*\d+\s*\)\s+)?([\w:]+)\s+(\w+)\s*\[\s*\]\s*;")
_STATIC = re.compile(r"__shared__\s+(?:__align__\(\s*(\d+)\s*\)\s+)?([\w:]+)\s+(\w+)\s*((?:\[[^\]\n]+\]\s*)+);")
_BOUNDS = re.compile(r"__launch_bounds__\(([^,)]+)(?:,[^)]*)?\)\s*(\w+)\s*\(")
_LAUNCH = re.compile(r"<<<")


def _kernel_name_start(src: str, end: int) -> int:
    """Start of ``name<targs>`` that ends right before ``end`` (the ``<<<``)."""
    i = end
    if src[i - 1] == ">":
        depth = 0
        while True:
            i -= 1
            c = src[i]
            if c == ">":
                depth += 1
            elif c == "<":
                depth -= 1
                if depth == 0:
                    break
    while i > 0 and (src[i - 1].isalnum() or src[i - 1] in "_:"):
        i -= 1
    return i


def _balanced_args(src: str, open_paren: int) -> int:
    """Index just past the ``)`` matching ``src[open_paren] == '('``."""
    depth = 0
    for i in range(open_paren, len(src)):
        if src[i] == "(":
            depth += 1
        elif src[i] == ")":
            depth -= 1
            if depth == 0:
                return i + 1
    raise ValueError("unbalanced parentheses in a kernel launch")


def transform(src: str) -> tuple[str, dict[str, int]]:
    """Rewritten source and counts of each rewrite."""
    bounds = {name: expr.strip() for expr, name in _BOUNDS.findall(src)}
    counts = {"dynamic_shared": 0, "static_shared": 0, "launches": 0}

    def dyn(m: re.Match) -> str:
        counts["dynamic_shared"] += 1
        return f"{m.group(1)}* {m.group(2)} = ::rocket_emu::dynamicShared<{m.group(1)}>();"

    src = _DYN.sub(dyn, src)

    def static(m: re.Match) -> str:
        counts["static_shared"] += 1
        align = m.group(1) or "16"
        dims = re.sub(r"\s+", "", m.group(4))
        return f"auto& {m.group(3)} = ::rocket_emu::staticShared<{m.group(2)}{dims}, {align}>(__LINE__);"

    src = _STATIC.sub(static, src)
    if "__shared__" in src.replace("__shared__ memory", ""):
        left = [ln.strip() for ln in src.splitlines() if "__shared__" in ln and not ln.strip().startswith(("//", "*"))]
        if left:
            raise ValueError(f"__shared__ declaration the emulation does not rewrite: {left[0]}")

    out, pos = [], 0
    for m in _LAUNCH.finditer(src):
        if m.start() < pos:
            continue
        start = _kernel_name_start(src, m.start())
        kernel = src[start:m.start()]
        name = kernel.split("<")[0].strip()
        close = src.index(">>>", m.end())
        config = src[m.end():close]
        if src[close + 3] != "(":
            raise ValueError(f"unexpected text after the launch configuration of {name}")
        args_end = _balanced_args(src, close + 3)
        args = src[close + 4:args_end - 1]
        if not src[args_end:].lstrip().startswith(";"):
            raise ValueError(f"launch of {name} is not a statement")
        if name not in bounds:
            raise ValueError(f"kernel {name} has no __launch_bounds__: the emulation checks the block size against it")
        out.append(src[pos:start])
        out.append(f'::rocket_emu::launch("{name}", {config}, [&] {{ {kernel}({args}); }}, ({bounds[name]}))')
        pos = args_end
        counts["launches"] += 1
    out.append(src[pos:])
    return "".join(out), counts


def main(argv: list[str]) -> int:
    if len(argv) != 3:
        print("usage: emu_source.py KERNEL.cu OUT.inc", file=sys.stderr)
        return 2
    text, counts = transform(Path(argv[1]).read_text())
    if counts["launches"] == 0:
        print(f"no kernel launches found in {argv[1]}", file=sys.stderr)
        return 1
    Path(argv[2]).write_text(f'#line 1 "{argv[1]}"\n' + text)
    print(", ".join(f"{k} {v}" for k, v in counts.items()))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))

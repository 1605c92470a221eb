"""Compile census (a test-harness tool): with ``FASTLM_COMPILE_CENSUS=DIR``, every Triton launch made through the
interpreter is recorded as the specialisation key a GPU launch would compile for (kernel, constexpr values,
num_warps / num_stages, and per argument its dtype or integer class: 1, a multiple of 16, other), one file per test
process in DIR. ``python scripts/compile_census.py DIR`` counts the distinct keys: the number of Triton compiles the
same tests would trigger on a GPU with an empty cache, which sizes the steps of scripts/gpu_check.sh. On a GPU the
launch configs differ from the interpreter's single small config, but there is one config per launch site and
call type either way, so the count carries over."""

import atexit
import inspect
import os

import torch


def _arg_class(v) -> str:
    if isinstance(v, torch.Tensor):
        return f"*{str(v.dtype).removeprefix('torch.')}"
    if isinstance(v, bool) or v is None:
        return repr(v)
    if isinstance(v, int):
        return "1" if v == 1 else ("d16" if v % 16 == 0 else ("i64" if abs(v) >= 2**31 else "i32"))
    if isinstance(v, float):
        return "f"
    return type(v).__name__  # e.g. a tensor descriptor


def install(out_dir: str) -> None:
    from triton.runtime import interpreter

    os.makedirs(out_dir, exist_ok=True)
    keys: set[str] = set()
    original = interpreter.InterpretedFunction.run

    def run(self, *args, grid, warmup, **kwargs):
        fn = self.fn
        params = inspect.signature(fn).parameters
        const = {n for n, p in params.items() if "constexpr" in str(p.annotation)}
        bound = dict(zip(self.arg_names, args, strict=False)) | kwargs
        parts = [fn.__module__.rsplit(".", 1)[-1] + "." + fn.__name__]
        for name in self.arg_names:
            if name in bound:
                v = bound[name]
                parts.append(f"{name}={v!r}" if name in const else f"{name}:{_arg_class(v)}")
        parts += [f"{k}={kwargs[k]}" for k in ("num_warps", "num_stages") if k in kwargs]
        keys.add(" ".join(parts))
        return original(self, *args, grid=grid, warmup=warmup, **kwargs)

    interpreter.InterpretedFunction.run = run

    def dump():
        with open(os.path.join(out_dir, f"census-{os.getpid()}.txt"), "w") as f:
            f.write("\n".join(sorted(keys)) + ("\n" if keys else ""))

    atexit.register(dump)

"""Micro-benchmark: each kernel against its torch reference.

    dynkv bench kernels [--json out.json] [--triton] [--repeats N]
    (the same as python -m dynkv_bench.kernels ...)

On CUDA: Llama-3-8B-like shapes (G=8 KV heads, g=4, d=128, bf16; w up to 64, n up to 128k), the
Triton kernels whenever triton imports, and for the score kernel the achieved bandwidth
(bytes it must read: keys once per pass + queries, divided by time) against a measured device copy
bandwidth (``Tensor.copy_`` of 1 GiB; read + write bytes). On the CPU: tiny shapes that only prove the
harness runs; reference timings, plus the Triton kernels in the interpreter with ``--triton``
(``TRITON_INTERPRET=1``; interpreter timings say nothing about GPU speed).

Prints a table on stdout (progress on stderr) and, with ``--json``, writes every row to a file.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import typer

__all__ = ["Row", "copy_bandwidth", "kernels_command", "main", "run"]


@dataclass
class Row:
    kernel: str
    shape: str
    dtype: str
    ref_ms: float
    triton_ms: float | None = None
    max_abs_err: float | None = None
    bytes_read: int | None = None

    @property
    def speedup(self) -> float | None:
        return self.ref_ms / self.triton_ms if self.triton_ms else None

    @property
    def gbs(self) -> float | None:
        """Achieved bandwidth of the Triton kernel, GB/s (1e9 bytes)."""
        if self.bytes_read is None or not self.triton_ms:
            return None
        return self.bytes_read / (self.triton_ms * 1e-3) / 1e9


def _time_ms(fn: Callable[..., object], args: tuple, device: torch.device, repeats: int, warmup: int) -> float:
    """Median wall time of ``fn(*args)`` in milliseconds (CUDA events on a GPU)."""
    for _ in range(warmup):
        fn(*args)
    times = []
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        for _ in range(repeats):
            start, stop = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn(*args)
            stop.record()
            stop.synchronize()
            times.append(start.elapsed_time(stop))
    else:
        for _ in range(repeats):
            t0 = time.perf_counter()
            fn(*args)
            times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def copy_bandwidth(device: torch.device, nbytes: int = 1 << 30, repeats: int = 10) -> float:
    """Device copy bandwidth in GB/s: ``dst.copy_(src)`` moves ``2 * nbytes`` (read + write)."""
    src = torch.empty(nbytes // 2, dtype=torch.bfloat16, device=device)
    dst = torch.empty_like(src)
    ms = _time_ms(dst.copy_, (src,), device, repeats, warmup=3)
    return 2 * nbytes / (ms * 1e-3) / 1e9


def _max_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a.float() - b.float()).abs().max().item() if a.numel() else 0.0


def _obs_shapes(cuda: bool) -> list[tuple[int, int, int, int, int]]:
    """(G, g, w, n, d)."""
    if cuda:
        return [(8, 4, w, n, 128) for n in (4096, 32768, 131072) for w in (8, 32, 64)]
    return [(2, 4, 8, 256, 64), (2, 4, 32, 1024, 128)]


def _pool_shapes(cuda: bool) -> list[tuple[int, int, int]]:
    """(G, n, kernel)."""
    return [(8, 32768, 7), (8, 131072, 7)] if cuda else [(2, 1024, 7)]


def _ragged_shapes(cuda: bool) -> list[tuple[int, int, int, int]]:
    """(G, g, d, mean keys per head); head lengths vary from 0.5x to 1.5x the mean."""
    return [(8, 4, 128, m) for m in (1024, 8192, 32768, 131072)] if cuda else [(2, 4, 64, 256)]


def _measure(row: Row, ref: Callable, tri: Callable | None, args: tuple, device, repeats: int, warmup: int) -> Row:
    """Time ``ref(*args)`` and, when given, ``tri(*args)``; record the largest difference of their outputs."""
    row.ref_ms = _time_ms(ref, args, device, repeats, warmup)
    if tri is not None:
        t_repeats = repeats if device.type == "cuda" else 1  # the interpreter is slow: one timed run
        row.triton_ms = _time_ms(tri, args, device, t_repeats, warmup)
        row.max_abs_err = _max_err(tri(*args), ref(*args))
    return row


def run(device: torch.device, use_triton: bool, repeats: int, log: Callable[[str], None]) -> list[Row]:
    """Benchmark every kernel on ``device``; Triton columns only when ``use_triton``."""
    from dynkv_cli.kernels import observation_scores_ref, pool_scores_ref
    from dynkv_cli.kernels.ragged_decode import ragged_decode_attention_ref

    obs_tri = pool_tri = ragged_tri = bytes_read = None
    if use_triton:
        from dynkv_cli.kernels.obs_scores_triton import bytes_read, observation_scores_triton, pool_scores_triton
        from dynkv_cli.kernels.ragged_decode import ragged_decode_attention_triton

        obs_tri, pool_tri, ragged_tri = observation_scores_triton, pool_scores_triton, ragged_decode_attention_triton

    cuda = device.type == "cuda"
    dtype = torch.bfloat16 if cuda else torch.float32
    dname = str(dtype).removeprefix("torch.")
    warmup = 3 if cuda else 2
    rows: list[Row] = []
    gen = torch.Generator().manual_seed(0)

    for G, g, w, n, d in _obs_shapes(cuda):
        shape = f"G={G} g={g} w={w} n={n} d={d}"
        log(f"observation_scores {shape}")
        query = torch.randn(G * g, w, d, generator=gen).to(device, dtype)
        keys = torch.randn(G, n, d, generator=gen).to(device, dtype)
        row = Row("observation_scores", shape, dname, 0.0)
        rows.append(_measure(row, observation_scores_ref, obs_tri, (query, keys, d**-0.5, n), device, repeats, warmup))
        if bytes_read is not None:
            row.bytes_read = bytes_read(query, keys, n)  # keys once per pass + queries

    for G, n, k in _pool_shapes(cuda):
        for kind in ("max", "avg"):
            shape = f"G={G} n={n} k={k}"
            log(f"pool_scores[{kind}] {shape}")
            scores = torch.rand(G, n, generator=gen).to(device)
            positions = torch.randint(1, 3, (G, n), generator=gen).cumsum(-1).to(device)  # some gaps
            row = Row(f"pool_scores[{kind}]", shape, "float32", 0.0)
            rows.append(_measure(row, pool_scores_ref, pool_tri, (scores, positions, k, kind), device, repeats, warmup))
            if use_triton:
                row.bytes_read = scores.numel() * 4 + positions.numel() * 8

    for G, g, d, mean in _ragged_shapes(cuda):
        lens = torch.randint(mean // 2, mean * 3 // 2 + 1, (G,), generator=gen)
        offsets = torch.cat([torch.zeros(1, dtype=torch.int64), lens.cumsum(0)]).to(device)
        T = int(lens.sum())
        shape = f"G={G} g={g} d={d} T={T}"
        log(f"ragged_decode_attention {shape}")
        q = torch.randn(G * g, d, generator=gen).to(device, dtype)
        k_flat = torch.randn(T, d, generator=gen).to(device, dtype)
        v_flat = torch.randn(T, d, generator=gen).to(device, dtype)
        row = Row("ragged_decode_attention", shape, dname, 0.0)
        args = (q, k_flat, v_flat, offsets, d**-0.5)
        rows.append(_measure(row, ragged_decode_attention_ref, ragged_tri, args, device, repeats, warmup))
        if use_triton:
            row.bytes_read = 2 * T * d * k_flat.element_size() + q.numel() * q.element_size()
    return rows


def _fmt(x: float | None, spec: str) -> str:
    return "-" if x is None else format(x, spec)


def render(rows: list[Row], copy_gbs: float | None, title: str) -> None:
    from rich.console import Console
    from rich.markup import escape
    from rich.table import Table

    table = Table(title=title)
    for col in ("kernel", "shape", "dtype", "ref ms", "triton ms", "speedup", "max |err|", "read GB/s", "% copy"):
        table.add_column(col, justify="left" if col in ("kernel", "shape", "dtype") else "right")
    for r in rows:
        pct = r.gbs / copy_gbs * 100 if (r.gbs is not None and copy_gbs) else None
        table.add_row(
            escape(r.kernel),  # "pool_scores[max]" is not markup
            r.shape,
            r.dtype,
            _fmt(r.ref_ms, ".3f"),
            _fmt(r.triton_ms, ".3f"),
            _fmt(r.speedup, ".2f"),
            _fmt(r.max_abs_err, ".2e"),
            _fmt(r.gbs if copy_gbs else None, ".0f"),
            _fmt(pct, ".0f"),
        )
    console = Console(width=None if sys.stdout.isatty() else 150)  # no wrapping when piped
    console.print(table)
    if copy_gbs:
        console.print(f"device copy bandwidth: {copy_gbs:.0f} GB/s (read + write of 1 GiB)")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m dynkv_bench.kernels", description=__doc__.split("\n")[0])
    parser.add_argument("--json", type=Path, help="write the rows and the device info to this file")
    parser.add_argument(
        "--triton",
        action="store_true",
        help="on the CPU, also time the Triton kernels in the interpreter (on CUDA they always run)",
    )
    parser.add_argument("--no-triton", action="store_true", help="time the torch references only")
    parser.add_argument("--repeats", type=int, default=None, help="timed runs per measurement (median)")
    args = parser.parse_args(argv)

    cuda = torch.cuda.is_available()
    device = torch.device("cuda" if cuda else "cpu")
    want_triton = not args.no_triton and (cuda or args.triton)
    if want_triton and not cuda and os.environ.get("TRITON_INTERPRET") != "1":
        # The interpreter must be on before triton.language is imported, and importing dynkv_cli
        # (transformers, torch) already imported it: start again with the variable set.
        os.environ["TRITON_INTERPRET"] = "1"
        argv = sys.argv[1:] if argv is None else argv
        os.execv(sys.executable, [sys.executable, "-m", "dynkv_bench.kernels", *argv])
    from dynkv_cli.kernels import triton_available

    if want_triton and not triton_available():
        if args.triton:
            print("error: --triton needs triton: pip install 'dynkv[triton]'", file=sys.stderr)
            return 2
        print("triton does not import: timing the torch references only", file=sys.stderr)
        want_triton = False
    if not cuda:
        # One thread: on a busy machine, OpenMP threads waiting on each other make the timings noise.
        torch.set_num_threads(1)

    repeats = args.repeats or (20 if cuda else 5)
    log = lambda msg: print(f"[bench] {msg}", file=sys.stderr, flush=True)  # noqa: E731
    copy_gbs = copy_bandwidth(device) if cuda else None
    rows = run(device, want_triton, repeats, log)

    name = torch.cuda.get_device_name(device) if cuda else platform.processor() or platform.machine()
    mode = ("triton" if cuda else "triton interpreter") if want_triton else "reference only"
    render(rows, copy_gbs, f"dynkv kernels on {device.type} ({name}; {mode})")
    if args.json:
        import importlib.metadata as md

        try:
            triton_version = md.version("triton")
        except md.PackageNotFoundError:
            triton_version = None
        payload = {
            "device": device.type,
            "device_name": name,
            "mode": mode,
            "torch": torch.__version__,
            "triton": triton_version,
            "repeats": repeats,
            "copy_bandwidth_gbs": copy_gbs,
            "rows": [
                asdict(r)
                | {"speedup": r.speedup, "achieved_gbs": r.gbs if cuda else None}
                | {"pct_of_copy": (r.gbs / copy_gbs * 100) if (cuda and r.gbs and copy_gbs) else None}
                for r in rows
            ],
        }
        args.json.write_text(json.dumps(payload, indent=2) + "\n")
        log(f"wrote {args.json}")
    return 0


def kernels_command(
    json_out: Path = typer.Option(None, "--json", help="write the rows and the device info to this file"),
    triton: bool = typer.Option(
        False, "--triton", help="on the CPU, also time the Triton kernels in the interpreter (on CUDA they always run)"
    ),
    no_triton: bool = typer.Option(False, "--no-triton", help="time the torch references only"),
    repeats: int = typer.Option(
        0, "--repeats", help="timed runs per measurement, median reported (0: 20 on CUDA, 5 on CPU)"
    ),
) -> None:
    """Each kernel against its torch reference: time, error, and on CUDA the bandwidth it reaches."""
    argv = [*(["--json", str(json_out)] if json_out else []), *(["--triton"] if triton else [])]
    argv += [*(["--no-triton"] if no_triton else []), *(["--repeats", str(repeats)] if repeats else [])]
    raise typer.Exit(main(argv))


if __name__ == "__main__":
    raise SystemExit(main())

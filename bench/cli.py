"""`dynkv bench ...`: the benchmark commands (each benchmark module adds its command here)."""

import typer

bench_app = typer.Typer(help="Benchmarks: accuracy against budget, speed and memory.", no_args_is_help=True)

from .quality import quality_command  # noqa: E402

bench_app.command("quality")(quality_command)

from .speed import speed_command  # noqa: E402

bench_app.command("speed")(speed_command)

from .kernels import kernels_command  # noqa: E402

bench_app.command("kernels")(kernels_command)

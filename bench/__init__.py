"""Nova's benchmark harness: a program, not timed tests.

    python -m bench --help              the benchmarks, one line each
    python -m bench startup --runs 1000
    python -m bench all                 every benchmark with its defaults

A benchmark is a module `bench/<name>.py` registered in `bench.__main__`,
imported only when it runs. Its contract:

    add_arguments(parser: argparse.ArgumentParser) -> None   (optional)
    run(args: argparse.Namespace) -> dict[str, Any]

`run` measures Nova and its peers in the same run, prints a readable table,
and returns the result body: at least "parameters" and "variants" (each
variant's n, p50/p90/p99/max/mean in microseconds, see `common.summarize`),
plus "ratios" against the peers and any "notes". The harness adds the
timestamp and host facts and writes `bench/results/<name>.json`.
See docs/benchmarks.md for what each benchmark measures.
"""

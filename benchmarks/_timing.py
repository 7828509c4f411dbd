"""Timing shared by the benchmarks that compare callables in one process."""
import time


def alternate(runs, rounds, repeats=1, warmup=1):
    """{name: [seconds per call, one value per round]} for the callables in `runs`: each called `warmup` times first,
    then `rounds` rounds of `repeats` calls each, the order reversed every other round, so that a change in the
    machine's load falls on all of them alike."""
    times = {name: [] for name in runs}
    for _ in range(warmup):
        for fn in runs.values():
            fn()
    for r in range(rounds):
        for name in (list(runs) if r % 2 == 0 else list(reversed(runs))):
            start = time.perf_counter()
            for _ in range(repeats):
                runs[name]()
            times[name].append((time.perf_counter() - start) / repeats)
    return times

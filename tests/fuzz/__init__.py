"""A property-based fuzz harness (hypothesis) for every loader of hostile input in emo-edge.

    mutate.py   structure-aware mutators (JSON, bytes, safetensors, whole directories), driven by hypothesis
                (the short run) or a seeded PRNG (the long campaign's volume)
    bases.py    the valid inputs every mutant starts from (synth checkpoints, static/swappable bundles, ...)
    targets.py  the fuzz targets: which base, which strategy, which loader
    worker.py   runs one case in a separate process under an audit hook; classifies the outcome
    harness.py  the campaign: hypothesis drives each target, a watchdog kills hung workers, reproducers

Outcomes per iteration: "typed" (an EmoEdgeError: the good refusal), "accepted" (loaded fine), "crash" (any
other exception, or the worker died), "hang" (over the per-iteration time limit). Separately, every path the
loader opens outside the input directory (and the allowed runtime locations) counts as an outside read.

Short run: tests/security/test_fuzz.py. Long run: `python bench/fuzz.py --iterations 100000 --out DIR` (its docstring:
engines, the strace cross-check, --replay of a saved finding).

Why hypothesis and not atheris (a cp311 wheel of atheris 3.0 is on the package index): the inputs here are structured
(JSON documents, safetensors headers, directories of files with symlinks and a manifest that may be re-hashed),
which hypothesis strategies express directly and deterministically (derandomize for the test suite), in an
ordinary Python loop that classifies every outcome and continues; atheris feeds raw bytes from libFuzzer, takes
over the process (atheris.Fuzz() does not return, one target per process) and aborts on the first exception.
"""

"""Benchmarks of bionet_fast: the pytest-benchmark suite (`pytest bench/ --benchmark-only`), the
one-command device run (`bash bench/run_device.sh OUTDIR`) and the CPU memory benchmark
(`python -m bench.cpu_memory`). Not part of the installed package."""

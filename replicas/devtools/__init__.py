"""Developer tooling, not used while serving: a deterministic BPE tokenizer trainer and the
random-weight checkpoint writer behind `zayaserve init-checkpoint`, the built-in `tiny`/`small`
models, the tests and the benchmarks."""

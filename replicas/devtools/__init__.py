"""Developer tooling, never imported while serving: checkpoints made for tests and benchmarks
(a skewed router for the load-balancing tests). The built-in models are `replicas/model/builtin`."""

"""The benchmark scripts, and what they share with the tests: the trained models and their
data (`benchmarks.models`) and the architecture zoo (`benchmarks.zoo`). Not part of the
installed package."""

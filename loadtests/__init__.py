"""Load tests and the benchmark of the service; see loadtests/README.md."""

"""Developer scripts (benchmarks, screenshots) and the browser helpers they share with tests."""

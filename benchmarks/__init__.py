"""Side-by-side benchmarks of the framework against its peers (not timed tests); see run.py."""

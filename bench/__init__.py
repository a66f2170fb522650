"""The benchmark suite: `python -m bench` (`make bench`). Results go to bench/results/."""

"""Servers for a machine of one's own: `score-service dev` (`quickstart`) and the throwaway
Redis and Postgres it, the tests and the benchmark run on (`servers`)."""

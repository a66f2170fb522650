"""Servers for a machine of one's own: `score-service dev` (`quickstart`), the throwaway Redis
and Postgres it, the tests and the benchmark run on (`servers`), and Redis Cluster and
Sentinel deployments made of such servers (`topologies`)."""

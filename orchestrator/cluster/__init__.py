"""The cluster: `ray_env` (start or join a Ray, concurrency caps) and `check` (offline checks
of a cluster-launcher YAML)."""

"""Where extraction runs: ``--engine local`` (this process, the commands' own loop) or ``--engine ray``
(:mod:`.ray_engine`: one Ray task per shard or chunk of images, on one machine or a cluster)."""

ENGINES = ("local", "ray")

"""Where extraction and scoring run: ``--engine local`` (this process, the commands' own loop) or
``--engine ray`` (:mod:`.ray_engine`: one Ray task per shard or chunk of images; :mod:`.ray_score`:
score-noise's blocks of rows as Ray tasks; on one machine or a cluster)."""

ENGINES = ("local", "ray")

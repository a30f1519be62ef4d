"""One model across several processes on `mx.distributed` (issue 28): who is in the world
(world.py), a model loaded as this rank's shard (shard.py), and work mirrored from rank 0
to every rank (mirror.py). Importing this package imports no MLX."""

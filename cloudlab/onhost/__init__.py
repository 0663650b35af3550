"""What runs where the engines run, not on the client: kept apart, and light to import.

- :mod:`.agent`: every process a backend starts runs under it (its owner's lease, the
  memory guard, its title and last words);
- :mod:`.forkserver`: forks engines from a process that has imported them once;
- :mod:`.calls`: the functions the client sends engines (a map's chunk, push, pull, the
  user's code), and each engine's namespace;
- :mod:`.hostenv`: run by a host's own bare Python, before cloudlab is installed there.
"""

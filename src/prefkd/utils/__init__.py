"""The bottom layer: small helpers every other part of prefkd may use, and that import nothing of prefkd.

- :mod:`prefkd.utils.config`: where ``config/`` is, the ``${repo_dir:}`` and ``${shared_dir:}`` resolvers, secrets
  from ``.env``.
- :mod:`prefkd.utils.devices`: ``resolve_device("auto")``.
"""

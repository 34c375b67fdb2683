"""The squeeze → stats → recover → evaluate pipeline behind the ``unidd-fast`` command."""

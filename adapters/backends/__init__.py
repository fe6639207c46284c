"""Array backends: one small module per framework, each the array-API base plus what differs.

Loaded only when an array of that framework reaches refreekv (``refreekv.backend.get_backend``).
"""

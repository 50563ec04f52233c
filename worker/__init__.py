"""The worker: one process per runtime, owning all GPU state (engine, pager arenas, snapshot I/O).

Nothing under this package imports `torpor.scheduler`.
"""

"""torpor: page initialized LLM runtimes between GPU, host RAM and NVMe.

The import package `torpor` is assembled from the repository's top-level directories
(see docs/ARCHITECTURE.md): this directory holds what every part shares (the error
hierarchy, logging, units and the generated `torpor.v1` protocol), while
`torpor.scheduler`, `torpor.worker` and `torpor.store` live in their own directories.
"""

__version__ = "0.1.0"

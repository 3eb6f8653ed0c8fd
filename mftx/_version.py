"""The version of mftx, defined here only: pyproject.toml reads it (scikit-build-core's
regex provider) and CMake compiles it into `mftx.ops._C`, so a stale build is told apart
at import."""

__version__ = "0.1.0"

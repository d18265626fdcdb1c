from tests.models.conftest import _seed, arch  # noqa: F401  (shared fixtures)

"""Where the package's own files live. LAVIS joins config paths with its library root; an absolute
path survives that join, so our default YAMLs are addressed absolutely and nothing in LAVIS is edited."""
import os

PACKAGE_ROOT = os.path.dirname(os.path.abspath(__file__))


def config_path(relative: str) -> str:
    return os.path.join(PACKAGE_ROOT, "configs", relative)


def asset_path(relative: str) -> str:
    return os.path.join(PACKAGE_ROOT, "assets", relative)


def cache_root() -> str:
    """Cache for generated data (the embedded dataset): $LAVIS_POINT_CACHE or ~/.cache/lavis_point."""
    return os.environ.get("LAVIS_POINT_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "lavis_point")

"""Small leaf helpers shared by every layer (they import nothing of bionet_fast)."""
from .files import atomic_write, write_json

__all__ = ["atomic_write", "write_json"]

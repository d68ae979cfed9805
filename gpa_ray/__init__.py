"""gpa_ray: distributed audio-text retrieval on Ray (EnCodec ingest, GPA, AudioFormer).

`from gpa_ray import GPA` is the Python API (`gpa_ray.api`): a trained model's audio and
text embeddings, scores, zero-shot classes and index search, without Ray. It is imported
on first use, so `import gpa_ray` alone does not load torch.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"
__all__ = ["GPA", "__version__"]

if TYPE_CHECKING:
    from gpa_ray.api import GPA


def __getattr__(name: str) -> Any:
    if name == "GPA":
        from gpa_ray.api import GPA

        return GPA
    raise AttributeError(f"module 'gpa_ray' has no attribute {name!r}")

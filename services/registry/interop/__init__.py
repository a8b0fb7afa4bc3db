"""Interop: read and write the adapter formats other tools use (diffusers/PEFT, kohya, A1111).

Entry points (see api.py): `import_file` turns an uploaded safetensors file into our stored
layout after checking it against the base model (`BaseModelShapes`); `export_lora`,
`export_embedding` and `export_dreambooth` write the stored artifacts in foreign formats.
Everything else in the package is a pure key/shape mapping used by those four.
"""

from services.registry.interop.api import (
    EXPORT_FORMATS,
    Imported,
    export_dreambooth,
    export_embedding,
    export_lora,
    import_file,
)
from services.registry.interop.detect import Detection, detect, read_header, refuse_pickle
from services.registry.interop.shapes import BaseModelShapes

__all__ = [
    "EXPORT_FORMATS",
    "BaseModelShapes",
    "Detection",
    "Imported",
    "detect",
    "export_dreambooth",
    "export_embedding",
    "export_lora",
    "import_file",
    "read_header",
    "refuse_pickle",
]

"""bgesmall: BAAI/bge-small-en-v1.5 text embeddings on a CPU, in numpy and numba.

    import bgesmall
    model = bgesmall.load()                  # or bgesmall.load("path/to/model-folder")
    vecs = model.embed(["a passage", ...])   # [n, 384] float32, unit rows
    q = model.embed_queries(["a question"])  # with BGE's query instruction
"""

from .config import BertConfig, ModelLoadError
from .model import QUERY_INSTRUCTION, Model, load

__version__ = "0.1.0"
__all__ = ["BertConfig", "Model", "ModelLoadError", "QUERY_INSTRUCTION", "load", "__version__"]

"""encdec: adapt decoder-only models (Gemma, Llama, Mistral, Qwen) into encoder-decoder models, and train, evaluate and
serve them."""

from encdec.adapt import adapt
from encdec.checkpoint import load, load_checkpoint, save
from encdec.config import EncDecConfig, StackConfig
from encdec.errors import EncdecError
from encdec.model import EncoderDecoder
from encdec.sources import load_source, load_tokenizer

__all__ = [
    "EncDecConfig", "EncdecError", "EncoderDecoder", "StackConfig", "adapt", "load", "load_checkpoint",
    "load_source", "load_tokenizer", "save",
]
__version__ = "0.1.0"

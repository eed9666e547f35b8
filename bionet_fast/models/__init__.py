"""Models: configs, BiONet, the shared recurrence and checkpointing, the official import, and
`create_model` / `from_pretrained`. Imports only the blocks layer below it (and utils)."""
from .biolinknet import BiOLinkNet, BiOLinkNetConfig
from .bionet import BiONet
from .config import BiONetConfig
from .factory import architecture_of, available_models, create_model, from_pretrained, register_model
from .official import load_official

register_model("bionet", BiONet)
register_model("biolinknet", BiOLinkNet)

__all__ = ["BiOLinkNet", "BiOLinkNetConfig", "BiONet", "BiONetConfig", "architecture_of", "available_models",
           "create_model", "from_pretrained", "load_official", "register_model"]

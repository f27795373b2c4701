"""Model zoo: one module per architecture, all registered in :mod:`covidx.models.registry`."""

from covidx.models.registry import Preset, create_model, get_spec, list_models, register_model

# Importing each architecture module registers its variants.
from covidx.models import baseline, densenet, dpn, ensemble, magsd, resnet, smallcnn, tiramisu, unet, vgg  # noqa: F401,E402
from covidx.models import cascade  # noqa: F401,E402  (uses the stage models above)

__all__ = ["Preset", "create_model", "get_spec", "list_models", "register_model"]
